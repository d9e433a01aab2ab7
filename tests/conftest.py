"""Shared fixtures: small models built offline, loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import patchslim  # noqa: E402
from patchslim import bundled  # noqa: E402


# One fixture per model, shared by the whole session: the engine never mutates a model (test_threads.py and
# test_engine.py check it), so one instance serves every test. A test that changes a model on purpose builds
# its own. Random weights come from load_model's seeded initialization (seed 0), the same in every session.

@pytest.fixture(scope="session")
def fashion_random():
    """The bundled architecture with random weights: 12x12 patches of 4 px on 48-px images, 6 blocks, cheap."""
    return patchslim.load_model("fashion-vit", device="cpu", pretrained=False)


@pytest.fixture(scope="session")
def fashion_trained():
    """The bundled model with its trained checkpoint from patchslim/assets/."""
    return patchslim.load_model("fashion-vit", device="cpu")


@pytest.fixture(scope="session")
def deit_tiny_random():
    """DeiT-Ti with a seeded random initialization (no download)."""
    return patchslim.load_model("deit_tiny_patch16_224", device="cpu", pretrained=False)


@pytest.fixture(scope="session")
def deit_tiny_distilled_random():
    """The distilled DeiT-Ti (CLS + distillation token), random initialization: cheap two-prefix tests."""
    return patchslim.load_model("deit_tiny_distilled_patch16_224", device="cpu", pretrained=False)


@pytest.fixture(scope="session")
def deit_small_random():
    """DeiT-S with a seeded random initialization."""
    return patchslim.load_model("deit_small_patch16_224", device="cpu", pretrained=False)


@pytest.fixture(scope="session")
def deit_small_distilled_random():
    """The distilled DeiT-S (two prefix tokens), random initialization."""
    return patchslim.load_model("deit_small_distilled_patch16_224", device="cpu", pretrained=False)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): one thread is
    faster than two fighting a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fashion_sample():
    """The labelled canvas test images shipped in patchslim/assets/: uint8 ``[n, 48, 48]`` and labels ``[n]``."""
    return bundled.load_bundled_sample()


@pytest.fixture(scope="session")
def fashion_batch(fashion_sample):
    """The first 16 sample images as the bundled model's input ``[16, 1, 48, 48]``, with labels."""
    images, labels = fashion_sample
    return bundled.to_model_input(images[:16]), torch.from_numpy(labels[:16])


@pytest.fixture(scope="session")
def imagenet_batch():
    """Two random 224x224 images (timing and shape tests with random-weight ImageNet models)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 224, 224, generator=g)


def app_page_text(at) -> str:
    """Every element an AppTest page drew (sidebar included) as text: labels, values, captions, help, options.
    For tests that search a page for what must not be there (e.g. a server path)."""
    out = []

    def walk(node):
        proto = getattr(node, "proto", None)
        if proto is not None:
            out.append(str(proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return "\n".join(out)


@pytest.fixture(scope="session")
def page_text():
    """:func:`app_page_text` as a fixture."""
    return app_page_text
