"""build-shards end to end: counts, the error report, determinism, parts, resume after kill -9."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.sample_data import LARGE_SIZES, jpeg_bytes, load_photo, write_photo_tree
from alexprep.imagenet_prep.shards import image_bytes_column, open_shard, read_split
from alexprep.imagenet_prep.transform import ImageSpec, decode

from test_transform import psnr, reference_crop


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Every shard and partial of a build folder, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in (".arrow", ".npz")}


@pytest.fixture(scope="module")
def quirk_tree(tmp_path_factory) -> Path:
    """Real-photo JPEGs plus every quirk of ImageNet's files."""
    root = tmp_path_factory.mktemp("quirks")
    write_photo_tree(root, classes=3, train_per_class=5, val_per_class=2, seed=7)
    photo = Image.fromarray(load_photo("coffee"))
    cls = root / "train" / "n00000001"
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    (cls / "png_named.JPEG").write_bytes(buf.getvalue())
    (cls / "cmyk.JPEG").write_bytes(jpeg_bytes(photo.convert("CMYK"), 90))
    (cls / "gray.JPEG").write_bytes(jpeg_bytes(photo.convert("L"), 90))
    (cls / "tiny.JPEG").write_bytes(jpeg_bytes(photo.resize((40, 30)), 90))
    (cls / "panorama.JPEG").write_bytes(jpeg_bytes(photo.resize((2400, 240)), 90))
    full = jpeg_bytes(photo, 90)
    (cls / "truncated.JPEG").write_bytes(full[: len(full) // 3])
    (cls / "empty.JPEG").write_bytes(b"")
    (cls / "notes.JPEG").write_bytes(b"this is text, not a JPEG\n")
    (root / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cls / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def quirk_build(tmp_path_factory, quirk_tree) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("quirk_build") / "out"
    report = build_shards(quirk_tree, out, BuildConfig(shard_size=4, workers=2))
    return out, report


def test_counts_add_up_and_unreadable_files_are_listed(quirk_build):
    out, report = quirk_build
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["inputs"] == 15 + 8  # 5 per class x 3, plus the 8 quirk files named .JPEG
    assert counts["inputs"] == counts["written"] + counts["skipped"]
    reasons = {Path(s["key"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"truncated.JPEG", "empty.JPEG", "notes.JPEG"}
    assert "truncated" in reasons["truncated.JPEG"] or "broken" in reasons["truncated.JPEG"]
    assert "empty" in reasons["empty.JPEG"] and "not an image" in reasons["notes.JPEG"]
    assert counts["ignored"] == 2 and sorted(manifest["ignored"]) == ["train/.DS_Store", "train/n00000001/README.txt"]
    assert sum(s["rows"] for s in manifest["shards"]) == counts["written"]


def test_shard_pixels_match_an_independent_reference(quirk_tree, quirk_build):
    out, _ = quirk_build
    index = read_split(out, "train")
    checked = 0
    for shard in index.shards:
        table = open_shard(index, shard)
        for key, data in zip(table.column("key").to_pylist(), image_bytes_column(table).to_pylist()):
            ours = decode(data, index.spec)
            assert ours.shape == (256, 256, 3)
            with Image.open(quirk_tree / key) as img:
                reference = reference_crop(img)
            # Sub-pixel centring and q95 re-encoding: well above visible error.
            assert psnr(ours, reference) > 22, key
            checked += 1
    assert checked == index.rows == 20


def test_every_shard_mixes_classes_in_a_seeded_order(photo_build):
    index = read_split(photo_build, "train")
    labels = [open_shard(index, s).column("label").to_pylist() for s in index.shards]
    assert sum(len(l) for l in labels) == 32 and max(len(l) for l in labels) - min(len(l) for l in labels) <= 1
    assert sum(len(set(l)) > 1 for l in labels) >= len(labels) - 1


def test_deterministic_byte_identical(photo_tree, photo_build, tmp_path):
    again = tmp_path / "again"
    build_shards(photo_tree, again, BuildConfig(shard_size=6, workers=1))  # other worker count
    assert shard_bytes(again) == shard_bytes(photo_build)
    different_seed = tmp_path / "seed1"
    build_shards(photo_tree, different_seed, BuildConfig(shard_size=6, workers=2, seed=1))
    assert shard_bytes(different_seed) != shard_bytes(photo_build)


def test_parts_together_equal_the_whole_build(photo_tree, photo_build, tmp_path):
    out = tmp_path / "parts"
    for part in (2, 0, 1):
        build_shards(photo_tree, out, BuildConfig(shard_size=6, workers=1, part=part, parts=3))
    assert shard_bytes(out) == shard_bytes(photo_build)
    assert sorted(p.name for p in (out / "train").glob("manifest*")) == [
        f"manifest-part-00{i}-of-003.json" for i in range(3)]
    whole, parts = read_split(photo_build, "train"), read_split(out, "train")
    assert [s.sha256 for s in parts.shards] == [s.sha256 for s in whole.shards]
    assert parts.build_id == whole.build_id


def test_a_missing_part_is_named(photo_tree, tmp_path):
    out = tmp_path / "parts"
    build_shards(photo_tree, out, BuildConfig(shard_size=6, workers=1, part=1, parts=3))
    with pytest.raises(DataError, match="--part 0/3, 2/3 not built"):
        read_split(out, "train")


def test_resume_after_kill_9_gives_the_same_bytes(tmp_path):
    src = tmp_path / "src"
    # Large images so that the build takes long enough to be killed in the middle.
    write_photo_tree(src, classes=4, train_per_class=16, val_per_class=0, sizes=LARGE_SIZES, seed=5)
    reference = tmp_path / "reference"
    build_shards(src, reference, BuildConfig(shard_size=2, workers=2))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "alexprep.cli.main", "build-shards", str(src), str(out), "--shard-size", "2",
           "--workers", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "train").glob("*.arrow"))) < 4:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = list((out / "train").glob("*.arrow"))
    assert 4 <= len(finished) < 32, "the kill should land mid-build"
    assert not (out / "train" / "manifest.json").exists()
    for path in finished:  # whatever has a final name is whole
        assert pa.ipc.open_stream(pa.memory_map(str(path))).read_all().num_rows == 2
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{len(finished)} kept" in result.stdout
    assert shard_bytes(out) == shard_bytes(reference)
    assert not [p for p in (out / "train").iterdir() if ".tmp-" in p.name]


def test_different_build_in_out_is_refused_then_overwritten(photo_tree, tmp_path):
    out = tmp_path / "out"
    build_shards(photo_tree, out, BuildConfig(shard_size=6, workers=1))
    with pytest.raises(DataError, match="holds a different build.*--overwrite"):
        build_shards(photo_tree, out, BuildConfig(spec=ImageSpec(quality=80), shard_size=6, workers=1))
    report = build_shards(photo_tree, out, BuildConfig(spec=ImageSpec(quality=80), shard_size=6, workers=1, overwrite=True))
    assert read_split(out, "train").build_id == report.build_id


def test_disk_space_is_checked_before_writing(photo_tree, tmp_path, monkeypatch):
    import shutil as shutil_module

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage._replace(free=1_000_000))
    with pytest.raises(DataError, match=r"not enough disk space.*GB needed for 44 images.*GB free"):
        build_shards(photo_tree, tmp_path / "out", BuildConfig(workers=1))
    assert not list((tmp_path / "out").rglob("*.arrow"))


def test_raw_encoding_stores_the_exact_pixels(photo_build, photo_build_raw):
    jpeg, raw = read_split(photo_build, "val"), read_split(photo_build_raw, "val")
    assert raw.spec.encoding == "raw" and raw.rows == jpeg.rows == 12
    for sj, sr in zip(jpeg.shards, raw.shards):
        tj, tr = open_shard(jpeg, sj), open_shard(raw, sr)
        assert tj.column("key").to_pylist() == tr.column("key").to_pylist()
        for bj, br in zip(image_bytes_column(tj).to_pylist(), image_bytes_column(tr).to_pylist()):
            assert len(br) == 256 * 256 * 3
            assert psnr(decode(bj, jpeg.spec), decode(br, raw.spec)) > 36  # raw = the pixels q95 encoded


# ---------------------------------------------------------------------------- two runs, one OUT
def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "alexprep.cli.main", "build-shards", *map(str, args)]


def _wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name]


@contextlib.contextmanager
def _stopped(proc: subprocess.Popen):
    """`proc` and its workers (a session of their own) held with SIGSTOP, then continued:
    what it holds (its lock, its half-written shard) stays as it is for as long as the
    block runs, however long that takes on a busy machine."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        assert proc.poll() is None, "the build ended before it could be held"
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def slow_tree(tmp_path_factory) -> tuple[Path, Path]:
    """Large photos (a build of a few seconds, long enough to run a second one beside it),
    and their reference build."""
    src = tmp_path_factory.mktemp("slow") / "src"
    write_photo_tree(src, classes=4, train_per_class=16, val_per_class=0, sizes=LARGE_SIZES, seed=5)
    reference = src.parent / "reference"
    build_shards(src, reference, BuildConfig(shard_size=2, workers=2))
    return src, reference


def test_a_second_build_into_the_same_out_is_refused_and_touches_nothing(slow_tree, tmp_path):
    src, reference = slow_tree
    out = tmp_path / "out"
    first = subprocess.Popen(_cli(src, out, "--shard-size", "2", "--workers", "1"), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until the first run holds OUT and is writing a shard under its temporary name,
    # and hold it there while the second runs.
    _wait_for(lambda: _temporaries(out), "the first run's first temporary shard")
    with _stopped(first):
        second = subprocess.run(_cli(src, out, "--shard-size", "2", "--workers", "1"), capture_output=True,
                                text=True)
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"is being built by another build-shards (build-shards, whole build: pid {first.pid} on " in second.stderr
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert shard_bytes(out) == shard_bytes(reference) and not _temporaries(out)


def test_a_lock_left_by_a_killed_build_does_not_block(slow_tree, tmp_path):
    src, reference = slow_tree
    out = tmp_path / "out"
    cmd = _cli(src, out, "--shard-size", "2", "--workers", "2")
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: len(list((out / "train").glob("*.arrow"))) >= 2, "two finished shards")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert f"pid {proc.pid} " in (out / ".lock").read_text()  # the file stays; its flock died with it
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert shard_bytes(out) == shard_bytes(reference) and not _temporaries(out)


def test_parts_run_at_once_into_one_out(slow_tree, tmp_path):
    src, reference = slow_tree
    out = tmp_path / "out"
    cmd = lambda part: _cli(src, out, "--shard-size", "2", "--workers", "1", "--part", part)  # noqa: E731
    first = subprocess.Popen(cmd("0/2"), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    # The second part runs whole while the first is held writing a shard: it must not
    # remove that file.
    _wait_for(lambda: _temporaries(out), "part 0's first temporary shard")
    with _stopped(first):
        held = _temporaries(out)
        second = subprocess.Popen(cmd("1/2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        second_result = (second, *second.communicate(timeout=120))
        assert held and all(p.exists() for p in held), "the second part removed the first's temporary shard"
    results = [(first, *first.communicate(timeout=120)), second_result]
    for proc, stdout, stderr in results:
        assert proc.returncode == 0, stderr
    assert shard_bytes(out) == shard_bytes(reference) and not _temporaries(out)
    assert read_split(out, "train").rows == 64


def test_who_holds_out_is_named(photo_tree, tmp_path):
    from alexprep.imagenet_prep.locks import build_lock

    out = tmp_path / "out"
    out.mkdir()
    with build_lock(out, 0, 2):  # as if --part 0/2 were running (flock: another descriptor conflicts)
        with pytest.raises(DataError, match=r"--part 0/2 is already being built into .*pid \d+ on "):
            build_shards(photo_tree, out, BuildConfig(shard_size=6, workers=1, part=0, parts=2))
        with pytest.raises(DataError, match=r"is being built by --part runs 0/2 \(build-shards --part 0/2: pid"):
            build_shards(photo_tree, out, BuildConfig(shard_size=6, workers=1))
        with pytest.raises(DataError, match=r"parts of one build share N, so --part 1/3 cannot run beside it"):
            build_shards(photo_tree, out, BuildConfig(shard_size=6, workers=1, part=1, parts=3))
        build_shards(photo_tree, out, BuildConfig(shard_size=6, workers=1, part=1, parts=2))  # another part: fine
    assert {int(p.name.split("-")[1]) % 2 for p in out.rglob("*.arrow")} == {1}  # part 1's shards only
    assert sorted(p.name for p in (out / "train").glob("manifest*")) == ["manifest-part-001-of-002.json"]


# ---------------------------------------------------------------------------- a disk that fills
def _full_disk_after(budget: int):
    """A ShardWriter whose disk fills once this process has written `budget` image bytes."""
    import errno

    from alexprep.imagenet_prep.shards import ShardWriter

    class FullDisk(ShardWriter):
        written = 0

        def add(self, image, label, wnid, key):
            FullDisk.written += len(image)
            if FullDisk.written > budget:
                self._sink.write(image[:1000])  # something on disk under the temporary name
                raise OSError(errno.ENOSPC, "No space left on device")
            super().add(image, label, wnid, key)

    return FullDisk


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_is_one_line_exit_1_and_the_rerun_finishes(photo_tree, photo_build, tmp_path, monkeypatch,
                                                                workers):
    from click.testing import CliRunner

    from alexprep.cli.main import cli
    from alexprep.imagenet_prep import build as build_module

    out = tmp_path / "out"
    args = ["build-shards", str(photo_tree), str(out), "--shard-size", "6", "--workers", str(workers)]
    monkeypatch.setattr(build_module, "ShardWriter", _full_disk_after(400_000))  # ~2 shards per process
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    error = [line for line in result.stderr.splitlines() if line.strip() and "img/s]" not in line]  # less the progress bar
    assert "Traceback" not in result.stderr and len(error) == 1, result.stderr
    assert error[0].startswith(f"Error: the disk filled while writing to {out} (No space left on device; ")
    assert "free space and rerun the same command" in error[0]
    finished = len(list(out.rglob("*.arrow")))
    assert 1 <= finished < 8 and f"finished {finished} of 8 shards" in error[0]
    assert not _temporaries(out)
    assert not list(out.rglob("manifest*.json"))
    monkeypatch.undo()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert sum(int(k) for k in re.findall(r"(\d+) kept", result.output)) == finished
    assert shard_bytes(out) == shard_bytes(photo_build) and not _temporaries(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_tmpfs(photo_tree, photo_build, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from alexprep.cli.main import cli
    from alexprep.imagenet_prep import build as build_module

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(build_module, "_check_disk", lambda *a: None)  # the estimate passed; then it filled
        out = disk / "out"
        args = ["build-shards", str(photo_tree), str(out), "--shard-size", "6", "--workers", "2"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "free space and rerun the same command" in result.output, result.output
        assert "Traceback" not in result.output and not _temporaries(out)
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert shard_bytes(out) == shard_bytes(photo_build) and not _temporaries(out)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_a_forked_child_does_not_keep_out_locked(tmp_path):
    """A child forked while the build holds OUT (a worker, a DataLoader) closes its copy of
    the lock's descriptor (locks.py): once the build lets go, OUT is free, child or not."""
    from alexprep.imagenet_prep.locks import build_lock

    out = tmp_path / "out"
    out.mkdir()
    read, write = os.pipe()
    started, ready = os.pipe()
    with build_lock(out):
        pid = os.fork()
        if pid == 0:  # the child outlives the parent's hold, then exits without cleaning up
            os.close(write)
            os.write(ready, b"!")  # the fork's hooks have run: the child's copies are closed
            os.read(read, 1)
            os._exit(0)
        assert os.read(started, 1) == b"!"
    os.close(started)
    os.close(ready)
    try:
        with build_lock(out):  # another descriptor: refused if the child still held the flock
            pass
    finally:
        os.close(write)  # the child reads EOF and exits
        os.close(read)
        os.waitpid(pid, 0)
