"""The command line: every command explains itself; bad use is one line and exit code 2."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from alexprep.cli.main import cli
from alexprep.imagenet_prep.sample_data import write_photo_tree


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from all_commands(command, prefix + (name,))


@pytest.mark.parametrize("path", [p for p, _ in all_commands(cli)], ids=" ".join)
def test_every_command_has_a_summary_and_an_example(path):
    result = run(*path, "--help")
    assert result.exit_code == 0
    command = dict(all_commands(cli))[path]
    assert command.short_help or command.help, path
    assert "Example:" in result.output, f"{' '.join(path)} --help has no Example: block"


def test_version_and_info():
    assert run("--version").output.startswith("alexprep, version ")
    result = run("info", "--json")
    report = json.loads(result.output)
    assert result.exit_code == 0
    assert report["pil"]["name"] in ("pillow-simd", "Pillow") and report["torch"] and report["pyarrow"]
    assert "PIL:" in run("info").output


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_src")
    write_photo_tree(root, classes=2, train_per_class=3, val_per_class=1, seed=2)
    return root


def test_build_then_verify(src, tmp_path):
    out = tmp_path / "out"
    result = run("build-shards", src, out, "--shard-size", "2", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "train: 6 written, 0 skipped" in result.output and "val: 2 written" in result.output
    result = run("verify", out, "--decode")
    assert result.exit_code == 0 and "all good" in result.output
    (out / "val" / "val-00000-of-00001.arrow").write_bytes(b"oops")
    result = run("verify", out)
    assert result.exit_code == 1 and "val-00000-of-00001.arrow has 4 bytes" in result.output


def test_on_error_fail_lists_everything_then_exits_1(src, tmp_path):
    tree = tmp_path / "src"
    shutil.copytree(src, tree)
    (tree / "train" / "n00000001" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tree / "train" / "n00000002" / "empty.JPEG").write_bytes(b"")
    result = run("build-shards", tree, tmp_path / "out", "--workers", "1", "--on-error", "fail")
    assert result.exit_code == 1
    assert "train/n00000001/broken.JPEG:" in result.output and "train/n00000002/empty.JPEG: empty file" in result.output
    result = run("build-shards", tree, tmp_path / "out2", "--workers", "1")
    assert result.exit_code == 0 and "skipped 2 unreadable file(s)" in result.output


def assert_usage_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_bad_use_is_one_line_and_exit_2(src, tmp_path):
    assert_usage_error(run("build-shards", tmp_path / "nope", tmp_path / "out"), "does not exist")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_usage_error(run("build-shards", a_file, tmp_path / "out"), "is not a folder")
    assert_usage_error(run("build-shards", src, a_file), "is a file, not a folder")
    empty = tmp_path / "empty"
    (empty / "train" / "n01").mkdir(parents=True)
    (empty / "train" / "n01" / "README.txt").write_text("no images here")
    assert_usage_error(run("build-shards", empty, tmp_path / "out"), "no image files found")
    assert_usage_error(run("build-shards", src, tmp_path / "out", "--part", "3/3"), "0 <= i < N")
    assert_usage_error(run("build-shards", src, tmp_path / "out", "--part", "x"), "is not i/N")
    assert_usage_error(run("build-shards", src, tmp_path / "out", "--quality", "0"), "--quality")
    assert_usage_error(run("build-shards", src, tmp_path / "out", "--frobnicate"), "No such option")
    assert_usage_error(run("verify", tmp_path / "nothing"), "not a build folder")


def test_out_holding_another_build_offers_overwrite(src, tmp_path):
    out = tmp_path / "out"
    assert run("build-shards", src, out, "--workers", "1").exit_code == 0
    assert_usage_error(run("build-shards", src, out, "--workers", "1", "--quality", "80"), "holds a different build", "--overwrite")
    assert run("build-shards", src, out, "--workers", "1", "--quality", "80", "--overwrite").exit_code == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_out_not_writable(src, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_usage_error(run("build-shards", src, locked, "--workers", "1"), "not writable")


def test_demo_without_scikit_learn_names_the_extra(tmp_path, monkeypatch):
    import sys

    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("the demo must not clear its folder before it can run")
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` now fails as if not installed
    result = run("demo", "--out", work)
    assert_usage_error(result, "needs scikit-learn", "pip install 'alexprep[demo]'")
    assert len(result.output.strip().splitlines()) == 1
    assert (work / "keep.txt").exists()
