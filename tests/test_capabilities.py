"""Larimar's capabilities (larimar.eval) on tiny random models and fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
from tiny_larimar import backbones, save_tiny_checkpoint, tiny_larimar

from larimar.cli.main import main
from larimar.data import EditRequest, load_counterfact, load_zsre
from larimar.eval.capacity import evaluate_capacity
from larimar.eval.editors import LarimarEditor, SequentialHFEditor
from larimar.eval.forgetting import (
    evaluate_forgetting,
    forget_exactness,
    unknown_request,
)
from larimar.eval.leakage import attack_prompts, evaluate_leakage, sample_hf
from larimar.eval.longcontext import (
    build_document,
    chunk_document,
    evaluate_longcontext,
    fact_text,
    filler_sentences,
    paraphrase_question,
    plain_window_nll,
    read_document,
    write_document,
)
from larimar.eval.metrics import contains_answer
from larimar.eval.sequential import evaluate_sequential
from larimar.memory import resize_memory

CF = FIXTURES / "cf_tiny.json"
ZSRE = FIXTURES / "zsre_tiny.json"
GRACE_TINY = FIXTURES.parent.parent / "configs" / "baselines" / "grace_tiny-test.yaml"
PARAGRAPHS = ["The capital of germany is berlin. Hello world, who was born in paris? The river in the city was a "
              "tower. Football is a sport in france.", "The eiffel tower is in paris. Which language speaks english "
              "in the city? The river was born in a tower."]


def _cf():
    return load_counterfact(CF).records


def _many_facts(n: int) -> list[EditRequest]:
    """n distinct CounterFact-like facts over the fixture vocabulary."""
    subjects = ["france", "germany", "paris", "berlin", "rome", "tennis", "football", "english", "french", "eiffel"]
    objects = ["rome", "paris", "berlin", "tennis", "football", "english", "french", "germany"]
    out = []
    for i in range(n):
        s = subjects[i % len(subjects)] + (" city" if i >= len(subjects) else "")
        new, true = objects[i % len(objects)], objects[(i + 3) % len(objects)]
        out.append(EditRequest(prompt="the capital of {} is", subject=s, target_new=new, target_true=true,
                               paraphrase_prompts=[f"where is the capital of {s}"], case_id=i))
    return out


# -- memory size and exact forgetting -----------------------------------------------------------------------------


def test_resize_memory_keeps_learned_rows():
    mem = tiny_larimar().model.memory  # K0 = 8, C = 16
    with torch.no_grad():
        mem.M0.add_(0.1 * torch.randn(mem.M0.shape, generator=torch.Generator().manual_seed(1)))
    assert resize_memory(mem, 8) is mem
    small = resize_memory(mem, 5)
    assert small.config.num_slots == 5 and torch.equal(small.M0, mem.M0[:5])
    big = resize_memory(mem, 12, "random", seed=3)
    assert big.config.num_slots == 12 and big.M0.shape == (12, 16) and torch.equal(big.M0[:8], mem.M0)
    med = mem.M0.norm(dim=1).median()
    assert torch.allclose(big.M0[8:].norm(dim=1), med.expand(4), rtol=1e-5)
    assert torch.equal(resize_memory(mem, 12, "random", seed=3).M0, big.M0)  # seeded
    eye = resize_memory(mem, 12, "eye")
    assert torch.equal(eye.M0[8:], torch.eye(12, 16)[8:])
    assert mem.config.num_slots == 8  # the original is untouched
    with pytest.raises(ValueError, match="slot init"):
        resize_memory(mem, 12, "zeros")


def test_set_num_slots_gives_the_editor_a_k_slot_memory():
    lm = tiny_larimar()
    assert lm.resize_memory(20) == 20
    assert lm.memory.M.shape == (20, 16) and lm.memory.U.shape == (20, 20)
    lm.edit(["the capital of france is rome"])
    assert lm.resize_memory(None) == 20 and len(lm) == 0


def test_forgetting_is_exact_at_the_memory_level():
    facts = _cf()
    lm = tiny_larimar()
    for f, i in zip(facts, "abc"):  # one fact per write: each latent encoded alone (batch padding changes fp32)
        lm.edit([f], ids=[i])
    lm.forget(["b"])
    ref = tiny_larimar()
    ref.edit([facts[0]], ids=["a"])
    ref.edit([facts[2]], ids=["c"])
    assert lm.memory.ids == ref.memory.ids == ["a", "c"]
    assert torch.allclose(lm.memory.M, ref.memory.M, rtol=0, atol=1e-10)
    assert torch.allclose(lm.memory.U, ref.memory.U, rtol=0, atol=1e-10)
    assert float(lm.memory.M.abs().max()) > 1e-3  # a real memory was compared, not two zeros
    full = tiny_larimar()
    full.edit(facts, ids=["a", "b", "c"])  # one batch write
    assert forget_exactness(full.memory, "b") < 1e-10
    assert len(full.memory) == 3  # forget_exactness works on copies
    with pytest.raises(KeyError):
        forget_exactness(full.memory, "zzz")


# -- 1. sequential editing ------------------------------------------------------------------------------------


def test_sequential_larimar_curve_and_keys():
    records = load_zsre(ZSRE).records
    lm = tiny_larimar()
    s = evaluate_sequential(LarimarEditor(lm), records, checkpoints=(1, 2, 50), batch_size=2)
    for key in ("edit_retention", "edit_retention_em", "rephrase_acc", "locality", "locality_none",
                "edit_retention_none"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["n_edits"] == 3 and [p["n_edits"] for p in s["curve"]] == [1, 2, 3]
    assert s["curve"][-1]["edit_retention"] == s["edit_retention"]
    assert s["curve"][0]["edit_retention_em"] is None  # exact match only after the last edit by default
    assert s["locality_none"] == 1.0  # the unedited editor agrees with itself
    assert len(s["cases"]) == 3 and len(lm) == 0  # memory emptied at the end


def test_sequential_edits_accumulate_in_one_memory():
    records = load_zsre(ZSRE).records
    lm = tiny_larimar()
    seen = []
    ed = LarimarEditor(lm)
    orig = ed.edit

    def spy(reqs):
        orig(reqs)
        seen.append(len(lm))

    ed.edit = spy
    evaluate_sequential(ed, records, checkpoints=(), batch_size=8)
    assert seen == [1, 2, 3]  # one write per fact, never reset in between


def test_sequential_grace_baseline_restores_weights():
    pytest.importorskip("larimar.baselines")
    from larimar.baselines import load_hparams
    from larimar.baselines.grace import grace_codebook
    from larimar.eval.editors import HFBaselineEditor

    _, _, dec, dtok = backbones(0)
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    base = HFBaselineEditor("grace", dec, dtok, load_hparams("grace", GRACE_TINY), start_token_id=dtok.eos_token_id)
    ed = SequentialHFEditor.from_editor(base)
    s = evaluate_sequential(ed, load_zsre(ZSRE).records, checkpoints=(2,), batch_size=4)
    assert s["method"] == "grace" and s["n_edits"] == 3 and len(s["curve"]) == 2
    for key in ("edit_retention", "rephrase_acc", "locality", "edit_retention_none"):
        assert 0.0 <= s[key] <= 1.0, key
    assert all(torch.equal(v, before[k]) for k, v in dec.state_dict().items())
    assert grace_codebook(dec, 1) is None  # GRACE's adaptor removed by reset


def test_sequential_hf_editor_applies_one_request_at_a_time():
    pytest.importorskip("larimar.baselines")
    from larimar.baselines import load_hparams
    from larimar.baselines.grace import grace_codebook
    from larimar.eval.editors import HFBaselineEditor

    _, _, dec, dtok = backbones(0)
    hp = load_hparams("grace", GRACE_TINY)
    ed = SequentialHFEditor.from_editor(HFBaselineEditor("grace", dec, dtok, hp))
    records = load_zsre(ZSRE).records
    p, new = records[0].full_prompt, " " + records[0].target_new
    nll0 = float(ed.score([p], [new])[0])
    ed.edit(records[:2])
    ed.edit(records[2:])
    assert len(ed._handles) == 2 and grace_codebook(dec, hp.layer).keys.shape[0] == 3
    assert float(ed.score([p], [new])[0]) < nll0 - 0.1  # the edit is in effect
    ed.reset()
    assert grace_codebook(dec, hp.layer) is None and float(ed.score([p], [new])[0]) == pytest.approx(nll0, abs=1e-6)


def test_sequential_hf_editor_keys_match_the_scoring_context():
    # scoring prepends the start token: keys computed without it never match (GRACE then does nothing)
    pytest.importorskip("larimar.baselines")
    from larimar.baselines import load_hparams
    from larimar.eval.editors import HFBaselineEditor

    _, _, dec, dtok = backbones(0)
    base = HFBaselineEditor("grace", dec, dtok, load_hparams("grace", GRACE_TINY), start_token_id=dtok.eos_token_id)
    ed = SequentialHFEditor.from_editor(base)
    r = load_zsre(ZSRE).records[0]
    p, new = r.full_prompt, " " + r.target_new
    nll0 = float(ed.score([p], [new])[0])
    ed.edit([r])
    assert float(ed.score([p], [new])[0]) < nll0 - 0.1
    ed.reset()


# -- 2. capacity ----------------------------------------------------------------------------------------------------


def test_capacity_rows():
    lm = tiny_larimar()
    rows = evaluate_capacity(lm, _many_facts(12), [2, 4, 12, 100], batch_size=4)
    assert [r["n"] for r in rows] == [2, 4, 12]  # 100 > the facts loaded: skipped
    for r in rows:
        for k in ("rewrite_acc", "token_acc", "rewrite_acc_none", "token_acc_none", "scope_rate", "rewrite_acc_rag",
                  "token_acc_rag", "scope_rate_rag"):
            assert 0.0 <= r[k] <= 1.0
        assert r["rag_write_s"] > 0
    assert len(lm) == 0
    never = evaluate_capacity(tiny_larimar(threshold=2.0), _many_facts(4), [4], batch_size=4)[0]
    assert never["scope_rate_rag"] == 0.0 and never["rewrite_acc_rag"] == never["rewrite_acc_none"]
    assert [r["n_scored"] for r in rows] == [2, 4, 12]
    with pytest.raises(ValueError, match="no N"):
        evaluate_capacity(lm, _many_facts(3), [10])
    sampled = evaluate_capacity(lm, _many_facts(12), [4, 12], batch_size=4, sample=5, seed=1)
    assert [r["n_scored"] for r in sampled] == [4, 5]  # every fact when N <= sample, else the sample
    again = evaluate_capacity(lm, _many_facts(12), [12], batch_size=4, sample=5, seed=1)
    assert again[0]["rewrite_acc"] == sampled[1]["rewrite_acc"]  # the sample is seeded


# -- 3. forgetting -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("replace_unknown", [False, True])
def test_forgetting_summary(replace_unknown):
    lm = tiny_larimar()
    summary, rows = evaluate_forgetting(lm, _many_facts(6), n=5, trials=3, replace_unknown=replace_unknown,
                                            retained_sample=2, batch_size=4)
    for k in ("forgotten_recall", "forgotten_recall_none", "retained_recall", "forgotten_em", "retained_em",
              "forgotten_recall_rag", "retained_recall_rag", "forgotten_em_rag", "retained_em_rag"):
        assert 0.0 <= summary[k] <= 1.0, k
    assert summary["n"] == 5 and summary["trials"] == 3 and len(rows) == 3
    assert len({r["case_id"] for r in rows}) == 3 and all(r["n_retained_measured"] == 2 for r in rows)
    assert summary["forget_max_abs_error"] < 1e-10
    with pytest.raises(ValueError):
        evaluate_forgetting(lm, _many_facts(3), n=10)


def test_forget_trial_restores_the_memory():
    facts = _many_facts(4)
    lm = tiny_larimar()
    for i, f in enumerate(facts):  # one fact per write: the re-written latent is then bit-identical
        lm.edit([f], ids=[f"f{i}"])
    M = lm.memory.M.clone()
    lm.forget(["f2"])
    lm.edit([unknown_request(facts[2])], ids=["u"])
    assert "unknown" in lm.facts[-1][1]
    lm.forget(["u"])
    lm.edit([facts[2]], ids=["f2"])
    assert torch.allclose(lm.memory.M, M, rtol=0, atol=1e-10)


# -- 4. leakage ------------------------------------------------------------------------------------------------------


def test_contains_answer_and_attack_prompts():
    assert contains_answer("It is Paris, of course", "paris")
    assert not contains_answer("Parisian food", "Paris")
    assert contains_answer("in New York City", "new york")
    assert not contains_answer("anything", " ")
    req = _cf()[0]
    ps = attack_prompts(req, 4)
    assert ps[0] == req.full_prompt and ps[1:] == req.paraphrase_prompts and len(attack_prompts(req, 2)) == 2


def test_leakage_is_seeded_and_reports_rates():
    lm = tiny_larimar()
    kw = dict(n=3, n_samples=2, max_new_tokens=3, seed=5)
    s1, rows1 = evaluate_leakage(lm, _cf(), **kw)
    s2, rows2 = evaluate_leakage(lm, _cf(), **kw)
    assert rows1 == rows2 and s1 == s2
    for k in ("attack_success", "attack_success_none", "unknown_rate", "scope_rate", "attack_success_rag",
              "scope_rate_rag", "unknown_rate_rag"):
        assert 0.0 <= s1[k] <= 1.0
    assert all(len(r["generations"]) == len(attack_prompts(_cf()[i])) for i, r in enumerate(rows1))
    assert all(len(g) == 2 for r in rows1 for g in r["generations"])
    assert len(lm) == 0


def test_sample_hf_is_seeded():
    _, _, dec, dtok = backbones(0)
    g = torch.Generator().manual_seed(0)
    a = sample_hf(dec, dtok, dtok.eos_token_id, "the capital of france is", 3, 4, 1.0, 0.9, g)
    b = sample_hf(dec, dtok, dtok.eos_token_id, "the capital of france is", 3, 4, 1.0, 0.9,
                      torch.Generator().manual_seed(0))
    assert a == b and len(a) == 3


# -- 5. long context -----------------------------------------------------------------------------------------------


def test_document_builder_puts_every_fact_once_at_seeded_positions():
    facts = _many_facts(5)
    fillers = [f"Filler sentence number {i} is here." for i in range(12)]
    doc = build_document(facts, fillers, seed=1)
    assert len(doc.sentences) == 17 and len(doc.facts) == 5
    assert sorted(f.case_id for f in doc.facts) == list(range(5))
    for f, pos in zip(doc.facts, doc.fact_positions):
        assert doc.sentences[pos] == fact_text(f)
        assert doc.text.count(fact_text(f)) == 1
    assert [s for i, s in enumerate(doc.sentences) if i not in doc.fact_positions] == fillers  # order kept
    again = build_document(facts, fillers, seed=1)
    assert again.sentences == doc.sentences and again.fact_positions == doc.fact_positions
    others = [build_document(facts, fillers, seed=s).fact_positions for s in range(2, 6)]
    assert any(p != doc.fact_positions for p in others)
    with pytest.raises(ValueError):
        build_document([], fillers)


def test_filler_and_chunking():
    fill = filler_sentences(PARAGRAPHS, 4, min_words=5)
    assert fill == ["The capital of germany is berlin.", "Hello world, who was born in paris?",
                    "The river in the city was a tower.", "Football is a sport in france."]
    assert chunk_document(" ".join(fill)) == fill
    assert fact_text(_cf()[0]) == "The capital of France is Rome."


def test_hierarchical_read_picks_the_memory_of_the_nearest_sentence():
    lm = tiny_larimar()
    chunks = [fact_text(f) for f in _cf()] + filler_sentences(PARAGRAPHS, 5)
    hm = write_document(lm, chunks, chunk_items=3)
    assert len(hm.memories) == 3 and hm.group_of == [0, 0, 0, 1, 1, 1, 2, 2]
    questions = [f.full_prompt for f in _cf()]
    zc, nearest = read_document(lm, hm, questions, "scope")  # recall: each sentence's key in its chunk memory
    assert zc.shape == (3, 16) and nearest == [0, 1, 2]
    assert torch.allclose(zc, hm.memories[0].read_keyed(["c0", "c1", "c2"]).float(), atol=1e-5)
    z, _ = read_document(lm, hm, questions, "scope", read_mode="keyed")  # that read-out projected on the question
    zq = lm.model.encode_texts(questions).float()
    assert torch.allclose(z, hm.memories[0].read_keyed(["c0", "c1", "c2"], zq).float(), atol=1e-5)
    zm, _ = read_document(lm, hm, questions, "scope", read_mode="memory")  # the question's latent
    assert torch.allclose(zm, hm.memories[0].read(zq).float(), atol=1e-5)
    assert not torch.allclose(zm, z, atol=1e-3)
    zr, _ = read_document(lm, hm, questions, "recursive")
    assert zr.shape == (3, 16) and torch.isfinite(zr).all()
    zn, _ = read_document(lm, hm, questions, "scope", read_mode="nearest")
    assert torch.equal(zn, hm.latents[[0, 1, 2]])
    with pytest.raises(ValueError):
        read_document(lm, hm, questions, "flat")


def test_document_sentences_are_written_as_edit_writes_them():
    """write_document stores `fact_latents` (encoded, then refined); steps=0 stores the encoder's latents."""
    from larimar.editor import Refinement

    chunks = [fact_text(f) for f in _cf()] + filler_sentences(PARAGRAPHS, 3)
    lm = tiny_larimar()
    hm = write_document(lm, chunks, chunk_items=4, batch_size=2)  # batches of 2: the same latents as one batch
    _, expected = lm.fact_latents(chunks)
    assert torch.allclose(hm.latents, expected, atol=1e-5)
    enc = lm.model.encode_texts(chunks).float()
    assert not torch.allclose(hm.latents, enc, atol=1e-3)  # refined: moved off the encoder's latents
    one_shot = tiny_larimar(refinement=Refinement(steps=0))
    assert torch.allclose(write_document(one_shot, chunks, chunk_items=4).latents, enc, atol=1e-5)
    with pytest.raises(ValueError, match="at most"):
        write_document(lm, ["x" * 5000])


def test_plain_window_keeps_the_last_tokens():
    model = tiny_larimar().model
    tok = model.decoder_tokenizer
    doc_ids = tok(" ".join(filler_sentences(PARAGRAPHS, 8)), add_special_tokens=False)["input_ids"]
    nll, starts = plain_window_nll(model, doc_ids, ["the capital of france is"], [" rome"], window=12)
    p_len, c_len = 5, 1
    sep = len(tok("\n", add_special_tokens=False)["input_ids"])
    assert starts == [len(doc_ids) - (12 - 1 - sep - p_len - c_len)]
    nll_all, starts_all = plain_window_nll(model, doc_ids, ["the capital of france is"], [" rome"], window=1000)
    assert starts_all == [0] and nll.shape == (1,) and torch.isfinite(nll_all).all()


def test_plain_window_cached_context_matches_full_forward():
    """Rows scored on the shared context's KV cache equal one full forward of [start] + context + "\\n" + q + a."""
    model = tiny_larimar().model
    tok = model.decoder_tokenizer
    doc_ids = tok(" ".join(filler_sentences(PARAGRAPHS, 8)), add_special_tokens=False)["input_ids"]
    prompts = ["the capital of france is", "lionel messi plays", "hello"]
    conts = [" rome", " tennis football", " world"]
    window = 20
    nll, starts = plain_window_nll(model, doc_ids, prompts, conts, window=window, batch_size=2)
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    enc = [(tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"])
           for p, c in zip(prompts, conts)]
    ctx = doc_ids[-(window - 1 - len(sep) - max(len(p) + len(c) for p, c in enc)):]
    assert starts == [len(doc_ids) - len(ctx)] * 3
    for i, (p, c) in enumerate(enc):
        row = torch.tensor([[model.start_token_id, *ctx, *sep, *p, *c]])
        assert row.shape[1] <= window
        with torch.no_grad():
            logp = torch.log_softmax(model.decode_logits(row, None, None).float()[0, :-1], -1)
        s = row.shape[1] - len(c)
        ref = -logp[s - 1 : row.shape[1] - 1].gather(-1, row[0, s:, None]).mean()
        assert nll[i].item() == pytest.approx(ref.item(), abs=1e-4)


def test_longcontext_summary():
    lm = tiny_larimar()
    s, rows = evaluate_longcontext(lm, _cf(), PARAGRAPHS, 3, filler_per_fact=2, window=30, chunk_items=4)
    for k in ("recall", "recall_plain", "recall_none", "recall_rag", "facts_in_window", "right_memory",
              "prefix_recall", "prefix_recall_plain", "prefix_recall_rag", "prefix_recall_none", "rag_scope_rate"):
        assert 0.0 <= s[k] <= 1.0, k
    # the questions are the paraphrases without their distractor sentence, not the written sentences' beginnings
    by_case = {r.case_id: r for r in _cf()}
    for row in rows:
        assert row["question"] == paraphrase_question(by_case[row["case_id"]])
        assert row["question"] != row["prefix_question"] and row["question_kind"] == "paraphrase"
    # recall inside / outside the plain decoder's window, from the per-fact rows
    for key in ("success", "success_plain", "success_rag", "success_none"):
        name = {"success": "recall"}.get(key, "recall" + key[len("success"):])
        for where, tag in ((True, "_in_window"), (False, "_out_window")):
            vals = [float(r[key]) for r in rows if r["fact_in_window"] is where]
            assert s[name + tag] == (sum(vals) / len(vals) if vals else None)
    assert s["n_in_window"] + s["n_out_window"] == 3
    assert s["n_facts"] == 3 and s["n_sentences"] == 9 and s["n_memories"] == 3 and s["read_ms"] > 0
    assert len(rows) == 3
    s_wide, _ = evaluate_longcontext(lm, _cf(), PARAGRAPHS, 3, filler_per_fact=2, window=4000, chunk_items=4)
    assert s_wide["facts_in_window"] == 1.0 and s_wide["recall_plain_out_window"] is None
    assert s["n_plain"] == 3 and s["recall_on_plain_sample"] == s["recall"]
    # the plain decoder asked a seeded sample of 2 of the 3 questions: the same answers on those
    s2, rows2 = evaluate_longcontext(lm, _cf(), PARAGRAPHS, 3, filler_per_fact=2, window=30, chunk_items=4,
                                     plain_sample=2)
    asked = [r for r in rows2 if r["success_plain"] is not None]
    assert s2["n_plain"] == 2 and len(asked) == 2
    by_case = {r["case_id"]: r["success_plain"] for r in rows}
    assert all(r["success_plain"] == by_case[r["case_id"]] for r in asked)
    assert s2["recall_plain"] == sum(r["success_plain"] for r in asked) / 2
    assert [r["success"] for r in rows2] == [r["success"] for r in rows] and s2["facts_in_window"] == s["facts_in_window"]


# -- command line ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _run(args, capsys):
    code = main(args)
    assert code == 0, capsys.readouterr().err


def _common(checkpoint, out):
    return ["--checkpoint", str(checkpoint), "--scope-encoder", "larimar", "--out", str(out), "--batch-size", "4"]


def _files(out, png, cases=True):
    assert (out / "summary.json").is_file() and (out / "summary.md").is_file() and (out / png).is_file()
    assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "cases.jsonl").is_file() == cases
    return json.loads((out / "summary.json").read_text())


def test_cli_sequential(tmp_path, capsys, checkpoint):
    pytest.importorskip("larimar.baselines")
    out = tmp_path / "seq"
    _run(["eval", "sequential", "--data", str(ZSRE), "--edits", "2", "--slots", "12",
          "--checkpoints", "1", "--baselines", "rag,grace", "--hparams", f"grace={GRACE_TINY}",
          *_common(checkpoint, out)], capsys)
    s = _files(out, "sequential.png")
    for k in ("edit_retention", "rephrase_acc", "locality", "locality_none", "n_edits", "curve"):
        assert k in s, k
    assert s["n_edits"] == 2 and s["slots"] == 12 and s["slot_init"] == "M0 + 4 random rows"
    assert [p["n_edits"] for p in s["curve"]] == [1, 2] and "grace" in s["baselines"] and "rag" in s["baselines"]
    assert s["refine_steps"] == 5  # the written latents are refined
    assert len((out / "cases.jsonl").read_text().splitlines()) == 6  # 2 facts x 3 methods
    assert "| grace |" in (out / "summary.md").read_text() and "| rag |" in (out / "summary.md").read_text()
    # a baseline alone, its curve plotted beside the earlier run's (--compare)
    out3 = tmp_path / "seq_grace"
    _run(["eval", "sequential", "--data", str(ZSRE), "--edits", "3", "--slots", "12", "--checkpoints", "1",
          "--no-larimar", "--baselines", "grace", "--hparams", f"grace={GRACE_TINY}", "--compare", str(out),
          *_common(checkpoint, out3)], capsys)
    s3 = _files(out3, "sequential.png")
    assert s3["method"] == "grace" and s3["n_edits"] == 3 and s3["compared_runs"] == [str(out)]
    table = (out3 / "summary.md").read_text()
    assert f"| larimar | recall | 5 | {out} | 2 |" in table and f"| grace | - | - | {out} | 2 |" in table
    assert "| grace | - | - | - | 3 |" in table
    assert len((out3 / "cases.jsonl").read_text().splitlines()) == 3  # the compared runs' cases are not copied
    # only the drawing of earlier runs: no model, no edits
    out4 = tmp_path / "seq_all"
    _run(["eval", "sequential", "--data", str(ZSRE), "--no-larimar", "--compare", str(out), "--compare", str(out3),
          "--out", str(out4)], capsys)
    s4 = _files(out4, "sequential.png", cases=False)
    assert s4["task"] == "sequential_compare"
    assert [r["method"] for r in s4["rows"]] == ["larimar", "rag", "grace", "grace"]
    assert s4["rows"][3]["n_edits"] == 3 and s4["rows"][3]["edit_retention"] == s3["edit_retention"]
    assert s4["rows"][0]["read_mode"] == "recall" and "read_mode" not in s4["rows"][3]  # grace has no read mode
    code = main(["eval", "sequential", "--data", str(ZSRE), "--no-larimar", "--compare", str(out4),
                     "--out", str(tmp_path / "d")])
    assert code == 2 and "not the drawing" in capsys.readouterr().err
    code = main(["eval", "sequential", "--data", str(ZSRE), "--no-larimar", *_common(checkpoint, tmp_path / "b")])
    assert code == 2 and "--no-larimar needs --baselines" in capsys.readouterr().err
    code = main(["eval", "sequential", "--data", str(ZSRE), "--compare", str(tmp_path / "nowhere"),
                     *_common(checkpoint, tmp_path / "c")])
    assert code == 2 and "--compare" in capsys.readouterr().err


def test_cli_capacity_forget_leakage(tmp_path, capsys, checkpoint):
    out = tmp_path / "cap"
    _run(["eval", "capacity", "--data", str(CF), "--n", "1,3", "--slots", "8", *_common(checkpoint, out)], capsys)
    s = _files(out, "capacity.png", cases=False)
    assert [r["n"] for r in s["results"]] == [1, 3] and "rewrite_acc" in s["results"][0]

    out = tmp_path / "forget"
    _run(["eval", "forget", "--data", str(CF), "--n", "2,3", "--trials", "2", "--replace-unknown",
          *_common(checkpoint, out)], capsys)
    s = _files(out, "forget.png")
    assert [r["n"] for r in s["results"]] == [2, 3]
    for r in s["results"]:
        assert {"forgotten_recall", "forgotten_recall_none", "retained_recall", "n"} <= set(r)
        assert r["replace_unknown"] is True
    assert len((out / "cases.jsonl").read_text().splitlines()) == 4

    out = tmp_path / "leak"
    _run(["eval", "leakage", "--data", str(CF), "--n", "2", "--samples", "2", "--gen-tokens", "3",
          "--baselines", "grace", "--hparams", f"grace={GRACE_TINY}", *_common(checkpoint, out)], capsys)
    s = _files(out, "leakage.png")
    assert {"attack_success", "attack_success_none", "attack_success_grace"} <= set(s) and s["n"] == 2


def test_cli_longcontext(tmp_path, capsys, checkpoint):
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text("".join(json.dumps({"id": i, "title": "t", "text": p}) + "\n" for i, p in enumerate(PARAGRAPHS)))
    out = tmp_path / "lc"
    _run(["eval", "longcontext", "--data", str(CF), "--wiki", str(wiki), "--n-facts", "2,3", "--filler-per-fact",
          "1", "--window", "24", "--chunk-items", "2", *_common(checkpoint, out)], capsys)
    s = _files(out, "longcontext.png")
    assert [r["n_facts"] for r in s["results"]] == [2, 3]
    for r in s["results"]:
        assert {"n_facts", "recall", "recall_plain", "recall_rag", "recall_plain_in_window",
                "recall_plain_out_window", "prefix_recall", "read_ms"} <= set(r)
    md = (out / "summary.md").read_text()
    assert "| 2 | rag |" in md and "prefix_recall (extra)" in md
    assert len((out / "cases.jsonl").read_text().splitlines()) == 5
    # without --window the plain decoder gets its own full window
    from larimar.editor import Larimar
    from larimar.eval.longcontext import decoder_window

    own = decoder_window(Larimar.from_pretrained(checkpoint, scope_encoder="larimar").model)
    out2 = tmp_path / "lc_own"
    _run(["eval", "longcontext", "--data", str(CF), "--wiki", str(wiki), "--n-facts", "2", "--filler-per-fact",
          "1", "--chunk-items", "2", *_common(checkpoint, out2)], capsys)
    assert _files(out2, "longcontext.png")["results"][0]["window"] == own > 24


def test_cli_errors(tmp_path, capsys, checkpoint):
    code = main(["eval", "capacity", "--data", str(CF), "--n", "1,x", *_common(checkpoint, tmp_path / "e")])
    assert code == 2 and "--n must be comma-separated integers" in capsys.readouterr().err
    code = main(["eval", "leakage", "--data", str(CF), "--baselines", "none", *_common(checkpoint, tmp_path)])
    assert code == 2 and "--baselines" in capsys.readouterr().err
    from larimar.cli.main import build_parser

    evals = next(a for a in build_parser()._actions if a.dest == "command").choices["eval"]
    assert {"sequential", "capacity", "forget", "leakage", "longcontext", "zsre"} <= set(
        next(a for a in evals._actions if a.dest == "eval_what").choices)
