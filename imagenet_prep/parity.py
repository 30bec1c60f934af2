"""`alexprep parity`: the same samples through every backend available here and through a
plain PIL + numpy rendering of the recipe written for this report, compared operation by
operation (docs/design.md, "Replay, fingerprints, parity").

Each operation's row compares the outputs after it (so a row carries the differences of
those before it): decode (the decoders alone, whole images), crop or resize (the window,
for the samples not flipped), flip (the flipped ones), mean (the recipe's normalisation),
lighting (PCA lighting, sigma 0.1 in both recipes). Differences are in 0-255 levels.
The backends take the training loader's draws of batch 0 of an epoch; the reference
takes the same draws (they are the plan, not the pixels) and does its own arithmetic, in
float64.
"""
from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
import torch
from PIL import Image

from alexprep.imagenet_prep.augment import CROP
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.loaders import pick_backend, train_loader
from alexprep.imagenet_prep.normalization import resolve_stats
from alexprep.imagenet_prep.samples import SplitSamples
from alexprep.imagenet_prep.shards import read_split
from alexprep.imagenet_prep.transform import decode

LIGHTING = 0.1  # the paper's sigma, for the lighting rows of both recipes (rrc's default is off)


def available_backends() -> dict[str, dict]:
    """{name: train_loader options} for each backend this machine runs: torch and DALI on
    the CPU, and on the GPU where there is one."""
    found = {"torch": dict(backend="torch", device="cpu")}
    dali = pick_backend("auto") == "dali"
    if dali:
        found["dali"] = dict(backend="dali", device="cpu")
    if torch.cuda.is_available():
        found["torch-cuda"] = dict(backend="torch", device="cuda:0")
        if dali:
            found["dali-cuda"] = dict(backend="dali", device="cuda:0")
    return found


# ---------------------------------------------------------------------------- the reference
def reference_decode(data, spec, shape) -> np.ndarray:
    """(H, W, 3) uint8: PIL's RGB decode of a JPEG, or the raw bytes as they are stored."""
    if spec.encoding == "raw":
        return np.frombuffer(bytes(data), np.uint8).reshape(shape[0], shape[1], 3)
    with Image.open(io.BytesIO(bytes(data))) as img:
        return np.asarray(img.convert("RGB"))


def reference_window(image: np.ndarray, window, crop: int, rrc: bool) -> np.ndarray:
    """(crop, crop, 3) float64 of one window, flipped where drawn: the paper's crop by
    slicing, or rrc's box cut then resized bilinear by PIL (torchvision's resized_crop of a
    PIL image)."""
    if rrc:
        x, y, w, h, flip = (int(v) for v in window)
        pixels = np.asarray(Image.fromarray(image).crop((x, y, x + w, y + h)).resize((crop, crop),
                                                                                     Image.Resampling.BILINEAR))
    else:
        x, y, flip = (int(v) for v in window)
        pixels = image[y:y + crop, x:x + crop]
    pixels = pixels.astype(np.float64)
    return pixels[:, ::-1] if flip else pixels


def reference_render(images, batch, crop: int, stats, stage: str, recipe: str) -> np.ndarray:
    """(B, 3, crop, crop) float64: the recipe up to `stage` ("window", "mean", "lighting")."""
    out = []
    for image, window, alpha in zip(images, batch.windows[:, 0], batch.draws.alpha):
        x = reference_window(image, window, crop, recipe == "rrc")
        if stage != "window":
            if recipe == "paper":
                ox, oy, flip = (int(v) for v in window)
                mean = np.asarray(stats.mean_image, np.float64)[oy:oy + crop, ox:ox + crop]
                x = x - (mean[:, ::-1] if flip else mean)
            else:
                x = (x - stats.channel_mean) / stats.channel_std
            if stage == "lighting":
                shift = stats.eigvecs @ (np.asarray(alpha, np.float64) * np.sqrt(np.clip(stats.eigvals, 0, None)))
                x = x + (shift if recipe == "paper" else shift / stats.channel_std)
        out.append(x.transpose(2, 0, 1))
    return np.stack(out)


# ---------------------------------------------------------------------------- the backends
def dali_decode(datas, device: str) -> list[np.ndarray]:
    """DALI's decoder alone (host libjpeg-turbo, or nvJPEG for cuda), whole images."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    gpu = device.startswith("cuda")
    pipe = Pipeline(batch_size=len(datas), num_threads=1, device_id=int(device.split(":")[1]) if gpu else None)
    with pipe:
        data = fn.external_source(name="data", dtype=types.UINT8)
        pipe.set_outputs(fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB))
    pipe.build()
    pipe.feed_input("data", [np.array(d) for d in datas])
    (out,) = pipe.run()
    out = out.as_cpu() if gpu else out
    return [np.array(out.at(i)) for i in range(len(datas))]


def backend_images(root, backend: dict, samples: int, seed: int, epoch: int, **options):
    """Batch 0 of `epoch` from a training loader on `backend`: ((B, 3, c, c) float64, Batch)."""
    with train_loader(root, batch_size=samples, seed=seed, workers=0, prefetch=1, **backend, **options) as loader:
        loader.set_epoch(epoch)
        batch = loader.plan(epoch)[0]
        images, _ = next(iter(loader))
        return images.float().cpu().numpy().astype(np.float64), batch


# ---------------------------------------------------------------------------- the report
def difference(a: np.ndarray, b: np.ndarray, scale=None) -> dict | None:
    """Largest and mean absolute difference in 0-255 levels (tensors (B, 3, ...) are
    multiplied back by the per-channel `scale`, the std they were divided by)."""
    if a.size == 0:
        return None
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if scale is not None:
        d = d * np.asarray(scale, np.float64)[None, :, None, None]
    return {"max": float(d.max()), "mean": float(d.mean())}


def _compare(outputs: dict, scale=None, rows=None) -> dict:
    """Each backend against the reference, and each pair of backends."""
    names = [n for n in outputs if n != "reference"]
    pick = (lambda x: x) if rows is None else (lambda x: x[rows])
    table = {f"{n} vs reference": difference(pick(outputs[n]), pick(outputs["reference"]), scale) for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            table[f"{a} vs {b}"] = difference(pick(outputs[a]), pick(outputs[b]), scale)
    return table


def _decode_rows(samples: SplitSamples, index, backends: dict) -> dict:
    spec = samples.index.spec
    views = samples.views(index)
    shapes = [(int(samples.heights[i]), int(samples.widths[i])) for i in index]
    ref = [reference_decode(v, spec, s) for v, s in zip(views, shapes)]
    outputs = {"reference": ref}
    for name, options in backends.items():
        if options["backend"] == "torch" or spec.encoding == "raw":  # torch decodes with PIL; raw is not decoded
            outputs[name] = [decode(v, spec, s) for v, s in zip(views, shapes)]
        else:
            outputs[name] = dali_decode(views, options["device"])
    flat = {k: np.concatenate([np.asarray(a, np.float64).ravel() for a in v]) for k, v in outputs.items()}
    return _compare(flat)


def recipe_report(root, recipe: str, backends: dict, samples: int, seed: int, epoch: int) -> dict:
    """The rows of one recipe (module doc)."""
    index = read_split(root, "train")
    stats = resolve_stats(root, None, index)
    identity = dataclasses.replace(stats, mean_image=None, channel_mean=np.zeros(3), channel_std=np.ones(3))
    crop = CROP
    stages = {  # loader options of each stage: identity normalisation for the window alone
        "window": dict(normalize="channel", stats=identity, lighting_std=0.0),
        "mean": dict(lighting_std=0.0),
        "lighting": dict(lighting_std=LIGHTING),
    }
    split = SplitSamples(index)
    report, first = {}, None
    for stage, options in stages.items():
        outputs = {}
        for name, backend in backends.items():
            outputs[name], batch = backend_images(root, backend, samples, seed, epoch, recipe=recipe, **options)
        if first is None:
            first = batch
            report["decode"] = _decode_rows(split, batch.index, backends)
        images = [reference_decode(v, index.spec, (int(split.heights[i]), int(split.widths[i])))
                  for i, v in zip(batch.index, split.views(batch.index))]
        outputs["reference"] = reference_render(images, batch, crop, stats, stage, recipe)
        scale = None if recipe == "paper" else (np.ones(3) if stage == "window" else stats.channel_std)
        if stage == "window":
            flip = batch.windows[:, 0, -1].astype(bool)
            report["resize" if recipe == "rrc" else "crop"] = _compare(outputs, scale, ~flip)
            report["flip"] = _compare(outputs, scale, flip)
        else:
            report[stage] = _compare(outputs, scale)
    return report


def parity_report(root, *, samples: int = 16, seed: int = 0, epoch: int = 0, recipes=None) -> dict:
    """The report of build `root` (module doc): both recipes where the build allows them
    (the paper's needs a centre-crop build; rrc runs on both)."""
    index = read_split(root, "train")
    samples = min(samples, index.rows)
    if samples < 1:
        raise DataError(f"{index.folder} has no samples to compare")
    if recipes is None:
        recipes = ("rrc",) if index.spec.keep_aspect else ("paper", "rrc")
    backends = available_backends()
    report = {"build_id": index.build_id, "encoding": index.spec.encoding, "samples": samples, "seed": seed,
              "epoch": epoch, "backends": list(backends), "levels": "0-255", "recipes": {}}
    with warnings.catch_warnings():  # rrc on a centre-crop build warns: this report compares, it does not train
        warnings.simplefilter("ignore", UserWarning)
        for recipe in recipes:
            report["recipes"][recipe] = recipe_report(root, recipe, backends, samples, seed, epoch)
    return report
