"""benchmarks/quality.py end to end on a tiny random Llama: cells, resume, the further text."""

import json

import pytest
import torch

from tests.helpers import load_benchmark


@pytest.fixture
def quality(tmp_path, monkeypatch):
    return load_benchmark("quality", tmp_path, monkeypatch)


def test_peer_cells_eval_text_and_resume(quality, tiny_llama, text_file, tmp_path, capsys):
    methods = ("svd", "fwsvd", "asvd", "basis-sharing", "basis-sharing-noupdate")
    argv = ["--model", str(tiny_llama), "--methods", ",".join(methods), "--ratios", "0.3,0.5",
            "--calib-windows", "2", "--eval-windows", "1", "--seq-len", "64", "--eval-text", str(text_file),
            "--name", "t", "--rank-ratio", "0.5"]
    assert quality.main(argv) == 0
    res = json.loads((tmp_path / "quality_t.json").read_text())
    assert set(res["cells"]) == {f"{m}@{r}" for m in methods for r in (0.3, 0.5)}
    ranks = res["cells"]["svd@0.5"]["ranks"]
    assert len(ranks) >= 2 and set(ranks["0"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert (tmp_path / "quality_t_ranks.png").stat().st_size > 1000
    assert res["cells"]["basis-sharing@0.3"]["coefficient_update"] is True  # the compressor's default
    assert res["cells"]["basis-sharing-noupdate@0.3"]["coefficient_update"] is False
    for c in res["cells"].values():
        assert c["ppl"] > 0 and c["ppl_eval_text"] > 0 and c["seconds"] >= 0
        assert abs(c["achieved_ratio"] - c["target_ratio"]) < 0.02
    assert "whole_model" in res["cells"]["fwsvd@0.3"]["stage_seconds"]  # its gradients, before the groups
    table = (tmp_path / "quality_t.md").read_text()
    assert f"Perplexity on {text_file}" in table and "| fwsvd |" in table and "Seconds to compress each cell" in table
    assert (tmp_path / "quality_t.png").stat().st_size > 1000
    # A second run computes nothing new: every cell comes from the cache.
    capsys.readouterr()
    assert quality.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("cached ppl") == 10 and "ppl " not in out.replace("cached ppl", "")
    # --report-only: a table over rows of which some were never computed, and nothing computed;
    # the file keeps the machine and threads that computed its cells, whatever the report runs on
    before, threads = (tmp_path / "quality_t.json").read_text(), torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert quality.main([*argv[:3], "svd,svd-llm", *argv[4:], "--report-only"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "quality_t.json").read_text() == before
    assert f"; {threads} threads on " in (tmp_path / "quality_t.md").read_text()
    out = capsys.readouterr().out
    assert out.count("cached ppl") == 2 and "svd-llm@" not in out.split("| method |")[0]
    assert "svd-llm@0.3" not in json.loads((tmp_path / "quality_t.json").read_text())["cells"]
    rows = [line for line in (tmp_path / "quality_t.md").read_text().splitlines() if line.startswith("| svd")]
    assert rows[0].startswith("| svd | ") and "–" not in rows[0] and rows[1] == "| svd-llm | – | – |"
    # nor does --report-only with a setting that would start a computing run afresh reset the file
    assert quality.main([*argv[:3], "svd,svd-llm", *argv[4:], "--calib-windows", "3", "--fresh", "--report-only"]) == 0
    assert (tmp_path / "quality_t.json").read_text() == before


def test_other_settings_start_the_file_afresh(quality, tiny_llama, text_file, tmp_path, capsys):
    argv = ["--model", str(tiny_llama), "--methods", "svd", "--ratios", "0.3", "--eval-windows", "1",
            "--seq-len", "64", "--name", "t"]
    assert quality.main([*argv, "--calib-windows", "2"]) == 0
    capsys.readouterr()
    assert quality.main([*argv, "--calib-windows", "3"]) == 0
    out = capsys.readouterr().out
    assert "starting it afresh" in out and "cached ppl" not in out
    assert json.loads((tmp_path / "quality_t.json").read_text())["calib_windows"] == 3


def test_soco_onerun_cells(quality, tiny_llama, text_file, tmp_path):
    argv = ["--model", str(tiny_llama), "--methods", "soco-onerun", "--ratios", "0.3,0.4",
            "--calib-windows", "2", "--eval-windows", "1", "--seq-len", "64", "--eval-text", str(text_file),
            "--soco-steps", "4", "--soco-seq-len", "32", "--name", "t"]
    assert quality.main(argv) == 0
    res = json.loads((tmp_path / "quality_t.json").read_text())
    assert set(res["cells"]) == {"soco-onerun@0.3", "soco-onerun@0.4"}
    assert res["cells"]["soco-onerun@0.4"]["soco_trained_for"] == 0.3
    assert all(c["target_ratio"] <= c["achieved_ratio"] <= c["target_ratio"] + 0.005 for c in res["cells"].values())
    assert "soco-onerun" in (tmp_path / "quality_t.md").read_text()
    assert quality.main([*argv, "--soco-seed", "1"]) == 0  # another seed is another setting: trained again
    seeded = json.loads((tmp_path / "quality_t.json").read_text())["cells"]["soco-onerun@0.4"]
    assert seeded["soco_settings"]["seed"] == 1 and seeded["ppl"] != res["cells"]["soco-onerun@0.4"]["ppl"]
    assert quality.BENCH_METHODS["soco-shared"][:3] == ("soco", 2, False)


def test_report_rows_from_several_files(quality, tmp_path):
    """Each row comes whole from the last file that has it, never cell by cell; files made with
    other settings are refused by name."""
    head = {"model": "m", "calib_windows": 4, "eval_windows": 2, "seq_len": 64, "ppl_dense": 10.0,
            "eval_tokens": 128, "threads": 2, "device": "cpu"}

    def cell(method, ratio, ppl):
        return {"method": method, "target_ratio": ratio, "achieved_ratio": ratio, "ppl": ppl, "seconds": 1.0}

    old = {**head, "cells": {f"{m}@{r}": cell(m, r, p) for m, p in (("svd-llm", 20.0), ("soco", 30.0))
                             for r in (0.2, 0.3)}}
    new = {**head, "eval_text": "pydoc", "eval_text_tokens": 64, "ppl_dense_eval_text": 5.0,
           "cells": {"soco@0.2": {**cell("soco", 0.2, 15.0), "ppl_eval_text": 9.0}}}
    (tmp_path / "quality_old.json").write_text(json.dumps(old))
    (tmp_path / "quality_new.json").write_text(json.dumps(new))
    argv = ["--methods", "svd-llm,soco", "--ratios", "0.2,0.3", "--report-only", "--name", "both"]
    assert quality.main([*argv, "--rows-from", "old,new"]) == 0
    table = (tmp_path / "quality_both.md").read_text()
    assert "| svd-llm | 20.00 | 20.00 |" in table and "| soco | 15.00 | – |" in table  # not 30.00 at 0.3
    assert "Perplexity on pydoc" in table and "| soco | 9.00 | – |" in table
    assert "Rows from: svd-llm: quality_old.json; soco: quality_new.json." in table
    assert (tmp_path / "quality_both.png").stat().st_size > 1000
    assert not (tmp_path / "quality_both.json").exists()  # a report writes no result file

    (tmp_path / "quality_new.json").write_text(json.dumps({**new, "seq_len": 128}))
    with pytest.raises(SystemExit, match="quality_new.json: seq_len is 128, quality_old.json has 64"):
        quality.main([*argv, "--rows-from", "old,new"])
    with pytest.raises(SystemExit, match="add --report-only"):
        quality.main([*argv[:4], "--rows-from", "old,new"])
    with pytest.raises(SystemExit, match="quality_gone.json: no cached cells"):
        quality.main([*argv, "--rows-from", "old,gone"])
