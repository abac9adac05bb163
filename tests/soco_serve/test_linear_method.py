"""The low-rank layer method inside real vLLM layers, without a server: loading, sharding, bias.

Each rank's layer is built under a fake tensor-parallel group (vLLM's rank and world-size
lookups patched); the ranks then run side by side in threads whose all-reduce sums their
tensors, as the real one would. The ranks' outputs, combined as vLLM combines them, must equal
the unsharded layer, computed in float64 from the checkpoint's factors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

pytest.importorskip("vllm")

import vllm.model_executor.layers.linear as vllm_linear  # noqa: E402
import vllm.model_executor.parameter as vllm_parameter  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402

import soco_serve.linear as soco_linear  # noqa: E402
from soco_serve.layout import LinearEntry, basis_name, bias_name, u_name, v_name, weight_name  # noqa: E402
from soco_serve.linear import SocoLinearConfig, SocoLowRankLinearMethod  # noqa: E402
from soco_serve.loader import ShrinkRegistry  # noqa: E402

IN = 16
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@contextmanager
def fake_tp(rank: int, size: int) -> Iterator[None]:
    """vLLM's tensor-parallel rank and size lookups answer ``rank`` / ``size`` (no process group)."""
    with ExitStack() as stack:
        for module in (vllm_linear, vllm_parameter):
            stack.enter_context(mock.patch.object(module, "get_tensor_model_parallel_rank", lambda: rank))
            stack.enter_context(mock.patch.object(module, "get_tensor_model_parallel_world_size", lambda: size))
        stack.enter_context(set_current_vllm_config(VllmConfig()))
        yield


class ThreadAllReduce:
    """An all-reduce across threads, one per rank: every rank gets the sum of all ranks' tensors."""

    def __init__(self, size: int):
        self.size, self.barrier, self.slots = size, threading.Barrier(size), [None] * size
        self.local = threading.local()

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()
        return total

    def run(self, fns: list[Callable[[], object]]) -> list[object]:
        """``fns[r]()`` on rank ``r``, all at once."""
        out: list[object] = [None] * self.size
        errors: list[BaseException] = []

        def body(r: int) -> None:
            self.local.rank = r
            try:
                out[r] = fns[r]()
            except BaseException as exc:  # noqa: BLE001 (re-raised below, in the test's thread)
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


@dataclass
class Checkpoint:
    """A layer's manifest entries and tensors (float64), and its dense weight, the oracle."""

    entries: dict[str, LinearEntry]
    tensors: dict[str, torch.Tensor]
    weights: list[torch.Tensor]
    bias: torch.Tensor | None


def checkpoint(parent: str, leaves: list[tuple[str, int, str]], bias: bool, in_features: int = IN) -> Checkpoint:
    """``leaves``: (name, out_features, kind) with kind 'lowrank:<rank>', 'shared:<rank>' or 'dense'."""
    g = torch.Generator().manual_seed(len(leaves) * 7 + in_features)
    entries, tensors, weights, biases = {}, {}, [], []
    for leaf, out, kind in leaves:
        name = f"{parent}.{leaf}"
        kind, _, rank = kind.partition(":")
        if kind == "dense":
            w = torch.randn(out, in_features, generator=g, dtype=torch.float64)
            tensors[weight_name(name)] = w
            entries[name] = LinearEntry("dense", in_features, out, bias=bias)
        else:
            r = int(rank)
            v = torch.randn(r, in_features, generator=g, dtype=torch.float64)
            u = torch.randn(out, r, generator=g, dtype=torch.float64)
            basis = f"{leaf}.0-1" if kind == "shared" else None
            tensors[basis_name(basis) if basis else v_name(name)] = v
            tensors[u_name(name)] = u
            entries[name] = LinearEntry(kind, in_features, out, r, basis, bias=bias)
            w = u @ v
        weights.append(w)
        if bias:
            b = torch.randn(out, generator=g, dtype=torch.float64)
            tensors[bias_name(name)] = b
            biases.append(b)
    return Checkpoint(entries, tensors, weights, torch.cat(biases) if bias else None)


def build(ckpt: Checkpoint, make: Callable[[SocoLinearConfig], vllm_linear.LinearBase], rank: int, size: int,
          dtype: torch.dtype) -> vllm_linear.LinearBase:
    """One rank's layer, loaded as the soco loader loads it, and packed for its kernel."""
    config = SocoLinearConfig(SimpleNamespace(linears=ckpt.entries))
    config.packed_modules_mapping = PACKED
    with fake_tp(rank, size):
        layer = make(config)
        assert isinstance(layer.quant_method, SocoLowRankLinearMethod)
        registry = ShrinkRegistry(layer)
    shards = [leaf.rpartition(".")[2] for leaf in ckpt.entries]
    for name, t in ckpt.tensors.items():
        t = t.to(dtype)
        for target, j in registry.targets.get(name, []):
            SocoLowRankLinearMethod.load_segment_v(target, j, t)
        hf, _, kind = name.rpartition(".")
        shard_id = None
        if len(shards) > 1 and hf.rpartition(".")[2] in shards:
            leaf = hf.rpartition(".")[2]
            shard_id = leaf[0] if "qkv_proj" in layer.prefix else shards.index(leaf)
        if kind == "lowrank_u":
            layer.lowrank_u.weight_loader(layer.lowrank_u, t, shard_id)
        elif kind == "bias":
            args = () if shard_id is None else (shard_id,)
            layer.bias.weight_loader(layer.bias, t, *args)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def reference(ckpt: Checkpoint, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ torch.cat(ckpt.weights).T
    return y if ckpt.bias is None else y + ckpt.bias


TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


ATTN, MLP = "model.layers.0.self_attn", "model.layers.0.mlp"


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def run_ranks(layers: list[vllm_linear.LinearBase], xs: list[torch.Tensor]) -> list[tuple]:
    """Every rank's ``layer(x)`` at once, the all-reduces (the method's and vLLM's) summing across them."""
    reduce = ThreadAllReduce(len(layers))
    with mock.patch.object(soco_linear, "tensor_model_parallel_all_reduce", reduce), \
            mock.patch.object(vllm_linear, "tensor_model_parallel_all_reduce", reduce):
        return reduce.run([lambda r=r: layers[r](xs[r]) for r in range(len(layers))])


def row_parallel(parent: str, leaf: str, out: int, dtype: torch.dtype, bias: bool, skip_bias_add: bool = False):
    return lambda config: vllm_linear.RowParallelLinear(
        IN, out, bias=bias, skip_bias_add=skip_bias_add, params_dtype=dtype, quant_config=config,
        prefix=f"{parent}.{leaf}")


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_skip_bias_add_returns_the_bias_unadded(size, dtype):
    """A row-parallel layer built with ``skip_bias_add`` hands its bias back to the caller and
    does not add it, also under tensor parallelism where every rank expands the reduced ``h``."""
    ckpt = checkpoint(ATTN, [("o_proj", 12, "lowrank:6")], bias=True)
    make = row_parallel(ATTN, "o_proj", 12, dtype, bias=True, skip_bias_add=True)
    layers = [build(ckpt, make, r, size, dtype) for r in range(size)]
    x = torch.randn(5, IN, dtype=dtype)
    outs = run_ranks(layers, list(x.chunk(size, dim=-1)))
    ref = reference(ckpt, x)
    for layer, (y, b) in zip(layers, outs):
        assert b is layer.bias
        assert relative_error(y, ref - ckpt.bias) < TOL[dtype]
        assert relative_error(y + b, ref) < TOL[dtype]



def qkv(kv_heads: int, dtype: torch.dtype, bias: bool):
    return lambda config: vllm_linear.QKVParallelLinear(
        IN, 4, 4, kv_heads, bias=bias, params_dtype=dtype, quant_config=config, prefix=f"{ATTN}.qkv_proj")


def gate_up(dtype: torch.dtype, bias: bool):
    return lambda config: vllm_linear.MergedColumnParallelLinear(
        IN, [24, 24], bias=bias, params_dtype=dtype, quant_config=config, prefix=f"{MLP}.gate_up_proj")


# name -> (parent, leaves (name, out, kind), layer factory(dtype, bias)); column-parallel unless row_parallel.
LAYERS = {
    "qkv_shared_dense_private": (ATTN, [("q_proj", 16, "shared:5"), ("k_proj", 8, "dense"), ("v_proj", 8, "lowrank:3")],
                                 lambda d, b: qkv(2, d, b)),
    "qkv_replicated_kv_heads": (ATTN, [("q_proj", 16, "lowrank:5"), ("k_proj", 4, "shared:2"), ("v_proj", 4, "dense")],
                                lambda d, b: qkv(1, d, b)),
    "gate_up_shared_private": (MLP, [("gate_proj", 24, "shared:7"), ("up_proj", 24, "lowrank:5")], gate_up),
    "o_private": (ATTN, [("o_proj", 12, "lowrank:6")], lambda d, b: row_parallel(ATTN, "o_proj", 12, d, b)),
    "down_shared": (MLP, [("down_proj", 12, "shared:4")], lambda d, b: row_parallel(MLP, "down_proj", 12, d, b)),
}


def combine_columns(layers: list[vllm_linear.LinearBase], ys: list[torch.Tensor]) -> torch.Tensor:
    """The full output from the ranks' column blocks: each segment's blocks side by side, a
    replicated block (k/v heads fewer than ranks) once."""
    blocks = [y.split(layers[0].output_partition_sizes, dim=-1) for y in ys]
    replicas = getattr(layers[0], "num_kv_head_replicas", 1)
    full = []
    for j in range(len(blocks[0])):
        ranks = range(0, len(ys), replicas) if j > 0 else range(len(ys))
        for r in range(len(ys)):
            if r not in ranks:
                torch.testing.assert_close(blocks[r][j], blocks[r - r % replicas][j], rtol=0, atol=0)
        full.extend(blocks[r][j] for r in ranks)
    return torch.cat(full, dim=-1)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", LAYERS)
def test_two_ranks_combine_to_the_unsharded_layer(name, dtype, bias):
    """Each rank loads its shard (vLLM's slicing of U rows, dense rows, V columns) and runs its
    kernel; concatenated (column-parallel) or all-reduced (row-parallel), the ranks give the
    unsharded layer. float64 runs the torch path, float32 on a CPU the fused CPU kernel."""
    parent, leaves, factory = LAYERS[name]
    ckpt = checkpoint(parent, leaves, bias)
    make = factory(dtype, bias)
    x = torch.randn(5, IN, dtype=dtype)
    ref = reference(ckpt, x)
    (y1, _), = run_ranks([build(ckpt, make, 0, 1, dtype)], [x])
    assert relative_error(y1, ref) < TOL[dtype]
    layers = [build(ckpt, make, r, 2, dtype) for r in range(2)]
    row = isinstance(layers[0], vllm_linear.RowParallelLinear)
    outs = [y for y, _ in run_ranks(layers, list(x.chunk(2, dim=-1)) if row else [x, x])]
    if row:  # the method all-reduces h, and every rank holds the whole output
        for y in outs:
            assert relative_error(y, ref) < TOL[dtype]
    else:
        assert relative_error(combine_columns(layers, outs), ref) < TOL[dtype]
