"""The fused C++ normalisation + max-pool kernel for the CPU (model/lrn_pool_cpu.py), against
a float64 reference written here, and the PyTorch path it falls back to where it cannot be
built. The first test to run compiles the kernel into torch's extension cache (15-40 s, once).
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from alexprep.model import lrn_pool_cpu
from alexprep.model.alexnet import AlexNet, local_response_norm_max_pool

from lrn_reference import ALPHA, BETA, K, N, activations, reference  # noqa: F401

# A machine without a C++ compiler skips the kernel's tests; the fallback's tests below still run.
needs_kernel = pytest.mark.skipif(lrn_pool_cpu.kernel() is None, reason="the CPU kernel could not be built here")


def kernel_and_reference(x, size, alpha, beta, k, groups, float_out=False):
    """(output, input gradient) of the C++ kernel and of the reference, for one upstream gradient."""
    xk = x.detach().requires_grad_()
    out = lrn_pool_cpu.lrn_max_pool(xk, size, alpha, beta, k, groups, float_out)
    xr = x.detach().double().requires_grad_()
    want = reference(xr, size, alpha, beta, k, groups)
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(upstream.to(out.dtype))
    want.backward(upstream)
    return out, xk.grad, want, xr.grad


CASES = [  # (spatial size, channels, groups, scale of the inputs, α): AlexNet's 55/27/13, a 7 and an even 8
    (55, 4, 2, 60.0, ALPHA / N),  # conv1's size, cuda-convnet's α/n, paper-sized activations
    (27, 8, 2, 40.0, ALPHA),  # conv2's size, the paper's printed α
    (13, 10, 1, 2.0, 0.3),  # one group; a strong normalisation
    (7, 12, 2, 1.5, 0.5),  # windows wider than half a group
    (8, 6, 3, 1.5, 0.5),  # even maps: the last row and column are in no window; three groups of two
]


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("hw,channels,groups,scale,alpha", CASES)
def test_kernel_fp32_equals_the_float64_formula_then_max_pool(hw, channels, groups, scale, alpha, channels_last):
    x = activations((2, channels, hw, hw), scale, seed=hw, channels_last=channels_last)
    out, grad, want, want_grad = kernel_and_reference(x, N, alpha, BETA, K, groups)
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert grad.stride() == x.stride()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-5)
    assert (want_grad != 0).float().mean() > 0.1  # the gradients reach the input (not all zero)


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
def test_kernel_gradcheck_in_float64(groups, channels_last):
    """Gaussian maps without the ReLU: no ties, so the max is differentiable everywhere."""
    x = torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(groups), dtype=torch.float64) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(lambda t: lrn_pool_cpu.lrn_max_pool(t, N, 0.3, BETA, K, groups),
                                    (x.requires_grad_(),))


@needs_kernel
@pytest.mark.parametrize("beta", [0.5, 1.3])
def test_kernel_other_betas_and_window_sizes(beta):
    """β other than the paper's 0.75 take pow's path; windows of 1, 3 and 7."""
    x = activations((2, 9, 11, 11), 3.0, seed=21)
    for size in (1, 3, 7):
        out, grad, want, want_grad = kernel_and_reference(x, size, 0.3, beta, K, 1)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_kernel_reduced_precision_reads_it_and_computes_in_fp32(dtype, channels_last):
    x = activations((2, 8, 13, 13), 3.0, seed=3, dtype=dtype, channels_last=channels_last)
    out, grad, want, want_grad = kernel_and_reference(x, N, 0.3, BETA, K, 2)
    assert out.dtype == grad.dtype == dtype
    eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11  # one rounding of an fp32 result
    torch.testing.assert_close(out.double(), want, rtol=eps, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=eps, atol=eps * want_grad.abs().max().item())
    out32 = lrn_pool_cpu.lrn_max_pool(x, N, 0.3, BETA, K, 2, True)  # float_out: autocast's rule
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), want, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_exact_ties_go_to_the_first_maximum_as_in_max_pool2d(channels_last):
    """Every window's nine values equal (rows and columns constant per channel, zeros in
    alternate channels): the gradient must land on each window's first position, where
    max_pool2d puts it, not spread or land on another."""
    x = torch.zeros(1, 8, 7, 7)
    x[:, ::2] = torch.arange(1.0, 5.0)[:, None, None]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    lrn_pool_cpu.lrn_max_pool(x, N, 0.3, BETA, K, 2).sum().backward()
    xr = x.detach().double().requires_grad_()
    reference(xr, N, 0.3, BETA, K, 2).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)
    landed = x.grad[0, 1] != 0  # a zero channel: only the own-window term, at the argmaxes
    assert landed.nonzero().tolist() == [[r, c] for r in (0, 2, 4) for c in (0, 2, 4)]  # window starts


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_a_nan_wins_its_windows_as_in_max_pool2d(channels_last):
    x = activations((1, 4, 7, 7), 1.0, seed=5)
    x[0, 2, 3, 3] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = lrn_pool_cpu.lrn_max_pool(x, N, 0.3, BETA, K, 1)
    want = reference(x, N, 0.3, BETA, K, 1)
    assert torch.equal(out.isnan(), want.isnan())  # channels 1-3 see it in their sums
    assert out.isnan().any()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6, equal_nan=True)


@needs_kernel
def test_results_do_not_depend_on_the_thread_count():
    """Each output element is computed by one thread in a fixed order: 1 and 2 threads give
    the same bits (training's determinism on the CPU relies on it)."""
    x = activations((6, 12, 15, 15), 30.0, seed=8)
    upstream = torch.randn(6, 12, 7, 7, generator=torch.Generator().manual_seed(2))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            t = x.clone().requires_grad_()
            out = lrn_pool_cpu.lrn_max_pool(t, N, ALPHA / N, BETA, K, 2)
            out.backward(upstream)
            results.append((out, t.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_kernel
def test_an_input_in_neither_layout_is_read_as_a_copy():
    """Every other channel of a tensor (neither NCHW- nor channels_last-contiguous)."""
    x = activations((2, 16, 13, 13), 3.0, seed=19)[:, ::2]
    out, grad, want, want_grad = kernel_and_reference(x, N, 0.3, BETA, K, 2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", [pytest.param(dict(), id="kernel", marks=needs_kernel),
                                  pytest.param(dict(fused=False, chunk=1), id="pytorch-path")])
def test_the_gradient_laid_out_unlike_the_input(path):
    """An NCHW gradient for a channels_last input (what a compiled graph around it may hand
    over): the reference's gradient, by the kernel and by the PyTorch path, which brings the
    pooled gradient and indices to one layout before max_pool2d_with_indices_backward (a
    suspect of the H200's illegal memory access, benchmarks/GPU.md)."""
    x = activations((2, 8, 13, 13), 3.0, seed=17, channels_last=True).requires_grad_()
    out = local_response_norm_max_pool(x, alpha=0.3, groups=2, **path)
    assert out.is_contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.contiguous().backward(upstream.float())  # contiguous(): its gradient arrives NCHW
    xr = x.detach().double().requires_grad_()
    reference(xr, N, 0.3, BETA, K, 2).backward(upstream)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)


@needs_kernel
def test_under_autocast_the_output_is_float32_like_the_pytorch_path():
    x = activations((2, 8, 13, 13), 2.0, seed=13, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = local_response_norm_max_pool(x, alpha=0.3, groups=2)
        eager = local_response_norm_max_pool(x, alpha=0.3, groups=2, fused=False)
    assert fused.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_alexnet_on_the_cpu_runs_the_kernel_and_computes_what_the_pytorch_path_does():
    """The whole network, forward and backward on two images: the kernel runs for both
    blocks, and logits and every weight's gradient agree with the PyTorch path's to fp32
    rounding (a near-tie may pick another of two almost equal maxima: rare at this size)."""
    torch.manual_seed(0)
    kernel = AlexNet(num_classes=10, dropout=0.0)  # no dropout: the two draws would differ
    torch_path = AlexNet(num_classes=10, dropout=0.0, fused_lrn=False)
    torch_path.load_state_dict(kernel.state_dict())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = kernel(x)
        got.square().sum().backward()
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("alexprep_cpu::")}
    assert counts == {"alexprep_cpu::lrn_max_pool_forward": 2, "alexprep_cpu::lrn_max_pool_backward": 2}
    want = torch_path(x)
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(kernel.named_parameters(), torch_path.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_refuses_bad_input_in_one_line():
    with pytest.raises(ValueError, match="H >= 3"):
        lrn_pool_cpu.lrn_max_pool(torch.ones(1, 4, 2, 7), N, 0.3, BETA, K, 1)
    with pytest.raises(ValueError, match="divisible by groups=3"):
        lrn_pool_cpu.lrn_max_pool(torch.ones(1, 4, 7, 7), N, 0.3, BETA, K, 3)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        local_response_norm_max_pool(torch.ones(1, 4, 7, 7), groups=3)


@needs_kernel
def test_the_operators_check_their_tensors_before_touching_memory():
    """The C++ operators index raw memory: a mismatched tensor is an error, not a stray write."""
    ops = lrn_pool_cpu.kernel()
    x = torch.ones(2, 4, 7, 7)
    out, idx = torch.empty(2, 4, 3, 3), torch.empty(2, 4, 3, 3, dtype=torch.int8)
    ops.lrn_max_pool_forward(x, out, idx, N, 0.3, BETA, K, 2, False)  # the right tensors: no error
    for bad_out, bad_idx, cl in ((torch.empty(2, 4, 2, 3), idx, False), (out, idx.long(), False), (out, idx, True)):
        with pytest.raises(RuntimeError, match="lrn_max_pool"):
            ops.lrn_max_pool_forward(x, bad_out, bad_idx, N, 0.3, BETA, K, 2, cl)
    with pytest.raises(RuntimeError, match="lrn_max_pool"):
        ops.lrn_max_pool_backward(out, x, idx, torch.empty(2, 4, 7, 6), N, 0.3, BETA, K, 2, False)


FALLBACK = textwrap.dedent("""
    import warnings, torch
    from alexprep.model.alexnet import local_response_norm_max_pool
    # torch 2.13's first sqrt in a process (CPU, AVX2 or AVX-512 alike) sometimes returns
    # about 12 bits (sqrt(2) -> 1.413818359375) on this machine: in 3-10 of 30 fresh processes,
    # never after one sqrt call. Taken here, so that the comparison below is of our code.
    torch.ones(8).sqrt()
    x = (torch.randn(2, 8, 13, 13, generator=torch.Generator().manual_seed(0)) * 3).relu_().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = local_response_norm_max_pool(x, alpha=0.3, groups=2)
        out.sum().backward()
        again = local_response_norm_max_pool(x.detach(), alpha=0.3, groups=2)
    ref = x.detach().clone().requires_grad_()
    want = local_response_norm_max_pool(ref, alpha=0.3, groups=2, fused=False)
    want.sum().backward()
    assert torch.equal(out, want) and torch.equal(again, want) and torch.equal(x.grad, ref.grad)
    print("WARNINGS", len(caught))
    for w in caught:
        print("MESSAGE", str(w.message))
""")


@pytest.mark.parametrize("how", ["no compiler", "turned off"])
def test_without_the_kernel_the_pytorch_path_runs_after_one_warning(how, without_kernel):
    """A process whose C++ compiler does not exist (CXX names none, a fresh extension
    cache so nothing compiled earlier is found): one one-line warning, then the PyTorch
    path's numbers, forward and backward. ALEXPREP_CPU_KERNEL=0: the same, silently."""
    lines = without_kernel(FALLBACK, how)
    if how == "no compiler":
        assert "WARNINGS 1" in lines, lines
        (message,) = [line for line in lines if line.startswith("MESSAGE")]
        assert "could not be built" in message and "PyTorch path" in message
    else:
        assert "WARNINGS 0" in lines, lines
