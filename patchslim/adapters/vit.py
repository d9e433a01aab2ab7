"""The adapter for timm's ``VisionTransformer`` (ViT, DeiT, distilled DeiT, register and no-CLS variants).

timm's ``forward_features`` is ``patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks -> norm`` and
``forward_head`` pools and classifies. This adapter re-states one pre-norm ``Block`` as its two residual
branches, so the engine can act between attention and MLP and read attention where a method needs it:

- attention probabilities are materialized only when asked for; otherwise ``F.scaled_dot_product_attention``;
- once tokens are merged, ``log(size)`` is added to the attention logits (proportional attention, Bolya et al.
  2023), so a token standing for k patches weighs like k of them;
- tokens outside a per-image keep set (``TokenState.key_mask``) are masked out as keys, so no kept token
  reads them;
- pooling is timm's own (``global_pool``, ``pool_include_prefix``, ``fc_norm``), with merged tokens weighted by
  their size when the state carries sizes at the head (the engine drops them when the plan's merging stages
  pool each token once, as the published ToMe does) and masked tokens left out of average and max pooling.

Dropout, drop-path and layer scale are the block's own modules, so a model in ``train()`` mode trains through
this walk as it would through ``model(x)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchslim.adapters.base import Adapter, AttentionOutput
from patchslim.errors import PlanError, UnsupportedModelError
from patchslim.tokens import TokenState
from patchslim.trace import ModelSpec

# Examples named in refusals: the models the project is tested with.
TESTED_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
                 "vit_base_patch16_224", "deit_small_distilled_patch16_224")


class ViTAdapter(Adapter):
    kind = "vit"

    @classmethod
    def accepts(cls, module: torch.nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(module, VisionTransformer)

    def check(self) -> None:
        from timm.layers import Attention, Mlp
        from timm.models.vision_transformer import Block, VisionTransformer

        vit = self.module

        def refuse(reason: str) -> None:
            raise UnsupportedModelError(
                f"{self.name} is not supported: {reason}. patchslim walks plain timm VisionTransformers "
                f"(ViT / DeiT with standard blocks), e.g. {', '.join(TESTED_MODELS)}."
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

    def spec(self) -> ModelSpec:
        vit = self.module
        first = vit.blocks[0]
        return ModelSpec(
            name=self.name,
            img_size=tuple(int(s) for s in vit.patch_embed.img_size),
            patch_size=tuple(int(p) for p in vit.patch_embed.patch_size),
            grid_size=tuple(int(g) for g in vit.patch_embed.grid_size),
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

    @property
    def depth(self) -> int:
        return len(self.module.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.module
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))

    def attention(self, index: int, state: TokenState, want_probs: bool, want_keys: bool,
                  prefix_probs: bool = False, want_values: bool = False) -> AttentionOutput:
        """``block.ls1(block.attn(block.norm1(x)))`` with optional probabilities, keys and values.

        ``prefix_probs`` (without ``want_probs``): fused attention for the output, plus the probabilities of the
        prefix tokens' queries only, ``[B, H, P, T]`` (``P * T`` instead of ``T^2`` per head).
        """
        block = self.module.blocks[index]
        attn = block.attn
        h = block.norm1(state.tokens)
        b, t, _ = h.shape
        gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = key_bias(state, q.dtype)
        probs = None
        if want_probs:
            logits = (q * attn.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            probs = logits.softmax(dim=-1)
            del logits  # only the probabilities are needed from here on
            out = attn.attn_drop(probs) @ v
        else:
            dropout = attn.attn_drop.p if attn.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
            if prefix_probs:
                logits = (q[:, :, : state.num_prefix] * attn.scale) @ k.transpose(-2, -1)
                probs = (logits if bias is None else logits + bias).softmax(dim=-1)
        out = out.transpose(1, 2).reshape(b, t, attn.attn_dim)
        out = attn.norm(out)
        if gate is not None:
            out = out * gate
        out = attn.proj_drop(attn.proj(out))
        out = block.drop_path1(block.ls1(out))
        return AttentionOutput(out, probs, k if want_keys else None, v if want_values else None)

    def mlp(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        block = self.module.blocks[index]
        return block.drop_path2(block.ls2(block.mlp(block.norm2(tokens))))

    def head(self, state: TokenState) -> torch.Tensor:
        vit = self.module
        attn_pool = getattr(vit, "attn_pool", None)
        include_prefix = bool(getattr(vit, "pool_include_prefix", False))  # timm >= 1.0.x
        pools_patches = attn_pool is None and vit.global_pool not in ("token", "") and not include_prefix
        if pools_patches and state.count == 0:
            raise PlanError(f"no token is left to pool: {self.name} pools its patch tokens ({vit.global_pool}), "
                            "keep at least one")
        features = vit.norm(state.tokens)
        weights = token_weights(state)
        if weights is None or attn_pool is not None or vit.global_pool in ("token", ""):
            return vit.forward_head(features)  # timm's own pooling: nothing to weigh
        pooled = weighted_pool(features, weights, vit.global_pool, 0 if include_prefix else state.num_prefix)
        return vit.head(vit.head_drop(vit.fc_norm(pooled)))


    floor_reason = ""

    def floor(self, images: torch.Tensor, counts: list[tuple[int, int]]) -> torch.Tensor:
        """timm's own pipeline (``patch_embed`` ... ``blocks`` ... ``forward_head``) with the tokens cut to the
        given counts: a block whose attention and MLP see the same count is timm's ``Block`` itself; one whose
        MLP sees fewer (a method acting inside it) runs its two residual branches with the cut between them.
        The first tokens are kept (which ones does not change the time); a cut copies the kept tokens together,
        the least data movement any pruning needs."""
        vit = self.module
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block, (attention, mlp) in zip(vit.blocks, counts):
            x = _cut(x, attention)
            if attention == mlp:
                x = block(x)
                continue
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            x = _cut(x, mlp)
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return vit.forward_head(vit.norm(x))


def _cut(x: torch.Tensor, count: int) -> torch.Tensor:
    if count == x.shape[1]:
        return x
    if count > x.shape[1]:
        raise ValueError(f"a floor forward cannot grow the tokens from {x.shape[1]} to {count}")
    return x[:, :count].contiguous()


def key_bias(state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
    """``[B, 1, 1, T]`` additive attention bias: ``log(size)`` of merged tokens, ``-inf`` at masked keys."""
    bias = None
    if state.sizes is not None:
        bias = state.sizes.log().to(dtype)[:, None, None, :]
    if state.key_mask is not None:
        masked = ~state.key_mask[:, None, None, :]
        base = bias if bias is not None else torch.zeros(masked.shape, dtype=dtype, device=masked.device)
        bias = base.masked_fill(masked, float("-inf"))
    return bias


def token_weights(state: TokenState) -> torch.Tensor | None:
    """``[B, T]`` how much each token counts in pooling (its size; 0 when masked), or None when all count 1."""
    if state.sizes is None and state.key_mask is None:
        return None
    weights = state.sizes if state.sizes is not None else torch.ones(state.tokens.shape[:2], device=state.tokens.device)
    if state.key_mask is not None:
        weights = weights * state.key_mask.to(weights.dtype)
    return weights


def weighted_pool(features: torch.Tensor, weights: torch.Tensor, pool_type: str, start: int) -> torch.Tensor:
    """timm's ``global_pool_nlc`` over ``features[:, start:]``, each token counted ``weights`` times.

    Average pooling is the weighted mean; max pooling takes the max over tokens of non-zero weight.

    Raises:
        PlanError: no token is left to pool.
    """
    x, w = features[:, start:], weights[:, start:].to(features.dtype).unsqueeze(-1)
    total = w.sum(1)
    if bool((total <= 0).any()):
        raise PlanError("no token is left to pool: this model pools its patch tokens, keep at least one")
    mean = (x * w).sum(1) / total
    if pool_type == "avg":
        return mean
    peak = x.masked_fill(w <= 0, float("-inf")).amax(1)
    if pool_type == "max":
        return peak
    if pool_type == "avgmax":
        return 0.5 * (peak + mean)
    raise ValueError(f"unknown pooling {pool_type!r}")
