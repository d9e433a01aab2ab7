"""Explanations of a Swin: the attention each token received in its window, upsampled to the patches through
provenance; CLS attention and rollout refused with a reason; captum attributions through the one forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patchslim
from patchslim import SlimPlan, bundled
from patchslim.vis import window_ids
from patchslim.errors import ExplanationError, PatchslimError
from patchslim.explain import attention, explain
from patchslim.explain.attribution import integrated_gradients, occlusion

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def swin():
    return patchslim.load_model("fashion-swin", device="cpu", pretrained=False)


@pytest.fixture(scope="module")
def x(fashion_sample):
    """One canvas test image as the model's input ``[1, 1, 48, 48]``."""
    images, _ = fashion_sample
    return bundled.to_model_input(images[:1])


@pytest.fixture(scope="module")
def slim_trace(swin, x):
    return patchslim.run(swin, x, SlimPlan.single("random", 0.5, stages=(0, 1), seed=1, attention_blocks="all"))


def test_a_swin_has_no_class_token_maps_and_says_why(swin, fashion_random, slim_trace):
    reason = attention.class_token_refusal(swin.spec)
    assert reason and "no class token" in reason and "window" in reason
    assert attention.class_token_refusal(fashion_random.spec) is None
    with pytest.raises(ExplanationError, match="no class token"):
        attention.cls_attention(slim_trace, 2)
    with pytest.raises(ExplanationError, match="no class token"):
        attention.rollout(slim_trace)
    with pytest.raises(ExplanationError, match="windowed"):
        attention.rollout_matrix(slim_trace)
    assert issubclass(ExplanationError, PatchslimError)


def test_window_attention_is_the_received_map_spread_over_each_tokens_patches(swin, x, slim_trace):
    for block in range(swin.spec.depth):
        shape = swin.spec.blocks[block]
        grid = attention.window_attention(slim_trace, block)
        assert grid.shape == (12, 12)
        received = slim_trace.attention[block][0, 0, 0].double().numpy().reshape(shape.grid)
        c = shape.cell
        ran = slim_trace.blocks[block].provenance.patch_mask()[0].numpy().reshape(12, 12)
        assert np.array_equal(np.isnan(grid), ~ran)  # NaN exactly where the token sat the block out
        for r in range(shape.grid[0]):
            for col in range(shape.grid[1]):
                square = grid[r * c:(r + 1) * c, col * c:(col + 1) * c]
                if np.isfinite(square).all():
                    assert np.allclose(square, received[r, col])  # every patch of the token: its value
    # unslimmed, every window's received attention sums to 1 (softmax rows averaged over the window's queries)
    base = patchslim.run(swin, x, SlimPlan(attention_blocks="all"))
    for block in (0, 1, 4):
        shape = swin.spec.blocks[block]
        grid = attention.window_attention(base, block)
        assert not np.isnan(grid).any()
        windows = np.repeat(np.repeat(window_ids(shape.grid, shape.window, shape.shift), shape.cell, 0), shape.cell, 1)
        sums = np.bincount(windows.ravel(), weights=grid.ravel()) / shape.cell ** 2
        assert np.allclose(sums, 1.0, atol=1e-5)


def test_window_attention_refuses_a_plain_vit(fashion_random):
    trace = patchslim.run(fashion_random, torch.zeros(1, 1, 48, 48), SlimPlan(attention_blocks="all"))
    with pytest.raises(ExplanationError, match="windowed models"):
        attention.window_attention(trace, 0)


def test_explain_on_a_swin_gives_window_maps_and_no_rollout(swin, x):
    result = explain(swin, x, SlimPlan.single("attention", 0.5), attribution=None, attention_block=1)
    assert result.rollout_before is None and result.rollout_after is None
    assert result.attention_block == 1
    assert np.array_equal(np.isnan(result.attention_after), ~result.trace.blocks[1].provenance.patch_mask()[0]
                          .numpy().reshape(12, 12))
    assert not np.isnan(result.attention_before).any()
    assert 0.0 <= result.evidence.kept_evidence <= 1.0 and result.evidence.top_count == 14


def test_integrated_gradients_on_a_swin_go_through_the_one_forward(swin, x):
    patchslim.run(swin, x)  # what every caller does first (the app's unslimmed forward)
    plan = SlimPlan.single("uniform", 0.5)
    before = integrated_gradients(swin, x, None, n_steps=8, internal_batch_size=8)
    after = integrated_gradients(swin, x, plan, target=before.target, n_steps=8, internal_batch_size=8)
    assert before.grid.shape == after.grid.shape == (12, 12)
    assert not np.isnan(after.grid).any()  # a Swin drops no patch for good: every patch has an attribution
    assert before.convergence_delta < 0.05 and after.convergence_delta < 0.05
    assert not np.allclose(before.grid, after.grid)


def test_occlusion_on_a_swin(swin, x):
    patchslim.run(swin, x)
    result = occlusion(swin, x, SlimPlan.single("random", 0.5, stages=(0,)), perturbations_per_eval=48)
    assert result.grid.shape == (12, 12) and np.isfinite(result.grid).all()  # no patch dropped for good
    assert result.evaluations >= 144 // 48 and np.abs(result.grid).sum() > 0
