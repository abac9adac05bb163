"""The architecture matrix: one tiny random model per architecture of the table, built from a
config that exercises what the family adds to Llama (biases, q/k norms, fused weights, sliding
windows, soft-capping, multipliers), shared by the transformers and the vLLM side of the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import make_tiny_model

# head_dim 32: the smallest vLLM's CPU attention supports.
BASE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
# One sliding-window layer and one global layer; windows shorter than the test inputs, so the
# two layers really see different masks.
SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])

# architecture -> (transformers config name, config fields)
MATRIX: dict[str, tuple[str, dict]] = {
    "LlamaForCausalLM": ("llama", BASE),
    "MistralForCausalLM": ("mistral", {**BASE, "sliding_window": 8}),
    "Qwen2ForCausalLM": ("qwen2", BASE),
    "Qwen3ForCausalLM": ("qwen3", BASE),
    "Gemma2ForCausalLM": ("gemma2", {**BASE, **SLIDING, "attn_logit_softcapping": 30.0,
                                     "final_logit_softcapping": 20.0, "query_pre_attn_scalar": 32}),
    "Gemma3ForCausalLM": ("gemma3_text", {**BASE, **SLIDING, "query_pre_attn_scalar": 32,
                                          "final_logit_softcapping": 20.0}),
    "Olmo2ForCausalLM": ("olmo2", {k: v for k, v in BASE.items() if k != "head_dim"}),
    "GraniteForCausalLM": ("granite", {**{k: v for k, v in BASE.items() if k != "head_dim"},
                                       "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                       "attention_multiplier": 0.2, "logits_scaling": 2.0}),
    "StableLmForCausalLM": ("stablelm", {**{k: v for k, v in BASE.items() if k != "head_dim"},
                                         "use_qkv_bias": True}),
    "Phi3ForCausalLM": ("phi3", {k: v for k, v in BASE.items() if k != "head_dim"}),
    "GPTNeoXForCausalLM": ("gpt_neox", {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "max_position_embeddings": 256}),
    "FalconForCausalLM": ("falcon", {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "multi_query": True, "parallel_attn": True, "alibi": False,
                                     "new_decoder_architecture": False, "bias": False}),
}


def make(arch: str, path: Path, dtype: torch.dtype = torch.float64) -> Path:
    model_type, config = MATRIX[arch]
    out = make_tiny_model(path, model_type, dtype, seed=0, **config)
    import json

    got = json.loads((out / "config.json").read_text())["architectures"]
    assert got == [arch], (arch, got)
    return out
