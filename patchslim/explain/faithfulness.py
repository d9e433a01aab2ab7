"""Deletion and insertion scores: does a map rank first the patches the model's answer rests on?

The perturbation tests of Petsiuk, Das & Saenko (RISE, BMVC 2018), per patch. A map ranks the N patches; with
S steps, step s = 0..S removes the map's top ``c_s = round(s N / S)`` patches (**deletion**) or shows only them
(**insertion**), and reads the probability of the target class. A score is the area under that curve against
the share ``c_s / N`` (trapezoids; in [0, 1]). Deletion: lower is better (the probability falls as soon as the
top patches go); insertion: higher is better. The reference is the mean over a few seeded *random* rankings of
the same image: a map is worth its name where it beats random.

Two ways to remove a patch (``mode``):

- ``token``: its token is dropped at the input with a :class:`~patchslim.plan.KeepSet`, so the model never sees
  pixels that were not in the image; insertion starts from the prefix tokens alone. It applies only where a
  dropped token leaves the model for good (:attr:`~patchslim.adapters.base.Adapter.token_removal`); elsewhere
  it is refused with the reason.
- ``pixel``: its pixels are replaced by a Gaussian blur of the image (sigma about one patch); insertion starts
  from the fully blurred image. Works for any model, at the price of images the model never saw in training.

Before and after slimming: the slimmed model is the plan applied to every perturbed input, as it would be
deployed (a content-based method re-decides on each). In token mode the keep set acts first, then the plan's
stages; when no patch token is left there is nothing to slim and the prefix tokens go on alone. A model that
pools its patch tokens (no class token) cannot run on none: its curves' empty end keeps one patch.

Cost: one batched forward per curve point, for any number of maps and images: rows are images x rankings,
chunked to ``batch_size`` rows. The ends are the same for every ranking (the whole image; no patch), and
deletion's start is insertion's end, so a deletion and an insertion curve of S steps cost ``2 S`` forwards per
chunk (:attr:`Curves.forwards`; one more for a model that pools its patch tokens), plus one for the target
classes when none are given.

The curve and area math are pure NumPy functions; :func:`perturbation_curves` runs the forwards;
:func:`score_maps` scores several maps and the random reference on a batch; :func:`compare` does it for one
image before and after slimming, in every mode the model allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from patchslim.errors import ExplanationError, PlanError

MODES = ("token", "pixel")
DEFAULT_STEPS = 20
DEFAULT_RANDOM_ORDERS = 5
MIN_STEPS = 2
CURVES = ("deletion", "insertion")
RANDOM = "random"


# --------------------------------------------------------------------------- pure math

def check_steps(steps: Any, num_patches: int) -> int:
    """``steps`` as an int in ``[2, N]`` (each step moves at least one patch; two steps give a curve).

    Raises:
        ExplanationError: out of range or not an integer.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ExplanationError(f"steps must be an integer in {MIN_STEPS}..{num_patches}, got {steps!r}")
    if not MIN_STEPS <= int(steps) <= num_patches:
        raise ExplanationError(f"steps must be in {MIN_STEPS}..{num_patches} (the model has {num_patches} patches; "
                               f"each step moves at least one), got {steps}")
    return int(steps)


def removal_counts(num_patches: int, steps: int) -> np.ndarray:
    """``[S + 1]`` int: patches removed (deletion) or shown (insertion) at each step, ``round(s N / S)``."""
    return np.floor(np.arange(steps + 1) * num_patches / steps + 0.5).astype(np.int64)


def patch_order(values: np.ndarray) -> np.ndarray:
    """``[..., N]`` values -> ``[..., N]`` patch indices from the most to the least important.

    NaN (a patch the model never saw) ranks last; ties keep raster order.
    """
    values = np.asarray(values, dtype=np.float64)
    key = np.where(np.isfinite(values), -values, np.inf)
    return np.argsort(key, axis=-1, kind="stable")


def random_rankings(num_patches: int, count: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    """``[batch, count, N]`` seeded random rankings (the same for the same seed, batch and count)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.permutation(num_patches) for _ in range(count)]) for _ in range(batch)]) \
        if count else np.zeros((batch, 0, num_patches), dtype=np.int64)


def curve_area(fractions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Area under ``values`` (``[..., S + 1]``) against ``fractions`` (``[S + 1]``), by trapezoids."""
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    return ((y[..., 1:] + y[..., :-1]) * np.diff(x) / 2).sum(-1)


def kept_positions(order: torch.Tensor, count: int, curve: str) -> torch.Tensor:
    """The patches present at a step: deletion keeps ``order[count:]``, insertion ``order[:count]``; sorted."""
    kept = order[:, count:] if curve == "deletion" else order[:, :count]
    return kept.sort(dim=1).values


# --------------------------------------------------------------------------- removing patches

def mode_refusal(model, mode: str) -> str | None:
    """Why ``mode`` does not apply to ``model``, or None when it does."""
    if mode == "token" and not getattr(model.adapter, "token_removal", True):
        return (f"token mode does not apply to {model.name}: a token its plans drop still flows through later "
                "blocks, so dropping a patch's token does not remove the patch; use pixel mode")
    return None


def check_mode(model, mode: str) -> str:
    """Raises :class:`ExplanationError` for an unknown mode or one the model's architecture refuses."""
    if mode not in MODES:
        raise ExplanationError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    reason = mode_refusal(model, mode)
    if reason:
        raise ExplanationError(reason)
    return mode


def resolve_modes(model, modes: str | Sequence[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """``"both"`` / ``"auto"`` (every mode the model allows), ``"token,pixel"``, ``"pixel"``... -> (modes to run,
    mode -> reason for the ones ``auto`` left out).

    Raises:
        ExplanationError: an unknown mode, or a mode named explicitly that the model refuses.
    """
    names = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if str(m).strip()]
    if names in (["both"], ["auto"]):
        refused = {m: r for m in MODES if (r := mode_refusal(model, m))}
        return tuple(m for m in MODES if m not in refused), refused
    if not names:
        raise ExplanationError(f"mode: name at least one of {', '.join(MODES)}")
    return tuple(dict.fromkeys(check_mode(model, m) for m in names)), {}


def blur_sigma_for(model, blur_sigma: float | None) -> float:
    """The blur's sigma in pixels: as given, else one patch (the mean of its height and width)."""
    if blur_sigma is None:
        return float(sum(model.spec.patch_size)) / 2
    sigma = float(blur_sigma)
    if not sigma > 0 or math.isinf(sigma):
        raise ExplanationError(f"blur_sigma must be a positive number of pixels, got {blur_sigma!r}")
    return sigma


def blurred(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of the model's input ``[B, C, H, W]`` (torchvision's, reflected at the borders).

    The input is normalized per channel; the blur's kernel sums to 1, so blurring it equals normalizing the
    blurred image. The kernel reaches 3 sigma, shortened to fit an image smaller than that.
    """
    from torchvision.transforms.v2.functional import gaussian_blur

    height, width = x.shape[-2:]
    size = 2 * math.ceil(3 * sigma) + 1
    largest = 2 * min(height, width) - 1  # reflection needs a padding smaller than the image
    size = min(size, largest if largest % 2 else largest - 1)
    return gaussian_blur(x, [size, size], [sigma, sigma])


def pixel_ids(model, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[H, W]`` int64: the patch id of every pixel (:func:`patchslim.explain.attribution.patch_feature_mask`)."""
    from patchslim.explain.attribution import patch_feature_mask

    return patch_feature_mask(model)[0, 0].to(device)


def checked_images(model, images: Any) -> torch.Tensor:
    """The model's input for ``images`` (PIL images or a tensor of the model's size).

    Raises:
        ExplanationError: a tensor that is not ``[B, C, H, W]`` of the model's input size (e.g. an image smaller
            than the patch grid).
    """
    try:
        x = model.preprocess(images)
    except (ValueError, TypeError) as exc:
        raise ExplanationError(f"images: {exc}") from None
    if x.shape[0] == 0:
        raise ExplanationError("images: the batch is empty")
    return x.detach()


# --------------------------------------------------------------------------- curves

@dataclass(frozen=True)
class Curves:
    """Deletion and insertion curves of a batch under several rankings, one mode, one plan.

    Attributes:
        mode: ``"token"`` or ``"pixel"``.
        fractions: ``[S + 1]`` share of the patches removed (deletion) or shown (insertion) at each step.
        deletion, insertion: ``[B, K, S + 1]`` probability of the target class, per image and ranking.
        targets: ``[B]`` the class each image's curves follow.
        forwards: batched forwards the curves took.
    """

    mode: str
    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    targets: np.ndarray
    forwards: int

    def areas(self, curve: str) -> np.ndarray:
        """``[B, K]`` area under each ``"deletion"`` or ``"insertion"`` curve."""
        return curve_area(self.fractions, getattr(self, curve))


def _orders(orders: Any, batch: int, num_patches: int) -> np.ndarray:
    array = np.asarray(orders)
    if array.ndim == 2 and batch == 1:
        array = array[None]
    if array.ndim != 3 or array.shape[0] != batch or array.shape[2] != num_patches or array.shape[1] == 0:
        raise ExplanationError(f"orders must be [{batch}, K, {num_patches}] rankings of the patches, got shape "
                               f"{list(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ExplanationError(f"orders must hold patch indices (integers), got {array.dtype}")
    if not (np.sort(array, axis=-1) == np.arange(num_patches)).all():
        raise ExplanationError(f"orders: every ranking must list each of the {num_patches} patches once")
    return array.astype(np.int64)


def _target_probability(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    probs = logits.float().softmax(-1)
    return probs.gather(1, targets.to(probs.device).unsqueeze(1))[:, 0].detach().cpu().double().numpy()


def perturbation_curves(model, images: Any, orders: Any, plan=None, *, mode: str = "token",
                        steps: int = DEFAULT_STEPS, targets: Sequence[int] | None = None,
                        blur_sigma: float | None = None, batch_size: int = 512) -> Curves:
    """Deletion and insertion curves of ``images`` in the order of each ranking.

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        images: the model's input ``[B, C, H, W]`` (or PIL images).
        orders: ``[B, K, N]`` K rankings of the N patches per image, most important first (``[K, N]`` for
            one image); :func:`patch_order` makes one from a map.
        plan: the slimming plan applied to every perturbed input (None: unslimmed).
        mode: ``"token"`` or ``"pixel"``.
        steps: S, the curve has S + 1 points.
        targets: one class per image (None: the unslimmed model's top-1, one more forward).
        blur_sigma: pixel mode's blur in pixels (None: one patch).
        batch_size: rows (images x rankings) per forward.

    Raises:
        ExplanationError: bad steps, mode, orders, images, targets or batch size.
    """
    from patchslim.engine import run
    from patchslim.explain.grad_rollout import targets_for
    from patchslim.plan import KeepSet, SlimPlan

    plan = (plan or SlimPlan()).with_attention(())  # the curves read logits only: fused attention everywhere
    x = checked_images(model, images)
    batch, n = int(x.shape[0]), model.spec.num_patches
    steps = check_steps(steps, n)
    check_mode(model, mode)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExplanationError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = _orders(orders, batch, n)
    k = order.shape[1]
    target = torch.tensor(targets_for(model, x, targets), dtype=torch.long)
    sigma = blur_sigma_for(model, blur_sigma) if mode == "pixel" else None
    counts = removal_counts(n, steps)
    curves = {c: np.empty((batch, k, steps + 1)) for c in CURVES}
    forwards = 0
    chunk = max(1, batch_size // k)
    ids = pixel_ids(model, x.device) if mode == "pixel" else None
    for first in range(0, batch, chunk):
        xs = x[first:first + chunk]
        b = int(xs.shape[0])
        # row r = j * b + i is image i under ranking j, as a KeepSet repeats images
        rows = torch.as_tensor(order[first:first + chunk]).transpose(0, 1).reshape(k * b, n).to(x.device)
        row_targets = target[first:first + chunk].repeat(k)
        soft = blurred(xs, sigma) if mode == "pixel" else None
        part = slice(first, first + b)

        def probabilities(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
            return _target_probability(logits, targets).reshape(-1, b).T  # [b, rankings]

        # The ends are the same for every ranking: the whole image (deletion's start, insertion's end) and no
        # patch at all (deletion's end, insertion's start), one row per image each.
        full = probabilities(run(model, xs, plan).logits, row_targets[:b])
        curves["deletion"][part, :, 0] = curves["insertion"][part, :, steps] = full
        empty = _empty_logits(model, xs, soft, plan)
        forwards += 1 if empty is None else 2
        if empty is not None:
            curves["deletion"][part, :, steps] = curves["insertion"][part, :, 0] = probabilities(empty, row_targets[:b])
        else:  # a model that pools its patch tokens cannot run on none: each ranking keeps one patch there
            for curve, s, last in (("deletion", steps, rows[:, -1:]), ("insertion", 0, rows[:, :1])):
                logits = run(model, xs, SlimPlan((KeepSet(0, last.sort(1).values),), seed=plan.seed)).logits
                curves[curve][part, :, s] = probabilities(logits, row_targets)
                forwards += 1
        sharp = xs.repeat(k, 1, 1, 1) if mode == "pixel" else None
        soft = soft.repeat(k, 1, 1, 1) if mode == "pixel" else None
        for s, count in enumerate(counts.tolist()[1:-1], start=1):
            for curve in CURVES:
                kept = kept_positions(rows, count, curve)
                if mode == "token":
                    keep = SlimPlan((KeepSet(0, kept),) + tuple(plan.stages), seed=plan.seed)
                    logits = run(model, xs, keep).logits
                else:
                    present = torch.zeros(k * b, n, dtype=torch.bool, device=x.device)
                    present.scatter_(1, kept, True)
                    logits = run(model, torch.where(present[:, ids].unsqueeze(1), sharp, soft), plan).logits
                forwards += 1
                curves[curve][part, :, s] = probabilities(logits, row_targets)
    return Curves(mode, counts / n, curves["deletion"], curves["insertion"], target.numpy(), forwards)


def _empty_logits(model, xs: torch.Tensor, soft: torch.Tensor | None, plan) -> torch.Tensor | None:
    """Logits with no patch at all: the fully blurred image (pixel mode, under the plan), or the prefix tokens
    alone (token mode: nothing is left to slim); None when the model cannot run on no patch token (it pools its
    patch tokens)."""
    from patchslim.engine import run
    from patchslim.plan import KeepSet, SlimPlan

    if soft is not None:
        return run(model, soft, plan).logits
    none = torch.zeros(xs.shape[0], 0, dtype=torch.long, device=xs.device)
    try:
        return run(model, xs, SlimPlan((KeepSet(0, none),), seed=plan.seed)).logits
    except PlanError:
        return None



# --------------------------------------------------------------------------- scores of maps

@dataclass(frozen=True)
class MapScores:
    """Deletion and insertion scores of several maps, and of the random reference, on a batch (one mode, one plan).

    Attributes:
        mode: ``"token"`` or ``"pixel"``.
        steps: S.
        kinds: the maps scored, in order.
        deletion, insertion: kind -> ``[B]`` areas (deletion: lower is better; insertion: higher is better), and
            ``"random"`` -> ``[B]`` the mean over the random rankings.
        curves: the curves, rankings in the order of ``kinds`` then the random ones.
        random_orders: how many random rankings the reference averages.
    """

    mode: str
    steps: int
    kinds: tuple[str, ...]
    deletion: dict[str, np.ndarray]
    insertion: dict[str, np.ndarray]
    curves: Curves
    random_orders: int

    @property
    def forwards(self) -> int:
        return self.curves.forwards

    def curve(self, kind: str, curve: str, index: int = 0) -> np.ndarray:
        """``[S + 1]`` the ``curve`` (``"deletion"`` / ``"insertion"``) of one map kind (``"random"``: the mean of
        the random rankings' curves) for image ``index``."""
        values = getattr(self.curves, curve)[index]
        if kind == RANDOM:
            return values[len(self.kinds):].mean(0)
        return values[self.kinds.index(kind)]

    def image(self, index: int = 0) -> dict:
        """One image's scores and curves as plain numbers (for JSON)."""
        names = (*self.kinds, RANDOM) if self.random_orders else self.kinds
        return dict(
            mode=self.mode, steps=self.steps, random_orders=self.random_orders,
            fractions=[float(f) for f in self.curves.fractions],
            maps={kind: dict(deletion=float(self.deletion[kind][index]), insertion=float(self.insertion[kind][index]),
                             deletion_curve=[float(v) for v in self.curve(kind, "deletion", index)],
                             insertion_curve=[float(v) for v in self.curve(kind, "insertion", index)])
                  for kind in names},
        )


def score_maps(model, images: Any, maps: Mapping[str, Any], plan=None, *, mode: str = "token",
               steps: int = DEFAULT_STEPS, targets: Sequence[int] | None = None,
               random_orders: int = DEFAULT_RANDOM_ORDERS, seed: int = 0, blur_sigma: float | None = None,
               batch_size: int = 512) -> MapScores:
    """Deletion and insertion scores of each map, beside the mean of ``random_orders`` random rankings.

    All rankings of a batch share each curve point's forward (:func:`perturbation_curves`).

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        images: the model's input ``[B, C, H, W]`` (or PIL images).
        maps: kind -> ``[B, rows, cols]`` (``[rows, cols]``: the same map for every image), NaN ranking last; maps of the model
            as slimmed by ``plan`` (e.g. :func:`patchslim.explain.maps.patch_maps`).
        plan, mode, steps, targets, blur_sigma, batch_size: as in :func:`perturbation_curves`.
        random_orders: random rankings for the reference (0: none).
        seed: seeds the random rankings (the same seed gives the same rankings before and after slimming).

    Raises:
        ExplanationError: no map, a map that does not fit the grid, a negative ``random_orders``, or what
            :func:`perturbation_curves` refuses.
    """
    from patchslim.explain.maps import as_batch

    x = checked_images(model, images)
    batch, n = int(x.shape[0]), model.spec.num_patches
    if not maps:
        raise ExplanationError("maps: give at least one map to score")
    if isinstance(random_orders, bool) or not isinstance(random_orders, int) or random_orders < 0:
        raise ExplanationError(f"random_orders must be a non-negative integer, got {random_orders!r}")
    kinds = tuple(maps)
    ranked = np.stack([patch_order(as_batch(maps[k], model.spec.grid_size, batch, k)) for k in kinds], axis=1)
    orders = np.concatenate([ranked, random_rankings(n, random_orders, batch, seed)], axis=1)
    curves = perturbation_curves(model, x, orders, plan, mode=mode, steps=steps, targets=targets,
                                 blur_sigma=blur_sigma, batch_size=batch_size)
    areas = {c: curves.areas(c) for c in CURVES}
    scores = {c: {kind: areas[c][:, j] for j, kind in enumerate(kinds)} for c in CURVES}
    if random_orders:
        for c in CURVES:
            scores[c][RANDOM] = areas[c][:, len(kinds):].mean(1)
    return MapScores(mode, curves.fractions.size - 1, kinds, scores["deletion"], scores["insertion"], curves,
                     random_orders)


# --------------------------------------------------------------------------- one image, before and after

PHASES = ("before", "after")


@dataclass
class Faithfulness:
    """Deletion and insertion scores of one image's maps, before and after slimming.

    Attributes:
        target: the class the curves follow (the unslimmed model's top-1 unless one was chosen).
        steps: S.
        scores: ``(phase, mode)`` -> the scores; phase ``"before"`` is the unslimmed model with its maps,
            ``"after"`` the slimmed model with the slimmed model's maps.
        refused: mode -> why the model's architecture does not support it (left out).
        forwards: batched forwards, all scores together.
    """

    target: int
    steps: int
    scores: dict[tuple[str, str], MapScores]
    refused: dict[str, str] = field(default_factory=dict)
    forwards: int = 0

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(mode for _, mode in self.scores))

    def rows(self) -> list[dict]:
        """One row per (mode, map kind) with the deletion and insertion scores before and after slimming."""
        rows = []
        for mode in self.modes:
            before, after = self.scores[("before", mode)], self.scores[("after", mode)]
            names = tuple(dict.fromkeys((*before.kinds, *after.kinds)))
            names += (RANDOM,) if before.random_orders else ()
            for kind in names:
                row = dict(mode=mode, map=kind)
                for phase, scores in (("before", before), ("after", after)):
                    for curve in CURVES:
                        table = getattr(scores, curve)
                        row[f"{curve}_{phase}"] = float(table[kind][0]) if kind in table else float("nan")
                rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return dict(target=self.target, steps=self.steps, forwards=self.forwards, refused=dict(self.refused),
                    rows=[{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                          for r in self.rows()],
                    curves={f"{phase}/{mode}": s.image(0) for (phase, mode), s in self.scores.items()})


def compare(model, image: Any, plan, maps_before: Mapping[str, Any], maps_after: Mapping[str, Any], *,
            modes: str | Sequence[str] = "both", steps: int = DEFAULT_STEPS, target: int | None = None,
            random_orders: int = DEFAULT_RANDOM_ORDERS, seed: int = 0, blur_sigma: float | None = None,
            batch_size: int = 512) -> Faithfulness:
    """Scores one image's maps before slimming (unslimmed model) and after (the model slimmed by ``plan``).

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        image: a PIL image or the model's input ``[1, C, H, W]``.
        plan: the slimming plan (None: before and after are the same model).
        maps_before, maps_after: kind -> ``[rows, cols]`` maps of the unslimmed and the slimmed model.
        modes: ``"both"`` (every mode the architecture allows; the others are listed in ``refused``),
            ``"token"``, ``"pixel"`` or a list.
        steps, random_orders, seed, blur_sigma, batch_size: as in :func:`score_maps`.
        target: the class (None: the unslimmed model's top-1).

    Raises:
        ExplanationError: bad parameters, or a mode named explicitly that the architecture refuses.
    """
    from patchslim.explain.grad_rollout import targets_for
    from patchslim.plan import SlimPlan

    x = checked_images(model, image)
    if x.shape[0] != 1:
        raise ExplanationError(f"images: compare scores one image, got a batch of {x.shape[0]}")
    run_modes, refused = resolve_modes(model, modes)
    check_steps(steps, model.spec.num_patches)
    chosen = targets_for(model, x, target)
    scores = {}
    for mode in run_modes:
        for phase, phase_plan, maps in (("before", SlimPlan(), maps_before), ("after", plan or SlimPlan(), maps_after)):
            scores[(phase, mode)] = score_maps(model, x, maps, phase_plan, mode=mode, steps=steps, targets=chosen,
                                               random_orders=random_orders, seed=seed, blur_sigma=blur_sigma,
                                               batch_size=batch_size)
    return Faithfulness(chosen[0], steps, scores, refused, sum(s.forwards for s in scores.values()))
