"""`larimar train`: end-to-end training from a YAML config (see `larimar.training` and configs/*.yaml)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    """Loads the config (with the ``--section.key value`` overrides), trains, and on rank 0 prints the last
    metrics and where the model went."""
    from larimar.training import dist_info, load_config, train

    cfg = load_config(args.config, getattr(args, "overrides", []))
    last = train(cfg)
    if dist_info()[0] == 0:
        print(json.dumps(last))
        print(f"model saved to {Path(cfg.out_dir) / 'model'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `larimar train`."""
    p = sub.add_parser("train", help="train a Larimar model end to end (see configs/*.yaml)")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.set_defaults(func=_cmd_train, accepts_overrides=True)  # extra `--section.key value` pairs
