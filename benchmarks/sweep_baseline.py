"""Small hyper-parameter sweep for any baseline editor on SmolLM2-135M (CounterFact, `counterfact_prob`).

Each setting edits records ``--offset .. --offset + --n-records`` one at a time (restoring in between) through the
same harness as ``larimar eval counterfact`` and prints ES / PS / NS / Score and the median edit time. Pick records
outside the ones you report (the default offset skips the first 300 of counterfact_rome_929).

Usage (a grid over every ``--set``; values are YAML, so lists and numbers work)::

    OMP_NUM_THREADS=1 python benchmarks/sweep_baseline.py memit --n-records 8 \\
        --set mom2_update_weight=1500,15000,150000 --set "layers=[4, 5, 6]" --set "layers=[2, 3, 4, 5, 6]"
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import yaml

from larimar.backbones import load_decoder
from larimar.baselines import load_hparams
from larimar.data import load_counterfact
from larimar.eval.editors import BASELINE_CONFIGS, HFBaselineEditor
from larimar.eval.edits import evaluate_counterfact

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def parse_sets(items: list[str]) -> dict[str, list]:
    """``["a=1,2", "b=[3, 4]", "b=[5]"]`` -> ``{"a": [1, 2], "b": [[3, 4], [5]]}`` (YAML values)."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE[,VALUE...], got {item!r}")
        values = [yaml.safe_load(value)] if value.strip().startswith("[") else [yaml.safe_load(v) for v in value.split(",")]
        grid.setdefault(key.strip(), []).extend(values)
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("method", help="rome, memit, grace, ft or ike")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUES", help="a grid axis")
    parser.add_argument("--n-records", type=int, default=8)
    parser.add_argument("--offset", type=int, default=300, help="skip this many records first")
    parser.add_argument("--data", type=Path, default=DATA / "counterfact_rome" / "counterfact_rome_929.json")
    parser.add_argument("--config", type=Path, default=None, help="base YAML (default: the method's SmolLM2 file)")
    parser.add_argument("--start-token", default="<|endoftext|>", help="prepended when scoring (as the default checkpoint)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    config = args.config or BASELINE_CONFIGS / f"{args.method}_smollm2-135m.yaml"
    model, tok = load_decoder()
    records = load_counterfact(args.data, limit=args.offset + args.n_records).records[args.offset :]
    grid = parse_sets(args.set)
    results = []
    for combo in itertools.product(*grid.values()) if grid else [()]:
        overrides = dict(zip(grid, combo))
        editor = HFBaselineEditor(args.method, model, tok, load_hparams(args.method, config, overrides),
                                  start_token_id=tok.convert_tokens_to_ids(args.start_token))
        s = evaluate_counterfact(editor, records, gen_tokens=0, detail_every=10**9)
        row = {"overrides": overrides, **{k: s[k] for k in ("n_cases", "es", "ps", "ns", "score", "edit_ms_median")}}
        results.append(row)
        print(f"{json.dumps(overrides)}: n={s['n_cases']} ES={s['es']:.1f} PS={s['ps']:.1f} NS={s['ns']:.1f} "
              f"Score={s['score']:.1f} edit_ms={s['edit_ms_median']:.0f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
