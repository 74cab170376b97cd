"""Second-moment statistics C = E[k k^T] of an MLP's input, cached on disk (ROME / MEMIT's covariance).

``layer_stats`` runs the model over a text corpus (by default the shared English Wikipedia text), collects
the input k (d_ff) of one module at every token position until ``n_tokens`` positions are seen, and returns
C = (1/N) sum k k^T  (d_ff, d_ff), float32. The result is stored as safetensors under
``cache_root()/stats/<model fingerprint>/`` and keyed by model fingerprint, module name, corpus and token
count, so it is computed once. ``cache_root()`` is ``$LARIMAR_CACHE`` when set, else
``platformdirs.user_cache_dir("larimar")``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from larimar import backbones
from larimar.baselines.nethook import Trace

logger = logging.getLogger(__name__)

WIKIPEDIA_REL_PATH = Path("wikipedia_en") / "enwiki_2018_train.jsonl"

_MEMORY_CACHE: dict[str, torch.Tensor] = {}


def cache_root() -> Path:
    """The cache directory: ``$LARIMAR_CACHE`` if set, else the platform's user cache dir for "larimar"."""
    return backbones.cache_dir()


def default_data_dir() -> Path:
    """The data folder that named corpora ("wikipedia_en") and relative demonstration files are looked up in:
    ``$LARIMAR_DATA_DIR`` if set, else ``../shared/data`` relative to the current directory (where the commands in
    the docs run). Never a path inside or beside the installed package."""
    env = os.environ.get("LARIMAR_DATA_DIR")
    return Path(env) if env else Path("..") / "shared" / "data"


def resolve_corpus(corpus: str | Path) -> Path:
    """Map ``"wikipedia_en"`` to the shared Wikipedia file, anything else to a path; FileNotFoundError if absent."""
    path = default_data_dir() / WIKIPEDIA_REL_PATH if str(corpus) == "wikipedia_en" else Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(
            f"statistics corpus {path} not found (expected 'wikipedia_en' with $LARIMAR_DATA_DIR or "
            "../shared/data present, or a .jsonl / .txt file)"
        )
    return path


def iter_texts(path: Path) -> Iterator[str]:
    """Texts of a ``.jsonl`` file (field ``"text"``) or of a plain text file (one per non-empty line)."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            yield json.loads(line)["text"] if path.suffix == ".jsonl" else line


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's config and (a strided sample of) its input embedding.

    The embedding is never edited by the baselines, so the fingerprint stays put across edits.
    """
    h = hashlib.sha256()
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    emb = model.get_input_embeddings().weight.detach()
    sample = emb.flatten()[:: max(1, emb.numel() // 65536)].float().cpu()  # (<= ~65k,)
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_path(fingerprint: str, module_name: str, corpus: Path, n_tokens: int, seq_len: int) -> Path:
    stat = corpus.stat()
    corpus_id = hashlib.sha256(f"{corpus.resolve()}:{stat.st_size}".encode()).hexdigest()[:8]
    name = f"{module_name}__{corpus.stem}-{corpus_id}__n{n_tokens}__s{seq_len}.safetensors"
    return cache_root() / "stats" / fingerprint / name


@torch.no_grad()
def layer_stats(
    model: nn.Module,
    tok,
    module_name: str,
    corpus: str | Path = "wikipedia_en",
    n_tokens: int = 100_000,
    seq_len: int = 256,
    use_cache: bool = True,
) -> torch.Tensor:
    """The second moment C = E[k k^T] of the input of ``module_name``.

    Args:
        model: a causal LM (any device); only the blocks up to ``module_name`` run.
        tok: its tokenizer.
        module_name: e.g. ``"model.layers.5.mlp.down_proj"``.
        corpus: ``"wikipedia_en"`` or a ``.jsonl`` / ``.txt`` path (see ``iter_texts``).
        n_tokens: token positions to average over (stops early if the corpus runs out).
        seq_len: texts are truncated to this many tokens.
        use_cache: read / write the safetensors cache.

    Returns:
        C, shape (d_in, d_in), float32, on the model's device.
    """
    device = next(model.parameters()).device
    corpus_path = resolve_corpus(corpus)
    path = _cache_path(model_fingerprint(model), module_name, corpus_path, n_tokens, seq_len)
    key = str(path)
    if use_cache and key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key].to(device)
    if use_cache and path.is_file():
        logger.info("loading layer statistics from %s", path)
        mom2 = load_file(str(path))["mom2"]
        _MEMORY_CACHE[key] = mom2
        return mom2.to(device)

    was_training = model.training
    model.eval()
    total: torch.Tensor | None = None
    count = 0
    with tqdm(total=n_tokens, desc=f"stats {module_name}", unit="tok") as bar:
        for text in iter_texts(corpus_path):
            ids = tok(text, truncation=True, max_length=seq_len, return_tensors="pt")["input_ids"].to(device)  # (1, T)
            if ids.shape[1] < 2:
                continue
            with Trace(model, module_name, retain_input=True, retain_output=False, stop=True) as tr:
                model(input_ids=ids)
            k = tr.input.reshape(-1, tr.input.shape[-1]).double()  # (T, d_in)
            k = k[: n_tokens - count]
            total = k.T @ k if total is None else total + k.T @ k  # (d_in, d_in)
            count += k.shape[0]
            bar.update(k.shape[0])
            if count >= n_tokens:
                break
    model.train(was_training)
    if total is None:
        raise ValueError(f"statistics corpus {corpus_path} gave no text of at least 2 tokens")
    if count < n_tokens:
        logger.warning("corpus %s ran out after %d of %d tokens", corpus_path, count, n_tokens)
    mom2 = (total / count).float().cpu()  # (d_in, d_in)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"module": module_name, "corpus": str(corpus_path), "n_tokens": str(count), "seq_len": str(seq_len)}
        save_file({"mom2": mom2.contiguous()}, str(path), metadata=meta)
        _MEMORY_CACHE[key] = mom2
        logger.info("saved layer statistics to %s", path)
    return mom2.to(device)


def inverse_cov_times(mom2: torch.Tensor, k: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve (C + ridge * mean(diag C) * I) x = k for x.

    Args:
        mom2: C, (d, d).
        k: right-hand sides, (d,) or (d, n).
        ridge: relative ridge.

    Returns:
        x with the shape of k.
    """
    c = mom2.double()
    c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)  # (d, d)
    return torch.linalg.solve(c, k.double()).to(k.dtype)
