"""Write-time latent refinement: a few gradient steps on each written fact's latent, never on a weight.

The encoder's latent z (C,) of a fact is moved by Adam so that the decoder, reading z as the memory will return it,
gives the fact's answer a lower NLL (docs/method.md, "Write-time latent refinement"). ``Refinement(steps=0)`` is
the paper's one-shot write.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from larimar.facts import EditRequest
from larimar.model import LarimarModel
from larimar.solvers import one_fact_read

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refinement:
    """Write-time latent refinement: what the encoder gives is improved by a few gradient steps on the latent.

    Each fact's latent z (C,) starts at the encoder's output and takes at most ``steps`` Adam steps (learning rate
    ``lr``; ``sentence_steps`` for a plain sentence) that lower the decoder's NLL of the fact as it will be read
    (`refinement_targets`): for an edit request, the answer after its prompt; for a plain sentence, the rest of
    the sentence after each of up to ``sentence_splits`` of its beginnings that end before a content word and not
    inside a name or a number (so every word of a multi-word answer is carried, and the sentence's end too), their
    question reads, and optionally the end of the text after an answer read (``sentence_stop``). Each target
    decodes from z itself with the recall and nearest reads, else from the one-fact read of z at the target
    prompt's query latent (what the keyed read returns). Only the latents move: no weight of the encoder, the
    memory or the decoder changes, and the refined latent is written, read and forgotten like any other.
    ``steps = 0`` writes the encoder's latent (the paper's one-shot write).

    Attributes:
        steps: the most Adam steps per fact (0: off, for sentences too).
        sentence_steps: the most steps for a plain sentence (None: ``steps``); a sentence has more targets to fit
            (its beginnings and their question reads) than an edit request has.
        lr: Adam learning rate.
        batch_size: the most facts refined together (they do not interact: the loss is a sum over facts).
        max_tokens: the most decoder tokens in one batch, padding included (facts are batched by length, so long
            sentences, e.g. a document's, come in smaller batches; memory grows with this number).
        sentence_splits: beginnings of a plain sentence it is refined after (1: only "all but the last word").
        stop_nll: a fact stops early once the mean NLL per token of its targets is below this (None: never; the
            answer is then the decoder's argmax with a margin).
        sentence_questions: also refine a plain sentence (one without "?") on question-shaped reads of it: for
            each beginning whose rest is a bare answer, "Q: <beginning>? A:" and, where `wh_question` finds one,
            "Q: <wh-question> A:", followed by the rest (`refinement_targets`), so that the latent makes the decoder
            answer a question with the fact's words first.
        sentence_tail_tokens: also refine a plain sentence on what follows its answer: after each of its answer
            reads (`answer_reads`: the beginning whose rest is the answer, and its question read) that no end
            target ends (`unended_reads`), at most this many tokens of the plain decoder's (z = 0) greedy
            continuation of that read, through its end of text if it ends (`tail_targets`), where the decoder's
            next-token distribution is pulled toward the plain decoder's (a KL divergence, as in ROME's essence
            loss, over the plain decoder's top `TAIL_TOP_K` tokens), so that after the answer the decoder goes on,
            or ends, as the unedited one would (0, the default: off; measured on the development set, it raised
            fluency and cost answer EM, docs/results.md).
        sentence_tail_weight: the weight of each such tail target in its fact's loss.
        sentence_no_repeat: the weight of an unlikelihood target (Welleck et al., 2019) on the answer's first word
            right after each answer read that no end target ends (`repeat_targets`: "... is Maria Okafor." ->
            " Maria" made unlikely), against the answer said again; 0 (the default): off.
        sentence_stop: also refine a plain sentence on ending after its answer: the decoder's end-of-text token
            as the target after its question read ("questions") or after both answer reads ("answers"), so that
            a question is answered and the answer ends, as the unedited decoder ends its own "Q: ... A:" answers
            (`stop_targets`; "none", the default: off. With the default decoding, `Larimar`'s ``memory_span``
            "sentence", the unedited decoder ends or goes on after the answer's sentence; the end targets serve the
            paper's decoding, "all", where the latent conditions every token: docs/results.md).
        sentence_stop_weight: the weight of each such end target in its fact's loss, relative to 1 for every
            other target.
    """

    steps: int = 5
    sentence_steps: int | None = 10
    lr: float = 0.1
    batch_size: int = 64
    max_tokens: int = 2048
    sentence_splits: int = 4
    stop_nll: float | None = None
    sentence_questions: bool = True
    sentence_tail_tokens: int = 0
    sentence_tail_weight: float = 1.0
    sentence_no_repeat: float = 0.0
    sentence_stop: str = "none"
    sentence_stop_weight: float = 0.3

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"refinement steps must be an integer >= 0, got {self.steps!r}")
        if self.sentence_steps is not None and (not isinstance(self.sentence_steps, int) or self.sentence_steps < 0):
            raise ValueError(f"refinement sentence_steps must be an integer >= 0 or None, got {self.sentence_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"refinement learning rate must be > 0, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"refinement batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"refinement max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.sentence_splits, int) or self.sentence_splits < 1:
            raise ValueError(f"refinement sentence_splits must be an integer >= 1, got {self.sentence_splits!r}")
        if not isinstance(self.sentence_tail_tokens, int) or self.sentence_tail_tokens < 0:
            raise ValueError(f"refinement sentence_tail_tokens must be an integer >= 0, got {self.sentence_tail_tokens!r}")
        if not self.sentence_tail_weight > 0:
            raise ValueError(f"refinement sentence_tail_weight must be > 0, got {self.sentence_tail_weight!r}")
        if not self.sentence_no_repeat >= 0:
            raise ValueError(f"refinement sentence_no_repeat must be >= 0, got {self.sentence_no_repeat!r}")
        if self.sentence_stop not in STOP_MODES:
            raise ValueError(f"refinement sentence_stop must be one of {', '.join(STOP_MODES)}, got {self.sentence_stop!r}")
        if not self.sentence_stop_weight > 0:
            raise ValueError(f"refinement sentence_stop_weight must be > 0, got {self.sentence_stop_weight!r}")
        if self.stop_nll is not None and not self.stop_nll > 0:
            raise ValueError(f"refinement stop_nll must be > 0 or None, got {self.stop_nll!r}")

    def steps_for(self, sentence: bool) -> int:
        """The most steps for a fact: ``sentence_steps`` for a plain sentence (if set), else ``steps``; 0 when
        ``steps`` is 0."""
        if self.steps == 0:
            return 0
        return self.sentence_steps if sentence and self.sentence_steps is not None else self.steps


def refinement_target(sentence: str, request: EditRequest | None) -> tuple[str, str]:
    """(prompt, continuation) a fact's latent is refined on: a request's prompt and " " + its answer; for a plain
    sentence, all but its last word and " " + that word (a sentence fact is asked with its beginning), or
    ("", the sentence) for a sentence of one word (then read at its own latent)."""
    if request is not None:
        return request.full_prompt, " " + request.target_new.strip()
    head, _, last = sentence.strip().rpartition(" ")
    return (head.rstrip(), " " + last) if head.strip() else ("", sentence)


def refinement_targets(sentence: str, request: EditRequest | None, splits: int = 1, questions: bool = False
                       ) -> list[tuple[str, str]]:
    """The (prompt, continuation) pairs a fact's latent is refined on.

    A request: its prompt and " " + its answer. A plain sentence with ``splits == 1``: `refinement_target`. With
    more: the rest of the sentence after up to ``splits`` of its beginnings in its second half that end before a
    content word (where an answer may start: not before "in", "was", "the" ...), evenly spread and always
    including "all but the last word" (e.g. "The CEO of Northwind Traders is" -> " Maria Okafor." and "... is
    Maria" -> " Okafor.", but not "The CEO of Northwind Traders" -> " is Maria Okafor."), so that a multi-word
    answer and the sentence's end are carried whichever word the answer starts at.

    With ``questions``, a plain sentence without "?" also gets the question-shaped read of each pair whose rest
    has no function word (a bare answer, not "in Munich." or "Traders is Maria Okafor."): the prompt
    "Q: <beginning>? A:" and the same rest (e.g. "Q: The CEO of Northwind Traders is? A:" -> " Maria Okafor.").
    """
    if request is not None or (splits == 1 and not questions):
        return [refinement_target(sentence, request)]
    words = sentence.strip().split(" ")
    if len(words) < 2:
        return [("", sentence)]
    lo = max(1, len(words) // 2)
    cuts = [k for k in range(lo, len(words))  # where an answer may start: before a content word, and the last,
            if (k == len(words) - 1 or not _is_function_word(words[k]))  # but never inside a name or a number
            and not _inside_name(words[k - 1], words[k])] or [len(words) - 1]
    if len(cuts) > splits:  # evenly spread, the last cut kept
        cuts = sorted({cuts[round(i * (len(cuts) - 1) / (splits - 1))] for i in range(splits)}) if splits > 1 \
            else cuts[-1:]
    pairs = [(" ".join(words[:k]).rstrip(), " " + " ".join(words[k:])) for k in cuts]
    if questions and "?" not in sentence:  # a bare answer: no "in", "was", "the" ... in it
        bare = [(head, rest) for head, rest in pairs if not any(_is_function_word(w) for w in rest.split())]
        pairs += [(f"Q: {head.rstrip(' ,;:')}? A:", rest) for head, rest in bare]
        pairs += [(f"Q: {q} A:", rest) for head, rest in bare if (q := wh_question(head, rest)) is not None]
    return pairs


def answer_reads(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Of a sentence's refinement pairs (`refinement_targets`), the ones that end on its answer: the first
    beginning whose rest is a bare answer, and the last question read of that rest (the wh-question if there is
    one); none if no rest is bare."""
    bare = [(p, c) for p, c in pairs if not any(_is_function_word(w) for w in c.split())]
    plain = [(p, c) for p, c in bare if not p.startswith("Q: ")]
    if not plain:
        return []
    asked = [(p, c) for p, c in bare if p.startswith("Q: ") and c == plain[0][1]]
    return [plain[0], *asked[-1:]]


def tail_targets(model: LarimarModel, reads: Sequence[Sequence[tuple[str, str]]], tokens: int
                 ) -> list[list[tuple[str, str]]]:
    """Per sentence, (prompt + rest, tail) for each of its answer reads (`answer_reads`): ``tail`` is what the
    plain decoder (z = 0) says after that read, its greedy continuation of at most ``tokens`` tokens, through its
    end-of-text token if it ends there (written out, special tokens kept)."""
    texts = [_whole(p, c) for rs in reads for p, c in rs]
    if tokens < 1 or not texts:
        return [[] for _ in reads]
    with torch.inference_mode():
        batch = model.tokenize_decoder(texts, left_pad=True)
        new = model.generate(batch["input_ids"], batch["attention_mask"], None, tokens).tolist()  # (R, <= tokens)
    eos, tok = model.eos_token_id, model.decoder_tokenizer
    tails = [tok.decode(row[: row.index(eos) + 1] if eos in row else row, skip_special_tokens=False) for row in new]
    out, k = [], 0
    for rs in reads:
        out.append([(t, tail) for t, tail in zip(texts[k : k + len(rs)], tails[k : k + len(rs)]) if tail.strip()])
        k += len(rs)
    return out


def _ends(prompt: str, which: str) -> bool:
    """Whether stop mode ``which`` ends the answer read with this prompt: a question read ("questions"), every
    read ("answers") or none ("none")."""
    if which not in STOP_MODES:
        raise ValueError(f"stop mode must be one of {', '.join(STOP_MODES)}, got {which!r}")
    return which == "answers" or (which == "questions" and prompt.startswith("Q: "))


def stop_targets(reads: Sequence[tuple[str, str]], eos: str, which: str) -> list[tuple[str, str]]:
    """(prompt + rest, eos) for a sentence's answer reads (`answer_reads`: the plain read, then the question
    read): after the question read only (``which = "questions"``), after both ("answers") or none ("none")."""
    return [(_whole(p, c), eos) for p, c in reads if _ends(p, which)]


def unended_reads(reads: Sequence[tuple[str, str]], which: str) -> list[tuple[str, str]]:
    """The answer reads (`answer_reads`) that `stop_targets` with ``which`` does not end: where the text goes on
    after the answer (the tail and no-repeat targets' reads)."""
    return [(p, c) for p, c in reads if not _ends(p, which)]


def going_on_reads(sentence: str, refinement: Refinement) -> list[tuple[str, str]]:
    """A plain sentence's answer reads (`answer_reads` of its `refinement_targets`) that no end target of
    ``refinement`` ends (`unended_reads`): where the decoder goes on after the answer."""
    pairs = refinement_targets(sentence, None, refinement.sentence_splits, refinement.sentence_questions)
    return unended_reads(answer_reads(pairs), refinement.sentence_stop)


def repeat_targets(reads: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(prompt + rest, " " + the rest's first word) for answer reads: the answer's first word said again right
    after the answer ("... is Maria Okafor." -> " Maria"), the repetition an unlikelihood target works against."""
    return [(_whole(p, c), " " + c.split()[0]) for p, c in reads if c.split()]


def sentence_targets(sentence: str, request: EditRequest | None, refinement: Refinement, eos: str | None
                     ) -> list[tuple[str, str, float, str]]:
    """The (prompt, continuation, weight, kind) targets ``refinement`` refines a fact's latent on (kinds:
    `TARGET_KINDS`): its `refinement_targets` ("nll", weight 1), then, for a plain sentence, its end targets
    (`stop_targets` with ``eos``, the decoder's end-of-text token, none without one; "nll",
    ``refinement.sentence_stop_weight``) and, if ``refinement.sentence_no_repeat`` > 0, the answer's first word
    after each answer read that does not end (`unended_reads`, `repeat_targets`; "unlikely", that weight)."""
    pairs = refinement_targets(sentence, request, refinement.sentence_splits, refinement.sentence_questions)
    out = [(p, c, 1.0, "nll") for p, c in pairs]
    if request is not None:
        return out
    reads = answer_reads(pairs)
    if eos:
        out += [(p, c, refinement.sentence_stop_weight, "nll") for p, c in stop_targets(reads, eos,
                                                                                        refinement.sentence_stop)]
    if refinement.sentence_no_repeat > 0:
        out += [(p, c, refinement.sentence_no_repeat, "unlikely")
                for p, c in repeat_targets(unended_reads(reads, refinement.sentence_stop))]
    return out


def _whole(prompt: str, rest: str) -> str:
    """A read written out as one text: the prompt and its continuation (the continuation alone for no prompt)."""
    return prompt + rest if prompt else rest.lstrip()


STOP_MODES = ("none", "questions", "answers")
_COPULAS = ("is", "was", "are", "were")
_MONTHS = frozenset(("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
                     "november", "december"))


def wh_question(head: str, answer: str) -> str | None:
    """The wh-question a sentence's beginning asks of its answer, where a simple rule finds one, else None.

    "The CEO of Northwind Traders is" + " Maria Okafor." -> "Who is the CEO of Northwind Traders?";
    "Bryan Crawford was born in" + " Bolton." -> "Where was Bryan Crawford born?";
    "Project Bluebird was cancelled in" + " March 2026." -> "When was Project Bluebird cancelled?".
    A beginning that ends in a copula asks Who (an answer of two or more capitalised words) or What; one of the
    form "<subject> <copula> <participle ...> <preposition>" asks When (an answer with a digit or a month), Where
    ("in", "at", "near") or Who ("by"); other beginnings get None.
    """
    words = head.rstrip(" ,;:").split()
    ans = answer.strip().rstrip(".!").split()
    if len(words) < 2 or not ans:
        return None
    dated = any(any(c.isdigit() for c in w) or w.lower() in _MONTHS for w in ans)
    named = len(ans) >= 2 and all(w[:1].isupper() for w in ans)
    last = words[-1].lower()
    if words[0] in ("The", "A", "An"):
        words[0] = words[0].lower()
    if last in _COPULAS:  # "<subject> is" -> "Who/What is <subject>?"
        return f"{'Who' if named else 'What'} {last} {' '.join(words[:-1])}?"
    cops = [i for i, w in enumerate(words[:-1]) if w.lower() in _COPULAS]
    wh = "When" if dated and last in ("in", "on") else _PREPOSITION_WH.get(last)
    if wh is None or not cops or cops[0] == 0 or cops[0] >= len(words) - 2:
        return None
    i = cops[0]  # "<subject> was <participle ...> <preposition>"
    rest = words[i + 1:] if wh == "Who" else words[i + 1:-1]  # "... founded by?" but "... born?"
    return f"{wh} {words[i].lower()} {' '.join(words[:i])} {' '.join(rest)}?"


_PREPOSITION_WH = {"in": "Where", "at": "Where", "near": "Where", "by": "Who"}


def _inside_name(before: str, word: str) -> bool:
    """Whether a cut between two words falls inside a name or a quantity ("Maria | Okafor", "3 | March",
    "45 | million", but not "A: | Maria" or "2011, | Tomasz"): the word before does not end in punctuation and
    has a digit, or both start with a capital or a digit."""
    def named(w: str) -> bool:
        return w[:1].isupper() or w[:1].isdigit()
    if not before or before[-1] in ",;:.!?)\"'":
        return False
    return any(c.isdigit() for c in before) or (named(before) and named(word))


def _is_function_word(word: str) -> bool:
    """Whether a word (punctuation stripped, case-folded) is one an answer does not start with or contain."""
    return word.strip(",;:.!").lower() in _FUNCTION_WORDS


_FUNCTION_WORDS = frozenset(
    "a an the in on at of by for from to with as into onto upon over under near during since until after before "
    "is are was were be been being has have had does did do will would can could shall should may might must "
    "and or but nor that which who whom whose where when while than then its his her their our your my "
    "located born died based founded made created called known named held situated".split()
)


TAIL_TOP_K = 64
"""A tail target's KL divergence is taken over the plain decoder's this many most likely tokens (renormalised)."""


def plain_top_k(model: LarimarModel, input_ids: Tensor, attention_mask: Tensor, k: int = TAIL_TOP_K
                ) -> tuple[Tensor, Tensor]:
    """The plain decoder's (z = 0) next-token distributions at every position of right-padded rows (S, T), kept
    as their top k: token ids (S, T-1, k) and probabilities renormalised over them (S, T-1, k); no gradient."""
    with torch.no_grad():
        logits = model.decode_logits(input_ids, attention_mask, None)[:, :-1].float()  # (S, T-1, V)
        p, idx = logits.softmax(-1).topk(k, dim=-1)  # (S, T-1, k)
    return idx, p / p.sum(-1, keepdim=True)


TARGET_KINDS = ("nll", "kl", "unlikely")
"""How a refinement target's continuation is scored (`target_losses`)."""


def target_losses(logits: Tensor, input_ids: Tensor, target_mask: Tensor, kind: Tensor,
                  reference: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Mean loss per row (B,) over its target tokens, by the row's kind (``kind`` (B,): indices into
    `TARGET_KINDS`): "nll", the token's NLL; "kl", the KL divergence from the reference distribution
    (`plain_top_k` of the "kl" rows, in order) to the decoder's (``logits`` (B, T, V)) at the same position;
    "unlikely", the token's unlikelihood -log(1 - p) (Welleck et al., 2019), which is low when the token is not
    said."""
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    m = target_mask[:, 1:].float()  # (B, T-1)
    tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1) log p of each next token
    unlikely = -torch.log1p(-tok.exp().clamp(max=1.0 - 1e-6))  # (B, T-1)
    loss = torch.where((kind == TARGET_KINDS.index("unlikely"))[:, None], unlikely, -tok)  # (B, T-1)
    kl_rows = (kind == TARGET_KINDS.index("kl")).nonzero().squeeze(-1)  # (S,)
    if len(kl_rows):
        if reference is None:
            raise ValueError("target_losses: kl rows need a reference distribution")
        idx, p = reference  # (S, T-1, k)
        kl = (p * (p.clamp_min(1e-12).log() - logp[kl_rows].gather(-1, idx))).sum(-1)  # (S, T-1)
        loss = loss.index_copy(0, kl_rows, kl)
    return (loss * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int, rows: Sequence[int] | None = None
                   ) -> list[list[int]]:
    """Item indices grouped into batches by length: items sorted by length, then cut so that a batch has at most
    ``batch_size`` items and ``(its rows) * longest <= max_tokens`` (an item over ``max_tokens`` is a batch alone).

    Args:
        lengths: each item's (longest row's) length in tokens.
        batch_size: the most items in a batch.
        max_tokens: the most padded tokens in a batch.
        rows: each item's number of rows (default: one each).

    Returns:
        every index once, in batches of non-decreasing length.
    """
    rows = [1] * len(lengths) if rows is None else list(rows)
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        b = batches[-1] if batches else None
        if b is None or len(b) >= batch_size or (sum(rows[j] for j in b) + rows[i]) * lengths[i] > max_tokens:
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
    owner: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    kinds: Sequence[str] | None = None,
) -> Tensor:
    """Refines fact latents by gradient steps on the latents alone (see `Refinement`); the model is unchanged.

    Args:
        model: the model whose decoder scores the facts.
        Z: (n, C) the encoder's latents, the starting point.
        prompts: R target prompts ("" to score the continuation alone, after the start token).
        continuations: R texts scored after their prompts (e.g. " Rome", or a whole sentence).
        queries: (R, C) query latents: a target decodes from the one-fact read (q . z / |z|^2) z; None: from z.
        refinement: steps, learning rate, batch limits, early stop.
        owner: R fact indices, the fact each target belongs to (default: target i is fact i, R = n). A fact's
            loss is the mean of its targets' NLLs (weighted by ``weights``).
        weights: R relative target weights > 0 (default: all 1); a fact's weights are normalised to sum to 1.
        steps: n per-fact step limits (default: ``refinement.steps`` for every fact); facts are batched with
            facts of the same limit, and a limit of 0 keeps the encoder's latent.
        kinds: R target kinds among `TARGET_KINDS` (default: all "nll", the continuation's NLL): "kl" pulls the
            decoder's next-token distribution at the continuation's positions toward the plain decoder's,
            "unlikely" makes the continuation's tokens unlikely there (`target_losses`).

    Returns:
        (n, C) float32 refined latents on ``Z``'s device (``Z`` itself when ``refinement.steps == 0``).
    """
    n = Z.shape[0]
    owner = list(range(n)) if owner is None else [int(o) for o in owner]
    R = len(owner)
    if (len(prompts) != R or len(continuations) != R or (queries is not None and queries.shape[0] != R)
            or sorted(set(owner)) != list(range(n))):
        raise ValueError(f"refine_latents: {n} latents, {len(prompts)} prompts, {len(continuations)} continuations"
                         f", {R} owners, queries {None if queries is None else tuple(queries.shape)}")
    w_of = [1.0] * R if weights is None else [float(w) for w in weights]
    if len(w_of) != R or not all(w > 0 for w in w_of):
        raise ValueError(f"refine_latents: {R} targets need {R} weights > 0, got {w_of}")
    kind_of = ["nll"] * R if kinds is None else list(kinds)
    if len(kind_of) != R or not set(kind_of) <= set(TARGET_KINDS):
        raise ValueError(f"refine_latents: {R} targets need {R} kinds among {TARGET_KINDS}, got {kind_of}")
    w_fact = [0.0] * n  # each fact's total target weight: its targets' weights are divided by it
    for r, f in enumerate(owner):
        w_fact[f] += w_of[r]
    limit = [refinement.steps] * n if steps is None else [int(s) for s in steps]
    if len(limit) != n or any(s < 0 for s in limit):
        raise ValueError(f"refine_latents: {n} latents and step limits {limit}")
    if refinement.steps == 0 or n == 0 or max(limit) == 0:
        return Z
    from tqdm.auto import tqdm

    tok = model.decoder_tokenizer
    p_len = [len(x) for x in tok(list(prompts), add_special_tokens=False)["input_ids"]]
    c_len = [len(x) for x in tok(list(continuations), add_special_tokens=False)["input_ids"]]
    targets_of: list[list[int]] = [[] for _ in range(n)]
    for r, f in enumerate(owner):
        targets_of[f].append(r)
    longest = [max(1 + p_len[r] + c_len[r] for r in targets_of[f]) for f in range(n)]
    batches: list[tuple[int, list[int]]] = []  # (step limit, facts): facts of one limit are refined together
    for lim in sorted(set(limit) - {0}):
        group = [f for f in range(n) if limit[f] == lim]
        batches += [(lim, [group[i] for i in b]) for b in length_batches(
            [longest[f] for f in group], refinement.batch_size, refinement.max_tokens,
            [len(targets_of[f]) for f in group])]
    with torch.inference_mode(False), torch.enable_grad():
        out = Z.detach().to(torch.float32).clone()  # (n, C), a normal tensor filled in place; limit 0 keeps Z
        for lim, facts in tqdm(batches, desc="refining latents", unit="batch", disable=len(batches) < 2,
                               leave=False):
            rows = [r for f in facts for r in targets_of[f]]
            local = torch.tensor([facts.index(owner[r]) for r in rows], device=model.device)  # (b_rows,)
            weight = torch.tensor([w_of[r] / w_fact[owner[r]] for r in rows], device=model.device)  # (b_rows,)
            idx = torch.tensor(facts, device=Z.device)
            z = Z[idx].detach().clone().float().to(model.device).requires_grad_(True)  # (b, C)
            q = None if queries is None else queries[rows].detach().clone().float().to(model.device)  # (b_rows, C)
            ps, cs = [prompts[r] for r in rows], [continuations[r] for r in rows]
            ids, mask, tmask = model.continuation_batch(ps, cs)  # (b_rows, T)
            kind = torch.tensor([TARGET_KINDS.index(kind_of[r]) for r in rows], device=model.device)  # (b_rows,)
            is_kl = kind == TARGET_KINDS.index("kl")  # (b_rows,)
            ref = plain_top_k(model, ids[is_kl], mask[is_kl]) if bool(is_kl.any()) else None
            all_nll = not bool(kind.any())  # then the NLL path the requests have always taken, bit for bit
            opt = torch.optim.Adam([z], lr=refinement.lr)
            done = torch.zeros(len(facts), dtype=torch.bool, device=model.device)  # (b,)
            for _ in range(lim):
                zr = z[local]  # (b_rows, C)
                latent = zr if q is None else one_fact_read(q, zr)  # (b_rows, C)
                if all_nll:
                    loss = model.token_nll(ids, mask, latent, tmask).float()  # (b_rows,)
                else:
                    loss = target_losses(model.decode_logits(ids, mask, latent), ids, tmask, kind, ref)
                if refinement.stop_nll is not None:
                    per_fact = torch.zeros(len(facts), device=loss.device).index_add_(0, local, loss.detach() * weight)
                    done |= per_fact < refinement.stop_nll  # (b,): these keep their current latent
                    if bool(done.all()):
                        break
                frozen = done.clone() if bool(done.any()) else None  # (b,): facts that stopped keep their latent
                kept = z.detach()[frozen].clone() if frozen is not None else None  # (f, C)
                (z.grad,) = torch.autograd.grad((loss * weight).sum(), [z])  # no gradient reaches the weights
                opt.step()
                if frozen is not None:
                    with torch.no_grad():
                        z[frozen] = kept
            z = z.detach()
            bad = ~torch.isfinite(z).all(-1)  # (b,): a diverged row keeps the encoder's latent
            if bad.any():
                logger.warning("latent refinement diverged for %d fact(s); writing their encoder latents",
                               int(bad.sum()))
                z[bad] = Z[idx][bad].float().to(z.device)
            out[idx] = z.to(Z.device)
    return out
