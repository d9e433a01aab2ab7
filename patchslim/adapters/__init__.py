"""Architecture adapters: what is specific to a model family, so the engine holds no special cases.

:func:`adapter_for` picks the adapter of a timm model and checks that the engine can walk it exactly; a model
no adapter knows is refused with the reason.
"""

from __future__ import annotations

import torch

from patchslim.adapters.base import Adapter, AttentionOutput  # noqa: F401
from patchslim.adapters.swin import SwinAdapter
from patchslim.adapters.vit import ViTAdapter
from patchslim.errors import UnsupportedModelError

ADAPTERS: tuple[type[Adapter], ...] = (ViTAdapter, SwinAdapter)


def adapter_for(name: str, module: torch.nn.Module) -> Adapter:
    """The adapter for ``module``, checked.

    Raises:
        UnsupportedModelError: no adapter knows this architecture, or its adapter cannot walk this
            instance exactly (the message says why).
    """
    for cls in ADAPTERS:
        if cls.accepts(module):
            adapter = cls(name, module)
            adapter.check()
            return adapter
    raise UnsupportedModelError(
        f"{name} is not supported: it is a {type(module).__name__}, neither a timm VisionTransformer nor a "
        "SwinTransformer. patchslim walks plain timm VisionTransformers (ViT / DeiT with standard blocks), e.g. "
        "deit_small_patch16_224, and timm's Swin v1, e.g. swin_tiny_patch4_window7_224."
    )
