"""One forward through every model: adapters, keep-all exactness, the keep-set stage, gradients, and models
a user brings (timm folders, the hub cache, in-memory models)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import patchslim
from patchslim import KeepSet, SlimPlan
from patchslim.errors import PlanError, UnknownModelError, UnsupportedModelError

ROOT = Path(__file__).resolve().parents[1]


def _vit(**kwargs):
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=5)
    args.update(kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return VisionTransformer(**args).eval()


def _images(model, batch=3, seed=0):
    return torch.randn(batch, *model.input_size, generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "cls-token": {},
    "avg-pool-no-cls": dict(class_token=False, global_pool="avg"),
    "registers-avg": dict(reg_tokens=2, global_pool="avg"),
    "avg-with-prefix": dict(global_pool="avg", pool_include_prefix=True),
    "max-pool": dict(class_token=False, global_pool="max"),
    "one-channel": dict(in_chans=1),
    "fc-norm-layerscale": dict(global_pool="avg", fc_norm=True, init_values=0.1),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keep_all_gives_exactly_the_models_logits(variant):
    vit = _vit(**VARIANTS[variant])
    model = patchslim.wrap_model(vit, name=variant)
    x = _images(model)
    with torch.no_grad():
        reference = vit(x)
    assert torch.equal(patchslim.run(model, x).logits, reference)
    keep_all = torch.arange(model.num_patches).expand(x.shape[0], -1)
    assert torch.equal(patchslim.run(model, x, SlimPlan((KeepSet(1, keep_all),))).logits, reference)


def test_wrap_model_with_a_head_width_that_is_not_embed_dim_over_heads():
    from timm.layers import Attention

    vit = _vit(embed_dim=48, num_heads=4)  # 12 per head by default
    for block in vit.blocks:
        block.attn = Attention(48, num_heads=4, attn_head_dim=20, qkv_bias=True).eval()  # 80 wide
    model = patchslim.wrap_model(vit, name="wide-heads", class_names=list("abcde"))
    assert (model.spec.head_dim, model.spec.num_heads, model.spec.embed_dim) == (20, 4, 48)
    x = _images(model)
    with torch.no_grad():
        assert torch.equal(patchslim.run(model, x).logits, vit(x))
    for method in ("random", "attention", "tome", "evit", "entropy"):
        trace = patchslim.run(model, x, SlimPlan.single(method, 0.5))
        assert trace.logits.shape == (3, 5) and torch.isfinite(trace.logits).all()
    from patchslim.metrics import gmacs

    assert gmacs(patchslim.run(model, x[:1], SlimPlan.single("random", 0.5))) < gmacs(patchslim.run(model, x[:1]))


def test_wrap_model_transform_follows_the_channels_and_refuses_what_it_cannot_walk():
    from PIL import Image

    gray = patchslim.wrap_model(_vit(in_chans=1), name="gray", mean=(0.5,), std=(0.25,))
    photo = Image.new("RGB", (50, 40), (200, 10, 10))
    assert gray.transform(photo).shape == (1, 32, 32)
    assert gray.mean == (0.5,) and gray.std == (0.25,)
    assert patchslim.run(gray, photo).logits.shape == (1, 5)
    with pytest.raises(patchslim.PatchslimError, match="3 class names given for a model with 5 classes"):
        patchslim.wrap_model(_vit(), name="x", class_names=["a", "b", "c"])
    with pytest.raises(UnsupportedModelError, match="neither a timm VisionTransformer nor"):
        patchslim.wrap_model(torch.nn.Linear(3, 3), name="linear")


# --------------------------------------------------------------------------- the keep-set stage

@pytest.fixture(scope="module")
def small():
    return patchslim.wrap_model(_vit(depth=4), name="small")


def test_a_keep_set_reproduces_a_methods_choice(small):
    x = _images(small, batch=4)
    chosen = patchslim.run(small, x, SlimPlan.single("random", 0.4, blocks=2, seed=7))
    kept = chosen.kept_patch_ids(2)
    given = patchslim.run(small, x, SlimPlan((KeepSet(2, kept),)))
    assert torch.equal(given.logits, chosen.logits)
    mask = torch.zeros(4, small.num_patches, dtype=torch.bool).scatter_(1, kept, True)
    as_mask = patchslim.run(small, x, SlimPlan((KeepSet(2, mask),)))
    assert torch.equal(as_mask.logits, chosen.logits) and as_mask.tokens_per_block[-1] == 1 + kept.shape[1]


def test_a_ragged_keep_set_masks_and_gives_the_logits_of_dropping_per_image(small):
    x = _images(small, batch=3)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(3, small.num_patches, generator=g) < torch.tensor([[0.2], [0.5], [0.9]])
    batched = patchslim.run(small, x, SlimPlan((KeepSet(1, mask),)))
    for i in range(3):
        alone = patchslim.run(small, x[i:i + 1], SlimPlan((KeepSet(1, mask[i].nonzero().T),)))
        torch.testing.assert_close(batched.logits[i:i + 1], alone.logits, rtol=1e-5, atol=1e-5)


def test_a_ragged_keep_set_on_an_average_pooling_model_pools_only_the_kept_tokens():
    avg = patchslim.wrap_model(_vit(class_token=False, global_pool="avg"), name="avg")
    x = _images(avg, batch=2)
    mask = torch.zeros(2, avg.num_patches, dtype=torch.bool)
    mask[0, :3], mask[1, 5:12] = True, True
    batched = patchslim.run(avg, x, SlimPlan((KeepSet(0, mask),)))
    for i in range(2):
        alone = patchslim.run(avg, x[i:i + 1], SlimPlan((KeepSet(0, mask[i].nonzero().T),)))
        torch.testing.assert_close(batched.logits[i:i + 1], alone.logits, rtol=1e-5, atol=1e-5)


def test_several_keep_sets_per_image_repeat_the_image(small):
    x = _images(small, batch=2)
    a = torch.tensor([[0, 1, 2], [3, 4, 5]])
    b = torch.tensor([[6, 7, 8], [9, 10, 11]])
    both = patchslim.run(small, x, SlimPlan((KeepSet(1, torch.cat([a, b])),)))
    assert both.logits.shape == (4, 5)
    torch.testing.assert_close(both.logits[:2], patchslim.run(small, x, SlimPlan((KeepSet(1, a),))).logits)
    torch.testing.assert_close(both.logits[2:], patchslim.run(small, x, SlimPlan((KeepSet(1, b),))).logits)


def test_an_empty_keep_set_leaves_the_prefix_tokens_alone(small):
    x = _images(small, batch=2)
    trace = patchslim.run(small, x, SlimPlan((KeepSet(0, torch.zeros(2, 0, dtype=torch.long)),)))
    assert trace.tokens_per_block == [1] * 4 and torch.isfinite(trace.logits).all()
    avg = patchslim.wrap_model(_vit(class_token=False, global_pool="avg"), name="avg")
    with pytest.raises(ValueError, match="no token is left to pool"):
        patchslim.run(avg, _images(avg, 1), SlimPlan((KeepSet(1, torch.zeros(1, 0, dtype=torch.long)),)))


@pytest.mark.parametrize("keep, message", [
    (torch.zeros(3, 4, dtype=torch.long), "multiple of the batch size 2"),
    (torch.full((2, 3), 99), r"positions must be in 0\.\.15"),
    (torch.ones(2, 5, dtype=torch.bool), "one column per token"),
    (torch.ones(2, 3), "int64 positions or a bool mask"),
])
def test_bad_keep_sets_are_refused_clearly(small, keep, message):
    with pytest.raises(PlanError, match=message):
        patchslim.run(small, _images(small, 2), SlimPlan((KeepSet(1, keep),)))
    with pytest.raises(PlanError, match="a tensor or a callable"):
        KeepSet(1, [0, 1])


def test_nothing_acts_after_a_ragged_keep_set(small):
    mask = torch.zeros(2, small.num_patches, dtype=torch.bool)
    mask[0, :2], mask[1, :9] = True, True
    plan = SlimPlan((KeepSet(1, mask), patchslim.Stage("random", 0.5, (2,))))
    with pytest.raises(PlanError, match="must be the plan's last"):
        patchslim.run(small, _images(small, 2), plan)


def test_a_callable_keep_set_trains_a_scorer_through_the_forward(small):
    scorer = torch.nn.Linear(small.spec.embed_dim, 1)
    seen = {}

    def choose(state):
        scores = scorer(state.patches).squeeze(-1)
        seen["scores"] = scores
        return scores.topk(6, dim=1).indices

    trace = patchslim.run(small, _images(small, 2), SlimPlan((KeepSet(1, choose),)), grad=True)
    assert trace.tokens_per_block[1:] == [7, 7, 7]
    seen["scores"].sum().backward()
    assert scorer.weight.grad is not None and scorer.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- gradients

def test_run_is_inference_unless_grad_is_asked_for(small):
    x = _images(small, 1).requires_grad_(True)
    assert not patchslim.run(small, x).logits.requires_grad
    logits = patchslim.run(small, x, SlimPlan.single("tome", 0.5), grad=True).logits
    logits[0, 0].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tokens_before_is_the_walk_up_to_a_block(small):
    x = _images(small, 2)
    state = patchslim.tokens_before(small, x, 2)
    vit = small.model
    with torch.no_grad():
        reference = vit.blocks[:2](vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))
    torch.testing.assert_close(state.tokens, reference, rtol=1e-6, atol=1e-6)
    with pytest.raises(PlanError, match="outside the model"):
        patchslim.tokens_before(small, x, 9)


# --------------------------------------------------------------------------- models a user brings

@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    """A 64-px, 3-class ViT saved the timm way (config.json + model.safetensors), with label names."""
    import timm
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("timm-folder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=3)
    save_for_hf(vit, folder, model_config=dict(label_names=["cat", "dog", "bird"]),
                model_args=dict(img_size=64, num_classes=3))
    return folder, vit.eval()


def test_a_timm_folder_loads_with_its_own_size_classes_and_names(timm_folder):
    folder, vit = timm_folder
    model = patchslim.load_model(f"local-dir:{folder}", device="cpu")
    assert model.input_size == (3, 64, 64) and model.class_names == ("cat", "dog", "bird")
    assert model.weights_source == f"folder {folder.name}"
    x = _images(model, 2)
    with torch.no_grad():
        assert torch.equal(patchslim.run(model, x).logits, vit(x))
    assert patchslim.models.weights_status(f"local-dir:{folder}") == "ready (timm folder)"
    with pytest.raises(UnknownModelError, match="not a timm model folder"):
        patchslim.load_model(f"local-dir:{folder / 'nothing'}", device="cpu")


def test_the_cli_runs_a_timm_folder_model(timm_folder, tmp_path, capsys):
    from PIL import Image

    from patchslim.cli import main

    folder, _ = timm_folder
    image = tmp_path / "photo.png"
    Image.new("RGB", (80, 70), (30, 120, 200)).save(image)
    code = main(["run", "--model", f"local-dir:{folder}", "--method", "random", "--keep", "0.5",
                 "--json", "--image", str(image)])
    out = capsys.readouterr().out
    assert code == 0, out
    record = json.loads(out)
    text = json.dumps(record)
    assert "cat" in text or "dog" in text or "bird" in text


def test_a_hub_name_loads_from_a_prepared_local_cache_offline(timm_folder, tmp_path, monkeypatch):
    import shutil

    folder, vit = timm_folder
    snapshot = tmp_path / "models--someone--tiny-vit" / "snapshots" / "0123abcd"
    shutil.copytree(folder, snapshot)
    (tmp_path / "models--someone--tiny-vit" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-vit" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    model = patchslim.load_model("hf-hub:someone/tiny-vit", device="cpu")
    assert model.class_names == ("cat", "dog", "bird")
    x = _images(model, 1)
    with torch.no_grad():
        assert torch.equal(patchslim.run(model, x).logits, vit(x))
    with pytest.raises(patchslim.WeightsUnavailableError, match="not in the local Hugging Face cache"):
        patchslim.load_model("hf-hub:someone/missing", device="cpu")


# --------------------------------------------------------------------------- the house

def test_no_private_engine_name_is_imported_outside_the_engine():
    offenders = []
    for path in list((ROOT / "patchslim").rglob("*.py")) + list((ROOT / "app").rglob("*.py")):
        if path.name == "engine.py" and path.parent.name == "patchslim":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "patchslim.engine":
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engine" \
                    and node.attr.startswith("_"):
                offenders.append(f"{path.name}: engine.{node.attr}")
    assert offenders == []


def _code_without_strings(path: Path) -> dict[int, str]:
    """Each line's code with strings and comments left out (docstrings may name what they like)."""
    import io
    import tokenize

    lines: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type not in (tokenize.NAME, tokenize.OP, tokenize.NUMBER):
            continue
        lines[token.start[0]] = lines.get(token.start[0], "") + token.string
    return lines


def test_only_the_engine_and_the_adapters_walk_blocks():
    """No second walk: outside the engine and the adapters, nothing runs a model's blocks or its embedding."""
    import re

    walking = re.compile(r"\b(vit|model|module)\.blocks\b|patch_embed\(|_pos_embed\(|forward_head\(|forward_features\(")
    offenders = []
    for path in list((ROOT / "patchslim").rglob("*.py")) + list((ROOT / "app").rglob("*.py")):
        if path.name == "engine.py" or "adapters" in path.parts or path.name == "train_bundled.py":
            continue  # train_bundled trains the bundled model with timm's own forward, before patchslim exists
        for number, code in _code_without_strings(path).items():
            if walking.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {code}")
    assert offenders == []


def test_files_for_other_people_name_weights_without_this_machines_paths(fashion_trained, timm_folder):
    import dataclasses

    assert fashion_trained.weights_name == "file fashion_vit.safetensors"
    assert str(fashion_trained.weights_source).endswith("/patchslim/assets/fashion_vit.safetensors")
    cached = dataclasses.replace(fashion_trained, weights_source="Hugging Face cache /root/.cache/hub/x/model.safetensors")
    assert cached.weights_name == "Hugging Face cache model.safetensors"
    assert dataclasses.replace(fashion_trained, weights_source="random init (seed 3)").weights_name == \
        "random init (seed 3)"
