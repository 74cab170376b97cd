"""Run outputs: machine info, peak memory, JSON / JSON-lines, markdown tables and matplotlib plots."""

from __future__ import annotations

import json
import os
import platform
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch


class PeakMemory:
    """Peak memory of this process while a block runs (a context manager).

    On CUDA: ``torch.cuda.max_memory_allocated`` (reset on entry), kind "cuda_allocated". On CPU: the resident
    set size, sampled every 5 ms by a background thread from /proc/self/statm (Linux), kind "cpu_rss"; elsewhere
    the process's lifetime peak from ``resource.getrusage``, kind "cpu_maxrss".

    Attributes (after exit): peak_mb, the peak in MiB; delta_mb, the peak minus the usage on entry.
    """

    def __init__(self, device: Any = None, interval_s: float = 0.005) -> None:
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self.delta_mb: float | None = None
        self.kind = "cuda_allocated" if self.cuda else ("cpu_rss" if Path("/proc/self/statm").is_file() else "cpu_maxrss")

    def _now_mb(self) -> float:
        if self.kind == "cuda_allocated":
            return torch.cuda.memory_allocated() / 2**20
        if self.kind == "cpu_rss":
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, self._now_mb())

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._start = self._max = self._now_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True) if self.kind == "cpu_rss" else None
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else max(self._max, self._now_mb())
        self.peak_mb, self.delta_mb = round(peak, 1), round(peak - self._start, 1)


def machine_info() -> str:
    """Host, CPU / GPU and torch version, one line."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return f"{platform.node()} | {platform.machine()} | {dev} | torch {torch.__version__}"


def fmt_pct(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 1 or v == 0 else f"{v:.3f}"
    return str(v)


def write_outputs(out_dir: str | Path, summaries: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Writes ``cases.jsonl``, ``summary.json`` and ``summary.md`` (summaries of `evaluate_edits` + run meta)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    with (d / "cases.jsonl").open("w", encoding="utf-8") as f:
        for s in summaries:
            for case in s.get("cases", []):
                f.write(json.dumps(case, ensure_ascii=False) + "\n")
    objs = [{**{k: v for k, v in s.items() if k != "cases"}, **meta} for s in summaries]
    (d / "summary.json").write_text(json.dumps(objs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    cols = ["method", "protocol", "n_cases", "es", "ps", "ns", "score", "em", "pm", "nm", "gen_es", "gen_ps",
            "fluency", "fluency_unedited", "edit_ms_median", "query_ms_median", "plain_query_ms_median",
            "query_prompt_tokens_mean"]
    if any("exact_match" in o for o in objs):
        cols.insert(7, "exact_match")
    if any(o.get("tf_reliability") is not None for o in objs):
        cols[7:7] = ["tf_reliability", "tf_generalization", "tf_locality"]
    if any(o.get("edit_core_ms_median") is not None for o in objs):
        cols.insert(cols.index("edit_ms_median") + 1, "edit_core_ms_median")
    cols += ["peak_mem_mb", "peak_mem_delta_mb"]
    lines = [f"# {meta.get('task', 'evaluation')}: {meta.get('data')}", "",
             f"checkpoint `{meta.get('checkpoint')}`, scope threshold {meta.get('scope_threshold')} "
             f"(mode {meta.get('scope_mode')}), {meta.get('date')}, {meta.get('machine')}", "",
             (f"Larimar write: {_write_mode(meta)}. ES / EM and ZsRE reliability are scored on the prompt the "
              f"refined latent was optimised on (when refined); PS / NS / gen_ps are not. edit_ms = the whole edit "
              f"call (edit_core_ms = Larimar's encode + refine + write); gen_es / gen_ps = % greedy generations "
              f"whose first sentence contains the new object; fluency = ROME's n-gram entropy of prompt + greedy "
              f"generation (fluency_unedited: the unedited model); query_prompt_tokens_mean = decoder input tokens "
              f"per query."), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt_pct(o.get(c)) for c in cols) + " |" for o in objs]
    (d / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def _write_mode(meta: dict[str, Any]) -> str:
    steps = meta.get("refine_steps")
    if steps is None:
        return "as configured"
    return f"refined ({steps} steps on the rewrite prompt)" if steps else "one-shot (the encoder's latent)"


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def write_table(path: str | Path, title: str, notes: Sequence[str], rows: Sequence[dict[str, Any]],
                columns: Sequence[str]) -> None:
    """A markdown file: a title, note lines, and a table of ``rows`` on ``columns``."""
    lines = [f"# {title}", "", *notes, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_lines(path: str | Path, title: str, xlabel: str, ylabel: str,
               series: dict[str, tuple[Sequence[float], Sequence[float | None]]], logx: bool = False,
               vlines: dict[str, float] | None = None) -> None:
    """A line plot (matplotlib, Agg canvas; no global backend change) saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 + (2.8 if len(series) > 4 else 0.0), 4.2))  # room for a long legend at the right
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if len(series) > 10:  # the default cycle repeats after 10 colours
        from matplotlib import colormaps

        ax.set_prop_cycle(color=list(colormaps["tab20"].colors))
    for label, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for label, x in (vlines or {}).items():
        ax.axvline(x, linestyle="--", color="grey", linewidth=1)
        ax.text(x, 0.02, " " + label, color="grey", fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 4:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)


def plot_bars(path: str | Path, title: str, labels: Sequence[str], values: Sequence[float | None]) -> None:
    """A bar chart (Agg canvas) saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(list(labels), [v if v is not None else 0.0 for v in values])
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)


def write_cases(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
