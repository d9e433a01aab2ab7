"""``rl``: a learned patch-selection policy trained with REINFORCE (survey section 3.2.2, eq. 14-15).

A small MLP (:class:`patchslim.policy.PolicyNet`) reads the tokens entering the block where it acts (its
own features and the CLS token's) and gives each patch a keep logit. It was trained on a frozen ViT to
maximize R = lambda * accuracy - (1 - lambda) * cost (eq. 14) with the policy gradient of eq. 15; see
:mod:`patchslim.policy_training` and ``python -m patchslim train-policy``.

At inference:

- ``mode=topk`` (default): keep the round(rho * N) patches with the highest logits (a fixed rho);
- ``mode=bernoulli``: keep each patch whose logit passes the policy's calibrated threshold for rho (or, with
  ``sample=true``, draw the decision with probability sigmoid(logit - threshold) from the plan's seeded
  generator). The count then differs per image, averaging about rho. Tensors stay rectangular: in a batch
  every image keeps the batch's largest count, the extra places filled by that image's next-highest
  logits. Run one image at a time to see each image's own count.

Where it acts: before block ``b`` (default 1, i.e. reading the features after block 0: on the bundled model
pruning at the input by content loses the context the first block needs). A policy file records the block it
was trained for and the method refuses other blocks, and policies trained for another model.
"""

from __future__ import annotations

import torch

from patchslim.errors import PlanError
from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.tokens import TokenState, keep_tokens, top_k_index

DEFAULT_BLOCK = 1


@register
class RLPolicy(SlimMethod):
    name = "rl"
    windowed = False
    window_reason = ("its shipped policies score a plain ViT's tokens; none is trained for a windowed model")
    summary = "A small learned policy (trained with REINFORCE) scores each patch; keep its top rho*N."
    explanation = (
        "A tiny network looks at each patch's features (and the image summary in the CLS token) and gives "
        "it a keep score. It was trained by trial and error: draw a selection, see whether the frozen ViT "
        "still classifies the image right, and make selections that worked more likely (REINFORCE). "
        "At a fixed rho it keeps the top-scoring patches; in Bernoulli mode each image keeps as many as its "
        "scores pass a threshold, so busy images can keep more than plain ones."
    )
    equation = (r"R = \lambda\,\mathrm{Acc}(\mathcal{P}') - (1-\lambda)\,\mathrm{Cost}(\mathcal{P}'),\quad "
                r"\nabla_\theta J = \mathbb{E}_{\pi_\theta}[R\,\nabla_\theta \log \pi_\theta(\mathcal{P}'\mid I)]")
    reference = "survey eq. 14-15; REINFORCE (Williams 1992); cf. DynamicViT (Rao et al., NeurIPS 2021)"
    learned = True
    input_dependent = True
    adaptive_count = True
    options = (
        OptionSpec("policy", "str", "", "policy file (default: patchslim/assets/policies/<model>.safetensors)"),
        OptionSpec("mode", "str", "topk", "topk: fixed rho; bernoulli: per-image count around rho",
                   choices=("topk", "bernoulli")),
        OptionSpec("sample", "bool", False, "bernoulli mode: draw the decisions instead of thresholding"),
    )

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        return (min(DEFAULT_BLOCK, depth - 1),)

    def adaptive_reason(self, options: dict) -> str | None:
        if options.get("mode", "topk") == "bernoulli":
            return ("method 'rl' with mode=bernoulli keeps every patch whose logit passes a threshold, so the number "
                    "kept (and the cost) differs per image; use mode=topk, which keeps round(rho N)")
        return None

    def check(self, stage_options: dict, keep_ratio: float, model) -> None:
        from patchslim.policy import resolve_policy

        resolve_policy(model, stage_options.get("policy") or None)

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        from patchslim.policy import policy_logits, resolve_policy

        if ctx.model is None:
            raise PlanError("method 'rl' needs the model (run it through patchslim.run)")
        net, meta, path = resolve_policy(ctx.model, ctx.options.get("policy") or None)
        if ctx.point != "pre" or ctx.block != meta.block:
            raise PlanError(
                f"policy {path} was trained to act before block {meta.block}, not block {ctx.block}; "
                f"use blocks={meta.block}, or train one for block {ctx.block} with "
                f"python -m patchslim train-policy --blocks {ctx.block} ..."
            )
        logits = policy_logits(net, state.tokens, state.num_prefix).float()
        if ctx.options.get("mode", "topk") == "topk":
            index = top_k_index(logits, ctx.target)
            scores = logits
        else:
            threshold = meta.offset(ctx.keep_ratio)
            if ctx.options.get("sample"):
                u = torch.rand(logits.shape, generator=ctx.generator).to(logits.device)
                decisions = u < torch.sigmoid(logits - threshold)
            else:
                decisions = logits > threshold
            count = int(decisions.sum(1).clamp_min(1).max())
            # Decided patches first (by logit), then the image's next-highest logits fill up to the batch max.
            scores = logits + decisions.float() * (logits.abs().max() * 2 + 1)
            index = top_k_index(scores, count)
        macs = float(state.count * net.macs_per_token())
        return Reduction(keep_tokens(state, index), scores=scores, selection_macs=macs)
