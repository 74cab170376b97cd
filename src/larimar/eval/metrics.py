"""Every scoring rule of the evaluation, once.

    es_success        CounterFact's rewrite rule: NLL(new) < NLL(true) (neighbourhood: NLL(true) < NLL(new))
    case_prob_metrics per-record ES / PS / NS and EM / PM / NM (``counterfact_prob``, ROME / the Larimar paper)
    aggregate_prob    the mean over records, in percent, and Score (harmonic mean of ES, PS, NS)
    match_rate        EasyEdit's teacher-forced token accuracy (share of target tokens that are the argmax)
    agreement         the same between two predictions (EasyEdit's locality)
    starts_with       greedy exact match: the generation, stripped and case-folded, starts with the answer
    repeats_answer / ends_after_answer / sentence_ends_after_answer
                      how a right answer goes on: says the answer again / stops there / ends its sentence there
    contains_answer   the answer as a whole word anywhere in a generation (leakage)
    generation_hit    the answer as whole words in the first sentence of a generation (gen_es / gen_ps)
    ngram_entropy     ROME's fluency of one text: weighted bi/tri-gram entropy (fluency)

Helpers that apply these rules through an `Editor` (token_accuracy, exact_match, rewrite_success) live here too.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from larimar.eval.editors import Editor
from larimar.facts import split_sentences

KINDS = ("rewrite", "paraphrase", "neighborhood")


def space(s: str) -> str:
    """An answer as it is scored after a prompt: one leading space."""
    return " " + s.strip()


def es_success(nll_new: float, nll_true: float, kind: str = "rewrite") -> bool:
    """CounterFact's success rule for one prompt: the new answer is more likely than the true one (rewrite and
    paraphrase prompts), or the true answer stays more likely (neighbourhood prompts)."""
    return nll_true < nll_new if kind == "neighborhood" else nll_new < nll_true


def starts_with(generation: str, answer: str) -> bool:
    """Greedy exact match: the generation, stripped and case-folded, starts with the answer (stripped, folded)."""
    return generation.strip().lower().startswith(answer.strip().lower())


def repeats_answer(generation: str, answer: str) -> bool:
    """Whether the answer (stripped, case-folded) occurs at least twice in the generation (case-folded): what
    follows the answer says it again, the degenerate continuation of an over-written fact."""
    a = answer.strip().lower()
    return bool(a) and generation.lower().count(a) >= 2


def _after_answer(generation: str, answer: str) -> str | None:
    """What follows the answer in a generation that starts with it (`starts_with`); None when it does not."""
    return generation.strip()[len(answer.strip()):] if starts_with(generation, answer) else None


def ends_after_answer(generation: str, answer: str) -> bool:
    """Whether the generation is the answer and then ends: starts with it (`starts_with`) and nothing but
    punctuation and space follows (the decoder stopped with its end-of-text token)."""
    rest = _after_answer(generation, answer)
    return rest is not None and not any(c.isalnum() for c in rest)


def sentence_ends_after_answer(generation: str, answer: str) -> bool:
    """Whether the generation is the answer and then the end of its sentence: starts with it (`starts_with`) and
    what follows (after closing quotes or brackets) is ".", "!", "?", a line break or nothing. What comes after
    that sentence does not matter ("Maria Okafor. She founded ..." ends; "Maria Okafor Okafor." does not)."""
    rest = _after_answer(generation, answer)
    if rest is None:
        return False
    rest = rest.lstrip(" \t\"'\u201d\u2019)]")
    return not rest or rest[0] in ".!?\n"


def ending_rates(right: Iterable[tuple[str, str]]) -> tuple[float | None, float | None]:
    """(answer_repeat_rate, answer_end_rate) over right answers given as (generation, expected answer) pairs:
    the shares that `repeats_answer` and that `ends_after_answer` (None, None for no pair)."""
    pairs = list(right)
    return (mean_of([repeats_answer(g, a) for g, a in pairs]), mean_of([ends_after_answer(g, a) for g, a in pairs]))


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of percentages (0 if any is 0; None if any is missing)."""
    if not values or any(v is None for v in values):
        return None
    if any(v <= 0 for v in values):  # type: ignore[operator]
        return 0.0
    return len(values) / sum(1.0 / v for v in values)  # type: ignore[operator]


def case_prob_metrics(nll_new: Sequence[float], nll_true: Sequence[float], kinds: Sequence[str]) -> dict[str, Any]:
    """Per-record ``counterfact_prob`` metrics from NLLs (one entry per prompt).

    Args:
        nll_new: mean per-token NLL of " target_new" after each prompt.
        nll_true: mean per-token NLL of the true answer after each prompt.
        kinds: "rewrite", "paraphrase" or "neighborhood" per prompt.

    Returns:
        es / ps / ns (share of successful prompts of the kind, in [0, 1]) and em / pm / nm (mean probability
        difference, in [-1, 1]); None for a kind without prompts.
    """
    if not len(nll_new) == len(nll_true) == len(kinds):
        raise ValueError("nll_new, nll_true and kinds must have the same length")
    out: dict[str, Any] = {}
    for kind, s, m in (("rewrite", "es", "em"), ("paraphrase", "ps", "pm"), ("neighborhood", "ns", "nm")):
        pairs = [(a, b) for a, b, k in zip(nll_new, nll_true, kinds) if k == kind]
        if not pairs:
            out[s] = out[m] = None
            continue
        if kind == "neighborhood":  # success: the true answer stays more likely
            out[s] = sum(b < a for a, b in pairs) / len(pairs)
            out[m] = sum(math.exp(-b) - math.exp(-a) for a, b in pairs) / len(pairs)
        else:
            out[s] = sum(a < b for a, b in pairs) / len(pairs)
            out[m] = sum(math.exp(-a) - math.exp(-b) for a, b in pairs) / len(pairs)
    return out


def mean_pct(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return 100.0 * sum(vals) / len(vals) if vals else None


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate_prob(case_metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """ES, PS, NS, EM, PM, NM (percent: the mean over records of the per-record values) and Score."""
    out = {k: mean_pct(c[k] for c in case_metrics) for k in ("es", "ps", "ns", "em", "pm", "nm")}
    out["score"] = harmonic_mean([out["es"], out["ps"], out["ns"]])
    return out


def match_rate(pred: list[int], tgt: list[int]) -> float:
    """The share of target tokens equal to the predicted token at the same position (EasyEdit token accuracy)."""
    return sum(int(a == b) for a, b in zip(pred, tgt)) / max(len(tgt), 1)


def mean_of(values: Iterable[float | bool | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def agreement(pred: Sequence[Sequence[int]], ref: Sequence[Sequence[int]]) -> list[float]:
    """Per row, the share of argmax tokens equal to the reference's at the same positions (locality)."""
    return [sum(int(a == b) for a, b in zip(p, r)) / max(len(r), 1) for p, r in zip(pred, ref)]


def contains_answer(text: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``text`` as whole words (case-insensitive)."""
    a = answer.strip().lower()
    if not a:
        return False
    return re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", text.lower()) is not None


def first_sentence(text: str) -> str:
    """The first sentence of a generation (`larimar.facts.split_sentences`: a line break or ". X" ends it)."""
    return split_sentences(text)[0] if text.strip() else ""


def generation_hit(generation: str, answer: str) -> bool:
    """Generation success (``gen_es`` / ``gen_ps``): ``answer`` occurs as whole words, case-insensitively, in the
    first sentence of ``generation`` (the greedy continuation after the prompt, prompt excluded)."""
    return contains_answer(first_sentence(generation), answer)


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text (``compute_n_gram_entropy``): for each n, the entropy in bits of the frequency
    distribution of the text's word n-grams, times its weight (2/3 for bigrams, 4/3 for trigrams), averaged over n.

    Words and punctuation marks are the tokens (a regex stand-in for ``nltk.word_tokenize``); a text with fewer
    than n tokens contributes 0 for that n. Repetitive text scores low, varied text high.
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError("ns and weights must be non-empty and of the same length")
    tokens = _WORD.findall(text)
    parts = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def token_accuracy(editor: Editor, prompts: Sequence[str], answers: Sequence[str],
                   batch_size: int = 32) -> tuple[list[float], list[list[int]]]:
    """Teacher-forced token accuracy of each answer after its prompt, and the argmax tokens (EasyEdit)."""
    acc: list[float] = []
    pred: list[list[int]] = []
    for lo in range(0, len(prompts), max(1, batch_size)):
        tf = editor.predict(list(prompts[lo : lo + batch_size]), [space(a) for a in answers[lo : lo + batch_size]])
        for p, t in zip(tf.predicted, tf.target):
            acc.append(sum(int(a == b) for a, b in zip(p, t)) / max(len(t), 1))
            pred.append(p)
    return acc, pred


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
        conts = [space(a) for a in new[lo : lo + batch_size]] + [space(a) for a in true[lo : lo + batch_size]]
        nll, in_scope = editor.score(ps + ps, conts)  # (2n,)
        ok += [es_success(float(nll[i]), float(nll[n + i])) for i in range(n)]
        scope += list(in_scope[:n])
    return ok, scope


def target_tokens(editor: Editor, prompts: Sequence[str], targets: Sequence[str], batch_size: int) -> list[list[int]]:
    out: list[list[int]] = []
    for lo in range(0, len(prompts), max(1, batch_size)):
        out += editor.predict(list(prompts[lo : lo + batch_size]),
                              [space(t) for t in targets[lo : lo + batch_size]]).target
    return out
