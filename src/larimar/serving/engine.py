"""The service engine: the `larimar.serving.service.Engine` protocol on a real `Larimar` model.

The service owns the memories (one `ItemMemory` per namespace, from the store); the engine only encodes facts and
answers prompts against the memory it is handed.

Thread safety: any number of threads may call `encode_facts` and `complete` at once. The model holds no per-call
state (the gated LoRA's gate is a context variable of `larimar.conditioning`, set per forward), each call builds
its own scope detector from the shared one (a shallow copy whose lists are rebound, never mutated), and the scope
embedding cache is guarded by a lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from larimar.editor import Larimar
from larimar.memory import ItemMemory, MemoryConfig
from larimar.scope import ScopeDetector
from larimar.serving.schemas import MIN_TEMPERATURE, CompletionItem


class PromptTooLong(ValueError):
    """The prompt and the tokens asked for do not fit the decoder's window (the service answers 422)."""


class LarimarEngine:
    """The `larimar.serving.service.Engine` protocol on a `Larimar` editor (its model, scope encoder and settings).

    The service owns the memories (one `ItemMemory` per namespace, from the store); the engine only encodes facts
    and answers prompts against the memory it is handed. Scope embeddings of fact sentences are cached by text.

    Args:
        lm: the editor whose model and scope detector are used (its own memory is not touched).
        cache_size: fact sentences whose scope embedding is kept.
    """

    def __init__(self, lm: Larimar, cache_size: int = 100_000) -> None:
        self.lm = lm
        self.fingerprint = lm.fingerprint
        self._cache: OrderedDict[str, Tensor] = OrderedDict()  # fact sentence -> scope embedding (D,), LRU
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        cfg = lm.model.decoder.model.config
        window = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.window: int | None = int(window) if window else None  # positions of the decoder (start token included)

    def memory_config(self) -> MemoryConfig:
        return self.lm.model.memory.config

    def new_memory(self) -> ItemMemory:
        return ItemMemory(self.lm.model.memory)

    def encode_facts(self, facts: list[str], requests: list[Any] | None = None) -> Tensor:
        """Latents (n, C) as `Larimar.edit` writes them: refined on each request where one is given (its answer
        after its prompt), else on the sentence."""
        requests = requests or [None] * len(facts)
        return self.lm.fact_latents([r if r is not None else f for f, r in zip(facts, requests)])[1]

    def _embeddings(self, texts: list[str]) -> list[Tensor]:
        """Scope embeddings (D,) of fact sentences, from the cache or embedded now (outside the lock)."""
        with self._cache_lock:
            found = {t: self._cache[t] for t in texts if t in self._cache}
            for t in found:
                self._cache.move_to_end(t)
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            emb = self.lm.scope.embed(missing)  # (m, D)
            found.update(zip(missing, emb))
            with self._cache_lock:
                self._cache.update(zip(missing, emb))
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return [found[t] for t in texts]

    def _scope_for(self, ids: list[str], facts: Mapping[str, str]) -> ScopeDetector:
        """A detector of this call's own holding ``ids`` (the shared one is copied, and its copy's lists rebound)."""
        if not ids:
            return self.lm.scope.with_facts()
        return self.lm.scope.with_facts(torch.stack(self._embeddings([facts[i] for i in ids])), ids)

    def prompt_ids(self, prompt: str, max_tokens: int) -> list[int]:
        """The prompt's decoder tokens, whole; `PromptTooLong` when start + prompt + max_tokens exceed the window."""
        model = self.lm.model
        ids = model.decoder_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.window is not None and 1 + len(ids) + max_tokens > self.window:
            raise PromptTooLong(
                f"the prompt is {len(ids)} tokens; with the start token and max_tokens={max_tokens} it exceeds the "
                f"decoder's window of {self.window} tokens"
            )
        return ids

    def complete(
        self, prompt: str, memory: ItemMemory, facts: dict[str, str], max_tokens: int, temperature: float,
        top_p: float = 1.0,
    ) -> tuple[str, dict[str, Any]]:
        """Completion of ``prompt`` with ``memory`` (its facts' texts by id); info holds the scope decision.

        The prompt is never cut: it uses the decoder's whole window, and one too long for it raises `PromptTooLong`.
        A positive temperature below `MIN_TEMPERATURE` is raised to it.
        """
        out = self.complete_batch([CompletionItem(prompt, memory, dict(facts), max_tokens, temperature, top_p)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    @torch.inference_mode()
    def complete_batch(self, items: Sequence[CompletionItem]) -> list[tuple[str, dict[str, Any]] | Exception]:
        """Completions of several prompts, each against its own memory, decoded together (dynamic batching).

        The items are routed together (`Larimar.route_each`: one scope-encoder and one encoder pass for the batch,
        then each item's read against its own memory and scope); then the items with the same
        sampling settings (greedy together, sampled ones with the same temperature and top_p) are decoded in ONE
        `generate` over their left-padded prompts with per-row latents (B, C) and the group's largest max_tokens,
        and each row is cut at its own max_tokens, then at EOS. Each row is conditioned on its latent as the
        editor's ``memory_span`` says (its first sentence, then the plain decoder; or every token). A greedy answer
        equals the one given alone (left padding is masked and positions start at each row's first token).

        Returns:
            per item, (text, info) as `complete`, or the ValueError (e.g. `PromptTooLong`) that refused it; the
            other items are answered all the same.
        """
        lm = self.lm
        model = lm.model
        out: list[tuple[str, dict[str, Any]] | Exception | None] = [None] * len(items)
        groups: dict[tuple[bool, float, float], list[tuple[int, str, int, Any]]] = {}
        valid: list[tuple[int, str, int, tuple[ItemMemory, ScopeDetector]]] = []
        for k, it in enumerate(items):
            try:
                prompt = lm.check_prompts(it.prompt)[0]
                n_tokens = len(self.prompt_ids(prompt, it.max_tokens))
                scope = self._scope_for(it.memory.ids, it.facts) if len(it.memory) else lm.scope
            except ValueError as err:
                out[k] = err
                continue
            valid.append((k, prompt, n_tokens, (it.memory, scope)))
        # every prompt of the batch through each encoder once, then each read against its own memory
        routes = lm.route_each([t for _, _, _, t in valid], [p for _, p, _, _ in valid]) if valid else []
        for (k, prompt, n_tokens, _), r in zip(valid, routes):
            it = items[k]
            sample = it.temperature > 0
            key = (True, max(float(it.temperature), MIN_TEMPERATURE), float(it.top_p)) if sample else (False, 0.0, 1.0)
            groups.setdefault(key, []).append((k, prompt, n_tokens, r))
        eos = model.eos_token_id
        for (sample, temperature, top_p), members in groups.items():
            kwargs: dict[str, Any] = {"do_sample": sample, "memory_span": lm.memory_span}
            if sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            longest = max(max(n for _, _, n, _ in members), 1)
            batch = model.tokenize_decoder([p for _, p, _, _ in members], left_pad=True, max_length=longest)
            latents = torch.cat([r.latents for _, _, _, r in members])  # (B, C)
            steps = max(items[k].max_tokens for k, _, _, _ in members)
            new = model.generate(batch["input_ids"], batch["attention_mask"], latents, steps, **kwargs)  # (B, n)
            for b, (k, _, _, r) in enumerate(members):
                row = new[b, : items[k].max_tokens].tolist()
                stopped = eos is not None and eos in row
                if stopped:
                    row = row[: row.index(eos)]
                sim = float(r.similarities[0])
                out[k] = model.decoder_tokenizer.decode(row, skip_special_tokens=True), {
                    "in_scope": r.in_scope[0],
                    "nearest_id": r.nearest_ids[0],
                    "similarity": sim if sim == sim and abs(sim) != float("inf") else None,
                    "prompt_tokens": int(batch["attention_mask"][b].sum()) - 1,
                    "completion_tokens": len(row),
                    "finish_reason": "stop" if stopped else "length",
                }
        return out  # type: ignore[return-value]
