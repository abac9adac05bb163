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


# ---------------------------------------------------------------------------------------------
# The matrix: every architecture of the table, exact at full rank through transformers
# ---------------------------------------------------------------------------------------------

from tests.compress import architectures  # noqa: E402

FULL_RANK = ["--full-rank", "--calib-windows", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress",
             "--recover-steps", "0"]


def test_the_matrix_covers_the_table():
    assert set(architectures.MATRIX) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(architectures.MATRIX))
def test_full_rank_checkpoint_equals_the_dense_model_in_transformers(arch, tmp_path, text_file):
    import torch

    from compress.models import load_model
    from soco_serve.hf import LowRankLinear, load_soco_model
    from soco_serve.layout import CheckpointReader

    src = architectures.make(arch, tmp_path / "dense")
    dense = load_model(str(src))[0]
    n_linears = dense.config.num_hidden_layers * len(ARCHITECTURES[arch].linears)
    # Longer than the sliding windows, so sliding and global layers see different masks.
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense(input_ids=ids).logits
    for method in ("svd-llm", "basis-sharing"):
        out = tmp_path / method
        evaluation = ["--eval-text", str(text_file), "--eval-windows", "2"] if method == "svd-llm" else ["--no-eval"]
        assert main([str(src), "-o", str(out), "--method", method, *FULL_RANK, "--calib-text", str(text_file),
                     *evaluation]) == 0
        kinds = [e.kind for e in CheckpointReader(out).manifest.linears.values()]
        assert len(kinds) == n_linears
        assert set(kinds) == ({"lowrank"} if method == "svd-llm" else {"lowrank", "shared"}), kinds
        comp = load_soco_model(out)
        assert comp.dtype == torch.float64
        assert sum(isinstance(m, LowRankLinear) for m in comp.modules()) == n_linears
        with torch.no_grad():
            got = comp(input_ids=ids).logits
        # Float64, except where transformers computes in float32 whatever the dtype (Gemma's norms,
        # some softmaxes): the factors' 1e-14 error flips float32 roundings there, which moves
        # these logits (of size ~3) by float32 round-off, up to ~1e-7. A wrong factor, row order
        # or mask moves them by orders of magnitude more.
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{arch} {method}")
        if method == "svd-llm":
            # The pipeline's perplexities walk the layers one at a time with the inputs captured for
            # each (a sliding-window layer's mask is not a global layer's): they equal the model's own.
            from compress import evaluate
            from compress.data import text_eval_windows

            report = json.loads((out / "report.json").read_text())
            windows = text_eval_windows(comp_tokenizer(out), str(text_file), 32, 2)
            assert report["ppl_dense"] == pytest.approx(evaluate.perplexity(dense, windows, progress=False).ppl, rel=1e-9)
            assert report["ppl_compressed"] == pytest.approx(evaluate.perplexity(comp, windows, progress=False).ppl,
                                                             rel=1e-9)


def comp_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
