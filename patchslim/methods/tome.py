"""``tome``: token merging by bipartite soft matching (Bolya et al., ICLR 2023, "Token Merging: Your ViT
but Faster"), as the authors' implementation does it.

Inside every block, between attention and MLP (``point="mid"``), r tokens are merged away:

1. the similarity metric is the block's keys averaged over heads (``[B, T, d_head]``);
2. the T tokens, prefix tokens included, alternate into sets A (positions 0, 2, 4, ...) and B (1, 3, 5, ...).
   Prefix tokens are protected: one in A (the class token, at 0) never merges into anything, one in B (the
   distillation token, at 1) never receives a merge. So with a class token, patch 0 falls in B; without
   one (average pooling), in A;
3. each unprotected A token finds its most cosine-similar unprotected B token; the r A tokens with the most
   similar best matches merge into their matches (several may join one B token);
4. merged features are size-weighted averages, ``x = sum(s_i x_i) / sum(s_i)``, and sizes add up
   (``TokenState.sizes``); from then on the engine adds ``log(size)`` to the attention logits (proportional
   attention);
5. the tokens come out as: prefix tokens, the A tokens that stayed, then every B token in its order. The A
   tokens that stayed keep their order when the model has prefix tokens, and come in order of decreasing
   best similarity when it has none (as the reference does: it sorts them only to put the class token first).
   The order matters: it decides the next block's sets A and B.

Block i's attention therefore runs on N_i tokens and its MLP on N_i - r. The final tokens go through the
model's own pooling: a class token model reads the class token, an average-pooling model averages the final
tokens, each counted once.

Options:

- ``r``: tokens merged in each block it acts on (ToMe's constant schedule; DeiT-S with r = 8 / 13 / 16 runs at
  3.4 / 2.7 / 2.3 GMACs). A block merges at most half of its non-prefix tokens (``min(r, M // 2)``, as the
  reference caps it; the Trace's token counts show where that clipped). An r above the model's number of
  patches is refused (PlanError). Without ``r`` (a patchslim addition, so that a keep ratio means the same for
  every method) the stage's keep ratio sets the budget: it merges ``R = M0 - round(rho M0)`` tokens over its
  blocks (M0: tokens when the stage first acts), spread as evenly as integers allow (``floor((i+1) R / n) -
  floor(i R / n)`` at its i-th of n blocks, a later block making up for an earlier clip), so the final count
  is round(rho M0). ``keep_ratio`` is ignored when ``r`` is set.
- ``size_weighted_pool`` (default off, a patchslim addition): average pooling counts each final token by its
  size. Reason: a merged token standing for 20 patches then weighs like the 20 patches it replaced, so the
  pooled feature stays closer to the mean over all image positions that the unslimmed model pools; the
  reference counts each surviving token once. It changes nothing for class token models.

Where it is not the reference: ties in similarity are broken towards the lower position (a stable sort; the
reference's order under exact ties is unspecified), the metric is the keys attention used (after ``k_norm``,
an identity in ViT / DeiT; the reference's blocks also skip layer scale and q/k norm, so they do not model
architectures that have them), and prefix tokens beyond the class and distillation tokens (registers) are
protected the same way by their position. With ``r`` set, the logits agree with the reference's to 1e-5 on
DeiT-S, distilled DeiT-S and an average-pooling ViT-S (``benchmarks/tome_reference.py``).
r = 0 (or rho = 1) leaves the tokens untouched: the logits are exactly the unslimmed model's.

**Per window on a windowed model (Swin).** There the method acts before each block of its stages
(``window_point = "pre"``), in every window of the block's partition: the window's n tokens are matched by the
cosine similarity of the tokens themselves (the block's input: its keys do not exist yet, as in ToMe for Stable
Diffusion, Bolya and Hoffman, CVPR workshops 2023, which also merges before a block and unmerges after it), and r
of them merged, the same r in every window: ``n - round(rho n)`` (at most ``n // 2``, so rho below about 0.5 keeps
half of every window), or the ``r`` option shared among the block's W windows (``round(r / W)``). Tokens that the
block's shift mask keeps apart (pieces of a shifted window from opposite edges) are never matched together. The
adapter (:mod:`patchslim.adapters.swin`) runs the block's window attention and MLP on the merged tokens and puts
every token back in place after the block.

Reference: D. Bolya, C.-Y. Fu, X. Dai, P. Zhang, C. Feichtenhofer, J. Hoffman, "Token Merging: Your ViT
but Faster", ICLR 2023; implementation https://github.com/facebookresearch/ToMe (read and run beside this one
for comparison, not copied).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from patchslim.errors import PlanError
from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.tokens import SMALL_MERGE, TokenState, merge_rows, merge_tokens, merged_state, target_count


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


def bipartite_sets(count: int, num_prefix: int = 0,
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions, among ``count`` non-prefix tokens, of sets A and B.

    A token's set is the parity of its position in the whole sequence, prefix tokens included (A even):
    with one prefix token, non-prefix token 0 sits at position 1 and falls in B.

    Returns:
        (A positions ``[Ma]``, B positions ``[Mb]``), int64, ascending.
    """
    first_a = num_prefix % 2  # the parity of the whole-sequence position; a range, no mask to index with
    return (torch.arange(first_a, count, 2, device=device), torch.arange(1 - first_a, count, 2, device=device))


@dataclass(frozen=True)
class BipartiteMatch:
    """The outcome of bipartite soft matching over M non-prefix tokens, r of them merged away.

    Held as what the matching decides (per A token, its best B token and similarity; which A tokens merge and
    which stay); the position maps below are derived from it when a caller reads them (the merge itself works
    on the two sets directly, :func:`merge_into_slots`).

    Attributes:
        count: M, the non-prefix tokens matched.
        first_a: 0 or 1, the position of the first A token (A: ``first_a, first_a + 2, ...``; B: the others).
        best: ``[B, Ma]`` each A token's best cosine similarity to a B token.
        best_b: ``[B, Ma]`` int64, that B token (its index within B).
        merged_a: ``[B, r]`` int64, the A tokens merged away (indices within A).
        kept_a: ``[B, Ma - r]`` int64, the A tokens that stay, in the order they come out.
    """

    count: int
    first_a: int
    best: torch.Tensor
    best_b: torch.Tensor
    merged_a: torch.Tensor
    kept_a: torch.Tensor

    @cached_property
    def sets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A positions, B positions) among the M: :func:`bipartite_sets` (``first_a`` has the prefix's parity)."""
        return bipartite_sets(self.count, self.first_a, self.best.device)

    @cached_property
    def destination(self) -> torch.Tensor:
        """``[B, M]`` int64, the position (among the M) of the token each token ends up in: its match for the r
        merged A tokens, itself for every other."""
        a_pos, b_pos = self.sets
        batch = self.best.shape[0]
        destination = torch.arange(self.count, device=a_pos.device).repeat(batch, 1)
        return destination.scatter_(1, a_pos[self.merged_a], b_pos[self.best_b.gather(1, self.merged_a)])

    @cached_property
    def order(self) -> torch.Tensor:
        """``[B, M - r]`` int64, the positions of the tokens that stay, in the order they come out (A tokens that
        stayed, then B tokens)."""
        a_pos, b_pos = self.sets
        return torch.cat([a_pos[self.kept_a], b_pos.expand(self.best.shape[0], -1)], dim=1)

    @cached_property
    def merged_positions(self) -> torch.Tensor:
        """``[B, r]`` int64, the positions (among the M) of the A tokens merged away."""
        return 2 * self.merged_a + self.first_a

    @cached_property
    def into(self) -> torch.Tensor:
        """``[B, r]`` int64, the output position (among the M - r, in :attr:`order`) of the B token each merged A
        token joins: the A tokens that stayed come first, then every B token in its order."""
        return self.best_b.gather(1, self.merged_a) + self.kept_a.shape[1]

    @cached_property
    def slot(self) -> torch.Tensor:
        """``[B, M]`` int64, the output position (among the M - r, in :attr:`order`) of the token each token ends
        up in: what :func:`patchslim.tokens.merge_patches` takes instead of a ``[B, M - r, M]`` 0/1 matrix."""
        stay, batch = self.kept_a.shape[1], self.best.shape[0]
        slot_a = torch.empty_like(self.best_b)
        slot_a.scatter_(1, self.kept_a, torch.arange(stay, device=slot_a.device).expand(batch, -1))
        slot_a.scatter_(1, self.merged_a, self.best_b.gather(1, self.merged_a) + stay)
        slot = torch.empty(batch, self.count, dtype=torch.int64, device=slot_a.device)
        slot[:, self.first_a::2] = slot_a
        slot[:, 1 - self.first_a::2] = torch.arange(stay, self.count - self.merged_a.shape[1], device=slot.device)
        return slot

    @cached_property
    def distinct(self) -> torch.Tensor:
        """``[B, M]`` 1 - best cosine similarity for A tokens, 2 for B tokens (never merged away); higher means
        kept first."""
        distinct = torch.full((self.best.shape[0], self.count), 2.0, device=self.best.device)
        distinct[:, self.first_a::2] = 1.0 - self.best
        return distinct


def soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 0,
                  regions: torch.Tensor | None = None) -> BipartiteMatch:
    """ToMe's bipartite soft matching of the non-prefix tokens.

    Args:
        metric: ``[B, M, d]`` similarity features of the non-prefix tokens (ToMe: keys averaged over heads).
        r: tokens to merge away, ``0 <= r <= M // 2``.
        num_prefix: prefix tokens before them in the sequence; they set the parity of the split (see
            :func:`bipartite_sets`) and, when there are any, the A tokens that stay keep their order (else
            they come in order of decreasing best similarity, as in the reference).
        regions: ``[B, M]`` labels; an A token is matched only to B tokens of its label (when it has none, its
            best similarity is -inf and it merges last). None: any.

    Raises:
        ValueError: r outside ``[0, M // 2]``.
    """
    m = metric.shape[1]
    if not 0 <= r <= m // 2:
        raise ValueError(f"r must be in [0, {m // 2}] for {m} tokens, got {r}")
    first_a = num_prefix % 2  # the parity of the whole-sequence position (bipartite_sets)
    metric = metric.float()
    # normalized once (F.normalize's arithmetic: x / max(|x|, 1e-12)), the product then reads the two sets as strided
    # views of it: three operations fewer than normalizing each set, the same values, and faster at batch 1 and 32
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min_(1e-12)
    similarity = metric[:, first_a::2] @ metric[:, 1 - first_a::2].mT
    if regions is not None:
        similarity = similarity.masked_fill(regions[:, first_a::2, None] != regions[:, None, 1 - first_a::2],
                                            float("-inf"))
    best, best_b = similarity.max(dim=-1)  # [B, Ma]
    ranked = torch.sort(best, dim=-1, descending=True, stable=True).indices  # indices into A
    merged_a, kept_a = ranked[:, :r], ranked[:, r:]
    if num_prefix:
        kept_a = kept_a.sort(dim=-1).values
    return BipartiteMatch(m, first_a, best, best_b, merged_a, kept_a)


def bipartite_matching(metric: torch.Tensor, r: int, num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination, distinctiveness) of :func:`soft_matching`, for callers that keep their own order."""
    match = soft_matching(metric, r, num_prefix)
    return match.destination, match.distinct


def merge_weighted(tokens: torch.Tensor, sizes: torch.Tensor,
                   match: BipartiteMatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merges tokens into their destinations as size-weighted averages, in the match's output order.

    Args:
        tokens: ``[B, M, C]``.
        sizes: ``[B, M]`` how many original tokens each stands for.
        match: from :func:`soft_matching`.

    Returns:
        (merged ``[B, K, C]`` with ``x = sum(s_i x_i) / sum(s_i)`` over the tokens that went into each,
        sizes ``[B, K]`` (their sums), combination ``[B, K, M]`` 0/1: token i went into output k).
    """
    merged, new_sizes, slot = merge_into_slots(tokens, sizes, match)
    outputs = torch.arange(merged.shape[1], device=slot.device)
    combination = (outputs.view(1, -1, 1) == slot.unsqueeze(1)).to(tokens.dtype)
    return merged, new_sizes, combination


def merge_into_slots(tokens: torch.Tensor, sizes: torch.Tensor | None,
                     match: BipartiteMatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`merge_weighted` with the combination as an index: (merged ``[B, K, C]``, sizes ``[B, K]``, slot
    ``[B, M]``: the output position each token went into), for :func:`patchslim.tokens.merge_patches`.

    ``sizes`` None: every token stands for one (no weighting to do). The merge works on the two sets: the A
    tokens that stay are gathered, the merged ones added into their B tokens (``sum(s_i x_i)``, the B token's
    own term first), and the sums divided by the summed sizes.
    """
    channels = tokens.shape[-1]
    a, b = match.first_a, 1 - match.first_a
    weighted = tokens if sizes is None else tokens * sizes.unsqueeze(-1)
    if sizes is None:
        sizes = torch.ones(tokens.shape[:2], dtype=tokens.dtype, device=tokens.device)
    into = match.best_b.gather(1, match.merged_a)  # [B, r] the B token each merged A token joins
    wa, wb = weighted[:, a::2], weighted[:, b::2]
    kept = wa.gather(1, match.kept_a.unsqueeze(-1).expand(-1, -1, channels))
    summed = wb.scatter_add(1, into.unsqueeze(-1).expand(-1, -1, channels),
                            wa.gather(1, match.merged_a.unsqueeze(-1).expand(-1, -1, channels)))
    sa, sb = sizes[:, a::2], sizes[:, b::2]
    new_sizes = torch.cat([sa.gather(1, match.kept_a), sb.scatter_add(1, into, sa.gather(1, match.merged_a))], 1)
    merged = torch.cat([kept, summed], dim=1) / new_sizes.unsqueeze(-1)
    return merged, new_sizes, match.slot


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
    windowed = True
    window_point = "pre"
    options = (
        OptionSpec("r", "int", None,
                   "tokens merged in each block (at most half of those left; the model's patch count at "
                   "most); unset: derived from the keep ratio", minimum=0),
        OptionSpec("size_weighted_pool", "bool", False,
                   "average pooling counts each final token by the number of patches it stands for (the "
                   "published ToMe counts each once); no effect on class token models"),
    )

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        """Every block, as in ToMe."""
        return tuple(range(depth))

    def pools_by_size(self, options: dict) -> bool:
        return bool(options.get("size_weighted_pool"))

    def check(self, stage_options: dict, keep_ratio: float, model) -> None:
        r = stage_options.get("r")
        n = model.spec.num_patches
        if r is not None and r > n:
            raise PlanError(f"option 'r' of method 'tome' must be an integer in [0, {n}] for {model.name} "
                            f"({n} patches), got {r}; each block merges at most half of the tokens it has")

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        if ctx.windowed:
            return merge_windows(state, ctx)
        keys = ctx.keys
        p, m = state.num_prefix, state.count
        if keys.shape[2] != state.tokens.shape[1]:
            raise PlanError(f"method 'tome' at block {ctx.block} reads keys over {keys.shape[2]} tokens, but "
                            f"another stage changed the tokens to {state.tokens.shape[1]}; put it elsewhere")
        r = merges_this_block(ctx, m)
        if r == 0:
            return Reduction(state)
        # keys summed over heads instead of averaged: the cosine similarity does not see the scale (1 / H), so the
        # matching is the same and a pass over the keys is saved
        metric = head_sum(keys, p)  # [B, M, d_head]
        match = soft_matching(metric, r, p)
        tokens, sizes, slot = merge_rows(state.tokens, state.sizes, p, match.order, match.merged_positions,
                                         match.into)
        d_head, channels = metric.shape[-1], state.tokens.shape[-1]
        half_a, half_b = (m + 1) // 2, m // 2
        macs = half_a * half_b * d_head + m * d_head + m * channels
        return Reduction(merged_state(state, tokens, sizes, slot), scores=match.distinct, selection_macs=float(macs))


def head_sum(keys: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``[B, H, T, d]`` keys -> ``[B, M, d]`` their sum over heads, non-prefix tokens only: ToMe's metric (the mean
    over heads) up to the factor H, which cosine similarities ignore. Only the M rows that are matched are read.

    The heads are added one by one (``k_0 + k_1``, then ``+= k_h``), in the order a sum over the head axis takes
    them: the keys are a strided view into the attention's ``qkv`` tensor, and on it the reduction kernel ran at
    about half the speed of these in-place additions (DeiT-S, batch 32, one CPU thread). A few images at a time
    (``_HEAD_SUM_ELEMENTS`` sums), so that each image's running sum stays in the cache while the heads are added
    to it: the same additions in the same order, 0.8 of the time on DeiT-S at batch 32 (two threads). Small keys
    (one image, at most :data:`~patchslim.tokens.SMALL_MERGE` values) take that one reduction instead: at batch 1
    the H - 1 additions cost their dispatch, not their arithmetic, and the reduction adds the heads in the same
    order on these strided keys (the same bits; a test checks both ways on ViT-shaped keys).
    """
    if keys.numel() <= SMALL_MERGE:
        return keys[:, :, num_prefix:].sum(1)
    heads = keys.shape[1]
    if heads == 1:
        return keys[:, 0, num_prefix:].clone()
    if torch.is_grad_enabled() and keys.requires_grad:  # autograd cannot follow writes into ``out=``
        parts = keys[:, :, num_prefix:].unbind(1)
        total = parts[0] + parts[1]
        for head in parts[2:]:
            total.add_(head)
        return total
    batch, m, width = keys.shape[0], keys.shape[2] - num_prefix, keys.shape[3]
    total = torch.empty(batch, m, width, dtype=keys.dtype, device=keys.device)
    images = max(1, _HEAD_SUM_ELEMENTS // max(1, m * width))
    for lo in range(0, batch, images):
        part = keys[lo:lo + images, :, num_prefix:].unbind(1)  # H views [b, M, d]
        out = total[lo:lo + images]
        torch.add(part[0], part[1], out=out)
        for head in part[2:]:
            out.add_(head)
    return total


_HEAD_SUM_ELEMENTS = 1 << 17  # head_sum: running sums per group of images (512 KiB in float32)


def merge_windows(state: TokenState, ctx: StageContext) -> Reduction:
    """ToMe in every window of a windowed model's block (see the module docstring): ``[B * W, n, C]`` ->
    ``[B * W, n - r, C]``, the provenance saying which merged token each of the n stands for."""
    m = state.count
    windows = state.groups
    r = ctx.options.get("r")
    r = m - target_count(ctx.keep_ratio, m) if r is None else int(r / windows + 0.5)
    r = min(r, m // 2)
    if r == 0:
        return Reduction(state)
    patches = state.patches.float()
    match = soft_matching(patches, r, 0, regions=ctx.regions)
    merged, sizes, _ = merge_weighted(patches, torch.ones(patches.shape[:2], device=patches.device), match)
    slot = torch.empty_like(match.destination)
    slot.scatter_(1, match.order, torch.arange(m - r, device=slot.device).expand(slot.shape[0], -1))
    assign = slot.gather(1, match.destination)  # which merged token each of the n joined
    channels = patches.shape[-1]
    macs = windows * (((m + 1) // 2) * (m // 2) * channels + 2 * m * channels)
    return Reduction(merge_tokens(state, merged, assign, sizes), scores=match.distinct, selection_macs=float(macs))
