"""Small builders shared by the tests: tiny random Llamas saved as real Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)


def make_tiny_llama(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
    """A random LlamaForCausalLM with the default model's tokenizer, saved to ``path``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compress.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
                      **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
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


def load_benchmark(name: str, results, monkeypatch):
    """``benchmarks/<name>.py`` as a module whose result files go to ``results``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench", Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", results)
    return module
