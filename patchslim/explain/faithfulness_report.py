"""Faithfulness over a data set: the mean deletion and insertion score of every map kind, with bootstrap intervals.

For each batch of images, the unslimmed model's top-1 is the target class (the same question before and after
slimming). Then for the unslimmed model and for each plan, the maps of that model (:func:`~patchslim.explain.maps.
patch_maps`) are scored in each mode (:func:`~patchslim.explain.faithfulness.score_maps`), beside the mean of the
random rankings (the same rankings for every plan: a paired comparison). Per image and map kind this gives one
deletion and one insertion area; the report gives their mean with a percentile bootstrap interval
(:func:`patchslim.audit.stats.mean_interval`), and the mean of the paired difference to random.

What ``evaluate --faithfulness``, ``audit --faithfulness`` and ``benchmark --which faithfulness`` report;
:func:`write_faithfulness` writes CSV, JSON and markdown.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from patchslim.errors import DataError, ExplanationError
from patchslim.explain.faithfulness import (CURVES, DEFAULT_RANDOM_ORDERS, DEFAULT_STEPS, RANDOM, check_steps,
                                            resolve_modes, score_maps)
from patchslim.explain.maps import MAP_KINDS, check_kinds, patch_maps

UNSLIMMED = "unslimmed"


@dataclass(frozen=True)
class FaithfulnessRow:
    """One map kind of one model (unslimmed, or a method at a keep ratio) in one mode, over the images.

    Attributes:
        method: ``"unslimmed"`` or the method's label (``attention``, ``entropy@1``).
        keep_ratio: rho requested (1.0 for the unslimmed model).
        mode: ``"token"`` or ``"pixel"``.
        map: the map kind, or ``"random"`` (the mean of the random rankings).
        n: images.
        deletion, deletion_low, deletion_high: the mean deletion area (lower is better) and its 95 % interval.
        insertion, insertion_low, insertion_high: the mean insertion area (higher is better) and its interval.
        deletion_vs_random: mean per image of (deletion - random's deletion): below 0 beats random.
        insertion_vs_random: mean per image of (insertion - random's insertion): above 0 beats random.
    """

    method: str
    keep_ratio: float
    mode: str
    map: str
    n: int
    deletion: float
    deletion_low: float
    deletion_high: float
    insertion: float
    insertion_low: float
    insertion_high: float
    deletion_vs_random: float
    insertion_vs_random: float


@dataclass
class FaithfulnessTable:
    """What :func:`faithfulness_table` measured.

    Attributes:
        model, weights, data: what ran on what.
        n: images scored.
        steps: the curves' steps; random_orders: random rankings per image.
        modes: the modes scored; kinds: the map kinds.
        rows: one per (model, mode, map kind or random).
        refused: mode -> why the architecture does not support it (left out).
        forwards: batched forwards of the curves.
        seconds: wall time.
        settings: seed, bootstrap resamples, batch sizes, device.
    """

    model: str
    weights: str
    data: str
    n: int
    steps: int
    random_orders: int
    modes: tuple[str, ...]
    kinds: tuple[str, ...]
    rows: list[FaithfulnessRow]
    refused: dict[str, str] = field(default_factory=dict)
    forwards: int = 0
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def models(self) -> list[tuple[str, float]]:
        """(method, keep ratio) in the order measured, the unslimmed model first."""
        return list(dict.fromkeys((r.method, r.keep_ratio) for r in self.rows))

    def row(self, method: str, keep_ratio: float, mode: str, kind: str) -> FaithfulnessRow:
        for r in self.rows:
            if (r.method, r.mode, r.map) == (method, mode, kind) and abs(r.keep_ratio - keep_ratio) < 1e-9:
                return r
        raise KeyError((method, keep_ratio, mode, kind))

    def best(self, method: str, keep_ratio: float, mode: str, curve: str) -> str:
        """The map kind with the best mean ``curve`` score (deletion: lowest; insertion: highest)."""
        rows = [r for r in self.rows if (r.method, r.mode) == (method, mode) and abs(r.keep_ratio - keep_ratio) < 1e-9
                and r.map != RANDOM]
        sign = 1 if curve == "deletion" else -1
        return min(rows, key=lambda r: sign * getattr(r, curve)).map

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [_clean(asdict(r)) for r in self.rows]
        return _clean(d)

    def csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(FaithfulnessRow.__dataclass_fields__), lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()})
        return out.getvalue()

    def markdown(self) -> str:
        """Per mode, a table of map kinds x models (deletion and insertion with intervals), then who wins."""
        models = self.models
        names = [_model_name(m, r) for m, r in models]
        lines = [
            f"Model `{self.model}` ({self.weights}); data: {self.data}; n = {self.n} images; {self.steps} steps; "
            f"reference: the mean of {self.random_orders} random rankings per image; target: the unslimmed "
            "model's top-1. Areas under the target class's probability; 95 % bootstrap intervals in brackets.",
        ]
        for mode, reason in self.refused.items():
            lines += ["", f"{mode} mode left out: {reason}."]
        for mode in self.modes:
            what = ("patches removed by dropping their tokens" if mode == "token"
                    else "patches replaced by a Gaussian blur of the image")
            for curve, better in (("deletion", "lower is better"), ("insertion", "higher is better")):
                lines += ["", f"**{curve.capitalize()}, {mode} mode** ({what}; {better}):", "",
                          "| map | " + " | ".join(names) + " |", "|---|" + "---:|" * len(models)]
                for kind in (*self.kinds, RANDOM):
                    cells = []
                    for method, ratio in models:
                        try:
                            r = self.row(method, ratio, mode, kind)
                        except KeyError:
                            cells.append("")
                            continue
                        value, low, high = (getattr(r, curve), getattr(r, f"{curve}_low"), getattr(r, f"{curve}_high"))
                        mark = "**" if kind != RANDOM and self.best(method, ratio, mode, curve) == kind else ""
                        cells.append(f"{mark}{value:.3f}{mark} [{low:.3f}, {high:.3f}]")
                    label = MAP_KINDS[kind].label if kind in MAP_KINDS else "random (reference)"
                    lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Best map (bold above) per model:", ""]
        for mode in self.modes:
            for method, ratio in models:
                lines.append(f"- {mode} mode, {_model_name(method, ratio)}: deletion "
                             f"{self.best(method, ratio, mode, 'deletion')}, insertion "
                             f"{self.best(method, ratio, mode, 'insertion')}")
        return "\n".join(lines) + "\n"


def _model_name(method: str, keep_ratio: float) -> str:
    return method if method == UNSLIMMED else f"{method} rho {keep_ratio:g}"


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def faithfulness_table(model, data, plans: Sequence[tuple[str, float, Any]], *, kinds: Sequence[str] | str = "auto",
                       modes: str | Sequence[str] = "both", steps: int = DEFAULT_STEPS,
                       random_orders: int = DEFAULT_RANDOM_ORDERS, seed: int = 0, batch_size: int = 50,
                       rows_per_forward: int = 1000, n_boot: int = 1000, ig_steps: int = 16,
                       progress: Callable[[int, int], None] | None = None, workers: int = 0) -> FaithfulnessTable:
    """Mean deletion and insertion scores per map kind over ``data``, unslimmed and for every plan.

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        data: :class:`~patchslim.data.LabelledImages` (labels are not used: the target is the unslimmed top-1).
        plans: ``(label, keep_ratio, plan)`` of the slimmed models; the unslimmed model is always scored first.
        kinds: map kinds (:data:`~patchslim.explain.maps.MAP_KINDS`); ``ig`` and ``occlusion`` cost dozens of
            forwards per image.
        modes: ``"both"`` (every mode the architecture allows), ``"token"`` or ``"pixel"``.
        steps, random_orders, seed: as in :func:`~patchslim.explain.faithfulness.score_maps`.
        batch_size: images per batch of maps and curves.
        rows_per_forward: images x rankings per forward of the curves.
        n_boot: bootstrap resamples per interval.
        ig_steps: Integrated Gradients path steps.
        progress: ``progress(done, total)`` in images x models.
        workers: decoding worker processes for image files.

    Raises:
        ExplanationError: bad kinds, modes or steps (checked before any image runs).
        DataError: no image could be decoded.
    """
    from patchslim.audit.stats import mean_interval
    from patchslim.explain.grad_rollout import targets_for
    from patchslim.plan import SlimPlan

    kinds = check_kinds(model, kinds)
    run_modes, refused = resolve_modes(model, modes)
    if not run_modes:
        raise ExplanationError(f"mode: none of the modes applies to {model.name} ({'; '.join(refused.values())})")
    steps = check_steps(steps, model.spec.num_patches)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExplanationError(f"batch_size must be a positive integer, got {batch_size!r}")
    models = [(UNSLIMMED, 1.0, SlimPlan())] + [(label, float(rho), plan) for label, rho, plan in plans]
    for _, _, plan in models:  # a plan that does not fit the model fails before any image runs
        for action in plan.resolve(model.spec.depth):
            action.method.check(dict(action.stage.options), action.stage.keep_ratio, model)
    started = time.time()
    areas: dict[tuple, list[np.ndarray]] = {}
    n = forwards = 0
    total = len(data) * len(models)
    for batch in data.batches(model, batch_size, workers):
        if not int(batch.ok.sum()):
            continue
        x = batch.images.to(model.device)
        targets = targets_for(model, x, None)
        for index, (label, rho, plan) in enumerate(models):
            maps = patch_maps(model, x, plan, kinds, targets, ig_steps=ig_steps)
            for mode in run_modes:
                scores = score_maps(model, x, maps, plan, mode=mode, steps=steps, targets=targets,
                                    random_orders=random_orders, seed=seed + n, batch_size=rows_per_forward)
                forwards += scores.forwards
                for curve in CURVES:
                    for kind, values in getattr(scores, curve).items():
                        areas.setdefault((index, mode, kind, curve), []).append(values)
            if progress is not None:
                progress(n * len(models) + (index + 1) * len(x), total)
        n += len(x)
    if not n:
        raise DataError(f"none of the {len(data)} images of {data.name} could be decoded")
    rows = []
    for index, (label, rho, _) in enumerate(models):
        for mode in run_modes:
            for kind in (*kinds, RANDOM) if random_orders else kinds:
                values = {c: np.concatenate(areas[(index, mode, kind, c)]) for c in CURVES}
                estimates = {c: mean_interval(values[c], n_boot, seed, (label, rho, mode, kind, c)) for c in CURVES}
                versus = {c: (float(np.mean(values[c] - np.concatenate(areas[(index, mode, RANDOM, c)])))
                              if random_orders else float("nan")) for c in CURVES}
                rows.append(FaithfulnessRow(
                    method=label, keep_ratio=rho, mode=mode, map=kind, n=int(values["deletion"].size),
                    deletion=estimates["deletion"].value, deletion_low=estimates["deletion"].low,
                    deletion_high=estimates["deletion"].high, insertion=estimates["insertion"].value,
                    insertion_low=estimates["insertion"].low, insertion_high=estimates["insertion"].high,
                    deletion_vs_random=versus["deletion"], insertion_vs_random=versus["insertion"],
                ))
    return FaithfulnessTable(
        model=model.name, weights=model.weights_name, data=data.name, n=n, steps=steps, random_orders=random_orders,
        modes=run_modes, kinds=kinds, rows=rows, refused=refused, forwards=forwards, seconds=time.time() - started,
        settings=dict(seed=seed, n_boot=n_boot, batch_size=batch_size, rows_per_forward=rows_per_forward,
                      ig_steps=ig_steps, device=str(model.device),
                      plans=[dict(method=label, keep_ratio=rho, plan=plan.to_dict()) for label, rho, plan in models]),
    )


def write_faithfulness(table: FaithfulnessTable, out_dir: str | Path, stem: str = "faithfulness",
                       command: str | None = None, title: str = "Faithfulness of the maps",
                       notes: Sequence[str] = ()) -> dict[str, Path]:
    """Writes ``<stem>.csv``, ``<stem>.json`` and ``<stem>.md`` (naming ``command``; ``notes`` as bullets at the
    end of the markdown) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{stem}.{kind}" for kind in ("csv", "json", "md")}
    paths["csv"].write_text(table.csv_text())
    record = table.to_dict()
    if command:
        record["command"] = command
    record["written"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    paths["json"].write_text(json.dumps(record, indent=1) + "\n")
    header = f"# {title}\n\n" + (f"Command: `{command}`\n\n" if command else "")
    paths["md"].write_text(header + table.markdown() + "".join(f"\n- {note}" for note in notes)
                           + ("\n" if notes else ""))
    return paths
