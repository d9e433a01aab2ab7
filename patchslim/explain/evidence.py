"""Slimming vs evidence: did slimming keep the patches the unslimmed model based its answer on?

Two numbers a person auditing a slimmed model reads first:

- **kept evidence**: of the unslimmed model's top-attributed patches (the top 10 % by attribution by
  default), the share that the slimming kept. "Kept" means some token still stands for the patch at the
  chosen point (after the last block by default); a patch merged into a group counts as kept, since its
  content is still in the forward, averaged with its group.
- **rank agreement**: Spearman's rank correlation between the per-patch importance before and after
  slimming (1: the same order; 0: unrelated).

At keep ratio 1 both are 1.0. Pure NumPy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def top_patches(importance: np.ndarray, share: float = 0.1) -> np.ndarray:
    """Bool mask (shaped like ``importance``) of the ``share`` most important patches.

    Counts ``max(1, round(share * n))`` of the n finite values; ties go to the lower patch index.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    values = np.asarray(importance, dtype=np.float64).ravel()
    finite = np.flatnonzero(np.isfinite(values))
    k = max(1, int(math.floor(share * finite.size + 0.5))) if finite.size else 0
    order = finite[np.argsort(-values[finite], kind="stable")][:k]
    mask = np.zeros(values.size, dtype=bool)
    mask[order] = True
    return mask.reshape(np.shape(importance))


def kept_evidence(importance_before: np.ndarray, kept: np.ndarray, share: float = 0.1) -> float:
    """Share of the top-``share`` patches by ``importance_before`` that ``kept`` (bool, same shape) keeps."""
    top = top_patches(importance_before, share)
    kept = np.asarray(kept, dtype=bool).reshape(top.shape)
    count = int(top.sum())
    return float((top & kept).sum() / count) if count else float("nan")


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (as Spearman's rho needs)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    sorted_values = values[order]
    i = 0
    while i < values.size:
        j = i
        while j + 1 < values.size and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation over the positions where both are finite (NaN if undefined)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    both = np.isfinite(a) & np.isfinite(b)
    if both.sum() < 2:
        return float("nan")
    ra, rb = rank(a[both]), rank(b[both])
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    if denominator == 0:
        return 1.0 if np.array_equal(a[both], b[both]) else float("nan")
    return float((ra * rb).sum() / denominator)


@dataclass(frozen=True)
class EvidenceReport:
    """How slimming treated the evidence of one image.

    Attributes:
        kept_evidence: share of the unslimmed model's top patches that slimming kept.
        spearman: rank correlation of per-patch importance before / after (NaN without an after map).
        share: the top share used (0.1: top 10 %).
        top_count: how many patches that top holds.
        top_kept: how many of them were kept.
        block: where "kept" was read (None: after the last block).
        top_patch_ids: the top patches' ids (raster order).
        dropped_top_patch_ids: those the slimming dropped.
    """

    kept_evidence: float
    spearman: float
    share: float
    top_count: int
    top_kept: int
    block: int | None
    top_patch_ids: tuple[int, ...]
    dropped_top_patch_ids: tuple[int, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top_patch_ids"] = list(self.top_patch_ids)
        d["dropped_top_patch_ids"] = list(self.dropped_top_patch_ids)
        return d


def evidence_report(before: np.ndarray, after: np.ndarray | None, trace, share: float = 0.1,
                    block: int | None = None, index: int = 0) -> EvidenceReport:
    """Kept evidence and rank agreement for one image of a slimmed Trace.

    Args:
        before: ``[rows, cols]`` patch importance of the unslimmed model (e.g. an attribution grid).
        after: ``[rows, cols]`` patch importance of the slimmed model, or None. NaN (a patch the slimmed
            model never saw) counts as 0: the rank agreement includes what slimming took away.
        trace: the slimmed model's :class:`~patchslim.trace.Trace` (which patches it kept).
        share: the top share of patches that counts as "the evidence".
        block: read "kept" entering this block (None: after the last block).
        index: which image of the trace's batch.
    """
    kept = trace.patch_mask(block)[index].cpu().numpy().reshape(np.shape(before))
    top = top_patches(before, share)
    ids = np.flatnonzero(top.ravel())
    lost = ids[~kept.ravel()[ids]]
    return EvidenceReport(
        kept_evidence=kept_evidence(before, kept, share),
        spearman=spearman(before, np.nan_to_num(after, nan=0.0)) if after is not None else float("nan"),
        share=float(share),
        top_count=int(ids.size),
        top_kept=int(ids.size - lost.size),
        block=block,
        top_patch_ids=tuple(int(i) for i in ids),
        dropped_top_patch_ids=tuple(int(i) for i in lost),
    )
