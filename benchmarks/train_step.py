"""End to end: the trainer's real step fed by the real loader. Is the accelerator waiting?

Run: python -m benchmarks.train_step [--quick] [--device cuda:0] [--backend torch]

Builds shards from real-photo JPEGs, computes the statistics, then runs `alexprep train`'s
own loop (model/train.py) for a fixed number of steps per loader backend, alternating
backends, and reads images/s and the fraction of step time spent waiting for data from
the run's metrics.jsonl (the first steps are warm-up and not counted). Writes
train_step.json and .png into --out (benchmarks/out/; --publish: also benchmarks/results/).
Goal on a GPU: data wait under 5%.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from alexprep.model.config import TrainConfig
from alexprep.model.train import train
from benchmarks.common import add_output_args, bar_chart, finish, machine, prepared_build, summary

WARMUP_STEPS = 2


def backends_available(wanted: list[str], device: str) -> dict[str, str | None]:
    """backend -> None if it can run here, else why not."""
    out = {}
    for b in wanted:
        reason = None
        if b == "dali":
            try:
                import nvidia.dali  # noqa: F401
            except ImportError:
                reason = "DALI is not installed"
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                reason = "no CUDA device"
        out[b] = reason
    return out


def run_once(out: Path, backend: str, config: TrainConfig) -> list[dict]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"train_step_{backend}_"))
    try:
        train(out, run_dir / "run", config, progress=False, log=lambda *a: None)
        rows = [json.loads(l) for l in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["kind"] == "step"]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 6 steps, 1 repeat (CPU-sized)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", action="append", choices=["dali", "torch"], help="default: both")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--encoding", default="jpeg", choices=["jpeg", "raw"])
    add_output_args(parser)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    batch = args.batch_size or (16 if args.quick else 128)
    steps = args.steps or (6 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 3)
    images = args.images or max(300, batch * 2)
    status = backends_available(args.backend or ["torch", "dali"], args.device)
    result = {"benchmark": "train_step", "machine": machine(), "device": args.device, "batch_size": batch,
              "steps": steps, "warmup_steps": WARMUP_STEPS, "precision": args.precision, "encoding": args.encoding,
              "skipped": {b: why for b, why in status.items() if why}, "backends": {}}
    runnable = [b for b, why in status.items() if not why]
    work = Path(tempfile.mkdtemp(prefix="train_step_bench"))
    try:
        out = None
        if runnable:  # 64 val images: the trainer validates every epoch
            out = prepared_build(work, images, encodings=(args.encoding,), val_images=64)["builds"][args.encoding]
        config = TrainConfig(batch_size=batch, epochs=1, max_steps=steps, log_every=1, final_crops=0,
                             bias_init="caffe", devices=(args.device,), precision=args.precision,
                             channels_last=gpu)
        per_backend: dict[str, list[list[dict]]] = {b: [] for b in runnable}
        for r in range(repeats):
            for b in runnable:  # alternating
                per_backend[b].append(run_once(out, b, TrainConfig(**{**config.to_json(), "backend": b})))
                print(f"  repeat {r + 1}/{repeats} {b} done", flush=True)
        for b, runs in per_backend.items():
            counted = [row for rows in runs for row in rows[WARMUP_STEPS:]]
            result["backends"][b] = {
                "images_per_s": summary([row["images_per_s"] for row in counted]),
                # Over the counted steps: time waiting for the next batch / whole step time.
                "data_wait_fraction": (sum(r["data_wait_s"] for r in counted)
                                       / max(sum(r["data_wait_s"] + r["compute_s"] for r in counted), 1e-9)),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finish("train_step", result, args, plot=plot)
    print(json.dumps({"device": args.device, "skipped": result["skipped"],
                      **{b: {"images_per_s": v["images_per_s"]["median"], "data_wait_fraction": v["data_wait_fraction"]}
                         for b, v in result["backends"].items()}}, indent=1))


def plot(result: dict, path: Path) -> None:
    names = list(result["backends"])
    m = result["machine"]
    bar_chart(path, names, {"images/s": [result["backends"][n]["images_per_s"]["median"] for n in names]},
              notes=[f"data wait {100 * (result['backends'][n]['data_wait_fraction'] or 0):.0f}%" for n in names],
              value_axis="training images/s (median)", figsize=(6, 3.5),
              title=f"train step, batch {result['batch_size']} on {result['device']} — {m['gpu'] or m['cpu']}")


if __name__ == "__main__":
    main()
