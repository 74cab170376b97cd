"""LarimarModel on tiny random backbones: encoder adapter, config, trainable sets, loss, scoring, save / load."""

from __future__ import annotations

import json
from functools import partial

import pytest
import tiny_larimar as tiny
import torch
from safetensors.torch import load_file, save_file

from larimar.memory import MemoryConfig
from larimar.model import LarimarConfig, LarimarModel, LatentEncoder

C = tiny.C
TEXTS = [
    "the capital of france is rome",
    "paris is a city in france",
    "berlin is the capital of germany",
    "the river in london",
    "madrid is in spain",
    "he speaks french",
]
# the MODEL setup: small case-sensitive vocabulary, 16-token inputs; no redrawn latent projection
backbones = partial(tiny.backbones, setup=tiny.MODEL)
tiny_config = partial(tiny.tiny_config, setup=tiny.MODEL)
tiny_model = partial(tiny.tiny_model, setup=tiny.MODEL, visible_latent=False)


def episode_batch(model: LarimarModel, B: int = 2, E: int = 3) -> dict[str, torch.Tensor]:
    texts = (TEXTS * 4)[: B * E]
    enc = model.encoder.tokenize(texts)
    dec = model.tokenize_decoder(texts, add_start=False)
    return {
        "enc_input_ids": enc["input_ids"].view(B, E, -1), "enc_attention_mask": enc["attention_mask"].view(B, E, -1),
        "dec_input_ids": dec["input_ids"].view(B, E, -1), "dec_attention_mask": dec["attention_mask"].view(B, E, -1),
    }


# -- encoder ---------------------------------------------------------------------------------------------------


def test_encoder_uses_special_tokens_and_ignores_padding():
    enc, etok, _, _ = backbones()
    le = LatentEncoder(enc, etok, C, max_length=16, generator=torch.Generator().manual_seed(0)).eval()
    batch = le.tokenize(["paris", "the capital of france is rome"])
    ids = batch["input_ids"]
    assert ids[0, 0] == etok.cls_token_id and ids[1, 0] == etok.cls_token_id
    assert ids[0, 2] == etok.sep_token_id and ids[0, 3] == etok.pad_token_id  # [CLS] paris [SEP] [PAD] ...
    with torch.no_grad():
        z = le.encode_texts(["paris", "the capital of france is rome"])
        z_alone = le.encode_texts(["paris"])
        z_fwd = le(ids, batch["attention_mask"])
    assert z.shape == (2, C)
    torch.testing.assert_close(z[:1], z_alone, atol=1e-5, rtol=1e-5)  # mean pooling skips pads
    torch.testing.assert_close(z, z_fwd)  # one code path
    assert (z[0] - z[1]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="list of strings"):
        le.encode_texts("paris")


# -- config ----------------------------------------------------------------------------------------------------


def test_config_json_round_trip_and_validation():
    cfg = tiny_config(decoder_training="lora", lora_targets=["q_proj"], encoder="/x/enc", seed=3)
    d = json.loads(json.dumps(cfg.to_dict()))
    back = LarimarConfig.from_dict(d)
    assert back == cfg and isinstance(back.memory, MemoryConfig)
    assert LarimarConfig() == LarimarConfig.from_dict(json.loads(json.dumps(LarimarConfig().to_dict())))
    with pytest.raises(ValueError, match="code_size"):
        LarimarConfig(latent_size=8, memory=MemoryConfig(num_slots=4, code_size=16))
    with pytest.raises(ValueError, match="decoder_training"):
        tiny_config(decoder_training="half")
    with pytest.raises(KeyError, match="unknown"):
        LarimarConfig.from_dict({**cfg.to_dict(), "nope": 1})


# -- trainable sets --------------------------------------------------------------------------------------------


def _trainable(model: LarimarModel) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_parameters_per_mode():
    frozen = _trainable(tiny_model(decoder_training="frozen", train_encoder=False))
    assert frozen == {
        "encoder.proj.weight", "encoder.proj.bias", "decoder.kv_proj.weight", "decoder.emb_proj.weight",
        "memory.M0", "memory.log_read_std",
    }
    lora = _trainable(tiny_model(decoder_training="lora", train_encoder=False)) - frozen
    assert lora and all(".lora_A" in n or ".lora_B" in n for n in lora)
    assert {n.split(".")[-2] for n in lora} == {"q_proj", "v_proj"}
    assert any("c_attn.lora_A" in n for n in _trainable(tiny_model(family="gpt2", decoder_training="lora")))
    full = _trainable(tiny_model(decoder_training="full", train_encoder=True))
    assert any(n.startswith("decoder.model.") for n in full)
    assert any(n.startswith("encoder.model.") for n in full)


# -- decoder helpers, scoring ----------------------------------------------------------------------------------


def test_tokenize_decoder_prepends_start_token_and_pads():
    model = tiny_model()
    assert model.start_token_id == model.decoder_tokenizer.eos_token_id  # no BOS: EOS is the start token
    right = model.tokenize_decoder(["paris", "the capital of france"])
    left = model.tokenize_decoder(["paris", "the capital of france"], left_pad=True)
    assert right["input_ids"][0, 0] == model.start_token_id and right["attention_mask"][0].tolist() == [1, 1, 0, 0, 0]
    assert left["input_ids"][0, 3] == model.start_token_id and left["attention_mask"][0].tolist() == [0, 0, 0, 1, 1]


def test_decoder_start_token_option():
    model = LarimarModel.from_backbones(tiny_config(decoder_start_token="<pad>"), *backbones())
    assert model.start_token_id == model.decoder_tokenizer.pad_token_id
    assert model.tokenize_decoder(["paris"])["input_ids"][0, 0] == model.start_token_id
    with pytest.raises(ValueError, match="decoder_start_token"):
        LarimarModel.from_backbones(tiny_config(decoder_start_token="<nope>"), *backbones())


def test_token_nll_matches_manual_and_continuation_nll():
    model = tiny_model()
    z = torch.randn(2, C, generator=torch.Generator().manual_seed(0))
    batch = model.tokenize_decoder(["the capital of france is rome", "paris"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    target = mask.clone()
    target[:, :3] = 0
    with torch.no_grad():
        nll = model.token_nll(ids, mask, z, target)
        logp = model.decode_logits(ids, mask, z).log_softmax(-1)
    manual = []
    for b in range(2):
        terms = [-logp[b, t - 1, ids[b, t]] for t in range(1, ids.shape[1]) if target[b, t] and mask[b, t]]
        manual.append(torch.stack(terms).mean() if terms else torch.tensor(0.0))
    torch.testing.assert_close(nll, torch.stack(manual), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        cont = model.continuation_nll(["the capital of france is", "paris is in"], [" rome", " france"], z)
        full = model.tokenize_decoder(["the capital of france is rome", "paris is in france"])
        t2 = torch.zeros_like(full["attention_mask"])
        t2[0, 6] = 1  # start + 5 prompt words, then "rome"
        t2[1, 4] = 1
        ref = model.token_nll(full["input_ids"], full["attention_mask"], z, t2)
    torch.testing.assert_close(cont, ref, atol=1e-6, rtol=0)


def test_generate_text_runs_and_zero_latent_is_plain_model():
    model = tiny_model()
    texts = model.generate_text(["the capital of", "paris"], None, max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    batch = model.tokenize_decoder(["the capital of"], left_pad=True)
    new = model.generate(batch["input_ids"], batch["attention_mask"], torch.zeros(1, C), max_new_tokens=3,
                         eos_token_id=-1)
    seq = batch["input_ids"]
    with torch.no_grad():
        for _ in range(3):
            seq = torch.cat([seq, model.decoder.model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new[0], seq[0, -3:])


# -- loss ------------------------------------------------------------------------------------------------------


def test_loss_components_total_and_gradients():
    model = tiny_model(decoder_training="lora", train_encoder=True)
    batch = episode_batch(model)
    out = model.loss(batch, beta=0.5, write_noise_std=0.0, sample_read=False)
    assert set(out) == {"loss", "rec", "ae", "kl", "lm"}
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["rec"] + out["ae"] + 0.5 * out["kl"] + out["lm"])
    # the lm term is the plain decoder's token-mean CE over the same targets
    dec = batch["dec_input_ids"].flatten(0, 1)
    dmask = batch["dec_attention_mask"].flatten(0, 1)
    ids = torch.cat([torch.full((dec.shape[0], 1), model.start_token_id), dec], 1)
    mask = torch.cat([torch.ones(dec.shape[0], 1, dtype=torch.long), dmask], 1)
    with torch.no_grad():
        logits = model.decoder.model(ids, attention_mask=mask).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    ref = (ce * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
    torch.testing.assert_close(out["lm"], ref, atol=1e-5, rtol=1e-5)
    out["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad and not name.endswith("lora_A"):  # lora_A gets no grad while lora_B is zero
            assert p.grad is not None, name
    for name in ("decoder.kv_proj.weight", "decoder.emb_proj.weight", "encoder.proj.weight", "memory.M0"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_loss_ignores_pad_and_skips_lm_forward():
    model = tiny_model()
    batch = episode_batch(model)
    out = model.loss(batch, beta=0.1, sample_read=False)
    noisy = dict(batch)
    pad = batch["dec_attention_mask"] == 0
    assert pad.any()
    noisy["dec_input_ids"] = batch["dec_input_ids"].masked_fill(pad, 7)  # any token under the pads
    out2 = model.loss(noisy, beta=0.1, sample_read=False)
    for k in out:
        torch.testing.assert_close(out[k], out2[k])
    sizes = []
    hook = model.decoder.model.register_forward_pre_hook(
        lambda m, args, kw: sizes.append(kw["inputs_embeds"].shape[0]), with_kwargs=True
    )
    no_lm = model.loss(batch, beta=0.1, lm_weight=0.0, sample_read=False)
    hook.remove()
    assert sizes == [2 * 6]  # rec and ae rows only
    assert no_lm["lm"] == 0
    torch.testing.assert_close(no_lm["rec"], out["rec"])
    torch.testing.assert_close(no_lm["loss"], out["loss"] - out["lm"])


def test_loss_rejects_bad_batches():
    model = tiny_model()
    batch = episode_batch(model)
    with pytest.raises(KeyError, match="dec_input_ids"):
        model.loss({k: v for k, v in batch.items() if k != "dec_input_ids"}, beta=0.0)
    left = dict(batch)
    left["dec_attention_mask"] = batch["dec_attention_mask"].flip(-1)
    with pytest.raises(ValueError, match="right padded"):
        model.loss(left, beta=0.0)


def test_write_read_wrappers():
    model = tiny_model()
    Z = model.encode_texts(TEXTS[:4]).view(2, 2, C)
    M = model.write(Z)
    assert M.shape == (2, 8, C)
    z_read, w_mean, w_std = model.read(M, Z)
    assert z_read.shape == (2, 2, C) and w_mean.shape == w_std.shape == (2, 2, 8)
    torch.testing.assert_close(z_read, Z, atol=1e-3, rtol=1e-3)  # written items are read back


# -- save / load -----------------------------------------------------------------------------------------------


def _perturb(model: LarimarModel) -> None:
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "mode,train_encoder,family,tie",
    [("frozen", False, "llama", False), ("lora", True, "llama", False), ("full", False, "llama", True),
     ("lora", False, "gpt2", False)],
)
def test_save_load_round_trip(tmp_path, mode, train_encoder, family, tie):
    model = tiny_model(family=family, tie=tie, decoder_training=mode, train_encoder=train_encoder)
    _perturb(model)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(model.saved_state_dict())
    assert any(k.startswith("decoder.model.") and "lora" not in k for k in saved) == (mode == "full")
    assert any(k.startswith("encoder.model.") for k in saved) == train_encoder
    assert any("lora_B" in k for k in saved) == (mode == "lora")
    assert json.loads((tmp_path / "config.json").read_text())["decoder_training"] == mode

    enc, etok, dec, dtok = backbones(family=family, tie=tie)  # fresh 'pretrained' backbones
    back = LarimarModel.from_pretrained(tmp_path, encoder=(enc, etok), decoder=(dec, dtok)).eval()
    texts = ["the capital of france is", "paris"]
    batch = model.tokenize_decoder(texts)
    with torch.no_grad():
        z, z2 = model.encode_texts(texts), back.encode_texts(texts)
        torch.testing.assert_close(z2, z, atol=0, rtol=0)
        la = model.decode_logits(batch["input_ids"], batch["attention_mask"], z)
        lb = back.decode_logits(batch["input_ids"], batch["attention_mask"], z)
    torch.testing.assert_close(lb, la, atol=0, rtol=0)
    torch.testing.assert_close(back.memory.M0, model.memory.M0, atol=0, rtol=0)
    # without the saved tensors the fresh model differs (the test can fail)
    fresh = tiny_model(family=family, tie=tie, decoder_training=mode, train_encoder=train_encoder)
    with torch.no_grad():
        lf = fresh.decode_logits(batch["input_ids"], batch["attention_mask"], fresh.encode_texts(texts))
    assert (lf - la).abs().amax() > 1e-4


def test_from_pretrained_is_strict(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file({**tensors, "decoder.extra": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not used"):
        LarimarModel.from_pretrained(tmp_path, encoder=backbones()[:2], decoder=backbones()[2:])
    save_file({k: v for k, v in tensors.items() if k != "memory.M0"}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        LarimarModel.from_pretrained(tmp_path, encoder=backbones()[:2], decoder=backbones()[2:])
    save_file({**tensors, "memory.M0": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        LarimarModel.from_pretrained(tmp_path, encoder=backbones()[:2], decoder=backbones()[2:])
    with pytest.raises(FileNotFoundError):
        LarimarModel.from_pretrained(tmp_path / "nowhere", encoder=backbones()[:2], decoder=backbones()[2:])


def test_loss_target_mask_scores_only_marked_tokens():
    model = tiny_model()
    batch = episode_batch(model)
    full = model.loss(batch, beta=0.0, lm_weight=0.0, ae_weight=0.0, sample_read=False)
    ones = dict(batch, dec_target_mask=batch["dec_attention_mask"].clone())
    torch.testing.assert_close(model.loss(ones, beta=0.0, lm_weight=0.0, ae_weight=0.0, sample_read=False)["rec"],
                               full["rec"])
    # scoring only the last real token of every row equals the mean NLL of those tokens computed by hand
    mask = batch["dec_attention_mask"]
    last = torch.zeros_like(mask)
    lengths = mask.sum(-1)  # (B, E)
    last.scatter_(-1, (lengths - 1).unsqueeze(-1), 1)
    got = model.loss(dict(batch, dec_target_mask=last), beta=0.0, lm_weight=0.0, ae_weight=0.0,
                     sample_read=False)["rec"]
    with torch.no_grad():
        Z = model.encode(batch["enc_input_ids"].flatten(0, 1), batch["enc_attention_mask"].flatten(0, 1)).view(2, 3, -1)
        _, z_read, _, _ = model.memory.write_read(Z, Z, sample=False)
        ids = batch["dec_input_ids"].flatten(0, 1)
        start = torch.full((ids.shape[0], 1), model.start_token_id)
        full_ids = torch.cat([start, ids], 1)
        full_mask = torch.cat([torch.ones_like(start), mask.flatten(0, 1)], 1)
        logits = model.decode_logits(full_ids, full_mask, z_read.reshape(6, -1))
        n = lengths.flatten()  # the last real token sits at index n in full_ids, predicted from index n - 1
        logp = torch.log_softmax(logits.float(), -1)
        want = -torch.stack([logp[i, n[i] - 1, full_ids[i, n[i]]] for i in range(6)]).mean()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.isclose(got, full["rec"])


def test_save_with_base_rounding_drops_rows_equal_to_the_rounded_base(tmp_path):
    """A model trained from a float16 copy of the encoder: its untrained rows are the float16 rounding of the
    base; with base_rounding they are not stored and load from the base exactly; trained rows are stored."""
    model = tiny_model(train_encoder=True)
    base = backbones()[0]
    base_emb = base.get_input_embeddings().weight.detach()
    emb = model.encoder.model.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(base_emb.half().float())  # every row float16-rounded, as after the trip in float16
        emb[3] += 0.25  # one trained row
    assert (emb != base_emb).any(-1).sum() > 1  # the rounding alone changes many rows
    name = "encoder.model.embeddings.word_embeddings.weight"
    model.save_pretrained(tmp_path / "strict", base_encoder=base)
    assert len(load_file(str(tmp_path / "strict" / "model.safetensors"))[name + "::rows"]) > 1
    model.save_pretrained(tmp_path / "rounded", base_encoder=base, base_rounding=torch.float16)
    saved = load_file(str(tmp_path / "rounded" / "model.safetensors"))
    assert saved[name + "::rows"].tolist() == [3]
    enc, etok, dec, dtok = backbones()
    back = LarimarModel.from_pretrained(tmp_path / "rounded", encoder=(enc, etok), decoder=(dec, dtok))
    got = back.encoder.model.get_input_embeddings().weight
    torch.testing.assert_close(got[3], emb[3], atol=0, rtol=0)
    keep = torch.arange(len(got)) != 3
    torch.testing.assert_close(got[keep], base_emb[keep], atol=0, rtol=0)  # the exact base, not its rounding


def test_save_stores_only_changed_embedding_rows_against_the_base_encoder(tmp_path):
    model = tiny_model(train_encoder=True)
    emb = model.encoder.model.get_input_embeddings().weight
    with torch.no_grad():
        emb[[2, 5]] += 0.25  # "training" touched two tokens only
        model.encoder.proj.weight.add_(0.1)
    base = backbones()[0]  # the pretrained encoder the model was built from
    model.save_pretrained(tmp_path, base_encoder=base)
    saved = load_file(str(tmp_path / "model.safetensors"))
    name = "encoder.model.embeddings.word_embeddings.weight"
    assert name not in saved and saved[name + "::rows"].tolist() == [2, 5]
    assert saved[name + "::values"].shape == (2, emb.shape[1])
    enc, etok, dec, dtok = backbones()
    back = LarimarModel.from_pretrained(tmp_path, encoder=(enc, etok), decoder=(dec, dtok))
    torch.testing.assert_close(back.encoder.model.get_input_embeddings().weight, emb, atol=0, rtol=0)
    texts = ["the capital of france is", "paris"]
    with torch.no_grad():
        torch.testing.assert_close(back.encode_texts(texts), model.encode_texts(texts), atol=0, rtol=0)
    # a rows entry out of range is refused, not silently applied
    saved[name + "::rows"] = torch.tensor([2, 10_000])
    save_file(saved, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="changed-rows"):
        LarimarModel.from_pretrained(tmp_path, encoder=backbones()[:2], decoder=backbones()[2:])
