"""``lowrank``: r synthetic tokens from the SVD of the patch-token matrix (survey eq. 11).

Per image, the M non-prefix tokens form ``X`` ``[M, C]`` with the SVD ``X = U Sigma V^T`` (eq. 11). The
method replaces the M tokens by the r tokens ``T = U_r^T X`` ``[r, C]`` (r = round(rho M)); prefix tokens
stay. ``U_r^T X`` and ``Sigma_r V_r^T`` are the same matrix (``U^T U = I``), so only ``U`` is needed. This
module gets it from the eigendecomposition of the Gram matrix ``X X^T = U Sigma^2 U^T`` (``[M, M]``): the
*full* ``U``, so every r up to M is defined even when M > C (DeiT-Ti: 196 patches, 192 channels) and r = M
reconstructs the tokens exactly: ``U_M T = U U^T X = X`` (rows of T past rank(X) are zero). On a CPU this is
10-20x faster than LAPACK's SVD of X, which also computes the ``V`` the method never uses (measured: DeiT-S
tokens, batch 32: 47 ms vs 1.0-1.3 s); the SVD is the fallback if the eigensolver fails. Token j's loadings,
row j of ``U_r^T``, say which patches it stands for: they are the provenance (``Provenance.weights``,
signed; show ``|U_r|``).

The tokens are not patches: a ViT never saw such inputs, so expect accuracy to suffer more than with
pruning at the same rho; the point of the method is to show what a low-rank summary keeps.
Each singular vector's sign is fixed so that its loadings sum to a non-negative number (the first token
is then a positively weighted blend of patches), which makes results the same on every backend.
Tokens carry no sizes afterwards (each synthetic token counts as one in attention).
With ``keep_ratio = 1`` nothing is projected (keep everything gives exactly the unslimmed model).

Reference: the survey, section 3.1.3, eq. (11).
"""

from __future__ import annotations

import torch

from patchslim.methods.base import Reduction, SlimMethod, StageContext, register
from patchslim.tokens import TokenState, replace_patches


def lowrank_tokens(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``rank`` SVD tokens of each image's token matrix.

    Args:
        x: ``[B, M, C]`` tokens.
        rank: r in ``[1, M]``.

    Returns:
        (tokens ``[B, r, C]`` = ``U_r^T X``, loadings ``[B, r, M]`` = ``U_r^T``, singular values
        ``[B, min(M, C)]``), float32.
    """
    x32 = x.float()
    if x32.device.type == "mps":  # no eigensolver / SVD kernels on Apple GPUs: decompose on the CPU
        tokens, loadings, singular = lowrank_tokens(x32.cpu(), rank)
        return tokens.to(x.device), loadings.to(x.device), singular.to(x.device)
    m, c = x32.shape[-2:]
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(x32 @ x32.transpose(-2, -1))  # ascending
        u = eigenvectors.flip(-1)  # [B, M, M], by decreasing singular value
        singular = eigenvalues.flip(-1)[..., : min(m, c)].clamp_min(0).sqrt()
    except torch.linalg.LinAlgError:  # the eigensolver did not converge: the SVD is slower but robust
        u, singular, _ = torch.linalg.svd(x32, full_matrices=True)
    u_r = u[..., :rank]  # [B, M, r]
    sign = torch.where(u_r.sum(1, keepdim=True) < 0, -1.0, 1.0)
    u_r = u_r * sign
    loadings = u_r.transpose(1, 2)  # [B, r, M]
    return loadings @ x32, loadings, singular


def lowrank_macs(rows: int, cols: int, rank: int) -> float:
    """Analytic multiply-adds of :func:`lowrank_tokens` for one ``rows x cols`` token matrix.

    The Gram matrix ``X X^T`` costs ``M^2 C``; a symmetric eigendecomposition with eigenvectors is about
    ``9 M^3`` flops (Golub & Van Loan, symmetric QR algorithm), i.e. ``4.5 M^3`` multiply-adds; the
    projection ``U_r^T X`` adds ``r M C``. An estimate of the order of magnitude, not a measurement of LAPACK.
    """
    return rows * rows * cols + 4.5 * rows ** 3 + rank * rows * cols


@register
class LowRankApproximation(SlimMethod):
    name = "lowrank"
    windowed = False
    window_reason = ("its r synthetic tokens are mixtures of all patches and have no place in a window grid")
    summary = "Replace the N patch tokens by r synthetic tokens U_r^T X from their SVD (eq. 11)."
    explanation = (
        "Stack the patch tokens into a matrix X (patches x channels) and take its singular value "
        "decomposition. The top r singular directions hold most of the matrix's energy; the r new tokens "
        "U_r^T X are weighted blends of all patches, with the weights (loadings) in U_r. So unlike every "
        "other method nothing is kept or dropped: each new token stands for a little of every patch, and "
        "the picture to look at is its loading map |U_r|. The network was trained on patches, not on such "
        "blends, which is why this summary costs accuracy."
    )
    equation = (r"\mathbf{X} \approx \mathbf{U}_r \mathbf{\Sigma}_r \mathbf{V}_r^\top,\qquad "
                r"\mathbf{X}' = \mathbf{U}_r^\top \mathbf{X} = \mathbf{\Sigma}_r \mathbf{V}_r^\top \in \mathbb{R}^{r \times C}")
    reference = "Survey section 3.1.3, eq. (11)"
    merges = True  # tokens stand for combinations of patches (signed loadings), not single patches
    input_dependent = True

    def reduce(self, state: TokenState, ctx: StageContext) -> Reduction:
        m = state.count
        rank = ctx.target
        if rank >= m:
            return Reduction(state)
        tokens, loadings, _ = lowrank_tokens(state.patches, rank)
        # Per patch: the share of its unit vector e_i inside span(U_r) (its leverage, in [0, 1]); the
        # patches the r tokens represent best score highest.
        leverage = (loadings ** 2).sum(1)
        reduced = replace_patches(state, tokens, loadings, sizes=None)
        return Reduction(reduced, scores=leverage,
                         selection_macs=lowrank_macs(m, state.tokens.shape[-1], rank))
