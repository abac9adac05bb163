#!/usr/bin/env bash
# The compressor on an NVIDIA GPU (--device cuda), in one run sized for a lent GPU machine (it has
# torch, transformers and pytest but neither the default model's package nor gensim):
#   1. the compressor's GPU test (tests/compress/test_streaming.py -k cuda: a checkpoint written on
#      the GPU computes what the CPU's does);
#   2. benchmarks/scale.py --device cuda: Llama-3-8B-shaped svd-llm at 1, 2, 4 and 8 layers, a
#      Llama-3-70B-shaped basis-sharing group, Llama-3-8B-shaped soco at 2 layers (cached cell by
#      cell in benchmarks/results/scale_<NAME>.json, so a rerun continues).
# Prepare here, where the default model and text are cached, then carry the folder:
#   bash benchmarks/gpu_compress.sh --prepare      # fills .gpucache/ (git-ignored, about 7 MB)
#   (on the GPU machine, carrying .gpucache) OUT=/tmp/gpu bash benchmarks/gpu_compress.sh
# Results and the log go to $OUT (default benchmarks/results); NAME defaults to h200.
set -uo pipefail
cd "$(dirname "$0")/.."
cache=.gpucache
if [ "${1:-}" = --prepare ]; then
    py=${PYTHON:-.venv/bin/python}
    # the default text (compress.data caches it as JSON) and the default model's tokenizer and
    # config (the tiny test models borrow its tokenizer; no weights are needed)
    "$py" - "$cache" <<'PY'
import shutil, sys
from pathlib import Path
from compress.data import wiki_articles
from compress.models import DEFAULT_MODEL_NAME, cache_dir, default_model_dir
from benchmarks.scale import tokenizer_dir

out = Path(sys.argv[1])
wiki_articles()  # cached under cache_dir()
src = default_model_dir()
(out / DEFAULT_MODEL_NAME).mkdir(parents=True, exist_ok=True)
shutil.copy(cache_dir() / "wiki_sample_articles.json", out)
for f in src.iterdir():
    if f.is_file() and f.suffix != ".safetensors":
        shutil.copy(f, out / DEFAULT_MODEL_NAME)
tokenizer_dir(out / "scale")
print(f"prepared {out}: carry it to the GPU machine")
PY
    exit $?
fi
[ -d "$cache" ] || { echo "$cache/ is missing: run 'bash benchmarks/gpu_compress.sh --prepare' first and carry it"; exit 2; }
out=${OUT:-benchmarks/results}
name=${NAME:-h200}
py=${PYTHON:-python3}
mkdir -p "$out" /tmp/soco-scale
cp -r "$cache/scale/tokenizer" /tmp/soco-scale/
export PYTHONUNBUFFERED=1 SOCO_CACHE_DIR=$PWD/$cache
source benchmarks/gpu_steps.sh
scale() { step "$1" "$py" -m benchmarks.scale --device cuda --name "$name" "${@:2}"; cp "benchmarks/results/scale_$name".* "$out"/ 2>/dev/null; }
{
    step 90 "$py" -m pytest -q -ra -p no:cacheprovider tests/compress/test_streaming.py -k cuda \
        --junitxml "$out/gpu_compress_tests.xml"
    scale 200 --shapes llama3-8b --layers 1,2,4,8 --methods svd-llm
    scale 120 --shapes llama3-70b --layers 2 --methods basis-sharing
    scale 150 --shapes llama3-8b --layers 2 --methods soco
} 2>&1 | tee "$out/gpu_compress.log"
