"""Fine-tuning with slimming and distillation (``patchslim.finetune``, ``python -m patchslim finetune``)."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import patchslim
from patchslim.cards import check_card, read_card, shipped_cards
from patchslim.cli import main
from patchslim.errors import PatchslimError, WeightsError
from patchslim.finetune import (FinetuneConfig, distillation_kl, finetune, finetune_loss, inference_keep_sets,
                                new_state, selects_by_keep_set, train_step, trainable_copy)
from patchslim.plan import SlimPlan

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(model, plan, **changes) -> FinetuneConfig:
    settings = dict(model=model.name, base_weights=model.weights_name, plan=plan.to_dict(),
                    method=plan.stages[0].method, keep_ratio=plan.stages[0].keep_ratio, epochs=1, steps_per_epoch=3,
                    batch_size=4, lr=1e-3, warmup=0.0, distill=True, seed=3, data="random tensors")
    settings.update(changes)
    return FinetuneConfig(**settings)


def _batches(model, batch=4):
    """A batch function deterministic in the step, as resuming needs."""

    def batch_fn(step: int):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(batch, *model.input_size, generator=g)
        return x, torch.randint(0, model.spec.num_classes, (batch,), generator=g)

    return batch_fn


# --------------------------------------------------------------------------- the loss

def test_the_kl_term_is_the_divergence_at_the_temperature_times_its_square():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in (1.0, 4.0):
        p = (teacher / t).softmax(-1)
        expected = (p * (p.log() - (student / t).log_softmax(-1))).sum(-1).mean() * t * t
        torch.testing.assert_close(distillation_kl(student, teacher, t), expected)
    assert float(distillation_kl(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    # a higher temperature softens both distributions: the divergence before the T^2 factor shrinks
    assert float(distillation_kl(student, teacher, 4.0)) / 16 < float(distillation_kl(student, teacher, 1.0))


def test_the_loss_is_cross_entropy_plus_the_weighted_kl_term():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    ce = F.cross_entropy(student, labels)
    plain, parts = finetune_loss(student, labels)
    torch.testing.assert_close(plain, ce)
    assert parts["kl"] == 0.0
    weighted, parts = finetune_loss(student, labels, teacher, temperature=2.0, distill_weight=0.25)
    torch.testing.assert_close(weighted, ce + 0.25 * distillation_kl(student, teacher, 2.0))
    assert parts["ce"] == pytest.approx(float(ce)) and parts["kl"] > 0
    # the teacher gets no gradient
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    finetune_loss(student, labels, teacher)[0].backward()
    assert teacher.grad is None and student.grad is not None


def test_the_learning_rate_warms_up_then_decays_to_zero(fashion_random):
    config = _config(fashion_random, SlimPlan.single("uniform", 0.5), epochs=10, steps_per_epoch=10, warmup=0.1)
    rates = [config.learning_rate(s) for s in range(config.steps)]
    assert rates[9] == pytest.approx(config.lr) and rates[0] == pytest.approx(config.lr / 10)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] < 0.01 * config.lr


# --------------------------------------------------------------------------- one step

@pytest.mark.parametrize("method", ["attention", "uniform", "random"])
def test_a_step_trains_on_the_kept_set_inference_picks_and_changes_only_the_copy(fashion_random, method):
    plan = SlimPlan.single(method, 0.4, seed=5)
    x, y = _batches(fashion_random)(0)
    assert selects_by_keep_set(fashion_random, plan)
    inference = patchslim.run(fashion_random, x, plan)
    student = trainable_copy(fashion_random)
    replay = inference_keep_sets(student, x, plan)
    trained = patchslim.run(student, x, replay, grad=True)
    assert torch.equal(trained.final_provenance.ids.sort(1).values, inference.final_provenance.ids.sort(1).values)
    torch.testing.assert_close(trained.logits, inference.logits, atol=1e-5, rtol=1e-5)
    assert trained.logits.requires_grad

    before = {k: v.clone() for k, v in fashion_random.model.state_dict().items()}
    config = _config(fashion_random, plan)
    state = new_state(fashion_random, config)
    stats = train_step(state, config, plan, fashion_random, x, y, 0)
    assert stats["kl"] > 0 and stats["n"] == 4
    after = state.student.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the copy learned
    assert all(torch.equal(before[k], v) for k, v in fashion_random.model.state_dict().items())  # the model did not
    assert not any(p.requires_grad for p in fashion_random.model.parameters())


def test_merging_plans_train_through_the_plan_itself(fashion_random):
    plan = SlimPlan.single("tome", 0.5)
    assert not selects_by_keep_set(fashion_random, plan)
    config = _config(fashion_random, plan, distill=False)
    state = new_state(fashion_random, config)
    x, y = _batches(fashion_random)(0)
    stats = train_step(state, config, plan, None, x, y, 0)
    assert stats["kl"] == 0.0 and np.isfinite(stats["loss"])


def test_a_swin_fine_tune_step_runs_window_aware_slimming_with_gradients():
    swin = patchslim.load_model("fashion-swin", pretrained=False)
    plan = SlimPlan.single("attention", 0.5)
    x, y = _batches(swin)(0)
    assert not selects_by_keep_set(swin, plan)  # windows: the plan itself runs with grad=True
    config = _config(swin, plan)
    state = new_state(swin, config)
    state.student.model.eval()  # as train_step runs a plan that chooses inside the forward
    trace = patchslim.run(state.student, x, plan, grad=True)
    inference = patchslim.run(state.student, x, plan)
    assert trace.logits.requires_grad
    torch.testing.assert_close(trace.logits, inference.logits, atol=1e-5, rtol=1e-5)
    assert [b.tokens_mlp for b in trace.blocks] == [b.tokens_mlp for b in inference.blocks]
    assert trace.blocks[1].tokens_mlp < trace.blocks[1].tokens_attention or trace.keep_ratio < 1
    before = {k: v.clone() for k, v in state.student.model.state_dict().items()}
    stats = train_step(state, config, plan, swin, x, y, 0)
    assert np.isfinite(stats["loss"])
    assert any(not torch.equal(before[k], v) for k, v in state.student.model.state_dict().items())


def test_an_int8_model_is_refused_before_training(fashion_random, tmp_path):
    int8 = dataclasses.replace(fashion_random, precision="int8")
    plan = SlimPlan.single("uniform", 0.5)
    with pytest.raises(PatchslimError, match="int8, whose layers give no gradient"):
        finetune(int8, plan, _config(int8, plan), _batches(int8), tmp_path, progress=False)


# --------------------------------------------------------------------------- resuming and cards

class _Stop(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(fashion_random, tmp_path):
    plan = SlimPlan.single("attention", 0.5)
    config = _config(fashion_random, plan, epochs=2)  # 6 steps
    batch_fn = _batches(fashion_random)
    straight = finetune(fashion_random, plan, config, batch_fn, tmp_path / "a", checkpoint_every=2, progress=False)

    def interrupted(step: int):
        if step == 5:
            raise _Stop
        return batch_fn(step)

    with pytest.raises(_Stop):
        finetune(fashion_random, plan, config, interrupted, tmp_path / "b", checkpoint_every=2, progress=False)
    assert (tmp_path / "b" / "fashion-vit_attention_0.5_distill.ckpt.pt").exists()
    lines = []
    resumed = finetune(fashion_random, plan, config, batch_fn, tmp_path / "b", checkpoint_every=2, progress=False,
                       log=lines.append)
    assert lines[0].startswith("resumed from fashion-vit_attention_0.5_distill.ckpt.pt at step 4 of 6")
    a, b = straight.model.model.state_dict(), resumed.model.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads(resumed.record.read_text())
    assert [h["step"] for h in record["history"]] == [3, 6]
    assert record["history"] == json.loads(straight.record.read_text())["history"]
    with pytest.raises(PatchslimError, match="lr=0.001 .*--restart"):
        finetune(fashion_random, plan, dataclasses.replace(config, lr=5e-4), batch_fn, tmp_path / "b",
                 progress=False)


def test_a_card_is_accepted_for_its_base_model_and_refused_for_another(fashion_random, tmp_path):
    plan = SlimPlan.single("uniform", 0.5)
    config = _config(fashion_random, plan, epochs=1, steps_per_epoch=1)
    result = finetune(fashion_random, plan, config, _batches(fashion_random), tmp_path, progress=False,
                      command="python -m patchslim finetune ...")
    card = read_card(result.weights)
    assert card["base_model"] == "fashion-vit" and card["plan"]["stages"][0]["method"] == "uniform"
    assert json.loads(result.card.read_text()) == card == result.card_data
    loaded = patchslim.load_model("fashion-vit", weights=result.weights)
    x, _ = _batches(fashion_random)(0)
    torch.testing.assert_close(patchslim.run(loaded, x).logits, patchslim.run(result.model, x).logits)
    for other in ("fashion-swin", "deit_tiny_patch16_224"):
        with pytest.raises(WeightsError, match=f"fine-tuned from 'fashion-vit' .*not '{other}'"):
            patchslim.load_model(other, weights=result.weights)
    # the sidecar card alone is enough (a .pth copy of the weights keeps its card beside it)
    pth = tmp_path / "copy.pth"
    torch.save(result.model.model.state_dict(), pth)
    (tmp_path / "copy.card.json").write_text(result.card.read_text())
    with pytest.raises(WeightsError, match="fine-tuned from 'fashion-vit'"):
        patchslim.load_model("fashion-swin", weights=pth)
    assert check_card(pth, "fashion-vit")["method"] == "uniform"
    (tmp_path / "copy.card.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        read_card(pth)
    # the shipped list reads cards by base model
    assert [c.path for c in shipped_cards("fashion-vit", tmp_path)] == [result.weights]
    assert shipped_cards("fashion-swin", tmp_path) == []


# --------------------------------------------------------------------------- the command

def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 20), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(root, classes):
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.png").write_bytes(_png(10 * k + i))
    return root


def test_the_command_fine_tunes_on_a_folder_and_writes_a_loadable_checkpoint(tmp_path, capsys):
    data = _folder(tmp_path / "data", ["Trouser", "Bag", "Sneaker"])
    out = tmp_path / "out"
    args = ["finetune", "--no-pretrained", "--data", str(data), "--method", "attention", "--keep", "0.5",
            "--distill", "--epochs", "1", "--batch-size", "4", "--val", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out training images" in printed and "wrote" in printed
    weights = out / "fashion-vit_attention_0.5_distill.safetensors"
    card = read_card(weights)
    assert card["top1"]["n"] == 1 and card["distill"]["weight"] == 0.5 and card["epochs"] == 1.0
    patchslim.load_model("fashion-vit", weights=weights)
    assert main(args) == 0  # a finished run reruns from its checkpoint without training again
    assert "resumed from" in capsys.readouterr().err


def test_the_command_refuses_data_with_classes_the_model_does_not_have(tmp_path, capsys):
    data = _folder(tmp_path / "data", ["Trouser", "Bag", "spaceship"])
    code = main(["finetune", "--no-pretrained", "--data", str(data), "--method", "uniform", "--keep", "0.5",
                 "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "classes fashion-vit does not have: spaceship (3 images)" in err
    assert not (tmp_path / "out").exists()
