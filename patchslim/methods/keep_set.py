"""``keep_set``: the tokens a caller gives, per image (see :class:`patchslim.plan.KeepSet`).

Not a slimming method a person picks (it is not in the registry): the primitive that policy training,
fine-tuning with slimming and token-removal faithfulness tests build on. It keeps given positions among the
current non-prefix tokens, repeats each image when several keep sets per image are given, and masks instead
of gathering when a boolean keep set keeps a different count per image.
"""

from __future__ import annotations

import torch

from patchslim.errors import PlanError
from patchslim.methods.base import Reduction, SlimMethod, StageContext
from patchslim.tokens import TokenState, keep_tokens, repeat_batch


class GivenKeepSet(SlimMethod):
    name = "keep_set"
    windowed = False
    window_reason = ("a keep set drops tokens for good, while a windowed model puts every token back in place "
                     "after each block")
    summary = "The tokens the caller gives, per image."
    reference = "patchslim primitive"
    input_dependent = True
    adaptive_count = True

    def default_blocks(self, depth: int) -> tuple[int, ...]:  # pragma: no cover - a KeepSet names its block
        return (0,)

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        keep = ctx.given(state) if callable(ctx.given) else ctx.given
        if not isinstance(keep, torch.Tensor):
            raise PlanError(f"a keep set must give a tensor, got {type(keep).__name__}")
        keep = keep.to(state.tokens.device)
        batch, m = state.tokens.shape[0], state.count
        if keep.dim() != 2 or keep.shape[0] == 0 or keep.shape[0] % batch:
            raise PlanError(
                f"a keep set must be [B', K] positions or a [B', {m}] mask with B' a multiple of the batch "
                f"size {batch}, got shape {list(keep.shape)}"
            )
        state = repeat_batch(state, keep.shape[0] // batch)
        if keep.dtype == torch.bool:
            if keep.shape[1] != m:
                raise PlanError(f"a boolean keep set must have one column per token ({m}), got {keep.shape[1]}")
            counts = keep.sum(1)
            if bool((counts == counts[0]).all()):
                index = keep.nonzero()[:, 1].view(keep.shape[0], int(counts[0]))
                return Reduction(keep_tokens(state, index, sort=False))
            prefix = torch.ones(keep.shape[0], state.num_prefix, dtype=torch.bool, device=keep.device)
            mask = torch.cat([prefix, keep], dim=1)
            if state.key_mask is not None:
                mask = mask & state.key_mask
            return Reduction(TokenState(state.tokens, state.num_prefix, state.provenance, state.sizes, mask))
        if keep.dtype not in (torch.int64, torch.int32):
            raise PlanError(f"a keep set must be int64 positions or a bool mask, got {keep.dtype}")
        keep = keep.long()
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= m):
            raise PlanError(f"keep set positions must be in 0..{m - 1}, got {int(keep.min())}..{int(keep.max())}")
        return Reduction(keep_tokens(state, keep))


GIVEN = GivenKeepSet()
