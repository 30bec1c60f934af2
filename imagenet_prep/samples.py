"""Every image of a split as a zero-copy view of its memory-mapped shard: what the
loaders index by sample number, below both backends."""
from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.shards import SplitIndex, image_bytes_column, map_shard, row_sizes


class SplitSamples:
    """Every image of a split as a zero-copy numpy view of its memory-mapped shard.

    Sample i is the i-th row in shard order (the index every draw is keyed by). Only the
    shards' headers, labels and offsets are read here (~0.5% of their bytes, under
    MADV_RANDOM: shards.ShardMap); an image's bytes when its view is used.

    `fetch(shard)`, for a remote build (shard_cache.ShardCache.fetch), makes a shard
    local, blocking until it is; shards are then mapped when a batch first needs them
    (`ensure`, which `labels_of` and `views` call), so that training starts before the
    whole split has arrived. Without it every shard is mapped here.

    `unmap(k)` drops this process's map of shard k again: a size-limited cache deletes the
    shards the plan has passed, and a deleted file keeps its disk space while any process
    maps it. `transient` (such a cache's DataLoader workers): `let_go()` after each batch
    unmaps everything, so that a worker maps shards only while it reads a batch.
    """

    def __init__(self, index: SplitIndex, fetch=None, transient: bool = False):
        self.index = index
        self.fetch = fetch
        self.transient = transient
        self.shard_rows = np.array([s.rows for s in index.shards], np.int64)
        self._ends = np.cumsum(self.shard_rows)
        # One uint8 view of each shard's whole memory map (it keeps the map alive), and each
        # image as (view, start, stop) in it. The Arrow tables are dropped once read: their
        # per-batch metadata held ~65 bytes per sample of native memory at ImageNet scale.
        self._buffers: list[np.ndarray | None] = []
        self._slots: dict[int, list[int]] = {}  # shard -> its entries in _buffers (freed by unmap)
        self._free: list[int] = []  # entries of _buffers to reuse
        n = int(self.shard_rows.sum())  # each shard's rows are checked against the manifest on opening
        # Filled in place: no per-chunk pieces to concatenate (a second copy at the peak).
        self._chunk = np.empty(n, np.int32)
        self._start = np.empty(n, np.int64)
        self._stop = np.empty(n, np.int64)
        self.labels = np.empty(n, np.int64)  # a shard's rows are filled when it is mapped
        # Each image's stored (height, width): keep-aspect shards record them (filled, as the
        # labels, when a shard is mapped); centre-crop images are all size x size, a
        # read-only broadcast that costs no memory. What recipe="rrc" draws its windows from.
        if index.spec.keep_aspect:
            self.heights, self.widths = np.zeros(n, np.int32), np.zeros(n, np.int32)
        else:
            self.heights = self.widths = np.broadcast_to(np.int32(index.spec.size), (n,))
        self.classes = len(index.classes)
        self._mapped = np.zeros(len(index.shards), bool)
        self._unmapped = len(index.shards)
        self._lock = threading.Lock()
        if fetch is None:
            for k in range(len(index.shards)):
                self._map(k)

    def _map(self, k: int) -> None:
        """Map shard k and fill its rows' labels and image bounds."""
        index, shard = self.index, self.index.shards[k]
        row = int(self._ends[k] - shard.rows)
        table, shard_map = map_shard(index, shard)
        label = table.column("label")
        if label.null_count:
            raise DataError(f"shard {index.shard_path(shard)} has rows without a label")
        labels = label.to_numpy()  # read now, under MADV_RANDOM
        if len(labels) and (labels.min() < 0 or labels.max() >= self.classes):
            raise DataError(f"{index.shard_path(shard)}: labels outside 0..{self.classes - 1}")
        self.labels[row:row + shard.rows] = labels
        sizes = row_sizes(table)
        if sizes is not None:
            self.heights[row:row + shard.rows], self.widths[row:row + shard.rows] = sizes.T
        base = shard_map.buffer.address
        slots = self._slots[k] = []
        whole = self._slot(np.frombuffer(shard_map.buffer, np.uint8), slots)
        for chunk in image_bytes_column(table).chunks:
            if chunk.null_count:
                raise DataError(f"shard {index.shard_path(shard)} has rows without image bytes")
            _, offsets, data = chunk.buffers()[:3]
            width = np.int64 if chunk.type == pa.large_binary() else np.int32
            off = np.frombuffer(offsets, width)[chunk.offset: chunk.offset + len(chunk) + 1].astype(np.int64)
            if data is not None and base <= data.address and data.address + data.size <= base + shard_map.buffer.size:
                where, off = whole, off + (data.address - base)  # zero-copy: a slice of the map
            else:  # not a slice of the map (empty, or a reader that copied): its own view
                where = self._slot(np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8), slots)
            self._chunk[row:row + len(chunk)] = where
            self._start[row:row + len(chunk)] = off[:-1]
            self._stop[row:row + len(chunk)] = off[1:]
            row += len(chunk)
        del table
        shard_map.normal()  # headers, labels and offsets read: read-around again for the images
        self._mapped[k] = True
        self._unmapped -= 1

    def _slot(self, buffer: np.ndarray, slots: list[int]) -> int:
        """An entry of _buffers for `buffer` (a freed one if any: workers map per batch)."""
        where = self._free.pop() if self._free else len(self._buffers)
        if where == len(self._buffers):
            self._buffers.append(buffer)
        else:
            self._buffers[where] = buffer
        slots.append(where)
        return where

    def unmap(self, k: int) -> None:
        """Drop this process's map of shard k (mapped again, fetched first, if a batch needs
        it later). Views already handed out stay valid: they keep the map alive until they go."""
        with self._lock:
            if not self._mapped[k]:
                return
            for where in self._slots.pop(k):
                self._buffers[where] = None
                self._free.append(where)
            self._mapped[k] = False
            self._unmapped += 1

    def let_go(self) -> None:
        """After a worker's batch: with a size-limited cache (`transient`), unmap every shard."""
        if self.transient:
            for k in np.flatnonzero(self._mapped).tolist():
                self.unmap(k)

    def shard_of(self, indices) -> np.ndarray:
        """The shard (position in the manifest order) of each sample."""
        return np.searchsorted(self._ends, np.asarray(indices, np.int64), side="right")

    def ensure(self, indices) -> None:
        """Map the shards of samples `indices` that are not mapped yet, fetching them first."""
        if not self._unmapped:
            return
        shards = np.unique(self.shard_of(indices))
        for k in shards[~self._mapped[shards]].tolist():
            with self._lock:
                if not self._mapped[k]:
                    if self.fetch is not None:
                        self.fetch(self.index.shards[k])
                    self._map(k)

    def labels_of(self, indices) -> np.ndarray:
        """The labels of samples `indices`, their shards mapped (fetched) first."""
        self.ensure(indices)
        return self.labels[indices]

    def __len__(self) -> int:
        return len(self.labels)

    def view(self, i: int) -> np.ndarray:
        """Sample i's encoded bytes, a read-only view of the shard's memory map."""
        self.ensure([i])
        return self._buffers[self._chunk[i]][self._start[i]:self._stop[i]]

    def views(self, indices) -> list[np.ndarray]:
        """The views of a batch: their buffers and bounds looked up in one numpy call each,
        then sliced with plain ints (numpy scalars cost ~3x as much per slice)."""
        idx = np.asarray(indices, np.int64)
        self.ensure(idx)
        buffers = self._buffers
        return [buffers[c][a:b] for c, a, b in zip(self._chunk[idx].tolist(), self._start[idx].tolist(),
                                                   self._stop[idx].tolist())]

    def where(self, i: int) -> str:
        """"train-00003-of-01252.arrow row 17": where sample i lives, for error reports."""
        shard = int(self.shard_of(i))
        row = int(i - (self.shard_rows[:shard].sum() if shard else 0))
        return f"{self.index.shard_path(self.index.shards[shard])} row {row}"
