"""Seeing what a network learned: kernels (Figure 3), predictions and nearest neighbors
(Figure 4), and `alexprep predict` on image files, all on one tiny trained checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from alexprep.cli.main import cli
from alexprep.imagenet_prep.loaders import eval_loader
from alexprep.imagenet_prep.shards import open_shard, read_split
from alexprep.model.alexnet import AlexNet
from alexprep.model.checkpoint import load_checkpoint
from alexprep.model.config import TrainConfig
from alexprep.model.figures import KERNELS_FIGSIZE, contrast_stretch, kernel_mosaic, predictions_figsize
from alexprep.model.neighbors import cache_paths, find_neighbors, nearest, neighbors_figsize, weights_digest
from alexprep.model.predict import Predictor, eval_stats, normalized_crops, split_images
from alexprep.model.train import train

# One epoch of 4 steps on the 32 training photos: enough for weights that are not the
# initial ones, in ~10 s on 2 cores.
TINY = TrainConfig(batch_size=8, epochs=1, backend="torch", final_crops=0, bias_init="caffe", loader_workers=1)


@pytest.fixture(scope="module")
def run_dir(stats_build, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("inspect") / "run"
    train(stats_build, run, TINY, progress=False, log=lambda *a: None)
    return run


@pytest.fixture(scope="module")
def ckpt(run_dir) -> dict:
    return load_checkpoint(run_dir)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def png_size(path: Path) -> tuple[int, int]:
    """The PNG's size in pixels, once it is seen to hold a drawing (a blank page has one
    colour; these figures of photos and kernels have thousands)."""
    with Image.open(path) as img:
        colours = len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0))
        assert img.format == "PNG" and colours > 1000, colours
        return img.size


def inches_to_pixels(figsize, dpi) -> tuple[int, int]:
    return round(figsize[0] * dpi), round(figsize[1] * dpi)


# ---------------------------------------------------------------------------- Figure 3
def test_kernel_mosaic_stretches_each_kernel_and_keeps_the_order():
    rng = np.random.default_rng(0)
    kernels = rng.normal(size=(48, 3, 11, 11)) * rng.uniform(0.01, 10, size=(48, 1, 1, 1))
    kernels[5] = 0.3  # a flat kernel: mid-grey, not a division by zero
    tiles = contrast_stretch(kernels)  # (48, 11, 11, 3)
    assert tiles.shape == (48, 11, 11, 3)
    others = np.delete(tiles, 5, axis=0)
    assert np.allclose(others.min(axis=(1, 2, 3)), 0) and np.allclose(others.max(axis=(1, 2, 3)), 1)
    assert np.all(tiles[5] == 0.5)
    # Stretching is affine per kernel over all channels: colour ratios of differences survive.
    k = kernels[7]
    assert np.allclose(np.moveaxis(tiles[7], -1, 0), (k - k.min()) / (k.max() - k.min()))
    mosaic = kernel_mosaic(kernels, columns=16, gap=1)
    assert mosaic.shape == (3 * 12 + 1, 16 * 12 + 1, 3)
    for i in (0, 17, 47):
        r, c = divmod(i, 16)
        assert np.array_equal(mosaic[1 + 12 * r: 12 * r + 12, 1 + 12 * c: 12 * c + 12], tiles[i])


def test_inspect_kernels_writes_a_png_of_the_set_size(run_dir, tmp_path):
    out = tmp_path / "figs" / "kernels.png"
    result = run("inspect", "kernels", run_dir, "-o", out, "--dpi", 60)
    assert result.exit_code == 0, result.output
    assert png_size(out) == inches_to_pixels(KERNELS_FIGSIZE, 60)


# ---------------------------------------------------------------------------- evaluation's tensors
@pytest.mark.parametrize("crops", [1, 10])
def test_predictor_inputs_are_the_evaluation_loaders(ckpt, stats_build, crops):
    index = read_split(stats_build, "val")
    loader = eval_loader(stats_build, batch_size=5, device="cpu", stats=eval_stats(ckpt, index), crops=crops,
                         backend="torch", workers=0)
    theirs = torch.cat([images.reshape(len(images), crops, 3, 224, 224) for images, _ in loader])
    ours = normalized_crops(split_images(index, range(index.rows)), Predictor(ckpt).norm, crops)
    assert ours.shape == theirs.shape == (index.rows, crops, 3, 224, 224)
    assert torch.equal(ours, theirs)


def test_evaluate_command_counts_every_val_image_as_the_predictor_scores_it(ckpt, run_dir, stats_build):
    index = read_split(stats_build, "val")
    inputs = normalized_crops(split_images(index, range(index.rows)), Predictor(ckpt).norm, 1)[:, 0]
    labels = torch.tensor([label for shard in index.shards
                           for label in open_shard(index, shard).column("label").to_pylist()])
    with torch.no_grad():
        logits = Predictor(ckpt).model(inputs)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # the build has 4 classes: top-5 is all
    result = run("evaluate", run_dir, stats_build, "--crops", "1", "--backend", "torch", "--batch-size", "3",
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["count"] == index.rows and report["crops"] == 1
    assert report["top1_error"] == pytest.approx((top5[:, 0] != labels).float().mean().item())
    assert report["top5_error"] == pytest.approx((top5 != labels[:, None]).all(1).float().mean().item())


def test_predict_on_files_matches_evaluation_and_reports_bad_files(ckpt, run_dir, photo_tree, photo_build_raw,
                                                                   tmp_path):
    # The raw build holds exactly what build-shards made of each source file, so the
    # evaluation of a raw shard image is what `predict` must give for the file.
    index = read_split(photo_build_raw, "val")
    loader = eval_loader(photo_build_raw, batch_size=12, device="cpu", stats=eval_stats(ckpt, index), crops=10,
                         backend="torch", workers=0)
    model = Predictor(ckpt).model
    with torch.no_grad():
        images, labels = next(iter(loader))
        probs = model(images.reshape(-1, 3, 224, 224)).softmax(1).reshape(len(images), 10, -1).mean(1)
    keys = [k for shard in index.shards for k in open_shard(index, shard).column("key").to_pylist()]
    files = [photo_tree / key for key in keys[:3]]
    (tmp_path / "corrupt.JPEG").write_bytes(files[0].read_bytes()[:300])  # truncated
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    args = [files[0], tmp_path / "corrupt.JPEG", files[1], tmp_path / "empty.jpg", tmp_path / "missing.jpg",
            tmp_path / "notes.jpg", files[2]]

    result = run("predict", run_dir, *args, "--crops", "10", "--top", "4", "--json")
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == [str(a) for a in args]
    bad = {Path(r["path"]).name: r["error"] for r in rows if "error" in r}
    assert set(bad) == {"corrupt.JPEG", "empty.jpg", "missing.jpg", "notes.jpg"}
    assert len(bad["corrupt.JPEG"]) > 10
    assert "empty" in bad["empty.jpg"] and "no such file" in bad["missing.jpg"] and "not an image" in bad["notes.jpg"]
    good = [r for r in rows if "top" in r]
    assert len(good) == 3
    for i, row in enumerate(good):
        got = [c["probability"] for c in row["top"]]
        assert len(got) == 4 and got == sorted(got, reverse=True)
        # All four classes: the same probabilities as evaluating the shard image.
        by_index = np.zeros(4)
        by_index[[c["index"] for c in row["top"]]] = got
        np.testing.assert_allclose(by_index, probs[i].numpy(), rtol=1e-4, atol=1e-6)
        assert all(c["wnid"] == ckpt["classes"]["wnids"][c["index"]] for c in row["top"])
    top2 = json.loads(run("predict", run_dir, files[0], "--top", "2", "--json").stdout)[0]["top"]
    assert [c["index"] for c in top2] == [c["index"] for c in good[0]["top"][:2]]

    text = run("predict", run_dir, files[0], tmp_path / "empty.jpg")
    assert text.exit_code == 1
    assert str(files[0]) in text.stdout and "1." in text.stdout
    assert "1 of 2 file(s) could not be classified" in text.output and "empty.jpg: empty file" in text.output
    assert run("predict", run_dir, files[0], files[1]).exit_code == 0


# ---------------------------------------------------------------------------- Figure 4, left
def test_inspect_predict_writes_a_png_of_the_set_size(run_dir, stats_build, tmp_path):
    out = tmp_path / "predictions.png"
    result = run("inspect", "predict", run_dir, stats_build, "-o", out, "--n", 3, "--dpi", 40)
    assert result.exit_code == 0, result.output
    assert png_size(out) == inches_to_pixels(predictions_figsize(3), 40)
    assert predictions_figsize(3) != predictions_figsize(8)  # the size follows --n


def test_inspect_needs_the_runs_class_list_and_an_existing_checkpoint(run_dir, tmp_path):
    from alexprep.imagenet_prep.build import BuildConfig, build_shards
    from alexprep.imagenet_prep.sample_data import write_photo_tree

    write_photo_tree(tmp_path / "src", classes=2, train_per_class=1, val_per_class=1)
    build_shards(tmp_path / "src", tmp_path / "out", BuildConfig(workers=1))
    result = run("inspect", "predict", run_dir, tmp_path / "out", "-o", tmp_path / "p.png")
    assert result.exit_code == 2 and "knows 4 classes" in result.output and "Traceback" not in result.output
    result = run("inspect", "kernels", tmp_path / "nope.pt", "-o", tmp_path / "k.png")
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "k.png").exists()


# ---------------------------------------------------------------------------- Figure 4, right
def test_nearest_matches_brute_force_in_any_chunking():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(103, 16)).astype(np.float16)
    base[40] = base[7]  # a duplicate: ties go to the lower index
    queries = np.concatenate([base[[7, 90]], rng.normal(size=(2, 16)).astype(np.float16)]).astype(np.float32)
    exact = np.sqrt(((queries[:, None, :].astype(np.float64) - base[None].astype(np.float64)) ** 2).sum(-1))
    for chunk in (1, 10, 64, 1000):
        indices, distances = nearest(queries, base, 5, chunk_rows=chunk)
        for q in range(len(queries)):
            order = np.lexsort((np.arange(len(base)), exact[q]))[:5]
            assert indices[q].tolist() == order.tolist(), chunk
            np.testing.assert_allclose(distances[q], exact[q, order], rtol=1e-12)
    assert indices[0, :2].tolist() == [7, 40] and distances[0, 0] == 0 and distances[1, 0] == 0


def test_neighbors_of_training_images_include_themselves_and_the_cache_is_reused(ckpt, run_dir, stats_build,
                                                                                  tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    rows = [0, 5, 17, 31]
    found = find_neighbors(run_dir, stats_build, rows=rows, k=4, query_split="train", split="train",
                            cache_dir=cache, backend="torch", workers=1, batch_size=7)
    assert found.indices.shape == found.distances.shape == (4, 4)
    for q, row, dist in zip(rows, found.indices, found.distances):
        assert q in row.tolist() and dist[row.tolist().index(q)] == 0.0
        assert np.all(np.diff(dist) >= 0) and np.all(dist[1:] > 0)  # distinct photos are not at 0

    # The cache: float16, rows in sample order, each row the network's fc7 of that image.
    npy, meta = cache_paths(cache, weights_digest(ckpt), "train")
    record = json.loads(meta.read_text())
    assert record["rows"] == 32 and record["dims"] == 4096 and record["step"] == ckpt["step"]
    stored = np.load(npy)
    assert stored.dtype == np.float16 and stored.shape == (32, 4096)
    predictor = Predictor(ckpt)
    index = read_split(stats_build, "train")
    with torch.no_grad():
        direct = predictor.model.features(normalized_crops(split_images(index, [3, 30]), predictor.norm)[:, 0])
    np.testing.assert_allclose(stored[[3, 30]].astype(np.float32), direct.numpy(), rtol=2e-3, atol=1e-3)
    assert float(direct.abs().max()) > 0

    # A second call reads the cache: the network is not run (nor rebuilt) again.
    def refuse(*args, **kwargs):
        raise AssertionError("the network ran although the features were cached")

    monkeypatch.setattr(AlexNet, "features", refuse)
    monkeypatch.setattr(AlexNet, "forward", refuse)
    again = find_neighbors(run_dir, stats_build, rows=rows, k=4, query_split="train", split="train",
                            cache_dir=cache, backend="torch", workers=1)
    assert np.array_equal(again.indices, found.indices) and np.array_equal(again.distances, found.distances)

    # A cache without its record (a killed run) is not trusted.
    meta.unlink()
    with pytest.raises(AssertionError, match="network ran"):
        find_neighbors(run_dir, stats_build, rows=rows, k=4, query_split="train", cache_dir=cache, backend="torch",
                        workers=1)


def test_inspect_neighbors_writes_a_png_of_the_set_size(run_dir, stats_build, tmp_path):
    out = tmp_path / "neighbors.png"
    result = run("inspect", "neighbors", run_dir, stats_build, "-o", out, "--queries", 2, "--k", 3, "--dpi", 40,
                 "--backend", "torch", "--workers", 1, "--cache", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert png_size(out) == inches_to_pixels(neighbors_figsize(2, 3), 40)
    lines = [l for l in result.stdout.splitlines() if l.strip().startswith("val #")]
    assert len(lines) == 2 and all(l.count("#") == 4 for l in lines)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".json", ".npy", ".npy"]
