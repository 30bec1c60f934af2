"""evaluate() (model/evaluate.py) against oracles that share no code with it: errors worked
out by hand, a numpy ranking of hand-made logits with more than 5 classes (so that top-5
can be wrong), and a real two-process gloo evaluation whose counts must add up to one
process's."""
from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from alexprep.model.evaluate import evaluate


class StoredLogits(torch.nn.Module):
    """A "model" whose logits are its input: an image of shape (1, 1, K) holds one row of K
    logits, so that a test decides every score evaluate() ranks. The parameter tells
    evaluate() the device, as a real model's do."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):  # (N, 1, 1, K) -> (N, K)
        return x.flatten(1) + self.anchor


def centre_batches(logits: np.ndarray, labels: np.ndarray, sizes) -> list:
    """What an eval loader yields with crops=1, cut in batches of `sizes`: (B, 1, 1, K)."""
    out, at = [], 0
    for size in sizes:
        out.append((torch.from_numpy(logits[at:at + size, None, None, :]).float(),
                    torch.from_numpy(labels[at:at + size])))
        at += size
    assert at == len(labels)
    return out


def ten_crop_batches(logits: np.ndarray, labels: np.ndarray, sizes) -> list:
    """crops=10: images (B, 10, 1, 1, K) from logits (N, 10, K)."""
    out, at = [], 0
    for size in sizes:
        out.append((torch.from_numpy(logits[at:at + size, :, None, None, :]).float(),
                    torch.from_numpy(labels[at:at + size])))
        at += size
    return out


def numpy_errors(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-5 error, by counting how many classes score above the label's."""
    above = (scores > scores[np.arange(len(labels)), labels][:, None]).sum(axis=1)
    return float(np.mean(above >= 1)), float(np.mean(above >= 5))


def softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------- worked by hand
def test_errors_worked_out_by_hand():
    """Six classes, four images: the label ranked 1st, 3rd, 5th and 6th. Top-1 misses three
    of four; top-5 misses only the last."""
    logits = np.array([
        [9, 1, 2, 3, 4, 5],  # label 0 (9): first
        [6, 9, 4, 1, 2, 3],  # label 2 (4): 6 and 9 above it, third
        [1, 5, 4, 2, 9, 3],  # label 0 (1): all five others above it, sixth
        [5, 4, 3, 2, 1, 9],  # label 3 (2): 5, 4, 3 and 9 above it, fifth
    ], np.float32)
    labels = np.array([0, 2, 0, 3], np.int64)
    result = evaluate(StoredLogits(), centre_batches(logits, labels, [3, 1]))
    assert (result.count, result.crops) == (4, 1)
    assert result.top1_error == 3 / 4
    assert result.top5_error == 1 / 4


def test_ten_crops_average_the_softmax_not_the_logits():
    """One image, label 0. One crop is sure of class 0 (logit 20), nine lean to class 1 by
    one logit. Averaged probabilities: class 1 (9 * e / (e + 5) / 10 = 0.317) beats class
    0 ((1 + 9 / (e + 5)) / 10 = 0.217): a top-1 miss. Averaged logits would pick class 0
    (2.0 against 0.9), and the sure crop alone would too."""
    crops = np.zeros((1, 10, 6), np.float32)
    crops[0, :, 1] = 1.0
    crops[0, 4] = [20, 0, 0, 0, 0, 0]  # the centre crop
    labels = np.array([0], np.int64)
    result = evaluate(StoredLogits(), ten_crop_batches(crops, labels, [1]))
    assert (result.count, result.crops) == (1, 10)
    assert result.top1_error == 1.0 and result.top5_error == 0.0
    assert evaluate(StoredLogits(), centre_batches(crops[:, 4], labels, [1])).top1_error == 0.0


# ---------------------------------------------------------------------------- against numpy
CLASSES = 8  # more than 5: a label can fall outside the top 5


def _random_case(n: int, crops: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (n, CLASSES) if crops == 1 else (n, crops, CLASSES)
    logits = (rng.standard_normal(shape) * 3).astype(np.float32)
    return logits, rng.integers(0, CLASSES, n).astype(np.int64)


def test_one_crop_errors_equal_numpys():
    logits, labels = _random_case(203, 1, seed=0)
    want1, want5 = numpy_errors(logits.astype(np.float64), labels)
    assert 0.5 < want1 < 1 and 0.1 < want5 < 0.6  # both can be wrong: the comparison has teeth
    result = evaluate(StoredLogits(), centre_batches(logits, labels, [64, 64, 64, 11]))
    assert result.count == 203 and result.crops == 1
    assert result.top1_error == pytest.approx(want1, abs=1e-12)
    assert result.top5_error == pytest.approx(want5, abs=1e-12)


def test_ten_crop_errors_equal_numpys():
    logits, labels = _random_case(97, 10, seed=1)
    probs = softmax64(logits).mean(axis=1)  # (N, K): each crop's softmax, averaged
    want1, want5 = numpy_errors(probs, labels)
    # What a wrong reduction would report differs here, so that the test can tell:
    assert numpy_errors(logits.astype(np.float64).mean(axis=1), labels) != (want1, want5)  # mean logits
    assert numpy_errors(logits[:, 4].astype(np.float64), labels) != (want1, want5)  # the centre crop alone
    result = evaluate(StoredLogits(), ten_crop_batches(logits, labels, [40, 40, 17]))
    assert result.count == 97 and result.crops == 10
    assert result.top1_error == pytest.approx(want1, abs=1e-12)
    assert result.top5_error == pytest.approx(want5, abs=1e-12)


def test_the_model_is_left_in_the_mode_it_was_in():
    model = StoredLogits().train()
    logits, labels = _random_case(4, 1, seed=2)
    evaluate(model, centre_batches(logits, labels, [4]))
    assert model.training
    evaluate(model.eval(), centre_batches(logits, labels, [4]))
    assert not model.training


def test_an_empty_split_is_refused():
    with pytest.raises(ValueError, match="empty"):
        evaluate(StoredLogits(), [])


# ---------------------------------------------------------------------------- two processes
RANK_SCRIPT = '''
"""One rank of a two-process gloo evaluation (started by test_evaluate.py)."""
import json, os, sys

import torch


def make_model():
    """A small seeded model with 10 outputs (the build has 4 classes: top-5 can miss)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.AvgPool2d(28), torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))


if __name__ == "__main__":
    import torch.distributed as dist
    from alexprep.imagenet_prep.loaders import eval_loader
    from alexprep.model.evaluate import evaluate

    build, rank = sys.argv[1], int(os.environ["RANK"])
    dist.init_process_group("gloo")  # MASTER_ADDR=127.0.0.1, MASTER_PORT, RANK, WORLD_SIZE
    loader = eval_loader(build, batch_size=4, device="cpu", crops=10, rank=rank, world_size=2, backend="torch",
                         workers=0)
    mine = sum(len(b) for b in loader.plan())
    result = evaluate(make_model(), loader)
    loader.close()
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "mine": mine, **result.to_json()}))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_count_and_err_as_one(stats_build_raw, tmp_path):
    """Two ranks (real processes, gloo over 127.0.0.1) evaluate halves of the 12-image val
    split with 10 crops: each reports the whole split's count and errors, equal to one
    process's evaluation of the whole split."""
    from alexprep.imagenet_prep.loaders import eval_loader

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    with eval_loader(stats_build_raw, batch_size=5, device="cpu", crops=10, backend="torch", workers=0) as loader:
        alone = evaluate(runpy.run_path(str(script))["make_model"](), loader)
    assert alone.count == 12 and alone.crops == 10
    assert 0 < alone.top1_error < 1 and 0 < alone.top5_error < alone.top1_error  # neither error is trivial

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(stats_build_raw)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["mine"] for r in ranks] == [6, 6]  # each rank saw half ...
    for r in ranks:  # ... and reports the sums over both
        assert (r["count"], r["crops"]) == (12, 10)
        assert (r["top1_error"], r["top5_error"]) == (alone.top1_error, alone.top5_error)


# ---------------------------------------------------------------------------- batches per rank
def test_rank_batch_size_splits_the_global_batch_and_tenths_it_for_ten_crops():
    from alexprep.imagenet_prep.errors import DataError
    from alexprep.model.config import rank_batch_size

    assert [rank_batch_size(128, 1), rank_batch_size(128, 1, 10)] == [128, 12]
    assert [rank_batch_size(128, 2, 1), rank_batch_size(128, 2, 10), rank_batch_size(128, 2, train=True)] == [64, 6, 64]
    assert rank_batch_size(8, 4, 10) == 1  # never an empty batch
    assert rank_batch_size(10, 3, 1) == 3  # evaluation need not divide: batches do not change the errors
    with pytest.raises(DataError, match="batch size 10 is not divisible by the 3 ranks"):
        rank_batch_size(10, 3, train=True)


TRAINER_EVAL_SCRIPT = '''
import json, os, sys

import torch


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.AvgPool2d(28), torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))


def evaluate_as_the_trainer(build, ranks):
    """The trainer's validation and 10-crop loaders (train.make_eval_loader) at a global
    batch of 40: each crop setting's batch on this rank, its batches' sizes, its errors."""
    from alexprep.model.config import TrainConfig
    from alexprep.model.evaluate import evaluate
    from alexprep.model.train import loader_options, make_eval_loader

    config = TrainConfig(batch_size=40, backend="torch")
    common = {**loader_options(config, ranks, torch.device("cpu")), "workers": 0}
    out = {}
    for crops in (1, 10):
        loader = make_eval_loader(build, config, common, None, crops)
        sizes = [len(batch) for batch in loader.plan()]
        out[crops] = {"batch": loader.config.batch_size, "sizes": sizes, **evaluate(make_model(), loader).to_json()}
        loader.close()
    return out


if __name__ == "__main__":
    import torch.distributed as dist
    from alexprep.model.distributed import Ranks

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")  # MASTER_ADDR=127.0.0.1, MASTER_PORT, RANK, WORLD_SIZE
    out = evaluate_as_the_trainer(sys.argv[1], Ranks(rank, 2))
    dist.destroy_process_group()
    print(json.dumps(out))
'''


def test_two_ranks_split_the_trainers_eval_batch_on_an_odd_split(tmp_path):
    """The trainer's evaluation over two real ranks (gloo) on a 9-image split: each rank's
    batch is half the global batch (20), a tenth of that with 10 crops (2), the ranks take
    4 and 5 images, and both report the one-process errors over all 9."""
    from alexprep.imagenet_prep.build import BuildConfig, build_shards
    from alexprep.imagenet_prep.sample_data import write_photo_tree
    from alexprep.imagenet_prep.stats import compute_stats, write_stats
    from alexprep.imagenet_prep.transform import ImageSpec

    write_photo_tree(tmp_path / "tree", classes=3, train_per_class=2, val_per_class=3, seed=2)
    build = tmp_path / "out"
    build_shards(tmp_path / "tree", build, BuildConfig(spec=ImageSpec(encoding="raw"), shard_size=4, workers=1))
    write_stats(build, compute_stats(build))
    script = tmp_path / "rank.py"
    script.write_text(TRAINER_EVAL_SCRIPT)
    from alexprep.model.distributed import Ranks

    alone = runpy.run_path(str(script))["evaluate_as_the_trainer"](str(build), Ranks())
    assert [alone[c]["batch"] for c in (1, 10)] == [40, 4] and alone[1]["sizes"] == [9]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(build)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    ranks = [{int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()} for out, _ in outputs]
    assert [r[1]["batch"] for r in ranks] == [20, 20] and [r[10]["batch"] for r in ranks] == [2, 2]
    assert [r[1]["sizes"] for r in ranks] == [[4], [5]]
    assert [r[10]["sizes"] for r in ranks] == [[2, 2], [2, 2, 1]]
    for r in ranks:
        for crops in (1, 10):
            assert (r[crops]["count"], r[crops]["crops"]) == (9, crops)
            assert (r[crops]["top1_error"], r[crops]["top5_error"]) == (alone[crops]["top1_error"],
                                                                      alone[crops]["top5_error"])
