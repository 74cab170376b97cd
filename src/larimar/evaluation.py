"""Knowledge-editing evaluation (CounterFact, ZsRE) and reconstruction / perplexity evaluation.

Every editing method sits behind one small contract, `Editor` (``reset``, ``edit``, ``score``, ``generate``,
``predict``), so the harness never branches on the method:

    LarimarEditor       the `larimar.editing.Larimar` memory editor (scope detector, memory read-out)
    NoEditEditor        the unedited model: z = 0 everywhere ("--method none")
    HFBaselineEditor    a weight / prompt editor of `larimar.baselines` (ROME, MEMIT, GRACE, FT-L, IKE) on a plain
                        HF decoder; its edit is undone after every record

Protocols (tag every number with its protocol; they are not comparable):

``counterfact_prob`` (ROME / the Larimar paper, Table 2). Per record: reset, write the fact
    ``prompt.format(subject) + " " + target_new``, then for the rewrite prompt, each paraphrase and each
    neighbourhood prompt compare the mean per-token NLL of " target_new" and " target_true" (the neighbourhood's
    own answer when the record has one) after the prompt. Per record, the share of prompts of each kind that
    succeed, then the mean over records:
        ES = % rewrite prompts with NLL(new) < NLL(true)      EM = mean of p(new) - p(true), in %
        PS = the same on paraphrases                          PM = the same on paraphrases
        NS = % neighbourhood prompts with NLL(true) < NLL(new) NM = mean of p(true) - p(new)
        Score = harmonic mean of ES, PS, NS;  p = exp(-mean NLL per token).
``token_acc`` (EasyEdit). Teacher-forced token accuracy: after the rewrite prompt, the share of target_new's
    tokens that are the argmax prediction given the previous gold tokens (reliability); the same after each
    paraphrase, averaged (generalization); after each locality prompt + its answer, the share of the edited
    model's argmax tokens that equal the unedited model's argmax tokens at the same positions (locality).
    Reported as reliability / generalization / locality (also under es / ps / ns, with Score their harmonic
    mean) in %. ZsRE also reports exact_match: greedy generation after the rewrite prompt starts with
    target_new (case-insensitive, whitespace stripped).

Outputs of `run_edit_eval` in its out folder: ``cases.jsonl`` (one line per record per method), ``summary.json``
(a list, one object per method) and ``summary.md``.

Command line::

    larimar eval counterfact --data ../shared/data/counterfact_rome/counterfact_rome_929.json --limit 200 \\
        --methods larimar,none --out runs/cf
    larimar eval zsre --data ../shared/data/zsre/zsre_mend_eval_800.json --protocol token_acc --out runs/zsre
    larimar eval reconstruct --data ../shared/data/wikipedia_en/enwiki_2018_validation.jsonl --limit 256 \\
        --out runs/rec
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from larimar.data import EditRequest
from larimar.memory import READ_MODES

logger = logging.getLogger(__name__)

# the YAML hyper-parameters of the baselines, in the repository beside src/ (absent from a wheel install)
BASELINE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "baselines"

PROTOCOLS = ("counterfact_prob", "token_acc")
KINDS = ("rewrite", "paraphrase", "neighborhood")
SUMMARY_KEYS = ("method", "protocol", "n_cases", "es", "ps", "ns", "score", "em", "pm", "nm",
                "edit_ms_median", "query_ms_median", "plain_query_ms_median")


# ----------------------------------------------------------------------------------------------------------
# Teacher-forced scoring shared by every editor (one tokenization rule for all methods)


@dataclass
class TeacherForced:
    """Teacher-forced results per row.

    Attributes:
        nll: (B,) mean NLL per continuation token.
        predicted: per row, the argmax token ids at the continuation's positions.
        target: per row, the continuation's token ids.
    """

    nll: Tensor
    predicted: list[list[int]]
    target: list[list[int]]


def teacher_forced(
    logits_fn: Callable[[Tensor, Tensor], Tensor],
    tokenizer: Any,
    start_token_id: int | None,
    pad_token_id: int,
    prompts: Sequence[str],
    continuations: Sequence[str],
    device: torch.device | str = "cpu",
    prefix_logits_fn: Callable[[Tensor, Tensor, int], Tensor] | None = None,
) -> TeacherForced:
    """Scores continuations after prompts: [start] + tokens(prompt) + tokens(continuation), right padded.

    Prompt and continuation are tokenized separately (no special tokens), as `LarimarModel.continuation_nll`.

    Args:
        logits_fn: (input_ids (B, T), attention_mask (B, T)) -> logits (B, T, V).
        tokenizer: the decoder's tokenizer.
        start_token_id: prepended to every row (None: nothing; the first prompt token is then not predicted).
        pad_token_id: the padding id.
        prompts: B prompts.
        continuations: B continuations (e.g. " Rome").
        device: where the tokens go.
        prefix_logits_fn: optional (input_ids, attention_mask, P) -> logits (B, T - P + 1, V) of positions
            P - 1 .. T - 1, where the first P tokens are the same in every row (`shared_prefix_logits`). Used
            instead of ``logits_fn`` when the rows share at least 32 leading tokens (IKE's long prefix).

    Raises:
        ValueError: lengths differ or a continuation tokenizes to nothing.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"got {len(prompts)} prompts and {len(continuations)} continuations")
    rows, spans = [], []
    for p, c in zip(prompts, continuations):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"] if p else []
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        if not c_ids:
            raise ValueError(f"continuation {c!r} tokenizes to nothing")
        head = ([start_token_id] if start_token_id is not None else []) + list(p_ids)
        if not head:
            raise ValueError("an empty prompt needs a start token")
        rows.append(head + list(c_ids))
        spans.append((len(head), len(head) + len(c_ids)))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    ids, mask = ids.to(device), mask.to(device)
    first = min(s for s, _ in spans) - 1  # the first position whose prediction is scored
    P = shared_prefix_len(ids, mask, limit=first + 1) if prefix_logits_fn is not None and len(rows) > 1 else 0
    if P >= 32:
        logits, off = prefix_logits_fn(ids, mask, P).float(), P - 1  # (B, T - P + 1, V) from position P - 1
    else:
        logits, off = logits_fn(ids, mask).float(), 0  # (B, T, V)
    logp = F.log_softmax(logits[:, first - off : -1], -1)  # (B, T-1-first, V): position t predicts token t + 1
    tok_lp = logp.gather(-1, ids[:, first + 1 :, None])[..., 0]  # (B, T-1-first)
    arg = logp.argmax(-1)  # (B, T-1-first)
    nll, pred, tgt = [], [], []
    for i, (s, e) in enumerate(spans):
        nll.append(-tok_lp[i, s - 1 - first : e - 1 - first].mean())
        pred.append(arg[i, s - 1 - first : e - 1 - first].tolist())
        tgt.append(ids[i, s:e].tolist())
    return TeacherForced(torch.stack(nll).cpu(), pred, tgt)


def shared_prefix_len(ids: Tensor, mask: Tensor, limit: int) -> int:
    """Number of leading positions (at most ``limit``) where every row of ids (B, T) has the same, unpadded token."""
    same = ((ids == ids[:1]) & (mask == 1)).all(0)[:limit]  # (min(T, limit),)
    return int(same.long().cumprod(0).sum())


def shared_prefix_logits(model: Any, ids: Tensor, mask: Tensor, P: int) -> Tensor:
    """Logits (B, T - P + 1, V) of positions P - 1 .. T - 1 for rows ids (B, T) whose first P tokens are equal.

    The shared prefix runs once; its KV cache is repeated over the batch for the rest, so a long common context
    (IKE's demonstrations) costs one forward pass instead of B. Same logits as a full forward, up to rounding.
    """
    B = ids.shape[0]
    head = model(input_ids=ids[:1, :P], use_cache=True)
    cache = head.cache
    cache.batch_repeat_interleave(B)
    rest = model(input_ids=ids[:, P:], attention_mask=mask, cache=cache, use_cache=True).logits
    return torch.cat([head.logits[:, -1:].expand(B, -1, -1), rest], 1)


# ----------------------------------------------------------------------------------------------------------
# The editor contract and its implementations


@runtime_checkable
class Editor(Protocol):
    """What the harness needs from an editing method.

    Attributes:
        name: the method's name in the outputs.
        last_in_scope: the scope decision per row of the last ``score`` / ``predict`` call (None when the
            method has no scope detector).
    """

    name: str
    last_in_scope: list[bool] | None

    def reset(self) -> None:
        """Back to the unedited model."""
        ...

    def edit(self, requests: list[EditRequest]) -> None:
        """Applies the edits (accumulating over calls until ``reset``)."""
        ...

    def score(self, prompts: list[str], continuations: list[str]) -> Tensor:
        """Mean per-token NLL (B,) of continuations after prompts, with the edits applied."""
        ...

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations."""
        ...

    def predict(self, prompts: list[str], continuations: list[str]) -> TeacherForced:
        """Teacher-forced NLL and argmax tokens at the continuations' positions."""
        ...


class LarimarEditor:
    """`Larimar` (memory + scope detector) behind the `Editor` contract.

    Args:
        lm: the editor; its memory is reset by ``reset``.
        name: the method name in the outputs.
    """

    def __init__(self, lm: Any, name: str = "larimar", plain_cache: dict | None = None) -> None:
        self.lm = lm
        self.name = name
        self.plain_cache = plain_cache  # shared z = 0 scores (see `editing.cached_plain_nll`)
        self.last_in_scope: list[bool] | None = None

    @property
    def device(self) -> torch.device:
        return self.lm.model.device

    def reset(self) -> None:
        self.lm.reset()

    def edit(self, requests: list[EditRequest]) -> None:
        self.lm.edit(list(requests))

    def score(self, prompts: list[str], continuations: list[str]) -> Tensor:
        nll, self.last_in_scope = self.lm.score_batch(prompts, continuations, plain_cache=self.plain_cache)
        return nll

    def score_plain(self, prompts: list[str], continuations: list[str]) -> Tensor:
        """The same scoring with the plain decoder (z = 0; no encode, scope or read): the latency reference."""
        with torch.inference_mode():
            return self.lm.model.continuation_nll(list(prompts), list(continuations), None).float().cpu()

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return list(self.lm.generate(list(prompts), max_new_tokens=max_new_tokens))

    @torch.inference_mode()
    def predict(self, prompts: list[str], continuations: list[str]) -> TeacherForced:
        model = self.lm.model
        r = self.lm.route(list(prompts))
        self.last_in_scope = r.in_scope
        return teacher_forced(
            lambda ids, mask: model.decode_logits(ids, mask, r.latents.to(model.device)),
            model.decoder_tokenizer, model.start_token_id, model.pad_token_id, prompts, continuations, model.device,
        )


class NoEditEditor:
    """The unedited model: `LarimarModel` decoding with z = 0 everywhere (edits are ignored)."""

    def __init__(self, model: Any, name: str = "none", plain_cache: dict | None = None) -> None:
        self.model = model
        self.name = name
        self.plain_cache = plain_cache
        self.last_in_scope: list[bool] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset(self) -> None:
        pass

    def edit(self, requests: list[EditRequest]) -> None:
        pass

    @torch.inference_mode()
    def score(self, prompts: list[str], continuations: list[str]) -> Tensor:
        if self.plain_cache is not None:
            from larimar.editing import cached_plain_nll

            return cached_plain_nll(self.model, list(prompts), list(continuations), self.plain_cache)
        return self.model.continuation_nll(list(prompts), list(continuations), None).float().cpu()

    @torch.inference_mode()
    def score_plain(self, prompts: list[str], continuations: list[str]) -> Tensor:
        return self.model.continuation_nll(list(prompts), list(continuations), None).float().cpu()

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return self.model.generate_text(list(prompts), None, max_new_tokens=max_new_tokens)

    @torch.inference_mode()
    def predict(self, prompts: list[str], continuations: list[str]) -> TeacherForced:
        m = self.model
        return teacher_forced(lambda ids, mask: m.decode_logits(ids, mask, None), m.decoder_tokenizer,
                              m.start_token_id, m.pad_token_id, prompts, continuations, m.device)


class HFBaselineEditor:
    """A `larimar.baselines` method (``apply_<method>(model, tok, requests, hparams) -> (model, restore)``).

    Scores with the plain HF decoder after the edit (``restore.transform_prompt`` applied to every prompt, for
    IKE); ``reset`` restores the weights exactly.

    Args:
        method: a key of `larimar.baselines.METHODS`.
        model: the HF causal LM (edited in place, restored by ``reset``).
        tokenizer: its tokenizer.
        hparams: the method's hyper-parameters (dataclass, YAML path or None for the defaults).
        start_token_id: prepended to scored / generated text (use the Larimar model's, for comparable numbers).
        name: the method name in the outputs (default: ``method``).
    """

    def __init__(self, method: str, model: Any, tokenizer: Any, hparams: Any = None,
                 start_token_id: int | None = None, name: str | None = None) -> None:
        from larimar.baselines import METHODS, load_hparams

        if method not in METHODS:
            raise KeyError(f"unknown baseline {method!r}; expected one of {sorted(METHODS)}")
        if hparams is None or isinstance(hparams, (str, Path)):
            hparams = load_hparams(method, hparams)
        self.method, self.model, self.tok, self.hparams = method, model, tokenizer, hparams
        self.name = name or method
        self.start_token_id = start_token_id
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (eos if eos is not None else 0))
        self.last_in_scope: list[bool] | None = None
        self._handles: list[Any] = []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self) -> None:
        while self._handles:  # undo in reverse order, exactly
            self._handles.pop()()

    def _in_scoring_context(self, requests: list[EditRequest]) -> list[EditRequest]:
        """Requests whose templates start with the start token that scoring prepends, so that weight editors
        compute their keys in the context they are scored in (GRACE's keys match only there). IKE builds text
        prompts and gets the requests unchanged."""
        if self.start_token_id is None or self.method == "ike":
            return requests
        start = self.tok.convert_ids_to_tokens(self.start_token_id)
        if self.tok(start, add_special_tokens=False)["input_ids"] != [self.start_token_id]:
            return requests  # the start token has no text form that tokenizes back to it
        return [dataclasses.replace(r, prompt=start + r.prompt) for r in requests]

    def edit(self, requests: list[EditRequest]) -> None:
        from larimar.baselines import METHODS

        requests = self._in_scoring_context(list(requests))
        self.model, handle = METHODS[self.method](self.model, self.tok, requests, self.hparams)
        self._handles.append(handle)
        self.model.eval()

    def _prompts(self, prompts: Sequence[str]) -> list[str]:
        if not self._handles:
            return list(prompts)
        return [self._handles[-1].transform_prompt(p) for p in prompts]

    @torch.inference_mode()
    def predict(self, prompts: list[str], continuations: list[str]) -> TeacherForced:
        return teacher_forced(
            lambda ids, mask: self.model(input_ids=ids, attention_mask=mask).logits, self.tok, self.start_token_id,
            self.pad_token_id, self._prompts(prompts), continuations, self.device,
            prefix_logits_fn=lambda ids, mask, P: shared_prefix_logits(self.model, ids, mask, P),
        )

    def score(self, prompts: list[str], continuations: list[str]) -> Tensor:
        return self.predict(prompts, continuations).nll

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        rows = []
        for p in self._prompts(prompts):
            ids = self.tok(p, add_special_tokens=False)["input_ids"]
            rows.append(([self.start_token_id] if self.start_token_id is not None else []) + list(ids))
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):  # left padded
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=self.pad_token_id,
        )[:, T:]
        return [self.tok.decode(r, skip_special_tokens=True) for r in out.tolist()]


# ----------------------------------------------------------------------------------------------------------
# Metrics


class PeakMemory:
    """Peak memory of this process while a block runs (a context manager).

    On CUDA: ``torch.cuda.max_memory_allocated`` (reset on entry), kind "cuda_allocated". On CPU: the resident
    set size, sampled every 5 ms by a background thread from /proc/self/statm (Linux), kind "cpu_rss"; elsewhere
    the process's lifetime peak from ``resource.getrusage``, kind "cpu_maxrss".

    Attributes (after exit): peak_mb, the peak in MiB; delta_mb, the peak minus the usage on entry.
    """

    def __init__(self, device: Any = None, interval_s: float = 0.005) -> None:
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self.delta_mb: float | None = None
        self.kind = "cuda_allocated" if self.cuda else ("cpu_rss" if Path("/proc/self/statm").is_file() else "cpu_maxrss")

    def _now_mb(self) -> float:
        if self.kind == "cuda_allocated":
            return torch.cuda.memory_allocated() / 2**20
        if self.kind == "cpu_rss":
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, self._now_mb())

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._start = self._max = self._now_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True) if self.kind == "cpu_rss" else None
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else max(self._max, self._now_mb())
        self.peak_mb, self.delta_mb = round(peak, 1), round(peak - self._start, 1)


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of percentages (0 if any is 0; None if any is missing)."""
    if not values or any(v is None for v in values):
        return None
    if any(v <= 0 for v in values):  # type: ignore[operator]
        return 0.0
    return len(values) / sum(1.0 / v for v in values)  # type: ignore[operator]


def case_prob_metrics(nll_new: Sequence[float], nll_true: Sequence[float], kinds: Sequence[str]) -> dict[str, Any]:
    """Per-record ``counterfact_prob`` metrics from NLLs (one entry per prompt).

    Args:
        nll_new: mean per-token NLL of " target_new" after each prompt.
        nll_true: mean per-token NLL of the true answer after each prompt.
        kinds: "rewrite", "paraphrase" or "neighborhood" per prompt.

    Returns:
        es / ps / ns (share of successful prompts of the kind, in [0, 1]) and em / pm / nm (mean probability
        difference, in [-1, 1]); None for a kind without prompts.
    """
    if not len(nll_new) == len(nll_true) == len(kinds):
        raise ValueError("nll_new, nll_true and kinds must have the same length")
    out: dict[str, Any] = {}
    for kind, s, m in (("rewrite", "es", "em"), ("paraphrase", "ps", "pm"), ("neighborhood", "ns", "nm")):
        pairs = [(a, b) for a, b, k in zip(nll_new, nll_true, kinds) if k == kind]
        if not pairs:
            out[s] = out[m] = None
            continue
        if kind == "neighborhood":  # success: the true answer stays more likely
            out[s] = sum(b < a for a, b in pairs) / len(pairs)
            out[m] = sum(math.exp(-b) - math.exp(-a) for a, b in pairs) / len(pairs)
        else:
            out[s] = sum(a < b for a, b in pairs) / len(pairs)
            out[m] = sum(math.exp(-a) - math.exp(-b) for a, b in pairs) / len(pairs)
    return out


def _mean_pct(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return 100.0 * sum(vals) / len(vals) if vals else None


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate_prob(case_metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """ES, PS, NS, EM, PM, NM (percent: the mean over records of the per-record values) and Score."""
    out = {k: _mean_pct(c[k] for c in case_metrics) for k in ("es", "ps", "ns", "em", "pm", "nm")}
    out["score"] = harmonic_mean([out["es"], out["ps"], out["ns"]])
    return out


def _acc(pred: list[int], tgt: list[int]) -> float:
    return sum(int(a == b) for a, b in zip(pred, tgt)) / max(len(tgt), 1)


# ----------------------------------------------------------------------------------------------------------
# The harness


def _ms(t0: float) -> float:
    return 1000.0 * (time.perf_counter() - t0)


def _space(s: str) -> str:
    return " " + s.strip()


def _scope_of(editor: Editor, n: int) -> list[bool | None]:
    s = getattr(editor, "last_in_scope", None)
    return list(s) if s is not None else [None] * n


def _edit_ms(editor: Editor, total_ms: float) -> float:
    """Edit latency as defined for the benchmark: encode + refine + write (for Larimar, without indexing the fact
    in the scope detector, reported apart as ``edit_total_ms``); other editors: the whole edit call."""
    parts = getattr(getattr(editor, "lm", None), "last_edit_ms", None)
    return parts["encode"] + parts.get("refine", 0.0) + parts["write"] if parts else total_ms


def _predict_cached(editor: Editor, cache: dict | None, prompts: list[str], answers: list[str]) -> list[list[int]]:
    """Teacher-forced argmax tokens of answers after prompts, through ``cache`` keyed by (prompt, answer)."""
    cache = {} if cache is None else cache
    missing = [(p, a) for p, a in zip(prompts, answers) if (p, a) not in cache]
    if missing:
        cache.update(zip(missing, editor.predict([p for p, _ in missing], [a for _, a in missing]).predicted))
    return [cache[(p, a)] for p, a in zip(prompts, answers)]


def _case_prob(editor: Editor, req: EditRequest, gen_tokens: int, detail: bool = True,
               token_acc: bool = False, pre_cache: dict | None = None) -> dict[str, Any] | None:
    if not req.target_true:
        return None
    rewrite = req.full_prompt
    prompts = [rewrite, *req.paraphrase_prompts, *req.neighborhood_prompts]
    kinds = ["rewrite"] + ["paraphrase"] * len(req.paraphrase_prompts) + ["neighborhood"] * len(
        req.neighborhood_prompts)
    answers = list(req.neighborhood_answers) or [req.target_true] * len(req.neighborhood_prompts)
    trues = [req.target_true] * (1 + len(req.paraphrase_prompts)) + answers
    editor.reset()
    loc_prompts, loc_answers = list(req.neighborhood_prompts), [_space(t) for t in answers]
    pre_loc = _predict_cached(editor, pre_cache, loc_prompts, loc_answers) if token_acc and loc_prompts else None
    gen_tokens = gen_tokens if detail else 0
    pre = editor.generate([rewrite], gen_tokens)[0] if gen_tokens else None
    t0 = time.perf_counter()
    editor.edit([req])
    edit_total_ms = _ms(t0)
    edit_ms = _edit_ms(editor, edit_total_ms)
    post = editor.generate([rewrite], gen_tokens)[0] if gen_tokens else None
    n = len(prompts)
    conts = [_space(req.target_new)] * n + [_space(t) for t in trues]
    if token_acc:  # one teacher-forced pass gives the NLLs and EasyEdit's argmax tokens
        tf = editor.predict(prompts + prompts, conts)
        nll = tf.nll  # (2n,)
    else:
        nll = editor.score(prompts + prompts, conts)  # (2n,)
    scope = _scope_of(editor, 2 * n)
    query_ms = plain_ms = None
    if detail:
        t0 = time.perf_counter()
        editor.score([rewrite, rewrite], [_space(req.target_new), _space(req.target_true)])
        query_ms = _ms(t0)
    if detail and hasattr(editor, "score_plain"):
        t0 = time.perf_counter()
        editor.score_plain([rewrite, rewrite], [_space(req.target_new), _space(req.target_true)])
        plain_ms = _ms(t0)
    nll_new, nll_true = nll[:n].tolist(), nll[n:].tolist()
    metrics = case_prob_metrics(nll_new, nll_true, kinds)
    rows = []
    for k in range(n):
        ok = nll_true[k] < nll_new[k] if kinds[k] == "neighborhood" else nll_new[k] < nll_true[k]
        row = {"kind": kinds[k], "prompt": prompts[k], "answer_true": trues[k], "nll_new": nll_new[k],
               "nll_true": nll_true[k], "success": bool(ok), "in_scope": scope[k]}
        if scope[n + k] != scope[k]:
            row["in_scope_true"] = scope[n + k]
        rows.append(row)
    if token_acc:  # EasyEdit's numbers from the same edit: token accuracy of target_new, agreement on neighbours
        n_edit = 1 + len(req.paraphrase_prompts)  # rows 0 .. n_edit-1: rewrite and paraphrases with target_new
        accs = [_acc(tf.predicted[k], tf.target[k]) for k in range(n_edit)]
        post_loc = tf.predicted[n + n_edit :]  # the neighbourhood prompts with their true answers
        metrics["tf_reliability"] = accs[0]
        metrics["tf_generalization"] = statistics.mean(accs[1:]) if accs[1:] else None
        metrics["tf_locality"] = (statistics.mean(_acc(a, b) for a, b in zip(post_loc, pre_loc))
                                  if pre_loc is not None else None)
    return {"prompts": rows, "pre_generation": pre, "post_generation": post, "edit_ms": edit_ms,
            "edit_total_ms": edit_total_ms, "query_ms": query_ms, "plain_query_ms": plain_ms, **metrics}


def _case_token_acc(editor: Editor, req: EditRequest, gen_tokens: int, exact_match: bool) -> dict[str, Any]:
    rewrite = req.full_prompt
    new = _space(req.target_new)
    loc_prompts = list(req.neighborhood_prompts) if req.neighborhood_answers else []
    loc_answers = [_space(a) for a in req.neighborhood_answers]
    editor.reset()
    pre_loc = editor.predict(loc_prompts, loc_answers) if loc_prompts else None
    pre = editor.generate([rewrite], gen_tokens)[0] if gen_tokens else None
    t0 = time.perf_counter()
    editor.edit([req])
    edit_total_ms = _ms(t0)
    edit_ms = _edit_ms(editor, edit_total_ms)
    post = editor.generate([rewrite], gen_tokens)[0] if gen_tokens else None
    prompts = [rewrite, *req.paraphrase_prompts]
    tf = editor.predict(prompts, [new] * len(prompts))
    scope = _scope_of(editor, len(prompts))
    t0 = time.perf_counter()
    editor.predict([rewrite], [new])
    query_ms = _ms(t0)
    rows = [{"kind": "rewrite" if k == 0 else "paraphrase", "prompt": p, "acc": _acc(tf.predicted[k], tf.target[k]),
             "nll": float(tf.nll[k]), "in_scope": scope[k]} for k, p in enumerate(prompts)]
    loc_acc = None
    if pre_loc is not None:
        post_loc = editor.predict(loc_prompts, loc_answers)
        lscope = _scope_of(editor, len(loc_prompts))
        for k, p in enumerate(loc_prompts):
            acc = _acc(post_loc.predicted[k], pre_loc.predicted[k])
            rows.append({"kind": "neighborhood", "prompt": p, "answer": loc_answers[k].strip(), "acc": acc,
                         "in_scope": lscope[k]})
        loc_acc = statistics.mean(r["acc"] for r in rows if r["kind"] == "neighborhood")
    para = [r["acc"] for r in rows if r["kind"] == "paraphrase"]
    case = {"prompts": rows, "pre_generation": pre, "post_generation": post, "edit_ms": edit_ms,
            "edit_total_ms": edit_total_ms, "query_ms": query_ms, "plain_query_ms": None, "reliability": rows[0]["acc"],
            "generalization": statistics.mean(para) if para else None, "locality": loc_acc}
    if exact_match:
        n_tok = len(tf.target[0]) + 2
        gen = post if post is not None and gen_tokens >= n_tok else editor.generate([rewrite], n_tok)[0]
        case["exact_match"] = float(gen.strip().lower().startswith(req.target_new.strip().lower()))
    return case


def evaluate_edits(
    editor: Editor,
    records: Sequence[EditRequest],
    protocol: str = "counterfact_prob",
    gen_tokens: int = 10,
    exact_match: bool = False,
    progress: bool = False,
    detail_every: int = 1,
    token_acc: bool = False,
    pre_cache: dict | None = None,
) -> dict[str, Any]:
    """Runs one editor over records, one record at a time (reset, edit, query).

    Args:
        editor: the method.
        records: the edit requests.
        protocol: "counterfact_prob" or "token_acc" (see the module docstring).
        gen_tokens: tokens of the pre / post-edit greedy generation of the rewrite prompt (0: none).
        exact_match: also report greedy exact match of target_new (ZsRE; token_acc only).
        progress: show a tqdm progress bar.
        detail_every: generate and time queries on every k-th record only (counterfact_prob; scores are
            computed for every record): large runs on CPU spend most of their time there otherwise.
        token_acc: under counterfact_prob, also EasyEdit's token accuracies from the same edit
            (``tf_reliability``, ``tf_generalization``, ``tf_locality`` in the summary).
        pre_cache: shared cache of the unedited model's neighbourhood predictions, keyed by (prompt, answer): every
            editor starts from the same decoder, so several methods in one run compute them once.

    Returns:
        the summary dict (keys of `SUMMARY_KEYS` and more) with the per-record results under "cases".
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    from tqdm.auto import tqdm

    cases: list[dict[str, Any]] = []
    skipped = 0
    bar = tqdm(records, desc=f"{editor.name} ({protocol})", disable=not progress, unit="case")
    try:
        with PeakMemory(getattr(editor, "device", None)) as peak:
            for i, req in enumerate(bar):
                if protocol == "counterfact_prob":
                    case = _case_prob(editor, req, gen_tokens, detail=i % max(1, detail_every) == 0,
                                      token_acc=token_acc, pre_cache=pre_cache)
                    if case is None:
                        skipped += 1
                        continue
                else:
                    case = _case_token_acc(editor, req, gen_tokens, exact_match)
                cases.append({"method": editor.name, "protocol": protocol, "case_id": req.case_id,
                              "fact": req.sentence, "target_new": req.target_new, "target_true": req.target_true,
                              **case})
    finally:
        editor.reset()
    if skipped:
        logger.warning("%s: skipped %d record(s) without target_true (needed by %s)", editor.name, skipped, protocol)
    summary: dict[str, Any] = {"method": editor.name, "protocol": protocol, "n_cases": len(cases),
                               "n_skipped": skipped}
    if protocol == "counterfact_prob":
        summary.update(aggregate_prob(cases))
        if token_acc:
            for key in ("tf_reliability", "tf_generalization", "tf_locality"):
                summary[key] = _mean_pct(c.get(key) for c in cases)
    else:
        rel = _mean_pct(c["reliability"] for c in cases)
        gen = _mean_pct(c["generalization"] for c in cases)
        loc = _mean_pct(c["locality"] for c in cases)
        summary.update(reliability=rel, generalization=gen, locality=loc, es=rel, ps=gen, ns=loc,
                       score=harmonic_mean([rel, gen, loc]), em=None, pm=None, nm=None)
        if exact_match:
            summary["exact_match"] = _mean_pct(c.get("exact_match") for c in cases)
    summary["edit_ms_median"] = _median(c["edit_ms"] for c in cases)
    summary["edit_total_ms_median"] = _median(c.get("edit_total_ms") for c in cases)
    summary["query_ms_median"] = _median(c["query_ms"] for c in cases)
    summary["plain_query_ms_median"] = _median(c["plain_query_ms"] for c in cases)
    summary["peak_mem_mb"], summary["peak_mem_delta_mb"], summary["peak_mem_kind"] = peak.peak_mb, peak.delta_mb, peak.kind
    for kind in KINDS:
        flags = [p["in_scope"] for c in cases for p in c["prompts"] if p["kind"] == kind and p["in_scope"] is not None]
        summary[f"scope_rate_{kind}"] = 100.0 * sum(flags) / len(flags) if flags else None
    summary["cases"] = cases
    return summary


def evaluate_counterfact(editor: Editor, records: Sequence[EditRequest], protocol: str = "counterfact_prob",
                         **kwargs: Any) -> dict[str, Any]:
    """`evaluate_edits` on CounterFact records (e.g. ``evaluate_counterfact(ed, recs)["es"]``)."""
    return evaluate_edits(editor, records, protocol, **kwargs)


def evaluate_zsre(editor: Editor, records: Sequence[EditRequest], protocol: str = "token_acc",
                  **kwargs: Any) -> dict[str, Any]:
    """`evaluate_edits` on ZsRE records, with greedy exact match under ``token_acc``."""
    kwargs.setdefault("exact_match", protocol == "token_acc")
    return evaluate_edits(editor, records, protocol, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Outputs


def machine_info() -> str:
    """Host, CPU / GPU and torch version, one line."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return f"{platform.node()} | {platform.machine()} | {dev} | torch {torch.__version__}"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 1 or v == 0 else f"{v:.3f}"
    return str(v)


def write_outputs(out_dir: str | Path, summaries: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Writes ``cases.jsonl``, ``summary.json`` and ``summary.md`` (summaries of `evaluate_edits` + run meta)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    with (d / "cases.jsonl").open("w", encoding="utf-8") as f:
        for s in summaries:
            for case in s.get("cases", []):
                f.write(json.dumps(case, ensure_ascii=False) + "\n")
    objs = [{**{k: v for k, v in s.items() if k != "cases"}, **meta} for s in summaries]
    (d / "summary.json").write_text(json.dumps(objs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    cols = ["method", "protocol", "n_cases", "es", "ps", "ns", "score", "em", "pm", "nm", "edit_ms_median",
            "query_ms_median", "plain_query_ms_median"]
    if any("exact_match" in o for o in objs):
        cols.insert(7, "exact_match")
    if any(o.get("tf_reliability") is not None for o in objs):
        cols[7:7] = ["tf_reliability", "tf_generalization", "tf_locality"]
    cols += ["peak_mem_mb", "peak_mem_delta_mb"]
    lines = [f"# {meta.get('task', 'evaluation')}: {meta.get('data')}", "",
             f"checkpoint `{meta.get('checkpoint')}`, scope threshold {meta.get('scope_threshold')} "
             f"(mode {meta.get('scope_mode')}), {meta.get('date')}, {meta.get('machine')}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(o.get(c)) for c in cols) + " |" for o in objs]
    (d / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


# ----------------------------------------------------------------------------------------------------------
# Reconstruction and perplexity


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
    """NLL per token and teacher-forced accuracy of held-out blocks, from their own encoding (ae), through a
    memory holding their episode (memory: batch write of ``episode_size`` blocks, read at each block) and with
    z = 0 (no_memory); WikiText perplexity with z = 0 and with the untouched decoder.

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

    from larimar.data import iter_episodes, iter_text_blocks, read_wikitext

    block_tokens = block_tokens or model.config.max_decoder_length
    n_episodes = max(1, n_blocks // episode_size)
    blocks = iter_text_blocks(texts, model.decoder_tokenizer, block_tokens=block_tokens)
    sums = {k: [0.0, 0, 0] for k in ("ae", "memory", "no_memory")}
    n_done = 0
    episodes = itertools.islice(iter_episodes(blocks, episode_size), n_episodes)
    with torch.inference_mode():
        for episode in tqdm(episodes, total=n_episodes, disable=not progress, desc="reconstruct", unit="episode"):
            texts_e = [b.text for b in episode]
            Z = model.encode_texts(texts_e)  # (E, C)
            M = model.write(Z[None])  # (1, K, C)
            z_read = model.read(M, Z[None])[0][0]  # (E, C)
            for key, latent in (("ae", Z), ("memory", z_read), ("no_memory", None)):
                nll, cnt, cor = _block_stats(model, texts_e, latent)
                sums[key][0] += nll
                sums[key][1] += cnt
                sums[key][2] += cor
            n_done += len(texts_e)
    if n_done == 0:
        raise ValueError(f"no complete episode of {episode_size} blocks in the data")
    out: dict[str, Any] = {"n_blocks": n_done, "episode_size": episode_size, "block_tokens": block_tokens}
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


# ----------------------------------------------------------------------------------------------------------
# Command line: larimar eval counterfact | zsre | reconstruct


def _parse_hparams(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--hparams expects METHOD=PATH, got {item!r}")
        out[name] = path
    return out


def build_editors(
    methods: Sequence[str], lm: Any, hparams: dict[str, str] | None = None, device: str | None = None
) -> list[Editor]:
    """Editors by name: "larimar", "none" and the baselines of `larimar.baselines.METHODS`.

    Baselines edit one untouched copy of the decoder backbone (``load_decoder(config.decoder)``), shared and
    restored after every record; their hyper-parameters come from ``hparams[name]`` (a YAML path), else
    ``configs/baselines/<name>_smollm2-135m.yaml`` of the source checkout (for the default decoder), else the
    dataclass defaults.
    """
    editors: list[Editor] = []
    hf: Any = None
    hparams = hparams or {}
    plain_cache: dict[tuple[str, str], float] = {}  # z = 0 scores, shared: the decoder backbone stays untouched
    for name in methods:
        if name == "larimar":
            editors.append(LarimarEditor(lm, plain_cache=plain_cache))
        elif name == "none":
            editors.append(NoEditEditor(lm.model, plain_cache=plain_cache))
        else:
            try:
                from larimar.baselines import METHODS
            except ImportError:
                METHODS = {}
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r}; expected larimar, none or one of {sorted(METHODS)}")
            if hf is None:
                from larimar.backbones import load_decoder

                hf = load_decoder(lm.model.config.decoder, device=device or "cpu")
            path = hparams.get(name)
            default = BASELINE_CONFIGS / f"{name}_smollm2-135m.yaml"
            if path is None and lm.model.config.decoder is None and default.is_file():
                path = str(default)
            if path is None:
                logger.warning("%s: no hyper-parameter file, using the dataclass defaults", name)
            editors.append(HFBaselineEditor(name, hf[0], hf[1], path, start_token_id=lm.model.start_token_id))
    return editors


def run_edit_eval(args: argparse.Namespace, task: str) -> list[dict[str, Any]]:
    """``larimar eval counterfact|zsre``: loads the checkpoint and data, runs every method, writes the outputs."""
    from larimar.data import load_counterfact, load_zsre
    from larimar.editing import Larimar, quiet_loading, refinement_of

    protocol = args.protocol or ("counterfact_prob" if task == "counterfact" else "token_acc")
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    methods = [m.strip() for m in (args.methods or args.method).split(",") if m.strip()]
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--methods must name distinct methods, got {args.methods or args.method!r}")
    loader = load_counterfact if task == "counterfact" else load_zsre
    loaded = loader(args.data, limit=args.limit)
    if not loaded.records:
        raise ValueError(f"{args.data}: no valid records")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    quiet_loading()
    lm = Larimar.from_pretrained(
        args.checkpoint, device=args.device, scope_threshold=args.scope_threshold, scope_mode=args.scope_mode,
        scope_encoder=args.scope_encoder, use_scope=not args.no_scope, read_mode=args.read_mode,
        refinement=refinement_of(args),
    )
    editors = build_editors(methods, lm, _parse_hparams(args.hparams), args.device)
    summaries = []
    pre_cache: dict = {}  # the unedited decoder's neighbourhood predictions, shared by the methods (--token-acc)
    for editor in editors:
        fn = evaluate_counterfact if task == "counterfact" else evaluate_zsre
        summaries.append(fn(editor, loaded.records, protocol, gen_tokens=args.gen_tokens, progress=True,
                            detail_every=args.detail_every, token_acc=getattr(args, "token_acc", False),
                            pre_cache=pre_cache))
    meta = {
        "task": task, "data": str(args.data), "limit": args.limit, "n_records_loaded": len(loaded.records),
        "n_record_errors": len({e.index for e in loaded.errors}),
        "checkpoint": str(args.checkpoint or "default"), "fingerprint": lm.fingerprint,
        "scope_threshold": args.scope_threshold, "scope_mode": args.scope_mode,
        "scope_encoder": args.scope_encoder or "all-MiniLM-L6-v2", "use_scope": not args.no_scope,
        "read_mode": args.read_mode, "refine_steps": args.refine_steps, "refine_lr": args.refine_lr,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
    }
    write_outputs(args.out, summaries, meta)
    for s in summaries:
        tf = (f" | token_acc rel={_fmt(s['tf_reliability'])} gen={_fmt(s['tf_generalization'])} "
              f"loc={_fmt(s['tf_locality'])}" if s.get("tf_reliability") is not None else "")
        print(f"{s['method']:>10} {protocol}: n={s['n_cases']} ES={_fmt(s['es'])} PS={_fmt(s['ps'])} "
              f"NS={_fmt(s['ns'])} Score={_fmt(s['score'])} edit_ms={_fmt(s['edit_ms_median'])} "
              f"peak_mem_mb={_fmt(s['peak_mem_mb'])}{tf}")
    print(f"wrote {args.out}/summary.json, summary.md, cases.jsonl")
    return summaries


def _cmd_edit_eval(args: argparse.Namespace, task: str) -> int:
    """``larimar eval counterfact|zsre``; ``eval zsre --sequential`` runs `larimar.capabilities.run_sequential`."""
    if not getattr(args, "sequential", False):
        run_edit_eval(args, task)
        return 0
    from larimar.capabilities import run_sequential

    methods = [m.strip() for m in (args.methods or args.method).split(",") if m.strip()]
    baselines = [m for m in methods if m not in ("larimar", "none")]
    if "larimar" not in methods and not baselines:
        raise ValueError("--sequential needs larimar or a weight editor in --methods (larimar,grace,memit,...)")
    if args.limit is not None:
        raise ValueError("--sequential takes --edits N, not --limit")
    seq = argparse.Namespace(
        data=[args.data], edits=args.edits, checkpoints=args.checkpoints, em_curve=False,
        baselines=",".join(baselines), no_larimar="larimar" not in methods, compare=None, hparams=args.hparams,
        out=args.out, checkpoint=args.checkpoint, device=args.device, slots=args.slots, slot_init="random",
        scope_threshold=args.scope_threshold, scope_encoder=args.scope_encoder, no_scope=args.no_scope,
        read_mode=args.read_mode, refine_steps=args.refine_steps, refine_lr=args.refine_lr, batch_size=32,
        seed=args.seed,
    )
    run_sequential(seq)
    return 0


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from larimar.backbones import load_decoder
    from larimar.data import iter_wikipedia_texts
    from larimar.editing import DEFAULT_CHECKPOINT, quiet_loading
    from larimar.model import LarimarModel

    quiet_loading()
    ckpt = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    model = LarimarModel.from_pretrained(ckpt, device=args.device).eval()
    wikitext = Path(args.wikitext) if args.wikitext else None
    if wikitext is not None and not wikitext.is_file():
        raise FileNotFoundError(f"no WikiText file at {wikitext}")
    base = load_decoder(model.config.decoder, device=args.device or "cpu") if wikitext is not None else None
    summary = evaluate_reconstruction(
        model, iter_wikipedia_texts(args.data), args.limit, args.episode_size, wikitext_path=wikitext,
        wikitext_tokens=args.wikitext_tokens, wikitext_window=args.wikitext_window, base_decoder=base, progress=True,
    )
    summary.update(task="reconstruct", data=str(args.data), checkpoint=str(ckpt), wikitext=str(wikitext),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   machine=machine_info())
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    keys = ["n_blocks", "nll_ae", "nll_memory", "nll_no_memory", "acc_ae", "acc_memory", "acc_no_memory",
            "wikitext_ppl", "wikitext_ppl_base"]
    md = ["# reconstruction: " + str(args.data), "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
          "| " + " | ".join(f"{summary[k]:.3f}" if isinstance(summary[k], float) else _fmt(summary[k])
                            for k in keys) + " |"]
    (d / "summary.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md[2:]))
    return 0


SCOPE_THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))  # 0.30 .. 0.90


def evaluate_scope(records: Sequence[EditRequest], scope: Any,
                   thresholds: Sequence[float] = SCOPE_THRESHOLDS) -> dict[str, Any]:
    """The scope detector's threshold sweep on edit records (one written fact per record).

    Per record the fact "prompt + target_new" is the only written fact; its rewrite and paraphrase prompts
    should be in scope, its neighbourhood prompts out of scope. Both scoring modes are swept: ``prompt`` (the
    query prompt alone, per sentence) and ``prompt_answer`` (the paper's: prompt + " " + target_new, whole).

    Args:
        records: the records.
        scope: a `larimar.scope.ScopeDetector` (its stored facts and threshold are not used).
        thresholds: the thresholds (in scope: similarity >= threshold).

    Returns:
        ``{"n_records", "rows": [{mode, threshold, rewrite, paraphrase, neighborhood, balanced_accuracy}]}``
        with in-scope rates in percent; balanced accuracy counts rewrite and paraphrase prompts as positives.
    """
    queries: list[str] = []
    facts: list[str] = []
    kinds: list[str] = []
    answers: list[str] = []
    for r in records:
        fact = f"{r.full_prompt} {r.target_new}"
        for kind, prompts in (("rewrite", [r.full_prompt]), ("paraphrase", r.paraphrase_prompts),
                              ("neighborhood", r.neighborhood_prompts)):
            queries += list(prompts)
            facts += [fact] * len(prompts)
            kinds += [kind] * len(prompts)
            answers += [_space(r.target_new)] * len(prompts)
    rows = []
    for mode in ("prompt", "prompt_answer"):
        qs = queries if mode == "prompt" else [q + a for q, a in zip(queries, answers)]
        sims = scope.with_mode(mode).score_pairs(qs, facts)  # (Q,)
        by_kind = {k: sims[[i for i, x in enumerate(kinds) if x == k]] for k in KINDS}
        for t in thresholds:
            rates = {k: (100.0 * (v >= t).double().mean().item() if v.numel() else None) for k, v in by_kind.items()}
            pos = torch.cat([by_kind["rewrite"], by_kind["paraphrase"]])
            neg = by_kind["neighborhood"]
            bal = None
            if pos.numel() and neg.numel():
                bal = 50.0 * ((pos >= t).double().mean().item() + (neg < t).double().mean().item())
            rows.append({"mode": mode, "threshold": float(t), **rates, "balanced_accuracy": bal})
    return {"n_records": len(records), "rows": rows}


def _cmd_scope(args: argparse.Namespace) -> int:
    from larimar.data import load_counterfact
    from larimar.scope import ScopeDetector

    loaded = load_counterfact(args.data, limit=args.limit)
    for e in loaded.errors[:5]:
        print(f"skipping record {e.index}: {e.field}: {e.message}", file=sys.stderr)
    scope = ScopeDetector(encoder_path=args.scope_encoder, device=args.device or "cpu")
    summary = evaluate_scope(loaded.records, scope)
    summary.update(task="scope", data=str(args.data), limit=args.limit,
                   scope_encoder=args.scope_encoder or "all-MiniLM-L6-v2",
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   machine=machine_info())
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    keys = ["mode", "threshold", "rewrite", "paraphrase", "neighborhood", "balanced_accuracy"]
    md = [f"# scope sweep: {args.data} ({summary['n_records']} records; % of prompts in scope)", "",
          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(_fmt(r[k]) if k != "threshold" else f"{r[k]:.2f}" for k in keys) + " |"
           for r in summary["rows"]]
    (d / "summary.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md[2:]))
    return 0


def _default_wikitext() -> str | None:
    p = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext103" / "wiki.valid.tokens"
    return str(p) if p.is_file() else None


def add_read_args(p: argparse.ArgumentParser, refine: bool = True) -> None:
    """How a Larimar editor reads its memory: scope threshold and encoder, --no-scope, --read-mode; and, with
    ``refine``, how it writes: --refine-steps, --refine-lr (`larimar.editing.add_refine_args`)."""
    p.add_argument("--scope-threshold", type=float, default=0.6)
    p.add_argument("--scope-encoder", default=None,
                   help="sentence-transformers folder (default: all-MiniLM-L6-v2) or 'larimar'")
    p.add_argument("--no-scope", action="store_true", help="read memory for every query (ablation)")
    p.add_argument("--read-mode", choices=READ_MODES, default="keyed",
                   help="keyed: the memory addressed with the nearest fact's key; memory: the paper's query read")
    if refine:
        from larimar.editing import add_refine_args

        add_refine_args(p)


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Registers ``larimar eval counterfact | zsre | scope | reconstruct``."""
    p = sub.add_parser("eval", help="evaluate: knowledge editing (CounterFact, ZsRE) or reconstruction")
    esub = p.add_subparsers(dest="eval_what", required=True)
    for task in ("counterfact", "zsre"):
        e = esub.add_parser(task, help=f"{task} knowledge-editing evaluation")
        e.add_argument("--data", required=True, help="the records file (ROME / EasyEdit / MEND / KnowEdit format)")
        e.add_argument("--limit", type=int, default=None, help="the first N records of the file")
        e.add_argument("--method", default="larimar", help="larimar, none or a baseline (rome, memit, ...)")
        e.add_argument("--methods", default=None, help="comma-separated methods run one after another")
        e.add_argument("--protocol", choices=PROTOCOLS, default=None,
                       help="counterfact_prob (default for counterfact) or token_acc (default for zsre)")
        e.add_argument("--out", required=True, help="output folder (cases.jsonl, summary.json, summary.md)")
        e.add_argument("--checkpoint", default=None, help="Larimar checkpoint folder (default: the shipped one)")
        e.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
        e.add_argument("--scope-mode", choices=["prompt", "prompt_answer"], default="prompt")
        add_read_args(e)
        e.add_argument("--gen-tokens", type=int, default=10, help="pre / post-edit greedy generation length (0: off)")
        e.add_argument("--detail-every", type=int, default=1,
                       help="generate and time queries on every k-th record only (scores: every record)")
        e.add_argument("--token-acc", action="store_true",
                       help="counterfact_prob: also EasyEdit's token accuracies (tf_*) from the same edits")
        e.add_argument("--hparams", action="append", metavar="METHOD=PATH", help="a baseline's YAML hyper-parameters")
        e.add_argument("--seed", type=int, default=0)
        if task == "zsre":  # the sequential-editing run (`larimar eval sequential`), with --methods as its systems
            e.add_argument("--sequential", action="store_true",
                           help="write the facts one after another into one memory (baselines: edits accumulate)")
            e.add_argument("--edits", type=int, default=1000, help="--sequential: facts written")
            e.add_argument("--slots", type=int, default=1000, help="--sequential: memory slots K")
            e.add_argument("--checkpoints", default="10,50,100,250,500,1000",
                           help="--sequential: numbers of edits to evaluate at (the last edit always)")
        e.set_defaults(func=lambda a, t=task: _cmd_edit_eval(a, t))
    sc = esub.add_parser("scope", help="scope-detector threshold sweep on CounterFact records")
    sc.add_argument("--data", required=True, help="CounterFact records (ROME or EasyEdit format)")
    sc.add_argument("--limit", type=int, default=None, help="the first N records of the file")
    sc.add_argument("--out", required=True, help="output folder (summary.json, summary.md)")
    sc.add_argument("--scope-encoder", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)")
    sc.add_argument("--device", default=None)
    sc.set_defaults(func=_cmd_scope)
    r = esub.add_parser("reconstruct", help="block reconstruction through memory, and WikiText perplexity")
    r.add_argument("--data", required=True, help="held-out Wikipedia JSONL (e.g. enwiki_2018_validation.jsonl)")
    r.add_argument("--limit", type=int, default=256, help="blocks to evaluate (whole episodes)")
    r.add_argument("--episode-size", type=int, default=16)
    r.add_argument("--out", required=True)
    r.add_argument("--checkpoint", default=None)
    r.add_argument("--device", default=None)
    r.add_argument("--wikitext", default=_default_wikitext(), help="wiki.valid.tokens (default: the shared copy)")
    r.add_argument("--wikitext-tokens", type=int, default=20000)
    r.add_argument("--wikitext-window", type=int, default=256)
    r.set_defaults(func=_cmd_reconstruct)
