"""``larimar demo`` (the main job), ``larimar bench memory`` and ``larimar bench edit``."""

from __future__ import annotations

import argparse

from larimar.cli.options import EXIT_OK, UsageError


def _cmd_bench_memory(args: argparse.Namespace) -> int:
    import torch

    from larimar.bench import run_memory_bench

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    run_memory_bench(device=args.device, out=args.out, repeats=args.repeats)
    return EXIT_OK


def _cmd_bench_edit(args: argparse.Namespace) -> int:
    import torch

    from larimar.bench import EDIT_MODES, run_edit_bench

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or any(m not in EDIT_MODES for m in modes):
        raise UsageError(f"--modes takes {', '.join(EDIT_MODES)} (comma-separated), got {args.modes!r}")
    run_edit_bench(args.checkpoint, args.device, args.out, args.repeats, modes)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from larimar.demo import run_demo

    run_demo(checkpoint=args.checkpoint)
    return EXIT_OK


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print numbers")
    bsub = p.add_subparsers(dest="bench_what", required=True)
    m = bsub.add_parser("memory", help="time write + read against torch.linalg.pinv, and sequential write / forget")
    m.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    m.add_argument("--out", help="write the rows as JSON to this file")
    m.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    m.set_defaults(func=_cmd_bench_memory)
    e = bsub.add_parser("edit", help="time whole edit() and ask() calls, one-shot and refined, against the plain decoder")
    e.add_argument("--checkpoint", default=None, help="Larimar checkpoint folder (default: the shipped one)")
    e.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    e.add_argument("--modes", default="oneshot,refined,rag",
                   help="comma-separated: oneshot, refined (Larimar) and rag (the fact retrieved into the prompt)")
    e.add_argument("--repeats", type=int, default=1, help="passes over the 12 benchmark facts")
    e.add_argument("--out", help="write the rows as JSON to this file")
    e.set_defaults(func=_cmd_bench_edit)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: write facts, ask, forget (memory demo without a checkpoint)")
    p.add_argument("--checkpoint", default=None, help="Larimar checkpoint folder (default: the shipped one)")
    p.set_defaults(func=_cmd_demo)
