"""FT-L (as in ROME's comparison): constrained fine-tuning of one layer's MLP down-projection.

A few Adam steps on the mean NLL of target_new after each request's prompt, updating only
``ArchSpec.mlp_down`` of ``layer``; after each step every weight is clamped to within +-``norm_constraint``
of its original value (an L-infinity ball).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from larimar.baselines.common import (
    EditHandle,
    backup_weights,
    build_batch,
    model_device,
    target_ids,
    target_nll,
)
from larimar.baselines.hparams import FTHyperParams, arch_spec, resolve_layer
from larimar.baselines.nethook import get_module
from larimar.facts import EditRequest

logger = logging.getLogger(__name__)


def apply_ft(
    model: nn.Module, tok, requests: Sequence[EditRequest], hparams: FTHyperParams
) -> tuple[nn.Module, EditHandle]:
    """Fine-tune one MLP down-projection of ``model`` in place on all requests together.

    Args:
        model: a causal LM whose ``config.model_type`` is in ``ARCHITECTURES``.
        tok: its tokenizer.
        requests: the facts to write.
        hparams: ``FTHyperParams``.

    Returns:
        (model, restore): the same model object, edited; ``restore()`` puts back the original weight.

    Raises:
        ValueError: no requests or ``num_steps < 1``.
    """
    if not requests:
        raise ValueError("apply_ft needs at least one EditRequest")
    if hparams.num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    name = arch_spec(model).mlp_down.format(resolve_layer(model, hparams.layer))
    weight = get_module(model, name).weight
    undo = backup_weights({name + ".weight": weight})
    orig = weight.detach().clone()
    device = model_device(model)
    prompts = [r.full_prompt for r in requests]
    batch = build_batch(tok, prompts, [0] * len(prompts), [target_ids(tok, r.target_new) for r in requests], device)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(p is weight)
    opt = torch.optim.AdamW([weight], lr=hparams.lr, weight_decay=hparams.weight_decay)
    try:
        for step in range(hparams.num_steps):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
            loss = target_nll(logits, batch.labels).mean()
            logger.debug("FT-L step %d: NLL %.3f", step, loss.item())
            if loss.item() < hparams.nll_stop:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                c = hparams.norm_constraint
                weight.copy_(torch.clamp(weight, orig - c, orig + c))
    finally:
        weight.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    logger.info("FT-L on %s: final target NLL %.3f", name, loss.item())
    return model, EditHandle("ft", undo)
