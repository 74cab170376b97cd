"""Sequential editing (paper section 5.3): ZsRE facts written one after another into one memory (K slots).

Edit retention (teacher-forced token accuracy and greedy exact match on every edited prompt), held-out rephrase
accuracy and locality, at checkpoints and after the last edit; GRACE / MEMIT curves through `SequentialHFEditor`
(``apply_method(..., sequential=True)``). Rates are in [0, 1].
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

from larimar.eval.editors import Editor
from larimar.eval.metrics import (
    agreement,
    exact_match,
    mean_of,
    target_tokens,
    token_accuracy,
)
from larimar.facts import EditRequest

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINTS = (10, 50, 100, 250, 500, 1000)


def _locality_items(records: Sequence[EditRequest]) -> list[tuple[int, str, str]]:
    """(record index, prompt, answer) of every locality prompt with an answer."""
    return [(r, p, a) for r, req in enumerate(records)
            for p, a in zip(req.neighborhood_prompts, req.neighborhood_answers)]


def _sequential_point(editor: Editor, records: Sequence[EditRequest], loc: list[tuple[int, str, str]],
                      loc_ref: list[list[int]], batch_size: int, with_em: bool) -> tuple[dict[str, Any], list[dict]]:
    """Metrics on ``records`` (the edits so far) with the editor as it is; per-record rows too."""
    prompts = [r.full_prompt for r in records]
    targets = [r.target_new for r in records]
    acc, _ = token_accuracy(editor, prompts, targets, batch_size)
    em: list[float | None] = [None] * len(records)
    gens: list[str | None] = [None] * len(records)
    if with_em:
        n_tok = [len(t) for t in target_tokens(editor, prompts, targets, batch_size)]
        em, gens = exact_match(editor, prompts, targets, n_tok, batch_size)  # type: ignore[assignment]
    para = [(i, p) for i, r in enumerate(records) for p in r.paraphrase_prompts]
    para_acc, _ = token_accuracy(editor, [p for _, p in para], [records[i].target_new for i, _ in para], batch_size)
    loc_acc: list[float] = []
    if loc:
        _, pred = token_accuracy(editor, [p for _, p, _ in loc], [a for _, _, a in loc], batch_size)
        loc_acc = agreement(pred, loc_ref)
    point = {"n_edits": len(records), "edit_retention": mean_of(acc), "edit_retention_em": mean_of(em),
             "rephrase_acc": mean_of(para_acc), "locality": mean_of(loc_acc)}
    rows = []
    for i, r in enumerate(records):
        rows.append({"case_id": r.case_id, "prompt": prompts[i], "target_new": r.target_new, "acc": acc[i],
                     "exact_match": em[i], "generation": gens[i],
                     "rephrase_acc": mean_of(a for (j, _), a in zip(para, para_acc) if j == i),
                     "locality": mean_of(a for (j, _, _), a in zip(loc, loc_acc) if j == i)})
    return point, rows


def evaluate_sequential(
    editor: Editor,
    records: Sequence[EditRequest],
    checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS,
    batch_size: int = 32,
    exact_match_at_checkpoints: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Writes ``records`` one after another (one ``editor.edit([req])`` each) and measures what is retained.

    At each checkpoint n (and after the last edit) the metrics are taken on the n edits so far: ``edit_retention``
    (teacher-forced token accuracy of target_new after the rewrite prompt), ``edit_retention_em`` (greedy
    generation starts with target_new; after the last edit, and at checkpoints with ``exact_match_at_checkpoints``),
    ``rephrase_acc`` (token accuracy on the held-out rephrasings) and ``locality`` (agreement of the argmax tokens on
    the ``loc`` prompts + answers with the unedited editor's). The ``*_none`` values are the same metrics of the
    unedited editor (before the first edit) on all records (locality_none = 1 by construction).

    Args:
        editor: the method (reset first and at the end).
        records: ZsRE records (``target_new``, paraphrases, ``loc`` / ``loc_ans`` as neighbourhood).
        checkpoints: numbers of edits to evaluate at (those above ``len(records)`` are dropped).
        batch_size: prompts per forward.
        exact_match_at_checkpoints: also generate at every checkpoint (slower).
        progress: show a progress bar.

    Returns:
        a summary with the final metrics, ``n_edits``, ``evaluated_after``, ``curve`` (one point per checkpoint),
        ``edit_ms_median`` and the per-record rows of the final evaluation under ``cases``.
    """
    from tqdm.auto import tqdm

    records = list(records)
    if not records:
        raise ValueError("no records to edit")
    n = len(records)
    marks = sorted({c for c in checkpoints if 0 < c < n} | {n})
    loc = _locality_items(records)
    editor.reset()
    try:
        ref_pred: list[list[int]] = []
        if loc:
            _, ref_pred = token_accuracy(editor, [p for _, p, _ in loc], [a for _, _, a in loc], batch_size)
        none, _ = _sequential_point(editor, records, loc, ref_pred, batch_size, True)
        curve, edit_ms, rows = [], [], []
        done = 0
        bar = tqdm(total=n, desc=f"{editor.name} sequential", disable=not progress, unit="edit")
        for mark in marks:
            while done < mark:
                t0 = time.perf_counter()
                editor.edit([records[done]])
                edit_ms.append(1000.0 * (time.perf_counter() - t0))
                done += 1
                bar.update(1)
            k = sum(1 for r, _, _ in loc if r < mark)
            point, rows = _sequential_point(editor, records[:mark], loc[:k], ref_pred[:k], batch_size,
                                            exact_match_at_checkpoints or mark == n)
            curve.append(point)
            logger.info("%s after %d edits: %s", editor.name, mark, point)
        bar.close()
    finally:
        editor.reset()
    final = curve[-1]
    out = {"method": editor.name, "protocol": "token_acc", **final, "evaluated_after": f"the last edit ({n})",
           **{f"{k}_none": none[k] for k in ("edit_retention", "edit_retention_em", "rephrase_acc", "locality")},
           "edit_ms_median": statistics.median(edit_ms), "curve": curve,
           "cases": [{"method": editor.name, **r} for r in rows]}
    return out
