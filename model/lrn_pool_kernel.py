"""Response normalisation then overlapping max pooling, fused in one Triton kernel each way.

`torch.ops.alexprep.lrn_max_pool(x, size, alpha, beta, k, groups, float_out)` computes
`max_pool2d(local_response_norm(x), 3, 2)` and the argmax of each window, reading x once
and never writing the normalised maps; its backward reads x, the pooled gradient and the
argmaxes, and writes the input's gradient, recomputing the few denominators it needs.

Why: in eager PyTorch the two blocks are ~10 elementwise kernels forward and ~20 backward,
each a pass over conv1's maps (149 MB at batch 128 in fp32): on an H200 a large share of the
step, several times what max pooling alone takes (benchmarks/GPU.md, "Results"). What the fused kernels take on a
GPU is measured by benchmarks/gpu_check.py's `lrn` section.

The contract, tested on the CPU through Triton's interpreter (tests/test_lrn_pool_kernel.py):
- x (N, C, H, W), NCHW or channels_last (anything else is made contiguous first); fp32,
  bf16 or fp16 in, arithmetic in fp32; the output in x's dtype, or fp32 with `float_out`
  (autocast's rule for a normalisation, as `alexnet.local_response_norm` applies).
- Channel windows clipped at each group's edge (`groups` towers never mix).
- Windows 3x3 stride 2, no padding; ties go to the first maximum in row-major order, and
  NaN wins, as in PyTorch's max pooling, so gradients land where max_pool2d's would.
- `alpha` is used as given: the caller picks the convention (α or α/n, AlexNetConfig.lrn).

Registered with `torch.library.custom_op` (fake and autograd registrations), so
`torch.compile` sees one operator and does not break its graph. Importing this module
needs Triton; model/alexnet.py uses it for CUDA tensors where it imports; the CPU has its
C++ twin (model/lrn_pool_cpu.py).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

POOL = 3  # the paper's overlapping pooling (§3.4): z = 3, s = 2
STRIDE = 2
# Elements per program: 4 per thread at 4 warps. Untuned: the lrn section of gpu_check
# times the kernels, not alternatives to them. Triton's interpreter (the CPU tests) pays
# per program, not per element: it runs wider blocks, the same code.
BLOCK = 8192 if os.environ.get("TRITON_INTERPRET") == "1" else 512
NUM_WARPS = 4


@triton.jit
def _offsets(BIG: tl.constexpr, BLOCK: tl.constexpr):
    """This program's flat element indices: int32 (cheap division on a GPU) unless the
    tensor has 2^31 elements or more, when element offsets would overflow it."""
    if BIG:
        return tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _position(offs, C, H, W, CL: tl.constexpr):
    """(n, c, h, w) of flat element indices in memory order: channel fastest for
    channels_last, width fastest for NCHW, so that neighbouring lanes read neighbouring
    addresses either way."""
    if CL:
        c = offs % C
        r = offs // C
        w = r % W
        r = r // W
        h = r % H
        n = r // H
    else:
        w = offs % W
        r = offs // W
        h = r % H
        r = r // H
        c = r % C
        n = r // C
    return n, c, h, w


@triton.jit
def _denominator(x_ptr, pix, c, g0, g1, sxc, valid, alpha, k, HALF: tl.constexpr):
    """(a_c, D_c = k + α Σ a_i² over channels c-HALF..c+HALF inside [g0, g1)), in fp32.

    Each neighbour's load is masked by its own channel only, so the same address under the
    same mask recurs across calls and the compiler can share the loads."""
    a = tl.load(x_ptr + pix + c * sxc, mask=valid, other=0.0).to(tl.float32)
    s = a * a
    for j in tl.static_range(1, HALF + 1):
        lo = tl.load(x_ptr + pix + (c - j) * sxc, mask=valid & (c - j >= g0), other=0.0).to(tl.float32)
        hi = tl.load(x_ptr + pix + (c + j) * sxc, mask=valid & (c + j < g1), other=0.0).to(tl.float32)
        s += lo * lo + hi * hi
    return a, k + alpha * s


@triton.jit
def _lrn_pool_fwd(x_ptr, out_ptr, idx_ptr, total, C, HO, WO, CG,
                  sxn, sxc, sxh, sxw, son, soc, soh, sow,
                  alpha, beta, k,
                  HALF: tl.constexpr, CL: tl.constexpr, BIG: tl.constexpr, BLOCK: tl.constexpr):
    """One lane per pooled output: the 3x3 window's normalised values, their max and its
    position (0..8, row-major) as int8."""
    offs = _offsets(BIG, BLOCK)
    valid = offs < total
    n, c, ho, wo = _position(offs, C, HO, WO, CL)
    g0 = (c // CG) * CG
    g1 = g0 + CG
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    where = tl.zeros([BLOCK], tl.int32)
    for dh in tl.static_range(3):
        for dw in tl.static_range(3):
            pix = n * sxn + (ho * 2 + dh) * sxh + (wo * 2 + dw) * sxw
            a, d = _denominator(x_ptr, pix, c, g0, g1, sxc, valid, alpha, k, HALF)
            b = a * tl.exp2(-beta * tl.log2(d))  # a · D^-β
            take = (b > best) | (b != b)  # the first maximum; NaN wins (PyTorch's rule)
            best = tl.where(take, b, best)
            where = tl.where(take, dh * 3 + dw, where)
    o = n * son + c * soc + ho * soh + wo * sow
    tl.store(out_ptr + o, best.to(out_ptr.dtype.element_ty), mask=valid)
    tl.store(idx_ptr + o, where.to(tl.int8), mask=valid)


@triton.jit
def _pooled_grad(g_ptr, idx_ptr, n, c, h, w, HO, WO, son, soc, soh, sow, sgn, sgc, sgh, sgw, valid):
    """∂L/∂b at (n, c, h, w): the pooled gradients of the (at most 4) windows covering the
    position whose argmax it is. Window ho covers h when 2·ho <= h <= 2·ho + 2."""
    total = tl.zeros(h.shape, tl.float32)
    for i in tl.static_range(2):
        ho = h // 2 - i
        dh = h - ho * 2  # 0..3; 3 means outside the window
        ok_h = (ho >= 0) & (ho < HO) & (dh < 3)
        for j in tl.static_range(2):
            wo = w // 2 - j
            dw = w - wo * 2
            ok = valid & ok_h & (wo >= 0) & (wo < WO) & (dw < 3)
            at = tl.load(idx_ptr + n * son + c * soc + ho * soh + wo * sow, mask=ok, other=-1).to(tl.int32)
            mine = ok & (at == dh * 3 + dw)
            total += tl.load(g_ptr + n * sgn + c * sgc + ho * sgh + wo * sgw, mask=mine, other=0.0).to(tl.float32)
    return total


@triton.jit
def _lrn_pool_bwd(x_ptr, g_ptr, idx_ptr, gx_ptr, total, C, H, W, HO, WO, CG,
                  sxn, sxc, sxh, sxw, son, soc, soh, sow, sgn, sgc, sgh, sgw,
                  alpha, beta, k,
                  HALF: tl.constexpr, CL: tl.constexpr, BIG: tl.constexpr, BLOCK: tl.constexpr):
    """One lane per input element j:
    ∂L/∂a_j = gb_j D_j^-β - 2αβ a_j Σ_{i in window(j)} gb_i a_i D_i^(-β-1),
    where gb is ∂L/∂b (the pooled gradient routed to its argmaxes) and window(j) is j's
    clipped channel window (i is in window(j) exactly when j is in window(i))."""
    offs = _offsets(BIG, BLOCK)
    valid = offs < total
    n, c, h, w = _position(offs, C, H, W, CL)
    g0 = (c // CG) * CG
    g1 = g0 + CG
    pix = n * sxn + h * sxh + w * sxw
    own = tl.zeros([BLOCK], tl.float32)
    cross = tl.zeros([BLOCK], tl.float32)
    a_j = tl.zeros([BLOCK], tl.float32)
    for o in tl.static_range(-HALF, HALF + 1):
        i = c + o
        inside = valid & (i >= g0) & (i < g1)
        gb = _pooled_grad(g_ptr, idx_ptr, n, i, h, w, HO, WO, son, soc, soh, sow, sgn, sgc, sgh, sgw, inside)
        a_i, d = _denominator(x_ptr, pix, i, g0, g1, sxc, inside, alpha, k, HALF)
        p = tl.exp2(-beta * tl.log2(d))  # D_i^-β
        cross += gb * a_i * p / d
        if o == 0:
            own = gb * p
            a_j = a_i
    gx = own - 2.0 * alpha * beta * a_j * cross
    tl.store(gx_ptr + pix + c * sxc, gx.to(gx_ptr.dtype.element_ty), mask=valid)


def _channels_last(x: Tensor) -> bool:
    """Whether the kernels read x in channels_last order (NCHW when it is both, or neither)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _layout(x: Tensor) -> tuple[Tensor, bool]:
    """x as NCHW- or channels_last-contiguous (whichever it is, else NCHW), and whether CL."""
    cl = _channels_last(x)
    return (x if cl or x.is_contiguous() else x.contiguous()), cl


def _pooled_size(h: int) -> int:
    return (h - POOL) // STRIDE + 1


def _empty_like_layout(x: Tensor, shape, dtype, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)


def _check(x: Tensor, size: int, groups: int) -> None:
    if x.dim() != 4 or x.shape[2] < POOL or x.shape[3] < POOL:
        raise ValueError(f"lrn_max_pool takes (N, C, H, W) maps of at least 3x3, got {tuple(x.shape)}")
    if size % 2 != 1 or x.shape[1] % groups:
        raise ValueError(f"size must be odd and {x.shape[1]} channels divisible by groups={groups}")
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("lrn_max_pool runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for tests)")


def _grid(total: int):
    return (triton.cdiv(total, BLOCK),)


def _device_of(x: Tensor):
    """Triton launches on the current CUDA device: make it x's (a tower on cuda:1)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("alexprep::lrn_max_pool", mutates_args=())
def lrn_max_pool(x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int,
                 float_out: bool) -> tuple[Tensor, Tensor]:
    """(pooled (N, C, Ho, Wo), argmax positions int8) of max_pool2d(lrn(x), 3, 2)."""
    _check(x, size, groups)
    x, cl = _layout(x)
    n, c, h, w = x.shape
    ho, wo = _pooled_size(h), _pooled_size(w)
    out_dtype = torch.float32 if float_out else x.dtype
    out = _empty_like_layout(x, (n, c, ho, wo), out_dtype, cl)
    idx = _empty_like_layout(x, (n, c, ho, wo), torch.int8, cl)
    total = out.numel()
    if total:
        with _device_of(x):
            _lrn_pool_fwd[_grid(total)](x, out, idx, total, c, ho, wo, c // groups, *x.stride(), *out.stride(),
                                        float(alpha), float(beta), float(k), HALF=size // 2, CL=cl, BIG=x.numel() >= 2**31,
                                        BLOCK=BLOCK,
                                        num_warps=NUM_WARPS)
    return out, idx


@lrn_max_pool.register_fake
def _lrn_max_pool_fake(x, size, alpha, beta, k, groups, float_out):
    cl = _channels_last(x)
    n, c, h, w = x.shape
    shape = (n, c, _pooled_size(h), _pooled_size(w))
    out = _empty_like_layout(x, shape, torch.float32 if float_out else x.dtype, cl)
    return out, _empty_like_layout(x, shape, torch.int8, cl)


@torch.library.custom_op("alexprep::lrn_max_pool_backward", mutates_args=())
def lrn_max_pool_backward(grad: Tensor, x: Tensor, idx: Tensor, size: int, alpha: float, beta: float, k: float,
                          groups: int) -> Tensor:
    """∂L/∂x in x's dtype and layout, from ∂L/∂pooled and the forward's argmax positions."""
    x, cl = _layout(x)
    # The argmaxes are read with their own strides, the pooled gradient with its own (it
    # need not share their layout: a compiled graph lays out its tensors as it likes).
    idx = idx.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    n, c, h, w = x.shape
    gx = _empty_like_layout(x, x.shape, x.dtype, cl)
    total = gx.numel()
    if total:
        with _device_of(x):
            _lrn_pool_bwd[_grid(total)](x, grad, idx, gx, total, c, h, w, idx.shape[2], idx.shape[3], c // groups,
                                        *x.stride(), *idx.stride(), *grad.stride(),
                                        float(alpha), float(beta), float(k), HALF=size // 2, CL=cl, BIG=x.numel() >= 2**31,
                                        BLOCK=BLOCK,
                                        num_warps=NUM_WARPS)
    return gx


@lrn_max_pool_backward.register_fake
def _lrn_max_pool_backward_fake(grad, x, idx, size, alpha, beta, k, groups):
    cl = _channels_last(x)
    return _empty_like_layout(x, x.shape, x.dtype, cl)


def _setup_context(ctx, inputs, output) -> None:
    x, size, alpha, beta, k, groups, _ = inputs
    _, idx = output
    ctx.save_for_backward(x, idx)
    ctx.constants = (size, alpha, beta, k, groups)
    ctx.mark_non_differentiable(idx)


def _backward(ctx, grad, _grad_idx):
    x, idx = ctx.saved_tensors
    gx = torch.ops.alexprep.lrn_max_pool_backward(grad, x, idx, *ctx.constants)
    return gx, None, None, None, None, None, None


lrn_max_pool.register_autograd(_backward, setup_context=_setup_context)
