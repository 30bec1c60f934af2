"""The loaders (loaders.py, batches.py, dali_backend.py, torch_backend.py, render.py).

Outputs are checked against an independent numpy reference written here (`reference`):
the shards' images decoded with pyarrow and PIL directly, windowed, mirrored and lit in
float64 from the statistics. Both backends run on the CPU; DALI tests skip where DALI does
not import, GPU tests where CUDA is absent.
"""
from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.loaders import eval_loader, train_loader
from alexprep.imagenet_prep.shards import read_split
from alexprep.imagenet_prep.stats import DatasetStats
from alexprep.imagenet_prep.torch_backend import have_torchvision

BACKENDS = pytest.mark.parametrize("backend", [pytest.param("dali", marks=pytest.mark.dali), "torch"])

CROP, SIZE, POS = 224, 256, 33


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def raw_out(stats_build_raw) -> Path:
    """Raw shards with stats (read-only: a test that changes it copies it first)."""
    return stats_build_raw


@pytest.fixture(scope="module")
def jpeg_out(stats_build) -> Path:
    """JPEG q95 shards with stats (read-only)."""
    return stats_build


_IMAGES: dict = {}


def split_images(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 256, 256, 3) uint8 and (N,) labels in shard order, read without the loaders."""
    key = (str(out), split)
    if key not in _IMAGES:
        index = read_split(out, split)
        images, labels = [], []
        for shard in index.shards:
            table = pa.ipc.open_stream(pa.memory_map(str(index.shard_path(shard)))).read_all()
            for row in table.to_pylist():
                data = row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"]
                if index.spec.encoding == "raw":
                    images.append(np.frombuffer(data, np.uint8).reshape(SIZE, SIZE, 3))
                else:
                    images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                labels.append(row["label"])
        _IMAGES[key] = (np.stack(images), np.array(labels, np.int64))
    return _IMAGES[key]


def reference(image: np.ndarray, stats: DatasetStats, ox: int, oy: int, flip: bool, alpha=(0.0, 0.0, 0.0),
              normalize: str = "mean-image") -> np.ndarray:
    """The paper's augmentation of one (256, 256, 3) uint8 image, in float64, as (3, 224, 224)."""
    x = image.astype(np.float64)
    shift = stats.eigvecs @ (np.asarray(alpha) * np.sqrt(stats.eigvals))
    if normalize == "mean-image":
        y = x - stats.mean_image + shift
    else:
        y = (x + shift - stats.channel_mean) / stats.channel_std
    y = y[oy:oy + CROP, ox:ox + CROP]
    if flip:
        y = y[:, ::-1]
    return y.transpose(2, 0, 1)


def load_stats(out: Path) -> DatasetStats:
    return DatasetStats.load(out / "stats.npz")


def assert_close(actual: torch.Tensor, expected: np.ndarray, jpeg: bool) -> None:
    d = np.abs(actual.float().cpu().numpy().astype(np.float64) - expected)
    if jpeg:  # PIL and DALI's libjpeg-turbo may round the odd pixel differently
        assert d.max() <= 4 and d.mean() <= 0.05, (d.max(), d.mean())
    else:  # float32 arithmetic against the float64 reference
        assert d.max() <= 1e-3, d.max()


def run(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# ---------------------------------------------------------------------------- train outputs
@BACKENDS
@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_train_batches_equal_the_reference(backend, encoding, raw_out, jpeg_out, closes):
    out = raw_out if encoding == "raw" else jpeg_out
    images, labels = split_images(out, "train")
    stats = load_stats(out)
    loader = closes(train_loader(out, batch_size=8, device="cpu", seed=11, backend=backend,
                                 workers=0 if backend == "torch" else 2))
    plan = loader.plan(0)
    batches = run(loader)
    assert len(batches) == len(loader) == len(images) // 8
    seen = []
    for batch, (x, y) in zip(plan, batches):
        assert x.shape == (8, 3, CROP, CROP) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        np.testing.assert_array_equal(y.numpy(), labels[batch.index])
        d = batch.draws
        for i, sample in enumerate(batch.index):
            expected = reference(images[sample], stats, d.offset_x[i], d.offset_y[i], d.flip[i], d.alpha[i])
            assert_close(x[i], expected, jpeg=encoding == "jpeg")
        seen.extend(batch.index)
    assert len(set(seen)) == len(seen) == len(images)  # 32 = 4 batches of 8: nothing dropped here


def _recover(output: np.ndarray, image: np.ndarray, stats: DatasetStats):
    """(offset_x, offset_y, flip, alpha) of one output, found from its pixels alone: the
    window is where the output's horizontal differences (which lighting cancels from)
    match those of image - mean image; alpha from the mean remaining difference."""
    y = image.astype(np.float64) - stats.mean_image
    patch = np.diff(output.transpose(1, 2, 0)[:16, :17], axis=1)  # (16, 16, 3)
    best = None
    for flip, source in ((False, y), (True, y[:, ::-1])):
        diffs = np.diff(source, axis=1)
        windows = np.lib.stride_tricks.sliding_window_view(diffs[:POS + 15, :POS + 15], (16, 16, 3))[:, :, 0]
        err = ((windows - patch) ** 2).sum(axis=(2, 3, 4))  # (33 rows, 33 cols)
        oy, ox = np.unravel_index(np.argmin(err), err.shape)
        if best is None or err[oy, ox] < best[0]:
            best = (err[oy, ox], (POS - 1 - ox) if flip else ox, oy, flip)
    _, ox, oy, flip = best
    shift = (output - reference(image, stats, ox, oy, flip)).mean(axis=(1, 2))
    alpha = (stats.eigvecs.T @ shift) / np.sqrt(stats.eigvals)
    return ox, oy, flip, alpha


@pytest.mark.dali
def test_recovered_draws_from_outputs(raw_out, closes):
    """Offsets, flips and alphas read back from the pixels: as planned, and distributed as stated."""
    images, _ = split_images(raw_out, "train")
    stats = load_stats(raw_out)
    loader = closes(train_loader(raw_out, batch_size=16, device="cpu", seed=2, lighting_std=0.1))
    found = []
    for epoch in range(8):
        plan = loader.plan(epoch)
        for batch, (x, _) in zip(plan, loader):
            for i, sample in enumerate(batch.index):
                ox, oy, flip, alpha = _recover(x[i].numpy().astype(np.float64), images[sample], stats)
                d = batch.draws
                assert (ox, oy, flip) == (d.offset_x[i], d.offset_y[i], d.flip[i])
                np.testing.assert_allclose(alpha, d.alpha[i], atol=1e-4)
                found.append((ox, oy, flip, *alpha))
    found = np.array(found)  # 256 samples
    assert abs(found[:, 2].mean() - 0.5) < 0.12
    for axis in (0, 1):
        assert found[:, axis].min() <= 2 and found[:, axis].max() >= 30 and len(set(found[:, axis])) >= 25
    assert np.all(np.abs(found[:, 3:].std(axis=0) / 0.1 - 1) < 0.2)


@BACKENDS
def test_channel_normalisation_and_no_lighting(backend, raw_out, closes):
    images, _ = split_images(raw_out, "train")
    stats = load_stats(raw_out)
    for normalize, sigma in (("channel", 0.1), ("mean-image", 0.0)):
        loader = closes(train_loader(raw_out, batch_size=8, device="cpu", seed=4, backend=backend, normalize=normalize,
                                     lighting_std=sigma, workers=0 if backend == "torch" else 2))
        batch = loader.plan(0)[0]
        x, _ = next(iter(loader))
        if sigma == 0:
            assert not batch.draws.alpha.any()
        d = batch.draws
        for i, sample in enumerate(batch.index):
            expected = reference(images[sample], stats, d.offset_x[i], d.offset_y[i], d.flip[i], d.alpha[i], normalize)
            np.testing.assert_allclose(x[i].numpy(), expected, atol=1e-4)


@pytest.mark.dali
@pytest.mark.parametrize("host_render", [True, False], ids=["dali-decodes-host-renders", "dali-operators"])
def test_backends_agree_exactly_on_raw_shards(host_render, raw_out, jpeg_out, monkeypatch, closes):
    """DALI on the CPU, rendering on the host (where the C++ renderer builds) or with its own
    operators, gives the torch backend's tensors to the bit on raw shards."""
    from alexprep.imagenet_prep import dali_backend, render

    if host_render and render.kernel() is None:
        pytest.skip("the C++ renderer could not be built here")
    monkeypatch.setattr(dali_backend, "HOST_RENDER", host_render)
    for out, exact in ((raw_out, True), (jpeg_out, False)):
        for make in (lambda b: closes(train_loader(out, batch_size=8, device="cpu", seed=9, backend=b, workers=0)),
                     lambda b: closes(eval_loader(out, batch_size=5, device="cpu", crops=10, backend=b, workers=0)),
                     lambda b: closes(train_loader(out, batch_size=8, device="cpu", seed=9, backend=b, workers=0,
                                                   normalize="channel"))):
            dali, twin = run(make("dali")), run(make("torch"))
            assert len(dali) == len(twin)
            for (a, la), (b, lb) in zip(dali, twin):
                assert torch.equal(la, lb)
                if exact:
                    assert torch.equal(a, b)
                else:
                    assert (a - b).abs().max() <= 4 and (a - b).abs().mean() <= 0.05


def test_torch_workers_give_the_same_batches(raw_out, closes):
    one = run(closes(train_loader(raw_out, batch_size=8, device="cpu", seed=1, backend="torch", workers=0)))
    two = closes(train_loader(raw_out, batch_size=8, device="cpu", seed=1, backend="torch", workers=2))
    for epoch_run in (run(two), run(two)):  # persistent workers serve a second epoch
        assert len(epoch_run) == len(one)
    two.set_epoch(0)
    for (a, la), (b, lb) in zip(one, run(two)):
        assert torch.equal(a, b) and torch.equal(la, lb)
    two.close()


@BACKENDS
def test_outputs_stay_valid_while_held(backend, raw_out, closes):
    """Batches are not overwritten by later ones (DALI's are shared zero-copy)."""
    kw = dict(batch_size=4, device="cpu", seed=12, backend=backend, workers=0)
    held = [x for x, _ in closes(train_loader(raw_out, **kw))] + [x for x, _ in closes(train_loader(raw_out, **kw))]
    copies = [x.clone() for x, _ in closes(train_loader(raw_out, **kw))]
    for a, b in zip(held, copies + copies):
        assert torch.equal(a, b)


@BACKENDS
def test_lower_precision_outputs(backend, raw_out, closes):
    full = closes(train_loader(raw_out, batch_size=8, device="cpu", seed=0, backend=backend, workers=0))
    half = closes(train_loader(raw_out, batch_size=8, device="cpu", seed=0, backend=backend, workers=0,
                               dtype=torch.bfloat16))
    (a, _), (b, _) = next(iter(full)), next(iter(half))
    assert b.dtype == torch.bfloat16
    assert torch.equal(a.to(torch.bfloat16), b)


# ---------------------------------------------------------------------------- epochs, ranks, resume
@BACKENDS
def test_same_seed_same_batches_and_each_epoch_a_new_order(backend, raw_out, closes):
    kw = dict(batch_size=8, device="cpu", backend=backend, workers=0)
    a = closes(train_loader(raw_out, seed=3, **kw))
    b = closes(train_loader(raw_out, seed=3, **kw))
    epoch0, epoch1 = run(a), run(a)
    assert a.epoch == 2
    for (x, y), (u, v) in zip(epoch0, run(b)):
        assert torch.equal(x, u) and torch.equal(y, v)
    assert not all(torch.equal(x, u) for (x, _), (u, _) in zip(epoch0, epoch1))
    assert [list(p.index) for p in a.plan(0)] != [list(p.index) for p in a.plan(1)]
    other = run(closes(train_loader(raw_out, seed=4, **kw)))
    assert not all(torch.equal(x, u) for (x, _), (u, _) in zip(epoch0, other))
    c = closes(train_loader(raw_out, seed=3, **kw))
    c.set_epoch(1)
    for (x, _), (u, _) in zip(epoch1, run(c)):
        assert torch.equal(x, u)


@BACKENDS
def test_resume_mid_epoch_is_exact(backend, raw_out, closes):
    kw = dict(batch_size=4, device="cpu", seed=8, backend=backend, workers=0)
    full = closes(train_loader(raw_out, **kw))
    full.set_epoch(2)
    whole = run(full)
    resumed = closes(train_loader(raw_out, **kw))
    resumed.set_epoch(2, start_batch=5)
    tail = run(resumed)
    assert len(tail) == len(whole) - 5
    for (x, y), (u, v) in zip(whole[5:], tail):
        assert torch.equal(x, u) and torch.equal(y, v)
    assert resumed.epoch == 3 and len(resumed) == len(whole)


@pytest.mark.parametrize("backend, workers", [pytest.param("dali", 2, marks=pytest.mark.dali),
                                             ("torch", 0), ("torch", 2)])
def test_abandoned_epochs_and_jumps(backend, workers, raw_out, closes):
    """The backends prefetch on into the next epoch; breaking off an epoch, or jumping with
    set_epoch, drops what was prepared and gives exactly the batches asked for."""
    kw = dict(batch_size=4, device="cpu", seed=8, backend=backend, workers=workers)
    reference_loader = closes(train_loader(raw_out, **kw))
    epochs = [run(reference_loader) for _ in range(3)]
    loader = closes(train_loader(raw_out, **kw))
    first = iter(loader)
    next(first)  # break off epoch 0 after one batch (more are prefetched)
    got = {1: run(loader)}
    with pytest.raises(RuntimeError, match="superseded"):
        next(first)
    loader.set_epoch(0, start_batch=3)  # back to the middle of epoch 0
    got[0] = run(loader)
    got[(1, "again")] = run(loader)  # and on into epoch 1 (the stream's own continuation)
    assert loader.epoch == 2
    for key, start in ((1, 0), (0, 3), ((1, "again"), 0)):
        expected = epochs[key if isinstance(key, int) else key[0]][start:]
        assert len(got[key]) == len(expected)
        for (x, y), (u, v) in zip(expected, got[key]):
            assert torch.equal(x, u) and torch.equal(y, v)


@BACKENDS
def test_draws_do_not_depend_on_batch_size_or_ranks(backend, raw_out, closes):
    """A sample's tensor is the same whatever the batch size and the number of ranks, and
    W ranks with batch B together see one process's batches of W * B."""
    def by_sample(loader):
        out = {}
        for batch, (x, y) in zip(loader.plan(0), loader):
            for i, s in enumerate(batch.index):
                out[int(s)] = (x[i], int(y[i]))
        return out

    kw = dict(device="cpu", seed=5, backend=backend, workers=0)
    single = closes(train_loader(raw_out, batch_size=8, **kw))
    ref = by_sample(single)
    for b in (4, 16):
        for s, (x, y) in by_sample(closes(train_loader(raw_out, batch_size=b, **kw))).items():
            assert torch.equal(x, ref[s][0]) and y == ref[s][1]
    ranks = [closes(train_loader(raw_out, batch_size=4, rank=r, world_size=2, **kw)) for r in range(2)]
    parts = [by_sample(r) for r in ranks]
    assert not set(parts[0]) & set(parts[1])
    assert len(parts[0]) == len(parts[1]) == 16
    for part in parts:
        for s, (x, _) in part.items():
            assert torch.equal(x, ref[s][0])
    for k, whole in enumerate(single.plan(0)):
        assert set(whole.index) == set(ranks[0].plan(0)[k].index) | set(ranks[1].plan(0)[k].index)


@pytest.mark.dali
def test_roi_decoding_gives_the_same_pixels(jpeg_out, monkeypatch, closes):
    """DALI's operators (where ROI decoding applies: the GPU, or the CPU without the C++
    renderer) decoding only the window give the whole decode's pixels."""
    from alexprep.imagenet_prep import dali_backend

    monkeypatch.setattr(dali_backend, "HOST_RENDER", False)
    batches = {}
    for roi in (False, True):
        monkeypatch.setattr(dali_backend, "ROI_DECODE", roi)
        batches[roi] = run(closes(train_loader(jpeg_out, batch_size=8, device="cpu", seed=6)))
    for (a, _), (b, _) in zip(batches[False], batches[True]):
        d = (a - b).abs()
        assert d.max() <= 2 and d.mean() <= 0.01


@pytest.mark.dali
def test_dali_decoding_each_training_window_alone_gives_the_whole_images_pixels(jpeg_out, monkeypatch, closes):
    """On the CPU DALI decodes only each training crop window (decoders.image_slice) and the
    host renders it with the mean image read where the window was: the batches of the whole
    image's decoding, to the bit."""
    from alexprep.imagenet_prep import dali_backend, render

    if render.kernel() is None:
        pytest.skip("the C++ renderer could not be built here")
    batches = {}
    for window in (True, False):
        monkeypatch.setattr(dali_backend, "WINDOW_DECODE", window)
        loader = closes(train_loader(jpeg_out, batch_size=8, device="cpu", seed=6, backend="dali", workers=2))
        assert loader._backend._windowed is window
        batches[window] = run(loader)
    assert len(batches[True]) == len(batches[False]) > 0
    for (a, la), (b, lb) in zip(batches[True], batches[False]):
        assert torch.equal(la, lb) and torch.equal(a, b)


def test_quasi_order_epochs(raw_out, closes):
    images, _ = split_images(raw_out, "train")
    stats = load_stats(raw_out)
    loader = closes(train_loader(raw_out, batch_size=8, device="cpu", seed=1, order="quasi", buffer_shards=2,
                                 backend="torch", workers=0))
    index = read_split(raw_out, "train")
    shard_of = np.repeat(np.arange(len(index.shards)), [s.rows for s in index.shards])
    for epoch in range(2):
        plan = loader.plan(epoch)
        order = np.concatenate([b.index for b in plan])
        assert sorted(order) == list(range(len(images)))  # 32 samples, 4 batches: all of them
        assert len(set(shard_of[order[:10]])) == 2  # the first buffer: 2 shards of 5 or 6 rows
    batch = loader.plan(0)[0]
    x, _ = next(iter(loader))
    d = batch.draws
    for i, sample in enumerate(batch.index):
        expected = reference(images[sample], stats, d.offset_x[i], d.offset_y[i], d.flip[i], d.alpha[i])
        assert_close(x[i], expected, jpeg=False)


def test_train_drops_per_rank_remainders(raw_out, closes):
    n = len(split_images(raw_out, "train")[1])  # 32
    for world, batch in ((3, 4), (5, 2), (1, 5)):
        loaders = [closes(train_loader(raw_out, batch_size=batch, device="cpu", seed=0, rank=r, world_size=world,
                                       backend="torch", workers=0)) for r in range(world)]
        expected = (n // world) // batch
        seen = []
        for loader in loaders:
            assert len(loader) == expected
            plan = loader.plan(0)
            assert len(plan) == expected and all(len(b) == batch for b in plan)
            seen.extend(i for b in plan for i in b.index)
        assert len(seen) == len(set(seen)) == expected * batch * world


# ---------------------------------------------------------------------------- evaluation
@BACKENDS
@pytest.mark.parametrize("world", [1, 2])
def test_eval_sees_every_image_once(backend, world, jpeg_out):
    images, labels = split_images(jpeg_out, "val")
    stats = load_stats(jpeg_out)
    n = len(images)
    assert n % 5 != 0
    seen = []
    for rank in range(world):
        with eval_loader(jpeg_out, batch_size=5, device="cpu", rank=rank, world_size=world, backend=backend,
                         workers=0) as loader:
            batches = run(loader)
            assert len(batches) == len(loader)
            for batch, (x, y) in zip(loader.plan(), batches):
                assert x.shape == (len(batch), 3, CROP, CROP) and 1 <= len(batch) <= 5
                np.testing.assert_array_equal(y.numpy(), labels[batch.index])
                for i, sample in enumerate(batch.index):
                    assert_close(x[i], reference(images[sample], stats, 16, 16, False), jpeg=True)
                seen.extend(int(s) for s in batch.index)
            again = run(loader)  # evaluation repeats identically: the same batches, bit for bit
            assert len(again) == len(batches)
            for (x, y), (x2, y2) in zip(batches, again):
                assert torch.equal(x2, x) and torch.equal(y2, y)
    assert sorted(seen) == list(range(n))


@BACKENDS
def test_ten_crops_positions_and_order(backend, raw_out, closes):
    images, _ = split_images(raw_out, "val")
    stats = load_stats(raw_out)
    loader = closes(eval_loader(raw_out, batch_size=4, device="cpu", crops=10, backend=backend, workers=0))
    batch = loader.plan()[0]
    x, _ = next(iter(loader))
    centre = next(iter(closes(eval_loader(raw_out, batch_size=4, device="cpu", backend=backend, workers=0))))[0]
    assert x.shape == (4, 10, 3, CROP, CROP)
    # top-left, top-right, bottom-left, bottom-right, centre; then each of those mirrored
    windows = [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]
    for i, sample in enumerate(batch.index):
        for k in range(10):
            ox, oy = windows[k % 5]
            expected = reference(images[sample], stats, ox, oy, flip=k >= 5)
            np.testing.assert_allclose(x[i, k].numpy(), expected, atol=1e-3)
        for k in range(5):  # the mean image's window is mirrored with the image
            assert torch.equal(x[i, k + 5], x[i, k].flip(-1))
        assert torch.equal(centre[i], x[i, 4])


# ---------------------------------------------------------------------------- misuse
def test_clear_errors(raw_out, jpeg_out, monkeypatch, tmp_path, closes):
    kw = dict(batch_size=4, seed=0, backend="torch", workers=0)
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="CUDA is not available"):
            train_loader(raw_out, device="cuda:0", **kw)
    with pytest.raises(DataError, match="'cpu' or 'cuda:N'"):
        train_loader(raw_out, device="gpu", **kw)
    with pytest.raises(DataError, match="crops"):
        eval_loader(raw_out, batch_size=4, device="cpu", crops=5, backend="torch")
    with pytest.raises(DataError, match="batch_size"):
        train_loader(raw_out, device="cpu", **(kw | {"batch_size": 0}))
    with pytest.raises(DataError, match="fewer than one batch"):
        train_loader(raw_out, device="cpu", **(kw | {"batch_size": 33}))
    with pytest.raises(DataError, match="normalize"):
        train_loader(raw_out, device="cpu", normalize="imagenet", **kw)
    with pytest.raises(DataError, match="rank"):
        train_loader(raw_out, device="cpu", rank=2, world_size=2, **kw)
    with pytest.raises(DataError, match="backend"):
        train_loader(raw_out, device="cpu", **(kw | {"backend": "ffcv"}))
    # statistics of another build: both build ids named
    with pytest.raises(DataError) as err:
        train_loader(raw_out, device="cpu", stats=jpeg_out / "stats.npz", **kw)
    assert read_split(raw_out, "train").build_id in str(err.value)
    assert load_stats(jpeg_out).build_id in str(err.value)
    bare = tmp_path / "out"
    shutil.copytree(raw_out, bare)
    (bare / "stats.npz").unlink()
    with pytest.raises(DataError, match="alexprep stats"):
        train_loader(bare, device="cpu", **kw)
    # explicit statistics are used as given
    assert len(closes(train_loader(bare, device="cpu", stats=load_stats(raw_out), **kw))) == 8
    # without DALI, backend="dali" says what to use instead
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(DataError, match="backend='torch'"):
        train_loader(raw_out, device="cpu", **(kw | {"backend": "dali"}))


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@BACKENDS
@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_gpu_batches_equal_cpu_batches(backend, encoding, raw_out, jpeg_out, closes):
    out = raw_out if encoding == "raw" else jpeg_out
    cpu = run(closes(train_loader(out, batch_size=8, device="cpu", seed=1, backend=backend, workers=0)))
    gpu = run(closes(train_loader(out, batch_size=8, device="cuda:0", seed=1, backend=backend, workers=0)))
    for (a, la), (b, lb) in zip(cpu, gpu):
        assert b.device.type == "cuda" and lb.device.type == "cuda"
        assert torch.equal(la, lb.cpu())
        d = (a - b.cpu()).abs()
        # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a level or two
        assert d.max() <= (1e-3 if encoding == "raw" else 8) and d.mean() <= (1e-4 if encoding == "raw" else 0.5)
    ten = next(iter(closes(eval_loader(out, batch_size=4, device="cuda:0", crops=10, backend=backend, workers=0))))[0]
    ten_cpu = next(iter(closes(eval_loader(out, batch_size=4, device="cpu", crops=10, backend=backend, workers=0))))[0]
    assert (ten.cpu() - ten_cpu).abs().mean() <= (1e-4 if encoding == "raw" else 0.5)


@pytest.mark.parametrize("normalize", ["mean-image", "channel"])
@pytest.mark.parametrize("crops", [0, 10])  # 0: a training batch
def test_batched_gpu_render_equals_the_per_image_cpu_render(normalize, crops, raw_out):
    """The twin's two arithmetic paths, `render` (batched, what runs on a GPU) and
    `render_one` (per image, in CPU workers), run here on the CPU: bit for bit the same."""
    from alexprep.imagenet_prep.render import norm_tensors, render
    from alexprep.imagenet_prep.torch_backend import ShardBatches

    if crops:
        loader = eval_loader(raw_out, batch_size=4, device="cpu", crops=crops, normalize=normalize,
                             backend="torch", workers=0)
    else:
        loader = train_loader(raw_out, batch_size=8, device="cpu", seed=2, normalize=normalize, backend="torch",
                              workers=0)
    with loader:
        batch = loader.plan(0)[1]
        finished = ShardBatches(loader.samples, CROP, "render", norm=loader.norm)[batch]
        cut = ShardBatches(loader.samples, CROP, "windows")[batch]
        assert tuple(finished.which) == tuple(cut.which) == (0, 1)
        assert cut.pixels.dtype == torch.uint8 and torch.equal(finished.labels, cut.labels)
        rendered = render(cut.pixels, cut.windows, cut.cmn_mean, *norm_tensors(loader.norm, torch.device("cpu")))
        assert torch.equal(rendered, finished.pixels)


@pytest.mark.gpu
@pytest.mark.dali
def test_dali_gpu_batches_equal_dali_cpu_batches_over_many_iterations(raw_out, closes):
    """The race test for DALI's GPU hand-over: were torch to read an output buffer before
    DALI finished writing it (or after DALI reused it), some batch of many, with a deep
    prefetch queue and the tensors held, would differ from the CPU pipeline's."""
    cpu = closes(train_loader(raw_out, batch_size=4, device="cpu", seed=3, workers=1))
    gpu = closes(train_loader(raw_out, batch_size=4, device="cuda:0", seed=3, workers=1, prefetch=4))
    held = []
    for _ in range(6):  # epochs of 8 batches: 48 iterations across epoch boundaries
        for (a, la), (b, lb) in zip(cpu, gpu):
            held.append((a.clone(), b))  # b is held, not copied: its buffer must stay valid
            assert torch.equal(la, lb.cpu())
    torch.cuda.synchronize()
    for a, b in held:
        assert (a - b.cpu()).abs().max() <= 1e-3


def test_torchvision_decoding_path_equals_the_pil_path(raw_out, jpeg_out, monkeypatch):
    """The torch backend's batched path (encoded bytes from the workers, one decode call,
    windows cut and rendered with batched tensor ops: what runs on a GPU with torchvision),
    with the decoder swapped for PIL's, gives bit for bit the batches of the per-image CPU
    path: everything but the decoder itself is the same arithmetic."""
    from alexprep.imagenet_prep import torch_backend
    from alexprep.imagenet_prep.transform import decode

    spec = read_split(jpeg_out, "train").spec

    decoded = []  # images that went through the batched decoder

    def pil_batch(encoded, device):
        decoded.extend(encoded)
        return [torch.from_numpy(decode(x.numpy().tobytes(), spec).copy()).permute(2, 0, 1) for x in encoded]

    monkeypatch.setattr(torch_backend, "have_torchvision", lambda: True)
    monkeypatch.setattr(torch_backend, "decode_jpeg_batch", pil_batch)
    for make, images in ((lambda d: train_loader(jpeg_out, batch_size=8, device="cpu", seed=4, backend="torch",
                                                 workers=1, decoder=d), 32),
                         (lambda d: eval_loader(jpeg_out, batch_size=4, device="cpu", crops=10, backend="torch",
                                                workers=0, decoder=d), 12)):
        decoded.clear()
        with make("torchvision") as batched, make("pil") as per_image:
            from_batched = run(batched)
            assert len(decoded) == images  # every image took the batched path ...
            from_per_image = run(per_image)
            assert len(decoded) == images  # ... and none of the per-image path's
        assert len(from_batched) == len(from_per_image) > 0
        for (a, la), (b, lb) in zip(from_batched, from_per_image):
            assert torch.equal(la, lb) and torch.equal(a, b)


@pytest.mark.skipif(not have_torchvision(), reason="torchvision does not import here (no build matches the CPU torch pin)")
def test_torchvision_decodes_like_pil(jpeg_out):
    """torchvision's libjpeg-turbo decoding against PIL's on the same shard bytes."""
    from alexprep.imagenet_prep.samples import SplitSamples
    from alexprep.imagenet_prep.torch_backend import decode_jpeg_batch
    from alexprep.imagenet_prep.transform import decode

    index = read_split(jpeg_out, "train")
    samples = SplitSamples(index)
    encoded = [torch.from_numpy(np.array(samples.view(i))) for i in range(len(samples))]
    ours = decode_jpeg_batch(encoded, torch.device("cpu"))
    for i, x in enumerate(ours):
        d = (x.permute(1, 2, 0).numpy().astype(int) - decode(samples.view(i), index.spec).astype(int))
        assert np.abs(d).max() <= 2 and np.abs(d).mean() <= 0.05


# ---------------------------------------------------------------------------- damaged shards
def _damage_first_image(out: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of `out` whose first train shard's first JPEG lost its start-of-image marker:
    the shard keeps its size and Arrow structure, the image no longer decodes."""
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    index = read_split(damaged, "train")
    path = index.shard_path(index.shards[0])
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    first = table.column("image")[0].as_py()["bytes"]
    data = bytearray(path.read_bytes())
    at = data.index(first)  # where row 0's JPEG lies in the file
    data[at:at + 2] = b"\x00\x00"
    path.write_bytes(bytes(data))
    return damaged, path.name


def test_torch_backend_counts_and_names_images_that_do_not_decode(jpeg_out, tmp_path, closes):
    damaged, shard = _damage_first_image(jpeg_out, tmp_path)
    loader = closes(eval_loader(damaged, batch_size=8, device="cpu", split="train", backend="torch", workers=1))
    batches = run(loader)
    assert sum(len(y) for _, y in batches) == len(loader.samples)  # nothing dropped
    assert loader.decode_failure_count == 1
    assert loader.decode_failures[0].startswith(str(damaged / "train" / shard) + " row 0:")


def test_a_backend_reads_only_its_input(jpeg_out, tmp_path, closes):
    """A backend is given a frozen BackendInput, not the loader: one made from the loader's
    parts with another failure callback renders the loader's batches and reports there."""
    import dataclasses

    from alexprep.imagenet_prep.batches import BackendInput
    from alexprep.imagenet_prep.torch_backend import TorchBackend

    damaged, shard = _damage_first_image(jpeg_out, tmp_path)
    loader = closes(eval_loader(damaged, batch_size=8, device="cpu", split="train", backend="torch", workers=0))
    failures: list[str] = []
    source = BackendInput(loader.samples, loader.index.spec, loader.norm, loader.config, loader.device,
                          loader.positions, loader.eval_windows, loader.plan, failures.extend)
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.plan = None
    backend = TorchBackend(source)
    try:
        mine = [(x.clone(), y.clone()) for x, y in backend.run(loader.plan(0), 0)]
    finally:
        backend.close()
    assert len(failures) == 1 and failures[0].startswith(str(damaged / "train" / shard) + " row 0:")
    assert loader.decode_failure_count == 0  # the backend called its input, not the loader
    theirs = run(loader)
    assert len(mine) == len(theirs) == len(loader)
    for (x, y), (x2, y2) in zip(mine, theirs):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_dali_gpu_decoders_take_the_documented_hardware_settings():
    """On a GPU every DALI decoder is "mixed" with the hardware decoder's documented share
    (0.65: DALI's default, stated) and its buffers preallocated for the split's largest image."""
    from alexprep.imagenet_prep.dali_backend import HW_DECODER_LOAD, decoder_args

    assert decoder_args(False, (256, 256)) == {"device": "cpu"}
    assert HW_DECODER_LOAD == 0.65 and decoder_args(True, (256, 300)) == {
        "device": "mixed", "hw_decoder_load": 0.65, "preallocate_height_hint": 256, "preallocate_width_hint": 300}


@pytest.mark.dali
@pytest.mark.parametrize("recipe", ["paper", "rrc"])
@pytest.mark.filterwarnings("ignore:recipe='rrc' on")
def test_dali_pipeline_decodes_with_those_settings_and_dali_accepts_them(jpeg_out, monkeypatch, closes, recipe):
    """The pipeline asks decoder_args for the split's largest image; and DALI's "mixed"
    decoders accept the arguments (names are checked when the graph is made: no GPU needed,
    as an unknown name shows)."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    from alexprep.imagenet_prep import dali_backend

    asked = []
    real = dali_backend.decoder_args
    monkeypatch.setattr(dali_backend, "decoder_args", lambda gpu, shape: asked.append((gpu, shape)) or real(gpu, shape))
    closes(train_loader(jpeg_out, batch_size=4, device="cpu", seed=0, backend="dali", workers=1, recipe=recipe))
    assert asked == [(False, (256, 256))]
    for extra, ok in (({}, True), ({"no_such_argument": 1}, False)):
        for op, inputs, kw in (("image", 1, {}), ("image_crop", 1, {"crop": (8, 8)}), ("image_slice", 3, {})):
            pipe = Pipeline(batch_size=2, num_threads=1, device_id=0)
            try:
                with pipe:
                    data = [fn.external_source(name=f"in{i}") for i in range(inputs)]
                    getattr(fn.decoders, op)(*data, output_type=types.RGB, **kw, **real(True, (256, 300)), **extra)
            except KeyError as exc:
                assert not ok and "no_such_argument" in str(exc)
            else:
                assert ok, op


@pytest.mark.dali
def test_dali_names_the_image_that_does_not_decode(jpeg_out, tmp_path, closes):
    damaged, shard = _damage_first_image(jpeg_out, tmp_path)
    loader = closes(eval_loader(damaged, batch_size=8, device="cpu", split="train", workers=1))
    with pytest.raises(DataError, match=f"{shard} row 0"):
        run(loader)


def test_the_default_decoder_is_pil_in_workers_on_every_device():
    """decoder="auto" is PIL in the workers, also on CUDA: on an H200, 16 PIL workers
    decoded 3x what torchvision's batched nvJPEG did (benchmarks/GPU.md). nvJPEG is asked
    for by name, and refused in one line where torchvision cannot decode."""
    from alexprep.imagenet_prep.torch_backend import have_torchvision, pick_decoder

    assert pick_decoder("auto", "jpeg") == "pil" and pick_decoder("auto", "raw") == "pil"
    assert pick_decoder("torchvision", "raw") == "pil"  # nothing to decode
    if have_torchvision():
        assert pick_decoder("torchvision", "jpeg") == "torchvision"
    else:
        with pytest.raises(DataError, match="decoder='torchvision' needs torchvision"):
            pick_decoder("torchvision", "jpeg")


# ---------------------------------------------------------------------------- workers sized for the machine
@pytest.mark.parametrize("cores, ranks, train, torch_eval, dali_eval", [
    (16, 1, 14, 14, 2), (16, 8, 1, 1, 1), (2, 1, 1, 1, 1), (64, 8, 6, 6, 2), (3, 1, 1, 1, 2),
])
def test_workers_leave_two_cores_and_evaluation_never_adds_to_training(monkeypatch, cores, ranks, train,
                                                                        torch_eval, dali_eval):
    from alexprep.imagenet_prep.loaders import LoaderConfig

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    share = cores // ranks

    def threads(**kwargs) -> int:
        return LoaderConfig(batch_size=8, device="cpu", **kwargs).threads

    assert threads(train=True, backend="torch") == threads(train=True, backend="dali") == train
    assert threads(train=False, backend="torch") == torch_eval  # its workers end after each pass
    assert threads(train=False, backend="dali") == dali_eval
    assert train + dali_eval <= max(share, 2)  # together never more than the share (or one each)
    assert threads(train=True, backend="torch", workers=5) == 5  # given: as given


def test_evaluation_workers_exist_only_during_a_pass(jpeg_out, closes):
    loader = closes(eval_loader(jpeg_out, batch_size=4, device="cpu", split="train", backend="torch", workers=2))
    first, workers = [], []
    for x, y in loader:
        workers = workers or list(loader._backend._iterator._workers)
        first.append((x.clone(), y.clone()))
    assert len(workers) == 2
    for worker in workers:
        worker.join(timeout=10)
    assert not any(w.is_alive() for w in workers)  # ended with the pass, not idling until close
    second = run(loader)  # new workers, the same batches
    assert len(second) == len(first)
    for (x, y), (x0, y0) in zip(second, first):
        assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.filterwarnings("ignore:recipe='rrc' on")  # a centre-crop build: its windows are what matters
def test_rrc_canvases_resized_in_one_batched_call_are_pils_within_a_level(jpeg_out):
    """CUDA's rrc path, run on the CPU: workers cut each window onto a canvas (DCT-scaled
    where PIL's path is), one batched resize and flip; against the workers' PIL resize."""
    from alexprep.imagenet_prep.resized_crop import resized_canvases
    from alexprep.imagenet_prep.torch_backend import ShardBatches, flipped, pixel_shape

    size = 64  # windows of 128+ pixels a side are decoded DCT-scaled
    loader = train_loader(jpeg_out, batch_size=16, device="cpu", seed=2, backend="torch", workers=0, recipe="rrc",
                          size=size)
    try:
        for batch in loader.plan(0)[:2]:
            pil = ShardBatches(loader.samples, size, "windows", rrc=True)[batch].pixels[:, 0]
            slot = torch.zeros(pixel_shape("canvas", len(batch), 1, size, (SIZE, SIZE)), dtype=torch.uint8)
            cut = ShardBatches(loader.samples, size, "canvas", rrc=True, slots=[slot])[(batch, 0, None)]
            assert cut.slot == 0 and cut.boxes.shape == (len(batch), 6)
            crops = flipped(resized_canvases(slot[:, 0], torch.from_numpy(cut.boxes), size),
                            torch.from_numpy(cut.windows[:, 0, 4]))
            d = (crops.int() - pil.int()).abs()
            assert d.max() <= 1 and d.float().mean() <= 0.05, (d.max(), d.float().mean())
            assert (cut.boxes[:, 4] < batch.windows[:, 0, 2]).any()  # some were decoded DCT-scaled
    finally:
        loader.close()


def test_a_named_decoder_picks_the_torch_backend_and_dali_refuses_one(raw_out, closes):
    # DALI decodes its own way: with backend="auto" a named decoder used to be ignored in
    # silence wherever DALI imports; now it chooses the torch backend, and DALI refuses it.
    loader = closes(train_loader(raw_out, batch_size=4, device="cpu", seed=0, decoder="pil", workers=0))
    assert loader.config.backend == "torch"
    with pytest.raises(DataError, match="decoder='pil' chooses the torch backend's decoding"):
        train_loader(raw_out, batch_size=4, device="cpu", seed=0, decoder="pil", backend="dali", workers=0)
