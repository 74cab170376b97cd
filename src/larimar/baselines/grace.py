"""GRACE (Hartvigsen et al., 2023): a growing codebook at one layer's MLP output.

The adaptor sits on ``model.layers.{layer}.mlp`` (per ``ArchSpec.mlp``) as a forward hook. Each entry has a
key k (the MLP input at the last token of an edited prompt, d), a value v (d) and a deferral radius eps.
At every position t of every input, with query q_t = MLP input at t:

    j = argmin_i ||q_t - k_i|| / ||k_i||;   output_t = v_j  if  ||q_t - k_j|| / ||k_j|| <= eps_j  else  MLP(q_t).

Matching per position needs no prompt length: in a causal model the last prompt token's input is the same
whether or not an answer follows it. Values are trained by gradient steps (value replaced at the last prompt
token only) so the model predicts target_new. Codebook rules (GRACE): a new key farther than
eps_j + eps from its nearest key j is added; a nearer one with the same target widens eps_j; one with another
target is added and both radii shrink to half the distance.

Sequential use: call ``apply_grace`` again without restoring; the same codebook grows. ``restore()`` puts the
codebook back as it was before that call, and removes the hook if that call created it.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from larimar.baselines.common import (
    EditHandle,
    build_batch,
    frozen,
    lookup_index,
    model_device,
    target_ids,
    target_nll,
)
from larimar.baselines.hparams import GRACEHyperParams, arch_spec, resolve_layer
from larimar.baselines.nethook import Trace, get_module
from larimar.facts import EditRequest

logger = logging.getLogger(__name__)


class GraceCodebook:
    """Keys, values, radii and target labels of one GRACE adaptor, and its forward hook.

    Attributes:
        keys: (n, d).
        values: (n, d).
        eps: (n,) relative radii.
        labels: n target strings.
    """

    def __init__(self, module: nn.Module, d: int, device: torch.device) -> None:
        self.keys = torch.zeros(0, d, device=device, dtype=torch.float32)
        self.values = torch.zeros(0, d, device=device, dtype=torch.float32)
        self.eps = torch.zeros(0, device=device, dtype=torch.float32)
        self.labels: list[str] = []
        self.enabled = True
        self._handle = module.register_forward_hook(self._hook)

    def __len__(self) -> int:
        return len(self.labels)

    def nearest(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Relative distance to, and index of, the nearest key for each row of q (..., d)."""
        flat = q.reshape(-1, q.shape[-1]).float()  # (N, d)
        dist = torch.cdist(flat, self.keys) / self.keys.norm(dim=-1).clamp(min=1e-8)  # (N, n)
        best, idx = dist.min(dim=-1)  # (N,), (N,)
        return best.reshape(q.shape[:-1]), idx.reshape(q.shape[:-1])

    def _hook(self, _mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled or len(self) == 0:
            return output
        best, idx = self.nearest(args[0])  # (B, T), (B, T)
        hit = best <= self.eps[idx]  # (B, T)
        if not hit.any():
            return output
        return torch.where(hit.unsqueeze(-1), self.values[idx].to(output.dtype), output)  # (B, T, d)

    def add(self, key: torch.Tensor, value: torch.Tensor, eps: float, label: str) -> None:
        """Insert an entry following GRACE's expand / split rules."""
        key, value = key.float().reshape(1, -1), value.float().reshape(1, -1)
        if len(self):
            best, j = self.nearest(key)
            dist, j = best.item(), int(j.item())
            if dist <= self.eps[j].item() + eps:
                if self.labels[j] == label:
                    self.eps[j] = max(self.eps[j].item(), dist + eps)  # same answer: widen and keep
                    return
                self.eps[j] = dist / 2  # conflict: split the space between the two keys
                eps = dist / 2
        self.keys = torch.cat([self.keys, key])
        self.values = torch.cat([self.values, value])
        self.eps = torch.cat([self.eps, torch.tensor([eps], device=self.eps.device)])
        self.labels.append(label)

    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """A copy of (keys, values, eps, labels)."""
        return self.keys.clone(), self.values.clone(), self.eps.clone(), list(self.labels)

    def load_state(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]) -> None:
        """Put back a ``state()`` copy."""
        self.keys, self.values, self.eps, labels = state
        self.labels = list(labels)

    def remove(self) -> None:
        """Remove the hook."""
        self._handle.remove()


_CODEBOOKS: weakref.WeakKeyDictionary[nn.Module, GraceCodebook] = weakref.WeakKeyDictionary()


def grace_codebook(model: nn.Module, layer: int) -> GraceCodebook | None:
    """The codebook installed at ``layer``'s MLP, if any."""
    module = get_module(model, arch_spec(model).mlp.format(resolve_layer(model, layer)))
    return _CODEBOOKS.get(module)


def _train_value(
    model: nn.Module, tok, req: EditRequest, hp: GRACEHyperParams, module_name: str, init: torch.Tensor
) -> torch.Tensor:
    """Optimise the MLP output at the last prompt token so that target_new follows. Returns (d,)."""
    device = model_device(model)
    pos = lookup_index(tok, "", req.prompt, req.subject, "last")
    batch = build_batch(tok, [req.full_prompt], [pos], [target_ids(tok, req.target_new)], device)
    value = init.detach().clone().requires_grad_(True)  # (d,)
    opt = torch.optim.Adam([value], lr=hp.lr)

    def edit(out: torch.Tensor, _name: str) -> torch.Tensor:
        out = out.clone()
        out[0, pos] = value.to(out.dtype)
        return out

    with frozen(model):
        for _ in range(hp.n_iter):
            with Trace(model, module_name, retain_output=False, edit_output=edit, detach=False):
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (1, T, V)
            nll = target_nll(logits, batch.labels).mean()
            if nll.item() < hp.nll_stop:
                break
            opt.zero_grad()
            nll.backward()
            opt.step()
    logger.info("GRACE value for %r: target NLL %.3f", req.sentence, nll.item())
    return value.detach()


def apply_grace(
    model: nn.Module, tok, requests: Sequence[EditRequest], hparams: GRACEHyperParams
) -> tuple[nn.Module, EditHandle]:
    """Add the requests to the GRACE codebook at ``hparams.layer`` (created on first use).

    Args:
        model: a causal LM whose ``config.model_type`` is in ``ARCHITECTURES``.
        tok: its tokenizer.
        requests: the facts to write, one after another.
        hparams: ``GRACEHyperParams``.

    Returns:
        (model, restore): the same model object with the hook; ``restore()`` undoes this call (weights are
        never changed).

    Raises:
        ValueError: no requests or ``n_iter < 1``.
    """
    if not requests:
        raise ValueError("apply_grace needs at least one EditRequest")
    if hparams.n_iter < 1:
        raise ValueError("n_iter must be >= 1")
    name = arch_spec(model).mlp.format(resolve_layer(model, hparams.layer))
    module = get_module(model, name)
    book = _CODEBOOKS.get(module)
    created = book is None
    device = model_device(model)
    before = None if created else book.state()

    for req in requests:
        pos = lookup_index(tok, "", req.prompt, req.subject, "last")
        batch = build_batch(tok, [req.full_prompt], [pos], [None], device)
        with torch.no_grad(), Trace(model, name, retain_input=True) as tr:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        key, init = tr.input[0, pos].float(), tr.output[0, pos].float()  # (d,), (d,)
        if book is None:
            book = GraceCodebook(module, key.shape[-1], device)
            _CODEBOOKS[module] = book
        value = _train_value(model, tok, req, hparams, name, init)
        book.add(key, value, hparams.eps, req.target_new.strip())

    def undo() -> None:
        if created:
            book.remove()
            _CODEBOOKS.pop(module, None)
        else:
            book.load_state(before)

    return model, EditHandle("grace", undo)
