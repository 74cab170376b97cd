"""Probe: how well can the decoder reconstruct a held-out block from the *best* latent, not the encoder's?

#3's bar is ``nll_memory <= 0.5 * nll_no_memory`` on 64-token Wikipedia blocks. This probe separates the two parts
that could limit it:

- the decoder side (latent projections, gated LoRA): how low the block's NLL goes when its latent is optimised
  directly (Adam on z alone, every weight frozen; the auto-decoder bound of this decoder), and
- the encoder side: the gap between that and the encoder's latent.

The blocks are the first ``--n`` blocks that ``larimar eval reconstruct`` evaluates (same data, block length and
order). The NLL is the mean per token over all blocks, as in ``eval reconstruct``; the optimised latents are also
written to a memory of their episode and read back, to show the memory does not lose what they carry.

This is a diagnostic of the checkpoint, not an evaluation method: the latents are fitted to the very tokens that
are scored.

    python benchmarks/probe_reconstruction_ceiling.py [--n 16] [--steps 300] [--lr 0.05] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from larimar.cli.options import quiet_loading
from larimar.data import iter_episodes, iter_text_blocks, iter_wikipedia_texts
from larimar.editor import DEFAULT_CHECKPOINT
from larimar.model import LarimarModel


def block_nll(model: LarimarModel, texts: list[str], latent: torch.Tensor | None) -> torch.Tensor:
    """(n,) mean NLL per token of each block, decoded after the start token from latent (n, C) (None: z = 0)."""
    return model.continuation_nll([""] * len(texts), texts, latent)


def token_mean(model: LarimarModel, texts: list[str], per_row: torch.Tensor) -> float:
    """Token-weighted mean of per-row mean NLLs (what ``eval reconstruct`` reports)."""
    counts = torch.tensor([len(model.decoder_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts],
                          dtype=torch.float32)
    return float((per_row.float().cpu() * counts).sum() / counts.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/wikipedia_en/enwiki_2018_validation.jsonl")
    ap.add_argument("--n", type=int, default=16, help="blocks (one episode of 16 by default)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    quiet_loading()
    model = LarimarModel.from_pretrained(args.checkpoint or DEFAULT_CHECKPOINT).eval()
    blocks = iter_text_blocks(iter_wikipedia_texts(args.data), model.decoder_tokenizer,
                              block_tokens=model.config.max_decoder_length)
    texts = [b.text for b in itertools.islice(blocks, args.n)]
    with torch.inference_mode():
        Z = model.encode_texts(texts)  # (n, C)
        plain = token_mean(model, texts, block_nll(model, texts, None))
        enc = token_mean(model, texts, block_nll(model, texts, Z))
    print(f"{len(texts)} blocks  z=0: {plain:.3f}  encoder latent: {enc:.3f}  ratio {enc / plain:.3f}", flush=True)
    print(f"encoder latent norm: mean {float(Z.norm(dim=-1).mean()):.2f}", flush=True)
    marks = {1, 5, 10, 25, 50, 100, 200, 300, 500, 1000, args.steps}
    t0 = time.time()
    with torch.inference_mode(False), torch.enable_grad():
        z = Z.detach().clone().float().requires_grad_(True)  # (n, C)
        opt = torch.optim.Adam([z], lr=args.lr)
        for step in range(1, args.steps + 1):
            nll = block_nll(model, texts, z)  # (n,)
            (z.grad,) = torch.autograd.grad(nll.float().sum(), [z])
            opt.step()
            if step in marks:
                with torch.no_grad():
                    cur = token_mean(model, texts, block_nll(model, texts, z))
                print(f"step {step:5d}  optimised latent: {cur:.3f}  ratio {cur / plain:.3f}  "
                      f"norm {float(z.detach().norm(dim=-1).mean()):.2f}  cos(z, z_enc) "
                      f"{float(torch.cosine_similarity(z.detach(), Z, dim=-1).mean()):.3f}  {time.time() - t0:.0f} s",
                      flush=True)
    z = z.detach()
    with torch.inference_mode():
        for episode in iter_episodes(range(len(texts)), min(16, len(texts))):
            idx = torch.tensor(episode)
            M = model.write(z[idx][None])  # (1, K, C)
            read = model.read(M, z[idx][None])[0][0]  # (E, C)
            sub = [texts[i] for i in episode]
            mem = token_mean(model, sub, block_nll(model, sub, read))
            print(f"episode of {len(sub)}: optimised latents through memory: {mem:.3f}", flush=True)


if __name__ == "__main__":
    main()
