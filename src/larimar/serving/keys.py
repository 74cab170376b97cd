"""API keys of the memory store: salted hashes in its ``api_keys`` table, tokens shown once."""

from __future__ import annotations

import contextlib
import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from larimar.serving.storage import (
    ALL_NAMESPACES,
    KEY_NAME_RE,
    RIGHTS,
    TOKEN_PREFIX,
    ApiKey,
    check_namespace,
    hash_secret,
)


class ApiKeys:
    """The API-key methods of `MemoryStore` (a mixin over its ``_tx`` transaction and ``_query`` read)."""

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:  # provided by MemoryStore
        raise NotImplementedError

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:  # provided by MemoryStore
        raise NotImplementedError

    def add_key(self, name: str, namespace: str, rights: str) -> str:
        """Creates an API key and returns its token (shown once; only a salted hash is stored).

        Args:
            name: a unique label (1-64 chars of [A-Za-z0-9_.@-]).
            namespace: the namespace it grants, or "*" for all.
            rights: "read" or "write" (write includes read).

        Raises:
            ValueError: bad name / namespace / rights, or the name is taken.
        """
        if not isinstance(name, str) or not KEY_NAME_RE.fullmatch(name):
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
                (key_id, name, namespace, rights, salt, hash_secret(salt, secret), time.time()),
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
        if not hmac.compare_digest(hash_secret(r[6], parts[2]), r[7]) or r[5] is not None:
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
