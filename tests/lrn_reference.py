"""What the normalisation + max-pool tests of both kernels compare against (the Triton one in
tests/test_lrn_pool.py, the C++ one in tests/test_lrn_pool_cpu.py): the paper's constants
as literals, the formula in float64, and activations shaped like a convolution's."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The paper's constants (§3.3), as literals: a changed constant in the model must fail here.
K, N, ALPHA, BETA = 2.0, 5, 1e-4, 0.75


def reference(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> torch.Tensor:
    """max_pool2d(b, 3, 2) of b_c = a_c / (k + α Σ a_i²)^β, i over c's window clipped at
    the group's edges: the formula channel by channel, in float64."""
    x = x.double()
    per_group, half = x.shape[1] // groups, size // 2
    normed = []
    for c in range(x.shape[1]):
        first = c // per_group * per_group
        lo, hi = max(first, c - half), min(first + per_group, c + half + 1)
        normed.append(x[:, c] / (k + alpha * (x[:, lo:hi] ** 2).sum(dim=1)) ** beta)
    return F.max_pool2d(torch.stack(normed, dim=1), 3, 2)


def activations(shape, scale: float, seed: int, dtype=torch.float32, channels_last=False) -> torch.Tensor:
    """ReLU'd Gaussian maps on the CPU, as a convolution hands them over: many exact zeros,
    so windows with tied maxima (0) are common."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).relu_().to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
