from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import make_tiny_llama

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> "os.PathLike":
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_f64(tmp_path_factory) -> "os.PathLike":
    return make_tiny_llama(tmp_path_factory.mktemp("tiny64") / "tiny-llama-f64", dtype=torch.float64)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """Real text: a slice of the default calibration split (Wikipedia sample)."""
    from compress.data import default_text

    p = tmp_path_factory.mktemp("text") / "sample.txt"
    p.write_text(default_text("calibration")[:40_000])
    return p
