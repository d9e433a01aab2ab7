"""Compute budgets (patchslim.budget): the search on fake cost functions, every registered method landing within
2 % of a budget it can reach on the bundled architecture, the refusals, the cache, and the commands' --budget."""

from __future__ import annotations

import json
import math

import pytest
import torch

import patchslim
from patchslim import budget as budgets
from patchslim.budget import Knob, Unreachable, plan_for_budget, search, solve_budget
from patchslim.errors import BudgetError, PatchslimError, PlanError
from patchslim.metrics.flops import baseline_macs, count_macs
from patchslim.plan import KeepSet, SlimPlan

pytestmark = pytest.mark.usefixtures("one_thread")

RATIO = Knob("keep_ratio", 1e-3, 1.0, resolution=1e-4)


def counting(cost):
    """``cost`` that counts its calls (in ``.calls``)."""

    def wrapped(x):
        wrapped.calls += 1
        return cost(x)

    wrapped.calls = 0
    return wrapped


# --------------------------------------------------------------------------- the search on fake costs

def test_bisection_lands_on_the_nearest_step_of_a_step_cost():
    # 144 tokens at one stage: the cost moves in steps of 1/144 (plus a fixed part that is not slimmed)
    def cost(rho):
        return 0.1 + 0.9 * max(1, round(rho * 144)) / 144

    found = search(cost, 0.5, RATIO)
    best = min((abs(cost(k / 144) - 0.5), k) for k in range(1, 145))
    assert abs(found.fraction - 0.5) == pytest.approx(best[0])
    assert abs(found.fraction / 0.5 - 1) <= 0.02
    assert cost(found.value) == found.fraction
    assert found.reachable == (pytest.approx(cost(1e-3)), pytest.approx(1.0))


def test_bisection_needs_few_evaluations():
    cost = counting(lambda rho: 0.05 + 0.95 * rho)
    found = search(cost, 0.42, RATIO)
    assert found.fraction == pytest.approx(0.42, abs=1e-3)
    assert cost.calls == found.evaluations <= budgets.SAMPLES + 2 + 15


def test_a_non_monotone_cost_is_searched_over_its_reachable_range():
    # lowrank's shape: a decomposition that costs 0.2 of the model below rho = 1 and nothing at rho = 1
    def cost(rho):
        return 1.0 if rho >= 1.0 else 0.2 + 0.95 * rho

    assert search(cost, 1.0, RATIO).value == 1.0  # only rho = 1 costs exactly the unslimmed model
    half = search(cost, 0.5, RATIO)
    assert half.fraction == pytest.approx(0.5, abs=1e-3) and half.value == pytest.approx(0.3 / 0.95, abs=1e-3)
    assert search(cost, 1.1, Knob("keep_ratio", 1e-3, 1.0)).fraction == pytest.approx(1.1, abs=2e-3)
    assert search(cost, 1.0, RATIO).reachable[1] > 1.1


def test_a_budget_outside_the_range_is_refused_with_the_range():
    with pytest.raises(Unreachable) as refused:
        search(lambda rho: 0.5 + 0.5 * rho, 0.3, Knob("keep_ratio", 0.0, 1.0))
    assert refused.value.reachable == (0.5, 1.0)
    assert "0.500 to 1.000" in str(refused.value) and "budget 0.3" in str(refused.value)


def test_a_budget_between_two_coarse_steps_is_refused_with_the_nearest_ones():
    # grid's shape: only a few counts exist
    def cost(rho):
        return 0.3 if rho < 0.5 else 0.6 if rho < 0.9 else 1.0

    with pytest.raises(Unreachable) as refused:
        search(cost, 0.45, RATIO)
    assert refused.value.below[1] == 0.3 and refused.value.above[1] == 0.6
    assert "0.300" in str(refused.value) and "0.600" in str(refused.value) and "2 %" in str(refused.value)
    assert search(cost, 0.6, RATIO).fraction == 0.6  # a step itself is reachable
    assert search(cost, 0.59, RATIO).fraction == 0.6  # within 2 %


def test_an_integer_knob_whose_cost_falls_as_it_grows():
    # a method whose knob is "tokens merged per block": more merging, less cost
    knob = Knob("r", 0, 72, integer=True)
    found = search(lambda r: 1.0 - r / 100, 0.5, knob, prefer_high=False)
    assert found.value == 50.0 and found.fraction == pytest.approx(0.5)
    assert float(found.value).is_integer()


def test_ties_go_to_more_tokens_and_fewer_decimals():
    def cost(rho):
        return math.floor(rho * 10) / 10  # every rho in [0.5, 0.6) costs 0.5

    found = search(cost, 0.5, RATIO)
    assert found.fraction == 0.5
    assert 0.5 <= found.value < 0.6 and round(found.value, 4) == found.value


def test_the_tolerance_is_relative_to_the_budget():
    def cost(rho):
        return 0.33 if rho < 0.5 else 1.0

    search(cost, 0.335, RATIO)  # 1.5 % away: accepted
    with pytest.raises(Unreachable):
        search(cost, 0.345, RATIO)  # 4.3 % away
    search(cost, 0.345, RATIO, tolerance=0.05)


# --------------------------------------------------------------------------- every registered method

def fixed_count(method: str) -> bool:
    return patchslim.get_method(method).adaptive_reason(patchslim.get_method(method).parse_options({})) is None


@pytest.mark.parametrize("method", patchslim.method_names())
def test_every_method_lands_within_two_percent_of_a_budget_it_can_reach(fashion_random, method):
    """The budget is the cost of the method's own plan at rho 0.6 (reachable by construction); the plan found costs
    it within 2 %, and running that plan on real images costs what the solution says."""
    slim = patchslim.get_method(method)
    if not fixed_count(method):
        with pytest.raises(BudgetError, match="image"):
            plan_for_budget(fashion_random, method, 0.6)
        return
    knob = budgets.method_knob(method, fashion_random.spec)
    probe = (SlimPlan.single(method, 0.6) if knob.name == "keep_ratio"
             else SlimPlan.single(method, 1.0, **{knob.name: int((knob.low + knob.high) / 2)}))
    images = torch.randn(3, *fashion_random.input_size, generator=torch.Generator().manual_seed(5))
    base = baseline_macs(fashion_random.spec).total
    target = count_macs(patchslim.run(fashion_random, images[:1], probe)).total / base
    solution = plan_for_budget(fashion_random, method, target)
    assert abs(solution.reached / target - 1) <= 0.02, (method, target, solution.reached)
    assert abs(solution.error) <= solution.tolerance
    ran = patchslim.run(fashion_random, images, solution.plan)
    assert count_macs(ran).total / base == pytest.approx(solution.reached, rel=1e-9)
    assert tuple(b.tokens_attention for b in ran.blocks) == solution.tokens_per_block
    assert solution.plan.stages[0].method == method and solution.knob == slim.budget_knob
    assert 0.0 < solution.keep_ratio <= 1.0


def test_the_full_model_is_budget_one(fashion_random):
    solution = plan_for_budget(fashion_random, "random", 1.0)
    assert solution.keep_ratio == 1.0 and solution.reached == 1.0


def test_more_budget_keeps_more_tokens(fashion_random):
    rhos = [plan_for_budget(fashion_random, "attention", b).keep_ratio for b in (0.45, 0.6, 0.8)]
    assert rhos == sorted(rhos) and len(set(rhos)) == 3


def test_the_budget_holds_at_another_placement(fashion_random):
    early = plan_for_budget(fashion_random, "random", 0.5, blocks=(1,))
    late = plan_for_budget(fashion_random, "random", 0.5, blocks=(3,))
    at_input = plan_for_budget(fashion_random, "random", 0.5)
    assert at_input.keep_ratio > early.keep_ratio > late.keep_ratio  # acting later, it must prune harder
    assert abs(late.error) <= 0.02 and late.plan.stages[0].blocks == (3,)
    assert plan_for_budget(fashion_random, "random", 0.5, options={"blocks": "3"}).plan == late.plan


def test_slim_plan_from_budget_is_the_solution_plan(fashion_random):
    plan = SlimPlan.from_budget(fashion_random, "evit", 0.6, seed=3)
    solution = plan_for_budget(fashion_random, "evit", 0.6, seed=3)
    assert plan == solution.plan and plan.seed == 3


def test_searches_are_cached_per_model_shape(fashion_random, fashion_trained, monkeypatch):
    budgets.clear_cache()
    calls = []
    real = budgets._dry_run
    monkeypatch.setattr(budgets, "_dry_run", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = plan_for_budget(fashion_random, "uniform", 0.55)
    searched = len(calls)
    again = plan_for_budget(fashion_trained, "uniform", 0.55, seed=7)  # same spec: no dry run at all
    assert len(calls) == searched and again.keep_ratio == first.keep_ratio and again.plan.seed == 7
    plan_for_budget(fashion_random, "uniform", 0.45)  # another budget reuses the sampled costs
    assert 0 < len(calls) - searched <= searched - budgets.SAMPLES - 2


def test_a_refusal_is_cached_too(fashion_random, monkeypatch):
    with pytest.raises(BudgetError):
        plan_for_budget(fashion_random, "tome", 0.3)
    calls = []
    monkeypatch.setattr(budgets, "_dry_run", lambda *a, **k: calls.append(1))
    with pytest.raises(BudgetError, match="0.5"):
        plan_for_budget(fashion_random, "tome", 0.3)
    assert not calls


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "half", None, True])
def test_budgets_outside_zero_one_are_refused_naming_the_parameter(fashion_random, bad):
    with pytest.raises(BudgetError, match=r"budget must be a fraction of the unslimmed GMACs in \(0, 1\]"):
        plan_for_budget(fashion_random, "random", bad)


def test_a_budget_the_method_cannot_reach_gives_its_range(fashion_random):
    with pytest.raises(BudgetError) as refused:
        plan_for_budget(fashion_random, "tome", 0.3)
    message = str(refused.value)
    assert "method 'tome'" in message and "budget 0.3" in message
    low, high = refused.value.reachable
    assert 0.45 < low < 0.55 and high >= 1.0
    assert f"{low:.3f} to {high:.3f}" in message


def test_adaptive_modes_are_refused_saying_why(fashion_random):
    with pytest.raises(BudgetError, match="tau") as entropy:
        plan_for_budget(fashion_random, "entropy", 0.5, options={"tau": 3.0})
    assert "differs per image" in str(entropy.value)
    with pytest.raises(BudgetError, match="bernoulli") as rl:
        plan_for_budget(fashion_random, "rl", 0.5, options={"mode": "bernoulli"})
    assert "differs per image" in str(rl.value)


def test_an_option_that_fixes_the_count_is_named(fashion_random):
    with pytest.raises(BudgetError, match="option 'r'=8") as refused:
        plan_for_budget(fashion_random, "tome", 0.6, options={"r": 8})
    assert "leave it unset" in str(refused.value)


def test_bad_options_and_blocks_are_plan_errors(fashion_random):
    with pytest.raises(PlanError, match="no option 'nope'"):
        plan_for_budget(fashion_random, "random", 0.5, options={"nope": 1})
    with pytest.raises(PlanError, match="outside the model"):
        plan_for_budget(fashion_random, "random", 0.5, blocks=(9,))
    with pytest.raises(PlanError, match="unknown method"):
        plan_for_budget(fashion_random, "nope", 0.5)


def test_a_count_that_changes_with_the_image_is_caught_even_undeclared(fashion_random):
    """A plan family whose count depends on the image without saying so: the second image catches it."""

    def positive_first_channel(state):  # a count per image
        return state.patches[..., 0] > 0

    by_content = SlimPlan((KeepSet(1, positive_first_channel),))
    target = budgets._dry_run(fashion_random, by_content).fraction
    with pytest.raises(BudgetError, match="different number of tokens on two images"):
        solve_budget(fashion_random, lambda value: by_content, target, RATIO)


# --------------------------------------------------------------------------- evaluate, audit, commands

def test_evaluate_at_budgets_lists_the_refused_pairs(fashion_random, fashion_sample):
    from patchslim.data import canvas_images
    from patchslim.evaluate import evaluate, parse_variants

    images, labels = fashion_sample
    data = canvas_images(images[:12], labels[:12], "sample")
    result = evaluate(fashion_random, data, parse_variants("random,tome"), None, batch_size=12, progress=False,
                      budgets=[0.7, 0.35])
    assert result.by_budget and result.columns == [0.7, 0.35]
    for row in result.rows:
        assert abs(row.budget_reached / row.budget - 1) <= 0.02
    assert {(r.method, r.budget) for r in result.rows} == {("random", 0.7), ("random", 0.35), ("tome", 0.7)}
    assert list(result.refused) == ["tome at budget 0.35"]
    text = result.markdown()
    assert "| method | budget 0.7 | budget 0.35 |" in text and "| tome | " in text and "n/a" in text
    with pytest.raises(BudgetError, match="give one"):
        evaluate(fashion_random, data, parse_variants("random"), [0.5], progress=False, budgets=[0.5])


def test_audit_plans_at_budgets(fashion_random):
    from patchslim.audit.runner import budget_audit_plans
    from patchslim.evaluate import parse_variants

    plans, refused = budget_audit_plans(fashion_random, parse_variants("random,tome"), [0.6, 0.35])
    assert [p.key for p in plans] == ["random__budget0.6", "random__budget0.35", "tome__budget0.6"]
    assert "tome at budget 0.35" in refused and plans[0].amount.startswith("budget 0.6 (rho ")
    with pytest.raises(BudgetError, match="no method meets"):
        budget_audit_plans(fashion_random, parse_variants("tome"), [0.35])


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m patchslim ARGS`` in this process: (exit code, stdout, stderr)."""
    from patchslim.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def canvas_png(tmp_path_factory, fashion_sample):
    from PIL import Image

    path = tmp_path_factory.mktemp("budget") / "canvas.png"
    Image.fromarray(fashion_sample[0][0]).save(path)
    return path


def test_run_with_a_budget(canvas_png, capsys):
    code, out, err = cli(capsys, "run", "--model", "fashion-vit", "--method", "attention", "--budget", "0.6",
                         "--image", str(canvas_png), "--repeats", "0", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["budget"] == 0.6 and abs(record["budget_reached"] / 0.6 - 1) <= 0.02
    assert record["keep_ratio_requested"] == record["plan"]["stages"][0]["keep_ratio"] < 1


@pytest.mark.parametrize("args, message", [
    (("--method", "random", "--budget", "0.5", "--keep", "0.5"), "--keep and --budget"),
    (("--method", "random", "--budget", "1.5"), "--budget must be a fraction of the unslimmed GMACs in (0, 1]"),
    (("--method", "tome", "--budget", "0.2"), "outside what it can reach"),
    (("--method", "entropy", "--budget", "0.5", "--opt", "tau=2"), "tau"),
])
def test_run_refuses_bad_budgets_in_one_line(canvas_png, capsys, args, message):
    code, _, err = cli(capsys, "run", "--model", "fashion-vit", *args, "--image", str(canvas_png), "--repeats", "0")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_command_lines_parse_budget_lists():
    from patchslim.cli import build_parser
    from patchslim.commands.benchmark import configs
    from patchslim.commands.evaluate import keep_or_budgets

    parser = build_parser()
    args = parser.parse_args(["evaluate", "--data", "bundled", "--methods", "random", "--budget", "0.7, 0.5"])
    assert keep_or_budgets(args) == (None, [0.7, 0.5])
    args = parser.parse_args(["audit", "--data", "bundled", "--methods", "random", "--out", "x"])
    assert keep_or_budgets(args, "0.7,0.5") == ([0.7, 0.5], None)
    for bad, message in (("0.7,0", "--budget must be"), ("0.5,0.5", "twice"), ("", "at least one")):
        args = parser.parse_args(["evaluate", "--data", "bundled", "--methods", "random", "--budget", bad])
        with pytest.raises(BudgetError, match=message):
            keep_or_budgets(args)
    args = parser.parse_args(["benchmark", "--which", "budgets", "--budgets", "0.8,0.6,0.4", "--data", "bundled"])
    config = configs(args)["budgets"]
    assert config.budgets == (0.8, 0.6, 0.4) and config.data == "bundled" and config.ranked_at == 0.6
    args = parser.parse_args(["benchmark", "--which", "budgets", "--budgets", "2"])
    with pytest.raises(BudgetError, match="--budgets"):
        configs(args)
    args = parser.parse_args(["benchmark", "--which", "budget_target"])
    assert configs(args)["budget_target"].selection_images == 10000
    args = parser.parse_args(["benchmark", "--which", "budget_target", "--selection-images", "300"])
    assert configs(args)["budget_target"].selection_images == 300
    args = parser.parse_args(["benchmark", "--which", "budget_target", "--selection-images", "0"])
    with pytest.raises(PatchslimError, match="--selection-images must be at least 1, got 0"):
        configs(args)


def test_evaluate_command_with_budgets(capsys):
    code, out, err = cli(capsys, "evaluate", "--model", "fashion-vit", "--data", "bundled", "--limit", "8",
                         "--methods", "uniform,tome", "--budget", "0.6,0.3", "--no-progress", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert {(r["method"], r["budget"]) for r in record["rows"]} == {("uniform", 0.6), ("uniform", 0.3),
                                                                    ("tome", 0.6)}
    assert "tome at budget 0.3" in record["refused"]


def test_the_budgets_benchmark_ranks_at_half_the_gmacs_and_names_its_command(tmp_path, capsys):
    code, _, err = cli(capsys, "benchmark", "--which", "budgets", "--out", str(tmp_path), "--data", "bundled",
                       "--limit", "16", "--methods", "random,tome", "--budgets", "0.7,0.5,0.35", "--no-pretrained",
                       "--no-png", "--no-progress")
    assert code == 0, err
    record = json.loads((tmp_path / "budgets.json").read_text())
    assert record["command"].startswith("python -m patchslim benchmark --which budgets ")
    text = (tmp_path / "budgets.md").read_text()
    assert f"Command: `{record['command']}`" in text and "Methods ranked by top-1 at a budget of 0.5" in text
    assert "tome at budget 0.35" in record["refused"] and "Target (at 0.5 of the unslimmed GMACs" in text
    ranked = [line.split(" | ")[1] for line in text.splitlines() if line.startswith(("| 1 | ", "| 2 | "))]
    top = {r["method"]: r["top1"] for r in record["rows"] if r["budget"] == 0.5}
    assert ranked == sorted(top, key=lambda m: -top[m])


def test_the_target_investigation_chooses_on_training_canvases(fashion_random):
    from patchslim.benchmarks.budget_target import CANDIDATES, BudgetTargetConfig, run_budget_target

    config = BudgetTargetConfig(pretrained=False, data="bundled", limit=12, selection_images=24, finalists=1,
                                candidates=tuple(c for c in CANDIDATES if c.label in (
                                    "evit (default: in 1+3+4)", "tome (default: every block)", "ppt@0+1")))
    result = run_budget_target(config)
    rows = [r for r in result.rows if r.get("rank")]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["selection_top1"] for r in rows] == sorted((r["selection_top1"] for r in rows), reverse=True)
    assert all(abs(r["reached"] / 0.5 - 1) <= 0.02 for r in rows)
    tested = [r for r in rows if r["test_top1"] is not None]
    assert len(tested) == 1 and tested[0]["rank"] == 1  # only the chosen finalist saw the test images
    assert "Chosen on the selection images" in result.body and "training split" in result.body


def test_the_newer_target_families_meet_half_the_gmacs(fashion_random):
    """Each plan family of the newer methods in the investigation has a plan at 0.5 of the GMACs on the bundled
    model's architecture, and the solved plan runs the stages the family names."""
    from patchslim.benchmarks.budget_target import CANDIDATES
    from patchslim.budget import method_knob, solve_budget

    knob = method_knob("random", fashion_random.spec)
    newer = [c for c in CANDIDATES if {"ppt", "zerotprune"} & {method for method, *_ in c.stages}]
    assert {"ppt", "zerotprune"} <= {method for c in newer for method, *_ in c.stages}
    for candidate in newer:
        solved = solve_budget(fashion_random, candidate.plan, 0.5, knob, what=candidate.label)
        assert abs(solved.reached / 0.5 - 1) <= 0.02, candidate.label
        assert [(s.method, s.blocks) for s in solved.plan.stages] == [(m, b) for m, _, b, _ in candidate.stages]
