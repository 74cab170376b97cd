"""Small layer sweep for ROME's default hyper-parameters on SmolLM2-135M (CounterFact, CPU friendly).

For each layer: ROME-edit each of the first ``--n-records`` CounterFact records (one at a time, restoring in
between) and score, by mean per-token NLL of " target" after the prompt (the Larimar paper's protocol):
ES = rewrite prompt prefers target_new, PS = paraphrases do, NS = neighbourhood prompts still prefer
target_true. Prints one line per layer (and per record with -v).

Usage (2 CPU threads or fewer; covariance statistics are computed once per layer and cached)::

    OMP_NUM_THREADS=1 python benchmarks/sweep_rome.py --layers 3 6 9 12 --n-records 10 --stats-tokens 4000
    OMP_NUM_THREADS=1 python benchmarks/sweep_rome.py --layers 6 --config configs/baselines/rome_smollm2-135m.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from larimar.backbones import load_decoder
from larimar.baselines import apply_rome, load_hparams
from larimar.baselines.common import build_batch, model_device, target_ids, target_nll
from larimar.data import EditRequest, load_counterfact

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@torch.no_grad()
def nll(model: torch.nn.Module, tok, prompts: list[str], target: str) -> torch.Tensor:
    """Mean per-token NLL of " target" after each prompt, (len(prompts),)."""
    batch = build_batch(tok, prompts, [0] * len(prompts), [target_ids(tok, target)] * len(prompts), model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    return target_nll(logits, batch.labels)


def score(model: torch.nn.Module, tok, req: EditRequest, n_neigh: int) -> dict[str, float]:
    """ES / PS / NS (fractions) for one record on the model as it is."""
    out = {}
    for key, prompts, want_new in (
        ("es", [req.full_prompt], True),
        ("ps", req.paraphrase_prompts, True),
        ("ns", req.neighborhood_prompts[:n_neigh], False),
    ):
        if not prompts:
            continue
        new, true = nll(model, tok, prompts, req.target_new), nll(model, tok, prompts, req.target_true)
        out[key] = ((new < true) if want_new else (true < new)).float().mean().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9, 12])
    parser.add_argument("--n-records", type=int, default=10)
    parser.add_argument("--offset", type=int, default=0, help="skip this many records first")
    parser.add_argument("--n-neigh", type=int, default=3, help="neighbourhood prompts scored per record")
    parser.add_argument("--stats-tokens", type=int, default=4000)
    parser.add_argument("--config", type=Path, default=None, help="a ROME YAML; flags below override it")
    parser.add_argument("--steps", type=int, default=None, help="v_num_grad_steps")
    parser.add_argument("--data", type=Path, default=DATA / "counterfact_rome" / "counterfact_rome_929.json")
    parser.add_argument("--out", type=Path, default=None, help="write per-record results as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    model, tok = load_decoder()
    records = load_counterfact(args.data, limit=args.offset + args.n_records).records[args.offset :]
    base = [score(model, tok, r, args.n_neigh) for r in records]
    mean = lambda rows, k: sum(r[k] for r in rows if k in r) / max(1, sum(k in r for r in rows))  # noqa: E731
    print(f"unedited: ES {mean(base, 'es'):.2f} PS {mean(base, 'ps'):.2f} NS {mean(base, 'ns'):.2f}")
    results = []
    for layer in args.layers:
        overrides = {"layer": layer, "stats_n_tokens": args.stats_tokens}
        if args.steps is not None:
            overrides["v_num_grad_steps"] = args.steps
        hp = load_hparams("rome", args.config, overrides)
        rows, t_edit = [], 0.0
        for rec in records:
            t0 = time.perf_counter()
            _, restore = apply_rome(model, tok, [rec], hp)
            t_edit += time.perf_counter() - t0
            row = score(model, tok, rec, args.n_neigh)
            restore()
            rows.append(row)
            if args.verbose:
                print(f"  layer {layer} case {rec.case_id}: {row}")
        results.append({"layer": layer, "rows": rows, "sec_per_edit": t_edit / len(records)})
        print(
            f"layer {layer:2d}: ES {mean(rows, 'es'):.2f} PS {mean(rows, 'ps'):.2f} NS {mean(rows, 'ns'):.2f}"
            f"  ({t_edit / len(records):.1f} s/edit, n={len(records)})",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
