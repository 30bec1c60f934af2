"""The PyTorch twin of the DALI pipeline: the same batches without DALI.

For users without DALI (macOS, odd CUDA set-ups), to check the GPU data path where DALI
does not install, and as the benchmark's baseline. A DataLoader over the shards:

- the sampler (main process) hands each worker a whole `Batch` plan: sample indices and
  the windows and lighting drawn on the host (augment.py), exactly what DALI is fed;
- workers memory-map the shards, decode with PIL (pillow-simd where installed) and cut
  each window (flipped where drawn) as uint8;
- the arithmetic: in the worker, image by image in numpy (`render_one`), when the device
  is the CPU (so it runs in parallel, one thread per worker); batched tensor ops on the
  GPU (`render`) when it is CUDA, after a pinned, non-blocking copy of the uint8 windows.
  (Decoding stays in the workers with PIL: torchvision's GPU `decode_jpeg` is not used.)

Both compute what DALI computes, in the same float32 operations and order:
`((x - mean_image window) - (base - lighting shift)) * (1 / std)`, so given the same draws
the two backends give identical tensors on raw shards (and on JPEG shards when DALI's
libjpeg-turbo and PIL's decode alike, as they do here).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from alexprep.imagenet_prep.forking import frozen_gc
from alexprep.imagenet_prep.transform import decode


def render(crops: torch.Tensor, windows: torch.Tensor, cmn_mean: torch.Tensor, mean_image: torch.Tensor | None,
           inv_std: torch.Tensor) -> torch.Tensor:
    """uint8 windows (B, K, c, c, 3), already cut and flipped, to float32 (B, K, 3, c, c).

    windows (B, K, 3) int64 (offset_x, offset_y, flip): where the mean image's window is.
    cmn_mean (B, 3) float32: base - lighting shift. mean_image (S, S, 3) float32 or None.
    """
    c = crops.shape[2]
    x = crops.to(torch.float32)  # (B, K, c, c, 3)
    if mean_image is not None:
        ar = torch.arange(c, device=crops.device)
        ox, oy, flip = windows.unbind(-1)  # each (B, K)
        rows = oy[..., None] + ar  # (B, K, c)
        cols = torch.where(flip[..., None].bool(), ox[..., None] + (c - 1) - ar, ox[..., None] + ar)
        x = x - mean_image[rows[..., :, None], cols[..., None, :]]  # the window, mirrored with the image
    x = (x - cmn_mean[:, None, None, None, :]) * inv_std
    return x.permute(0, 1, 4, 2, 3).contiguous()  # (B, K, 3, c, c)


def render_one(out: np.ndarray, image: np.ndarray, windows: np.ndarray, cmn_mean: np.ndarray,
               mean_chw: np.ndarray | None, inv_std: np.ndarray | None) -> None:
    """`render` for one (S, S, 3) uint8 image, written into out (K, 3, c, c) float32: the
    same float32 operations in the same order, image by image. In numpy, single-threaded:
    it runs in DataLoader workers (one thread each); a batched gather of the mean windows
    was 6x slower on the CPU, and torch's intra-op threads slow to a crawl on a busy machine.

    mean_chw (3, S, S) float32 or None; inv_std (3,) or None when it is all ones (a
    multiplication by 1 is exact, so skipping it changes no bit).
    """
    c = out.shape[-1]
    chw = image.transpose(2, 0, 1)  # a view
    shift = cmn_mean[:, None, None]
    scale = None if inv_std is None else inv_std[:, None, None]
    for k, (ox, oy, flip) in enumerate(windows):
        x = chw[:, oy:oy + c, ox:ox + c]
        x = x[..., ::-1] if flip else x
        o = out[k]
        if mean_chw is None:
            np.copyto(o, x)  # uint8 -> float32, exact
        else:
            m = mean_chw[:, oy:oy + c, ox:ox + c]
            np.subtract(x, m[..., ::-1] if flip else m, out=o)  # float32(x) - mean, as DALI
        o -= shift
        if scale is not None:
            o *= scale


def cut_windows(image: np.ndarray, windows: np.ndarray, crop: int, out: np.ndarray) -> None:
    """Write each (offset_x, offset_y, flip) window of one (S, S, 3) image into out[k]."""
    for k, (ox, oy, flip) in enumerate(windows):
        window = image[oy:oy + crop, ox:ox + crop]
        out[k] = window[:, ::-1] if flip else window


class ShardBatches(Dataset):
    """dataset[batch] -> the batch's decoded windows; indexed by `Batch` plans, not ints."""

    def __init__(self, samples, crop: int, norm=None):
        self.samples = samples  # SplitSamples; dropped when pickled, re-opened in the worker
        self.index = samples.index
        self.spec = samples.index.spec
        self.crop = crop
        self.norm = norm  # Normalisation: render here (CPU device); None: return uint8
        self._norm_arrays = None

    def __getstate__(self):  # spawn/forkserver: ship paths, not memory maps
        state = dict(self.__dict__)
        state["samples"] = None
        state["_norm_arrays"] = None
        return state

    def _samples(self):
        if self.samples is None:
            from alexprep.imagenet_prep.loaders import SplitSamples

            self.samples = SplitSamples(self.index)
        return self.samples

    def __len__(self) -> int:
        return len(self._samples())

    def __getitem__(self, batch):
        samples = self._samples()
        b, k, c = len(batch), batch.windows.shape[1], self.crop
        labels = torch.from_numpy(np.array(batch.labels, np.int64))
        cmn_mean = torch.from_numpy(np.array(batch.cmn_mean, np.float32))
        # Allocated in shared memory in a worker, so that handing the batch to the main
        # process does not copy it once more.
        shared = get_worker_info() is not None
        if self.norm is not None:  # CPU device: finished here, in parallel across workers
            if self._norm_arrays is None:
                norm = self.norm
                mean_chw = (None if norm.mean_image is None
                            else np.ascontiguousarray(norm.mean_image.transpose(2, 0, 1)))
                self._norm_arrays = mean_chw, None if bool((norm.inv_std == 1).all()) else norm.inv_std
            out = torch.empty((b, k, 3, c, c), dtype=torch.float32)
            out = out.share_memory_() if shared else out
            cmn = np.asarray(batch.cmn_mean, np.float32)
            for i, sample in enumerate(batch.index):
                image = decode(samples.view(sample), self.spec)
                render_one(out[i].numpy(), image, batch.windows[i], cmn[i], *self._norm_arrays)
            return out, labels, None, None, (batch.epoch, batch.number)
        crops = torch.empty((b, k, c, c, 3), dtype=torch.uint8)
        crops = crops.share_memory_() if shared else crops
        for i, sample in enumerate(batch.index):
            cut_windows(decode(samples.view(sample), self.spec), batch.windows[i], c, crops[i].numpy())
        windows = torch.from_numpy(np.array(batch.windows, np.int64))
        return crops, labels, windows, cmn_mean, (batch.epoch, batch.number)


def norm_tensors(norm, device) -> tuple[torch.Tensor | None, torch.Tensor]:
    mean = None if norm.mean_image is None else torch.from_numpy(norm.mean_image).to(device)
    return mean, torch.from_numpy(norm.inv_std).to(device)


class _FeedSampler(Sampler):
    """Yields the Batch plans of the current feed (loaders.endless_batches): set before
    each `iter(DataLoader)`."""

    def __init__(self):
        self.feed = iter(())

    def __iter__(self):
        return self.feed


def _as_is(item):
    return item


class TorchBackend:
    """Runs a Loader's epoch plans through a DataLoader with persistent workers, fed one
    endless stream of batches so that the workers run on across epoch boundaries."""

    def __init__(self, loader):
        self.loader = loader
        config = loader.config
        self.gpu = loader.device.type == "cuda"
        workers = config.threads
        self.dataset = ShardBatches(loader.samples, config.crop, norm=None if self.gpu else loader.norm)
        self._sampler = _FeedSampler()
        self._dl = DataLoader(self.dataset, batch_size=None, sampler=self._sampler, num_workers=workers,
                              collate_fn=_as_is, pin_memory=self.gpu, persistent_workers=workers > 0,
                              prefetch_factor=config.prefetch if workers > 0 else None)
        self._norm_tensors = norm_tensors(loader.norm, loader.device) if self.gpu else None
        self._iterator = None
        self._next = None  # (epoch, batch) the next item of the iterator is
        self._generation = 0

    def run(self, plan, start: int):
        from alexprep.imagenet_prep.loaders import endless_batches, stream_position

        position = stream_position(plan, start)
        if self._iterator is None or self._next != position:
            # A new stream; with persistent workers, iter() resets them and drops what the
            # previous stream had prefetched.
            self._sampler.feed = endless_batches(self.loader, *position)
            with frozen_gc():  # forks the workers: see forking.py
                self._iterator = iter(self._dl)
            self._next = position
        self._generation += 1
        return self._iterate(self._generation, plan.epoch, range(start, len(plan)))

    def _iterate(self, generation: int, epoch: int, numbers):
        from alexprep.imagenet_prep.loaders import torch_dtype

        dtype = self.loader.config.dtype
        device = self.loader.device
        squeeze = self.loader.config.train or self.loader.config.crops == 1
        last = len(numbers) and numbers[-1]
        for number in numbers:
            if generation != self._generation:
                raise RuntimeError("this iterator was superseded: the loader has started another epoch since")
            images, labels, windows, cmn_mean, which = next(self._iterator)
            if which != (epoch, number):  # a bug, never the user's doing
                raise RuntimeError(f"DataLoader returned batch {which[1]} of epoch {which[0]}, "
                                   f"expected {number} of {epoch}")
            self._next = (epoch, number + 1) if number != last else (epoch + 1, 0)
            if self.gpu:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                images = render(images, windows.to(device, non_blocking=True), cmn_mean.to(device, non_blocking=True),
                                *self._norm_tensors)
            if squeeze:
                images = images[:, 0]  # (B, 3, c, c)
            if dtype != "float32":
                images = images.to(torch_dtype(dtype))
            yield images, labels

    def close(self) -> None:
        self._iterator = None
        self._dl = None
