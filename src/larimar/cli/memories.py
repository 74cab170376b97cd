"""``larimar edit / forget / ask / memories / chat / serve / keys``: persistent memories from the command line.

The facts live in a `larimar.serving.store.MemoryStore` (``--store``, ``--namespace``); the model is built from
`ModelOptions` only by the commands that encode or answer (edit, forget, ask, chat, serve, memories export / import).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from larimar.cli.options import ModelOptions, StoreOptions, UsageError, quiet_loading
from larimar.data import iter_json_lines
from larimar.editor.files import read_memory_state, save_memory_state
from larimar.facts import FactLike, fact_sentence
from larimar.serving.engine import LarimarEngine
from larimar.serving.storage import StoreError, check_namespace, stored_fingerprint
from larimar.serving.store import MemoryStore


def _engine(args: argparse.Namespace) -> LarimarEngine:
    return LarimarEngine(ModelOptions.from_args(args).build())


def _open_store(args: argparse.Namespace, engine: LarimarEngine | None) -> MemoryStore:
    """The store at --store: owned with the engine's memory module, or read-only (fingerprint from the store)."""
    opts = StoreOptions.from_args(args)
    check_namespace(opts.namespace)
    path = opts.path()
    try:
        if engine is not None:
            return MemoryStore(path, fingerprint=engine.fingerprint, memory=engine.lm.model.memory)
        fingerprint = stored_fingerprint(path)
        if fingerprint is None:
            raise UsageError(f"no memory store at {path} (it is created by the first `larimar edit`)")
        return MemoryStore(path, fingerprint=fingerprint, memory=None)
    except StoreError as err:
        raise UsageError(str(err)) from None


def _print(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, ensure_ascii=False) if args.json else text)


def _read_fact_file(path: str) -> list[FactLike]:
    """Facts of a JSON-lines file: each line a string, {"text": ...} or {prompt, subject, target_new}."""
    out: list[FactLike] = []
    for lineno, item, bad in iter_json_lines(path):
        if bad is not None:
            raise ValueError(f"{path}:{lineno}: expected one JSON value per line ({bad})")
        if not isinstance(item, (str, dict)):
            raise ValueError(f"{path}:{lineno}: expected a string or an object, got {type(item).__name__}")
        out.append(item)
    return out


def _cmd_edit(args: argparse.Namespace) -> int:
    facts: list[FactLike] = list(args.facts or [])
    if args.file:
        facts += _read_fact_file(args.file)
    if not facts:
        raise UsageError("nothing to write: give facts as arguments or --file FACTS.jsonl")
    engine = _engine(args)
    sentences = [fact_sentence(f, engine.lm.max_chars) for f in facts]
    requests = [None if isinstance(f, str) else f for f in facts]  # refined on their answers, not their last word
    store = _open_store(args, engine)
    try:
        latents = engine.encode_facts(sentences, requests)  # (n, C)
        ids = store.write(args.namespace, sentences, latents, provenance={"source": "cli"})
        size = store.size(args.namespace)
    finally:
        store.close()
    _print(args, {"namespace": args.namespace, "ids": ids, "size": size},
           "\n".join(f"{i}\t{s}" for i, s in zip(ids, sentences)))
    return 0


def _cmd_forget(args: argparse.Namespace) -> int:
    engine = _engine(args)
    store = _open_store(args, engine)
    try:
        store.forget(args.namespace, args.ids, provenance={"source": "cli"})
        size = store.size(args.namespace)
    finally:
        store.close()
    _print(args, {"namespace": args.namespace, "forgotten": args.ids, "size": size},
           f"forgot {len(args.ids)} fact(s); {size} left in {args.namespace!r}")
    return 0


def _answer(engine: LarimarEngine, store: Any, namespace: str, prompt: str, max_tokens: int,
            temperature: float = 0.0) -> dict[str, Any]:
    if store.has_namespace(namespace):
        with store.reading(namespace) as (memory, texts):
            text, info = engine.complete(prompt, memory, dict(texts), max_tokens, temperature)
            fact = texts.get(info.get("nearest_id") or "")
    else:
        text, info = engine.complete(prompt, engine.new_memory(), {}, max_tokens, temperature)
        fact = None
    return {"prompt": prompt, "text": text, "in_scope": info["in_scope"], "nearest_id": info["nearest_id"],
            "nearest_fact": fact, "similarity": info["similarity"]}


def _describe(ans: dict[str, Any]) -> str:
    sim = "n/a" if ans["similarity"] is None else f"{ans['similarity']:.2f}"
    src = f"memory: {ans['nearest_fact']!r}" if ans["in_scope"] else "no memory"
    return f"{ans['text'].strip()}\n  [{src}; similarity {sim}]"


def _cmd_ask(args: argparse.Namespace) -> int:
    engine = _engine(args)
    store = _open_store(args, engine)
    try:
        ans = _answer(engine, store, args.namespace, args.prompt, args.max_tokens, args.temperature)
    finally:
        store.close()
    _print(args, ans, _describe(ans))
    return 0


def _cmd_memories(args: argparse.Namespace) -> int:
    if args.action in ("list", "show"):
        store = _open_store(args, None)
        try:
            facts = store.facts(args.namespace)
        finally:
            store.close()
        if args.action == "list":
            rows = [{"id": f.id, "text": f.text, "created": f.timestamp} for f in facts]
            _print(args, {"namespace": args.namespace, "facts": rows},
                   "\n".join(f"{f.id}\t{f.text}" for f in facts) or f"(no facts in {args.namespace!r})")
            return 0
        if not args.target:
            raise UsageError("memories show needs a fact ID")
        match = [f for f in facts if f.id == args.target]
        if not match:
            raise KeyError(f"no fact {args.target!r} in namespace {args.namespace!r}")
        f = match[0]
        obj = {"id": f.id, "text": f.text, "created": f.timestamp, "seq": f.seq, "provenance": f.provenance}
        _print(args, obj, "\n".join(f"{k}: {v}" for k, v in obj.items()))
        return 0
    if not args.target:
        raise UsageError(f"memories {args.action} needs a folder")
    engine = _engine(args)
    store = _open_store(args, engine)
    try:
        if args.action == "export":
            with store.reading(args.namespace) as (memory, texts):
                save_memory_state(args.target, memory, dict(texts), engine.fingerprint)
                n = len(memory)
            _print(args, {"namespace": args.namespace, "folder": args.target, "facts": n},
                   f"exported {n} fact(s) of {args.namespace!r} to {args.target}")
            return 0
        manifest, tensors = read_memory_state(args.target, engine.fingerprint)
        facts = manifest["facts"]
        if not facts:
            raise UsageError(f"{args.target} holds no facts")
        ids = store.write(args.namespace, [f["text"] for f in facts], tensors["Z"].float(),
                          ids=[f["id"] for f in facts], provenance={"source": "import", "from": str(args.target)})
        _print(args, {"namespace": args.namespace, "ids": ids}, f"imported {len(ids)} fact(s) into {args.namespace!r}")
        return 0
    finally:
        store.close()


CHAT_HELP = "plain lines are questions; /edit FACT, /forget ID, /list, /quit"


def _cmd_chat(args: argparse.Namespace) -> int:
    engine = _engine(args)
    store = _open_store(args, engine)
    ns = args.namespace
    print(f"larimar chat on namespace {ns!r}: {CHAT_HELP}", file=sys.stderr)
    try:
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line in ("/quit", "/exit"):
                    break
                if line.startswith("/edit"):
                    fact = fact_sentence(line[len("/edit"):].strip(), engine.lm.max_chars)
                    ids = store.write(ns, [fact], engine.encode_facts([fact]), provenance={"source": "chat"})
                    print(f"written {ids[0]}")
                elif line.startswith("/forget"):
                    fid = line[len("/forget"):].strip()
                    store.forget(ns, [fid], provenance={"source": "chat"})
                    print(f"forgot {fid}")
                elif line == "/list":
                    facts = store.facts(ns)
                    print("\n".join(f"{f.id}\t{f.text}" for f in facts) or "(no facts)")
                elif line.startswith("/"):
                    print(f"unknown command; {CHAT_HELP}")
                else:
                    ans = _answer(engine, store, ns, line, args.max_tokens, args.temperature)
                    print(json.dumps(ans, ensure_ascii=False) if args.json else _describe(ans))
            except (ValueError, KeyError) as err:
                print(f"error: {err.args[0] if isinstance(err, KeyError) and err.args else err}")
    finally:
        store.close()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from larimar.serving.service import serve

    from larimar.serving.work import ServiceLimits

    limits = None  # serve() reads $LARIMAR_LIMITS
    try:
        if args.limits:
            fields = json.loads(args.limits)
            if not isinstance(fields, dict):
                raise ValueError("a JSON object is expected")
            limits = ServiceLimits(**fields)
    except (ValueError, TypeError) as err:  # bad JSON, unknown field, out-of-range value
        raise UsageError(f"--limits: {err}") from None
    engine = _engine(args)
    serve(host=args.host, port=args.port, store_path=args.store, engine=engine, limits=limits,
          require_keys=not args.no_keys)
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    path = StoreOptions.from_args(args).path()
    fingerprint = stored_fingerprint(path)
    if fingerprint is None:
        if args.action != "add":
            raise UsageError(f"no memory store at {path}")
        from larimar.backbones import model_fingerprint
        from larimar.editor import DEFAULT_CHECKPOINT
        from larimar.model import LarimarModel

        quiet_loading()  # a new store is tied to the checkpoint from the start
        model = LarimarModel.from_pretrained(Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT)
        store = MemoryStore(path, fingerprint=model_fingerprint(model), memory=None)
    else:
        store = MemoryStore(path, fingerprint=fingerprint, memory=None)
    try:
        if args.action == "add":
            if not args.name:
                raise UsageError("keys add needs a NAME")
            token = store.add_key(args.name, args.namespace, args.rights)
            _print(args, {"name": args.name, "namespace": args.namespace, "rights": args.rights, "token": token},
                   f"{token}\n(shown once: keep it; the store keeps only a hash)")
        elif args.action == "list":
            keys = store.list_keys()
            rows = [{"name": k.name, "namespace": k.namespace, "rights": k.rights, "revoked": k.revoked is not None}
                    for k in keys]
            lines = ["\t".join([r["name"], r["namespace"], r["rights"]] + (["revoked"] if r["revoked"] else []))
                     for r in rows]
            _print(args, rows, "\n".join(lines) or "(no keys)")
        else:
            if not args.name:
                raise UsageError("keys revoke needs a NAME")
            store.revoke_key(args.name)
            _print(args, {"revoked": args.name}, f"revoked {args.name}")
    finally:
        store.close()
    return 0


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Store errors (another checkpoint, a store in use) become user errors: one line, exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except StoreError as err:
            raise UsageError(str(err)) from None

    return run


def _model_and_store(p: argparse.ArgumentParser, namespace: str = "default") -> None:
    StoreOptions.add_to(p, namespace)
    ModelOptions.add_to(p, ablations=False)


def add_edit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="write facts to a persistent memory namespace")
    p.add_argument("facts", nargs="*", help="fact sentences")
    p.add_argument("--file", help="JSON-lines file: a sentence string or {prompt, subject, target_new} per line")
    _model_and_store(p)
    p.set_defaults(func=_guard(_cmd_edit))


def add_forget(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forget", help="forget facts exactly, by id")
    p.add_argument("ids", nargs="+", help="fact ids (see `larimar memories list`)")
    _model_and_store(p)
    p.set_defaults(func=_guard(_cmd_forget))


def _add_answering(sub: argparse._SubParsersAction, name: str, helptext: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=helptext)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    _model_and_store(p)
    return p


def add_ask(sub: argparse._SubParsersAction) -> None:
    p = _add_answering(sub, "ask", "answer a prompt, using memory when in scope")
    p.add_argument("prompt")
    p.set_defaults(func=_guard(_cmd_ask))


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = _add_answering(sub, "chat", "interactive: questions, /edit, /forget, /list, /quit")
    p.set_defaults(func=_guard(_cmd_chat))


def add_memories(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memories", help="list / show facts, export / import a namespace")
    msub = p.add_subparsers(dest="action", required=True)
    for action, helptext, target in (("list", "the facts of a namespace", None),
                                     ("show", "one fact with its provenance", "a fact ID"),
                                     ("export", "a namespace to a memory folder", "a folder"),
                                     ("import", "a memory folder into a namespace", "a folder")):
        a = msub.add_parser(action, help=helptext)
        if target:
            a.add_argument("target", help=target)
        else:
            a.set_defaults(target=None)
        if action in ("export", "import"):  # the latents are tied to the checkpoint: the model is loaded
            _model_and_store(a)
        else:
            StoreOptions.add_to(a)
        a.set_defaults(func=_guard(_cmd_memories))


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the HTTP service (OpenAI-compatible completions with memory)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-keys", action="store_true", help="serve without API keys (loopback use only)")
    p.add_argument("--limits", default=None, metavar="JSON",
                   help="request and work limits, a JSON object of ServiceLimits fields, e.g. "
                        "'{\"max_concurrent_work\": 1, \"max_batch\": 16, \"batch_window_ms\": 5}' "
                        "(default: $LARIMAR_LIMITS, else the defaults)")
    _model_and_store(p)
    p.set_defaults(func=_guard(_cmd_serve))


def add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="API keys of the service")
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("name", nargs="?", help="the key's name")
    p.add_argument("--rights", choices=["read", "write"], default="read")
    p.add_argument("--checkpoint", default=None,
                   help="keys add on a new store: the checkpoint the store is tied to (default: the shipped one)")
    StoreOptions.add_to(p, namespace="*")
    p.set_defaults(func=_guard(_cmd_keys))
