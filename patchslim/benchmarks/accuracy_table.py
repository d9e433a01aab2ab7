"""Reading the accuracy table (``accuracy.csv`` + ``accuracy.json`` written by ``python -m patchslim benchmark
--which accuracy`` or ``python -m patchslim evaluate --out``) for the cost tables, which join its top-1 to
their own columns."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from patchslim.benchmarks.common import read_csv

NOT_MEASURED = "not measured yet"


@dataclass
class AccuracyTable:
    """Top-1 per (method label, keep ratio) on one model, and that model's unslimmed top-1.

    Attributes:
        path: the CSV it was read from.
        model: the model evaluated.
        baseline_top1: the unslimmed top-1 in [0, 1] (None when the table does not give it).
        top1: (label, keep ratio rounded to 6 digits) -> top-1 in [0, 1].
        rows: the CSV rows as read.
    """

    path: Path
    model: str
    baseline_top1: float | None
    top1: dict[tuple[str, float], float]
    rows: list[dict]

    def top1_pct(self, label: str, keep_ratio: float) -> float | None:
        value = self.top1.get((label, round(float(keep_ratio), 6)))
        return None if value is None else 100.0 * value

    def loss_pp(self, label: str, keep_ratio: float) -> float | None:
        """Top-1 lost against the unslimmed model, in percentage points (None when not in the table)."""
        value = self.top1.get((label, round(float(keep_ratio), 6)))
        if value is None or self.baseline_top1 is None:
            return None
        return 100.0 * (self.baseline_top1 - value)

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows if r.get("method")))

    @property
    def keep_ratios(self) -> list[float]:
        return sorted({ratio for _, ratio in self.top1}, reverse=True)


def load_accuracy(csv_path: str | Path) -> AccuracyTable | None:
    """The accuracy table at ``csv_path`` (the ``.json`` beside it names the model and the unslimmed top-1),
    or None when it has not been written yet.

    Raises:
        PatchslimError: the file exists but has no ``method``, ``keep_ratio`` and ``top1`` columns.
    """
    from patchslim.errors import PatchslimError

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return None
    rows = read_csv(csv_path)
    if rows and not {"method", "keep_ratio", "top1"} <= set(rows[0]):
        raise PatchslimError(f"{csv_path} is not an accuracy table: it needs the columns method, keep_ratio "
                             f"and top1 (it has {', '.join(rows[0])})")
    model, baseline = "fashion-vit", None
    json_path = csv_path.with_suffix(".json")
    if json_path.is_file():
        record = json.loads(json_path.read_text())
        model = record.get("model", model)
        baseline = record.get("baseline_top1")
    top1: dict[tuple[str, float], float] = {}
    for row in rows:
        try:
            top1[(row["method"], round(float(row["keep_ratio"]), 6))] = float(row["top1"])
        except (KeyError, TypeError, ValueError):
            continue
    if baseline is None:  # rho = 1 of a pruning method is the unslimmed model
        baseline = next((value for (label, ratio), value in top1.items() if ratio == 1.0 and label == "random"),
                        None)
    return AccuracyTable(csv_path, model, None if baseline is None else float(baseline), top1, rows)
