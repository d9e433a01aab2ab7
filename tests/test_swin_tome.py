"""ToMe per window on Swin: merged before a block, unmerged after it (exactness, the math, provenance, costs)."""

from __future__ import annotations

import pytest
import torch

import patchslim
from patchslim import SlimPlan
from patchslim.errors import PlanError
from patchslim.metrics.flops import baseline_macs, block_macs, count_macs, measured_macs
from patchslim.vis import MERGED, window_status

pytestmark = pytest.mark.usefixtures("one_thread")


def _swin():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=2, in_chans=3, num_classes=7, embed_dim=16, depths=(2, 2),
                           num_heads=(2, 4), window_size=4, mlp_ratio=2.0).eval()


@pytest.fixture(scope="module")
def tiny():
    """16 x 16 tokens in 16 windows of 4 x 4 (shifted by 2 in block 1), then 8 x 8 in 4 windows."""
    return patchslim.wrap_model(_swin(), name="tiny-swin")


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _grid_after(model, images, plan, index):
    """The tokens on block ``index``'s grid right after it (put back in place, before any patch merging), and
    the merged state the block ran on."""
    from patchslim.engine import _checked_actions, _walk

    adapter = model.adapter
    seen = {}
    original = adapter.transition

    def spy(i, state):
        if i == index:  # what transition puts back on the grid, before any patch merging
            part = adapter._partition(i, state.tokens.device)
            windows = adapter._unmerge(i, state) if state.provenance.members is not None else state.tokens
            seen["grid"] = windows.reshape(images.shape[0], -1, windows.shape[-1])[:, part.inverse]
            seen["state"] = state
        return original(i, state)

    adapter.transition = spy
    try:
        with torch.inference_mode():
            _walk(model, model.preprocess(images), plan, _checked_actions(model, plan), None)
    finally:
        del adapter.transition
    return seen["grid"], seen["state"]


def test_keep_all_and_r_zero_give_the_model_logits(tiny, images):
    expected = tiny.model(images)
    for plan in (SlimPlan.single("tome", 1.0, stages=(0, 1), attention_blocks="all"),
                 SlimPlan.single("tome", 0.5, stages=(0, 1), r=0)):
        trace = patchslim.run(tiny, images, plan)
        torch.testing.assert_close(trace.logits, expected, rtol=0, atol=1e-5)
        assert trace.tokens_per_block == [256, 256, 64, 64]


def test_every_window_merges_the_same_r_and_costs_k_squared(tiny, images):
    trace = patchslim.run(tiny, images, SlimPlan.single("tome", 0.5, stages=(0, 1)))
    assert trace.tokens_per_block == [16 * 8, 16 * 8, 4 * 8, 4 * 8]
    assert [b.windows for b in trace.blocks] == [16, 16, 4, 4]
    assert [(s.tokens_before, s.tokens_after) for s in trace.stages] == [(16, 8)] * 4  # per window
    assert all(b.merged_sizes for b in trace.blocks)
    report = count_macs(trace)
    for block in report.blocks:  # k tokens per window: k^2 attention and k MLP per window, like pruning
        pruned = block_macs(tiny.spec, block.index, 8 * block.windows, 8 * block.windows)
        assert block.total - block.selection == pruned.total
        width = tiny.spec.blocks[block.index].width  # matching: 8 x 8 similarities, normalizing and averaging
        assert block.selection == block.windows * (8 * 8 * width + 2 * 16 * width)
    # the counter on the merged forward: the blocks plus the matching's similarity products, nothing else
    similarity = sum(16 * 8 * 8 * 16 if i < 2 else 4 * 8 * 8 * 32 for i in range(4))
    selection = sum(s.selection_macs for s in trace.stages)
    x = images[:1]
    plan = SlimPlan.single("tome", 0.5, stages=(0, 1))
    assert measured_macs(tiny, x, plan) == pytest.approx(count_macs(patchslim.run(tiny, x, plan)).total
                                                         - selection + similarity, rel=1e-9)
    assert report.total < baseline_macs(tiny.spec).total
    # r: the per-block count shared among the block's windows (40 / 16 -> 3; 40 / 4 = 10, capped at 8 of 16)
    shared = patchslim.run(tiny, images, SlimPlan.single("tome", 1.0, stages=(0, 1), r=40))
    assert shared.tokens_per_block == [16 * 13, 16 * 13, 4 * 8, 4 * 8]


def test_identical_tokens_in_a_window_merge_without_changing_the_block(tiny):
    """Windows whose tokens are all equal: merging them (to half) changes no block output. Block 0 on images
    constant over each 8 x 8 square (one window of 4 x 4 two-pixel patches); block 1, shifted, on a constant
    image, where the merge stays inside each piece of a wrapped window."""
    square = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    per_window = square.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # [2, 3, 32, 32]
    constant = torch.randn(2, 3, 1, 1, generator=torch.Generator().manual_seed(5)).expand(-1, -1, 32, 32)
    for x, block in ((per_window, 0), (constant.contiguous(), 1)):
        plan = SlimPlan.single("tome", 0.5, blocks=(block,))
        merged, state = _grid_after(tiny, x, plan, block)
        unslimmed, _ = _grid_after(tiny, x, SlimPlan(), block)
        assert state.tokens.shape[1] == 8 and state.sizes is not None  # the block ran on 8 of 16 per window
        torch.testing.assert_close(merged, unslimmed, rtol=0, atol=1e-5)
        trace = patchslim.run(tiny, x, plan)
        torch.testing.assert_close(trace.logits, tiny.model(x), rtol=0, atol=1e-4)


def test_bias_rule_is_exact_for_a_group_of_equal_keys():
    """Tokens equal in pairs (patch columns 2j and 2j + 1 of every window): ToMe merges each pair, and a merged
    query takes its first member's bias row while a merged key gets the log-sum-exp of its members' biases, so the
    first member of every pair leaves block 0 exactly as in the unslimmed block; the second (another bias row)
    does not. With ``bias(first) + log 2`` for the keys (plain proportional attention) the first would differ."""
    model = _swin()
    with torch.no_grad():  # relative-position biases of order 1 (timm initializes them at std 0.02)
        for block in model.layers[0].blocks:
            block.attn.relative_position_bias_table.normal_(0, 1.0, generator=torch.Generator().manual_seed(7))
    tiny = patchslim.wrap_model(model, name="tiny-swin-biased")
    base = torch.randn(2, 3, 32, 8, 1, 2, generator=torch.Generator().manual_seed(6))
    x = base.expand(-1, -1, -1, -1, 2, -1).reshape(2, 3, 32, 32)  # pixel columns 4j..4j+1 == 4j+2..4j+3
    plan = SlimPlan.single("tome", 0.5, blocks=(0,))
    merged, state = _grid_after(tiny, x, plan, 0)
    unslimmed, _ = _grid_after(tiny, x, SlimPlan(), 0)
    assert torch.equal(state.sizes, torch.full((2 * 16, 8), 2.0))  # every pair merged
    first = torch.arange(256).reshape(16, 16)[:, 0::2].flatten()  # even token columns: each pair's first member
    second = first + 1
    torch.testing.assert_close(merged[:, first], unslimmed[:, first], rtol=0, atol=1e-5)
    assert (merged[:, second] - unslimmed[:, second]).abs().max() > 1e-3


def test_unmerge_puts_each_token_back_at_its_position(tiny, images):
    """After the block each position holds its own block input plus its merged token's update, and the merged
    tokens' provenance covers every patch of every window once."""
    plan = SlimPlan.single("tome", 0.5, blocks=(1,))
    grid, state = _grid_after(tiny, images, plan, 1)
    before = patchslim.tokens_before(tiny, images, 1).tokens  # [B, 256, C] the block's input on the grid
    prov = state.provenance
    assert prov.members is not None and prov.count == 8 and prov.assign.shape == (3 * 16, 16)
    adapter = tiny.adapter
    part = adapter._partition(1, images.device)
    out = state.tokens  # [B * W, 8, C] the merged tokens after the block
    members = prov.members.reshape(3, 16, 16)
    assign = prov.assign.reshape(3, 16, 16)
    for b in range(3):
        for w in (0, 5, 15):
            ids = members[b, w]  # grid ids of the window's 16 positions
            assert sorted(part.inverse[ids].tolist()) == list(range(w * 16, w * 16 + 16))
            groups = assign[b, w]
            merged_in = torch.stack([before[b, ids[groups == g]].mean(0) for g in range(8)])
            expected = before[b, ids] + (out[b * 16 + w] - merged_in)[groups]
            torch.testing.assert_close(grid[b, ids], expected, rtol=0, atol=1e-5)
    dense = prov.dense()  # [B * W, 8, 256 patches]: each window's 16 tokens' patches in 8 merged tokens, once each
    assert torch.equal(dense.sum(1).sum(0), torch.full((256,), 3.0))
    assert torch.equal(dense.sum(-1), state.sizes.float())
    # the shift mask's pieces never share a merged token
    regions = part.regions.repeat(3, 1)
    for row in range(regions.shape[0]):
        for g in range(8):
            assert regions[row][prov.assign[row] == g].unique().numel() == 1


def test_overlay_status_shows_merged_tokens(tiny, images):
    trace = patchslim.run(tiny, images, SlimPlan.single("tome", 0.5, stages=(0,)))
    status = window_status(trace, 0)
    assert status.ran_per_window.tolist() == [16] * 16  # every token ran the block, through a merged token
    assert (status.status == MERGED).sum() >= 16 * 8  # 8 merges per window: at least 16 tokens in merged groups
    assert "merged" in status.summary()
    assert patchslim.vis.window_overlay(images, tiny, trace, 0).size[0] > 0


def test_received_attention_of_merged_tokens_is_shared_by_their_members(tiny, images):
    trace = patchslim.run(tiny, images, SlimPlan.single("tome", 0.5, stages=(0,), attention_blocks=(0, 1)))
    for block in (0, 1):
        received = trace.attention[block].reshape(3, 256)
        assert torch.isfinite(received).all() and (received > 0).all()
        assert received.sum(-1).tolist() == pytest.approx([16.0] * 3, rel=1e-5)  # 1 per window


def test_nothing_acts_after_a_window_merge_in_its_block(tiny, images):
    plan = SlimPlan((patchslim.Stage("tome", 0.5, stages=(0,)), patchslim.Stage("random", 0.5, stages=(0,))))
    with pytest.raises(PlanError, match="merging stage must be the last"):
        patchslim.run(tiny, images, plan)
    before = SlimPlan((patchslim.Stage("random", 0.75, stages=(0,)), patchslim.Stage("tome", 0.5, stages=(0,))))
    trace = patchslim.run(tiny, images, before)  # pruning first, then merging what is left: fine
    assert trace.tokens_per_block[:2] == [16 * 6, 16 * 6]


def test_fashion_swin_tome_on_the_canvas_test_images(fashion_batch):
    model = patchslim.load_model("fashion-swin", device="cpu")
    x, labels = fashion_batch
    trace = patchslim.run(model, x, SlimPlan.single("tome", 0.5))
    assert trace.tokens_per_block == [4 * 18] * 4 + [36, 36]  # stage 0's 6 x 6 windows merged to 18
    assert trace.keep_ratio == pytest.approx(0.5)
    full = patchslim.run(model, x)
    agree = (trace.logits.argmax(-1) == full.logits.argmax(-1)).float().mean()
    assert agree >= 0.75  # merging keeps most predictions (pruning at rho 0.5 keeps 80 % on the full test set)


def test_compact_merge_provenance_says_what_the_dense_one_says():
    """``Provenance.merged`` keeps (members, assign) instead of a [B, M, N] matrix: dense(), patch_mask(),
    regroup() from windows to images and select() agree with the combination the dense path builds."""
    from patchslim.tokens import Provenance

    ids = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])  # 2 images x 2 windows
    plain = Provenance(64, ids=ids, cell=2, grid=(8, 8))  # cells of 2 x 2 patches on the 4 x 4 coarse grid
    assign = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 2], [0, 1, 2, 2], [0, 1, 2, 0]])
    compact = plain.merged(assign, 3)
    combination = torch.zeros(4, 3, 4).scatter_(1, assign.unsqueeze(1), 1.0)
    dense = plain.combine(combination)
    assert compact.weights is None and compact.count == 3 and compact.batch == 4
    assert torch.equal(compact.dense(), dense.dense())
    assert torch.equal(compact.patch_mask(), dense.patch_mask())
    assert torch.equal(compact.regroup(2).dense(), dense.regroup(2).dense())
    assert compact.regroup(2).count == 6
    index = torch.tensor([[0, 2]] * 4)
    assert torch.equal(compact.select(index).dense(), dense.select(index).dense())
    again = compact.merged(torch.tensor([[0, 0, 1]] * 4), 2)  # a merge of merges: dense weights
    assert torch.equal(again.dense(), dense.combine(torch.tensor([[[1.0, 1, 0], [0, 0, 1]]] * 4)).dense())
