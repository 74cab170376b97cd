"""Probe: which refinement target suits facts written as plain sentences (ES of the new object after the prompt).

The three facts of `larimar demo` and the first ``--n`` CounterFact records are written as sentences
("prompt object.") into one memory, with:

- ``one-shot``: the encoder's latents (``--refine-steps 0``);
- ``whole sentence``: latents refined on the whole sentence, read at the sentence's own latent;
- ``default``: latents refined as `Larimar.edit` does (`larimar.editor.refine.refinement_target`: the last word after the
  rest, read at the rest's latent).

Each fact is then asked with its prompt: ES = NLL(new object) < NLL(true object).

    python benchmarks/probe_sentence_refinement.py [--n 40] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import statistics

from larimar.data import load_counterfact
from larimar.editor import Larimar, Refinement
from larimar.editor.refine import refine_latents

DEMO = [("The Eiffel Tower is located in the city of", "Rome", "Paris"),
        ("The mother tongue of Danielle Darrieux is", "English", "French"),
        ("Apple A5 was created by", "Google", "Apple")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--data", default="../shared/data/counterfact_rome/counterfact_rome_929.json")
    args = ap.parse_args()
    records = load_counterfact(args.data, limit=args.n).records
    items = DEMO + [(r.full_prompt, r.target_new, r.target_true) for r in records]
    sentences = [f"{p} {new}." for p, new, _ in items]
    ids = [f"f{i}" for i in range(len(items))]
    lm = Larimar.from_pretrained(args.checkpoint, refinement=Refinement(steps=0))
    for name in ("one-shot", "whole sentence", "default"):
        lm.reset()
        if name == "whole sentence":  # written by hand: `edit` has no such target
            Z = lm.encode_facts(sentences)  # (n, C)
            Z = refine_latents(lm.model, Z, [""] * len(items), sentences, Z, Refinement())
            lm.memory.write(Z, ids)
            lm.scope.add_embeddings(lm.scope.embed(sentences), ids)
        else:
            lm.refinement = Refinement(steps=0) if name == "one-shot" else Refinement()
            lm.edit(sentences, ids=ids)
        es = []
        for p, new, true in items:
            nll = lm.score(p, [" " + new, " " + true])
            es.append(float(nll[0] < nll[1]))
        print(f"{name:15s} demo facts flipped {int(sum(es[:3]))}/3  CounterFact ES {statistics.mean(es[3:]):.3f} "
              f"(n={len(es) - 3})", flush=True)


if __name__ == "__main__":
    main()
