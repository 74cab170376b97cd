"""End-to-end training of a Larimar model on generic text (paper Eq. 1).

Launch::

    larimar train --config configs/smollm2_cpu.yaml                     # one process (CPU or one GPU)
    larimar train --config configs/smollm2_gpu.yaml --optim.lr 1e-4     # overrides: --section.key value
    torchrun --nproc_per_node 8 -m larimar.cli train --config ...        # one node, DDP (NCCL on GPU)
    torchrun --nproc_per_node 8 -m larimar.cli train --config ... --parallel fsdp   # sharded (large decoders)
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m larimar.cli train --config ...

Each step takes `batch_episodes` episodes of `episode_size` text blocks (split across processes under DDP),
encodes the blocks, writes each episode to its own memory, reads it back and decodes every block
(rec), decodes from the block's own encoding (ae), adds beta_t * KL(w) and, when the decoder is trained,
decoding with z = 0 (lm). The run folder gets the resolved config (`config.yaml`), `metrics.jsonl`,
`checkpoint/` (the trainable state, resumable) and, at the end, `model/` (save_pretrained) and `loss.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import queue
import random
import shutil
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from larimar.data import iter_episodes, iter_sentences, iter_text_blocks, iter_wikipedia_texts
from larimar.model import LarimarConfig, LarimarModel, encoder_tokens

T = TypeVar("T")

logger = logging.getLogger(__name__)


# -- config ---------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Training text.

    Attributes:
        train_path: JSONL of Wikipedia articles (``{"id", "title", "text"}``), streamed.
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

    train_path: str = "../shared/data/wikipedia_en/enwiki_2018_train.jsonl"
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
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
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


# -- schedules ------------------------------------------------------------------------------------------------


def beta_schedule(step: int, total: int, beta_max: float, cycles: int) -> float:
    """Cyclic KL weight: per cycle, half at 0, a quarter ramping linearly to beta_max, a quarter flat."""
    if beta_max == 0 or cycles <= 0 or total <= 0:
        return 0.0
    period = total / cycles
    t = (step % period) / period
    if t < 0.5:
        return 0.0
    if t < 0.75:
        return beta_max * (t - 0.5) / 0.25
    return beta_max


def scheduled_total(step: int, elapsed_s: float, cfg: OptimConfig) -> int:
    """Length of the learning-rate and KL schedules: ``cfg.steps``, or with ``schedule: time`` the step count
    projected from the elapsed fraction of ``max_minutes`` (never below ``step + 1``, never above ``cfg.steps``)."""
    if cfg.schedule != "time" or step < max(1, cfg.warmup_steps):
        return cfg.steps
    frac = elapsed_s / (60.0 * cfg.max_minutes)
    if frac <= 0:
        return cfg.steps
    return max(step + 1, min(cfg.steps, round(step / frac)))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# -- data -----------------------------------------------------------------------------------------------------


def _shuffled(items: Iterator[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle with a fixed-size buffer."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        i = rng.randrange(buffer)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def episode_stream(cfg: DataConfig, decoder_tokenizer: Any, seed: int, shard: int = 0,
                   shards: int = 1) -> Iterator[list[Any]]:
    """Endless stream of episodes (lists of `TextBlock`), reshuffled each pass over the file; with ``shards`` > 1,
    of the paragraphs i with i mod shards == shard only."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in [0, {shards}), got {shard}")
    epoch = 0
    while True:
        rng = random.Random(seed * 1000 + epoch if shards == 1 else f"{seed}:{epoch}:{shard}/{shards}")
        texts = iter_wikipedia_texts(cfg.train_path)
        if shards > 1:
            texts = itertools.islice(texts, shard, None, shards)
        if cfg.split_sentences:
            texts = iter_sentences(texts)
        blocks = iter_text_blocks(texts, decoder_tokenizer, cfg.block_tokens, cfg.min_tokens)
        n = 0
        for episode in iter_episodes(_shuffled(blocks, cfg.shuffle_buffer, rng), cfg.episode_size):
            n += 1
            yield episode
        if n == 0:
            raise ValueError(f"{cfg.train_path} yields no episode of {cfg.episode_size} blocks")
        epoch += 1


def prefix_queries(texts: list[str], prob: float, frac: list[float], rng: random.Random) -> list[str]:
    """Per text, with probability `prob`, a prefix of its words (a fraction in `frac`, at least one word)."""
    out = []
    for t in texts:
        words = t.split()
        if rng.random() < prob and len(words) > 1:
            keep = max(1, min(len(words) - 1, round(rng.uniform(*frac) * len(words))))
            t = " ".join(words[:keep])
        out.append(t)
    return out


_TRAILING = ",.;:!?)]\"'"


def _name_spans(words: list[str]) -> list[tuple[int, int]]:
    """(start, end) word spans of capitalised names: runs of words starting with a capital letter, not the
    text's first word, a run ending at a word that ends with punctuation."""
    spans, i = [], 1
    while i < len(words):
        if words[i][:1].isupper():
            j = i
            while j + 1 < len(words) and words[j + 1][:1].isupper() and words[j][-1:] not in _TRAILING:
                j += 1
            spans.append((i, j + 1))
            i = j + 1
        else:
            i += 1
    return spans


def swap_names(texts: list[str], prob: float, rng: random.Random, min_prompt_words: int = 3) -> list[tuple[str, str] | None]:
    """Edit-shaped counterfactual items made from plain text.

    Per text, with probability ``prob``: pick a capitalised name that starts after at least ``min_prompt_words``
    words, replace it by a different name found in another text of the batch, and cut the text after it.
    The result is shaped like an edit, "prompt + new object", with an object the decoder cannot guess from the
    prompt (often against what the decoder believes), so only the latent can supply it.

    Returns:
        per text, ``(item, prompt)`` (``item = prompt + " " + name``) or None (not drawn, or no usable name).
    """
    split = [t.split() for t in texts]
    spans = [_name_spans(words) for words in split]
    names = [[" ".join(w.strip(_TRAILING) for w in words[a:b]) for a, b in sp] for words, sp in zip(split, spans)]
    out: list[tuple[str, str] | None] = []
    for i, words in enumerate(split):
        usable = [k for k, (a, _) in enumerate(spans[i]) if a >= min_prompt_words]
        if rng.random() >= prob or not usable:
            out.append(None)
            continue
        k = usable[rng.randrange(len(usable))]
        a, old = spans[i][k][0], names[i][k]
        pool = [n for j, ns in enumerate(names) if j != i for n in ns if n and n != old]
        if not pool:
            out.append(None)
            continue
        prompt = " ".join(words[:a])
        out.append((f"{prompt} {pool[rng.randrange(len(pool))]}", prompt))
    return out


@dataclass
class BatchSpec:
    """What `collate` needs of a model, and nothing on a device: picklable, so a worker process can collate."""

    decoder_tokenizer: Any
    encoder_tokenizer: Any
    encoder_max_length: int
    max_decoder_length: int
    pad_token_id: int

    @classmethod
    def of(cls, model: LarimarModel) -> "BatchSpec":
        return cls(model.decoder_tokenizer, model.encoder.tokenizer, model.encoder.max_length,
                   model.config.max_decoder_length, model.pad_token_id)

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        """Encoder tokens as `LatentEncoder.tokenize`, on the CPU: input_ids, attention_mask (N, Te)."""
        return encoder_tokens(self.encoder_tokenizer, texts, self.encoder_max_length)


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every tensor of a collated batch on ``device``."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def collate(
    episodes: list[list[Any]], model: LarimarModel, cfg: DataConfig | None = None, rng: random.Random | None = None
) -> dict[str, Tensor]:
    """Episodes of E blocks -> encoder tokens (B, E, Te), right-padded decoder tokens (B, E, Td) and, with prefix
    queries or name swaps (``cfg``), encoder tokens of the read queries (B, E, Tq) and the decoder tokens the
    loss scores (B, E, Td); on the model's device (`collate_cpu` does the work)."""
    return to_device(collate_cpu(episodes, BatchSpec.of(model), cfg, rng), model.device)


def collate_cpu(
    episodes: list[list[Any]], spec: BatchSpec, cfg: DataConfig | None = None, rng: random.Random | None = None
) -> dict[str, Tensor]:
    """`collate` on the CPU, from a `BatchSpec` (what a worker process runs)."""
    B, E = len(episodes), len(episodes[0])
    tok = spec.decoder_tokenizer
    max_len = spec.max_decoder_length
    texts = [b.text for ep in episodes for b in ep]
    rows = [list(b.ids)[:max_len] for ep in episodes for b in ep]
    swaps: list[tuple[str, str] | None] = [None] * len(texts)
    if cfg is not None and cfg.swap_prob > 0:
        swaps = swap_names(texts, cfg.swap_prob, rng)
        swapped = [i for i, sw in enumerate(swaps) if sw]
        if swapped:
            new_ids = tok([swaps[i][0] for i in swapped], add_special_tokens=False)["input_ids"]
            for i, ids in zip(swapped, new_ids):
                texts[i], rows[i] = swaps[i][0], list(ids)[:max_len]
    enc = spec.encode(texts)  # (B*E, Te)
    extra = {}
    if cfg is not None and (cfg.prefix_query_prob > 0 or any(swaps)):
        queries = prefix_queries(texts, cfg.prefix_query_prob, cfg.prefix_frac, rng)
        queries = [sw[1] if sw else q for q, sw in zip(queries, swaps)]  # a swapped item is read with its prompt
        q = spec.encode(queries)
        extra = {"query_input_ids": q["input_ids"].view(B, E, -1),
                 "query_attention_mask": q["attention_mask"].view(B, E, -1)}
        if cfg.prefix_loss == "all":  # only swapped items score their continuation (the new name) alone
            queries = [q if sw else t for q, t, sw in zip(queries, texts, swaps)]
        if cfg.prefix_loss == "continuation" or any(swaps):
            target = _continuation_mask(rows, texts, queries, tok)  # (B*E, Td)
            extra["dec_target_mask"] = target.view(B, E, -1)
    T = max(len(r) for r in rows)
    ids = torch.full((B * E, T), spec.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B * E, T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {
        "enc_input_ids": enc["input_ids"].view(B, E, -1),
        "enc_attention_mask": enc["attention_mask"].view(B, E, -1),
        "dec_input_ids": ids.view(B, E, T),
        "dec_attention_mask": mask.view(B, E, T),
        **extra,
    }


def _continuation_mask(rows: list[list[int]], texts: list[str], queries: list[str], tokenizer: Any) -> Tensor:
    """(N, T) 1 at the decoder tokens of each row after its prefix query (every token when the query is the
    whole text); a row keeps at least its last token. T is the longest row."""
    T = max(len(r) for r in rows)
    out = torch.zeros((len(rows), T), dtype=torch.long)
    prefixes = [q for t, q in zip(texts, queries) if q != t]
    n_prefix = iter(len(ids) for ids in tokenizer(prefixes, add_special_tokens=False)["input_ids"]) if prefixes else None
    for i, (r, t, q) in enumerate(zip(rows, texts, queries)):
        start = 0 if q == t else min(next(n_prefix), len(r) - 1)  # words split at spaces: the prefix's tokens lead
        out[i, start : len(r)] = 1
    return out


# -- checkpointing (safetensors + JSON; no pickle) --------------------------------------------------------------


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, scalars


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(scalars.items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(folder: Path, model: LarimarModel, opt: torch.optim.Optimizer | None, meta: dict[str, Any],
                    state_dict: dict[str, Tensor] | None = None) -> None:
    """Writes the trainable state, optimizer moments and progress atomically (temp folder, then rename).

    ``opt=None`` (FSDP) writes the weights (``state_dict``: the gathered full tensors) without the optimizer, and
    marks the checkpoint as not resumable.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp / "model", state_dict=state_dict)
    if opt is None:
        (tmp / "state.json").write_text(json.dumps({**meta, "resumable": False}, indent=2))
    else:
        opt_t, opt_s = _optimizer_tensors(opt)
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**meta, "optimizer_scalars": opt_s}, indent=2))
    rng = {"cpu": torch.get_rng_state()}
    if model.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(model.device)
    save_file(rng, str(tmp / "rng.safetensors"))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


# -- the loop --------------------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """Wraps the model so DistributedDataParallel sees the loss as a forward call."""

    def __init__(self, model: LarimarModel, cfg: LossConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict[str, Tensor], beta: float) -> dict[str, Tensor]:  # type: ignore[override]
        c = self.cfg
        return self.model.loss(batch, beta=beta, write_noise_std=c.write_noise_std, rec_weight=c.rec,
                               ae_weight=c.ae, lm_weight=c.lm)


def init_weights(model: LarimarModel, folder: Path) -> None:
    """Copies the tensors of a saved model folder into ``model`` (same names and shapes; others keep their init).

    Raises:
        FileNotFoundError: no ``model.safetensors`` in the folder.
        ValueError: a tensor the model does not have, or of another shape.
    """
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} not found (expected a folder written by save_pretrained)")
    tensors = load_file(str(path))
    own = model.state_dict()
    bad = [k for k, t in tensors.items() if k not in own or tuple(t.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"init_from: {folder} has tensors this model lacks or shapes it differs in: {bad[:5]}")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
    logger.info("initialised %d tensors from %s", len(tensors), folder)


def decoder_blocks(model: LarimarModel) -> nn.ModuleList:
    """The decoder's list of transformer layers (the `nn.ModuleList` with one entry per layer)."""
    n = model.decoder.shape.num_layers
    for module in model.decoder.model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"no ModuleList of {n} layers found in the decoder")


def shard_fsdp(root: nn.Module, model: LarimarModel) -> None:
    """FSDP2: each decoder layer is one unit (gathered for its forward / backward only), the root holds the rest."""
    from torch.distributed.fsdp import fully_shard

    blocks = decoder_blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(root)
    logger.info("FSDP: %d decoder layers and the root sharded", len(blocks))


def _full_state(root: nn.Module) -> dict[str, Tensor]:
    """The FSDP model's full tensors on CPU, on rank 0 (other ranks get {}); a collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}  # root is the _LossModule around the model


def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (1 process without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_model(cfg: TrainConfig, device: torch.device) -> LarimarModel:
    """Loads the backbones named by the config and builds the Larimar model around them."""
    from larimar.backbones import load_decoder, load_encoder

    enc, enc_tok = load_encoder(cfg.model.encoder)
    dec, dec_tok = load_decoder(cfg.model.decoder)
    return LarimarModel.from_backbones(cfg.model, enc, enc_tok, dec, dec_tok).to(device)


def train(cfg: TrainConfig, model: LarimarModel | None = None) -> dict[str, Any]:
    """Trains a Larimar model as configured; returns the last metrics.

    Args:
        cfg: the run's config.
        model: an already built model (tests); default: built from ``cfg.model``.
    """
    import torch.distributed as dist
    from tqdm.auto import tqdm

    rank, local_rank, world = _dist_info()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{local_rank}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    torch.manual_seed(cfg.seed)
    if model is None:
        model = build_model(cfg, device)
    model.to(device).train()
    if cfg.init_from and not (cfg.resume and (out / "checkpoint" / "state.json").exists()):
        init_weights(model, Path(cfg.init_from))
    fsdp = cfg.parallel == "fsdp" and world > 1
    root: nn.Module = _LossModule(model, cfg.loss)
    if fsdp:
        if cfg.resume and (out / "checkpoint" / "state.json").exists():
            raise ValueError(f"{out}/checkpoint exists, and parallel=fsdp does not resume: use a new out_dir, "
                             "--resume false, or parallel=ddp")
        shard_fsdp(root, model)  # before the optimizer: sharding replaces the parameters
    new_params = [p for n, p in model.named_parameters() if p.requires_grad and _is_new(n)]
    old_params = [p for n, p in model.named_parameters() if p.requires_grad and not _is_new(n)]
    groups = [{"params": new_params, "lr": cfg.optim.lr_new}]
    if old_params:
        groups.append({"params": old_params, "lr": cfg.optim.lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    n_train = sum(p.numel() for p in new_params + old_params)
    logger.info("trainable parameters: %d (new %d)", n_train, sum(p.numel() for p in new_params))

    step, tokens_seen, episodes_seen = 0, 0, 0
    ckpt = out / "checkpoint"
    if cfg.resume and (ckpt / "state.json").exists():
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("resumable") is False:
            raise ValueError(f"{ckpt} was written by an FSDP run without optimizer state and cannot be resumed; "
                             "start from its weights with init_from instead")
        weights = load_file(str(ckpt / "model" / "model.safetensors"))
        missing = set(model.saved_state_dict()) - set(weights)
        if missing:
            raise ValueError(f"checkpoint {ckpt} lacks tensors {sorted(missing)[:5]}")
        model.load_state_dict(weights, strict=False)
        _load_optimizer(opt, load_file(str(ckpt / "optimizer.safetensors")), state.pop("optimizer_scalars"))
        step, tokens_seen, episodes_seen = state["step"], state["tokens_seen"], state["episodes_seen"]
        if (ckpt / "rng.safetensors").exists():  # the sampled read and write noise go on as without a stop
            rng = load_file(str(ckpt / "rng.safetensors"))
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], device)
        logger.info("resumed from %s at step %d", ckpt, step)

    ddp_module: nn.Module = root
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ddp_module = DistributedDataParallel(root, device_ids=[device.index] if device.type == "cuda" else None)

    per_rank = cfg.optim.batch_episodes // (world * cfg.optim.grad_accum)
    if per_rank < 1 or per_rank * world * cfg.optim.grad_accum != cfg.optim.batch_episodes:
        raise ValueError(
            f"batch_episodes ({cfg.optim.batch_episodes}) must be a multiple of processes x grad_accum "
            f"({world} x {cfg.optim.grad_accum})"
        )
    batches = micro_batches(cfg, BatchSpec.of(model), step, episodes_seen, per_rank, world, rank)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    if is_main:  # on resume, drop rows logged after the checkpoint: those steps are run again
        _truncate_metrics(out / "metrics.jsonl", step)
    metrics_f = open(out / "metrics.jsonl", "a") if is_main else None
    t_start = time.perf_counter()
    bar = tqdm(total=cfg.optim.steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    last: dict[str, Any] = {}
    try:
        while step < cfg.optim.steps:
            t0 = time.perf_counter()
            total = scheduled_total(step, t0 - t_start, cfg.optim)
            beta = beta_schedule(step, total, cfg.loss.beta_max, cfg.loss.beta_cycles)
            f = lr_factor(step, cfg.optim.warmup_steps, total)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * f
            opt.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "rec": 0.0, "ae": 0.0, "kl": 0.0, "lm": 0.0}
            step_tokens, data_wait = 0, 0.0
            for _ in range(cfg.optim.grad_accum):
                t_data = time.perf_counter()
                n_read, batch = next(batches)
                batch = to_device(batch, device)
                data_wait += time.perf_counter() - t_data
                episodes_seen += n_read
                step_tokens += int(batch["dec_attention_mask"].sum())
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    losses = ddp_module(batch, beta)
                (losses["loss"] / cfg.optim.grad_accum).backward()
                for k in sums:
                    sums[k] += float(losses[k].detach()) / cfg.optim.grad_accum
            if world > 1:  # metrics of the global batch: mean of the ranks' losses, sum of their tokens
                keys = list(sums)
                red = torch.tensor([*(sums[k] for k in keys), step_tokens], dtype=torch.float64, device=device)
                dist.all_reduce(red)
                sums = {k: float(v) / world for k, v in zip(keys, red[:-1].tolist())}
                step_tokens = int(red[-1].item())
            grad_norm = torch.nn.utils.clip_grad_norm_(new_params + old_params, cfg.optim.max_grad_norm)
            opt.step()
            step += 1
            tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            last = {"step": step, **{k: round(v, 5) for k, v in sums.items()}, "beta": round(beta, 4),
                    "lr_new": opt.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                    "tokens_seen": tokens_seen, "tokens_per_s": round(step_tokens / dt, 1),
                    "data_wait_s": round(data_wait, 4), "step_s": round(dt, 4),
                    "elapsed_s": round(time.perf_counter() - t_start, 1)}
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", rec=f"{sums['rec']:.3f}", tok_s=f"{step_tokens / dt:.0f}")
            if is_main and (step % cfg.log_every == 0 or step == 1):
                metrics_f.write(json.dumps(last) + "\n")
                metrics_f.flush()
            out_of_time = cfg.optim.max_minutes and (time.perf_counter() - t_start) / 60 >= cfg.optim.max_minutes
            if world > 1:  # every rank must agree to stop
                flag = torch.tensor([1.0 if out_of_time else 0.0], device=device)
                dist.all_reduce(flag)
                out_of_time = bool(flag.item() > 0)
            if step % cfg.save_every == 0 or out_of_time or step == cfg.optim.steps:
                full = _full_state(root) if fsdp else None  # every rank takes part in the gather
                if is_main:
                    save_checkpoint(ckpt, model, None if fsdp else opt, {"step": step, "tokens_seen": tokens_seen,
                                                                         "episodes_seen": episodes_seen}, full)
            if out_of_time:
                logger.warning("max_minutes=%s reached at step %d: stopping", cfg.optim.max_minutes, step)
                if is_main and metrics_f is not None and step % cfg.log_every and step != 1:
                    metrics_f.write(json.dumps(last) + "\n")
                break
    finally:
        batches.close()
        bar.close()
        if metrics_f is not None:
            metrics_f.close()
    full = _full_state(root) if fsdp else None
    if is_main:
        model.save_pretrained(out / "model", state_dict=full)
        plot_metrics(out / "metrics.jsonl", out / "loss.png")
    if world > 1:
        dist.barrier()
    return last


def _micro_batches(cfg: TrainConfig, spec: BatchSpec, step: int, episodes_seen: int, per_rank: int, world: int,
                   rank: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """(episodes read from the stream, this rank's collated micro-batch on the CPU), grad_accum per step from
    ``step`` on, the stream resumed after ``episodes_seen`` episodes."""
    stream = episode_stream(cfg.data, spec.decoder_tokenizer, cfg.seed)
    for _ in range(episodes_seen):  # resume: skip what was consumed
        next(stream)
    while True:
        query_rng = random.Random(f"{cfg.seed}:{step}")  # this step's prefix-query draws, the same after a resume
        for _ in range(cfg.optim.grad_accum):
            global_eps = [next(stream) for _ in range(per_rank * world)]  # every rank reads the same stream
            yield len(global_eps), collate_cpu(global_eps[rank * per_rank : (rank + 1) * per_rank], spec, cfg.data,
                                               query_rng)
        step += 1


def _sharded_micro_batches(cfg: TrainConfig, spec: BatchSpec, step: int, per_rank: int, world: int, rank: int,
                           worker: int, workers: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Worker ``worker`` of ``workers``: micro-batches m = M0 + worker, M0 + worker + workers, ... (M0 = step x
    grad_accum, those already consumed), all from shard m mod workers of the stream, which has given
    ceil((M0 - shard) / workers) micro-batches before M0."""
    ga, n = cfg.optim.grad_accum, per_rank * world
    first = step * ga + worker
    shard = first % workers
    stream = episode_stream(cfg.data, spec.decoder_tokenizer, cfg.seed, shard, workers)
    for _ in range(max(0, -(-(step * ga - shard) // workers)) * n):  # resume: skip this shard's consumed episodes
        next(stream)
    for m in itertools.count(first, workers):
        query_rng = random.Random(f"{cfg.seed}:{m // ga}:{m % ga}")  # this micro-batch's draws
        global_eps = [next(stream) for _ in range(n)]  # every rank reads the same stream
        yield n, collate_cpu(global_eps[rank * per_rank : (rank + 1) * per_rank], spec, cfg.data, query_rng)


class _MicroBatches(torch.utils.data.IterableDataset):
    """The micro-batches of one DataLoader worker (it holds tokenizers, not the model)."""

    def __init__(self, cfg: TrainConfig, spec: BatchSpec, step: int, episodes_seen: int, per_rank: int, world: int,
                 rank: int) -> None:
        super().__init__()
        self.args = (cfg, spec, step, episodes_seen, per_rank, world, rank)

    def __iter__(self) -> Iterator[tuple[int, dict[str, Tensor]]]:
        cfg, spec, step, episodes_seen, per_rank, world, rank = self.args
        info = torch.utils.data.get_worker_info()
        if info is None or info.num_workers == 1:
            return _micro_batches(*self.args)
        return _sharded_micro_batches(cfg, spec, step, per_rank, world, rank, info.id, info.num_workers)


def micro_batches(cfg: TrainConfig, spec: BatchSpec, step: int, episodes_seen: int, per_rank: int, world: int,
                  rank: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """The training micro-batches (CPU tensors), made in this process (``data.workers`` 0; ``data.prefetch``
    ahead in a thread when > 0) or in ``data.workers`` worker processes (see `DataConfig`). Close the returned
    generator to stop a thread or the workers."""
    args = (cfg, spec, step, episodes_seen, per_rank, world, rank)
    if cfg.data.workers == 0:
        return prefetch(_micro_batches(*args), cfg.data.prefetch)
    loader = torch.utils.data.DataLoader(_MicroBatches(*args), batch_size=None, num_workers=cfg.data.workers,
                                         prefetch_factor=max(2, cfg.data.prefetch))

    def run() -> Iterator[tuple[int, dict[str, Tensor]]]:
        it = iter(loader)  # round robin over the workers: micro-batch m comes from worker (m - M0) mod workers
        try:
            yield from it
        finally:
            del it  # the last reference: the workers stop now

    return run()


def prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Iterates ``items`` in a background thread, ``depth`` ahead (``depth`` 0: ``items`` itself).

    An exception in the thread is raised where the item would have been; closing the returned generator stops
    the thread.
    """
    if depth <= 0:
        return items
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put(("item", x), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer
            q.put(("error", e))
        else:
            q.put(("end", None))

    thread = threading.Thread(target=work, name="larimar-prefetch", daemon=True)
    thread.start()

    def consume() -> Iterator[T]:
        try:
            while True:
                kind, x = q.get()
                if kind == "error":
                    raise x
                if kind == "end":
                    return
                yield x
        finally:
            stop.set()

    return consume()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keeps only the metric rows of steps <= last_step (atomically; nothing to do without the file)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _is_new(name: str) -> bool:
    """Parameters that start from scratch (projections, memory prior, LoRA) get their own learning rate."""
    return name.startswith(("memory.", "encoder.proj.", "decoder.kv_proj.", "decoder.emb_proj.")) or (
        ".lora_A" in name or ".lora_B" in name
    )


def plot_metrics(metrics_path: Path, png: Path) -> None:
    """Loss curve (total, rec, ae) against tokens seen, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["tokens_seen"] / 1e6 for r in rows]
    window = 9  # running mean over this many logged points, drawn over the raw values when there are enough
    for key in ("rec", "ae", "lm"):
        if any(r.get(key) for r in rows):
            y = [r[key] for r in rows]
            if len(y) >= 2 * window:
                line, = ax.plot(x, y, alpha=0.3, linewidth=0.8)
                smooth = [sum(y[max(0, i - window + 1): i + 1]) / len(y[max(0, i - window + 1): i + 1])
                          for i in range(len(y))]
                ax.plot(x, smooth, color=line.get_color(), label=f"{key} CE (nats/token), mean of {window} logs")
            else:
                ax.plot(x, y, label=f"{key} CE (nats/token)")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("loss")
    ax.set_title(f"Larimar training: {Path(metrics_path).parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# -- CLI ---------------------------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, getattr(args, "overrides", []))
    last = train(cfg)
    if _dist_info()[0] == 0:
        print(json.dumps(last))
        print(f"model saved to {Path(cfg.out_dir) / 'model'}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Registers `larimar train`."""
    p = sub.add_parser("train", help="train a Larimar model end to end (see configs/*.yaml)")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.set_defaults(func=_cmd_train, accepts_overrides=True)  # extra `--section.key value` pairs
