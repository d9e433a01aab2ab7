"""Deletion / insertion scores and gradient-weighted rollout (patchslim.explain.faithfulness, gradient_rollout).

The scores' math is checked on a toy ViT built by hand whose answer reads one patch only (its class token
attends to that patch's position and nothing else): there the right order is known. The rest runs on the bundled
architecture with random weights: keep-all slimming changes no score, a score costs the forwards it says, and bad
input is refused with the parameter named.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import patchslim
from patchslim import SlimPlan
from patchslim.adapters.vit import ViTAdapter
from patchslim.errors import ExplanationError
from patchslim.explain import faithfulness as F
from patchslim.explain import grad_rollout as G
from patchslim.explain.maps import ATTENTION_KINDS, check_kinds, patch_maps

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = 4  # the toy's patch grid is GRID x GRID
READ = 5  # the one patch the toy reads (row 1, column 1)


def toy_model(class_token: bool = True):
    """A one-block ViT on 8x8 one-channel images (2-px patches, 16 of them) whose class token reads patch READ.

    The patch embedding writes a patch's mean pixel into feature 0; the position embedding marks patch READ in
    feature 1 and the class token in feature 2. The class token's query (feature 2) meets only READ's key
    (feature 1), steeply, so the class token takes READ's value (its mean pixel) into feature 3, which the head
    reads: class 0 ("bright") when READ's mean pixel is above 0.5. Layer norms are identities, the MLP adds 0.
    Without ``class_token`` it is the same network pooling its patch tokens (average), for the refusals.
    """
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=2, embed_dim=4, depth=1, num_heads=1,
                            mlp_ratio=1.0, class_token=class_token, global_pool="token" if class_token else "avg",
                            norm_layer=torch.nn.Identity)
    with torch.no_grad():
        for p in vit.parameters():
            p.zero_()
        vit.patch_embed.proj.weight[0, 0] = 0.25  # feature 0: the patch's mean pixel
        p = vit.num_prefix_tokens
        if class_token:
            vit.pos_embed[0, 0, 2] = 1.0  # the class token's query feature
        vit.pos_embed[0, p + READ, 1] = 1.0  # the key of the one patch read
        qkv = vit.blocks[0].attn.qkv.weight  # [12, 4]: q rows 0-3, k rows 4-7, v rows 8-11
        qkv[0, 2] = 60.0
        qkv[4, 1] = 1.0
        qkv[8, 0] = 1.0
        vit.blocks[0].attn.proj.weight[3, 0] = 1.0
        vit.head.weight[0, 3], vit.head.bias[0] = 10.0, -5.0
        vit.head.weight[1, 3], vit.head.bias[1] = -10.0, 5.0
    return patchslim.wrap_model(vit, name="toy", class_names=("bright", "dark"), mean=(0.0,), std=(1.0,))


@pytest.fixture(scope="module")
def toy():
    return toy_model()


def toy_images(count: int = 3, seed: int = 0) -> torch.Tensor:
    """Dim random backgrounds (pixels in [0, 0.2]) with patch READ bright: the toy says "bright" (class 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(count, 1, 8, 8, generator=g) * 0.2
    r, c = divmod(READ, GRID)
    x[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = 1.0
    return x


def ranking_with_read_at(position: int) -> np.ndarray:
    """A ``[GRID, GRID]`` map whose ranking puts patch READ at ``position`` (0: first)."""
    others = [i for i in range(GRID * GRID) if i != READ]
    order = others[:position] + [READ] + others[position:]
    values = np.empty(GRID * GRID)
    values[order] = np.arange(GRID * GRID, 0, -1)
    return values.reshape(GRID, GRID)


TOY_MAPS = {"read_first": ranking_with_read_at(0), "read_middle": ranking_with_read_at(7),
            "read_last": ranking_with_read_at(15)}


def test_the_toy_reads_one_patch_only(toy):
    x = toy_images()
    assert (patchslim.run(toy, x).logits.argmax(-1) == 0).all()
    darker = x.clone()
    darker[:, :, :2, :2] = 0.9  # another patch bright: same answer
    assert torch.allclose(patchslim.run(toy, darker).logits, patchslim.run(toy, x).logits, atol=1e-4)
    r, c = divmod(READ, GRID)
    x[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = 0.1
    assert (patchslim.run(toy, x).logits.argmax(-1) == 1).all()


# --------------------------------------------------------------------------- the math on the toy

@pytest.mark.parametrize("mode", F.MODES)
def test_the_map_that_ranks_the_read_patch_first_scores_best(toy, mode):
    scores = F.score_maps(toy, toy_images(), TOY_MAPS, mode=mode, steps=16, targets=[0, 0, 0])
    deletion = {k: float(v.mean()) for k, v in scores.deletion.items()}
    insertion = {k: float(v.mean()) for k, v in scores.insertion.items()}
    assert min(deletion, key=deletion.get) == "read_first"
    assert max(insertion, key=insertion.get) == "read_first"
    assert deletion["read_first"] < deletion["read_middle"] < deletion["read_last"]
    assert insertion["read_first"] > insertion["read_middle"] > insertion["read_last"]
    # the probability falls as soon as the read patch goes (one of 16 steps), rises as soon as it comes
    assert deletion["read_first"] < 0.1 and insertion["read_first"] > 0.85
    assert deletion["read_first"] < deletion["random"] < deletion["read_last"]
    assert np.all(scores.curve("read_first", "deletion")[1:] < 0.2)


def test_token_and_pixel_modes_agree_in_ranking_on_the_toy(toy):
    ranks = {}
    for mode in F.MODES:
        scores = F.score_maps(toy, toy_images(), TOY_MAPS, mode=mode, steps=8, targets=[0, 0, 0], random_orders=0)
        for curve, sign in (("deletion", 1), ("insertion", -1)):
            ranks[(mode, curve)] = sorted(TOY_MAPS, key=lambda k: sign * float(getattr(scores, curve)[k].mean()))
    assert ranks[("token", "deletion")] == ranks[("pixel", "deletion")] == ["read_first", "read_middle", "read_last"]
    assert ranks[("token", "insertion")] == ranks[("pixel", "insertion")] == ["read_first", "read_middle",
                                                                              "read_last"]


def test_gradient_rollout_finds_the_read_patch_for_its_class_only(toy):
    bright = G.gradient_rollout(toy, toy_images(1), target=0).grids[0].ravel()
    assert int(np.argmax(bright)) == READ and bright[READ] > 10 * np.delete(bright, READ).max()
    # for "dark", raising READ's attention lowers the class: its positive part is 0 there
    dark = G.gradient_rollout(toy, toy_images(1), target=1).grids[0].ravel()
    assert dark[READ] == pytest.approx(0.0, abs=1e-9)


def test_curve_math():
    assert F.removal_counts(10, 4).tolist() == [0, 3, 5, 8, 10]
    assert F.removal_counts(144, 20)[[0, 1, -1]].tolist() == [0, 7, 144]
    fractions = np.linspace(0, 1, 5)
    assert F.curve_area(fractions, np.ones(5)) == pytest.approx(1.0)
    assert F.curve_area(fractions, 1 - fractions) == pytest.approx(0.5)
    assert F.curve_area(np.array([0.0, 0.3, 1.0]), np.array([[1.0, 0.0, 0.0]])).tolist() == pytest.approx([0.15])
    order = F.patch_order(np.array([0.2, np.nan, 0.9, 0.2, -1.0]))
    assert order.tolist() == [2, 0, 3, 4, 1]  # ties in raster order, NaN last
    rows = torch.tensor([[3, 0, 2, 1]])
    assert F.kept_positions(rows, 1, "deletion").tolist() == [[0, 1, 2]]
    assert F.kept_positions(rows, 1, "insertion").tolist() == [[3]]
    a, b = F.random_rankings(16, 5, 2, seed=3), F.random_rankings(16, 5, 2, seed=3)
    assert a.shape == (2, 5, 16) and np.array_equal(a, b) and (np.sort(a, -1) == np.arange(16)).all()


def test_gradient_weighted_attention_and_relevance_rule():
    attention = torch.tensor([[[0.5, 0.5], [0.0, 1.0]], [[1.0, 0.0], [0.5, 0.5]]])  # [H=2, 2, 2]
    gradient = torch.tensor([[[2.0, -1.0], [1.0, 1.0]], [[1.0, 3.0], [-2.0, 0.0]]])
    weighted = G.gradient_weighted_attention(attention, gradient)
    np.testing.assert_allclose(weighted, [[1.0, 0.0], [0.0, 0.5]])  # mean over heads of max(g * a, 0)
    two = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert G.relevance_product([two]).tolist() == [[1.0, 1.0], [0.0, 1.0]]  # R = I + A I
    assert G.relevance_product([two, two]).tolist() == [[1.0, 2.0], [0.0, 1.0]]  # (I + A)(I + A)
    pick = torch.tensor([[1.0, 0.0]])  # a transition keeping token 0 only
    assert G.relevance_product([two], [pick]).tolist() == [[1.0, 1.0]]


def test_gradient_rollout_matches_the_rule_on_the_unslimmed_model(fashion_random, fashion_batch):
    x = fashion_batch[0][:2]
    result = G.gradient_rollout(fashion_random, x, target=[3, 7])
    assert result.targets == (3, 7)
    leaf = x.clone().requires_grad_(True)
    trace = patchslim.run(fashion_random, leaf, SlimPlan(attention_blocks="all"), grad=True)
    attention = [trace.attention[b] for b in range(fashion_random.spec.depth)]
    gradients = torch.autograd.grad(trace.logits[0, 3] + trace.logits[1, 7], attention)
    for i in range(2):
        relevance = torch.eye(attention[0].shape[-1], dtype=torch.float64)
        for a, g in zip(attention, gradients):
            relevance = relevance + (g[i] * a[i]).clamp(min=0).mean(0).double() @ relevance
        expected = relevance[0, 1:].reshape(fashion_random.spec.grid_size).detach().numpy()
        np.testing.assert_allclose(result.grids[i], expected, rtol=1e-5, atol=1e-9)


def test_gradient_rollout_through_input_pruning_marks_unseen_patches(fashion_random, fashion_batch):
    x = fashion_batch[0][:1]
    plan = SlimPlan.single("random", 0.5, blocks=(0,))
    grid = G.gradient_rollout(fashion_random, x, plan, target=2).grids[0]
    seen = patchslim.run(fashion_random, x, plan).blocks[0].provenance.patch_mask()[0].numpy()
    assert np.isnan(grid.ravel()[~seen]).all() and np.isfinite(grid.ravel()[seen]).all()
    merged = G.gradient_rollout(fashion_random, x, SlimPlan.single("tome", 0.5), target=2).grids[0]
    assert np.isfinite(merged).all()  # merged patches keep their group's relevance


# --------------------------------------------------------------------------- before / after, costs

@pytest.mark.parametrize("method", ["attention", "uniform"])
def test_keep_all_slimming_leaves_the_scores_equal(fashion_random, fashion_batch, method):
    x = fashion_batch[0][:2]
    plan = SlimPlan.single(method, 1.0)
    before = patch_maps(fashion_random, x, None, ATTENTION_KINDS)
    after = patch_maps(fashion_random, x, plan, ATTENTION_KINDS)
    for kind in ATTENTION_KINDS:
        np.testing.assert_array_equal(before[kind], after[kind])
    for mode in F.MODES:
        one = F.score_maps(fashion_random, x, before, None, mode=mode, steps=6)
        two = F.score_maps(fashion_random, x, after, plan, mode=mode, steps=6)
        for curve in F.CURVES:
            for kind in (*ATTENTION_KINDS, F.RANDOM):
                np.testing.assert_array_equal(getattr(one, curve)[kind], getattr(two, curve)[kind])


def test_slimming_changes_the_scores_of_the_slimmed_model(fashion_random, fashion_batch):
    x = fashion_batch[0][:2]
    plan = SlimPlan.single("attention", 0.3)
    maps = patch_maps(fashion_random, x, plan, ("attention",))
    one = F.score_maps(fashion_random, x, maps, None, mode="token", steps=6, random_orders=0)
    two = F.score_maps(fashion_random, x, maps, plan, mode="token", steps=6, random_orders=0)
    assert not np.array_equal(one.curves.deletion, two.curves.deletion)


def test_a_score_costs_two_forwards_per_step(fashion_random, fashion_batch, monkeypatch):
    import patchslim.engine

    calls = []
    real = patchslim.engine.run

    def counting(*args, **kwargs):
        trace = real(*args, **kwargs)
        calls.append(trace.batch_size)  # rows of the forward
        return trace

    monkeypatch.setattr(patchslim.engine, "run", counting)
    x = fashion_batch[0][:3]
    maps = {"a": np.random.default_rng(0).random((3, 12, 12))}
    steps = 7
    for mode in F.MODES:
        calls.clear()
        scores = F.score_maps(fashion_random, x, maps, mode=mode, steps=steps, targets=[1, 2, 3], random_orders=2)
        # deletion and insertion share their ends: 2 forwards for them, 2 per inner step, each over every ranking
        assert scores.forwards == len(calls) == 2 * steps
        assert max(calls) == 3 * 3  # three images x (one map + two random rankings) in one forward
    calls.clear()
    scores = F.score_maps(fashion_random, x, maps, mode="token", steps=steps, targets=[1, 2, 3], random_orders=2,
                          batch_size=6)  # two images per chunk: two chunks
    assert scores.forwards == len(calls) == 2 * 2 * steps and max(calls) <= 6
    calls.clear()
    F.score_maps(fashion_random, x, maps, mode="token", steps=steps, random_orders=2)  # the targets: one more
    assert len(calls) == 2 * steps + 1


def test_compare_scores_before_and_after_in_each_mode(fashion_random, fashion_batch):
    x = fashion_batch[0][:1]
    plan = SlimPlan.single("attention", 0.5)
    result = F.compare(fashion_random, x, plan, patch_maps(fashion_random, x, None, ATTENTION_KINDS),
                       patch_maps(fashion_random, x, plan, ATTENTION_KINDS), steps=4)
    assert set(result.scores) == {(p, m) for p in F.PHASES for m in F.MODES} and not result.refused
    assert result.forwards == 4 * 2 * 4
    rows = result.rows()
    assert {r["map"] for r in rows} == {*ATTENTION_KINDS, F.RANDOM} and len(rows) == 2 * 4
    json.dumps(result.to_dict())


def test_explain_adds_gradient_rollout_and_scores(fashion_random, fashion_batch):
    from patchslim.explain import explain

    x = fashion_batch[0][:1]
    result = explain(fashion_random, x, SlimPlan.single("attention", 0.5), attribution=None, faithfulness="pixel",
                     faithfulness_steps=4)
    assert result.grad_rollout_before.shape == (12, 12) and not result.grad_rollout_refused
    assert set(result.maps("after")) == set(ATTENTION_KINDS)
    assert result.faithfulness.modes == ("pixel",)
    assert result.faithfulness.target == result.target


def test_token_mode_is_refused_where_dropped_tokens_flow_on(fashion_random, fashion_batch):
    class FlowOn(ViTAdapter):
        token_removal = False

    model = dataclasses.replace(fashion_random, adapter=FlowOn(fashion_random.name, fashion_random.model))
    x = fashion_batch[0][:1]
    maps = {"a": np.arange(144.0).reshape(12, 12)}
    with pytest.raises(ExplanationError, match="token mode does not apply.*pixel mode"):
        F.score_maps(model, x, maps, mode="token", steps=4)
    assert F.resolve_modes(model, "both")[0] == ("pixel",) and "token" in F.resolve_modes(model, "both")[1]
    result = F.compare(model, x, None, maps, maps, steps=4, random_orders=1)
    assert result.modes == ("pixel",) and "token" in result.refused


def test_a_model_pooling_its_patch_tokens_keeps_one_patch_at_the_empty_end():
    model = toy_model(class_token=False)
    maps = {"a": ranking_with_read_at(0)}
    scores = F.score_maps(model, toy_images(2), maps, mode="token", steps=4, targets=[0, 0], random_orders=1)
    assert scores.forwards == 2 * 4 + 1  # the empty end once per curve: each ranking keeps its own patch
    assert np.isfinite(scores.curves.deletion).all()


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("steps", [0, 1, 145, 2.5, True, "20"])
def test_steps_out_of_range_are_refused(fashion_random, fashion_batch, steps):
    with pytest.raises(ExplanationError, match="steps"):
        F.score_maps(fashion_random, fashion_batch[0][:1], {"a": np.zeros((12, 12))}, steps=steps)


def test_bad_parameters_name_themselves(fashion_random, fashion_batch):
    x = fashion_batch[0][:1]
    grid = np.zeros((12, 12))
    with pytest.raises(ExplanationError, match="mode"):
        F.score_maps(fashion_random, x, {"a": grid}, mode="voxel", steps=4)
    with pytest.raises(ExplanationError, match="maps.*'a'.*12, 12"):
        F.score_maps(fashion_random, x, {"a": np.zeros((7, 7))}, steps=4)
    with pytest.raises(ExplanationError, match="maps"):
        F.score_maps(fashion_random, x, {}, steps=4)
    with pytest.raises(ExplanationError, match="images"):
        F.score_maps(fashion_random, torch.zeros(1, 1, 8, 8), {"a": grid}, steps=4)  # smaller than the grid
    with pytest.raises(ExplanationError, match="random_orders"):
        F.score_maps(fashion_random, x, {"a": grid}, steps=4, random_orders=-1)
    with pytest.raises(ExplanationError, match="blur_sigma"):
        F.score_maps(fashion_random, x, {"a": grid}, mode="pixel", steps=4, blur_sigma=0)
    with pytest.raises(ExplanationError, match="target"):
        F.score_maps(fashion_random, x, {"a": grid}, steps=4, targets=[10])
    with pytest.raises(ExplanationError, match="orders"):
        F.perturbation_curves(fashion_random, x, np.zeros((1, 1, 144), dtype=np.int64), steps=4)
    with pytest.raises(ExplanationError, match="unknown map kind 'saliency'"):
        check_kinds(fashion_random, "attention,saliency")


def test_maps_a_model_cannot_produce_are_refused_with_the_reason():
    model = toy_model(class_token=False)
    for kind in ATTENTION_KINDS:
        with pytest.raises(ExplanationError, match=f"'{kind}' cannot be produced.*no class token"):
            check_kinds(model, [kind])
    with pytest.raises(ExplanationError, match="grad_rollout.*no class token"):
        G.gradient_rollout(model, toy_images(1))


def test_cli_explain_json_adds_the_scores(tmp_path, capsys):
    from PIL import Image

    from patchslim import bundled
    from patchslim.cli import main

    images, _ = bundled.load_bundled_sample()
    path = tmp_path / "item.png"
    Image.fromarray(images[0]).save(path)
    code = main(["explain", "--model", "fashion-vit", "--no-pretrained", "--method", "attention", "--keep", "0.5",
                 "--image", str(path), "--out", str(tmp_path / "maps"), "--attribution", "none", "--json",
                 "--faithfulness", "token", "--faithfulness-steps", "4"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    rows = record["faithfulness"]["rows"]
    assert {r["map"] for r in rows} == {*ATTENTION_KINDS, "random"} and {r["mode"] for r in rows} == {"token"}
    assert "grad_rollout_before.png" in record["files"]
    code = main(["explain", "--model", "fashion-vit", "--no-pretrained", "--method", "attention", "--image",
                 str(path), "--out", str(tmp_path / "maps"), "--attribution", "none", "--faithfulness",
                 "--faithfulness-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --faithfulness-steps") and "Traceback" not in err


def test_cli_evaluate_reports_the_mean_score_per_map_with_an_interval(tmp_path, capsys):
    from patchslim.cli import main

    code = main(["evaluate", "--model", "fashion-vit", "--no-pretrained", "--data", "bundled", "--limit", "4",
                 "--methods", "attention", "--keep", "0.5", "--no-progress", "--json", "--out", str(tmp_path),
                 "--no-png", "--faithfulness", "pixel", "--faithfulness-steps", "4", "--faithfulness-maps",
                 "rollout,grad_rollout"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    rows = record["faithfulness"]["rows"]
    assert {(r["method"], r["map"]) for r in rows} == {(m, k) for m in ("unslimmed", "attention")
                                                       for k in ("rollout", "grad_rollout", "random")}
    for r in rows:
        assert r["n"] == 4 and r["deletion_low"] <= r["deletion"] <= r["deletion_high"]
    text = (tmp_path / "accuracy_faithfulness.md").read_text()
    assert "Command: `" in text and "**Deletion, pixel mode**" in text
    code = main(["evaluate", "--model", "fashion-vit", "--no-pretrained", "--data", "bundled", "--limit", "4",
                 "--methods", "attention", "--keep", "0.5", "--no-progress", "--faithfulness", "voxel"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --faithfulness: mode") and "Traceback" not in err


@pytest.mark.parametrize("kind", ["ig", "occlusion"])
def test_batched_attributions_equal_the_per_image_ones(fashion_random, fashion_batch, kind):
    from patchslim.explain.attribution import attribute

    pytest.importorskip("captum")
    x = fashion_batch[0][:2]
    plan = SlimPlan.single("random", 0.5, blocks=(0,))  # decides per row: the batched call runs image by image
    for p in (None, plan):
        batched = patch_maps(fashion_random, x, p, (kind,), targets=[1, 4], ig_steps=4)[kind]
        options = {"n_steps": 4} if kind == "ig" else {}
        one = np.stack([attribute(fashion_random, x[i:i + 1], kind, p, target=t, **options).grid
                        for i, t in enumerate((1, 4))])
        np.testing.assert_allclose(batched, one, rtol=1e-4, atol=1e-7)


def test_cli_audit_writes_the_scores_beside_the_report(tmp_path, capsys):
    from patchslim.cli import main

    code = main(["audit", "--model", "fashion-vit", "--no-pretrained", "--data", "bundled", "--limit", "4",
                 "--methods", "tome", "--keep", "0.5", "--no-progress", "--workers", "0", "--bootstrap", "50",
                 "--out", str(tmp_path), "--json", "--faithfulness", "token", "--faithfulness-steps", "3",
                 "--faithfulness-maps", "attention"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert {(r["method"], r["map"]) for r in record["faithfulness"]["rows"]} == {
        (m, k) for m in ("unslimmed", "tome") for k in ("attention", "random")}
    assert (tmp_path / "faithfulness.csv").is_file() and (tmp_path / "audit.html").is_file()


def test_gradient_rollout_from_the_distillation_token(deit_tiny_distilled_random):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cls = G.gradient_rollout(deit_tiny_distilled_random, x, target=5).grids[0]
    dist = G.gradient_rollout(deit_tiny_distilled_random, x, target=5, prefix_row=1).grids[0]
    assert cls.shape == dist.shape == (14, 14) and np.isfinite(cls).all() and not np.allclose(cls, dist)
    with pytest.raises(ExplanationError, match="prefix_row"):
        G.gradient_rollout(deit_tiny_distilled_random, x, prefix_row=2)


def test_a_swin_is_scored_in_pixel_mode_on_its_window_attention(fashion_batch):
    from patchslim.explain import explain

    swin = patchslim.load_model("fashion-swin", device="cpu", pretrained=False)
    x = fashion_batch[0][:1]
    assert patch_maps(swin, x, None, "auto").keys() == {"window_attention"}
    with pytest.raises(ExplanationError, match="token mode does not apply"):
        F.score_maps(swin, x, {"a": np.arange(144.0).reshape(12, 12)}, mode="token", steps=4)
    result = explain(swin, x, SlimPlan.single("attention", 0.5), attribution=None, faithfulness="both",
                     faithfulness_steps=4)
    assert result.grad_rollout_before is None and "no class token" in result.grad_rollout_refused
    assert result.faithfulness.modes == ("pixel",) and "token" in result.faithfulness.refused
    assert {r["map"] for r in result.faithfulness.rows()} == {"window_attention", "random"}


# --------------------------------------------------------------------------- the benchmark's fast path

def test_distinct_rows_groups_equal_rows_in_order_of_first_sight():
    from patchslim.explain.attribution import distinct_rows

    a, b, c = torch.zeros(2, 2), torch.ones(2, 2), torch.full((2, 2), 2.0)
    first, groups = distinct_rows(torch.stack([b, a, b, c, a]))
    assert first.tolist() == [0, 1, 3] and groups.tolist() == [0, 1, 0, 2, 1]
    assert distinct_rows(torch.stack([a, b, c])) is None


@pytest.mark.parametrize("method", [None, "attention"])
def test_occlusion_runs_a_row_equal_to_the_input_once_and_gives_the_same_map(fashion_random, fashion_batch,
                                                                             monkeypatch, method):
    import patchslim.engine
    from patchslim.explain import attribution

    pytest.importorskip("captum")
    x = fashion_batch[0][:2]
    plan = SlimPlan.single(method, 0.5) if method else None
    rows = []
    real = patchslim.engine.run

    def counting(*args, **kwargs):
        trace = real(*args, **kwargs)
        rows.append(trace.batch_size)
        return trace

    monkeypatch.setattr(patchslim.engine, "run", counting)
    fast = patch_maps(fashion_random, x, plan, ("occlusion",), targets=[1, 4])["occlusion"]
    fast_rows, rows[:] = sum(rows), []
    monkeypatch.setattr(attribution, "distinct_rows", lambda x: None)  # every row runs, as captum asks
    slow = patch_maps(fashion_random, x, plan, ("occlusion",), targets=[1, 4])["occlusion"]
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6)
    # the canvas's black background: most patches already hold the baseline; they give the input's own logits,
    # known from captum's first evaluation, so their occlusion is exactly 0
    assert fast_rows < sum(rows) / 2
    black = (x == attribution.baseline_tensor(fashion_random, x, "black")).reshape(2, 1, 12, 4, 12, 4)
    background = black.all(3).all(-1).all(1).numpy()
    assert background.sum() > 100 and np.all(np.nan_to_num(fast[background]) == 0)


def test_the_table_resumes_from_its_parts_and_makes_a_partial_table(fashion_random, tmp_path, monkeypatch):
    from patchslim.data import load_labelled
    from patchslim.errors import DataError
    from patchslim.explain import faithfulness_report as R

    data = load_labelled("bundled", fashion_random).subset(4)
    plans = [("attention", 0.5, SlimPlan.single("attention", 0.5))]
    options = dict(kinds=("attention", "rollout"), modes="token", steps=3, batch_size=2, n_boot=50,
                   work=tmp_path / "parts")
    first = R.faithfulness_table(fashion_random, data, plans, **options)
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["batch_00000.npz", "batch_00001.npz",
                                                                      "job.json"]
    assert first.n == first.planned == 4 and not first.partial

    def refuse(*args, **kwargs):
        raise AssertionError("a batch with a part was scored again")

    monkeypatch.setattr(R, "batch_areas", refuse)
    again = R.faithfulness_table(fashion_random, data, plans, resume=True, **options)
    assert again.rows == first.rows and again.forwards == first.forwards
    (tmp_path / "parts" / "batch_00001.npz").unlink()  # a run stopped after its first batch
    partial = R.faithfulness_table(fashion_random, data, plans, score=False, **options)
    assert (partial.n, partial.planned) == (2, 4) and partial.partial and "2 of the 4" in partial.markdown()
    assert {r.n for r in partial.rows} == {2}
    with pytest.raises(ExplanationError, match="other settings.*steps"):
        R.faithfulness_table(fashion_random, data, plans, resume=True, **dict(options, steps=4))
    with pytest.raises(DataError, match="no faithfulness parts"):
        R.faithfulness_table(fashion_random, data, plans, score=False, **dict(options, work=tmp_path / "none"))


def test_the_tables_batched_scores_equal_the_per_image_ones(fashion_random, fashion_batch):
    """The benchmark's path (maps and curves of a batch at once, several images per forward) gives each image the
    maps it gets alone (to float rounding) and, for the same maps, the same scores (:func:`compare`'s path)."""
    from patchslim.explain.faithfulness_report import batch_areas

    pytest.importorskip("captum")
    x = fashion_batch[0][:3]
    kinds = ("attention", "rollout", "grad_rollout", "ig", "occlusion")
    models = [("unslimmed", 1.0, SlimPlan()), ("tome", 0.5, SlimPlan.single("tome", 0.5))]
    areas, _ = batch_areas(fashion_random, x, models, kinds, F.MODES, steps=4, random_orders=1, seed=0,
                           rows_per_forward=1000, ig_steps=4)
    targets = G.targets_for(fashion_random, x, None)
    for index, (_, _, plan) in enumerate(models):
        maps = patch_maps(fashion_random, x, plan, kinds, targets, ig_steps=4)
        for i in range(3):
            alone = patch_maps(fashion_random, x[i:i + 1], plan, kinds, targets[i:i + 1], ig_steps=4)
            for kind in kinds:
                np.testing.assert_allclose(maps[kind][i], alone[kind][0], rtol=1e-4, atol=1e-6, err_msg=kind)
            for mode in F.MODES:
                one = F.score_maps(fashion_random, x[i:i + 1], {k: v[i] for k, v in maps.items()}, plan, mode=mode,
                                   steps=4, targets=targets[i:i + 1], random_orders=0)
                for kind in kinds:
                    for curve in F.CURVES:
                        assert areas[f"{index}|{mode}|{kind}|{curve}"][i] == pytest.approx(
                            float(getattr(one, curve)[kind][0]), abs=1e-5), (index, mode, kind, curve)
