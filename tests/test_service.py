"""Tests of the HTTP service: a real uvicorn process over a socket, plus an in-process fuzz of every endpoint.

The engine is the deterministic fake in tests/fixtures/store_fake_engine.py (no model).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_fake_engine import FakeEngine

from larimar.facts import MAX_TEXT_CHARS
from larimar.serving.service import (
    ServiceLimits,
    create_app,
    create_app_from_env,
    open_store_for,
)
from larimar.serving.storage import ID_RE, NAMESPACE_RE, StoreError
from larimar.serving.store import MemoryStore

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAKE_ENGINE = FIXTURES / "store_fake_engine.py"
SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """uvicorn in a subprocess on 127.0.0.1, app from `larimar.serving.service:create_app_from_env` + the fake engine."""

    def __init__(self, store_dir: Path, env: dict[str, str] | None = None) -> None:
        self.store_dir = store_dir
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        port = _free_port()
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(SRC),
            "LARIMAR_ENGINE": f"{FAKE_ENGINE}:FakeEngine",
            "LARIMAR_STORE": str(self.store_dir),
            "LARIMAR_LIMITS": json.dumps({"max_facts_per_request": 64}),
        } | self.env
        cmd = [sys.executable, "-m", "uvicorn", "larimar.serving.service:create_app_from_env", "--factory",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        log = self.store_dir.parent / "server.log"  # a file, not a pipe nobody drains
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not come up in 90 s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    store_dir = tmp_path_factory.mktemp("live-store")
    with MemoryStore(store_dir, fingerprint=FakeEngine.fingerprint) as store:  # keys only, no memory module
        tokens = {
            "admin": store.add_key("admin", "*", "write"),
            "a_write": store.add_key("a-writer", "a", "write"),
            "a_read": store.add_key("a-reader", "a", "read"),
            "b_write": store.add_key("b-writer", "b", "write"),
        }
    server = LiveServer(store_dir)
    server.start()
    yield server, tokens
    server.stop()


def _ask(c: httpx.Client, prompt: str, ns: str | None, chat: bool = False) -> dict[str, Any]:
    if chat:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}], "memory": ns})
    else:
        r = c.post("/v1/completions", json={"prompt": prompt, "memory": ns, "max_tokens": 8})
    assert r.status_code == 200, r.text
    return r.json()


def _answer(reply: dict[str, Any]) -> str:
    choice = reply["choices"][0]
    return (choice["text"] if "text" in choice else choice["message"]["content"]).strip()


def test_live_server_basic_flow(live: tuple[LiveServer, dict[str, str]]) -> None:
    server, tok = live
    with server.client() as anon, server.client(tok["a_write"]) as aw, server.client(tok["a_read"]) as ar:
        assert anon.get("/healthz").json() == {"status": "ok", "fingerprint": FakeEngine.fingerprint}
        r = aw.post("/v1/memories/a/facts", json={"facts": [
            "The Eiffel Tower is located in Rome",
            {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": {"str": "guitar"}},
        ]})
        assert r.status_code == 201, r.text
        ids = r.json()["ids"]
        assert len(ids) == 2 and r.json()["size"] == 2
        facts = ar.get("/v1/memories/a/facts").json()["facts"]
        assert [(f["id"], f["text"]) for f in facts] == [
            (ids[0], "The Eiffel Tower is located in Rome"), (ids[1], "Miles Davis plays the guitar")]

        reply = _ask(ar, "The Eiffel Tower is located in", "a")
        assert reply["object"] == "text_completion" and _answer(reply) == "Rome"
        assert reply["memory"]["in_scope"] is True and reply["memory"]["nearest_id"] == ids[0]
        assert reply["memory"]["similarity"] >= 0.7
        chat = _ask(ar, "Miles Davis plays the", "a", chat=True)
        assert chat["object"] == "chat.completion" and _answer(chat) == "guitar"
        out = _ask(ar, "Who wrote the Odyssey", "a")
        assert out["memory"]["in_scope"] is False and _answer(out) == "I don't know."
        assert _answer(_ask(ar, "The Eiffel Tower is located in", None)) == "I don't know."  # no memory

        info = ar.get("/v1/memories/a").json()
        assert info == {"namespace": "a", "size": 2, "num_slots": 128, "fill": 2 / 128,
                        "fingerprint": FakeEngine.fingerprint}

        # authentication and rights
        assert anon.get("/v1/memories/a/facts").status_code == 401
        assert anon.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        with server.client("lmk_0123456789abcdef_forged") as bad:
            assert bad.get("/v1/memories/a").status_code == 401
        assert ar.post("/v1/memories/a/facts", json={"facts": ["reader writes"]}).status_code == 403
        assert ar.delete(f"/v1/memories/a/facts/{ids[0]}").status_code == 403
        assert aw.get("/v1/memories/b").status_code == 403
        assert ar.post("/v1/completions", json={"prompt": "x", "memory": "b"}).status_code == 403
        assert "error" in ar.post("/v1/memories/a/facts", json={"facts": ["x"]}).json()

        # exact forgetting
        assert aw.delete(f"/v1/memories/a/facts/{ids[0]}").json() == {"namespace": "a", "deleted": ids[0], "size": 1}
        assert aw.delete(f"/v1/memories/a/facts/{ids[0]}").status_code == 404
        gone = _ask(ar, "The Eiffel Tower is located in", "a")
        assert gone["memory"]["nearest_id"] != ids[0] and _answer(gone) == "I don't know."
        assert _answer(_ask(ar, "Miles Davis plays the", "a")) == "guitar"

        schema = anon.get("/openapi.json").json()
        assert {"/v1/completions", "/v1/chat/completions", "/v1/memories/{ns}/facts",
                "/v1/memories/{ns}/facts/{fact_id}", "/v1/memories/{ns}", "/healthz"} <= set(schema["paths"])


def test_live_namespace_isolation_with_many_facts(live: tuple[LiveServer, dict[str, str]]) -> None:
    server, tok = live
    b_facts = [f"The capital of country{i} is city{i}" for i in range(10)]
    a_facts = [f"Agent{i} owns boat{i} named ship{i}" for i in range(120)]
    b_prompts = [f"The capital of country{i} is" for i in range(10)] + [f"Agent{i} owns boat{i} named" for i in range(5)]
    with server.client(tok["b_write"]) as b, server.client(tok["admin"]) as admin:
        assert b.post("/v1/memories/b/facts", json={"facts": b_facts}).status_code == 201
        before = [_ask(b, p, "b") for p in b_prompts]
        b_list = b.get("/v1/memories/b/facts").json()
        assert [_answer(r) for r in before[:10]] == [f"city{i}" for i in range(10)]
        assert all(not r["memory"]["in_scope"] for r in before[10:])  # A's facts are not in B
        for start in range(0, 120, 60):
            r = admin.post("/v1/memories/a2/facts", json={"facts": a_facts[start:start + 60]})
            assert r.status_code == 201, r.text
        a_ids = [f["id"] for f in admin.get("/v1/memories/a2/facts").json()["facts"]]
        for i in a_ids[:7]:
            assert admin.delete(f"/v1/memories/a2/facts/{i}").status_code == 200
        assert [_answer(_ask(admin, f"Agent{i} owns boat{i} named", "a2")) for i in (3, 50, 119)] == [
            "I don't know.", "ship50", "ship119"]  # Agent3 was forgotten
        after = [_ask(b, p, "b") for p in b_prompts]
        strip = [{k: v for k, v in r.items() if k not in ("id", "created")} for r in before]
        assert [{k: v for k, v in r.items() if k not in ("id", "created")} for r in after] == strip
        assert b.get("/v1/memories/b/facts").json() == b_list
        assert admin.get("/v1/memories/a2").json()["size"] == 113


def test_live_concurrent_writes_and_reads(live: tuple[LiveServer, dict[str, str]]) -> None:
    server, tok = live
    errors: list[str] = []
    acked: list[tuple[int, int]] = []  # (writer, item) whose write was acknowledged

    def write(w: int) -> None:
        with server.client(tok["admin"]) as c:
            for i in range(8):
                r = c.post("/v1/memories/conc/facts", json={"facts": [f"Writer{w} item{i} is colour{w}x{i}"]})
                if r.status_code != 201:
                    errors.append(r.text)
                acked.append((w, i))

    def read(k: int) -> None:
        with server.client(tok["admin"]) as c:
            for _ in range(12):
                if not acked:
                    time.sleep(0.01)
                    continue
                w, i = acked[(k * 7919) % len(acked)]  # an acknowledged fact must be readable at once
                r = c.post("/v1/completions", json={"prompt": f"Writer{w} item{i} is", "memory": "conc"})
                if r.status_code != 200 or _answer(r.json()) != f"colour{w}x{i}":
                    errors.append(f"{r.status_code} {r.text}")

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    threads += [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    with server.client(tok["admin"]) as c:
        assert c.get("/v1/memories/conc").json()["size"] == 64
        for w in (0, 7):
            assert _answer(_ask(c, f"Writer{w} item3 is", "conc")) == f"colour{w}x3"


def test_live_openai_client_plain_and_streaming(live: tuple[LiveServer, dict[str, str]]) -> None:
    """The official `openai` client, with and without ``stream=True``, completions and chat."""
    openai = pytest.importorskip("openai")
    server, tok = live
    with server.client(tok["admin"]) as c:
        assert c.post("/v1/memories/oa/facts", json={"facts": ["The Eiffel Tower is located in the city of Rome"]}
                      ).status_code == 201
    client = openai.OpenAI(api_key=tok["admin"], base_url=server.url + "/v1", max_retries=0, timeout=30)
    prompt = "The Eiffel Tower is located in the city"
    plain = client.completions.create(model="larimar", prompt=prompt, max_tokens=8, extra_body={"memory": "oa"})
    assert plain.choices[0].text.strip() == "of Rome" and plain.usage.completion_tokens > 0
    pieces, finish = [], None
    for chunk in client.completions.create(model="larimar", prompt=prompt, max_tokens=8, stream=True,
                                           extra_body={"memory": "oa"}):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == plain.choices[0].text and finish == plain.choices[0].finish_reason
    assert len([p for p in pieces if p]) == 2  # " of", " Rome": streamed in pieces

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model="larimar", messages=messages, extra_body={"memory": "oa"})
    assert chat.choices[0].message.content == plain.choices[0].text
    deltas, roles = [], set()
    for chunk in client.chat.completions.create(model="larimar", messages=messages, stream=True,
                                                extra_body={"memory": "oa"}):
        delta = chunk.choices[0].delta
        roles.add(delta.role)
        deltas.append(delta.content or "")
    assert "".join(deltas) == chat.choices[0].message.content and "assistant" in roles
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="larimar", prompt=prompt, max_tokens=10_000, stream=True)


def test_live_stream_is_server_sent_events(live: tuple[LiveServer, dict[str, str]]) -> None:
    server, tok = live
    with server.client(tok["admin"]) as c:
        with c.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Who wrote the Odyssey"}], "stream": True,
        }) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {ch["object"] for ch in chunks} == {"chat.completion.chunk"} and len({ch["id"] for ch in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["usage"]["total_tokens"] > 0
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks).strip() == "I don't know."


def test_live_restart_keeps_facts(live: tuple[LiveServer, dict[str, str]]) -> None:
    server, tok = live
    with server.client(tok["admin"]) as c:
        c.post("/v1/memories/persist/facts", json={"facts": ["The Louvre is located in Madrid"]})
        before = {ns: c.get(f"/v1/memories/{ns}/facts").json() for ns in ("a", "b", "a2", "conc", "persist")}
        answer = _ask(c, "The Louvre is located in", "persist")
    for sig in (signal.SIGTERM, signal.SIGKILL):  # graceful (snapshots on shutdown) and a hard kill (log only)
        server.stop(sig)
        server.start()
        with server.client(tok["admin"]) as c:
            assert {ns: c.get(f"/v1/memories/{ns}/facts").json() for ns in before} == before
            again = _ask(c, "The Louvre is located in", "persist")
            assert _answer(again) == "Madrid" and again["memory"] == answer["memory"]
            c.post("/v1/memories/persist/facts", json={"facts": [f"After restart {sig} fact"]})
            before["persist"] = c.get("/v1/memories/persist/facts").json()
    # the memory the server persisted equals the one rebuilt from the log (the server owns the store until it stops)
    server.stop()
    eng = FakeEngine()
    with MemoryStore(server.store_dir, fingerprint=eng.fingerprint, memory=eng.new_memory().memory) as store:
        for ns in ("conc", "a2", "persist"):
            live_mem, rebuilt = store.memory(ns), store.rebuild(ns)
            assert live_mem.ids == rebuilt.ids
            assert torch.allclose(live_mem.M, rebuilt.M, atol=1e-10) and torch.allclose(live_mem.U, rebuilt.U, atol=1e-10)


def test_live_healthz_never_waits_and_overload_is_503_with_retry_after(tmp_path: Path) -> None:
    """50 slow completions at once: /healthz answers at once, the excess is refused with 503 + Retry-After."""
    server = LiveServer(tmp_path / "store", env={
        "LARIMAR_REQUIRE_KEYS": "0", "FAKE_ENGINE_SLOW_SECONDS": "2.0",
        "LARIMAR_LIMITS": json.dumps({"max_concurrent_work": 1, "max_queued_work": 2}),
    })
    server.store_dir.mkdir()
    server.start()
    try:
        results: list[httpx.Response] = []

        def slow(k: int) -> None:
            with server.client() as c:
                results.append(c.post("/v1/completions", json={"prompt": f"slow: question {k}", "max_tokens": 4}))

        threads = [threading.Thread(target=slow, args=(k,)) for k in range(50)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while len(results) < 47 and time.monotonic() < deadline:  # the excess is refused at once
            time.sleep(0.05)
        with server.client() as c:  # the model is held now (3 admitted calls of 2 s, one at a time)
            waits = []
            for _ in range(5):
                t0 = time.monotonic()
                assert c.get("/healthz").status_code == 200
                waits.append(time.monotonic() - t0)
                time.sleep(0.1)
        still_running = 50 - len(results)
        for t in threads:
            t.join()
        assert still_running >= 1 and max(waits) < 0.5, (still_running, waits)
        codes = sorted(r.status_code for r in results)
        assert set(codes) == {200, 503} and codes.count(200) >= 3, codes
        busy = [r for r in results if r.status_code == 503]
        assert all(r.headers.get("Retry-After") == "1" and r.json()["error"]["type"] == "server_overloaded"
                   for r in busy)
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------------------
# In-process: limits, configuration, and a fuzz of >= 1000 requests


class InProcess:
    def __init__(self, store_dir: Path, limits: ServiceLimits | None = None) -> None:
        from fastapi.testclient import TestClient

        self.engine = FakeEngine(num_slots=32, code_size=16)
        self.store = open_store_for(self.engine, store_dir)
        self.tokens = {
            "admin": self.store.add_key("admin", "*", "write"),
            "a_write": self.store.add_key("a-writer", "a", "write"),
            "a_read": self.store.add_key("a-reader", "a", "read"),
            "revoked": self.store.add_key("gone", "*", "write"),
        }
        self.store.revoke_key("gone")
        self.client = TestClient(create_app(self.engine, self.store, limits or ServiceLimits(
            max_body_bytes=20_000, max_fact_chars=300, max_facts_per_request=8, max_tokens=64)))
        for ns in ("a", "b"):
            r = self.post(f"/v1/memories/{ns}/facts", {"facts": [f"{ns} knows fact {i}" for i in range(3)]})
            assert r.status_code == 201

    def post(self, path: str, body: Any, token: str = "admin") -> httpx.Response:
        return self.client.post(path, json=body, headers={"Authorization": f"Bearer {self.tokens[token]}"})

    def state(self) -> tuple[Any, ...]:
        out = []
        for ns in self.store.namespaces():
            im = self.store.memory(ns)
            out.append((ns, tuple(im.ids), im.M.clone(), len(self.store.log(ns)), tuple(self.store.facts(ns))))
        return tuple(out)

    @staticmethod
    def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
        if len(a) != len(b):
            return False
        return all(x[:2] == y[:2] and torch.equal(x[2], y[2]) and x[3:] == y[3:] for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def inproc() -> Iterator[InProcess]:
    with tempfile.TemporaryDirectory() as d:
        app = InProcess(Path(d))
        yield app
        app.store.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "token", "status"),
    [
        ("post", "/v1/memories/a/facts", {"facts": ["x" * 301]}, "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": ["f"] * 9}, "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": []}, "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": ["  "]}, "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": ["x"], "ids": ["a", "b"]}, "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": ["x", "y"], "ids": ["same", "same"]}, "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": [{"prompt": "no slot", "subject": "s", "target_new": "t"}]},
         "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": [{"prompt": "{}", "subject": "s"}]}, "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": ["x"], "extra": 1}, "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": "x"}, "admin", 422),
        ("post", "/v1/memories/a/facts", ["x"], "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": ["x"]}, "a_read", 403),
        ("post", "/v1/memories/a/facts", {"facts": ["x"]}, "revoked", 401),
        ("post", "/v1/memories/a%20b/facts", {"facts": ["x"]}, "admin", 400),
        ("post", "/v1/memories/..%2Fx/facts", {"facts": ["x"]}, "admin", 404),
        ("put", "/v1/memories/a/facts", {"facts": ["x"]}, "admin", 405),
        ("post", "/v1/memories/a/facts", {"facts": ["y" * 250] * 8 * 10}, "admin", 413),
        ("post", "/v1/completions", {"prompt": "a knows", "max_tokens": 65}, "admin", 422),
        ("post", "/v1/completions", {"prompt": "a knows", "max_tokens": 0}, "admin", 422),
        ("post", "/v1/completions", {"prompt": "a knows", "temperature": -1}, "admin", 422),
        ("post", "/v1/completions", {"prompt": "a knows", "temperature": 2.5}, "admin", 422),
        ("post", "/v1/completions", {"prompt": "a knows", "top_p": 1.5}, "admin", 422),
        ("post", "/v1/completions", {"prompt": "a knows", "top_p": -0.1}, "admin", 422),
        ("post", "/v1/completions", {"prompt": "x" * 4001}, "admin", 422),
        ("post", "/v1/completions", {"prompt": "x", "memory": "a\n"}, "admin", 400),
        ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 65},
         "admin", 422),
        ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 65}, "admin", 422),
        ("post", "/v1/memories/a%0A/facts", {"facts": ["x"]}, "admin", 400),
        ("post", "/v1/memories/a/facts", {"facts": ["x"], "ids": ["ok\n"]}, "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": ["x"], "ids": ["-bad"]}, "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": ["x" * 290], "ids": ["a/b"]}, "admin", 422),
        ("post", "/v1/memories/a/facts", {"facts": [{"prompt": "{} is", "subject": "s" * 301, "target_new": "t"}]},
         "admin", 422),
        ("patch", "/v1/memories/a/facts", {"facts": ["x"]}, "admin", 405),
        ("post", "/v1/memories/a", {"facts": ["x"]}, "admin", 405),
        ("post", "/healthz", None, "admin", 405),
        ("put", "/v1/memories/a/facts", None, "admin", 405),  # no Content-Type: still 405, not 415
        ("get", "/v1/completions", None, "admin", 405),
        ("post", "/v1/completions", {"prompt": "a knows", "n": 2}, "admin", 400),
        ("post", "/v1/completions", {"prompt": ["p1", "p2"]}, "admin", 400),
        ("post", "/v1/completions", {"prompt": ""}, "admin", 422),
        ("post", "/v1/completions", {"prompt": "x", "memory": "nope"}, "admin", 404),
        ("post", "/v1/completions", {"prompt": "x", "memory": "b"}, "a_read", 403),
        ("post", "/v1/completions", {"prompt": "x", "memory": "bad name"}, "admin", 400),
        ("post", "/v1/chat/completions", {"messages": []}, "admin", 422),
        ("post", "/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, "admin", 422),
        ("post", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "admin", 422),
        ("get", "/v1/memories/nope", None, "admin", 404),
        ("get", "/v1/memories/nope/facts", None, "admin", 404),
        ("delete", "/v1/memories/a/facts/nope", None, "admin", 404),
        ("delete", "/v1/memories/nope/facts/x", None, "admin", 404),
    ],
)
def test_rejected_requests_change_nothing(
    inproc: InProcess, method: str, path: str, body: Any, token: str, status: int
) -> None:
    before = inproc.state()
    headers = {"Authorization": f"Bearer {inproc.tokens[token]}"}
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    r = inproc.client.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert inproc.same(inproc.state(), before)


@pytest.mark.parametrize(
    ("content", "ctype", "status"),
    [
        (b"\xff\xfe{}", "application/json", 400),
        (b'{"facts": ["caf\xe9"]}', "application/json", 400),  # latin-1, not UTF-8
        (b'{"facts": [', "application/json", 400),
        (b"[" * 50_00, "application/json", 400),
        (b'{"facts": ["x"]}', "text/plain", 415),
        (b'{"facts": ["x"]}', "", 415),
        (b'{"facts": ["\\ud800"]}', "application/json", 422),
        (b'{"facts": ["a\\u0000b"]}', "application/json", 422),
        (b'{"facts": ["x"], "ids": [NaN]}', "application/json", 422),
    ],
)
def test_bad_bytes_get_4xx(inproc: InProcess, content: bytes, ctype: str, status: int) -> None:
    before = inproc.state()
    headers = {"Authorization": f"Bearer {inproc.tokens['admin']}"} | ({"Content-Type": ctype} if ctype else {})
    r = inproc.client.post("/v1/memories/a/facts", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert inproc.same(inproc.state(), before)


def test_create_app_checks_the_store_matches_the_engine(tmp_path: Path) -> None:
    eng = FakeEngine()
    with MemoryStore(tmp_path / "s1", fingerprint="other", memory=eng.new_memory().memory) as store:
        with pytest.raises(StoreError, match="fingerprint"):
            create_app(eng, store)
    with MemoryStore(tmp_path / "s2", fingerprint=eng.fingerprint) as store:
        with pytest.raises(StoreError, match="memory module"):
            create_app(eng, store)
    with pytest.raises(ValueError, match="positive"):
        ServiceLimits(max_tokens=0)


def test_app_from_env_builds_the_engine_once_and_can_run_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    monkeypatch.setenv("LARIMAR_ENGINE", f"{FAKE_ENGINE}:FakeEngine")
    monkeypatch.setenv("LARIMAR_STORE", str(tmp_path))
    monkeypatch.setenv("LARIMAR_REQUIRE_KEYS", "0")
    app = create_app_from_env()
    module = sys.modules["_larimar_engine_store_fake_engine"]
    with TestClient(app) as c:  # runs the lifespan: the store is closed (snapshotted) on exit
        assert c.post("/v1/memories/x/facts", json={"facts": ["Open service fact here"]}).status_code == 201
        for _ in range(5):
            assert c.post("/v1/completions", json={"prompt": "Open service fact", "memory": "x"}).status_code == 200
    assert len(module.CREATED) == 1
    assert (tmp_path / "snapshots" / "x" / "manifest.json").exists()
    monkeypatch.setenv("LARIMAR_ENGINE", "no-colon")
    with pytest.raises(ValueError, match="engine spec"):
        create_app_from_env()


# the fuzz: random endpoints, namespaces, keys, and bodies (JSON of any shape, near-valid payloads, raw bytes)

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(), st.text(max_size=30),
                    st.lists(st.text(max_size=10), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
_valid_fact = st.sampled_from(["b knows fact 1", "a knows fact 2", "Fuzz writes fact", "The sky is green"])
_fact = st.one_of(
    _valid_fact, _valid_fact, _valid_fact, st.text(max_size=60), _scalar,
    st.fixed_dictionaries({"prompt": st.one_of(st.just("{} is in"), st.text(max_size=10), _scalar),
                           "subject": st.one_of(st.just("X"), _scalar), "target_new": st.one_of(st.just("Y"), _scalar)}),
)
_ns = st.one_of(st.sampled_from(["a", "b", "c"]), st.sampled_from(["a", "b", "c"]),
                st.sampled_from(["nope", "../etc", "a b", "é", "%00", "x" * 70, ""]), st.text(max_size=8))
_id = st.one_of(st.sampled_from(["f1", "f2", "f3", "f4"]), st.text(max_size=12))  # a small pool, so deletes hit
_bodies = {
    "facts": st.one_of(
        st.fixed_dictionaries({"facts": st.lists(_fact, max_size=10)}),
        st.fixed_dictionaries({"facts": st.lists(_fact, max_size=3), "ids": st.one_of(_scalar, st.lists(_id, max_size=3))}),
    ),
    "completions": st.fixed_dictionaries(
        {"prompt": st.one_of(st.sampled_from(["a knows fact", "b knows"]), _scalar)},
        optional={"memory": st.one_of(_ns, _scalar), "max_tokens": _scalar, "temperature": _scalar, "n": _scalar,
                  "stream": _scalar, "model": _scalar, "top_p": _scalar},
    ),
    "chat": st.fixed_dictionaries(
        {"messages": st.one_of(_scalar, st.lists(st.fixed_dictionaries(
            {"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), _scalar),
             "content": st.one_of(st.text(max_size=30), _scalar, st.lists(st.fixed_dictionaries(
                 {"type": st.one_of(st.just("text"), _scalar), "text": _scalar}), max_size=2))}), max_size=3))},
        optional={"memory": st.one_of(_ns, _scalar), "max_tokens": _scalar, "max_completion_tokens": _scalar},
    ),
}


@st.composite
def _requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes | None]:
    kind = draw(st.sampled_from(["facts", "facts", "completions", "chat", "list", "info", "delete", "delete",
                                 "health", "random"]))
    ns = quote(draw(_ns), safe="")  # any text, percent-encoded as a client would send it
    token = draw(st.sampled_from(["admin"] * 4 + ["a_write", "a_read", "revoked", None, "garbage"]))
    path = {
        "facts": f"/v1/memories/{ns}/facts", "completions": "/v1/completions", "chat": "/v1/chat/completions",
        "list": f"/v1/memories/{ns}/facts", "info": f"/v1/memories/{ns}",
        "delete": f"/v1/memories/{ns}/facts/{quote(draw(_id), safe='')}", "health": "/healthz",
        "random": "/" + quote(draw(st.text(max_size=20)), safe="/"),
    }[kind]
    method = {"list": "GET", "info": "GET", "delete": "DELETE", "health": "GET"}.get(kind, "POST")
    if kind == "random":
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    body: bytes | None = None
    if draw(st.integers(0, 9)) < 4 and kind in ("facts", "completions", "chat", "delete", "list", "info"):
        # a valid request (which may still hit a taken id, an unknown fact or namespace): state changes happen
        ns = draw(st.sampled_from(["a", "b", "c"]))
        if kind in ("facts", "list"):
            path = f"/v1/memories/{ns}/facts"
        elif kind == "info":
            path = f"/v1/memories/{ns}"
        elif kind == "delete":
            path = f"/v1/memories/{ns}/facts/{draw(st.sampled_from(['f1', 'f2', 'f3', 'f4']))}"
        headers = {"Content-Type": "application/json", "Authorization": "Bearer {admin}"}
        if kind == "facts":
            facts = draw(st.lists(_valid_fact | st.just({"prompt": "{} is in", "subject": "X", "target_new": "Y"}),
                                  min_size=1, max_size=3))
            payload: dict[str, Any] = {"facts": facts}
            if draw(st.booleans()):
                payload["ids"] = draw(st.lists(_id, min_size=len(facts), max_size=len(facts)))
        elif kind == "completions":
            payload = {"prompt": draw(_valid_fact), "memory": ns, "max_tokens": draw(st.integers(1, 64))}
        elif kind == "chat":
            payload = {"messages": [{"role": "user", "content": draw(_valid_fact)}], "memory": ns}
        else:
            return method, path, headers, None
        return method, path, headers, json.dumps(payload).encode()
    if method in ("POST", "PUT", "PATCH"):
        shape = draw(st.sampled_from(["valid-ish", "valid-ish", "valid-ish", "json", "bytes"]))
        if shape == "bytes":
            body = draw(st.binary(max_size=200))
        elif shape == "json" or kind not in _bodies:
            body = json.dumps(draw(_json)).encode()
        else:
            body = json.dumps(draw(_bodies[kind])).encode()
    headers = {"Content-Type": draw(st.sampled_from(["application/json"] * 4 + ["text/plain", "application/x+json"]))}
    if token == "garbage":
        headers["Authorization"] = draw(st.sampled_from(["Bearer ", "Bearer lmk_zz", "Basic abc", "bearer x"]))
    elif token is not None:
        headers["Authorization"] = f"Bearer {{{token}}}"  # filled in by the test, which knows the tokens
    return method, path, headers, body


def test_fuzz_no_5xx_and_rejections_change_nothing(inproc: InProcess) -> None:
    seen: dict[int, int] = {}

    @settings(max_examples=1100, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(req=_requests())
    def one(req: tuple[str, str, dict[str, str], bytes | None]) -> None:
        method, path, headers, body = req
        if headers.get("Authorization", "").startswith("Bearer {"):
            headers = headers | {"Authorization": "Bearer " + inproc.tokens[headers["Authorization"][8:-1]]}
        before = inproc.state()
        try:
            r = inproc.client.request(method, path, headers=headers, content=body)
        except UnicodeEncodeError:  # httpx refuses such a URL or header: nothing reached the server
            return
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (method, path, body, r.text)
        if r.status_code >= 400:
            assert inproc.same(inproc.state(), before), (method, path, body, r.status_code, r.text)
            if path.startswith("/v1/"):
                assert r.json()["error"]["message"]

    one()
    total = sum(seen.values())
    assert total >= 1000, seen
    assert seen.get(200, 0) > 50 and seen.get(201, 0) > 20, seen  # it reaches the handlers, not only the guards
    assert sum(v for k, v in seen.items() if 400 <= k < 500) > 300, seen


def test_tiny_temperature_is_floored_not_a_500(inproc: InProcess) -> None:
    for t in (1e-39, 5e-324, 1e-4, 0.0, 1e-3, 2):
        r = inproc.post("/v1/completions", {"prompt": "a knows fact", "memory": "a", "temperature": t})
        assert r.status_code == 200, (t, r.text)


def test_invalid_ids_are_rejected_before_any_encoding(inproc: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = inproc.engine.encode_facts
    monkeypatch.setattr(inproc.engine, "encode_facts", lambda *a, **k: calls.append(1) or real(*a, **k))
    for ids in (["bad id"], ["ok\n"], ["a0", "a0"], ["f" * 129]):
        r = inproc.post("/v1/memories/a/facts", {"facts": ["y" * 290] * len(ids), "ids": ids})
        assert r.status_code == 422, r.text
    taken = inproc.store.facts("a")[0].id
    assert inproc.post("/v1/memories/a/facts", {"facts": ["z"], "ids": [taken]}).status_code == 422
    assert calls == []
    r = inproc.post("/v1/memories/c/facts", {"facts": ["c knows fact 0"], "ids": ["c0.ok:1"]})
    assert r.status_code == 201 and calls == [1]


def test_openapi_declares_the_limits(inproc: InProcess) -> None:
    schema = inproc.client.get("/openapi.json").json()
    comp = schema["components"]["schemas"]
    completion = comp["Completion"]["properties"]
    assert completion["max_tokens"]["minimum"] == 1 and completion["max_tokens"]["maximum"] == 64
    temp = completion["temperature"]
    assert temp["minimum"] == 0 and temp["maximum"] == 2
    assert completion["top_p"]["minimum"] == 0 and completion["top_p"]["maximum"] == 1
    prompt = completion["prompt"]["anyOf"][0]
    assert prompt["maxLength"] == MAX_TEXT_CHARS and prompt["minLength"] == 1
    facts = comp["WriteFacts"]["properties"]
    assert facts["facts"]["minItems"] == 1 and facts["facts"]["maxItems"] == 8
    assert {"type": "string", "maxLength": 300, "minLength": 1} in facts["facts"]["items"]["anyOf"]
    ids = facts["ids"]["anyOf"][0]
    assert ids["maxItems"] == 8 and ids["items"]["pattern"] == ID_RE.pattern
    chat = comp["ChatCompletion"]["properties"]
    assert chat["messages"]["maxItems"] == 64 and chat["messages"]["minItems"] == 1
    params = schema["paths"]["/v1/memories/{ns}/facts"]["post"]["parameters"]
    ns = next(p for p in params if p["name"] == "ns")
    assert ns["schema"]["pattern"] == NAMESPACE_RE.pattern and ns["schema"]["maxLength"] == 64
    assert {"405", "503"} <= set(schema["paths"]["/v1/completions"]["post"]["responses"])
    for pattern in (ID_RE, NAMESPACE_RE):  # anchored and used with fullmatch: a trailing newline does not pass
        assert pattern.fullmatch("abc") and not pattern.fullmatch("abc\n")


def test_work_gate_bounds_concurrent_model_calls(tmp_path: Path) -> None:
    """Model calls beyond running + queued get 503 with Retry-After; /healthz still answers."""
    import store_fake_engine
    from fastapi.testclient import TestClient

    eng = FakeEngine()
    with open_store_for(eng, tmp_path) as store:
        app = create_app(eng, store, ServiceLimits(max_concurrent_work=1, max_queued_work=1, retry_after_s=3),
                         require_keys=False)
        with TestClient(app) as c:  # one event loop for every request, as a server has
            results: list[httpx.Response] = []
            body = {"prompt": store_fake_engine.SLOW + " q", "max_tokens": 2}
            threads = [threading.Thread(target=lambda: results.append(c.post("/v1/completions", json=body)))
                       for _ in range(5)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            t0 = time.monotonic()
            assert c.get("/healthz").status_code == 200
            assert time.monotonic() - t0 < 0.5
            for t in threads:
                t.join()
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 503, 503, 503], codes
    assert all(r.headers["Retry-After"] == "3" for r in results if r.status_code == 503)
    assert app.state.work.admitted == 0


# ----------------------------------------------------------------------------------------------------------
# Dynamic batching (engines with complete_batch); engines without it answer one request per call (tests above)


def test_batched_completions_equal_their_answers_alone_and_keep_the_bounds(tmp_path: Path) -> None:
    import store_fake_engine
    from fastapi.testclient import TestClient

    eng = store_fake_engine.BatchingFakeEngine()
    with open_store_for(eng, tmp_path) as store:
        app = create_app(eng, store, ServiceLimits(max_concurrent_work=1, max_queued_work=7, retry_after_s=2,
                                                   batch_window_ms=400, max_batch=4), require_keys=False)
        with TestClient(app) as c:
            facts = {ns: [f"The {ns} river flows through city {i}" for i in range(3)] for ns in ("a", "b", "c")}
            for ns, fs in facts.items():
                assert c.post(f"/v1/memories/{ns}/facts", json={"facts": fs}).status_code == 201
            jobs = [(ns, f"The {ns} river flows through", 1 + k) for k, ns in enumerate("abcabc")]
            jobs.append(("a", "refuse: this", 3))
            jobs.append((None, "The a river flows through", 2))
            alone = []
            for ns, p, n in jobs:
                body = {"prompt": p, "max_tokens": n} | ({"memory": ns} if ns else {})
                r = c.post("/v1/completions", json=body)
                alone.append((r.status_code, r.json()))
            assert [s for s, _ in alone] == [200] * 6 + [422, 200]
            eng.batches.clear()
            results: dict[int, httpx.Response] = {}

            def ask(k: int) -> None:
                ns, p, n = jobs[k]
                results[k] = c.post("/v1/completions", json={"prompt": p, "max_tokens": n} | ({"memory": ns} if ns else {}))

            threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(jobs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for k, (status, body) in enumerate(alone):
                assert results[k].status_code == status
                if status == 200:
                    assert results[k].json()["choices"] == body["choices"] and results[k].json()["memory"] == body["memory"]
            assert sum(eng.batches) == len(jobs) and max(eng.batches) <= 4 and len(eng.batches) < len(jobs)
            assert app.state.work.admitted == 0
            # the bound counts requests: 1 running + 7 queued admitted, the rest 503 with Retry-After
            eng.batches.clear()
            slow: list[httpx.Response] = []
            body = {"prompt": store_fake_engine.SLOW + " q", "max_tokens": 2, "memory": "a"}
            threads = [threading.Thread(target=lambda: slow.append(c.post("/v1/completions", json=body)))
                       for _ in range(11)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            t0 = time.monotonic()
            assert c.get("/healthz").status_code == 200 and time.monotonic() - t0 < 0.5
            for t in threads:
                t.join()
    codes = sorted(r.status_code for r in slow)
    assert codes == [200] * 8 + [503] * 3, codes
    assert all(r.headers["Retry-After"] == "2" for r in slow if r.status_code == 503)
    assert app.state.work.admitted == 0 and max(eng.batches) > 1


def test_batch_holds_every_namespace_read_lock_writes_wait(tmp_path: Path) -> None:
    """A write to a namespace a running batch reads waits for the batch (no half-applied write is read)."""
    import store_fake_engine
    from fastapi.testclient import TestClient

    eng = store_fake_engine.BatchingFakeEngine()
    with open_store_for(eng, tmp_path) as store:
        app = create_app(eng, store, ServiceLimits(batch_window_ms=400), require_keys=False)
        with TestClient(app) as c:
            for ns in ("a", "b"):
                assert c.post(f"/v1/memories/{ns}/facts", json={"facts": [f"{ns} knows it"]}).status_code == 201
            done: list[float] = []

            def ask(ns: str) -> None:
                c.post("/v1/completions", json={"prompt": store_fake_engine.SLOW + " x", "memory": ns})
                done.append(time.monotonic())

            threads = [threading.Thread(target=ask, args=(ns,)) for ns in ("a", "b")]
            for t in threads:
                t.start()
            time.sleep(0.5)  # the batch (a and b) is running
            assert c.post("/v1/memories/b/facts", json={"facts": ["b knows more"]}).status_code == 201
            wrote = time.monotonic()
            for t in threads:
                t.join()
    assert eng.batches[-1] == 2 and wrote >= max(done) - 0.05
