"""``entropy``: drop the patches whose features have the lowest softmax entropy (survey eq. 12-13).

For token i with features ``z_i`` (``[C]``), ``p = softmax(z_i)`` over the channels and
``S_i = -sum_j p_j log p_j`` (eq. 12). The lowest-entropy tokens are dropped: either the
``round(rho M)`` highest-entropy ones are kept (the default, a target rho), or with option ``tau`` the
ones with ``S_i > tau`` (eq. 13, an adaptive count per image).

Which features: ``z_i`` is the token as it flows into the block where the method acts (the residual
stream, prefix tokens excluded). At the input (block 0) that is the patch embedding plus its position
embedding, i.e. pixel content only. The default is *before block 1*, after one block has run: while
planning, pruning a ViT like the bundled one at the input by pixel content alone collapsed accuracy (49 % / 27 %
at rho 0.5 / 0.3) while the same selection after one block kept 82.8 % / 78.9 %, because the first block
needs the background's context. ``blocks=0`` gives the survey's literal input-level reading.

Threshold mode in a batch: tensors stay rectangular, so every image keeps the batch's largest count
``max_b |{i : S_i > tau}|``; an image with fewer tokens above tau is filled with its next-highest-entropy
tokens. With one image per call (the app, ``--batch-size 1``) the count is exactly eq. 13's. A tau that
keeps no token of any image raises :class:`~patchslim.errors.PlanError` with the range of entropies seen.

Reference: the survey, section 3.2.1, eq. (12) and (13).
"""

from __future__ import annotations

import torch

from patchslim.errors import PlanError
from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.tokens import TokenState, keep_tokens, top_k_index


def feature_entropy(tokens: torch.Tensor) -> torch.Tensor:
    """Eq. 12: entropy of the softmax over the channels of each token.

    Args:
        tokens: ``[B, M, C]``.

    Returns:
        ``[B, M]`` float32 entropies in nats, in ``[0, log C]``.
    """
    log_p = torch.log_softmax(tokens.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


@register
class EntropySelection(SlimMethod):
    name = "entropy"
    windowed = True
    summary = "Keep the patches whose feature softmax has the highest entropy (eq. 12-13), by rho or tau."
    explanation = (
        "Each token's feature vector is turned into a probability distribution over its channels with a "
        "softmax, and its entropy measures how spread out that distribution is. Tokens with a peaked, "
        "low-entropy distribution are treated as carrying little information and are dropped, either down to "
        "a target rho or below a threshold tau (then each image keeps its own number of tokens). Where the "
        "features come from matters: at the input they describe only the pixels of one patch, so by default "
        "the method scores after the first block, once every token has seen its context."
    )
    equation = (r"S(\mathbf{x}_i) = -\sum_j p_j \log p_j,\quad p_j = \frac{e^{z_{i,j}}}{\sum_k e^{z_{i,k}}},"
                r"\qquad \mathcal{P}' = \{\mathbf{x}_i \mid S(\mathbf{x}_i) > \tau\}")
    reference = "Survey section 3.2.1, eq. (12)-(13)"
    adaptive_count = True  # with tau
    input_dependent = True
    options = (
        OptionSpec("tau", "float", None,
                   "keep tokens with entropy above tau (nats; eq. 13) instead of a target rho; entropies lie "
                   "in [0, log C]", minimum=0.0),
    )

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        """Before block 1 (after one block of context); the input for a one-block model."""
        return (1,) if depth > 1 else (0,)

    def adaptive_reason(self, options: dict) -> str | None:
        if options.get("tau") is not None:
            return ("method 'entropy' with option 'tau' keeps every token whose entropy is above tau (eq. 13), so the "
                    "number kept (and the cost) differs per image; leave tau unset to keep the top rho")
        return None

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        scores = feature_entropy(state.patches)
        m, channels = state.count, state.tokens.shape[-1]
        macs = 2.0 * m * channels  # one exp and one multiply-add per channel
        tau = ctx.options.get("tau")
        if tau is None:
            keep = ctx.target
        else:
            above = (scores > tau).sum(1)
            keep = int(above.max())
            if keep == 0:
                raise PlanError(
                    f"option 'tau' of method 'entropy' keeps no token: tau={tau:g} but the entropies at block "
                    f"{ctx.block} range from {float(scores.min()):.4g} to {float(scores.max()):.4g} nats; "
                    f"choose tau below {float(scores.max()):.4g}"
                )
        if keep >= m:
            return Reduction(state, scores=scores, selection_macs=macs)
        return Reduction(keep_tokens(state, top_k_index(scores, keep)), scores=scores, selection_macs=macs)
