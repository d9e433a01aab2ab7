"""Loading ViTs: timm models (pretrained, from a local file or a timm folder) and the bundled ``fashion-vit``.

``load_model`` returns a :class:`LoadedModel`: the timm model in eval mode, its preprocessing, class names,
shape facts and the architecture adapter the engine walks it with. :func:`wrap_model` makes the same from a
model built in the caller's own code. Names are timm's:

- a timm model name (``deit_small_patch16_224``) or ``fashion-vit``;
- ``local-dir:/path/to/folder``: a folder with timm's ``config.json`` and ``model.safetensors`` (or
  ``pytorch_model.bin``), as ``timm.models.save_for_hf`` writes it; image size, channels, classes, mean/std
  and class names come from its config;
- ``hf-hub:org/name``: the same from the Hugging Face hub, read from the local cache when it is there (so it
  works offline once downloaded), else downloaded when the hub answers.

For a timm model name, weights are found in this order:

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

import functools
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from patchslim import bundled
from patchslim.device import check_precision, resolve_device
from patchslim.adapters import Adapter, adapter_for
from patchslim.errors import (
    PatchslimError,
    UnknownModelError,
    WeightsError,
    WeightsUnavailableError,
)
from patchslim.trace import ModelSpec

# The models the project is tested with; any other timm VisionTransformer is tried and refused clearly
# if the engine cannot walk it.
SUPPORTED_MODELS = (
    bundled.BUNDLED_NAME,
    bundled.SWIN_NAME,
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "vit_base_patch16_224",
    "deit_small_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
)
BUNDLED_MODELS = bundled.BUNDLED_MODELS
DEFAULT_MODEL = "deit_small_patch16_224"
WEIGHTS_DIR_ENV = "PATCHSLIM_WEIGHTS_DIR"
LOCAL_DIR_PREFIX = "local-dir:"
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s()'\"]*")
HF_HUB_PREFIX = "hf-hub:"
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
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast for the forward), or ``"int8"`` (the Linear
            layers swapped for int8 ones: :mod:`patchslim.quantize`).
        weights_source: where the weights came from, in words.
        mean, std: the normalization of the transform (to undo it for display).
        adapter: how the engine walks this architecture (:mod:`patchslim.adapters`).
        int8_backend: for precision ``"int8"``, the backend that made the layers (``"eager"``, ``"torchao"``);
            ``""`` otherwise.
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
    adapter: Adapter
    int8_backend: str = ""

    @functools.cached_property
    def weights_mb(self) -> float:
        """The model's weights as stored, in MB (int8 layers at one byte per weight: :func:`patchslim.quantize.weights_mb`).
        Counted once per loaded model (a walk over every module, too slow to repeat on every app rerun): the size
        does not change with the values, and quantizing or loading other weights gives a new ``LoadedModel``."""
        from patchslim.quantize import weights_mb

        return weights_mb(self.model)

    @property
    def precision_label(self) -> str:
        """``fp32``, ``bf16``, ``fp16``, or ``int8 (eager)`` / ``int8 (torchao)``: the precision and how it is run."""
        return f"{self.precision} ({self.int8_backend})" if self.int8_backend else self.precision

    @property
    def weights_name(self) -> str:
        """``weights_source`` with every absolute path cut to its last part: what files meant for other people
        (reports, downloads, policy files) record, so they carry no path of the machine that wrote them."""
        return _ABSOLUTE_PATH.sub(lambda m: Path(m.group(0).rstrip("/")).name, self.weights_source)

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
               pretrained: bool = True, precision: str = "fp32", seed: int = 0,
               int8_backend: str | None = None) -> LoadedModel:
    """Loads a ViT for the engine.

    Args:
        name: ``"fashion-vit"`` (the bundled model), a timm model name, ``"local-dir:PATH"`` or
            ``"hf-hub:ORG/NAME"`` (see the module docstring).
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
        weights: a local ``.safetensors`` / ``.pth`` file; overrides every other source.
        pretrained: False builds the architecture with a seeded random initialization.
        precision: ``"fp32"``, ``"bf16"`` / ``"fp16"`` autocast (fp16 only on a GPU), or ``"int8"``: the loaded
            weights' Linear layers made int8 (:mod:`patchslim.quantize`; no gradients through them).
        seed: seed of the random initialization when ``pretrained=False``.
        int8_backend: with ``"int8"``, ``"eager"`` or ``"torchao"``; None takes the first that runs here
            (:func:`patchslim.quantize.int8_backends`).

    Raises:
        UnknownModelError: not a timm model, the bundled one, a timm folder or a hub name.
        UnsupportedModelError: an architecture the engine cannot walk (the message says why).
        WeightsUnavailableError: no weights could be had; the message says how to provide them.
        WeightsError: a weights file is unsafe, unreadable or for another model (a fine-tuned checkpoint whose card,
            :mod:`patchslim.cards`, names another base model is refused with the model it belongs to).
        Int8UnavailableError: ``"int8"`` on a device or PyTorch build without an int8 kernel.
    """
    dev = resolve_device(device)
    check_precision(precision, dev, int8_backend)
    if name in BUNDLED_MODELS:
        model, source = _build_bundled(name, weights, pretrained, seed)
        adapter = _bundled_adapter(name, model)
        class_names = bundled.CLASS_NAMES
        mean, std = (bundled.CANVAS_MEAN,), (bundled.CANVAS_STD,)
        transform = _bundled_transform
    else:
        if name.startswith(LOCAL_DIR_PREFIX) or name.startswith(HF_HUB_PREFIX):
            model, source = _build_from_source(name, weights, pretrained, seed)
        else:
            model, source = _build_timm(name, weights, pretrained, seed)
        adapter = adapter_for(name, model)
        class_names = _class_names(model)
        transform, mean, std = _timm_transform(model)
    model.eval().requires_grad_(False).to(dev)
    backend = ""
    if precision == "int8":  # the Linear layers swapped in place: the adapter walks the same (now int8) modules
        from patchslim.quantize import quantize_int8

        model, backend = quantize_int8(model, dev, int8_backend)
    return LoadedModel(name, model, transform, class_names, adapter.spec(), dev, precision, source, mean, std,
                       adapter, backend)


def wrap_model(model: torch.nn.Module, *, name: str, transform: Callable[[Image.Image], torch.Tensor] | None = None,
               class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, precision: str = "fp32",
               int8_backend: str | None = None) -> LoadedModel:
    """Turns a timm model built in your own code into what :func:`patchslim.run` takes.

    The model is put in eval mode and otherwise left as it is (its device, its ``requires_grad`` flags);
    the engine never writes to it. Keep-all plans give exactly ``model(x)``.

    Args:
        model: a timm ``VisionTransformer`` (any image size, channels, head width).
        name: what reports call it.
        transform: PIL image -> ``[C, H, W]`` tensor; default: timm's eval transform for the model's data
            config (image size, interpolation, crop), with ``mean`` / ``std`` when given, on grayscale
            images for a 1-channel model and RGB otherwise.
        class_names: one per class; default: the model's ``pretrained_cfg`` label names, else ``class i``.
        mean, std: the normalization (default: the model's data config).
        precision: ``"fp32"``, ``"bf16"`` / ``"fp16"`` autocast, or ``"int8"``: an int8 copy of the model is made
            (:mod:`patchslim.quantize`) and ``model`` itself is left as it is.
        int8_backend: with ``"int8"``, ``"eager"`` or ``"torchao"`` (None: the first that runs here).

    Raises:
        UnsupportedModelError: the engine cannot walk this model (the message says why).
        PatchslimError: class names that do not match the number of classes.
        Int8UnavailableError: ``"int8"`` on a device or PyTorch build without an int8 kernel.
    """
    adapter = adapter_for(name, model)
    spec = adapter.spec()
    param = next(iter(model.parameters()), None)
    dev = param.device if param is not None else torch.device("cpu")
    check_precision(precision, dev, int8_backend)
    backend = ""
    if precision == "int8":
        from patchslim.quantize import quantize_int8

        model, backend = quantize_int8(model.eval(), dev, int8_backend, copy_first=True)
        adapter = adapter_for(name, model)
    default_transform, default_mean, default_std = _timm_transform(model, mean, std)
    names = tuple(class_names) if class_names is not None else _class_names(model)
    if len(names) != spec.num_classes:
        raise PatchslimError(f"{len(names)} class names given for a model with {spec.num_classes} classes")
    model.eval()
    return LoadedModel(name, model, transform or default_transform, names, spec, dev, precision,
                       "in-memory model", default_mean, default_std, adapter, backend)


def model_spec(name: str, vit: torch.nn.Module) -> ModelSpec:
    """Reads the shape facts of a model the adapters know."""
    return adapter_for(name, vit).spec()


def check_walkable(name: str, vit: torch.nn.Module) -> None:
    """Refuses models the plan-driven engine cannot walk, with the reason.

    Raises:
        UnsupportedModelError
    """
    adapter_for(name, vit)


# --------------------------------------------------------------------------- bundled model

def _build_bundled(name: str, weights: str | Path | None, pretrained: bool,
                   seed: int) -> tuple[torch.nn.Module, str]:
    """``fashion-vit`` (a timm VisionTransformer) or ``fashion-swin`` (a timm SwinTransformer)."""
    swin = name == bundled.SWIN_NAME
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if swin:
            from timm.models.swin_transformer import SwinTransformer

            model = SwinTransformer(**bundled.SWIN_KWARGS)
        else:
            from timm.models.vision_transformer import VisionTransformer

            model = VisionTransformer(**bundled.MODEL_KWARGS)
    if weights is None and not pretrained:
        return model, f"random init (seed {seed})"
    path = Path(weights) if weights is not None else bundled.checkpoint_path(name)
    if not path.exists():
        raise WeightsUnavailableError(
            f"weights for {name} not found at {path}; the checkpoint ships in patchslim/assets/ "
            f"(python -m patchslim.train_bundled --model {name} recreates it)"
        )
    _load_into(model, path, name)
    return model, f"file {path}"


def _bundled_adapter(name: str, model: torch.nn.Module) -> Adapter:
    """The adapter of a bundled model; ``fashion-swin`` slims its first stage by default (where its
    multiply-adds are, and the last stage with four windows)."""
    if name == bundled.SWIN_NAME:
        from patchslim.adapters.swin import SwinAdapter

        adapter = SwinAdapter(name, model, default_stages=bundled.SWIN_DEFAULT_STAGES)
        adapter.check()
        return adapter
    return adapter_for(name, model)


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
    check_walkable(name, model)  # refuse before looking for weights
    if weights is not None:
        return model, _load_weights_file(model, weights, name)
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


def _build_from_source(name: str, weights: str | Path | None, pretrained: bool,
                       seed: int) -> tuple[torch.nn.Module, str]:
    """``local-dir:PATH`` and ``hf-hub:ORG/NAME``: timm reads the folder's ``config.json`` (architecture,
    arguments, image size, classes, label names, normalization) and, with ``pretrained``, its weights."""
    import timm

    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not (folder / "config.json").is_file():
            raise UnknownModelError(
                f"{name!r}: {folder} is not a timm model folder (no config.json; timm.models.save_for_hf writes "
                "config.json and model.safetensors)"
            )
        source, where = f"{LOCAL_DIR_PREFIX}{folder}", f"folder {folder.name}"
        has_weights = any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
        if pretrained and weights is None and not has_weights:
            raise WeightsUnavailableError(f"{name!r} has a config.json but no model.safetensors or pytorch_model.bin")
    else:
        hub_id = name[len(HF_HUB_PREFIX):]
        if not hub_id or hub_id.count("/") != 1:
            raise UnknownModelError(f"{name!r}: a hub name is hf-hub:ORG/NAME")
        cached = _hf_cached_folder(hub_id)
        if cached is not None:
            source, where = f"{LOCAL_DIR_PREFIX}{cached}", f"Hugging Face cache ({hub_id})"
        elif not hub_reachable():
            raise WeightsUnavailableError(
                f"{name!r} is not in the local Hugging Face cache and the hub cannot be reached; download it once "
                "with internet, or save it with timm.models.save_for_hf and load it as local-dir:PATH"
            )
        else:
            source, where = name, f"downloaded from the Hugging Face hub ({hub_id})"
    want_weights = pretrained and weights is None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(source, pretrained=want_weights)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise WeightsError(f"{name!r} could not be built by timm: {str(exc).splitlines()[0]}") from None
    check_walkable(name, model)
    if weights is not None:
        return model, _load_weights_file(model, weights, name)
    return model, where if want_weights else f"random init (seed {seed})"


def _load_weights_file(model: torch.nn.Module, weights: str | Path, name: str) -> str:
    """Loads ``weights=PATH`` into ``model``; returns the weights source in words."""
    path = Path(weights)
    if not path.exists():
        raise WeightsUnavailableError(f"weights file {path} for {name} does not exist")
    _load_into(model, path, name)
    return f"file {path}"


def _hf_cached_folder(hub_id: str) -> Path | None:
    """The cached snapshot folder of a hub model (config and weights both there), without the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    config = try_to_load_from_cache(hub_id, "config.json")
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    if any((folder / f).exists() for f in ("model.safetensors", "pytorch_model.bin")):
        return folder
    return None


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


HUB_RETRY_SECONDS = 60.0
_HUB_ANSWERS: dict[str, tuple[bool, float]] = {}  # endpoint -> (reachable, monotonic time of the probe)
_HUB_LOCK = threading.Lock()


def hub_reachable(timeout: float = 1.0, retry_after: float = HUB_RETRY_SECONDS) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds.

    A yes is remembered for the process; a no for ``retry_after`` seconds, after which the hub is probed
    again (a server that started offline finds it once the network is back). ``HF_HUB_OFFLINE=1`` answers
    False at once. The probe runs in a daemon thread so that a slow DNS lookup cannot hold the caller
    longer than ``timeout``.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    with _HUB_LOCK:
        known = _HUB_ANSWERS.get(endpoint)
        if known is not None and (known[0] or time.monotonic() - known[1] < retry_after):
            return known[0]
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
        answer = bool(result and result[0])
        _HUB_ANSWERS[endpoint] = (answer, time.monotonic())
        return answer


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


def _timm_transform(model: torch.nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """timm's eval transform for the model's data config, on grayscale images for a 1-channel model."""
    from timm.data import create_transform, resolve_model_data_config

    config = resolve_model_data_config(model)
    if mean is not None:
        config["mean"] = tuple(float(v) for v in mean)
    if std is not None:
        config["std"] = tuple(float(v) for v in std)
    channels = int(model.patch_embed.proj.in_channels) if hasattr(model, "patch_embed") else int(config["input_size"][0])
    if len(config["mean"]) != channels:  # e.g. ImageNet's 3-value default on a 1-channel model
        config["mean"] = tuple(config["mean"][:1]) * channels
        config["std"] = tuple(config["std"][:1]) * channels
    size = tuple(int(v) for v in getattr(getattr(model, "patch_embed", None), "img_size", config["input_size"][1:]))
    config["input_size"] = (channels, *size)  # the size the model was built for (a bare model has no data config)
    transform = create_transform(**config, is_training=False)
    mode = "L" if channels == 1 else "RGB"

    def image_transform(image: Image.Image) -> torch.Tensor:
        return transform(image.convert(mode))

    return image_transform, tuple(config["mean"]), tuple(config["std"])


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
    from patchslim.cards import check_card

    check_card(path, name)  # a fine-tuned checkpoint is refused for another base model, by its card
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
    if name in BUNDLED_MODELS:
        return "ready (bundled checkpoint)" if bundled.checkpoint_path(name).exists() else "checkpoint missing from patchslim/assets/"
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not (folder / "config.json").is_file():
            return "not a timm model folder (no config.json)"
        has_weights = any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
        return "ready (timm folder)" if has_weights else "weights missing from the folder"
    if name.startswith(HF_HUB_PREFIX):
        if _hf_cached_folder(name[len(HF_HUB_PREFIX):]) is not None:
            return "ready (Hugging Face cache)"
        return "downloadable (not cached yet)" if hub_reachable() else "not cached and the hub cannot be reached"
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
