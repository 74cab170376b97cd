"""Input-context-length generalisation (paper section 5.5): facts hidden in a long document, recalled by reading memory.

Benchmark (`build_document`). Facts the base model cannot know: CounterFact requests written as sentences
``prompt(subject) + " " + target_new + "."`` (counterfactual objects), inserted at seeded random positions of a stream
of Wikipedia sentences (``enwiki_2018_validation.jsonl``, ``filler_per_fact`` filler sentences per fact, facts in a
seeded random order). The question for a fact is its paraphrase (below); an answer is right when the mean NLL of
" target_new" after it is below that of " target_true" (ES-style).

Larimar (`write_document`, `read_document`). The document is split into sentences, each sentence one item: the
benchmark keeps the sentence units it was built from (filler sentences come from `larimar.scope.split_sentences`;
`chunk_document` splits any other text the same way). Each sentence is encoded as `Larimar.edit` encodes one (the
encoder's latent, refined on the sentence's last word after the rest: ``--refine-steps``, 0 for the paper's one-shot
encoding). Items are written in document order into chunk memories of ``chunk_items`` items (default K), one batch
write each, so a document longer than K sentences is a list of memories. A question is answered from
one latent, chosen hierarchically:

    scope      (default) the chunk memory holding the sentence nearest to the question (scope encoder cosine, per
               sentence of the question) is addressed with that sentence's key: z = M_g read_keyed(s)
               (``read_mode="recall"``, the default), its projection on the question z = M_g read_keyed(s, e(q))
               (``"keyed"``), or read with the question's latent z = M_g read(e(question)) (``"memory"``);
    recursive  every chunk memory is read with the question's latent, the G read-outs are written into a top-level
               memory and that memory is read again with the question's latent (the paper's recursive read);
    nearest    (``read_mode="nearest"``, an ablation) the latent of the nearest sentence itself.

Plain baseline (`plain_window_nll`): the decoder with z = 0 given the document's last tokens that fit in ``window``
(start token + context + "\\n" + question + answer <= window), i.e. the context that fits, ending right before the
question; ``fact_in_window`` says whether the fact's sentence is inside that context. ``recall_none`` is the
question alone (no context, no memory).

Retrieval baseline (`rag_prompts`, ``recall_rag``): the same scope index over the document's sentences finds the
nearest sentence; in scope (cosine >= the Larimar editor's threshold) it is put before the question
(sentence + "\\n" + question) for the plain decoder (z = 0, no window), else the question goes alone.

Questions (`paraphrase_question`): each fact is asked with its CounterFact paraphrase, distractor sentence removed,
so the question is not the written sentence's beginning (on which the refined latent was optimised). The
written-prefix numbers (``prompt(subject)``) are kept as the labelled extra ``prefix_*``. Every recall is also
reported over the facts inside / outside the plain decoder's window (``*_in_window`` / ``*_out_window``).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from larimar.editor.read import QUERY_FREE_READS, check_read_mode, read_at
from larimar.eval.metrics import es_success
from larimar.facts import EditRequest, split_sentences
from larimar.memory import ItemMemory
from larimar.scope import ScopeDetector

logger = logging.getLogger(__name__)

HIERARCHIES = ("scope", "recursive")


SEPARATOR = "\n"


@dataclass
class LongContextDoc:
    """A document of filler sentences with fact sentences inserted.

    Attributes:
        sentences: the document's sentences in order.
        facts: the facts, in the order they appear in the document.
        fact_positions: index in ``sentences`` of each fact's sentence.
    """

    sentences: list[str]
    facts: list[EditRequest]
    fact_positions: list[int]

    @property
    def text(self) -> str:
        """The document: its sentences joined by spaces."""
        return " ".join(self.sentences)


def fact_text(req: EditRequest) -> str:
    """The sentence of a fact in the document: ``prompt(subject) target_new.``"""
    s = req.sentence.strip()
    return s if s.endswith((".", "!", "?")) else s + "."


def filler_sentences(paragraphs: Iterable[str], n: int, min_words: int = 5) -> list[str]:
    """The first ``n`` sentences of at least ``min_words`` words of a paragraph stream (fewer if it ends)."""
    out: list[str] = []
    if n <= 0:
        return out
    for p in paragraphs:
        for s in split_sentences(p):
            if len(s.split()) >= min_words:
                out.append(s)
                if len(out) >= n:
                    return out
    logger.warning("only %d filler sentences available (%d asked)", len(out), n)
    return out


def build_document(facts: Sequence[EditRequest], fillers: Sequence[str], seed: int = 0) -> LongContextDoc:
    """Inserts each fact's sentence at a seeded random position of the filler sentences.

    Args:
        facts: the facts (each gets exactly one sentence in the document).
        fillers: the filler sentences, kept in their order.
        seed: the positions and the facts' order (a local `random.Random`).

    Returns:
        the document; the same inputs and seed give the same document.
    """
    if not facts:
        raise ValueError("no facts to put in the document")
    rng = random.Random(seed)
    order = list(range(len(facts)))
    rng.shuffle(order)
    total = len(fillers) + len(facts)
    positions = sorted(rng.sample(range(total), len(facts)))
    at = dict(zip(positions, order))
    sentences, placed, fill = [], [], iter(fillers)
    for i in range(total):
        if i in at:
            sentences.append(fact_text(facts[at[i]]))
            placed.append(facts[at[i]])
        else:
            sentences.append(next(fill))
    return LongContextDoc(sentences, placed, positions)


def chunk_document(text: str) -> list[str]:
    """The document's chunks: its sentences."""
    return split_sentences(text)


@dataclass
class HierarchicalMemory:
    """Sentence items in chunk memories.

    Attributes:
        chunks: S item texts.
        latents: (S, C) their latents.
        memories: G chunk memories (item ids ``c<index>``).
        group_of: S chunk-memory indices.
        scope: a scope detector over the S items (ids ``c<index>``).
    """

    chunks: list[str]
    latents: Tensor
    memories: list[ItemMemory]
    group_of: list[int]
    scope: ScopeDetector


@torch.inference_mode()
def write_document(lm: Any, chunks: Sequence[str], chunk_items: int | None = None,
                   batch_size: int = 64) -> HierarchicalMemory:
    """Encodes the chunks as `Larimar.edit` encodes sentences, and writes them, in order, into memories of
    ``chunk_items`` items (default: K).

    Each chunk's latent is ``lm.fact_latents``: the encoder's, then refined with ``lm.refinement`` as a sentence
    (`larimar.editor.refine.refinement_targets`; none with ``Refinement(steps=0)``, the paper's one-shot encoding).

    Args:
        lm: a `Larimar` editor (its model, refinement, memory config and scope encoder are used; its memory is not
            touched).
        chunks: the items (sentences).
        chunk_items: items per chunk memory.
        batch_size: texts per encoder forward.

    Raises:
        ValueError: no chunks, ``chunk_items < 1``, or a chunk that is not a sentence `Larimar.edit` accepts.
    """
    chunks = list(chunks)
    if not chunks:
        raise ValueError("no chunks to write")
    per = chunk_items or lm.model.memory.config.num_slots
    if per < 1:
        raise ValueError(f"chunk_items must be >= 1, got {per}")
    _, Z = lm.fact_latents(chunks, batch_size)  # (S, C)
    ids = [f"c{i}" for i in range(len(chunks))]
    memories, group_of = [], []
    for g, lo in enumerate(range(0, len(chunks), per)):
        m = ItemMemory(lm.model.memory)
        m.write(Z[lo : lo + per], ids[lo : lo + per])
        memories.append(m)
        group_of += [g] * len(ids[lo : lo + per])
    scope = lm.scope.with_facts(lm.scope.embed(chunks), ids)
    return HierarchicalMemory(chunks, Z, memories, group_of, scope)


@torch.inference_mode()
def read_document(lm: Any, hm: HierarchicalMemory, questions: Sequence[str], hierarchy: str = "scope",
                  read_mode: str = "recall") -> tuple[Tensor, list[int]]:
    """Latents (Q, C) answering questions from a written document, and the chunk index nearest to each question.

    Args:
        lm: the `Larimar` editor whose model encodes the questions.
        hm: the written document.
        questions: Q questions.
        hierarchy: "scope" or "recursive" (see the module docstring).
        read_mode: "recall" (the chunk memory addressed with the nearest sentence's key), "keyed" (that read-out
            projected on the question's latent), "memory" (read with the question's latent) or "nearest" (the
            nearest item's latent). "recursive" reads with the question's latent (except with "nearest").

    Raises:
        ValueError: unknown hierarchy or read mode.
    """
    if hierarchy not in HIERARCHIES:
        raise ValueError(f"hierarchy must be one of {HIERARCHIES}, got {hierarchy!r}")
    check_read_mode(read_mode)
    questions = list(questions)
    _, nearest_ids = hm.scope.score(questions)
    nearest = [int(str(i)[1:]) for i in nearest_ids]  # chunk indices
    scoped = hierarchy == "scope" or read_mode == "nearest"  # else the recursive read, with the question's latent
    free = scoped and read_mode in QUERY_FREE_READS
    zq = None if free else lm.model.encode_texts(questions).float().cpu()  # (Q, C)
    if scoped:
        z = torch.zeros(len(questions), hm.latents.shape[1])  # (Q, C)
        for g, m in enumerate(hm.memories):
            rows = [q for q, c in enumerate(nearest) if hm.group_of[c] == g]
            if rows:  # the chunk memory holding each question's nearest sentence
                z[rows] = read_at(m, read_mode, [f"c{nearest[q]}" for q in rows],
                                  None if zq is None else zq[rows]).float().cpu()  # (R, C)
        return z, nearest
    reads = torch.stack([m.read(zq).float().cpu() for m in hm.memories], 1)  # (Q, G, C)
    mem = lm.model.memory
    dev = mem.M0.device
    _, z, _, _ = mem.write_read(reads.to(dev), zq[:, None].to(dev))  # top memory per question: (Q, 1, C)
    return z[:, 0].float().cpu(), nearest


@torch.inference_mode()
def plain_window_nll(model: Any, doc_ids: Sequence[int], prompts: Sequence[str], continuations: Sequence[str],
                     window: int, batch_size: int = 16) -> tuple[Tensor, list[int]]:
    """Mean NLL (B,) of each continuation after [start] + the document's last tokens + "\\n" + prompt, at most
    ``window`` tokens in all (z = 0), and where the context starts in ``doc_ids`` (``len(doc_ids)``: none).

    Every row gets the same context: the document's last tokens that fit beside the longest prompt + continuation.
    It runs through the decoder once; its KV cache then serves every row (the questions all follow the document).

    Args:
        model: the `LarimarModel`.
        doc_ids: the document's decoder tokens.
        prompts: B questions (non-empty).
        continuations: B answers (with their leading space).
        window: the decoder's window in tokens.
        batch_size: rows per forward after the context.
    """
    tok = model.decoder_tokenizer
    sep = tok(SEPARATOR, add_special_tokens=False)["input_ids"] if doc_ids else []
    qa = [(tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"])
          for p, c in zip(prompts, continuations)]
    if any(not p or not c for p, c in qa):
        raise ValueError("every prompt and continuation must tokenize to at least one token")
    room = window - 1 - len(sep) - max(len(p) + len(c) for p, c in qa)
    ctx = list(doc_ids[-room:]) if room > 0 else []
    head = torch.tensor([[model.start_token_id, *ctx, *(sep if ctx else [])]], device=model.device)  # (1, P)
    P = head.shape[1]
    cache, head_mask, _ = model.decoder.prefill_plain(head)
    out = []
    for lo in range(0, len(qa), max(1, batch_size)):
        part = qa[lo : lo + batch_size]
        b, T = len(part), max(len(p) + len(c) for p, c in part)
        ids = torch.full((b, T), model.pad_token_id, dtype=torch.long)  # (b, T), right padded
        mask = torch.zeros((b, T), dtype=torch.long)
        for i, (p, c) in enumerate(part):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        rows_cache = copy.deepcopy(cache)
        rows_cache.batch_repeat_interleave(b)
        full_mask = torch.cat([head_mask.expand(b, -1), mask], dim=1)  # (b, 1 + P + T)
        positions = (P + torch.arange(T, device=model.device))[None].expand(b, T)  # (b, T)
        latent = torch.zeros(b, model.config.latent_size, device=model.device, dtype=model.decoder.kv_proj.weight.dtype)
        logits = model.decoder.step(ids, latent, full_mask, positions, rows_cache).float()  # (b, T, V)
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # (b, T-1): token t + 1
        for i, (p, c) in enumerate(part):
            out.append(-lp[i, len(p) - 1 : len(p) + len(c) - 1].mean().cpu())
    return torch.stack(out), [len(doc_ids) - len(ctx)] * len(qa)


def decoder_window(model: Any) -> int:
    """The decoder's context window in tokens (its config's max_position_embeddings or n_positions)."""
    cfg = model.decoder.model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not n:
        raise ValueError("the decoder's config names no window (max_position_embeddings / n_positions): pass --window")
    return int(n)


def _wins(model: Any, prompts: list[str], new: list[str], true: list[str], latent: Tensor | None,
          batch_size: int) -> list[bool]:
    out = []
    for lo in range(0, len(prompts), max(1, batch_size)):
        ps = prompts[lo : lo + batch_size]
        n = len(ps)
        conts = [" " + t.strip() for t in new[lo : lo + batch_size] + true[lo : lo + batch_size]]
        lat = None if latent is None else torch.cat([latent[lo : lo + n]] * 2).to(model.device)  # (2n, C)
        nll = model.continuation_nll(ps + ps, conts, lat).float().cpu()  # (2n,)
        out += [es_success(float(nll[i]), float(nll[n + i])) for i in range(n)]
    return out


def paraphrase_question(req: EditRequest) -> str | None:
    """The question that is not the fact's written sentence: the record's first CounterFact paraphrase with its
    distractor sentence removed (CounterFact paraphrases read "Distractor sentence. Real question"; the last
    sentence by `split_sentences` is kept). None when the record has no paraphrase."""
    for p in req.paraphrase_prompts:
        q = split_sentences(p)[-1].strip()
        if q:
            return q
    return None


def rag_prompts(lm: Any, hm: HierarchicalMemory, questions: Sequence[str]) -> tuple[list[str], list[bool]]:
    """Retrieval into the prompt over the document's sentences (the `RagEditor` rule with the document's scope
    index): in scope (nearest-sentence cosine >= ``lm.scope_threshold``, or always without ``lm.use_scope``), the
    nearest sentence + SEPARATOR + question; else the question alone. Returns the prompts and the scope decisions."""
    sims, nearest = hm.scope.score(list(questions))
    use_scope = bool(getattr(lm, "use_scope", True))
    scope = [bool(x >= lm.scope_threshold) if use_scope else True for x in sims.tolist()]
    prompts = [hm.chunks[int(str(n)[1:])] + SEPARATOR + q if ok and n is not None else q
               for q, ok, n in zip(questions, scope, nearest)]
    return prompts, scope


@torch.inference_mode()
def evaluate_longcontext(
    lm: Any,
    records: Sequence[EditRequest],
    paragraphs: Iterable[str],
    n_facts: int,
    filler_per_fact: int = 4,
    window: int = 2048,
    chunk_items: int | None = None,
    hierarchy: str = "scope",
    read_mode: str = "recall",
    seed: int = 0,
    batch_size: int = 32,
    plain_batch_size: int = 16,
    plain_sample: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One document of ``n_facts`` facts: recall by Larimar (memory), rag (the nearest sentence in the prompt), the
    plain decoder with a window, and no context, on questions that are not the written sentences.

    Questions. Each fact is asked with `paraphrase_question` (its CounterFact paraphrase, distractor removed; the
    rewrite prompt when the record has none, counted in ``n_prefix_questions``). The written-prefix question (the
    sentence's beginning, on which refined latents were optimised) is kept as a labelled extra: ``prefix_*`` keys.

    Windows. ``fact_in_window`` says whether the fact's sentence is inside the plain decoder's context; every recall
    is also reported over the facts inside (``*_in_window``) and outside (``*_out_window``) it.

    Args:
        lm: the `Larimar` editor (model, memory config, scope encoder and threshold).
        records: CounterFact records with target_true; the first ``n_facts`` are the facts.
        paragraphs: filler paragraphs (e.g. `larimar.data.iter_wikipedia_texts` of the validation file).
        n_facts: facts in the document.
        filler_per_fact: filler sentences per fact.
        window: the plain decoder's window (tokens).
        chunk_items: items per chunk memory (default: K).
        hierarchy: "scope" or "recursive".
        read_mode: "keyed", "recall", "memory" or "nearest".
        seed: the document's layout.
        batch_size: rows per forward when scoring with memory.
        plain_batch_size: rows per forward of the windowed plain decoder, after its shared context.
        plain_sample: ask the plain decoder only a seeded random sample of this many facts (0: all); each question
            costs a pass over the whole window. ``recall_plain`` is then over the sample, and
            ``recall_on_plain_sample`` is Larimar's recall on the same facts.

    Returns:
        (``{n_facts, recall, recall_rag, recall_plain, recall_none, *_in_window, *_out_window, prefix_*, read_ms,
        ...}``, per-fact rows).
    """
    records = [r for r in records if r.target_true]
    if n_facts < 1 or n_facts > len(records):
        raise ValueError(f"n_facts must be in [1, {len(records)}] (records with target_true), got {n_facts}")
    facts = records[:n_facts]
    doc = build_document(facts, filler_sentences(paragraphs, filler_per_fact * n_facts), seed)
    model = lm.model
    t0 = time.perf_counter()
    chunks = list(doc.sentences)  # the document's sentences (what `chunk_document` finds in Wikipedia text)
    hm = write_document(lm, chunks, chunk_items)
    write_s = time.perf_counter() - t0
    prefix = [f.full_prompt for f in doc.facts]  # the written sentence's beginning (the extra)
    para = [paraphrase_question(f) for f in doc.facts]
    questions = [q if q is not None else p for q, p in zip(para, prefix)]
    new, true = [f.target_new for f in doc.facts], [f.target_true or "" for f in doc.facts]
    Q = len(questions)
    t0 = time.perf_counter()
    z, nearest = read_document(lm, hm, questions, hierarchy, read_mode)
    read_ms = 1000.0 * (time.perf_counter() - t0) / Q
    z_p, nearest_p = read_document(lm, hm, prefix, hierarchy, read_mode)
    ok = {"": _wins(model, questions, new, true, z, batch_size),
          "prefix_": _wins(model, prefix, new, true, z_p, batch_size)}
    ok_none = {"": _wins(model, questions, new, true, None, batch_size),
               "prefix_": _wins(model, prefix, new, true, None, batch_size)}
    t0 = time.perf_counter()
    rag_q, rag_scope = rag_prompts(lm, hm, questions)
    rag_ms = 1000.0 * (time.perf_counter() - t0) / Q
    rag_p, rag_scope_p = rag_prompts(lm, hm, prefix)
    ok_rag = {"": _wins(model, rag_q, new, true, None, batch_size),
              "prefix_": _wins(model, rag_p, new, true, None, batch_size)}
    try:
        enc = model.decoder_tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        doc_ids, offsets = enc["input_ids"], enc["offset_mapping"]  # offsets: (start, end) characters per token
    except (NotImplementedError, TypeError, KeyError):  # a slow tokenizer: no offsets, no fact_in_window
        doc_ids, offsets = model.decoder_tokenizer(doc.text, add_special_tokens=False)["input_ids"], None
    char_at = [len(" ".join(doc.sentences[:i])) + (1 if i else 0) for i in doc.fact_positions]  # facts' first char
    asked = sorted(random.Random(seed).sample(range(Q), plain_sample)) if 0 < plain_sample < Q else list(range(Q))
    A = len(asked)
    t0 = time.perf_counter()
    qs = [questions[i] for i in asked] + [prefix[i] for i in asked]  # (2A,): paraphrase, then prefix questions
    news = [" " + new[i].strip() for i in asked] * 2
    trues = [" " + true[i].strip() for i in asked] * 2
    nll, starts = plain_window_nll(model, doc_ids, qs + qs, news + trues, window, plain_batch_size)  # (4A,)
    plain_ms = 1000.0 * (time.perf_counter() - t0) / (2 * A)
    ok_plain: dict[str, list[bool | None]] = {"": [None] * Q, "prefix_": [None] * Q}
    for j, i in enumerate(asked):
        ok_plain[""][i] = bool(nll[j] < nll[2 * A + j])
        ok_plain["prefix_"][i] = bool(nll[A + j] < nll[3 * A + j])
    start = starts[0]  # every question follows the same context
    rows = []
    for q, f in enumerate(doc.facts):
        home = doc.fact_positions[q]  # the fact's chunk
        in_window = None if offsets is None else start < len(doc_ids) and char_at[q] >= offsets[start][0]
        row = {"n_facts": n_facts, "case_id": f.case_id, "question": questions[q],
               "question_kind": "paraphrase" if para[q] is not None else "prefix", "prefix_question": prefix[q],
               "target_new": f.target_new, "target_true": f.target_true, "sentence_index": home,
               "fact_in_window": in_window}
        for tag in ("", "prefix_"):
            near = nearest if not tag else nearest_p
            row.update({f"{tag}success": ok[tag][q], f"{tag}success_rag": ok_rag[tag][q],
                        f"{tag}success_plain": ok_plain[tag][q], f"{tag}success_none": ok_none[tag][q],
                        f"{tag}rag_in_scope": (rag_scope if not tag else rag_scope_p)[q],
                        f"{tag}nearest_is_fact": near[q] == home,
                        f"{tag}right_memory": hm.group_of[near[q]] == hm.group_of[home]})
        rows.append(row)

    def mean(key: str, where: bool | None = None) -> float | None:
        vals = [float(r[key]) for r in rows
                if r[key] is not None and (where is None or r["fact_in_window"] is where)]
        return sum(vals) / len(vals) if vals else None

    summary: dict[str, Any] = {
        "n_facts": n_facts, "question": "paraphrase (distractor removed)",
        "n_prefix_questions": sum(p is None for p in para), "n_plain": A,
        "recall_on_plain_sample": sum(ok[""][i] for i in asked) / A,
        "read_ms": read_ms, "rag_retrieve_ms": rag_ms, "plain_ms": plain_ms, "write_s": write_s,
        "n_sentences": len(chunks), "n_doc_tokens": len(doc_ids), "n_memories": len(hm.memories),
        "chunk_items": chunk_items or model.memory.config.num_slots, "window": window,
        "facts_in_window": mean("fact_in_window"),
        "n_in_window": sum(r["fact_in_window"] is True for r in rows),
        "n_out_window": sum(r["fact_in_window"] is False for r in rows),
    }
    for tag in ("", "prefix_"):
        for name, key in (("recall", "success"), ("recall_rag", "success_rag"), ("recall_plain", "success_plain"),
                          ("recall_none", "success_none")):
            summary[f"{tag}{name}"] = mean(f"{tag}{key}")
            summary[f"{tag}{name}_in_window"] = mean(f"{tag}{key}", True)
            summary[f"{tag}{name}_out_window"] = mean(f"{tag}{key}", False)
        summary[f"{tag}rag_scope_rate"] = mean(f"{tag}rag_in_scope")
        summary[f"{tag}nearest_is_fact"] = mean(f"{tag}nearest_is_fact")
        summary[f"{tag}right_memory"] = mean(f"{tag}right_memory")
    return summary, rows
