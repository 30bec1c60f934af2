"""benchmarks/gpu_check.py (`make gpu-check`, benchmarks/GPU.md) at tiny sizes on the CPU, so
that the script a lent GPU machine runs cannot rot between loans."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = ["machine", "data", "lrn", "convs", "model", "two_device", "syncs", "loader", "handoff", "gpu_decode",
            "trainer", "resume", "eval", "digits", "compile"]
GPU_ONLY = ("convs", "syncs", "digits")  # the CPU smoke skips these whole, saying why
# A measured row carries one of these; a row that did not run says why (an error is a
# failure, not a reason: on the CPU every row runs or is left out on purpose).
NUMBERS = ("images_per_s", "images_per_s_wall", "eval_images_per_s", "exact", "ms", "us_per_image")
# The script's own 270 s budget is for a lent GPU machine; on a busy 2-core CI the smoke's
# sections take 3-5 minutes, and past the budget the last ones would be skipped untested.
SMOKE_BUDGET_S = 1500


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), "--work-dir", str(out),
                           "--budget-s", str(SMOKE_BUDGET_S)], capture_output=True, text=True,
                          timeout=SMOKE_BUDGET_S + 300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    result["_stdout"] = proc.stdout
    return result


def test_every_section_ran_or_says_why(smoke):
    sections = smoke["sections"]
    assert list(sections) == SECTIONS
    for name, section in sections.items():
        assert "error" not in section, (name, section.get("traceback", section["error"]))
        assert ("skipped" in section) == (name in GPU_ONLY), (name, section.get("skipped"))
        for row in section.get("rows", []):
            assert "error" not in row, (name, row)
            has_number = any(isinstance(row.get(k), (int, float)) for k in NUMBERS)
            has_reason = isinstance(row.get("skipped"), str) and row["skipped"]
            assert has_number or has_reason, (name, row)
    assert "gpu_check on cpu" in smoke["_stdout"]


def test_what_must_run_on_the_cpu_ran(smoke):
    sections = smoke["sections"]
    ours = [r for r in sections["model"]["rows"] if r["model"] == "alexprep"]
    assert ours[0]["precision"] == "fp32" and ours[0]["images_per_s"] > 0
    assert all("TF32" in r["skipped"] for r in ours if r["precision"] == "tf32")
    tv = [r for r in sections["model"]["rows"] if r["model"] == "torchvision"]
    for r in tv:  # torchvision's contender runs where it imports, and says why not elsewhere
        assert r.get("images_per_s") or "torchvision" in r.get("skipped", "") or "CPU smoke" in r.get("skipped", "")
    compare = sections["two_device"]["compare"]
    # ('cpu', 'cpu') runs the same kernels as one CPU: the same distance to float64.
    assert compare["ok"] and compare["worst_ratio"]["ratio"] <= 1.0, compare
    assert 0 < compare["one_vs_float64"]["grad_worst"] < 0.5 and compare["split_vs_one"]["output"] < 1e-5
    lrn = {(r["stage"], r["precision"], r["contender"]): r for r in sections["lrn"]["rows"]}
    assert lrn[("norm1+pool1", "fp32", "lrn+pool eager")]["ms"] > 0
    assert lrn[("norm2+pool2", "bf16", "max_pool2d alone")]["ms"] > 0
    loader = {r["name"]: r for r in sections["loader"]["rows"]}
    assert loader["jpeg/pil"]["images_per_s"] > 0 and loader["raw/pil"]["images_per_s"] > 0
    assert loader["jpeg/decode_one_core"]["images_per_s"] > 0
    assert loader["jpeg/pil"]["target_images_per_s"] > 0 and "meets_target" in loader["raw/pil"]
    handoff = {r["name"]: r for r in sections["handoff"]["rows"]}
    assert handoff["fresh"]["us_per_image"] > 0 and handoff["slots"]["us_per_image"] > 0
    assert sections["handoff"]["slots_over_fresh"] > 0
    assert sections["handoff"]["rrc_device_vs_cpu"]["within"]
    decode = {r["name"]: r for r in sections["gpu_decode"]["rows"]}
    assert decode["pil"]["images_per_s"] > 0 and decode["pil"]["step_ms_alone"] > 0 and "taken_ms" in decode["pil"]
    assert decode["nvimgcodec/hw"]["skipped"] == decode["nvimgcodec/cuda"]["skipped"] == "needs CUDA"
    trainer = sections["trainer"]["rows"][0]
    assert trainer["images_per_s_wall"] > 0 and 0 <= trainer["data_wait_fraction"] <= 1
    raw = next(r for r in sections["trainer"]["rows"] if r["name"] == "bf16_channels_last_raw")
    assert raw["shards"] == "raw" and 0 <= raw["data_wait_fraction"] <= 1 and raw["images_per_s_steady"] > 0
    assert {r["crops"] for r in sections["eval"]["rows"]} == {1, 10}
    compiled = sections["compile"]["rows"][0]  # dynamo's "eager" backend on the CPU: tracing, no code generation
    assert compiled["compile"] and "error" not in compiled and compiled["images_per_s"] > 0, compiled
    assert sections["machine"]["imported_alexprep"]


def test_resume_is_exact_on_the_cpu(smoke):
    (row,) = smoke["sections"]["resume"]["rows"]
    assert row["mode"] == "default_new_process"  # resumed in a fresh process, as a real resume
    assert row["exact"] is True, row
    assert row["mid_epoch"] and row["final_step"] == [row["steps"], row["steps"]]
    assert row["weights"]["tensors_differing"] == 0 and row["momentum"]["tensors"] > 0


def test_shim_imports_alexprep_from_the_source_folders(tmp_path):
    """Without an install (the lent GPU machine has no .venv), the script imports alexprep
    through build/gpu-path/alexprep/<package> symlinks to the source folders."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    shim = gpu_check.make_shim(tmp_path / "gpu-path")
    assert gpu_check.make_shim(shim) == shim  # idempotent
    code = ("import alexprep.model.alexnet as m, alexprep.imagenet_prep.loaders, alexprep.cli.main; "
            "print(m.__file__)")
    env = {**os.environ, "PYTHONPATH": str(shim)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(shim)), proc.stdout


def test_script_falls_back_to_the_shim_without_an_install(tmp_path):
    """With the editable install's import hook removed, as on a machine where alexprep is
    not installed, the script makes the shim itself and imports through it."""
    code = ("import sys, runpy; "
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            f"print(runpy.run_path({str(SCRIPT)!r}, run_name='not_main')['IMPORTED_VIA'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("shim "), proc.stdout
    assert (REPO / "build" / "gpu-path" / "alexprep" / "model" / "alexnet.py").exists()


def test_each_nvimgcodec_row_opens_its_own_decoder_and_puts_the_default_back():
    """The gpu_decode section's nvImageCodec rows (skipped on the CPU) open the backend's
    decoder with their arguments, and leave the backend's own opener in place after."""
    from alexprep.imagenet_prep import torch_backend
    from alexprep.imagenet_prep.errors import DataError

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", gpu_check)
    spec.loader.exec_module(gpu_check)
    default = torch_backend.open_batch_decoder
    for name, decoder, options in gpu_check.GPU_DECODERS:
        if decoder == "nvimgcodec":
            with gpu_check._nvimgcodec_options({**options, "backends": ("tpu",)}):  # refused before any import
                with pytest.raises(DataError, match=r"backends must be some of .* not \('tpu',\)"):
                    torch_backend.open_batch_decoder(torch.device("cuda:0"))
            assert torch_backend.open_batch_decoder is default, name
