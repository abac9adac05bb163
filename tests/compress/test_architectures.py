"""Every architecture of the table, compressed and loaded; models the table cannot handle refused
at once, with the names that tell the user why."""

from __future__ import annotations

import json

import pytest

from compress import calibrate, pipeline
from compress.cli import main
from compress.models import ARCHITECTURES
from tests.helpers import make_tiny_model

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=128)


@pytest.fixture
def no_calibration(monkeypatch):
    """Calibration and capture fail the test if reached: refusals must come before any such work."""
    def reached(*a, **k):
        raise AssertionError("calibration work started before the model was refused")

    monkeypatch.setattr(pipeline, "calibration_windows", reached)
    monkeypatch.setattr(calibrate, "layer_inputs", reached)


def _refused(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_known_architecture_with_other_modules_is_refused_naming_expected_and_found(tmp_path, capsys, no_calibration):
    # A Llama whose config.json claims Phi-3: the table expects Phi-3's fused qkv_proj, the model has q/k/v.
    src = make_tiny_model(tmp_path / "m", "llama", **SMALL)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["Phi3ForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    err = _refused([str(src), "-o", str(tmp_path / "o"), "--no-progress"], capsys, "Phi3ForCausalLM",
                   "has no module 'self_attn.qkv_proj'", "'self_attn.qkv_proj'", "'mlp.gate_up_proj'",  # expected
                   "'self_attn.q_proj'", "'self_attn.k_proj'", "'mlp.gate_proj'",  # found
                   "Supported architectures:")
    assert all(a in err for a in ARCHITECTURES), err
    assert not (tmp_path / "o").exists()


def test_unknown_architecture_is_refused_naming_what_it_found(tmp_path, capsys, no_calibration):
    src = make_tiny_model(tmp_path / "gpt2", "gpt2", n_layer=2, n_embd=32, n_head=2)
    err = _refused([str(src), "-o", str(tmp_path / "o"), "--no-progress"], capsys,
                   "unsupported architecture 'GPT2LMHeadModel'", "found decoder layers at 'transformer.h.N'",
                   "'attn.c_attn'", "'mlp.c_proj'",  # found (GPT-2's Conv1D weights)
                   "'self_attn.q_proj'", "'self_attn.qkv_proj'", "'attention.query_key_value'")  # expected layouts
    assert all(a in err for a in ARCHITECTURES), err


def test_mixture_of_experts_is_refused(tmp_path, capsys, no_calibration):
    src = make_tiny_model(tmp_path / "moe", "mixtral", num_local_experts=2, num_experts_per_tok=1, **SMALL)
    err = _refused([str(src), "-o", str(tmp_path / "o"), "--no-progress"], capsys,
                   "MixtralForCausalLM is a mixture-of-experts model", "num_local_experts=2", "dense decoder-only")
    assert all(a in err for a in ARCHITECTURES), err
