"""`larimar demo`, the main job: write a fact into memory, ask, forget, ask again.

With a trained checkpoint (the shipped default, or --checkpoint) this runs the editing demo on the real model;
without one it demonstrates the memory alone (write, read, exact forgetting) on encoded sentences.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from larimar.memory import EpisodicMemory, ItemMemory, MemoryConfig

FACTS = [
    "The Eiffel Tower is located in the city of Rome.",
    "The mother tongue of Danielle Darrieux is English.",
    "Apple A5 was created by Google.",
    "The CEO of Northwind Traders is Maria Okafor.",
]
QUESTIONS = [
    ("The Eiffel Tower is located in the city of", [" Rome", " Paris"]),
    ("The mother tongue of Danielle Darrieux is", [" English", " French"]),
    ("Apple A5 was created by", [" Google", " Apple"]),
    # a multi-word answer asked as questions, not as the written sentence's beginning
    ("Who is the CEO of Northwind Traders?", [" Maria Okafor", " John Smith"]),
    ("Q: Who is the CEO of Northwind Traders? A:", [" Maria Okafor", " John Smith"]),
]


def run_demo(checkpoint: str | None = None) -> None:
    """Runs the editing demo if a checkpoint is available, else the memory demo."""
    from larimar.editor import DEFAULT_CHECKPOINT

    path = Path(checkpoint) if checkpoint else Path(DEFAULT_CHECKPOINT)
    if (path / "config.json").is_file():
        editing_demo(str(path))
    elif checkpoint:
        raise FileNotFoundError(f"no Larimar checkpoint at {path} (expected config.json and model.safetensors)")
    else:
        print(f"(no trained checkpoint at {path}: running the memory demo)")
        memory_demo()


def editing_demo(checkpoint: str) -> None:
    """Edit, ask, forget with the real model."""
    from larimar.editor import Larimar

    t0 = time.perf_counter()
    lm = Larimar.from_pretrained(checkpoint)
    print(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f} s")

    def ask() -> None:
        for prompt, cands in QUESTIONS:
            nll = lm.score(prompt, cands)
            best = cands[min(range(len(cands)), key=nll.__getitem__)]
            print(f"  {prompt!r}: NLL {dict(zip(cands, [round(x, 2) for x in nll]))} -> prefers {best!r}; "
                  f"generates {lm.generate(prompt, max_new_tokens=10)!r}")

    print("before editing:")
    ask()
    t0 = time.perf_counter()
    ids = lm.edit(FACTS)
    print(f"wrote {len(ids)} facts in {1000 * (time.perf_counter() - t0):.0f} ms: {ids}")
    print("after editing:")
    ask()
    lm.forget(ids[:1])
    print(f"forgot {ids[0]} ({FACTS[0]!r}):")
    ask()


def memory_demo() -> None:
    """Write encoded sentences into a memory, read them back, forget one exactly."""
    from larimar.backbones import load_encoder

    enc, tok = load_encoder()
    with torch.no_grad():
        batch = tok(FACTS, return_tensors="pt", padding=True)
        h = enc(**batch).last_hidden_state  # (N, T, 384)
        mask = batch["attention_mask"][..., None].float()
        Z = ((h * mask).sum(1) / mask.sum(1)).double()  # (N, 384) mean-pooled MiniLM embeddings
    mem = EpisodicMemory(MemoryConfig(num_slots=512, code_size=Z.shape[-1]))
    im = ItemMemory(mem)
    t0 = time.perf_counter()
    ids = [im.write(Z[i : i + 1])[0] for i in range(len(FACTS))]
    print(f"wrote {len(ids)} facts one by one in {1000 * (time.perf_counter() - t0):.1f} ms")
    for i, fact in enumerate(FACTS):
        err = ((im.read(Z[i : i + 1]) - Z[i]).norm() / Z[i].norm()).item()
        print(f"  read back {fact!r}: relative error {err:.1e}")
    im.forget([ids[0]])
    ref = ItemMemory(mem)
    ref.write(Z[1:])
    diff = ((im.M - ref.M).norm() / ref.M.norm()).item()
    print(f"forgot {FACTS[0]!r}: memory equals one written without it to {diff:.1e} (relative)")
