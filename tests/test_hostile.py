"""Hostile files: weights that carry code, weights for another model, and uploads over the size limit.

A checkpoint can carry a pickle payload that runs when the file is unpickled. ``load_model(..., weights=)``
reads ``.safetensors`` with safetensors and anything else with ``torch.load(weights_only=True)``; the tests
build real payloads (which do run under a plain ``torch.load``, a control shows it) and prove they never
run through patchslim. Uploads are refused above the app's limit by the code path itself, whatever the
Streamlit server was configured to accept.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import struct
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image

import patchslim
from patchslim import bundled
from patchslim.errors import ImageError, WeightsError
from patchslim.images import open_image

REPO = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this object calls ``Path.touch(marker)``: the proof that code ran is a file appearing."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


class ListPayload:
    """The same idea through a builtin: ``open(marker, "w")`` creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def fashion_state(fashion_random) -> dict[str, torch.Tensor]:
    """A real state dict of the bundled model (random init), so every file is otherwise a valid checkpoint."""
    return {k: v.detach().clone() for k, v in fashion_random.model.state_dict().items()}


def _pickle_checkpoints(folder: Path, state: dict) -> list[tuple[Path, Path]]:
    """Checkpoints with a payload in every common place and container; returns ``(file, marker)`` pairs."""
    made = []

    def marker(name: str) -> Path:
        return folder / f"{name}.ran"

    def add(name: str, write) -> None:
        path = folder / name
        write(path, marker(name))
        made.append((path, marker(name)))

    add("nested_payload.pth", lambda p, m: torch.save({"model": state, "extra": Payload(m)}, p))
    add("payload_as_tensor.pt", lambda p, m: torch.save({**state, "blocks.0.norm1.weight": Payload(m)}, p))
    add("payload_at_top.bin", lambda p, m: torch.save(ListPayload(m), p))
    add("legacy_format.pth", lambda p, m: torch.save({"state_dict": state, "x": Payload(m)}, p,
                                                      _use_new_zipfile_serialization=False))
    add("raw_pickle.pkl", lambda p, m: p.write_bytes(pickle.dumps({"model": state, "x": Payload(m)})))
    add("pickle_named.safetensors", lambda p, m: torch.save({"model": state, "x": Payload(m)}, p))
    return made


def test_pickle_payloads_would_run_under_a_plain_torch_load(tmp_path, fashion_state):
    """The control: the payloads are live (a plain unpickler creates the marker)."""
    path, marker = _pickle_checkpoints(tmp_path, fashion_state)[0]
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("index", range(6))
def test_pickle_payload_is_refused_and_never_runs(tmp_path, fashion_state, index):
    path, marker = _pickle_checkpoints(tmp_path, fashion_state)[index]
    assert not marker.exists()
    with pytest.raises(WeightsError) as refused:
        patchslim.load_model(bundled.BUNDLED_NAME, device="cpu", weights=path)
    message = str(refused.value)
    assert str(path) in message and "not loaded" in message and "\n" not in message
    if path.suffix != ".safetensors":
        assert "pickled code or objects, which are refused" in message
    assert not marker.exists(), f"the payload in {path.name} ran"
    assert not any(tmp_path.glob("*.ran")), "a payload ran"


def test_payload_in_the_weights_folder_is_refused_too(tmp_path, monkeypatch, fashion_state):
    """``$PATCHSLIM_WEIGHTS_DIR/<model>.pth`` (the app's route for servers) goes through the same reader."""
    from patchslim.models import WEIGHTS_DIR_ENV

    name = "deit_tiny_patch16_224"
    marker = tmp_path / "env.ran"
    torch.save({"model": {}, "x": Payload(marker)}, tmp_path / f"{name}.pth")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(WeightsError, match="pickled code or objects, which are refused"):
        patchslim.load_model(name, device="cpu")
    assert not marker.exists()


def test_cli_refuses_the_payload_with_one_line(tmp_path, fashion_state, capsys):
    from patchslim import cli

    path, marker = _pickle_checkpoints(tmp_path, fashion_state)[0]
    image = tmp_path / "x.png"
    Image.new("RGB", (48, 48)).save(image)
    code = cli.main(["run", "--model", bundled.BUNDLED_NAME, "--weights", str(path), "--method", "random",
                     "--repeats", "0", "--image", str(image)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: weights file") and "Traceback" not in err
    assert not marker.exists()


# --------------------------------------------------------------------------- safetensors for another shape

def _save_safetensors(path: Path, state: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_safetensors_round_trip_loads(tmp_path, fashion_state):
    """The control: the same state dict written as safetensors loads and gives the same weights."""
    path = _save_safetensors(tmp_path / "ok.safetensors", fashion_state)
    loaded = patchslim.load_model(bundled.BUNDLED_NAME, device="cpu", weights=path)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, fashion_state[key]), key


def test_safetensors_with_a_wrong_shape_names_the_tensor(tmp_path, fashion_state):
    bad = dict(fashion_state)
    bad["blocks.0.mlp.fc1.weight"] = bad["blocks.0.mlp.fc1.weight"].t()  # [hidden, dim] -> [dim, hidden]
    path = _save_safetensors(tmp_path / "wrong_shape.safetensors", bad)
    with pytest.raises(WeightsError, match=r"does not fit fashion-vit: .*shape mismatch.*blocks\.0\.mlp\.fc1\.weight"):
        patchslim.load_model(bundled.BUNDLED_NAME, device="cpu", weights=path)


def test_safetensors_with_missing_tensors_is_refused(tmp_path, fashion_state):
    partial = {k: v for k, v in fashion_state.items() if not k.startswith("head.")}
    path = _save_safetensors(tmp_path / "no_head.safetensors", partial)
    with pytest.raises(WeightsError, match=r"does not fit fashion-vit: missing \d+ keys \(e\.g\. head\."):
        patchslim.load_model(bundled.BUNDLED_NAME, device="cpu", weights=path)


def test_another_models_weights_are_refused_both_ways(tmp_path, fashion_state, deit_tiny_random):
    fashion_file = _save_safetensors(tmp_path / "fashion.safetensors", fashion_state)
    with pytest.raises(WeightsError, match=r"does not fit deit_tiny_patch16_224"):
        patchslim.load_model("deit_tiny_patch16_224", device="cpu", weights=fashion_file)
    deit_file = _save_safetensors(tmp_path / "deit_tiny.safetensors", deit_tiny_random.model.state_dict())
    with pytest.raises(WeightsError, match=r"does not fit fashion-vit"):
        patchslim.load_model(bundled.BUNDLED_NAME, device="cpu", weights=deit_file)


@pytest.mark.parametrize("name, content", [
    ("truncated.safetensors", None),
    ("header_bomb.safetensors", struct.pack("<Q", 2**62) + b"{}"),
    ("empty.safetensors", b""),
    ("text.pth", b"these are not weights\n"),
])
def test_corrupt_weight_files_are_refused(tmp_path, fashion_state, name, content):
    path = tmp_path / name
    if content is None:
        data = _save_safetensors(tmp_path / "full.safetensors", fashion_state).read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=r"was not loaded: it cannot be read|holds no tensors"):
        patchslim.load_model(bundled.BUNDLED_NAME, device="cpu", weights=path)


# --------------------------------------------------------------------------- uploads over the size limit

def oversized_jpeg(megabytes: float) -> bytes:
    """A valid small JPEG followed by padding after its end marker: decoders read it fine, whatever its size."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data + b"\x00" * (int(megabytes * 1024 * 1024) - len(data))


def test_upload_limit_is_one_figure_in_config_and_code():
    from app import state

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == state.MAX_UPLOAD_MB
    assert 1 <= state.MAX_UPLOAD_MB <= 200


def test_upload_over_the_limit_is_refused_by_the_code_path(monkeypatch):
    from app import state

    data = oversized_jpeg(state.MAX_UPLOAD_MB + 1)
    assert open_image(data).size == (32, 32)  # the control: the engine alone (50 MB cap) reads it
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or pytest.fail("decoded"))
    with pytest.raises(ImageError, match=rf"uploads up to {state.MAX_UPLOAD_MB} MB are accepted"):
        state.decoded_upload(state.image_key(data), data)
    assert opened == []
    monkeypatch.undo()
    just_under = oversized_jpeg(state.MAX_UPLOAD_MB - 0.5)
    assert state.decoded_upload(state.image_key(just_under), just_under).size == (32, 32)


def test_app_refuses_an_oversized_upload_and_goes_on():
    """Through the sidebar's upload path in a running app (AppTest does not apply server.maxUploadSize)."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from app import state

    at = AppTest.from_file(str(REPO / "app" / "main.py"), default_timeout=180).run()
    at.selectbox(key="model_name").set_value(bundled.BUNDLED_NAME).run()
    at.radio(key="image_source").set_value("Upload").run()
    at.file_uploader(key="uploader").upload("big.jpg", oversized_jpeg(state.MAX_UPLOAD_MB + 1), "image/jpeg").run()
    assert not at.exception
    assert any(f"uploads up to {state.MAX_UPLOAD_MB} MB" in e.value for e in at.error), [e.value for e in at.error]
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (20, 120, 200)).save(buffer, "PNG")
    at.file_uploader(key="uploader").upload("small.png", buffer.getvalue(), "image/png").run()
    assert not at.exception and not at.error
    assert any(m.label == "Tokens in last block" and m.value for m in at.metric)

