"""int8 inference: a model's ``nn.Linear`` layers swapped for int8 ones, under the one precision name ``int8``.

Dynamic quantization (Jacob et al., CVPR 2018; the recipe PyTorch and torchao ship): the weights are stored as
int8 with a scale, each activation entering a Linear layer is quantized to int8 on the fly, the matrix product runs
in integer arithmetic and its result comes back as float. Everything else (patch embedding, LayerNorm, softmax,
attention products, the slimming methods) stays fp32, so the activations the engine sees, and its GMACs, are the
same as in fp32: int8 changes what one multiply-add costs, not how many there are.

The swap is a module swap (eager backend) or a weight-tensor swap (torchao) *inside* the timm model: ``attn.qkv``,
``attn.proj``, ``mlp.fc1`` / ``fc2`` and a Swin's patch-merging ``reduction`` are still there with their
``in_features`` / ``out_features``, so the adapters walk an int8 model with the same code as an fp32 one, and
keep-all plans give the int8 model's own ``model(x)``.

Two backends, tried in the order of :data:`BACKEND_ORDER` (``load_model(..., int8_backend=NAME)`` picks one):

``eager``
    PyTorch's own ``torch.ao.quantization.quantize_dynamic`` (fbgemm / x86 kernels; CPU only). Deprecated: PyTorch
    announces its removal in favour of torchao. Weights per tensor, activations per tensor *over the whole input
    of a layer* (the batch shares one scale, so an image's logits move slightly with its batchmates). Planning
    figure, DeiT-S, batch 8, 2 threads: fp32 385 ms -> 141 ms, max logit change 0.22 (issue 15).
``torchao``
    torchao's ``quantize_`` with ``Int8DynamicActivationInt8WeightConfig``: the maintained path (CPU and CUDA).
    Weights per output channel, activations per token (no dependence on the batch). Planning figure: 385 -> 294
    ms, max logit change 0.05.

Both give a real speed-up on the planning machine; the eager one by far the larger, so it comes first while the
installed PyTorch still has it, and torchao takes over automatically when it is gone (or on a GPU).
``python scripts/int8_backends.py`` measures both on an idle machine (speed-up and largest logit change).

int8 layers give no input gradient (the eager kernels have no backward at all), so everything that needs one is
refused on an int8 model through :func:`refuse_gradients`: ``run(grad=True)``, Integrated Gradients,
gradient-weighted rollout, fine-tuning.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from patchslim.errors import GradientUnavailableError, Int8UnavailableError, PatchslimError  # noqa: F401

INT8 = "int8"
BACKEND_ORDER = ("eager", "torchao")
NO_GRADIENT = "int8 layers give no input gradient"


@dataclass(frozen=True)
class Int8Backend:
    """One way to make a model int8.

    Attributes:
        name: ``"eager"`` or ``"torchao"``.
        summary: what it is, in a sentence.
        refusal: ``refusal(device)``: why it cannot run on ``device`` here, or None when it can.
        convert: ``convert(module)``: swaps the module's Linear layers for int8 ones, in place; returns the module.
    """

    name: str
    summary: str
    refusal: Callable[[torch.device], str | None]
    convert: Callable[[torch.nn.Module], torch.nn.Module]


# --------------------------------------------------------------------------- eager (torch.ao, deprecated)

def _eager_quantize_dynamic():
    """``torch.ao.quantization.quantize_dynamic``, or None once PyTorch has removed it."""
    try:
        module = importlib.import_module("torch.ao.quantization")
    except ImportError:
        return None
    return getattr(module, "quantize_dynamic", None)


def _eager_refusal(device: torch.device) -> str | None:
    if _eager_quantize_dynamic() is None:
        return f"this PyTorch ({torch.__version__}) no longer has torch.ao.quantization.quantize_dynamic"
    if device.type != "cpu":
        return f"its kernels run on the CPU only, not on {device.type}"
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines:
        return "this PyTorch build has no quantized engine (fbgemm, x86, qnnpack)"
    return None


def _eager_convert(module: torch.nn.Module) -> torch.nn.Module:
    quantize_dynamic = _eager_quantize_dynamic()
    with warnings.catch_warnings():  # its deprecation notice is said once, in the module docstring and README
        warnings.simplefilter("ignore")
        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


# --------------------------------------------------------------------------- torchao (maintained)

def _torchao_refusal(device: torch.device) -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install torchao)"
    try:
        importlib.import_module("torchao.quantization")
    except Exception as exc:  # a torchao built for another PyTorch fails at import
        return f"torchao cannot be imported here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    if device.type not in ("cpu", "cuda"):
        return f"its int8 kernels run on the CPU and CUDA, not on {device.type}"
    return None


def _torchao_convert(module: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(module, Int8DynamicActivationInt8WeightConfig())
    return module


BACKENDS = {
    "eager": Int8Backend("eager", "PyTorch's torch.ao.quantization.quantize_dynamic (deprecated; CPU)",
                         _eager_refusal, _eager_convert),
    "torchao": Int8Backend("torchao", "torchao quantize_ with Int8DynamicActivationInt8WeightConfig (CPU, CUDA)",
                           _torchao_refusal, _torchao_convert),
}


def int8_backends(device: str | torch.device = "cpu") -> list[str]:
    """The int8 backends usable on ``device`` here, in the order tried (:data:`BACKEND_ORDER`)."""
    dev = torch.device(device)
    return [name for name in BACKEND_ORDER if BACKENDS[name].refusal(dev) is None]


def choose_backend(device: str | torch.device, backend: str | None = None) -> str:
    """The backend an int8 model on ``device`` uses: ``backend`` when given (and usable), else the first usable one.

    Raises:
        PatchslimError: an unknown backend name.
        Int8UnavailableError: the backend asked for, or every backend, cannot run on this device here.
    """
    dev = torch.device(device)
    if backend is not None and backend not in BACKENDS:
        raise PatchslimError(f"Unknown int8 backend {backend!r}: use one of {', '.join(BACKEND_ORDER)}.")
    names = (backend,) if backend is not None else BACKEND_ORDER
    reasons = {}
    for name in names:
        reason = BACKENDS[name].refusal(dev)
        if reason is None:
            return name
        reasons[name] = reason
    why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    raise Int8UnavailableError(f"precision int8 is not available on {dev} here ({why}); use fp32 or bf16 there.")


def quantize_int8(module: torch.nn.Module, device: str | torch.device, backend: str | None = None,
                  *, copy_first: bool = False) -> tuple[torch.nn.Module, str]:
    """Swaps ``module``'s ``nn.Linear`` layers for int8 ones (dynamic quantization).

    Args:
        module: a model in eval mode, already on ``device``.
        device: where it runs.
        backend: ``"eager"`` or ``"torchao"``; None takes the first usable one (:func:`int8_backends`).
        copy_first: quantize a deep copy and leave ``module`` as it is (a caller's model).

    Returns:
        (the int8 model, the backend's name). Without ``copy_first`` the model is ``module`` itself, changed.

    Raises:
        Int8UnavailableError: no backend can run on this device here.
    """
    name = choose_backend(device, backend)
    target = copy.deepcopy(module) if copy_first else module
    return BACKENDS[name].convert(target), name


# --------------------------------------------------------------------------- what int8 changes

def is_int8(model) -> bool:
    """Whether a :class:`~patchslim.models.LoadedModel` runs int8 layers."""
    return getattr(model, "precision", "fp32") == INT8


def refuse_gradients(model, what: str) -> None:
    """Raises when ``model`` cannot give gradients through its forward; ``what`` names the feature that needs them.

    Every feature that needs gradients calls this first (the engine's ``run(grad=True)``, Integrated Gradients,
    gradient-weighted rollout, fine-tuning), so the person reads one clear sentence instead of an autograd error.

    Raises:
        GradientUnavailableError: an int8 model.
    """
    if is_int8(model):
        raise GradientUnavailableError(gradient_refusal_text(what))


def gradient_refusal_text(what: str) -> str:
    """The one sentence of a refusal: ``int8 layers give no input gradient: WHAT needs one; ...``."""
    return f"{NO_GRADIENT}: {what} needs one; load the model in fp32 (or bf16) for it"


def weights_bytes(module: torch.nn.Module) -> int:
    """Bytes of a model's weights as stored: parameters and buffers at their dtype's size, int8 weights at one byte
    per value plus their scales (eager quantized Linear layers keep them packed, outside ``parameters()``)."""
    total = 0
    for sub in module.modules():
        packed = getattr(sub, "_packed_params", None)
        if isinstance(packed, torch.nn.Module) and callable(getattr(packed, "_weight_bias", None)):
            total += sum(_tensor_bytes(t) for t in packed._weight_bias() if t is not None)  # an eager int8 Linear
        total += sum(_tensor_bytes(t) for t in sub.parameters(recurse=False))
        total += sum(_tensor_bytes(t) for t in sub.buffers(recurse=False))
    return total


def weights_mb(module: torch.nn.Module) -> float:
    """:func:`weights_bytes` in MB (2^20 bytes, as every memory figure of patchslim)."""
    return weights_bytes(module) / 2 ** 20


def plain_tensors(state: dict, prefix: str = ""):
    """``(name, plain tensor)`` for every tensor of a state dict, int8 ones included: a quantized tensor as its
    integer values and scales, a torchao tensor as its inner tensors, packed ``(weight, bias)`` tuples unpacked;
    other values (dtypes) are skipped. For digests and comparisons that need ordinary tensors."""
    for name, value in state.items():
        key = f"{prefix}{name}"
        if isinstance(value, (tuple, list)):
            yield from plain_tensors({str(i): v for i, v in enumerate(value)}, f"{key}.")
        elif not isinstance(value, torch.Tensor):
            continue
        elif getattr(type(value), "__tensor_flatten__", None) is not None and type(value) not in (
                torch.Tensor, torch.nn.Parameter):
            names, _ = value.__tensor_flatten__()
            yield from plain_tensors({n: getattr(value, n) for n in names}, f"{key}.")
        elif value.is_quantized:
            yield key, value.int_repr()
            if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                yield f"{key}.scales", value.q_per_channel_scales()
            else:
                yield f"{key}.scale", torch.tensor(value.q_scale())
        else:
            yield key, value


def _tensor_bytes(tensor: torch.Tensor) -> int:
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):  # a torchao int8 tensor
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, n)) for n in names)
    size = tensor.numel() * tensor.element_size()
    if tensor.is_quantized and tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        size += _tensor_bytes(tensor.q_per_channel_scales()) + _tensor_bytes(tensor.q_per_channel_zero_points())
    return size
