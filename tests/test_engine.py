"""The plan-driven forward: exact equivalence, provenance, placement, threads."""

from __future__ import annotations

import threading

import pytest
import torch

import patchslim
from patchslim import SlimPlan, Stage
from patchslim.tokens import Provenance, TokenState, keep_tokens, top_k_index


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("fixture", ["deit_small_random", "deit_small_distilled_random", "fashion_trained"])
def test_keep_everything_reproduces_model_logits(request, fixture, imagenet_batch, fashion_batch):
    model = request.getfixturevalue(fixture)
    x = fashion_batch[0][:4] if fixture == "fashion_trained" else imagenet_batch
    with torch.inference_mode():
        reference = model.model(x)
    for plan in (SlimPlan(), SlimPlan.single("random", 1.0), SlimPlan(attention_blocks="all")):
        trace = patchslim.run(model, x, plan)
        assert _max_diff(trace.logits, reference) < 1e-5, plan
        assert trace.keep_ratio == 1.0
        assert trace.tokens_per_block == [model.num_patches + model.num_prefix_tokens] * model.spec.depth


def test_attention_is_materialized_only_where_asked(deit_tiny_random, imagenet_batch):
    trace = patchslim.run(deit_tiny_random, imagenet_batch, SlimPlan(attention_blocks=(0, 5)))
    assert sorted(trace.attention) == [0, 5]
    attn = trace.attention[5]
    assert attn.shape == (2, 3, 197, 197)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 197), atol=1e-5, rtol=0)
    assert patchslim.run(deit_tiny_random, imagenet_batch).attention == {}


@pytest.mark.parametrize("fixture", ["deit_tiny_random", "deit_small_distilled_random"])
def test_random_pruning_provenance_is_valid(request, fixture, imagenet_batch):
    model = request.getfixturevalue(fixture)
    trace = patchslim.run(model, imagenet_batch, SlimPlan.single("random", 0.3, seed=7))
    n, p = model.num_patches, model.num_prefix_tokens
    k = round(0.3 * n)
    assert trace.tokens_per_block == [k + p] * model.spec.depth
    assert trace.keep_ratio == pytest.approx(k / n)
    ids = trace.kept_patch_ids(0)
    assert ids.shape == (2, k)
    for row in ids:
        assert len(set(row.tolist())) == k  # unique
        assert 0 <= int(row.min()) and int(row.max()) < n  # valid
        assert torch.equal(row, row.sort().values)  # raster order kept
    assert not torch.equal(ids[0], ids[1])  # each image draws its own subset
    assert trace.patch_mask(0).sum(1).tolist() == [k, k]


def test_same_seed_same_subset_other_seed_other_subset(deit_tiny_random, imagenet_batch):
    a = patchslim.run(deit_tiny_random, imagenet_batch, SlimPlan.single("random", 0.5, seed=1))
    b = patchslim.run(deit_tiny_random, imagenet_batch, SlimPlan.single("random", 0.5, seed=1))
    c = patchslim.run(deit_tiny_random, imagenet_batch, SlimPlan.single("random", 0.5, seed=2))
    assert torch.equal(a.kept_patch_ids(0), b.kept_patch_ids(0))
    assert torch.equal(a.logits, b.logits)
    assert not torch.equal(a.kept_patch_ids(0), c.kept_patch_ids(0))


def test_input_pruning_gathers_after_the_position_embedding(deit_tiny_random, imagenet_batch):
    """Re-run by hand: embed, add positions, keep the traced ids, run timm's own blocks."""
    trace = patchslim.run(deit_tiny_random, imagenet_batch, SlimPlan.single("random", 0.4, seed=3))
    ids = trace.kept_patch_ids(0)
    vit = deit_tiny_random.model
    with torch.inference_mode():
        x = vit._pos_embed(vit.patch_embed(imagenet_batch))
        patches = x[:, 1:].gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1)
        reference = vit.forward_head(vit.norm(vit.blocks(x)))
    assert _max_diff(trace.logits, reference) < 1e-5


def test_pruning_before_a_later_block_records_counts_and_provenance(deit_tiny_random, imagenet_batch):
    trace = patchslim.run(deit_tiny_random, imagenet_batch, SlimPlan.single("random", 0.5, blocks=(4,)))
    assert trace.tokens_per_block == [197] * 4 + [99] * 8
    assert trace.blocks[3].provenance.count == 196
    assert trace.blocks[4].provenance.count == 98
    assert len(trace.stages) == 1 and trace.stages[0].block == 4
    assert trace.stages[0].scores.shape == (2, 196)


def test_two_stages_compose(deit_tiny_random, imagenet_batch):
    plan = SlimPlan((Stage("random", 0.5), Stage("random", 0.5, blocks=(6,))), seed=4)
    trace = patchslim.run(deit_tiny_random, imagenet_batch, plan)
    assert trace.tokens_per_block == [99] * 6 + [50] * 6
    later, earlier = trace.kept_patch_ids(6), trace.kept_patch_ids(0)
    for b in range(2):  # every token of the second stage survived the first
        assert set(later[b].tolist()) <= set(earlier[b].tolist())


def test_prefix_tokens_are_never_dropped():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 2 + 10, 8, generator=g)
    state = TokenState(tokens, 2, Provenance.identity(3, 10))
    scores = torch.randn(3, 10, generator=g)
    kept = keep_tokens(state, top_k_index(scores, 4))
    assert torch.equal(kept.tokens[:, :2], tokens[:, :2])
    assert kept.count == 4
    expected = tokens[:, 2:].gather(1, kept.provenance.ids.unsqueeze(-1).expand(-1, -1, 8))
    assert torch.equal(kept.tokens[:, 2:], expected)


def test_top_k_breaks_ties_towards_lower_positions():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert top_k_index(scores, 2).tolist() == [[1, 2]]


def test_threads_with_different_plans_get_what_each_gets_alone(deit_tiny_random, imagenet_batch):
    plans = [SlimPlan.single("random", rho, seed=s) for rho, s in ((0.3, 1), (0.5, 2), (0.8, 3), (1.0, 0))]
    alone = [patchslim.run(deit_tiny_random, imagenet_batch, plan).logits for plan in plans]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(plans))

    def worker(i: int) -> None:
        try:
            start.wait()
            for repeat in range(3):
                results[(i, repeat)] = patchslim.run(deit_tiny_random, imagenet_batch, plans[i]).logits
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (i, _), logits in results.items():
        assert torch.equal(logits, alone[i])
    assert len(results) == len(plans) * 3


def test_the_model_is_not_mutated(deit_tiny_random, imagenet_batch):
    before = {k: v.clone() for k, v in deit_tiny_random.model.state_dict().items()}
    patchslim.run(deit_tiny_random, imagenet_batch, SlimPlan.single("random", 0.2, attention_blocks="all"))
    after = deit_tiny_random.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not deit_tiny_random.model.training


def test_trace_top_k_uses_class_names(fashion_trained, fashion_batch):
    trace = patchslim.run(fashion_trained, fashion_batch[0][:1])
    top = trace.top_k(3)
    assert len(top) == 3 and all(label in fashion_trained.class_names for label, _ in top)
    assert top[0][1] >= top[1][1] >= top[2][1]


def test_wrong_input_shape_is_a_clear_error(deit_tiny_random):
    with pytest.raises(ValueError, match=r"expects images of shape \[B, 3, 224, 224\]"):
        patchslim.run(deit_tiny_random, torch.zeros(1, 3, 100, 100))


def test_bf16_autocast_runs_and_stays_close_to_fp32(deit_tiny_random, imagenet_batch):
    low = patchslim.load_model("deit_tiny_patch16_224", device="cpu", pretrained=False, precision="bf16")
    plan = SlimPlan.single("random", 0.5, attention_blocks=(1,))
    reduced = patchslim.run(low, imagenet_batch, plan)
    full = patchslim.run(deit_tiny_random, imagenet_batch, plan)
    assert reduced.logits.dtype == torch.float32  # logits come back in fp32 whatever ran inside
    assert _max_diff(reduced.logits, full.logits) < 0.1
    assert torch.equal(reduced.kept_patch_ids(0), full.kept_patch_ids(0))
