"""Decoder conditioning on a latent: a cache-prefix key/value slot per layer plus an embedding offset.

Every supported decoder family is checked on a tiny random config: exact parity with the plain HF model at
z = 0, a latent that changes the logits, cached == uncached (logits and greedy generation), gradients to the
projections, mixed z = 0 / z != 0 batches and left padding.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
)

from larimar.conditioning import (
    DECODER_ARCHS,
    LatentDecoder,
    LoRALinear,
    SentenceEnds,
    apply_lora,
    decoder_shape,
    positions_from_mask,
    sentence_ends,
)

C = 16
V = 96


def tiny_config(family: str):
    """A tiny random config of a supported family (hidden 32, 2 layers, no dropout)."""
    if family == "llama":  # grouped KV heads
        return LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=V, max_position_embeddings=64,
        )
    if family == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=V,
            max_position_embeddings=64, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
            bos_token_id=0, eos_token_id=0,
        )
    if family == "gptj":
        return GPTJConfig(
            n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=V, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
    raise KeyError(family)


FAMILIES = ["llama", "gpt2", "gpt_neox", "gptj"]


def tiny_decoder(family: str, seed: int = 0) -> LatentDecoder:
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    dec = LatentDecoder(hf, C, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # make the latent effects large enough to see on a random model
        dec.kv_proj.weight.normal_(0, 0.5)
        dec.emb_proj.weight.normal_(0, 0.1)
    return dec.eval()


def test_arch_table_covers_families():
    assert set(FAMILIES) <= set(DECODER_ARCHS)
    for family in FAMILIES:
        s = decoder_shape(tiny_config(family))
        assert (s.num_layers, s.hidden_size, s.head_dim) == (2, 32, 8)
        assert s.num_kv_heads == (2 if family == "llama" else 4)


def test_unsupported_model_type_raises():
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=V)
    cfg.model_type = "not_a_model"
    with pytest.raises(ValueError, match="model_type"):
        decoder_shape(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_latent_is_the_plain_model(family):
    dec = tiny_decoder(family)
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dec.model(ids).logits  # (B, T, V)
        out0 = dec(ids, latent=torch.zeros(3, C))
        out_none = dec(ids)
    torch.testing.assert_close(out0, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_none, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_changes_logits_and_mixed_batch(family):
    dec = tiny_decoder(family)
    ids = torch.randint(0, V, (4, 7), generator=torch.Generator().manual_seed(2))
    z = torch.randn(4, C, generator=torch.Generator().manual_seed(3))
    z[1] = 0.0
    z[3] = 0.0
    with torch.no_grad():
        ref = dec.model(ids).logits
        out = dec(ids, latent=z)
        alone = torch.cat([dec(ids[i : i + 1], latent=z[i : i + 1]) for i in range(4)])
    # rows with z = 0 are the plain model, rows with z != 0 differ from it
    torch.testing.assert_close(out[[1, 3]], ref[[1, 3]], atol=1e-5, rtol=0)
    assert (out[[0, 2]] - ref[[0, 2]]).abs().amax() > 1e-2
    # each row is what it would be alone
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    # each injection path matters on its own
    with torch.no_grad():
        emb = dec.emb_proj.weight.clone()
        dec.emb_proj.weight.zero_()
        kv_only = dec(ids, latent=z)
        dec.emb_proj.weight.copy_(emb)
        dec.kv_proj.weight.zero_()
        emb_only = dec(ids, latent=z)
    assert (kv_only[0] - ref[0]).abs().amax() > 1e-3
    assert (emb_only[0] - ref[0]).abs().amax() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_sequence_equals_token_by_token(family):
    dec = tiny_decoder(family)
    B, T = 2, 8
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    z = torch.randn(B, C, generator=torch.Generator().manual_seed(5))
    z[1] = 0.0
    with torch.no_grad():
        whole = dec(ids, latent=z)  # (B, T, V)
        cache, slot = dec.latent_cache(z)
        steps = []
        for t in range(T):
            mask = torch.cat([slot, torch.ones(B, t + 1, dtype=torch.long)], 1)  # (B, 1 + t + 1)
            pos = torch.full((B, 1), t, dtype=torch.long)
            steps.append(dec.step(ids[:, t : t + 1], z, mask, pos, cache))
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_uncached_with_left_padding(family):
    dec = tiny_decoder(family)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, V, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    z = torch.randn(3, C, generator=g)
    z[2] = 0.0
    cached = dec.generate(ids, z, 6, attention_mask=mask)
    uncached = dec.generate(ids, z, 6, attention_mask=mask, use_cache=False)
    assert cached.shape == (3, 6)
    assert torch.equal(cached, uncached)
    # manual greedy: recompute the full sequence each step with the plain forward
    seq, m = ids, mask
    manual = []
    with torch.no_grad():
        for _ in range(6):
            nxt = dec(seq, m, z)[:, -1].argmax(-1)
            manual.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            m = torch.cat([m, torch.ones(3, 1, dtype=torch.long)], 1)
    assert torch.equal(cached, torch.stack(manual, 1))
    # a left-padded row generates what it generates unpadded
    alone = dec.generate(ids[1:2, 2:], z[1:2], 6)
    assert torch.equal(cached[1:2], alone)
    # the z = 0 row matches the plain model's greedy continuation
    with torch.no_grad():
        seq = ids[2:3, 4:]
        for _ in range(6):
            seq = torch.cat([seq, dec.model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached[2], seq[0, 2:])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_logits_match_plain_model(family):
    dec = tiny_decoder(family)
    ids = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = dec.model(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        out = dec(ids, mask, torch.zeros(2, C))
        unpadded = dec.model(ids[0:1, 3:]).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 3:], unpadded[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_projections(family):
    dec = tiny_decoder(family)
    with torch.no_grad():
        dec.emb_proj.weight.zero_()  # the real init: gradient must still reach it
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(8))
    z = torch.randn(2, C, generator=torch.Generator().manual_seed(9), requires_grad=True)
    dec(ids, latent=z).logsumexp(-1).sum().backward()
    assert dec.kv_proj.weight.grad is not None and dec.kv_proj.weight.grad.abs().sum() > 0
    assert dec.emb_proj.weight.grad is not None and dec.emb_proj.weight.grad.abs().sum() > 0
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_latent_shape_is_checked():
    dec = tiny_decoder("llama")
    with pytest.raises(ValueError, match="latent must have shape"):
        dec(torch.zeros(2, 3, dtype=torch.long), latent=torch.zeros(2, C + 1))


def test_sampling_is_reproducible_and_top_p_tiny_is_greedy():
    dec = tiny_decoder("llama")
    ids = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(10))
    z = torch.randn(2, C, generator=torch.Generator().manual_seed(11))
    a = dec.generate(ids, z, 5, do_sample=True, generator=torch.Generator().manual_seed(0))
    b = dec.generate(ids, z, 5, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    nucleus = dec.generate(ids, z, 5, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(nucleus, dec.generate(ids, z, 5))


def test_generation_stops_at_eos_and_pads():
    dec = tiny_decoder("llama")
    ids = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(12))
    greedy = dec.generate(ids, None, 6)
    eos = int(greedy[0, 1])
    out = dec.generate(ids, None, 6, eos_token_id=eos, pad_token_id=V - 1)
    assert out[0, 1] == eos
    assert (out[0, 2:] == V - 1).all()
    if eos not in greedy[1].tolist():
        assert torch.equal(out[1], greedy[1])


def _first_sentence_end(row: list[int], f: SentenceEnds) -> int | None:
    """The rule of `SentenceEnds`, token by token: before a line break, before a new word after a sentence's
    end, or before a word said already, once a letter or digit was said."""
    worded = after_end = False
    said: set[int] = set()
    for i, t in enumerate(row):
        if worded and (f.newline[t] or (f.spaced[t] and after_end) or t in said):
            return i
        worded, after_end = worded or bool(f.word[t]), bool(f.ends[t])
        if f.spaced[t] and f.word[t]:
            said.add(t)
    return None


@pytest.mark.parametrize("use_cache", [True, False])
def test_hand_off_continues_each_row_with_the_plain_decoder_after_its_first_sentence(use_cache):
    dec = tiny_decoder("llama")
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(1, V, (4, 5), generator=g)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    z = torch.randn(4, C, generator=g)
    z[3] = 0.0  # no memory: never handed off
    n, cuts = 8, 0
    no, yes = torch.zeros(V, dtype=torch.bool), torch.ones(V, dtype=torch.bool)
    repeats_only = SentenceEnds(ends=no, spaced=yes, newline=no, word=yes)  # only a word said again hands off
    for seed in range(13):  # random flags; every rule branch is hit over the seeds
        r = torch.Generator().manual_seed(100 + seed)
        f = SentenceEnds(*(torch.rand(V, generator=r) < p for p in (0.5, 0.5, 0.15, 0.8))) if seed else repeats_only
        full = dec.generate(ids, z, n, attention_mask=mask)  # the latent on every token
        out = dec.generate(ids, z, n, attention_mask=mask, hand_off=f, use_cache=use_cache)
        for b in range(4):
            row = full[b].tolist()
            at = _first_sentence_end(row, f) if b != 3 else None
            if at is None:
                assert out[b].tolist() == row
                continue
            cuts += 1
            head = torch.cat([ids[b][mask[b].bool()], full[b, :at]])[None]
            rest = dec.generate(head, None, n - at)[0].tolist()  # the plain decoder from prompt + first sentence
            assert out[b].tolist() == row[:at] + rest
    assert cuts >= 4


def test_hand_off_without_sentence_ends_changes_nothing_and_keeps_eos_padding():
    dec = tiny_decoder("gpt2")
    ids = torch.randint(1, V, (2, 4), generator=torch.Generator().manual_seed(22))
    z = torch.randn(2, C, generator=torch.Generator().manual_seed(23))
    never = SentenceEnds(*(torch.zeros(V, dtype=torch.bool) for _ in range(4)))
    assert torch.equal(dec.generate(ids, z, 6, hand_off=never), dec.generate(ids, z, 6))
    greedy = dec.generate(ids, z, 6)
    eos = int(greedy[0, 2])
    assert torch.equal(dec.generate(ids, z, 6, eos_token_id=eos, pad_token_id=V - 1, hand_off=never),
                       dec.generate(ids, z, 6, eos_token_id=eos, pad_token_id=V - 1))


@pytest.mark.slow
def test_sentence_ends_of_the_default_tokenizer():
    backbones = pytest.importorskip("larimar.backbones")
    try:
        _, tok = backbones.load_decoder()
    except (backbones.BackboneNotFoundError, OSError) as e:
        pytest.skip(f"default decoder unavailable: {e}")
    f = sentence_ends(tok, len(tok) + 3)
    assert f.ends.shape == (len(tok) + 3,) and not f.word[len(tok):].any()

    def one(text: str) -> int:
        t = tok(text, add_special_tokens=False)["input_ids"]
        assert len(t) == 1, (text, t)
        return t[0]

    assert f.ends[one(".")] and f.ends[one("?")] and not f.ends[one(",")] and not f.word[one(".")]
    assert f.spaced[one(" Maria")] and f.word[one(" Maria")] and not f.spaced[one("Maria")]
    assert f.newline[one("\n")] and not f.newline[one(" Maria")]
    assert not any(f.word[i] or f.ends[i] for i in tok.all_special_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_starts_as_identity_and_trains(family):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        ref = hf(ids).logits
    names = apply_lora(hf, DECODER_ARCHS[family].lora_targets, rank=2, alpha=4.0)
    assert len(names) == 2 * len(DECODER_ARCHS[family].lora_targets)
    assert all(isinstance(hf.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-6, rtol=0)
    hf(ids).logits.sum().backward()
    lora_b = hf.get_submodule(names[0]).lora_B
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0


def test_lora_without_matching_module_raises():
    hf = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(hf, ["nope"], rank=2, alpha=2.0)


@pytest.mark.slow
def test_real_smollm2_zero_latent_parity_and_cache():
    backbones = pytest.importorskip("larimar.backbones")
    try:
        hf, tok = backbones.load_decoder()
    except (backbones.BackboneNotFoundError, OSError) as e:  # the default decoder's package is not installed
        pytest.skip(f"default decoder unavailable: {e}")
    hf.eval()
    dec = LatentDecoder(hf, 384, generator=torch.Generator().manual_seed(0)).eval()
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = hf(ids).logits
        out = dec(ids, latent=torch.zeros(1, 384))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    z = torch.randn(1, 384, generator=torch.Generator().manual_seed(1))
    cached = dec.generate(ids, z, 4)
    assert torch.equal(cached, dec.generate(ids, z, 4, use_cache=False))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gated_lora_acts_only_on_rows_with_a_latent(family):
    """A gated LoRA changes rows decoded with z != 0 and leaves z = 0 rows (and direct HF calls) exactly plain."""
    dec = tiny_decoder(family)
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))
    z = torch.stack([torch.zeros(C), torch.randn(C, generator=torch.Generator().manual_seed(4))])  # row 0: no memory
    with torch.no_grad():
        plain = dec.model(ids).logits
        before = dec(ids, latent=z)
    names = apply_lora(dec.model, DECODER_ARCHS[family].lora_targets, rank=2, alpha=4.0, gated=True)
    for n in names:
        with torch.no_grad():
            dec.model.get_submodule(n).lora_B.normal_(0, 0.5)  # a trained-looking, non-zero update
    with torch.no_grad():
        after = dec(ids, latent=z)
        assert torch.equal(dec.model(ids).logits, plain)  # no gate set: the layer is its base
    torch.testing.assert_close(after[0], before[0], atol=1e-6, rtol=0)  # z = 0 row: plain decoder
    assert (after[1] - before[1]).abs().max() > 1e-3  # z != 0 row: LoRA active
    assert all(dec.model.get_submodule(n).gate is None for n in names)  # the gate does not outlive the forward
    # cached generation still equals uncached with the gate set per step
    cached = dec.generate(ids, z, max_new_tokens=4)
    uncached = dec.generate(ids, z, max_new_tokens=4, use_cache=False)
    assert torch.equal(cached, uncached)
