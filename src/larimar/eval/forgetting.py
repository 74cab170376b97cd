"""Selective forgetting (paper section 5.4): N facts written, one forgotten (alpha = -1, `Larimar.forget`),
optionally replaced by "prompt + unknown": recall of the forgotten fact and of the N - 1 retained ones."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import torch

from larimar.eval.editors import Editor, LarimarEditor, NoEditEditor, RagEditor
from larimar.eval.metrics import exact_match, mean_of, rewrite_success, target_tokens
from larimar.facts import EditRequest
from larimar.memory import ItemMemory

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"


def forget_exactness(memory: ItemMemory, item_id: str) -> float:
    """Max abs difference of M (K, C) between forgetting ``item_id`` and writing the other items without it.

    ``memory`` is not changed: the comparison is made on copies, with the stored latents (no re-encoding).
    """
    if item_id not in memory:
        raise KeyError(f"no item {item_id!r} in memory")
    forgot = ItemMemory.from_state_tensors(memory.memory, memory.state_tensors(), memory.ids, str(memory.device))
    forgot.forget([item_id])
    fresh = ItemMemory(memory.memory, device=memory.device)
    rest = [i for i in memory.ids if i != item_id]
    if rest:
        fresh.write(torch.stack([memory.latent(i) for i in rest]), rest)  # (n - 1, C)
    return float((forgot.M - fresh.M).abs().max())


def unknown_request(req: EditRequest, word: str = UNKNOWN) -> EditRequest:
    """The request writing "prompt(subject) unknown" in place of a fact."""
    return EditRequest(prompt=req.prompt, subject=req.subject, target_new=word, target_true=req.target_true,
                       case_id=req.case_id)


def _recall(lm: Any, recs: Sequence[EditRequest], batch_size: int, with_em: bool,
            editor: Editor | None = None) -> tuple[list[bool], list[float]]:
    ed = editor if editor is not None else LarimarEditor(lm)
    ok, _ = rewrite_success(ed, [r.full_prompt for r in recs], [r.target_new for r in recs],
                            [r.target_true or "" for r in recs], batch_size)
    em: list[float] = []
    if with_em:
        prompts, targets = [r.full_prompt for r in recs], [r.target_new for r in recs]
        n_tok = [len(t) for t in target_tokens(ed, prompts, targets, batch_size)]
        em, _ = exact_match(ed, prompts, targets, n_tok, batch_size)
    return ok, em


def evaluate_forgetting(
    lm: Any,
    records: Sequence[EditRequest],
    n: int,
    trials: int = 10,
    replace_unknown: bool = False,
    retained_sample: int | None = 200,
    seed: int = 0,
    batch_size: int = 32,
    with_em: bool = True,
    rag: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Writes N facts (one batch), then per trial forgets one (alpha = -1), optionally writes "prompt unknown" in
    its place, measures, and restores the memory (the fact re-written; exact up to rounding).

    Recall is ES-style (``*_recall``: NLL(target_new) < NLL(target_true) after the rewrite prompt) and greedy exact
    match (``*_em``). ``forgotten_recall_none`` is the unedited model's ES-style recall of the forgotten facts,
    ``recall_before`` the recall of the same facts before forgetting them. ``forget_max_abs_error`` is
    `forget_exactness` of the first forgotten fact.

    Args:
        lm: the `Larimar` editor (its memory is reset).
        records: CounterFact records with target_true; the first N are written.
        n: N, facts in memory.
        trials: facts forgotten, one at a time (distinct, seeded).
        replace_unknown: write "prompt(subject) unknown" after forgetting.
        retained_sample: retained facts measured per trial (None: all N - 1).
        seed: choice of the forgotten / retained facts.
        batch_size: prompts per forward.
        with_em: also measure greedy exact match.
        rag: also run `RagEditor` (the same facts in its index; forgetting removes the sentence from it) and
            report its ``*_rag`` values.

    Returns:
        (summary row, per-trial rows).
    """
    records = [r for r in records if r.target_true]
    if n < 2 or n > len(records):
        raise ValueError(f"n must be in [2, {len(records)}] (records with target_true), got {n}")
    facts = records[:n]
    ids = [f"f{i}" for i in range(n)]
    lm.reset()
    lm.edit(facts, ids=ids)
    rag_ed = RagEditor(lm) if rag else None
    if rag_ed is not None:
        rag_ed.edit(facts, ids=ids)
    rng = random.Random(seed)
    chosen = rng.sample(range(n), min(trials, n))
    error = forget_exactness(lm.memory, ids[chosen[0]])
    before, _ = _recall(lm, [facts[i] for i in chosen], batch_size, False)
    none_ok, _ = rewrite_success(NoEditEditor(lm.model), [facts[i].full_prompt for i in chosen],
                                 [facts[i].target_new for i in chosen], [facts[i].target_true or "" for i in chosen],
                                 batch_size)
    trial_rows = []
    for t, i in enumerate(chosen):
        lm.forget([ids[i]])
        if replace_unknown:
            lm.edit([unknown_request(facts[i])], ids=[f"u{t}"])
        others = [j for j in range(n) if j != i]
        if retained_sample is not None and len(others) > retained_sample:
            others = sorted(rng.sample(others, retained_sample))
        f_ok, f_em = _recall(lm, [facts[i]], batch_size, with_em)
        r_ok, r_em = _recall(lm, [facts[j] for j in others], batch_size, with_em)
        row = {"n": n, "trial": t, "case_id": facts[i].case_id, "fact": facts[i].sentence,
               "forgotten_recall": float(f_ok[0]), "forgotten_em": mean_of(f_em),
               "retained_recall": mean_of(r_ok), "retained_em": mean_of(r_em), "n_retained_measured":
               len(others), "recall_before": float(before[t]), "recall_none": float(none_ok[t])}
        if rag_ed is not None:
            rag_ed.forget([ids[i]])
            if replace_unknown:
                rag_ed.edit([unknown_request(facts[i])], ids=[f"u{t}"])
            f_ok, f_em = _recall(lm, [facts[i]], batch_size, with_em, rag_ed)
            r_ok, r_em = _recall(lm, [facts[j] for j in others], batch_size, with_em, rag_ed)
            row.update(forgotten_recall_rag=float(f_ok[0]), forgotten_em_rag=mean_of(f_em),
                       retained_recall_rag=mean_of(r_ok), retained_em_rag=mean_of(r_em))
            if replace_unknown:
                rag_ed.forget([f"u{t}"])
            rag_ed.edit([facts[i]], ids=[ids[i]])
        trial_rows.append(row)
        if replace_unknown:
            lm.forget([f"u{t}"])
        lm.edit([facts[i]], ids=[ids[i]])
    lm.reset()
    summary = {"n": n, "slots": lm.model.memory.config.num_slots, "trials": len(chosen),
               "replace_unknown": replace_unknown}
    for key in ("forgotten_recall", "forgotten_em", "retained_recall", "retained_em", "recall_before"):
        summary[key] = mean_of(r[key] for r in trial_rows)
    for key in ("forgotten_recall_rag", "forgotten_em_rag", "retained_recall_rag", "retained_em_rag"):
        summary[key] = mean_of(r.get(key) for r in trial_rows)
    summary["forgotten_recall_none"] = mean_of(r["recall_none"] for r in trial_rows)
    summary["forget_max_abs_error"] = error
    return summary, trial_rows
