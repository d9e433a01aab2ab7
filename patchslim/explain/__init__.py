"""Explanations that see through slimming: attention maps, rollout, captum attributions, kept evidence.

Arrays in, arrays out; every map is ``[rows, cols]`` on the original patch grid, NaN where a patch was
dropped. :func:`explain` runs the whole comparison for one image (unslimmed vs slimmed)::

    from patchslim.explain import explain
    result = explain(model, image, SlimPlan.single("random", 0.5))
    result.evidence.kept_evidence, result.rollout_after, result.attribution_after.grid

Modules: :mod:`~patchslim.explain.attention` (CLS attention maps, rollout through changing token sets),
:mod:`~patchslim.explain.grad_rollout` (Chefer et al.'s gradient-weighted rollout),
:mod:`~patchslim.explain.attribution` (Integrated Gradients and per-patch occlusion with captum),
:mod:`~patchslim.explain.evidence` (kept evidence, rank agreement), :mod:`~patchslim.explain.maps` (every map kind
for a batch), :mod:`~patchslim.explain.faithfulness` (deletion / insertion scores of the maps, token and pixel
modes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from patchslim.explain.attention import (  # noqa: F401
    class_token_refusal,
    cls_attention,
    fuse_heads,
    residual_attention,
    rollout,
    rollout_matrix,
    rollout_product,
    token_transition,
    tokens_to_grid,
    window_attention,
)
from patchslim.explain.attribution import (  # noqa: F401
    Attribution,
    attribute,
    baseline_tensor,
    differentiable_logits,
    integrated_gradients,
    occlusion,
    patch_feature_mask,
    per_patch,
)
from patchslim.explain.evidence import EvidenceReport, evidence_report, kept_evidence, spearman, top_patches  # noqa: F401
from patchslim.explain.faithfulness import (  # noqa: F401
    DEFAULT_STEPS,
    Faithfulness,
    MapScores,
    compare,
    curve_area,
    perturbation_curves,
    score_maps,
)
from patchslim.explain.grad_rollout import (  # noqa: F401
    GradientRollout,
    gradient_refusal,
    gradient_rollout,
    gradient_weighted_attention,
    relevance_product,
)
from patchslim.explain.maps import MAP_KINDS, patch_maps  # noqa: F401


@dataclass
class Explanation:
    """Unslimmed vs slimmed explanations of one image.

    Attributes:
        target: the class explained (the unslimmed model's prediction unless given).
        target_label: its name.
        attention_block: the block of the attention maps.
        attention_before, attention_after: ``[rows, cols]`` CLS attention (head mean) in that block; for a model
            without a class token (Swin), the attention each token received within its window there.
        rollout_before, rollout_after: ``[rows, cols]`` attention rollout from CLS over all blocks (None for a
            model without a class token: ``class_token_refusal(model.spec)`` says why).
        attribution_before, attribution_after: per-patch attributions (None if not asked for).
        evidence: kept evidence and rank agreement (by attribution; by rollout without attributions).
        baseline_trace, trace: the Traces of the unslimmed and the slimmed forward.
        grad_rollout_before, grad_rollout_after: ``[rows, cols]`` gradient-weighted rollout for the target
            class (None when the model cannot give it: ``grad_rollout_refused`` says why).
        grad_rollout_refused: why there is no gradient-weighted rollout ("" when there is).
        faithfulness: deletion / insertion scores of every map before and after (None if not asked for).
    """

    target: int
    target_label: str
    attention_block: int
    attention_before: np.ndarray
    attention_after: np.ndarray
    rollout_before: np.ndarray | None
    rollout_after: np.ndarray | None
    attribution_before: Attribution | None
    attribution_after: Attribution | None
    evidence: EvidenceReport
    baseline_trace: Any
    trace: Any
    grad_rollout_before: np.ndarray | None = None
    grad_rollout_after: np.ndarray | None = None
    grad_rollout_refused: str = ""
    faithfulness: Faithfulness | None = None

    def maps(self, phase: str = "after") -> dict[str, np.ndarray]:
        """Every map of the unslimmed (``"before"``) or the slimmed (``"after"``) model, by kind
        (:data:`~patchslim.explain.maps.MAP_KINDS`)."""
        if phase not in ("before", "after"):
            raise ValueError(f"phase must be 'before' or 'after', got {phase!r}")
        if self.rollout_before is None:  # no class token (Swin): the attention map is the one received in windows
            maps = {"window_attention": getattr(self, f"attention_{phase}")}
        else:
            maps = {"attention": getattr(self, f"attention_{phase}"), "rollout": getattr(self, f"rollout_{phase}")}
        if self.grad_rollout_before is not None:
            maps["grad_rollout"] = getattr(self, f"grad_rollout_{phase}")
        attribution = getattr(self, f"attribution_{phase}")
        if attribution is not None:
            maps["ig" if attribution.method == "integrated_gradients" else "occlusion"] = attribution.grid
        return maps


def explain(model, image, plan=None, attribution: str | None = "ig", share: float = 0.1,
            attention_block: int = -1, head_fusion: str = "mean", prefix_row: int = 0, target: int | None = None,
            progress: Callable[[int, int], None] | None = None, faithfulness: str | Sequence[str] | None = None,
            faithfulness_steps: int = DEFAULT_STEPS, **attribution_options: Any) -> Explanation:
    """Explains one image with and without the plan's slimming.

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        image: a PIL image or the model's input ``[1, C, H, W]``.
        plan: the slimming plan (None: nothing is slimmed, before == after).
        attribution: ``"ig"``, ``"occlusion"`` or None (attention and rollout only: fast).
        share: the top share of patches that counts as the evidence.
        attention_block: block of the attention maps (negative counts from the end).
        head_fusion: how rollout fuses heads.
        prefix_row: 0 for CLS; 1 for a distilled model's distillation token.
        target: class to explain (None: the unslimmed model's prediction).
        progress: ``progress(done, total)`` over both attributions.
        faithfulness: also score every map by deletion and insertion in these modes (``"both"``: every mode the
            architecture allows; ``"token"``, ``"pixel"``), before and after (None: not scored).
        faithfulness_steps: the curves' steps.
        attribution_options: passed to the attribution (``n_steps``, ``internal_batch_size``,
            ``perturbations_per_eval``, ``baseline``).
    """
    from patchslim.engine import run
    from patchslim.plan import SlimPlan

    plan = plan or SlimPlan()
    if attribution == "ig":  # before any work: an int8 model has no gradient to integrate
        from patchslim.quantize import refuse_gradients

        refuse_gradients(model, "Integrated Gradients")
    x = model.preprocess(image)
    if x.shape[0] != 1:
        raise ValueError(f"explain takes one image, got a batch of {x.shape[0]}")
    if faithfulness is not None:
        from patchslim.explain.faithfulness import check_steps, resolve_modes

        resolve_modes(model, faithfulness)  # refuse bad modes and steps before any work
        check_steps(faithfulness_steps, model.spec.num_patches)
    refused = gradient_refusal(model)
    grad_before = grad_after = None
    if refused:
        baseline_trace = run(model, x, SlimPlan(attention_blocks="all"))
        trace = run(model, x, plan.with_attention("all"))
        target = int(baseline_trace.logits[0].argmax()) if target is None else int(target)
    else:  # the gradient forwards keep every block's attention: they serve the other maps too
        grad_before = gradient_rollout(model, x, None, target, prefix_row)
        target = grad_before.targets[0]
        grad_after = gradient_rollout(model, x, plan, target, prefix_row)
        baseline_trace, trace = grad_before.trace, grad_after.trace
    block = attention_block % model.spec.depth
    before = after = None
    if attribution is not None:
        def part(k: int):  # both attributions take the same number of evaluations
            def report(done: int, total: int) -> None:
                if progress is not None:
                    progress(k * total + done, 2 * total)
            return report

        before = attribute(model, x, attribution, SlimPlan(), target=target, progress=part(0), **attribution_options)
        after = attribute(model, x, attribution, plan, target=target, progress=part(1), **attribution_options)
    windowed = class_token_refusal(model.spec) is not None  # no CLS row (Swin): maps of received attention

    def attention_map(t):
        return window_attention(t, block) if windowed else cls_attention(t, block, prefix_row=prefix_row)

    rollout_before = None if windowed else rollout(baseline_trace, head_fusion=head_fusion, prefix_row=prefix_row)
    rollout_after = None if windowed else rollout(trace, head_fusion=head_fusion, prefix_row=prefix_row)
    attention_before, attention_after = attention_map(baseline_trace), attention_map(trace)
    importance_before = before.grid if before is not None else (
        attention_before if rollout_before is None else rollout_before)
    importance_after = after.grid if after is not None else (attention_after if rollout_after is None else rollout_after)
    names = model.class_names
    result = Explanation(
        target=target,
        target_label=names[target] if target < len(names) else str(target),
        attention_block=block,
        attention_before=attention_before,
        attention_after=attention_after,
        rollout_before=rollout_before,
        rollout_after=rollout_after,
        attribution_before=before,
        attribution_after=after,
        evidence=evidence_report(importance_before, importance_after, trace, share),
        baseline_trace=baseline_trace,
        trace=trace,
        grad_rollout_before=None if grad_before is None else grad_before.grids[0],
        grad_rollout_after=None if grad_after is None else grad_after.grids[0],
        grad_rollout_refused=refused or "",
    )
    if faithfulness is not None:
        result.faithfulness = compare(model, x, plan, result.maps("before"), result.maps("after"), modes=faithfulness,
                                      steps=faithfulness_steps, target=target)
    return result
