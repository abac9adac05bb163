"""Small builders shared by the tests: tiny random Llamas saved as real Hugging Face folders."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import torch

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)


def make_tiny_llama(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
    """A random LlamaForCausalLM with the default model's tokenizer, saved to ``path``."""
    return make_tiny_model(path, "llama", dtype, seed, **{**TINY, **overrides})


def make_tiny_model(path: Path, model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                    tokenizer: object = None, **config) -> Path:
    """A random causal LM of ``model_type`` (a transformers config name) built from ``config``,
    saved to ``path`` as safetensors with a tokenizer (the default model's unless given)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from compress.models import default_model_dir

    tok = tokenizer or AutoTokenizer.from_pretrained(default_model_dir())
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), **{"tie_word_embeddings": True, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.config.architectures = [type(model).__name__]
    # Random init leaves the norms at 1 and the activations tiny; spread the weights a little so
    # low-rank truncation visibly matters.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    model.config.dtype = dtype
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def as_format_1(ckpt: Path, dst: Path) -> Path:
    """A copy of a soco checkpoint as format 1 wrote it: the manifest says version 1 and config.json
    has no quantization_config (the tensors and the rest of the manifest are the same in both)."""
    import json
    import shutil

    from soco_serve.layout import CONFIG_FILE, MANIFEST_FILE

    shutil.copytree(ckpt, dst)
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    config = json.loads((dst / CONFIG_FILE).read_text())
    assert manifest["format_version"] == 2 and config.pop("quantization_config")["quant_method"] == "soco"
    manifest["format_version"] = 1
    (dst / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return dst


def import_benchmark(name: str) -> ModuleType:
    """``benchmarks.<name>``, imported as a package module like ``python -m benchmarks.<name>`` runs it."""
    return importlib.import_module(f"benchmarks.{name}")


def load_benchmark(name: str, results, monkeypatch):
    """``benchmarks/<name>.py`` as a module whose result files go to ``results``."""
    module = import_benchmark(name)
    monkeypatch.setattr(module, "RESULTS", results)
    return module
