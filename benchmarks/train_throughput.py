"""Training throughput of the paper's AlexNet: forward + backward images/s.

Contenders: our AlexNet in its one-device placement (grouped convolutions) and its
two-device placement (towers as separate halves; on one GPU or the CPU both towers sit on
the same device, so this measures the cost of the split code path, not of two devices),
and torchvision's AlexNet as the reference people know. Each in fp32 and bf16 autocast
(plus TF32 on CUDA), channels_last off/on, torch.compile off/on. Timed steps alternate
between contenders (round-robin, order rotated every round) so that drifts in clock
speed or memory state fall on all of them alike; each contender reports the median step
and the spread (fastest and slowest step).

    python -m benchmarks.train_throughput --quick            # ~2 min on 2 CPU cores
    python -m benchmarks.train_throughput                    # all contenders, batch 128
    python -m benchmarks.train_throughput --device cuda      # on a GPU

A step is: forward under the contender's precision, cross-entropy on random labels,
backward; gradients are dropped (set to None) before the clock starts. No optimiser
step: the SGD update is the same for every contender. Inputs are random tensors already
on the device: this measures the network, not the data pipeline.

Writes train_throughput.json (and .png beside it when matplotlib is importable) into --out
(benchmarks/out/; --publish: also benchmarks/results/). With --device cuda and no CUDA it
prints a JSON saying why and writes it (as train_throughput_skipped.json, never
published) only when --out is given, so real numbers are never replaced by a skip.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alexprep.model.alexnet import AlexNet
from benchmarks.common import add_output_args, bar_chart, finish, machine, out_dir, write_result

NAME = "train_throughput"
# bf16 is "much faster" when it buys at least this much over fp32: below it, the
# faithful fp32 stays the trainer's default.
BF16_WORTH_IT = 1.3
# channels_last or torch.compile become defaults only when at least this much faster than
# plain eager NCHW: smaller gains are within step-to-step noise and not worth the
# complexity (compile time, layout conversions).
SIMPLER_UNLESS = 1.1


# -- the reference ----------------------------------------------------------------------


class InlineTorchvisionAlexNet(nn.Module):
    """torchvision.models.alexnet's layer stack, written out (torchvision not installed).

    The single-tower variant from "One weird trick" (Krizhevsky 2014) that torchvision
    ships: 64/192/384/256/256 kernels, no LRN, an adaptive 6x6 average pool, and
    dropout before fc6 and fc7; 61,100,840 parameters for 1000 classes.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # (N, 64, 55, 55)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (N, 64, 27, 27)
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # (N, 192, 27, 27)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (N, 192, 13, 13)
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # (N, 384, 13, 13)
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # (N, 256, 13, 13)
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # (N, 256, 13, 13)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (N, 256, 6, 6)
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def reference_model() -> tuple[nn.Module, str]:
    """torchvision's alexnet() where importable, else its architecture written inline."""
    try:
        import torchvision

        return torchvision.models.alexnet(), f"torchvision.models.alexnet (torchvision {torchvision.__version__})"
    except ImportError:
        return (
            InlineTorchvisionAlexNet(),
            "torchvision.models.alexnet architecture (inline; torchvision not installed)",
        )


# -- the machine ------------------------------------------------------------------------


def machine_info() -> dict:
    """What ran the numbers: benchmarks/common.py's machine(), plus what decides them here."""
    info = machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:  # not Linux
        pass
    info.update(
        torch_threads=torch.get_num_threads(),
        # bf16 on a CPU is only fast with native instructions (AVX512-BF16, AMX).
        cpu_bf16_flags=sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        cuda=torch.version.cuda,
        gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    )
    return info


# -- contenders -------------------------------------------------------------------------


@dataclass
class Contender:
    """One configuration under test, its model and inputs, and its measurements."""

    model_name: str  # "alexprep" or "reference"
    placement: str  # "one-device" or "two-device" (the reference: always one-device)
    precision: str  # "fp32", "tf32" or "bf16"
    channels_last: bool
    compiled: bool
    module: nn.Module | None = None
    fn: object = None  # the module, or its torch.compile wrapper
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    step_s: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults per timed step
    skipped: str | None = None

    @property
    def name(self) -> str:
        return (
            f"{self.model_name}/{self.placement}/{self.precision}"
            f"/{'channels_last' if self.channels_last else 'nchw'}/{'compile' if self.compiled else 'eager'}"
        )


def synchronize(devices) -> None:
    """Wait for queued GPU work: CUDA calls return before the kernels finish."""
    for d in {torch.device(d) for d in devices}:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def one_step(c: Contender, device_type: str, devices) -> float:
    """Seconds for one forward + backward of contender `c`."""
    for p in c.module.parameters():
        p.grad = None
    # fp32 means full float32 arithmetic; TF32 (10-bit mantissa in convs and matmuls on
    # Ampere+) is its own contender. PyTorch's default turns TF32 on for cuDNN convs.
    if device_type == "cuda":
        torch.backends.cudnn.allow_tf32 = c.precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = c.precision == "tf32"
    synchronize(devices)
    start = time.perf_counter()
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=c.precision == "bf16"):
        loss = F.cross_entropy(c.fn(c.x), c.y)
    loss.backward()
    synchronize(devices)
    return time.perf_counter() - start


def _reason(exc: BaseException) -> str:
    lines = [l for l in str(exc).strip().splitlines() if l.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def build_contenders(args, device: torch.device) -> tuple[list[Contender], dict]:
    """Every configuration to time, with models shared where only precision/compile differ."""
    if device.type == "cuda":
        # The paper's two GPUs where there are two; otherwise both towers on cuda:0.
        two = ("cuda:0", "cuda:1") if torch.cuda.device_count() >= 2 else ("cuda:0", "cuda:0")
        precisions = ["fp32", "tf32", "bf16"]
    else:
        two = ("cpu", "cpu")
        precisions = ["fp32", "bf16"]
    if args.quick:
        precisions = ["fp32", "bf16"]
    layouts = [False] if args.quick else [False, True]
    compiles = [False] if args.quick else [False, True]
    placements = {"one-device": (str(device),), "two-device": two}

    ref_module, ref_label = reference_model()
    models: dict[tuple[str, str, bool], nn.Module] = {}
    generator = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(args.batch_size, 3, 224, 224, generator=generator)
    y_cpu = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    contenders = []
    for model_name in ("alexprep", "reference"):
        for placement in placements if model_name == "alexprep" else ["one-device"]:
            for channels_last in layouts:
                key = (model_name, placement, channels_last)
                torch.manual_seed(0)
                if model_name == "alexprep":
                    module = AlexNet(devices=placements[placement])
                else:
                    module = ref_module if not channels_last else reference_model()[0]
                    module.to(device)
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                module.to(memory_format=fmt).train()
                models[key] = module
                x = x_cpu.to(device).contiguous(memory_format=fmt)
                y = y_cpu.to(device)
                for precision in precisions:
                    for compiled in compiles:
                        c = Contender(model_name, placement, precision, channels_last, compiled, module, x=x, y=y)
                        if args.filter and not any(f in c.name for f in args.filter):
                            continue
                        if compiled:
                            try:
                                c.fn = torch.compile(module)
                            except Exception as exc:  # e.g. no C++ compiler, unsupported Python
                                c.skipped = f"torch.compile failed: {_reason(exc)}"
                        else:
                            c.fn = module
                        contenders.append(c)
    meta = {"reference": ref_label, "two_device_placement": list(two)}
    return contenders, meta


def run(contenders: list[Contender], args, device: torch.device, devices) -> None:
    """Warm up every contender, then time them in alternating rounds."""
    live = [c for c in contenders if c.skipped is None]
    for c in live:
        try:
            for _ in range(args.warmup):
                one_step(c, device.type, devices)  # compiles here, allocator settles
            print(f"  warmed up {c.name}", file=sys.stderr, flush=True)
        except Exception as exc:
            c.skipped = f"{'compiled ' if c.compiled else ''}step failed: {_reason(exc)}"
            if args.verbose:
                traceback.print_exc()
    live = [c for c in live if c.skipped is None]
    if not live:
        return
    for r in range(args.steps):
        # Rotate the order each round so no contender always runs first (or after a
        # particular other one).
        for c in live[r % len(live) :] + live[: r % len(live)]:
            if c.skipped is not None:
                continue
            try:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                c.step_s.append(one_step(c, device.type, devices))
                c.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            except Exception as exc:
                c.skipped, c.step_s, c.faults = f"step failed: {_reason(exc)}", [], []
        print(f"  round {r + 1}/{args.steps} done", file=sys.stderr, flush=True)


def summarise(c: Contender, batch: int) -> dict:
    row = {
        "name": c.name,
        "model": c.model_name,
        "placement": c.placement,
        "precision": c.precision,
        "channels_last": c.channels_last,
        "compile": c.compiled,
    }
    if c.skipped is not None or not c.step_s:
        row["skipped"] = c.skipped or "no timed steps"
        return row
    median = statistics.median(c.step_s)
    row.update(
        step_s=[round(s, 5) for s in c.step_s],
        median_step_s=round(median, 5),
        images_per_s=round(batch / median, 2),
        images_per_s_min=round(batch / max(c.step_s), 2),
        images_per_s_max=round(batch / min(c.step_s), 2),
        spread_pct=round(100 * (max(c.step_s) - min(c.step_s)) / median, 1),
        # On CPUs, glibc hands blocks over 32 MiB straight to mmap, so every step's big
        # activations are fresh pages the kernel must fault in: a cost that depends on
        # tensor sizes (batch, grouped or split towers) as much as on the arithmetic.
        minor_page_faults_per_step=int(statistics.median(c.faults)),
    )
    return row


def relative_to_reference(rows: list[dict]) -> None:
    """Each row's speed over the reference with the same precision, layout and compile."""
    ref = {
        (r["precision"], r["channels_last"], r["compile"]): r.get("images_per_s")
        for r in rows
        if r["model"] == "reference"
    }
    for r in rows:
        base = ref.get((r["precision"], r["channels_last"], r["compile"]))
        if r.get("images_per_s") and base:
            r["vs_reference"] = round(r["images_per_s"] / base, 3)


def ratios(rows: list[dict]) -> dict:
    """Headline ratios (eager, NCHW) for benchmarks/run_all.py's table."""
    speed = {
        (r["model"], r["placement"], r["precision"]): r["images_per_s"]
        for r in rows
        if "images_per_s" in r and not r["compile"] and not r["channels_last"]
    }
    out = {}
    for label, num, den in [
        ("one_device_over_reference_fp32", ("alexprep", "one-device", "fp32"), ("reference", "one-device", "fp32")),
        ("two_device_over_one_device_fp32", ("alexprep", "two-device", "fp32"), ("alexprep", "one-device", "fp32")),
        ("bf16_over_fp32_one_device", ("alexprep", "one-device", "bf16"), ("alexprep", "one-device", "fp32")),
    ]:
        if num in speed and den in speed:
            out[label] = round(speed[num] / speed[den], 3)
    return out


def recommend(rows: list[dict], device_type: str) -> dict:
    """The trainer's defaults on this device type, from the one-device rows measured."""
    ours = [r for r in rows if r["model"] == "alexprep" and r["placement"] == "one-device" and "images_per_s" in r]
    if not ours:
        return {"note": "nothing measured"}

    def best(precision):
        """The fastest setting for `precision`, but eager NCHW (the simplest) unless
        channels_last or compile beat it by SIMPLER_UNLESS: closer is within noise."""
        got = [r for r in ours if r["precision"] == precision]
        if not got:
            return None
        fastest = max(got, key=lambda r: r["images_per_s"])
        plain = [r for r in got if not r["channels_last"] and not r["compile"]]
        if plain and fastest["images_per_s"] < SIMPLER_UNLESS * plain[0]["images_per_s"]:
            return plain[0]
        return fastest

    fp32, bf16 = best("fp32"), best("bf16")
    speedup = bf16["images_per_s"] / fp32["images_per_s"] if fp32 and bf16 else None
    if device_type == "cuda" and speedup is not None and speedup >= BF16_WORTH_IT:
        pick, why = bf16, (
            f"bf16 autocast is {speedup:.2f}x fp32 (>= {BF16_WORTH_IT}x): the default, a "
            "documented deviation; --precision fp32 for the faithful run"
        )
    elif fp32 is None:
        pick, why = bf16, "only bf16 was measured (see --filter); fp32 stays the faithful choice"
    else:
        pick = fp32
        why = (
            "fp32: exact semantics"
            + (f"; bf16 autocast measured {speedup:.2f}x fp32" if speedup is not None else "")
            + ("" if device_type == "cuda" else " (CPU default stays fp32 whatever bf16 gives)")
        )
    return {
        "device_type": device_type,
        "precision": pick["precision"],
        "channels_last": pick["channels_last"],
        "compile": pick["compile"],
        "bf16_over_fp32": round(speedup, 3) if speedup is not None else None,
        "why": why,
    }


def check_gpu_cpu_split(batch: int) -> dict:
    """Run the two-device placement for real as ("cuda:0", "cpu") against one device."""
    torch.manual_seed(0)
    one = AlexNet(devices=("cuda:0",), dropout=0.0)
    split = AlexNet(devices=("cuda:0", "cpu"), dropout=0.0)
    split.load_state_dict(one.state_dict())
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).cuda()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    y1, y2 = one(x), split(x)
    y1.square().mean().backward()
    y2.square().mean().backward()
    out_err = ((y2 - y1).abs().max() / y1.abs().max()).item()
    grad_err = max(
        ((q.grad.to(p.device) - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
        for p, q in zip(one.parameters(), split.parameters())
    )
    split.zero_grad(set_to_none=True)
    times = []
    for _ in range(3):
        synchronize(("cuda:0",))
        start = time.perf_counter()
        F.cross_entropy(split(x), torch.zeros(batch, dtype=torch.long, device="cuda:0")).backward()
        synchronize(("cuda:0",))
        times.append(time.perf_counter() - start)
    return {
        "devices": ["cuda:0", "cpu"],
        "batch": batch,
        "max_output_error_rel": out_err,
        "max_grad_error_rel": grad_err,
        "ok": out_err < 1e-4 and grad_err < 1e-3,
        "images_per_s_fp32": round(batch / statistics.median(times), 2),
    }


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'contender':<58} {'img/s':>9} {'min-max':>17} {'spread':>7} {'vs ref':>7}")
    for r in rows:
        if "images_per_s" in r:
            mm = f"{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}"
            vs = f"{r['vs_reference']:.2f}x" if "vs_reference" in r else ""
            print(f"{r['name']:<58} {r['images_per_s']:>9.1f} {mm:>17} {r['spread_pct']:>6.1f}% {vs:>7}")
        else:
            print(f"{r['name']:<58} skipped: {r['skipped']}")


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    done = [r for r in rows if "images_per_s" in r]
    if not done:
        return None
    return bar_chart(path, [r["name"] for r in done], {"images/s": [r["images_per_s"] for r in done]},
                     spread={"images/s": [(r["images_per_s_min"], r["images_per_s_max"]) for r in done]},
                     colors=["tab:gray" if r["model"] == "reference" else "tab:blue" for r in done],
                     horizontal=True, figsize=(9, 0.35 * len(done) + 1.5), title=title,
                     value_axis="images/s (forward + backward; bars: median, whiskers: slowest/fastest step)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="batch 32, 1 warm-up + 2 timed steps, eager, fp32 and bf16, NCHW only")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (the paper's), 32 with --quick")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 5 CPU, 20 CUDA, 2 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per contender first (default 2, 1 quick)")
    parser.add_argument("--filter", action="append", default=[],
                        help="time only contenders whose name contains this (repeatable), e.g. alexprep/one-device")
    add_output_args(parser)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing contenders")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 32 if args.quick else 128
    if args.steps is None:
        args.steps = 2 if args.quick else (20 if args.device == "cuda" else 5)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    return args


def report_no_cuda(args, info: dict) -> None:
    skip = {
        "benchmark": "train_throughput",
        "skipped": True,
        "reason": f"--device cuda but CUDA is not available (torch {torch.__version__}, "
        f"built with CUDA {torch.version.cuda})",
        "machine": info,
    }
    print(json.dumps(skip, indent=2))
    if args.out is not None:  # only where asked, under a name never published: never replace real numbers
        write_result(f"{NAME}_skipped", skip, out_dir(args))


def raise_recompile_limit() -> None:
    try:
        import torch._dynamo.config as dynamo_config

        # One compiled graph per model instance and precision: more than the default 8.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, 64)
    except ImportError:
        pass


def build_result(args, device: torch.device, info: dict, meta: dict, rows: list[dict], started: float,
                 load_before) -> dict:
    result = {
        "benchmark": "train_throughput",
        "what": "forward + backward (cross-entropy on random labels), images/s; median over timed steps",
        "device": str(device),
        "mode": "quick" if args.quick else "full",
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "alternated": "round-robin over contenders, order rotated each round",
        "machine": info,
        **meta,
        "rows": rows,
        "ratios": ratios(rows),
        "recommended_trainer_defaults": recommend(rows, device.type),
    }
    if device.type == "cuda":
        try:
            result["gpu_cpu_split_check"] = check_gpu_cpu_split(min(args.batch_size, 32))
        except Exception as exc:
            result["gpu_cpu_split_check"] = {"skipped": _reason(exc)}
    result["wall_s"] = round(time.time() - started, 1)
    if load_before is not None:
        result["load_average_1min"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}
    return result


def print_summary(rows: list[dict], title: str, meta: dict, result: dict, out: Path) -> None:
    print_table(rows, title)
    print(f"reference: {meta['reference']}")
    print(f"recommended defaults: {json.dumps(result['recommended_trainer_defaults'])}")
    if "gpu_cpu_split_check" in result:
        print(f"(cuda:0, cpu) placement check: {json.dumps(result['gpu_cpu_split_check'])}")
    print(f"wrote {out} in {result['wall_s']} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    if args.device == "cuda" and not torch.cuda.is_available():
        report_no_cuda(args, info)
        return 0
    raise_recompile_limit()

    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    started = time.time()
    # Other processes on the machine show up as spread; record how busy it was.
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    contenders, meta = build_contenders(args, device)
    devices = {str(device), *meta["two_device_placement"]}
    print(f"{len(contenders)} contenders, batch {args.batch_size}, {args.warmup} warm-up + "
          f"{args.steps} timed steps each, on {info['gpu'] or info['cpu']}", file=sys.stderr)
    run(contenders, args, device, devices)
    rows = [summarise(c, args.batch_size) for c in contenders]
    relative_to_reference(rows)
    result = build_result(args, device, info, meta, rows, started, load_before)

    title = (f"AlexNet training throughput, batch {args.batch_size}, {info['gpu'] or info['cpu']} "
             f"({info['torch_threads']} threads), torch {info['torch']}")
    out = finish(NAME, result, args, plot=lambda _, png: plot(rows, png, title))
    print_summary(rows, title, meta, result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
