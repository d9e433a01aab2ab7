"""Batch evaluation: accuracy tables over methods x keep ratios, data sources, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from patchslim import bundled
from patchslim.data import canvas_images, class_lookup, load_labelled
from patchslim.errors import PlanError, UnknownMethodError
from patchslim.evaluate import (
    evaluate,
    parse_keep_ratios,
    parse_variants,
    write_outputs,
)


@pytest.fixture(scope="module")
def sample_data(fashion_sample):
    images, labels = fashion_sample
    return canvas_images(images[:24], labels[:24], "sample")


@pytest.fixture()
def image_folder(tmp_path, fashion_sample):
    """ROOT/<class>/<image> with class names matched loosely, by index, and one unknown folder."""
    images, labels = fashion_sample
    folders = {1: "Trouser", 8: "bag", 9: "9", 0: "t_shirt_top"}
    for label, name in folders.items():
        (tmp_path / name).mkdir()
        for j, index in enumerate(np.flatnonzero(labels == label)[:2]):
            Image.fromarray(images[index]).save(tmp_path / name / f"{j}.png")
    (tmp_path / "hats").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "hats" / "a.png")
    Image.fromarray(images[1]).save(tmp_path / "hats" / "b.png")
    (tmp_path / "bag" / "broken.png").write_bytes(b"not an image")
    return tmp_path


def test_evaluate_shapes_and_rho_one_is_the_unslimmed_model(fashion_random, sample_data):
    variants = parse_variants("random,random@1")
    result = evaluate(fashion_random, sample_data, variants, [1.0, 0.5], batch_size=10, progress=False)
    assert [(r.method, r.keep_ratio) for r in result.rows] == [
        ("random", 1.0), ("random", 0.5), ("random@1", 1.0), ("random@1", 0.5)]
    assert result.n == 24 and all(r.n == 24 for r in result.rows)
    for r in result.rows:
        assert 0 <= r.top1 <= 1 and 0 <= r.agreement <= 1 and r.correct == round(r.top1 * 24)
    for method in ("random", "random@1"):
        full = result.row(method, 1.0)
        assert full.top1 == result.baseline_top1 and full.agreement == 1.0 and full.keep_ratio_reached == 1.0
    assert result.row("random", 0.5).keep_ratio_reached == pytest.approx(0.5)
    assert result.row("random@1", 0.5).blocks == "1"
    assert result.row("random@1", 0.5).mean_keep_ratio > result.row("random", 0.5).mean_keep_ratio
    text = result.markdown()
    assert "| random@1 |" in text and "rho 0.5" in text


def test_folder_labels_and_unknown_folders_are_reported(fashion_random, image_folder):
    data = load_labelled(image_folder, fashion_random)
    assert len(data) == 9  # broken.png is listed; it fails when decoded
    assert sorted(set(data.labels.tolist())) == [0, 1, 8, 9]
    assert {s.item: s.count for s in data.skipped if s.kind == "label"} == {"hats": 2}
    result = evaluate(fashion_random, data, parse_variants("random"), [1.0], batch_size=3, progress=False)
    assert result.unknown_labels == {"hats": 2} and result.n == 8
    assert len(result.unreadable) == 1 and "bag/broken.png: could not be decoded" in result.unreadable[0]
    assert "hats (2)" in result.markdown() and "Files left out: 1" in result.markdown()


def test_class_lookup_matches_names_indices_never_guesses():
    lookup = class_lookup(bundled.CLASS_NAMES)
    assert lookup("T-shirt/top") == 0 and lookup("t_shirt_top") == 0 and lookup("ANKLE BOOT") == 9
    assert lookup("5") == 5 and lookup("10") is None and lookup("boots") is None and lookup("___") is None


def test_parse_variants_placements_and_scoped_options():
    variants = parse_variants("random,random@1+3")
    assert variants[1].blocks == (1, 3) and variants[1].label == "random@1+3"
    with pytest.raises(UnknownMethodError, match="unknown method 'nosuch'"):
        parse_variants("random,nosuch")
    with pytest.raises(PlanError, match="belongs to none"):
        parse_variants("random", {"tau": "0.5"})
    rl = parse_variants("random,rl", {"rl.mode": "bernoulli", "policy": "x.safetensors"})
    assert rl[1].options == {"mode": "bernoulli", "policy": "x.safetensors"} and rl[0].options == {}
    assert parse_keep_ratios("1.0, 0.7,0.3") == [1.0, 0.7, 0.3]
    for bad in ("0", "1.5", "abc", ""):
        with pytest.raises(PlanError, match="--keep"):
            parse_keep_ratios(bad)


def test_write_outputs(fashion_random, sample_data, tmp_path):
    result = evaluate(fashion_random, sample_data, parse_variants("random"), [1.0, 0.3], batch_size=24, progress=False)
    paths = write_outputs(result, tmp_path, png=False, command="python -m patchslim evaluate ...")
    header = paths["csv"].read_text().splitlines()[0].split(",")
    for column in ("method", "keep_ratio", "keep_ratio_reached", "top1", "agreement", "n"):
        assert column in header
    assert json.loads(paths["json"].read_text())["rows"][1]["keep_ratio"] == 0.3
    assert "plotly" in paths["html"].read_text()[:5000].lower()
    assert "| random |" in paths["md"].read_text()


def test_cli_json_and_a_bad_method(image_folder, capsys):
    from patchslim.cli import main

    code = main(["evaluate", "--model", "fashion-vit", "--no-pretrained", "--data", str(image_folder),
                 "--methods", "random,random@2", "--keep", "1.0,0.5", "--json", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    record = json.loads(out)
    assert record["n"] == 8 and len(record["rows"]) == 4 and record["unknown_labels"] == {"hats": 2}
    code = main(["evaluate", "--model", "fashion-vit", "--no-pretrained", "--data", str(image_folder),
                 "--methods", "random,nosuch", "--json", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "nosuch" in err and err.startswith("error:")


def test_canvas_data_is_refused_for_other_models(capsys):
    from patchslim.cli import main

    code = main(["evaluate", "--model", "deit_tiny_patch16_224", "--no-pretrained", "--data", "bundled",
                 "--methods", "random", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "folder" in err


def test_results_round_trip_and_merge(fashion_random, sample_data):
    from patchslim.evaluate import EvaluationResult, merge_results

    a = evaluate(fashion_random, sample_data, parse_variants("random"), [1.0, 0.5], batch_size=24, progress=False)
    b = evaluate(fashion_random, sample_data, parse_variants("random@1"), [1.0, 0.5], batch_size=24, progress=False)
    again = EvaluationResult.from_dict(json.loads(json.dumps(a.to_dict())))
    assert [(r.method, r.keep_ratio, r.top1, r.correct) for r in again.rows] == \
        [(r.method, r.keep_ratio, r.top1, r.correct) for r in a.rows]
    merged = merge_results([again, b], order=["random@1", "random"])
    assert merged.methods == ["random@1", "random"] and len(merged.rows) == 4
