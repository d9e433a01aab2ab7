"""The bundled model: a small ViT trained by this project on "canvas" Fashion-MNIST.

Each 28x28 Fashion-MNIST item is pasted at a random position on a blank 48x48 canvas, so that with
4-pixel patches the image is a 12x12 grid of 144 patches, most of them background (as in photographs).
That gives patch slimming something to find. Training draws fresh positions every epoch; the test set's
positions come from a fixed seed, so the 10,000-image canvas test set is identical on every machine.

Data: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, MIT licence), from the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). A few hundred canvas test images
ship in ``patchslim/assets/fashion_canvas_sample.npz`` so that machines without the package still have real data.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

BUNDLED_NAME = "fashion-vit"
CANVAS_SIZE = 48
ITEM_SIZE = 28
PATCH_SIZE = 4
TEST_POSITION_SEED = 20231
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Mean / std of canvas pixels in [0, 1] (measured on the canvas training set; mostly black background).
CANVAS_MEAN = 0.0973
CANVAS_STD = 0.2465

ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # package data: found wherever patchslim is installed
CHECKPOINT_PATH = ASSETS_DIR / "fashion_vit.safetensors"
SAMPLE_PATH = ASSETS_DIR / "fashion_canvas_sample.npz"
FASHION_MNIST_DIR = Path(os.environ.get("PATCHSLIM_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))

# timm VisionTransformer keyword arguments of the bundled model.
MODEL_KWARGS = dict(
    img_size=CANVAS_SIZE,
    patch_size=PATCH_SIZE,
    in_chans=1,
    num_classes=len(CLASS_NAMES),
    embed_dim=96,
    depth=6,
    num_heads=3,
    mlp_ratio=2.0,
    class_token=True,
    global_pool="token",
)

# The second bundled model, ``fashion-swin``: a small timm SwinTransformer on the same canvases. 4-pixel patches
# give a 12 x 12 token grid in stage 1 (four 6 x 6 windows, shifted by 3 in every second block) and 6 x 6 after
# patch merging (one window). Stage 1 holds most of its multiply-adds, so it is the stage slimmed by default.
SWIN_NAME = "fashion-swin"
SWIN_CHECKPOINT_PATH = ASSETS_DIR / "fashion_swin.safetensors"
SWIN_KWARGS = dict(
    img_size=CANVAS_SIZE,
    patch_size=PATCH_SIZE,
    in_chans=1,
    num_classes=len(CLASS_NAMES),
    embed_dim=64,
    depths=(4, 2),
    num_heads=(2, 4),
    window_size=6,
    mlp_ratio=2.0,
)
SWIN_DEFAULT_STAGES = (0,)
BUNDLED_MODELS = (BUNDLED_NAME, SWIN_NAME)


def is_bundled(name: str) -> bool:
    """Whether ``name`` is one of the models this project trained on canvas Fashion-MNIST."""
    return name in BUNDLED_MODELS


def checkpoint_path(name: str) -> Path:
    """Where the checkpoint of bundled model ``name`` ships."""
    return SWIN_CHECKPOINT_PATH if name == SWIN_NAME else CHECKPOINT_PATH


def fashion_mnist_available(root: Path = FASHION_MNIST_DIR) -> bool:
    """Whether the four Fashion-MNIST IDX files are present."""
    return all((root / f).exists() for f in _IDX_FILES.values())


_IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Loads the raw 28x28 Fashion-MNIST items of a split.

    Args:
        split: "train" or "test".
        root: folder with the four IDX ``.gz`` files.

    Returns:
        images ``[n, 28, 28]`` uint8 and labels ``[n]`` int64.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not fashion_mnist_available(root):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root}. Install it with "
            "'apt-get install -y dataset-fashion-mnist' or set PATCHSLIM_FASHION_MNIST to its folder."
        )
    images = _read_idx(root / _IDX_FILES[(split, "images")])
    labels = _read_idx(root / _IDX_FILES[(split, "labels")]).astype(np.int64)
    return images, labels


def place_on_canvas(items: np.ndarray, positions: np.ndarray, canvas_size: int = CANVAS_SIZE) -> np.ndarray:
    """Pastes 28x28 items onto blank canvases.

    Args:
        items: ``[n, 28, 28]`` uint8.
        positions: ``[n, 2]`` (top, left) offsets, each in ``[0, canvas_size - 28]``.
        canvas_size: side of the square canvas.

    Returns:
        ``[n, canvas_size, canvas_size]`` uint8.
    """
    n, h, w = items.shape
    canvases = np.zeros((n, canvas_size, canvas_size), dtype=np.uint8)
    for k in range(n):
        top, left = int(positions[k, 0]), int(positions[k, 1])
        canvases[k, top : top + h, left : left + w] = items[k]
    return canvases


def random_positions(n: int, rng: np.random.Generator, canvas_size: int = CANVAS_SIZE) -> np.ndarray:
    """Uniform random (top, left) offsets for ``n`` items."""
    return rng.integers(0, canvas_size - ITEM_SIZE + 1, size=(n, 2))


def canvas_test_set(root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The fixed 10,000-image canvas test set: ``[10000, 48, 48]`` uint8 and labels ``[10000]``."""
    items, labels = load_fashion_mnist("test", root)
    positions = random_positions(len(items), np.random.default_rng(TEST_POSITION_SEED))
    return place_on_canvas(items, positions), labels


def load_bundled_sample() -> tuple[np.ndarray, np.ndarray]:
    """The canvas test images shipped in ``patchslim/assets/``: ``[n, 48, 48]`` uint8 and labels ``[n]``.

    These are the first images of :func:`canvas_test_set`, so results on them are a subset of the
    full-test-set results.
    """
    with np.load(SAMPLE_PATH) as data:
        return data["images"], data["labels"].astype(np.int64)


def to_model_input(canvases: np.ndarray) -> "torch.Tensor":  # noqa: F821
    """Normalizes uint8 canvases ``[n, H, W]`` into the model's input ``[n, 1, H, W]`` float32."""
    import torch

    x = torch.from_numpy(np.asarray(canvases, dtype=np.float32) / np.float32(255.0))  # a fresh, writable array
    return x.sub_(CANVAS_MEAN).div_(CANVAS_STD).unsqueeze(1)
