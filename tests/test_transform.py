"""One image to the paper's 256x256 crop: pixels against an independent PIL reference,
and every quirk of ImageNet's files."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from alexprep.imagenet_prep.sample_data import jpeg_bytes, load_photo, photo_names
from alexprep.imagenet_prep.transform import (
    ImageSpec, UnreadableImage, decode, encode, load_center_crop, opencv_jpeg, pil_decode,
)

SPEC = ImageSpec()


def reference_crop(img: Image.Image, size: int = 256) -> np.ndarray:
    """The paper's preprocessing written the plain way: full decode, resize the shorter side
    to 256 (Lanczos, which differs from our default bicubic by less than q95's error),
    crop the centre."""
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    # A real photograph at 640x512: its resized width (320) and crop offset are whole
    # pixels, so the plain resize-then-crop reference has no half-pixel rounding.
    return Image.fromarray(load_photo("motorcycle")).resize((640, 512), Image.Resampling.BICUBIC)


# Sizes whose resize-then-crop lands on whole pixels, so that the reference is exact.
@pytest.mark.parametrize("size", [(500, 400), (400, 500), (500, 250), (2000, 1600), (2000, 1000), (40, 32), (2400, 240)])
def test_crop_matches_plain_pil_reference(photo, size):
    img = photo.resize(size, Image.Resampling.BICUBIC)
    data = jpeg_bytes(img, quality=92)
    ours = load_center_crop(data, SPEC)
    assert ours.shape == (256, 256, 3) and ours.dtype == np.uint8
    reference = reference_crop(Image.open(io.BytesIO(data)))
    # DCT-scaled decoding of the large images differs from the full decode by less than
    # the JPEG q92 error of the source itself.
    assert psnr(ours, reference) > 33, size


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (500, 333)])
def test_crop_at_imagenet_sizes_is_the_exact_centre(photo, size):
    # Here resize-then-crop must round the crop offset (up to half a pixel); we map the
    # exact central square instead, so compare against a reference shifted by that half.
    img = photo.resize(size, Image.Resampling.BICUBIC)
    ours = load_center_crop(jpeg_bytes(img, 95), SPEC)
    assert psnr(ours, reference_crop(img)) > 22  # a sub-pixel shift of a sharp photo
    w, h = size
    s = min(w, h)
    exact = img.resize((256, 256), Image.Resampling.BICUBIC, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
    assert psnr(ours, np.asarray(exact)) > 35  # only the q95 error of the input remains


def test_crop_is_the_centre_not_a_corner(photo):
    # A wide image whose left and right thirds differ: the crop must come from the middle.
    arr = np.zeros((300, 900, 3), np.uint8)
    arr[:, 300:600] = np.asarray(photo.resize((300, 300)))
    ours = load_center_crop(jpeg_bytes(Image.fromarray(arr), 95), SPEC)
    middle = np.asarray(photo.resize((256, 256), Image.Resampling.LANCZOS))
    assert psnr(ours, middle) > 25


def test_big_jpeg_uses_dct_scaling(photo, monkeypatch):
    from PIL import JpegImagePlugin

    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((self.size, result))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    load_center_crop(jpeg_bytes(photo.resize((2000, 1500)), 90), SPEC)
    (decoded_size, _), = calls
    # libjpeg decoded at 1/4 scale: the shorter side 375 is still >= 256, 1/16 of the pixels.
    assert decoded_size == (500, 375)
    calls.clear()
    load_center_crop(jpeg_bytes(photo.resize((500, 375)), 90), SPEC)
    assert calls[0][0] == (500, 375)  # less than twice the target: decoded in full


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_named_jpeg_is_read_by_content(photo):
    data = _encoded(photo, "PNG")  # the name does not matter: only bytes are passed
    assert psnr(load_center_crop(data, SPEC), reference_crop(photo)) > 40


def test_cmyk_and_grayscale_jpegs_become_rgb(photo):
    cmyk = load_center_crop(_encoded(photo.convert("CMYK"), "JPEG", quality=95), SPEC)
    assert psnr(cmyk, reference_crop(photo.convert("CMYK").convert("RGB"))) > 30
    gray = load_center_crop(jpeg_bytes(photo.convert("L"), 95), SPEC)
    assert gray.shape == (256, 256, 3)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_palette_and_alpha(photo):
    pal = load_center_crop(_encoded(photo.convert("P"), "PNG"), SPEC)
    assert psnr(pal, reference_crop(photo.convert("P"))) > 40
    # A fully transparent image is composited over white, whatever its hidden colour.
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)
    assert (load_center_crop(_encoded(rgba, "PNG"), SPEC) == 255).all()
    # Half transparency blends halfway to white.
    rgba.putalpha(128)
    blended = load_center_crop(_encoded(rgba, "PNG"), SPEC).astype(int)
    expected = reference_crop(photo).astype(int) * 128 / 255 + 255 * 127 / 255
    assert np.abs(blended - expected).mean() < 2


def test_16_bit_grayscale_keeps_its_range():
    ramp = (np.linspace(0, 65535, 300 * 300).reshape(300, 300)).astype(np.uint16)
    out = load_center_crop(_encoded(Image.fromarray(ramp), "PNG"), SPEC)
    assert out.min() < 10 and out.max() > 245  # not clipped to black or white


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"Hello, this is a README, not a picture.\n", "not an image"),
    ],
)
def test_unreadable_files_have_reasons(data, reason):
    with pytest.raises(UnreadableImage, match=reason):
        load_center_crop(data, SPEC)


def test_truncated_jpeg_is_an_error_not_grey_pixels(photo):
    data = jpeg_bytes(photo, 90)
    with pytest.raises(UnreadableImage, match="(?i)truncated|broken|premature"):
        load_center_crop(data[: len(data) // 2], SPEC)


def test_encode_decode_round_trip(photo):
    pixels = load_center_crop(jpeg_bytes(photo, 95), SPEC)
    raw = ImageSpec(encoding="raw")
    assert np.array_equal(decode(encode(pixels, raw), raw), pixels)
    assert len(encode(pixels, raw)) == 256 * 256 * 3
    assert psnr(decode(encode(pixels, SPEC), SPEC), pixels) > 34  # q95, 4:2:0 chroma, a detailed photo


@pytest.mark.parametrize("kwargs", [{"quality": 0}, {"quality": 101}, {"encoding": "png"}, {"resample": "magic"}])
def test_bad_spec_is_refused(kwargs):
    with pytest.raises(ValueError):
        ImageSpec(**kwargs)


@pytest.mark.skipif(opencv_jpeg() is None, reason="OpenCV's decoding is not used here (no libjpeg-turbo build)")
@pytest.mark.parametrize("quality", [1, 50, 95, 100])
def test_shard_jpegs_decode_to_pils_pixels(quality):
    """decode() takes OpenCV's path for shard JPEGs: every shipped photo, encoded as build-shards
    encodes (odd sides too), gives PIL's pixels to the bit."""
    spec = ImageSpec(quality=quality)
    rng = np.random.default_rng(quality)
    for name in photo_names():
        photo = load_photo(name)
        h, w = rng.integers(150, 256, 2)
        data = encode(np.ascontiguousarray(photo[:h, :w]), spec)
        assert np.array_equal(opencv_jpeg()(data), pil_decode(data)), name
        assert np.array_equal(decode(data, spec), pil_decode(data)), name


@pytest.mark.skipif(opencv_jpeg() is None, reason="OpenCV's decoding is not used here (no libjpeg-turbo build)")
def test_opencv_path_ignores_exif_orientation_and_refuses_truncation(photo):
    """An EXIF 'rotate 90' tag changes nothing (as in PIL); a truncated shard JPEG is PIL's
    error, never grey pixels."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90, exif=exif)
    data = buf.getvalue()
    assert np.array_equal(decode(data, SPEC), pil_decode(data))
    assert decode(data, SPEC).shape == (512, 640, 3)
    with pytest.raises(OSError, match="(?i)truncated"):
        decode(data[: len(data) // 2], SPEC)



@pytest.mark.skipif(opencv_jpeg() is None, reason="OpenCV's decoding is not used here (no libjpeg-turbo build)")
def test_an_opencv_without_rgb_decoding_still_gives_rgb(photo, monkeypatch):
    """OpenCV before 4.10 has no IMREAD_COLOR_RGB: its BGR pixels are turned around."""
    import cv2

    monkeypatch.delattr(cv2, "IMREAD_COLOR_RGB")
    opencv = opencv_jpeg.__wrapped__()  # a fresh check, not the cached decoder
    assert opencv is not None
    data = jpeg_bytes(photo, 95)
    pixels = opencv(data)
    assert np.array_equal(pixels, pil_decode(data)) and pixels.flags.c_contiguous
