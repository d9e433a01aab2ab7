"""The adapter for timm's ``SwinTransformer`` (Swin v1: Liu et al., ICCV 2021), with window-aware slimming.

timm's Swin is ``patch_embed -> layers -> norm -> head``; each stage (``model.layers[s]``) runs its ``downsample``
(patch merging, Identity in the first stage) and then blocks that attend inside ``window x window`` windows, every
second block on a partition shifted by half a window (a cyclic roll, with a mask keeping the wrapped regions
apart). Tokens are ``[B, H * W, C]`` in raster order between blocks; a token after ``s`` patch mergings stands for
a ``2^s x 2^s`` square of patches (:class:`~patchslim.tokens.Provenance` with ``cell``).

**Window-aware slimming.** At every block, :meth:`SwinAdapter.enter` hands the block and the methods acting there
its tokens grouped by the block's own partition, ``[B * W, n, C]`` (W windows of n tokens per image,
``TokenState.groups = W``), so a method that keeps the top k along the token axis keeps the same k in every
window, with the same code it runs on a ViT. The block then runs on the kept ``[B * W, k, C]``: attention costs k^2
per window, with the relative-position bias and the shift mask gathered to ``[k, k]`` per window, and the MLP k
per window. :meth:`SwinAdapter.transition` puts the tokens back in place: the ones not kept skip the block and
carry their values through unchanged (as the residual would with a zero branch), so every block, and patch
merging, sees the whole grid and the hierarchy is intact.

**Merging per window** (``tome``, the second mode). A method may instead merge every window's n tokens to k
before the block (:func:`patchslim.tokens.merge_tokens`: the provenance says which merged token each position
joined). The block's window attention and MLP run on the k merged tokens, with the relative-position bias and the
shift mask gathered by the rule of :meth:`SwinAdapter._merged_bias` (a key's bias sums over its members, which
includes ToMe's proportional attention ``log size``). After the block every position is back: its own block
input plus its merged token's update (output minus input), as ToMe for Stable Diffusion unmerges the branches
around a residual (Bolya and Hoffman, CVPR workshops 2023). Taking the merged token's output instead (ToMe's own
unmerge, for dense prediction) makes every member equal from then on: on fashion-swin at rho 0.5 it kept 67.3 %
top-1 against 80.8 % for the update (first 1,000 canvas test images, evenly spaced; unslimmed 87.2 %). Merges
never join the pieces of a shifted window that its mask keeps apart (:meth:`SwinAdapter.merge_regions`).

Attention for maps and methods is the attention each token *receives* within its window (mean over heads and
queries), on the block's token grid, as a one-row map ``[B, 1, 1, H * W]`` (Swin has no class token); a token that
sat out the block received none. A method acting at a block reads the previous block's map regrouped by its own
windows (averaged over the four tokens that patch merging joins when the previous block was in the stage before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from patchslim.adapters.base import Adapter, AttentionOutput
from patchslim.errors import PlanError, UnsupportedModelError
from patchslim.tokens import Provenance, TokenState
from patchslim.trace import BlockShape, ModelSpec

TESTED_MODELS = ("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
                 "fashion-swin")


@dataclass(frozen=True)
class WindowLayout:
    """How the grouped tokens of one block sit in its window partition.

    Attributes:
        block: the block index.
        windows_in: ``[B * W, n, C]`` the block's input by window, before any method kept a subset (the values
            the tokens that sit the block out carry on with).
    """

    block: int
    windows_in: torch.Tensor


@dataclass(frozen=True)
class _Partition:
    """Index tables of one block's window partition (the same for every image)."""

    order: torch.Tensor  # [L] grid id of each window slot, window-major (slot j = window j // n, position j % n)
    inverse: torch.Tensor  # [L] slot of each grid id
    local: torch.Tensor  # [L] position of each grid id inside its window
    regions: torch.Tensor | None = None  # [W, n] the piece of its window each position is in (shifted blocks)


class SwinAdapter(Adapter):
    kind = "swin"
    token_removal: ClassVar[bool] = False
    floor_reason = ("timm's window attention runs full windows only (its relative-position bias is n x n), so the "
                    "model's own blocks cannot run on k tokens per window; a floor would be this adapter's own "
                    "walk")

    def __init__(self, name: str, module: torch.nn.Module, default_stages: tuple[int, ...] | None = None) -> None:
        super().__init__(name, module)
        self._blocks = [blk for layer in module.layers for blk in layer.blocks]
        self._stage_of = [s for s, layer in enumerate(module.layers) for _ in layer.blocks]
        self._partitions: dict[tuple[int, torch.device], _Partition] = {}
        self._default_stages = default_stages

    @classmethod
    def accepts(cls, module: torch.nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(module, SwinTransformer)

    def check(self) -> None:
        from timm.layers import Mlp
        from timm.models.swin_transformer import (PatchMerging, SwinTransformer, SwinTransformerBlock,
                                                  SwinTransformerStage, WindowAttention)

        swin = self.module

        def refuse(reason: str) -> None:
            raise UnsupportedModelError(
                f"{self.name} is not supported: {reason}. patchslim walks timm's Swin v1 (SwinTransformer with "
                f"standard stages), e.g. {', '.join(TESTED_MODELS)}."
            )

        if not isinstance(swin, SwinTransformer):
            refuse(f"it is a {type(swin).__name__}, not a timm SwinTransformer")
        if getattr(swin.patch_embed, "flatten", False) or getattr(swin.patch_embed, "dynamic_img_pad", False):
            refuse("its patch embedding is not the fixed-size NHWC one of Swin")
        if getattr(swin, "absolute_pos_embed", None) is not None:
            refuse("absolute position embeddings (ape=True) are not supported")
        for s, layer in enumerate(swin.layers):
            if type(layer).forward is not SwinTransformerStage.forward:
                refuse(f"stage {s} is a {type(layer).__name__}, not a standard SwinTransformerStage")
            if s > 0 and not isinstance(layer.downsample, PatchMerging):
                refuse(f"stage {s} does not start with PatchMerging")
            if s == 0 and not isinstance(layer.downsample, torch.nn.Identity):
                refuse("stage 0 has a downsampling step")
            for j, blk in enumerate(layer.blocks):
                where = f"block {j} of stage {s}"
                if type(blk).forward is not SwinTransformerBlock.forward or type(blk)._attn is not SwinTransformerBlock._attn:
                    refuse(f"{where} is a {type(blk).__name__}, not a standard SwinTransformerBlock")
                if type(blk.attn).forward is not WindowAttention.forward:
                    refuse(f"{where} uses {type(blk.attn).__name__} attention")
                if not isinstance(blk.mlp, Mlp):
                    refuse(f"{where} uses a {type(blk.mlp).__name__} MLP")
                if getattr(blk, "dynamic_mask", False) or getattr(blk, "always_partition", False):
                    refuse(f"{where} uses dynamic masks or always_partition")
                h, w = blk.input_resolution
                wh, ww = blk.window_size
                if h % wh or w % ww:
                    refuse(f"window_size {wh}x{ww} of {where} does not divide its token grid {h}x{w} (padding is "
                           "not supported): choose an image size (img_size) or window_size that divides every "
                           "stage's grid")
        head = swin.head
        if getattr(head, "input_fmt", "NHWC") not in ("NHWC",) or swin.global_pool not in ("avg", "max", "avgmax"):
            refuse(f"its head pools with {swin.global_pool!r}; supported: avg, max, avgmax")

    def spec(self) -> ModelSpec:
        swin = self.module
        shapes = []
        cell = 1
        for s, layer in enumerate(swin.layers):
            merge = 0.0
            if s > 0:
                cell *= 2
                red = layer.downsample.reduction
                merge = float(layer.blocks[0].input_resolution[0] * layer.blocks[0].input_resolution[1]
                              * red.in_features * red.out_features)
            for j, blk in enumerate(layer.blocks):
                shapes.append(BlockShape(
                    stage=s, grid=tuple(int(v) for v in blk.input_resolution), cell=cell,
                    width=int(blk.norm1.normalized_shape[0]), num_heads=int(blk.attn.num_heads),
                    head_dim=int(blk.attn.qkv.out_features // (3 * blk.attn.num_heads)),
                    mlp_hidden=int(blk.mlp.fc1.out_features), window=tuple(int(v) for v in blk.window_size),
                    shift=tuple(int(v) for v in blk.shift_size), merge_macs=merge if j == 0 else 0.0,
                ))
        first = shapes[0]
        stages = len(swin.layers)
        default = self._default_stages if self._default_stages is not None else tuple(range(max(0, stages - 2), stages))
        return ModelSpec(
            name=self.name,
            img_size=tuple(int(s) for s in swin.patch_embed.img_size),
            patch_size=tuple(int(p) for p in swin.patch_embed.patch_size),
            grid_size=tuple(int(g) for g in swin.patch_embed.grid_size),
            in_chans=int(swin.patch_embed.proj.in_channels),
            num_prefix_tokens=0,
            embed_dim=first.width,
            depth=len(shapes),
            num_heads=first.num_heads,
            head_dim=first.head_dim,
            mlp_hidden=first.mlp_hidden,
            num_classes=int(swin.num_classes),
            kind=self.kind,
            blocks=tuple(shapes),
            num_features=int(swin.num_features),
            default_stages=default,
        )

    @property
    def depth(self) -> int:
        return len(self._blocks)

    # ------------------------------------------------------------------ the walk

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.module.patch_embed(images)  # [B, H, W, C]
        return x.flatten(1, 2)

    def enter(self, index: int, state: TokenState) -> TokenState:
        """Groups the grid ``[B, L, C]`` by block ``index``'s windows: ``[B * W, n, C]``."""
        block = self._blocks[index]
        part = self._partition(index, state.tokens.device)
        b, _, c = state.tokens.shape
        n = block.window_size[0] * block.window_size[1]
        windows = state.tokens[:, part.order].reshape(-1, n, c)
        ids = state.provenance.ids[:, part.order.to(state.provenance.ids.device)].reshape(-1, n)
        prov = Provenance(state.provenance.num_patches, ids=ids, cell=state.provenance.cell, grid=state.provenance.grid)
        return TokenState(windows, 0, prov, groups=windows.shape[0] // b, layout=WindowLayout(index, windows))

    def attention(self, index: int, state: TokenState, want_probs: bool, want_keys: bool,
                  prefix_probs: bool = False, want_values: bool = False) -> AttentionOutput:
        """``block.drop_path1(block.attn(block.norm1(x), mask))`` on the kept tokens of every window."""
        block = self._blocks[index]
        attn = block.attn
        x = block.norm1(state.tokens)
        rows, k, c = x.shape
        n = attn.window_area
        qkv = attn.qkv(x).reshape(rows, k, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, key, v = qkv.unbind(0)
        bias = attn._get_rel_pos_bias()  # [1, H, n, n]
        mask = block.attn_mask  # [W, n, n] or None
        windows = state.groups
        if state.provenance.members is not None:  # a method merged every window's tokens to k
            bias = self._merged_bias(index, state, bias[0], mask)
            mask = None
        elif k < n:  # a method kept k of the n tokens of every window: gather the bias and the mask to [k, k]
            local = self._local(index, state)  # [rows, k]
            rows_i, cols_i = local[:, :, None], local[:, None, :]
            bias = bias[0][:, rows_i, cols_i].permute(1, 0, 2, 3)  # [rows, H, k, k]
            if mask is not None:
                window = torch.arange(rows, device=x.device) % windows
                bias = bias + mask[window[:, None, None], rows_i, cols_i].unsqueeze(1).to(bias.dtype)
            mask = None
        probs = None
        if want_probs or not attn.fused_attn:
            logits = (q * attn.scale) @ key.transpose(-2, -1)
            logits = logits + bias
            if mask is not None:
                logits = (logits.view(-1, windows, attn.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(
                    -1, attn.num_heads, n, n)
            weights = logits.softmax(dim=-1)
            del logits
            out = attn.attn_drop(weights) @ v
            if want_probs:
                probs = self._received(state, weights)
        else:
            attn_mask = bias
            if mask is not None:
                attn_mask = attn_mask + mask.view(1, windows, 1, n, n).expand(rows // windows, -1, attn.num_heads,
                                                                                -1, -1).reshape(-1, attn.num_heads, n, n)
            out = F.scaled_dot_product_attention(q, key, v, attn_mask=attn_mask,
                                                 dropout_p=attn.attn_drop.p if attn.training else 0.0)
        out = out.transpose(1, 2).reshape(rows, k, -1)
        out = attn.proj_drop(attn.proj(out))
        return AttentionOutput(block.drop_path1(out), probs, key if want_keys else None, v if want_values else None)

    def mlp(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        block = self._blocks[index]
        return block.drop_path2(block.mlp(block.norm2(tokens)))

    def transition(self, index: int, state: TokenState) -> TokenState:
        """Tokens back in place on the grid (the ones not kept with their block input), then patch merging if
        the next block starts a stage."""
        part = self._partition(index, state.tokens.device)
        layout: WindowLayout = state.layout
        windows = state.tokens
        if state.provenance.members is not None:  # tokens were merged before the block: unmerge
            windows = self._unmerge(index, state)
        elif state.provenance.ids is None:  # pragma: no cover - the engine refuses such plans before any block
            raise PlanError(f"block {index} of {self.name}: its tokens are combinations that cannot be put back "
                            "in their windows")
        elif windows.shape[1] < layout.windows_in.shape[1]:
            local = self._local(index, state).unsqueeze(-1).expand(-1, -1, windows.shape[-1])
            windows = layout.windows_in.to(windows.dtype).scatter(1, local, windows)
        b = windows.shape[0] // state.groups
        grid = windows.reshape(b, -1, windows.shape[-1])[:, part.inverse]
        prov = state.provenance
        cell = prov.cell
        if index + 1 < len(self._blocks) and self._stage_of[index + 1] != self._stage_of[index]:
            h, w = self._blocks[index].input_resolution
            grid = self.module.layers[self._stage_of[index + 1]].downsample(grid.reshape(b, h, w, -1)).flatten(1, 2)
            cell *= 2
        ids = torch.arange(grid.shape[1], device=grid.device).unsqueeze(0).expand(b, -1)
        grid_size = prov.grid if prov.grid != (0, 0) else tuple(self.module.patch_embed.grid_size)
        return TokenState(grid, 0, Provenance(prov.num_patches, ids=ids, cell=cell, grid=grid_size))

    def head(self, state: TokenState) -> torch.Tensor:
        swin = self.module
        h, w = self._blocks[-1].input_resolution
        features = swin.norm(state.tokens).reshape(state.tokens.shape[0], h, w, -1)
        return swin.forward_head(features)

    def seen_attention(self, attention: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The received-attention map of the block read, ``[B, 1, 1, L']``, regrouped as ``[B * W, 1, 1, k]``
        rows aligned with ``state``'s grouped tokens (averaged over patch merging's 2 x 2 when L' = 4 L)."""
        scores = attention.reshape(attention.shape[0], -1)
        block = self._blocks[state.layout.block]
        h, w = block.input_resolution
        if scores.shape[1] == 4 * h * w:  # the map is from the stage before: join it as patch merging joins tokens
            scores = F.avg_pool2d(scores.reshape(-1, 1, 2 * h, 2 * w), 2).reshape(scores.shape[0], -1)
        ids = state.provenance.ids.reshape(scores.shape[0], -1).to(scores.device)
        return scores.gather(1, ids).reshape(state.tokens.shape[0], 1, 1, -1)

    # ------------------------------------------------------------------ helpers

    def _partition(self, index: int, device: torch.device) -> _Partition:
        key = (index, device)
        part = self._partitions.get(key)
        if part is None:
            with torch.inference_mode(False):  # plain tensors: the tables also index tokens that require grad
                part = self._build_partition(index, device)
            self._partitions[key] = part
        return part

    def _build_partition(self, index: int, device: torch.device) -> _Partition:
        """Index tables of block ``index``'s partition: timm's roll and window_partition applied to grid ids."""
        from timm.models.swin_transformer import window_partition

        block = self._blocks[index]
        h, w = block.input_resolution
        n = block.window_size[0] * block.window_size[1]
        grid = torch.arange(h * w, device=device).reshape(1, h, w, 1)
        if any(block.shift_size):
            grid = torch.roll(grid, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
        order = window_partition(grid, block.window_size).reshape(-1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=device)
        local = inverse % n
        regions = None
        if block.attn_mask is not None:  # 0 between positions of one piece, a large negative number otherwise
            regions = (block.attn_mask.to(device) == 0).to(torch.int8).argmax(dim=-1)  # [W, n] first of its piece
        return _Partition(order, inverse, local, regions)

    def _local(self, index: int, state: TokenState) -> torch.Tensor:
        """``[B * W, k]`` the position inside its window of every kept token (from its grid id)."""
        part = self._partition(index, state.tokens.device)
        return part.local[state.provenance.ids.to(state.tokens.device)]

    def _merged_bias(self, index: int, state: TokenState, bias: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
        """``[rows, H, k, k]`` the additive attention bias of merged window tokens (relative position and shift
        mask, proportional attention included).

        The rule: a merged token is a group G of the window's positions. As a query it takes the bias row of its
        group's first position (raster order in the window): one row for the one output all its members get back.
        As a key it gets ``log sum_{b in G} exp(bias[a, b])``: the attention its members would receive together if
        each carried the merged key, so the relative position of every member counts. With one bias value over G
        this is ``bias + log |G|``, ToMe's proportional attention; for a group of one, the token's own bias, so
        unmerged tokens see exactly what they would in the block. The shift mask is read at the groups' first
        positions: a merge never joins tokens the mask keeps apart (``merge_regions``), so every member agrees.
        """
        prov = state.provenance
        part = self._partition(index, state.tokens.device)
        local = part.local[prov.members.to(state.tokens.device)]  # [rows, S] window position of every member
        assign = prov.assign.to(local.device)  # [rows, S] the merged token each joined
        rows, k = local.shape[0], prov.merged_count
        n = bias.shape[-1]
        first = torch.full((rows, k), n, dtype=local.dtype, device=local.device).scatter_reduce(
            1, assign, local, "amin")  # [rows, k]
        rows_bias = bias[:, first[:, :, None], local[:, None, :]].permute(1, 0, 2, 3).float()  # [rows, H, k, S]
        top = rows_bias.amax(dim=-1, keepdim=True)
        summed = torch.zeros(rows, bias.shape[0], k, k, device=bias.device).scatter_add_(
            3, assign[:, None, None, :].expand(-1, bias.shape[0], k, -1), (rows_bias - top).exp())
        out = summed.log() + top
        if mask is not None:
            window = torch.arange(rows, device=local.device) % state.groups
            out = out + mask[window[:, None, None], first[:, :, None], first[:, None, :]].unsqueeze(1)
        return out.to(bias.dtype)

    def _unmerge(self, index: int, state: TokenState) -> torch.Tensor:
        """``[rows, n, C]``: every window position back, each member of a merged token with its own block input
        plus the merged token's update (its output minus its input), the positions no token stood for as they
        entered the block."""
        layout: WindowLayout = state.layout
        prov = state.provenance
        part = self._partition(index, state.tokens.device)
        out = state.tokens  # [rows, k, C]
        channels = out.shape[-1]
        local = part.local[prov.members.to(out.device)].unsqueeze(-1).expand(-1, -1, channels)  # [rows, S, C]
        assign = prov.assign.to(out.device).unsqueeze(-1).expand(-1, -1, channels)
        windows_in = layout.windows_in.to(out.dtype)
        own = windows_in.gather(1, local)  # [rows, S, C] each member's block input
        merged_in = torch.zeros_like(out).scatter_add_(1, assign, own) / state.sizes.to(out.dtype).unsqueeze(-1)
        members_out = own + (out - merged_in).gather(1, assign)
        return windows_in.scatter(1, local, members_out)

    def merge_regions(self, index: int, state: TokenState) -> torch.Tensor | None:
        """``[B * W, n]``: in a shifted block, which piece of its window each token is in (the first position
        of that piece), since the shift mask keeps pieces apart; None in a block without a shift mask. Read
        before the block runs, on its whole windows."""
        regions = self._partition(index, state.tokens.device).regions
        if regions is None or state.tokens.shape[1] != regions.shape[1]:
            return None
        return regions.repeat(state.tokens.shape[0] // regions.shape[0], 1)

    def _received(self, state: TokenState, weights: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 1, L]``: the attention each token received in its window (mean over heads and queries), on
        the grid; 0 for tokens that sat the block out."""
        rows = weights.shape[0]
        b = rows // state.groups
        received = weights.float().mean(dim=(1, 2))  # [rows, k]
        layout: WindowLayout = state.layout
        total = layout.windows_in.shape[0] * layout.windows_in.shape[1] // b
        prov = state.provenance
        if prov.members is not None:  # a merged token's attention, shared among its members
            received = (received / state.sizes.float()).gather(1, prov.assign.to(received.device))
        ids = (prov.ids if prov.members is None else prov.members).to(received.device).reshape(b, -1)
        grid = torch.zeros(b, total, device=received.device).scatter(1, ids, received.reshape(b, -1))
        return grid.reshape(b, 1, 1, total)
