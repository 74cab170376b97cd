"""Helper process for the store's kill test (tests/test_store.py): streams edits to a store until killed.

    python tests/_store_child.py STORE_DIR SEED     stream edits; print "ack write ID" / "ack forget ID" (one unbuffered
                                                    write each) after each call returns
    python tests/_store_child.py --zygote           read "STORE_DIR SEED" lines on stdin; for each, fork a worker
                                                    that streams edits, print "pid PID", wait for it to die, print
                                                    "dead PID"; avoids paying the torch import on every round

The worker uses a tiny memory (K=16, C=8), random latents and frequent snapshots, so a kill can land anywhere:
inside a transaction, between commit and the RAM update, or in the middle of writing a snapshot.
"""

from __future__ import annotations

import os
import sys

import torch

from larimar.memory import EpisodicMemory, MemoryConfig
from larimar.serving.store import MemoryStore

FINGERPRINT = "kill-test"
NAMESPACE = "crash"
NUM_SLOTS, CODE_SIZE = 16, 8


def make_memory() -> EpisodicMemory:
    """The deterministic tiny memory module (M0 = eye) shared by the worker and the test."""
    return EpisodicMemory(MemoryConfig(num_slots=NUM_SLOTS, code_size=CODE_SIZE))


def _ack(op: str, item_id: str) -> None:
    # one write(2) per line: a kill can never leave half a line in the pipe (lines are far below PIPE_BUF)
    os.write(sys.stdout.fileno(), f"ack {op} {item_id}\n".encode())


def stream(store_dir: str, seed: int, max_ops: int = 100_000) -> None:
    """Writes (1-3 items) and forgets (a live item, 1 time in 4) until killed."""
    gen = torch.Generator().manual_seed(seed)
    store = MemoryStore(store_dir, fingerprint=FINGERPRINT, memory=make_memory(), snapshot_every=3)
    live = [f.id for f in store.facts(NAMESPACE)]
    for op in range(max_ops):
        if live and int(torch.randint(4, (1,), generator=gen)) == 0:
            victim = live.pop(int(torch.randint(len(live), (1,), generator=gen)))
            store.forget(NAMESPACE, [victim])
            _ack("forget", victim)
        else:
            n = int(torch.randint(1, 4, (1,), generator=gen))
            Z = torch.randn(n, CODE_SIZE, generator=gen)  # (n, C)
            ids = store.write(NAMESPACE, [f"fact {seed}.{op}.{k}" for k in range(n)], Z, provenance={"seed": seed})
            live.extend(ids)
            for i in ids:
                _ack("write", i)
    store.close()


def zygote() -> None:
    for line in sys.stdin:
        store_dir, seed = line.split()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the loop
            try:
                stream(store_dir, int(seed))
            finally:
                os._exit(0)
        print(f"pid {pid}", flush=True)
        os.waitpid(pid, 0)
        print(f"dead {pid}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        stream(sys.argv[1], int(sys.argv[2]))
