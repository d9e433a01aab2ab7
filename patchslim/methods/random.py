"""``random``: a seeded random subset of patches, the control every comparison needs.

Keeps ``round(rho * M)`` of the M current patch tokens, drawn uniformly without replacement from a
generator seeded by the plan, so the same plan gives the same subset on every run and thread.
"""

from __future__ import annotations

import torch

from patchslim.methods.base import Reduction, SlimMethod, StageContext, register
from patchslim.tokens import TokenState, keep_tokens, top_k_index


@register
class RandomPruning(SlimMethod):
    name = "random"
    windowed = True
    summary = "A seeded random subset of patches: the baseline every method must beat."
    explanation = (
        "Every patch gets a random score from a seeded generator and the highest-scoring rho*N are kept. "
        "It ignores the image completely, so any method that looks at the content should do better; "
        "if one does not, its scores carry no information."
    )
    equation = r"\mathcal{P}' \sim \mathrm{Uniform}\{S \subseteq \mathcal{P} : |S| = \lceil \rho N \rfloor\}"
    reference = "control"

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        scores = torch.rand(state.tokens.shape[0], state.count, generator=ctx.generator)
        scores = scores.to(state.tokens.device)
        return Reduction(keep_tokens(state, top_k_index(scores, ctx.target)), scores=scores)
