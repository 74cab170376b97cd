"""The editing API (larimar.editor) on tiny random models: edit / ask / score / forget / save / load, bad input,
the service engine and the edit / forget / ask / memories / chat / keys subcommands."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from tiny_larimar import bow_embed, save_tiny_checkpoint, tiny_larimar

from larimar.cli.main import main as cli_main
from larimar.data import EditRequest
from larimar.editor import Larimar, Refinement
from larimar.editor.refine import (
    TARGET_KINDS,
    answer_reads,
    going_on_reads,
    length_batches,
    plain_top_k,
    refine_latents,
    refinement_target,
    refinement_targets,
    repeat_targets,
    sentence_targets,
    stop_targets,
    tail_targets,
    target_losses,
    unended_reads,
    wh_question,
)
from larimar.facts import fact_sentence
from larimar.scope import ScopeDetector
from larimar.serving.engine import LarimarEngine

FACT = "The capital of France is Rome."
PROMPT = "The capital of France is"
OTHER = "who wrote the book of music"


def state(lm: Larimar) -> tuple:
    return lm.memory.M.clone(), lm.memory.U.clone(), lm.memory.ids, lm.scope.ids, list(lm.facts)


def same_state(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


# -- query path -------------------------------------------------------------------------------------------------


def test_in_scope_reads_memory_out_of_scope_is_plain_decoder():
    lm = tiny_larimar(read_mode="memory")  # the paper's read (one fact: what every read mode returns, up to scale)
    ids = lm.edit([FACT])
    assert len(ids) == 1 and lm.facts == [(ids[0], FACT)]
    latents, in_scope, sims = lm.read_latent([PROMPT, OTHER])
    assert in_scope == [True, False] and sims[0] >= 0.6 > sims[1]
    with torch.no_grad():
        expected = lm.memory.read(lm.model.encode_texts([PROMPT])).float()
    torch.testing.assert_close(latents[0], expected[0])
    assert latents[1].abs().sum() == 0  # z = 0: no memory
    with torch.no_grad():
        plain = lm.model.continuation_nll([OTHER, OTHER], [" rome", " paris"], None)
        with_mem = lm.model.continuation_nll([PROMPT], [" rome"], latents[:1])
        without = lm.model.continuation_nll([PROMPT], [" rome"], None)
    torch.testing.assert_close(torch.tensor(lm.score(OTHER, [" rome", " paris"])), plain)
    assert lm.score(PROMPT, [" rome"])[0] == pytest.approx(float(with_mem[0]), abs=1e-5)
    assert abs(float(with_mem[0]) - float(without[0])) > 1e-3  # the memory changes the prediction
    # generation: plain decoder out of scope, memory-conditioned in scope
    plain_gen = lm.model.generate_text([OTHER], None, max_new_tokens=4)[0]
    assert lm.generate(OTHER, max_new_tokens=4) == plain_gen
    answers = lm.ask([PROMPT, OTHER], max_new_tokens=4)
    assert [a.in_scope for a in answers] == [True, False] and answers[0].nearest_id == ids[0]


def test_empty_memory_is_plain_decoder_and_no_scope_reads_everything():
    lm = tiny_larimar()
    latents, in_scope, _ = lm.read_latent([PROMPT])
    assert in_scope == [False] and latents.abs().sum() == 0
    lm = tiny_larimar(use_scope=False)
    lm.edit([FACT])
    _, in_scope, _ = lm.read_latent([PROMPT, OTHER])
    assert in_scope == [True, True]


def test_prompt_answer_scope_mode_scores_prompt_plus_candidate():
    lm = tiny_larimar(threshold=0.9, scope_mode="prompt_answer")
    lm.edit(["the sport of messi is tennis"])
    prompts, conts = ["the sport of messi is"] * 2, [" tennis", " football"]
    nll, in_scope = lm.score_batch(prompts, conts)
    sims, _ = ScopeDetector.from_embeddings(bow_embed(["the sport of messi is tennis"]), ["x"], embed_fn=bow_embed,
                                            mode="prompt_answer").score([p + c for p, c in zip(prompts, conts)])
    assert in_scope == [bool(s >= 0.9) for s in sims] == [True, False]
    _, in_scope_prompt = lm.score_batch(prompts, conts, scope_mode="prompt")
    assert in_scope_prompt[0] == in_scope_prompt[1]  # one decision per prompt


def test_keyed_read_mode_addresses_the_memory_with_the_nearest_fact_key():
    facts = [FACT, "messi plays the sport of tennis", "the river of paris is berlin"]
    lm = tiny_larimar(read_mode="keyed")
    assert tiny_larimar().read_mode == "recall"  # the default
    ids = lm.edit(facts)
    latents, in_scope, _ = lm.read_latent([PROMPT, OTHER])
    assert in_scope == [True, False]
    with torch.no_grad():
        zq = lm.model.encode_texts([PROMPT]).float()
    torch.testing.assert_close(latents[:1], lm.memory.read_keyed([ids[0]], zq).float())
    assert latents[1].abs().sum() == 0
    paper = tiny_larimar(read_mode="memory")
    paper.edit(facts)
    z_paper, _, _ = paper.read_latent([PROMPT])
    assert not torch.allclose(z_paper[0], latents[0], atol=1e-3)  # three facts: the two reads differ
    one, one_paper = tiny_larimar(read_mode="keyed"), tiny_larimar(read_mode="memory")
    one.edit([FACT]), one_paper.edit([FACT])
    # one fact: the keyed read is the paper's read
    torch.testing.assert_close(one.read_latent([PROMPT])[0], one_paper.read_latent([PROMPT])[0], atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="read_mode"):
        tiny_larimar(read_mode="projection")


def test_nearest_read_mode_uses_the_nearest_fact_latent():
    lm = tiny_larimar(read_mode="nearest")
    ids = lm.edit([FACT, "messi plays the sport of tennis"])
    latents, in_scope, _ = lm.read_latent([PROMPT])
    assert in_scope == [True]
    torch.testing.assert_close(latents[0], lm.memory.latent(ids[0]).float())


def test_recall_read_is_the_memory_read_out_at_the_fact_key_whatever_the_wording():
    lm, keyed = tiny_larimar(read_mode="recall"), tiny_larimar(read_mode="keyed")
    facts = [FACT, "messi plays the sport of tennis", "the river of paris is berlin"]
    ids, _ = lm.edit(facts), keyed.edit(facts)
    question = "Which sport does messi play? messi plays the sport of"
    z, in_scope, _ = lm.read_latent([PROMPT, question, "messi plays the sport of"])
    assert in_scope == [True, True, True]
    recalled = lm.memory.read_keyed([ids[1]])[0].float()  # w M: the memory's read-out at the fact's key
    torch.testing.assert_close(z[1], recalled)
    torch.testing.assert_close(z[1], z[2])  # the same whatever the query's wording
    stored = lm.memory.latent(ids[1]).float()
    assert torch.nn.functional.cosine_similarity(recalled, stored, dim=0) > 0.9  # the stored latent up to the ridge
    zk, _, _ = keyed.read_latent([question])  # keyed: that read-out scaled by the question's projection on it
    cos = torch.nn.functional.cosine_similarity(zk[0], z[1], dim=0)
    assert cos.abs() > 0.999 and not torch.allclose(zk[0], z[1], atol=1e-3)
    lm.forget([ids[1]])
    z_after, _, _ = lm.read_latent([question])
    assert not torch.allclose(z_after[0], recalled, atol=1e-2)  # forgotten: no longer recalled


# -- edit / forget --------------------------------------------------------------------------------------------


def test_edit_forms_sequential_accumulation_and_exact_forget():
    lm = tiny_larimar()
    req = EditRequest(prompt="{} plays the sport of", subject="messi", target_new="tennis")
    a = lm.edit([FACT])
    b = lm.edit([req, {"prompt": "the river of {} is", "subject": "paris", "target_new": {"str": "berlin"}}])
    assert [t for _, t in lm.facts] == [FACT, "messi plays the sport of tennis", "the river of paris is berlin"]
    assert len(lm) == 3 and lm.scope.ids == a + b
    lm.forget(b)
    ref = tiny_larimar()
    ref.edit([FACT], ids=a)
    torch.testing.assert_close(lm.memory.M, ref.memory.M, atol=1e-10, rtol=0)  # exact forgetting
    assert lm.scope.ids == a and [i for i, _ in lm.facts] == a
    lm.reset()
    assert len(lm) == 0 and len(lm.scope) == 0 and lm.memory.M.abs().sum() == 0


# -- write-time latent refinement --------------------------------------------------------------------------------


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_refine_latents_lowers_the_read_nll_and_changes_no_weight():
    from larimar.solvers import one_fact_read

    model = tiny_larimar().model
    before = _params(model)
    prompts, answers = ["messi plays the sport of", ""], [" tennis", FACT]
    with torch.no_grad():
        Z = model.encode_texts(["messi plays the sport of tennis", FACT])  # (2, C)
        Q = torch.stack([model.encode_texts(prompts[:1])[0], Z[1]])  # (2, C): prompt latent; the sentence's own
    R = refine_latents(model, Z, prompts, answers, Q, Refinement(steps=20, lr=0.5))
    with torch.no_grad():
        nll0 = model.continuation_nll(prompts, answers, one_fact_read(Q, Z))
        nll1 = model.continuation_nll(prompts, answers, one_fact_read(Q, R))
    assert R.shape == Z.shape and (nll1 < nll0 - 0.05).all(), (nll0, nll1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
    assert all(p.grad is None for p in model.parameters())
    assert refine_latents(model, Z, prompts, answers, Q, Refinement(steps=0)) is Z
    # facts do not interact: one batch of two = two batches of one; also under an inference-mode caller
    with torch.inference_mode():
        R1 = refine_latents(model, Z, prompts, answers, Q, Refinement(steps=20, lr=0.5, batch_size=1))
    torch.testing.assert_close(R1, R, atol=1e-3, rtol=1e-3)  # padding: float noise, amplified by Adam
    R2 = refine_latents(model, Z, prompts, answers, Q, Refinement(steps=20, lr=0.5, max_tokens=1))  # token budget
    torch.testing.assert_close(R2, R1, atol=1e-5, rtol=1e-5)  # one row a batch, each back in its own place
    with pytest.raises(ValueError, match="2 latents, 1 prompts"):
        refine_latents(model, Z, prompts[:1], answers, Q, Refinement())
    # per-fact step limits: a fact stops at its own limit while the other goes on, as if refined alone
    Rs = refine_latents(model, Z, prompts, answers, Q, Refinement(steps=20, lr=0.5, batch_size=1), steps=[20, 5])
    R5 = refine_latents(model, Z, prompts, answers, Q, Refinement(steps=5, lr=0.5, batch_size=1))
    torch.testing.assert_close(Rs[0], R1[0])
    torch.testing.assert_close(Rs[1], R5[1])
    R0 = refine_latents(model, Z, prompts, answers, Q, Refinement(steps=20, lr=0.5), steps=[0, 20])
    assert torch.equal(R0[0], Z[0].float()) and not torch.allclose(R0[1], Z[1], atol=1e-3)
    with pytest.raises(ValueError, match="step limits"):
        refine_latents(model, Z, prompts, answers, Q, Refinement(), steps=[5])


def test_refine_latents_target_weights_are_relative_within_a_fact():
    model = tiny_larimar().model
    prompts, answers = ["messi plays the sport of", "messi plays the sport of"], [" tennis", " football"]
    with torch.no_grad():
        Z = model.encode_texts(["messi plays the sport of tennis"])  # (1, C): one fact, two targets
    ref = Refinement(steps=10, lr=0.5)
    R = refine_latents(model, Z, prompts, answers, None, ref, owner=[0, 0])
    torch.testing.assert_close(refine_latents(model, Z, prompts, answers, None, ref, [0, 0], weights=[3, 3]), R)
    Rt = refine_latents(model, Z, prompts, answers, None, ref, [0, 0], weights=[10.0, 0.1])  # tennis counts most
    Rf = refine_latents(model, Z, prompts, answers, None, ref, [0, 0], weights=[0.1, 10.0])
    with torch.no_grad():
        nt = model.continuation_nll(prompts, answers, Rt.expand(2, -1))
        nf = model.continuation_nll(prompts, answers, Rf.expand(2, -1))
    assert nt[0] < nf[0] and nf[1] < nt[1]
    for bad in ([1.0], [1.0, 0.0], [1.0, -2.0]):
        with pytest.raises(ValueError, match="weights"):
            refine_latents(model, Z, prompts, answers, None, ref, [0, 0], weights=bad)


def test_length_batches_sort_by_length_and_respect_both_limits():
    lengths = [30, 5, 12, 5, 200, 11, 6]
    batches = length_batches(lengths, batch_size=3, max_tokens=36)
    assert sorted(i for b in batches for i in b) == list(range(7))  # every row once
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)  # shortest first
    assert all(len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 36) for b in batches)
    assert [4] in batches  # longer than the budget: alone
    assert batches[0] == [1, 3, 6]  # 3 rows of <= 6 tokens: the row limit, not the budget, cuts here
    assert length_batches([], 4, 10) == []


def test_refinement_target_of_requests_and_sentences():
    req = EditRequest(prompt="{} plays the sport of", subject="messi", target_new=" tennis ")
    assert refinement_target(req.sentence, req) == ("messi plays the sport of", " tennis")
    assert refinement_target("The capital of France is  Rome. ", None) == ("The capital of France is", " Rome.")
    assert refinement_target("Rome.", None) == ("", "Rome.")  # one word: the sentence itself


def test_refinement_targets_splits_and_question_reads():
    s = "The CEO of Northwind Traders is Maria Okafor."
    assert refinement_targets(s, None) == [refinement_target(s, None)]
    four = refinement_targets(s, None, splits=4)  # cuts before a content word, in the second half, not in a name
    assert four == [("The CEO of Northwind Traders is", " Maria Okafor.")]
    long = "Quellmark Robotics was founded in the year 2011 by the engineer Tomasz Wieland of Gdansk."
    cuts = refinement_targets(long, None, splits=8)
    assert [c for _, c in cuts] == [" 2011 by the engineer Tomasz Wieland of Gdansk.",
                                    " engineer Tomasz Wieland of Gdansk.", " Tomasz Wieland of Gdansk.", " Gdansk."]  # not before "by" or "Wieland"
    assert all(p + c == long for p, c in cuts)  # every pair is the sentence cut once
    two = refinement_targets(long, None, splits=2)
    assert two == [cuts[0], cuts[-1]]  # evenly spread, the last cut always kept
    dates = refinement_targets("The launch date of USA-88 is 3 March 1993.", None, splits=4)
    assert [c for _, c in dates] == [" USA-88 is 3 March 1993.", " 3 March 1993."]  # a date is never cut
    assert refinement_targets("Q: Who is it? A: Maria Okafor.", None, splits=4)[-1] == \
        ("Q: Who is it? A:", " Maria Okafor.")  # "A: | Maria" is not inside a name
    assert refinement_targets("Ann Lee.", None, splits=4) == [("Ann", " Lee.")]  # no cut left: the last word
    with_q = refinement_targets(s, None, splits=4, questions=True)
    assert with_q == four + [("Q: The CEO of Northwind Traders is? A:", " Maria Okafor."),
                             ("Q: Who is the CEO of Northwind Traders? A:", " Maria Okafor.")]
    born = refinement_targets("Bryan Crawford was born in the town of Bolton.", None, splits=4, questions=True)
    assert [p for p, c in born if p.startswith("Q:")] == ["Q: Bryan Crawford was born in the town of? A:"]
    assert refinement_targets("Q: Who leads it? A: Maria.", None, splits=2, questions=True) == \
        refinement_targets("Q: Who leads it? A: Maria.", None, splits=2)  # already a question: no second read
    req = EditRequest(prompt="{} plays the sport of", subject="messi", target_new="tennis")
    assert refinement_targets(req.sentence, req, splits=4, questions=True) == [refinement_target(req.sentence, req)]


def test_answer_reads_and_tail_targets_follow_the_answer_with_the_plain_continuation():
    s = "The CEO of Northwind Traders is Maria Okafor."
    reads = answer_reads(refinement_targets(s, None, splits=4, questions=True))
    assert reads == [("The CEO of Northwind Traders is", " Maria Okafor."),
                     ("Q: Who is the CEO of Northwind Traders? A:", " Maria Okafor.")]  # the wh read, not "is? A:"
    assert answer_reads(refinement_targets(s, None, splits=4, questions=False)) == reads[:1]
    assert answer_reads([("Alix Perez is a citizen", " of Brazil.")]) == []  # no bare answer: nothing to follow
    model = tiny_larimar().model
    texts = [s, "Q: Who is the CEO of Northwind Traders? A: Maria Okafor."]  # each read written out
    with torch.inference_mode():
        batch = model.tokenize_decoder(texts, left_pad=True)
        new = model.generate(batch["input_ids"], batch["attention_mask"], None, 3).tolist()  # the plain decoder
    eos = model.eos_token_id
    want = [model.decoder_tokenizer.decode(r[: r.index(eos) + 1] if eos in r else r) for r in new]
    got = tail_targets(model, [reads, []], tokens=3)
    assert all(w.strip() for w in want)  # the tiny seeded decoder says something after each read
    assert got[0] == list(zip(texts, want))  # each read followed by what the plain decoder says after it
    assert got[1] == []  # no answer read: no tail
    assert tail_targets(model, [reads], tokens=0) == [[]]
    assert tail_targets(model, [], tokens=3) == []


def test_target_losses_are_the_nll_the_kl_to_the_plain_decoder_or_the_unlikelihood_by_kind():
    model = tiny_larimar().model
    ids, mask, tmask = model.continuation_batch(["The CEO is", "Q: Who? A:", "The CEO is"],
                                                [" Maria Okafor.", " Maria.", " Maria Okafor."])
    V = model.decode_logits(ids, mask, None).shape[-1]
    kind = torch.tensor([TARGET_KINDS.index(k) for k in ("nll", "kl", "unlikely")])
    is_kl = kind == TARGET_KINDS.index("kl")
    ref = plain_top_k(model, ids[is_kl], mask[is_kl], k=V)  # the whole vocabulary: an exact KL
    z = (0.5 * torch.randn(3, model.config.latent_size, generator=torch.Generator().manual_seed(0))).requires_grad_()
    with torch.no_grad():
        plain = target_losses(model.decode_logits(ids, mask, None), ids, tmask * mask, kind, ref)  # (3,)
    torch.testing.assert_close(plain[1], torch.tensor(0.0), atol=1e-5, rtol=0)  # the plain decoder: no divergence
    got = target_losses(model.decode_logits(ids, mask, z), ids, tmask * mask, kind, ref)  # (3,)
    nll = model.token_nll(ids, mask, z, tmask)  # (3,)
    torch.testing.assert_close(got[0], nll[0])  # an "nll" row: its token NLL
    assert got[1] > 1e-4  # a latent moves the distribution away from the plain decoder's
    logits = model.decode_logits(ids, mask, z)[2, :-1].log_softmax(-1)  # (T-1, V)
    p = logits.gather(-1, ids[2, 1:, None]).squeeze(-1).exp()  # (T-1,)
    m = tmask[2, 1:].float()
    torch.testing.assert_close(got[2], (-torch.log1p(-p) * m).sum() / m.sum())  # -log(1 - p), mean over tokens
    (g,) = torch.autograd.grad(got[1], [z])
    assert g[1].norm() > 0 and g[0].norm() == 0 and g[2].norm() == 0  # a row's loss reaches its own latent only
    with pytest.raises(ValueError, match="reference"):
        target_losses(model.decode_logits(ids, mask, None), ids, tmask * mask, kind, None)
    idx, p = plain_top_k(model, ids, mask, k=4)
    assert idx.shape == p.shape == (3, ids.shape[1] - 1, 4)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, ids.shape[1] - 1))


def test_stop_targets_end_the_question_read_or_both_answer_reads():
    reads = [("The CEO of Northwind Traders is", " Maria Okafor."), ("Q: Who is the CEO? A:", " Maria Okafor.")]
    assert stop_targets(reads, "<eos>", "questions") == [("Q: Who is the CEO? A: Maria Okafor.", "<eos>")]
    assert stop_targets(reads, "<eos>", "answers") == [("The CEO of Northwind Traders is Maria Okafor.", "<eos>"),
                                                       ("Q: Who is the CEO? A: Maria Okafor.", "<eos>")]
    assert stop_targets(reads, "<eos>", "none") == [] and stop_targets([], "<eos>", "answers") == []
    with pytest.raises(ValueError, match="stop mode"):
        stop_targets(reads, "<eos>", "sometimes")
    assert unended_reads(reads, "questions") == reads[:1]  # the statement goes on, the question read ends
    assert unended_reads(reads, "none") == reads and unended_reads(reads, "answers") == []
    s = "The CEO of Northwind Traders is Maria Okafor."
    assert going_on_reads(s, Refinement(sentence_splits=4, sentence_stop="questions")) == reads[:1] == [
        ("The CEO of Northwind Traders is", " Maria Okafor.")]  # ending the question read leaves the statement's
    assert going_on_reads(s, Refinement(sentence_splits=4)) == [  # the default ends none
        ("The CEO of Northwind Traders is", " Maria Okafor."),
        ("Q: Who is the CEO of Northwind Traders? A:", " Maria Okafor.")]


def test_sentence_targets_weigh_the_end_targets_and_leave_requests_alone():
    s = "The CEO of Northwind Traders is Maria Okafor."
    ref = Refinement(sentence_splits=4, sentence_stop="questions", sentence_stop_weight=0.3)
    got = sentence_targets(s, None, ref, "<eos>")
    pairs = refinement_targets(s, None, 4, True)
    assert got == [(p, c, 1.0, "nll") for p, c in pairs] + \
        [("Q: Who is the CEO of Northwind Traders? A: Maria Okafor.", "<eos>", 0.3, "nll")]
    assert sentence_targets(s, None, ref, None) == [(p, c, 1.0, "nll") for p, c in pairs]  # no end token, no end
    no_repeat = Refinement(sentence_splits=4, sentence_stop="questions", sentence_no_repeat=0.5)
    assert sentence_targets(s, None, no_repeat, "<eos>")[len(got):] == \
        [("The CEO of Northwind Traders is Maria Okafor.", " Maria", 0.5, "unlikely")]  # after the read that goes on
    req = EditRequest(prompt="{} plays the sport of", subject="messi", target_new="tennis")
    assert sentence_targets(req.sentence, req, no_repeat, "<eos>") == \
        [(*refinement_target(req.sentence, req), 1.0, "nll")]
    assert repeat_targets([("Q: Who? A:", " Maria Okafor."), ("x", " ")]) == [("Q: Who? A: Maria Okafor.", " Maria")]


def test_cli_choices_match_the_library():
    from larimar.cli import options
    from larimar.editor import refine
    from larimar.memory import READ_MODES
    from larimar.model import MEMORY_SPANS

    assert options.STOP_MODES == refine.STOP_MODES and options.READ_MODES == READ_MODES
    assert options.MEMORY_SPANS == MEMORY_SPANS


def test_edit_with_tails_or_stops_refines_sentences_on_more_targets_and_leaves_requests_alone():
    req = EditRequest(prompt="{} plays the sport of", subject="messi", target_new="tennis")
    s = "The CEO of Northwind Traders is Maria Okafor."
    base = tiny_larimar(refinement=Refinement(steps=3, lr=0.5, sentence_stop="none"))
    _, Z0 = base.fact_latents([req, s])
    for extra in ({"sentence_tail_tokens": 4, "sentence_stop": "none"}, {"sentence_stop": "questions"},
                  {"sentence_stop": "answers"}, {"sentence_no_repeat": 1.0, "sentence_stop": "none"}):
        _, Z1 = tiny_larimar(refinement=Refinement(steps=3, lr=0.5, **extra)).fact_latents([req, s])
        torch.testing.assert_close(Z1[0], Z0[0], atol=1e-4, rtol=1e-4)  # a request: no extra target, same latent
        assert (Z1[1] - Z0[1]).norm() > 1e-4, extra  # the sentence: refined on its tails / its end too
    ends = Refinement(steps=3, lr=0.5, sentence_stop="answers")
    _, Za = tiny_larimar(refinement=ends).fact_latents([s])
    _, Zt = tiny_larimar(refinement=Refinement(steps=3, lr=0.5, sentence_stop="answers", sentence_tail_tokens=4)
                         ).fact_latents([s])
    torch.testing.assert_close(Zt, Za)  # every answer read ends: no read goes on, no tail target


@pytest.mark.parametrize("head, answer, question", [
    ("The CEO of Northwind Traders is", " Maria Okafor.", "Who is the CEO of Northwind Traders?"),
    ("The capital of Zubrowka is", " Lutz.", "What is the capital of Zubrowka?"),
    ("Bryan Crawford was born in", " Bolton.", "Where was Bryan Crawford born?"),
    ("Project Bluebird was cancelled in", " March 2026.", "When was Project Bluebird cancelled?"),
    ("The Pathfinder One satellite was launched on", " 9 October 2024.", "When was the Pathfinder One satellite launched?"),
    ("The drug Lumarexin was developed by", " Castor Pharmaceuticals.", "Who was the drug Lumarexin developed by?"),
    ("Boris Tchaikovsky works as", " actor.", None),  # no copula
    ("Stonehouse Bay is located in the continent", " Europe.", None),  # not a copula or a preposition at the end
    ("Alix Perez is a citizen of", " Brazil.", None),  # "of": no wh-word
    ("is", " Rome.", None),
])
def test_wh_question_rules(head, answer, question):
    assert wh_question(head, answer) == question


@pytest.mark.parametrize("kw, match", [({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"), ({"lr": 0.0}, "rate"),
                                       ({"batch_size": 0}, "batch_size"), ({"max_tokens": 0}, "max_tokens"),
                                       ({"sentence_steps": -1}, "sentence_steps"),
                                       ({"sentence_tail_tokens": -1}, "sentence_tail_tokens"),
                                       ({"sentence_tail_weight": 0.0}, "sentence_tail_weight"),
                                       ({"sentence_no_repeat": -1.0}, "sentence_no_repeat"),
                                       ({"sentence_stop": "always"}, "sentence_stop"),
                                       ({"sentence_stop_weight": 0.0}, "sentence_stop_weight")])
def test_refinement_config_is_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        Refinement(**kw)


def test_sentences_and_requests_take_their_own_step_counts():
    ref = Refinement(steps=5, sentence_steps=10)
    assert (ref.steps_for(sentence=False), ref.steps_for(sentence=True)) == (5, 10)
    assert Refinement(steps=5, sentence_steps=None).steps_for(sentence=True) == 5
    assert Refinement(steps=0, sentence_steps=10).steps_for(sentence=True) == 0  # 0: off for everything
    req = EditRequest(prompt="{} plays the sport of", subject="messi", target_new="tennis")
    both = tiny_larimar(refinement=Refinement(steps=3, sentence_steps=8, lr=0.5))
    _, Z = both.fact_latents([req, FACT])  # one batch, two limits
    _, Zr = tiny_larimar(refinement=Refinement(steps=3, sentence_steps=None, lr=0.5)).fact_latents([req])
    _, Zs = tiny_larimar(refinement=Refinement(steps=8, sentence_steps=None, lr=0.5)).fact_latents([FACT])
    torch.testing.assert_close(Z, torch.cat([Zr, Zs]), atol=1e-4, rtol=1e-4)


def test_edit_writes_the_refined_latent_and_steps_0_the_encoder_latent():
    req = EditRequest(prompt="{} plays the sport of", subject="messi", target_new="tennis")
    lm, plain = tiny_larimar(refinement=Refinement(steps=10)), tiny_larimar(refinement=Refinement(steps=0))
    timings: dict[str, float] = {}
    ids = lm.edit([req, FACT], ids=["a", "b"], timings=timings)
    plain.edit([req, FACT], ids=["a", "b"])
    sentences, Z = lm.fact_latents([req, FACT])
    assert sentences == [req.sentence, FACT] and timings["refine"] > 0
    torch.testing.assert_close(torch.stack([lm.memory.latent(i).float() for i in ids]), Z)
    Z0 = plain.encode_facts(sentences)
    torch.testing.assert_close(torch.stack([plain.memory.latent(i).float() for i in ids]), Z0)
    assert (Z - Z0).norm(dim=-1).min() > 1e-3  # refinement moved both latents
    # the rewrite's answer is more likely after the refined write than after the one-shot write
    prompt = req.full_prompt
    assert lm.score(prompt, [" tennis"])[0] < plain.score(prompt, [" tennis"])[0]
    lm.forget(ids)  # forgetting stays exact
    assert lm.memory.M.abs().max() < 1e-8


def test_engine_refines_a_request_on_its_answer_not_on_its_last_word():
    lm = tiny_larimar(refinement=Refinement(steps=5, lr=0.5))
    engine = LarimarEngine(lm)
    req = {"prompt": "the river of {} is", "subject": "paris", "target_new": {"str": "new york city"}}
    sentence = fact_sentence(req)
    as_request = engine.encode_facts([sentence], [req])
    torch.testing.assert_close(as_request, lm.fact_latents([req])[1])
    torch.testing.assert_close(engine.encode_facts([sentence], [None]), lm.fact_latents([sentence])[1])
    assert (as_request - engine.encode_facts([sentence])).abs().max() > 1e-4  # "... new york" -> " city" differs


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (["  "], ValueError, "must not be empty"),
        ([""], ValueError, "must not be empty"),
        ([{"prompt": "no placeholder", "subject": "x", "target_new": "y"}], ValueError, r"'\{\}'"),
        ([EditRequest(prompt="{} and {}", subject="x", target_new="y")], ValueError, "exactly once"),
        (["x" * 100_000], ValueError, "at most 4000"),
        ([42], ValueError, "sentence, an EditRequest or a dict"),
        ([{"prompt": "{} is", "subject": 3, "target_new": "y"}], ValueError, "subject"),
        ([], ValueError, "must not be empty"),
        ([{"foo": 1}], ValueError, "keys prompt, subject, target_new"),
    ],
)
def test_bad_facts_raise_and_leave_memory_unchanged(bad, exc, match):
    lm = tiny_larimar()
    lm.edit([FACT], ids=["f1"])
    before = state(lm)
    with pytest.raises(exc, match=match):
        lm.edit(bad)
    assert same_state(before, state(lm))


def test_bad_ids_prompts_and_forget_raise_cleanly():
    lm = tiny_larimar(max_chars=50)
    lm.edit([FACT], ids=["f1"])
    before = state(lm)
    with pytest.raises(ValueError, match="already in memory"):
        lm.edit(["paris is a city"], ids=["f1"])
    with pytest.raises(ValueError, match="unique"):
        lm.edit(["paris is a city", "rome is a city"], ids=["a", "a"])
    with pytest.raises(ValueError, match="1 ids for 2 facts"):
        lm.edit(["paris is a city", "rome is a city"], ids=["a"])
    with pytest.raises(KeyError, match="nope"):
        lm.forget(["f1", "nope"])
    with pytest.raises(ValueError, match="at most 50"):
        lm.generate("x" * 51)
    with pytest.raises(ValueError, match="must be a string"):
        lm.score(None, [" rome"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a string"):
        lm.read_latent([PROMPT, 3])  # type: ignore[list-item]
    assert same_state(before, state(lm))
    assert fact_sentence({"text": "hello world"}) == "hello world"


# -- save / load ----------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_checkpoint_mismatch(tmp_path):
    lm = tiny_larimar()
    lm.edit([FACT, "messi plays the sport of tennis", "the river of paris is berlin"], ids=["a", "b", "c"])
    lm.forget(["b"])
    lm.edit(["eiffel tower is in rome"], ids=["d"])
    lat, scope, _ = lm.read_latent([PROMPT, "where is the eiffel tower"])
    lm.save_memory(tmp_path / "mem")
    manifest = json.loads((tmp_path / "mem" / "memory.json").read_text())
    assert [(f["id"], f["order"]) for f in manifest["facts"]] == [("a", 0), ("c", 1), ("d", 2)]
    assert manifest["facts"][0]["text"] == FACT and manifest["fingerprint"] == lm.fingerprint

    other = tiny_larimar()  # same checkpoint
    other.edit(["something else entirely"], ids=["z"])
    other.load_memory(tmp_path / "mem")
    assert other.facts == lm.facts and other.scope.ids == ["a", "c", "d"]
    assert torch.equal(other.memory.M, lm.memory.M) and torch.equal(other.memory.U, lm.memory.U)
    lat2, scope2, _ = other.read_latent([PROMPT, "where is the eiffel tower"])
    assert scope2 == scope
    torch.testing.assert_close(lat2, lat)
    other.forget(["c"])  # forgetting works after a load (keys restored)
    assert other.memory.ids == ["a", "d"]

    foreign = tiny_larimar(seed=1)  # another checkpoint
    foreign.edit(["keep me"], ids=["k"])
    with pytest.raises(ValueError, match="another checkpoint|made with checkpoint"):
        foreign.load_memory(tmp_path / "mem")
    assert foreign.memory.ids == ["k"]
    with pytest.raises(FileNotFoundError):
        foreign.load_memory(tmp_path / "nothing")


# -- the service engine -----------------------------------------------------------------------------------------


def test_engine_protocol_and_service_round_trip(tmp_path):
    from fastapi.testclient import TestClient

    from larimar.serving.service import Engine, create_app
    from larimar.serving.store import MemoryStore

    lm = tiny_larimar()
    engine = LarimarEngine(lm)
    assert isinstance(engine, Engine)
    store = MemoryStore(tmp_path / "store", fingerprint=engine.fingerprint, memory=lm.model.memory)
    try:
        client = TestClient(create_app(engine, store, require_keys=False))
        r = client.post("/v1/memories/alice/facts", json={"facts": [FACT]})
        assert r.status_code == 201, r.text
        fid = r.json()["ids"][0]
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "memory": "alice"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["memory"]["in_scope"] is True and body["memory"]["nearest_id"] == fid
        in_scope_text = body["choices"][0]["text"]
        r = client.post("/v1/completions", json={"prompt": OTHER, "max_tokens": 3, "memory": "alice"})
        assert r.json()["memory"]["in_scope"] is False
        assert r.json()["choices"][0]["text"] == lm.model.generate_text([OTHER], None, max_new_tokens=3)[0]
        # the engine answers like the editor with the same fact
        lm2 = tiny_larimar()
        lm2.edit([FACT])
        assert in_scope_text == lm2.generate(PROMPT, max_new_tokens=3)
        assert client.delete(f"/v1/memories/alice/facts/{fid}").status_code == 200
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "memory": "alice"})
        assert r.json()["memory"]["in_scope"] is False
    finally:
        store.close()


# -- command line ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_edit_list_ask_forget_export_import(tmp_path, capsys, checkpoint):
    common = ["--checkpoint", str(checkpoint), "--scope-encoder", "larimar", "--store", str(tmp_path / "s")]
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "{} plays the sport of", "subject": "messi", "target_new": "tennis"})
                     + "\n" + json.dumps("the river of paris is berlin") + "\n")
    code, out, err = run_cli(capsys, "edit", FACT, "--file", str(facts), "--json", *common)
    assert code == 0, err
    ids = json.loads(out)["ids"]
    assert len(ids) == 3 and json.loads(out)["size"] == 3

    code, out, _ = run_cli(capsys, "memories", "list", "--json", "--store", str(tmp_path / "s"))
    assert code == 0 and [f["text"] for f in json.loads(out)["facts"]][1] == "messi plays the sport of tennis"
    code, out, _ = run_cli(capsys, "memories", "show", ids[0], "--json", "--store", str(tmp_path / "s"))
    assert code == 0 and json.loads(out)["text"] == FACT

    code, out, err = run_cli(capsys, "ask", PROMPT, "--json", "--max-tokens", "3", "--scope-threshold", "-1", *common)
    assert code == 0, err
    ans = json.loads(out)
    assert ans["in_scope"] is True and ans["nearest_id"] in ids and isinstance(ans["text"], str)

    code, out, err = run_cli(capsys, "memories", "export", str(tmp_path / "exp"), "--json", *common)
    assert code == 0, err
    code, out, err = run_cli(capsys, "forget", ids[1], "--json", *common)
    assert code == 0 and json.loads(out)["size"] == 2
    code, out, err = run_cli(capsys, "memories", "import", str(tmp_path / "exp"), "--namespace", "copy", "--json",
                             *common)
    assert code == 0, err
    assert json.loads(out)["ids"] == ids

    # user errors: exit code 2, one line, no traceback
    for argv in (["forget", "nope", *common], ["edit", "  ", *common], ["memories", "show", "nope", "--store",
                                                                          str(tmp_path / "s")],
                 ["ask", PROMPT, "--checkpoint", str(tmp_path / "missing"), "--store", str(tmp_path / "s")],
                 ["edit", FACT, "--namespace", "bad name!", *common], ["edit", FACT, "--refine-steps", "-2", *common],
                 ["edit", FACT, "--refine-tail-tokens", "-1", *common]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("larimar: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_chat_and_keys(tmp_path, capsys, checkpoint, monkeypatch):
    common = ["--checkpoint", str(checkpoint), "--scope-encoder", "larimar", "--store", str(tmp_path / "s")]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/edit {FACT}\n/list\n{PROMPT}\n/forget nope\n/bogus\n/quit\n"))
    code, out, err = run_cli(capsys, "chat", "--max-tokens", "2", "--scope-threshold", "-1", *common)
    assert code == 0, err
    lines = out.replace("> ", "").splitlines()
    assert lines[0].startswith("written ") and FACT in lines[1]
    assert "[memory:" in out and "error:" in out and "unknown command" in out

    store = ["--store", str(tmp_path / "s")]  # keys never load a model for an existing store
    code, out, err = run_cli(capsys, "keys", "add", "ci", "--namespace", "default", "--rights", "write", "--json",
                             *store)
    assert code == 0, err
    assert json.loads(out)["token"].startswith("lmk_")
    code, out, _ = run_cli(capsys, "keys", "list", "--json", "--store", str(tmp_path / "s"))
    assert json.loads(out)[0]["name"] == "ci" and json.loads(out)[0]["rights"] == "write"
    code, _, err = run_cli(capsys, "keys", "add", "ci", *store)
    assert code == 2 and "already exists" in err
    with pytest.raises(SystemExit) as exit_:  # model options only where a model is used
        cli_main(["keys", "list", "--scope-encoder", "larimar", *store])
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


# -- real backbones (untrained conditioning) ------------------------------------------------------------------------

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.slow
def test_real_backbones_scope_and_counterfact_smoke():
    from larimar.backbones import BackboneNotFoundError, load_decoder, load_encoder
    from larimar.data import load_counterfact
    from larimar.eval.editors import LarimarEditor
    from larimar.eval.edits import evaluate_counterfact
    from larimar.model import LarimarConfig, LarimarModel

    path = DATA / "counterfact_rome" / "counterfact_rome_929.json"
    if not path.is_file():
        pytest.skip("shared data not found")
    try:
        enc, dec = load_encoder(), load_decoder()
    except BackboneNotFoundError as err:
        pytest.skip(str(err))
    model = LarimarModel.from_backbones(LarimarConfig(decoder_start_token="<|endoftext|>"), *enc, *dec)
    lm = Larimar(model)  # MiniLM scope detector, threshold 0.6, per-sentence prompt scoring
    lm.edit(["Laurent Cars was employed in Philadelphia"])
    queries = ["Hybrid vehicles. Laurent Cars found employment in", "Victor Hugo was employed in"]
    _, in_scope, _ = lm.read_latent(queries)
    assert in_scope == [True, False]
    s = evaluate_counterfact(LarimarEditor(lm), load_counterfact(path, limit=1).records, gen_tokens=0)
    assert s["n_cases"] == 1 and s["scope_rate_rewrite"] == 100.0 and len(lm) == 0


def test_cli_serve_wires_the_real_engine(tmp_path, capsys, checkpoint, monkeypatch):
    import larimar.serving.service

    seen = {}
    monkeypatch.setattr(larimar.serving.service, "serve", lambda **kw: seen.update(kw))
    code, _, err = run_cli(capsys, "serve", "--port", "8123", "--checkpoint", str(checkpoint), "--scope-encoder",
                           "larimar", "--store", str(tmp_path / "s"))
    assert code == 0, err
    assert isinstance(seen["engine"], LarimarEngine) and seen["port"] == 8123 and seen["require_keys"] is True
    assert seen["store_path"] == str(tmp_path / "s") and seen["limits"] is None  # serve() reads $LARIMAR_LIMITS
    code, _, err = run_cli(capsys, "serve", "--checkpoint", str(checkpoint), "--scope-encoder", "larimar",
                           "--store", str(tmp_path / "s"), "--limits", '{"max_concurrent_work": 1, "max_batch": 8}')
    assert code == 0, err
    assert seen["limits"].max_concurrent_work == 1 and seen["limits"].max_batch == 8
    for bad in ('{"max_batch": 0}', '{"no_such_limit": 1}', "[1]", "{not json"):  # one clear line, nothing served
        seen.clear()
        code, _, err = run_cli(capsys, "serve", "--checkpoint", str(checkpoint), "--scope-encoder", "larimar",
                               "--store", str(tmp_path / "s"), "--limits", bad)
        assert code == 2 and "--limits" in err and "Traceback" not in err and not seen


@pytest.mark.parametrize("read_mode", ["keyed", "recall", "memory", "nearest"])
@pytest.mark.parametrize("use_scope", [True, False])
def test_route_each_equals_routing_every_query_alone(read_mode, use_scope):
    # a batch of queries, each against its own memory (two namespaces and an empty one), routed with one pass of
    # each encoder, gives exactly what each query gets alone
    lm = tiny_larimar(read_mode=read_mode, use_scope=use_scope)
    a, b = tiny_larimar(read_mode=read_mode), tiny_larimar(read_mode=read_mode)
    a.edit(["The capital of Zubrowka is Lutz.", "Halvard Stenberg plays the cello."])
    b.edit(["The CEO of Northwind is Maria Okafor.", "Project Bluebird was cancelled in March."])
    empty = tiny_larimar(read_mode=read_mode)
    targets = [(a.memory, a.scope), (b.memory, b.scope), (a.memory, a.scope), (empty.memory, empty.scope),
               (b.memory, b.scope)]
    queries = ["The capital of Zubrowka is", "The CEO of Northwind is", "Who plays the cello? Stenberg plays the",
               "The capital of Zubrowka is", "The weather today is"]
    together = lm.route_each(targets, queries)
    assert len(together) == len(queries)
    for (memory, scope), q, r in zip(targets, queries, together):
        alone = lm.route_in(memory, scope, [q])
        assert r.in_scope == alone.in_scope and r.nearest_ids == alone.nearest_ids
        assert torch.allclose(r.latents, alone.latents, atol=1e-5)
        assert torch.allclose(r.similarities, alone.similarities, atol=1e-6, equal_nan=True)
    assert together[0].in_scope == [True] and together[3].in_scope == [False]  # the empty memory: plain decoder
    with pytest.raises(ValueError, match="targets"):
        lm.route_each(targets[:2], queries)
