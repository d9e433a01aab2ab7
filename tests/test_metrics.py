"""Metrics: analytic GMACs against torch's counter and the published figures, latency, memory, predictions.

Published figures (224 px, GMACs = the papers' "GFLOPs"): DeiT-S 4.6, ViT-B/16 17.6, DeiT-Ti 1.3; ToMe on
DeiT-S r = 8 / 13 / 16 -> 3.4 / 2.7 / 2.3; EViT keep 0.7 (0.5) at blocks 4, 7, 10 -> 3.0 (2.3). The counts
come from Traces of real forwards of randomly initialized models.
"""

from __future__ import annotations

import pytest
import torch

import patchslim
from patchslim import SlimPlan, metrics
from patchslim.errors import PatchslimError

PUBLISHED_TOLERANCE = 0.05  # GMACs


def one_image(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- GMACs

@pytest.mark.parametrize("plan", [
    SlimPlan(),
    SlimPlan.single("random", 0.5),
    SlimPlan.single("random", 0.7, blocks=(3, 6, 9)),
], ids=["unslimmed", "random-input", "random-3-6-9"])
def test_analytic_macs_match_torch_flop_counter(deit_tiny_random, plan):
    x = one_image()
    counted = metrics.measured_macs(deit_tiny_random, x, plan)
    analytic = metrics.count_macs(patchslim.run(deit_tiny_random, x, plan)).total
    assert analytic == pytest.approx(counted, rel=0.01)


def test_two_heads_of_the_distilled_deit_are_counted(deit_small_distilled_random):
    x = one_image()
    report = metrics.count_macs(patchslim.run(deit_small_distilled_random, x))
    assert report.head == 2 * 384 * 1000
    assert report.total == pytest.approx(metrics.measured_macs(deit_small_distilled_random, x), rel=0.01)


@pytest.mark.parametrize("fixture, published", [
    ("deit_small_random", 4.6),
    ("deit_tiny_random", 1.3),
])
def test_published_gmacs_of_unslimmed_models(request, fixture, published):
    model = request.getfixturevalue(fixture)
    value = metrics.gmacs(patchslim.run(model, one_image()))
    assert abs(value - published) <= PUBLISHED_TOLERANCE, value


def test_published_gmacs_of_vit_base():
    model = patchslim.load_model("vit_base_patch16_224", device="cpu", pretrained=False)
    value = metrics.gmacs(patchslim.run(model, one_image()))
    assert abs(value - 17.6) <= PUBLISHED_TOLERANCE, value


@pytest.mark.parametrize("r, published", [(8, 3.4), (13, 2.7), (16, 2.3)])
def test_published_gmacs_of_tome_on_deit_small(deit_small_random, r, published):
    trace = patchslim.run(deit_small_random, one_image(), SlimPlan.from_options("tome", 1.0, {"r": r}))
    value = metrics.gmacs(trace)
    assert abs(value - published) <= PUBLISHED_TOLERANCE, value


@pytest.mark.parametrize("keep, published", [(0.7, 3.0), (0.5, 2.3)])
def test_published_gmacs_of_evit_on_deit_small(deit_small_random, keep, published):
    trace = patchslim.run(deit_small_random, one_image(), SlimPlan.from_options("evit", keep, {"blocks": "3,6,9"}))
    value = metrics.gmacs(trace)
    assert abs(value - published) <= PUBLISHED_TOLERANCE, value


def test_breakdown_adds_up_and_follows_token_counts(deit_tiny_random):
    trace = patchslim.run(deit_tiny_random, one_image(), SlimPlan.single("random", 0.5, blocks=(4,)))
    report = metrics.count_macs(trace)
    parts = sum(row["gmacs"] for row in report.rows())
    assert parts == pytest.approx(report.gmacs, rel=1e-9)
    assert len(report.blocks) == 12
    assert [b.tokens_attention for b in report.blocks] == trace.tokens_per_block
    assert report.blocks[3].total > report.blocks[4].total  # fewer tokens from block 4 on
    assert report.blocks[4].mlp == report.blocks[5].mlp


def test_selection_macs_are_added_to_their_block(deit_tiny_random):
    trace = patchslim.run(deit_tiny_random, one_image(), SlimPlan.from_options("tome", 1.0, {"r": 8}))
    report = metrics.count_macs(trace)
    assert report.selection == pytest.approx(sum(s.selection_macs for s in trace.stages))
    assert report.selection > 0
    assert report.blocks[0].selection == pytest.approx(trace.stages[0].selection_macs)


def test_keep_all_costs_the_baseline_and_reduction_grows_as_rho_falls(deit_tiny_random):
    x = one_image()
    assert metrics.compare_macs(patchslim.run(deit_tiny_random, x)).reduction == pytest.approx(0.0, abs=1e-12)
    reductions = [metrics.compare_macs(patchslim.run(deit_tiny_random, x, SlimPlan.single("random", rho))).reduction
                  for rho in (0.9, 0.7, 0.5, 0.3)]
    assert reductions == sorted(reductions) and reductions[-1] > 0.6
    comparison = metrics.compare_macs(patchslim.run(deit_tiny_random, x, SlimPlan.single("random", 0.5)))
    assert comparison.ideal_speedup == pytest.approx(comparison.baseline_gmacs / comparison.gmacs)


def test_macs_for_tokens_checks_the_depth(deit_tiny_random):
    with pytest.raises(ValueError, match="12 blocks"):
        metrics.macs_for_tokens(deit_tiny_random.spec, [197] * 3)
    baseline = metrics.baseline_macs(deit_tiny_random.spec).total
    assert metrics.macs_for_tokens(deit_tiny_random.spec, [197] * 12).total == baseline


# --------------------------------------------------------------------------- latency

def test_latency_fields_and_ordering(fashion_random):
    x = torch.zeros(2, 1, 48, 48)
    latency = metrics.measure_latency(fashion_random, x, warmup=1, repeats=5)
    assert latency.repeats == 5 and latency.warmup == 1 and latency.batch_size == 2
    assert latency.device == "cpu"
    assert 0 < latency.min_ms <= latency.q1_ms <= latency.median_ms <= latency.q3_ms <= latency.max_ms
    assert latency.iqr_ms >= 0
    assert latency.per_image_ms == pytest.approx(latency.median_ms / 2)
    assert set(latency.to_dict()) >= {"median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "repeats"}


def test_compare_latency_pairs_runs(fashion_random):
    x = torch.zeros(4, 1, 48, 48)
    comparison = metrics.compare_latency(fashion_random, x, SlimPlan.single("random", 0.5), warmup=1, repeats=4)
    assert comparison.baseline.repeats == comparison.slimmed.repeats == len(comparison.pair_ratios) == 4
    assert comparison.speedup > 0
    assert comparison.efficiency(2.0) == pytest.approx(comparison.speedup / 2.0)
    with pytest.raises(ValueError):
        metrics.compare_latency(fashion_random, x, SlimPlan(), repeats=0)


def test_selection_overhead_times_every_action(fashion_random):
    x = torch.zeros(2, 1, 48, 48)
    plan = SlimPlan.single("random", 0.7, blocks=(1, 3))
    overhead = metrics.measure_selection_overhead(fashion_random, x, plan, warmup=1, repeats=3)
    assert set(overhead.by_action) == {"random@1", "random@3"}
    assert len(overhead.selection_ms) == len(overhead.forward_ms) == 3
    assert all(0 < s < f for s, f in zip(overhead.selection_ms, overhead.forward_ms))
    assert 0 < overhead.share < 1
    clock: list = []
    patchslim.run(fashion_random, x, clock=clock)
    assert clock == []  # an unslimmed forward calls no method
    patchslim.run(fashion_random, x, plan, clock=clock)
    assert [(m, b) for m, b, _ in clock] == [("random", 1), ("random", 3)]
    assert all(seconds > 0 for _, _, seconds in clock)


# --------------------------------------------------------------------------- memory

@pytest.mark.parametrize("plan", [SlimPlan(), SlimPlan.single("random", 0.5), SlimPlan(attention_blocks=(3,))],
                         ids=["unslimmed", "random", "kept-attention"])
def test_cpu_memory_is_measured_and_the_estimate_agrees(deit_tiny_random, plan):
    report, trace = metrics.measure_memory(deit_tiny_random, torch.zeros(2, 3, 224, 224), plan)
    assert trace.batch_size == 2
    assert report.is_measured, report.measured_how
    assert "profiler" in report.measured_how
    # within 1 %: the estimate counts the tensors the forward keeps alive; a stray reference adds a [B, T, C] (~10 %)
    assert report.estimated_mb == pytest.approx(report.measured_mb, rel=0.01)
    assert report.weights_mb == pytest.approx(sum(p.numel() for p in deit_tiny_random.model.parameters()) * 4 / 2**20,
                                              rel=0.01)


def test_memory_reduction_of_input_pruning(deit_tiny_random):
    x = torch.zeros(2, 3, 224, 224)
    base, _ = metrics.measure_memory(deit_tiny_random, x)
    slim, _ = metrics.measure_memory(deit_tiny_random, x, SlimPlan.single("random", 0.5))
    comparison = metrics.compare_memory(slim, base)
    assert 0.3 < comparison.reduction < 0.6
    assert 0.3 < comparison.estimated_reduction < 0.6


def test_memory_estimate_only_when_not_measured(deit_tiny_random):
    report, _ = metrics.measure_memory(deit_tiny_random, torch.zeros(1, 3, 224, 224), measure=False)
    assert not report.is_measured and report.measured_mb is None
    assert report.activation_mb == report.estimated_mb > 0


def test_explicit_attention_costs_memory_in_the_estimate(deit_tiny_random):
    x = torch.zeros(1, 3, 224, 224)
    fused = metrics.estimate_activation_memory(patchslim.run(deit_tiny_random, x))
    explicit = metrics.estimate_activation_memory(patchslim.run(deit_tiny_random, x, SlimPlan(attention_blocks="all")))
    assert explicit.peak_bytes > fused.peak_bytes
    assert fused.batch_size == 1 and len(fused.per_block_bytes) == 12


def test_cuda_peak_memory_helpers_refuse_the_cpu():
    from patchslim.device import reset_peak_memory, supports_peak_memory

    assert not supports_peak_memory(torch.device("cpu"))
    with pytest.raises(PatchslimError):
        reset_peak_memory(torch.device("cpu"))


# --------------------------------------------------------------------------- predictions

def test_identical_predictions_change_nothing(fashion_random):
    x = torch.randn(3, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    trace = patchslim.run(fashion_random, x)
    change = metrics.prediction_change(trace, trace)
    assert change.top1_agreement == 1.0 and change.flip_rate == 0.0
    assert change.mean_top5_overlap == 1.0
    assert change.mean_kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert change.mean_confidence_change == pytest.approx(0.0, abs=1e-7)
    assert change.image(0)["label_before"] in fashion_random.class_names


def test_prediction_change_by_hand():
    before = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0, -3.0], [0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    after = torch.tensor([[0.0, 1.0, 2.0, -1.0, -2.0, 5.0], [0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    change = metrics.prediction_change(before, after)
    assert change.top1_before == (0, 1) and change.top1_after == (5, 1)
    assert change.label_flipped == (True, False) and change.top1_agreement == 0.5
    assert change.top5_overlap[0] == pytest.approx(4 / 5)  # class 5 replaced class 4
    p, q = before[0].softmax(-1), after[0].softmax(-1)
    assert change.kl_divergence[0] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    assert change.kl_divergence[1] == pytest.approx(0.0, abs=1e-6)
    assert change.confidence_before[0] == pytest.approx(float(p[0]))
    assert change.confidence_after[0] == pytest.approx(float(q[0]))
    assert change.confidence_change[0] < 0
    assert change.summary()["images"] == 2
    with pytest.raises(ValueError):
        metrics.prediction_change(before, after[:, :3])


def test_top_k_is_capped_at_the_number_of_classes():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    assert metrics.prediction_change(logits, logits.flip(-1)).top5_overlap == (1.0,)
