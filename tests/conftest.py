"""Shared fixtures: ImageNet-layout trees made from real photographs, and their builds.

Session-scoped and read-only: a test that changes a tree or build copies it first.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.sample_data import write_photo_tree
from alexprep.imagenet_prep.transform import ImageSpec


def _have_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


# The fast tier (`make test-fast`, `pytest -m fast`): for each module of imagenet_prep/,
# model/ and cli/, one small behavioural test that exercises it (a test id, or a test's name
# for all its parameters), plus the test that imports every module. tests/test_design.py
# checks that every module has its row, that the test exists and that its file reaches the
# module through its imports. A new module gets a row here.
FAST_TESTS = {
    "imagenet_prep.archives": "test_archives.py::test_a_truncated_train_tar_is_named_before_the_classes",
    "imagenet_prep.atomic": "test_build.py::test_deterministic_byte_identical",
    "imagenet_prep.augment": "test_augment.py::test_offsets_are_uniform_over_all_33_positions",
    "imagenet_prep.batch_slots": "test_batch_slots.py::test_take_turns_and_replaces_a_slot_still_held",
    "imagenet_prep.batches": "test_loaders.py::test_train_drops_per_rank_remainders",
    "imagenet_prep.build": "test_build.py::test_deterministic_byte_identical",
    "imagenet_prep.build_folder": "test_shards.py::test_build_folder_names_every_file_a_build_and_its_stats_write",
    "imagenet_prep.classes": "test_layout.py::test_imagefolder_labels_are_sorted_wnid_positions",
    "imagenet_prep.dali_backend": "test_loaders.py::test_channel_normalisation_and_no_lighting[dali]",
    "imagenet_prep.devices": "test_distributed.py::test_device_lists_under_torchrun",
    "imagenet_prep.errors": "test_layout.py::test_val_wnid_not_in_class_list_is_named",
    "imagenet_prep.gpu_decoders": "test_gpu_decoders.py::test_nvimgcodec_is_asked_for_by_name_and_refused_in_one_line",
    "imagenet_prep.forking": "test_loaders.py::test_torch_workers_give_the_same_batches",
    "imagenet_prep.fingerprint": "test_replay.py::test_fingerprints_are_the_builds_and_the_plans",
    "imagenet_prep.layout": "test_layout.py::test_imagefolder_labels_are_sorted_wnid_positions",
    "imagenet_prep.listing": "test_layout.py::test_listing_sorts_rows_given_in_any_order",
    "imagenet_prep.loaders": "test_docs.py::test_the_loader_example_runs_without_dali",
    "imagenet_prep.locks": "test_build.py::test_who_holds_out_is_named",
    "imagenet_prep.normalization": "test_loaders.py::test_channel_normalisation_and_no_lighting[torch]",
    "imagenet_prep.parity": "test_parity.py::test_parity_bad_input",
    "imagenet_prep.push": "test_remote.py::test_push_uploads_the_build_with_the_manifests_last",
    "imagenet_prep.remote": "test_remote.py::test_display_masks_user_info_and_query_values_and_scrub_masks_them_in_texts",
    "imagenet_prep.render": "test_loaders.py::test_channel_normalisation_and_no_lighting[torch]",
    "imagenet_prep.replay": "test_replay.py::test_replay_cli_json_grid_and_bad_input",
    "imagenet_prep.resized_crop": "test_rrc.py::test_dct_scaled_decoding_maps_the_window_exactly",
    "imagenet_prep.rrc": "test_rrc.py::test_windows_follow_torchvision_get_params",
    "imagenet_prep.run_plan": "test_replay.py::test_any_batch_of_an_imagenet_sized_plan_in_under_2_s",
    "imagenet_prep.sample_data": "test_cli.py::test_build_then_verify",
    "imagenet_prep.samples": "test_fast_paths.py::test_views_are_the_per_sample_views",
    "imagenet_prep.native": "test_render.py::test_the_kernel_takes_read_only_inputs_and_refuses_windows_outside_the_image",
    "imagenet_prep.shard_cache": "test_remote.py::test_a_cached_shard_is_reused_and_a_changed_one_fetched_again",
    "imagenet_prep.shards": "test_shards.py::test_plain_pyarrow_reads_a_shard",
    "imagenet_prep.stats": "test_stats.py::test_merging_in_any_order_gives_the_same_bits",
    "imagenet_prep.stats_plot": "test_keep_aspect.py::test_stats_files_say_there_is_no_mean_image",
    "imagenet_prep.torch_backend": "test_loaders.py::test_torch_workers_give_the_same_batches",
    "imagenet_prep.transform": "test_transform.py::test_crop_at_imagenet_sizes_is_the_exact_centre",
    "imagenet_prep.verify": "test_shards.py::test_verify_passes_a_good_build",
    "model.alexnet": "test_alexnet.py::test_parameter_count_is_the_papers",
    "model.checkpoint": "test_inspect.py::test_predictor_inputs_are_the_evaluation_loaders[1]",
    "model.config": "test_train.py::test_the_option_table_rows_are_real_fields",
    "model.distributed": "test_distributed.py::test_gpu_runs_get_a_cpu_backend_for_the_counters",
    "model.evaluate": "test_evaluate.py::test_errors_worked_out_by_hand",
    "model.figures": "test_inspect.py::test_kernel_mosaic_stretches_each_kernel_and_keeps_the_order",
    "model.inference": "test_inspect.py::test_predictor_inputs_are_the_evaluation_loaders[1]",
    "model.lrn_pool_cpu": "test_lrn_pool_cpu.py::test_alexnet_on_the_cpu_runs_the_kernel_and_computes_what_the_pytorch_path_does",
    "model.lrn_pool_kernel": "test_lrn_pool.py::test_fused_refuses_what_it_cannot_run_in_one_line",
    "model.metrics": "test_train.py::test_a_row_torn_by_a_kill_neither_breaks_nor_joins_the_next",
    "model.neighbors": "test_inspect.py::test_nearest_matches_brute_force_in_any_chunking",
    "model.optim": "test_train.py::test_paper_sgd_is_the_papers_formula_and_differs_from_pytorch_at_an_lr_drop",
    "model.predict": "test_inspect.py::test_inspect_needs_the_runs_class_list_and_an_existing_checkpoint",
    "model.replay": "test_replay.py::test_replay_cli_json_grid_and_bad_input",
    "model.train": "test_inspect.py::test_predictor_inputs_are_the_evaluation_loaders[1]",
    "cli.build": "test_cli.py::test_build_then_verify",
    "cli.common": "test_cli.py::test_bad_use_is_one_line_and_exit_2",
    "cli.demo": "test_cli.py::test_demo_without_scikit_learn_names_the_extra",
    "cli.config_options": "test_train.py::test_every_train_option_reaches_its_field[batch_size]",
    "cli.evaluate": "test_inspect.py::test_evaluate_command_counts_every_val_image_as_the_predictor_scores_it",
    "cli.inspect": "test_inspect.py::test_inspect_kernels_writes_a_png_of_the_set_size",
    "cli.info": "test_cli.py::test_version_and_info",
    "cli.main": "test_cli.py::test_every_command_has_a_summary_and_an_example",
    "cli.predict": "test_inspect.py::test_inspect_needs_the_runs_class_list_and_an_existing_checkpoint",
    "cli.provenance": "test_parity.py::test_parity_bad_input",
    "cli.push": "test_remote.py::test_push_command",
    "cli.stats": "test_stats.py::test_cli_bad_input_is_one_line",
    "cli.verify": "test_cli.py::test_build_then_verify",
    "cli.train": "test_train.py::test_every_train_option_reaches_its_field[batch_size]",
}
FAST_IMPORTS = "test_design.py::test_every_module_imports"  # the fast tier's "import all"


def _fast(nodeid: str) -> bool:
    """Whether a collected test (tests/<file>::<name>[<params>]) is in the fast tier."""
    test = nodeid.partition("tests/")[2]
    return any(test == t or test.startswith(t + "[") for t in (*FAST_TESTS.values(), FAST_IMPORTS))


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip without CUDA, `@pytest.mark.dali` ones without DALI: the
    marker alone says what a test needs (pyproject.toml declares them). FAST_TESTS get the
    `fast` marker."""
    missing = {"gpu": None if torch.cuda.is_available() else "no CUDA device",
               "dali": None if _have_dali() else "NVIDIA DALI is not installed"}
    for item in items:
        if _fast(item.nodeid):
            item.add_marker(pytest.mark.fast)
        for marker, reason in missing.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def without_kernel(tmp_path):
    """`without_kernel(script, how)` runs `script` in a child process whose compiled CPU
    kernels cannot load, and returns its stdout lines: how="no compiler" (CXX names none
    and the extension cache is new, so nothing compiled earlier is found) or "turned off"
    (ALEXPREP_CPU_KERNEL=0)."""
    def run(script: str, how: str) -> list[str]:
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
        if how == "no compiler":
            env["CXX"] = str(tmp_path / "no-such-c++")
        else:
            env["ALEXPREP_CPU_KERNEL"] = "0"
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.splitlines()
    return run


@pytest.fixture
def closes():
    """`closes(loader)` returns the loader and closes it when the test ends, pass or fail:
    its workers and shard maps do not outlive the test. Left to the garbage collector, the
    loaders of test_rrc.py or test_loaders.py made a later 3 s test take 23-30 s."""
    made = []
    yield lambda loader: made.append(loader) or loader
    for loader in made:
        loader.close()


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory) -> Path:
    """train/<wnid>/ (4 classes x 8) and val/<wnid>/ (4 classes x 3) of real-photo JPEGs."""
    root = tmp_path_factory.mktemp("photo_tree")
    write_photo_tree(root, classes=4, train_per_class=8, val_per_class=3, seed=1)
    return root


def _build(tmp_path_factory, tree: Path, name: str, **spec) -> Path:
    out = tmp_path_factory.mktemp(name) / "out"
    build_shards(tree, out, BuildConfig(spec=ImageSpec(**spec), shard_size=6, workers=2))
    return out


@pytest.fixture(scope="session")
def photo_build(tmp_path_factory, photo_tree) -> Path:
    """The build folder of photo_tree: JPEG q95 shards of 6 images (no stats.npz yet)."""
    return _build(tmp_path_factory, photo_tree, "photo_build")


@pytest.fixture(scope="session")
def photo_build_raw(tmp_path_factory, photo_tree) -> Path:
    """The same build with --encoding raw (exact pixels)."""
    return _build(tmp_path_factory, photo_tree, "photo_build_raw", encoding="raw")


def _with_stats(tmp_path_factory, build: Path, name: str) -> Path:
    import shutil

    from alexprep.imagenet_prep.stats import compute_stats, write_stats

    out = tmp_path_factory.mktemp(name) / "out"
    shutil.copytree(build, out)
    write_stats(out, compute_stats(out))
    return out


@pytest.fixture(scope="session")
def stats_build(tmp_path_factory, photo_build) -> Path:
    """A copy of photo_build with OUT/stats.npz: what the loaders and the trainer need."""
    return _with_stats(tmp_path_factory, photo_build, "stats_build")


@pytest.fixture(scope="session")
def stats_build_raw(tmp_path_factory, photo_build_raw) -> Path:
    """A copy of photo_build_raw with OUT/stats.npz."""
    return _with_stats(tmp_path_factory, photo_build_raw, "stats_build_raw")
