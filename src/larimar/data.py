"""Datasets: text blocks for training and knowledge-editing benchmarks.

Knowledge editing (everything maps onto :class:`EditRequest`):

    load_counterfact(path)   CounterFact, ROME format (``requested_rewrite``), EasyEdit format
                             (``prompt, rephrase_prompt, locality_prompt``) or KnowEdit format.
    load_zsre(path)          ZsRE, MEND format (``src, alt, answers, rephrase, loc, loc_ans``) or
                             KnowEdit format (``prompt, target_new, ground_truth[], locality{...}``).
    load_edits(path)         any of the four formats.

    The format is detected per file from its first record (``format=`` overrides). Malformed records are
    skipped and reported as :class:`RecordError` (index, field, message); the others still load::

        result = load_counterfact("../shared/data/counterfact_rome/counterfact_rome_929.json")
        for request in result.records: ...
        for error in result.errors: print(error.index, error.field, error.message)

    Choices, so that numbers stay comparable with EasyEdit:
      * ZsRE MEND: target_new = ``alt``, target_true = ``answers[0]`` (all of ``answers`` in
        ``target_true_aliases``), paraphrase = ``rephrase``, locality prompt = ``loc`` kept as is
        (with its ``"nq question: "`` prefix, as EasyEdit does) with answer ``loc_ans``.
        The template is ``src`` with the first occurrence of ``subject`` replaced by ``{}``.
      * Filled-in prompts (EasyEdit, KnowEdit, MEND) become templates the same way; a subject that is
        not in its prompt is a record error. Literal braces in the text are escaped (``{{`` / ``}}``).
      * ``limit`` takes the first ``limit`` records of the file (errors among them included), so
        "the first 2000 records" means the same cases whichever records are malformed.

Training text:

    iter_wikipedia_texts(path)        paragraphs of a JSONL ``{"id", "title", "text"}`` file, streamed.
    iter_text_blocks(texts, tok)      word chunks of at most ``block_tokens`` decoder tokens, as
                                      :class:`TextBlock` (text, ids).
    iter_blocks(texts, tok)           the same, token ids only.
    iter_episodes(blocks, 16)         consecutive groups of ``episode_size`` blocks.
    read_wikitext(path)               WikiText-103 ``wiki.*.tokens`` as one string.

    Block choice: a block is a run of whole words from ONE paragraph (blocks never cross a paragraph
    boundary, never split a word) whose decoder tokenization has at most ``block_tokens`` tokens. Each
    block is therefore a text string that both the encoder and the decoder tokenize themselves (no
    decoding of token ids back to text). Blocks have variable length (<= block_tokens); the collate
    function pads. A paragraph's last chunk is dropped when shorter than ``min_tokens``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from larimar.facts import (
    EditRequest,
    make_template,
    split_sentences,
    template_problem,
    validate_request,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

FORMATS = ("counterfact_rome", "counterfact_easyedit", "zsre_mend", "knowedit")
"""Record formats the loaders read (see the module docstring)."""

_COUNTERFACT_FORMATS = ("counterfact_rome", "counterfact_easyedit", "knowedit")
_ZSRE_FORMATS = ("zsre_mend", "knowedit")


@dataclass(frozen=True)
class RecordError:
    """A malformed record: where it is and what is wrong.

    Attributes:
        index: position of the record in the file (0-based).
        field: the offending field, dotted / indexed (e.g. ``"requested_rewrite.target_new.str"``).
        message: what was expected.
    """

    index: int
    field: str
    message: str


@dataclass
class LoadResult:
    """Records that loaded, and the errors of those that did not.

    Attributes:
        records: the valid records, in file order.
        errors: one entry per problem found (a record may have several); such records are skipped.
        format: the format the file was read as.
        path: the file read.
    """

    records: list[EditRequest]
    errors: list[RecordError] = field(default_factory=list)
    format: str | None = None
    path: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[EditRequest]:
        return iter(self.records)


class _RecordInvalid(Exception):
    """Internal: collects the problems of one record."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__(problems)
        self.problems = problems


# --------------------------------------------------------------------------------------------------
# validation helpers


def _get(record: dict, key: str, path: str | None = None) -> Any:
    if key not in record:
        raise _RecordInvalid([(path or key, "missing")])
    return record[key]


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _RecordInvalid([(path, f"expected a non-empty string, got {_short(value)}")])
    return value


def _str_list(value: Any, path: str) -> list[str]:
    if isinstance(value, str):  # a single prompt where a list is usual
        value = [value]
    if not isinstance(value, list):
        raise _RecordInvalid([(path, f"expected a list of strings, got {_short(value)}")])
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _RecordInvalid([(f"{path}[{i}]", f"expected a non-empty string, got {_short(item)}")])
    return list(value)


def _first_str(value: Any, path: str) -> str:
    """First string of a str / list[str] / list[list[str]] answer field."""
    while isinstance(value, list) and value:
        value = value[0]
    return _str(value, path)


def _all_str(value: Any, path: str) -> list[str]:
    """Every string of a str / list[str] / list[list[str]] answer field, flattened, in order."""
    if isinstance(value, str):
        return [_str(value, path)]
    if not isinstance(value, list) or not value:
        raise _RecordInvalid([(path, f"expected a string or a non-empty list of strings, got {_short(value)}")])
    out: list[str] = []
    for i, item in enumerate(value):
        out.extend(_all_str(item, f"{path}[{i}]"))
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _template(filled_prompt: str, subject: str, path: str) -> str:
    try:
        return make_template(filled_prompt, subject)
    except ValueError as exc:
        raise _RecordInvalid([(path, str(exc))]) from None


# --------------------------------------------------------------------------------------------------
# per-format record parsers: dict -> EditRequest (raise _RecordInvalid)


def _parse_counterfact_rome(record: dict, index: int) -> EditRequest:
    rewrite = _get(record, "requested_rewrite")
    if not isinstance(rewrite, dict):
        raise _RecordInvalid([("requested_rewrite", "expected an object")])
    prompt = _str(_get(rewrite, "prompt", "requested_rewrite.prompt"), "requested_rewrite.prompt")
    problem = template_problem(prompt)
    if problem:
        raise _RecordInvalid([("requested_rewrite.prompt", problem)])
    subject = _str(_get(rewrite, "subject", "requested_rewrite.subject"), "requested_rewrite.subject")
    targets = {}
    for key in ("target_new", "target_true"):
        value = _get(rewrite, key, f"requested_rewrite.{key}")
        if isinstance(value, dict):
            targets[key] = _str(_get(value, "str", f"requested_rewrite.{key}.str"), f"requested_rewrite.{key}.str")
        else:
            targets[key] = _str(value, f"requested_rewrite.{key}")  # tolerate a bare string
    neighborhood = _str_list(record.get("neighborhood_prompts", []), "neighborhood_prompts")
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=targets["target_new"],
        target_true=targets["target_true"],
        paraphrase_prompts=_str_list(record.get("paraphrase_prompts", []), "paraphrase_prompts"),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=[targets["target_true"]] * len(neighborhood),
        generation_prompts=_str_list(record.get("generation_prompts", []), "generation_prompts"),
        target_true_aliases=[targets["target_true"]],
        case_id=record.get("case_id", index),
        portability=record.get("portability") if isinstance(record.get("portability"), dict) else {},
        source_format="counterfact_rome",
    )


def _parse_counterfact_easyedit(record: dict, index: int) -> EditRequest:
    subject = _str(_get(record, "subject"), "subject")
    prompt = _template(_str(_get(record, "prompt"), "prompt"), subject, "prompt")
    target_true = _str(_get(record, "ground_truth"), "ground_truth")
    neighborhood, answers = [], []
    if "locality_prompt" in record:
        neighborhood = [_str(record["locality_prompt"], "locality_prompt")]
        answers = [_str(_get(record, "locality_ground_truth"), "locality_ground_truth")]
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=_str(_get(record, "target_new"), "target_new"),
        target_true=target_true,
        paraphrase_prompts=_str_list(record.get("rephrase_prompt", []), "rephrase_prompt"),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=answers,
        target_true_aliases=[target_true],
        case_id=record.get("case_id", index),
        source_format="counterfact_easyedit",
    )


def _parse_zsre_mend(record: dict, index: int) -> EditRequest:
    subject = _str(_get(record, "subject"), "subject")
    prompt = _template(_str(_get(record, "src"), "src"), subject, "src")
    answers = _str_list(_get(record, "answers"), "answers")
    if not answers:
        raise _RecordInvalid([("answers", "expected at least one answer")])
    neighborhood, loc_answers = [], []
    if "loc" in record:  # EasyEdit keeps "nq question: ..." as is; so do we
        neighborhood = [_str(record["loc"], "loc")]
        loc_answers = [_str(_get(record, "loc_ans"), "loc_ans")]
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=_str(_get(record, "alt"), "alt"),
        target_true=answers[0],
        paraphrase_prompts=_str_list(record.get("rephrase", []), "rephrase"),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=loc_answers,
        target_true_aliases=answers,
        case_id=record.get("case_id", index),
        portability=record.get("portability") if isinstance(record.get("portability"), dict) else {},
        source_format="zsre_mend",
    )


def _parse_knowedit(record: dict, index: int) -> EditRequest:
    subject = _str(_get(record, "subject"), "subject")
    prompt = _template(_str(_get(record, "prompt"), "prompt"), subject, "prompt")
    aliases = _all_str(_get(record, "ground_truth"), "ground_truth")
    neighborhood: list[str] = []
    answers: list[str] = []
    locality = record.get("locality", {})
    if not isinstance(locality, dict):
        raise _RecordInvalid([("locality", "expected an object of {kind: [{prompt, ground_truth}]}")])
    for kind, items in locality.items():
        if isinstance(items, dict):  # a single {prompt, ground_truth}
            items = [items]
        if not isinstance(items, list):
            raise _RecordInvalid([(f"locality.{kind}", "expected a list of {prompt, ground_truth}")])
        for i, item in enumerate(items):
            path = f"locality.{kind}[{i}]"
            if not isinstance(item, dict):
                raise _RecordInvalid([(path, "expected an object {prompt, ground_truth}")])
            prompts = _str_list(_get(item, "prompt", f"{path}.prompt"), f"{path}.prompt")
            truth = _get(item, "ground_truth", f"{path}.ground_truth")
            if len(prompts) > 1:  # parallel lists: one answer (or alias list) per prompt
                if not isinstance(truth, list) or len(truth) != len(prompts):
                    raise _RecordInvalid([(f"{path}.ground_truth", f"expected {len(prompts)} answers")])
                answers.extend(_first_str(t, f"{path}.ground_truth[{j}]") for j, t in enumerate(truth))
            else:  # one prompt; a list of answers are its aliases
                answers.append(_first_str(truth, f"{path}.ground_truth"))
            neighborhood.extend(prompts)
    portability = record.get("portability", {})
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=_first_str(_get(record, "target_new"), "target_new"),
        target_true=aliases[0],
        paraphrase_prompts=_str_list(record.get("rephrase_prompt", []), "rephrase_prompt"),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=answers,
        target_true_aliases=aliases,
        case_id=record.get("case_id", index),
        portability=portability if isinstance(portability, dict) else {},
        source_format="knowedit",
    )


_PARSERS: dict[str, Callable[[dict, int], EditRequest]] = {
    "counterfact_rome": _parse_counterfact_rome,
    "counterfact_easyedit": _parse_counterfact_easyedit,
    "zsre_mend": _parse_zsre_mend,
    "knowedit": _parse_knowedit,
}


def detect_format(record: dict) -> str | None:
    """Guess a record's format from its keys.

    Args:
        record: one JSON record.

    Returns:
        one of :data:`FORMATS`, or None when none fits.
    """
    if "requested_rewrite" in record:
        return "counterfact_rome"
    if "src" in record and "alt" in record:
        return "zsre_mend"
    if "prompt" in record and "target_new" in record:
        if "locality_prompt" in record or ("locality" not in record and isinstance(record.get("ground_truth"), str)
                                            and isinstance(record.get("rephrase_prompt"), str)):
            return "counterfact_easyedit"
        if "ground_truth" in record:
            return "knowedit"
    return None


# --------------------------------------------------------------------------------------------------
# public loaders


def _read_json_list(path: str | Path) -> list:
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: expected a JSON list of records, but the file is not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: expected a UTF-8 JSON list of records ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
    return data


def load_edits(path: str | Path, limit: int | None = None, format: str | None = None,
               allowed_formats: Sequence[str] = FORMATS) -> LoadResult:
    """Load knowledge-editing records of any supported format.

    Args:
        path: a JSON file holding a list of records.
        limit: read only the first ``limit`` records of the file (None: all).
        format: one of :data:`FORMATS`; None detects it from the file's first record.
        allowed_formats: formats accepted (the dataset-specific loaders narrow it).

    Returns:
        the valid records and the errors of the malformed ones.

    Raises:
        ValueError: the file is not a JSON list, the format is unknown / not allowed or cannot be detected.
        FileNotFoundError: the file does not exist.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit: expected None or an integer >= 0, got {limit}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS} or None, got {format!r}")
    data = _read_json_list(path)
    if limit is not None:
        data = data[:limit]
    if format is None:
        first = next((r for r in data if isinstance(r, dict)), None)
        format = detect_format(first) if first is not None else None
        if format is None and data:
            raise ValueError(f"{path}: could not detect the record format from the first record (expected one of "
                             f"{tuple(allowed_formats)}); pass format=")
    if format is not None and format not in allowed_formats:
        raise ValueError(f"{path}: expected a file in format {tuple(allowed_formats)}, found {format!r}")
    parse = _PARSERS[format] if format is not None else None
    records: list[EditRequest] = []
    errors: list[RecordError] = []
    for index, record in enumerate(data):
        try:
            if not isinstance(record, dict):
                raise _RecordInvalid([("<record>", f"expected a JSON object, got {type(record).__name__}")])
            assert parse is not None
            request = parse(record, index)
            problems = validate_request(request)
            if problems:
                raise _RecordInvalid(problems)
        except _RecordInvalid as exc:
            errors.extend(RecordError(index, f, m) for f, m in exc.problems)
            continue
        records.append(request)
    if errors:
        bad = len({e.index for e in errors})
        shown = "; ".join(f"#{e.index} {e.field}: {e.message}" for e in errors[:5])
        logger.warning("%s: skipped %d of %d records (%s%s)", path, bad, len(data), shown,
                       "; ..." if len(errors) > 5 else "")
    return LoadResult(records=records, errors=errors, format=format, path=str(path))


def load_counterfact(path: str | Path, limit: int | None = None, format: str | None = None) -> LoadResult:
    """Load CounterFact (ROME, EasyEdit or KnowEdit format; detected per file).

    Args:
        path: e.g. ``../shared/data/counterfact_rome/counterfact_rome_929.json``.
        limit: read only the first ``limit`` records of the file.
        format: ``"counterfact_rome"``, ``"counterfact_easyedit"`` or ``"knowedit"``; None detects.

    Returns:
        the valid records (as :class:`EditRequest`) and the malformed ones' errors.

    Raises:
        ValueError: not a JSON list, or not a CounterFact format.
    """
    return load_edits(path, limit=limit, format=format, allowed_formats=_COUNTERFACT_FORMATS)


def load_zsre(path: str | Path, limit: int | None = None, format: str | None = None) -> LoadResult:
    """Load ZsRE (MEND or KnowEdit format; detected per file).

    Args:
        path: e.g. ``../shared/data/zsre/zsre_mend_eval_800.json``.
        limit: read only the first ``limit`` records of the file.
        format: ``"zsre_mend"`` or ``"knowedit"``; None detects.

    Returns:
        the valid records (as :class:`EditRequest`) and the malformed ones' errors.

    Raises:
        ValueError: not a JSON list, or not a ZsRE format.
    """
    return load_edits(path, limit=limit, format=format, allowed_formats=_ZSRE_FORMATS)


# --------------------------------------------------------------------------------------------------
# training text


class TextBlock(NamedTuple):
    """One training block: its text (for the encoder) and its decoder token ids."""

    text: str
    ids: list[int]


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """The values of a JSON-lines file, blank lines skipped: (line number, value, None), or (line number, None,
    why the line is not JSON), so that a caller can stop at a bad line or collect every problem.

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSON-lines file at {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield lineno, None, f"{exc.msg} at column {exc.colno}"


def iter_wikipedia_texts(path: str | Path) -> Iterator[str]:
    """Stream the paragraphs of a Wikipedia JSONL file (one article ``{"id", "title", "text"}`` a line).

    Args:
        path: e.g. ``../shared/data/wikipedia_en/enwiki_2018_train.jsonl``.

    Yields:
        each non-empty paragraph (``text`` split on newlines), article after article.

    Raises:
        ValueError: a line is not JSON or has no string ``text`` (names the path and line number).
    """
    for lineno, article, bad in iter_json_lines(path):
        if bad is not None:
            raise ValueError(f"{path}:{lineno}: expected one JSON object per line ({bad})")
        text = article.get("text") if isinstance(article, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field")
        for paragraph in text.split("\n"):
            paragraph = paragraph.strip()
            if paragraph:
                yield paragraph


def iter_sentences(paragraphs: Iterable[str]) -> Iterator[str]:
    """Split paragraphs into sentences with `larimar.facts.split_sentences` (the one sentence splitter)."""
    for paragraph in paragraphs:
        if paragraph.strip():
            yield from split_sentences(paragraph)


def _encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (a HF tokenizer or any callable alike)."""
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def iter_text_blocks(texts: Iterable[str], tokenizer: Any, block_tokens: int = 64,
                     min_tokens: int = 8) -> Iterator[TextBlock]:
    """Split paragraphs into word chunks of at most ``block_tokens`` decoder tokens.

    Greedy per paragraph: words are added while the chunk's token count (estimated from per-word
    counts, then checked by tokenizing the chunk itself) stays <= ``block_tokens``. Blocks never cross
    paragraphs and never split words; a word longer than ``block_tokens`` tokens on its own is skipped.
    Streaming: one paragraph in memory at a time.

    Args:
        texts: paragraphs (e.g. :func:`iter_wikipedia_texts`).
        tokenizer: the decoder's HF tokenizer (called as ``tokenizer(list, add_special_tokens=False)``).
        block_tokens: the maximum tokens per block.
        min_tokens: a paragraph's chunk with fewer tokens is dropped (short stubs, tails).

    Yields:
        :class:`TextBlock` (text, ids) with ``min_tokens <= len(ids) <= block_tokens``; ``ids`` is the
        tokenization of ``text`` without special tokens.
    """
    if block_tokens < 1 or min_tokens > block_tokens:
        raise ValueError(f"expected 1 <= block_tokens and min_tokens <= block_tokens, got {block_tokens}, {min_tokens}")
    for paragraph in texts:
        words = paragraph.split()
        if not words:
            continue
        counts = [len(ids) for ids in _encode_many(tokenizer, [words[0]] + [" " + w for w in words[1:]])]
        chunks: list[list[str]] = []
        gap_after: list[bool] = []  # a skipped word follows chunk i: words must not move across it
        current: list[str] = []
        used = 0
        for word, n in zip(words, counts):
            if n > block_tokens:
                logger.debug("skipping a word of %d tokens (> block_tokens=%d)", n, block_tokens)
                if current:
                    chunks.append(current)
                    gap_after.append(True)
                current, used = [], 0
                continue
            if current and used + n > block_tokens:
                chunks.append(current)
                gap_after.append(False)
                current, used = [], 0
            current.append(word)
            used += n
        if current:
            chunks.append(current)
            gap_after.append(False)
        encoded: list[list[int] | None] = list(_encode_many(tokenizer, [" ".join(c) for c in chunks]))
        i = 0
        while i < len(chunks):  # in order; a chunk the estimate over-filled hands its last word on
            ids = encoded[i]
            if ids is None:
                ids = encoded[i] = _encode_many(tokenizer, [" ".join(chunks[i])])[0]
            if len(ids) <= block_tokens:
                if len(ids) >= min_tokens:
                    yield TextBlock(" ".join(chunks[i]), list(ids))
                i += 1
            elif len(chunks[i]) == 1:
                logger.debug("skipping a word of %d tokens (> block_tokens=%d)", len(ids), block_tokens)
                i += 1
            else:
                if i + 1 == len(chunks) or gap_after[i]:
                    chunks.insert(i + 1, [])
                    encoded.insert(i + 1, None)
                    gap_after.insert(i + 1, gap_after[i])
                    gap_after[i] = False
                chunks[i + 1].insert(0, chunks[i].pop())
                encoded[i] = encoded[i + 1] = None


def iter_blocks(texts: Iterable[str], tokenizer: Any, block_tokens: int = 64,
                min_tokens: int = 8) -> Iterator[list[int]]:
    """Token-id blocks of :func:`iter_text_blocks` (see it for the packing rule).

    Args:
        texts: paragraphs.
        tokenizer: the decoder's HF tokenizer.
        block_tokens: the maximum tokens per block.
        min_tokens: shorter chunks are dropped.

    Yields:
        token ids, ``min_tokens <= len <= block_tokens``.
    """
    for block in iter_text_blocks(texts, tokenizer, block_tokens=block_tokens, min_tokens=min_tokens):
        yield block.ids


def iter_episodes(blocks: Iterable[T], episode_size: int = 16, drop_last: bool = True) -> Iterator[list[T]]:
    """Group consecutive blocks into episodes (the N items written to one memory).

    Args:
        blocks: token-id lists, :class:`TextBlock` or anything.
        episode_size: blocks per episode (E; the paper uses 16).
        drop_last: drop a final incomplete episode.

    Yields:
        lists of ``episode_size`` blocks (the last may be shorter when ``drop_last`` is False).
    """
    if episode_size < 1:
        raise ValueError(f"episode_size: expected >= 1, got {episode_size}")
    episode: list[T] = []
    for block in blocks:
        episode.append(block)
        if len(episode) == episode_size:
            yield episode
            episode = []
    if episode and not drop_last:
        yield episode


_WIKITEXT_ESCAPES = re.compile(r" @([-,.])@ ")


def read_wikitext(path: str | Path, detokenize: bool = False) -> str:
    """Read a WikiText-103 ``wiki.{valid,test}.tokens`` file as one string (for perplexity).

    Args:
        path: e.g. ``../shared/data/wikitext103/wiki.valid.tokens``.
        detokenize: undo the ``" @-@ "``, ``" @,@ "``, ``" @.@ "`` escapes (``"3 @.@ 1"`` -> ``"3.1"``);
            everything else (``<unk>``, ``= Heading =`` lines, spaces around punctuation) is kept.

    Returns:
        the file's text (the standard convention: the whole file, lines included).
    """
    text = Path(path).read_text(encoding="utf-8")
    if detokenize:
        text = _WIKITEXT_ESCAPES.sub(r"\1", text)
    return text


