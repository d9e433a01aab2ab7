"""What the engine asks of an architecture: tokens in, walkable steps, logits out.

An adapter wraps one timm model (never mutating it) and answers the engine's few questions:

- :meth:`Adapter.embed`: images ``[B, C, H, W]`` -> tokens ``[B, P + N, C]`` (prefix tokens first, position
  embedding added), before any block;
- :meth:`Adapter.attention` / :meth:`Adapter.mlp`: the two residual branches of block ``i``, so that a method
  can act between them and attention probabilities are materialized only where they are read;
- :meth:`Adapter.head`: final tokens -> logits, with the model's own pooling (merged tokens weighted by their
  size, masked tokens left out);
- :meth:`Adapter.spec`: the shape facts costs and overlays need.

The plain-ViT adapter is :class:`patchslim.adapters.vit.ViTAdapter`. A windowed architecture (Swin) adds a
transition between stages (patch merging) and hands methods its tokens grouped by window; the engine's walk
calls :meth:`Adapter.transition` after every block for that, which is the identity for a ViT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from patchslim.tokens import TokenState
from patchslim.trace import ModelSpec


@dataclass
class AttentionOutput:
    """One attention branch.

    Attributes:
        out: ``[B, T, C]`` the residual branch (to be added to the tokens).
        probs: ``[B, H, T, T]`` probabilities (``[B, H, P, T]`` for prefix rows only), or None.
        keys: ``[B, H, T, d]`` keys, or None.
        values: ``[B, H, T, d]`` values, or None.
    """

    out: torch.Tensor
    probs: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


class Adapter:
    """Base class: one instance per loaded model; stateless apart from the model it reads."""

    kind: ClassVar[str] = ""  # a word for the architecture family, e.g. "vit"
    # True when a token a plan drops leaves the model for good (a ViT: dropping a patch's token removes the
    # patch, which token-removal faithfulness tests rely on); False where dropped tokens only sit out a block
    # and flow on (Swin's window-aware slimming).
    token_removal: ClassVar[bool] = True

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        self.name = name
        self.module = module

    @classmethod
    def accepts(cls, module: torch.nn.Module) -> bool:  # pragma: no cover - interface
        """Whether this adapter is meant for ``module``'s class (it may still refuse it in :meth:`check`)."""
        raise NotImplementedError

    def check(self) -> None:  # pragma: no cover - interface
        """Raises :class:`~patchslim.errors.UnsupportedModelError` with the reason when the model cannot be
        walked exactly."""
        raise NotImplementedError

    def spec(self) -> ModelSpec:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return self.spec().depth

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def attention(self, index: int, state: TokenState, want_probs: bool, want_keys: bool,
                  prefix_probs: bool = False, want_values: bool = False) -> AttentionOutput:  # pragma: no cover
        raise NotImplementedError

    def mlp(self, index: int, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def enter(self, index: int, state: TokenState) -> TokenState:
        """The tokens as block ``index`` and the methods acting there see them (unchanged for a ViT; grouped
        by the block's windows for Swin)."""
        return state

    def transition(self, index: int, state: TokenState) -> TokenState:
        """What happens after block ``index``, before the next (nothing for a ViT; for Swin: tokens back in
        place, and patch merging where a stage ends)."""
        return state

    def seen_attention(self, attention: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The attention a method acting on ``state`` reads, from the probabilities ``adapter.attention``
        returned for the block it reads (the same tensor for a ViT)."""
        return attention

    def merge_regions(self, index: int, state: TokenState) -> torch.Tensor | None:
        """``[rows, M]`` labels of the tokens a merge acting on ``state`` in block ``index`` may join (only tokens
        of one label), when the block's attention keeps some apart (a shifted Swin window's pieces); None: any."""
        return None

    def head(self, state: TokenState) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    # Why :meth:`floor` is not offered for this architecture ("" when it is).
    floor_reason: ClassVar[str] = "this architecture has no floor forward"

    def floor(self, images: torch.Tensor, counts: list[tuple[int, int]]) -> torch.Tensor:
        """The model's own modules on the token counts a slimmed forward had, without any slimming work: the
        speed floor of a slimming engine (:func:`patchslim.metrics.compare_latency` with ``floor=True``).

        Args:
            images: ``[B, C, H, W]`` input.
            counts: per block, (tokens its attention ran on, tokens its MLP ran on), prefix included, per image
                (``Trace.blocks``).

        Raises:
            NotImplementedError: with :attr:`floor_reason`.
        """
        raise NotImplementedError(self.floor_reason)
