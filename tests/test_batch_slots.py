"""The torch backend's batch hand-off (batch_slots.py): a ring of shared-memory slots made
once, the batches equal to the per-batch tensors' they replace, slots a caller keeps never
overwritten, and nothing left in /dev/shm or mapped after close or a worker's crash."""
from __future__ import annotations

import gc
import os
import signal
from pathlib import Path

import pytest
import torch

from alexprep.imagenet_prep.batch_slots import BatchSlots
from alexprep.imagenet_prep.loaders import eval_loader, train_loader
from alexprep.imagenet_prep.torch_backend import TorchBackend


def shm_files() -> set[str]:
    return set(os.listdir("/dev/shm")) if Path("/dev/shm").is_dir() else set()


def mapped_shm() -> int:
    """Shared-memory mappings of this process (torch's, unlinked: "/dev/shm/torch_... (deleted)")."""
    return sum("/dev/shm/" in line for line in Path("/proc/self/maps").read_text().splitlines())


def ring_of(loader) -> BatchSlots:
    return loader._backend._ring


@pytest.fixture
def fresh_handoff(monkeypatch):
    """Loaders made inside get today's hand-off: a fresh shared tensor per batch."""
    def make(factory, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(TorchBackend, "handoff", "fresh")
            return factory(*args, **kwargs)
    return make


def test_take_turns_and_replaces_a_slot_still_held():
    ring = BatchSlots(3, (2, 1, 3, 4, 4), torch.float32, torch.device("cpu"))
    first = [ring.take() for _ in range(3)]
    assert [n for n, _ in first] == [0, 1, 2] and all(t is None for _, t in first)
    kept = ring.batch(0, 1)  # a caller keeps a view of slot 0
    kept.fill_(7)
    number, moved = ring.take()
    assert number == 0 and moved is ring.slots[0] and ring.replaced == 1
    assert moved.data_ptr() != kept.data_ptr() and moved.is_shared()
    moved.fill_(1)
    assert torch.all(kept == 7)  # the caller's batch is not written again
    del kept
    assert ring.take()[0] == 1 and ring.replaced == 1  # slot 1 is free: no new memory
    ring.close()


def test_train_batches_come_from_the_ring_and_equal_fresh_tensors(stats_build_raw, closes, fresh_handoff):
    kwargs = dict(batch_size=4, device="cpu", backend="torch", workers=2, seed=3)
    loader = closes(train_loader(stats_build_raw, **kwargs))
    before = closes(fresh_handoff(train_loader, stats_build_raw, **kwargs))
    ring = ring_of(loader)
    assert ring is not None and ring_of(before) is None and len(ring) == 2 * 2 + 2
    slots = {slot.data_ptr() for slot in ring.slots}
    for epoch in range(2):
        loader.set_epoch(epoch), before.set_epoch(epoch)
        for (x, y), (x0, y0) in zip(loader, before, strict=True):
            assert x.data_ptr() in slots  # the trainer is handed the slot: no copy, no new tensor
            assert torch.equal(x, x0) and torch.equal(y, y0)
            del x, y
    assert ring.replaced == 0  # a trainer that drops each batch never makes the ring grow


def test_a_caller_that_keeps_every_batch_gets_them_unchanged(stats_build, closes):
    loader = closes(eval_loader(stats_build, batch_size=2, device="cpu", split="train", backend="torch",
                                workers=1, prefetch=1))
    cloned = [(x.clone(), y.clone()) for x, y in loader]
    kept = list(loader)  # holds every slot it was handed
    assert len(kept) == len(cloned) > len(ring_of(loader))
    for (x, y), (x0, y0) in zip(kept, cloned):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    assert ring_of(loader).replaced >= len(kept) - len(ring_of(loader))


def test_nothing_left_in_shm_after_close_or_a_killed_worker(stats_build, closes):
    gc.collect()
    files, maps = shm_files(), mapped_shm()
    loader = eval_loader(stats_build, batch_size=2, device="cpu", split="train", backend="torch", workers=2)
    batches = iter(loader)
    next(batches)
    assert mapped_shm() > maps  # the ring is mapped ...
    assert shm_files() == files  # ... and was never a name in /dev/shm
    workers = loader._backend._iterator._workers
    os.kill(workers[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="worker") as raised:
        while next(batches):
            pass
    del batches, raised  # the traceback's frames hold the last batch

    loader.close()
    gc.collect()
    assert shm_files() == files and mapped_shm() == maps
    assert all(not w.is_alive() for w in workers)


def test_a_loader_after_close_unmaps_its_ring(stats_build_raw, closes):
    gc.collect()
    maps = mapped_shm()
    loader = train_loader(stats_build_raw, batch_size=4, device="cpu", seed=0, backend="torch", workers=1)
    for x, _ in loader:
        del x
    loader.close()
    gc.collect()
    assert mapped_shm() == maps


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:recipe='rrc' on")  # a centre-crop build: fine for comparing devices
@pytest.mark.parametrize("recipe", ["paper", "rrc"])
def test_cuda_batches_through_pinned_slots_equal_the_cpu_ones(stats_build_raw, closes, recipe):
    """Real workers writing pinned slots, copied without waiting, the slots reused behind
    their copies' events: two epochs equal the CPU's (raw shards: to float32 rounding; rrc:
    windows cut in the workers, resized on the device, within a level of PIL)."""
    kwargs = dict(batch_size=4, seed=1, backend="torch", workers=2, recipe=recipe)
    gpu = closes(train_loader(stats_build_raw, device="cuda:0", **kwargs))
    cpu = closes(train_loader(stats_build_raw, device="cpu", **kwargs))
    assert gpu._backend.mode == ("canvas" if recipe == "rrc" else "windows")
    ring = ring_of(gpu)
    assert not any(slot.is_pinned() for slot in ring.slots)  # pinned once the workers have forked
    for epoch in range(2):
        gpu.set_epoch(epoch), cpu.set_epoch(epoch)
        for (x, y), (x0, y0) in zip(gpu, cpu, strict=True):
            assert all(slot.is_pinned() for slot in ring.slots)
            assert x.device.type == "cuda" and torch.equal(y.cpu(), y0)
            d = (x.cpu() - x0).abs()
            if recipe == "paper":
                assert d.max() <= 1e-3
            else:  # the device resizes in one batched call: within a level of PIL (a level / std ~ 0.02)
                assert d.max() <= 0.05 and d.mean() <= 0.005
    slot = ring.slots[0]
    gpu.close()
    assert not slot.is_pinned()  # unregistered on close


@pytest.mark.gpu
def test_cuda_evaluation_passes_repin_the_ring_around_new_workers(stats_build_raw, closes):
    """An evaluation pass ends its workers and unpins the ring; the next forks new workers,
    then pins it again: both passes give the same batches."""
    loader = closes(eval_loader(stats_build_raw, batch_size=4, device="cuda:0", split="train", backend="torch",
                                workers=2))
    first = [(x.cpu(), y.cpu()) for x, y in loader]
    assert not ring_of(loader).pinned
    second = [(x.cpu(), y.cpu()) for x, y in loader]
    assert len(first) == len(second) > 0
    for (x, y), (x0, y0) in zip(first, second):
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_ctrl_c_mid_epoch_then_close_leaves_nothing(stats_build_raw):
    gc.collect()
    files, maps = shm_files(), mapped_shm()
    loader = train_loader(stats_build_raw, batch_size=4, device="cpu", seed=0, backend="torch", workers=2)
    workers = []
    with pytest.raises(KeyboardInterrupt) as raised:
        for x, _ in loader:
            workers = workers or list(loader._backend._iterator._workers)
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C while the trainer holds a batch
    del raised, x, _
    loader.close()
    gc.collect()
    for worker in workers:
        worker.join(timeout=10)
    assert len(workers) == 2 and not any(w.is_alive() for w in workers)
    assert shm_files() == files and mapped_shm() == maps
