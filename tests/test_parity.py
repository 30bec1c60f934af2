"""`alexprep parity`: the backends against each other and against a plain PIL + numpy
rendering, per operation, both recipes, on tiny builds of the shipped photos."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from alexprep.cli.main import cli
from alexprep.imagenet_prep import parity
from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.stats import compute_stats, write_stats
from alexprep.imagenet_prep.transform import ImageSpec

PAPER = ("decode", "crop", "flip", "mean", "lighting")


def test_the_paper_recipe_on_raw_shards_reads_zero_between_backends(stats_build_raw):
    report = parity.parity_report(stats_build_raw, samples=8, seed=1)
    assert list(report["recipes"]) == ["paper", "rrc"] and report["samples"] == 8
    paper = report["recipes"]["paper"]
    assert tuple(paper) == PAPER
    assert tuple(report["recipes"]["rrc"]) == ("decode", "resize", "flip", "mean", "lighting")
    for operation, row in paper.items():
        assert row["torch vs reference"] is not None, operation  # 8 samples: flipped and not
        for pair, diff in row.items():
            between_backends = "reference" not in pair
            if between_backends or operation in ("decode", "crop", "flip"):
                assert diff == {"max": 0.0, "mean": 0.0}, (operation, pair)
            else:  # float32 against the reference's float64
                assert diff["max"] < 1e-3, (operation, pair)
    if "dali" in report["backends"]:
        assert "torch vs dali" in paper["crop"]


def test_the_report_sees_a_window_one_pixel_off(stats_build_raw, monkeypatch):
    """A reference that cuts its windows one pixel lower differs from every backend."""
    real = parity.reference_window

    def lower(image, window, crop, rrc):
        return real(np.roll(image, -1, axis=0), window, crop, rrc)

    monkeypatch.setattr(parity, "reference_window", lower)
    paper = parity.parity_report(stats_build_raw, samples=4, recipes=("paper",))["recipes"]["paper"]
    assert paper["decode"]["torch vs reference"]["max"] == 0  # decoding does not cut windows
    assert paper["crop"]["torch vs reference"]["mean"] > 1 and paper["mean"]["torch vs reference"]["mean"] > 1


@pytest.fixture(scope="module")
def keep_aspect_build(tmp_path_factory, photo_tree):
    out = tmp_path_factory.mktemp("keep_aspect") / "out"
    build_shards(photo_tree, out, BuildConfig(spec=ImageSpec(resize="keep-aspect"), shard_size=6, workers=2))
    write_stats(out, compute_stats(out))
    return out


def test_rrc_on_keep_aspect_jpegs_from_the_cli(keep_aspect_build, tmp_path):
    """Keep-aspect builds take rrc only; the JSON file is the printed report; the torch
    backend decodes as PIL does, and resizes windows within the design's tolerances."""
    path = tmp_path / "parity.json"
    result = CliRunner().invoke(cli, ["parity", str(keep_aspect_build), "--samples", "6", "-o", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert json.loads(path.read_text()) == report and list(report["recipes"]) == ["rrc"]
    rrc = report["recipes"]["rrc"]
    assert rrc["decode"]["torch vs reference"] == {"max": 0.0, "mean": 0.0}
    for operation in ("resize", "flip", "mean", "lighting"):
        for pair, diff in rrc[operation].items():
            if diff is not None:
                assert diff["max"] <= 5 and diff["mean"] <= 2.6, (operation, pair, diff)
    table = CliRunner().invoke(cli, ["parity", str(keep_aspect_build), "--samples", "2"])
    assert table.exit_code == 0 and "resize" in table.output and "torch vs reference" in table.output


def test_parity_bad_input(photo_build, keep_aspect_build, tmp_path):
    result = CliRunner().invoke(cli, ["parity", str(photo_build)])
    assert result.exit_code == 2 and "stats.npz is missing" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, ["parity", str(keep_aspect_build), "--recipe", "paper"])
    assert result.exit_code == 2 and "keep-aspect" in result.output
