"""The Larimar model: encoder adapter, episodic memory, latent-conditioned decoder, loss, save / load.

Data flows one way (docs/method.md, section "Model")::

    text --LatentEncoder--> z (C)  --EpisodicMemory.write--> M (K, C)
    query --LatentEncoder--> z_q --EpisodicMemory.read(M)--> z_read --LatentDecoder--> tokens

Pieces, top to bottom:
    LatentEncoder                 HF encoder -> mean pooling over non-pad tokens -> Linear(hidden, C)
    LarimarConfig                 dataclass, JSON round trip
    LarimarModel                  encode / write / read / decode, the loss of paper Eq. 1, save / load

The decoder side is `larimar.conditioning`: `LatentDecoder` (HF causal LM conditioned on z: a latent key/value
slot per layer + an additive embedding offset; z = 0 is the plain pretrained decoder), `LoRALinear` /
`apply_lora` and the per-architecture table `DECODER_ARCHS`.

Decoder input convention: every decoded text is preceded by a start token (the tokenizer's BOS, else its EOS,
or ``LarimarConfig.decoder_start_token``), so that every token of a text is predicted, the first one from
the start token, the latent slot and the embedding offset. The same convention holds at training, scoring and
generation (``LarimarModel.tokenize_decoder``).

Usage::

    model = LarimarModel.from_backbones(LarimarConfig(), enc_model, enc_tok, dec_model, dec_tok)
    Z = model.encode_texts(["The capital of France is Rome."])[None]      # (1, 1, C)
    M = model.write(Z)                                                     # (1, K, C)
    z_read, _, _ = model.read(M, model.encode_texts(["The capital of France is"])[None])
    print(model.generate_text(["The capital of France is"], z_read[0], max_new_tokens=5))
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from larimar.conditioning import LatentDecoder, SentenceEnds, apply_lora, sentence_ends
from larimar.memory import EpisodicMemory, MemoryConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DECODER_TRAINING = ("frozen", "lora", "full")
# how long a latent conditions generation: the first sentence, then the plain decoder; or every token (the paper)
MEMORY_SPANS = ("sentence", "all")


def check_memory_span(memory_span: str) -> str:
    """Returns ``memory_span`` if it is one of `MEMORY_SPANS`, else raises ValueError."""
    if memory_span not in MEMORY_SPANS:
        raise ValueError(f"memory_span must be one of {MEMORY_SPANS}, got {memory_span!r}")
    return memory_span


# ----------------------------------------------------------------------------------------------------------
# Encoder adapter


def encoder_tokens(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, Tensor]:
    """Encoder input on the CPU: the tokenizer's special tokens, truncated to ``max_length``, right-padded;
    input_ids, attention_mask (B, Te)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings")
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class LatentEncoder(nn.Module):
    """An HF encoder, mean pooling over non-pad tokens, then Linear(hidden, C).

    The tokenizer's own special tokens ([CLS] ... [SEP]) are used at training and inference alike: both go
    through `tokenize`.

    Args:
        model: an HF encoder (``AutoModel``) returning ``last_hidden_state``.
        tokenizer: its tokenizer.
        latent_size: C.
        max_length: truncation length in tokens (special tokens included).
        generator: random generator for the projection's init.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, latent_size: int, max_length: int = 64,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if getattr(model, "pooler", None) is not None:
            # BERT-style [CLS] pooler head: unused by mean pooling, it would only hold never-updated weights
            model.pooler = None
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        hidden = int(model.config.hidden_size)
        self.proj = nn.Linear(hidden, latent_size)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(latent_size, hidden, generator=generator) / math.sqrt(hidden))
            self.proj.bias.zero_()

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenizes with the tokenizer's special tokens, right-padded: input_ids, attention_mask (B, Te)."""
        enc = encoder_tokens(self.tokenizer, texts, self.max_length)
        return {k: v.to(self.device) for k, v in enc.items()}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Encodes token ids (B, Te) with mask (B, Te) to latents z (B, C)."""
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, Te, H)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, Te, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, H)
        return self.proj(pooled.to(self.proj.weight.dtype))  # (B, C)

    def encode_texts(self, texts: list[str]) -> Tensor:
        """Encodes texts to latents z (B, C)."""
        return self(**self.tokenize(texts))


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class LarimarConfig:
    """Everything needed to rebuild a Larimar model around its backbones.

    Attributes:
        encoder: encoder name or path for `larimar.backbones.load_encoder` (None: the default MiniLM).
        decoder: decoder name or path for `larimar.backbones.load_decoder` (None: the default SmolLM2-135M).
        latent_size: C; must equal ``memory.code_size``.
        memory: the episodic memory's config.
        train_encoder: train the encoder backbone (the projection always trains).
        decoder_training: "frozen" (only the latent projections), "lora" or "full".
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (scaling alpha / r).
        lora_targets: LoRA target leaf module names (None: the architecture's q / v, see `DECODER_ARCHS`).
        lora_gated: the LoRA update acts only on rows decoded with a memory read-out (z != 0), so that z = 0
            stays exactly the pretrained decoder (out-of-scope queries, perplexity) while LoRA helps the
            decoder use the latent slot.
        max_encoder_length: encoder truncation length (tokens, special tokens included).
        max_decoder_length: decoder truncation length (tokens, the start token excluded).
        decoder_start_token: start token prepended to decoded texts, as a vocabulary string (None: the
            tokenizer's BOS, else its EOS). For SmolLM2-Instruct (BOS "<|im_start|>", a chat-turn marker) use
            "<|endoftext|>", the pretraining document separator: on plain sentences the untouched model's NLL
            is 3.15 nats / token after it against 4.74 after "<|im_start|>".
        seed: seed of the initialisation of the new parameters (a local generator; global RNG untouched).
    """

    encoder: str | None = None
    decoder: str | None = None
    latent_size: int = 384
    memory: MemoryConfig = field(default_factory=lambda: MemoryConfig(num_slots=512, code_size=384))
    train_encoder: bool = True
    decoder_training: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] | None = None
    lora_gated: bool = False
    max_encoder_length: int = 64
    max_decoder_length: int = 64
    decoder_start_token: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.memory, dict):
            self.memory = MemoryConfig(**self.memory)
        if self.memory.code_size != self.latent_size:
            raise ValueError(
                f"memory.code_size ({self.memory.code_size}) must equal latent_size ({self.latent_size})"
            )
        if self.decoder_training not in DECODER_TRAINING:
            raise ValueError(f"decoder_training must be one of {DECODER_TRAINING}, got {self.decoder_training!r}")
        if self.lora_targets is not None:
            self.lora_targets = list(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LarimarConfig":
        """Inverse of `to_dict`.

        Raises:
            KeyError: unknown keys.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KeyError(f"unknown LarimarConfig keys {unknown}; expected a subset of {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("memory"), dict):
            names = {f.name for f in fields(MemoryConfig)}
            bad = sorted(set(d["memory"]) - names)
            if bad:
                raise KeyError(f"unknown MemoryConfig keys {bad}; expected a subset of {sorted(names)}")
            d["memory"] = MemoryConfig(**d["memory"])
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# The model


def _token_ce(logits: Tensor, input_ids: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence summed NLL (B,) and target counts (B,) of next-token prediction.

    Token t is predicted from position t - 1 and counts where target_mask[:, t] is 1 (t >= 1).
    """
    logits = logits[:, :-1]  # (B, T-1, V)
    tgt = input_ids[:, 1:]  # (B, T-1)
    m = target_mask[:, 1:].float()  # (B, T-1)
    nll = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="none").view_as(tgt)  # (B, T-1)
    return (nll * m).sum(-1), m.sum(-1)


ROWS_SUFFIX, VALUES_SUFFIX = "::rows", "::values"  # a matrix stored as its changed rows (see save_pretrained)


def _embedding_key(encoder: nn.Module) -> str:
    """State-dict key of an HF encoder's token-embedding weight."""
    emb = encoder.get_input_embeddings()
    for name, module in encoder.named_modules():
        if module is emb:
            return f"{name}.weight"
    raise ValueError(f"{type(encoder).__name__} has no input embedding module")


def _start_token_id(tokenizer: Any, token: str | None) -> int:
    """Id of the decoder start token: ``token`` if given (one vocabulary entry), else BOS, else EOS."""
    if token is not None:
        vocab = tokenizer.get_vocab()
        if token not in vocab:
            raise ValueError(f"decoder_start_token {token!r} is not a token of the decoder tokenizer's vocabulary")
        return int(vocab[token])
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    raise ValueError("the decoder tokenizer has no BOS / EOS token: set LarimarConfig.decoder_start_token")


def decoder_pad_id(tokenizer: Any) -> int:
    """The id that pads decoder rows: the tokenizer's pad token, else its EOS, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(pad if pad is not None else (eos if eos is not None else 0))


class LarimarModel(nn.Module):
    """Encoder, episodic memory and latent-conditioned decoder (paper section 3).

    Args:
        config: the model config.
        encoder_model: HF encoder (``AutoModel``).
        encoder_tokenizer: its tokenizer.
        decoder_model: HF causal LM (model_type in `DECODER_ARCHS`).
        decoder_tokenizer: its tokenizer.

    Trainable parameters: the encoder projection, the decoder's latent projections, the memory prior M0 and
    read-noise head always; the encoder backbone if ``train_encoder``; LoRA weights with
    ``decoder_training="lora"``; every decoder weight with ``"full"``.
    """

    def __init__(
        self, config: LarimarConfig, encoder_model: nn.Module, encoder_tokenizer: Any, decoder_model: nn.Module,
        decoder_tokenizer: Any,
    ) -> None:
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(config.seed)
        self.encoder = LatentEncoder(
            encoder_model, encoder_tokenizer, config.latent_size, config.max_encoder_length, gen
        )
        self.memory = EpisodicMemory(config.memory)
        self.decoder = LatentDecoder(decoder_model, config.latent_size, gen)
        self.decoder_tokenizer = decoder_tokenizer
        for p in self.encoder.model.parameters():
            p.requires_grad_(config.train_encoder)
        for p in self.decoder.model.parameters():
            p.requires_grad_(config.decoder_training == "full")
        if config.decoder_training == "lora":
            targets = config.lora_targets or list(self.decoder.arch.lora_targets)
            wrapped = apply_lora(self.decoder.model, targets, config.lora_rank, config.lora_alpha, gen,
                                 gated=config.lora_gated)
            logger.info("LoRA (r=%d, gated=%s) on %d decoder modules", config.lora_rank, config.lora_gated,
                        len(wrapped))
        self.start_token_id = _start_token_id(decoder_tokenizer, config.decoder_start_token)
        eos = getattr(decoder_tokenizer, "eos_token_id", None)
        self.eos_token_id: int | None = None if eos is None else int(eos)
        self.pad_token_id = decoder_pad_id(decoder_tokenizer)

    @classmethod
    def from_backbones(
        cls, config: LarimarConfig, encoder_model: nn.Module, encoder_tokenizer: Any, decoder_model: nn.Module,
        decoder_tokenizer: Any,
    ) -> "LarimarModel":
        """Builds a model around already loaded backbones (tests, training)."""
        return cls(config, encoder_model, encoder_tokenizer, decoder_model, decoder_tokenizer)

    @property
    def encoder_tokenizer(self) -> Any:
        return self.encoder.tokenizer

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    # -- encoder / memory ------------------------------------------------------------------------------------
    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Encodes encoder tokens (B, Te) to latents z (B, C) (float32)."""
        return self.encoder(input_ids, attention_mask).float()

    def encode_texts(self, texts: list[str]) -> Tensor:
        """Encodes texts to latents z (B, C) (float32), with the encoder's special tokens."""
        return self.encoder.encode_texts(texts).float()

    def write(self, Z: Tensor, noise_std: float = 0.0) -> Tensor:
        """Batch-writes episodes Z (B, N, C); returns memories M (B, K, C)."""
        return self.memory.write(Z, noise_std=noise_std)

    def read(self, M: Tensor, Zq: Tensor, sample: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Reads memories M (B, K, C) at queries Zq (B, Q, C): z_read (B, Q, C), w_mean, w_std (B, Q, K)."""
        return self.memory.read(M, Zq, sample=sample)

    # -- decoder ---------------------------------------------------------------------------------------------
    def tokenize_decoder(
        self, texts: list[str], add_start: bool = True, left_pad: bool = False, max_length: int | None = None
    ) -> dict[str, Tensor]:
        """Tokenizes texts for the decoder: the start token, then the text's tokens (no other special tokens).

        Args:
            texts: the texts.
            add_start: prepend the start token (the convention everywhere in this model).
            left_pad: pad on the left (generation) instead of the right (training, scoring).
            max_length: truncation of the text's tokens (default: ``config.max_decoder_length``).

        Returns:
            input_ids and attention_mask (B, T).
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings")
        max_length = max_length or self.config.max_decoder_length
        rows = [self.decoder_tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
        if add_start:
            rows = [[self.start_token_id, *r] for r in rows]
        return self._pad(rows, left_pad)

    def _pad(self, rows: list[list[int]], left_pad: bool) -> dict[str, Tensor]:
        T = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(T - len(r), T) if left_pad else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def decode_logits(self, input_ids: Tensor, attention_mask: Tensor | None, latent: Tensor | None) -> Tensor:
        """Decoder logits (B, T, V) for tokens (B, T) conditioned on latent (B, C) (None / zero rows: no memory)."""
        return self.decoder(input_ids, attention_mask, latent)

    def token_nll(
        self, input_ids: Tensor, attention_mask: Tensor | None, latent: Tensor | None, target_mask: Tensor
    ) -> Tensor:
        """Mean NLL per sequence (B,) of the target tokens.

        Args:
            input_ids: tokens (B, T) (right padded; starting with the start token).
            attention_mask: (B, T).
            latent: z (B, C) or None.
            target_mask: (B, T), 1 at tokens to score (position 0 is never scored: nothing predicts it).

        Returns:
            (B,) mean NLL over each row's target tokens (0 for a row without targets).
        """
        logits = self.decode_logits(input_ids, attention_mask, latent)  # (B, T, V)
        if attention_mask is not None:
            target_mask = target_mask * attention_mask
        total, count = _token_ce(logits, input_ids, target_mask)
        return total / count.clamp_min(1.0)

    def continuation_nll(self, prompts: list[str], continuations: list[str], latent: Tensor | None) -> Tensor:
        """Mean NLL per row (B,) of ``continuations[i]`` after ``prompts[i]`` (e.g. " Rome" after a prompt).

        Prompt and continuation are tokenized separately and concatenated, after the start token.
        """
        input_ids, attention_mask, target = self.continuation_batch(prompts, continuations)
        return self.token_nll(input_ids, attention_mask, latent, target)

    def continuation_batch(self, prompts: list[str], continuations: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded decoder input for scoring ``continuations[i]`` after ``prompts[i]``: input_ids,
        attention_mask and target_mask (B, T), the last 1 at the continuation's tokens.

        Prompt and continuation are tokenized separately and concatenated, after the start token.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"got {len(prompts)} prompts and {len(continuations)} continuations")
        tok = self.decoder_tokenizer
        rows, starts = [], []
        for p, c in zip(prompts, continuations):
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            c_ids = tok(c, add_special_tokens=False)["input_ids"]
            if not c_ids:
                raise ValueError(f"continuation {c!r} tokenizes to nothing")
            rows.append([self.start_token_id, *p_ids, *c_ids])
            starts.append(1 + len(p_ids))
        batch = self._pad(rows, left_pad=False)
        target = torch.zeros_like(batch["attention_mask"])
        for i, (r, s) in enumerate(zip(rows, starts)):
            target[i, s : len(r)] = 1
        return batch["input_ids"], batch["attention_mask"], target

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        latent: Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        memory_span: str = "all",
    ) -> Tensor:
        """New tokens (B, n) continuing left-padded prompts (B, T) under latent (B, C); see `LatentDecoder.generate`.

        ``memory_span`` "sentence": a row with a latent is conditioned on it until its first sentence ends (or it
        starts a word it has already said), then the plain decoder continues the text (`SentenceEnds`); "all":
        the latent conditions every token (the paper's decoding)."""
        check_memory_span(memory_span)
        return self.decoder.generate(
            input_ids, latent, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
            temperature=temperature, top_p=top_p,
            eos_token_id=self.eos_token_id if eos_token_id is None else eos_token_id,
            pad_token_id=self.pad_token_id, generator=generator,
            hand_off=self.sentence_ends if memory_span == "sentence" and latent is not None else None,
        )

    @functools.cached_property
    def sentence_ends(self) -> SentenceEnds:
        """The decoder tokenizer's `SentenceEnds` flags (V,), computed on first use (a constant of the model)."""
        head = self.decoder.model.get_output_embeddings()
        size = head.weight.shape[0] if head is not None else len(self.decoder_tokenizer)
        return sentence_ends(self.decoder_tokenizer, size)

    def generate_text(
        self, prompts: list[str], latent: Tensor | None = None, max_new_tokens: int = 32, truncate: bool = True,
        **kwargs: Any,
    ) -> list[str]:
        """Generates continuations of prompts (start token prepended, left padded); keyword args as `generate`.

        ``truncate=False`` keeps every prompt whole instead of cutting it to ``config.max_decoder_length`` tokens
        (a retrieved sentence + a prompt may be longer)."""
        max_length = None
        if not truncate:
            longest = max(len(self.decoder_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
            max_length = max(longest, self.config.max_decoder_length)
        batch = self.tokenize_decoder(prompts, left_pad=True, max_length=max_length)
        new = self.generate(batch["input_ids"], batch["attention_mask"], latent, max_new_tokens, **kwargs)
        texts = []
        for row in new.tolist():
            if self.eos_token_id is not None and self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            texts.append(self.decoder_tokenizer.decode(row, skip_special_tokens=True))
        return texts

    # -- training loss (paper Eq. 1) -------------------------------------------------------------------------
    def loss(
        self,
        batch: dict[str, Tensor],
        beta: float,
        write_noise_std: float = 0.0,
        rec_weight: float = 1.0,
        ae_weight: float = 1.0,
        lm_weight: float = 1.0,
        sample_read: bool | None = None,
    ) -> dict[str, Tensor]:
        """rec * CE(x | z_read) + ae * CE(x | z_enc) + beta * KL(w) + lm * CE(x | z = 0).

        Args:
            batch: episodes of E texts: ``enc_input_ids``, ``enc_attention_mask`` (B, E, Te) (encoder tokens,
                special tokens included) and ``dec_input_ids``, ``dec_attention_mask`` (B, E, Td) (decoder tokens
                of the same texts, right padded, without the start token: it is prepended here, so every
                token is a target). Optional ``query_input_ids``, ``query_attention_mask`` (B, E, Tq): encoder
                tokens of the queries that read block e back (default: the blocks themselves). Optional
                ``dec_target_mask`` (B, E, Td): the decoder tokens the rec and ae terms score (default: all; e.g.
                only the continuation after a prefix query, as an edit is scored on the answer after its prompt).
            beta: KL weight.
            write_noise_std: std of the noise added to Z when writing.
            rec_weight, ae_weight, lm_weight: weights of the three CE terms; a zero weight skips that forward.
            sample_read: sample the read weights (default: ``self.training``).

        Returns:
            dict with scalars ``loss``, ``rec``, ``ae``, ``kl``, ``lm`` (CE are token means; a skipped term
            reports 0).
        """
        for key in ("enc_input_ids", "enc_attention_mask", "dec_input_ids", "dec_attention_mask"):
            if key not in batch:
                raise KeyError(f"batch is missing {key!r}")
        enc_ids, enc_mask = batch["enc_input_ids"], batch["enc_attention_mask"]
        dec_ids, dec_mask = batch["dec_input_ids"], batch["dec_attention_mask"]
        if enc_ids.dim() != 3 or dec_ids.dim() != 3 or enc_ids.shape[:2] != dec_ids.shape[:2]:
            raise ValueError(
                f"expected enc tokens (B, E, Te) and dec tokens (B, E, Td), got {tuple(enc_ids.shape)} "
                f"and {tuple(dec_ids.shape)}"
            )
        B, E = enc_ids.shape[:2]
        Z = self.encode(enc_ids.flatten(0, 1), enc_mask.flatten(0, 1)).view(B, E, -1)  # (B, E, C)
        Zq = Z  # queries: the written items themselves (the paper), or given query texts (e.g. their prefixes)
        if "query_input_ids" in batch:
            q_ids, q_mask = batch["query_input_ids"], batch["query_attention_mask"]
            Zq = self.encode(q_ids.flatten(0, 1), q_mask.flatten(0, 1)).view(B, E, -1)  # (B, E, C)
        sample = self.training if sample_read is None else sample_read
        # write the episode and read it back at the queries (the write's low-rank fast path)
        _, z_read, w_mean, w_std = self.memory.write_read(Z, Zq, noise_std=write_noise_std, sample=sample)
        kl = self.memory.kl(w_mean, w_std)

        ids, mask = dec_ids.flatten(0, 1), dec_mask.flatten(0, 1).long()  # (N, Td), N = B * E
        if bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError("dec_attention_mask must be right padded (ones, then zeros)")
        N = ids.shape[0]
        start = torch.full((N, 1), self.start_token_id, dtype=ids.dtype, device=ids.device)
        ids = torch.cat([start, ids], 1)  # (N, 1 + Td)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)  # (N, 1 + Td)
        target = mask
        if "dec_target_mask" in batch:
            t = batch["dec_target_mask"].flatten(0, 1).long()  # (N, Td)
            target = torch.cat([torch.zeros_like(t[:, :1]), t], 1) * mask  # (N, 1 + Td)

        # one decoder forward for all terms with a non-zero weight: (n_terms * N) rows
        terms = {"rec": z_read.reshape(N, -1), "ae": Z.reshape(N, -1), "lm": torch.zeros_like(Z.reshape(N, -1))}
        weights = {"rec": rec_weight, "ae": ae_weight, "lm": lm_weight}
        names = [k for k in terms if weights[k] != 0] or ["rec"]
        latents = [terms[k] for k in names]  # (N, C) each
        n_terms = len(latents)
        targets = torch.cat([mask if k == "lm" else target for k in names], 0)  # (n_terms * N, 1 + Td)
        ids, mask = ids.repeat(n_terms, 1), mask.repeat(n_terms, 1)  # (n_terms * N, 1 + Td)
        logits = self.decode_logits(ids, mask, torch.cat(latents, 0))  # (n_terms * N, 1 + Td, V)
        total, count = _token_ce(logits, ids, targets)  # (n_terms * N,)
        ce = total.view(n_terms, N).sum(1) / count.view(n_terms, N).sum(1).clamp_min(1.0)  # (n_terms,)
        zero = torch.zeros((), device=ce.device)
        out = {k: (ce[names.index(k)] if k in names else zero) for k in terms}  # skipped terms report 0
        loss = sum(weights[k] * out[k] for k in names) + beta * kl
        return {"loss": loss, **out, "kl": kl}

    # -- save / load -----------------------------------------------------------------------------------------
    def _is_saved(self, name: str) -> bool:
        """Whether a state-dict entry is new or changed relative to the pretrained backbones."""
        if name.startswith("memory.") or name.startswith("encoder.proj."):
            return True
        if name.startswith("decoder.kv_proj.") or name.startswith("decoder.emb_proj."):
            return True
        if ".lora_A" in name or ".lora_B" in name:
            return True
        if name.startswith("encoder.model."):
            return self.config.train_encoder
        if name.startswith("decoder.model."):
            return self.config.decoder_training == "full"
        return False

    def saved_state_dict(self, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The tensors `save_pretrained` writes (tied weights once, under their first name), taken from
        ``state_dict`` when given (e.g. the full tensors gathered from an FSDP-sharded model), else the model's."""
        out: dict[str, Tensor] = {}
        seen: set[tuple[int, int, tuple[int, ...]]] = set()
        for name, t in (self.state_dict() if state_dict is None else state_dict).items():
            if not self._is_saved(name):
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key in seen:
                continue
            seen.add(key)
            out[name] = t.detach().contiguous().cpu()
        return out

    def save_pretrained(
        self, directory: str | Path, storage_dtype: torch.dtype | None = None, base_encoder: nn.Module | None = None,
        state_dict: dict[str, Tensor] | None = None, base_rounding: torch.dtype | None = None,
    ) -> None:
        """Writes ``config.json`` (naming the backbones) and ``model.safetensors`` (new / changed tensors only).

        Args:
            directory: the folder.
            storage_dtype: store the weights in this dtype (e.g. ``torch.float16``, to halve a shipped checkpoint);
                they are cast back to the model's dtype on load. The memory prior (M0, read noise) is always
                stored as it is, so that memory keys computed against it do not move.
            base_encoder: the pretrained encoder this model's encoder was trained from (``config.encoder``). With
                it, the rows of the encoder's token-embedding matrix that training left exactly unchanged are not
                stored (``NAME::rows`` and ``NAME::values`` hold the changed rows); on load they come from the
                backbone. Fine-tuning touches only the rows of tokens it saw.
            state_dict: the tensors to save instead of the model's own (the gathered weights of a sharded model).
            base_rounding: with ``base_encoder``, a row equal to the base row rounded to this dtype also counts as
                unchanged (a model trained from a float16 copy of the backbone keeps float16-rounded values in
                the rows it never trained); on load such rows come from the backbone exactly.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        tensors = self.saved_state_dict(state_dict)
        if base_encoder is not None:
            key = _embedding_key(base_encoder)
            name = "encoder.model." + key
            if name in tensors:
                base = base_encoder.state_dict()[key].to(tensors[name].dtype).cpu()
                if base.shape != tensors[name].shape:
                    raise ValueError(f"base_encoder's token embedding {tuple(base.shape)} does not match "
                                     f"{tuple(tensors[name].shape)}")
                same = tensors[name] == base  # (V, H)
                if base_rounding is not None:
                    same |= tensors[name] == base.to(base_rounding).to(base.dtype)
                rows = (~same).any(-1).nonzero().flatten()  # (R,)
                weight = tensors.pop(name)
                tensors[name + ROWS_SUFFIX], tensors[name + VALUES_SUFFIX] = rows, weight[rows].contiguous()
        if storage_dtype is not None:
            tensors = {k: (t.to(storage_dtype) if t.is_floating_point() and not k.startswith("memory.") else t)
                       for k, t in tensors.items()}
        meta = {"format": "larimar", "storage_dtype": str(storage_dtype or "as trained")}
        save_file(tensors, str(d / WEIGHTS_NAME), metadata=meta)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        encoder: tuple[nn.Module, Any] | None = None,
        decoder: tuple[nn.Module, Any] | None = None,
    ) -> "LarimarModel":
        """Loads a model written by `save_pretrained`.

        Args:
            directory: the saved model's folder.
            device: where to put the model (default: CPU).
            dtype: dtype of the encoder and decoder (with their projections); the memory stays float32.
            encoder: an already built (model, tokenizer) instead of ``load_encoder(config.encoder)``.
            decoder: an already built (model, tokenizer) instead of ``load_decoder(config.decoder)``.

        Raises:
            FileNotFoundError: missing files.
            ValueError: saved tensors that the model does not use, of the wrong shape, or missing.
        """
        d = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} not found (expected a folder written by save_pretrained)")
        config = LarimarConfig.from_dict(json.loads((d / CONFIG_NAME).read_text()))
        if encoder is None or decoder is None:
            from larimar import backbones

            if encoder is None:
                encoder = backbones.load_encoder(config.encoder)
            if decoder is None:
                decoder = backbones.load_decoder(config.decoder)
        model = cls(config, encoder[0], encoder[1], decoder[0], decoder[1])
        tensors = load_file(str(d / WEIGHTS_NAME))
        own = model.state_dict()
        for key in [k for k in tensors if k.endswith(ROWS_SUFFIX)]:  # changed rows over the backbone's own
            name = key[: -len(ROWS_SUFFIX)]
            values = tensors.pop(name + VALUES_SUFFIX, None)
            rows = tensors.pop(key)
            if name not in own or values is None or values.shape[1:] != own[name].shape[1:] or (
                    rows.numel() and int(rows.max()) >= own[name].shape[0]) or len(rows) != len(values):
                raise ValueError(f"{d / WEIGHTS_NAME}: bad changed-rows entry for {name!r}")
            full = own[name].detach().clone()
            full[rows] = values.to(full.dtype)
            tensors[name] = full
        unexpected = sorted(k for k in tensors if k not in own)
        if unexpected:
            raise ValueError(f"saved tensors not used by the model: {unexpected[:10]}")
        bad = [k for k, t in tensors.items() if tuple(t.shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"saved tensors with the wrong shape: {[(k, tuple(tensors[k].shape)) for k in bad[:10]]}")
        missing = sorted(set(model.saved_state_dict()) - set(tensors))
        if missing:
            raise ValueError(f"tensors missing from {d / WEIGHTS_NAME}: {missing[:10]}")
        with torch.no_grad():
            for k, t in tensors.items():
                own[k].copy_(t)  # state_dict entries share storage with the parameters
        if device is not None:
            model.to(device)
        if dtype is not None:
            model.encoder.to(dtype=dtype)
            model.decoder.to(dtype=dtype)
        return model
