"""Tests for larimar.data: knowledge-editing loaders and the training-text streams."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from larimar.data import (
    EditRequest,
    LoadResult,
    RecordError,
    TextBlock,
    detect_format,
    iter_blocks,
    iter_episodes,
    iter_text_blocks,
    iter_wikipedia_texts,
    load_counterfact,
    load_edits,
    load_zsre,
    make_template,
    read_wikitext,
    template_problem,
    validate_request,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not present")


def _write(tmp_path: Path, name: str, obj: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- fixtures

ROME_OK = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "The capital of {} is", "subject": "France",
                          "target_new": {"str": "Rome", "id": "Q1"}, "target_true": {"str": "Paris", "id": "Q2"}},
    "paraphrase_prompts": ["Nice weather today. France's capital city is"],
    "neighborhood_prompts": ["The capital of Spain is", "The capital of Italy is"],
    "generation_prompts": ["France is a country where"],
}

KNOWEDIT = [
    {
        "subject": "Watts Humphrey",
        "prompt": "What university did Watts Humphrey attend?",
        "target_new": "University of Michigan",
        "ground_truth": ["Illinois Institute of Technology", "IIT"],
        "rephrase_prompt": "What university did Watts Humphrey take part in?",
        "cond": "Illinois Institute of Technology >> University of Michigan || "
                "What university did Watts Humphrey attend?",
        "locality": {"Relation_Specificity": [
            {"prompt": "The name of the father of Watts Humphrey is", "ground_truth": ["Humphrey Sr."]},
            {"prompt": "The occupation of Watts Humphrey is", "ground_truth": [["engineer", "software engineer"]]},
        ]},
        "portability": {"Reasoning": [{"prompt": "The university Watts Humphrey attended is in the state of",
                                       "ground_truth": [["Michigan"]]}]},
    },
    {
        "subject": "Leo Arons",
        "prompt": "The place of death of Leo Arons is",
        "target_new": "Berlin",
        "ground_truth": "Hamburg",
        "locality": {},
        "portability": {},
    },
]


# ---------------------------------------------------------------------------------------------- real files


@needs_data
def test_counterfact_rome_929_loads_completely():
    result = load_counterfact(DATA / "counterfact_rome" / "counterfact_rome_929.json")
    assert result.format == "counterfact_rome"
    assert len(result.records) == 929 and result.errors == []
    first = result.records[0]
    assert first.prompt == "{} was employed in" and first.subject == "Laurent Cars"
    assert (first.target_new, first.target_true) == ("Philadelphia", "Paris")
    assert first.case_id == 34 and first.source_format == "counterfact_rome"
    for r in result.records:
        assert r.prompt.count("{}") == 1
        assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 10
        assert r.neighborhood_answers == [r.target_true] * 10
        assert len(r.generation_prompts) == 10
    assert first.sentence == "Laurent Cars was employed in Philadelphia"


@needs_data
def test_counterfact_easyedit_edit_split_loads_and_round_trips_prompts():
    path = DATA / "counterfact_easyedit" / "counterfact-edit.json"
    result = load_counterfact(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert result.format == "counterfact_easyedit"
    assert len(result.records) == 9811 and result.errors == []
    for r, rec in zip(result.records, raw):
        assert r.prompt.count("{}") == 1
        assert r.full_prompt == rec["prompt"]  # the template fills back to the original prompt
        assert r.neighborhood_prompts == [rec["locality_prompt"]]
        assert r.neighborhood_answers == [rec["locality_ground_truth"]]
        assert r.paraphrase_prompts == [rec["rephrase_prompt"]]
    assert result.records[0].prompt == "The mother tongue of {} is"


@needs_data
def test_zsre_mend_eval_800_loads_with_easyedit_mapping():
    path = DATA / "zsre" / "zsre_mend_eval_800.json"
    result = load_zsre(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert result.format == "zsre_mend"
    assert len(result.records) == 800 and result.errors == []
    for r, rec in zip(result.records, raw):
        assert r.full_prompt == rec["src"]
        assert r.target_new == rec["alt"] and r.target_true == rec["answers"][0]
        assert r.target_true_aliases == rec["answers"]
        assert r.paraphrase_prompts == [rec["rephrase"]]
        assert r.neighborhood_prompts == [rec["loc"]] and r.neighborhood_prompts[0].startswith("nq question: ")
        assert r.neighborhood_answers == [rec["loc_ans"]]
    assert result.records[0].prompt == "When was the inception of {}?"


@needs_data
def test_zsre_portability_file_reports_subjects_missing_from_src():
    result = load_zsre(DATA / "zsre" / "portability" / "zsre_inverse_relation.json")
    assert len(result.records) + len({e.index for e in result.errors}) == 385
    assert result.errors and all(e.field == "src" and "not found" in e.message for e in result.errors)
    assert all(r.neighborhood_prompts == [] for r in result.records)  # this file has no loc


@needs_data
def test_limit_takes_the_first_records_of_the_file():
    result = load_counterfact(DATA / "counterfact_rome" / "counterfact_rome_929.json", limit=5)
    assert [r.case_id for r in result.records] == [r.case_id for r in
                                                   load_counterfact(DATA / "counterfact_rome" /
                                                                    "counterfact_rome_929.json").records[:5]]


@needs_data
def test_wikipedia_and_wikitext_readers_on_real_files():
    paragraphs = list(itertools.islice(iter_wikipedia_texts(DATA / "wikipedia_en" / "enwiki_2018_validation.jsonl"), 5))
    assert paragraphs[0].startswith("Roberts Jānis Zvejnieks")
    assert all(p and "\n" not in p for p in paragraphs)
    text = read_wikitext(DATA / "wikitext103" / "wiki.valid.tokens")
    assert text.count("\n") == 3760 and " = Homarus gammarus = " in text
    assert "3 @.@ 1" in text and "3.1" in read_wikitext(DATA / "wikitext103" / "wiki.valid.tokens", detokenize=True)


# ---------------------------------------------------------------------------------------------- fixtures: formats


def test_malformed_records_are_reported_and_the_others_load(tmp_path, caplog):
    missing_target = json.loads(json.dumps(ROME_OK))
    del missing_target["requested_rewrite"]["target_new"]["str"]
    no_braces = json.loads(json.dumps(ROME_OK))
    no_braces["requested_rewrite"]["prompt"] = "The capital of France is"
    twice = json.loads(json.dumps(ROME_OK))
    twice["requested_rewrite"]["prompt"] = "{} and {} are"
    bad_list = json.loads(json.dumps(ROME_OK))
    bad_list["neighborhood_prompts"] = ["ok prompt", 3]
    empty_subject = json.loads(json.dumps(ROME_OK))
    empty_subject["requested_rewrite"]["subject"] = "  "
    records = [ROME_OK, missing_target, no_braces, "not a record", twice, bad_list, empty_subject, ROME_OK]
    path = _write(tmp_path, "cf.json", records)
    with caplog.at_level(logging.WARNING, logger="larimar.data"):
        result = load_counterfact(path)
    assert isinstance(result, LoadResult)
    assert len(result.records) == 2
    by_index = {e.index: e for e in result.errors}
    assert set(by_index) == {1, 2, 3, 4, 5, 6}
    assert by_index[1].field == "requested_rewrite.target_new.str"
    assert by_index[2].field == "requested_rewrite.prompt" and "exactly once" in by_index[2].message
    assert by_index[3].field == "<record>"
    assert by_index[4].field == "requested_rewrite.prompt"
    assert by_index[5].field == "neighborhood_prompts[1]"
    assert by_index[6].field == "requested_rewrite.subject"
    assert all(isinstance(e, RecordError) for e in result.errors)
    assert "skipped 6 of 8 records" in caplog.text


def test_not_json_or_not_a_list_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_counterfact(bad)
    obj = _write(tmp_path, "obj.json", {"records": []})
    with pytest.raises(ValueError, match="obj.json.*JSON list"):
        load_zsre(obj)
    unknown = _write(tmp_path, "unknown.json", [{"foo": 1}])
    with pytest.raises(ValueError, match="unknown.json.*could not detect"):
        load_edits(unknown)


def test_loader_refuses_the_other_dataset_and_unknown_formats(tmp_path):
    path = _write(tmp_path, "cf.json", [ROME_OK])
    with pytest.raises(ValueError, match="counterfact_rome"):
        load_zsre(path)
    with pytest.raises(ValueError, match="format"):
        load_counterfact(path, format="nope")
    assert load_edits(path).format == "counterfact_rome"


def test_format_override_parses_every_record_with_that_format(tmp_path):
    path = _write(tmp_path, "cf.json", [ROME_OK])
    result = load_counterfact(path, format="counterfact_easyedit")  # wrong on purpose
    assert result.records == [] and {e.field for e in result.errors} == {"subject"}


def test_knowedit_fixture_loads_as_zsre_and_as_counterfact(tmp_path):
    path = _write(tmp_path, "knowedit.json", KNOWEDIT)
    result = load_zsre(path)
    assert result.format == "knowedit" and result.errors == []
    first, second = result.records
    assert first.prompt == "What university did {} attend?" and first.full_prompt == KNOWEDIT[0]["prompt"]
    assert first.target_new == "University of Michigan"
    assert first.target_true == "Illinois Institute of Technology"
    assert first.target_true_aliases == ["Illinois Institute of Technology", "IIT"]
    assert first.paraphrase_prompts == ["What university did Watts Humphrey take part in?"]
    assert first.neighborhood_prompts == ["The name of the father of Watts Humphrey is",
                                          "The occupation of Watts Humphrey is"]
    assert first.neighborhood_answers == ["Humphrey Sr.", "engineer"]
    assert "Reasoning" in first.portability
    assert second.target_true == "Hamburg" and second.neighborhood_prompts == [] and second.paraphrase_prompts == []
    assert load_counterfact(path).format == "knowedit"


def test_easyedit_and_mend_fixtures(tmp_path):
    easy = [{"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
             "subject": "Danielle Darrieux", "ground_truth": "French",
             "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
             "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
            {"case_id": 1, "prompt": "The mother tongue of someone is", "target_new": "English",
             "subject": "Danielle Darrieux", "ground_truth": "French", "rephrase_prompt": "x",
             "locality_prompt": "y", "locality_ground_truth": "French"}]
    result = load_counterfact(_write(tmp_path, "easy.json", easy))
    assert result.format == "counterfact_easyedit" and len(result.records) == 1
    assert result.errors == [RecordError(1, "prompt", result.errors[0].message)]
    assert "not found" in result.errors[0].message

    mend = [{"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
             "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft",
             "answers": ["uniform", "uniforms"], "loc": "nq question: who is the walrus",
             "loc_ans": "John Lennon"},
            {"subject": "UniFirst", "src": "What is made by UniFirst?", "alt": "", "answers": ["uniform"]},
            {"subject": "UniFirst", "src": "What is made by UniFirst?", "alt": "x", "answers": []}]
    result = load_zsre(_write(tmp_path, "mend.json", mend))
    assert result.format == "zsre_mend" and len(result.records) == 1
    r = result.records[0]
    assert r.prompt == "What is the product made by {}?"
    assert (r.target_new, r.target_true) == ("unmanned aircraft", "uniform")
    assert r.target_true_aliases == ["uniform", "uniforms"]
    assert r.neighborhood_prompts == ["nq question: who is the walrus"] and r.neighborhood_answers == ["John Lennon"]
    assert r.case_id == 0
    assert [(e.index, e.field) for e in result.errors] == [(1, "alt"), (2, "answers")]


def test_make_template_replaces_first_occurrence_and_escapes_braces():
    template = make_template("Who is the father of Anne, daughter of Anne?", "Anne")
    assert template == "Who is the father of {}, daughter of Anne?"
    template = make_template("In {set} notation, Foo is", "Foo")
    assert template_problem(template) is None
    assert template.format("Foo") == "In {set} notation, Foo is"
    with pytest.raises(ValueError, match="not found"):
        make_template("The capital of France is", "Spain")


def test_template_problem_and_validate_request():
    assert template_problem("{} is") is None
    assert "exactly once" in template_problem("no field")
    assert "exactly once" in template_problem("{} and {}")
    assert "bare" in template_problem("{0} is")
    assert "unbalanced" in template_problem("{} is {")
    assert template_problem("") is not None
    good = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome")
    assert validate_request(good) == []
    bad = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome",
                      neighborhood_prompts=["a", "b"], neighborhood_answers=["x"])
    assert [f for f, _ in validate_request(bad)] == ["neighborhood_answers"]


def test_detect_format():
    assert detect_format(ROME_OK) == "counterfact_rome"
    assert detect_format(KNOWEDIT[0]) == "knowedit"
    assert detect_format({"src": "q", "alt": "a"}) == "zsre_mend"
    assert detect_format({"prompt": "p", "target_new": "t", "ground_truth": "g", "rephrase_prompt": "r",
                          "locality_prompt": "l"}) == "counterfact_easyedit"
    assert detect_format({"question": "q"}) is None


# ---------------------------------------------------------------------------------------------- text streams


class CharTripleTokenizer:
    """Fake HF tokenizer: a word costs ceil(len / 3) tokens, each space one token."""

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        assert add_special_tokens is False
        out = []
        for text in texts:
            ids: list[int] = []
            for j, word in enumerate(text.split(" ")):
                if j > 0:
                    ids.append(0)  # the space before this word
                ids.extend(sum(ord(c) for c in word[k:k + 3]) for k in range(0, len(word), 3))
            out.append(ids)
        return {"input_ids": out}


class SurpriseTokenizer:
    """Fake tokenizer whose per-word counts under-estimate: 1 + len // 10 tokens a word, plus one for >2 words."""

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        out = []
        for text in texts:
            words = text.split()
            out.append([len(w) for w in words for _ in range(1 + len(w) // 10)] + ([99] if len(words) > 2 else []))
        return {"input_ids": out}


PARAGRAPHS = [
    "Homarus gammarus is a large crustacean with a body length up to sixty centimetres and weighing up to "
    "six kilograms.",
    "Short one.",
    "The exoskeleton is generally blue above with spots that coalesce and yellow below while the red colour "
    "associated with lobsters only appears after cooking because in life the red pigment is bound.",
]


def test_text_blocks_fit_never_cross_paragraphs_and_match_their_ids():
    tok = CharTripleTokenizer()
    blocks = list(iter_text_blocks(PARAGRAPHS, tok, block_tokens=16, min_tokens=4))
    assert blocks and all(isinstance(b, TextBlock) for b in blocks)
    for b in blocks:
        assert 4 <= len(b.ids) <= 16
        assert b.ids == tok([b.text])["input_ids"][0]
        assert any(b.text in p for p in PARAGRAPHS)  # inside one paragraph
    for paragraph in PARAGRAPHS:  # with min_tokens=1 every word is kept, in order, none split
        own = list(iter_text_blocks([paragraph], tok, block_tokens=16, min_tokens=1))
        assert " ".join(b.text for b in own).split() == paragraph.split()
    assert len(list(iter_text_blocks([PARAGRAPHS[2]], tok, block_tokens=16, min_tokens=1))) > 2
    assert list(iter_blocks(PARAGRAPHS, tok, block_tokens=16, min_tokens=4)) == [b.ids for b in blocks]


def test_text_blocks_min_tokens_keeps_or_drops_short_paragraphs():
    tok = CharTripleTokenizer()
    kept = [b.text for b in iter_text_blocks(["Short one."], tok, block_tokens=16, min_tokens=5)]
    dropped = [b.text for b in iter_text_blocks(["Short one."], tok, block_tokens=16, min_tokens=6)]
    assert kept == ["Short one."] and dropped == []


def test_text_blocks_recheck_when_per_word_counts_underestimate():
    blocks = list(iter_text_blocks(["aa bb cc dd ee"], SurpriseTokenizer(), block_tokens=3, min_tokens=1))
    assert [b.text for b in blocks] == ["aa bb", "cc dd", "ee"]
    assert all(len(b.ids) <= 3 for b in blocks)


def test_blocks_stream_from_an_endless_source():
    def endless() -> Iterator[str]:
        for i in itertools.count():
            yield f"paragraph number {i} has exactly eight words in it"

    first = list(itertools.islice(iter_blocks(endless(), CharTripleTokenizer(), block_tokens=64, min_tokens=1), 3))
    assert len(first) == 3


def test_iter_wikipedia_texts_streams_paragraphs(tmp_path):
    path = tmp_path / "wiki.jsonl"
    lines = [{"id": "1", "title": "A", "text": "First para.\nSecond para.\n\n"},
             {"id": "2", "title": "B", "text": "Third."}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    assert list(iter_wikipedia_texts(path)) == ["First para.", "Second para.", "Third."]
    path.write_text(json.dumps(lines[0]) + "\n{oops\n", encoding="utf-8")
    stream = iter_wikipedia_texts(path)
    assert next(stream) == "First para."  # streamed: the bad line is only read later
    with pytest.raises(ValueError, match="wiki.jsonl:2"):
        list(stream)


def test_iter_episodes_groups_and_drops_the_tail():
    episodes = list(iter_episodes(range(10), episode_size=4))
    assert episodes == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(iter_episodes(range(10), episode_size=4, drop_last=False))[-1] == [8, 9]
    with pytest.raises(ValueError):
        list(iter_episodes(range(3), episode_size=0))


def test_read_wikitext_detokenize(tmp_path):
    path = tmp_path / "wiki.valid.tokens"
    path.write_text(" \n = Title = \n \n A 3 @.@ 1 m @-@ long , 1 @,@ 000 items . \n", encoding="utf-8")
    assert read_wikitext(path) == path.read_text(encoding="utf-8")
    assert "A 3.1 m-long , 1,000 items ." in read_wikitext(path, detokenize=True)


def test_text_blocks_skip_overlong_words_without_reordering():
    # the long word costs more than block_tokens: skipped; the over-full "aa bb cc" (4 tokens) hands
    # "cc" to a chunk of its own, not across the gap to "dd ee"
    text = f"aa bb cc {'x' * 50} dd ee"
    blocks = list(iter_text_blocks([text], SurpriseTokenizer(), block_tokens=3, min_tokens=1))
    assert [b.text for b in blocks] == ["aa bb", "cc", "dd ee"]
    blocks = list(iter_text_blocks([text], CharTripleTokenizer(), block_tokens=5, min_tokens=1))
    assert [b.text for b in blocks] == ["aa bb cc", "dd ee"]
