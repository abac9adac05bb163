"""benchmarks/scale.py end to end on a tiny shape: random models built shard by shard, one
compression per depth in its own process, peak RSS and seconds per group recorded, cached."""

import json

from tests.helpers import load_benchmark


def test_scale_cells_record_memory_and_groups(tmp_path, monkeypatch, capsys):
    scale = load_benchmark("scale", tmp_path / "results", monkeypatch)
    monkeypatch.setitem(scale.SHAPES, "tiny", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                   num_key_value_heads=2))
    argv = ["--shapes", "tiny", "--layers", "1,2", "--calib-windows", "2", "--seq-len", "32",
            "--cache", str(tmp_path / "cache"), "--name", "t"]
    assert scale.main(argv) == 0
    res = json.loads((tmp_path / "results" / "scale_t.json").read_text())
    for layers in (1, 2):
        c = res["cells"][f"streaming/tiny/svd-llm/{layers}"]
        assert "error" not in c, c.get("error")
        assert c["peak_rss_bytes"] > 0 and len(c["seconds_per_group"]) == layers
        assert c["peak_stat_bytes"] == 8 * (3 * (64 * 64 + 64) + 128 * 128 + 128)  # one layer's statistics
    assert (tmp_path / "results" / "scale_t.png").stat().st_size > 1000
    capsys.readouterr()
    assert scale.main(argv) == 0  # every cell cached
    assert capsys.readouterr().out.count("cached") == 2
