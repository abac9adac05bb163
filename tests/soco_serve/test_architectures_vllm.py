"""The architecture matrix in vLLM: each table entry's tiny random model, compressed at full rank on
shared bases (fused vLLM layers then mix shared q/k/v or gate/up with private o and down; a weight
fused in the source is one factorization), served with ``load_format="soco"``, generates the dense
model's greedy tokens. One process per architecture runs both engines
(:mod:`tests.soco_serve.vllm_greedy`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compress.cli import main
from soco_serve.layout import CheckpointReader
from tests.compress import architectures

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arch", sorted(architectures.MATRIX))
def test_full_rank_checkpoint_generates_the_dense_models_greedy_tokens(arch, tmp_path, text_file):
    src = architectures.make(arch, tmp_path / "dense")
    ckpt = tmp_path / "soco"
    assert main([str(src), "-o", str(ckpt), "--method", "basis-sharing", "--full-rank", "--dtype", "float32",
                 "--calib-windows", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress", "--recover-steps", "0",
                 "--no-eval", "--calib-text", str(text_file)]) == 0
    out = tmp_path / "greedy.json"
    run = subprocess.run([sys.executable, "-m", "tests.soco_serve.vllm_greedy", str(src), str(ckpt), str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    # Served low-rank, not dense: every vLLM linear of both layers (q/k/v, o, gate/up or up, down:
    # four per layer in each architecture of the matrix) took the soco method, the bases held once.
    bases = len(CheckpointReader(ckpt).manifest.bases)
    assert f"soco: 8 low-rank layers, {bases} shared bases" in run.stdout + run.stderr
    got = json.loads(out.read_text())
    assert len(got["dense"]) == len(got["soco"]) == 2
    for dense, soco in zip(got["dense"], got["soco"]):
        assert len(dense["tokens"]) == 12
        assert soco["tokens"] == dense["tokens"]
        # float32 in vLLM: the factors of a full-rank checkpoint give the dense products up to
        # float32 round-off, so log-probabilities agree to that (a wrong factor moves them by far more)
        assert max(abs(a - b) for a, b in zip(dense["logprobs"], soco["logprobs"])) < 1e-4
