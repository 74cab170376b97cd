"""Baseline knowledge editors under one method contract (ROME's).

Every method is a function

    apply_<method>(model, tok, requests: list[EditRequest], hparams) -> (edited_model, restore)

that edits ``model`` in place and returns it with an ``EditHandle``: ``restore()`` puts back the state from
before the call exactly (bit-identical weights; GRACE's hook / codebook), and
``restore.transform_prompt(prompt)`` is the text to score for a query (the identity except for IKE, which
edits by prepending demonstrations and the new facts; see ``ike``).

Methods (``METHODS``):
    rome    rank-one update of one MLP down-projection (``rome``).
    memit   batch update spread over several layers' MLPs (``memit``).
    grace   codebook adaptor at one layer's MLP output, growing over calls (``grace``).
    ft      FT-L: L-infinity-constrained fine-tuning of one MLP down-projection (``ft``).
    ike     in-context editing, no weight change (``ike``).

Hyper-parameters are dataclasses (``hparams``) loaded from one YAML file per (method, model) under
``configs/baselines/``; architecture differences are data (``hparams.ARCHITECTURES``, by ``model_type``).

Sequential editing: call ``apply_method`` (or ``apply_<method>``) again without restoring; edits accumulate
(GRACE's codebook grows). Undo in reverse order, or use ``apply_method(..., sequential=True)``, which applies
the requests one call each and returns a single handle undoing all of them. Usage::

    hp = load_hparams("rome", "configs/baselines/rome_smollm2-135m.yaml")
    model, restore = apply_method("rome", model, tok, [request], hp)
    ...score restore.transform_prompt(prompt) with model...
    restore()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from larimar.baselines.common import EditHandle
from larimar.baselines.ft import apply_ft
from larimar.baselines.grace import apply_grace
from larimar.baselines.hparams import (
    ARCHITECTURES,
    HPARAMS_CLASSES,
    ArchSpec,
    FTHyperParams,
    GRACEHyperParams,
    IKEHyperParams,
    MEMITHyperParams,
    ROMEHyperParams,
    load_hparams,
)
from larimar.baselines.ike import apply_ike
from larimar.baselines.memit import apply_memit
from larimar.baselines.rome import apply_rome
from larimar.facts import EditRequest

ApplyFn = Callable[[nn.Module, Any, Sequence[EditRequest], Any], tuple[nn.Module, EditHandle]]

METHODS: dict[str, ApplyFn] = {
    "rome": apply_rome,
    "memit": apply_memit,
    "grace": apply_grace,
    "ft": apply_ft,
    "ike": apply_ike,
}

STATELESS_METHODS = frozenset({"ike"})
"""Methods whose sequential use is the same as one batch (IKE puts every fact in the prompt prefix)."""


def apply_method(
    name: str,
    model: nn.Module,
    tok,
    requests: Sequence[EditRequest],
    hparams: Any | str | Path | None = None,
    sequential: bool = False,
) -> tuple[nn.Module, EditHandle]:
    """Apply the editor ``name`` (a key of ``METHODS``).

    Args:
        name: ``"rome"``, ``"memit"``, ``"grace"``, ``"ft"`` or ``"ike"``.
        model: the causal LM, edited in place.
        tok: its tokenizer.
        requests: the facts.
        hparams: the method's dataclass, a YAML path, or None for the dataclass defaults.
        sequential: apply the requests one ``apply`` call each, edits accumulating; the returned handle
            undoes all of them. It changes MEMIT (one batch solve otherwise) and FT-L (one joint
            fine-tune otherwise); ROME and GRACE already take requests one after another; IKE puts every
            fact in the prompt either way.

    Returns:
        (model, restore) as in the method contract.

    Raises:
        KeyError: unknown method name.
    """
    if name not in METHODS:
        raise KeyError(f"unknown editing method {name!r}; expected one of {sorted(METHODS)}")
    if hparams is None or isinstance(hparams, (str, Path)):
        hparams = load_hparams(name, hparams)
    fn = METHODS[name]
    if not sequential or name in STATELESS_METHODS:
        return fn(model, tok, requests, hparams)
    handles = []
    try:
        for req in requests:
            model, handle = fn(model, tok, [req], hparams)
            handles.append(handle)
    except BaseException:
        EditHandle.chain(name, handles)()  # leave the model as we found it
        raise
    return model, EditHandle.chain(name, handles)


__all__ = [
    "ARCHITECTURES",
    "HPARAMS_CLASSES",
    "METHODS",
    "STATELESS_METHODS",
    "ApplyFn",
    "ArchSpec",
    "EditHandle",
    "FTHyperParams",
    "GRACEHyperParams",
    "IKEHyperParams",
    "MEMITHyperParams",
    "ROMEHyperParams",
    "apply_ft",
    "apply_grace",
    "apply_ike",
    "apply_memit",
    "apply_method",
    "apply_rome",
    "load_hparams",
]
