"""Training-batch production: ms per micro-batch made in the loop, in a thread, or in worker processes.

    python benchmarks/data_loading.py [--config configs/smollm2_gpu.yaml] [--batches 20] [--busy-ms 300]
        [--workers 1,2]

The training loop of a GPU run spends most of a step in Python (kernel launches), holding the interpreter lock.
``--busy-ms`` stands in for that: after taking each batch the loop runs pure Python for that long. Prints, per
mode, the mean wall time of a step (batch wait + busy work) and of the wait alone. With a thread the batch's
Python work (streaming, name swaps, masks) competes for the lock with the loop; a worker process does not, and
N workers (``data.workers``, shards of the text) make N batches at once where cores allow.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from larimar.backbones import load_decoder, load_encoder
from larimar.model import decoder_pad_id
from larimar.training import BatchSpec, load_config, micro_batches


def busy(ms: float) -> None:
    """Pure-Python work holding the interpreter lock for ``ms`` milliseconds."""
    end = time.perf_counter() + ms / 1000
    x = 0
    while time.perf_counter() < end:
        x += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2_gpu.yaml")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--busy-ms", type=float, default=300.0)
    ap.add_argument("--workers", default="1,2", help="comma-separated data.workers values to time")
    args = ap.parse_args()
    cfg = load_config(args.config)
    enc, enc_tok = load_encoder(cfg.model.encoder)
    _, dec_tok = load_decoder(cfg.model.decoder)
    spec = BatchSpec(dec_tok, enc_tok, cfg.model.max_encoder_length, cfg.model.max_decoder_length,
                     decoder_pad_id(dec_tok))
    per = cfg.optim.batch_episodes // cfg.optim.grad_accum
    print(f"{args.config}: {per} episodes x {cfg.data.episode_size} blocks per micro-batch, busy {args.busy_ms} ms")
    modes = [("loop", 0, 0), ("thread", 4, 0)] + [(f"workers={n}", 4, n) for n in map(int, args.workers.split(","))]
    for name, prefetch, workers in modes:
        run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prefetch=prefetch, workers=workers))
        batches = micro_batches(run, spec, 0, 0, per, 1, 0)
        for _ in range(max(1, workers)):  # start-up (each worker's first batch) is not timed
            next(batches)
        waits, steps = [], []
        for _ in range(args.batches):
            t0 = time.perf_counter()
            next(batches)
            t1 = time.perf_counter()
            busy(args.busy_ms)
            waits.append(t1 - t0)
            steps.append(time.perf_counter() - t0)
        batches.close()
        print(f"{name:10s} step {1000 * statistics.mean(steps):7.1f} ms   wait {1000 * statistics.mean(waits):7.1f} ms")


if __name__ == "__main__":
    main()
