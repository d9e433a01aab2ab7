"""Which map to believe, before and after slimming: deletion and insertion scores on the bundled model.

    python -m patchslim benchmark --which faithfulness     # 500 canvas test images, token and pixel modes

Every map kind (CLS attention in the last block, attention rollout, gradient-weighted rollout, Integrated
Gradients, occlusion) of the unslimmed ``fashion-vit`` and of the model slimmed by ``attention`` and ``tome`` at
rho 0.5, scored by deletion and insertion (:mod:`patchslim.explain.faithfulness`) in token and pixel modes,
beside 5 random rankings per image, on 500 canvas test images (evenly spaced over the 10,000). Writes
``faithfulness.{csv,json,md}`` (:func:`patchslim.explain.faithfulness_report.write_faithfulness`), after every
batch of images as well when ``out`` is set, so a long run leaves a table of the images scored so far.

The per-image areas go to resumable parts in a work folder outside the results (``runs/benchmark_faithfulness``,
one ``.npz`` per batch), emptied first unless ``resume`` is set; ``score=False`` (``--partial``) writes the table
of the parts already there without scoring more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchslim.benchmarks import common

DEFAULT_METHODS = ("attention", "tome")
DEFAULT_RATIOS = (0.5,)
DEFAULT_LIMIT = 500


@dataclass
class FaithfulnessConfig:
    """What the faithfulness table scores.

    Attributes:
        model: the model (its trained weights; ``pretrained=False`` for random ones, in tests).
        pretrained: load the trained weights.
        data: labelled images (``fashion-mnist``: the canvas test set; ``bundled``: the 500 shipped).
        limit: at most this many images (evenly spaced).
        methods: method labels of the slimmed models.
        keep_ratios: their rho values.
        kinds: map kinds (default: all five).
        modes: ``"both"``, ``"token"`` or ``"pixel"``.
        steps: the curves' steps.
        batch_size: images per batch of maps and curves.
        progress: show a progress bar.
        stem: file name stem of the outputs.
        work: the folder for the resumable parts.
        resume: keep the parts an interrupted run left in ``work`` (default: start over).
        score: False scores no image: the table of the parts in ``work`` (a run going on or stopped).
        out: where to write the table after every batch (None: only at the end, by the caller).
        command: the command the files name.
    """

    model: str = "fashion-vit"
    pretrained: bool = True
    data: str = "fashion-mnist"
    limit: int | None = DEFAULT_LIMIT
    methods: tuple[str, ...] = DEFAULT_METHODS
    keep_ratios: tuple[float, ...] = DEFAULT_RATIOS
    kinds: tuple[str, ...] = ("attention", "rollout", "grad_rollout", "ig", "occlusion")
    modes: str = "both"
    steps: int = 20
    batch_size: int = 10
    progress: bool = True
    stem: str = "faithfulness"
    work: str | Path = Path("runs") / "benchmark_faithfulness"
    resume: bool = False
    score: bool = True
    out: str | Path | None = None
    command: str | None = None

    def jobs(self) -> list[str]:
        return ["faithfulness"]  # one table, with its own per-image progress bar


@dataclass
class FaithfulnessRun:
    """The scored table, before and after writing (the interface of
    :class:`~patchslim.benchmarks.common.BenchmarkResult`)."""

    name: str
    stem: str
    table: Any  # patchslim.explain.faithfulness_report.FaithfulnessTable
    seconds: float | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict]:
        return [dataclasses.asdict(r) for r in self.table.rows]

    def write(self, out: str | Path, command: str | None = None, png: bool = True) -> dict[str, Path]:
        """``faithfulness.{csv,json,md}``: the markdown and JSON name ``command``; the CSV goes by them."""
        notes = [f"Took {common.duration(self.seconds)} ({self.table.forwards} batched forwards of the curves, "
                 "maps not counted)."] if self.seconds is not None else []
        self.files = write_tables(self.table, out, self.stem, command, notes)
        return self.files

    def summary(self) -> str:
        took = f"\nTook {common.duration(self.seconds)}.\n" if self.seconds is not None else ""
        return self.table.markdown() + took


def write_tables(table, out: str | Path, stem: str, command: str | None, notes=()) -> dict[str, Path]:
    """``<stem>.{csv,json,md}`` of ``table`` in ``out``; a partial table says how to finish it."""
    from patchslim.explain.faithfulness_report import write_faithfulness

    notes = list(notes)
    if table.partial:
        notes.append(f"A partial table: {table.n} of the {table.planned} images. The same command with `--resume` "
                     "scores the rest (the parts of the images done are kept in `--work`).")
    return write_faithfulness(table, out, stem=stem, command=command,
                              title="Faithfulness of the maps, before and after slimming", notes=notes)


def run_faithfulness(config: FaithfulnessConfig, tick: common.Tick | None = None) -> FaithfulnessRun:
    """Scores every map kind before and after each plan on the data (see the module docstring)."""
    from patchslim.data import load_labelled
    from patchslim.explain.faithfulness_report import faithfulness_table
    from patchslim.models import load_model

    model = common.portable_model(load_model(config.model, device="cpu", pretrained=config.pretrained))
    data = load_labelled(config.data, model).subset(config.limit)
    plans = [(v.label, rho, v.plan(rho)) for v in common.variants(list(config.methods)) for rho in config.keep_ratios]
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data) * (1 + len(plans)), desc="faithfulness", unit="img", leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    try:
        def after_batch(partial) -> None:
            if config.out is not None and partial.partial:
                write_tables(dataclasses.replace(partial, data=common.portable_text(partial.data)), config.out,
                             config.stem, config.command)

        table = faithfulness_table(model, data, plans, kinds=config.kinds, modes=config.modes, steps=config.steps,
                                   batch_size=config.batch_size, progress=progress, work=config.work,
                                   resume=config.resume, score=config.score, after_batch=after_batch)
    finally:
        if bar is not None:
            bar.close()
    if tick:
        tick(f"faithfulness on {len(data)} images")
    table = dataclasses.replace(table, data=common.portable_text(table.data))
    return FaithfulnessRun(name="faithfulness", stem=config.stem, table=table)
