"""benchmarks/recovery.py on a tiny random Llama: local cells, the end-to-end curve, the plot, the cache."""

import json

import pytest

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
    assert set(res["cells"]) == {"local@0", "local@4", "e2e"}
    assert res["dense"]["eval"] > 0 and res["dense"]["other"] > 0 and res["other_text"] == "pydoc"
    assert "recovery" not in res["cells"]["local@0"] and res["cells"]["local@4"]["recovery"]["steps"] > 0
    e2e = res["cells"]["e2e"]
    assert [c["step"] for c in e2e["curve"]][:2] == [0, 3] and e2e["settings"]["windows"] == 16
    # Step 0 of the end-to-end curve is the truncation itself: the local@0 checkpoint.
    assert e2e["curve"][0]["ppl"] == pytest.approx(res["cells"]["local@0"]["ppl"], rel=1e-4)
    assert (tmp_path / "recovery_t.png").stat().st_size > 1000
    capsys.readouterr()
    assert bench.main(argv) == 0  # everything cached: no compressor run
    assert "== " not in capsys.readouterr().out
