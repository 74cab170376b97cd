"""Stores a trained Larimar model for shipping: float16 weights (memory prior float32) and only the rows of the
encoder's token-embedding matrix that training changed (the others load from the backbone package).

A model trained from a float16 copy of the encoder (the lent GPU machine had no network, so MiniLM travelled
in float16; see docs/training.md) holds float16-rounded values in the rows it never trained: a row equal to the
float16 rounding of the backbone's row counts as unchanged and loads from the backbone exactly.

    python scripts/compact_checkpoint.py runs/gpu_h100/run1_model16 --out src/larimar/checkpoints/default
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from larimar.backbones import load_encoder
from larimar.model import LarimarModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="a model folder written by save_pretrained")
    p.add_argument("--out", required=True, help="the folder to write")
    args = p.parse_args()
    model = LarimarModel.from_pretrained(args.src)
    base, _ = load_encoder(model.config.encoder)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, storage_dtype=torch.float16, base_encoder=base, base_rounding=torch.float16)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out}: {sum(f.stat().st_size for f in out.iterdir())} bytes")


if __name__ == "__main__":
    main()
