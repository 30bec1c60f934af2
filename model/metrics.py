"""Top-k errors, the run's metrics log (metrics.jsonl) and its curves (curves.png)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from alexprep.imagenet_prep.atomic import temporary_name


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many rows have their label among the k highest scores, for each k."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, k)
    hits = top == labels.to(top.device)[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


class MetricsLog:
    """Appends one JSON object per line to DIR/metrics.jsonl (kind: "step", "epoch", "final")."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, kind: str, **values) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "time": round(time.time(), 3), **values}
        with open(self.path, "ab+") as f:
            # A run killed mid-write leaves a torn last line: the resumed run starts a new one.
            torn = f.seek(0, 2) > 0 and f.seek(-1, 2) >= 0 and f.read(1) != b"\n"
            f.write((("\n" if torn else "") + json.dumps(row) + "\n").encode())

    def rows(self, kind: str | None = None) -> list[dict]:
        """The rows written, without a line torn by a kill (it never held a whole row)."""
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # blank, or torn by a kill mid-write
        return [r for r in rows if kind is None or r["kind"] == kind]


def plot_curves(log: MetricsLog, path: Path) -> None:
    """Loss and train/val errors per epoch, as the paper's readers would want to see them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = log.rows("epoch")
    if not epochs:
        return
    x = [r["epoch"] + 1 for r in epochs]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(x, [r["train_loss"] for r in epochs], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    for key, label in (("train_top1_error", "train top-1"), ("val_top1_error", "val top-1"),
                       ("val_top5_error", "val top-5")):
        ax_err.plot(x, [100 * r[key] for r in epochs], marker="o", label=label)
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("error (%)")
    ax_err.legend()
    fig.tight_layout()

    tmp = temporary_name(Path(path)).with_suffix(".png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
