"""The plain path users write, for prep_throughput.py to run in a stock-Pillow environment.

open -> convert('RGB') -> resize shorter side to 256 -> centre crop -> save JPEG q95,
no draft. Reads file paths from stdin, prints per-file seconds as JSON. Stock Pillow and
pillow-simd both own `PIL`, so this runs in its own virtual environment.
"""
import io
import json
import sys
import time

import PIL
from PIL import Image


def plain(path: str) -> bytes:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.Resampling.LANCZOS)
    left, top = (img.width - 256) // 2, (img.height - 256) // 2
    buf = io.BytesIO()
    img.crop((left, top, left + 256, top + 256)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


if __name__ == "__main__":
    paths = sys.stdin.read().split("\n")
    times = {}
    for p in filter(None, paths):
        t = time.perf_counter()
        plain(p)
        times[p] = time.perf_counter() - t
    print(json.dumps({"pil": PIL.__version__, "times": times}))
