"""What the pages compute, as plain functions of the engine (no Streamlit here, no math of our own).

Each page asks this module for data and draws it. Keeping the computing apart from the drawing lets
``benchmarks/app_latency.py`` time exactly what a page does on a slider change, and lets the tests
compare the page's readouts with direct calls to :func:`patchslim.run`.

Views draw what this module hands them (pictures, numbers, figures) and never call the engine themselves.
Nothing here imports another app module, and nothing here catches an error to hide it: a page draws each part
inside :class:`app.panels.panel`, which shows the error in that part and logs it.
The model loads, forwards and drawings of the interactive pages run on one long-lived thread
(:func:`on_compute_thread`, which says why); the page's script thread waits for them.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

import patchslim
from patchslim import bundled, explain, vis
from patchslim.device import bytes_per_element, synchronize
from patchslim.explain import attention, faithfulness, maps
from patchslim.metrics import flops, latency, memory

# CC0 / public-domain photos shipped inside the scikit-image wheel, with the credit scikit-image gives.
PHOTOS = (
    ("chelsea", "Chelsea the cat", "Stefan van der Walt, CC0"),
    ("coffee", "A cup of coffee", "Rachel Michetti, CC0"),
    ("rocket", "SpaceX DSCOVR launch", "SpaceX, public domain"),
    ("astronaut", "Astronaut Eileen Collins", "NASA, public domain"),
    ("camera", "Man with a camera", "Lav Varshney, CC0"),
)
BUNDLED_GALLERY_SIZE = 12

PLAN_REFUSAL = "This plan cannot run"  # how a page opens its message for a plan the engine refuses


# --------------------------------------------------------------------------- the compute thread

COMPUTE_THREAD = "patchslim-compute"
_COMPUTE = ThreadPoolExecutor(max_workers=1, thread_name_prefix=COMPUTE_THREAD)


def on_compute_thread(fn: Callable) -> Callable:
    """``fn`` run on the process's one compute thread, the caller waiting for it (inline when already there).

    Why: PyTorch's CPU operations run on a team of OpenMP threads that belongs to the thread calling them, and
    Streamlit runs every rerun in a new script thread. Measured on a 2-core machine (DeiT-S, one image, medians of
    interleaved runs, ``torch.set_num_threads(2)``): the unslimmed forward took 54 ms when one long-lived thread
    made every call and 65 ms when each ran in a fresh thread (``random`` at rho 0.5: 34 against 37, ``tome``: 56
    against 70), and 70 to 97 ms once a second long-lived thread had run PyTorch too (two teams of two threads on
    two cores). So the interactive pages' model loads, forwards and drawings all run here, one at a time (there
    are two cores to run them on anyway), and the script threads only wait. Attributions, benchmarks and audits,
    which report progress to their page while they run, stay in their script thread.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if threading.current_thread().name.startswith(COMPUTE_THREAD):
            return fn(*args, **kwargs)
        return _COMPUTE.submit(fn, *args, **kwargs).result()

    return run


@on_compute_thread
def load_model(name: str, **kwargs) -> patchslim.LoadedModel:
    """:func:`patchslim.load_model` on the compute thread."""
    return patchslim.load_model(name, **kwargs)


@on_compute_thread
def model_input(model: patchslim.LoadedModel, image: Image.Image) -> torch.Tensor:
    """The image through the model's transform (``[1, C, H, W]`` on its device)."""
    return model.preprocess(image)


# --------------------------------------------------------------------------- galleries

@dataclass(frozen=True)
class GalleryItem:
    """One gallery image: its name, the image and its true label (None when it has none)."""

    name: str
    image: Image.Image
    label: str | None
    credit: str


def bundled_gallery() -> list[GalleryItem]:
    """Canvas Fashion-MNIST test images with their true labels (for the bundled model)."""
    try:
        images, labels = bundled.load_bundled_sample()
        credit = "Fashion-MNIST test set on a 48x48 canvas (MIT licence), shipped in patchslim/assets/"
    except FileNotFoundError:
        images, labels = bundled.canvas_test_set()
        credit = "Fashion-MNIST test set on a 48x48 canvas (MIT licence)"
    items = []
    seen: dict[int, int] = {}
    for index in range(len(images)):  # one or two of each class, in test-set order
        label = int(labels[index])
        if seen.get(label, 0) >= 2 or len(items) >= BUNDLED_GALLERY_SIZE:
            continue
        seen[label] = seen.get(label, 0) + 1
        name = bundled.CLASS_NAMES[label]
        items.append(GalleryItem(f"test image {index}: {name}", Image.fromarray(images[index], "L"), name, credit))
    return items


def photo_gallery() -> list[GalleryItem]:
    """scikit-image's CC0 / public-domain sample photos (no ImageNet label of their own)."""
    from skimage import data

    items = []
    for func, title, credit in PHOTOS:
        array = getattr(data, func)()
        image = Image.fromarray(array).convert("RGB")
        items.append(GalleryItem(title, image, None, f"scikit-image sample `{func}` ({credit})"))
    return items


# --------------------------------------------------------------------------- forwards

@dataclass(frozen=True)
class Timed:
    """A trace and the wall time of the forward that made it (seconds: the fastest of
    :func:`live_timing_runs` runs; one run for a large model on a CPU).

    ``precision``: the model's precision (``"fp32"``, ``"bf16"``, ``"fp16"``), which sets the bytes per element
    of its activations (the trace's logits are fp32 whatever the precision).
    ``baseline_seconds``: for a slimmed forward of a small model, the unslimmed forward timed in the same
    moment, alternating with it (so both numbers saw the same machine); None otherwise.
    """

    trace: patchslim.Trace
    seconds: float
    precision: str
    baseline_seconds: float | None = None


def plan_for(method: str, keep_ratio: float, options: dict[str, Any] | None = None) -> patchslim.SlimPlan:
    """The one-stage plan the sidebar describes, keeping attention in every block for maps and rollout."""
    return patchslim.SlimPlan.from_options(method, keep_ratio, options, seed=0, attention_blocks="all")


def applicable_methods(model: patchslim.LoadedModel) -> tuple[list[str], dict[str, str]]:
    """The methods that apply to the model's architecture (registry order), and why each other one does not.

    A windowed model (Swin) takes only the methods that act window by window (``method.windowed``); the reason a
    method gives (``method.window_reason``) is what the engine would refuse its plan with.
    """
    usable, refused = [], {}
    for name in patchslim.method_names():
        slim = patchslim.get_method(name)
        if model.spec.hierarchical and not slim.windowed:
            refused[name] = slim.window_reason or "it does not act window by window"
        else:
            usable.append(name)
    return usable, refused


def refused_sentence(model: patchslim.LoadedModel, refused: dict[str, str]) -> str:
    """One line naming the methods that do not apply to ``model`` and why ("" when all apply)."""
    if not refused:
        return ""
    reasons = "; ".join(f"**{name}**: {reason}" for name, reason in refused.items())
    return f"Not offered for {model.name} ({model.spec.kind}, attention in windows): {reasons}."


def stage_label(spec, stage: int) -> str:
    """``stage 2: 14x14 tokens, 4 windows of 7x7, blocks 4-9`` (a hierarchical model's stage, for pickers)."""
    blocks = spec.stage_blocks(stage)
    shape = spec.blocks[blocks[0]]
    rows, cols = shape.grid
    windows = shape.windows
    span = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}"
    return (f"stage {stage}: {rows}x{cols} tokens, {windows} window{'s' if windows > 1 else ''} of "
            f"{shape.window[0]}x{shape.window[1]}, {span}")


def block_label(spec, block: int) -> str:
    """How the Explore page's block picker names a point of the forward (``block == depth``: after the last)."""
    if block == spec.depth:
        return "after the last block"
    if not spec.hierarchical:
        return f"entering block {block}"
    shape = spec.blocks[block]
    shifted = ", shifted windows" if any(shape.shift) else ""
    return f"block {block} (stage {shape.stage}, {shape.grid[0]}x{shape.grid[1]} tokens{shifted})"


def default_overlay_block(spec) -> int:
    """The block the Explore page's overlay opens on: after the last block for a ViT (what is left), the first
    block of the default stages for a windowed model (whose tokens all come back by the end)."""
    if spec.hierarchical and spec.default_stages:
        return spec.stage_blocks(spec.default_stages[0])[0]
    return spec.depth


def slimmed_blocks(trace: patchslim.Trace) -> list[int]:
    """The blocks where some stage of the plan acted, in order."""
    return sorted({record.block for record in trace.stages})


# The live latency readout times a forward more than once when that is cheap and keeps the fastest run. One
# run of a small model is a few ms, and a single sample of it is mostly noise: when another thread or process
# (the browser drawing the last rerun on the same cores, another session's forward) takes a core, PyTorch's
# intra-op threads wait for each other at every op, and a 4 ms forward of the bundled model was measured at
# 100-150 ms in the browser (the runs after it: 3-5 ms again). How many runs fit is decided from the model's
# unslimmed forward timed once at warm-up, not from the possibly disturbed first run: the bundled model gets
# 3 runs, DeiT-S on this CPU (about 65 ms) one, so a slider change still costs one slimmed forward. The
# Explore page's "Measure" expander does the careful, interleaved measurement.
LIVE_TIMING_BUDGET_S = 0.05
LIVE_TIMING_RUNS = 3
_TYPICAL_SECONDS: "weakref.WeakKeyDictionary[torch.nn.Module, float]" = weakref.WeakKeyDictionary()


def _warm_up(model: patchslim.LoadedModel, batch: torch.Tensor) -> float:
    """The model's typical unslimmed forward time, measured on its first use: one forward that pays the
    one-off costs (allocator, lazy initialization), then the fastest of two timed ones."""
    typical = _TYPICAL_SECONDS.get(model.model)
    if typical is None:
        patchslim.run(model, batch, patchslim.SlimPlan())
        typical = min(_clocked(model, batch, patchslim.SlimPlan())[1] for _ in range(2))
        typical = _TYPICAL_SECONDS.setdefault(model.model, typical)
    return typical


def _seen_unslimmed(model: patchslim.LoadedModel, seconds: float) -> None:
    """A faster unslimmed forward than the warm-up's (which may have run on a busy machine) lowers it."""
    if seconds < _TYPICAL_SECONDS.get(model.model, float("inf")):
        _TYPICAL_SECONDS[model.model] = seconds


def live_timing_runs(typical_seconds: float, forwards_per_run: int = 1) -> int:
    """How many runs the live readout takes when one run is ``forwards_per_run`` forwards of a model whose
    forward takes ``typical_seconds``."""
    cost = typical_seconds * forwards_per_run
    if cost <= 0:
        return LIVE_TIMING_RUNS
    return max(1, min(LIVE_TIMING_RUNS, int(LIVE_TIMING_BUDGET_S // cost)))


def _clocked(model: patchslim.LoadedModel, batch: torch.Tensor, plan: patchslim.SlimPlan):
    synchronize(model.device)
    start = time.perf_counter()
    trace = patchslim.run(model, batch, plan)
    synchronize(model.device)
    return trace, time.perf_counter() - start


def _timed_run(model: patchslim.LoadedModel, image: Image.Image | torch.Tensor, plan: patchslim.SlimPlan,
               with_baseline: bool = False) -> Timed:
    """The forward under ``plan``, timed as the live readout does; with ``with_baseline`` and a model cheap
    enough for several runs, the unslimmed forward is timed too, alternating with it."""
    batch = model.preprocess(image)
    typical = _warm_up(model, batch)
    if with_baseline and live_timing_runs(typical, 2) > 1:
        unslimmed = patchslim.SlimPlan(attention_blocks=plan.attention_blocks)
        runs, base_runs = [], []
        for _ in range(live_timing_runs(typical, 2)):
            base_runs.append(_clocked(model, batch, unslimmed)[1])
            trace, seconds = _clocked(model, batch, plan)
            runs.append(seconds)
        _seen_unslimmed(model, min(base_runs))
        return Timed(trace, min(runs), model.precision, baseline_seconds=min(base_runs))
    runs = []
    for _ in range(live_timing_runs(typical)):
        trace, seconds = _clocked(model, batch, plan)
        runs.append(seconds)
    if not plan.stages:
        _seen_unslimmed(model, min(runs))
    return Timed(trace, min(runs), model.precision)


@on_compute_thread
def baseline(model: patchslim.LoadedModel, image: Image.Image | torch.Tensor) -> Timed:
    """The unslimmed forward, attention kept in every block (``image``: a PIL image or the model's input)."""
    return _timed_run(model, image, patchslim.SlimPlan(attention_blocks="all"))


@on_compute_thread
def slimmed(model: patchslim.LoadedModel, image: Image.Image | torch.Tensor, method: str, keep_ratio: float,
            options: dict[str, Any] | None = None) -> Timed:
    """The forward under the sidebar's plan.

    Raises:
        PlanError: options or blocks that do not fit the method or the model.
    """
    return _timed_run(model, image, plan_for(method, keep_ratio, options), with_baseline=True)


def plan_at_budget(model: patchslim.LoadedModel, method: str, budget: float) -> "patchslim.BudgetSolution":
    """The method's plan (default options and placement) that costs ``budget`` of the unslimmed GMACs, keeping
    attention in every block as :func:`plan_for` does (the search itself is cached by the engine per model shape).

    Raises:
        BudgetError: a budget the method cannot reach at its default placement (the message gives what it can).
    """
    return patchslim.plan_for_budget(model, method, budget, attention_blocks="all")


@on_compute_thread
def slimmed_at_budget(model: patchslim.LoadedModel, image: Image.Image | torch.Tensor, method: str,
                      budget: float) -> Timed:
    """The forward under the method's plan at a compute budget (see :func:`plan_at_budget`).

    Raises:
        BudgetError: as :func:`plan_at_budget`.
    """
    return _timed_run(model, image, plan_at_budget(model, method, budget).plan)


# --------------------------------------------------------------------------- readouts

@dataclass(frozen=True)
class Costs:
    """What the plan costs and keeps for one image, unslimmed -> slimmed (the Explore page's numbers row).

    Attributes:
        gmacs_before, gmacs_after: analytic GMACs per image (patchslim.metrics.flops).
        latency_before, latency_after: measured seconds of one forward each.
        memory_before, memory_after: analytic activation memory in MB (patchslim.metrics.memory).
        keep_ratio_reached: ``Trace.keep_ratio``.
        tokens_before, tokens_after: tokens (prefix included) per block.
    """

    gmacs_before: float
    gmacs_after: float
    latency_before: float
    latency_after: float
    memory_before: float
    memory_after: float
    keep_ratio_reached: float
    tokens_before: list[int]
    tokens_after: list[int]

    @property
    def gmacs_reduction(self) -> float:
        return 1.0 - self.gmacs_after / self.gmacs_before


@dataclass(frozen=True)
class Prediction:
    """How the prediction changed for one image.

    Attributes:
        top5_before, top5_after: ``(label, probability)`` lists.
        flipped: whether the top-1 label changed.
        top1_confidence_before, top1_confidence_after: probability of the unslimmed top-1 class.
    """

    top5_before: list[tuple[str, float]]
    top5_after: list[tuple[str, float]]
    flipped: bool
    top1_confidence_before: float
    top1_confidence_after: float


@dataclass(frozen=True)
class Readouts:
    """Everything the Explore page reports for one image and plan (the downloads hold all of it)."""

    costs: Costs
    prediction: Prediction


def activation_mb(trace: patchslim.Trace, precision: str) -> float:
    """The analytic peak activation memory of the plan itself, per image, in MB.

    The bytes per element come from the model's precision (fp32: 4, bf16 / fp16: 2), not from the trace's
    logits, which the engine always returns as fp32. The app's forwards keep every block's attention for the
    maps; the estimate is taken for the same plan without those kept maps (``plan.with_attention(())``), i.e.
    what the slimmed model needs.
    """
    plain = replace(trace, plan=trace.plan.with_attention(()))
    return memory.estimate_activation_memory(plain, bytes_per_element(precision)).peak_mb


def costs(base: Timed, slim: Timed) -> Costs:
    """GMACs, latency, memory, rho reached and tokens per block of the two forwards."""
    comparison = flops.compare_macs(slim.trace, base.trace)
    return Costs(
        gmacs_before=comparison.baseline_gmacs,
        gmacs_after=comparison.gmacs,
        latency_before=base.seconds if slim.baseline_seconds is None else slim.baseline_seconds,
        latency_after=slim.seconds,
        memory_before=activation_mb(base.trace, base.precision),
        memory_after=activation_mb(slim.trace, slim.precision),
        keep_ratio_reached=slim.trace.keep_ratio,
        tokens_before=base.trace.tokens_per_block,
        tokens_after=slim.trace.tokens_per_block,
    )


def prediction(base: Timed, slim: Timed) -> Prediction:
    """The two top-5 lists, whether the top-1 label flipped and its confidence before and after."""
    probs_before, probs_after = base.trace.probabilities[0], slim.trace.probabilities[0]
    top1 = int(probs_before.argmax())
    return Prediction(
        top5_before=base.trace.top_k(5),
        top5_after=slim.trace.top_k(5),
        flipped=int(probs_after.argmax()) != top1,
        top1_confidence_before=float(probs_before[top1]),
        top1_confidence_after=float(probs_after[top1]),
    )


def readouts(base: Timed, slim: Timed) -> Readouts:
    """Everything the Explore page shows as numbers, from the two forwards."""
    return Readouts(costs(base, slim), prediction(base, slim))


@on_compute_thread
def display_view(model: patchslim.LoadedModel, pixels: torch.Tensor) -> Image.Image:
    """The image as the model sees it, enlarged for display (:func:`patchslim.vis.display_view`): what the overlay
    and the heatmaps are drawn on (``pixels``: the model's input tensor of the image)."""
    return vis.display_view(pixels, model)


@on_compute_thread
def overlay(model: patchslim.LoadedModel, pixels: torch.Tensor, trace: patchslim.Trace,
            block: int | None, view: Image.Image | None = None) -> Image.Image:
    """The kept / dropped / merged overlay (patchslim.vis) of the image, after ``block`` (None: the last).

    ``pixels``: the model's input tensor of the image (no resize on every redraw); ``view``: its
    :func:`display_view` when the caller keeps it (no transform either).
    """
    return vis.patch_overlay(pixels, model, trace, block=block, index=0, view=view)


@dataclass(frozen=True)
class AttentionView:
    """One way to look at attention: a function ``(trace, block) -> [rows, cols]`` grid with NaN at dropped
    patches, whether it depends on the block, and a caption for the page."""

    grid: Callable[[patchslim.Trace, int], np.ndarray]
    per_block: bool
    caption: str


ATTENTION_VIEWS = {
    "CLS attention": AttentionView(
        lambda trace, block: attention.cls_attention(trace, block),
        True,
        "CLS attention: how much the class token looks at each patch in the chosen block (mean over heads). "
        "Hatched patches had no token in that block.",
    ),
    "Rollout": AttentionView(
        lambda trace, block: attention.rollout(trace),
        False,
        "Attention rollout (Abnar & Zuidema 2020): attention multiplied through all blocks, following "
        "tokens through pruning and merging. Hatched patches never entered the model.",
    ),
}


WINDOW_ATTENTION_VIEWS = {
    "Attention received in the window": AttentionView(
        lambda trace, block: attention.window_attention(trace, block),
        True,
        "Attention received within the window: for each token of the chosen block, the mean attention the tokens "
        "of its window paid it (over heads and queries; a window's values sum to 1), spread over the patches it "
        "stands for. Hatched patches' tokens sat this block out.",
    ),
}


def attention_views(model: patchslim.LoadedModel) -> tuple[dict[str, AttentionView], str | None]:
    """The attention pictures ``model`` can give, and why CLS attention and rollout are not among them (None when
    they are: a model with a class token)."""
    refusal = attention.class_token_refusal(model.spec)
    if refusal is None:
        return ATTENTION_VIEWS, None
    return (WINDOW_ATTENTION_VIEWS if model.spec.hierarchical else {}), refusal


@dataclass(frozen=True)
class AttentionPair:
    """The unslimmed and the slimmed attention picture on one colour scale, and the caption."""

    before: Image.Image
    after: Image.Image
    caption: str


@on_compute_thread
def attention_pair(model: patchslim.LoadedModel, pixels: torch.Tensor, before: patchslim.Trace,
                   after: patchslim.Trace, kind: str, block: int, view: Image.Image | None = None) -> AttentionPair:
    """Attention map (or rollout) of the unslimmed and the slimmed forward, drawn on one colour scale (``view``: the
    image's :func:`display_view` when the caller keeps it)."""
    attention_view = {**ATTENTION_VIEWS, **WINDOW_ATTENTION_VIEWS}[kind]
    grids = [attention_view.grid(trace, block) for trace in (before, after)]
    lo = min(float(np.nanmin(g)) for g in grids)
    hi = max(float(np.nanmax(g)) for g in grids)
    picture = display_view(model, pixels) if view is None else view
    pictures = [vis.heatmap_overlay(picture, grid, vmin=lo, vmax=hi, legend=True, title=f"{kind}, {title}")
                for grid, title in zip(grids, ("unslimmed", "slimmed"))]
    return AttentionPair(pictures[0], pictures[1], attention_view.caption + " Both maps share one colour scale.")


# --------------------------------------------------------------------------- compare

@dataclass(frozen=True)
class MethodResult:
    """One method on the Compare page: its forward, or why it could not run."""

    method: str
    timed: Timed | None
    error: str = ""


@dataclass(frozen=True)
class MethodCard:
    """What the Compare page shows for one method: its overlay, top-1 and cost, or why it could not run.

    Attributes:
        method: the method's name.
        error: why the plan could not run ("" when it ran; then the other fields are set).
        overlay: the kept / dropped / merged overlay with its legend.
        label, probability: the slimmed top-1 class and its probability.
        flipped: the top-1 differs from the unslimmed model's.
        keep_ratio: the rho asked for (at a budget: the rho the method needed); keep_ratio_reached: the rho reached.
        gmacs, gmacs_reduction: GMACs per image and the share saved against the unslimmed forward.
        budget: the compute budget the plan was found for (None: compared at the same rho).
    """

    method: str
    error: str = ""
    overlay: Image.Image | None = None
    label: str = ""
    probability: float = 0.0
    flipped: bool = False
    keep_ratio: float = 0.0
    keep_ratio_reached: float = 0.0
    gmacs: float = 0.0
    gmacs_reduction: float = 0.0
    budget: float | None = None


@on_compute_thread
def method_cards(results: list[MethodResult], base: Timed, pixels: torch.Tensor,
                 model: patchslim.LoadedModel, budget: float | None = None,
                 view: Image.Image | None = None) -> list[MethodCard]:
    """One card per method (overlay drawn from ``pixels``, the model's input tensor of the image: after the last
    block for a ViT, the last block slimming acted in for a windowed model); ``budget``: the compute budget the
    plans were found for (None: they share one rho)."""
    base_label, _ = base.trace.top_k(1)[0]
    cards = []
    for result in results:
        if result.timed is None:
            cards.append(MethodCard(result.method, error=result.error))
            continue
        trace = result.timed.trace
        label, probability = trace.top_k(1)[0]
        comparison = flops.compare_macs(trace, base.trace)
        block = (slimmed_blocks(trace) or [None])[-1] if model.spec.hierarchical else None  # Swin: its last slimmed block
        picture = vis.patch_overlay(pixels, model, trace, block, legend=True, view=view)
        cards.append(MethodCard(result.method, overlay=picture, label=label, probability=probability,
                                flipped=label != base_label, keep_ratio=trace.plan.stages[0].keep_ratio, keep_ratio_reached=trace.keep_ratio,
                                gmacs=comparison.gmacs, gmacs_reduction=comparison.reduction, budget=budget))
    return cards


def unslimmed_gmacs(base: Timed) -> float:
    """GMACs per image of the unslimmed forward."""
    return flops.gmacs(base.trace)


CURVE_KEEP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@on_compute_thread
def flops_curve(model: patchslim.LoadedModel, image: Image.Image, method: str,
                keep_ratios: tuple[float, ...] = CURVE_KEEP_RATIOS) -> list[dict]:
    """GMACs and rho reached of one method (default options) across keep ratios, on this image.

    Returns:
        one dict per keep ratio that could run: ``keep_ratio``, ``keep_ratio_reached``, ``gmacs``.
    """
    batch = model.preprocess(image)
    points = []
    for rho in keep_ratios:
        try:
            trace = patchslim.run(model, batch, patchslim.SlimPlan.from_options(method, rho, {}, seed=0))
        except patchslim.PatchslimError:
            continue
        points.append(dict(method=method, keep_ratio=rho, keep_ratio_reached=trace.keep_ratio,
                           gmacs=flops.gmacs(trace)))
    return points


# --------------------------------------------------------------------------- explain

ATTRIBUTIONS = {"ig": "Integrated Gradients", "occlusion": "Occlusion (one patch at a time)"}


# The Explain page computes its attributions without a button press when they will be quick, and waits for the
# button otherwise. "Quick" is an estimate from the model's unslimmed forward time measured at warm-up (the same
# measurement that decides how many runs the live latency takes, :func:`typical_seconds`): that time, times the
# forward passes the attribution makes for the unslimmed and for the slimmed model (:func:`attribution_passes`),
# must stay within AUTO_EXPLAIN_BUDGET_S, about what a person waits for a page to open without wondering whether
# to press something. Batched rows cost less than forwards of one image, so the estimate errs on the long side.
# On this 2-core CPU the bundled model (about 4 ms a forward) estimates 0.5 s for Integrated Gradients and 1.2 s for
# occlusion, so both start at once; DeiT-S (about 60 ms) 7 s and 24 s, so they wait for the button.
AUTO_EXPLAIN_BUDGET_S = 2.0
BACKWARD_COST = 2  # a backward pass counted as two forwards (the usual rule of thumb for its extra products)


@on_compute_thread
def typical_seconds(model: patchslim.LoadedModel, image: Image.Image | torch.Tensor) -> float:
    """The model's unslimmed forward time of one image, measured once at warm-up (then only lowered by faster
    unslimmed runs, see :func:`_seen_unslimmed`)."""
    return _warm_up(model, model.preprocess(image))


def attribution_passes(model: patchslim.LoadedModel, attribution: str) -> int:
    """Forward passes (a backward counted as :data:`BACKWARD_COST` forwards) of one explanation: the attribution
    of the unslimmed and of the slimmed model (each as many rows as captum evaluates with the engine's defaults),
    and the gradient-weighted rollout of both (one forward and one backward each)."""
    import inspect

    from patchslim.explain import attribution as attributions

    if attribution == "ig":
        steps = inspect.signature(attributions.integrated_gradients).parameters["n_steps"].default
        per_model = (steps + 2) * (1 + BACKWARD_COST)  # the path points, the input and the baseline
    elif attribution == "occlusion":
        per_model = model.spec.num_patches + 1  # one row per ablated patch, and the input
    else:
        raise ValueError(f"attribution must be one of {sorted(ATTRIBUTIONS)}, got {attribution!r}")
    return 2 * per_model + 2 * (1 + BACKWARD_COST)


def explains_at_once(model: patchslim.LoadedModel, image: Image.Image | torch.Tensor, attribution: str) -> bool:
    """Whether the Explain page computes the attributions without waiting for its button (see
    :data:`AUTO_EXPLAIN_BUDGET_S`)."""
    return typical_seconds(model, image) * attribution_passes(model, attribution) <= AUTO_EXPLAIN_BUDGET_S


def attribution_choices(model: patchslim.LoadedModel) -> tuple[dict[str, str], str | None]:
    """The attributions this model can give (key -> label), and why Integrated Gradients is not among them (None
    when it is): an int8 model's layers give no input gradient; occlusion needs none."""
    from patchslim.explain.maps import map_refusal

    refusal = map_refusal(model, "ig")
    if refusal is None:
        return dict(ATTRIBUTIONS), None
    return {k: v for k, v in ATTRIBUTIONS.items() if k != "ig"}, refusal


def explanation(model: patchslim.LoadedModel, image: Image.Image, method: str, keep_ratio: float,
                options: dict[str, Any], attribution: str, share: float,
                progress: Callable[[int, int], None] | None = None):
    """Attributions before / after slimming and the kept evidence (patchslim.explain.explain).

    Raises:
        PlanError: the plan does not fit the model.
    """
    plan = patchslim.SlimPlan.from_options(method, keep_ratio, options, seed=0)
    return explain.explain(model, image, plan, attribution=attribution, share=share, progress=progress)


@on_compute_thread
def attribution_pictures(result, image: Image.Image, model: patchslim.LoadedModel) -> tuple[Image.Image, Image.Image]:
    """The unslimmed and the slimmed attribution maps over the image, on one colour scale centred on zero."""
    before, after = result.attribution_before, result.attribution_after
    grids = [a.grid for a in (before, after)]
    limit = max(float(np.nanmax(np.abs(g))) for g in grids) or 1.0
    first, second = (vis.heatmap_overlay(image, grid, vmin=-limit, vmax=limit, cmap="RdBu_r", legend=True,
                                         title=f"{before.method.replace('_', ' ')}, {title}", label="attribution",
                                         model=model)
                     for grid, title in zip(grids, ("unslimmed", "slimmed")))
    return first, second


@on_compute_thread
def grad_rollout_pictures(result, image: Image.Image, model: patchslim.LoadedModel) -> tuple[Image.Image, Image.Image] | None:
    """The unslimmed and the slimmed gradient-weighted rollout over the image, on one colour scale (None when the
    model cannot give it: ``result.grad_rollout_refused`` says why)."""
    if result.grad_rollout_before is None:
        return None
    grids = (result.grad_rollout_before, result.grad_rollout_after)
    finite = np.concatenate([g[np.isfinite(g)] for g in grids])
    top = float(finite.max()) if finite.size else 1.0
    first, second = (vis.heatmap_overlay(image, grid, vmin=0.0, vmax=top or 1.0, legend=True, label="relevance",
                                         title=f"gradient-weighted rollout, {title}", model=model)
                     for grid, title in zip(grids, ("unslimmed", "slimmed")))
    return first, second


# --------------------------------------------------------------------------- faithfulness

MAP_LABELS = {kind: spec.label for kind, spec in maps.MAP_KINDS.items()} | {faithfulness.RANDOM: "random (reference)"}
MODE_LABELS = {"token": "Dropping its token", "pixel": "Blurring its pixels"}


def faithfulness_modes(model: patchslim.LoadedModel) -> tuple[tuple[str, ...], dict[str, str]]:
    """The ways of removing a patch this model allows, and why the others do not apply."""
    return faithfulness.resolve_modes(model, "both")


@on_compute_thread
def faithfulness_scores(model: patchslim.LoadedModel, image: Image.Image, result, mode: str, steps: int):
    """Deletion and insertion scores of every map of an explanation, before and after slimming, in one mode
    (:func:`patchslim.explain.faithfulness.compare`).

    Raises:
        ExplanationError: a mode the model's architecture refuses, or steps out of range.
    """
    return faithfulness.compare(model, image, result.trace.plan, result.maps("before"), result.maps("after"),
                                modes=mode, steps=steps, target=result.target)


def faithfulness_rows(scored) -> list[dict]:
    """One row per map kind: the deletion and insertion scores before and after, with readable names."""
    return [dict(r, map=MAP_LABELS.get(r["map"], r["map"])) for r in scored.rows()]


def faithfulness_figure(scored, mode: str, phase: str = "after"):
    """A small plotly figure: the deletion and the insertion curve of every map (random dotted), for the unslimmed
    (``phase="before"``) or the slimmed model."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    scores = scored.scores[(phase, mode)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Deletion (lower is better)", "Insertion (higher is better)"))
    palette = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")
    kinds = (*scores.kinds, faithfulness.RANDOM) if scores.random_orders else scores.kinds
    x = scores.curves.fractions
    for i, kind in enumerate(kinds):
        line = dict(color="#777777", dash="dot") if kind == faithfulness.RANDOM else dict(color=palette[i % 5])
        for col, curve in enumerate(faithfulness.CURVES, start=1):
            area = float(getattr(scores, curve)[kind][0])
            fig.add_trace(go.Scatter(x=x, y=scores.curve(kind, curve), mode="lines", line=line,
                                     name=MAP_LABELS.get(kind, kind), legendgroup=kind, showlegend=col == 1,
                                     hovertemplate=f"{MAP_LABELS.get(kind, kind)}<br>area {area:.3f}<br>"
                                                   "%{x:.0%} of patches: p = %{y:.3f}<extra></extra>"),
                          row=1, col=col)
    fig.update_xaxes(title_text="share of patches removed", tickformat=".0%", row=1, col=1)
    fig.update_xaxes(title_text="share of patches shown", tickformat=".0%", row=1, col=2)
    fig.update_yaxes(title_text="probability of the class", range=[0, 1.02], row=1, col=1)
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=40, b=10), template="plotly_white",
                      legend=dict(orientation="h", y=-0.25))
    return fig


# --------------------------------------------------------------------------- benchmark

BENCHMARK_KEEP_RATIOS = (0.9, 0.7, 0.5, 0.3)


def benchmark(model: patchslim.LoadedModel, image: Image.Image, methods: list[str], keep_ratios: list[float],
              repeats: int = 10, progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Latency (patchslim.metrics.latency, interleaved with the unslimmed forward) and GMACs per plan.

    Returns:
        one row per (method, rho): the plan, GMACs, medians, measured and ideal speed-ups; a row with an
        ``error`` for plans that do not fit the model.
    """
    rows = []
    total = len(methods) * len(keep_ratios)
    for i, (method, rho) in enumerate((m, r) for m in methods for r in keep_ratios):
        if progress is not None:
            progress(i, total, f"{method} at ρ = {rho:g}")
        try:
            plan = patchslim.SlimPlan.from_options(method, rho, {}, seed=0)
            trace = patchslim.run(model, image, plan)
        except patchslim.PatchslimError as exc:
            rows.append(dict(method=method, keep_ratio=rho, error=str(exc)))
            continue
        timing = latency.compare_latency(model, image, plan, warmup=2, repeats=repeats)
        row = dict(method=method, keep_ratio=rho, keep_ratio_reached=trace.keep_ratio,
                   latency_ms=timing.slimmed.median_ms, latency_iqr_ms=timing.slimmed.iqr_ms,
                   baseline_ms=timing.baseline.median_ms, speedup=timing.speedup)
        macs = flops.compare_macs(trace)
        row.update(gmacs=macs.gmacs, baseline_gmacs=macs.baseline_gmacs, gmacs_reduction=macs.reduction,
                   ideal_speedup=macs.ideal_speedup, efficiency=timing.efficiency(macs.ideal_speedup))
        rows.append(row)
    if progress is not None:
        progress(total, total, "done")
    return rows


# --------------------------------------------------------------------------- audit

AUDIT_SOURCES = ("bundled", "zip", "folder")
AUDIT_BATCH_SIZE = 64


@dataclass
class AuditOutcome:
    """An audit the page ran: the report and the files it wrote, read back for the download buttons.

    Attributes:
        report: :class:`patchslim.audit.report.AuditReport`.
        files: file name -> bytes (``audit_groups.csv``, ``audit_disparity.csv``, ``audit_skipped.csv``,
            ``audit.json``, ``audit.html``).
        seconds: wall time of the audit.
    """

    report: Any
    files: dict[str, bytes]
    seconds: float


def audit_data(model: patchslim.LoadedModel, source: str, upload: bytes | None = None, folder: str | None = None,
               limit: int | None = None):
    """The labelled images of an audit (patchslim.data, as every command reads them): the bundled sample, an
    uploaded zip (read in memory, never extracted; traversal, absolute paths, zip bombs and duplicates are
    skipped and reported) or a folder / CSV manifest / zip on this server (any path: a web visitor's path goes
    through :func:`app.data_sources.load` instead, which keeps to the operator's data folder).

    Raises:
        PatchslimError / FileNotFoundError: nothing usable, with a message for the person.
    """
    from patchslim.data import load_labelled

    if source == "bundled":
        data = load_labelled("bundled", model)
    elif source == "zip":
        if not upload:
            raise patchslim.PatchslimError("no zip was uploaded")
        data = load_labelled(upload, model, name="uploaded zip")
    elif source == "folder":
        if not folder or not folder.strip():
            raise patchslim.PatchslimError("enter the path of a folder, a CSV manifest or a zip on this server")
        data = load_labelled(folder.strip(), model)
    else:
        raise ValueError(f"source must be one of {AUDIT_SOURCES}, got {source!r}")
    return data.subset(limit)


def audit_groupings(data) -> list[str]:
    """The groupings the page offers for this data (besides class, always reported)."""
    from patchslim.audit import sources

    offered = list(data.groupings)
    offered.append("brightness")
    if all(name in {c for fam in sources.FAMILIES.values() for c in fam} for name in data.class_names):
        offered.append("family")
    return offered


def run_audit(model: patchslim.LoadedModel, data, methods: list[str], keep_ratios: list[float],
              groupings: list[str], evidence: bool = False,
              progress: Callable[[int, int], None] | None = None) -> AuditOutcome:
    """Runs an audit in a temporary output folder (the only place it writes) and reads its files back.

    Raises:
        PatchslimError: a plan that does not fit the model, or bad data.
    """
    import tempfile
    from pathlib import Path

    from patchslim import audit

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="patchslim_audit_") as out:
        report = audit.run_audit(model, data, methods, keep_ratios, out, groupings=groupings, evidence=evidence,
                                 batch_size=AUDIT_BATCH_SIZE, shard_size=500, workers=0, progress=progress,
                                 command="app: Audit page")
        files = {p.name: p.read_bytes() for p in sorted(Path(out).iterdir()) if p.is_file()}
    return AuditOutcome(report, files, time.perf_counter() - start)


def audit_figures(report) -> dict[str, Any]:
    """The report's accuracy-drop-vs-rho charts (plotly figures), one per grouping."""
    from patchslim.audit import report as audit_report

    return audit_report.figures(report)


def audit_matrices(report) -> dict[str, Any]:
    """The report's first pictures: the accuracy-drop matrices (by group, by class), plotly figures."""
    from patchslim.audit import report as audit_report

    return audit_report.matrix_figures(report)


def audit_findings(report) -> list:
    """The disparity findings grouped by method (:class:`patchslim.audit.report.MethodFindings`)."""
    from patchslim.audit import report as audit_report

    return audit_report.method_findings(report)


@on_compute_thread
def latency_comparison(model: patchslim.LoadedModel, image: Image.Image, method: str, keep_ratio: float,
                       options: dict[str, Any], repeats: int = 10):
    """The plan timed against the unslimmed forward, interleaved (patchslim.metrics.latency), no maps kept."""
    plan = patchslim.SlimPlan.from_options(method, keep_ratio, options, seed=0)
    return latency.compare_latency(model, image, plan, warmup=2, repeats=repeats)
