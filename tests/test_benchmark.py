"""``python -m patchslim benchmark`` on a tiny configuration: the files it writes and what is in them.

The bundled model with random weights, batch 2, two repeats: the numbers are not benchmarks, but the
columns, the ideal speed-up (the GMAC ratio of the engine's own count), the efficiency (measured / ideal)
and the join with an accuracy table must be right.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import patchslim
from patchslim import SlimPlan, metrics
from patchslim.benchmarks import common
from patchslim.benchmarks.accuracy_table import NOT_MEASURED
from patchslim.cli import main

METHODS = ("random", "evit")
BATCH = 2


def read(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["benchmark", "--which", "table3,figure1,table1,table2,target", "--out", str(out),
                 "--models", "fashion-vit", "--model", "fashion-vit", "--memory-model", "fashion-vit",
                 "--no-pretrained", "--methods", ",".join(METHODS), "--target-methods", "random@0,evit",
                 "--batch-sizes", str(BATCH), "--batch", str(BATCH), "--repeats", "2", "--warmup", "0",
                 "--ratios", "1.0,0.5", "--no-png", "--no-progress"])
    assert code == 0
    return out


def test_every_benchmark_writes_csv_and_markdown(written):
    for stem in ("table3_latency", "figure1_flops", "table1_overhead", "table2_costs", "target"):
        assert (written / f"{stem}.csv").stat().st_size > 0
        text = (written / f"{stem}.md").read_text()
        assert text.startswith("# ") and "Command: `python -m patchslim benchmark" in text
        assert "Load average" in text and "| method |" in text
    assert (written / "figure1_flops.html").stat().st_size > 0
    assert not (written / "figure1_flops.png").exists()  # --no-png


def test_table3_ideal_speedup_is_the_engines_gmac_ratio(written, fashion_random):
    rows = read(written / "table3_latency.csv")
    assert [r["method"] for r in rows] == list(METHODS)
    for column in ("baseline_ms", "slimmed_ms", "speedup", "ideal_speedup", "efficiency", "baseline_gmacs", "gmacs",
                   "mean_keep_ratio", "placement", "repeats"):
        assert column in rows[0]
    images = common.random_images(fashion_random, BATCH)
    for row in rows:
        trace = patchslim.run(fashion_random, images, SlimPlan.single(row["method"], 0.5))
        expected = metrics.baseline_macs(fashion_random.spec).total / metrics.count_macs(trace).total
        assert float(row["ideal_speedup"]) == pytest.approx(expected, rel=1e-4)
        assert float(row["ideal_speedup"]) > 1.5  # rho 0.5 removes well over a third of the work
        assert float(row["efficiency"]) == pytest.approx(float(row["speedup"]) / float(row["ideal_speedup"]),
                                                         rel=1e-4)
        assert float(row["baseline_ms"]) > 0 and float(row["slimmed_ms"]) > 0
        assert int(row["batch"]) == BATCH and int(row["repeats"]) == 2
    assert rows[0]["placement"] == "input" and rows[1]["placement"].startswith("in ")


def test_figure1_reduction_follows_the_token_counts(written, fashion_random):
    rows = read(written / "figure1_flops.csv")
    assert {(r["method"], float(r["keep_ratio"])) for r in rows} == {(m, k) for m in METHODS for k in (1.0, 0.5)}
    base = metrics.baseline_macs(fashion_random.spec).gmacs
    for row in rows:
        trace = patchslim.run(fashion_random, common.random_images(fashion_random, 1),
                              SlimPlan.single(row["method"], float(row["keep_ratio"])))
        assert float(row["flops_reduction_pct"]) == pytest.approx(100 * (1 - metrics.gmacs(trace) / base), abs=1e-3)
    half = {r["method"]: float(r["flops_reduction_pct"]) for r in rows if float(r["keep_ratio"]) == 0.5}
    assert all(value > 30 for value in half.values())


def test_table1_flags_overhead_and_missing_accuracy(written):
    rows = {r["method"]: r for r in read(written / "table1_overhead.csv")}
    assert rows["random"]["input_dependent"] == "False" and rows["evit"]["input_dependent"] == "True"
    for row in rows.values():
        assert 0 <= float(row[f"selection_pct_b{BATCH}"]) < 100
        assert 0 <= float(row[f"selection_ms_b{BATCH}"]) < float(row[f"forward_ms_b{BATCH}"])
        assert row["accuracy_loss_pp_rho0.5"] == NOT_MEASURED
        assert row["own_work_within_5pct"] == str(float(row[f"selection_pct_b{BATCH}"]) <= 5.0)
    assert NOT_MEASURED in (written / "table1_overhead.md").read_text()
    # random reads nothing; evit (3 stages on the 6-block model) reads CLS rows, computed beside fused attention
    assert rows["random"]["attention"] == "none" and rows["evit"]["attention"] == "CLS rows in 3 blocks"


def test_table1_names_the_attention_each_newer_method_needs(fashion_random):
    from patchslim.benchmarks.table1 import attention_computed
    from patchslim.plan import SlimPlan

    depth = fashion_random.spec.depth
    assert attention_computed(fashion_random, SlimPlan.single("zerotprune", 0.5)) == f"full in {depth} blocks"
    assert attention_computed(fashion_random, SlimPlan.single("ppt", 0.5)) == "CLS rows in 3 blocks"
    assert attention_computed(fashion_random, SlimPlan.single("tome", 0.5)) == f"keys in {depth} blocks"
    assert attention_computed(fashion_random, SlimPlan.single("pitome", 0.5)).startswith("keys in ")
    # a map kept for the view turns CLS rows into the full probabilities in that block
    kept = SlimPlan.single("ppt", 0.5, attention_blocks=(1,))
    assert attention_computed(fashion_random, kept) == "full in 1 block, CLS rows in 2 blocks"


def test_target_marks_each_method(written):
    rows = {r["method"]: r for r in read(written / "target.csv")}
    assert set(rows) == {"random@0", "evit"}
    for row in rows.values():
        met = float(row["efficiency"]) >= 0.9 and float(row["selection_pct"]) < 5
        assert row["met"] == str(met)


def test_table2_memory_columns(written):
    rows = read(written / "table2_costs.csv")
    assert len(rows) == len(METHODS) * 2
    for row in rows:
        for column in ("flops_reduction_pct", "memory_reduction_pct_b1", f"memory_reduction_pct_b{BATCH}",
                       f"estimated_memory_reduction_pct_b{BATCH}"):
            assert column in row and row[column] != ""
    pruned = next(r for r in rows if r["method"] == "random" and float(r["keep_ratio"]) == 0.5)
    assert float(pruned["memory_reduction_pct_b1"]) > 20  # half the tokens, well under the unslimmed peak


def test_accuracy_table_is_joined(tmp_path):
    code = main(["evaluate", "--model", "fashion-vit", "--no-pretrained", "--data", "bundled", "--limit", "16",
                 "--methods", "random", "--keep", "1.0,0.5", "--out", str(tmp_path), "--no-png", "--no-progress"])
    assert code == 0
    record = json.loads((tmp_path / "accuracy.json").read_text())
    half = next(r for r in record["rows"] if r["keep_ratio"] == 0.5)
    expected = 100 * (record["baseline_top1"] - half["top1"])
    code = main(["benchmark", "--which", "table1,table2", "--out", str(tmp_path), "--model", "fashion-vit",
                 "--no-pretrained", "--methods", "random", "--batch-sizes", "1", "--batch", "1", "--repeats", "1",
                 "--no-progress"])
    assert code == 0
    table1 = read(tmp_path / "table1_overhead.csv")[0]
    assert float(table1["accuracy_loss_pp_rho0.5"]) == pytest.approx(expected, abs=1e-3)
    table2 = {float(r["keep_ratio"]): r for r in read(tmp_path / "table2_costs.csv")}
    assert set(table2) == {1.0, 0.5}  # the accuracy table's ratios
    assert float(table2[0.5]["top1_loss_pp"]) == pytest.approx(expected, abs=1e-3)
    assert float(table2[1.0]["top1_pct"]) == pytest.approx(100 * record["baseline_top1"], abs=1e-3)


def test_unknown_benchmark_is_one_error_line(capsys):
    assert main(["benchmark", "--which", "table9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --which") and "table3" in err and "Traceback" not in err


def test_which_all_is_every_benchmark_and_costs_the_cost_tables():
    from patchslim.benchmarks import BENCHMARKS, GROUPS
    from patchslim.cli import build_parser
    from patchslim.commands.benchmark import configs

    def chosen(*argv):
        return list(configs(build_parser().parse_args(["benchmark", *argv])))

    assert chosen("--which", "all") == list(BENCHMARKS) == ["accuracy", "budgets", "budget_target", "audit_fashion",
                                                              "faithfulness", "figure1", "table2", "table1", "table3",
                                                              "target", "ray_scale", "compression", "int8_backends"]
    assert chosen() == list(GROUPS["costs"]) == ["figure1", "table2", "table1", "table3", "target"]
    assert chosen("--which", "target,accuracy") == ["accuracy", "target"]  # the accuracy table first


def test_each_file_records_the_command_that_remakes_it_alone():
    from patchslim.cli import build_parser
    from patchslim.commands.benchmark import command_line

    args = build_parser().parse_args(["benchmark", "--which", "all", "--out", str(Path.cwd() / "x" / "out"),
                                      "--limit", "100", "--no-progress"])
    command = command_line(args, "table2")
    assert command == "python -m patchslim benchmark --which table2 --out x/out --limit 100 --no-progress"
    again = build_parser().parse_args(command.split()[3:])
    assert command_line(again) == command


def test_portable_text_keeps_no_absolute_path(fashion_trained):
    root = common.PACKAGE_ROOT
    text = (f"fashion-vit (file {root / 'assets' / 'fashion_vit.safetensors'}); no policy at /srv/x/p.safetensors. "
            "rho 0.7/0.5, https://cdn.plot.ly/plotly.min.js, C:\\Users\\me\\w.pt, top-1 / top-5")
    assert common.portable_text(text) == ("fashion-vit (file assets/fashion_vit.safetensors); no policy at "
                                          "p.safetensors. rho 0.7/0.5, https://cdn.plot.ly/plotly.min.js, w.pt, "
                                          "top-1 / top-5")
    source = common.portable_model(fashion_trained).weights_source
    assert source.startswith("file ") and source.endswith("fashion_vit.safetensors") and " /" not in source


@pytest.fixture(scope="module")
def labelled_written(tmp_path_factory):
    """The accuracy table and the worked audit, tiny: 16 bundled images, random weights, one method."""
    out = tmp_path_factory.mktemp("labelled")
    code = main(["benchmark", "--which", "accuracy,audit_fashion", "--out", str(out), "--data", "bundled",
                 "--limit", "16", "--methods", "random", "--ratios", "1.0,0.5", "--no-pretrained",
                 "--work", str(out / "work"), "--no-png", "--no-progress"])
    assert code == 0
    return out


def test_accuracy_table_files_name_their_command(labelled_written):
    record = json.loads((labelled_written / "accuracy.json").read_text())
    assert record["command"].startswith("python -m patchslim benchmark --which accuracy ")
    assert record["n"] == 16 and {r["method"] for r in record["rows"]} == {"random"}
    assert f"Command: `{record['command']}`" in (labelled_written / "accuracy.md").read_text()
    rows = read(labelled_written / "accuracy.csv")  # a plain table: the header is its first line
    assert {float(r["keep_ratio"]) for r in rows} == {1.0, 0.5}


def test_audit_example_files_name_their_command(labelled_written):
    folder = labelled_written / "audit_fashion"
    assert {p.name for p in folder.iterdir()} == {"audit.html", "audit.json", "audit_groups.csv",
                                                  "audit_disparity.csv", "audit_skipped.csv", "summary.txt"}
    command = json.loads((folder / "audit.json").read_text())["command"]
    assert command.startswith("python -m patchslim benchmark --which audit_fashion ")
    assert (folder / "summary.txt").read_text().startswith(f"Command: {command}\n")
    assert (labelled_written / "work" / "parts").is_dir()  # the resumable parts stay out of the results
    assert read(folder / "audit_groups.csv")[0]["method"] == "random"


def test_written_files_hold_no_absolute_path(labelled_written, written):
    for folder in (labelled_written, written):
        for path in folder.rglob("*"):
            if (path.is_file() and path.suffix in {".md", ".json", ".csv", ".txt", ".html"}
                    and "work" not in path.relative_to(folder).parts):
                text = path.read_text(encoding="utf-8")
                assert str(folder) not in text and str(common.PACKAGE_ROOT) not in text, path.name


# --------------------------------------------------------------------------- hot-path fixes the benchmarks led to

@pytest.mark.parametrize("method, options", [("evit", {}), ("attention", {"score": "cls"})])
def test_cls_attention_readers_keep_fused_attention_with_the_same_result(fashion_random, method, options):
    """EViT and CLS-attention pruning read only the prefix rows: the engine computes those rows beside fused
    attention instead of the full [B, H, T, T] map, and the result is the one the full map gives."""
    from patchslim.engine import attention_blocks
    from patchslim.metrics.memory import explicit_attention_blocks

    images = common.random_images(fashion_random, 3, seed=1)
    plan = SlimPlan.single(method, 0.5, **options)
    read = {a.attention_block for a in plan.resolve(fashion_random.spec.depth)}
    explicit, prefix_rows = attention_blocks(plan, fashion_random.spec.depth)
    assert explicit == set() and prefix_rows == read
    fast = patchslim.run(fashion_random, images, plan)
    full = patchslim.run(fashion_random, images, plan.with_attention(tuple(read)))  # maps kept: the full path
    assert fast.attention == {} and sorted(full.attention) == sorted(read)
    torch.testing.assert_close(fast.logits, full.logits, atol=1e-4, rtol=0)
    for a, b in zip(fast.stages, full.stages):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=0)
    assert explicit_attention_blocks(fast) == set() and explicit_attention_blocks(full) == read
    assert (metrics.estimate_activation_memory(fast).peak_bytes
            < metrics.estimate_activation_memory(full).peak_bytes)


def test_received_attention_still_gets_the_full_map(fashion_random):
    plan = SlimPlan.single("attention", 0.5, score="received")
    from patchslim.engine import attention_blocks

    explicit, prefix_rows = attention_blocks(plan, fashion_random.spec.depth)
    assert prefix_rows == set() and explicit == {a.attention_block for a in plan.resolve(fashion_random.spec.depth)}


def test_faithfulness_table_names_its_command(tmp_path):
    argv = ["benchmark", "--which", "faithfulness", "--out", str(tmp_path), "--data", "bundled", "--limit", "2",
            "--no-pretrained", "--steps", "3", "--methods", "attention", "--maps", "rollout,occlusion",
            "--eval-batch-size", "1", "--work", str(tmp_path / "work"), "--no-progress"]
    code = main(argv)
    assert code == 0
    record = json.loads((tmp_path / "faithfulness.json").read_text())
    assert record["command"].startswith("python -m patchslim benchmark --which faithfulness ")
    assert record["n"] == 2 and record["steps"] == 3 and record["modes"] == ["token", "pixel"]
    kinds = {"rollout", "occlusion", "random"}
    assert {(r["method"], r["mode"], r["map"]) for r in record["rows"]} == {
        (m, mode, k) for m in ("unslimmed", "attention") for mode in ("token", "pixel") for k in kinds}
    text = (tmp_path / "faithfulness.md").read_text()
    assert f"Command: `{record['command']}`" in text and "| map | unslimmed | attention rho 0.5 |" in text
    assert str(tmp_path) not in text and str(common.PACKAGE_ROOT) not in text
    assert read(tmp_path / "faithfulness.csv")[0]["method"] == "unslimmed"
    assert "partial" not in text and record["planned"] == 2
    # a run stopped after its first image: --partial writes the table of the parts there, under the same command
    (tmp_path / "work" / "batch_00001.npz").unlink()
    assert main(argv + ["--partial"]) == 0
    partial = json.loads((tmp_path / "faithfulness.json").read_text())
    assert partial["command"] == record["command"] and (partial["n"], partial["planned"]) == (1, 2)
    assert "a partial run: 1 of the 2" in (tmp_path / "faithfulness.md").read_text()
