"""One image, from file bytes to the paper's 256x256 RGB crop and back to bytes.

The paper (section 2): rescale the shorter side to 256, then crop the central 256x256.
We resize only the central square of the source (`Image.resize(box=...)`), which is the
same mapping as resize-then-crop without rounding the intermediate size, and does less
work. JPEGs at least twice the target are decoded at 1/2, 1/4 or 1/8 scale by libjpeg's
DCT scaling (`Image.draft`), so big images cost a fraction of a full decode.

Decisions a user should know (also in docs/build.md):
- Files are recognised by content: a PNG named .JPEG decodes as PNG.
- CMYK, grayscale, palette and 16-bit images become RGB.
- Transparency is composited over white (what a viewer on a white page shows), not dropped.
- EXIF orientation is ignored, as torchvision's ImageFolder (PIL) and DALI's decoders do,
  so a shard holds the pixels those pipelines would see.
"""
from __future__ import annotations

import functools
import importlib.metadata
import contextlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

# A truncated JPEG must be an error we report, never silently grey-filled pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# PIL widens every filter's support when downscaling, so each of these antialiases.
RESAMPLE_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,  # PIL's old ANTIALIAS
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
}
ENCODINGS = ("jpeg", "raw")
# "center-crop": the paper's S x S centre crop (the default). "keep-aspect": the whole image,
# shorter side rescaled to S, longer side capped at max_side, nothing cropped (the input of
# torchvision's and timm's RandomResizedCrop recipe); each row records its height and width.
RESIZE_MODES = ("center-crop", "keep-aspect")
# decode() reads shard JPEGs with OpenCV where opencv_jpeg() vouches for it; off: PIL only
# (the torch backend's path before issue 29, a benchmark contender).
OPENCV_DECODE = True


@dataclass(frozen=True)
class ImageSpec:
    """How every image of a build is turned into bytes; part of the build id."""

    size: int = 256  # the paper's 256x256 (keep-aspect: the shorter side)
    encoding: str = "jpeg"  # "jpeg" (compact) or "raw" (HWC uint8, no decode cost, exact)
    quality: int = 95  # cuda-convnet2's make-data used 95
    # Bicubic: cheaper than Lanczos here, and the two differ by less than the q95 JPEG error
    # itself (the PSNRs and the cost: docs/build.md, "Each image").
    resample: str = "bicubic"
    resize: str = "center-crop"  # or "keep-aspect" (RESIZE_MODES); size is then the shorter side
    max_side: int | None = None  # keep-aspect only: the longer side's cap (default 2 * size)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if self.resize == "center-crop" and self.max_side is not None:
            raise ValueError("max_side applies to resize='keep-aspect' only (a centre crop is size x size)")
        if self.resize == "keep-aspect":
            if self.max_side is None:
                object.__setattr__(self, "max_side", 2 * self.size)
            if self.max_side < self.size:
                raise ValueError(f"max_side ({self.max_side}) must be at least the shorter side ({self.size})")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, not {self.encoding!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be 1..100, not {self.quality}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, not {self.resample!r}")
        if self.size < 1:
            raise ValueError(f"size must be positive, not {self.size}")

    @property
    def keep_aspect(self) -> bool:
        return self.resize == "keep-aspect"

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image of the given size after the resize: size x size for
        the centre crop; for keep-aspect the shorter side rescaled to `size`, unless the
        longer side would then exceed `max_side`, in which case the longer side is
        `max_side` (and the shorter below `size`). Rounded half up, on integers, and
        at least 1 pixel."""
        if not self.keep_aspect:
            return self.size, self.size
        short, long = min(width, height), max(width, height)
        if long * self.size <= self.max_side * short:  # long * size / short <= max_side
            new_short, new_long = self.size, (2 * long * self.size + short) // (2 * short)
        else:
            new_short, new_long = max(1, (2 * short * self.max_side + long) // (2 * long)), self.max_side
        return (new_short, new_long) if width <= height else (new_long, new_short)


class UnreadableImage(Exception):
    """A file that does not decode to an image; the message is the reason we report."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: keep the top 8 bits (PIL's own convert would clip at 255).
        arr = np.asarray(img, dtype=np.uint32)
        peak = 65535 if img.mode.startswith("I;16") or arr.max() > 255 else 255
        return Image.fromarray((arr * 255 // peak).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, P without transparency, 1


def load_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode file bytes into the (H, W, 3) uint8 image the build stores: the centre crop,
    or for keep-aspect the whole image resized (`ImageSpec.target_size`)."""
    return load_keep_aspect(data, spec) if spec.keep_aspect else load_center_crop(data, spec)


def load_keep_aspect(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode file bytes into the whole image, shorter side `spec.size`, longer side at most
    `spec.max_side`, (H, W, 3) uint8. The same filter and the same DCT-scaled decoding as
    the centre crop: libjpeg reduces only while both sides stay >= the target, so the
    resize is always a downscale (or an upscale of a small image), as there."""
    with _readable(data) as img:
        target = spec.target_size(*img.size)  # from the file's own size, whatever draft does
        if img.format == "JPEG":
            img.draft("RGB", target)
        img.load()
        return np.asarray(_to_rgb(img).resize(target, RESAMPLE_FILTERS[spec.resample]), dtype=np.uint8)


def load_center_crop(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode file bytes (any format PIL knows) into the central (size, size, 3) uint8 crop."""
    with _readable(data) as img:
        if img.format == "JPEG":
            # DCT-scaled decoding: libjpeg picks the largest 1/2^k reduction whose result is
            # still at least size x size, so both sides stay >= the target.
            img.draft("RGB", (spec.size, spec.size))
        img.load()
        img = _to_rgb(img)
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        out = img.resize((spec.size, spec.size), RESAMPLE_FILTERS[spec.resample],
                         box=(left, top, left + side, top + side))
        return np.asarray(out, dtype=np.uint8)


@contextlib.contextmanager
def _readable(data: bytes):
    """The opened image; any way it fails to decode becomes UnreadableImage with its reason."""
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        yield Image.open(io.BytesIO(data))
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise UnreadableImage(_reason(exc)) from None


def _reason(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, Image.UnidentifiedImageError) or text.startswith("cannot identify image file"):
        return "not an image (no known format matches its content)"
    if "truncated" in text.lower() or "premature end" in text.lower():
        return f"truncated image ({text})"
    return f"{type(exc).__name__}: {text}"


def encode(pixels: np.ndarray, spec: ImageSpec) -> bytes:
    """The bytes stored in a shard: JPEG at spec.quality, or raw HWC uint8."""
    if spec.encoding == "raw":
        return np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    # 4:2:0 chroma subsampling stated explicitly (PIL's default at this quality) so that
    # the bytes do not change if that default does.
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=spec.quality, subsampling="4:2:0")
    return buf.getvalue()


def decode(data: bytes, spec: ImageSpec, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Shard bytes back to an (H, W, 3) uint8 array: (size, size, 3) for the centre crop;
    for keep-aspect raw bytes, `shape` = the row's (height, width) is needed."""
    if spec.encoding == "raw":
        if shape is None:
            if spec.keep_aspect:
                raise ValueError("raw keep-aspect bytes need the row's (height, width) to decode")
            shape = (spec.size, spec.size)
        return np.frombuffer(data, dtype=np.uint8).reshape(shape[0], shape[1], 3)
    opencv = opencv_jpeg() if OPENCV_DECODE else None
    if opencv is not None and bytes(data[-2:]) == b"\xff\xd9":  # complete: a truncated one is PIL's error below
        pixels = opencv(data)
        if pixels is not None:
            return pixels
    return pil_decode(data)


def pil_decode(data) -> np.ndarray:
    """PIL's (H, W, 3) uint8 RGB decoding of image bytes: the reference `decode` matches."""
    with Image.open(io.BytesIO(data)) as img:
        # convert() copies even an RGB image: only what is not RGB is converted.
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


@functools.cache
def opencv_jpeg():
    """OpenCV's JPEG decoding, `f(data) -> (H, W, 3) uint8 RGB or None`, where it gives
    PIL's pixels: both are libjpeg-turbo's, and OpenCV's skips PIL's chunked feed and RGBX
    copy (benchmarks/README.md, "decoding with OpenCV / PIL"). None where OpenCV does not
    import, was built without libjpeg-turbo or differs from PIL on a test image; `decode`
    then uses PIL."""
    try:
        import cv2
    except ImportError:
        return None
    if "libjpeg-turbo" not in cv2.getBuildInformation():
        return None
    rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV 4.10 and later
    flags = cv2.IMREAD_IGNORE_ORIENTATION | (cv2.IMREAD_COLOR if rgb is None else rgb)  # EXIF ignored, as PIL

    def opencv(data) -> np.ndarray | None:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if pixels is None or pixels.ndim != 3 or pixels.shape[2] != 3:
            return None
        return pixels if rgb is not None else np.ascontiguousarray(pixels[..., ::-1])

    # A test image as shards hold them (PIL's 4:2:0 JPEG of smooth and noisy pixels, odd sides).
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:67, 0:93]
    test = np.stack([x * 2.7, y * 3.1, (x + y) * 1.4], -1) + rng.normal(0, 12, (67, 93, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(test, 0, 255).astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90,
                                                                           subsampling="4:2:0")
    same = opencv(buf.getvalue())
    return opencv if same is not None and np.array_equal(same, pil_decode(buf.getvalue())) else None


def pil_flavour() -> dict:
    """Which PIL this process runs on: pillow-simd and Pillow both install as `PIL`."""
    import PIL
    from PIL import features

    dists = importlib.metadata.packages_distributions().get("PIL", [])
    name = "pillow-simd" if any("simd" in d.lower() for d in dists) else "Pillow"
    if name == "Pillow" and ".post" in PIL.__version__:  # pillow-simd versions end in .postN
        name = "pillow-simd"
    return {
        "name": name,
        "version": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
    }
