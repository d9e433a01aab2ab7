"""Per-patch maps by kind, for a batch: what the faithfulness scores rank patches by.

Every kind gives ``[B, rows, cols]`` on the original patch grid (NaN where the slimmed model never saw a patch),
for the unslimmed or the slimmed model alike, explaining one class per image:

====================  ====================================================================  =====================
kind                  map                                                                   cost per image
====================  ====================================================================  =====================
``attention``         the class token's attention in the last block, mean over heads        one forward (shared)
``rollout``           attention rollout (Abnar & Zuidema 2020) through the slimming         (shared)
``grad_rollout``      gradient-weighted rollout (Chefer et al. 2021) for the target class   (shared) + backward
``window_attention``  a windowed model's (Swin) attention received in the window, last      (shared)
                      block (:func:`patchslim.explain.attention.window_attention`)
``ig``                Integrated Gradients per patch (captum), signed sum                   ~18 forward+backward
``occlusion``         one patch at a time replaced by black (captum), drop of the logit     N + 2 forwards, fewer
                      (a patch that is black already gives the input again: run once)
====================  ====================================================================  =====================

The attention kinds come from one forward (with gradients when ``grad_rollout`` is asked for); each kind says
what it needs (:class:`MapKind`) and :func:`map_refusal` says why a model cannot produce it. A model with a class
token gives the first three, a windowed one ``window_attention``; both give the captum kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any, Sequence

import numpy as np
import torch

from patchslim.errors import ExplanationError


@dataclass(frozen=True)
class MapKind:
    """One kind of per-patch map and what it needs.

    Attributes:
        name: the key (``grad_rollout``).
        label: what people call it.
        reads_prefix: reads the class token's attention row (a model without a class token cannot give it).
        gradients: needs gradients through the forward.
        captum: computed with captum.
        windowed: reads a windowed model's attention within its windows (Swin).
    """

    name: str
    label: str
    reads_prefix: bool
    gradients: bool
    captum: bool
    windowed: bool = False


MAP_KINDS = {
    "attention": MapKind("attention", "CLS attention (last block)", True, False, False),
    "rollout": MapKind("rollout", "attention rollout", True, False, False),
    "grad_rollout": MapKind("grad_rollout", "gradient-weighted rollout", True, True, False),
    "window_attention": MapKind("window_attention", "attention received in the window (last block)", False, False,
                                False, windowed=True),
    "ig": MapKind("ig", "Integrated Gradients", False, True, True),
    "occlusion": MapKind("occlusion", "occlusion", False, False, True),
}
ATTENTION_KINDS = ("attention", "rollout", "grad_rollout")
TRACE_KINDS = ATTENTION_KINDS + ("window_attention",)  # read from one forward that keeps every block's attention
ALL_KINDS = ("attention", "rollout", "grad_rollout", "ig", "occlusion")  # every kind a model with a class token gives


def map_refusal(model, kind: str) -> str | None:
    """Why ``model`` cannot produce maps of ``kind``, or None when it can."""
    from patchslim.explain.attention import class_token_refusal
    from patchslim.explain.grad_rollout import gradient_refusal
    from patchslim.quantize import gradient_refusal_text, is_int8

    spec = MAP_KINDS[kind]
    if spec.reads_prefix and class_token_refusal(model.spec):
        return class_token_refusal(model.spec)
    if (spec.reads_prefix or spec.windowed) and model.spec.depth == 0:
        return f"{model.name} has no attention block"
    if spec.windowed and not model.spec.hierarchical:
        return f"{model.name} does not attend in windows (window_attention is for Swin); use attention"
    if kind == "grad_rollout":
        return gradient_refusal(model)
    if spec.gradients and is_int8(model):
        return gradient_refusal_text(spec.label)
    if spec.captum and find_spec("captum") is None:
        return "captum is not installed (pip install captum)"
    return None


def default_kinds(model) -> tuple[str, ...]:
    """The cheap maps this model gives (one forward for all of them): the class token's three, or a windowed
    model's window attention; Integrated Gradients for a model that gives neither."""
    kinds = tuple(k for k in TRACE_KINDS if map_refusal(model, k) is None)
    return kinds or tuple(k for k in ("ig",) if map_refusal(model, k) is None)


def check_kinds(model, kinds: Sequence[str] | str) -> tuple[str, ...]:
    """The map kinds asked for, checked against the model.

    Raises:
        ExplanationError: an unknown kind, none at all, a repeated one, or one the model cannot produce (the
            message says why).
    """
    if kinds == "auto":
        kinds = default_kinds(model)
    names = tuple(k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if str(k).strip())
    if not names:
        raise ExplanationError(f"maps: name at least one map kind ({', '.join(MAP_KINDS)})")
    for name in names:
        if name not in MAP_KINDS:
            raise ExplanationError(f"maps: unknown map kind {name!r}; choose from {', '.join(MAP_KINDS)}")
        reason = map_refusal(model, name)
        if reason:
            raise ExplanationError(f"maps: {name!r} cannot be produced: {reason}")
    if len(set(names)) != len(names):
        raise ExplanationError(f"maps: a map kind is listed twice in {', '.join(names)}")
    return names


def patch_maps(model, images: Any, plan=None, kinds: Sequence[str] = ATTENTION_KINDS,
               targets: Sequence[int] | None = None, ig_steps: int = 16) -> dict[str, np.ndarray]:
    """The maps of ``kinds`` for a batch, of the model slimmed by ``plan``.

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        images: the model's input ``[B, C, H, W]`` (or PIL images).
        plan: the slimming plan (None: unslimmed).
        kinds: map kinds (:data:`MAP_KINDS`), or ``"auto"`` (:func:`default_kinds`).
        targets: one class per image (None: the unslimmed model's top-1).
        ig_steps: Integrated Gradients path steps.

    Returns:
        kind -> ``[B, rows, cols]`` float64.

    Raises:
        ExplanationError: a kind the model cannot produce.
    """
    from patchslim.explain.attention import cls_attention, rollout, window_attention
    from patchslim.explain.grad_rollout import gradient_rollout, targets_for
    from patchslim.plan import SlimPlan

    kinds = check_kinds(model, kinds)
    plan = plan or SlimPlan()
    x = model.preprocess(images).detach()
    targets = targets_for(model, x, targets)
    out: dict[str, np.ndarray] = {}
    wanted = [k for k in kinds if k in TRACE_KINDS]
    if wanted:
        if "grad_rollout" in wanted:
            result = gradient_rollout(model, x, plan, targets)
            trace = result.trace
            out["grad_rollout"] = result.grids
        else:
            from patchslim.engine import run

            trace = run(model, x, plan.with_attention("all"))
        batch = range(x.shape[0])
        if "attention" in wanted:
            out["attention"] = np.stack([cls_attention(trace, model.spec.depth - 1, index=i) for i in batch])
        if "rollout" in wanted:
            out["rollout"] = np.stack([rollout(trace, index=i) for i in batch])
        if "window_attention" in wanted:
            out["window_attention"] = np.stack([window_attention(trace, model.spec.depth - 1, index=i) for i in batch])
    for kind in ("ig", "occlusion"):
        if kind in kinds:
            out[kind] = attribution_maps(model, x, plan, kind, targets, ig_steps)
    return {k: out[k] for k in kinds}


def attribution_maps(model, x: torch.Tensor, plan, kind: str, targets: Sequence[int], ig_steps: int = 16,
                     rows_per_forward: int = 256) -> np.ndarray:
    """``[B, rows, cols]`` Integrated Gradients (``"ig"``) or occlusion (``"occlusion"``) per patch for a batch, in
    one captum call: the same maps as :func:`patchslim.explain.attribution.attribute` image by image (black
    baseline; NaN at patches the slimmed model dropped at its input), at a fraction of the calls.
    """
    from captum.attr import FeatureAblation, IntegratedGradients

    from patchslim.engine import run
    from patchslim.explain.attribution import (_Forward, baseline_tensor, batch_independent, patch_feature_mask,
                                               per_patch)
    from patchslim.quantize import refuse_gradients

    batch = int(x.shape[0])
    per_image = not batch_independent(model, x[:1], plan)
    target = torch.tensor(list(targets), dtype=torch.long, device=x.device)
    baseline = baseline_tensor(model, x, "black")
    if kind == "ig":
        refuse_gradients(model, "Integrated Gradients")
        forward = _Forward(model, plan, per_image, batch * (ig_steps + 2), None, x)
        with torch.enable_grad():
            pixels = IntegratedGradients(forward).attribute(x, baselines=baseline, target=target, n_steps=ig_steps,
                                                            internal_batch_size=max(1, rows_per_forward))
        grids = np.stack([per_patch(pixels[i], model) for i in range(batch)])
    else:
        mask = patch_feature_mask(model)
        forward = _Forward(model, plan, per_image, batch * (int(mask.max()) + 2), None, x, distinct=True,
                           grad=False)
        with torch.no_grad():
            pixels = FeatureAblation(forward).attribute(x, baselines=baseline, target=target, feature_mask=mask,
                                                        perturbations_per_eval=max(1, rows_per_forward // batch))
        ph, pw = model.spec.patch_size
        rows, cols = model.spec.grid_size
        grids = pixels[:, 0, ::ph, ::pw].detach().double().cpu().numpy()[:, :rows, :cols]
    if not plan.is_empty:  # NaN where the slimmed model never saw a patch (deciding as in the forwards above)
        plain = plan.with_attention(())
        seen = np.concatenate([run(model, part, plain).blocks[0].provenance.patch_mask().cpu().numpy()
                               for part in (x.split(1) if per_image else (x,))])
        grids = grids.reshape(batch, -1).copy()
        grids[~seen] = np.nan
    return grids.reshape(batch, *model.spec.grid_size)


def as_batch(values: np.ndarray | torch.Tensor, grid_size: tuple[int, int], batch: int, name: str) -> np.ndarray:
    """``[B, rows, cols]`` (or ``[B, N]``) -> ``[B, N]`` float64; one ``[rows, cols]`` map serves every image.

    Raises:
        ExplanationError: a map that does not fit the patch grid or the batch.
    """
    array = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    n = grid_size[0] * grid_size[1]
    if array.size == n:
        return np.broadcast_to(array.reshape(1, n), (batch, n))
    if array.ndim >= 1 and array.shape[0] == batch and array[0].size == n:
        return array.reshape(batch, n)
    raise ExplanationError(f"maps: {name!r} has shape {list(array.shape)}, expected [{batch}, {grid_size[0]}, "
                           f"{grid_size[1]}] (one value per patch of the {grid_size[0]}x{grid_size[1]} grid)")
