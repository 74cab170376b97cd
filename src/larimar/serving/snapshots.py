"""Snapshots of the memory store: a namespace's items as safetensors + a JSON manifest, so that opening is fast.

The edit log stays the source of truth (`larimar.serving.store`); a missing, stale or inconsistent snapshot falls back
to a rebuild from the log."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from larimar.memory import ItemMemory
from larimar.serving.storage import (
    SCHEMA_VERSION,
    LiveNamespace,
    atomic_write,
    check_namespace,
)

logger = logging.getLogger(__name__)


class Snapshots:
    """The snapshot methods of `MemoryStore` (a mixin over its paths, locks, log queries and memory module)."""

    def _prior_digest(self) -> str:
        """sha256 of the memory module's prior M0 (float64), recorded in snapshots instead of a copy of it."""
        if self._prior is None:
            m0 = self._need_memory().M0.detach().to("cpu", torch.float64).contiguous()
            self._prior = "sha256:" + hashlib.sha256(m0.numpy().tobytes()).hexdigest()
        return self._prior

    def _snapshot_dir(self, namespace: str) -> Path:
        return self.path / "snapshots" / namespace

    def snapshot(self, namespace: str) -> Path:
        """Writes a snapshot of the namespace's memory now (atomically); returns its file."""
        check_namespace(namespace)
        self._need_memory()
        with self._lock(namespace).write():
            return self._snapshot_locked(namespace, self._load_locked(namespace))

    def _snapshot_locked(self, namespace: str, live: LiveNamespace) -> Path:
        folder = self._snapshot_dir(namespace)
        folder.mkdir(parents=True, exist_ok=True)
        mem = live.memory
        C = mem.config.code_size
        full = len(mem) > mem.config.num_slots  # beyond K items the dense state is smaller than the items
        Z = torch.stack([mem.latent(i) for i in mem.ids]) if len(mem) else torch.zeros(0, C, dtype=torch.float64)
        tensors = {"Z": Z}
        if full:
            tensors.update(M=mem.M, U=mem.U)
        tensors = {k: v.detach().to("cpu", torch.float64).contiguous().clone() for k, v in tensors.items()}
        manifest = {
            "namespace": namespace,
            "last_seq": live.applied_seq,
            "ids": live.memory.ids,
            "fingerprint": self.fingerprint,
            "schema_version": SCHEMA_VERSION,
            "state": "full" if full else "items",
            "prior": self._prior_digest(),
            "file": f"snap-{live.applied_seq:012d}.safetensors",
            "created": time.time(),
        }
        blob = json.dumps(manifest)
        snap = folder / manifest["file"]
        atomic_write(snap, lambda p: save_file(tensors, str(p), metadata={"manifest": blob}))
        atomic_write(folder / "manifest.json", lambda p: Path(p).write_text(blob, encoding="utf-8"))
        for old in folder.glob("snap-*.safetensors"):
            if old.name != snap.name:
                old.unlink(missing_ok=True)
        live.snapshot_seq = live.applied_seq
        return snap

    def _load_snapshot(self, namespace: str) -> LiveNamespace | None:
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
            im = self._memory_from_snapshot(manifest, tensors, ids)
            applied = last_seq
            for e in self.log(namespace, after_seq=last_seq):
                self._apply(im, [e])
                applied = e.seq
            live = LiveNamespace(im, self._texts_of(namespace, im.ids), applied, last_seq)
        except Exception as err:  # any damage (incl. SafetensorError): the log is the truth
            logger.warning(
                "namespace %r: ignoring snapshot in %s (%s); rebuilding from the log", namespace, folder, err
            )
            return None
        return live

    def _memory_from_snapshot(self, manifest: dict[str, Any], tensors: dict[str, Tensor], ids: list[str]) -> ItemMemory:
        """The memory a snapshot describes: its items written from the prior in one block (state "items"), or its
        stored M, U with keys recomputed from Z (state "full"); older snapshots with M_ref are read as they are."""
        module = self._need_memory()
        if "M_ref" in tensors:  # a snapshot of the first format: M, U, M_ref, Z, W
            im = ItemMemory.from_state_tensors(module, tensors, ids)
            if self._m_ref is not None and torch.equal(self._m_ref, im.M_ref):
                im.M_ref = self._m_ref
            return im
        if manifest.get("prior") != self._prior_digest():
            raise ValueError("snapshot written with another prior M0")
        C = module.config.code_size
        Z = tensors.get("Z")
        if Z is None or tuple(Z.shape) != (len(ids), C):
            raise ValueError(f"snapshot latents must have shape {(len(ids), C)}")
        im = self._new_memory()
        if manifest.get("state") == "items":
            if ids:
                im.write(Z.to(im.device, torch.float64), ids=ids)
            return im
        if manifest.get("state") != "full":
            raise ValueError(f"unknown snapshot state {manifest.get('state')!r}")
        Z = Z.to(im.device, torch.float64)
        state = {"M": tensors.get("M"), "U": tensors.get("U"), "M_ref": im.M_ref, "Z": Z, "W": im.keys_for(Z)}
        if state["M"] is None or state["U"] is None:
            raise ValueError("a full snapshot must hold M and U")
        full = ItemMemory.from_state_tensors(module, state, ids)  # type: ignore[arg-type]
        full.M_ref = im.M_ref
        return full
