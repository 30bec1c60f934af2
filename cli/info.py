"""`alexprep info`: what this installation runs on."""
from __future__ import annotations

import json
import platform

import click


def environment_report() -> dict:
    """Versions of everything the data path and the model depend on, and which PIL."""
    from alexprep.imagenet_prep.transform import pil_flavour

    report: dict = {"python": platform.python_version(), "machine": platform.machine()}
    report["pil"] = pil_flavour()
    for name, module in (("numpy", "numpy"), ("pyarrow", "pyarrow"), ("opencv", "cv2"), ("torch", "torch")):
        try:
            report[name] = __import__(module).__version__
        except ImportError:
            report[name] = None
    try:
        from nvidia import dali

        report["dali"] = dali.__version__
    except ImportError:
        report["dali"] = None
    try:
        import torch

        report["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        report["cuda_devices"] = []
    return report


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info(as_json: bool) -> None:
    """Show the versions of Python, torch, DALI, pyarrow and PIL, and the GPUs seen.

    \b
    Example:
        alexprep info
    """
    report = environment_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    pil = report["pil"]
    rows = [
        ("python", f"{report['python']} ({report['machine']})"),
        ("PIL", f"{pil['name']} {pil['version']}, libjpeg-turbo: {pil['libjpeg_turbo']}"),
        ("numpy", report["numpy"]),
        ("pyarrow", report["pyarrow"]),
        ("opencv", report["opencv"]),
        ("torch", report["torch"]),
        ("DALI", report["dali"] or "not installed"),
        ("CUDA devices", ", ".join(report["cuda_devices"]) or "none"),
    ]
    for key, value in rows:
        click.echo(f"{key:>13}: {value}")
