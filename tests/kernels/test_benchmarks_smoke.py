"""The benchmark scripts' --quick modes run on CPU and write their result files (no plots: faster)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import import_benchmark


@pytest.mark.parametrize(
    ("script", "extra"),
    [("kernel_bench", ["--cpu-reps", "2", "--shapes", "qkv"]), ("decode_bench", [])],
)
def test_quick_mode_writes_results(script, extra, tmp_path, capsys):
    import_benchmark(script).main(["--quick", "--device", "cpu", "--no-plot", "--out-dir", str(tmp_path), *extra])
    (result,) = tmp_path.glob(f"{script}_cpu*.json")
    payload = json.loads(result.read_text())
    assert payload["environment"]["device"].startswith("CPU") and payload["results"]
    assert all(row["time_us" if script == "kernel_bench" else "tokens_per_s"] > 0 for row in payload["results"])
    assert "wrote" in capsys.readouterr().out


def test_cpu_name_tells_cpu_families_apart():
    from benchmarks.measure import cpu_name

    info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n"
    assert cpu_name(info.format(25)) == "CPU AMD EPYC (family 25)"
    assert cpu_name(info.format(26)) != cpu_name(info.format(25))
    assert cpu_name("model name\t: Some ARM core\n") == "CPU Some ARM core"


def test_interleaved_timer_takes_turns():
    """Every function is warmed up once, then called once per round, in an order rotated per round."""
    from benchmarks.measure import time_ms_interleaved

    order: list[str] = []
    ms = time_ms_interleaved({name: (lambda n=name: order.append(n)) for name in "abc"}, reps=3)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    assert set(ms) == set("abc") and all(v >= 0 for v in ms.values())


def test_cpu_kernel_bench_writes_parts_column(tmp_path):
    """The CPU kernel benchmark (needs vLLM's oneDNN ops), one decoder layer, with the parts column."""
    import_benchmark("cpu_kernel_bench").main(["--layers", "1", "--tokens", "1,3", "--reps", "2", "--parts", "--name", "smoke",
                                     "--out-dir", str(tmp_path)])
    (result,) = tmp_path.glob("cpu_kernel_smoke_cpu*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [1, 3]
    assert all(set(r["ms"]) == {"dense", "onednn_lowrank", "soco_kernel", "soco_kernel_parts"} for r in rows)
