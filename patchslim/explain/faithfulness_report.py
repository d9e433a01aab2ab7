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
import os
import tempfile
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
        planned: images asked for (more than ``n`` in a table made while a run goes on, or after it stopped).
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
    planned: int = 0

    @property
    def partial(self) -> bool:
        """Whether some of the images asked for are not in the table yet."""
        return self.planned > self.n

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
            f"Model `{self.model}` ({self.weights}); data: {self.data}; n = {self.n} images"
            f"{f' (a partial run: {self.n} of the {self.planned} asked for)' if self.partial else ''}; {self.steps} steps; "
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


PARTS_JOB = "job.json"


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def _claim_parts(work: Path, identity: dict, fresh: bool) -> None:
    """Creates ``work/job.json`` (after deleting earlier parts when ``fresh``) or checks that the parts there were
    computed with the same settings.

    Raises:
        ExplanationError: the folder holds parts computed with other settings, or a damaged ``job.json``.
    """
    work.mkdir(parents=True, exist_ok=True)
    path = work / PARTS_JOB
    if fresh:
        for old in work.glob("batch_*.npz"):
            old.unlink()
        path.unlink(missing_ok=True)
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except ValueError:
            raise ExplanationError(f"{path} is damaged; delete {work} to start again") from None
        differs = [k for k in identity if existing.get(k) != identity[k]]
        if differs:
            raise ExplanationError(f"{work} holds faithfulness parts computed with other settings "
                                   f"({', '.join(differs)}); start over without resume, or use another work folder")
        return
    path.write_text(json.dumps(identity, indent=1) + "\n")


def batch_areas(model, x, models: Sequence[tuple[str, float, Any]], kinds: Sequence[str], modes: Sequence[str], *,
                steps: int, random_orders: int, seed: int, rows_per_forward: int, ig_steps: int,
                done: Callable[[int], None] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """The deletion and insertion areas of one batch of images, for every model, mode and map kind.

    The maps of each model are computed once (:func:`~patchslim.explain.maps.patch_maps`) and scored in every
    mode; the target is the unslimmed model's top-1; the random rankings are seeded by ``seed`` (the same for every
    model: a paired comparison).

    Returns:
        (``"model index|mode|kind|curve"`` -> ``[B]`` areas, batched forwards of the curves). ``done(m)`` is called
        after each model ``m``.
    """
    from patchslim.explain.grad_rollout import targets_for

    targets = targets_for(model, x, None)
    areas: dict[str, np.ndarray] = {}
    forwards = 0
    for index, (_, _, plan) in enumerate(models):
        maps = patch_maps(model, x, plan, kinds, targets, ig_steps=ig_steps)
        for mode in modes:
            scores = score_maps(model, x, maps, plan, mode=mode, steps=steps, targets=targets,
                                random_orders=random_orders, seed=seed, batch_size=rows_per_forward)
            forwards += scores.forwards
            for curve in CURVES:
                for kind, values in getattr(scores, curve).items():
                    areas[f"{index}|{mode}|{kind}|{curve}"] = np.asarray(values, dtype=np.float64)
        if done is not None:
            done(index)
    return areas, forwards


def faithfulness_table(model, data, plans: Sequence[tuple[str, float, Any]], *, kinds: Sequence[str] | str = "auto",
                       modes: str | Sequence[str] = "both", steps: int = DEFAULT_STEPS,
                       random_orders: int = DEFAULT_RANDOM_ORDERS, seed: int = 0, batch_size: int = 50,
                       rows_per_forward: int = 1000, n_boot: int = 1000, ig_steps: int = 16,
                       progress: Callable[[int, int], None] | None = None, workers: int = 0,
                       work: str | Path | None = None, resume: bool = False, score: bool = True,
                       after_batch: Callable[["FaithfulnessTable"], None] | None = None) -> FaithfulnessTable:
    """Mean deletion and insertion scores per map kind over ``data``, unslimmed and for every plan.

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        data: :class:`~patchslim.data.LabelledImages` (labels are not used: the target is the unslimmed top-1).
        plans: ``(label, keep_ratio, plan)`` of the slimmed models; the unslimmed model is always scored first.
        kinds: map kinds (:data:`~patchslim.explain.maps.MAP_KINDS`); ``ig`` and ``occlusion`` cost dozens of
            forwards per image.
        modes: ``"both"`` (every mode the architecture allows), ``"token"`` or ``"pixel"``.
        steps, random_orders, seed: as in :func:`~patchslim.explain.faithfulness.score_maps`.
        batch_size: images per batch of maps and curves (it seeds the random rankings: ``seed`` plus the images
            before the batch).
        rows_per_forward: images x rankings per forward of the curves.
        n_boot: bootstrap resamples per interval.
        ig_steps: Integrated Gradients path steps.
        progress: ``progress(done, total)`` in images x models.
        workers: decoding worker processes for image files.
        work: a folder for resumable parts (one ``.npz`` of per-image areas per batch, and ``job.json`` with the
            settings); None keeps nothing.
        resume: keep the parts an earlier run with the same settings left in ``work`` (default: start over).
        score: False scores no image: the table is made of the parts already in ``work`` (a run still going or
            stopped; ``n`` says how many images it has of ``planned``).
        after_batch: called with the table so far after each batch (e.g. to write it: a long run leaves a table).

    Raises:
        ExplanationError: bad kinds, modes or steps (checked before any image runs), or parts in ``work`` made with
            other settings.
        DataError: no image could be decoded (or, with ``score=False``, no part was found).
    """
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
    settings = dict(seed=seed, n_boot=n_boot, batch_size=batch_size, rows_per_forward=rows_per_forward,
                    ig_steps=ig_steps, device=str(model.device),
                    plans=[dict(method=label, keep_ratio=rho, plan=plan.to_dict()) for label, rho, plan in models])
    parts = Path(work) if work is not None else None
    if parts is not None:
        identity = dict(model=model.name, weights=model.weights_name, data=getattr(data, "fingerprint", data.name),
                        images=len(data), steps=steps, random_orders=random_orders, seed=seed, batch_size=batch_size,
                        ig_steps=ig_steps, kinds=list(kinds), modes=list(run_modes), plans=settings["plans"])
        if score:
            _claim_parts(parts, identity, fresh=not resume)
        elif not (parts / PARTS_JOB).is_file():
            raise DataError(f"no faithfulness parts in {parts}: run the benchmark first")
        else:
            _claim_parts(parts, identity, fresh=False)
    started = time.time()
    collected: list[dict[str, np.ndarray]] = []
    n = forwards = 0
    total = len(data) * len(models)

    def table() -> FaithfulnessTable:
        return _table(model, data, models, kinds, run_modes, refused, steps, random_orders, collected, forwards,
                      time.time() - started, settings, n_boot, seed)

    for number, batch in enumerate(data.batches(model, batch_size, workers)):
        count = int(batch.ok.sum())
        part = parts / f"batch_{number:05d}.npz" if parts is not None else None
        if part is not None and part.is_file():
            with np.load(part) as stored:
                areas = {k: stored[k] for k in stored.files if k != "forwards"}
                forwards += int(stored["forwards"])
        elif not score:
            n += count
            continue
        elif count:
            x = batch.images.to(model.device)
            first = n

            def done(index: int) -> None:
                if progress is not None:
                    progress(first * len(models) + (index + 1) * count, total)

            areas, used = batch_areas(model, x, models, kinds, run_modes, steps=steps, random_orders=random_orders,
                                      seed=seed + n, rows_per_forward=rows_per_forward, ig_steps=ig_steps, done=done)
            forwards += used
            if part is not None:
                _atomic_savez(part, dict(areas, forwards=np.asarray(used)))
        else:
            areas = {}
        if areas:
            collected.append(areas)
        n += count
        if progress is not None:
            progress(n * len(models), total)
        if after_batch is not None and collected and score:
            after_batch(table())
    if not collected:
        if not score:
            raise DataError(f"no faithfulness part in {parts} fits these settings yet")
        raise DataError(f"none of the {len(data)} images of {data.name} could be decoded")
    return table()


def _table(model, data, models, kinds, run_modes, refused, steps, random_orders, collected, forwards, seconds,
           settings, n_boot, seed) -> FaithfulnessTable:
    """The table of the areas collected so far (one dict per batch)."""
    from patchslim.audit.stats import mean_interval

    def values(index: int, mode: str, kind: str, curve: str) -> np.ndarray:
        return np.concatenate([areas[f"{index}|{mode}|{kind}|{curve}"] for areas in collected])

    n = int(sum(next(iter(areas.values())).size for areas in collected))
    rows = []
    for index, (label, rho, _) in enumerate(models):
        for mode in run_modes:
            for kind in (*kinds, RANDOM) if random_orders else kinds:
                found = {c: values(index, mode, kind, c) for c in CURVES}
                estimates = {c: mean_interval(found[c], n_boot, seed, (label, rho, mode, kind, c)) for c in CURVES}
                versus = {c: (float(np.mean(found[c] - values(index, mode, RANDOM, c)))
                              if random_orders else float("nan")) for c in CURVES}
                rows.append(FaithfulnessRow(
                    method=label, keep_ratio=rho, mode=mode, map=kind, n=int(found["deletion"].size),
                    deletion=estimates["deletion"].value, deletion_low=estimates["deletion"].low,
                    deletion_high=estimates["deletion"].high, insertion=estimates["insertion"].value,
                    insertion_low=estimates["insertion"].low, insertion_high=estimates["insertion"].high,
                    deletion_vs_random=versus["deletion"], insertion_vs_random=versus["insertion"],
                ))
    return FaithfulnessTable(
        model=model.name, weights=model.weights_name, data=data.name, n=n, steps=steps, random_orders=random_orders,
        modes=run_modes, kinds=kinds, rows=rows, refused=refused, forwards=forwards, seconds=seconds,
        settings=settings, planned=len(data),
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
