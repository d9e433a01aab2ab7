"""Each method does what its equation says, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

import patchslim
from patchslim import PlanError, SlimPlan
from patchslim.methods import StageContext, get_method
from patchslim.methods.attention import cls_scores, printed_scores, received_scores
from patchslim.methods.grid import grid_patch_ids, grid_shape
from patchslim.methods.lowrank import lowrank_tokens
from patchslim.tokens import Provenance, TokenState


def _images(model, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.spec.in_chans, *model.spec.img_size, generator=g)


def _counts(trace) -> tuple[list[int], list[int]]:
    return [b.tokens_attention for b in trace.blocks], [b.tokens_mlp for b in trace.blocks]


def _input_tokens(model, x: torch.Tensor) -> torch.Tensor:
    vit = model.model
    with torch.inference_mode():
        return vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))


# --- uniform (eq. 9) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_uniform_keeps_exactly_the_indices_of_eq9(fashion_random, k):
    n = fashion_random.num_patches
    x = _images(fashion_random)
    survey = patchslim.run(fashion_random, x, SlimPlan.single("uniform", 1 / k)).kept_patch_ids(0)[0]
    # Eq. 9 numbers the patches x_1 .. x_N and keeps i ≡ 0 (mod k): 1-based k, 2k, ...
    assert survey.tolist() == [i - 1 for i in range(1, n + 1) if i % k == 0]
    zero = patchslim.run(fashion_random, x, SlimPlan.single("uniform", 1 / k, indexing="zero")).kept_patch_ids(0)[0]
    assert zero.tolist() == [i for i in range(n) if i % k == 0]


def test_uniform_spaces_any_rho_evenly(deit_tiny_random):
    trace = patchslim.run(deit_tiny_random, _images(deit_tiny_random), SlimPlan.single("uniform", 0.7))
    ids = trace.kept_patch_ids(0)[0]
    assert ids.numel() == round(0.7 * 196)
    gaps = ids.diff()
    assert int(gaps.max()) - int(gaps.min()) <= 1  # as even as integers allow
    assert int(ids[-1]) == 195  # survey numbering ends on the last patch, like x_N when k divides N


# --- grid (eq. 10) -----------------------------------------------------------------------------------

def test_grid_keeps_the_lattice_of_eq10(deit_tiny_random, fashion_random):
    trace = patchslim.run(deit_tiny_random, _images(deit_tiny_random), SlimPlan.single("grid", 0.25))
    lattice = [r * 14 + c for r in range(0, 14, 2) for c in range(0, 14, 2)]  # G = 7, P = 2
    assert trace.kept_patch_ids(0)[0].tolist() == lattice
    assert trace.keep_ratio == 49 / 196
    trace = patchslim.run(fashion_random, _images(fashion_random), SlimPlan.single("grid", 1 / 9))
    assert trace.kept_patch_ids(0)[0].tolist() == [r * 12 + c for r in (0, 3, 6, 9) for c in (0, 3, 6, 9)]


def test_grid_reports_the_rho_it_reaches_and_spreads_uneven_strides(deit_tiny_random):
    assert grid_shape(0.5, (14, 14)) == (10, 10)  # round(sqrt(98)) = 10
    trace = patchslim.run(deit_tiny_random, _images(deit_tiny_random), SlimPlan.single("grid", 0.5))
    assert trace.keep_ratio == pytest.approx(100 / 196)
    rows = [math.floor(m * 14 / 10) for m in range(10)]  # i = mP with P = 1.4
    assert trace.kept_patch_ids(0)[0].tolist() == [r * 14 + c for r in rows for c in rows]
    centred = grid_patch_ids(0.25, (14, 14), "center").tolist()
    assert centred == [r * 14 + c for r in range(1, 14, 2) for c in range(1, 14, 2)]


def test_grid_on_a_non_square_grid_thins_rows_and_columns_alike():
    assert grid_shape(0.25, (4, 8)) == (2, 4)
    assert grid_patch_ids(0.25, (4, 8)).tolist() == [r * 8 + c for r in (0, 2) for c in (0, 2, 4, 6)]
    assert grid_shape(0.001, (4, 8)) == (1, 1)  # clamped to at least one patch


def test_grid_after_another_pruning_stage_is_refused(fashion_random):
    plan = SlimPlan((patchslim.Stage("random", 0.5), patchslim.Stage("grid", 0.25, blocks=(2,))))
    with pytest.raises(PlanError, match="full 12x12 patch grid"):
        patchslim.run(fashion_random, _images(fashion_random), plan)


# --- lowrank (eq. 11) --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 196, 192), (2, 144, 96), (1, 20, 64)])
def test_lowrank_with_r_equal_n_reconstructs_the_tokens(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    tokens, loadings, _ = lowrank_tokens(x, shape[1])
    # U_r T = U U^T X = X exactly when r = N (U is the full orthogonal factor).
    torch.testing.assert_close(loadings.transpose(1, 2) @ tokens, x, atol=2e-4, rtol=1e-4)


def test_lowrank_tokens_are_sigma_v_and_the_best_rank_r_summary():
    x = torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(2))
    tokens, loadings, singular = lowrank_tokens(x, 5)
    u, s, vh = torch.linalg.svd(x[0], full_matrices=False)
    reference = s[:5, None] * vh[:5]  # Sigma_r V_r^T, up to the sign of each component
    signs = torch.sign((tokens[0] * reference).sum(-1, keepdim=True))
    torch.testing.assert_close(tokens[0], signs * reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(singular[0], s)
    # Eckart-Young: the reconstruction error is the energy of the dropped singular values.
    error = (loadings.transpose(1, 2) @ tokens - x).pow(2).sum()
    assert float(error) == pytest.approx(float(s[5:].pow(2).sum()), rel=1e-3)
    assert (loadings.sum(-1) >= 0).all()  # sign convention


def test_lowrank_falls_back_to_the_svd_when_the_eigensolver_fails(monkeypatch):
    x = torch.randn(2, 30, 12, generator=torch.Generator().manual_seed(3))
    fast = lowrank_tokens(x, 4)

    def failing_eigh(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    slow = lowrank_tokens(x, 4)
    for a, b in zip(fast, slow):  # same tokens, loadings (sign convention) and singular values
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_lowrank_of_rank_deficient_tokens_still_has_an_orthonormal_basis():
    """Two distinct tokens repeated: rank 2, yet r = 10 gives 10 orthonormal loadings (the extra tokens are
    zero) and r = M still reconstructs."""
    base = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    x = base[torch.arange(20) % 2][None]
    tokens, loadings, singular = lowrank_tokens(x, 10)
    torch.testing.assert_close(loadings @ loadings.transpose(1, 2), torch.eye(10)[None], atol=1e-5, rtol=0)
    assert float(tokens[0, 2:].abs().max()) < 1e-3 * float(tokens[0, 0].abs().max())
    assert float(singular[0, 2:].max()) < 1e-3 * float(singular[0, 0])
    full_tokens, full_loadings, _ = lowrank_tokens(x, 20)
    torch.testing.assert_close(full_loadings.transpose(1, 2) @ full_tokens, x, atol=1e-4, rtol=1e-4)


def test_lowrank_in_the_forward_has_orthonormal_loadings(fashion_random):
    trace = patchslim.run(fashion_random, _images(fashion_random, 2), SlimPlan.single("lowrank", 0.25))
    w = trace.provenance_at(0).dense()
    assert w.shape == (2, 36, 144)
    torch.testing.assert_close(w @ w.transpose(1, 2), torch.eye(36).expand(2, -1, -1), atol=1e-4, rtol=0)
    assert trace.stages[0].selection_macs > 0


# --- entropy (eq. 12-13) -----------------------------------------------------------------------------

def _hand_entropy(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    p = z.exp() / z.exp().sum(-1, keepdim=True)
    return -(p * p.log()).sum(-1)


def test_entropy_at_the_input_drops_the_lowest_entropy_patches(fashion_random):
    x = _images(fashion_random, 2)
    trace = patchslim.run(fashion_random, x, SlimPlan.single("entropy", 0.5, blocks=0))
    s = _hand_entropy(_input_tokens(fashion_random, x)[:, 1:])
    for image in range(2):
        expected = s[image].argsort(descending=True)[:72].sort().values
        assert trace.kept_patch_ids(0)[image].tolist() == expected.tolist()
        kept = trace.kept_patch_ids(0)[image]
        dropped = torch.ones(144, dtype=torch.bool)
        dropped[kept] = False
        assert s[image, kept].min() >= s[image, dropped].max()
    torch.testing.assert_close(trace.stages[0].scores.double(), s, atol=1e-5, rtol=0)


def test_entropy_by_default_scores_after_the_first_block(fashion_random):
    assert get_method("entropy").default_blocks(6) == (1,)
    x = _images(fashion_random)
    trace = patchslim.run(fashion_random, x, SlimPlan.single("entropy", 0.3))
    with torch.inference_mode():
        after_block0 = fashion_random.model.blocks[0](_input_tokens(fashion_random, x))
    s = _hand_entropy(after_block0[:, 1:])[0]
    assert trace.kept_patch_ids(1)[0].tolist() == s.argsort(descending=True)[:43].sort().values.tolist()
    assert trace.tokens_per_block == [145] + [44] * 5


def test_entropy_threshold_keeps_the_tokens_above_tau(fashion_random):
    x = _images(fashion_random, 2, seed=4)
    s = _hand_entropy(_input_tokens(fashion_random, x)[:, 1:])
    tau = float(s[0].median())
    trace = patchslim.run(fashion_random, x[:1], SlimPlan.single("entropy", blocks=0, tau=tau))
    assert trace.kept_patch_ids(0)[0].tolist() == torch.nonzero(s[0] > tau).flatten().tolist()
    # In a batch every image keeps the batch's largest count, topped up by the next-highest entropies.
    trace = patchslim.run(fashion_random, x, SlimPlan.single("entropy", blocks=0, tau=tau))
    counts = (s > tau).sum(1)
    assert trace.final_provenance.count == int(counts.max())
    fuller = int(counts.argmax())
    assert trace.kept_patch_ids(0)[fuller].tolist() == torch.nonzero(s[fuller] > tau).flatten().tolist()


def test_entropy_tau_too_high_names_tau_and_the_range(fashion_random):
    with pytest.raises(PlanError, match=r"'tau'.*range from [0-9.]+ to [0-9.]+"):
        patchslim.run(fashion_random, _images(fashion_random), SlimPlan.single("entropy", blocks=0, tau=50.0))
    with pytest.raises(PlanError, match="tau"):
        SlimPlan.single("entropy", tau=-1)


# --- attention (eq. 16 and its erratum) --------------------------------------------------------------

def test_printed_eq16_is_constant_and_received_attention_is_not(deit_tiny_random):
    x = _images(deit_tiny_random)
    trace = patchslim.run(deit_tiny_random, x, SlimPlan.single("attention", 0.5, blocks=3, score="received",
                                                         attention_blocks=(2,)))
    attn = trace.attention[2]
    printed = printed_scores(attn, 1)
    torch.testing.assert_close(printed, torch.ones_like(printed))  # a softmax row sums to 1
    received = received_scores(attn, 1)
    assert float(received.std() / received.mean()) > 1e-3  # it does rank the tokens (random init: mildly)
    assert trace.kept_patch_ids(3)[0].tolist() != list(range(98))  # what the constant score would keep
    expected = received[0].double().argsort(descending=True, stable=True)[:98].sort().values
    assert trace.kept_patch_ids(3)[0].tolist() == expected.tolist()
    hand = attn[0, :, :, 1:].mean(dim=(0, 1))  # column mean over heads and queries
    torch.testing.assert_close(received[0], hand)


def test_attention_cls_score_reads_the_prefix_rows(deit_small_distilled_random):
    x = _images(deit_small_distilled_random)
    trace = patchslim.run(deit_small_distilled_random, x, SlimPlan.single("attention", 0.25, blocks=2,
                                                                    attention_blocks=(1,)))
    attn = trace.attention[1]
    hand = (attn[0, :, 0, 2:] + attn[0, :, 1, 2:]).mean(0) / 2  # CLS and distillation rows
    torch.testing.assert_close(cls_scores(attn, 2)[0], hand)
    assert trace.kept_patch_ids(2)[0].tolist() == hand.argsort(descending=True)[:49].sort().values.tolist()


def test_attention_default_block_and_multi_stage(fashion_random):
    method = get_method("attention")
    assert method.default_blocks(12) == (3,) and method.default_blocks(6) == (2,)
    trace = patchslim.run(fashion_random, _images(fashion_random), SlimPlan.single("attention", 0.5, blocks=(2, 4)))
    assert trace.tokens_per_block == [145, 145, 73, 73, 37, 37]
    with pytest.raises(PlanError, match="block 0"):
        patchslim.run(fashion_random, _images(fashion_random), SlimPlan.single("attention", 0.5, blocks=0))


# --- tome --------------------------------------------------------------------------------------------

def test_tome_with_r_zero_changes_nothing(deit_tiny_random):
    x = _images(deit_tiny_random, 2)
    plain = patchslim.run(deit_tiny_random, x)
    trace = patchslim.run(deit_tiny_random, x, SlimPlan.single("tome", r=0))
    assert torch.equal(trace.logits, plain.logits)
    assert trace.tokens_per_block == [197] * 12


@pytest.mark.parametrize("r", [8, 13, 16])
def test_tome_token_counts_on_deit_s(deit_small_random, r):
    trace = patchslim.run(deit_small_random, _images(deit_small_random), SlimPlan.single("tome", r=r))
    attention, mlp = _counts(trace)
    expected = [197]
    for _ in range(12):  # at most half of the non-prefix tokens per block, as in ToMe
        expected.append(expected[-1] - min(r, (expected[-1] - 1) // 2))
    assert attention == expected[:-1]  # block i attends over N_i tokens ...
    assert mlp == expected[1:]  # ... and its MLP runs on N_i - r
    if r == 16:
        assert mlp[-2:] == [21, 11]  # the last block could merge only 10
    assert all(b.merged_sizes for b in trace.blocks[1:])


def test_tome_clips_r_to_half_the_tokens_and_refuses_r_above_n(fashion_random):
    trace = patchslim.run(fashion_random, _images(fashion_random), SlimPlan.single("tome", r=144))
    assert [m - 1 for m in _counts(trace)[1]] == [72, 36, 18, 9, 5, 3]
    with pytest.raises(PlanError, match=r"'r'.*\[0, 144\]"):
        patchslim.run(fashion_random, _images(fashion_random), SlimPlan.single("tome", r=145))


def test_tome_from_keep_ratio_spreads_the_budget_to_reach_rho(deit_tiny_random):
    trace = patchslim.run(deit_tiny_random, _images(deit_tiny_random), SlimPlan.single("tome", 0.5))
    mlp = [m - 1 for m in _counts(trace)[1]]
    removed = [a - b for a, b in zip([196] + mlp, mlp)]
    assert mlp[-1] == 98 and sorted(set(removed)) == [8, 9]  # 98 over 12 blocks: 8 or 9 each
    trace = patchslim.run(deit_tiny_random, _images(deit_tiny_random), SlimPlan.single("tome", 0.5, blocks=(4, 8)))
    assert [m - 1 for m in _counts(trace)[1]][3:9] == [196, 147, 147, 147, 147, 98]


def test_tome_merges_the_most_similar_pair_into_a_size_weighted_average():
    # Four tokens; A = {0, 2}, B = {1, 3}. Keys of 0 and 1 point the same way, 2 and 3 do not.
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, -1.0]])
    keys = torch.cat([torch.zeros(1, 2), keys]).reshape(1, 1, 5, 2)  # a CLS token first, one head
    tokens = torch.arange(15, dtype=torch.float32).reshape(1, 5, 3)
    sizes = torch.tensor([[1.0, 3.0, 1.0, 1.0, 1.0]])
    state = TokenState(tokens, 1, Provenance.identity(1, 4), sizes)
    ctx = StageContext(block=0, point="mid", keep_ratio=1.0, target=4, options={"r": 1}, keys=keys,
                       num_patches=4, grid_size=(2, 2), depth=1)
    out = get_method("tome").reduce(state, ctx)
    merged = out.state
    assert torch.equal(merged.prefix, tokens[:, :1])
    expected = (3 * tokens[0, 1] + 1 * tokens[0, 2]) / 4  # sizes 3 and 1
    torch.testing.assert_close(merged.patches[0, 0], expected)
    torch.testing.assert_close(merged.patches[0, 1:], tokens[0, 3:])
    assert merged.sizes.tolist() == [[1.0, 4.0, 1.0, 1.0]]
    assert merged.provenance.dense()[0].tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert out.scores[0, 1] == 2.0 and out.scores[0, 0] < out.scores[0, 2]


# --- evit --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep, counts", [(0.7, (140, 100, 72)), (0.5, (100, 52, 28))])
def test_evit_token_counts_on_deit_s(deit_small_random, keep, counts):
    trace = patchslim.run(deit_small_random, _images(deit_small_random), SlimPlan.single("evit", keep))
    attention, mlp = _counts(trace)
    a, b, c = counts  # ceil(rho M) kept + CLS + the fused token; M counts the previous fused token
    assert mlp == [197] * 3 + [a] * 3 + [b] * 3 + [c] * 3
    assert attention == [197] * 4 + [a] * 3 + [b] * 3 + [c] * 2
    assert get_method("evit").default_blocks(12) == (3, 6, 9)


def test_evit_fuses_the_dropped_tokens_weighted_by_cls_attention():
    tokens = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0))
    cls_row = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.1, 0.05])  # CLS, then 5 patches
    attention = torch.full((1, 2, 6, 6), 1 / 6)
    attention[0, :, 0] = cls_row
    state = TokenState(tokens, 1, Provenance.identity(1, 5))
    ctx = StageContext(block=0, point="mid", keep_ratio=0.4, target=2, options={"fusion": "sum"},
                       attention=attention, num_patches=5, grid_size=(1, 5), depth=1)
    out = get_method("evit").reduce(state, ctx).state
    assert out.count == 3  # ceil(0.4 * 5) = 2 kept, plus the fused token
    torch.testing.assert_close(out.patches[0, :2], tokens[0, [1, 3]])  # patches 0 and 2 by CLS attention
    fused = 0.05 * tokens[0, 2] + 0.1 * tokens[0, 4] + 0.05 * tokens[0, 5]
    torch.testing.assert_close(out.patches[0, 2], fused)
    torch.testing.assert_close(out.provenance.dense()[0, 2], torch.tensor([0, 0.25, 0, 0.5, 0.25]))
    assert out.sizes is None
    mean = get_method("evit").reduce(state, StageContext(**{**ctx.__dict__, "options": {"fusion": "mean"}}))
    torch.testing.assert_close(mean.state.patches[0, 2], fused / 0.2)


def test_uniform_stride_longer_than_the_tokens_keeps_one():
    """rho = 1/k with k past the token count (a small window, or a tiny rho): eq. 9 keeps no index, so one stays."""
    from patchslim.methods.uniform import uniform_positions

    assert uniform_positions(16, 0.01, 1).tolist() == [15]
    assert uniform_positions(16, 0.01, 1, indexing="zero").tolist() == [0]
