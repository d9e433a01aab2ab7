"""``ppt``: prune or pool, per block and per image, by the variance of the importance scores (Wu et al., 2023,
"PPT: Token Pruning and Pooling for Efficient Vision Transformers").

PPT sees two kinds of redundancy: *inattentive* tokens the class token ignores (pruning removes them) and
*duplicative* tokens that repeat their neighbours (pooling, i.e. merging, removes them). Which one dominates
differs by block and by image, and PPT reads it off the spread of the importance scores. Inside a block, between
attention and MLP (``point="mid"``), r tokens are removed from each image:

1. significance scores (from ATS, which PPT adopts): the attention the class token pays to token j, averaged over
   heads (and over the class and distillation tokens of a distilled DeiT), weighted by the norm of token j's
   value vector and normalized over the M non-prefix tokens,

       S_j = a_j ||v_j|| / sum_i a_i ||v_i||;

2. the image's redundancy criterion is the variance of its scores, ``Var(S)`` (unbiased, over the M tokens);
3. ``Var(S) >= tau``: the scores are peaked, a few tokens matter and many are ignored, so the image **prunes**
   its r lowest-scoring tokens (plain removal: ``keep_tokens`` when no image in the batch pools);
4. ``Var(S) < tau``: attention is spread out, the redundancy is duplication, so the image **pools**: ToMe's
   bipartite soft matching on the block's keys averaged over heads and size-weighted averages, as ``tome`` does
   them (:func:`patchslim.methods.tome.soft_matching`); sizes add up and proportional attention follows.

Each image removes exactly r tokens either way, so the batch stays rectangular. When every image of the batch
pools, the step is tome's own merge (:func:`patchslim.tokens.merge_rows`, the keys summed over heads as tome sums
them: cosine similarity ignores the 1/H of the mean). When only some do, every image's provenance becomes a source
matrix (``replace_patches``; a pruning image's rows are one-hot; recorded in the forward and built when something
reads it) and every image carries sizes (1 for its tokens that were never pooled): the same tokens and logits, to
float rounding, as the image would get alone.

Defaults from the paper (DeiT-S, off the shelf: 79.50 top-1 at 2.94 GMACs per its README): ``tau = 7e-5``,
acting at blocks 3, 6 and 9 (``depth * k // 4`` for k = 1, 2, 3, as EViT; 1, 3 and 4 on the 6-block bundled
model), removing r = 50 tokens at each. tau is a variance of scores that sum to 1, so its meaning depends on
M (a uniform spread over M tokens has variance 0; scores of one token would have variance about 1/M): we keep the
paper's raw value, which was tuned for DeiT's 196 patches; option ``tau`` changes it (``tau=0`` prunes always,
a large tau pools always).

How many: option ``r`` removes r tokens at each block it acts on (at most half of those left); without ``r`` the
keep ratio rho is the share left after the stage's last block, ``R = M0 - round(rho M0)`` spread evenly over its
blocks (``tome``'s schedule), so PPT's DeiT-S setting (r = 50 at 3, 6, 9) is rho = 46/196 = 0.235. rho = 1 (or
r = 0) changes nothing.

Cost per image: ``H P M`` for the class-token rows (the engine computes only those rows; the block keeps fused
attention), ``M H d`` for the value norms, ``M`` for the variance; a pooling image adds ToMe's matching
(``ceil(M/2) floor(M/2) d + M d``) and ``M C`` for the merge. ``selection_macs`` is the batch's mean per image.
"""

from __future__ import annotations

import torch

from patchslim.errors import PlanError
from patchslim.methods.attention import check_aligned
from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.methods.tofu import check_keys, check_r
from patchslim.methods.tome import head_sum, merge_into_slots, merges_this_block, soft_matching
from patchslim.tokens import TokenState, keep_tokens, merge_rows, merged_state, replace_patches, top_k_index

DEFAULT_TAU = 7e-5


def significance_scores(attention: torch.Tensor, values: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """PPT's (ATS's) significance of every non-prefix token.

    Args:
        attention: ``[B, H, P, T]`` (or ``[B, H, T, T]``) attention probabilities; the first ``num_prefix`` rows
            are the prefix tokens' queries.
        values: ``[B, H, T, d]`` the same block's values.
        num_prefix: P.

    Returns:
        ``[B, M]`` scores that sum to 1 per image.
    """
    p = num_prefix
    received = attention[:, :, :p, p:].float().mean(dim=(1, 2))  # [B, M]
    batch, heads, tokens, d = values.shape
    norms = values[:, :, p:].float().transpose(1, 2).reshape(batch, tokens - p, heads * d).norm(dim=-1)
    weighted = received * norms
    return weighted / weighted.sum(dim=1, keepdim=True).clamp_min(1e-12)


def pools(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """``[B]`` bool: True where an image pools (score variance below ``tau``), False where it prunes."""
    return scores.var(dim=1) < tau


@register
class PruneOrPool(SlimMethod):
    name = "ppt"
    summary = "Per block and image, by the scores' variance: prune the least attended tokens or pool similar ones."
    explanation = (
        "Some images have a few tokens that matter and many the class token ignores; others have attention "
        "spread evenly over many tokens that repeat each other. PPT looks at how spread out the importance "
        "scores are (their variance): when a few tokens stand out it prunes the ignored ones, when nothing "
        "stands out it pools the most similar tokens together as ToMe does. The choice is made again at each "
        "block and for each image, so one image may prune early and pool later."
    )
    equation = (r"S_j = \frac{a_j \lVert\mathbf{v}_j\rVert}{\sum_i a_i\lVert\mathbf{v}_i\rVert},\quad "
                r"\begin{cases}\text{prune the } r \text{ lowest } S_j & \operatorname{Var}(S) \ge \tau\\ "
                r"\text{pool } r \text{ pairs (bipartite matching)} & \operatorname{Var}(S) < \tau\end{cases}")
    reference = "Wu et al., PPT: Token Pruning and Pooling for Efficient Vision Transformers, arXiv:2310.01812"
    point = "mid"
    needs_attention = True
    needs_keys = True
    needs_values = True
    merges = True
    input_dependent = True
    spreads_keep_ratio = True
    windowed = False
    window_reason = ("it scores tokens by the class token's attention, which a Swin has not, and pools tokens into "
                     "merges that would belong to no single window")
    options = (
        OptionSpec("r", "int", None,
                   "tokens removed at each block (at most half of those left); unset: derived from the keep ratio",
                   minimum=0),
        OptionSpec("tau", "float", DEFAULT_TAU,
                   "variance threshold: an image whose score variance is below it pools, else it prunes",
                   minimum=0.0, maximum=1.0),
    )

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        """Blocks depth*k//4 for k = 1, 2, 3 (3, 6, 9 of 12), as in the paper."""
        return tuple(sorted({depth * k // 4 for k in (1, 2, 3)}))

    def attention_rows(self, options: dict) -> str:
        """Only the class token's rows are read, so the block keeps fused attention."""
        return "prefix"

    def check(self, stage_options: dict, keep_ratio: float, model) -> None:
        if model.spec.num_prefix_tokens == 0:
            raise PlanError("method 'ppt' scores tokens by the class token's attention, and this model has no "
                            "class token")
        check_r(self.name, stage_options, model)

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        attention, keys, values = ctx.attention, ctx.keys, ctx.values
        check_aligned(attention, state, ctx, self.name)
        check_keys(keys, state, ctx, self.name)
        p, m = state.num_prefix, state.count
        batch, heads, _, d_head = values.shape
        scores = significance_scores(attention, values, p)
        macs = float(heads * p * m + m * heads * d_head + m)
        r = merges_this_block(ctx, m)
        if r == 0:
            return Reduction(state, scores=scores, selection_macs=macs)
        pooling = pools(scores, float(ctx.options.get("tau", DEFAULT_TAU)))
        pooled = int(pooling.sum())
        pool_macs = ((m + 1) // 2) * (m // 2) * d_head + m * d_head + m * state.tokens.shape[-1]
        if pooled == 0:  # every image prunes
            return Reduction(keep_tokens(state, top_k_index(scores, m - r)), scores=scores, selection_macs=macs)
        if pooled == batch:  # every image pools: tome's own merge (its rows rewritten in place, provenance recorded)
            match = soft_matching(head_sum(keys, p), r, p)
            tokens, sizes, slots = merge_rows(state.tokens, state.sizes, p, match.order, match.merged_positions,
                                              match.into)
            return Reduction(merged_state(state, tokens, sizes, slots), scores=scores,
                             selection_macs=macs + pool_macs)
        kept = top_k_index(scores, m - r)  # [B, M - r], what a pruning image keeps
        chosen = torch.nonzero(pooling).flatten()
        device, channels = state.tokens.device, state.tokens.shape[-1]
        sizes = (state.sizes[:, p:].float() if state.sizes is not None else torch.ones(batch, m, device=device))
        patches = state.patches.float()
        # Pruning images: the kept tokens.
        new_patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, channels))
        new_sizes = sizes.gather(1, kept)
        # Pooling images: ToMe as published (sets by parity, its output order), size-weighted, over their rows.
        match = soft_matching(head_sum(keys[chosen], p), r, p)
        merged, merged_sizes, slot = merge_into_slots(patches[chosen], sizes[chosen], match)
        new_patches[chosen], new_sizes[chosen] = merged, merged_sizes

        def combination() -> torch.Tensor:
            """``[B, M - r, M]`` 0/1: one-hot rows of the kept tokens for a pruning image, the pooled tokens' members
            for a pooling one (built only when the provenance is read: overlays, rollout, audits)."""
            matrix = torch.zeros(batch, m - r, m, device=device).scatter_(2, kept.unsqueeze(-1), 1.0)
            outputs = torch.arange(m - r, device=device)
            matrix[chosen] = (outputs.view(1, -1, 1) == slot.unsqueeze(1)).to(matrix.dtype)
            return matrix

        macs += pooled / batch * pool_macs
        return Reduction(replace_patches(state, new_patches, combination, new_sizes), scores=scores,
                         selection_macs=macs)
