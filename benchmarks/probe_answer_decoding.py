"""Probe decode-time variants of a one-fact latent on ZsRE: teacher-forced token accuracy of the answer.

Per record the latent z of the fact "prompt + answer" is computed directly (no memory, no scope detector) and the
answer is scored after the rewrite prompt (``rewrite``) and after each rephrasing (``para``) with:

- ``proj``: the paper's read of a one-fact memory, (z_q . z / |z|^2) z, z_q the prompt's own latent (what the
  keyed read returns);
- ``full``, ``x1.5``, ``x2``: z itself and z scaled by 1.5 and 2;
- ``g1``, ``g2``, ``proj_g1``: a guidance away from z = 0, logits(z) + g (logits(z) - logits(0)).

    python benchmarks/probe_answer_decoding.py --start 0 --n 50 [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from larimar.data import load_zsre
from larimar.editor import Larimar
from larimar.eval.editors import teacher_forced
from larimar.eval.metrics import match_rate as _acc
from larimar.eval.metrics import space as _space
from larimar.facts import fact_sentence

VARIANTS = {  # name: (latent, scale, guidance)
    "proj": ("proj", 1.0, 0.0), "full": ("full", 1.0, 0.0), "x1.5": ("full", 1.5, 0.0), "x2": ("full", 2.0, 0.0),
    "g1": ("full", 1.0, 1.0), "g2": ("full", 1.0, 2.0), "proj_g1": ("proj", 1.0, 1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/zsre/zsre_mend_eval_800.json")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--checkpoint", default=None)
    args = ap.parse_args()
    model = Larimar.from_pretrained(args.checkpoint).model
    records = load_zsre(args.data).records[args.start : args.start + args.n]
    rewrite: dict[str, list[float]] = {k: [] for k in VARIANTS}
    para: dict[str, list[float]] = {k: [] for k in VARIANTS}
    scales = []
    with torch.inference_mode():
        for r in records:
            z = model.encode_texts([fact_sentence(r)]).float()  # (1, C)
            prompts = [r.full_prompt, *r.paraphrase_prompts]
            zq = model.encode_texts(prompts).float()  # (P, C)
            c = (zq @ z.T) / (z @ z.T)  # (P, 1): the one-fact read's projection coefficient
            scales.extend(c.flatten().tolist())
            for name, (kind, scale, g) in VARIANTS.items():
                lat = (c * z if kind == "proj" else z.expand(len(prompts), -1)) * scale  # (P, C)

                def logits(ids: torch.Tensor, mask: torch.Tensor, lat: torch.Tensor = lat, g: float = g) -> torch.Tensor:
                    out = model.decode_logits(ids, mask, lat)
                    if g:
                        out = out + g * (out - model.decode_logits(ids, mask, torch.zeros_like(lat)))
                    return out

                tf = teacher_forced(logits, model.decoder_tokenizer, model.start_token_id, model.pad_token_id,
                                    prompts, [_space(r.target_new)] * len(prompts))
                rewrite[name].append(_acc(tf.predicted[0], tf.target[0]))
                para[name].extend(_acc(tf.predicted[i], tf.target[i]) for i in range(1, len(prompts)))
    print(f"{args.data} records {args.start}..{args.start + len(records)}; projection coefficient mean "
          f"{statistics.mean(scales):.3f} (min {min(scales):.3f}, max {max(scales):.3f})")
    for name in VARIANTS:
        p = f"{statistics.mean(para[name]):.3f}" if para[name] else "-"
        print(f"{name:8s} rewrite {statistics.mean(rewrite[name]):.3f}  para {p}")


if __name__ == "__main__":
    main()
