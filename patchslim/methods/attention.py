"""``attention``: prune before a block by the attention of the block before it (survey eq. 16, corrected).

**Erratum.** Eq. 16 prints :math:`I_i = \\sum_j A_{ij}`. ``A`` holds softmax probabilities, row i being
query i's distribution over the keys, so every row sums to 1: the printed score is 1 for every token and
ranks nothing. What the cited methods mean is the attention a token *receives*, a column of ``A``:

- ``score="received"``: ``I_i = mean over heads h and queries q of A[h, q, i]`` (a column mean), or
- ``score="cls"`` (default): ``I_i = mean over heads of A[h, 0, i]``, the attention the CLS token, which the
  classifier reads, pays to token i (rows of all prefix tokens averaged: CLS and distillation token).

``cls`` is the default because it measures what the prediction uses; while planning, pruning a canvas Fashion-MNIST
ViT like the bundled one before block 3 by CLS attention kept 83.7 % / 82.1 % at rho 0.5 / 0.3. ``received``
is the closest repair of the printed formula (transpose the sum) and is offered for comparison.
:func:`printed_scores` computes the printed row sum, for showing that it is constant.

The method acts before block b (``point="pre"``) and reads block b-1's attention probabilities; the
default is one stage before block ``ceil(depth / 4)`` (3 for depth 12, 2 for the 6-block bundled model).
Several blocks (``blocks=3,6,9``) prune at each, each keeping rho of the tokens it receives.

Reference: the survey, section 3.2.3, eq. (16); see also EViT (Liang et al., ICLR 2022) for CLS attention.
"""

from __future__ import annotations

import torch

from patchslim.errors import PlanError
from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.tokens import TokenState, keep_tokens, top_k_index

ERRATUM = (
    "Eq. 16 as printed, I_i = sum_j A_ij, sums a row of softmax probabilities, which is 1 for every token: "
    "it ranks nothing. This method uses the attention a token receives instead (a column of A), from the "
    "CLS token or averaged over all queries."
)


def printed_scores(attention: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Eq. 16 exactly as printed, ``I_i = sum_j A_ij`` averaged over heads: ``[B, M]``, all ones."""
    return attention[:, :, num_prefix:, :].sum(-1).mean(1)


def received_scores(attention: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Attention each non-prefix token receives: column mean over heads and all queries, ``[B, M]``."""
    return attention[:, :, :, num_prefix:].float().mean(dim=(1, 2))


def cls_scores(attention: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Attention the prefix tokens (CLS, distillation) pay to each non-prefix token, ``[B, M]``."""
    return attention[:, :, :num_prefix, num_prefix:].float().mean(dim=(1, 2))


def check_aligned(attention: torch.Tensor, state: TokenState, ctx: StageContext, method: str) -> None:
    """Raises PlanError when another stage changed the tokens after the attention being read ran."""
    if attention.shape[-1] != state.tokens.shape[1]:
        source = ctx.block - 1 if ctx.point == "pre" else ctx.block
        raise PlanError(
            f"method {method!r} at block {ctx.block} reads the attention of block {source} over "
            f"{attention.shape[-1]} tokens, but another stage changed the tokens to {state.tokens.shape[1]} "
            "after it ran; put that stage elsewhere"
        )


@register
class AttentionPruning(SlimMethod):
    name = "attention"
    windowed = True
    summary = "Prune before a block by the attention tokens received in the block before (eq. 16, corrected)."
    explanation = (
        "An early block's attention already says which patches the network looks at. Eq. 16 of the survey "
        "prints the importance as I_i = sum_j A_ij, but a row of A is a softmax and always sums to 1, so that "
        "score is the same for every patch and ranks nothing: a good example of checking an equation before "
        "trusting it. The fix is to sum a column instead, the attention a patch receives, either from the "
        "CLS token (what the classifier reads; the default) or averaged over all tokens. The lowest-scoring "
        "patches are removed before the next block."
    )
    equation = (r"I_i = \frac{1}{H}\sum_h A^{(h)}_{\mathrm{cls},\,i}\ \text{ or }\ "
                r"\frac{1}{HT}\sum_h\sum_q A^{(h)}_{q,i}\qquad"
                r"\big(\text{printed: } I_i = \textstyle\sum_j A_{ij} = 1\big)")
    reference = "Survey section 3.2.3, eq. (16), with an erratum; CLS attention as in EViT (Liang et al., ICLR 2022)"
    point = "pre"
    needs_attention = True
    input_dependent = True
    options = (
        OptionSpec("score", "str", None,
                   "attention from the CLS token (row 0) or received from all tokens (column mean); default: cls "
                   "when the model has a CLS token, else received",
                   choices=("cls", "received")),
    )

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        """One stage before block ceil(depth / 4): 3 of 12, 2 of 6 (at least 1, at most depth - 1)."""
        return (min(max(1, -(-depth // 4)), max(1, depth - 1)),)

    def attention_rows(self, options: dict) -> str:
        """``score="cls"`` reads only the prefix rows; ``"received"`` reads whole columns."""
        return "prefix" if options.get("score") in (None, "cls") else "all"

    def check(self, stage_options: dict, keep_ratio: float, model) -> None:
        if stage_options.get("score") == "cls" and model.spec.num_prefix_tokens == 0:
            raise PlanError("method 'attention' with score=cls needs a CLS token, which this model has not; "
                            "use score=received")

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        attention = ctx.attention
        p = state.num_prefix
        check_aligned(attention, state, ctx, self.name)
        heads, tokens = attention.shape[1], attention.shape[2]
        if (ctx.options.get("score") or ("cls" if p else "received")) == "cls":
            scores = cls_scores(attention, p)
            macs = heads * p * state.count
        else:
            scores = received_scores(attention, p)
            macs = heads * tokens * state.count  # one addition per probability read
        if ctx.target >= state.count:
            return Reduction(state, scores=scores, selection_macs=macs)
        return Reduction(keep_tokens(state, top_k_index(scores, ctx.target)), scores=scores, selection_macs=macs)
