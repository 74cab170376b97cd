"""``larimar eval sequential | capacity | forget | leakage | longcontext``: Larimar's capabilities (paper sections
5.3-5.5). Each writes ``summary.json``, ``summary.md``, a PNG plot and (where there are per-record results)
``cases.jsonl`` into ``--out DIR``; rates are in [0, 1]::

    larimar eval sequential --data ../shared/data/zsre/zsre_mend_eval_800.json \\
        --data ../shared/data/zsre/zsre_mend_train-1k.json --edits 1000 --slots 1000 --baselines grace,memit \\
        --out runs/seq
    larimar eval capacity --data ../shared/data/counterfact_easyedit/counterfact-edit.json \\
        --n 64,128,256,512,1024,2048 --slots 512 --out runs/capacity
    larimar eval forget --data ../shared/data/counterfact_easyedit/counterfact-edit.json --n 512,1024 \\
        --replace-unknown --out runs/forget
    larimar eval leakage --data ../shared/data/counterfact_rome/counterfact_rome_929.json --n 500 \\
        --baselines rome,memit --out runs/leakage
    larimar eval longcontext --data ../shared/data/counterfact_rome/counterfact_rome_929.json \\
        --wiki ../shared/data/wikipedia_en/enwiki_2018_validation.jsonl --n-facts 64,128,256,512 --out runs/lc

Memory size (``--slots``): `larimar.memory.resize_memory` builds a K-slot memory from the checkpoint's M0.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from larimar.cli.options import (
    MemoryOptions,
    ModelOptions,
    RunOptions,
    now_utc,
    parse_ints,
    split_names,
)
from larimar.data import iter_wikipedia_texts, load_counterfact, load_zsre
from larimar.eval.capacity import evaluate_capacity
from larimar.eval.editors import (
    HFBaselineEditor,
    LarimarEditor,
    RagEditor,
    SequentialHFEditor,
    build_editors,
    parse_hparams,
)
from larimar.eval.forgetting import evaluate_forgetting
from larimar.eval.leakage import evaluate_leakage
from larimar.eval.longcontext import HIERARCHIES, decoder_window, evaluate_longcontext
from larimar.eval.report import (
    fmt,
    machine_info,
    plot_bars,
    plot_lines,
    write_cases,
    write_summary,
    write_table,
)
from larimar.eval.sequential import DEFAULT_CHECKPOINTS, evaluate_sequential
from larimar.facts import EditRequest

logger = logging.getLogger(__name__)


def load_records(paths: Sequence[str], task: str) -> list[EditRequest]:
    """Records of one or more files, concatenated (ZsRE for task "zsre", else CounterFact)."""
    loader = load_zsre if task == "zsre" else load_counterfact
    records: list[EditRequest] = []
    for p in paths:
        records += loader(p).records
    if not records:
        raise ValueError(f"no valid records in {list(paths)}")
    return records


def load_editor(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The `Larimar` editor of the command-line options (memory resized to ``--slots``) and run metadata."""
    opts, mem = ModelOptions.from_args(args), MemoryOptions.from_args(args)
    if getattr(args, "seed", None) is not None:
        torch.manual_seed(args.seed)
    lm = opts.build()
    fingerprint = lm.fingerprint
    k0 = lm.model.memory.config.num_slots
    K = lm.resize_memory(mem.slots, mem.slot_init, args.seed or 0)
    meta = {"fingerprint": fingerprint, "slots": K,
            "checkpoint_slots": k0, "code_size": lm.model.memory.config.code_size,
            "slot_init": None if K == k0 else (f"M0[:{K}]" if K < k0 else f"M0 + {K - k0} {mem.slot_init} rows"),
            **opts.record(), "seed": args.seed, "date": now_utc(), "machine": machine_info()}
    return lm, meta


def _baseline_editors(names: Sequence[str], lm: Any, args: argparse.Namespace) -> list[HFBaselineEditor]:
    bad = [n for n in names if n in ("larimar", "none", "rag")]
    if bad:
        raise ValueError(f"--baselines takes weight / prompt editors (grace, memit, rome, ...), got {bad}")
    return [e for e in build_editors(list(names), lm, parse_hparams(args.hparams), args.device)
            if isinstance(e, HFBaselineEditor)]


def run_sequential(args: argparse.Namespace) -> dict[str, Any]:
    """``larimar eval sequential``."""
    baselines = split_names(args.baselines)
    if args.no_larimar and not baselines and not args.compare:
        raise ValueError("--no-larimar needs --baselines (or --compare, to only draw earlier runs together)")
    compared = [row for c in args.compare or [] for row in _load_sequential_run(c)]  # rows tagged with "run"
    draw_only = args.no_larimar and not baselines
    if not draw_only:
        records = load_records(args.data, "zsre")
        if len(records) < args.edits:
            logger.warning("sequential: %d records loaded, fewer than --edits %d", len(records), args.edits)
        records = records[: args.edits]
    d = RunOptions.from_args(args).folder()
    if draw_only:  # only the table and plot of earlier runs
        results: list[dict[str, Any]] = []
        meta = {k: compared[0].get(k) for k in ("slots", "slot_init", "code_size", "read_mode")}
        summary = {"task": "sequential_compare", "compared_runs": list(args.compare), "rows": compared}
    else:
        lm, meta = load_editor(args)
        checkpoints = parse_ints(args.checkpoints, "--checkpoints")
        kw = dict(checkpoints=checkpoints, batch_size=args.batch_size, exact_match_at_checkpoints=args.em_curve,
                  progress=True)
        results = [] if args.no_larimar else [{**evaluate_sequential(LarimarEditor(lm), records, **kw),
                                                "read_mode": meta["read_mode"], "refine_steps": meta["refine_steps"]}]
        if "rag" in baselines:  # retrieval into the prompt: the facts accumulate in its index
            results.append(evaluate_sequential(RagEditor(lm), records, **kw))
        for b in _baseline_editors([b for b in baselines if b != "rag"], lm, args):
            results.append(evaluate_sequential(SequentialHFEditor.from_editor(b), records, **kw))
        main = results[0]
        write_cases(d / "cases.jsonl", (c for r in results for c in r["cases"]))
        summary = {"task": "sequential", "data": list(args.data), **{k: v for k, v in main.items() if k != "cases"},
                   "baselines": {r["method"]: {k: v for k, v in r.items() if k != "cases"} for r in results[1:]},
                   "compared_runs": list(args.compare or []), **meta}
    write_summary(d, summary)
    cols = ["method", "read_mode", "refine_steps", "run", "n_edits", "edit_retention", "edit_retention_em",
            "rephrase_acc", "locality", "edit_retention_none", "rephrase_acc_none", "edit_ms_median"]
    notes = [f"Protocol token_acc (teacher-forced token accuracy; EM = greedy generation starts with target_new), "
             f"evaluated after the last edit; memory K = {meta['slots']} ({meta['slot_init'] or 'as trained'}), "
             f"read mode {meta['read_mode']}." + (" Rows with a run folder come from those earlier runs." if compared
                                                   else "")]
    table = [{k: v for k, v in r.items() if k != "cases"} for r in results] + compared
    write_table(d / "summary.md", f"sequential editing: {', '.join(args.data)}", notes, table, cols)
    series = {}
    for r in table:
        xs = [p["n_edits"] for p in r["curve"]]
        name = r["method"] + (f", {r['read_mode']} read" if r.get("read_mode") else "")
        if r.get("refine_steps") is not None:
            name += f", {r['refine_steps']} refine steps" if r["refine_steps"] else ", one-shot write"
        if f"{name} retention" in series:  # the same method from another run: name the run
            name = f"{name} ({'/'.join(Path(r['run']).parts[-2:])})"
        series[f"{name} retention"] = (xs, [p["edit_retention"] for p in r["curve"]])
        series[f"{name} rephrase"] = (xs, [p["rephrase_acc"] for p in r["curve"]])
    lar = [r for r in table if r["method"] == "larimar"]
    if lar:
        first = next(k for k in series if k.startswith("larimar")).removesuffix(" retention")
        series[f"{first} retention (EM)"] = ([p["n_edits"] for p in lar[0]["curve"]],
                                            [p["edit_retention_em"] for p in lar[0]["curve"]])
    plot_lines(d / "sequential.png", "Sequential editing (ZsRE)", "edits written", "accuracy (token_acc)", series,
               logx=True, vlines={"K": meta["slots"], "C": meta["code_size"]})
    print("\n".join(Path(d / "summary.md").read_text().splitlines()[4:]))
    return summary


def _load_sequential_run(directory: str) -> list[dict[str, Any]]:
    """The method rows (with their curves, ``run`` = the folder) of an earlier ``larimar eval sequential`` run."""
    path = Path(directory) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--compare {directory}: cannot read {path} ({e})") from None
    if summary.get("task") == "sequential_compare":
        raise ValueError(f"--compare {directory}: compare the runs it drew, not the drawing")
    if summary.get("task") != "sequential" or "curve" not in summary:
        raise ValueError(f"--compare {directory}: {path} is not the summary of a sequential run")
    main = {k: v for k, v in summary.items() if k not in ("baselines", "machine")}
    if main.get("method") != "larimar":  # a run of baselines alone: its read mode is the unused editor's
        main.pop("read_mode", None)
        main.pop("refine_steps", None)
    else:  # runs made before write-time refinement existed wrote the encoder's latents
        main.setdefault("refine_steps", 0)
    return [{**r, "run": directory} for r in (main, *summary.get("baselines", {}).values())]


def run_capacity(args: argparse.Namespace) -> dict[str, Any]:
    """``larimar eval capacity``."""
    records = load_records(args.data, "counterfact")
    lm, meta = load_editor(args)
    if args.sample < 0:
        raise ValueError(f"--sample must be >= 0, got {args.sample}")
    rows = evaluate_capacity(lm, records, parse_ints(args.n, "--n"), args.batch_size, progress=True,
                             sample=args.sample, seed=args.seed or 0)
    d = RunOptions.from_args(args).folder()
    summary = {"task": "capacity", "data": list(args.data), "protocol": "counterfact_prob ES (rewrite_acc) and "
               "token_acc (token_acc)", "results": rows, **meta}
    write_summary(d, summary)
    cols = ["n", "slots", "n_scored", "rewrite_acc", "token_acc", "scope_rate", "rewrite_acc_rag", "token_acc_rag",
            "scope_rate_rag", "rewrite_acc_none", "token_acc_none", "write_s", "rag_write_s"]
    write_table(d / "summary.md", f"batch capacity: {', '.join(args.data)}",
                ["rewrite_acc = ES (NLL(new) < NLL(true) after the rewrite prompt, the prompt "
                 + ("the refined latents were optimised on" if args.refine_steps else "of the written fact")
                 + "); token_acc = teacher-forced token accuracy of target_new. N facts written in one batch into "
                 f"K = {meta['slots']} slots (code size C = {meta['code_size']}); {_refined(args.refine_steps)}. "
                 "With the default keyed read, recall is the scope detector's nearest-neighbour search plus the "
                 "stored latent. *_rag: the same facts' sentences in the prompt (nearest by the same scope "
                 "detector and threshold), plain decoder."], rows, cols)
    xs = [r["n"] for r in rows]
    plot_lines(d / "capacity.png", "Batch editing capacity", "facts written at once (N)", "accuracy",
               {"rewrite_acc (ES)": (xs, [r["rewrite_acc"] for r in rows]),
                "token_acc": (xs, [r["token_acc"] for r in rows]),
                "rewrite_acc, rag": (xs, [r.get("rewrite_acc_rag") for r in rows]),
                "rewrite_acc, no edit": (xs, [r["rewrite_acc_none"] for r in rows])},
               logx=True, vlines={"K": meta["slots"], "C": meta["code_size"]})
    print("\n".join(Path(d / "summary.md").read_text().splitlines()[4:]))
    return summary


def run_forget(args: argparse.Namespace) -> dict[str, Any]:
    """``larimar eval forget``."""
    records = load_records(args.data, "counterfact")
    lm, meta = load_editor(args)
    K = meta["slots"]
    ns = parse_ints(args.n, "--n") if args.n else [K, 2 * K]
    usable = sum(1 for r in records if r.target_true)
    for n in [n for n in ns if n > usable]:
        logger.warning("forget: skipping N = %d (%d records with target_true loaded)", n, usable)
    ns = [n for n in ns if n <= usable]
    if not ns:
        raise ValueError(f"no N fits the {usable} records with target_true loaded (pass a larger --data file)")
    rows, cases = [], []
    for n in ns:
        row, trial_rows = evaluate_forgetting(lm, records, n, args.trials, args.replace_unknown,
                                              args.retained_sample or None, args.seed or 0, args.batch_size,
                                              with_em=not args.no_em)
        rows.append(row)
        cases += trial_rows
        logger.info("forget N=%d: %s", n, row)
    d = RunOptions.from_args(args).folder()
    write_cases(d / "cases.jsonl", cases)
    summary = {"task": "forget", "data": list(args.data), "protocol": "recall = NLL(new) < NLL(true) after the "
               "rewrite prompt; em = greedy generation starts with target_new", "results": rows, **meta}
    write_summary(d, summary)
    cols = ["n", "slots", "trials", "replace_unknown", "forgotten_recall", "forgotten_em", "retained_recall",
            "retained_em", "recall_before", "forgotten_recall_rag", "retained_recall_rag", "forgotten_recall_none",
            "forget_max_abs_error"]
    write_table(d / "summary.md", f"selective forgetting: {', '.join(args.data)}",
                [f"N facts written at once into K = {K} slots ({_refined(args.refine_steps)}); per trial one fact "
                 "forgotten (alpha = -1)" + (", then 'prompt unknown' written" if args.replace_unknown else "")
                 + "; recall is scored on the rewrite prompt. *_rag: the same facts' sentences in a retrieval "
                 "index (the same scope detector), the forgotten one removed."], rows, cols)
    xs = [r["n"] for r in rows]
    plot_lines(d / "forget.png", "Selective forgetting", "facts in memory (N)", "recall",
               {"forgotten": (xs, [r["forgotten_recall"] for r in rows]),
                "retained": (xs, [r["retained_recall"] for r in rows]),
                "forgotten, rag": (xs, [r.get("forgotten_recall_rag") for r in rows]),
                "forgotten, no edit": (xs, [r["forgotten_recall_none"] for r in rows])},
               vlines={"K": K})
    print("\n".join(Path(d / "summary.md").read_text().splitlines()[4:]))
    return summary


def run_leakage(args: argparse.Namespace) -> dict[str, Any]:
    """``larimar eval leakage``."""
    records = load_records(args.data, "counterfact")
    lm, meta = load_editor(args)
    baselines = _baseline_editors(split_names(args.baselines), lm, args)
    summary, rows = evaluate_leakage(lm, records, args.n, baselines, args.prompts, args.samples, args.gen_tokens,
                                     args.temperature, args.top_p, args.seed or 0, progress=True)
    d = RunOptions.from_args(args).folder()
    write_cases(d / "cases.jsonl", rows)
    summary = {"task": "leakage", "data": list(args.data), **summary, **meta}
    write_summary(d, summary)
    systems = ["larimar", "rag", "none"] + [b.name for b in baselines]
    table = [{"system": s, "attack_success": summary[{"larimar": "attack_success", "none": "attack_success_none"}
                                                     .get(s, f"attack_success_{s}")]} for s in systems]
    write_table(d / "summary.md", f"information leakage: {', '.join(args.data)}",
                [f"{summary['n']} facts hidden ('prompt unknown'); attack: {args.prompts} prompts x {args.samples} "
                 f"samples (T = {args.temperature}, top_p = {args.top_p}, {args.gen_tokens} tokens); success = the "
                 f"true answer in any generation. Larimar scope rate {fmt(summary.get('scope_rate'))}, "
                 f"'unknown' in {fmt(summary.get('unknown_rate'))} of its generations; rag (the nearest 'unknown' "
                 f"sentence before the prompt, same scope detector) scope rate {fmt(summary.get('scope_rate_rag'))}, "
                 f"'unknown' in {fmt(summary.get('unknown_rate_rag'))}."], table,
                ["system", "attack_success"])
    plot_bars(d / "leakage.png", "Rephrasing attack success (lower is better)", [t["system"] for t in table],
              [t["attack_success"] for t in table])
    print("\n".join(Path(d / "summary.md").read_text().splitlines()[4:]))
    return summary


def run_longcontext(args: argparse.Namespace) -> dict[str, Any]:
    """``larimar eval longcontext``."""
    if not Path(args.wiki).is_file():
        raise FileNotFoundError(f"no Wikipedia JSONL at {args.wiki}")
    records = load_records(args.data, "counterfact")
    lm, meta = load_editor(args)
    args.window = args.window or decoder_window(lm.model)
    if args.window < 16:
        raise ValueError(f"--window must be at least 16 tokens, got {args.window}")
    results, cases = [], []
    for n in parse_ints(args.n_facts, "--n-facts"):
        s, rows = evaluate_longcontext(lm, records, iter_wikipedia_texts(args.wiki), n, args.filler_per_fact,
                                       args.window, args.chunk_items or None, args.hierarchy, args.read_mode, args.seed or 0,
                                       args.batch_size, args.plain_batch_size, args.plain_sample)
        logger.info("longcontext %d facts: %s", n, s)
        results.append(s)
        cases += rows
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    write_cases(d / "cases.jsonl", cases)
    summary = {"task": "longcontext", "data": list(args.data), "wiki": args.wiki, "hierarchy": args.hierarchy,
               "filler_per_fact": args.filler_per_fact, "protocol": "recall = NLL(target_new) < NLL(target_true) "
               "after the question; question = the record's CounterFact paraphrase, distractor removed (prefix_*: "
               "the written sentence's beginning, an extra)", "results": results, **meta}
    write_summary(d, summary)
    table = []  # one row per (n_facts, system)
    for r in results:
        for system, key in (("larimar", "recall"), ("rag", "recall_rag"), (f"plain ({args.window} tokens)",
                                                                            "recall_plain"), ("none", "recall_none")):
            table.append({"n_facts": r["n_facts"], "system": system, "recall": r[key],
                          "recall_in_window": r[f"{key}_in_window"], "recall_out_window": r[f"{key}_out_window"],
                          "n_in_window": r["n_in_window"], "n_out_window": r["n_out_window"],
                          "prefix_recall (extra)": r[f"prefix_{key}"],
                          "ms_per_question": {"recall": r["read_ms"], "recall_plain": r["plain_ms"],
                                              "recall_rag": r["rag_retrieve_ms"]}.get(key)})
    cols = ["n_facts", "system", "recall", "recall_in_window", "recall_out_window", "n_in_window", "n_out_window",
            "prefix_recall (extra)", "ms_per_question"]
    write_table(d / "summary.md", "long-context recall",
                [f"Facts (CounterFact, target_new) in Wikipedia text, {args.filler_per_fact} filler sentences per "
                 f"fact. Each fact is asked with its CounterFact paraphrase, distractor sentence removed (not the "
                 f"written sentence); prefix_recall (extra) asks the written sentence's beginning instead, the "
                 f"prompt {'the refined latents were optimised on' if args.refine_steps else 'of the written fact'}. "
                 f"Larimar: sentence items ({_refined(args.refine_steps)}) in chunk memories of "
                 f"{results[0]['chunk_items']} items, hierarchy {args.hierarchy!r}, read mode {args.read_mode!r}; "
                 f"rag: the nearest sentence (same scope index, threshold {meta['scope_threshold']}) + the question, "
                 f"plain decoder; plain: z = 0 with the last {args.window} tokens before the question; none: the "
                 f"question alone. in / out window: facts whose sentence is inside / outside the plain decoder's "
                 f"context. ms_per_question: Larimar read, rag retrieval, plain scoring."], table, cols)
    xs = [r["n_facts"] for r in results]
    plot_lines(d / "longcontext.png", "Long-context recall (paraphrase questions)", "facts in the document", "recall",
               {"larimar": (xs, [r["recall"] for r in results]),
                "rag (nearest sentence in the prompt)": (xs, [r["recall_rag"] for r in results]),
                f"plain decoder, {args.window}-token window": (xs, [r["recall_plain"] for r in results]),
                "no context": (xs, [r["recall_none"] for r in results]),
                "larimar, written-prefix question": (xs, [r["prefix_recall"] for r in results])}, logx=True)
    print("\n".join((d / "summary.md").read_text().splitlines()[4:]))
    return summary


def _refined(steps: int) -> str:
    return f"latents refined in {steps} steps" if steps else "one-shot encoder latents"


def _data_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help=f"{what} records file (repeat to concatenate files)")


def _hparams_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hparams", action="append", metavar="METHOD=PATH", help="a baseline's YAML hyper-parameters")


def _run_args(p: argparse.ArgumentParser, slots: int | None = None) -> None:
    """The options of every capability run: output, model, memory size, batch size."""
    RunOptions.add_to(p, "summary.json, summary.md, a PNG, cases.jsonl")
    ModelOptions.add_to(p)
    MemoryOptions.add_to(p, slots)
    p.add_argument("--batch-size", type=int, default=32)


def add_to_eval(esub: argparse._SubParsersAction) -> None:
    """Adds sequential, capacity, forget, leakage and longcontext to ``larimar eval``'s subcommand table."""
    p = esub.add_parser("sequential", help="sequential editing (ZsRE): retention, rephrase, locality vs edits")
    _data_arg(p, "ZsRE")
    p.add_argument("--edits", type=int, default=1000, help="facts written one after another")
    p.add_argument("--checkpoints", default=",".join(map(str, DEFAULT_CHECKPOINTS)),
                   help="numbers of edits to evaluate at (the last edit always)")
    p.add_argument("--em-curve", action="store_true", help="greedy exact match at every checkpoint too")
    p.add_argument("--baselines", default="",
                   help="comma-separated: rag (retrieval into the prompt), grace, memit, rome, ft (sequential mode)")
    p.add_argument("--no-larimar", action="store_true", help="run only the --baselines")
    p.add_argument("--compare", action="append", metavar="DIR",
                   help="an earlier sequential run folder whose methods join the table and plot (repeatable)")
    _hparams_arg(p)
    _run_args(p, slots=1000)
    p.set_defaults(func=lambda a: (run_sequential(a), 0)[1])

    p = esub.add_parser("capacity", help="batch editing capacity: rewrite accuracy vs facts in one memory")
    _data_arg(p, "CounterFact")
    p.add_argument("--n", default="64,128,256,512,1024,2048", help="numbers of facts written at once")
    p.add_argument("--sample", type=int, default=0, help="score a seeded random sample of this many of the N facts "
                   "(0: all)")
    _run_args(p, slots=512)
    p.set_defaults(func=lambda a: (run_capacity(a), 0)[1])

    p = esub.add_parser("forget", help="selective forgetting: recall of a forgotten fact and of the others")
    _data_arg(p, "CounterFact")
    p.add_argument("--n", default=None, help="facts in memory, comma-separated (default: K,2K)")
    p.add_argument("--trials", type=int, default=10, help="facts forgotten, one at a time")
    p.add_argument("--replace-unknown", action="store_true", help="write 'prompt unknown' in place of the fact")
    p.add_argument("--retained-sample", type=int, default=200, help="retained facts measured per trial (0: all)")
    p.add_argument("--no-em", action="store_true", help="skip greedy exact match")
    _run_args(p)
    p.set_defaults(func=lambda a: (run_forget(a), 0)[1])

    p = esub.add_parser("leakage", help="information-leakage prevention against a rephrasing attack")
    _data_arg(p, "CounterFact")
    p.add_argument("--n", type=int, default=100, help="facts to hide")
    p.add_argument("--prompts", type=int, default=4, help="attack prompts per fact (rewrite + paraphrases)")
    p.add_argument("--samples", type=int, default=5, help="sampled generations per prompt")
    p.add_argument("--gen-tokens", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--baselines", default="", help="comma-separated: rome, memit (target edited to 'unknown')")
    _hparams_arg(p)
    _run_args(p)
    p.set_defaults(func=lambda a: (run_leakage(a), 0)[1])

    p = esub.add_parser("longcontext", help="long-context recall: facts in a long document, memory vs window")
    _data_arg(p, "CounterFact")
    p.add_argument("--wiki", required=True, help="Wikipedia JSONL of filler text (e.g. enwiki_2018_validation.jsonl)")
    p.add_argument("--n-facts", default="64,128,256,512", help="facts per document, comma-separated")
    p.add_argument("--filler-per-fact", type=int, default=4, help="filler sentences per fact")
    p.add_argument("--window", type=int, default=None,
                   help="the plain decoder's window in tokens (default: its max_position_embeddings, 8192 for "
                        "SmolLM2-135M)")
    p.add_argument("--chunk-items", type=int, default=16,
                   help="sentences per chunk memory (default 16: a read mixes every latent of its memory, and "
                        "rewrite accuracy falls with the number of facts in one memory; 0: K)")
    p.add_argument("--hierarchy", choices=HIERARCHIES, default="scope")
    p.add_argument("--plain-sample", type=int, default=0,
                   help="ask the plain decoder a seeded sample of this many questions per document (0: all)")
    p.add_argument("--plain-batch-size", type=int, default=4,
                   help="rows per forward after the shared context (each holds a copy of its KV cache)")
    _run_args(p)
    p.set_defaults(func=lambda a: (run_longcontext(a), 0)[1])
