"""Low-rank linear layers inside vLLM, in vLLM's own layer-method style.

:class:`SocoLinearConfig` plays the role a quantization config plays for AWQ or GPTQ: vLLM's
model classes ask it, for every layer they build, which method creates and applies that layer's
weights. For a linear layer that the manifest stores factorized it answers
:class:`SocoLowRankLinearMethod`; for everything else the stock methods (dense layers then load,
repack and run exactly as in an uncompressed model).

A vLLM layer may fuse several Hugging Face linears (q/k/v into ``qkv_proj``, gate/up into
``gate_up_proj``): they are *segments* of one layer. The method serves the fused layer as one
unit: the shrink factors of all segments are rows of one ``lowrank_v [R, in]`` (one read of the
input, one product), and the expand factors lie in one packed ``lowrank_u`` (one product per
segment, written straight into the output). A segment the compressor kept dense is an *identity*
segment: its rows of ``lowrank_v`` are the weight rows, and it needs no expand.

Tensor parallelism mirrors vLLM's dense sharding:

* column-parallel (qkv, gate/up): ``V`` whole on every rank, ``U``'s output rows split (an
  identity segment's weight rows split likewise);
* row-parallel (o, down): ``V``'s input columns split; the rank-sized partial products are
  all-reduced, then every rank applies the whole ``U``. The method therefore turns the layer's
  own output all-reduce off (``reduce_results``) and adds the bias on every rank.

A shared basis is one ``Parameter`` registered on every layer of its group (vLLM counts it, and
holds it, once).

After loading, CUDA layers pack their expand factors for :func:`kernels.lowrank_forward` (Triton
for decode batches, chosen per call inside a custom op, so that vLLM's one compiled graph keeps
that choice for every batch size); float32 CPU layers pack theirs into the panels of the fused CPU kernel
(:mod:`kernels.cpu_lowrank`: one call per layer, whatever the batch; a shared basis is packed
once for its group), as vLLM's dense CPU layers prepack theirs for oneDNN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import Parameter

from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from kernels import cpu_lowrank, lowrank_expand, lowrank_forward, pack_expand
from kernels.lowrank import U_ROW_ALIGN
from soco_serve.layout import CheckpointError, LinearEntry, Manifest

logger = init_logger("vllm.soco_serve.linear")

QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class SegmentSpec:
    """One Hugging Face linear inside a (possibly fused) vLLM layer."""

    hf_name: str
    entry: LinearEntry

    @property
    def identity(self) -> bool:
        return self.entry.kind == "dense"


class SocoLinearConfig(QuantizationConfig):
    """Tells vLLM's layers how the checkpoint stores them (built from the manifest, not a file)."""

    def __init__(self, manifest: Manifest):
        super().__init__()
        self.manifest = manifest
        # basis-group key -> the one shared shrink Parameter of that group's layers
        self.shared_v: dict[tuple[Any, ...], Parameter] = {}
        # basis id -> the (layer, segment index) pairs whose shrink rows hold it, one per distinct tensor
        self.basis_targets: dict[str, list[tuple[LinearBase, int]]] = {}
        # id of a loaded shrink Parameter -> (that Parameter, kept so the id stays its own; its
        # panels for the CPU kernel; its shape): a shared basis is packed once
        self.cpu_shrink: dict[int, tuple[Parameter, Parameter, tuple[int, int]]] = {}

    # -- QuantizationConfig interface -------------------------------------------------------------
    def get_name(self) -> str:
        return "soco"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SocoLinearConfig":
        raise NotImplementedError("soco layers are configured from soco_manifest.json by the soco loader")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        segments = self.segments_for(prefix)
        if segments is None or all(s.identity for s in segments):
            return UnquantizedLinearMethod()
        return SocoLowRankLinearMethod(self, segments)

    # -- manifest lookup ----------------------------------------------------------------------
    def segments_for(self, prefix: str) -> list[SegmentSpec] | None:
        """The manifest entries behind a vLLM layer, in its output order; None if not a decoder linear."""
        parent, _, leaf = prefix.rpartition(".")
        hf_leaves = self.packed_modules_mapping.get(leaf, [leaf])
        names = [f"{parent}.{x}" if parent else x for x in hf_leaves]
        found = [n in self.manifest.linears for n in names]
        if not any(found):
            return None
        if not all(found):
            missing = [n for n, f in zip(names, found) if not f]
            raise CheckpointError(f"soco_manifest.json: layer {prefix!r} fuses {names}, but {missing} are not listed")
        return [SegmentSpec(n, self.manifest.linears[n]) for n in names]


class SocoLowRankLinearMethod(LinearMethodBase):
    """``y = expand(x · lowrank_vᵀ)``, one shrink for all segments of the layer."""

    def __init__(self, config: SocoLinearConfig, segments: list[SegmentSpec]):
        self.config = config
        self.segments = segments

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        if len(output_partition_sizes) != len(self.segments):
            raise CheckpointError(
                f"layer {layer.prefix!r}: vLLM splits it into {len(output_partition_sizes)} outputs, the manifest "
                f"gives {len(self.segments)} ({[s.hf_name for s in self.segments]})"
            )
        self.layer = layer
        row_parallel = isinstance(layer, RowParallelLinear)
        ranks = [part if s.identity else s.entry.rank for s, part in zip(self.segments, output_partition_sizes)]
        layer.soco_row_parallel = row_parallel
        layer.soco_ranks = ranks
        layer.soco_out_parts = list(output_partition_sizes)
        # The row-parallel reduction happens on the rank-sized product, inside apply().
        layer.soco_reduce = row_parallel and layer.tp_size > 1 and layer.reduce_results
        if layer.soco_reduce:
            layer.reduce_results = False

        v_shape = (sum(ranks), input_size_per_partition)
        bases = tuple(s.entry.basis for s in self.segments)
        if all(s.entry.kind == "shared" for s in self.segments):
            v = self.config.shared_v.get(bases)
            if v is None:
                v = self.config.shared_v[bases] = Parameter(torch.empty(v_shape, dtype=params_dtype),
                                                            requires_grad=False)
                for j, s in enumerate(self.segments):
                    self.config.basis_targets.setdefault(s.entry.basis, []).append((layer, j))
        else:
            v = Parameter(torch.empty(v_shape, dtype=params_dtype), requires_grad=False)
            if any(s.entry.kind == "shared" for s in self.segments):
                logger.warning("layer %s mixes shared and private factors: its shared bases are copied "
                               "into the layer", layer.prefix)
            for j, s in enumerate(self.segments):
                if s.entry.kind == "shared":
                    self.config.basis_targets.setdefault(s.entry.basis, []).append((layer, j))
        if not hasattr(v, "weight_loader"):  # a shared basis tensor is created, and set up, once
            set_weight_attrs(v, {"weight_loader": self._load_v})
        layer.register_parameter("lowrank_v", v)

        u_numel = sum(part * r for s, part, r in zip(self.segments, output_partition_sizes, ranks) if not s.identity)
        u = Parameter(torch.empty(u_numel, dtype=params_dtype), requires_grad=False)
        layer.register_parameter("lowrank_u", u)
        set_weight_attrs(u, {"weight_loader": self._load_u})

    # -- loading ------------------------------------------------------------------------------
    def _segment(self, layer: LinearBase, shard_id: Any) -> int:
        if shard_id is None:
            if len(self.segments) != 1:
                raise CheckpointError(f"layer {layer.prefix!r}: a fused layer's factors need a shard id")
            return 0
        return QKV_SHARDS[shard_id] if isinstance(shard_id, str) else int(shard_id)

    def _shard_rank(self, layer: LinearBase, j: int) -> int:
        """Which slice of a column-parallel output this rank holds (k/v heads may be replicated)."""
        if isinstance(layer, QKVParallelLinear) and j > 0:
            return layer.tp_rank // layer.num_kv_head_replicas
        return layer.tp_rank

    def _out_rows(self, layer: LinearBase, j: int, t: torch.Tensor) -> torch.Tensor:
        if layer.soco_row_parallel:
            return t
        part = layer.soco_out_parts[j]
        return t.narrow(0, self._shard_rank(layer, j) * part, part)

    def _in_cols(self, layer: LinearBase, t: torch.Tensor) -> torch.Tensor:
        if not layer.soco_row_parallel:
            return t
        part = layer.lowrank_v.shape[1]
        return t.narrow(1, layer.tp_rank * part, part)

    def _check(self, layer: LinearBase, what: str, j: int, got: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(got.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.segments[j].hf_name}.{what}: shape {list(got.shape)} disagrees with the manifest "
                f"(expected {list(shape)} for layer {layer.prefix!r})"
            )

    def load_segment_v(self, layer: LinearBase, j: int, loaded: torch.Tensor, what: str) -> None:
        """Copy segment ``j``'s shrink rows (a low-rank V, a basis, or a dense weight) into place."""
        seg = self.segments[j]
        full_rows = seg.entry.out_features if seg.identity else seg.entry.rank
        self._check(layer, what, j, loaded, (full_rows, seg.entry.in_features))
        rows = self._in_cols(layer, self._out_rows(layer, j, loaded) if seg.identity else loaded)
        start = sum(layer.soco_ranks[:j])
        layer.lowrank_v.data.narrow(0, start, layer.soco_ranks[j]).copy_(rows)

    def _load_v(self, param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        layer = self.layer
        j = self._segment(layer, shard_id)
        what = "weight" if self.segments[j].identity else "lowrank_v"
        self.load_segment_v(layer, j, loaded, what)

    def _load_u(self, param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        layer = self.layer
        j = self._segment(layer, shard_id)
        seg = self.segments[j]
        self._check(layer, "lowrank_u", j, loaded, (seg.entry.out_features, seg.entry.rank))
        offset = sum(p * r for s, p, r in zip(self.segments[:j], layer.soco_out_parts, layer.soco_ranks)
                     if not s.identity)
        part, rank = layer.soco_out_parts[j], layer.soco_ranks[j]
        param.data.narrow(0, offset, part * rank).view(part, rank).copy_(self._out_rows(layer, j, loaded))

    # -- after loading, and the forward -----------------------------------------------------------
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Pack the expand factors into one buffer (CUDA: padded for the Triton kernels), or on a
        CPU pack every factor into the fused CPU kernel's panels (see :mod:`kernels.cpu_lowrank`)."""
        us: list[torch.Tensor | None] = []
        offset = 0
        for s, part, r in zip(self.segments, layer.soco_out_parts, layer.soco_ranks):
            if s.identity:
                us.append(None)
            else:
                us.append(layer.lowrank_u.data.narrow(0, offset, part * r).view(part, r))
                offset += part * r
        layer.soco_cpu = None  # CPU kernel: (rank_total, out_features)
        v = layer.lowrank_v
        if v.device.type == "cpu" and v.dtype == torch.float32 and cpu_lowrank.available():
            # The panels replace the loaded factors: the layer holds one copy of each, and a shared
            # basis is packed once, into one Parameter, for its whole group.
            cached = self.config.cpu_shrink.get(id(v))
            if cached is None:
                panels = Parameter(cpu_lowrank.pack_panels(v.data), requires_grad=False)
                cached = self.config.cpu_shrink[id(v)] = (v, panels, tuple(v.shape))
                v.data = v.data.new_empty(0)
            _, panels, v_shape = cached
            cpu = cpu_lowrank.CpuLowRank.build(panels.data, v_shape, us, list(layer.soco_ranks))
            layer.lowrank_v = panels
            layer.lowrank_u = Parameter(cpu.u, requires_grad=False)
            layer.register_buffer("soco_meta", cpu.meta, persistent=False)
            layer.soco_cpu = (cpu.rank_total, cpu.out_features)
            logger.info_once("soco: low-rank layers run the fused CPU kernel (%s)",
                             torch.backends.cpu.get_cpu_capability())
            layer.soco_expand = None
            return
        # Rows padded for the Triton kernels' aligned loads on CUDA; unpadded (no waste) elsewhere.
        packed = pack_expand(us, layer.soco_ranks, U_ROW_ALIGN if layer.lowrank_u.is_cuda else 1)
        # The packed buffer replaces the loaded one: the layer holds one copy of U.
        layer.lowrank_u = Parameter(packed.u_flat, requires_grad=False)
        layer.soco_expand = packed

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        cpu = layer.soco_cpu
        if not layer.soco_reduce:
            if cpu is not None:
                return cpu_lowrank.forward(x, layer.lowrank_v, layer.lowrank_u, layer.soco_meta, bias, *cpu)
            return lowrank_forward(x, layer.lowrank_v, layer.soco_expand, bias)
        # Row-parallel under TP: reduce the rank-sized partial products, then expand on every
        # rank; the bias (which vLLM passes on rank 0 only) is added everywhere.
        from vllm.distributed import tensor_model_parallel_all_reduce

        if cpu is not None:
            rank_total, out_features = cpu
            h = tensor_model_parallel_all_reduce(cpu_lowrank.shrink(x, layer.lowrank_v, rank_total))
            y = cpu_lowrank.expand(h, layer.lowrank_u, layer.soco_meta, layer.bias, out_features)
            return y.view(*x.shape[:-1], out_features)
        h = tensor_model_parallel_all_reduce(torch.matmul(x, layer.lowrank_v.t()))
        return lowrank_expand(h, layer.soco_expand, layer.bias)
