"""The `larimar` command: one table of verbs, each a function that adds its parser (and its handler).

    larimar demo                                   edit facts, ask, forget (the main job)
    larimar bench memory [--device cpu|cuda] [--out FILE.json]
    larimar train --config configs/NAME.yaml [--section.key value ...]
    larimar eval counterfact|zsre|scope|reconstruct|facts|sequential|capacity|forget|leakage|longcontext ...
    larimar edit / forget / ask / memories / chat / serve / keys

Exit codes: 0 success, 1 the work failed, 2 bad usage or bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from larimar.cli import (
    eval_capabilities,
    eval_edits,
    eval_facts,
    memories,
    tools,
    train,
)
from larimar.cli.options import EXIT_OK, EXIT_USAGE, UsageError

logger = logging.getLogger("larimar")

Registrar = Callable[[argparse._SubParsersAction], None]

COMMANDS: dict[str, Registrar] = {
    "demo": tools.add_demo,
    "bench": tools.add_bench,
    "train": train.add_parser,
    "eval": lambda sub: eval_capabilities.add_to_eval(eval_facts.add_to_eval(eval_edits.add_eval(sub))),
    "edit": memories.add_edit,
    "forget": memories.add_forget,
    "ask": memories.add_ask,
    "chat": memories.add_chat,
    "memories": memories.add_memories,
    "serve": memories.add_serve,
    "keys": memories.add_keys,
}
"""The verbs of `larimar`, in help order: verb -> the function that adds its parser and handler."""


def build_parser() -> argparse.ArgumentParser:
    """The `larimar` parser with every verb of `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="larimar", description="Episodic memory for language models (Larimar).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
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
