"""What every benchmark shares: the machine it ran on, timing statistics, writing results."""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model, cores, GPU if any, and the versions that decide the numbers."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version()}
    from alexprep.imagenet_prep.transform import pil_flavour

    info["pil"] = pil_flavour()
    for name, module in (("numpy", "numpy"), ("pyarrow", "pyarrow"), ("opencv", "cv2"), ("torch", "torch")):
        try:
            info[name] = __import__(module).__version__
        except ImportError:
            info[name] = None
    try:
        from nvidia import dali

        info["dali"] = dali.__version__
    except ImportError:
        info["dali"] = None
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def summary(values: list[float]) -> dict:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
