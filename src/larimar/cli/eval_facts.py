"""``larimar eval facts``: fact sentences written into one memory, then asked as questions (issue 21)::

    .venv/bin/python benchmarks/make_facts_dev.py                 # writes runs/facts/dev.jsonl
    larimar eval facts --data runs/facts/dev.jsonl --out runs/facts/dev [--methods larimar,rag,none] [--limit N]

Writes ``summary.json`` (one object per method), ``summary.md`` and ``cases.jsonl`` into ``--out`` and prints the
table. The file format and the metrics: `larimar.eval.facts`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from larimar.cli.options import ModelOptions, RunOptions, now_utc, split_names
from larimar.eval.facts import (
    METHODS,
    evaluate_facts,
    load_fact_file,
    write_facts_outputs,
)
from larimar.eval.report import machine_info


def run_facts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``larimar eval facts``: loads the facts, builds the editor, evaluates, writes and prints the table.

    Raises:
        ValueError: bad options or a bad fact file.
    """
    methods = split_names(args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"--methods takes some of {','.join(METHODS)}, got {args.methods!r}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.gen_tokens < 1 or args.batch_size < 1:
        raise ValueError("--gen-tokens and --batch-size must be >= 1")
    items = load_fact_file(args.data)
    items = items[: args.limit] if args.limit else items
    run = RunOptions.from_args(args)
    opts = ModelOptions.from_args(args)
    torch.manual_seed(run.seed)
    lm = opts.build()
    summaries, cases = evaluate_facts(lm, items, methods, args.gen_tokens, args.batch_size, progress=True)
    meta = {"task": "facts", "data": str(args.data), "limit": args.limit, "gen_tokens": args.gen_tokens,
            **opts.record(), "seed": run.seed, "date": now_utc(), "machine": machine_info()}
    d = write_facts_outputs(run.folder(), summaries, cases, meta)
    print("\n".join(Path(d / "summary.md").read_text(encoding="utf-8").splitlines()[4:]))
    return [{**s, **meta} for s in summaries]


def add_to_eval(esub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Adds ``facts`` to ``larimar eval``'s subcommand table; returns the table (to chain registrars)."""
    p = esub.add_parser("facts", help="fact sentences in one memory, asked as questions: EM, token accuracy, "
                                      "fluency (larimar, rag, none)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help='JSON lines {"fact", "questions": [{"prompt", "answer"}], "unrelated": [...]}')
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, some of {','.join(METHODS)}")
    p.add_argument("--limit", type=int, default=None, help="the first N facts only")
    p.add_argument("--gen-tokens", type=int, default=30, help="greedy tokens after each question (EM, fluency)")
    p.add_argument("--batch-size", type=int, default=16)
    RunOptions.add_to(p, "summary.json, summary.md, cases.jsonl")
    ModelOptions.add_to(p)
    p.set_defaults(func=lambda a: (run_facts(a), 0)[1])
    return esub
