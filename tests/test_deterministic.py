"""`train --deterministic` (model/train.py deterministic_mode): the option reaches the
config and config.json, the settings are in force while the run runs (read through torch's
own getters) and put back after it, and a deterministic run stopped mid-epoch and resumed
ends with the uninterrupted run's weights. On the CPU; what it buys on CUDA is in
benchmarks/GPU.md."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from alexprep.cli.main import cli
from alexprep.imagenet_prep.errors import DataError
from alexprep.model.checkpoint import load_checkpoint
from alexprep.model.config import TrainConfig
from alexprep.model.train import train

# 32 training images in batches of 8: 4 steps, then validation.
SMALL = dict(batch_size=8, epochs=1, backend="torch", final_crops=0, log_every=1, bias_init="caffe", loader_workers=0)


def _settings() -> tuple:
    """(deterministic algorithms, warn only, cuDNN deterministic, cuDNN benchmark, cuBLAS workspace)."""
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_a_resumed_deterministic_run_equals_an_uninterrupted_one(stats_build, tmp_path, monkeypatch):
    """`--deterministic` reaches config.json and the checkpoint; the settings hold at every
    log line of each run (the log is called inside the loop) and the process's own come
    back after it; stopped mid-epoch and resumed, the weights are the uninterrupted run's."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # unset in effect; the test's end restores it
    before = _settings()
    whole = tmp_path / "whole"
    result = CliRunner().invoke(cli, ["train", str(stats_build), "--run-dir", str(whole), "--deterministic",
                                      "--batch-size", "8", "--epochs", "1", "--backend", "torch", "--workers", "0",
                                      "--final-crops", "0", "--bias-init", "caffe"])
    assert result.exit_code == 0, result.output
    assert json.loads((whole / "config.json").read_text())["deterministic"] is True
    assert TrainConfig().deterministic is False  # the default: continues, not bit-exact on CUDA
    seen = []
    quiet = {"progress": False, "log": lambda *a: seen.append(_settings())}
    stopped = train(stats_build, tmp_path / "parts", TrainConfig(**SMALL, deterministic=True, max_steps=2), **quiet)
    assert stopped["stopped"] == "max_steps=2"  # mid-epoch: step 2 of 4
    assert _settings()[:4] == before[:4]
    train(stats_build, tmp_path / "parts", TrainConfig(), resume=True, **quiet)  # the run's saved config applies
    notes = []
    train(stats_build, tmp_path / "default", TrainConfig(**SMALL, max_steps=1), progress=False, log=notes.append)
    with pytest.raises(DataError, match=r"--deterministic on \(the run's: off\)"):  # too late: refused
        train(stats_build, tmp_path / "default", TrainConfig(deterministic=True, max_steps=1), resume=True,
              progress=False, log=notes.append)
    assert len(seen) >= 2 and set(seen) == {(True, False, True, False, ":4096:8")}
    assert _settings()[:4] == before[:4] and before[0] is False
    a, b = load_checkpoint(whole), load_checkpoint(tmp_path / "parts")
    assert a["config"]["deterministic"] is b["config"]["deterministic"] is True and a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_too_late_for_cublas_is_one_clear_error(stats_build, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as after CUDA work in this process
    with pytest.raises(DataError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts"):
        train(stats_build, tmp_path / "late", TrainConfig(**SMALL, deterministic=True), progress=False)
    assert not (tmp_path / "late").exists() and not torch.are_deterministic_algorithms_enabled()
    # Set before Python started (either workspace CUDA names): past that check, to the next one.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with pytest.raises(DataError, match="not a build folder"):
        train(tmp_path / "missing", tmp_path / "set", TrainConfig(**SMALL, deterministic=True), progress=False)
