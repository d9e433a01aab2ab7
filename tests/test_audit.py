"""Audits: data sources and bad input, bootstrap and disparity math, resumable jobs, the CLI and the report.

The model is the bundled architecture with random weights (small and fast); images are tiny generated PNGs.
"""

from __future__ import annotations

import base64
import gzip
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import patchslim
from patchslim.audit import run_audit
from patchslim.audit.report import build_report, groups_csv, html_report, disparity_csv
from patchslim.audit.runner import AuditJob, audit_plans
from patchslim.audit.sources import builtin_grouping, parse_groupings
from patchslim.audit.stats import bootstrap_means, disparity, mean_interval, rng_for
from patchslim.data import brightness, load_labelled
from patchslim.errors import PatchslimError
from patchslim.evaluate import parse_variants


def _png(seed: int, size: int = 20, level: int | None = None) -> bytes:
    """A small distinct PNG (noise from ``seed``; ``level`` sets a mean intensity)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(1, 255, size=(size, size)) if level is None else \
        np.clip(rng.normal(level, 5, size=(size, size)), 1, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "L").save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _reasons(data_or_report, kind: str | None = None) -> dict[str, str]:
    return {s.item: s.reason for s in data_or_report.skipped if kind is None or s.kind == kind}


# --------------------------------------------------------------------------- sources

def test_class_layout_reports_unknown_labels_empty_classes_and_non_images(tmp_path, fashion_random):
    root = tmp_path / "data"
    for i in range(3):
        _write(root / "Trouser" / f"t{i}.png", _png(i))
        _write(root / "t_shirt_top" / f"s{i}.png", _png(10 + i))  # loose match of 'T-shirt/top'
        _write(root / "8" / f"b{i}.png", _png(20 + i))  # class index: Bag
        _write(root / "spaceship" / f"x{i}.png", _png(30 + i))
    (root / "Sandal").mkdir()
    _write(root / "Trouser" / "notes.txt", b"not an image")
    _write(root / "loose.png", _png(40))
    data = load_labelled(root, fashion_random)
    assert len(data) == 9
    assert sorted(set(data.labels.tolist())) == [0, 1, 8]
    assert data.groupings == {}
    skipped = {s.item: s for s in data.skipped}
    assert skipped["spaceship"].kind == "label" and skipped["spaceship"].count == 3
    assert "matches none" in skipped["spaceship"].reason
    assert skipped["Sandal"].kind == "class" and "no images" in skipped["Sandal"].reason
    assert "not an image" in skipped["Trouser/notes.txt"].reason
    assert "not in a class folder" in skipped["loose.png"].reason


def test_group_layout_detects_groups_and_empty_groups(tmp_path, fashion_random):
    root = tmp_path / "data"
    for g, offset in (("indoor", 0), ("outdoor", 100)):
        for k, c in enumerate(("Coat", "Sneaker")):
            for i in range(2):
                _write(root / g / c / f"{i}.png", _png(offset + 10 * k + i))
    (root / "night" / "Coat").mkdir(parents=True)
    _write(root / "outdoor" / "stray.png", _png(999))
    data = load_labelled(root, fashion_random)
    assert len(data) == 8
    assert sorted(set(data.groupings["group"])) == ["indoor", "outdoor"]
    reasons = _reasons(data)
    assert "no usable images" in reasons["night"]
    assert "no images" in reasons["night/Coat"]
    assert "not in a class folder" in reasons["outdoor/stray.png"]
    assert parse_groupings(None, data) == ["group"]
    with pytest.raises(PatchslimError, match="no usable labelled images"):
        load_labelled(root, fashion_random, layout="class")  # forced: the group folders are no classes


def test_csv_manifest_with_groups_unknown_labels_and_missing_files(tmp_path, fashion_random):
    for i in range(4):
        _write(tmp_path / "img" / f"{i}.png", _png(50 + i))
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,group\n"
                        "img/0.png,Dress,young\nimg/1.png,3,old\nimg/2.png,Pullover,old\n"
                        "img/3.png,unicorn,old\nimg/missing.png,Dress,young\nimg/0.png,Dress,young\n")
    data = load_labelled(manifest, fashion_random)
    assert len(data) == 3
    assert data.labels.tolist() == [3, 3, 2]
    assert data.groupings["group"].tolist() == ["young", "old", "old"]
    reasons = _reasons(data)
    assert "matches none" in reasons["label 'unicorn'"]
    assert "not found" in reasons["img/missing.png"]
    assert any("listed twice" in r for r in reasons.values())
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,Dress\n")
    with pytest.raises(PatchslimError, match="path,label"):
        load_labelled(bad, fashion_random)


def test_duplicates_are_skipped_with_the_first_copy_named(tmp_path, fashion_random):
    root = tmp_path / "data"
    _write(root / "Bag" / "a.png", _png(1))
    _write(root / "Bag" / "b.png", _png(1))  # same bytes
    _write(root / "Shirt" / "c.png", _png(1))  # same bytes, other class
    _write(root / "Shirt" / "d.png", _png(2))
    data = load_labelled(root, fashion_random)
    assert data.items == ["Bag/a.png", "Shirt/d.png"]
    dupes = _reasons(data, "duplicate")
    assert dupes == {"Bag/b.png": "same content as Bag/a.png", "Shirt/c.png": "same content as Bag/a.png"}


def _zip(entries: dict[str, bytes], path: Path | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name) if name.endswith("/") else name, data)
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_zip_traversal_absolute_paths_and_bombs_are_skipped_and_nothing_is_written(tmp_path, fashion_random):
    entries = {f"wrap/Coat/{i}.png": _png(60 + i) for i in range(3)}
    entries.update({f"wrap/Bag/{i}.png": _png(70 + i) for i in range(3)})
    entries["../../evil.png"] = _png(80)
    entries["wrap/../../escape.png"] = _png(81)
    entries["/etc/abs.png"] = _png(82)
    entries["C:/windows/abs.png"] = _png(83)
    entries["wrap/Coat/bomb.bmp"] = b"\0" * (8 * 1024 * 1024)  # ~8 MB of zeros: ratio ~1000:1
    entries["wrap/__MACOSX/._x.png"] = b"junk"
    before = _tree(tmp_path)
    zipped = tmp_path / "upload.zip"
    _zip(entries, zipped)
    data = load_labelled(zipped, fashion_random)
    assert len(data) == 6 and set(data.labels.tolist()) == {4, 8}
    reasons = _reasons(data, "archive")
    assert "path traversal" in reasons["../../evil.png"]
    assert "path traversal" in reasons["wrap/../../escape.png"]
    assert "absolute path" in reasons["/etc/abs.png"]
    assert "absolute path" in reasons["C:/windows/abs.png"]
    assert "zip bomb" in reasons["wrap/Coat/bomb.bmp"]
    # Caps on file count and total size: what is past them is reported, the rest audited.
    capped = load_labelled(zipped.read_bytes(), fashion_random, max_files=4)
    assert len(capped) == 4
    assert any("cap of 4 files" in s.reason and s.count == 2 for s in capped.skipped)
    small = load_labelled(zipped.read_bytes(), fashion_random, max_bytes=3 * len(_png(60)) + 10)
    assert 1 <= len(small) <= 3
    assert any("unpack to more than" in s.reason for s in small.skipped)
    # The audit of the zip writes only into its output folder.
    out = tmp_path / "out"
    report = run_audit(fashion_random, zipped, "random", "0.5", out, shard_size=4, n_boot=100)
    assert report.audited == 6
    assert {s.item for s in report.skipped} >= {"../../evil.png", "/etc/abs.png", "wrap/Coat/bomb.bmp"}
    after = _tree(tmp_path)
    assert {p for p in after - before if not p.startswith("out")} == {"upload.zip"}
    assert not (tmp_path.parent / "evil.png").exists() and not Path("/etc/abs.png").exists()


def test_zip_manifest_paths_stay_inside_the_zip(tmp_path, fashion_random):
    entries = {"a.png": _png(90), "b.png": _png(91),
               "labels.csv": b"path,label\na.png,Sneaker\nb.png,Sandal\n../outside.png,Sandal\n/abs.png,Bag\n"}
    data = load_labelled(_zip(entries), fashion_random)
    assert data.labels.tolist() == [7, 5]
    reasons = _reasons(data)
    assert "leaves the zip" in reasons["../outside.png"] and "leaves the zip" in reasons["/abs.png"]


def test_unreadable_and_truncated_images_are_reported_and_the_audit_carries_on(tmp_path, fashion_random):
    root = tmp_path / "data"
    for i in range(4):
        _write(root / "Dress" / f"{i}.png", _png(100 + i))
    _write(root / "Dress" / "garbage.png", b"this is not a png at all")
    _write(root / "Dress" / "truncated.png", _png(200, size=40)[:60])
    _write(root / "Dress" / "empty.jpg", b"")
    report = run_audit(fashion_random, root, "uniform", "0.5", tmp_path / "out", n_boot=100)
    assert report.audited == 4 and report.images == 7
    reasons = _reasons(report)
    assert "could not be decoded" in reasons["Dress/garbage.png"]
    assert "could not be decoded" in reasons["Dress/truncated.png"]
    assert "empty" in reasons["Dress/empty.jpg"]


def test_brightness_and_builtin_groupings():
    canvas = np.zeros((48, 48), np.uint8)
    canvas[10:20, 10:20] = 51
    assert brightness(Image.fromarray(canvas)) == pytest.approx(0.2)
    groups = builtin_grouping("brightness", np.zeros(4, int), np.array([0.1, 0.9, 0.2, np.nan]), [])
    assert groups.tolist() == ["dark", "bright", "dark", "unknown"]
    names = patchslim.bundled.CLASS_NAMES
    assert builtin_grouping("family", np.array([0, 7, 1]), np.zeros(3), names).tolist() == \
        ["tops", "footwear", "others"]
    with pytest.raises(PatchslimError):
        builtin_grouping("family", np.array([0]), np.zeros(1), ["cat", "dog"])


# --------------------------------------------------------------------------- statistics

def test_bootstrap_interval_matches_the_binomial_standard_error():
    values = np.array([1.0] * 300 + [0.0] * 100)  # p = 0.75, n = 400
    estimate = mean_interval(values, n_boot=4000, seed=1)
    half = 1.96 * np.sqrt(0.75 * 0.25 / 400)  # 0.0424
    assert estimate.value == pytest.approx(0.75)
    assert estimate.low == pytest.approx(0.75 - half, abs=0.008)
    assert estimate.high == pytest.approx(0.75 + half, abs=0.008)
    constant = mean_interval(np.ones(50), n_boot=200)
    assert (constant.low, constant.high) == (1.0, 1.0)
    # The exact multinomial path and index resampling agree in distribution.
    continuous = np.random.default_rng(0).normal(size=300)
    a = bootstrap_means(continuous, 3000, rng_for(0, "a"))
    assert a.std() == pytest.approx(continuous.std() / np.sqrt(300), rel=0.08)
    assert np.isnan(mean_interval(np.array([])).value)


def test_disparity_flags_a_group_clearly_hurt_more_and_not_equal_groups():
    rng = np.random.default_rng(0)

    def drops(rate: float, n: int = 400) -> np.ndarray:  # paired drops: 1 with probability rate
        return (rng.random(n) < rate).astype(float)

    hurt = disparity({"a": drops(0.05), "b": drops(0.25), "c": drops(0.05)}, seed=0)
    assert hurt.flagged and hurt.worst == "b"
    assert hurt.gap.low > 0 and hurt.gap.low <= hurt.gap.value <= hurt.gap.high
    assert hurt.pairs == 3
    same = [disparity({"a": drops(0.1), "b": drops(0.1)}, seed=s) for s in range(20)]
    assert sum(d.flagged for d in same) <= 2  # at most the 5 % false alarms, in 20 tries
    identical = disparity({"a": np.r_[np.ones(20), np.zeros(80)], "b": np.r_[np.ones(20), np.zeros(80)]})
    assert not identical.flagged and identical.gap.value == 0
    tiny_group = disparity({"a": drops(0.0), "b": np.ones(3)}, min_images=10)
    assert not tiny_group.flagged and tiny_group.excluded == {"b": 3}


# --------------------------------------------------------------------------- runner

def _canvas_data(model, n: int = 36):
    return load_labelled("bundled", model).subset(n)


def test_an_interrupted_audit_resumes_to_the_same_result(tmp_path, fashion_random):
    data = _canvas_data(fashion_random)
    plans = audit_plans(parse_variants("random,evit"), [0.5])
    whole = AuditJob(fashion_random, data, plans, tmp_path / "whole", batch_size=8, shard_size=12)
    whole.run()
    expected = build_report(whole, ["brightness", "family"], n_boot=200)

    job = AuditJob(fashion_random, data, plans, tmp_path / "killed", batch_size=8, shard_size=12)

    def kill(shard: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        job.run(after_shard=kill)
    assert not job.complete()
    assert len(job.shard_tasks()) == 2  # one of three shards was kept
    resumed = AuditJob(fashion_random, data, plans, tmp_path / "killed", batch_size=8, shard_size=12)
    odd = resumed.run(part=(1, 2))  # a second worker's share: shard 1 of shards 1 (and 3, ...)
    assert (odd.ran, odd.complete) == (1, False)
    summary = resumed.run()
    assert (summary.ran, summary.reused, summary.complete) == (1, 2, True)
    got = build_report(resumed, ["brightness", "family"], n_boot=200)
    assert groups_csv(got) == groups_csv(expected)
    assert disparity_csv(got) == disparity_csv(expected)
    # Other settings refuse to mix into these parts.
    with pytest.raises(PatchslimError, match="other settings"):
        AuditJob(fashion_random, data, plans, tmp_path / "killed", batch_size=4, shard_size=12).run()


def test_report_rows_follow_the_outcomes(tmp_path, fashion_random):
    data = _canvas_data(fashion_random, 24)
    report = run_audit(fashion_random, data, "random", "0.5", tmp_path / "out", groupings="brightness,family",
                       evidence=True, n_boot=100, shard_size=10)
    rows = {(r.by, r.group): r for r in report.rows}
    assert rows[("all", "all")].images == 24
    assert sum(r.images for r in report.rows if r.by == "family") == 24
    assert sum(r.images for r in report.rows if r.by == "class") == 24
    overall = rows[("all", "all")]
    assert overall.drop == pytest.approx(overall.top1_before - overall.top1_after)
    assert overall.top1_after_low <= overall.top1_after <= overall.top1_after_high
    assert 0.0 <= overall.kept_evidence <= 1.0
    assert overall.gmacs < report.baseline_gmacs
    assert {d.by for d in report.disparities} == {"brightness", "family", "class"}


# --------------------------------------------------------------------------- CLI and HTML

def test_cli_end_to_end_on_a_tiny_group_folder(tmp_path, capsys):
    from patchslim.cli import main

    root = tmp_path / "data"
    for g, level in (("dim", 60), ("lit", 200)):
        for c in ("Trouser", "Bag"):
            for i in range(3):
                _write(root / g / c / f"{i}.png", _png(level + 7 * i + len(c), level=level))
    _write(root / "lit" / "Bag" / "broken.png", b"\x89PNG broken")
    (root / "empty_group").mkdir()
    (root / "lit" / "Sandal").mkdir()
    out = tmp_path / "out"
    code = main(["audit", "--model", "fashion-vit", "--no-pretrained", "--data", str(root), "--methods",
                 "random,uniform", "--keep", "0.7,0.5", "--out", str(out), "--workers", "1", "--batch-size", "4",
                 "--shard-size", "5", "--bootstrap", "100", "--no-progress", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "12 of 13 images audited" in printed
    for name in ("audit_groups.csv", "audit_disparity.csv", "audit_skipped.csv", "audit.json", "audit.html"):
        assert (out / name).stat().st_size > 0
    groups = (out / "audit_groups.csv").read_text().splitlines()
    assert groups[0].startswith("method,keep_ratio,by,group,images,top1_before")
    assert sum(",group,dim," in line for line in groups) == 4  # 2 methods x 2 rhos
    skipped = (out / "audit_skipped.csv").read_text()
    assert "empty_group" in skipped and "broken.png" in skipped
    # Running again resumes everything from the parts.
    assert main(["audit", "--model", "fashion-vit", "--no-pretrained", "--data", str(root), "--methods",
                 "random,uniform", "--keep", "0.7,0.5", "--out", str(out), "--workers", "0", "--batch-size", "4",
                 "--shard-size", "5", "--bootstrap", "100", "--no-progress", "--device", "cpu"]) == 0
    assert "3 of 3 shard(s) were already done" in capsys.readouterr().out
    # A bad data path is one error line, exit 2.
    assert main(["audit", "--no-pretrained", "--data", str(tmp_path / "nowhere"), "--methods", "random",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_html_report_is_self_contained_and_escapes_names(tmp_path, fashion_random):
    root = tmp_path / "data"
    for g in ("<img src=x onerror=alert(1)>", "plain"):
        for i in range(3):
            _write(root / g / "Coat" / f"{i}.png", _png(300 + 10 * len(g) + i))
    report = run_audit(fashion_random, root, "random", "0.5", tmp_path / "out", n_boot=50)
    page = html_report(report)
    markup = re.sub(r"<script.*?</script>", "", page, flags=re.S)  # names in the chart data are JSON, not HTML
    assert "<img src=x" not in markup and "&lt;img src=x onerror=alert(1)&gt;" in markup
    assert page.count("</script>") == page.count("<script")  # no name closes a script early
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    packed = re.search(r"const packed = '([A-Za-z0-9+/=]+)'", page).group(1)
    library = gzip.decompress(base64.b64decode(packed)).decode()
    assert "plotly.js" in library[:2000] and len(library) > 1_000_000
    inline = html_report(report, plotly="inline")
    assert "Plotly.newPlot" in inline and not re.search(r"<script[^>]+src=", inline)
    assert (tmp_path / "out" / "audit.html").read_text(encoding="utf-8").count("chart-0") >= 1
