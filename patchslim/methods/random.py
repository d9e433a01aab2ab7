"""``random``: a seeded random subset of patches, the control every comparison needs.

Keeps ``round(rho * M)`` of the M current patch tokens, drawn uniformly without replacement: every token gets a
uniform score and the top ones stay. The scores come from the image's own random stream, seeded by the plan's seed
and a key computed from the image's input tensor (:mod:`patchslim.seeding`), so the same plan gives an image the
same subset on every run and thread, and whatever batch the image is in, at whatever position. On a windowed model
(Swin) the image's stream gives its windows' rows in order.
"""

from __future__ import annotations

from patchslim.methods.base import Reduction, SlimMethod, StageContext, register
from patchslim.tokens import TokenState, keep_tokens, top_k_index


@register
class RandomPruning(SlimMethod):
    name = "random"
    windowed = True
    summary = "A seeded random subset of patches: the baseline every method must beat."
    explanation = (
        "Every patch gets a random score from a seeded generator and the highest-scoring rho*N are kept. "
        "It ignores what the image shows (each image gets its own draw, the same every time), so any method "
        "that looks at the content should do better; "
        "if one does not, its scores carry no information."
    )
    equation = r"\mathcal{P}' \sim \mathrm{Uniform}\{S \subseteq \mathcal{P} : |S| = \lceil \rho N \rfloor\}"
    reference = "control"

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        scores = ctx.random.rand(state.tokens.shape[0], state.count, state.groups, state.tokens.device)
        return Reduction(keep_tokens(state, top_k_index(scores, ctx.target)), scores=scores)
