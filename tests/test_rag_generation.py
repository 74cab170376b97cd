"""Issue 20: the retrieval baseline (`RagEditor`), generation metrics (gen_es / gen_ps / fluency), whole-call edit
latency and query prompt tokens, on tiny random models and the fixtures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_larimar import tiny_larimar

from larimar.data import load_counterfact, load_zsre
from larimar.eval.editors import (
    Editor,
    LarimarEditor,
    NoEditEditor,
    RagEditor,
    build_editors,
    decoder_prompt_tokens,
)
from larimar.eval.edits import SUMMARY_KEYS, evaluate_counterfact, evaluate_zsre
from larimar.eval.metrics import first_sentence, generation_hit, ngram_entropy
from larimar.eval.sequential import evaluate_sequential

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CF = FIXTURES / "cf_tiny.json"
ZSRE = FIXTURES / "zsre_tiny.json"


# -- metrics ---------------------------------------------------------------------------------------------------------


def test_ngram_entropy_is_romes_weighted_bigram_trigram_entropy():
    # tokens a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("") == 0.0 and ngram_entropy("word") == 0.0
    # punctuation marks are tokens; repetition lowers the entropy
    assert ngram_entropy("Google. Google. Google. Google.") < ngram_entropy("Google was founded in California.")
    varied = "one two three four five six"  # 5 distinct bigrams, 4 distinct trigrams
    assert ngram_entropy(varied) == pytest.approx((2 / 3 * math.log2(5) + 4 / 3 * math.log2(4)) / 2)


def test_generation_hit_is_word_bounded_case_insensitive_first_sentence():
    assert generation_hit(" Google. Google.nip.", "google")
    assert generation_hit(" the company GOOGLE, in 1998", "Google")
    assert not generation_hit(" Apple made it. Then Google bought it.", "Google")  # second sentence
    assert not generation_hit(" Googleplex is big", "Google")  # not a whole word
    assert generation_hit(" New York City is big", "new york")
    assert not generation_hit(" Paris\nRome", "Rome")  # a line break ends the first sentence
    assert not generation_hit("", "Rome")
    assert first_sentence(" St. Louis is a city. It is big.") == "St. Louis is a city."


# -- RagEditor -------------------------------------------------------------------------------------------------------


def test_rag_editor_prepends_the_nearest_sentence_in_scope_only():
    lm = tiny_larimar()
    rag = RagEditor(lm)
    assert isinstance(rag, Editor) and rag.threshold == lm.scope_threshold
    none = NoEditEditor(lm.model)
    req = load_counterfact(CF).records[0]
    p, new = req.full_prompt, " " + req.target_new
    # empty index: exactly the plain decoder
    assert torch.allclose(rag.score([p], [new]).nll, none.score([p], [new]).nll)
    rag.edit([req])
    assert len(rag) == 1 and len(lm.scope) == 0 and len(lm) == 0  # its own detector; Larimar's is untouched
    r = rag.route([p, "hello world"])
    assert r.in_scope == [True, False]
    assert r.prompts == [req.sentence + "\n" + p, "hello world"]
    scored = rag.score([p, "hello world"], [new, new])
    assert scored.in_scope == [True, False]
    with torch.inference_mode():
        ref = lm.model.continuation_nll([req.sentence + "\n" + p, "hello world"], [new, new], None).float()
    assert torch.allclose(scored.nll, ref, atol=1e-5)
    tf = rag.predict([p], [new])
    assert tf.in_scope == [True] and float(tf.nll[0]) == pytest.approx(float(ref[0]), abs=1e-4)
    assert rag.generate([p], 3) == lm.model.generate_text([req.sentence + "\n" + p], None, max_new_tokens=3)
    assert rag.prompt_tokens([p])[0] > decoder_prompt_tokens(lm.model, [p])[0]
    assert rag.prompt_tokens(["hello world"]) == decoder_prompt_tokens(lm.model, ["hello world"])
    rag.forget(rag.facts[0][0])
    assert len(rag) == 0 and rag.route([p]).in_scope == [False]
    rag.edit([req])
    rag.reset()
    assert len(rag) == 0 and len(rag.scope) == 0
    # never in scope: the plain decoder on every prompt
    rag2 = RagEditor(tiny_larimar(threshold=2.0))
    rag2.edit([req])
    assert rag2.score([p], [new]).in_scope == [False]
    assert torch.allclose(rag2.score([p], [new]).nll, none.score([p], [new]).nll)


def test_build_editors_knows_rag():
    lm = tiny_larimar()
    eds = build_editors(["larimar", "rag", "none"], lm)
    assert [e.name for e in eds] == ["larimar", "rag", "none"] and isinstance(eds[1], RagEditor)
    assert eds[1].plain_cache is eds[0].plain_cache  # the plain decoder's scores are shared
    with pytest.raises(ValueError, match="larimar, rag, none"):
        build_editors(["bogus"], lm)


# -- the harness -----------------------------------------------------------------------------------------------------


def test_counterfact_generation_metrics_latency_and_prompt_tokens():
    records = load_counterfact(CF).records
    lm = tiny_larimar()
    cache: dict = {}
    s_r = evaluate_counterfact(RagEditor(lm), records, gen_tokens=0, pre_cache=cache, gen_es_tokens=4,
                               fluency_tokens=6)
    n_gen_prompts = sum(len(set(r.generation_prompts)) or 1 for r in records)
    assert sum(1 for k in cache if k[0] == "generation") == n_gen_prompts  # unedited generations, cached once
    s_n = evaluate_counterfact(NoEditEditor(lm.model), records, gen_tokens=0, pre_cache=cache, gen_es_tokens=4,
                               fluency_tokens=6)
    for s in (s_r, s_n):
        assert set(SUMMARY_KEYS) <= set(s) and s["n_generation_cases"] == 3
        for k in ("gen_es", "gen_ps"):
            assert 0.0 <= s[k] <= 100.0
        assert s["fluency"] > 0 and s["fluency_unedited"] == s_r["fluency_unedited"]
    assert s_n["fluency"] == pytest.approx(s_n["fluency_unedited"])  # the unedited model is its own reference
    for c in s_r["cases"]:
        assert c["gen_es"] == float(generation_hit(c["gen_generations"][0], c["target_new"]))
        assert len(c["gen_generations"]) == 1 + len(c["prompts"]) - 1 - sum(
            p["kind"] == "neighborhood" for p in c["prompts"])
    # rag's prompts carry the retrieved sentence on in-scope queries: more tokens than the prompts alone
    assert s_r["query_prompt_tokens_mean"] > s_n["query_prompt_tokens_mean"]
    assert s_r["edit_ms_median"] > 0 and s_r["edit_core_ms_median"] is None
    assert s_r["scope_rate_rewrite"] == 100.0  # reported like Larimar's


def test_larimar_edit_ms_is_the_whole_call_and_detail_every_skips_generation():
    records = load_counterfact(CF).records
    lm = tiny_larimar()
    s = evaluate_counterfact(LarimarEditor(lm), records, gen_tokens=2, detail_every=2, gen_es_tokens=3,
                             fluency_tokens=4)
    assert s["n_generation_cases"] == 2  # records 0 and 2
    assert s["cases"][1]["gen_es"] is None and s["cases"][1]["fluency"] is None
    assert s["cases"][1]["post_generation"] is None and s["cases"][0]["gen_es"] is not None
    for c in s["cases"]:
        assert c["edit_ms"] >= c["edit_core_ms"] > 0  # the whole call includes encode + refine + write
    assert s["edit_ms_median"] >= s["edit_core_ms_median"] and s["edit_scope_ms_median"] is not None
    assert s["query_prompt_tokens_mean"] > 1
    off = evaluate_counterfact(NoEditEditor(lm.model), records[:1], gen_tokens=0, gen_es_tokens=0, fluency_tokens=0)
    assert off["gen_es"] is None and off["fluency"] is None and off["n_generation_cases"] == 0


def test_zsre_token_acc_has_generation_metrics_and_rag():
    records = load_zsre(ZSRE).records
    lm = tiny_larimar()
    s = evaluate_zsre(RagEditor(lm), records, gen_tokens=0, gen_es_tokens=3, fluency_tokens=4)
    assert set(SUMMARY_KEYS) <= set(s) and s["protocol"] == "token_acc"
    assert 0.0 <= s["gen_es"] <= 100.0 and s["fluency"] is not None and s["fluency_unedited"] is not None
    assert 0.0 <= s["exact_match"] <= 100.0 and s["locality"] is not None


def test_sequential_rag_accumulates_in_its_index():
    records = load_zsre(ZSRE).records
    lm = tiny_larimar()
    rag = RagEditor(lm)
    s = evaluate_sequential(rag, records, checkpoints=(1,), batch_size=4)
    assert s["method"] == "rag" and s["n_edits"] == len(records) and [p["n_edits"] for p in s["curve"]] == [1, 3]
    assert 0.0 <= s["edit_retention"] <= 1.0 and len(rag) == 0  # reset at the end
