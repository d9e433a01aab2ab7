"""``uniform``: every k-th patch in raster order (survey eq. 9), evenly spaced indices for any rho.

Eq. 9 of the survey keeps :math:`\\mathcal{P}' = \\{x_i \\mid i \\equiv 0 \\pmod k\\}` with the patches numbered
:math:`x_1 \\dots x_N`. In 0-based ids that is ``k-1, 2k-1, 3k-1, ...`` (``floor(N / k)`` patches); with
``indexing="zero"`` it is read 0-based instead, ``0, k, 2k, ...`` (``ceil(N / k)`` patches, the first patch
included). Both are eq. 9, the difference is only where the numbering starts.

When 1/rho is an integer k this is exactly eq. 9. For any other rho the K = round(rho M) kept positions are
spread evenly over the M current tokens: position ``floor((j + 1) M / K) - 1`` (survey numbering) or
``floor(j M / K)`` (zero numbering), ``j = 0 .. K-1``, which reduce to eq. 9 when M / K is an integer.
The method ignores the image (static); it acts at the input by default, and on the current tokens in
their current (raster) order when a plan puts it later.

Reference: the survey, section 3.1.1, eq. (9).
"""

from __future__ import annotations

import torch

from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.tokens import TokenState, keep_tokens


def integer_stride(keep_ratio: float) -> int | None:
    """k when ``1 / keep_ratio`` is an integer (rho = 1/k), else None."""
    k = round(1.0 / keep_ratio)
    return k if abs(1.0 / keep_ratio - k) < 1e-9 else None


def uniform_positions(count: int, keep_ratio: float, target: int, indexing: str = "survey") -> torch.Tensor:
    """The positions eq. 9 keeps among ``count`` tokens in raster order.

    Args:
        count: M, the current number of non-prefix tokens.
        keep_ratio: rho.
        target: round(rho M), used when 1/rho is not an integer.
        indexing: ``"survey"`` (patches numbered from 1, as printed) or ``"zero"`` (numbered from 0).

    Returns:
        ``[K]`` int64 ascending positions.
    """
    k = integer_stride(keep_ratio)
    start = 0 if indexing == "zero" else 1
    if k is not None:
        # i = start, start+1, ... ; keep i ≡ 0 (mod k); position = i - start.
        first = (-start) % k
        positions = torch.arange(first, count, k) if first < count else torch.empty(0, dtype=torch.long)
        if positions.numel() == 0:  # fewer than k tokens (survey numbering): keep the last one
            positions = torch.tensor([count - 1])
        return positions
    j = torch.arange(target, dtype=torch.float64)
    if indexing == "zero":
        return torch.floor(j * count / target).long()
    return (torch.floor((j + 1) * count / target) - 1).long()


@register
class UniformDownsampling(SlimMethod):
    name = "uniform"
    windowed = True
    summary = "Every k-th patch in raster order (eq. 9); evenly spaced for any rho. Ignores the image."
    explanation = (
        "The simplest static rule: number the patches row by row and keep every k-th one, so rho = 1/k. "
        "For a rho that is not 1/k the kept indices are spread evenly. The same patches are kept for every "
        "image, so the cost is zero and the result is predictable, but an object that falls between the "
        "kept columns is simply not seen. On a square grid, k = 2 keeps every other column (stripes), "
        "because the row length is even; compare with `grid`, which thins rows and columns alike."
    )
    equation = (r"\mathcal{P}' = \{\mathbf{x}_i \mid i \equiv 0 \pmod{k},\ \mathbf{x}_i \in \mathcal{P}\},"
                r"\quad k = 1/\rho")
    reference = "Survey section 3.1.1, eq. (9)"
    options = (
        OptionSpec("indexing", "str", "survey",
                   "number patches from 1 as the survey prints eq. 9 (keeps x_k, x_2k, ...) or from 0 "
                   "(keeps the first patch)", choices=("survey", "zero")),
    )

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        m = state.count
        if ctx.target >= m and integer_stride(ctx.keep_ratio) in (None, 1):
            return Reduction(state)
        positions = uniform_positions(m, ctx.keep_ratio, ctx.target, ctx.options.get("indexing", "survey"))
        index = positions.to(state.tokens.device).unsqueeze(0).expand(state.tokens.shape[0], -1)
        return Reduction(keep_tokens(state, index))
