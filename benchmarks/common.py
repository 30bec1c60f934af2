"""What every benchmark shares: the machine it ran on, timing statistics, where results go,
the one bar chart, and the corpus -> build -> statistics set-up.

Results: every benchmark writes `<name>.json` and `<name>.png` into `--out` (default
`benchmarks/out/`, ignored by git, so that a run leaves the checkout clean); `--publish`
also copies them into the tracked `benchmarks/results/`, which the READMEs cite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"  # default output folder, git-ignored
PUBLISHED = HERE / "results"  # tracked: what the READMEs cite


# ---------------------------------------------------------------------------- the machine
def machine() -> dict:
    """CPU model, cores, GPU if any, and the versions that decide the numbers (the same
    report as `alexprep info`)."""
    from alexprep.cli.info import environment_report

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    report = environment_report()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, **report, "gpu": (report["cuda_devices"] or [None])[0]}


def summary(values: list[float]) -> dict:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio_summary(numerators: list[float], denominators: list[float]) -> dict:
    """A ratio measured in each repeat (numerator and denominator from the same repeat):
    median and spread over the repeats, and the ratio of the medians."""
    per_repeat = [a / b for a, b in zip(numerators, denominators)]
    return {**summary(per_repeat), "of_medians": statistics.median(numerators) / statistics.median(denominators),
            "per_repeat": per_repeat}


# ---------------------------------------------------------------------------- results
def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for <name>.json and .png (default {OUT.relative_to(HERE.parent)}/, git-ignored)")
    parser.add_argument("--publish", action="store_true",
                        help=f"also copy them into the tracked {PUBLISHED.relative_to(HERE.parent)}/")


def check_work(parser: argparse.ArgumentParser, work: Path | None) -> None:
    """A --work folder must be new or empty: the builds are written into it, never reused."""
    if work is not None and work.exists() and (not work.is_dir() or any(work.iterdir())):
        parser.error(f"--work {work}: not an empty folder; give a new or empty one (the corpus is built there)")


def out_dir(args) -> Path:
    out = Path(args.out) if getattr(args, "out", None) else OUT
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_result(name: str, payload: dict, out: Path | None = None) -> Path:
    out = Path(out) if out is not None else OUT
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def publish(name: str, out: Path | None = None) -> list[Path]:
    """Copy `<name>.json` and `<name>.png`, and the CUDA run's `<name>_cuda.*`, whichever
    exist, from `out` into benchmarks/results/ (nothing else: a skip report never replaces
    real numbers there)."""
    out = Path(out) if out is not None else OUT
    PUBLISHED.mkdir(parents=True, exist_ok=True)
    copied = []
    for stem in (name, f"{name}_cuda"):
        for suffix in (".json", ".png"):
            src = out / f"{stem}{suffix}"
            if src.exists() and src.resolve() != (PUBLISHED / src.name).resolve():
                shutil.copyfile(src, PUBLISHED / src.name)
                copied.append(PUBLISHED / src.name)
    return copied


def finish(name: str, payload: dict, args, plot=None) -> Path:
    """Write the JSON (and the PNG through `plot(payload, png_path)`), publish on request."""
    out = out_dir(args)
    path = write_result(name, payload, out)
    if plot is not None:
        plot(payload, out / f"{name}.png")
    if getattr(args, "publish", False):
        for p in publish(name, out):
            print(f"published {p}")
    print(f"wrote {path}")
    return path


# ---------------------------------------------------------------------------- the one chart
def bar_chart(path: Path, categories: list[str], series: dict[str, list[float]], *,
              spread: dict[str, list[tuple[float, float]]] | None = None, horizontal: bool = False,
              colors: list[str] | None = None, notes: list[str] | None = None, value_labels: bool = False,
              title: str = "", value_axis: str = "", figsize: tuple[float, float] | None = None) -> Path | None:
    """Bars of `series` (name -> one value per category), grouped when there are several
    series. spread: name -> (min, max) per value, drawn as whiskers. colors: one per
    category (single series only). notes: a text per category written at the bar's foot;
    value_labels: the value written at each bar's end. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return None
    names = list(series)
    n = len(categories)
    if figsize is None:
        figsize = (9, 0.4 * n * max(1, len(names) // 2) + 1.5) if horizontal else (max(6, 0.9 * n * len(names) + 2), 4.5)
    fig, ax = plt.subplots(figsize=figsize)
    width = 0.8 / len(names)
    base = np.arange(n)
    for i, name in enumerate(names):
        values = np.asarray(series[name], float)
        where = base + (i - (len(names) - 1) / 2) * width
        err = None
        if spread and name in spread:
            lo_hi = np.asarray(spread[name], float)
            err = [values - lo_hi[:, 0], lo_hi[:, 1] - values]
        color = colors if (colors and len(names) == 1) else None
        label = name if len(names) > 1 else None
        if horizontal:
            ax.barh(where, values, width, xerr=err, color=color, label=label)
        else:
            ax.bar(where, values, width, yerr=err, color=color, label=label)
        for w, v in zip(where, values) if value_labels else ():
            _bar_text(ax, horizontal, w, v, f"{v:.0f}")
    for w, text in zip(base, notes or ()):
        _bar_text(ax, horizontal, w, 0, text)
    if horizontal:
        ax.set_yticks(base, categories, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(value_axis)
    else:
        ax.set_xticks(base, categories, fontsize=8)
        ax.set_ylabel(value_axis)
    if len(names) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return Path(path)


def _bar_text(ax, horizontal: bool, position: float, value: float, text: str) -> None:
    """`text` at a bar's `value` end (or foot, for 0), beside or above it."""
    if horizontal:
        ax.text(value, position, f" {text}", va="center", fontsize=8)
    else:
        ax.text(position, value, text, ha="center", va="bottom", fontsize=8)


# ---------------------------------------------------------------------------- the data
def corpus(folder: Path, images: int, seed: int = 0) -> list[Path]:
    """`images` real-photo JPEGs with ImageNet's mix of sizes and qualities, in
    folder/train/<wnid>/ (sample_data.write_corpus)."""
    from alexprep.imagenet_prep.sample_data import write_corpus

    return write_corpus(Path(folder), images, seed=seed)


def prepared_build(work: Path, images: int, *, encodings=("jpeg",), val_images: int = 0, shard_size: int = 64,
                   workers: int | None = None, seed: int = 0, resize: str = "center-crop") -> dict:
    """The corpus -> build-shards -> statistics set-up every loader and trainer benchmark
    needs: `images` train JPEGs (and `val_images` val ones) in work/src, one build per
    encoding in work/out-<encoding> (shards of `shard_size`), each with OUT/stats.npz from
    its partials. resize="keep-aspect": whole images, shorter side 256, longer at most 512
    (the RandomResizedCrop recipe's builds). Returns {"src": train folder, "builds":
    {encoding: OUT}, "stats": DatasetStats of the first build, "images": train images}."""
    from alexprep.imagenet_prep.build import BuildConfig, build_shards
    from alexprep.imagenet_prep.stats import compute_stats
    from alexprep.imagenet_prep.transform import ImageSpec

    work = Path(work)
    src = work / "src"
    paths = corpus(src, images, seed=seed)
    if val_images:
        corpus(work / "valsrc", val_images, seed=seed + 1)
        shutil.move(str(work / "valsrc" / "train"), str(src / "val"))
        shutil.rmtree(work / "valsrc", ignore_errors=True)
    builds, stats = {}, None
    for encoding in encodings:
        out = work / f"out-{encoding}"
        config = BuildConfig(spec=ImageSpec(encoding=encoding, resize=resize), shard_size=shard_size,
                             **({"workers": workers} if workers else {}))
        build_shards(src, out, config)
        builds[encoding] = out
        s = compute_stats(out)
        s.save(out / "stats.npz")  # what the loaders and the trainer read
        stats = stats or s
    return {"src": src / "train", "builds": builds, "stats": stats, "images": len(paths)}


# ---------------------------------------------------------------------------- FFCV's venv
FFCV_VENV = HERE / ".ffcv-venv"
FFCV_LOG = HERE / ".ffcv-venv.log"
FFCV_SIDE = HERE / "ffcv_side.py"


def ffcv_python() -> tuple[Path | None, dict]:
    """(FFCV venv's python, its versions) where `make ffcv-env` made it; else (None,
    {"skipped": why}), quoting the end of the set-up log."""
    import subprocess

    python = FFCV_VENV / "bin" / "python"
    if not (FFCV_VENV / ".done").exists() or not python.exists():
        why = "benchmarks/.ffcv-venv does not exist: run `make ffcv-env`"
        if FFCV_LOG.exists():
            tail = [l for l in FFCV_LOG.read_text(errors="replace").splitlines() if l.strip()][-4:]
            why = f"`make ffcv-env` failed; the end of {FFCV_LOG.name}: " + " | ".join(tail)
        return None, {"skipped": why}
    try:
        got = subprocess.run([str(python), str(FFCV_SIDE), "version"], capture_output=True, text=True, check=True,
                             timeout=120)
        return python, json.loads(got.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        err = getattr(exc, "stderr", "") or ""
        return None, {"skipped": f"ffcv does not import in {FFCV_VENV.name}: {exc} {err.strip()[-300:]}"}


class FfcvChild:
    """A script in FFCV's venv that answers each request line on stdin with one JSON line
    (its first, {"ready": ...}, once its Loaders are built): FFCV's loaders are timed in
    their own process and alternate with ours. `ask(line)` -> the answer."""

    def __init__(self, cmd: list[str], what: str):
        import subprocess

        self.what = what
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._answer()["ready"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.what} ended (exit code {self.proc.wait()}); its errors are above")
        return json.loads(line)

    def ask(self, request: str) -> dict:
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
