"""Peak memory and time of the streaming compressor against model depth, on real layer shapes.

    .venv/bin/python -m benchmarks.scale                                  # the default cells
    .venv/bin/python -m benchmarks.scale --shapes llama3-8b --layers 1,2,4 --methods svd-llm
    .venv/bin/python -m benchmarks.scale --baseline d335831               # today's pipeline beside it

Each model is a random-weight causal LM with the hidden size, intermediate size and head counts of
a real one (:data:`SHAPES`) and a small vocabulary (a byte-level BPE of 1024 tokens trained on
the default calibration text), saved as an ordinary safetensors folder. Each cell compresses one
such model at one depth with one method, in a subprocess of its own, so that the process's peak
RSS (``getrusage`` in the child) is that cell's alone; the compressor's report gives the
seconds per group. ``--baseline COMMIT`` also runs the compressor of that commit (checked out as a
git worktree) on the same models, to show what streaming changed.

Results go to ``benchmarks/results/scale_<name>.json`` (every finished cell is cached there, so a
killed run continues), with the hours a whole real model would take at :data:`DEPTH` extrapolated
from the deepest cell (``extrapolated``), and ``scale_<name>.png`` (peak RSS against depth, one
line per method).
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

SHAPES = {  # hidden, intermediate, attention heads, KV heads (the models' config.json)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
}
# The real models' depths, for the extrapolation of a whole model's time from the measured groups.
DEPTH = {"llama3-8b": 32, "qwen2.5-7b": 28, "llama3-70b": 80}
VOCAB = 1024
# Runs soco-compress in this process and prints the process's own peak RSS when it exits, so each
# cell's peak is its own (a parent's RUSAGE_CHILDREN would be the largest child so far, and the
# child's own ru_maxrss starts at this parent's peak: compress.pipeline.peak_rss_bytes reads VmHWM).
PEAK_WRAPPER = """
import runpy, sys
sys.argv = ["soco-compress", *sys.argv[1:]]
try:
    runpy.run_module("compress.cli", run_name="__main__")
finally:
    from compress.pipeline import peak_rss_bytes
    print("PEAK_RSS_KIB", peak_rss_bytes() // 1024, file=sys.stderr)
"""


def tokenizer_dir(cache: Path) -> Path:
    """A 1024-token byte-level BPE trained on the default calibration text (once)."""
    out = cache / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compress.data import default_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([default_text("calibration")], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def model_dir(cache: Path, shape: str, layers: int, dtype: str) -> Path:
    """A random LlamaForCausalLM of ``shape`` with ``layers`` decoder layers, built one layer at a time."""
    out = cache / f"{shape}-{layers}L-{dtype}"
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(cache))
    s = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=layers, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"], max_position_embeddings=4096, **s)
    cfg.dtype = dtype
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=cache))
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    h, f, hd = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * hd

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(dt)

    index = {}
    outer = {"model.embed_tokens.weight": rand(VOCAB, h), "model.norm.weight": torch.ones(h, dtype=dt),
             "lm_head.weight": rand(VOCAB, h)}
    save_file(outer, str(tmp / "outer.safetensors"), metadata={"format": "pt"})
    index.update({k: "outer.safetensors" for k in outer})
    for i in range(layers):  # one shard per layer: never more than one layer in memory here either
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
             p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
             p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
             p + "mlp.down_proj.weight": rand(h, f), p + "input_layernorm.weight": torch.ones(h, dtype=dt),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=dt)}
        name = f"layer-{i:03d}.safetensors"
        save_file(t, str(tmp / name), metadata={"format": "pt"})
        index.update({k: name for k in t})
        del t
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def compress_subprocess(code: Path, argv: list[str], echo: bool = False) -> dict:
    """``soco-compress ARGV`` (the compressor of ``code``) in a fresh process: its exit status,
    wall time, peak RSS and report (``-o`` is read from ``argv``). ``echo`` forwards the compressor's
    output (its progress bars) to this process's stderr as it comes, so that an hour-long cell is
    not silent; it is captured either way, for the peak and for the error."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PEAK_WRAPPER, *argv], cwd=code, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    decode, parts = codecs.getincrementaldecoder("utf-8")(errors="replace").decode, []
    while chunk := proc.stdout.read1(1 << 16):  # as it comes, not by lines: tqdm redraws with "\r"
        parts.append(decode(chunk))
        if echo:
            sys.stderr.write(parts[-1])
            sys.stderr.flush()
    proc.wait()
    output_text = "".join(parts) + decode(b"", final=True)
    wall = time.perf_counter() - t0
    marks = [line for line in output_text.splitlines() if line.startswith("PEAK_RSS_KIB ")]
    out = {"wall_seconds": round(wall, 1), "peak_rss_bytes": int(marks[-1].split()[1]) * 1024 if marks else None}
    if proc.returncode != 0:  # negative: killed by that signal (SIGKILL -9 is the kernel's OOM killer's)
        return {**out, "returncode": proc.returncode,
                "error": output_text[-2000:] or f"killed by signal {-proc.returncode}"}
    output = Path(argv[argv.index("-o") + 1])
    if (output / "report.json").exists():
        return {**out, "report": json.loads((output / "report.json").read_text())}
    # several ratios: OUTPUT/ratio-<r>/report.json each, returned as the pipeline returns them
    return {**out, "report": {"checkpoints": {str(d): json.loads((d / "report.json").read_text())
                                              for d in sorted(output.glob("ratio-*"))}}}


def run_cell(code: Path, model: Path, method: str, a: argparse.Namespace, work: Path) -> dict:
    """One compression of one random model: wall time, peak RSS, seconds per group."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    res = compress_subprocess(code, [str(model), "-o", str(out), "--method", method, "--ratio", str(a.ratio),
                                     "--calib-windows", str(a.calib_windows), "--seq-len", str(a.seq_len),
                                     "--no-eval", "--no-progress", *(["--device", a.device] if a.device != "cpu" else []),
                                     *(["--soco-steps", str(a.soco_steps), "--soco-offload", a.soco_offload]
                                       if method == "soco" else []),
                                     # the decomposition's memory and time, without the recovery stage
                                     # (older compressors, --baseline, have none)
                                     *(["--recover-steps", "0"] if (code / "compress" / "recover.py").exists() else [])])
    shutil.rmtree(out, ignore_errors=True)
    report = res.pop("report", None)
    if report is None:
        return res
    memory = report.get("memory", {})
    return {**res, "peak_stat_bytes": memory.get("peak_stat_bytes"),
            **({"cuda_max_allocated_bytes": memory["cuda_max_allocated_bytes"]}
               if "cuda_max_allocated_bytes" in memory else {}),
            "seconds": report["seconds"],
            "seconds_per_group": report.get("seconds_per_group"), "achieved_ratio": report["achieved_ratio"]}


def extrapolate(cell: dict, depth: int) -> float:
    """Seconds to compress ``depth`` layers, from one cell: what grows with depth (the groups, and a
    whole-model stage such as soco's training, which walks every group) scaled by the groups at
    that depth, plus what the cell spent once (loading, capture, hashing). An extrapolation, valid
    as long as every group costs the same (streaming makes the groups independent; the cells at
    1, 2 and 4 layers show it)."""
    per = cell["seconds_per_group"]
    layers_per_group = cell["layers"] / len(per)
    grows = sum(per) + cell.get("seconds", {}).get("whole_model", 0.0)
    once = cell["wall_seconds"] - grows
    return grows / len(per) * -(-depth // layers_per_group) + once


def extrapolations(res: dict) -> dict:
    """Per shape and method, the whole real model's hours from the deepest finished cell."""
    out = {}
    for key, c in res["cells"].items():
        if c["code"] != "streaming" or "error" in c or c["shape"] not in DEPTH or not c.get("seconds_per_group"):
            continue
        k = f"{c['shape']}/{c['method']}"
        if k not in out or c["layers"] > res["cells"][out[k]["from_cell"]]["layers"]:
            depth = DEPTH[c["shape"]]
            out[k] = {"from_cell": key, "layers": depth, "hours": round(extrapolate(c, depth) / 3600, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama3-8b", help=f"comma-separated, from {','.join(SHAPES)}")
    p.add_argument("--layers", default="1,2,4", help="depths to measure")
    p.add_argument("--methods", default="svd-llm", help="compressor methods")
    p.add_argument("--dtype", default="float32", help="dtype of the random models' weights")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--soco-steps", type=int, default=24,
                   help="soco's training steps (its per-step cost is measured by benchmarks/soco_step.py; the scale "
                        "cells measure memory and the decomposition, so a few steps suffice)")
    p.add_argument("--soco-offload", default="on", choices=("auto", "on", "off"),
                   help="soco's cells: 'on' (the default here) onloads each group for each use, the path whose memory "
                        "is bounded by one group; 'auto' (soco-compress's default) holds the stack while it needs "
                        "less than half of the available memory, so its peak grows with depth up to that point")
    p.add_argument("--device", default="cpu", help="the compressor's --device (cuda: its peak GPU memory is recorded "
                                                   "too); one device per results file, so name it with --name")
    p.add_argument("--baseline", default=None, help="a commit whose compressor runs beside (a git worktree)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("SOCO_SCALE_CACHE", "/tmp/soco-scale")),
                   help="where the random models are kept")
    p.add_argument("--name", default="cpu")
    a = p.parse_args(argv)
    from benchmarks.measure import device_name
    from compress import methods
    import torch

    a.cache.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"scale_{a.name}.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if res.get("cells") and res.get("device") != device_name(torch.device(a.device)):
        raise SystemExit(f"{path}: its cells come from {res.get('device')!r}, not {device_name(torch.device(a.device))!r}; "
                         "pass another --name")
    res.update(device=device_name(torch.device(a.device)), ratio=a.ratio, calib_windows=a.calib_windows,
               seq_len=a.seq_len, dtype=a.dtype)
    res.setdefault("shapes", {}).update({k: SHAPES[k] for k in a.shapes.split(",")})
    cells = res.setdefault("cells", {})
    codes = {"streaming": ROOT}
    if a.baseline:
        wt = a.cache / f"baseline-{a.baseline}"
        if not wt.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), a.baseline], check=True)
        codes[f"baseline-{a.baseline}"] = wt
    work = Path(tempfile.mkdtemp(prefix="scale-", dir=a.cache))
    try:
        for shape in a.shapes.split(","):
            for layers in [int(x) for x in a.layers.split(",")]:
                model = model_dir(a.cache, shape, layers, a.dtype)
                for method in a.methods.split(","):
                    group = methods.get(method).default_group_size
                    if layers < group:
                        print(f"{shape}/{method}/{layers}: skipped, {method}'s groups have {group} layers", flush=True)
                        continue
                    for code_name, code in codes.items():
                        key = f"{code_name}/{shape}/{method}/{layers}"
                        if key in cells and "error" not in cells[key]:
                            print(f"{key}: cached", flush=True)
                            continue
                        print(f"{key}: running ...", flush=True)
                        cells[key] = {"shape": shape, "layers": layers, "method": method, "code": code_name,
                                      **run_cell(code, model, method, a, work)}
                        path.write_text(json.dumps(res, indent=2) + "\n")
                        c = cells[key]
                        peak = c.get("peak_rss_bytes")  # None: the child was killed (say, by the OOM killer)
                        print(f"{key}: {c.get('wall_seconds')} s, peak RSS "
                              f"{'unknown' if peak is None else f'{peak / 2**30:.2f} GiB'} {c.get('error', '')[-300:]}",
                              flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["extrapolated"] = extrapolations(res)
    path.write_text(json.dumps(res, indent=2) + "\n")
    for k, e in res["extrapolated"].items():
        print(f"{k}: {e['layers']} layers would take about {e['hours']} h here (extrapolated from {e['from_cell']})")
    plot(res, RESULTS / f"scale_{a.name}.png")
    return 0


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    lines: dict[str, list] = {}
    for c in res["cells"].values():
        if "error" not in c:
            lines.setdefault(f"{c['code']} {c['shape']} {c['method']}", []).append(c)
    for i, (label, cs) in enumerate(sorted(lines.items())):
        cs.sort(key=lambda c: c["layers"])
        xs = [c["layers"] for c in cs]
        style = dict(marker="o", label=label, color=f"C{i}")  # one colour per line in both panels
        ax.plot(xs, [c["peak_rss_bytes"] / 2**30 for c in cs], **style)
        per = [sum(c["seconds_per_group"]) / len(c["seconds_per_group"]) for c in cs if c.get("seconds_per_group")]
        if len(per) == len(xs):
            bx.plot(xs, per, **style)
    ax.set_xlabel("decoder layers")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"peak memory against depth ({res['device']})", fontsize=9)
    bx.set_xlabel("decoder layers")
    bx.set_ylabel("seconds per group (mean)")
    bx.set_ylim(bottom=0)
    bx.set_title("time per group", fontsize=9)
    for x in (ax, bx):
        x.grid(alpha=0.3)
        x.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
