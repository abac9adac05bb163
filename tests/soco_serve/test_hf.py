"""``AutoModelForCausalLM.from_pretrained(dir)`` on soco checkpoints, after ``import soco_serve``.

Checkpoints are made by the real compressor from tiny random Llamas: private factors (with
biases and an untied head) and shared bases (tied head). ``from_pretrained`` must give the very
model :func:`load_soco_model` gives (same modules, logits equal to the bit), hold a shared basis
once, and plain transformers, without soco-serve, must refuse the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

import soco_serve  # noqa: F401  (registers the soco quantizer with transformers)
from compress.cli import main
from compress.models import load_model
from soco_serve.hf import LowRankLinear, SocoHfQuantizer, load_soco_model
from soco_serve.layout import CONFIG_FILE, FORMAT_VERSION, MANIFEST_FILE, CheckpointError, CheckpointReader
from tests.helpers import as_format_1, make_tiny_llama

COMMON = ["--calib-windows", "4", "--seq-len", "64", "--no-progress", "--recover-steps", "0", "--no-eval"]
IDS = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))


def compress(src: Path, out: Path, *args: str) -> Path:
    assert main([str(src), "-o", str(out), *COMMON, *args]) == 0
    return out


@pytest.fixture(scope="module")
def private_ckpt(tmp_path_factory) -> Path:
    """Private factors only; q/k/v/o carry biases; the head is not tied to the embeddings."""
    root = tmp_path_factory.mktemp("hf-private")
    src = make_tiny_llama(root / "src", attention_bias=True, tie_word_embeddings=False)
    return compress(src, root / "ck", "--method", "svd-llm", "--ratio", "0.4")


@pytest.fixture(scope="module")
def shared_ckpt(tmp_path_factory) -> Path:
    """Shared bases for every q/k/v/gate/up pair of layers; o and down private; tied head."""
    root = tmp_path_factory.mktemp("hf-shared")
    return compress(make_tiny_llama(root / "src"), root / "ck", "--method", "basis-sharing", "--ratio", "0.4",
                    "--group-size", "2")


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("which", ["private", "shared"])
def test_from_pretrained_is_the_soco_model(which, private_ckpt, shared_ckpt):
    ckpt = private_ckpt if which == "private" else shared_ckpt
    m = CheckpointReader(ckpt).manifest
    assert json.loads((ckpt / CONFIG_FILE).read_text())["quantization_config"] == {
        "quant_method": "soco", "format_version": FORMAT_VERSION}
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    ref = load_soco_model(ckpt)
    assert isinstance(model.hf_quantizer, SocoHfQuantizer) and model.dtype == ref.dtype == torch.float32
    assert sum(isinstance(x, LowRankLinear) for x in model.modules()) == len(m.linears) == 4 * 7
    assert torch.equal(logits(model), logits(ref))
    # What is held is what the checkpoint stores: a shared basis once for its group, nothing random.
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    layers = model.model.layers
    if which == "shared":
        assert m.bases and all(e.kind == "shared" for n, e in m.linears.items() if "q_proj" in n)
        assert layers[0].self_attn.q_proj.v is layers[1].self_attn.q_proj.v
        assert layers[0].mlp.up_proj.v is layers[1].mlp.up_proj.v
        assert layers[1].mlp.up_proj.v is not layers[2].mlp.up_proj.v
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert not m.bases and layers[0].self_attn.q_proj.bias is not None
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    generated = model.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, ref.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False))


def test_full_rank_from_pretrained_is_the_dense_model(tiny_llama_f64, tmp_path):
    ckpt = compress(tiny_llama_f64, tmp_path / "full", "--method", "svd", "--full-rank")
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.dtype == torch.float64
    torch.testing.assert_close(logits(model), logits(load_model(str(tiny_llama_f64))[0]), rtol=0, atol=1e-9)


def test_dtype_device_map_and_base_model(shared_ckpt):
    model = AutoModelForCausalLM.from_pretrained(shared_ckpt, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(logits(model), logits(load_soco_model(shared_ckpt, dtype=torch.bfloat16)))
    # The base model (no head) finds the manifest's layers without the causal LM's prefix.
    base = AutoModel.from_pretrained(shared_ckpt)
    assert base.layers[0].self_attn.k_proj.v is base.layers[1].self_attn.k_proj.v
    with torch.no_grad():
        hidden = base(input_ids=IDS).last_hidden_state
        assert torch.equal(hidden, load_soco_model(shared_ckpt).model(input_ids=IDS).last_hidden_state)


def test_save_pretrained_is_refused(shared_ckpt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(shared_ckpt)
    with pytest.raises(ValueError, match="quantized with soco and is not serializable"):
        model.save_pretrained(tmp_path / "resaved")


# Plain transformers, in a fresh interpreter that never imports soco_serve.
PLAIN = """
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as exc:
    print(f"REFUSED {type(exc).__name__}: {exc}")
else:
    print("LOADED")
assert "soco_serve" not in sys.modules, "soco_serve was imported"
"""


def test_plain_transformers_refuses_a_soco_checkpoint(shared_ckpt, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", PLAIN, str(shared_ckpt)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # transformers warns that it does not know the method, then finds no weights it could load.
    assert "Unknown quantization type, got soco" in run.stderr
    assert "REFUSED OSError" in run.stdout and "no file named model.safetensors" in run.stdout, run.stdout


def test_format_1_still_loads_with_load_soco_model(shared_ckpt, tmp_path):
    v1 = as_format_1(shared_ckpt, tmp_path / "v1")
    assert CheckpointReader(v1).manifest.format_version == 1
    assert torch.equal(logits(load_soco_model(v1)), logits(load_soco_model(shared_ckpt)))
    # Format 1 never named its loader in config.json: from_pretrained finds no weights, loads nothing.
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(v1)


def test_newer_format_is_refused(shared_ckpt, tmp_path):
    newer = FORMAT_VERSION + 1
    bad_config = shutil.copytree(shared_ckpt, tmp_path / "config")
    config = json.loads((bad_config / CONFIG_FILE).read_text())
    config["quantization_config"]["format_version"] = newer
    (bad_config / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json: quantization_config: unknown format_version {newer}"):
        AutoModelForCausalLM.from_pretrained(bad_config)
    bad_manifest = shutil.copytree(shared_ckpt, tmp_path / "manifest")
    manifest = json.loads((bad_manifest / MANIFEST_FILE).read_text())
    manifest["format_version"] = newer
    (bad_manifest / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"soco_manifest.json: unknown format_version {newer}"):
        AutoModelForCausalLM.from_pretrained(bad_manifest)


def test_manifest_that_disagrees_with_the_model_is_refused(private_ckpt, tmp_path):
    bad = shutil.copytree(private_ckpt, tmp_path / "bad")
    config = json.loads((bad / CONFIG_FILE).read_text())
    config["intermediate_size"] = 384  # the manifest's MLP linears are 512 wide
    (bad / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"linears\['model.layers.0.mlp.gate_proj'\] is \[512, 256\], "
                                              r"but the model's 'model.layers.0.mlp.gate_proj' \(Linear\) is \[384, 256\]"):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.integration
def test_real_model_perplexity_through_from_pretrained_equals_soco_compress_eval(tmp_path, capsys):
    """The real default model with shared bases: ``from_pretrained`` scores the evaluation windows
    exactly as ``soco-compress eval`` does (which loads with load_soco_model)."""
    from transformers import AutoTokenizer

    from compress import data, evaluate

    out = tmp_path / "bs-0.3"
    assert main(["-o", str(out), "--method", "basis-sharing", "--ratio", "0.3", "--shared-types", "q,k,v,gate",
                 "--calib-windows", "8", "--seq-len", "256", "--no-eval", "--no-progress", "--recover-steps", "0"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--eval-windows", "8", "--seq-len", "256", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert CheckpointReader(out).manifest.bases and isinstance(model.hf_quantizer, SocoHfQuantizer)
    windows = data.text_eval_windows(AutoTokenizer.from_pretrained(out), None, 256, 8)
    got = evaluate.perplexity(model, windows, batch_size=2, progress=False)
    assert (got.ppl, got.tokens, got.windows) == (cli["ppl"], cli["eval_tokens"], cli["windows"])
