"""benchmarks/real_model.py's cells on a tiny random model (``--no-serve``: the serving half is
tests/soco_serve's): one soco run fills a cell per ratio, and finished cells are not recompressed."""

import json

import pytest

from compress.recover import DEFAULT_STEPS
from tests.helpers import load_benchmark


def test_one_soco_run_fills_every_ratios_cell_and_cells_are_cached(tiny_llama, tmp_path, monkeypatch, capsys):
    real = load_benchmark("real_model", tmp_path / "results", monkeypatch)
    argv = [str(tiny_llama), "--name", "t", "--cells", "soco@0.2+0.3,svd-llm@0.3", "--soco-steps", "1",
            "--calib-windows", "2", "--eval-windows", "1", "--seq-len", "64", "--no-serve", "--out", str(tmp_path)]
    assert real.main(argv) == 0
    err = capsys.readouterr().err  # the compressor's progress, passed through as it ran
    assert "compress (soco)" in err and "compress (svd-llm)" in err and "PEAK_RSS_KIB" in err
    cells = json.loads((tmp_path / "results" / "real_t.json").read_text())["cells"]
    assert sorted(cells) == ["soco@0.2", "soco@0.3", "svd-llm@0.3"]
    for key, ratio in (("soco@0.2", 0.2), ("soco@0.3", 0.3), ("svd-llm@0.3", 0.3)):
        assert "error" not in cells[key], cells[key].get("error")
        assert abs(cells[key]["report"]["achieved_ratio"] - ratio) < 0.02, key
    soco = [cells["soco@0.2"], cells["soco@0.3"]]
    assert all(c["report"]["trained_with"] == "soco@0.2+0.3" and c["report"]["soco_steps"] == 1 for c in soco)
    assert soco[0]["wall_seconds"] == soco[1]["wall_seconds"]  # one run
    for c, ratio in zip(soco, (0.2, 0.3)):  # where the budget went, per ratio
        assert ratio <= c["report"]["soco"]["prune"]["ratio"] == pytest.approx(c["report"]["achieved_ratio"], abs=1e-5)
        assert c["report"]["soco"]["stages"] and "soco" not in cells["svd-llm@0.3"]["report"]
    assert soco[0]["report"]["ppl_compressed"] != soco[1]["report"]["ppl_compressed"]
    assert "soco_steps" not in cells["svd-llm@0.3"]["report"]
    assert (tmp_path / "t" / "soco-0.2+0.3" / "ratio-0.2" / "report.json").exists()
    mtime = (tmp_path / "results" / "real_t.json").stat().st_mtime_ns
    assert real.main(argv) == 0  # every cell cached: nothing recompressed, nothing rewritten
    assert (tmp_path / "results" / "real_t.json").stat().st_mtime_ns == mtime


def test_compressor_options_reach_the_run_and_the_cell(tiny_llama, tmp_path, monkeypatch, capsys):
    real = load_benchmark("real_model", tmp_path / "results", monkeypatch)
    opts = "--recover-steps 2 --recover-kl-stride 4"
    assert real.main([str(tiny_llama), "--name", "t", "--cells", "svd-llm+recover@0.3", "--compress-args", opts,
                      "--calib-windows", "8", "--eval-windows", "1", "--seq-len", "64", "--no-serve",
                      "--no-progress", "--out", str(tmp_path)]) == 0
    assert "compress (" not in capsys.readouterr().err
    rep = json.loads((tmp_path / "results" / "real_t.json").read_text())["cells"]["svd-llm+recover@0.3"]["report"]
    assert rep["compress_args"] == opts
    assert rep["recover_settings"]["steps"] == 2 and rep["recover_settings"]["kl_stride"] == 4


def test_a_second_text_is_evaluated_like_the_compressors_own_evaluation(tiny_llama, text_file, tmp_path, monkeypatch,
                                                                         capsys):
    real = load_benchmark("real_model", tmp_path / "results", monkeypatch)
    base = [str(tiny_llama), "--name", "t", "--calib-windows", "2", "--eval-windows", "2", "--seq-len", "64",
            "--no-serve", "--out", str(tmp_path)]
    # one cell evaluated by the compressor itself on that text; another whose checkpoint is then removed
    assert real.main([*base, "--cells", "svd-llm@0.3", "--compress-args", f"--eval-text {text_file}"]) == 0
    assert real.main([*base, "--cells", "svd@0.3"]) == 0
    (tmp_path / "t" / "svd-0.3" / "report.json").unlink()
    capsys.readouterr()
    assert real.main([*base, "--cells", "svd-llm@0.3,svd@0.3", "--eval-text", str(text_file)]) == 0
    res = json.loads((tmp_path / "results" / "real_t.json").read_text())
    own = res["cells"]["svd-llm@0.3"]["report"]
    assert res["eval_text"] == str(text_file) and res["eval_text_tokens"] == own["eval_tokens"]
    assert abs(res["ppl_dense_eval_text"] - own["ppl_dense"]) < 1e-6 * own["ppl_dense"]
    assert abs(res["cells"]["svd-llm@0.3"]["ppl_eval_text"] - own["ppl_compressed"]) < 1e-6 * own["ppl_compressed"]
    assert "ppl_eval_text" not in res["cells"]["svd@0.3"]
    assert "svd@0.3: no checkpoint at" in capsys.readouterr().out


def test_a_recover_cell_asks_for_recovery_explicitly(tiny_llama, tmp_path, monkeypatch):
    """The cell ``soco+recover`` passes the recovery's steps itself, so that it means the same whatever the
    compressor's default (which was no recovery for soco until 2026-12-05)."""
    real = load_benchmark("real_model", tmp_path / "results", monkeypatch)
    assert real.main([str(tiny_llama), "--name", "t", "--cells", "soco+recover@0.3", "--soco-steps", "1",
                      "--calib-windows", "8", "--eval-windows", "1", "--seq-len", "64", "--no-serve",
                      "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "results" / "real_t.json").read_text())["cells"]["soco+recover@0.3"]["report"]
    assert rep["recover_settings"]["steps"] == DEFAULT_STEPS and rep["recovery"]
    groups = rep["recovery"]["per_group"]  # each group's losses are kept, its curve is not
    assert groups and all({"train_first", "val_before", "val_after"} <= g.keys() and "curve" not in g
                          for g in groups.values())


def test_a_file_keeps_one_setting(tiny_llama, tmp_path, monkeypatch):
    real = load_benchmark("real_model", tmp_path / "results", monkeypatch)
    base = [str(tiny_llama), "--name", "t", "--cells", "svd@0.3", "--eval-windows", "1", "--seq-len", "64",
            "--no-serve", "--no-progress", "--out", str(tmp_path)]
    assert real.main([*base, "--calib-windows", "2"]) == 0
    before = (tmp_path / "results" / "real_t.json").read_text()
    with pytest.raises(SystemExit, match=r"real_t.json: its cells were made with calib_windows=2, this run asks for 4"):
        real.main([*base, "--calib-windows", "4"])
    assert (tmp_path / "results" / "real_t.json").read_text() == before  # nothing rewritten
