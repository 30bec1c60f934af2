"""From decoded pixels and a batch's windows to the loaders' float tensors: the arithmetic
every path shares (the torch backend in workers or on the GPU, `alexprep predict`).

All of them compute what DALI computes, in the same float32 operations and order:
`((x - mean_image window) - (base - lighting shift)) * (1 / std)`, so given the same draws
the paths give identical tensors on raw shards (docs/design.md, "Augmentation semantics").

On the CPU (`render_into`) that is one C++ pass per window and channel (render_cpu.cpp,
compiled at first use by native.py), five times numpy's speed; numpy's `render_one` is
the reference it is tested against and the path where it cannot be built.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from alexprep.imagenet_prep import native

SOURCE = Path(__file__).with_name("render_cpu.cpp")


def kernel():
    """The compiled CPU renderer (a module with `render`), or None where it cannot be built
    (one warning: numpy then renders) or ALEXPREP_CPU_KERNEL=0."""
    return native.load("alexprep_render", SOURCE, what="the CPU image renderer", instead="numpy",
                       python_module=True, extra_cflags=["-ffp-contract=off"])


def render_into(out: np.ndarray, images: np.ndarray, windows: np.ndarray, cmn_mean: np.ndarray,
                mean_chw: np.ndarray | None, inv_std: np.ndarray | None, mean_at: np.ndarray | None = None) -> None:
    """`render_one` for a batch, on the CPU: out (B, K, 3, c, c) float32 from (B, H, W, 3)
    uint8 images, (B, K, 3) int64 windows and (B, 3) float32 cmn_mean; mean_chw and inv_std
    as `cpu_norm_arrays` gives them; mean_at (B, K, 2) int64 or None as render_one's. The
    C++ kernel on as many threads as torch's (started and joined per call: OpenMP's spin
    after each call and took the DALI decoders' CPU), else numpy image by image."""
    ops = kernel()
    if ops is not None:
        ops.render(out, images, windows, cmn_mean, mean_chw, inv_std, mean_at)
        return
    for i in range(len(out)):
        render_one(out[i], images[i], windows[i], cmn_mean[i], mean_chw, inv_std,
                   None if mean_at is None else mean_at[i])


def _window_indices(windows: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices (B, K, c) of each (offset_x, offset_y, flip) window, the
    columns reversed where it is flipped."""
    ar = torch.arange(c, device=windows.device)
    ox, oy, flip = windows.unbind(-1)  # each (B, K)
    rows = oy[..., None] + ar
    cols = torch.where(flip[..., None].bool(), ox[..., None] + (c - 1) - ar, ox[..., None] + ar)
    return rows, cols


def cut_windows_batched(images: torch.Tensor, windows: torch.Tensor, crop: int) -> torch.Tensor:
    """(B, S, S, 3) uint8 images to their (B, K, c, c, 3) windows, flipped where drawn: one
    gather on the images' device (the GPU-decoding path)."""
    rows, cols = _window_indices(windows, crop)
    b = torch.arange(len(images), device=images.device)[:, None, None, None]
    return images[b, rows[..., :, None], cols[..., None, :]]


def render(crops: torch.Tensor, windows: torch.Tensor, cmn_mean: torch.Tensor, mean_image: torch.Tensor | None,
           inv_std: torch.Tensor) -> torch.Tensor:
    """uint8 windows (B, K, c, c, 3), already cut and flipped, to float32 (B, K, 3, c, c),
    batched (on the GPU).

    windows (B, K, 3) int64 (offset_x, offset_y, flip): where the mean image's window is.
    cmn_mean (B, 3) float32: base - lighting shift. mean_image (S, S, 3) float32 or None.
    """
    x = crops.to(torch.float32)  # (B, K, c, c, 3)
    if mean_image is not None:
        rows, cols = _window_indices(windows, crops.shape[2])
        x = x - mean_image[rows[..., :, None], cols[..., None, :]]  # the window, mirrored with the image
    x = (x - cmn_mean[:, None, None, None, :]) * inv_std
    return x.permute(0, 1, 4, 2, 3).contiguous()  # (B, K, 3, c, c)


def render_one(out: np.ndarray, image: np.ndarray, windows: np.ndarray, cmn_mean: np.ndarray,
               mean_chw: np.ndarray | None, inv_std: np.ndarray | None, mean_at: np.ndarray | None = None) -> None:
    """`render` for one (S, S, 3) uint8 image, written into out (K, 3, c, c) float32: the
    same float32 operations in the same order, image by image. In numpy, single-threaded:
    it runs in DataLoader workers (one thread each); a batched gather of the mean windows
    was 6x slower on the CPU, and torch's intra-op threads slow to a crawl on a busy machine.

    mean_chw (3, S, S) float32 or None; inv_std (3,) or None when it is all ones (a
    multiplication by 1 is exact, so skipping it changes no bit). mean_at (K, 2) or None:
    where each window's mean window is, when the image is not the whole stored image (a
    window DALI decoded alone); by default where the window is.
    """
    c = out.shape[-1]
    chw = image.transpose(2, 0, 1)  # a view
    shift = cmn_mean[:, None, None]
    scale = None if inv_std is None else inv_std[:, None, None]
    for k, (ox, oy, flip) in enumerate(windows):
        x = chw[:, oy:oy + c, ox:ox + c]
        x = x[..., ::-1] if flip else x
        o = out[k]
        if mean_chw is None:
            np.copyto(o, x)  # uint8 -> float32, exact
        else:
            mx, my = (ox, oy) if mean_at is None else mean_at[k]
            m = mean_chw[:, my:my + c, mx:mx + c]
            np.subtract(x, m[..., ::-1] if flip else m, out=o)  # float32(x) - mean, as DALI
        o -= shift
        if scale is not None:
            o *= scale


def cut_windows(image: np.ndarray, windows: np.ndarray, crop: int, out: np.ndarray) -> None:
    """Write each (offset_x, offset_y, flip) window of one (S, S, 3) image into out[k]."""
    for k, (ox, oy, flip) in enumerate(windows):
        window = image[oy:oy + crop, ox:ox + crop]
        out[k] = window[:, ::-1] if flip else window


def norm_tensors(norm, device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A Normalization's mean image and 1/std as tensors on `device`, for `render`."""
    mean = None if norm.mean_image is None else torch.from_numpy(norm.mean_image).to(device)
    return mean, torch.from_numpy(norm.inv_std).to(device)


def cpu_norm_arrays(norm) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A Normalization's mean image as (3, S, S) and 1/std (None when all ones), for
    `render_one`."""
    mean_chw = None if norm.mean_image is None else np.ascontiguousarray(norm.mean_image.transpose(2, 0, 1))
    return mean_chw, None if bool((norm.inv_std == 1).all()) else norm.inv_std
