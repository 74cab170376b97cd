"""What the service asks of a model (`Engine`), its limits (`ServiceLimits`), and the bounded, batched model work:
`WorkGate` admits at most a fixed number of requests (503 + Retry-After beyond) and runs at most a few batches at
once; `Batcher` gathers completions that arrive within a few milliseconds into one engine call."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

from fastapi import HTTPException
from torch import Tensor

from larimar.facts import MAX_TEXT_CHARS
from larimar.memory import ItemMemory, MemoryConfig
from larimar.serving.schemas import (
    CompletionItem,
)
from larimar.serving.store import MemoryStore

logger = logging.getLogger(__name__)


@runtime_checkable
class Engine(Protocol):
    """What the service needs from a model: encode facts, complete a prompt given a memory.

    Attributes:
        fingerprint: the checkpoint fingerprint the store is tied to (e.g. sha256 of weights + config).
    """

    fingerprint: str

    def memory_config(self) -> MemoryConfig:
        """The memory's shape (num_slots K, code_size C)."""
        ...

    def new_memory(self) -> ItemMemory:
        """An empty memory for a namespace."""
        ...

    def encode_facts(self, facts: list[str], requests: list[dict[str, Any] | None] | None = None) -> Tensor:
        """Latents (n, C) of n fact sentences; ``requests[i]`` ({prompt, subject, target_new}), when given, is the
        request sentence i was made from (an engine may use its prompt / answer split)."""
        ...

    def complete(
        self, prompt: str, memory: ItemMemory, facts: dict[str, str], max_tokens: int, temperature: float
    ) -> tuple[str, dict[str, Any]]:
        """Completion text and {"in_scope": bool, "nearest_id": str | None, "similarity": float}.

        Called from several threads at once (up to ``ServiceLimits.max_concurrent_work``): keep no per-call state on
        shared objects. An engine whose ``complete`` takes a ``top_p`` keyword gets the request's; a ValueError
        (e.g. a prompt longer than the model's window) is answered 422.
        """
        ...


@dataclass
class ServiceLimits:
    """Request limits; anything beyond them is rejected with a 4xx before any work is done.

    Attributes:
        max_body_bytes: request body size (413 beyond).
        max_fact_chars: characters per fact sentence (after formatting a request object).
        max_facts_per_request: facts in one POST.
        max_prompt_chars: characters of a prompt / of all chat messages together.
        max_messages: chat messages per request.
        max_tokens: the largest max_tokens a client may ask for.
        max_concurrent_work: model calls (fact encodings, completions) running at once.
        max_queued_work: model calls waiting for a slot; one more is answered 503 with Retry-After.
        queue_timeout_s: the longest a queued call waits for a slot before its 503.
        retry_after_s: the Retry-After of those 503s.
        batch_window_ms: how long the first of concurrent completions waits for others to share its batch (0: no
            wait, only those already waiting join); engines without ``complete_batch`` answer one at a time.
        max_batch: completions in one batch at most (1: no batching).
    """

    max_body_bytes: int = 1_000_000
    max_fact_chars: int = 2_000
    max_facts_per_request: int = 256
    max_prompt_chars: int = MAX_TEXT_CHARS
    max_messages: int = 64
    max_tokens: int = 512
    max_concurrent_work: int = 1
    max_queued_work: int = 16
    queue_timeout_s: int = 60
    retry_after_s: int = 1
    batch_window_ms: int = 5
    max_batch: int = 16

    def __post_init__(self) -> None:
        for f in fields(self):
            v, least = getattr(self, f.name), 0 if f.name == "batch_window_ms" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                kind = "a non-negative" if least == 0 else "a positive"
                raise ValueError(f"ServiceLimits.{f.name} must be {kind} int, got {v!r}")
        for name in ("max_fact_chars", "max_prompt_chars"):  # the editor refuses longer texts
            if getattr(self, name) > MAX_TEXT_CHARS:
                raise ValueError(f"ServiceLimits.{name} must be at most {MAX_TEXT_CHARS} (larimar.facts.MAX_TEXT_CHARS)")


class WorkGate:
    """Bounds model work: ``running`` calls at once, ``queued`` more waiting; beyond that (or after waiting
    ``timeout`` seconds) an `HTTPException` 503 with Retry-After. Thread-safe; `/healthz` never enters it."""

    def __init__(self, running: int, queued: int, timeout: float, retry_after: int) -> None:
        self._slots = threading.BoundedSemaphore(running)
        self._lock = threading.Lock()
        self._admitted = 0
        self.capacity = running + queued
        self.timeout = timeout
        self.retry_after = retry_after

    def _busy(self, why: str) -> HTTPException:
        return HTTPException(503, f"the server is busy ({why}); retry after {self.retry_after} s",
                             headers={"Retry-After": str(self.retry_after)})

    @property
    def admitted(self) -> int:
        """Calls running or waiting now."""
        return self._admitted

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Counts one call as running or queued; 503 at once when ``running + queued`` are already admitted."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise self._busy(f"{self.capacity} model calls running or queued")
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """One of the ``running`` model slots (a batch of completions takes one); 503 after ``timeout`` s."""
        if not self._slots.acquire(timeout=self.timeout):
            raise self._busy(f"no model slot within {self.timeout:g} s")
        try:
            yield
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.admit(), self.slot():
            yield


class Job:
    """One completion waiting in a `Batcher`: its namespace (None: no memory), its request, then its outcome."""

    __slots__ = ("done", "max_tokens", "namespace", "prompt", "result", "temperature", "top_p")

    def __init__(self, namespace: str | None, prompt: str, max_tokens: int, temperature: float, top_p: float) -> None:
        self.namespace, self.prompt, self.max_tokens = namespace, prompt, max_tokens
        self.temperature, self.top_p = temperature, top_p
        self.result: Any = None  # (text, info) or an exception
        self.done = False


class Batcher:
    """Dynamic batching of completions: requests arriving within ``window`` seconds (at most ``max_batch``) share
    one ``engine.complete_batch`` call.

    No thread of its own: the oldest waiting request's thread leads. It first takes one model slot of the
    `WorkGate` for the whole batch (requests arriving while the model is busy keep waiting and join), then waits up
    to ``window`` s for more (less if ``max_batch`` are waiting), takes up to ``max_batch`` of them, holds the read
    locks of every namespace the batch reads (in name order, so two batches never wait
    on each other) while the engine runs, and hands each request its answer. Every request was admitted to the
    gate by its own thread (so the 503 bound counts requests, not batches).
    """

    def __init__(
        self, engine: Any, store: MemoryStore, gate: WorkGate, empty_memory: ItemMemory, window: float,
        max_batch: int,
    ) -> None:
        self.engine, self.store, self.gate, self.empty_memory = engine, store, gate, empty_memory
        self.window, self.max_batch = window, max_batch
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[Job] = []
        self._collecting = False
        self.batches: list[int] = []  # sizes of the last batches run (for tests and logs), bounded
        self._batches_limit = 1000

    def submit(self, job: Job) -> tuple[str, dict[str, Any]]:
        """Runs ``job`` in a batch (led by this thread or another); returns (text, info) or raises its error."""
        with self._cond:
            self._pending.append(job)
            if len(self._pending) >= self.max_batch:
                self._cond.notify_all()
            while not job.done and not (not self._collecting and self._pending and self._pending[0] is job):
                self._cond.wait()  # taken into a running batch, or another thread leads the next one
            leads = not job.done
            if leads:
                self._collecting = True
        if leads:
            self._lead(job)
        if isinstance(job.result, BaseException):
            raise job.result
        return job.result

    def _lead(self, job: Job) -> None:
        """Leads the next batch, ``job`` first: waits for a model slot, then for ``window`` s (or ``max_batch``
        jobs), takes the batch and runs it. Requests arriving while the model is busy wait in ``_pending`` and
        join this batch, so a busy server decodes large batches instead of several small ones."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.gate.slot())
            except BaseException:  # no slot in time (503): this job fails alone, the next oldest leads
                with self._cond:
                    self._collecting = False
                    self._pending.remove(job)
                    self._cond.notify_all()
                raise
            with self._cond:
                deadline = time.monotonic() + self.window
                while len(self._pending) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                self._collecting = False
                self._cond.notify_all()  # the oldest of those left leads the next batch
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        """Runs a batch (the caller holds its model slot) and hands each job its result."""
        try:
            with contextlib.ExitStack() as stack:
                views: dict[str, tuple[ItemMemory, dict[str, str]]] = {}
                for ns in sorted({j.namespace for j in batch if j.namespace is not None}):
                    memory, texts = stack.enter_context(self.store.reading(ns))
                    views[ns] = (memory, dict(texts))
                items = [
                    CompletionItem(j.prompt, *(views[j.namespace] if j.namespace is not None
                                               else (self.empty_memory, {})), j.max_tokens, j.temperature, j.top_p)
                    for j in batch
                ]
                results = self.engine.complete_batch(items)
                if len(results) != len(batch):
                    raise RuntimeError(f"complete_batch answered {len(results)} of {len(batch)} items")
        except BaseException as err:  # noqa: BLE001 - every request of the batch gets the error
            results = [err] * len(batch)
        with self._cond:
            for j, r in zip(batch, results):
                j.result, j.done = r, True
            self.batches.append(len(batch))
            del self.batches[: -self._batches_limit]
            self._cond.notify_all()
