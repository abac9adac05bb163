"""The real default model (SmolLM2-135M-Instruct) on the real default text, small calibration."""

import json

import pytest

from compress.cli import main
from soco_serve.hf import load_soco_model
from soco_serve.layout import CheckpointReader

pytestmark = pytest.mark.integration


def test_real_model_svd_llm(tmp_path):
    out = tmp_path / "svd-llm-0.3"
    assert main(["-o", str(out), "--method", "svd-llm", "--ratio", "0.3", "--calib-windows", "8",
                 "--seq-len", "256", "--eval-windows", "8", "--no-progress", "--recover-steps", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert abs(report["achieved_ratio"] - 0.3) < 0.005
    assert 0.2 < report["model_ratio"] < report["achieved_ratio"]  # embeddings are untouched
    assert report["eval_tokens"] == 8 * 255
    # The dequantized SmolLM2 is a real model: its perplexity on Wikipedia is in the tens; the
    # compressed one is worse but far from the thousands of plain SVD.
    assert 10 < report["ppl_dense"] < 60
    assert report["ppl_dense"] < report["ppl_compressed"] < 50 * report["ppl_dense"]
    m = CheckpointReader(out).manifest
    assert m.architecture == "LlamaForCausalLM" and len(m.linears) == 30 * 7
    assert set(report["ranks"]) == {str(i) for i in range(30)}
    model = load_soco_model(out)
    assert sum(p.numel() for p in model.parameters()) == report["model_params"]["stored"]


def test_real_model_recovery_lowers_perplexity(tmp_path):
    """Recovery on the real model and text: a held-out loss that falls in most groups and a lower
    perplexity than the same truncation without it (same calibration windows)."""
    common = ["--method", "svd-llm", "--ratio", "0.4", "--calib-windows", "8", "--batch-size", "2", "--seq-len", "256",
              "--eval-windows", "8", "--no-progress"]
    assert main(["-o", str(tmp_path / "plain"), *common, "--recover-steps", "0"]) == 0
    assert main(["-o", str(tmp_path / "rec"), *common, "--recover-steps", "12"]) == 0
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    rec = json.loads((tmp_path / "rec" / "report.json").read_text())
    groups = rec["recovery"]["per_group"].values()
    assert sum(g["val_after"] < g["val_before"] for g in groups) >= 20
    assert rec["ranks"] == plain["ranks"] and rec["achieved_ratio"] == plain["achieved_ratio"]
    assert rec["ppl_compressed"] < 0.9 * plain["ppl_compressed"]
