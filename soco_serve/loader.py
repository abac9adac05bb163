"""``--load-format soco``: build vLLM's own model class with low-rank layers and load the checkpoint.

Serve: read manifest → build layers (vLLM's model class, each linear asking
:class:`~soco_serve.linear.SocoLinearConfig` for its method) → give the low-rank layers their
shrink Parameters (:class:`ShrinkRegistry`: a shared basis is one Parameter for its group) → load
tensors (through the model's own ``load_weights``, so fused q/k/v and gate/up, tied embeddings
and TP sharding work as for any checkpoint; the low-rank layers' shrink rows, shared bases
included, go straight to their Parameters) → vLLM's ``process_weights_after_loading`` → run.

A format-2 checkpoint's ``config.json`` names the quantization method ``soco``, so vLLM gives the
engine a :class:`~soco_serve.linear.SocoLinearConfig` marker (format 1: no quantization config);
:meth:`SocoModelLoader.create_model` accepts either and builds the model with its own config, made
from the manifest and the model class. vLLM's default loader cannot load the checkpoint (shared
bases and shrink factors have no parameter in the model it builds), so there the marker stops it
at the first layer and says to pass ``--load-format soco``.

Everything is checked before vLLM reports the server healthy: the manifest (format version,
basis ids), every tensor's presence, shape and dtype against it, and that every parameter of the
model was loaded. Any failure raises with the file and tensor named.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import Parameter

from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.utils import get_model_architecture, initialize_model

from soco_serve.layout import BASIS_PREFIX, CheckpointError, CheckpointReader
from soco_serve.linear import LOAD_FORMAT, SocoLinearConfig, SocoLowRankLinearMethod

logger = init_logger("vllm.soco_serve.loader")


class ShrinkRegistry:
    """The shrink Parameters of a built model, and which checkpoint tensor loads into which.

    A shared shrink part is one Parameter registered on every layer of its basis group (vLLM
    counts it, and holds it, once); only the loader sees all layers, so it makes them.
    """

    def __init__(self, model: nn.Module):
        self.shared: dict[tuple[str, ...], Parameter] = {}
        self.params: list[Parameter] = []
        # checkpoint tensor -> the (layer, segment index) pairs it loads into, one per distinct Parameter
        self.targets: dict[str, list[tuple[LinearBase, int]]] = {}
        for layer in model.modules():
            if isinstance(getattr(layer, "quant_method", None), SocoLowRankLinearMethod):
                self._add(layer)

    def _add(self, layer: LinearBase) -> None:
        st = layer.soco
        for i, (name, part) in enumerate(zip(st.v_names, st.parts)):
            param = self.shared.get(part.bases) if part.bases is not None else None
            if param is None:
                param = SocoLowRankLinearMethod.new_shrink_param(layer, i)
                self.params.append(param)
                for j in part.segments:
                    self.targets.setdefault(st.segments[j].shrink_tensor, []).append((layer, j))
                if part.bases is not None:
                    held = [key for key in self.shared if set(key) & set(part.bases)]
                    if held:
                        logger.warning("layer %s: shared bases %s are held again (also in the part of %s): the "
                                       "layers of one group do not share the same segments", layer.prefix,
                                       part.bases, held[0])
                    self.shared[part.bases] = param
            layer.register_parameter(name, param)


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
        # One load: the checkpoint opened by create_model, the shrink Parameters of the model it built.
        self._reader: CheckpointReader | None = None
        self._shrink: ShrinkRegistry | None = None

    def download_model(self, model_config: ModelConfig) -> None:
        CheckpointReader(model_config.model)  # local folders only; validates the manifest and tensors

    def create_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        reader = CheckpointReader(model_config.model)
        engine_quant = vllm_config.quant_config
        # Format 2's config.json makes vLLM build soco's own config (a marker, SocoLinearConfig.from_config);
        # format 1 has none. Anything else came from --quantization.
        if engine_quant is not None and not isinstance(engine_quant, SocoLinearConfig):
            raise ValueError(f"{model_config.model}: a soco checkpoint cannot also be served with --quantization "
                             f"{engine_quant.get_name()}")
        arch = (getattr(model_config.hf_config, "architectures", None) or ["?"])[0]
        if reader.manifest.architecture != arch:
            raise CheckpointError(
                f"{model_config.model}: soco_manifest.json says {reader.manifest.architecture!r}, "
                f"config.json says {arch!r}"
            )
        # The soco config reaches every layer the way a quantization config does, through the
        # VllmConfig the model class is built with; the engine's own config is left untouched.
        build_config = copy.copy(vllm_config)
        object.__setattr__(build_config, "quant_config",
                           SocoLinearConfig(reader.manifest, get_model_architecture(model_config)[0]))
        model = initialize_model(vllm_config=build_config, model_config=model_config, prefix=prefix)
        self._reader, self._shrink = reader, ShrinkRegistry(model)
        n_lowrank = sum(isinstance(getattr(m, "quant_method", None), SocoLowRankLinearMethod) for m in model.modules())
        logger.info("soco: %d low-rank layers, %d shared bases (%s, ratio %.3f)", n_lowrank,
                    len(reader.manifest.bases), reader.manifest.method, reader.manifest.achieved_ratio or 0.0)
        return model

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        if self._reader is None or self._shrink is None:
            raise RuntimeError("SocoModelLoader.load_weights needs a model built by its create_model")
        reader, shrink = self._reader, self._shrink
        shrink_loaded: set[str] = set()

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name in reader.names():
                targets = shrink.targets.get(name)
                if targets is None:
                    if not name.startswith(BASIS_PREFIX):  # else: the basis of layers on another pipeline stage
                        yield name, reader.get(name)
                    continue
                t = reader.get(name)
                for layer, j in targets:
                    SocoLowRankLinearMethod.load_segment_v(layer, j, t)
                shrink_loaded.add(name)

        loaded = model.load_weights(weights())
        never = set(shrink.targets) - shrink_loaded
        if never:
            raise CheckpointError(f"{model_config.model}: shrink tensors never loaded: {sorted(never)[:8]}")
        shrink_ids = {id(p) for p in shrink.params}
        params = {n for n, p in model.named_parameters() if id(p) not in shrink_ids}
        if loaded is not None:
            not_loaded = sorted(params - set(loaded))
            if not_loaded:
                raise CheckpointError(f"{model_config.model}: the checkpoint has no tensors for {not_loaded[:8]}")
        # Parameters are deduplicated by identity: a shared basis counts once, as it is held once.
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        logger.info("soco: weights in memory %d bytes (%.1f MB); checkpoint files %d bytes", weight_bytes,
                    weight_bytes / 1e6, reader.file_bytes())
