"""ROME (Meng et al., 2022): a rank-one edit of one MLP down-projection per fact.

For a fact (s, r, o*): the key k* is the down-projection's input at the subject's last token, averaged over
a few context prefixes, and k is the same on the bare prompt; a vector delta added to the module's output
there is optimised so the model predicts o* (``common.optimize_delta``); the update

    Delta W = delta (C^-1 k*)^T / ((C^-1 k*)^T k)          (d_out, d_in)

maps k exactly to W k + delta (as ROME does) along the direction C^-1 k*, which among rank-one updates
disturbs the keys seen in text the least; C = E[k k^T] from ``stats.layer_stats``. Requests are applied one
after another.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from larimar.baselines.common import (
    EditHandle,
    backup_weights,
    context_prefixes,
    module_at_lookup,
    optimize_delta,
)
from larimar.baselines.hparams import ROMEHyperParams, arch_spec, resolve_layer
from larimar.baselines.nethook import get_module
from larimar.baselines.stats import inverse_cov_times, layer_stats
from larimar.facts import EditRequest

logger = logging.getLogger(__name__)


def apply_rome(
    model: nn.Module, tok, requests: Sequence[EditRequest], hparams: ROMEHyperParams
) -> tuple[nn.Module, EditHandle]:
    """Apply ROME to ``model`` in place, one request after another.

    Args:
        model: a causal LM whose ``config.model_type`` is in ``ARCHITECTURES``.
        tok: its tokenizer.
        requests: the facts to write.
        hparams: ``ROMEHyperParams``.

    Returns:
        (model, restore): the same model object, edited; ``restore()`` puts back the original weight.

    Raises:
        ValueError: no requests, or bad hyper-parameters.
    """
    if not requests:
        raise ValueError("apply_rome needs at least one EditRequest")
    if hparams.v_num_grad_steps < 1:
        raise ValueError("v_num_grad_steps must be >= 1")
    spec = arch_spec(model)
    name = spec.mlp_down.format(resolve_layer(model, hparams.layer))
    weight = get_module(model, name).weight
    undo = backup_weights({name + ".weight": weight})

    mom2 = layer_stats(model, tok, name, hparams.stats_corpus, hparams.stats_n_tokens, hparams.stats_seq_len)
    prefixes = context_prefixes(
        model, tok, hparams.context_prefixes, hparams.n_generated_prefixes, hparams.generated_prefix_len, hparams.seed
    )
    for req in requests:
        k_avg = module_at_lookup(model, tok, [req], name, prefixes, hparams.fact_token, "input")[0]  # (d_in,)
        k_bare = module_at_lookup(model, tok, [req], name, [""], hparams.fact_token, "input")[0]  # (d_in,)
        delta, _ = optimize_delta(model, tok, req, hparams, name, prefixes)  # (d_out,)
        u = inverse_cov_times(mom2, k_avg, hparams.cov_ridge)  # (d_in,) = C^-1 k*
        upd = torch.outer(delta, u) / (u @ k_bare)  # (d_out, d_in)
        with torch.no_grad():
            weight.add_((upd.T if spec.transposed else upd).to(weight.dtype))
        logger.info("ROME: %s <- rank-one update of norm %.3g for %r", name, upd.norm().item(), req.sentence)
    return model, EditHandle("rome", undo)
