"""``tome``: token merging by bipartite soft matching (Bolya et al., ICLR 2023, "Token Merging: Your ViT
but Faster").

Inside every block, between attention and MLP (``point="mid"``), r tokens are merged away:

1. the block's keys averaged over heads are the similarity metric (``[M, d_head]`` per image, prefix
   tokens excluded, so CLS and the distillation token are never merged);
2. the M tokens alternate into sets A (positions 0, 2, 4, ...) and B (1, 3, 5, ...);
3. each A token finds its most cosine-similar B token; the r A tokens with the most similar best
   matches are merged into their matches (several may join one B token);
4. merged features are size-weighted averages, ``x = sum(s_i x_i) / sum(s_i)``, and sizes add up
   (``TokenState.sizes``); the engine then adds ``log(size)`` to the attention logits (proportional
   attention) and weighs average pooling by size.

Block i's attention therefore runs on N_i tokens and its MLP on N_i - r. Survivors keep their order.

How many: option ``r`` merges r tokens in each block it acts on (ToMe's constant schedule; DeiT-S with
r = 8 / 13 / 16 runs at 3.4 / 2.7 / 2.3 GMACs). As in ToMe, a block merges at most half of its non-prefix
tokens (``min(r, M // 2)``; the Trace's token counts show where that clipped). An r above the model's
number of patches is refused (PlanError). Without ``r`` the stage's keep ratio sets the budget: it merges
``R = M0 - round(rho M0)`` tokens over its blocks (M0: tokens when the stage first acts), spread as evenly
as integers allow (``floor((i+1) R / n) - floor(i R / n)`` at its i-th of n blocks, a later block making up
for an earlier clip), so the final count is round(rho M0). ``keep_ratio`` is ignored when ``r`` is set.
r = 0 (or rho = 1) leaves the tokens untouched: the logits are exactly the unslimmed model's.

Reference: D. Bolya, C.-Y. Fu, X. Dai, P. Zhang, C. Feichtenhofer, J. Hoffman, "Token Merging: Your ViT
but Faster", ICLR 2023.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchslim.errors import PlanError
from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.tokens import TokenState, replace_patches, target_count, top_k_index


def merges_this_block(ctx: StageContext, current: int) -> int:
    """How many tokens this action merges, clipped to half of the ``current`` non-prefix tokens."""
    limit = current // 2
    r = ctx.options.get("r")
    if r is not None:
        return min(int(r), limit)
    blocks = ctx.stage_blocks or (ctx.block,)
    start = ctx.stage_start_count or current
    n, i = len(blocks), blocks.index(ctx.block) if ctx.block in blocks else 0
    final = target_count(ctx.keep_ratio, start)
    budget = start - final
    planned_after = budget - (i + 1) * budget // n  # what the schedule leaves to later blocks
    return max(0, min(limit, current - final - planned_after))


def bipartite_matching(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching.

    Args:
        metric: ``[B, M, d]`` similarity features of the non-prefix tokens.
        r: tokens to merge away, ``0 <= r <= M // 2``.

    Returns:
        (destination ``[B, M]`` int64: the position each token ends up in, itself unless merged;
        distinctiveness ``[B, M]``: 1 - best cosine similarity for set A, 2 for set B, which is never
        merged away; higher means kept first).
    """
    batch, m, _ = metric.shape
    device = metric.device
    unit = F.normalize(metric.float(), dim=-1)
    a, b = unit[:, 0::2], unit[:, 1::2]
    similarity = a @ b.transpose(1, 2)  # [B, Ma, Mb]
    best, best_b = similarity.max(dim=-1)  # [B, Ma]
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    sources_a = order[:, :r]  # [B, r] positions within A
    destination = torch.arange(m, device=device).unsqueeze(0).repeat(batch, 1)
    destination.scatter_(1, 2 * sources_a, 2 * best_b.gather(1, sources_a) + 1)
    distinct = torch.full((batch, m), 2.0, device=device)
    distinct[:, 0::2] = 1.0 - best
    return destination, distinct


@register
class TokenMerging(SlimMethod):
    name = "tome"
    summary = "Merge the r most similar token pairs in every block (ToMe), keeping size-weighted averages."
    explanation = (
        "Instead of throwing tokens away, ToMe merges similar ones. In each block, after attention, the "
        "tokens are split alternately into two sets; every token of the first set finds its most similar "
        "partner in the second (cosine similarity of their attention keys), and the r most similar pairs are "
        "averaged into one token. A merged token remembers how many patches it stands for, and attention "
        "weighs it accordingly. Backgrounds and large uniform regions melt into few tokens while details "
        "stay separate. It needs no training and removes r tokens per block, so the savings grow with depth."
    )
    equation = (r"\mathbf{x}_{b} \leftarrow \frac{s_a \mathbf{x}_a + s_b \mathbf{x}_b}{s_a + s_b},\quad "
                r"(a, b) = \text{top-}r\ \max_{b \in B} \cos(\mathbf{k}_a, \mathbf{k}_b),\ a \in A;\quad "
                r"\mathrm{softmax}\Big(\frac{QK^\top}{\sqrt{d}} + \log \mathbf{s}\Big)")
    reference = "Bolya et al., Token Merging: Your ViT but Faster, ICLR 2023"
    point = "mid"
    needs_keys = True
    merges = True
    input_dependent = True
    options = (
        OptionSpec("r", "int", None,
                   "tokens merged in each block (at most half of those left; the model's patch count at "
                   "most); unset: derived from the keep ratio", minimum=0),
    )

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        """Every block, as in ToMe."""
        return tuple(range(depth))

    def check(self, stage_options: dict, keep_ratio: float, model) -> None:
        r = stage_options.get("r")
        n = model.spec.num_patches
        if r is not None and r > n:
            raise PlanError(f"option 'r' of method 'tome' must be an integer in [0, {n}] for {model.name} "
                            f"({n} patches), got {r}; each block merges at most half of the tokens it has")

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        keys = ctx.keys
        p, m = state.num_prefix, state.count
        if keys.shape[2] != state.tokens.shape[1]:
            raise PlanError(f"method 'tome' at block {ctx.block} reads keys over {keys.shape[2]} tokens, but "
                            f"another stage changed the tokens to {state.tokens.shape[1]}; put it elsewhere")
        r = merges_this_block(ctx, m)
        if r == 0:
            return Reduction(state)
        metric = keys.mean(dim=1)[:, p:]  # [B, M, d_head]
        destination, distinct = bipartite_matching(metric, r)
        batch, device = state.tokens.shape[0], state.tokens.device
        sizes = (state.sizes[:, p:].float() if state.sizes is not None
                 else torch.ones(batch, m, device=device))
        patches = state.patches.float()
        channels = patches.shape[-1]
        summed = torch.zeros_like(patches).scatter_add_(
            1, destination.unsqueeze(-1).expand(-1, -1, channels), patches * sizes.unsqueeze(-1))
        size_sum = torch.zeros_like(sizes).scatter_add_(1, destination, sizes)
        survivors = top_k_index((destination == torch.arange(m, device=device)).float(), m - r)  # [B, M-r]
        new_sizes = size_sum.gather(1, survivors)
        new_patches = summed.gather(1, survivors.unsqueeze(-1).expand(-1, -1, channels)) / new_sizes.unsqueeze(-1)
        # combination[b, j, i] = 1 when token i went into survivor j ([B, M - r, M], built directly: no
        # int64 [B, M, M] one-hot to transpose and gather from).
        combination = (survivors.unsqueeze(-1) == destination.unsqueeze(1)).float()
        merged = replace_patches(state, new_patches, combination, new_sizes)
        d_head = metric.shape[-1]
        half_a, half_b = (m + 1) // 2, m // 2
        macs = half_a * half_b * d_head + m * d_head + m * channels
        return Reduction(merged, scores=distinct, selection_macs=float(macs))
