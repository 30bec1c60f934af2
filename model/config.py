"""The training configuration: one frozen dataclass shared by `alexprep train` and the
library, its defaults the paper's recipe (section 5). Importing it does not import torch,
so the CLI starts fast."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from alexprep.imagenet_prep.errors import DataError

PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `alexprep train` does. Defaults are the paper's recipe (section 5)."""

    batch_size: int = 128  # §5; the global batch, split over ranks
    epochs: int = 90  # §5: "roughly 90 cycles through the training set"
    lr: float = 0.01  # §5
    momentum: float = 0.9  # §5
    weight_decay: float = 5e-4  # §5, inside the momentum (optim.PaperSGD)
    decay_biases: bool = False  # cuda-convnet gave biases no weight decay
    bias_lr_mult: float = 1.0  # the paper's one lr; cuda-convnet2's configs and Caffe's use 2
    lr_factor: float = 0.1  # §5: divide by 10 ...
    patience: int = 3  # ... when val top-1 error has not improved for this many epochs ...
    max_drops: int = 3  # ... three times in all (0.01 -> 1e-5)
    plateau_threshold: float = 0.01  # "improved": below the best error by this fraction of it
    milestones: tuple[int, ...] = ()  # or drop at these epochs (a fixed step schedule)
    seed: int = 0  # weights, augmentation draws, epoch orders, dropout
    lighting_std: float = 0.1  # §4.1: alpha ~ N(0, 0.1)
    normalize: str = "mean-image"  # §2: subtract the mean image; "channel" for mean/std
    order: str = "random"  # or "quasi" for datasets larger than RAM
    backend: str = "auto"  # "dali", "torch", or "auto" (DALI where installed)
    decoder: str = "auto"  # torch backend: "pil" (CPU workers; what auto picks) or "torchvision" (nvJPEG on CUDA)
    devices: tuple[str, ...] = ("cpu",)  # one device (grouped towers) or two (one tower each); "auto"
    precision: str = "fp32"  # "fp32" (true fp32, TF32 off), "tf32" (TF32 matmuls on Ampere+), "bf16" autocast
    channels_last: bool = False  # NHWC memory format, faster on some GPUs
    compile: bool = False  # torch.compile the training forward and backward (its first steps compile)
    deterministic: bool = False  # deterministic kernels, no cuDNN search: a bit-exact resume on CUDA, slower;
    # off, a resumed run continues where it stopped but is not bit-exact on CUDA (the CPU's kernels always are)
    bias_init: str = "paper"  # "paper" (1) or "caffe" (0.1, learns sooner)
    lrn: str = "cuda-convnet"  # LRN semantics (alexnet.AlexNetConfig)
    dropout: float = 0.5  # §4.2
    weight_std: float = 0.01  # §5
    eval_batch_size: int = 0  # 0: the training batch size (a tenth of it for 10 crops)
    final_crops: int = 10  # the paper's 10-crop evaluation at the end (0 to skip)
    checkpoint_minutes: float = 30.0  # also checkpoint mid-epoch this often
    keep_last: int = 2  # checkpoints kept (~0.7 GB each with momentum for 1000 classes)
    log_every: int = 50  # steps between metrics.jsonl rows
    max_steps: int = 0  # stop with a checkpoint after this many steps in all (0: no limit)
    loader_workers: int = 0  # worker processes of the loaders (0: their default)
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard package)
    verify_shards: bool = False  # check every shard's SHA-256 against its manifest before training

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, f"batch size must be >= 1, not {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, not {self.epochs}"),
            (self.lr > 0, f"learning rate must be > 0, not {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), not {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, not {self.weight_decay}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"),
            (self.bias_lr_mult > 0, f"bias lr multiplier must be > 0, not {self.bias_lr_mult}"),
            (0 <= self.plateau_threshold < 1, f"plateau threshold must be in [0, 1), not {self.plateau_threshold}"),
            (self.backend in ("auto", "dali", "torch"), f"backend must be auto, dali or torch, not {self.backend!r}"),
            (self.decoder in ("auto", "pil", "torchvision"),
             f"decoder must be auto, pil or torchvision, not {self.decoder!r}"),
            (1 <= len(self.devices) <= 2, f"devices: one or two (one per tower), not {len(self.devices)}"),
            (self.final_crops in (0, 1, 10), f"final crops must be 0, 1 or 10, not {self.final_crops}"),
            (self.keep_last >= 1, f"keep-last must be >= 1, not {self.keep_last}"),
            (self.log_every >= 1, f"log-every must be >= 1, not {self.log_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(message)

    def model_config(self, num_classes: int):
        """The network's AlexNetConfig for `num_classes`."""
        from alexprep.model.alexnet import AlexNetConfig

        return AlexNetConfig(num_classes=num_classes, lrn=self.lrn, bias_init=self.bias_init,
                             dropout=self.dropout, weight_std=self.weight_std)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)
