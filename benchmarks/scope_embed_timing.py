"""The scope embedding of one short sentence: `SentenceTransformer.encode` against a direct forward (tokenize,
forward, mean pool, normalise) of the same all-MiniLM-L6-v2, and how far apart their embeddings are.

    OMP_NUM_THREADS=2 python benchmarks/scope_embed_timing.py [--calls 50]

Prints the median ms of each, measured twice in alternation, and the largest absolute difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sentence_transformers import SentenceTransformer

from larimar.scope import default_encoder_path

SENTENCE = ["The CEO of Northwind Traders is Maria Okafor."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50)
    calls = ap.parse_args().calls
    st = SentenceTransformer(default_encoder_path(), device="cpu")
    transformer = st[0]

    def encode() -> torch.Tensor:
        return st.encode(SENTENCE, batch_size=64, convert_to_tensor=True, show_progress_bar=False)

    @torch.inference_mode()
    def direct() -> torch.Tensor:
        b = transformer.tokenizer(SENTENCE, padding=True, truncation=True, max_length=transformer.max_seq_length,
                                  return_tensors="pt")
        h = transformer.auto_model(**b).last_hidden_state  # (1, T, 384)
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)  # (1, T, 1)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)  # (1, 384)

    for fn in (encode, direct, encode, direct):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t))
        print(f"{fn.__name__}: {statistics.median(ts):.2f} ms median of {calls}")
    diff = (torch.nn.functional.normalize(encode().float(), dim=-1) - direct()).abs().max().item()
    print(f"max abs difference of the embeddings: {diff:.1e}")


if __name__ == "__main__":
    main()
