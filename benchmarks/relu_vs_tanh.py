"""The paper's Figure 1: how many epochs a four-layer convolutional network needs to reach
25% training error with ReLUs, and with tanh units.

Section 3.1: "A four-layer convolutional neural network with ReLUs (solid line) reaches a
25% training error rate on CIFAR-10 six times faster than an equivalent network with tanh
neurons (dashed line). The learning rates for each network were chosen independently to
make training as fast as possible. No regularization of any kind was employed."

CIFAR-10 is not on this machine (and nothing is downloaded), so the data are the real
labelled images that ship with scikit-learn: its 1,797 handwritten digits (10 classes),
upsampled from 8x8 to 32x32 (bilinear) as CIFAR's size, minus the mean image (the
paper's only preprocessing), all used for training. Digits are much easier than CIFAR-10:
both networks reach 25% within a few epochs, a much shorter race than the paper's ~6
against ~36 epochs.

The network is cuda-convnet's CIFAR-10 net `layers-80sec.cfg` without its fc64 layer,
four layers with weights: conv 5x5x32 -> max-pool 3/2 -> conv 5x5x32 -> avg-pool 3/2 ->
conv 5x5x64 -> avg-pool 3/2 -> fully connected 10, the nonlinearity after each
convolution being the only difference between the two networks. SGD with momentum 0.9,
batch 128, a constant learning rate, no weight decay, dropout or augmentation. Two
set-ups, each run whole:
- "pytorch": inputs on the 0-1 scale, PyTorch's default initialisation (what a PyTorch
  user gets);
- "cuda-convnet": what the paper's code did on CIFAR-10, pixels on the 0-255 scale and
  layers-80sec's Gaussian initialisation (std 1e-4 for conv1, 0.01, 0.01, 0.1), zero biases.

The training error is what cuda-convnet printed while training: the error rate over the
images seen in each quarter of an epoch, with the weights as they were when each batch
was seen (it costs no extra pass). "Epochs to 25%" is the end of the first quarter-epoch
whose error is at or below 25%. The winners' curves run to the epoch cap, and the epochs
to 10% and 5% are reported from them too (with the rates tuned for 25%).

Learning rates are tuned separately per activation on a 3x-spaced grid: each
(activation, rate, seed) run stops when it reaches 25%, at twice the best rate's median
so far (it would not win), or at the epoch cap; the rate with the lowest median epochs
to 25% wins. The winners are then run with fresh seeds for the reported numbers and the
curves.

    python -m benchmarks.relu_vs_tanh --quick   # ~2 min on 2 cores
    python -m benchmarks.relu_vs_tanh           # ~4-5 min
    python -m benchmarks.relu_vs_tanh --setup cuda-convnet   # one set-up

Writes relu_vs_tanh.json and relu_vs_tanh.png into --out (benchmarks/out/; --publish:
also benchmarks/results/).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import add_output_args, finish, machine

TARGET = 0.25  # the paper's threshold: 25% training error
BATCH = 128  # cuda-convnet's minibatch for CIFAR-10
MOMENTUM = 0.9
POINTS_PER_EPOCH = 4  # the training error is reported per quarter epoch
LOWER = (0.10, 0.05)  # also reported from the winners' curves (their rates were tuned for 25%)
GIVE_UP = 2.0  # tuning stops a run that has not crossed by this times the best median so far
SIZE = 32  # CIFAR-10's images are 32x32
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
# layers-80sec.cfg's initW (the std of its Gaussian weights): conv1, conv2, conv3, fc.
CUDA_CONVNET_INIT = (1e-4, 0.01, 0.01, 0.1)
# Two set-ups, each run in full. "pytorch": inputs 0-1, PyTorch's default initialisation
# (what a PyTorch user gets). "cuda-convnet": what the paper's code did on CIFAR-10, pixels
# on the 0-255 scale minus the mean image and layers-80sec's Gaussian initialisation.
# Rates are a 3x-spaced grid around what trains each (0-255 inputs need ~30x smaller).
SETUPS = {
    "pytorch": {"scale": 1.0, "init": "pytorch",
                "rates": {"quick": (0.03, 0.1, 0.3, 1.0), "full": (0.01, 0.03, 0.1, 0.3, 1.0)}},
    "cuda-convnet": {"scale": 255.0, "init": "cuda-convnet",
                     "rates": {"quick": (0.001, 0.003, 0.01, 0.03, 0.1), "full": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)}},
}
MODES = {
    # tune_seeds: runs per rate while tuning; seeds: fresh runs of each winner (the
    # reported numbers); epochs: the cap.
    "quick": {"tune_seeds": (0,), "seeds": (100, 101), "epochs": 10},
    "full": {"tune_seeds": (0, 1), "seeds": (100, 101, 102), "epochs": 20},
}


# ---------------------------------------------------------------------------- data and network
def digits_32(scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as (N, 1, 32, 32) float32 (0-`scale`, minus the mean
    image) and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] * (scale / 16.0)  # (N, 1, 8, 8), 16 grey levels
    x = F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False)  # (N, 1, 32, 32)
    x = x - x.mean(dim=0, keepdim=True)  # the paper's only preprocessing: minus the mean image
    return x.contiguous(), torch.tensor(digits.target, dtype=torch.int64)


def four_layer_net(activation: str, init: str = "pytorch", in_channels: int = 1, classes: int = 10) -> nn.Module:
    """cuda-convnet's layers-80sec CIFAR-10 network (without its fc64) with `activation` after
    each convolution. init: PyTorch's defaults, or "cuda-convnet": N(0, sigma^2) weights
    with layers-80sec's initW per layer and zero biases."""
    act = ACTIVATIONS[activation]
    net = nn.Sequential(
        nn.Conv2d(in_channels, 32, 5, padding=2), act(),  # (N, 32, 32, 32)
        nn.MaxPool2d(3, 2, padding=1),  # (N, 32, 16, 16)
        nn.Conv2d(32, 32, 5, padding=2), act(),  # (N, 32, 16, 16)
        nn.AvgPool2d(3, 2, padding=1),  # (N, 32, 8, 8)
        nn.Conv2d(32, 64, 5, padding=2), act(),  # (N, 64, 8, 8)
        nn.AvgPool2d(3, 2, padding=1),  # (N, 64, 4, 4)
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, classes),  # (N, 10)
    )
    if init == "cuda-convnet":
        layers = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
        for layer, std in zip(layers, CUDA_CONVNET_INIT):
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)
    elif init != "pytorch":
        raise ValueError(f"init must be 'pytorch' or 'cuda-convnet', not {init!r}")
    return net


# ---------------------------------------------------------------------------- one run
@dataclass
class Run:
    activation: str
    lr: float
    seed: int
    epochs: list[float] = field(default_factory=list)  # x: the end of each quarter epoch
    errors: list[float] = field(default_factory=list)  # the training error over that quarter
    crossed: float | None = None  # epochs to reach TARGET
    stopped: str = ""
    seconds: float = 0.0

    def first_below(self, threshold: float) -> float | None:
        """Epochs until the training error first was at or below `threshold`."""
        return next((e for e, v in zip(self.epochs, self.errors) if v <= threshold), None)

    def to_json(self, curve: bool = True) -> dict:
        out = {"activation": self.activation, "lr": self.lr, "seed": self.seed, "epochs_to_target": self.crossed,
               "stopped": self.stopped, "seconds": round(self.seconds, 2)}
        if curve:
            out["curve"] = {"epochs": [round(e, 4) for e in self.epochs],
                            "train_error": [round(v, 4) for v in self.errors]}
        return out


def train_run(x, y, activation: str, init: str, lr: float, seed: int, max_epochs: float, stop_at_target: bool,
              give_up_after: float = math.inf) -> Run:
    """Train from scratch; the run ends at `max_epochs`, at the target (if `stop_at_target`),
    at `give_up_after` epochs (it can no longer win), or when the loss is not finite."""
    torch.manual_seed(seed)
    model = four_layer_net(activation, init)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    rng = np.random.default_rng(seed)
    n = len(y)
    steps = math.ceil(n / BATCH)
    bounds = [round(steps * (q + 1) / POINTS_PER_EPOCH) for q in range(POINTS_PER_EPOCH)]  # steps ending a quarter
    run = Run(activation, lr, seed)
    start = time.perf_counter()
    epoch = 0
    while epoch < max_epochs:
        order = torch.from_numpy(rng.permutation(n))
        wrong = seen = 0
        quarter = 0
        for step in range(steps):
            idx = order[step * BATCH:(step + 1) * BATCH]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            if not torch.isfinite(loss):
                run.stopped = "diverged (loss not finite)"
                run.seconds = time.perf_counter() - start
                return run
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            wrong += int((logits.detach().argmax(1) != y[idx]).sum())
            seen += len(idx)
            if step + 1 == bounds[quarter]:
                at = epoch + (quarter + 1) / POINTS_PER_EPOCH
                run.epochs.append(at)
                run.errors.append(wrong / seen)
                if run.crossed is None and wrong / seen <= TARGET:
                    run.crossed = at
                wrong = seen = 0
                quarter += 1
                if run.crossed is not None and stop_at_target:
                    run.stopped = "reached the target"
                elif run.crossed is None and at >= give_up_after:
                    run.stopped = "slower than the best rate so far"
                if run.stopped:
                    run.seconds = time.perf_counter() - start
                    return run
        epoch += 1
    run.stopped = "epoch cap"
    run.seconds = time.perf_counter() - start
    return run


# ---------------------------------------------------------------------------- the experiment
def tune(x, y, activation: str, init: str, rates, seeds, cap: int, log) -> tuple[float | None, list[Run], dict]:
    """The rate with the fewest median epochs to the target (ties: the smaller rate)."""
    runs: list[Run] = []
    scores: dict[float, float] = {}
    best = math.inf
    for lr in rates:
        mine = []
        for seed in seeds:
            # A run that has not crossed by twice the best median so far is stopped: its
            # rate could then only win if its other seeds crossed almost at once.
            run = train_run(x, y, activation, init, lr, seed, cap, stop_at_target=True, give_up_after=GIVE_UP * best)
            mine.append(run)
            log(f"  tune {activation} lr={lr:g} seed={seed}: "
                + (f"{run.crossed:g} epochs" if run.crossed is not None else run.stopped) + f" ({run.seconds:.1f} s)")
        runs += mine
        crossings = [r.crossed if r.crossed is not None else math.inf for r in mine]
        scores[lr] = statistics.median(crossings)
        best = min(best, scores[lr])
    finite = {lr: v for lr, v in scores.items() if math.isfinite(v)}
    winner = min(finite, key=lambda lr: (finite[lr], lr)) if finite else None
    return winner, runs, {f"{lr:g}": (v if math.isfinite(v) else None) for lr, v in scores.items()}


def run_setup(name: str, setup: dict, mode: str, log) -> dict:
    """Tune both activations' rates, run the winners with fresh seeds; the setup's results."""
    cfg = MODES[mode]
    rates = setup["rates"][mode]
    x, y = digits_32(setup["scale"])
    log(f"{name}: inputs 0-{setup['scale']:g} minus the mean image, {setup['init']} initialisation")
    winners, scores, tuning = {}, {}, {}
    for activation in ACTIVATIONS:
        winners[activation], runs, scores[activation] = tune(x, y, activation, setup["init"], rates,
                                                             cfg["tune_seeds"], cfg["epochs"], log)
        tuning[activation] = [r.to_json(curve=False) for r in runs]
        log(f"  {activation}: best lr {winners[activation]} (median epochs to 25% by lr: {scores[activation]})")
    finals, result = {}, {}
    for activation, lr in winners.items():
        if lr is None:
            result[activation] = {"lr": None, "epochs_to_target": [], "median_epochs": None}
            continue
        runs = [train_run(x, y, activation, setup["init"], lr, seed, cfg["epochs"], stop_at_target=False)
                for seed in cfg["seeds"]]
        finals[activation] = runs
        crossings = [r.crossed for r in runs]
        result[activation] = {
            "lr": lr, "epochs_to_target": crossings,
            "median_epochs": _median_or_none(crossings),
            "seconds_per_epoch": round(statistics.median(r.seconds / r.epochs[-1] for r in runs if r.epochs), 3),
            "best_rate_at_grid_edge": lr in (min(rates), max(rates)),
            "median_epochs_to_lower_errors": {f"{t:g}": _median_or_none([r.first_below(t) for r in runs])
                                              for t in LOWER},
            "final_train_error": [r.errors[-1] if r.errors else None for r in runs],
        }
        log(f"  {activation} at lr {lr:g}: epochs to 25% over seeds {list(cfg['seeds'])}: {crossings}")
    relu, tanh = result["relu"]["median_epochs"], result["tanh"]["median_epochs"]
    ratio = tanh / relu if relu and tanh else None
    log(f"  {name}: median epochs to 25%: ReLU {relu}, tanh {tanh}"
        + (f"; tanh/ReLU = {ratio:.2f}" if ratio else "; no ratio (a network did not reach 25%)"))
    return {
        "inputs": f"0-{setup['scale']:g} minus the mean image", "init": setup["init"],
        "grid": {"rates": list(rates), "tune_seeds": list(cfg["tune_seeds"]), "epoch_cap": cfg["epochs"],
                 "median_epochs_by_rate": scores, "best_rate": winners},
        "final_seeds": list(cfg["seeds"]),
        "result": result,
        "ratio_tanh_over_relu": ratio,
        "curves": {a: [r.to_json() for r in runs] for a, runs in finals.items()},
        "tuning_runs": tuning,
    }


def _median_or_none(values):
    return statistics.median(values) if values and None not in values else None


def plot(path: Path, setups: dict) -> None:
    """Training error against epochs per set-up, as the paper's Figure 1 (ReLU solid, tanh
    dashed); the first seed bold, the others faint."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * len(setups), 4.5), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(setups), squeeze=False)[0]
    styles = {"relu": ("-", "#1f4e9c", "ReLU"), "tanh": ("--", "#c0392b", "tanh")}
    for ax, (name, report) in zip(axes, setups.items()):
        for activation, runs in report["curves"].items():
            style, colour, label = styles[activation]
            r = report["result"][activation]
            reach = f"{r['median_epochs']:g} epochs to 25%" if r["median_epochs"] is not None else "not all seeds reach 25%"
            for i, run in enumerate(runs):
                ax.plot(run["curve"]["epochs"], run["curve"]["train_error"], style, color=colour,
                        linewidth=1.6 if i == 0 else 0.8, alpha=1.0 if i == 0 else 0.45,
                        label=f"{label} (lr {r['lr']:g}): {reach}" if i == 0 else None)
        ax.axhline(TARGET, color="0.4", linewidth=0.8, linestyle=":")
        ax.set_xlabel("epochs")
        ax.set_ylabel("training error rate")
        ax.set_ylim(0, 0.95)
        ax.set_xlim(0, max(e for runs in report["curves"].values() for run in runs for e in run["curve"]["epochs"]))
        ratio = report["ratio_tanh_over_relu"]
        ax.set_title(f"{name}: inputs {report['inputs'].split(' minus')[0]}, {report['init']} init\n"
                     + (f"tanh needs {ratio:.2f}x the epochs of ReLU (paper: 6x)" if ratio else "no ratio"),
                     fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Figure 1 on scikit-learn digits (32x32): a four-layer conv net, ReLU vs tanh", fontsize=10)
    fig.savefig(path, metadata={"Software": None})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rates and seeds, lower epoch cap (~2 min)")
    parser.add_argument("--setup", choices=sorted(SETUPS), action="append",
                        help="run only this set-up (repeatable; default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda text: print(text, flush=True)  # noqa: E731
    started = time.perf_counter()
    setups = {name: run_setup(name, SETUPS[name], mode, log) for name in (args.setup or SETUPS)}
    payload = {
        "benchmark": "relu_vs_tanh",
        "what": "epochs for a four-layer conv net to reach 25% training error with ReLU vs tanh (paper Figure 1)",
        "mode": mode,
        "dataset": {"name": "scikit-learn digits", "images": 1797, "classes": 10,
                    "size": f"8x8 upsampled to {SIZE}x{SIZE} (bilinear)", "split": "all images are training images"},
        "network": "conv5x5x32-act-maxpool3/2, conv5x5x32-act-avgpool3/2, conv5x5x64-act-avgpool3/2, fc10 "
                   "(cuda-convnet's layers-80sec without its fc64)",
        "training": {"optimizer": "SGD", "momentum": MOMENTUM, "batch_size": BATCH, "lr_schedule": "constant",
                     "weight_decay": 0, "regularisation": "none", "target_train_error": TARGET,
                     "train_error": f"running error over each 1/{POINTS_PER_EPOCH} epoch (as cuda-convnet reported)",
                     "tuning": f"per activation, fewest median epochs to 25%; runs stop at 25%, at {GIVE_UP:g}x the "
                               "best median so far, or at the epoch cap"},
        "setups": setups,
        "ratios_tanh_over_relu": {name: report["ratio_tanh_over_relu"] for name, report in setups.items()},
        "paper_ratio": 6.0,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine() | {"torch_threads": torch.get_num_threads()},
    }
    path = finish("relu_vs_tanh", payload, args, plot=lambda _, png: plot(png, setups))
    log(f"tanh/ReLU epochs to 25%: {payload['ratios_tanh_over_relu']} (paper: 6); {path} and its .png "
        f"in {payload['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
