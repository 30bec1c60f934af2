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


def window_pixels(data, spec: ImageSpec, shape: tuple[int, int], window, size: int) -> tuple[np.ndarray, tuple]:
    """What `resized_window` resizes: (pixels (h, w, 3) uint8, box (x0, y0, x1, y1) in them).
    The window itself and its whole box, or for a JPEG window decoded DCT-scaled the hull of
    whole drafted pixels it touches and its fractional box there."""
    x, y, w, h = (int(v) for v in window[:4])
    if spec.encoding == "raw":
        return decode(data, spec, shape)[y:y + h, x:x + w], (0, 0, w, h)
    with Image.open(io.BytesIO(data)) as img:
        s = draft_scale(w, h, size) if img.format == "JPEG" else 1
        if s > 1:
            full_width = img.width
            _, box = img.draft("RGB", (img.width // s, img.height // s))
            s = full_width / box[2]  # the scale libjpeg applied (draft's box: the file's size / s)
        img = img.convert("RGB")
        if s == 1:
            return np.asarray(img.crop((x, y, x + w, y + h))), (0, 0, w, h)
        left, top = math.floor(x / s), math.floor(y / s)
        hull = img.crop((left, top, math.ceil((x + w) / s), math.ceil((y + h) / s)))
        return np.asarray(hull), (x / s - left, y / s - top, (x + w) / s - left, (y + h) / s - top)


def resized_window(data, spec: ImageSpec, shape: tuple[int, int], window, size: int) -> np.ndarray:
    """(size, size, 3) uint8: window (x, y, w, h) of one stored image (shard bytes and its
    (height, width)), resized; not flipped."""
    pixels, box = window_pixels(data, spec, shape, window, size)
    return resize_window(pixels, size, box)


def resize_window(pixels: np.ndarray, size: int, box: tuple | None = None) -> np.ndarray:
    """(size, size, 3) uint8: `box` of (h, w, 3) uint8 pixels (all of them by default) resized
    with PIL's antialiased bilinear filter."""
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((size, size), FILTER, box=box or (0, 0, image.width, image.height)))


def pil_bilinear_weights(start: torch.Tensor, stop: torch.Tensor, extent: torch.Tensor, size: int,
                         length: int) -> torch.Tensor:
    """(B, size, length): PIL's antialiased bilinear coefficients (Resample.c,
    precompute_coeffs) resizing [start, stop) of each of B inputs `extent` pixels long to
    `size`; taps past `extent` (the canvas beyond the image) weigh 0. Computed where the
    inputs are, from tensors: no host sync."""
    dtype = torch.float64 if start.device.type == "cpu" else torch.float32
    start, stop, extent = start.to(dtype), stop.to(dtype), extent.to(dtype)
    scale = (stop - start) / size  # (B,)
    filterscale = scale.clamp(min=1.0)  # widened when shrinking: the antialiasing
    out = torch.arange(size, dtype=dtype, device=start.device)
    centers = start[:, None] + (out[None, :] + 0.5) * scale[:, None]  # (B, size)
    first = torch.trunc(centers - filterscale[:, None] + 0.5).clamp(min=0)
    last = torch.minimum(torch.trunc(centers + filterscale[:, None] + 0.5), extent[:, None])
    x = torch.arange(length, dtype=dtype, device=start.device)
    weights = (1 - ((x - centers[..., None] + 0.5) / filterscale[:, None, None]).abs()).clamp(min=0)
    weights = weights * ((x >= first[..., None]) & (x < last[..., None]))
    return weights / weights.sum(-1, keepdim=True)


def _round_u8(x: torch.Tensor) -> torch.Tensor:
    return (x + 0.5).floor_().clamp_(0, 255)  # PIL rounds half up, then clips


def resized_canvases(canvas: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size, size, 3) uint8 from `window_pixels`' outputs on (B, H, W, 3) uint8 canvases
    (each at the top left) and their (B, 6) rows (x0, y0, x1, y1, width, height): the whole
    batch in two batched matrix products, columns then rows with a uint8 rounding between,
    as PIL does (within a level of PIL's fixed-point arithmetic)."""
    b, height, width, _ = canvas.shape
    wx = pil_bilinear_weights(boxes[:, 0], boxes[:, 2], boxes[:, 4], size, width)  # (B, size, W)
    wy = pil_bilinear_weights(boxes[:, 1], boxes[:, 3], boxes[:, 5], size, height)  # (B, size, H)
    pixels = canvas.to(wx.dtype)
    across = _round_u8(torch.einsum("bow,bhwc->bhoc", wx, pixels))  # (B, H, size, 3)
    return _round_u8(torch.einsum("boh,bhwc->bowc", wy, across)).to(torch.uint8)


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
