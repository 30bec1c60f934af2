"""The training set's statistics: the mean image and the 3x3 RGB covariance, exactly.

Over which pixels: every pixel of every training image's 256x256 centre crop (the paper's
rescale-then-crop), taken before encoding, i.e. the exact pixels the shard was made from,
on the 0-255 RGB scale. (`--recompute` takes them from the shard bytes instead: identical
for `--encoding raw`, within JPEG's error for JPEG shards.)

Each shard keeps partial sums as integers (int64 sums of uint8 values and of their
products) in `<shard>.stats.npz` beside it, so partials from any number of shards and
machines merge by integer addition to the same numbers in any order. From the merged sums:

    mean_image   = pixel_sum / images                       (S, S, 3)
    channel_mean = per-channel sum / pixels                 (3,)
    rgb_cov      = (pixels * S_xx - s s^T) / pixels^2       (3, 3), the population covariance
                   (divided by the pixel count, not count - 1), the subtraction done on
                   exact integers so that nothing cancels in floating point
    channel_std  = sqrt(diag(rgb_cov))
    eigvals      = eigenvalues of rgb_cov, descending
    eigvecs      = its unit eigenvectors as columns (eigvecs[:, k] goes with eigvals[k]),
                   each signed so that its largest-magnitude component is positive (the
                   luminance vector, ~(1, 1, 1)/sqrt(3), then has all components positive)

For `--resize keep-aspect` builds (images of different sizes) the pixels are every pixel of
every stored image, and a partial keeps only the per-channel sums and an explicit pixel
count beside the outer-product sums: channel mean/std, covariance and PCA are exact and
mergeable as above, and there is no mean image (it needs images of one size): `mean_image`
is None, and stats.npz has none.

`compute_stats` merges (or recomputes) them for a build folder, `write_stats` writes
OUT/stats.npz, OUT/stats.json and OUT/stats.png, `load_stats` reads them back.
"""
from __future__ import annotations

import io
import json
import collections
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexprep.imagenet_prep.atomic import write_bytes_atomic
from alexprep.imagenet_prep.build_folder import STATS, BuildFolder
from alexprep.imagenet_prep.devices import available_cpus
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.shards import image_bytes_column, open_shard, read_split, row_sizes
from alexprep.imagenet_prep.stats_plot import render_png
from alexprep.imagenet_prep.transform import decode

# 257 * 255 = 65,535: the most uint8 images whose per-pixel sum a uint16 holds. `add`
# accumulates into a uint16 buffer (6x less memory traffic than int64) and flushes it into
# the int64 sums before it can overflow.
_PENDING_MAX = 257
_ROWS = 256  # rows summed per column in outer_sum: 256 * 255^2 < 2^24, exact in float32

PIXELS_NOTE = "every pixel of the {s}x{s} centre crop of every {split} image, {how}, on the 0-255 RGB scale"
PIXELS_NOTE_KEEP_ASPECT = ("every pixel of every {split} image, resized whole (--resize keep-aspect: sizes differ), "
                          "{how}, on the 0-255 RGB scale")
NO_MEAN_IMAGE = ("none: this build's images differ in size (--resize keep-aspect), so there is no mean image; "
                 "normalise with the channel mean and std (normalize='channel')")
SIGN_NOTE = ("columns are unit eigenvectors (eigvecs[:, k] goes with eigvals[k]); "
             "each has its largest-magnitude component positive")


class PartialStats:
    """Integer sums over some images; `merge` adds two, `add` adds one image.

    pixel_sum      (S, S, 3) int64: per-pixel sums, for the mean image; for images of
                   different sizes (pixels given) (3,) int64: per-channel sums
    rgb_outer_sum  (3, 3) int64: sum over all pixels of x x^T
    image_count    images added
    pixels         None for S x S images; else the number of pixels added (sizes differ)
    """

    def __init__(self, pixel_sum: np.ndarray, rgb_outer_sum: np.ndarray, image_count: int = 0,
                 pixels: int | None = None):
        self._pixel_sum = np.asarray(pixel_sum, np.int64)
        self.rgb_outer_sum = np.asarray(rgb_outer_sum, np.int64)
        self.image_count = int(image_count)
        self._pixels = None if pixels is None else int(pixels)
        self._pending: np.ndarray | None = None  # uint16 per-pixel sums not yet in _pixel_sum
        self._pending_count = 0

    @classmethod
    def empty(cls, size: int = 256) -> "PartialStats":
        return cls(np.zeros((size, size, 3), np.int64), np.zeros((3, 3), np.int64), 0)

    @classmethod
    def empty_for(cls, spec) -> "PartialStats":
        """Empty sums for the images of a build's ImageSpec: per-pixel for the centre crop,
        per-channel with a pixel count for keep-aspect."""
        if spec.keep_aspect:
            return cls(np.zeros(3, np.int64), np.zeros((3, 3), np.int64), 0, pixels=0)
        return cls.empty(spec.size)

    @property
    def sized(self) -> bool:
        """True for images of different sizes: no per-pixel sums, so no mean image."""
        return self._pixels is not None

    # The int64 sums, always up to date when read.
    @property
    def pixel_sum(self) -> np.ndarray:
        self._flush()
        return self._pixel_sum

    @pixel_sum.setter
    def pixel_sum(self, value: np.ndarray) -> None:
        self._pending, self._pending_count = None, 0
        self._pixel_sum = np.asarray(value, np.int64)

    def _flush(self) -> None:
        if self._pending_count:
            np.add(self._pixel_sum, self._pending, out=self._pixel_sum)
            self._pending.fill(0)
            self._pending_count = 0

    def add(self, pixels: np.ndarray) -> None:
        """Add one (S, S, 3) uint8 image (any (H, W, 3) for sums of images of different sizes)."""
        if self._pixels is not None:
            if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
                raise ValueError(f"expected an (H, W, 3) uint8 image, got {pixels.shape} {pixels.dtype}")
            # Rows first, in uint32 (exact below 16 M rows), then the columns in int64: 25x
            # faster than one reduction over the (H*W, 3) view, whose axis is strided.
            self._pixel_sum += np.add.reduce(pixels, axis=0, dtype=np.uint32).sum(axis=0, dtype=np.int64)
            self._pixels += pixels.shape[0] * pixels.shape[1]
            self.rgb_outer_sum += outer_sum(pixels)
            self.image_count += 1
            return
        shape = self._pixel_sum.shape
        if pixels.shape != shape or pixels.dtype != np.uint8:
            raise ValueError(f"expected a {shape} uint8 image, got {pixels.shape} {pixels.dtype}")
        if self._pending is None:
            self._pending = np.zeros(shape, np.uint16)
        elif self._pending_count == _PENDING_MAX:
            self._flush()
        np.add(self._pending, pixels, out=self._pending)
        self._pending_count += 1
        self.rgb_outer_sum += outer_sum(pixels)
        self.image_count += 1

    def add_batch(self, images: np.ndarray) -> None:
        """Add (B, S, S, 3) uint8 images."""
        for pixels in images:
            self.add(pixels)

    def merge(self, other: "PartialStats") -> "PartialStats":
        """A new PartialStats holding both; `+=` adds in place."""
        merged = PartialStats(self.pixel_sum.copy(), self.rgb_outer_sum.copy(), self.image_count, self._pixels)
        merged += other
        return merged

    def __iadd__(self, other: "PartialStats") -> "PartialStats":
        if self.sized != other.sized:
            raise ValueError("cannot merge statistics of fixed-size (centre-crop) and keep-aspect images")
        if self._pixel_sum.shape != other._pixel_sum.shape:
            raise ValueError(f"cannot merge statistics of {self._pixel_sum.shape} and {other._pixel_sum.shape} images")
        np.add(self.pixel_sum, other.pixel_sum, out=self._pixel_sum)
        self.rgb_outer_sum = self.rgb_outer_sum + other.rgb_outer_sum
        self.image_count += other.image_count
        if self._pixels is not None:
            self._pixels += other._pixels
        return self

    def __eq__(self, other) -> bool:
        if not isinstance(other, PartialStats):
            return NotImplemented
        return (self.image_count == other.image_count and self._pixels == other._pixels
                and np.array_equal(self.pixel_sum, other.pixel_sum)
                and np.array_equal(self.rgb_outer_sum, other.rgb_outer_sum))

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        if self.sized:
            return f"PartialStats(sizes differ, image_count={self.image_count}, pixels={self._pixels})"
        return f"PartialStats(size={self._pixel_sum.shape[0]}, image_count={self.image_count})"

    @property
    def rgb_sum(self) -> np.ndarray:
        """(3,) int64: per-channel sums over all pixels (derived, so never inconsistent)."""
        if self.sized:
            return self._pixel_sum.copy()
        return self.pixel_sum.sum(axis=(0, 1))

    @property
    def pixel_count(self) -> int:
        if self.sized:
            return self._pixels
        return self.image_count * self._pixel_sum.shape[0] * self._pixel_sum.shape[1]

    def to_arrays(self) -> dict[str, np.ndarray]:
        if self.sized:
            return {"channel_sum": self._pixel_sum, "rgb_outer_sum": self.rgb_outer_sum,
                    "image_count": np.int64(self.image_count), "pixel_count": np.int64(self._pixels)}
        return {
            "pixel_sum": self.pixel_sum,
            "rgb_outer_sum": self.rgb_outer_sum,
            "image_count": np.int64(self.image_count),
        }

    @classmethod
    def from_arrays(cls, arrays) -> "PartialStats":
        if "pixel_count" in arrays:
            return cls(np.asarray(arrays["channel_sum"], np.int64), np.asarray(arrays["rgb_outer_sum"], np.int64),
                       int(arrays["image_count"]), pixels=int(arrays["pixel_count"]))
        return cls(np.asarray(arrays["pixel_sum"], np.int64), np.asarray(arrays["rgb_outer_sum"], np.int64),
                   int(arrays["image_count"]))

    def to_npz_bytes(self, **extra: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.to_arrays(), **extra)
        return buf.getvalue()


def outer_sum(pixels: np.ndarray) -> np.ndarray:
    """(3, 3) int64: the sum over the pixels of an (..., 3) uint8 array of x x^T, exactly.

    The interleaved RGB bytes, in float32, are laid out as 256 rows of whole pixels (zero
    pixels pad the last row; they add nothing). Each of the three einsums multiplies the
    rows by themselves shifted by 0, 1 or 2 values (R*R, G*G, B*B; R*G, G*B; R*B at the
    columns that hold them) and sums down the 256 rows: every column sum is an integer
    <= 256 * 255^2 < 2^24 and every partial sum of non-negative terms is at most that, so
    float32 holds each exactly whatever the summation order. The column sums are added
    in float64 (exact below 2^53). Three contiguous passes over the pixels, where one per
    channel pair over transposed planes cost 1.3x as much; numpy's einsum, not BLAS,
    whose thin products here were slower still and whose own threads would fight the
    caller's (build workers, --recompute threads) for the cores.
    """
    flat = pixels.reshape(-1)
    if flat.size % 3:
        raise ValueError(f"expected (..., 3) pixels, got {pixels.shape}")
    n = flat.size // 3
    if n * 255 * 255 >= 2**53:
        raise ValueError("too many pixels to sum exactly in one call")
    width = 3 * -(-n // _ROWS)  # whole pixels per row
    if n % _ROWS == 0:
        rows = flat.astype(np.float32).reshape(_ROWS, width)
    else:
        rows = np.zeros((_ROWS, width), np.float32)
        rows.reshape(-1)[:flat.size] = flat
    same = np.einsum("ij,ij->j", rows, rows).reshape(-1, 3).sum(axis=0, dtype=np.float64)  # R*R, G*G, B*B
    next1 = np.einsum("ij,ij->j", rows[:, :-1], rows[:, 1:])  # R*G at columns 3p, G*B at 3p + 1
    next2 = np.einsum("ij,ij->j", rows[:, :-2], rows[:, 2:])  # R*B at columns 3p
    rg, gb, rb = (int(next1[0::3].sum(dtype=np.float64)), int(next1[1::3].sum(dtype=np.float64)),
                  int(next2[0::3].sum(dtype=np.float64)))
    rr, gg, bb = (int(v) for v in same)
    return np.array([[rr, rg, rb], [rg, gg, gb], [rb, gb, bb]], np.int64)


STATS_KEYS = ("mean_image", "channel_mean", "channel_std", "rgb_cov", "eigvals", "eigvecs", "count")


@dataclass(frozen=True)
class DatasetStats:
    """What `alexprep stats` writes to OUT/stats.npz, on the 0-255 RGB scale."""

    mean_image: np.ndarray | None  # (S, S, 3) float64; None for keep-aspect builds (sizes differ)
    channel_mean: np.ndarray  # (3,) float64, = mean_image.mean(axis=(0, 1)) where there is one
    channel_std: np.ndarray  # (3,) float64, over all pixels (population: divided by the pixel count)
    rgb_cov: np.ndarray  # (3, 3) float64, covariance of RGB pixel values (population)
    eigvals: np.ndarray  # (3,) float64, descending
    eigvecs: np.ndarray  # (3, 3) float64, columns are eigenvectors, largest-magnitude component positive
    count: int  # images
    build_id: str = ""

    @classmethod
    def from_partial(cls, partial: PartialStats, build_id: str = "") -> "DatasetStats":
        if partial.image_count == 0:
            raise ValueError("no images: statistics are undefined")
        n_pix = partial.pixel_count
        mean_image = None if partial.sized else partial.pixel_sum / partial.image_count
        rgb_sum = partial.rgb_sum
        channel_mean = rgb_sum / n_pix
        # Covariance from exact integer sums: E[x x^T] - mu mu^T, with the subtraction done
        # on the integers (n * S_xx - S_x S_x^T) so that it does not cancel in floating point.
        s = [int(v) for v in rgb_sum]  # Python ints: n * S_xx overflows int64 at ImageNet scale
        sxx = partial.rgb_outer_sum
        rgb_cov = np.array([[(n_pix * int(sxx[i, j]) - s[i] * s[j]) / (n_pix * n_pix) for j in range(3)]
                            for i in range(3)], dtype=np.float64)
        eigvals, eigvecs = eigen(rgb_cov)
        return cls(mean_image, channel_mean, np.sqrt(np.diag(rgb_cov)), rgb_cov, eigvals, eigvecs,
                   partial.image_count, build_id)

    @property
    def has_mean_image(self) -> bool:
        return self.mean_image is not None

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything for stats.npz; a build without a mean image (keep-aspect) stores none."""
        return ({k: np.asarray(getattr(self, k)) for k in STATS_KEYS if getattr(self, k) is not None}
                | {"build_id": np.array(self.build_id)})

    def to_npz_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.to_arrays())
        return buf.getvalue()

    def save(self, path) -> None:
        write_bytes_atomic(path, self.to_npz_bytes())

    @classmethod
    def load(cls, path) -> "DatasetStats":
        try:
            with np.load(path) as z:
                values = {k: z[k] for k in STATS_KEYS if k != "mean_image"}
                values["mean_image"] = z["mean_image"] if "mean_image" in z else None  # keep-aspect: none
                build = str(z["build_id"]) if "build_id" in z else ""
        except FileNotFoundError:
            raise DataError(f"{path} is missing: run `alexprep stats OUT` first") from None
        except (KeyError, ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path} is not a statistics file written by `alexprep stats` ({exc})") from None
        values["count"] = int(values["count"])
        return cls(**values, build_id=build)


def eigen(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and unit eigenvectors (columns) of a symmetric 3x3 matrix,
    each vector signed so that its largest-magnitude component is positive (the first such
    component on an exact tie), so the same matrix always gives the same vectors."""
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals, kind="stable")[::-1]
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    # A covariance is positive semi-definite: an eigenvalue within the solver's rounding of 0
    # is 0 (gray-only data has two), stored and printed as 0, never as -0.0 or -1e-13.
    tol = 3 * 8 * np.finfo(np.float64).eps * float(np.abs(eigvals).max(initial=0.0))
    eigvals = np.where(eigvals <= tol, 0.0, eigvals)
    signs = np.sign(eigvecs[np.argmax(np.abs(eigvecs), axis=0), np.arange(eigvecs.shape[1])])
    return eigvals, eigvecs * np.where(signs == 0, 1.0, signs)


# ---------------------------------------------------------------------------- a build folder
def check_complete(index) -> None:
    """The manifests of a split list every shard 0..shard_count-1 exactly once."""
    seen: dict[int, int] = {}
    for shard in index.shards:
        seen[shard.index] = seen.get(shard.index, 0) + 1
    twice = sorted(i for i, n in seen.items() if n > 1)
    if twice:
        raise DataError(f"{index.folder}: the manifests list shard(s) {_some(twice)} more than once: "
                        "remove the stale manifest")
    missing = [i for i in range(index.shard_count) if i not in seen]
    extra = sorted(i for i in seen if not 0 <= i < index.shard_count)
    if missing or extra:
        detail = f"missing shard index(es) {_some(missing)}" if missing else f"unexpected index(es) {_some(extra)}"
        raise DataError(f"{index.folder}: the manifests list {len(index.shards)} of {index.shard_count} shards "
                        f"({detail}): finish the build (rerun build-shards) before computing statistics")


def _some(items: list, n: int = 5) -> str:
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _raise_problems(index, problems: list[str], hint: str) -> None:
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise DataError(f"{index.folder}: {len(problems)} of {len(index.shards)} shards cannot be used: "
                        f"{shown}. {hint}")


def read_partial(index, shard) -> PartialStats:
    """The statistics partial of one shard, checked against the manifest's record of it
    (its shard's own checks are `shards.open_shard`'s)."""
    path = index.partial_path(shard)
    try:
        with np.load(path) as z:
            partial = PartialStats.from_arrays(z)
            record = json.loads(str(z["record"]))
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except (KeyError, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable statistics partial ({exc})") from None
    if record.get("build_id") != index.build_id:
        raise DataError(f"{path} is from build {record.get('build_id')}, not {index.build_id}")
    if record.get("shard") != shard.to_json():
        raise DataError(f"{path} describes another shard than the manifest's {shard.name} (a stale partial)")
    if not record.get("has_stats", True):
        raise DataError(f"{path}: shard built with --no-stats")
    size = index.spec.size
    if index.spec.keep_aspect:
        if not partial.sized or partial._pixel_sum.shape != (3,) or partial.rgb_outer_sum.shape != (3, 3):
            raise DataError(f"{path} holds sums of {partial._pixel_sum.shape} images, not of a keep-aspect build")
    elif partial.sized or partial._pixel_sum.shape != (size, size, 3) or partial.rgb_outer_sum.shape != (3, 3):
        raise DataError(f"{path} holds sums of {partial._pixel_sum.shape} images, the build's are {size}x{size}")
    if partial.image_count != shard.rows:
        raise DataError(f"{path} sums {partial.image_count} images, its shard holds {shard.rows}")
    return partial


def merge_partials(index, progress=None, shards=None) -> PartialStats:
    """The sum of the partials of `shards` (default: all the split's shards, in any order:
    integer addition, so the order does not change a bit). Checks them all before failing,
    so that the error lists every unusable shard."""
    shards = index.shards if shards is None else shards
    total = PartialStats.empty_for(index.spec)
    bad_shards, bad_partials = [], []
    done = 0
    for shard in shards:
        try:
            open_shard(index, shard)  # present, whole size, readable, row count as listed
        except DataError as exc:
            bad_shards.append(str(exc))
        else:
            try:
                total += read_partial(index, shard)
            except DataError as exc:
                bad_partials.append(str(exc))
        done += shard.rows
        if progress:
            progress(done, index.rows)
    if bad_shards:
        _raise_problems(index, bad_shards + bad_partials, "Rebuild or copy back what is missing "
                        f"(`alexprep verify {index.root}` checks a build)")
    _raise_problems(index, bad_partials, f"Run `alexprep stats {index.root} --recompute` to compute the statistics "
                                         "from the shard pixels instead (or rebuild the shards)")
    return total


def _shard_images(index, shard, table, first_row: int = 0):
    """Yield (n, S, S, 3) uint8 images from (a slice of) one shard's table, decoding JPEG one
    by one and viewing raw bytes without a copy. `first_row` numbers rows in errors.
    Keep-aspect shards: (1, H, W, 3) per row, H and W the row's recorded size."""
    spec = index.spec
    size = spec.size
    row = first_row
    path = index.shard_path(shard)
    if spec.keep_aspect:
        sizes = row_sizes(table)
        if sizes is None:
            raise DataError(f"shard {path} has no height/width columns: not a keep-aspect shard")
        for i, data in enumerate(image_bytes_column(table).to_pylist()):
            want = (int(sizes[i, 0]), int(sizes[i, 1]), 3)
            try:
                if data is None:
                    raise ValueError("null image")
                if spec.encoding == "raw" and len(data) != want[0] * want[1] * 3:
                    raise ValueError(f"{len(data)} bytes, not a raw {want[0]}x{want[1]}x3 image")
                pixels = decode(data, spec, want[:2])
            except Exception as exc:
                raise DataError(f"shard {path} row {row + i} does not decode ({type(exc).__name__}: {exc}): "
                                f"run `alexprep verify {index.root} --decode`") from None
            if pixels.shape != want:
                raise DataError(f"shard {path} row {row + i} decodes to {pixels.shape}, its row says {want}")
            yield pixels[None]
        return
    for chunk in image_bytes_column(table).chunks:
        n = len(chunk)
        if n == 0:
            continue
        if chunk.null_count:
            raise DataError(f"shard {path}: {chunk.null_count} image(s) near row {row} are null")
        if spec.encoding == "raw":
            offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset: chunk.offset + n + 1]
            lengths = np.diff(offsets)
            bad = np.flatnonzero(lengths != size * size * 3)
            if bad.size:
                raise DataError(f"shard {path} row {row + bad[0]}: {lengths[bad[0]]} bytes, "
                                f"not a raw {size}x{size}x3 image")
            data = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0]: offsets[-1]]
            yield data.reshape(n, size, size, 3)
        else:
            for i, data in enumerate(chunk.to_pylist()):
                try:
                    pixels = decode(data, spec)
                except Exception as exc:
                    raise DataError(f"shard {path} row {row + i} does not decode ({type(exc).__name__}: {exc}): "
                                    f"run `alexprep verify {index.root} --decode`") from None
                if pixels.shape != (size, size, 3):
                    raise DataError(f"shard {path} row {row + i} decodes to {pixels.shape}, not {(size, size, 3)}")
                yield pixels[None]
        row += n


_SLICE_ROWS = 16  # rows per task in recompute_partial: even load over threads, little memory


def recompute_partial(index, progress=None, workers: int | None = None) -> PartialStats:
    """The split's sums recomputed from the shard pixels (decoded JPEG, or raw bytes).

    Slices of 16 rows of the memory-mapped shards go to `workers` threads (default: the
    cores; PIL's decoder and numpy release the GIL), each summing into its own
    PartialStats, merged at the end. At most two shards are in flight, so memory does not
    grow with the split, and the threads do not idle at a shard's end.
    """
    workers = max(1, min(workers or available_cpus(), math.ceil(index.rows / _SLICE_ROWS) or 1))
    local, partials, lock = threading.local(), [], threading.Lock()

    def add(task) -> int:
        if not hasattr(local, "partial"):
            local.partial = PartialStats.empty_for(index.spec)
            with lock:
                partials.append(local.partial)
        shard, table, first_row = task
        count = 0
        for images in _shard_images(index, shard, table, first_row):
            local.partial.add_batch(images)
            count += len(images)
        return count

    def slices(shard):
        table = open_shard(index, shard)
        return [(shard, table.slice(start, _SLICE_ROWS), start) for start in range(0, table.num_rows, _SLICE_ROWS)]

    done = 0
    if progress:
        progress(done, index.rows)
    with ThreadPoolExecutor(workers) as pool:
        try:
            in_flight: collections.deque = collections.deque()
            for shard in index.shards:
                in_flight.append(pool.map(add, slices(shard)))  # submitted now, consumed a shard later
                while len(in_flight) > (1 if shard is not index.shards[-1] else 0):
                    for count in in_flight.popleft():
                        done += count
                        if progress:
                            progress(done, index.rows)
        except BaseException:  # a bad shard, or Ctrl-C: drop what has not started
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    total = PartialStats.empty_for(index.spec)
    for partial in partials:
        total += partial
    return total


def compute_partial(root, *, recompute: bool = False, split: str = "train", progress=None,
                    workers: int | None = None):
    """(merged PartialStats, SplitIndex) of a build folder's split, after checking that every
    shard is listed, present and whole. `progress(done, total)` counts images."""
    index = read_split(Path(root), split)
    check_complete(index)
    if index.rows == 0:
        raise DataError(f"{index.folder} holds no images: statistics are undefined")
    if recompute:
        problems = []
        for shard in index.shards:  # check everything before the long part
            try:
                open_shard(index, shard)
            except DataError as exc:
                problems.append(str(exc))
        _raise_problems(index, problems,
                        f"Rebuild or copy back what is missing (`alexprep verify {index.root}` checks a build)")
        partial = recompute_partial(index, progress, workers)
    else:
        partial = merge_partials(index, progress)
    return partial, index


def compute_stats(root, *, recompute: bool = False, split: str = "train", progress=None,
                  workers: int | None = None) -> DatasetStats:
    """The statistics of OUT's `split` (all --part manifests together), from the shards'
    partials, or with recompute=True from the shard pixels themselves. Raises DataError,
    naming what is wrong, for a missing or partial build."""
    partial, index = compute_partial(root, recompute=recompute, split=split, progress=progress, workers=workers)
    return DatasetStats.from_partial(partial, index.build_id)


def compare_stats(a: DatasetStats, b: DatasetStats) -> dict:
    """How far two statistics of the same data are apart (e.g. partials vs --recompute)."""
    sign = np.where(np.sum(a.eigvecs * b.eigvecs, axis=0) < 0, -1.0, 1.0)
    chord = np.linalg.norm(a.eigvecs - sign * b.eigvecs, axis=0)  # well-conditioned near 0, unlike arccos
    return {
        "identical": all(np.array_equal(getattr(a, k), getattr(b, k)) for k in STATS_KEYS
                         if getattr(a, k) is not None or getattr(b, k) is not None),
        "mean_image_max_abs": (float(np.max(np.abs(a.mean_image - b.mean_image)))
                               if a.has_mean_image and b.has_mean_image else None),
        "channel_mean_max_abs": float(np.max(np.abs(a.channel_mean - b.channel_mean))),
        "rgb_cov_rel": float(np.linalg.norm(a.rgb_cov - b.rgb_cov) / np.linalg.norm(a.rgb_cov)),
        "eigvals_rel": [float(x) for x in np.abs(a.eigvals - b.eigvals) / np.abs(a.eigvals)],
        "eigvec_angle_deg": [float(x) for x in np.degrees(2 * np.arcsin(np.clip(chord / 2, 0, 1)))],
    }


def check_against_partials(root, stats: DatasetStats, split: str = "train") -> dict | None:
    """compare_stats(partials, stats) for recomputed `stats`; None where the build has no
    usable partials (built with --no-stats, or some missing)."""
    try:
        partials = compute_stats(root, split=split)
    except DataError:
        return None
    return compare_stats(partials, stats)


# ---------------------------------------------------------------------------- OUT/stats.*
def stats_json(stats: DatasetStats, *, source: str = "partials", split: str = "train") -> dict:
    """The numbers for people and scripts: everything in stats.npz but the mean image's
    196,608 values, which are summarised."""
    sd = np.sqrt(np.clip(stats.eigvals, 0, None))
    how = "before encoding" if source == "partials" else "as decoded from the shards"
    return {
        "format": "alexprep-stats",
        "version": 1,
        "build_id": stats.build_id,
        "split": split,
        "count": int(stats.count),
        "scale": "0-255 RGB",
        "pixels": (PIXELS_NOTE.format(s=stats.mean_image.shape[0], split=split, how=how) if stats.has_mean_image
                   else PIXELS_NOTE_KEEP_ASPECT.format(split=split, how=how)),
        "computed_from": source,
        "channel_mean": stats.channel_mean.tolist(),
        "channel_std": stats.channel_std.tolist(),
        "rgb_cov": stats.rgb_cov.tolist(),
        "eigvals": stats.eigvals.tolist(),
        "eigvecs": stats.eigvecs.tolist(),
        "eigvecs_layout": SIGN_NOTE,
        "components": [
            {"eigval": float(stats.eigvals[k]), "std": float(sd[k]), "eigvec_rgb": stats.eigvecs[:, k].tolist()}
            for k in range(3)
        ],
        "mean_image": {
            "shape": list(stats.mean_image.shape),
            "channel_mean": stats.mean_image.mean(axis=(0, 1)).tolist(),
            "min": float(stats.mean_image.min()),
            "max": float(stats.mean_image.max()),
            "stored_in": STATS,
        } if stats.has_mean_image else NO_MEAN_IMAGE,
    }


def stats_paths(root) -> dict[str, Path]:
    return BuildFolder(root).stats_paths()


def write_stats(root, stats: DatasetStats, *, source: str = "partials", split: str = "train") -> dict[str, Path]:
    """Write OUT/stats.npz, OUT/stats.json and OUT/stats.png, each atomically. All three are
    rendered in memory first, so an error writes nothing. Returns their paths."""
    paths = stats_paths(root)
    if not Path(root).is_dir():
        raise DataError(f"{root} is not a build folder")
    contents = {
        "png": render_png(stats),
        "json": (json.dumps(stats_json(stats, source=source, split=split), indent=1) + "\n").encode(),
        "npz": stats.to_npz_bytes(),  # last: what loaders read
    }
    for key, data in contents.items():
        write_bytes_atomic(paths[key], data)
    return paths


def load_stats(root_or_path, split: str = "train") -> DatasetStats:
    """OUT/stats.npz (given OUT), or a stats .npz given by path. Given OUT, refuses a stats
    file whose build id is not the build's (one left from another build)."""
    given = Path(root_or_path)
    if not given.is_dir():
        if not given.exists():
            raise DataError(f"{given} is missing: give a build folder OUT (after `alexprep stats OUT`) or a stats.npz")
        return DatasetStats.load(given)
    folder = BuildFolder(given)
    path = folder.stats
    if not path.exists():
        raise DataError(f"{path} is missing: run `alexprep stats {given}` first")
    stats = DatasetStats.load(path)
    if split == "train" and not folder.split("train").is_dir() and folder.split("val").is_dir():
        split = "val"  # a val-only build folder given a training set's statistics: check its build
    build = read_split(given, split).build_id
    if stats.build_id != build:
        raise DataError(f"{path} is a stats file from another build (build id {stats.build_id or 'unknown'}; "
                        f"{folder.split(split)} is build {build}): run `alexprep stats {given}` again")
    return stats


__all__ = [
    "PartialStats", "DatasetStats", "STATS_KEYS", "outer_sum", "eigen", "check_complete", "read_partial",
    "merge_partials", "recompute_partial", "compute_partial", "compute_stats", "compare_stats",
    "check_against_partials", "stats_json",
    "write_stats", "load_stats", "stats_paths",
]
