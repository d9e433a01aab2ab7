"""Loading ViTs: timm models (pretrained or from a local file) and the bundled ``fashion-vit``.

``load_model`` returns a :class:`LoadedModel`: the timm model in eval mode, its preprocessing, class names
and shape facts. Weights are found in this order:

1. ``weights=PATH`` (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``weights_only=True``; a
   pickle that needs anything beyond tensors is refused, never executed);
2. ``$PATCHSLIM_WEIGHTS_DIR/<model name>.safetensors`` (or ``.pth``), for the app and servers;
3. the Hugging Face cache, where timm downloads pretrained weights (looked up locally first);
4. a download the normal timm way, but only after a one-second check that the hub is reachable
   (remembered for the process), so an offline machine fails at once instead of retrying for ~50 s.

When none works, :class:`~patchslim.errors.WeightsUnavailableError` names the model and says how to
provide weights. ``pretrained=False`` gives a seeded random initialization (for timing and tests).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from patchslim import bundled
from patchslim.device import check_precision, resolve_device
from patchslim.errors import UnknownModelError, UnsupportedModelError, WeightsError, WeightsUnavailableError
from patchslim.trace import ModelSpec

# The models the project is tested with; any other timm VisionTransformer is tried and refused clearly
# if the engine cannot walk it.
SUPPORTED_MODELS = (
    bundled.BUNDLED_NAME,
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "vit_base_patch16_224",
    "deit_small_distilled_patch16_224",
)
DEFAULT_MODEL = "deit_small_patch16_224"
WEIGHTS_DIR_ENV = "PATCHSLIM_WEIGHTS_DIR"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class LoadedModel:
    """A ViT ready for the engine.

    Attributes:
        name: model name as given to :func:`load_model`.
        model: the timm ``VisionTransformer`` in eval mode (never mutated by the engine).
        transform: PIL image -> ``[C, H, W]`` float tensor, the model's own preprocessing.
        class_names: one name per output class.
        spec: shape facts (patch size, grid, prefix tokens, widths).
        device: where the model lives.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast for the forward).
        weights_source: where the weights came from, in words.
        mean, std: the normalization of the transform (to undo it for display).
    """

    name: str
    model: torch.nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    class_names: tuple[str, ...]
    spec: ModelSpec
    device: torch.device
    precision: str
    weights_source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.spec.patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.spec.grid_size

    @property
    def num_prefix_tokens(self) -> int:
        return self.spec.num_prefix_tokens

    @property
    def num_patches(self) -> int:
        return self.spec.num_patches

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.spec.in_chans, *self.spec.img_size)

    def preprocess(self, images: Any) -> torch.Tensor:
        """Turns a PIL image, a list of them, or a tensor into a ``[B, C, H, W]`` batch on the device.

        Raises:
            ValueError: a tensor of the wrong shape for this model.
        """
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images given")
            batch = torch.stack([self.transform(img) for img in images])
        elif isinstance(images, torch.Tensor):
            batch = images.unsqueeze(0) if images.dim() == 3 else images
        else:
            raise TypeError(f"images must be PIL images or a tensor, got {type(images).__name__}")
        expected = self.input_size
        if batch.dim() != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(
                f"{self.name} expects images of shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {list(batch.shape)}"
            )
        return batch.to(self.device, torch.float32)


def model_names() -> list[str]:
    """The supported model names (any other timm ViT name may work too)."""
    return list(SUPPORTED_MODELS)


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device = "auto", weights: str | Path | None = None,
               pretrained: bool = True, precision: str = "fp32", seed: int = 0) -> LoadedModel:
    """Loads a ViT for the engine.

    Args:
        name: ``"fashion-vit"`` (the bundled model) or a timm model name.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
        weights: a local ``.safetensors`` / ``.pth`` file; overrides every other source.
        pretrained: False builds the architecture with a seeded random initialization.
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` autocast (fp16 only on a GPU).
        seed: seed of the random initialization when ``pretrained=False``.

    Raises:
        UnknownModelError: not a timm model nor the bundled one.
        UnsupportedModelError: a timm model that is not a plain VisionTransformer.
        WeightsUnavailableError: no weights could be had; the message says how to provide them.
        WeightsError: a weights file is unsafe, unreadable or for another model.
    """
    dev = resolve_device(device)
    check_precision(precision, dev)
    if name == bundled.BUNDLED_NAME:
        model, source = _build_bundled(weights, pretrained, seed)
        class_names = bundled.CLASS_NAMES
        mean, std = (bundled.CANVAS_MEAN,), (bundled.CANVAS_STD,)
        transform = _bundled_transform
    else:
        model, source = _build_timm(name, weights, pretrained, seed)
        class_names = _class_names(model)
        transform, mean, std = _timm_transform(model)
    model.eval().requires_grad_(False).to(dev)
    spec = model_spec(name, model)
    return LoadedModel(name, model, transform, class_names, spec, dev, precision, source, mean, std)


def model_spec(name: str, vit: torch.nn.Module) -> ModelSpec:
    """Reads the shape facts of a timm VisionTransformer."""
    first = vit.blocks[0]
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    return ModelSpec(
        name=name,
        img_size=tuple(int(s) for s in vit.patch_embed.img_size),
        patch_size=tuple(int(p) for p in vit.patch_embed.patch_size),
        grid_size=grid,
        in_chans=int(vit.patch_embed.proj.in_channels),
        num_prefix_tokens=int(vit.num_prefix_tokens),
        embed_dim=int(vit.embed_dim),
        depth=len(vit.blocks),
        num_heads=int(first.attn.num_heads),
        head_dim=int(first.attn.head_dim),
        mlp_hidden=int(first.mlp.fc1.out_features),
        num_classes=int(vit.num_classes),
        num_heads_out=2 if getattr(vit, "head_dist", None) is not None else 1,
    )


def check_walkable(name: str, vit: torch.nn.Module) -> None:
    """Refuses models the plan-driven engine cannot walk, with the reason.

    Raises:
        UnsupportedModelError
    """
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    def refuse(reason: str) -> None:
        raise UnsupportedModelError(
            f"{name} is not supported: {reason}. patchslim walks plain timm VisionTransformers "
            f"(ViT / DeiT with standard blocks), e.g. {', '.join(SUPPORTED_MODELS[1:])}."
        )

    if not isinstance(vit, VisionTransformer):
        refuse(f"it is a {type(vit).__name__}, not a timm VisionTransformer")
    if getattr(vit, "dynamic_img_size", False):
        refuse("dynamic image sizes are not supported")
    if not getattr(vit.patch_embed, "flatten", True):
        refuse("its patch embedding does not flatten to tokens")
    for i, blk in enumerate(vit.blocks):
        if type(blk).forward is not Block.forward:
            refuse(f"block {i} is a {type(blk).__name__}, not a standard pre-norm Block")
        if type(blk.attn).forward is not Attention.forward:
            refuse(f"block {i} uses {type(blk.attn).__name__} attention")
        if not isinstance(blk.mlp, Mlp):
            refuse(f"block {i} uses a {type(blk.mlp).__name__} MLP")


# --------------------------------------------------------------------------- bundled model

def _build_bundled(weights: str | Path | None, pretrained: bool, seed: int) -> tuple[torch.nn.Module, str]:
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(**bundled.MODEL_KWARGS)
    if weights is None and not pretrained:
        return model, f"random init (seed {seed})"
    path = Path(weights) if weights is not None else bundled.CHECKPOINT_PATH
    if not path.exists():
        raise WeightsUnavailableError(
            f"weights for {bundled.BUNDLED_NAME} not found at {path}; the checkpoint ships in assets/ "
            "(python -m patchslim.train_bundled recreates it)"
        )
    _load_into(model, path, bundled.BUNDLED_NAME)
    return model, f"file {path}"


def _bundled_transform(image: Image.Image) -> torch.Tensor:
    """Any image -> the bundled model's ``[1, 48, 48]`` input: grayscale, centre square, resized."""
    gray = image.convert("L")
    w, h = gray.size
    side = min(w, h)
    if (w, h) != (bundled.CANVAS_SIZE, bundled.CANVAS_SIZE):
        left, top = (w - side) // 2, (h - side) // 2
        gray = gray.crop((left, top, left + side, top + side)).resize(
            (bundled.CANVAS_SIZE, bundled.CANVAS_SIZE), Image.BILINEAR
        )
    return bundled.to_model_input(np.asarray(gray)[None])[0]


# --------------------------------------------------------------------------- timm models

def _build_timm(name: str, weights: str | Path | None, pretrained: bool, seed: int) -> tuple[torch.nn.Module, str]:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5] if name else []
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}{hint}; supported: {', '.join(SUPPORTED_MODELS)} or another timm ViT"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False)
    check_walkable(name, model)
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise WeightsUnavailableError(f"weights file {path} for {name} does not exist")
        _load_into(model, path, name)
        return model, f"file {path}"
    if not pretrained:
        return model, f"random init (seed {seed})"
    env_file = _weights_dir_file(name)
    if env_file is not None:
        _load_into(model, env_file, name)
        return model, f"file {env_file} (${WEIGHTS_DIR_ENV})"
    cached = _hf_cached_file(model)
    if cached is not None:
        _load_into(model, cached, name)
        return model, f"Hugging Face cache {cached}"
    hub_id = _hub_id(model)
    if hub_id is None or not hub_reachable():
        raise WeightsUnavailableError(_offline_message(name, hub_id))
    try:
        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # network errors come in many types; name the model and the cause
        raise WeightsUnavailableError(f"{_offline_message(name, hub_id)} (download failed: {exc})") from exc
    return model, f"downloaded from the Hugging Face hub ({hub_id})"


def _offline_message(name: str, hub_id: str | None) -> str:
    where = f"the Hugging Face hub ({hub_id})" if hub_id else "any hub"
    return (
        f"Pretrained weights for {name} are not available: not in the local cache and {where} cannot be "
        f"reached. Provide them with weights=PATH (--weights PATH) to a .safetensors/.pth file, put "
        f"<model>.safetensors in ${WEIGHTS_DIR_ENV}, or download once with internet into the Hugging Face "
        f"cache; or use pretrained=False (--no-pretrained) for random weights."
    )


def _hub_id(model: torch.nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("hf_hub_id")


def _hf_cached_file(model: torch.nn.Module) -> Path | None:
    """The model's weights in the local Hugging Face cache, without touching the network."""
    hub_id = _hub_id(model)
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    for filename in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and os.path.exists(found):
            return Path(found)
    return None


def _weights_dir_file(name: str) -> Path | None:
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if not folder:
        return None
    for suffix in _WEIGHT_SUFFIXES:
        candidate = Path(folder) / f"{name}{suffix}"
        if candidate.exists():
            return candidate
    return None


_HUB_STATE: dict[str, bool] = {}
_HUB_LOCK = threading.Lock()


def hub_reachable(timeout: float = 1.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds.

    The answer is remembered for the process. ``HF_HUB_OFFLINE=1`` answers False at once. The probe runs
    in a daemon thread so that a slow DNS lookup cannot hold the caller longer than ``timeout``.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    with _HUB_LOCK:
        if endpoint in _HUB_STATE:
            return _HUB_STATE[endpoint]
        parsed = urlparse(endpoint)
        host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)
        result: list[bool] = []

        def probe() -> None:
            try:
                with socket.create_connection((host, port), timeout=timeout):
                    result.append(True)
            except OSError:
                result.append(False)

        worker = threading.Thread(target=probe, daemon=True)
        worker.start()
        worker.join(timeout + 0.2)
        _HUB_STATE[endpoint] = bool(result and result[0])
        return _HUB_STATE[endpoint]


def _class_names(model: torch.nn.Module) -> tuple[str, ...]:
    n = int(model.num_classes)
    if n == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return tuple(info.index_to_description(i) for i in range(n))
    label_names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if label_names and len(label_names) == n:
        return tuple(label_names)
    return tuple(f"class {i}" for i in range(n))


def _timm_transform(model: torch.nn.Module):
    from timm.data import create_transform, resolve_model_data_config

    config = resolve_model_data_config(model)
    transform = create_transform(**config, is_training=False)

    def rgb_transform(image: Image.Image) -> torch.Tensor:
        return transform(image.convert("RGB"))

    return rgb_transform, tuple(config["mean"]), tuple(config["std"])


# --------------------------------------------------------------------------- safe weight files

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads tensors from a weights file without running any pickled code.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``,
    which refuses pickles that reference functions or classes. Nested checkpoints (``{"model": ...}``,
    ``{"state_dict": ...}``) are unwrapped.

    Raises:
        WeightsError: the file is unsafe, corrupt or holds no tensors.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        unsafe = "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc)
        reason = "it contains pickled code or objects, which are refused" if unsafe else f"it cannot be read ({exc})"
        raise WeightsError(f"weights file {path} was not loaded: {reason.splitlines()[0]}") from None
    for key in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} holds no tensors")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _load_into(model: torch.nn.Module, path: Path, name: str) -> None:
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
        return
    except RuntimeError as first_error:
        try:  # original DeiT / JAX layouts, as timm converts them for its own pretrained files
            from timm.models.vision_transformer import checkpoint_filter_fn

            model.load_state_dict(checkpoint_filter_fn(dict(state), model), strict=True)
            return
        except Exception:
            pass
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        detail = "; ".join(
            part for part in (
                f"missing {len(missing)} keys (e.g. {missing[0]})" if missing else "",
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
                f"{len(wrong)} shape mismatches (e.g. {wrong[0]}: file {tuple(state[wrong[0]].shape)}, "
                f"model {tuple(own[wrong[0]].shape)})" if wrong else "",
            ) if part
        ) or str(first_error).splitlines()[0]
        raise WeightsError(f"weights file {path} does not fit {name}: {detail}") from None


def weights_status(name: str) -> str:
    """Where ``load_model(name)`` would get weights right now, in words, without loading anything."""
    if name == bundled.BUNDLED_NAME:
        return "ready (bundled checkpoint)" if bundled.CHECKPOINT_PATH.exists() else "checkpoint missing from assets/"
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        return "unknown model"
    if _weights_dir_file(name) is not None:
        return f"ready (${WEIGHTS_DIR_ENV})"
    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None

    class _Probe:
        pretrained_cfg = {"hf_hub_id": hub_id}

    if _hf_cached_file(_Probe()) is not None:
        return "ready (Hugging Face cache)"
    if hub_id and hub_reachable():
        return "downloadable (not cached yet)"
    return "weights not available offline (use --weights PATH or --no-pretrained)"
