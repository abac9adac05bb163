"""benchmarks/recovery.py on a tiny random Llama: local cells, the end-to-end curve, the plot, the cache."""

import json
import shutil

import pytest

from compress.recover import RecoverConfig
from tests.helpers import load_benchmark


@pytest.fixture
def bench(tmp_path, monkeypatch):
    return load_benchmark("recovery", tmp_path, monkeypatch)


def test_local_and_end_to_end_cells(bench, tiny_llama, tmp_path, capsys):
    argv = ["--model", str(tiny_llama), "--method", "svd-llm", "--ratio", "0.4", "--local-steps", "0,4",
            "--calib-windows", "8", "--batch-size", "2", "--seq-len", "64", "--eval-windows", "2",
            "--e2e-steps", "6", "--e2e-seq-len", "32", "--check-every", "3", "--name", "t", "--work", str(tmp_path / "w")]
    assert bench.main(argv) == 0
    res = json.loads((tmp_path / "recovery_t.json").read_text())
    # the default last-group loss (KL) is keyed apart from the hidden-loss cells the committed files hold
    assert set(res["cells"]) == {"local@0", "local@4 last=kl", "e2e"}
    assert res["dense"]["eval"] > 0 and res["dense"]["other"] > 0 and res["other_text"] == "pydoc"
    assert "recovery" not in res["cells"]["local@0"] and res["cells"]["local@4 last=kl"]["recovery"]["steps"] > 0
    e2e = res["cells"]["e2e"]
    assert [c["step"] for c in e2e["curve"]][:2] == [0, 3] and e2e["settings"]["windows"] == 16
    # Step 0 of the end-to-end curve is the truncation itself: the local@0 checkpoint.
    assert e2e["curve"][0]["ppl"] == pytest.approx(res["cells"]["local@0"]["ppl"], rel=1e-4)
    assert (tmp_path / "recovery_t.png").stat().st_size > 1000
    capsys.readouterr()
    assert bench.main(argv) == 0  # everything cached: no compressor run
    assert "== " not in capsys.readouterr().out

    # An end-to-end stage after the local one starts from local@4's checkpoint, which is reused ...
    assert bench.main([*argv, "--e2e-from", "4"]) == 0
    out = capsys.readouterr().out
    assert "== e2e after local@4 last=kl" in out and "== local@4" not in out
    res = json.loads((tmp_path / "recovery_t.json").read_text())
    after = res["cells"]["e2e after local@4 last=kl"]
    assert after["settings"]["from"] == "local@4 last=kl" and res["cells"]["e2e"] == e2e  # both kept
    assert after["curve"][0]["ppl"] == pytest.approx(res["cells"]["local@4 last=kl"]["ppl"], rel=1e-4)
    # ... and rebuilt when its folder holds another run (here: gone)
    shutil.rmtree(tmp_path / "w" / "t" / "local-4")
    assert bench.main([*argv, "--e2e-from", "4", "--e2e-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "== local@4 last=kl" in out and "== e2e after local@4 last=kl" in out



def test_learning_rates_add_cells_beside_the_default(bench, tiny_llama, tmp_path, capsys, monkeypatch):
    """The sweep's bookkeeping (the compressor runs are the first test's): one cell per steps, rate and
    last group's loss, the default rate and the hidden loss under the committed files' keys, every cell
    cached."""
    calls = []

    def local_cell(cfg, rc, windows):
        calls.append((rc.steps, rc.lr, rc.lr_scale, rc.last_loss, rc.kl_stride, rc.warmup))
        return {"ppl": 100.0 - rc.steps - 1e3 * rc.lr, "ppl_other": 200.0, "recover_seconds": rc.steps * 1.0}
    monkeypatch.setattr(bench, "local_cell", local_cell)
    argv = ["--model", str(tiny_llama), "--local-steps", "4", "--eval-windows", "2", "--seq-len", "64",
            "--e2e-steps", "0", "--name", "t", "--work", str(tmp_path / "w")]
    hidden = [*argv, "--last-loss", "hidden"]
    assert bench.main([*hidden, "--local-lr", f"{RecoverConfig.lr},2e-3"]) == 0
    d = RecoverConfig.lr
    # local@0 is the truncation: no loss of its own, one cell for every sweep
    assert calls == [(0, d, "rms", "hidden", 1, 0), (4, d, "rms", "hidden", 1, 0), (4, 2e-3, "rms", "hidden", 1, 0)]
    cells = json.loads((tmp_path / "recovery_t.json").read_text())["cells"]
    assert set(cells) == {"local@0", "local@4", "local@4 lr=0.002"}
    assert cells["local@4"]["lr"] == RecoverConfig.lr and cells["local@4 lr=0.002"]["lr"] == 2e-3
    assert (tmp_path / "recovery_t.png").stat().st_size > 1000
    assert bench.main([*hidden, "--local-lr", "2e-3"]) == 0  # cached, and the default-rate cell is kept
    assert len(calls) == 3
    assert set(json.loads((tmp_path / "recovery_t.json").read_text())["cells"]) == set(cells)
    assert bench.main([*hidden, "--local-lr", "2e-3", "--lr-scale", "none"]) == 0  # absolute rates: cells of their own
    assert calls[3:] == [(4, 2e-3, "none", "hidden", 1, 0)]
    cells = json.loads((tmp_path / "recovery_t.json").read_text())["cells"]
    assert cells["local@4 lr=0.002 scale=none"]["lr_scale"] == "none" and cells["local@4 lr=0.002"]["lr_scale"] == "rms"
    # the default loss (KL) and its stride: cells beside the hidden ones, each cached
    assert bench.main(argv) == 0 and bench.main([*argv, "--kl-stride", "4"]) == 0 and bench.main(argv) == 0
    assert calls[4:] == [(4, d, "rms", "kl", 1, 0), (4, d, "rms", "kl", 4, 0)]
    cells = json.loads((tmp_path / "recovery_t.json").read_text())["cells"]
    assert {"local@4", "local@4 last=kl", "local@4 last=kl stride=4"} <= set(cells)
    assert cells["local@4 last=kl stride=4"]["kl_stride"] == 4 and cells["local@4"]["last_loss"] == "hidden"
    assert bench.main([*argv, "--warmup", "2"]) == 0 and calls[6:] == [(4, d, "rms", "kl", 1, 2)]
    cells = json.loads((tmp_path / "recovery_t.json").read_text())["cells"]
    assert cells["local@4 last=kl warmup=2"]["warmup"] == 2 and cells["local@4 last=kl"]["warmup"] == 0
    assert bench.main([*argv, "--kl-groups", "3"]) == 0 and calls[7:] == [(4, d, "rms", "kl", 1, 0)]
    cells = json.loads((tmp_path / "recovery_t.json").read_text())["cells"]
    assert cells["local@4 last=kl groups=3"]["kl_groups"] == 3 and cells["local@4 last=kl"]["kl_groups"] == 1
    assert bench.main([*argv, "--kl-steps", "6"]) == 0 and calls[8:] == [(4, d, "rms", "kl", 1, 0)]
    cells = json.loads((tmp_path / "recovery_t.json").read_text())["cells"]
    assert cells["local@4 last=kl kl@6"]["kl_steps"] == 6 and cells["local@4 last=kl"]["kl_steps"] is None
