"""Reconstruction and perplexity: held-out blocks decoded from their own encoding, through a memory holding their
episode read with a query that is not the block (its first half of words), and with z = 0; WikiText perplexity with
z = 0 and with the untouched decoder."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from larimar.data import iter_episodes, iter_text_blocks, read_wikitext
from larimar.eval.editors import teacher_forced


@torch.inference_mode()
def _block_stats(model: Any, texts: list[str], latent: Tensor | None) -> tuple[float, int, int]:
    """Summed NLL, token count and correct argmax count of texts decoded after the start token."""
    tf = teacher_forced(lambda ids, mask: model.decode_logits(ids, mask, latent), model.decoder_tokenizer,
                        model.start_token_id, model.pad_token_id, [""] * len(texts), texts, model.device)
    counts = [len(t) for t in tf.target]
    nll = float(sum(float(x) * n for x, n in zip(tf.nll, counts)))
    correct = sum(int(a == b) for p, t in zip(tf.predicted, tf.target) for a, b in zip(p, t))
    return nll, sum(counts), correct


@torch.inference_mode()
def wikitext_perplexity(logits_fn: Callable[[Tensor, Tensor], Tensor], token_ids: list[int], start_token_id: int,
                        window: int = 256, device: torch.device | str = "cpu", batch_size: int = 8) -> float:
    """Perplexity over consecutive windows: each window is [start] + ``window - 1`` tokens, all of them scored.

    Args:
        logits_fn: (input_ids, attention_mask) -> logits.
        token_ids: the text's tokens.
        start_token_id: the start token of every window.
        window: window length including the start token.
        device: where the tokens go.
        batch_size: windows per forward.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    step = window - 1
    chunks = [token_ids[i : i + step] for i in range(0, len(token_ids), step)]
    chunks = [c for c in chunks if c]
    total, count = 0.0, 0
    for b in range(0, len(chunks), batch_size):
        part = chunks[b : b + batch_size]
        T = 1 + max(len(c) for c in part)
        ids = torch.zeros((len(part), T), dtype=torch.long)
        mask = torch.zeros((len(part), T), dtype=torch.long)
        for i, c in enumerate(part):
            ids[i, : 1 + len(c)] = torch.tensor([start_token_id, *c])
            mask[i, : 1 + len(c)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = logits_fn(ids, mask).float()  # (b, T, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")  # (b * (T-1),)
        m = mask[:, 1:].flatten().float()
        total += float((nll * m).sum())
        count += int(m.sum())
    return math.exp(total / max(count, 1))


def query_half(text: str) -> str:
    """The read query of a block: its first half of words (at least one word)."""
    words = text.split()
    return " ".join(words[: max(1, len(words) // 2)])


def evaluate_reconstruction(
    model: Any,
    texts: Iterable[str],
    n_blocks: int,
    episode_size: int = 16,
    block_tokens: int | None = None,
    wikitext_path: str | Path | None = None,
    wikitext_tokens: int = 20000,
    wikitext_window: int = 256,
    base_decoder: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """NLL per token and teacher-forced accuracy of held-out whole blocks decoded from:

        ae          the block's own encoding, z = e(block) (the autoencoder);
        memory      a memory holding the block's episode (one batch write of ``episode_size`` blocks), read with
                    the block's first half of words (`query_half`): z = read(M, e(first half));
        query       the first half's own encoding, z = e(first half), without memory (what the query alone gives);
        memory_self the memory read with the block itself (z = read(M, e(block)); an identity read when the memory
                    holds the block exactly, kept as a labelled extra);
        no_memory   z = 0;

    and WikiText perplexity with z = 0 and with the untouched decoder.

    Args:
        model: the `LarimarModel` (eval mode).
        texts: paragraphs (e.g. `larimar.data.iter_wikipedia_texts`).
        n_blocks: blocks to evaluate (rounded down to whole episodes, at least one episode).
        episode_size: blocks written to one memory.
        block_tokens: block length in decoder tokens (default: the model's ``max_decoder_length``).
        wikitext_path: ``wiki.valid.tokens`` (None: no perplexity).
        wikitext_tokens: the first this many decoder tokens of the file are scored.
        wikitext_window: window length (tokens, start token included).
        base_decoder: (hf_model, tokenizer) of the untouched decoder for ``wikitext_ppl_base`` (None: skipped).
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    block_tokens = block_tokens or model.config.max_decoder_length
    n_episodes = max(1, n_blocks // episode_size)
    blocks = iter_text_blocks(texts, model.decoder_tokenizer, block_tokens=block_tokens)
    sums = {k: [0.0, 0, 0] for k in ("ae", "memory", "query", "memory_self", "no_memory")}
    n_done = 0
    episodes = itertools.islice(iter_episodes(blocks, episode_size), n_episodes)
    with torch.inference_mode():
        for episode in tqdm(episodes, total=n_episodes, disable=not progress, desc="reconstruct", unit="episode"):
            texts_e = [b.text for b in episode]
            Z = model.encode_texts(texts_e)  # (E, C)
            Zq = model.encode_texts([query_half(t) for t in texts_e])  # (E, C): the read queries
            M = model.write(Z[None])  # (1, K, C)
            z_read = model.read(M, Zq[None])[0][0]  # (E, C)
            z_self = model.read(M, Z[None])[0][0]  # (E, C)
            for key, latent in (("ae", Z), ("memory", z_read), ("query", Zq), ("memory_self", z_self),
                                ("no_memory", None)):
                nll, cnt, cor = _block_stats(model, texts_e, latent)
                sums[key][0] += nll
                sums[key][1] += cnt
                sums[key][2] += cor
            n_done += len(texts_e)
    if n_done == 0:
        raise ValueError(f"no complete episode of {episode_size} blocks in the data")
    out: dict[str, Any] = {"n_blocks": n_done, "episode_size": episode_size, "block_tokens": block_tokens,
                           "memory_query": "the block's first half of words"}
    for key, (nll, cnt, cor) in sums.items():
        out[f"nll_{key}"] = nll / max(cnt, 1)
        out[f"acc_{key}"] = 100.0 * cor / max(cnt, 1)
    out["wikitext_ppl"] = out["wikitext_ppl_base"] = None
    if wikitext_path is not None:
        text = read_wikitext(wikitext_path)[: wikitext_tokens * 12]  # enough characters for the tokens asked
        ids = model.decoder_tokenizer(text, add_special_tokens=False)["input_ids"][:wikitext_tokens]
        out["wikitext_tokens"] = len(ids)
        out["wikitext_ppl"] = wikitext_perplexity(
            lambda i, m: model.decode_logits(i, m, None), ids, model.start_token_id, wikitext_window, model.device)
        if base_decoder is not None:
            hf = base_decoder[0]
            dev = next(hf.parameters()).device
            out["wikitext_ppl_base"] = wikitext_perplexity(
                lambda i, m: hf(input_ids=i, attention_mask=m).logits, ids, model.start_token_id, wikitext_window,
                dev)
    return out
