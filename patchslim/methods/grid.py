"""``grid``: an evenly spread G x G grid of patches (survey eq. 10).

Eq. 10 keeps :math:`\\{x_{i,j} \\mid i = mP,\\ j = nP,\\ 0 \\le m, n < G\\}` on the patch grid, a lattice with
stride P. Here rho sets G: ``G = round(sqrt(rho N))`` on a square grid, clamped to ``[1, side]``; on an
R x C grid rows and columns are thinned alike, ``G_r = round(sqrt(rho) R)``, ``G_c = round(sqrt(rho) C)``.
The kept rows are ``floor(m R / G_r)`` (eq. 10's ``i = mP`` with P = R / G, which need not be an integer),
or the centres of G equal bands with ``anchor="center"``. Only G^2 counts are possible, so the rho
reached (``G_r G_c / N``, reported by ``Trace.keep_ratio``) is the nearest such count, not rho itself:
on 14 x 14 patches rho = 0.5 gives G = 10 and rho = 0.51.

Grid positions refer to the full patch grid, so the method needs every patch still present (it acts at
the input by default; a plan may put it before a later block as long as no earlier stage pruned).

Reference: the survey, section 3.1.2, eq. (10).
"""

from __future__ import annotations

import math

import torch

from patchslim.errors import PlanError
from patchslim.methods.base import OptionSpec, Reduction, SlimMethod, StageContext, register
from patchslim.tokens import TokenState, keep_tokens


def grid_shape(keep_ratio: float, grid_size: tuple[int, int]) -> tuple[int, int]:
    """(G_r, G_c): kept rows and columns for ``keep_ratio`` on an R x C patch grid."""
    rows, cols = grid_size
    if rows == cols:
        g = min(rows, max(1, int(math.sqrt(keep_ratio * rows * cols) + 0.5)))
        return g, g
    scale = math.sqrt(keep_ratio)
    return (min(rows, max(1, int(scale * rows + 0.5))), min(cols, max(1, int(scale * cols + 0.5))))


def spread(count: int, size: int, anchor: str = "corner") -> torch.Tensor:
    """``count`` evenly spread indices in ``range(size)``: eq. 10's ``mP`` (corner) or band centres."""
    m = torch.arange(count, dtype=torch.float64)
    offset = 0.5 if anchor == "center" else 0.0
    return torch.floor((m + offset) * size / count).long()


def grid_patch_ids(keep_ratio: float, grid_size: tuple[int, int], anchor: str = "corner") -> torch.Tensor:
    """``[G_r * G_c]`` ascending raster ids of the patches eq. 10 keeps."""
    g_rows, g_cols = grid_shape(keep_ratio, grid_size)
    rows = spread(g_rows, grid_size[0], anchor)
    cols = spread(g_cols, grid_size[1], anchor)
    return (rows[:, None] * grid_size[1] + cols[None, :]).reshape(-1)


@register
class GridSelection(SlimMethod):
    name = "grid"
    windowed = False
    window_reason = ("it resamples the whole input to a G x G grid, which no longer matches the model's "
                     "windows and stages")
    summary = "An evenly spread G x G lattice of patches (eq. 10); rho sets G. Ignores the image."
    explanation = (
        "Keep the patches on a regular lattice: every P-th row and every P-th column. Unlike `uniform`, which "
        "thins the raster sequence and on an even-width grid keeps whole columns, the grid thins rows and "
        "columns alike, so what remains is spread evenly over the image. Only square numbers of patches are "
        "possible (G x G), so the rho reached is the nearest one, and it is shown next to the rho asked for."
    )
    equation = (r"\mathcal{P}' = \{\mathbf{x}_{i,j} \mid i = mP,\ j = nP,\ 0 \le m, n < G\},"
                r"\quad G = \mathrm{round}\sqrt{\rho N}")
    reference = "Survey section 3.1.2, eq. (10)"
    exact_count = False  # G x G patches: the nearest square count
    options = (
        OptionSpec("anchor", "str", "corner",
                   "where the lattice starts: at row/column 0 as eq. 10 prints it (i = mP), or centred in "
                   "G equal bands", choices=("corner", "center")),
    )

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        n = ctx.num_patches
        prov = state.provenance
        if state.count != n or not prov.is_plain:
            raise PlanError(
                f"method 'grid' selects positions on the full {ctx.grid_size[0]}x{ctx.grid_size[1]} patch grid, "
                f"but only {state.count} of {n} patches (or merged tokens) reach block {ctx.block}; put the "
                "grid stage first"
            )
        wanted = grid_patch_ids(ctx.keep_ratio, ctx.grid_size, ctx.options.get("anchor", "corner"))
        if wanted.numel() == n:
            return Reduction(state)
        ids = prov.ids
        wanted = wanted.to(ids.device)
        # Position of each original patch id among the current tokens (a permutation while nothing is gone).
        position_of = torch.empty_like(ids).scatter_(
            1, ids, torch.arange(n, device=ids.device).unsqueeze(0).expand_as(ids).contiguous())
        index = position_of[:, wanted].to(state.tokens.device)
        return Reduction(keep_tokens(state, index))
