"""Pseudo-inverse solvers of the memory, all differentiable (the equations are in `larimar.memory`).

    ridge_lstsq      closed-form ridge least squares: Cholesky on the smaller Gram matrix, factored in float64, one
                     step of iterative refinement (the default solver)
    ben_israel_pinv  the paper's Ben-Israel-Cohen (Newton-Schulz) iteration X <- X (2I - A X), X0 = A^T / ||A||_F^2
    solve_weights    the addressing solve w = y X^+ with the configured solver ("ridge", "pinv", "ben_israel")
    one_fact_read    the read of a memory holding one item: (q . r / |r|^2) r
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOLVERS = ("ridge", "pinv", "ben_israel")

def cholesky(A: Tensor) -> Tensor:
    """Cholesky factor of a symmetric positive definite A (B, n, n), adding jitter if rounding needs it."""
    L, info = torch.linalg.cholesky_ex(A)  # the common case: no jitter, no extra tensors
    if not bool((info > 0).any()):
        return L
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    scale = A.diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(1e-300)
    jitter = 1e-14
    for _ in range(7):
        L, info = torch.linalg.cholesky_ex(A + jitter * scale * eye)
        if not bool((info > 0).any()):
            return L
        jitter *= 100
    raise torch.linalg.LinAlgError("Cholesky failed on a Gram matrix even with jitter (non-finite inputs?)")


def plus_diag(G: Tensor, lam: Tensor | float) -> Tensor:
    """G + lam I for G (B, n, n) and lam a float or a tensor broadcastable to (B, 1, 1), without an eye matrix."""
    Gl = G.clone()  # (B, n, n)
    if isinstance(lam, Tensor) and lam.dim() >= 2:
        lam = lam.squeeze(-1)  # (B, 1): broadcasts against the diagonal (B, n)
    Gl.diagonal(dim1=-2, dim2=-1).add_(lam)
    return Gl


_SMALL_GRAM = 64
"""Up to this size a Gram system is solved through its explicit inverse (cholesky_inverse): one small GEMM per
right-hand side instead of two batched triangular solves, 3-4x faster on batches of small systems, same accuracy
for these symmetric positive definite matrices (both err by about cond x eps)."""


def chol_solve(L: Tensor, rhs: Tensor) -> Tensor:
    """x = A^-1 rhs from the Cholesky factor L (B, n, n) of A; rhs (B, n, Q)."""
    if L.shape[-1] <= _SMALL_GRAM:
        return torch.cholesky_inverse(L) @ rhs
    return torch.cholesky_solve(rhs, L)


def refined_solve(G: Tensor, lam: Tensor | float, rhs: Tensor) -> Tensor:
    """x = (G + lam I)^-1 rhs plus one step of iterated Tikhonov, x += (G + lam I)^-1 (rhs - G x).

    G (B, n, n) is a float64 Gram matrix without its ridge, rhs (B, n, Q) float64; one Cholesky factor serves
    both solves, and the residual is taken in the Gram space (n x Q), never against the rows themselves.
    """
    L = cholesky(plus_diag(G, lam))  # (B, n, n)
    if L.shape[-1] <= _SMALL_GRAM:
        Ginv = torch.cholesky_inverse(L)  # (B, n, n)
        x = Ginv @ rhs  # (B, n, Q)
        return x + Ginv @ (rhs - G @ x)
    x = torch.cholesky_solve(rhs, L)  # (B, n, Q)
    return x + torch.cholesky_solve(rhs - G @ x, L)


def gram_trace(G: Tensor) -> Tensor:
    """trace(G) (B, 1, 1) of a float64 Gram matrix G (B, n, n), detached: the squared Frobenius norm of its rows."""
    return G.detach().diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]


def ridge_solve(Y: Tensor, X: Tensor, lam: Tensor | float, rel: float = 0.0) -> Tensor:
    """`ridge_lstsq` with the ridge lam + rel ||X||_F^2 (the norm read off the Gram matrix's trace)."""
    dtype = torch.promote_types(Y.dtype, X.dtype)
    X = X.to(dtype)
    X64, Y64 = X.double(), Y.double()  # no copies when already float64
    R, C = X.shape[-2], X.shape[-1]
    if R <= C:  # dual, (R, R) Gram: w = Y X^T (X X^T + lam I)^-1
        G = X64 @ X64.transpose(-1, -2)  # (B, R, R)
        lam = lam + rel * gram_trace(G) if rel else lam
        x = refined_solve(G, lam, X64 @ Y64.transpose(-1, -2))  # (B, R, Q)
        return x.transpose(-1, -2).to(dtype)  # (B, Q, R)
    # primal, push-through identity on the (C, C) Gram: w = Y (X^T X + lam I)^-1 X^T
    G = X64.transpose(-1, -2) @ X64  # (B, C, C)
    lam = lam + rel * gram_trace(G) if rel else lam
    V = refined_solve(G, lam, Y64.transpose(-1, -2))  # (B, C, Q)
    return V.transpose(-1, -2).to(dtype) @ X.transpose(-1, -2)  # (B, Q, R)


def ridge_lstsq(Y: Tensor, X: Tensor, lam: Tensor | float) -> Tensor:
    """Ridge least squares weights w (B, Q, R) with w X ~= Y, regularised by lam ||w||^2.

    The Gram matrix of the smaller side is formed and factored in float64 (the ridge sits above its rounding
    error): (R, R) when R <= C (dual), else (C, C) (primal, push-through), so any number of rows R works. The
    factor is used twice: a ridge solve, then one step of iterative refinement on the residual (iterated
    Tikhonov), which shrinks the ridge's bias from lam / s^2 to (lam / s^2)^2 for a singular value s while
    directions far below the ridge (rounding noise) stay suppressed. The residual Y - w X is taken through the
    Gram matrix G, X (Y - w X)^T = X Y^T - G w^T (dual) or (Y - w X) = Y - V G with w = V X^T (primal), so X is
    multiplied once on each side and the refinement costs only Gram-sized products.

    Args:
        Y: targets (B, Q, C).
        X: rows to combine (B, R, C).
        lam: ridge, a float or a tensor broadcastable to (B, 1, 1).
    """
    if isinstance(lam, Tensor):
        lam = lam.to(device=Y.device, dtype=torch.float64)
    return ridge_solve(Y, X, lam)


def ben_israel_pinv(A: Tensor, iters: int = 60) -> Tensor:
    """Moore-Penrose pseudo-inverse (B, n, m) of A (B, m, n) by the Ben-Israel-Cohen iteration, in float64.

    X0 = A^T / ||A||_F^2 satisfies 0 < alpha < 2 / sigma_max^2, so the iteration converges for any A: a
    singular value s is inverted after about log2(||A||_F^2 / s^2) steps; far smaller ones (rounding noise)
    stay near zero, which acts as the truncation of an exact pseudo-inverse.
    """
    A64 = A.double()
    alpha = 1.0 / (A64.pow(2).sum(dim=(-2, -1), keepdim=True)).clamp_min(1e-300)  # (B, 1, 1)
    X = alpha * A64.transpose(-1, -2)  # (B, n, m)
    for _ in range(iters):
        X = 2 * X - X @ A64 @ X
    return X.to(A.dtype)


def one_fact_read(Zq: Tensor, R: Tensor) -> Tensor:
    """The read of a memory holding one item r at query z_q: the projection (z_q . r / |r|^2) r.

    Args:
        Zq: queries (..., C).
        R: the items' read-outs (..., C), broadcastable with Zq.

    Returns:
        (..., C) in the dtype of the product.
    """
    scale = (Zq * R).sum(-1, keepdim=True) / R.pow(2).sum(-1, keepdim=True).clamp_min(1e-30)  # (..., 1)
    return scale * R


def effective_ridge(dtype: torch.dtype, rel_ridge: float) -> float:
    """The relative ridge actually used, on squared singular values (times ||X||_F^2).

    Two floors: 10 x float64's epsilon, the rounding of the float64 Gram matrix; and (10 x eps)^2 of the
    matrix's own dtype, since its entries carry a relative rounding of eps, so singular values below about
    10 eps ||X||_F are noise (float32: 1.4e-12; bfloat16: 6.1e-3).
    """
    return max(rel_ridge, _ridge_floor(dtype))


@functools.cache
def _ridge_floor(dtype: torch.dtype) -> float:
    """max(10 x float64's epsilon, (10 x eps of dtype)^2), see `effective_ridge`."""
    return max(10 * torch.finfo(torch.float64).eps, (10 * torch.finfo(dtype).eps) ** 2)


def solve_weights(Y: Tensor, X: Tensor, solver: str, rel_ridge: float, iters: int | None = None) -> Tensor:
    """Least-squares weights w (B, Q, R) with w X ~= Y, i.e. w = Y X^+, by the chosen solver.

    All three solvers drop directions of X below the rounding noise of X's dtype in the same way: the
    ridge is relative (`effective_ridge`), pinv's rtol is its square root, and Ben-Israel runs just enough
    steps to invert singular values above that level.
    """
    rel = effective_ridge(X.dtype, rel_ridge)
    if solver == "ridge":  # lam = rel ||X||_F^2 + 1e-300, the norm read off the Gram matrix's trace
        return ridge_solve(Y, X, 1e-300, rel)
    dtype = torch.promote_types(Y.dtype, X.dtype)
    if solver == "pinv":
        return (Y.double() @ torch.linalg.pinv(X.double(), rtol=rel**0.5)).to(dtype)
    if solver == "ben_israel":
        if iters is None:  # invert singular values s with s^2 >= rel * ||X||_F^2; 8 more steps to converge
            iters = int(math.ceil(math.log2(1.0 / rel))) + 8
        return (Y.double() @ ben_israel_pinv(X, iters).double()).to(dtype)
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


# ----------------------------------------------------------------------------------------------------------
# The memory module (batched, differentiable; used for training and batch editing)
