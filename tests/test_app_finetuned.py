"""The app's weights choice offers the fine-tuned checkpoints shipped for the chosen model (read by their cards)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import patchslim
from patchslim import bundled
from patchslim.cards import FORMAT, shipped_cards
from patchslim.finetune import write_checkpoint
from patchslim.plan import SlimPlan

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "app" / "main.py"
TIMEOUT = 180


@pytest.fixture()
def shipped(tmp_path, monkeypatch):
    """A folder of shipped checkpoints: one fine-tuned fashion-vit (its weights nudged, so its logits differ) and a
    card for a model the test never picks."""
    from app import state

    model = patchslim.load_model(bundled.BUNDLED_NAME, pretrained=bundled.CHECKPOINT_PATH.exists())
    module = model.adapter.module
    nudged = {k: v.clone() for k, v in module.state_dict().items()}
    nudged["head.bias"] += torch.linspace(-1, 1, nudged["head.bias"].numel())
    copy = type(module)(**bundled.MODEL_KWARGS)
    copy.load_state_dict(nudged)
    card = dict(format=FORMAT, base_model=bundled.BUNDLED_NAME, plan=SlimPlan.single("uniform", 0.3).to_dict(),
                method="uniform", keep_ratio=0.3, distill=dict(temperature=1.0, weight=0.5), data="test",
                epochs=1, top1=dict(value=0.8123, n=10, data="test"))
    write_checkpoint(tmp_path / "fashion-vit_uniform_0.3_distill.safetensors", copy, card)
    write_checkpoint(tmp_path / "other.safetensors", copy, dict(card, base_model="deit_tiny_patch16_224"))
    monkeypatch.setattr(state, "shipped_cards", lambda name: shipped_cards(name, tmp_path))
    return tmp_path


def test_the_weights_choice_lists_and_loads_the_checkpoints_shipped_for_the_model(shipped):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from app import state

    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)
    at.session_state["model_name"] = bundled.BUNDLED_NAME
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    radio = at.radio(key="weights_mode")
    choice = f"{state.FINETUNED_PREFIX}fashion-vit_uniform_0.3_distill"
    assert radio.options == ["bundled checkpoint", "fine-tuned: uniform rho 0.3 + distillation (81.2 %)"]
    before = at.session_state["settings"].choice
    assert before.weights_label == "" and "fashion_vit.safetensors" in before.model.weights_source

    radio.set_value(choice).run()
    assert not at.exception, [e.value for e in at.exception]
    after = at.session_state["settings"].choice
    assert after.model.name == bundled.BUNDLED_NAME and after.key != before.key
    assert after.model.weights_source.endswith("fashion-vit_uniform_0.3_distill.safetensors")
    assert after.weights_label.startswith("fine-tuned: uniform rho 0.3")
    assert any("fine-tuned: uniform rho 0.3" in c.value for c in at.sidebar.caption)
    x = torch.zeros(1, 1, 48, 48)
    assert not torch.allclose(patchslim.run(after.model, x).logits, patchslim.run(before.model, x).logits)
    assert any(m.label == "Tokens in last block" and m.value for m in at.metric)  # the page runs with it

    # another model: its own choices only (fashion-swin has none shipped here, so no radio at all)
    at.selectbox(key="model_name").set_value(bundled.SWIN_NAME).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not [r for r in at.radio if r.key == "weights_mode"]
    assert at.session_state["settings"].choice.weights_label == ""
