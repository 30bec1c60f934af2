"""Batch JPEG decoders for the torch backend's "bytes" mode: the workers hand over each
image's encoded bytes, the main process decodes the batch in one call on the device.

`BatchDecoder` is the interface (what the backend calls); `NvImageCodecDecoder` is
NVIDIA's nvImageCodec behind it (`pip install 'alexprep[nvimgcodec]'`), decoding with the
GPU's hardware JPEG decoders (A100, H100/H200) or its CUDA cores, and only each sample's
region where the library can. nvImageCodec is imported lazily: it needs a CUDA driver even
to be useful, and most machines that run alexprep have none.

An image the decoder refuses comes back as None, not as an exception: the backend decodes
that one with PIL (torch_backend.py), so one bad image is one sample, not the batch.
"""
from __future__ import annotations

import importlib
from typing import Protocol, Sequence

import torch

from alexprep.imagenet_prep.errors import DataError

INSTALL = "pip install 'alexprep[nvimgcodec]'"
# Whether gpu_check measured nvImageCodec faster than PIL workers on the GPU machine
# (benchmarks/GPU.md): until it has, decoder="auto" stays PIL. Not measured: no GPU yet.
MEASURED_FASTER = False
# nvImageCodec's backend kinds by our names: "hw" the hardware JPEG decoder (falls back to
# "cuda" for images it cannot take, e.g. progressive JPEGs), "cuda" nvJPEG on CUDA cores.
BACKENDS = {"hw": "HW_GPU_ONLY", "cuda": "GPU_ONLY", "hybrid": "HYBRID_CPU_GPU"}

Region = tuple[int, int, int, int]  # (x0, y0, x1, y1) in the stored image, x1 and y1 excluded


class BatchDecoder(Protocol):
    """Decodes a batch of encoded images to (h, w, 3) uint8 RGB tensors on its device.

    `decode(encoded, regions)`: encoded is a list of 1-d uint8 arrays (bytes-like), regions
    the (x0, y0, x1, y1) part of each image the caller needs. If `crops_regions` is true the
    i-th result is exactly that region, else the whole image. A result of None: that image
    was refused (the caller decodes it another way). The results are ready for work queued
    after the call on the device's current stream."""

    crops_regions: bool

    def decode(self, encoded: Sequence, regions: Sequence[Region]) -> list[torch.Tensor | None]: ...


def nvimgcodec_module():
    """nvidia.nvimgcodec, or a one-line DataError saying how to install it."""
    try:
        return importlib.import_module("nvidia.nvimgcodec")
    except Exception as exc:  # ImportError, or a wheel for another CUDA failing to load its library
        raise DataError(f"decoder='nvimgcodec' needs NVIDIA nvImageCodec ({INSTALL}; "
                        f"{type(exc).__name__}: {exc}); or use decoder='pil'") from None


def have_nvimgcodec() -> bool:
    try:
        nvimgcodec_module()
    except DataError:
        return False
    return True


class NvImageCodecDecoder:
    """BatchDecoder over nvImageCodec: one `Decoder.decode` call per batch on the device's
    current stream, each image's region only (ROI decoding) where the installed version has it.

    roi=False decodes whole images; fancy_upsampling=False takes nvJPEG's default chroma
    upsampling instead of libjpeg-turbo's (PIL's): gpu_check measures both against PIL, in
    case the hardware decoder refuses one of them (refused images show as `fallbacks`)."""

    def __init__(self, device: torch.device, backends: Sequence[str] = ("hw", "cuda"), roi: bool = True,
                 fancy_upsampling: bool = True):
        if device.type != "cuda":
            raise DataError(f"decoder='nvimgcodec' decodes on a CUDA device, not {device}; use decoder='pil'")
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown or not backends:
            raise DataError(f"nvImageCodec backends must be some of {tuple(BACKENDS)}, not {tuple(backends)}")
        nv = self._nv = nvimgcodec_module()
        self.device = device
        self.backends = tuple(backends)
        index = torch.cuda.current_device() if device.index is None else device.index
        self._decoder = nv.Decoder(device_id=index, backends=[nv.Backend(getattr(nv.BackendKind, BACKENDS[b]))
                                                              for b in backends],
                                   options=":fancy_upsampling=1" if fancy_upsampling else "")
        self._params = nv.DecodeParams(color_spec=nv.ColorSpec.RGB, allow_any_depth=False,
                                       apply_exif_orientation=False)  # as PIL and DALI: EXIF ignored
        # ROI: CodeStream.get_sub_code_stream(region=...) (0.4 and later; DecodeSource(stream,
        # region) where a release has only that). Without either: whole images.
        self.crops_regions = roi and hasattr(nv, "Region") and (hasattr(nv.CodeStream, "get_sub_code_stream")
                                                                or hasattr(nv, "DecodeSource"))

    def _source(self, data, region: Region):
        nv = self._nv
        if not self.crops_regions:
            return nv.CodeStream(data)
        x0, y0, x1, y1 = region
        roi = nv.Region(start=(y0, x0), end=(y1, x1))  # (row, column) order
        if hasattr(nv.CodeStream, "get_sub_code_stream"):
            return nv.CodeStream(data).get_sub_code_stream(region=roi)
        return nv.DecodeSource(nv.CodeStream(data), roi)

    def decode(self, encoded: Sequence, regions: Sequence[Region]) -> list[torch.Tensor | None]:
        sources, refused = [], set()
        for i, (data, region) in enumerate(zip(encoded, regions)):
            try:
                sources.append(self._source(data, region))
            except Exception:  # a header nvImageCodec cannot parse: PIL's turn
                sources.append(None)
                refused.add(i)
        todo = [s for s in sources if s is not None]
        stream = torch.cuda.current_stream(self.device)
        try:
            images = iter(self._decoder.decode(todo, params=self._params, cuda_stream=stream.cuda_stream))
        except Exception:  # the whole call failed: every image goes to the fallback
            return [None] * len(sources)
        out: list[torch.Tensor | None] = []
        for i in range(len(sources)):
            image = None if i in refused else next(images)
            # the image's memory is nvImageCodec's, kept alive by the tensor; written on `stream`
            out.append(None if image is None else torch.as_tensor(image, device=self.device))
        return out
