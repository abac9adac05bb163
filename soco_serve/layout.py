"""The soco checkpoint layout: the one contract between the compressor and the loaders.

The compressor (``compress/``) writes it, the transformers loader and the vLLM plugin read it,
and all three go through this module, so the file names, tensor names, manifest fields and
the format version are defined exactly once. This module imports neither vLLM nor transformers
(the package's ``__init__`` does import transformers, to register soco's quantizer with it).

A checkpoint folder holds:

* ``config.json``, generation config and tokenizer files of the source model, copied, so that
  vLLM and transformers recognise the architecture (``config.json`` with the checkpoint's dtype
  and soco's ``quantization_config``, below);
* ``soco_manifest.json`` (:class:`Manifest`): format version, provenance, method and settings,
  ratios, and one :class:`LinearEntry` per decoder linear layer, plus the shared bases;
* ``soco-model-XXXXX-of-YYYYY.safetensors`` shards and ``soco-model.safetensors.index.json``
  (the Hugging Face sharding scheme under our own prefix, so nothing mistakes the folder for a
  dense checkpoint).

Tensor names (``W ≈ U @ V``, ``y = x Vᵀ Uᵀ``, torch's ``[out, in]`` convention):

* every tensor that is not a decoder linear weight keeps its Hugging Face name (embeddings,
  norms, head, biases ``<layer>.bias``);
* ``dense``: ``<layer>.weight`` ``[out, in]``;
* ``lowrank``: ``<layer>.lowrank_u`` ``[out, r]`` and ``<layer>.lowrank_v`` ``[r, in]``;
* ``shared``: ``<layer>.lowrank_u`` ``[out, r]`` (the layer's coefficients) and the group's basis
  ``soco_bases.<basis id>`` ``[r, in]``, stored once for every layer of the group.

``config.json`` carries ``quantization_config`` (:func:`quantization_config`,
``{"quant_method": "soco", "format_version": N}``) from version 2 on: it is how transformers and
vLLM recognise the folder as a soco checkpoint with no extra flag (each looks ``soco`` up in its
registry of quantization methods, where ``import soco_serve`` and the vLLM plugin put it), and how
an older reader is stopped: neither knows ``soco`` unless soco-serve registered it.

Format versions (:data:`FORMAT_VERSION` is written; :data:`READABLE_VERSIONS` are read; a newer
one is refused, naming the file, so an old soco-serve never misreads a new checkpoint):

* 1: the layout above; ``config.json`` has no ``quantization_config`` (the compressor removed the
  source model's). Loaded by ``soco_serve.hf.load_soco_model`` and ``vllm serve --load-format soco``.
* 2: the same tensors and manifest; ``config.json`` gains ``quantization_config``, so
  ``AutoModelForCausalLM.from_pretrained(dir)`` works after ``import soco_serve``. The version
  changed because readers of version 1 do not know the ``soco`` quantization method: the previous
  vLLM plugin never registered it, so vLLM stops at ``config.json`` with "Unknown quantization
  method: soco" even under ``--load-format soco``; the bump makes every older soco reader that gets
  as far as the manifest say why (an unknown format version) instead of failing elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

FORMAT_NAME = "soco"
FORMAT_VERSION = 2
READABLE_VERSIONS: tuple[int, ...] = (1, 2)
QUANT_METHOD = "soco"  # config.json's quantization_config.quant_method (format 2 on)
CONFIG_FILE = "config.json"
MANIFEST_FILE = "soco_manifest.json"
INDEX_FILE = "soco-model.safetensors.index.json"
SHARD_TEMPLATE = "soco-model-{index:05d}-of-{total:05d}.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

BASIS_PREFIX = "soco_bases."
U_SUFFIX = ".lowrank_u"
V_SUFFIX = ".lowrank_v"
WEIGHT_SUFFIX = ".weight"
BIAS_SUFFIX = ".bias"

Kind = Literal["dense", "lowrank", "shared"]
KINDS: tuple[str, ...] = ("dense", "lowrank", "shared")


class CheckpointError(ValueError):
    """A soco checkpoint is missing, malformed or disagrees with its manifest.

    The message always names the file and, where there is one, the tensor or field.
    """


def u_name(layer: str) -> str:
    return layer + U_SUFFIX


def v_name(layer: str) -> str:
    return layer + V_SUFFIX


def weight_name(layer: str) -> str:
    return layer + WEIGHT_SUFFIX


def bias_name(layer: str) -> str:
    return layer + BIAS_SUFFIX


def basis_name(basis_id: str) -> str:
    return BASIS_PREFIX + basis_id


def check_format_version(version: Any, where: str) -> None:
    """Refuse a format version this soco-serve cannot read (a newer one above all), naming ``where``."""
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where}: unknown format_version {version!r}; this soco-serve reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade soco-serve or re-compress)"
        )


def quantization_config() -> dict[str, Any]:
    """The ``quantization_config`` entry the compressor writes into ``config.json`` (format 2 on).

    It carries no settings: the manifest describes the layers. ``quant_method`` makes transformers
    and vLLM look up soco's handlers; ``format_version`` lets them refuse a newer checkpoint before
    reading anything else.
    """
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}


def check_quantization_config(d: Mapping[str, Any], where: str = CONFIG_FILE) -> None:
    """Check a ``config.json`` ``quantization_config`` entry against :func:`quantization_config`."""
    if not isinstance(d, Mapping) or d.get("quant_method") != QUANT_METHOD:
        method = d.get("quant_method") if isinstance(d, Mapping) else d
        raise CheckpointError(f"{where}: quantization_config.quant_method is {method!r}, expected {QUANT_METHOD!r}")
    check_format_version(d.get("format_version"), f"{where}: quantization_config")


@dataclass
class LinearEntry:
    """How one decoder linear layer (Hugging Face module name) is stored."""

    kind: Kind
    in_features: int
    out_features: int
    rank: int | None = None  # lowrank / shared only
    basis: str | None = None  # shared only
    bias: bool = False

    def stored_params(self) -> int:
        """Parameters this layer stores itself (a shared basis is counted by its :class:`BasisEntry`)."""
        n = self.out_features if self.bias else 0
        if self.kind == "dense":
            return n + self.in_features * self.out_features
        assert self.rank is not None
        n += self.out_features * self.rank
        if self.kind == "lowrank":
            n += self.rank * self.in_features
        return n

    def multiply_adds(self) -> int:
        """Multiply-adds per token (bias excluded): a shared layer applies its group's whole basis,
        so sharing saves storage but not this (nor the bytes a decode step streams)."""
        if self.kind == "dense":
            return self.in_features * self.out_features
        assert self.rank is not None
        return self.rank * (self.in_features + self.out_features)


@dataclass
class BasisEntry:
    """A basis ``[rank, in_features]`` shared by the listed layers (the group)."""

    rank: int
    in_features: int
    layers: list[str]

    def stored_params(self) -> int:
        return self.rank * self.in_features


@dataclass
class Manifest:
    """Everything a reader needs to know about a soco checkpoint, besides the tensors."""

    architecture: str
    dtype: str
    linears: dict[str, LinearEntry]
    bases: dict[str, BasisEntry] = field(default_factory=dict)
    method: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    source_model: str = ""
    source_sha256: str = ""
    target_ratio: float | None = None
    achieved_ratio: float | None = None
    model_ratio: float | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    # -- accounting -------------------------------------------------------------------------
    def dense_linear_params(self) -> int:
        return sum(e.in_features * e.out_features for e in self.linears.values())

    def stored_linear_params(self) -> int:
        """Parameters of the decoder linears as stored: bases once, biases excluded."""
        own = sum(e.stored_params() - (e.out_features if e.bias else 0) for e in self.linears.values())
        return own + sum(b.stored_params() for b in self.bases.values())

    def linear_multiply_adds(self) -> int:
        """Multiply-adds per token of the decoder linears; ``dense_linear_params()`` for the dense model."""
        return sum(e.multiply_adds() for e in self.linears.values())

    # -- expected tensors -----------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every linear-layer tensor the shards must hold (other tensors pass through)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, e in self.linears.items():
            if e.kind == "dense":
                shapes[weight_name(name)] = (e.out_features, e.in_features)
            else:
                shapes[u_name(name)] = (e.out_features, e.rank)  # type: ignore[assignment]
                if e.kind == "lowrank":
                    shapes[v_name(name)] = (e.rank, e.in_features)  # type: ignore[assignment]
            if e.bias:
                shapes[bias_name(name)] = (e.out_features,)
        for bid, b in self.bases.items():
            shapes[basis_name(bid)] = (b.rank, b.in_features)
        return shapes

    # -- (de)serialisation ------------------------------------------------------------------------
    def validate(self, where: str = MANIFEST_FILE) -> None:
        """Check internal consistency; raise :class:`CheckpointError` naming the field."""
        if self.format != FORMAT_NAME:
            raise CheckpointError(f"{where}: field 'format' is {self.format!r}, expected {FORMAT_NAME!r}")
        check_format_version(self.format_version, where)
        for name, e in self.linears.items():
            ctx = f"{where}: linears[{name!r}]"
            if e.kind not in KINDS:
                raise CheckpointError(f"{ctx}.kind is {e.kind!r}, expected one of {KINDS}")
            if e.kind != "dense" and (e.rank is None or e.rank < 1):
                raise CheckpointError(f"{ctx}.rank is {e.rank!r}, expected a positive integer")
            if e.kind == "shared":
                if e.basis not in self.bases:
                    raise CheckpointError(f"{ctx}.basis {e.basis!r} does not exist in 'bases'")
                b = self.bases[e.basis]
                if b.rank != e.rank or b.in_features != e.in_features:
                    raise CheckpointError(
                        f"{ctx}: rank/in_features ({e.rank}, {e.in_features}) disagree with basis "
                        f"{e.basis!r} ({b.rank}, {b.in_features})"
                    )
        for bid, b in self.bases.items():
            for layer in b.layers:
                if self.linears.get(layer, None) is None or self.linears[layer].basis != bid:
                    raise CheckpointError(f"{where}: bases[{bid!r}] lists layer {layer!r}, which does not use it")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = MANIFEST_FILE) -> "Manifest":
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{where}: expected a JSON object")
        if d.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{where}: field 'format' is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        check_format_version(d.get("format_version"), where)
        try:
            linears = {k: LinearEntry(**v) for k, v in d["linears"].items()}
            bases = {k: BasisEntry(**v) for k, v in d.get("bases", {}).items()}
            rest = {k: v for k, v in d.items() if k not in ("linears", "bases")}
            m = cls(linears=linears, bases=bases, **rest)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{where}: malformed manifest ({exc})") from exc
        m.validate(where)
        return m


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
_COPY_CHUNK = 64 * 1024**2


class _ShardWriter:
    """One safetensors file written a tensor at a time, so at most one tensor is in memory.

    safetensors puts the header (every tensor's dtype, shape and byte offsets) before the data,
    and the header is known only once the shard's last tensor has arrived; ``save_file`` therefore
    wants the whole shard in memory (up to ``--max-shard-size``, more than one decoder layer of a
    large model). Here each tensor's bytes go to a side file as they come; :meth:`close` writes the
    header and appends the side file (a copy on disk, not in memory). The file is the same format
    ``save_file`` writes (little-endian, header padded with spaces to 8 bytes, ``__metadata__``
    first); its tensors are in the order added.
    """

    def __init__(self, path: Path, metadata: dict[str, str]):
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self.header: dict[str, Any] = {"__metadata__": metadata}
        self.nbytes = 0
        self._data = open(self.data_path, "wb")

    def add(self, name: str, t: torch.Tensor) -> None:
        """Append ``t`` (contiguous, on the CPU) to the shard's data."""
        n = t.numel() * t.element_size()
        self.header[name] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.nbytes, self.nbytes + n]}
        if n:
            self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.nbytes += n

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def discard(self) -> None:
        self._data.close()

    def close(self) -> None:
        """Write the shard file: header, then the data; the side file is removed."""
        self._data.close()
        header = json.dumps(self.header, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, _COPY_CHUNK)
        self.data_path.unlink()


class CheckpointWriter:
    """Streams tensors into shards inside a temporary folder; :meth:`commit` renames it into place.

    Nothing at ``out_dir`` changes until :meth:`commit`; an exception (or forgetting to commit)
    leaves only the temporary folder, which the context manager removes. An existing
    ``out_dir`` is refused unless ``force``.
    """

    def __init__(self, out_dir: str | os.PathLike, force: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not force:
            raise FileExistsError(f"{self.out_dir}: output folder exists; pass --force to replace it")
        self.force = force
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like any folder
        self.max_shard_bytes = max_shard_bytes
        self._shard: _ShardWriter | None = None
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self._finished = False

    @property
    def path(self) -> Path:
        """The temporary folder: write side files (config, report) here before :meth:`commit`."""
        return self.tmp

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {name!r} has NaN or Inf values; refusing to write it")
        self._names.add(name)
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store here")
        nbytes = t.numel() * t.element_size()
        if self._shard is not None and self._shard.nbytes + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._shard is None:
            self._shard = _ShardWriter(self.tmp / f"shard-{len(self._shards)}.tmp", {"format": "pt"})
        self._shard.add(name, t)

    def _close_shard(self) -> None:
        if self._shard is None:
            return
        self._shard.close()
        self._shards.append(self._shard.names())
        self._shard = None

    def finish(self, manifest: Manifest) -> Path:
        """Check the tensors against the manifest and write index and manifest (still in the
        temporary folder, which is now a complete checkpoint that readers can open)."""
        self._close_shard()
        manifest.validate()
        missing = sorted(set(manifest.expected_shapes()) - self._names)
        if missing:
            raise CheckpointError(f"{self.out_dir}: manifest expects tensors never written: {missing[:5]}")
        total = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self._shards):
            fname = SHARD_TEMPLATE.format(index=i + 1, total=total)
            (self.tmp / f"shard-{i}.tmp").rename(self.tmp / fname)
            weight_map.update({n: fname for n in names})
        total_size = sum((self.tmp / f).stat().st_size for f in set(weight_map.values()))
        _write_json(self.tmp / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
        _write_json(self.tmp / MANIFEST_FILE, manifest.to_json())
        self._finished = True
        return self.tmp

    def commit(self, manifest: Manifest | None = None) -> Path:
        """Rename the finished temporary folder to ``out_dir`` (replacing it only with ``force``)."""
        if manifest is not None:
            self.finish(manifest)
        if not self._finished:
            raise RuntimeError("commit() before finish(): the checkpoint has no manifest yet")
        if self.out_dir.exists():
            if not self.force:
                raise FileExistsError(f"{self.out_dir}: output folder appeared while writing; pass --force to replace it")
            trash = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.out_dir.parent))
            self.out_dir.rename(trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        self.tmp.rename(self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.discard()
            self._shard = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # no-op after a successful commit: the folder was renamed away


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def is_soco_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(ckpt_dir: str | os.PathLike) -> Manifest:
    path = Path(ckpt_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: not found; {ckpt_dir} is not a soco checkpoint (make one with soco-compress)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from exc
    return Manifest.from_json(data, where=str(path))


def safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header, so truncation is caught before any read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > size - 8:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {hlen} > file size {size})")
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + hlen + end != size:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file: header describes {8 + hlen + end} bytes, "
            f"file has {size}"
        )
    return header


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class CheckpointReader:
    """Lazy, memory-mapped access to a soco checkpoint's tensors, validated against its manifest.

    Opening it reads only JSON headers; :meth:`get` maps one tensor at a time.
    """

    def __init__(self, ckpt_dir: str | os.PathLike):
        self.dir = Path(ckpt_dir)
        self.manifest = read_manifest(self.dir)
        index_path = self.dir / INDEX_FILE
        try:
            index = json.loads(index_path.read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index_path}: missing or unreadable shard index ({exc})") from exc
        self.tensors: dict[str, TensorInfo] = {}
        for fname in sorted(set(weight_map.values())):
            fpath = self.dir / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: shard listed in {INDEX_FILE} is missing")
            for name, meta in safetensors_header(fpath).items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{fpath}: tensor {name!r} has unsupported dtype {meta['dtype']}")
                self.tensors[name] = TensorInfo(fpath, tuple(meta["shape"]), _SAFETENSORS_DTYPES[meta["dtype"]])
        for name, fname in weight_map.items():
            if name not in self.tensors:
                raise CheckpointError(f"{self.dir / fname}: tensor {name!r} listed in {INDEX_FILE} is missing")
        self._handles: dict[Path, Any] = {}
        self.validate()

    def validate(self) -> None:
        """Every tensor the manifest implies exists with the right shape and a floating dtype, and
        every floating tensor is stored in the manifest's dtype (one rule: a tensor in another
        dtype is refused, never cast silently; rewrite it in the checkpoint's dtype)."""
        want = getattr(torch, self.manifest.dtype, None)
        for name, info in self.tensors.items():
            if info.dtype.is_floating_point and info.dtype != want:
                raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, but {MANIFEST_FILE} "
                                      f"says the checkpoint is {self.manifest.dtype}")
        for name, shape in self.manifest.expected_shapes().items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.dir}: tensor {name!r} required by {MANIFEST_FILE} is missing")
            if info.shape != shape:
                raise CheckpointError(
                    f"{info.file}: tensor {name!r} has shape {list(info.shape)}, manifest expects {list(shape)}"
                )
            if not info.dtype.is_floating_point:
                raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected a float dtype")

    def names(self) -> Iterable[str]:
        return self.tensors.keys()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found")
        h = self._handles.get(info.file)
        if h is None:
            h = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return h.get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors:
            yield name, self.get(name)

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in {i.file for i in self.tensors.values()})
