"""How slimming changed the predictions: a function of two Traces of the same images.

Per image (``i``), with ``p`` the unslimmed and ``q`` the slimmed class probabilities:

- ``top1_agree``: the slimmed top-1 class is the unslimmed one (``label_flipped`` is its negation);
- ``top5_overlap``: |top-5(p) ∩ top-5(q)| / 5 (k is capped at the number of classes);
- ``kl_divergence``: KL(p || q) = sum_c p_c (log p_c - log q_c), in nats: the information lost when the
  slimmed model's distribution stands in for the unslimmed one;
- ``confidence_before`` / ``confidence_after``: the probability of the *unslimmed* top-1 class before and
  after, and ``confidence_change`` = after - before (negative: slimming made the model less sure of its
  original answer);
- ``top1_before`` / ``top1_after``: the class indices, so a UI can name them.

Batch means are properties of the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patchslim.trace import Trace


@dataclass(frozen=True)
class PredictionChange:
    """Per-image prediction changes (lists of length B) and their batch means.

    Attributes:
        top1_before, top1_after: class indices.
        top1_agree: slimmed top-1 == unslimmed top-1.
        top5_overlap: shared share of the two top-k sets, k = min(5, classes).
        kl_divergence: KL(unslimmed || slimmed), nats.
        confidence_before, confidence_after: probability of the unslimmed top-1 class.
        class_names: for readable labels (may be empty).
    """

    top1_before: tuple[int, ...]
    top1_after: tuple[int, ...]
    top1_agree: tuple[bool, ...]
    top5_overlap: tuple[float, ...]
    kl_divergence: tuple[float, ...]
    confidence_before: tuple[float, ...]
    confidence_after: tuple[float, ...]
    class_names: tuple[str, ...] = ()

    @property
    def batch_size(self) -> int:
        return len(self.top1_agree)

    @property
    def label_flipped(self) -> tuple[bool, ...]:
        return tuple(not a for a in self.top1_agree)

    @property
    def confidence_change(self) -> tuple[float, ...]:
        return tuple(a - b for a, b in zip(self.confidence_after, self.confidence_before))

    @property
    def top1_agreement(self) -> float:
        """Share of images whose top-1 class did not change."""
        return _mean(float(a) for a in self.top1_agree)

    @property
    def flip_rate(self) -> float:
        return 1.0 - self.top1_agreement

    @property
    def mean_top5_overlap(self) -> float:
        return _mean(self.top5_overlap)

    @property
    def mean_kl_divergence(self) -> float:
        return _mean(self.kl_divergence)

    @property
    def mean_confidence_change(self) -> float:
        return _mean(self.confidence_change)

    def label(self, index: int) -> str:
        """The name of class ``index`` (its number when the model has no names)."""
        return self.class_names[index] if self.class_names else str(index)

    def image(self, i: int) -> dict:
        """Everything about image ``i`` as plain data."""
        return dict(top1_before=self.top1_before[i], top1_after=self.top1_after[i],
                    label_before=self.label(self.top1_before[i]), label_after=self.label(self.top1_after[i]),
                    label_flipped=self.label_flipped[i], top5_overlap=self.top5_overlap[i],
                    kl_divergence=self.kl_divergence[i], confidence_before=self.confidence_before[i],
                    confidence_after=self.confidence_after[i], confidence_change=self.confidence_change[i])

    def summary(self) -> dict:
        """Batch means as plain data."""
        return dict(images=self.batch_size, top1_agreement=self.top1_agreement, flip_rate=self.flip_rate,
                    top5_overlap=self.mean_top5_overlap, kl_divergence=self.mean_kl_divergence,
                    confidence_change=self.mean_confidence_change)


def prediction_change(baseline: Trace | torch.Tensor, slimmed: Trace | torch.Tensor, k: int = 5) -> PredictionChange:
    """Compares the predictions of two forwards of the same images.

    Args:
        baseline: the unslimmed Trace (or its ``[B, classes]`` logits).
        slimmed: the slimmed Trace (or logits), same images in the same order.
        k: size of the top-k sets compared (capped at the number of classes).

    Raises:
        ValueError: the two disagree in batch size or number of classes.
    """
    names = baseline.class_names if isinstance(baseline, Trace) else ()
    p_logits = (baseline.logits if isinstance(baseline, Trace) else baseline).detach().float().cpu()
    q_logits = (slimmed.logits if isinstance(slimmed, Trace) else slimmed).detach().float().cpu()
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logits differ in shape: {list(p_logits.shape)} vs {list(q_logits.shape)}")
    log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1).clamp_min(0.0)
    top_before, top_after = p_logits.argmax(-1), q_logits.argmax(-1)
    k = max(1, min(k, p_logits.shape[-1]))
    set_before, set_after = p_logits.topk(k, -1).indices, q_logits.topk(k, -1).indices
    overlap = (set_before.unsqueeze(-1) == set_after.unsqueeze(-2)).any(-1).sum(-1).float() / k
    conf_before = p.gather(1, top_before[:, None])[:, 0]
    conf_after = log_q.exp().gather(1, top_before[:, None])[:, 0]
    return PredictionChange(
        top1_before=tuple(top_before.tolist()),
        top1_after=tuple(top_after.tolist()),
        top1_agree=tuple(bool(a) for a in (top_before == top_after).tolist()),
        top5_overlap=tuple(overlap.tolist()),
        kl_divergence=tuple(kl.tolist()),
        confidence_before=tuple(conf_before.tolist()),
        confidence_after=tuple(conf_after.tolist()),
        class_names=tuple(names),
    )


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")
