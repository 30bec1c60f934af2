"""Every image of a split as a zero-copy view of its memory-mapped shard: what the
loaders index by sample number, below both backends."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.shards import SplitIndex, image_bytes_column, open_shard


class SplitSamples:
    """Every image of a split as a zero-copy numpy view of its memory-mapped shard.

    Sample i is the i-th row in shard order (the index every draw is keyed by). Nothing is
    read until a view's bytes are: the OS pages shards in as they are used.
    """

    def __init__(self, index: SplitIndex):
        self.index = index
        self.shard_rows = np.array([s.rows for s in index.shards], np.int64)
        self._tables = [open_shard(index, s) for s in index.shards]  # keep the maps alive
        self._buffers: list[np.ndarray] = []
        chunk_ids, starts, stops, labels = [], [], [], []
        for shard, table in zip(index.shards, self._tables):
            label = table.column("label")
            if label.null_count:
                raise DataError(f"shard {index.shard_path(shard)} has rows without a label")
            labels.append(label.to_numpy().astype(np.int64, copy=False))
            for chunk in image_bytes_column(table).chunks:
                if chunk.null_count:
                    raise DataError(f"shard {index.shard_path(shard)} has rows without image bytes")
                _, offsets, data = chunk.buffers()[:3]
                width = np.int64 if chunk.type == pa.large_binary() else np.int32
                off = np.frombuffer(offsets, width)[chunk.offset: chunk.offset + len(chunk) + 1].astype(np.int64)
                self._buffers.append(np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8))
                chunk_ids.append(np.full(len(chunk), len(self._buffers) - 1, np.int32))
                starts.append(off[:-1])
                stops.append(off[1:])
        empty = np.zeros(0, np.int64)
        self._chunk = np.concatenate(chunk_ids) if chunk_ids else np.zeros(0, np.int32)
        self._start = np.concatenate(starts) if starts else empty
        self._stop = np.concatenate(stops) if stops else empty
        self.labels = np.concatenate(labels) if labels else empty
        self.classes = len(index.classes)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.classes):
            raise DataError(f"{index.folder}: labels outside 0..{self.classes - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    def view(self, i: int) -> np.ndarray:
        """Sample i's encoded bytes, a read-only view of the shard's memory map."""
        return self._buffers[self._chunk[i]][self._start[i]:self._stop[i]]

    def views(self, indices) -> list[np.ndarray]:
        """The views of a batch: their buffers and bounds looked up in one numpy call each,
        then sliced with plain ints (numpy scalars cost ~3x as much per slice)."""
        idx = np.asarray(indices, np.int64)
        buffers = self._buffers
        return [buffers[c][a:b] for c, a, b in zip(self._chunk[idx].tolist(), self._start[idx].tolist(),
                                                   self._stop[idx].tolist())]

    def where(self, i: int) -> str:
        """"train-00003-of-01252.arrow row 17": where sample i lives, for error reports."""
        shard = int(np.searchsorted(np.cumsum(self.shard_rows), i, side="right"))
        row = int(i - (self.shard_rows[:shard].sum() if shard else 0))
        return f"{self.index.shard_path(self.index.shards[shard])} row {row}"
