"""Persistent episodic memories: an SQLite edit log per namespace plus safetensors snapshots.

Layout of a store folder (default ``platformdirs.user_data_dir("larimar")``)::

    store.sqlite3                    meta, namespaces, the edit log, live facts, API keys (WAL, synchronous=FULL)
    snapshots/<namespace>/manifest.json
    snapshots/<namespace>/snap-<seq>.safetensors   ItemMemory.state_tensors() + the manifest as metadata

The log is the source of truth. Each row is one item operation: (seq, namespace, id, op = write | forget, text,
latent (float64 bytes + recorded shape, never pickle), key (the item's address W_i, float64), timestamp,
provenance JSON). Every write / forget is one transaction, committed (fsync'ed) before the in-RAM memory is
updated and before the call returns; if the RAM update fails after commit the namespace is rebuilt from the log.
Snapshots only make opening fast: on open the newest snapshot is loaded and the log rows after its ``last_seq``
are replayed; a missing, stale or inconsistent snapshot falls back to ``rebuild`` (the live items of the log
written into an empty memory, which equals the sequentially edited memory because recursive least squares
depends only on the set of items written and not forgotten).

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
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from larimar.memory import EpisodicMemory, ItemMemory

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "store.sqlite3"
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
RIGHTS = ("read", "write")
ALL_NAMESPACES = "*"
TOKEN_PREFIX = "lmk"
MAX_TEXT_CHARS = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS namespaces (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL REFERENCES namespaces(name),
    id TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('write', 'forget')),
    text TEXT,
    latent BLOB,
    latent_shape TEXT,
    key BLOB,
    key_shape TEXT,
    timestamp REAL NOT NULL,
    provenance TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS log_ns_seq ON log (namespace, seq);
CREATE TABLE IF NOT EXISTS facts (
    namespace TEXT NOT NULL REFERENCES namespaces(name),
    id TEXT NOT NULL,
    seq INTEGER NOT NULL REFERENCES log(seq),
    PRIMARY KEY (namespace, id)
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    namespace TEXT NOT NULL,
    rights TEXT NOT NULL CHECK (rights IN ('read', 'write')),
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    created REAL NOT NULL,
    revoked REAL
);
"""


class StoreError(RuntimeError):
    """The store cannot be used as asked (other checkpoint fingerprint, other schema, no memory module)."""


@dataclass(frozen=True)
class Fact:
    """A live item of a namespace: its id, sentence, log position, time and provenance."""

    id: str
    text: str
    seq: int
    timestamp: float
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LogEntry:
    """One row of a namespace's edit log. ``latent`` (C,) and ``key`` (K,) are float64, None for forgets."""

    seq: int
    namespace: str
    id: str
    op: str
    text: str | None
    latent: Tensor | None
    key: Tensor | None
    timestamp: float
    provenance: dict[str, Any]


@dataclass(frozen=True)
class ApiKey:
    """An API key's public record (the token itself is never stored)."""

    key_id: str
    name: str
    namespace: str
    rights: str
    created: float
    revoked: float | None

    def allows(self, namespace: str | None, need: str) -> bool:
        """True if this key grants `need` ("read" | "write") on `namespace` (None: any namespace, e.g. no memory)."""
        if self.revoked is not None:
            return False
        if need == "write" and self.rights != "write":
            return False
        return namespace is None or self.namespace in (ALL_NAMESPACES, namespace)


class RWLock:
    """A readers-writer lock: readers in parallel, one writer alone; waiting writers block new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _Live:
    """The in-RAM state of one namespace: its memory, the live facts' texts (write order), last applied seq."""

    memory: ItemMemory
    texts: dict[str, str]
    applied_seq: int
    snapshot_seq: int


def default_store_path() -> Path:
    """The default store folder: ``platformdirs.user_data_dir("larimar")``."""
    import platformdirs

    return Path(platformdirs.user_data_dir("larimar"))


def check_namespace(namespace: object) -> str:
    """Returns `namespace` if it is a valid name (1-64 chars of [A-Za-z0-9_.-], starting alphanumeric)."""
    if not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace):
        raise ValueError(
            f"namespace must be 1-64 characters of letters, digits, '_', '.', '-' starting with a letter or digit, "
            f"got {namespace!r}"
        )
    return namespace


def check_text(text: object, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Returns `text` if it is a non-blank UTF-8-encodable string without NUL of at most `max_chars`."""
    if not isinstance(text, str):
        raise ValueError(f"fact text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("fact text must not be empty")
    if len(text) > max_chars:
        raise ValueError(f"fact text must be at most {max_chars} characters, got {len(text)}")
    if "\x00" in text:
        raise ValueError("fact text must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"fact text must be valid Unicode (no lone surrogates): {err}") from None
    return text


def _tensor_to_blob(t: Tensor) -> tuple[bytes, str]:
    """float64 little-endian bytes and the JSON shape of a tensor (never pickle)."""
    t64 = t.detach().to("cpu", torch.float64).contiguous()
    return t64.numpy().astype("<f8", copy=False).tobytes(), json.dumps(list(t64.shape))


def _blob_to_tensor(blob: bytes | None, shape: str | None) -> Tensor | None:
    if blob is None:
        return None
    dims = tuple(json.loads(shape)) if shape else (len(blob) // 8,)
    t = torch.frombuffer(bytearray(blob), dtype=torch.float64)
    return t.reshape(dims)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform (e.g. Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Writes a file atomically: `write(tmp_path)`, fsync, os.replace, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _acquire_owner_lock(path: Path) -> int | None:
    """An exclusive advisory lock (flock) on `path`, released by the OS if the process dies.

    Raises:
        StoreError: another open store (this or another process) owns the memories.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no owner lock
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(
            f"store {path.parent} is already open with a memory module (by another process or another MemoryStore "
            f"in this one); one owner at a time, or open it with memory=None for keys and logs"
        ) from None
    return fd


def _release_owner_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def _hash_secret(salt: bytes, secret: str) -> bytes:
    # The secret is 32 random bytes (256 bits), so a salted SHA-256 is enough (no password stretching needed)
    # and keeps a key check at microseconds per request.
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


class MemoryStore:
    """Persistent namespaced episodic memories and API keys, in one store folder.

    Args:
        path: the store folder (created if missing); default `default_store_path()`.
        fingerprint: the checkpoint fingerprint this store is tied to (non-empty string).
        memory: the memory module (its config and frozen prior M0) the namespaces' `ItemMemory` use; None opens
            the store for log reading and key management only.
        snapshot_every: write a namespace snapshot after this many logged operations (0: only on `snapshot` /
            `close`).

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
    ) -> None:
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
        self._live: dict[str, _Live] = {}
        self._closed = False
        self._owner_fd: int | None = None
        if memory is not None:  # one process owns the in-RAM memories; a second owner would silently diverge
            self._owner_fd = _acquire_owner_lock(self.path / "store.lock")
        try:
            self._conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=30.0)
        except BaseException:
            _release_owner_lock(self._owner_fd)
            raise
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._init_meta()
        except BaseException:
            self._conn.close()
            _release_owner_lock(self._owner_fd)
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
            for stmt in _SCHEMA.split(";"):
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
        for ns in list(self._live) if snapshot else []:
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
        _release_owner_lock(self._owner_fd)
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
                seq=r[0], namespace=r[1], id=r[2], op=r[3], text=r[4], latent=_blob_to_tensor(r[5], r[6]),
                key=_blob_to_tensor(r[7], r[8]), timestamp=r[9], provenance=json.loads(r[10]),
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

    def _max_seq(self, namespace: str) -> int:
        return int(self._query("SELECT COALESCE(MAX(seq), 0) FROM log WHERE namespace = ?", (namespace,))[0][0])

    # -- memories ------------------------------------------------------------------------------------------
    def memory(self, namespace: str) -> ItemMemory:
        """The live memory of `namespace` (loaded on first use; an empty memory for a new namespace).

        Mutating it directly bypasses the log; use `write` / `forget`. For a consistent read while other threads
        write, use `reading`.
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
        while True:
            with lock.read():
                live = self._live.get(namespace)
                if live is not None:
                    yield live.memory, live.texts
                    return
            with lock.write():  # load once, then read under the shared lock
                self._load_locked(namespace)

    def _load_locked(self, namespace: str) -> _Live:
        live = self._live.get(namespace)
        if live is not None:
            return live
        live = self._load_snapshot(namespace)
        if live is None:
            im = self.rebuild(namespace)
            live = _Live(im, self._texts_of(namespace, im.ids), self._max_seq(namespace), 0)
        self._live[namespace] = live
        return live

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
        im = ItemMemory(self._need_memory())
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

    def _snapshot_dir(self, namespace: str) -> Path:
        return self.path / "snapshots" / namespace

    def snapshot(self, namespace: str) -> Path:
        """Writes a snapshot of the namespace's memory now (atomically); returns its file."""
        check_namespace(namespace)
        self._need_memory()
        with self._lock(namespace).write():
            return self._snapshot_locked(namespace, self._load_locked(namespace))

    def _snapshot_locked(self, namespace: str, live: _Live) -> Path:
        folder = self._snapshot_dir(namespace)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {
            "namespace": namespace,
            "last_seq": live.applied_seq,
            "ids": live.memory.ids,
            "fingerprint": self.fingerprint,
            "schema_version": SCHEMA_VERSION,
            "file": f"snap-{live.applied_seq:012d}.safetensors",
            "created": time.time(),
        }
        blob = json.dumps(manifest)
        snap = folder / manifest["file"]
        tensors = {k: v.detach().to("cpu", torch.float64).contiguous() for k, v in live.memory.state_tensors().items()}
        _atomic_write(snap, lambda p: save_file(tensors, str(p), metadata={"manifest": blob}))
        _atomic_write(folder / "manifest.json", lambda p: Path(p).write_text(blob, encoding="utf-8"))
        for old in folder.glob("snap-*.safetensors"):
            if old.name != snap.name:
                old.unlink(missing_ok=True)
        live.snapshot_seq = live.applied_seq
        return snap

    def _load_snapshot(self, namespace: str) -> _Live | None:
        """The newest snapshot plus the log rows after it, or None if it is missing or does not fit the log."""
        folder = self._snapshot_dir(namespace)
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:  # left by a process killed mid-snapshot
            tmp.unlink(missing_ok=True)
        manifest_path = folder / "manifest.json"
        if not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if manifest.get("fingerprint") != self.fingerprint or manifest.get("namespace") != namespace:
                raise ValueError("snapshot of another checkpoint or namespace")
            if manifest.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"snapshot schema {manifest.get('schema_version')}")
            snap = folder / str(manifest["file"])
            with safe_open(str(snap), framework="pt") as f:
                if json.loads((f.metadata() or {}).get("manifest", "null")) != manifest:
                    raise ValueError("snapshot file and manifest disagree")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            last_seq, ids = int(manifest["last_seq"]), [str(i) for i in manifest["ids"]]
            # the log's live ids at last_seq must be the snapshot's ids, in order
            order: dict[str, None] = {}
            for item_id, op in self._query(
                "SELECT id, op FROM log WHERE namespace = ? AND seq <= ? ORDER BY seq", (namespace, last_seq)
            ):
                if op == "write":
                    order[item_id] = None
                else:
                    order.pop(item_id, None)
            if list(order) != ids or last_seq > self._max_seq(namespace):
                raise ValueError(f"snapshot at seq {last_seq} does not match the log")
            im = ItemMemory.from_state_tensors(self._need_memory(), tensors, ids)
            applied = last_seq
            for e in self.log(namespace, after_seq=last_seq):
                self._apply(im, [e])
                applied = e.seq
            live = _Live(im, self._texts_of(namespace, im.ids), applied, last_seq)
        except Exception as err:  # any damage (incl. SafetensorError): the log is the truth
            logger.warning(
                "namespace %r: ignoring snapshot in %s (%s); rebuilding from the log", namespace, folder, err
            )
            return None
        return live

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

    def _after_commit(self, namespace: str, live: _Live, entries: list[LogEntry]) -> None:
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
            del self._live[namespace]
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
        texts = [check_text(t) for t in texts]
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
            if not isinstance(i, str) or not ID_RE.match(i):
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
                    z_blob, z_shape = _tensor_to_blob(Z[k])
                    w_blob, w_shape = _tensor_to_blob(W[k])
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

    # -- API keys ------------------------------------------------------------------------------------------
    def add_key(self, name: str, namespace: str, rights: str) -> str:
        """Creates an API key and returns its token (shown once; only a salted hash is stored).

        Args:
            name: a unique label (1-64 chars of [A-Za-z0-9_.@-]).
            namespace: the namespace it grants, or "*" for all.
            rights: "read" or "write" (write includes read).

        Raises:
            ValueError: bad name / namespace / rights, or the name is taken.
        """
        if not isinstance(name, str) or not KEY_NAME_RE.match(name):
            raise ValueError(f"key name must be 1-64 characters of letters, digits, '_', '.', '@', '-', got {name!r}")
        if namespace != ALL_NAMESPACES:
            check_namespace(namespace)
        if rights not in RIGHTS:
            raise ValueError(f"rights must be one of {RIGHTS}, got {rights!r}")
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM api_keys WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"an API key named {name!r} already exists (revoked keys keep their name)")
            db.execute(
                "INSERT INTO api_keys (key_id, name, namespace, rights, salt, hash, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key_id, name, namespace, rights, salt, _hash_secret(salt, secret), time.time()),
            )
        return f"{TOKEN_PREFIX}_{key_id}_{secret}"

    def lookup_key(self, token: str) -> ApiKey | None:
        """The key record a token belongs to, or None for an unknown, malformed or revoked token."""
        if not isinstance(token, str):
            return None
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not re.fullmatch(r"[0-9a-f]{16}", parts[1]):
            return None
        rows = self._query(
            "SELECT key_id, name, namespace, rights, created, revoked, salt, hash FROM api_keys WHERE key_id = ?",
            (parts[1],),
        )
        if not rows:
            return None
        r = rows[0]
        if not hmac.compare_digest(_hash_secret(r[6], parts[2]), r[7]) or r[5] is not None:
            return None
        return ApiKey(key_id=r[0], name=r[1], namespace=r[2], rights=r[3], created=r[4], revoked=r[5])

    def check_key(self, token: str, namespace: str | None, need: str) -> bool:
        """True if the token is a valid, unrevoked key granting `need` ("read" | "write") on `namespace`."""
        if need not in RIGHTS:
            raise ValueError(f"need must be one of {RIGHTS}, got {need!r}")
        key = self.lookup_key(token)
        return key is not None and key.allows(namespace, need)

    def list_keys(self) -> list[ApiKey]:
        """All keys (revoked ones too), oldest first; never the tokens."""
        rows = self._query("SELECT key_id, name, namespace, rights, created, revoked FROM api_keys ORDER BY created")
        return [ApiKey(*r) for r in rows]

    def revoke_key(self, name: str) -> None:
        """Revokes the key named `name`.

        Raises:
            KeyError: no such (unrevoked) key.
        """
        with self._tx() as db:
            n = db.execute(
                "UPDATE api_keys SET revoked = ? WHERE name = ? AND revoked IS NULL", (time.time(), name)
            ).rowcount
            if n != 1:
                raise KeyError(f"no active API key named {name!r}")
