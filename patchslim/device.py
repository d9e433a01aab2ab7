"""Device and precision choices, all in one place.

Devices and dtypes are chosen at the edges (loading, benchmarking), never inside a method. This module is
the only place that knows about CUDA / MPS specifics: picking a device, autocast for reduced precision,
and synchronizing before a clock is read.
"""

from __future__ import annotations

import contextlib

import torch

from patchslim.errors import PatchslimError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# int8 (dynamic quantization, patchslim.quantize) quantizes each Linear layer's input on the fly and hands back
# fp32: the activations the forward keeps are fp32.
_BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 4}


def bytes_per_element(precision: str) -> int:
    """Bytes of one activation element under a precision (fp32 and int8: 4; bf16 / fp16 autocast: 2)."""
    if precision not in _BYTES_PER_ELEMENT:
        raise PatchslimError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    return _BYTES_PER_ELEMENT[precision]


def available_devices() -> list[str]:
    """Device kinds usable on this machine, best first (``"cpu"`` is always last)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turns ``"auto"`` into CUDA, then Apple MPS, then CPU; checks an explicit choice exists.

    Raises:
        PatchslimError: the requested device is not present on this machine.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name in ("", "auto"):
        return torch.device(available_devices()[0])
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise PatchslimError(f"Unknown device {device!r}: use auto, cpu, cuda (or cuda:N) or mps.")
    if kind not in available_devices():
        raise PatchslimError(
            f"Device {device!r} is not available on this machine (available: {', '.join(available_devices())})."
        )
    return torch.device(name)


def check_precision(precision: str, device: torch.device, int8_backend: str | None = None) -> str:
    """Validates a precision name for a device; fp16 is refused on CPU, where it is slow or unsupported, and int8
    where no int8 backend runs (:func:`patchslim.quantize.choose_backend`).

    Raises:
        PatchslimError: an unknown precision, or one this device cannot run (the message names both).
    """
    if precision not in PRECISIONS:
        raise PatchslimError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    if precision == "fp16" and device.type == "cpu":
        raise PatchslimError("fp16 needs a GPU; on the CPU use fp32 or bf16.")
    if precision == "int8":
        from patchslim.quantize import choose_backend

        choose_backend(device, int8_backend)
    elif int8_backend is not None:
        raise PatchslimError(f"int8_backend={int8_backend!r} is for precision int8, not {precision}")
    return precision


def autocast(device: torch.device, precision: str = "fp32"):
    """A context that runs the forward in the given precision (fp32 and int8, whose layers are int8 themselves,
    need no autocast)."""
    if precision not in _AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def synchronize(device: torch.device) -> None:
    """Waits for queued kernels, so that a timer read afterwards measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def supports_peak_memory(device: torch.device) -> bool:
    """Whether the device's allocator keeps a resettable peak of allocated memory (CUDA does)."""
    return device.type == "cuda"


def reset_peak_memory(device: torch.device) -> int:
    """Starts a new peak-memory window; returns the bytes allocated now (weights, inputs).

    Raises:
        PatchslimError: the device keeps no peak (see :func:`supports_peak_memory`).
    """
    if not supports_peak_memory(device):
        raise PatchslimError(f"{device} keeps no peak-memory statistics")
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def peak_memory_allocated(device: torch.device) -> int:
    """Peak bytes allocated since the last :func:`reset_peak_memory`."""
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))
