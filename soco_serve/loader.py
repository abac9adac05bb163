"""``--load-format soco``: build vLLM's own model class with low-rank layers and load the checkpoint.

Serve: read manifest → build layers (vLLM's model class, each linear asking
:class:`~soco_serve.linear.SocoLinearConfig` for its method) → load tensors (through the model's
own ``load_weights``, so fused q/k/v and gate/up, tied embeddings and TP sharding work as for any
checkpoint; the low-rank layers' shrink rows, shared bases included, go straight to their
tensors, a shared basis to the one tensor of its group) → vLLM's ``process_weights_after_loading``
→ run.

Everything is checked before vLLM reports the server healthy: the manifest (format version,
basis ids), every tensor's presence, shape and dtype against it, and that every parameter of the
model was loaded. Any failure raises with the file and tensor named.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.utils import get_model_architecture, initialize_model

from soco_serve.layout import CheckpointError, CheckpointReader
from soco_serve.linear import SocoLinearConfig, SocoLowRankLinearMethod

logger = init_logger("vllm.soco_serve.loader")

LOAD_FORMAT = "soco"


@register_model_loader(LOAD_FORMAT)
class SocoModelLoader(BaseModelLoader):
    """Loads a soco checkpoint folder (``soco_manifest.json`` + ``soco-model-*.safetensors``)."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        if load_config.model_loader_extra_config:
            raise ValueError(
                f"--load-format soco takes no --model-loader-extra-config, got "
                f"{sorted(load_config.model_loader_extra_config)}"
            )
        self._config: SocoLinearConfig | None = None

    def download_model(self, model_config: ModelConfig) -> None:
        CheckpointReader(model_config.model)  # local folders only; validates the manifest and tensors

    def create_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        reader = CheckpointReader(model_config.model)
        if vllm_config.quant_config is not None:
            raise ValueError("a soco checkpoint cannot also be served with --quantization")
        arch = (getattr(model_config.hf_config, "architectures", None) or ["?"])[0]
        if reader.manifest.architecture != arch:
            raise CheckpointError(
                f"{model_config.model}: soco_manifest.json says {reader.manifest.architecture!r}, "
                f"config.json says {arch!r}"
            )
        self._config = SocoLinearConfig(reader.manifest)
        self._config.add_stacked_modules(get_model_architecture(model_config)[0])
        # The soco config reaches every layer the way a quantization config does, through the
        # VllmConfig the model class is built with; the engine's own config is left untouched.
        build_config = copy.copy(vllm_config)
        object.__setattr__(build_config, "quant_config", self._config)
        model = initialize_model(vllm_config=build_config, model_config=model_config, prefix=prefix)
        n_lowrank = sum(isinstance(getattr(m, "quant_method", None), SocoLowRankLinearMethod) for m in model.modules())
        logger.info("soco: %d low-rank layers, %d shared bases (%s, ratio %.3f)", n_lowrank,
                    len(reader.manifest.bases), reader.manifest.method, reader.manifest.achieved_ratio or 0.0)
        return model

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        if self._config is None:
            raise RuntimeError("SocoModelLoader.load_weights needs a model built by its create_model")
        reader = CheckpointReader(model_config.model)
        cfg = self._config
        shrink_loaded: set[str] = set()

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name in reader.names():
                targets = cfg.shrink_targets.get(name)
                if targets is None:
                    yield name, reader.get(name)
                    continue
                t = reader.get(name)
                for layer, j in targets:
                    layer.quant_method.load_segment_v(layer, j, t)
                shrink_loaded.add(name)

        loaded = model.load_weights(weights())
        never = set(cfg.shrink_targets) - shrink_loaded
        if never:
            raise CheckpointError(f"{model_config.model}: shrink tensors never loaded: {sorted(never)[:8]}")
        shrink = {id(p) for p in cfg.shrink_params}
        params = {n for n, p in model.named_parameters() if id(p) not in shrink}
        if loaded is not None:
            not_loaded = sorted(params - set(loaded))
            if not_loaded:
                raise CheckpointError(f"{model_config.model}: the checkpoint has no tensors for {not_loaded[:8]}")
        # Parameters are deduplicated by identity: a shared basis counts once, as it is held once.
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        logger.info("soco: weights in memory %d bytes (%.1f MB); checkpoint files %d bytes", weight_bytes,
                    weight_bytes / 1e6, reader.file_bytes())
