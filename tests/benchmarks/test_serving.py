"""benchmarks/serving.py's checkpoints: the flags each benchmark row compresses with.

The serving run itself (servers, ``vllm bench serve``) is the benchmark; the server it drives is
tested in ``tests/soco_serve/test_server.py``.
"""

import importlib.util
from pathlib import Path

import pytest

from compress.cli import compress_parser


@pytest.fixture(scope="module")
def serving():
    spec = importlib.util.spec_from_file_location(
        "serving_bench", Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("row,method,group_size,update,small_calibration", [
    ("svd-llm", "svd-llm", 1, "auto", True),
    ("basis-sharing", "basis-sharing", 2, "auto", True),
    ("basis-sharing-noupdate", "basis-sharing", 2, "off", True),
    ("soco", "soco", 1, "auto", False),  # ranks learned from the data: the default calibration
    ("soco-shared", "soco", 2, "auto", False),
])
def test_compress_args(serving, row, method, group_size, update, small_calibration):
    a = compress_parser().parse_args(["-o", "out", *serving.compress_args(row, "0.5")])
    assert (a.method, a.group_size, a.coefficient_update, a.ratio, a.no_eval) == (method, group_size, update, [0.5], True)
    defaults = compress_parser().parse_args(["-o", "out"])
    calib = (a.calib_windows, a.seq_len)
    assert calib == (8, 256) if small_calibration else calib == (defaults.calib_windows, defaults.seq_len)


def test_unknown_and_one_run_rows_refused(serving):
    for bad in ("soco-onerun", "no-such-method"):
        with pytest.raises(SystemExit, match=bad):
            serving.main(["--methods", bad, "--name", "never-written"])
