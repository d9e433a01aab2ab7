"""The plan-driven forward pass: ``run(model, images, plan) -> Trace``, the one walk through a model.

Everything that runs a model's blocks comes through here: inference (``run``), captum attributions and
policy or model training (``run(..., grad=True)``), and the tokens a policy reads (:func:`tokens_before`).
The walk asks the model's adapter (:mod:`patchslim.adapters`) for the architecture's steps (tokens in, each
block's attention and MLP branches, logits out) and applies the plan's actions between them. It never writes
to the model, so one cached model serves many threads and app sessions, each with its own plan.

Attention probabilities are materialized only in blocks that need them (a method reads them, or the plan
asks to keep them); input pruning happens after the position embedding, so kept tokens keep their own.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from patchslim.device import autocast, synchronize
from patchslim.errors import PlanError
from patchslim.methods import Reduction, StageContext
from patchslim.models import LoadedModel
from patchslim.plan import Action, KeepSet, SlimPlan
from patchslim.seeding import ImageRandom
from patchslim.quantize import refuse_gradients
from patchslim.tokens import Provenance, TokenState, target_count
from patchslim.trace import BlockRecord, StageRecord, Trace

SelectionClock = list  # receives (method, block, seconds) per action


def run(model: LoadedModel, images: Any, plan: SlimPlan | None = None, *, grad: bool = False,
        clock: SelectionClock | None = None, draws_for: torch.Tensor | None = None) -> Trace:
    """Runs ``model`` on ``images`` under ``plan``.

    Args:
        model: from :func:`patchslim.load_model` or :func:`patchslim.wrap_model`.
        images: a PIL image, a list of them, or a preprocessed ``[B, C, H, W]`` tensor.
        plan: the slimming plan; None or ``SlimPlan()`` runs the unslimmed model.
        grad: False runs under ``torch.inference_mode``; True records autograd (gradients w.r.t. the input
            for attributions, or w.r.t. parameters that require them, e.g. a policy or a model being
            fine-tuned; put the model in ``train()`` mode yourself for dropout).
        clock: a list that receives ``(method, block, seconds)`` for every action, each timed on its own
            (the overhead tables); None reads no clock.
        draws_for: ``[B, C, H, W]`` the images whose random streams the methods draw from, row by row, instead
            of ``images``' own (:mod:`patchslim.seeding`): an attribution perturbs an image and keeps the draws
            of the image it explains. None: each image its own.

    Returns:
        The :class:`~patchslim.trace.Trace` of the forward.

    Raises:
        PlanError: the plan does not fit the model (e.g. a block index past its depth).
        GradientUnavailableError: ``grad=True`` on an int8 model (its layers give no gradient).
    """
    if grad:
        refuse_gradients(model, "a forward with gradients (run(..., grad=True))")
    plan = plan or SlimPlan()
    actions = _checked_actions(model, plan)
    x = model.preprocess(images)
    if draws_for is not None and draws_for.shape[0] != x.shape[0]:
        raise ValueError(f"draws_for has {draws_for.shape[0]} images for a batch of {x.shape[0]}")
    with _mode(grad), autocast(model.device, model.precision):
        return _walk(model, x, plan, actions, clock, draws_for=draws_for)


def tokens_before(model: LoadedModel, images: Any, block: int, plan: SlimPlan | None = None, *,
                  grad: bool = False) -> TokenState:
    """The tokens entering block ``block`` (before any action placed there), by the same walk as :func:`run`.

    What a method acting before ``block`` sees: a policy's training data, or features for calibration.

    Raises:
        PlanError: ``block`` is outside the model.
        GradientUnavailableError: ``grad=True`` on an int8 model.
    """
    if grad:
        refuse_gradients(model, "a forward with gradients (tokens_before(..., grad=True))")
    plan = plan or SlimPlan()
    depth = model.spec.depth
    if not 0 <= block < depth:
        raise PlanError(f"block {block} is outside the model (blocks 0..{depth - 1})")
    actions = _checked_actions(model, plan)
    x = model.preprocess(images)
    with _mode(grad), autocast(model.device, model.precision):
        return _walk(model, x, plan, actions, None, stop_before=block)


def check_plan(model: LoadedModel, plan: SlimPlan) -> list[Action]:
    """The plan's actions placed in ``model``, after every check :func:`run` makes before any block runs.

    Raises:
        PlanError: a block or stage outside the model, a method that does not apply to its architecture (with
            the reason), or a method's own refusal.
    """
    return _checked_actions(model, plan)


def _checked_actions(model: LoadedModel, plan: SlimPlan) -> list[Action]:
    spec = model.spec
    actions = plan.resolve(spec.depth, spec)
    for action in actions:
        method = action.method
        if spec.hierarchical and not method.windowed:
            raise PlanError(f"method {action.stage.method!r} does not apply to {model.name} ({spec.kind}, windowed "
                            f"attention): {method.window_reason or 'it does not act window by window'}")
        method.check(dict(action.stage.options), action.stage.keep_ratio, model)
    if spec.hierarchical:  # the adapter unmerges a window merge by its provenance: nothing may act on it first
        for first, later in zip(actions, actions[1:]):
            if first.method.merges and later.block == first.block:
                raise PlanError(f"stage {later.stage.method!r} acts in block {first.block} after "
                                f"{first.stage.method!r} merged its windows' tokens; on {model.name} a merging "
                                "stage must be the last to act in its blocks")
    return actions


def _mode(grad: bool):
    return torch.enable_grad() if grad else torch.inference_mode()


def _walk(model: LoadedModel, images: torch.Tensor, plan: SlimPlan, actions: list[Action],
          clock: SelectionClock | None, stop_before: int | None = None, draws_for: torch.Tensor | None = None) -> Any:
    adapter = model.adapter
    spec = model.spec
    keep_attention = plan.attention_wanted(spec.depth)
    needed = {a.attention_block for a in actions if a.attention_block is not None}
    explicit, prefix_rows = attention_blocks(plan, spec.depth, actions, has_prefix=spec.num_prefix_tokens > 0)
    keys_needed = {a.attention_block for a in actions if a.method.needs_keys and a.reads}
    values_needed = {a.attention_block for a in actions if a.method.needs_values and a.reads}
    # blocks whose attention an action before the next block reads (else it is dropped after the block's own)
    read_by_next = {a.attention_block for a in actions if a.point == "pre" and a.attention_block is not None}
    random = ImageRandom(plan.seed, images if draws_for is None else draws_for)  # keyed at the first draw

    x = adapter.embed(images)
    state = TokenState(x, spec.num_prefix_tokens, Provenance.identity(x.shape[0], spec.num_patches, x.device))
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
    last_values: torch.Tensor | None = None

    def apply(place: tuple[int, str], state: TokenState) -> TokenState:
        for action in by_place.get(place, ()):
            if state.key_mask is not None:
                raise PlanError(
                    f"stage {action.stage.method!r} acts after a stage that kept a different number of tokens "
                    "per image (a boolean keep set, or rl with mode=bernoulli); such a stage must be the plan's last"
                )
            stage_start.setdefault(action.stage_index, state.count)
            ctx = StageContext(
                block=action.block,
                point=action.point,
                keep_ratio=action.stage.keep_ratio,
                target=target_count(action.stage.keep_ratio, state.count),
                options=dict(action.stage.options),
                attention=(adapter.seen_attention(last_attention, state)
                           if action.method.needs_attention and last_attention is not None else None),
                keys=last_keys if action.method.needs_keys and action.reads else None,
                values=last_values if action.method.needs_values and action.reads else None,
                random=random,
                model=model,
                num_patches=spec.num_patches,
                grid_size=spec.grid_size,
                depth=spec.depth,
                stage_blocks=stage_blocks[action.stage_index],
                stage_start_count=stage_start[action.stage_index],
                given=action.stage.keep if isinstance(action.stage, KeepSet) else None,
                windowed=action.windowed,
                regions=adapter.merge_regions(action.block, state) if action.method.merges else None,
            )
            before = state
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

    for index in range(spec.depth):
        if index == stop_before:
            return state
        state = adapter.enter(index, state)  # a windowed model groups the tokens by the block's windows here
        state = apply((index, "pre"), state)
        last_attention = last_keys = last_values = None  # every reader of earlier blocks' attention has run
        images = state.tokens.shape[0] // state.groups
        provenance_in = state.provenance if state.groups == 1 else state.provenance.regroup(images)
        tokens_in = state.tokens.shape[1] * state.groups  # per image
        sizes_in = state.sizes is not None
        branch = adapter.attention(index, state, want_probs=index in explicit, want_keys=index in keys_needed,
                                   prefix_probs=index in prefix_rows, want_values=index in values_needed)
        if index in keep_attention:
            attention_kept[index] = branch.probs.float()
        if index in needed:
            last_attention, last_keys, last_values = branch.probs, branch.keys, branch.values
        state = _with_tokens(state, state.tokens + branch.out)
        del branch  # free it before the MLP; last_attention / last_keys hold what is read
        state = apply((index, "mid"), state)
        if index not in read_by_next:
            last_attention = last_keys = last_values = None
        # no local name keeps a block's input alive through the MLP (it would add a [B, T, C] to the peak)
        state = _with_tokens(state, state.tokens + adapter.mlp(index, state.tokens))
        records.append(BlockRecord(index, tokens_in, state.tokens.shape[1] * state.groups, provenance_in, sizes_in,
                                   state.groups))
        state = adapter.transition(index, state)

    if state.sizes is not None and not pools_by_size(actions):
        state = dataclasses.replace(state, sizes=None)
    logits = adapter.head(state)
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


def pools_by_size(actions: list[Action]) -> bool:
    """Whether the head's average pooling counts tokens by their sizes: when any merging stage asks for it
    (:meth:`~patchslim.methods.SlimMethod.pools_by_size`). Sizes still drive proportional attention either way."""
    return any(a.method.merges and a.method.pools_by_size(dict(a.stage.options)) for a in actions)


def _with_tokens(state: TokenState, tokens: torch.Tensor) -> TokenState:
    return TokenState(tokens, state.num_prefix, state.provenance, state.sizes, state.key_mask, state.groups,
                      state.layout)


def attention_blocks(plan: SlimPlan, depth: int, actions: list[Action] | None = None, *,
                     has_prefix: bool = True) -> tuple[set[int], set[int]]:
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
    prefix_rows = {b for b, acts in readers.items() if has_prefix and b not in kept
                   and all(a.method.attention_rows(dict(a.stage.options)) == "prefix" for a in acts)}
    return kept | (set(readers) - prefix_rows), prefix_rows
