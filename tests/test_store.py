"""Tests of the persistent memory store (SQLite edit log + safetensors snapshots + API keys)."""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from larimar.memory import EpisodicMemory, ItemMemory, MemoryConfig
from larimar.serving.storage import StoreError, default_store_path
from larimar.serving.store import MemoryStore

K, C = 16, 8
FP = "sha256:test"
CHILD = Path(__file__).resolve().parent / "_store_child.py"
SRC = Path(__file__).resolve().parents[1] / "src"


def _mem() -> EpisodicMemory:
    return EpisodicMemory(MemoryConfig(num_slots=K, code_size=C))


def _open(path: Path, **kw: object) -> MemoryStore:
    return MemoryStore(path, fingerprint=kw.pop("fingerprint", FP), memory=kw.pop("memory", _mem()), **kw)  # type: ignore[arg-type]


def _z(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed))  # (n, C)


def _assert_same_memory(a: ItemMemory, b: ItemMemory) -> None:
    assert a.ids == b.ids
    assert torch.allclose(a.M, b.M, rtol=1e-9, atol=1e-10)
    assert torch.allclose(a.U, b.U, rtol=1e-9, atol=1e-10)


def _edit_sequence(store: MemoryStore, ns: str = "a") -> list[str]:
    ids = store.write(ns, ["one", "two", "three"], _z(3, 0))
    ids += store.write(ns, ["four"], _z(1, 1), ids=["fixed-id"])
    store.forget(ns, [ids[1]])
    ids += store.write(ns, [f"more {i}" for i in range(20)], _z(20, 2))  # past K = 16 items
    store.forget(ns, ["fixed-id", ids[5]])
    store.write(ns, ["four again"], _z(1, 3), ids=["fixed-id"])  # an id may be reused after forgetting
    return [f.id for f in store.facts(ns)]


def test_rebuild_from_log_equals_live_memory(tmp_path: Path) -> None:
    with _open(tmp_path) as store:
        live_ids = _edit_sequence(store)
        live = store.memory("a")
        assert live.ids == live_ids and len(live) == 3 - 1 + 1 + 20 - 2 + 1
        rebuilt = store.rebuild("a")
        assert rebuilt is not live
        _assert_same_memory(rebuilt, live)
        # and both equal a memory written in one go with exactly the live items
        direct = ItemMemory(store.memory_module)  # type: ignore[arg-type]
        entries = {e.id: e for e in store.log("a") if e.op == "write"}
        direct.write(torch.stack([entries[i].latent for i in live_ids]), ids=live_ids)  # type: ignore[misc]
        _assert_same_memory(direct, live)
        # a read through the live memory is the same as through the rebuilt one
        q = _z(4, 9).double()
        assert torch.allclose(live.read(q), rebuilt.read(q), atol=1e-10)


def test_log_rows_hold_float64_latents_keys_and_provenance(tmp_path: Path) -> None:
    with _open(tmp_path) as store:
        Z = _z(2, 5)
        ids = store.write("ns", ["a fact", "b fact"], Z, provenance=[{"src": "x"}, {"src": "y"}])
        store.forget("ns", ids[:1], provenance={"why": "test"})
        log = store.log("ns")
        assert [(e.op, e.id) for e in log] == [("write", ids[0]), ("write", ids[1]), ("forget", ids[0])]
        assert [e.seq for e in log] == sorted(e.seq for e in log)
        assert torch.equal(log[0].latent, Z[0].double()) and log[0].latent.dtype == torch.float64
        assert log[1].key is not None and log[1].key.shape == (K,)
        assert torch.allclose(log[1].key, store.memory("ns").keys_for(Z[1:].double())[0])
        assert log[0].provenance == {"src": "x"} and log[2].provenance == {"why": "test"}
        assert log[2].text is None and log[2].latent is None
    raw = sqlite3.connect(tmp_path / "store.sqlite3")
    blob, shape = raw.execute("SELECT latent, latent_shape FROM log ORDER BY seq LIMIT 1").fetchone()
    assert len(blob) == 8 * C and json.loads(shape) == [C]  # raw float64 bytes, not a pickle
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_reopen_loads_snapshot_and_replays_the_log_tail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = _open(tmp_path, snapshot_every=4)
    _edit_sequence(store)
    expected = store.rebuild("a")
    manifest = json.loads((tmp_path / "snapshots" / "a" / "manifest.json").read_text())
    assert manifest["namespace"] == "a" and manifest["fingerprint"] == FP
    assert manifest["last_seq"] < store.log("a")[-1].seq  # the tail after the snapshot is only in the log
    store.close(snapshot=False)
    with caplog.at_level(logging.WARNING, logger="larimar.store"), _open(tmp_path) as store:
        _assert_same_memory(store.memory("a"), expected)
    assert not caplog.records  # the snapshot was used, not thrown away
    manifest = json.loads((tmp_path / "snapshots" / "a" / "manifest.json").read_text())
    assert manifest["last_seq"] == expected_last_seq(tmp_path)  # close() snapshotted the tail
    assert manifest["ids"] == expected.ids
    assert [p.name for p in (tmp_path / "snapshots" / "a").glob("*.safetensors")] == [manifest["file"]]


def expected_last_seq(path: Path) -> int:
    raw = sqlite3.connect(path / "store.sqlite3")
    try:
        return int(raw.execute("SELECT MAX(seq) FROM log WHERE namespace = 'a'").fetchone()[0])
    finally:
        raw.close()


@pytest.mark.parametrize("damage", ["garbage", "delete", "stale_manifest"])
def test_damaged_snapshot_falls_back_to_rebuild(tmp_path: Path, damage: str) -> None:
    with _open(tmp_path) as store:
        _edit_sequence(store)
        expected = store.rebuild("a")
    folder = tmp_path / "snapshots" / "a"
    manifest = json.loads((folder / "manifest.json").read_text())
    if damage == "garbage":
        (folder / manifest["file"]).write_bytes(b"\x00not a safetensors file")
    elif damage == "delete":
        (folder / manifest["file"]).unlink()
    else:  # a manifest whose ids disagree with the log
        manifest["ids"] = manifest["ids"][:-1]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    with _open(tmp_path) as store:
        _assert_same_memory(store.memory("a"), expected)


def _state(store: MemoryStore, ns: str) -> tuple[object, ...]:
    im = store.memory(ns)
    return (len(store.log(ns)), im.ids, im.M.clone(), im.U.clone(), [f.id for f in store.facts(ns)])


def _same_state(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.write("a", [""], _z(1, 0)), ValueError),
        (lambda s: s.write("a", ["   "], _z(1, 0)), ValueError),
        (lambda s: s.write("a", ["x\x00y"], _z(1, 0)), ValueError),
        (lambda s: s.write("a", ["\ud800"], _z(1, 0)), ValueError),
        (lambda s: s.write("a", [3], _z(1, 0)), ValueError),
        (lambda s: s.write("a", "not a list", _z(1, 0)), ValueError),
        (lambda s: s.write("a", [], torch.zeros(0, C)), ValueError),
        (lambda s: s.write("a", ["x"], torch.zeros(1, C + 1)), ValueError),
        (lambda s: s.write("a", ["x", "y"], _z(1, 0)), ValueError),
        (lambda s: s.write("a", ["x"], torch.zeros(C)), ValueError),
        (lambda s: s.write("a", ["x"], torch.full((1, C), float("nan"))), ValueError),
        (lambda s: s.write("a", ["x"], torch.ones(1, C, dtype=torch.int64)), ValueError),
        (lambda s: s.write("a", ["x"], [[0.0] * C]), ValueError),
        (lambda s: s.write("a", ["x"], _z(1, 0), ids=["keep"]), ValueError),  # live id
        (lambda s: s.write("a", ["x", "y"], _z(2, 0), ids=["d", "d"]), ValueError),
        (lambda s: s.write("a", ["x"], _z(1, 0), ids=["bad/id"]), ValueError),
        (lambda s: s.write("a", ["x"], _z(1, 0), provenance={"f": object()}), ValueError),
        (lambda s: s.write("a", ["x"], _z(1, 0), provenance={"f": float("nan")}), ValueError),
        (lambda s: s.write("../evil", ["x"], _z(1, 0)), ValueError),
        (lambda s: s.forget("a", ["nope"]), KeyError),
        (lambda s: s.forget("a", ["keep", "nope"]), KeyError),  # all or nothing
        (lambda s: s.forget("a", []), ValueError),
        (lambda s: s.forget("a", ["keep", "keep"]), ValueError),
    ],
)
def test_bad_input_raises_and_changes_nothing(tmp_path: Path, call, error) -> None:  # type: ignore[no-untyped-def]
    with _open(tmp_path) as store:
        store.write("a", ["kept fact"], _z(1, 7), ids=["keep"])
        before = _state(store, "a")
        with pytest.raises(error):
            call(store)
        assert _same_state(_state(store, "a"), before)
        assert store.namespaces() == ["a"]


def test_fingerprint_schema_and_shape_mismatch_raise_store_error(tmp_path: Path) -> None:
    with _open(tmp_path) as store:
        store.write("a", ["x"], _z(1, 0))
    with pytest.raises(StoreError, match=r"'sha256:test'.*'sha256:other'"):
        _open(tmp_path, fingerprint="sha256:other")
    with pytest.raises(StoreError, match="shape"):
        _open(tmp_path, memory=EpisodicMemory(MemoryConfig(num_slots=K, code_size=C + 1)))
    raw = sqlite3.connect(tmp_path / "store.sqlite3")
    raw.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match=r"schema version 99.*schema version 1"):
        _open(tmp_path)
    with pytest.raises(ValueError, match="fingerprint"):
        MemoryStore(tmp_path / "x", fingerprint="")


def test_other_prior_is_detected_on_rebuild(tmp_path: Path) -> None:
    with _open(tmp_path) as store:
        store.write("a", ["x", "y"], _z(2, 0))
    other = _mem()
    with torch.no_grad():
        other.M0.mul_(3.0)
    with _open(tmp_path, memory=other) as store, pytest.raises(StoreError, match="prior"):
        store.rebuild("a")


def test_store_without_memory_module_manages_keys_only(tmp_path: Path) -> None:
    with MemoryStore(tmp_path, fingerprint=FP) as store:
        token = store.add_key("admin", "*", "write")
        with pytest.raises(StoreError, match="memory module"):
            store.write("a", ["x"], _z(1, 0))
    with _open(tmp_path) as store:  # the memory shapes are recorded on first open with a module
        assert store.check_key(token, "any", "write")
        assert store.meta()["code_size"] == str(C)


def test_api_keys(tmp_path: Path) -> None:
    with _open(tmp_path) as store:
        reader = store.add_key("reader", "a", "read")
        writer = store.add_key("writer", "a", "write")
        admin = store.add_key("admin", "*", "write")
        assert store.check_key(reader, "a", "read") and not store.check_key(reader, "a", "write")
        assert store.check_key(writer, "a", "read") and store.check_key(writer, "a", "write")
        assert not store.check_key(writer, "b", "read")
        assert store.check_key(admin, "b", "write")
        assert store.check_key(reader, None, "read")  # any namespace (e.g. a completion without memory)
        forged = reader[:-2] + ("AA" if not reader.endswith("AA") else "BB")
        for bad in [forged, "", "lmk_", "Bearer " + reader, "lmk_zzzz_abc", reader + "x"]:
            assert not store.check_key(bad, "a", "read")
        with pytest.raises(ValueError, match="already exists"):
            store.add_key("reader", "b", "read")
        with pytest.raises(ValueError, match="rights"):
            store.add_key("x", "a", "admin")
        with pytest.raises(ValueError, match="namespace"):
            store.add_key("x", "a b", "read")
        keys = {k.name: k for k in store.list_keys()}
        assert set(keys) == {"reader", "writer", "admin"} and keys["writer"].rights == "write"
        store.revoke_key("writer")
        assert not store.check_key(writer, "a", "read")
        with pytest.raises(KeyError):
            store.revoke_key("writer")
        assert store.list_keys()[1].revoked is not None
    raw = (tmp_path / "store.sqlite3").read_bytes() + (tmp_path / "store.sqlite3-wal").read_bytes() if (
        tmp_path / "store.sqlite3-wal"
    ).exists() else (tmp_path / "store.sqlite3").read_bytes()
    for token in (reader, writer, admin):
        assert token.split("_", 2)[2].encode() not in raw  # only salted hashes are stored


def test_namespaces_are_isolated(tmp_path: Path) -> None:
    with _open(tmp_path) as store:
        store.write("b", ["b fact"], _z(1, 0))
        before = store.memory("b").M.clone()
        store.write("a", [f"a {i}" for i in range(30)], _z(30, 1))
        store.forget("a", store.memory("a").ids[:3])
        assert torch.equal(store.memory("b").M, before)
        assert [f.text for f in store.facts("b")] == ["b fact"]
        assert store.namespaces() == ["a", "b"] and store.size("a") == 27
        assert store.facts("never") == [] and not store.has_namespace("never")


def test_concurrent_readers_never_see_half_applied_writes(tmp_path: Path) -> None:
    with _open(tmp_path, snapshot_every=5) as store:
        store.write("a", ["seed"], _z(1, 0))
        stop = threading.Event()
        errors: list[str] = []

        def reader() -> None:
            while not stop.is_set():
                with store.reading("a") as (im, texts):
                    ids = im.ids
                    time.sleep(0.0005)  # a writer must not slip in here
                    if ids != list(texts) or im.ids != ids:
                        errors.append(f"memory {len(ids)} items, facts {len(texts)}")

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(30):
            ids = store.write("a", [f"f{i}a", f"f{i}b"], _z(2, i + 1))
            if i % 3 == 0:
                store.forget("a", ids[:1])
        stop.set()
        for t in threads:
            t.join()
        assert not errors
        _assert_same_memory(store.memory("a"), store.rebuild("a"))


def test_default_store_path_is_the_user_data_dir() -> None:
    import platformdirs

    assert default_store_path() == Path(platformdirs.user_data_dir("larimar"))


# ----------------------------------------------------------------------------------------------------------
# Crash safety: a real child process killed with SIGKILL at random moments


def _check_after_kill(store_dir: Path, acked_write: set[str], acked_forget: set[str]) -> int:
    """Reopens the store and checks durability, integrity and memory == log. Returns the live size."""
    sys.path.insert(0, str(CHILD.parent))
    try:
        from _store_child import FINGERPRINT, NAMESPACE, make_memory
    finally:
        sys.path.pop(0)
    store = MemoryStore(store_dir, fingerprint=FINGERPRINT, memory=make_memory(), snapshot_every=0)
    try:
        assert store.integrity_check() == "ok"
        log = store.log(NAMESPACE)
        written = {e.id for e in log if e.op == "write"}
        forgotten = {e.id for e in log if e.op == "forget"}
        facts = [f.id for f in store.facts(NAMESPACE)]
        assert acked_write <= written, f"acknowledged writes lost: {sorted(acked_write - written)[:5]}"
        assert acked_forget <= forgotten and not acked_forget & set(facts)
        assert (acked_write - set(facts)) <= forgotten  # missing only if (maybe not yet acked) forgotten
        live = store.memory(NAMESPACE)  # snapshot + log tail
        assert live.ids == facts
        _assert_same_memory(live, store.rebuild(NAMESPACE))
        return len(facts)
    finally:
        store.close(snapshot=False)


def _pump(stream, q: queue.Queue) -> None:  # type: ignore[type-arg]
    for line in stream:
        q.put(line.strip())
    q.put(None)


def _record(line: str, acked_write: set[str], acked_forget: set[str]) -> None:
    _, op, item_id = line.split()
    (acked_write if op == "write" else acked_forget).add(item_id)


def test_sigkill_at_random_moments_loses_no_acknowledged_edit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store_dir = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), str(CHILD.parent)])}
    rng = random.Random(20240311)
    acked_write: set[str] = set()
    acked_forget: set[str] = set()
    caplog.set_level(logging.WARNING, logger="larimar.store")
    t0 = time.monotonic()

    # one round with a freshly exec'ed child (no fork) ...
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(store_dir), "1000"], stdout=subprocess.PIPE, text=True, env=env
    )
    q: queue.Queue = queue.Queue()  # type: ignore[type-arg]
    threading.Thread(target=_pump, args=(proc.stdout, q), daemon=True).start()
    _record(q.get(timeout=60), acked_write, acked_forget)  # wait until it is writing
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    while (line := q.get(timeout=30)) is not None:
        _record(line, acked_write, acked_forget)
    _check_after_kill(store_dir, acked_write, acked_forget)

    # ... then 50 rounds of workers forked from a zygote that paid the imports once
    zygote = subprocess.Popen(
        [sys.executable, str(CHILD), "--zygote"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
    )
    q = queue.Queue()
    threading.Thread(target=_pump, args=(zygote.stdout, q), daemon=True).start()
    sizes, killed_mid_stream = [], 0
    try:
        for r in range(50):
            assert zygote.stdin is not None
            zygote.stdin.write(f"{store_dir} {r}\n")
            zygote.stdin.flush()
            acks_before = len(acked_write) + len(acked_forget)
            pid = None
            while pid is None:
                line = q.get(timeout=60)
                assert line is not None, "zygote died"
                if line.startswith("pid "):
                    pid = int(line.split()[1])
                else:
                    _record(line, acked_write, acked_forget)
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(pid, signal.SIGKILL)
            while not (line := q.get(timeout=60)).startswith("dead "):
                _record(line, acked_write, acked_forget)
            killed_mid_stream += len(acked_write) + len(acked_forget) > acks_before
            sizes.append(_check_after_kill(store_dir, acked_write, acked_forget))
    finally:
        if zygote.stdin is not None:
            zygote.stdin.close()
        zygote.wait(timeout=30)
    assert killed_mid_stream >= 25, "most kills should land while the child is editing"
    assert len(acked_write) > 100 and len(acked_forget) > 10
    assert not [r for r in caplog.records if "ignoring snapshot" in r.getMessage()]  # snapshots never torn
    logging.getLogger(__name__).info("kill test took %.1f s", time.monotonic() - t0)


def test_one_owner_of_the_memories_at_a_time(tmp_path: Path) -> None:
    store = _open(tmp_path)
    with pytest.raises(StoreError, match="already open"):
        _open(tmp_path)
    with MemoryStore(tmp_path, fingerprint=FP) as keys_only:  # keys and logs stay available
        keys_only.add_key("k", "a", "read")
    store.close()
    _open(tmp_path).close()  # released on close (and by the OS when a process dies: see the kill test)


# ----------------------------------------------------------------------------------------------------------
# Per-namespace cost: snapshots hold only the namespace's own data; idle namespaces leave RAM (LRU)


def _snapshot_tensors(path: Path, ns: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    manifest = json.loads((path / "snapshots" / ns / "manifest.json").read_text())
    return load_file(str(path / "snapshots" / ns / manifest["file"]))


def test_small_snapshot_holds_only_the_items_and_reloads_exactly(tmp_path: Path) -> None:
    with _open(tmp_path) as store:
        ids = store.write("s", ["one", "two", "three"], _z(3, 0))
        store.forget("s", ids[1:2])
        live = store.memory("s")
        expected_M, expected_U = live.M.clone(), live.U.clone()
        store.snapshot("s")
    tensors = _snapshot_tensors(tmp_path, "s")
    assert set(tensors) == {"Z"} and tuple(tensors["Z"].shape) == (2, C)  # no M0 / M_ref, no U, no keys
    manifest = json.loads((tmp_path / "snapshots" / "s" / "manifest.json").read_text())
    assert manifest["state"] == "items" and manifest["prior"].startswith("sha256:")
    with _open(tmp_path) as store:
        im = store.memory("s")
        assert im.ids == [ids[0], ids[2]]
        assert torch.allclose(im.M, expected_M, rtol=1e-9, atol=1e-10)
        assert torch.allclose(im.U, expected_U, rtol=1e-9, atol=1e-10)
        _assert_same_memory(im, store.rebuild("s"))
        store.forget("s", [ids[0], ids[2]])  # forgetting after a reload is still exact: back to the prior
        assert torch.allclose(im.M, torch.zeros(K, C, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(im.U, torch.eye(K, dtype=torch.float64), atol=1e-10)


def test_full_snapshot_beyond_k_items_and_another_prior_is_refused(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    with _open(tmp_path) as store:
        _edit_sequence(store)  # 22 live items > K = 16
        store.snapshot("a")
    tensors = _snapshot_tensors(tmp_path, "a")
    assert set(tensors) == {"Z", "M", "U"}  # still no copy of the shared prior, nor keys
    other = _mem()
    with torch.no_grad():
        other.M0.add_(1.0)
    with caplog.at_level(logging.WARNING), _open(tmp_path, memory=other) as store, pytest.raises(StoreError):
        store.memory("a")  # the snapshot is refused (another prior), then the log's keys refuse it too
    assert any("another prior" in r.getMessage() for r in caplog.records)


def test_lru_evicts_idle_namespaces_and_reloads_them(tmp_path: Path) -> None:
    with _open(tmp_path, max_loaded=2, snapshot_every=0) as store:
        for k, ns in enumerate("abcd"):
            store.write(ns, [f"fact {ns}"], _z(1, k), ids=[f"f{ns}"])
        assert store.loaded() == ["c", "d"]
        manifest = json.loads((tmp_path / "snapshots" / "a" / "manifest.json").read_text())
        assert manifest["last_seq"] == store.log("a")[-1].seq  # snapshotted on eviction (it was dirty)
        with store.reading("a") as (im, texts):  # reloaded from its snapshot on next use
            assert im.ids == ["fa"] and texts == {"fa": "fact a"}
            _assert_same_memory(im, store.rebuild("a"))
            with store.reading("b"):  # "a" is in use: never evicted under a reader
                assert "a" in store.loaded() and "b" in store.loaded()
        assert len(store.loaded()) <= 3
        store.write("e", ["fact e"], _z(1, 9))
        assert len(store.loaded()) == 2 and store.loaded()[-1] == "e"
        # every namespace still answers as written, and shares one frozen prior copy
        refs = set()
        for ns in "abcde":
            with store.reading(ns) as (im, _):
                refs.add(im.M_ref.data_ptr())
                _assert_same_memory(im, store.rebuild(ns))
        assert len(refs) == 1
    with pytest.raises(ValueError):
        _open(tmp_path / "x", max_loaded=0)
