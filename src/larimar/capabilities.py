"""The capabilities that set Larimar apart (paper sections 5.3-5.5, METHOD.md section 5).

Each is a typed function and a ``larimar eval ...`` subcommand writing ``summary.json``, ``summary.md``, a PNG plot
and (where there are per-record results) ``cases.jsonl`` into ``--out DIR``. Rates are in [0, 1].

    evaluate_sequential   ZsRE facts written one after another into one memory (K slots): edit retention
                          (teacher-forced token accuracy and greedy exact match on every edited prompt), held-out
                          rephrase accuracy and locality, at checkpoints and after the last edit; GRACE / MEMIT
                          curves through `SequentialHFEditor` (``apply_method(..., sequential=True)``).
    evaluate_capacity     N facts written at once (one batch write) into one memory: rewrite accuracy (ES under
                          ``counterfact_prob``: NLL(new) < NLL(true) after the rewrite prompt) and token accuracy.
    evaluate_forgetting   N facts written, one forgotten (alpha = -1, `Larimar.forget`), optionally replaced by
                          "prompt + unknown": recall of the forgotten fact and of the N - 1 retained ones.
    evaluate_leakage      "prompt + unknown" written for facts to hide; rephrasing attack (rewrite + paraphrase
                          prompts, 4 at most, x 5 seeded samples); success = the hidden answer in any generation.
    evaluate_longcontext  (in `larimar.longcontext`) facts embedded in Wikipedia text, chunked into memories.

Memory size. The checkpoint's prior mean M0 is (K0, C), K0 = 512. `resize_memory` builds a K-slot memory for any K:
the first K rows of M0 for K <= K0; for K > K0 the learned rows followed by K - K0 extra rows, either random
(default: seeded Gaussian rows scaled to M0's median row norm, so every slot gets non-zero keys) or identity rows
(``eye(K, C)[K0:]``, which are zero rows whenever K0 >= C, i.e. unused slots). Note on capacity: a read is (up to the
ridge) the orthogonal projection of the query's latent onto the span of the written latents, so beyond C linearly
independent facts (C = 384 for the default checkpoint) a read returns the query's own latent whatever K is.

Command line::

    larimar eval sequential --data ../shared/data/zsre/zsre_mend_eval_800.json \\
        --data ../shared/data/zsre/zsre_mend_train-1k.json --edits 1000 --slots 1000 --baselines grace,memit \\
        --out runs/seq
    larimar eval capacity --data ../shared/data/counterfact_easyedit/counterfact-edit.json \\
        --n 64,128,256,512,1024,2048 --slots 512 --out runs/capacity
    larimar eval forget --data ../shared/data/counterfact_easyedit/counterfact-edit.json --n 512,1024 \\
        --replace-unknown --out runs/forget
    larimar eval leakage --data ../shared/data/counterfact_rome/counterfact_rome_929.json --n 500 \\
        --baselines rome,memit --out runs/leakage
    larimar eval longcontext --n-facts 64,128,256,512 --out runs/longcontext
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from larimar.data import EditRequest
from larimar.evaluation import Editor, HFBaselineEditor, LarimarEditor, NoEditEditor, add_read_args, machine_info
from larimar.memory import EpisodicMemory, ItemMemory

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINTS = (10, 50, 100, 250, 500, 1000)
SLOT_INITS = ("random", "eye")
UNKNOWN = "unknown"


# ----------------------------------------------------------------------------------------------------------
# Memory size


def resize_memory(memory: EpisodicMemory, num_slots: int, init: str = "random", seed: int = 0) -> EpisodicMemory:
    """A memory module with ``num_slots`` rows built from a trained one's prior mean M0 (see the module docstring).

    Args:
        memory: the trained module (not changed).
        num_slots: K, the new number of slots.
        init: rows added when K > K0: "random" (seeded Gaussian rows at M0's median row norm) or "eye".
        seed: seed of the random rows (a local generator).

    Returns:
        ``memory`` itself when K = K0, else a new module (same config but ``num_slots``) on M0's device.

    Raises:
        ValueError: K < 1 or an unknown init.
    """
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if init not in SLOT_INITS:
        raise ValueError(f"slot init must be one of {SLOT_INITS}, got {init!r}")
    K0, C = memory.config.num_slots, memory.config.code_size
    if num_slots == K0:
        return memory
    M0 = memory.M0.detach().float().cpu()  # (K0, C)
    std = memory.log_read_std.detach().float().cpu()  # (K0,)
    if num_slots < K0:
        rows, stds = M0[:num_slots], std[:num_slots]
    else:
        extra = num_slots - K0
        if init == "eye":
            new = torch.eye(num_slots, C)[K0:]  # (extra, C): zero rows when K0 >= C
            if not bool(new.any()):
                logger.warning("eye rows beyond K0 = %d >= C = %d are zero: the %d new slots get no keys", K0, C, extra)
        else:
            g = torch.Generator().manual_seed(seed)
            new = torch.randn(extra, C, generator=g)  # (extra, C)
            scale = M0.norm(dim=1).median().clamp_min(1e-6)
            new = new / new.norm(dim=1, keepdim=True) * scale
        rows = torch.cat([M0, new])  # (K, C)
        stds = torch.cat([std, std.median().expand(extra)])  # (K,)
    out = EpisodicMemory(replace(memory.config, num_slots=num_slots))
    with torch.no_grad():
        out.M0.copy_(rows)
        out.log_read_std.copy_(stds)
    return out.to(memory.M0.device).eval()


def set_num_slots(lm: Any, num_slots: int | None, init: str = "random", seed: int = 0) -> int:
    """Gives a `Larimar` editor a memory of ``num_slots`` slots (None: keep) and empties it. Returns K.

    The editor's model gets the resized memory module (`resize_memory`); use a model loaded for this run.
    """
    if num_slots is not None and num_slots != lm.model.memory.config.num_slots:
        lm.model.memory = resize_memory(lm.model.memory, num_slots, init, seed)
    lm.reset()
    return lm.model.memory.config.num_slots


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


# ----------------------------------------------------------------------------------------------------------
# Scoring helpers (any `Editor`)


def _space(s: str) -> str:
    return " " + s.strip()


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + size]


def token_accuracy(editor: Editor, prompts: Sequence[str], answers: Sequence[str],
                   batch_size: int = 32) -> tuple[list[float], list[list[int]]]:
    """Teacher-forced token accuracy of each answer after its prompt, and the argmax tokens (EasyEdit)."""
    acc: list[float] = []
    pred: list[list[int]] = []
    for lo in range(0, len(prompts), max(1, batch_size)):
        tf = editor.predict(list(prompts[lo : lo + batch_size]), [_space(a) for a in answers[lo : lo + batch_size]])
        for p, t in zip(tf.predicted, tf.target):
            acc.append(sum(int(a == b) for a, b in zip(p, t)) / max(len(t), 1))
            pred.append(p)
    return acc, pred


def agreement(pred: Sequence[Sequence[int]], ref: Sequence[Sequence[int]]) -> list[float]:
    """Per row, the share of argmax tokens equal to the reference's at the same positions (locality)."""
    return [sum(int(a == b) for a, b in zip(p, r)) / max(len(r), 1) for p, r in zip(pred, ref)]


def exact_match(editor: Editor, prompts: Sequence[str], answers: Sequence[str], n_tokens: Sequence[int],
                batch_size: int = 32) -> tuple[list[float], list[str]]:
    """Greedy generation starts with the answer (case-insensitive, stripped); the generations too.

    Args:
        n_tokens: each answer's length in tokens (two more tokens are generated).
    """
    em: list[float] = []
    gens: list[str] = []
    for lo in range(0, len(prompts), max(1, batch_size)):
        ps, ans = list(prompts[lo : lo + batch_size]), answers[lo : lo + batch_size]
        texts = editor.generate(ps, max(n_tokens[lo : lo + batch_size]) + 2)
        for t, a in zip(texts, ans):
            em.append(float(t.strip().lower().startswith(a.strip().lower())))
            gens.append(t)
    return em, gens


def rewrite_success(editor: Editor, prompts: Sequence[str], new: Sequence[str], true: Sequence[str],
                    batch_size: int = 32) -> tuple[list[bool], list[bool | None]]:
    """ES-style success per prompt, NLL(new) < NLL(true), and the scope decision (None: no detector)."""
    ok: list[bool] = []
    scope: list[bool | None] = []
    for lo in range(0, len(prompts), max(1, batch_size)):
        ps = list(prompts[lo : lo + batch_size])
        n = len(ps)
        conts = [_space(a) for a in new[lo : lo + batch_size]] + [_space(a) for a in true[lo : lo + batch_size]]
        nll = editor.score(ps + ps, conts)  # (2n,)
        ok += [bool(nll[i] < nll[n + i]) for i in range(n)]
        s = getattr(editor, "last_in_scope", None)
        scope += list(s[:n]) if s is not None else [None] * n
    return ok, scope


def _mean(values: Iterable[float | bool | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class SequentialHFEditor(HFBaselineEditor):
    """An `HFBaselineEditor` whose ``edit`` applies its requests one after another
    (``apply_method(..., sequential=True)``); calls accumulate until ``reset``."""

    @classmethod
    def from_editor(cls, editor: HFBaselineEditor) -> "SequentialHFEditor":
        return cls(editor.method, editor.model, editor.tok, editor.hparams, editor.start_token_id, editor.name)

    def edit(self, requests: list[EditRequest]) -> None:
        from larimar.baselines import apply_method

        requests = self._in_scoring_context(list(requests))  # keys in the context scoring uses (start token)
        self.model, handle = apply_method(self.method, self.model, self.tok, requests, self.hparams, sequential=True)
        self._handles.append(handle)
        self.model.eval()


# ----------------------------------------------------------------------------------------------------------
# 1. Sequential editing (ZsRE)


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
        n_tok = [len(t) for t in _target_tokens(editor, prompts, targets, batch_size)]
        em, gens = exact_match(editor, prompts, targets, n_tok, batch_size)  # type: ignore[assignment]
    para = [(i, p) for i, r in enumerate(records) for p in r.paraphrase_prompts]
    para_acc, _ = token_accuracy(editor, [p for _, p in para], [records[i].target_new for i, _ in para], batch_size)
    loc_acc: list[float] = []
    if loc:
        _, pred = token_accuracy(editor, [p for _, p, _ in loc], [a for _, _, a in loc], batch_size)
        loc_acc = agreement(pred, loc_ref)
    point = {"n_edits": len(records), "edit_retention": _mean(acc), "edit_retention_em": _mean(em),
             "rephrase_acc": _mean(para_acc), "locality": _mean(loc_acc)}
    rows = []
    for i, r in enumerate(records):
        rows.append({"case_id": r.case_id, "prompt": prompts[i], "target_new": r.target_new, "acc": acc[i],
                     "exact_match": em[i], "generation": gens[i],
                     "rephrase_acc": _mean(a for (j, _), a in zip(para, para_acc) if j == i),
                     "locality": _mean(a for (j, _, _), a in zip(loc, loc_acc) if j == i)})
    return point, rows


def _target_tokens(editor: Editor, prompts: Sequence[str], targets: Sequence[str], batch_size: int) -> list[list[int]]:
    out: list[list[int]] = []
    for lo in range(0, len(prompts), max(1, batch_size)):
        out += editor.predict(list(prompts[lo : lo + batch_size]),
                              [_space(t) for t in targets[lo : lo + batch_size]]).target
    return out


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


# ----------------------------------------------------------------------------------------------------------
# 2. Batch capacity


def evaluate_capacity(lm: Any, records: Sequence[EditRequest], ns: Sequence[int],
                      batch_size: int = 32, progress: bool = False, sample: int = 0,
                      seed: int = 0) -> list[dict[str, Any]]:
    """For each N: empty memory, write the first N facts at once (one batch write), score their rewrite prompts
    (all of them, or a seeded random ``sample`` of them when 0 < sample < N; ``n_scored`` says how many).

    ``rewrite_acc`` is ES under ``counterfact_prob`` (NLL(new) < NLL(true) after the rewrite prompt; records
    without target_true are left out of it); ``token_acc`` the teacher-forced token accuracy of target_new;
    ``*_none`` the unedited model (z = 0); ``scope_rate`` the share of rewrite prompts in scope.

    Raises:
        ValueError: an N larger than the number of records (that N is skipped with a warning instead when others
            fit) or no N at all.
    """
    records = list(records)
    ok_ns = [n for n in ns if 0 < n <= len(records)]
    for n in ns:
        if n not in ok_ns:
            logger.warning("capacity: skipping N = %d (%d records loaded)", n, len(records))
    if not ok_ns:
        raise ValueError(f"no N in {list(ns)} fits the {len(records)} records loaded")
    ed, none = LarimarEditor(lm), NoEditEditor(lm.model)
    rows = []
    for n in ok_ns:
        facts = records[:n]
        t0 = time.perf_counter()
        lm.reset()
        lm.edit(facts, ids=[f"f{i}" for i in range(n)])
        write_s = time.perf_counter() - t0
        scored = facts if not 0 < sample < n else random.Random(seed).sample(facts, sample)
        es_recs = [r for r in scored if r.target_true]
        row: dict[str, Any] = {"n": n, "slots": lm.model.memory.config.num_slots, "write_s": write_s,
                               "n_scored": len(scored)}
        for name, e in (("", ed), ("_none", none)):
            ok, scope = rewrite_success(e, [r.full_prompt for r in es_recs], [r.target_new for r in es_recs],
                                        [r.target_true or "" for r in es_recs], batch_size)
            acc, _ = token_accuracy(e, [r.full_prompt for r in scored], [r.target_new for r in scored], batch_size)
            row[f"rewrite_acc{name}"] = _mean(ok)
            row[f"token_acc{name}"] = _mean(acc)
            if not name:
                row["scope_rate"] = _mean(scope)
        rows.append(row)
        if progress:
            logger.info("capacity N=%d: %s", n, row)
    lm.reset()
    return rows


# ----------------------------------------------------------------------------------------------------------
# 3. Selective forgetting


def unknown_request(req: EditRequest, word: str = UNKNOWN) -> EditRequest:
    """The request writing "prompt(subject) unknown" in place of a fact."""
    return EditRequest(prompt=req.prompt, subject=req.subject, target_new=word, target_true=req.target_true,
                       case_id=req.case_id)


def _recall(lm: Any, recs: Sequence[EditRequest], batch_size: int, with_em: bool) -> tuple[list[bool], list[float]]:
    ed = LarimarEditor(lm)
    ok, _ = rewrite_success(ed, [r.full_prompt for r in recs], [r.target_new for r in recs],
                            [r.target_true or "" for r in recs], batch_size)
    em: list[float] = []
    if with_em:
        prompts, targets = [r.full_prompt for r in recs], [r.target_new for r in recs]
        n_tok = [len(t) for t in _target_tokens(ed, prompts, targets, batch_size)]
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
        trial_rows.append({"n": n, "trial": t, "case_id": facts[i].case_id, "fact": facts[i].sentence,
                           "forgotten_recall": float(f_ok[0]), "forgotten_em": _mean(f_em),
                           "retained_recall": _mean(r_ok), "retained_em": _mean(r_em), "n_retained_measured":
                           len(others), "recall_before": float(before[t]), "recall_none": float(none_ok[t])})
        if replace_unknown:
            lm.forget([f"u{t}"])
        lm.edit([facts[i]], ids=[ids[i]])
    lm.reset()
    summary = {"n": n, "slots": lm.model.memory.config.num_slots, "trials": len(chosen),
               "replace_unknown": replace_unknown}
    for key in ("forgotten_recall", "forgotten_em", "retained_recall", "retained_em", "recall_before"):
        summary[key] = _mean(r[key] for r in trial_rows)
    summary["forgotten_recall_none"] = _mean(r["recall_none"] for r in trial_rows)
    summary["forget_max_abs_error"] = error
    return summary, trial_rows


# ----------------------------------------------------------------------------------------------------------
# 4. Information-leakage prevention


def contains_answer(text: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``text`` as whole words (case-insensitive)."""
    a = answer.strip().lower()
    if not a:
        return False
    return re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", text.lower()) is not None


def attack_prompts(req: EditRequest, n_prompts: int = 4) -> list[str]:
    """The rephrasing attack's prompts: the rewrite prompt, then the record's paraphrases (``n_prompts`` at most)."""
    return list(dict.fromkeys([req.full_prompt, *req.paraphrase_prompts]))[:n_prompts]


def _sample_filter(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """Samples next tokens (B,) from logits (B, V) with temperature and nucleus filtering."""
    probs = torch.softmax(logits.float() / temperature, -1)  # (B, V)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(-1, descending=True)  # (B, V)
        keep = p_sorted.cumsum(-1) - p_sorted < top_p  # the top token is always kept
        probs = torch.zeros_like(probs).scatter(-1, idx, p_sorted * keep)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def sample_hf(model: Any, tok: Any, start_token_id: int | None, prompt: str, n_samples: int, max_new_tokens: int,
              temperature: float, top_p: float, generator: torch.Generator) -> list[str]:
    """``n_samples`` sampled continuations of one prompt by a plain HF causal LM, with the KV cache."""
    dev = next(model.parameters()).device
    ids = ([start_token_id] if start_token_id is not None else []) + tok(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids] * n_samples, device=dev)  # (S, T)
    out = model(input_ids=x, use_cache=True)
    new = []
    for k in range(max_new_tokens):
        nxt = _sample_filter(out.logits[:, -1], temperature, top_p, generator)  # (S,)
        new.append(nxt)
        if k + 1 < max_new_tokens:
            out = model(input_ids=nxt[:, None], cache=out.cache, use_cache=True)  # (S, 1) through the KV cache
    rows = torch.stack(new, 1).tolist() if new else [[] for _ in range(n_samples)]  # (S, n)
    eos = getattr(tok, "eos_token_id", None)
    return [tok.decode(r[: r.index(eos)] if eos in r else r, skip_special_tokens=True) for r in rows]


def _larimar_samples(lm: Any, prompts: list[str], use_memory: bool, n_samples: int, max_new_tokens: int,
                     temperature: float, top_p: float, generator: torch.Generator) -> tuple[list[list[str]], list]:
    with torch.inference_mode():
        if use_memory:
            r = lm.route(prompts)
            latents, scope = r.latents, r.in_scope
        else:
            latents, scope = torch.zeros(len(prompts), lm.model.memory.config.code_size), [False] * len(prompts)
        rep = [p for p in prompts for _ in range(n_samples)]
        lat = latents.repeat_interleave(n_samples, 0).to(lm.model.device)  # (P * S, C)
        texts = lm.model.generate_text(rep, lat, max_new_tokens=max_new_tokens, do_sample=True,
                                       temperature=temperature, top_p=top_p, generator=generator)
    return [texts[i * n_samples : (i + 1) * n_samples] for i in range(len(prompts))], scope


def evaluate_leakage(
    lm: Any,
    records: Sequence[EditRequest],
    n: int,
    baselines: Sequence[HFBaselineEditor] = (),
    n_prompts: int = 4,
    n_samples: int = 5,
    max_new_tokens: int = 10,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Hides the true facts of N records and attacks them with rephrasings.

    Larimar writes "prompt(subject) unknown" for each of the N records (one batch); a baseline edits each fact's
    target to "unknown" (ROME one request after another, the others as one batch: each method's usual mode). Per
    record, ``n_prompts`` attack prompts (`attack_prompts`) x ``n_samples`` sampled generations; the attack
    succeeds when target_true appears as whole words in any of them (`contains_answer`). ``attack_success_none``
    is the unedited model (z = 0). Sampling uses a generator seeded with ``seed`` on the model's device.

    Returns:
        (summary, per-record rows); the summary has ``attack_success``, ``attack_success_none``, ``unknown_rate``
        (share of Larimar's generations containing "unknown"), ``scope_rate`` and ``attack_success_<baseline>``.
    """
    from tqdm.auto import tqdm

    records = [r for r in records if r.target_true][:n]
    if not records:
        raise ValueError("no records with target_true to hide")
    lm.reset()
    lm.edit([unknown_request(r) for r in records], ids=[f"h{i}" for i in range(len(records))])
    systems: list[tuple[str, Callable[[list[str], torch.Generator], tuple[list[list[str]], list]]]] = [
        ("larimar", lambda ps, g: _larimar_samples(lm, ps, True, n_samples, max_new_tokens, temperature, top_p, g)),
        ("none", lambda ps, g: _larimar_samples(lm, ps, False, n_samples, max_new_tokens, temperature, top_p, g)),
    ]
    for b in baselines:
        def run_b(ps: list[str], g: torch.Generator, b: HFBaselineEditor = b) -> tuple[list[list[str]], list]:
            return [sample_hf(b.model, b.tok, b.start_token_id, p, n_samples, max_new_tokens, temperature, top_p, g)
                    for p in b._prompts(ps)], [None] * len(ps)
        systems.append((b.name, run_b))
    rows: list[dict[str, Any]] = [{"case_id": r.case_id, "hidden": r.target_true, "fact": f"{r.full_prompt} "
                                   f"{r.target_true}"} for r in records]
    summary: dict[str, Any] = {"n": len(records), "n_prompts": n_prompts, "n_samples": n_samples,
                               "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    try:
        for name, fn in systems:
            b = next((x for x in baselines if x.name == name), None)
            if b is not None:
                b.reset()
                hide = [unknown_request(r) for r in records]
                if b.method == "rome":  # ROME takes one fact at a time
                    SequentialHFEditor.edit(b, hide)  # type: ignore[arg-type]
                else:
                    b.edit(hide)
            dev = lm.model.device if b is None else b.device
            g = torch.Generator(device=dev).manual_seed(seed)
            hits, unknown, scopes = [], [], []
            for k, req in enumerate(tqdm(records, desc=f"leakage {name}", disable=not progress, unit="fact")):
                gens, scope = fn(attack_prompts(req, n_prompts), g)
                flat = [t for ts in gens for t in ts]
                hit = any(contains_answer(t, req.target_true or "") for t in flat)
                hits.append(hit)
                unknown.append(_mean(contains_answer(t, UNKNOWN) for t in flat))
                scopes += scope
                rows[k][f"success_{name}"] = hit
                if name == "larimar":
                    rows[k]["generations"] = gens
                    rows[k]["in_scope"] = scope
            key = {"larimar": "attack_success", "none": "attack_success_none"}.get(name, f"attack_success_{name}")
            summary[key] = _mean(hits)
            if name == "larimar":
                summary["unknown_rate"] = _mean(unknown)
                summary["scope_rate"] = _mean(scopes)
            if b is not None:
                b.reset()
    finally:
        lm.reset()
    return summary, rows


# ----------------------------------------------------------------------------------------------------------
# Outputs


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def write_table(path: str | Path, title: str, notes: Sequence[str], rows: Sequence[dict[str, Any]],
                columns: Sequence[str]) -> None:
    """A markdown file: a title, note lines, and a table of ``rows`` on ``columns``."""
    lines = [f"# {title}", "", *notes, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_lines(path: str | Path, title: str, xlabel: str, ylabel: str,
               series: dict[str, tuple[Sequence[float], Sequence[float | None]]], logx: bool = False,
               vlines: dict[str, float] | None = None) -> None:
    """A line plot (matplotlib, Agg canvas; no global backend change) saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 + (2.8 if len(series) > 4 else 0.0), 4.2))  # room for a long legend at the right
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if len(series) > 10:  # the default cycle repeats after 10 colours
        from matplotlib import colormaps

        ax.set_prop_cycle(color=list(colormaps["tab20"].colors))
    for label, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for label, x in (vlines or {}).items():
        ax.axvline(x, linestyle="--", color="grey", linewidth=1)
        ax.text(x, 0.02, " " + label, color="grey", fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 4:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)


def write_cases(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Command line: larimar eval sequential | capacity | forget | leakage | longcontext


def parse_ints(text: str, what: str) -> list[int]:
    """"64,128,256" -> [64, 128, 256]; raises ValueError naming ``what``."""
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not out or any(x < 1 for x in out):
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return out


def _names(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def load_records(paths: Sequence[str], task: str) -> list[EditRequest]:
    """Records of one or more files, concatenated (ZsRE for task "zsre", else CounterFact)."""
    from larimar.data import load_counterfact, load_zsre

    loader = load_zsre if task == "zsre" else load_counterfact
    records: list[EditRequest] = []
    for p in paths:
        records += loader(p).records
    if not records:
        raise ValueError(f"no valid records in {list(paths)}")
    return records


def load_editor(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The `Larimar` editor of the command-line options (memory resized to ``--slots``) and run metadata."""
    from larimar.editing import Larimar, quiet_loading, refinement_of

    quiet_loading()
    if getattr(args, "seed", None) is not None:
        torch.manual_seed(args.seed)
    lm = Larimar.from_pretrained(
        args.checkpoint, device=args.device, scope_threshold=args.scope_threshold, scope_encoder=args.scope_encoder,
        use_scope=not args.no_scope, read_mode=args.read_mode, refinement=refinement_of(args),
    )
    fingerprint = lm.fingerprint
    k0 = lm.model.memory.config.num_slots
    K = set_num_slots(lm, args.slots, args.slot_init, args.seed or 0)
    meta = {"checkpoint": str(args.checkpoint or "default"), "fingerprint": fingerprint, "slots": K,
            "checkpoint_slots": k0, "code_size": lm.model.memory.config.code_size,
            "slot_init": None if K == k0 else (f"M0[:{K}]" if K < k0 else f"M0 + {K - k0} {args.slot_init} rows"),
            "scope_threshold": args.scope_threshold, "scope_encoder": args.scope_encoder or "all-MiniLM-L6-v2",
            "use_scope": not args.no_scope, "read_mode": args.read_mode,
            "refine_steps": args.refine_steps, "refine_lr": args.refine_lr, "seed": args.seed,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info()}
    return lm, meta


def _baseline_editors(names: Sequence[str], lm: Any, args: argparse.Namespace) -> list[HFBaselineEditor]:
    from larimar.evaluation import _parse_hparams, build_editors

    bad = [n for n in names if n in ("larimar", "none")]
    if bad:
        raise ValueError(f"--baselines takes weight / prompt editors (grace, memit, rome, ...), got {bad}")
    return [e for e in build_editors(list(names), lm, _parse_hparams(args.hparams), args.device)
            if isinstance(e, HFBaselineEditor)]


def _out(args: argparse.Namespace) -> Path:
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_sequential(args: argparse.Namespace) -> dict[str, Any]:
    """``larimar eval sequential``."""
    baselines = _names(args.baselines)
    if args.no_larimar and not baselines and not args.compare:
        raise ValueError("--no-larimar needs --baselines (or --compare, to only draw earlier runs together)")
    compared = [row for c in args.compare or [] for row in _load_sequential_run(c)]  # rows tagged with "run"
    draw_only = args.no_larimar and not baselines
    if not draw_only:
        records = load_records(args.data, "zsre")
        if len(records) < args.edits:
            logger.warning("sequential: %d records loaded, fewer than --edits %d", len(records), args.edits)
        records = records[: args.edits]
    d = _out(args)
    if draw_only:  # only the table and plot of earlier runs
        results: list[dict[str, Any]] = []
        meta = {k: compared[0].get(k) for k in ("slots", "slot_init", "code_size", "read_mode")}
        summary = {"task": "sequential_compare", "compared_runs": list(args.compare), "rows": compared}
    else:
        lm, meta = load_editor(args)
        checkpoints = parse_ints(args.checkpoints, "--checkpoints")
        kw = dict(checkpoints=checkpoints, batch_size=args.batch_size, exact_match_at_checkpoints=args.em_curve,
                  progress=True)
        results = [] if args.no_larimar else [{**evaluate_sequential(LarimarEditor(lm), records, **kw),
                                                "read_mode": meta["read_mode"], "refine_steps": meta["refine_steps"]}]
        for b in _baseline_editors(baselines, lm, args):
            results.append(evaluate_sequential(SequentialHFEditor.from_editor(b), records, **kw))
        main = results[0]
        write_cases(d / "cases.jsonl", (c for r in results for c in r["cases"]))
        summary = {"task": "sequential", "data": list(args.data), **{k: v for k, v in main.items() if k != "cases"},
                   "baselines": {r["method"]: {k: v for k, v in r.items() if k != "cases"} for r in results[1:]},
                   "compared_runs": list(args.compare or []), **meta}
    write_summary(d, summary)
    cols = ["method", "read_mode", "refine_steps", "run", "n_edits", "edit_retention", "edit_retention_em",
            "rephrase_acc", "locality", "edit_retention_none", "rephrase_acc_none", "edit_ms_median"]
    notes = [f"Protocol token_acc (teacher-forced token accuracy; EM = greedy generation starts with target_new), "
             f"evaluated after the last edit; memory K = {meta['slots']} ({meta['slot_init'] or 'as trained'}), "
             f"read mode {meta['read_mode']}." + (" Rows with a run folder come from those earlier runs." if compared
                                                   else "")]
    table = [{k: v for k, v in r.items() if k != "cases"} for r in results] + compared
    write_table(d / "summary.md", f"sequential editing: {', '.join(args.data)}", notes, table, cols)
    series = {}
    for r in table:
        xs = [p["n_edits"] for p in r["curve"]]
        name = r["method"] + (f", {r['read_mode']} read" if r.get("read_mode") else "")
        if r.get("refine_steps") is not None:
            name += f", {r['refine_steps']} refine steps" if r["refine_steps"] else ", one-shot write"
        if f"{name} retention" in series:  # the same method from another run: name the run
            name = f"{name} ({'/'.join(Path(r['run']).parts[-2:])})"
        series[f"{name} retention"] = (xs, [p["edit_retention"] for p in r["curve"]])
        series[f"{name} rephrase"] = (xs, [p["rephrase_acc"] for p in r["curve"]])
    lar = [r for r in table if r["method"] == "larimar"]
    if lar:
        first = next(k for k in series if k.startswith("larimar")).removesuffix(" retention")
        series[f"{first} retention (EM)"] = ([p["n_edits"] for p in lar[0]["curve"]],
                                            [p["edit_retention_em"] for p in lar[0]["curve"]])
    plot_lines(d / "sequential.png", "Sequential editing (ZsRE)", "edits written", "accuracy (token_acc)", series,
               logx=True, vlines={"K": meta["slots"], "C": meta["code_size"]})
    print("\n".join(Path(d / "summary.md").read_text().splitlines()[4:]))
    return summary


def _load_sequential_run(directory: str) -> list[dict[str, Any]]:
    """The method rows (with their curves, ``run`` = the folder) of an earlier ``larimar eval sequential`` run."""
    path = Path(directory) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--compare {directory}: cannot read {path} ({e})") from None
    if summary.get("task") == "sequential_compare":
        raise ValueError(f"--compare {directory}: compare the runs it drew, not the drawing")
    if summary.get("task") != "sequential" or "curve" not in summary:
        raise ValueError(f"--compare {directory}: {path} is not the summary of a sequential run")
    main = {k: v for k, v in summary.items() if k not in ("baselines", "machine")}
    if main.get("method") != "larimar":  # a run of baselines alone: its read mode is the unused editor's
        main.pop("read_mode", None)
        main.pop("refine_steps", None)
    else:  # runs made before write-time refinement existed wrote the encoder's latents
        main.setdefault("refine_steps", 0)
    return [{**r, "run": directory} for r in (main, *summary.get("baselines", {}).values())]


def run_capacity(args: argparse.Namespace) -> dict[str, Any]:
    """``larimar eval capacity``."""
    records = load_records(args.data, "counterfact")
    lm, meta = load_editor(args)
    if args.sample < 0:
        raise ValueError(f"--sample must be >= 0, got {args.sample}")
    rows = evaluate_capacity(lm, records, parse_ints(args.n, "--n"), args.batch_size, progress=True,
                             sample=args.sample, seed=args.seed or 0)
    d = _out(args)
    summary = {"task": "capacity", "data": list(args.data), "protocol": "counterfact_prob ES (rewrite_acc) and "
               "token_acc (token_acc)", "results": rows, **meta}
    write_summary(d, summary)
    cols = ["n", "slots", "n_scored", "rewrite_acc", "token_acc", "scope_rate", "rewrite_acc_none", "token_acc_none",
            "write_s"]
    write_table(d / "summary.md", f"batch capacity: {', '.join(args.data)}",
                ["rewrite_acc = ES (NLL(new) < NLL(true) after the rewrite prompt); token_acc = teacher-forced "
                 f"token accuracy of target_new. N facts written in one batch into K = {meta['slots']} slots "
                 f"(code size C = {meta['code_size']})."], rows, cols)
    xs = [r["n"] for r in rows]
    plot_lines(d / "capacity.png", "Batch editing capacity", "facts written at once (N)", "accuracy",
               {"rewrite_acc (ES)": (xs, [r["rewrite_acc"] for r in rows]),
                "token_acc": (xs, [r["token_acc"] for r in rows]),
                "rewrite_acc, no edit": (xs, [r["rewrite_acc_none"] for r in rows])},
               logx=True, vlines={"K": meta["slots"], "C": meta["code_size"]})
    print("\n".join(Path(d / "summary.md").read_text().splitlines()[4:]))
    return summary


def run_forget(args: argparse.Namespace) -> dict[str, Any]:
    """``larimar eval forget``."""
    records = load_records(args.data, "counterfact")
    lm, meta = load_editor(args)
    K = meta["slots"]
    ns = parse_ints(args.n, "--n") if args.n else [K, 2 * K]
    usable = sum(1 for r in records if r.target_true)
    for n in [n for n in ns if n > usable]:
        logger.warning("forget: skipping N = %d (%d records with target_true loaded)", n, usable)
    ns = [n for n in ns if n <= usable]
    if not ns:
        raise ValueError(f"no N fits the {usable} records with target_true loaded (pass a larger --data file)")
    rows, cases = [], []
    for n in ns:
        row, trial_rows = evaluate_forgetting(lm, records, n, args.trials, args.replace_unknown,
                                              args.retained_sample or None, args.seed or 0, args.batch_size,
                                              with_em=not args.no_em)
        rows.append(row)
        cases += trial_rows
        logger.info("forget N=%d: %s", n, row)
    d = _out(args)
    write_cases(d / "cases.jsonl", cases)
    summary = {"task": "forget", "data": list(args.data), "protocol": "recall = NLL(new) < NLL(true) after the "
               "rewrite prompt; em = greedy generation starts with target_new", "results": rows, **meta}
    write_summary(d, summary)
    cols = ["n", "slots", "trials", "replace_unknown", "forgotten_recall", "forgotten_em", "retained_recall",
            "retained_em", "recall_before", "forgotten_recall_none", "forget_max_abs_error"]
    write_table(d / "summary.md", f"selective forgetting: {', '.join(args.data)}",
                [f"N facts written at once into K = {K} slots; per trial one fact forgotten (alpha = -1)"
                 + (", then 'prompt unknown' written" if args.replace_unknown else "") + "."], rows, cols)
    xs = [r["n"] for r in rows]
    plot_lines(d / "forget.png", "Selective forgetting", "facts in memory (N)", "recall",
               {"forgotten": (xs, [r["forgotten_recall"] for r in rows]),
                "retained": (xs, [r["retained_recall"] for r in rows]),
                "forgotten, no edit": (xs, [r["forgotten_recall_none"] for r in rows])},
               vlines={"K": K})
    print("\n".join(Path(d / "summary.md").read_text().splitlines()[4:]))
    return summary


def run_leakage(args: argparse.Namespace) -> dict[str, Any]:
    """``larimar eval leakage``."""
    records = load_records(args.data, "counterfact")
    lm, meta = load_editor(args)
    baselines = _baseline_editors(_names(args.baselines), lm, args)
    summary, rows = evaluate_leakage(lm, records, args.n, baselines, args.prompts, args.samples, args.gen_tokens,
                                     args.temperature, args.top_p, args.seed or 0, progress=True)
    d = _out(args)
    write_cases(d / "cases.jsonl", rows)
    summary = {"task": "leakage", "data": list(args.data), **summary, **meta}
    write_summary(d, summary)
    systems = ["larimar", "none"] + [b.name for b in baselines]
    table = [{"system": s, "attack_success": summary[{"larimar": "attack_success", "none": "attack_success_none"}
                                                     .get(s, f"attack_success_{s}")]} for s in systems]
    write_table(d / "summary.md", f"information leakage: {', '.join(args.data)}",
                [f"{summary['n']} facts hidden ('prompt unknown'); attack: {args.prompts} prompts x {args.samples} "
                 f"samples (T = {args.temperature}, top_p = {args.top_p}, {args.gen_tokens} tokens); success = the "
                 f"true answer in any generation. Larimar scope rate {_fmt(summary.get('scope_rate'))}, "
                 f"'unknown' in {_fmt(summary.get('unknown_rate'))} of its generations."], table,
                ["system", "attack_success"])
    plot_bars(d / "leakage.png", "Rephrasing attack success (lower is better)", [t["system"] for t in table],
              [t["attack_success"] for t in table])
    print("\n".join(Path(d / "summary.md").read_text().splitlines()[4:]))
    return summary


def plot_bars(path: str | Path, title: str, labels: Sequence[str], values: Sequence[float | None]) -> None:
    """A bar chart (Agg canvas) saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(list(labels), [v if v is not None else 0.0 for v in values])
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)


def add_model_args(p: argparse.ArgumentParser, slots: int | None = None) -> None:
    """Options shared by the capability commands (checkpoint, memory size, scope, output, and the write-time
    latent refinement of what is written)."""
    p.add_argument("--out", required=True, help="output folder (summary.json, summary.md, a PNG, cases.jsonl)")
    p.add_argument("--checkpoint", default=None, help="Larimar checkpoint folder (default: the shipped one)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--slots", type=int, default=slots,
                   help="memory slots K" + (f" (default {slots})" if slots else " (default: the checkpoint's)"))
    p.add_argument("--slot-init", choices=SLOT_INITS, default="random", help="rows added to M0 when K > K0")
    add_read_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)


def _register(esub: argparse._SubParsersAction) -> None:
    def data_arg(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--data", action="append", required=True, metavar="FILE",
                       help=f"{what} records file (repeat to concatenate files)")

    def hp_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--hparams", action="append", metavar="METHOD=PATH", help="a baseline's YAML hyper-parameters")

    p = esub.add_parser("sequential", help="sequential editing (ZsRE): retention, rephrase, locality vs edits")
    data_arg(p, "ZsRE")
    p.add_argument("--sequential", action="store_true", help="accepted for symmetry (always sequential)")
    p.add_argument("--edits", type=int, default=1000, help="facts written one after another")
    p.add_argument("--checkpoints", default=",".join(map(str, DEFAULT_CHECKPOINTS)),
                   help="numbers of edits to evaluate at (the last edit always)")
    p.add_argument("--em-curve", action="store_true", help="greedy exact match at every checkpoint too")
    p.add_argument("--baselines", default="", help="comma-separated: grace, memit, rome, ft (sequential mode)")
    p.add_argument("--no-larimar", action="store_true", help="run only the --baselines")
    p.add_argument("--compare", action="append", metavar="DIR",
                   help="an earlier sequential run folder whose methods join the table and plot (repeatable)")
    hp_arg(p)
    add_model_args(p, slots=1000)
    p.set_defaults(func=lambda a: (run_sequential(a), 0)[1])

    p = esub.add_parser("capacity", help="batch editing capacity: rewrite accuracy vs facts in one memory")
    data_arg(p, "CounterFact")
    p.add_argument("--n", default="64,128,256,512,1024,2048", help="numbers of facts written at once")
    p.add_argument("--sample", type=int, default=0, help="score a seeded random sample of this many of the N facts "
                   "(0: all)")
    add_model_args(p, slots=512)
    p.set_defaults(func=lambda a: (run_capacity(a), 0)[1])

    p = esub.add_parser("forget", help="selective forgetting: recall of a forgotten fact and of the others")
    data_arg(p, "CounterFact")
    p.add_argument("--n", default=None, help="facts in memory, comma-separated (default: K,2K)")
    p.add_argument("--trials", type=int, default=10, help="facts forgotten, one at a time")
    p.add_argument("--replace-unknown", action="store_true", help="write 'prompt unknown' in place of the fact")
    p.add_argument("--retained-sample", type=int, default=200, help="retained facts measured per trial (0: all)")
    p.add_argument("--no-em", action="store_true", help="skip greedy exact match")
    add_model_args(p)
    p.set_defaults(func=lambda a: (run_forget(a), 0)[1])

    p = esub.add_parser("leakage", help="information-leakage prevention against a rephrasing attack")
    data_arg(p, "CounterFact")
    p.add_argument("--n", type=int, default=100, help="facts to hide")
    p.add_argument("--prompts", type=int, default=4, help="attack prompts per fact (rewrite + paraphrases)")
    p.add_argument("--samples", type=int, default=5, help="sampled generations per prompt")
    p.add_argument("--gen-tokens", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--baselines", default="", help="comma-separated: rome, memit (target edited to 'unknown')")
    hp_arg(p)
    add_model_args(p)
    p.set_defaults(func=lambda a: (run_leakage(a), 0)[1])

    from larimar.longcontext import add_longcontext_parser

    add_longcontext_parser(esub)


def _find_subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Registers ``larimar eval sequential | capacity | forget | leakage | longcontext``.

    Attaches to the ``eval`` command of `larimar.evaluation` when it is already registered; otherwise registers
    them under ``larimar capability ...``.
    """
    parent = sub.choices.get("eval")
    esub = _find_subparsers(parent) if parent is not None else None
    if esub is None:
        p = sub.add_parser("capability", help="Larimar's capabilities: sequential, capacity, forget, leakage, "
                                              "longcontext")
        esub = p.add_subparsers(dest="capability", required=True)
    _register(esub)
