"""`make bench`: every benchmark, one after another, then a table of the headline ratios.

Run: python -m benchmarks.run_all [--quick] [--device cuda:0] [--out DIR] [--publish]
     python -m benchmarks.run_all --publish-only     # `make bench-publish`

Each benchmark runs in its own process (so one's imports and threads do not disturb the
next), writes <name>.json and .png into --out (default benchmarks/out/, git-ignored), and
says in its JSON when a contender could not run here (no GPU, no DALI) instead of faking
it. --publish (or --publish-only, after a run) copies them into the tracked
benchmarks/results/. `--quick` takes more than half an hour on 2 cores (benchmarks/README.md says how
long each took); the RandomResizedCrop comparison is `loader_throughput --quick --recipe rrc`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import HERE, OUT, PUBLISHED, publish

BENCHMARKS = ["prep_throughput", "loader_throughput", "loader_breakdown", "train_throughput", "train_step",
              "relu_vs_tanh", "remote_throughput"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (for those that take one)")
    parser.add_argument("--only", action="append", choices=BENCHMARKS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--publish", action="store_true", help="copy each result into benchmarks/results/")
    parser.add_argument("--publish-only", action="store_true",
                        help="run nothing: copy the results already in --out into benchmarks/results/")
    args = parser.parse_args()
    names = args.only or BENCHMARKS
    if args.publish_only:
        copied = [p for name in names for p in publish(name, args.out)]
        print("\n".join(f"published {p}" for p in copied) or f"nothing to publish in {args.out}")
        print(headlines(PUBLISHED, names))
        return
    failed = []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(args.out)]
        cmd += (["--quick"] if args.quick else []) + (["--publish"] if args.publish else [])
        if args.device != "cpu" and name in ("loader_throughput", "train_throughput", "train_step"):
            cmd += ["--device", args.device if name == "train_step" else "cuda"]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        if subprocess.run(cmd, cwd=HERE.parent).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)
    print(headlines(args.out, names))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def headlines(folder: Path, names=BENCHMARKS) -> str:
    """The ratios people compare pipelines by, from the results in `folder`."""
    lines = ["| benchmark | headline | machine |", "| --- | --- | --- |"]
    for name in names:
        path = Path(folder) / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        m = result.get("machine", {})
        where = f"{m.get('gpu') or m.get('cpu', '?')}, {m.get('cores', '?')} cores"
        ratios = {}
        for key, value in result.items():  # "ratios", "ratios_tanh_over_relu", ...
            if key.startswith("ratio") and isinstance(value, dict):
                ratios.update({k: v for k, v in value.items() if isinstance(v, (int, float))})
        text = "; ".join(f"{k} = {v:.2f}" for k, v in ratios.items())
        lines.append(f"| {name} | {text or 'see JSON'} | {where} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
