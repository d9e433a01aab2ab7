"""Pictures: overlays have the right size, dropped patches are darker, merges and low-rank are drawn."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import patchslim
from patchslim import vis
from patchslim.tokens import Provenance


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bright_image():
    """A mid-grey textured picture (so darkening is measurable everywhere)."""
    g = np.random.default_rng(0)
    return Image.fromarray((120 + g.integers(0, 100, (48, 48))).astype(np.uint8), "L")


def _cell_means(picture: Image.Image, rows: int, cols: int) -> np.ndarray:
    a = np.asarray(picture.convert("L"), dtype=np.float64)
    cell = a.shape[0] // rows
    return a.reshape(rows, cell, cols, cell).mean(axis=(1, 3))


def test_model_view_matches_the_input_size(fashion_random, bright_image):
    view = vis.model_view(bright_image, fashion_random)
    assert view.size == (48, 48) and view.mode == "RGB"
    # from the input tensor too, and the two agree
    x = fashion_random.preprocess(bright_image)
    assert np.array_equal(np.asarray(vis.model_view(x, fashion_random)), np.asarray(view))


def test_patch_overlay_size_and_darker_dropped_patches(fashion_random, bright_image):
    trace = patchslim.run(fashion_random, bright_image, patchslim.SlimPlan.single("random", 0.5))
    picture = vis.patch_overlay(bright_image, fashion_random, trace, legend=False)
    rows, cols = fashion_random.spec.grid_size
    assert picture.width % cols == 0 and picture.width == picture.height
    assert picture.width >= vis.DISPLAY_SIDE
    means = _cell_means(picture, rows, cols)
    kept = trace.patch_mask()[0].reshape(rows, cols).numpy()
    assert 0 < kept.sum() < kept.size
    assert means[~kept].max() < means[kept].min()
    with_legend = vis.patch_overlay(bright_image, fashion_random, trace)
    assert with_legend.width == picture.width and with_legend.height > picture.height


def test_patch_overlay_block_argument(fashion_random, bright_image):
    plan = patchslim.SlimPlan.single("random", 0.5, blocks=(2,))
    trace = patchslim.run(fashion_random, bright_image, plan)
    rows, cols = fashion_random.spec.grid_size
    before = _cell_means(vis.patch_overlay(bright_image, fashion_random, trace, block=1, legend=False), rows, cols)
    after = _cell_means(vis.patch_overlay(bright_image, fashion_random, trace, block=2, legend=False), rows, cols)
    assert (before > 60).all()  # nothing dropped before block 2
    assert (after < 60).sum() == rows * cols - trace.blocks[2].provenance.count


def test_patch_status_merged_and_lowrank():
    n = 16
    rows = []
    for group in ([0, 1, 4, 5], [2, 3], [6]):
        w = torch.zeros(n)
        w[group] = 1.0 / len(group)  # normalized weights are fine too
        rows.append(w)
    merged = Provenance(n, weights=torch.stack(rows)[None])
    status = vis.patch_status(merged, (4, 4))
    assert status.counts == {"kept": 1, "merged": 6, "dropped": 9, "low-rank": 0}
    assert status.merged_tokens == 2
    lowrank = vis.patch_status(Provenance(n, weights=torch.randn(1, 3, n)), (4, 4))
    assert lowrank.is_lowrank and lowrank.loading.max() == pytest.approx(1.0)


def test_patch_overlay_draws_merges_and_lowrank(fashion_random, bright_image):
    trace = patchslim.run(fashion_random, bright_image)
    n = fashion_random.num_patches
    weights = torch.zeros(1, n // 2, n)
    for j in range(n // 2):
        weights[0, j, 2 * j: 2 * j + 2] = 1.0
    merged = dataclasses.replace(trace, final_provenance=Provenance(n, weights=weights))
    picture = vis.patch_overlay(bright_image, fashion_random, merged, legend=False)
    plain = vis.patch_overlay(bright_image, fashion_random, trace, legend=False)
    assert picture.size == plain.size
    rgb = np.asarray(picture, dtype=np.int64)
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 30).mean() > 0.3  # tinted in colour, the input is grey
    lowrank = dataclasses.replace(trace, final_provenance=Provenance(n, weights=torch.randn(1, 8, n)))
    assert vis.patch_overlay(bright_image, fashion_random, lowrank).width > plain.width  # has a colour bar


def test_heatmap_overlay_size_colourbar_and_nan(bright_image):
    values = np.linspace(0, 1, 144).reshape(12, 12)
    values[0, 0] = np.nan
    bare = vis.heatmap_overlay(bright_image.convert("RGB"), values, legend=False)
    assert bare.size == (480, 480)
    with_bar = vis.heatmap_overlay(bright_image.convert("RGB"), values, vmin=0, vmax=2, title="a map")
    assert with_bar.width > bare.width and with_bar.height > bare.height
    means = _cell_means(bare, 12, 12)
    assert means[0, 0] < means[0, 1]  # the dropped cell is darker than its neighbour


def test_heatmap_cells_are_exactly_the_colour_map_of_their_value(bright_image):
    """Colour is computed per patch and spread over the patch's pixels: with alpha 1 every pixel of a
    present cell is the colour map of that cell's scaled value; a NaN cell is dimmed and hatched."""
    values = np.random.default_rng(1).random((12, 12))
    values[3, 4] = np.nan
    picture = np.asarray(vis.heatmap_overlay(bright_image, values, vmin=0, vmax=1, legend=False, alpha=1.0))
    cell = picture.shape[0] // 12
    cells = picture.reshape(12, cell, 12, cell, 3)
    expected = vis.apply_colormap(np.nan_to_num(values))
    for r in range(12):
        for c in range(12):
            block = cells[r, :, c, :, :]
            if (r, c) == (3, 4):
                assert not (block == expected[r, c]).all(axis=-1).any()
                assert (block == vis.HATCH_COLOUR).all(axis=-1).any()  # the stripes
            else:
                assert (block == expected[r, c]).all(), (r, c)


def test_fixed_scale_makes_maps_comparable(bright_image):
    low = np.full((12, 12), 0.2)
    high = np.full((12, 12), 0.8)
    a = vis.heatmap_overlay(bright_image, low, vmin=0, vmax=1, legend=False, alpha=1.0)
    b = vis.heatmap_overlay(bright_image, high, vmin=0, vmax=1, legend=False, alpha=1.0)
    assert np.asarray(a).mean() < np.asarray(b).mean()  # inferno: brighter for higher values


def test_colormap_and_legend():
    rgb = vis.apply_colormap(np.array([0.0, 0.5, 1.0, np.nan]), "viridis")
    assert rgb.shape == (4, 3) and rgb.dtype == np.uint8
    with pytest.raises(ValueError, match="unknown colour map"):
        vis.apply_colormap(np.zeros(2), "jet")
    legend = vis.overlay_legend(width=300)
    assert legend.width == 300 and legend.height > 20


def test_plotly_figures(fashion_random, bright_image):
    values = np.random.default_rng(1).random((12, 12))
    values[3, 3] = np.nan
    fig = vis.heatmap_figure(bright_image, values, vmin=0, vmax=1, title="t")
    assert len(fig.data) == 3
    trace = patchslim.run(fashion_random, bright_image, patchslim.SlimPlan.single("random", 0.5))
    fig = vis.patch_figure(bright_image, fashion_random, trace)
    assert "dropped" in " ".join(str(t) for t in fig.data[1].text.ravel())
