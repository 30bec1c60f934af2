"""The normalisation + max-pool blocks: the fused Triton operator (model/lrn_pool_kernel.py)
and the eager PyTorch path, against a float64 reference written here.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set below before the kernels are defined): the kernels' indexing,
masks, tie-breaking and arithmetic are tested, not their speed (gpu_check's `lrn` section).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from alexprep.model import lrn_pool_kernel  # noqa: E402,F401  (registers torch.ops.alexprep.*)
from alexprep.model.alexnet import AlexNet, local_response_norm_max_pool  # noqa: E402

from lrn_reference import ALPHA, BETA, K, N, reference  # noqa: E402,F401
from lrn_reference import activations as cpu_activations  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def activations(*args, **kwargs) -> torch.Tensor:
    """lrn_reference's activations, on the device the kernels run on here."""
    return cpu_activations(*args, **kwargs).to(DEVICE)


def fused_and_reference(x, size, alpha, beta, k, groups, float_out=False):
    """(output, input gradient) of the fused op and of the reference, for one upstream gradient."""
    xf = x.detach().requires_grad_()
    out, _ = torch.ops.alexprep.lrn_max_pool(xf, size, alpha, beta, k, groups, float_out)
    xr = x.detach().cpu().double().requires_grad_()
    want = reference(xr, size, alpha, beta, k, groups)
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(upstream.to(out.dtype).to(DEVICE))
    want.backward(upstream)
    return out, xf.grad, want, xr.grad


CASES = [  # (spatial size, channels, groups, scale of the inputs, α): AlexNet's 55/27/13 and a 7
    (55, 4, 2, 60.0, ALPHA / N),  # conv1's size, cuda-convnet's α/n, paper-sized activations
    (27, 8, 2, 40.0, ALPHA),  # conv2's size, the paper's printed α
    (13, 10, 1, 2.0, 0.3),  # one group; a strong normalisation
    (7, 12, 2, 1.5, 0.5),  # windows wider than half a group
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("hw,channels,groups,scale,alpha", CASES)
def test_fused_fp32_equals_the_float64_formula_then_max_pool(hw, channels, groups, scale, alpha, channels_last):
    x = activations((1 if hw > 27 else 2, channels, hw, hw), scale, seed=hw, channels_last=channels_last)
    out, grad, want, want_grad = fused_and_reference(x, N, alpha, BETA, K, groups)
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert grad.stride() == x.stride()
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=1e-4, atol=1e-5)
    assert (want_grad != 0).float().mean() > 0.1  # the gradients reach the input (not all zero)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_bf16_reads_bf16_computes_in_fp32(channels_last):
    x = activations((2, 8, 13, 13), 3.0, seed=3, dtype=torch.bfloat16, channels_last=channels_last)
    out, grad, want, want_grad = fused_and_reference(x, N, 0.3, BETA, K, 2)
    assert out.dtype == grad.dtype == torch.bfloat16
    # One bf16 rounding of an fp32 result: within 2^-8 relative on a GPU (round to nearest
    # even); Triton's interpreter truncates, within 2^-7.
    torch.testing.assert_close(out.cpu().double(), want, rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=2 ** -7, atol=2 ** -7 * want_grad.abs().max().item())
    out32, _ = torch.ops.alexprep.lrn_max_pool(x, N, 0.3, BETA, K, 2, True)  # float_out: autocast's rule
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.cpu().double(), want, rtol=1e-5, atol=1e-6)


def test_exact_ties_go_to_the_first_maximum_as_in_max_pool2d():
    """Every window's nine values equal (rows and columns constant per channel, zeros in
    alternate channels): the gradient must land on each window's first position, where
    max_pool2d puts it, not spread or land on another."""
    x = torch.zeros(1, 8, 7, 7)
    x[:, ::2] = torch.arange(1.0, 5.0)[:, None, None]
    x = x.to(DEVICE).requires_grad_()
    out, idx = torch.ops.alexprep.lrn_max_pool(x, N, 0.3, BETA, K, 2, False)
    assert (idx == 0).all()
    out.sum().backward()
    xr = x.detach().cpu().double().requires_grad_()
    reference(xr, N, 0.3, BETA, K, 2).sum().backward()
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, rtol=1e-5, atol=1e-7)
    landed = x.grad[0, 1].cpu() != 0  # a zero channel: only the own-window term, at the argmaxes
    assert landed.nonzero().tolist() == [[r, c] for r in (0, 2, 4) for c in (0, 2, 4)]  # window starts


def test_a_nan_wins_its_windows_as_in_max_pool2d():
    x = activations((1, 4, 7, 7), 1.0, seed=5)
    x[0, 2, 3, 3] = float("nan")
    out, _ = torch.ops.alexprep.lrn_max_pool(x, N, 0.3, BETA, K, 1, False)
    want = reference(x.cpu(), N, 0.3, BETA, K, 1)
    assert torch.equal(out.isnan().cpu(), want.isnan())  # channels 1-3 see it in their sums
    assert out.isnan().any()


def test_opcheck_fake_autograd_and_compile_registrations():
    x = activations((2, 8, 9, 9), 2.0, seed=9).requires_grad_()
    forward = torch.library.opcheck(torch.ops.alexprep.lrn_max_pool.default, (x, N, 0.3, BETA, K, 2, False))
    out, idx = torch.ops.alexprep.lrn_max_pool(x, N, 0.3, BETA, K, 2, False)
    grad = torch.randn_like(out)
    backward = torch.library.opcheck(torch.ops.alexprep.lrn_max_pool_backward.default,
                                     (grad, x.detach(), idx, N, 0.3, BETA, K, 2))
    for report in (forward, backward):  # opcheck raises on a failure; these name what ran
        assert {"test_schema", "test_faketensor", "test_aot_dispatch_dynamic"} <= set(report)
        assert set(report.values()) == {"SUCCESS"}, report


def test_torch_compile_sees_one_operator_no_graph_break():
    """fullgraph=True fails on any graph break; aot_eager runs the fake and autograd
    registrations as inductor would, without generating code."""
    def block(t):
        return local_response_norm_max_pool(t, alpha=0.3, groups=2, fused=True)

    x = activations((2, 8, 13, 13), 2.0, seed=11, channels_last=True)
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    block(eager_x).square().sum().backward()
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    compiled(compiled_x).square().sum().backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=0, atol=0)


def test_fused_under_autocast_returns_float32_like_the_pytorch_path():
    x = activations((2, 8, 13, 13), 2.0, seed=13, dtype=torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        fused = local_response_norm_max_pool(x, alpha=0.3, groups=2, fused=True)
        eager = local_response_norm_max_pool(x, alpha=0.3, groups=2, fused=False)
    assert fused.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)


def test_alexnet_runs_the_fused_operator_when_asked_and_computes_the_same_logits():
    """The whole network forward on one image, fused blocks against the PyTorch blocks (the
    interpreter is too slow for the network's backward: the op's gradient is tested above).
    Logits agree to fp32 rounding (near-ties may pick another of two almost equal maxima)."""
    torch.manual_seed(0)
    eager = AlexNet(num_classes=10, fused_lrn=False).to(DEVICE).eval()
    fused = AlexNet(num_classes=10, fused_lrn=True).to(DEVICE).eval()
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = fused(x)
    calls = [e.count for e in prof.key_averages() if e.key == "alexprep::lrn_max_pool"]
    assert calls == [2]  # norm1 + pool1 and norm2 + pool2, each one operator
    with torch.no_grad():
        torch.testing.assert_close(got, eager(x), rtol=1e-4, atol=1e-7)


def test_fused_refuses_what_it_cannot_run_in_one_line():
    with pytest.raises(ValueError, match="fused=True needs"):
        local_response_norm_max_pool(torch.ones(1, 4, 7, 7, dtype=torch.float64, device=DEVICE), fused=True)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        local_response_norm_max_pool(torch.ones(1, 4, 7, 7, device=DEVICE), groups=3, fused=True)


COMPILE_FOR_HOPPER = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from alexprep.model import lrn_pool_kernel as k

out = {}
for name, fn, data in (("forward", k._lrn_pool_fwd, ("x_ptr", "out_ptr")),
                       ("backward", k._lrn_pool_bwd, ("x_ptr", "g_ptr", "gx_ptr"))):
    for dtype, cl in (("fp32", False), ("bf16", True)):
        consts = {"HALF": 2, "CL": cl, "BIG": False, "BLOCK": 512}
        signature = {a: "constexpr" if a in consts else f"*{dtype}" if a in data else "*i8" if a == "idx_ptr"
                     else "fp32" if a in ("alpha", "beta", "k") else "i32" for a in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        out[f"{name} {dtype}"] = {"sm_90": ".target sm_90" in compiled.asm["ptx"], "cubin": len(compiled.asm["cubin"])}
print(json.dumps(out))
"""


def test_the_kernels_compile_for_a_hopper_gpu(tmp_path):
    """The interpreter does not run Triton's compiler: here the kernels go through it, to
    PTX and a cubin for sm_90 (an H100/H200), without a GPU, in a process without
    TRITON_INTERPRET. Catches what only compiled Triton refuses."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile afresh, not from an earlier run's cache
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"forward fp32", "forward bf16", "backward fp32", "backward bf16"}
    assert all(r["sm_90"] and r["cubin"] > 0 for r in result.values()), result
