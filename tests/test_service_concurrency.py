"""Concurrency of the real-model engine and the service (issue 19): threads sharing one tiny Larimar model.

The tiny model has a gated LoRA with a non-zero update, so a completion that loses its gate (another thread's
forward resetting a shared attribute) answers differently, and a refined write that loses it stores another latent.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_larimar import bow_embed, tiny_model

from larimar.conditioning import gated_lora
from larimar.editor import Larimar
from larimar.scope import ScopeDetector
from larimar.serving.engine import LarimarEngine
from larimar.serving.service import ServiceLimits, create_app, open_store_for

THREADS = 8
FACT = "The Eiffel Tower is located in the city of Rome"
PROMPT = "The Eiffel Tower is located in the city of"


def gated_engine() -> LarimarEngine:
    model = tiny_model(0, decoder_training="lora", lora_gated=True)
    layers = gated_lora(model.decoder.model)
    assert layers, "the tiny model must have gated LoRA layers"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_(0.0, 4.0, generator=g)  # a strong update: the gate changes the answers
    return LarimarEngine(Larimar(model, ScopeDetector(embed_fn=bow_embed, threshold=0.6), scope_threshold=0.6))


@pytest.fixture(scope="module")
def engine() -> LarimarEngine:
    return gated_engine()


def _run_threads(target, n: int = THREADS) -> list[str]:
    errors: list[str] = []
    start = threading.Barrier(n)

    def run(k: int) -> None:
        try:
            start.wait()
            target(k)
        except Exception as err:  # noqa: BLE001 - reported by the test
            errors.append(repr(err))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_the_gate_matters_for_the_tiny_model(engine: LarimarEngine) -> None:
    """Sanity: without its LoRA update the in-scope answer changes (else the tests below could not see a lost gate)."""
    mem = engine.new_memory()
    mem.write(engine.encode_facts([FACT]), ["eiffel"])
    with_gate, info = engine.complete(PROMPT, mem, {"eiffel": FACT}, 8, 0.0)
    assert info["in_scope"] is True
    layers = gated_lora(engine.lm.model.decoder.model)
    saved = [m.lora_B.detach().clone() for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.lora_B.zero_()
        without = engine.complete(PROMPT, mem, {"eiffel": FACT}, 8, 0.0)[0]
    finally:
        with torch.no_grad():
            for m, b in zip(layers, saved):
                m.lora_B.copy_(b)
    assert without != with_gate
    assert all(m.gate is None for m in layers)  # no gate outside a forward


def test_concurrent_identical_greedy_completions_equal_the_answer_alone(engine: LarimarEngine) -> None:
    mem = engine.new_memory()
    mem.write(engine.encode_facts([FACT]), ["eiffel"])
    facts = {"eiffel": FACT}
    alone = engine.complete(PROMPT, mem, facts, 8, 0.0)
    answers: list[tuple[str, dict]] = []

    def ask(_: int) -> None:
        for _ in range(6):
            answers.append(engine.complete(PROMPT, mem, facts, 8, 0.0))

    errors = _run_threads(ask)
    assert not errors, errors[:3]
    assert len(answers) == THREADS * 6
    wrong = [a for a in answers if a != alone]
    assert not wrong, f"{len(wrong)} of {len(answers)} differ from {alone[0]!r}, e.g. {wrong[0][0]!r}"


def test_concurrent_mixed_completions_equal_their_answers_alone(engine: LarimarEngine) -> None:
    """In-scope (gate on) and out-of-scope (gate off) prompts of different lengths, at once."""
    mem = engine.new_memory()
    facts = {"eiffel": FACT, "paris": "The capital of France is Berlin"}
    mem.write(engine.encode_facts(list(facts.values())), list(facts))
    prompts = [PROMPT, "The capital of France is", "Who plays tennis", "where was the king born in a city"]
    alone = {p: engine.complete(p, mem, facts, 6, 0.0) for p in prompts}
    assert {alone[p][1]["in_scope"] for p in prompts} == {True, False}
    got: list[tuple[str, tuple[str, dict]]] = []

    def ask(k: int) -> None:
        for j in range(6):
            p = prompts[(k + j) % len(prompts)]
            got.append((p, engine.complete(p, mem, facts, 6, 0.0)))

    errors = _run_threads(ask)
    assert not errors, errors[:3]
    wrong = [(p, a) for p, a in got if a != alone[p]]
    assert not wrong, f"{len(wrong)} of {len(got)} differ, e.g. {wrong[0]}"


@pytest.fixture()
def app_client() -> Iterator[tuple[object, object]]:
    from fastapi.testclient import TestClient

    eng = gated_engine()
    with tempfile.TemporaryDirectory() as d:
        store = open_store_for(eng, Path(d))
        limits = ServiceLimits(max_concurrent_work=THREADS, max_queued_work=4 * THREADS)
        client = TestClient(create_app(eng, store, limits, require_keys=False))
        try:
            yield eng, store, client
        finally:
            store.close()


def test_concurrent_writes_store_the_latents_written_alone(app_client) -> None:
    eng, store, client = app_client
    facts = {
        f"w{k}f{j}": f"The {word} of city{k} number {j} is {answer}"
        for k, (word, answer) in enumerate(
            [("tower", "Rome"), ("river", "Paris"), ("king", "Berlin"), ("sport", "tennis"),
             ("language", "French"), ("capital", "Germany"), ("world", "France"), ("fact", "English")]
        )
        for j in range(2)
    }
    statuses: list[int] = []

    def write(k: int) -> None:
        for j in range(2):
            fid = f"w{k}f{j}"
            r = client.post("/v1/memories/conc/facts", json={"facts": [facts[fid]], "ids": [fid]})
            statuses.append(r.status_code)
            if r.status_code != 201:
                raise AssertionError(r.text)

    errors = _run_threads(write)
    assert not errors, errors[:3]
    assert statuses == [201] * len(facts)
    stored = {e.id: e.latent for e in store.log("conc")}
    assert set(stored) == set(facts)
    for fid, text in facts.items():  # the latent written alone, now, one at a time
        z_alone = eng.encode_facts([text])[0].double()
        torch.testing.assert_close(stored[fid], z_alone, rtol=1e-5, atol=1e-6, msg=lambda m, f=fid: f"{f}: {m}")
    # and the memory answers every fact's prompt as a memory written alone would
    assert client.get("/v1/memories/conc").json()["size"] == len(facts)


def test_long_prompts_use_the_whole_window_and_beyond_it_get_422(app_client) -> None:
    """A prompt longer than max_decoder_length is not cut (the decoder's whole window is used); one that does not
    fit the window with max_tokens is a 422, never a 500 nor a silent cut."""
    eng, _, client = app_client
    assert eng.lm.model.config.max_decoder_length == 32 and eng.window == 128
    words = "the capital of france is paris and the river of germany is".split()
    long = " ".join((words * 20)[:100])  # 100 tokens: beyond max_decoder_length, within the window
    r = client.post("/v1/completions", json={"prompt": long, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 100
    assert client.post("/v1/completions", json={"prompt": long, "max_tokens": 27}).status_code == 200  # 1+100+27
    for prompt, max_tokens in ((long, 28), (" ".join((words * 20)[:130]), 1)):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens})
        assert r.status_code == 422 and "window" in r.json()["error"]["message"], r.text
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long}], "max_tokens": 28})
    assert r.status_code == 422, r.text
    r = client.post("/v1/completions", json={"prompt": "the capital of", "max_tokens": 3, "temperature": 1e-39})
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------------------------------------
# Dynamic batching: concurrent completions share one generate; greedy answers equal the answers given alone

MIXED_PROMPTS = [
    PROMPT, "The capital of France is", "Who plays tennis", "where was the king born in a city",
    "The river of Germany", "the language of the world is", "number", "The Eiffel Tower",
]


def test_complete_batch_equals_each_answer_alone(engine: LarimarEngine) -> None:
    """Different prompt lengths (left padding), memories, max_tokens, in / out of scope, one refused prompt, and a
    sampled row (its own group): every greedy row equals `complete` alone."""
    _check_batch_equals_alone(engine)


def test_complete_batch_hands_rows_to_the_plain_decoder_and_still_equals_each_answer_alone() -> None:
    """The tiny word-level tokenizer has no token that ends a sentence, so the model is given random
    `SentenceEnds` flags: rows are handed to the plain decoder at different steps, inside one batch."""
    from larimar.conditioning import SentenceEnds

    eng = gated_engine()
    model = eng.lm.model
    V = model.decoder.model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(5)
    flags = SentenceEnds(*(torch.rand(V, generator=g) < p for p in (0.5, 0.5, 0.1, 1.0)))
    model.__dict__["sentence_ends"] = flags  # the cached property, set for this model only
    handed = _check_batch_equals_alone(eng)
    eng.lm.memory_span = "all"
    every_token = _check_batch_equals_alone(eng)
    assert handed != every_token  # some answers changed after their first sentence


def _check_batch_equals_alone(engine: LarimarEngine) -> list[str]:
    from larimar.serving.schemas import CompletionItem

    facts_a = {"eiffel": FACT, "paris": "The capital of France is Berlin"}
    mem_a = engine.new_memory()
    mem_a.write(engine.encode_facts(list(facts_a.values())), list(facts_a))
    facts_b = {"tennis": "Who plays tennis is the king of Rome"}
    mem_b = engine.new_memory()
    mem_b.write(engine.encode_facts(list(facts_b.values())), list(facts_b))
    empty = engine.new_memory()
    too_long = " ".join(["the capital of france"] * 40)
    items = [
        CompletionItem(p, *([(mem_a, facts_a), (mem_b, facts_b), (empty, {})][k % 3]), 3 + k % 4, 0.0)
        for k, p in enumerate(MIXED_PROMPTS)
    ]
    items.insert(3, CompletionItem(too_long, mem_a, facts_a, 8, 0.0))
    items.append(CompletionItem(PROMPT, mem_a, facts_a, 5, 0.7, 0.9))
    got = engine.complete_batch(items)
    assert isinstance(got[3], ValueError) and "window" in str(got[3])
    text, info = got[-1]
    assert isinstance(text, str) and info["completion_tokens"] <= 5
    for it, g in zip(items[:3] + items[4:-1], got[:3] + got[4:-1]):
        alone = engine.complete(it.prompt, it.memory, it.facts, it.max_tokens, 0.0)
        assert g == alone, (it.prompt, g, alone)
    assert {g[1]["in_scope"] for g in got[:3] + got[4:-1]} == {True, False}
    return [g[0] for g in got[:3] + got[4:-1]]


def test_concurrent_different_completions_are_batched_and_equal_their_answers_alone() -> None:
    """8 client threads, 8 different prompts over 2 namespaces, through the app: they share batches (one generate)
    and each answer equals the one given alone."""
    from fastapi.testclient import TestClient

    eng = gated_engine()
    with tempfile.TemporaryDirectory() as d:
        store = open_store_for(eng, Path(d))
        limits = ServiceLimits(max_concurrent_work=2, max_queued_work=4 * THREADS, batch_window_ms=300)
        app = create_app(eng, store, limits, require_keys=False)
        client = TestClient(app)
        try:
            assert client.post("/v1/memories/a/facts", json={"facts": [FACT, "The capital of France is Berlin"]}
                               ).status_code == 201
            assert client.post("/v1/memories/b/facts", json={"facts": ["Who plays tennis is the king of Rome"]}
                               ).status_code == 201
            jobs = [(p, "ab"[k % 2], 2 + k % 5) for k, p in enumerate(MIXED_PROMPTS)]
            alone = {}
            for p, ns, n in jobs:  # one at a time, the engine alone
                with store.reading(ns) as (mem, texts):
                    alone[p] = eng.complete(p, mem, dict(texts), n, 0.0)[0]
            app.state.batcher.batches.clear()
            got: dict[str, tuple[int, str]] = {}

            def ask(k: int) -> None:
                p, ns, n = jobs[k]
                r = client.post("/v1/completions", json={"prompt": p, "memory": ns, "max_tokens": n})
                got[p] = (r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text)

            errors = _run_threads(ask, len(jobs))
            assert not errors, errors[:3]
            assert {p: s for p, (s, _) in got.items()} == {p: 200 for p in alone}
            wrong = {p: (t, alone[p]) for p, (_, t) in got.items() if t != alone[p]}
            assert not wrong, wrong
            assert sum(app.state.batcher.batches) == len(jobs)
            assert max(app.state.batcher.batches) > 1, app.state.batcher.batches  # they did share a generate
        finally:
            store.close()


class _EchoEngine:
    """complete_batch answers each prompt with itself and records the batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def complete_batch(self, items):
        self.batches.append(len(items))
        return [(it.prompt, {}) for it in items]


def test_requests_arriving_while_the_model_is_busy_join_one_batch() -> None:
    from larimar.serving.work import Batcher, Job, WorkGate

    engine, gate = _EchoEngine(), WorkGate(1, 16, timeout=10, retry_after=1)
    batcher = Batcher(engine, None, gate, empty_memory=None, window=0.0, max_batch=16)
    answers: dict[int, str] = {}

    def ask(k: int) -> None:
        answers[k] = batcher.submit(Job(None, f"q{k}", 4, 0.0, 1.0))[0]

    with gate.slot():  # the model is busy: six requests arrive meanwhile
        threads = [threading.Thread(target=ask, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert engine.batches == []
    for t in threads:
        t.join(timeout=10)
    assert answers == {k: f"q{k}" for k in range(6)}
    assert engine.batches == [6]  # one batch once the model was free, not a small one per arrival window


def test_a_leader_without_a_model_slot_gets_503_and_the_next_request_leads() -> None:
    from fastapi import HTTPException

    from larimar.serving.work import Batcher, Job, WorkGate

    engine, gate = _EchoEngine(), WorkGate(1, 16, timeout=0.2, retry_after=3)
    batcher = Batcher(engine, None, gate, empty_memory=None, window=0.0, max_batch=16)
    with gate.slot():  # held past the gate's timeout
        with pytest.raises(HTTPException) as err:
            batcher.submit(Job(None, "first", 4, 0.0, 1.0))
    assert err.value.status_code == 503 and err.value.headers["Retry-After"] == "3"
    assert batcher.submit(Job(None, "second", 4, 0.0, 1.0))[0] == "second"  # nothing left stuck
    assert engine.batches == [1]
