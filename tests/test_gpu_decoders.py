"""The torch backend's batch decoders (gpu_decoders.py) through the real loader path.

nvImageCodec needs a CUDA driver, so on the CPU a stand-in `BatchDecoder` (PIL on CPU
tensors, ROI crops as nvImageCodec's, refusing the images it is told to) is injected where
the backend opens its decoder: everything but the decoder itself is what runs on a GPU.
The one test with nvImageCodec itself is `@pytest.mark.gpu` and skips where it is missing.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from alexprep.imagenet_prep import gpu_decoders, torch_backend
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.loaders import eval_loader, train_loader
from alexprep.imagenet_prep.shards import read_split

# nvImageCodec against PIL on the same shards, in 0-255 levels of the rendered images: JPEG
# decoders differ by IDCT rounding and chroma upsampling. Provisional until gpu_check
# measures it on an H200 (benchmarks/GPU.md: not measured: no GPU).
GPU_MEAN_TOLERANCE, GPU_MAX_TOLERANCE = 1.5, 40.0


class PilStandIn:
    """A BatchDecoder that decodes with PIL on the CPU: each image's region (as nvImageCodec
    with ROI) or the whole image; refuses the images whose bytes are in `refuse`, and any
    that PIL cannot decode (as nvImageCodec answers None)."""

    def __init__(self, crops_regions: bool = True, refuse: tuple[bytes, ...] = ()):
        self.crops_regions = crops_regions
        self.refuse = set(refuse)
        self.calls: list[int] = []  # images per call: one call per batch
        self.refused = 0

    def decode(self, encoded, regions):
        self.calls.append(len(encoded))
        out = []
        for data, (x0, y0, x1, y1) in zip(encoded, regions):
            try:
                if data.tobytes() in self.refuse:
                    raise ValueError("refused")
                image = np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))
            except Exception:
                self.refused += 1
                out.append(None)
                continue
            image = image[y0:y1, x0:x1] if self.crops_regions else image
            out.append(torch.from_numpy(image.copy()))
        return out


def _stand_in(monkeypatch, **kwargs) -> PilStandIn:
    decoder = PilStandIn(**kwargs)
    monkeypatch.setattr(torch_backend, "open_batch_decoder", lambda device: decoder)
    return decoder


def _first_jpeg(out: Path) -> bytes:
    from alexprep.imagenet_prep.samples import SplitSamples

    return bytes(SplitSamples(read_split(out, "train")).view(0))


def run(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("crops_regions", [True, False])
def test_batched_decoder_batches_equal_the_pil_path_and_a_refused_image_falls_back(stats_build, monkeypatch,
                                                                                 crops_regions):
    """One decode call per batch; the refused image decoded by PIL in the main process; the
    batches bit for bit the PIL workers' (train windows cut from regions, eval's 10 crops)."""
    decoder = _stand_in(monkeypatch, crops_regions=crops_regions, refuse=(_first_jpeg(stats_build),))
    for make, batches in ((lambda d: train_loader(stats_build, batch_size=8, device="cpu", seed=4, backend="torch",
                                                  workers=1, decoder=d), 4),
                          (lambda d: eval_loader(stats_build, batch_size=8, device="cpu", crops=10, backend="torch",
                                                 split="train", workers=0, decoder=d), 4)):
        decoder.calls.clear()
        decoder.refused = 0
        with make("nvimgcodec") as batched, make("pil") as per_image:
            from_batched, from_per_image = run(batched), run(per_image)
            assert decoder.calls == [8] * batches and decoder.refused == 1  # sample 0, once an epoch
            assert batched._backend.fallbacks == 1 and batched.decode_failure_count == 0
        assert len(from_batched) == len(from_per_image) == batches
        for (a, la), (b, lb) in zip(from_batched, from_per_image):
            assert torch.equal(la, lb) and torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:recipe='rrc' on")  # a centre-crop build: its windows are what matters
def test_rrc_windows_decoded_as_regions_equal_whole_images(stats_build, monkeypatch):
    """recipe="rrc": each window decoded alone (shifted to the region's origin) resizes to
    the same pixels as the window cut from the whole image."""
    outputs = []
    for crops_regions in (True, False):
        _stand_in(monkeypatch, crops_regions=crops_regions)
        with train_loader(stats_build, batch_size=8, device="cpu", seed=5, backend="torch", workers=0,
                          recipe="rrc", size=96, decoder="nvimgcodec") as loader:
            outputs.append(run(loader))
    assert len(outputs[0]) == 4
    for (a, la), (b, lb) in zip(*outputs):
        assert torch.equal(la, lb) and torch.equal(a, b)


def test_an_image_neither_decoder_can_read_is_grey_and_counted(stats_build, tmp_path, monkeypatch):
    damaged = tmp_path / "damaged"
    shutil.copytree(stats_build, damaged)
    index = read_split(damaged, "train")
    path = index.shard_path(index.shards[0])
    first = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().column("image")[0].as_py()["bytes"]
    data = bytearray(path.read_bytes())
    at = data.index(first)
    data[at:at + 2] = b"\x00\x00"  # no start-of-image marker: neither decoder reads it
    path.write_bytes(bytes(data))
    decoder = _stand_in(monkeypatch)
    with eval_loader(damaged, batch_size=8, device="cpu", split="train", backend="torch", workers=1,
                     decoder="nvimgcodec") as loader:
        batches = run(loader)
        assert sum(len(y) for _, y in batches) == len(loader.samples)  # nothing dropped
        assert decoder.refused == 1 and loader.decode_failure_count == 1
        assert loader.decode_failures[0].startswith(str(damaged / "train" / path.name) + " row 0:")


def test_nvimgcodec_is_asked_for_by_name_and_refused_in_one_line(stats_build, monkeypatch):
    """"auto" stays PIL until gpu_check measured nvImageCodec faster; asked for where it
    cannot run, a one-line DataError says what to do."""
    from alexprep.imagenet_prep.torch_backend import pick_decoder

    assert pick_decoder("auto", "jpeg", "cuda") == "pil"  # MEASURED_FASTER is False: not measured
    monkeypatch.setattr(torch_backend, "MEASURED_FASTER", True)
    monkeypatch.setattr(torch_backend, "have_nvimgcodec", lambda: True)
    assert pick_decoder("auto", "jpeg", "cuda") == "nvimgcodec"
    assert pick_decoder("auto", "jpeg", "cpu") == "pil" and pick_decoder("nvimgcodec", "raw", "cuda") == "pil"
    with pytest.raises(DataError, match=r"decodes on a CUDA device, not cpu; use decoder='pil'"):
        train_loader(stats_build, batch_size=8, device="cpu", seed=0, backend="torch", workers=0,
                     decoder="nvimgcodec")
    if not gpu_decoders.have_nvimgcodec():
        with pytest.raises(DataError, match=r"pip install 'alexprep\[nvimgcodec\]'") as err:
            gpu_decoders.nvimgcodec_module()
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="backends must be some of"):
        gpu_decoders.NvImageCodecDecoder(torch.device("cuda:0"), backends=("tpu",))


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_decoders.have_nvimgcodec(), reason="nvImageCodec is not installed")
def test_nvimgcodec_batches_are_pils_within_the_tolerance(stats_build):
    """On a GPU: nvImageCodec's batches against PIL workers', the same windows and labels."""
    def make(decoder):
        return train_loader(stats_build, batch_size=8, device="cuda:0", seed=4, backend="torch", workers=1,
                            decoder=decoder)

    with make("nvimgcodec") as gpu, make("pil") as pil:
        pairs = list(zip(run(gpu), run(pil)))
        assert gpu._backend.fallbacks == 0 and gpu.decode_failure_count == 0
    assert len(pairs) == 4
    for (a, la), (b, lb) in pairs:
        assert torch.equal(la, lb)
        d = (a.float() - b.float()).abs()
        assert d.mean().item() <= GPU_MEAN_TOLERANCE and d.max().item() <= GPU_MAX_TOLERANCE
