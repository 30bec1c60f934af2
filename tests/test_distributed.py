"""Ranks, devices and collectives: what only a multi-GPU run would hit, tested where the
mechanism shows on the CPU (the backend choice, device lists, flags, RNG states, where
each collective's tensor lives)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from alexprep.imagenet_prep.batches import BatchStream
from alexprep.imagenet_prep.errors import DataError
from alexprep.model import distributed
from alexprep.model.checkpoint import load_checkpoint
from alexprep.model.config import TrainConfig
from alexprep.model.distributed import Ranks, process_group_backend, resolve_devices
from alexprep.model.evaluate import evaluate
from alexprep.model.train import configure_cuda, dropout_seed, rng_state

PACKAGE = Path(__file__).resolve().parents[1]


def test_gpu_runs_get_a_cpu_backend_for_the_counters():
    assert process_group_backend(("cuda:0",), cuda_available=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(("auto",), cuda_available=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(("cpu",), cuda_available=True) == "gloo"
    assert process_group_backend(("auto",), cuda_available=False) == "gloo"


def test_every_collective_goes_through_one_cpu_helper():
    """dist.all_reduce on a CPU tensor fails under plain NCCL: only distributed.py may call
    collectives, and its tensors are CPU tensors."""
    offenders = []
    for path in PACKAGE.glob("*/*.py"):
        if path.parts[-2] in ("model", "imagenet_prep", "cli") and path.name != "distributed.py":
            text = path.read_text()
            offenders += [f"{path.name}: {c}" for c in ("dist.all_reduce", "dist.all_gather", "dist.broadcast",
                                                        "dist.reduce", "dist.barrier") if c in text]
    assert offenders == []


def test_collectives_carry_cpu_tensors(monkeypatch, stats_build_raw):
    from alexprep.imagenet_prep.loaders import eval_loader
    from alexprep.model.alexnet import AlexNet, AlexNetConfig

    loader = eval_loader(stats_build_raw, batch_size=6, device="cpu", backend="torch", workers=0)
    seen = []

    class Initialized:  # torch.distributed as distributed.py sees it, in a 1-rank group
        ReduceOp = dist.ReduceOp
        is_available = staticmethod(lambda: True)
        is_initialized = staticmethod(lambda: True)
        all_reduce = staticmethod(lambda t, op=None: seen.append((t.device.type, op)))

    monkeypatch.setattr(distributed, "dist", Initialized)
    assert distributed.all_reduce([1, 2]) == [1.0, 2.0]
    assert distributed.any_rank(False) is False
    with loader:
        result = evaluate(AlexNet(AlexNetConfig(num_classes=4)), loader)  # sums its counts over ranks
    assert result.count == 12
    assert [d for d, _ in seen] == ["cpu", "cpu", "cpu"]
    assert seen[1][1] == dist.ReduceOp.MAX


def test_device_lists_under_torchrun():
    two_per_machine = Ranks(rank=1, world_size=2, local_rank=1, local_world_size=2)
    with pytest.raises(DataError, match="every rank on one GPU"):
        resolve_devices(("cuda:0",), two_per_machine)
    with pytest.raises(DataError, match="DDP cannot wrap a module that spans CPU and GPU"):
        resolve_devices(("cuda", "cpu"), Ranks(rank=0, world_size=2))
    assert resolve_devices(("auto",), two_per_machine) == (torch.device("cpu"),)  # no GPU here
    with pytest.raises(DataError, match="cpu' or 'cuda:N'"):
        resolve_devices(("tpu:0",))


def test_each_rank_gets_its_own_dropout_masks():
    seeds = [dropout_seed(0, r) for r in range(4)]
    assert len(set(seeds)) == 4 and seeds == [dropout_seed(0, r) for r in range(4)]
    masks = []
    for s in seeds[:2]:
        torch.manual_seed(s)
        masks.append(torch.nn.functional.dropout(torch.ones(128, 64), 0.5))
    assert not torch.equal(masks[0], masks[1])


def test_checkpoint_rng_holds_only_the_models_gpus(monkeypatch):
    """An 8-GPU machine's rank on cuda:3 saves cuda:3's generator alone, so that a resume
    on a 1-GPU machine restores it there instead of indexing GPUs it lacks."""
    asked = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: asked.append(str(d)) or torch.zeros(4, dtype=torch.uint8))
    state = rng_state((torch.device("cuda:3"),))
    assert asked == ["cuda:3"] and len(state["cuda"]) == 1
    assert "cuda" not in rng_state((torch.device("cpu"),))


def test_fp32_turns_tf32_off_on_gpus():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cudnn.allow_tf32 = True
        configure_cuda("fp32", (torch.device("cuda:0"),))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
        configure_cuda("tf32", (torch.device("cuda:0"),))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


class _ListedBatches(BatchStream):
    """A backend whose batches come back as pin_memory returns them in some torch releases:
    (epoch, number) as a list. It implements the two hooks every backend implements and
    hands out each planned batch's labels (`skip`: it loses the batch after that many)."""

    def __init__(self, loader, skip: int | None = None):
        super().__init__(loader)
        self.skip, self.produced = skip, 0

    def _restart(self, feed):
        self.feed = feed

    def _produce(self):
        batch = next(self.feed)
        self.produced += 1
        if self.produced == self.skip:
            batch = next(self.feed)  # a batch lost on the way
        return [batch.epoch, batch.number], torch.zeros(len(batch), 1), torch.from_numpy(batch.labels)


def test_batches_are_checked_by_value_not_by_type(stats_build_raw):
    """Run through its public `run(plan, start)`, on a real loader's plans: listed
    (epoch, number) pairs are accepted, epoch after epoch, and a batch out of place is not."""
    from alexprep.imagenet_prep.loaders import train_loader

    with train_loader(stats_build_raw, batch_size=8, device="cpu", seed=0, backend="torch", workers=0) as loader:
        stream = _ListedBatches(loader)
        for epoch in range(2):  # the second continues the stream
            plan = loader.plan(epoch)
            labels = [y for _, y in stream.run(plan, 0)]
            assert len(labels) == len(plan) == 4
            assert all(np.array_equal(y.numpy(), batch.labels) for y, batch in zip(labels, plan))
        with pytest.raises(RuntimeError, match="returned batch 2 of epoch 0, expected 1 of 0"):
            list(_ListedBatches(loader, skip=2).run(loader.plan(0), 0))


def test_sigterm_on_one_rank_stops_both_at_one_step_with_a_checkpoint(stats_build, tmp_path):
    """Rank 1 alone receives SIGTERM during its 6th step (epoch 2): both ranks agree to stop
    after that step, rank 0 writes the checkpoint, both exit cleanly. The run went through
    an epoch's validation (a collective) first, and each rank's dropout RNG is saved."""
    config = {**TrainConfig(batch_size=8, epochs=2, backend="torch", final_crops=0, log_every=1,
                            bias_init="caffe", loader_workers=1).to_json()}
    script = tmp_path / "run.py"
    script.write_text(
        "import json, os, signal, sys\n"
        "from alexprep.model import train as t\n"
        "from alexprep.model.config import TrainConfig\n"
        "step = t.train_step\ncalls = [0]\n"
        "def killing_step(*a):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 6 and os.environ['RANK'] == '1':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return step(*a)\n"
        "t.train_step = killing_step\n"
        "print(json.dumps(t.train(sys.argv[1], sys.argv[2], TrainConfig.from_json(json.loads(sys.argv[3])),"
        " progress=False, log=lambda *a: None)))\n")
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(stats_build), str(run_dir), json.dumps(config)], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(outcomes) == 2 and all(o["step"] == 6 and o["stopped"] for o in outcomes)
    ckpt = load_checkpoint(run_dir)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 2, 6)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 1 and 0 <= epochs[0]["val_top1_error"] <= 1
