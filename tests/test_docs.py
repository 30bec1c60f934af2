"""The documents against the code and the results: the README's examples run as written
(DALI or not, `~` paths and all), and every benchmark table or number marked in README.md,
benchmarks/README.md and docs/design.md is what `benchmarks/tables.py` makes from
`benchmarks/results/`."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from alexprep.cli.main import cli
from alexprep.imagenet_prep.sample_data import write_photo_tree
from benchmarks import tables

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"README.md: {len(found)} python blocks contain {containing!r}"
    return found[0]


def _edit(code: str, old: str, new: str) -> str:
    """The README's code with one call made small or CPU-only; fails if the README changed it."""
    assert old in code, f"README.md's example no longer has {old!r}: update this test with it"
    return code.replace(old, new)


# ---------------------------------------------------------------------------- generated tables
def test_every_marked_block_is_what_the_results_make():
    used = set()
    for path in tables.DOCUMENTS:
        text = path.read_text()
        names = tables.names_in(text)
        assert names, f"{path} has no generated blocks"
        assert tables.render(text) == text, f"{path}: run python -m benchmarks.tables --write"
        used |= {n.partition("-")[0] for n in names}
    assert used == set(tables.BLOCKS), f"made but never used: {set(tables.BLOCKS) - used}"


def test_a_hand_edited_number_is_caught():
    """A digit changed by hand inside any block is put back (and so fails the test above)."""
    assert tables.main([]) == 0
    for path in tables.DOCUMENTS:
        text = path.read_text()
        for block in tables.BLOCK.finditer(text):
            digit = re.search(r"\d", block["body"])
            at = block.start("body") + digit.start()
            edited = text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:]
            assert tables.render(edited) == text, (path.name, block["name"])


def test_the_numbers_the_issue_found_disagreeing_are_generated():
    """Issue 31's examples stay inside generated blocks (a block removed would let them drift)."""
    readme = README.read_text()
    generated = "".join(m["body"] for m in tables.BLOCK.finditer(readme))
    prep, scale = tables.load("prep_throughput"), tables.load("scale")
    build = next(c for c in scale["costs"] if c["stage"].startswith("build-shards"))
    for number in (tables.times(prep["ratios"]["a_over_b_plain (target >= 2)"]),  # was 4.3x by hand
                   tables.spread(prep["ratios_per_repeat"]["two_workers_over_one"]),  # was 1.7-1.8x
                   f"{build['imagenet_16core_s'] / 60:.1f} min on 16 cores",  # was 4-6 min
                   tables.shard_mb()):  # was ~40 MB
        assert number in generated, number
    for stale in ("**4.3×**", "1.7–1.8×", "4–6 min on 16 cores", "~40 MB", "under ~10 min"):
        assert all(stale not in path.read_text() for path in tables.DOCUMENTS), stale


# ---------------------------------------------------------------------------- README's examples
def test_the_loader_example_runs_without_dali(stats_build, monkeypatch):
    """The default backend, "auto", is the torch one where DALI does not import."""
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now fails
    code = _python_block('train = train_loader("out/", batch_size=128')
    code = _edit(code, '"out/"', repr(str(stats_build)))
    code = _edit(code, 'device="cuda:0"', 'device="cpu"')
    code = _edit(code, "batch_size=128", "batch_size=8")
    code = _edit(code, "batch_size=50", "batch_size=4")
    space = {}
    exec(compile(code, "README.md", "exec"), space)
    try:
        assert space["train"].config.backend == space["val"].config.backend == "torch"
        assert tuple(space["images"].shape) == (8, 3, 224, 224) and tuple(space["labels"].shape) == (8,)
        images, labels = next(iter(space["val"]))
        assert tuple(images.shape) == (4, 10, 3, 224, 224)
    finally:
        space["train"].close()
        space["val"].close()


def test_the_python_api_example_runs_with_a_tilde_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_photo_tree(tmp_path / "home" / "imagenet", classes=3, train_per_class=4, val_per_class=2, seed=3)
    monkeypatch.chdir(tmp_path)
    code = _python_block('build_shards("~/imagenet"')
    code = _edit(code, 'devices=("cuda:0", "cuda:1")', 'devices=("cpu", "cpu")')
    code = _edit(code, "TrainConfig())", "TrainConfig(batch_size=8, max_steps=1, backend='torch', loader_workers=0))")
    exec(compile(code, "README.md", "exec"), {})
    assert {"classes.json", "stats.npz", "train", "val"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert (tmp_path / "runs" / "alexnet" / "config.json").is_file()
    assert not (tmp_path / "~").exists()


def test_cli_paths_expand_a_tilde(tmp_path, monkeypatch):
    """A shell leaves `~` alone when quoted or after `=`: the commands expand it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_photo_tree(tmp_path / "tree", classes=2, train_per_class=3, val_per_class=1, seed=5)
    monkeypatch.chdir(tmp_path / "tree")  # a `~` folder made here would be the bug
    runner = CliRunner()
    result = runner.invoke(cli, ["build-shards", "~/tree", "--workers", "1", "~/out"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "train" / "manifest.json").is_file()
    assert runner.invoke(cli, ["verify", "~/out"]).exit_code == 0
    assert runner.invoke(cli, ["stats", "~/out"]).exit_code == 0 and (tmp_path / "out" / "stats.npz").is_file()
    assert not (tmp_path / "tree" / "~").exists()


@pytest.mark.parametrize("backend", ["auto", "dali", "torch"])
def test_the_train_backend_default_is_resolved_where_the_loaders_resolve_it(backend, monkeypatch):
    from alexprep.imagenet_prep.loaders import LoaderConfig
    from alexprep.model.config import TrainConfig

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    assert TrainConfig().backend == "auto" and LoaderConfig(batch_size=1).backend == "torch"
    assert LoaderConfig(batch_size=1, backend=backend).backend == ("torch" if backend == "auto" else backend)
