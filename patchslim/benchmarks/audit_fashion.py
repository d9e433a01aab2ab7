"""The worked audit example: does slimming hurt some garments more than others (README "Audits")?

    python -m patchslim benchmark --which audit_fashion

The bundled ``fashion-vit`` on all 10,000 canvas test images; random, uniform, CLS attention, EViT and ToMe at
rho 0.7 / 0.5 / 0.3; groups by brightness, garment family and class (:func:`patchslim.audit.run_audit`, the same
work as ``python -m patchslim audit ... --groups brightness,family``). The audit's resumable parts go to a work
folder outside the results (``runs/benchmark_audit_fashion``), emptied first unless ``resume`` is set, so that
parts computed by older code are never mixed in; the report goes to ``OUT/audit_fashion/``: ``audit.html``,
``audit.json``, ``audit_groups.csv``, ``audit_disparity.csv``, ``audit_skipped.csv`` and ``summary.txt``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchslim.benchmarks import common

DEFAULT_METHODS = ("random", "uniform", "attention", "evit", "tome")
DEFAULT_RATIOS = (0.7, 0.5, 0.3)


@dataclass
class AuditFashionConfig:
    """What the worked audit runs.

    Attributes:
        model: the model (its trained weights; ``pretrained=False`` for random ones, in tests).
        pretrained: load the trained weights.
        data: labelled images (``fashion-mnist``: all 10,000 canvas test images).
        methods: method labels.
        keep_ratios: the rho values.
        groupings: groupings besides ``class``.
        limit: audit at most this many images (evenly spaced).
        batch_size, shard_size, seed: as in ``python -m patchslim audit``.
        work: the folder for the resumable parts.
        resume: keep the parts an interrupted run left in ``work`` (default: start over).
        progress: show a per-image progress bar (on stderr).
        stem: the results sub-folder.
    """

    model: str = "fashion-vit"
    pretrained: bool = True
    data: str = "fashion-mnist"
    methods: tuple[str, ...] = DEFAULT_METHODS
    keep_ratios: tuple[float, ...] = DEFAULT_RATIOS
    groupings: tuple[str, ...] = ("brightness", "family")
    limit: int | None = None
    batch_size: int = 250
    shard_size: int = 1000
    seed: int = 0
    work: str | Path = Path("runs") / "benchmark_audit_fashion"
    resume: bool = False
    progress: bool = True
    stem: str = "audit_fashion"

    def jobs(self) -> list[str]:
        return ["audit"]  # one audit, with its own per-image progress bar


@dataclass
class AuditRun:
    """The finished audit's report, before and after writing (the interface of
    :class:`~patchslim.benchmarks.common.BenchmarkResult`)."""

    name: str
    stem: str
    report: Any  # patchslim.audit.AuditReport
    seconds: float | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def write(self, out: str | Path, command: str | None = None, png: bool = True) -> dict[str, Path]:
        """The audit's report files and ``summary.txt`` into ``OUT/<stem>/``, each naming ``command`` (the
        CSVs through ``audit.json`` beside them). ``png`` is not used: the report's charts are in its HTML."""
        from patchslim.audit import write_report

        folder = Path(out) / self.stem
        report = dataclasses.replace(self.report, command=command or "")
        self.files = dict(write_report(report, folder))
        self.files["summary"] = folder / "summary.txt"
        self.files["summary"].write_text(self._summary_text(report, command))
        return self.files

    def _summary_text(self, report, command: str | None) -> str:
        head = f"Command: {command}\n" if command else ""
        took = f"Took {common.duration(self.seconds)}.\n" if self.seconds is not None else ""
        from patchslim.audit.report import markdown_summary

        return common.portable_text(head + took + "\n" + markdown_summary(report))

    def summary(self) -> str:
        path = self.files.get("summary")
        return path.read_text() if path is not None else self._summary_text(self.report, None)


def run_audit_fashion(config: AuditFashionConfig, tick: common.Tick | None = None) -> AuditRun:
    """Runs the audit (see the module docstring); ``tick`` once at the end."""
    import sys

    from tqdm.auto import tqdm

    from patchslim.audit import run_audit
    from patchslim.models import load_model

    model = common.portable_model(load_model(config.model, device="cpu", pretrained=config.pretrained))
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="audit", unit="img", unit_scale=True, disable=not config.progress,
                       file=sys.stderr, leave=False)
        bar.update(done - bar.n)

    try:
        report = run_audit(model, config.data, list(config.methods), list(config.keep_ratios), config.work,
                           groupings=list(config.groupings), batch_size=config.batch_size,
                           shard_size=config.shard_size, seed=config.seed, limit=config.limit,
                           fresh=not config.resume, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    report = dataclasses.replace(report, data=common.portable_text(report.data))
    if tick:
        tick(f"audit of {report.audited} images")
    return AuditRun(name="audit_fashion", stem=config.stem, report=report)
