"""Probe how strongly a checkpoint's decoder follows the latent, on CounterFact records (no scope detector).

Per record the fact "prompt + target_new" is written alone into a fresh memory; the rewrite prompt and the
paraphrases are then scored (P(new) > P(true), as protocol `counterfact_prob`) with: no latent (none), the memory
read-out at the prompt (mem), the read-out times 2 and 4 (a gain probe), and the fact's own latent (ae). Every
prompt reads memory here, so PS is measured on all paraphrases, not only those the scope detector lets through.

    python benchmarks/probe_latent.py --checkpoint runs/smollm2_cpu_stage2/checkpoint/model --start 300 --n 40
"""

from __future__ import annotations

import argparse
import time

import torch

from larimar.data import load_counterfact
from larimar.model import LarimarModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="model folder (default: the shipped checkpoint)")
    p.add_argument("--data", default="../shared/data/counterfact_rome/counterfact_rome_929.json")
    p.add_argument("--start", type=int, default=300, help="first record (records before it are left out)")
    p.add_argument("--n", type=int, default=40, help="records")
    args = p.parse_args()
    if args.checkpoint is None:
        from larimar.editor import DEFAULT_CHECKPOINT

        args.checkpoint = DEFAULT_CHECKPOINT
    model = LarimarModel.from_pretrained(args.checkpoint).eval()
    records = load_counterfact(args.data).records[args.start : args.start + args.n]
    hits: dict[str, list[tuple[float, float]]] = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for r in records:
            prompt = r.full_prompt
            zf = model.encode_texts([f"{prompt} {r.target_new}"])  # (1, C)
            prompts = [prompt, *r.paraphrase_prompts]
            zr = model.read(model.write(zf[None]), model.encode_texts(prompts)[None])[0][0]  # (P, C)
            L = len(prompts)
            for name, lat in (("none", None), ("mem", zr), ("mem_x2", 2 * zr), ("mem_x4", 4 * zr),
                              ("ae", zf.expand(L, -1))):
                both = None if lat is None else torch.cat([lat, lat])
                nll = model.continuation_nll(prompts * 2, [" " + r.target_new] * L + [" " + r.target_true] * L, both)
                ok = (nll[:L] < nll[L:]).float()
                hits.setdefault(name, []).append((ok[0].item(), ok[1:].mean().item() if L > 1 else float("nan")))
    print(f"{len(records)} records from #{args.start} of {args.data}, {time.perf_counter() - t0:.0f} s")
    print("| latent | ES | PS (all paraphrases) |\n|---|---|---|")
    for name, v in hits.items():
        es, ps = (100 * torch.tensor(v).nanmean(0)).tolist()
        print(f"| {name} | {es:.1f} | {ps:.1f} |")


if __name__ == "__main__":
    main()
