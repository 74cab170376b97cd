"""Input-context-length generalisation (paper section 5.5): facts hidden in a long document, recalled by reading memory.

Benchmark (`build_document`). Facts the base model cannot know: CounterFact requests written as sentences
``prompt(subject) + " " + target_new + "."`` (counterfactual objects), inserted at seeded random positions of a stream
of Wikipedia sentences (``enwiki_2018_validation.jsonl``, ``filler_per_fact`` filler sentences per fact, facts in a
seeded random order). The question for a fact is ``prompt(subject)``; an answer is right when the mean NLL of
" target_new" after it is below that of " target_true" (ES-style).

Larimar (`write_document`, `read_document`). The document is split into sentences, each sentence one item: the
benchmark keeps the sentence units it was built from (filler sentences come from `larimar.scope.split_sentences`;
`chunk_document` splits any other text the same way). Each sentence is encoded as `Larimar.edit` encodes one (the
encoder's latent, refined on the sentence's last word after the rest: ``--refine-steps``, 0 for the paper's one-shot
encoding). Items are written in document order into chunk memories of ``chunk_items`` items (default K), one batch
write each, so a document longer than K sentences is a list of memories. A question is answered from
one latent, chosen hierarchically:

    scope      (default) the chunk memory holding the sentence nearest to the question (scope encoder cosine, per
               sentence of the question) is read with the question's latent: z = M_g read(e(question)), or with
               ``read_mode="keyed"`` (the default) addressed with that sentence's key: z = M_g read_keyed(s, e(q));
    recursive  every chunk memory is read with the question's latent, the G read-outs are written into a top-level
               memory and that memory is read again with the question's latent (the paper's recursive read);
    nearest    (``read_mode="nearest"``, an ablation) the latent of the nearest sentence itself.

Plain baseline (`plain_window_nll`): the decoder with z = 0 given the document's last tokens that fit in ``window``
(start token + context + "\\n" + question + answer <= window), i.e. the context that fits, ending right before the
question; ``fact_in_window`` says whether the fact's sentence is inside that context. ``recall_none`` is the
question alone (no context, no memory).

Command line::

    larimar eval longcontext --n-facts 64,128,256,512 --out runs/longcontext    # window: the decoder's own
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from larimar.data import EditRequest
from larimar.memory import READ_MODES, ItemMemory
from larimar.scope import ScopeDetector, split_sentences

logger = logging.getLogger(__name__)

HIERARCHIES = ("scope", "recursive")
SEPARATOR = "\n"


# ----------------------------------------------------------------------------------------------------------
# The document


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


# ----------------------------------------------------------------------------------------------------------
# Larimar: chunk memories


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

    Each chunk's latent is ``lm.fact_latents``: the encoder's, then refined with ``lm.refinement`` on the chunk's
    last word after the rest (none with ``Refinement(steps=0)``, the paper's one-shot encoding).

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
    scope = copy.copy(lm.scope)
    scope.clear()
    scope.add_embeddings(lm.scope.embed(chunks), ids)
    return HierarchicalMemory(chunks, Z, memories, group_of, scope)


@torch.inference_mode()
def read_document(lm: Any, hm: HierarchicalMemory, questions: Sequence[str], hierarchy: str = "scope",
                  read_mode: str = "keyed") -> tuple[Tensor, list[int]]:
    """Latents (Q, C) answering questions from a written document, and the chunk index nearest to each question.

    Args:
        lm: the `Larimar` editor whose model encodes the questions.
        hm: the written document.
        questions: Q questions.
        hierarchy: "scope" or "recursive" (see the module docstring).
        read_mode: "keyed" (the chunk memory addressed with the nearest sentence's key), "memory" (read with the
            question's latent) or "nearest" (the nearest item's latent). "recursive" reads with the question's latent.

    Raises:
        ValueError: unknown hierarchy or read mode.
    """
    if hierarchy not in HIERARCHIES:
        raise ValueError(f"hierarchy must be one of {HIERARCHIES}, got {hierarchy!r}")
    if read_mode not in READ_MODES:
        raise ValueError(f"read_mode must be one of {READ_MODES}, got {read_mode!r}")
    questions = list(questions)
    _, nearest_ids = hm.scope.score(questions)
    nearest = [int(str(i)[1:]) for i in nearest_ids]  # chunk indices
    if read_mode == "nearest":
        return hm.latents[nearest].clone(), nearest
    zq = lm.model.encode_texts(questions).float().cpu()  # (Q, C)
    if hierarchy == "scope":
        z = torch.zeros_like(zq)  # (Q, C)
        for g, m in enumerate(hm.memories):
            rows = [q for q, c in enumerate(nearest) if hm.group_of[c] == g]
            if rows and read_mode == "keyed":
                z[rows] = m.read_keyed([f"c{nearest[q]}" for q in rows], zq[rows]).float().cpu()  # (R, C)
            elif rows:
                z[rows] = m.read(zq[rows]).float().cpu()  # (R, C)
        return z, nearest
    reads = torch.stack([m.read(zq).float().cpu() for m in hm.memories], 1)  # (Q, G, C)
    mem = lm.model.memory
    dev = mem.M0.device
    _, z, _, _ = mem.write_read(reads.to(dev), zq[:, None].to(dev))  # top memory per question: (Q, 1, C)
    return z[:, 0].float().cpu(), nearest


# ----------------------------------------------------------------------------------------------------------
# The plain decoder with a window


@torch.inference_mode()
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


# ----------------------------------------------------------------------------------------------------------
# The evaluation


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
        out += [bool(nll[i] < nll[n + i]) for i in range(n)]
    return out


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
    read_mode: str = "keyed",
    seed: int = 0,
    batch_size: int = 32,
    plain_batch_size: int = 16,
    plain_sample: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One document of ``n_facts`` facts: Larimar's recall against the plain decoder's with a window.

    Args:
        lm: the `Larimar` editor (model, memory config, scope encoder).
        records: CounterFact records with target_true; the first ``n_facts`` are the facts.
        paragraphs: filler paragraphs (e.g. `larimar.data.iter_wikipedia_texts` of the validation file).
        n_facts: facts in the document.
        filler_per_fact: filler sentences per fact.
        window: the plain decoder's window (tokens).
        chunk_items: items per chunk memory (default: K).
        hierarchy: "scope" or "recursive".
        read_mode: "keyed", "memory" or "nearest".
        seed: the document's layout.
        batch_size: rows per forward when scoring with memory.
        plain_batch_size: rows per forward of the windowed plain decoder, after its shared context.
        plain_sample: ask the plain decoder only a seeded random sample of this many questions (0: all); each
            costs a pass over the whole window. ``recall_plain`` is then over the sample, and
            ``recall_on_plain_sample`` is Larimar's recall on the same questions.

    Returns:
        (``{n_facts, recall, recall_plain, recall_none, read_ms, ...}``, per-fact rows).
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
    questions = [f.full_prompt for f in doc.facts]
    new, true = [f.target_new for f in doc.facts], [f.target_true or "" for f in doc.facts]
    t0 = time.perf_counter()
    z, nearest = read_document(lm, hm, questions, hierarchy, read_mode)
    read_ms = 1000.0 * (time.perf_counter() - t0) / len(questions)
    ok_mem = _wins(model, questions, new, true, z, batch_size)
    ok_none = _wins(model, questions, new, true, None, batch_size)
    try:
        enc = model.decoder_tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        doc_ids, offsets = enc["input_ids"], enc["offset_mapping"]  # offsets: (start, end) characters per token
    except (NotImplementedError, TypeError, KeyError):  # a slow tokenizer: no offsets, no fact_in_window
        doc_ids, offsets = model.decoder_tokenizer(doc.text, add_special_tokens=False)["input_ids"], None
    char_at = [len(" ".join(doc.sentences[:i])) + (1 if i else 0) for i in doc.fact_positions]  # facts' first char
    Q = len(questions)
    asked = sorted(random.Random(seed).sample(range(Q), plain_sample)) if 0 < plain_sample < Q else list(range(Q))
    t0 = time.perf_counter()
    qs = [questions[i] for i in asked]
    nll, starts = plain_window_nll(model, doc_ids, qs + qs, [" " + x.strip() for x in [new[i] for i in asked]
                                                               + [true[i] for i in asked]], window, plain_batch_size)
    plain_ms = 1000.0 * (time.perf_counter() - t0) / len(asked)
    ok_plain: list[bool | None] = [None] * Q
    for j, i in enumerate(asked):
        ok_plain[i] = bool(nll[j] < nll[len(asked) + j])
    ctx_start = [starts[0]] * Q  # every question follows the same context
    rows = []
    for q, f in enumerate(doc.facts):
        home = doc.fact_positions[q]  # the fact's chunk
        start = ctx_start[q]
        in_window = None if offsets is None else start < len(doc_ids) and char_at[q] >= offsets[start][0]
        rows.append({"n_facts": n_facts, "case_id": f.case_id, "question": questions[q], "target_new": f.target_new,
                     "target_true": f.target_true, "sentence_index": doc.fact_positions[q], "success": ok_mem[q],
                     "success_plain": ok_plain[q], "success_none": ok_none[q], "fact_in_window": in_window,
                     "nearest_is_fact": nearest[q] == home,
                     "right_memory": hm.group_of[nearest[q]] == hm.group_of[home]})

    def mean(key: str) -> float | None:
        vals = [float(r[key]) for r in rows if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    summary = {"n_facts": n_facts, "recall": mean("success"), "recall_plain": mean("success_plain"),
               "n_plain": len(asked), "recall_on_plain_sample": sum(ok_mem[i] for i in asked) / len(asked),
               "recall_none": mean("success_none"), "read_ms": read_ms, "plain_ms": plain_ms, "write_s": write_s,
               "n_sentences": len(chunks), "n_doc_tokens": len(doc_ids), "n_memories": len(hm.memories),
               "chunk_items": chunk_items or model.memory.config.num_slots, "window": window,
               "facts_in_window": mean("fact_in_window"), "nearest_is_fact": mean("nearest_is_fact"),
               "right_memory": mean("right_memory")}
    return summary, rows


# ----------------------------------------------------------------------------------------------------------
# Command line


def _default(*parts: str) -> str | None:
    p = Path(__file__).resolve().parents[3] / "shared" / "data"
    p = p.joinpath(*parts)
    return str(p) if p.is_file() else None


def run_longcontext(args: argparse.Namespace) -> dict[str, Any]:
    """``larimar eval longcontext``."""
    from larimar.capabilities import (
        load_editor,
        load_records,
        parse_ints,
        plot_lines,
        write_cases,
        write_summary,
        write_table,
    )
    from larimar.data import iter_wikipedia_texts

    if not args.data or not args.wiki:
        raise ValueError("--data (CounterFact) and --wiki (Wikipedia JSONL) are needed: the shared copies were not "
                         "found")
    if not Path(args.wiki).is_file():
        raise FileNotFoundError(f"no Wikipedia JSONL at {args.wiki}")
    records = load_records(args.data, "counterfact")
    lm, meta = load_editor(args)
    args.window = args.window or decoder_window(lm.model)
    if args.window < 16:
        raise ValueError(f"--window must be at least 16 tokens, got {args.window}")
    results, cases = [], []
    for n in parse_ints(args.n_facts, "--n-facts"):
        s, rows = evaluate_longcontext(lm, records, iter_wikipedia_texts(args.wiki), n, args.filler_per_fact,
                                       args.window, args.chunk_items or None, args.hierarchy, args.read_mode, args.seed or 0,
                                       args.batch_size, args.plain_batch_size, args.plain_sample)
        logger.info("longcontext %d facts: %s", n, s)
        results.append(s)
        cases += rows
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    write_cases(d / "cases.jsonl", cases)
    summary = {"task": "longcontext", "data": list(args.data), "wiki": args.wiki, "hierarchy": args.hierarchy,
               "filler_per_fact": args.filler_per_fact, "protocol": "recall = NLL(target_new) < NLL(target_true) "
               "after the question", "results": results, **meta}
    write_summary(d, summary)
    cols = ["n_facts", "recall", "recall_plain", "n_plain", "recall_on_plain_sample", "recall_none",
            "facts_in_window", "right_memory", "write_s", "read_ms", "plain_ms", "n_sentences", "n_doc_tokens",
            "n_memories"]
    write_table(d / "summary.md", "long-context recall",
                [f"Facts (CounterFact, target_new) in Wikipedia text, {args.filler_per_fact} filler sentences per "
                 f"fact; Larimar: sentence items ({_refined(args.refine_steps)}) in chunk memories of "
                 f"{results[0]['chunk_items']} items, hierarchy {args.hierarchy!r}, read mode {args.read_mode!r}; "
                 f"plain: z = 0 with the last {args.window} tokens before the question."], results, cols)
    xs = [r["n_facts"] for r in results]
    plot_lines(d / "longcontext.png", "Long-context recall", "facts in the document", "recall",
               {"larimar": (xs, [r["recall"] for r in results]),
                f"plain decoder, {args.window}-token window": (xs, [r["recall_plain"] for r in results]),
                "no context": (xs, [r["recall_none"] for r in results])}, logx=True)
    print("\n".join((d / "summary.md").read_text().splitlines()[4:]))
    return summary


def _refined(steps: int) -> str:
    return f"latents refined in {steps} steps" if steps else "one-shot encoder latents"


def add_longcontext_parser(esub: argparse._SubParsersAction) -> None:
    """Adds ``longcontext`` to a subparsers action (``larimar eval``)."""
    from larimar.capabilities import add_model_args

    p = esub.add_parser("longcontext", help="long-context recall: facts in a long document, memory vs window")
    cf = _default("counterfact_rome", "counterfact_rome_929.json")
    p.add_argument("--data", action="append", default=None, metavar="FILE",
                   help=f"CounterFact records (default: {cf})")
    p.add_argument("--wiki", default=_default("wikipedia_en", "enwiki_2018_validation.jsonl"),
                   help="Wikipedia JSONL of filler text (default: the shared validation file)")
    p.add_argument("--n-facts", default="64,128,256,512", help="facts per document, comma-separated")
    p.add_argument("--filler-per-fact", type=int, default=4, help="filler sentences per fact")
    p.add_argument("--window", type=int, default=None,
                   help="the plain decoder's window in tokens (default: its max_position_embeddings, 8192 for "
                        "SmolLM2-135M)")
    p.add_argument("--chunk-items", type=int, default=16,
                   help="sentences per chunk memory (default 16: a read mixes every latent of its memory, and "
                        "rewrite accuracy falls with the number of facts in one memory; 0: K)")
    p.add_argument("--hierarchy", choices=HIERARCHIES, default="scope")
    p.add_argument("--plain-sample", type=int, default=0,
                   help="ask the plain decoder a seeded sample of this many questions per document (0: all)")
    p.add_argument("--plain-batch-size", type=int, default=4,
                   help="rows per forward after the shared context (each holds a copy of its KV cache)")
    add_model_args(p)
    p.set_defaults(func=lambda a: (run_longcontext(_with_default_data(a, cf)), 0)[1])


def _with_default_data(args: argparse.Namespace, default: str | None) -> argparse.Namespace:
    if not args.data and default:
        args.data = [default]
    return args
