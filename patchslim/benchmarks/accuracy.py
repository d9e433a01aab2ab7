"""Accuracy vs keep ratio for every slimming method on the bundled model (the survey's Table 2, our model).

    python -m patchslim benchmark --which accuracy                  # full 10,000-image canvas test set
    python -m patchslim benchmark --which accuracy --data bundled   # the 500 shipped sample images

Writes ``accuracy.{csv,json,md,html,png}`` and ``accuracy_vs_compute.{html,png}``
(:func:`patchslim.evaluate.write_outputs`). Every registered method runs at its default placement. Where a
method works *at the input* by default, a variant acting before block 1 (``METHOD@1``) is added, and
content-based methods that default to a later block also run at the input (``entropy@0``), so the table shows
that where a method acts matters as much as how it scores. ``random@1`` / ``random@2`` are the controls at
the places ``rl`` / ``attention`` act. Tables 1 and 2 join its top-1, so ``--which all`` runs it first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchslim.benchmarks import common

DEFAULT_RATIOS = (1.0, 0.9, 0.7, 0.5, 0.3)


def default_variants(depth: int, spec=None) -> list[str]:
    """The table's rows for a model of ``depth`` blocks: every method, plus the placements that compare; for a
    hierarchical model (Swin, ``spec.hierarchical``) the methods that act window by window, in the model's default
    stages."""
    from patchslim.methods import get_method, method_names

    if spec is not None and spec.hierarchical:
        return [name for name in method_names() if get_method(name).windowed]
    labels: list[str] = []
    for name in method_names():
        method = get_method(name)
        labels.append(name)
        blocks = method.default_blocks(depth)
        if blocks == (0,) and depth > 1:
            labels.append(f"{name}@1")
        elif (method.point == "pre" and method.input_dependent and not method.needs_attention
              and not method.learned and 0 not in blocks):
            labels.append(f"{name}@0")
    for control in ("random@1", "random@2"):
        if control not in labels and depth > 2:
            labels.append(control)
    return labels


@dataclass
class AccuracyConfig:
    """What the accuracy table evaluates.

    Attributes:
        model: the model (its trained weights; ``pretrained=False`` for random ones, in tests).
        pretrained: load the trained weights.
        data: labelled images (``fashion-mnist``: all 10,000 canvas test images; ``bundled``: the 500 shipped).
        methods: method labels (None: :func:`default_variants`).
        keep_ratios: the requested rho values.
        limit: evaluate at most this many images (evenly spaced).
        batch_size: images per forward.
        progress: show the evaluation's own progress bar.
        stem: file name stem of the outputs.
    """

    model: str = "fashion-vit"
    pretrained: bool = True
    data: str = "fashion-mnist"
    methods: tuple[str, ...] | None = None
    keep_ratios: tuple[float, ...] = DEFAULT_RATIOS
    limit: int | None = None
    batch_size: int = 500
    progress: bool = True
    stem: str = "accuracy"

    def jobs(self) -> list[str]:
        return ["accuracy"]  # one evaluation, with its own per-image progress bar


@dataclass
class AccuracyRun:
    """The evaluated table, before and after writing (the same interface as
    :class:`~patchslim.benchmarks.common.BenchmarkResult`)."""

    name: str
    stem: str
    result: Any  # patchslim.evaluate.EvaluationResult
    seconds: float | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def write(self, out: str | Path, command: str | None = None, png: bool = True) -> dict[str, Path]:
        """``write_outputs``: the markdown and JSON name ``command``; the CSV and figures go by them."""
        from patchslim.evaluate import write_outputs

        self.files = write_outputs(self.result, out, stem=self.stem, png=png, command=command)
        return self.files

    def summary(self) -> str:
        took = f"\nTook {common.duration(self.seconds)}.\n" if self.seconds is not None else ""
        return self.result.markdown() + took


def run_accuracy(config: AccuracyConfig, tick: common.Tick | None = None) -> AccuracyRun:
    """Evaluates every variant at every keep ratio on the data (see the module docstring)."""
    from patchslim.data import load_labelled
    from patchslim.evaluate import evaluate, parse_keep_ratios, parse_variants
    from patchslim.models import load_model

    model = common.portable_model(load_model(config.model, device="cpu", pretrained=config.pretrained))
    labels = list(config.methods) if config.methods else default_variants(model.spec.depth, model.spec)
    data = load_labelled(config.data, model).subset(config.limit)
    result = evaluate(model, data, parse_variants(labels), parse_keep_ratios(list(config.keep_ratios)),
                      batch_size=config.batch_size, progress=config.progress)
    if tick:
        tick(f"accuracy on {len(data)} images")
    result = dataclasses.replace(result, data=common.portable_text(result.data),
                                 unreadable=[common.portable_text(item) for item in result.unreadable])
    return AccuracyRun(name="accuracy", stem=config.stem, result=result)
