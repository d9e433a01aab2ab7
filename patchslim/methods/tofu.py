"""``tofu``: Token Fusion, pruning in the early blocks and norm-preserving merging in the late ones (Kim et al.,
WACV 2024, "Token Fusion: Bridging the Gap between Token Pruning and Token Merging").

ToFu starts from ToMe's bipartite soft matching as published (inside every block, between attention and MLP, on
the block's keys averaged over heads, sets A and B by the parity of the whole sequence, survivors in the
reference's output order; :func:`patchslim.methods.tome.soft_matching`) and changes what happens to a match:

- **prune** (early blocks): the matched A token is dropped and its B partner goes on unchanged. The paper's
  argument: a block reacts to a linear interpolation of two inputs, ``f(a x_1 + (1 - a) x_2)``, far from linearly
  in the early layers, so an average of two tokens there is an input the next blocks never saw; keeping one of
  them is safer. Pruned tokens leave the provenance (plain patch ids, ``keep_tokens``); sizes are unchanged.
- **MLERP merge** (late blocks, where blocks respond almost linearly and merging keeps more information): a
  group G of tokens that end up in one survivor (its B token and the A tokens matched to it) becomes

      x_G = (xbar / ||xbar||) * max_{i in G} ||x_i||,     xbar = sum_{i in G} s_i x_i / sum_{i in G} s_i

  the size-weighted average's direction with the largest norm of the group (multi-token linear interpolation,
  MLERP, the paper's norm-preserving stand-in for SLERP; two tokens of equal norm keep that norm exactly, while
  the plain average shrinks it by the cosine of half their angle). Sizes add up and the engine's proportional
  attention (``log(size)``) and size-weighted pooling apply, as for ToMe; provenance follows each token's output
  slot (``merge_patches``), as for ToMe.

Where the switch happens: the paper chooses it from its layer-linearity analysis of the model; a layer index
for DeiT-S was not available to us offline. Our default, option ``merge_from`` unset, prunes in blocks
``0 .. depth // 2`` and merges with MLERP from block ``depth // 2 + 1`` (blocks 7-11 of 12, 4-5 of the bundled
model's 6), the split a public re-implementation (OpenToMe) uses; ``merge_from=0`` merges everywhere,
``merge_from=depth`` prunes everywhere. ``merge=average`` replaces MLERP by ToMe's size-weighted average (for
comparing the two merges).

How many: exactly as ``tome`` (its schedule is reused, :func:`patchslim.methods.tome.merges_this_block`):
option ``r`` removes r tokens in each block it acts on (at most half of those left); without ``r`` the keep
ratio rho is the share left after the stage's last block, ``R = M0 - round(rho M0)`` removals spread as evenly
as integers allow over the stage's blocks (every block by default). rho = 1 (or r = 0) changes nothing: the
logits are the unslimmed model's.

Cost: the matching is ToMe's (``ceil(M/2) floor(M/2) d`` for the similarities plus ``M d`` to normalize); a
merge block adds ``M C`` for the weighted sums and ``2 M C`` for the norms of the sources and the averages.
"""

from __future__ import annotations

import torch

from patchslim.errors import PlanError
from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.methods.tome import head_sum, merges_this_block, soft_matching
from patchslim.tokens import TokenState, keep_tokens, merge_rows, merged_state


def merge_groups(patches: torch.Tensor, sizes: torch.Tensor, destination: torch.Tensor, survivors: torch.Tensor,
                 mode: str = "mlerp") -> tuple[torch.Tensor, torch.Tensor]:
    """Merges every group of tokens sharing a destination into one token.

    Args:
        patches: ``[B, M, C]`` the tokens.
        sizes: ``[B, M]`` how many original tokens each stands for.
        destination: ``[B, M]`` int64, the position each token goes to (itself for survivors).
        survivors: ``[B, K]`` the positions that survive, each its own destination, in the order the merged tokens
            come out.
        mode: ``"mean"``: size-weighted average (ToMe); ``"mlerp"``: that average's direction scaled to the
            largest norm in the group (ToFu). A group of one token is returned unchanged either way.

    Returns:
        (``[B, K, C]`` merged tokens, ``[B, K]`` their sizes).
    """
    patches = patches.float()
    channels = patches.shape[-1]
    spread = destination.unsqueeze(-1).expand(-1, -1, channels)
    summed = torch.zeros_like(patches).scatter_add_(1, spread, patches * sizes.unsqueeze(-1))
    size_sum = torch.zeros_like(sizes).scatter_add_(1, destination, sizes)
    members = torch.zeros_like(sizes).scatter_add_(1, destination, torch.ones_like(sizes))
    gather = survivors.unsqueeze(-1).expand(-1, -1, channels)
    new_sizes = size_sum.gather(1, survivors)
    merged = summed.gather(1, gather) / new_sizes.unsqueeze(-1)
    if mode == "mlerp":
        norms = patches.norm(dim=-1)
        largest = torch.zeros_like(norms).scatter_reduce_(1, destination, norms, reduce="amax", include_self=False)
        length = merged.norm(dim=-1, keepdim=True)
        rescaled = merged * (largest.gather(1, survivors).unsqueeze(-1) / length.clamp_min(1e-12))
        merged = torch.where((length > 0) & (members.gather(1, survivors) > 1).unsqueeze(-1), rescaled, merged)
    single = (members.gather(1, survivors) == 1).unsqueeze(-1)
    merged = torch.where(single, patches.gather(1, gather), merged)  # lone tokens bit for bit
    return merged, new_sizes


def check_r(method: str, stage_options: dict, model) -> None:
    """Refuses an option ``r`` above the model's number of patches (as ``tome`` does)."""
    r = stage_options.get("r")
    n = model.spec.num_patches
    if r is not None and r > n:
        raise PlanError(f"option 'r' of method {method!r} must be an integer in [0, {n}] for {model.name} "
                        f"({n} patches), got {r}; each block removes at most half of the tokens it has")


def check_keys(keys: torch.Tensor, state: TokenState, ctx: StageContext, method: str) -> None:
    """Raises PlanError when another stage changed the tokens after this block's keys were computed."""
    if keys.shape[2] != state.tokens.shape[1]:
        raise PlanError(f"method {method!r} at block {ctx.block} reads keys over {keys.shape[2]} tokens, but "
                        f"another stage changed the tokens to {state.tokens.shape[1]}; put it elsewhere")


@register
class TokenFusion(SlimMethod):
    name = "tofu"
    summary = "ToMe's matching, but prune the matched token in early blocks and merge with MLERP in late ones (ToFu)."
    explanation = (
        "ToFu asks when averaging two tokens is safe. Early blocks react to a blend of two inputs very "
        "differently from the blend of their outputs, so there ToFu keeps one token of each similar pair and "
        "drops the other (pruning). Later blocks behave almost linearly, so there it merges the pair, and "
        "instead of a plain average, whose length shrinks when the two tokens point apart, it keeps the "
        "average's direction with the longer token's length (MLERP), so merged tokens look like the tokens the "
        "model was trained on."
    )
    equation = (r"\mathbf{x}_G = \frac{\bar{\mathbf{x}}}{\lVert\bar{\mathbf{x}}\rVert}\,\max_{i\in G}"
                r"\lVert\mathbf{x}_i\rVert,\quad \bar{\mathbf{x}} = \frac{\sum_{i\in G} s_i\mathbf{x}_i}"
                r"{\sum_{i\in G} s_i}\ \ (\text{late blocks});\qquad \mathbf{x}_G = \mathbf{x}_b\ \ "
                r"(\text{early blocks: prune } a)")
    reference = "Kim et al., Token Fusion: Bridging the Gap between Token Pruning and Token Merging, WACV 2024"
    point = "mid"
    needs_keys = True
    merges = True
    input_dependent = True
    spreads_keep_ratio = True
    windowed = False
    window_reason = ("its matching pairs tokens across the whole sequence, and the tokens it merges in late blocks "
                     "would belong to no single window")
    options = (
        OptionSpec("r", "int", None,
                   "tokens removed in each block (at most half of those left); unset: derived from the keep ratio",
                   minimum=0),
        OptionSpec("merge_from", "int", None,
                   "first block that merges (earlier blocks prune); unset: depth // 2 + 1", minimum=0),
        OptionSpec("merge", "str", "mlerp", "how a late block merges: MLERP (norm-preserving) or ToMe's average",
                   choices=("mlerp", "average")),
    )

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        """Every block, as ToMe."""
        return tuple(range(depth))

    def check(self, stage_options: dict, keep_ratio: float, model) -> None:
        check_r(self.name, stage_options, model)

    @staticmethod
    def first_merge_block(options: dict, depth: int) -> int:
        merge_from = options.get("merge_from")
        return depth // 2 + 1 if merge_from is None else int(merge_from)

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        keys = ctx.keys
        check_keys(keys, state, ctx, self.name)
        p, m = state.num_prefix, state.count
        r = merges_this_block(ctx, m)
        if r == 0:
            return Reduction(state)
        metric = head_sum(keys, p)  # [B, M, d_head]: ToMe's metric up to the scale cosines ignore
        match = soft_matching(metric, r, p)  # ToMe as published: sets by parity, survivors in its output order
        d_head, channels = metric.shape[-1], state.tokens.shape[-1]
        macs = ((m + 1) // 2) * (m // 2) * d_head + m * d_head
        if ctx.block < self.first_merge_block(ctx.options, ctx.depth):
            return Reduction(keep_tokens(state, match.order, sort=False), scores=match.distinct,
                             selection_macs=float(macs))
        mode = "mlerp" if ctx.options.get("merge", "mlerp") == "mlerp" else "mean"
        # only the rows a merge changes are rewritten (merge_rows): the same tokens as merge_groups over all M
        tokens, sizes, slot = merge_rows(state.tokens, state.sizes, p, match.order, match.merged_positions,
                                         match.into, mode)
        macs += m * channels * (3 if mode == "mlerp" else 1)
        return Reduction(merged_state(state, tokens, sizes, slot), scores=match.distinct, selection_macs=float(macs))
