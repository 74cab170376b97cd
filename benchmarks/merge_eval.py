"""Merges the outputs of several ``larimar eval counterfact|zsre`` runs over the same records into one table.

For a comparison run split into shards that ran in parallel (e.g. one process per CPU core), each shard with its
own ``--methods``. Rows keep their shard's measurements; a method present in several shards (larimar, measured in
each shard beside the baselines it is timed against) keeps its first row. Checks that every shard used the same
data, limit and protocol.

    python benchmarks/merge_eval.py runs/a runs/b runs/c --out runs/merged
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLS = ["method", "n_cases", "es", "ps", "ns", "score", "tf_reliability", "tf_generalization", "tf_locality",
        "edit_ms_median", "query_ms_median", "peak_mem_mb", "peak_mem_delta_mb", "shard"]


def fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 1 else f"{v:.3g}"
    return str(v)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of `larimar eval` (summary.json)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shards = [(run, json.loads((run / "summary.json").read_text())) for run in args.runs]
    rows, seen, keys = [], set(), set()
    for run, summary in shards:
        for s in summary:
            keys.add((s["data"], s["limit"], s["protocol"]))
            if s["method"] in seen:
                continue
            seen.add(s["method"])
            rows.append({**s, "shard": run.name})
    if len(keys) != 1:
        print(f"error: the runs differ in data / limit / protocol: {sorted(map(str, keys))}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLS) + " |" for r in rows]
    for shard, summary in shards:  # speed-ups measured inside each shard, against its own larimar row
        own = {s["method"]: s["edit_ms_median"] for s in summary}
        for m, v in own.items():
            if m not in ("larimar", "none") and own.get("larimar"):
                lines.append(f"\n{m}: median edit {v:,.1f} ms vs larimar {own['larimar']:,.1f} ms in the same run "
                             f"({shard.name}): {v / own['larimar']:,.0f}x")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
