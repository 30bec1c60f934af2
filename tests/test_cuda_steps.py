"""Training steps on a GPU (skipped without CUDA): no host sync inside a step, the fused
normalisation against the PyTorch one at AlexNet's sizes, and the compiled bf16
channels_last steps that once died with an illegal memory access (benchmarks/GPU.md)."""
from __future__ import annotations

import json

import pytest
import torch

from alexprep.model.alexnet import local_response_norm_max_pool
from alexprep.model.config import TrainConfig
from alexprep.model.train import SYNC_DEBUG_ENV, train

pytestmark = pytest.mark.gpu


def _config(**kw) -> TrainConfig:
    base = dict(batch_size=8, epochs=2, backend="torch", final_crops=0, log_every=4, bias_init="caffe",
                devices=("cuda:0",), max_steps=8, eval_batch_size=4)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, dict(precision="bf16", channels_last=True)], ids=["fp32", "bf16_channels_last"])
def test_no_host_sync_inside_a_training_step(stats_build, tmp_path, monkeypatch, kw):
    """torch.cuda.set_sync_debug_mode("error") around every step: .item(), .tolist(),
    new_tensor of a Python number, a copy from pageable memory... would raise."""
    monkeypatch.setenv(SYNC_DEBUG_ENV, "error")
    train(stats_build, tmp_path / "run", _config(**kw), progress=False, log=lambda *a: None)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in steps if r["kind"] == "step") == 2  # steps 4 and 8: the reads outside the steps


def test_compiled_bf16_channels_last_steps_finish(stats_build, tmp_path):
    final = train(stats_build, tmp_path / "run", _config(precision="bf16", channels_last=True, compile=True),
                  progress=False, log=lambda *a: None)
    torch.cuda.synchronize()  # an illegal memory access surfaces here at the latest
    assert final["step"] == 8


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_fused_blocks_equal_the_pytorch_blocks_at_alexnets_sizes(layout):
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((16, 96, 55, 55), (16, 256, 27, 27)):
        x = torch.randn(shape, device="cuda", generator=g).relu_().contiguous(memory_format=layout)
        grads = []
        for fused in (True, False):
            t = x.clone().requires_grad_()
            y = local_response_norm_max_pool(t, alpha=2e-5, groups=2, fused=fused)
            y.backward(torch.ones_like(y))
            grads.append((y, t.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)
