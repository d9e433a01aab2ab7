"""Plans whose stages compose: the survey's hybrid static + dynamic strategies (section 5.6)."""

from __future__ import annotations

import pytest
import torch

import patchslim
from patchslim import PlanError, SlimPlan, Stage
from patchslim.methods.attention import cls_scores
from patchslim.methods.grid import grid_patch_ids


def _images(model, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(batch, model.spec.in_chans, *model.spec.img_size, generator=g)


def test_grid_at_the_input_then_attention_before_block_6(deit_tiny_random):
    plan = SlimPlan((Stage("grid", 0.5), Stage("attention", 0.5, blocks=(6,))), attention_blocks=(5,))
    trace = patchslim.run(deit_tiny_random, _images(deit_tiny_random), plan)
    # grid: G = 10 -> 100 patches; attention keeps round(0.5 * 100) = 50 of them before block 6.
    assert trace.tokens_per_block == [101] * 6 + [51] * 6
    assert [(s.method, s.block, s.tokens_before, s.tokens_after) for s in trace.stages] == [
        ("grid", 0, 196, 100), ("attention", 6, 100, 50)]
    lattice = grid_patch_ids(0.5, (14, 14))
    first, second = trace.kept_patch_ids(0), trace.kept_patch_ids(6)
    assert (first == lattice).all()
    for image in range(2):
        # Provenance composes: the second stage's ids are original patch ids, a subset of the lattice ...
        assert set(second[image].tolist()) <= set(lattice.tolist())
        # ... namely the grid patches with the highest CLS attention in block 5.
        scores = cls_scores(trace.attention[5], 1)[image]
        best = scores.argsort(descending=True)[:50].sort().values
        assert second[image].tolist() == first[image, best].tolist()
    assert trace.stages[1].provenance_before.ids.shape == (2, 100)
    assert trace.keep_ratio == pytest.approx(50 / 196)


def test_input_pruning_then_merging_then_fusing_on_the_bundled_architecture(fashion_random):
    model = fashion_random
    plan = SlimPlan((Stage("uniform", 0.5), Stage("tome", blocks=(1, 2), options={"r": 10}),
                     Stage("evit", 0.5, blocks=(4,))))
    trace = patchslim.run(model, _images(model), plan)
    # uniform 144 -> 72; tome -10 in blocks 1 and 2 -> 52; evit keeps ceil(26) = 26 + 1 fused token.
    assert [b.tokens_mlp - 1 for b in trace.blocks] == [72, 62, 52, 52, 27, 27]
    final = trace.final_provenance.dense()
    assert final.shape == (2, 27, 144)
    kept_by_uniform = set(range(1, 144, 2))
    covered = set(torch.nonzero(final.sum((0, 1))).flatten().tolist())
    assert covered <= kept_by_uniform  # nothing comes back that the first stage dropped
    assert (final.sum(1) <= 1 + 1e-5).all()  # no patch is counted twice
    merged_or_kept = final[:, :26]  # tokens before the fused one are 0/1 unions of patches
    assert ((merged_or_kept == 0) | (merged_or_kept == 1)).all()
    torch.testing.assert_close(final[:, 26].sum(-1), torch.ones(2))  # the fused token: normalized weights


def test_a_stage_reading_attention_that_another_stage_outdated_is_refused(fashion_random):
    # Attention before block 3 reads block 2's attention, computed before tome merged inside block 2.
    plan = SlimPlan((Stage("tome", blocks=(2,), options={"r": 4}), Stage("attention", 0.5, blocks=(3,))))
    with pytest.raises(PlanError, match="another stage changed the tokens"):
        patchslim.run(fashion_random, _images(fashion_random, 1), plan)
