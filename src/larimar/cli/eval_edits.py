"""``larimar eval counterfact | zsre | scope | reconstruct``: load the data and the model, run, write the outputs.

Outputs of ``eval counterfact | zsre`` in ``--out DIR``: ``cases.jsonl`` (one line per record per method),
``summary.json`` (a list, one object per method) and ``summary.md``::

    larimar eval counterfact --data ../shared/data/counterfact_rome/counterfact_rome_929.json --limit 200 \\
        --methods larimar,none --out runs/cf
    larimar eval zsre --data ../shared/data/zsre/zsre_mend_eval_800.json --out runs/zsre
    larimar eval reconstruct --data ../shared/data/wikipedia_en/enwiki_2018_validation.jsonl --limit 256 \\
        --wikitext ../shared/data/wikitext103/wiki.valid.tokens --out runs/rec
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from larimar.cli.options import (
    ModelOptions,
    RunOptions,
    now_utc,
    quiet_loading,
    split_names,
)
from larimar.data import iter_wikipedia_texts, load_counterfact, load_zsre
from larimar.eval.editors import build_editors, parse_hparams
from larimar.eval.edits import (
    FLUENCY_TOKENS,
    GEN_ES_TOKENS,
    PROTOCOLS,
    evaluate_counterfact,
    evaluate_zsre,
)
from larimar.eval.reconstruction import evaluate_reconstruction
from larimar.eval.report import fmt_pct, machine_info, write_outputs
from larimar.eval.scope import evaluate_scope


def run_edit_eval(args: argparse.Namespace, task: str) -> list[dict[str, Any]]:
    """``larimar eval counterfact|zsre``: loads the checkpoint and data, runs every method, writes the outputs."""
    protocol = args.protocol or ("counterfact_prob" if task == "counterfact" else "token_acc")
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    methods = split_names(args.methods)
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--methods must name distinct methods, got {args.methods!r}")
    loader = load_counterfact if task == "counterfact" else load_zsre
    loaded = loader(args.data, limit=args.limit)
    if not loaded.records:
        raise ValueError(f"{args.data}: no valid records")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    opts = ModelOptions.from_args(args)
    lm = opts.build(scope_mode=args.scope_mode)
    editors = build_editors(methods, lm, parse_hparams(args.hparams), args.device)
    summaries = []
    pre_cache: dict = {}  # the unedited decoder's neighbourhood predictions, shared by the methods (--token-acc)
    for editor in editors:
        fn = evaluate_counterfact if task == "counterfact" else evaluate_zsre
        summaries.append(fn(editor, loaded.records, protocol, gen_tokens=args.gen_tokens, progress=True,
                            detail_every=args.detail_every, token_acc=getattr(args, "token_acc", False),
                            pre_cache=pre_cache, gen_es_tokens=args.gen_es_tokens,
                            fluency_tokens=args.fluency_tokens))
    meta = {
        "task": task, "data": str(args.data), "limit": args.limit, "n_records_loaded": len(loaded.records),
        "n_record_errors": len({e.index for e in loaded.errors}),
        "fingerprint": lm.fingerprint, "scope_mode": args.scope_mode, **opts.record(),
        "date": now_utc(), "machine": machine_info(),
    }
    write_outputs(args.out, summaries, meta)
    for s in summaries:
        tf = (f" | token_acc rel={fmt_pct(s['tf_reliability'])} gen={fmt_pct(s['tf_generalization'])} "
              f"loc={fmt_pct(s['tf_locality'])}" if s.get("tf_reliability") is not None else "")
        core = (f" (core {fmt_pct(s['edit_core_ms_median'])})" if s.get("edit_core_ms_median") is not None else "")
        print(f"{s['method']:>10} {protocol}: n={s['n_cases']} ES={fmt_pct(s['es'])} PS={fmt_pct(s['ps'])} "
              f"NS={fmt_pct(s['ns'])} Score={fmt_pct(s['score'])} gen_ES={fmt_pct(s['gen_es'])} "
              f"gen_PS={fmt_pct(s['gen_ps'])} fluency={fmt_pct(s['fluency'])} "
              f"(unedited {fmt_pct(s['fluency_unedited'])}) edit_ms={fmt_pct(s['edit_ms_median'])}{core} "
              f"query_ms={fmt_pct(s['query_ms_median'])} prompt_tokens={fmt_pct(s['query_prompt_tokens_mean'])} "
              f"peak_mem_mb={fmt_pct(s['peak_mem_mb'])}{tf}")
    print(f"wrote {args.out}/summary.json, summary.md, cases.jsonl")
    return summaries


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from larimar.backbones import load_decoder
    from larimar.editor import DEFAULT_CHECKPOINT
    from larimar.model import LarimarModel

    quiet_loading()
    ckpt = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    model = LarimarModel.from_pretrained(ckpt, device=args.device).eval()
    wikitext = Path(args.wikitext) if args.wikitext else None
    if wikitext is not None and not wikitext.is_file():
        raise FileNotFoundError(f"no WikiText file at {wikitext}")
    base = load_decoder(model.config.decoder, device=args.device or "cpu") if wikitext is not None else None
    summary = evaluate_reconstruction(
        model, iter_wikipedia_texts(args.data), args.limit, args.episode_size, wikitext_path=wikitext,
        wikitext_tokens=args.wikitext_tokens, wikitext_window=args.wikitext_window, base_decoder=base, progress=True,
    )
    summary.update(task="reconstruct", data=str(args.data), checkpoint=str(ckpt), wikitext=str(wikitext),
                   date=now_utc(), machine=machine_info())
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    keys = ["n_blocks", "nll_ae", "nll_memory", "nll_query", "nll_memory_self", "nll_no_memory", "acc_ae",
            "acc_memory", "acc_query", "acc_memory_self", "acc_no_memory", "wikitext_ppl", "wikitext_ppl_base"]
    md = ["# reconstruction: " + str(args.data), "",
          ("Whole blocks decoded from: ae = their own encoding; memory = the episode's memory read with the "
           "block's first half of words; query = that half's own encoding, no memory; memory_self = the memory "
           "read with the block itself (identity read, extra); no_memory = z = 0."), "",
          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
          "| " + " | ".join(f"{summary[k]:.3f}" if isinstance(summary[k], float) else fmt_pct(summary[k])
                            for k in keys) + " |"]
    (d / "summary.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md[4:]))
    return 0


def _cmd_scope(args: argparse.Namespace) -> int:
    from larimar.editor.editor import DEFAULT_CHECKPOINT, LATENT_SCOPE_ENCODER, latent_embed_fn
    from larimar.model import LarimarModel
    from larimar.scope import ScopeDetector

    loaded = load_counterfact(args.data, limit=args.limit)
    for e in loaded.errors[:5]:
        print(f"skipping record {e.index}: {e.field}: {e.message}", file=sys.stderr)
    excluded = {r.case_id for f in args.exclude or [] for r in load_counterfact(f).records}
    records = [r for r in loaded.records if r.case_id not in excluded]
    if not records:
        raise ValueError(f"{args.data}: no records left after --exclude")
    if args.scope_encoder == LATENT_SCOPE_ENCODER:  # the checkpoint's own encoder (its latents)
        model = LarimarModel.from_pretrained(args.checkpoint or DEFAULT_CHECKPOINT, device=args.device).eval()
        scope = ScopeDetector(embed_fn=latent_embed_fn(model))
    else:
        scope = ScopeDetector(encoder_path=args.scope_encoder, device=args.device or "cpu")
    summary = evaluate_scope(records, scope)
    summary.update(task="scope", data=str(args.data), limit=args.limit, exclude=args.exclude or [],
                   n_excluded=len(loaded.records) - len(records),
                   scope_encoder=args.scope_encoder or "all-MiniLM-L6-v2",
                   date=now_utc(), machine=machine_info())
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    keys = ["mode", "threshold", "rewrite", "paraphrase", "neighborhood", "balanced_accuracy"]
    md = [f"# scope sweep: {args.data} ({summary['n_records']} records; % of prompts in scope)", "",
          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt_pct(r[k]) if k != "threshold" else f"{r[k]:.2f}" for k in keys) + " |"
           for r in summary["rows"]]
    (d / "summary.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md[2:]))
    for mode, b in summary["best"].items():
        print(f"best {mode}: threshold {b['threshold']:.2f} (balanced accuracy {fmt_pct(b['balanced_accuracy'])}) "
              f"on {summary['n_records']} records ({summary['n_excluded']} excluded)")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Adds ``larimar eval`` with counterfact, zsre, scope and reconstruct; returns its subcommand table."""
    p = sub.add_parser("eval", help="evaluate: knowledge editing, capabilities, reconstruction")
    esub = p.add_subparsers(dest="eval_what", required=True)
    for task in ("counterfact", "zsre"):
        e = esub.add_parser(task, help=f"{task} knowledge-editing evaluation")
        e.add_argument("--data", required=True, help="the records file (ROME / EasyEdit / MEND / KnowEdit format)")
        e.add_argument("--limit", type=int, default=None, help="the first N records of the file")
        e.add_argument("--methods", default="larimar",
                       help="comma-separated methods run one after another: larimar, rag, none, rome, memit, grace, "
                            "ft, ike")
        e.add_argument("--protocol", choices=PROTOCOLS, default=None,
                       help="counterfact_prob (default for counterfact) or token_acc (default for zsre)")
        RunOptions.add_to(e, "cases.jsonl, summary.json, summary.md")
        ModelOptions.add_to(e)
        e.add_argument("--scope-mode", choices=["prompt", "prompt_answer"], default="prompt")
        e.add_argument("--gen-tokens", type=int, default=10, help="pre / post-edit greedy generation length (0: off)")
        e.add_argument("--detail-every", type=int, default=1,
                       help="generate (gen_es / gen_ps / fluency) and time queries on every k-th record only "
                            "(scores: every record)")
        e.add_argument("--gen-es-tokens", type=int, default=GEN_ES_TOKENS,
                       help=f"greedy tokens after the rewrite / paraphrase prompts for gen_es / gen_ps "
                            f"(default {GEN_ES_TOKENS}; 0: off)")
        e.add_argument("--fluency-tokens", type=int, default=FLUENCY_TOKENS,
                       help=f"greedy tokens after each generation prompt for fluency (default {FLUENCY_TOKENS}; "
                            "0: off)")
        e.add_argument("--token-acc", action="store_true",
                       help="counterfact_prob: also EasyEdit's token accuracies (tf_*) from the same edits")
        e.add_argument("--hparams", action="append", metavar="METHOD=PATH", help="a baseline's YAML hyper-parameters")
        e.set_defaults(func=lambda a, t=task: (run_edit_eval(a, t), 0)[1])
    sc = esub.add_parser("scope", help="scope-detector threshold sweep on CounterFact records")
    sc.add_argument("--data", required=True, help="CounterFact records (ROME or EasyEdit format)")
    sc.add_argument("--limit", type=int, default=None, help="the first N records of the file")
    sc.add_argument("--exclude", action="append", metavar="FILE",
                    help="drop records whose case_id is in this CounterFact file (e.g. the evaluated one; repeatable)")
    sc.add_argument("--out", required=True, help="output folder (summary.json, summary.md)")
    sc.add_argument("--scope-encoder", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2), "
                    "or 'larimar' for the latents of the checkpoint's own encoder")
    sc.add_argument("--checkpoint", default=None, help="with --scope-encoder larimar: the checkpoint (default: shipped)")
    sc.add_argument("--device", default=None)
    sc.set_defaults(func=_cmd_scope)
    r = esub.add_parser("reconstruct", help="block reconstruction through memory, and WikiText perplexity")
    r.add_argument("--data", required=True, help="held-out Wikipedia JSONL (e.g. enwiki_2018_validation.jsonl)")
    r.add_argument("--limit", type=int, default=256, help="blocks to evaluate (whole episodes)")
    r.add_argument("--episode-size", type=int, default=16)
    r.add_argument("--out", required=True)
    r.add_argument("--checkpoint", default=None)
    r.add_argument("--device", default=None)
    r.add_argument("--wikitext", default=None, help="wiki.valid.tokens for the perplexity (default: none)")
    r.add_argument("--wikitext-tokens", type=int, default=20000)
    r.add_argument("--wikitext-window", type=int, default=256)
    r.set_defaults(func=_cmd_reconstruct)
    return esub
