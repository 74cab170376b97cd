"""Information-leakage prevention (paper section 5.4): "prompt + unknown" written for facts to hide; a rephrasing
attack (rewrite + paraphrase prompts, 4 at most, x 5 seeded samples); success = the hidden answer in any generation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from larimar.conditioning import next_token
from larimar.eval.editors import (
    HFBaselineEditor,
    RagEditor,
    SequentialHFEditor,
)
from larimar.eval.forgetting import UNKNOWN, unknown_request
from larimar.eval.metrics import contains_answer, mean_of
from larimar.facts import EditRequest

logger = logging.getLogger(__name__)

def attack_prompts(req: EditRequest, n_prompts: int = 4) -> list[str]:
    """The rephrasing attack's prompts: the rewrite prompt, then the record's paraphrases (``n_prompts`` at most)."""
    return list(dict.fromkeys([req.full_prompt, *req.paraphrase_prompts]))[:n_prompts]


@torch.inference_mode()
def sample_hf(model: Any, tok: Any, start_token_id: int | None, prompt: str, n_samples: int, max_new_tokens: int,
              temperature: float, top_p: float, generator: torch.Generator) -> list[str]:
    """``n_samples`` sampled continuations of one prompt by a plain HF causal LM, with the KV cache."""
    dev = next(model.parameters()).device
    ids = ([start_token_id] if start_token_id is not None else []) + tok(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids] * n_samples, device=dev)  # (S, T)
    out = model(input_ids=x, use_cache=True)
    new = []
    for k in range(max_new_tokens):
        nxt = next_token(out.logits[:, -1].float(), True, temperature, top_p, generator)  # (S,)
        new.append(nxt)
        if k + 1 < max_new_tokens:
            out = model(input_ids=nxt[:, None], cache=out.cache, use_cache=True)  # (S, 1) through the KV cache
    rows = torch.stack(new, 1).tolist() if new else [[] for _ in range(n_samples)]  # (S, n)
    eos = getattr(tok, "eos_token_id", None)
    return [tok.decode(r[: r.index(eos)] if eos in r else r, skip_special_tokens=True) for r in rows]


def _larimar_samples(lm: Any, prompts: list[str], use_memory: bool, n_samples: int, max_new_tokens: int,
                     temperature: float, top_p: float, generator: torch.Generator) -> tuple[list[list[str]], list]:
    with torch.inference_mode():
        if use_memory:
            r = lm.route(prompts)
            latents, scope = r.latents, r.in_scope
        else:
            latents, scope = torch.zeros(len(prompts), lm.model.memory.config.code_size), [False] * len(prompts)
        rep = [p for p in prompts for _ in range(n_samples)]
        lat = latents.repeat_interleave(n_samples, 0).to(lm.model.device)  # (P * S, C)
        texts = lm.model.generate_text(rep, lat, max_new_tokens=max_new_tokens, do_sample=True,
                                       temperature=temperature, top_p=top_p, generator=generator)
    return [texts[i * n_samples : (i + 1) * n_samples] for i in range(len(prompts))], scope


def _rag_samples(rag: RagEditor, prompts: list[str], n_samples: int, max_new_tokens: int, temperature: float,
                 top_p: float, generator: torch.Generator) -> tuple[list[list[str]], list]:
    with torch.inference_mode():
        r = rag.route(prompts)
        rep = [p for p in r.prompts for _ in range(n_samples)]
        texts = rag.model.generate_text(rep, None, max_new_tokens, truncate=False, do_sample=True,
                                        temperature=temperature, top_p=top_p, generator=generator)
    return [texts[i * n_samples : (i + 1) * n_samples] for i in range(len(prompts))], list(r.in_scope)


def evaluate_leakage(
    lm: Any,
    records: Sequence[EditRequest],
    n: int,
    baselines: Sequence[HFBaselineEditor] = (),
    n_prompts: int = 4,
    n_samples: int = 5,
    max_new_tokens: int = 10,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    rag: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Hides the true facts of N records and attacks them with rephrasings.

    Larimar writes "prompt(subject) unknown" for each of the N records (one batch); a baseline edits each fact's
    target to "unknown" (ROME one request after another, the others as one batch: each method's usual mode). Per
    record, ``n_prompts`` attack prompts (`attack_prompts`) x ``n_samples`` sampled generations; the attack
    succeeds when target_true appears as whole words in any of them (`contains_answer`). ``attack_success_none``
    is the unedited model (z = 0). With ``rag``, `RagEditor` holds the same "prompt(subject) unknown" sentences
    (in scope, the nearest one goes before the attack prompt): ``attack_success_rag``, ``scope_rate_rag``. Sampling
    uses a generator seeded with ``seed`` on the model's device.

    Returns:
        (summary, per-record rows); the summary has ``attack_success``, ``attack_success_none``, ``unknown_rate``
        (share of Larimar's generations containing "unknown"), ``scope_rate`` and ``attack_success_<baseline>``.
    """
    from tqdm.auto import tqdm

    records = [r for r in records if r.target_true][:n]
    if not records:
        raise ValueError("no records with target_true to hide")
    lm.reset()
    lm.edit([unknown_request(r) for r in records], ids=[f"h{i}" for i in range(len(records))])
    systems: list[tuple[str, Callable[[list[str], torch.Generator], tuple[list[list[str]], list]]]] = [
        ("larimar", lambda ps, g: _larimar_samples(lm, ps, True, n_samples, max_new_tokens, temperature, top_p, g)),
        ("none", lambda ps, g: _larimar_samples(lm, ps, False, n_samples, max_new_tokens, temperature, top_p, g)),
    ]
    rag_ed = None
    if rag:
        rag_ed = RagEditor(lm)
        rag_ed.edit([unknown_request(r) for r in records], ids=[f"h{i}" for i in range(len(records))])
        systems.append(("rag", lambda ps, g: _rag_samples(rag_ed, ps, n_samples, max_new_tokens, temperature,
                                                          top_p, g)))
    for b in baselines:
        def run_b(ps: list[str], g: torch.Generator, b: HFBaselineEditor = b) -> tuple[list[list[str]], list]:
            return [sample_hf(b.model, b.tok, b.start_token_id, p, n_samples, max_new_tokens, temperature, top_p, g)
                    for p in b._prompts(ps)], [None] * len(ps)
        systems.append((b.name, run_b))
    rows: list[dict[str, Any]] = [{"case_id": r.case_id, "hidden": r.target_true, "fact": f"{r.full_prompt} "
                                   f"{r.target_true}"} for r in records]
    summary: dict[str, Any] = {"n": len(records), "n_prompts": n_prompts, "n_samples": n_samples,
                               "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    try:
        for name, fn in systems:
            b = next((x for x in baselines if x.name == name), None)
            if b is not None:
                b.reset()
                hide = [unknown_request(r) for r in records]
                if b.method == "rome":  # ROME takes one fact at a time
                    SequentialHFEditor.edit(b, hide)  # type: ignore[arg-type]
                else:
                    b.edit(hide)
            dev = lm.model.device if b is None else b.device
            g = torch.Generator(device=dev).manual_seed(seed)
            hits, unknown, scopes = [], [], []
            for k, req in enumerate(tqdm(records, desc=f"leakage {name}", disable=not progress, unit="fact")):
                gens, scope = fn(attack_prompts(req, n_prompts), g)
                flat = [t for ts in gens for t in ts]
                hit = any(contains_answer(t, req.target_true or "") for t in flat)
                hits.append(hit)
                unknown.append(mean_of(contains_answer(t, UNKNOWN) for t in flat))
                scopes += scope
                rows[k][f"success_{name}"] = hit
                if name == "larimar":
                    rows[k]["generations"] = gens
                    rows[k]["in_scope"] = scope
            key = {"larimar": "attack_success", "none": "attack_success_none"}.get(name, f"attack_success_{name}")
            summary[key] = mean_of(hits)
            if name == "larimar":
                summary["unknown_rate"] = mean_of(unknown)
                summary["scope_rate"] = mean_of(scopes)
            if name == "rag":
                summary["unknown_rate_rag"] = mean_of(unknown)
                summary["scope_rate_rag"] = mean_of(scopes)
            if b is not None:
                b.reset()
    finally:
        lm.reset()
        if rag_ed is not None:
            rag_ed.reset()
    return summary, rows
