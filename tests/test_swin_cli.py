"""The command line on a Swin: ``--opt stages=...`` reaches the plan in run, evaluate and audit (and --help says
so), a stage the model does not have is one line on stderr, and explain writes the window maps."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from patchslim import cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def canvas_png(tmp_path_factory, fashion_sample):
    images, _ = fashion_sample
    path = tmp_path_factory.mktemp("img") / "canvas.png"
    Image.fromarray(images[0]).save(path)
    return path


@pytest.mark.parametrize("command", ["run", "evaluate", "audit"])
def test_help_names_the_stages_option(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "stages=2,3" in text and "Swin" in text


def test_run_slims_the_stages_named(canvas_png, capsys):
    args = ["run", "--model", "fashion-swin", "--no-pretrained", "--method", "random", "--keep", "0.5",
            "--image", str(canvas_png), "--repeats", "0", "--json"]
    assert cli.main(args + ["--opt", "stages=0,1"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["plan"]["stages"][0]["stages"] == [0, 1]
    assert both["tokens_per_block"] == [72] * 4 + [18] * 2  # half of every window, in both stages
    assert both["baseline_tokens_per_block"] == [144] * 4 + [36] * 2
    assert cli.main(args + ["--opt", "stages=1"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["tokens_per_block"] == [144] * 4 + [18] * 2
    assert cli.main(args) == 0  # no stages: the model's default (stage 0 for fashion-swin)
    default = json.loads(capsys.readouterr().out)
    assert default["tokens_per_block"] == [72] * 4 + [36] * 2
    assert both["gmacs"] < default["gmacs"] < default["baseline_gmacs"]


@pytest.mark.parametrize("opt,message", [
    ("stages=5", "no stage 5"),
    ("stages=0;x", "stages must be"),
])
def test_a_stage_that_does_not_exist_is_one_line(canvas_png, capsys, opt, message):
    code = cli.main(["run", "--model", "fashion-swin", "--no-pretrained", "--method", "random", "--image",
                     str(canvas_png), "--repeats", "0", "--opt", opt])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_method_that_does_not_act_in_windows_is_refused_with_its_reason(canvas_png, capsys):
    code = cli.main(["run", "--model", "fashion-swin", "--no-pretrained", "--method", "lowrank", "--image",
                     str(canvas_png), "--repeats", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "does not apply to fashion-swin" in err and "window" in err


def test_evaluate_takes_stages_for_every_method(tmp_path, capsys):
    code = cli.main(["evaluate", "--model", "fashion-swin", "--no-pretrained", "--data", "bundled", "--limit", "8",
                     "--methods", "random,uniform", "--keep", "0.5", "--opt", "stages=1", "--out", str(tmp_path),
                     "--no-png", "--no-progress", "--json"])
    assert code == 0
    rows = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"random", "uniform"}
    assert all(r["blocks"] == "stages 1" for r in rows)
    capsys.readouterr()
    code = cli.main(["evaluate", "--model", "fashion-swin", "--no-pretrained", "--data", "bundled", "--limit", "8",
                     "--methods", "random@2", "--keep", "0.5", "--opt", "stages=1", "--out", str(tmp_path / "b"),
                     "--no-png", "--no-progress"])
    assert code == 2 and "blocks or stages" in capsys.readouterr().err


def test_audit_takes_stages(tmp_path, capsys):
    code = cli.main(["audit", "--model", "fashion-swin", "--no-pretrained", "--data", "bundled", "--limit", "16",
                     "--methods", "uniform", "--keep", "0.5", "--opt", "uniform.stages=0,1", "--out", str(tmp_path),
                     "--workers", "0", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["model"] == "fashion-swin"
    plans = report["settings"]["plans"]
    assert [p["plan"]["stages"][0]["stages"] for p in plans] == [[0, 1]]


def test_explain_writes_window_maps_and_no_rollout(canvas_png, tmp_path, capsys):
    code = cli.main(["explain", "--model", "fashion-swin", "--no-pretrained", "--method", "attention", "--keep",
                     "0.5", "--image", str(canvas_png), "--out", str(tmp_path), "--attribution", "none", "--json"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["evidence_basis"] == "window attention"
    assert "overlay.png" in summary["files"] and "attention_after.png" in summary["files"]
    assert not any(name.startswith("rollout") for name in summary["files"])
