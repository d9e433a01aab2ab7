"""Pixel attributions with captum for the unslimmed and the slimmed model alike, summed per patch.

Two methods, each through captum's one interface (``attribute(inputs, target=...)``):

- Integrated Gradients (Sundararajan et al., ICML 2017) on the pixels of the model's input, summed over
  channels and the pixels of each patch (completeness makes the patch sums add up to
  ``f(x) - f(baseline)``). The slimmed forward is differentiable: the selection is a gather (a
  piecewise-constant choice, so gradients flow through the kept tokens and the merge weights).
- Feature ablation / occlusion with one feature per patch: :func:`patch_feature_mask` gives every pixel
  its patch's id, so each evaluation replaces one whole patch by the baseline.

"The slimmed model" is the plan applied to every evaluated input, as it would be deployed: a method that
scores patches re-decides on each perturbed or interpolated image. Each input is evaluated on its own
(never depending on the other images of a batch); plans whose decisions do depend on the batch
composition (a seeded random subset draws per row) are detected once and run image by image.

The target class defaults to the *unslimmed* model's prediction, so the maps before and after slimming
answer the same question. Baselines: ``"black"`` (pixel value 0, the background of ``fashion-vit``),
``"mean"`` (the normalization mean, i.e. zeros after normalization) or a tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from patchslim.models import LoadedModel
from patchslim.plan import SlimPlan
from patchslim.quantize import refuse_gradients

Progress = Callable[[int, int], None]


@dataclass
class Attribution:
    """Per-patch attributions of one image.

    Attributes:
        grid: ``[rows, cols]`` float64, the attribution summed over each patch's pixels and channels;
            NaN at patches the slimmed model dropped at its input (it never saw them; their attribution
            is 0 by construction).
        method: ``"integrated_gradients"`` or ``"occlusion"``.
        target: the class explained.
        seconds: wall time of the attribution.
        evaluations: model evaluations (rows of forward passes) it took; occlusion runs a row equal to another
            one (a patch that already held the baseline) once.
        convergence_delta: IG's completeness error (sum of attributions minus ``f(x) - f(baseline)``).
        pixels: ``[C, H, W]`` the pixel attributions (IG only, else None).
        plan: the plan of the model that was explained (empty: unslimmed).
    """

    grid: np.ndarray
    method: str
    target: int
    seconds: float
    evaluations: int
    convergence_delta: float | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)
    plan: SlimPlan | None = None


# --------------------------------------------------------------------------- the differentiable forward

def differentiable_logits(model: LoadedModel, images: torch.Tensor, plan: SlimPlan | None = None,
                          draws_for: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, classes]`` logits of the plan-driven forward with autograd on: ``run(..., grad=True)``; ``draws_for``
    as in :func:`patchslim.run` (the images whose random draws a seeded method uses)."""
    from patchslim.engine import run

    return run(model, images, plan, grad=True, draws_for=draws_for).logits


def batch_independent(model: LoadedModel, x: torch.Tensor, plan: SlimPlan) -> bool:
    """Whether the plan decides for every image alone (so captum may batch perturbations).

    Runs the image alone and twice in one batch and compares the token provenance and logits.
    """
    from patchslim.engine import run

    if plan.is_empty:
        return True
    one = run(model, x[:1], plan)
    two = run(model, x[:1].expand(2, *x.shape[1:]).contiguous(), plan)
    for single, pair in ((one.final_provenance, two.final_provenance),):
        a, b = single.dense(), pair.dense()
        if not (torch.equal(a[0], b[0]) and torch.equal(a[0], b[1])):
            return False
    return bool(torch.allclose(one.logits[0], two.logits[1], atol=1e-4, rtol=1e-4))


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``[R, ...]`` -> (indices of the first of each group of equal rows, ``[R]`` the group of every row), or None
    when every row differs. Exact equality: rows that are equal give equal logits, whatever else is in the batch."""
    flat = x.detach().reshape(x.shape[0], -1)
    _, inverse = torch.unique(flat, dim=0, return_inverse=True)
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    if groups == x.shape[0]:
        return None
    first = torch.full((groups,), x.shape[0], dtype=torch.long, device=inverse.device)
    first.scatter_reduce_(0, inverse, torch.arange(x.shape[0], device=inverse.device), reduce="amin")
    order = first.argsort()  # groups in the order of their first row
    rank = torch.empty_like(order)
    rank[order] = torch.arange(groups, device=order.device)
    return first[order], rank[inverse]


def plain_logits(model: LoadedModel, images: torch.Tensor, plan: SlimPlan | None = None,
                 draws_for: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, classes]`` logits of the plan-driven forward without autograd (occlusion needs no gradient, so it runs
    on int8 models too), as an ordinary tensor captum may combine with others."""
    from patchslim.engine import run

    return run(model, images, plan, draws_for=draws_for).logits.clone()


class _Forward:
    """The function captum calls: logits of the (slimmed) model, counting evaluations for progress.

    ``explained``: the ``[B, C, H, W]`` images being explained. captum lays its perturbed inputs out as copies of
    the batch (row ``i`` perturbs image ``i % B``), and every row draws the random numbers of the image it
    perturbs, so a seeded method (``random``) keeps that image's choice along the whole path or ablation.

    With ``distinct`` (no gradients), a row equal to another row of the call, or to a row of the first call (captum's
    evaluation of the inputs themselves), is not run again: occlusion of a patch that already holds the baseline
    (the black background of a canvas image) gives the input itself, whose logits are known, so its attribution is
    exactly 0. (Equal rows draw equal random numbers too: the draws are keyed by the image's content.)

    ``grad``: with autograd (Integrated Gradients), or without (occlusion only compares outputs).
    """

    def __init__(self, model: LoadedModel, plan: SlimPlan, per_image: bool, total: int, progress: Progress | None,
                 explained: torch.Tensor | None = None, distinct: bool = False, grad: bool = True):
        self.model, self.plan, self.per_image = model, plan.with_attention(()), per_image
        self.total, self.done, self.progress = total, 0, progress
        self.explained = None if explained is None else explained.detach()
        self.distinct, self.ran = distinct, 0
        self.logits = differentiable_logits if grad else plain_logits
        self.known: tuple[torch.Tensor, torch.Tensor] | None = None  # the first call's rows and logits

    def _draws_for(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.explained is None or x.shape[0] % self.explained.shape[0]:
            return None
        return self.explained.repeat(x.shape[0] // self.explained.shape[0], 1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        draws = self._draws_for(x)
        if self.distinct and not torch.is_grad_enabled():
            out = self._distinct(x, draws)
        else:
            out = self._run(x, draws)
        self.done += int(x.shape[0])
        if self.progress is not None:
            self.progress(min(self.done, self.total), max(self.total, self.done))
        return out

    def _run(self, rows: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        self.ran += int(rows.shape[0])
        if self.per_image and rows.shape[0] > 1:
            return torch.cat([self.logits(self.model, rows[i:i + 1], self.plan, None if draws is None else draws[i:i + 1])
                              for i in range(rows.shape[0])])
        return self.logits(self.model, rows, self.plan, draws)

    def _distinct(self, x: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        known_rows, known_out = self.known if self.known is not None else (x[:0], None)
        k = int(known_rows.shape[0])
        rows = torch.cat([known_rows, x.detach()]) if k else x.detach()
        groups = distinct_rows(rows)
        if groups is None:
            out = self._run(x, draws)
        else:
            first, group = groups  # groups in order of first sight: the known ones come first
            new = first[first >= k] - k
            fresh = self._run(x[new], None if draws is None else draws[new]) if new.numel() else known_out[:0]  # every row known: nothing to run
            out = torch.cat([known_out[first[first < k]], fresh])[group[k:]] if k else fresh[group]
        if self.known is None:
            self.known = (x.detach().clone(), out.detach())
        return out


def _input(model: LoadedModel, image: Any) -> torch.Tensor:
    x = model.preprocess(image)
    if x.shape[0] != 1:
        raise ValueError(f"attributions explain one image at a time, got a batch of {x.shape[0]}")
    return x.detach()


def baseline_tensor(model: LoadedModel, x: torch.Tensor, baseline: str | float | torch.Tensor = "black") -> torch.Tensor:
    """The baseline input, in the model's normalized space, shaped like ``x``.

    Args:
        baseline: ``"black"`` (pixels 0), ``"mean"`` (the dataset mean: zeros after normalization),
            a pixel value in [0, 1], or a tensor shaped like the input.
    """
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x.device, x.dtype).expand_as(x).contiguous()
    mean = torch.tensor(model.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(model.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if baseline == "mean":
        return torch.zeros_like(x)
    value = 0.0 if baseline == "black" else float(baseline)
    return ((value - mean) / std).expand_as(x).contiguous()


def default_target(model: LoadedModel, x: torch.Tensor) -> int:
    """The unslimmed model's predicted class for ``x``."""
    from patchslim.engine import run

    return int(run(model, x).logits[0].argmax())


# --------------------------------------------------------------------------- patches

def patch_feature_mask(model: LoadedModel) -> torch.Tensor:
    """``[1, 1, H, W]`` int64: every pixel holds the id of its patch (raster order, as the tokens).

    Broadcast over channels, it gives captum one feature per patch covering every pixel exactly once.
    """
    rows, cols = model.spec.grid_size
    ph, pw = model.spec.patch_size
    h, w = model.spec.img_size
    ids = torch.arange(rows * cols, device=model.device).reshape(rows, cols)
    mask = ids.repeat_interleave(ph, 0).repeat_interleave(pw, 1)
    if mask.shape != (h, w):  # an image size that is not a multiple of the patch: the border is cut off
        mask = torch.nn.functional.pad(mask, (0, w - mask.shape[1], 0, h - mask.shape[0]), value=rows * cols - 1)
    return mask[None, None]


def per_patch(pixels: torch.Tensor | np.ndarray, model: LoadedModel, reduce: str = "sum") -> np.ndarray:
    """Pixel attributions ``[C, H, W]`` (or ``[1, C, H, W]``) summed per patch: ``[rows, cols]``.

    Args:
        reduce: ``"sum"`` (signed; keeps IG's completeness) or ``"abs"`` (sum of absolute values).
    """
    a = torch.as_tensor(pixels).detach().double().cpu()
    if a.dim() == 4:
        a = a[0]
    if reduce == "abs":
        a = a.abs()
    elif reduce != "sum":
        raise ValueError(f"reduce must be 'sum' or 'abs', got {reduce!r}")
    rows, cols = model.spec.grid_size
    ph, pw = model.spec.patch_size
    a = a.sum(0)[: rows * ph, : cols * pw]
    return a.reshape(rows, ph, cols, pw).sum(dim=(1, 3)).numpy()


# --------------------------------------------------------------------------- the attributions

def integrated_gradients(model: LoadedModel, image: Any, plan: SlimPlan | None = None, target: int | None = None,
                         n_steps: int = 16, internal_batch_size: int = 8, baseline: Any = "black",
                         reduce: str = "sum", progress: Progress | None = None) -> Attribution:
    """Integrated Gradients of one image, summed per patch.

    Args:
        model: the model.
        image: a PIL image or the model's input ``[1, C, H, W]``.
        plan: the slimming plan (None: the unslimmed model).
        target: class to explain (None: the unslimmed model's prediction).
        n_steps: points on the path from the baseline (Gauss-Legendre); 16 keeps the completeness
            error small for ViTs at a few seconds per image on a CPU.
        internal_batch_size: path points evaluated per forward.
        baseline: see :func:`baseline_tensor`.
        reduce: ``"sum"`` or ``"abs"`` per patch.
        progress: called as ``progress(done, total)`` after each forward.
    """
    from captum.attr import IntegratedGradients

    refuse_gradients(model, "Integrated Gradients")
    plan = plan or SlimPlan()
    x = _input(model, image)
    target = default_target(model, x) if target is None else int(target)
    started = time.perf_counter()
    # captum evaluates the n_steps path points, then the input and the baseline for the completeness check
    forward = _Forward(model, plan, not batch_independent(model, x, plan), n_steps + 2, progress, x)
    ig = IntegratedGradients(forward)
    with torch.enable_grad():
        pixels, delta = ig.attribute(x, baselines=baseline_tensor(model, x, baseline), target=target,
                                     n_steps=n_steps, internal_batch_size=internal_batch_size,
                                     return_convergence_delta=True)
    return Attribution(_mark_unseen(per_patch(pixels, model, reduce), model, x, plan), "integrated_gradients", target,
                       time.perf_counter() - started, forward.done, float(delta.abs().max()),
                       pixels[0].detach().cpu().numpy(), plan)


def occlusion(model: LoadedModel, image: Any, plan: SlimPlan | None = None, target: int | None = None,
              baseline: Any = "black", perturbations_per_eval: int = 16,
              progress: Progress | None = None) -> Attribution:
    """Feature ablation with one feature per patch: the drop in the target's logit when the patch is
    replaced by the baseline (positive: the patch was evidence for the class).

    Args:
        model, image, plan, target, baseline: as in :func:`integrated_gradients`.
        perturbations_per_eval: patches ablated per forward.
        progress: called as ``progress(done, total)`` after each forward.
    """
    from captum.attr import FeatureAblation

    plan = plan or SlimPlan()
    x = _input(model, image)
    target = default_target(model, x) if target is None else int(target)
    started = time.perf_counter()
    mask = patch_feature_mask(model)
    total = 1 + int(mask.max()) + 1
    forward = _Forward(model, plan, not batch_independent(model, x, plan), total, progress, x, distinct=True,
                       grad=False)
    ablation = FeatureAblation(forward)
    with torch.no_grad():
        pixels = ablation.attribute(x, baselines=baseline_tensor(model, x, baseline), target=target,
                                    feature_mask=mask, perturbations_per_eval=perturbations_per_eval)
    # every pixel of a patch carries the patch's value: read one pixel per patch
    ph, pw = model.spec.patch_size
    grid = pixels[0, 0, ::ph, ::pw].detach().double().cpu().numpy()[: model.spec.grid_size[0], : model.spec.grid_size[1]]
    return Attribution(_mark_unseen(grid, model, x, plan), "occlusion", target, time.perf_counter() - started,
                       forward.ran, None, None, plan)


def _mark_unseen(grid: np.ndarray, model: LoadedModel, x: torch.Tensor, plan: SlimPlan) -> np.ndarray:
    """NaN at the patches the slimmed model never saw for this image (dropped before block 0). A model whose
    dropped tokens come back (Swin: a token that sits a block out is carried to the next) sees every patch."""
    if plan.is_empty or not getattr(model.adapter, "token_removal", True):
        return grid
    from patchslim.engine import run

    seen = run(model, x, plan.with_attention(())).blocks[0].provenance.patch_mask()[0].cpu().numpy()
    grid = grid.copy()
    grid.ravel()[~seen] = np.nan
    return grid


ATTRIBUTIONS = {"ig": integrated_gradients, "occlusion": occlusion}


def attribute(model: LoadedModel, image: Any, method: str = "ig", plan: SlimPlan | None = None,
              **kwargs: Any) -> Attribution:
    """One entry for both: ``method`` is ``"ig"`` or ``"occlusion"``."""
    if method not in ATTRIBUTIONS:
        raise ValueError(f"attribution method must be one of {', '.join(ATTRIBUTIONS)}, got {method!r}")
    return ATTRIBUTIONS[method](model, image, plan, **kwargs)
