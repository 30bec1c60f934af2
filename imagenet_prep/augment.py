"""What each training batch holds: the epoch's sample order, and every sample's draws.

All of it is numpy on the host, so the DALI pipeline and its PyTorch twin apply the very
same draws (docs/design.md, "Augmentation semantics"):

- Draws come from a counter-based generator: a SplitMix64 hash of (seed, epoch, sample
  index, word number). A sample's crop offset, flip and lighting alpha therefore depend
  only on (seed, epoch, its index in the split), never on the number of ranks, the batch
  size or the batch a resumed run starts at. It is vectorised: a million draws take
  ~0.1 s.
- The sample index is the sample's global position in the split (shards in manifest
  order, rows in shard order).
- Crop offsets are integers, uniform over all `size - crop + 1` positions (33 for 224 in
  256, both ends included with full weight); DALI gets them as `offset / (size - crop)`,
  an exact binary fraction, so its `crop_pos * (size - crop)` lands on the integer.
- The epoch order: `order="random"` is a seeded permutation of all samples; `"quasi"`
  shuffles the shards, then shuffles samples within consecutive groups of
  `buffer_shards` shards (what webdataset's and FFCV's quasi-random orders do: reads stay
  within a few shards at a time, for datasets larger than RAM).
- Ranks (`rank_split`): rank r of W takes every W-th sample of the epoch order, starting
  at r, from the first `W * (n // W)` samples: equal, disjoint parts that together cover
  the epoch but for the last `n % W` samples of that epoch's order (a different few each
  epoch). Batch k of the W ranks together is then the k-th block of `W * B` samples of
  the order: W ranks with batch B see the batches one process with batch W * B sees.
  Each rank drops its last `(n // W) % B` samples (the incomplete batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CROP = 224  # the paper's input size
SIZE = 256  # the shards' image size

# ---------------------------------------------------------------------------- the generator
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment: 2^64 / golden ratio, odd
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# One domain per use, so that the words that order an epoch are not the words that crop.
_DOMAIN_DRAWS = 0x6472617773  # "draws"
_DOMAIN_ORDER = 0x6F72646572  # "order"
_DOMAIN_SHARDS = 0x7368617264  # "shard"
_WORDS_PER_SAMPLE = 7  # offset x, offset y, flip, and two Box-Muller pairs for 3 alphas


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijection of uint64 whose output
    bits each depend on every input bit. Wrapping arithmetic is intended."""
    z = np.asarray(z, np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _key(seed: int, epoch: int, domain: int) -> np.uint64:
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), not {seed}")
    if not 0 <= epoch < 2**63:
        raise ValueError(f"epoch must be a non-negative integer, not {epoch}")
    with np.errstate(over="ignore"):
        k = _mix(np.array([seed ^ domain], np.uint64)) + np.array([epoch], np.uint64) * _GAMMA
        return _mix(k)[0]


def counter_words(seed: int, epoch: int, index: np.ndarray, words: int, domain: int = _DOMAIN_DRAWS) -> np.ndarray:
    """(len(index), words) uint64 pseudo-random words, a pure function of (seed, epoch,
    index, word number): word j of sample i is `mix(mix(key + i * gamma) + (j + 1) * gamma)`
    with `key = mix(mix(seed ^ domain) + epoch * gamma)`, SplitMix64's stream seeded per
    sample."""
    index = np.asarray(index, np.uint64).reshape(-1)
    key = _key(seed, epoch, domain)
    with np.errstate(over="ignore"):
        base = _mix(key + index * _GAMMA)
        steps = np.arange(1, words + 1, dtype=np.uint64) * _GAMMA
        return _mix(base[:, None] + steps[None, :])


def uniform_int(word: np.ndarray, n) -> np.ndarray:
    """Integers uniform on 0..n-1 (n an int or an array, each below 2^32) from the top 32
    bits (Lemire's multiply-shift: bias at most n / 2^32, ~1e-8 for n = 33)."""
    return ((word >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32)


def unit_interval(word: np.ndarray, open_zero: bool) -> np.ndarray:
    """float64 uniform on [0, 1) from the top 53 bits, or on (0, 1] when open_zero."""
    top = (word >> np.uint64(11)).astype(np.float64)
    return (top + (1.0 if open_zero else 0.0)) * 2.0**-53


@dataclass(frozen=True)
class Draws:
    """One epoch's random choices for some samples (row i for index[i])."""

    index: np.ndarray  # (N,) int64: the samples' positions in the split
    offset_x: np.ndarray  # (N,) int64 in 0..positions-1: the crop's left column
    offset_y: np.ndarray  # (N,) int64 in 0..positions-1: the crop's top row
    flip: np.ndarray  # (N,) bool: mirror the crop left-right
    alpha: np.ndarray  # (N, 3) float64 ~ N(0, lighting_std): PCA lighting coefficients

    def __post_init__(self) -> None:
        n = len(self.index)
        for name in ("offset_x", "offset_y", "flip"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"Draws.{name} has shape {getattr(self, name).shape}, expected ({n},)")
        if self.alpha.shape != (n, 3):
            raise ValueError(f"Draws.alpha has shape {self.alpha.shape}, expected ({n}, 3)")

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows) -> "Draws":
        return Draws(self.index[rows], self.offset_x[rows], self.offset_y[rows], self.flip[rows], self.alpha[rows])


def draw(seed: int, epoch: int, index, lighting_std: float = 0.1, positions: int = SIZE - CROP + 1) -> Draws:
    """The draws of samples `index` in `epoch`: crop offsets uniform on 0..positions-1,
    flip with p = 0.5, alpha ~ N(0, lighting_std) per channel (all zeros when it is 0)."""
    if lighting_std < 0:
        raise ValueError(f"lighting_std must be >= 0, not {lighting_std}")
    if positions < 1:
        raise ValueError(f"positions must be >= 1, not {positions}")
    index = np.asarray(index, np.int64).reshape(-1)
    if index.size and index.min() < 0:
        raise ValueError("sample indices must be non-negative")
    w = counter_words(seed, epoch, index, _WORDS_PER_SAMPLE)
    offset_x = uniform_int(w[:, 0], positions).astype(np.int64)
    offset_y = uniform_int(w[:, 1], positions).astype(np.int64)
    flip = (w[:, 2] >> np.uint64(63)).astype(bool)
    # Box-Muller: two standard normals from each pair of uniforms; the third uses a second pair.
    r1 = np.sqrt(-2.0 * np.log(unit_interval(w[:, 3], open_zero=True)))
    t1 = 2.0 * np.pi * unit_interval(w[:, 4], open_zero=False)
    r2 = np.sqrt(-2.0 * np.log(unit_interval(w[:, 5], open_zero=True)))
    t2 = 2.0 * np.pi * unit_interval(w[:, 6], open_zero=False)
    normals = np.stack([r1 * np.cos(t1), r1 * np.sin(t1), r2 * np.cos(t2)], axis=1)
    return Draws(index, offset_x, offset_y, flip, normals * float(lighting_std))


def lighting_shift(alpha: np.ndarray, eigvals: np.ndarray, eigvecs: np.ndarray) -> np.ndarray:
    """(N, 3) float32 RGB shift added to every pixel: `eigvecs @ (alpha * sqrt(eigvals))`.

    √λ (the standard deviation along each principal axis), not the paper's λ: on 0-255
    pixels λ is ~1e4 and would shift pixels by ~1,000 levels; cuda-convnet2 scales by the
    standard deviation, a shift of ~10 levels (docs/design.md).
    """
    alpha = np.asarray(alpha, np.float64).reshape(-1, 3)
    scale = np.sqrt(np.clip(np.asarray(eigvals, np.float64), 0.0, None))  # clip: -1e-13 from eigh
    return ((alpha * scale[None, :]) @ np.asarray(eigvecs, np.float64).T).astype(np.float32)


def crop_position(offset: np.ndarray, positions: int) -> np.ndarray:
    """DALI's normalised crop position for integer offsets: offset / (positions - 1), exact
    in float32 for 33 positions (k/32), so `pos * (size - crop)` is the integer again."""
    if positions == 1:
        return np.zeros(np.shape(offset), np.float32)
    return (np.asarray(offset, np.float64) / (positions - 1)).astype(np.float32)


# ---------------------------------------------------------------------------- epoch order
def epoch_order(shard_rows, seed: int, epoch: int, order: str = "random", buffer_shards: int = 4) -> np.ndarray:
    """The epoch's sequence of sample indices, a permutation of range(sum(shard_rows)).

    "random": every sample anywhere. "quasi": shards in a shuffled order, consumed
    `buffer_shards` at a time, the samples of each group shuffled together.
    """
    rows = np.asarray(shard_rows, np.int64)
    n = int(rows.sum())
    index = np.arange(n, dtype=np.int64)
    sample_keys = counter_words(seed, epoch, index, 1, _DOMAIN_ORDER)[:, 0]
    if order == "random":
        return np.argsort(sample_keys, kind="stable")
    if order != "quasi":
        raise ValueError(f"order must be 'random' or 'quasi', not {order!r}")
    if buffer_shards < 1:
        raise ValueError(f"buffer_shards must be >= 1, not {buffer_shards}")
    shard_keys = counter_words(seed, epoch, np.arange(len(rows)), 1, _DOMAIN_SHARDS)[:, 0]
    shard_rank = np.empty(len(rows), np.int64)
    shard_rank[np.argsort(shard_keys, kind="stable")] = np.arange(len(rows))
    group = np.repeat(shard_rank // buffer_shards, rows)  # each sample's buffer group
    return np.lexsort((sample_keys, group))  # by group, then by the sample's key


def quasi_span(shard_rows, buffer_shards: int, samples: int) -> int:
    """The most shards `samples` consecutive samples of quasi orders can touch, in any epoch
    and across an epoch's end into the next: what a size-limited cache must hold at once.

    Such a run meets at most three windows in part (one at each end, the epoch's last) and
    whole ones between, each of `buffer_shards` shards; whole windows are counted as if
    made of the smallest shards, each allowed twice (once per epoch), so it is a bound
    for every shuffle."""
    rows = np.sort(np.repeat(np.asarray(shard_rows, np.int64), 2))
    sums = np.cumsum(rows)[buffer_shards - 1::buffer_shards]  # rows of the k smallest windows, k = 1, 2, ...
    whole = int(np.searchsorted(sums, samples, side="right"))
    return min(len(shard_rows), (whole + 3) * buffer_shards)


def sequential_span(shard_rows, samples: int) -> int:
    """The most shards `samples` consecutive samples in shard order can touch (evaluation's
    order), anywhere in the split."""
    ends = np.cumsum(np.asarray(shard_rows, np.int64))
    n = int(ends[-1]) if len(ends) else 0
    if n == 0:
        return 0
    first = np.arange(max(1, n - samples + 1))
    last = np.minimum(first + samples - 1, n - 1)
    return int((np.searchsorted(ends, last, side="right") - np.searchsorted(ends, first, side="right")).max()) + 1


def rank_split(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank r's part of an epoch order: order[r : W * (n // W) : W] (see the module doc)."""
    check_rank(rank, world_size)
    n = len(order) // world_size * world_size
    return order[rank:n:world_size]


def eval_split(n: int, rank: int, world_size: int) -> np.ndarray:
    """Rank r's part of an evaluation split: the contiguous block
    [r * n // W, (r + 1) * n // W), so that the ranks see every sample exactly once (sizes
    differ by at most one; no padding duplicates, no drops)."""
    check_rank(rank, world_size)
    return np.arange(rank * n // world_size, (rank + 1) * n // world_size, dtype=np.int64)


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}: expected 0 <= rank < world_size")


# ---------------------------------------------------------------------------- windows
def ten_crop_windows(positions: int = SIZE - CROP + 1) -> np.ndarray:
    """(10, 3) int64 rows (offset_x, offset_y, flip) of the paper's 10 test crops, in this
    order: top-left, top-right, bottom-left, bottom-right, centre, then the mirror image of
    each of those five windows in the same order (crop k + 5 is crop k flipped)."""
    last, mid = positions - 1, (positions - 1) // 2
    five = [(0, 0), (last, 0), (0, last), (last, last), (mid, mid)]
    return np.array([(x, y, 0) for x, y in five] + [(x, y, 1) for x, y in five], np.int64)


def center_window(positions: int = SIZE - CROP + 1) -> np.ndarray:
    """(1, 3): the centre crop, offset 16 for 224 in 256."""
    mid = (positions - 1) // 2
    return np.array([(mid, mid, 0)], np.int64)


def eval_windows(crops: int, positions: int = SIZE - CROP + 1) -> np.ndarray:
    """(crops, 3): the centre crop (crops=1) or the paper's 10 crops (crops=10)."""
    if crops not in (1, 10):
        raise ValueError(f"crops must be 1 (centre) or 10 (corners, centre and their mirrors), not {crops}")
    return ten_crop_windows(positions) if crops == 10 else center_window(positions)
