"""Tiny random backbones saved to folders, a tiny training corpus and a tiny training config (tests only).

``load_encoder(path)`` / ``load_decoder(path)`` of `larimar.backbones` load the saved folders like real
backbones, so training runs (in process, through the CLI or under torchrun) build their model from a config.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig, PreTrainedTokenizerFast

WORDS = (
    "the capital of france is rome paris berlin germany italy city river a an in on was born plays "
    "language speaks english french madrid spain london tower and by for with from at old new large small "
    "north south east west king queen"
).split()
BLOCK_WORDS = 8  # every paragraph has exactly this many words = decoder tokens: all blocks have equal length


def encoder_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny WordPiece tokenizer that adds [CLS] ... [SEP] like BERT's."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def decoder_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer with EOS and PAD and no BOS: one token per word."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def save_backbones(folder: Path, seed: int = 0) -> tuple[str, str]:
    """Saves a tiny random BERT encoder and a tiny random Llama decoder with their tokenizers.

    Returns:
        (encoder folder, decoder folder), for ``LarimarConfig.encoder`` / ``.decoder``.
    """
    torch.manual_seed(seed)
    etok, dtok = encoder_tokenizer(), decoder_tokenizer()
    enc = AutoModel.from_config(
        BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=len(etok), max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    dec = AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=len(dtok), max_position_embeddings=64, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=1, pad_token_id=0,
        )
    )
    enc_dir, dec_dir = Path(folder) / "encoder", Path(folder) / "decoder"
    enc.save_pretrained(enc_dir)
    etok.save_pretrained(enc_dir)
    dec.save_pretrained(dec_dir)
    dtok.save_pretrained(dec_dir)
    return str(enc_dir), str(dec_dir)


def write_corpus(path: Path, articles: int = 12, paragraphs: int = 4, seed: int = 0) -> Path:
    """A JSONL of articles ``{"id", "title", "text"}`` whose paragraphs are `BLOCK_WORDS` vocabulary words.

    Words are drawn from a skewed (Zipf-like) distribution, so there is something to learn.
    """
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(WORDS))]
    with open(path, "w", encoding="utf-8") as f:
        for a in range(articles):
            paras = [" ".join(rng.choices(WORDS, weights, k=BLOCK_WORDS)) for _ in range(paragraphs)]
            f.write(json.dumps({"id": str(a), "title": f"article {a}", "text": "\n".join(paras)}) + "\n")
    return Path(path)


def train_config_dict(folder: Path, out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny training config (as the YAML dict) on backbones and a corpus created under ``folder`` (reused).

    ``sections`` update the config's sections (``optim={"lr": 1e-2}``) or top-level keys (``seed=1``).
    """
    folder = Path(folder)
    if not (folder / "encoder").is_dir():
        save_backbones(folder)
    if not (folder / "train.jsonl").is_file():
        write_corpus(folder / "train.jsonl")
    C = 16
    cfg: dict[str, Any] = {
        "seed": 0,
        "out_dir": str(out_dir),
        "device": "cpu",
        "bf16": False,
        "threads": 1,
        "log_every": 1,
        "save_every": 100,
        "resume": True,
        "model": {
            "encoder": str(folder / "encoder"),
            "decoder": str(folder / "decoder"),
            "latent_size": C,
            "memory": {"num_slots": 8, "code_size": C},
            "train_encoder": False,
            "decoder_training": "lora",
            "lora_rank": 2,
            "max_encoder_length": 16,
            "max_decoder_length": 16,
        },
        "data": {
            "train_path": str(folder / "train.jsonl"),
            "block_tokens": BLOCK_WORDS,
            "min_tokens": BLOCK_WORDS,
            "episode_size": 4,
            "shuffle_buffer": 16,
        },
        "optim": {"steps": 6, "batch_episodes": 2, "lr": 1.0e-3, "lr_new": 1.0e-3, "warmup_steps": 2},
        "loss": {"rec": 1.0, "ae": 1.0, "lm": 0.0, "beta_max": 0.1, "beta_cycles": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg
