"""The module map in docs/design.md is the code's: every import of our own modules,
deferred ones included, goes to a lower layer (so there are no cycles), every library
module is in the map, and the README's layout table names the folders that exist."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("imagenet_prep", "model")


def module_map() -> dict[str, int]:
    """{"imagenet_prep.loaders": 6, …} from the layer table of docs/design.md."""
    rows = re.findall(r"^\| (\d+) \| `([\w.]+)` \|", (ROOT / "docs" / "design.md").read_text(), re.M)
    return {name: int(layer) for layer, name in rows}


def own_imports(path: Path) -> set[str]:
    """The alexprep modules a file imports, anywhere in it, without the `alexprep.` prefix."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alexprep."):
            base = node.module.removeprefix("alexprep.")
            for alias in node.names:  # `from alexprep.imagenet_prep import augment`
                found.add(f"{base}.{alias.name}" if base in LIBRARY else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("alexprep.") for a in node.names if a.name.startswith("alexprep.")}
    return found


def library_modules() -> dict[str, Path]:
    return {f"{folder}.{p.stem}": p for folder in LIBRARY for p in (ROOT / folder).glob("*.py")
            if p.stem != "__init__"}


def test_every_library_module_is_in_the_map():
    assert sorted(library_modules()) == sorted(module_map())


def test_imports_go_down_the_layers():
    layers = module_map()
    wrong = []
    for name, path in library_modules().items():
        for target in own_imports(path):
            if target.startswith("cli"):
                wrong.append(f"{name} imports {target}: the library never imports the CLI")
            elif target != name and layers.get(target, 99) >= layers[name]:
                wrong.append(f"{name} (layer {layers[name]}) imports {target} (layer {layers.get(target)})")
    assert wrong == []


def test_the_model_file_stands_alone():
    assert own_imports(ROOT / "model" / "alexnet.py") <= {"model.alexnet"}  # its docstring example aside


def test_readme_layout_names_real_folders():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    folders = re.findall(r"^\| `([\w/]+)/` \|", table, re.M)
    assert folders and all((ROOT / f).is_dir() for f in folders)
    for folder in ("imagenet_prep", "model", "cli", "benchmarks", "tests", "docs"):
        assert folder in folders


# ---------------------------------------------------------------------------- the fast tier
TIERED = ("imagenet_prep", "model", "cli")


def tiered_modules() -> dict[str, Path]:
    """Every module under imagenet_prep/, model/ and cli/, {"cli.main": path, …}."""
    return {f"{folder}.{p.stem}": p for folder in TIERED for p in sorted((ROOT / folder).glob("*.py"))
            if p.stem != "__init__"}


def reached(start: set[str]) -> set[str]:
    """The modules `start` imports, directly or through the modules they import."""
    paths, seen, todo = tiered_modules(), set(), set(start)
    while todo:
        name = todo.pop()
        if name in seen or name not in paths:
            continue
        seen.add(name)
        todo |= own_imports(paths[name])
    return seen


def test_every_module_imports():
    """The fast tier's "import all": each module imports alone, in a fresh namespace of this process."""
    import importlib

    for name in tiered_modules():
        assert importlib.import_module(f"alexprep.{name}").__name__ == f"alexprep.{name}"


def test_the_fast_tier_has_a_test_of_every_module():
    """tests/conftest.py's FAST_TESTS names, for each module, a test that exists and whose
    file reaches the module through its imports (the test file's imports, then theirs)."""
    from tests.conftest import FAST_IMPORTS, FAST_TESTS

    assert sorted(FAST_TESTS) == sorted(tiered_modules()), "add the new module's row to FAST_TESTS"
    wrong = []
    for module, test in sorted(FAST_TESTS.items()):
        file, _, name = test.partition("::")
        path = ROOT / "tests" / file
        names = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        if name.partition("[")[0] not in names:
            wrong.append(f"{test} ({module}): no such test")
        elif module not in reached(own_imports(path)):
            wrong.append(f"{test} does not import {module}, not even through the modules it imports")
    assert wrong == []
    assert FAST_IMPORTS.partition("::")[2] in {n for n in globals() if n.startswith("test_")}
