"""Kanerva-style generative episodic memory (pure torch; no model code).

Notation (docs/method.md, "Memory"): K slots, C code size, an episode Z of N encoded items (N, C), addressing
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

Keys are linear in z, W = Z P with P = I M0^+ (C, K): at inference (no gradient to M0) P is computed once and
cached until M0 changes (`EpisodicMemory.key_operator`), so a write costs one (N, C) x (C, K) product for the
keys plus N x N solves. Gram matrices are float64 (exactness); the big products (Z P, W^T A) stay in the
inputs' dtype.

Pseudo-inverses are computed by one of three solvers (`larimar.solvers`), all differentiable:
    "ridge"       closed-form ridge least squares (Cholesky on the smaller Gram matrix, float64: the (R, R) dual or
                  the (C, C) primal form, whichever is smaller); default
    "pinv"        torch.linalg.pinv (SVD); the exact reference, slow
    "ben_israel"  the paper's Ben-Israel-Cohen (Newton-Schulz) iteration, X <- X (2I - A X), started at
                  X0 = A^T / ||A||_F^2, a step that cannot diverge (||A||_F^2 >= sigma_max^2)
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from larimar.solvers import (
    SOLVERS,
    ben_israel_pinv,
    chol_solve,
    cholesky,
    effective_ridge,
    gram_trace,
    one_fact_read,
    plus_diag,
    refined_solve,
    ridge_solve,
    solve_weights,
)

logger = logging.getLogger(__name__)

READ_MODES = ("keyed", "recall", "memory", "nearest")
"""How a memory of items is read for a query: `ItemMemory.read_keyed` at the nearest item, projected on the query's
latent ("keyed") or not ("recall", the default); `ItemMemory.read` with the query's latent (the paper); or the nearest
item's stored latent (an ablation that bypasses the memory)."""


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


class EpisodicMemory(nn.Module):
    """A batch of B Kanerva memories sharing a learned prior mean M0 (K, C) and a per-slot read noise.

    Args:
        config: shapes and numerics.
    """

    def __init__(self, config: MemoryConfig) -> None:
        super().__init__()
        self.config = config
        K, C = config.num_slots, config.code_size
        self.M0 = nn.Parameter(torch.eye(K, C))  # (K, C) prior mean; eye works well (docs/method.md)
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

    # -- the key operator, cached at inference ------------------------------------------------------------
    def key_operator(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """P = I M0^+ (C, K) in ``dtype``, the linear map of the keys W = Z P, cached; None while M0 needs grad.

        Keys are linear in Z for every solver (the refined ridge solve too), so at inference one factorisation
        of M0 serves every call. The cache is keyed on M0's storage and version counter (any in-place change,
        an optimizer step or `load_state_dict`, bumps it), its dtype, device and the solver settings, and
        holds a view of M0's storage so its address cannot be reused. While gradients flow to M0 (training)
        nothing is cached: the keys are solved against M0 each call; nor for an M0 made in inference mode, which
        has no version counter. P itself is a normal tensor (usable by autograd) even when made in inference mode.
        """
        M0 = self.M0
        if (M0.requires_grad and torch.is_grad_enabled()) or M0.is_inference():
            return None
        cfg = self.config
        key = (M0.data_ptr(), M0._version, M0.device, dtype, cfg.solver, cfg.read_ridge, cfg.ben_israel_iters)
        cache = self.__dict__.setdefault("_key_cache", {})  # dtype -> (key, M0 view, P)
        hit = cache.get(dtype)
        if hit is not None and hit[0] == key:
            return hit[2]
        with torch.inference_mode(False), torch.no_grad():
            ref = M0.detach()  # keeps M0's storage alive while it keys the cache
            eye = torch.eye(M0.shape[1], dtype=torch.float64, device=M0.device)[None]  # (1, C, C)
            P = solve_weights(eye, ref.to(dtype)[None], cfg.solver, cfg.read_ridge, cfg.ben_israel_iters)[0]
            P = P.to(dtype)  # (C, K)
        cache[dtype] = (key, ref, P)  # a plain attribute: not a parameter, buffer or state
        return P

    # -- operations ----------------------------------------------------------------------------------------
    def address(self, Z: Tensor, M: Tensor | None = None) -> Tensor:
        """Addressing weights W = Z M^+ (B, N, K) for Z (B, N, C); M defaults to the prior mean M0."""
        self._check(Z, "Z")
        return self._address(Z, M)

    def _address(self, Z: Tensor, M: Tensor | None = None) -> Tensor:
        cfg = self.config
        if M is None:
            P = self.key_operator(Z.dtype)
            if P is not None:
                return Z @ P  # (B, N, K)
            M = self.M0.to(Z.dtype)[None]  # (1, K, C): one Gram factorisation shared by the batch
        return solve_weights(Z, M, cfg.solver, cfg.read_ridge, cfg.ben_israel_iters)

    def write(self, Z: Tensor, noise_std: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """One-shot batch write of an episode.

        Args:
            Z: items (B, N, C).
            noise_std: std of the write noise xi added to Z (training only; editing uses 0).
            generator: random generator for the noise.

        Returns:
            M (B, K, C) = W^T (W W^T + s2 I)^-1 Z with W = Z M0^+ (ridge solver), or W^+ Z (other solvers).
            The ridge write solves the (N, N) system, or the (K, K) one, M = (W^T W + s2 I)^-1 W^T Z, when N > K.
        """
        self._check(Z, "Z")
        K, N = self.config.num_slots, Z.shape[1]
        if self.config.solver == "ridge" and N > K:
            Z = self._noisy(Z, noise_std, generator)
            W64 = self._address(Z).double()  # (B, N, K)
            H = W64.transpose(-1, -2) @ W64  # (B, K, K)
            L = cholesky(plus_diag(H, self.config.obs_noise_var))
            return torch.cholesky_solve(W64.transpose(-1, -2) @ Z.double(), L).to(Z.dtype)  # (B, K, C)
        W, A = self._write_factors(Z, noise_std, generator)
        return W.transpose(-1, -2) @ A  # (B, K, C)

    @staticmethod
    def _noisy(Z: Tensor, noise_std: float, generator: torch.Generator | None) -> Tensor:
        if noise_std > 0:
            Z = Z + noise_std * torch.randn(Z.shape, generator=generator, dtype=Z.dtype, device=Z.device)
        return Z

    def _ridge_write(self, Z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Ridge write of checked (noisy) items Z (B, N, C), M = W^T A.

        Returns:
            keys W (B, N, K) in Z's dtype, then in float64: W, Z, A = (G + s2 I)^-1 Z (B, N, C) and the keys'
            Gram matrix G = W W^T (B, N, N).
        """
        W = self._address(Z)  # (B, N, K)
        W64, Z64 = W.double(), Z.double()
        G = W64 @ W64.transpose(-1, -2)  # (B, N, N)
        L = cholesky(plus_diag(G, self.config.obs_noise_var))  # (B, N, N)
        return W, W64, Z64, chol_solve(L, Z64), G  # A: an N x N solve; M = W^T A is RLS's posterior mean

    def _write_factors(
        self, Z: Tensor, noise_std: float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Factors of a batch write, M = W^T A: keys W (B, N, K) and A (B, N, C)."""
        self._check(Z, "Z")
        Z = self._noisy(Z, noise_std, generator)
        cfg = self.config
        if cfg.solver == "ridge":
            W, _, _, A, _ = self._ridge_write(Z)
            return W, A.to(Z.dtype)
        W = self._address(Z)  # (B, N, K)
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
        are solved instead of a K x K (or C x C) one per memory. With the ridge solver the keys' Gram matrix
        G = W W^T of the write is reused by the second solve, w_mean = u (W^T)^+ = u (G + lam I)^-1 W (refined).

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
        cfg = self.config
        # the N x N systems are small: solve them in float64 whatever the inputs' dtype
        rel = effective_ridge(torch.float64, cfg.read_ridge)
        if cfg.solver == "ridge":
            self._check(Z, "Z")
            queries_are_items = Zq is Z and not noise_std > 0
            Z = self._noisy(Z, noise_std, generator)
            W, W64, Z64, A64, G = self._ridge_write(Z)  # (B, N, K) x 2, (B, N, C) x 2, (B, N, N)
            A = A64.to(Z.dtype)
            u = ridge_solve(Z64 if queries_are_items else Zq.double(), A64, 1e-300, rel)  # (B, Q, N) = Zq A^+
            K, N = W.shape[-1], W.shape[-2]
            if K > N:  # (W^T)^+ on the (N, N) Gram matrix G already formed by the write
                V = refined_solve(G, rel * gram_trace(G) + 1e-300, u.transpose(-1, -2))  # (B, N, Q)
                w_mean = V.transpose(-1, -2) @ W64  # (B, Q, K); float64: V is large off span(W W^T)
            else:
                w_mean = ridge_solve(u, W64.transpose(-1, -2), 1e-300, rel)  # (B, Q, K)
        else:
            W, A = self._write_factors(Z, noise_std, generator)
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

    M and U are kept factored: dense parts M0, U0 (zeros and the identity until first folded) plus one rank-one
    term per item written or forgotten since, M = M0 + sum_i g_i r_i^T and U = U0 - sum_i s_i a_i a_i^T, so an
    update costs O(m (K + C)) for m pending terms instead of the O(K C + K^2) of dense updates (a memory of a few
    facts never builds its K x K matrix); the terms are folded into M0, U0 (GEMMs) once there are K // 2 of them.
    ``M`` and ``U`` return the dense matrices.

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
        self._device = dev
        # M (K, C) = M0 + G^T R and U (K, K) = U0 - A^T diag(sign) A: dense parts (None: zeros / the identity)
        # plus one row of G, R, A per item written or forgotten since; folded into M0, U0 at K // 2 rows
        self._M0: Tensor | None = None
        self._U0: Tensor | None = None
        self._G = torch.zeros(0, K, dtype=torch.float64, device=dev)  # (capacity, K) gains; rows [:_m] used
        self._R = torch.zeros(0, C, dtype=torch.float64, device=dev)  # (capacity, C) residuals
        self._A = torch.zeros(0, K, dtype=torch.float64, device=dev)  # (capacity, K)
        self._sign = torch.zeros(0, dtype=torch.float64, device=dev)  # (capacity,) +1 write, -1 forget
        self._m = 0
        self._max_rows = max(1, K // 2)
        self._M_cache: Tensor | None = None  # the dense M, until the next update
        # keys are linear in z: W = Z P with P = I M_ref^+ (C, K), factored once (shared with the module's cache)
        with torch.no_grad():  # the keys never carry gradients
            P = memory.key_operator(torch.float64)
        if P is None:  # an M0 made in inference mode: solve against the frozen copy
            eye = torch.eye(C, dtype=torch.float64, device=dev)
            cfg = self.config
            with torch.no_grad():
                P = solve_weights(eye[None], self.M_ref[None], cfg.solver, cfg.read_ridge, cfg.ben_israel_iters)[0]
        self._key_op = P.to(dev)  # (C, K), never modified in place
        self._z: dict[str, Tensor] = {}  # id -> (C,) latent, in write order
        self._w: dict[str, Tensor] = {}  # id -> (K,) key

    @property
    def device(self) -> torch.device:
        return self._device

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

    @property
    def M(self) -> Tensor:
        """The memory (K, C), dense (computed from the factored state once per update; do not modify it)."""
        if self._M_cache is None:
            K, C = self.config.num_slots, self.config.code_size
            M = self._M0.clone() if self._M0 is not None else torch.zeros(K, C, dtype=torch.float64,
                                                                          device=self.device)
            if self._m:
                M.addmm_(self._G[: self._m].T, self._R[: self._m])
            self._M_cache = M
        return self._M_cache

    @property
    def U(self) -> Tensor:
        """The row covariance (K, K), dense (a new tensor: the state is kept factored, see the class)."""
        K = self.config.num_slots
        U = self._U0.clone() if self._U0 is not None else torch.eye(K, dtype=torch.float64, device=self.device)
        if self._m:
            A = self._A[: self._m]  # (m, K)
            U.sub_(A.T @ (self._sign[: self._m, None] * A))
        return U

    def _times_U(self, W: Tensor) -> Tensor:
        """W U (n, K) for rows W (n, K), from the factored U (U symmetric)."""
        WU = W.clone() if self._U0 is None else W @ self._U0  # (n, K)
        if self._m:
            A = self._A[: self._m]  # (m, K)
            WU.sub_(((W @ A.T) * self._sign[: self._m]) @ A)  # (n, m) (m, K)
        return WU

    def _times_M(self, W: Tensor) -> Tensor:
        """W M (n, C) for rows W (n, K), from the factored M."""
        if self._M_cache is not None:
            return W @ self._M_cache
        WM = W @ self._M0 if self._M0 is not None else W.new_zeros(W.shape[0], self.config.code_size)  # (n, C)
        if self._m:
            WM.addmm_(W @ self._G[: self._m].T, self._R[: self._m])  # (n, m) (m, C)
        return WM

    def _add_terms(self, G: Tensor, R: Tensor, B: Tensor, sign: float) -> None:
        """M += G^T R and U -= sign * B^T B for rows G, B (n, K), R (n, C): appended as pending terms, or folded
        into M0, U0 when they overflow."""
        n, K = B.shape
        self._M_cache = None
        if self._m + n > self._max_rows:  # fold the pending terms and these rows into the dense parts
            M, U = self.M, self.U
            M.addmm_(G.T, R)
            U.sub_(B.T @ B, alpha=sign)
            self._M0, self._U0 = M, 0.5 * (U + U.T)  # U symmetric up to rounding
            self._m, self._M_cache = 0, None
            return
        if self._m + n > self._A.shape[0]:  # grow the row buffers (doubling, capped)
            cap = min(self._max_rows, max(16, 2 * (self._m + n)))
            self._G, self._R, self._A, self._sign = (
                torch.cat([t[: self._m], t.new_zeros(cap - self._m, *t.shape[1:])])
                for t in (self._G, self._R, self._A, self._sign))
        m = self._m
        self._G[m : m + n], self._R[m : m + n], self._A[m : m + n], self._sign[m : m + n] = G, R, B, sign
        self._m += n

    def _update(self, W: Tensor, Z: Tensor, alpha: float) -> None:
        """Kalman-gain RLS step with keys W (n, K), items Z (n, C), alpha = +1 write / -1 forget.

        With WU = W U and S = s2 / alpha I + WU W^T (n, n): M += (S^-1 WU)^T (Z - W M) and
        U -= WU^T S^-1 WU. alpha S is positive definite for a write and for forgetting written items; with its
        Cholesky factor L the U update is the n rank-one terms of B = L^-1 WU (U -= alpha B^T B), the M update the
        n terms of gains S^-1 WU and residuals Z - W M. One item: u = U w, s = s2 / alpha + w . u,
        M += (u / s) (z - w M), U -= u u^T / s.

        Raises:
            ValueError: alpha S is not positive definite (items that were never written; nothing is changed).
        """
        s2 = self.config.obs_noise_var
        n = W.shape[0]
        WU = self._times_U(W)  # (n, K)
        if n == 1:
            u = WU  # (1, K)
            s = float(u[0] @ W[0]) + s2 / alpha
            if not alpha * s > 0:
                raise ValueError("the memory update is not positive definite (an item that was never written?)")
            self._add_terms(u / s, Z - self._times_M(W), u / math.sqrt(alpha * s), alpha)
            return
        S = (s2 / alpha) * torch.eye(n, dtype=torch.float64, device=self.device) + WU @ W.T  # (n, n)
        L, info = torch.linalg.cholesky_ex(alpha * 0.5 * (S + S.T))
        if int(info) != 0:
            raise ValueError("the memory update is not positive definite (items that were never written?)")
        B = torch.linalg.solve_triangular(L, WU, upper=False)  # (n, K) = L^-1 WU
        Gt = alpha * torch.cholesky_solve(WU, L)  # (n, K) = S^-1 WU
        self._add_terms(Gt, Z - self._times_M(W), B, alpha)

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
            ids = [os.urandom(8).hex() for _ in range(Z.shape[0])]  # 16 random hex digits, as uuid4().hex[:16]
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
        names the fact (``read_mode="keyed"`` in `larimar.editor.read`); the query-addressed `read` returns the
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
        R = self._times_M(W)  # (Q, C)
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
        # copies: M and U are updated in place by later writes
        state = {"M": self.M, "U": self.U, "M_ref": self.M_ref, "Z": Z, "W": W}
        return {k: v.to("cpu", copy=True) for k, v in state.items()}

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
        im._M0 = tensors["M"].to(dev, torch.float64).clone()
        im._U0 = tensors["U"].to(dev, torch.float64).clone()
        for i, item_id in enumerate(ids):
            im._z[item_id] = tensors["Z"][i].to(dev, torch.float64)
            im._w[item_id] = tensors["W"][i].to(dev, torch.float64)
        return im


SLOT_INITS = ("random", "eye")
"""How `resize_memory` fills the rows added beyond a trained memory's K0."""


def resize_memory(memory: EpisodicMemory, num_slots: int, init: str = "random", seed: int = 0) -> EpisodicMemory:
    """A memory module with ``num_slots`` rows built from a trained one's prior mean M0.

    The first K rows of M0 for K <= K0; for K > K0 the learned rows followed by K - K0 extra rows, either random
    (seeded Gaussian rows scaled to M0's median row norm, so every slot gets non-zero keys) or identity rows
    (``eye(K, C)[K0:]``, zero rows whenever K0 >= C, i.e. unused slots).

    Args:
        memory: the trained module (not changed).
        num_slots: K, the new number of slots.
        init: rows added when K > K0: "random" (seeded Gaussian rows at M0's median row norm) or "eye".
        seed: seed of the random rows (a local generator).

    Returns:
        ``memory`` itself when K = K0, else a new module (same config but ``num_slots``) on M0's device.

    Raises:
        ValueError: K < 1 or an unknown init.
    """
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if init not in SLOT_INITS:
        raise ValueError(f"slot init must be one of {SLOT_INITS}, got {init!r}")
    K0, C = memory.config.num_slots, memory.config.code_size
    if num_slots == K0:
        return memory
    M0 = memory.M0.detach().float().cpu()  # (K0, C)
    std = memory.log_read_std.detach().float().cpu()  # (K0,)
    if num_slots < K0:
        rows, stds = M0[:num_slots], std[:num_slots]
    else:
        extra = num_slots - K0
        if init == "eye":
            new = torch.eye(num_slots, C)[K0:]  # (extra, C): zero rows when K0 >= C
            if not bool(new.any()):
                logger.warning("eye rows beyond K0 = %d >= C = %d are zero: the %d new slots get no keys", K0, C, extra)
        else:
            g = torch.Generator().manual_seed(seed)
            new = torch.randn(extra, C, generator=g)  # (extra, C)
            scale = M0.norm(dim=1).median().clamp_min(1e-6)
            new = new / new.norm(dim=1, keepdim=True) * scale
        rows = torch.cat([M0, new])  # (K, C)
        stds = torch.cat([std, std.median().expand(extra)])  # (K,)
    out = EpisodicMemory(replace(memory.config, num_slots=num_slots))
    with torch.no_grad():
        out.M0.copy_(rows)
        out.log_read_std.copy_(stds)
    return out.to(memory.M0.device).eval()
