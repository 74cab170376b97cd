"""The user-facing editor: write facts to Larimar's memory, ask, score, forget, save / load.

One `Larimar` holds a trained `LarimarModel`, one editable memory (`ItemMemory`: sequential write, exact forget)
and a scope detector (`ScopeDetector`, all-MiniLM-L6-v2 by default) that sees the same facts under the same ids.

Write path (`Larimar.edit`): parse the facts (`larimar.facts.as_fact`), encode them, refine their latents
(`larimar.editor.refine`), write them into the memory, and add their scope embeddings.
Query path (`Larimar.route`): the scope decision and the read of `larimar.editor.read`, then the decoder.
`score` can instead decide scope on "prompt + candidate answer" (``scope_mode="prompt_answer"``, the paper's
reference code), one decision per candidate.

Usage::

    lm = Larimar.from_pretrained()                                   # the shipped checkpoint
    ids = lm.edit(["The capital of France is Rome."])
    lm.generate("The capital of France is")                          # " Rome ..."
    lm.score("The capital of France is", [" Rome", " Paris"])        # mean NLL per token, lower = more likely
    lm.save_memory("mem/"); lm.forget(ids); lm.load_memory("mem/")
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from larimar.editor.files import read_memory_state, save_memory_state
from larimar.editor.read import (
    QUERY_FREE_READS,
    Routing,
    check_read_mode,
    route,
    route_each,
)
from larimar.editor.refine import (
    Refinement,
    going_on_reads,
    refine_latents,
    sentence_targets,
    tail_targets,
)
from larimar.facts import (
    MAX_TEXT_CHARS,
    EditRequest,
    FactLike,
    as_fact,
    as_list,
    check_ids,
    check_text,
)
from larimar.memory import ItemMemory, resize_memory
from larimar.model import LarimarModel, check_memory_span
from larimar.scope import ScopeDetector

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "default"
SCOPE_MODES = ("prompt", "prompt_answer")
LATENT_SCOPE_ENCODER = "larimar"
"""``scope_encoder`` value that uses the Larimar model's own encoder for scope (no sentence-transformers)."""


@dataclass
class Answer:
    """A generated answer and where it came from."""

    text: str
    in_scope: bool
    similarity: float | None
    nearest_id: str | None


def cached_plain_nll(
    model: LarimarModel, prompts: list[str], continuations: list[str], cache: dict[tuple[str, str], float]
) -> Tensor:
    """NLL (B,) of continuations after prompts with the plain decoder (z = 0), memoised in ``cache``.

    z = 0 is exactly the untouched decoder, so these scores do not depend on the memory; an evaluation that
    scores the same prompts with and without memory computes them once.
    """
    missing = [k for k in dict.fromkeys(zip(prompts, continuations)) if k not in cache]
    if missing:
        with torch.inference_mode():
            out = model.continuation_nll([p for p, _ in missing], [c for _, c in missing], None).float().cpu()
        cache.update(zip(missing, out.tolist()))
    return torch.tensor([cache[k] for k in zip(prompts, continuations)], dtype=torch.float32)


class Larimar:
    """A Larimar model with one editable memory and a scope detector.

    Args:
        model: the trained model (put it in eval mode; it is not changed).
        scope: the scope detector (None with ``use_scope``: all-MiniLM-L6-v2, loaded on first use).
        scope_threshold: in scope when the nearest-fact cosine is >= this.
        scope_mode: how `score` decides scope: "prompt" (the prompt alone; the default everywhere) or
            "prompt_answer" (prompt + candidate, the paper's reference).
        use_scope: False reads memory for every query (the paper's "no scope detector" ablation).
        read_mode: "memory" (the query-addressed read of the paper), "keyed" (the memory addressed with the key of
            the nearest written fact by scope similarity, projected on the query), "recall" (the same read-out, not
            projected: what the fact was written with, whatever the question's wording) or "nearest" (that fact's
            stored latent, an ablation that bypasses the memory).
        max_chars: the longest fact or prompt accepted (characters).
        fingerprint: the checkpoint fingerprint saved memories are tied to (default:
            `larimar.backbones.model_fingerprint` of the model, computed on first use).
        refinement: write-time latent refinement (default: `Refinement()`: 5 steps for an edit request, 10 for a
            sentence; ``Refinement(steps=0)`` writes the encoder's latents as the paper does).
        memory_span: how long an in-scope answer is conditioned on the memory read-out: "sentence" (until its
            first sentence ends or it says a word again; the plain decoder then continues the text) or "all"
            (every generated token, the paper's decoding). Scoring is teacher-forced and does not depend on it.

    Raises:
        ValueError: unknown mode.
    """

    def __init__(
        self,
        model: LarimarModel,
        scope: ScopeDetector | None = None,
        scope_threshold: float = 0.6,
        scope_mode: str = "prompt",
        use_scope: bool = True,
        read_mode: str = "recall",
        max_chars: int = MAX_TEXT_CHARS,
        fingerprint: str | None = None,
        refinement: Refinement | None = None,
        memory_span: str = "sentence",
    ) -> None:
        if scope_mode not in SCOPE_MODES:
            raise ValueError(f"scope_mode must be one of {SCOPE_MODES}, got {scope_mode!r}")
        check_read_mode(read_mode)
        check_memory_span(memory_span)
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self.model = model.eval()
        if scope is None:
            scope = ScopeDetector(threshold=scope_threshold, mode="prompt")
        self.scope = scope
        self.scope_threshold = float(scope_threshold)
        self.scope_mode = scope_mode
        self.use_scope = use_scope
        self.read_mode = read_mode
        self.max_chars = max_chars
        self._fingerprint = fingerprint
        self.refinement = Refinement() if refinement is None else refinement
        self.memory_span = memory_span
        self.memory = ItemMemory(model.memory)
        self._texts: dict[str, str] = {}  # id -> sentence, in write order

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device | None = None,
        scope_threshold: float = 0.6,
        scope_mode: str = "prompt",
        scope_encoder: str | None = None,
        **kwargs: Any,
    ) -> "Larimar":
        """Loads a checkpoint folder (None: `DEFAULT_CHECKPOINT`) and a scope detector.

        Args:
            path: a folder written by `LarimarModel.save_pretrained`.
            device: where to run (default: CPU).
            scope_threshold: see `Larimar`.
            scope_mode: see `Larimar`.
            scope_encoder: a sentence-transformers folder (None: all-MiniLM-L6-v2 from its package), or
                "larimar" to use the model's own encoder.
            **kwargs: the other `Larimar` arguments (use_scope, read_mode, max_chars, refinement, memory_span).

        Raises:
            FileNotFoundError: no checkpoint at ``path``.
        """
        d = Path(path) if path is not None else DEFAULT_CHECKPOINT
        if not d.is_dir():
            raise FileNotFoundError(
                f"no Larimar checkpoint folder at {d}" + (" (the default checkpoint is not shipped yet; pass a "
                                                          "checkpoint folder)" if path is None else "")
            )
        model = LarimarModel.from_pretrained(d, device=device).eval()
        dev = str(model.device)
        if scope_encoder == LATENT_SCOPE_ENCODER:
            scope = ScopeDetector(threshold=scope_threshold, embed_fn=latent_embed_fn(model), device=dev)
        else:
            scope = ScopeDetector(encoder_path=scope_encoder, threshold=scope_threshold, device=dev)
        return cls(model, scope, scope_threshold=scope_threshold, scope_mode=scope_mode, **kwargs)

    @property
    def fingerprint(self) -> str:
        """The checkpoint fingerprint (saved memories and stores are tied to it)."""
        if self._fingerprint is None:
            from larimar.backbones import model_fingerprint

            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    # -- facts -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.memory)

    @property
    def facts(self) -> list[tuple[str, str]]:
        """(id, sentence) of every fact in memory, in write order."""
        return [(i, self._texts[i]) for i in self.memory.ids]

    @torch.inference_mode()
    def encode_facts(self, sentences: Sequence[str], batch_size: int = 64) -> Tensor:
        """The encoder's latents (n, C) float32 (CPU) of fact sentences (no refinement), ``batch_size`` at a time."""
        sentences = list(sentences)
        parts = [self.model.encode_texts(sentences[i : i + batch_size]).float().cpu()
                 for i in range(0, len(sentences), batch_size)]
        return torch.cat(parts) if parts else torch.zeros((0, self.model.config.latent_size))

    def fact_latents(self, facts: Sequence[FactLike], batch_size: int = 64) -> tuple[list[str], Tensor]:
        """The sentences and the latents (n, C) float32 (CPU) that `edit` writes for facts: encoded, then refined.

        An edit request is refined on its answer after its prompt, a plain sentence on the rest of it after several
        of its beginnings and on their question reads (`refinement_targets`). ``batch_size``: sentences per encoder
        forward.

        Raises:
            ValueError: a bad fact.
        """
        parsed = [as_fact(f, self.max_chars) for f in facts]
        sentences = [s for s, _ in parsed]
        return sentences, self._refine(parsed, self.encode_facts(sentences, batch_size))

    def _refine(self, parsed: list[tuple[str, EditRequest | None]], Z: Tensor) -> Tensor:
        """The refined latents (n, C) (CPU) of parsed facts (`as_fact`) whose encoder latents are Z (n, C)."""
        if self.refinement.steps == 0 or not parsed:
            return Z
        eos = self.model.decoder_tokenizer.eos_token
        targets = [sentence_targets(s, r, self.refinement, eos) for s, r in parsed]  # (prompt, cont, weight, kind)
        if self.refinement.sentence_tail_tokens:  # after the answer, what the plain decoder says (a KL target)
            plain = [f for f, (_, r) in enumerate(parsed) if r is None]
            reads = [going_on_reads(parsed[f][0], self.refinement) for f in plain]
            tails = tail_targets(self.model, reads, self.refinement.sentence_tail_tokens)
            for f, ts in zip(plain, tails):
                targets[f] += [(p, c, self.refinement.sentence_tail_weight, "kl") for p, c in ts]
        owner = [f for f, ts in enumerate(targets) for _ in ts]
        prompts, answers, weights, kinds = (list(col) for col in zip(*(t for ts in targets for t in ts)))
        queries = None  # "recall" and "nearest" decode the stored latent itself
        if self.read_mode not in QUERY_FREE_READS:  # the keyed and the paper's read return the one-fact projection
            queries = self.encode_facts([p or parsed[f][0] for p, f in zip(prompts, owner)])  # (R, C)
        steps = [self.refinement.steps_for(sentence=r is None) for _, r in parsed]
        return refine_latents(self.model, Z, prompts, answers, queries, self.refinement, owner, steps, weights,
                              kinds).cpu()

    def edit(self, facts: FactLike | Sequence[FactLike], ids: Sequence[str] | None = None,
             timings: dict[str, float] | None = None) -> list[str]:
        """Writes facts to memory (one write for the batch; successive calls accumulate).

        Args:
            facts: sentences, `EditRequest` objects or dicts ``{prompt, subject, target_new}``.
            ids: one new id per fact (default: random ids).
            timings: if given, filled with this call's wall time (ms) per part: encode, refine, scope, write (the
                scope index insert after them is not timed).

        Returns:
            the facts' ids.

        Raises:
            ValueError: bad facts or ids; the memory is unchanged.
        """
        parsed = [as_fact(f, self.max_chars) for f in as_list(facts, "facts")]
        sentences = [s for s, _ in parsed]
        if ids is None:
            ids = [uuid.uuid4().hex[:16] for _ in sentences]
        ids = check_ids(ids, len(sentences), self._texts)
        t0 = time.perf_counter()
        Z0 = self.encode_facts(sentences)  # (n, C)
        t1 = time.perf_counter()
        Z = self._refine(parsed, Z0)  # (n, C)
        t2 = time.perf_counter()
        emb = self.scope.embed(sentences) if self.scope is not None else None  # (n, D)
        t3 = time.perf_counter()
        self.memory.write(Z, ids)
        t4 = time.perf_counter()
        if timings is not None:
            timings.update(encode=1e3 * (t1 - t0), refine=1e3 * (t2 - t1), scope=1e3 * (t3 - t2), write=1e3 * (t4 - t3))
        if self.scope is not None:
            try:
                self.scope.add_embeddings(emb, ids)
            except Exception:
                self.memory.forget(ids)
                raise
        for i, s in zip(ids, sentences):
            self._texts[i] = s
        return list(ids)

    def forget(self, ids: str | Sequence[str]) -> None:
        """Forgets facts exactly (memory and scope detector).

        Raises:
            KeyError: an unknown id (nothing is changed).
            ValueError: empty or repeated ids.
        """
        ids = [ids] if isinstance(ids, str) else list(ids)
        if not ids:
            raise ValueError("ids must not be empty")
        missing = [i for i in ids if i not in self._texts]
        if missing:
            raise KeyError(f"unknown fact id(s) {missing[:5]}; known: {len(self._texts)} facts")
        if len(set(ids)) != len(ids):
            raise ValueError("ids to forget must be unique")
        self.memory.forget(ids)
        if self.scope is not None:
            self.scope.remove(ids)
        for i in ids:
            del self._texts[i]

    def resize_memory(self, num_slots: int | None, init: str = "random", seed: int = 0) -> int:
        """Gives the model's memory ``num_slots`` slots (`larimar.memory.resize_memory`) and empties it.

        Args:
            num_slots: K (None: keep the checkpoint's).
            init: rows added beyond the checkpoint's K0: "random" or "eye".
            seed: seed of the random rows.

        Returns:
            the number of slots now.
        """
        if num_slots is not None and num_slots != self.model.memory.config.num_slots:
            self.model.memory = resize_memory(self.model.memory, num_slots, init, seed)
        self.reset()
        return self.model.memory.config.num_slots

    def reset(self) -> None:
        """Empties the memory and the scope detector."""
        self.memory = ItemMemory(self.model.memory)
        if self.scope is not None:
            self.scope.clear()
        self._texts.clear()

    # -- queries ---------------------------------------------------------------------------------------------
    def check_prompts(self, prompts: str | Sequence[str]) -> list[str]:
        """Prompts as a non-empty list of texts that pass `check_text`.

        Raises:
            ValueError: a bad prompt.
        """
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a string or a non-empty list of strings")
        return [check_text(p, "a prompt", self.max_chars) for p in prompts]

    def route(self, queries: list[str], scope_mode: str = "prompt", encode: list[str] | None = None) -> Routing:
        """Scope decision and latent for each query against this editor's memory (`larimar.editor.read.route`).

        Args:
            queries: Q strings the scope decision is made on.
            scope_mode: "prompt" or "prompt_answer" (how the detector scores ``queries``).
            encode: Q strings encoded as the read queries (default: ``queries``).

        Returns:
            the `Routing`, latents on the model's device.
        """
        return self.route_in(self.memory, self.scope, queries, scope_mode, encode)

    def route_in(self, memory: ItemMemory, scope: ScopeDetector, queries: list[str], scope_mode: str = "prompt",
                 encode: list[str] | None = None) -> Routing:
        """`route` against another memory with this editor's settings (a service namespace's memory).

        Args:
            memory: the memory to read.
            scope: a detector holding ``memory``'s facts under the same ids.
            queries, scope_mode, encode: as `route`.
        """
        r = route(self.model.encode_texts, memory, scope, queries, read_mode=self.read_mode,
                  use_scope=self.use_scope, threshold=self.scope_threshold, scope_mode=scope_mode,
                  encode_texts=encode)
        r.latents = r.latents.to(self.model.device)
        return r

    def route_each(self, targets: Sequence[tuple[ItemMemory, ScopeDetector]], queries: list[str]) -> list[Routing]:
        """`route_in` of each query against its own (memory, scope detector), the encoders run once for all
        (`larimar.editor.read.route_each`; "prompt" scope mode)."""
        routes = route_each(self.model.encode_texts, targets, queries, read_mode=self.read_mode,
                            use_scope=self.use_scope, threshold=self.scope_threshold)
        for r in routes:
            r.latents = r.latents.to(self.model.device)
        return routes

    def read_latent(self, prompts: str | Sequence[str]) -> tuple[Tensor, list[bool], Tensor]:
        """Latents for prompts, scope decided from the prompt alone.

        Returns:
            latents (Q, C) (zero rows: out of scope), in_scope (Q booleans), similarities (Q,).
        """
        r = self.route(self.check_prompts(prompts))
        return r.latents, r.in_scope, r.similarities

    @torch.inference_mode()
    def ask(self, prompts: str | Sequence[str], max_new_tokens: int = 32, **kwargs: Any) -> list[Answer]:
        """Generated answers with their scope decision (keyword args as `LarimarModel.generate`; ``memory_span``
        defaults to this editor's)."""
        prompts = self.check_prompts(prompts)
        r = self.route(prompts)
        kwargs.setdefault("memory_span", self.memory_span)
        texts = self.model.generate_text(prompts, r.latents, max_new_tokens=max_new_tokens, **kwargs)
        return [
            Answer(t, s, float(x) if torch.isfinite(x) else None, n)
            for t, s, x, n in zip(texts, r.in_scope, r.similarities, r.nearest_ids)
        ]

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 32, **kwargs: Any) -> str | list[str]:
        """Greedy continuation (a str for a str prompt, else a list); memory is used only in scope."""
        answers = self.ask(prompt, max_new_tokens, **kwargs)
        texts = [a.text for a in answers]
        return texts[0] if isinstance(prompt, str) else texts

    @torch.inference_mode()
    def score_batch(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        scope_mode: str | None = None,
        plain_cache: dict[tuple[str, str], float] | None = None,
    ) -> tuple[Tensor, list[bool]]:
        """Mean per-token NLL (B,) of ``continuations[i]`` after ``prompts[i]``, and the scope decisions.

        Args:
            prompts: B prompts.
            continuations: B continuations (with their leading space, e.g. " Rome").
            scope_mode: "prompt" or "prompt_answer" (default: this editor's ``scope_mode``).
            plain_cache: optional (prompt, continuation) -> NLL of the plain decoder (z = 0), shared with other
                scorers of the same untouched decoder: out-of-scope rows are looked up there or added to it.
        """
        mode = self.scope_mode if scope_mode is None else scope_mode
        if mode not in SCOPE_MODES:
            raise ValueError(f"scope_mode must be one of {SCOPE_MODES}, got {mode!r}")
        prompts = self.check_prompts(list(prompts))
        if isinstance(continuations, str) or len(continuations) != len(prompts):
            raise ValueError(f"expected {len(prompts)} continuations (a list), got {continuations!r:.80}")
        conts = [check_text(c, "a continuation", self.max_chars) for c in continuations]
        if mode == "prompt":
            unique = list(dict.fromkeys(prompts))  # one scope decision and read per distinct prompt
            r = self.route(unique)
            at = {p: k for k, p in enumerate(unique)}
            idx = torch.tensor([at[p] for p in prompts])
            latents, in_scope = r.latents[idx], [r.in_scope[at[p]] for p in prompts]
        else:
            r = self.route([p + c for p, c in zip(prompts, conts)], scope_mode="prompt_answer", encode=prompts)
            latents, in_scope = r.latents, r.in_scope
        if plain_cache is None:
            nll = self.model.continuation_nll(prompts, conts, latents.to(self.model.device))  # (B,)
            return nll.float().cpu(), in_scope
        nll = torch.empty(len(prompts))
        plain = [i for i in range(len(prompts)) if not bool(latents[i].any())]  # z = 0: the untouched decoder
        mem = [i for i in range(len(prompts)) if bool(latents[i].any())]
        nll[plain] = cached_plain_nll(self.model, [prompts[i] for i in plain], [conts[i] for i in plain], plain_cache)
        if mem:
            lat = latents[mem].to(self.model.device)
            nll[mem] = self.model.continuation_nll([prompts[i] for i in mem], [conts[i] for i in mem], lat).float().cpu()
        return nll, in_scope

    def score(self, prompt: str, candidates: Sequence[str], scope_mode: str | None = None) -> list[float]:
        """Mean per-token NLL of each candidate after ``prompt`` (lower = more likely)."""
        candidates = as_list(candidates, "candidates")
        nll, _ = self.score_batch([prompt] * len(candidates), candidates, scope_mode)
        return [float(x) for x in nll]

    # -- save / load -----------------------------------------------------------------------------------------
    def save_memory(self, directory: str | Path) -> Path:
        """Writes the memory, the facts and their scope embeddings (see the module docstring)."""
        emb = None
        if self.scope is not None and len(self.scope):
            pos = {i: k for k, i in enumerate(self.scope.ids)}
            emb = self.scope.embeddings[[pos[i] for i in self.memory.ids]]  # (n, D)
        encoder = getattr(self.scope, "encoder_path", None) if self.scope is not None else None
        return save_memory_state(directory, self.memory, self._texts, self.fingerprint, emb, encoder)

    def load_memory(self, directory: str | Path) -> None:
        """Replaces the memory by one written by `save_memory` with the same checkpoint.

        Raises:
            FileNotFoundError: missing files.
            ValueError: another checkpoint or inconsistent files (the current memory is kept).
        """
        manifest, tensors = read_memory_state(directory, self.fingerprint)
        ids = [f["id"] for f in manifest["facts"]]
        texts = {f["id"]: f["text"] for f in manifest["facts"]}
        state = {k: v for k, v in tensors.items() if k != "scope_embeddings"}
        memory = ItemMemory.from_state_tensors(self.model.memory, state, ids, device=str(self.memory.device))
        scope = None
        if self.scope is not None:  # checked on a copy first: a bad file leaves the current detector as it was
            emb = tensors.get("scope_embeddings")
            if ids and (emb is None or (self.scope.dim is not None and emb.shape[1] != self.scope.dim)):
                emb = self.scope.embed([texts[i] for i in ids])  # saved without (or with other) embeddings
            scope = self.scope.with_facts(emb, ids)
        self.memory, self._texts = memory, {i: texts[i] for i in ids}
        if scope is not None:
            self.scope.clear()
            if ids:
                self.scope.add_embeddings(scope.embeddings, ids)


def latent_embed_fn(model: LarimarModel) -> Callable[[list[str]], Tensor]:
    """A scope embedding function from the Larimar encoder's own latents (no sentence-transformers)."""

    @torch.inference_mode()
    def embed(texts: list[str]) -> Tensor:
        return model.encode_texts(list(texts)).float().cpu()  # (N, C)

    return embed
