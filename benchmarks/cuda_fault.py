"""Find the CUDA illegal memory access of benchmarks/GPU.md: every configuration that could
have hit it, each in its own process, the failing ones again under compute-sanitizer.

    make gpu-fault OUT=/tmp/gpu-fault                   # on a lent GPU machine
    python benchmarks/cuda_fault.py --out DIR [--device cuda|cpu] [--steps 30] [--only NAME,...]

A configuration is training steps of AlexNet (PaperSGD, cross-entropy, as model/train.py
steps) on batches of real JPEG photos decoded each step, with one choice of:
- lrn: "old" (the autograd Functions `_NormPool` even inside a compiled graph, as the
  failing run had them), "formula" (today's PyTorch path: the Functions eager, the
  out-of-place formula when compiled) or "fused" (the Triton operator);
- compile: eager or torch.compile (inductor);
- precision: fp32 NCHW or bf16 channels_last;
- decoder: "pil" (PIL on the host, a pinned non-blocking copy) or "torchvision" (nvJPEG
  on the device through alexprep's decode_jpeg_batch, which waits for the caller's stream
  first) or "torchvision-unsynced" (torchvision's decode_jpeg called bare, pytorch/vision#9606).

Each runs with CUDA_LAUNCH_BLOCKING=1 (the failing kernel is then the one named). The
decoders' stream race cannot happen under launch blocking (every kernel finishes before
the host goes on), so the torchvision rows run a second time without it. A configuration
that fails is rerun under `compute-sanitizer --tool memcheck` with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 (else the checker cannot see bad accesses inside the
caching allocator's blocks) at a small batch. DIR/cuda_fault.json after every row.
On the CPU (`--device cpu`, the smoke in `make test`) the eager and "aot_eager"-compiled
rows run at a tiny batch; Triton and nvJPEG rows are skipped, saying why.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {}  # name -> dict(lrn, compile, precision, decoder)
for _compile in (False, True):
    for _precision in ("fp32", "bf16_channels_last"):
        for _lrn in (("formula", "fused") if not _compile else ("old", "formula", "fused")):
            CONFIGS[f"{'compiled' if _compile else 'eager'}-{_precision}-{_lrn}-pil"] = dict(
                lrn=_lrn, compile=_compile, precision=_precision, decoder="pil")
for _decoder in ("torchvision", "torchvision-unsynced"):
    CONFIGS[f"eager-fp32-fused-{_decoder}"] = dict(lrn="fused", compile=False, precision="fp32", decoder=_decoder)
    CONFIGS[f"compiled-bf16_channels_last-fused-{_decoder}"] = dict(
        lrn="fused", compile=True, precision="bf16_channels_last", decoder=_decoder)


# ----------------------------------------------------------------------------- the child
def photo_jpegs(count: int) -> list[bytes]:
    """`count` 256x256 JPEG crops of scikit-learn's sample photos (real images, no download)."""
    import numpy as np

    from alexprep.imagenet_prep.sample_data import jpeg_bytes, load_photo, photo_crop

    rng = np.random.default_rng(0)
    photos = [load_photo(name) for name in ("china", "flower")]
    return [jpeg_bytes(photo_crop(photos[i % 2], (256, 256), rng)) for i in range(count)]


def batches(jpegs: list[bytes], batch: int, decoder: str, device, channels_last: bool):
    """Endless (images, labels) on the device: each step decodes its JPEGs again."""
    import numpy as np
    import torch
    from PIL import Image

    from alexprep.imagenet_prep.torch_backend import decode_jpeg_batch

    step = 0
    while True:
        chosen = [jpegs[(step * batch + i) % len(jpegs)] for i in range(batch)]
        if decoder == "pil":
            arrays = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in chosen])
            host = torch.from_numpy(arrays).permute(0, 3, 1, 2).pin_memory() if device.type == "cuda" \
                else torch.from_numpy(arrays).permute(0, 3, 1, 2)
            images = host.to(device, non_blocking=True)
        else:
            encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in chosen]
            if decoder == "torchvision":
                images = torch.stack(decode_jpeg_batch(encoded, device))
            else:
                from torchvision.io import ImageReadMode, decode_jpeg

                images = torch.stack(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        x = images[:, :, 16:240, 16:240].float().sub_(120.0).div_(60.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = torch.arange(step * batch, (step + 1) * batch, device=device) % 1000
        yield x, labels
        step += 1


def use_old_lrn() -> None:
    """The normalisation + pool as the autograd Function `_NormPool` even under
    torch.compile: what the compiled run that died traced (commit cc1be25's predecessor)."""
    from alexprep.model import alexnet

    def old(x, *, size=alexnet.LRN_SIZE, alpha=alexnet.LRN_ALPHA, beta=alexnet.LRN_BETA, k=alexnet.LRN_K,
            groups=1, chunk=None, fused=None):
        x = alexnet._checked_lrn_input(x, size, groups)
        return alexnet._NormPool.apply(x, size, alpha, beta, k, groups, chunk or x.shape[0])

    alexnet.local_response_norm_max_pool = old


def run_child(cfg: dict, device_name: str, batch: int, steps: int, compile_backend: str) -> dict:
    import torch
    import torch.nn.functional as F

    from alexprep.model.alexnet import AlexNet
    from alexprep.model.optim import PaperSGD, param_groups

    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer sets it
    if cfg["lrn"] == "old":
        use_old_lrn()
    bf16 = cfg["precision"] == "bf16_channels_last"
    torch.manual_seed(0)
    model = AlexNet(devices=(device,), fused_lrn=cfg["lrn"] == "fused")
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    optimizer = PaperSGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9, weight_decay=5e-4)
    forward = torch.compile(model, backend=compile_backend) if cfg["compile"] else model
    data = batches(photo_jpegs(4 * batch), batch, cfg["decoder"], device, bf16)
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        images, labels = next(data)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    values = torch.stack(losses).tolist()  # the one sync: every step's work is done here
    return {"steps": steps, "batch": batch, "seconds": round(time.perf_counter() - t0, 2),
            "first_loss": values[0], "last_loss": values[-1], "finite": all(v == v and abs(v) < 1e30 for v in values)}


# ----------------------------------------------------------------------------- the parent
def skipped_why(cfg: dict, device: str) -> str | None:
    if device.startswith("cuda"):
        return None
    if cfg["lrn"] == "fused":
        return "the Triton kernel runs on CUDA (tests/test_lrn_pool.py runs it in the interpreter)"
    if cfg["decoder"] != "pil":
        return "nvJPEG decodes on CUDA only"
    return None


def run_one(name: str, args, env_extra: dict, sanitizer: bool = False, batch: int | None = None) -> dict:
    """One configuration in a fresh Python; the row: ok, or the failure's last lines."""
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--batch", str(batch or args.batch),
           "--steps", str(2 if sanitizer else args.steps), "--compile-backend", args.compile_backend]
    if sanitizer:
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "5", *cmd]
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.timeout_s} s", "wall_s": args.timeout_s}
    row = {"ok": proc.returncode == 0, "wall_s": round(time.monotonic() - t, 1), "env": env_extra}
    if proc.returncode == 0:
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        text = (proc.stdout + proc.stderr).strip().splitlines()
        row.update(returncode=proc.returncode, tail=text[-25:])
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for cuda_fault.json")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (the smoke)")
    parser.add_argument("--batch", type=int, default=None, help="images a step (default 128 on CUDA, 2 on the CPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps a configuration (default 30, CPU 2)")
    parser.add_argument("--sanitizer-batch", type=int, default=8)
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--compile-backend", default=None, help="inductor (CUDA default), aot_eager (CPU default)")
    parser.add_argument("--timeout-s", type=float, default=240)
    parser.add_argument("--budget-s", type=float, default=420, help="no new configuration starts past this")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (128 if cuda else 2)
    args.steps = args.steps or (30 if cuda else 2)
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    if args.child:
        print(json.dumps(run_child(CONFIGS[args.child], args.device, args.batch, args.steps, args.compile_backend)))
        return 0
    if args.out is None:
        parser.error("--out is required")
    names = list(CONFIGS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}")
    return run_all(names, args)


def run_all(names: list[str], args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    sanitizer = shutil.which("compute-sanitizer")
    result = {"benchmark": "cuda_fault", "device": args.device, "batch": args.batch, "steps": args.steps,
              "compile_backend": args.compile_backend, "compute_sanitizer": sanitizer, "rows": {}}
    for name in names:
        cfg = CONFIGS[name]
        row = {"config": cfg}
        why = skipped_why(cfg, args.device)
        if why:
            row["skipped"] = why
        elif time.monotonic() - started > args.budget_s:
            row["skipped"] = f"out of the {args.budget_s:.0f} s budget"
        else:
            row["launch_blocking"] = run_one(name, args, {"CUDA_LAUNCH_BLOCKING": "1"})
            if cfg["decoder"] != "pil":  # the stream race needs the host to run ahead
                row["queued"] = run_one(name, args, {})
            failed = not all(r["ok"] for k, r in row.items() if k in ("launch_blocking", "queued"))
            if failed and sanitizer and args.device.startswith("cuda"):
                row["memcheck"] = run_one(name, args, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, sanitizer=True,
                                          batch=args.sanitizer_batch)
        result["rows"][name] = row
        (args.out / "cuda_fault.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{name:<52} {_verdict(row)}", flush=True)
    return 0


def _verdict(row: dict) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    parts = []
    for key in ("launch_blocking", "queued", "memcheck"):
        if key in row:
            r = row[key]
            parts.append(f"{key} {'ok' if r['ok'] else 'FAILED'} {r.get('wall_s', '')} s"
                         + ("" if r["ok"] else f" ({(r.get('tail') or [r.get('error', '')])[-1][:120]})"))
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
