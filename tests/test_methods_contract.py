"""The contract every registered slimming method keeps, generated from the registry.

A learned method is left out only when this machine has no trained policy for the model (its ``check``
says so); every other method runs every test.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import patchslim
from patchslim import PatchslimError, PlanError, SlimPlan
from patchslim.methods import get_method, method_names
from patchslim.tokens import target_count

METHODS = method_names()
# Methods whose one action keeps ctx.target tokens; grid (G x G) and evit (ceil + a fused token) keep
# their own counts, tested exactly in test_methods_math.py.
EXACT_COUNT_METHODS = [name for name in METHODS if get_method(name).exact_count]
# The bundled architecture (1 prefix token, 12 x 12 grid, depth 6) and distilled DeiTs (2 prefix tokens).
CONTRACT_MODELS = ["fashion_random", "deit_tiny_distilled_random", "deit_small_distilled_random"]
CHEAP_MODELS = ["fashion_random", "deit_tiny_distilled_random"]
RHO = 0.6


def _inputs(model, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(batch, model.spec.in_chans, *model.spec.img_size, generator=g)


def _usable(name: str, model) -> None:
    """Skips a learned method without a policy for ``model``; never skips anything else."""
    method = get_method(name)
    if not method.learned:
        return
    try:
        method.check(method.parse_options({}), RHO, model)
    except PatchslimError as error:
        pytest.skip(f"learned method {name!r} has no policy for {model.name}: {error}")


def _capture(monkeypatch, name: str) -> list:
    """Records (state before, context, reduction) of every action of method ``name``."""
    method = get_method(name)
    calls = []
    original = method.reduce

    def recording(state, ctx):
        reduction = original(state, ctx)
        calls.append((state, ctx, reduction))
        return reduction

    monkeypatch.setattr(method, "reduce", recording)
    return calls


def _check_provenance(before, after, num_patches: int) -> None:
    prov = after.provenance
    assert prov.count == after.count and prov.batch == after.tokens.shape[0]
    if prov.is_plain:
        ids = prov.ids
        assert int(ids.min()) >= 0 and int(ids.max()) < num_patches
        for row in ids:
            assert row.unique().numel() == row.numel(), "a patch id appears twice"
        return
    weights = prov.dense()
    assert weights.shape == (after.tokens.shape[0], after.count, num_patches)
    assert torch.isfinite(weights).all()
    assert (weights.abs().sum(-1) > 0).all(), "a token stands for no patch"
    if (weights >= 0).all():  # merges: each original patch is spent at most once
        assert (weights.sum(1) <= 1 + 1e-5).all()
    elif before.provenance.is_plain:  # a projection of plain patches: orthonormal loadings
        gram = weights @ weights.transpose(1, 2)
        eye = torch.eye(after.count).expand_as(gram)
        torch.testing.assert_close(gram, eye, atol=1e-4, rtol=0)


def test_registry_has_the_methods_of_the_issue():
    expected = {"random", "uniform", "grid", "lowrank", "entropy", "attention", "tome", "evit",
                "tofu", "pitome", "ppt", "zerotprune"}
    assert expected <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_method_describes_itself(name):
    method = get_method(name)
    module = importlib.import_module(type(method).__module__)
    assert module.__doc__ and len(module.__doc__) > 100
    for text in (method.summary, method.explanation, method.equation, method.reference):
        assert text.strip()
    assert "\n" not in method.summary
    assert method.point in ("pre", "mid")
    if method.point == "mid" or method.needs_attention or method.needs_keys:
        assert method.input_dependent
    info = method.info()
    assert info["name"] == name and "exact_count" in info


@pytest.mark.parametrize("name", METHODS)
def test_bad_options_name_the_parameter_and_range(name):
    method = get_method(name)
    with pytest.raises(PlanError, match="no option"):
        SlimPlan.single(name, 0.5, no_such_option=1)
    for spec in method.options:
        bad = []
        if spec.choices:
            bad.append("no-such-choice")
        if spec.minimum is not None:
            bad.append(spec.minimum - 1)
        if spec.maximum is not None:
            bad.append(spec.maximum + 1)
        for value in bad:
            with pytest.raises(PlanError, match=spec.name) as error:
                SlimPlan.single(name, 0.5, **{spec.name: value})
            assert spec.describe() in str(error.value) or "one of" in str(error.value)


@pytest.mark.parametrize("fixture", CONTRACT_MODELS)
@pytest.mark.parametrize("name", METHODS)
def test_contract(request, monkeypatch, name, fixture):
    """Shapes, prefix tokens, provenance, sizes, scores and counts of every action, batch of 2."""
    model = request.getfixturevalue(fixture)
    _usable(name, model)
    calls = _capture(monkeypatch, name)
    x = _inputs(model)
    trace = patchslim.run(model, x, SlimPlan.single(name, RHO, seed=3))
    spec, p, n = model.spec, model.num_prefix_tokens, model.num_patches
    assert trace.logits.shape == (2, spec.num_classes) and torch.isfinite(trace.logits).all()
    assert calls, "the method never acted"
    for before, ctx, reduction in calls:
        after = reduction.state
        assert after.num_prefix == p == before.num_prefix
        assert after.tokens.shape[0] == 2 and after.tokens.shape[-1] == before.tokens.shape[-1]
        assert torch.equal(after.prefix, before.prefix), "prefix tokens changed at the prune point"
        assert 1 <= after.count <= before.count
        _check_provenance(before, after, n)
        if after.sizes is not None:
            assert after.sizes.shape == after.tokens.shape[:2]
            assert (after.sizes > 0).all()
            assert torch.equal(after.sizes[:, :p], torch.ones(2, p, dtype=after.sizes.dtype))
            if before.sizes is not None and (after.provenance.dense() >= 0).all():
                # sizes add up over merges; a token pruned away takes its size with it (ppt may do either)
                still_there = ((before.provenance.dense() > 0) & after.provenance.patch_mask()[:, None, :]).any(-1)
                torch.testing.assert_close(after.sizes[:, p:].sum(1),
                                           (before.sizes[:, p:].float() * still_there).sum(1))
        if reduction.scores is not None:
            assert reduction.scores.shape == (2, before.count)
            assert torch.isfinite(reduction.scores).all()
        assert reduction.selection_macs >= 0 and reduction.selection_macs == reduction.selection_macs
    for this, following in zip(trace.blocks, trace.blocks[1:]):
        assert following.tokens_attention <= this.tokens_mlp <= this.tokens_attention
    assert trace.final_provenance.count == trace.final_tokens - p
    assert trace.keep_ratio == pytest.approx(trace.final_provenance.count / n)
    assert len(trace.stages) == len(calls)


@pytest.mark.parametrize("fixture", ["deit_tiny_random", "fashion_random"])
@pytest.mark.parametrize("name", EXACT_COUNT_METHODS)
def test_rho_reached_within_one_token(request, name, fixture):
    """A single-stage plan at its default places reaches round(rho N) within one token."""
    model = request.getfixturevalue(fixture)
    _usable(name, model)
    method = get_method(name)
    trace = patchslim.run(model, _inputs(model, 1), SlimPlan.single(name, RHO))
    n = model.num_patches
    reached = trace.final_provenance.count
    blocks = method.default_blocks(model.spec.depth)
    expected = target_count(RHO, n)
    # Several pruning actions: rho of what each receives, unless the method spreads rho over its stage.
    if len(blocks) > 1 and not (method.merges or method.spreads_keep_ratio):
        for _ in blocks[1:]:
            expected = target_count(RHO, expected)
    assert abs(reached - expected) <= 1, (reached, expected)


@pytest.mark.parametrize("fixture", CHEAP_MODELS)
@pytest.mark.parametrize("name", METHODS)
def test_deterministic_for_a_seed(request, name, fixture):
    model = request.getfixturevalue(fixture)
    _usable(name, model)
    x = _inputs(model)
    a = patchslim.run(model, x, SlimPlan.single(name, 0.5, seed=5))
    b = patchslim.run(model, x, SlimPlan.single(name, 0.5, seed=5))
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.final_provenance.dense(), b.final_provenance.dense())
    assert a.tokens_per_block == b.tokens_per_block


@pytest.mark.parametrize("fixture", ["deit_tiny_random", *CHEAP_MODELS])
@pytest.mark.parametrize("name", METHODS)
def test_keep_everything_gives_the_unslimmed_logits(request, name, fixture):
    model = request.getfixturevalue(fixture)
    _usable(name, model)
    x = _inputs(model)
    with torch.inference_mode():
        reference = model.model(x)
    trace = patchslim.run(model, x, SlimPlan.single(name, 1.0))
    assert float((trace.logits - reference).abs().max()) < 1e-5
    assert trace.keep_ratio == 1.0
    assert trace.tokens_per_block == [model.num_patches + model.num_prefix_tokens] * model.spec.depth
