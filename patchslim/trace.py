"""Trace: everything one plan-driven forward produced, as data.

The metrics (FLOPs, memory, prediction change), the explanations and the app are plain functions of a
Trace: token counts per block, where every remaining token came from, attention where it was asked for,
and the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from patchslim.plan import SlimPlan
from patchslim.tokens import Provenance


@dataclass(frozen=True)
class BlockShape:
    """One block of a hierarchical (windowed) model: what its costs and overlays need.

    Attributes:
        stage: the stage (timm's ``model.layers`` index, 0-based) the block belongs to.
        grid: (rows, cols) of the token grid the block sees.
        cell: side, in patches, of the square one token stands for (1, then 2, 4, ... after patch merging).
        width: channels D.
        num_heads, head_dim: attention heads and their size.
        mlp_hidden: MLP hidden width.
        window: (rows, cols) of a window; ``window_tokens`` = rows * cols tokens attend to each other.
        shift: the cyclic shift of the block's window partition (0, 0 for none).
        merge_macs: multiply-adds per image of the patch merging that precedes this block (0 inside a stage).
    """

    stage: int
    grid: tuple[int, int]
    cell: int
    width: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    window: tuple[int, int]
    shift: tuple[int, int]
    merge_macs: float = 0.0

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def window_tokens(self) -> int:
        return self.window[0] * self.window[1]

    @property
    def windows(self) -> int:
        return self.tokens // self.window_tokens


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts of a ViT (or a hierarchical model such as Swin) that costs and overlays need.

    For a plain ViT every block sees the same tokens and ``blocks`` is empty; for a hierarchical model
    ``blocks`` holds one :class:`BlockShape` per block, ``embed_dim`` is the first stage's width and
    ``num_features`` the width the head reads.
    """

    name: str
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    in_chans: int
    num_prefix_tokens: int
    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_classes: int
    num_heads_out: int = 1  # classifier heads (2 for the distilled DeiT)
    kind: str = "vit"  # the adapter's architecture family
    blocks: tuple[BlockShape, ...] = ()
    num_features: int = 0  # width of the pooled feature (0: embed_dim)
    default_stages: tuple[int, ...] = ()  # hierarchical models: the stages a plan slims when it names none

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def hierarchical(self) -> bool:
        return bool(self.blocks)

    @property
    def head_width(self) -> int:
        return self.num_features or self.embed_dim

    def block_tokens(self, index: int) -> int:
        """Tokens (prefix included) block ``index`` sees when nothing is slimmed."""
        return self.blocks[index].tokens if self.blocks else self.num_patches + self.num_prefix_tokens

    def stage_blocks(self, stage: int) -> tuple[int, ...]:
        """The blocks of stage ``stage`` (hierarchical models).

        Raises:
            PlanError: no such stage.
        """
        stages = sorted({b.stage for b in self.blocks})
        if stage not in stages:
            from patchslim.errors import PlanError

            raise PlanError(f"stages: {self.name} has no stage {stage} (its stages are {', '.join(map(str, stages))}, "
                            "0-based as timm's model.layers)" if stages else
                            f"stages: {self.name} is not a hierarchical model; name blocks instead")
        return tuple(i for i, b in enumerate(self.blocks) if b.stage == stage)


@dataclass(frozen=True)
class BlockRecord:
    """One block of the forward.

    Attributes:
        index: block index.
        tokens_attention: tokens (prefix included) the block's attention ran on.
        tokens_mlp: tokens (prefix included) its MLP ran on (fewer when a method acted in between).
        provenance: origins of the non-prefix tokens entering the block.
        merged_sizes: True when tokens carry sizes (proportional attention ran in this block).
        windows: how many windows per image the block's attention ran in (1 for global attention); each
            window held ``tokens_attention / windows`` tokens.
    """

    index: int
    tokens_attention: int
    tokens_mlp: int
    provenance: Provenance
    merged_sizes: bool = False
    windows: int = 1


@dataclass(frozen=True)
class StageRecord:
    """One action of one stage.

    Attributes:
        method: method name.
        stage_index: position of its stage in the plan.
        block, point: where it acted (``"pre"``: before the block, ``"mid"``: after its attention).
        tokens_before, tokens_after: non-prefix tokens before and after.
        scores: ``[B, tokens_before]`` importance scores the method gave, or None.
        provenance_before: origins of the tokens the scores refer to.
        selection_macs: multiply-adds per image spent on the selection itself.
    """

    method: str
    stage_index: int
    block: int
    point: str
    tokens_before: int
    tokens_after: int
    scores: torch.Tensor | None
    provenance_before: Provenance
    selection_macs: float = 0.0


@dataclass
class Trace:
    """The result of :func:`patchslim.run`.

    Attributes:
        logits: ``[B, num_classes]`` float32.
        spec: the model's shape facts.
        plan: the plan that ran.
        blocks: one record per block.
        final_provenance: origins of the non-prefix tokens after the last block.
        final_tokens: tokens (prefix included) after the last block.
        stages: one record per action.
        attention: block index -> ``[B, H, T, T]`` attention probabilities, for the blocks asked for.
        class_names: the model's class names (for readable predictions).
    """

    logits: torch.Tensor
    spec: ModelSpec
    plan: SlimPlan
    blocks: list[BlockRecord]
    final_provenance: Provenance
    final_tokens: int
    stages: list[StageRecord] = field(default_factory=list)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()

    @property
    def batch_size(self) -> int:
        return int(self.logits.shape[0])

    @property
    def tokens_per_block(self) -> list[int]:
        """Tokens (prefix included) each block's attention ran on."""
        return [b.tokens_attention for b in self.blocks]

    @property
    def keep_ratio(self) -> float:
        """The rho reached: the smallest share of its tokens a block's MLP ran on (non-prefix tokens over what the
        block sees unslimmed). For a ViT, tokens only shrink, so this is the tokens after the last block / N; for
        Swin, whose tokens go back in place after every block, the share kept in the slimmed blocks."""
        p = self.spec.num_prefix_tokens
        if not self.blocks:
            return (self.final_tokens - p) / self.spec.num_patches
        return min((b.tokens_mlp - p) / (self.spec.block_tokens(b.index) - p) for b in self.blocks)

    @property
    def mean_keep_ratio(self) -> float:
        """Non-prefix tokens averaged over the blocks (attention and MLP alike), each block's count over what it
        would see unslimmed."""
        p = self.spec.num_prefix_tokens
        shares = [((b.tokens_attention + b.tokens_mlp) / 2 - p) / (self.spec.block_tokens(b.index) - p)
                  for b in self.blocks]
        return sum(shares) / len(shares)

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    def provenance_at(self, block: int | None = None) -> Provenance:
        """Origins of the tokens entering ``block`` (None: after the last block)."""
        return self.final_provenance if block is None else self.blocks[block].provenance

    def patch_mask(self, block: int | None = None) -> torch.Tensor:
        """``[B, N]`` bool: original patches still represented entering ``block`` (None: at the end)."""
        return self.provenance_at(block).patch_mask()

    def kept_patch_ids(self, block: int | None = None) -> torch.Tensor:
        """``[B, M]`` original patch ids of the tokens entering ``block``, while tokens are plain patches.

        Raises:
            ValueError: tokens there are merges or projections; use ``provenance_at(block).dense()``.
        """
        prov = self.provenance_at(block)
        if prov.ids is None:
            raise ValueError("tokens here are merged or projected; use provenance_at(block).dense()")
        return prov.ids

    def top_k(self, k: int = 5, index: int = 0) -> list[tuple[str, float]]:
        """The ``k`` most probable classes of image ``index`` as ``(label, probability)``."""
        probs = self.probabilities[index]
        values, ids = probs.topk(min(k, probs.numel()))
        names = self.class_names or tuple(str(i) for i in range(probs.numel()))
        return [(names[i], float(v)) for v, i in zip(values.tolist(), ids.tolist())]
