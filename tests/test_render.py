"""The CPU renderer (render.render_into: render_cpu.cpp, compiled at first use by native.py)
against numpy's `render_one`, the reference every loader path is held to: bit for bit, on
the shipped photos."""
from __future__ import annotations


import numpy as np
import pytest

from alexprep.imagenet_prep import render
from alexprep.imagenet_prep.sample_data import load_photo, photo_crop, photo_names

needs_kernel = pytest.mark.skipif(render.kernel() is None, reason="the C++ renderer could not be built here")


def photos(n: int, size: int = 256) -> np.ndarray:
    """(n, size, size, 3) uint8 crops of the shipped photos."""
    rng = np.random.default_rng(1)
    names = photo_names()
    return np.stack([np.asarray(photo_crop(load_photo(names[i % len(names)]), (size, size), rng))
                     for i in range(n)])


def case(n: int, crops: int, crop: int, size: int, seed: int):
    """Windows (n, crops, 3) anywhere in the image, half of them flipped, lighting shifts and a
    mean image as the loaders give them."""
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, size - crop + 1, (n, crops, 2))
    windows = np.concatenate([offsets, rng.integers(0, 2, (n, crops, 1))], axis=-1).astype(np.int64)
    cmn = rng.normal(0, 4, (n, 3)).astype(np.float32)
    mean_chw = (rng.random((3, size, size)) * 255).astype(np.float32)
    inv_std = (1 / rng.uniform(40, 80, 3)).astype(np.float32)
    return windows, cmn, mean_chw, inv_std


def reference(images, windows, cmn, mean_chw, inv_std, crop):
    out = np.empty((len(images), windows.shape[1], 3, crop, crop), np.float32)
    for i in range(len(images)):
        render.render_one(out[i], images[i], windows[i], cmn[i], mean_chw, inv_std)
    return out


@needs_kernel
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("std", [True, False])
@pytest.mark.parametrize("crops, crop", [(1, 224), (10, 224), (2, 37)])
def test_the_kernel_renders_what_numpy_renders_to_the_bit(mean, std, crops, crop):
    images = photos(6)
    windows, cmn, mean_chw, inv_std = case(6, crops, crop, 256, seed=crops + crop)
    mean_chw = mean_chw if mean else None
    inv_std = inv_std if std else None
    want = reference(images, windows, cmn, mean_chw, inv_std, crop)
    got = np.full_like(want, np.nan)
    render.render_into(got, images, windows, cmn, mean_chw, inv_std)
    assert np.array_equal(got, want)  # NaN-filled first: every element was written
    assert windows[..., 2].any() and not windows[..., 2].all()  # both directions were exercised


@needs_kernel
@pytest.mark.parametrize("flip", [0, 1])
def test_windows_decoded_alone_read_the_mean_image_where_they_were(flip):
    """DALI decodes a training window alone: the image is the window (offsets 0) and the mean
    image is read at the window's place in the stored image (mean_at); the result is the
    whole image's rendering, bit for bit, in the kernel and in numpy."""
    images = photos(4)
    windows, cmn, mean_chw, inv_std = case(4, 1, 224, 256, seed=11)
    windows[..., 2] = flip
    want = reference(images, windows, cmn, mean_chw, inv_std, 224)
    cut = np.stack([img[oy:oy + 224, ox:ox + 224] for img, (ox, oy, _) in zip(images, windows[:, 0])])
    at_zero = windows * np.array([0, 0, 1])
    mean_at = np.ascontiguousarray(windows[..., :2])
    got = np.full_like(want, np.nan)
    render.render_into(got, cut, at_zero, cmn, mean_chw, inv_std, mean_at)
    assert np.array_equal(got, want)
    by_numpy = np.empty_like(want)
    for i in range(4):
        render.render_one(by_numpy[i], cut[i], at_zero[i], cmn[i], mean_chw, inv_std, mean_at[i])
    assert np.array_equal(by_numpy, want)
    with pytest.raises(IndexError, match="outside its image"):
        render.render_into(got, cut, at_zero, cmn, mean_chw, inv_std, mean_at + 33)


@needs_kernel
def test_the_kernel_takes_read_only_inputs_and_refuses_windows_outside_the_image():
    images = photos(2)
    windows, cmn, mean_chw, _ = case(2, 1, 224, 256, seed=3)
    images.flags.writeable = False  # as PIL's arrays are
    out = np.empty((2, 1, 3, 224, 224), np.float32)
    render.render_into(out, images, windows, cmn, mean_chw, None)
    assert np.array_equal(out, reference(images, windows, cmn, mean_chw, None, 224))
    for bad in ((33, 0, 0), (0, -1, 0)):
        shifted = windows.copy()
        shifted[1, 0] = bad
        with pytest.raises(IndexError, match="outside its image"):
            render.render_into(out, images, shifted, cmn, mean_chw, None)
    with pytest.raises(ValueError, match="not C-contiguous"):
        render.render_into(out, images[:, :, ::-1], windows, cmn, mean_chw, None)
    with pytest.raises(ValueError, match="images"):
        render.render_into(out, images[..., :2].copy(), windows, cmn, mean_chw, None)


@needs_kernel
def test_the_kernel_gives_the_same_bits_on_any_number_of_threads():
    import torch

    images = photos(4)
    windows, cmn, mean_chw, inv_std = case(4, 10, 224, 256, seed=5)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = np.empty((4, 10, 3, 224, 224), np.float32)
            render.render_into(out, images, windows, cmn, mean_chw, inv_std)
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


FALLBACK = """
import warnings, numpy as np
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from alexprep.imagenet_prep import render
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    windows = np.array([[[3, 5, 1]], [[0, 8, 0]]], np.int64)
    cmn = rng.normal(0, 3, (2, 3)).astype(np.float32)
    mean = (rng.random((3, 40, 40)) * 255).astype(np.float32)
    out = np.empty((2, 1, 3, 32, 32), np.float32)
    render.render_into(out, images, windows, cmn, mean, None)
    render.render_into(out, images, windows, cmn, mean, None)
    want = np.empty_like(out)
    for i in range(2):
        render.render_one(want[i], images[i], windows[i], cmn[i], mean, None)
print("EQUAL", np.array_equal(out, want))
print("WARNINGS", len(caught))
for w in caught:
    print("MESSAGE", str(w.message))
"""


@pytest.mark.parametrize("how", ["no compiler", "turned off"])
def test_without_the_kernel_numpy_renders_after_one_warning(how, without_kernel):
    """A process whose C++ compiler does not exist (and an empty extension cache): one
    warning, then numpy's numbers. ALEXPREP_CPU_KERNEL=0: the same, silently."""
    lines = without_kernel(FALLBACK, how)
    assert "EQUAL True" in lines, lines
    if how == "no compiler":
        assert "WARNINGS 1" in lines, lines
        (message,) = [line for line in lines if line.startswith("MESSAGE")]
        assert "CPU image renderer could not be built" in message and "using numpy" in message
    else:
        assert "WARNINGS 0" in lines, lines
