"""The saved-memory folder format (`Larimar.save_memory` / `load_memory`, `larimar memories export / import`)::

    memory.safetensors   ItemMemory.state_tensors() (M, U, M_ref, Z, W) [+ scope_embeddings (n, D)]
    memory.json          {"format": "larimar-memory", "version": 1, "fingerprint", "num_slots", "code_size",
                          "scope_encoder", "facts": [{"id", "text", "order"}, ...]}

Each file is written to a temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from larimar.memory import ItemMemory

MEMORY_FORMAT = "larimar-memory"
MEMORY_VERSION = 1
MEMORY_TENSORS = "memory.safetensors"
MEMORY_MANIFEST = "memory.json"


def save_memory_state(
    directory: str | Path,
    memory: ItemMemory,
    texts: Mapping[str, str],
    fingerprint: str,
    scope_embeddings: Tensor | None = None,
    scope_encoder: str | None = None,
) -> Path:
    """Writes a memory as ``memory.safetensors`` + ``memory.json`` (see the module docstring).

    Args:
        directory: created if needed; existing files of the format are replaced.
        memory: the memory (its ids in write order).
        texts: id -> fact sentence, for every id in memory.
        fingerprint: the checkpoint fingerprint the latents were made with.
        scope_embeddings: (n, D) scope embeddings in the memory's id order, if any.
        scope_encoder: the scope encoder's name / path, for the record.

    Returns:
        the directory.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ids = memory.ids
    missing = [i for i in ids if i not in texts]
    if missing:
        raise KeyError(f"no text for memory ids {missing[:5]}")
    tensors = {k: v.contiguous() for k, v in memory.state_tensors().items()}
    if scope_embeddings is not None:
        tensors["scope_embeddings"] = scope_embeddings.detach().to("cpu", torch.float32).contiguous()
    manifest = {
        "format": MEMORY_FORMAT,
        "version": MEMORY_VERSION,
        "fingerprint": fingerprint,
        "num_slots": memory.config.num_slots,
        "code_size": memory.config.code_size,
        "scope_encoder": scope_encoder,
        "facts": [{"id": i, "text": texts[i], "order": k} for k, i in enumerate(ids)],
    }
    tmp = d / (MEMORY_TENSORS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": MEMORY_FORMAT})
    tmp.replace(d / MEMORY_TENSORS)
    tmp = d / (MEMORY_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(d / MEMORY_MANIFEST)
    return d


def read_memory_state(directory: str | Path, fingerprint: str | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Reads and checks a saved memory: (manifest, tensors).

    Args:
        directory: a folder written by `save_memory_state`.
        fingerprint: the expected checkpoint fingerprint (None: not checked).

    Raises:
        FileNotFoundError: missing files.
        ValueError: another format / version, another checkpoint, or inconsistent contents.
    """
    d = Path(directory)
    for name in (MEMORY_TENSORS, MEMORY_MANIFEST):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} not found (expected a folder written by save_memory)")
    try:
        manifest = json.loads((d / MEMORY_MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{d / MEMORY_MANIFEST}: not a JSON manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MEMORY_FORMAT:
        raise ValueError(f"{d / MEMORY_MANIFEST}: not a larimar memory manifest")
    if manifest.get("version") != MEMORY_VERSION:
        raise ValueError(f"{d}: memory format version {manifest.get('version')!r}, expected {MEMORY_VERSION}")
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{d}: this memory was made with checkpoint {manifest.get('fingerprint')!r}, but the loaded model is "
            f"{fingerprint!r}; latents of one checkpoint mean nothing to another (re-edit the facts instead)"
        )
    facts = manifest.get("facts")
    if not isinstance(facts, list) or not all(
        isinstance(f, dict) and isinstance(f.get("id"), str) and isinstance(f.get("text"), str) for f in facts
    ):
        raise ValueError(f"{d / MEMORY_MANIFEST}: 'facts' must be a list of {{id, text, order}}")
    facts.sort(key=lambda f: f.get("order", 0))
    tensors = load_file(str(d / MEMORY_TENSORS))
    n = len(facts)
    if "Z" not in tensors or tensors["Z"].shape[0] != n:
        raise ValueError(f"{d}: {n} facts in the manifest but the tensors hold another number of items")
    emb = tensors.get("scope_embeddings")
    if emb is not None and emb.numel() and emb.shape[0] != n:
        raise ValueError(f"{d}: {emb.shape[0]} scope embeddings for {n} facts")
    return manifest, tensors
