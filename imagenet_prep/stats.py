"""The training set's statistics: the mean image and the 3x3 RGB covariance, exactly.

Each shard keeps partial sums as integers (int64 sums of uint8 values and of their
products), so partials from any number of shards and machines merge to the same numbers
in any order. They are taken over the 256x256 crops before encoding (the pixels the
shard was made from), on the 0-255 RGB scale.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


@dataclass
class PartialStats:
    """Integer sums over some images; `merge` adds two, `add` adds one image."""

    pixel_sum: np.ndarray  # (S, S, 3) int64: per-pixel sums, for the mean image
    rgb_outer_sum: np.ndarray  # (3, 3) int64: sum over all pixels of x x^T
    image_count: int = 0

    @classmethod
    def empty(cls, size: int = 256) -> "PartialStats":
        return cls(np.zeros((size, size, 3), np.int64), np.zeros((3, 3), np.int64), 0)

    def add(self, pixels: np.ndarray) -> None:
        """Add one (S, S, 3) uint8 image."""
        np.add(self.pixel_sum, pixels, out=self.pixel_sum, casting="unsafe")
        x = pixels.reshape(-1, 3).astype(np.float64)
        # Exact in float64: each entry is at most 65,536 * 255^2 ~ 4.3e9 < 2^53.
        self.rgb_outer_sum += np.rint(x.T @ x).astype(np.int64)
        self.image_count += 1

    def merge(self, other: "PartialStats") -> "PartialStats":
        if self.pixel_sum.shape != other.pixel_sum.shape:
            raise ValueError(f"cannot merge statistics of {self.pixel_sum.shape} and {other.pixel_sum.shape} images")
        return PartialStats(self.pixel_sum + other.pixel_sum, self.rgb_outer_sum + other.rgb_outer_sum,
                            self.image_count + other.image_count)

    @property
    def rgb_sum(self) -> np.ndarray:
        """(3,) int64: per-channel sums over all pixels (derived, so never inconsistent)."""
        return self.pixel_sum.sum(axis=(0, 1))

    @property
    def pixel_count(self) -> int:
        return self.image_count * self.pixel_sum.shape[0] * self.pixel_sum.shape[1]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "pixel_sum": self.pixel_sum,
            "rgb_outer_sum": self.rgb_outer_sum,
            "image_count": np.int64(self.image_count),
        }

    @classmethod
    def from_arrays(cls, arrays) -> "PartialStats":
        return cls(np.asarray(arrays["pixel_sum"], np.int64), np.asarray(arrays["rgb_outer_sum"], np.int64),
                   int(arrays["image_count"]))

    def to_npz_bytes(self, **extra: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.to_arrays(), **extra)
        return buf.getvalue()


STATS_KEYS = ("mean_image", "channel_mean", "channel_std", "rgb_cov", "eigvals", "eigvecs", "count")


@dataclass(frozen=True)
class DatasetStats:
    """What `alexprep stats` writes to OUT/stats.npz, on the 0-255 RGB scale."""

    mean_image: np.ndarray  # (S, S, 3) float64
    channel_mean: np.ndarray  # (3,) float64, = mean_image.mean(axis=(0, 1))
    channel_std: np.ndarray  # (3,) float64, over all pixels
    rgb_cov: np.ndarray  # (3, 3) float64, covariance of RGB pixel values
    eigvals: np.ndarray  # (3,) float64, descending
    eigvecs: np.ndarray  # (3, 3) float64, columns are eigenvectors
    count: int  # images
    build_id: str = ""

    @classmethod
    def from_partial(cls, partial: PartialStats, build_id: str = "") -> "DatasetStats":
        if partial.image_count == 0:
            raise ValueError("no images: statistics are undefined")
        n_pix = partial.pixel_count
        mean_image = partial.pixel_sum / partial.image_count
        channel_mean = partial.rgb_sum / n_pix
        # Covariance from exact integer sums: E[x x^T] - mu mu^T, with the subtraction done
        # on the integers (n * S_xx - S_x S_x^T) so that it does not cancel in floating point.
        s = partial.rgb_sum.astype(object)  # Python ints: n * S_xx overflows int64 at ImageNet scale
        sxx = partial.rgb_outer_sum.astype(object)
        centred = np.array([[n_pix * sxx[i, j] - s[i] * s[j] for j in range(3)] for i in range(3)], dtype=object)
        rgb_cov = np.array(centred / (n_pix * n_pix), dtype=np.float64)
        eigvals, eigvecs = np.linalg.eigh(rgb_cov)
        order = np.argsort(eigvals)[::-1]
        eigvals, eigvecs = eigvals[order], eigvecs[:, order]
        # Deterministic sign: each eigenvector's largest-magnitude component is positive.
        signs = np.sign(eigvecs[np.argmax(np.abs(eigvecs), axis=0), np.arange(3)])
        eigvecs = eigvecs * np.where(signs == 0, 1.0, signs)
        return cls(mean_image, channel_mean, np.sqrt(np.diag(rgb_cov)), rgb_cov, eigvals, eigvecs,
                   partial.image_count, build_id)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(getattr(self, k)) for k in STATS_KEYS} | {"build_id": np.array(self.build_id)}

    def save(self, path) -> None:
        from alexprep.imagenet_prep.atomic import write_bytes_atomic

        buf = io.BytesIO()
        np.savez(buf, **self.to_arrays())
        write_bytes_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path) -> "DatasetStats":
        from alexprep.imagenet_prep.errors import DataError

        try:
            with np.load(path) as z:
                values = {k: z[k] for k in STATS_KEYS}
                build = str(z["build_id"]) if "build_id" in z else ""
        except FileNotFoundError:
            raise DataError(f"{path} is missing: run `alexprep stats OUT` first") from None
        except (KeyError, ValueError, OSError) as exc:
            raise DataError(f"{path} is not a statistics file written by `alexprep stats` ({exc})") from None
        values["count"] = int(values["count"])
        return cls(**values, build_id=build)
