"""The paper's update rule (section 5) and its learning-rate schedule.

    v <- 0.9 v - 0.0005 * lr * w - lr * grad
    w <- w + v

PyTorch's SGD keeps v in gradient units and multiplies it by the *current* lr at each
step (v <- 0.9 v + grad + wd w; w <- w - lr v). With a constant lr the two are the same
trajectory; when the lr is divided by 10, PyTorch's accumulated momentum shrinks tenfold at
once, while the paper's keeps its old, larger steps and decays them by 0.9 per step.
`tests/test_train.py` shows both facts.

Weight decay applies to weights, not biases, as in cuda-convnet (its layer definitions
give biases no decay); `decay_biases=True` includes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class PaperSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay inside the momentum, exactly as the paper writes it.

    Param groups may set their own `weight_decay` (0 for biases). State per parameter:
    `velocity`, the paper's v (in weight units).
    """

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"need lr > 0, 0 <= momentum < 1, weight_decay >= 0 (got {lr}, {momentum}, {weight_decay})")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            velocities = []
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                velocities.append(state["velocity"])
            grads = [p.grad for p in params]
            lr, wd = group["lr"], group["weight_decay"]
            # One fused kernel per operation over all tensors of the group (foreach).
            torch._foreach_mul_(velocities, group["momentum"])
            if wd:
                torch._foreach_add_(velocities, params, alpha=-wd * lr)
            torch._foreach_add_(velocities, grads, alpha=-lr)
            torch._foreach_add_(params, velocities)
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float, decay_biases: bool = False,
                 bias_lr_mult: float = 1.0) -> list[dict]:
    """Weights with decay; biases (1-d parameters) without, unless decay_biases. Biases
    learn at `bias_lr_mult` times the lr (cuda-convnet2's epsB = 2 epsW, Caffe's lr_mult 2)."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (weights if p.ndim > 1 else biases).append(p)
    groups = [{"params": weights, "weight_decay": weight_decay, "lr_mult": 1.0, "name": "weights"}]
    if biases:
        groups.append({"params": biases, "weight_decay": weight_decay if decay_biases else 0.0,
                       "lr_mult": bias_lr_mult, "name": "biases"})
    return groups


@dataclass
class LrSchedule:
    """Divide the lr by 10 when validation error stops improving (§5), at most `max_drops`
    times; or at fixed epochs (`milestones`). Its state is plain values for checkpoints."""

    lr: float
    factor: float = 0.1
    patience: int = 3  # epochs without a new best top-1 error before a drop
    max_drops: int = 3  # the paper divided three times (0.01 -> 1e-5)
    milestones: tuple[int, ...] = ()  # a fixed step schedule instead, e.g. (30, 60, 80)
    # An epoch improves only if its error is below best * (1 - threshold), as
    # ReduceLROnPlateau's relative threshold: gains of a few images in 50,000 are noise, and
    # if each one reset the patience, three drops would not fit into 90 epochs.
    threshold: float = 0.0
    best: float = float("inf")
    bad_epochs: int = 0
    drops: int = 0

    def end_of_epoch(self, epoch: int, val_error: float) -> bool:
        """Update after epoch `epoch` (0-based) with its validation top-1 error; returns
        whether the lr was divided."""
        if self.milestones:
            if epoch + 1 in self.milestones:
                self.lr *= self.factor
                self.drops += 1
                return True
            return False
        if val_error < self.best * (1 - self.threshold):
            self.best, self.bad_epochs = val_error, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience and self.drops < self.max_drops:
            self.lr *= self.factor
            self.drops += 1
            self.bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.best, "bad_epochs": self.bad_epochs, "drops": self.drops}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.best = float(state["lr"]), float(state["best"])
        self.bad_epochs, self.drops = int(state["bad_epochs"]), int(state["drops"])

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_mult", 1.0)
