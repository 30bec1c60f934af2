"""benchmarks/loader_throughput.py's protocol (issue 29): each contender is timed one whole
epoch at a time, its first batches untimed, epoch 1 dropped, ratios paired by round."""
import pytest

from benchmarks import loader_throughput as lt


def test_an_epoch_times_all_but_its_first_batches(stats_build, closes):
    """Our loader's epochs through time_epoch: 32 images at batch 4 are 8 batches, 3 of them
    untimed; the next epoch continues the loader's stream and is timed the same way."""
    from alexprep.imagenet_prep.loaders import train_loader

    loader = closes(train_loader(stats_build, batch_size=4, device="cpu", seed=0, backend="torch", workers=0))
    assert len(loader) == 8
    for epoch in range(2):
        got = lt.time_epoch(loader.__iter__, 3, lambda: None)
        assert (got["batches"], got["images"]) == (5, 20), epoch
        assert got["seconds"] > 0 and got["untimed_s"] > 0
    assert loader.epoch == 2


def test_the_first_epoch_is_dropped_and_ratios_pair_epochs_of_the_same_round():
    def epochs(rates):
        return [{"images": 100, "seconds": 100 / r, "batches": 4, "untimed_s": 0.1} for r in rates]

    results = lt.summarize({"dali-arrow": epochs([5, 200, 300, 250]), "ffcv-jpeg": epochs([9, 100, 300, 125])},
                           lt.CONTENDERS["paper"])
    assert results["dali-arrow"]["median"] == pytest.approx(250)  # 5 images/s (epoch 1) dropped
    assert results["dali-arrow"]["first_epoch_dropped"]["images_per_s"] == pytest.approx(5)
    assert "ToTorchImage" in results["ffcv-jpeg"]["note"] and "no mean image" in results["ffcv-jpeg"]["note"]
    _, per_epoch = lt.ratios(results)
    ratio = per_epoch["dali_arrow_over_ffcv_jpeg"]
    assert ratio["per_repeat"] == pytest.approx([2.0, 1.0, 2.0])  # round by round, not sorted medians
    assert lt.targets("paper", per_epoch)["dali_arrow_over_ffcv_jpeg"] == {"at_least": 1.0, "measured": 2.0,
                                                                          "met": True}
    assert lt.targets("paper", per_epoch)["torch_twin_over_ffcv_jpeg"]["met"] is None  # not run


@pytest.mark.parametrize("argv, why", [(["--images", "300", "--batch-size", "64"], "at least 384 images"),
                                       (["--images", "1024", "--epochs", "1"], "--epochs 1"),
                                       (["--only", "rrc-dali"], "no contender rrc-dali in the paper recipe")])
def test_a_run_that_cannot_time_an_epoch_is_refused_before_any_work(argv, why, capsys):
    with pytest.raises(SystemExit) as exit_:
        lt.main(["--quick", "--workers", "2", *argv])
    assert exit_.value.code == 2
    assert why in capsys.readouterr().err


def test_a_work_folder_that_holds_files_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "tars").mkdir()  # what an earlier run left there
    with pytest.raises(SystemExit) as exit_:
        lt.main(["--quick", "--workers", "2", "--work", str(tmp_path)])
    assert exit_.value.code == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["tars"]  # nothing built there
