"""Pieces the baseline editors share: the edit handle, weight backups, prompt batches, lookups, value optimisation.

What is here:
    EditHandle        the ``restore`` of the method contract: call it to undo; ``transform_prompt`` for IKE.
    backup_weights    clones of parameters, and the undo that copies them back bit-identically.
    frozen            context manager: no parameter requires grad (value optimisation trains a free vector).
    lookup_index      the token position of the subject's last token (or of the prompt's last token).
    LMBatch / build_batch   right-padded prompts (+ target) with labels and lookup positions.
    target_nll        mean per-token NLL of the targets, per example.
    context_prefixes  the fixed prefixes plus a few sampled from the model.
    module_at_lookup  a module's input or output at the lookup positions, averaged over prefixes.
    optimize_delta    ROME / MEMIT's value search: a vector added to a module's output at the subject.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from larimar.baselines.hparams import ROMEHyperParams
from larimar.baselines.nethook import Trace
from larimar.facts import EditRequest

logger = logging.getLogger(__name__)


class EditHandle:
    """What ``apply_<method>`` returns as ``restore``: a callable that undoes the edit.

    Calling it (or ``.restore()``) puts back the state from before that ``apply`` call, exactly; a second
    call does nothing. ``transform_prompt(prompt)`` gives the text a caller should score instead of
    ``prompt``: the identity for weight editors, "demonstrations + new facts + prompt" for IKE. An evaluation
    harness calls it for every method and never branches on the method.

    Attributes:
        method: the method name.
        prompt_prefix: the text IKE puts before every query ("" for the others).
    """

    def __init__(
        self,
        method: str,
        undo: Callable[[], None],
        prompt_fn: Callable[[str], str] | None = None,
        prompt_prefix: str = "",
    ) -> None:
        self.method = method
        self.prompt_prefix = prompt_prefix
        self._undo = undo
        self._prompt_fn = prompt_fn
        self._done = False

    def __call__(self) -> None:
        """Undo the edit (idempotent)."""
        if not self._done:
            self._undo()
            self._done = True

    restore = __call__

    @property
    def restored(self) -> bool:
        """Whether the edit has been undone."""
        return self._done

    def transform_prompt(self, prompt: str) -> str:
        """The query text to feed the edited model in place of ``prompt``."""
        return self._prompt_fn(prompt) if self._prompt_fn is not None else prompt

    @staticmethod
    def chain(method: str, handles: Sequence[EditHandle]) -> EditHandle:
        """One handle that undoes ``handles`` in reverse order (for sequential weight edits)."""
        handles = list(handles)

        def undo() -> None:
            for h in reversed(handles):
                h()

        return EditHandle(method, undo)


def backup_weights(params: dict[str, nn.Parameter]) -> Callable[[], None]:
    """Clone ``params`` now; the returned function copies the clones back (bit-identical)."""
    saved = {name: p.detach().clone() for name, p in params.items()}

    def undo() -> None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])

    return undo


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires grad inside the block; flags and train/eval mode are restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def encode(tok, text: str) -> list[int]:
    """Token ids of ``text`` as the tokenizer encodes a prompt (with its special tokens, e.g. BOS)."""
    return list(tok(text)["input_ids"])


def target_ids(tok, target: str) -> list[int]:
    """Token ids of " target" (leading space, no special tokens); ValueError if empty."""
    ids = list(tok(" " + target.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} encodes to no tokens")
    return ids


def lookup_index(tok, prefix: str, template: str, subject: str, fact_token: str) -> int:
    """Position of the lookup token in ``encode(prefix + template.format(subject))``.

    Args:
        prefix: a context prefix ("" for the bare prompt).
        template: the prompt with ``{}`` for the subject.
        subject: the subject.
        fact_token: ``"subject_last"`` (the subject's last token) or ``"last"`` (the prompt's last token).

    Raises:
        ValueError: unknown ``fact_token`` or a template without ``{}``.
    """
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{}}' for the subject")
    if fact_token == "last":
        return len(encode(tok, prefix + template.format(subject))) - 1
    if fact_token == "subject_last":
        head = template[: template.index("{}")]
        return len(encode(tok, prefix + head + subject)) - 1
    raise ValueError(f"fact_token must be 'subject_last' or 'last', got {fact_token!r}")


@dataclass
class LMBatch:
    """Right-padded prompts, optionally followed by a target.

    Attributes:
        input_ids: (B, T).
        attention_mask: (B, T), 1 on real tokens.
        labels: (B, T), the next-token target at each position, -100 where there is none.
        lookup: (B,), the position where a module's output is read or edited.
        last: (B,), the last prompt token's position (where the first target token is predicted).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    lookup: torch.Tensor
    last: torch.Tensor


def build_batch(
    tok,
    prompts: Sequence[str],
    lookups: Sequence[int],
    targets: Sequence[list[int] | None],
    device: torch.device,
) -> LMBatch:
    """Build an ``LMBatch``; ``targets[i]`` None means no target (e.g. the KL prompt)."""
    rows, labels, last = [], [], []
    for prompt, target in zip(prompts, targets, strict=True):
        ids = encode(tok, prompt)
        tgt = target or []
        row = ids + tgt[:-1]
        lab = [-100] * len(row)
        for j, t in enumerate(tgt):
            lab[len(ids) - 1 + j] = t  # position len(ids)-1+j predicts target token j
        rows.append(row)
        labels.append(lab)
        last.append(len(ids) - 1)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    lab_t = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T)
    for i, (row, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        lab_t[i, : len(lab)] = torch.tensor(lab)
    return LMBatch(
        input_ids.to(device),
        mask.to(device),
        lab_t.to(device),
        torch.tensor(list(lookups), device=device),
        torch.tensor(last, device=device),
    )


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over each row's labelled positions.

    Args:
        logits: (B, T, V).
        labels: (B, T), -100 = ignore.

    Returns:
        (B,) mean NLL per row (0 for rows without labels).
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    mask = labels != -100  # (B, T)
    tok_lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return -(tok_lp * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)


def context_prefixes(
    model: nn.Module, tok, fixed: Sequence[str], n_generated: int, length: int, seed: int
) -> list[str]:
    """``[""] + fixed`` (deduplicated) plus ``n_generated`` short texts sampled from the model.

    Sampling uses its own seed inside ``torch.random.fork_rng``, so the caller's RNG state is untouched.
    """
    prefixes = list(dict.fromkeys(["", *fixed]))
    if n_generated <= 0:
        return prefixes
    device = model_device(model)
    starts = ["The", "Therefore", "Because", "I", "You", "It", "In"]
    devices = [device.index or 0] if device.type == "cuda" else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for i in range(n_generated):
            ids = torch.tensor([encode(tok, starts[i % len(starts)])], device=device)  # (1, T)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=length,
                do_sample=True,
                top_k=5,
                pad_token_id=pad,
            )  # (1, T + length)
            text = tok.decode(out[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
            prefixes.append(" ".join(text.split()) + ". ")
    return prefixes


@torch.no_grad()
def module_at_lookup(
    model: nn.Module,
    tok,
    requests: Sequence[EditRequest],
    module_name: str,
    prefixes: Sequence[str],
    fact_token: str,
    which: str = "input",
) -> torch.Tensor:
    """A module's input or output at each request's lookup token, averaged over ``prefixes``.

    Returns:
        (n_requests, d) float32.
    """
    device = model_device(model)
    out = []
    for req in requests:
        prompts = [p + req.full_prompt for p in prefixes]
        lookups = [lookup_index(tok, p, req.prompt, req.subject, fact_token) for p in prefixes]
        batch = build_batch(tok, prompts, lookups, [None] * len(prompts), device)
        with Trace(model, module_name, retain_input=which == "input", retain_output=which == "output") as tr:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        acts = tr.input if which == "input" else tr.output  # (P, T, d)
        rows = acts[torch.arange(len(prompts), device=device), batch.lookup]  # (P, d)
        out.append(rows.float().mean(0))
    return torch.stack(out)  # (n, d)


def optimize_delta(
    model: nn.Module,
    tok,
    request: EditRequest,
    hp: ROMEHyperParams,
    module_name: str,
    prefixes: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Find delta such that adding it to ``module_name``'s output at the lookup token makes target_new likely.

    Loss (ROME): NLL(target_new | prefix + prompt) averaged over prefixes
    + kl_factor * KL(p_orig || p_edit) at the last token of the essence prompt
    + v_weight_decay * ||delta||^2 / ||v_init||^2, with ||delta|| clamped to clamp_norm_factor * ||v_init||.

    Args:
        prefixes: context prefixes; the first must be "" (the bare prompt).

    Returns:
        (delta, v_init): both (d,) float32; v_init is the module's output at the bare prompt's lookup token.
    """
    device = model_device(model)
    tgt = target_ids(tok, request.target_new)
    prompts = [p + request.full_prompt for p in prefixes]
    lookups = [lookup_index(tok, p, request.prompt, request.subject, hp.fact_token) for p in prefixes]
    essence = hp.essence_prompt.format(request.subject)
    prompts.append(essence)
    lookups.append(lookup_index(tok, "", hp.essence_prompt, request.subject, hp.fact_token))
    batch = build_batch(tok, prompts, lookups, [tgt] * (len(prompts) - 1) + [None], device)
    n_rw = len(prompts) - 1
    rows = torch.arange(len(prompts), device=device)

    delta: torch.Tensor | None = None
    v_init: torch.Tensor | None = None
    kl_ref: torch.Tensor | None = None

    def edit(out: torch.Tensor, _name: str) -> torch.Tensor:
        nonlocal v_init, delta
        if v_init is None:
            v_init = out[0, lookups[0]].detach().float().clone()  # (d,)
            delta = torch.zeros_like(v_init, requires_grad=True)
        out = out.clone()
        out[rows, batch.lookup] = out[rows, batch.lookup] + delta.to(out.dtype)  # (B, d) at lookup tokens
        return out

    opt: torch.optim.Optimizer | None = None
    with frozen(model):
        for step in range(hp.v_num_grad_steps):
            with Trace(model, module_name, retain_output=False, edit_output=edit, detach=False):
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
            if opt is None:
                opt = torch.optim.Adam([delta], lr=hp.v_lr)
            nll = target_nll(logits[:n_rw], batch.labels[:n_rw]).mean()
            kl_logp = F.log_softmax(logits[n_rw, batch.last[n_rw]].float(), dim=-1)  # (V,)
            if kl_ref is None:
                kl_ref = kl_logp.detach()
            kl = F.kl_div(kl_logp, kl_ref, log_target=True, reduction="sum")
            decay = hp.v_weight_decay * delta.norm() ** 2 / v_init.norm() ** 2
            loss = nll + hp.kl_factor * kl + decay
            logger.debug(
                "step %d: loss %.3f (nll %.3f, kl %.4f, decay %.4f)",
                step, loss.item(), nll.item(), kl.item(), decay.item(),
            )
            if nll.item() < hp.nll_stop:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                max_norm = hp.clamp_norm_factor * v_init.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    logger.info("value search for %r: target NLL %.3f, |delta| / |v| = %.2f", request.sentence, nll.item(),
                (delta.norm() / v_init.norm()).item())
    return delta.detach(), v_init
