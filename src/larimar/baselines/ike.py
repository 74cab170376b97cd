"""IKE (Zheng et al., 2023): in-context knowledge editing; the weights never change.

The edit is a text prefix: k demonstrations, then the new fact(s), then the query::

    New Fact: The Eiffel Tower is in Rome
    Prompt: The Eiffel Tower is located in Rome        <- a "copy" demonstration (+ blank line)
    ...
    New Fact: <request.sentence>
    Prompt: <query>

Demonstrations are drawn (seeded) from a CounterFact file in ROME format, cycling IKE's three kinds:
copy (the rewrite prompt -> new target), update (a paraphrase -> new target) and retain (a neighbourhood
prompt -> its true target).

Contract extension: ``apply_ike`` returns the model unchanged and an ``EditHandle`` whose
``transform_prompt(query)`` is the text to score in place of ``query`` (``prompt_prefix`` holds the
prefix). Callers score ``restore.transform_prompt(prompt)`` for every method (the identity for the weight
editors), so a harness need not branch on the method. ``restore()`` does nothing to the model.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from larimar.baselines.common import EditHandle
from larimar.baselines.hparams import IKEHyperParams
from larimar.baselines.stats import default_data_dir
from larimar.facts import EditRequest

logger = logging.getLogger(__name__)


def load_demonstrations(path: str | Path, k: int, seed: int, exclude_subjects: Sequence[str] = ()) -> list[str]:
    """``k`` IKE demonstrations from a ROME-format CounterFact file.

    Args:
        path: the JSON file (a list of records with ``requested_rewrite``, ``paraphrase_prompts``,
            ``neighborhood_prompts``); a relative path that does not exist is tried under the shared data
            folder (``stats.default_data_dir()``).
        k: how many demonstrations.
        seed: seeds the choice of records.
        exclude_subjects: subjects never used (the facts being edited).

    Returns:
        k strings "New Fact: ...\\nPrompt: ... answer\\n\\n", kinds cycling copy, update, retain.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file has fewer than k usable records.
    """
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (default_data_dir() / path).is_file():
        path = default_data_dir() / path
    if not path.is_file():
        raise FileNotFoundError(f"IKE demonstrations file {path} not found (also tried under {default_data_dir()})")
    records = json.loads(path.read_text(encoding="utf-8"))
    excluded = {s.strip().lower() for s in exclude_subjects}
    usable = [r for r in records if r["requested_rewrite"]["subject"].strip().lower() not in excluded]
    if len(usable) < k:
        raise ValueError(f"{path}: {len(usable)} usable records, need k={k} demonstrations")
    chosen = random.Random(seed).sample(usable, k)
    demos = []
    for i, rec in enumerate(chosen):
        rw = rec["requested_rewrite"]
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        prompt = rw["prompt"].format(rw["subject"])
        fact = f"{prompt} {new}"
        kind = i % 3
        if kind == 1 and rec.get("paraphrase_prompts"):
            query, answer = rec["paraphrase_prompts"][0], new
        elif kind == 2 and rec.get("neighborhood_prompts"):
            query, answer = rec["neighborhood_prompts"][0], true
        else:
            query, answer = prompt, new
        demos.append(f"New Fact: {fact}\nPrompt: {query} {answer}\n\n")
    return demos


def apply_ike(
    model: nn.Module, tok, requests: Sequence[EditRequest], hparams: IKEHyperParams
) -> tuple[nn.Module, EditHandle]:
    """Build the IKE prompt prefix for ``requests``; the model is returned untouched.

    Args:
        model: any causal LM (unused apart from being returned).
        tok: its tokenizer (unused; kept for the common contract).
        requests: the new facts; all of them go into the prefix.
        hparams: ``IKEHyperParams``.

    Returns:
        (model, handle): ``handle.transform_prompt(q)`` = demonstrations + new facts + ``query_template(q)``.

    Raises:
        ValueError: no requests.
    """
    if not requests:
        raise ValueError("apply_ike needs at least one EditRequest")
    demos: list[str] = []
    if hparams.demonstrations_path and hparams.k > 0:
        demos = load_demonstrations(hparams.demonstrations_path, hparams.k, hparams.seed, [r.subject for r in requests])
    elif hparams.k > 0:
        logger.warning("IKE: no demonstrations_path given, using no demonstrations")
    facts = "".join(hparams.fact_template.format(fact=r.sentence) for r in requests)
    prefix = "".join(demos) + facts
    query_template = hparams.query_template

    def prompt_fn(prompt: str) -> str:
        return prefix + query_template.format(prompt=prompt)

    return model, EditHandle("ike", lambda: None, prompt_fn=prompt_fn, prompt_prefix=prefix)
