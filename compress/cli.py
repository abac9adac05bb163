"""``soco-compress``: the command line over :mod:`compress.pipeline`.

    soco-compress [MODEL] -o OUT [--method M] [--ratio R] [options]   compress (and evaluate)
    soco-compress eval DIR [options]                                  perplexity of a dense or soco folder
    soco-compress info DIR                                            manifest summary of a soco folder
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import allocate, calibrate, data, decompose, models
from .pipeline import DEFAULT_SHARED_KINDS, METHODS, CompressConfig

USER_ERRORS = (
    models.ModelError, data.DataError, allocate.AllocationError, calibrate.CalibrationError,
    decompose.DecompositionError, FileExistsError, FileNotFoundError, ValueError,
)


def _size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    t = text.strip().upper()
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * f)
    return int(t)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-text", default=None, metavar="SRC",
                   help="evaluation text: a .txt or .jsonl ('text' field) file, or 'wikitext2' (needs the hub); "
                        "default: the evaluation split of the embedded Wikipedia sample")
    g.add_argument("--eval-windows", type=int, default=32, metavar="N",
                   help="evaluate on the first N non-overlapping windows (0 = all; default 32)")
    g.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")


def compress_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soco-compress",
        description="Compress a Hugging Face causal LM into a low-rank soco checkpoint that "
                    "`vllm serve DIR --load-format soco` serves. Subcommands: `soco-compress eval DIR`, "
                    "`soco-compress info DIR` (see their --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None,
                   help="a local Hugging Face folder, a .gguf file, or a hub id; omitted: the embedded "
                        "SmolLM2-135M-Instruct")
    p.add_argument("-o", "--output", required=True, type=Path, help="checkpoint folder to write (must not exist)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=sorted(METHODS), default="basis-sharing",
                   help="; ".join(f"{k}: {v.summary}" for k, v in METHODS.items()))
    m.add_argument("--ratio", type=float, default=0.3,
                   help="fraction of the decoder linear layers' parameters to remove, in (0, 1)")
    m.add_argument("--group-size", type=int, default=2,
                   help="basis-sharing: adjacent layers per shared basis")
    m.add_argument("--shared-types", default=",".join(DEFAULT_SHARED_KINDS),
                   help="basis-sharing: matrix types that share a basis (others stay private)")
    m.add_argument("--coefficient-update", choices=("auto", "on", "off"), default="auto",
                   help="basis-sharing: refit each layer's coefficients on the compressed model's own "
                        "activations; auto = on at ratio >= 0.4")
    m.add_argument("--force-factorize", action="store_true",
                   help="factorize even matrices whose factors would be larger than the dense matrix")
    m.add_argument("--full-rank", action="store_true",
                   help="factorize every matrix at full rank (ignores --ratio): reproduces the dense model; "
                        "for testing loaders")
    m.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the written tensors (auto: the model's)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-text", default=None, metavar="SRC",
                   help="calibration text (.txt, .jsonl, or 'wikitext2'); default: the calibration split "
                        "of the embedded Wikipedia sample")
    c.add_argument("--calib-windows", type=int, default=32,
                   help="random windows of --seq-len tokens (the papers: 256 windows of 2048)")
    c.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    c.add_argument("--seed", type=int, default=0, help="seed for the calibration windows")
    _add_eval_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    o = p.add_argument_group("output")
    o.add_argument("--max-shard-size", type=_size, default="2GiB", help="largest safetensors shard")
    o.add_argument("--device", default="cpu", help="torch device for calibration and decomposition")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soco-compress eval",
                                description="Perplexity of a dense Hugging Face folder or a soco checkpoint.")
    p.add_argument("dir", type=Path)
    _add_eval_args(p)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def info_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soco-compress info", description="Summary of a soco checkpoint's manifest.")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    return p


def cmd_compress(argv: list[str]) -> int:
    from .pipeline import run
    from .report import summary_lines

    a = compress_parser().parse_args(argv)
    cfg = CompressConfig(
        output=a.output, model=a.model, method=a.method, ratio=a.ratio, group_size=a.group_size,
        shared_types=tuple(s for s in a.shared_types.split(",") if s), coefficient_update=a.coefficient_update,
        force_factorize=a.force_factorize, full_rank=a.full_rank, dtype=a.dtype, calib_text=a.calib_text,
        calib_windows=a.calib_windows, seq_len=a.seq_len, batch_size=a.batch_size, seed=a.seed,
        evaluate=not a.no_eval, eval_text=a.eval_text, eval_windows=a.eval_windows, force=a.force,
        max_shard_bytes=a.max_shard_size, device=a.device, progress=not a.no_progress,
    )
    report = run(cfg)
    print("\n".join(summary_lines(report)))
    print(f"wrote {cfg.output} (report.json, ranks.png inside)")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from transformers import AutoTokenizer

    from .evaluate import perplexity
    from .hf_loader import load_any

    a = eval_parser().parse_args(argv)
    if not a.dir.is_dir():
        raise FileNotFoundError(f"{a.dir}: folder not found")
    tok = AutoTokenizer.from_pretrained(a.dir)
    windows = data.eval_windows(data.tokenize_stream(tok, data.load_text(a.eval_text, "evaluation")),
                                a.seq_len, a.eval_windows)
    res = perplexity(load_any(a.dir), windows, a.batch_size)
    if a.json:
        print(json.dumps({"ppl": res.ppl, "eval_tokens": res.tokens, "windows": res.windows}))
    else:
        print(f"perplexity {res.ppl:.4f} over {res.tokens:,} tokens ({res.windows} windows of {a.seq_len})")
    return 0


def cmd_info(argv: list[str]) -> int:
    from soco_serve.layout import CheckpointReader

    a = info_parser().parse_args(argv)
    reader = CheckpointReader(a.dir)
    m = reader.manifest
    if a.json:
        print(json.dumps(m.to_json(), indent=2))
        return 0
    kinds: dict[str, int] = {}
    for e in m.linears.values():
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    print(f"soco checkpoint v{m.format_version}: {a.dir}")
    print(f"  architecture   {m.architecture}  dtype {m.dtype}")
    print(f"  source         {m.source_model}  (sha256 {m.source_sha256[:16]}…)")
    print(f"  method         {m.method}  {json.dumps(m.settings)}")
    print(f"  ratios         target {m.target_ratio}  achieved {m.achieved_ratio}  whole model {m.model_ratio}")
    print(f"  linears        " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f"; {len(m.bases)} shared bases")
    print(f"  files          {reader.file_bytes() / 1e6:.1f} MB in {len({i.file for i in reader.tensors.values()})} shard(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from soco_serve.layout import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"eval": cmd_eval, "info": cmd_info}
    cmd = commands.get(argv[0]) if argv else None
    try:
        return cmd(argv[1:]) if cmd else cmd_compress(argv)
    except (CheckpointError, *USER_ERRORS) as exc:
        print(f"soco-compress: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
