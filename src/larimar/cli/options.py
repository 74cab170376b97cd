"""Option groups of the `larimar` command, each defined once and offered only by the commands that use it.

Each group is a typed dataclass with ``add_to(parser)`` (its flags, from its fields' defaults) and
``from_args(namespace)``; the commands read their options through these groups, never field by field.

    ModelOptions     the checkpoint, device, scope detector, read mode and write-time refinement -> a `Larimar`
    MemoryOptions    the memory size of an evaluation run (--slots, --slot-init)
    StoreOptions     the persistent memory store (--store, --namespace, --json)
    RunOptions       an evaluation run's output folder and seed
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
MEMORY_SPANS = ("sentence", "all")  # larimar.model.MEMORY_SPANS (import-free, as READ_MODES)
READ_MODES = ("keyed", "recall", "memory", "nearest")  # larimar.memory.READ_MODES (kept import-free for a fast --help)
STOP_MODES = ("none", "questions", "answers")  # larimar.editor.refine.STOP_MODES (import-free, as above)
SLOT_INITS = ("random", "eye")  # larimar.memory.SLOT_INITS


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def _pick(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``cls`` from the same-named attributes of ``args`` (missing ones keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def quiet_loading() -> None:
    """No weight-loading progress bars from transformers (command-line use: stderr keeps only our messages)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@dataclass
class ModelOptions:
    """How a `Larimar` editor is built and how it reads and writes.

    Attributes:
        checkpoint: a Larimar checkpoint folder (None: the shipped one).
        device: "cpu" or "cuda" (None: CPU).
        scope_threshold: in scope when the nearest fact's cosine is >= this.
        scope_encoder: a sentence-transformers folder (None: all-MiniLM-L6-v2), or "larimar" for the model's own.
        no_scope: read memory for every query (the paper's "no scope detector" ablation).
        read_mode: "keyed", "recall", "memory" or "nearest" (`larimar.editor.read`).
        memory_span: how long an in-scope answer is conditioned on the memory read-out: "sentence" (its first
            sentence, then the plain decoder goes on) or "all" (every token, the paper's decoding).
        refine_steps: write-time refinement steps per fact (0: the paper's one-shot write, for sentences too).
        refine_sentence_steps: the steps for a plain sentence (None: ``refine_steps``).
        refine_lr: their learning rate.
        refine_splits: beginnings of a plain sentence its latent is refined after (`Refinement.sentence_splits`).
        refine_stop_nll: stop refining a fact once its targets' NLL per token is below this (None: never).
        refine_questions: also refine a plain sentence on question-shaped reads ("Q: <beginning>? A:" -> the rest).
        refine_tail_tokens: after a plain sentence's answer reads, pull the decoder's distribution toward the
            plain decoder's over at most this many tokens of its continuation (`Refinement.sentence_tail_tokens`;
            0: off).
        refine_tail_weight: the weight of those tail targets (`Refinement.sentence_tail_weight`).
        refine_no_repeat: the weight of an unlikelihood target on the answer's first word right after a plain
            sentence's answer (`Refinement.sentence_no_repeat`; 0: off).
        refine_stop: also refine a plain sentence on ending after its answer: none, questions or answers
            (`Refinement.sentence_stop`).
        refine_stop_weight: the weight of those end targets against 1 for the others (`Refinement.sentence_stop_weight`).
    """

    checkpoint: str | None = None
    device: str | None = None
    scope_threshold: float = 0.6
    scope_encoder: str | None = None
    no_scope: bool = False
    read_mode: str = "recall"
    memory_span: str = "sentence"
    refine_steps: int = 5
    refine_sentence_steps: int | None = 10
    refine_lr: float = 0.1
    refine_splits: int = 4
    refine_stop_nll: float | None = None
    refine_questions: bool = True
    refine_tail_tokens: int = 0
    refine_tail_weight: float = 1.0
    refine_no_repeat: float = 0.0
    refine_stop: str = "none"
    refine_stop_weight: float = 0.3

    @staticmethod
    def add_to(p: argparse.ArgumentParser, ablations: bool = True) -> None:
        """Adds the flags; ``ablations`` adds --no-scope too (evaluation commands)."""
        d = ModelOptions()
        p.add_argument("--checkpoint", default=None, help="Larimar checkpoint folder (default: the shipped one)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
        p.add_argument("--scope-threshold", type=float, default=d.scope_threshold,
                       help=f"scope detector cosine threshold (default {d.scope_threshold})")
        p.add_argument("--scope-encoder", default=None,
                       help="sentence-transformers folder for the scope detector (default: all-MiniLM-L6-v2), "
                            "or 'larimar' for the model's own encoder")
        if ablations:
            p.add_argument("--no-scope", action="store_true", help="read memory for every query (ablation)")
        p.add_argument("--read-mode", choices=READ_MODES, default=d.read_mode,
                       help="keyed: the memory addressed with the nearest fact's key (a lookup of its stored latent), "
                            "projected on the query; recall: the same read-out, not projected; memory: the paper's "
                            "query read; nearest: the stored latent (ablation)")
        p.add_argument("--memory-span", choices=MEMORY_SPANS, default=d.memory_span,
                       help="sentence: an in-scope answer is conditioned on the memory read-out until its first "
                            "sentence ends (or it says a word again), then the unedited decoder continues the text; "
                            f"all: every generated token is (the paper's decoding) (default {d.memory_span})")
        p.add_argument("--refine-steps", type=int, default=d.refine_steps,
                       help=f"gradient steps on each written fact's latent, model unchanged (default {d.refine_steps}; "
                            "0: the encoder's latent, the paper's one-shot write)")
        p.add_argument("--refine-sentence-steps", type=int, default=d.refine_sentence_steps,
                       help=f"the steps for a plain sentence (default {d.refine_sentence_steps}; --refine-steps 0 turns "
                            "refinement off for sentences too)")
        p.add_argument("--refine-lr", type=float, default=d.refine_lr,
                       help=f"their learning rate (default {d.refine_lr})")
        p.add_argument("--refine-splits", type=int, default=d.refine_splits,
                       help="beginnings of a plain sentence its latent is refined after (before a content word), the "
                            f"rest of the sentence as the target (default {d.refine_splits}; 1: only 'all but the last "
                            "word')")
        p.add_argument("--refine-stop-nll", type=float, default=d.refine_stop_nll,
                       help="stop refining a fact once its targets' mean NLL per token is below this (default: "
                            "never)")
        p.add_argument("--refine-questions", action=argparse.BooleanOptionalAction, default=d.refine_questions,
                       help="also refine a plain sentence on question-shaped reads of it ('Q: <beginning>? A:' -> "
                            f"a bare answer; default {d.refine_questions})")
        p.add_argument("--refine-tail-tokens", type=int, default=d.refine_tail_tokens,
                       help="after a plain sentence's answer, keep the decoder's next-token distribution close to the "
                            "unedited decoder's (KL) over at most this many tokens of what the unedited one says "
                            f"there (default {d.refine_tail_tokens}; 0: off)")
        p.add_argument("--refine-tail-weight", type=float, default=d.refine_tail_weight,
                       help=f"the weight of those tail targets against 1 for the others (default {d.refine_tail_weight})")
        p.add_argument("--refine-no-repeat", type=float, default=d.refine_no_repeat,
                       help="weight of an unlikelihood target on the answer's first word right after a plain "
                            f"sentence's answer, against saying it again (default {d.refine_no_repeat}; 0: off)")
        p.add_argument("--refine-stop", choices=STOP_MODES, default=d.refine_stop,
                       help="also refine a plain sentence on the end-of-text token after its answer: after its "
                            f"question read, after both answer reads, or none (default {d.refine_stop})")
        p.add_argument("--refine-stop-weight", type=float, default=d.refine_stop_weight,
                       help=f"the weight of those end targets against 1 for the others (default {d.refine_stop_weight})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        return _pick(cls, args)

    def refinement(self) -> Any:
        """The `larimar.editor.Refinement` of these options.

        Raises:
            ValueError: negative steps or a learning rate <= 0.
        """
        from larimar.editor import Refinement

        return Refinement(steps=self.refine_steps, sentence_steps=self.refine_sentence_steps, lr=self.refine_lr,
                          sentence_splits=self.refine_splits, stop_nll=self.refine_stop_nll,
                          sentence_questions=self.refine_questions, sentence_tail_tokens=self.refine_tail_tokens,
                          sentence_tail_weight=self.refine_tail_weight, sentence_no_repeat=self.refine_no_repeat,
                          sentence_stop=self.refine_stop, sentence_stop_weight=self.refine_stop_weight)

    def build(self, scope_mode: str = "prompt") -> Any:
        """The `larimar.editor.Larimar` these options describe (weights loaded quietly)."""
        from larimar.editor import Larimar

        quiet_loading()
        return Larimar.from_pretrained(
            self.checkpoint, device=self.device, scope_threshold=self.scope_threshold, scope_mode=scope_mode,
            scope_encoder=self.scope_encoder, use_scope=not self.no_scope, read_mode=self.read_mode,
            refinement=self.refinement(), memory_span=self.memory_span,
        )

    def record(self) -> dict[str, Any]:
        """The options as a run records them (summary.json)."""
        return {"checkpoint": str(self.checkpoint or "default"), "scope_threshold": self.scope_threshold,
                "scope_encoder": self.scope_encoder or "all-MiniLM-L6-v2", "use_scope": not self.no_scope,
                "read_mode": self.read_mode, "memory_span": self.memory_span, "refine_steps": self.refine_steps,
                "refine_sentence_steps": self.refine_sentence_steps, "refine_lr": self.refine_lr,
                "refine_splits": self.refine_splits, "refine_stop_nll": self.refine_stop_nll,
                "refine_questions": self.refine_questions, "refine_tail_tokens": self.refine_tail_tokens,
                "refine_tail_weight": self.refine_tail_weight, "refine_no_repeat": self.refine_no_repeat,
                "refine_stop": self.refine_stop, "refine_stop_weight": self.refine_stop_weight}


@dataclass
class MemoryOptions:
    """The memory size of an evaluation run.

    Attributes:
        slots: K (None: the checkpoint's).
        slot_init: rows added to M0 when K > K0: "random" or "eye".
    """

    slots: int | None = None
    slot_init: str = "random"

    @staticmethod
    def add_to(p: argparse.ArgumentParser, slots: int | None = None) -> None:
        p.add_argument("--slots", type=int, default=slots,
                       help="memory slots K" + (f" (default {slots})" if slots else " (default: the checkpoint's)"))
        p.add_argument("--slot-init", choices=SLOT_INITS, default="random", help="rows added to M0 when K > K0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MemoryOptions:
        return _pick(cls, args)


@dataclass
class StoreOptions:
    """The persistent memory store of the product commands.

    Attributes:
        store: the store folder (None: the user data folder).
        namespace: the memory namespace.
        json: print JSON instead of text.
    """

    store: str | None = None
    namespace: str = "default"
    json: bool = False

    @staticmethod
    def add_to(p: argparse.ArgumentParser, namespace: str = "default") -> None:
        p.add_argument("--store", default=None, help="memory store folder (default: the user data folder)")
        p.add_argument("--namespace", default=namespace, help=f"memory namespace (default: {namespace!r})")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StoreOptions:
        return _pick(cls, args)

    def path(self) -> Path:
        """The store folder."""
        from larimar.serving.storage import default_store_path

        return Path(self.store) if self.store else default_store_path()


@dataclass
class RunOptions:
    """An evaluation run's output folder and seed.

    Attributes:
        out: the output folder (created).
        seed: the run's seed (torch's global generator is seeded with it before the model is built).
    """

    out: str = ""
    seed: int = 0

    @staticmethod
    def add_to(p: argparse.ArgumentParser, what: str = "summary.json, summary.md") -> None:
        p.add_argument("--out", required=True, help=f"output folder ({what})")
        p.add_argument("--seed", type=int, default=0)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        return _pick(cls, args)

    def folder(self) -> Path:
        """The output folder, created."""
        d = Path(self.out)
        d.mkdir(parents=True, exist_ok=True)
        return d


def now_utc() -> str:
    """The current time, ISO 8601 in UTC, to the second (run metadata)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def split_names(text: str | None) -> list[str]:
    """"a, b,c" -> ["a", "b", "c"]."""
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def parse_ints(text: str, what: str) -> list[int]:
    """"64,128,256" -> [64, 128, 256]; raises ValueError naming ``what``."""
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not out or any(x < 1 for x in out):
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return out
