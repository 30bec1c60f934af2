"""recipe="rrc" (issue #16, the load half): torchvision's RandomResizedCrop on keep-aspect
builds (rrc.py, resized_crop.py, and the rrc paths of loaders.py and both backends).

Windows are checked against a scalar transliteration of torchvision's
`RandomResizedCrop.get_params` written here (`reference_window`) fed the same uniforms,
and their law by bin counts over many draws; pixels against the stored images read with
pyarrow and resized here with PIL (crop, then bilinear resize, as torchvision's
`resized_crop` on PIL images).
"""
from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from alexprep.imagenet_prep import augment, rrc
from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.loaders import eval_loader, train_loader
from alexprep.imagenet_prep.resized_crop import draft_scale, resized_window
from alexprep.imagenet_prep.sample_data import jpeg_bytes, load_photo
from alexprep.imagenet_prep.shards import read_split
from alexprep.imagenet_prep.stats import DatasetStats, compute_stats, write_stats
from alexprep.imagenet_prep.transform import ImageSpec

# Mean |difference| in levels between a DCT-scaled (drafted) JPEG decode resized and the
# full decode resized: libjpeg's scaled IDCT keeps more detail than the bilinear filter
# (measured up to 2.6 on these photos; a misplaced window is several times further).
DRAFTED_MEAN = 3.5
BACKENDS = pytest.mark.parametrize("backend", [pytest.param("dali", marks=pytest.mark.dali), "torch"])
# Extreme shapes, so that the loaders meet torchvision's fallback (no window fits in 10
# tries) and upscaled windows: stored as 512x51, 51x512 (capped) and 341x256.
EXTRA = {"panorama.JPEG": (2400, 240), "tower.JPEG": (240, 2400), "small.JPEG": (120, 90),
         "big.JPEG": (1600, 1200)}


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def aspect_tree(photo_tree, tmp_path_factory) -> Path:
    """photo_tree (32 train, 12 val) and 4 extreme shapes in class 0: 36 train images."""
    root = tmp_path_factory.mktemp("rrc_tree") / "tree"
    shutil.copytree(photo_tree, root)
    photo = Image.fromarray(load_photo("astronaut"))
    for name, size in EXTRA.items():
        (root / "train" / "n00000001" / name).write_bytes(jpeg_bytes(photo.resize(size, Image.Resampling.BICUBIC), 92))
    return root


def _keep_aspect(tmp_path_factory, tree: Path, encoding: str) -> Path:
    out = tmp_path_factory.mktemp(f"rrc_{encoding}") / "out"
    spec = ImageSpec(resize="keep-aspect", size=256, max_side=512, encoding=encoding)
    build_shards(tree, out, BuildConfig(spec=spec, shard_size=8, workers=2))
    write_stats(out, compute_stats(out))
    return out


@pytest.fixture(scope="module")
def raw_keep(tmp_path_factory, aspect_tree) -> Path:
    return _keep_aspect(tmp_path_factory, aspect_tree, "raw")


@pytest.fixture(scope="module")
def jpeg_keep(tmp_path_factory, aspect_tree) -> Path:
    return _keep_aspect(tmp_path_factory, aspect_tree, "jpeg")


_STORED: dict = {}


def stored_images(out: Path, split: str = "train") -> list[np.ndarray]:
    """Every stored image of a split in shard order, read with pyarrow and PIL only."""
    key = (str(out), split)
    if key not in _STORED:
        index = read_split(out, split)
        images = []
        for shard in index.shards:
            table = pa.ipc.open_stream(pa.memory_map(str(index.shard_path(shard)))).read_all()
            for row in table.to_pylist():
                data = row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"]
                if index.spec.encoding == "raw":
                    images.append(np.frombuffer(data, np.uint8).reshape(row["height"], row["width"], 3))
                else:
                    images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        _STORED[key] = images
    return _STORED[key]


def run(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# ---------------------------------------------------------------------------- references
def reference_window(seed: int, epoch: int, sample: int, height: int, width: int, scale=rrc.SCALE,
                     ratio=rrc.RATIO) -> tuple[int, int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, line by line, its torch.rand calls
    replaced by the counter generator's uniforms: (x, y, w, h, try taken or 0)."""
    words = augment.counter_words(seed, epoch, np.array([sample]), 22, rrc._DOMAIN_RRC)[0]
    uniform = [float(augment.unit_interval(words[j:j + 1], False)[0]) for j in range(20)]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform[2 * attempt])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform[2 * attempt + 1])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(augment.uniform_int(words[21:22], height - h + 1)[0])
            j = int(augment.uniform_int(words[20:21], width - w + 1)[0])
            return j, i, w, h, attempt + 1
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h, 0


def resized(image: np.ndarray, x: int, y: int, w: int, h: int, size: int, flip: bool = False) -> np.ndarray:
    """(size, size, 3) uint8: the window cut, then resized bilinear (torchvision on PIL)."""
    out = np.asarray(Image.fromarray(np.ascontiguousarray(image[y:y + h, x:x + w])).resize(
        (size, size), Image.Resampling.BILINEAR))
    return out[:, ::-1] if flip else out


def normalised(pixels: np.ndarray, stats: DatasetStats, alpha=(0.0, 0.0, 0.0)) -> np.ndarray:
    """(3, S, S) float64: channel mean and std, PCA lighting shift added."""
    shift = stats.eigvecs @ (np.asarray(alpha) * np.sqrt(stats.eigvals))
    return ((pixels.astype(np.float64) + shift - stats.channel_mean) / stats.channel_std).transpose(2, 0, 1)


def levels(a: torch.Tensor, b, stats: DatasetStats) -> np.ndarray:
    """|a - b| of normalised images, back in 0-255 levels."""
    d = np.abs(a.double().numpy() - (b.double().numpy() if isinstance(b, torch.Tensor) else b))
    return d * stats.channel_std[:, None, None]


# ---------------------------------------------------------------------------- the draws
SHAPES = [(256, 341), (341, 256), (256, 256), (51, 512), (512, 51), (256, 512), (40, 30), (1, 300)]


@pytest.mark.parametrize("scale, ratio", [(rrc.SCALE, rrc.RATIO), ((0.5, 1.0), (0.5, 2.0)), ((0.9, 1.0), (2.0, 3.0))])
def test_windows_follow_torchvision_get_params(scale, ratio):
    """Every window, try and fallback as torchvision's loop gives for the same uniforms."""
    index = np.arange(600)
    heights = np.array([SHAPES[i % len(SHAPES)][0] for i in index])
    widths = np.array([SHAPES[i % len(SHAPES)][1] for i in index])
    d = rrc.draw_rrc(3, 2, index, heights, widths, scale, ratio)
    flips = augment.draw(3, 2, index).flip
    for i in index:
        x, y, w, h, taken = reference_window(3, 2, int(i), int(heights[i]), int(widths[i]), scale, ratio)
        assert tuple(d.windows[i]) == (x, y, w, h, int(flips[i])) and d.tries[i] == taken, (i, heights[i], widths[i])
        assert 0 <= x and x + w <= widths[i] and 0 <= y and y + h <= heights[i] and w > 0 and h > 0
    assert (d.tries == 0).any() and (d.tries > 1).any()  # both the fallback and retries were met


@pytest.mark.parametrize("shape, scale, ratio, expected", [
    ((51, 512), (0.2, 1.0), rrc.RATIO, (222, 0, 68, 51)),  # too wide: h = H, w = round(H * 4/3)
    ((512, 51), (0.2, 1.0), rrc.RATIO, (0, 222, 51, 68)),  # too tall: w = W, h = round(W / (3/4))
    ((300, 300), (1.0, 1.0), (2.0, 3.0), (0, 75, 300, 150)),  # wider ratios than the image's
    ((300, 360), (1.0, 1.0), (1.1, 1.3), (0, 0, 360, 300)),  # the image's own ratio is in range: all of it
])
def test_fallback_when_no_window_fits(shape, scale, ratio, expected):
    n = 400
    d = rrc.draw_rrc(0, 0, np.arange(n), np.full(n, shape[0]), np.full(n, shape[1]), scale, ratio)
    fell_back = d.tries == 0
    assert (d.windows[fell_back, :4] == np.array(expected)).all() and np.isnan(d.area_fraction[fell_back]).all()
    # The last case's windows can fit by rounding (r within half a pixel of the image's own)
    assert fell_back.all() if expected[2:] != (shape[1], shape[0]) else fell_back.mean() > 0.5


def _bins_within(values: np.ndarray, edges: np.ndarray, expected_p: np.ndarray, sigmas: float = 5.0) -> None:
    """Every bin count within `sigmas` binomial standard deviations of its expectation: a
    wrong law shifts some bin by many times that at these counts."""
    counts, _ = np.histogram(values, edges)
    n = len(values)
    sd = np.sqrt(n * expected_p * (1 - expected_p))
    assert np.all(np.abs(counts - n * expected_p) <= sigmas * sd + 1), (counts, n * expected_p)


def test_window_law_when_every_first_try_fits():
    """1000x1000 images, scale (0.08, 0.75): every first try fits, so the area fraction, the
    log-ratio, the realised windows' area and the offsets are each uniform; flips p = 0.5."""
    n = 200_000
    side = np.full(n, 1000)
    d = rrc.draw_rrc(7, 0, np.arange(n), side, side, (0.08, 0.75))
    assert (d.tries == 1).all()
    twenty = np.full(20, 1 / 20)
    _bins_within(d.area_fraction, np.linspace(0.08, 0.75, 21), twenty)
    _bins_within(d.log_ratio, np.linspace(math.log(3 / 4), math.log(4 / 3), 21), twenty)
    x, y, w, h = d.windows[:, :4].T
    _bins_within(w * h / 1e6, np.linspace(0.08, 0.75, 21), twenty, sigmas=6)  # rounding blurs edges a little
    _bins_within((x + 0.5) / (1000 - w + 1), np.linspace(0, 1, 11), np.full(10, 0.1))
    _bins_within((y + 0.5) / (1000 - h + 1), np.linspace(0, 1, 11), np.full(10, 0.1))
    assert abs(d.flip.mean() - 0.5) < 5 * 0.5 / math.sqrt(n)


def test_window_law_with_retries():
    """341x256 images, torchvision's defaults: a try fits with probability p (the acceptance
    region's share of the (scale, log-ratio) rectangle, integrated here on a grid); the
    taken try is geometric in p, and the taken (scale, log-ratio) uniform on the region."""
    H, W, n = 256, 341, 200_000
    d = rrc.draw_rrc(8, 1, np.arange(n), np.full(n, H), np.full(n, W))
    centres = (np.arange(800) + 0.5) / 800  # cell centres of an 800x800 grid
    s = (0.08 + 0.92 * centres)[:, None]
    lr = (math.log(3 / 4) + math.log(16 / 9) * centres)[None, :]
    w = np.rint(np.sqrt(H * W * s * np.exp(lr)))
    h = np.rint(np.sqrt(H * W * s / np.exp(lr)))
    fits = (w <= W) & (h <= H)
    p = fits.mean()
    assert 0.5 < p < 0.95  # retries matter here
    for k in (1, 2, 3):
        expected = (1 - p) ** (k - 1) * p
        assert abs((d.tries == k).mean() - expected) < 5 * math.sqrt(expected * (1 - expected) / n) + 2e-3
    cells = fits.reshape(8, 100, 8, 100).mean(axis=(1, 3))  # the region's share of each of 8x8 bins
    expected_p = (cells / cells.sum()).ravel()
    taken = d.tries > 0
    i = np.clip(((d.area_fraction[taken] - 0.08) / 0.92 * 8).astype(int), 0, 7)
    j = np.clip(((d.log_ratio[taken] - math.log(3 / 4)) / math.log(16 / 9) * 8).astype(int), 0, 7)
    _bins_within(i * 8 + j + 0.5, np.arange(65), expected_p, sigmas=6)  # the grid's own error is ~1e-3


def test_centre_windows_place_torchvisions_crop():
    """Resize(256) + CenterCrop(224) in the stored image's pixels: for a shorter side of
    256 the 224 crop at torchvision's offsets; otherwise the square scaled by 224/256."""
    heights, widths = np.array([256, 256, 256, 51, 300, 343]), np.array([341, 256, 512, 512, 200, 256])
    got = rrc.center_windows(heights, widths, 224, 256)
    for (x, y, w, h, flip), H, W in zip(got, heights, widths):
        side = round(min(H, W) * 224 / 256)
        assert (w, h, flip) == (side, side, 0)
        assert (x, y) == (int(round((W - side) / 2.0)), int(round((H - side) / 2.0)))
    assert tuple(got[0]) == (58, 16, 224, 224, 0) and tuple(got[5][:2]) == (16, 60)  # round half to even
    assert rrc.default_resize(224) == 256 and rrc.default_resize(160) == 183


# ---------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("encoding, size, lighting", [("raw", 224, 0.0), ("jpeg", 224, 0.1), ("raw", 96, 0.0)])
def test_train_outputs_are_the_resized_windows(encoding, size, lighting, raw_keep, jpeg_keep, closes):
    """Torch backend: each output is its window (recomputed here from the generator) of the
    stored image, cut, resized bilinear and flipped, normalised: to float32 precision."""
    out = raw_keep if encoding == "raw" else jpeg_keep
    images, stats = stored_images(out), DatasetStats.load(out / "stats.npz")
    loader = closes(train_loader(out, batch_size=9, device="cpu", seed=5, backend="torch", workers=0, recipe="rrc",
                                 size=size, lighting_std=lighting))
    seen, fallbacks = 0, 0
    for batch, (x, _) in zip(loader.plan(0), loader):
        assert x.shape == (9, 3, size, size)
        alpha = augment.draw(5, 0, batch.index, lighting).alpha
        for i, sample in enumerate(batch.index):
            image = images[sample]
            wx, wy, w, h, taken = reference_window(5, 0, int(sample), *image.shape[:2])
            flip = bool(augment.draw(5, 0, [sample]).flip[0])
            expected = normalised(resized(image, wx, wy, w, h, size, flip), stats, alpha[i])
            assert levels(x[i], expected, stats).max() <= 1e-3
            seen, fallbacks = seen + 1, fallbacks + (taken == 0)
    assert seen == 36 and fallbacks >= 1  # the panoramas fell back


def test_dct_scaled_decoding_maps_the_window_exactly():
    """A JPEG window twice the output size is decoded at 1/2 scale: the result is the
    full-decode reference of that very window (a window shifted by one drafted pixel, 2
    file pixels, is several times further from it)."""
    photo = load_photo("chelsea")[:300, :451]
    data = jpeg_bytes(Image.fromarray(photo), 95)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    spec = ImageSpec(resize="keep-aspect")
    for (x, y, w, h), size in (((13, 7, 301, 250), 112), ((101, 40, 350, 260), 64), ((0, 0, 451, 300), 56)):
        assert draft_scale(w, h, size) >= 2
        ours = resized_window(data, spec, full.shape[:2], (x, y, w, h), size).astype(float)
        right = np.abs(ours - resized(full, x, y, w, h, size)).mean()
        shifted = np.abs(ours - resized(full, x + 2, y + 2, w, h, size)).mean()
        assert right <= 2.0 and shifted >= 2 * right, (right, shifted)
    assert draft_scale(447, 500, 224) == 1 and draft_scale(448, 500, 224) == 2 and draft_scale(900, 1800, 112) == 8


def test_drafted_loader_outputs_stay_close_to_full_decodes(jpeg_keep, closes):
    """size=64 on JPEG shards: most windows are drafted; every output within JPEG-draft
    tolerance of the full-decode reference."""
    images, stats = stored_images(jpeg_keep), DatasetStats.load(jpeg_keep / "stats.npz")
    loader = closes(train_loader(jpeg_keep, batch_size=9, device="cpu", seed=6, backend="torch", workers=0,
                                 recipe="rrc", size=64))
    drafted = 0
    for batch, (x, _) in zip(loader.plan(0), loader):
        for i, sample in enumerate(batch.index):
            wx, wy, w, h, flip = batch.windows[i, 0]
            d = levels(x[i], normalised(resized(images[sample], wx, wy, w, h, 64, flip), stats), stats)
            assert d.mean() <= DRAFTED_MEAN and np.percentile(d, 99) <= 16, (d.mean(), np.percentile(d, 99))
            drafted += draft_scale(w, h, 64) > 1
    assert drafted >= 10


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_eval_is_the_centre_crop_torchvision_takes(encoding, raw_keep, jpeg_keep, closes):
    """eval_loader(recipe="rrc"): for images with a shorter side of 256, exactly
    Resize(256) + CenterCrop(224) (no resampling at all); for capped ones the scaled
    centre window, resized: torchvision's window up to half a pixel of rounding."""
    out = raw_keep if encoding == "raw" else jpeg_keep
    images, stats = stored_images(out, "val"), DatasetStats.load(out / "stats.npz")
    loader = closes(eval_loader(out, batch_size=5, device="cpu", backend="torch", workers=0, recipe="rrc"))
    xs = torch.cat([x for x, _ in run(loader)])
    assert len(xs) == len(images) == 12
    for x, image in zip(xs, images):
        H, W = image.shape[:2]
        assert min(H, W) == 256  # val images are common sizes: none capped
        top, left = int(round((H - 224) / 2.0)), int(round((W - 224) / 2.0))
        assert levels(x, normalised(image[top:top + 224, left:left + 224], stats), stats).max() <= 1e-3
    small = closes(eval_loader(out, batch_size=4, device="cpu", backend="torch", workers=0, recipe="rrc", size=112,
                               split="train"))
    train_images, apart = stored_images(out), []
    for batch, (x, _) in zip(small.plan(0), small):  # resize 128 (112 / 0.875), then the 112 centre
        for i, sample in enumerate(batch.index):
            image = train_images[sample]
            H, W = image.shape[:2]
            side = round(min(H, W) * 112 / 128)
            left, top = int(round((W - side) / 2.0)), int(round((H - side) / 2.0))
            d = levels(x[i], normalised(resized(image, left, top, side, side, 112), stats), stats)
            assert d.max() <= 1e-3 if encoding == "raw" else d.mean() <= DRAFTED_MEAN  # JPEG: 224 -> 112 drafted
            s = 128 / min(H, W)  # torchvision's two steps: Resize(128) (long side truncated), CenterCrop(112)
            two_step = Image.fromarray(image).resize((max(1, int(W * s)), max(1, int(H * s))),
                                                     Image.Resampling.BILINEAR)
            l, t = int(round((two_step.width - 112) / 2.0)), int(round((two_step.height - 112) / 2.0))
            apart.append(levels(x[i], normalised(np.asarray(two_step.crop((l, t, l + 112, t + 112))), stats),
                                stats).mean())
    # Half a pixel of rounding from torchvision's window: 2-6.5 levels on these detailed
    # photos (3.3 on average); the same window one pixel further off is ~9 on average.
    assert np.mean(apart) <= 5, apart


# ---------------------------------------------------------------------------- determinism
def test_draws_do_not_depend_on_batch_size_ranks_or_resume(raw_keep, closes):
    kw = dict(device="cpu", seed=4, backend="torch", workers=0, recipe="rrc", size=64)

    def by_sample(loader, epoch=0):
        loader.set_epoch(epoch)
        return {int(s): x[i] for batch, (x, _) in zip(loader.plan(epoch), loader) for i, s in enumerate(batch.index)}

    ref = by_sample(closes(train_loader(raw_keep, batch_size=12, **kw)))
    assert len(ref) == 36
    other = by_sample(closes(train_loader(raw_keep, batch_size=4, **kw)))
    assert all(torch.equal(x, ref[s]) for s, x in other.items()) and len(other) == 36
    ranks = [by_sample(closes(train_loader(raw_keep, batch_size=6, rank=r, world_size=2, **kw))) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) + len(ranks[1]) == 36
    assert all(torch.equal(x, ref[s]) for part in ranks for s, x in part.items())
    loader = closes(train_loader(raw_keep, batch_size=6, **kw))
    whole = [run(loader) for _ in range(2)][1]  # epoch 1 uninterrupted
    loader.set_epoch(1, start_batch=4)
    resumed = run(loader)
    assert len(resumed) == 2 and all(torch.equal(a, b) for (a, _), (b, _) in zip(whole[4:], resumed))
    assert not torch.equal(by_sample(closes(train_loader(raw_keep, batch_size=12, **kw)), epoch=1)[0], ref[0])


# ---------------------------------------------------------------------------- backends
@pytest.mark.dali
@pytest.mark.parametrize("host_render", [True, False], ids=["dali-decodes-host-renders", "dali-operators"])
@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_dali_agrees_with_the_torch_backend(encoding, host_render, raw_keep, jpeg_keep, monkeypatch, closes):
    """The same windows, flips and means. DALI's operators: its antialiased linear resize
    against PIL's bilinear, 0.14 levels apart on average, 1 at the 99th percentile, 5 at most
    (over 192 windows of the test photos); asserted: mean <= 0.3, max <= 6. DALI decoding
    each window and the host resizing it with PIL and rendering it: the torch backend's
    tensors to the bit (no window here is large enough for its DCT-scaled decoding). Where
    nothing is resampled (eval, shorter side 256) they are identical."""
    from alexprep.imagenet_prep import dali_backend, render

    if host_render and render.kernel() is None:
        pytest.skip("the C++ renderer could not be built here")
    monkeypatch.setattr(dali_backend, "HOST_RENDER", host_render)
    out = raw_keep if encoding == "raw" else jpeg_keep
    stats = DatasetStats.load(out / "stats.npz")
    for make in (lambda b: closes(train_loader(out, batch_size=9, device="cpu", seed=2, backend=b, workers=1,
                                               recipe="rrc", lighting_std=0.1)),
                 lambda b: closes(eval_loader(out, batch_size=5, device="cpu", backend=b, workers=1, recipe="rrc"))):
        dali, ours = run(make("dali")), run(make("torch"))
        assert len(dali) == len(ours) > 0
        d = np.concatenate([levels(a, b, stats).ravel() for (a, _), (b, _) in zip(dali, ours)])
        assert all(torch.equal(la, lb) for (_, la), (_, lb) in zip(dali, ours))
        assert d.max() <= 6 and d.mean() <= 0.3, (d.max(), d.mean())
        if host_render:
            assert all(torch.equal(a, b) for (a, _), (b, _) in zip(dali, ours))
    assert d.max() <= 1e-3  # the eval loader's: no resampling anywhere


def test_torchvision_decoding_path_agrees_with_pil(jpeg_keep, monkeypatch, closes):
    """The torch backend's batched path (what runs with torchvision on a GPU: decode, then
    each window cut and resized by torch.nn.functional.interpolate(antialias=True) and
    rounded), here with PIL's decoder in torchvision's place, against the per-image PIL
    path: the two bilinear filters agree to within a level (PIL rounds between its two
    passes)."""
    from alexprep.imagenet_prep import torch_backend
    from alexprep.imagenet_prep.transform import decode

    spec = read_split(jpeg_keep, "train").spec
    stats = DatasetStats.load(jpeg_keep / "stats.npz")
    decoded = []  # images that went through the batched decoder

    def pil_batch(encoded, device):
        decoded.append(len(encoded))
        return [torch.from_numpy(decode(x.numpy().tobytes(), spec).copy()).permute(2, 0, 1) for x in encoded]

    monkeypatch.setattr(torch_backend, "have_torchvision", lambda: True)
    monkeypatch.setattr(torch_backend, "decode_jpeg_batch", pil_batch)
    kw = dict(batch_size=9, device="cpu", seed=3, backend="torch", workers=0, recipe="rrc")
    batched = closes(train_loader(jpeg_keep, decoder="torchvision", **kw))
    per_image = closes(train_loader(jpeg_keep, **kw))
    from_batched = run(batched)
    assert decoded == [9] * 4  # every image of the epoch took the batched path ...
    from_per_image = run(per_image)
    assert decoded == [9] * 4  # ... and none of the per-image path's
    d = np.concatenate([levels(a, b, stats).ravel() for (a, _), (b, _) in zip(from_batched, from_per_image)])
    assert d.max() <= 1.001 and d.mean() <= 0.2, (d.max(), d.mean())  # measured: 1 and 0.14


def test_gpu_windows_path_renders_like_the_cpu_path(jpeg_keep, closes):
    """The torch backend's CUDA-with-PIL path (workers hand over resized, flipped uint8
    windows; `render` normalises them batched), run on the CPU: bit for bit the per-image
    CPU path's tensors."""
    from alexprep.imagenet_prep.render import norm_tensors, render
    from alexprep.imagenet_prep.torch_backend import ShardBatches

    loader = closes(train_loader(jpeg_keep, batch_size=9, device="cpu", seed=1, backend="torch", workers=0,
                                 recipe="rrc", lighting_std=0.1))
    batch = loader.plan(0)[2]
    finished = ShardBatches(loader.samples, 224, "render", norm=loader.norm, rrc=True)[batch].pixels
    cut = ShardBatches(loader.samples, 224, "windows", rrc=True)[batch]
    crops, windows, cmn = cut.pixels, cut.windows, cut.cmn_mean
    assert crops.shape == (9, 1, 224, 224, 3) and crops.dtype == torch.uint8
    assert torch.equal(render(crops, windows, cmn, *norm_tensors(loader.norm, torch.device("cpu"))), finished)


# ---------------------------------------------------------------------------- misuse
def test_recipes_and_builds_that_do_not_go_together(raw_keep, stats_build_raw, closes):
    kw = dict(batch_size=4, device="cpu", seed=0, backend="torch", workers=0)
    with pytest.raises(DataError, match="recipe='rrc'") as err:
        train_loader(raw_keep, normalize="channel", **kw)
    assert "keep-aspect" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="recipe='rrc'"):
        eval_loader(raw_keep, batch_size=4, device="cpu", backend="torch", normalize="channel")
    with pytest.raises(DataError, match="normalize='channel'"):
        train_loader(raw_keep, recipe="rrc", normalize="mean-image", **kw)
    with pytest.raises(DataError, match="crops=10"):
        eval_loader(raw_keep, batch_size=4, device="cpu", backend="torch", recipe="rrc", crops=10)
    for bad in ((0.0, 1.0), (0.5, 0.2), (0.5, 1.5), (0.5,), "big"):
        with pytest.raises(DataError, match="scale"):
            train_loader(raw_keep, recipe="rrc", scale=bad, **kw)
    with pytest.raises(DataError, match="ratio"):
        train_loader(raw_keep, recipe="rrc", ratio=(-1, 2), **kw)
    with pytest.raises(DataError, match="resize"):
        eval_loader(raw_keep, batch_size=4, device="cpu", backend="torch", recipe="rrc", resize=200)
    with pytest.raises(DataError, match="recipe must be"):
        train_loader(raw_keep, recipe="timm", **kw)
    loader = closes(train_loader(raw_keep, recipe="rrc", **kw))
    assert (loader.config.normalize, loader.config.lighting_std) == ("channel", 0.0)
    # rrc on the paper's 256x256 centre-crop build: allowed, and said
    with pytest.warns(UserWarning, match="centre-crop build"):
        square = closes(train_loader(stats_build_raw, recipe="rrc", size=128, **kw))
    x, _ = next(iter(square))
    assert x.shape == (4, 3, 128, 128)
    windows = square.plan(0)[0].windows[:, 0]
    assert (windows[:, 0] + windows[:, 2] <= 256).all() and (windows[:, 1] + windows[:, 3] <= 256).all()
