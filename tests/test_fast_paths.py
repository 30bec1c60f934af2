"""The fast paths behind the benchmarks: outer_sum's row layout stays exact for any pixel
count, and SplitSamples.views gives exactly the per-sample views."""
from __future__ import annotations

import numpy as np
import pytest

from alexprep.imagenet_prep.samples import SplitSamples
from alexprep.imagenet_prep.shards import read_split
from alexprep.imagenet_prep.stats import outer_sum


@pytest.mark.parametrize("pixels", [1, 2, 255, 256, 257, 65535, 65537, 3 * 65536 + 5])
def test_outer_sum_is_exact_for_any_pixel_count(pixels):
    rng = np.random.default_rng(pixels)
    for x in (rng.integers(0, 256, (pixels, 3), dtype=np.uint8), np.full((pixels, 3), 255, np.uint8),
              rng.integers(250, 256, (pixels, 3), dtype=np.uint8)):
        wide = x.astype(np.int64)
        np.testing.assert_array_equal(outer_sum(x), wide.T @ wide)


def test_outer_sum_of_a_strided_view_and_of_wrong_shapes():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)[::3, 1::2]  # not contiguous
    wide = x.reshape(-1, 3).astype(np.int64)
    np.testing.assert_array_equal(outer_sum(x), wide.T @ wide)
    with pytest.raises(ValueError):
        outer_sum(np.zeros((5, 4), np.uint8).reshape(-1)[:10])


def test_views_are_the_per_sample_views(stats_build):
    samples = SplitSamples(read_split(stats_build, "train"))
    rng = np.random.default_rng(0)
    for indices in (rng.permutation(len(samples)), np.arange(3), [5, 0, 5], np.array([], np.int64)):
        got = samples.views(indices)
        want = [samples.view(int(i)) for i in indices]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == np.uint8 and np.shares_memory(g, w) and np.array_equal(g, w)
