"""End-to-end tests of the shipped default checkpoint with the real backbones (MiniLM + SmolLM2-135M, CPU).

The editing slice pins the shipped checkpoint's numbers on the first records of CounterFact: it fails if a
change to the model, the memory, the scope detector or the evaluation makes editing worse.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from larimar.cli.main import main as cli_main
from larimar.editor import DEFAULT_CHECKPOINT, Larimar
from larimar.eval.metrics import sentence_ends_after_answer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CF_ROME = DATA / "counterfact_rome" / "counterfact_rome_929.json"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(DEFAULT_CHECKPOINT) / "config.json").is_file(), reason="no shipped checkpoint"),
]

# Measured with the shipped checkpoint on the first SLICE records of counterfact_rome_929.json, 2026-12-03, CPU VM
# (`larimar eval counterfact --limit 20 --methods larimar,none [--refine-steps 0]`; none: ES 15.0, PS 20.0, NS 77.5).
# ES and PS are scored on the rewrite prompt the refined latent was optimised on (a fit) and on paraphrases it never
# saw. The test allows one record of slack per metric (5 points of a 20-record mean).
SLICE = 20
MEASURED = {  # mode -> (ES, PS, NS)
    "refined": (100.0, 87.5, 68.5),
    "oneshot": (95.0, 77.5, 68.5),
}


@pytest.fixture(scope="module")
def lm() -> Larimar:
    return Larimar.from_pretrained()


def test_loads_with_one_call_and_edits_route_through_memory(lm: Larimar):
    lm.reset()
    ids = lm.edit(["The Eiffel Tower is located in the city of Rome."])
    latents, in_scope, _ = lm.read_latent(["The Eiffel Tower is located in the city of", "Apples are a kind of"])
    assert in_scope == [True, False]
    assert latents[0].abs().sum() > 0 and latents[1].abs().sum() == 0  # out of scope: z = 0, the plain decoder
    lm.forget(ids)
    assert len(lm.memory) == 0
    latents, in_scope, _ = lm.read_latent(["The Eiffel Tower is located in the city of"])
    assert in_scope == [False] and latents.abs().sum() == 0


def test_out_of_scope_scores_equal_the_untouched_decoder(lm: Larimar):
    lm.reset()
    lm.edit(["The mother tongue of Danielle Darrieux is English."])
    nll_mem = lm.score("The capital of Germany is", [" Berlin", " Paris"])
    plain = lm.model.continuation_nll(["The capital of Germany is"] * 2, [" Berlin", " Paris"], None)
    assert torch.allclose(torch.tensor(nll_mem), plain.float(), atol=1e-5)
    lm.reset()


def test_forgetting_is_exact_with_the_real_encoder(lm: Larimar):
    lm.reset()
    facts = ["Apple A5 was created by Google.", "The Eiffel Tower is in Rome.", "Paris is the capital of Italy."]
    ids = [lm.edit([f])[0] for f in facts]
    lm.forget([ids[1]])
    ref = Larimar(lm.model, scope=None, use_scope=False)
    for f in (facts[0], facts[2]):
        ref.edit([f])
    assert torch.allclose(lm.memory.M, ref.memory.M, rtol=0, atol=1e-8 * ref.memory.M.abs().max().item())
    lm.reset()


def test_a_written_sentence_answers_its_question_in_a_sentence_that_ends(lm: Larimar):
    """Issue 21's user: "The CEO of Northwind Traders is Maria Okafor." written, then asked. The memory read-out
    conditions the answer's sentence; after it the unedited decoder goes on from the text (memory_span
    "sentence", the default), where the paper's decoding ("all") keeps the latent on every token."""
    lm.reset()
    lm.edit(["The CEO of Northwind Traders is Maria Okafor."])
    asked = ["Who is the CEO of Northwind Traders?", "The CEO of Northwind Traders is"]
    n = 24
    answers = lm.ask(asked, max_new_tokens=n)
    assert all(a.in_scope for a in answers)
    tok = lm.model.decoder_tokenizer
    for q, a in zip(asked, answers):
        assert sentence_ends_after_answer(a.text, "Maria Okafor"), a.text
        head, rest = a.text.split(".", 1)[0] + ".", a.text.split(".", 1)[1]
        # what follows the answer's sentence is the plain decoder's own continuation of prompt + that sentence
        left = n - len(tok(head, add_special_tokens=False)["input_ids"])
        assert rest == lm.model.generate_text([q + head], None, max_new_tokens=left)[0]
    paper = lm.ask(asked[1:], max_new_tokens=n, memory_span="all")[0].text
    assert paper.startswith(answers[1].text.split(".", 1)[0]) and paper != answers[1].text
    lm.reset()


@pytest.mark.skipif(not CF_ROME.is_file(), reason="shared CounterFact data absent")
@pytest.mark.parametrize("mode", ["refined", "oneshot"])
def test_counterfact_slice_does_not_regress(tmp_path, mode):
    import json

    out = tmp_path / "cf"
    steps = ["--refine-steps", "0"] if mode == "oneshot" else []
    code = cli_main(["eval", "counterfact", "--data", str(CF_ROME), "--limit", str(SLICE), "--methods", "larimar,none",
                     "--gen-tokens", "0", "--gen-es-tokens", "0", "--fluency-tokens", "0", *steps, "--out", str(out)])
    assert code == 0
    rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())}
    es, ps, ns = MEASURED[mode]
    slack = 100.0 / SLICE
    assert rows["larimar"]["n_cases"] == SLICE
    assert rows["larimar"]["es"] >= es - slack
    assert rows["larimar"]["ps"] >= ps - slack
    assert rows["larimar"]["ns"] >= ns - slack
    assert rows["none"]["es"] <= 15.0 + slack  # the unedited model does not know the new facts
