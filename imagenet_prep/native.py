"""C++ kernels compiled at first use, once per machine type, with a slower path where they cannot be.

Two hot loops are C++ (`model/lrn_pool_cpu.cpp`, `imagenet_prep/render_cpu.cpp`): each is
compiled at its first use by `torch.utils.cpp_extension` (the C++ compiler and ninja it
finds) into torch's extension cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR),
under a name hashing what the machine code depends on, so that `-march=native` code is
never loaded on another CPU sharing the cache: 15-40 s once, then a load. Where one cannot
be built (no compiler, a compiler error) its caller is told once, by a warning, and runs
its own slower path (same numbers). `ALEXPREP_CPU_KERNEL=0` turns every kernel off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path

import torch

# -march=native: the machine's vector width (AVX-512 where it has it). -fno-math-errno lets
# sqrt vectorise. No -ffast-math: it would change NaN handling and the order of sums. A
# kernel whose float32 results must equal numpy's or DALI's to the bit adds
# -ffp-contract=off (`extra_cflags`): no fused multiply-adds. -fopenmp: at::parallel_for is a header template whose
# `#pragma omp parallel` is compiled here; without it a kernel runs on one thread. The
# libgomp.so.1 it needs is the one torch has already loaded (same soname), so torch's
# threads and set_num_threads are the kernels'.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

log = logging.getLogger(__name__)

# stem -> the loaded module (python_module) or True (operators registered with torch.ops),
# or False where it could not be built.
_LOADED: dict[str, object] = {}


def enabled() -> bool:
    """Whether compiled kernels may be used (ALEXPREP_CPU_KERNEL is not "0")."""
    return os.environ.get("ALEXPREP_CPU_KERNEL", "1") != "0"


def machine_tag(source: Path, cflags: list[str]) -> str:
    """A short hash of what the compiled code depends on: the CPU's instruction sets, torch's
    version, the flags and the source."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:  # not Linux
        flags = platform.processor()
    text = "|".join((flags, platform.machine(), torch.__version__, " ".join(cflags + LDFLAGS), source.read_text()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load(stem: str, source: Path, *, what: str, instead: str, python_module: bool, extra_cflags=()):
    """The compiled `source` (its module if `python_module`, else True: its operators are in
    torch.ops), built on the first call; None where it cannot be built (one warning naming
    `what` and the path used `instead`) or kernels are turned off."""
    if not enabled():
        return None
    if stem not in _LOADED:
        try:
            from torch.utils import cpp_extension

            log.info("compiling %s (once per machine, 15-40 s)", what)
            cflags = CFLAGS + list(extra_cflags)
            module = cpp_extension.load(name=f"{stem}_{machine_tag(source, cflags)}", sources=[str(source)],
                                        extra_cflags=cflags, extra_ldflags=LDFLAGS, is_python_module=python_module,
                                        verbose=False)
            _LOADED[stem] = module if python_module else True
        except Exception as exc:  # no compiler, no ninja, a compiler error: the caller's own path
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            warnings.warn(f"alexprep: {what} could not be built ({reason}); using {instead}", RuntimeWarning,
                          stacklevel=3)
            _LOADED[stem] = False
    return _LOADED[stem] or None
