"""``zerotprune``: importance by weighted PageRank on the attention graph, then similarity-based pruning (Wang,
Dedhia and Jha, CVPR 2024, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in
Pre-Trained Transformers").

Inside a block, between attention and MLP (``point="mid"``), k tokens are pruned in two stages:

1. **I-stage (importance).** Each head's attention matrix is a weighted directed graph: query j sends the weight
   ``A[j, i]`` to key i, and the rows sum to 1. The Weighted PageRank (WPR) lets importance flow along it,
   starting uniform,

       s^(0) = 1/T,    s^(t+1)_i = sum_j A[j, i] s^(t)_j     (s <- A^T s, a graph shift),

   so a token is important when important tokens attend to it. ``A^T`` keeps the total at 1 and the iteration
   converges to the stationary distribution of the Markov chain A (``pi A = pi``). The graph is all T tokens,
   prefix included; the heads' scores are combined by the paper's Emphasizing-Informative-Region aggregation,
   a root mean square, ``I_i = sqrt(mean_h s_{h,i}^2)``, which lets a head that singles out a region count more
   than heads that spread their scores. Iterations per block follow the paper (30-50 in the first three layers of
   a 12-layer model, 5-10 in the middle ones, 1 in the last three): 30 in the first ``max(1, depth // 4)``
   blocks, 1 in the last as many, 5 in between (option ``iterations`` sets one count for every block). The
   ``k_I = k - k_S`` least important tokens are pruned.
2. **S-stage (similarity).** The remaining tokens are sorted by importance and split in two: the more important
   half is the target group (kept), the other half the source group. Each source token's similarity is its
   largest cosine similarity to a target token (keys averaged over heads, as ToMe's features); the ``k_S`` source
   tokens most similar to a target are pruned, because a more important token already carries what they say.
   When an object fills the image, the I-stage alone would have to cut into it; the S-stage cuts its repeats.

Pruned tokens leave the provenance (plain patch ids, ``keep_tokens``); nothing is merged.

Choices where the paper leaves one to us (or we could not read it offline): how a block's k removals split
between the stages: option ``similarity_share`` (``k_S = round(share * k)``), default 0.5; ``0`` is importance
alone (the paper's Zero-TP-a variant). The paper's Variance-based Head Filter (dropping heads whose score
variance falls outside a range) is not applied: its thresholds are on a scale we could not pin down, and a
fixed range would not transfer from DeiT's 196 tokens to other token counts.

How many: the keep ratio rho is the share left after the stage's last block, ``R = M0 - round(rho M0)``
removals spread as evenly as integers allow over the stage's blocks, every block by default (``tome``'s
schedule, :func:`patchslim.methods.tome.merges_this_block`); option ``r`` removes r tokens at each block
instead. A block removes at most half of its tokens. rho = 1 (or r = 0) changes nothing.

Cost per image: ``iterations * H * T^2`` for the WPR (one matrix-vector product per head and iteration; the
schedule's count, while a graph whose scores reach their float32 fixed point earlier stops there, see
:func:`weighted_pagerank`), ``H M`` for the aggregation, ``M d`` to normalize the keys and ``|A| |B| d`` for the
source-target similarities. The block's attention probabilities must be explicit (``[B, H, T, T]``), which costs
time the fused kernel would save but no multiply-adds the analytic count does not already hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchslim.methods.attention import check_aligned
from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.methods.tofu import check_keys, check_r
from patchslim.methods.tome import head_sum, merges_this_block
from patchslim.tokens import TokenState, gather_rows, keep_tokens, top_k_index

DEFAULT_SIMILARITY_SHARE = 0.5


def wpr_iterations(block: int, depth: int) -> int:
    """The paper's iteration counts: 30 in the first quarter of the blocks, 1 in the last, 5 in between."""
    edge = max(1, depth // 4)
    if block < edge:
        return 30
    if block >= depth - edge:
        return 1
    return 5


def weighted_pagerank(attention: torch.Tensor, iterations: int) -> torch.Tensor:
    """Zero-TPrune's Weighted PageRank on each head's attention graph.

    Args:
        attention: ``[..., T, T]`` row-stochastic attention probabilities (query rows, key columns).
        iterations: how many times ``s <- A^T s`` is applied, from the uniform ``1/T``.

    Returns:
        ``[..., T]`` scores summing to 1 (they converge to the stationary distribution ``pi A = pi``).

    A graph whose scores have reached their fixed point in float32 stops there. The graphs are iterated in rounds
    of ``_WPR_ROUND`` iterations; after each round, a graph none of whose scores moved in the round's last
    iteration by more than ``_WPR_STILL_ULPS`` units in the last place of its largest score keeps its scores (the
    remaining iterations would only move them within rounding: they differed from the full count's by at most
    1.3e-6 of the largest score, and a 30-iteration block stopped after about 7 iterations per graph on average on
    DeiT-S with random weights, after 7 to 22 on the trained bundled model), and the next rounds iterate the others
    only (a group's stragglers copied together). The decision is per graph, so a graph's scores
    do not depend on the graphs iterated beside it.

    The first ``_WPR_FIRST_ROUNDS`` rounds run group by group, each group's back to back while its matrices are in
    the cache, the scores of the iterations the checks compare kept aside; the checks of those rounds are then
    made for every graph at once, in round order, and the graphs still moving go on round by round as before. The
    same products and the same stopping rule, so the same scores bit for bit, in 0.8 of the time of running every
    round over the whole batch (DeiT-S, batch 32, two threads: 34 against 43 ms over the 12 blocks), which read
    every matrix from memory again in each round.
    """
    tokens = attention.shape[-1]
    graphs = attention.float().reshape(-1, tokens, tokens)  # one graph per (image, head)
    count = graphs.shape[0]
    # a few graphs at a time, each group iterated while it is in the cache: the whole batch's matrices (30 MB for
    # DeiT-S at batch 32) would be read from memory once per iteration; the same products, the same scores. The
    # product splits a group's graphs between the threads, so a group holds a cache's worth per thread.
    per_group = max(1, _WPR_GROUP_ELEMENTS * max(1, torch.get_num_threads()) // (tokens * tokens))
    still = _WPR_STILL_ULPS * torch.finfo(torch.float32).eps
    # The first rounds, group by group: each group runs them back to back while its matrices are in the cache,
    # keeping the scores of the iterations the stopping checks compare (into place, no extra operation).
    step = min(iterations, _WPR_FIRST_ROUNDS * _WPR_ROUND)
    checks = [t for t in range(_WPR_ROUND, step + 1, _WPR_ROUND) if t < iterations]  # the round ends checked
    snapshot = {t: torch.empty(count, 1, tokens, device=attention.device)
                for t in {step - 1, step, *(c - 1 for c in checks), *checks} if t > 0}
    start = torch.full((min(per_group, count), 1, tokens), 1.0 / tokens, device=attention.device)
    in_place = not (torch.is_grad_enabled() and graphs.requires_grad)  # autograd cannot follow ``out=``
    for lo in range(0, count, per_group):
        hi = min(lo + per_group, count)
        group, current = graphs[lo:hi], start[: hi - lo]
        for t in range(1, step + 1):
            out = snapshot[t][lo:hi] if t in snapshot and in_place else None
            current = torch.bmm(current, group, out=out)  # row vector times A: (A^T s)^T
            if t in snapshot and not in_place:
                snapshot[t][lo:hi] = current
    scores = snapshot[step]
    previous = snapshot[step - 1] if step > 1 else start  # read only if the rounds go on (then step > 1)
    going = torch.ones(count, dtype=torch.bool, device=attention.device)
    for check in checks:  # the first rounds' stopping decisions, every graph at once, in round order
        change = (snapshot[check] - snapshot[check - 1]).abs_().amax(-1).squeeze(-1)
        moves = change > snapshot[check].amax(-1).squeeze(-1).mul_(still)
        if check < step:  # a graph that stopped here keeps this round's scores
            scores = torch.where((going & ~moves).view(-1, 1, 1), snapshot[check], scores)
        going &= moves
    moving = going.tolist()  # the graphs still iterating
    if step < iterations and not any(moving):
        step = iterations
    while step < iterations:
        span = min(_WPR_ROUND, iterations - step)
        step += span
        for lo in range(0, count, per_group):
            hi = min(lo + per_group, count)
            live = [i for i in range(lo, hi) if moving[i]]
            if not live:
                continue
            if len(live) == hi - lo:  # the whole group: its matrices where they are, no copy
                group, current = graphs[lo:hi], scores[lo:hi]
            else:  # the group's stragglers only
                rows = torch.tensor(live, device=attention.device)
                group, current = graphs.index_select(0, rows), scores.index_select(0, rows)
            for _ in range(span):
                before, current = current, torch.bmm(current, group)  # row vector times A: (A^T s)^T
            if len(live) == hi - lo:
                scores[lo:hi], previous[lo:hi] = current, before
            else:
                scores.index_copy_(0, rows, current)
                previous.index_copy_(0, rows, before)
        if step == iterations:
            break
        change = (scores - previous).abs_().amax(-1).squeeze(-1)
        still_moving = (change > scores.amax(-1).squeeze(-1).mul_(still)).tolist()
        moving = [was and now for was, now in zip(moving, still_moving)]
        if not any(moving):
            break
    return scores.reshape(attention.shape[:-1])


_WPR_GROUP_ELEMENTS = 1 << 18  # attention entries iterated together per thread by weighted_pagerank (1 MiB)
_WPR_ROUND = 3  # weighted_pagerank: iterations between two checks for graphs at their fixed point
_WPR_FIRST_ROUNDS = 2  # weighted_pagerank: rounds each group runs back to back before the round-by-round loop
_WPR_STILL_ULPS = 2  # weighted_pagerank: a move of at most this many float32 ulps (of the largest score) is rest


def eir_aggregate(head_scores: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Emphasizing-Informative-Region aggregation over heads, root mean square: ``[B, H, T]`` -> ``[B, M]``."""
    return head_scores[:, :, num_prefix:].pow(2).mean(dim=1).sqrt()


def two_stage_keep(importance: torch.Tensor, metric: torch.Tensor, prune_importance: int,
                   prune_similar: int) -> tuple[torch.Tensor, int]:
    """Which tokens the I-stage and the S-stage leave.

    Args:
        importance: ``[B, M]`` WPR importance.
        metric: ``[B, M, d]`` similarity features.
        prune_importance: k_I, tokens removed as least important.
        prune_similar: k_S, source tokens removed as most similar to a target, ``k_S <= (M - k_I) // 2``.

    Returns:
        (``[B, M - k_I - k_S]`` kept positions, ascending; the multiply-adds of the similarities).

    Ties go to the lower position in the importance order, and among equally redundant sources the more important
    one stays. The kept positions are read off a mask (in ascending order by construction) and the S-stage finds
    the k_S sources to drop with one small ``topk``: the same tokens as keeping the ``|A| - k_S`` least redundant
    sources (the keys are exact negatives of each other) and sorting what is kept, with two fewer sorts and the
    target features gathered with the sources in one copy.
    """
    batch, m = importance.shape
    device = importance.device
    if prune_similar == 0:
        return top_k_index(importance, m - prune_importance), 0  # the same keys and ties as the sort below
    tie = torch.arange(m, device=device, dtype=torch.float64) * 1e-12  # ties: the lower position first
    order = torch.sort(importance.double() - tie, dim=-1, descending=True).indices
    count = m - prune_importance  # the tokens the I-stage leaves, most important first: order[:, :count]
    targets = count - count // 2  # the more important half; the rest of the count are the sources
    unit = F.normalize(metric.float(), dim=-1)
    channels = unit.shape[-1]
    ranked = gather_rows(unit, order[:, :count])  # [B, count, d]: targets, then sources
    # B^T made contiguous: the same products as the transposed view, in less time
    redundancy = torch.bmm(ranked[:, targets:], ranked[:, :targets].mT.contiguous()).amax(dim=-1)  # [B, |A|]
    sources = count - targets
    later = torch.arange(sources, device=device, dtype=torch.float64) * 1e-12  # ties: the less important goes
    dropped = torch.topk(redundancy.double() + later, prune_similar, dim=-1).indices  # the k_S most redundant
    stays = torch.ones(batch, m, dtype=torch.bool, device=device)
    stays.scatter_(1, order[:, count:], False)  # the I-stage's k_I
    stays.scatter_(1, order.gather(1, dropped + targets), False)  # the S-stage's k_S
    kept = stays.nonzero()[:, 1].view(batch, count - prune_similar)  # row-major: ascending positions per image
    macs = targets * sources * channels + m * channels
    return kept, macs


@register
class ZeroTPrune(SlimMethod):
    name = "zerotprune"
    summary = "PageRank on the attention graph: prune the least important tokens and the repeats of important ones."
    explanation = (
        "Attention is a graph: every token sends its attention to the tokens it looks at. Zero-TPrune runs "
        "PageRank on it: a token is important if important tokens attend to it, computed by passing the scores "
        "through the attention matrix a few times. The least important tokens are pruned. Then, among the "
        "rest, the less important half is compared with the more important half, and the tokens that nearly "
        "repeat an important one are pruned too, so that a large object is thinned out instead of cut."
    )
    equation = (r"\mathbf{s}^{(t+1)} = A^\top \mathbf{s}^{(t)},\ \mathbf{s}^{(0)} = \tfrac{1}{T}\mathbf{1};\quad "
                r"I_i = \sqrt{\tfrac{1}{H}\textstyle\sum_h s_{h,i}^2};\quad \text{prune } \min I,\ \text{then } "
                r"\max_{b \in \mathcal{B}} \cos(\mathbf{k}_a, \mathbf{k}_b),\ a \in \mathcal{A}")
    reference = ("Wang, Dedhia, Jha, Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph, "
                 "CVPR 2024")
    point = "mid"
    needs_attention = True
    needs_keys = True
    input_dependent = True
    spreads_keep_ratio = True
    windowed = False
    window_reason = ("its PageRank runs on the block's full attention graph, and a windowed model exposes only the "
                     "attention each token receives in its window")
    options = (
        OptionSpec("r", "int", None,
                   "tokens pruned at each block (at most half of those left); unset: derived from the keep ratio",
                   minimum=0),
        OptionSpec("iterations", "int", None,
                   "PageRank iterations in every block; unset: 30 / 5 / 1 in the first / middle / last blocks",
                   minimum=1, maximum=200),
        OptionSpec("similarity_share", "float", DEFAULT_SIMILARITY_SHARE,
                   "share of each block's removals decided by similarity (0: by importance alone)",
                   minimum=0.0, maximum=1.0),
    )

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        """Every block."""
        return tuple(range(depth))

    def check(self, stage_options: dict, keep_ratio: float, model) -> None:
        check_r(self.name, stage_options, model)

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        attention, keys = ctx.attention, ctx.keys
        check_aligned(attention, state, ctx, self.name)
        check_keys(keys, state, ctx, self.name)
        p, m = state.num_prefix, state.count
        heads, tokens = attention.shape[1], attention.shape[-1]
        k = merges_this_block(ctx, m)
        if k == 0:  # nothing to prune here (rho 1, or a schedule that spares this block): no PageRank either
            return Reduction(state)
        iterations = ctx.options.get("iterations") or wpr_iterations(ctx.block, ctx.depth)
        importance = eir_aggregate(weighted_pagerank(attention, int(iterations)), p)  # [B, M]
        macs = iterations * heads * tokens * tokens + heads * m
        share = float(ctx.options.get("similarity_share", DEFAULT_SIMILARITY_SHARE))
        prune_similar = int(share * k + 0.5)
        metric = head_sum(keys, p)  # [B, M, d_head]: the mean over heads up to a scale cosines ignore
        kept, similarity_macs = two_stage_keep(importance, metric, k - prune_similar, prune_similar)
        # two_stage_keep returns the kept positions ascending already: no second sort
        return Reduction(keep_tokens(state, kept, sort=False), scores=importance,
                         selection_macs=float(macs + similarity_macs))
