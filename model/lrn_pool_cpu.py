"""Response normalisation then overlapping max pooling, fused in one C++ pass each way, on the CPU.

`lrn_max_pool(x, size, alpha, beta, k, groups, float_out)` computes
`max_pool2d(local_response_norm(x), 3, 2)`, differentiable once, with the contract of the
CUDA kernel (model/lrn_pool_kernel.py): NCHW or channels_last read in place, fp32, fp64,
bf16 or fp16 in with arithmetic in fp32 (fp64 for fp64), the output in x's dtype or fp32
with `float_out` (autocast's rule), windows clipped at each group's channel edge, ties to
the first maximum and NaN winning as in max_pool2d. Only x and each window's argmax (int8)
are kept for the backward, which recomputes the denominators it needs.

Why: PyTorch's own operations take about ten passes over conv1's maps forward and twenty
backward; this is one pass each way with the normalised plane in the L1 cache, on torch's
own threads (`at::parallel_for`), faster than max_pool2d alone (docs/design.md, "Model").

The source (lrn_pool_cpu.cpp) is compiled at first use (imagenet_prep/native.py: once per
machine type, 15-40 s). Where it cannot be built `kernel()` warns once and returns None,
and model/alexnet.py runs its PyTorch path. `ALEXPREP_CPU_KERNEL=0` turns it off.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from alexprep.imagenet_prep import native

SOURCE = Path(__file__).with_name("lrn_pool_cpu.cpp")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
POOL, STRIDE = 3, 2


def kernel():
    """torch.ops.alexprep_cpu (compiled and loaded on the first call: imagenet_prep/native.py),
    or None where it cannot be built (one warning) or ALEXPREP_CPU_KERNEL=0."""
    built = native.load("alexprep_lrn_pool", SOURCE, what="the fused CPU normalisation kernel",
                        instead="the slower PyTorch path", python_module=False)
    return torch.ops.alexprep_cpu if built else None


def _channels_last(x: Tensor) -> bool:
    """Whether x is read as channels_last (NCHW when it is both, or neither)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _fmt(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


class _LrnMaxPool(torch.autograd.Function):
    """The two C++ kernels as one differentiable operation (once: no double backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int,
                float_out: bool) -> Tensor:
        ops = kernel()
        cl = _channels_last(x)
        x = x if cl or x.is_contiguous() else x.contiguous()
        n, c, h, w = x.shape
        shape = (n, c, (h - POOL) // STRIDE + 1, (w - POOL) // STRIDE + 1)
        out_dtype = torch.promote_types(x.dtype, torch.float32) if float_out else x.dtype
        out = torch.empty(shape, dtype=out_dtype, memory_format=_fmt(cl))
        idx = torch.empty(shape, dtype=torch.int8, memory_format=_fmt(cl))
        if out.numel():
            ops.lrn_max_pool_forward(x, out, idx, size, alpha, beta, k, groups, cl)
        ctx.save_for_backward(x, idx)
        ctx.constants = (size, alpha, beta, k, groups, cl, out_dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, idx = ctx.saved_tensors
        size, alpha, beta, k, groups, cl, out_dtype = ctx.constants
        # The pooled gradient in the layout of x and the argmaxes: a graph around this
        # may hand it laid out otherwise.
        grad = grad.to(out_dtype).contiguous(memory_format=_fmt(cl))
        gx = torch.empty_like(x, memory_format=_fmt(cl))
        if gx.numel():
            kernel().lrn_max_pool_backward(grad, x, idx, gx, size, alpha, beta, k, groups, cl)
        return gx, None, None, None, None, None, None


def lrn_max_pool(x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int,
                 float_out: bool = False) -> Tensor:
    """max_pool2d(lrn(x), 3, 2) for a CPU tensor (N, C, H, W) of DTYPES, H and W >= 3; needs
    `kernel()` to have returned the operators. `alpha` is used as given (the caller picks α
    or α/n)."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or x.dim() != 4 or min(x.shape[2:]) < POOL:
        raise ValueError(f"the CPU kernel takes (N, C, H >= 3, W >= 3) CPU maps of {DTYPES}, "
                         f"got {tuple(x.shape)} {x.dtype} on {x.device}")
    if size % 2 != 1 or x.shape[1] % groups:
        raise ValueError(f"size must be odd and {x.shape[1]} channels divisible by groups={groups}")
    if kernel() is None:
        raise RuntimeError("the CPU kernel is not available (see the warning above, or ALEXPREP_CPU_KERNEL)")
    return _LrnMaxPool.apply(x, int(size), float(alpha), float(beta), float(k), int(groups), bool(float_out))
