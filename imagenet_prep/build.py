"""`build-shards`: an input tree to the build folder of 256x256 Arrow shards (or, with
`--resize keep-aspect`, of whole images, shorter side 256, each row's size recorded), in parallel.

How a build is laid out, so that it is deterministic, resumable and splittable:
1. List each split's files (sorted keys), fix the class list (OUT/classes.json, once).
2. Permute the samples with a generator seeded by (seed, split): every shard mixes classes.
3. Cut the permutation into `ceil(n / shard_size)` shards of near-equal size; shard j
   belongs to --part j mod N. Everything so far depends only on the input and the options.
4. Each worker process builds whole shards: decode, crop (or resize whole), encode, accumulate statistics,
   stream to a temporary file, then rename (the statistics partial first, the shard last,
   so a shard under its final name always has its partial). A rerun skips finished shards.
5. The part's manifest is written last, atomically.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from alexprep.imagenet_prep import archives, layout
from alexprep.imagenet_prep.atomic import remove_leftovers, write_bytes_atomic, write_text_atomic
from alexprep.imagenet_prep.build_folder import ROOT_FILES, BuildFolder, manifest_name, partial_name, shard_name
from alexprep.imagenet_prep.classes import ClassList, load_classes, read_class_file, save_classes
from alexprep.imagenet_prep.devices import available_cpus
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.forking import frozen_gc, trim_heap
from alexprep.imagenet_prep.locks import build_lock
from alexprep.imagenet_prep.shards import ShardRecord, ShardWriter, build_id, read_manifest, shard_schema
from alexprep.imagenet_prep.stats import PartialStats
from alexprep.imagenet_prep.transform import ImageSpec, UnreadableImage, encode, load_image, pil_flavour

# ~1024 images is tens of MB of q95 JPEG (docs/build.md, from benchmarks/results): long
# sequential reads (FFCV's pages are 8 MiB), about 1,250 shards for ImageNet-1k so that
# 16-64 workers or machines each get many, a few shards fit a shuffle buffer in RAM, and a
# crash loses at most a few seconds per worker.
DEFAULT_SHARD_SIZE = 1024
# Conservative bytes per image for the free-space check (q95 256x256 photos: 30-60 KB).
JPEG_BYTES_ESTIMATE = 70_000
# --resize keep-aspect stores whole images: ImageNet's are mostly 4:3 (256x341, 1.33x the
# area of the crop), some wider; estimate twice the crop's bytes (or the cap, if smaller).
KEEP_ASPECT_AREA_FACTOR = 2.0


def default_workers() -> int:
    return available_cpus()


@dataclass(frozen=True)
class BuildConfig:
    """Everything `build-shards` does, shared by the CLI and the library."""

    spec: ImageSpec = ImageSpec()
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0  # seeds the order of samples over shards
    splits: tuple[str, ...] = layout.SPLITS  # those of these present in SRC are built
    workers: int = field(default_factory=default_workers)
    part: int = 0  # this run builds shards j with j % parts == part
    parts: int = 1
    on_error: str = "report"  # "report": list unreadable files and go on; "fail": also exit non-zero
    overwrite: bool = False  # replace a different build found in OUT
    accumulate_stats: bool = True  # keep each shard's statistics partial (off only to benchmark)
    val_labels: Path | None = None
    devkit: Path | None = None
    classes_file: Path | None = None

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise DataError(f"--shard-size must be at least 1, not {self.shard_size}")
        if self.workers < 1:
            raise DataError(f"--workers must be at least 1, not {self.workers}")
        if not (self.parts >= 1 and 0 <= self.part < self.parts):
            raise DataError(f"--part {self.part}/{self.parts}: expected i/N with 0 <= i < N (e.g. --part 0/4 .. 3/4)")
        if self.on_error not in ("report", "fail"):
            raise DataError(f"--on-error must be 'report' or 'fail', not {self.on_error!r}")
        unknown = set(self.splits) - set(layout.SPLITS)
        if unknown or not self.splits:
            raise DataError(f"--split must be among {layout.SPLITS}, not {sorted(unknown) or 'nothing'}")
        for name in ("val_labels", "devkit", "classes_file"):  # "~/..." as a shell would give it
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)).expanduser())


class DiskFull(OSError):
    """The disk filled during a build (after the free-space estimate passed). Finished
    shards are kept and no temporary file is left: free space and rerun the same command."""


def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass
class SplitReport:
    split: str
    shards_total: int = 0
    shards_built: int = 0
    shards_reused: int = 0
    inputs: int = 0  # candidate image files in this part's shards
    written: int = 0
    skipped: list[dict] = field(default_factory=list)
    ignored: int = 0
    bytes: int = 0


@dataclass
class BuildReport:
    out: Path
    build_id: str
    splits: list[SplitReport]
    seconds: float = 0.0

    @property
    def skipped(self) -> list[dict]:
        return [s for r in self.splits for s in r.skipped]


# ---------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    count: int
    rows: np.ndarray  # the listing's rows that go into this shard, in order


def plan_shards(listing: layout.SplitListing, shard_size: int, seed: int) -> list[ShardJob]:
    """Split the samples into shards: a seeded permutation cut into near-equal pieces."""
    n = len(listing)
    count = max(1, math.ceil(n / shard_size)) if n else 0
    rng = np.random.Generator(np.random.PCG64([seed, layout.SPLITS.index(listing.split)]))
    order = rng.permutation(n)
    bounds = [j * n // count for j in range(count + 1)] if count else [0]
    return [ShardJob(listing.split, j, count, order[bounds[j]:bounds[j + 1]]) for j in range(count)]


def job_samples(job: ShardJob, listing: layout.SplitListing, labels: np.ndarray) -> tuple:
    """(key, source, label, wnid) of each of a job's samples, made as the job goes to a
    worker: only the shards in flight are ever held as objects (docs/design.md, Memory)."""
    codes = listing.codes()
    return tuple((listing.key(i), listing.source(i), int(labels[codes[i]]), listing.wnids[codes[i]])
                 for i in map(int, job.rows))


def class_labels(listing: layout.SplitListing, classes: ClassList) -> np.ndarray:
    """The class index of each of the listing's wnids (a DataError names a wnid not in the list)."""
    return np.array([classes.index(w) for w in listing.wnids], np.int64)


# ---------------------------------------------------------------------------- workers
_progress = None  # a shared counter of images done, set in each worker


def _init_worker(counter) -> None:
    global _progress
    _progress = counter


def _init_pool_worker(counter) -> None:
    # (OUT's lock descriptors were closed at the fork: only the build process holds it, locks.py)
    archives.close_handles()  # each worker opens the archives itself
    _init_worker(counter)


def build_one_shard(job: ShardJob, samples: tuple, out_split: str, spec: ImageSpec, classes: ClassList, build: str,
                    accumulate_stats: bool) -> dict:
    """Build one shard and its statistics partial; returns its record. Runs in a worker."""
    folder = Path(out_split)
    name = shard_name(job.split, job.index, job.count)
    writer = ShardWriter(folder / name, shard_schema(classes, spec, build, job.split))
    partial = PartialStats.empty_for(spec)
    skipped = []
    try:
        for key, source, label, wnid in samples:
            try:
                data = archives.read_source(source)
                pixels = load_image(data, spec)
            except UnreadableImage as exc:
                skipped.append({"key": key, "reason": str(exc)})
            except OSError as exc:
                skipped.append({"key": key, "reason": f"cannot read file: {exc.strerror or exc}"})
            else:
                if accumulate_stats:
                    partial.add(pixels)
                if spec.keep_aspect:
                    writer.add(encode(pixels, spec), label, wnid, key, pixels.shape[:2])
                else:  # the call as it always was
                    writer.add(encode(pixels, spec), label, wnid, key)
            if _progress is not None:
                with _progress.get_lock():
                    _progress.value += 1
        size, sha = writer.finish()
    except BaseException:
        writer.abort()
        raise
    record = {
        "build_id": build,
        "shard": ShardRecord(name, job.index, writer.rows, size, sha).to_json(),
        "inputs": len(samples),
        "skipped": skipped,
        "has_stats": accumulate_stats,
    }
    # The partial first, the shard last: a shard under its final name always has its partial.
    write_bytes_atomic(folder / partial_name(name), partial.to_npz_bytes(record=np.array(json.dumps(record))))
    writer.commit()
    return record


def _run_job(args) -> tuple[dict, str]:
    record = build_one_shard(*args)
    trim_heap()  # a worker builds many shards: what one freed must not stay resident for the rest
    return record, args[0].split


def read_shard_record(folder: Path, name: str) -> dict | None:
    """The record of a finished shard (shard and partial both present), else None."""
    shard, partial = folder / name, folder / partial_name(name)
    if not (shard.exists() and partial.exists()):
        return None
    with np.load(partial) as z:
        record = json.loads(str(z["record"]))
    if record["shard"]["bytes"] != os.path.getsize(shard):
        return None  # not ours to trust: rebuild it
    return record


# ---------------------------------------------------------------------------- checks
def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"OUT {out} cannot be created ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DataError(f"OUT {out} is not writable")


def _check_out(out: Path, overwrite: bool, build: str) -> None:
    found = _existing_build_ids(out)
    other = sorted(found - {build})
    if other and not overwrite:
        raise DataError(
            f"OUT {out} holds a different build (build id {', '.join(other)}; these options give {build}): "
            "pass --overwrite to replace it, or choose another OUT"
        )


def _existing_build_ids(out: Path) -> set[str]:
    ids = set()
    for split in layout.SPLITS:
        if not BuildFolder(out).split(split).is_dir():
            continue
        for path in BuildFolder(out).manifests(split):
            ids.add(read_manifest(path)["build_id"])
        for path in BuildFolder(out).partials(split):
            with np.load(path) as z:
                ids.add(json.loads(str(z["record"]))["build_id"])
            break  # one finished shard tells the build of an unfinished run
    return ids


def _clear_build(out: Path) -> None:
    """--overwrite: remove what a build wrote (only our files), keep anything else."""
    folder = BuildFolder(out)
    for split in layout.SPLITS:
        for path in folder.shards(split) + folder.partials(split) + folder.manifests(split):
            path.unlink()
    for name in ROOT_FILES:
        (out / name).unlink(missing_ok=True)


def _check_disk(out: Path, spec: ImageSpec, images: int) -> None:
    area = 1.0 if not spec.keep_aspect else min(KEEP_ASPECT_AREA_FACTOR, spec.max_side / spec.size)
    per_image = int(area * (spec.size * spec.size * 3 if spec.encoding == "raw" else JPEG_BYTES_ESTIMATE)) + (
        200 if spec.encoding == "raw" else 0)
    need = images * per_image
    free = shutil.disk_usage(out).free
    if need > free:
        raise DataError(
            f"not enough disk space in {out}: about {need / 1e9:.2f} GB needed for {images} images "
            f"({per_image / 1e3:.0f} KB each), {free / 1e9:.2f} GB free"
        )


def fix_class_list(out: Path, src: Path, config: BuildConfig, folders: dict, listings: dict,
                   labels: layout.ValLabelSource | None = None) -> ClassList:
    """OUT/classes.json if present; else --classes FILE; else inferred from SRC."""
    existing = BuildFolder(out).classes
    given = read_class_file(config.classes_file) if config.classes_file else None
    if existing.exists() and not config.overwrite:
        classes = load_classes(existing)
        if given is not None and given.wnids != classes.wnids:
            raise DataError(f"--classes {config.classes_file} differs from {existing}, fixed by an earlier build: "
                            "pass --overwrite to rebuild with the new list")
        return classes
    if given is not None:
        return given
    labels = labels or layout.ValLabelSource(config.val_labels, config.devkit)
    return layout.infer_class_list(src, folders, listings, labels)


# ---------------------------------------------------------------------------- the build
def build_shards(src: Path, out: Path, config: BuildConfig = BuildConfig(), progress=None) -> BuildReport:
    """Build (or finish building) part `config.part` of `config.parts` of OUT from SRC.

    `progress(done, total)` is called from time to time when given.
    """
    started = time.perf_counter()
    src, out = Path(src).expanduser(), Path(out).expanduser()  # "~/imagenet" as a shell would give it
    folders = layout.find_split_folders(src, config.workers)
    wanted = {s: f for s, f in folders.items() if s in config.splits}
    if not wanted:
        raise DataError(f"SRC {src} has no {' or '.join(config.splits)} split (found: {', '.join(folders) or 'none'})")
    with tempfile.TemporaryDirectory(prefix="alexprep-labels-") as tmp, _archive_names(tmp) as shown:
        labels = _label_source(src, config, wanted, Path(tmp), shown)
        listings = {s: layout.list_split(s, f, src, labels) for s, f in wanted.items()}
        if not any(len(l) for l in listings.values()):
            raise DataError(f"SRC {src}: no image files found in {', '.join(str(f) for f in wanted.values())}")
        _prepare_out(out)
        try:
            # Everything that reads or writes OUT happens under its lock: a second run refuses at once.
            with build_lock(out, config.part, config.parts):
                return _build_locked(src, out, config, folders, listings, labels, progress, started)
        finally:
            archives.close_handles()


@contextlib.contextmanager
def _archive_names(tmp: str):
    """Errors about label files read out of an archive name the archive, not a temporary copy."""
    shown: dict[str, str] = {}
    try:
        yield shown
    except DataError as exc:
        message = str(exc)
        for copy, original in shown.items():
            message = message.replace(copy, original)
        if message == str(exc):
            raise
        raise DataError(message.replace(tmp, "(archive)")) from None


def _label_source(src: Path, config: BuildConfig, wanted: dict, tmp: Path, shown: dict) -> layout.ValLabelSource:
    """The label files: given, lying in SRC, or read out of the devkit .tar.gz or Kaggle's zip."""
    given = layout.ValLabelSource(config.val_labels, config.devkit)
    root = layout.label_root(src)
    in_archives = {s: f for s, f in wanted.items() if isinstance(f, archives.ArchiveSplit)}
    devkit_tgz = config.devkit if config.devkit is not None and str(config.devkit).endswith((".tar.gz", ".tgz")) else None
    if devkit_tgz is None and config.devkit is None and not (root / layout.DEVKIT_DIR).is_dir() \
            and (root / archives.DEVKIT_TGZ).is_file():
        devkit_tgz = root / archives.DEVKIT_TGZ
    if not in_archives and devkit_tgz is None:
        return given  # a tree with its label files as files: as always
    found = archives.extract_label_files(root, in_archives, devkit_tgz, tmp)
    for key, path in found.items():
        origin = devkit_tgz if key == "devkit" or path.parent.name == "data" else next(
            (f.archive for f in in_archives.values() if f.kind == "zip"), root)
        shown[str(path)] = f"{origin}:{path.relative_to(tmp).as_posix()}"
    loose = layout._auto_label_source(root, layout.ValLabelSource(config.val_labels,
                                                                  None if devkit_tgz else config.devkit))
    labels = layout.ValLabelSource(
        loose.val_labels or found.get("val_labels"),
        found.get("devkit") or loose.devkit,
        found.get("synsets"),
    )
    val = wanted.get("val")
    if isinstance(val, archives.ArchiveSplit) and val.kind in ("flat", "zip"):
        _check_val_labels(val, labels, root)
    return labels


def _check_val_labels(val: archives.ArchiveSplit, labels: layout.ValLabelSource, root: Path) -> None:
    """A flat val archive without its labels: one line naming the file to add."""
    if val.kind == "zip":
        if labels.val_labels is None and not val.class_names():
            raise DataError(f"{val}: the val images are flat and {layout.KAGGLE_VAL_CSV} is neither in the zip nor "
                            f"in {root}: add it (from Kaggle), or give --val-labels {layout.KAGGLE_VAL_CSV}")
        return
    if labels.val_labels is None:
        raise DataError(f"{val.archive} holds the val images unlabelled: add {archives.DEVKIT_TGZ} (image-net.org) "
                        f"to {root}, or give --devkit {archives.DEVKIT_TGZ} (or --val-labels {layout.KAGGLE_VAL_CSV})")
    if labels.val_labels.suffix.lower() != ".csv" and labels.devkit is None:
        raise DataError(f"{labels.val_labels} holds ILSVRC2012_IDs: add {archives.DEVKIT_TGZ} (image-net.org) "
                        f"to {root}, or give --devkit {archives.DEVKIT_TGZ}, to map them to wnids")


def _build_locked(src: Path, out: Path, config: BuildConfig, folders: dict, listings: dict,
                  labels: layout.ValLabelSource, progress, started: float) -> BuildReport:
    classes = fix_class_list(out, src, config, folders, listings, labels)
    build = build_id(config.spec, config.shard_size, config.seed, classes)
    _check_out(out, config.overwrite, build)
    if config.overwrite:
        _clear_build(out)
    labels_of = {s: class_labels(listings[s], classes) for s in listings}
    plans = {s: plan_shards(listings[s], config.shard_size, config.seed) for s in listings}
    mine = {s: [j for j in jobs if j.index % config.parts == config.part] for s, jobs in plans.items()}

    reports = {s: SplitReport(s, shards_total=len(plans[s]), ignored=len(listings[s].ignored) if config.part == 0 else 0)
               for s in listings}
    todo: list[ShardJob] = []
    records: dict[str, list[dict]] = {s: [] for s in listings}
    own_names: dict[str, list[str]] = {}
    for split, jobs in mine.items():
        folder = BuildFolder(out).split(split)
        folder.mkdir(exist_ok=True)
        names = [shard_name(split, j.index, j.count) for j in jobs]
        own_names[split] = names + [partial_name(n) for n in names] + [manifest_name(config.part, config.parts)]
        # A whole build holds OUT alone; a part removes only its own shards' leftovers, never
        # the temporary files of another part writing into the same folder now.
        remove_leftovers(folder, None if config.parts == 1 else own_names[split])
        for job in jobs:
            record = read_shard_record(folder, shard_name(split, job.index, job.count))
            if record is not None and record["build_id"] == build:
                records[split].append(record)
                reports[split].shards_reused += 1
            else:
                todo.append(job)
    total = sum(len(j.rows) for j in todo)
    _check_disk(out, config.spec, total)
    args = ((j, job_samples(j, listings[j.split], labels_of[j.split]), str(out / j.split), config.spec, classes,
             build, config.accumulate_stats) for j in todo)
    done = {"shards": 0, "bytes": 0}
    try:
        if not BuildFolder(out).classes.exists():
            save_classes(classes, BuildFolder(out).classes)
        for record, split in _run_all(args, len(todo), config.workers, total, progress):
            records[split].append(record)
            reports[split].shards_built += 1
            done["shards"] += 1
            done["bytes"] += record["shard"]["bytes"]
        return _finish(src, out, config, classes, build, listings, reports, records, started)
    except OSError as exc:
        if not _is_disk_full(exc):
            raise
        # The pool is gone by now (its workers terminated and joined): remove what they left.
        for split, names in own_names.items():
            remove_leftovers(BuildFolder(out).split(split), None if config.parts == 1 else names)
        raise DiskFull(
            errno.ENOSPC,
            f"the disk filled while writing to {out} ({exc.strerror or exc}; "
            f"{shutil.disk_usage(out).free / 1e6:.0f} MB free now): this run finished {done['shards']} of "
            f"{len(todo)} shards ({done['bytes'] / 1e6:.1f} MB), which are kept, and left no temporary files; "
            "free space and rerun the same command to finish the build",
        ) from None


def _finish(src: Path, out: Path, config: BuildConfig, classes: ClassList, build: str, listings: dict,
            reports: dict, records: dict, started: float) -> BuildReport:
    for split, split_records in records.items():
        report = reports[split]
        split_records.sort(key=lambda r: r["shard"]["index"])
        for r in split_records:
            report.inputs += r["inputs"]
            report.written += r["shard"]["rows"]
            report.skipped += r["skipped"]
            report.bytes += r["shard"]["bytes"]
        _name_archives(report.skipped, listings[split])
        if config.part == 0:  # damaged archives, found while listing: reported (and counted) once
            report.inputs += len(listings[split].problems)
            report.skipped += listings[split].problems
        manifest = {
            "format": "alexprep-shards",
            "version": 1,
            "split": split,
            "build_id": build,
            "part": config.part,
            "parts": config.parts,
            "shard_count": report.shards_total,
            "image": asdict(config.spec),
            "build": {"shard_size": config.shard_size, "seed": config.seed, "source": str(src.resolve())},
            "classes": len(classes),
            "counts": {"inputs": report.inputs, "written": report.written, "skipped": len(report.skipped),
                       "ignored": report.ignored, "bytes": report.bytes},
            "has_stats": all(r["has_stats"] for r in split_records),
            "shards": [r["shard"] for r in split_records],
            "skipped": report.skipped,
            # Ignored files are listed (and counted) once, by part 0, so that parts add up.
            "ignored": listings[split].ignored if config.part == 0 else [],
            "software": _software(),
        }
        write_text_atomic(BuildFolder(out).manifest(split, config.part, config.parts), json.dumps(manifest, indent=1) + "\n")
    return BuildReport(out, build, list(reports.values()), time.perf_counter() - started)


def _name_archives(skipped: list[dict], listing: layout.SplitListing) -> None:
    """Beside a skipped member's key and reason (the same as for the extracted file), the
    archive it lies in."""
    if not skipped or not len(listing) or not isinstance(listing.source(0), archives.Member):
        return
    for entry in skipped:
        row = listing.index_of(entry["key"])
        if row is not None:
            entry["archive"] = listing.source(row).describe()


@functools.lru_cache(maxsize=1)
def _software_cached() -> str:
    return json.dumps({"pil": pil_flavour(), "pyarrow": pa.__version__})


def _software() -> dict:
    """Which PIL and pyarrow wrote the shards, for the manifests. Looked up once per
    process: pil_flavour scans every installed distribution (~0.1 s of CPU), a serial
    step after the workers that a second build in the same process need not repeat."""
    return json.loads(_software_cached())


def _run_all(args, jobs: int, workers: int, total: int, progress):
    """Yield (record, split) as shards finish, in a pool of `workers` processes (or inline).
    `args` is consumed lazily (by the pool's feeder thread): each job's samples are made
    only as it is sent."""
    if not jobs:
        return
    counter = mp.Value("q", 0)
    if workers == 1:
        _init_worker(counter)
        try:
            with _progress_reporter(counter, total, progress):
                yield from map(_run_job, args)
        finally:
            _init_worker(None)
        return
    context = mp.get_context("fork" if os.name == "posix" else "spawn")
    with frozen_gc():  # the workers must never collect a caller's DALI pipeline (forking.py)
        pool = context.Pool(min(workers, jobs), initializer=_init_pool_worker, initargs=(counter,))
    with pool:
        # The reporter thread starts after the fork: forking with live threads risks deadlock.
        with _progress_reporter(counter, total, progress):
            yield from pool.imap(_run_job, args)


class _progress_reporter:
    """Calls progress(done, total) four times a second from a thread, and once at the end."""

    def __init__(self, counter, total: int, progress):
        self.counter, self.total, self.progress = counter, total, progress
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(0.25):
            self.progress(self.counter.value, self.total)

    def __enter__(self):
        if self.progress:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.stop.set()
            self.thread.join()
            self.progress(self.counter.value, self.total)
