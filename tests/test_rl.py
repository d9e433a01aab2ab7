"""The rl method, its policy files and its REINFORCE trainer (survey eq. 14-15)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

import patchslim
from patchslim import bundled
from patchslim.errors import PatchslimError, PlanError
from patchslim.policy import PolicyMeta, PolicyNet, arch_of, calibrate, policy_logits, read_policy, save_policy
from patchslim.policy_training import (
    TrainConfig,
    bernoulli_log_prob,
    bernoulli_sample,
    gumbel_topk,
    init_policy,
    keep_set_forward,
    plackett_luce_log_prob,
    reinforce_loss,
    train_policy,
)
from patchslim.tokens import target_count, top_k_index


POLICY_IMAGES = 8  # the first canvas images of the bundled sample: a test policy is calibrated and run on them


@pytest.fixture()
def policy_file(tmp_path, fashion_random, fashion_batch):
    net = PolicyNet(fashion_random.spec.embed_dim, hidden=16).eval()
    init_policy(net, torch.Generator().manual_seed(3))
    tokens = patchslim.tokens_before(fashion_random, fashion_batch[0][:POLICY_IMAGES], 1).tokens
    meta = PolicyMeta(model=fashion_random.name, arch=arch_of(fashion_random), block=1, hidden=16,
                      calibration=calibrate(net, [(tokens, 1)]))
    return save_policy(tmp_path / "policy.safetensors", net, meta)


def test_policy_forward_shapes():
    net = PolicyNet(96, hidden=32)
    assert net(torch.randn(3, 144, 96), torch.randn(3, 96)).shape == (3, 144)
    assert PolicyNet(96, use_cls=False)(torch.randn(2, 7, 96)).shape == (2, 7)


def test_policy_file_round_trip(policy_file, fashion_random):
    net, meta = read_policy(policy_file)
    assert meta.model == "fashion-vit" and meta.block == 1 and meta.arch == arch_of(fashion_random)
    assert policy_file.stat().st_size < 100_000
    assert meta.offset(0.3) >= meta.offset(0.7)  # higher rho, lower threshold


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.77])
def test_topk_mode_reaches_rho_and_keeps_the_top_logits(fashion_random, fashion_batch, policy_file, rho):
    x = fashion_batch[0][:POLICY_IMAGES]
    trace = patchslim.run(fashion_random, x, patchslim.SlimPlan.single("rl", rho, policy=str(policy_file)))
    k = target_count(rho, 144)
    assert trace.keep_ratio == pytest.approx(k / 144)
    assert trace.tokens_per_block == [145] + [1 + k] * 5
    net, _ = read_policy(policy_file)
    with torch.no_grad():
        logits = policy_logits(net, patchslim.tokens_before(fashion_random, x, 1).tokens, 1)
    assert torch.equal(trace.kept_patch_ids(1), top_k_index(logits, k))


@pytest.mark.parametrize("rho", [0.3, 0.5])
def test_the_training_forward_given_the_inference_keep_set_gives_the_logits_of_run(fashion_trained, fashion_batch,
                                                                                   rho):
    """One forward: the policy is trained through the walk it is deployed in (the shipped policy, real weights)."""
    model, x = fashion_trained, fashion_batch[0]  # all 16 images
    deployed = patchslim.run(model, x, patchslim.SlimPlan.single("rl", rho))
    kept = deployed.kept_patch_ids(1)  # positions among the tokens entering block 1 (no slimming before it)
    trained = keep_set_forward(model, x, 1, kept, grad=True)
    assert torch.equal(trained.kept_patch_ids(1), kept)
    torch.testing.assert_close(trained.logits, deployed.logits, rtol=0, atol=1e-5)
    assert trained.logits.argmax(-1).tolist() == deployed.logits.argmax(-1).tolist()


def test_bernoulli_mode_is_adaptive(fashion_random, fashion_batch, policy_file):
    x = fashion_batch[0][:POLICY_IMAGES]
    plan = patchslim.SlimPlan.single("rl", 0.5, policy=str(policy_file), mode="bernoulli")
    counts = [patchslim.run(fashion_random, x[i : i + 1], plan).final_tokens - 1 for i in range(len(x))]
    assert len(set(counts)) > 1, "the count should depend on the image"
    batch = patchslim.run(fashion_random, x, plan)
    assert batch.final_tokens - 1 == max(counts)  # rectangular batches keep the batch's largest count
    assert abs(sum(counts) / len(counts) / 144 - 0.5) < 0.25  # calibrated around rho on these images
    sampled = patchslim.SlimPlan.single("rl", 0.5, policy=str(policy_file), mode="bernoulli", sample=True, seed=1)
    one, two = patchslim.run(fashion_random, x, sampled), patchslim.run(fashion_random, x, sampled)
    assert torch.equal(one.logits, two.logits)  # seeded


def test_refuses_a_policy_for_another_model(tmp_path, fashion_random, deit_tiny_random, fashion_batch):
    other = deit_tiny_random
    path = save_policy(tmp_path / "deit.safetensors", PolicyNet(192, hidden=8),
                       PolicyMeta(model=other.name, arch=arch_of(other), block=1, hidden=8))
    with pytest.raises(PlanError, match="deit_tiny_patch16_224.*not for 'fashion-vit'"):
        patchslim.run(fashion_random, fashion_batch[0][:1], patchslim.SlimPlan.single("rl", 0.5, policy=str(path)))


def test_refuses_a_missing_policy_saying_how_to_train_one(fashion_random, fashion_batch, tmp_path, monkeypatch):
    import patchslim.policy as policy

    monkeypatch.setattr(policy, "POLICY_DIR", tmp_path / "none")
    with pytest.raises(PlanError, match=r"no.*python -m patchslim train-policy --model fashion-vit"):
        patchslim.run(fashion_random, fashion_batch[0][:1], patchslim.SlimPlan.single("rl", 0.5))
    with pytest.raises(PlanError, match="does not exist"):
        patchslim.run(fashion_random, fashion_batch[0][:1],
                      patchslim.SlimPlan.single("rl", 0.5, policy=str(tmp_path / "x")))


def test_refuses_another_block_and_files_that_are_not_policies(fashion_random, fashion_batch, policy_file, tmp_path):
    with pytest.raises(PlanError, match="trained to act before block 1, not block 3"):
        patchslim.run(fashion_random, fashion_batch[0][:1],
                      patchslim.SlimPlan.single("rl", 0.5, 3, policy=str(policy_file)))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PlanError, match="not a patchslim policy"):
        read_policy(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(PlanError, match="cannot be read"):
        read_policy(tmp_path / "junk.safetensors")


def test_plackett_luce_probabilities_sum_to_one():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    total = 0.0
    for order in itertools.permutations(range(4), 2):
        total += math.exp(float(plackett_luce_log_prob(logits, torch.tensor([[list(order)]]))))
    assert total == pytest.approx(1.0, abs=1e-5)


def _expected_reward_topk(logits, k, samples=4000):
    order = gumbel_topk(logits, k, samples, torch.Generator().manual_seed(0))
    return float((order == 0).any(-1).float().mean())


def test_reinforce_moves_logits_towards_the_rewarded_patch():
    """Toy problem: 6 patches, keep 2; reward 1 when patch 0 is kept. REINFORCE must learn to keep it."""
    logits = torch.zeros(1, 6, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=0.5)
    before = _expected_reward_topk(logits.detach(), 2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        order = gumbel_topk(logits, 2, 8, gen)
        reward = (order == 0).any(-1).float()
        loss, _ = reinforce_loss(plackett_luce_log_prob(logits.expand(1, -1), order), reward)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _expected_reward_topk(logits.detach(), 2)
    assert after > before + 0.2
    assert int(logits.detach().argmax()) == 0


def test_reinforce_bernoulli_trades_accuracy_against_cost():
    """Reward = lambda * [patch 0 kept] - (1 - lambda) * kept share: keep patch 0, drop the others."""
    logits = torch.zeros(1, 6, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=1.0)
    gen = torch.Generator().manual_seed(2)
    for _ in range(80):
        keep = bernoulli_sample(logits, 8, gen)
        reward = 0.8 * keep[..., 0].float() - 0.2 * keep.float().mean(-1)
        loss, _ = reinforce_loss(bernoulli_log_prob(logits, keep), reward)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    p = torch.sigmoid(logits.detach())[0]
    assert p[0] > 0.8 and bool((p[1:] < 0.5).all())


def _batches(step: int):
    g = torch.Generator().manual_seed(step)
    images, labels = bundled.load_bundled_sample()
    idx = torch.randint(0, len(labels), (4,), generator=g).numpy()
    return bundled.to_model_input(images[idx]), torch.from_numpy(labels[idx])


def test_training_resumes_from_its_checkpoint(fashion_random, tmp_path):
    config = dict(model=fashion_random.name, block=1, keep_ratios=(0.5, 0.3), steps=4, batch_size=4, samples=2,
                  hidden=8)
    straight, _ = train_policy(fashion_random, TrainConfig(**config), _batches, tmp_path / "a.safetensors",
                               progress=False, checkpoint_every=2)
    train_policy(fashion_random, TrainConfig(**{**config, "steps": 2}), _batches, tmp_path / "b.safetensors",
                 progress=False, checkpoint_every=2)  # "killed" after 2 steps
    resumed, meta = train_policy(fashion_random, TrainConfig(**config), _batches, tmp_path / "b.safetensors",
                                 progress=False, checkpoint_every=2)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert meta.training["steps"] == 4 and meta.block == 1
    with pytest.raises(PatchslimError, match="lam"):
        train_policy(fashion_random, TrainConfig(**{**config, "lam": 0.5}), _batches, tmp_path / "b.safetensors",
                     progress=False)


def test_train_policy_command_runs(tmp_path, capsys):
    if not bundled.fashion_mnist_available():
        pytest.skip("Fashion-MNIST is not installed")
    from patchslim.cli import main

    out = tmp_path / "p.safetensors"
    code = main(["train-policy", "--no-pretrained", "--steps", "2", "--batch-size", "4", "--samples", "2",
                 "--val", "8", "--hidden", "8", "--out", str(out), "--no-progress"])
    assert code == 0 and out.exists()
    _, meta = read_policy(out)
    assert meta.validation["n"] == 8 and meta.calibration["offsets"]


def test_shipped_policy_beats_random_on_the_bundled_sample(fashion_trained, fashion_sample):
    from patchslim.data import canvas_images
    from patchslim.evaluate import evaluate, parse_variants

    images, labels = fashion_sample
    result = evaluate(fashion_trained, canvas_images(images, labels, "sample"), parse_variants("rl,random,random@1"),
                      [0.3], batch_size=250, progress=False)
    rl = result.row("rl", 0.3).top1
    # Measured on the 500 sample images (see benchmarks/results/accuracy.md for the full test set).
    assert rl >= result.row("random", 0.3).top1 + RL_MARGIN_AT_0_3
    assert rl >= result.row("random@1", 0.3).top1 + RL_MARGIN_AT_0_3_SAME_BLOCK


# Measured on the 500 sample images with the shipped policy: rl 86.8 %, random 66.8 %, random@1 70.8 % at rho 0.3
# (+20.0 and +16.0 points). The margins asked for are half of that, so noise in a retrained policy passes and a
# policy that ranks no better than chance fails.
RL_MARGIN_AT_0_3 = 0.10
RL_MARGIN_AT_0_3_SAME_BLOCK = 0.08
