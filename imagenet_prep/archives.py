"""ImageNet as downloaded, read in place: the archives are never extracted.

- image-net.org: `ILSVRC2012_img_train.tar` (a tar of 1,000 per-class tars of JPEGs),
  `ILSVRC2012_img_val.tar` (50,000 flat JPEGs), `ILSVRC2012_devkit_t12.tar.gz` (labels).
- Kaggle: one zip holding the `ILSVRC/Data/CLS-LOC/` tree, `LOC_val_solution.csv` and
  `LOC_synset_mapping.txt`.

Every image becomes a `Member`: a byte range of the file on disk (plus, for a zip, how it
is compressed). The tars are uncompressed, so a JPEG inside a class tar inside the train
tar is one contiguous range of the outer file: its offset is the class tar's data offset
in the outer tar plus the JPEG's data offset in the class tar. Indexing reads only the
512-byte headers (one per member, `POSIX_FADV_RANDOM` so that the kernel does not read
ahead into the data between them); a zip's index is its central directory. Workers read
members with `os.pread` on their own file descriptors: no open file crosses a process.

Keys are those of the same files extracted the usual way (`train/<wnid>/<file>` from the
class tars, `val/<file>`, the zip's own paths), so that a build from the archives is
byte-identical to a build from the extracted tree.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.forking import frozen_gc
from alexprep.imagenet_prep.transform import UnreadableImage

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TGZ = "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_ZIP = "imagenet-object-localization-challenge.zip"
KAGGLE_BASE = "ILSVRC/Data/CLS-LOC/"
TAR = -1  # Member.method of a tar member: the bytes are stored as they are
_ZIP_LOCAL = struct.Struct("<IHHHHHIIIHH")  # a zip local file header (30 bytes)


# ---------------------------------------------------------------------------- reading a member
@dataclass(frozen=True, slots=True)
class Member:
    """One file inside an archive, readable by any process from the archive's path alone."""

    archive: str  # the archive file on disk
    offset: int  # tar: the member's first data byte; zip: its local header
    size: int  # bytes stored
    inner: str  # its path inside the archive, for reports ("n01440764.tar/n01440764_18.JPEG")
    method: int = TAR  # zip: 0 stored, 8 deflated
    crc: int = 0  # zip: CRC-32 of the uncompressed bytes
    length: int = 0  # zip: uncompressed size

    def describe(self) -> str:
        return f"{self.archive}:{self.inner}"


_handles: dict[str, int] = {}  # archive path -> this process's descriptor


def close_handles() -> None:
    """Close this process's archive descriptors (at the end of a build; in a forked worker,
    those inherited from the parent)."""
    while _handles:
        with contextlib.suppress(OSError):
            os.close(_handles.popitem()[1])


def _fd(archive: str) -> int:
    fd = _handles.get(archive)
    if fd is None:
        fd = _handles[archive] = os.open(archive, os.O_RDONLY | os.O_CLOEXEC)
    return fd


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = os.pread(fd, min(size - got, 1 << 24), offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_member(member: Member) -> bytes:
    """The member's bytes. Raises UnreadableImage (with the archive's path) when the
    archive is truncated or damaged there."""
    fd = _fd(member.archive)
    if member.method == TAR:
        data = _pread_exact(fd, member.size, member.offset)
        if len(data) < member.size:
            raise UnreadableImage(f"the archive ends inside this member ({member.archive} is truncated)")
        return data
    header = _pread_exact(fd, _ZIP_LOCAL.size, member.offset)
    if len(header) < _ZIP_LOCAL.size:
        raise UnreadableImage(f"the archive ends inside this member ({member.archive} is truncated)")
    fields = _ZIP_LOCAL.unpack(header)
    if fields[0] != 0x04034B50:
        raise UnreadableImage(f"no zip member header where the central directory says ({member.archive} is damaged)")
    if fields[2] & 0x1:
        raise UnreadableImage("the member is encrypted")
    start = member.offset + _ZIP_LOCAL.size + fields[9] + fields[10]
    stored = _pread_exact(fd, member.size, start)
    if len(stored) < member.size:
        raise UnreadableImage(f"the archive ends inside this member ({member.archive} is truncated)")
    if member.method == zipfile.ZIP_STORED:
        data = stored
    elif member.method == zipfile.ZIP_DEFLATED:
        try:
            data = zlib.decompress(stored, -15)
        except zlib.error as exc:
            raise UnreadableImage(f"the member does not inflate ({exc}; {member.archive} is damaged)") from None
    else:
        raise UnreadableImage(f"the member is compressed with zip method {member.method}, which alexprep does not read")
    if len(data) != member.length or zlib.crc32(data) != member.crc:
        raise UnreadableImage(f"the member fails its CRC check ({member.archive} is damaged)")
    return data


def read_source(source) -> bytes:
    """A sample's bytes, whether its source is a file path or an archive member."""
    if isinstance(source, Member):
        return read_member(source)
    with open(source, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------- indexing tars
class _Window(io.RawIOBase):
    """A read-only file object over bytes [start, start + size) of a descriptor, by pread:
    what lets `tarfile` walk a class tar where it lies inside the train tar."""

    def __init__(self, fd: int, start: int, size: int):
        super().__init__()
        self.fd, self.start, self.size, self.pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        data = os.pread(self.fd, max(n, 0), self.start + self.pos) if n > 0 else b""
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


@dataclass
class TarIndex:
    """A tar's regular files as (name, data offset, size), absolute in the file on disk, and
    what went wrong reading it (None when it ends with its end-of-archive marker)."""

    members: list[tuple[str, int, int]] = field(default_factory=list)
    problem: str | None = None


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def index_tar(fd: int, start: int, size: int) -> TarIndex:
    """Walk the headers of the tar at [start, start + size) of `fd`, skipping the data."""
    index = TarIndex()
    window = _Window(fd, start, size)
    try:
        tar = tarfile.open(fileobj=window, mode="r:")
    except tarfile.TarError:
        index.problem = "not a tar archive"
        return index
    end = 0
    try:
        for info in tar:
            if info.isreg():
                index.members.append((_clean(info.name), start + info.offset_data, info.size))
            end = tar.offset
    except tarfile.TarError as exc:
        index.problem = f"ends early ({exc})"
        return index
    end = tar.offset
    # tarfile stops quietly at a truncated or garbled header: a whole tar ends with zeros.
    marker = os.pread(fd, tarfile.BLOCKSIZE, start + end) if end + tarfile.BLOCKSIZE <= size else b""
    if marker != bytes(tarfile.BLOCKSIZE):
        last = index.members[-1][0] if index.members else "its start"
        index.problem = f"ends early, at byte {end} of {size}, after {last}: the rest is missing or damaged"
    return index


def _advise_random(fd: int) -> None:
    with contextlib.suppress(AttributeError, OSError):  # macOS has no posix_fadvise
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def _index_class_tar(args) -> tuple[str, TarIndex]:
    archive, name, start, size = args
    fd = os.open(archive, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _advise_random(fd)
        return name, index_tar(fd, start, size)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- splits in archives
@dataclass
class ArchiveSplit:
    """One split stored in an archive; `layout.list_split` lists it like a folder.

    kind: "nested" (a tar of class tars), "flat" (a tar of files), "zip" (a folder of a zip).
    """

    archive: Path
    kind: str
    prefix: str  # the key of the split's folder when extracted: "train/", "ILSVRC/Data/CLS-LOC/val/"
    workers: int = 1
    zip_infos: list | None = None

    def __str__(self) -> str:
        return f"{self.archive}" + (f":{self.prefix}" if self.kind == "zip" else "")

    def _outer(self) -> TarIndex:
        fd = os.open(self.archive, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _advise_random(fd)
            return index_tar(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def class_names(self) -> list[str]:
        """The split's class folders, without listing their files (the train tar's class
        tars, from its outer headers only)."""
        if self.kind == "nested":
            return sorted({Path(n).name[:-4] for n, _, _ in self._outer().members
                           if "/" not in n and n.endswith(".tar") and not n.startswith(".")})
        if self.kind == "zip":
            return sorted({rel.split("/", 1)[0] for rel in self._zip_rels() if "/" in rel} - {""})
        return []

    def _zip_rels(self):
        for info in self.zip_infos:
            if info.filename.startswith(self.prefix):
                yield info.filename[len(self.prefix):]

    def scan(self):
        """(top-level folders, an iterator of (path relative to the split folder, Member),
        problems). The members stream out one class tar at a time, so that a listing never
        holds ImageNet's 1.28 million as objects; `problems` is complete once they have."""
        archive = str(self.archive)
        if self.kind == "zip":
            dirs = {rel.split("/", 1)[0] for rel in self._zip_rels() if "/" in rel}
            entries = ((info.filename[len(self.prefix):],
                        Member(archive, info.header_offset, info.compress_size, info.filename,
                               info.compress_type, info.CRC, info.file_size))
                       for info in self.zip_infos
                       if info.filename.startswith(self.prefix) and not info.is_dir()
                       and info.filename != self.prefix)
            return dirs, entries, []
        outer = self._outer()
        problems = []
        if outer.problem:
            problems.append({"key": self.prefix.rstrip("/"), "reason": f"{outer.problem} (later members, if any, "
                             "are missing: download the archive again)", "archive": archive})
        if self.kind == "flat":
            return set(), ((n, Member(archive, o, s, n)) for n, o, s in outer.members), problems
        dirs, loose, class_tars = set(), [], []
        for name, offset, size in outer.members:
            if "/" not in name and name.endswith(".tar"):
                dirs.add(name[:-4])
                class_tars.append((archive, name, offset, size))
            else:
                loose.append((name, Member(archive, offset, size, name)))
        return dirs, self._nested_entries(loose, class_tars, problems), problems

    def _nested_entries(self, loose: list, class_tars: list, problems: list):
        yield from loose
        archive = str(self.archive)
        for name, index in _map(_index_class_tar, class_tars, self.workers):
            if index.problem:
                problems.append({"key": self.prefix + name, "reason": f"class tar {index.problem}"
                                 + ("" if index.members else ": none of its images can be read"), "archive": archive})
            for inner, offset, size in index.members:
                yield f"{name[:-4]}/{inner}", Member(archive, offset, size, f"{name}/{inner}")


POOL_MIN_ITEMS = 64  # below this many class tars, a pool's start costs more than it saves


def _map(func, items: list, workers: int):
    """func over items, in order, streamed: in a pool of processes when there are many
    (ImageNet's 1,000 class tars are indexed in parallel: each is ~1,300 random 4 KB reads).
    Starting a pool takes ~0.1-0.2 s, which for a few class tars is more than indexing them
    here."""
    if workers <= 1 or len(items) < POOL_MIN_ITEMS:
        yield from map(func, items)
        return
    context = mp.get_context("fork" if os.name == "posix" else "spawn")
    with frozen_gc():
        pool = context.Pool(min(workers, len(items)))
    with pool:
        yield from pool.imap(func, items, chunksize=max(1, len(items) // (workers * 8)))


# ---------------------------------------------------------------------------- finding archives
def _zip_infos(path: Path) -> list:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not a readable zip ({exc}): it is truncated or damaged "
                        "(its central directory, at its end, is missing): download it again") from None


def _zip_splits(path: Path, workers: int) -> dict[str, ArchiveSplit]:
    infos = _zip_infos(path)
    names = [i.filename for i in infos]
    for base in sorted({n[: n.index(KAGGLE_BASE) + len(KAGGLE_BASE)] for n in names if KAGGLE_BASE in n}) + [""]:
        found = {s: ArchiveSplit(path, "zip", f"{base}{s}/", workers, infos)
                 for s in ("train", "val") if any(n.startswith(f"{base}{s}/") for n in names)}
        if found:
            return found
    return {}


def splits_in_archive(path: Path, workers: int = 1) -> dict[str, ArchiveSplit]:
    """The splits one archive holds, judged by its name (and, for a zip, its folders)."""
    path = Path(path)
    name = path.name
    if name == TRAIN_TAR:
        return {"train": ArchiveSplit(path, "nested", "train/", workers)}
    if name == VAL_TAR:
        return {"val": ArchiveSplit(path, "flat", "val/", workers)}
    if name.lower().endswith(".zip"):
        return _zip_splits(path, workers)
    return {}


def find_archives(folder: Path, workers: int = 1) -> dict[str, ArchiveSplit]:
    """The splits held by archives in `folder` as downloaded, found by their names."""
    found: dict[str, ArchiveSplit] = {}
    for name in (TRAIN_TAR, VAL_TAR):
        if (Path(folder) / name).is_file():
            found.update(splits_in_archive(Path(folder) / name, workers))
    if not found and (Path(folder) / KAGGLE_ZIP).is_file():
        found.update(splits_in_archive(Path(folder) / KAGGLE_ZIP, workers))
    return found


# ---------------------------------------------------------------------------- labels in archives
def extract_label_files(folder: Path, splits: dict, devkit: Path | None, into: Path) -> dict[str, Path]:
    """The small label files that sit inside the archives, copied into `into`:
    {"devkit": folder holding data/meta.mat, "val_labels": ..., "synsets": ...} where found.

    The devkit is read from `devkit` when it is a .tar.gz, else from DEVKIT_TGZ in `folder`;
    Kaggle's CSV and synset mapping from the zip a split comes from.
    """
    found: dict[str, Path] = {}
    tgz = Path(devkit) if devkit is not None and str(devkit).endswith((".tar.gz", ".tgz")) else None
    if tgz is None and devkit is None and (Path(folder) / DEVKIT_TGZ).is_file():
        tgz = Path(folder) / DEVKIT_TGZ
    if tgz is not None:
        if not tgz.is_file():
            raise DataError(f"--devkit {tgz}: no such file")
        target = into / "ILSVRC2012_devkit_t12"
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                for info in tar:
                    base = Path(info.name).name
                    if info.isreg() and base in ("meta.mat", "ILSVRC2012_validation_ground_truth.txt"):
                        (target / "data").mkdir(parents=True, exist_ok=True)
                        (target / "data" / base).write_bytes(tar.extractfile(info).read())
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{tgz} is not a readable devkit .tar.gz ({exc}): download it again") from None
        if not (target / "data" / "meta.mat").is_file():
            raise DataError(f"{tgz} holds no data/meta.mat: it is not the ILSVRC2012 devkit (download "
                            f"{DEVKIT_TGZ} from image-net.org)")
        found["devkit"] = target
        if (target / "data" / "ILSVRC2012_validation_ground_truth.txt").is_file():
            found["val_labels"] = target / "data" / "ILSVRC2012_validation_ground_truth.txt"
    zips = {s.archive for s in splits.values() if s.kind == "zip"}
    for path in zips:
        infos = next(s.zip_infos for s in splits.values() if s.archive == path)
        for info in infos:
            base = info.filename.rsplit("/", 1)[-1]
            if base in ("LOC_val_solution.csv", "LOC_synset_mapping.txt") and info.filename.count("/") <= 1:
                member = Member(str(path), info.header_offset, info.compress_size, info.filename,
                                info.compress_type, info.CRC, info.file_size)
                try:
                    (into / base).write_bytes(read_member(member))
                except UnreadableImage as exc:
                    raise DataError(f"{member.describe()}: {exc}") from None
                found["val_labels" if base.endswith(".csv") else "synsets"] = into / base
    return found
