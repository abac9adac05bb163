"""Where a decode step's time goes in vLLM on this machine: dense against soco checkpoints.

    .venv/bin/python -m benchmarks.profile_decode runs/serving/basis-sharing-0.5      # + the dense model
    .venv/bin/python -m benchmarks.profile_decode CKPT1 CKPT2 --batch 8 --tokens 64

Each model runs in its own process through vLLM's offline ``LLM`` (same flags as the server,
model in-process), generates ``--tokens`` tokens for ``--batch`` prompts once to warm up, once
timed, and once under ``torch.profiler``. Ops are grouped: ``linear`` (the decoder's and the head's matrix
products), ``attention``, and the rest. The speed-up a smaller linear part can give is bounded by
the share of the step it takes (Amdahl), which is what this measures.

Writes ``benchmarks/results/profile_<name>.json`` (per model: milliseconds per decode step by
group, and the top ops).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from soco_serve.server import CPU_ENV  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# Profiler op names, by group (first match wins); anything else is "other".
GROUPS = {
    "linear": ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "onednn_mm", "weight_packed_linear",
               "soco_cpu::"),
    "attention": ("attn", "attention", "paged", "kv_cache", "reshape_and_cache", "rotary"),
}


def group_of(op: str) -> str:
    low = op.lower()
    for group, keys in GROUPS.items():
        if any(k in low for k in keys):
            return group
    return "other"


def profile_one(model: str, load_format: str | None, batch: int, tokens: int, input_len: int,
                compile: bool = False) -> dict:
    """Run in a child process: one model, warm-up, then one profiled generate."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vllm import LLM, SamplingParams

    llm = LLM(model=model, load_format=load_format or "auto", dtype="float32", enforce_eager=not compile,
              max_model_len=4096, kv_cache_memory_bytes=256 * 2**20, distributed_executor_backend="uni", seed=0)
    prompts = [{"prompt_token_ids": [(17 * i + 31 * j) % 5000 + 100 for j in range(input_len)]} for i in range(batch)]
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    profiled = (time.perf_counter() - t0) * 1e3
    ops = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
    groups: dict[str, float] = {}
    for name, ms, _ in ops:
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    # Python, scheduling and sampling between ops; the profiler's own overhead lands here too.
    groups["outside ops"] = max(profiled - sum(groups.values()), 0.0)
    steps = tokens  # one prefill step (with the first token) plus tokens - 1 decode steps
    top = sorted(ops, key=lambda o: -o[1])[:15]
    return {
        "model": model, "load_format": load_format or "auto", "batch": batch, "tokens": tokens, "input_len": input_len,
        "threads": torch.get_num_threads(), "compiled": compile, "ms_per_step": round(wall / steps, 3),
        "profiled_ms_per_step_by_group": {g: round(ms / steps, 3) for g, ms in sorted(groups.items())},
        "profiled_share_by_group": {g: round(ms / profiled, 3) for g, ms in sorted(groups.items())},
        "top_ops": [{"op": n, "ms_per_step": round(ms / steps, 3), "calls_per_step": round(c / steps, 1)}
                    for n, ms, c in top],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", type=Path, help="soco checkpoints to profile")
    p.add_argument("--dense", default=None, help="dense model folder (default: the embedded default model)")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--name", default="cpu", help="result file stem: profile_<name>.json")
    p.add_argument("--compile", action="store_true",
                   help="vLLM's default torch.compile mode (slower start) instead of --enforce-eager")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "LOAD_FORMAT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        model, fmt = a.child
        result = profile_one(model, None if fmt == "auto" else fmt, a.batch, a.tokens, a.input_len, a.compile)
        print("PROFILE " + json.dumps(result), flush=True)
        return 0

    from compress.models import default_model_dir

    runs = [(a.dense or str(default_model_dir()), "auto")] + [(str(c), "soco") for c in a.checkpoints]
    results = []
    for model, fmt in runs:
        cmd = [sys.executable, __file__, "--child", model, fmt, "--batch", str(a.batch), "--tokens", str(a.tokens),
               "--input-len", str(a.input_len), *(["--compile"] if a.compile else [])]
        proc = subprocess.run(cmd, env={**os.environ, **CPU_ENV}, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROFILE ")]
        if proc.returncode or not lines:
            raise SystemExit(f"profiling {model} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1].removeprefix("PROFILE ")))
        r = results[-1]
        print(f"{Path(model).name:>28} ({fmt}): {r['ms_per_step']:.2f} ms/step; "
              + ", ".join(f"{g} {ms:.2f}" for g, ms in r["profiled_ms_per_step_by_group"].items()), flush=True)
    dense = results[0]
    for r in results:
        r["step_speedup_vs_dense"] = round(dense["ms_per_step"] / r["ms_per_step"], 3)
        r["linear_speedup_vs_dense"] = round(dense["profiled_ms_per_step_by_group"].get("linear", 0)
                                             / max(r["profiled_ms_per_step_by_group"].get("linear", 0), 1e-9), 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"profile_{a.name}.json"
    out.write_text(json.dumps({"device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "batch": a.batch, "tokens": a.tokens, "runs": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
