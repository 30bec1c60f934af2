"""Tests for alexprep.model.alexnet: the paper's network in both placements, on the CPU.

The two-device placement is exercised as ("cpu", "cpu"): the same code path as two GPUs,
with activations crossing between towers at conv3, fc6, fc7 and fc8. A GPU test runs
it for real as ("cuda:0", "cpu") where CUDA is present.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

# The public API under test, and nothing else: the LRN's constants are written below, not
# imported, so that a changed constant in the model fails here.
from alexprep.model.alexnet import AlexNet, AlexNetConfig, local_response_norm, local_response_norm_max_pool

# §3.3: "k = 2, n = 5, α = 10^-4, and β = 0.75".
LRN_K = 2.0
LRN_SIZE = 5
LRN_ALPHA = 1e-4
LRN_BETA = 0.75
# The α each convention passes to the formula: cuda-convnet's (and PyTorch's) divides the
# paper's by the window size n = 5.
ALPHA_CUDA_CONVNET = 2e-5
ALPHA_PAPER = 1e-4

ONE = ("cpu",)
TWO = ("cpu", "cpu")
PLACEMENTS = pytest.mark.parametrize("devices", [ONE, TWO], ids=["one-device", "two-device"])
SMALL = 10  # classes, where the count does not matter


def make(devices, seed: int = 0, **overrides) -> AlexNet:
    torch.manual_seed(seed)
    return AlexNet(num_classes=overrides.pop("num_classes", SMALL), devices=devices, **overrides)


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g)


def halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tower 0's and tower 1's channels of a stage output."""
    return t.chunk(2, dim=1)


def lrn_direct(a: torch.Tensor, alpha: float, n: int = LRN_SIZE, k: float = LRN_K,
               beta: float = LRN_BETA) -> torch.Tensor:
    """§3.3's formula, one channel at a time: the sum runs over max(0, i-n/2)..min(C-1, i+n/2)."""
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        total = (a[:, lo : hi + 1] ** 2).sum(dim=1)
        out[:, i] = a[:, i] / (k + alpha * total) ** beta
    return out


@pytest.fixture(scope="module")
def paper_model() -> AlexNet:
    """The 1000-class network with the paper's defaults (built once: 61M parameters)."""
    torch.manual_seed(0)
    return AlexNet()


# -- architecture ---------------------------------------------------------------------


def test_parameter_count_is_the_papers(paper_model):
    assert sum(p.numel() for p in paper_model.parameters()) == 60_965_224
    assert paper_model.num_parameters() == 60_965_224


def test_parameter_count_same_in_two_device_placement():
    torch.manual_seed(0)
    assert AlexNet(devices=TWO).num_parameters() == 60_965_224


@PLACEMENTS
def test_shape_after_every_stage(devices):
    model = make(devices).eval()
    with torch.no_grad():
        stages = model.stages(images(2))
    expected = {
        "conv1": (2, 96, 55, 55),
        "norm1": (2, 96, 55, 55),
        "pool1": (2, 96, 27, 27),
        "conv2": (2, 256, 27, 27),
        "norm2": (2, 256, 27, 27),
        "pool2": (2, 256, 13, 13),
        "conv3": (2, 384, 13, 13),
        "conv4": (2, 384, 13, 13),
        "conv5": (2, 256, 13, 13),
        "pool5": (2, 256, 6, 6),
        "fc6": (2, 4096),
        "fc7": (2, 4096),
        "fc8": (2, SMALL),
    }
    assert {k: tuple(v.shape) for k, v in stages.items()} == expected
    assert list(stages) == list(expected)  # in network order
    with torch.no_grad():
        torch.testing.assert_close(model(images(2)), stages["fc8"], rtol=0, atol=0)


def test_conv1_pads_bottom_and_right_only():
    """The last row and column of conv1 read 3 pixels of zero padding past the image."""
    model = make(ONE).eval()
    x = images(1)
    with torch.no_grad():
        conv1 = model.stages(x)["conv1"]
        w = torch.cat([t.conv1.weight for t in model.towers])
        b = torch.cat([t.conv1.bias for t in model.towers])
        # Top-left output: the image's first 11x11 window, no padding on that side.
        torch.testing.assert_close(conv1[0, :, 0, 0], F.relu((x[0, :, :11, :11] * w).sum((1, 2, 3)) + b))
        # Bottom-right output: rows/columns 216..223 of the image, then 3 zeros.
        window = F.pad(x[0, :, 216:, 216:], (0, 3, 0, 3))
        torch.testing.assert_close(conv1[0, :, 54, 54], F.relu((window * w).sum((1, 2, 3)) + b))


# -- local response normalisation -----------------------------------------------------


@pytest.mark.parametrize("alpha", [ALPHA_PAPER, ALPHA_CUDA_CONVNET, 0.3])
def test_lrn_matches_the_formula(alpha):
    # Large activations so that the normalisation is far from the identity.
    a = torch.randn(2, 11, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 30
    torch.testing.assert_close(local_response_norm(a, alpha=alpha), lrn_direct(a, alpha))


def test_lrn_defaults_are_the_papers_constants():
    """Called without constants, both public functions compute §3.3's formula with k = 2,
    n = 5, α = 1e-4 and β = 0.75, in float64 to 1e-12; the input is large enough
    (α Σa² ≈ 5 beside k = 2) that any other value of any one constant is told apart."""
    a = torch.randn(2, 12, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 100
    want = lrn_direct(a, alpha=1e-4, n=5, k=2.0, beta=0.75)
    torch.testing.assert_close(local_response_norm(a), want, rtol=1e-12, atol=0)
    for fused in (None, False):  # the C++ kernel (in float64 arithmetic) and the PyTorch path
        torch.testing.assert_close(local_response_norm_max_pool(a, fused=fused), F.max_pool2d(want, 3, 2),
                                   rtol=1e-12, atol=0)
    for wrong in ({"k": 1.0}, {"n": 3}, {"n": 7}, {"alpha": 2e-5}, {"beta": 0.5}):
        other = lrn_direct(a, **{"alpha": 1e-4, "n": 5, "k": 2.0, "beta": 0.75, **wrong})
        assert not torch.allclose(other, want, rtol=1e-3, atol=0), wrong


@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_gradient_matches_autograd_of_the_formula(groups):
    """The closed-form backward against autograd through the per-channel formula."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(2, 12, 3, 4, generator=g, dtype=torch.float64) * 30).requires_grad_()
    upstream = torch.randn(2, 12, 3, 4, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad(local_response_norm(a, alpha=0.3, groups=groups), a, upstream)
    want_out = torch.cat([lrn_direct(h, 0.3) for h in a.chunk(groups, dim=1)], dim=1)
    (want,) = torch.autograd.grad(want_out, a, upstream)
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda t: local_response_norm(t, alpha=0.3, groups=groups), (a[:1, :, :2, :2].detach().requires_grad_(),)
    )


def test_lrn_groups_normalise_each_group_alone():
    a = torch.randn(2, 12, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 30
    got = local_response_norm(a, alpha=0.3, groups=2)
    want = torch.cat([lrn_direct(h, 0.3) for h in halves(a)], dim=1)
    torch.testing.assert_close(got, want)
    # Not the same as normalising across the boundary: the test can tell them apart.
    assert not torch.allclose(got, lrn_direct(a, 0.3))


def test_lrn_cuda_convnet_semantics_equal_pytorch_local_response_norm():
    a = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(0)) * 30
    torch_lrn = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
    torch.testing.assert_close(local_response_norm(a, alpha=ALPHA_CUDA_CONVNET), torch_lrn(a))


def lrn_direct_grouped(a: torch.Tensor, alpha: float, groups: int, n: int = LRN_SIZE) -> torch.Tensor:
    """lrn_direct on each group of channels alone, concatenated back."""
    return torch.cat([lrn_direct(h, alpha, n) for h in a.chunk(groups, dim=1)], dim=1)


def lrn_window_sum_of_squares(a: torch.Tensor, n: int = LRN_SIZE) -> torch.Tensor:
    """Σ a[j]² over the clipped window of each channel (for other β than lrn_direct's)."""
    sq = a.square()
    return torch.stack([sq[:, max(0, i - n // 2) : i + n // 2 + 1].sum(1) for i in range(a.shape[1])], dim=1)


@pytest.mark.parametrize("size, channels, groups", [(1, 6, 2), (3, 8, 2), (7, 12, 2), (7, 4, 2), (9, 12, 1)])
def test_lrn_other_window_sizes_and_windows_wider_than_a_group(size, channels, groups):
    """The window is clipped at each group's ends, also where it spans the whole group."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(2, channels, 3, 4, generator=g, dtype=torch.float64) * 30).requires_grad_()
    upstream = torch.randn(a.shape, generator=g, dtype=torch.float64)
    got = local_response_norm(a, size=size, alpha=0.3, groups=groups)
    want = lrn_direct_grouped(a, 0.3, groups, n=size)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, a, upstream), torch.autograd.grad(want, a, upstream))


@pytest.mark.parametrize("beta", [LRN_BETA, 0.5, 1.3])
def test_lrn_float32_is_the_formula_within_1e_5(beta):
    """In float32, on conv1-like activations (ReLU'd, some large), values and gradients
    are the float64 formula's to 1e-5 relative, for the paper's β (computed without
    pow) and others."""
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(4, 24, 7, 7, generator=g)) * torch.logspace(-1, 3, 7).view(1, 1, 1, 7)
    upstream = torch.randn(a.shape, generator=g)

    def run(t):
        t = t.detach().requires_grad_()
        out = local_response_norm(t, alpha=LRN_ALPHA, beta=beta, groups=2)
        return out, torch.autograd.grad(out, t, upstream.to(t.dtype))[0]

    got, got_grad = run(a)
    want, want_grad = run(a.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())
    # And the float64 path is the formula itself.
    torch.testing.assert_close(want, torch.cat([
        h / (LRN_K + LRN_ALPHA * lrn_window_sum_of_squares(h)) ** beta for h in a.double().chunk(2, dim=1)
    ], dim=1))


def test_lrn_under_bf16_autocast_normalises_in_float32():
    """Under autocast a conv's bf16 output is normalised with a float32 D = k + αΣa²:
    the result is the float32 formula of those bf16 values (the old code rounded each a²
    to bf16 first and was off by ~1e-3)."""
    g = torch.Generator().manual_seed(0)
    a = (torch.relu(torch.randn(2, 32, 6, 6, generator=g)) * 100).bfloat16()
    upstream = torch.randn(a.shape, generator=g)
    a_exact = a.double().requires_grad_()  # the same bf16 values, exactly
    want = lrn_direct_grouped(a_exact, LRN_ALPHA, groups=2)
    (want_grad,) = torch.autograd.grad(want, a_exact, upstream.double())

    a = a.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = local_response_norm(a, alpha=LRN_ALPHA, groups=2)
    assert got.dtype == torch.float32  # as autocast's float32 ops return
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    (got_grad,) = torch.autograd.grad(got, a, upstream)
    assert got_grad.dtype == torch.bfloat16
    # The gradient is rounded once, to bf16, at the end: within bf16's half-ulp.
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=2**-8, atol=1e-6)


def test_lrn_bf16_input_without_autocast_stays_bf16():
    a = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0)).mul(30).bfloat16()
    got = local_response_norm(a, alpha=0.3)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), lrn_direct(a.double(), 0.3), rtol=2**-8, atol=0)


def test_lrn_keeps_channels_last():
    """A channels_last input gives a channels_last output and gradient, equal to NCHW's,
    and nothing on the way is converted: every tensor kept for the backward is in the
    input's layout (the old avg_pool3d code kept its D in NCHW)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, 5, 5, generator=g) * 30
    upstream = torch.randn(a.shape, generator=g)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        t = a.contiguous(memory_format=fmt).requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            out = local_response_norm(t, alpha=0.3, groups=2)
        assert saved and all(s.is_contiguous(memory_format=fmt) for s in saved), fmt
        (grad,) = torch.autograd.grad(out, t, upstream.contiguous(memory_format=fmt))
        assert out.is_contiguous(memory_format=fmt) and grad.is_contiguous(memory_format=fmt), fmt
        results.append((out, grad))
    (nchw, nchw_grad), (cl, cl_grad) = results
    torch.testing.assert_close(cl, nchw, rtol=0, atol=0)  # the same ops on each element
    torch.testing.assert_close(cl_grad, nchw_grad, rtol=0, atol=0)


def test_lrn_under_torch_compile_equals_eager():
    """The autograd Function traces as one graph (forward and backward): ~8 s to compile."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 12, 3, 4, generator=g) * 30
    upstream = torch.randn(a.shape, generator=g)

    def run(fn):
        t = a.clone().requires_grad_()
        out = fn(t)
        return out, torch.autograd.grad(out, t, upstream)[0]

    def lrn(t):
        return local_response_norm(t, alpha=0.3, groups=2)

    compiled, compiled_grad = run(torch.compile(lrn, fullgraph=True))
    eager, eager_grad = run(lrn)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)


def _norm_pool_pair(a: torch.Tensor, upstream: torch.Tensor, fused, chunk=None, **kw):
    t = a.clone().requires_grad_()
    if fused:  # the PyTorch path (fused=False: not a fused kernel; tests/test_lrn_pool_cpu.py has the C++ one)
        out = local_response_norm_max_pool(t, alpha=0.3, groups=2, chunk=chunk, fused=False, **kw)
    else:
        out = F.max_pool2d(local_response_norm(t, alpha=0.3, groups=2, **kw), 3, 2)
    return out, torch.autograd.grad(out, t, upstream.to(out.dtype))[0]


@pytest.mark.parametrize("chunk", [1, 3, 5, None])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_norm_pool_in_slices_equals_norm_then_pool(chunk, fmt):
    """The fused, sliced normalisation + pooling that training runs gives the same numbers
    as local_response_norm then max_pool2d, for any slicing of the batch (5 images: the
    slices of 3 leave a short one), in either memory layout."""
    g = torch.Generator().manual_seed(0)
    a = (torch.relu(torch.randn(5, 16, 11, 11, generator=g)) * 30).contiguous(memory_format=fmt)
    upstream = torch.randn(5, 16, 5, 5, generator=g)
    out, grad = _norm_pool_pair(a, upstream, fused=True, chunk=chunk)
    want, want_grad = _norm_pool_pair(a, upstream, fused=False)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
    assert grad.is_contiguous(memory_format=fmt)


def test_norm_pool_under_bf16_autocast_and_torch_compile():
    """Under autocast it pools float32 maps as norm-then-pool does; it compiles into one
    graph with the same values."""
    g = torch.Generator().manual_seed(1)
    a = torch.relu(torch.randn(3, 8, 7, 7, generator=g)) * 30
    upstream = torch.randn(3, 8, 3, 3, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grad = _norm_pool_pair(a.bfloat16(), upstream, fused=True, chunk=2)
        want, want_grad = _norm_pool_pair(a.bfloat16(), upstream, fused=False)
    assert out.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)

    def fused(t):
        return local_response_norm_max_pool(t, alpha=0.3, groups=2, chunk=2)

    t = a.clone().requires_grad_()
    compiled = torch.compile(fused, fullgraph=True)(t)
    (compiled_grad,) = torch.autograd.grad(compiled, t, upstream)
    eager, eager_grad = _norm_pool_pair(a, upstream, fused=True, chunk=2)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)


def test_training_keeps_only_the_pooled_maps_and_the_input():
    """The model's forward keeps, for the two normalisations' backward, no activation-sized
    tensor of their own: the 55x55 maps saved are conv1's output (for its ReLU and the
    normalisation) and not also D, D^-β and the normalised maps (the old code's three)."""
    model = make(ONE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        model(images(2))
    full = {s.data_ptr() for s in saved if s.dim() == 4 and tuple(s.shape[1:]) == (96, 55, 55)}
    assert len(full) == 1, len(full)


@PLACEMENTS
@pytest.mark.parametrize("lrn, alpha", [("cuda-convnet", ALPHA_CUDA_CONVNET), ("paper", ALPHA_PAPER)])
def test_model_normalises_each_tower_with_the_configured_alpha(devices, lrn, alpha):
    model = make(devices, lrn=lrn).eval()
    # Scaled-up input so that Σa² is large enough for α to matter at float32 precision.
    with torch.no_grad():
        s = model.stages(images(1) * 100)
    want = torch.cat([lrn_direct(h, alpha) for h in halves(s["conv1"])], dim=1)
    torch.testing.assert_close(s["norm1"], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(s["norm1"], s["conv1"], rtol=1e-3)  # it did normalise
    want = torch.cat([lrn_direct(h, alpha) for h in halves(s["conv2"])], dim=1)
    torch.testing.assert_close(s["norm2"], want, rtol=1e-5, atol=1e-6)
    # The other convention's α (five times larger or smaller) is told apart.
    other = ALPHA_PAPER if alpha == ALPHA_CUDA_CONVNET else ALPHA_CUDA_CONVNET
    assert not torch.allclose(s["norm1"], torch.cat([lrn_direct(h, other) for h in halves(s["conv1"])], dim=1),
                              rtol=1e-3)


# -- the towers -----------------------------------------------------------------------


def _stages_after_perturbing(model: AlexNet, layer: str, x: torch.Tensor):
    with torch.no_grad():
        before = model.stages(x)
        getattr(model.towers[0], layer).weight.add_(0.05)  # tower A's channels change from here
        after = model.stages(x)
    return before, after


@PLACEMENTS
@pytest.mark.parametrize(
    "layer, isolated, mixing",
    [
        ("conv1", ["conv1", "norm1", "pool1", "conv2", "norm2", "pool2"], "conv3"),
        ("conv3", ["conv3", "conv4", "conv5", "pool5"], "fc6"),
        ("conv4", ["conv4", "conv5", "pool5"], "fc6"),
        ("fc6", ["fc6"], "fc7"),
    ],
)
def test_towers_talk_only_at_conv3_and_the_fc_layers(devices, layer, isolated, mixing):
    model = make(devices).eval()
    before, after = _stages_after_perturbing(model, layer, images(2))
    for stage in isolated:
        a_before, b_before = halves(before[stage])
        a_after, b_after = halves(after[stage])
        assert not torch.equal(a_before, a_after), f"perturbing tower A's {layer} left A's {stage} alone"
        torch.testing.assert_close(b_after, b_before, rtol=0, atol=0, msg=f"tower B's {stage} saw tower A")
    _, b_before = halves(before[mixing])
    _, b_after = halves(after[mixing])
    assert not torch.equal(b_before, b_after), f"tower B's {mixing} does not see tower A"


# -- placements -----------------------------------------------------------------------


def test_same_seed_gives_same_weights_in_both_placements():
    one, two = make(ONE).state_dict(), make(TWO).state_dict()
    assert list(one) == list(two)
    for key in one:
        assert torch.equal(one[key], two[key]), key


def _grads_close(a: AlexNet, b: AlexNet) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        # Convolution kernels may sum in a different order for a grouped weight than for
        # two halves: allow float32 rounding relative to the gradient's scale.
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-no-dropout"])
def test_two_devices_and_one_give_same_outputs_and_gradients(train):
    one, two = make(ONE, dropout=0.0).train(train), make(TWO, dropout=0.0).train(train)
    x = images(2)
    labels = torch.tensor([3, 7])
    y1, y2 = one(x), two(x)
    torch.testing.assert_close(y2, y1, rtol=1e-6, atol=1e-7)
    F.cross_entropy(y1, labels).backward()
    F.cross_entropy(y2, labels).backward()
    _grads_close(one, two)
    torch.testing.assert_close(two.features(x), one.features(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("src, dst", [(ONE, TWO), (TWO, ONE)], ids=["one-to-two", "two-to-one"])
def test_state_dict_round_trips_across_placements(src, dst):
    source = make(src, seed=0).eval()
    target = make(dst, seed=1).eval()  # different weights until loaded
    x = images(2)
    with torch.no_grad():
        assert not torch.allclose(source(x), target(x))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))  # strict: same keys
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-6, atol=1e-7)
    # And back again, unchanged.
    back = make(src, seed=2)
    back.load_state_dict(target.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_devices_and_input_device():
    one, two = make(ONE), make(TWO)
    assert one.devices == (torch.device("cpu"),)
    assert two.devices == (torch.device("cpu"), torch.device("cpu"))
    assert one.input_device == two.input_device == torch.device("cpu")


def test_moving_a_two_device_model_keeps_it_working():
    model = make(TWO).eval()
    x = images(1)
    with torch.no_grad():
        want = model(x)
        moved = model.to("cpu")
        torch.testing.assert_close(moved(x), want, rtol=0, atol=0)
        as_double = copy.deepcopy(model).to(torch.float64)
        got = as_double(x.double())
    assert got.dtype == torch.float64 and as_double.devices == (torch.device("cpu"),) * 2
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_towers_on_gpu_and_cpu_match_one_gpu():
    one = make(("cuda:0",), dropout=0.0)
    split = make(("cuda:0", "cpu"), dropout=0.0)
    assert split.towers[1].conv1.weight.device.type == "cpu"
    x = images(2).cuda()
    # cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later: turn it
    # off so that both placements compute in float32 and differ only in summation order.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        y1, y2 = one(x), split(x)
        assert y2.device == x.device
        torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-5)
        y1.square().sum().backward()
        y2.square().sum().backward()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    for (name, p), (_, q) in zip(one.named_parameters(), split.named_parameters()):
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad.to(p.device), p.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


# -- initialisation -------------------------------------------------------------------


def test_initial_weights_are_n_0_001(paper_model):
    for name, p in paper_model.named_parameters():
        if name.endswith("weight"):
            assert abs(p.mean().item()) < 1e-3, name
            # conv1's 17k draws per tower: std within ~2%; fc6's 19M within 0.1%.
            assert p.std().item() == pytest.approx(0.01, rel=0.03), name


@pytest.mark.parametrize("bias_init, hidden", [("paper", 1.0), ("caffe", 0.1)])
def test_initial_biases(bias_init, hidden):
    model = make(ONE, bias_init=bias_init)
    for t, tower in enumerate(model.towers):
        for layer in ("conv2", "conv4", "conv5", "fc6", "fc7"):
            bias = getattr(tower, layer).bias
            assert torch.all(bias == hidden), f"tower {t} {layer}"
        for layer in ("conv1", "conv3"):
            assert torch.all(getattr(tower, layer).bias == 0), f"tower {t} {layer}"
    assert torch.all(model.fc8.bias == 0)


# -- dropout and the public views -----------------------------------------------------


@PLACEMENTS
def test_dropout_only_in_train_mode(devices):
    model = make(devices)
    x = images(2)
    with torch.no_grad():
        model.eval()
        eval_out = model(x)
        torch.testing.assert_close(model(x), eval_out, rtol=0, atol=0)
        eval_fc6 = model.stages(x)["fc6"]
        model.train()
        torch.manual_seed(5)
        train_a = model(x)
        train_b = model(x)
        train_fc6 = model.stages(x)["fc6"]
    assert not torch.allclose(train_a, train_b)
    assert not torch.allclose(train_a, eval_out)
    # Inverted dropout: every fc6 unit is either dropped or scaled by 1 / (1 - 0.5).
    kept = train_fc6 != 0
    torch.testing.assert_close(train_fc6[kept], 2 * eval_fc6[kept])
    fraction_kept = kept.sum().item() / (eval_fc6 != 0).sum().item()
    assert 0.45 < fraction_kept < 0.55


def test_no_dropout_config_makes_train_equal_eval():
    model = make(ONE, dropout=0.0)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), model.eval()(x), rtol=0, atol=0)


@PLACEMENTS
def test_features_are_fc7_activations_without_dropout(devices):
    model = make(devices)
    x = images(2)
    with torch.no_grad():
        model.eval()
        fc7 = model.stages(x)["fc7"]
        model.train()
        feats = model.features(x)  # train mode: dropout must still be off
    assert feats.shape == (2, 4096)
    torch.testing.assert_close(feats, fc7, rtol=0, atol=0)
    assert torch.all(feats >= 0)  # post-ReLU


def test_conv1_kernels_by_tower():
    model = make(TWO)
    kernels = model.conv1_kernels()
    assert kernels.shape == (2, 48, 3, 11, 11)
    assert not kernels.requires_grad
    for t, tower in enumerate(model.towers):
        assert torch.equal(kernels[t], tower.conv1.weight.detach())


# -- configuration --------------------------------------------------------------------


def test_constructor_forms():
    cfg = AlexNetConfig(num_classes=7, lrn="paper")
    assert AlexNet(cfg).config == cfg
    assert AlexNet(7, lrn="paper").config == cfg
    assert AlexNet(num_classes=7, lrn="paper", devices=TWO).config == cfg
    assert AlexNet(cfg, bias_init="caffe").config.bias_init == "caffe"
    assert AlexNet().config == AlexNetConfig()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"lrn": "pytorch"}, ValueError),
        ({"bias_init": "zeros"}, ValueError),
        ({"dropout": 1.0}, ValueError),
        ({"num_classes": 0}, ValueError),
        ({"weight_std": 0.0}, ValueError),
        ({"devices": ("cpu", "cpu", "cpu")}, ValueError),
        ({"no_such_field": 1}, TypeError),
    ],
)
def test_bad_arguments_are_refused(kwargs, error):
    with pytest.raises(error):
        AlexNet(**{"num_classes": SMALL, **kwargs})


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        AlexNetConfig().num_classes = 5  # type: ignore[misc]
