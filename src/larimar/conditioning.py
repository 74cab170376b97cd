"""The latent-conditioned decoder: a pretrained HF causal LM reading a latent z (B, C) (docs/method.md, "Model").

Conditioning, for a latent z (B, C) and a decoder with L layers, H_kv key/value heads of size D:

    key_l = value_l = (W z)[l]          W: Linear(C, L * H_kv * D), split per layer to (B, H_kv, 1, D);
                                        not rotated, no position; inserted as a pre-filled DynamicCache
    embeds_t = E[x_t] + W_emb z         W_emb: Linear(C, hidden) on every token

so every layer attends to one extra key/value slot W_l z before the real tokens, and every token embedding
gets the additive offset W_emb z. An optional gated LoRA (`apply_lora` with ``gated=True``) acts only on rows
that have a memory slot.

A row whose z is exactly zero means "no memory": its latent slot is masked out (and a gated LoRA is off), so
that row runs the untouched pretrained decoder (to float rounding). Real tokens get position ids 0..T-1
(counted over non-pad tokens), as without memory, so absolute-position models (GPT-2) see the same positions.

Pieces, top to bottom:
    DecoderArch / DECODER_ARCHS   per-architecture differences as data (keyed by the config's ``model_type``)
    DecoderShape / decoder_shape  layers, key/value heads, head size and width read through the table
    LoRALinear / apply_lora       a small hand-written LoRA for nn.Linear and GPT-2's Conv1D (gated or not);
                                  `lora_gate` sets the gate of one call (thread- / task-local)
    positions_from_mask           position ids (B, T) over non-pad tokens
    SentenceEnds / sentence_ends  per-token flags (V,) that find where a generated sentence ends
    LatentDecoder                 HF causal LM conditioned on z: a latent key/value slot per layer (a real
                                  cache prefix) + an additive embedding offset; step / prefill / forward and
                                  cached generation (greedy or temperature / nucleus sampling), optionally
                                  handing each row to the plain decoder after its first sentence (or a word
                                  said again)

Usage::

    decoder = LatentDecoder(AutoModelForCausalLM.from_pretrained(name), latent_size=384)
    logits = decoder(input_ids, attention_mask, latent)                 # (B, T, V); latent (B, C) or None
    new = decoder.generate(prompt_ids, latent, max_new_tokens=5, attention_mask=prompt_mask)   # (B, n)
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.pytorch_utils import Conv1D

# ----------------------------------------------------------------------------------------------------------
# Per-architecture differences, as data


@dataclass(frozen=True)
class DecoderArch:
    """Where a decoder family keeps what the latent conditioning needs.

    Attributes:
        num_layers: config attribute holding the number of transformer layers.
        num_heads: config attribute holding the number of attention (query) heads.
        num_kv_heads: config attribute holding the number of key/value heads (None: same as num_heads).
        hidden_size: config attribute holding the model width.
        head_dim: config attribute holding the head size, if the config has one (else hidden / heads).
        embedding: module path of the token embedding inside the causal-LM model.
        lora_targets: default LoRA target module names (leaf names) for "q and v" in this family.
    """

    num_layers: str
    num_heads: str
    num_kv_heads: str | None
    hidden_size: str
    head_dim: str | None
    embedding: str
    lora_targets: tuple[str, ...]


DECODER_ARCHS: dict[str, DecoderArch] = {
    "llama": DecoderArch(
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim",
        "model.embed_tokens", ("q_proj", "v_proj"),
    ),
    "gpt2": DecoderArch("n_layer", "n_head", None, "n_embd", None, "transformer.wte", ("c_attn",)),
    "gpt_neox": DecoderArch(
        "num_hidden_layers", "num_attention_heads", None, "hidden_size", None, "gpt_neox.embed_in",
        ("query_key_value",),
    ),
    "gptj": DecoderArch("n_layer", "n_head", None, "n_embd", None, "transformer.wte", ("q_proj", "v_proj")),
}


@dataclass(frozen=True)
class DecoderShape:
    """Sizes of a decoder read from its config through its `DecoderArch`."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int


def decoder_arch(hf_config: Any) -> DecoderArch:
    """The `DecoderArch` of an HF config, by its ``model_type``.

    Raises:
        ValueError: the model type is not supported.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in DECODER_ARCHS:
        raise ValueError(f"unsupported decoder model_type {model_type!r}; expected one of {sorted(DECODER_ARCHS)}")
    return DECODER_ARCHS[model_type]


def decoder_shape(hf_config: Any) -> DecoderShape:
    """Number of layers, key/value heads, head size and width of a supported decoder config."""
    arch = decoder_arch(hf_config)
    layers = int(getattr(hf_config, arch.num_layers))
    heads = int(getattr(hf_config, arch.num_heads))
    hidden = int(getattr(hf_config, arch.hidden_size))
    kv_heads = int(getattr(hf_config, arch.num_kv_heads) or heads) if arch.num_kv_heads else heads
    head_dim = getattr(hf_config, arch.head_dim, None) if arch.head_dim else None
    return DecoderShape(layers, kv_heads, int(head_dim) if head_dim else hidden // heads, hidden)


# ----------------------------------------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x A^T B^T, for a frozen nn.Linear or GPT-2 Conv1D ``base``.

    B starts at zero, so a fresh LoRA leaves the model unchanged.

    Args:
        base: the wrapped layer (kept as ``self.base``; its weights are not touched).
        rank: r.
        alpha: scaling numerator.
        generator: random generator for the init of A.
        gated: the update applies only through the gate of the current call, a (B, 1, 1) per-row factor that
            `LatentDecoder.step` sets for one forward with `lora_gate` (1 for rows with a memory read-out, 0 for
            z = 0); with no gate set, a gated LoRA is off and the layer is exactly ``base``. The gate lives in a
            `contextvars.ContextVar` (thread- and task-local), never on the module, so any number of threads can
            run the same model at once.
    """

    def __init__(
        self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None, gated: bool = False
    ) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            in_features, out_features = base.weight.shape  # Conv1D stores (in, out)
        else:
            raise ValueError(f"LoRA supports nn.Linear and Conv1D, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        w = base.weight
        A = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        self.lora_A = nn.Parameter(A.to(w.device, w.dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=w.device, dtype=w.dtype))  # (out, r)
        self.gated = gated

    @property
    def gate(self) -> Tensor | None:
        """The gate (B, 1, 1) of the forward running in this thread / task (None outside `lora_gate`)."""
        return _LORA_GATE.get() if self.gated else None

    def forward(self, x: Tensor) -> Tensor:
        gate = _LORA_GATE.get() if self.gated else None
        if self.gated and gate is None:
            return self.base(x)
        delta = (x @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (..., out)
        if gate is not None:
            delta = delta * gate.to(delta.dtype)  # (B, T, out) * (B, 1, 1)
        return self.base(x) + delta


# The per-row gate of the gated LoRA layers for the forward running in this thread / asyncio task. A ContextVar,
# not a module attribute: concurrent forwards of one shared model each see their own gate.
_LORA_GATE: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("larimar_lora_gate", default=None)


@contextlib.contextmanager
def lora_gate(gate: Tensor | None) -> Iterator[None]:
    """Sets the gate (B, 1, 1) of every gated `LoRALinear` for the calls made inside the block, in this thread /
    task only (restored on exit, also on error)."""
    token = _LORA_GATE.set(gate)
    try:
        yield
    finally:
        _LORA_GATE.reset(token)


def apply_lora(
    model: nn.Module, targets: list[str] | tuple[str, ...], rank: int, alpha: float,
    generator: torch.Generator | None = None, gated: bool = False,
) -> list[str]:
    """Wraps every submodule whose leaf name is in ``targets`` in a `LoRALinear` (``gated`` as there), in place.

    Returns:
        the qualified names of the wrapped modules.

    Raises:
        ValueError: no module matched.
    """
    names = [
        n for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in targets and isinstance(m, (nn.Linear, Conv1D))
    ]
    if not names:
        raise ValueError(f"no nn.Linear / Conv1D module named one of {list(targets)} in {type(model).__name__}")
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, generator, gated))
    if gated:  # the gated layers, for whoever sets their gate per forward (see `gated_lora`)
        model.__dict__.setdefault(GATED_LORA_ATTR, []).extend(model.get_submodule(n) for n in names)
    return names


GATED_LORA_ATTR = "_larimar_gated_lora"


def gated_lora(model: nn.Module) -> list[LoRALinear]:
    """The gated `LoRALinear` layers `apply_lora` put into ``model`` (recorded there, not searched for)."""
    return model.__dict__.get(GATED_LORA_ATTR, [])


# ----------------------------------------------------------------------------------------------------------
# Latent-conditioned decoder


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids (B, T) counting non-pad tokens from 0 (pads get 0); arange(T) without padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


_SENTENCE_END = (".", "!", "?")
_CLOSERS = "\"')]}\u201d\u2019"  # closing quotes and brackets that may follow a sentence's end


@dataclass(frozen=True)
class SentenceEnds:
    """Per-token flags (V,) (bool) that find where a generated sentence ends (`LatentDecoder.generate`).

    A row's first sentence ends before the first token that holds a line break, or that starts a new word right
    after a token that ends with ".", "!" or "?" (closing quotes or brackets allowed), once the row has produced a
    letter or digit. "2.5" and "U.S." do not end it (no space follows the dot); "St. Louis" does. The hand-off
    also comes before a token that starts a word (white space, then a letter or digit) the row has already
    started under its latent: " Leeds Leeds ..." is handed off after the first " Leeds".

    Attributes:
        ends: the token's text ends a sentence.
        spaced: the token's text starts with white space (a new word).
        newline: the token's text holds a line break.
        word: the token's text holds a letter or a digit.
    """

    ends: Tensor
    spaced: Tensor
    newline: Tensor
    word: Tensor

    def to(self, device: torch.device | str) -> SentenceEnds:
        return SentenceEnds(*(t.to(device) for t in (self.ends, self.spaced, self.newline, self.word)))


def sentence_ends(tokenizer: Any, vocab_size: int) -> SentenceEnds:
    """The `SentenceEnds` flags of a Hugging Face tokenizer's tokens, for logits of ``vocab_size`` entries (ids
    the tokenizer lacks and its special tokens get no flag). Byte-level BPE ("Ġ", "Ċ") and SentencePiece ("▁",
    "<0x0A>") pieces are read for the white space that decoding a single token may drop."""
    n = min(len(tokenizer), vocab_size)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    flags = torch.zeros(4, vocab_size, dtype=torch.bool)  # ends, spaced, newline, word
    for i, (piece, text) in enumerate(zip(pieces, texts)):
        if i in special or piece is None:
            continue
        flags[0, i] = text.rstrip(_CLOSERS).endswith(_SENTENCE_END)
        flags[1, i] = text[:1].isspace() or piece.startswith(("\u0120", "\u2581", "\u010a"))
        flags[2, i] = "\n" in text or piece == "<0x0A>" or "\u010a" in piece
        flags[3, i] = any(c.isalnum() for c in text)
    return SentenceEnds(*flags)


class _FirstSentence:
    """The hand-off rule of `SentenceEnds` over one generation, token by token: per row (B,), whether it has said
    a letter or digit, whether its last token ended a sentence, and the word-starting tokens it has said (B, V)."""

    def __init__(self, flags: SentenceEnds, has_slot: Tensor) -> None:
        self.flags, self.has_slot = flags, has_slot  # (V,) flags; (B,) rows that can be handed off
        self.starts_word = flags.spaced & flags.word  # (V,)
        self.worded = torch.zeros_like(has_slot)
        self.after_end = torch.zeros_like(has_slot)
        self.said = torch.zeros(has_slot.shape[0], flags.word.shape[0], dtype=torch.bool, device=has_slot.device)

    def ends_before(self, nxt: Tensor, done: Tensor) -> Tensor:
        """(B,) rows (not ``done``, with a slot) whose first sentence ends before token ``nxt`` (B,); then takes
        ``nxt`` in."""
        f = self.flags
        again = self.said.gather(1, nxt[:, None])[:, 0]  # (B,): a word the row already said
        ends = f.newline[nxt] | (f.spaced[nxt] & self.after_end) | again
        at = ~done & self.has_slot & self.worded & ends
        self.worded, self.after_end = self.worded | f.word[nxt], f.ends[nxt]
        self.said.scatter_(1, nxt[:, None], (self.starts_word[nxt] | again)[:, None])
        return at


class LatentDecoder(nn.Module):
    """A pretrained HF causal LM conditioned on a latent z (B, C).

    Args:
        model: an HF causal LM whose config ``model_type`` is in `DECODER_ARCHS`.
        latent_size: C.
        generator: random generator for the init of the latent key/value projection.

    The key/value projection starts small (std 0.02) and the embedding offset at zero, so an untrained
    conditioning perturbs the pretrained model only slightly. Gradient checkpointing is refused in training:
    HF layers drop the cache under it, and with it the latent slot.
    """

    def __init__(self, model: nn.Module, latent_size: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.model = model
        self.arch = decoder_arch(model.config)
        self.shape = decoder_shape(model.config)
        s = self.shape
        w = self.embedding.weight
        self.latent_size = latent_size
        self.kv_proj = nn.Linear(latent_size, s.num_layers * s.num_kv_heads * s.head_dim, bias=False)
        self.emb_proj = nn.Linear(latent_size, s.hidden_size, bias=False)
        with torch.no_grad():
            self.kv_proj.weight.copy_(0.02 * torch.randn(self.kv_proj.weight.shape, generator=generator))
            self.emb_proj.weight.zero_()
        self.kv_proj.to(w.device, w.dtype)
        self.emb_proj.to(w.device, w.dtype)
        # HF causal LMs of transformers >= 4.45 can project only the last positions to the vocabulary
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def embedding(self) -> nn.Embedding:
        """The token embedding module (path from the architecture table)."""
        return self.model.get_submodule(self.arch.embedding)

    @property
    def device(self) -> torch.device:
        return self.kv_proj.weight.device

    def _check_latent(self, latent: Tensor | None, batch: int) -> Tensor:
        dtype = self.kv_proj.weight.dtype
        if latent is None:
            return torch.zeros(batch, self.latent_size, device=self.device, dtype=dtype)
        if latent.dim() != 2 or tuple(latent.shape) != (batch, self.latent_size):
            raise ValueError(f"latent must have shape ({batch}, {self.latent_size}), got {tuple(latent.shape)}")
        return latent.to(self.device, dtype)

    def latent_cache(self, latent: Tensor) -> tuple[DynamicCache, Tensor]:
        """A cache pre-filled with the latent slot, and the slot's attention mask.

        Args:
            latent: z (B, C); rows that are exactly zero get a masked slot (no memory).

        Returns:
            a `DynamicCache` with one (B, H_kv, 1, D) key = value per layer, and the slot mask (B, 1) (long).
        """
        s = self.shape
        B = latent.shape[0]
        kv = self.kv_proj(latent).view(B, s.num_layers, s.num_kv_heads, 1, s.head_dim)  # (B, L, H_kv, 1, D)
        cache = DynamicCache(config=self.model.config)
        for layer in range(s.num_layers):
            cache.update(kv[:, layer], kv[:, layer], layer)  # key = value = W_l z, (B, H_kv, 1, D)
        slot_mask = latent.ne(0).any(-1, keepdim=True).long()  # (B, 1)
        return cache, slot_mask

    def step(
        self, input_ids: Tensor, latent: Tensor, full_mask: Tensor, position_ids: Tensor, cache: DynamicCache,
        last_only: bool = False,
    ) -> Tensor:
        """One forward of new tokens through a latent cache (from `latent_cache`), extending it.

        Args:
            input_ids: new tokens (B, t).
            latent: z (B, C) (for the embedding offset).
            full_mask: (B, 1 + past + t): the slot mask, then the mask of every token seen so far.
            position_ids: positions (B, t) of the new tokens.
            cache: the cache, updated in place.
            last_only: project only the last position to the vocabulary (a generation prefill: the (t, V) head
                product is most of a short prompt's cost), where the decoder supports ``logits_to_keep``.

        Returns:
            logits (B, t, V), or (B, 1, V) with ``last_only``.
        """
        embeds = self.embedding(input_ids) + self.emb_proj(latent).unsqueeze(1)  # (B, t, hidden)
        # a gated LoRA acts on rows with a memory slot only (z = 0 rows: the plain decoder); the gate is this
        # call's (a context variable), not an attribute of the shared modules
        gate = full_mask[:, :1, None].to(embeds.dtype) if gated_lora(self.model) else None  # (B, 1, 1)
        extra = {"logits_to_keep": 1} if last_only and self._keeps_logits else {}
        with lora_gate(gate):
            out = self.model(
                inputs_embeds=embeds, attention_mask=full_mask, position_ids=position_ids, cache=cache, use_cache=True,
                **extra,
            )
        return out.logits[:, -1:] if last_only else out.logits

    def prefill_plain(self, input_ids: Tensor) -> tuple[DynamicCache, Tensor, Tensor]:
        """Runs one context (1, P) through the plain decoder (z = 0), to continue many rows from it with `step`.

        Returns:
            the cache (repeat it over a batch with ``cache.batch_repeat_interleave(b)`` on a copy), its mask
            (1, 1 + P) (slot, then the context) and the logits (1, P, V).
        """
        latent = self._check_latent(None, 1)  # (1, C) zeros
        cache, slot_mask = self.latent_cache(latent)
        P = input_ids.shape[1]
        full_mask = torch.cat([slot_mask, torch.ones_like(input_ids)], dim=1)  # (1, 1 + P)
        positions = torch.arange(P, device=input_ids.device)[None]  # (1, P)
        logits = self.step(input_ids, latent, full_mask, positions, cache)
        return cache, full_mask, logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, latent: Tensor | None = None) -> Tensor:
        """Logits of the decoder conditioned on latent.

        Args:
            input_ids: tokens (B, T), left or right padded.
            attention_mask: (B, T), 1 for real tokens (default: all ones).
            latent: z (B, C); None or zero rows mean no memory.

        Returns:
            logits (B, T, V).
        """
        checkpointing = getattr(self.model, "is_activation_checkpointing", None)  # transformers >= 5.x name
        if checkpointing is None:
            checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        if self.training and checkpointing:
            raise ValueError("gradient checkpointing drops the latent cache slot; disable it on the decoder")
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        latent = self._check_latent(latent, B)
        cache, slot_mask = self.latent_cache(latent)
        full_mask = torch.cat([slot_mask, attention_mask.long()], dim=1)  # (B, 1 + T)
        return self.step(input_ids, latent, full_mask, positions_from_mask(attention_mask), cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        latent: Tensor | None,
        max_new_tokens: int,
        attention_mask: Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        hand_off: SentenceEnds | None = None,
    ) -> Tensor:
        """Continues left-padded prompts, with the KV cache.

        Args:
            input_ids: prompts (B, T), left padded.
            latent: z (B, C) or None (no memory).
            max_new_tokens: number of tokens to generate at most.
            attention_mask: (B, T) (default: all ones).
            do_sample: sample instead of greedy decoding.
            temperature: softmax temperature when sampling.
            top_p: nucleus sampling threshold when sampling.
            eos_token_id: a row stops after emitting it.
            pad_token_id: fills finished rows (default: eos_token_id, else 0).
            generator: random generator for sampling.
            use_cache: False recomputes the whole sequence every step (the reference for tests).
            hand_off: flags of the tokens that end a sentence (`sentence_ends`): a row with a memory slot is
                conditioned on its latent until its first sentence ends or it starts a word it has already said
                under it, then the plain decoder (z = 0) goes on from the prompt and that text, for the tokens
                left. None: the latent conditions every token.

        Returns:
            new token ids (B, n) with n <= max_new_tokens (all rows stopped early: n is smaller).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        B = input_ids.shape[0]
        prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        mask = prompt_mask
        latent = self._check_latent(latent, B)
        pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
        seq = input_ids
        out: list[Tensor] = []
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        cache, slot_mask = self.latent_cache(latent)
        has_slot = slot_mask[:, 0].bool()  # (B,): rows with a memory read-out, the only ones handed off
        watch = None
        if hand_off is not None and bool(has_slot.any()):
            watch = _FirstSentence(hand_off.to(input_ids.device), has_slot)
        cut = torch.full((B,), -1, dtype=torch.long, device=input_ids.device)  # where a row was handed off
        logits = self.step(seq, latent, torch.cat([slot_mask, mask], 1), positions_from_mask(mask), cache,
                           last_only=True)[:, -1]
        for _ in range(max_new_tokens):
            nxt = next_token(logits.float(), do_sample, temperature, top_p, generator)  # (B,)
            if watch is not None:  # rows whose first sentence ends before nxt stop here, for the plain decoder
                at = watch.ends_before(nxt, done)  # (B,)
                cut = torch.where(at, len(out), cut)
                done = done | at
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt)
            if eos_token_id is not None:
                done = done | nxt.eq(eos_token_id)
            if bool(done.all()) or len(out) == max_new_tokens:
                break
            pos = mask.sum(-1, keepdim=True)  # (B, 1): the new token's position
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (B, T + n)
            seq = torch.cat([seq, nxt[:, None]], 1)
            if use_cache:
                logits = self.step(nxt[:, None], latent, torch.cat([slot_mask, mask], 1), pos, cache)[:, -1]
            else:
                logits = self(seq, mask, latent)[:, -1]
        new = torch.stack(out, 1) if out else input_ids.new_zeros(B, 0)  # (B, n)
        if not bool(cut.ge(0).any()):
            return new
        plain = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "eos_token_id": eos_token_id,
                 "pad_token_id": pad, "generator": generator, "use_cache": use_cache}
        return self._continue_plain(input_ids, prompt_mask, new, cut, max_new_tokens, pad, plain)

    def _continue_plain(self, input_ids: Tensor, prompt_mask: Tensor, new: Tensor, cut: Tensor, max_new_tokens: int,
                        pad: int, plain: dict[str, Any]) -> Tensor:
        """The rows handed off (``cut`` >= 0: where their first sentence ended or a word came again), continued by
        the plain decoder from their prompt and the text before the cut for the tokens left; the others as
        generated. Returns (B, n) ids, pad-filled."""
        rows = [new[b].tolist() for b in range(new.shape[0])]
        handed = cut.ge(0).nonzero().flatten().tolist()  # each cut < max_new_tokens: a token is left for it
        texts = [torch.cat([input_ids[b][prompt_mask[b].bool()], new[b, : int(cut[b])]]) for b in handed]
        width = max(len(t) for t in texts)
        ids = input_ids.new_full((len(handed), width), pad)
        mask = torch.zeros_like(ids)
        for j, t in enumerate(texts):  # left padded, as the prompts
            ids[j, width - len(t) :], mask[j, width - len(t) :] = t, 1
        left = [max_new_tokens - int(cut[b]) for b in handed]
        rest = self.generate(ids, None, max(left), mask, **plain)  # (R, <= max(left)): the plain decoder
        for j, b in enumerate(handed):
            rows[b] = rows[b][: int(cut[b])] + rest[j, : left[j]].tolist()
        n = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (n - len(r)) for r in rows], dtype=new.dtype, device=new.device)


def next_token(
    logits: Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Greedy or temperature / nucleus sampled next token (B,) from logits (B, V) (the one sampler: Larimar's
    decoder and the plain HF decoders of the evaluation use it alike)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)  # (B, V)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(-1, descending=True)  # (B, V)
        keep = p_sorted.cumsum(-1) - p_sorted < top_p  # always keeps the top token
        p_sorted = p_sorted * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, p_sorted)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
