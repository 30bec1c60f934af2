"""benchmarks/cuda_fault.py (`make gpu-fault`) on the CPU: the suspect configuration of the
H200's illegal memory access (compiled, bf16 channels_last, the old autograd-Function LRN)
runs in its own process and trains; the GPU-only rows say why they are skipped."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_suspect_configuration_runs_in_its_own_process_and_skips_say_why(tmp_path):
    names = ["compiled-bf16_channels_last-old-pil", "eager-fp32-fused-torchvision-unsynced"]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cuda_fault.py"), "--device", "cpu",
                           "--out", str(tmp_path), "--only", ",".join(names)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "cuda_fault.json").read_text())["rows"]
    assert list(rows) == names
    suspect = rows[names[0]]
    run = suspect["launch_blocking"]
    assert run["ok"] and run["env"] == {"CUDA_LAUNCH_BLOCKING": "1"}, run
    assert run["steps"] == 2 and run["finite"] and run["first_loss"] > 0
    assert suspect["config"] == {"lrn": "old", "compile": True, "precision": "bf16_channels_last", "decoder": "pil"}
    assert "CUDA" in rows[names[1]]["skipped"]
    assert names[0] in proc.stdout and "launch_blocking ok" in proc.stdout


def test_unknown_configurations_are_refused_by_name(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cuda_fault.py"), "--device", "cpu",
                           "--out", str(tmp_path), "--only", "eager-fp64-magic"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "unknown eager-fp64-magic" in proc.stderr
