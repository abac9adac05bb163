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
``lowrank_v1``, ... The kernels take the parts as they are (:data:`kernels.segments.ShrinkFactors`).
The shrink Parameters are made by the soco loader once the model is built
(:class:`soco_serve.loader.ShrinkRegistry`: it alone knows which layers share a basis), and all
shrink rows (bases, private V, dense weight rows) are loaded by it through
:meth:`SocoLowRankLinearMethod.load_segment_v`, never through the model's ``load_weights``.
Everything a layer keeps beyond vLLM's own attributes is one :class:`SocoLayerState`, at
``layer.soco``.

Tensor parallelism mirrors vLLM's dense sharding:

* column-parallel (qkv, gate/up): ``V`` whole on every rank, ``U``'s output rows split (an
  identity segment's weight rows split likewise);
* row-parallel (o, down): ``V``'s input columns split; the rank-sized partial products are
  all-reduced, then every rank applies the whole ``U``. The method therefore turns the layer's
  own output all-reduce off (``reduce_results``), and every rank adds the bias vLLM gives rank 0
  (none for a layer built with ``skip_bias_add``, whose caller adds it; :class:`RowParallelReduce`).

After loading, the method picks one kernel object for the layer (:mod:`kernels.backends`: the
fused CPU kernel for float32 on a CPU, the Triton/torch custom ops on CUDA, the torch path
elsewhere), which packs the factors once into the layout it reads, as vLLM's dense CPU layers
prepack theirs for oneDNN; a shared part is packed once for its group. ``apply`` is one call on
that object.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import Parameter

from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.model_executor.utils import set_weight_attrs

from kernels.backends import LowRankKernel, choose_kernel
from soco_serve.layout import (
    QUANT_METHOD,
    CheckpointError,
    LinearEntry,
    Manifest,
    basis_name,
    check_quantization_config,
    read_manifest,
    u_name,
    v_name,
    weight_name,
)

logger = init_logger("vllm.soco_serve.linear")

QKV_SHARDS = ("q", "k", "v")


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


LOAD_FORMAT = "soco"  # the soco model loader's name (soco_serve.loader)

NEEDS_SOCO_LOADER = (
    "{model}: a soco checkpoint is loaded by soco's model loader: serve it with `vllm serve {model} "
    f"--load-format {LOAD_FORMAT}`. vLLM's default loader cannot: it gives every checkpoint tensor to the model's "
    "load_weights, which has no parameter for a shared basis (soco_bases.*, one tensor for several layers) "
    "nor for the layers' shrink factors, which soco's loader creates once the model is built"
)


@register_quantization_config(QUANT_METHOD)
class SocoLinearConfig(QuantizationConfig):
    """Tells vLLM's layers how the checkpoint stores them: built from the manifest (and the model
    class's fused-layer renames), not a file; read only once vLLM has built the model.

    Registered as vLLM's quantization method ``soco``, the ``quant_method`` of a format-2
    checkpoint's ``config.json``, so vLLM accepts the checkpoint. The instance vLLM makes from
    ``config.json`` (:meth:`from_config`, no manifest) only marks the engine's model as soco's:
    the soco loader builds the model with its own instance (:class:`soco_serve.loader.SocoModelLoader`),
    and any other loader that asks the marker for a layer's method is stopped at once
    (:meth:`get_quant_method`).
    """

    def __init__(self, manifest: Manifest | None, model_class: type | None = None):
        super().__init__()
        self.manifest = manifest
        self.model_name = "DIR"  # the folder, once vLLM gives it (maybe_update_config); named in errors
        # vLLM module name -> the manifest's (checkpoint's) name, where a model renames modules
        # (filled by vLLM through apply_vllm_mapper while it builds the model)
        self.hf_names: dict[str, str] = {}
        if model_class is not None:
            self.add_stacked_modules(model_class)

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
        """The engine's marker, from ``config.json``'s ``quantization_config`` (a newer format is refused)."""
        check_quantization_config(config)
        return cls(None)

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Read the manifest while vLLM builds its config, before any worker starts: a folder without
        one, or of a format this soco-serve cannot read, fails at once. The marker keeps no manifest
        (the soco loader reads its own), so it can never configure layers by mistake."""
        read_manifest(model_name)
        self.model_name = model_name

    def built_manifest(self) -> Manifest:
        """The manifest of a config the soco loader built; the engine's marker (no manifest) stops
        whichever other loader is building the model, at the first place that needs the layers."""
        if self.manifest is None:
            raise CheckpointError(NEEDS_SOCO_LOADER.format(model=self.model_name))
        return self.manifest

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        self.built_manifest()
        if not isinstance(layer, LinearBase):
            return None
        segments = self.segments_for(prefix)
        if segments is None or all(s.identity for s in segments):
            return UnquantizedLinearMethod()
        return SocoLowRankLinearMethod(segments)

    def add_stacked_modules(self, model_class: type) -> None:
        """Fused layers that a model class declares only as a checkpoint rename (StableLM maps
        ``.q_proj`` to ``.qkv_proj`` shard ``q`` in its ``hf_to_vllm_mapper``, with no
        ``packed_modules_mapping``) are added to the mapping, in shard order, so their segments are
        found like any other model's."""
        mapper = getattr(model_class, "hf_to_vllm_mapper", None)
        stacked = getattr(mapper, "orig_to_new_stacked", None) or {}
        fused: dict[str, list[tuple[int, str]]] = {}
        for orig, (new, shard) in stacked.items():
            order = QKV_SHARDS.index(shard) if isinstance(shard, str) else int(shard)
            fused.setdefault(new.strip("."), []).append((order, orig.strip(".")))
        for leaf, parts in fused.items():
            self.packed_modules_mapping.setdefault(leaf, [name for _, name in sorted(parts)])

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Models whose module names differ from the checkpoint's pass their rename here (vLLM's
        Transformers backend calls GPT-NeoX's ``gpt_neox.layers`` ``model.layers``): layers are then
        found under their vLLM names, while tensors keep the checkpoint's (the model's
        ``load_weights`` renames those itself)."""
        for name in self.built_manifest().linears:
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


def _loaded_by_soco_loader(param: Parameter, loaded: torch.Tensor, *args: Any) -> None:
    raise CheckpointError("shrink rows are loaded by the soco loader (load_segment_v), not by the model's load_weights")


def in_features(layer: LinearBase) -> int:
    """Input features this rank holds (vLLM's replicated layers keep no per-partition size)."""
    return getattr(layer, "input_size_per_partition", layer.input_size)


@dataclass
class SocoLayerState:
    """A low-rank layer's own state, beside vLLM's (``output_partition_sizes``, ``tp_rank``, ...)."""

    segments: tuple[SegmentSpec, ...]
    ranks: tuple[int, ...]
    """Per segment, its rows of ``v_cat`` on this rank (an identity segment: its output rows here)."""
    parts: tuple[ShrinkPart, ...]
    v_names: tuple[str, ...]
    """The layer attribute of each shrink part."""
    row_parallel: bool
    reduce: bool
    """Row-parallel under tensor parallelism: the all-reduce happens inside ``apply``, on ``h``."""
    kernel: LowRankKernel | RowParallelReduce | None = None
    """Picked after loading."""

    def out_sizes(self, layer: LinearBase) -> list[int]:
        """Per segment, its output rows on this rank: vLLM's ``output_partition_sizes``, or their
        sum for one segment that the source checkpoint stores fused (Phi-3's ``qkv_proj``)."""
        sizes = list(layer.output_partition_sizes)
        return sizes if len(sizes) == len(self.segments) else [sum(sizes)]

    def slot(self, j: int) -> tuple[str, int]:
        """Segment ``j``'s shrink rows: its part's attribute and the first row there."""
        for name, part in zip(self.v_names, self.parts):
            if j in part.segments:
                return name, sum(self.ranks[i] for i in part.segments if i < j)
        raise IndexError(j)

    def part_shape(self, i: int, layer: LinearBase) -> tuple[int, int]:
        return sum(self.ranks[j] for j in self.parts[i].segments), in_features(layer)

    def expand_factors(self, layer: LinearBase, u_flat: torch.Tensor) -> list[torch.Tensor | None]:
        """Per segment ``U_j [out_j, r_j]`` as views of the loaded flat buffer (None: identity)."""
        us: list[torch.Tensor | None] = []
        offset = 0
        for s, part, r in zip(self.segments, self.out_sizes(layer), self.ranks):
            if s.identity:
                us.append(None)
            else:
                us.append(u_flat.narrow(0, offset, part * r).view(part, r))
                offset += part * r
        return us


class SocoLowRankLinearMethod(LinearMethodBase):
    """``y = expand(x · v_catᵀ)``, one shrink for all segments of the layer (one product per shrink part)."""

    def __init__(self, segments: list[SegmentSpec]):
        self.segments = tuple(segments)

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
        row_parallel = isinstance(layer, RowParallelLinear)
        if row_parallel and len(self.segments) != 1:
            raise CheckpointError(f"layer {layer.prefix!r}: a row-parallel layer has one output, got {len(self.segments)}")
        ranks = tuple(part if s.identity else s.entry.rank for s, part in zip(self.segments, output_partition_sizes))
        # The row-parallel reduction happens on the rank-sized product, inside apply().
        reduce = row_parallel and layer.tp_size > 1 and layer.reduce_results
        if reduce:
            layer.reduce_results = False
        parts = tuple(plan_shrink_parts(list(self.segments)))
        v_names = ("lowrank_v",) if len(parts) == 1 else tuple(f"lowrank_v{i}" for i in range(len(parts)))
        layer.soco = SocoLayerState(self.segments, ranks, parts, v_names, row_parallel, reduce)

        u_numel = sum(part * r for s, part, r in zip(self.segments, output_partition_sizes, ranks) if not s.identity)
        u = Parameter(torch.empty(u_numel, dtype=params_dtype), requires_grad=False)
        layer.register_parameter("lowrank_u", u)
        set_weight_attrs(u, {"weight_loader": functools.partial(self._load_u, layer),
                             **({"output_dim": 0} if source_fused else {})})

    @staticmethod
    def new_shrink_param(layer: LinearBase, i: int) -> ModelWeightParameter:
        """An empty Parameter for the layer's shrink part ``i`` (the loader decides which layers share it)."""
        u = layer.lowrank_u
        data = torch.empty(layer.soco.part_shape(i, layer), dtype=u.dtype, device=u.device)
        param = ModelWeightParameter(data=data, output_dim=0, input_dim=1, weight_loader=_loaded_by_soco_loader)
        param.tp_rank, param.tp_size = layer.tp_rank, layer.tp_size
        return param

    # -- loading ------------------------------------------------------------------------------
    @staticmethod
    def _check(layer: LinearBase, tensor: str, got: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(got.shape) != tuple(shape):
            raise CheckpointError(
                f"{tensor}: shape {list(got.shape)} disagrees with the manifest "
                f"(expected {list(shape)} for layer {layer.prefix!r})"
            )

    @staticmethod
    def load_segment_v(layer: LinearBase, j: int, loaded: torch.Tensor) -> None:
        """Copy segment ``j``'s shrink rows (a low-rank V, a basis, or a dense weight) into its part.

        vLLM's parameter methods do the tensor-parallel slicing: a row-parallel layer's input
        columns; a column-parallel layer's dense rows (k/v heads may be replicated); a low-rank
        V is whole on every column-parallel rank.
        """
        st = layer.soco
        seg = st.segments[j]
        full_rows = seg.entry.out_features if seg.identity else seg.entry.rank
        SocoLowRankLinearMethod._check(layer, seg.shrink_tensor, loaded, (full_rows, seg.entry.in_features))
        name, start = st.slot(j)
        param: ModelWeightParameter = getattr(layer, name)
        if st.row_parallel:
            param.load_row_parallel_weight(loaded)  # one segment: its part is the whole Parameter
        elif not seg.identity:
            param.data.narrow(0, start, st.ranks[j]).copy_(loaded)
        elif isinstance(layer, QKVParallelLinear):
            param.load_qkv_weight(loaded, shard_offset=start, shard_size=st.ranks[j], shard_id=QKV_SHARDS[j],
                                  num_heads=layer.num_kv_head_replicas)
        else:
            param.load_merged_column_weight(loaded, shard_offset=start, shard_size=st.ranks[j])

    @staticmethod
    def _segment(layer: LinearBase, shard_id: Any) -> int:
        if shard_id is None:
            if len(layer.soco.segments) != 1:
                raise CheckpointError(f"layer {layer.prefix!r}: a fused layer's factors need a shard id")
            return 0
        return QKV_SHARDS.index(shard_id) if isinstance(shard_id, str) else int(shard_id)

    def _load_u(self, layer: LinearBase, param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        st = layer.soco
        j = self._segment(layer, shard_id)
        seg = st.segments[j]
        self._check(layer, u_name(seg.hf_name), loaded, (seg.entry.out_features, seg.entry.rank))
        part, rank = st.out_sizes(layer)[j], st.ranks[j]
        if not st.row_parallel:  # this rank's output rows (k/v heads may be replicated)
            shard = layer.tp_rank // layer.num_kv_head_replicas if isinstance(layer, QKVParallelLinear) and j > 0 \
                else layer.tp_rank
            loaded = loaded.narrow(0, shard * part, part)
        st.expand_factors(layer, param.data)[j].copy_(loaded)

    # -- after loading, and the forward -----------------------------------------------------------
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Pick the layer's kernel (:func:`kernels.backends.choose_kernel`) and let it pack the factors once."""
        st = layer.soco
        us = st.expand_factors(layer, layer.lowrank_u.data)
        kernel = choose_kernel(getattr(layer, st.v_names[0]))(st.v_names)
        kernel.pack(layer, in_features(layer), us, list(st.ranks))
        logger.info_once("soco: low-rank layers run the %s", kernel.description)
        st.kernel = RowParallelReduce(kernel) if st.reduce else kernel

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.soco.kernel.apply(layer, x, bias)


class RowParallelReduce:
    """A row-parallel layer under tensor parallelism: the rank-sized partial products are
    all-reduced (far fewer bytes than the outputs), then every rank expands the whole ``h``."""

    def __init__(self, kernel: LowRankKernel):
        self.kernel = kernel

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # vLLM gives the bias to rank 0 only, because it sums the ranks' outputs. Here every rank
        # holds the whole output (the sum happened on h), so every rank adds what rank 0 is
        # given: the layer's bias, unless the layer returns it to its caller (skip_bias_add).
        if layer.tp_rank > 0 and not layer.skip_bias_add:
            bias = layer.bias
        h = tensor_model_parallel_all_reduce(self.kernel.shrink(layer, x))
        return self.kernel.expand(layer, h, bias)
