"""The side-by-side harness ``benchmarks/tome_reference.py``: its arguments always; the comparison itself only when
``PATCHSLIM_TOME_REFERENCE`` points at a checkout of facebookresearch/ToMe (never part of this repository)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = os.environ.get("PATCHSLIM_TOME_REFERENCE")
needs_reference = pytest.mark.skipif(not REFERENCE, reason="set PATCHSLIM_TOME_REFERENCE to a ToMe checkout")


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("tome_reference", ROOT / "benchmarks" / "tome_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_harness_refuses_a_missing_or_wrong_reference_with_a_message(harness, tmp_path, capsys):
    assert harness.main([]) == 2
    assert "--reference PATH is required" in capsys.readouterr().err
    assert harness.main(["--reference", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert harness.main(["--reference", str(tmp_path)]) == 2  # a folder without tome/
    err = capsys.readouterr().err
    assert "is not a ToMe checkout" in err and "tome/merge.py" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--r", "8,x"], "--r must be comma-separated non-negative integers"),
    (["--r", "-1"], "--r must be comma-separated non-negative integers"),
    (["--models", "deit_small_patch16_224:max"], "the only variant is NAME:avg"),
    (["--models", " , "], "--models must name at least one model"),
    (["--batch", "0"], "batch sizes must be at least 1"),
    (["--time", "--batches", "1,0"], "batch sizes must be at least 1"),
    (["--time", "--repeats", "0"], "--repeats must be at least 1"),
    (["--img-size", "0"], "--img-size must be at least 1"),
])
def test_harness_checks_its_arguments(harness, tmp_path, argv, message):
    with pytest.raises(harness.HarnessError, match=message):
        harness.parse_args(["--reference", str(tmp_path)] + argv)


def test_harness_defaults_and_model_variants(harness, tmp_path):
    args = harness.parse_args(["--reference", str(tmp_path)])
    assert args.r == (8, 13) and args.batch == 4 and args.models[:2] == ("deit_small_patch16_224",
                                                                         "vit_small_patch16_224:avg")
    assert harness.parse_args(["--reference", str(tmp_path), "--time"]).r == (8, 13, 16)
    assert harness.parse_args(["--reference", str(tmp_path), "--time"]).batches == (1, 32)
    assert harness.parse_model("vit_small_patch16_224:avg") == (
        "vit_small_patch16_224", {"class_token": False, "global_pool": "avg"})
    command = harness.command_line(harness.parse_args(["--reference", str(tmp_path), "--r", "13"]))
    assert "--reference PATH" in command and str(tmp_path) not in command and "--r 13" in command


@needs_reference
def test_tome_gives_the_reference_logits(harness):
    # 64-px images: 16 patches, so r = 5 also runs into the cap (at most half of the tokens per block)
    models = ("deit_tiny_patch16_224", "vit_tiny_patch16_224:avg", "deit_tiny_distilled_patch16_224")
    rows = harness.compare(REFERENCE, models, rs=(3, 5), batch=2, img_size=64)
    assert len(rows) == 3 * 4
    for row in rows:
        assert row.max_abs_diff < 1e-4, row  # the sanity rows (r = 0 against timm) too
        assert row.tokens_ours == row.tokens_reference, row
        if row.r not in ("ref r=0", "ours keep-all"):
            assert row.same_provenance, row
    # 16 -> 11 -> 6 -> 3 -> 2 -> 1 patch tokens, plus no CLS / a CLS / a CLS and a distillation token
    assert sorted(row.tokens_ours for row in rows if row.r == "5") == [1, 2, 3]


@needs_reference
def test_timing_mode_runs_every_side_on_a_tiny_input(harness):
    rows = harness.time_both(REFERENCE, ("deit_tiny_patch16_224",), rs=(2, 3), batches=(1, 2), repeats=1,
                             warmup=0, img_size=64)
    assert [(row.batch, row.r) for row in rows] == [(1, 2), (1, 3), (2, 2), (2, 3)]
    table = harness.timing_table(rows)
    assert table.count("\n") == 5 and "ours / reference" in table  # correctness only: no time is asserted
