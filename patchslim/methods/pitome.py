"""``pitome``: protect informative tokens before merging, by an energy score (Tran et al., NeurIPS 2024,
"Accelerating Transformers with Spectrum-Preserving Token Merging").

Inside every block, between attention and MLP (``point="mid"``), k tokens are merged away, as in ToMe, but
ToMe's bipartite matching runs only on the tokens that sit in large clusters of similar tokens:

1. the similarity features are the block's keys averaged over heads (prefix tokens excluded), ``v_i``;
2. each token's *energy* is its mean similarity to every token, passed through an ELU at a margin m:

       E_i = (1/M) sum_j f_m(cos(v_i, v_j)),   f_m(x) = x - m if x >= m, alpha (exp(x - m) - 1) otherwise

   (an ELU shifted to the margin, as the authors' release computes it). A token in a big cluster (background, a
   uniform region) has many neighbours above the margin and a high energy; an isolated token (a small object,
   an edge) has a low one: below the margin its similarities count for at most -alpha each;
3. the 2k highest-energy tokens are the merge candidates, split alternately in energy order into sets A
   (1st, 3rd, ...) and B (2nd, 4th, ...); the M - 2k lower-energy tokens are protected (never merged);
4. every A token merges into its most cosine-similar B token: size-weighted averages, sizes add up
   (proportional attention and size-weighted pooling follow, as for ToMe), provenance follows each token's output slot.

Defaults from the paper: alpha = 1 and a margin that falls with depth, ``m_l = 0.9 - 0.9 l / L`` for block l of
L (strict in early blocks, where features are alike, lenient late); option ``margin`` sets the top value of that
schedule (``m_l = margin (1 - l / L)``). The paper defines the energy on a graph of the tokens' features; we use
ToMe's features, the keys averaged over heads.

How many: as ``tome`` (its schedule is reused): option ``r`` merges r tokens in each block (at most half of
those left); without ``r`` the keep ratio rho is the share left after the stage's last block, the removals
spread evenly over its blocks (every block by default). The paper's own runs set a per-layer keep ratio
instead (a geometric schedule that merges more in early blocks); at the same final rho it costs fewer GMACs.
rho = 1 (or r = 0) changes nothing.

Cost per image: the full similarity matrix ``M^2 d`` plus ``M d`` to normalize, ``M^2`` for the energies,
``k^2 d`` for the A-B similarities of the 2k candidates (recomputed from the unit features, so that the
``[M, M]`` matrix need not be kept; the same dot products) and ``M C`` for the merge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.methods.tofu import check_keys, check_r
from patchslim.methods.tome import head_sum, merges_this_block
from patchslim.tokens import TokenState, gather_rows, merge_rows, merged_state

DEFAULT_MARGIN = 0.9
DEFAULT_ALPHA = 1.0


def margin_at(block: int, depth: int, top: float = DEFAULT_MARGIN) -> float:
    """PiToMe's margin for block ``block`` of ``depth``: ``top * (1 - block / depth)``."""
    return top * (1.0 - block / max(depth, 1))


def energy_scores(metric: torch.Tensor, margin: float,
                  alpha: float = DEFAULT_ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """PiToMe's energy of every token.

    Args:
        metric: ``[B, M, d]`` similarity features.
        margin: m; similarities above it count linearly, below it through ``alpha (exp(x - m) - 1)``.
        alpha: the ELU's scale below the margin.

    Returns:
        (energy ``[B, M]``, higher = in a larger cluster of similar tokens; cosine similarities ``[B, M, M]``).
    """
    unit = F.normalize(metric.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    shifted = similarity - margin  # the one [B, M, M] temporary: the ELU runs in place on it
    return F.elu(shifted, alpha=alpha, inplace=True).mean(dim=-1), similarity


def energy_matching(similarity: torch.Tensor, energy: torch.Tensor, k: int) -> torch.Tensor:
    """Which token each token goes to: the 2k highest-energy tokens alternate into A and B in energy order, each
    A token merges into its most similar B token, everything else stays.

    Args:
        similarity: ``[B, M, M]`` cosine similarities.
        energy: ``[B, M]`` energy scores.
        k: merges, ``0 <= k <= M // 2``.

    Returns:
        ``[B, M]`` int64 destination of every token (itself unless merged).
    """
    batch, m = energy.shape
    device = energy.device
    destination = torch.arange(m, device=device).unsqueeze(0).repeat(batch, 1)
    if k == 0:
        return destination
    tie = torch.arange(m, device=device, dtype=torch.float64) * 1e-12  # ties: the lower position first
    order = torch.sort(energy.double() - tie, dim=-1, descending=True).indices[:, : 2 * k]
    a, b = order[:, 0::2], order[:, 1::2]  # [B, k] each
    rows = similarity.gather(1, a.unsqueeze(-1).expand(-1, -1, m))  # [B, k, M]
    best = rows.gather(2, b.unsqueeze(1).expand(-1, k, -1)).argmax(dim=-1)  # [B, k] within B
    return destination.scatter_(1, a, b.gather(1, best))


def token_energy(metric: torch.Tensor, margin: float, alpha: float = DEFAULT_ALPHA,
                 images: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`energy_scores` without the ``[B, M, M]`` similarities: (energy ``[B, M]``, unit features
    ``[B, M, d]``), for :meth:`PiToMe.reduce`, which needs only the A-B block of the similarities afterwards.

    The same energies to float rounding, computed ``images`` images at a time so that each ``[M, M]`` block stays
    in the cache between its product and its reductions, with fewer passes over it than an ELU's mean takes: for
    ``x = cos - m``, ``sum_j f(x_j) = sum_j x_j - sum_j min(x_j, 0) + alpha (sum_j exp(min(x_j, 0)) - M)``. The
    block is written once by the product (the margin subtracted in it), then summed, clamped, summed,
    exponentiated and summed in place, with no second ``[M, M]`` tensor; on DeiT-S's 196 tokens the energies
    took 0.4 of the time of :func:`energy_scores` (one CPU thread) and differed from them by at most 2e-7.
    """
    unit = F.normalize(metric.float(), dim=-1)
    batch, m = unit.shape[:2]
    offset = torch.full((1, 1, 1), -margin, device=unit.device)
    if torch.is_grad_enabled() and unit.requires_grad:  # autograd cannot follow writes into ``out=``
        parts = []
        for chunk in unit.split(images):
            shifted = torch.baddbmm(offset, chunk, chunk.mT)  # cos - m
            total = shifted.sum(dim=-1)
            below = shifted.clamp_max_(0.0)
            negative = below.sum(dim=-1)
            spread = below.exp_().sum(dim=-1)
            parts.append((total - negative + alpha * (spread - m)) / m)
        return torch.cat(parts), unit
    # one [images, M, M] block and the three sums, allocated once and written in place chunk by chunk
    block = torch.empty(min(images, batch), m, m, device=unit.device)
    total, negative, spread = torch.empty(3, batch, m, device=unit.device).unbind(0)
    for lo in range(0, batch, images):
        chunk = unit[lo:lo + images]
        hi = lo + chunk.shape[0]
        shifted = torch.baddbmm(offset, chunk, chunk.mT, out=block[: hi - lo])  # cos - m
        torch.sum(shifted, dim=-1, out=total[lo:hi])
        below = shifted.clamp_max_(0.0)
        torch.sum(below, dim=-1, out=negative[lo:hi])
        torch.sum(below.exp_(), dim=-1, out=spread[lo:hi])
    return (total - negative + alpha * (spread - m)) / m, unit


def energy_merges(unit: torch.Tensor, energy: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`energy_matching` in the form :func:`patchslim.tokens.merge_rows` takes: (keep ``[B, M - k]`` the
    positions that stay, ascending; merged ``[B, k]`` the A tokens merged away; into ``[B, k]`` the output slot,
    among ``keep``, of the B token each joins).

    The same matching as :func:`energy_matching` (the 2k highest energies, ties to the lower position, alternate
    into A and B; each A token merges into its most cosine-similar B token), with the k largest energies found by
    ``topk`` instead of a full sort and the ``[B, k, k]`` A-B similarities computed from the unit features
    (``unit``, ``[B, M, d]``) rather than read from an ``[B, M, M]`` matrix.
    """
    batch, m = energy.shape
    device = energy.device
    tie = torch.arange(m, device=device, dtype=torch.float64) * 1e-12  # ties: the lower position first
    order = torch.topk(energy.double() - tie, 2 * k, dim=-1).indices  # descending, as the sort's first 2k
    a, b = order[:, 0::2], order[:, 1::2]  # [B, k] each
    candidates = gather_rows(unit, order)  # [B, 2k, d], A and B alternating
    best = torch.bmm(candidates[:, 0::2], candidates[:, 1::2].mT).argmax(dim=-1)  # [B, k] within B
    destination = b.gather(1, best)  # [B, k] positions among the M
    stays = torch.ones(batch, m, dtype=torch.bool, device=device).scatter_(1, a, False)
    keep = stays.nonzero()[:, 1].view(batch, m - k)  # row-major: ascending positions per image
    # every B token stays: its output slot is where its position sits in the ascending ``keep``
    return keep, a, torch.searchsorted(keep, destination)


@register
class PiToMe(SlimMethod):
    name = "pitome"
    summary = "ToMe's merging of the high-energy tokens (big clusters) only; isolated tokens are protected (PiToMe)."
    explanation = (
        "Merging similar tokens is safe for a large uniform region, where many tokens say the same thing, and "
        "harmful for a small detail that happens to resemble one other token. PiToMe gives every token an "
        "energy: how similar it is, on average, to all the others (similarities below a margin count as a "
        "small penalty). Tokens in big clusters have high energy and are merged, pairwise, as in ToMe; the "
        "low-energy, isolated ones are protected. The margin is strict in early blocks and relaxes with depth."
    )
    equation = (r"E_i = \frac{1}{M}\sum_j f_m\big(\cos(\mathbf{v}_i,\mathbf{v}_j)\big),\ "
                r"f_m(x) = \begin{cases} x - m & x \ge m \\ \alpha(e^{x-m}-1) & x < m\end{cases};\ "
                r"\text{merge the top-}2k\ E_i\text{ by bipartite matching},\ m_l = 0.9\,(1 - l/L)")
    reference = "Tran et al., Accelerating Transformers with Spectrum-Preserving Token Merging (PiToMe), NeurIPS 2024"
    point = "mid"
    needs_keys = True
    merges = True
    input_dependent = True
    spreads_keep_ratio = True
    windowed = False
    window_reason = ("its energy compares every token with every other and it merges tokens, which would then belong "
                     "to no single window")
    options = (
        OptionSpec("r", "int", None,
                   "tokens merged in each block (at most half of those left); unset: derived from the keep ratio",
                   minimum=0),
        OptionSpec("margin", "float", DEFAULT_MARGIN,
                   "energy margin in block 0, falling linearly to 0 at the last block", minimum=-1.0, maximum=1.0),
        OptionSpec("alpha", "float", DEFAULT_ALPHA, "ELU scale for similarities below the margin",
                   minimum=0.0, maximum=10.0),
    )

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        """Every block, as ToMe."""
        return tuple(range(depth))

    def check(self, stage_options: dict, keep_ratio: float, model) -> None:
        check_r(self.name, stage_options, model)

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        keys = ctx.keys
        check_keys(keys, state, ctx, self.name)
        p, m = state.num_prefix, state.count
        k = merges_this_block(ctx, m)
        if k == 0:
            return Reduction(state)
        metric = head_sum(keys, p)  # [B, M, d_head]: the mean over heads up to a scale cosines ignore
        margin = margin_at(ctx.block, ctx.depth, float(ctx.options.get("margin", DEFAULT_MARGIN)))
        energy, unit = token_energy(metric, margin, float(ctx.options.get("alpha", DEFAULT_ALPHA)))
        keep, merged, into = energy_merges(unit, energy, k)
        tokens, sizes, slot = merge_rows(state.tokens, state.sizes, p, keep, merged, into, "mean")
        d_head, channels = metric.shape[-1], state.tokens.shape[-1]
        macs = m * m * d_head + m * d_head + m * m + k * k * d_head + m * channels
        # the provenance follows by each token's output slot (an index), not a [B, M - k, M] 0/1 product
        return Reduction(merged_state(state, tokens, sizes, slot), scores=-energy, selection_macs=float(macs))
