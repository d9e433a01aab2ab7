"""Model loading: local weight files, safety, the offline path, the bundled model's accuracy."""

from __future__ import annotations

import json
import os
import pickle
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import patchslim
from patchslim import bundled, models
from patchslim.errors import (
    UnknownModelError,
    UnsupportedModelError,
    WeightsError,
    WeightsUnavailableError,
)


def test_loaded_model_describes_itself(deit_small_random, deit_small_distilled_random, fashion_trained):
    assert deit_small_random.patch_size == (16, 16)
    assert deit_small_random.grid_size == (14, 14)
    assert deit_small_random.num_prefix_tokens == 1
    assert deit_small_distilled_random.num_prefix_tokens == 2
    assert len(deit_small_random.class_names) == 1000
    assert deit_small_random.class_names[1].startswith("goldfish")
    assert fashion_trained.grid_size == (12, 12)
    assert fashion_trained.class_names == bundled.CLASS_NAMES
    assert not deit_small_random.model.training


@pytest.mark.parametrize("name", ["deit_base_patch16_224", "vit_base_patch16_224"])
def test_other_supported_architectures_build(name):
    model = patchslim.load_model(name, device="cpu", pretrained=False)
    assert model.spec.depth == 12 and model.spec.embed_dim == 768 and model.num_patches == 196


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_from_a_local_file(tmp_path, suffix):
    source = patchslim.load_model("deit_tiny_patch16_224", device="cpu", pretrained=False, seed=5)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"model": state}, path)
    loaded = patchslim.load_model("deit_tiny_patch16_224", device="cpu", weights=path)
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in state.items())
    assert str(path) in loaded.weights_source


def test_weights_dir_environment_variable(tmp_path, monkeypatch):
    source = patchslim.load_model("deit_tiny_patch16_224", device="cpu", pretrained=False, seed=9)
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()},
              str(tmp_path / "deit_tiny_patch16_224.safetensors"))
    monkeypatch.setenv(models.WEIGHTS_DIR_ENV, str(tmp_path))
    loaded = patchslim.load_model("deit_tiny_patch16_224", device="cpu")
    assert models.WEIGHTS_DIR_ENV in loaded.weights_source
    assert torch.equal(loaded.model.pos_embed, source.model.pos_embed)
    assert models.weights_status("deit_tiny_patch16_224").startswith("ready")


def test_weights_for_another_model_are_refused_with_the_reason(tmp_path, deit_small_random):
    other = deit_small_random
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="does not fit deit_tiny_patch16_224: .*shape mismatch"):
        patchslim.load_model("deit_tiny_patch16_224", device="cpu", weights=path)


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": _Payload(str(marker))}}, f)
    torch.save({"model": {"w": _Payload(str(marker))}}, tmp_path / "evil2.pth")
    for candidate in (path, tmp_path / "evil2.pth"):
        with pytest.raises(WeightsError, match="was not loaded"):
            patchslim.load_model("deit_tiny_patch16_224", device="cpu", weights=candidate)
    assert not marker.exists()


def test_corrupt_and_missing_weight_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot be read"):
        patchslim.load_model("deit_tiny_patch16_224", device="cpu", weights=bad)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        patchslim.load_model("deit_tiny_patch16_224", device="cpu", weights=tmp_path / "missing.pth")


def test_offline_error_names_the_model_and_how_to_provide_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        patchslim.load_model("deit_small_patch16_224", device="cpu")
    message = str(info.value)
    assert "deit_small_patch16_224" in message
    assert "--weights" in message and models.WEIGHTS_DIR_ENV in message and "--no-pretrained" in message
    assert time.perf_counter() - start < 20  # no 50-second hub retries (generous bound for slow CI)


def test_hub_probe_fails_fast_is_remembered_for_a_while_and_then_retried(monkeypatch):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_HUB_ANSWERS", {})
    with socket.socket() as probe:  # a loopback port nobody listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    assert models.hub_reachable() is False
    assert models._HUB_ANSWERS[endpoint][0] is False
    with socket.socket() as server:  # the "network comes back"
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(4)
        assert models.hub_reachable() is False  # remembered within the retry period: no probe
        assert models.hub_reachable(retry_after=0.0) is True  # past it: probed again
        assert models.hub_reachable(retry_after=1e9) is True  # a yes is kept


def test_unknown_and_unsupported_models():
    with pytest.raises(UnknownModelError, match="unknown model 'deit_huge_nonsense'"):
        patchslim.load_model("deit_huge_nonsense", pretrained=False)
    with pytest.raises(UnsupportedModelError, match="resnet18 is not supported: .*neither a timm VisionTransformer"):
        patchslim.load_model("resnet18", pretrained=False)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(patchslim.PatchslimError, match="fp16 needs a GPU"):
        patchslim.load_model("fashion-vit", device="cpu", precision="fp16")


def test_bundled_model_accuracy_on_the_shipped_sample(fashion_trained, fashion_sample):
    images, labels = fashion_sample
    assert images.shape[1:] == (48, 48) and len(images) >= 300
    x = bundled.to_model_input(images)
    pred = patchslim.run(fashion_trained, x).logits.argmax(-1).numpy()
    accuracy = float((pred == labels).mean())
    record = json.loads((bundled.ASSETS_DIR / "fashion_vit_training.json").read_text())
    assert accuracy >= 0.82, accuracy
    # the sample is the head of the fixed canvas test set, so its accuracy is that of those images
    assert abs(accuracy - record["canvas_test_top1"]) < 0.06


@pytest.mark.skipif(not bundled.fashion_mnist_available(), reason="needs apt-get install dataset-fashion-mnist")
def test_bundled_model_accuracy_on_the_full_canvas_test_set(fashion_trained, fashion_sample):
    images, labels = bundled.canvas_test_set()
    assert len(images) == 10_000
    sample_images, _ = fashion_sample
    assert np.array_equal(images[: len(sample_images)], sample_images)  # same fixed positions
    correct = 0
    for start in range(0, len(images), 1000):
        x = bundled.to_model_input(images[start : start + 1000])
        pred = patchslim.run(fashion_trained, x).logits.argmax(-1).numpy()
        correct += int((pred == labels[start : start + 1000]).sum())
    assert correct / len(images) >= 0.85


def test_bundled_transform_accepts_any_photo(fashion_trained):
    from PIL import Image

    photo = Image.new("RGB", (300, 200), (200, 30, 30))
    assert fashion_trained.transform(photo).shape == (1, 48, 48)
