"""The plan-driven forward pass: ``run(model, images, plan) -> Trace``.

The engine walks timm's ``VisionTransformer`` pipeline itself (``patch_embed -> _pos_embed -> patch_drop
-> norm_pre -> blocks -> norm -> forward_head``) and applies the plan's actions between the steps. It never
writes to the model, so one cached model serves many threads and app sessions, each with its own plan.

Inside a block it re-states timm's pre-norm ``Block`` / ``Attention`` with two hooks:

- attention probabilities are materialized only in blocks that need them (a method reads them, or the
  plan asks to keep them); every other block uses ``F.scaled_dot_product_attention``;
- once tokens are merged, ``log(size)`` is added to the attention logits (proportional attention,
  Bolya et al. 2023), so a token standing for k patches weighs like k of them.

Input pruning happens after ``_pos_embed``, so kept tokens keep their own position embedding.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F

from patchslim.device import autocast, synchronize
from patchslim.methods import Reduction, StageContext
from patchslim.models import LoadedModel
from patchslim.plan import Action, SlimPlan
from patchslim.tokens import Provenance, TokenState, target_count
from patchslim.trace import BlockRecord, StageRecord, Trace

# Set by ``patchslim.metrics.latency.selection_clock()`` to a list that receives (method, block, seconds)
# for every method call; None (the default) reads no clock at all.
SELECTION_CLOCK: ContextVar[list | None] = ContextVar("patchslim_selection_clock", default=None)


def run(model: LoadedModel, images: Any, plan: SlimPlan | None = None) -> Trace:
    """Runs ``model`` on ``images`` under ``plan``.

    Args:
        model: from :func:`patchslim.load_model`.
        images: a PIL image, a list of them, or a preprocessed ``[B, C, H, W]`` tensor.
        plan: the slimming plan; None or ``SlimPlan()`` runs the unslimmed model.

    Returns:
        The :class:`~patchslim.trace.Trace` of the forward.

    Raises:
        PlanError: the plan does not fit the model (e.g. a block index past its depth).
    """
    plan = plan or SlimPlan()
    spec = model.spec
    actions = plan.resolve(spec.depth)
    for action in actions:
        action.method.check(dict(action.stage.options), action.stage.keep_ratio, model)
    x = model.preprocess(images)
    with torch.inference_mode(), autocast(model.device, model.precision):
        return _forward(model, x, plan, actions)


def _forward(model: LoadedModel, images: torch.Tensor, plan: SlimPlan, actions: list[Action]) -> Trace:
    vit = model.model
    spec = model.spec
    keep_attention = plan.attention_wanted(spec.depth)
    needed = {a.attention_block for a in actions if a.attention_block is not None}
    explicit, prefix_rows = attention_blocks(plan, spec.depth, actions)
    keys_needed = {a.attention_block for a in actions if a.method.needs_keys}
    # blocks whose attention an action before the next block reads (else it is dropped after the block's own)
    read_by_next = {a.attention_block for a in actions if a.point == "pre" and a.attention_block is not None}
    generator = torch.Generator().manual_seed(plan.seed)

    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    batch = x.shape[0]
    state = TokenState(x, spec.num_prefix_tokens, Provenance.identity(batch, spec.num_patches, x.device))
    del x  # the state holds the tokens; no second reference keeps the unslimmed input alive

    stage_blocks: dict[int, tuple[int, ...]] = {}
    for action in actions:
        stage_blocks[action.stage_index] = stage_blocks.get(action.stage_index, ()) + (action.block,)
    stage_start: dict[int, int] = {}  # non-prefix tokens when each stage first acted
    by_place: dict[tuple[int, str], list[Action]] = {}
    for action in actions:
        by_place.setdefault((action.block, action.point), []).append(action)

    records: list[BlockRecord] = []
    stage_records: list[StageRecord] = []
    attention_kept: dict[int, torch.Tensor] = {}
    last_attention: torch.Tensor | None = None
    last_keys: torch.Tensor | None = None

    def apply(place: tuple[int, str], state: TokenState) -> TokenState:
        for action in by_place.get(place, ()):
            stage_start.setdefault(action.stage_index, state.count)
            ctx = StageContext(
                block=action.block,
                point=action.point,
                keep_ratio=action.stage.keep_ratio,
                target=target_count(action.stage.keep_ratio, state.count),
                options=dict(action.stage.options),
                attention=last_attention if action.method.needs_attention else None,
                keys=last_keys if action.method.needs_keys else None,
                generator=generator,
                model=model,
                num_patches=spec.num_patches,
                grid_size=spec.grid_size,
                depth=spec.depth,
                stage_blocks=stage_blocks[action.stage_index],
                stage_start_count=stage_start[action.stage_index],
            )
            before = state
            clock = SELECTION_CLOCK.get()
            if clock is not None:
                synchronize(state.tokens.device)
                started = time.perf_counter()
            reduction: Reduction = action.method.reduce(state, ctx)
            if clock is not None:
                synchronize(state.tokens.device)
                clock.append((action.stage.method, action.block, time.perf_counter() - started))
            state = reduction.state
            stage_records.append(StageRecord(
                method=action.stage.method, stage_index=action.stage_index, block=action.block,
                point=action.point, tokens_before=before.count, tokens_after=state.count,
                scores=None if reduction.scores is None else reduction.scores.detach().float(),
                provenance_before=before.provenance, selection_macs=float(reduction.selection_macs),
            ))
        return state

    for index, block in enumerate(vit.blocks):
        state = apply((index, "pre"), state)
        last_attention = last_keys = None  # every reader of earlier blocks' attention has run
        provenance_in, tokens_in = state.provenance, state.tokens.shape[1]
        sizes_in = state.sizes is not None
        attn_out, probs, keys = _attention(block, state, want_probs=index in explicit,
                                           want_keys=index in keys_needed, prefix_probs=index in prefix_rows)
        if index in keep_attention:
            attention_kept[index] = probs.float()
        if index in needed:
            last_attention, last_keys = probs, keys
        state = TokenState(state.tokens + attn_out, state.num_prefix, state.provenance, state.sizes)
        del attn_out, probs, keys  # free them before the MLP; last_attention / last_keys hold what is read
        state = apply((index, "mid"), state)
        if index not in read_by_next:
            last_attention = last_keys = None
        tokens = state.tokens
        tokens = tokens + block.drop_path2(block.ls2(block.mlp(block.norm2(tokens))))
        records.append(BlockRecord(index, tokens_in, tokens.shape[1], provenance_in, sizes_in))
        state = TokenState(tokens, state.num_prefix, state.provenance, state.sizes)

    features = vit.norm(state.tokens)
    logits = _head(vit, features, state)
    return Trace(
        logits=logits.float(),
        spec=spec,
        plan=plan,
        blocks=records,
        final_provenance=state.provenance,
        final_tokens=state.tokens.shape[1],
        stages=stage_records,
        attention=attention_kept,
        class_names=model.class_names,
    )


def attention_blocks(plan: SlimPlan, depth: int, actions: list[Action] | None = None) -> tuple[set[int], set[int]]:
    """Where the forward computes attention probabilities, and how much of them.

    Returns:
        (blocks with the full ``[B, H, T, T]`` probabilities: kept for maps, or read by a method that needs
        whole rows or columns; blocks that keep fused attention and compute only the prefix tokens' rows
        ``[B, H, P, T]``, because every method reading them reads CLS attention alone)
    """
    actions = plan.resolve(depth) if actions is None else actions
    kept = plan.attention_wanted(depth)
    readers: dict[int, list[Action]] = {}
    for action in actions:
        if action.method.needs_attention and action.attention_block is not None:
            readers.setdefault(action.attention_block, []).append(action)
    prefix_rows = {b for b, acts in readers.items() if b not in kept
                   and all(a.method.attention_rows(dict(a.stage.options)) == "prefix" for a in acts)}
    return kept | (set(readers) - prefix_rows), prefix_rows


def _attention(block: torch.nn.Module, state: TokenState, want_probs: bool, want_keys: bool,
               prefix_probs: bool = False):
    """``block.ls1(block.attn(block.norm1(x)))`` with optional probabilities and keys.

    ``prefix_probs`` (without ``want_probs``): fused attention for the output, plus the probabilities of the
    prefix tokens' queries only, ``[B, H, P, T]`` (``P * T`` instead of ``T^2`` per head).

    Returns:
        (residual branch ``[B, T, C]``, probabilities ``[B, H, T, T]`` (``[B, H, P, T]``) or None, keys
        ``[B, H, T, d]`` or None)
    """
    attn = block.attn
    h = block.norm1(state.tokens)
    b, t, _ = h.shape
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None
    if state.sizes is not None:
        bias = state.sizes.log().to(q.dtype)[:, None, None, :]
    probs = None
    if want_probs:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)
        del logits  # only the probabilities are needed from here on
        out = probs @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if prefix_probs:
            logits = (q[:, :, : state.num_prefix] * attn.scale) @ k.transpose(-2, -1)
            probs = (logits if bias is None else logits + bias).softmax(dim=-1)
    out = out.transpose(1, 2).reshape(b, t, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj(out)
    out = block.drop_path1(block.ls1(out))
    return out, probs, (k if want_keys else None)


def _head(vit: torch.nn.Module, features: torch.Tensor, state: TokenState) -> torch.Tensor:
    """timm's ``forward_head``, except that average pooling weighs merged tokens by their size."""
    if getattr(vit, "global_pool", None) == "avg" and state.sizes is not None and vit.attn_pool is None:
        p = state.num_prefix
        weights = state.sizes[:, p:].to(features.dtype).unsqueeze(-1)
        pooled = (features[:, p:] * weights).sum(1) / weights.sum(1)
        return vit.head(vit.head_drop(vit.fc_norm(pooled)))
    return vit.forward_head(features)
