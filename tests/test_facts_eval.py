"""`larimar eval facts` (larimar.eval.facts, larimar.cli.eval_facts) on a tiny random model and a tiny fact file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny_larimar import save_tiny_checkpoint, tiny_larimar

from larimar.cli.main import main
from larimar.editor.refine import Refinement
from larimar.eval.editors import RagEditor
from larimar.eval.facts import (
    QA,
    SUMMARY_KEYS,
    FactItem,
    evaluate_facts,
    is_own_prefix,
    load_fact_file,
    refined_prompts,
    write_facts_outputs,
)
from larimar.eval.metrics import (
    ending_rates,
    ends_after_answer,
    ngram_entropy,
    repeats_answer,
    sentence_ends_after_answer,
)

FACTS = Path(__file__).resolve().parent / "fixtures" / "facts_tiny.jsonl"


# -- the file format -------------------------------------------------------------------------------------------------


def test_load_fact_file_reads_the_fixture():
    items = load_fact_file(FACTS)
    assert len(items) == 4  # the blank line is skipped
    assert items[0] == FactItem("The capital of France is Rome.",
                                (QA("The capital of France is", "Rome"), QA("Q: What is the capital of France? A:", "Rome")),
                                (QA("The capital of Germany is", "Berlin"),))
    assert items[0].extra == {"source": "tiny:1"}
    assert items[3].unrelated == ()  # "unrelated" may be missing


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2: not JSON"),
    ('["a list"]', "line 2: expected a JSON object"),
    ('{"questions": [{"prompt": "p", "answer": "a"}]}', "line 2: 'fact' must be a non-empty string"),
    ('{"fact": "F.", "questions": []}', "line 2: 'questions' must be a non-empty list"),
    ('{"fact": "F.", "questions": [{"prompt": "p"}]}', "line 2: questions[0]: 'answer' must be non-empty"),
    ('{"fact": "F.", "questions": ["p"]}', "line 2: questions[0] must be an object"),
    ('{"fact": "F.", "questions": [{"prompt": "p", "answer": "a"}], "unrelated": [{"prompt": " ", "answer": "a"}]}',
     "line 2: unrelated[0]: 'prompt' must be non-empty"),
    ('{"fact": "F.", "questions": [{"prompt": "p", "answer": "a"}], "unrelated": "x"}', "line 2: 'unrelated' must be"),
])
def test_load_fact_file_names_the_bad_line(tmp_path, line, message):
    good = json.dumps({"fact": "F.", "questions": [{"prompt": "p", "answer": "a"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad line") as e:
        load_fact_file(path)
    assert message in str(e.value)


def test_load_fact_file_lists_every_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{}\n\nnope\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_fact_file(path)
    assert "line 1: 'fact'" in str(e.value) and "line 1: 'questions'" in str(e.value) and "line 3: not JSON" in str(e.value)


def test_load_fact_file_empty_or_missing(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no facts"):
        load_fact_file(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        load_fact_file(tmp_path / "nowhere.jsonl")


def test_own_prefix():
    assert is_own_prefix("The CEO of Northwind Traders is Maria Okafor.", " The CEO of Northwind Traders is ")
    assert not is_own_prefix("The CEO of Northwind Traders is Maria Okafor.", "Who is the CEO of Northwind Traders?")
    assert not is_own_prefix("The CEO is Maria.", "  ")


# -- the metrics -----------------------------------------------------------------------------------------------------


def test_ngram_entropy_is_rome_weighted_bi_tri_gram_entropy():
    assert ngram_entropy("a b c d") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)  # 3 bigrams, 2 trigrams
    assert ngram_entropy("the the the the the") == 0.0  # one bigram, one trigram
    assert ngram_entropy("") == 0.0 and ngram_entropy("word") == 0.0
    assert ngram_entropy("Rome is a city. It is old, and it is large.") > ngram_entropy("Rome Rome Rome Rome Rome")


@pytest.mark.parametrize("text, answer, ends_sentence", [
    (" Maria Okafor. She founded the company in 1990.", "Maria Okafor", True),
    (" Maria Okafor.", "Maria Okafor", True),
    (" Maria Okafor", "Maria Okafor", True),  # the text ends with the answer
    (" maria okafor\nB: Lutz", "Maria Okafor", True),
    (' Lutz." The city', "Lutz", True),
    (" Maria Okafor Okafor. Ekuru is for O", "Maria Okafor", False),
    (" Maria Okafor, who leads it.", "Maria Okafor", False),
    (" Okafor.", "Maria Okafor", False),  # not the answer
])
def test_sentence_ends_after_answer(text, answer, ends_sentence):
    assert sentence_ends_after_answer(text, answer) is ends_sentence


@pytest.mark.parametrize("text, answer, repeats, ends", [
    (" Maria Okafor. Maria Okafor is Maria Okafor.", "Maria Okafor", True, False),
    (" Maria Okafor.", "Maria Okafor", False, True),
    (" maria okafor!\n", "Maria Okafor", False, True),
    (" Maria Okafor, who leads it.", "Maria Okafor", False, False),
    (" John Smith. Maria Okafor.", "Maria Okafor", False, False),  # not the answer first: never ends after it
    (" Rome. Rome is Rome.", "Rome", True, False),
    ("", "Rome", False, False),
])
def test_repeats_and_ends_after_answer(text, answer, repeats, ends):
    assert repeats_answer(text, answer) is repeats and ends_after_answer(text, answer) is ends
    assert ending_rates([(text, answer)]) == (float(repeats), float(ends)) and ending_rates([]) == (None, None)


def _fake_generation(items: list[FactItem]):
    """Generations by method: larimar (a latent given) answers only the own-prefix questions; rag (a context line
    before the prompt) answers everything; the plain decoder answers only the unrelated prompts."""
    kind = {}
    for it in items:
        kind.update({q.prompt: ("own" if is_own_prefix(it.fact, q.prompt) else "q", q.answer) for q in it.questions})
        kind.update({q.prompt: ("unrelated", q.answer) for q in it.unrelated})

    def generate_text(prompts, latent=None, max_new_tokens=32, **kw):
        out = []
        for p in prompts:
            if latent is not None:  # Larimar.ask
                k, a = kind[p]
                out.append(f"  {a.upper()} is a fact . {a}" if k == "own" else (" wrong answer here" if k == "q" else " no"))
            elif "\n" in p:  # rag: the fact sentence, a newline, the prompt
                out.append(" " + kind[p.split("\n", 1)[1]][1])
            else:
                k, a = kind[p]
                out.append(" " + a if k == "unrelated" else " nothing to see")
        return out

    return generate_text


def _patch_generation(monkeypatch, lm, items: list[FactItem]) -> None:
    fake = _fake_generation(items)
    monkeypatch.setattr(lm.model, "generate_text", fake)  # Larimar.ask and NoEditEditor.generate
    monkeypatch.setattr(RagEditor, "generate", lambda self, prompts, n: fake(self.route(prompts).prompts, None, n))


def test_evaluate_facts_metrics_on_hand_made_generations(monkeypatch):
    items = load_fact_file(FACTS)
    lm = tiny_larimar(threshold=-1.0)  # every prompt in scope: rag always gets its nearest fact
    _patch_generation(monkeypatch, lm, items)
    calls = []
    edit = lm.edit
    monkeypatch.setattr(lm, "edit", lambda facts, ids=None: calls.append(facts) or edit(facts, ids))
    summaries, cases = evaluate_facts(lm, items, ("larimar", "rag", "none"), gen_tokens=5, batch_size=3)
    assert calls == [it.fact for it in items]  # one edit call per fact, a sentence each, in order
    assert len(lm) == 4  # all in ONE memory
    by = {s["method"]: s for s in summaries}
    assert list(by) == ["larimar", "rag", "none"]
    for s in summaries:
        assert set(SUMMARY_KEYS) <= set(s)
        assert (s["n_facts"], s["n_questions"], s["n_own_prefix"], s["n_other_questions"], s["n_unrelated"]) == \
            (4, 8, 4, 4, 3)
        assert 0.0 <= s["answer_token_acc"] <= 1.0
    assert (by["larimar"]["own_prefix_em"], by["larimar"]["question_em"], by["larimar"]["unrelated_em"]) == (1, 0, 0)
    assert (by["rag"]["own_prefix_em"], by["rag"]["question_em"], by["rag"]["unrelated_em"]) == (1, 1, 1)
    assert (by["none"]["own_prefix_em"], by["none"]["question_em"], by["none"]["unrelated_em"]) == (0, 0, 1)
    # "Q: What is the capital of France? A:" is the wh-question read fact 0 is refined on: kept apart as a fit
    assert [c["refined_prompt"] for c in cases if c["kind"] == "question"] == [True, False, False, False]
    assert all(s["n_questions_refined"] == 1 for s in summaries)
    assert by["rag"]["question_em_unseen"] == 1 and by["larimar"]["question_em_unseen"] == 0
    own = [f"  {q.answer.upper()} is a fact . {q.answer}" for it in items for q in it.questions if is_own_prefix(it.fact, q.prompt)]
    expected = (sum(ngram_entropy(t) for t in own) + 4 * ngram_entropy(" wrong answer here")) / 8
    assert by["larimar"]["fluency"] == pytest.approx(expected)
    unedited = ngram_entropy(" nothing to see")
    for s in summaries:
        assert s["fluency_unedited"] == pytest.approx(unedited)
    assert by["none"]["fluency"] == pytest.approx(unedited) and by["none"]["fluency_ratio"] == pytest.approx(1.0)
    assert by["larimar"]["fluency_ratio"] == pytest.approx(expected / unedited)
    # right answers: larimar's say the answer again and go on, rag's are the answer alone; none has none right
    assert (by["larimar"]["answer_repeat_rate"], by["larimar"]["answer_end_rate"]) == (1, 0)
    assert (by["rag"]["answer_repeat_rate"], by["rag"]["answer_end_rate"]) == (0, 1)
    assert by["none"]["answer_repeat_rate"] is None and by["none"]["answer_end_rate"] is None
    assert (by["larimar"]["answer_sentence_end_rate"], by["rag"]["answer_sentence_end_rate"]) == (0, 1)
    assert by["larimar"]["question_scope_rate"] == 1.0 and by["rag"]["unrelated_scope_rate"] == 1.0
    assert by["none"]["question_scope_rate"] is None
    assert by["larimar"]["edit_ms_median"] > 0 and by["rag"]["edit_ms_median"] >= 0
    assert by["none"]["edit_ms_median"] is None
    assert len(cases) == 8 + 3
    c = cases[0]
    assert (c["fact_index"], c["kind"], c["prompt"], c["answer"]) == (0, "own_prefix", "The capital of France is", "Rome")
    assert c["results"]["larimar"]["text"] == "  ROME is a fact . Rome" and c["results"]["larimar"]["em"] is True
    assert c["results"]["none"]["in_scope"] is None
    assert [r["kind"] for r in cases[:3]] == ["own_prefix", "question", "unrelated"]
    assert cases[2]["results"]["larimar"]["fluency"] is None and cases[2]["results"]["larimar"]["token_acc"] is None


def test_refined_prompts_follow_the_editors_refinement():
    items = load_fact_file(FACTS)
    refined = refined_prompts(tiny_larimar(), items)
    assert "Q: What is the capital of France? A:" in refined[0] and "The capital of France is" in refined[0]
    assert refined_prompts(tiny_larimar(refinement=Refinement(steps=0)), items) == [set()] * 4
    no_q = refined_prompts(tiny_larimar(refinement=Refinement(sentence_questions=False)), items)
    assert not any(p.startswith("Q:") for ps in no_q for p in ps)


def test_fluency_unedited_without_the_none_method(monkeypatch):
    items = load_fact_file(FACTS)[:2]
    lm = tiny_larimar(threshold=-1.0)
    _patch_generation(monkeypatch, lm, items)
    (s,), _ = evaluate_facts(lm, items, ["larimar"], gen_tokens=4)
    assert s["method"] == "larimar" and s["fluency_unedited"] == pytest.approx(ngram_entropy(" nothing to see"))


def test_rag_indexes_every_fact_and_reads_only_in_scope(monkeypatch):
    items = load_fact_file(FACTS)
    lm = tiny_larimar(threshold=0.6)
    seen: list[list[str]] = []
    generate = RagEditor.generate

    def spy(self, prompts, n):
        seen.append(self.route(prompts).prompts)
        assert len(self) == len(items)  # its own index holds every fact
        return generate(self, prompts, n)

    monkeypatch.setattr(RagEditor, "generate", spy)
    summaries, cases = evaluate_facts(lm, items, ["rag"], gen_tokens=2, batch_size=32)
    (decoded,) = seen
    first = cases[0]  # "The capital of France is": in scope of its own fact
    assert first["results"]["rag"]["in_scope"] is True
    assert decoded[0] == "The capital of France is Rome.\nThe capital of France is"
    for c, p in zip(cases, decoded):
        assert (p != c["prompt"]) == c["results"]["rag"]["in_scope"]  # context only in scope
        assert p.endswith(c["prompt"])
    assert summaries[0]["edit_ms_median"] >= 0


def test_evaluate_facts_real_generation_and_only_none():
    items = load_fact_file(FACTS)
    lm = tiny_larimar()
    summaries, cases = evaluate_facts(lm, items, ["none"], gen_tokens=3)
    assert len(lm) == 0  # nothing written for the plain decoder alone
    assert summaries[0]["edit_ms_median"] is None and summaries[0]["fluency_ratio"] in (None, pytest.approx(1.0))
    assert all(isinstance(c["results"]["none"]["text"], str) for c in cases)
    with pytest.raises(ValueError, match="unknown method"):
        evaluate_facts(lm, items, ["rome"])
    with pytest.raises(ValueError, match="gen_tokens"):
        evaluate_facts(lm, items, ["none"], gen_tokens=0)
    with pytest.raises(ValueError, match="at least one fact"):
        evaluate_facts(lm, [], ["none"])


def test_write_facts_outputs(tmp_path):
    summaries = [{k: 0.5 for k in SUMMARY_KEYS} | {"method": "larimar"}]
    d = write_facts_outputs(tmp_path / "out", summaries, [{"prompt": "p"}], {"data": "x.jsonl", "n_facts": 1})
    assert json.loads((d / "summary.json").read_text())[0]["data"] == "x.jsonl"
    assert (d / "cases.jsonl").read_text().strip() == '{"prompt": "p"}'
    assert "| larimar |" in (d / "summary.md").read_text()


# -- command line ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_cli_eval_facts_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "facts"
    code = main(["eval", "facts", "--data", str(FACTS), "--out", str(out), "--checkpoint", str(checkpoint),
                 "--scope-encoder", "larimar", "--limit", "3", "--gen-tokens", "4", "--batch-size", "4",
                 "--refine-steps", "1", "--refine-tail-tokens", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| method |" in captured.out and "| rag |" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert [s["method"] for s in summary] == ["larimar", "rag", "none"]
    for s in summary:
        for key in (*SUMMARY_KEYS, "data", "limit", "gen_tokens", "checkpoint", "refine_steps", "scope_threshold",
                    "date", "machine"):
            assert key in s, key
        assert s["n_facts"] == 3 and s["n_questions"] == 6 and s["refine_steps"] == 1 and s["refine_tail_tokens"] == 2
    assert len((out / "cases.jsonl").read_text().splitlines()) == 6 + 3
    assert (out / "summary.md").read_text().startswith("# facts:")


def test_cli_eval_facts_usage_errors(checkpoint, tmp_path, capsys):
    common = ["--out", str(tmp_path / "o"), "--checkpoint", str(checkpoint), "--scope-encoder", "larimar"]
    assert main(["eval", "facts", "--data", str(FACTS), "--methods", "larimar,rome", *common]) == 2
    assert "--methods" in capsys.readouterr().err
    assert main(["eval", "facts", "--data", str(FACTS), "--limit", "0", *common]) == 2
    assert "--limit" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"fact": "F."}\n', encoding="utf-8")
    assert main(["eval", "facts", "--data", str(bad), *common]) == 2
    assert "line 1: 'questions'" in capsys.readouterr().err
    assert main(["eval", "facts", "--data", str(tmp_path / "nowhere.jsonl"), *common]) == 2


# -- the real default models on a slice of the development set ------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "zsre").is_dir(), reason="no shared data")
def test_eval_facts_on_a_dev_slice_with_the_shipped_checkpoint(tmp_path, capsys):
    import subprocess
    import sys

    dev = tmp_path / "dev.jsonl"  # built from the train splits in place, as benchmarks/make_facts_dev.py documents
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_facts_dev.py"), "--shared", str(SHARED),
                    "--out", str(dev)], check=True, capture_output=True)
    assert len(dev.read_text().splitlines()) >= 150
    out = tmp_path / "facts"
    code = main(["eval", "facts", "--data", str(dev), "--limit", "6", "--gen-tokens", "16", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    by = {s["method"]: s for s in json.loads((out / "summary.json").read_text())}
    assert set(by) == {"larimar", "rag", "none"} and by["larimar"]["n_facts"] == 6
    # six sentences in one memory: their own beginnings come back (a fit) and the answers' tokens are carried,
    # far beyond the unedited decoder, which does not know the new facts
    assert by["larimar"]["own_prefix_em"] >= 0.5 and by["none"]["own_prefix_em"] <= 1 / 6
    assert by["larimar"]["answer_token_acc"] >= by["none"]["answer_token_acc"] + 0.3
    assert by["larimar"]["question_em"] > by["none"]["question_em"]
