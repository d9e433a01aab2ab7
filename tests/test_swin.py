"""Swin through the one forward: exactness, window-aware slimming, provenance across patch merging, costs, refusals."""

from __future__ import annotations

import pytest
import torch

import patchslim
from patchslim import SlimPlan
from patchslim.errors import PlanError, UnsupportedModelError
from patchslim.methods import get_method, method_names
from patchslim.metrics.flops import baseline_macs, count_macs, measured_macs


def _swin(**kwargs):
    from timm.models.swin_transformer import SwinTransformer

    config = dict(img_size=32, patch_size=2, in_chans=3, num_classes=7, embed_dim=16, depths=(2, 2),
                  num_heads=(2, 4), window_size=4, mlp_ratio=2.0)
    config.update(kwargs)
    torch.manual_seed(0)
    return SwinTransformer(**config).eval()


@pytest.fixture(scope="module")
def tiny():
    """16 x 16 tokens in 16 windows of 4 x 4 (shifted by 2 in block 1), then 8 x 8 in 4 windows."""
    return patchslim.wrap_model(_swin(), name="tiny-swin")


@pytest.fixture(scope="module")
def fashion_swin_random():
    return patchslim.load_model("fashion-swin", pretrained=False)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_keep_all_gives_the_model_logits(tiny, images, fashion_swin_random):
    torch.testing.assert_close(patchslim.run(tiny, images).logits, tiny.model(images), rtol=0, atol=1e-5)
    everything = SlimPlan.single("random", 1.0, stages=(0, 1), attention_blocks="all")
    torch.testing.assert_close(patchslim.run(tiny, images, everything).logits, tiny.model(images), rtol=0, atol=1e-5)
    x = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(patchslim.run(fashion_swin_random, x).logits, fashion_swin_random.model(x),
                               rtol=0, atol=1e-5)


@pytest.mark.slow
def test_swin_t_keep_all_and_published_gmacs():
    import timm

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    loaded = patchslim.wrap_model(model, name="swin_tiny_patch4_window7_224")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(patchslim.run(loaded, x).logits, model(x), rtol=0, atol=1e-5)
    assert baseline_macs(loaded.spec).gmacs == pytest.approx(4.49, abs=0.005)  # timm / Swin paper: 4.5 G
    assert loaded.spec.default_stages == (2, 3)
    trace = patchslim.run(loaded, x, SlimPlan.single("random", 0.5))
    assert trace.tokens_per_block == [3136] * 2 + [784] * 2 + [4 * 25] * 6 + [25] * 2


def test_every_window_keeps_the_same_k(tiny, images):
    trace = patchslim.run(tiny, images, SlimPlan.single("random", 0.5, stages=(0,)))
    assert [b.windows for b in trace.blocks] == [16, 16, 4, 4]
    assert trace.tokens_per_block == [16 * 8, 16 * 8, 64, 64]
    for record in trace.blocks[:2]:
        ids = record.provenance.ids  # [B, W * k] grid ids, window by window
        window_of = _window_of(16, 4, shift=2 if record.index == 1 else 0)
        for row in ids:
            counts = torch.bincount(window_of[row], minlength=16)
            assert counts.tolist() == [8] * 16
    tiny_rho = patchslim.run(tiny, images, SlimPlan.single("uniform", 0.01, stages=(1,)))
    assert tiny_rho.tokens_per_block[2:] == [4, 4]  # at least one token per window


def _window_of(side: int, window: int, shift: int) -> torch.Tensor:
    rows = (torch.arange(side).unsqueeze(1) - shift) % side // window
    cols = (torch.arange(side).unsqueeze(0) - shift) % side // window
    return (rows * (side // window) + cols).flatten()


def test_tokens_not_kept_skip_the_block_and_the_kept_ones_see_only_kept_keys(tiny, images):
    """Block 1 (shifted windows) keeps 6 of 16 tokens per window: the others come out exactly as they went in, and
    the kept ones equal timm's window attention + MLP with the other keys masked (bias and shift mask gathered)."""
    plan = SlimPlan.single("random", 6 / 16, blocks=(1,), seed=3)
    trace = patchslim.run(tiny, images, plan)
    before = patchslim.tokens_before(tiny, images, 1).tokens  # [B, 256, C]
    after = patchslim.tokens_before(tiny, images, 2, plan).tokens.clone()
    block = tiny.model.layers[0].blocks[1]
    kept = torch.zeros(3, 256, dtype=torch.bool)
    kept.scatter_(1, trace.blocks[1].provenance.ids, True)
    # not kept: unchanged; but patch merging follows block 1, so compare before merging by rerunning the block
    with torch.inference_mode():
        reference, expected_kept = _masked_block(block, before, kept)
    grid_after = _grid_after_block(tiny, images, plan, 1)
    torch.testing.assert_close(grid_after[~kept], before[~kept], rtol=0, atol=0)
    torch.testing.assert_close(grid_after[kept], reference[kept], rtol=0, atol=1e-5)
    assert expected_kept.sum() == 3 * 16 * 6
    assert after.shape[1] == 64


def _grid_after_block(model, images, plan, index):
    from patchslim.engine import _checked_actions, _walk

    # the walk up to the transition of block `index` (before patch merging): stop the adapter there
    adapter = model.adapter
    seen = {}
    original = adapter.transition

    def spy(i, state):
        if i == index:
            layout = state.layout
            windows = state.tokens
            local = adapter._local(i, state).unsqueeze(-1).expand(-1, -1, windows.shape[-1])
            full = layout.windows_in.scatter(1, local, windows)
            part = adapter._partition(i, windows.device)
            seen["grid"] = full.reshape(images.shape[0], -1, windows.shape[-1])[:, part.inverse]
        return original(i, state)

    adapter.transition = spy
    try:
        with torch.inference_mode():
            _walk(model, model.preprocess(images), plan, _checked_actions(model, plan), None)
    finally:
        del adapter.transition
    return seen["grid"]


def _masked_block(block, grid, kept):
    """timm's block on [B, H*W, C] where each query attends to kept keys only (full n x n bias and mask)."""
    from timm.models.swin_transformer import window_partition, window_reverse

    b, _, c = grid.shape
    h = w = 16
    x = grid.reshape(b, h, w, c)
    shift = block.shift_size
    attn = block.attn
    xs = torch.roll(block.norm1(x), shifts=(-shift[0], -shift[1]), dims=(1, 2))
    ks = torch.roll(kept.reshape(b, h, w, 1).float(), shifts=(-shift[0], -shift[1]), dims=(1, 2))
    win = window_partition(xs, block.window_size).reshape(-1, 16, c)
    keep_w = window_partition(ks, block.window_size).reshape(-1, 16) > 0
    n = 16
    qkv = attn.qkv(win).reshape(win.shape[0], n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + attn._get_rel_pos_bias()
    logits = (logits.view(b, -1, attn.num_heads, n, n) + block.attn_mask.unsqueeze(1).unsqueeze(0)).view(-1, attn.num_heads, n, n)
    logits = logits.masked_fill(~keep_w[:, None, None, :], float("-inf"))
    out = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c))
    out = window_reverse(out.reshape(-1, 4, 4, c), block.window_size, h, w)
    out = torch.roll(out, shifts=shift, dims=(1, 2)).reshape(b, -1, c)
    y = grid + out
    y = y + block.mlp(block.norm2(y))
    return y, keep_w


def test_provenance_after_patch_merging_covers_four_patches(tiny, images):
    trace = patchslim.run(tiny, images, SlimPlan.single("random", 0.5, stages=(1,)))
    prov = trace.blocks[2].provenance
    assert prov.cell == 2 and not prov.is_plain
    dense = prov.dense()  # [B, 32 kept tokens, 256 patches]
    assert dense.shape == (3, 32, 256)
    assert torch.equal(dense.sum(-1), torch.full((3, 32), 4.0))
    token = int(prov.ids[0, 0])  # coarse id on the 8 x 8 grid: patches (2r..2r+1, 2c..2c+1) of the 16 x 16 grid
    r, c = divmod(token, 8)
    expected = {(2 * r + dy) * 16 + 2 * c + dx for dy in (0, 1) for dx in (0, 1)}
    assert set(dense[0, 0].nonzero().flatten().tolist()) == expected
    assert trace.patch_mask(2)[0].sum() == 32 * 4


def test_attention_reads_the_window_map_of_the_block_before(tiny, images):
    plan = SlimPlan.single("attention", 0.5, blocks=(2,), attention_blocks=(1,))  # block 1 is in stage 0
    trace = patchslim.run(tiny, images, plan)
    received = trace.attention[1]  # [B, 1, 1, 256] on the stage-0 grid
    assert received.shape == (3, 1, 1, 256)
    windows = received.reshape(3, 16, 16)
    # each window's received attention averages to 1 / n over its 16 tokens (a softmax row sums to 1)
    window_of = _window_of(16, 4, shift=2)
    sums = torch.zeros(3, 16).index_add_(1, window_of, received.reshape(3, 256))
    torch.testing.assert_close(sums, torch.ones(3, 16), rtol=0, atol=1e-5)
    pooled = torch.nn.functional.avg_pool2d(windows.unsqueeze(1), 2).reshape(3, 64)
    stage = trace.stages[0]
    scores = stage.scores.reshape(3, -1)
    kept_grid = trace.blocks[2].provenance.ids
    # the method ranked by the pooled map: in every window, each kept token scores >= each dropped one
    order = patchslim.adapters.swin.SwinAdapter  # noqa: F841 (the adapter is the one that regroups)
    assert scores.shape == (3, 64)
    for b in range(3):
        kept = set(kept_grid[b].tolist())
        win = _window_of(8, 4, shift=0)
        for wdx in range(4):
            members = [i for i in range(64) if int(win[i]) == wdx]
            lo_kept = min(float(pooled[b, i]) for i in members if i in kept)
            hi_dropped = max(float(pooled[b, i]) for i in members if i not in kept)
            assert lo_kept >= hi_dropped - 1e-7


@pytest.mark.parametrize("name", method_names())
def test_support_table_is_what_the_engine_does(tiny, images, name):
    method = get_method(name)
    plan = SlimPlan.single(name, 0.5, stages=(0,)) if method.windowed else SlimPlan.single(name, 0.5)
    if method.windowed:
        trace = patchslim.run(tiny, images, plan)
        assert trace.logits.shape == (3, 7)
        assert all(b.tokens_attention < 256 for b in trace.blocks[1:2])
    else:
        assert method.window_reason
        with pytest.raises(PlanError, match=f"method {name!r} does not apply to tiny-swin.*{method.window_reason[:20]}"):
            patchslim.run(tiny, images, plan)


def test_keep_set_is_refused_on_swin(tiny, images):
    with pytest.raises(PlanError, match="does not apply"):
        patchslim.run(tiny, images, SlimPlan((patchslim.KeepSet(0, torch.zeros(3, 4, dtype=torch.long)),)))


def test_analytic_gmacs_match_the_counter_slimmed_and_not(tiny, images):
    x = images[:1]
    assert measured_macs(tiny, x) == pytest.approx(baseline_macs(tiny.spec).total, rel=1e-9)
    for plan in (SlimPlan.single("random", 0.5, stages=(0, 1)), SlimPlan.single("uniform", 0.3, stages=(1,))):
        trace = patchslim.run(tiny, x, plan)
        assert measured_macs(tiny, x, plan) == pytest.approx(count_macs(trace).total, rel=1e-9)
        assert count_macs(trace).total < baseline_macs(tiny.spec).total


def test_bad_stages_and_windows_are_refused(tiny, images, fashion_random):
    with pytest.raises(PlanError, match="stages: tiny-swin has no stage 5"):
        patchslim.run(tiny, images, SlimPlan.single("random", 0.5, stages=(5,)))
    with pytest.raises(PlanError, match="give blocks or stages, not both"):
        SlimPlan.single("random", 0.5, blocks=(1,), stages=(1,))
    with pytest.raises(PlanError, match="stages apply to hierarchical models"):
        patchslim.run(fashion_random, torch.randn(1, 1, 48, 48), SlimPlan.single("random", 0.5, stages=(0,)))
    with pytest.raises(UnsupportedModelError, match="window_size 4x4 of block 0 of stage 0 does not divide its token grid 10x10"):
        patchslim.wrap_model(_swin(img_size=20), name="odd")
    with pytest.raises(PlanError, match="score=received"):
        patchslim.run(tiny, images, SlimPlan.single("attention", 0.5, stages=(1,), score="cls"))


def test_fashion_swin_defaults_to_its_first_stage(fashion_swin_random):
    spec = fashion_swin_random.spec
    assert spec.kind == "swin" and spec.default_stages == (0,)
    assert [b.windows for b in spec.blocks] == [4, 4, 4, 4, 1, 1]
    trace = patchslim.run(fashion_swin_random, torch.randn(2, 1, 48, 48), SlimPlan.single("entropy", 0.5))
    assert trace.tokens_per_block == [72, 72, 72, 72, 36, 36]
    assert 0.6 < trace.mean_keep_ratio < 0.7


@pytest.mark.skipif(not __import__("patchslim.bundled").bundled.fashion_mnist_available(),
                    reason="needs apt-get install dataset-fashion-mnist")
def test_fashion_swin_reaches_85_percent():
    """The shipped checkpoint on the full 10,000-image canvas test set (85.23 % when trained); a keep-all plan in
    its default stages predicts the same."""
    from patchslim import bundled

    model = patchslim.load_model("fashion-swin", device="cpu")
    assert bundled.SWIN_CHECKPOINT_PATH.stat().st_size <= 5 * 1024 * 1024
    images, labels = bundled.canvas_test_set()
    labels = torch.from_numpy(labels)
    plan = SlimPlan.single("attention", 1.0)
    full = slim = 0
    for start in range(0, len(images), 1000):
        x = bundled.to_model_input(images[start: start + 1000])
        y = labels[start: start + 1000]
        full += int((patchslim.run(model, x).logits.argmax(-1) == y).sum())
        slim += int((patchslim.run(model, x, plan).logits.argmax(-1) == y).sum())
    assert full / len(images) >= 0.85
    assert slim == full
