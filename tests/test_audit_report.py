"""The audit report read at a glance: the drop matrix first, Fairlearn's MetricFrame vocabulary, the findings
grouped by method and collapsed."""

from __future__ import annotations

import re

import numpy as np
import pytest

from patchslim.audit import run_audit
from patchslim.audit.report import (
    FLAG_MARK,
    AuditReport,
    DisparityRow,
    GroupRow,
    html_report,
    markdown_summary,
    matrix_figure,
    matrix_figures,
    method_findings,
    metric_frame,
)
from patchslim.audit.stats import Estimate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metric_frame_gives_by_group_overall_difference_and_ratio():
    labels = np.array([0, 1, 1, 0, 1, 1, 0, 0])
    before = np.array([0, 1, 1, 0, 1, 0, 0, 0])  # right on 7 of 8
    after = np.array([0, 1, 0, 1, 1, 0, 0, 1])  # right on 4 of 8
    groups = np.array(["a", "a", "a", "a", "b", "b", "b", "b"], dtype=object)
    frame = metric_frame(labels, before, after, groups)
    assert frame.by_group.loc["a"].tolist() == [1.0, 0.5, 0.5]  # top-1 before, after, drop
    assert frame.by_group.loc["b"].tolist() == [0.75, 0.5, 0.25]
    assert frame.overall.tolist() == [0.875, 0.5, 0.375]
    assert frame.difference()["drop"] == pytest.approx(0.25)
    assert frame.ratio()["top1_before"] == pytest.approx(0.75)
    assert frame.ratio()["top1_after"] == pytest.approx(1.0)


def test_disparity_rows_speak_metric_frame_and_agree_with_the_group_rows(tmp_path, fashion_trained):
    report = run_audit(fashion_trained, "bundled", "random,uniform", "0.5", tmp_path / "out", groupings="family",
                       limit=60, n_boot=100, shard_size=30)
    for d in report.disparities:
        rows = [r for r in report.rows if (r.method, r.keep_ratio, r.by) == (d.method, d.keep_ratio, d.by)]
        tested = [r for r in rows if r.images >= 10]
        drops = [r.drop for r in tested]
        assert d.gap == pytest.approx(max(drops) - min(drops))  # difference (max - min)
        assert d.gap == pytest.approx(d.worst_drop - d.best_drop)  # the stratified test's own worst and best
        after = [r.top1_after for r in tested]
        assert d.top1_after_difference == pytest.approx(max(after) - min(after))
        assert d.top1_after_ratio == pytest.approx(min(after) / max(after))  # ratio (min / max)
        overall = next(r for r in report.rows if (r.method, r.keep_ratio, r.by) == (d.method, d.keep_ratio, "all"))
        assert d.overall_drop == pytest.approx(overall.drop)
        assert sum(r.images for r in rows) == 60


# --------------------------------------------------------------------------- a report with known findings

def _row(method: str, rho: float, by: str, group: str, drop: float) -> GroupRow:
    return GroupRow(method, rho, by, group, 50, 0.9, 0.8, 0.95, 0.9 - drop, 0.8 - drop, 0.95 - drop, drop,
                    drop - 0.05, drop + 0.05, 0.1, -0.02, float("nan"), 0.05, rho)


def _disparity(method: str, rho: float, by: str, worst: str, best: str, drops: dict, flagged: bool) -> DisparityRow:
    gap = drops[worst] - drops[best]
    message = f"{method} at rho {rho:g}, by {by}: " + ("flagged" if flagged else "calm") + " beyond the noise."
    return DisparityRow(method, rho, by, len(drops), worst, best, drops[worst], drops[best], gap, gap - 0.01,
                        gap + 0.01, gap - 0.02, 1, flagged, "", float(np.mean(list(drops.values()))), gap,
                        0.9, message)


@pytest.fixture()
def known_report() -> AuditReport:
    drops = {("evit", 0.7): {"dark": 0.01, "bright": 0.02, "Coat": 0.0, "Bag": 0.03},
             ("evit", 0.5): {"dark": 0.02, "bright": 0.12, "Coat": 0.20, "Bag": -0.05},
             ("tome", 0.7): {"dark": 0.00, "bright": 0.01, "Coat": 0.01, "Bag": 0.0},
             ("tome", 0.5): {"dark": 0.01, "bright": 0.01, "Coat": 0.02, "Bag": 0.01}}
    rows, disparities = [], []
    for (method, rho), d in drops.items():
        rows.append(_row(method, rho, "all", "all", float(np.mean(list(d.values())))))
        rows += [_row(method, rho, "brightness", g, d[g]) for g in ("bright", "dark")]
        rows += [_row(method, rho, "class", g, d[g]) for g in ("Coat", "Bag")]
        light = {g: d[g] for g in ("dark", "bright")}
        kinds = {g: d[g] for g in ("Coat", "Bag")}
        big = (method, rho) == ("evit", 0.5)
        disparities.append(_disparity(method, rho, "brightness", max(light, key=light.get),
                                      min(light, key=light.get), light, big))
        disparities.append(_disparity(method, rho, "class", max(kinds, key=kinds.get), min(kinds, key=kinds.get),
                                      kinds, big))
    return AuditReport("fashion-vit", "random weights", "test canvases", 100, 100, Estimate(0.9, 0.85, 0.95), 0.09,
                       ["all", "brightness", "class"], rows, disparities, [], {}, {}, notes=["A note."])


def test_the_matrix_shows_every_cell_on_one_scale_and_boxes_the_flagged_ones(known_report):
    fig = matrix_figure(known_report, ["brightness"])
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert [list(h.x) for h in heatmaps] == [["all images"], ["bright", "dark"]]  # overall first, then the groups
    assert list(heatmaps[1].y) == ["evit  ρ 0.7", "evit  ρ 0.5", "tome  ρ 0.7", "tome  ρ 0.5"]
    assert np.allclose(np.array(heatmaps[1].z, dtype=float), [[2, 1], [12, 2], [1, 0], [1, 1]])
    assert all(h.zmin == -12 and h.zmax == 12 and h.zmid == 0 for h in heatmaps)  # the largest |drop| shown
    # Exactly one flagged cell by brightness: evit at 0.5, 'bright', marked and boxed at (column 0, row 1).
    marked = [(i, j) for i, row in enumerate(heatmaps[1].text) for j, t in enumerate(row) if FLAG_MARK in t]
    assert marked == [(1, 0)]
    boxes = [s for s in fig.layout.shapes if s.type == "rect"]
    assert [(b.x0, b.x1, b.y0, b.y1) for b in boxes] == [(-0.5, 0.5, 0.5, 1.5)]
    assert boxes[0].xref == "x2"  # in the brightness panel, not the overall one
    # One colour scale across the group and class pictures: class drops are larger here.
    both = matrix_figures(known_report)
    assert list(both) == ["groups", "class"]
    assert {t.zmax for f in both.values() for t in f.data} == {20.0}
    assert [FLAG_MARK in t for t in both["class"].data[1].text[1]] == [True, False]  # Coat loses 20 points


def test_findings_are_grouped_by_method_and_collapsed_below_the_pictures(known_report):
    findings = method_findings(known_report)
    assert [(f.method, f.flagged, f.total) for f in findings] == [("evit", 2, 4), ("tome", 0, 4)]
    assert "by class at ρ 0.5, 'Coat' loses 20.0 points, 'Bag' -5.0" in findings[0].headline
    assert findings[0].disparities[0].flagged and not findings[0].disparities[-1].flagged
    page = html_report(known_report)
    body = re.sub(r"<script.*?</script>", "", page, flags=re.S)
    blocks = re.findall(r"<details class='method'>(.*?)</details>", body, flags=re.S)
    assert len(blocks) == 2 and "<details class='method' open" not in body
    assert "2 of 4 flagged" in blocks[0] and "0 of 4 flagged" in blocks[1]
    assert blocks[0].count("<li") == 4
    # The pictures lead: both matrices come before the findings, the findings before the disparity table.
    order = [body.index(s) for s in ("id='matrix-groups'", "id='matrix-class'", "Which group pays", "<h2>Disparity",
                                     "difference (max − min)", "About this audit")]
    assert order == sorted(order)
    text = markdown_summary(known_report)
    assert "- evit: 2 of 4 flagged; largest flagged difference" in text and "- tome: 0 of 4 flagged" in text
    assert "flagged beyond the noise" not in text  # one line per method, not every sentence
