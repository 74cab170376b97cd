"""Knowledge-editing evaluation: CounterFact and ZsRE, one record at a time (reset, edit, query).

Every method runs behind `larimar.eval.editors.Editor`; the scoring rules are `larimar.eval.metrics`.

Protocols (tag every number with its protocol; they are not comparable):

``counterfact_prob`` (ROME / the Larimar paper, Table 2). Per record: reset, write the fact
    ``prompt.format(subject) + " " + target_new``, then for the rewrite prompt, each paraphrase and each
    neighbourhood prompt compare the mean per-token NLL of " target_new" and " target_true" (the neighbourhood's
    own answer when the record has one) after the prompt. Per record, the share of prompts of each kind that
    succeed, then the mean over records:
        ES = % rewrite prompts with NLL(new) < NLL(true)      EM = mean of p(new) - p(true), in %
        PS = the same on paraphrases                          PM = the same on paraphrases
        NS = % neighbourhood prompts with NLL(true) < NLL(new) NM = mean of p(true) - p(new)
        Score = harmonic mean of ES, PS, NS;  p = exp(-mean NLL per token).
``token_acc`` (EasyEdit). Teacher-forced token accuracy: after the rewrite prompt, the share of target_new's
    tokens that are the argmax prediction given the previous gold tokens (reliability); the same after each
    paraphrase, averaged (generalization); after each locality prompt + its answer, the share of the edited
    model's argmax tokens that equal the unedited model's argmax tokens at the same positions (locality).
    Reported as reliability / generalization / locality (also under es / ps / ns, with Score their harmonic
    mean) in %. ZsRE also reports exact_match: greedy generation after the rewrite prompt starts with
    target_new (case-insensitive, whitespace stripped).

What a user reads (both protocols, from the same edits, on every ``detail_every``-th record):
    gen_es / gen_ps   % of greedy generations (``GEN_ES_TOKENS`` tokens) after the rewrite / paraphrase prompts
                      whose first sentence contains target_new as whole words, case-insensitively
                      (`larimar.eval.metrics.generation_hit`); per record the share of prompts, then the mean.
    fluency           ROME's weighted bi/tri-gram entropy (`larimar.eval.metrics.ngram_entropy`) of prompt + free
                      greedy generation (``FLUENCY_TOKENS`` tokens) after each of the record's distinct
                      ``generation_prompts`` (CounterFact ROME), else after the rewrite prompt; fluency_unedited
                      is the same for the unedited model on the same prompts. ROME generates 100 tokens in all, so
                      the absolute values are not comparable with its tables; compare methods with each other and
                      with fluency_unedited.
Costs: ``edit_ms`` is the wall time of the whole public edit call for every method (Larimar: encode, refine,
    scope embedding, write and index insert; rag: the index insert); Larimar's parts are kept as ``edit_core_ms``
    (encode + refine + write) and ``edit_scope_ms``. ``query_prompt_tokens`` is the mean number of decoder input
    tokens per query (start token + prompt; rag adds the retrieved sentence and the separator; IKE its
    demonstrations) over the record's scored prompts.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

from larimar.eval.editors import Editor
from larimar.eval.metrics import (
    KINDS,
    aggregate_prob,
    case_prob_metrics,
    es_success,
    generation_hit,
    harmonic_mean,
    match_rate,
    mean_of,
    mean_pct,
    median,
    ngram_entropy,
    space,
    starts_with,
)
from larimar.eval.report import PeakMemory
from larimar.facts import EditRequest

logger = logging.getLogger(__name__)

PROTOCOLS = ("counterfact_prob", "token_acc")


SUMMARY_KEYS = ("method", "protocol", "n_cases", "es", "ps", "ns", "score", "em", "pm", "nm",
                "gen_es", "gen_ps", "fluency", "fluency_unedited",
                "edit_ms_median", "query_ms_median", "plain_query_ms_median", "query_prompt_tokens_mean")

GEN_ES_TOKENS = 12  # greedy tokens after the rewrite / paraphrase prompts for gen_es / gen_ps
FLUENCY_TOKENS = 30  # greedy tokens after each generation prompt for fluency


def _ms(t0: float) -> float:
    return 1000.0 * (time.perf_counter() - t0)


def _timed_edit(editor: Editor, req: EditRequest) -> dict[str, float | None]:
    """Runs ``editor.edit([req])``: ``edit_ms`` is the whole call's wall time (every method); for Larimar also its
    parts (``Larimar.edit(timings=)``): ``edit_core_ms`` = encode + refine + write, ``edit_scope_ms`` = the scope
    embedding (the index insert itself is in ``edit_ms`` only)."""
    t0 = time.perf_counter()
    editor.edit([req])
    out: dict[str, float | None] = {"edit_ms": _ms(t0), "edit_core_ms": None, "edit_scope_ms": None}
    parts = editor.last_edit_parts() if hasattr(editor, "last_edit_parts") else None
    if parts and "encode" in parts and "write" in parts:
        out["edit_core_ms"] = parts["encode"] + parts.get("refine", 0.0) + parts["write"]
        out["edit_scope_ms"] = parts.get("scope")
    return out


def _unedited_generations(editor: Editor, cache: dict | None, prompts: list[str], n_tokens: int) -> list[str]:
    """Greedy generations of the unedited model (the editor right after ``reset``), through ``cache`` keyed by
    ("generation", prompt, n_tokens): every method starts from the same decoder, so they are computed once."""
    cache = {} if cache is None else cache
    missing = [p for p in dict.fromkeys(prompts) if ("generation", p, n_tokens) not in cache]
    if missing:
        cache.update(((("generation", p, n_tokens), t) for p, t in zip(missing, editor.generate(missing, n_tokens))))
    return [cache[("generation", p, n_tokens)] for p in prompts]


def _fluency_prompts(req: EditRequest) -> list[str]:
    """The record's distinct generation prompts (CounterFact ROME), else its rewrite prompt."""
    return list(dict.fromkeys(req.generation_prompts)) or [req.full_prompt]


def _generation_metrics(editor: Editor, req: EditRequest, unedited: list[str] | None, gen_es_tokens: int,
                        fluency_tokens: int) -> dict[str, Any]:
    """gen_es / gen_ps (0 / 1 per record: share of prompts) from greedy generations of the edited model, and fluency
    (ROME's n-gram entropy of prompt + free generation, mean over the record's generation prompts) beside the
    unedited model's on the same prompts (``unedited``: its generations)."""
    out: dict[str, Any] = {"gen_es": None, "gen_ps": None, "fluency": None, "fluency_unedited": None,
                           "gen_generations": None, "fluency_generations": None}
    if gen_es_tokens > 0:
        gens = editor.generate([req.full_prompt, *req.paraphrase_prompts], gen_es_tokens)
        hits = [generation_hit(g, req.target_new) for g in gens]
        out["gen_es"] = float(hits[0])
        out["gen_ps"] = statistics.mean(hits[1:]) if hits[1:] else None
        out["gen_generations"] = gens
    if fluency_tokens > 0:
        prompts = _fluency_prompts(req)
        free = editor.generate(prompts, fluency_tokens)
        out["fluency"] = statistics.mean(ngram_entropy(p + t) for p, t in zip(prompts, free))
        if unedited is not None:
            out["fluency_unedited"] = statistics.mean(ngram_entropy(p + t) for p, t in zip(prompts, unedited))
        out["fluency_generations"] = free
    return out


def _predict_cached(editor: Editor, cache: dict | None, prompts: list[str], answers: list[str]) -> list[list[int]]:
    """Teacher-forced argmax tokens of answers after prompts, through ``cache`` keyed by (prompt, answer)."""
    cache = {} if cache is None else cache
    missing = [(p, a) for p, a in zip(prompts, answers) if (p, a) not in cache]
    if missing:
        cache.update(zip(missing, editor.predict([p for p, _ in missing], [a for _, a in missing]).predicted))
    return [cache[(p, a)] for p, a in zip(prompts, answers)]


def _edit_with_generations(editor: Editor, req: EditRequest, gen_tokens: int, detail: bool, pre_cache: dict | None,
                           gen_es_tokens: int, fluency_tokens: int) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Applies one record's edit between the unedited and the edited greedy generations of its rewrite prompt:
    (pre-edit text or None, the edit's timing, post-edit text or None, the generation metrics)."""
    rewrite = req.full_prompt
    pre = editor.generate([rewrite], gen_tokens)[0] if gen_tokens else None
    unedited = (_unedited_generations(editor, pre_cache, _fluency_prompts(req), fluency_tokens)
                if detail and fluency_tokens > 0 else None)
    timing = _timed_edit(editor, req)
    post = editor.generate([rewrite], gen_tokens)[0] if gen_tokens else None
    gen = (_generation_metrics(editor, req, unedited, gen_es_tokens, fluency_tokens) if detail
           else _generation_metrics(editor, req, None, 0, 0))
    return pre, timing, post, gen


def _case_prob(editor: Editor, req: EditRequest, gen_tokens: int, detail: bool = True,
               token_acc: bool = False, pre_cache: dict | None = None, gen_es_tokens: int = GEN_ES_TOKENS,
               fluency_tokens: int = FLUENCY_TOKENS) -> dict[str, Any] | None:
    if not req.target_true:
        return None
    rewrite = req.full_prompt
    prompts = [rewrite, *req.paraphrase_prompts, *req.neighborhood_prompts]
    kinds = ["rewrite"] + ["paraphrase"] * len(req.paraphrase_prompts) + ["neighborhood"] * len(
        req.neighborhood_prompts)
    answers = list(req.neighborhood_answers) or [req.target_true] * len(req.neighborhood_prompts)
    trues = [req.target_true] * (1 + len(req.paraphrase_prompts)) + answers
    editor.reset()
    loc_prompts, loc_answers = list(req.neighborhood_prompts), [space(t) for t in answers]
    pre_loc = _predict_cached(editor, pre_cache, loc_prompts, loc_answers) if token_acc and loc_prompts else None
    gen_tokens = gen_tokens if detail else 0
    pre, timing, post, gen = _edit_with_generations(editor, req, gen_tokens, detail, pre_cache, gen_es_tokens,
                                                    fluency_tokens)
    n = len(prompts)
    conts = [space(req.target_new)] * n + [space(t) for t in trues]
    if token_acc:  # one teacher-forced pass gives the NLLs and EasyEdit's argmax tokens
        tf = editor.predict(prompts + prompts, conts)
        nll, scope = tf.nll, tf.in_scope or [None] * (2 * n)  # (2n,)
    else:
        nll, scope = editor.score(prompts + prompts, conts)  # (2n,)
    query_ms = plain_ms = prompt_tokens = None
    if detail:
        t0 = time.perf_counter()
        editor.score([rewrite, rewrite], [space(req.target_new), space(req.target_true)])
        query_ms = _ms(t0)
        prompt_tokens = _prompt_tokens(editor, prompts)
    if detail and hasattr(editor, "score_plain"):
        t0 = time.perf_counter()
        editor.score_plain([rewrite, rewrite], [space(req.target_new), space(req.target_true)])
        plain_ms = _ms(t0)
    nll_new, nll_true = nll[:n].tolist(), nll[n:].tolist()
    metrics = case_prob_metrics(nll_new, nll_true, kinds)
    rows = []
    for k in range(n):
        ok = es_success(nll_new[k], nll_true[k], kinds[k])
        row = {"kind": kinds[k], "prompt": prompts[k], "answer_true": trues[k], "nll_new": nll_new[k],
               "nll_true": nll_true[k], "success": bool(ok), "in_scope": scope[k]}
        if scope[n + k] != scope[k]:
            row["in_scope_true"] = scope[n + k]
        rows.append(row)
    if token_acc:  # EasyEdit's numbers from the same edit: token accuracy of target_new, agreement on neighbours
        n_edit = 1 + len(req.paraphrase_prompts)  # rows 0 .. n_edit-1: rewrite and paraphrases with target_new
        accs = [match_rate(tf.predicted[k], tf.target[k]) for k in range(n_edit)]
        post_loc = tf.predicted[n + n_edit :]  # the neighbourhood prompts with their true answers
        metrics["tf_reliability"] = accs[0]
        metrics["tf_generalization"] = statistics.mean(accs[1:]) if accs[1:] else None
        metrics["tf_locality"] = (statistics.mean(match_rate(a, b) for a, b in zip(post_loc, pre_loc))
                                  if pre_loc is not None else None)
    return {"prompts": rows, "pre_generation": pre, "post_generation": post, **timing, "query_ms": query_ms,
            "plain_query_ms": plain_ms, "query_prompt_tokens": prompt_tokens, **gen, **metrics}


def _prompt_tokens(editor: Editor, prompts: list[str]) -> float | None:
    """Mean decoder input tokens per query over ``prompts`` (the editor's ``prompt_tokens``; None without it)."""
    fn = getattr(editor, "prompt_tokens", None)
    return mean_of(fn(list(prompts))) if fn is not None else None


def _case_token_acc(editor: Editor, req: EditRequest, gen_tokens: int, exact_match: bool, detail: bool = True,
                    pre_cache: dict | None = None, gen_es_tokens: int = GEN_ES_TOKENS,
                    fluency_tokens: int = FLUENCY_TOKENS) -> dict[str, Any]:
    rewrite = req.full_prompt
    new = space(req.target_new)
    loc_prompts = list(req.neighborhood_prompts) if req.neighborhood_answers else []
    loc_answers = [space(a) for a in req.neighborhood_answers]
    editor.reset()
    pre_loc = editor.predict(loc_prompts, loc_answers) if loc_prompts else None
    pre, timing, post, gen = _edit_with_generations(editor, req, gen_tokens, detail, pre_cache, gen_es_tokens,
                                                    fluency_tokens)
    prompts = [rewrite, *req.paraphrase_prompts]
    tf = editor.predict(prompts, [new] * len(prompts))
    scope = tf.in_scope or [None] * len(prompts)
    t0 = time.perf_counter()
    editor.predict([rewrite], [new])
    query_ms = _ms(t0)
    prompt_tokens = _prompt_tokens(editor, prompts + loc_prompts) if detail else None
    rows = [{"kind": "rewrite" if k == 0 else "paraphrase", "prompt": p, "acc": match_rate(tf.predicted[k], tf.target[k]),
             "nll": float(tf.nll[k]), "in_scope": scope[k]} for k, p in enumerate(prompts)]
    loc_acc = None
    if pre_loc is not None:
        post_loc = editor.predict(loc_prompts, loc_answers)
        lscope = post_loc.in_scope or [None] * len(loc_prompts)
        for k, p in enumerate(loc_prompts):
            acc = match_rate(post_loc.predicted[k], pre_loc.predicted[k])
            rows.append({"kind": "neighborhood", "prompt": p, "answer": loc_answers[k].strip(), "acc": acc,
                         "in_scope": lscope[k]})
        loc_acc = statistics.mean(r["acc"] for r in rows if r["kind"] == "neighborhood")
    para = [r["acc"] for r in rows if r["kind"] == "paraphrase"]
    case = {"prompts": rows, "pre_generation": pre, "post_generation": post, **timing, "query_ms": query_ms,
            "plain_query_ms": None, "query_prompt_tokens": prompt_tokens, **gen, "reliability": rows[0]["acc"],
            "generalization": statistics.mean(para) if para else None, "locality": loc_acc}
    if exact_match:
        n_tok = len(tf.target[0]) + 2
        gen = post if post is not None and gen_tokens >= n_tok else editor.generate([rewrite], n_tok)[0]
        case["exact_match"] = float(starts_with(gen, req.target_new))
    return case


def evaluate_edits(
    editor: Editor,
    records: Sequence[EditRequest],
    protocol: str = "counterfact_prob",
    gen_tokens: int = 10,
    exact_match: bool = False,
    progress: bool = False,
    detail_every: int = 1,
    token_acc: bool = False,
    pre_cache: dict | None = None,
    gen_es_tokens: int = GEN_ES_TOKENS,
    fluency_tokens: int = FLUENCY_TOKENS,
) -> dict[str, Any]:
    """Runs one editor over records, one record at a time (reset, edit, query).

    Args:
        editor: the method.
        records: the edit requests.
        protocol: "counterfact_prob" or "token_acc" (see the module docstring).
        gen_tokens: tokens of the pre / post-edit greedy generation of the rewrite prompt (0: none).
        exact_match: also report greedy exact match of target_new (ZsRE; token_acc only).
        progress: show a tqdm progress bar.
        detail_every: generate (pre / post generations, gen_es / gen_ps, fluency) and time queries on every k-th
            record only (scores are computed for every record): large runs on CPU spend most of their time there
            otherwise. Under token_acc the pre / post generations and timings stay on every record.
        token_acc: under counterfact_prob, also EasyEdit's token accuracies from the same edit
            (``tf_reliability``, ``tf_generalization``, ``tf_locality`` in the summary).
        pre_cache: shared cache of the unedited model's neighbourhood predictions, keyed by (prompt, answer), and
            of its free generations for ``fluency_unedited``, keyed by ("generation", prompt, tokens): every editor
            starts from the same decoder, so several methods in one run compute them once.
        gen_es_tokens: greedy tokens generated after the rewrite and paraphrase prompts for ``gen_es`` / ``gen_ps``
            (the new object, as whole words, case-insensitive, in the first sentence: `generation_hit`; 0: off).
        fluency_tokens: greedy tokens generated after each generation prompt (CounterFact ROME's
            ``generation_prompts``, else the rewrite prompt) for ``fluency`` (ROME's n-gram entropy of prompt +
            generation, `ngram_entropy`) and ``fluency_unedited`` (the same of the unedited model; 0: off).

    Returns:
        the summary dict (keys of `SUMMARY_KEYS` and more) with the per-record results under "cases".
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    from tqdm.auto import tqdm

    cases: list[dict[str, Any]] = []
    skipped = 0
    bar = tqdm(records, desc=f"{editor.name} ({protocol})", disable=not progress, unit="case")
    try:
        with PeakMemory(getattr(editor, "device", None)) as peak:
            for i, req in enumerate(bar):
                if protocol == "counterfact_prob":
                    case = _case_prob(editor, req, gen_tokens, detail=i % max(1, detail_every) == 0,
                                      token_acc=token_acc, pre_cache=pre_cache, gen_es_tokens=gen_es_tokens,
                                      fluency_tokens=fluency_tokens)
                    if case is None:
                        skipped += 1
                        continue
                else:
                    case = _case_token_acc(editor, req, gen_tokens, exact_match,
                                           detail=i % max(1, detail_every) == 0, pre_cache=pre_cache,
                                           gen_es_tokens=gen_es_tokens, fluency_tokens=fluency_tokens)
                cases.append({"method": editor.name, "protocol": protocol, "case_id": req.case_id,
                              "fact": req.sentence, "target_new": req.target_new, "target_true": req.target_true,
                              **case})
    finally:
        editor.reset()
    if skipped:
        logger.warning("%s: skipped %d record(s) without target_true (needed by %s)", editor.name, skipped, protocol)
    summary: dict[str, Any] = {"method": editor.name, "protocol": protocol, "n_cases": len(cases),
                               "n_skipped": skipped}
    if protocol == "counterfact_prob":
        summary.update(aggregate_prob(cases))
        if token_acc:
            for key in ("tf_reliability", "tf_generalization", "tf_locality"):
                summary[key] = mean_pct(c.get(key) for c in cases)
    else:
        rel = mean_pct(c["reliability"] for c in cases)
        gen = mean_pct(c["generalization"] for c in cases)
        loc = mean_pct(c["locality"] for c in cases)
        summary.update(reliability=rel, generalization=gen, locality=loc, es=rel, ps=gen, ns=loc,
                       score=harmonic_mean([rel, gen, loc]), em=None, pm=None, nm=None)
        if exact_match:
            summary["exact_match"] = mean_pct(c.get("exact_match") for c in cases)
    summary["gen_es"] = mean_pct(c["gen_es"] for c in cases)
    summary["gen_ps"] = mean_pct(c["gen_ps"] for c in cases)
    summary["fluency"] = mean_of(c["fluency"] for c in cases)
    summary["fluency_unedited"] = mean_of(c["fluency_unedited"] for c in cases)
    summary["n_generation_cases"] = sum(1 for c in cases if c["gen_es"] is not None or c["fluency"] is not None)
    summary["edit_ms_median"] = median(c["edit_ms"] for c in cases)  # the whole edit call, every method
    summary["edit_core_ms_median"] = median(c["edit_core_ms"] for c in cases)  # Larimar: encode + refine + write
    summary["edit_scope_ms_median"] = median(c["edit_scope_ms"] for c in cases)  # Larimar: scope embedding
    summary["query_ms_median"] = median(c["query_ms"] for c in cases)
    summary["plain_query_ms_median"] = median(c["plain_query_ms"] for c in cases)
    summary["query_prompt_tokens_mean"] = mean_of(c["query_prompt_tokens"] for c in cases)
    summary["peak_mem_mb"], summary["peak_mem_delta_mb"], summary["peak_mem_kind"] = peak.peak_mb, peak.delta_mb, peak.kind
    for kind in KINDS:
        flags = [p["in_scope"] for c in cases for p in c["prompts"] if p["kind"] == kind and p["in_scope"] is not None]
        summary[f"scope_rate_{kind}"] = 100.0 * sum(flags) / len(flags) if flags else None
    summary["cases"] = cases
    return summary


def evaluate_counterfact(editor: Editor, records: Sequence[EditRequest], protocol: str = "counterfact_prob",
                         **kwargs: Any) -> dict[str, Any]:
    """`evaluate_edits` on CounterFact records (e.g. ``evaluate_counterfact(ed, recs)["es"]``)."""
    return evaluate_edits(editor, records, protocol, **kwargs)


def evaluate_zsre(editor: Editor, records: Sequence[EditRequest], protocol: str = "token_acc",
                  **kwargs: Any) -> dict[str, Any]:
    """`evaluate_edits` on ZsRE records, with greedy exact match under ``token_acc``."""
    kwargs.setdefault("exact_match", protocol == "token_acc")
    return evaluate_edits(editor, records, protocol, **kwargs)
