"""``evit``: keep the tokens the CLS token attends to, fuse the rest into one (Liang et al., ICLR 2022,
"Not All Patches Are What You Need: Expediting Vision Transformers via Token Reorganizations").

Inside a block, between attention and MLP (``point="mid"``): with ``a_i`` the attention the CLS token
pays to non-prefix token i in this block, averaged over heads (for the distilled DeiT, the CLS and
distillation rows averaged), keep the ``K = ceil(rho M)`` tokens with the largest ``a_i`` (M counts every
non-prefix token, an earlier fused token included) and fuse the dropped set D into one token appended at
the end:

    x_fused = sum_{i in D} a_i x_i        (EViT's formula and code; option fusion="mean" divides by sum a_i)

Its provenance is the normalized weights ``a_i / sum_D a_i`` (recorded in the forward, built when something reads
it: :meth:`patchslim.tokens.Provenance.combine_later`). The MLP of the block then runs on
P + K + 1 tokens. The keep ratio is the per-stage keep rate; the default stages are blocks
``depth * k // 4`` for k = 1, 2, 3 (3, 6, 9 for depth 12, EViT's 4th, 7th and 10th layers).
DeiT-S, keep 0.7: MLP of block 3 on 1 + 138 + 1 = 140 tokens, then ceil(0.7 * 139) = 98 -> 100, then
ceil(0.7 * 99) = 70 -> 72 (3.0 GMACs; keep 0.5: 100, 52, 28 -> 2.3 GMACs). ``ceil`` is taken after
subtracting 1e-9, so that a float product like 0.3 * 10 = 3.0000000000000004 gives 3.

EViT does not use proportional attention, so no sizes are set; if an earlier merging stage set sizes, the
fused token's size is the sum of the dropped tokens' sizes. keep_ratio = 1 leaves the tokens untouched.

Reference: Y. Liang, C. Ge, Z. Tong, Y. Song, J. Wang, P. Xie, "Not All Patches Are What You Need:
Expediting Vision Transformers via Token Reorganizations", ICLR 2022.
"""

from __future__ import annotations

import math

import torch

from patchslim.errors import PlanError
from patchslim.methods.attention import check_aligned, cls_scores
from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.tokens import TokenState, replace_patches, top_k_index


def evit_keep_count(keep_ratio: float, current: int) -> int:
    """EViT's ``ceil(rho M)`` (at least 1, at most M)."""
    return max(1, min(current, math.ceil(keep_ratio * current - 1e-9)))


@register
class EViT(SlimMethod):
    name = "evit"
    windowed = False
    window_reason = ("it fuses the dropped tokens into one extra token that belongs to no window and cannot be"
                     " put back in place")
    summary = "Keep the tokens the CLS token attends to most and fuse the rest into one token (EViT)."
    explanation = (
        "The CLS token collects the information the classifier uses, so its attention row is a direct "
        "measure of which patches matter. EViT keeps the top rho of the tokens by CLS attention at a few "
        "blocks and, instead of discarding the others, fuses them into one extra token weighted by that "
        "attention, so their information is reduced rather than lost. The budget shrinks at each stage: "
        "rho of the tokens left, three times by default."
    )
    equation = (r"\mathcal{K} = \operatorname{top-}\lceil \rho M \rceil\ a_i,\quad "
                r"a_i = \frac{1}{H}\sum_h A^{(h)}_{\mathrm{cls},\,i},\qquad "
                r"\mathbf{x}_{\mathrm{fused}} = \sum_{i \notin \mathcal{K}} a_i \mathbf{x}_i")
    reference = "Liang et al., Not All Patches Are What You Need (EViT), ICLR 2022"
    point = "mid"
    needs_attention = True
    merges = True
    input_dependent = True
    exact_count = False  # ceil(rho M) kept plus one fused token
    options = (
        OptionSpec("fusion", "str", "sum",
                   "the fused token: EViT's attention-weighted sum, or the attention-weighted mean",
                   choices=("sum", "mean")),
    )

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        """Blocks depth*k//4 for k = 1, 2, 3 (3, 6, 9 of 12), without repeats."""
        return tuple(sorted({depth * k // 4 for k in (1, 2, 3)}))

    def attention_rows(self, options: dict) -> str:
        """Only the CLS (prefix) rows are read, so the block keeps fused attention."""
        return "prefix"

    def check(self, stage_options: dict, keep_ratio: float, model) -> None:
        if model.spec.num_prefix_tokens == 0:
            raise PlanError("method 'evit' ranks tokens by CLS attention, and this model has no CLS token")

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        attention = ctx.attention
        check_aligned(attention, state, ctx, self.name)
        p, m = state.num_prefix, state.count
        scores = cls_scores(attention, p)  # [B, M]
        keep = evit_keep_count(ctx.keep_ratio, m)
        heads = attention.shape[1]
        if keep >= m:
            return Reduction(state, scores=scores, selection_macs=float(heads * p * m))
        batch, device = state.tokens.shape[0], state.tokens.device
        kept = top_k_index(scores, keep)  # [B, K]
        dropped_mask = torch.ones(batch, m, dtype=torch.bool, device=device).scatter_(1, kept, False)
        weights = scores * dropped_mask  # [B, M], zero on kept tokens
        patches = state.patches.float()
        mean = ctx.options.get("fusion", "sum") == "mean"
        normalized = weights / weights.sum(1, keepdim=True).clamp_min(1e-12) if mean else None
        fused = ((normalized if mean else weights).unsqueeze(-1) * patches).sum(1, keepdim=True)  # [B, 1, C]
        kept_patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))

        def combination() -> torch.Tensor:
            """``[B, K + 1, M]``: the kept tokens one each, the fused token by its normalized weights (built only
            when the provenance is read: overlays, rollout, audits)."""
            share = normalized if normalized is not None else weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
            selection = torch.zeros(batch, keep, m, device=device).scatter_(2, kept.unsqueeze(-1), 1.0)
            return torch.cat([selection, share.unsqueeze(1)], dim=1)

        sizes = None
        if state.sizes is not None:
            old = state.sizes[:, p:].float()
            sizes = torch.cat([old.gather(1, kept), (old * dropped_mask).sum(1, keepdim=True)], dim=1)
        reduced = replace_patches(state, torch.cat([kept_patches, fused], dim=1), combination, sizes)
        macs = heads * p * m + (m - keep) * patches.shape[-1]
        return Reduction(reduced, scores=scores, selection_macs=float(macs))
