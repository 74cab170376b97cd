"""The training data pipeline: the episode stream, prefix queries and name swaps, collation into tensors, the
micro-batches of a step (in this process, a prefetch thread, or DataLoader worker processes)."""

from __future__ import annotations

import itertools
import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from larimar.data import (
    iter_episodes,
    iter_sentences,
    iter_text_blocks,
    iter_wikipedia_texts,
)
from larimar.model import LarimarModel, encoder_tokens
from larimar.training.config import DataConfig, TrainConfig

T = TypeVar("T")


# -- episodes and items ---------------------------------------------------------------------------------------


def _shuffled(items: Iterator[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle with a fixed-size buffer."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        i = rng.randrange(buffer)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def episode_stream(cfg: DataConfig, decoder_tokenizer: Any, seed: int, shard: int = 0,
                   shards: int = 1) -> Iterator[list[Any]]:
    """Endless stream of episodes (lists of `TextBlock`), reshuffled each pass over the file; with ``shards`` > 1,
    of the paragraphs i with i mod shards == shard only."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in [0, {shards}), got {shard}")
    epoch = 0
    while True:
        rng = random.Random(seed * 1000 + epoch if shards == 1 else f"{seed}:{epoch}:{shard}/{shards}")
        if not cfg.train_path:
            raise ValueError("data.train_path is not set: name the training JSONL in the config")
        texts = iter_wikipedia_texts(cfg.train_path)
        if shards > 1:
            texts = itertools.islice(texts, shard, None, shards)
        if cfg.split_sentences:
            texts = iter_sentences(texts)
        blocks = iter_text_blocks(texts, decoder_tokenizer, cfg.block_tokens, cfg.min_tokens)
        n = 0
        for episode in iter_episodes(_shuffled(blocks, cfg.shuffle_buffer, rng), cfg.episode_size):
            n += 1
            yield episode
        if n == 0:
            raise ValueError(f"{cfg.train_path} yields no episode of {cfg.episode_size} blocks")
        epoch += 1


def prefix_queries(texts: list[str], prob: float, frac: list[float], rng: random.Random) -> list[str]:
    """Per text, with probability `prob`, a prefix of its words (a fraction in `frac`, at least one word)."""
    out = []
    for t in texts:
        words = t.split()
        if rng.random() < prob and len(words) > 1:
            keep = max(1, min(len(words) - 1, round(rng.uniform(*frac) * len(words))))
            t = " ".join(words[:keep])
        out.append(t)
    return out


_TRAILING = ",.;:!?)]\"'"


def _name_spans(words: list[str]) -> list[tuple[int, int]]:
    """(start, end) word spans of capitalised names: runs of words starting with a capital letter, not the
    text's first word, a run ending at a word that ends with punctuation."""
    spans, i = [], 1
    while i < len(words):
        if words[i][:1].isupper():
            j = i
            while j + 1 < len(words) and words[j + 1][:1].isupper() and words[j][-1:] not in _TRAILING:
                j += 1
            spans.append((i, j + 1))
            i = j + 1
        else:
            i += 1
    return spans


def swap_names(texts: list[str], prob: float, rng: random.Random, min_prompt_words: int = 3) -> list[tuple[str, str] | None]:
    """Edit-shaped counterfactual items made from plain text.

    Per text, with probability ``prob``: pick a capitalised name that starts after at least ``min_prompt_words``
    words, replace it by a different name found in another text of the batch, and cut the text after it.
    The result is shaped like an edit, "prompt + new object", with an object the decoder cannot guess from the
    prompt (often against what the decoder believes), so only the latent can supply it.

    Returns:
        per text, ``(item, prompt)`` (``item = prompt + " " + name``) or None (not drawn, or no usable name).
    """
    split = [t.split() for t in texts]
    spans = [_name_spans(words) for words in split]
    names = [[" ".join(w.strip(_TRAILING) for w in words[a:b]) for a, b in sp] for words, sp in zip(split, spans)]
    out: list[tuple[str, str] | None] = []
    for i, words in enumerate(split):
        usable = [k for k, (a, _) in enumerate(spans[i]) if a >= min_prompt_words]
        if rng.random() >= prob or not usable:
            out.append(None)
            continue
        k = usable[rng.randrange(len(usable))]
        a, old = spans[i][k][0], names[i][k]
        pool = [n for j, ns in enumerate(names) if j != i for n in ns if n and n != old]
        if not pool:
            out.append(None)
            continue
        prompt = " ".join(words[:a])
        out.append((f"{prompt} {pool[rng.randrange(len(pool))]}", prompt))
    return out


@dataclass
class BatchSpec:
    """What `collate` needs of a model, and nothing on a device: picklable, so a worker process can collate."""

    decoder_tokenizer: Any
    encoder_tokenizer: Any
    encoder_max_length: int
    max_decoder_length: int
    pad_token_id: int

    @classmethod
    def of(cls, model: LarimarModel) -> "BatchSpec":
        return cls(model.decoder_tokenizer, model.encoder.tokenizer, model.encoder.max_length,
                   model.config.max_decoder_length, model.pad_token_id)

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        """Encoder tokens as `LatentEncoder.tokenize`, on the CPU: input_ids, attention_mask (N, Te)."""
        return encoder_tokens(self.encoder_tokenizer, texts, self.encoder_max_length)


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every tensor of a collated batch on ``device``."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def collate(
    episodes: list[list[Any]], model: LarimarModel, cfg: DataConfig | None = None, rng: random.Random | None = None
) -> dict[str, Tensor]:
    """Episodes of E blocks -> encoder tokens (B, E, Te), right-padded decoder tokens (B, E, Td) and, with prefix
    queries or name swaps (``cfg``), encoder tokens of the read queries (B, E, Tq) and the decoder tokens the
    loss scores (B, E, Td); on the model's device (`collate_cpu` does the work)."""
    return to_device(collate_cpu(episodes, BatchSpec.of(model), cfg, rng), model.device)


def collate_cpu(
    episodes: list[list[Any]], spec: BatchSpec, cfg: DataConfig | None = None, rng: random.Random | None = None
) -> dict[str, Tensor]:
    """`collate` on the CPU, from a `BatchSpec` (what a worker process runs)."""
    B, E = len(episodes), len(episodes[0])
    tok = spec.decoder_tokenizer
    max_len = spec.max_decoder_length
    texts = [b.text for ep in episodes for b in ep]
    rows = [list(b.ids)[:max_len] for ep in episodes for b in ep]
    swaps: list[tuple[str, str] | None] = [None] * len(texts)
    if cfg is not None and cfg.swap_prob > 0:
        swaps = swap_names(texts, cfg.swap_prob, rng)
        swapped = [i for i, sw in enumerate(swaps) if sw]
        if swapped:
            new_ids = tok([swaps[i][0] for i in swapped], add_special_tokens=False)["input_ids"]
            for i, ids in zip(swapped, new_ids):
                texts[i], rows[i] = swaps[i][0], list(ids)[:max_len]
    enc = spec.encode(texts)  # (B*E, Te)
    extra = {}
    if cfg is not None and (cfg.prefix_query_prob > 0 or any(swaps)):
        queries = prefix_queries(texts, cfg.prefix_query_prob, cfg.prefix_frac, rng)
        queries = [sw[1] if sw else q for q, sw in zip(queries, swaps)]  # a swapped item is read with its prompt
        q = spec.encode(queries)
        extra = {"query_input_ids": q["input_ids"].view(B, E, -1),
                 "query_attention_mask": q["attention_mask"].view(B, E, -1)}
        if cfg.prefix_loss == "all":  # only swapped items score their continuation (the new name) alone
            queries = [q if sw else t for q, t, sw in zip(queries, texts, swaps)]
        if cfg.prefix_loss == "continuation" or any(swaps):
            target = _continuation_mask(rows, texts, queries, tok)  # (B*E, Td)
            extra["dec_target_mask"] = target.view(B, E, -1)
    T = max(len(r) for r in rows)
    ids = torch.full((B * E, T), spec.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B * E, T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {
        "enc_input_ids": enc["input_ids"].view(B, E, -1),
        "enc_attention_mask": enc["attention_mask"].view(B, E, -1),
        "dec_input_ids": ids.view(B, E, T),
        "dec_attention_mask": mask.view(B, E, T),
        **extra,
    }


def _continuation_mask(rows: list[list[int]], texts: list[str], queries: list[str], tokenizer: Any) -> Tensor:
    """(N, T) 1 at the decoder tokens of each row after its prefix query (every token when the query is the
    whole text); a row keeps at least its last token. T is the longest row."""
    T = max(len(r) for r in rows)
    out = torch.zeros((len(rows), T), dtype=torch.long)
    prefixes = [q for t, q in zip(texts, queries) if q != t]
    n_prefix = iter(len(ids) for ids in tokenizer(prefixes, add_special_tokens=False)["input_ids"]) if prefixes else None
    for i, (r, t, q) in enumerate(zip(rows, texts, queries)):
        start = 0 if q == t else min(next(n_prefix), len(r) - 1)  # words split at spaces: the prefix's tokens lead
        out[i, start : len(r)] = 1
    return out


# -- micro-batches --------------------------------------------------------------------------------------------


def _micro_batches(cfg: TrainConfig, spec: BatchSpec, step: int, episodes_seen: int, per_rank: int, world: int,
                   rank: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """(episodes read from the stream, this rank's collated micro-batch on the CPU), grad_accum per step from
    ``step`` on, the stream resumed after ``episodes_seen`` episodes."""
    stream = episode_stream(cfg.data, spec.decoder_tokenizer, cfg.seed)
    for _ in range(episodes_seen):  # resume: skip what was consumed
        next(stream)
    while True:
        query_rng = random.Random(f"{cfg.seed}:{step}")  # this step's prefix-query draws, the same after a resume
        for _ in range(cfg.optim.grad_accum):
            global_eps = [next(stream) for _ in range(per_rank * world)]  # every rank reads the same stream
            yield len(global_eps), collate_cpu(global_eps[rank * per_rank : (rank + 1) * per_rank], spec, cfg.data,
                                               query_rng)
        step += 1


def _sharded_micro_batches(cfg: TrainConfig, spec: BatchSpec, step: int, per_rank: int, world: int, rank: int,
                           worker: int, workers: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Worker ``worker`` of ``workers``: micro-batches m = M0 + worker, M0 + worker + workers, ... (M0 = step x
    grad_accum, those already consumed), all from shard m mod workers of the stream, which has given
    ceil((M0 - shard) / workers) micro-batches before M0."""
    ga, n = cfg.optim.grad_accum, per_rank * world
    first = step * ga + worker
    shard = first % workers
    stream = episode_stream(cfg.data, spec.decoder_tokenizer, cfg.seed, shard, workers)
    for _ in range(max(0, -(-(step * ga - shard) // workers)) * n):  # resume: skip this shard's consumed episodes
        next(stream)
    for m in itertools.count(first, workers):
        query_rng = random.Random(f"{cfg.seed}:{m // ga}:{m % ga}")  # this micro-batch's draws
        global_eps = [next(stream) for _ in range(n)]  # every rank reads the same stream
        yield n, collate_cpu(global_eps[rank * per_rank : (rank + 1) * per_rank], spec, cfg.data, query_rng)


class _MicroBatches(torch.utils.data.IterableDataset):
    """The micro-batches of one DataLoader worker (it holds tokenizers, not the model)."""

    def __init__(self, cfg: TrainConfig, spec: BatchSpec, step: int, episodes_seen: int, per_rank: int, world: int,
                 rank: int) -> None:
        super().__init__()
        self.args = (cfg, spec, step, episodes_seen, per_rank, world, rank)

    def __iter__(self) -> Iterator[tuple[int, dict[str, Tensor]]]:
        cfg, spec, step, episodes_seen, per_rank, world, rank = self.args
        info = torch.utils.data.get_worker_info()
        if info is None or info.num_workers == 1:
            return _micro_batches(*self.args)
        return _sharded_micro_batches(cfg, spec, step, per_rank, world, rank, info.id, info.num_workers)


def micro_batches(cfg: TrainConfig, spec: BatchSpec, step: int, episodes_seen: int, per_rank: int, world: int,
                  rank: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """The training micro-batches (CPU tensors), made in this process (``data.workers`` 0; ``data.prefetch``
    ahead in a thread when > 0) or in ``data.workers`` worker processes (see `DataConfig`). Close the returned
    generator to stop a thread or the workers."""
    args = (cfg, spec, step, episodes_seen, per_rank, world, rank)
    if cfg.data.workers == 0:
        return prefetch(_micro_batches(*args), cfg.data.prefetch)
    loader = torch.utils.data.DataLoader(_MicroBatches(*args), batch_size=None, num_workers=cfg.data.workers,
                                         prefetch_factor=max(2, cfg.data.prefetch))

    def run() -> Iterator[tuple[int, dict[str, Tensor]]]:
        it = iter(loader)  # round robin over the workers: micro-batch m comes from worker (m - M0) mod workers
        try:
            yield from it
        finally:
            del it  # the last reference: the workers stop now

    return run()


def prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Iterates ``items`` in a background thread, ``depth`` ahead (``depth`` 0: ``items`` itself).

    An exception in the thread is raised where the item would have been; closing the returned generator stops
    the thread.
    """
    if depth <= 0:
        return items
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put(("item", x), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer
            q.put(("error", e))
        else:
            q.put(("end", None))

    thread = threading.Thread(target=work, name="larimar-prefetch", daemon=True)
    thread.start()

    def consume() -> Iterator[T]:
        try:
            while True:
                kind, x = q.get()
                if kind == "error":
                    raise x
                if kind == "end":
                    return
                yield x
        finally:
            stop.set()

    return consume()
