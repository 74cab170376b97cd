"""Tests of the baseline editors (ROME, MEMIT, GRACE, FT-L, IKE) on tiny random Llama / GPT-2 models.

The tiny models are random, so their attention does not move subject information to later tokens; the
edit-efficacy tests therefore use prompts that end with the subject (the lookup token is then also the
last prompt token). ``lookup_index`` is tested separately for subjects in the middle of a prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, normalizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from larimar.baselines import (
    ARCHITECTURES,
    METHODS,
    EditHandle,
    apply_method,
    load_hparams,
)
from larimar.baselines.common import lookup_index
from larimar.baselines.grace import grace_codebook
from larimar.baselines.hparams import ROMEHyperParams, arch_spec
from larimar.baselines.nethook import get_module
from larimar.baselines.stats import cache_root, layer_stats
from larimar.data import EditRequest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "baselines"
DATA = REPO.parent / "shared" / "data"

WORDS = (
    "the capital of france is paris rome london berlin city plays sport football basketball tennis a an and in "
    "on at was born speaks language english french german italian who what where danielle darrieux lionel messi "
    "eiffel tower located one two three four five six seven eight nine ten red blue green cat dog house car tree "
    "river mountain sun moon star book music film team new fact prompt"
).split()

MESSI = EditRequest(prompt="the sport of {}", subject="Lionel Messi", target_new="tennis", target_true="football")
EIFFEL = EditRequest(prompt="the city of {}", subject="Eiffel Tower", target_new="rome", target_true="paris")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=128, max_position_embeddings=128, initializer_range=0.3,
        )
    else:
        cfg = GPT2Config(
            n_embd=32, n_layer=4, n_head=4, vocab_size=128, n_positions=128, initializer_range=0.3,
            bos_token_id=2, eos_token_id=2,
        )
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture()
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture()
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A synthetic statistics corpus; the stats cache goes to tmp_path."""
    monkeypatch.setenv("LARIMAR_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(60)) + "\n")
    return path


def next_token_probs(model: torch.nn.Module, tok, text: str) -> torch.Tensor:
    ids = tok(text, return_tensors="pt")["input_ids"]  # (1, T)
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].softmax(-1)  # (V,)


def first_target_id(tok, target: str) -> int:
    return tok(" " + target, add_special_tokens=False)["input_ids"][0]


def method_hparams(method: str, corpus: Path):
    overrides = {"stats_corpus": str(corpus)} if method in ("rome", "memit") else {}
    return load_hparams(method, CONFIGS / f"{method}_tiny-test.yaml", overrides)


# ---------------------------------------------------------------- hyper-parameters and architecture data


def test_load_hparams_reads_yaml_and_rejects_unknown_fields(tmp_path: Path) -> None:
    hp = load_hparams("rome", CONFIGS / "rome_tiny-test.yaml", {"layer": 2})
    assert isinstance(hp, ROMEHyperParams) and hp.layer == 2 and hp.v_num_grad_steps == 40
    bad = tmp_path / "bad.yaml"
    bad.write_text("layer: 1\nnot_a_field: 3\n")
    with pytest.raises(ValueError, match="not_a_field"):
        load_hparams("rome", bad)
    with pytest.raises(KeyError, match="unknown method"):
        load_hparams("nope")


def test_every_config_file_loads() -> None:
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files
    for path in files:
        method = path.name.split("_")[0]
        assert method in METHODS, path.name
        assert path.read_text().startswith("#"), f"{path.name} needs a usage comment header"
        load_hparams(method, path)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_arch_templates_name_real_modules(model_type: str) -> None:
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64)
    if model_type == "gptj":
        sizes = dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=64)
    elif model_type == "gpt2":
        sizes = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes))
    spec = arch_spec(model)
    down = get_module(model, spec.mlp_down.format(1))
    get_module(model, spec.mlp.format(1))
    get_module(model, spec.layer.format(1))
    d = model.get_input_embeddings().weight.shape[1]
    w = down.weight
    assert (w.shape[1] == d) if spec.transposed else (w.shape[0] == d)


def test_unknown_model_type_is_a_key_error() -> None:
    model = torch.nn.Linear(2, 2)
    model.config = type("C", (), {"model_type": "mystery"})()
    with pytest.raises(KeyError, match="mystery"):
        arch_spec(model)


def test_lookup_index_subject_last_and_last(tok) -> None:
    # "lionel messi plays the sport of" -> subject's last token is "messi" at position 1, prompt's last at 5.
    assert lookup_index(tok, "", "{} plays the sport of", "Lionel Messi", "subject_last") == 1
    assert lookup_index(tok, "", "{} plays the sport of", "Lionel Messi", "last") == 5
    assert lookup_index(tok, "the city . ", "{} plays the sport of", "Lionel Messi", "subject_last") == 4
    with pytest.raises(ValueError, match="fact_token"):
        lookup_index(tok, "", "{} plays", "Messi", "first")


# ---------------------------------------------------------------- covariance statistics


def test_layer_stats_matches_manual_second_moment_and_is_cached(tok, corpus: Path) -> None:
    model = tiny_model("llama")
    name = "model.layers.1.mlp.down_proj"
    mom2 = layer_stats(model, tok, name, corpus, n_tokens=100, seq_len=32)
    keys = []
    handle = get_module(model, name).register_forward_hook(lambda m, a, o: keys.append(a[0][0]))
    for line in corpus.read_text().splitlines():
        with torch.no_grad():
            model(input_ids=tok(line, truncation=True, max_length=32, return_tensors="pt")["input_ids"])
        if sum(k.shape[0] for k in keys) >= 100:
            break
    handle.remove()
    k = torch.cat(keys)[:100].double()  # (100, d_ff)
    torch.testing.assert_close(mom2, (k.T @ k / 100).float(), rtol=1e-5, atol=1e-6)
    files = list((cache_root() / "stats").rglob("*.safetensors"))
    assert len(files) == 1 and "n100" in files[0].name
    again = layer_stats(model, tok, name, corpus, n_tokens=100, seq_len=32)
    assert torch.equal(again, mom2)


# ---------------------------------------------------------------- efficacy and exact restore


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["rome", "memit", "grace", "ft"])
def test_edit_changes_prediction_and_restore_is_bit_identical(method: str, kind: str, tok, corpus: Path) -> None:
    model = tiny_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = first_target_id(tok, MESSI.target_new)
    p0 = next_token_probs(model, tok, MESSI.full_prompt)
    assert p0.argmax().item() != target

    edited, restore = apply_method(method, model, tok, [MESSI], method_hparams(method, corpus))
    assert edited is model
    p1 = next_token_probs(model, tok, restore.transform_prompt(MESSI.full_prompt))
    assert p1.argmax().item() == target, f"{method}/{kind}: p(target) {p0[target]:.4f} -> {p1[target]:.4f}"
    assert p1[target] > max(0.2, 10 * p0[target])

    restore()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(next_token_probs(model, tok, MESSI.full_prompt), p0)  # no hook left behind either
    restore()  # idempotent
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_weight_editors_touch_only_their_layers(method: str, tok, corpus: Path) -> None:
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = method_hparams(method, corpus)
    apply_method(method, model, tok, [MESSI], hp)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    layers = [hp.layer] if method == "rome" else hp.layers
    assert changed == {f"transformer.h.{i}.mlp.c_proj.weight" for i in layers}
    if method == "rome":  # one rank-one update, in Conv1D's (in, out) layout
        name = f"transformer.h.{hp.layer}.mlp.c_proj.weight"
        assert torch.linalg.matrix_rank(model.state_dict()[name] - before[name], atol=1e-5).item() == 1


def test_sequential_edits_accumulate_and_chain_restores(tok, corpus: Path) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, restore = apply_method("rome", model, tok, [MESSI, EIFFEL], method_hparams("rome", corpus), sequential=True)
    for req in (MESSI, EIFFEL):
        assert next_token_probs(model, tok, req.full_prompt).argmax().item() == first_target_id(tok, req.target_new)
    restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grace_codebook_grows_over_calls_and_restores_step_by_step(tok) -> None:
    model = tiny_model("llama")
    hp = method_hparams("grace", Path("unused"))
    p0 = next_token_probs(model, tok, MESSI.full_prompt)
    _, r1 = apply_method("grace", model, tok, [MESSI], hp)
    _, r2 = apply_method("grace", model, tok, [EIFFEL], hp)
    book = grace_codebook(model, hp.layer)
    assert book is not None and len(book) == 2 and book.labels == ["tennis", "rome"]
    for req in (MESSI, EIFFEL):  # both edits hold
        assert next_token_probs(model, tok, req.full_prompt).argmax().item() == first_target_id(tok, req.target_new)
    r2()
    assert len(book) == 1
    assert next_token_probs(model, tok, MESSI.full_prompt).argmax().item() == first_target_id(tok, "tennis")
    r1()
    assert grace_codebook(model, hp.layer) is None
    assert torch.equal(next_token_probs(model, tok, MESSI.full_prompt), p0)


# ---------------------------------------------------------------- IKE and the registry


def test_ike_builds_prompt_prefix_and_leaves_weights(tok, tmp_path: Path) -> None:
    records = [
        {
            "case_id": i,
            "requested_rewrite": {
                "prompt": "{} is in", "subject": f"Thing{i}",
                "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"},
            },
            "paraphrase_prompts": [f"Where is Thing{i}? It is in"],
            "neighborhood_prompts": [f"Other{i} is in"],
        }
        for i in range(5)
    ]
    demos = tmp_path / "cf.json"
    demos.write_text(json.dumps(records))
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = load_hparams("ike", CONFIGS / "ike_tiny-test.yaml", {"demonstrations_path": str(demos)})
    edited, handle = apply_method("ike", model, tok, [MESSI], hp)
    assert edited is model and isinstance(handle, EditHandle)
    text = handle.transform_prompt("the sport of Lionel Messi")
    assert text.endswith("New Fact: the sport of Lionel Messi tennis\nPrompt: the sport of Lionel Messi")
    assert text.startswith(handle.prompt_prefix) and handle.prompt_prefix.count("New Fact:") == hp.k + 1
    assert "Where is Thing" in text and "Paris" in text  # an update and a retain demonstration (k = 3)
    handle()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weight_editors_do_not_transform_prompts(tok) -> None:
    _, handle = apply_method("grace", tiny_model("gpt2"), tok, [MESSI], method_hparams("grace", Path("unused")))
    assert handle.transform_prompt("abc") == "abc" and handle.prompt_prefix == ""
    handle()


def test_apply_method_errors(tok) -> None:
    with pytest.raises(KeyError, match="unknown editing method"):
        apply_method("mend", tiny_model("llama"), tok, [MESSI])
    with pytest.raises(ValueError, match="at least one"):
        apply_method("rome", tiny_model("llama"), tok, [], ROMEHyperParams())


@pytest.mark.skipif(not (DATA / "counterfact_rome" / "counterfact_rome_929.json").is_file(), reason="no shared data")
def test_ike_demonstrations_from_shared_counterfact(tok) -> None:
    hp = load_hparams(
        "ike", None, {"k": 6, "demonstrations_path": str(DATA / "counterfact_rome" / "counterfact_rome_929.json")}
    )
    _, handle = apply_method("ike", tiny_model("llama"), tok, [MESSI], hp)
    assert handle.prompt_prefix.count("New Fact:") == 7
    assert handle.prompt_prefix.count("Prompt:") == 6


def test_generated_context_prefixes_leave_global_rng_alone(tok) -> None:
    from larimar.baselines.common import context_prefixes

    model = tiny_model("llama")
    state = torch.random.get_rng_state()
    a = context_prefixes(model, tok, ["the city . "], n_generated=2, length=3, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = context_prefixes(model, tok, ["the city . "], n_generated=2, length=3, seed=1)
    assert a == b and len(a) == 4 and a[:2] == ["", "the city . "]
    assert all("{" not in p and p.endswith(". ") for p in a[2:])


@pytest.mark.skipif(not (DATA / "counterfact_rome" / "counterfact_rome_929.json").is_file(), reason="no shared data")
def test_ike_smollm2_config_finds_its_demonstrations(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARIMAR_DATA_DIR", str(DATA))
    monkeypatch.chdir(REPO.parent)  # the relative path must not depend on the working directory
    hp = load_hparams("ike", CONFIGS / "ike_smollm2-135m.yaml")
    _, handle = apply_method("ike", tiny_model("llama"), tok, [MESSI], hp)
    assert handle.prompt_prefix.count("New Fact:") == hp.k + 1


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_prefix_scoring_matches_full_forward(tok, kind):
    """IKE-style rows with a long common prefix: the cached-prefix path scores exactly like one full forward."""
    from larimar.eval.editors import teacher_forced

    model = tiny_model(kind)
    prefix = " ".join(WORDS[:40]) + " new fact "
    prompts = [prefix + "the sport of lionel messi", prefix + "the city of", prefix + "who speaks"]
    conts = [" tennis", " rome paris", " french"]
    full = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    calls = []

    def cached(ids, mask, P):
        calls.append(P)
        from larimar.eval.editors import shared_prefix_logits

        return shared_prefix_logits(model, ids, mask, P)

    with torch.no_grad():
        ref = teacher_forced(full, tok, 2, 0, prompts, conts)
        got = teacher_forced(full, tok, 2, 0, prompts, conts, prefix_logits_fn=cached)
    assert calls and calls[0] >= 40  # the prefix path ran, over the whole shared prefix
    torch.testing.assert_close(got.nll, ref.nll, atol=1e-5, rtol=1e-5)
    assert got.predicted == ref.predicted and got.target == ref.target
