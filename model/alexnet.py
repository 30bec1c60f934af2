"""The AlexNet of Krizhevsky, Sutskever and Hinton (2012), its two towers on one device or two.

The network of the paper's §3 (Figure 2), as a standalone PyTorch module: it imports
nothing but torch and the standard library, so it can be copied into any project.

    from alexprep.model.alexnet import AlexNet
    model = AlexNet()                                    # 1000 classes, both towers on the CPU
    model = AlexNet(num_classes=10, devices=("cuda:0", "cuda:1"))   # the paper's two GPUs
    logits = model(images.to(model.input_device))        # images: (N, 3, 224, 224)

The two towers. The paper split every layer's kernels between two GPUs: conv2, conv4 and
conv5 (and the response normalisation) see only their own GPU's maps; conv3 and the
fully connected layers see both. Each tower's parameters are always held by their own
module (`model.towers[0]`, `model.towers[1]`), so the state_dict has the same keys in
every placement and a checkpoint loads across placements with plain `load_state_dict`.

- One device, `devices=("cpu",)` or `("cuda:0",)`: the towers run as grouped
  convolutions (groups=2) on the two towers' weights concatenated along the output
  channels; the concatenation is part of the autograd graph, so each tower's weight gets
  exactly its slice of the grouped gradient.
- Two devices, e.g. `("cuda:0", "cuda:1")`, `("cuda:0", "cpu")` or `("cpu", "cpu")`:
  tower t lives on `devices[t]` and activations cross only where the paper's GPUs talk
  (into conv3, fc6, fc7 and fc8). fc8 and the logits live on the first device.

Both placements compute the same function of the same weights, up to the summation
order inside convolution kernels: on the CPU the outputs came out bit-identical in our
tests, and the gradients of the grouped convolutions equal to float32 rounding.

Placement is fixed at construction by `devices`. `model.to(device)` afterwards moves
every parameter (it is plain `nn.Module.to`); the forward pass reads each tower's device
from its parameters, so a moved model still runs (a two-device model moved to one
device keeps running its towers as two separate halves, there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The paper's count for 1000 classes (§3.5: "60 million parameters"); the exact figure
# follows from the layer sizes below and is checked by the tests.
PAPER_PARAMETER_COUNT = 60_965_224

# Local response normalisation (§3.3): "k = 2, n = 5, α = 10^-4, and β = 0.75", chosen by
# the authors on a validation set.
LRN_K = 2.0
LRN_SIZE = 5
LRN_ALPHA = 1e-4
LRN_BETA = 0.75

# conv1 is 11x11 stride 4 on a 224x224 input. Floor arithmetic gives (224 - 11) // 4 + 1
# = 54 outputs, but the paper's maps are 55x55: cuda-convnet counted output positions as
# 1 + ceil((224 - 11) / 4) = 55, the last one reading 3 pixels of zeros past the right
# and bottom edges. We pad exactly those (left, right, top, bottom) = (0, 3, 0, 3).
# (Caffe instead fed 227x227 crops; the pipeline here crops 224 as the paper says.)
CONV1_PAD = (0, 3, 0, 3)

# Overlapping max pooling (§3.4): z = 3, s = 2.
POOL_KERNEL = 3
POOL_STRIDE = 2


@dataclass(frozen=True)
class AlexNetConfig:
    """What can vary in the network; the defaults are the paper's."""

    # ILSVRC's 1000 classes; fc8 and nothing else depends on it.
    num_classes: int = 1000
    # "cuda-convnet": b = a / (k + (α/n) Σ a²)^β, α divided by the window size n, as
    # Krizhevsky's cuda-convnet (which produced the paper's numbers) and PyTorch's
    # LocalResponseNorm both compute it. "paper": the formula as printed in §3.3,
    # b = a / (k + α Σ a²)^β, a normalisation five times stronger.
    lrn: Literal["cuda-convnet", "paper"] = "cuda-convnet"
    # "paper": biases 1 in conv2, conv4, conv5, fc6 and fc7 (§5: positive inputs to the
    # ReLUs speed up early learning), 0 elsewhere. "caffe": 0.1 instead of 1, because
    # Caffe's reproduction saw the loss stay flat at first with 1.
    bias_init: Literal["paper", "caffe"] = "paper"
    # §4.2: dropout 0.5 on fc6 and fc7. PyTorch's inverted dropout scales by 2 at train
    # time where the paper scaled by 0.5 at test time: equal in expectation.
    dropout: float = 0.5
    # §5: every weight drawn from N(0, 0.01²).
    weight_std: float = 0.01

    def __post_init__(self) -> None:
        if not (isinstance(self.num_classes, int) and self.num_classes >= 1):
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.lrn not in ("cuda-convnet", "paper"):
            raise ValueError(f"lrn must be 'cuda-convnet' or 'paper', got {self.lrn!r}")
        if self.bias_init not in ("paper", "caffe"):
            raise ValueError(f"bias_init must be 'paper' or 'caffe', got {self.bias_init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.weight_std > 0.0:
            raise ValueError(f"weight_std must be positive, got {self.weight_std!r}")

    @property
    def lrn_alpha(self) -> float:
        """The α that goes into `local_response_norm`, per the chosen semantics."""
        return LRN_ALPHA / LRN_SIZE if self.lrn == "cuda-convnet" else LRN_ALPHA

    @property
    def hidden_bias(self) -> float:
        """The bias of conv2, conv4, conv5, fc6 and fc7 at initialisation."""
        return 1.0 if self.bias_init == "paper" else 0.1


def _grouped(t: Tensor, groups: int) -> Tensor:
    """(N, C, H, W) -> (N, G, C/G, H, W), a view whatever t's memory layout."""
    return t.unflatten(1, (groups, t.shape[1] // groups))


def _window_offsets(size: int) -> list[tuple[slice, slice]]:
    """(to, frm) slices of the channel axis pairing each channel j = to with a neighbour
    i = frm at offset ±1 .. ±size//2: the centred window without j itself, clipped at
    the ends of the axis. Applied to (N, G, C/G, H, W) views, groups never mix.

    Window sums are then in-place adds on channel-shifted views: no avg_pool3d (slow, and
    it returns NCDHW whatever the input's layout) and no new activation-sized tensor,
    which on the CPU costs its page faults (glibc maps blocks over 32 MiB fresh every
    time) about as much as the arithmetic.
    """
    pairs = []
    for shift in range(1, size // 2 + 1):
        pairs.append((slice(shift, None), slice(None, -shift)))  # i = j - shift
        pairs.append((slice(None, -shift), slice(shift, None)))  # i = j + shift
    return pairs


def _pow_neg(d: Tensor, beta: float) -> Tensor:
    """d^-β in a new tensor; for the paper's β = 0.75 as √√d / d, twice as fast as pow."""
    if beta == 0.75:
        return d.sqrt().sqrt_().div_(d)
    return d.pow(-beta)


def _lrn_denominator(xw: Tensor, size: int, alpha: float, k: float, groups: int) -> Tensor:
    """D = k + α Σ_window a², in a new tensor (in place adds on channel-shifted views)."""
    # k as a 0-d tensor filled where xw is: new_tensor(k) would copy it from the host,
    # which on CUDA waits for the queue to drain (a hidden sync in every step).
    d = torch.addcmul(xw.new_full((), k), xw, xw, value=alpha)  # k + α a_j², in the new tensor's one pass
    d5, x5 = _grouped(d, groups), _grouped(xw, groups)
    for to, frm in _window_offsets(size):
        d5[:, :, to].addcmul_(x5[:, :, frm], x5[:, :, frm], value=alpha)  # D = k + α Σ_i a_i²
    return d


def _lrn_input_grad(grad: Tensor, xw: Tensor, d: Tensor, p: Tensor, size: int, alpha: float, beta: float,
                    groups: int, out: Tensor | None = None) -> Tensor:
    """∂L/∂a_j = g_j D_j^-β - 2αβ a_j Σ_{i: j in window(i)} g_i b_i / D_i (into `out` if given).

    window(i) ∋ j exactly when window(j) ∋ i (a centred window), so the second sum is the
    same window sum as the forward's, written as in-place adds."""
    grad_x = torch.mul(grad, p, out=out) if out is not None else grad * p  # g D^-β
    gb_over_d = (grad_x * xw).div_(d)  # g_i b_i / D_i
    g5, t5, x5 = (_grouped(t, groups) for t in (grad_x, gb_over_d, xw))
    scale = -2.0 * alpha * beta
    g5.addcmul_(t5, x5, value=scale)
    for to, frm in _window_offsets(size):
        g5[:, :, to].addcmul_(t5[:, :, frm], x5[:, :, to], value=scale)  # -2αβ a_j Σ_i t_i
    return grad_x


def _widened(x: Tensor) -> Tensor:
    """float64 stays float64; bf16/fp16 are widened once (mixed-dtype ops are slow)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _LocalResponseNorm(torch.autograd.Function):
    """b = a · D^-β with D = k + α Σ_window a², and its gradient written out.

    The gradient in closed form, as cuda-convnet computed it (`_lrn_input_grad`). Every
    sum is an in-place add into tensors that must be allocated anyway: five
    activation-sized allocations per forward + backward, where autograd of the
    expression makes about twice as many. The tests check it against autograd of the
    formula and against gradcheck.

    D and D^-β are computed in float32 at least (a bf16 Σa², 8-bit mantissa, is off by up
    to ~0.4%); the output and the input's gradient come back in the input's dtype.
    Every op is elementwise, on views or in place, so the input's memory layout (NCHW
    or channels_last) is kept.
    """

    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> Tensor:
        xw = _widened(x)
        d = _lrn_denominator(xw, size, alpha, k, groups)
        p = _pow_neg(d, beta)  # D^-β
        ctx.save_for_backward(xw, d, p)
        ctx.constants = (size, alpha, beta, groups, x.dtype)
        return (xw * p).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        xw, d, p = ctx.saved_tensors
        size, alpha, beta, groups, dtype = ctx.constants
        return _lrn_input_grad(grad, xw, d, p, size, alpha, beta, groups).to(dtype), None, None, None, None, None


class _NormPool(torch.autograd.Function):
    """Response normalisation, then overlapping max pooling, in slices of the batch.

    What training runs (`AlexNet._lrn_pool`) where no fused kernel does (`fused=False`, or
    a CPU where the C++ kernel cannot be built). Only the input and the pooling's indices are
    kept for backward, which recomputes D and D^-β slice by slice: a slice's temporaries
    (`chunk` images) are small enough for the allocator to reuse from step to step,
    where batch-sized ones (37 MB for conv1's maps at batch 32) are fresh pages every
    time on the CPU, faulted in at about the cost of the arithmetic. Per element the
    same operations as `local_response_norm` then `max_pool2d`, so the same numbers.
    """

    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int, chunk: int) -> Tensor:
        xw = _widened(x)
        pooled, indices = [], []
        for xc in xw.split(chunk):
            b = xc * _pow_neg(_lrn_denominator(xc, size, alpha, k, groups), beta)
            o, i = F.max_pool2d(b, POOL_KERNEL, POOL_STRIDE, return_indices=True)
            pooled.append(o)
            indices.append(i)
        ctx.save_for_backward(xw, torch.cat(indices))
        ctx.constants = (size, alpha, beta, k, groups, chunk, x.dtype)
        return torch.cat(pooled).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        xw, indices = ctx.saved_tensors
        size, alpha, beta, k, groups, chunk, dtype = ctx.constants
        grad_x = torch.empty_like(xw)
        # The pooled gradient in the layout of the input and the indices: a compiled graph
        # around this Function may hand it a gradient laid out otherwise, and CUDA's
        # max_pool2d_with_indices_backward is not to be trusted with mixed layouts (a
        # suspect of the illegal memory access in benchmarks/GPU.md).
        fmt = _memory_format(xw)
        grad, indices = grad.to(xw.dtype).contiguous(memory_format=fmt), indices.contiguous(memory_format=fmt)
        for start in range(0, xw.shape[0], chunk):
            rows = slice(start, start + chunk)
            xc = xw[rows]
            gb = torch.ops.aten.max_pool2d_with_indices_backward(
                grad[rows], xc, [POOL_KERNEL] * 2, [POOL_STRIDE] * 2, [0, 0], [1, 1], False, indices[rows])
            d = _lrn_denominator(xc, size, alpha, k, groups)
            _lrn_input_grad(gb, xc, d, _pow_neg(d, beta), size, alpha, beta, groups, out=grad_x[rows])
        return grad_x.to(dtype), None, None, None, None, None, None


def _memory_format(t: Tensor) -> torch.memory_format:
    """channels_last if t is laid out so (and not also NCHW-contiguous), else NCHW."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def local_response_norm(
    x: Tensor,
    *,
    size: int = LRN_SIZE,
    alpha: float = LRN_ALPHA,
    beta: float = LRN_BETA,
    k: float = LRN_K,
    groups: int = 1,
) -> Tensor:
    """Response normalisation across channels, the paper's formula (§3.3) literally.

        b[c] = a[c] / (k + alpha * sum(a[j]² for j in c-size//2 .. c+size//2))^beta

    with the sum clipped at the first and last channel of the group. `groups` splits the
    channels into equal consecutive groups normalised independently: the towers'
    maps never enter each other's sums. For cuda-convnet's (and PyTorch's
    `nn.LocalResponseNorm`'s) semantics pass `alpha / size`.

    x: (N, C, H, W) with C divisible by `groups`; returns the same shape, dtype and memory
    layout, except under autocast, where it computes and returns float32 as autocast's
    own float32 ops do. Differentiable once (no double backward).
    """
    x = _checked_lrn_input(x, size, groups)
    if torch.compiler.is_compiling():
        return _lrn_formula(x, size, alpha, beta, k, groups)
    return _LocalResponseNorm.apply(x, size, alpha, beta, k, groups)


def _checked_lrn_input(x: Tensor, size: int, groups: int) -> Tensor:
    if size % 2 != 1:
        raise ValueError(f"size must be odd (a window centred on each channel), got {size}")
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    if torch.is_autocast_enabled(x.device.type):
        # Like autocast's float32 ops (and the old pow-based code): a bf16 activation is
        # normalised in float32, and the float32 result keeps its precision through the
        # max pool; the next convolution casts it back down.
        x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x


def _lrn_formula(x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> Tensor:
    """The normalisation as plain out-of-place tensor operations, for torch.compile.

    The autograd Functions above save memory and launches in eager mode with in-place adds
    on channel-shifted views; compiled code gets no gain from them (inductor fuses the
    whole expression, forward and backward, into a few kernels), and their in-place
    writes into views and `out=` slices are what compilers handle least well. Here the
    window sum is `size` slices of the channel-padded squares, which autograd
    differentiates and inductor fuses in any memory layout."""
    xw = _widened(x)
    squares = _grouped(xw * xw, groups)  # (N, G, C/G, H, W)
    half, per_group = size // 2, squares.shape[2]
    padded = F.pad(squares, (0, 0, 0, 0, half, half))  # zeros past each group's first and last channel
    window = sum(padded[:, :, i:i + per_group] for i in range(size))
    d = (window * alpha + k).flatten(1, 2)
    return (xw * d.pow(-beta)).to(x.dtype)


# On the CPU, _NormPool works in slices of about this many bytes of activations: below
# glibc's largest mmap threshold (32 MiB), so freed slices are reused, not unmapped.
CPU_SLICE_BYTES = 8 << 20


# torch.ops.alexprep.lrn_max_pool (model/lrn_pool_kernel.py) once imported, False where
# Triton does not import, None until first asked for.
_FUSED = None


def fused_lrn_max_pool():
    """The fused Triton operator where Triton imports, else None (the first call imports it).

    A relative import: this file copied alone into another project has no kernel module
    beside it, and runs its own PyTorch path everywhere."""
    global _FUSED
    if _FUSED is None:
        try:
            from . import lrn_pool_kernel  # noqa: F401  (registers the operator)
            _FUSED = torch.ops.alexprep.lrn_max_pool
        except ImportError:
            _FUSED = False
    return _FUSED or None


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernel computes in fp32
CPU_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # fp32 arithmetic (fp64 for fp64)


def cpu_lrn_max_pool():
    """The fused C++ kernel's entry point (model/lrn_pool_cpu.py) where it builds, else None.

    Compiled at first use; where there is no compiler it warns once and the PyTorch path
    runs. A relative import, as for the Triton kernel: this file copied alone runs its own
    path."""
    try:
        from . import lrn_pool_cpu
    except ImportError:
        return None
    return lrn_pool_cpu.lrn_max_pool if lrn_pool_cpu.kernel() is not None else None


def local_response_norm_max_pool(x: Tensor, *, size: int = LRN_SIZE, alpha: float = LRN_ALPHA,
                                 beta: float = LRN_BETA, k: float = LRN_K, groups: int = 1,
                                 chunk: int | None = None, fused: bool | None = None) -> Tensor:
    """`max_pool2d(local_response_norm(x, ...), 3, 2)` without keeping the normalised maps.

    `fused`: None runs a fused kernel (one pass each way) where one runs: the Triton kernel
    for CUDA tensors of FUSED_DTYPES where Triton imports, the C++ kernel for CPU tensors
    (model/lrn_pool_cpu.py; compiled at first use, and where it cannot be, the PyTorch
    path after one warning), PyTorch operations otherwise. True requires the Triton kernel
    (on the CPU: Triton's interpreter, for tests); False runs PyTorch operations. Under
    torch.compile the Triton kernel is one opaque operator (once imported: `AlexNet`
    imports it when placed on a GPU); elsewhere compiled code runs the formula.
    `chunk`: the PyTorch path's images per slice; by default the whole batch on a GPU
    (whose caching allocator reuses memory anyway) and about CPU_SLICE_BYTES of maps per
    slice on the CPU."""
    if fused is None:
        fused = (x.is_cuda and x.dtype in FUSED_DTYPES  # on the CPU, Triton is not even imported
                 and bool(_FUSED if torch.compiler.is_compiling() else fused_lrn_max_pool()))
        if not fused and (out := _cpu_kernel_call(x, size, alpha, beta, k, groups)) is not None:
            return out
    if fused:
        return _fused_call(x, size, alpha, beta, k, groups)
    x = _checked_lrn_input(x, size, groups)
    if torch.compiler.is_compiling():
        return F.max_pool2d(_lrn_formula(x, size, alpha, beta, k, groups), POOL_KERNEL, POOL_STRIDE)
    if chunk is None:
        per_image = x[0].numel() * max(x.element_size(), 4)
        chunk = x.shape[0] if x.device.type != "cpu" else max(1, CPU_SLICE_BYTES // max(per_image, 1))
    return _NormPool.apply(x, size, alpha, beta, k, groups, chunk)


def _cpu_kernel_call(x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> Tensor | None:
    """The C++ kernel's result for a CPU tensor it takes, None where the PyTorch path must run
    (another device or dtype, under torch.compile, maps under 3x3, no kernel built)."""
    if (x.device.type != "cpu" or torch.compiler.is_compiling() or x.dtype not in CPU_FUSED_DTYPES
            or x.dim() != 4 or min(x.shape[2:]) < POOL_KERNEL):
        return None
    cpu_kernel = cpu_lrn_max_pool()
    if cpu_kernel is None:
        return None
    if size % 2 != 1 or x.shape[1] % groups:
        _checked_lrn_input(x, size, groups)  # raises its own message
    # Under autocast the output is float32, as the PyTorch path returns it; bf16 is read as is.
    return cpu_kernel(x, size, alpha, beta, k, groups, float_out=torch.is_autocast_enabled("cpu"))


def _fused_call(x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> Tensor:
    op = fused_lrn_max_pool()
    if op is None or x.dtype not in FUSED_DTYPES:
        raise ValueError(f"fused=True needs Triton (pip install triton) and a {FUSED_DTYPES} input, "
                         f"got {x.dtype}")
    if size % 2 != 1 or x.shape[1] % groups:
        _checked_lrn_input(x, size, groups)  # raises its own message
    # Under autocast the output is float32, as autocast's own normalisations return (and
    # as _checked_lrn_input makes the PyTorch path do); the kernel reads bf16 directly.
    float_out = torch.is_autocast_enabled(x.device.type)
    return op(x, size, alpha, beta, k, groups, float_out)[0]


class Tower(nn.Module):
    """One GPU's half of the network: half the kernels of every layer but fc8.

    conv3, fc6 and fc7 take both towers' maps as input (their `in_channels` /
    `in_features` count both); conv2, conv4 and conv5 take only this tower's.
    """

    def __init__(self) -> None:
        super().__init__()
        # conv1's asymmetric padding (CONV1_PAD) is applied to the input, not here.
        self.conv1 = nn.Conv2d(3, 48, kernel_size=11, stride=4)
        self.conv2 = nn.Conv2d(48, 128, kernel_size=5, padding=2)
        self.conv3 = nn.Conv2d(2 * 128, 192, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(192, 192, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(192, 128, kernel_size=3, padding=1)
        self.fc6 = nn.Linear(2 * 128 * 6 * 6, 2048)
        self.fc7 = nn.Linear(2 * 2048, 2048)


def _gather(parts: Sequence[Tensor], device: torch.device) -> Tensor:
    """Both towers' maps, concatenated along channels, on `device` (where GPUs talk)."""
    if len(parts) == 1:
        return parts[0].to(device)
    return torch.cat([p.to(device) for p in parts], dim=1)


class AlexNet(nn.Module):
    """The paper's network: 5 convolutional and 3 fully connected layers in two towers.

    Args:
        config: an `AlexNetConfig`, or just the number of classes; None for the paper's.
        devices: one device (both towers on it, as grouped convolutions) or two (tower t
            on `devices[t]`; the same device twice is allowed).
        fused_lrn: the normalisation + pooling blocks as a fused kernel
            (`local_response_norm_max_pool`'s `fused`): None where one can run (Triton's
            on CUDA, the C++ one on the CPU where it builds), False never (PyTorch
            operations), True the Triton kernel always (the CPU runs it only in Triton's
            interpreter). Not part of the config: all compute the same function.
        **overrides: `AlexNetConfig` fields replacing those of `config`, so that
            `AlexNet(num_classes=10, devices=("cpu", "cpu"))` reads naturally.

    Input (N, 3, 224, 224), mean-subtracted; output (N, num_classes) logits on the
    first device. Weights are drawn on the CPU from torch's global generator before
    being moved, so a given seed gives the same network in every placement.
    """

    def __init__(
        self,
        config: AlexNetConfig | int | None = None,
        *,
        devices: Sequence[str | torch.device] = ("cpu",),
        fused_lrn: bool | None = None,
        **overrides,
    ) -> None:
        super().__init__()
        self.fused_lrn = fused_lrn
        if config is None:
            config = AlexNetConfig()
        elif isinstance(config, int):
            config = AlexNetConfig(num_classes=config)
        self.config = dataclasses.replace(config, **overrides)
        if isinstance(devices, (str, torch.device)):
            devices = (devices,)
        if len(devices) not in (1, 2):
            raise ValueError(f"devices must name one device or two, got {devices!r}")
        placed = tuple(torch.device(d) for d in devices)
        # Which code path runs; fixed here, whatever `.to()` does later.
        self._grouped = len(placed) == 1

        self.towers = nn.ModuleList([Tower(), Tower()])
        self.fc8 = nn.Linear(2 * 2048, self.config.num_classes)
        self.reset_parameters()

        tower_devices = placed * 2 if self._grouped else placed
        for tower, device in zip(self.towers, tower_devices):
            tower.to(device)
        self.fc8.to(placed[0])
        if fused_lrn is not False and any(d.type == "cuda" for d in placed):
            fused_lrn_max_pool()  # imported now, so that a compiled forward finds it

    def reset_parameters(self) -> None:
        """The paper's initialisation (§5), or Caffe's biases if the config says so."""
        cfg = self.config
        for tower in self.towers:
            for name, layer in tower.named_children():
                nn.init.normal_(layer.weight, mean=0.0, std=cfg.weight_std)
                hidden = name in ("conv2", "conv4", "conv5", "fc6", "fc7")
                nn.init.constant_(layer.bias, cfg.hidden_bias if hidden else 0.0)
        nn.init.normal_(self.fc8.weight, mean=0.0, std=cfg.weight_std)
        nn.init.zeros_(self.fc8.bias)

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Where the towers are: one device (grouped) or one per tower (split)."""
        if self._grouped:
            return (self.fc8.weight.device,)
        return tuple(t.conv1.weight.device for t in self.towers)

    @property
    def input_device(self) -> torch.device:
        """Where inputs should be (tower 0's device); the logits come back there too."""
        return self.fc8.weight.device

    def num_parameters(self) -> int:
        """Learnable parameters; `PAPER_PARAMETER_COUNT` for 1000 classes."""
        return sum(p.numel() for p in self.parameters())

    # -- the layers, written once for both placements ------------------------------------
    # Activations travel as a list: [both towers' maps] in the grouped placement, or
    # [tower 0's, tower 1's] (each on its tower's device) in the split one.

    def _conv(self, name: str, hs: list[Tensor], *, mixes: bool) -> list[Tensor]:
        """Convolution `name` of both towers, then ReLU; `mixes` if it sees both towers."""
        convs = [getattr(t, name) for t in self.towers]
        if self._grouped:
            # Both towers' kernels as one convolution; groups=2 keeps each tower's
            # kernels on its own input maps.
            weight = torch.cat([c.weight for c in convs])
            bias = torch.cat([c.bias for c in convs])
            out = F.conv2d(
                hs[0], weight, bias, stride=convs[0].stride, padding=convs[0].padding,
                groups=1 if mixes else 2,
            )
            return [F.relu(out, inplace=True)]  # in place, as torchvision: one activation-sized buffer fewer
        ins = [_gather(hs, c.weight.device) for c in convs] if mixes else hs
        return [F.relu(c(h), inplace=True) for c, h in zip(convs, ins)]

    def _fc(self, name: str, hs: list[Tensor], *, dropout: bool) -> list[Tensor]:
        """Hidden fully connected layer `name` of both towers: ReLU, then dropout."""
        fcs = [getattr(t, name) for t in self.towers]
        if self._grouped:
            # Two half-width products rather than one on concatenated weights: the same
            # arithmetic, without copying fc6's 38M weights at every step.
            h = hs[0].flatten(1)
            outs = [torch.cat([fc(h) for fc in fcs], dim=1)]
        else:
            outs = [fc(_gather(hs, fc.weight.device).flatten(1)) for fc in fcs]
        return [F.dropout(F.relu(o, inplace=True), self.config.dropout, training=dropout) for o in outs]

    def _lrn_pool(self, hs: list[Tensor], keep_normed: bool) -> tuple[list[Tensor] | None, list[Tensor]]:
        """Response normalisation within each tower, then overlapping max pooling; the
        normalised maps themselves only when asked for (`stages`). The pooled maps always
        come from the same (fused) function, so that `stages()` and `forward` give the
        same bits: a fused kernel's sums may round otherwise than norm-then-pool's."""
        groups = 2 // len(hs)  # both towers in one tensor: normalise each separately
        alpha = self.config.lrn_alpha
        pooled = [local_response_norm_max_pool(h, alpha=alpha, groups=groups, fused=self.fused_lrn) for h in hs]
        if not keep_normed:
            return None, pooled
        return [local_response_norm(h, alpha=alpha, groups=groups) for h in hs], pooled

    def _run(self, x: Tensor, *, dropout: bool, stages: dict | None = None) -> list[Tensor]:
        """Everything up to fc7 (post-ReLU, after dropout if `dropout`), as a list."""

        def keep(name: str, hs: list[Tensor]) -> list[Tensor]:
            if stages is not None:
                stages[name] = _gather(hs, self.input_device)
            return hs

        hs = [F.pad(x, CONV1_PAD)]  # (N, 3, 227, 227)
        # conv1 "mixes" in that both towers see all three colour channels of the image.
        hs = keep("conv1", self._conv("conv1", hs, mixes=True))  # (N, 96, 55, 55)
        normed, hs = self._lrn_pool(hs, stages is not None)
        keep("norm1", normed)  # (N, 96, 55, 55)
        keep("pool1", hs)  # (N, 96, 27, 27)
        hs = keep("conv2", self._conv("conv2", hs, mixes=False))  # (N, 256, 27, 27)
        normed, hs = self._lrn_pool(hs, stages is not None)
        keep("norm2", normed)  # (N, 256, 27, 27)
        keep("pool2", hs)  # (N, 256, 13, 13)
        hs = keep("conv3", self._conv("conv3", hs, mixes=True))  # (N, 384, 13, 13)
        hs = keep("conv4", self._conv("conv4", hs, mixes=False))  # (N, 384, 13, 13)
        hs = keep("conv5", self._conv("conv5", hs, mixes=False))  # (N, 256, 13, 13)
        hs = keep("pool5", [F.max_pool2d(h, POOL_KERNEL, POOL_STRIDE) for h in hs])  # (N, 256, 6, 6)
        hs = keep("fc6", self._fc("fc6", hs, dropout=dropout))  # (N, 4096)
        return keep("fc7", self._fc("fc7", hs, dropout=dropout))  # (N, 4096)

    # -- public entry points -------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) on the first device, for images (N, 3, 224, 224)."""
        hs = self._run(x, dropout=self.training)
        return self.fc8(_gather(hs, self.fc8.weight.device))  # (N, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """fc7 activations (N, 4096), post-ReLU and without dropout, on the first device.

        The paper's §6.1 "feature activations induced by an image at the last, 4096-
        dimensional hidden layer", whose Euclidean distances find similar images. Dropout
        is off whatever the mode; gradients flow (wrap in `torch.no_grad()` to save
        memory). Channels 0-2047 are tower 0's, 2048-4095 tower 1's.
        """
        return _gather(self._run(x, dropout=False), self.input_device)

    def stages(self, x: Tensor) -> dict[str, Tensor]:
        """Every stage's output for images (N, 3, 224, 224), on the first device.

        Keys in order: conv1 (N, 96, 55, 55), norm1, pool1 (N, 96, 27, 27), conv2
        (N, 256, 27, 27), norm2, pool2 (N, 256, 13, 13), conv3 (N, 384, 13, 13), conv4,
        conv5 (N, 256, 13, 13), pool5 (N, 256, 6, 6), fc6 (N, 4096), fc7 (N, 4096), fc8
        (N, num_classes). Convolutions and fully connected layers are after their ReLU.
        Tower 0 owns the first half of every stage's channels, tower 1 the second half.
        Dropout follows the module's mode, as in `forward`.
        """
        out: dict[str, Tensor] = {}
        hs = self._run(x, dropout=self.training, stages=out)
        out["fc8"] = self.fc8(_gather(hs, self.fc8.weight.device))
        return out

    def conv1_kernels(self) -> Tensor:
        """conv1's weights by tower, (2, 48, 3, 11, 11), detached, on the CPU.

        The paper's Figure 3: tower 0 (GPU 1) learned mostly colour-agnostic kernels,
        tower 1 (GPU 2) mostly colour-specific ones.
        """
        return torch.stack([t.conv1.weight.detach().cpu() for t in self.towers])

    def extra_repr(self) -> str:
        placement = "grouped" if self._grouped else "split"
        devices = ", ".join(str(d) for d in self.devices)
        return f"{self.config}, placement={placement}, devices=({devices})"
