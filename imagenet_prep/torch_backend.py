"""The loaders' PyTorch backend: the DALI backend's batches without DALI.

For users without DALI (macOS, CUDA versions DALI has no wheel for), and as the
benchmarks' baseline. A DataLoader over the shards, whose sampler hands each worker a
whole `Batch` plan (sample indices and the host's draws, exactly what DALI is fed). Where
the pixels are decoded and rendered depends on the device (`decoder`):

- CPU: workers decode (`transform.decode`: OpenCV's libjpeg-turbo where it gives PIL's
  pixels, else PIL, pillow-simd where installed) and render each image
  (`render.render_into`: C++, or numpy where it cannot be built), so the work runs in
  parallel, one thread per worker.
- CUDA (`decoder="pil"`, the default): workers decode as on the CPU and cut the uint8
  windows; the GPU renders them after a pinned, non-blocking copy.
- CUDA with `decoder="torchvision"`: workers only copy each image's bytes; the main
  process decodes the whole batch in one nvJPEG call (`torchvision.io.decode_jpeg(...,
  device="cuda")`) and cuts, flips and normalises it with batched tensor operations on
  the GPU. Not the default: on an H200 with 16 cores it decoded 3,900 images/s where 16
  PIL workers gave 11,900, and it takes GPU time from training (benchmarks/GPU.md). It
  pays where a host has few cores per GPU.
- CUDA with `decoder="nvimgcodec"`: as "torchvision", but the batch is decoded by
  nvImageCodec (gpu_decoders.py) with the GPU's hardware JPEG decoders, only each sample's
  windows (ROI decoding); an image it refuses is decoded by PIL in the main process, one
  sample, not the batch. Not "auto"'s choice until gpu_check has measured it faster.

With recipe="rrc" each window is resized to the output size where it is decoded
(resized_crop.py: PIL in the workers on the CPU, or torch on the device after
torchvision's decode), then flipped and normalised by the same code as the paper's crops.
On CUDA with PIL decoding ("canvas" mode) the workers only decode and cut each window
(DCT-scaled where PIL's path is) onto a canvas, and the device resizes the whole batch in
one batched call (`resized_crop.resized_canvases`, within a level of PIL), from boxes the
workers computed: no host sync.

The pixels reach the main process through a ring of shared-memory batch slots made once
(batch_slots.py; pinned once on CUDA): a worker writes its batch into the slot its plan
names and returns the slot's number, the plan's labels and windows as small arrays.

A sample that does not decode is fed as a mid-grey image and counted; the loader reports
it with its shard and row (`Loader.decode_failures`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from alexprep.imagenet_prep.batch_slots import BatchSlots
from alexprep.imagenet_prep.batches import BackendInput, BatchStream
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.forking import frozen_gc
from alexprep.imagenet_prep.gpu_decoders import MEASURED_FASTER, BatchDecoder, NvImageCodecDecoder, have_nvimgcodec
from alexprep.imagenet_prep.render import (
    cpu_norm_arrays, cut_windows, cut_windows_batched, kernel, norm_tensors, render, render_into,
)
from alexprep.imagenet_prep.resized_crop import resized_canvases, resized_window, resized_windows_batched, window_pixels
from alexprep.imagenet_prep.samples import SplitSamples
from alexprep.imagenet_prep.transform import decode, opencv_jpeg

DECODERS = ("auto", "pil", "torchvision", "nvimgcodec")
FAILED_PIXEL = 128  # what an image that does not decode is fed as: mid-grey


def have_torchvision() -> bool:
    """Whether torchvision's image decoding works here (a torchvision built for another
    torch fails at import with a RuntimeError, not an ImportError)."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:
        return False
    return True


def decode_jpeg_batch(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode a batch of JPEGs (1-d uint8 CPU tensors) to (3, H, W) uint8 RGB tensors on
    `device`: one nvJPEG call for the whole batch on CUDA. Raises RuntimeError if one does
    not decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        # torchvision's CUDA decoder allocates its outputs on the caller's stream but writes
        # them from its own without waiting (pytorch/vision#9606; nvJPEG's batched hardware
        # decode writes when called, so only a host wait orders it): memory just freed by
        # kernels still queued could be overwritten under them. Wait for the queue first.
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def pick_decoder(decoder: str, encoding: str, device_type: str = "cpu") -> str:
    """"pil", "torchvision" or "nvimgcodec": PIL in the workers unless a batched decoder is
    asked for by name, or "auto" on CUDA finds nvImageCodec installed and measured faster
    (`gpu_decoders.MEASURED_FASTER`; see the module's docstring for why)."""
    if encoding == "raw":
        return "pil"  # nothing to decode, the workers cut the windows from the raw bytes
    if decoder == "auto":
        fast = device_type == "cuda" and MEASURED_FASTER and have_nvimgcodec()
        return "nvimgcodec" if fast else "pil"
    if decoder == "torchvision" and not have_torchvision():
        raise DataError("decoder='torchvision' needs torchvision (pip install 'alexprep[torchvision]'); "
                        "or use decoder='pil'")
    return decoder


def open_batch_decoder(device: torch.device) -> BatchDecoder:
    """decoder="nvimgcodec"'s BatchDecoder (a one-line DataError where it cannot run)."""
    return NvImageCodecDecoder(device)


def window_regions(windows: np.ndarray, crop: int, rrc: bool) -> list[tuple[int, int, int, int]]:
    """Each sample's (x0, y0, x1, y1): the part of its image its windows cover, from (B, K, 3)
    paper windows (x, y, flip) of crop x crop, or (B, 1, 5) rrc windows (x, y, w, h, flip)."""
    if rrc:
        x, y, w, h = (windows[:, 0, i] for i in range(4))
        return list(zip(x.tolist(), y.tolist(), (x + w).tolist(), (y + h).tolist()))
    x, y = windows[..., 0], windows[..., 1]
    return list(zip(x.min(1).tolist(), y.min(1).tolist(), (x.max(1) + crop).tolist(), (y.max(1) + crop).tolist()))


class WorkerBatch(NamedTuple):
    """What a worker hands the main process for one batch."""

    pixels: Any  # float32 (B, K, 3, c, c), uint8 windows (B, K, c, c, 3), or a list of encoded images
    labels: torch.Tensor  # (B,) int64
    windows: torch.Tensor  # (B, K, 3) int64
    cmn_mean: torch.Tensor  # (B, 3) float32
    index: np.ndarray  # (B,) the samples, to name those that fail to decode
    which: tuple  # (epoch, number), checked against the plan
    failures: list  # "shard row: reason" of the images that did not decode


class SlotBatch(NamedTuple):
    """What a worker hands the main process for a batch it wrote into a slot: no tensor
    (each would be a shared-memory file of its own), only numbers and small arrays."""

    slot: int  # the BatchSlots slot holding the pixels
    labels: np.ndarray  # (B,) int64
    windows: np.ndarray  # (B, K, 3) int64
    cmn_mean: np.ndarray  # (B, 3) float32
    index: np.ndarray
    which: tuple
    failures: list
    boxes: np.ndarray | None = None  # "canvas": (B, 6) float64 (x0, y0, x1, y1, width, height)


class ShardBatches(Dataset):
    """dataset[batch] -> the batch's pixels in the form `mode` asks for; indexed by `Batch`
    plans, not ints. Modes: "render" (finished float32 images), "windows" (uint8 windows,
    cut and flipped) or "bytes" (each image's encoded bytes, for torchvision or nvImageCodec)."""

    def __init__(self, samples: SplitSamples, crop: int, mode: str, norm=None, rrc: bool = False, slots=None):
        self.slots = slots  # BatchSlots.slots: the tensors the workers write batches into
        self.samples = samples  # dropped when pickled, re-opened in the worker
        self.fetch = samples.fetch  # a remote build's cache (shard_cache.ShardCache), or None
        self.transient = samples.transient  # a size-limited cache: workers map shards per batch
        self.index = samples.index
        self.spec = samples.index.spec
        self.crop = crop
        self.mode = mode
        self.rrc = rrc  # windows (x, y, w, h, flip) resized to crop x crop, not the paper's crops
        self.norm = norm  # Normalization, for "render"
        self._norm_arrays = None

    def __getstate__(self):  # spawn/forkserver: ship paths, not memory maps
        return dict(self.__dict__, samples=None, _norm_arrays=None)

    def _samples(self) -> SplitSamples:
        if self.samples is None:
            self.samples = SplitSamples(self.index, self.fetch, self.transient)
        return self.samples

    def __len__(self) -> int:
        return len(self._samples())

    def _decode(self, sample: int, failures: list) -> np.ndarray:
        samples = self._samples()
        try:
            return decode(samples.view(sample), self.spec)
        except Exception as exc:  # a shard changed after its build; verify names which
            failures.append(f"{samples.where(sample)}: {type(exc).__name__}: {exc}")
            return np.full((self.spec.size, self.spec.size, 3), FAILED_PIXEL, np.uint8)

    def _resized(self, sample: int, window: np.ndarray, failures: list) -> np.ndarray:
        """recipe="rrc": the sample's window resized to crop x crop (not flipped)."""
        samples = self._samples()
        shape = (int(samples.heights[sample]), int(samples.widths[sample]))
        try:
            return resized_window(samples.view(sample), self.spec, shape, window, self.crop)
        except Exception as exc:  # as _decode
            failures.append(f"{samples.where(sample)}: {type(exc).__name__}: {exc}")
            return np.full((self.crop, self.crop, 3), FAILED_PIXEL, np.uint8)

    def _pixels(self, sample: int, windows: np.ndarray, failures: list) -> tuple[np.ndarray, np.ndarray]:
        """(image, windows) for render_into / cut_windows: the decoded image and its paper
        windows, or the rrc window already resized and its flip as a (0, 0, flip) window."""
        if not self.rrc:
            return self._decode(sample, failures), windows
        return self._resized(sample, windows[0], failures), np.array([[0, 0, windows[0, 4]]], np.int64)

    def __getitem__(self, item):
        """item: a `Batch` (its pixels in a fresh tensor), or (Batch, slot number, the slot's
        tensor or None) from TorchBackend's feed (its pixels into that slot)."""
        try:
            if isinstance(item, tuple):
                return self._into_slot(*item)
            return self._get(item)
        finally:
            if get_worker_info() is not None:  # the main process lets go of its shards (loaders._releasing)
                self._samples().let_go()

    def _into_slot(self, batch, number: int, moved) -> SlotBatch:
        if moved is not None:  # the ring replaced this slot after the workers were forked
            self.slots[number] = moved
        slot = self.slots[number]
        if len(batch) > slot.shape[0] or batch.windows.shape[1] != slot.shape[1]:  # a bug, never the user's
            raise RuntimeError(f"batch of {len(batch)} x {batch.windows.shape[1]} does not fit "
                               f"slot {tuple(slot.shape)}")
        failures: list[str] = []
        boxes = self._write(batch, slot, failures)
        return SlotBatch(number, np.asarray(batch.labels, np.int64), np.asarray(batch.windows, np.int64),
                         np.asarray(batch.cmn_mean, np.float32), batch.index, (batch.epoch, batch.number), failures,
                         boxes)

    def _canvas(self, sample: int, window: np.ndarray, out: np.ndarray, failures: list) -> tuple:
        """recipe="rrc" on CUDA: the window's pixels onto the canvas `out` (top left); its
        box there and their (width, height)."""
        samples = self._samples()
        shape = (int(samples.heights[sample]), int(samples.widths[sample]))
        try:
            pixels, box = window_pixels(samples.view(sample), self.spec, shape, window, self.crop)
        except Exception as exc:  # as _decode
            failures.append(f"{samples.where(sample)}: {type(exc).__name__}: {exc}")
            pixels, box = np.full((self.crop, self.crop, 3), FAILED_PIXEL, np.uint8), (0, 0, self.crop, self.crop)
        h, w = pixels.shape[:2]
        out[:h, :w] = pixels
        return (*box, w, h)

    def _write(self, batch, out: torch.Tensor, failures: list) -> np.ndarray | None:
        """The batch's pixels into `out`: finished images ("render"), uint8 windows, or the
        rrc windows uncut ("canvas", whose boxes it returns)."""
        if self.mode == "canvas":
            return np.array([self._canvas(sample, batch.windows[i, 0], out[i, 0].numpy(), failures)
                             for i, sample in enumerate(batch.index)], np.float64).reshape(-1, 6)
        if self.mode == "render":  # CPU device: finished here, in parallel across workers
            if self._norm_arrays is None:
                self._norm_arrays = cpu_norm_arrays(self.norm)
            cmn = np.asarray(batch.cmn_mean, np.float32)
            pixels = out.numpy()
            for i, sample in enumerate(batch.index):
                image, windows = self._pixels(sample, batch.windows[i], failures)
                render_into(pixels[i:i + 1], image[None], np.asarray(windows[None], np.int64), cmn[i:i + 1],
                            *self._norm_arrays)
        else:
            for i, sample in enumerate(batch.index):
                cut_windows(*self._pixels(sample, batch.windows[i], failures), self.crop, out[i].numpy())

    def _get(self, batch) -> WorkerBatch:
        b, k, c = len(batch), batch.windows.shape[1], self.crop
        labels = torch.from_numpy(np.array(batch.labels, np.int64))
        windows = torch.from_numpy(np.array(batch.windows, np.int64))
        cmn_mean = torch.from_numpy(np.array(batch.cmn_mean, np.float32))
        failures: list[str] = []

        def done(pixels) -> WorkerBatch:
            return WorkerBatch(pixels, labels, windows, cmn_mean, batch.index, (batch.epoch, batch.number), failures)

        if self.mode == "bytes":
            return done([torch.from_numpy(np.array(self._samples().view(i))) for i in batch.index])
        # A fresh tensor per batch (TorchBackend.handoff "fresh", the benchmarks' baseline):
        # in shared memory in a worker, so that handing it over does not copy it once more.
        out = torch.empty(pixel_shape(self.mode, b, k, c), dtype=pixel_dtype(self.mode))
        out = out.share_memory_() if get_worker_info() is not None else out
        self._write(batch, out, failures)
        return done(out)


def pixel_shape(mode: str, batch_size: int, crops: int, crop: int, canvas: tuple[int, int] = (0, 0)) -> tuple:
    """A batch's pixels: finished (B, K, 3, c, c) images ("render"), (B, K, c, c, 3) windows,
    or (B, 1, H, W, 3) canvases as large as the split's largest image ("canvas")."""
    if mode == "render":
        return batch_size, crops, 3, crop, crop
    if mode == "canvas":
        return batch_size, 1, *canvas, 3
    return batch_size, crops, crop, crop, 3


def pixel_dtype(mode: str) -> torch.dtype:
    return torch.float32 if mode == "render" else torch.uint8


def flipped(crops: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(B, c, c, 3) crops mirrored where flip (B,) is set, on the device: no host sync."""
    return torch.where(flip.bool()[:, None, None, None], crops.flip(2), crops)


class _FeedSampler(Sampler):
    """Yields the Batch plans of the current feed: set before each `iter(DataLoader)`."""

    def __init__(self):
        self.feed = iter(())

    def __iter__(self):
        return self.feed


def _as_is(item):
    return item


class TorchBackend(BatchStream):
    """A DataLoader with persistent workers, fed one endless stream of batch plans; the
    pixels come back through a ring of batch slots (batch_slots.py)."""

    # "slots": the ring; "fresh": a new shared-memory tensor per batch and, on CUDA, the
    # DataLoader's pin-memory thread (the hand-off before the ring: benchmarks/handoff.py's
    # baseline). Set on the class before a loader is made.
    handoff = "slots"

    def __init__(self, source: BackendInput):
        super().__init__(source)
        config = source.config
        self.device = source.device
        gpu = self.device.type == "cuda"
        self.decoder = pick_decoder(config.decoder, source.spec.encoding, self.device.type)
        self._batch_decoder = open_batch_decoder(self.device) if self.decoder == "nvimgcodec" else None
        mode = "bytes" if self.decoder in ("torchvision", "nvimgcodec") else "windows" if gpu else "render"
        if mode == "windows" and config.recipe == "rrc" and self.handoff == "slots":
            mode = "canvas"  # resized on the device
        self.mode = mode
        if mode == "render":
            kernel()  # compiled or loaded here, before the workers fork, not in each of them
        if mode != "bytes":
            opencv_jpeg()  # the workers decode: checked once here, not in each of them
        workers = config.threads
        self._ring = self._make_ring(source, mode, workers) if mode != "bytes" and self.handoff == "slots" else None
        self.dataset = ShardBatches(source.samples, config.crop, mode, norm=source.norm, rrc=config.recipe == "rrc",
                                    slots=self._ring.slots if self._ring else None)
        self._sampler = _FeedSampler()
        self._dl = self._data_loader()
        self._norm_tensors = norm_tensors(source.norm, self.device) if mode != "render" else None
        self._squeeze = config.train or config.crops == 1
        self._iterator = None
        self.fallbacks = 0  # images the batch decoder refused and PIL decoded (or failed: counted as ever)

    def _data_loader(self) -> DataLoader:
        workers = self.input.config.threads
        # The ring's slots are pinned once: the DataLoader's pin-memory thread would copy each.
        return DataLoader(self.dataset, batch_size=None, sampler=self._sampler, num_workers=workers,
                          collate_fn=_as_is, pin_memory=self.device.type == "cuda" and self._ring is None,
                          persistent_workers=workers > 0,
                          prefetch_factor=self.input.config.prefetch if workers > 0 else None)

    def rest(self) -> None:
        """Between evaluation passes: end the workers (dropping what they fed ahead); the
        next pass forks new ones, which find the ring where the last ones left it."""
        self._next = None
        self._iterator = None
        self._dl = self._data_loader()  # the old one's iterator shuts its workers down when freed
        if self._ring is not None:
            self._ring.unpin()  # before the next pass forks new workers

    def _make_ring(self, source: BackendInput, mode: str, workers: int) -> BatchSlots:
        """One slot per batch the DataLoader may have in flight (workers x prefetch), one for
        the batch the caller holds and one for the batch the stream holds between steps:
        a slot's turn comes again only after its batch was handed over two steps ago."""
        config = source.config
        crops = 1 if source.eval_windows is None else len(source.eval_windows)
        canvas = (int(source.samples.heights.max()), int(source.samples.widths.max())) if mode == "canvas" else (0, 0)
        shape = pixel_shape(mode, config.batch_size, crops, config.crop, canvas)
        return BatchSlots(workers * config.prefetch + 2, shape, pixel_dtype(mode), self.device)

    def _restart(self, feed) -> None:
        # With persistent workers, iter() resets them and drops what the previous stream
        # had prefetched (waiting for the batches in flight: no worker still writes a slot).
        self._sampler.feed = feed if self._ring is None else self._slotted(feed)
        with frozen_gc():  # forks the workers: see forking.py
            self._iterator = iter(self._dl)
        if self._ring is not None:
            self._ring.pin()  # after the fork: see batch_slots.py

    def _slotted(self, feed):
        """Each plan with the slot its pixels go into, taken as the DataLoader sends it out."""
        for batch in feed:
            yield (batch, *self._ring.take())

    def _produce(self):
        item = next(self._iterator)
        if item.failures:
            self.input.report_failures(item.failures)
        if isinstance(item, SlotBatch):
            return self._from_slot(item)
        device, labels = self.device, item.labels
        if self.mode == "render":
            images = item.pixels
        else:
            labels = labels.to(device, non_blocking=True)
            windows = item.windows.to(device, non_blocking=True)
            if self.mode == "bytes":
                decoded, cut = self._decode_windows(item)  # cut: the windows within the decoded parts
                if self.dataset.rrc:  # the host's copy of the windows: reading the device's is a sync
                    crops = resized_windows_batched(decoded, cut[:, 0], self.input.config.crop)
                else:  # all the same size (whole images, or the same windows' span): one gather
                    cut = windows if cut is item.windows else cut.to(device, non_blocking=True)
                    crops = cut_windows_batched(torch.stack(decoded).permute(0, 2, 3, 1), cut,
                                                self.input.config.crop)
            else:
                crops = item.pixels.to(device, non_blocking=True)
            images = render(crops, windows, item.cmn_mean.to(device, non_blocking=True), *self._norm_tensors)
        if self._squeeze:
            images = images[:, 0]  # (B, 3, c, c)
        return item.which, images, labels

    def _from_slot(self, item: SlotBatch):
        """The batch a worker wrote into a slot: on the CPU the slot itself (finished images;
        the ring replaces a slot the caller still holds when its turn comes), on CUDA copied
        to the device without waiting and rendered there."""
        pixels = self._ring.batch(item.slot, len(item.labels))
        labels = torch.from_numpy(item.labels)
        if self.mode == "render":
            images = pixels
        else:
            device = self.device
            crops = pixels.to(device, non_blocking=True)  # from pinned memory: returns at once
            self._ring.copied(item.slot)  # the slot is written again once this copy completes
            labels = labels.to(device, non_blocking=True)  # pageable: a staged copy, 8 bytes an image
            windows = torch.from_numpy(item.windows).to(device, non_blocking=True)
            if self.mode == "canvas":  # rrc: every window resized in one batched call, then flipped
                boxes = torch.from_numpy(item.boxes).to(device, non_blocking=True)
                crops = flipped(resized_canvases(crops[:, 0], boxes, self.input.config.crop), windows[:, 0, 4])[:, None]
            images = render(crops, windows, torch.from_numpy(item.cmn_mean).to(device, non_blocking=True),
                            *self._norm_tensors)
        if self._squeeze:
            images = images[:, 0]  # (B, 3, c, c)
        return item.which, images, labels

    def _decode_windows(self, item: WorkerBatch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(3, h, w) uint8 images on the device and the batch's windows within them (host):
        whole images from torchvision, or from the BatchDecoder each sample's region where it
        crops them (the windows shifted to its origin)."""
        if self._batch_decoder is None:
            return self._decode_batch(item.pixels, item.index), item.windows
        crop, rrc = self.input.config.crop, self.dataset.rrc
        regions = window_regions(item.windows.numpy(), crop, rrc)
        encoded = [x.numpy() for x in item.pixels]
        decoded = self._batch_decoder.decode(encoded, regions)
        crops = self._batch_decoder.crops_regions
        for i in (i for i, image in enumerate(decoded) if image is None):
            decoded[i] = self._fallback(encoded[i], int(item.index[i]), regions[i] if crops else None)
        if not crops:
            return [x.permute(2, 0, 1) for x in decoded], item.windows
        origin = torch.tensor([(x0, y0) for x0, y0, _, _ in regions], dtype=torch.int64)
        cut = item.windows.clone()
        cut[..., :2] -= origin[:, None, :]
        return [x.permute(2, 0, 1) for x in decoded], cut

    def _fallback(self, data: np.ndarray, sample: int, region) -> torch.Tensor:
        """An image the batch decoder refused, decoded by PIL here (its region, or whole):
        or, where PIL cannot either, mid-grey and counted as a decode failure."""
        self.fallbacks += 1
        samples = self.input.samples
        try:
            image = decode(data.tobytes(), self.input.spec)
        except Exception as exc:  # as ShardBatches._decode
            self.input.report_failures([f"{samples.where(sample)}: {type(exc).__name__}: {exc}"])
            image = np.full((int(samples.heights[sample]), int(samples.widths[sample]), 3), FAILED_PIXEL, np.uint8)
        if region is not None:
            x0, y0, x1, y1 = region
            image = image[y0:y1, x0:x1]
        return torch.from_numpy(image.copy()).to(self.device)  # PIL's arrays are read-only

    def _decode_batch(self, encoded: list[torch.Tensor], index: np.ndarray) -> list[torch.Tensor]:
        """(3, H, W) uint8 images on the device: the batch's JPEGs in one torchvision call."""
        samples = self.input.samples
        try:
            return list(decode_jpeg_batch(encoded, self.device))
        except RuntimeError:  # one bad image fails the call: decode one by one to find it
            images, failures = [], []
            for i, data in enumerate(encoded):
                try:
                    images.extend(decode_jpeg_batch([data], self.device))
                except RuntimeError as exc:
                    sample = int(index[i])
                    failures.append(f"{samples.where(sample)}: {exc}")
                    shape = (3, int(samples.heights[sample]), int(samples.widths[sample]))
                    images.append(torch.full(shape, FAILED_PIXEL, dtype=torch.uint8, device=self.device))
            self.input.report_failures(failures)
            return images

    def close(self) -> None:
        super().close()
        self._iterator = None  # its workers end with it
        self._dl = None
        self.dataset.slots = None
        if self._ring is not None:
            self._ring.close()
