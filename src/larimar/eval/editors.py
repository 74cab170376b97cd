"""Every editing method behind one contract, `Editor`, so the harness never branches on the method.

    LarimarEditor       the `larimar.editor.Larimar` memory editor (scope detector, memory read-out)
    NoEditEditor        the unedited model: z = 0 everywhere ("--methods none")
    RagEditor           retrieval into the prompt ("--methods rag"): Larimar's scope detector finds the nearest
                        written fact; in scope, its sentence + "\\n" + the prompt goes to the untouched decoder
    HFBaselineEditor    a weight / prompt editor of `larimar.baselines` (ROME, MEMIT, GRACE, FT-L, IKE) on a plain
                        HF decoder; its edit is undone after every record
    SequentialHFEditor  the same with edits accumulating (sequential editing)

Scoring returns the scope decision with the scores (`Scored`, `TeacherForced.in_scope`): None per row for a method
without a scope detector. Teacher-forced scoring uses one tokenization rule for every method (`teacher_forced`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from larimar.editor.editor import cached_plain_nll
from larimar.facts import EditRequest, as_fact

logger = logging.getLogger(__name__)

# the YAML hyper-parameters of the baselines, in the repository beside src/ (absent from a wheel install)
BASELINE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "baselines"


@dataclass
class TeacherForced:
    """Teacher-forced results per row.

    Attributes:
        nll: (B,) mean NLL per continuation token.
        predicted: per row, the argmax token ids at the continuation's positions.
        target: per row, the continuation's token ids.
        in_scope: the scope decision per row, set by the editor (None: no scope detector).
    """

    nll: Tensor
    predicted: list[list[int]]
    target: list[list[int]]
    in_scope: list[bool | None] | None = None


class Scored(NamedTuple):
    """Scores of B rows and where they came from.

    Attributes:
        nll: (B,) mean NLL per continuation token.
        in_scope: the scope decision per row (None per row for a method without a scope detector).
    """

    nll: Tensor
    in_scope: list[bool | None]


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


@runtime_checkable
class Editor(Protocol):
    """What the harness needs from an editing method.

    Attributes:
        name: the method's name in the outputs.
    """

    name: str

    def reset(self) -> None:
        """Back to the unedited model."""
        ...

    def edit(self, requests: list[EditRequest]) -> None:
        """Applies the edits (accumulating over calls until ``reset``)."""
        ...

    def score(self, prompts: list[str], continuations: list[str]) -> Scored:
        """Mean per-token NLL (B,) of continuations after prompts, with the edits applied, and scope decisions."""
        ...

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations."""
        ...

    def predict(self, prompts: list[str], continuations: list[str]) -> TeacherForced:
        """Teacher-forced NLL and argmax tokens at the continuations' positions, and scope decisions."""
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
        self.plain_cache = plain_cache  # shared z = 0 scores (see `editor.editor.cached_plain_nll`)
        self._parts: dict[str, float] = {}  # the last edit's timed parts

    @property
    def device(self) -> torch.device:
        return self.lm.model.device

    def reset(self) -> None:
        self.lm.reset()

    def edit(self, requests: list[EditRequest]) -> None:
        self._parts = {}
        self.lm.edit(list(requests), timings=self._parts)

    def last_edit_parts(self) -> dict[str, float]:
        """Wall time (ms) of the parts of this editor's last edit (``Larimar.edit(timings=)``: encode, refine, scope,
        write; the scope index insert is not timed there), empty if unknown."""
        return dict(self._parts)

    def score(self, prompts: list[str], continuations: list[str]) -> Scored:
        nll, in_scope = self.lm.score_batch(prompts, continuations, plain_cache=self.plain_cache)
        return Scored(nll, list(in_scope))

    def score_plain(self, prompts: list[str], continuations: list[str]) -> Tensor:
        """The same scoring with the plain decoder (z = 0; no encode, scope or read): the latency reference."""
        with torch.inference_mode():
            return self.lm.model.continuation_nll(list(prompts), list(continuations), None).float().cpu()

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return list(self.lm.generate(list(prompts), max_new_tokens=max_new_tokens))

    def prompt_tokens(self, prompts: list[str]) -> list[int]:
        """Decoder tokens each prompt is decoded with (start token + prompt; the memory adds a latent, no text)."""
        return decoder_prompt_tokens(self.lm.model, prompts)

    @torch.inference_mode()
    def predict(self, prompts: list[str], continuations: list[str]) -> TeacherForced:
        model = self.lm.model
        r = self.lm.route(list(prompts))
        tf = teacher_forced(
            lambda ids, mask: model.decode_logits(ids, mask, r.latents.to(model.device)),
            model.decoder_tokenizer, model.start_token_id, model.pad_token_id, prompts, continuations, model.device,
        )
        tf.in_scope = list(r.in_scope)
        return tf


class NoEditEditor:
    """The unedited model: `LarimarModel` decoding with z = 0 everywhere (edits are ignored)."""

    def __init__(self, model: Any, name: str = "none", plain_cache: dict | None = None) -> None:
        self.model = model
        self.name = name
        self.plain_cache = plain_cache

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset(self) -> None:
        pass

    def edit(self, requests: list[EditRequest]) -> None:
        pass

    @torch.inference_mode()
    def score(self, prompts: list[str], continuations: list[str]) -> Scored:
        if self.plain_cache is not None:
            nll = cached_plain_nll(self.model, list(prompts), list(continuations), self.plain_cache)
        else:
            nll = self.model.continuation_nll(list(prompts), list(continuations), None).float().cpu()
        return Scored(nll, [None] * len(prompts))

    @torch.inference_mode()
    def score_plain(self, prompts: list[str], continuations: list[str]) -> Tensor:
        return self.model.continuation_nll(list(prompts), list(continuations), None).float().cpu()

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return self.model.generate_text(list(prompts), None, max_new_tokens=max_new_tokens)

    def prompt_tokens(self, prompts: list[str]) -> list[int]:
        return decoder_prompt_tokens(self.model, prompts)

    @torch.inference_mode()
    def predict(self, prompts: list[str], continuations: list[str]) -> TeacherForced:
        m = self.model
        return teacher_forced(lambda ids, mask: m.decode_logits(ids, mask, None), m.decoder_tokenizer,
                              m.start_token_id, m.pad_token_id, prompts, continuations, m.device)


RAG_SEPARATOR = "\n"


def decoder_prompt_tokens(model: Any, prompts: Sequence[str]) -> list[int]:
    """Decoder input tokens of each prompt as `LarimarModel` decodes it: the start token + the prompt's tokens."""
    tok = model.decoder_tokenizer
    return [1 + len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]


@dataclass
class RagRouting:
    """Where each of Q queries goes under `RagEditor`.

    Attributes:
        prompts: Q prompts as the decoder sees them (the nearest fact's sentence + separator + prompt in scope).
        in_scope: Q scope decisions.
        similarities: Q nearest-fact cosines (-inf with no fact).
        nearest_ids: Q nearest fact ids (None with no fact).
    """

    prompts: list[str]
    in_scope: list[bool]
    similarities: list[float]
    nearest_ids: list[str | None]


class RagEditor:
    """Retrieval-augmented prompting with Larimar's own retriever: what a practitioner would try first.

    It keeps the written facts' sentences and its own `ScopeDetector` instance, a shallow copy of ``lm.scope`` (the
    same sentence encoder) holding only these facts, with the same threshold (``lm.scope_threshold``), scope mode
    and ``use_scope`` switch as the Larimar editor. An edit is the index insert (embed + add). A query in scope
    (nearest-fact cosine >= the threshold) is decoded by the untouched decoder (z = None) after the nearest fact's
    sentence + ``separator`` + the prompt; out of scope, after the prompt alone (exactly `NoEditEditor`).

    Args:
        lm: the `Larimar` editor whose model, scope detector and settings are used (its memory is not touched).
        name: the method name in the outputs.
        plain_cache: shared plain-decoder scores (see `cached_plain_nll`) for out-of-scope rows.
        separator: between the retrieved sentence and the prompt.
    """

    def __init__(self, lm: Any, name: str = "rag", plain_cache: dict | None = None,
                 separator: str = RAG_SEPARATOR) -> None:
        self.lm = lm
        self.model = lm.model
        self.name = name
        self.plain_cache = plain_cache
        self.separator = separator
        self.threshold = float(lm.scope_threshold)
        self.use_scope = bool(getattr(lm, "use_scope", True))
        self.scope_mode = getattr(lm, "scope_mode", "prompt")
        self.max_chars = getattr(lm, "max_chars", 10**9)
        self.scope = lm.scope.with_facts()  # the same encoder and settings; its own facts
        self._texts: dict[str, str] = {}  # id -> sentence, in write order
        self._count = 0

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def facts(self) -> list[tuple[str, str]]:
        """(id, sentence) of every written fact, in write order."""
        return list(self._texts.items())

    def reset(self) -> None:
        self.scope.clear()
        self._texts.clear()

    def edit(self, requests: Sequence[Any], ids: Sequence[str] | None = None) -> list[str]:
        """Indexes facts (requests, dicts or sentences, as `Larimar.edit` takes them): embed + add. Returns the ids."""
        sentences = [as_fact(r, self.max_chars)[0] for r in requests]
        if ids is None:
            ids = [f"rag{self._count + i}" for i in range(len(sentences))]
        ids = [str(i) for i in ids]
        if len(ids) != len(sentences):
            raise ValueError(f"expected {len(sentences)} ids, got {len(ids)}")
        self.scope.add_embeddings(self.scope.embed(sentences), ids)
        self._texts.update(zip(ids, sentences))
        self._count += len(sentences)
        return ids

    def forget(self, ids: str | Sequence[str]) -> None:
        """Removes facts from the index (exact)."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        self.scope.remove(ids)
        for i in ids:
            del self._texts[i]

    def route(self, prompts: Sequence[str], scope_queries: Sequence[str] | None = None,
              scope_mode: str = "prompt") -> RagRouting:
        """The decoder prompts and scope decisions of prompts (scope decided on ``scope_queries``, default the
        prompts, under ``scope_mode``)."""
        prompts = list(prompts)
        if not self._texts:
            return RagRouting(prompts, [False] * len(prompts), [float("-inf")] * len(prompts), [None] * len(prompts))
        sims, nearest = self.scope.with_mode(scope_mode).score(list(scope_queries or prompts))
        in_scope = [bool(s >= self.threshold) if self.use_scope else True for s in sims.tolist()]
        out = [self._texts[n] + self.separator + p if ok and n is not None else p
               for p, ok, n in zip(prompts, in_scope, nearest)]
        return RagRouting(out, in_scope, [float(x) for x in sims], list(nearest))

    @torch.inference_mode()
    def score(self, prompts: list[str], continuations: list[str]) -> Scored:
        prompts, conts = list(prompts), list(continuations)
        if self.scope_mode == "prompt_answer":
            r = self.route(prompts, [p + c for p, c in zip(prompts, conts)], "prompt_answer")
        else:
            r = self.route(prompts)
        nll = torch.empty(len(prompts))
        ctx = [i for i, ok in enumerate(r.in_scope) if ok]
        plain = [i for i, ok in enumerate(r.in_scope) if not ok]
        if plain:
            ps, cs = [prompts[i] for i in plain], [conts[i] for i in plain]
            nll[plain] = (cached_plain_nll(self.model, ps, cs, self.plain_cache) if self.plain_cache is not None
                          else self.model.continuation_nll(ps, cs, None).float().cpu())
        if ctx:
            nll[ctx] = self.model.continuation_nll([r.prompts[i] for i in ctx], [conts[i] for i in ctx],
                                                   None).float().cpu()
        return Scored(nll, list(r.in_scope))

    @torch.inference_mode()
    def score_plain(self, prompts: list[str], continuations: list[str]) -> Tensor:
        return self.model.continuation_nll(list(prompts), list(continuations), None).float().cpu()

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return self.model.generate_text(self.route(prompts).prompts, None, max_new_tokens, truncate=False)

    def prompt_tokens(self, prompts: list[str]) -> list[int]:
        """Decoder tokens each prompt is decoded with: start token + (retrieved sentence + separator +) prompt."""
        return decoder_prompt_tokens(self.model, self.route(prompts).prompts)

    @torch.inference_mode()
    def predict(self, prompts: list[str], continuations: list[str]) -> TeacherForced:
        m = self.model
        r = self.route(prompts)
        tf = teacher_forced(lambda ids, mask: m.decode_logits(ids, mask, None), m.decoder_tokenizer,
                            m.start_token_id, m.pad_token_id, r.prompts, continuations, m.device)
        tf.in_scope = list(r.in_scope)
        return tf


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

    def score(self, prompts: list[str], continuations: list[str]) -> Scored:
        return Scored(self.predict(prompts, continuations).nll, [None] * len(prompts))

    def prompt_tokens(self, prompts: list[str]) -> list[int]:
        """Tokens each prompt is decoded with (start token + the prompt, after IKE's demonstrations if any)."""
        start = 1 if self.start_token_id is not None else 0
        return [start + len(self.tok(p, add_special_tokens=False)["input_ids"]) for p in self._prompts(prompts)]

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


class SequentialHFEditor(HFBaselineEditor):
    """An `HFBaselineEditor` whose ``edit`` applies its requests one after another
    (``apply_method(..., sequential=True)``); calls accumulate until ``reset``."""

    @classmethod
    def from_editor(cls, editor: HFBaselineEditor) -> "SequentialHFEditor":
        return cls(editor.method, editor.model, editor.tok, editor.hparams, editor.start_token_id, editor.name)

    def edit(self, requests: list[EditRequest]) -> None:
        from larimar.baselines import apply_method

        requests = self._in_scoring_context(list(requests))  # keys in the context scoring uses (start token)
        self.model, handle = apply_method(self.method, self.model, self.tok, requests, self.hparams, sequential=True)
        self._handles.append(handle)
        self.model.eval()


def parse_hparams(items: Sequence[str] | None) -> dict[str, str]:
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
    """Editors by name: "larimar", "rag", "none" and the baselines of `larimar.baselines.METHODS`.

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
        elif name == "rag":
            editors.append(RagEditor(lm, plain_cache=plain_cache))
        else:
            try:
                from larimar.baselines import METHODS
            except ImportError:
                METHODS = {}
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r}; expected larimar, rag, none or one of {sorted(METHODS)}")
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
