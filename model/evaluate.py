"""Top-1 and top-5 error over a whole split: the centre crop, or the paper's 10 crops.

With 10 crops (4 corners + centre, and their mirrors) the softmax outputs are averaged
before ranking, as in section 4.1. Under torch.distributed the counts are summed over
ranks; the loaders give every image to exactly one rank.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from alexprep.model.distributed import all_reduce
from alexprep.model.metrics import topk_correct


@dataclass(frozen=True)
class EvalResult:
    top1_error: float
    top5_error: float
    count: int
    crops: int

    def to_json(self) -> dict:
        return {"top1_error": self.top1_error, "top5_error": self.top5_error, "count": self.count, "crops": self.crops}


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked; fp32 (or TF32, configured per run) otherwise."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16" and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, precision: str = "fp32", progress=None) -> EvalResult:
    """Errors of `model` over every batch of an eval loader (crops 1 or 10)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct1 = correct5 = count = 0
    crops = 1
    try:
        for images, labels in loader:
            if images.ndim == 5:  # (B, 10, 3, 224, 224)
                b, crops = images.shape[:2]
                with autocast(device, precision):
                    logits = model(images.reshape(b * crops, *images.shape[2:]))
                scores = logits.float().softmax(dim=1).reshape(b, crops, -1).mean(dim=1)
            else:
                with autocast(device, precision):
                    scores = model(images).float()
            hits = topk_correct(scores, labels)
            correct1, correct5, count = correct1 + hits[1], correct5 + hits[5], count + len(labels)
            if progress:
                progress(len(labels))
    finally:
        model.train(was_training)
    correct1, correct5, count = (int(v) for v in all_reduce([correct1, correct5, count]))
    if count == 0:
        raise ValueError("the evaluation split is empty")
    return EvalResult(1 - correct1 / count, 1 - correct5 / count, count, crops)


def error_table(results: list[EvalResult]) -> str:
    """The paper's Table 2 style: top-1 and top-5 error per crop setting."""
    lines = [f"{'':<10}{'top-1 error':>13}{'top-5 error':>13}{'images':>9}"]
    for r in results:
        name = "1 crop" if r.crops == 1 else f"{r.crops} crops"
        lines.append(f"{name:<10}{100 * r.top1_error:>12.1f}%{100 * r.top5_error:>12.1f}%{r.count:>9}")
    return "\n".join(lines)
