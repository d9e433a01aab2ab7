"""Analytic multiply-accumulate counts (GMACs) of a slimmed forward, from the Trace's token counts.

The papers' "GFLOPs" for ViTs are GMACs (one multiply-add = 1): DeiT-S is 4.6, ViT-B/16 17.6. We count the
matrix products, which is what fvcore and ``torch.utils.flop_counter`` count (the latter as 2 FLOPs per
MAC); layer norms, softmax, GELU and residual additions are left out, as in those counters (for DeiT-S
they add < 0.3 %). Per image, with D the width, T_a / T_m the tokens (prefix included) a block's attention
/ MLP ran on, H heads of size d (H * d = D for the models here) and F the MLP hidden width:

- patch embedding:  N * (C_in * p_h * p_w) * D  (the convolution, on all N patches: slimming acts after it)
- qkv projection:   T_a * D * 3 H d
- q @ k^T:          H * T_a^2 * d
- attn @ v:         H * T_a^2 * d
- output proj:      T_a * H d * D
- MLP:              2 * T_m * D * F
- head:             D * classes per classifier head (2 heads for the distilled DeiT)
- selection:        what each method reported in ``StageRecord.selection_macs`` (scoring, matching)

A hierarchical model (Swin) has per-block widths, heads and MLP sizes (``ModelSpec.blocks``); its attention runs
inside W windows of T_a / W tokens, so the matrix products cost ``2 * T_a * (T_a / W) * H d`` (k^2 per window
with k = T_a / W), and patch merging between stages adds ``L_out * 4 D * 2 D`` (its linear reduction). For
Swin-T at 224 px this gives 4.49 GMACs, the figure timm and the Swin paper report.

The counts are per image: a Trace holds one token count per block for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from patchslim.trace import ModelSpec, Trace

GIGA = 1e9


@dataclass(frozen=True)
class BlockMacs:
    """Multiply-adds of one transformer block, per image.

    Attributes:
        index: block index.
        tokens_attention: tokens (prefix included) its attention ran on.
        tokens_mlp: tokens (prefix included) its MLP ran on.
        windows: windows the block's attention ran in (1: global attention).
        qkv: the q, k, v projection.
        attention_matmuls: ``q @ k^T`` plus ``attn @ v``.
        proj: the attention output projection.
        mlp: both MLP layers.
        selection: selection cost of the actions at this block (before it or inside it).
    """

    index: int
    tokens_attention: int
    tokens_mlp: int
    qkv: float
    attention_matmuls: float
    proj: float
    mlp: float
    selection: float = 0.0
    windows: int = 1

    @property
    def attention(self) -> float:
        """The attention half of the block: qkv + matrix products + proj."""
        return self.qkv + self.attention_matmuls + self.proj

    @property
    def total(self) -> float:
        return self.attention + self.mlp + self.selection


@dataclass(frozen=True)
class MacsReport:
    """The multiply-adds of one forward, per image, split the way a stacked bar chart wants them.

    Attributes:
        model: the model name.
        patch_embed: the patch embedding convolution.
        blocks: one :class:`BlockMacs` per block.
        head: the classifier head(s).
        patch_merging: the patch merging steps between stages (hierarchical models; 0 for a ViT).
    """

    model: str
    patch_embed: float
    blocks: tuple[BlockMacs, ...]
    head: float
    patch_merging: float = 0.0

    @property
    def selection(self) -> float:
        """Multiply-adds the slimming methods spent choosing tokens."""
        return sum(b.selection for b in self.blocks)

    @property
    def total(self) -> float:
        """Multiply-adds per image, selection included."""
        return self.patch_embed + sum(b.total for b in self.blocks) + self.head + self.patch_merging

    @property
    def gmacs(self) -> float:
        """``total`` in GMACs (1e9 multiply-adds) per image."""
        return self.total / GIGA

    def rows(self) -> list[dict]:
        """One dict per part (``part``, ``block``, ``component``, ``gmacs``), for tables and charts.

        ``part`` is ``"patch_embed"``, ``"block 0"`` ... or ``"head"``; ``component`` is ``"qkv"``,
        ``"attention_matmuls"``, ``"proj"``, ``"mlp"``, ``"selection"``, or the part's own name.
        """
        out = [dict(part="patch_embed", block=None, component="patch_embed", gmacs=self.patch_embed / GIGA)]
        for b in self.blocks:
            for component in ("qkv", "attention_matmuls", "proj", "mlp", "selection"):
                out.append(dict(part=f"block {b.index}", block=b.index, component=component,
                                gmacs=getattr(b, component) / GIGA))
        if self.patch_merging:
            out.append(dict(part="patch_merging", block=None, component="patch_merging",
                            gmacs=self.patch_merging / GIGA))
        out.append(dict(part="head", block=None, component="head", gmacs=self.head / GIGA))
        return out


def block_macs(spec: ModelSpec, index: int, tokens_attention: int, tokens_mlp: int,
               selection: float = 0.0, windows: int | None = None) -> BlockMacs:
    """Multiply-adds of one block of ``spec`` on the given token counts (prefix included), per image.

    ``windows``: how many windows the attention ran in (default: the block's own partition, 1 for a ViT).
    """
    if spec.blocks:
        shape = spec.blocks[index]
        width, inner, hidden = shape.width, shape.num_heads * shape.head_dim, shape.mlp_hidden
        windows = shape.windows if windows is None else windows
    else:
        width, inner, hidden = spec.embed_dim, spec.num_heads * spec.head_dim, spec.mlp_hidden
        windows = 1 if windows is None else windows
    t_a, t_m = int(tokens_attention), int(tokens_mlp)
    return BlockMacs(
        index=index,
        tokens_attention=t_a,
        tokens_mlp=t_m,
        qkv=float(t_a * width * 3 * inner),
        attention_matmuls=float(2 * t_a * (t_a / windows) * inner),
        proj=float(t_a * inner * width),
        mlp=float(2 * t_m * width * hidden),
        selection=float(selection),
        windows=int(windows),
    )


def patch_embed_macs(spec: ModelSpec) -> float:
    """The patch embedding convolution on all N patches, per image."""
    ph, pw = spec.patch_size
    return float(spec.num_patches * spec.in_chans * ph * pw * spec.embed_dim)


def head_macs(spec: ModelSpec) -> float:
    """The classifier head(s) on the pooled feature, per image (2 heads for the distilled DeiT)."""
    return float(spec.num_heads_out * spec.head_width * spec.num_classes)


def macs_for_tokens(spec: ModelSpec, tokens_attention: Sequence[int], tokens_mlp: Sequence[int] | None = None,
                    selection: Sequence[float] | None = None, windows: Sequence[int] | None = None) -> MacsReport:
    """Multiply-adds for any token schedule, without running the model.

    Args:
        spec: the model's shape facts (``LoadedModel.spec``).
        tokens_attention: per block, the tokens (prefix included) attention runs on.
        tokens_mlp: per block, the tokens the MLP runs on (default: the same as attention).
        selection: per block, selection multiply-adds (default: none).
        windows: per block, the windows its attention ran in (default: each block's own partition).

    Raises:
        ValueError: a list whose length is not the model's depth.
    """
    tokens_mlp = list(tokens_attention) if tokens_mlp is None else list(tokens_mlp)
    selection = [0.0] * spec.depth if selection is None else list(selection)
    for name, values in (("tokens_attention", tokens_attention), ("tokens_mlp", tokens_mlp),
                         ("selection", selection)):
        if len(values) != spec.depth:
            raise ValueError(f"{name} has {len(values)} entries, the model has {spec.depth} blocks")
    windows = [None] * spec.depth if windows is None else list(windows)
    blocks = tuple(block_macs(spec, i, a, m, s, w)
                   for i, (a, m, s, w) in enumerate(zip(tokens_attention, tokens_mlp, selection, windows)))
    merging = sum(b.merge_macs for b in spec.blocks)
    return MacsReport(spec.name, patch_embed_macs(spec), blocks, head_macs(spec), merging)


def baseline_macs(spec: ModelSpec) -> MacsReport:
    """Multiply-adds of the unslimmed model (every block on all its tokens: N + prefix for a ViT)."""
    return macs_for_tokens(spec, [spec.block_tokens(i) for i in range(spec.depth)])


def count_macs(trace: Trace) -> MacsReport:
    """Multiply-adds per image of the forward a Trace records, selection included.

    Example::

        trace = patchslim.run(model, images, SlimPlan.single("tome", 1.0, r=13))
        count_macs(trace).gmacs            # ~2.7 for DeiT-S
    """
    selection = [0.0] * trace.spec.depth
    for stage in trace.stages:
        selection[stage.block] += stage.selection_macs
    return macs_for_tokens(trace.spec, [b.tokens_attention for b in trace.blocks],
                           [b.tokens_mlp for b in trace.blocks], selection, [b.windows for b in trace.blocks])


def gmacs(trace: Trace) -> float:
    """GMACs per image of the forward a Trace records (selection included)."""
    return count_macs(trace).gmacs


@dataclass(frozen=True)
class FlopsComparison:
    """Slimmed vs unslimmed multiply-adds, per image.

    Attributes:
        gmacs: the slimmed forward.
        baseline_gmacs: the unslimmed forward.
    """

    gmacs: float
    baseline_gmacs: float

    @property
    def reduction(self) -> float:
        """Share of the multiply-adds saved, in [0, 1) (negative if slimming costs more)."""
        return 1.0 - self.gmacs / self.baseline_gmacs

    @property
    def ideal_speedup(self) -> float:
        """baseline / slimmed: the speed-up a forward bound by its multiply-adds would reach."""
        return self.baseline_gmacs / self.gmacs


def compare_macs(trace: Trace, baseline: Trace | None = None) -> FlopsComparison:
    """GMACs of ``trace`` against ``baseline`` (default: the unslimmed model, computed analytically)."""
    base = count_macs(baseline).gmacs if baseline is not None else baseline_macs(trace.spec).gmacs
    return FlopsComparison(count_macs(trace).gmacs, base)


def measured_macs(model, images, plan=None) -> float:
    """Multiply-adds per image counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2).

    A check on the analytic count, not a replacement: the counter misses fused attention on CPU, so the
    plan is run with explicit attention in every block (``attention_blocks="all"``); it also counts any
    matrix product a method or the provenance bookkeeping does.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from patchslim.engine import run
    from patchslim.plan import SlimPlan

    plan = (plan or SlimPlan()).with_attention("all")
    batch = model.preprocess(images)
    with FlopCounterMode(display=False) as counter:
        run(model, batch, plan)
    return counter.get_total_flops() / 2 / batch.shape[0]


