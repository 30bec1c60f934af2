"""The trainer: the paper's update rule, its schedule, exact resume, DDP, checkpoints, and
the train/evaluate commands' errors."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from alexprep.cli.main import cli
from alexprep.cli.train import train_command
from alexprep.imagenet_prep.errors import DataError
from alexprep.model.alexnet import AlexNet
from alexprep.model.checkpoint import list_checkpoints, load_checkpoint
from alexprep.model.config import TrainConfig
from alexprep.model.optim import LrSchedule, PaperSGD, param_groups
from alexprep.model.train import Ranks, TrainingDiverged, make_loaders, train

# Small and fast on 2 cores: 32 training images in batches of 8, 4 steps an epoch.
FAST = TrainConfig(batch_size=8, epochs=2, backend="torch", final_crops=0, log_every=1, bias_init="caffe",
                   loader_workers=1)


# ---------------------------------------------------------------------------- the update rule
def _paper_reference(w0, grads, lrs, momentum=0.9, wd=5e-4):
    """v <- m v - wd lr w - lr g; w <- w + v, written out."""
    w, v = w0.clone(), torch.zeros_like(w0)
    for g, lr in zip(grads, lrs):
        v = momentum * v - wd * lr * w - lr * g
        w = w + v
    return w


def test_paper_sgd_is_the_papers_formula_and_differs_from_pytorch_at_an_lr_drop():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3, dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64) for _ in range(8)]
    lrs = [0.1] * 4 + [0.01] * 4  # a drop by 10 after step 4

    def run(optimizer_class, **kw):
        p = torch.nn.Parameter(w0.clone())
        opt = optimizer_class([p], lr=lrs[0], momentum=0.9, weight_decay=5e-4, **kw)
        trail = []
        for g, lr in zip(grads, lrs):
            for group in opt.param_groups:
                group["lr"] = lr
            p.grad = g.clone()
            opt.step()
            trail.append(p.detach().clone())
        return trail

    ours, pytorch = run(PaperSGD), run(torch.optim.SGD)
    torch.testing.assert_close(ours[-1], _paper_reference(w0, grads, lrs), rtol=0, atol=1e-12)
    # With a constant lr the two rules are one trajectory ...
    for a, b in zip(ours[:4], pytorch[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # ... at the drop PyTorch rescales its accumulated momentum by the new lr at once, the
    # paper's keeps the old steps and lets them decay: the first step after differs ~10x.
    step_ours, step_torch = ours[4] - ours[3], pytorch[4] - pytorch[3]
    assert step_ours.norm() > 5 * step_torch.norm()


def test_weight_decay_skips_biases_unless_asked():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    groups = param_groups(model, 5e-4)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert all(p.ndim == 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    p = torch.nn.Parameter(torch.ones(3))
    opt = PaperSGD([{"params": [p], "weight_decay": 0.0}], lr=0.1, weight_decay=5e-4)
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))  # a bias with zero gradient stays put
    decayed = param_groups(model, 5e-4, decay_biases=True)
    assert [g["weight_decay"] for g in decayed] == [5e-4, 5e-4]


def test_bias_lr_multiplier_moves_biases_that_much_faster():
    model = torch.nn.Linear(4, 3)
    opt = PaperSGD(param_groups(model, 0.0, bias_lr_mult=2.0), lr=0.1, weight_decay=0.0)
    LrSchedule(0.1).apply(opt)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    before = [p.detach().clone() for p in (model.weight, model.bias)]
    model.weight.grad, model.bias.grad = torch.ones(3, 4), torch.ones(3)
    opt.step()
    assert torch.allclose(model.weight - before[0], torch.full((3, 4), -0.1))
    assert torch.allclose(model.bias - before[1], torch.full((3,), -0.2))  # epsB = 2 epsW, as cuda-convnet2


def _creeping_curve() -> list[float]:
    """Top-1 error over 50,000 images after each of 90 epochs: a fast fall, then a new best
    by 1 to 10 images every epoch, as long runs show once the lr is too high to settle."""
    import numpy as np

    rng = np.random.default_rng(0)
    wrong = [int(50000 * (0.42 + 0.48 * np.exp(-e / 6))) for e in range(30)]
    for _ in range(30, 90):
        wrong.append(wrong[-1] - int(rng.integers(1, 11)))
    return [w / 50000 for w in wrong]


def test_plateau_threshold_lets_the_drops_happen_on_a_creeping_curve():
    curve = _creeping_curve()
    assert all(b < a for a, b in zip(curve[29:], curve[30:]))  # every epoch a new best, by a hair
    plain = LrSchedule(0.01, patience=3)
    assert not any(plain.end_of_epoch(e, err) for e, err in enumerate(curve))  # no drop in 90 epochs
    s = LrSchedule(0.01, patience=3, threshold=0.01)
    drops = [e for e, err in enumerate(curve) if s.end_of_epoch(e, err)]
    assert drops == [27, 32, 35] and s.lr == pytest.approx(1e-5)
    # each drop follows 3 epochs none of which beat the best by 1% of it
    for d in drops:
        best = min(curve[:d - 2])
        assert all(err >= 0.99 * best for err in curve[d - 2:d + 1])


def test_plateau_schedule_divides_by_ten_at_most_three_times():
    s = LrSchedule(0.01, patience=2, max_drops=3)
    errors = [0.9, 0.8, 0.8, 0.8] + [0.8] * 10
    drops = [s.end_of_epoch(e, err) for e, err in enumerate(errors)]
    assert drops[:4] == [False, False, False, True]  # two epochs without a new best
    assert sum(drops) == 3 and s.lr == pytest.approx(1e-5)  # the paper's final lr
    fixed = LrSchedule(0.01, milestones=(2, 4))
    assert [fixed.end_of_epoch(e, 0.5) for e in range(5)] == [False, True, False, True, False]
    restored = LrSchedule(1.0)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()


# ---------------------------------------------------------------------------- runs
def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir)["model"]


@pytest.fixture(scope="module")
def uninterrupted(stats_build, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "whole"
    result = train(stats_build, run_dir, FAST, progress=False, log=lambda *a: None)
    assert result["epochs"] == 2 and result["step"] == 8
    return run_dir


def assert_curves_drawn(path: Path) -> None:
    """curves.png is the figure plot_curves sets (10 x 3.8 inches at 90 dpi) and holds its
    lines: matplotlib's first three cycle colours (loss and train top-1 in blue, val top-1
    in orange, val top-5 in green), each over more pixels than its legend entry alone takes
    (49 to 81 at this size; two epochs' lines add 90 to 950)."""
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (900, 342)
        rgb = np.asarray(png.convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)):
        near = np.abs(rgb - colour).sum(axis=1) <= 30
        assert near.sum() > 100, (colour, int(near.sum()))


def test_run_dir_contents_and_checkpoint(uninterrupted, stats_build):
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and len([r for r in rows if r["kind"] == "step"]) == 8
    for key in ("train_loss", "train_top1_error", "val_top1_error", "val_top5_error", "lr", "images_per_s",
                "data_wait_fraction"):
        assert key in epochs[0]
    assert 0 <= epochs[0]["data_wait_fraction"] <= 1
    assert_curves_drawn(uninterrupted / "curves.png")
    assert len(list_checkpoints(uninterrupted / "checkpoints")) == FAST.keep_last == 2
    ckpt = torch.load(list_checkpoints(uninterrupted / "checkpoints")[-1], weights_only=True)
    classes = json.loads((stats_build / "classes.json").read_text())["classes"]
    assert ckpt["classes"]["wnids"] == [c["wnid"] for c in classes]
    assert ckpt["stats"]["mean_image"].shape == (256, 256, 3) and ckpt["stats"]["eigvecs"].shape == (3, 3)
    assert ckpt["epoch"] == 2 and ckpt["batch"] == 0 and ckpt["step"] == 8
    assert ckpt["config"]["batch_size"] == 8 and ckpt["build_id"]


def test_interrupted_and_resumed_run_gives_the_same_weights(uninterrupted, stats_build, tmp_path):
    run_dir = tmp_path / "interrupted"
    quiet = {"progress": False, "log": lambda *a: None}
    # Stop mid-epoch (step 3 of 4 in epoch 0), then again in the next epoch, then finish.
    stopped = train(stats_build, run_dir, TrainConfig(**{**FAST.to_json(), "max_steps": 3, "milestones": ()}), **quiet)
    assert stopped["stopped"] == "max_steps=3"
    ckpt = load_checkpoint(run_dir)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (0, 3, 3)
    train(stats_build, run_dir, TrainConfig(max_steps=6), resume=True, **quiet)
    train(stats_build, run_dir, TrainConfig(), resume=True, **quiet)
    ours, reference = _weights(run_dir), _weights(uninterrupted)
    assert ours.keys() == reference.keys()
    for name in reference:
        assert torch.equal(ours[name], reference[name]), name
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(l) for l in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    pick = lambda rows: [(r["train_loss"], r["val_top1_error"]) for r in rows if r["kind"] == "epoch"]  # noqa: E731
    assert pick(metrics) == pick(whole)


# `alexprep train` with FAST's settings (the option table below shows each reaching its field).
FAST_ARGS = ["--batch-size", "8", "--epochs", "2", "--backend", "torch", "--final-crops", "0", "--log-every", "1",
             "--bias-init", "caffe", "--workers", "1"]


def _step_rows(run_dir: Path) -> list[dict]:
    """The step rows of metrics.jsonl so far (a line being written is left out)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [r for r in map(json.loads, text.splitlines(keepends=True)[:None if text.endswith("\n") else -1])
            if r["kind"] == "step"]


def _wait_for(proc: subprocess.Popen, predicate, what: str, timeout: float = 300) -> None:
    """Until `predicate()` holds; fails if the run ends first. Polls every 5 ms: the kill
    lands on the event, not after a guessed time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@contextlib.contextmanager
def _reaped():
    """Registers child processes; kills those still running when the test ends early."""
    started = []
    try:
        yield lambda proc: started.append(proc) or proc
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def test_sigkill_in_a_step_and_in_a_checkpoint_write_then_resume_gives_the_same_weights(uninterrupted, stats_build,
                                                                                        tmp_path):
    """`alexprep train` is killed (SIGKILL: no handler runs) first in the middle of epoch 2,
    then, resumed, in the middle of writing its epoch-2 checkpoint; a second --resume
    finishes the run with the uninterrupted run's weights, bit for bit.

    The first kill lands as step 6's metrics row appears: the run is fetching or computing
    step 7, past the epoch-1 checkpoint (step 4). For the second, the resumed run's temporary checkpoint
    name (.checkpoint-e002-s0000008.pt.tmp-PID) is made a FIFO before it gets there: the
    run's torch.save blocks in it once the pipe is full, and the kill lands after 1 MiB of
    the checkpoint is written. What that leaves is put back as a regular file, as a disk
    would hold it."""
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "alexprep.cli.main", "train", str(stats_build), "--run-dir", str(run_dir), *FAST_ARGS]
    with open(tmp_path / "log.txt", "w") as log, _reaped() as procs:
        first = procs(subprocess.Popen(cmd, stdout=log, stderr=log))
        _wait_for(first, lambda: any(r["step"] == 6 for r in _step_rows(run_dir)), "step 6's row")
        _kill(first)
        assert json.loads((run_dir / "config.json").read_text()) == FAST.to_json()  # the reference's settings
        assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["checkpoint-e001-s0000004.pt"]

        rows_before = len(_step_rows(run_dir))
        second = procs(subprocess.Popen(cmd + ["--resume"], stdout=log, stderr=log))
        # Its first row (step 5) comes three steps and a validation before the checkpoint write.
        _wait_for(second, lambda: len(_step_rows(run_dir)) > rows_before, "the resumed run's first row")
        fifo = run_dir / "checkpoints" / f".checkpoint-e002-s0000008.pt.tmp-{second.pid}"
        os.mkfifo(fifo)  # fails if the run had already started writing there
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        written = bytearray()
        try:
            def read_some() -> bool:
                try:
                    written.extend(os.read(fd, 1 << 20))
                except BlockingIOError:
                    pass
                return len(written) >= 1 << 20

            _wait_for(second, read_some, "1 MiB of the epoch-2 checkpoint")
            _kill(second)
        finally:
            os.close(fd)
        assert written[:4] == b"PK\x03\x04"  # torch.save's zip archive, begun
        fifo.unlink()
        fifo.write_bytes(bytes(written))  # a checkpoint cut off mid-write, under its temporary name
        assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["checkpoint-e001-s0000004.pt"]

        third = subprocess.run(cmd + ["--resume"], stdout=log, stderr=log)
        assert third.returncode == 0, (tmp_path / "log.txt").read_text()[-3000:]
        assert not fifo.exists()  # the resume removed the half-written checkpoint
    ckpt = load_checkpoint(run_dir)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (2, 0, 8)
    reference = _weights(uninterrupted)
    assert ckpt["model"].keys() == reference.keys()
    for name in reference:
        assert torch.equal(ckpt["model"][name], reference[name]), name
    velocities = load_checkpoint(uninterrupted)["optimizer"]["state"]
    assert ckpt["optimizer"]["state"].keys() == velocities.keys()
    for i, state in velocities.items():
        assert torch.equal(ckpt["optimizer"]["state"][i]["velocity"], state["velocity"]), i


def test_compile_trains_the_same_weights_and_saves_plain_checkpoints(uninterrupted, stats_build, tmp_path,
                                                                      monkeypatch):
    """--compile wraps only the training step: with dynamo's "eager" backend (tracing, the
    same aten ops, the same dropout masks) the run follows the uncompiled one step by step
    (float32 drift only: dynamo's tensors differ in the last bit from step 1, as torch
    allows), and the checkpoint has the module's own keys (no "_orig_mod." prefix), so it
    loads into an uncompiled model."""
    import alexprep.model.train as train_module

    calls = []
    real_compile = torch.compile

    def spy(model, **kw):
        calls.append(kw)
        return real_compile(model, **kw)

    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(torch, "compile", spy)
    run_dir = tmp_path / "compiled"
    train(stats_build, run_dir, TrainConfig(**{**FAST.to_json(), "compile": True}), progress=False,
          log=lambda *a: None)
    assert calls == [{"backend": "eager"}]
    assert json.loads((run_dir / "config.json").read_text())["compile"] is True

    def losses(d: Path) -> list[float]:
        rows = map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in rows if r["kind"] == "step"]

    ours, reference = losses(run_dir), losses(uninterrupted)
    assert len(ours) == len(reference) == 8
    assert ours[0] == pytest.approx(reference[0], rel=1e-5)
    assert ours == pytest.approx(reference, rel=2e-3)
    model = AlexNet(4)
    model.load_state_dict(_weights(run_dir))  # strict: the same keys as an uncompiled model's


def test_two_processes_match_one_on_the_same_global_batch(stats_build, tmp_path):
    # Dropout off: its masks come from each process's own RNG, so they cannot match.
    config = {**FAST.to_json(), "dropout": 0.0, "epochs": 1, "max_steps": 2, "loader_workers": 1}
    script = tmp_path / "run.py"
    script.write_text("import json, sys\nfrom alexprep.model.config import TrainConfig\n"
                      "from alexprep.model.train import train\n"
                      "train(sys.argv[1], sys.argv[2], TrainConfig.from_json(json.loads(sys.argv[3])), progress=False)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "single", tmp_path / "double"
    subprocess.run([sys.executable, str(script), str(stats_build), str(single), json.dumps(config)], check=True,
                   capture_output=True, env=env)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(stats_build), str(double), json.dumps(config)], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _weights(single), _weights(double)
    assert load_checkpoint(double)["step"] == 2 == load_checkpoint(single)["step"]
    torch.manual_seed(FAST.seed)
    initial = AlexNet(FAST.model_config(4)).state_dict()
    assert not torch.equal(a["fc8.weight"], initial["fc8.weight"])  # two steps moved the weights
    for name in a:
        # Each rank averaged half the global batch and DDP averaged the two: the same
        # gradient up to float summation order.
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_with_a_clear_message(stats_build, tmp_path):
    config = TrainConfig(**{**FAST.to_json(), "lr": 1e8, "epochs": 3})
    with pytest.raises(TrainingDiverged, match="NaN or infinite by step"):
        train(stats_build, tmp_path / "nan", config, progress=False, log=lambda *a: None)


# ---------------------------------------------------------------------------- the commands
def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _errors_by_hand(run_dir: Path, build: Path, crops: int) -> tuple[float, float]:
    """The checkpoint's top-1 and top-5 error over the val split, without evaluate(): its
    logits per crop, softmax averaged over the 10 crops and the label ranked in numpy."""
    from test_evaluate import numpy_errors, softmax64

    from alexprep.imagenet_prep.loaders import eval_loader

    model = AlexNet(4)
    model.load_state_dict(_weights(run_dir))
    model.eval()
    scores, labels = [], []
    with eval_loader(build, batch_size=6, device="cpu", crops=crops, backend="torch", workers=0) as loader, \
            torch.no_grad():
        for x, y in loader:
            logits = model(x.flatten(0, 1) if crops == 10 else x).numpy()
            scores.append(softmax64(logits.reshape(len(y), 10, -1)).mean(axis=1) if crops == 10 else logits)
            labels.append(y.numpy())
    return numpy_errors(np.concatenate(scores).astype(np.float64), np.concatenate(labels))


def test_evaluate_reports_both_crop_settings(uninterrupted, stats_build):
    result = run("evaluate", uninterrupted, stats_build, "--backend", "torch", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert [p["crops"] for p in payload] == [1, 10] and all(p["count"] == 12 for p in payload)
    for p in payload:
        top1, top5 = _errors_by_hand(uninterrupted, stats_build, p["crops"])
        assert p["top1_error"] == pytest.approx(top1, abs=1e-12) and p["top5_error"] == pytest.approx(top5, abs=1e-12)
    last_epoch = [json.loads(l) for l in (uninterrupted / "metrics.jsonl").read_text().splitlines()
                  if '"epoch"' in l][-1]
    assert payload[0]["top1_error"] == pytest.approx(last_epoch["val_top1_error"])
    table = run("evaluate", uninterrupted, stats_build, "--backend", "torch", "--crops", "1").output
    assert "top-1 error" in table and "1 crop" in table


def assert_usage_error(result, fragment):
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_train_bad_input(uninterrupted, stats_build, photo_build, tmp_path):
    assert_usage_error(run("train", photo_build, "--run-dir", tmp_path / "r1", "--backend", "torch"), "stats")
    assert_usage_error(run("train", stats_build, "--run-dir", uninterrupted, "--backend", "torch"), "holds another run")
    assert_usage_error(run("train", stats_build, "--run-dir", tmp_path / "r2", "--device", "tpu:0"), "device")
    assert_usage_error(run("train", stats_build, "--run-dir", tmp_path / "r3", "--device", "cuda:0"), "CUDA")
    assert_usage_error(run("train", stats_build, "--run-dir", tmp_path / "r4", "--resume"), "no checkpoint")
    # Each range and choice is checked once, by TrainConfig, for train and evaluate alike.
    assert_usage_error(run("train", stats_build, "--run-dir", tmp_path / "r5", "--batch-size", "0"),
                       "--batch-size must be >= 1, not 0")
    assert_usage_error(run("train", stats_build, "--run-dir", tmp_path / "r6", "--final-crops", "5"),
                       "--final-crops must be one of 0, 1, 10, not 5")
    assert_usage_error(run("evaluate", uninterrupted, stats_build, "--batch-size", "0"), "--batch-size must be >= 1")
    assert_usage_error(run("evaluate", uninterrupted, stats_build, "--precision", "fp16"),
                       "--precision must be one of fp32, tf32, bf16, not 'fp16'")
    with pytest.raises(DataError, match="not divisible by the 3 ranks"):
        make_loaders(stats_build, TrainConfig(batch_size=8, backend="torch"), Ranks(0, 3), torch.device("cpu"))


def test_resume_refuses_given_options_that_differ_and_records_those_that_may(uninterrupted, stats_build, tmp_path):
    """--resume compares the options typed with the run's config: one that differs is
    refused (one line naming each, nothing touched); typed but equal is accepted; those
    that may change on resume (--epochs, --log-every, --max-steps) change, in config.json
    and the checkpoint, and a "resume" row of metrics.jsonl records them."""
    run_dir = tmp_path / "run"  # the finished 2-epoch run (8 steps), its newest checkpoint only
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(list_checkpoints(uninterrupted / "checkpoints")[-1], run_dir / "checkpoints")
    shutil.copy(uninterrupted / "metrics.jsonl", run_dir / "metrics.jsonl")
    files = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    refused = run("train", stats_build, "--run-dir", run_dir, "--resume", "--lr", "0.02", "--batch-size", "4",
                  "--epochs", "3", "--bias-init", "caffe")
    assert_usage_error(refused, "2 given option(s) differ: --batch-size 4 (the run's: 8); --lr 0.02 (the run's: 0.01)")
    assert len(refused.output.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == files
    resumed = run("train", stats_build, "--run-dir", run_dir, "--resume", "--batch-size", "8", "--lr", "0.01",
                  "--epochs", "3", "--log-every", "2", "--max-steps", "9")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed with epochs 2 -> 3, log_every 1 -> 2, max_steps 0 -> 9" in resumed.output
    ckpt = load_checkpoint(run_dir)
    assert ckpt["step"] == 9 and (ckpt["config"]["epochs"], ckpt["config"]["log_every"]) == (3, 2)
    assert ckpt["config"]["bias_init"] == "caffe" and ckpt["config"]["loader_workers"] == 1  # the run's, not typed
    assert json.loads((run_dir / "config.json").read_text()) == ckpt["config"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = [r for r in rows if r["kind"] == "resume"]
    assert len(history) == 1 and (history[0]["epoch"], history[0]["step"]) == (2, 8)
    assert history[0]["changed"] == {"epochs": [2, 3], "log_every": [1, 2], "max_steps": [0, 9]}


def test_a_library_resume_compares_the_fields_set_away_from_the_defaults(uninterrupted, stats_build):
    """Without `given`, train() compares the fields a caller set (those not at their
    default); the run's own values need not be repeated."""
    with pytest.raises(DataError, match=r"1 given option\(s\) differ: --momentum 0.5 \(the run's: 0.9\)\. "):
        train(stats_build, uninterrupted, TrainConfig(momentum=0.5, epochs=3), resume=True, progress=False)


def test_stats_of_another_build_are_refused(stats_build, photo_build_raw, tmp_path):
    out = tmp_path / "raw"
    shutil.copytree(photo_build_raw, out)
    shutil.copy(stats_build / "stats.npz", out / "stats.npz")
    assert_usage_error(run("train", out, "--run-dir", tmp_path / "r", "--backend", "torch"), "build")


def test_evaluate_refuses_another_class_list(uninterrupted, tmp_path):
    from alexprep.imagenet_prep.build import BuildConfig, build_shards
    from alexprep.imagenet_prep.sample_data import write_photo_tree

    src = tmp_path / "src"
    write_photo_tree(src, classes=2, train_per_class=2, val_per_class=1)
    build_shards(src, tmp_path / "out", BuildConfig(workers=1))
    assert_usage_error(run("evaluate", uninterrupted, tmp_path / "out", "--backend", "torch"), "knows 4 classes")


def test_evaluate_normalizes_as_the_run_did(uninterrupted, stats_build, tmp_path, monkeypatch):
    """A run trained with normalize="channel" is evaluated on channel-normalized inputs."""
    from alexprep.model import inference

    ckpt = load_checkpoint(uninterrupted)
    ckpt["config"]["normalize"] = "channel"
    path = tmp_path / "checkpoint-e002-s0000008.pt"
    torch.save(ckpt, path)
    asked = []
    real = inference.eval_loader
    monkeypatch.setattr(inference, "eval_loader", lambda *a, **k: asked.append(k["normalize"]) or real(*a, **k))
    inference.evaluate_checkpoint(path, stats_build, crops=(1,), backend="torch")
    assert asked == ["channel"]


def test_damaged_shards_are_named_before_or_during_training(stats_build, tmp_path):
    """A shard whose bytes changed after its build (size and Arrow structure intact):
    --verify-shards refuses to start, naming it; without it the run goes on, and every
    image that did not decode is counted in the epoch's metrics and the summary."""
    from alexprep.imagenet_prep.shards import read_split

    out = tmp_path / "out"
    shutil.copytree(stats_build, out)
    index = read_split(out, "train")
    path = index.shard_path(index.shards[0])
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    data = bytearray(path.read_bytes())
    at = data.index(table.column("image")[0].as_py()["bytes"])
    data[at:at + 2] = b"\x00\x00"  # row 0 loses its JPEG start marker
    path.write_bytes(bytes(data))
    del table
    result = run("train", out, "--run-dir", tmp_path / "checked", "--backend", "torch", "--verify-shards")
    assert_usage_error(result, path.name)
    assert "checksum" in result.output
    config = TrainConfig(**{**FAST.to_json(), "epochs": 1})
    lines = []
    final = train(out, tmp_path / "run", config, progress=False, log=lines.append)
    epoch = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"kind": "epoch"' in l][0]
    # the damaged image is in the epoch unless the order dropped it (32 images, 4 batches of 8: none dropped)
    assert epoch["decode_failures"] == 1 and final["decode_failures"] == 1
    assert any(f"{path.name} row 0" in line for line in lines)


# ---------------------------------------------------------------------------- every option reaches its field
# One row per parameter that `alexprep train` declares: arguments that set it to something
# other than its default, where the value must arrive (a TrainConfig field, or a keyword
# of train(): "root", "run_dir", "resume", "cache_dir", "cache_limit") and the value. A new
# option without a row fails test_every_train_option_reaches_its_field.
TRAIN_OPTIONS = {
    "shards": (["OTHER"], "root", "OTHER"),  # the argument; the base invocation gives "OUT"
    "run_dir": (["--run-dir", "elsewhere"], "run_dir", Path("elsewhere")),
    "resume": (["--resume"], "resume", True),
    "epochs": (["--epochs", "7"], "epochs", 7),
    "batch_size": (["--batch-size", "64"], "batch_size", 64),
    "lr": (["--lr", "0.02"], "lr", 0.02),
    "momentum": (["--momentum", "0.8"], "momentum", 0.8),
    "weight_decay": (["--weight-decay", "0.001"], "weight_decay", 0.001),
    "decay_biases": (["--decay-biases"], "decay_biases", True),
    "bias_lr_mult": (["--bias-lr-mult", "2"], "bias_lr_mult", 2.0),
    "patience": (["--patience", "5"], "patience", 5),
    "max_drops": (["--max-drops", "1"], "max_drops", 1),
    "plateau_threshold": (["--plateau-threshold", "0.05"], "plateau_threshold", 0.05),
    "milestones": (["--milestones", "30,60"], "milestones", (30, 60)),
    "seed": (["--seed", "7"], "seed", 7),
    "order": (["--order", "quasi"], "order", "quasi"),
    "lighting_std": (["--lighting-std", "0.2"], "lighting_std", 0.2),
    "backend": (["--backend", "torch"], "backend", "torch"),
    "decoder": (["--decoder", "pil"], "decoder", "pil"),
    "device": (["--device", "cuda:1"], "devices", ("cuda:1",)),
    "devices": (["--devices", "cpu,cuda:0"], "devices", ("cpu", "cuda:0")),
    "precision": (["--precision", "bf16"], "precision", "bf16"),
    "channels_last": (["--channels-last"], "channels_last", True),
    "compile": (["--compile"], "compile", True),
    "deterministic": (["--deterministic"], "deterministic", True),
    "bias_init": (["--bias-init", "caffe"], "bias_init", "caffe"),
    "lrn": (["--lrn", "paper"], "lrn", "paper"),
    "final_crops": (["--final-crops", "1"], "final_crops", 1),
    "checkpoint_minutes": (["--checkpoint-minutes", "5"], "checkpoint_minutes", 5.0),
    "keep_last": (["--keep-last", "4"], "keep_last", 4),
    "log_every": (["--log-every", "7"], "log_every", 7),
    "max_steps": (["--max-steps", "9"], "max_steps", 9),
    "loader_workers": (["--workers", "3"], "loader_workers", 3),
    "tensorboard": (["--tensorboard"], "tensorboard", True),
    "verify_shards": (["--verify-shards"], "verify_shards", True),
    "cache_dir": (["--cache-dir", "cache"], "cache_dir", Path("cache")),
    "cache_limit": (["--cache-limit", "2G"], "cache_limit", 2 * 10**9),
}
CALL_KEYWORDS = ("root", "run_dir", "resume", "cache_dir", "cache_limit")


def _train_call(monkeypatch, args: list[str]) -> dict:
    """What `alexprep train ARGS` hands the library: TrainConfig's fields and train()'s
    other arguments in one dict (train() itself replaced, so nothing runs)."""
    import alexprep.model.train as train_module

    seen = {}

    def fake_train(root, run_dir, config, **kwargs):
        seen.update({f: getattr(config, f) for f in TrainConfig.__dataclass_fields__})
        seen["given"] = kwargs.pop("given")  # what --resume would compare: not a value of its own
        seen.update(root=root, run_dir=run_dir, resume=kwargs.pop("resume", False), **kwargs)
        return {}

    monkeypatch.setattr(train_module, "train", fake_train)
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 0, result.output
    return seen


def test_the_option_table_rows_are_real_fields():
    fields = set(TrainConfig.__dataclass_fields__) | set(CALL_KEYWORDS)
    assert {target for _, target, _ in TRAIN_OPTIONS.values()} <= fields


@pytest.mark.parametrize("name", [p.name for p in train_command.params])
def test_every_train_option_reaches_its_field(name, monkeypatch):
    """Each option, set alone, changes its own field to its value and nothing else."""
    assert name in TRAIN_OPTIONS, f"`alexprep train` declares {name!r}: add its row to TRAIN_OPTIONS"
    args, target, value = TRAIN_OPTIONS[name]
    base = ["OUT", "--run-dir", "run"]
    baseline = _train_call(monkeypatch, base)
    assert baseline[target] != value, f"{name}: the row's value is the default; pick another"
    if name == "shards":
        got = _train_call(monkeypatch, args + base[1:])
    else:
        got = _train_call(monkeypatch, base + args)
    assert got[target] == value and type(got[target]) is type(value), (name, got[target])
    baseline_given, given = baseline.pop("given"), got.pop("given")
    changed = {k for k in baseline if got.get(k) != baseline[k]}
    assert changed == {target}, f"{name} also changed {changed - {target}}"
    # Typed on the command line, a TrainConfig field is one that --resume compares.
    assert baseline_given == set() and given == ({target} & set(TrainConfig.__dataclass_fields__))


def test_train_options_are_made_from_the_fields_metadata():
    """A TrainConfig field with a CLI name is an option of that name with the field's help
    and default (typed once, in model/config.py); the others are not options."""
    from alexprep.model.config import FIELDS, option_name

    params = {p.name: p for p in train_command.params}
    for name, field in FIELDS.items():
        if option_name(name) is None:  # devices: written by hand, --device and --devices make it
            assert name not in params or name == "devices", name
            continue
        option = params[name]
        assert option.opts == [option_name(name)] and option.help.startswith(field.metadata["help"]), name
        default = getattr(TrainConfig(), name)
        assert option.default == (",".join(map(str, default)) if isinstance(default, tuple) else default), name
    assert [p for p in params if p.startswith("compile") or p == "loader_workers"] == ["compile", "loader_workers"]


def test_a_row_torn_by_a_kill_neither_breaks_nor_joins_the_next(tmp_path):
    """A kill mid-write leaves half a metrics.jsonl line; the resumed run's rows follow on
    their own lines and every reader skips the torn one."""
    from alexprep.model.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write("step", step=1)
    with open(log.path, "a") as f:
        f.write('{"kind": "step", "ste')  # the kill
    log.write("epoch", epoch=1)
    assert [r["kind"] for r in log.rows()] == ["step", "epoch"]
    assert log.path.read_text().splitlines()[-1].startswith('{"kind": "epoch"')



def test_the_loaders_resolve_the_runs_auto_backend(stats_build):
    """TrainConfig's backend="auto" goes to the loaders as it is: they resolve it (loaders.pick_backend)."""
    from alexprep.imagenet_prep.loaders import pick_backend

    train, val = make_loaders(stats_build, TrainConfig(batch_size=8, loader_workers=0), Ranks(0, 1), torch.device("cpu"))
    try:
        assert train.config.backend == val.config.backend == pick_backend("auto") in ("dali", "torch")
    finally:
        train.close()
        val.close()
