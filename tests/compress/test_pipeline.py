"""The compressor end to end on tiny random Llamas: exactness, budget, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.cli import main
from compress.models import load_model
from compress.pipeline import CompressConfig
from soco_serve.hf import LowRankLinear, load_soco_model
from soco_serve.layout import CheckpointReader

COMMON = ["--calib-windows", "4", "--seq-len", "64", "--no-progress", "--recover-steps", "0"]


def _compress(src, out, *args, text=None, evaluate=False):
    argv = [str(src), "-o", str(out), *COMMON, *args]
    if text:
        argv += ["--calib-text", str(text), "--eval-text", str(text), "--eval-windows", "2"]
    if not evaluate:
        argv.append("--no-eval")
    assert main(argv) == 0
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["svd", "fwsvd", "asvd", "svd-llm", "basis-sharing"])
def test_full_rank_reproduces_dense_logits(tiny_llama_f64, text_file, tmp_path, method):
    out = _compress(tiny_llama_f64, tmp_path / method, "--method", method, "--full-rank", text=text_file)
    dense = load_model(str(tiny_llama_f64))[0]
    comp = load_soco_model(out)
    assert comp.dtype == torch.float64
    assert sum(isinstance(m, LowRankLinear) for m in comp.modules()) == 4 * 7
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(comp, ids), _logits(dense, ids), rtol=0, atol=1e-9)
    if method == "basis-sharing":
        # The coefficient update keeps a full-rank basis exact too, up to the conditioning of
        # its (ridged) normal equations.
        out = _compress(tiny_llama_f64, tmp_path / "refit", "--method", method, "--full-rank",
                        "--coefficient-update", "on", text=text_file)
        torch.testing.assert_close(_logits(load_soco_model(out), ids), _logits(dense, ids), rtol=0, atol=1e-4)


def test_evaluation_in_slices_of_positions_gives_the_same_perplexities(tiny_llama_f64, text_file, tmp_path,
                                                                       monkeypatch):
    """With a vocabulary too large for whole windows' logits the streamed evaluation runs the head
    on slices of positions (the last one shorter here); the perplexities equal the one-piece ones."""
    from compress import calibrate, evaluate

    def report(out):
        out = _compress(tiny_llama_f64, out, "--method", "svd-llm", "--ratio", "0.4", text=text_file, evaluate=True)
        return json.loads((out / "report.json").read_text())

    one = report(tmp_path / "one")
    vocab = json.loads((tiny_llama_f64 / "config.json").read_text())["vocab_size"]
    monkeypatch.setattr(calibrate, "LOGITS_SLICE_BYTES", 4 * evaluate.BATCH_SIZE * vocab * 5)
    seen, real = [], calibrate.head_logits

    def counted(model, spec, ids, hidden):
        assert ids.shape[1] == hidden.shape[1]
        seen.append(hidden.shape[1])
        return real(model, spec, ids, hidden)

    monkeypatch.setattr(calibrate, "head_logits", counted)
    sliced = report(tmp_path / "sliced")
    assert max(seen) == 5 and 63 % 5 in seen  # 63 predicting positions of a 64-token window
    assert one["ppl_dense"] == pytest.approx(sliced["ppl_dense"], rel=1e-12)  # float64 sums per token
    assert one["ppl_compressed"] == pytest.approx(sliced["ppl_compressed"], rel=1e-12)
    assert one["ppl_compressed"] > one["ppl_dense"] > 1


@pytest.mark.parametrize("method,extra", [("svd-llm", []), ("asvd", ["--asvd-alpha", "1"]), ("fwsvd", []),
                                          ("basis-sharing", ["--group-size", "2"]),
                                          ("basis-sharing", ["--group-size", "3", "--coefficient-update", "on"])])
def test_checkpoint_matches_budget_and_stores_bases_once(tiny_llama, text_file, tmp_path, method, extra):
    out = _compress(tiny_llama, tmp_path / "ck", "--method", method, "--ratio", "0.4", *extra,
                    text=text_file, evaluate=True)
    reader = CheckpointReader(out)
    m = reader.manifest
    stored = sum(t.numel() for n, t in reader.items()
                 if n.endswith((".lowrank_u", ".lowrank_v")) or n.startswith("soco_bases.")
                 or (n.endswith(".weight") and n.rpartition(".")[0] in m.linears))
    assert stored == m.stored_linear_params()
    assert m.achieved_ratio == pytest.approx(1 - stored / m.dense_linear_params(), abs=1e-6)
    assert abs(m.achieved_ratio - 0.4) < 0.02  # tiny matrices: ranks are coarse; real model test is 0.5 pp
    report = json.loads((out / "report.json").read_text())
    for key in ("method", "target_ratio", "achieved_ratio", "model_ratio", "ppl_dense", "ppl_compressed",
                "eval_tokens", "ranks", "seconds"):
        assert key in report
    assert (out / "ranks.png").stat().st_size > 1000
    if method == "basis-sharing":
        model = load_soco_model(out)
        qs = [layer.self_attn.q_proj for layer in model.model.layers]
        assert qs[0].v is qs[1].v  # one tensor in memory for the group
        names = [n for n in reader.names() if n.startswith("soco_bases.q.")]
        assert len(names) == len(m.bases) // 5


def test_coefficient_update_refits_only_the_shared_coefficients(tiny_llama, text_file, tmp_path):
    # Its effect on quality is measured on the real model (benchmarks/quality.py); here: it runs,
    # is recorded, changes the shared coefficients and nothing else.
    readers = {}
    for mode in ("off", "on"):
        out = _compress(tiny_llama, tmp_path / mode, "--method", "basis-sharing", "--ratio", "0.6",
                        "--coefficient-update", mode, text=text_file)
        readers[mode] = CheckpointReader(out)
        assert readers[mode].manifest.settings["coefficient_update"] is (mode == "on")
    off, on = readers["off"], readers["on"]
    for name in off.names():
        same = torch.equal(off.get(name), on.get(name))
        shared_u = name.endswith(".lowrank_u") and off.manifest.linears[name.rpartition(".")[0]].kind == "shared"
        assert same != shared_u, name


@pytest.mark.parametrize("method, mode, full_rank, refit", [
    ("basis-sharing", "auto", False, True),  # the default, at every ratio
    ("basis-sharing", "auto", True, False),  # full-rank factors are exact: nothing to refit
    ("basis-sharing", "on", True, True),
    ("basis-sharing", "off", False, False),  # the paper's released code
    ("svd-llm", "on", False, False),  # private factors: no shared coefficients
])
def test_coefficient_update_modes(method, mode, full_rank, refit, tmp_path):
    for ratio in (0.2, 0.5):
        cfg = CompressConfig(model=None, output=tmp_path, method=method, ratio=ratio,
                             coefficient_update=mode, full_rank=full_rank)
        assert cfg.refit is refit


def _fails(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_bad_inputs(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    _fails([str(tmp_path / "nope"), "-o", str(out)], capsys, "nope: model folder not found")
    _fails([str(tmp_path), "-o", str(out)], capsys, "no config.json")
    _fails([str(tiny_llama), "-o", str(out), "--ratio", "1.2"], capsys, "--ratio must be in (0, 1)")
    _fails([str(tiny_llama), "-o", str(out), "--group-size", "9", "--calib-text", str(text_file), *COMMON],
           capsys, "--group-size must be between 1 and the model's 4 layers")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails([str(tiny_llama), "-o", str(out), "--calib-text", str(empty), *COMMON], capsys, "empty.txt: text file is empty")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _fails([str(tiny_llama), "-o", str(out), "--calib-text", str(short), *COMMON], capsys,
           "calibration text has 2 tokens, fewer than one window of 64")
    (tmp_path / "taken").mkdir()
    _fails([str(tiny_llama), "-o", str(tmp_path / "taken"), *COMMON], capsys, "exists; pass --force")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "short.txt", "taken"]


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    from tests.helpers import make_tiny_llama  # noqa: F401  (tokenizer from the default model)
    from transformers import AutoTokenizer

    from compress.models import default_model_dir

    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(tmp_path / "gpt2")
    _fails([str(tmp_path / "gpt2"), "-o", str(tmp_path / "o")], capsys, "unsupported architecture 'GPT2LMHeadModel'",
           "q_proj")


def test_nan_weights(tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    _fails([str(bad), "-o", str(tmp_path / "o")], capsys, "'model.layers.1.mlp.up_proj.weight' contains NaN or Inf")


def test_truncated_model_weights(tiny_llama, tmp_path, capsys):
    import shutil

    bad = tmp_path / "cut"
    shutil.copytree(tiny_llama, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails([str(bad), "-o", str(tmp_path / "o")], capsys,
           f"{bad}/model.safetensors: truncated or corrupt safetensors file")
    assert not (tmp_path / "o").exists()


def test_nan_gram_statistics_are_refused():
    from compress.calibrate import CalibrationError, GramSet, GramStat

    grams = GramSet({(3, "mlp_in"): GramStat(torch.full((2, 2), float("nan"), dtype=torch.float64),
                                                torch.zeros(2, dtype=torch.float64), tokens=5)})
    with pytest.raises(CalibrationError, match="layer 3 site 'mlp_in': Gram statistics contain NaN or Inf"):
        grams.check()


def test_info_and_eval_commands(tiny_llama, text_file, tmp_path, capsys):
    out = _compress(tiny_llama, tmp_path / "ck", "--method", "svd-llm", text=text_file)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "svd-llm" in info and "28 lowrank" in info
    assert main(["eval", str(out), "--eval-text", str(text_file), "--seq-len", "64", "--eval-windows", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["eval_tokens"] == 2 * 63 and res["ppl"] > 1


def test_timer_names_the_stage_that_set_the_peak_rss(tmp_path):
    # a fresh process, so that the peak is this test's and not an earlier test's
    code = """
import torch
from compress.pipeline import Timer
t = Timer()
with t.stage("small"):
    torch.ones(1 << 20)
with t.stage("outer"):
    with t.stage("big"):
        x = torch.ones(1 << 27)  # 512 MiB, touched
        del x
    torch.ones(1 << 20)
with t.stage("after"):
    torch.ones(1 << 20)
print(t.peak_stage)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "big"
