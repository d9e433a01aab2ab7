"""int8 as a precision (patchslim/quantize.py): the one forward on int8 layers, both backends, the weights readout,
the refusals of everything that needs gradients, and the compression benchmark on a tiny input."""

from __future__ import annotations

import json

import pytest
import torch

import patchslim
from patchslim import bundled, quantize
from patchslim.errors import PatchslimError
from patchslim.quantize import GradientUnavailableError, Int8UnavailableError

BACKENDS = quantize.int8_backends("cpu")
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no int8 backend runs on this machine's CPU")


@pytest.fixture(scope="module", params=BACKENDS)
def vit_int8(request):
    """The trained bundled ViT made int8 by each backend usable here."""
    return patchslim.load_model("fashion-vit", device="cpu", precision="int8", int8_backend=request.param)


@pytest.fixture(scope="module")
def swin_int8():
    return patchslim.load_model("fashion-swin", device="cpu", precision="int8")


@pytest.fixture(scope="module")
def canvas(fashion_sample):
    images, labels = fashion_sample
    return bundled.to_model_input(images[:32]), torch.from_numpy(labels[:32])


def test_int8_swaps_the_linear_layers_and_keeps_the_adapter_walkable(vit_int8, fashion_trained):
    blocks = vit_int8.model.blocks
    assert vit_int8.precision == "int8" and vit_int8.int8_backend in BACKENDS
    assert vit_int8.precision_label == f"int8 ({vit_int8.int8_backend})"
    assert vit_int8.spec == fashion_trained.spec  # in/out features read through the swapped layers
    for layer in (blocks[0].attn.qkv, blocks[0].attn.proj, blocks[0].mlp.fc1, vit_int8.model.head):
        int8_layer = type(layer) is not torch.nn.Linear or type(layer.weight) is not torch.nn.Parameter
        assert int8_layer, f"{layer} is still an fp32 Linear"
    assert type(fashion_trained.model.blocks[0].attn.qkv) is torch.nn.Linear  # the fp32 model is not touched


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_all_gives_the_int8_models_own_output(backend, canvas):
    x, _ = canvas
    for name in ("fashion-vit", "fashion-swin"):
        model = patchslim.load_model(name, device="cpu", precision="int8", int8_backend=backend)
        with torch.inference_mode():
            own = model.model(x)
        torch.testing.assert_close(patchslim.run(model, x).logits, own, atol=1e-5, rtol=1e-5)


def test_int8_logits_stay_close_to_fp32(vit_int8, fashion_trained, canvas):
    """Tolerance: dynamic int8 rounds each Linear input and weight to 1/127 of its range (the eager backend to 1/63
    of the activations' range, reduce_range); over 6 blocks and the head this moves fashion-vit's logits (up to ~5
    in size) by a few hundredths to a few tenths. A max change of 0.5 (10 % of the largest logit) and 90 % of the
    top-1 kept would catch a wrong scale, a lost bias or a layer run twice, none of which keeps logits this close."""
    x, labels = canvas
    fp32, int8 = patchslim.run(fashion_trained, x).logits, patchslim.run(vit_int8, x).logits
    change = (int8 - fp32).abs().max().item()
    assert 0 < change < 0.5
    assert (int8.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("method", ["uniform", "attention", "tome", "evit", "entropy", "lowrank", "random"])
def test_int8_composes_with_plans_on_vit(vit_int8, fashion_trained, canvas, method):
    x, _ = canvas
    plan = patchslim.SlimPlan.single(method, 0.5)
    int8, fp32 = patchslim.run(vit_int8, x[:4], plan), patchslim.run(fashion_trained, x[:4], plan)
    assert int8.tokens_per_block == fp32.tokens_per_block or method in ("tome", "entropy", "attention", "evit")
    assert int8.logits.shape == (4, 10) and torch.isfinite(int8.logits).all()
    assert (int8.logits - fp32.logits).abs().max() < 1.0


@pytest.mark.parametrize("method", [m for m in patchslim.method_names() if patchslim.get_method(m).windowed])
def test_int8_composes_with_window_plans_on_swin(swin_int8, canvas, method):
    x, _ = canvas
    trace = patchslim.run(swin_int8, x[:4], patchslim.SlimPlan.single(method, 0.5, attention_blocks="all"))
    assert torch.isfinite(trace.logits).all()
    assert min(trace.tokens_per_block) < max(trace.tokens_per_block)  # the windows were slimmed


def test_weights_readout_counts_int8_at_one_byte(fashion_trained, vit_int8):
    linear = [m for m in fashion_trained.model.modules() if isinstance(m, torch.nn.Linear)]
    linear_weights = sum(m.weight.numel() for m in linear)
    total = sum(t.numel() for t in fashion_trained.model.state_dict().values())
    assert fashion_trained.weights_mb == pytest.approx(4 * total / 2 ** 20)
    int8_bytes = linear_weights + 4 * (total - linear_weights)  # int8 weights, everything else fp32
    assert int8_bytes <= quantize.weights_bytes(vit_int8.model) <= int8_bytes * 1.05  # + scales
    from patchslim.metrics import measure_memory

    memory, _ = measure_memory(vit_int8, torch.zeros(1, 1, 48, 48), measure=False)
    assert memory.weights_mb == pytest.approx(vit_int8.weights_mb)


def test_run_json_reports_weights_and_precision(tmp_path, capsys):
    from PIL import Image

    from patchslim.cli import main

    image = tmp_path / "x.png"
    Image.new("L", (48, 48), 128).save(image)
    args = ["run", "--model", "fashion-vit", "--device", "cpu", "--method", "uniform", "--keep", "0.5",
            "--image", str(image), "--repeats", "0", "--json"]
    assert main(args) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert main(args + ["--precision", "int8"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert int8["precision"] == "int8" and int8["int8_backend"] in BACKENDS and fp32["int8_backend"] is None
    assert int8["gmacs"] == fp32["gmacs"]  # GMACs stay multiply-adds
    assert 0.25 <= int8["weights_mb"] / fp32["weights_mb"] <= 0.35


def test_wrap_model_int8_leaves_the_callers_model_alone():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            num_classes=5)
    wrapped = patchslim.wrap_model(vit, name="tiny", precision="int8")
    assert type(vit.blocks[0].attn.qkv) is torch.nn.Linear and type(vit.blocks[0].attn.qkv.weight) is torch.nn.Parameter
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        own = wrapped.model(x)
    torch.testing.assert_close(patchslim.run(wrapped, x).logits, own, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- backends

def test_backend_falls_back_to_torchao_when_the_eager_api_is_gone(monkeypatch, canvas):
    pytest.importorskip("torchao")
    import torch.ao.quantization as eager

    monkeypatch.delattr(eager, "quantize_dynamic")
    assert quantize.int8_backends("cpu") == ["torchao"]
    model = patchslim.load_model("fashion-vit", device="cpu", precision="int8")
    assert model.int8_backend == "torchao"
    with pytest.raises(Int8UnavailableError, match="no longer has torch.ao.quantization.quantize_dynamic"):
        patchslim.load_model("fashion-vit", device="cpu", precision="int8", int8_backend="eager")
    x, _ = canvas
    assert torch.isfinite(patchslim.run(model, x[:4], patchslim.SlimPlan.single("tome", 0.5)).logits).all()


def test_eager_backend_comes_first_while_it_exists():
    if "eager" not in BACKENDS:
        pytest.skip("this PyTorch has no eager dynamic quantization")
    assert quantize.BACKEND_ORDER[0] == "eager"
    assert patchslim.load_model("fashion-vit", device="cpu", precision="int8", pretrained=False).int8_backend == "eager"


def test_no_backend_names_the_precision_and_the_device(monkeypatch):
    monkeypatch.setattr(quantize, "_eager_quantize_dynamic", lambda: None)
    monkeypatch.setitem(quantize.BACKENDS, "torchao", quantize.Int8Backend(
        "torchao", "", lambda device: "torchao is not installed (pip install torchao)", lambda m: m))
    with pytest.raises(Int8UnavailableError) as error:
        patchslim.load_model("fashion-vit", device="cpu", precision="int8", pretrained=False)
    message = str(error.value)
    assert "precision int8" in message and "cpu" in message and "torchao is not installed" in message


def test_eager_backend_refuses_a_gpu_by_name():
    reason = quantize.BACKENDS["eager"].refusal(torch.device("cuda"))
    assert reason is not None and "cuda" in reason
    with pytest.raises(PatchslimError, match="Unknown int8 backend"):
        quantize.choose_backend("cpu", "fbgemm")
    with pytest.raises(PatchslimError, match="for precision int8"):
        patchslim.load_model("fashion-vit", device="cpu", pretrained=False, int8_backend="eager")


# --------------------------------------------------------------------------- refusals

def test_gradient_features_are_refused_with_one_sentence(vit_int8, canvas):
    from patchslim.explain import attribute, explain, gradient_rollout
    from patchslim.explain.maps import check_kinds, map_refusal

    x, _ = canvas
    for call in (lambda: patchslim.run(vit_int8, x[:1], grad=True),
                 lambda: attribute(vit_int8, x[:1], "ig", n_steps=2),
                 lambda: gradient_rollout(vit_int8, x[:1]),
                 lambda: explain(vit_int8, x[:1], attribution="ig"),
                 lambda: quantize.refuse_gradients(vit_int8, "fine-tuning")):
        with pytest.raises(GradientUnavailableError, match="int8 layers give no input gradient"):
            call()
    assert "int8 layers give no input gradient" in map_refusal(vit_int8, "grad_rollout")
    assert "int8 layers give no input gradient" in map_refusal(vit_int8, "ig")
    with pytest.raises(PatchslimError, match="int8 layers give no input gradient"):
        check_kinds(vit_int8, "attention,ig")
    quantize.refuse_gradients(patchslim.load_model("fashion-vit", device="cpu", pretrained=False), "fine-tuning")


def test_maps_without_gradients_still_work_on_int8(vit_int8, canvas):
    from patchslim.explain import explain
    from patchslim.explain.maps import default_kinds

    x, _ = canvas
    result = explain(vit_int8, x[:1], patchslim.SlimPlan.single("uniform", 0.5), attribution="occlusion",
                     faithfulness="token", faithfulness_steps=4)
    assert result.grad_rollout_before is None and "int8" in result.grad_rollout_refused
    assert result.attribution_after.method == "occlusion"
    assert {r["map"] for r in result.faithfulness.rows()} >= {"attention", "rollout", "occlusion"}
    assert "grad_rollout" not in default_kinds(vit_int8)


def test_cli_refuses_ig_on_int8_in_one_line(tmp_path, capsys):
    from PIL import Image

    from patchslim.cli import main

    image = tmp_path / "x.png"
    Image.new("L", (48, 48), 128).save(image)
    code = main(["explain", "--model", "fashion-vit", "--device", "cpu", "--precision", "int8", "--method", "uniform",
                 "--image", str(image), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: int8 layers give no input gradient: Integrated Gradients needs one")


# --------------------------------------------------------------------------- the compression benchmark

def test_compression_benchmark_on_a_tiny_input(tmp_path):
    from patchslim.benchmarks.compression import CompressionConfig, run_compression
    from patchslim.plan import SlimPlan

    # a "fine-tuned" checkpoint: the bundled weights with a card naming its plan (what finetune writes beside them)
    checkpoint = tmp_path / "uniform03.safetensors"
    checkpoint.write_bytes(bundled.CHECKPOINT_PATH.read_bytes())
    (tmp_path / "uniform03.json").write_text(json.dumps(dict(base_model="fashion-vit", label="uniform 0.3 distill",
                                                             plan=SlimPlan.single("uniform", 0.3).to_dict())))
    config = CompressionConfig(data="bundled", limit=12, batch_size=6, progress=False, timed_models=("fashion-vit",),
                               batch_sizes=(2,), repeats=1, warmup=0,
                               finetuned=(("uniform 0.3 distill", str(checkpoint)), ("gone", str(tmp_path / "x.st"))))
    result = run_compression(config)
    rows = {r["row"]: r for r in result.rows}
    assert list(rows)[:2] == ["fp32", "int8"] and {"int8 + tome 0.5", "int8 + attention 0.5"} <= set(rows)
    assert rows["fp32"]["agreement"] == 1.0 and rows["fp32"]["n"] == 12
    # same weights, same plan: the fine-tuned row equals the training-free one
    assert rows["fine-tuned uniform 0.3 distill"]["top1"] == rows["uniform 0.3"]["top1"]
    assert rows["int8"]["gmacs"] == rows["fp32"]["gmacs"] and rows["int8 + tome 0.5"]["gmacs"] == rows["tome 0.5"]["gmacs"]
    assert rows["int8"]["weights_mb"] < 0.35 * rows["fp32"]["weights_mb"]
    assert rows["fp32"]["speedup_b2"] == 1.0 and rows["int8"]["ms_b2"] > 0
    assert any("skipped fine-tuned gone: no checkpoint" in note for note in result.notes)
    files = result.write(tmp_path / "out", "python -m patchslim benchmark --which compression", png=False)
    text = files["md"].read_text()
    assert "int8 alone on fashion-vit" in text and str(tmp_path) not in text


# --------------------------------------------------------------------------- the app

def test_app_offers_int8_shows_the_weights_and_explains_without_gradients():
    pytest.importorskip("streamlit")
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    main = Path(__file__).resolve().parent.parent / "app" / "main.py"
    at = AppTest.from_file(str(main), default_timeout=180).run()
    at.selectbox(key="model_name").set_value(bundled.BUNDLED_NAME).run()
    assert "int8" in at.selectbox(key="precision").options
    at.selectbox(key="precision").set_value("int8").run()
    assert not at.exception
    weights = [m for m in at.metric if m.label == "Weights"][0]
    assert weights.value == "0.507 MB" and weights.delta.startswith("int8 (")
    at.switch_page("app_pages/explain.py").run()
    assert at.radio(key="explain_attribution").options == ["Occlusion (one patch at a time)"]
    assert any("Integrated Gradients is not offered: int8 layers give no input gradient" in c.value for c in at.caption)
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert any("int8 layers give no input gradient" in i.value for i in at.info)
