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
from patchslim.methods.tome import bipartite_matching, bipartite_sets, merge_weighted, soft_matching
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


# Five non-prefix tokens with 2-d metrics, chosen so that no similarity ties:
#   t0 = (1, 0), t1 = (0.8, 0.6), t2 = (0, 1), t3 = (-0.28, 0.96), t4 = (-0.6, 0.8)   (unit vectors)
# With one prefix token (a CLS at position 0), t0..t4 sit at positions 1..5: A = {t1, t3}, B = {t0, t2, t4};
#   t1's best is t0 (0.8), t3's best is t2 (0.96).
# With no prefix token: A = {t0, t2, t4}, B = {t1, t3};
#   t0's best is t1 (0.8), t2's best is t3 (0.96), t4's best is t3 (0.168 + 0.768 = 0.936).
_TOME_METRIC = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.28, 0.96], [-0.6, 0.8]])


@pytest.mark.parametrize("count, prefix, a, b", [
    (5, 0, [0, 2, 4], [1, 3]),
    (5, 1, [1, 3], [0, 2, 4]),  # a class token at 0 is in A: patch 0 falls in B
    (4, 2, [0, 2], [1, 3]),  # CLS (A) and distillation token (B) before them
    (6, 5, [1, 3, 5], [0, 2, 4]),  # a CLS and four registers
])
def test_tome_sets_alternate_over_the_whole_sequence_prefix_included(count, prefix, a, b):
    set_a, set_b = bipartite_sets(count, prefix)
    assert set_a.tolist() == a and set_b.tolist() == b


def test_tome_matching_with_a_class_token_keeps_the_order_of_the_a_tokens_that_stay():
    metric = _TOME_METRIC.unsqueeze(0)
    match = soft_matching(metric, 1, num_prefix=1)
    assert match.destination.tolist() == [[0, 1, 2, 2, 4]]  # t3 -> t2 (0.96 beats t1's 0.8)
    assert match.order.tolist() == [[1, 0, 2, 4]]  # A tokens that stayed, then every B token
    torch.testing.assert_close(match.distinct, torch.tensor([[2.0, 0.2, 2.0, 0.04, 2.0]]))
    match = soft_matching(metric, 2, num_prefix=1)
    assert match.destination.tolist() == [[0, 0, 2, 2, 4]] and match.order.tolist() == [[0, 2, 4]]


def test_tome_matching_without_prefix_tokens_orders_the_a_tokens_that_stay_by_similarity():
    metric = _TOME_METRIC.unsqueeze(0)
    match = soft_matching(metric, 1, num_prefix=0)
    assert match.destination.tolist() == [[0, 1, 3, 3, 4]]  # t2 -> t3
    assert match.order.tolist() == [[4, 0, 1, 3]]  # t4 (0.936) before t0 (0.8), as the reference leaves them
    torch.testing.assert_close(match.distinct, torch.tensor([[0.2, 2.0, 0.04, 2.0, 0.064]]))
    match = soft_matching(metric, 2, num_prefix=0)
    assert match.destination.tolist() == [[0, 1, 3, 3, 3]] and match.order.tolist() == [[0, 1, 3]]
    destination, distinct = bipartite_matching(metric, 2)  # the (destination, distinctiveness) helper
    assert torch.equal(destination, match.destination) and torch.equal(distinct, match.distinct)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        soft_matching(metric, 3)


def test_tome_merge_is_a_size_weighted_average_in_the_matchs_order():
    tokens = torch.arange(10, dtype=torch.float32).reshape(1, 5, 2)
    sizes = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0]])
    match = soft_matching(_TOME_METRIC.unsqueeze(0), 2)  # t2 and t4 -> t3; out: t0, t1, t3
    merged, new_sizes, combination = merge_weighted(tokens, sizes, match)
    x = tokens[0]
    torch.testing.assert_close(merged[0], torch.stack([x[0], x[1], (x[2] + 3 * x[3] + x[4]) / 5]))
    assert new_sizes.tolist() == [[1.0, 2.0, 5.0]]
    assert combination[0].tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 1]]


def test_tome_reduce_with_a_class_token_merges_patches_and_tracks_sizes_and_provenance():
    keys = torch.cat([torch.tensor([[5.0, 5.0]]), _TOME_METRIC]).reshape(1, 1, 6, 2)  # the CLS key is ignored
    tokens = torch.arange(18, dtype=torch.float32).reshape(1, 6, 3)
    sizes = torch.tensor([[1.0, 1.0, 1.0, 3.0, 1.0, 1.0]])
    state = TokenState(tokens, 1, Provenance.identity(1, 5), sizes)
    ctx = StageContext(block=0, point="mid", keep_ratio=1.0, target=5, options={"r": 1}, keys=keys,
                       num_patches=5, grid_size=(1, 5), depth=1)
    out = get_method("tome").reduce(state, ctx)
    merged, x = out.state, tokens[0, 1:]
    assert torch.equal(merged.prefix, tokens[:, :1])
    expected = torch.stack([x[1], x[0], (3 * x[2] + x[3]) / 4, x[4]])  # t3 (size 1) into t2 (size 3)
    torch.testing.assert_close(merged.patches[0], expected)
    assert merged.sizes.tolist() == [[1.0, 1.0, 1.0, 4.0, 1.0]]
    assert merged.provenance.dense()[0].tolist() == [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 1, 0],
                                                     [0, 0, 0, 0, 1]]
    torch.testing.assert_close(out.scores, torch.tensor([[2.0, 0.2, 2.0, 0.04, 2.0]]))


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_tome_every_merged_token_is_the_size_weighted_mean_of_the_patches_its_provenance_names(prefix):
    g = torch.Generator().manual_seed(prefix)
    m, channels, r = 9, 4, 4
    ids = torch.randperm(m, generator=g).unsqueeze(0)  # tokens arrive in some earlier order
    state = TokenState(torch.randn(1, prefix + m, channels, generator=g), prefix, Provenance(m, ids=ids),
                       torch.cat([torch.ones(1, prefix), torch.randint(1, 5, (1, m), generator=g).float()], 1))
    keys = torch.randn(1, 2, prefix + m, 3, generator=g)
    ctx = StageContext(block=0, point="mid", keep_ratio=1.0, target=m, options={"r": r}, keys=keys,
                       num_patches=m, grid_size=(3, 3), depth=1)
    out = get_method("tome").reduce(state, ctx).state
    # by original patch id: the features and sizes the tokens had before
    before = torch.zeros(m, channels).index_copy_(0, ids[0], state.patches[0])
    size_before = torch.zeros(m).index_copy_(0, ids[0], state.sizes[0, prefix:])
    rows = out.provenance.dense()[0]
    assert out.count == m - r and torch.equal(rows.sum(0), torch.ones(m))  # every patch in exactly one token
    torch.testing.assert_close(out.sizes[0, prefix:], rows @ size_before)
    torch.testing.assert_close(out.patches[0], (rows * size_before) @ before / (rows @ size_before)[:, None])
    assert torch.equal(out.prefix, state.prefix)


def _tiny_vit(class_token: bool):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2,
                            num_heads=2, class_token=class_token, global_pool="token" if class_token else "avg")
    return patchslim.wrap_model(vit, name="tiny-" + ("cls" if class_token else "avg"))


def test_tome_pools_each_final_token_once_by_default_and_by_size_with_the_option():
    model = _tiny_vit(class_token=False)
    x = _images(model, 2)
    seen = []
    head = model.adapter.head

    def spy(state):
        seen.append(state)
        return head(state)

    model.adapter.head = spy  # this test's own model
    default = patchslim.run(model, x, SlimPlan.single("tome", r=12))
    weighted = patchslim.run(model, x, SlimPlan.single("tome", r=12, size_weighted_pool=True))
    vit = model.model
    with torch.inference_mode():
        features = vit.norm(seen[0].tokens)
        assert seen[0].sizes is None  # the published pooling: each token once
        torch.testing.assert_close(default.logits, vit.head(vit.fc_norm(features.mean(1))))
        sizes = seen[1].sizes
        assert sizes is not None and torch.equal(sizes, weighted.final_provenance.dense().sum(-1))
        features = vit.norm(seen[1].tokens)
        mean = (features * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True)
        torch.testing.assert_close(weighted.logits, vit.head(vit.fc_norm(mean)))
    assert not torch.allclose(default.logits, weighted.logits)
    assert default.tokens_per_block == weighted.tokens_per_block == [64, 52]


def test_tome_pooling_option_changes_nothing_on_a_class_token_model():
    model = _tiny_vit(class_token=True)
    x = _images(model, 2)
    default = patchslim.run(model, x, SlimPlan.single("tome", r=12))
    weighted = patchslim.run(model, x, SlimPlan.single("tome", r=12, size_weighted_pool=True))
    assert torch.equal(default.logits, weighted.logits)
    assert not torch.equal(default.logits, patchslim.run(model, x).logits)


@pytest.mark.parametrize("class_token", [False, True])
def test_tome_keeps_everything_exactly_at_r_zero_and_rho_one(class_token):
    model = _tiny_vit(class_token)
    x = _images(model, 2)
    with torch.inference_mode():
        plain = model.model(x)
    for plan in (SlimPlan.single("tome", r=0), SlimPlan.single("tome", 1.0),
                 SlimPlan.single("tome", r=0, size_weighted_pool=True)):
        assert torch.equal(patchslim.run(model, x, plan).logits, plain)


def test_tome_protects_the_class_and_distillation_tokens(deit_tiny_distilled_random):
    model = deit_tiny_distilled_random
    x = _images(model, 2)
    trace = patchslim.run(model, x, SlimPlan.single("tome", r=16))
    rows = trace.final_provenance.dense()
    assert trace.final_tokens == 2 + rows.shape[1]  # both prefix tokens are still there, apart
    assert torch.equal(rows.sum(1), torch.ones(2, model.num_patches))  # every patch in one non-prefix token
    assert set(rows.unique().tolist()) == {0.0, 1.0}


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
    assert out.provenance.pending is not None and out.provenance.weights is None  # recorded, not yet built
    assert (out.provenance.count, out.provenance.batch) == (3, 1)
    torch.testing.assert_close(out.provenance.dense()[0, 2], torch.tensor([0, 0.25, 0, 0.5, 0.25]))
    expected = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0], [0, 0.25, 0, 0.5, 0.25]])  # patches 0, 2, the rest
    torch.testing.assert_close(out.provenance.dense()[0], expected)
    assert out.sizes is None
    mean = get_method("evit").reduce(state, StageContext(**{**ctx.__dict__, "options": {"fusion": "mean"}}))
    torch.testing.assert_close(mean.state.patches[0, 2], fused / 0.2)
    assert torch.equal(mean.state.provenance.dense(), out.provenance.dense())  # the fusion does not change it


def test_a_combination_recorded_on_the_provenance_reads_as_the_combination_applied_at_once():
    """Provenance.combine_later (EViT's fused token) gives, when read, what combine gives at once, also after a
    recorded merge; the matrix is built once, however often the provenance is read."""
    from patchslim.tokens import MergeSlots

    g = torch.Generator().manual_seed(3)
    start = Provenance(12, ids=torch.stack([torch.randperm(12, generator=g)[:10] for _ in range(2)]), grid=(3, 4))
    match = soft_matching(torch.randn(2, 10, 3, generator=g), 3, 1)
    slots = MergeSlots(match.order, match.merged_positions, match.into)
    for before in (start, start.merge_later(slots)):
        matrix = torch.rand(2, 4, before.count, generator=g)
        built = []
        lazy = before.combine_later(4, lambda: built.append(1) or matrix)
        assert built == [] and (lazy.count, lazy.batch) == (4, 2)
        torch.testing.assert_close(lazy.dense(), before.resolved().combine(matrix).dense(), rtol=0, atol=0)
        lazy.dense(), lazy.patch_mask()
        assert built == [1]


def test_uniform_stride_longer_than_the_tokens_keeps_one():
    """rho = 1/k with k past the token count (a small window, or a tiny rho): eq. 9 keeps no index, so one stays."""
    from patchslim.methods.uniform import uniform_positions

    assert uniform_positions(16, 0.01, 1).tolist() == [15]
    assert uniform_positions(16, 0.01, 1, indexing="zero").tolist() == [0]


def test_tome_provenance_by_assignment_equals_the_dense_products_it_replaces():
    """Merges tracked as an assignment (one gather per block) give, when read, the source matrix that the product
    of the blocks' 0/1 combinations gives; pruning and window regrouping after a merge as well."""
    from patchslim.methods.tome import merge_into_slots
    from patchslim.tokens import Provenance, merge_patches, replace_patches

    g = torch.Generator().manual_seed(5)
    n, prefix, channels = 24, 1, 4
    perm = torch.stack([torch.randperm(n, generator=g)[:20] for _ in range(2)])  # pruned first: 20 of 24 patches
    lazy = TokenState(torch.randn(2, prefix + 20, channels, generator=g), prefix, Provenance(n, ids=perm))
    dense = lazy
    for r in (4, 3, 5):  # three blocks of merges
        match = soft_matching(torch.randn(2, lazy.count, 3, generator=g), r, prefix)
        sizes = torch.ones(2, lazy.count)
        merged, new_sizes, slot = merge_into_slots(lazy.patches, sizes, match)
        _, _, combination = merge_weighted(dense.patches, sizes, match)
        lazy = merge_patches(lazy, merged, slot, new_sizes)
        dense = replace_patches(dense, merged, combination, new_sizes)
        assert lazy.provenance.assignment is not None and lazy.provenance.weights is None  # no product
        assert torch.equal(lazy.provenance.dense(), dense.provenance.dense())
        assert torch.equal(lazy.provenance.patch_mask(), dense.provenance.patch_mask())
        assert lazy.provenance.count == dense.provenance.count == lazy.count
    kept = torch.tensor([[0, 2, 3], [1, 4, 5]])
    assert torch.equal(lazy.provenance.select(kept).dense(), dense.provenance.select(kept).dense())
    windows = lazy.provenance.regroup(4)  # 2 images of 8 tokens <-> 4 groups of 4
    assert windows.batch == 4 and windows.count == 4
    assert torch.equal(windows.dense(), dense.provenance.dense().reshape(4, 4, n))
    assert torch.equal(windows.regroup(2).dense(), dense.provenance.dense())
    assert torch.equal(lazy.provenance.repeat(2).dense(), dense.provenance.dense().repeat(2, 1, 1))
