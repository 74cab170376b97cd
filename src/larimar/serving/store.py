"""Persistent episodic memories: an SQLite edit log per namespace plus safetensors snapshots.

Layout of a store folder (default ``platformdirs.user_data_dir("larimar")``)::

    store.sqlite3                    meta, namespaces, the edit log, live facts, API keys (WAL, synchronous=FULL)
    snapshots/<namespace>/manifest.json
    snapshots/<namespace>/snap-<seq>.safetensors   the items' latents Z (n, C) (+ M, U when n > K) + the manifest

The log is the source of truth. Each row is one item operation: (seq, namespace, id, op = write | forget, text,
latent (float64 bytes + recorded shape, never pickle), key (the item's address W_i, float64), timestamp,
provenance JSON). Every write / forget is one transaction, committed (fsync'ed) before the in-RAM memory is
updated and before the call returns; if the RAM update fails after commit the namespace is rebuilt from the log.
Snapshots only make opening fast: on open the newest snapshot is loaded and the log rows after its ``last_seq``
are replayed; a missing, stale or inconsistent snapshot falls back to ``rebuild`` (the live items of the log
written into an empty memory, which equals the sequentially edited memory because recursive least squares
depends only on the set of items written and not forgotten).

A snapshot holds only what is the namespace's own: its items' latents Z (n, C), and its state M (K, C), U (K, K)
only once it holds more items than slots (n > K). What every namespace shares is never copied: the prior M0 (the
manifest keeps its digest), the keys (recomputed from Z and M0), and for n <= K the state, rebuilt on load by
one block update of the n items from the prior (the memory `rebuild` makes; equal to the sequentially edited one
up to float64 rounding, and forgetting stays exact: a forget subtracts the update of the item's own key).

At most ``max_loaded`` namespaces are held in RAM: loading one more evicts the least recently used one that no
request is using (snapshotted first if it has unsnapshotted operations); it comes back from its snapshot and the
log on its next use. Every loaded namespace shares one frozen copy of M0.

A store is tied to one checkpoint by a fingerprint string (e.g. sha256 of the weights + config), kept in the
``meta`` table with the schema version; opening with another fingerprint or schema raises `StoreError`.

One process owns a store's memories at a time (an flock on ``store.lock``, dropped by the OS if it dies; a second
owner gets `StoreError`); others may open it with ``memory=None`` to read the log and manage keys.

Usage::

    store = MemoryStore("/tmp/mem", fingerprint="sha256:...", memory=model.memory)
    ids = store.write("alice", ["The Eiffel Tower is in Rome."], Z)      # Z (1, C)
    store.forget("alice", ids)
    with store.reading("alice") as (im, facts):                         # consistent view, no half writes
        z = im.read(Zq)
    token = store.add_key("ci", "alice", "write")                        # shown once, only a hash is kept
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from larimar.facts import check_text
from larimar.memory import EpisodicMemory, ItemMemory
from larimar.serving.keys import ApiKeys
from larimar.serving.snapshots import Snapshots
from larimar.serving.storage import (
    DB_NAME,
    ID_RE,
    SCHEMA,
    SCHEMA_VERSION,
    Fact,
    LiveNamespace,
    LogEntry,
    RWLock,
    StoreError,
    acquire_owner_lock,
    blob_to_tensor,
    check_namespace,
    default_store_path,
    release_owner_lock,
    tensor_to_blob,
)

logger = logging.getLogger(__name__)


class MemoryStore(ApiKeys, Snapshots):
    """Persistent namespaced episodic memories and API keys, in one store folder.

    Args:
        path: the store folder (created if missing); default `default_store_path()`.
        fingerprint: the checkpoint fingerprint this store is tied to (non-empty string).
        memory: the memory module (its config and frozen prior M0) the namespaces' `ItemMemory` use; None opens
            the store for log reading and key management only.
        snapshot_every: write a namespace snapshot after this many logged operations (0: only on `snapshot` /
            `close` / eviction).
        max_loaded: namespaces held in RAM at most (the least recently used idle one is evicted beyond it);
            None: no bound.

    Raises:
        StoreError: the store was made with another fingerprint or schema version.
        ValueError: empty fingerprint.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        fingerprint: str,
        memory: EpisodicMemory | None = None,
        snapshot_every: int = 64,
        max_loaded: int | None = 64,
    ) -> None:
        if max_loaded is not None and (isinstance(max_loaded, bool) or not isinstance(max_loaded, int)
                                       or max_loaded < 1):
            raise ValueError(f"max_loaded must be a positive int or None, got {max_loaded!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
        self.path = Path(path) if path is not None else default_store_path()
        self.path.mkdir(parents=True, exist_ok=True)
        self.db_path = self.path / DB_NAME
        self.fingerprint = fingerprint
        self.memory_module = memory
        self.snapshot_every = snapshot_every
        self._db_lock = threading.RLock()
        self._locks_lock = threading.Lock()
        self._ns_locks: dict[str, RWLock] = {}
        self._live: OrderedDict[str, LiveNamespace] = OrderedDict()  # least recently used first
        self._live_lock = threading.Lock()  # guards _live's order and membership across namespaces
        self.max_loaded = max_loaded
        self._m_ref: Tensor | None = None  # the frozen prior every loaded namespace shares
        self._prior: str | None = None  # its digest, in snapshot manifests
        self._closed = False
        self._owner_fd: int | None = None
        if memory is not None:  # one process owns the in-RAM memories; a second owner would silently diverge
            self._owner_fd = acquire_owner_lock(self.path / "store.lock")
        try:
            self._conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=30.0)
        except BaseException:
            release_owner_lock(self._owner_fd)
            raise
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._init_meta()
        except BaseException:
            self._conn.close()
            release_owner_lock(self._owner_fd)
            raise

    # -- setup ---------------------------------------------------------------------------------------------
    def _init_meta(self) -> None:
        with self._tx():
            have = {
                r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
            }
            meta: dict[str, str] = {}
            if "meta" in have:
                meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            if meta:
                schema = meta.get("schema_version")
                if schema != str(SCHEMA_VERSION):
                    raise StoreError(
                        f"store {self.path} has schema version {schema}, this larimar reads schema version "
                        f"{SCHEMA_VERSION}"
                    )
                if meta.get("fingerprint") != self.fingerprint:
                    raise StoreError(
                        f"store {self.path} was made for checkpoint fingerprint {meta.get('fingerprint')!r}, "
                        f"but it was opened with fingerprint {self.fingerprint!r}; use the matching checkpoint or "
                        f"another store path"
                    )
                self._check_memory_config(meta)
                return
            if have - {"sqlite_sequence"}:
                raise StoreError(f"{self.db_path} is an SQLite database but not a larimar store (no meta table)")
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    self._conn.execute(stmt)
            rows = {"schema_version": str(SCHEMA_VERSION), "fingerprint": self.fingerprint, "created": str(time.time())}
            if self.memory_module is not None:
                cfg = self.memory_module.config
                rows.update(num_slots=str(cfg.num_slots), code_size=str(cfg.code_size))
            self._conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", rows.items())
        logger.info("created larimar store at %s (fingerprint %s)", self.path, self.fingerprint)

    def _check_memory_config(self, meta: dict[str, str]) -> None:
        if self.memory_module is None:
            return
        cfg = self.memory_module.config
        want = {"num_slots": str(cfg.num_slots), "code_size": str(cfg.code_size)}
        if "num_slots" not in meta:  # made without a memory module: record the shapes now
            self._conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", want.items())
            return
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise StoreError(f"store {self.path} holds memories of shape {got}, the memory module has {want}")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction (serialised with other writers, also across processes)."""
        with self._db_lock:
            self._check_open()
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._db_lock:
            self._check_open()
            return self._conn.execute(sql, args).fetchall()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")

    def _need_memory(self) -> EpisodicMemory:
        if self.memory_module is None:
            raise StoreError("this store was opened without a memory module (memory=None); memories are unavailable")
        return self.memory_module

    def _lock(self, namespace: str) -> RWLock:
        with self._locks_lock:
            lock = self._ns_locks.get(namespace)
            if lock is None:
                lock = self._ns_locks[namespace] = RWLock()
            return lock

    # -- lifecycle -----------------------------------------------------------------------------------------
    def close(self, snapshot: bool = True) -> None:
        """Closes the database, first snapshotting every loaded namespace with unsnapshotted operations.

        Args:
            snapshot: write those snapshots (the log has everything either way).
        """
        if self._closed:
            return
        for ns in self.loaded() if snapshot else []:
            with self._lock(ns).write():
                live = self._live.get(ns)
                if live is not None and live.applied_seq > live.snapshot_seq:
                    try:
                        self._snapshot_locked(ns, live)
                    except OSError as err:  # the log still has everything
                        logger.warning("could not snapshot namespace %r on close: %s", ns, err)
        with self._db_lock:
            self._conn.close()
            self._closed = True
        release_owner_lock(self._owner_fd)
        self._owner_fd = None

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- introspection -------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        """The meta table (schema_version, fingerprint, created, num_slots, code_size)."""
        return dict(self._query("SELECT key, value FROM meta"))

    def namespaces(self) -> list[str]:
        """Names of the namespaces ever written to, sorted."""
        return [r[0] for r in self._query("SELECT name FROM namespaces ORDER BY name")]

    def has_namespace(self, namespace: str) -> bool:
        """True if `namespace` was ever written to."""
        check_namespace(namespace)
        return bool(self._query("SELECT 1 FROM namespaces WHERE name = ?", (namespace,)))

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` result ("ok" when the database is sound)."""
        return str(self._query("PRAGMA integrity_check")[0][0])

    def log(self, namespace: str, after_seq: int = 0) -> list[LogEntry]:
        """The edit log of `namespace` (rows with seq > after_seq), oldest first."""
        check_namespace(namespace)
        rows = self._query(
            "SELECT seq, namespace, id, op, text, latent, latent_shape, key, key_shape, timestamp, provenance "
            "FROM log WHERE namespace = ? AND seq > ? ORDER BY seq",
            (namespace, after_seq),
        )
        return [
            LogEntry(
                seq=r[0], namespace=r[1], id=r[2], op=r[3], text=r[4], latent=blob_to_tensor(r[5], r[6]),
                key=blob_to_tensor(r[7], r[8]), timestamp=r[9], provenance=json.loads(r[10]),
            )
            for r in rows
        ]

    def _facts_db(self, namespace: str) -> list[Fact]:
        rows = self._query(
            "SELECT l.id, l.text, l.seq, l.timestamp, l.provenance FROM facts f JOIN log l ON l.seq = f.seq "
            "WHERE f.namespace = ? ORDER BY l.seq",
            (namespace,),
        )
        return [Fact(id=r[0], text=r[1], seq=r[2], timestamp=r[3], provenance=json.loads(r[4])) for r in rows]

    def facts(self, namespace: str) -> list[Fact]:
        """The live facts of `namespace` in write order (empty for an unknown namespace)."""
        check_namespace(namespace)
        with self._lock(namespace).read():
            return self._facts_db(namespace)

    def size(self, namespace: str) -> int:
        """Number of live facts in `namespace`."""
        check_namespace(namespace)
        return int(self._query("SELECT COUNT(*) FROM facts WHERE namespace = ?", (namespace,))[0][0])

    def taken_ids(self, namespace: str, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` that are live in `namespace` (a cheap check before encoding; `write` checks again
        under the namespace lock)."""
        check_namespace(namespace)
        ids = list(dict.fromkeys(ids))
        taken: set[str] = set()
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            rows = self._query(
                f"SELECT id FROM facts WHERE namespace = ? AND id IN ({', '.join('?' * len(part))})",
                (namespace, *part),
            )
            taken.update(r[0] for r in rows)
        return [i for i in ids if i in taken]

    def _max_seq(self, namespace: str) -> int:
        return int(self._query("SELECT COALESCE(MAX(seq), 0) FROM log WHERE namespace = ?", (namespace,))[0][0])

    # -- memories ------------------------------------------------------------------------------------------
    def memory(self, namespace: str) -> ItemMemory:
        """The live memory of `namespace` (loaded on first use; an empty memory for a new namespace).

        Mutating it directly bypasses the log; use `write` / `forget`. For a consistent read while other threads
        write, use `reading`. Beyond ``max_loaded`` namespaces the object returned may be evicted later (a later
        call returns a reloaded one): do not keep it.
        """
        check_namespace(namespace)
        self._need_memory()
        with self._lock(namespace).write():
            return self._load_locked(namespace).memory

    @contextlib.contextmanager
    def reading(self, namespace: str) -> Iterator[tuple[ItemMemory, dict[str, str]]]:
        """Holds the namespace's read lock; yields (memory, {id: text} of the live facts) with no write half-applied.

        Do not mutate what it yields.
        """
        check_namespace(namespace)
        self._need_memory()
        lock = self._lock(namespace)
        with lock.read():
            with self._live_lock:
                live = self._live.get(namespace)
                if live is not None:
                    self._live.move_to_end(namespace)
            if live is not None:
                yield live.memory, live.texts
                return
        with lock.write():  # load it; this first read holds the lock alone (it could be evicted again else)
            live = self._load_locked(namespace)
            yield live.memory, live.texts

    def _load_locked(self, namespace: str) -> LiveNamespace:
        """The namespace's live state, loaded if needed (the caller holds its write lock)."""
        with self._live_lock:
            live = self._live.get(namespace)
            if live is not None:
                self._live.move_to_end(namespace)
                return live
        live = self._load_snapshot(namespace)
        if live is None:
            im = self.rebuild(namespace)
            live = LiveNamespace(im, self._texts_of(namespace, im.ids), self._max_seq(namespace), 0)
        with self._live_lock:
            self._live[namespace] = live
        self._evict(keep=namespace)
        return live

    def loaded(self) -> list[str]:
        """The namespaces held in RAM, least recently used first."""
        with self._live_lock:
            return list(self._live)

    def _evict(self, keep: str) -> None:
        """Evicts least recently used namespaces beyond ``max_loaded``; one in use (its lock held) is skipped,
        never waited for, so this cannot deadlock with a caller holding another namespace's lock."""
        if self.max_loaded is None:
            return
        with self._live_lock:
            over = len(self._live) - self.max_loaded
            candidates = [ns for ns in self._live if ns != keep]
        for ns in candidates:
            if over <= 0:
                return
            lock = self._lock(ns)
            if not lock.try_acquire_write():
                continue
            try:
                live = self._live.get(ns)
                if live is None:
                    continue
                if live.applied_seq > live.snapshot_seq:
                    try:
                        self._snapshot_locked(ns, live)
                    except OSError as err:  # the log has everything: it reloads from the older snapshot + log
                        logger.warning("namespace %r: snapshot before eviction failed (%s)", ns, err)
                with self._live_lock:
                    self._live.pop(ns, None)
                over -= 1
            finally:
                lock.release_write()

    def _new_memory(self) -> ItemMemory:
        """An empty memory whose frozen prior copy is the one every loaded namespace shares (never mutated)."""
        im = ItemMemory(self._need_memory())
        ref = self._m_ref
        if ref is not None and ref.device == im.M_ref.device and torch.equal(ref, im.M_ref):
            im.M_ref = ref
        else:
            self._m_ref = im.M_ref
        return im

    def _texts_of(self, namespace: str, ids: list[str]) -> dict[str, str]:
        facts = {f.id: f.text for f in self._facts_db(namespace)}
        missing = [i for i in ids if i not in facts]
        if missing or len(facts) != len(ids):
            raise StoreError(
                f"namespace {namespace!r}: the memory holds {len(ids)} items but the facts table {len(facts)} "
                f"(missing {missing[:5]}); the store is inconsistent"
            )
        return {i: facts[i] for i in ids}

    def rebuild(self, namespace: str) -> ItemMemory:
        """A fresh memory rebuilt from the log: the live items (written, not forgotten) in write order.

        Recursive least squares depends only on the set of written-and-not-forgotten items, so this equals the
        sequentially edited memory (up to float64 rounding). Keys recomputed from the latents are checked
        against the logged keys.

        Raises:
            StoreError: the logged keys do not match this memory module's prior (another checkpoint).
        """
        check_namespace(namespace)
        im = self._new_memory()
        live: dict[str, LogEntry] = {}
        for e in self.log(namespace):
            if e.op == "write":
                live[e.id] = e
            else:
                live.pop(e.id, None)
        if not live:
            return im
        entries = list(live.values())
        Z = torch.stack([e.latent for e in entries]).to(im.device)  # (n, C)  # type: ignore[misc]
        logged = [e.key for e in entries]
        if all(k is not None for k in logged):
            W = im.keys_for(Z)  # (n, K)
            W_log = torch.stack(logged).to(W.device)  # type: ignore[arg-type]  # (n, K)
            if W_log.shape != W.shape or not torch.allclose(W, W_log, rtol=1e-6, atol=1e-9):
                raise StoreError(
                    f"namespace {namespace!r}: keys recomputed from the logged latents differ from the logged keys; "
                    f"the memory module's prior M0 is not the one this store was written with"
                )
        im.write(Z, ids=[e.id for e in entries])
        return im

    @staticmethod
    def _apply(im: ItemMemory, entries: Sequence[LogEntry]) -> None:
        """Applies consecutive log rows of one operation (all writes or all forgets) to a memory."""
        if not entries:
            return
        if entries[0].op == "write":
            Z = torch.stack([e.latent for e in entries])  # (n, C)  # type: ignore[misc]
            im.write(Z, ids=[e.id for e in entries])
        else:
            im.forget([e.id for e in entries])

    def _after_commit(self, namespace: str, live: LiveNamespace, entries: list[LogEntry]) -> None:
        """Applies committed rows to RAM; on failure the namespace is rebuilt from the log (the truth)."""
        try:
            self._apply(live.memory, entries)
            if entries[0].op == "write":
                live.texts.update((e.id, e.text or "") for e in entries)
            else:
                for e in entries:
                    live.texts.pop(e.id, None)
            live.applied_seq = entries[-1].seq
        except Exception:
            logger.exception("namespace %r: in-RAM update failed after commit; rebuilding from the log", namespace)
            with self._live_lock:
                self._live.pop(namespace, None)
            self._load_locked(namespace)
            return
        if self.snapshot_every and live.applied_seq - live.snapshot_seq >= self.snapshot_every:
            try:
                self._snapshot_locked(namespace, live)
            except OSError as err:  # durability comes from the log; a failed snapshot only costs open time
                logger.warning("namespace %r: snapshot failed (%s)", namespace, err)

    def write(
        self,
        namespace: str,
        texts: Sequence[str],
        latents: Tensor,
        ids: Sequence[str] | None = None,
        provenance: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    ) -> list[str]:
        """Writes facts (one transaction, durable before returning) and updates the namespace's memory.

        Args:
            namespace: the namespace (created on first write).
            texts: n fact sentences.
            latents: their encodings (n, C), finite.
            ids: n new ids (default: random hex ids); must not be live in the namespace.
            provenance: a JSON-serialisable dict for all items, or one per item.

        Returns:
            The n ids, in order.

        Raises:
            ValueError: empty / non-string texts, wrong latent shape, non-finite values, bad / duplicate / live
                ids, non-JSON provenance. Nothing is changed.
        """
        check_namespace(namespace)
        mem = self._need_memory()
        C = mem.config.code_size
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
        texts = [check_text(t, "a fact") for t in texts]
        n = len(texts)
        if n == 0:
            raise ValueError("nothing to write: texts is empty")
        if not isinstance(latents, Tensor) or latents.dim() != 2 or tuple(latents.shape) != (n, C):
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a tensor of shape ({n}, {C}) for {n} texts, got {shape}")
        if not latents.is_floating_point() or not bool(torch.isfinite(latents).all()):
            raise ValueError("latents must be finite floating-point values")
        if ids is None:
            ids = [uuid.uuid4().hex[:16] for _ in range(n)]
        ids = list(ids)
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} ids for {n} texts")
        for i in ids:
            if not isinstance(i, str) or not ID_RE.fullmatch(i):
                raise ValueError(
                    f"ids must be 1-128 characters of letters, digits, '_', '.', ':', '-' starting with a letter "
                    f"or digit, got {i!r}"
                )
        if len(set(ids)) != n:
            raise ValueError("ids must be unique within one write")
        if provenance is None or isinstance(provenance, dict):
            provs = [provenance or {}] * n
        else:
            provs = list(provenance)
            if len(provs) != n or not all(isinstance(p, dict) for p in provs):
                raise ValueError(f"provenance must be a dict or a list of {n} dicts")
        try:
            prov_json = [json.dumps(p, allow_nan=False, ensure_ascii=False) for p in provs]
            for p in prov_json:
                p.encode("utf-8")
        except (TypeError, ValueError, UnicodeEncodeError) as err:
            raise ValueError(f"provenance must be JSON-serialisable: {err}") from None
        Z = latents.detach().to("cpu", torch.float64)  # (n, C)

        with self._lock(namespace).write():
            live = self._load_locked(namespace)
            taken = [i for i in ids if i in live.texts]
            if taken:
                raise ValueError(f"ids already in namespace {namespace!r}: {taken[:5]}")
            W = live.memory.keys_for(Z.to(live.memory.device))  # (n, K)
            now = time.time()
            entries: list[LogEntry] = []
            with self._tx() as db:
                db.execute("INSERT OR IGNORE INTO namespaces (name, created) VALUES (?, ?)", (namespace, now))
                for k in range(n):
                    z_blob, z_shape = tensor_to_blob(Z[k])
                    w_blob, w_shape = tensor_to_blob(W[k])
                    cur = db.execute(
                        "INSERT INTO log (namespace, id, op, text, latent, latent_shape, key, key_shape, timestamp, "
                        "provenance) VALUES (?, ?, 'write', ?, ?, ?, ?, ?, ?, ?)",
                        (namespace, ids[k], texts[k], z_blob, z_shape, w_blob, w_shape, now, prov_json[k]),
                    )
                    seq = int(cur.lastrowid or 0)
                    db.execute("INSERT INTO facts (namespace, id, seq) VALUES (?, ?, ?)", (namespace, ids[k], seq))
                    entries.append(
                        LogEntry(seq, namespace, ids[k], "write", texts[k], Z[k], W[k].cpu(), now, provs[k])
                    )
            self._after_commit(namespace, live, entries)
        return ids

    def forget(self, namespace: str, ids: Sequence[str], provenance: dict[str, Any] | None = None) -> None:
        """Forgets facts exactly (one transaction, durable before returning).

        Raises:
            KeyError: an id is not live in the namespace (nothing is changed).
            ValueError: no ids, or duplicated ids.
        """
        check_namespace(namespace)
        self._need_memory()
        if isinstance(ids, str):
            ids = [ids]
        ids = list(ids)
        if not ids:
            raise ValueError("nothing to forget: ids is empty")
        if len(set(ids)) != len(ids):
            raise ValueError("ids to forget must be unique")
        try:
            prov = json.dumps(provenance or {}, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"provenance must be JSON-serialisable: {err}") from None
        with self._lock(namespace).write():
            live = self._load_locked(namespace)
            missing = [i for i in ids if i not in live.texts]
            if missing:
                raise KeyError(f"no fact with id(s) {missing[:5]} in namespace {namespace!r}")
            now = time.time()
            entries: list[LogEntry] = []
            with self._tx() as db:
                for i in ids:
                    cur = db.execute(
                        "INSERT INTO log (namespace, id, op, timestamp, provenance) VALUES (?, ?, 'forget', ?, ?)",
                        (namespace, i, now, prov),
                    )
                    deleted = db.execute("DELETE FROM facts WHERE namespace = ? AND id = ?", (namespace, i)).rowcount
                    if deleted != 1:  # another process changed the store under us
                        raise StoreError(f"fact {i!r} of namespace {namespace!r} vanished from the database")
                    entries.append(
                        LogEntry(int(cur.lastrowid or 0), namespace, i, "forget", None, None, None, now, {})
                    )
            self._after_commit(namespace, live, entries)
