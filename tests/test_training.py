"""Training (`larimar.training`) on tiny random backbones saved to folders: CLI run folder, learning, resume,
config loading and schedules, and DDP on CPU (gloo) against one process.

The tiny setup (the TRAINING preset of `fixtures/tiny_larimar.py`): a BERT encoder and a Llama decoder (hidden 32,
2 layers), word-level tokenizers, a corpus whose paragraphs are exactly 8 vocabulary words, so every block has 8
decoder tokens (and 10 encoder tokens): the token mean over a batch then equals the mean of the token means of
equal shards (DDP).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_larimar import BLOCK_WORDS, train_config_dict

from larimar.backbones import load_decoder, load_encoder
from larimar.cli.train import add_parser as add_train_parser
from larimar.model import LarimarModel
from larimar.training import (
    DataConfig,
    OptimConfig,
    TrainConfig,
    beta_schedule,
    build_model,
    collate,
    episode_stream,
    load_config,
    lr_factor,
    prefetch,
    scheduled_total,
    train,
)

EPISODE_SIZE = 4  # blocks per episode in the tiny config


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Folder holding the tiny backbones and corpus (built once for the module)."""
    folder = tmp_path_factory.mktemp("tiny_assets")
    train_config_dict(folder, folder / "unused")
    return folder


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], **tol: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def _fixed_batch_losses(model: LarimarModel, cfg: TrainConfig, episodes: int = 4) -> dict[str, float]:
    """Eval-mode (deterministic read) losses on the first episodes of the training stream, all terms on."""
    stream = episode_stream(cfg.data, model.decoder_tokenizer, cfg.seed)
    batch = collate([next(stream) for _ in range(episodes)], model)
    model.eval()
    with torch.no_grad():
        out = model.loss(batch, beta=0.0, rec_weight=1.0, ae_weight=1.0, lm_weight=1.0)
    return {k: float(v) for k, v in out.items()}


def _larimar_train(argv: list[str]) -> int:
    """``larimar train ARGV`` through the subparser `larimar.cli.train` registers, parsed as the `larimar` command
    parses it (unknown ``--section.key value`` pairs become the overrides)."""
    parser = argparse.ArgumentParser(prog="larimar")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args, extra = parser.parse_known_args(["train", *argv])
    assert args.accepts_overrides
    args.overrides = extra
    return args.func(args)


# -- 1. the CLI end to end ------------------------------------------------------------------------------------


def test_cli_train_writes_run_folder(assets, tmp_path, capsys):
    out = tmp_path / "run"
    cfg_path = _write_config(tmp_path / "cfg.yaml", train_config_dict(assets, out))

    assert _larimar_train(["--config", str(cfg_path), "--optim.steps", "6"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-2])["step"] == 6 and printed[-1] == f"model saved to {out / 'model'}"

    # config.yaml: the resolved config, which reloads to the same config
    saved = load_config(out / "config.yaml")
    assert saved == load_config(cfg_path, ["--optim.steps", "6"])
    assert saved.optim.steps == 6 and saved.model.memory.num_slots == 8

    # metrics.jsonl: one row per step (log_every 1); each step sees 2 episodes x 4 blocks x 8 tokens
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    tokens_per_step = 2 * EPISODE_SIZE * BLOCK_WORDS
    assert [r["tokens_seen"] for r in rows] == [tokens_per_step * r["step"] for r in rows]
    for r in rows:
        assert {"loss", "rec", "ae", "kl", "beta", "lr_new", "grad_norm"} <= set(r)
        assert math.isfinite(r["loss"]) and 0 < r["rec"] < 10, r

    # checkpoint/: progress, optimizer moments, the trainable weights
    ckpt = out / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["step"], state["episodes_seen"], state["tokens_seen"]) == (6, 12, 6 * tokens_per_step)
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg") for k in opt) and any(k.endswith(".exp_avg_sq") for k in opt)
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()

    # model/: the final weights (equal to the last checkpoint's), loadable by path or around given backbones
    final = _weights(out / "model")
    ckpt_weights = _weights(ckpt / "model")
    assert final.keys() == ckpt_weights.keys()
    for k in final:
        assert torch.equal(final[k], ckpt_weights[k]), k
    assert any(".lora_B" in k for k in final)  # decoder_training: lora
    assert final["decoder.emb_proj.weight"].abs().sum() > 0  # starts at zero: training moved it
    by_path = LarimarModel.from_pretrained(out / "model")
    given = LarimarModel.from_pretrained(
        out / "model", encoder=load_encoder(saved.model.encoder), decoder=load_decoder(saved.model.decoder)
    )
    for k, t in final.items():
        assert torch.equal(by_path.state_dict()[k], t), k
        assert torch.equal(given.state_dict()[k], t), k

    # loss.png: a PNG
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("decoder_training", "min_drop"), [("full", 0.5), ("frozen", 0.08)])
def test_training_lowers_loss_on_fixed_batch(assets, tmp_path, decoder_training, min_drop):
    cfg = TrainConfig.from_dict(train_config_dict(
        assets, tmp_path / "run", model={"decoder_training": decoder_training},
        optim={"steps": 30, "lr": 1e-2, "lr_new": 1e-2, "warmup_steps": 0}, loss={"beta_max": 0.0},
    ))
    before = _fixed_batch_losses(build_model(cfg, torch.device("cpu")), cfg)
    train(cfg)
    after = _fixed_batch_losses(LarimarModel.from_pretrained(tmp_path / "run" / "model"), cfg)

    assert after["rec"] < before["rec"] - min_drop, (before, after)
    if decoder_training == "frozen":
        # only the latent path trains: z = 0 runs the untouched decoder, and reading the memory now helps
        assert after["lm"] == pytest.approx(before["lm"], abs=1e-5)
        assert after["rec"] < after["lm"] - min_drop, after


# -- 2. resume ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("init_read_std", "prefix_query_prob"), [(1e-15, 0.0), (0.05, 0.0), (1e-15, 0.5)],
    ids=["read_noise_below_float_resolution", "read_noise", "prefix_queries"],
)
def test_resume_equals_uninterrupted_run(assets, tmp_path, init_read_std, prefix_query_prob):
    """4 steps, then a rerun to 8 steps with resume, equals one 8-step run.

    The schedules must not depend on the total number of steps for this to hold: a long warm-up keeps the
    learning rate at (step + 1) / warmup and beta_max 0 keeps beta at 0. With a read std of 1e-15 the sampled
    read's noise is below float32 resolution, so this checks the restored weights, optimizer and stream
    position; with the default read std (0.05) it also needs the global RNG state (the noise of
    ``torch.randn``) to be checkpointed and restored; with prefix queries, the draws of the prefix queries must
    go on as without a stop.
    """

    def cfg(out: Path, steps: int) -> TrainConfig:
        return TrainConfig.from_dict(train_config_dict(
            assets, out, save_every=2,
            model={"memory": {"num_slots": 8, "code_size": 16, "init_read_std": init_read_std}},
            data={"prefix_query_prob": prefix_query_prob},
            optim={"steps": steps, "lr": 1e-2, "lr_new": 1e-2, "warmup_steps": 100}, loss={"beta_max": 0.0},
        ))

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(cfg(whole, 8))
    train(cfg(parts, 4))
    assert json.loads((parts / "checkpoint" / "state.json").read_text())["step"] == 4
    train(cfg(parts, 8))

    rows_whole, rows_parts = _rows(whole), _rows(parts)
    assert [r["step"] for r in rows_parts] == list(range(1, 9))  # the rerun went on at step 5
    assert [r["tokens_seen"] for r in rows_parts] == [r["tokens_seen"] for r in rows_whole]
    state = json.loads((parts / "checkpoint" / "state.json").read_text())
    assert (state["step"], state["episodes_seen"]) == (8, 16)
    for a, b in zip(rows_whole, rows_parts):
        for key in ("loss", "rec", "ae", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)

    _assert_same_tensors(_weights(parts / "model"), _weights(whole / "model"), rtol=1e-5, atol=1e-6)
    moments = [load_file(str(out / "checkpoint" / "optimizer.safetensors")) for out in (parts, whole)]
    _assert_same_tensors(*moments, rtol=1e-4, atol=1e-9)


def test_prefetch_thread_and_worker_process_give_the_same_run(assets, tmp_path):
    """Batches prepared ahead in a thread (data.prefetch) or in a worker process (data.workers) are the batches
    of the loop: same losses and weights."""

    def cfg(out: Path, depth: int, workers: int = 0) -> TrainConfig:
        return TrainConfig.from_dict(train_config_dict(
            assets, out, model={"memory": {"num_slots": 8, "code_size": 16, "init_read_std": 1e-15}},
            data={"prefix_query_prob": 0.5, "swap_prob": 0.5, "prefetch": depth, "workers": workers},
            optim={"steps": 4, "lr": 1e-2, "lr_new": 1e-2, "warmup_steps": 2}, loss={"beta_max": 0.0},
        ))

    train(cfg(tmp_path / "loop", 0))
    rows_loop = _rows(tmp_path / "loop")
    for name, depth, workers in (("thread", 3, 0), ("worker", 2, 1)):
        train(cfg(tmp_path / name, depth, workers))
        rows = _rows(tmp_path / name)
        assert [r["tokens_seen"] for r in rows] == [r["tokens_seen"] for r in rows_loop], name
        assert all(r["data_wait_s"] >= 0 and r["step_s"] > 0 for r in rows)
        for a, b in zip(rows_loop, rows):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (name, a, b)
        _assert_same_tensors(_weights(tmp_path / name / "model"), _weights(tmp_path / "loop" / "model"),
                             rtol=1e-5, atol=1e-6)


def test_data_workers_config_check():
    with pytest.raises(ValueError, match="data.workers"):
        DataConfig(workers=-1)


def test_episode_stream_shards_split_the_paragraphs(assets):
    """Shard k of N streams the paragraphs i with i mod N == k: the shards are disjoint and cover the text."""
    from larimar.data import iter_wikipedia_texts

    cfg = DataConfig(train_path=str(assets / "train.jsonl"), block_tokens=BLOCK_WORDS, min_tokens=1, episode_size=1,
                     shuffle_buffer=1)
    tok = _WordTokenizer()  # one id per word: each paragraph (BLOCK_WORDS words) is one block
    n_paragraphs = sum(1 for _ in iter_wikipedia_texts(cfg.train_path))

    def first_pass(shard: int, shards: int) -> list[str]:
        stream = episode_stream(cfg, tok, 0, shard, shards)
        return [next(stream)[0].text for _ in range(len(range(shard, n_paragraphs, shards)))]

    whole = first_pass(0, 1)
    parts = [first_pass(k, 3) for k in range(3)]
    assert sorted(t for p in parts for t in p) == sorted(whole)
    assert all(not set(parts[a]) & set(parts[b]) for a, b in ((0, 1), (0, 2), (1, 2)))
    with pytest.raises(ValueError, match="shard"):
        next(episode_stream(cfg, tok, 0, 3, 3))


def test_sharded_workers_run_is_fixed_and_resumes(assets, tmp_path):
    """data.workers = 2: the same run twice, and 3 steps + a resume to 6 (the resume starts at micro-batch 3,
    shard 1: worker 0 takes shard 1) equals 6 steps in one go."""

    def cfg(out: Path, steps: int) -> TrainConfig:
        return TrainConfig.from_dict(train_config_dict(
            assets, out, save_every=3,
            model={"memory": {"num_slots": 8, "code_size": 16, "init_read_std": 1e-15}},
            data={"prefix_query_prob": 0.5, "workers": 2},
            optim={"steps": steps, "lr": 1e-2, "lr_new": 1e-2, "warmup_steps": 100}, loss={"beta_max": 0.0},
        ))

    train(cfg(tmp_path / "whole", 6))
    train(cfg(tmp_path / "again", 6))
    train(cfg(tmp_path / "parts", 3))
    train(cfg(tmp_path / "parts", 6))
    whole = _rows(tmp_path / "whole")
    for name in ("again", "parts"):
        rows = _rows(tmp_path / name)
        assert [r["step"] for r in rows] == list(range(1, 7)), name
        for a, b in zip(whole, rows):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (name, a, b)
        _assert_same_tensors(_weights(tmp_path / name / "model"), _weights(tmp_path / "whole" / "model"),
                             rtol=1e-5, atol=1e-6)


def test_prefetch_order_errors_and_close():
    assert list(prefetch(iter(range(10)), 3)) == list(range(10))

    def failing():
        yield 1
        raise RuntimeError("bad record")

    it = prefetch(failing(), 2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bad record"):
        next(it)
    endless = prefetch(itertools.count(), 2)
    assert [next(endless) for _ in range(5)] == [0, 1, 2, 3, 4]
    endless.close()  # stops the thread; nothing hangs
    source = iter([1, 2])
    assert prefetch(source, 0) is source


# -- 3. config and schedules -------------------------------------------------------------------------------------


def test_load_config_file_and_overrides(assets, tmp_path):
    base = train_config_dict(assets, tmp_path / "run", model={"decoder_training": "frozen"})
    path = _write_config(tmp_path / "cfg.yaml", base)
    plain = load_config(path)
    assert plain.model.decoder_training == "frozen" and plain.optim.lr == 1e-3 and plain.model.memory.num_slots == 8

    cfg = load_config(path, [
        "--optim.lr", "1e-3", "--optim.lr_new", "2.5e-4", "--model.decoder_training", "lora",
        "--model.memory.init_read_std", "1e-8", "--loss.beta-max", "0.25", "--optim.steps", "7",
        "--model.lora_targets", "[q_proj]", "--bf16", "true",
    ])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr_new == 2.5e-4 and isinstance(cfg.optim.lr_new, float)
    assert cfg.model.decoder_training == "lora"
    assert cfg.model.memory.init_read_std == 1e-8 and isinstance(cfg.model.memory.init_read_std, float)
    assert cfg.model.memory.num_slots == 8  # a nested override keeps the file's other memory keys
    assert cfg.loss.beta_max == 0.25  # dashes read as underscores
    assert cfg.optim.steps == 7 and cfg.model.lora_targets == ["q_proj"] and cfg.bf16 is True
    assert cfg.data == plain.data and cfg.out_dir == plain.out_dir  # the rest is the file's

    # the resolved dump reloads to an equal config
    again = load_config(_write_config(tmp_path / "resolved.yaml", cfg.to_dict()))
    assert again == cfg
    assert load_config(None) == TrainConfig()


def test_load_config_errors(assets, tmp_path):
    path = _write_config(tmp_path / "cfg.yaml", train_config_dict(assets, tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")
    with pytest.raises(ValueError, match="pairs"):
        load_config(path, ["--optim.lr", "1e-3", "--optim.steps"])
    with pytest.raises(ValueError, match="--section.key"):
        load_config(path, ["optim.lr", "0.1"])
    bad = train_config_dict(assets, tmp_path / "run", typo_key=1)
    with pytest.raises(KeyError, match="typo_key"):
        load_config(_write_config(tmp_path / "bad.yaml", bad))
    for override, name in (("--optim.nope", "nope"), ("--model.nope", "nope"), ("--data.shufle", "shufle"),
                           ("--nope", "nope")):
        with pytest.raises(KeyError, match=name):
            load_config(path, [override, "1"])


def test_load_config_unknown_nested_keys(assets, tmp_path):
    path = _write_config(tmp_path / "cfg.yaml", train_config_dict(assets, tmp_path / "run"))
    with pytest.raises(KeyError, match="nope"):
        load_config(path, ["--model.memory.nope", "1"])  # a key of the memory section
    with pytest.raises(KeyError, match="seed"):
        load_config(path, ["--seed.x", "1"])  # seed is a value, not a section


def test_beta_schedule_cycles():
    # total 100, 2 cycles of 50 steps: [0, 25) zero, [25, 37.5) linear ramp to beta_max, [37.5, 50) flat
    expected = {0: 0.0, 24: 0.0, 25: 0.0, 30: 0.2, 37: 0.48, 38: 0.5, 49: 0.5, 50: 0.0, 74: 0.0, 80: 0.2, 99: 0.5}
    for step, beta in expected.items():
        assert beta_schedule(step, 100, 0.5, 2) == pytest.approx(beta, abs=1e-12), step
    # a period that is not a whole number of steps: total 10, 3 cycles of 10/3 steps
    assert [beta_schedule(s, 10, 1.0, 3) for s in range(4)] == pytest.approx([0.0, 0.0, 0.4, 1.0])
    # off switches
    assert beta_schedule(80, 100, 0.0, 2) == 0.0
    assert beta_schedule(80, 100, 0.5, 0) == 0.0
    assert beta_schedule(3, 0, 0.5, 2) == 0.0


def test_scheduled_total_follows_the_time_budget():
    by_steps = OptimConfig(steps=1000, warmup_steps=10)
    assert scheduled_total(500, 30.0, by_steps) == 1000
    by_time = OptimConfig(steps=1000, warmup_steps=10, max_minutes=2.0, schedule="time")
    assert scheduled_total(5, 1.0, by_time) == 1000  # warm-up: the bound
    assert scheduled_total(100, 60.0, by_time) == 200  # half the budget gone at step 100: 200 steps in all
    assert scheduled_total(100, 6.0, by_time) == 1000  # projected 2000: capped at steps
    assert scheduled_total(100, 600.0, by_time) == 101  # past the budget: the schedule ends at this step
    assert lr_factor(100, 10, scheduled_total(100, 600.0, by_time)) == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="max_minutes"):
        OptimConfig(schedule="time")
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="tokens")


def test_lr_factor_warmup_then_cosine():
    assert [lr_factor(s, 10, 110) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, 10, 110) == pytest.approx(1.0)  # end of warm-up: the top
    assert lr_factor(60, 10, 110) == pytest.approx(0.55)  # half way: 0.1 + 0.9 / 2
    assert lr_factor(110, 10, 110) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110) == pytest.approx(0.1)  # past the end: stays at 10 %
    assert lr_factor(0, 0, 100) == pytest.approx(1.0)  # no warm-up
    decay = [lr_factor(s, 10, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


# -- 4. DDP on CPU -----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parallel_cfg(assets, out: Path, steps: int) -> dict:
    """A tiny run for the multi-process tests (read noise below float32 resolution: see the DDP test)."""
    return train_config_dict(
        assets, out, model={"memory": {"num_slots": 8, "code_size": 16, "init_read_std": 1e-15}},
        optim={"steps": steps, "batch_episodes": 2, "lr": 1e-2, "lr_new": 1e-2, "warmup_steps": 1},
    )


def _torchrun_train(cfg_path: Path) -> subprocess.CompletedProcess:
    """``larimar -v train --config cfg_path`` under torchrun with 2 CPU processes (gloo); asserts it succeeds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "larimar.cli", "-v", "train", "--config", str(cfg_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ddp_two_processes_match_one_process(assets, tmp_path):
    """torchrun with 2 CPU processes (gloo) and 1 episode each = 1 process with both episodes.

    The read noise is set below float32 resolution (init_read_std 1e-15): each process draws its own noise,
    which otherwise differs from the single process's. Blocks all have 8 tokens, so the mean over the two
    ranks of their token-mean losses equals the token mean over the global batch.
    """
    def cfg(out: Path) -> dict:
        return _parallel_cfg(assets, out, steps=4)

    one, two = tmp_path / "one", tmp_path / "two"
    train(TrainConfig.from_dict(cfg(one)))
    _torchrun_train(_write_config(tmp_path / "ddp.yaml", cfg(two)))

    # same final weights: the gradient averaged over the ranks is the gradient of the global batch. Measured
    # against how far training moved them: rounding differs between the two batch layouts, and Adam turns it
    # into visible differences where a gradient is near zero (part of the memory prior's cancels exactly)
    init = build_model(TrainConfig.from_dict(cfg(one)), torch.device("cpu")).saved_state_dict()
    w_one, w_two = _weights(one / "model"), _weights(two / "model")
    assert w_one.keys() == w_two.keys() == init.keys()
    moved = {k: float((w_one[k] - init[k]).norm()) for k in w_one}
    diff = {k: float((w_two[k] - w_one[k]).norm()) for k in w_one}
    assert math.hypot(*diff.values()) < 0.01 * math.hypot(*moved.values()), (diff, moved)
    for k in w_one:
        assert diff[k] <= 0.2 * moved[k] + 1e-7, (k, diff[k], moved[k])

    # same logged loss curve: the metrics describe the global batch, not rank 0's shard
    rows_one, rows_two = _rows(one), _rows(two)
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4]
    assert [r["tokens_seen"] for r in rows_two] == [r["tokens_seen"] for r in rows_one]
    for a, b in zip(rows_one, rows_two):
        for key in ("loss", "rec", "ae", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)


def test_fsdp_two_processes_match_one_process(assets, tmp_path):
    """parallel=fsdp: 2 gloo processes with sharded parameters = 1 process with the global batch (as DDP above);
    the saved model holds the gathered full tensors, and the run refuses to resume."""
    def cfg(out: Path) -> dict:
        return _parallel_cfg(assets, out, steps=3)

    one, two = tmp_path / "one", tmp_path / "two"
    train(TrainConfig.from_dict(cfg(one)))
    proc = _torchrun_train(_write_config(tmp_path / "fsdp.yaml", {**cfg(two), "parallel": "fsdp"}))
    assert "FSDP: 2 decoder layers and the root sharded" in proc.stderr

    init = build_model(TrainConfig.from_dict(cfg(one)), torch.device("cpu")).saved_state_dict()
    w_one, w_two = _weights(one / "model"), _weights(two / "model")
    assert w_one.keys() == w_two.keys() == init.keys()
    for k in w_one:  # full tensors, not one rank's shard
        assert w_two[k].shape == w_one[k].shape, k
    moved = {k: float((w_one[k] - init[k]).norm()) for k in w_one}
    diff = {k: float((w_two[k] - w_one[k]).norm()) for k in w_one}
    assert math.hypot(*diff.values()) < 0.01 * math.hypot(*moved.values()), (diff, moved)
    rows_one, rows_two = _rows(one), _rows(two)
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    for a, b in zip(rows_one, rows_two):
        for key in ("loss", "rec", "ae", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)
    assert json.loads((two / "checkpoint" / "state.json").read_text())["resumable"] is False
    with pytest.raises(ValueError, match="cannot be resumed"):  # a single-process resume of it says why
        train(TrainConfig.from_dict({**cfg(two), "optim": {**cfg(two)["optim"], "steps": 4}}))
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig.from_dict({**cfg(one), "parallel": "zero3"})


def test_resume_drops_metric_rows_logged_after_the_checkpoint(tmp_path):
    from larimar.training.loop import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 5, 10, 15)))
    _truncate_metrics(path, 10)  # the checkpoint was at step 10; steps 11.. run again after resume
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 5, 10]
    _truncate_metrics(tmp_path / "absent.jsonl", 3)  # nothing to do


# -- 5. stage-2 options: continuation loss, sentence items, init_from ----------------------------------------------


class _WordTokenizer:
    """Word-level stand-in for a HF tokenizer: one id per word."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def test_continuation_mask_marks_the_words_after_the_prefix():
    from larimar.training.batches import _continuation_mask

    texts = ["a b c d e", "f g h", "i j"]
    rows = [[1] * 5, [1] * 3, [1] * 2]
    queries = ["a b", "f g h", "i"]  # a prefix, the whole text, a prefix
    m = _continuation_mask(rows, texts, queries, _WordTokenizer())
    assert m.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 0, 0, 0]]


def test_prefix_loss_continuation_batch_and_config_checks(assets, tmp_path):
    import random

    cfg = TrainConfig.from_dict(train_config_dict(
        assets, tmp_path / "run", data={"prefix_query_prob": 1.0, "prefix_loss": "continuation"},
    ))
    model = build_model(cfg, torch.device("cpu"))
    stream = episode_stream(cfg.data, model.decoder_tokenizer, cfg.seed)
    batch = collate([next(stream) for _ in range(2)], model, cfg.data, random.Random(0))
    target, mask = batch["dec_target_mask"], batch["dec_attention_mask"]
    assert target.shape == mask.shape and bool((target <= mask).all())
    assert bool((target.sum(-1) >= 1).all()) and bool((target.sum(-1) < mask.sum(-1)).all())  # a prefix was cut
    out = model.loss(batch, beta=0.0)
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="prefix_loss"):
        TrainConfig.from_dict(train_config_dict(assets, tmp_path / "x", data={"prefix_loss": "answer"}))
    with pytest.raises(ValueError, match="prefix_frac"):
        TrainConfig.from_dict(train_config_dict(assets, tmp_path / "x", data={"prefix_frac": [0.9, 0.1]}))


def test_iter_sentences_splits_at_sentence_ends():
    from larimar.data import iter_sentences

    got = list(iter_sentences(["Paris is in France. It has 2 million people! Is it big? yes.", "  ", "One more"]))
    assert got == ["Paris is in France.", "It has 2 million people!", "Is it big? yes.", "One more"]


def test_init_from_copies_saved_tensors_and_keeps_new_ones(assets, tmp_path):
    stage1 = TrainConfig.from_dict(train_config_dict(assets, tmp_path / "s1", model={"decoder_training": "frozen"},
                                                     optim={"steps": 2}))
    train(stage1)
    saved = _weights(tmp_path / "s1" / "model")
    stage2 = TrainConfig.from_dict(train_config_dict(
        assets, tmp_path / "s2", init_from=str(tmp_path / "s1" / "model"),
        model={"decoder_training": "lora", "lora_gated": True}, optim={"steps": 0},
    ))
    train(stage2)  # zero steps: the saved model is the initialisation
    got = _weights(tmp_path / "s2" / "model")
    for k, t in saved.items():
        assert torch.equal(got[k], t), k
    assert any("lora_B" in k for k in got) and all(bool((got[k] == 0).all()) for k in got if "lora_B" in k)
    bad = TrainConfig.from_dict(train_config_dict(assets, tmp_path / "s3", init_from=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="init_from"):
        train(bad)


def test_swap_names_builds_edit_shaped_items():
    import random

    from larimar.training import swap_names

    texts = ["The river flows through Paris and then Rouen.", "She was born in New York City in 1950.",
             "no names here at all"]
    out = swap_names(texts, 1.0, random.Random(0))
    assert out[2] is None  # no capitalised name
    for text, sw in zip(texts[:2], out[:2]):
        item, prompt = sw
        assert text.startswith(prompt + " ") and item.startswith(prompt + " ")
        new = item[len(prompt) + 1:]
        others = {"Paris", "Rouen", "New York City"} - {n for n in ("Paris", "Rouen", "New York City") if n in text}
        assert new in others  # a name from another text, never the original
        assert len(prompt.split()) >= 3
    assert swap_names(texts, 0.0, random.Random(0)) == [None, None, None]


def test_collate_with_name_swaps_scores_only_the_new_name(assets, tmp_path):
    import random

    cfg = TrainConfig.from_dict(train_config_dict(assets, tmp_path / "run", data={"swap_prob": 1.0}))
    model = build_model(cfg, torch.device("cpu"))

    class Block:
        def __init__(self, text):
            self.text, self.ids = text, model.decoder_tokenizer(text, add_special_tokens=False)["input_ids"]

    from tiny_larimar import WORDS

    w = [x for x in WORDS if x.isalpha()]
    names = [x.capitalize() for x in w[:4]]
    texts = [f"{w[0]} {w[1]} {w[2]} {names[0]} {w[3]}", f"{w[1]} {w[2]} {w[3]} {names[1]}"]
    batch = collate([[Block(t) for t in texts]], model, cfg.data, random.Random(0))
    target, mask = batch["dec_target_mask"][0], batch["dec_attention_mask"][0]
    assert bool((target <= mask).all())
    for row in range(2):  # the prompt's 3 words are not scored, the swapped-in name is (the text is cut after it)
        assert target[row, :3].sum() == 0 and target[row].sum() >= 1
        assert int(mask[row].sum()) == 3 + int(target[row].sum())
    with pytest.raises(ValueError, match="swap_prob"):
        TrainConfig.from_dict(train_config_dict(assets, tmp_path / "x", data={"swap_prob": 2.0}))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_training_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.latent_size == cfg.model.memory.code_size
    assert cfg.optim.batch_episodes % cfg.optim.grad_accum == 0
