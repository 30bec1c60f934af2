"""The training configuration: one frozen dataclass shared by `alexprep train` and the
library, its defaults the paper's recipe (section 5). Importing it does not import torch,
so the CLI starts fast."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from alexprep.imagenet_prep.errors import DataError

PRECISIONS = ("fp32", "tf32", "bf16")
BACKENDS = ("auto", "dali", "torch")


def option(default, help: str = "", *, cli: str | None = "", at_least=None, above=None, below=None,
           choices=None, resumable: bool = False, label: str | None = None):
    """A TrainConfig field and, in its metadata, what its command-line option needs: the
    help text, its range or choices (checked once, in `TrainConfig.__post_init__`; the CLI
    generates its options from them, cli/config_options.py), its name ("" derives --name
    from the field; None: no generated option, `label` names it in messages), and whether
    `--resume` may change it."""
    metadata = {"help": help, "cli": cli, "label": label, "at_least": at_least, "above": above, "below": below,
                "choices": choices, "resumable": resumable}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Everything `alexprep train` does. Defaults are the paper's recipe (section 5)."""

    batch_size: int = option(128, "The global batch (split over torchrun ranks).", at_least=1)  # §5
    epochs: int = option(90, "Epochs in all.", at_least=1, resumable=True)  # §5: "roughly 90 cycles"
    lr: float = option(0.01, "Initial learning rate.", above=0)  # §5
    momentum: float = option(0.9, "SGD momentum.", at_least=0, below=1)  # §5
    weight_decay: float = option(5e-4, "Weight decay, inside the momentum (the paper's rule).", at_least=0)  # §5
    decay_biases: bool = option(False, "Apply weight decay to biases too (cuda-convnet did not).")
    bias_lr_mult: float = option(1.0, "Biases learn at this multiple of the lr (the paper: 1; cuda-convnet2 and "
                                 "Caffe's AlexNet: 2).", above=0)  # the paper's one lr
    lr_factor: float = option(0.1, cli=None, above=0, below=1)  # §5: divide by 10 ...
    patience: int = option(3, "Epochs without a better val top-1 error before the lr is divided by 10.",
                           at_least=1)  # ... when val top-1 error has not improved for this many epochs ...
    max_drops: int = option(3, "Times the lr is divided by 10 at most.", at_least=0)  # ... 3 times (0.01 -> 1e-5)
    plateau_threshold: float = option(0.01, "An epoch counts as better only if its val error is below the best by "
                                      "this fraction of it.", at_least=0, below=1)
    milestones: tuple[int, ...] = option((), "A fixed step schedule instead: divide at these epochs, e.g. 30,60,80.")
    seed: int = option(0, "Seeds the weights, augmentation draws, epoch orders and dropout.")
    lighting_std: float = option(0.1, "PCA lighting alpha std (0 disables).", at_least=0)  # §4.1: N(0, 0.1)
    normalize: str = option("mean-image", cli=None)  # §2: subtract the mean image; "channel" for mean/std
    order: str = option("random", "Each epoch's order: random (the paper's), or quasi: shards shuffled, then the "
                        "samples of each 4 shards together (reads stay within a few shards: for a split larger than "
                        "RAM or --cache-limit).", choices=("random", "quasi"))
    backend: str = option("auto", "The loaders' backend (auto: DALI where installed).", choices=BACKENDS)
    decoder: str = option("auto", "Torch backend: decode in CPU workers (pil), or in batches on the GPU with "
                          "torchvision (nvJPEG) or nvimgcodec (hardware JPEG decoders; pip install "
                          "'alexprep[nvimgcodec]'). auto: pil.", choices=("auto", "pil", "torchvision", "nvimgcodec"))
    # One device (grouped towers) or two (one tower each); "auto". The CLI's --device and
    # --devices; may change on resume (other GPUs, another machine).
    devices: tuple[str, ...] = option(("cpu",), cli=None, label="--device/--devices", resumable=True)
    precision: str = option("fp32", "fp32 (TF32 off on GPUs); tf32 (TF32 matmuls and convolutions, Ampere and "
                            "later); bf16 autocast. Only fp32 is the paper's arithmetic.", choices=PRECISIONS)
    channels_last: bool = option(False, "NHWC memory format.")  # faster on some GPUs
    compile: bool = option(False, "Experimental: torch.compile the training step (fused kernels; the first steps "
                           "compile). Not yet verified on a GPU: see benchmarks/GPU.md.")
    # Off, a resumed run continues where it stopped but is not bit-exact on CUDA (the CPU's kernels always are).
    deterministic: bool = option(False, "Deterministic kernels and no cuDNN algorithm search, so that --resume is "
                                 "bit-exact on CUDA (slower). Without it a resumed run continues where it stopped, "
                                 "not bit-exact on CUDA.")
    bias_init: str = option("paper", "paper: biases 1 in conv2/4/5, fc6/7; caffe: 0.1 (learns sooner).",
                            choices=("paper", "caffe"))
    lrn: str = option("cuda-convnet", "LRN semantics: cuda-convnet's or the paper's formula (alexnet.py).",
                      choices=("cuda-convnet", "paper"))
    # The network's own config checks these two (alexnet.AlexNetConfig)
    dropout: float = option(0.5, cli=None)  # §4.2
    weight_std: float = option(0.01, cli=None)  # §5
    # 0: the training batch; per rank and for 10 crops: rank_batch_size
    eval_batch_size: int = option(0, cli=None, at_least=0)
    # The rest change how a run is kept and watched, not what it computes: --resume may change them.
    final_crops: int = option(10, "Evaluation at the end (0 to skip).", choices=(0, 1, 10), resumable=True)
    checkpoint_minutes: float = option(30.0, "Also checkpoint mid-epoch this often (0: every step).", at_least=0,
                                       resumable=True)
    keep_last: int = option(2, "Checkpoints kept on disk (~0.7 GB each).", at_least=1, resumable=True)
    log_every: int = option(50, "Steps between metrics.jsonl rows.", at_least=1, resumable=True)
    # Where this invocation stops, in steps in all: never taken from the run resumed
    max_steps: int = option(0, "Stop with a checkpoint after N steps in all (0: no limit).", at_least=0,
                            resumable=True)
    loader_workers: int = option(0, "Loader worker processes (0: default).", cli="--workers", at_least=0,
                                 resumable=True)
    tensorboard: bool = option(False, "Also write TensorBoard events.", resumable=True)
    verify_shards: bool = option(False, "Check every shard's SHA-256 against its manifest before training (sizes "
                                 "are always checked).", resumable=True)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name))
        if not 1 <= len(self.devices) <= 2:
            raise DataError(f"devices: one or two (one per tower), not {len(self.devices)}")

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


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def option_name(name: str) -> str | None:
    """The command-line option of field `name` (--batch-size for batch_size), or None."""
    cli = FIELDS[name].metadata["cli"]
    return None if cli is None else cli or "--" + name.replace("_", "-")


def _label(name: str) -> str:
    return FIELDS[name].metadata["label"] or option_name(name) or name


def check_value(name: str, value) -> None:
    """Refuse a value outside field `name`'s range or choices (its metadata), in one line
    naming the option: the one check of each option, for the CLI and the library."""
    meta = FIELDS[name].metadata
    rules = [(meta["choices"], lambda v, c: v in c, "one of {}"), (meta["at_least"], lambda v, b: v >= b, ">= {}"),
             (meta["above"], lambda v, b: v > b, "> {}"), (meta["below"], lambda v, b: v < b, "< {}")]
    for bound, ok, text in rules:
        if bound is not None and not ok(value, bound):
            said = ", ".join(map(str, bound)) if isinstance(bound, tuple) else bound
            raise DataError(f"{_label(name)} must be {text.format(said)}, not {value!r}")


DEFAULTS = TrainConfig()  # the paper's recipe (after check_value, which it runs)


def non_default_fields(config: TrainConfig) -> set[str]:
    """The fields of `config` that differ from TrainConfig's defaults: what a library
    caller of `train(..., resume=True)` is taken to have asked for."""
    return {name for name in FIELDS if getattr(config, name) != getattr(DEFAULTS, name)}


def resumed_config(saved: TrainConfig, asked: TrainConfig, given) -> TrainConfig:
    """The config a resumed run continues with: the run's own, with the options in `given`
    (field names) taken from `asked` where `--resume` may change them (their metadata's
    "resumable"); any other given option that differs is refused, in one line naming each.
    max_steps is always `asked`'s: it says where this invocation stops."""
    changed, refused = [], []
    for name in (n for n in FIELDS if n in given):  # in the fields' order, as --help lists them
        old, new = getattr(saved, name), getattr(asked, name)
        if old == new:
            continue
        if FIELDS[name].metadata["resumable"]:
            changed.append(name)
        else:
            refused.append(f"{_label(name)} {_shown(new)} (the run's: {_shown(old)})")
    if refused:
        allowed = ", ".join(_label(n) for n, f in FIELDS.items() if f.metadata["resumable"])
        raise DataError(f"--resume continues a run with its own settings, and {len(refused)} given option(s) differ: "
                        f"{'; '.join(refused)}. Drop them, or start a new --run-dir (on resume only {allowed} "
                        f"may change)")
    # max_steps belongs to this invocation (stop after N steps in all), not to the run
    updates = {name: getattr(asked, name) for name in changed} | {"max_steps": asked.max_steps}
    return dataclasses.replace(saved, **updates)


def _shown(value) -> str:
    """A value as typed: a flag on or off, a list comma-separated."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return (",".join(map(str, value)) or "none") if isinstance(value, tuple) else str(value)


def rank_batch_size(batch_size: int, world_size: int, crops: int = 1, *, train: bool = False) -> int:
    """Images per batch on each rank, from the global batch: split over the ranks (for
    training it must divide: SGD's batch is the global one), and for evaluation with 10
    crops a tenth of that, so that a batch holds as many network inputs (images x crops) as
    a training batch. The one place these batches are decided (trainer and `evaluate`)."""
    if train and batch_size % world_size:
        raise DataError(f"batch size {batch_size} is not divisible by the {world_size} ranks: give a "
                        f"--batch-size that is (the recipe's batch is the global one)")
    per_rank = batch_size // world_size
    return max(1, per_rank // 10 if crops == 10 else per_rank)
