"""The loaders' DALI backend: shards in memory, batches of augmented images out, on the
CPU or the GPU.

The per-image graph is written once (`image_graph`); the device is a parameter:
- "cpu": `device_id=None`, DALI's CPU operators only (libjpeg-turbo decoding), so it runs
  on machines without a GPU;
- "cuda:N": `device_id=N`, nvJPEG decoding (`device="mixed"`: the hardware JPEG decoder
  where the GPU has one, `decoder_args`) and GPU operators.

DALI has no Arrow reader, so `fn.external_source` feeds it: each batch is a list of numpy
views of the memory-mapped shards' binary buffers (`no_copy=True`: DALI reads the page
cache directly), plus the per-sample crop positions, flips and lighting drawn on the host
(augment.py), so that DALI's own random operators play no part. How the crop positions
are made exact is in augment.crop_position.

On the CPU DALI only decodes and the host renders the batch (`render.render_into`, C++
on as many threads as torch's: the crop, flip, mean image, lighting and 1/std in one pass, into a
ring of output batches made once): DALI's CPU arithmetic and crop_mirror_normalize
operators took longer than its decoder (benchmarks/README.md, "Where the time goes").
Where the renderer cannot be built, and on the GPU, DALI's operators do it all.

recipe="rrc": each window (x, y, w, h) is fed in absolute pixels and decoded alone
(`decoders.image_slice`: libjpeg-turbo's partial decoding; `fn.slice` for raw shards, fed
as HWC views). On the CPU the host resizes it with PIL (`resized_crop.resize_window`, on
the loader's threads: DALI's CPU `fn.resize` took longer than its decoder), as the torch
backend does, and renders it; DALI's operators (`rrc_graph`) resize with DALI's
antialiased linear filter (`fn.resize`), which differs from PIL's bilinear by at most a
couple of levels (docs/design.md, "Loaders").
"""
from __future__ import annotations

import collections
import concurrent.futures

import numpy as np
import torch

from alexprep.imagenet_prep import augment, render
from alexprep.imagenet_prep.batch_slots import BatchSlots
from alexprep.imagenet_prep.batches import BackendInput, BatchStream
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.resized_crop import resize_window
from alexprep.imagenet_prep.transform import decode

# Decode only the crop window in training (DALI's decoders.image_crop: libjpeg-turbo's
# partial decoding on CPU, nvJPEG ROI on GPU), where DALI's operators render (the GPU, or
# the CPU without the C++ renderer)? The same pixels (checked in the tests), but no faster
# with those operators on 256x256 q95 JPEGs on 2 CPU cores (the window is 77% of the
# image), so off by default. Not yet measured on a GPU (loader_throughput's
# "dali-arrow-roi-decode" contender there).
ROI_DECODE = False
# The share of each batch's JPEGs the GPU's hardware decoder takes ("mixed" decoders, on
# A100/H100-class GPUs; the rest go to nvJPEG's hybrid CPU + CUDA path). DALI's documented
# default, stated here because it moved between releases (0.65 in the legacy decoder, 0.9 in
# the first nvImageCodec-based ones, 0.65 again since NVIDIA/DALI#6366) and the docs say the
# best share depends on the pipeline's threads and is found by measuring: not measured here
# (no GPU with DALI yet), so the default.
HW_DECODER_LOAD = 0.65
# On the CPU, render on the host (render.render_into) rather than with DALI's operators,
# where the C++ renderer builds. Read when a pipeline is built; the benchmarks turn it off
# to compare.
HOST_RENDER = True
# With HOST_RENDER, decode only each training crop window (decoders.image_slice). Read when
# a pipeline is built; the benchmarks turn it off to compare.
WINDOW_DECODE = True


def decoder_args(gpu: bool, max_shape: tuple[int, int] | None) -> dict:
    """The keyword arguments of every DALI image decoder here: "cpu" (libjpeg-turbo), or on
    a GPU "mixed" with the hardware decoder's share and its buffers preallocated for the
    split's largest image (DALI's preallocate_*_hint: no reallocation in the first batches)."""
    if not gpu:
        return {"device": "cpu"}
    args = {"device": "mixed", "hw_decoder_load": HW_DECODER_LOAD}
    if max_shape:
        args.update(preallocate_height_hint=int(max_shape[0]), preallocate_width_hint=int(max_shape[1]))
    return args


def require_dali():
    """Import DALI, or say why not and what to use instead."""
    try:
        import nvidia.dali
    except ImportError as exc:
        raise DataError(f"backend='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda120; Linux only), which "
                        f"does not import here ({exc}): use backend='torch'") from None
    return nvidia.dali


def image_graph(data, *, encoding: str, size: int, crop: int, gpu: bool, mean_image, windows, cmn_mean, std,
                roi: bool, max_shape: tuple[int, int] | None = None):
    """The per-image operators, shared by training and evaluation.

    data: encoded images (JPEG bytes, or raw HWC uint8). mean_image: (S, S, 3) float32 or
    None. windows: a list of (crop_pos_x, crop_pos_y, mirror), per-sample DataNodes or
    constants; more than one gives (K, 3, crop, crop) per sample. cmn_mean: per-sample
    (3,) DataNode or a constant list; std: a list of 3. max_shape: the split's largest
    (height, width), for the GPU decoder's buffers (`decoder_args`).
    """
    from nvidia.dali import fn, types

    device = "gpu" if gpu else "cpu"
    decoding = decoder_args(gpu, max_shape)  # "mixed": the CPU parses headers, the GPU decodes
    mean = None
    if mean_image is not None:
        # A constant, so that it is copied to the device once, not fed with every batch.
        mean = fn.constant(fdata=mean_image.ravel().tolist(), shape=list(mean_image.shape), layout="HWC",
                           dtype=types.FLOAT, device=device)
    cmn = dict(mean=cmn_mean, std=std, dtype=types.FLOAT, output_layout="CHW")

    if encoding == "jpeg" and roi and len(windows) == 1:
        pos_x, pos_y, mirror = windows[0]
        image = fn.decoders.image_crop(data, output_type=types.RGB, crop=(crop, crop), crop_pos_x=pos_x,
                                       crop_pos_y=pos_y, **decoding)
        if mean is not None:
            window = fn.crop(mean, crop=(crop, crop), crop_pos_x=pos_x, crop_pos_y=pos_y)
            image = image - window
        return fn.crop_mirror_normalize(image, mirror=mirror, **cmn)

    if encoding == "raw":
        image = fn.reshape(data.gpu() if gpu else data, shape=[size, size, 3], layout="HWC")
    else:
        image = fn.decoders.image(data, output_type=types.RGB, **decoding)
    if mean is not None:
        image = image - mean  # uint8 - float32 is float32(x) - mean: no cast operator (a pass less)
    outs = [fn.crop_mirror_normalize(image, crop=(crop, crop), crop_pos_x=pos_x, crop_pos_y=pos_y, mirror=mirror,
                                     **cmn)
            for pos_x, pos_y, mirror in windows]
    return outs[0] if len(outs) == 1 else fn.stack(*outs, axis=0)


def rrc_graph(data, *, encoding: str, size: int, gpu: bool, anchor, shape, mirror, cmn_mean, std,
              max_shape: tuple[int, int] | None = None):
    """recipe="rrc": window (anchor (x, y), shape (w, h), absolute pixels) of each image,
    resized to size x size, mirrored where drawn, normalised to (3, size, size) float."""
    from nvidia.dali import fn, types

    where = dict(axis_names="WH", normalized_anchor=False, normalized_shape=False)
    if encoding == "raw":  # HWC views of the shards
        image = fn.slice(data.gpu() if gpu else data, anchor, shape, **where)
    else:
        image = fn.decoders.image_slice(data, anchor, shape, output_type=types.RGB, **where,
                                        **decoder_args(gpu, max_shape))
    image = fn.resize(image, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop_mirror_normalize(image, mirror=mirror, mean=cmn_mean, std=std, dtype=types.FLOAT,
                                    output_layout="CHW")


def decoded_graph(data, *, encoding: str, size: int, max_shape: tuple[int, int] | None = None):
    """The host-rendering paper graph: each image decoded (or a raw one reshaped) to
    (size, size, 3) uint8, the rest done by render.render_into."""
    from nvidia.dali import fn, types

    if encoding == "raw":
        return fn.reshape(data, shape=[size, size, 3], layout="HWC")
    return fn.decoders.image(data, output_type=types.RGB, **decoder_args(False, max_shape))


def window_graph(data, *, encoding: str, anchor, shape, max_shape: tuple[int, int] | None = None):
    """The host-rendering rrc graph: each window alone, decoded (libjpeg-turbo's partial
    decoding) or cut from a raw image; the host resizes it (resized_crop.resize_window, PIL:
    DALI's CPU resize took longer than decoding) and renders it."""
    from nvidia.dali import fn, types

    where = dict(axis_names="WH", normalized_anchor=False, normalized_shape=False)
    if encoding == "raw":
        return fn.slice(data, anchor, shape, **where)
    return fn.decoders.image_slice(data, anchor, shape, output_type=types.RGB, **where,
                                   **decoder_args(False, max_shape))


class DaliBackend(BatchStream):
    """One DALI pipeline, built once, fed one endless stream of batch plans."""

    def __init__(self, source: BackendInput):
        super().__init__(source)
        dali = require_dali()
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.tensors import TensorCPU

        config = source.config
        self._tensor_cpu = TensorCPU
        self.gpu = source.device.type == "cuda"
        self._feed = None  # the stream of Batch plans; None ends it
        # What was fed and not yet consumed, in order: (batch, inputs). no_copy: DALI reads
        # the inputs' memory until that iteration's outputs are out, so they live here.
        self._inflight: collections.deque = collections.deque()
        self.pipe = Pipeline(batch_size=config.batch_size, num_threads=max(1, config.threads),
                             device_id=source.device.index if self.gpu else None,
                             prefetch_queue_depth=config.prefetch, seed=0)
        self._rrc = config.recipe == "rrc"
        # The host renders (module docstring): into a ring of batches, 3 deep (the caller's,
        # the one before it, the next); a batch the caller still holds is left to it.
        self._host = not self.gpu and HOST_RENDER and render.kernel() is not None
        # Training on JPEGs: DALI decodes only each crop window (libjpeg-turbo's partial
        # decoding, the same pixels as the whole image's; 13% more images/s decoded here),
        # and the host reads the mean image where the window was.
        self._windowed = (self._host and WINDOW_DECODE and config.train and not self._rrc
                          and source.spec.encoding == "jpeg")
        if self._host:
            crops = 1 if config.train or self._rrc else len(source.eval_windows)
            self._ring = BatchSlots(3, (config.batch_size, crops, 3, config.crop, config.crop), torch.float32,
                                    source.device, shared=False)
            self._norm_arrays = render.cpu_norm_arrays(source.norm)
            if self._rrc:  # the resized windows, before rendering; resized on the loader's threads
                self._resized = np.empty((config.batch_size, config.crop, config.crop, 3), np.uint8)
                self._resizers = concurrent.futures.ThreadPoolExecutor(max(1, config.threads))
        with self.pipe:
            self.pipe.set_outputs(self._rrc_graph() if self._rrc else self._paper_graph())
        self.pipe.build()
        self.dali_version = dali.__version__
        # DALI's dynamic executor (1.36 and later) hands out buffers it owns until they are
        # released, which torch can share; older releases lack the attribute.
        self._shares_buffers = bool(getattr(self.pipe, "exec_dynamic", False))

    def _paper_graph(self):
        """The paper's crops: positions, flips and lighting fed in training, constants in
        evaluation."""
        from nvidia.dali import fn, types

        source, config = self.input, self.input.config
        norm, positions = source.norm, source.positions
        if self._windowed:  # training on JPEGs: each crop window decoded alone
            data, anchor, shape = fn.external_source(source=self._source, num_outputs=3, batch=True,
                                                     batch_info=True, no_copy=True,
                                                     dtype=[types.UINT8, types.FLOAT, types.FLOAT])
            return window_graph(data, encoding="jpeg", anchor=anchor, shape=shape, max_shape=self._max_shape())
        if self._host:
            (data,) = fn.external_source(source=self._source, num_outputs=1, batch=True, batch_info=True,
                                         no_copy=True, dtype=[types.UINT8])
            return decoded_graph(data, encoding=source.spec.encoding, size=source.spec.size,
                                 max_shape=self._max_shape())
        if config.train:
            data, pos_x, pos_y, mirror, cmn_mean = fn.external_source(
                source=self._source, num_outputs=5, batch=True, batch_info=True, no_copy=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT])
            windows = [(pos_x, pos_y, mirror)]
        else:
            (data,) = fn.external_source(source=self._source, num_outputs=1, batch=True, batch_info=True,
                                         no_copy=True, dtype=[types.UINT8])
            fixed = source.eval_windows  # the same windows for every image: constants
            pos = augment.crop_position(fixed[:, :2], positions)
            windows = [(float(x), float(y), int(flip)) for (x, y), flip in zip(pos, fixed[:, 2])]
            cmn_mean = [float(v) for v in norm.base]
        return image_graph(data, encoding=source.spec.encoding, size=source.spec.size, crop=config.crop,
                           gpu=self.gpu, mean_image=norm.mean_image, windows=windows, cmn_mean=cmn_mean,
                           std=[float(v) for v in norm.std], roi=ROI_DECODE, max_shape=self._max_shape())

    def _rrc_graph(self):
        """recipe="rrc": every sample's window, flip and mean fed, in training and evaluation."""
        from nvidia.dali import fn, types

        encoding = self.input.spec.encoding
        if self._host:
            data, anchor, shape = fn.external_source(
                source=self._source, num_outputs=3, batch=True, batch_info=True, no_copy=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT], layout=["HWC" if encoding == "raw" else "", "", ""])
            return window_graph(data, encoding=encoding, anchor=anchor, shape=shape, max_shape=self._max_shape())
        data, anchor, shape, mirror, cmn_mean = fn.external_source(
            source=self._source, num_outputs=5, batch=True, batch_info=True, no_copy=True,
            dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT],
            layout=["HWC" if encoding == "raw" else "", "", "", "", ""])
        return rrc_graph(data, encoding=encoding, size=self.input.config.crop, gpu=self.gpu, anchor=anchor,
                         shape=shape, mirror=mirror, cmn_mean=cmn_mean,
                         std=[float(v) for v in self.input.norm.std], max_shape=self._max_shape())

    def _max_shape(self) -> tuple[int, int]:
        """The split's largest image (height, width): what the GPU decoder preallocates for."""
        samples = self.input.samples
        return int(samples.heights.max()), int(samples.widths.max())

    # -- feeding
    def _rrc_inputs(self, batch) -> tuple:
        """recipe="rrc": images (raw ones as HWC views), anchors (x, y), shapes (w, h),
        flips and means, per sample."""
        samples, tensor = self.input.samples, self._tensor_cpu
        views = samples.views(batch.index)
        if self.input.spec.encoding == "raw":
            sizes = zip(samples.heights[batch.index].tolist(), samples.widths[batch.index].tolist())
            views = [v.reshape(h, w, 3) for v, (h, w) in zip(views, sizes)]
        w = batch.windows[:, 0, :]
        inputs = ([tensor(v) for v in views], np.ascontiguousarray(w[:, 0:2], np.float32),
                  np.ascontiguousarray(w[:, 2:4], np.float32))
        if self._host:
            return inputs
        return inputs + (w[:, 4].astype(np.int32), np.ascontiguousarray(batch.cmn_mean, np.float32))

    def _source(self, info):
        if self._feed is None:
            raise StopIteration
        batch = next(self._feed)
        # Each image as a DALI TensorCPU over its view of the memory map (no copy): DALI's
        # feed then skips its per-sample checks of numpy arrays (about half its Python
        # time per batch); the views live in _inflight until the batch is out.
        # (The memory maps themselves stay open with the loader's SplitSamples.)
        tensor = self._tensor_cpu
        if self._rrc:
            inputs = self._rrc_inputs(batch)
            self._inflight.append((batch, inputs))
            return inputs
        inputs = ([tensor(v) for v in self.input.samples.views(batch.index)],)
        if self._windowed:
            crop = self.input.config.crop
            inputs += (np.ascontiguousarray(batch.windows[:, 0, :2], np.float32),
                       np.full((len(batch), 2), crop, np.float32))
        elif self.input.config.train and not self._host:
            w = batch.windows[:, 0, :]
            positions = self.input.positions
            inputs += (augment.crop_position(w[:, 0], positions), augment.crop_position(w[:, 1], positions),
                       w[:, 2].astype(np.int32), np.ascontiguousarray(batch.cmn_mean, np.float32))
        self._inflight.append((batch, inputs))
        return inputs

    def _restart(self, feed) -> None:
        """End the stream in flight (the source stops, what DALI prefetched is consumed and
        dropped, the pipeline is reset), then start on `feed`."""
        if self._next is not None:
            self._feed = None
            for _ in range(self.input.config.prefetch + 2):
                try:
                    self.pipe.run()
                except StopIteration:
                    break
            else:
                raise RuntimeError("DALI pipeline did not stop when its source did")
            self.pipe.reset()
            self._inflight.clear()
        self._feed = feed

    def _produce(self):
        try:
            (out,) = self.pipe.run()
        except StopIteration:
            raise RuntimeError("DALI pipeline ended before its epoch did") from None
        except RuntimeError as exc:  # DALI fails the whole batch when one image does not decode
            raise self._decode_error(exc) from None
        batch, _ = self._inflight.popleft()
        labels = torch.from_numpy(np.ascontiguousarray(batch.labels))
        if self.gpu:
            labels = labels.to(self.input.device, non_blocking=True)
        images = self._rendered(out, batch) if self._host else self._to_torch(out)
        return (batch.epoch, batch.number), images, labels

    def _rendered(self, out, batch) -> torch.Tensor:
        """The host's rendering of DALI's uint8 (B, H, W, 3) output into the ring's next batch."""
        n = len(batch.labels)
        pixels = self._resize(out, n) if self._rrc else self._dense(out)
        mean_at = None
        number, _ = self._ring.take()
        images = self._ring.batch(number, n)
        config, source = self.input.config, self.input
        if self._rrc:  # the windows are cut and resized: only each one's flip is left
            windows = np.zeros((n, 1, 3), np.int64)
            windows[:, 0, 2] = batch.windows[:, 0, 4]
            cmn = batch.cmn_mean
        elif self._windowed:  # the windows are cut: their flips here, their offsets for the mean image
            windows = np.zeros((n, 1, 3), np.int64)
            windows[:, 0, 2] = batch.windows[:, 0, 2]
            cmn = batch.cmn_mean
            mean_at = np.ascontiguousarray(batch.windows[:, :, :2], np.int64)
        elif config.train:
            windows, cmn = batch.windows, batch.cmn_mean
        else:  # evaluation's fixed windows and no lighting, for every image
            windows = np.broadcast_to(source.eval_windows, (n, *source.eval_windows.shape))
            cmn = np.broadcast_to(source.norm.base, (n, 3))
        render.render_into(images.numpy(), pixels, np.ascontiguousarray(windows, np.int64),
                           np.ascontiguousarray(cmn, np.float32), *self._norm_arrays, mean_at)
        return images if images.shape[1] > 1 else images[:, 0]

    def _decode_error(self, exc: Exception) -> Exception:
        """A DataError naming the samples of the failed batch that do not decode (DALI does
        not say which), or the original error if they all do."""
        if not self._inflight:
            return exc
        batch, _ = self._inflight[0]
        samples, spec = self.input.samples, self.input.spec
        bad = []
        for i in batch.index:
            try:
                decode(samples.view(i), spec)
            except Exception as why:
                bad.append(f"{samples.where(int(i))} ({why})")
        if not bad:
            return exc
        return DataError(f"{len(bad)} image(s) do not decode: {'; '.join(bad[:5])}. The shards changed after "
                         f"their build: run `alexprep verify {self.input.root}`, rebuild them, or use "
                         f"backend='torch', which feeds such images as grey and counts them")

    def _dense(self, tensor_list) -> np.ndarray:
        """DALI's uint8 (B, H, W, 3) output as numpy, shared where DALI lends its buffer."""
        dense = tensor_list.as_tensor()
        return torch.from_dlpack(dense).numpy() if self._shares_buffers else np.asarray(dense)

    def _resize(self, tensor_list, n: int) -> np.ndarray:
        """rrc: each decoded window resized to (crop, crop, 3) (PIL releases the GIL while it
        resizes: the loader's threads share the batch)."""
        size, out = self.input.config.crop, self._resized

        def one(i: int) -> None:
            out[i] = resize_window(np.asarray(tensor_list[i]), size)

        list(self._resizers.map(one, range(n)))
        return out[:n]

    def _to_torch(self, tensor_list) -> torch.Tensor:
        dense = tensor_list.as_tensor()
        if not self.gpu and self._shares_buffers:
            # Share DALI's host buffer (DLPack) rather than copy 38 MB per batch of 64, which
            # here took longer than decoding it. run() returned after the batch was complete.
            return torch.from_dlpack(dense)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        # On the GPU, DALI's documented hand-over: a device copy ordered on torch's current
        # stream after DALI's work (feed_ndarray makes it wait for DALI's stream), so torch
        # never reads a buffer DALI is still writing; the copy costs microseconds there.
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.input.device)
        stream = torch.cuda.current_stream(self.input.device) if self.gpu else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return out

    def close(self) -> None:
        super().close()
        self._feed = None
        self._inflight.clear()
        self.pipe = None
        if self._host:
            self._ring.close()
            if self._rrc:
                self._resizers.shutdown()
