"""Explanations through slimming: attention maps, rollout, captum attributions, kept evidence, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import patchslim
from patchslim import explain as ex
from patchslim.cli import main as cli_main
from patchslim.plan import SlimPlan
from patchslim.tokens import Provenance

PHOTO = "/work/shared/data/photos/skimage_coffee.png"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def canvas(fashion_batch):
    """One canvas image as the model's input ``[1, 1, 48, 48]`` (an item on a black background): the first of
    the shared sample batch, so it is loaded once per session."""
    return fashion_batch[0][:1]


# --------------------------------------------------------------------------- attention maps

def test_attention_rows_sum_to_one(fashion_random, canvas):
    trace = patchslim.run(fashion_random, canvas, SlimPlan.single("random", 0.5).with_attention("all"))
    assert sorted(trace.attention) == list(range(fashion_random.spec.depth))
    for probs in trace.attention.values():
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    # the CLS row over the patches plus its attention to itself is the whole row
    grid = ex.cls_attention(trace, 3, heads="all")
    cls_self = trace.attention[3][0, :, 0, 0].numpy()
    assert np.allclose(np.nansum(grid, axis=(1, 2)) + cls_self, 1.0, atol=1e-5)


def test_cls_attention_shapes_and_nan_at_dropped(fashion_random, canvas):
    trace = patchslim.run(fashion_random, canvas, SlimPlan.single("random", 0.5).with_attention((2,)))
    rows, cols = fashion_random.spec.grid_size
    mean = ex.cls_attention(trace, 2)
    assert mean.shape == (rows, cols)
    assert ex.cls_attention(trace, 2, heads="all").shape == (fashion_random.spec.num_heads, rows, cols)
    assert ex.cls_attention(trace, 2, heads=1).shape == (rows, cols)
    kept = trace.patch_mask(2)[0].reshape(rows, cols).numpy()
    assert np.array_equal(np.isnan(mean), ~kept)
    with pytest.raises(KeyError, match="attention"):
        ex.cls_attention(trace, 4)
    with pytest.raises(ValueError, match="prefix_row"):
        ex.cls_attention(trace, 2, prefix_row=1)  # one prefix token only


def test_tokens_to_grid_merged_groups_share_their_value():
    weights = torch.zeros(1, 2, 4)
    weights[0, 0, [0, 1]] = 1.0
    weights[0, 1, [2]] = 1.0
    grid = ex.tokens_to_grid(torch.tensor([0.3, 0.7]), Provenance(4, weights=weights), (2, 2))
    assert np.allclose(grid[0], [0.3, 0.3]) and grid[1, 0] == pytest.approx(0.7) and np.isnan(grid[1, 1])


# --------------------------------------------------------------------------- rollout

def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(7)
    result = ex.rollout_product([eye] * 5)
    assert torch.allclose(result, torch.eye(7, dtype=torch.float64))
    heads = torch.eye(7).expand(3, 7, 7)  # per-head matrices are fused by the mean
    assert torch.allclose(ex.rollout_product([heads] * 2), torch.eye(7, dtype=torch.float64))


def test_rollout_product_through_a_selection():
    # 1 prefix + 3 tokens, the middle token pruned after the first block
    eye = torch.eye(4)
    keep = ex.token_transition(Provenance(3, ids=torch.tensor([[0, 1, 2]])),
                               Provenance(3, ids=torch.tensor([[0, 2]])), num_prefix=1)
    assert keep.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    result = ex.rollout_product([eye, torch.eye(3)], [keep, None])
    assert torch.allclose(result, keep.double())


def test_transition_of_a_merge_is_size_weighted():
    before = Provenance(4, weights=torch.tensor([[[1.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]]))
    after = Provenance(4, weights=torch.tensor([[[1.0, 1, 1, 0], [0, 0, 0, 1]]]))  # ToMe: 0/1 unions
    c = ex.token_transition(before, after, num_prefix=1)
    assert torch.allclose(c[1, 1:], torch.tensor([2 / 3, 1 / 3, 0], dtype=torch.float64))
    assert torch.allclose(c.sum(1), torch.ones(3, dtype=torch.float64))


def test_rollout_through_input_pruning_matches_direct_product(fashion_random, canvas):
    trace = patchslim.run(fashion_random, canvas, SlimPlan.single("random", 0.5).with_attention("all"))
    rows, cols = fashion_random.spec.grid_size
    grid = ex.rollout(trace)
    kept = trace.patch_mask()[0].numpy()
    assert grid.shape == (rows, cols)
    assert np.array_equal(np.isnan(grid.ravel()), ~kept)  # NaN exactly at the dropped patches
    # the same tokens every block: the plain product over the kept tokens, scattered to their patches
    direct = torch.eye(trace.blocks[0].tokens_attention, dtype=torch.float64)
    for b in range(fashion_random.spec.depth):
        direct = ex.residual_attention(trace.attention[b][0].double().mean(0)) @ direct
    expected = np.full(rows * cols, np.nan)
    expected[trace.kept_patch_ids()[0].numpy()] = direct[0, 1:].numpy()
    assert np.allclose(grid.ravel(), expected, equal_nan=True)


@pytest.mark.parametrize("method", ["tome", "evit", "lowrank"])
def test_rollout_through_merges_covers_the_grid(fashion_random, canvas, method):
    trace = patchslim.run(fashion_random, canvas, SlimPlan.single(method, 0.5).with_attention("all"))
    assert not trace.final_provenance.is_plain
    matrix = ex.rollout_matrix(trace)
    assert matrix.shape == (trace.final_tokens, 1 + fashion_random.num_patches)
    assert torch.allclose(matrix.sum(1), torch.ones((), dtype=torch.float64), atol=1e-6)
    grid = ex.rollout(trace)
    assert grid.shape == fashion_random.spec.grid_size
    seen = trace.blocks[0].provenance.patch_mask()[0].numpy()
    assert np.array_equal(np.isnan(grid.ravel()), ~seen)
    assert (grid[np.isfinite(grid)] >= 0).all()


def test_keep_all_gives_the_unslimmed_maps(fashion_random, canvas):
    full = patchslim.run(fashion_random, canvas, SlimPlan(attention_blocks="all"))
    same = patchslim.run(fashion_random, canvas, SlimPlan.single("random", 1.0).with_attention("all"))
    for block in (0, 5):
        assert np.allclose(ex.cls_attention(full, block), ex.cls_attention(same, block), atol=1e-6)
    assert np.allclose(ex.rollout(full), ex.rollout(same), atol=1e-6)
    result = ex.explain(fashion_random, canvas, SlimPlan.single("random", 1.0), attribution="ig", n_steps=4)
    assert np.allclose(result.attribution_before.grid, result.attribution_after.grid, atol=1e-6)
    assert result.evidence.kept_evidence == 1.0
    assert result.evidence.spearman == pytest.approx(1.0)


# --------------------------------------------------------------------------- attributions

@pytest.mark.parametrize("name", ["fashion-vit", "deit_tiny_patch16_224"])
def test_feature_mask_covers_every_pixel_once(name, fashion_random, deit_tiny_random):
    model = fashion_random if name == "fashion-vit" else deit_tiny_random
    mask = ex.patch_feature_mask(model)
    h, w = model.spec.img_size
    assert mask.shape == (1, 1, h, w)
    one_hot = torch.nn.functional.one_hot(mask[0, 0], model.num_patches)  # [H, W, N]
    assert (one_hot.sum(-1) == 1).all()  # every pixel exactly one feature
    ph, pw = model.spec.patch_size
    assert (one_hot.sum((0, 1)) == ph * pw).all()  # every patch its own pixels
    # pixel (r*ph, c*pw) starts patch r*cols + c, in token order
    rows, cols = model.spec.grid_size
    assert mask[0, 0, ::ph, ::pw].flatten().tolist() == list(range(rows * cols))


def test_integrated_gradients_grid_and_completeness(fashion_random, canvas):
    calls = []
    result = ex.integrated_gradients(fashion_random, canvas, n_steps=16, internal_batch_size=8,
                                     progress=lambda done, total: calls.append((done, total)))
    assert result.grid.shape == fashion_random.spec.grid_size
    assert calls[-1] == (18, 18) and len(calls) == 4  # two batches of 8, then input and baseline
    logits = ex.differentiable_logits(fashion_random, torch.cat([canvas, ex.baseline_tensor(fashion_random, canvas)]))
    gap = float(logits[0, result.target] - logits[1, result.target])
    assert result.grid.sum() == pytest.approx(gap, abs=max(1e-3, 0.05 * abs(gap)))


def test_slimmed_attributions_zero_at_input_dropped_patches(fashion_random, canvas):
    plan = SlimPlan.single("random", 0.5)
    ig = ex.integrated_gradients(fashion_random, canvas, plan, n_steps=4, internal_batch_size=4)
    trace = patchslim.run(fashion_random, canvas, plan)
    dropped = ~trace.patch_mask()[0].reshape(fashion_random.spec.grid_size).numpy()
    assert np.array_equal(np.isnan(ig.grid), dropped) and np.any(ig.grid[~dropped] != 0)
    assert np.all(ig.pixels.reshape(12, 4, 12, 4).transpose(0, 2, 1, 3)[dropped] == 0)  # no gradient there
    # a seeded random subset draws from the image's own stream: the same in any batch, so captum may batch it,
    # and every path point of the image keeps the image's own subset (the zeros above)
    assert ex.attribution.batch_independent(fashion_random, canvas, plan)
    one_by_one = ex.integrated_gradients(fashion_random, canvas, plan, n_steps=4, internal_batch_size=1)
    assert np.allclose(ig.grid, one_by_one.grid, atol=1e-6, equal_nan=True)


def test_occlusion_one_feature_per_patch(fashion_random, canvas):
    calls = []
    result = ex.occlusion(fashion_random, canvas, perturbations_per_eval=48,
                          progress=lambda done, total: calls.append((done, total)))
    assert result.grid.shape == fashion_random.spec.grid_size
    assert calls[-1] == (1 + fashion_random.num_patches,) * 2
    # occluding a patch of the black background by black changes nothing
    from patchslim.explain.attribution import baseline_tensor
    x = canvas
    black = (x == baseline_tensor(fashion_random, x)).all(1)[0]  # [H, W]
    ph, pw = fashion_random.spec.patch_size
    rows, cols = fashion_random.spec.grid_size
    all_black = black.reshape(rows, ph, cols, pw).all(3).all(1).numpy()
    assert all_black.any() and np.all(result.grid[all_black] == 0)


def test_attribution_on_deit_shape(deit_tiny_random):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    result = ex.integrated_gradients(deit_tiny_random, x, SlimPlan.single("random", 0.5), n_steps=2,
                                     internal_batch_size=2)
    assert result.grid.shape == (14, 14)


# --------------------------------------------------------------------------- evidence

def test_kept_evidence_and_spearman():
    importance = np.arange(100, dtype=float).reshape(10, 10)
    assert ex.kept_evidence(importance, np.ones((10, 10), bool)) == 1.0
    kept = np.ones((10, 10), bool)
    kept.ravel()[95:] = False  # drops half of the top 10
    assert ex.kept_evidence(importance, kept, share=0.1) == pytest.approx(0.5)
    assert ex.spearman(importance, importance ** 3) == pytest.approx(1.0)
    assert ex.spearman(importance, -importance) == pytest.approx(-1.0)
    assert ex.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert ex.spearman([1, np.nan, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert ex.top_patches(importance, 0.05).sum() == 5


def test_evidence_report_at_keep_all(fashion_random, canvas):
    trace = patchslim.run(fashion_random, canvas, SlimPlan.single("random", 1.0))
    g = np.random.default_rng(0).random(fashion_random.spec.grid_size)
    report = ex.evidence_report(g, g, trace)
    assert report.kept_evidence == 1.0 and report.spearman == pytest.approx(1.0)
    assert report.top_count == round(0.1 * fashion_random.num_patches) and report.dropped_top_patch_ids == ()


# --------------------------------------------------------------------------- CLI

def test_cli_writes_the_maps(tmp_path, capsys):
    out = tmp_path / "maps"
    code = cli_main(["explain", "--model", "fashion-vit", "--no-pretrained", "--method", "random", "--keep", "0.5",
                     "--image", PHOTO, "--out", str(out), "--steps", "4", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["kept_evidence"] <= 1.0
    expected = {"overlay.png", "attention_before.png", "attention_after.png", "rollout_before.png",
                "rollout_after.png", "grad_rollout_before.png", "grad_rollout_after.png", "attribution_before.png",
                "attribution_after.png"}
    assert set(result["files"]) == expected
    assert {p.name for p in out.iterdir()} == expected


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = cli_main(["explain", "--model", "fashion-vit", "--no-pretrained", "--method", "random",
                     "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "missing.png" in err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code = cli_main(["explain", "--model", "fashion-vit", "--no-pretrained", "--method", "random",
                     "--image", str(bad), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "bad.png" in err
