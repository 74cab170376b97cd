"""The fast paths of larimar.memory agree with the plain formulas: cached keys, primal / dual ridge solves,
the (K, K) write for N > K, the in-place rank-one RLS update."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from larimar.memory import EpisodicMemory, ItemMemory, MemoryConfig
from larimar.solvers import SOLVERS, effective_ridge, ridge_lstsq, solve_weights


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make(K=32, C=16, solver="ridge", **kw) -> EpisodicMemory:
    torch.manual_seed(0)
    return EpisodicMemory(MemoryConfig(num_slots=K, code_size=C, solver=solver, **kw))


def tikhonov_svd(Y: torch.Tensor, X: torch.Tensor, lam: float) -> torch.Tensor:
    """Reference: twice-iterated Tikhonov w = Y X^T-filtered by SVD, filter s / (s^2 + lam) (1 + lam / (s^2 + lam))."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    f = S / (S**2 + lam) * (1 + lam / (S**2 + lam))
    return (Y @ Vh.mT) * f[..., None, :] @ U.mT


@settings(max_examples=30, deadline=None)
@given(R=st.integers(1, 40), C=st.integers(1, 40), Q=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_ridge_primal_and_dual_match_the_svd_formula(R, C, Q, seed):
    # R <= C takes the (R, R) dual form, R > C the (C, C) primal one; both equal the same filter
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2, R, C, generator=g, dtype=torch.float64)
    Y = torch.randn(2, Q, C, generator=g, dtype=torch.float64)
    lam = 1e-2 * X.pow(2).sum().item() / (R * C)
    w = ridge_lstsq(Y, X, lam)
    assert w.shape == (2, Q, R)
    assert rel(w, tikhonov_svd(Y, X, lam)) < 1e-9


@pytest.mark.parametrize("R,C", [(5, 16), (16, 16), (40, 16)])
def test_ridge_lstsq_tensor_ridge_per_batch(R, C):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, R, C, generator=g, dtype=torch.float64)
    Y = torch.randn(3, 2, C, generator=g, dtype=torch.float64)
    lam = torch.tensor([1e-3, 1e-1, 1.0], dtype=torch.float64)[:, None, None]
    w = ridge_lstsq(Y, X, lam)
    for b in range(3):
        assert rel(w[b], tikhonov_svd(Y[b], X[b], lam[b].item())) < 1e-9


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("K,C", [(32, 16), (16, 32)])
def test_cached_keys_equal_the_uncached_solve(solver, dtype, tol, K, C):
    mem = make(K=K, C=C, solver=solver)
    with torch.no_grad():
        mem.M0.add_(0.1 * torch.randn(K, C, generator=torch.Generator().manual_seed(1)))
    Z = torch.randn(2, 5, C, dtype=dtype)
    cfg = mem.config
    direct = solve_weights(Z, mem.M0.detach().to(dtype)[None], solver, cfg.read_ridge, cfg.ben_israel_iters)
    with torch.no_grad():
        assert mem.key_operator(dtype) is not None
        cached = mem.address(Z)
    assert cached.dtype == dtype and rel(cached, direct) < tol
    uncached = mem.address(Z)  # grad enabled and M0 requires grad: solved against M0, nothing cached
    assert mem.key_operator(dtype) is None
    assert rel(uncached, direct) < tol


def test_key_cache_is_invalidated_when_m0_changes():
    mem = make()
    Z = torch.randn(1, 4, 16, dtype=torch.float64)
    with torch.no_grad():
        P1 = mem.key_operator(torch.float64)
        assert mem.key_operator(torch.float64) is P1  # a hit
        W1 = mem.address(Z)
        mem.M0.mul_(2.0)  # in place: the version counter moves
        W2 = mem.address(Z)
    assert rel(W2, 0.5 * W1) < 1e-12
    state = {k: v.clone() for k, v in mem.state_dict().items()}
    state["M0"] = 3.0 * state["M0"]
    mem.load_state_dict(state)  # copy_ into the parameter
    with torch.no_grad():
        W3 = mem.address(Z)
        mem.M0.data = torch.eye(32, 16)  # a new storage
        W4 = mem.address(Z)
    assert rel(W3, W1 / 6.0) < 1e-12 and rel(W4, W1) < 1e-12
    mem.config.read_ridge = 1e-3  # solver settings are part of the key
    with torch.no_grad():
        W5 = mem.address(Z)
    assert rel(W5, W1) > 1e-6


def test_training_does_not_cache_and_gradients_reach_m0():
    mem = make()
    mem.train()
    Z = torch.randn(2, 5, 16, dtype=torch.float64)
    _, z, w_mean, w_std = mem.write_read(Z, Z, noise_std=0.01, sample=True, generator=torch.Generator().manual_seed(0))
    (z.pow(2).sum() + mem.kl(w_mean, w_std)).backward()
    assert mem.M0.grad is not None and mem.M0.grad.abs().sum() > 0
    assert not mem.__dict__.get("_key_cache")


def test_keys_in_inference_mode_are_normal_tensors():
    mem = make()
    with torch.inference_mode():
        mem.address(torch.randn(1, 3, 16))
    mem.M0.requires_grad_(False)  # a frozen prior: the cached operator is used with autograd on Z
    Z = torch.randn(1, 3, 16, requires_grad=True)
    mem.address(Z).sum().backward()
    assert Z.grad is not None and torch.isfinite(Z.grad).all()


@settings(max_examples=15, deadline=None)
@given(n=st.integers(33, 70), seed=st.integers(0, 10_000))
def test_write_with_more_items_than_slots_equals_the_dual_formula(n, seed):
    # N > K = 32 takes the (K, K) form M = (W^T W + s2 I)^-1 W^T Z
    mem = make()
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(1, n, 16, generator=g, dtype=torch.float64)
    W = mem.address(Z)[0]
    s2 = mem.config.obs_noise_var
    M_dual = W.T @ torch.linalg.solve(W @ W.T + s2 * torch.eye(n, dtype=torch.float64), Z[0])
    assert rel(mem.write(Z)[0], M_dual) < 1e-10
    M_fast, _, _, _ = mem.write_read(Z, Z)
    assert rel(M_fast[0], M_dual) < 1e-10


@pytest.mark.parametrize("K,C,N", [(32, 16, 64), (64, 16, 40), (16, 32, 64)])
def test_large_n_write_read(K, C, N):
    # N > C (and N > K): the query read spans the whole latent space, so it returns the query
    mem = make(K=K, C=C)
    Z = torch.randn(2, N, C, dtype=torch.float64)
    q = torch.randn(2, 5, C, dtype=torch.float64)
    M, z_fast, w_mean, w_std = mem.write_read(Z, q)
    assert M.shape == (2, K, C) and w_mean.shape == (2, 5, K) and w_std.shape == (2, 5, K)
    assert torch.isfinite(w_mean).all()
    z_read, _, _ = mem.read(M, q)
    if N >= C and K >= C:
        assert rel(z_fast, q) < 1e-6 and rel(z_read, q) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_write_read_with_queries_equal_to_items(dtype):
    # write_read(Z, Z) reuses the items' float64 copy as the queries; the result is the same as with a copy
    mem = make()
    Z = torch.randn(2, 6, 16, dtype=dtype)
    with torch.no_grad():
        a = mem.write_read(Z, Z)
        b = mem.write_read(Z, Z.clone())
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with torch.no_grad():  # the noise is added to the items only, never to the queries
        _, z_noisy, _, _ = mem.write_read(Z, Z, noise_std=0.1, generator=torch.Generator().manual_seed(0))
        _, z_ref, _, _ = mem.write_read(Z, Z.clone(), noise_std=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z_noisy, z_ref)


def test_write_read_matches_read_of_write_float32_at_scale():
    mem = make(K=512, C=384)
    Z = torch.randn(1, 16, 384)
    with torch.no_grad():
        _, z_fast, _, _ = mem.write_read(Z, Z)
        z_read, _, _ = mem.read(mem.write(Z), Z)
    assert rel(z_fast, Z) < 1e-5 and rel(z_read, Z) < 1e-5
    assert rel(z_fast, z_read) < 1e-5


def test_rank_one_update_matches_the_block_update():
    # one item at a time (in-place addr_) and a block of n items (linalg.solve) reach the same state
    mem = make()
    Z = torch.randn(6, 16, dtype=torch.float64)
    a, b = ItemMemory(mem), ItemMemory(mem)
    ids = [a.write(Z[i : i + 1])[0] for i in range(6)]
    b.write(Z, ids=ids)
    assert rel(a.M, b.M) < 1e-12 and rel(a.U, b.U) < 1e-12
    a.forget(ids[1:4])
    for i in ids[1:4]:
        b.forget([i])
    assert rel(a.M, b.M) < 1e-10 and rel(a.U, b.U) < 1e-10


def test_state_tensors_are_snapshots():
    mem = make()
    im = ItemMemory(mem)
    im.write(torch.randn(3, 16))
    state = im.state_tensors()
    M, U = state["M"].clone(), state["U"].clone()
    im.write(torch.randn(2, 16))  # M and U are updated in place
    assert torch.equal(state["M"], M) and torch.equal(state["U"], U)
    assert not torch.equal(im.M, M)


def test_item_memory_shares_the_key_operator():
    mem = make()
    with torch.no_grad():
        P = mem.key_operator(torch.float64)
    im = ItemMemory(mem)  # M0 requires grad here; ItemMemory's keys never do, so the cache serves it
    assert im._key_op is P
    cfg = mem.config
    direct = solve_weights(torch.eye(16, dtype=torch.float64)[None], im.M_ref[None], cfg.solver, cfg.read_ridge)[0]
    assert rel(im._key_op, direct) < 1e-12 and rel(P, direct) < 1e-12
    assert effective_ridge(torch.float64, 0.0) > 0
