"""Seeded and sampled methods give an image the same result whatever batch it is in (patchslim.seeding)."""

from __future__ import annotations

import pytest
import torch

import patchslim
from patchslim.seeding import ImageRandom, image_keys

POSITIONS = (0, 3, 7)  # where the image sits in the batch of 8


def batches_with(x: torch.Tensor, image: int, others: torch.Tensor):
    """(position, batch of 8 holding ``x[image]`` at that position among 7 other images)."""
    for position in POSITIONS:
        rest = [o for o in others]
        yield position, torch.stack(rest[:position] + [x[image]] + rest[position:7])


def assert_same_as_alone(model, plan, x: torch.Tensor, others: torch.Tensor, *, block: int | None, atol: float):
    """Image 0 and 1 of ``x`` alone and at several positions among ``others``: the same kept patches entering
    ``block`` (None: the same scores of the plan's first stage instead) and the same logits."""
    for image in (0, 1):
        alone = patchslim.run(model, x[image : image + 1], plan)
        for position, batch in batches_with(x, image, others):
            inside = patchslim.run(model, batch, plan)
            if block is None:
                assert torch.equal(inside.stages[0].scores[position], alone.stages[0].scores[0]), position
            else:
                assert torch.equal(inside.patch_mask(block)[position], alone.patch_mask(block)[0]), position
            torch.testing.assert_close(inside.logits[position], alone.logits[0], rtol=0, atol=atol)


def test_image_keys_depend_on_the_image_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, 8, generator=g)
    keys = image_keys(x)
    assert len(set(keys)) == 5
    assert image_keys(x[2:3]) == [keys[2]]
    assert image_keys(x.flip(0)) == keys[::-1]
    nudged = x.clone()
    nudged[1, 2, 7, 7] = torch.nextafter(nudged[1, 2, 7, 7], torch.tensor(10.0))
    assert image_keys(nudged)[1] != keys[1] and image_keys(nudged)[0] == keys[0]


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (3, 3, 64, 64), (2, 1, 48, 48), (1, 3, 5, 7)])
def test_image_keys_are_the_two_weighted_sums_of_the_bits_however_they_are_sliced(shape):
    """The key is fixed arithmetic (seeded results rest on it): the low and high 16 bits of every value, each summed
    with its odd position weight, mixed; written here over whole images at once, in int64."""
    from patchslim.seeding import _MASK64, mix

    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * 100
    x.view(-1)[::5] *= -1e-3  # negative values and small exponents too
    bits = x.reshape(shape[0], -1).view(torch.int32).long()
    w = (torch.arange(bits.shape[1]) % 4093) * 2 + 1
    low, high = ((bits & 0xFFFF) * w).sum(1), ((bits >> 16) * w).sum(1)
    assert image_keys(x) == [mix(int(h), int(lo) & _MASK64) for lo, h in zip(low, high)]


def test_image_random_rows_follow_their_image():
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    batch = ImageRandom(7, x).rand(6, 5, groups=2)  # two window rows per image
    alone = ImageRandom(7, x[1:2]).rand(2, 5, groups=2)
    assert torch.equal(batch[2:4], alone)
    copies = ImageRandom(7, x).rand(6, 5)  # two copies of the batch: row s * 3 + b is image b
    assert torch.equal(copies[[1, 4]], ImageRandom(7, x[1:2]).rand(2, 5))
    assert not torch.equal(ImageRandom(8, x[1:2]).rand(2, 5), alone)  # the seed matters
    with pytest.raises(ValueError, match="not 2 window groups"):
        ImageRandom(7, x).rand(5, 5, groups=2)


@pytest.mark.parametrize("label", ["random@0", "random@1", "random@2+4"])
def test_random_is_batch_invariant(fashion_trained, fashion_batch, label):
    method, blocks = label.split("@")
    plan = patchslim.SlimPlan.single(method, 0.5, tuple(int(b) for b in blocks.split("+")), seed=3)
    x = fashion_batch[0]
    assert_same_as_alone(fashion_trained, plan, x[:2], x[2:9], block=5, atol=1e-5)


def test_random_still_follows_the_seed(fashion_random, fashion_batch):
    x = fashion_batch[0][:4]
    one = patchslim.run(fashion_random, x, patchslim.SlimPlan.single("random", 0.5, seed=0)).kept_patch_ids(1)
    again = patchslim.run(fashion_random, x, patchslim.SlimPlan.single("random", 0.5, seed=0)).kept_patch_ids(1)
    other = patchslim.run(fashion_random, x, patchslim.SlimPlan.single("random", 0.5, seed=1)).kept_patch_ids(1)
    assert torch.equal(one, again) and not torch.equal(one, other)
    assert not torch.equal(one[0], one[1])  # each image its own draw


@pytest.mark.parametrize("sample", [False, True])
def test_rl_bernoulli_is_batch_invariant(fashion_trained, fashion_batch, sample):
    plan = patchslim.SlimPlan.single("rl", 0.5, mode="bernoulli", sample=sample, seed=2)
    x = fashion_batch[0]
    counts = [patchslim.run(fashion_trained, x[i : i + 1], plan).final_tokens for i in range(9)]
    assert len(set(counts)) > 1  # the images keep different counts, so the batch must mask
    assert_same_as_alone(fashion_trained, plan, x[:2], x[2:9], block=None, atol=1e-5)


def test_rl_bernoulli_masked_batch_refuses_a_later_stage(fashion_trained, fashion_batch):
    from patchslim.errors import PlanError
    from patchslim.plan import Stage

    plan = patchslim.SlimPlan((Stage("rl", 0.5, (1,), {"mode": "bernoulli"}), Stage("random", 0.5, (3,))))
    with pytest.raises(PlanError, match="different number of tokens per image"):
        patchslim.run(fashion_trained, fashion_batch[0][:8], plan)


def test_swin_windowed_random_is_batch_invariant(fashion_batch):
    model = patchslim.load_model("fashion-swin", pretrained=False)
    plan = patchslim.SlimPlan.single("random", 0.5, seed=5)
    x = fashion_batch[0]
    for image in (0, 1):
        alone = patchslim.run(model, x[image : image + 1], plan)
        for position, batch in batches_with(x[:2], image, x[2:9]):
            inside = patchslim.run(model, batch, plan)
            for block in range(len(alone.blocks)):
                assert torch.equal(inside.blocks[block].provenance.ids[position],
                                   alone.blocks[block].provenance.ids[0])
            torch.testing.assert_close(inside.logits[position], alone.logits[0], rtol=0, atol=1e-5)
