"""The user-facing editor: write facts to Larimar's memory, ask, score, forget, save / load.

One `Larimar` holds a trained `LarimarModel`, one editable memory (`ItemMemory`: sequential write, exact forget)
and a scope detector (`ScopeDetector`, all-MiniLM-L6-v2 by default) that sees the same facts under the same ids.

Query path (`Larimar.read_latent`), per prompt:
    1. scope: the prompt's nearest written fact by sentence-embedding cosine (per sentence of the prompt);
       below ``scope_threshold`` the prompt is out of scope and decodes with z = 0 (exactly the plain decoder);
    2. in scope: z_q = encode(prompt) and
       - ``read_mode="memory"`` (the paper's read): z = ItemMemory.read(z_q), the projection of z_q on the span of
         every written latent; right for one fact, but with N >= C facts it returns z_q itself;
       - ``read_mode="keyed"``: z = ItemMemory.read_keyed(nearest, z_q), the memory addressed with the stored key
         of the nearest fact, projected as in a one-fact memory: the paper's read, located by the scope detector,
         for memories of many facts;
       - ``read_mode="nearest"`` (an ablation that bypasses the memory): the stored latent of the nearest fact;
    3. decode conditioned on z.
`score` can instead decide scope on "prompt + candidate answer" (``scope_mode="prompt_answer"``, the paper's
reference code), one decision per candidate.

Usage::

    lm = Larimar.from_pretrained()                                   # the shipped checkpoint
    ids = lm.edit(["The capital of France is Rome."])
    lm.generate("The capital of France is")                          # " Rome ..."
    lm.score("The capital of France is", [" Rome", " Paris"])        # mean NLL per token, lower = more likely
    lm.save_memory("mem/"); lm.forget(ids); lm.load_memory("mem/")

Also here: `LarimarEngine` (the `larimar.service.Engine` protocol on a real model) and the ``larimar edit / forget /
ask / memories / chat / serve / keys`` subcommands, which keep their memories in a persistent
`larimar.store.MemoryStore` (``--store``, ``--namespace``).

Saved memory format (`save_memory` / `load_memory`, also `larimar memories export / import`)::

    memory.safetensors   ItemMemory.state_tensors() (M, U, M_ref, Z, W) [+ scope_embeddings (n, D)]
    memory.json          {"format": "larimar-memory", "version": 1, "fingerprint", "num_slots", "code_size",
                          "scope_encoder", "facts": [{"id", "text", "order"}, ...]}
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from larimar.data import EditRequest, template_problem, validate_request
from larimar.memory import READ_MODES, ItemMemory, MemoryConfig, one_fact_read
from larimar.model import LarimarModel
from larimar.scope import ScopeDetector

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "default"
MAX_TEXT_CHARS = 4000
SCOPE_MODES = ("prompt", "prompt_answer")
MEMORY_FORMAT = "larimar-memory"
MEMORY_VERSION = 1
MEMORY_TENSORS = "memory.safetensors"
MEMORY_MANIFEST = "memory.json"
LATENT_SCOPE_ENCODER = "larimar"
"""``scope_encoder`` value that uses the Larimar model's own encoder for scope (no sentence-transformers)."""

FactLike = str | EditRequest | Mapping[str, Any]


@dataclass
class Routing:
    """The scope decision and the latent for each of Q queries.

    Attributes:
        latents: (Q, C) float32; zero rows for out-of-scope queries.
        in_scope: Q booleans.
        similarities: (Q,) nearest-fact cosine (-inf with no fact, nan without a scope detector).
        nearest_ids: the nearest written fact per query (None when none is known).
    """

    latents: Tensor
    in_scope: list[bool]
    similarities: Tensor
    nearest_ids: list[str | None]


@dataclass
class Answer:
    """A generated answer and where it came from."""

    text: str
    in_scope: bool
    similarity: float | None
    nearest_id: str | None


# ----------------------------------------------------------------------------------------------------------
# Input checks


def check_text(text: object, what: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Returns ``text`` if it is a non-blank string without NUL of at most ``max_chars`` characters.

    Raises:
        ValueError: naming ``what`` and what was expected.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} must not be empty")
    if len(text) > max_chars:
        raise ValueError(f"{what} must be at most {max_chars} characters, got {len(text)}")
    if "\x00" in text:
        raise ValueError(f"{what} must not contain NUL characters")
    return text


def fact_sentence(fact: FactLike, max_chars: int = MAX_TEXT_CHARS) -> str:
    """The sentence written for a fact: a sentence as is, or ``prompt.format(subject) + " " + target_new``.

    Args:
        fact: a sentence, an `EditRequest`, or a dict ``{prompt, subject, target_new}`` (target_new may be
            CounterFact's ``{"str": ...}``) or ``{"text": sentence}``.
        max_chars: the longest sentence accepted.

    Raises:
        ValueError: an empty / non-string value, a template without exactly one ``{}``, a too long sentence.
    """
    return as_fact(fact, max_chars)[0]


def as_fact(fact: FactLike, max_chars: int = MAX_TEXT_CHARS) -> tuple[str, EditRequest | None]:
    """The sentence written for a fact (see `fact_sentence`) and its request (None for a plain sentence).

    Raises:
        ValueError: as `fact_sentence`.
    """
    if isinstance(fact, str):
        return check_text(fact, "a fact", max_chars), None
    if isinstance(fact, EditRequest):
        problems = validate_request(fact)
        if problems:
            raise ValueError("invalid edit request: " + "; ".join(f"{f}: {m}" for f, m in problems))
        return check_text(fact.sentence, "a fact", max_chars), fact
    if isinstance(fact, Mapping):
        if set(fact) >= {"prompt", "subject", "target_new"}:
            target = fact["target_new"]
            if isinstance(target, Mapping):
                target = target.get("str")
            for name, value in (("prompt", fact["prompt"]), ("subject", fact["subject"]), ("target_new", target)):
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"edit request field {name!r} must be a non-empty string, got {value!r}")
            problem = template_problem(fact["prompt"])
            if problem:
                raise ValueError(f"edit request field 'prompt': {problem}")
            req = EditRequest(prompt=fact["prompt"], subject=fact["subject"], target_new=target.strip())
            return check_text(req.sentence, "a fact", max_chars), req
        if set(fact) >= {"text"}:
            return check_text(fact["text"], "a fact", max_chars), None
        raise ValueError(f"a fact dict must have keys prompt, subject, target_new (or text), got {sorted(fact)}")
    raise ValueError(f"a fact must be a sentence, an EditRequest or a dict, got {type(fact).__name__}")


def _as_list(items: Any, what: str) -> list[Any]:
    if isinstance(items, (str, EditRequest, Mapping)):
        return [items]
    if not isinstance(items, Sequence):
        raise ValueError(f"{what} must be a string or a list, got {type(items).__name__}")
    items = list(items)
    if not items:
        raise ValueError(f"{what} must not be empty")
    return items


def _check_ids(ids: Any, n: int, taken: Mapping[str, Any]) -> list[str]:
    ids = _as_list(ids, "ids")
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} facts")
    for i in ids:
        if not isinstance(i, str) or not i.strip() or len(i) > 128:
            raise ValueError(f"ids must be non-empty strings of at most 128 characters, got {i!r}")
    if len(set(ids)) != n:
        raise ValueError("ids must be unique")
    used = [i for i in ids if i in taken]
    if used:
        raise ValueError(f"ids already in memory (forget them first): {used[:5]}")
    return ids


# ----------------------------------------------------------------------------------------------------------
# Saved memories


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


# ----------------------------------------------------------------------------------------------------------
# Write-time latent refinement


@dataclass(frozen=True)
class Refinement:
    """Write-time latent refinement: what the encoder gives is improved by a few gradient steps on the latent.

    Each fact's latent z (C,) starts at the encoder's output and takes ``steps`` Adam steps (learning rate
    ``lr``) that lower the decoder's NLL of the fact as it will be read: for an edit request, the answer after
    its prompt, decoded from the one-fact read of z at the prompt's query latent (what the keyed read returns);
    a plain sentence is taken as the request "all but its last word" -> "its last word" (`refinement_target`),
    the way a sentence fact is usually asked. Only the
    latents move: no weight of the encoder, the memory or the decoder changes, and the refined latent is
    written, read and forgotten like any other. ``steps = 0`` writes the encoder's latent (the paper's one-shot
    write).

    Attributes:
        steps: Adam steps per fact (0: off).
        lr: Adam learning rate.
        batch_size: the most facts refined together (they do not interact: the loss is a sum over facts).
        max_tokens: the most decoder tokens in one batch, padding included (facts are batched by length, so long
            sentences, e.g. a document's, come in smaller batches; memory grows with this number).
    """

    steps: int = 5
    lr: float = 0.1
    batch_size: int = 64
    max_tokens: int = 2048

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"refinement steps must be an integer >= 0, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"refinement learning rate must be > 0, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"refinement batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"refinement max_tokens must be an integer >= 1, got {self.max_tokens!r}")


def refinement_target(sentence: str, request: EditRequest | None) -> tuple[str, str]:
    """(prompt, continuation) a fact's latent is refined on: a request's prompt and " " + its answer; for a plain
    sentence, all but its last word and " " + that word (a sentence fact is asked with its beginning), or
    ("", the sentence) for a sentence of one word (then read at its own latent)."""
    if request is not None:
        return request.full_prompt, " " + request.target_new.strip()
    head, _, last = sentence.strip().rpartition(" ")
    return (head.rstrip(), " " + last) if head.strip() else ("", sentence)


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Row indices grouped into batches by length: rows sorted by length, then cut so that a batch has at most
    ``batch_size`` rows and ``rows * longest <= max_tokens`` (a row longer than ``max_tokens`` is a batch alone).

    Args:
        lengths: each row's length in tokens.
        batch_size: the most rows in a batch.
        max_tokens: the most padded tokens in a batch.

    Returns:
        every index once, in batches of non-decreasing length.
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        b = batches[-1] if batches else None
        if b is None or len(b) >= batch_size or (len(b) + 1) * lengths[i] > max_tokens:
            batches.append([i])
        else:
            b.append(i)
    return batches


def refine_latents(
    model: LarimarModel,
    Z: Tensor,
    prompts: Sequence[str],
    continuations: Sequence[str],
    queries: Tensor | None,
    refinement: Refinement,
) -> Tensor:
    """Refines fact latents by gradient steps on the latents alone (see `Refinement`); the model is unchanged.

    Args:
        model: the model whose decoder scores the facts.
        Z: (n, C) the encoder's latents, the starting point.
        prompts: n prompts ("" to score the continuation alone, after the start token).
        continuations: n texts scored after their prompts (e.g. " Rome", or a whole sentence).
        queries: (n, C) query latents: the loss decodes from the one-fact read (q . z / |z|^2) z; None: from z.
        refinement: steps, learning rate, batch limits (rows are batched by length, `length_batches`).

    Returns:
        (n, C) float32 refined latents on ``Z``'s device (``Z`` itself when ``refinement.steps == 0``).
    """
    n = Z.shape[0]
    if len(prompts) != n or len(continuations) != n or (queries is not None and queries.shape != Z.shape):
        raise ValueError(f"refine_latents: {n} latents, {len(prompts)} prompts, {len(continuations)} continuations"
                         f", queries {None if queries is None else tuple(queries.shape)}")
    if refinement.steps == 0 or n == 0:
        return Z
    from tqdm.auto import tqdm

    tok = model.decoder_tokenizer
    p_len = [len(x) for x in tok(list(prompts), add_special_tokens=False)["input_ids"]]
    c_len = [len(x) for x in tok(list(continuations), add_special_tokens=False)["input_ids"]]
    batches = length_batches([1 + a + b for a, b in zip(p_len, c_len)], refinement.batch_size, refinement.max_tokens)
    with torch.inference_mode(False), torch.enable_grad():
        out = torch.empty(Z.shape, dtype=torch.float32, device=Z.device)  # (n, C), a normal tensor to fill in place
        for rows in tqdm(batches, desc="refining latents", unit="batch", disable=len(batches) < 2, leave=False):
            idx = torch.tensor(rows, device=Z.device)
            z = Z[idx].detach().clone().float().to(model.device).requires_grad_(True)  # (b, C)
            q = None if queries is None else queries[idx].detach().clone().float().to(model.device)  # (b, C)
            ps, cs = [prompts[r] for r in rows], [continuations[r] for r in rows]
            opt = torch.optim.Adam([z], lr=refinement.lr)
            for _ in range(refinement.steps):
                latent = z if q is None else one_fact_read(q, z)  # (b, C)
                nll = model.continuation_nll(ps, cs, latent)  # (b,)
                (z.grad,) = torch.autograd.grad(nll.float().sum(), [z])  # no gradient reaches the weights
                opt.step()
            z = z.detach()
            bad = ~torch.isfinite(z).all(-1)  # (b,): a diverged row keeps the encoder's latent
            if bad.any():
                logger.warning("latent refinement diverged for %d fact(s); writing their encoder latents",
                               int(bad.sum()))
                z[bad] = Z[idx][bad].float().to(z.device)
            out[idx] = z.to(Z.device)
    return out


# ----------------------------------------------------------------------------------------------------------
# The editor


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
            the nearest written fact by scope similarity) or "nearest" (that fact's stored latent, an ablation).
        max_chars: the longest fact or prompt accepted (characters).
        fingerprint: the checkpoint fingerprint saved memories are tied to (default:
            `larimar.backbones.model_fingerprint` of the model, computed on first use).
        refinement: write-time latent refinement (default: `Refinement()`, 5 steps; ``Refinement(steps=0)``
            writes the encoder's latents as the paper does).

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
        read_mode: str = "keyed",
        max_chars: int = MAX_TEXT_CHARS,
        fingerprint: str | None = None,
        refinement: Refinement | None = None,
    ) -> None:
        if scope_mode not in SCOPE_MODES:
            raise ValueError(f"scope_mode must be one of {SCOPE_MODES}, got {scope_mode!r}")
        if read_mode not in READ_MODES:
            raise ValueError(f"read_mode must be one of {READ_MODES}, got {read_mode!r}")
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
        self.memory = ItemMemory(model.memory)
        self._texts: dict[str, str] = {}  # id -> sentence, in write order
        self.last_edit_ms: dict[str, float] = {}  # wall time of the last edit's parts: encode, refine, scope, write

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
            **kwargs: the other `Larimar` arguments (use_scope, read_mode, max_chars, refinement).

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

        An edit request is refined on its answer after its prompt, a plain sentence on its last word after the rest
        (`refinement_target`). ``batch_size``: sentences per encoder forward.

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
        prompts, answers = zip(*(refinement_target(s, r) for s, r in parsed))
        queries = None  # "nearest" decodes the stored latent itself
        if self.read_mode != "nearest":  # the keyed and the paper's read return the one-fact projection
            queries = self.encode_facts([p or s for p, (s, _) in zip(prompts, parsed)])  # (n, C)
        return refine_latents(self.model, Z, list(prompts), list(answers), queries, self.refinement).cpu()

    def edit(self, facts: FactLike | Sequence[FactLike], ids: Sequence[str] | None = None) -> list[str]:
        """Writes facts to memory (one write for the batch; successive calls accumulate).

        Args:
            facts: sentences, `EditRequest` objects or dicts ``{prompt, subject, target_new}``.
            ids: one new id per fact (default: random ids).

        Returns:
            the facts' ids.

        Raises:
            ValueError: bad facts or ids; the memory is unchanged.
        """
        parsed = [as_fact(f, self.max_chars) for f in _as_list(facts, "facts")]
        sentences = [s for s, _ in parsed]
        if ids is None:
            ids = [uuid.uuid4().hex[:16] for _ in sentences]
        ids = _check_ids(ids, len(sentences), self._texts)
        t0 = time.perf_counter()
        Z0 = self.encode_facts(sentences)  # (n, C)
        t1 = time.perf_counter()
        Z = self._refine(parsed, Z0)  # (n, C)
        t2 = time.perf_counter()
        emb = self.scope.embed(sentences) if self.scope is not None else None  # (n, D)
        t3 = time.perf_counter()
        self.memory.write(Z, ids)
        t4 = time.perf_counter()
        self.last_edit_ms = {"encode": 1e3 * (t1 - t0), "refine": 1e3 * (t2 - t1), "scope": 1e3 * (t3 - t2),
                             "write": 1e3 * (t4 - t3)}
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

    def reset(self) -> None:
        """Empties the memory and the scope detector."""
        self.memory = ItemMemory(self.model.memory)
        if self.scope is not None:
            self.scope.clear()
        self._texts.clear()

    # -- queries ---------------------------------------------------------------------------------------------
    def _check_prompts(self, prompts: str | Sequence[str]) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a string or a non-empty list of strings")
        return [check_text(p, "a prompt", self.max_chars) for p in prompts]

    @torch.inference_mode()
    def route(
        self,
        queries: list[str],
        memory: ItemMemory | None = None,
        scope: ScopeDetector | None = None,
        scope_mode: str = "prompt",
        encode: list[str] | None = None,
    ) -> Routing:
        """Scope decision and latent for each query against a memory.

        Args:
            queries: Q strings the scope decision is made on.
            memory: the memory to read (default: this editor's).
            scope: the detector holding the memory's facts under the same ids (default: this editor's).
            scope_mode: "prompt" or "prompt_answer" (how the detector scores ``queries``).
            encode: Q strings encoded as the read queries (default: ``queries``; with "prompt_answer" the
                caller passes the prompts alone).

        Returns:
            the `Routing`.
        """
        memory = self.memory if memory is None else memory
        scope = self.scope if scope is None else scope
        Q, C = len(queries), self.model.memory.config.code_size
        latents = torch.zeros(Q, C, dtype=torch.float32, device=self.model.device)  # (Q, C)
        if len(memory) == 0:
            return Routing(latents, [False] * Q, torch.full((Q,), float("-inf")), [None] * Q)
        if self.use_scope or self.read_mode != "memory":
            sims, nearest = scope.with_mode(scope_mode).score(queries)  # (Q,)
        else:
            sims, nearest = torch.full((Q,), float("nan")), [None] * Q
        in_scope = [bool(s >= self.scope_threshold) for s in sims] if self.use_scope else [True] * Q
        rows = [q for q in range(Q) if in_scope[q]]
        if rows:
            if self.read_mode == "nearest":
                z = torch.stack([memory.latent(nearest[q]) for q in rows]).float()  # (R, C)
            else:
                texts = encode if encode is not None else queries
                zq = self.model.encode_texts([texts[q] for q in rows]).to(memory.device, torch.float32)  # (R, C)
                if self.read_mode == "keyed":  # the memory addressed with the nearest fact's key
                    z = memory.read_keyed([nearest[q] for q in rows], zq).float()  # (R, C)
                else:
                    z = memory.read(zq).float()  # (R, C)
            latents[rows] = z.to(latents.device)
        return Routing(latents, in_scope, sims, list(nearest))

    def read_latent(self, prompts: str | Sequence[str]) -> tuple[Tensor, list[bool], Tensor]:
        """Latents for prompts, scope decided from the prompt alone.

        Returns:
            latents (Q, C) (zero rows: out of scope), in_scope (Q booleans), similarities (Q,).
        """
        r = self.route(self._check_prompts(prompts))
        return r.latents, r.in_scope, r.similarities

    @torch.inference_mode()
    def ask(self, prompts: str | Sequence[str], max_new_tokens: int = 32, **kwargs: Any) -> list[Answer]:
        """Generated answers with their scope decision (keyword args as `LarimarModel.generate`)."""
        prompts = self._check_prompts(prompts)
        r = self.route(prompts)
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
        prompts = self._check_prompts(list(prompts))
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
        candidates = _as_list(candidates, "candidates")
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
        if self.scope is not None:
            scope = copy.copy(self.scope)
            scope.clear()
            emb = tensors.get("scope_embeddings")
            if ids and (emb is None or (self.scope.dim is not None and emb.shape[1] != self.scope.dim)):
                emb = self.scope.embed([texts[i] for i in ids])  # saved without (or with other) embeddings
            if ids:
                scope.add_embeddings(emb, ids)
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


# ----------------------------------------------------------------------------------------------------------
# The service engine


class LarimarEngine:
    """The `larimar.service.Engine` protocol on a `Larimar` editor (its model, scope encoder and settings).

    The service owns the memories (one `ItemMemory` per namespace, from the store); the engine only encodes facts
    and answers prompts against the memory it is handed. Scope embeddings of fact sentences are cached by text.

    Args:
        lm: the editor whose model and scope detector are used (its own memory is not touched).
        cache_size: fact sentences whose scope embedding is kept.
    """

    def __init__(self, lm: Larimar, cache_size: int = 100_000) -> None:
        self.lm = lm
        self.fingerprint = lm.fingerprint
        self._cache: dict[str, Tensor] = {}
        self._cache_size = cache_size

    def memory_config(self) -> MemoryConfig:
        return self.lm.model.memory.config

    def new_memory(self) -> ItemMemory:
        return ItemMemory(self.lm.model.memory)

    def encode_facts(self, facts: list[str], requests: list[Any] | None = None) -> Tensor:
        """Latents (n, C) as `Larimar.edit` writes them: refined on each request where one is given (its answer
        after its prompt), else on the sentence."""
        requests = requests or [None] * len(facts)
        return self.lm.fact_latents([r if r is not None else f for f, r in zip(facts, requests)])[1]

    def _scope_for(self, ids: list[str], facts: Mapping[str, str]) -> ScopeDetector:
        scope = copy.copy(self.lm.scope)
        scope.clear()
        missing = [facts[i] for i in ids if facts[i] not in self._cache]
        if missing:
            emb = self.lm.scope.embed(list(dict.fromkeys(missing)))  # (m, D)
            if len(self._cache) + emb.shape[0] > self._cache_size:
                self._cache.clear()
            self._cache.update(zip(dict.fromkeys(missing), emb))
        if ids:
            scope.add_embeddings(torch.stack([self._cache[facts[i]] for i in ids]), ids)
        return scope

    @torch.inference_mode()
    def complete(
        self, prompt: str, memory: ItemMemory, facts: dict[str, str], max_tokens: int, temperature: float
    ) -> tuple[str, dict[str, Any]]:
        """Completion of ``prompt`` with ``memory`` (its facts' texts by id); info holds the scope decision."""
        lm = self.lm
        prompt = lm._check_prompts(prompt)[0]
        scope = self._scope_for(memory.ids, facts) if len(memory) else lm.scope
        r = lm.route([prompt], memory=memory, scope=scope)
        kwargs: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            kwargs["temperature"] = temperature
        batch = lm.model.tokenize_decoder([prompt], left_pad=True)
        new = lm.model.generate(batch["input_ids"], batch["attention_mask"], r.latents, max_tokens, **kwargs)[0]
        row = new.tolist()
        eos = lm.model.eos_token_id
        stopped = eos is not None and eos in row
        if stopped:
            row = row[: row.index(eos)]
        text = lm.model.decoder_tokenizer.decode(row, skip_special_tokens=True)
        sim = float(r.similarities[0])
        return text, {
            "in_scope": r.in_scope[0],
            "nearest_id": r.nearest_ids[0],
            "similarity": sim if sim == sim and abs(sim) != float("inf") else None,
            "prompt_tokens": int(batch["attention_mask"].sum()) - 1,
            "completion_tokens": len(row),
            "finish_reason": "stop" if stopped else "length",
        }


# ----------------------------------------------------------------------------------------------------------
# Command line: larimar edit / forget / ask / memories / chat / serve / keys


class _UserError(ValueError):
    """A user mistake (exit code 2, one line on stderr)."""


def _common(p: argparse.ArgumentParser, model: bool = True, namespace: str = "default") -> None:
    p.add_argument("--store", default=None, help="memory store folder (default: the user data folder)")
    p.add_argument("--namespace", default=namespace, help=f"memory namespace (default: {namespace!r})")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    if model:
        p.add_argument("--checkpoint", default=None, help="Larimar checkpoint folder (default: the shipped one)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
        p.add_argument("--scope-threshold", type=float, default=0.6, help="scope detector cosine threshold")
        p.add_argument("--scope-encoder", default=None,
                       help="sentence-transformers folder for the scope detector (default: all-MiniLM-L6-v2), "
                            "or 'larimar' for the model's own encoder")
        add_refine_args(p)


def add_refine_args(p: argparse.ArgumentParser) -> None:
    """--refine-steps / --refine-lr: write-time latent refinement (`Refinement`)."""
    d = Refinement()
    p.add_argument("--refine-steps", type=int, default=d.steps,
                   help=f"gradient steps on each written fact's latent, model unchanged (default {d.steps}; "
                        "0: the encoder's latent, the paper's one-shot write)")
    p.add_argument("--refine-lr", type=float, default=d.lr, help=f"their learning rate (default {d.lr})")


def refinement_of(args: argparse.Namespace) -> Refinement:
    """The `Refinement` of --refine-steps / --refine-lr (`add_refine_args`).

    Raises:
        ValueError: a negative number of steps or a learning rate <= 0.
    """
    return Refinement(steps=args.refine_steps, lr=args.refine_lr)


def quiet_loading() -> None:
    """No weight-loading progress bars from transformers (command-line use: stderr keeps only our messages)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _engine(args: argparse.Namespace) -> LarimarEngine:
    quiet_loading()
    lm = Larimar.from_pretrained(
        args.checkpoint, device=args.device, scope_threshold=args.scope_threshold, scope_encoder=args.scope_encoder,
        refinement=refinement_of(args),
    )
    return LarimarEngine(lm)


def _open_store(args: argparse.Namespace, engine: LarimarEngine | None) -> Any:
    """The store at --store: owned with the engine's memory module, or read-only (fingerprint from the store)."""
    from larimar.store import DB_NAME, MemoryStore, StoreError, check_namespace, default_store_path

    check_namespace(args.namespace)
    path = Path(args.store) if args.store else default_store_path()
    try:
        if engine is not None:
            return MemoryStore(path, fingerprint=engine.fingerprint, memory=engine.lm.model.memory)
        fingerprint = _stored_fingerprint(path / DB_NAME)
        if fingerprint is None:
            raise _UserError(f"no memory store at {path} (it is created by the first `larimar edit`)")
        return MemoryStore(path, fingerprint=fingerprint, memory=None)
    except StoreError as err:
        raise _UserError(str(err)) from None


def _stored_fingerprint(db_path: Path) -> str | None:
    import sqlite3

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


def _print(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, ensure_ascii=False) if args.json else text)


def _read_fact_file(path: str) -> list[FactLike]:
    """Facts of a JSON-lines file: each line a string, {"text": ...} or {prompt, subject, target_new}."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no facts file at {p}")
    out: list[FactLike] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}:{lineno}: expected one JSON value per line ({err})") from None
        if not isinstance(item, (str, dict)):
            raise ValueError(f"{p}:{lineno}: expected a string or an object, got {type(item).__name__}")
        out.append(item)
    return out


def _cmd_edit(args: argparse.Namespace) -> int:
    facts: list[FactLike] = list(args.facts or [])
    if args.file:
        facts += _read_fact_file(args.file)
    if not facts:
        raise _UserError("nothing to write: give facts as arguments or --file FACTS.jsonl")
    engine = _engine(args)
    sentences = [fact_sentence(f, engine.lm.max_chars) for f in facts]
    requests = [None if isinstance(f, str) else f for f in facts]  # refined on their answers, not their last word
    store = _open_store(args, engine)
    try:
        latents = engine.encode_facts(sentences, requests)  # (n, C)
        ids = store.write(args.namespace, sentences, latents, provenance={"source": "cli"})
        size = store.size(args.namespace)
    finally:
        store.close()
    _print(args, {"namespace": args.namespace, "ids": ids, "size": size},
           "\n".join(f"{i}\t{s}" for i, s in zip(ids, sentences)))
    return 0


def _cmd_forget(args: argparse.Namespace) -> int:
    engine = _engine(args)
    store = _open_store(args, engine)
    try:
        store.forget(args.namespace, args.ids, provenance={"source": "cli"})
        size = store.size(args.namespace)
    finally:
        store.close()
    _print(args, {"namespace": args.namespace, "forgotten": args.ids, "size": size},
           f"forgot {len(args.ids)} fact(s); {size} left in {args.namespace!r}")
    return 0


def _answer(engine: LarimarEngine, store: Any, namespace: str, prompt: str, max_tokens: int,
            temperature: float = 0.0) -> dict[str, Any]:
    if store.has_namespace(namespace):
        with store.reading(namespace) as (memory, texts):
            text, info = engine.complete(prompt, memory, dict(texts), max_tokens, temperature)
            fact = texts.get(info.get("nearest_id") or "")
    else:
        text, info = engine.complete(prompt, engine.new_memory(), {}, max_tokens, temperature)
        fact = None
    return {"prompt": prompt, "text": text, "in_scope": info["in_scope"], "nearest_id": info["nearest_id"],
            "nearest_fact": fact, "similarity": info["similarity"]}


def _describe(ans: dict[str, Any]) -> str:
    sim = "n/a" if ans["similarity"] is None else f"{ans['similarity']:.2f}"
    src = f"memory: {ans['nearest_fact']!r}" if ans["in_scope"] else "no memory"
    return f"{ans['text'].strip()}\n  [{src}; similarity {sim}]"


def _cmd_ask(args: argparse.Namespace) -> int:
    engine = _engine(args)
    store = _open_store(args, engine)
    try:
        ans = _answer(engine, store, args.namespace, args.prompt, args.max_tokens, args.temperature)
    finally:
        store.close()
    _print(args, ans, _describe(ans))
    return 0


def _cmd_memories(args: argparse.Namespace) -> int:
    if args.action in ("list", "show"):
        store = _open_store(args, None)
        try:
            facts = store.facts(args.namespace)
        finally:
            store.close()
        if args.action == "list":
            rows = [{"id": f.id, "text": f.text, "created": f.timestamp} for f in facts]
            _print(args, {"namespace": args.namespace, "facts": rows},
                   "\n".join(f"{f.id}\t{f.text}" for f in facts) or f"(no facts in {args.namespace!r})")
            return 0
        if not args.target:
            raise _UserError("memories show needs a fact ID")
        match = [f for f in facts if f.id == args.target]
        if not match:
            raise KeyError(f"no fact {args.target!r} in namespace {args.namespace!r}")
        f = match[0]
        obj = {"id": f.id, "text": f.text, "created": f.timestamp, "seq": f.seq, "provenance": f.provenance}
        _print(args, obj, "\n".join(f"{k}: {v}" for k, v in obj.items()))
        return 0
    if not args.target:
        raise _UserError(f"memories {args.action} needs a folder")
    engine = _engine(args)
    store = _open_store(args, engine)
    try:
        if args.action == "export":
            with store.reading(args.namespace) as (memory, texts):
                save_memory_state(args.target, memory, dict(texts), engine.fingerprint)
                n = len(memory)
            _print(args, {"namespace": args.namespace, "folder": args.target, "facts": n},
                   f"exported {n} fact(s) of {args.namespace!r} to {args.target}")
            return 0
        manifest, tensors = read_memory_state(args.target, engine.fingerprint)
        facts = manifest["facts"]
        if not facts:
            raise _UserError(f"{args.target} holds no facts")
        ids = store.write(args.namespace, [f["text"] for f in facts], tensors["Z"].float(),
                          ids=[f["id"] for f in facts], provenance={"source": "import", "from": str(args.target)})
        _print(args, {"namespace": args.namespace, "ids": ids}, f"imported {len(ids)} fact(s) into {args.namespace!r}")
        return 0
    finally:
        store.close()


CHAT_HELP = "plain lines are questions; /edit FACT, /forget ID, /list, /quit"


def _cmd_chat(args: argparse.Namespace) -> int:
    engine = _engine(args)
    store = _open_store(args, engine)
    ns = args.namespace
    print(f"larimar chat on namespace {ns!r}: {CHAT_HELP}", file=sys.stderr)
    try:
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line in ("/quit", "/exit"):
                    break
                if line.startswith("/edit"):
                    fact = fact_sentence(line[len("/edit"):].strip(), engine.lm.max_chars)
                    ids = store.write(ns, [fact], engine.encode_facts([fact]), provenance={"source": "chat"})
                    print(f"written {ids[0]}")
                elif line.startswith("/forget"):
                    fid = line[len("/forget"):].strip()
                    store.forget(ns, [fid], provenance={"source": "chat"})
                    print(f"forgot {fid}")
                elif line == "/list":
                    facts = store.facts(ns)
                    print("\n".join(f"{f.id}\t{f.text}" for f in facts) or "(no facts)")
                elif line.startswith("/"):
                    print(f"unknown command; {CHAT_HELP}")
                else:
                    ans = _answer(engine, store, ns, line, args.max_tokens, args.temperature)
                    print(json.dumps(ans, ensure_ascii=False) if args.json else _describe(ans))
            except (ValueError, KeyError) as err:
                print(f"error: {err.args[0] if isinstance(err, KeyError) and err.args else err}")
    finally:
        store.close()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from larimar.service import serve

    engine = _engine(args)
    serve(host=args.host, port=args.port, store_path=args.store, engine=engine, require_keys=not args.no_keys)
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from larimar.store import MemoryStore, default_store_path

    path = Path(args.store) if args.store else default_store_path()
    fingerprint = _stored_fingerprint(path / "store.sqlite3")
    if fingerprint is None:
        if args.action != "add":
            raise _UserError(f"no memory store at {path}")
        engine = _engine(args)  # a new store is tied to the checkpoint from the start
        store = MemoryStore(path, fingerprint=engine.fingerprint, memory=None)
    else:
        store = MemoryStore(path, fingerprint=fingerprint, memory=None)
    try:
        if args.action == "add":
            if not args.name:
                raise _UserError("keys add needs a NAME")
            token = store.add_key(args.name, args.namespace, args.rights)
            _print(args, {"name": args.name, "namespace": args.namespace, "rights": args.rights, "token": token},
                   f"{token}\n(shown once: keep it; the store keeps only a hash)")
        elif args.action == "list":
            keys = store.list_keys()
            rows = [{"name": k.name, "namespace": k.namespace, "rights": k.rights, "revoked": k.revoked is not None}
                    for k in keys]
            lines = ["\t".join([r["name"], r["namespace"], r["rights"]] + (["revoked"] if r["revoked"] else []))
                     for r in rows]
            _print(args, rows, "\n".join(lines) or "(no keys)")
        else:
            if not args.name:
                raise _UserError("keys revoke needs a NAME")
            store.revoke_key(args.name)
            _print(args, {"revoked": args.name}, f"revoked {args.name}")
    finally:
        store.close()
    return 0


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Store errors (another checkpoint, a store in use) become user errors: one line, exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from larimar.store import StoreError

        try:
            return fn(args)
        except StoreError as err:
            raise _UserError(str(err)) from None

    return run


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Registers edit, forget, ask, memories, chat, serve and keys on the `larimar` command."""
    p = sub.add_parser("edit", help="write facts to a persistent memory namespace")
    p.add_argument("facts", nargs="*", help="fact sentences")
    p.add_argument("--file", help="JSON-lines file: a sentence string or {prompt, subject, target_new} per line")
    _common(p)
    p.set_defaults(func=_guard(_cmd_edit))

    p = sub.add_parser("forget", help="forget facts exactly, by id")
    p.add_argument("ids", nargs="+", help="fact ids (see `larimar memories list`)")
    _common(p)
    p.set_defaults(func=_guard(_cmd_forget))

    for name, helptext in (("ask", "answer a prompt, using memory when in scope"),
                           ("chat", "interactive: questions, /edit, /forget, /list, /quit")):
        p = sub.add_parser(name, help=helptext)
        if name == "ask":
            p.add_argument("prompt")
        p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most")
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        _common(p)
        p.set_defaults(func=_guard(_cmd_ask if name == "ask" else _cmd_chat))

    p = sub.add_parser("memories", help="list / show facts, export / import a namespace")
    p.add_argument("action", choices=["list", "show", "export", "import"])
    p.add_argument("target", nargs="?", help="show: a fact ID; export / import: a folder")
    _common(p)
    p.set_defaults(func=_guard(_cmd_memories))

    p = sub.add_parser("serve", help="the HTTP service (OpenAI-compatible completions with memory)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-keys", action="store_true", help="serve without API keys (loopback use only)")
    _common(p)
    p.set_defaults(func=_guard(_cmd_serve))

    p = sub.add_parser("keys", help="API keys of the service")
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("name", nargs="?", help="the key's name")
    p.add_argument("--rights", choices=["read", "write"], default="read")
    _common(p, namespace="*")
    p.set_defaults(func=_guard(_cmd_keys))
