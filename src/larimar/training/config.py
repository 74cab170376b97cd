"""The typed config of a training run (`TrainConfig` and its sections) and its YAML loading with
``--section.key value`` overrides."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from larimar.model import LarimarConfig


@dataclass
class DataConfig:
    """Training text.

    Attributes:
        train_path: JSONL of Wikipedia articles (``{"id", "title", "text"}``), streamed (required; the configs name
            ``../shared/data/wikipedia_en/enwiki_2018_train.jsonl``).
        block_tokens: maximum decoder tokens per block (blocks are word-aligned runs of one paragraph).
        min_tokens: shorter blocks are dropped.
        episode_size: E, blocks written together into one memory.
        shuffle_buffer: blocks held for shuffling (streaming shuffle).
        prefix_query_prob: probability that a block is read back with a query made of a prefix of its words
            (as an editing query is the prompt of a written fact) instead of the block itself.
        prefix_frac: range of the fraction of words kept in a prefix query.
        prefix_loss: "all" scores every token of a block read back with a prefix query; "continuation" scores
            only the tokens after the prefix (the answer after an edit's prompt), where the read-out must carry
            what the decoder cannot guess from the prompt.
        split_sentences: cut paragraphs into sentences before blocking (short, fact-like items).
        prefetch: micro-batches prepared ahead by a background thread (0: prepared in the loop); the streaming
            tokenization then overlaps the accelerator's work. The batches are the same either way.
        workers: micro-batches prepared in worker processes (DataLoader workers, each ``prefetch`` ahead, at
            least 2) instead of this one, so that their Python work neither takes the interpreter lock from the
            training loop nor caps the step rate. 0 (default): in this process; 1: one worker, the same batches
            as 0; N >= 2: the paragraph stream is split into N shards (paragraph i to shard i mod N), worker
            k's shard makes micro-batches k, k + N, ...: another order of the same text, fixed by the seed and
            N, resumable.
        swap_prob: probability that an item becomes an edit-shaped counterfactual (`swap_names`): a name in it
            is replaced by a name from another item and the text cut after it; it is read back with the text
            before the name, and the loss scores the name alone.
    """

    train_path: str = ""
    block_tokens: int = 64
    min_tokens: int = 8
    episode_size: int = 16
    shuffle_buffer: int = 4096
    prefix_query_prob: float = 0.0
    prefix_frac: list[float] = field(default_factory=lambda: [0.3, 0.8])
    prefix_loss: str = "all"
    split_sentences: bool = False
    swap_prob: float = 0.0
    prefetch: int = 0
    workers: int = 0

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ValueError(f"data.prefetch must be >= 0, got {self.prefetch}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if self.prefix_loss not in ("all", "continuation"):
            raise ValueError(f"data.prefix_loss must be 'all' or 'continuation', got {self.prefix_loss!r}")
        if len(self.prefix_frac) != 2 or not 0.0 <= self.prefix_frac[0] <= self.prefix_frac[1] <= 1.0:
            raise ValueError(f"data.prefix_frac must be [low, high] with 0 <= low <= high <= 1, got {self.prefix_frac}")
        if not 0.0 <= self.swap_prob <= 1.0:
            raise ValueError(f"data.swap_prob must be in [0, 1], got {self.swap_prob}")


@dataclass
class OptimConfig:
    """Optimisation.

    Attributes:
        steps: optimizer steps.
        max_minutes: stop early after this wall time (0: no limit); the last state is saved.
        batch_episodes: episodes per optimizer step (global, over all processes and accumulation steps).
        grad_accum: micro-batches per optimizer step.
        lr: AdamW learning rate of the backbones' trained weights (LoRA, encoder, decoder).
        lr_new: learning rate of the new parameters (projections, memory prior), which start from scratch.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up, then cosine decay to 10 %.
        max_grad_norm: gradient clipping.
        schedule: "steps" runs the learning-rate and KL schedules over ``steps``; "time" runs them over
            ``max_minutes`` of wall time (a fixed time budget on hardware of unknown speed): the schedules' length
            is the number of steps projected from the elapsed fraction of the budget, at most ``steps``.
    """

    steps: int = 1000
    max_minutes: float = 0.0
    batch_episodes: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    lr_new: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    schedule: str = "steps"

    def __post_init__(self) -> None:
        if self.schedule not in ("steps", "time"):
            raise ValueError(f"optim.schedule must be 'steps' or 'time', got {self.schedule!r}")
        if self.schedule == "time" and self.max_minutes <= 0:
            raise ValueError("optim.schedule 'time' needs optim.max_minutes > 0")


@dataclass
class LossConfig:
    """Paper Eq. 1 weights and schedules.

    Attributes:
        rec: weight of CE(x | z_read).
        ae: weight of CE(x | z_enc).
        lm: weight of CE(x | z = 0); 0 skips that forward (with a frozen decoder it is a constant).
        beta_max: top of the cyclic KL weight.
        beta_cycles: cycles over the run (each: half at 0, a quarter ramping, a quarter flat).
        write_noise_std: std of the noise xi added to the latents when writing.
    """

    rec: float = 1.0
    ae: float = 1.0
    lm: float = 0.0
    beta_max: float = 0.5
    beta_cycles: int = 10
    write_noise_std: float = 0.0


PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved resolved into the run folder.

    Attributes:
        model: the Larimar model (backbones, C, K, what is trained).
        data: the training text.
        optim: optimisation.
        loss: loss weights.
        out_dir: run folder.
        seed: seed of data order, initialisation and sampling.
        device: "auto" (CUDA if available), "cpu" or "cuda".
        bf16: bf16 autocast on CUDA.
        log_every: steps between metric lines.
        save_every: steps between resumable checkpoints.
        resume: continue from ``out_dir/checkpoint`` if it exists.
        threads: torch CPU threads (0: torch's default).
        init_from: a model folder written by ``save_pretrained`` whose tensors initialise this run (e.g. to
            continue a frozen-decoder run with LoRA added); tensors it lacks keep their fresh init. A resumed
            run ignores it.
        parallel: with several processes (torchrun): "ddp" (every rank holds the whole model) or "fsdp"
            (`torch.distributed.fsdp.fully_shard` on each decoder layer and on the rest: parameters, gradients
            and optimizer moments sharded over the ranks, for decoders that do not fit one GPU). FSDP runs save
            the gathered weights at every checkpoint but do not resume (the optimizer state is not saved).
    """

    model: LarimarConfig = field(default_factory=LarimarConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    log_every: int = 10
    save_every: int = 100
    resume: bool = True
    threads: int = 0
    init_from: str | None = None
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what ``config.yaml`` holds)."""
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """The config from plain data (missing keys take their defaults).

        Raises:
            KeyError: an unknown key at the top level or in a section.
        """
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise KeyError(f"unknown config keys {sorted(unknown)}; expected some of {sorted(known)}")
        sections = {"data": DataConfig, "optim": OptimConfig, "loss": LossConfig}
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            if k == "model":
                kwargs[k] = LarimarConfig.from_dict(v or {})
            elif k in sections:
                kwargs[k] = _dataclass_from(sections[k], v or {}, k)
            else:
                kwargs[k] = v
        return cls(**kwargs)


def _dataclass_from(cls: type, d: dict[str, Any], where: str) -> Any:
    """``cls(**d)``, with a KeyError naming ``where`` for a key ``cls`` lacks."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise KeyError(f"unknown keys in {where}: {sorted(unknown)}; expected some of {sorted(names)}")
    return cls(**d)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (``1e-3``), as YAML 1.2 and Python do."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    """YAML text parsed with `_YamlLoader`."""
    return yaml.load(text, Loader=_YamlLoader)


def _coerce(value: str) -> Any:
    """A command-line override value parsed as YAML (numbers, booleans, null, lists)."""
    return _yaml_load(value)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Loads a YAML config and applies ``--section.key value`` overrides.

    Raises:
        FileNotFoundError: no such config file.
        KeyError: an unknown key in the file or an override.
        ValueError: a malformed override list.
    """
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found")
        d = _yaml_load(p.read_text()) or {}
    overrides = overrides or []
    if len(overrides) % 2:
        raise ValueError(f"overrides come in pairs `--section.key value`, got {overrides}")
    for key, value in zip(overrides[::2], overrides[1::2]):
        if not key.startswith("--"):
            raise ValueError(f"override {key!r} must look like --section.key")
        parts = key[2:].replace("-", "_").split(".")
        node = d
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise KeyError(f"override {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = node[part]
        node[parts[-1]] = _coerce(value)
    return TrainConfig.from_dict(d)
