"""Batch editing capacity (paper section 5.3): N facts written at once (one batch write) into one memory.

Rewrite accuracy (ES under ``counterfact_prob``: NLL(new) < NLL(true) after the rewrite prompt) and token accuracy.
Note: a read is (up to the ridge) the orthogonal projection of the query's latent onto the span of the written
latents, so beyond C linearly independent facts a memory-addressed read returns the query's own latent whatever K
is; the default keyed read instead looks up the nearest fact's stored latent (docs/method.md).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from larimar.eval.editors import LarimarEditor, NoEditEditor, RagEditor
from larimar.eval.metrics import mean_of, rewrite_success, token_accuracy
from larimar.facts import EditRequest

logger = logging.getLogger(__name__)

def evaluate_capacity(lm: Any, records: Sequence[EditRequest], ns: Sequence[int],
                      batch_size: int = 32, progress: bool = False, sample: int = 0,
                      seed: int = 0, rag: bool = True) -> list[dict[str, Any]]:
    """For each N: empty memory, write the first N facts at once (one batch write), score their rewrite prompts
    (all of them, or a seeded random ``sample`` of them when 0 < sample < N; ``n_scored`` says how many).

    ``rewrite_acc`` is ES under ``counterfact_prob`` (NLL(new) < NLL(true) after the rewrite prompt; records
    without target_true are left out of it); ``token_acc`` the teacher-forced token accuracy of target_new;
    ``*_none`` the unedited model (z = 0); ``scope_rate`` the share of rewrite prompts in scope. With ``rag``,
    ``*_rag`` is `RagEditor` holding the same N facts (the nearest fact's sentence in the prompt, the same scope
    detector and threshold) and ``rag_write_s`` its index insert.

    Raises:
        ValueError: an N larger than the number of records (that N is skipped with a warning instead when others
            fit) or no N at all.
    """
    records = list(records)
    ok_ns = [n for n in ns if 0 < n <= len(records)]
    for n in ns:
        if n not in ok_ns:
            logger.warning("capacity: skipping N = %d (%d records loaded)", n, len(records))
    if not ok_ns:
        raise ValueError(f"no N in {list(ns)} fits the {len(records)} records loaded")
    ed, none = LarimarEditor(lm), NoEditEditor(lm.model)
    rag_ed = RagEditor(lm) if rag else None
    rows = []
    for n in ok_ns:
        facts = records[:n]
        t0 = time.perf_counter()
        lm.reset()
        lm.edit(facts, ids=[f"f{i}" for i in range(n)])
        write_s = time.perf_counter() - t0
        scored = facts if not 0 < sample < n else random.Random(seed).sample(facts, sample)
        es_recs = [r for r in scored if r.target_true]
        row: dict[str, Any] = {"n": n, "slots": lm.model.memory.config.num_slots, "write_s": write_s,
                               "n_scored": len(scored)}
        systems: list[tuple[str, Any]] = [("", ed), ("_none", none)]
        if rag_ed is not None:
            rag_ed.reset()
            t0 = time.perf_counter()
            rag_ed.edit(facts, ids=[f"f{i}" for i in range(n)])
            row["rag_write_s"] = time.perf_counter() - t0
            systems.append(("_rag", rag_ed))
        for name, e in systems:
            ok, scope = rewrite_success(e, [r.full_prompt for r in es_recs], [r.target_new for r in es_recs],
                                        [r.target_true or "" for r in es_recs], batch_size)
            acc, _ = token_accuracy(e, [r.full_prompt for r in scored], [r.target_new for r in scored], batch_size)
            row[f"rewrite_acc{name}"] = mean_of(ok)
            row[f"token_acc{name}"] = mean_of(acc)
            if name != "_none":
                row[f"scope_rate{name}"] = mean_of(scope)
        rows.append(row)
        if progress:
            logger.info("capacity N=%d: %s", n, row)
    lm.reset()
    if rag_ed is not None:
        rag_ed.reset()
    return rows
