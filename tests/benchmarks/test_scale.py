"""benchmarks/scale.py end to end on a tiny shape: random models built shard by shard, one
compression per depth in its own process, peak RSS and seconds per group recorded, cached."""

import json

import pytest

from tests.helpers import load_benchmark


def test_scale_cells_record_memory_and_groups(tmp_path, monkeypatch, capsys):
    scale = load_benchmark("scale", tmp_path / "results", monkeypatch)
    monkeypatch.setitem(scale.SHAPES, "tiny", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                   num_key_value_heads=2))
    monkeypatch.setitem(scale.DEPTH, "tiny", 8)
    argv = ["--shapes", "tiny", "--layers", "1,2", "--calib-windows", "2", "--seq-len", "32",
            "--cache", str(tmp_path / "cache"), "--name", "t"]
    assert scale.main(argv) == 0
    res = json.loads((tmp_path / "results" / "scale_t.json").read_text())
    for layers in (1, 2):
        c = res["cells"][f"streaming/tiny/svd-llm/{layers}"]
        assert "error" not in c, c.get("error")
        assert c["peak_rss_bytes"] > 0 and len(c["seconds_per_group"]) == layers
        assert c["peak_stat_bytes"] == 8 * (3 * (64 * 64 + 64) + 128 * 128 + 128)  # one layer's statistics
    deepest = res["cells"]["streaming/tiny/svd-llm/2"]
    e = res["extrapolated"]["tiny/svd-llm"]
    assert e["from_cell"] == "streaming/tiny/svd-llm/2" and e["layers"] == 8
    outside = deepest["wall_seconds"] - sum(deepest["seconds_per_group"])
    assert e["hours"] == round((4 * sum(deepest["seconds_per_group"]) + outside) / 3600, 2)
    assert (tmp_path / "results" / "scale_t.png").stat().st_size > 1000
    capsys.readouterr()
    assert scale.main(argv) == 0  # every cell cached
    assert capsys.readouterr().out.count("cached") == 2
    res["device"] = "NVIDIA H200"  # one results file holds one device's cells: another is refused
    (tmp_path / "results" / "scale_t.json").write_text(json.dumps(res))
    with pytest.raises(SystemExit, match="scale_t.json: its cells come from 'NVIDIA H200'"):
        scale.main(argv)


def test_extrapolation_counts_groups_not_layers(tmp_path, monkeypatch):
    scale = load_benchmark("scale", tmp_path / "results", monkeypatch)
    # basis-sharing's two layers in one group: 80 layers are 40 such groups (41 for 81), plus 10 s outside
    cell = {"layers": 2, "seconds_per_group": [100.0], "wall_seconds": 110.0}
    assert scale.extrapolate(cell, 80) == 40 * 100.0 + 10.0
    assert scale.extrapolate(cell, 81) == 41 * 100.0 + 10.0
    # a whole-model stage (soco's training) walks every group: it grows with depth too
    soco = {"layers": 2, "seconds_per_group": [10.0, 10.0], "wall_seconds": 125.0, "seconds": {"whole_model": 100.0}}
    assert scale.extrapolate(soco, 8) == 8 * 60.0 + 5.0  # 8 groups of one layer


def test_a_depth_below_the_methods_group_is_skipped(tmp_path, monkeypatch, capsys):
    """basis-sharing groups two layers: a one-layer model is not a cell (the compressor refuses it)."""
    scale = load_benchmark("scale", tmp_path / "results", monkeypatch)
    monkeypatch.setitem(scale.SHAPES, "tiny", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                   num_key_value_heads=2))
    monkeypatch.setitem(scale.DEPTH, "tiny", 8)
    assert scale.main(["--shapes", "tiny", "--layers", "1", "--methods", "basis-sharing", "--calib-windows", "2",
                       "--seq-len", "32", "--cache", str(tmp_path / "cache"), "--name", "t"]) == 0
    assert "tiny/basis-sharing/1: skipped, basis-sharing's groups have 2 layers" in capsys.readouterr().out
    assert json.loads((tmp_path / "results" / "scale_t.json").read_text())["cells"] == {}
