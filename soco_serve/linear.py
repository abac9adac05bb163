"""Low-rank linear layers inside vLLM, in vLLM's own layer-method style.

:class:`SocoLinearConfig` plays the role a quantization config plays for AWQ or GPTQ: vLLM's
model classes ask it, for every layer they build, which method creates and applies that layer's
weights. For a linear layer that the manifest stores factorized it answers
:class:`SocoLowRankLinearMethod`; for everything else the stock methods (dense layers then load,
repack and run exactly as in an uncompressed model).

A vLLM layer may fuse several Hugging Face linears (q/k/v into ``qkv_proj``, gate/up into
``gate_up_proj``): they are *segments* of one layer. The method serves the fused layer as one
unit: the shrink factors of all segments are the rows of one ``v_cat [R, in]`` (one read of the
input), and the expand factors lie in one packed ``lowrank_u`` (one product per segment, written
straight into the output). A segment the compressor kept dense is an *identity* segment: its
rows of ``v_cat`` are the weight rows, and it needs no expand.

A shared basis is one ``Parameter`` registered on every layer of its group (vLLM counts it, and
holds it, once). ``v_cat`` is therefore held in *shrink parts* (:func:`plan_shrink_parts`): each
run of consecutive shared segments is one tensor of the basis group, each run of the layer's own
(private or dense) segments one tensor of the layer. A layer with one part registers it as
``lowrank_v``; with several (say a shared q basis beside dense k and v) as ``lowrank_v0``,
``lowrank_v1``, ... The kernels take the parts as they are (:data:`kernels.lowrank.ShrinkFactors`).
All shrink rows (bases, private V, dense weight rows) are loaded by the soco loader through
:meth:`SocoLowRankLinearMethod.load_segment_v`, never through the model's ``load_weights``.

Tensor parallelism mirrors vLLM's dense sharding:

* column-parallel (qkv, gate/up): ``V`` whole on every rank, ``U``'s output rows split (an
  identity segment's weight rows split likewise);
* row-parallel (o, down): ``V``'s input columns split; the rank-sized partial products are
  all-reduced, then every rank applies the whole ``U``. The method therefore turns the layer's
  own output all-reduce off (``reduce_results``) and adds the bias on every rank.

After loading, CUDA layers pack their expand factors for :func:`kernels.lowrank_forward` (Triton
for decode batches, chosen per call inside a custom op, so that vLLM's one compiled graph keeps
that choice for every batch size); float32 CPU layers pack theirs into the panels of the fused CPU kernel
(:mod:`kernels.cpu_lowrank`: one call per layer, whatever the batch; a shared part is packed
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

from kernels import cpu_lowrank, lowrank_expand, lowrank_forward, lowrank_shrink, pack_expand
from kernels.lowrank import U_ROW_ALIGN
from soco_serve.layout import CheckpointError, LinearEntry, Manifest, basis_name, u_name, v_name, weight_name

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

    @property
    def shared(self) -> bool:
        return self.entry.kind == "shared"

    @property
    def shrink_tensor(self) -> str:
        """The checkpoint tensor that holds this segment's shrink rows."""
        if self.shared:
            return basis_name(self.entry.basis)
        return weight_name(self.hf_name) if self.identity else v_name(self.hf_name)


@dataclass(frozen=True)
class ShrinkPart:
    """Consecutive segments of a layer whose shrink rows live in one tensor."""

    segments: tuple[int, ...]
    bases: tuple[str, ...] | None
    """The segments' shared bases (the key of their group's one tensor), or None: the layer's own rows."""


def plan_shrink_parts(segments: list[SegmentSpec]) -> list[ShrinkPart]:
    """Maximal runs of consecutive segments that are all shared, or all the layer's own.

    The layers of one basis group keep or factorize each matrix type alike, so their shared runs
    have the same bases and hold one tensor between them.
    """
    runs: list[list[int]] = []
    for j, seg in enumerate(segments):
        if runs and segments[runs[-1][-1]].shared == seg.shared:
            runs[-1].append(j)
        else:
            runs.append([j])
    return [ShrinkPart(tuple(run), tuple(segments[j].entry.basis for j in run) if segments[run[0]].shared else None)
            for run in runs]


class SocoLinearConfig(QuantizationConfig):
    """Tells vLLM's layers how the checkpoint stores them (built from the manifest, not a file)."""

    def __init__(self, manifest: Manifest):
        super().__init__()
        self.manifest = manifest
        # the bases of a shared shrink part -> the one Parameter of the layers that hold that part
        self.shared_v: dict[tuple[str, ...], Parameter] = {}
        # every shrink Parameter (loaded by the soco loader, not by the model's load_weights)
        self.shrink_params: list[Parameter] = []
        # checkpoint tensor -> the (layer, segment index) pairs it loads into, one per distinct Parameter
        self.shrink_targets: dict[str, list[tuple[LinearBase, int]]] = {}
        # id of a loaded shrink Parameter -> (that Parameter, kept so the id stays its own; its
        # panels for the CPU kernel): a shared part is packed once
        self.cpu_shrink: dict[int, tuple[Parameter, Parameter]] = {}
        # vLLM module name -> the manifest's (checkpoint's) name, where a model renames modules
        self.hf_names: dict[str, str] = {}

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

    def add_stacked_modules(self, model_class: type) -> None:
        """Fused layers that a model class declares only as a checkpoint rename (StableLM maps
        ``.q_proj`` to ``.qkv_proj`` shard ``q`` in its ``hf_to_vllm_mapper``, with no
        ``packed_modules_mapping``) are added to the mapping, in shard order, so their segments are
        found like any other model's."""
        mapper = getattr(model_class, "hf_to_vllm_mapper", None)
        stacked = getattr(mapper, "orig_to_new_stacked", None) or {}
        fused: dict[str, list[tuple[int, str]]] = {}
        for orig, (new, shard) in stacked.items():
            order = QKV_SHARDS[shard] if isinstance(shard, str) else int(shard)
            fused.setdefault(new.strip("."), []).append((order, orig.strip(".")))
        for leaf, parts in fused.items():
            self.packed_modules_mapping.setdefault(leaf, [name for _, name in sorted(parts)])

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Models whose module names differ from the checkpoint's pass their rename here (vLLM's
        Transformers backend calls GPT-NeoX's ``gpt_neox.layers`` ``model.layers``): layers are then
        found under their vLLM names, while tensors keep the checkpoint's (the model's
        ``load_weights`` renames those itself)."""
        for name in self.manifest.linears:
            mapped = hf_to_vllm_mapper._map_name(weight_name(name))
            if mapped is not None and mapped != weight_name(name):
                self.hf_names[mapped.removesuffix(".weight")] = name

    # -- manifest lookup ----------------------------------------------------------------------
    def segments_for(self, prefix: str) -> list[SegmentSpec] | None:
        """The manifest entries behind a vLLM layer, in its output order; None if not a decoder linear."""
        parent, _, leaf = prefix.rpartition(".")
        hf_leaves = self.packed_modules_mapping.get(leaf, [leaf])
        names = [f"{parent}.{x}" if parent else x for x in hf_leaves]
        names = [self.hf_names.get(n, n) for n in names]
        found = [n in self.manifest.linears for n in names]
        if not any(found):
            return None
        if not all(found):
            missing = [n for n, f in zip(names, found) if not f]
            raise CheckpointError(f"soco_manifest.json: layer {prefix!r} fuses {names}, but {missing} are not listed")
        return [SegmentSpec(n, self.manifest.linears[n]) for n in names]


class SocoLowRankLinearMethod(LinearMethodBase):
    """``y = expand(x · v_catᵀ)``, one shrink for all segments of the layer (one product per shrink part)."""

    def __init__(self, config: SocoLinearConfig, segments: list[SegmentSpec]):
        self.config = config
        self.segments = segments

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        # A weight the source checkpoint stores fused (Phi-3's qkv_proj, Falcon's query_key_value) is
        # one factorization under the fused name (see compress.models.LinearSpec): one segment whose
        # expand rows cover every output of the vLLM layer, in the layer's order once the model's own
        # load_weights has reordered them (it does so for parameters that declare their output_dim).
        source_fused = len(self.segments) == 1 and len(output_partition_sizes) > 1
        if source_fused:
            if layer.tp_size > 1:
                raise CheckpointError(
                    f"layer {layer.prefix!r}: its weight is fused in the source checkpoint and stored as one "
                    "factorization, which soco serves without tensor parallelism only (--tensor-parallel-size 1)")
            output_partition_sizes = [sum(output_partition_sizes)]
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

        layer.soco_in_part = input_size_per_partition
        parts = plan_shrink_parts(self.segments)
        layer.soco_v_names = ("lowrank_v",) if len(parts) == 1 else tuple(f"lowrank_v{i}" for i in range(len(parts)))
        layer.soco_v_slots = [("", 0)] * len(self.segments)  # per segment: (its part's name, first row there)
        for name, part in zip(layer.soco_v_names, parts):
            v, load_here = self._shrink_param(layer, part, (sum(ranks[j] for j in part.segments),
                                                            input_size_per_partition), params_dtype)
            layer.register_parameter(name, v)
            row = 0
            for j in part.segments:
                layer.soco_v_slots[j] = (name, row)
                row += ranks[j]
                if load_here:
                    self.config.shrink_targets.setdefault(self.segments[j].shrink_tensor, []).append((layer, j))

        u_numel = sum(part * r for s, part, r in zip(self.segments, output_partition_sizes, ranks) if not s.identity)
        u = Parameter(torch.empty(u_numel, dtype=params_dtype), requires_grad=False)
        layer.register_parameter("lowrank_u", u)
        set_weight_attrs(u, {"weight_loader": self._load_u, **({"output_dim": 0} if source_fused else {})})

    def _shrink_param(self, layer: LinearBase, part: ShrinkPart, shape: tuple[int, int],
                      dtype: torch.dtype) -> tuple[Parameter, bool]:
        """The Parameter of one shrink part, and whether it is new (its tensors load through this layer)."""
        config = self.config
        if part.bases is not None and part.bases in config.shared_v:
            return config.shared_v[part.bases], False
        v = Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        config.shrink_params.append(v)
        if part.bases is not None:
            config.shared_v[part.bases] = v
            held = [key for key in config.shared_v if key != part.bases and set(key) & set(part.bases)]
            if held:
                logger.warning("layer %s: shared bases %s are held again (also in the part of %s): the layers of "
                               "one group do not share the same segments", layer.prefix, part.bases, held[0])
        return v, True

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
        part = layer.soco_in_part
        return t.narrow(1, layer.tp_rank * part, part)

    @staticmethod
    def _check(layer: LinearBase, tensor: str, got: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(got.shape) != tuple(shape):
            raise CheckpointError(
                f"{tensor}: shape {list(got.shape)} disagrees with the manifest "
                f"(expected {list(shape)} for layer {layer.prefix!r})"
            )

    def load_segment_v(self, layer: LinearBase, j: int, loaded: torch.Tensor) -> None:
        """Copy segment ``j``'s shrink rows (a low-rank V, a basis, or a dense weight) into its part."""
        seg = self.segments[j]
        full_rows = seg.entry.out_features if seg.identity else seg.entry.rank
        self._check(layer, seg.shrink_tensor, loaded, (full_rows, seg.entry.in_features))
        rows = self._in_cols(layer, self._out_rows(layer, j, loaded) if seg.identity else loaded)
        name, start = layer.soco_v_slots[j]
        getattr(layer, name).data.narrow(0, start, layer.soco_ranks[j]).copy_(rows)

    def _load_u(self, param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        layer = self.layer
        j = self._segment(layer, shard_id)
        seg = self.segments[j]
        self._check(layer, u_name(seg.hf_name), loaded, (seg.entry.out_features, seg.entry.rank))
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
        layer.soco_cpu = None  # CPU kernel: (rows of each shrink part, out_features)
        first_v = getattr(layer, layer.soco_v_names[0])
        if first_v.device.type == "cpu" and first_v.dtype == torch.float32 and cpu_lowrank.available():
            # The panels replace the loaded factors: the layer holds one copy of each, and a shared
            # part is packed once, into one Parameter, for its whole group.
            for name in layer.soco_v_names:
                v = getattr(layer, name)
                cached = self.config.cpu_shrink.get(id(v))
                if cached is None:
                    panels = Parameter(cpu_lowrank.pack_panels(v.data), requires_grad=False)
                    cached = self.config.cpu_shrink[id(v)] = (v, panels)
                    v.data = v.data.new_empty(0)
                setattr(layer, name, cached[1])
            cpu = cpu_lowrank.CpuLowRank.build([getattr(layer, n).data for n in layer.soco_v_names],
                                               layer.soco_in_part, us, list(layer.soco_ranks))
            layer.lowrank_u = Parameter(cpu.u, requires_grad=False)
            layer.register_buffer("soco_meta", cpu.meta, persistent=False)
            layer.soco_cpu = (cpu.v_ranks, cpu.out_features)
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
        v = tuple(getattr(layer, name) for name in layer.soco_v_names)
        if not layer.soco_reduce:
            if cpu is not None:
                return cpu_lowrank.forward(x, v, layer.lowrank_u, layer.soco_meta, bias, *cpu)
            return lowrank_forward(x, v, layer.soco_expand, bias)
        # Row-parallel under TP: reduce the rank-sized partial products, then expand on every
        # rank; the bias (which vLLM passes on rank 0 only) is added everywhere.
        from vllm.distributed import tensor_model_parallel_all_reduce

        if cpu is not None:
            v_ranks, out_features = cpu
            h = tensor_model_parallel_all_reduce(cpu_lowrank.shrink(x, v, v_ranks))
            y = cpu_lowrank.expand(h, layer.lowrank_u, layer.soco_meta, layer.bias, out_features)
            return y.view(*x.shape[:-1], out_features)
        h = tensor_model_parallel_all_reduce(lowrank_shrink(x, v))
        return lowrank_expand(h, layer.soco_expand, layer.bias)
