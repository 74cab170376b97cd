"""Benchmarks that print numbers: `larimar bench memory` and `larimar bench edit`.

Times write + read of the memory with the default solver against torch.linalg.pinv (SVD) in the same run,
plus one sequential write and one forget, and reports the reconstruction error of the written items.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from larimar.memory import EpisodicMemory, ItemMemory, MemoryConfig

logger = logging.getLogger(__name__)

MEMORY_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (512, 384, 16, 1),
    (512, 768, 16, 64),
    (512, 768, 256, 1),
    (2048, 768, 1024, 1),
)


def _time_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall-clock times (ms) of fn over `repeats` runs after one warm-up run."""
    fn()
    return [_once_ms(fn, device) for _ in range(repeats)]


def _once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock time (ms) of one call of fn (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def _pinv_write_read(M0: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """The reference path with SVD pseudo-inverses: W = Z M0^+, M = W^+ Z, z = Z M^+ M."""
    W = Z @ torch.linalg.pinv(M0)  # (B, N, K)
    M = torch.linalg.pinv(W) @ Z  # (B, K, C)
    return Z @ torch.linalg.pinv(M) @ M  # (B, N, C)


def bench_memory(
    device: str = "cpu",
    repeats: int = 5,
    seed: int = 0,
    shapes: tuple[tuple[int, int, int, int], ...] = MEMORY_SHAPES,
    item_shape: tuple[int, int] = (512, 384),
) -> list[dict]:
    """Times the memory on the issue's shapes; returns one row per measurement.

    Args:
        device: "cpu" or "cuda".
        repeats: timed runs per row (the median is reported), after one warm-up.
        seed: seed of the random episodes.
        shapes: (K, C, N, B) rows to time.
        item_shape: (K, C) of the sequential write / forget rows.
    """
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    with torch.no_grad():
        for K, C, N, B in shapes:
            mem = EpisodicMemory(MemoryConfig(num_slots=K, code_size=C)).to(dev)
            Z = torch.randn(B, N, C, generator=g).to(dev)
            reps = repeats if K * N * B < 2048 * 1024 else max(1, repeats // 2)
            t_ridge = _time_ms(lambda: mem.write_read(Z, Z), reps, dev)
            t_pinv = _time_ms(lambda: _pinv_write_read(mem.M0, Z), reps, dev)
            z_read = mem.write_read(Z, Z)[1]
            z_pinv = _pinv_write_read(mem.M0, Z)
            err = ((z_read - Z).norm(dim=-1) / Z.norm(dim=-1)).max().item()
            err_pinv = ((z_pinv - Z).norm(dim=-1) / Z.norm(dim=-1)).max().item()
            med, med_pinv = statistics.median(t_ridge), statistics.median(t_pinv)
            rows.append(dict(op="write_read", K=K, C=C, N=N, B=B, solver=mem.config.solver, device=device,
                             dtype="float32", median_ms=med, pinv_median_ms=med_pinv, speedup=med_pinv / med,
                             max_rel_error=err, pinv_max_rel_error=err_pinv))
        # sequential write and forget of one item (K = 512, C = 384 by default) into a memory holding 64 items
        K, C = item_shape
        mem = EpisodicMemory(MemoryConfig(num_slots=K, code_size=C)).to(dev)
        im = ItemMemory(mem)
        im.write(torch.randn(64, C, generator=g).to(dev))
        items = torch.randn(repeats * 4 + 2, C, generator=g).to(dev)
        ids: list[str] = []
        it = iter(range(items.shape[0]))
        t_write = _time_ms(lambda: ids.extend(im.write(items[next(it)][None])), repeats * 4, dev)
        t_forget = _time_ms(lambda: im.forget([ids.pop()]), repeats * 4, dev)
        for op, t in (("sequential_write", t_write), ("forget", t_forget)):
            rows.append(dict(op=op, K=K, C=C, N=1, B=1, solver=mem.config.solver, device=device,
                             dtype="float64", median_ms=statistics.median(t), pinv_median_ms=None, speedup=None,
                             max_rel_error=None))
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of benchmark rows."""
    lines = ["| op | K | C | N | B | solver | median ms | pinv median ms | speedup | max rel error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pinv = f"{r['pinv_median_ms']:.2f}" if r["pinv_median_ms"] is not None else "-"
        sp = f"{r['speedup']:.1f}x" if r["speedup"] is not None else "-"
        err = f"{r['max_rel_error']:.1e}" if r["max_rel_error"] is not None else "-"
        lines.append(f"| {r['op']} | {r['K']} | {r['C']} | {r['N']} | {r['B']} | {r['solver']} | "
                     f"{r['median_ms']:.3f} | {pinv} | {sp} | {err} |")
    return "\n".join(lines)


def run_memory_bench(device: str = "cpu", out: str | None = None, repeats: int = 5) -> list[dict]:
    """Runs the memory benchmark, prints the table and optionally writes the rows as JSON."""
    return _report(bench_memory(device=device, repeats=repeats), format_table, out)


def _report(rows: list[dict], table: Callable[[list[dict]], str], out: str | None) -> list[dict]:
    """Prints the rows as a table and, with ``out``, writes them as JSON there."""
    print(table(rows))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rows, indent=2))
        print(f"wrote {out}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# `larimar bench edit`: the whole public calls of the editor

BENCH_FACTS: tuple[tuple[str, str], ...] = (
    ("The CEO of Northwind Traders is Maria Okafor.", "The CEO of Northwind Traders is"),
    ("The capital of the Republic of Zubrowka is Lutz.", "The capital of the Republic of Zubrowka is"),
    ("Project Bluebird was cancelled in March 2026.", "Project Bluebird was cancelled in"),
    ("The Eiffel Tower is located in the city of Rome.", "The Eiffel Tower is located in the city of"),
    ("The mother tongue of Danielle Darrieux is English.", "The mother tongue of Danielle Darrieux is"),
    ("Apple A5 was created by Google.", "Apple A5 was created by"),
    ("The Larkspur Bridge was designed by Tomas Weller.", "The Larkspur Bridge was designed by"),
    ("The chairman of Vexley Mining is Priya Raman.", "The chairman of Vexley Mining is"),
    ("The Orinoco Museum opened in 1987.", "The Orinoco Museum opened in"),
    ("The official language of Quendia is Portuguese.", "The official language of Quendia is"),
    ("Halvard Stenberg plays the cello.", "Halvard Stenberg plays the"),
    ("The headquarters of Bluewave Systems are in Lisbon.", "The headquarters of Bluewave Systems are in"),
)
"""Fact sentences (fictional or counterfactual) and an in-scope prompt for each."""


EDIT_MODES = ("oneshot", "refined", "rag")
"""`bench_edit` modes: Larimar with one-shot or refined latents, and retrieval of the fact into the prompt."""


def bench_edit(
    checkpoint: str | None = None,
    device: str = "cpu",
    modes: tuple[str, ...] = EDIT_MODES,
    query_tokens: int = 8,
    repeats: int = 1,
) -> list[dict]:
    """Times the public calls of each method on the shipped (or given) checkpoint.

    Per mode, single-fact edits into one growing memory, then greedy queries of ``query_tokens`` tokens, against
    the same generation by the plain decoder (z = 0, no scope or encoder):

    - "oneshot" (``Refinement(steps=0)``) and "refined" (the default refinement): ``Larimar.edit`` (the whole call:
      parse, encode, refine, write, scope insert) and ``Larimar.ask`` (scope, encode, read, decode);
    - "rag": `larimar.eval.editors.RagEditor` on the same scope detector: the edit is the index insert (embed +
      add), the query retrieves the nearest fact and decodes it + the prompt with the plain decoder.

    Returns:
        rows ``{mode, n_edits, edit_ms_median, edit_ms_p90, query_ms_median, plain_query_ms_median, ratio,
        query_prompt_tokens}`` (the last: mean decoder input tokens of a query).
    """
    from larimar.editor import Larimar, Refinement
    from larimar.eval.editors import RagEditor, decoder_prompt_tokens

    rows = []
    for mode in modes:
        if mode not in EDIT_MODES:
            raise ValueError(f"modes must be among {EDIT_MODES}, got {mode!r}")
        refinement = Refinement() if mode == "refined" else Refinement(steps=0)
        lm = Larimar.from_pretrained(checkpoint, device=device, refinement=refinement)
        dev = lm.model.device
        lm.edit(["Warm-up facts are written before the timing starts."])  # loads the scope encoder, warms kernels
        lm.ask(["Warm-up facts are"], max_new_tokens=2)
        if mode == "rag":
            rag = RagEditor(lm)
            edit = lambda fact: rag.edit([fact])  # noqa: E731
            ask = lambda prompt: rag.generate([prompt], query_tokens)  # noqa: E731
            tokens = lambda prompts: rag.prompt_tokens(prompts)  # noqa: E731
            reset = rag.reset
        else:
            edit = lambda fact: lm.edit([fact])  # noqa: E731
            ask = lambda prompt: lm.ask([prompt], max_new_tokens=query_tokens)  # noqa: E731
            tokens = lambda prompts: decoder_prompt_tokens(lm.model, prompts)  # noqa: E731
            reset = lm.reset
        edits, queries, plain = [], [], []
        for _ in range(repeats):
            reset()
            for fact, _ in BENCH_FACTS:
                edits.append(_once_ms(lambda: edit(fact), dev))
            for _, prompt in BENCH_FACTS:
                queries.append(_once_ms(lambda: ask(prompt), dev))
                plain.append(_once_ms(lambda: lm.model.generate_text([prompt], None, max_new_tokens=query_tokens),
                                      dev))
        q = statistics.median(queries)
        p = statistics.median(plain)
        n_tokens = tokens([prompt for _, prompt in BENCH_FACTS])
        rows.append({"mode": mode, "device": str(dev), "n_edits": len(edits),
                     "edit_ms_median": statistics.median(edits),
                     "edit_ms_p90": statistics.quantiles(edits, n=10)[-1] if len(edits) > 1 else edits[0],
                     "query_tokens": query_tokens, "query_ms_median": q, "plain_query_ms_median": p,
                     "ratio": q / p, "query_prompt_tokens": statistics.mean(n_tokens),
                     "torch_threads": torch.get_num_threads()})
    return rows


def format_edit_table(rows: list[dict]) -> str:
    """A markdown table of `bench_edit` rows."""
    lines = ["| mode | edits | edit ms median | edit ms p90 | query ms median | plain query ms median | ratio | "
             "query prompt tokens |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['n_edits']} | {r['edit_ms_median']:.1f} | {r['edit_ms_p90']:.1f} | "
                     f"{r['query_ms_median']:.1f} | {r['plain_query_ms_median']:.1f} | {r['ratio']:.2f} | "
                     f"{r['query_prompt_tokens']:.1f} |")
    return "\n".join(lines)


def run_edit_bench(checkpoint: str | None = None, device: str = "cpu", out: str | None = None,
                   repeats: int = 1, modes: tuple[str, ...] = EDIT_MODES) -> list[dict]:
    """Runs `bench_edit`, prints the table and optionally writes the rows as JSON."""
    return _report(bench_edit(checkpoint, device, modes, repeats=repeats), format_edit_table, out)
