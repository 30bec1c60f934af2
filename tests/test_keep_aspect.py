"""`build-shards --resize keep-aspect` (issue #16, the build half): whole images, shorter side
S, longer side capped, each row's size recorded; against an independent PIL reference, and
determinism, --part, resume, statistics, verify and the CLI as for centre-crop builds."""
from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from alexprep.cli.main import cli
from alexprep.imagenet_prep import build as build_module
from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.normalization import Normalization
from alexprep.imagenet_prep.sample_data import jpeg_bytes, load_photo, write_photo_tree
from alexprep.imagenet_prep.shards import (
    build_id, file_sha256, image_bytes_column, open_shard, read_split, row_sizes, shard_schema,
)
from alexprep.imagenet_prep.stats import (
    DatasetStats, PartialStats, compute_partial, compute_stats, load_stats, recompute_partial, write_stats,
)
from alexprep.imagenet_prep.transform import ImageSpec, decode, load_image
from alexprep.imagenet_prep.verify import verify_build

from test_transform import psnr

KEEP = ImageSpec(resize="keep-aspect", size=256, max_side=512)
KEEP_RAW = ImageSpec(resize="keep-aspect", size=256, max_side=512, encoding="raw")
# Sources whose shorter side is at least twice its target are decoded DCT-scaled (draft):
# compared within today's tolerance for that (test_transform: > 33 dB against a full decode).
EXTRA = {  # name: (width, height)
    "panorama.JPEG": (2400, 240),  # 256 x 2560 would exceed the cap: 512 x 51
    "tiny.JPEG": (40, 30),  # upscaled: 341 x 256
    "portrait_big.JPEG": (1200, 1600),  # drafted at 1/4: 256 x 341
    "square.JPEG": (300, 300),
    "wide.JPEG": (1000, 400),  # 640 x 256 exceeds 512: capped at 512 x 205
}


def reference_size(w: int, h: int, short_target: int = 256, cap: int = 512) -> tuple[int, int]:
    """The plain statement of the rule, in floats: shorter side to S; if the longer side
    would then exceed the cap, longer side = cap instead. Rounded half up."""
    short, long = min(w, h), max(w, h)
    new_short, new_long = short_target, math.floor(long * short_target / short + 0.5)
    if long * short_target / short > cap:
        new_short, new_long = max(1, math.floor(short * cap / long + 0.5)), cap
    return (new_short, new_long) if w <= h else (new_long, new_short)


def reference_image(data: bytes) -> np.ndarray:
    """Full decode (no DCT scaling), resize the whole image, nothing cropped."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(img.resize(reference_size(*img.size), Image.Resampling.BICUBIC))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in (".arrow", ".npz")}


def rows(out: Path, split: str = "train"):
    """(key, (h, w) recorded, decoded pixels) of every row of a split."""
    index = read_split(out, split)
    for shard in index.shards:
        table = open_shard(index, shard)
        sizes = row_sizes(table)
        for i, (key, data) in enumerate(zip(table.column("key").to_pylist(), image_bytes_column(table).to_pylist())):
            shape = (int(sizes[i, 0]), int(sizes[i, 1]))
            yield key, shape, decode(data, index.spec, shape)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("aspect_tree")
    write_photo_tree(root, classes=3, train_per_class=4, val_per_class=2, seed=3)
    photo = Image.fromarray(load_photo("coffee"))
    folder = root / "train" / "n00000001"
    for name, size in EXTRA.items():
        (folder / name).write_bytes(jpeg_bytes(photo.resize(size, Image.Resampling.BICUBIC), 92))
    return root


def _build(tmp_path_factory, tree, name, spec, **kw) -> Path:
    out = tmp_path_factory.mktemp(name) / "out"
    build_shards(tree, out, BuildConfig(spec=spec, shard_size=4, workers=2, **kw))
    return out


@pytest.fixture(scope="module")
def keep_build(tmp_path_factory, tree) -> Path:
    return _build(tmp_path_factory, tree, "keep", KEEP)


@pytest.fixture(scope="module")
def keep_raw(tmp_path_factory, tree) -> Path:
    return _build(tmp_path_factory, tree, "keep_raw", KEEP_RAW)


# ---------------------------------------------------------------------------- one image
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (500, 333), (500, 500), (40, 30), (2400, 240),
                                  (1000, 400), (1000, 100), (511, 256), (300, 3000), (1, 1000)])
def test_target_size_is_the_shorter_side_or_the_capped_longer_side(size):
    assert KEEP.target_size(*size) == reference_size(*size)
    w, h = KEEP.target_size(*size)
    assert max(w, h) <= 512 and (min(w, h) == 256 or max(w, h) == 512)


def test_spec_rejects_bad_combinations():
    assert ImageSpec(resize="keep-aspect").max_side == 512  # the default cap: twice the shorter side
    with pytest.raises(ValueError, match="at least the shorter side"):
        ImageSpec(resize="keep-aspect", size=256, max_side=200)
    with pytest.raises(ValueError, match="keep-aspect' only"):
        ImageSpec(max_side=512)
    with pytest.raises(ValueError, match="resize must be one of"):
        ImageSpec(resize="stretch")


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_one_image_matches_a_full_decode_resized_whole(name, tree):
    data = (tree / "train" / "n00000001" / name).read_bytes()
    ours = load_image(data, KEEP)
    w, h = Image.open(io.BytesIO(data)).size
    assert ours.shape == (*reference_size(w, h)[::-1], 3) and ours.dtype == np.uint8
    reference = reference_image(data)
    if min(w, h) < 2 * min(ours.shape[:2]):  # no DCT scaling: the same computation exactly
        np.testing.assert_array_equal(ours, reference)
    else:
        assert psnr(ours, reference) > 33


# ---------------------------------------------------------------------------- builds
def test_every_row_equals_the_reference_and_records_its_size(tree, keep_raw, keep_build):
    seen = set()
    for (key, shape, pixels), (key_j, shape_j, pixels_j) in zip(rows(keep_raw), rows(keep_build)):
        assert key == key_j and shape == shape_j
        data = (tree / key).read_bytes()
        reference = reference_image(data)
        assert pixels.shape == reference.shape == (*shape, 3)
        w, h = Image.open(io.BytesIO(data)).size
        if min(w, h) < 2 * min(shape):
            np.testing.assert_array_equal(pixels, reference)  # raw: exactly the reference
        else:
            assert psnr(pixels, reference) > 33
        assert psnr(pixels_j, pixels) > 33  # the JPEG shard: within q95's error of the raw one
        seen.add(Path(key).name)
    assert set(EXTRA) <= seen
    sizes = {Path(k).name: s for k, s, _ in rows(keep_build)}
    assert sizes["panorama.JPEG"] == (51, 512) and sizes["tiny.JPEG"] == (256, 341)
    assert sizes["wide.JPEG"] == (205, 512) and sizes["portrait_big.JPEG"] == (341, 256)


def test_schema_has_int32_sizes_and_datasets_reads_it(keep_build, photo_build, monkeypatch):
    path = sorted((keep_build / "train").glob("*.arrow"))[0]
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    assert table.schema.names == ["image", "label", "wnid", "key", "height", "width"]
    assert table.schema.field("height").type == pa.int32() == table.schema.field("width").type
    meta = json.loads(table.schema.metadata[b"alexprep"])
    assert meta["resize"] == "keep-aspect" and meta["size"] == 256 and meta["max_side"] == 512
    # The default centre-crop build: no size columns, no resize keys, the build id as before.
    crop = pa.ipc.open_stream(pa.memory_map(str(sorted((photo_build / "train").glob("*.arrow"))[0]))).schema
    assert crop.names == ["image", "label", "wnid", "key"]
    assert "resize" not in json.loads(crop.metadata[b"alexprep"])
    assert "height" not in json.loads(crop.metadata[b"huggingface"])["info"]["features"]
    index = read_split(photo_build, "train")
    assert not index.spec.keep_aspect and index.spec.max_side is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_file(str(path))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["height"].dtype == "int32"
    row = ds[0]
    assert row["image"].size == (row["width"], row["height"])


def test_resize_options_are_part_of_the_build_id(keep_build):
    classes = read_split(keep_build, "train").classes
    ids = {build_id(spec, 4, 0, classes) for spec in (
        ImageSpec(), KEEP, ImageSpec(resize="keep-aspect", max_side=600), ImageSpec(resize="keep-aspect", size=224))}
    assert len(ids) == 4
    assert read_split(keep_build, "train").build_id == build_id(KEEP, 4, 0, classes)
    with pytest.raises(ValueError, match=r"\(height, width\)"):
        from alexprep.imagenet_prep.shards import ShardWriter
        ShardWriter(keep_build / "x.arrow", shard_schema(classes, KEEP, "b", "train")).add(b"", 0, "n", "k")


def test_workers_do_not_change_a_bit(tree, keep_build, tmp_path):
    again = tmp_path / "again"
    build_shards(tree, again, BuildConfig(spec=KEEP, shard_size=4, workers=1))
    assert shard_bytes(again) == shard_bytes(keep_build)


def test_two_parts_equal_the_whole_build(tree, keep_build, tmp_path):
    out = tmp_path / "parts"
    for part in (1, 0):
        build_shards(tree, out, BuildConfig(spec=KEEP, shard_size=4, workers=1, part=part, parts=2))
    assert shard_bytes(out) == shard_bytes(keep_build)
    assert read_split(out, "train").build_id == read_split(keep_build, "train").build_id
    assert verify_build(out, decode_images=True).ok


def test_resume_after_an_interrupted_build(tree, keep_build, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    real = build_module.load_image

    def interrupted(data, spec):
        calls["n"] += 1
        if calls["n"] == 8:  # mid-shard, after two whole shards of 3
            raise KeyboardInterrupt
        return real(data, spec)

    monkeypatch.setattr(build_module, "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_shards(tree, out, BuildConfig(spec=KEEP, shard_size=4, workers=1))
    monkeypatch.setattr(build_module, "load_image", real)
    finished = sorted(p.name for p in out.rglob("*.arrow"))
    assert len(finished) == 2 and not list(out.rglob("manifest*.json"))
    report = build_shards(tree, out, BuildConfig(spec=KEEP, shard_size=4, workers=2))
    assert sum(r.shards_reused for r in report.splits) == 2
    assert shard_bytes(out) == shard_bytes(keep_build)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_other_options_in_out_are_refused(tree, keep_build, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(keep_build, out)
    with pytest.raises(DataError, match="holds a different build"):
        build_shards(tree, out, BuildConfig(shard_size=4, workers=1))  # the centre crop
    with pytest.raises(DataError, match="holds a different build"):
        build_shards(tree, out, BuildConfig(spec=ImageSpec(resize="keep-aspect", max_side=600), shard_size=4,
                                            workers=1))


def test_disk_estimate_grows_with_the_area(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(build_module.shutil, "disk_usage", lambda p: usage(0, 0, 10**9))
    n = 10**9 // build_module.JPEG_BYTES_ESTIMATE - 1000  # fits for the centre crop
    build_module._check_disk(tmp_path, ImageSpec(), n)
    with pytest.raises(DataError, match="not enough disk space.*140 KB each"):
        build_module._check_disk(tmp_path, KEEP, n)
    with pytest.raises(DataError, match="393 KB each"):  # raw: 2 x 256 x 256 x 3 + 200
        build_module._check_disk(tmp_path, KEEP_RAW, 10**4)


# ---------------------------------------------------------------------------- verify
def test_verify_decode_passes_good_builds(keep_build, keep_raw):
    for out in (keep_build, keep_raw):
        report = verify_build(out, decode_images=True)
        assert report.ok, report.bad
        assert report.rows == sum(1 for _ in rows(out)) + sum(1 for _ in rows(out, "val"))


@pytest.mark.parametrize("encoding", ["jpeg", "raw"])
@pytest.mark.parametrize("height, message", [(+1, "row 0: (decodes to|does not decode)"),
                                             (600, "row 0: recorded size 600x.* longer side at most 512")])
def test_verify_decode_checks_each_row_against_its_recorded_size(keep_build, keep_raw, tmp_path, encoding, height,
                                                                 message):
    out = tmp_path / "out"
    shutil.copytree(keep_build if encoding == "jpeg" else keep_raw, out)
    # Change one row's recorded height, and make the manifest agree with the new bytes:
    # only the decode check can see it.
    index = read_split(out, "train")
    shard = index.shards[0]
    path = index.shard_path(shard)
    table = open_shard(index, shard)
    h = table.column("height").to_pylist()
    h[0] = h[0] + 1 if height == +1 else height
    table = table.set_column(4, "height", pa.array(h, pa.int32()))
    new = path.with_suffix(".new")  # the table memory-maps `path`: write beside it, then rename
    with pa.OSFile(str(new), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    del table
    new.replace(path)
    manifest_path = out / "train" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = next(s for s in manifest["shards"] if s["name"] == shard.name)
    entry["bytes"], entry["sha256"] = path.stat().st_size, file_sha256(path)
    manifest_path.write_text(json.dumps(manifest))
    assert verify_build(out).ok  # without --decode the shard is as listed
    bad = verify_build(out, decode_images=True).bad
    assert len(bad) == 1 and re.search(message, bad[0]), bad
    result = CliRunner().invoke(cli, ["verify", str(out), "--decode"])
    assert result.exit_code == 1 and "1 bad" in result.output


# ---------------------------------------------------------------------------- statistics
def numpy_sums(images) -> tuple[np.ndarray, np.ndarray, int]:
    s, sxx, n = np.zeros(3, np.int64), np.zeros((3, 3), np.int64), 0
    for pixels in images:
        flat = pixels.reshape(-1, 3).astype(np.int64)
        s += flat.sum(axis=0)
        sxx += flat.T @ flat
        n += len(flat)
    return s, sxx, n


def test_stats_are_exact_over_the_stored_pixels(tree, keep_raw, keep_build):
    # Raw shards hold the pixels the partials summed; the JPEG build's partials sum the same
    # pixels before encoding (the same source decoded the same way).
    s, sxx, n = numpy_sums(pixels for _, _, pixels in rows(keep_raw))
    for out in (keep_raw, keep_build):
        partial, _ = compute_partial(out)
        assert partial.sized and partial.pixel_count == n and partial.image_count == sum(1 for _ in rows(out))
        np.testing.assert_array_equal(partial.rgb_sum, s)
        np.testing.assert_array_equal(partial.rgb_outer_sum, sxx)
        stats = compute_stats(out)
        assert stats.mean_image is None and not stats.has_mean_image
        mean = [int(v) / n for v in s]
        cov = np.array([[(n * int(sxx[i, j]) - int(s[i]) * int(s[j])) / n**2 for j in range(3)] for i in range(3)])
        np.testing.assert_allclose(stats.channel_mean, mean, rtol=1e-15)
        np.testing.assert_allclose(stats.rgb_cov, cov, rtol=1e-14)
        np.testing.assert_allclose(stats.channel_std, np.sqrt(np.diag(cov)), rtol=1e-14)
        vals, vecs = np.linalg.eigh(cov)
        np.testing.assert_allclose(stats.eigvals, vals[::-1], rtol=1e-10)
        np.testing.assert_allclose(np.abs(stats.eigvecs.T @ vecs[:, ::-1]), np.eye(3), atol=1e-9)
    # Recomputing from raw shards: the same integers, bit for bit.
    assert recompute_partial(read_split(keep_raw, "train"), workers=2) == compute_partial(keep_raw)[0]
    # A partial never mixes with a centre crop's.
    with pytest.raises(ValueError, match="cannot merge"):
        PartialStats.empty(256).merge(compute_partial(keep_raw)[0])


def test_parts_merge_to_the_whole_builds_stats(tree, keep_build, tmp_path):
    out = tmp_path / "parts"
    for part in (0, 1):
        build_shards(tree, out, BuildConfig(spec=KEEP, shard_size=4, workers=1, part=part, parts=2))
    assert compute_partial(out)[0] == compute_partial(keep_build)[0]


def test_stats_files_say_there_is_no_mean_image(keep_build, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(keep_build, out)
    result = CliRunner().invoke(cli, ["stats", str(out)])
    assert result.exit_code == 0, result.output
    assert "mean image    none: image sizes differ" in result.output
    with np.load(out / "stats.npz") as z:
        assert "mean_image" not in z.files and "channel_mean" in z.files
    written = json.loads((out / "stats.json").read_text())
    assert written["mean_image"].startswith("none: this build's images differ in size")
    assert "resized whole" in written["pixels"]
    with Image.open(out / "stats.png") as png:  # drawn, not blank
        assert png.format == "PNG" and png.width > 200 and png.height > 100
        colours = np.asarray(png.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 500  # swatches and text: 1111 measured; blank: 1
    stats = load_stats(out)
    assert stats.mean_image is None
    assert isinstance(DatasetStats.load(out / "stats.npz"), DatasetStats)
    result = CliRunner().invoke(cli, ["stats", str(out), "--recompute", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "against the shards' partials:" in result.output
    with pytest.raises(DataError, match="normalize='mean-image' needs a centre-crop build.*use normalize='channel'"):
        Normalization.from_stats(stats, "mean-image", 256)
    norm = Normalization.from_stats(stats, "channel", 256)
    assert norm.mean_image is None and np.allclose(norm.std, stats.channel_std)


def test_write_stats_round_trips_without_a_mean_image(keep_build, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(keep_build, out)
    stats = compute_stats(out)
    write_stats(out, stats)
    back = load_stats(out)
    for key in ("channel_mean", "channel_std", "rgb_cov", "eigvals", "eigvecs"):
        np.testing.assert_array_equal(getattr(back, key), getattr(stats, key))
    assert back.count == stats.count and back.build_id == stats.build_id


# ---------------------------------------------------------------------------- the CLI
def _cli(*args):
    return CliRunner().invoke(cli, ["build-shards", *map(str, args)])


@pytest.mark.parametrize("args, message", [
    (["--resize", "keep-aspect", "--shorter-side", "256", "--max-side", "200"],
     "--max-side 200 is smaller than --shorter-side 256"),
    (["--max-side", "512"], "--max-side apply to --resize keep-aspect only"),
    (["--shorter-side", "224"], "--shorter-side apply to --resize keep-aspect only"),
    (["--resize", "keep-aspect", "--shorter-side", "0"], "must be positive"),
    (["--resize", "keep-aspect", "--max-side", "100"], "--max-side 100 is smaller than --shorter-side 256"),
])
def test_cli_bad_combinations_are_one_line_exit_2(tree, tmp_path, args, message):
    result = _cli(tree, tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_builds_keep_aspect_like_the_library(tree, keep_build, tmp_path):
    out = tmp_path / "out"
    result = _cli(tree, out, "--resize", "keep-aspect", "--shorter-side", "256", "--max-side", "512",
                  "--shard-size", "4", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert shard_bytes(out) == shard_bytes(keep_build)
    result = CliRunner().invoke(cli, ["verify", str(out), "--decode"])
    assert result.exit_code == 0 and "all good" in result.output, result.output


def test_train_refuses_a_keep_aspect_build_in_its_own_words(keep_build, tmp_path):
    """alexprep train runs the paper's recipe: on a keep-aspect build it says so in one line
    (exit 2), naming what such builds are for, before any loader starts."""
    result = CliRunner().invoke(cli, ["train", str(keep_build), "--run-dir", str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "keep-aspect images of varying sizes; the paper's recipe (alexprep train and evaluate" in result.output
    assert "recipe='rrc'" in result.output
