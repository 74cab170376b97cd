"""How the right answers of a `larimar eval facts` run end: the answer said again, or the answer and then the end.

    python benchmarks/facts_endings.py RUN_DIR [RUN_DIR ...] [--examples 3]

Reads each run's ``cases.jsonl`` and prints, per method, over the questions (own beginnings and other questions)
answered right (EM): ``answer_repeat_rate`` (`larimar.eval.metrics.repeats_answer`) and ``answer_end_rate``
(`larimar.eval.metrics.ends_after_answer`), the two summary metrics `larimar eval facts` reports since 2026-12-07,
so that runs made before them can be compared; and, of the right answers to statement prompts (neither "Q: ..."
nor ending in "?") that go on after the answer, how many go on with the answer's first word (`starts_again`);
then a few right answers of each method as generated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from larimar.eval.metrics import ending_rates


def right_answers(cases: list[dict], name: str) -> list[dict]:
    """The asked (non-unrelated) cases that method ``name`` answered right (EM)."""
    return [c for c in cases if c["kind"] != "unrelated" and c["results"][name]["em"]]


def starts_again(cases: list[dict]) -> tuple[int, int]:
    """(going on, starting again): of the right answers to statement prompts in ``cases`` (one method's), how
    many have text after the answer, and how many of those start it with the answer's first word."""
    going, again = 0, 0
    for c, text in cases:
        prompt = c["prompt"].rstrip()
        if prompt.startswith("Q:") or prompt.endswith("?"):
            continue
        answer = c["answer"].strip()
        rest = text.strip()[len(answer):].lstrip(" .,")
        if rest:
            going += 1
            again += rest.lower().startswith(answer.split()[0].lower())
    return going, again


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="output folders of `larimar eval facts`")
    ap.add_argument("--examples", type=int, default=3, help="right answers shown per method")
    args = ap.parse_args(argv)
    print("| run | method | right answers | answer_repeat_rate | answer_end_rate | statements going on | of them with "
          "the answer's first word |\n|---|---|---|---|---|---|---|")
    shown = []
    for run in args.runs:
        cases = [json.loads(line) for line in (Path(run) / "cases.jsonl").read_text().splitlines() if line.strip()]
        for name in cases[0]["results"] if cases else []:
            right = right_answers(cases, name)
            rates = ending_rates((c["results"][name]["text"], c["answer"]) for c in right)
            fmt = [f"{v:.3f}" if v is not None else "-" for v in rates]
            going, again = starts_again([(c, c["results"][name]["text"]) for c in right])
            share = f"{again} ({again / going:.3f})" if going else "-"
            print(f"| {run} | {name} | {len(right)} | {fmt[0]} | {fmt[1]} | {going} | {share} |")
            shown += [(run, name, c["prompt"], c["results"][name]["text"]) for c in right[: args.examples]]
    for run, name, prompt, text in shown:
        print(f"{run} {name}: {prompt!r} -> {text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
