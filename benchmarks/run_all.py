"""`make bench`: every benchmark, one after another, then a table of the headline ratios.

Run: python benchmarks/run_all.py [--quick] [--device cuda:0]

Each benchmark runs in its own process (so one's imports and threads do not disturb the
next), writes benchmarks/results/<name>.json and .png, and says in its JSON when a
contender could not run here (no GPU, no DALI) instead of faking it. `--quick` keeps the
whole run under ~10 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["prep_throughput", "loader_throughput", "train_throughput", "train_step", "relu_vs_tanh"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (for those that take one)")
    parser.add_argument("--only", action="append", choices=BENCHMARKS)
    args = parser.parse_args()
    failed = []
    for name in args.only or BENCHMARKS:
        cmd = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if args.quick else [])
        if args.device != "cpu" and name in ("loader_throughput", "train_throughput", "train_step"):
            cmd += ["--device", args.device if name != "train_throughput" else "cuda"]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)
    print(headlines())
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def headlines() -> str:
    """The ratios people compare pipelines by, from the latest results."""
    lines = ["| benchmark | headline | machine |", "| --- | --- | --- |"]
    for name in BENCHMARKS:
        path = HERE / "results" / f"{name}.json"
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
