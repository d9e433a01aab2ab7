"""Gradient-weighted attention rollout, placed on the original patch grid through slimming.

Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers" (ICCV 2021). Plain rollout (:mod:`patchslim.explain.attention`) multiplies attention through the
blocks whatever the class; this map keeps only the attention that pushes the *target class* up. Per block
``b``, with ``A_b`` the attention probabilities ``[H, T, T]`` and ``G_b`` the gradient of the target class's
logit with respect to them::

    Ā_b = mean over heads of max(G_b * A_b, 0)          (the positive part, then the head mean)
    R_0 = I,   R <- R + Ā_b R                           (the paper's update rule, block by block)

and the class token's row of ``R`` over the patch columns is the map. Unlike Abnar & Zuidema's rollout there
is no renormalization: ``R`` is a relevance, not a flow of probability.

Through slimming, the token set changes between blocks; as for rollout, the transition ``C_b`` from the tokens
leaving block ``b`` to those entering block ``b + 1`` comes from the Trace's provenance
(:func:`patchslim.explain.attention.token_transition`), so ``R_{b+1} = C_b (R_b + Ā_b R_b)`` starting from the
input pruning ``C_in``. Patches that never entered block 0 get NaN (the model never saw them).

The attention and its gradients come from the one forward: :func:`patchslim.engine.run` with ``grad=True``
keeps every block's probabilities in the autograd graph when the plan asks for them
(``plan.with_attention("all")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from patchslim.errors import ExplanationError
from patchslim.explain.attention import token_transition
from patchslim.quantize import gradient_refusal_text, is_int8, refuse_gradients
from patchslim.tokens import Provenance


def gradient_weighted_attention(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``Ā = mean_h(max(G * A, 0))``: ``[..., H, T, T]`` attention and its gradient -> ``[..., T, T]``."""
    if attention.shape != gradient.shape:
        raise ValueError(f"attention {list(attention.shape)} and gradient {list(gradient.shape)} differ in shape")
    return (gradient * attention).clamp(min=0).mean(-3)


def relevance_product(weighted: Sequence[torch.Tensor], transitions: Sequence[torch.Tensor | None] | None = None,
                      start: torch.Tensor | None = None) -> torch.Tensor:
    """``R <- C_b (R + Ā_b R)`` over the blocks of one image, as a pure tensor function.

    Args:
        weighted: per block, ``[T_b, T_b]`` gradient-weighted attention (:func:`gradient_weighted_attention`).
        transitions: per block, ``[T_{b+1}, T_b]`` from the tokens leaving block b to those entering the next
            (None or omitted: the same tokens).
        start: ``[T_0, T]`` from the original T tokens to those entering block 0 (None: the identity).

    Returns:
        ``[T_last, T]``: row i is the relevance of every original token for output token i.
    """
    transitions = list(transitions) if transitions is not None else [None] * len(weighted)
    if len(transitions) != len(weighted):
        raise ValueError(f"{len(transitions)} transitions for {len(weighted)} blocks")
    if not weighted:
        raise ValueError("no block to roll out")
    size = weighted[0].shape[-1]
    relevance = start.double() if start is not None else torch.eye(size, dtype=torch.float64)
    for block_weights, transition in zip(weighted, transitions):
        a = block_weights.double().to(relevance.device)
        if a.shape[-1] != relevance.shape[0]:
            raise ValueError(f"attention over {a.shape[-1]} tokens after {relevance.shape[0]} tokens")
        relevance = relevance + a @ relevance
        if transition is not None:
            relevance = transition.double().to(relevance.device) @ relevance
    return relevance


@dataclass
class GradientRollout:
    """Gradient-weighted rollout maps of a batch.

    Attributes:
        grids: ``[B, rows, cols]`` float64, NaN at patches that never entered the model.
        targets: the class each image's map explains.
        trace: the forward that produced them (attention and logits detached), for the other maps.
    """

    grids: np.ndarray
    targets: tuple[int, ...]
    trace: Any


def gradient_refusal(model) -> str | None:
    """Why this model cannot give gradient-weighted rollout, or None when it can."""
    spec = model.spec
    if spec.num_prefix_tokens == 0:
        return (f"{model.name} has no class token: gradient-weighted rollout reads the class token's row of the "
                "relevance")
    if spec.depth == 0:
        return f"{model.name} has no attention block"
    if is_int8(model):
        return gradient_refusal_text("gradient-weighted rollout")
    if model.precision != "fp32":
        return (f"gradient-weighted rollout needs the gradients of the attention probabilities, which the "
                f"{model.precision} autocast does not keep; load the model in fp32")
    return None


def targets_for(model, x: torch.Tensor, target: int | Sequence[int] | None) -> tuple[int, ...]:
    """One class per image: the given one(s), else the unslimmed model's top-1 (one forward)."""
    from patchslim.engine import run

    batch = int(x.shape[0])
    if target is None:
        return tuple(int(c) for c in run(model, x).logits.argmax(-1).tolist())
    values = [int(target)] * batch if np.ndim(target) == 0 else [int(t) for t in target]
    if len(values) != batch:
        raise ExplanationError(f"target: {len(values)} classes for {batch} images")
    for value in values:
        if not 0 <= value < model.spec.num_classes:
            raise ExplanationError(f"target must be a class in 0..{model.spec.num_classes - 1}, got {value}")
    return tuple(values)


def gradient_rollout(model, images: Any, plan=None, target: int | Sequence[int] | None = None,
                     prefix_row: int = 0) -> GradientRollout:
    """Gradient-weighted rollout of the (slimmed) model for a batch, on the original patch grid.

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        images: a PIL image, a list of them, or the model's input ``[B, C, H, W]``.
        plan: the slimming plan (None: the unslimmed model).
        target: the class to explain, one per image or one for all (None: the unslimmed model's top-1).
        prefix_row: 0 for the class token; 1 for a distilled DeiT's distillation token.

    Returns:
        the maps, the classes they explain and the forward's Trace.

    Raises:
        ExplanationError: the model cannot give this map (no class token, no block, not fp32), or a bad target.
        GradientUnavailableError: an int8 model (no gradients through its layers).
    """
    from patchslim.engine import run
    from patchslim.plan import SlimPlan

    refuse_gradients(model, "gradient-weighted rollout")
    reason = gradient_refusal(model)
    if reason:
        raise ExplanationError(f"map kind 'grad_rollout' is not available: {reason}")
    p = model.spec.num_prefix_tokens
    if not 0 <= prefix_row < p:
        raise ExplanationError(f"prefix_row must be in 0..{p - 1}, got {prefix_row}")
    plan = plan or SlimPlan()
    x = model.preprocess(images).detach()
    unslimmed = plan.is_empty
    targets = None if (target is None and unslimmed) else targets_for(model, x, target)
    x = x.clone().requires_grad_(True)  # the model's parameters may be frozen: the graph starts at the input
    trace = run(model, x, plan.with_attention("all"), grad=True)
    if targets is None:
        targets = tuple(int(c) for c in trace.logits.detach().argmax(-1).tolist())
    depth = model.spec.depth
    chosen = trace.logits.gather(1, torch.tensor(targets, device=trace.logits.device).unsqueeze(1)).sum()
    attention = [trace.attention[b] for b in range(depth)]
    gradients = torch.autograd.grad(chosen, attention, allow_unused=True)
    if any(g is None for g in gradients):
        raise ExplanationError("map kind 'grad_rollout' is not available: the forward kept no gradient for the "
                               "attention of some block")
    trace.attention = {b: a.detach() for b, a in enumerate(attention)}
    trace.logits = trace.logits.detach()
    n = model.spec.num_patches
    grids = np.empty((trace.batch_size, n), dtype=np.float64)
    identity = Provenance.identity(trace.batch_size, n)
    for i in range(trace.batch_size):
        start = token_transition(identity, trace.blocks[0].provenance, p, i)
        weighted, transitions = [], []
        for b in range(depth):
            weighted.append(gradient_weighted_attention(trace.attention[b][i].double().cpu(),
                                                        gradients[b][i].detach().double().cpu()))
            after = trace.blocks[b + 1].provenance if b + 1 < depth else trace.final_provenance
            transitions.append(token_transition(trace.blocks[b].provenance, after, p, i))
        values = relevance_product(weighted, transitions, start)[prefix_row, p:].numpy().copy()
        values[~trace.blocks[0].provenance.patch_mask()[i].cpu().numpy()] = np.nan
        grids[i] = values
    return GradientRollout(grids.reshape(-1, *model.spec.grid_size), targets, trace)
