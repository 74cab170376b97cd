"""How the right answers of a `larimar eval facts` run end: the answer said again, or the answer and then the end.

    python benchmarks/facts_endings.py RUN_DIR [RUN_DIR ...] [--examples 3]

Reads each run's ``cases.jsonl`` and prints, per method, over the questions (own beginnings and other questions)
answered right (EM): ``answer_repeat_rate`` (`larimar.eval.metrics.repeats_answer`) and ``answer_end_rate``
(`larimar.eval.metrics.ends_after_answer`), the two summary metrics `larimar eval facts` reports since 2026-12-07,
so that runs made before them can be compared; then a few right answers of each method as generated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from larimar.eval.metrics import ends_after_answer, mean_of, repeats_answer


def endings(cases: list[dict]) -> dict[str, dict[str, float | int | None]]:
    """Per method: n_right, answer_repeat_rate, answer_end_rate over the asked (non-unrelated) cases answered right."""
    out: dict[str, dict[str, float | int | None]] = {}
    for name in cases[0]["results"] if cases else []:
        right = [c for c in cases if c["kind"] != "unrelated" and c["results"][name]["em"]]
        out[name] = {"n_right": len(right),
                     "answer_repeat_rate": mean_of([repeats_answer(c["results"][name]["text"], c["answer"]) for c in right]),
                     "answer_end_rate": mean_of([ends_after_answer(c["results"][name]["text"], c["answer"])
                                                 for c in right])}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="output folders of `larimar eval facts`")
    ap.add_argument("--examples", type=int, default=3, help="right answers shown per method")
    args = ap.parse_args(argv)
    print("| run | method | right answers | answer_repeat_rate | answer_end_rate |\n|---|---|---|---|---|")
    shown = []
    for run in args.runs:
        cases = [json.loads(line) for line in (Path(run) / "cases.jsonl").read_text().splitlines() if line.strip()]
        for name, e in endings(cases).items():
            fmt = [f"{v:.3f}" if isinstance(v, float) else "-" for v in (e["answer_repeat_rate"], e["answer_end_rate"])]
            print(f"| {run} | {name} | {e['n_right']} | {fmt[0]} | {fmt[1]} |")
            right = [c for c in cases if c["kind"] != "unrelated" and c["results"][name]["em"]]
            shown += [(run, name, c["prompt"], c["results"][name]["text"]) for c in right[: args.examples]]
    for run, name, prompt, text in shown:
        print(f"{run} {name}: {prompt!r} -> {text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
