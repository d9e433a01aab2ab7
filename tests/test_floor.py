"""The latency floor: the model's own timm blocks on the token counts each block saw in the slimmed run."""

from __future__ import annotations

import pytest
import torch

import patchslim
from patchslim import metrics
from patchslim.plan import SlimPlan, Stage

PLANS = {
    "random@0": SlimPlan.single("random", 0.5),
    "tome": SlimPlan.single("tome", 0.5),  # a merge inside every block: attention and MLP counts differ
    "evit": SlimPlan.single("evit", 0.5),
    "grid + attention@3": SlimPlan((Stage("grid", 0.5), Stage("attention", 0.5, blocks=(3,)))),
}


def seen_counts(model, run_floor) -> list[tuple[int, int]]:
    """(tokens into attention, tokens into the MLP) of every timm block while ``run_floor()`` runs."""
    seen: dict[tuple[int, str], int] = {}
    hooks = []
    for i, block in enumerate(model.model.blocks):
        for part in ("attn", "mlp"):
            hooks.append(getattr(block, part).register_forward_hook(
                lambda module, args, out, key=(i, part): seen.__setitem__(key, args[0].shape[1])))
    try:
        run_floor()
    finally:
        for hook in hooks:
            hook.remove()
    return [(seen[(i, "attn")], seen[(i, "mlp")]) for i in range(len(model.model.blocks))]


@pytest.mark.parametrize("label", list(PLANS))
def test_the_floor_runs_the_traces_per_block_counts(fashion_random, fashion_batch, label):
    x = fashion_batch[0][:2]
    trace = patchslim.run(fashion_random, x, PLANS[label])
    counts = metrics.floor_counts(trace)
    assert counts == [(b.tokens_attention, b.tokens_mlp) for b in trace.blocks]
    assert any(a < fashion_random.spec.block_tokens(i) for i, (a, _) in enumerate(counts))  # the plan slimmed
    floor = metrics.floor_forward(fashion_random, x, trace)
    assert seen_counts(fashion_random, floor) == counts
    assert floor().shape == trace.logits.shape


def test_the_floor_of_keep_all_is_the_model_itself(fashion_random, fashion_batch):
    x = fashion_batch[0][:3]
    trace = patchslim.run(fashion_random, x, SlimPlan())
    with torch.inference_mode():
        expected = fashion_random.model(x)
    assert torch.equal(metrics.floor_forward(fashion_random, x, trace)(), expected)


def test_compare_latency_times_the_floor_in_the_rotation(fashion_random, fashion_batch):
    x = fashion_batch[0][:2]
    timing = metrics.compare_latency(fashion_random, x, SlimPlan.single("tome", 0.5), warmup=0, repeats=3, floor=True)
    assert timing.floor is not None and timing.floor.repeats == 3
    ratios = [f / s for f, s in zip(timing.floor.samples_ms, timing.slimmed.samples_ms)]
    assert timing.vs_floor == pytest.approx(sorted(ratios)[1])
    assert timing.to_dict()["vs_floor"] == timing.vs_floor
    plain = metrics.compare_latency(fashion_random, x, SlimPlan.single("tome", 0.5), warmup=0, repeats=1)
    assert plain.floor is None and plain.vs_floor is None and plain.floor_speedup is None


def test_swin_says_why_it_has_no_floor(fashion_batch):
    model = patchslim.load_model("fashion-swin", pretrained=False)
    x = fashion_batch[0][:1]
    timing = metrics.compare_latency(model, x, SlimPlan.single("random", 0.5), warmup=0, repeats=1, floor=True)
    assert timing.floor is None and "full windows" in timing.floor_reason
    with pytest.raises(NotImplementedError, match="full windows"):
        metrics.floor_forward(model, x, patchslim.run(model, x, SlimPlan.single("random", 0.5)))
