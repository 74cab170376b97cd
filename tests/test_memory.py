"""Unit tests of the memory math on tiny tensors (larimar.memory)."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from larimar.memory import SOLVERS, EpisodicMemory, ItemMemory, MemoryConfig


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make(K=32, C=16, solver="ridge", **kw) -> EpisodicMemory:
    torch.manual_seed(0)
    return EpisodicMemory(MemoryConfig(num_slots=K, code_size=C, solver=solver, **kw))


def projection(q: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of rows of q (Q, C) onto span of rows of Z (N, C), float64."""
    Q, _ = torch.linalg.qr(Z.double().T)  # (C, N)
    return q.double() @ Q @ Q.T


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), b=st.integers(1, 3), seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 1.0, 1e3]))
@example(n=10, b=2, seed=204, scale=1e-3)  # float32 read errors of 2e-3 and 5e-3 when the ridge sat at 10 x eps
@example(n=10, b=2, seed=1436, scale=1e-3)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_write_then_read_reconstructs(dtype, tol, n, b, seed, scale):
    mem = make()
    g = torch.Generator().manual_seed(seed)
    Z = scale * torch.randn(b, n, 16, generator=g, dtype=dtype)
    M = mem.write(Z)
    z_read, w_mean, w_std = mem.read(M, Z)
    assert M.shape == (b, 32, 16) and M.dtype == dtype
    assert z_read.shape == Z.shape and w_mean.shape == (b, n, 32) and w_std.shape == (b, n, 32)
    assert rel(z_read, Z) < tol
    _, z_fast, _, _ = mem.write_read(Z, Z)  # the factored fast path agrees
    assert rel(z_fast, Z) < tol


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_read_is_orthogonal_projection_on_span(n, seed):
    mem = make()
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(1, n, 16, generator=g, dtype=torch.float64)
    q = torch.randn(1, 5, 16, generator=g, dtype=torch.float64)
    expected = projection(q[0], Z[0])
    z_read, _, _ = mem.read(mem.write(Z), q)
    assert rel(z_read[0], expected) < 1e-6
    _, z_fast, _, _ = mem.write_read(Z, q)
    assert rel(z_fast[0], expected) < 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_agree_on_well_conditioned_problems(solver):
    mem_ref, mem = make(solver="pinv"), make(solver=solver)
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    q = torch.randn(2, 4, 16, generator=g, dtype=torch.float64)
    # pinv / Ben-Israel writes are exact least squares; ridge approaches it as s2 -> 0, and reads agree anyway
    z_ref, _, _ = mem_ref.read(mem_ref.write(Z), q)
    z, w, _ = mem.read(mem.write(Z), q)
    assert rel(z, z_ref) < 1e-6
    w_ref = mem_ref.address(Z)
    assert rel(mem.address(Z), w_ref) < 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_are_differentiable(solver):
    mem = make(solver=solver)
    Z = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 3, 16, dtype=torch.float64)
    z, w_mean, w_std = mem.read(mem.write(Z), q, sample=True)
    (z.pow(2).sum() + mem.kl(w_mean, w_std)).backward()
    assert Z.grad is not None and torch.isfinite(Z.grad).all() and Z.grad.abs().sum() > 0
    assert mem.M0.grad is not None and torch.isfinite(mem.M0.grad).all()
    assert mem.log_read_std.grad is not None


def test_sequential_writes_equal_one_batch_write():
    mem = make()
    Z = torch.randn(9, 16, dtype=torch.float64)
    im = ItemMemory(mem)
    for i in range(9):
        im.write(Z[i : i + 1])
    M_batch = mem.write(Z[None])[0]
    assert rel(im.M, M_batch) < 1e-10


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 40), k=st.data(), seed=st.integers(0, 10_000))
def test_forget_one_equals_never_writing_it(n, k, seed):
    mem = make()  # K = 32: n up to 40 covers N > K
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, 16, generator=g, dtype=torch.float64)
    drop = k.draw(st.integers(0, n - 1))
    im = ItemMemory(mem)
    ids = [im.write(Z[i : i + 1])[0] for i in range(n)]
    im.forget([ids[drop]])
    ref = ItemMemory(mem)
    ref.write(torch.cat([Z[:drop], Z[drop + 1 :]]))
    assert rel(im.M, ref.M) < 1e-8
    assert rel(im.U, ref.U) < 1e-8
    assert im.ids == [i for j, i in enumerate(ids) if j != drop]


def test_forgetting_everything_returns_the_prior():
    mem = make()
    im = ItemMemory(mem)
    ids = im.write(torch.randn(7, 16, dtype=torch.float64))
    im.write(torch.randn(3, 16, dtype=torch.float64))
    im.forget(ids)
    im.forget(im.ids)
    assert len(im) == 0
    assert im.M.abs().max() < 1e-10
    assert (im.U - torch.eye(32, dtype=torch.float64)).abs().max() < 1e-10


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("case", ["large", "tiny", "duplicates", "n_gt_k"])
def test_no_nan_or_inf(solver, case):
    mem = make(solver=solver)
    g = torch.Generator().manual_seed(3)
    if case == "large":
        Z = 1e3 * torch.randn(2, 8, 16, generator=g)
    elif case == "tiny":
        Z = 1e-6 * torch.randn(2, 8, 16, generator=g)
    elif case == "duplicates":  # rank-deficient episode
        Z = torch.randn(2, 1, 16, generator=g).expand(2, 8, 16).contiguous()
    else:
        Z = torch.randn(2, 48, 16, generator=g)  # N > K = 32
    M = mem.write(Z)
    z, w_mean, _ = mem.read(M, Z)
    _, z2, _, _ = mem.write_read(Z, Z)
    for t in (M, z, w_mean, z2):
        assert torch.isfinite(t).all()
    im = ItemMemory(mem)
    ids = im.write(Z[0])
    im.forget(ids[:3])
    assert torch.isfinite(im.M).all() and torch.isfinite(im.read(Z[0])).all()


def test_duplicates_read_back_the_item():
    mem = make()
    z = torch.randn(1, 1, 16, dtype=torch.float64)
    Z = z.expand(1, 5, 16)
    z_read, _, _ = mem.read(mem.write(Z), z)
    assert rel(z_read, z) < 1e-6


def test_generate_shapes_and_device():
    mem = make()
    M = mem.write(torch.randn(3, 4, 16))
    z = mem.generate(M, 5, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 5, 16) and z.dtype == M.dtype


def test_empty_memory_reads_zero():
    im = ItemMemory(make())
    assert im.read(torch.randn(2, 16)).abs().max() == 0


def test_state_roundtrip():
    mem = make()
    im = ItemMemory(mem)
    im.write(torch.randn(4, 16))
    im2 = ItemMemory.from_state_tensors(mem, im.state_tensors(), im.ids)
    q = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(im.read(q), im2.read(q))
    im2.forget(im2.ids[:1])  # keys survive the round trip: forgetting still exact
    ref = ItemMemory(mem)
    ref.write(im.state_tensors()["Z"][1:])
    assert rel(im2.M, ref.M) < 1e-8


# -- bad input -------------------------------------------------------------------------------------------


def test_bad_shapes_and_dtypes_raise_value_error():
    mem = make()
    with pytest.raises(ValueError, match=r"\(B, N, 16\)"):
        mem.write(torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"\(B, N, 16\)"):
        mem.write(torch.randn(1, 4, 15))
    with pytest.raises(ValueError, match="floating"):
        mem.write(torch.ones(1, 4, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 32, 16\)"):
        mem.read(torch.randn(1, 31, 16), torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="solver"):
        MemoryConfig(solver="svd")
    im = ItemMemory(mem)
    with pytest.raises(ValueError, match=r"\(n, 16\)"):
        im.write(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="finite"):
        im.write(torch.full((1, 16), float("nan")))


def test_unknown_id_raises_key_error_and_changes_nothing():
    im = ItemMemory(make())
    ids = im.write(torch.randn(3, 16))
    M, U = im.M.clone(), im.U.clone()
    with pytest.raises(KeyError, match="nope"):
        im.forget([ids[0], "nope"])
    assert torch.equal(im.M, M) and torch.equal(im.U, U) and im.ids == ids
    with pytest.raises(ValueError, match="unique"):
        im.write(torch.randn(1, 16), ids=[ids[0]])
    assert im.ids == ids


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 10_000))
def test_keyed_read_returns_each_item_even_past_the_code_size(n, seed):
    # C = 8 and K = 64: from n = 8 on the query read returns the query itself; the keyed read still returns z_i
    mem = make(K=64, C=8, obs_noise_var=1e-8)
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, 8, generator=g, dtype=torch.float64)
    im = ItemMemory(mem)
    ids = [im.write(Z[i : i + 1])[0] for i in range(n)]
    assert rel(im.read_keyed(ids).double(), Z) < 1e-5
    q = Z + 0.3 * torch.randn(n, 8, generator=g, dtype=torch.float64)  # noisy queries
    expected = ((q * Z).sum(-1, keepdim=True) / Z.pow(2).sum(-1, keepdim=True)) * Z  # projection on z_i alone
    assert rel(im.read_keyed(ids, q), expected) < 1e-5
    if n >= 8:
        assert rel(im.read(q), q) < 1e-5  # the contrast: the span of the items is the whole latent space


def test_keyed_read_of_one_item_equals_the_query_read_and_follows_forgetting():
    mem = make(K=32, C=16)  # default s2 = 1: the read-out is a shrunk z, its direction exact
    Z = torch.randn(5, 16, dtype=torch.float64)
    im = ItemMemory(mem)
    a = im.write(Z[:1])
    q = Z[:1] + 0.5 * torch.randn(1, 16, dtype=torch.float64)
    assert rel(im.read_keyed(a, q), im.read(q)) < 1e-6
    rest = im.write(Z[1:])
    im.forget(a)
    with pytest.raises(KeyError, match="unknown"):
        im.read_keyed(a)
    ref = ItemMemory(mem)
    ref.write(Z[1:], ids=rest)
    assert rel(im.read_keyed(rest), ref.read_keyed(rest)) < 1e-8  # forgetting is exact for the keyed read too
    with pytest.raises(ValueError, match="queries"):
        im.read_keyed(rest, Z[:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    mem = make()
    Z = torch.randn(2, 6, 16)
    z_cpu, _, _ = mem.read(mem.write(Z), Z)
    mem_gpu = mem.cuda()
    z_gpu, _, _ = mem_gpu.read(mem_gpu.write(Z.cuda()), Z.cuda())
    assert z_gpu.device.type == "cuda" and rel(z_gpu.cpu(), z_cpu) < 1e-4


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 5)), min_size=1, max_size=14),
       seed=st.integers(0, 10_000))
def test_factored_covariance_follows_the_dense_rls(ops, seed):
    # the factored U (pending rank-one terms, folded every K // 2 = 16 rows) against the textbook dense RLS
    # (Kalman gain, U and M updated in full) over random writes and forgets of 1-5 items
    mem = make()
    g = torch.Generator().manual_seed(seed)
    im = ItemMemory(mem)
    s2 = mem.config.obs_noise_var
    M, U = torch.zeros(32, 16, dtype=torch.float64), torch.eye(32, dtype=torch.float64)
    for write, n in ops:
        if write or len(im) < n:
            Z = torch.randn(n, 16, generator=g, dtype=torch.float64)
            ids, alpha = im.write(Z), 1.0
            W = im.keys_for(Z)
        else:
            ids, alpha = im.ids[-n:], -1.0
            W = torch.stack([im._w[i] for i in ids])
            Z = torch.stack([im.latent(i) for i in ids])
            im.forget(ids)
        S = (s2 / alpha) * torch.eye(len(ids), dtype=torch.float64) + W @ U @ W.T
        G = U @ W.T @ torch.linalg.inv(S)  # (K, n) gain
        M, U = M + G @ (Z - W @ M), U - G @ W @ U
        # (an emptied memory has M = 0: the error is measured against 1 + |reference|)
        assert (im.M - M).norm() < 1e-8 * (1 + M.norm()) and (im.U - U).norm() < 1e-8 * U.norm()
    assert torch.allclose(im.U, im.U.T, atol=1e-12)


def test_dense_state_round_trips_through_the_factored_covariance():
    mem = make()
    im = ItemMemory(mem)
    ids = im.write(torch.randn(20, 16, dtype=torch.float64))  # 20 rows > K // 2: folded into the dense part
    im.forget(ids[:3])
    back = ItemMemory.from_state_tensors(mem, im.state_tensors(), im.ids)
    assert torch.equal(back.U, im.U) and torch.equal(back.M, im.M)
    z = torch.randn(1, 16, dtype=torch.float64)
    im.write(z, ids=["x"]), back.write(z, ids=["x"])
    assert rel(back.U, im.U) < 1e-12 and rel(back.M, im.M) < 1e-12
