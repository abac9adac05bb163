"""vLLM's side of ``config.json``'s ``quantization_config`` (format 2), without a server: the
registered method, the engine's marker config, and what the soco loader accepts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config.load import LoadConfig  # noqa: E402
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config  # noqa: E402

from soco_serve.layout import FORMAT_VERSION, MANIFEST_FILE, CheckpointError, quantization_config  # noqa: E402
from soco_serve.linear import SocoLinearConfig  # noqa: E402
from soco_serve.loader import SocoModelLoader  # noqa: E402
from tests.soco_serve.test_layout import _write  # noqa: E402


def test_soco_is_a_registered_vllm_quantization_method():
    assert "soco" in QUANTIZATION_METHODS
    assert get_quantization_config("soco") is SocoLinearConfig


def test_the_engines_config_stops_any_other_loader_at_the_first_layer(tmp_path):
    ckpt = _write(tmp_path / "ck")
    marker = SocoLinearConfig.from_config(quantization_config())
    marker.maybe_update_config(str(ckpt))  # as vLLM does while it builds its config
    for layer, prefix in ((torch.nn.Embedding(4, 2), "embed"), (torch.nn.Linear(8, 6), "a.0.q")):
        with pytest.raises(CheckpointError, match=f"serve it with `vllm serve {ckpt} --load-format soco`"):
            marker.get_quant_method(layer, prefix)


def test_newer_formats_and_other_folders_are_refused_while_vllm_builds_its_config(tmp_path):
    newer = FORMAT_VERSION + 1
    with pytest.raises(CheckpointError, match=f"quantization_config: unknown format_version {newer}"):
        SocoLinearConfig.from_config({**quantization_config(), "format_version": newer})
    with pytest.raises(CheckpointError, match="quant_method is 'fp8'"):
        SocoLinearConfig.from_config({"quant_method": "fp8"})
    ckpt = _write(tmp_path / "ck")
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    (ckpt / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": newer}))
    marker = SocoLinearConfig.from_config(quantization_config())
    with pytest.raises(CheckpointError, match=f"unknown format_version {newer}"):
        marker.maybe_update_config(str(ckpt))
    with pytest.raises(CheckpointError, match="is not a soco checkpoint"):
        marker.maybe_update_config(str(tmp_path))


def test_the_soco_loader_refuses_a_foreign_quantization(tmp_path):
    ckpt = _write(tmp_path / "ck")
    loader = SocoModelLoader(LoadConfig(load_format="soco"))
    fp8 = SimpleNamespace(get_name=lambda: "fp8")
    with pytest.raises(ValueError, match="cannot also be served with --quantization fp8"):
        loader.create_model(SimpleNamespace(quant_config=fp8), SimpleNamespace(model=str(ckpt)))
