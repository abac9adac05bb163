"""benchmarks/serving.py's checkpoints: the flags each benchmark row compresses with.

The serving run itself (servers, ``vllm bench serve``) is the benchmark; the server it drives is
tested in ``tests/soco_serve/test_server.py``.
"""

import json

import pytest

from compress.cli import compress_parser
from tests.helpers import import_benchmark


@pytest.fixture(scope="module")
def serving():
    return import_benchmark("serving")


@pytest.mark.parametrize("row,method,group_size,update,small_calibration", [
    ("svd-llm", "svd-llm", 1, "auto", True),
    ("basis-sharing", "basis-sharing", 2, "auto", True),
    ("basis-sharing-noupdate", "basis-sharing", 2, "off", True),
    ("soco", "soco", 1, "auto", False),  # ranks learned from the data: the default calibration
    ("soco-shared", "soco", 2, "auto", False),
])
def test_compress_args(serving, row, method, group_size, update, small_calibration):
    a = compress_parser().parse_args(["-o", "out", *serving.compress_args(row, ["0.5"])])
    assert (a.method, a.group_size, a.coefficient_update, a.ratio, a.no_eval) == (method, group_size, update, [0.5], True)
    defaults = compress_parser().parse_args(["-o", "out"])
    calib = (a.calib_windows, a.seq_len)
    assert calib == (8, 256) if small_calibration else calib == (defaults.calib_windows, defaults.seq_len)


@pytest.mark.parametrize("row,group_size", [("soco-onerun", 1), ("soco-shared-onerun", 2)])
def test_one_run_row_is_one_call_for_every_ratio(serving, row, group_size):
    a = compress_parser().parse_args(["-o", "out", *serving.compress_args(row, ["0.2", "0.5"])])
    default_calib = compress_parser().parse_args(["-o", "o"]).calib_windows
    assert (a.method, a.group_size, a.ratio, a.calib_windows) == ("soco", group_size, [0.2, 0.5], default_calib)


def test_unknown_rows_refused(serving):
    with pytest.raises(SystemExit, match="no-such-method"):
        serving.main(["--methods", "no-such-method", "--name", "never-written"])


@pytest.mark.parametrize("ratios", [["0.5"], ["0.3", "0.5"]], ids=["bars", "lines"])
def test_plot_only_redraws_from_the_json(serving, tmp_path, monkeypatch, ratios):
    monkeypatch.setattr(serving, "RESULTS", tmp_path)
    levels = {"1": {"throughput_vs_dense": 1.0}, "8": {"throughput_vs_dense": 1.0}}
    runs = {"dense": {"levels": levels}}
    for method in ("svd-llm", "soco"):
        for r in ratios:
            runs[f"{method}@{r}"] = {"report": {"method": "x"}, "levels": {
                c: {"throughput_vs_dense": 1.2 + float(r)} for c in levels}}
    (tmp_path / "serving_t.json").write_text(json.dumps(
        {"machine": {"processor": "x86_64", "cpus": 2, "device": "CPU test"}, "compiled": True, "runs": runs}))
    assert serving.main(["--name", "t", "--plot-only"]) == 0
    assert (tmp_path / "serving_t.png").stat().st_size > 1000
