"""The HTTP service: OpenAI-compatible completions over persistent, namespaced episodic memories.

Endpoints (Bearer API keys from `MemoryStore.add_key`, per-namespace "read" / "write" rights)::

    POST   /v1/completions                  OpenAI body + "memory": "<namespace>"; reply + "memory": scope decision
    POST   /v1/chat/completions             the same for chat messages (the last user message is the query)
    POST   /v1/memories/{ns}/facts          {"facts": [sentence | {prompt, subject, target_new}], "ids"?} -> ids
    GET    /v1/memories/{ns}/facts          the live facts, in write order
    DELETE /v1/memories/{ns}/facts/{id}     exact forgetting (alpha = -1)
    GET    /v1/memories/{ns}                size, fill = size / K, checkpoint fingerprint
    GET    /healthz                         no key needed; never waits on the model or a namespace lock
    GET    /openapi.json                    the schema (FastAPI default; /docs renders it)

Every write is durable before it is acknowledged (see `larimar.serving.store`). Completions hold the namespace's read
lock while they read the memory, writes its write lock, so readers run in parallel, writes to one namespace are
serialised and no request sees a half-applied write. Oversized, non-UTF-8 or malformed bodies, wrong types and
limit violations get a 4xx with a message and change nothing; every limit (`ServiceLimits`) is checked before any
model work and declared in the OpenAPI schema. Model work (encoding facts, completions) runs at most
``max_concurrent_work`` at a time with at most ``max_queued_work`` waiting; beyond that a request gets 503 with
``Retry-After``. ``"stream": true`` answers completions as server-sent events in OpenAI's chunk format.

Run it::

    LARIMAR_ENGINE=my_pkg.engines:load LARIMAR_STORE=/srv/larimar \\
        uvicorn larimar.serving.service:create_app_from_env --factory --host 127.0.0.1 --port 8000

or `serve(host, port, store_path, engine="my_pkg.engines:load")`. The engine is built once per process.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from larimar.facts import as_fact
from larimar.serving.schemas import (
    ID_PATTERN,
    NAMESPACE_PATTERN,
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    EditRequestBody,
    ErrorResponse,
    FactDeleted,
    FactList,
    FactOut,
    FactsWritten,
    Health,
    MemoryDecision,
    MemoryInfo,
    Usage,
    clean_str,
    limited_bodies,
)
from larimar.serving.storage import ID_RE, ApiKey, StoreError, check_namespace
from larimar.serving.store import MemoryStore
from larimar.serving.work import Batcher, Engine, Job, ServiceLimits, WorkGate

logger = logging.getLogger(__name__)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found", 405: "method_not_allowed",
            413: "request_too_large", 415: "unsupported_media_type", 503: "server_overloaded"}
    return JSONResponse(
        {"error": {"message": message, "type": kind.get(status, "invalid_request_error"), "code": status}},
        status_code=status,
        headers=headers,
    )


class _BodyGuard:
    """ASGI middleware: rejects bodies over the limit (413), not declared JSON (415), not UTF-8 or not JSON (400).

    Only requests a route takes (path and method) are checked: an unknown path or method gets its 404 / 405 from
    the router. An accepted body is replayed to the app unchanged.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int, routes: list[Any] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.routes = routes

    def _routed(self, scope: dict[str, Any]) -> bool:
        if self.routes is None:
            return True
        return any(route.matches(scope)[0] == Match.FULL for route in self.routes)

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH") or not self._routed(scope):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _error(413, f"request body must be at most {self.max_bytes} bytes")(scope, receive, send)
            return
        ctype = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json" and not ctype.endswith(b"+json"):
            await _error(415, "Content-Type must be application/json")(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _error(413, f"request body must be at most {self.max_bytes} bytes")(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as err:
            await _error(400, f"request body must be UTF-8: {err}")(scope, receive, send)
            return
        except (ValueError, RecursionError) as err:
            await _error(400, f"request body must be a JSON document: {str(err)[:200]}")(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _body_type(model: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Sets an endpoint's ``body`` annotation to a class made at run time (string annotations are resolved in the
    module's globals, where per-app body classes are not)."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__annotations__ = {**fn.__annotations__, "body": model}
        return fn

    return mark


def _sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events: ``data: {chunk}`` per chunk, then ``data: [DONE]``."""

    def events() -> Iterator[bytes]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _pieces(text: str) -> list[str]:
    """The text cut before each run of whitespace (" a b" -> [" a", " b"]), for streamed deltas."""
    out, start = [], 0
    for k in range(1, len(text)):
        if text[k].isspace() and not text[k - 1].isspace():
            out.append(text[start:k])
            start = k
    if start < len(text):
        out.append(text[start:])
    return out


# ----------------------------------------------------------------------------------------------------------
# The app


def _fact(fact: str | EditRequestBody) -> str | dict[str, Any]:
    """A posted fact as `larimar.facts.as_fact` takes it."""
    if isinstance(fact, str):
        return fact
    target = fact.target_new if isinstance(fact.target_new, str) else fact.target_new.str
    return {"prompt": fact.prompt, "subject": fact.subject, "target_new": target}


def _float_or_none(x: object) -> float | None:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _finish_reason(info: dict[str, Any], used: int, max_tokens: int) -> str:
    reason = info.get("finish_reason")
    return reason if isinstance(reason, str) else ("length" if used >= max_tokens else "stop")


def _count(info: dict[str, Any], key: str, text: str) -> int:
    v = info.get(key)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else len(text.split())


def create_app(
    engine: Engine, store: MemoryStore, limits: ServiceLimits | None = None, *, require_keys: bool = True
) -> FastAPI:
    """Builds the FastAPI app over one engine and one store (the caller owns both).

    Args:
        engine: the model behind the service (`Engine` protocol).
        store: the store holding the namespaces' memories; opened with the engine's fingerprint and memory module.
        limits: request limits (default `ServiceLimits()`).
        require_keys: demand a Bearer API key on every endpoint but /healthz (False: open service; keep it on
            loopback).

    Raises:
        StoreError: the store's fingerprint or memory shape is not the engine's.
    """
    limits = limits or ServiceLimits()
    if store.fingerprint != engine.fingerprint:
        raise StoreError(
            f"store fingerprint {store.fingerprint!r} differs from the engine's checkpoint fingerprint "
            f"{engine.fingerprint!r}"
        )
    if store.memory_module is None:
        raise StoreError("the store must be opened with the engine's memory module (memory=...)")
    cfg = engine.memory_config()
    scfg = store.memory_module.config
    if (cfg.num_slots, cfg.code_size) != (scfg.num_slots, scfg.code_size):
        raise StoreError(
            f"store memories are {scfg.num_slots} x {scfg.code_size}, the engine's {cfg.num_slots} x {cfg.code_size}"
        )
    empty_memory = engine.new_memory()  # for completions without a namespace; never written
    bearer = HTTPBearer(auto_error=False, description="an API key from `MemoryStore.add_key`")
    WriteFactsBody, CompletionBody, ChatCompletionBody = limited_bodies(
        limits.max_fact_chars, limits.max_facts_per_request, limits.max_prompt_chars, limits.max_messages,
        limits.max_tokens,
    )
    work = WorkGate(limits.max_concurrent_work, limits.max_queued_work, limits.queue_timeout_s, limits.retry_after_s)
    batcher = (
        Batcher(engine, store, work, empty_memory, limits.batch_window_ms / 1000.0, limits.max_batch)
        if callable(getattr(engine, "complete_batch", None)) and limits.max_batch > 1 else None
    )
    try:
        takes_top_p = "top_p" in inspect.signature(engine.complete).parameters
    except (TypeError, ValueError):
        takes_top_p = False
    ns_param = PathParam(description="a namespace: 1-64 of letters, digits, '_', '.', '-', starting with a letter "
                         "or digit", json_schema_extra={"pattern": NAMESPACE_PATTERN, "maxLength": 64})
    id_param = PathParam(description="a fact id", json_schema_extra={"pattern": ID_PATTERN, "maxLength": 128})

    app = FastAPI(
        title="larimar",
        version="1",
        description="Episodic memory for language models (Larimar): OpenAI-compatible completions conditioned on "
        "persistent, namespaced, editable memories.",
        responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 405, 413, 415, 422, 503)},
    )
    app.add_middleware(_BodyGuard, max_bytes=limits.max_body_bytes, routes=app.router.routes)
    app.state.engine, app.state.store, app.state.limits, app.state.work = engine, store, limits, work
    app.state.batcher = batcher

    @app.exception_handler(StarletteHTTPException)  # ours and the router's (unknown path, wrong method)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:10]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body" and "function-after" not in str(x))
            parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
        return _error(422, "invalid request: " + "; ".join(parts))

    def authenticate(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey | None:
        if not require_keys:
            return None
        key = store.lookup_key(creds.credentials) if creds is not None else None
        if key is None:
            raise HTTPException(401, "a valid API key is required: Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})
        return key

    def authorize(key: ApiKey | None, namespace: str | None, need: str) -> None:
        if key is not None and not key.allows(namespace, need):
            raise HTTPException(403, f"API key {key.name!r} has no {need} right on namespace {namespace!r}")

    def namespace_of(ns: str) -> str:
        try:
            return check_namespace(ns)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None

    def existing(ns: str) -> str:
        if not store.has_namespace(ns):
            raise HTTPException(404, f"no memory namespace {ns!r} (it is created by its first write)")
        return ns

    def reader(ns: str = ns_param, key: ApiKey | None = Depends(authenticate)) -> str:
        ns = namespace_of(ns)
        authorize(key, ns, "read")
        return ns

    def writer(ns: str = ns_param, key: ApiKey | None = Depends(authenticate)) -> tuple[str, ApiKey | None]:
        ns = namespace_of(ns)
        authorize(key, ns, "write")
        return ns, key

    def run_completion(
        key: ApiKey | None, namespace: str | None, prompt: str, max_tokens: int, temperature: float,
        top_p: float = 1.0,
    ) -> tuple[str, dict[str, Any], MemoryDecision]:
        if namespace is not None:
            namespace = namespace_of(namespace)
        authorize(key, namespace, "read")
        if not 1 <= max_tokens <= limits.max_tokens:
            raise HTTPException(422, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}")
        if not 0.0 <= temperature <= 2.0:
            raise HTTPException(422, f"temperature must be between 0 and 2, got {temperature}")
        if not prompt.strip():
            raise HTTPException(422, "the prompt must not be empty")
        if len(prompt) > limits.max_prompt_chars:
            raise HTTPException(422, f"the prompt must be at most {limits.max_prompt_chars} characters")
        if namespace is not None:
            existing(namespace)
        extra = {"top_p": top_p} if takes_top_p else {}
        try:
            if batcher is not None:
                with work.admit():
                    text, info = batcher.submit(Job(namespace, prompt, max_tokens, temperature, top_p))
            else:
                with work():
                    if namespace is None:
                        text, info = engine.complete(prompt, empty_memory, {}, max_tokens, temperature, **extra)
                    else:
                        with store.reading(namespace) as (memory, texts):
                            text, info = engine.complete(
                                prompt, memory, dict(texts), max_tokens, temperature, **extra
                            )
        except ValueError as err:  # the engine refused the prompt (e.g. longer than the decoder's window)
            raise HTTPException(422, str(err)) from None
        nearest = info.get("nearest_id")
        decision = MemoryDecision(
            namespace=namespace,
            in_scope=bool(info.get("in_scope", False)),
            nearest_id=nearest if isinstance(nearest, str) else None,
            similarity=_float_or_none(info.get("similarity")),
        )
        return str(text), info, decision

    def check_openai_options(n: int) -> None:
        if n != 1:
            raise HTTPException(400, f"only n=1 is supported, got n={n}")

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> Health:
        """Liveness; needs no key. Runs on the event loop: it never waits for a worker thread, the model or a lock."""
        return Health(status="ok", fingerprint=engine.fingerprint)

    @app.post("/v1/completions", response_model=CompletionResponse, tags=["openai"],
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "the completion, or with stream=true its chunks as server-sent events"}})
    @_body_type(CompletionBody)
    def completions(body: CompletionBody, key: ApiKey | None = Depends(authenticate)) -> Any:
        """OpenAI-compatible text completion; "memory" names the namespace to condition on."""
        check_openai_options(body.n)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if len(prompts) != 1:
            raise HTTPException(400, f"exactly one prompt per request is supported, got {len(prompts)}")
        text, info, decision = run_completion(
            key, body.memory, prompts[0], body.max_tokens, body.temperature, body.top_p
        )
        used = _count(info, "completion_tokens", text)
        prompt_tokens = _count(info, "prompt_tokens", prompts[0])
        reply = CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model or "larimar",
            choices=[CompletionChoice(text=text, index=0, finish_reason=_finish_reason(info, used, body.max_tokens))],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=used, total_tokens=prompt_tokens + used),
            memory=decision,
        )
        if not body.stream:
            return reply
        head = {"id": reply.id, "object": "text_completion", "created": reply.created, "model": reply.model}
        chunks = [head | {"choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}],
                          "memory": decision.model_dump()} for piece in _pieces(text)]
        chunks.append(head | {"choices": [{"text": "", "index": 0, "logprobs": None,
                                           "finish_reason": reply.choices[0].finish_reason}],
                              "usage": reply.usage.model_dump(), "memory": decision.model_dump()})
        return _sse(chunks)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["openai"],
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "the completion, or with stream=true its chunks as server-sent events"}})
    @_body_type(ChatCompletionBody)
    def chat_completions(body: ChatCompletionBody, key: ApiKey | None = Depends(authenticate)) -> Any:
        """OpenAI-compatible chat completion. The query (scope decision and prompt) is the last user message."""
        check_openai_options(body.n)
        if not body.messages or len(body.messages) > limits.max_messages:
            raise HTTPException(422, f"messages must hold 1 to {limits.max_messages} messages")
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise HTTPException(422, "messages must contain a user message")
        content = users[-1].content
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise HTTPException(422, "a list content must hold parts {\"type\": \"text\", \"text\": str}")
            try:
                content = clean_str(" ".join(texts))  # type: ignore[arg-type]
            except ValueError as err:
                raise HTTPException(422, f"content {err}") from None
        if content is None:
            raise HTTPException(422, "the last user message has no content")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = 16 if max_tokens is None else max_tokens
        text, info, decision = run_completion(key, body.memory, content, max_tokens, body.temperature, body.top_p)
        used = _count(info, "completion_tokens", text)
        prompt_tokens = _count(info, "prompt_tokens", content)
        reply = ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model or "larimar",
            choices=[ChatChoice(
                index=0, message=AssistantMessage(content=text),
                finish_reason=_finish_reason(info, used, max_tokens),
            )],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=used, total_tokens=prompt_tokens + used),
            memory=decision,
        )
        if not body.stream:
            return reply
        head = {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created, "model": reply.model}
        deltas = [{"role": "assistant", "content": ""}] + [{"content": piece} for piece in _pieces(text)]
        chunks = [head | {"choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}],
                          "memory": decision.model_dump()} for d in deltas]
        chunks.append(head | {"choices": [{"index": 0, "delta": {}, "logprobs": None,
                                           "finish_reason": reply.choices[0].finish_reason}],
                              "usage": reply.usage.model_dump(), "memory": decision.model_dump()})
        return _sse(chunks)

    @app.post("/v1/memories/{ns}/facts", response_model=FactsWritten, status_code=201, tags=["memories"])
    @_body_type(WriteFactsBody)
    def write_facts(body: WriteFactsBody, target: tuple[str, ApiKey | None] = Depends(writer)) -> FactsWritten:
        """Writes facts to a namespace (created on first write); durable before the reply."""
        ns, key = target
        if not 1 <= len(body.facts) <= limits.max_facts_per_request:
            raise HTTPException(
                422, f"facts must hold 1 to {limits.max_facts_per_request} items, got {len(body.facts)}"
            )
        if body.ids is not None:
            if len(body.ids) != len(body.facts):
                raise HTTPException(422, f"got {len(body.ids)} ids for {len(body.facts)} facts")
            bad = [i for i in body.ids if not ID_RE.fullmatch(i)]
            if bad:
                raise HTTPException(422, f"invalid fact id {bad[0]!r}: ids are 1-128 of letters, digits, '_', '.', "
                                    "':', '-' starting with a letter or digit")
            if len(set(body.ids)) != len(body.ids):
                raise HTTPException(422, "ids must be unique within one write")
            taken = store.taken_ids(ns, body.ids)
            if taken:
                raise HTTPException(422, f"ids already in namespace {ns!r}: {taken[:5]}")
        try:
            sentences = [as_fact(_fact(f), limits.max_fact_chars)[0] for f in body.facts]
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        provenance = [
            {"source": "api", "key": key.name if key else None}
            | ({"request": f.model_dump()} if isinstance(f, EditRequestBody) else {})
            for f in body.facts
        ]
        try:
            requests = [f.model_dump() if isinstance(f, EditRequestBody) else None for f in body.facts]
            with work():
                latents = engine.encode_facts(sentences, requests)  # (n, C)
            ids = store.write(ns, sentences, latents, ids=body.ids, provenance=provenance)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        return FactsWritten(namespace=ns, ids=ids, size=store.size(ns))

    @app.get("/v1/memories/{ns}/facts", response_model=FactList, tags=["memories"])
    def list_facts(ns: str = Depends(reader)) -> FactList:
        """The live facts of a namespace, in write order."""
        existing(ns)
        facts = [FactOut(id=f.id, text=f.text, created=f.timestamp) for f in store.facts(ns)]
        return FactList(namespace=ns, facts=facts)

    @app.delete("/v1/memories/{ns}/facts/{fact_id}", response_model=FactDeleted, tags=["memories"])
    def delete_fact(fact_id: str = id_param, target: tuple[str, ApiKey | None] = Depends(writer)) -> FactDeleted:
        """Forgets one fact exactly; durable before the reply."""
        ns, key = target
        existing(ns)
        try:
            store.forget(ns, [fact_id], provenance={"source": "api", "key": key.name if key else None})
        except KeyError:
            raise HTTPException(404, f"no fact {fact_id!r} in namespace {ns!r}") from None
        return FactDeleted(namespace=ns, deleted=fact_id, size=store.size(ns))

    @app.get("/v1/memories/{ns}", response_model=MemoryInfo, tags=["memories"])
    def memory_info(ns: str = Depends(reader)) -> MemoryInfo:
        """Size, fill (= size / K) and the checkpoint fingerprint of a namespace's memory."""
        existing(ns)
        size, K = store.size(ns), cfg.num_slots
        return MemoryInfo(namespace=ns, size=size, num_slots=K, fill=size / K, fingerprint=store.fingerprint)

    return app


# ----------------------------------------------------------------------------------------------------------
# Building from the environment / serving


def load_engine(spec: str) -> Engine:
    """Builds an engine from "package.module:factory" or "/path/to/file.py:factory" (a class or function).

    Raises:
        ValueError: a malformed spec, or a factory that does not return an `Engine`.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"engine spec must look like 'package.module:factory' or 'file.py:factory', got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        mod_spec = importlib.util.spec_from_file_location(f"_larimar_engine_{path.stem}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise ValueError(f"cannot import engine file {path}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    engine = getattr(module, attr)()
    if not isinstance(engine, Engine):
        raise ValueError(f"{spec} returned {type(engine).__name__}, which does not implement the Engine protocol")
    return engine


def open_store_for(
    engine: Engine, store_path: str | os.PathLike[str] | None, snapshot_every: int = 64, max_loaded: int | None = 64
) -> MemoryStore:
    """Opens (or creates) the store at `store_path` for this engine's checkpoint and memory module, holding at most
    ``max_loaded`` namespaces in RAM (None: no bound)."""
    return MemoryStore(
        store_path, fingerprint=engine.fingerprint, memory=engine.new_memory().memory, snapshot_every=snapshot_every,
        max_loaded=max_loaded,
    )


def _app_owning(engine: Engine, store: MemoryStore, limits: ServiceLimits | None, require_keys: bool) -> FastAPI:
    app = create_app(engine, store, limits, require_keys=require_keys)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()  # snapshots what was edited; the log already holds everything

    app.router.lifespan_context = lifespan
    return app


def create_app_from_env() -> FastAPI:
    """An app configured by environment variables (for ``uvicorn larimar.serving.service:create_app_from_env --factory``).

    LARIMAR_ENGINE (required) the engine factory, "package.module:factory" or "file.py:factory";
    LARIMAR_STORE the store folder (default `larimar.serving.store.default_store_path()`);
    LARIMAR_LIMITS a JSON object of `ServiceLimits` fields; LARIMAR_REQUIRE_KEYS "0" for an open service;
    LARIMAR_MAX_LOADED the namespaces held in RAM at most (default 64; "0": no bound).
    """
    spec = os.environ.get("LARIMAR_ENGINE")
    if not spec:
        raise ValueError("set LARIMAR_ENGINE to the engine factory, e.g. 'package.module:factory'")
    limits = ServiceLimits(**json.loads(os.environ.get("LARIMAR_LIMITS", "{}")))
    require_keys = os.environ.get("LARIMAR_REQUIRE_KEYS", "1") != "0"
    engine = load_engine(spec)
    max_loaded = int(os.environ.get("LARIMAR_MAX_LOADED", "64"))
    store = open_store_for(engine, os.environ.get("LARIMAR_STORE") or None, max_loaded=max_loaded or None)
    logger.info("serving store %s with engine %s (limits %s)", store.path, spec, asdict(limits))
    return _app_owning(engine, store, limits, require_keys)


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    store_path: str | os.PathLike[str] | None = None,
    engine: Engine | str | None = None,
    limits: ServiceLimits | None = None,
    require_keys: bool = True,
    log_level: str = "info",
) -> None:
    """Runs the service with uvicorn until interrupted.

    Args:
        host: interface to bind (default loopback only).
        port: TCP port.
        store_path: the store folder (default `larimar.serving.store.default_store_path()`).
        engine: an engine, or a factory spec for `load_engine` (default: $LARIMAR_ENGINE).
        limits: request limits (default: $LARIMAR_LIMITS, a JSON object of `ServiceLimits` fields, else the
            defaults); $LARIMAR_MAX_LOADED bounds the namespaces held in RAM (default 64, 0: no bound).
        require_keys: demand API keys (create them with `MemoryStore.add_key`).
        log_level: uvicorn's log level.
    """
    import uvicorn

    if engine is None:
        engine = os.environ.get("LARIMAR_ENGINE") or None
        if engine is None:
            raise ValueError("serve() needs an engine or a factory spec (or $LARIMAR_ENGINE)")
    if isinstance(engine, str):
        engine = load_engine(engine)
    if limits is None:
        limits = ServiceLimits(**json.loads(os.environ.get("LARIMAR_LIMITS", "{}")))
    max_loaded = int(os.environ.get("LARIMAR_MAX_LOADED", "64"))
    store = open_store_for(engine, store_path, max_loaded=max_loaded or None)
    app = _app_owning(engine, store, limits, require_keys)
    if host not in ("127.0.0.1", "localhost", "::1") and not require_keys:
        logger.warning("serving on %s without API keys: anyone who can reach it can edit the memories", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
