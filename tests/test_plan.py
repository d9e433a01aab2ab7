"""SlimPlan validation: every bad value is a PlanError naming the parameter."""

from __future__ import annotations

import pytest

import patchslim
from patchslim import PlanError, SlimPlan, Stage, UnknownMethodError


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.01, float("nan"), "half"])
def test_keep_ratio_outside_zero_one_is_refused(rho):
    with pytest.raises(PlanError, match="keep_ratio"):
        SlimPlan.single("random", rho)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(UnknownMethodError, match="unknown method 'nope'; available: .*random"):
        SlimPlan.single("nope", 0.5)


def test_unknown_option_names_the_method_and_its_options():
    with pytest.raises(PlanError, match="method 'random' has no option 'r'"):
        SlimPlan.single("random", 0.5, r=3)


def test_block_outside_the_model_is_refused(deit_tiny_random, imagenet_batch):
    with pytest.raises(PlanError, match=r"block 12 is outside the model \(blocks 0..11\)"):
        patchslim.run(deit_tiny_random, imagenet_batch, SlimPlan.single("random", 0.5, blocks=(12,)))


def test_from_options_reads_blocks_as_placement():
    plan = SlimPlan.from_options("random", 0.5, {"blocks": "3, 6"})
    assert plan.stages[0].blocks == (3, 6)
    with pytest.raises(PlanError, match="blocks"):
        SlimPlan.from_options("random", 0.5, {"blocks": "three"})


def test_repeated_blocks_are_refused():
    with pytest.raises(PlanError, match="must not repeat"):
        Stage("random", 0.5, blocks=(2, 2))


def test_plan_round_trips_to_plain_data():
    plan = SlimPlan((Stage("random", 0.5, blocks=(1,)),), attention_blocks=(0,), seed=3)
    assert plan.to_dict() == dict(
        stages=[dict(method="random", keep_ratio=0.5, blocks=[1], options={})], seed=3, attention_blocks=[0]
    )


def test_every_method_default_options_round_trip_through_to_dict():
    """A plan written by to_dict() (fine-tuning cards, compression rows) reads back: an option left at its None
    default (attention's `score`: chosen by the model) is recorded as null and means unset again."""
    import json

    import patchslim

    for name in patchslim.method_names():
        plan = patchslim.SlimPlan.single(name, 0.5, blocks=None)
        read = patchslim.SlimPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
        assert dict(read.stages[0].options) == dict(plan.stages[0].options), name
        assert read.to_dict() == plan.to_dict(), name
