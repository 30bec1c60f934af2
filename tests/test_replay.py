"""`alexprep replay` and the fingerprints: any batch computed directly equals what the
trainer fed (both backends, after a resume, at another world size), and the fingerprints
of a resumed run, an uninterrupted one and `alexprep fingerprint` agree."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from alexprep.cli.main import cli
from alexprep.imagenet_prep import augment
from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.fingerprint import build_fingerprints, build_identity, epoch_fingerprint
from alexprep.imagenet_prep.loaders import train_loader
from alexprep.imagenet_prep.replay import batch_tensors, denormalised
from alexprep.imagenet_prep.run_plan import RunPlan
from alexprep.imagenet_prep.samples import SplitSamples
from alexprep.imagenet_prep.shards import read_split
from alexprep.imagenet_prep.stats import compute_stats, write_stats
from alexprep.imagenet_prep.transform import ImageSpec, decode
from alexprep.model import train as train_module
from alexprep.model.config import TrainConfig
from alexprep.model.metrics import MetricsLog
from alexprep.model.replay import open_run, run_tensors
from alexprep.model.train import Ranks, make_loaders, train

# 32 training images in batches of 16: 2 steps an epoch.
RUN = TrainConfig(batch_size=16, epochs=2, backend="torch", final_crops=0, log_every=1, bias_init="caffe",
                  loader_workers=1)
QUIET = dict(progress=False, log=lambda *a: None)


def test_any_batch_of_an_imagenet_sized_plan_in_under_2_s():
    rows = np.full(1252, 1024, np.int64)
    rows[-1] = 1_281_167 - 1251 * 1024  # ImageNet's training split in 1,252 shards
    plan = RunPlan(rows, global_batch=256, seed=7)
    assert plan.samples == 1_281_167 and plan.batches == 1_281_167 // 256
    for epoch, number, rank in ((0, 0, None), (89, plan.batches - 1, 3), (41, 2_000, 1)):
        start = time.perf_counter()
        index = plan.batch_index(epoch, number, rank, world_size=4)
        draws = plan.draws(epoch, index)
        assert time.perf_counter() - start < 2.0
        # What a loader of rank r of 4 (batch 64) takes as its batch `number`: augment's rank split.
        order = augment.epoch_order(rows, 7, epoch)
        mine = augment.rank_split(order, rank or 0, 4) if rank is not None else order
        per = 64 if rank is not None else 256
        assert np.array_equal(index, mine[number * per:(number + 1) * per])
        assert np.array_equal(draws.offset_x, augment.draw(7, epoch, index).offset_x)
    with pytest.raises(Exception, match="batch 5004 does not exist"):
        plan.batch_index(0, 5004)


def test_the_plan_is_the_trainers_loaders_plan_at_every_world_size(stats_build, closes):
    """The trainer's own loaders (make_loaders) at 1 and 2 ranks take, batch by batch, the
    samples and draws the plan computes; the 2 ranks' batches interleave into the global one."""
    config = TrainConfig(batch_size=8, backend="torch", loader_workers=0)
    for world in (1, 2):
        for rank in range(world):
            loader, val = make_loaders(stats_build, config, Ranks(rank, world), torch.device("cpu"))
            closes(loader), closes(val)
            plan = RunPlan.of_loader(loader)
            assert plan.global_batch == 8 and plan.batches == len(loader) == 4
            for epoch in (0, 3):
                for number in range(len(loader)):
                    batch = loader.plan(epoch)[number]
                    index = plan.batch_index(epoch, number, rank if world > 1 else None, world)
                    assert np.array_equal(batch.index, index)
                    assert np.array_equal(batch.draws.alpha, plan.draws(epoch, index).alpha)
                    assert np.array_equal(plan.batch_index(epoch, number)[rank::world], index)


def test_replayed_tensors_equal_the_tensors_of_another_world_size(stats_build, closes):
    """JPEG shards, torch backend: rank 1 of 2's batches, as its loader (built by the trainer's
    make_loaders) hands them out in epoch 1, equal replay's for that rank, and the global
    batch replayed at world size 1 holds them as every other row."""
    loader, val = make_loaders(stats_build, TrainConfig(batch_size=16, backend="torch", loader_workers=1),
                               Ranks(1, 2), torch.device("cpu"))
    closes(loader), closes(val)
    loader.set_epoch(1)
    fed = [images.clone() for images, _ in loader]
    for number, images in enumerate(fed):
        mine = batch_tensors(stats_build, 1, number, batch_size=8, rank=1, world_size=2, seed=0, backend="torch")
        assert torch.equal(mine.images, images)
        whole = batch_tensors(stats_build, 1, number, batch_size=16, seed=0, backend="torch")
        assert torch.equal(whole.images[1::2], images)


def _recording(monkeypatch) -> list[torch.Tensor]:
    """Every batch a training step receives, in order (a hook on the trainer's step)."""
    seen = []
    real = train_module.train_step

    def step(run, images, labels):
        seen.append(images.detach().clone())
        return real(run, images, labels)

    monkeypatch.setattr(train_module, "train_step", step)
    return seen


def _epoch_fingerprints(run_dir: Path) -> list[str]:
    rows = {r["epoch"]: r["fingerprint"] for r in MetricsLog(run_dir / "metrics.jsonl").rows("epoch")}
    final = json.loads((run_dir / "final.json").read_text())["fingerprints"]
    assert final == [rows[e] for e in sorted(rows)]
    return final


def _fingerprint_cli(build: Path, *args: str) -> list[str]:
    result = CliRunner().invoke(cli, ["fingerprint", str(build), "--batch-size", "16", "--epochs", "2", "--json",
                                      *args])
    assert result.exit_code == 0, result.output
    return [row["fingerprint"] for row in json.loads(result.output)["epochs"]]


def _check_replay(run_dir: Path, seen: list[torch.Tensor], backends: tuple) -> None:
    """Batch i of the run's one epoch, replayed, equals what step i received."""
    assert len(seen) == 2
    for i, images in enumerate(seen):
        run = open_run(run_dir, 0, i)
        for backend in backends:
            assert torch.equal(run_tensors(run, 0, i, backend).images, images), (i, backend)


def test_a_resumed_torch_run_is_replayed_exactly_and_fingerprinted_as_an_uninterrupted_dali_run(
        stats_build_raw, tmp_path, monkeypatch):
    """Raw shards, one epoch of 2 steps. The torch run stops after one step and resumes; the
    DALI run does not stop. Each batch replayed equals what the trainer received (DALI's
    replayed by DALI and by torch: the same on raw shards); both runs' fingerprints equal
    `alexprep fingerprint`'s."""
    seen = _recording(monkeypatch)
    resumed, one_epoch = tmp_path / "resumed", {**RUN.to_json(), "epochs": 1}
    stopped = train(stats_build_raw, resumed, TrainConfig(**{**one_epoch, "max_steps": 1}), **QUIET)
    assert stopped["stopped"] == "max_steps=1"
    train(stats_build_raw, resumed, TrainConfig(), resume=True, **QUIET)
    runs = MetricsLog(resumed / "metrics.jsonl").rows("run")
    assert [(r["epoch"], r["batch"]) for r in runs] == [(0, 0), (0, 1)]
    _check_replay(resumed, seen, ("torch",))
    expected = _fingerprint_cli(stats_build_raw)
    assert _epoch_fingerprints(resumed) == expected[:1] and expected[0] != expected[1]
    if not _have_dali():
        pytest.skip("NVIDIA DALI is not installed: the torch half ran")
    seen.clear()
    whole = tmp_path / "whole"
    train(stats_build_raw, whole, TrainConfig(**{**one_epoch, "backend": "dali"}), **QUIET)
    _check_replay(whole, seen, ("dali", "torch"))
    assert _epoch_fingerprints(whole) == expected[:1]


def _have_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def test_fingerprints_are_the_builds_and_the_plans(stats_build, photo_tree, tmp_path):
    """Equal at every world size dividing the batch; another seed, batch or order differs;
    a build of other images, with the same options and class list (the same build id),
    never agrees."""
    one = _fingerprint_cli(stats_build)
    assert _fingerprint_cli(stats_build, "--world-size", "2") == one == _fingerprint_cli(stats_build, "--world-size", "4")
    for other in (["--seed", "1"], ["--order", "quasi"], ["--lighting-std", "0"]):
        assert not set(_fingerprint_cli(stats_build, *other)) & set(one), other
    tree = tmp_path / "tree"
    shutil.copytree(photo_tree, tree)
    first = sorted((tree / "train").rglob("*.JPEG"))[0]
    with Image.open(first) as img:
        img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(first)  # one image of 44 differs
    other = tmp_path / "other"
    build_shards(tree, other, BuildConfig(spec=ImageSpec(), shard_size=6, workers=2))
    assert read_split(other, "train").build_id == read_split(stats_build, "train").build_id
    assert not set(build_fingerprints(other, 2, batch_size=16, seed=0)["epochs"][0].values()) & set(one)
    text = CliRunner().invoke(cli, ["fingerprint", str(stats_build), "--batch-size", "16", "--epochs", "2"])
    assert text.exit_code == 0 and text.output.splitlines() == [f"epoch {e}: {f}" for e, f in enumerate(one)]
    for args, message in ((["--world-size", "3"], "batch size 128 is not divisible by the 3 ranks"),
                          (["--batch-size", "64"], "fewer than one batch of 64")):
        bad = CliRunner().invoke(cli, ["fingerprint", str(stats_build), "--epochs", "1", *args])
        assert bad.exit_code == 2 and message in bad.output and len(bad.output.strip().splitlines()) == 1


def test_replay_cli_json_grid_and_bad_input(stats_build_raw, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(RUN.to_json()))
    MetricsLog(run_dir / "metrics.jsonl").write("run", epoch=0, batch=0, world_size=2, backend="torch",
                                                build_id=read_split(stats_build_raw, "train").build_id,
                                                build=str(stats_build_raw))
    grid = tmp_path / "grid.png"
    result = CliRunner().invoke(cli, ["replay", str(run_dir), "--epoch", "5", "--batch", "1", "--rank", "1",
                                      "-o", str(grid)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert (out["epoch"], out["batch"], out["rank"], out["world_size"]) == (5, 1, 1, 2)
    rows = out["samples"]
    samples = SplitSamples(read_split(stats_build_raw, "train"))
    plan = RunPlan(samples.shard_rows, 16, 0)
    assert [r["sample"] for r in rows] == plan.batch_index(5, 1, 1, 2).tolist()
    for r in rows:  # keys name the class folder the label is
        assert r["key"].split("/")[-2] == r["wnid"] and r["label"] == samples.labels[r["sample"]]
        assert 0 <= min(r["crop_offset"]) <= max(r["crop_offset"]) <= 32 and len(r["lighting_alpha"]) == 3
    with Image.open(grid) as picture:
        assert picture.size == (3 * 224, 3 * (224 + 14))  # 8 tiles in 3 columns, captions below
    for args, message in (
            (["--epoch", "0", "--batch", "2"], "batch 2 does not exist: an epoch has batches 0..1"),
            (["--epoch", "0", "--batch", "0", "--rank", "2"], "--rank 2: that part of the run had 2 rank(s)"),
            (["--epoch", "0", "--batch", "0", "--build", str(tmp_path)], "has no train/ split")):
        result = CliRunner().invoke(cli, ["replay", str(run_dir), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, ["replay", str(tmp_path), "--epoch", "0", "--batch", "0"])
    assert result.exit_code == 2 and "not a training run folder" in result.output
    (run_dir / "metrics.jsonl").unlink()  # a run of an alexprep before replay
    result = CliRunner().invoke(cli, ["replay", str(run_dir), "--epoch", "0", "--batch", "0"])
    assert result.exit_code == 2 and "has no record of the run's start" in result.output


def test_the_grid_shows_the_stored_pixels_when_lighting_is_off(stats_build_raw):
    """Denormalised, a batch without lighting is each image's crop, flipped where drawn, to
    the level: the mean image added back is the one subtracted, at the same window."""
    fed = batch_tensors(stats_build_raw, 2, 1, batch_size=8, seed=3, lighting_std=0.0, backend="torch")
    samples = SplitSamples(read_split(stats_build_raw, "train"))
    spec = samples.index.spec
    for tile, sample, (ox, oy, flip) in zip(denormalised(fed), fed.batch.index, fed.batch.windows[:, 0]):
        crop = decode(samples.view(int(sample)), spec)[oy:oy + 224, ox:ox + 224]
        assert np.array_equal(tile, crop[:, ::-1] if flip else crop)


RECORDING_TRAIN = """import json, os, sys
import torch
from alexprep.model import train as train_module
from alexprep.model.config import TrainConfig
seen, real = [], train_module.train_step
def step(run, images, labels):
    seen.append(images.detach().clone())
    return real(run, images, labels)
train_module.train_step = step
build, run_dir, config, resume = sys.argv[1], sys.argv[2], TrainConfig.from_json(json.loads(sys.argv[3])), sys.argv[4]
train_module.train(build, run_dir, config, resume=resume == "resume", progress=False, log=lambda *a: None)
torch.save(seen, os.path.join(run_dir, f"seen-{resume}-{os.environ.get('RANK', '0')}.pt"))
"""


def test_a_run_started_on_two_ranks_and_resumed_on_one_is_replayed_exactly(stats_build_raw, tmp_path):
    """torchrun, 2 ranks of batch 8, stopped after step 1; resumed on 1 rank of 16. Batch 0
    replayed for each rank (the world size its run row records) and batch 1 (all ranks) equal
    what each process's steps received; the fingerprints equal `alexprep fingerprint`'s."""
    script, run_dir = tmp_path / "run.py", tmp_path / "run"
    script.write_text(RECORDING_TRAIN)
    config = json.dumps({**RUN.to_json(), "epochs": 1, "max_steps": 1, "dropout": 0.0})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(stats_build_raw), str(run_dir), config, "start"], capture_output=True,
                         text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    config = json.dumps({**json.loads(config), "max_steps": 0})
    one = subprocess.run([sys.executable, str(script), str(stats_build_raw), str(run_dir), config, "resume"],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    runs = MetricsLog(run_dir / "metrics.jsonl").rows("run")
    assert [(r["epoch"], r["batch"], r["world_size"]) for r in runs] == [(0, 0, 2), (0, 1, 1)]
    for rank in (0, 1):
        (images,) = torch.load(run_dir / f"seen-start-{rank}.pt", weights_only=True)
        assert images.shape[0] == 8
        assert torch.equal(run_tensors(open_run(run_dir, 0, 0, rank=rank), 0, 0).images, images)
        assert torch.equal(run_tensors(open_run(run_dir, 0, 0), 0, 0).images[rank::2], images)
    (images,) = torch.load(run_dir / "seen-resume-0.pt", weights_only=True)
    assert torch.equal(run_tensors(open_run(run_dir, 0, 1), 0, 1).images, images)
    with pytest.raises(Exception, match="--rank 1: that part of the run had 1 rank"):
        open_run(run_dir, 0, 1, rank=1)
    assert _epoch_fingerprints(run_dir) == _fingerprint_cli(stats_build_raw)[:1]


def test_the_rrc_plan_is_the_rrc_loaders_plan(photo_tree, tmp_path, closes):
    """recipe="rrc" on a keep-aspect build: the plan's windows are the loader's, and the
    fingerprint command's are those of the loader's plan."""
    out = tmp_path / "out"
    build_shards(photo_tree, out, BuildConfig(spec=ImageSpec(resize="keep-aspect"), shard_size=6, workers=2))
    write_stats(out, compute_stats(out))
    loader = closes(train_loader(out, batch_size=8, device="cpu", seed=4, recipe="rrc", backend="torch", workers=0))
    plan = RunPlan.of_loader(loader)
    for number in range(len(loader)):
        batch = loader.plan(2)[number]
        assert np.array_equal(plan.draws(2, plan.batch_index(2, number)).windows, batch.windows[:, 0])
    result = CliRunner().invoke(cli, ["fingerprint", str(out), "--batch-size", "8", "--epochs", "3", "--seed", "4",
                                      "--recipe", "rrc", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["epochs"][2]["fingerprint"] == epoch_fingerprint(
        plan, *build_identity(loader.index), 2)
    bad = CliRunner().invoke(cli, ["fingerprint", str(out), "--epochs", "1", "--batch-size", "8"])
    assert bad.exit_code == 2 and "use --recipe rrc" in bad.output
