"""Kanerva-style generative episodic memory (pure torch; no model code).

Notation (METHOD.md section 2): K slots, C code size, an episode Z of N encoded items (N, C), addressing
weights W (N, K). Every function is batched over B independent memories and follows the inputs' device.

    keys     W = Z M0^+                      addressing against the learned prior mean M0 (K, C)
    write    M = W^T (W W^T + s2 I)^-1 Z     one-shot least squares (ridge s2 -> 0 gives W^+ Z)
    read     w = z M^+ ,  z_read = w M       deterministic; during training w ~ N(w, sigma_w^2)
    generate w ~ N(0, I), z = w M

With exact pseudo-inverses and N <= K, a deterministic read is the orthogonal projection of the query on
span(Z). Sequential writing and exact forgetting (paper Eq. 3-4) use recursive least squares in Kalman-gain
form with the row covariance U (K, K) kept in float64 (see `ItemMemory`)::

    S = s2 / alpha I + W U W^T ;  G = U W^T S^-1 ;  M <- M + G (Z - W M) ;  U <- U - G W U

alpha = +1 writes, alpha = -1 forgets. Starting from M = 0, U = I, writing N items one after another gives the
same memory as one batch write with the same s2, and forgetting an item gives the memory written without it.
Keys are computed against a frozen copy of M0 and stored per item, so they are reproducible.

Pseudo-inverses are computed by one of three solvers, all differentiable:
    "ridge"       closed-form ridge least squares (Cholesky on the smaller Gram matrix, float64); default
    "pinv"        torch.linalg.pinv (SVD); the exact reference, slow
    "ben_israel"  the paper's Ben-Israel-Cohen (Newton-Schulz) iteration, X <- X (2I - A X), started at
                  X0 = A^T / ||A||_F^2, a step that cannot diverge (||A||_F^2 >= sigma_max^2)
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

SOLVERS = ("ridge", "pinv", "ben_israel")
READ_MODES = ("keyed", "memory", "nearest")
"""How a memory of items is read for a query: `ItemMemory.read_keyed` at the nearest item (default), `ItemMemory.read`
with the query's latent (the paper), or the nearest item's stored latent (an ablation that bypasses the memory)."""


@dataclass
class MemoryConfig:
    """Shape and numerics of an episodic memory.

    Attributes:
        num_slots: K, number of memory rows.
        code_size: C, size of a latent code.
        obs_noise_var: s2, the explicit ridge of every write (absolute, in latent units squared). It must stay
            the same between a write and the forget that undoes it.
        read_ridge: relative ridge of the addressing solves (times the squared Frobenius norm of the matrix);
            raised to the rounding level of the matrix's dtype when smaller (`effective_ridge`).
        solver: "ridge" (default), "pinv" or "ben_israel".
        ben_israel_iters: iterations of the Ben-Israel-Cohen solver (None: enough for the ridge level).
        init_read_std: initial sigma_w of the sampled read (one learned value per slot).
    """

    num_slots: int = 512
    code_size: int = 384
    obs_noise_var: float = 1.0
    read_ridge: float = 1e-9
    solver: str = "ridge"
    ben_israel_iters: int | None = None
    init_read_std: float = 0.05

    def __post_init__(self) -> None:
        if self.num_slots < 1 or self.code_size < 1:
            raise ValueError(f"num_slots and code_size must be >= 1, got {self.num_slots}, {self.code_size}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not self.obs_noise_var > 0:
            raise ValueError(f"obs_noise_var must be > 0 (an explicit ridge), got {self.obs_noise_var}")
        if self.read_ridge < 0:
            raise ValueError(f"read_ridge must be >= 0, got {self.read_ridge}")


# ----------------------------------------------------------------------------------------------------------
# Linear algebra: least squares  w = argmin ||Y - w X||^2 + lam ||w||^2  for X (B, R, C), Y (B, Q, C)


def _cholesky(A: Tensor) -> Tensor:
    """Cholesky factor of a symmetric positive definite A (B, n, n), adding jitter if rounding needs it."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    scale = A.diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(1e-300)
    jitter = 0.0
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(A + jitter * scale * eye)
        if not bool((info > 0).any()):
            return L
        jitter = 1e-14 if jitter == 0.0 else jitter * 100
    raise torch.linalg.LinAlgError("Cholesky failed on a Gram matrix even with jitter (non-finite inputs?)")


def _gram_solve(A: Tensor, rhs: Tensor) -> Tensor:
    """Solves A x = rhs for symmetric positive definite A (B, n, n) by Cholesky."""
    return torch.cholesky_solve(rhs, _cholesky(A))


def ridge_lstsq(Y: Tensor, X: Tensor, lam: Tensor | float) -> Tensor:
    """Ridge least squares weights w (B, Q, R) with w X ~= Y, regularised by lam ||w||^2.

    The Gram matrix is formed and factored in float64 (the ridge sits above its rounding error), and used twice: a ridge solve, then one step of iterative refinement on the residual (iterated
    Tikhonov), which shrinks the ridge's bias from lam / s^2 to (lam / s^2)^2 for a singular value s while
    directions far below the ridge (rounding noise) stay suppressed.

    Args:
        Y: targets (B, Q, C).
        X: rows to combine (B, R, C).
        lam: ridge, a float or a tensor broadcastable to (B, 1, 1).
    """
    dtype = torch.promote_types(Y.dtype, X.dtype)
    Y, X = Y.to(dtype), X.to(dtype)
    lam = torch.as_tensor(lam, dtype=torch.float64, device=Y.device)
    R, C = X.shape[-2], X.shape[-1]
    Xt = X.transpose(-1, -2)
    if R <= C:  # (R, R) Gram: w = Y X^T (X X^T + lam I)^-1
        L = _cholesky(X.double() @ Xt.double() + lam * torch.eye(R, dtype=torch.float64, device=Y.device))  # (B, R, R)

        def solve(T: Tensor) -> Tensor:  # T (B, Q, C) -> (B, Q, R)
            return torch.cholesky_solve((X @ T.transpose(-1, -2)).double(), L).transpose(-1, -2).to(dtype)

    else:  # push-through identity on the (C, C) Gram: w = Y (X^T X + lam I)^-1 X^T
        L = _cholesky(Xt.double() @ X.double() + lam * torch.eye(C, dtype=torch.float64, device=Y.device))  # (B, C, C)

        def solve(T: Tensor) -> Tensor:
            V = torch.cholesky_solve(T.transpose(-1, -2).double(), L).transpose(-1, -2)  # (B, Q, C)
            return V.to(dtype) @ Xt  # (B, Q, R)

    w = solve(Y)
    return w + solve(Y - w @ X)  # one refinement step


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


def _sq_norm(X: Tensor) -> Tensor:
    """Squared Frobenius norm of X (B, R, C) as (B, 1, 1), float64: the trace of its Gram matrix."""
    return X.detach().double().pow(2).sum(dim=(-2, -1))[:, None, None]


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
    return max(rel_ridge, 10 * torch.finfo(torch.float64).eps, (10 * torch.finfo(dtype).eps) ** 2)


def solve_weights(Y: Tensor, X: Tensor, solver: str, rel_ridge: float, iters: int | None = None) -> Tensor:
    """Least-squares weights w (B, Q, R) with w X ~= Y, i.e. w = Y X^+, by the chosen solver.

    All three solvers drop directions of X below the rounding noise of X's dtype in the same way: the
    ridge is relative (`effective_ridge`), pinv's rtol is its square root, and Ben-Israel runs just enough
    steps to invert singular values above that level.
    """
    rel = effective_ridge(X.dtype, rel_ridge)
    if solver == "ridge":
        return ridge_lstsq(Y, X, rel * _sq_norm(X) + 1e-300)
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


class EpisodicMemory(nn.Module):
    """A batch of B Kanerva memories sharing a learned prior mean M0 (K, C) and a per-slot read noise.

    Args:
        config: shapes and numerics.
    """

    def __init__(self, config: MemoryConfig) -> None:
        super().__init__()
        self.config = config
        K, C = config.num_slots, config.code_size
        self.M0 = nn.Parameter(torch.eye(K, C))  # (K, C) prior mean; eye works well (METHOD.md)
        self.log_read_std = nn.Parameter(torch.full((K,), float(torch.tensor(config.init_read_std).log())))

    # -- checks --------------------------------------------------------------------------------------------
    def _check(self, Z: Tensor, name: str) -> None:
        C = self.config.code_size
        if not isinstance(Z, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (B, N, {C}), got {type(Z).__name__}")
        if Z.dim() != 3 or Z.shape[-1] != C:
            raise ValueError(f"{name} must have shape (B, N, {C}), got {tuple(Z.shape)}")
        if not Z.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {Z.dtype}")
        if Z.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one item (N >= 1)")

    def _check_memory(self, M: Tensor) -> None:
        K, C = self.config.num_slots, self.config.code_size
        if not isinstance(M, Tensor) or M.dim() != 3 or tuple(M.shape[1:]) != (K, C):
            shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
            raise ValueError(f"memory must have shape (B, {K}, {C}), got {shape}")

    # -- operations ----------------------------------------------------------------------------------------
    def address(self, Z: Tensor, M: Tensor | None = None) -> Tensor:
        """Addressing weights W = Z M^+ (B, N, K) for Z (B, N, C); M defaults to the prior mean M0."""
        self._check(Z, "Z")
        if M is None:
            M = self.M0.to(Z.dtype)[None]  # (1, K, C): one Gram factorisation shared by the batch
        cfg = self.config
        return solve_weights(Z, M, cfg.solver, cfg.read_ridge, cfg.ben_israel_iters)

    def write(self, Z: Tensor, noise_std: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """One-shot batch write of an episode.

        Args:
            Z: items (B, N, C).
            noise_std: std of the write noise xi added to Z (training only; editing uses 0).
            generator: random generator for the noise.

        Returns:
            M (B, K, C) = W^T (W W^T + s2 I)^-1 Z with W = Z M0^+ (ridge solver), or W^+ Z (other solvers).
        """
        W, A = self._write_factors(Z, noise_std, generator)
        return W.transpose(-1, -2) @ A  # (B, K, C)

    def _write_factors(
        self, Z: Tensor, noise_std: float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Factors of a batch write, M = W^T A: keys W (B, N, K) and A (B, N, C)."""
        self._check(Z, "Z")
        if noise_std > 0:
            Z = Z + noise_std * torch.randn(Z.shape, generator=generator, dtype=Z.dtype, device=Z.device)
        W = self.address(Z)  # (B, N, K)
        cfg = self.config
        if cfg.solver == "ridge":
            # A = (W W^T + s2 I)^-1 Z: an N x N solve; M = W^T A is the posterior mean RLS reaches too
            N = W.shape[1]
            G = W.double() @ W.double().transpose(-1, -2)  # (B, N, N)
            G = G + cfg.obs_noise_var * torch.eye(N, dtype=torch.float64, device=Z.device)
            return W, _gram_solve(G, Z.double()).to(Z.dtype)
        # exact least squares M = W^+ Z = W^T (W W^T)^+ Z
        G = W @ W.transpose(-1, -2)  # (B, N, N)
        Gp = torch.linalg.pinv(G.double()) if cfg.solver == "pinv" else ben_israel_pinv(G)
        return W, (Gp.double() @ Z.double()).to(Z.dtype)

    def write_read(
        self,
        Z: Tensor,
        Zq: Tensor,
        noise_std: float = 0.0,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Writes an episode and reads it at queries, using the write's low-rank factors (fast path).

        Equals `read(write(Z), Zq)` up to the ridge: with M = W^T A, M^+ = A^+ (W^T)^+, so only N x N systems
        are solved instead of a K x K (or C x C) one per memory.

        Args:
            Z: items to write (B, N, C).
            Zq: queries (B, Q, C).
            noise_std: write noise std (training).
            sample: sample the read weights (training).
            generator: random generator.

        Returns:
            M (B, K, C), z_read (B, Q, C), w_mean (B, Q, K), w_std (B, Q, K).
        """
        self._check(Zq, "Zq")
        W, A = self._write_factors(Z, noise_std, generator)
        cfg = self.config
        # the N x N systems are small: solve them in float64 whatever the inputs' dtype
        A64, W64 = A.double(), W.double()
        u = solve_weights(Zq.double(), A64, cfg.solver, cfg.read_ridge, cfg.ben_israel_iters)  # (B, Q, N)
        w_mean = solve_weights(u, W64.transpose(-1, -2), cfg.solver, cfg.read_ridge, cfg.ben_israel_iters)
        w_mean, u = w_mean.to(Zq.dtype), u.to(Zq.dtype)  # (B, Q, K), (B, Q, N)
        M = W.transpose(-1, -2) @ A  # (B, K, C)
        w_std = self.log_read_std.exp().to(w_mean.dtype).expand_as(w_mean)  # (B, Q, K)
        if not sample:
            return M, (u @ A).to(Zq.dtype), w_mean, w_std  # w_mean M = u (W W^T)^+ W W^T A = u A
        w = w_mean + w_std * torch.randn(w_mean.shape, generator=generator, dtype=w_mean.dtype, device=Z.device)
        return M, (w @ M).to(Zq.dtype), w_mean, w_std

    def read(
        self, M: Tensor, Zq: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Reads the memory at queries Zq.

        Args:
            M: memories (B, K, C).
            Zq: queries (B, Q, C).
            sample: draw w ~ N(w_mean, sigma_w^2) (training) instead of the deterministic w_mean.
            generator: random generator for the sample.

        Returns:
            z_read (B, Q, C), w_mean (B, Q, K), w_std (B, Q, K).
        """
        self._check(Zq, "Zq")
        self._check_memory(M)
        cfg = self.config
        w_mean = solve_weights(Zq, M, cfg.solver, cfg.read_ridge, cfg.ben_israel_iters)  # (B, Q, K)
        w_std = self.log_read_std.exp().to(w_mean.dtype).expand_as(w_mean)  # (B, Q, K)
        w = w_mean
        if sample:
            w = w_mean + w_std * torch.randn(w_mean.shape, generator=generator, dtype=w.dtype, device=w.device)
        return (w @ M.to(w.dtype)).to(Zq.dtype), w_mean, w_std  # (B, Q, C)

    def generate(self, M: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Samples n latents per memory: w ~ N(0, I), z = w M. Returns (B, n, C)."""
        self._check_memory(M)
        w = torch.randn((M.shape[0], n, M.shape[1]), generator=generator, dtype=M.dtype, device=M.device)
        return w @ M  # (B, n, C)

    @staticmethod
    def kl(w_mean: Tensor, w_std: Tensor) -> Tensor:
        """KL(N(w_mean, w_std^2) || N(0, I)) summed over slots, averaged over batch and queries (scalar)."""
        var = w_std.pow(2)
        return 0.5 * (var + w_mean.pow(2) - 1.0 - var.log()).sum(-1).mean()


# ----------------------------------------------------------------------------------------------------------
# An editable memory: sequential write and exact forget, items by id


class ItemMemory:
    """One editable memory: items written one after another, each forgettable exactly by its id.

    State in float64: M (K, C) starts at 0, the row covariance U (K, K) at I. Keys are computed once per item
    against a frozen copy of the prior mean M0 and kept with the item, so forgetting undoes exactly the write.

    Args:
        memory: the module whose prior mean (frozen here) and config are used.
        device: where the state lives (default: the module's device).
    """

    def __init__(self, memory: EpisodicMemory, device: torch.device | str | None = None) -> None:
        self.memory = memory
        self.config = memory.config
        dev = torch.device(device) if device is not None else memory.M0.device
        K, C = self.config.num_slots, self.config.code_size
        self.M_ref = memory.M0.detach().to(dev, torch.float64).clone()  # (K, C) frozen reference for keys
        self.M = torch.zeros(K, C, dtype=torch.float64, device=dev)  # (K, C)
        self.U = torch.eye(K, dtype=torch.float64, device=dev)  # (K, K)
        # keys are linear in z: W = Z P with P = I M_ref^+ (C, K), factored once
        eye = torch.eye(C, dtype=torch.float64, device=dev)
        cfg = self.config
        self._key_op = solve_weights(eye[None], self.M_ref[None], cfg.solver, cfg.read_ridge, cfg.ben_israel_iters)[0]
        self._z: dict[str, Tensor] = {}  # id -> (C,) latent, in write order
        self._w: dict[str, Tensor] = {}  # id -> (K,) key

    @property
    def device(self) -> torch.device:
        return self.M.device

    @property
    def ids(self) -> list[str]:
        """Ids of the items in memory, in write order."""
        return list(self._z)

    def __len__(self) -> int:
        return len(self._z)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._z

    def latent(self, item_id: str) -> Tensor:
        """The latent (C,) written under item_id."""
        if item_id not in self._z:
            raise KeyError(f"no item with id {item_id!r} in memory ({len(self)} items)")
        return self._z[item_id]

    def keys_for(self, Z: Tensor) -> Tensor:
        """Keys W (n, K) = Z M_ref^+ of latents Z (n, C) against the frozen reference memory."""
        return Z @ self._key_op  # (n, K)

    def _update(self, W: Tensor, Z: Tensor, alpha: float) -> None:
        """Kalman-gain RLS step with keys W (n, K), items Z (n, C), alpha = +1 write / -1 forget."""
        s2 = self.config.obs_noise_var
        n = W.shape[0]
        WU = W @ self.U  # (n, K)
        S = (s2 / alpha) * torch.eye(n, dtype=torch.float64, device=self.device) + WU @ W.T  # (n, n)
        Gt = WU / S if n == 1 else torch.linalg.solve(S, WU)  # (n, K) = (U W^T S^-1)^T, U and S symmetric
        self.M = self.M + Gt.T @ (Z - W @ self.M)  # (K, C)
        self.U = self.U - Gt.T @ WU  # (K, K)
        if n > 1:  # a rank-1 update is symmetric to the bit; a block update only up to rounding
            self.U = 0.5 * (self.U + self.U.T)

    def _as_items(self, Z: Tensor) -> Tensor:
        C = self.config.code_size
        if not isinstance(Z, Tensor):
            raise ValueError(f"latents must be a torch.Tensor of shape (n, {C}), got {type(Z).__name__}")
        if Z.dim() == 1:
            Z = Z[None]
        if Z.dim() != 2 or Z.shape[-1] != C or Z.shape[0] == 0:
            raise ValueError(f"latents must have shape (n, {C}) with n >= 1, got {tuple(Z.shape)}")
        if not Z.is_floating_point():
            raise ValueError(f"latents must be floating point, got {Z.dtype}")
        Z = Z.detach().to(self.device, torch.float64)
        if not bool(torch.isfinite(Z).all()):
            raise ValueError("latents must be finite (no NaN or inf)")
        return Z

    def write(self, Z: Tensor, ids: list[str] | None = None) -> list[str]:
        """Writes latents Z (n, C) (one update for the n items) and returns their ids.

        Raises:
            ValueError: wrong shape / dtype, non-finite values, or ids that are duplicated or already used.
        """
        Z = self._as_items(Z)
        if ids is None:
            ids = [uuid.uuid4().hex[:16] for _ in range(Z.shape[0])]
        ids = [str(i) for i in ids]
        if len(ids) != Z.shape[0]:
            raise ValueError(f"got {len(ids)} ids for {Z.shape[0]} latents")
        if len(set(ids)) != len(ids) or any(i in self._z for i in ids):
            raise ValueError("ids must be unique and not already in memory")
        W = self.keys_for(Z)  # (n, K)
        self._update(W, Z, +1.0)
        for i, item_id in enumerate(ids):
            self._z[item_id] = Z[i]
            self._w[item_id] = W[i]
        return ids

    def forget(self, ids: list[str]) -> None:
        """Forgets the items with these ids exactly (alpha = -1). Unknown ids raise KeyError, changing nothing."""
        if isinstance(ids, str):
            ids = [ids]
        missing = [i for i in ids if i not in self._z]
        if missing:
            raise KeyError(f"unknown memory item id(s): {missing[:5]}")
        if len(set(ids)) != len(ids):
            raise ValueError("ids to forget must be unique")
        W = torch.stack([self._w[i] for i in ids])  # (n, K)
        Z = torch.stack([self._z[i] for i in ids])  # (n, C)
        self._update(W, Z, -1.0)
        for i in ids:
            del self._z[i], self._w[i]

    def read(self, Zq: Tensor) -> Tensor:
        """Deterministic read: z_read (Q, C) for queries Zq (Q, C), in the queries' dtype."""
        Zq_ = self._as_items(Zq)
        cfg = self.config
        w = solve_weights(Zq_[None], self.M[None], cfg.solver, cfg.read_ridge, cfg.ben_israel_iters)[0]  # (Q, K)
        return (w @ self.M).to(Zq.dtype)

    def read_keyed(self, ids: list[str], Zq: Tensor | None = None) -> Tensor:
        """Keyed read: the memory addressed with the stored keys of items ``ids``.

        The read-out r_i = w_i M (Q, C) equals the written latent z_i up to the ridge s2 (the keys span the
        written latents' space, so W M = Z in the limit s2 -> 0, for any number of items). With queries Zq (Q, C)
        the result is the projection of each query on its item's read-out, (z_q . r_i / |r_i|^2) r_i: the paper's
        read of a memory holding that one item. This is how a memory of many facts is read when a scope detector
        names the fact (``read_mode="keyed"`` in `larimar.editing`); the query-addressed `read` returns the
        projection on the span of every written latent, which is the query itself once N >= C.

        Args:
            ids: Q item ids (repeats allowed).
            Zq: optional query latents (Q, C).

        Returns:
            (Q, C) in Zq's dtype (float32 without Zq).

        Raises:
            KeyError: an unknown id.
            ValueError: Zq of the wrong shape.
        """
        ids = [ids] if isinstance(ids, str) else list(ids)
        missing = [i for i in ids if i not in self._w]
        if missing:
            raise KeyError(f"unknown memory item id(s): {missing[:5]}")
        if not ids:
            raise ValueError("ids must not be empty")
        W = torch.stack([self._w[i] for i in ids])  # (Q, K)
        R = W @ self.M  # (Q, C)
        if Zq is None:
            return R.float()
        Zq_ = self._as_items(Zq)
        if Zq_.shape[0] != len(ids):
            raise ValueError(f"got {Zq_.shape[0]} queries for {len(ids)} ids")
        return one_fact_read(Zq_, R).to(Zq.dtype)  # (Q, C)

    def state_tensors(self) -> dict[str, Tensor]:
        """Tensors of the full state (for safetensors): M, U, M_ref, item latents Z (n, C) and keys W (n, K)."""
        K, C = self.config.num_slots, self.config.code_size
        Z = torch.stack(list(self._z.values())) if self._z else torch.zeros(0, C, dtype=torch.float64)
        W = torch.stack(list(self._w.values())) if self._w else torch.zeros(0, K, dtype=torch.float64)
        return {"M": self.M.cpu(), "U": self.U.cpu(), "M_ref": self.M_ref.cpu(), "Z": Z.cpu(), "W": W.cpu()}

    @classmethod
    def from_state_tensors(
        cls, memory: EpisodicMemory, tensors: dict[str, Tensor], ids: list[str], device: str | None = None
    ) -> "ItemMemory":
        """Rebuilds an ItemMemory from `state_tensors()` output and the ids in write order."""
        im = cls(memory, device=device)
        K, C = im.config.num_slots, im.config.code_size
        need = {"M": (K, C), "U": (K, K), "M_ref": (K, C), "Z": (len(ids), C), "W": (len(ids), K)}
        for name, shape in need.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else None
                raise ValueError(f"memory state tensor {name!r} must have shape {shape}, got {got}")
        dev = im.device
        if not torch.equal(tensors["M_ref"].to(dev, torch.float64), im.M_ref):
            raise ValueError("memory state was written with another prior mean M0 (a different checkpoint)")
        im.M, im.U = (tensors[k].to(dev, torch.float64).clone() for k in ("M", "U"))
        for i, item_id in enumerate(ids):
            im._z[item_id] = tensors["Z"][i].to(dev, torch.float64)
            im._w[item_id] = tensors["W"][i].to(dev, torch.float64)
        return im
