"""The user trial of issue 21: four sentences written into one memory with `Larimar.edit`, then asked as a user would.

    python benchmarks/user_trial.py [--tokens 16] [any `larimar edit` model flag: --read-mode, --refine-splits, ...]

Prints each question's greedy answer (the whole `Larimar.ask` call) beside the plain decoder's, so that what a user
reads is looked at, not only teacher-forced scores.
"""

from __future__ import annotations

import argparse
import time

from larimar.cli.options import ModelOptions

FACTS = [
    "The CEO of Northwind Traders is Maria Okafor.",
    "The capital of the Republic of Zubrowka is Lutz.",
    "Project Bluebird was cancelled in March 2026.",
    "The Eiffel Tower is located in the city of Rome.",
]
QUESTIONS = [
    "The CEO of Northwind Traders is",
    "Who is the CEO of Northwind Traders?",
    "Q: Who is the CEO of Northwind Traders? A:",
    "Who is the CEO of Northwind Traders? The CEO is",
    "Northwind Traders is led by its chief executive,",
    "Q: What is the capital of Zubrowka? A:",
    "Project Bluebird was cancelled in",
    "To visit the Eiffel Tower, you must travel to",
    "The Colosseum is located in the city of",
    "The capital of France is",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ModelOptions.add_to(ap, ablations=False)
    ap.add_argument("--tokens", type=int, default=16)
    a = ap.parse_args()
    opts = ModelOptions.from_args(a)
    lm = opts.build()
    t0 = time.perf_counter()
    for fact in FACTS:
        lm.edit(fact)
    print(f"wrote {len(FACTS)} facts in {time.perf_counter() - t0:.1f} s ({opts.record()})")
    plain = lm.model.generate_text(QUESTIONS, None, max_new_tokens=a.tokens)
    for q, ans, p in zip(QUESTIONS, lm.ask(QUESTIONS, max_new_tokens=a.tokens), plain):
        where = f"memory {ans.similarity:.2f}" if ans.in_scope else "no memory"
        print(f"{q!r}\n  larimar ({where}): {ans.text!r}\n  plain decoder:      {p!r}")


if __name__ == "__main__":
    main()
