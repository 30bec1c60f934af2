"""A split's candidate samples in compact columns, sorted by key.

ImageNet's train split lists 1.28 million files. As Python objects (a key, a path and a
wnid string, a tuple per file) that was ~1 KB a file, 1.3 GB before a shard was written
(benchmarks/scale.py). Here a file costs the UTF-8 bytes of its path below the split
folder, 4 bytes of end offset (8 past 2 GiB of paths) and 4 of class code, plus 19 bytes
of byte range when it lies in a tar (32 in a zip); its path or archive member is rebuilt
when a worker needs it.

Order: keys sorted as strings. Every key is `prefix + rel` and rel is `top/...` (a class
folder) or a bare file name, so sorting groups by `top + "/"` and each group's rels
gives exactly the sorted keys while only one group is ever held as Python strings.
"""
from __future__ import annotations

import bisect
import os
from array import array
from dataclasses import dataclass, field

import numpy as np

from alexprep.imagenet_prep.archives import TAR, Member

_ENCODING = ("utf-8", "surrogateescape")  # os.walk's undecodable names round-trip
# How a member's `inner` (its path in the archive, for reports) is rebuilt from its rel:
INNER_IS_REL, INNER_IN_CLASS_TAR, INNER_IS_KEY = 0, 1, 2


def _inner(rule: int, prefix: str, rel: str) -> str:
    if rule == INNER_IN_CLASS_TAR:
        top, rest = rel.split("/", 1)
        return f"{top}.tar/{rest}"
    return prefix + rel if rule == INNER_IS_KEY else rel


@dataclass
class _Chunk:
    """One group's rows, sorted by rel, packed."""

    blob: bytes
    lengths: np.ndarray  # uint16 byte length of each rel (a path is at most 4,096 bytes)
    codes: np.ndarray  # int32 wnid codes
    members: dict | None  # archive rows: column name -> array


@dataclass
class SplitListing:
    """The candidate samples of one split, sorted by key, and the files ignored."""

    split: str
    folder: object  # a Path, or an archives.ArchiveSplit
    prefix: str = ""  # the split folder's key, "train/" ("" when SRC itself is the split)
    wnids: list[str] = field(default_factory=list)  # distinct wnids, sorted; codes index it
    ignored: list[str] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)  # damaged archives: {"key", "reason", "archive"}
    sparse: dict[str, tuple] = field(default_factory=dict)  # rel -> map of a sparse tar member (rare: no column)
    _blob: bytes | bytearray = b""
    _ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    _members: dict | None = None

    def __len__(self) -> int:
        return len(self._ends)

    def rel(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i else 0
        return self._blob[start:int(self._ends[i])].decode(*_ENCODING)

    def key(self, i: int) -> str:
        return self.prefix + self.rel(i)

    def wnid(self, i: int) -> str:
        return self.wnids[self._codes[i]]

    def keys(self) -> list[str]:
        return [self.key(i) for i in range(len(self))]

    def codes(self) -> np.ndarray:
        """Each row's index into `wnids`."""
        return self._codes

    def source(self, i: int):
        """Where row i is read: a file path, or an archives.Member."""
        if self._members is None:
            return os.path.join(str(self.folder), self.rel(i))
        m = self._members
        rel = self.rel(i)
        return Member(str(self.folder.archive), int(m["offset"][i]), int(m["size"][i]),
                      _inner(int(m["rule"][i]), self.prefix, rel),
                      int(m["method"][i]) if "method" in m else TAR,
                      int(m["crc"][i]) if "crc" in m else 0, int(m["length"][i]) if "length" in m else 0,
                      self.sparse.get(rel) if self.sparse else None)

    def index_of(self, key: str) -> int | None:
        """The row of `key`, by binary search over the sorted keys, or None."""
        i = bisect.bisect_left(range(len(self)), key, key=self.key)
        return i if i < len(self) and self.key(i) == key else None


def _joined(chunks: list[_Chunk]) -> bytearray:
    """The chunks' blobs concatenated, each released once copied: the peak is the result
    plus one blob, not twice the result (as b"".join)."""
    out = bytearray(sum(len(c.blob) for c in chunks))
    at = 0
    for chunk in chunks:
        out[at:at + len(chunk.blob)] = chunk.blob
        at += len(chunk.blob)
        chunk.blob = b""
    return out


class ListingBuilder:
    """Packs (rel, source, wnid) rows one top-level group at a time.

    Producers that emit a group's rows together (a folder walk, a class tar) keep one group
    as Python objects at a time; rows of a group that come back later (a zip in any order)
    become another chunk, merged by a sort at the end."""

    def __init__(self, listing: SplitListing):
        self.listing = listing
        self.chunks: dict[str, list[_Chunk]] = {}
        self.pending: list = []
        self.pending_top: str | None = None
        self.code_of: dict[str, int] = {}

    def add(self, rel: str, source, wnid: str) -> None:
        top = rel.split("/", 1)[0] if "/" in rel else ""
        if isinstance(source, Member) and source.sparse is not None:
            self.listing.sparse[rel] = source.sparse
        if top != self.pending_top:
            self._seal()
            self.pending_top = top
        self.pending.append((rel, source, self.code_of.setdefault(wnid, len(self.code_of))))

    def _seal(self) -> None:
        if not self.pending:
            return
        rows = sorted(self.pending, key=lambda r: r[0])
        self.pending = []
        encoded = [r[0].encode(*_ENCODING) for r in rows]
        lengths = np.fromiter(map(len, encoded), np.uint16, len(encoded))
        codes = np.fromiter((r[2] for r in rows), np.int32, len(rows))
        members = None if not isinstance(rows[0][1], Member) else self._member_columns(rows)
        self.chunks.setdefault(self.pending_top, []).append(_Chunk(b"".join(encoded), lengths, codes, members))

    def _member_columns(self, rows: list) -> dict:
        prefix = self.listing.prefix
        rules = array("b")
        for rel, m, _ in rows:
            for rule in (INNER_IS_REL, INNER_IN_CLASS_TAR, INNER_IS_KEY):
                if (rule != INNER_IN_CLASS_TAR or "/" in rel) and _inner(rule, prefix, rel) == m.inner:
                    rules.append(rule)
                    break
            else:
                raise ValueError(f"archive member {m.inner!r} listed as {rel!r}: no rule rebuilds its name")
        columns = {"rule": np.frombuffer(rules, np.int8).copy(),
                   "offset": np.fromiter((m.offset for _, m, _ in rows), np.int64, len(rows)),
                   "size": np.fromiter((m.size for _, m, _ in rows), np.int64, len(rows))}
        if any(m.method != TAR for _, m, _ in rows):  # a zip: how each member is compressed
            columns["method"] = np.fromiter((m.method for _, m, _ in rows), np.int8, len(rows))
            columns["crc"] = np.fromiter((m.crc for _, m, _ in rows), np.uint32, len(rows))
            columns["length"] = np.fromiter((m.length for _, m, _ in rows), np.int64, len(rows))
        return columns

    def finish(self) -> SplitListing:
        """The listing, its rows in key order and its wnid codes renumbered in wnid order."""
        self._seal()
        chunks = [self._merged(self.chunks.pop(top)) for top in sorted(self.chunks, key=lambda t: t + "/")]
        listing = self.listing
        listing.wnids = sorted(self.code_of)
        position = {w: i for i, w in enumerate(listing.wnids)}
        renumber = np.zeros(len(self.code_of), np.int32)
        for wnid, code in self.code_of.items():
            renumber[code] = position[wnid]
        if chunks:
            lengths = np.concatenate([c.lengths for c in chunks])
            total = int(lengths.sum(dtype=np.int64))
            listing._ends = np.cumsum(lengths, dtype=np.int32 if total < 2**31 else np.int64)
            del lengths
            listing._codes = renumber[np.concatenate([c.codes for c in chunks])]
            if chunks[0].members is not None:
                listing._members = {name: np.concatenate([c.members[name] for c in chunks])
                                    for name in chunks[0].members}
            listing._blob = _joined(chunks)
        return listing

    @staticmethod
    def _merged(chunks: list[_Chunk]) -> _Chunk:
        """One chunk from several of the same group, sorted by rel (rows out of order)."""
        if len(chunks) == 1:
            return chunks[0]
        rels = []
        for c in chunks:
            ends = np.cumsum(c.lengths, dtype=np.int64)
            rels += [c.blob[e - n:e].decode(*_ENCODING) for n, e in zip(c.lengths.tolist(), ends.tolist())]
        order = np.array(sorted(range(len(rels)), key=rels.__getitem__), np.int64)
        encoded = [rels[i].encode(*_ENCODING) for i in order]
        members = None
        if chunks[0].members is not None:
            names = set().union(*(c.members for c in chunks))
            members = {n: np.concatenate([c.members[n] for c in chunks])[order] for n in names}
        return _Chunk(b"".join(encoded), np.fromiter(map(len, encoded), np.uint16, len(encoded)),
                      np.concatenate([c.codes for c in chunks])[order], members)
