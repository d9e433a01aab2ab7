"""``rl``: a learned patch-selection policy trained with REINFORCE (survey section 3.2.2, eq. 14-15).

A small MLP (:class:`patchslim.policy.PolicyNet`) reads the tokens entering the block where it acts (its
own features and the CLS token's) and gives each patch a keep logit. It was trained on a frozen ViT to
maximize R = lambda * accuracy - (1 - lambda) * cost (eq. 14) with the policy gradient of eq. 15; see
:mod:`patchslim.policy_training` and ``python -m patchslim train-policy``.

At inference:

- ``mode=topk`` (default): keep the round(rho * N) patches with the highest logits (a fixed rho);
- ``mode=bernoulli``: keep each patch whose logit passes the policy's calibrated threshold for rho (or, with
  ``sample=true``, draw the decision with probability sigmoid(logit - threshold) from the image's own random
  stream, seeded by the plan's seed and the image's input, :mod:`patchslim.seeding`). The count then differs
  per image, averaging about rho. An image keeps its own decisions whatever batch it is in: the tensor stays
  rectangular at the batch's largest count, and an image's places beyond its own count are masked out as keys
  (no token attends to them, pooling skips them), which gives the logits of dropping them. Such a masked stage
  must be the plan's last (a later stage is refused); a batch whose images all keep the same count is
  gathered, unmasked.

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
                u = ctx.random.rand(logits.shape[0], logits.shape[1], state.groups, logits.device)
                decisions = u < torch.sigmoid(logits - threshold)
            else:
                decisions = logits > threshold
            counts = decisions.sum(1).clamp_min(1)  # an image with no decision keeps its highest logit
            count = int(counts.max())
            # Decided patches first (by logit, each image's own scale), then the next-highest logits up to the
            # batch's largest count; the places beyond an image's own count are masked below.
            lift = logits.abs().amax(1, keepdim=True) * 2 + 1
            scores = logits + decisions.float() * lift
            index = top_k_index(scores, count)
        macs = float(state.count * net.macs_per_token())
        kept = keep_tokens(state, index)
        if ctx.options.get("mode", "topk") != "topk" and bool((counts != count).any()):
            kept = _mask_beyond(kept, index, scores, counts)
        return Reduction(kept, scores=scores, selection_macs=macs)


def _mask_beyond(state: TokenState, index: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor) -> TokenState:
    """``state`` (the batch's largest count of tokens, kept at ``index``) with each image's tokens past its own
    ``counts`` (the lowest ``scores`` among those kept) masked out as keys."""
    kept_scores = scores.gather(1, index)
    rank = kept_scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0 = highest
    mask = rank < counts.unsqueeze(1)
    prefix = torch.ones(mask.shape[0], state.num_prefix, dtype=torch.bool, device=mask.device)
    if state.key_mask is not None:
        raise PlanError("method 'rl' with mode=bernoulli cannot act after a stage that masked tokens")
    return TokenState(state.tokens, state.num_prefix, state.provenance, state.sizes,
                      torch.cat([prefix, mask.to(state.tokens.device)], dim=1), state.groups, state.layout)
