"""Token sets and their provenance: pure tensor functions, no model and no framework.

A slimmed forward carries, beside the token tensor, *where every token came from*:

- after pruning, token ``j`` is original patch ``ids[b, j]`` (a gather index);
- after merging, token ``j`` stands for a set of original patches (a 0/1 row of a source matrix; while each
  token that merged was a plain patch or cell and joined exactly one new token, as in a Swin window, the cheap
  ``members`` / ``assign`` pair says the same without the ``[B, M, N]`` matrix);
- after a low-rank projection, token ``j`` is a weighted combination of patches (a row of loadings).

:class:`Provenance` keeps the cheap gather index while only pruning happened; a merge turns it into an
assignment (``[B, N]``: the token each original patch went into), which the next merges update by an index, and a
projection into a dense ``[B, M, N]`` matrix. ``dense()`` gives the matrix in every case, built when it is read.
A merge inside the forward (:func:`merged_state`) is only recorded (:meth:`Provenance.merge_later`): the assignment
is updated when something reads the provenance, so a forward whose provenance nobody reads pays nothing for it. A
combination whose matrix is worth building only when read (EViT's fused token) is recorded the same way
(:meth:`Provenance.combine_later`).
Overlays, rollout and audits read it; nothing re-derives it. Prefix tokens (CLS, distillation, registers) are
never part of the provenance and are never dropped: every function here leaves the first ``num_prefix`` tokens
alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Provenance:
    """Which original patches each non-prefix token stands for.

    Attributes:
        num_patches: N, the number of patches of the unslimmed image.
        ids: ``[B, M]`` int64 original patch ids, while tokens are plain (possibly pruned) patches.
        weights: ``[B, M, N]`` float, once tokens are projections (loadings) or arbitrary combinations; read it
            through :meth:`dense`, which also serves the other forms.
        cell: 1 while each id is one patch; ``c > 1`` in a hierarchical model after patch merging (Swin), where
            id ``j`` names the ``c x c`` square of patches at cell ``(j // (cols / c), j % (cols / c))`` of the
            coarser grid: a token after patch merging stands for the patches of the four tokens it merged.
        grid: the patch grid (rows, cols), needed to expand cells into patches when ``cell > 1``.
        assignment: ``[B, N]`` int64, once tokens are merges of patches (each patch in at most one token): the
            token (0..M-1) each original patch went into, -1 for a patch no token stands for. A merge updates it
            with one gather (:meth:`merge`); :meth:`dense` turns it into the 0/1 source matrix when read.
        assigned: M, the number of tokens, with ``assignment``.
        members: ``[B, S]`` int64 ids (at ``cell``) of the S plain tokens a merge joined, when each joined exactly
            one of the M new tokens (:meth:`merged`); ``ids`` and ``weights`` are then None.
        assign: ``[B, S]`` int64, which of the M tokens each of ``members`` joined.
        merged_count: M, with ``members``.
        pending: a merge or combination recorded but not yet applied (:meth:`merge_later`,
            :meth:`combine_later`): the provenance it applies to and how. Every other form is None then; any read
            applies it first (once: the result is kept).
    """

    num_patches: int
    ids: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    cell: int = 1
    grid: tuple[int, int] = (0, 0)
    assignment: torch.Tensor | None = None
    assigned: int = 0
    members: torch.Tensor | None = None
    assign: torch.Tensor | None = None
    merged_count: int = 0
    pending: PendingMerge | None = None

    @staticmethod
    def identity(batch: int, num_patches: int, device: torch.device | None = None) -> "Provenance":
        """Every token is its own patch, in raster order."""
        ids = torch.arange(num_patches, device=device).unsqueeze(0).expand(batch, -1)
        return Provenance(num_patches, ids=ids)

    @property
    def count(self) -> int:
        """M, the number of non-prefix tokens."""
        if self.pending is not None:
            return self.pending.count
        if self.ids is not None:
            return int(self.ids.shape[1])
        if self.weights is not None:
            return int(self.weights.shape[1])
        return self.merged_count if self.members is not None else self.assigned

    @property
    def batch(self) -> int:
        if self.pending is not None:
            return self.pending.batch
        return int(self._tensor.shape[0])

    @property
    def device(self) -> torch.device:
        if self.pending is not None:
            return self.pending.before.device
        return self._tensor.device

    def merge_later(self, slots: MergeSlots) -> "Provenance":
        """The provenance after a merge (the same as ``merge(slots.tensor(), slots.count)``), recorded now and
        applied when first read: a forward that merges in every block pays for the assignment only if someone
        reads it (overlays, audits), and then once per merge."""
        def apply(before: Provenance) -> Provenance:
            return before.merge(slots.tensor().to(before.device), slots.count)

        return Provenance(self.num_patches, grid=self.grid,
                          pending=PendingMerge(self, slots.count, slots.batch, apply))

    def combine_later(self, count: int, matrix: Callable[[], torch.Tensor]) -> "Provenance":
        """The provenance after :meth:`combine` with the ``[B, count, M]`` matrix that ``matrix()`` builds, recorded
        now and applied when first read (:meth:`merge_later` for a combination)."""
        return Provenance(self.num_patches, grid=self.grid, pending=PendingMerge(
            self, count, self.batch, lambda before: before.combine(matrix())))

    def resolved(self) -> "Provenance":
        """This provenance with any recorded merge or combination applied (itself when there is none)."""
        return self if self.pending is None else self.pending.result()

    @property
    def _tensor(self) -> torch.Tensor:
        for tensor in (self.ids, self.weights, self.assignment, self.members):
            if tensor is not None:
                return tensor
        raise ValueError("empty provenance")

    def merged(self, assign: torch.Tensor, count: int) -> "Provenance":
        """The provenance after a merge in which token i of the current (plain) ones joined new token
        ``assign[b, i]`` of ``count``: each new token stands for the patches of the tokens that joined it.

        Kept as the ``[B, M]`` pair (``members``, ``assign``) while the current tokens are plain patches or cells,
        else as dense weights.
        """
        if self.pending is not None:
            return self.resolved().merged(assign, count)
        if self.ids is None:
            combination = torch.zeros(self.batch, count, self.count, device=assign.device)
            combination.scatter_(1, assign.unsqueeze(1), 1.0)
            return self.combine(combination)
        return Provenance(self.num_patches, cell=self.cell, grid=self.grid, members=self.ids,
                          assign=assign.to(self.ids.device), merged_count=int(count))

    @property
    def is_plain(self) -> bool:
        """True while every token is one original patch (pruning only)."""
        return self.ids is not None and self.cell == 1

    def patch_ids(self) -> torch.Tensor:
        """``[B, M, c * c]`` the original patch ids each token stands for, while tokens are plain or cells."""
        if self.pending is not None:
            return self.resolved().patch_ids()
        if self.ids is None:
            raise ValueError("tokens are merges or projections; use dense()")
        return self._patches_of(self.ids)

    def _patches_of(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(-1) if self.cell == 1 else _cell_patches(ids, self.cell, self.grid)

    def dense(self) -> torch.Tensor:
        """``[B, M, N]`` float: row j says how much of each original patch token j stands for."""
        if self.pending is not None:
            return self.resolved().dense()
        if self.weights is not None:
            return self.weights
        if self.assignment is not None:
            # one spare row collects the patches no token stands for, then is cut off
            out = torch.zeros(self.batch, self.assigned + 1, self.num_patches, device=self.device)
            slot = self.assignment.masked_fill(self.assignment < 0, self.assigned)
            return out.scatter_(1, slot.unsqueeze(1), 1.0)[:, : self.assigned]
        if self.members is not None:
            patches = self._patches_of(self.members)  # [B, S, c * c]
            out = torch.zeros(self.batch, self.merged_count * self.num_patches, device=self.members.device)
            flat = self.assign.unsqueeze(-1) * self.num_patches + patches
            return out.scatter_(1, flat.flatten(1), 1.0).reshape(self.batch, self.merged_count, self.num_patches)
        out = torch.zeros(self.batch, self.count, self.num_patches, device=self.ids.device)
        return out.scatter_(2, self.patch_ids(), 1.0)

    def select(self, index: torch.Tensor) -> "Provenance":
        """Keeps the tokens at ``index`` (``[B, K]`` positions among the M tokens)."""
        if self.pending is not None:
            return self.resolved().select(index)
        if self.ids is not None:
            return Provenance(self.num_patches, ids=self.ids.gather(1, index), cell=self.cell, grid=self.grid)
        if self.assignment is not None:
            slot = torch.full((self.batch, self.assigned), -1, dtype=torch.int64, device=index.device)
            slot.scatter_(1, index, torch.arange(index.shape[1], device=index.device).expand_as(index))
            return self.merge(slot, index.shape[1])
        w = self.dense().gather(1, index.unsqueeze(-1).expand(-1, -1, self.num_patches))
        return Provenance(self.num_patches, weights=w)

    def combine(self, matrix: torch.Tensor) -> "Provenance":
        """New tokens as combinations of the current ones: ``matrix`` is ``[B, K, M]``."""
        if self.pending is not None:
            return self.resolved().combine(matrix)
        return Provenance(self.num_patches, weights=matrix.to(torch.float32) @ self.dense().to(matrix.device))

    def merge(self, slot: torch.Tensor, count: int) -> "Provenance":
        """New tokens as unions of the current ones: current token j goes into new token ``slot[b, j]``
        (``[B, M]`` in 0..count-1, or -1 for a token dropped), ``count`` new tokens. The same as
        :meth:`combine` with the 0/1 matrix of ``slot``, by an index instead of a product."""
        if self.pending is not None:
            return self.resolved().merge(slot, count)
        if self.weights is not None or self.members is not None or (self.ids is not None and self.cell != 1):
            combination = torch.zeros(self.batch, count + 1, slot.shape[1], device=slot.device)
            combination.scatter_(1, slot.masked_fill(slot < 0, count).unsqueeze(1), 1.0)
            return self.combine(combination[:, :count])
        slot = slot.to(self.device)
        if self.ids is not None:
            assignment = torch.full((self.batch, self.num_patches), -1, dtype=torch.int64, device=self.device)
            assignment.scatter_(1, self.ids, slot)
        else:
            assignment = slot.gather(1, self.assignment.clamp_min(0)).masked_fill(self.assignment < 0, -1)
        return Provenance(self.num_patches, assignment=assignment, assigned=count, grid=self.grid)

    def patch_mask(self) -> torch.Tensor:
        """``[B, N]`` bool: which original patches some token still stands for."""
        if self.pending is not None:
            return self.resolved().patch_mask()
        if self.ids is not None:
            mask = torch.zeros(self.batch, self.num_patches, dtype=torch.bool, device=self.ids.device)
            return mask.scatter_(1, self.patch_ids().flatten(1), True)
        if self.assignment is not None:
            return self.assignment >= 0
        if self.members is not None:
            mask = torch.zeros(self.batch, self.num_patches, dtype=torch.bool, device=self.members.device)
            return mask.scatter_(1, self._patches_of(self.members).flatten(1), True)
        return self.weights.abs().sum(1) > 0

    def regroup(self, batch: int) -> "Provenance":
        """The same tokens with ``batch`` rows (window groups ``[B * W, n]`` <-> images ``[B, W * n]``)."""
        if self.pending is not None:
            return self.resolved().regroup(batch)
        if self.ids is not None:
            return Provenance(self.num_patches, ids=self.ids.reshape(batch, -1), cell=self.cell, grid=self.grid)
        if self.assignment is not None:
            rows, m = self.batch, self.assigned
            if batch <= rows:  # g rows of m tokens -> one row of g * m: the w-th row's tokens come w * m later
                g = rows // batch
                a = self.assignment.reshape(batch, g, -1)
                shifted = a + (torch.arange(g, device=a.device) * m).view(1, g, 1)
                joined = torch.where(a >= 0, shifted, torch.full_like(a, -1)).amax(1)
                return Provenance(self.num_patches, assignment=joined, assigned=g * m, grid=self.grid)
            g = batch // rows  # one row of m tokens -> g rows of m / g
            k = m // g
            local = self.assignment.unsqueeze(1) - (torch.arange(g, device=self.device) * k).view(1, g, 1)
            split = torch.where((local >= 0) & (local < k), local, torch.full_like(local, -1))
            return Provenance(self.num_patches, assignment=split.reshape(batch, -1), assigned=k, grid=self.grid)
        if self.members is not None and batch < self.batch:  # windows -> images: number each window's tokens on
            per = self.batch // batch
            offset = (torch.arange(self.batch, device=self.assign.device) % per) * self.merged_count
            return Provenance(self.num_patches, cell=self.cell, grid=self.grid,
                              members=self.members.reshape(batch, -1),
                              assign=(self.assign + offset.unsqueeze(1)).reshape(batch, -1),
                              merged_count=self.merged_count * per)
        return Provenance(self.num_patches, weights=self.dense().reshape(batch, -1, self.num_patches))

    def repeat(self, times: int) -> "Provenance":
        """The same provenance ``times`` over along the batch (row ``s * B + b`` is row ``b``)."""
        if self.pending is not None:
            return self.resolved().repeat(times)

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))

        return Provenance(self.num_patches, rep(self.ids), rep(self.weights), self.cell, self.grid,
                          rep(self.assignment), self.assigned, rep(self.members), rep(self.assign),
                          self.merged_count)

    def to(self, device: torch.device | str) -> "Provenance":
        if self.pending is not None:
            return self.resolved().to(device)
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Provenance(self.num_patches, move(self.ids), move(self.weights), self.cell, self.grid,
                          move(self.assignment), self.assigned, move(self.members), move(self.assign),
                          self.merged_count)


@dataclass(frozen=True)
class MergeSlots:
    """Where each of M tokens went in a merge, as the merge decided it (what :func:`merge_rows` returns): the
    tokens at ``keep`` stay, in that order (output slot k is ``keep[:, k]``), and the tokens at ``merged`` join the
    slots ``into``. :meth:`tensor` spells it out as one output slot per token.

    Attributes:
        keep: ``[B, K]`` int64 positions (among the M) of the tokens that stay, in output order.
        merged: ``[B, r]`` int64 positions of the tokens merged away.
        into: ``[B, r]`` int64 the output slot (0..K-1) each merged token joined.
    """

    keep: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor

    @property
    def count(self) -> int:
        """K, the tokens after the merge."""
        return int(self.keep.shape[1])

    @property
    def batch(self) -> int:
        return int(self.keep.shape[0])

    def tensor(self) -> torch.Tensor:
        """``[B, M]`` int64, the output slot of every token (what :meth:`Provenance.merge` takes)."""
        batch, k = self.keep.shape
        slot = torch.empty(batch, k + self.merged.shape[1], dtype=torch.int64, device=self.keep.device)
        slot.scatter_(1, self.keep, torch.arange(k, device=self.keep.device).expand(batch, -1))
        return slot.scatter_(1, self.merged, self.into)


class PendingMerge:
    """A merge or combination recorded on a provenance and applied when first read (:meth:`Provenance.merge_later`,
    :meth:`Provenance.combine_later`).

    Applying it is ``apply`` (:meth:`Provenance.merge` with the slots spelled out, or :meth:`Provenance.combine`)
    on the earlier provenance, itself applied first if it is pending; the result is kept, so each recorded change is
    applied at most once however often the trace is read. Two threads reading at once may both apply it; they get
    equal results.

    Attributes:
        before: the provenance it applies to.
        count, batch: tokens and rows after it.
    """

    __slots__ = ("before", "count", "batch", "_apply", "_result")

    def __init__(self, before: Provenance, count: int, batch: int, apply: Callable[[Provenance], Provenance]):
        self.before = before
        self.count = int(count)
        self.batch = int(batch)
        self._apply = apply
        self._result: Provenance | None = None

    def result(self) -> Provenance:
        if self._result is None:
            self._result = self._apply(self.before.resolved())
        return self._result


def _cell_patches(ids: torch.Tensor, cell: int, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, M, cell * cell]`` patch ids of the ``cell x cell`` squares named by ``ids`` on the coarse grid."""
    rows, cols = grid
    coarse_cols = cols // cell
    top = (ids // coarse_cols) * cell
    left = (ids % coarse_cols) * cell
    dy = torch.arange(cell, device=ids.device).repeat_interleave(cell)
    dx = torch.arange(cell, device=ids.device).repeat(cell)
    return (top.unsqueeze(-1) + dy) * cols + left.unsqueeze(-1) + dx


@dataclass(frozen=True)
class TokenState:
    """The tokens flowing between blocks, with their sizes and provenance.

    Attributes:
        tokens: ``[B, P + M, C]``, the first ``num_prefix`` being prefix tokens.
        num_prefix: P.
        provenance: origins of the M non-prefix tokens.
        sizes: ``[B, P + M]`` how many original tokens each token represents (for proportional
            attention after merges), or None while every token is size 1.
        key_mask: ``[B, P + M]`` bool, False for tokens that a per-image keep set left out but that stay in
            the tensor so the batch stays rectangular: no token attends to them and pooling skips them.
            None while every token takes part.
        groups: how many rows of ``tokens`` belong to one image: 1 for a ViT, W when a windowed architecture
            hands methods its tokens window by window (``[B * W, n, C]``, image-major), so that "keep the top k"
            along the token axis is per window with the same method code.
        layout: what the model's adapter needs to put grouped tokens back in place (opaque to methods; carried
            through by every function here).
    """

    tokens: torch.Tensor
    num_prefix: int
    provenance: Provenance
    sizes: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    groups: int = 1
    layout: Any = None

    @property
    def prefix(self) -> torch.Tensor:
        return self.tokens[:, : self.num_prefix]

    @property
    def patches(self) -> torch.Tensor:
        """``[B, M, C]`` the non-prefix tokens."""
        return self.tokens[:, self.num_prefix :]

    @property
    def count(self) -> int:
        """M, the number of non-prefix tokens."""
        return self.tokens.shape[1] - self.num_prefix


def target_count(keep_ratio: float, current: int) -> int:
    """How many of ``current`` tokens a keep ratio asks for: nearest integer, at least 1."""
    return max(1, min(current, int(keep_ratio * current + 0.5)))


def keep_tokens(state: TokenState, index: torch.Tensor, sort: bool = True) -> TokenState:
    """Keeps the non-prefix tokens at ``index`` (``[B, K]`` positions among the M); prefix tokens stay.

    Args:
        state: tokens before.
        index: positions to keep, per image.
        sort: keep the kept tokens in their current order (so keep-all is exactly a no-op).
    """
    if sort:
        index = index.sort(dim=1).values
    if index.shape[1] == state.count and torch.equal(index, torch.arange(state.count, device=index.device).expand_as(index)):
        return state  # keeping everything in place is a no-op, bit for bit
    p = state.num_prefix
    rows = with_prefix(index, p)  # [B, P + K] positions in the whole sequence
    tokens = gather_rows(state.tokens, rows)  # prefix and kept tokens in one copy, no torch.cat
    sizes = mask = None
    if state.sizes is not None:
        sizes = state.sizes.gather(1, rows)
    if state.key_mask is not None:
        mask = state.key_mask.gather(1, rows)
    return TokenState(tokens, p, state.provenance.select(index.to(_prov_device(state.provenance))), sizes, mask,
                      state.groups, state.layout)


def with_prefix(index: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``[B, P + K]`` positions in the whole sequence: the P prefix tokens, then the non-prefix positions
    ``index`` (``[B, K]``, among the M) shifted past them."""
    if num_prefix == 0:
        return index
    prefix = torch.arange(num_prefix, device=index.device, dtype=index.dtype).expand(index.shape[0], -1)
    return torch.cat([prefix, index + num_prefix], dim=1)


def gather_rows(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b, k]]`` for every image: ``[B, T, C]``, ``[B, K]`` -> ``[B, K, C]``.

    One ``index_select`` of whole rows over the batch flattened to ``[B * T, C]``: the same values as
    ``tokens.gather(1, index[..., None].expand(-1, -1, C))``, which reads an index per channel and ran about
    2.5 times slower on DeiT-S's ``[32, 197, 384]`` tokens (one CPU thread).
    """
    batch, count, channels = tokens.shape
    flat = (index + count * torch.arange(batch, device=index.device).unsqueeze(1)).flatten()
    return tokens.reshape(batch * count, channels).index_select(0, flat).view(batch, index.shape[1], channels)


SMALL_MERGE = 1 << 18  # elements (B * T * C) up to which merge_rows takes the weighted-sum form (see there)


def merge_rows(tokens: torch.Tensor, sizes: torch.Tensor | None, num_prefix: int, keep: torch.Tensor,
               merged: torch.Tensor, into: torch.Tensor, mode: str = "mean",
               rewrite: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, MergeSlots]:
    """Merges tokens into others, touching only the rows a merge changes: what ToMe, ToFu and PiToMe do to their
    matches, as one pure function.

    Every non-prefix token either stays (one of ``keep``) or merges into the kept token it matched (``merged``
    joins output slot ``into``); several may join one. A kept token that received merges becomes its group's
    size-weighted average, ``sum_i s_i x_i / sum_i s_i``; with ``mode="mlerp"`` (ToFu) that average's direction
    scaled to the largest norm in the group. Every other token, prefix included, is copied bit for bit (on large
    inputs; see below for small ones).

    Why this shape: the output is one row gather (prefix and kept tokens, in output order), then the r receiving
    rows are rewritten from the r merged rows; the merged-into-B scatter over all ``[B, M, C]`` values, the
    weighting of every token by its size and the division of every output by its size (each a pass over the
    tokens) are gone. The average is computed as ``x_b (s_b / S) + sum_a x_a (s_a / S)``, which agrees with
    ``(s_b x_b + sum_a s_a x_a) / S`` to float rounding.

    Small inputs (one image: at most :data:`SMALL_MERGE` values, ``rewrite`` None) take the weighted-sum form
    instead, in a third of the tensor operations: sizes ride along as one more channel, so ``[s x, s]`` is gathered,
    the merged rows added into their slots, and every row divided by its summed size. At batch 1 a block's merge
    costs what its operations' dispatch costs, not what their passes over ``[T, C]`` cost, so fewer operations win
    there while the row rewrite wins on large batches; a token that merged with nothing is then ``(s x) / s``
    instead of ``x`` (equal to float rounding; bit for bit when s is 1). MLERP (``mode="mlerp"``) always rewrites.

    Args:
        tokens: ``[B, P + M, C]`` the whole sequence (prefix tokens first).
        sizes: ``[B, P + M]`` how many original tokens each stands for, or None (every token one).
        num_prefix: P.
        keep: ``[B, K]`` int64, positions (among the M) of the tokens that stay, in output order.
        merged: ``[B, r]`` int64, positions (among the M) of the tokens merged away.
        into: ``[B, r]`` int64, the output slot (0..K-1, among ``keep``) each merged token joins.
        mode: ``"mean"`` or ``"mlerp"``.
        rewrite: True: the row rewrite; False: the weighted-sum form (mean only); None: by size, as above.

    Returns:
        (tokens ``[B, P + K, C]`` in the input's dtype; sizes ``[B, P + K]`` float32; the :class:`MergeSlots`
        of the merge, for the provenance: :func:`merged_state`).
    """
    if mode not in ("mean", "mlerp"):
        raise ValueError(f"unknown merge mode {mode!r}")
    if rewrite is None:
        rewrite = mode == "mlerp" or tokens.numel() > SMALL_MERGE
    if not rewrite:
        if mode != "mean":
            raise ValueError("only the mean merge has a weighted-sum form (rewrite=False)")
        return _merge_summed(tokens, sizes, num_prefix, keep, merged, into)
    batch, total, channels = tokens.shape
    p, k = num_prefix, keep.shape[1]
    device = tokens.device
    rows = with_prefix(keep, p)
    image = torch.arange(batch, device=device).unsqueeze(1)
    flat_in = tokens.reshape(batch * total, channels)
    out = flat_in.index_select(0, (rows + image * total).flatten())  # prefix and kept rows, in output order
    work = out if out.dtype == torch.float32 else out.float()
    if sizes is None:
        new_sizes = torch.ones(batch, p + k, device=device)
        merged_sizes = torch.ones(merged.shape, device=device)
        new_sizes[:, p:].scatter_add_(1, into, merged_sizes)
        share = new_sizes[:, p:].gather(1, into).reciprocal_()  # 1 / S, every size being one
        own_share = source_share = share
    else:
        sizes = sizes.float()
        new_sizes = sizes.gather(1, rows)
        merged_sizes = sizes[:, p:].gather(1, merged)
        own = new_sizes[:, p:].gather(1, into)  # the receiving token's own size
        new_sizes[:, p:].scatter_add_(1, into, merged_sizes)
        group = new_sizes[:, p:].gather(1, into)  # S, the size of the group each merged token joins
        own_share, source_share = own / group, merged_sizes / group
    receiving = (into + (image * (p + k) + p)).flatten()  # rows of ``out`` (flattened), with repeats
    sources = flat_in.index_select(0, (merged + (image * total + p)).flatten()).float()
    flat = work.view(batch * (p + k), channels)
    original = flat.index_select(0, receiving)  # the receiving tokens as they were
    # repeated receivers write the same row each time, so index_copy_ is deterministic here
    flat.index_copy_(0, receiving, original * own_share.view(-1, 1))
    flat.index_add_(0, receiving, sources * source_share.view(-1, 1))
    if mode == "mlerp":
        largest = torch.zeros(batch * (p + k), device=device)
        largest.scatter_reduce_(0, receiving, sources.norm(dim=-1), "amax", include_self=False)
        largest = torch.maximum(largest.index_select(0, receiving), original.norm(dim=-1))
        average = flat.index_select(0, receiving)
        length = average.norm(dim=-1)
        scale = torch.where(length > 0, largest / length.clamp_min(1e-12), torch.ones_like(length))
        flat.index_copy_(0, receiving, average * scale.unsqueeze(-1))
    return (work if work is out else work.to(out.dtype)).view(batch, p + k, channels), new_sizes, \
        MergeSlots(keep, merged, into)


def _merge_summed(tokens: torch.Tensor, sizes: torch.Tensor | None, num_prefix: int, keep: torch.Tensor,
                  merged: torch.Tensor, into: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MergeSlots]:
    """:func:`merge_rows`' weighted-sum form: ``[s x, s]`` gathered in output order, the merged rows' ``[s x, s]``
    added into their slots, then ``x = (sum s x) / (sum s)`` for every row."""
    batch, total, channels = tokens.shape
    p, width = num_prefix, channels + 1
    work = tokens.float()
    if sizes is None:
        summed = torch.cat([work, work.new_ones(batch, total, 1)], dim=2)
    else:
        weight = sizes.float().unsqueeze(-1)
        summed = torch.cat([work * weight, weight], dim=2)  # [B, T, C + 1]: s x, then s
    # whole rows by index_select over the batch flattened (gather would read an index per value)
    rows, sources, slots = with_prefix(keep, p), merged + p, into + p
    if batch > 1:
        image = torch.arange(0, batch * total, total, device=keep.device).unsqueeze(1)
        rows, sources, slots = rows + image, sources + image, slots + (image // total) * (p + keep.shape[1])
    flat = summed.view(batch * total, width)
    out = flat.index_select(0, rows.flatten())
    out.index_add_(0, slots.flatten(), flat.index_select(0, sources.flatten()))
    out = out.view(batch, -1, width)
    merged_tokens = out[:, :, :channels] / out[:, :, channels:]
    new_sizes = out[:, :, channels].contiguous()  # its own [B, K]: a view would keep all of ``out`` alive
    return merged_tokens.to(tokens.dtype), new_sizes, MergeSlots(keep, merged, into)


def merged_state(state: TokenState, tokens: torch.Tensor, sizes: torch.Tensor,
                 slots: MergeSlots | torch.Tensor) -> TokenState:
    """The state after :func:`merge_rows`: its whole token sequence (prefix included) and sizes, the provenance
    following the merge: recorded for when it is read (:meth:`Provenance.merge_later`) from the
    :class:`MergeSlots` merge_rows gives, or applied now from a ``[B, M]`` slot tensor (:meth:`Provenance.merge`)."""
    if state.key_mask is not None:
        raise ValueError("tokens masked by a per-image keep set cannot be merged or projected")
    if isinstance(slots, MergeSlots):
        provenance = state.provenance.merge_later(slots)
    else:
        provenance = state.provenance.merge(slots, tokens.shape[1] - state.num_prefix)
    return TokenState(tokens, state.num_prefix, provenance, sizes, None, state.groups, state.layout)


def repeat_batch(state: TokenState, times: int) -> TokenState:
    """The same tokens ``times`` over along the batch: row ``s * B + b`` is image ``b`` (for sampling several
    keep sets per image in one forward)."""
    if times == 1:
        return state
    if state.groups != 1:
        raise ValueError("tokens grouped by window cannot be repeated along the batch")

    def rep(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))

    return TokenState(rep(state.tokens), state.num_prefix, state.provenance.repeat(times), rep(state.sizes),
                      rep(state.key_mask))


def top_k_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` highest ``scores`` (``[B, M]``) per row, in ascending position order.

    Ties are broken towards the lower position, so results do not depend on the sort's stability.
    """
    m = scores.shape[1]
    if k >= m:
        return torch.arange(m, device=scores.device).unsqueeze(0).expand(scores.shape[0], -1)
    # A tiny position-dependent offset makes ties deterministic (lower index wins).
    tie = torch.arange(m, device=scores.device, dtype=torch.float64) * 1e-12
    idx = torch.topk(scores.to(torch.float64) - tie, k, dim=1).indices
    return idx.sort(dim=1).values


def replace_patches(state: TokenState, patches: torch.Tensor,
                    combination: torch.Tensor | Callable[[], torch.Tensor], sizes: torch.Tensor | None) -> TokenState:
    """Replaces the non-prefix tokens by new ones that combine them.

    Args:
        state: tokens before.
        patches: ``[B, K, C]`` the new non-prefix tokens.
        combination: ``[B, K, M]`` how each new token combines the current ones (0/1 for merges,
            loadings for projections); used for the provenance. A function that builds it: the provenance records
            it and calls it when first read (:meth:`Provenance.combine_later`).
        sizes: ``[B, K]`` the new tokens' sizes, or None to keep sizes unset.
    """
    if callable(combination):
        return _replaced(state, patches, sizes,
                         lambda provenance: provenance.combine_later(patches.shape[1], combination))
    return _replaced(state, patches, sizes, lambda provenance: provenance.combine(combination))


def merge_patches(state: TokenState, patches: torch.Tensor, slot: torch.Tensor,
                  sizes: torch.Tensor | None) -> TokenState:
    """Replaces the non-prefix tokens by merges of them: :func:`replace_patches` for a 0/1 combination given as
    an index (current token j went into new token ``slot[b, j]``, -1: dropped), so the provenance follows by
    :meth:`Provenance.merge` instead of a ``[B, K, M] x [B, M, N]`` product."""
    return _replaced(state, patches, sizes, lambda provenance: provenance.merge(slot, patches.shape[1]))


def survivor_slots(destination: torch.Tensor, survivors: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` the output slot of each token for :func:`merge_patches`: the position, among ``survivors``
    (``[B, K]``, each its own destination), of the token's ``destination`` (``[B, M]``)."""
    where = torch.empty_like(destination)
    where.scatter_(1, survivors, torch.arange(survivors.shape[1], device=survivors.device).expand_as(survivors))
    return where.gather(1, destination)


def _replaced(state: TokenState, patches: torch.Tensor, sizes: torch.Tensor | None, provenance) -> TokenState:
    p = state.num_prefix
    tokens = torch.cat([state.prefix, patches.to(state.tokens.dtype)], dim=1)
    new_sizes = None
    if sizes is not None:
        prefix_sizes = (state.sizes[:, :p] if state.sizes is not None
                        else torch.ones(tokens.shape[0], p, device=tokens.device, dtype=sizes.dtype))
        new_sizes = torch.cat([prefix_sizes, sizes], dim=1)
    if state.key_mask is not None:
        raise ValueError("tokens masked by a per-image keep set cannot be merged or projected")
    return TokenState(tokens, p, provenance(state.provenance), new_sizes, None, state.groups, state.layout)


def merge_tokens(state: TokenState, patches: torch.Tensor, assign: torch.Tensor,
                 sizes: torch.Tensor | None) -> TokenState:
    """Replaces the non-prefix tokens by merges in which every current token joined exactly one new token.

    :func:`replace_patches` for a partition, without a ``[B, K, M]`` combination: the provenance stays the cheap
    (``members``, ``assign``) pair while the tokens were plain (:meth:`Provenance.merged`).

    Args:
        state: tokens before.
        patches: ``[B, K, C]`` the new non-prefix tokens.
        assign: ``[B, M]`` int64, which new token each current non-prefix token joined.
        sizes: ``[B, K]`` the new tokens' sizes, or None to keep sizes unset.
    """
    return _replaced(state, patches, sizes, lambda provenance: provenance.merged(assign, patches.shape[1]))


def _prov_device(provenance: Provenance) -> torch.device:
    return provenance.device
