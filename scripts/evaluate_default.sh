#!/usr/bin/env bash
# Reproduces the tables of docs/results.md and docs/training.md for the shipped default checkpoint (CPU).
# Usage: bash scripts/evaluate_default.sh [OUT_DIR]      (LIMIT_CF / LIMIT_EE override the record counts)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/eval_default}
DATA=../shared/data
LIMIT_CF=${LIMIT_CF:-929}
LIMIT_EE=${LIMIT_EE:-2000}
.venv/bin/larimar bench memory --out "$OUT/bench_memory_cpu.json"
.venv/bin/larimar eval reconstruct --data "$DATA/wikipedia_en/enwiki_2018_validation.jsonl" --limit 200 \
  --wikitext "$DATA/wikitext103/wiki.valid.tokens" --out "$OUT/reconstruct"
.venv/bin/larimar eval counterfact --data "$DATA/counterfact_rome/counterfact_rome_929.json" --limit "$LIMIT_CF" \
  --methods larimar,none --protocol counterfact_prob --out "$OUT/counterfact_rome"
.venv/bin/larimar eval counterfact --data "$DATA/counterfact_easyedit/counterfact-edit.json" --limit "$LIMIT_EE" \
  --methods larimar,none --protocol counterfact_prob --out "$OUT/counterfact_easyedit"
