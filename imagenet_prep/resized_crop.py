"""The pixels of recipe="rrc": a window of a stored image resized to size x size
(docs/design.md, "Loaders"), per image with PIL in the torch backend's workers and
batched with torch where torchvision decodes on the device.

The filter is bilinear with antialiasing, what torchvision's RandomResizedCrop applies to
PIL images by default: the window is cut first, then resized (`F.resized_crop`), so no
pixel outside it contributes. PIL always antialiases when it shrinks; torch is asked to
(`interpolate(..., antialias=True)`), and rounds its float result to uint8 as
torchvision's tensor path does.

JPEG windows at least twice the output size on both sides are decoded DCT-scaled
(`Image.draft`, 1/2, 1/4 or 1/8), the largest scale that keeps them at or above the
output size. Drafted pixel k covers the file's pixels [k·s, (k+1)·s), so the window
maps to the box (x/s, y/s, (x+w)/s, (y+h)/s) of the drafted image, resized with PIL's
fractional box over the whole pixels it touches.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from alexprep.imagenet_prep.transform import ImageSpec, decode

FILTER = Image.Resampling.BILINEAR


def draft_scale(w: int, h: int, size: int) -> int:
    """The largest of 8, 4, 2, 1 that keeps a w x h window at least size x size."""
    for s in (8, 4, 2):
        if min(w, h) >= s * size:
            return s
    return 1


def resized_window(data, spec: ImageSpec, shape: tuple[int, int], window, size: int) -> np.ndarray:
    """(size, size, 3) uint8: window (x, y, w, h) of one stored image (shard bytes and its
    (height, width)), resized; not flipped."""
    x, y, w, h = (int(v) for v in window[:4])
    if spec.encoding == "raw":
        pixels = decode(data, spec, shape)
        return np.asarray(Image.fromarray(pixels[y:y + h, x:x + w]).resize((size, size), FILTER))
    with Image.open(io.BytesIO(data)) as img:
        s = draft_scale(w, h, size) if img.format == "JPEG" else 1
        if s > 1:
            full_width = img.width
            _, box = img.draft("RGB", (img.width // s, img.height // s))
            s = full_width / box[2]  # the scale libjpeg applied (draft's box: the file's size / s)
        img = img.convert("RGB")
        if s == 1:
            return np.asarray(img.crop((x, y, x + w, y + h)).resize((size, size), FILTER))
        left, top = math.floor(x / s), math.floor(y / s)
        hull = img.crop((left, top, math.ceil((x + w) / s), math.ceil((y + h) / s)))
        box = (x / s - left, y / s - top, (x + w) / s - left, (y + h) / s - top)
        return np.asarray(hull.resize((size, size), FILTER, box=box))


def resized_windows_batched(images: list[torch.Tensor], windows: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, size, size, 3) uint8 from decoded (3, H, W) uint8 images (on the device) and
    their (B, 5) windows: each window cut, resized, rounded and flipped where drawn."""
    out = []
    for image, (x, y, w, h, flip) in zip(images, windows.tolist()):
        window = image[None, :, y:y + h, x:x + w].to(torch.float32)
        resized = torch.nn.functional.interpolate(window, size=(size, size), mode="bilinear", align_corners=False,
                                                  antialias=True)
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)[0]
        out.append((resized.flip(-1) if flip else resized).permute(1, 2, 0))
    return torch.stack(out)[:, None]
