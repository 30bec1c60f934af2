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
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field, replace
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
    size: int  # bytes stored (a sparse tar member: its bytes once its holes are filled)
    inner: str  # its path inside the archive, for reports ("n01440764.tar/n01440764_18.JPEG")
    method: int = TAR  # zip: 0 stored, 8 deflated
    crc: int = 0  # zip: CRC-32 of the uncompressed bytes
    length: int = 0  # zip: uncompressed size
    sparse: tuple | None = None  # a sparse tar member: ((offset in the file, bytes), ...) stored in turn

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
    if member.sparse is not None:
        return _read_sparse(fd, member)
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


def _read_sparse(fd: int, member: Member) -> bytes:
    """A sparse member (GNU or PAX): its stored segments, one after the other from its
    offset, put in place in a file of zeros, as `tar -x` writes it."""
    data, at = bytearray(member.size), member.offset
    for offset, count in member.sparse:
        chunk = _pread_exact(fd, count, at)
        if len(chunk) < count:
            raise UnreadableImage(f"the archive ends inside this member ({member.archive} is truncated)")
        data[offset:offset + count] = chunk
        at += count
    return bytes(data)


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


@dataclass(frozen=True, slots=True)
class TarEntry:
    """A file as `tar -x` leaves it: a regular member, or a hard link resolved to its target."""

    name: str
    offset: int  # its first data byte, absolute in the file on disk
    size: int  # the file's bytes (a sparse member: expanded)
    stored: int  # bytes stored in the archive (a sparse member: its segments only)
    sparse: tuple | None = None  # ((offset in the file, bytes), ...) for a sparse member


@dataclass
class TarIndex:
    """What `tar -x` of a tar at [start, start + size) of a file would leave: its files, in
    archive order (`members`), the members that leave no file alexprep reads (`notes`:
    (name, why): links, a repeated name's earlier copies, special files), and what went
    wrong reading it (`problem`, None when it ends with its end-of-archive marker;
    `truncated` when the file ends before the tar does)."""

    members: list[TarEntry] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    problem: str | None = None
    truncated: bool = False


MAX_SPARSE_BYTES = 1 << 30  # a sparse member expands to this at most (its holes cost no storage)


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _sparse_map(info: tarfile.TarInfo) -> tuple[tuple | None, str | None]:
    """(the member's sparse map, None), or (None, why it cannot be read): a map that leaves
    the file, or one that expands a few stored bytes into more than any image."""
    # Empty segments carry no data (GNU's map ends with (size, 0) and pads with (0, 0)).
    segments, at = tuple((int(o), int(n)) for o, n in info.sparse if int(n) != 0), 0
    for offset, count in segments:
        if offset < at or count < 0 or offset + count > info.size:
            return None, "a sparse member whose map of holes is damaged (segments out of order or past its end)"
        at = offset + count
    if info.size > MAX_SPARSE_BYTES:
        return None, f"a sparse member expanding to {info.size} bytes, more than any image ({MAX_SPARSE_BYTES} at most)"
    return segments, None


def _entry_of(info: tarfile.TarInfo, name: str, start: int, size: int, files: dict):
    """What extracting `info` leaves at `name`: a TarEntry, or why no file alexprep reads."""
    if info.isreg():  # nearly every member: tested first
        sparse, why = _sparse_map(info) if info.sparse else (None, None)
        if why:
            return why
        stored = sum(n for _, n in sparse) if sparse else info.size
        if info.offset_data + stored > size:  # past the tar's end: what lies there is not this member's
            return "the tar ends inside this member: it is truncated"
        return TarEntry(name, start + info.offset_data, info.size, stored, sparse)
    if info.islnk():
        target = files.get(_clean(info.linkname))
        if target is None:
            return (f"a hard link to {info.linkname!r}, which is not a file earlier in the archive "
                    "(tar -x cannot make it either)")
        return replace(target, name=name) if isinstance(target, TarEntry) else target
    if info.issym():
        return (f"a symbolic link to {info.linkname!r}: links are not followed inside an archive "
                "(extract it to follow them)")
    return f"not a regular file (tar type {info.type!r}: a device, FIFO or other special file)"


def index_tar(fd: int, start: int, size: int) -> TarIndex:
    """Walk the headers of the tar at [start, start + size) of `fd`, skipping the data, and
    keep what `tar -x` would: hard links give their target's bytes, a repeated name its
    last copy (the earlier ones noted), links and special files noted."""
    index = TarIndex()
    try:
        tar = tarfile.open(fileobj=_Window(fd, start, size), mode="r:")
    except tarfile.TarError:
        index.problem = "is not a tar archive"
        return index
    files: dict[str, TarEntry | str] = {}  # name -> its file, or why it leaves none we read
    last, last_end, error = None, 0, None
    try:
        for info in tar:
            last, last_end = info.name, tar.offset  # tar.offset: past this member's data
            if info.isdir():
                continue
            name = _clean(info.name)
            earlier = files.pop(name, None)  # popped: the later copy takes its place in order
            if isinstance(earlier, TarEntry):
                index.notes.append((name, f"an earlier copy (at byte {earlier.offset - start} of the tar), replaced "
                                          "by a later member of the same name: the last is built, as tar -x keeps it"))
            files[name] = _entry_of(info, name, start, size, files)
    except (tarfile.TarError, ValueError, EOFError) as exc:  # tarfile lets a garbled PAX sparse map's ValueError out
        error = str(exc)
    index.members = [e for e in files.values() if isinstance(e, TarEntry)]
    index.notes += [(name, why) for name, why in files.items() if isinstance(why, str)]
    _check_end(index, fd, start, size, max(tar.offset, last_end), last, error)
    return index


def _check_end(index: TarIndex, fd: int, start: int, size: int, end: int, last: str | None, error: str | None) -> None:
    """A whole tar ends with a zero block where its headers stop; tarfile stops quietly at a
    truncated or garbled header, so the end is checked here, and said where it is."""
    after = f"after {last}" if last else "at its start"
    if end > size:
        index.truncated = True
        index.problem = f"ends at byte {size}, inside {last} ({end - size} bytes before that member's end)"
    elif end + tarfile.BLOCKSIZE > size:
        index.truncated = True
        index.problem = f"ends {after}, at byte {size}, where more members or its end-of-archive marker should follow"
    elif os.pread(fd, tarfile.BLOCKSIZE, start + end) != bytes(tarfile.BLOCKSIZE):
        index.problem = (f"is damaged at byte {end} of {size}, {after}: no tar header there"
                         + (f" ({error})" if error else ""))


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
# What each archive loses from the cut on, and roughly its size when whole, for the one line
# that says to download it again.
_WHOLE = {TRAIN_TAR: ("the class tars from there on", "about 138 GiB"),
          VAL_TAR: ("the images from there on", "about 6.3 GiB")}


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
    _index: TarIndex | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.archive}" + (f":{self.prefix}" if self.kind == "zip" else "")

    def _outer(self) -> TarIndex:
        """The tar's own index, read once. A truncated or damaged tar is refused in one line
        before anything that follows from it (its classes, its images) is used."""
        if self._index is None:
            fd = os.open(self.archive, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _advise_random(fd)
                index = index_tar(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            if index.problem:
                raise DataError(self._refusal(index))
            self._index = index
        return self._index

    def _refusal(self, index: TarIndex) -> str:
        lost, whole = _WHOLE.get(self.archive.name, ("the members from there on", ""))
        again = f"download {self.archive.name} again{f' ({whole} whole)' if whole else ''} and rerun"
        if not index.members and not index.notes and not index.truncated:
            return f"{self.archive} {index.problem} (an empty or partial download, or another file under its name): {again}"
        state = "the download is truncated" if index.truncated else "the archive is damaged"
        return f"{self.archive} {index.problem}: {state}, and {lost} are missing: {again}"

    def class_names(self) -> list[str]:
        """The split's class folders, without listing their files (the train tar's class
        tars, from its outer headers only)."""
        if self.kind == "nested":
            return sorted({Path(e.name).name[:-4] for e in self._outer().members
                           if "/" not in e.name and e.name.endswith(".tar") and not e.name.startswith(".")})
        if self.kind == "zip":
            return sorted({rel.split("/", 1)[0] for rel in self._zip_rels() if "/" in rel} - {""})
        return []

    def _zip_rels(self):
        for info in self.zip_infos:
            if info.filename.startswith(self.prefix):
                yield info.filename[len(self.prefix):]

    def _problem(self, rel: str, why: str, inner: str) -> dict:
        """A member that gives no image, as the build reports it: its key when extracted,
        why, and where it lies."""
        return {"key": self.prefix + rel, "reason": why, "archive": f"{self.archive}:{inner}"}

    def scan(self):
        """(top-level folders, an iterator of (path relative to the split folder, Member),
        problems). The members stream out one class tar at a time, so that a listing never
        holds ImageNet's 1.28 million as objects; `problems` is complete once they have."""
        if self.kind == "zip":
            problems = []
            dirs = {rel.split("/", 1)[0] for rel in self._zip_rels() if "/" in rel}
            return dirs, self._zip_entries(problems), problems
        archive, outer = str(self.archive), self._outer()
        problems = [self._problem(name, why, name) for name, why in outer.notes]
        if self.kind == "flat":
            return set(), ((e.name, _member(archive, e, e.name)) for e in outer.members), problems
        dirs, loose, class_tars = set(), [], []
        for e in outer.members:
            if "/" not in e.name and e.name.endswith(".tar"):
                dirs.add(e.name[:-4])
                if e.sparse is None:
                    class_tars.append((archive, e.name, e.offset, e.size))
                else:  # its bytes are not one range of the file, so its members are not either
                    problems.append(self._problem(e.name, "class tar stored as a sparse member of the train tar: "
                                                  "its images cannot be read in place (extract it)", e.name))
            else:
                loose.append((e.name, _member(archive, e, e.name)))
        return dirs, self._nested_entries(loose, class_tars, problems), problems

    def _nested_entries(self, loose: list, class_tars: list, problems: list):
        yield from loose
        archive = str(self.archive)
        for name, index in _map(_index_class_tar, class_tars, self.workers):
            wnid = name[:-4]
            if index.problem:
                problems.append(self._problem(name, f"class tar {index.problem}" + (
                    "" if index.members else ": none of its images can be read") + f" (download {self.archive.name} "
                    "again)", name))
            problems.extend(self._problem(f"{wnid}/{inner}", why, f"{name}/{inner}") for inner, why in index.notes)
            for e in index.members:
                yield f"{wnid}/{e.name}", _member(archive, e, f"{name}/{e.name}")

    def _zip_entries(self, problems: list):
        """The zip's files as extraction leaves them: a repeated name's last copy (as
        Python's and most unzips' extraction), symbolic links skipped."""
        latest: dict[str, zipfile.ZipInfo] = {}
        for info in self.zip_infos:
            name = info.filename
            if name.startswith(self.prefix) and not info.is_dir() and name != self.prefix:
                if latest.pop(name, None) is not None:
                    problems.append(self._problem(name[len(self.prefix):], "an earlier copy, replaced by a later "
                                                  "member of the same name: the last is built, as unzip keeps it", name))
                latest[name] = info
        for name, info in latest.items():
            rel = name[len(self.prefix):]
            if stat.S_ISLNK(info.external_attr >> 16):
                problems.append(self._problem(rel, "a symbolic link: links are not followed inside an archive "
                                              "(extract it to follow them)", name))
                continue
            yield rel, Member(str(self.archive), info.header_offset, info.compress_size, name,
                              info.compress_type, info.CRC, info.file_size)


def _member(archive: str, entry: TarEntry, inner: str) -> Member:
    return Member(archive, entry.offset, entry.size, inner, sparse=entry.sparse)


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
