"""Facts as users write them: plain sentences written into one memory, then asked as questions (issue 21).

A fact file is JSON lines, one fact per line::

    {"fact": "The CEO of Northwind Traders is Maria Okafor.",
     "questions": [{"prompt": "The CEO of Northwind Traders is", "answer": "Maria Okafor"},
                   {"prompt": "Q: Who is the CEO of Northwind Traders? A:", "answer": "Maria Okafor"}],
     "unrelated": [{"prompt": "The capital of France is", "answer": "Paris"}]}

(``unrelated`` may be empty or missing; other keys, e.g. ``source``, are kept but not used).

`evaluate_facts` writes ALL facts into ONE memory, one `Larimar.edit(sentence)` call per fact (the path of
``larimar edit``: sentences, not requests), timing each call, then asks every question with greedy generation.
Methods:

    larimar  `Larimar.ask` (scope detector, memory read-out)
    rag      `larimar.eval.editors.RagEditor`: the nearest fact's sentence + "\\n" + the prompt through the plain
             decoder when the Larimar scope detector's encoder and threshold (``lm.scope``, ``lm.scope_threshold``)
             put the prompt in scope, else the prompt alone
    none     the plain decoder (z = 0)

Metrics per method (rates in [0, 1]):

    own_prefix_em     greedy EM on the questions whose prompt is a prefix of the fact sentence
    question_em       greedy EM on every other question
    question_em_unseen  the same on the other questions whose prompt is none of the prompts the fact's latent was
                      refined on (`refinement_targets`: e.g. a wh-question read the sentence yields); question_em
                      minus these is partly a fit (``n_questions_refined`` counts them)
    answer_token_acc  teacher-forced token accuracy of " " + answer after the prompt, all questions
    unrelated_em      greedy EM on the unrelated prompts (compare with ``none``)
    fluency           ROME's weighted bi/tri-gram entropy of the ``gen_tokens`` greedy tokens after each question
    fluency_unedited  the same of the plain decoder on the same prompts; fluency_ratio = fluency / it (a short
                      answer that ends scores low: entropy is over the text generated, 0 for an empty one)
    answer_repeat_rate  of the questions answered right (EM), the share whose generation says the answer again
                      after it (`larimar.eval.metrics.repeats_answer`: the degenerate "Maria Okafor. Maria Okafor ..." continuation)
    answer_end_rate   of the questions answered right, the share whose generation is the answer and then ends
                      (`ends_after_answer`)
    answer_sentence_end_rate  of the questions answered right, the share whose answer ends its sentence right
                      there (`sentence_ends_after_answer`: ".", "!", "?", a line break or the end follows), whatever
                      comes next
    edit_ms_median    the median wall time of one whole edit call (rag: its index insert; none: None)

EM (`larimar.eval.metrics.starts_with`): the greedy answer, stripped and case-folded, starts with the expected
answer (stripped, case-folded).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from larimar.data import iter_json_lines
from larimar.editor.refine import Refinement, refinement_targets
from larimar.eval.editors import LarimarEditor, NoEditEditor, RagEditor
from larimar.eval.metrics import (
    ending_rates,
    mean_of,
    ngram_entropy,
    sentence_ends_after_answer,
    starts_with,
    token_accuracy,
)
from larimar.eval.report import write_cases, write_table

logger = logging.getLogger(__name__)

METHODS = ("larimar", "rag", "none")
KINDS = ("own_prefix", "question", "unrelated")
SUMMARY_KEYS = (
    "method", "n_facts", "n_questions", "n_own_prefix", "n_other_questions", "n_unrelated", "own_prefix_em",
    "question_em", "question_em_unseen", "n_questions_refined", "answer_token_acc", "unrelated_em", "fluency",
    "fluency_unedited", "fluency_ratio", "answer_repeat_rate", "answer_end_rate",
    "answer_sentence_end_rate", "question_scope_rate", "unrelated_scope_rate", "edit_ms_median",
)
"""The keys of every per-method summary object (`evaluate_facts`)."""
TABLE_COLUMNS = ("method", "n_facts", "n_questions", "own_prefix_em", "question_em", "question_em_unseen",
                 "answer_token_acc", "unrelated_em", "fluency", "fluency_unedited", "answer_repeat_rate",
                 "answer_end_rate", "answer_sentence_end_rate", "question_scope_rate", "unrelated_scope_rate",
                 "edit_ms_median")


# -- the file format ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    """A prompt and the answer its greedy continuation should start with."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class FactItem:
    """One fact sentence, the questions about it and unrelated prompts with their true answers.

    Attributes:
        fact: the sentence written to memory.
        questions: at least one question (the first may be the sentence's own beginning).
        unrelated: prompts about other things (may be empty).
        extra: the line's other keys (e.g. ``source``), kept for the cases file.
    """

    fact: str
    questions: tuple[QA, ...]
    unrelated: tuple[QA, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def is_own_prefix(fact: str, prompt: str) -> bool:
    """Whether ``prompt`` (stripped) is a beginning of the fact sentence (stripped): an "own prefix" question."""
    p = prompt.strip()
    return bool(p) and fact.strip().startswith(p)


def _qa_list(value: Any, key: str, required: bool) -> tuple[list[QA], list[str]]:
    """QA pairs of one line's ``key`` and the problems found (messages without the line number)."""
    if value is None and not required:
        return [], []
    if not isinstance(value, list) or (required and not value):
        return [], [f"{key!r} must be a {'non-empty ' if required else ''}list of {{prompt, answer}} objects"]
    out, problems = [], []
    for j, q in enumerate(value):
        if not isinstance(q, dict):
            problems.append(f"{key}[{j}] must be an object with 'prompt' and 'answer'")
            continue
        bad = [k for k in ("prompt", "answer") if not isinstance(q.get(k), str) or not q.get(k).strip()]
        if bad:
            problems.append(f"{key}[{j}]: {' and '.join(repr(b) for b in bad)} must be non-empty strings")
            continue
        out.append(QA(q["prompt"], q["answer"]))
    return out, problems


def parse_fact(obj: Any) -> tuple[FactItem | None, list[str]]:
    """A `FactItem` from one decoded JSON line, or None and the problems found."""
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {type(obj).__name__}"]
    problems = []
    fact = obj.get("fact")
    if not isinstance(fact, str) or not fact.strip():
        problems.append("'fact' must be a non-empty string")
    questions, p1 = _qa_list(obj.get("questions"), "questions", required=True)
    unrelated, p2 = _qa_list(obj.get("unrelated"), "unrelated", required=False)
    problems += p1 + p2
    if problems:
        return None, problems
    extra = {k: v for k, v in obj.items() if k not in ("fact", "questions", "unrelated")}
    return FactItem(fact.strip(), tuple(questions), tuple(unrelated), extra), []


def load_fact_file(path: str | Path) -> list[FactItem]:
    """The facts of a JSON-lines fact file (blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: bad lines (every problem with its line number, the first 20 listed) or no fact at all.
    """
    p = Path(path)
    items: list[FactItem] = []
    problems: list[str] = []
    for n, obj, not_json in iter_json_lines(p):
        if not_json is not None:
            problems.append(f"line {n}: not JSON ({not_json})")
            continue
        item, bad = parse_fact(obj)
        problems += [f"line {n}: {b}" for b in bad]
        if item is not None:
            items.append(item)
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise ValueError(f"{p}: {len(problems)} bad line problem(s){more}:\n  " + "\n  ".join(problems[:20]))
    if not items:
        raise ValueError(f"{p}: no facts (expected JSON lines with 'fact' and 'questions')")
    return items


# -- the methods -------------------------------------------------------------------------------------------------


class _Method:
    """How one method answers: greedy generations with scope decisions, and teacher-forced token accuracy."""

    name = ""

    def generate(self, prompts: list[str], max_new_tokens: int) -> tuple[list[str], list[bool | None]]:
        raise NotImplementedError

    def token_acc(self, prompts: list[str], answers: list[str], batch_size: int) -> list[float]:
        raise NotImplementedError


class _LarimarMethod(_Method):
    name = "larimar"

    def __init__(self, lm: Any) -> None:
        self.lm, self.editor = lm, LarimarEditor(lm)

    def generate(self, prompts: list[str], max_new_tokens: int) -> tuple[list[str], list[bool | None]]:
        answers = self.lm.ask(prompts, max_new_tokens=max_new_tokens)
        return [a.text for a in answers], [bool(a.in_scope) for a in answers]

    def token_acc(self, prompts: list[str], answers: list[str], batch_size: int) -> list[float]:
        return token_accuracy(self.editor, prompts, answers, batch_size)[0]


class _NoneMethod(_Method):
    name = "none"

    def __init__(self, lm: Any) -> None:
        self.editor = NoEditEditor(lm.model)

    def generate(self, prompts: list[str], max_new_tokens: int) -> tuple[list[str], list[bool | None]]:
        return self.editor.generate(prompts, max_new_tokens), [None] * len(prompts)

    def token_acc(self, prompts: list[str], answers: list[str], batch_size: int) -> list[float]:
        return token_accuracy(self.editor, prompts, answers, batch_size)[0]


class _RagMethod(_Method):
    """`larimar.eval.editors.RagEditor`: the nearest written sentence + "\\n" + prompt through the plain decoder
    when in scope (the Larimar scope detector's encoder, threshold and switches), else the prompt alone. It keeps
    its own index of the facts, written by `write_facts` beside the Larimar memory."""

    name = "rag"

    def __init__(self, lm: Any) -> None:
        self.editor = RagEditor(lm)

    def generate(self, prompts: list[str], max_new_tokens: int) -> tuple[list[str], list[bool | None]]:
        scope = self.editor.route(prompts).in_scope
        return self.editor.generate(prompts, max_new_tokens), [bool(s) for s in scope]

    def token_acc(self, prompts: list[str], answers: list[str], batch_size: int) -> list[float]:
        return token_accuracy(self.editor, prompts, answers, batch_size)[0]


def _build_method(name: str, lm: Any) -> _Method:
    if name == "larimar":
        return _LarimarMethod(lm)
    if name == "rag":
        return _RagMethod(lm)
    if name == "none":
        return _NoneMethod(lm)
    raise ValueError(f"unknown method {name!r} for facts; expected some of {', '.join(METHODS)}")


# -- the evaluation ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    fact_index: int
    kind: str  # "own_prefix", "question" or "unrelated"
    prompt: str
    answer: str


def _rows(items: Sequence[FactItem]) -> list[_Row]:
    rows = []
    for i, it in enumerate(items):
        rows += [_Row(i, "own_prefix" if is_own_prefix(it.fact, q.prompt) else "question", q.prompt, q.answer)
                 for q in it.questions]
        rows += [_Row(i, "unrelated", q.prompt, q.answer) for q in it.unrelated]
    return rows


def _batched_generate(method: _Method, prompts: list[str], max_new_tokens: int,
                      batch_size: int) -> tuple[list[str], list[bool | None]]:
    texts: list[str] = []
    scope: list[bool | None] = []
    for lo in range(0, len(prompts), max(1, batch_size)):
        t, s = method.generate(prompts[lo : lo + batch_size], max_new_tokens)
        texts += t
        scope += s
    return texts, scope


def write_facts(lm: Any, items: Sequence[FactItem], rag: RagEditor | None = None,
                progress: bool = False) -> tuple[list[float], list[float]]:
    """Writes every fact into ``lm``'s (emptied) memory, one `Larimar.edit(sentence)` call per fact, and into the
    (emptied) index of ``rag`` too, one `RagEditor.edit([sentence])` call per fact.

    Returns:
        the wall time (ms) of each whole Larimar edit call and of each rag index insert (empty without ``rag``),
        one per fact.
    """
    lm.reset()
    if rag is not None:
        rag.reset()
    edit_ms: list[float] = []
    rag_ms: list[float] = []
    for k, it in enumerate(items):
        t0 = time.perf_counter()
        lm.edit(it.fact)
        t1 = time.perf_counter()
        edit_ms.append(1e3 * (t1 - t0))
        if rag is not None:
            rag.edit([it.fact])
            rag_ms.append(1e3 * (time.perf_counter() - t1))
        if progress and ((k + 1) % 10 == 0 or k + 1 == len(items)):
            logger.info("facts: %d / %d written", k + 1, len(items))
    return edit_ms, rag_ms


def evaluate_facts(
    lm: Any,
    items: Sequence[FactItem],
    methods: Sequence[str] = METHODS,
    gen_tokens: int = 30,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Writes all facts into one memory, asks every question, and scores each method (module docstring).

    Args:
        lm: a `larimar.editor.Larimar` (its memory is emptied first and left holding the facts).
        items: the facts (`load_fact_file`).
        methods: some of "larimar", "rag", "none".
        gen_tokens: greedy tokens generated after each prompt (EM and fluency read the same generation).
        batch_size: prompts per generation / scoring batch.
        progress: log progress at INFO level.

    Returns:
        (summaries, cases): one summary per method (the keys of `SUMMARY_KEYS`), and one case per question and
        unrelated prompt: fact_index, fact, kind, prompt, answer, and per method ``{text, em, token_acc,
        in_scope, fluency}`` under ``results[method]`` (fluency None for unrelated prompts).

    Raises:
        ValueError: no facts, an unknown method, or gen_tokens < 1.
    """
    methods = list(dict.fromkeys(methods))
    if not items:
        raise ValueError("evaluate_facts needs at least one fact")
    if gen_tokens < 1:
        raise ValueError(f"gen_tokens must be >= 1, got {gen_tokens}")
    built = [_build_method(m, lm) for m in methods]
    rows = _rows(items)
    prompts, answers = [r.prompt for r in rows], [r.answer for r in rows]
    asked = [k for k, r in enumerate(rows) if r.kind != "unrelated"]
    rag = next((m.editor for m in built if isinstance(m, _RagMethod)), None)
    edit_ms, rag_ms = write_facts(lm, items, rag, progress) if set(methods) & {"larimar", "rag"} else ([], [])
    results: dict[str, dict[str, list[Any]]] = {}
    with torch.inference_mode():
        for m in built:
            t0 = time.perf_counter()
            texts, scope = _batched_generate(m, prompts, gen_tokens, batch_size)
            acc = [None] * len(rows)
            for k, a in zip(asked, m.token_acc([prompts[k] for k in asked], [answers[k] for k in asked],
                                               batch_size)):
                acc[k] = a
            results[m.name] = {"text": texts, "in_scope": scope, "token_acc": acc,
                               "em": [starts_with(t, a) for t, a in zip(texts, answers)],
                               "fluency": [ngram_entropy(t) if r.kind != "unrelated" else None
                                           for t, r in zip(texts, rows)]}
            if progress:
                logger.info("facts: %s answered %d prompts in %.1f s", m.name, len(rows), time.perf_counter() - t0)
        if "none" in results:
            plain_fluency = [results["none"]["fluency"][k] for k in asked]
        else:
            plain = _batched_generate(_NoneMethod(lm), [prompts[k] for k in asked], gen_tokens, batch_size)[0]
            plain_fluency = [ngram_entropy(t) for t in plain]
    unedited = mean_of(plain_fluency)
    by_kind = {kind: [k for k, r in enumerate(rows) if r.kind == kind] for kind in KINDS}
    refined = refined_prompts(lm, items)
    seen = [rows[k].prompt.strip() in refined[rows[k].fact_index] for k in range(len(rows))]
    unseen = [k for k in by_kind["question"] if not seen[k]]
    summaries = []
    for name in methods:
        res = results[name]
        fl = mean_of(res["fluency"][k] for k in asked)
        repeat, end = ending_rates((res["text"][k], answers[k]) for k in asked if res["em"][k])
        ms = {"larimar": edit_ms, "rag": rag_ms}.get(name, [])
        summaries.append({
            "method": name, "n_facts": len(items), "n_questions": len(asked),
            "n_own_prefix": len(by_kind["own_prefix"]), "n_other_questions": len(by_kind["question"]),
            "n_unrelated": len(by_kind["unrelated"]),
            "own_prefix_em": mean_of([res["em"][k] for k in by_kind["own_prefix"]]),
            "question_em": mean_of([res["em"][k] for k in by_kind["question"]]),
            "question_em_unseen": mean_of([res["em"][k] for k in unseen]),
            "n_questions_refined": len(by_kind["question"]) - len(unseen),
            "answer_token_acc": mean_of(res["token_acc"][k] for k in asked),
            "unrelated_em": mean_of([res["em"][k] for k in by_kind["unrelated"]]),
            "fluency": fl, "fluency_unedited": unedited,
            "fluency_ratio": fl / unedited if fl is not None and unedited else None,
            "answer_repeat_rate": repeat, "answer_end_rate": end,
            "answer_sentence_end_rate": mean_of([sentence_ends_after_answer(res["text"][k], answers[k])
                                                 for k in asked if res["em"][k]]),
            "question_scope_rate": mean_of([res["in_scope"][k] for k in asked]),
            "unrelated_scope_rate": mean_of([res["in_scope"][k] for k in by_kind["unrelated"]]),
            "edit_ms_median": statistics.median(ms) if ms else None,
        })
    cases = []
    for k, r in enumerate(rows):
        cases.append({"fact_index": r.fact_index, "fact": items[r.fact_index].fact, "kind": r.kind,
                      "prompt": r.prompt, "answer": r.answer, "refined_prompt": seen[k],
                      "results": {name: {key: results[name][key][k] for key in
                                         ("text", "em", "token_acc", "in_scope", "fluency")} for name in methods}})
    return summaries, cases


def refined_prompts(lm: Any, items: Sequence[FactItem]) -> list[set[str]]:
    """Per fact, the prompts (stripped) its latent is refined on by ``lm.edit(fact)`` (`refinement_targets` with
    ``lm.refinement``; none when refinement is off or ``lm`` has none)."""
    ref = getattr(lm, "refinement", None)
    if not isinstance(ref, Refinement) or ref.steps_for(True) == 0:
        return [set() for _ in items]
    return [{p.strip() for p, _ in refinement_targets(it.fact, None, ref.sentence_splits, ref.sentence_questions)}
            for it in items]


def write_facts_outputs(out_dir: str | Path, summaries: Sequence[dict[str, Any]], cases: Sequence[dict[str, Any]],
                        meta: dict[str, Any]) -> Path:
    """Writes ``cases.jsonl``, ``summary.json`` (a list: one object per method, with ``meta``) and ``summary.md``
    (a table of `TABLE_COLUMNS`) into ``out_dir`` (created)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_cases(d / "cases.jsonl", cases)
    objs = [{**s, **meta} for s in summaries]
    (d / "summary.json").write_text(json.dumps(objs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    n_facts = meta.get("n_facts", summaries[0].get("n_facts", "?") if summaries else "?")
    notes = [(f"{n_facts} facts written one after another into one memory "
             f"(`Larimar.edit(sentence)`, read {meta.get('read_mode', '?')}, sentence refinement: "
             f"{_sentence_steps(meta)} steps, {meta.get('refine_splits', '?')} beginnings, question reads "
             f"{meta.get('refine_questions', '?')}), then every question "
             f"asked; EM = the greedy answer starts with the expected one (case-folded); fluency = weighted "
             f"bi/tri-gram entropy of {meta.get('gen_tokens', '?')} greedy tokens. Checkpoint "
             f"`{meta.get('checkpoint')}`, scope threshold {meta.get('scope_threshold')}, {meta.get('date')}, "
             f"{meta.get('machine')}.")]
    write_table(d / "summary.md", f"facts: {meta.get('data')}", notes, objs, TABLE_COLUMNS)
    return d


def _sentence_steps(meta: dict[str, Any]) -> Any:
    """The refinement steps a sentence took in a run, from its recorded options ("?" if not recorded)."""
    if not isinstance(meta.get("refine_steps"), int):
        return "?"
    return Refinement(steps=meta["refine_steps"], sentence_steps=meta.get("refine_sentence_steps")).steps_for(True)
