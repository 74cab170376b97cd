"""Builds the development set of `larimar eval facts` (issue 21): runs/facts/dev.jsonl.

    .venv/bin/python benchmarks/make_facts_dev.py [--shared ../shared/data] [--out runs/facts/dev.jsonl]
        [--zsre 50] [--counterfact 50] [--seed 0]

The set is the handwritten facts (benchmarks/facts/handwritten.jsonl: fictional entities, so the base model cannot
know them) plus facts derived at run time from the TRAIN splits of ../shared/data (never copied into the repo):

- ZsRE (zsre/zsre_mend_train-1k.json): the question ``src`` with the new answer ``alt`` becomes a sentence by a
  few templates on the subject ("What is the X of S?" -> "The X of S is A.", "In what city did S die?" ->
  "S died in A.", ...), else the fact "Q: {src} A: {alt}."; questions: the sentence's own beginning, "Q: {src} A:"
  (when templated) and "Q: {rephrase} A:"; unrelated: the NQ question ``loc`` as "Q: ...? A:" with ``loc_ans``
  (short answers only).
- CounterFact (counterfact_easyedit/counterfact-train.json): "{prompt} {target_new}."; questions: the prompt, the
  rephrased statement ``rephrase_prompt`` and a "Q: ... A:" question from the prompt's relation template (only
  records whose template has one are used); unrelated: ``locality_prompt`` with ``locality_ground_truth``.

The evaluated files (counterfact_rome_929.json, zsre_mend_eval_800.json) are never read. All facts are shuffled
together (seeded) so that any ``--limit N`` slice mixes the three sources; every line has a ``source`` key.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HANDWRITTEN = ROOT / "benchmarks" / "facts" / "handwritten.jsonl"
FORBIDDEN = ("counterfact_rome_929.json", "zsre_mend_eval_800.json")

# CounterFact relation templates ("{}" = the subject) -> a question with an answer slot
CF_QUESTIONS = {
    "{} is located in": "Q: Where is {} located? A:",
    "{}, which is located in": "Q: Where is {} located? A:",
    "The location of {} is": "Q: Where is {} located? A:",
    "{} can be found in": "Q: Where can {} be found? A:",
    "{} is located in the country of": "Q: In which country is {} located? A:",
    "{} is located in the continent": "Q: On which continent is {} located? A:",
    "{} belongs to the continent of": "Q: Which continent does {} belong to? A:",
    "{} is a part of the continent of": "Q: Which continent is {} a part of? A:",
    "{} speaks the language": "Q: What language does {} speak? A:",
    "{} speaks": "Q: What language does {} speak? A:",
    "{} spoke the language": "Q: What language did {} speak? A:",
    "The mother tongue of {} is": "Q: What is the mother tongue of {}? A:",
    "The native language of {} is": "Q: What is the native language of {}? A:",
    "{} is a native speaker of": "Q: Which language is {} a native speaker of? A:",
    "The official language of {} is": "Q: What is the official language of {}? A:",
    "The language of {} is": "Q: What is the language of {}? A:",
    "The original language of {} is": "Q: What is the original language of {}? A:",
    "The original language of {} was": "Q: What was the original language of {}? A:",
    "{} writes in": "Q: In which language does {} write? A:",
    "{} is a twin city of": "Q: What is the twin city of {}? A:",
    "The twin city of {} is": "Q: What is the twin city of {}? A:",
    "{}, developed by": "Q: Who developed {}? A:",
    "{} is developed by": "Q: Who developed {}? A:",
    "{}, created by": "Q: Who created {}? A:",
    "{} is created by": "Q: Who created {}? A:",
    "{} is a product of": "Q: Which company makes {}? A:",
    "{} is produced by": "Q: Which company produces {}? A:",
    "{}, produced by": "Q: Which company produces {}? A:",
    "The headquarter of {} is located in": "Q: Where is the headquarters of {}? A:",
    "{} worked in the city of": "Q: In which city did {} work? A:",
    "{} was employed in": "Q: Where was {} employed? A:",
    "{} used to work in": "Q: Where did {} use to work? A:",
    "{} found employment in": "Q: Where did {} find employment? A:",
    "{} holds a citizenship from": "Q: Which country is {} a citizen of? A:",
    "{} has a citizenship from": "Q: Which country is {} a citizen of? A:",
    "{} is a citizen of": "Q: Which country is {} a citizen of? A:",
    "{}, a citizen of": "Q: Which country is {} a citizen of? A:",
    "{} was born in": "Q: Where was {} born? A:",
    "{} debuted on": "Q: On which network did {} debut? A:",
    "{} premieres on": "Q: On which network does {} premiere? A:",
    "The occupation of {} is": "Q: What is the occupation of {}? A:",
    "{} works as": "Q: What does {} work as? A:",
    "{} originates from": "Q: Where does {} originate from? A:",
    "{} plays in the position of": "Q: Which position does {} play? A:",
    "{} plays as": "Q: Which position does {} play? A:",
    "The genre played by {} is": "Q: What genre does {} play? A:",
}


def _qa(prompt: str, answer: str) -> dict[str, str]:
    return {"prompt": prompt, "answer": answer}


def zsre_sentence(src: str, subject: str, alt: str) -> tuple[str, str] | None:
    """A plain sentence for a ZsRE question and its new answer, and its beginning before the answer (None: no
    template fits)."""
    s = re.escape(subject)
    rules = [
        (rf"^(?:What|Which|Who) (is|was) the ([\w ]{{1,40}}?) of {s}\?$", "The {1} of {S} {0}"),
        (rf"^In (?:what|which) city did {s} die\?$", "{S} died in"),
        (rf"^(?:What|Which) city is {s} from\?$", "{S} is from"),
        (rf"^(?:What year|When) was {s} (founded|established|created|launched|released|published|formed)\?$",
         "{S} was {0} in"),
        (rf"^What is {s}'s ([\w ]{{1,30}})\?$", "{S}'s {0} is"),
    ]
    for pattern, template in rules:
        m = re.match(pattern, src.strip())
        if m:
            prefix = template.replace("{S}", subject).format(*m.groups())
            return f"{prefix} {alt}.", prefix
    return None


def sampled_items(path: Path, n: int, rng: random.Random,
                  make: Callable[[int, dict[str, Any]], dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The first ``n`` facts ``make(index, record)`` builds from a JSON list's records in a seeded random order
    (records it returns None for are skipped)."""
    records = json.loads(path.read_text(encoding="utf-8"))
    order = list(range(len(records)))
    rng.shuffle(order)
    out = []
    for i in order:
        if len(out) >= n:
            break
        item = make(i, records[i])
        if item is not None:
            out.append(item)
    return out


def zsre_item(i: int, r: dict[str, Any]) -> dict[str, Any] | None:
    """A fact from ZsRE (MEND) train record ``i`` (module docstring), or None when it does not make one."""
    src, alt, reph, subj = (str(r.get(k) or "").strip() for k in ("src", "alt", "rephrase", "subject"))
    loc, loc_ans = str(r.get("loc") or "").strip(), str(r.get("loc_ans") or "").strip()
    if not (src and alt and reph and subj) or alt.lower() == subj.lower() or len(loc_ans.split()) > 4:
        return None
    templated = zsre_sentence(src, subj, alt)
    if templated:
        fact, prefix = templated
        questions = [_qa(prefix, alt), _qa(f"Q: {src} A:", alt)]
    else:
        fact = f"Q: {src} A: {alt}."
        questions = [_qa(f"Q: {src} A:", alt)]
    questions.append(_qa(f"Q: {reph} A:", alt))
    unrelated = []
    if loc and loc_ans:
        q = re.sub(r"^nq question:\s*", "", loc).strip()
        unrelated.append(_qa(f"Q: {q[:1].upper() + q[1:]}? A:", loc_ans))
    return {"fact": fact, "questions": questions, "unrelated": unrelated, "source": f"zsre_train:{i}"}


def counterfact_item(i: int, r: dict[str, Any]) -> dict[str, Any] | None:
    """A fact from EasyEdit CounterFact train record ``i`` whose prompt template has a question form, or None."""
    prompt, subj, new = (str(r.get(k) or "").strip() for k in ("prompt", "subject", "target_new"))
    question = CF_QUESTIONS.get(prompt.replace(subj, "{}", 1)) if subj and subj in prompt else None
    if not (question and new and r.get("rephrase_prompt")):
        return None
    questions = [_qa(prompt, new), _qa(question.format(subj), new), _qa(str(r["rephrase_prompt"]).strip(), new)]
    unrelated = []
    if r.get("locality_prompt") and r.get("locality_ground_truth"):
        unrelated.append(_qa(str(r["locality_prompt"]).strip(), str(r["locality_ground_truth"]).strip()))
    return {"fact": f"{prompt} {new}.", "questions": questions, "unrelated": unrelated,
            "source": f"counterfact_train:{r.get('case_id', i)}"}


def handwritten_items(path: Path) -> list[dict[str, Any]]:
    """The handwritten facts, each tagged with its line as ``source``."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [{**json.loads(ln), "source": f"handwritten:{k + 1}"} for k, ln in enumerate(lines)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--handwritten", default=str(HANDWRITTEN))
    ap.add_argument("--out", default=str(ROOT / "runs" / "facts" / "dev.jsonl"))
    ap.add_argument("--zsre", type=int, default=50, help="facts derived from ZsRE train")
    ap.add_argument("--counterfact", type=int, default=50, help="facts derived from CounterFact train")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    zsre = shared / "zsre" / "zsre_mend_train-1k.json"
    cf = shared / "counterfact_easyedit" / "counterfact-train.json"
    assert not any(p.name in FORBIDDEN for p in (zsre, cf))
    rng = random.Random(args.seed)
    items = handwritten_items(Path(args.handwritten))
    items += sampled_items(zsre, args.zsre, rng, zsre_item)
    items += sampled_items(cf, args.counterfact, rng, counterfact_item)
    rng.shuffle(items)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    by_source: dict[str, int] = {}
    for it in items:
        key = it["source"].split(":")[0]
        by_source[key] = by_source.get(key, 0) + 1
    n_q = sum(len(it["questions"]) for it in items)
    print(f"wrote {len(items)} facts ({by_source}), {n_q} questions, to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
