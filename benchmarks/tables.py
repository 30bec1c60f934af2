"""The documents' benchmark tables and numbers, made from `benchmarks/results/*.json`.

    python -m benchmarks.tables            # exit 1 and name the blocks that differ
    python -m benchmarks.tables --write    # rewrite them in README.md, benchmarks/README.md, docs/*.md

A block is whatever lies between `<!-- tables:NAME -->` and `<!-- /tables:NAME -->` (a
table on lines of its own, or a number inside a sentence); NAME is a function below. The
JSON is the truth: a published run changes the documents only through this script, and
tests/test_docs.py fails while a committed block differs from what it makes.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# README.md, benchmarks/README.md and every page of docs/ (design.md, build.md, loaders.md, …)
DOCUMENTS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md")))
BLOCK = re.compile(r"<!-- tables:(?P<name>[\w-]+) -->(?P<body>.*?)<!-- /tables:(?P=name) -->", re.S)
X = "\u00d7"  # the multiplication sign every ratio is written with


# ---------------------------------------------------------------------------- formatting
def num(v: float) -> str:
    """1,163 (whole numbers above 100), 34.2, 0.86."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def times(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}{X}"


def spread(d: dict, digits: int = 2) -> str:
    """A per-repeat ratio: its median (min–max)."""
    return f"{times(d['median'], digits)} ({d['min']:.{digits}f}–{d['max']:.{digits}f})"


def rate(d: dict) -> str:
    """Images/s: median (min–max)."""
    return f"{num(d['median'])} ({num(d['min'])}–{num(d['max'])})"


def pct(v: float) -> str:
    return f"{v * 100:+.0f}%"


def table(header: tuple, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


# ---------------------------------------------------------------------------- README.md
def headline() -> str:
    """README's headline ratios, each against its baseline in the same run."""
    p, lo, rrc, step = load("prep_throughput"), load("loader_throughput"), load("loader_throughput_rrc"), \
        load("train_step")
    pr, lr, rr = p["ratios_per_repeat"], lo["ratios_per_epoch"], rrc["ratios_per_epoch"]
    per_core = p["per_image_images_per_s_one_core"]
    tt = {(r["placement"], r["precision"]): r for r in load("train_throughput")["rows"] if r["model"] == "alexprep"}
    gpu, follow = load("gpu_check_h200")["sections"], load("gpu_check_h200_followup")["sections"]
    model = {(r["layout"], r["precision"]): r for r in gpu["model"]["rows"] if r["model"] == "alexprep"}
    loader = {r["name"]: r["images_per_s"] for r in gpu["loader"]["rows"]}
    compare = follow["two_device"]["compare"]
    resume = {r["mode"]: r for r in gpu["resume"]["rows"]}
    wait = {b: step["backends"][b]["data_wait_fraction"] for b in ("dali", "torch")}
    rows = [
        ("build-shards per core vs the plain stock-Pillow path",
         f"**{times(p['ratios']['a_over_b_plain (target >= 2)'])}** ({num(per_core['a_build_shards_path']['all']['median'])}"
         f" vs {num(per_core['b_plain_stock_pillow']['all']['median'])} images/s)"),
        ("build-shards vs FFCV 1.0.2's `DatasetWriter` (same JPEGs), 1 worker",
         f"**{spread(pr['build_shards_over_ffcv_writer_1_worker'])}**"),
        ("build-shards, 2 workers vs 1 (target 1.8×)", f"{spread(pr['two_workers_over_one'])}; CPU per image "
         f"{times(pr['two_workers_cpu_over_one']['median'])}"),
        ("cost of the exact statistics per image (target ≤ 10%)",
         f"{pct(pr['stats_overhead_per_image']['median'])}; CPU time "
         f"{pct(pr['stats_overhead_per_image_cpu_time']['median'])}"),
        ("DALI from Arrow / torch backend vs FFCV 1.0.2 as its users run it (same JPEGs; FFCV's own pipeline does "
         "no mean image, no lighting; targets ≥ 1.0× / ≥ 0.85×)",
         f"**{spread(lr['dali_arrow_over_ffcv_jpeg'])}** / **{spread(lr['torch_twin_over_ffcv_jpeg'])}**"),
        ("same work per image: DALI from Arrow vs FFCV with our numba operation, JPEG / raw",
         f"{spread(lr['dali_arrow_over_ffcv_paperop_jpeg'])} / {spread(lr['dali_arrow_raw_over_ffcv_paperop_raw'])}"),
        ("DALI from Arrow vs a torchvision-style ImageFolder loop (same augmentations)",
         f"**{spread(lr['dali_arrow_over_imagefolder_original'], 1)}**"),
        ("DALI from Arrow vs DALI's own file reader over the same JPEGs", spread(lr["dali_arrow_over_dali_files"])),
        ("RandomResizedCrop: DALI / torch backend vs FFCV's own `RandomResizedCropRGBImageDecoder` pipeline "
         "(target ≥ 1.0× for DALI)",
         f"**{spread(rr['rrc_dali_over_rrc_ffcv_jpeg'])}** / {spread(rr['rrc_torch_over_rrc_ffcv_jpeg'])}"),
        ("time the CPU trainer waits for data, DALI / torch backend",
         f"{wait['dali'] * 100:.1f}% / {wait['torch'] * 100:.1f}%"),
        ("AlexNet training step vs torchvision's architecture, CPU fp32, batch 32: one device / towers split",
         f"{times(tt[('one-device', 'fp32')]['vs_reference'])} / {times(tt[('two-device', 'fp32')]['vs_reference'])}"),
        ("the same on an H200, batch 128: fp32 / bf16",
         f"**{times(model[('nchw', 'fp32')]['vs_torchvision'])}** / {times(model[('nchw', 'bf16')]['vs_torchvision'])}"
         f" ({num(model[('nchw', 'fp32')]['images_per_s'])} / {num(model[('nchw', 'bf16')]['images_per_s'])} images/s)"),
        ("torch loader on the H200 (16 cores): PIL in 16 workers vs nvJPEG, batched",
         f"{times(loader['jpeg/pil'] / loader['jpeg/torchvision'], 1)} ({num(loader['jpeg/pil'])} vs "
         f"{num(loader['jpeg/torchvision'])} images/s)"),
        ("towers on `cuda:0` and the CPU vs one GPU: conv1's gradient against float64",
         f"{compare['split_vs_float64']['grad_worst'] * 100:.1f}% vs {compare['one_vs_float64']['grad_worst'] * 100:.1f}%"),
        ("resume on the H200 after 35 of 70 steps: deterministic, new process / same process / default",
         " / ".join(_resume_cell(resume[m]) for m in ("deterministic_new_process", "deterministic_same_process",
                                                      "default_same_process"))),
    ]
    sources = ("prep_throughput",) * 4 + ("loader_throughput",) * 4 + (
        "loader_throughput_rrc", "train_step", "train_throughput", "gpu_check_h200", "gpu_check_h200",
        "gpu_check_h200_followup", "gpu_check_h200")
    assert len(sources) == len(rows)
    return table(("", "ratio", "from"), [(*row, _result_link(s)) for row, s in zip(rows, sources)])


def _result_link(name: str) -> str:
    """A link from README.md to a result file (the headline table lives in README.md only)."""
    return f"[{name}.json](benchmarks/results/{name}.json)"


def _resume_cell(row: dict) -> str:
    return "bit-exact" if row["exact"] else f"max \\|Δw\\| {row['weights']['max_abs_diff']:.1e}"


def _bytes_per_image() -> list[float]:
    """A q95 image in a shard: prep_throughput's real photos, scale.py's ImageNet-like ones."""
    builds = load("scale")["results"].values()
    return [load("prep_throughput")["output_bytes_per_image"]["build-shards"]] + \
        [b["build"]["shard_bytes"] / b["build"]["written"] for b in builds]


def _size(n: float) -> str:
    return f"~{n / 1e12:.1f} TB" if n >= 1e12 else f"~{n / 1e9:.0f} GB" if n >= 1e10 else \
        f"~{n / 1e9:.1f} GB" if n >= 1e9 else f"~{n / 1e6:.0f} MB"


def shard_mb() -> str:
    """A 1,024-image shard (the default --shard-size)."""
    per_image = _bytes_per_image()
    return f"{min(per_image) * 1024 / 1e6:.0f}–{max(per_image) * 1024 / 1e6:.0f} MB"


def shards(n: int) -> str:
    """n such shards (at the larger bytes per image)."""
    return _size(n * 1024 * max(_bytes_per_image()))


def images(n: int) -> str:
    """n images' bytes: 1281167 for ImageNet's train split, 3000 for a second at 3,000 images/s."""
    return _size(n * max(_bytes_per_image()))


def _cost(stage: str) -> dict:
    return next(c for c in load("scale")["costs"] if c["stage"] == stage)


def _rss(stage: str) -> dict:
    return next(c for c in load("scale")["rss"] if c["stage"] == stage)


def scale() -> str:
    """README's scale table (benchmarks/scale.py, 10k -> 100k images, extrapolated)."""
    s = load("scale")
    build, index = _cost("build-shards (train)"), s["imagenet_index"]
    ms = [v * 1e3 for v in build["per_image_at_size_s"]]
    load_t, load_d = _cost("loading, per image [torch]"), _cost("loading, per image [dali]")
    held, peak = _rss("loaders [torch]: numpy+Python held (tracemalloc)"), \
        _rss("loaders [torch]: numpy+Python peak (tracemalloc)")
    main, anon = _rss("build-shards main"), _rss("build-shards, all processes: median anon PSS")
    rows = [
        (f"build-shards, {s['build_workers']} workers", f"{min(ms):.1f}–{max(ms):.1f} ms of CPU per image, "
         f"{pct(build['per_image_growth'])}", f"{build['imagenet_1core_s'] / 60:.0f} core-minutes, "
         f"{build['imagenet_16core_s'] / 60:.1f} min on 16 cores"),
        ("loading, per image (DALI CPU / torch)",
         f"{load_d['per_image_s'] * 1e3:.1f} / {load_t['per_image_s'] * 1e3:.1f} ms of CPU, "
         f"{pct(load_d['per_image_growth'])} / {pct(load_t['per_image_growth'])}",
         f"{load_d['imagenet_1core_s'] / 60:.0f} / {load_t['imagenet_1core_s'] / 60:.0f} core-minutes an epoch"),
        ("`train_loader()` construction (torch / DALI), measured at 1.28M rows", "",
         f"{index['torch']['train_loader_s']:.1f} / {index['dali']['train_loader_s']:.1f} s"),
        ("epoch plan / first batch (torch / DALI), measured", "",
         f"{index['torch']['plan_s']:.1f} / {index['dali']['plan_s']:.1f} s and "
         f"{index['torch']['first_batch_s']:.1f} / {index['dali']['first_batch_s']:.1f} s"),
        ("opening the index, cold page cache, measured", "",
         f"{index['split_samples_cold_s']:.1f} s, reading {index['cold_read_mb']:.0f} MB of "
         f"{index['shard_mb'] / 1e3:.1f} GB of shards"),
        ("loaders' memory per sample (Python + numpy)", f"{held['bytes_per_sample']:.0f} bytes held, "
         f"{peak['bytes_per_sample']:.0f} at peak", f"~{peak['imagenet_mb']:.0f} MB"),
        ("build-shards' memory per file: main process / all (median anonymous PSS)",
         f"{main['bytes_per_sample']:.0f} / {anon['bytes_per_sample']:.0f} bytes",
         f"~{main['imagenet_mb']:.0f} / ~{anon['imagenet_mb']:.0f} MB"),
        ("a 1,000-class checkpoint: save / load", f"{_cost('checkpoint save')['fixed_s']:.1f} / "
         f"{_cost('checkpoint load')['fixed_s']:.1f} s", ""),
    ]
    return table(("", "measured, 10k → 100k", "extrapolated to ImageNet-1k (1.28M images)"), rows)


def scale_largest_build() -> str:
    """Wall time of scale.py's largest build."""
    size, result = max(load("scale")["results"].items(), key=lambda item: int(item[0]))
    return f"{int(size) // 1000}k build alone took {result['build']['wall_s'] / 60:.1f} minutes"


# ---------------------------------------------------------------------------- benchmarks/README.md
PREP_PATHS = (("a_build_shards_path", "(a) build-shards' per-image path (draft decode, box resize, q95 encode, "
               "statistics)"), ("a_without_stats", "(a) without statistics"), ("b_plain_stock_pillow",
               "(b) plain stock Pillow"), ("c_opencv", "(c) OpenCV"), ("d_decode_only_draft",
               "(d) decode only, with draft"))


def prep_per_image() -> str:
    per_core = load("prep_throughput")["per_image_images_per_s_one_core"]
    return table(("path", "images/s on one core (median)"),
                 [(label, num(per_core[key]["all"]["median"])) for key, label in PREP_PATHS])


def prep_whole() -> str:
    p = load("prep_throughput")
    w, size = p["whole_build_images_per_s"], p["output_bytes_per_image"]
    rows = [("build-shards, 1 worker", rate(w["1 worker"]), f"{size['build-shards']:,.0f} (256×256 q95)"),
            ("build-shards, 2 workers", rate(w["2 workers"]), ""),
            ("FFCV 1.0.2 `DatasetWriter`, `RGBImageField(max_resolution=256, jpeg_quality=95)`, 1 worker",
             rate(w["ffcv writer, 1 worker"]), f"{size['ffcv']:,.0f} (longer side 256, aspect kept: fewer pixels)"),
            ("FFCV, 2 workers", rate(w["ffcv writer, 2 workers"]), "")]
    return table((f"whole build of {p['whole_build_images']:,} images (listing, workers, Arrow or .beton writing)",
                  "images/s (median, min–max)", "output bytes per image"), rows)


def prep_ratios() -> str:
    p = load("prep_throughput")
    r, pr, rss = p["ratios"], p["ratios_per_repeat"], p["peak_rss_mb"]
    sizes = sorted(rss, key=int)
    rows = [
        ("build-shards / FFCV's writer, 1 worker", f"**{spread(pr['build_shards_over_ffcv_writer_1_worker'])}**",
         "≥ 1.5×"),
        ("build-shards / FFCV's writer, 2 workers", spread(pr["build_shards_over_ffcv_writer_2_workers"]), ""),
        ("(a) / (b) plain Pillow", f"**{times(r['a_over_b_plain (target >= 2)'])}**", "≥ 2×"),
        ("(a) / (c) OpenCV", times(r["a_over_c_opencv"]), ""),
        ("(a) / (d) decode-only", f"{spread(pr['a_over_d'])}; CPU time {spread(pr['a_over_d_cpu_time'])}",
         "≥ 0.6 (missed: the statistics, below, are what separates them)"),
        ("statistics' cost per image", f"{pct(pr['stats_overhead_per_image']['median'])} "
         f"({pct(pr['stats_overhead_per_image']['min'])} to {pct(pr['stats_overhead_per_image']['max'])}) per repeat; "
         f"CPU time {pct(pr['stats_overhead_per_image_cpu_time']['median'])}", "≤ 10% (missed; see below)"),
        ("statistics' cost, whole build", f"{pct(pr['stats_overhead_whole_build']['median'])} "
         f"({pct(pr['stats_overhead_whole_build']['min'])} to {pct(pr['stats_overhead_whole_build']['max'])})", ""),
        ("2 workers / 1 worker (whole builds)", f"{spread(pr['two_workers_over_one'])}; CPU per image "
         f"{spread(pr['two_workers_cpu_over_one'])}", "≥ 1.8 (missed; see below)"),
        (f"peak RSS, {int(sizes[0]):,} vs {int(sizes[-1]):,} images", f"{rss[sizes[0]]:.0f} MB vs "
         f"{rss[sizes[-1]]:.0f} MB", "flat"),
    ]
    return table(("ratio (per repeat: median, min–max)", "measured", "target"), rows)


_FFCV_OWN = ("its own pipeline: `RandomResizedCropRGBImageDecoder` at a fixed 224-of-256 window, "
             "`RandomHorizontalFlip`, `NormalizeImage`, `ToTensor`, `ToTorchImage` (no mean image, no lighting; "
             "channels_last)")
LOADERS = (("dali-arrow", "alexprep, DALI from Arrow shards (JPEG), the paper's recipe"),
           ("dali-arrow-raw", "alexprep, DALI from Arrow shards (raw), the paper's recipe"),
           ("dali-arrow-operators", "the same, rendered by DALI's operators (before issue 29)"),
           ("dali-arrow-whole-decode", "the same, decoding whole images, not only the crop window"),
           ("torch-twin", "alexprep, torch backend: decoding (OpenCV, PIL's pixels) in DataLoader workers, the paper's "
            "recipe"),
           ("torch-twin-numpy", "the same, rendering in numpy (before issue 29)"),
           ("torch-twin-pil-decode", "the same, decoding with PIL (before issue 29)"),
           ("ffcv-jpeg", f"FFCV 1.0.2, {_FFCV_OWN}; JPEG q95 `.beton` of the same 256×256 pixels"),
           ("ffcv-raw", "FFCV, its own pipeline, raw `.beton`"),
           ("ffcv-paperop-jpeg", "FFCV `SimpleRGBImageDecoder` + our numba `PaperAugment` (the paper's recipe), "
            "JPEG q95 `.beton`"),
           ("ffcv-paperop-raw", "FFCV `SimpleRGBImageDecoder` + our `PaperAugment`, raw `.beton`"),
           ("dali-files", "DALI `readers.file` over the same 256×256 JPEGs, rendered as ours (DALI decodes, the host renders)"),
           ("imagefolder-original", "ImageFolder loop over the original JPEGs, the paper's recipe in numpy"),
           ("imagefolder-256", "ImageFolder loop over the 256×256 JPEGs"), ("webdataset", "webdataset tar shards"))


def _protocol(d: dict) -> str:
    """The run's sizes, in a sentence above its table."""
    c = d["config"]
    return (f"{c['images']:,} images an epoch, batch {c['batch_size']}, {c['workers']} threads or workers each; "
            f"{c['timed_epochs']} timed epochs per contender after a dropped first, alternated; the first "
            f"{c['untimed_batches_each_epoch']} batches of each epoch untimed; "
            f"{d['notes']['epochs_started_on_a_busy_machine']} of {c['epochs'] * len(d['results'])} epochs began "
            "on a busy machine.")


def _target(d: dict, key: str) -> str:
    t = d["targets"].get(key)
    return f"≥ {t['at_least']:g}×" if t else ""


def loader() -> str:
    d = load("loader_throughput")
    res = d["results"]
    return _protocol(d) + "\n\n" + table(
        ("loader", "images/s (median, min–max)"),
        [(label, rate(res[key]) if key in res else "not run here") for key, label in LOADERS])


def loader_ratios() -> str:
    d = load("loader_throughput")
    pr = d["ratios_per_epoch"]
    rows = [("DALI from Arrow / FFCV's own pipeline, JPEG", "dali_arrow_over_ffcv_jpeg", 2, True),
            ("torch backend / FFCV's own pipeline, JPEG", "torch_twin_over_ffcv_jpeg", 2, True),
            ("DALI from Arrow raw / FFCV's own pipeline, raw", "dali_arrow_raw_over_ffcv_raw", 2, False),
            ("same work per image: DALI from Arrow / FFCV with our numba operation, JPEG",
             "dali_arrow_over_ffcv_paperop_jpeg", 2, True),
            ("same work per image, raw", "dali_arrow_raw_over_ffcv_paperop_raw", 2, False),
            ("same work per image: torch backend / FFCV with our numba operation, JPEG",
             "torch_twin_over_ffcv_paperop_jpeg", 2, False),
            ("DALI from Arrow / ImageFolder, original JPEGs", "dali_arrow_over_imagefolder_original", 1, True),
            ("DALI from Arrow / ImageFolder, 256×256 JPEGs", "dali_arrow_over_imagefolder_256", 1, False),
            ("DALI from Arrow: host rendering in C++ / DALI's operators (issue 29)", "dali_arrow_over_dali_arrow_operators",
             2, False),
            ("DALI from Arrow: decoding the crop window / the whole image (issue 29)",
             "dali_arrow_over_dali_arrow_whole_decode", 2, False),
            ("torch backend: C++ rendering / numpy (issue 29)", "torch_twin_over_torch_twin_numpy", 2, False),
            ("torch backend: decoding with OpenCV / PIL (issue 29)", "torch_twin_over_torch_twin_pil_decode", 2,
             False)]
    made = [(label, "not run here" if key not in pr else f"**{spread(pr[key], digits)}**" if bold
             else spread(pr[key], digits), _target(d, key)) for label, key, digits, bold in rows]
    files = pr["dali_arrow_over_dali_files"]
    made.append(("DALI from Arrow / DALI `readers.file`", f"{spread(files)} per epoch, "
                 f"{times(files['of_medians'])} of the medians", _target(d, "dali_arrow_over_dali_files")))
    return table(("ratio (per epoch: median, min–max)", "measured", "target"), made)


BREAKDOWN_LOADERS = (("torch", "torch backend"), ("dali", "DALI from Arrow (CPU)"),
                     ("dali_operators", "DALI's operators (before)"), ("ffcv", "FFCV"))
BREAKDOWN_ROWS = (("decode", "decode"), ("crop", "crop"), ("flip_normalize", "flip + normalise"),
                  ("lighting_mean", "lighting / mean image"), ("handoff", "hand-off to the trainer"),
                  ("python", "Python per sample"), ("total", "**total**"),
                  ("total_raw", "total, raw shards (no decode)"))


def loader_breakdown() -> str:
    """benchmarks/README.md: where each loader's time goes, µs of one core per image (medians)."""
    d = load("loader_breakdown")

    def cell(v) -> str:
        if isinstance(v, dict):
            return f"{round(v['median']):,}"  # round: no "-0"
        return "— (FFCV has neither)" if v is None else f"{v} (`CropMirrorNormalize`)"

    version = d.get("ffcv_versions", {}).get("ffcv")
    names = {**dict(BREAKDOWN_LOADERS), **({"ffcv": f"FFCV {version}"} if version else {})}
    loaders = [(k, names[k]) for k, _ in BREAKDOWN_LOADERS if k in d["rows"]["total"]]
    rows = [(label, *(cell(d["rows"][row][k]) for k, _ in loaders)) for row, label in BREAKDOWN_ROWS]
    made = table(("µs of one core per image (median)", *(label for _, label in loaders)), rows)
    ops = ", ".join(dict.fromkeys(d["dali_operators"])) or "nothing (not run)"
    skipped = "".join(f" Not run: {k} ({why})." for k, why in d.get("skipped", {}).items())
    host = ", ".join(dict.fromkeys(d.get("dali_host_operators", []))) or "nothing (not run)"
    return (f"{made}\n\nMedians of {d['repeats']} alternated repeats, {d['images']} images, batch {d['batch']}, "
            f"one thread each. The torch backend's workers and DALI's host render with `{d['render_step']}`, one "
            f"C++ pass: its split times it with flip, the mean image and 1/std added one at a time, and the cast "
            f"and lighting shift are in the crop row. DALI's pipeline holds {host}; before issue 29 (DALI's "
            f"operators) it held {ops}.{skipped}")


RRC = (("rrc-dali", "alexprep, DALI backend (CPU): `decoders.image_slice`, then PIL's resize and the C++ "
        "rendering on the host"),
       ("rrc-dali-operators", "the same with DALI's `fn.resize` + `crop_mirror_normalize` (before issue 29)"),
       ("rrc-torch", "alexprep, torch backend: PIL crop + bilinear resize in DataLoader workers"),
       ("rrc-ffcv-jpeg", "FFCV 1.0.2, its own pipeline: `RandomResizedCropRGBImageDecoder((224, 224))` with its "
        "defaults, `RandomHorizontalFlip`, `NormalizeImage`, `ToTensor`, `ToTorchImage` (channels_last); JPEG q95 "
        "`.beton` of the same images"),
       ("rrc-ffcv-op-jpeg", "FFCV `RandomResizedCropRGBImageDecoder` + our numba flip-and-normalise `Operation` "
        "(contiguous NCHW)"),
       ("rrc-imagefolder-pil", "ImageFolder loop, torchvision's RandomResizedCrop + flip + Normalize written in "
        "PIL/numpy"))


def rrc() -> str:
    d = load("loader_throughput_rrc")
    pr, res = d["ratios_per_epoch"], d["results"]
    speeds = table(("loader", "images/s (median, min–max)"),
                   [(label, rate(res[k]) if k in res else "not run here") for k, label in RRC])
    rows = [("DALI backend / FFCV's own pipeline", "rrc_dali_over_rrc_ffcv_jpeg", 2),
            ("torch backend / FFCV's own pipeline", "rrc_torch_over_rrc_ffcv_jpeg", 2),
            ("contiguous NCHW as ours: DALI backend / FFCV with our operation", "rrc_dali_over_rrc_ffcv_op_jpeg", 2),
            ("contiguous NCHW as ours: torch backend / FFCV with our operation", "rrc_torch_over_rrc_ffcv_op_jpeg", 2),
            ("DALI backend / ImageFolder loop", "rrc_dali_over_rrc_imagefolder_pil", 1),
            ("torch backend / ImageFolder loop", "rrc_torch_over_rrc_imagefolder_pil", 1),
            ("DALI backend: host resize and rendering / DALI's operators (issue 29)", "rrc_dali_over_rrc_dali_operators",
             2)]
    ratios = table(("ratio (per epoch: median, min–max)", "measured", "target"),
                   [(label, spread(pr[key], digits) if key in pr else "not run here", _target(d, key))
                    for label, key, digits in rows])
    return _protocol(d) + "\n\n" + speeds + "\n\n" + ratios


def model() -> str:
    d = load("train_throughput")
    names = {("alexprep", "one-device", "fp32"): "ours, one device (grouped), fp32",
             ("alexprep", "two-device", "fp32"): "ours, two devices (cpu, cpu), fp32",
             ("reference", "one-device", "fp32"): "torchvision's architecture, fp32",
             ("alexprep", "one-device", "bf16"): "ours, one device, bf16 autocast"}
    rows = []
    for r in d["rows"]:
        key = (r["model"], r["placement"], r["precision"])
        if key in names and not r["channels_last"] and not r["compile"]:
            rows.append((names[key], f"{num(r['images_per_s'])} ({num(r['images_per_s_min'])}–"
                         f"{num(r['images_per_s_max'])})", times(r.get("vs_reference", 1.0))))
    rows.sort(key=lambda row: list(names.values()).index(row[0]))
    return table(("contender", "images/s (min–max)", "vs torchvision's architecture in the same precision"), rows)


def end_to_end() -> str:
    b = load("train_step")["backends"]
    return table(("loader backend", "training images/s", "time waiting for data"),
                 [(name, num(b[key]["images_per_s"]["median"]), f"{b[key]['data_wait_fraction'] * 100:.1f}%")
                  for key, name in (("dali", "DALI (CPU)"), ("torch", "torch twin"))])


def remote() -> str:
    d = load("remote_throughput")
    dl, fb, lim = d["download_mb_per_s"], d["first_batch_s"], d["limited_cache"]

    def mb(x: dict) -> str:
        return f"{x['median']:.1f} MB/s ({x['min']:.1f}–{x['max']:.1f})"

    def s(x: dict) -> str:
        return f"{x['median']:.2f} s ({x['min']:.2f}–{x['max']:.2f})"

    limit = f"{lim['limit_bytes'] / 1e6:.0f} MB"
    share = f"{lim['limit_bytes'] / (d['megabytes'] * 1e6) * 100:.0f}%"
    rows = [("push", f"{d['push_mb_per_s']:.1f} MB/s"),
            ("download into an empty cache, 1 at a time", mb(dl["download_1"])),
            ("download into an empty cache, 4 at a time (the default)", mb(dl["download_4"])),
            (f"first batch of {d['batch']}, cold cache, random order", s(fb["cold_random"])),
            (f"first batch of {d['batch']}, cold cache, quasi order (at most 4 shards needed)", s(fb["cold_quasi"])),
            (f"first batch of {d['batch']}, cold cache of {limit} ({share} of the split, the least the loader "
             "takes: quasi order, 1-shard windows)", s(lim["cold_first_batch_s"])),
            (f"first batch of {d['batch']}, warm cache", s(fb["warm_random"])),
            (f"first batch of {d['batch']}, the local build", s(fb["local_random"])),
            (f"an epoch ({d['images']:,} images, torch backend, no workers) with the {limit} cache: all "
             f"{lim['epoch_mb']['median']:.1f} MB downloaded again", s(lim["epoch_s"])),
            ("the same epoch from a warm, unlimited cache", s(lim["warm_epoch_s"]))]
    return table(("", "median (min–max)"), rows)


def remote_epoch_ratio() -> str:
    lim = load("remote_throughput")["limited_cache"]
    return times(lim["epoch_s"]["median"] / lim["warm_epoch_s"]["median"])


def relu_vs_tanh() -> str:
    r = load("relu_vs_tanh")["ratios_tanh_over_relu"]
    return f"{min(r.values()):.2f}–{max(r.values()):.2f}{X}"


def rrc_resolution() -> str:
    """docs/loaders.md: per --shorter-side, the rrc windows upscaled to 224 and the bytes per image."""
    r = load("rrc_resolution")
    win, builds = r["windows"], r["builds"]
    base = builds["256"]["bytes_per_image"]
    rows = [(f"`--shorter-side {side}`" + (" (the default)" if side == "256" else ""),
             f"{win[side]['upscaled_share'] * 100:.0f}%", f"{win[side]['upscaled_share_500x375'] * 100:.0f}%",
             f"{builds[side]['bytes_per_image'] / 1e3:.1f} KB ({times(builds[side]['bytes_per_image'] / base)})")
            for side in map(str, (256, 320, 384, 512))]
    tv = win["torchvision"]
    rows.append(("torchvision, from the original", f"{tv['upscaled_share'] * 100:.0f}%",
                 f"{tv['upscaled_share_500x375'] * 100:.0f}%",
                 f"{builds['source']['bytes_per_image'] / 1e3:.1f} KB ({times(builds['source']['bytes_per_image'] / base)}), "
                 "the source JPEGs"))
    return table(("build", "windows upscaled to 224, ImageNet's mix", "on a 500×375 original",
                  "bytes per image (vs 256)"), rows)


def bench_minutes() -> str:
    """What `make bench` takes, from the timings its results record."""
    timed = {"train_throughput": load("train_throughput")["wall_s"], "relu_vs_tanh": load("relu_vs_tanh")["seconds"],
             "loader_throughput": load("loader_throughput")["wall_s"],
             "loader_breakdown": load("loader_breakdown")["wall_s"]}
    parts = ", ".join(f"`{name} --quick` {seconds / 60:.1f} min" for name, seconds in timed.items())
    return (f"more than {sum(timed.values()) / 60:.0f} minutes on 2 cores: {parts} in the published runs (the "
            "others record no time)")


BLOCKS = {f.__name__: f for f in (headline, shard_mb, shards, images, scale, scale_largest_build, prep_per_image,
                                  prep_whole, prep_ratios, loader, loader_ratios, rrc, model, end_to_end, remote,
                                  remote_epoch_ratio, relu_vs_tanh, rrc_resolution, bench_minutes, loader_breakdown)}


# ---------------------------------------------------------------------------- rewriting
def render(text: str) -> str:
    """`text` with every marked block made again from the results (unknown names: KeyError)."""
    def one(m: re.Match) -> str:
        name, _, arg = m["name"].partition("-")  # "shards-16": shards(16)
        if name not in BLOCKS:
            raise SystemExit(f"benchmarks/tables.py: no block {name!r} (known: {', '.join(BLOCKS)})")
        try:
            made = BLOCKS[name](int(arg)) if arg else BLOCKS[name]()
        except (KeyError, StopIteration) as exc:  # a result the block needs is not in results/
            raise SystemExit(f"benchmarks/tables.py: block {m['name']!r} needs {exc!r}, which benchmarks/results/ "
                             "lacks (a contender skipped in the published run?): say so in the block's function")
        body = f"\n{made}\n" if "\n" in m["body"] else made
        return f"<!-- tables:{m['name']} -->{body}<!-- /tables:{m['name']} -->"

    return BLOCK.sub(one, text)


def names_in(text: str) -> list[str]:
    return [m["name"] for m in BLOCK.finditer(text)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the blocks in place")
    args = parser.parse_args(argv)
    stale = []
    for path in DOCUMENTS:
        text = path.read_text()
        made = render(text)
        if made != text:
            stale.append(path.relative_to(ROOT))
            if args.write:
                path.write_text(made)
    if stale and not args.write:
        print(f"out of date: {', '.join(map(str, stale))} (python -m benchmarks.tables --write)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
