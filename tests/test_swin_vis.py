"""Swin overlays: window partitions (shifted ones included), which tokens ran each block, and the picture of each
stage's own token grid (it shrinks at patch merging), tested as arrays."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import patchslim
from patchslim import SlimPlan, vis
from patchslim.tokens import Provenance

pytestmark = pytest.mark.usefixtures("one_thread")

AMBER = np.array(vis.WINDOW_COLOUR)


@pytest.fixture(scope="module")
def swin():
    """fashion-swin, random weights: 12x12 tokens in four 6x6 windows (blocks 0-3, shifted by 3 in 1 and 3), then
    6x6 tokens of 2x2 patches in one window (blocks 4-5)."""
    return patchslim.load_model("fashion-swin", device="cpu", pretrained=False)


@pytest.fixture(scope="module")
def bright_image():
    g = np.random.default_rng(0)
    return Image.fromarray((120 + g.integers(0, 100, (48, 48))).astype(np.uint8), "L")


@pytest.fixture(scope="module")
def traces(swin, bright_image):
    """The unslimmed forward and random at rho 0.5 in both stages."""
    x = swin.preprocess(bright_image)
    return patchslim.run(swin, x), patchslim.run(swin, x, SlimPlan.single("random", 0.5, stages=(0, 1), seed=2))


def _timm_window_ids(rows: int, cols: int, window: int, shift: int) -> np.ndarray:
    """Window of every grid position, the way timm's Swin block partitions it (roll, then window_partition)."""
    from timm.models.swin_transformer import window_partition

    grid = torch.arange(rows * cols).reshape(1, rows, cols, 1)
    if shift:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
    slots = window_partition(grid, (window, window)).reshape(-1)  # grid id in each window slot, window-major
    ids = torch.empty(rows * cols, dtype=torch.long)
    ids[slots] = torch.arange(rows * cols) // (window * window)
    return ids.reshape(rows, cols).numpy()


@pytest.mark.parametrize("rows,window,shift", [(12, 6, 0), (12, 6, 3), (8, 4, 2), (6, 6, 0), (14, 7, 3)])
def test_window_ids_are_timms_partition(rows, window, shift):
    ids = vis.window_ids((rows, rows), (window, window), (shift, shift))
    assert np.array_equal(ids, _timm_window_ids(rows, rows, window, shift))
    assert np.bincount(ids.ravel()).tolist() == [window * window] * (rows // window) ** 2


def test_a_shifted_partition_wraps_around_the_edges():
    ids = vis.window_ids((12, 12), (6, 6), (3, 3))
    assert (ids[3:9, 3:9] == ids[3, 3]).all()  # the centre is one whole window
    corners = {int(ids[0, 0]), int(ids[0, 11]), int(ids[11, 0]), int(ids[11, 11])}
    assert len(corners) == 1  # the four corners are pieces of one window
    with pytest.raises(ValueError, match="does not tile"):
        vis.window_ids((12, 12), (5, 5))


def test_window_edges_run_between_windows_only():
    horizontal, vertical = vis.window_edges(vis.window_ids((12, 12), (6, 6)))
    assert horizontal.shape == (11, 12) and vertical.shape == (12, 11)
    assert np.flatnonzero(horizontal.any(1)).tolist() == [5] and horizontal[5].all()
    assert np.flatnonzero(vertical.any(0)).tolist() == [5] and vertical[:, 5].all()
    horizontal, vertical = vis.window_edges(vis.window_ids((12, 12), (6, 6), (3, 3)))
    assert np.flatnonzero(horizontal.any(1)).tolist() == [2, 8]
    assert np.flatnonzero(vertical.any(0)).tolist() == [2, 8]


def test_window_status_at_each_stage(swin, traces):
    base, slim = traces
    for block in range(6):
        status = vis.window_status(slim, block)
        shape = swin.spec.blocks[block]
        assert status.grid == shape.grid and status.cell == shape.cell and status.stage == shape.stage
        ran = np.zeros(shape.tokens, dtype=bool)
        ran[slim.blocks[block].provenance.ids[0].numpy()] = True
        assert np.array_equal(status.status.ravel() != vis.DROPPED, ran)
        assert status.ran_per_window.tolist() == [shape.window_tokens // 2] * shape.windows  # the same k everywhere
        assert np.array_equal(status.windows, vis.window_ids(shape.grid, shape.window, shape.shift))
        unslimmed = vis.window_status(base, block)
        assert (unslimmed.status == vis.KEPT).all()
    assert vis.window_status(slim, 1).num_windows == 4 and vis.window_status(slim, 4).num_windows == 1
    assert "18 of 36 tokens ran the block in every window" in vis.window_status(slim, 0).heading()
    assert "shifted by 3" in vis.window_status(slim, 1).heading()
    assert "6x6 tokens of 2x2 patches" in vis.window_status(slim, 4).heading()
    after = vis.window_status(slim, None)  # every token is back after the last block
    assert after.grid == (6, 6) and (after.status == vis.KEPT).all()


def test_window_status_reads_merged_tokens(swin, traces):
    _, slim = traces
    record = slim.blocks[4]  # 6x6 tokens, each standing for 2x2 patches
    dense = Provenance(144, ids=torch.arange(36).unsqueeze(0), cell=2, grid=(12, 12)).dense()[0]  # [36, 144]
    merged = torch.cat([dense[:1] + dense[1:2], dense[2:35]])  # tokens 0 and 1 merged, token 35 gone
    blocks = list(slim.blocks)
    blocks[4] = dataclasses.replace(record, provenance=Provenance(144, weights=merged.unsqueeze(0)))
    status = vis.window_status(dataclasses.replace(slim, blocks=blocks), 4).status.ravel()
    assert status[:2].tolist() == [vis.MERGED] * 2
    assert status[35] == vis.DROPPED
    assert (status[2:35] == vis.KEPT).all()


def _is_amber(pixels: np.ndarray) -> np.ndarray:
    return (np.abs(pixels.astype(int) - AMBER) <= 1).all(-1)


@pytest.mark.parametrize("block,tokens,borders,inner", [
    (0, 12, [6], [3, 9]),  # stage 0: four windows
    (1, 12, [3, 9], [6]),  # stage 0, shifted by 3: the borders move, the wrapped windows' pieces meet the edge
    (4, 6, [], [2, 3]),  # stage 1: 6x6 tokens of 2x2 patches in one window
])
def test_window_overlay_draws_the_blocks_own_grid(swin, traces, bright_image, block, tokens, borders, inner):
    base, slim = traces
    picture = np.asarray(vis.window_overlay(bright_image, swin, slim, block, legend=False))
    px = picture.shape[0] // tokens
    assert picture.shape == (tokens * px, tokens * px, 3) and px * tokens >= vis.DISPLAY_SIDE
    mid = px // 2
    for k in borders:  # a window border crosses every token row at x = k * px
        column = picture[mid::px, k * px]
        assert _is_amber(column).all(), (block, k)
    for k in inner:  # between tokens of one window: a thin line, not a border
        column = picture[mid::px, k * px]
        assert not _is_amber(column).any(), (block, k)
    assert _is_amber(picture[:, 0]).all() and _is_amber(picture[0, :]).all()  # the frame
    # tokens that sat the block out are darker than in the unslimmed picture; the ones that ran are unchanged
    clear = np.asarray(vis.window_overlay(bright_image, swin, base, block, legend=False)).astype(float)
    status = vis.window_status(slim, block).status

    sat_out = status == vis.DROPPED
    assert sat_out.any() and (~sat_out).any()
    lo, hi = max(2, px // 4), px - max(2, px // 4)
    inside = picture.astype(float).reshape(tokens, px, tokens, px, 3)[:, lo:hi, :, lo:hi].mean(axis=(1, 3, 4))
    inside_clear = clear.reshape(tokens, px, tokens, px, 3)[:, lo:hi, :, lo:hi].mean(axis=(1, 3, 4))
    assert (inside[sat_out] < 0.6 * inside_clear[sat_out]).all()
    assert np.allclose(inside[~sat_out], inside_clear[~sat_out], atol=2)


def test_the_picture_keeps_its_size_while_the_grid_shrinks(swin, traces, bright_image):
    _, slim = traces
    sizes = {b: vis.window_overlay(bright_image, swin, slim, b, legend=False).size for b in (0, 3, 4, None)}
    assert len(set(sizes.values())) == 1
    with_legend = vis.window_overlay(bright_image, swin, slim, 4)
    assert with_legend.width == sizes[4][0] and with_legend.height > sizes[4][1]  # title and legend added


def test_patch_overlay_draws_windows_for_a_swin(swin, traces, bright_image):
    _, slim = traces
    x = swin.preprocess(bright_image)
    assert np.array_equal(np.asarray(vis.patch_overlay(x, swin, slim, 2, legend=False)),
                          np.asarray(vis.window_overlay(bright_image, swin, slim, 2, legend=False)))


def test_window_status_refuses_a_plain_vit(fashion_random, bright_image):
    trace = patchslim.run(fashion_random, fashion_random.preprocess(bright_image))
    with pytest.raises(ValueError, match="not a windowed model"):
        vis.window_status(trace, 0)
