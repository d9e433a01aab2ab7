"""Audits at scale: does slimming hurt some classes or subgroups more than others?

The survey (section 5.5) asks that slimming "does not disproportionately discard features relevant to
underrepresented classes or subgroups". An audit runs methods x keep ratios over labelled, grouped images and
reports, per group and per class, the accuracy before and after slimming with bootstrap intervals, and flags a
group that is hurt more than the others beyond the noise::

    from patchslim.audit import run_audit
    report = run_audit(model, "photos/", ["random", "evit"], [0.7, 0.5], "audit_out")
    report.flagged()

The labelled images come from :mod:`patchslim.data` (folders, grouped folders, CSV manifests, zips, the
bundled sets, with every bad input reported), the data path every command shares. Modules:
:mod:`~patchslim.audit.sources` (groupings: the data's own groups, brightness, class families),
:mod:`~patchslim.audit.runner` (the resumable method x rho x shard job), :mod:`~patchslim.audit.ray_runner`
(the same job on Ray: one actor per worker), :mod:`~patchslim.audit.stats` (bootstrap, disparity),
:mod:`~patchslim.audit.report` (CSV, JSON, self-contained HTML led by the accuracy-drop matrix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from patchslim.audit.report import AuditReport, build_report, write_report  # noqa: F401
from patchslim.audit.runner import AuditJob, AuditPlan, audit_plans, budget_audit_plans, clear_parts  # noqa: F401
from patchslim.audit.sources import parse_groupings  # noqa: F401
from patchslim.audit.stats import Disparity, Estimate, disparity, mean_interval  # noqa: F401
from patchslim.data import LabelledImages, load_labelled


def run_audit(model: Any, data: str | Path | bytes | LabelledImages, methods: str | Sequence[str],
              keep_ratios: str | Sequence[float], out_dir: str | Path, groupings: str | Sequence[str] | None = None,
              evidence: bool = False, batch_size: int = 64, shard_size: int = 1000, workers: int = 0, seed: int = 0,
              limit: int | None = None, options: dict[str, str] | None = None, fresh: bool = False,
              progress: Callable[[int, int], None] | None = None, command: str = "", plotly: str = "compressed",
              n_boot: int = 1000, budgets: str | Sequence[float] | None = None) -> AuditReport:
    """Loads the data, runs (or resumes) the audit job in ``out_dir`` and writes the report there.

    Args:
        model: a :class:`~patchslim.models.LoadedModel`.
        data: ``"bundled"``, ``"fashion-mnist"``, a folder, a CSV manifest, a zip (path or bytes), or
            :class:`~patchslim.data.LabelledImages` from :func:`~patchslim.data.load_labelled`.
        methods: ``"random,evit"`` or a list (``METHOD@B`` places a method, as in ``evaluate``).
        keep_ratios: ``"0.7,0.5"`` or a list (None or empty with ``budgets``).
        out_dir: the output folder (parts, CSV, JSON, HTML); the only place anything is written.
        groupings: ``group``, ``brightness``, ``family`` (default: the data's own groups, or brightness and
            family for the bundled canvases); ``class`` is always reported.
        evidence: also measure the share of kept evidence.
        batch_size, shard_size, workers, seed: see :class:`~patchslim.audit.runner.AuditJob`.
        limit: audit this many images (:meth:`~patchslim.data.LabelledImages.subset`: evenly spaced).
        options: method options (``KEY=VALUE`` as in ``evaluate --opt``).
        fresh: discard the parts of an earlier audit in ``out_dir`` first.
        progress: ``progress(done, total)`` in single-image forwards.
        command: the command line, recorded in the report.
        plotly: ``"compressed"`` or ``"inline"`` (how plotly.js is embedded in the HTML).
        n_boot: bootstrap resamples per interval.
        budgets: compute budgets instead of keep ratios (``"0.7,0.5"`` or a list of fractions of the unslimmed
            GMACs): each method runs the plan that costs that much; pairs it cannot reach are left out and named in
            the report's notes.
    """
    from patchslim.budget import parse_budgets
    from patchslim.errors import BudgetError
    from patchslim.evaluate import parse_keep_ratios, parse_variants

    variants = parse_variants(methods, options)
    refused: dict[str, str] = {}
    if budgets is not None:
        if keep_ratios:
            raise BudgetError("keep ratios and budgets are two ways to say how much to slim: give one of them")
        plans, refused = budget_audit_plans(model, variants, parse_budgets(budgets, "budgets"), seed)
    else:
        plans = audit_plans(variants, parse_keep_ratios(keep_ratios), seed)
    if not isinstance(data, LabelledImages):
        data = load_labelled(data, model)
    data = data.subset(limit)
    chosen = parse_groupings(groupings, data)
    if fresh:
        clear_parts(out_dir)
    job = AuditJob(model, data, plans, Path(out_dir), batch_size=batch_size,
                   shard_size=shard_size, workers=workers, seed=seed, evidence=evidence)
    job.run(progress=progress)
    report = build_report(job, chosen, n_boot=n_boot, command=command)
    report.notes += [f"Not audited: {what}: {why}" for what, why in refused.items()]
    write_report(report, out_dir, plotly=plotly)
    return report
