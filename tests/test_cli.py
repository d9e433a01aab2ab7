"""``python -m patchslim``: info, run, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchslim import bundled

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "patchslim", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def canvas_png(tmp_path_factory, fashion_sample) -> Path:
    images, _ = fashion_sample
    path = tmp_path_factory.mktemp("img") / "canvas.png"
    Image.fromarray(images[0]).save(path)
    return path


def test_info_json_lists_models_methods_and_status():
    result = cli("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    names = {m["name"]: m["status"] for m in info["models"]}
    assert names["fashion-vit"].startswith("ready")
    assert "not available offline" in names["deit_small_patch16_224"]
    assert "random" in {m["name"] for m in info["methods"]}
    assert "cpu" in info["devices"]


def test_run_json_on_the_bundled_model(canvas_png):
    result = cli("run", "--model", "fashion-vit", "--method", "random", "--keep", "0.5",
                 "--image", str(canvas_png), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["model"] == "fashion-vit" and out["method"] == "random"
    assert out["keep_ratio"] == pytest.approx(72 / 144)
    assert out["tokens_per_block"] == [73] * 6
    assert len(out["top5"]) == len(out["baseline_top5"]) == 5
    assert set(out["top5"][0]) == {"label", "prob"}
    assert out["baseline_top5"][0]["label"] in bundled.CLASS_NAMES
    assert sum(p["prob"] for p in out["baseline_top5"]) <= 1.0 + 1e-6


def test_run_text_output_and_options(canvas_png):
    result = cli("run", "--model", "fashion-vit", "--method", "random", "--keep", "0.25",
                 "--opt", "blocks=2", "--image", str(canvas_png))
    assert result.returncode == 0, result.stderr
    assert "tokens per block: 145 145 37 37 37 37" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("--model", "nope", "--method", "random"), "unknown model 'nope'"),
        (("--model", "fashion-vit", "--method", "nope"), "unknown method 'nope'"),
        (("--model", "fashion-vit", "--method", "random", "--keep", "1.5"), "keep_ratio must be in (0, 1]"),
        (("--model", "fashion-vit", "--method", "random", "--opt", "r"), "--opt expects KEY=VALUE"),
        (("--model", "deit_small_patch16_224", "--method", "random"), "Pretrained weights for deit_small"),
    ],
)
def test_errors_exit_non_zero_with_one_line(canvas_png, args, message):
    result = cli("run", *args, "--image", str(canvas_png))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"", "is empty"),
                                              (b"hello, not a png", "not an image")])
def test_bad_image_files_exit_with_one_line(tmp_path, content, message):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    result = cli("run", "--model", "fashion-vit", "--method", "random", "--image", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_random_weights_run_for_imagenet_models(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(path)
    result = cli("run", "--model", "deit_tiny_patch16_224", "--no-pretrained", "--method", "random",
                 "--keep", "0.5", "--image", str(path), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["tokens_per_block"] == [99] * 12 and "random init" in out["weights"]
