"""Reading a memory of facts for queries: the scope decision, then the one read-mode dispatch.

Per query (`route`):
    1. scope: the query's nearest written fact by sentence-embedding cosine (per sentence of the query); below
       the threshold the query is out of scope and decodes with z = 0 (exactly the plain decoder);
    2. in scope, `read_at` (with the query's latent z_q = e(query) where the read mode uses it):
       - ``"keyed"``: the memory addressed with the stored key of the nearest fact, projected as in a
         one-fact memory (`ItemMemory.read_keyed`). With exact solves this returns the nearest fact's stored latent
         scaled by the query's projection on it: it is a lookup of the stored latent, located by the scope
         detector's nearest-neighbour search (docs/method.md, "The keyed read");
       - ``"recall"`` (default): the same read-out w_i M, not projected: the fact's stored latent up to the ridge
         whatever the query's wording (a question reads what its sentence was written with); a lookup through the
         memory that needs no query latent;
       - ``"memory"`` (the paper's read): the projection of z_q on the span of every written latent
         (`ItemMemory.read`); right for one fact, but with N >= C facts it returns z_q itself;
       - ``"nearest"`` (an ablation that bypasses the memory): the nearest fact's stored latent;
    3. the decoder is conditioned on the returned latent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from larimar.memory import READ_MODES, ItemMemory
from larimar.scope import ScopeDetector

QUERY_FREE_READS = ("recall", "nearest")
"""Read modes that do not use the query's latent (no encoder pass for the query)."""


@dataclass
class Routing:
    """The scope decision and the latent for each of Q queries.

    Attributes:
        latents: (Q, C) float32; zero rows for out-of-scope queries.
        in_scope: Q booleans.
        similarities: (Q,) nearest-fact cosine (-inf with no fact, nan without a scope detector).
        nearest_ids: the nearest written fact per query (None when none is known).
    """

    latents: Tensor
    in_scope: list[bool]
    similarities: Tensor
    nearest_ids: list[str | None]


def check_read_mode(read_mode: str) -> str:
    """Returns ``read_mode`` if it is one of `READ_MODES`.

    Raises:
        ValueError: another value.
    """
    if read_mode not in READ_MODES:
        raise ValueError(f"read_mode must be one of {READ_MODES}, got {read_mode!r}")
    return read_mode


def read_at(memory: ItemMemory, read_mode: str, nearest_ids: list[str], zq: Tensor | None) -> Tensor:
    """The latents (R, C) float32 that R in-scope queries read (see the module docstring).

    Args:
        memory: the memory holding the facts.
        read_mode: "keyed", "recall", "memory" or "nearest".
        nearest_ids: R ids of the nearest written facts (used by all but "memory").
        zq: (R, C) the queries' latents (unused by `QUERY_FREE_READS`, which may pass None).
    """
    if read_mode == "nearest":
        return torch.stack([memory.latent(i) for i in nearest_ids]).float()  # (R, C)
    if read_mode == "recall":
        return memory.read_keyed(list(nearest_ids)).float()  # (R, C)
    if zq is None:
        raise ValueError(f"read_mode {read_mode!r} needs the queries' latents")
    if read_mode == "keyed":
        return memory.read_keyed(list(nearest_ids), zq).float()  # (R, C)
    return memory.read(zq).float()  # (R, C)


@torch.inference_mode()
def route(
    encode: Callable[[list[str]], Tensor],
    memory: ItemMemory,
    scope: ScopeDetector,
    queries: list[str],
    *,
    read_mode: str = "recall",
    use_scope: bool = True,
    threshold: float = 0.6,
    scope_mode: str = "prompt",
    encode_texts: list[str] | None = None,
) -> Routing:
    """Scope decision and latent for each query against a memory and the scope detector of its facts.

    Args:
        encode: texts -> (n, C) latents (the Larimar encoder).
        memory: the memory to read.
        scope: the detector holding the memory's facts under the same ids.
        queries: Q strings the scope decision is made on.
        read_mode: "keyed", "recall", "memory" or "nearest" (`read_at`).
        use_scope: False reads memory for every query (the paper's "no scope detector" ablation).
        threshold: in scope when the nearest-fact cosine is >= this.
        scope_mode: "prompt" or "prompt_answer" (how the detector scores ``queries``).
        encode_texts: Q strings encoded as the read queries (default: ``queries``; with "prompt_answer" the
            caller passes the prompts alone).

    Returns:
        the `Routing`; latents on ``memory``'s device.
    """
    Q, C = len(queries), memory.memory.config.code_size
    latents = torch.zeros(Q, C, dtype=torch.float32, device=memory.device)  # (Q, C)
    if len(memory) == 0:
        return Routing(latents, [False] * Q, torch.full((Q,), float("-inf")), [None] * Q)
    if use_scope or read_mode != "memory":
        sims, nearest = scope.with_mode(scope_mode).score(queries)  # (Q,)
    else:
        sims, nearest = torch.full((Q,), float("nan")), [None] * Q
    in_scope = [bool(s >= threshold) for s in sims] if use_scope else [True] * Q
    rows = [q for q in range(Q) if in_scope[q]]
    if rows:
        zq = None
        if read_mode not in QUERY_FREE_READS:
            texts = encode_texts if encode_texts is not None else queries
            zq = encode([texts[q] for q in rows]).to(memory.device, torch.float32)  # (R, C)
        latents[rows] = read_at(memory, read_mode, [nearest[q] for q in rows], zq).to(latents.device)
    return Routing(latents, in_scope, sims, list(nearest))


@torch.inference_mode()
def route_each(
    encode: Callable[[list[str]], Tensor],
    targets: Sequence[tuple[ItemMemory, ScopeDetector]],
    queries: list[str],
    *,
    read_mode: str = "recall",
    use_scope: bool = True,
    threshold: float = 0.6,
) -> list[Routing]:
    """`route` of Q queries, query q against its own (memory, scope detector) ``targets[q]`` (service namespaces),
    with ONE scope-encoder pass over every query and ONE Larimar-encoder pass over the in-scope ones (each encoder
    forward costs about the same for one text as for a batch on a CPU). The detectors must share one encoder and
    mode (`ScopeDetector.with_facts` copies). Each query decides scope on itself ("prompt" mode).

    Returns:
        Q `Routing`s of one query each, equal to ``route(encode, *targets[q], [queries[q]], ...)``.
    """
    Q = len(queries)
    if len(targets) != Q:
        raise ValueError(f"got {len(targets)} targets for {Q} queries")
    out: list[Routing | None] = [None] * Q
    live = [q for q in range(Q) if len(targets[q][0])]  # queries whose memory holds facts
    for q in range(Q):
        if q not in live:
            out[q] = route(encode, targets[q][0], targets[q][1], [queries[q]], read_mode=read_mode,
                           use_scope=use_scope, threshold=threshold)  # empty memory: no model work
    if not live:
        return out  # type: ignore[return-value]
    sims: dict[int, Tensor] = {}
    nearest: dict[int, str | None] = {}
    if use_scope or read_mode != "memory":
        first = targets[live[0]][1].with_mode("prompt")
        texts, owner = first.query_units([queries[q] for q in live])
        unit_emb = first.embed(texts)  # (S, D), one pass for every query
        for k, q in enumerate(live):  # query k's units against its own detector's facts
            units = owner == k
            s, n = targets[q][1].score_embedded(unit_emb[units], owner[units] - k, 1)
            sims[q], nearest[q] = s, n[0]
    else:
        sims = {q: torch.full((1,), float("nan")) for q in live}
        nearest = {q: None for q in live}
    in_scope = {q: (bool(sims[q][0] >= threshold) if use_scope else True) for q in live}
    rows = [q for q in live if in_scope[q]]
    zq = None
    if rows and read_mode not in QUERY_FREE_READS:
        zq = encode([queries[q] for q in rows]).float()  # (R, C), one pass for every in-scope query
    for q in live:
        memory = targets[q][0]
        latent = torch.zeros(1, memory.memory.config.code_size, dtype=torch.float32, device=memory.device)
        if in_scope[q]:
            z = None if zq is None else zq[rows.index(q)][None].to(memory.device)
            latent = read_at(memory, read_mode, [nearest[q]], z).to(latent.device)  # type: ignore[list-item]
        out[q] = Routing(latent, [in_scope[q]], sims[q], [nearest[q]])
    return out  # type: ignore[return-value]
