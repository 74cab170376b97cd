"""Edit latency of the shipped checkpoint, split into its parts (CPU or GPU), medians over N single-fact edits.

    python benchmarks/edit_latency.py [--n 50] [--checkpoint DIR] [--refine-steps 0]

Prints the median ms of: encode (the Larimar encoder), write (ItemMemory RLS update), scope (the scope
detector's sentence embedding of the fact), and the whole `Larimar.edit` call of an edit request, with
``--refine-steps`` steps of write-time latent refinement (default 0, the one-shot write; its part: refine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from larimar.data import load_counterfact
from larimar.editor import Larimar, Refinement


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--data", default="../shared/data/counterfact_rome/counterfact_rome_929.json")
    ap.add_argument("--refine-steps", type=int, default=0)
    args = ap.parse_args()
    lm = Larimar.from_pretrained(args.checkpoint, refinement=Refinement(steps=args.refine_steps))
    records = load_counterfact(args.data, limit=args.n + 1).records
    facts = [r.sentence for r in records]
    lm.edit([facts[-1]])  # warm-up (loads the scope encoder)
    parts: dict[str, list[float]] = {"encode": [], "write": [], "scope": [], "refine": [], "edit": []}
    with torch.inference_mode():
        for f in facts[: args.n]:
            t0 = time.perf_counter()
            z = lm.model.encode_texts([f])
            t1 = time.perf_counter()
            lm.memory.write(z)
            t2 = time.perf_counter()
            lm.scope.embed([f])
            t3 = time.perf_counter()
            parts["encode"].append(1000 * (t1 - t0))
            parts["write"].append(1000 * (t2 - t1))
            parts["scope"].append(1000 * (t3 - t2))
    lm.reset()
    for r in records[: args.n]:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        lm.edit([r], timings=timings)
        parts["edit"].append(1000 * (time.perf_counter() - t0))
        parts["refine"].append(timings["refine"])
    for k, v in parts.items():
        print(f"{k:>7}: median {statistics.median(v):7.2f} ms over {len(v)} facts")


if __name__ == "__main__":
    main()
