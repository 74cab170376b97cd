"""The `larimar` command. Each subcommand is a thin layer over a typed function of the library.

    larimar demo                                   edit a fact, ask, forget (the main job)
    larimar bench memory [--device cpu|cuda] [--out FILE.json]
    larimar train --config configs/NAME.yaml [--key value ...]
    larimar eval reconstruct|counterfact|zsre ...
    larimar edit / forget / ask / memories / chat / serve / keys

Exit codes: 0 success, 1 the work failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

logger = logging.getLogger("larimar")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


# -- subcommand handlers ------------------------------------------------------------------------------------


def _cmd_bench_memory(args: argparse.Namespace) -> int:
    from larimar.bench import run_memory_bench

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
    run_memory_bench(device=args.device, out=args.out, repeats=args.repeats)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from larimar.demo import run_demo

    run_demo(checkpoint=args.checkpoint)
    return EXIT_OK


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print numbers")
    bsub = p.add_subparsers(dest="bench_what", required=True)
    m = bsub.add_parser("memory", help="time write + read against torch.linalg.pinv, and sequential write / forget")
    m.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    m.add_argument("--out", help="write the rows as JSON to this file")
    m.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    m.set_defaults(func=_cmd_bench_memory)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: write a fact, ask, forget (memory demo without a checkpoint)")
    p.add_argument("--checkpoint", default=None, help="Larimar checkpoint folder (default: the shipped one)")
    p.set_defaults(func=_cmd_demo)


# Other modules register their subcommands here: (name, function adding the parser).
_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_bench]


def _optional_registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands defined next to their modules (training, evaluation, editing, service)."""
    regs = []
    for mod, fn in (
        ("larimar.training", "add_cli"),
        ("larimar.evaluation", "add_cli"),
        ("larimar.capabilities", "add_cli"),
        ("larimar.editing", "add_cli"),
        ("larimar.service", "add_cli"),
    ):
        try:
            module = __import__(mod, fromlist=[fn])
        except ImportError as e:  # an optional extra (e.g. the service's fastapi) is not installed
            logger.debug("subcommands of %s unavailable: %s", mod, e)
            continue
        if hasattr(module, fn):
            regs.append(getattr(module, fn))
    return regs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="larimar", description="Episodic memory for language models (Larimar).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for reg in _REGISTRARS + _optional_registrars():
        reg(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from larimar.backbones import BackboneNotFoundError

    try:
        return int(args.func(args) or EXIT_OK)
    except (UsageError, BackboneNotFoundError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"larimar: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("larimar: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
