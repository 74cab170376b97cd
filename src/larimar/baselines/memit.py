"""MEMIT (Meng et al., 2023): many facts at once, the change spread over the MLPs of several layers.

For each fact i a target hidden state z_i at the output of the last edited layer L is found as in ROME
(``optimize_delta`` on that block's output). Then, for each edited layer l in ascending order, with keys
K (n, d_in) at the subjects' last tokens (averaged over context prefixes) and the current hidden states
h_L (n, d) at layer L's output:

    R = (z - h_L) / (number of edited layers left)                    (n, d)
    Delta W_l = R^T K (lambda C_l + K^T K)^-1                         (d_out, d_in)

with C_l = E[k k^T] from ``stats.layer_stats`` and lambda = ``mom2_update_weight``.
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
from larimar.baselines.hparams import MEMITHyperParams, arch_spec, resolve_layer
from larimar.baselines.nethook import get_module
from larimar.baselines.stats import layer_stats
from larimar.facts import EditRequest

logger = logging.getLogger(__name__)


def apply_memit(
    model: nn.Module, tok, requests: Sequence[EditRequest], hparams: MEMITHyperParams
) -> tuple[nn.Module, EditHandle]:
    """Apply MEMIT to ``model`` in place, all requests in one batch.

    Args:
        model: a causal LM whose ``config.model_type`` is in ``ARCHITECTURES``.
        tok: its tokenizer.
        requests: the facts to write.
        hparams: ``MEMITHyperParams``.

    Returns:
        (model, restore): the same model object, edited; ``restore()`` puts back the original weights.

    Raises:
        ValueError: no requests, no layers, or bad hyper-parameters.
    """
    if not requests:
        raise ValueError("apply_memit needs at least one EditRequest")
    if not hparams.layers:
        raise ValueError("MEMIT needs a non-empty 'layers' list")
    if hparams.v_num_grad_steps < 1:
        raise ValueError("v_num_grad_steps must be >= 1")
    spec = arch_spec(model)
    layers = sorted({resolve_layer(model, idx) for idx in hparams.layers})
    names = [spec.mlp_down.format(idx) for idx in layers]
    weights = {n: get_module(model, n).weight for n in names}
    undo = backup_weights({n + ".weight": w for n, w in weights.items()})
    z_name = spec.layer.format(layers[-1])

    prefixes = context_prefixes(
        model, tok, hparams.context_prefixes, hparams.n_generated_prefixes, hparams.generated_prefix_len, hparams.seed
    )
    z_targets = []
    for req in requests:
        delta, z_init = optimize_delta(model, tok, req, hparams, z_name, prefixes)  # (d,), (d,)
        z_targets.append(z_init + delta)
    z = torch.stack(z_targets)  # (n, d)

    for i, (layer, name) in enumerate(zip(layers, names)):
        mom2 = layer_stats(model, tok, name, hparams.stats_corpus, hparams.stats_n_tokens, hparams.stats_seq_len)
        keys = module_at_lookup(model, tok, requests, name, prefixes, hparams.fact_token, "input").double()  # (n, d_in)
        cur = module_at_lookup(model, tok, requests, z_name, [""], hparams.fact_token, "output")  # (n, d)
        resid = ((z - cur) / (len(layers) - i)).double()  # (n, d)
        c = mom2.double()
        c = c + hparams.cov_ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        a = hparams.mom2_update_weight * c + keys.T @ keys  # (d_in, d_in)
        upd = torch.linalg.solve(a, keys.T @ resid).T  # (d, d_in) = R^T K A^-1  (A symmetric)
        w = weights[name]
        with torch.no_grad():
            w.add_((upd.T if spec.transposed else upd).to(w.dtype))
        logger.info("MEMIT: layer %d, |residual| %.3g, |update| %.3g", layer, resid.norm().item(), upd.norm().item())
    return model, EditHandle("memit", undo)
