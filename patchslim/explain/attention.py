"""Attention maps and attention rollout that see through slimming, placed on the original patch grid.

Attention maps: the attention a prefix token (CLS by default) pays to every non-prefix token of a block,
per head or fused over heads, mapped back to the original patches through the Trace's provenance:
a dropped patch is NaN, the patches of a merged token share its value, a low-rank token's value is
spread by its loadings.

Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020): with
``A_b`` the head-fused attention of block ``b``, ``Â_b = (A_b + I) / 2`` renormalized over rows (the
residual connection), and the rollout is the product ``Â_{L-1} ... Â_0``. When slimming changes the token
set between blocks, the product needs a *transition* ``C_b`` from the tokens leaving block ``b`` to the
tokens entering block ``b + 1``: ``R_{b+1} = C_b Â_b R_b``, starting from ``R_0 = C_in`` (the input
pruning, applied to the identity over the original tokens). ``C`` comes from the provenances alone:
token ``i`` after the change stands for the patches ``P_to[i]``, tokens before stood for ``P_from[j]``, and
``C[i, j]`` is the share of token ``i``'s (absolutely weighted) patches that came through token ``j``:

- pruning: ``C`` selects (one 1 per row), as in the gather;
- merging (ToMe's size-weighted means): ``C[i, j] = size_j / size_i``;
- EViT's fused token (provenance weighted by CLS attention): those weights, renormalized;
- low-rank projections: the absolute loadings, renormalized (a heuristic: the flow of a signed linear
  combination is not a probability).

Every row of ``C`` sums to 1, so rows of the rollout stay probability distributions over the original
tokens and a patch that never entered any block gets exactly 0 (drawn as NaN: the model never saw it).

Windowed models (Swin) have no class token, so neither the CLS row nor a rollout from it exists
(:func:`class_token_refusal` says so, and :func:`cls_attention` / :func:`rollout` refuse with that reason);
:func:`window_attention` gives the attention each token *received* within its window in one block, upsampled
from the block's token grid to the patches.

All functions take arrays and a Trace and return NumPy arrays; nothing here touches the model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from patchslim.errors import ExplanationError
from patchslim.tokens import Provenance

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attention: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """``[..., H, T, T]`` -> ``[..., T, T]`` by the mean, max or min over heads."""
    if how == "mean":
        return attention.mean(-3)
    if how == "max":
        return attention.amax(-3)
    if how == "min":
        return attention.amin(-3)
    raise ValueError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, got {how!r}")


def tokens_to_grid(values: torch.Tensor | np.ndarray, provenance: Provenance, grid_size: tuple[int, int],
                   index: int = 0) -> np.ndarray:
    """Per-token values placed on the original patch grid.

    A patch takes the values of the tokens that stand for it, weighted by ``|provenance|``: a kept patch
    its token's value, every patch of a merged group the group's value (shared, not divided), a patch
    under low-rank tokens the loading-weighted mean. Patches no token stands for are NaN.

    Args:
        values: ``[..., M]`` one value per non-prefix token (leading dims, e.g. heads, are kept).
        provenance: origins of those M tokens.
        grid_size: ``(rows, cols)`` of the original patches.
        index: which image of the provenance's batch.

    Returns:
        ``[..., rows, cols]`` float64.
    """
    v = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    v = v.detach().double().cpu()
    rows, cols = grid_size
    if v.shape[-1] != provenance.count:
        raise ValueError(f"{v.shape[-1]} values for {provenance.count} tokens")
    lead = v.shape[:-1]
    if provenance.is_plain:
        ids = provenance.ids[index].detach().cpu()
        out = torch.full((*lead, provenance.num_patches), float("nan"), dtype=torch.float64)
        out[..., ids] = v
    else:
        weights = provenance.dense()[index].detach().double().cpu().abs()  # [M, N]
        mass = weights.sum(0)  # [N]
        out = (v @ weights) / mass
        out[..., mass <= 1e-12] = float("nan")
    return out.reshape(*lead, rows, cols).numpy()


def cls_attention(trace, block: int, index: int = 0, heads: str | int = "mean", prefix_row: int = 0) -> np.ndarray:
    """The attention a prefix token pays to the patches in ``block``, on the original patch grid.

    Needs the block's attention in the Trace: run with ``SlimPlan(..., attention_blocks=(block,))`` or
    ``"all"`` (``plan.with_attention("all")``).

    Args:
        trace: a :class:`~patchslim.trace.Trace`.
        block: block index (its attention ran on the tokens entering it).
        index: which image of the batch.
        heads: ``"mean"`` / ``"max"`` / ``"min"`` over heads (``[rows, cols]``), ``"all"``
            (``[H, rows, cols]``), or one head's index.
        prefix_row: the query token: 0 is CLS; for the distilled DeiT, 1 is the distillation token.

    Returns:
        attention probabilities, NaN at patches no token stood for entering ``block``.

    Raises:
        KeyError: the Trace did not keep this block's attention.
    """
    _require_class_token(trace.spec)
    probs = _block_attention(trace, block)[index]  # [H, T, T]
    p = trace.spec.num_prefix_tokens
    if not 0 <= prefix_row < p:
        raise ValueError(f"prefix_row must be in 0..{p - 1} (the model has {p} prefix tokens), got {prefix_row}")
    row = probs[:, prefix_row, p:]  # [H, M]
    if isinstance(heads, str) and heads != "all":
        row = fuse_heads(row.unsqueeze(-2), heads).squeeze(-2)
    elif not isinstance(heads, str):
        row = row[int(heads)]
    return tokens_to_grid(row, trace.blocks[block].provenance, trace.spec.grid_size, index)


def class_token_refusal(spec) -> str | None:
    """Why a model cannot give the maps that read a class token's attention row (CLS attention, rollout from
    CLS), in one sentence, or None when it can."""
    if spec.num_prefix_tokens > 0:
        return None
    if getattr(spec, "hierarchical", False):
        return (f"{spec.name} ({spec.kind}) has no class token whose attention row CLS attention and rollout read, "
                "and its tokens attend only within their windows: the map it offers is the attention each token "
                "receives in its window")
    return f"{spec.name} has no class token whose attention row CLS attention and rollout read"


def _require_class_token(spec) -> None:
    reason = class_token_refusal(spec)
    if reason:
        raise ExplanationError(reason)


def window_attention(trace, block: int, index: int = 0) -> np.ndarray:
    """The attention each token received within its window in ``block`` of a windowed model (Swin), on the
    original patch grid.

    The Trace holds, for such a block, a one-row map ``[B, 1, 1, L]`` on the block's own token grid: the mean over
    heads and over the window's queries of the attention each token received (a window's values sum to 1). A
    token after patch merging stands for a ``cell x cell`` square of patches, which all take its value; patches
    whose token sat the block out (a method kept other tokens of its window) are NaN. Needs the block's attention:
    run with ``attention_blocks=(block,)`` or ``"all"``.

    Args:
        trace: a :class:`~patchslim.trace.Trace` of a windowed model.
        block: block index (negative counts from the end).
        index: which image of the batch.

    Returns:
        ``[rows, cols]`` float64 on the patch grid.

    Raises:
        ExplanationError: the model is not windowed (use :func:`cls_attention`).
        KeyError: the Trace did not keep this block's attention.
    """
    spec = trace.spec
    if not getattr(spec, "hierarchical", False):
        raise ExplanationError(f"{spec.name} does not attend in windows: window_attention is for windowed models "
                               "(Swin); use cls_attention")
    if block < 0:
        block += spec.depth
    received = _block_attention(trace, block)[index].detach().double().cpu().reshape(-1).numpy()
    shape = spec.blocks[block]
    rows, cols = shape.grid
    if received.size != rows * cols:
        raise ValueError(f"block {block}'s map has {received.size} values for its {rows}x{cols} token grid")
    cell = shape.cell
    values = np.repeat(np.repeat(received.reshape(rows, cols), cell, axis=0), cell, axis=1)
    values = values[: spec.grid_size[0], : spec.grid_size[1]].copy()
    ran = trace.blocks[block].provenance.patch_mask()[index].cpu().numpy().reshape(spec.grid_size)
    values[~ran] = np.nan
    return values


def _block_attention(trace, block: int) -> torch.Tensor:
    if block < 0:
        block += trace.spec.depth
    if block not in trace.attention:
        kept = sorted(trace.attention)
        raise KeyError(
            f"the trace has no attention for block {block} (kept: {kept or 'none'}); run with "
            f"plan.with_attention('all') or attention_blocks=({block},)"
        )
    return trace.attention[block]


# --------------------------------------------------------------------------- rollout

def residual_attention(attention: torch.Tensor) -> torch.Tensor:
    """``(A + I) / 2`` with rows renormalized: the residual connection's share of the flow.

    Args:
        attention: ``[..., T, T]`` head-fused attention.
    """
    eye = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    mixed = (attention + eye) / 2
    return mixed / mixed.sum(-1, keepdim=True)


def rollout_product(attentions: Sequence[torch.Tensor], transitions: Sequence[torch.Tensor | None] | None = None,
                    start: torch.Tensor | None = None) -> torch.Tensor:
    """The rollout ``C_{L-1} Â_{L-1} ... C_0 Â_0 C_in`` of one image, as a pure tensor function.

    Args:
        attentions: per block, ``[T_b, T_b]`` head-fused attention (or ``[H, T_b, T_b]``, fused by the mean).
        transitions: per block, ``[T_{b+1}, T_b]`` from the tokens leaving block b to those entering the
            next (None or omitted: the same tokens).
        start: ``[T_0, T]`` from the original T tokens to those entering block 0 (None: identity).

    Returns:
        ``[T_last, T]``: row i says how much of output token i flows from each original token.
    """
    transitions = list(transitions) if transitions is not None else [None] * len(attentions)
    if len(transitions) != len(attentions):
        raise ValueError(f"{len(transitions)} transitions for {len(attentions)} attention matrices")
    first = attentions[0]
    size = first.shape[-1]
    result = start.double() if start is not None else torch.eye(size, dtype=torch.float64, device=first.device)
    for attention, transition in zip(attentions, transitions):
        a = attention.double()
        if a.dim() == 3:
            a = a.mean(0)
        if a.shape[-1] != result.shape[0]:
            raise ValueError(f"attention over {a.shape[-1]} tokens after {result.shape[0]} tokens")
        result = residual_attention(a) @ result
        if transition is not None:
            result = transition.double().to(result.device) @ result
    return result


def token_transition(before: Provenance, after: Provenance, num_prefix: int, index: int = 0) -> torch.Tensor:
    """``[P + M_after, P + M_before]``: how the tokens ``after`` draw on the tokens ``before``.

    Prefix tokens map to themselves. Rows sum to 1 (see the module docstring for the rule).
    """
    p = num_prefix
    m_before, m_after = before.count, after.count
    out = torch.zeros(p + m_after, p + m_before, dtype=torch.float64)
    out[:p, :p] = torch.eye(p, dtype=torch.float64)
    if before.is_plain and after.is_plain:
        ids_before = before.ids[index].detach().cpu()
        ids_after = after.ids[index].detach().cpu()
        position = torch.full((before.num_patches,), -1, dtype=torch.long)
        position[ids_before] = torch.arange(m_before)
        where = position[ids_after]
        if (where < 0).any():
            raise ValueError("a token after the change stands for a patch no token stood for before")
        out[p + torch.arange(m_after), p + where] = 1.0
        return out
    w_before = before.dense()[index].detach().double().cpu()  # [M_before, N]
    w_after = after.dense()[index].detach().double().cpu()  # [M_after, N]
    if torch.equal(w_before, w_after):
        out[p:, p:] = torch.eye(m_before, dtype=torch.float64)
        return out
    support = w_before.abs() > 1e-12
    if int(support.sum(0).max()) <= 1:  # disjoint rows: exact coefficients without a pseudo-inverse
        norms = (w_before * w_before).sum(1).clamp_min(1e-24)
        coef = (w_after @ w_before.T) / norms
    else:
        coef = w_after @ torch.linalg.pinv(w_before)
    share = coef.abs() * w_before.abs().sum(1)  # coefficient times the mass each source stands for
    total = share.sum(1, keepdim=True)
    out[p:, p:] = torch.where(total > 1e-12, share / total.clamp_min(1e-24), torch.zeros_like(share))
    return out


def rollout_matrix(trace, index: int = 0, head_fusion: str = "mean", start_block: int = 0,
                   end_block: int | None = None) -> torch.Tensor:
    """The rollout of one image of a Trace through blocks ``start_block .. end_block`` (inclusive).

    Returns:
        ``[P + M, P + N]`` over the tokens leaving ``end_block`` (after its mid-block actions) and the
        original tokens.

    Raises:
        KeyError: the Trace lacks the attention of a block in the range (run with
            ``plan.with_attention("all")``).
    """
    if getattr(trace.spec, "hierarchical", False):
        raise ExplanationError(f"{trace.spec.name} is a windowed model: rollout is not defined through its windows "
                               "and patch merging here")
    depth = trace.spec.depth
    end = depth - 1 if end_block is None else (end_block + depth if end_block < 0 else end_block)
    if not 0 <= start_block <= end < depth:
        raise ValueError(f"need 0 <= start_block <= end_block < {depth}, got {start_block}, {end}")
    p, n = trace.spec.num_prefix_tokens, trace.spec.num_patches
    # From the original tokens to those entering the start block (input pruning, or earlier slimming).
    start = token_transition(Provenance.identity(trace.batch_size, n), trace.blocks[start_block].provenance, p, index)
    attentions, transitions = [], []
    for b in range(start_block, end + 1):
        attentions.append(fuse_heads(_block_attention(trace, b)[index].double().cpu(), head_fusion))
        after = trace.blocks[b + 1].provenance if b + 1 < depth else trace.final_provenance
        transitions.append(token_transition(trace.blocks[b].provenance, after, p, index))
    return rollout_product(attentions, transitions, start)


def rollout(trace, index: int = 0, head_fusion: str = "mean", prefix_row: int = 0, start_block: int = 0,
            end_block: int | None = None, dropped: str = "unseen") -> np.ndarray:
    """Attention rollout from a prefix token (CLS by default) to the original patches.

    Needs the attention of every block in the range: run with ``plan.with_attention("all")``.

    Args:
        trace: a :class:`~patchslim.trace.Trace`.
        index: which image of the batch.
        head_fusion: ``"mean"`` (Abnar & Zuidema), ``"max"`` or ``"min"`` over heads.
        prefix_row: 0 for CLS; 1 for the distillation token of a distilled DeiT.
        start_block, end_block: the blocks to roll out (default all).
        dropped: which patches are NaN: ``"unseen"`` those that never entered the start block (they carry
            no flow at all), ``"end"`` those no token stands for after the last block (a patch dropped
            half-way still had its say before, which ``"unseen"`` shows), ``"none"`` keeps zeros.

    Returns:
        ``[rows, cols]`` float64; over the patches that are not NaN it sums to the flow from patches
        (1 minus the share the prefix tokens keep).
    """
    _require_class_token(trace.spec)
    matrix = rollout_matrix(trace, index, head_fusion, start_block, end_block)
    p = trace.spec.num_prefix_tokens
    if not 0 <= prefix_row < p:
        raise ValueError(f"prefix_row must be in 0..{p - 1}, got {prefix_row}")
    values = matrix[prefix_row, p:].numpy().copy()
    if dropped == "unseen":
        mask = trace.blocks[start_block].provenance.patch_mask()[index].cpu().numpy()
    elif dropped == "end":
        depth = trace.spec.depth
        last = (depth - 1 if end_block is None else end_block) % depth
        prov = trace.final_provenance if last == depth - 1 else trace.blocks[last + 1].provenance
        mask = prov.patch_mask()[index].cpu().numpy()
    elif dropped == "none":
        mask = np.ones_like(values, dtype=bool)
    else:
        raise ValueError(f"dropped must be 'unseen', 'end' or 'none', got {dropped!r}")
    values[~mask] = np.nan
    return values.reshape(trace.spec.grid_size)
