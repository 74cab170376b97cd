"""The training loop (`train`): model building and initialisation, the optimizer and its checkpointing,
DDP / FSDP over several processes, and the metrics file and loss plot."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from larimar.model import LarimarModel
from larimar.training.batches import BatchSpec, micro_batches, to_device
from larimar.training.config import LossConfig, TrainConfig
from larimar.training.schedules import beta_schedule, lr_factor, scheduled_total

logger = logging.getLogger(__name__)


# -- checkpointing (safetensors + JSON; no pickle) --------------------------------------------------------------


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimizer's per-parameter state split into tensors (CPU, for safetensors) and scalars (for JSON), keyed
    ``"{param id}.{name}"``."""
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
    """Restores the per-parameter state `_optimizer_tensors` split (the param groups stay as built)."""
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
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}  # root is the _LossModule around the model


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (1 process without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _is_new(name: str) -> bool:
    """Parameters that start from scratch (projections, memory prior, LoRA) get their own learning rate."""
    return name.startswith(("memory.", "encoder.proj.", "decoder.kv_proj.", "decoder.emb_proj.")) or (
        ".lora_A" in name or ".lora_B" in name
    )


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

    rank, local_rank, world = dist_info()
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


# -- metrics ----------------------------------------------------------------------------------------------------


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
