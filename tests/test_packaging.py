"""patchslim as a user installs it: the wheel built from pyproject.toml holds the package, its methods and the
bundled model's files, declares the ``patchslim`` command, and once installed finds its model and policy from
any working directory (they live inside the package, not next to a checkout).

The wheel is built from a copy of the sources, so that the build's ``build/`` and ``*.egg-info`` never land in
the checkout (several people and test runs share it).
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import patchslim
from patchslim import bundled, policy

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "patchslim"


def _run(command: list[str], *, cwd: Path, env: dict | None = None, timeout: float = 120) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the project's sources (no dependencies, no build isolation: offline)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / "patchslim", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(out)], cwd=out)
    (built,) = out.glob("patchslim-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own (the venv's torch, timm, ... serve as its dependencies)."""
    target = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--no-index", "-q",
          "--target", str(target)], cwd=target)
    return target


def test_wheel_holds_the_package_its_methods_and_the_bundled_files(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = f"patchslim-{patchslim.__version__}.dist-info"
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
        metadata = archive.read(f"{dist_info}/METADATA").decode()

    assert wheel.name.startswith(f"patchslim-{patchslim.__version__}-")
    methods = {f"patchslim/methods/{path.name}" for path in (PACKAGE / "methods").glob("*.py")}
    assert {"patchslim/__init__.py", "patchslim/__main__.py", "patchslim/cli.py"} <= names
    assert methods and methods <= names, sorted(methods - names)
    shipped = [bundled.CHECKPOINT_PATH, bundled.SAMPLE_PATH, policy.default_policy_path(bundled.BUNDLED_NAME)]
    for path in shipped:
        assert path.exists(), path
        assert path.relative_to(REPO).as_posix() in names
    assert "patchslim/assets/fashion_vit.safetensors" in names
    assert "patchslim/assets/policies/fashion-vit.safetensors" in names
    assert "patchslim/assets/fashion_canvas_sample.npz" in names
    finetuned = sorted((PACKAGE / "assets" / "finetuned").glob("*"))  # fine-tuned checkpoints and their cards
    assert {p.relative_to(REPO).as_posix() for p in finetuned} <= names
    # Only the package: no tests, app, benchmarks or scripts at the wheel's top level.
    assert {name.split("/")[0] for name in names} == {"patchslim", dist_info}

    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    assert dict(scripts["console_scripts"]) == {"patchslim": "patchslim.cli:main"}
    assert "Requires-Python: >=3.10" in metadata


def test_installed_package_finds_its_model_and_policy_from_another_directory(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1"}

    # The installed copy is the one imported (looked up without importing torch).
    origin = _run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('patchslim').origin)"],
                  cwd=elsewhere, env=env)
    assert Path(origin.strip()).resolve() == (installed / "patchslim" / "__init__.py").resolve()

    info = json.loads(_run([sys.executable, "-m", "patchslim", "info", "--json"], cwd=elsewhere, env=env))
    status = {model["name"]: model["status"] for model in info["models"]}
    assert status[bundled.BUNDLED_NAME] == "ready (bundled checkpoint)"

    # The `patchslim` command runs the bundled model with the shipped RL policy: both load from the package.
    from PIL import Image

    images, _ = bundled.load_bundled_sample()
    image = elsewhere / "canvas.png"
    Image.fromarray(images[0]).save(image)
    command = installed / "bin" / ("patchslim.exe" if os.name == "nt" else "patchslim")
    result = json.loads(_run([str(command), "run", "--model", bundled.BUNDLED_NAME, "--method", "rl", "--keep", "0.5",
                              "--image", str(image), "--repeats", "0", "--json"], cwd=elsewhere, env=env))
    assert result["weights"] == f"file {installed / 'patchslim' / 'assets' / 'fashion_vit.safetensors'}"
    assert result["keep_ratio"] == pytest.approx(0.5, abs=0.01)
    assert result["top5"][0]["label"] in bundled.CLASS_NAMES
