"""The records, checks and file / lock utilities of the memory store (`larimar.serving.store`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from larimar.memory import ItemMemory

SCHEMA_VERSION = 1
DB_NAME = "store.sqlite3"
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
RIGHTS = ("read", "write")
ALL_NAMESPACES = "*"
TOKEN_PREFIX = "lmk"

SCHEMA = """
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

    def try_acquire_write(self) -> bool:
        """Takes the write lock only if nobody holds it nor reads (no wait); True if taken (`release_write` it)."""
        with self._cond:
            if self._writer or self._readers:
                return False
            self._writer = True
            return True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
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
class LiveNamespace:
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
    if not isinstance(namespace, str) or not NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(
            f"namespace must be 1-64 characters of letters, digits, '_', '.', '-' starting with a letter or digit, "
            f"got {namespace!r}"
        )
    return namespace


def tensor_to_blob(t: Tensor) -> tuple[bytes, str]:
    """float64 little-endian bytes and the JSON shape of a tensor (never pickle)."""
    t64 = t.detach().to("cpu", torch.float64).contiguous()
    return t64.numpy().astype("<f8", copy=False).tobytes(), json.dumps(list(t64.shape))


def blob_to_tensor(blob: bytes | None, shape: str | None) -> Tensor | None:
    if blob is None:
        return None
    dims = tuple(json.loads(shape)) if shape else (len(blob) // 8,)
    t = torch.frombuffer(bytearray(blob), dtype=torch.float64)
    return t.reshape(dims)


def fsync_dir(path: Path) -> None:
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


def atomic_write(path: Path, write: Any) -> None:
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
    fsync_dir(path.parent)


def acquire_owner_lock(path: Path) -> int | None:
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


def release_owner_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def hash_secret(salt: bytes, secret: str) -> bytes:
    # The secret is 32 random bytes (256 bits), so a salted SHA-256 is enough (no password stretching needed)
    # and keeps a key check at microseconds per request.
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


def stored_fingerprint(folder: str | Path) -> str | None:
    """The checkpoint fingerprint a store folder is tied to, read without opening the store (None: no store)."""
    db_path = Path(folder) / DB_NAME
    if not db_path.is_file():
        return None
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
    except sqlite3.Error:
        row = None
    finally:
        conn.close()
    return row[0] if row else None
