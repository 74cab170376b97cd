"""Hyper-parameters of the baseline editors and the architecture data they need.

Each method has one dataclass; one YAML file per (method, model) under ``configs/baselines/`` holds its
values (``load_hparams("rome", "configs/baselines/rome_smollm2-135m.yaml")``). Architecture differences are
data: ``ARCHITECTURES`` maps a config's ``model_type`` to module-name templates, never a model-name substring.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_PREFIXES: list[str] = [
    "",
    "The following is true. ",
    "I read this today. ",
    "Here is a fact. ",
    "According to the records, ",
]
"""Fixed context prefixes put before a prompt when averaging keys / optimising values ("" = the bare prompt)."""


@dataclass(frozen=True)
class ArchSpec:
    """Module-name templates of one decoder family (``{}`` is the layer index).

    Attributes:
        layer: a transformer block; its output is the residual stream after the block.
        mlp: the block's MLP; its input is the normalised hidden state (d_model).
        mlp_down: the MLP's output projection; its input is the key space (d_ff), its weight is edited.
        transposed: True when ``mlp_down`` stores its weight as (in, out) (GPT-2's Conv1D), False for
            ``nn.Linear`` (out, in).
    """

    layer: str
    mlp: str
    mlp_down: str
    transposed: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers.{}", "model.layers.{}.mlp", "model.layers.{}.mlp.down_proj"),
    "mistral": ArchSpec("model.layers.{}", "model.layers.{}.mlp", "model.layers.{}.mlp.down_proj"),
    "qwen2": ArchSpec("model.layers.{}", "model.layers.{}.mlp", "model.layers.{}.mlp.down_proj"),
    "qwen3": ArchSpec("model.layers.{}", "model.layers.{}.mlp", "model.layers.{}.mlp.down_proj"),
    "gemma": ArchSpec("model.layers.{}", "model.layers.{}.mlp", "model.layers.{}.mlp.down_proj"),
    "gpt2": ArchSpec("transformer.h.{}", "transformer.h.{}.mlp", "transformer.h.{}.mlp.c_proj", transposed=True),
    "gptj": ArchSpec("transformer.h.{}", "transformer.h.{}.mlp", "transformer.h.{}.mlp.fc_out"),
    "gpt_neox": ArchSpec("gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The ``ArchSpec`` of ``model`` from ``model.config.model_type``.

    Raises:
        KeyError: when the model type is not in ``ARCHITECTURES``.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise KeyError(
            f"no module templates for model_type {model_type!r}; expected one of {sorted(ARCHITECTURES)} "
            "(add an ArchSpec to larimar.baselines.hparams.ARCHITECTURES)"
        )
    return ARCHITECTURES[model_type]


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks (``config.num_hidden_layers``)."""
    return int(model.config.num_hidden_layers)


def resolve_layer(model: nn.Module, layer: int) -> int:
    """A layer index, negative counting from the end; ValueError when out of range."""
    n = num_layers(model)
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise ValueError(f"layer {layer} out of range for a model with {n} layers")
    return idx


@dataclass
class StatsHyperParams:
    """Where the MLP-input second moment C = E[k k^T] comes from (shared by ROME and MEMIT).

    Attributes:
        stats_corpus: ``"wikipedia_en"`` (the shared Wikipedia training text) or a path to a ``.jsonl``
            file with a ``"text"`` field per line, or a ``.txt`` file with one text per line.
        stats_n_tokens: how many token positions to average over.
        stats_seq_len: texts are cut to this many tokens.
        cov_ridge: ridge added to C before solving, relative to its mean diagonal (small samples make C
            singular).
    """

    stats_corpus: str = "wikipedia_en"
    stats_n_tokens: int = 100_000
    stats_seq_len: int = 256
    cov_ridge: float = 1e-3


@dataclass
class ROMEHyperParams(StatsHyperParams):
    """ROME: a rank-one update of one layer's MLP down-projection.

    Attributes:
        layer: the edited layer (negative counts from the end).
        fact_token: ``"subject_last"`` (the key is read at the subject's last token) or ``"last"``.
        context_prefixes: fixed prefixes put before the prompt; keys are averaged over them and the value is
            optimised on all of them. ``""`` is the bare prompt.
        n_generated_prefixes: extra prefixes sampled from the model itself (``generated_prefix_len`` tokens).
        v_num_grad_steps: Adam steps optimising the value.
        v_lr: their learning rate.
        v_weight_decay: penalty on ||delta||^2 / ||v_init||^2.
        clamp_norm_factor: ||delta|| is kept <= this times ||v_init||.
        kl_factor: weight of KL(original || edited) on the essence prompt ``essence_prompt``.
        essence_prompt: the KL prompt with ``{}`` for the subject.
        nll_stop: stop optimising once the target NLL is below this.
        seed: seeds the prefix generator only (global RNG state is restored).
    """

    layer: int = 5
    fact_token: str = "subject_last"
    context_prefixes: list[str] = field(default_factory=lambda: list(DEFAULT_CONTEXT_PREFIXES))
    n_generated_prefixes: int = 0
    generated_prefix_len: int = 8
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    essence_prompt: str = "{} is a"
    nll_stop: float = 0.05
    seed: int = 0


@dataclass
class MEMITHyperParams(ROMEHyperParams):
    """MEMIT: the residual of each fact spread over the MLPs of ``layers``.

    Attributes:
        layers: the edited layers, ascending; the target hidden state is set at the output of the last.
        mom2_update_weight: lambda in  Delta = R K^T (lambda C + K K^T)^-1  (a pseudo-count for the prior).
        (The other fields are as in ROME; ``layer`` is unused.)
    """

    layers: list[int] = field(default_factory=lambda: [3, 4, 5])
    mom2_update_weight: float = 15000.0


@dataclass
class GRACEHyperParams:
    """GRACE: a codebook at one layer's MLP output (keys, values, deferral radii).

    Attributes:
        layer: the layer whose MLP output is replaced when a key matches.
        eps: initial deferral radius, as a relative distance ||q - k|| / ||k||.
        n_iter: Adam steps training each value.
        lr: their learning rate.
        nll_stop: stop training a value once the target NLL is below this.
    """

    layer: int = 5
    eps: float = 0.1
    n_iter: int = 50
    lr: float = 1.0
    nll_stop: float = 0.01


@dataclass
class FTHyperParams:
    """FT-L: constrained fine-tuning of one layer's MLP down-projection.

    Attributes:
        layer: the fine-tuned layer.
        num_steps: Adam steps.
        lr: learning rate.
        norm_constraint: every weight stays within +-this of its original value (L-infinity ball).
        weight_decay: AdamW weight decay.
        nll_stop: stop once the mean target NLL is below this.
    """

    layer: int = 5
    num_steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4
    weight_decay: float = 0.0
    nll_stop: float = 0.01


@dataclass
class IKEHyperParams:
    """IKE: in-context editing (no weight change).

    Attributes:
        k: number of demonstrations put before the new fact.
        demonstrations_path: a CounterFact file in ROME format to draw demonstrations from (copy, update
            and retain examples, as in IKE); None means no demonstrations.
        seed: seeds the choice of demonstrations.
        fact_template: how the new fact is written (``{fact}`` = prompt with subject + target_new).
        query_template: how a query is written after the facts (``{prompt}``).
    """

    k: int = 8
    demonstrations_path: str | None = None
    seed: int = 0
    fact_template: str = "New Fact: {fact}\n"
    query_template: str = "Prompt: {prompt}"


HPARAMS_CLASSES: dict[str, type] = {
    "rome": ROMEHyperParams,
    "memit": MEMITHyperParams,
    "grace": GRACEHyperParams,
    "ft": FTHyperParams,
    "ike": IKEHyperParams,
}


def load_hparams(method: str, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Load a method's hyper-parameters from a YAML file.

    Args:
        method: one of ``HPARAMS_CLASSES`` (``"rome"``, ``"memit"``, ``"grace"``, ``"ft"``, ``"ike"``).
        path: the YAML file (a mapping of field -> value); None gives the dataclass defaults.
        overrides: field values that replace the file's (e.g. ``{"layer": 7}`` in a sweep).

    Returns:
        The method's dataclass instance.

    Raises:
        KeyError: unknown method.
        ValueError: unknown field in the file or the overrides, or a file that is not a mapping.
    """
    if method not in HPARAMS_CLASSES:
        raise KeyError(f"unknown method {method!r}; expected one of {sorted(HPARAMS_CLASSES)}")
    cls = HPARAMS_CLASSES[method]
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a YAML mapping of hyper-parameters, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {method} hyper-parameter(s) {unknown}; expected some of {sorted(known)}")
    return cls(**values)
