"""Shared fixtures: ImageNet-layout trees made from real photographs, and their builds.

Session-scoped and read-only: a test that changes a tree or build copies it first.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.sample_data import write_photo_tree
from alexprep.imagenet_prep.transform import ImageSpec


def _have_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip without CUDA, `@pytest.mark.dali` ones without DALI: the
    marker alone says what a test needs (pyproject.toml declares them)."""
    missing = {"gpu": None if torch.cuda.is_available() else "no CUDA device",
               "dali": None if _have_dali() else "NVIDIA DALI is not installed"}
    for item in items:
        for marker, reason in missing.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def closes():
    """`closes(loader)` returns the loader and closes it when the test ends, pass or fail:
    its workers and shard maps do not outlive the test. Left to the garbage collector, the
    loaders of test_rrc.py or test_loaders.py made a later 3 s test take 23-30 s."""
    made = []
    yield lambda loader: made.append(loader) or loader
    for loader in made:
        loader.close()


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory) -> Path:
    """train/<wnid>/ (4 classes x 8) and val/<wnid>/ (4 classes x 3) of real-photo JPEGs."""
    root = tmp_path_factory.mktemp("photo_tree")
    write_photo_tree(root, classes=4, train_per_class=8, val_per_class=3, seed=1)
    return root


def _build(tmp_path_factory, tree: Path, name: str, **spec) -> Path:
    out = tmp_path_factory.mktemp(name) / "out"
    build_shards(tree, out, BuildConfig(spec=ImageSpec(**spec), shard_size=6, workers=2))
    return out


@pytest.fixture(scope="session")
def photo_build(tmp_path_factory, photo_tree) -> Path:
    """The build folder of photo_tree: JPEG q95 shards of 6 images (no stats.npz yet)."""
    return _build(tmp_path_factory, photo_tree, "photo_build")


@pytest.fixture(scope="session")
def photo_build_raw(tmp_path_factory, photo_tree) -> Path:
    """The same build with --encoding raw (exact pixels)."""
    return _build(tmp_path_factory, photo_tree, "photo_build_raw", encoding="raw")


def _with_stats(tmp_path_factory, build: Path, name: str) -> Path:
    import shutil

    from alexprep.imagenet_prep.stats import compute_stats, write_stats

    out = tmp_path_factory.mktemp(name) / "out"
    shutil.copytree(build, out)
    write_stats(out, compute_stats(out))
    return out


@pytest.fixture(scope="session")
def stats_build(tmp_path_factory, photo_build) -> Path:
    """A copy of photo_build with OUT/stats.npz: what the loaders and the trainer need."""
    return _with_stats(tmp_path_factory, photo_build, "stats_build")


@pytest.fixture(scope="session")
def stats_build_raw(tmp_path_factory, photo_build_raw) -> Path:
    """A copy of photo_build_raw with OUT/stats.npz."""
    return _with_stats(tmp_path_factory, photo_build_raw, "stats_build_raw")
