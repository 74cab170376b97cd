"""The scope detector's threshold sweep on edit records (one written fact per record)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from larimar.eval.metrics import KINDS, space
from larimar.facts import EditRequest

SCOPE_THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))  # 0.30 .. 0.90


def evaluate_scope(records: Sequence[EditRequest], scope: Any,
                   thresholds: Sequence[float] = SCOPE_THRESHOLDS) -> dict[str, Any]:
    """The scope detector's threshold sweep on edit records (one written fact per record).

    Per record the fact "prompt + target_new" is the only written fact; its rewrite and paraphrase prompts
    should be in scope, its neighbourhood prompts out of scope. Both scoring modes are swept: ``prompt`` (the
    query prompt alone, per sentence) and ``prompt_answer`` (the paper's: prompt + " " + target_new, whole).

    Args:
        records: the records.
        scope: a `larimar.scope.ScopeDetector` (its stored facts and threshold are not used).
        thresholds: the thresholds (in scope: similarity >= threshold).

    Returns:
        ``{"n_records", "rows": [{mode, threshold, rewrite, paraphrase, neighborhood, balanced_accuracy}],
        "best": {mode: {threshold, balanced_accuracy}}}`` with in-scope rates in percent; balanced accuracy counts
        rewrite and paraphrase prompts as positives; ``best`` is each mode's threshold of highest balanced accuracy.
    """
    queries: list[str] = []
    facts: list[str] = []
    kinds: list[str] = []
    answers: list[str] = []
    for r in records:
        fact = f"{r.full_prompt} {r.target_new}"
        for kind, prompts in (("rewrite", [r.full_prompt]), ("paraphrase", r.paraphrase_prompts),
                              ("neighborhood", r.neighborhood_prompts)):
            queries += list(prompts)
            facts += [fact] * len(prompts)
            kinds += [kind] * len(prompts)
            answers += [space(r.target_new)] * len(prompts)
    rows = []
    for mode in ("prompt", "prompt_answer"):
        qs = queries if mode == "prompt" else [q + a for q, a in zip(queries, answers)]
        sims = scope.with_mode(mode).score_pairs(qs, facts)  # (Q,)
        by_kind = {k: sims[[i for i, x in enumerate(kinds) if x == k]] for k in KINDS}
        for t in thresholds:
            rates = {k: (100.0 * (v >= t).double().mean().item() if v.numel() else None) for k, v in by_kind.items()}
            pos = torch.cat([by_kind["rewrite"], by_kind["paraphrase"]])
            neg = by_kind["neighborhood"]
            bal = None
            if pos.numel() and neg.numel():
                bal = 50.0 * ((pos >= t).double().mean().item() + (neg < t).double().mean().item())
            rows.append({"mode": mode, "threshold": float(t), **rates, "balanced_accuracy": bal})
    best = {}  # per mode, the threshold of the highest balanced accuracy (the lowest such threshold on ties)
    for mode in ("prompt", "prompt_answer"):
        scored = [r for r in rows if r["mode"] == mode and r["balanced_accuracy"] is not None]
        if scored:
            top = max(scored, key=lambda r: (r["balanced_accuracy"], -r["threshold"]))
            best[mode] = {"threshold": top["threshold"], "balanced_accuracy": top["balanced_accuracy"]}
    return {"n_records": len(records), "rows": rows, "best": best}
