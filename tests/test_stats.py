"""`alexprep stats`: merged partials against a direct numpy computation over the same
pixels, --part builds, --recompute, the eigen-decomposition, the files, and broken builds."""
from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from alexprep.cli.main import cli
from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.shards import read_split
from alexprep.imagenet_prep.stats import (
    STATS_KEYS, DatasetStats, PartialStats, compute_partial, compute_stats, eigen, load_stats, merge_partials,
    outer_sum, write_stats,
)
from alexprep.imagenet_prep.transform import ImageSpec, decode, load_center_crop

RAW = ImageSpec(encoding="raw")
DERIVED = ("mean_image", "channel_mean", "channel_std", "rgb_cov", "eigvals")


# ---------------------------------------------------------------------------- references
def shard_rows(out: Path, split: str = "train"):
    """(key, image bytes) of every row of every shard, read with plain pyarrow."""
    for path in sorted((out / split).glob("*.arrow")):
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        column = table.column("image")
        images = column.combine_chunks()
        if pa.types.is_struct(images.type):
            images = images.field("bytes")
        yield from zip(table.column("key").to_pylist(), images.to_pylist())


def raw_pixels(out: Path) -> dict[str, np.ndarray]:
    return {key: np.frombuffer(data, np.uint8).reshape(256, 256, 3) for key, data in shard_rows(out)}


def reference(pixels) -> dict:
    """The statistics computed the plain way over a stack of (N, S, S, 3) uint8 images."""
    x = np.stack(list(pixels))
    flat = x.reshape(-1, 3)
    wide = flat.astype(np.int64)
    cov = np.cov(flat.T.astype(np.float64), bias=True)
    vals, vecs = np.linalg.eigh(cov)
    return {
        "pixel_sum": x.sum(axis=0, dtype=np.int64),
        "rgb_outer_sum": wide.T @ wide,
        "count": len(x),
        "mean_image": x.mean(axis=0, dtype=np.float64),
        "channel_mean": flat.mean(axis=0, dtype=np.float64),
        "channel_std": flat.std(axis=0, dtype=np.float64),
        "rgb_cov": cov,
        "eigvals": vals[::-1],
        "eigvecs": vecs[:, ::-1],
    }


def assert_matches_reference(partial: PartialStats, stats: DatasetStats, ref: dict) -> None:
    assert partial.image_count == stats.count == ref["count"]
    np.testing.assert_array_equal(partial.pixel_sum, ref["pixel_sum"])
    np.testing.assert_array_equal(partial.rgb_outer_sum, ref["rgb_outer_sum"])
    for key in DERIVED:
        ours, theirs = getattr(stats, key), ref[key]
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9 * np.abs(theirs).max(), err_msg=key)
    # Eigenvectors agree up to sign (eigh's sign is arbitrary; ours is fixed).
    cos = np.abs(np.sum(stats.eigvecs * ref["eigvecs"], axis=0))
    np.testing.assert_allclose(cos, 1.0, atol=1e-9)


def assert_same_stats(a: DatasetStats, b: DatasetStats) -> None:
    for key in STATS_KEYS:
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


def build(src: Path, out: Path, **config) -> Path:
    config.setdefault("shard_size", 3)
    config.setdefault("workers", 1)
    build_shards(src, out, BuildConfig(**config))
    return out


def copy_build(build_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(build_dir, tmp_path / "out"))


def run(*args):
    return CliRunner().invoke(cli, ["stats", *[str(a) for a in args]])


# ---------------------------------------------------------------------------- builds
@pytest.fixture(scope="module")
def many_raw(tmp_path_factory, photo_tree) -> Path:
    """photo_tree's 32 train images as raw shards of 3 (11 shards)."""
    return build(photo_tree, tmp_path_factory.mktemp("many_raw") / "out", spec=RAW, splits=("train",))


@pytest.fixture(scope="module")
def parts_raw(tmp_path_factory, photo_tree) -> Path:
    """The same build made as --part 2/3, then 0/3, then 1/3 into one OUT."""
    out = tmp_path_factory.mktemp("parts_raw") / "out"
    for part in (2, 0, 1):
        build(photo_tree, out, spec=RAW, splits=("train",), part=part, parts=3)
    return out


# ---------------------------------------------------------------------------- PartialStats
def test_partial_sums_are_exact_integers_across_flushes():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (700, 4, 4, 3), dtype=np.uint8)  # > 2 flushes of the uint16 buffer
    images[:600] = 255  # the worst case for overflow
    wide = images.reshape(-1, 3).astype(np.int64)
    partial = PartialStats.empty(4)
    for img in images:
        partial.add(img)
    np.testing.assert_array_equal(partial.pixel_sum, images.sum(axis=0, dtype=np.int64))
    np.testing.assert_array_equal(partial.rgb_outer_sum, wide.T @ wide)
    assert partial.image_count == 700 and partial.pixel_count == 700 * 16
    np.testing.assert_array_equal(partial.rgb_sum, wide.sum(axis=0))
    again = PartialStats.from_arrays(np.load(io.BytesIO(partial.to_npz_bytes())))
    assert again == partial

    # Reading the sums mid-way sees every image so far, and adding goes on correctly after.
    partial = PartialStats.empty(4)
    for i, img in enumerate(images):
        partial.add(img)
        if i in (0, 256, 257, 258, 513):
            np.testing.assert_array_equal(partial.pixel_sum, images[:i + 1].sum(axis=0, dtype=np.int64))
    assert partial == again
    with pytest.raises(ValueError):
        partial.add(images[0].astype(np.int64))
    with pytest.raises(ValueError):
        partial.add(np.zeros((5, 5, 3), np.uint8))


@pytest.mark.parametrize("shape", [(256, 256, 3), (5, 7, 3), (1000, 3)])
def test_outer_sum_is_exact(shape):
    rng = np.random.default_rng(1)
    for x in (rng.integers(0, 256, shape, dtype=np.uint8), np.full(shape, 255, np.uint8)):
        wide = x.reshape(-1, 3).astype(np.int64)
        np.testing.assert_array_equal(outer_sum(x), wide.T @ wide)


def test_merging_in_any_order_gives_the_same_bits():
    rng = np.random.default_rng(2)
    pieces = []
    for n in rng.integers(1, 6, 12):
        p = PartialStats.empty(8)
        p.add_batch(rng.integers(0, 256, (int(n), 8, 8, 3), dtype=np.uint8))
        pieces.append(p)
    results = []
    for seed in range(4):
        order = pieces[:]
        random.Random(seed).shuffle(order)
        total = PartialStats.empty(8)
        for p in order:
            total = total.merge(p) if seed % 2 else total.__iadd__(p)
        results.append(total)
    assert all(r == results[0] for r in results)
    assert results[0].image_count == sum(p.image_count for p in pieces)
    s = [DatasetStats.from_partial(r) for r in results]
    for other in s[1:]:
        assert_same_stats(s[0], other)


# ---------------------------------------------------------------------------- merged = numpy
def test_many_shards_merge_to_numpy_over_the_same_pixels(many_raw, photo_tree):
    index = read_split(many_raw, "train")
    assert len(index.shards) >= 10
    pixels = raw_pixels(many_raw)
    # The raw shards hold exactly the crops the build made from the source files.
    key = sorted(pixels)[0]
    np.testing.assert_array_equal(pixels[key], load_center_crop((photo_tree / key).read_bytes(), ImageSpec()))
    partial, _ = compute_partial(many_raw)
    stats = compute_stats(many_raw)
    assert stats.build_id == index.build_id
    assert_matches_reference(partial, stats, reference(pixels.values()))


def test_jpeg_partials_are_sums_over_the_crops_before_encoding(photo_build, photo_tree):
    crops = [load_center_crop((photo_tree / key).read_bytes(), ImageSpec()) for key, _ in shard_rows(photo_build)]
    partial, _ = compute_partial(photo_build)
    assert_matches_reference(partial, compute_stats(photo_build), reference(crops))


def test_part_builds_merge_to_the_whole_build_whatever_the_order(parts_raw, many_raw):
    assert sorted(p.name for p in (parts_raw / "train").glob("manifest*.json")) == [
        f"manifest-part-00{i}-of-003.json" for i in range(3)]
    merged = compute_stats(parts_raw)
    assert merged.build_id == compute_stats(many_raw).build_id
    assert_same_stats(merged, compute_stats(many_raw))
    partial, _ = compute_partial(parts_raw)
    assert_matches_reference(partial, merged, reference(raw_pixels(parts_raw).values()))
    index = read_split(parts_raw, "train")
    for seed in range(3):
        shards = index.shards[:]
        random.Random(seed).shuffle(shards)
        assert merge_partials(index, shards=shards) == partial


# ---------------------------------------------------------------------------- --recompute
def test_recompute_on_raw_shards_equals_the_partials(many_raw):
    accumulated, _ = compute_partial(many_raw)
    for workers in (1, 2):
        recomputed, _ = compute_partial(many_raw, recompute=True, workers=workers)
        assert recomputed == accumulated
    assert_same_stats(compute_stats(many_raw, recompute=True), compute_stats(many_raw))


def test_recompute_on_jpeg_shards_agrees_within_jpeg_error(photo_build, photo_build_raw):
    """--recompute sums exactly the decoded shard pixels; those differ from the crops the
    partials summed by JPEG q95's error e = decoded - crop. Tolerance, from that error as
    measured here against the raw twin build (the same crops): by Cauchy-Schwarz
        |d channel_mean_c| = |mean e_c|            <= rms(e_c)
        |d mean_image|     = |mean over images e|  <= max |e|
        |d rgb_cov_ij|     <= std_i rms(e_j) + rms(e_i) std_j + rms(e_i) rms(e_j)
    and that error must look like q95's, not like a bug: every channel within PSNR 35 dB
    (rms < 4.5 levels; q95 with 4:2:0 chroma subsampling gives ~38-45 dB on photographs,
    the chroma-heavy blue channel lowest), yet not zero."""
    seen = []
    decoded = {}
    for key, data in shard_rows(photo_build):
        decoded[key] = decode(data, ImageSpec())
        seen.append(key)
    recomputed_partial, _ = compute_partial(photo_build, recompute=True, workers=2)
    ref = reference(decoded[k] for k in seen)
    recomputed = compute_stats(photo_build, recompute=True)
    assert_matches_reference(recomputed_partial, recomputed, ref)  # exactly the decoded pixels

    crops = raw_pixels(photo_build_raw)
    assert sorted(crops) == sorted(decoded)
    err = np.stack([decoded[k].astype(np.float64) - crops[k] for k in seen]).reshape(-1, 3)
    rms = np.sqrt(np.mean(err**2, axis=0))
    assert np.all(rms < 255 / 10 ** (35 / 20)), rms
    assert np.any(rms > 0)  # JPEG is lossy: the two computations really differ

    partials = compute_stats(photo_build)
    assert np.all(np.abs(recomputed.channel_mean - partials.channel_mean) <= rms)
    assert np.abs(recomputed.mean_image - partials.mean_image).max() <= np.abs(err).max()
    std = partials.channel_std
    bound = np.outer(std, rms) + np.outer(rms, std) + np.outer(rms, rms)
    assert np.all(np.abs(recomputed.rgb_cov - partials.rgb_cov) <= bound)
    # The luminance direction, which lighting noise mostly follows, barely moves.
    assert abs(recomputed.eigvecs[:, 0] @ partials.eigvecs[:, 0]) > np.cos(np.radians(1))


def test_build_without_partials_needs_recompute(tmp_path, photo_tree, many_raw):
    out = build(photo_tree, tmp_path / "out", spec=RAW, splits=("train",), accumulate_stats=False)
    with pytest.raises(DataError, match="--recompute") as exc:
        compute_stats(out)
    assert "--no-stats" in str(exc.value)
    assert_same_stats(compute_stats(out, recompute=True), compute_stats(many_raw))


# ---------------------------------------------------------------------------- eigen
def test_eigvecs_are_orthonormal_eigenvectors_with_a_fixed_sign(photo_build):
    s = compute_stats(photo_build)
    v, lam, cov = s.eigvecs, s.eigvals, s.rgb_cov
    np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(cov @ v, v * lam, rtol=0, atol=1e-9 * lam[0])
    np.testing.assert_allclose(lam, np.sort(np.linalg.eigvalsh(cov))[::-1], rtol=1e-12)
    assert lam[0] >= lam[1] >= lam[2] > 0
    biggest = v[np.argmax(np.abs(v), axis=0), range(3)]
    assert np.all(biggest > 0)
    np.testing.assert_allclose(s.channel_std ** 2, np.diag(cov), rtol=1e-12)


def test_sign_convention_does_not_depend_on_the_solver():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    cov = q @ np.diag([900.0, 40.0, 3.0]) @ q.T
    vals, vecs = eigen(cov)
    for flips in ([1, 1, 1], [-1, 1, -1], [1, -1, -1]):  # any signs a solver could return
        w = q * np.array(flips, float)
        w = w * np.sign(w[np.argmax(np.abs(w), axis=0), range(3)])
        np.testing.assert_allclose(vecs, w, atol=1e-10)
    np.testing.assert_allclose(vals, [900.0, 40.0, 3.0], rtol=1e-12)


def test_first_eigenvector_is_luminance_on_real_photographs(photo_build):
    """ImageNet's (fb.resnet.torch): eigval 0.2175/0.0188/0.0045 on 0-1, first eigvec
    ~(0.57, 0.58, 0.58). Photographs share it: light and shade change all three channels
    together. The tolerance (0.12 per component, i.e. within ~12 degrees) allows for four
    photographs being a long way from 1.2 million."""
    s = compute_stats(photo_build)
    v1 = s.eigvecs[:, 0]
    assert np.all(v1 > 0)  # one sign (positive by our convention)
    np.testing.assert_allclose(v1, 1 / np.sqrt(3), atol=0.12)
    assert s.eigvals[0] > s.eigvals[1] + s.eigvals[2]  # it carries most of the variance


def test_mean_image_averages_to_channel_mean(photo_build):
    s = compute_stats(photo_build)
    assert s.mean_image.shape == (256, 256, 3) and s.mean_image.dtype == np.float64
    np.testing.assert_allclose(s.mean_image.mean(axis=(0, 1)), s.channel_mean, rtol=1e-12)


# ---------------------------------------------------------------------------- files
def test_write_and_load(photo_build, photo_build_raw, tmp_path):
    out = copy_build(photo_build, tmp_path)
    stats = compute_stats(out)
    paths = write_stats(out, stats)
    with np.load(paths["npz"]) as z:
        assert sorted(z.files) == sorted(STATS_KEYS + ("build_id",))
        assert str(z["build_id"]) == read_split(out, "train").build_id
        assert z["mean_image"].shape == (256, 256, 3) and z["eigvecs"].shape == (3, 3)
    for loaded in (load_stats(out), load_stats(paths["npz"])):
        assert_same_stats(loaded, stats)
        assert loaded.build_id == stats.build_id
    info = json.loads(paths["json"].read_text())
    for key in ("channel_mean", "channel_std", "rgb_cov", "eigvals", "eigvecs"):
        np.testing.assert_array_equal(np.array(info[key]), getattr(stats, key), err_msg=key)
    assert info["count"] == stats.count and info["build_id"] == stats.build_id
    assert info["mean_image"]["shape"] == [256, 256, 3]
    np.testing.assert_allclose(info["mean_image"]["channel_mean"], stats.channel_mean, rtol=1e-12)
    for k, component in enumerate(info["components"]):
        np.testing.assert_array_equal(component["eigvec_rgb"], stats.eigvecs[:, k])
    with Image.open(paths["png"]) as png:
        assert png.format == "PNG" and png.width > 2 * png.height > 200
        colours = np.asarray(png.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 100  # an image and swatches, not a blank page

    # A stats file of another build is refused by name.
    other = copy_build(photo_build_raw, tmp_path / "other")
    shutil.copy(paths["npz"], other / "stats.npz")
    with pytest.raises(DataError, match="another build"):
        load_stats(other)


def test_load_stats_errors(photo_build, tmp_path):
    out = copy_build(photo_build, tmp_path)
    with pytest.raises(DataError, match=r"run `alexprep stats .*` first"):
        load_stats(out)
    with pytest.raises(DataError, match="missing"):
        load_stats(tmp_path / "nothing.npz")
    (out / "stats.npz").write_bytes(b"not an npz")
    with pytest.raises(DataError, match="not a statistics file"):
        load_stats(out)


# ---------------------------------------------------------------------------- broken builds
def _drop_shard(out):
    (out / "train" / "train-00002-of-00006.arrow").unlink()
    return "train-00002-of-00006.arrow"


def _truncate_shard(out):
    path = out / "train" / "train-00004-of-00006.arrow"
    path.write_bytes(path.read_bytes()[:-100])
    return "train-00004-of-00006.arrow"


def _drop_partial(out):
    (out / "train" / "train-00001-of-00006.stats.npz").unlink()
    return "--recompute"


def _unlisted_shard(out):
    manifest = out / "train" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["shards"] = [s for s in data["shards"] if s["index"] != 3]
    manifest.write_text(json.dumps(data))
    return "missing shard index(es) 3"


def _stale_partial(out):
    folder = out / "train"
    shutil.copy(folder / "train-00000-of-00006.stats.npz", folder / "train-00005-of-00006.stats.npz")
    return "train-00005-of-00006.stats.npz"


@pytest.mark.parametrize("breakage", [_drop_shard, _truncate_shard, _drop_partial, _unlisted_shard, _stale_partial])
def test_a_broken_build_is_one_clear_error_and_writes_nothing(photo_build, tmp_path, breakage):
    out = copy_build(photo_build, tmp_path)
    assert len(read_split(out, "train").shards) == 6
    named = breakage(out)
    result = run(out)
    assert result.exit_code == 2, result.output
    assert named in result.output and "Traceback" not in result.output
    assert not any((out / f"stats.{ext}").exists() for ext in ("npz", "json", "png"))
    with pytest.raises(DataError):
        compute_stats(out)
    if breakage is _drop_partial or breakage is _stale_partial:  # the pixels are all there
        assert run(out, "--recompute").exit_code == 0
        assert load_stats(out).count == 24 + 8  # 4 classes x 8 train images


def test_a_missing_part_is_named(parts_raw, tmp_path):
    out = copy_build(parts_raw, tmp_path)
    (out / "train" / "manifest-part-001-of-003.json").unlink()
    result = run(out)
    assert result.exit_code == 2 and "1/3" in result.output
    assert not (out / "stats.npz").exists()


# ---------------------------------------------------------------------------- CLI
def test_cli_summary_json_and_recompute(many_raw, tmp_path):
    out = copy_build(many_raw, tmp_path)
    result = run(out)
    assert result.exit_code == 0, result.output
    stats = load_stats(out)
    assert f"{stats.count:,} images" in result.output
    assert f"{stats.channel_mean[0]:7.3f}" in result.output and f"{stats.eigvals[0]:10.3f}" in result.output
    assert str(out / "stats.npz") in result.output

    result = CliRunner().invoke(cli, ["stats", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = json.loads((out / "stats.json").read_text())
    assert printed.pop("written")["npz"] == str(out / "stats.npz")
    assert printed == written

    result = run(out, "--recompute", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "recomputed from the shard pixels" in result.output
    assert "against the shards' partials: identical" in result.output  # raw shards: the same pixels
    assert_same_stats(load_stats(out), stats)


def test_cli_bad_input_is_one_line(tmp_path):
    result = run(tmp_path / "nowhere")
    assert result.exit_code == 2
    assert "not a build folder" in result.output and len(result.output.strip().splitlines()) == 1


def test_gray_only_data_has_eigenvalues_zero_not_minus_zero(tmp_path):
    """Real photos converted to L and back to RGB: R = G = B, so the covariance has rank 1 and
    two eigenvalues are exactly 0; rounding must not print or store them as -0.0."""
    from alexprep.imagenet_prep.sample_data import jpeg_bytes, load_photo, photo_crop, wnid_for

    rng = np.random.default_rng(0)
    for c, name in enumerate(["astronaut", "coffee", "chelsea"]):
        folder = tmp_path / "src" / "train" / wnid_for(c)
        folder.mkdir(parents=True)
        for i in range(3):
            gray = photo_crop(load_photo(name), (500, 375), rng).convert("L").convert("RGB")
            (folder / f"{i}.JPEG").write_bytes(jpeg_bytes(gray, 90))
    out = tmp_path / "out"
    build_shards(tmp_path / "src", out, BuildConfig(shard_size=4, workers=1))
    result = CliRunner().invoke(cli, ["stats", str(out)])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if "eigenvalues" in l)
    assert "-0.0" not in line and line.split()[2:4] == ["0.000", "0.000"], line
    stats = load_stats(out)
    assert stats.eigvals[0] > 100 and list(stats.eigvals[1:]) == [0.0, 0.0]
    assert not np.signbit(stats.eigvals).any()
    saved = json.loads((out / "stats.json").read_text())
    assert saved["eigvals"][1:] == [0.0, 0.0] and "-0.0" not in (out / "stats.json").read_text()
    assert np.allclose(stats.eigvecs[:, 0], np.full(3, 3 ** -0.5))  # luminance: the only direction
