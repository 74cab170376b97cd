"""Facts: what a user writes into memory, in one place.

    EditRequest        a fact in the field's vocabulary (ROME / EasyEdit): template, subject, new target, and the
                       prompts a benchmark asks it with
    as_fact            the one fact parser: a sentence, an `EditRequest` or a dict -> (sentence, request or None)
    check_text         the one text check (non-blank string, no NUL, at most ``max_chars`` characters)
    split_sentences    the one sentence splitter (rule based, no model)

Every surface (the Python API, the command line, the HTTP service, the benchmark loaders) parses facts here, so a
fact that one accepts, all accept.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_TEXT_CHARS = 4000
"""The longest fact or prompt accepted (characters), everywhere."""

MAX_ID_CHARS = 128
"""The longest fact id accepted (characters)."""

@dataclass
class EditRequest:
    """One fact to write, in the field's vocabulary (ROME / EasyEdit).

    Attributes:
        prompt: template with ``{}`` where the subject goes, e.g. ``"The capital of {} is"``.
        subject: the subject, e.g. ``"France"``.
        target_new: the new object, e.g. ``"Rome"`` (no leading space).
        target_true: the object the unedited model knows, if any.
        paraphrase_prompts: rephrasings of the full prompt (subject filled in).
        neighborhood_prompts: prompts the edit must NOT change (other subjects, or unrelated questions
            for ZsRE). Their expected answers are in ``neighborhood_answers``.
        case_id: the record id in its source file (the record's index when the file has no id).
        neighborhood_answers: the expected answer of each neighbourhood prompt, same length as
            ``neighborhood_prompts`` (CounterFact ROME: ``target_true`` for each; ZsRE: ``loc_ans``;
            EasyEdit: ``locality_ground_truth``). Empty when the source gives none.
        generation_prompts: free-generation prompts (CounterFact ROME only).
        target_true_aliases: every accepted true answer (ZsRE ``answers``, KnowEdit ``ground_truth``);
            ``target_true`` is the first.
        portability: the record's ``portability`` dict as found (EasyEdit/KnowEdit), else empty.
        source_format: the format it was read from (one of :data:`FORMATS`), None if built by hand.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    case_id: int | str | None = None
    neighborhood_answers: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    target_true_aliases: list[str] = field(default_factory=list)
    portability: dict[str, Any] = field(default_factory=dict)
    source_format: str | None = None

    @property
    def full_prompt(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @property
    def sentence(self) -> str:
        """The fact as one sentence: prompt with subject, a space, the new target."""
        return f"{self.full_prompt} {self.target_new}"



def template_problem(template: Any) -> str | None:
    """Why ``template`` is not a valid subject template, or None when it is.

    A valid template is a non-empty string with exactly one ``{}`` field (no name, conversion or
    format spec) and only escaped literal braces, so ``template.format(subject)`` works.
    """
    if not isinstance(template, str) or not template.strip():
        return "expected a non-empty string template with one '{}'"
    try:
        fields = [(name, conv, spec) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        return f"unbalanced braces in template {template!r} ({exc})"
    if len(fields) != 1:
        return f"expected '{{}}' exactly once in template {template!r}, found {len(fields)} fields"
    name, conv, spec = fields[0]
    if name != "" or conv is not None or spec:
        return f"expected a bare '{{}}' in template {template!r}"
    return None


def validate_request(request: EditRequest) -> list[tuple[str, str]]:
    """Check an :class:`EditRequest`'s values.

    Args:
        request: the request to check.

    Returns:
        ``(field, message)`` for each problem; empty when valid.
    """
    problems: list[tuple[str, str]] = []
    problem = template_problem(request.prompt)
    if problem:
        problems.append(("prompt", problem))
    for name in ("subject", "target_new"):
        value = getattr(request, name)
        if not isinstance(value, str) or not value.strip():
            problems.append((name, "expected a non-empty string"))
    true = request.target_true
    if true is not None and (not isinstance(true, str) or not true.strip()):
        problems.append(("target_true", "expected a non-empty string or None"))
    for name in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers", "generation_prompts",
                 "target_true_aliases"):
        value = getattr(request, name)
        if not isinstance(value, list):
            problems.append((name, "expected a list of strings"))
            continue
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                problems.append((f"{name}[{i}]", "expected a non-empty string"))
    if request.neighborhood_answers and len(request.neighborhood_answers) != len(request.neighborhood_prompts):
        problems.append(("neighborhood_answers", f"expected {len(request.neighborhood_prompts)} answers (one per "
                         f"neighborhood prompt), got {len(request.neighborhood_answers)}"))
    return problems



def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def make_template(filled_prompt: str, subject: str) -> str:
    """Turn a prompt with the subject written in into a template with ``{}``.

    The FIRST occurrence of ``subject`` is replaced; literal braces elsewhere are escaped.

    Args:
        filled_prompt: e.g. ``"The mother tongue of Danielle Darrieux is"``.
        subject: e.g. ``"Danielle Darrieux"``.

    Returns:
        e.g. ``"The mother tongue of {} is"``.

    Raises:
        ValueError: the subject does not occur in the prompt.
    """
    i = filled_prompt.find(subject)
    if not subject or i < 0:
        raise ValueError(f"subject {subject!r} not found in prompt {filled_prompt!r}")
    return _escape_braces(filled_prompt[:i]) + "{}" + _escape_braces(filled_prompt[i + len(subject):])


# Split after . ! ? (and closing quotes/brackets) followed by space and an upper-case letter, digit or
# quote; not after a lone initial ("J. Smith") or a common abbreviation ("St. Louis", "Dr. Who").
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "mt", "ft", "no", "vs", "etc", "prof", "gen", "col",
                  "lt", "sgt", "capt", "rev", "hon", "inc", "ltd", "co", "corp", "jan", "feb", "aug", "sept",
                  "oct", "nov", "dec", "u.s", "e.g", "i.e", "approx"}


def split_sentences(text: str) -> list[str]:
    """Split a query into sentences (a light rule-based splitter, no model).

    Args:
        text: e.g. ``"Hybrid vehicles. Laurent Cars found employment in"``.

    Returns:
        the non-empty sentences, stripped, in order (``[text.strip()]`` when there is one).
    """
    sentences: list[str] = []
    for line in text.splitlines():  # a line break always ends a sentence
        start = 0
        for match in _SENTENCE_END.finditer(line):
            candidate = line[start:match.start()].rstrip("\"')]")
            last_word = candidate.rsplit(None, 1)[-1] if candidate.split() else ""
            stem = last_word.rstrip(".!?").lower()
            if last_word.endswith(".") and (len(stem) == 1 or stem in _ABBREVIATIONS):
                continue  # "J. Smith", "St. Louis": not a sentence end
            sentences.append(line[start:match.start()])
            start = match.end()
        sentences.append(line[start:])
    return [s.strip() for s in sentences if s.strip()] or [text.strip()]


FactLike = str | EditRequest | Mapping[str, Any]
"""What `as_fact` accepts."""


def check_text(text: object, what: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Returns ``text`` if it is a non-blank string without NUL of at most ``max_chars`` characters.

    Raises:
        ValueError: naming ``what`` and what was expected.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} must not be empty")
    if len(text) > max_chars:
        raise ValueError(f"{what} must be at most {max_chars} characters, got {len(text)}")
    if "\x00" in text:
        raise ValueError(f"{what} must not contain NUL characters")
    return text


def fact_sentence(fact: FactLike, max_chars: int = MAX_TEXT_CHARS) -> str:
    """The sentence written for a fact: a sentence as is, or ``prompt.format(subject) + " " + target_new``.

    Args:
        fact: a sentence, an `EditRequest`, or a dict ``{prompt, subject, target_new}`` (target_new may be
            CounterFact's ``{"str": ...}``) or ``{"text": sentence}``.
        max_chars: the longest sentence accepted.

    Raises:
        ValueError: an empty / non-string value, a template without exactly one ``{}``, a too long sentence.
    """
    return as_fact(fact, max_chars)[0]


def as_fact(fact: FactLike, max_chars: int = MAX_TEXT_CHARS) -> tuple[str, EditRequest | None]:
    """The sentence written for a fact (see `fact_sentence`) and its request (None for a plain sentence).

    Raises:
        ValueError: as `fact_sentence`.
    """
    if isinstance(fact, str):
        return check_text(fact, "a fact", max_chars), None
    if isinstance(fact, EditRequest):
        problems = validate_request(fact)
        if problems:
            raise ValueError("invalid edit request: " + "; ".join(f"{f}: {m}" for f, m in problems))
        return check_text(fact.sentence, "a fact", max_chars), fact
    if isinstance(fact, Mapping):
        if set(fact) >= {"prompt", "subject", "target_new"}:
            target = fact["target_new"]
            if isinstance(target, Mapping):
                target = target.get("str")
            for name, value in (("prompt", fact["prompt"]), ("subject", fact["subject"]), ("target_new", target)):
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"edit request field {name!r} must be a non-empty string, got {value!r}")
            problem = template_problem(fact["prompt"])
            if problem:
                raise ValueError(f"edit request field 'prompt': {problem}")
            req = EditRequest(prompt=fact["prompt"], subject=fact["subject"], target_new=target.strip())
            return check_text(req.sentence, "a fact", max_chars), req
        if set(fact) >= {"text"}:
            return check_text(fact["text"], "a fact", max_chars), None
        raise ValueError(f"a fact dict must have keys prompt, subject, target_new (or text), got {sorted(fact)}")
    raise ValueError(f"a fact must be a sentence, an EditRequest or a dict, got {type(fact).__name__}")


def as_list(items: Any, what: str) -> list[Any]:
    """``items`` as a non-empty list (a single fact, string or dict becomes a list of one).

    Raises:
        ValueError: not a string or a sequence, or empty.
    """
    if isinstance(items, (str, EditRequest, Mapping)):
        return [items]
    if not isinstance(items, Sequence):
        raise ValueError(f"{what} must be a string or a list, got {type(items).__name__}")
    items = list(items)
    if not items:
        raise ValueError(f"{what} must not be empty")
    return items


def check_ids(ids: Any, n: int, taken: Mapping[str, Any]) -> list[str]:
    """``n`` new fact ids: unique non-empty strings of at most `MAX_ID_CHARS` characters, none in ``taken``.

    Raises:
        ValueError: what is wrong with them.
    """
    ids = as_list(ids, "ids")
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} facts")
    for i in ids:
        if not isinstance(i, str) or not i.strip() or len(i) > MAX_ID_CHARS:
            raise ValueError(f"ids must be non-empty strings of at most {MAX_ID_CHARS} characters, got {i!r}")
    if len(set(ids)) != n:
        raise ValueError("ids must be unique")
    used = [i for i in ids if i in taken]
    if used:
        raise ValueError(f"ids already in memory (forget them first): {used[:5]}")
    return ids
