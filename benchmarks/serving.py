"""Serving throughput, dense against soco checkpoints, side by side in one run on one machine.

    .venv/bin/python -m benchmarks.serving          # svd-llm and basis-sharing at 0.2-0.5; concurrency 1, 8, 32
    .venv/bin/python -m benchmarks.serving --methods basis-sharing --ratios 0.5 --concurrency 1,8
    .venv/bin/python -m benchmarks.serving --methods soco,soco-shared --ratios 0.5   # learned ranks
    .venv/bin/python -m benchmarks.serving --methods soco-onerun,soco-shared-onerun  # 0.2-0.5, one training run each

Each model (the dense default model first, then one soco checkpoint per method and ratio, made
with ``soco-compress`` unless it already exists under ``--ckpt-dir``) is served in turn
with the same flags (soco_serve.server.CPU_FLAGS, in vLLM's default torch.compile mode unless
``--enforce-eager``: what a user serving for throughput runs) and driven by ``vllm bench serve`` (random
prompts, fixed seed, ``--ignore-eos`` so every request generates the same number of tokens).
Records output tokens/s, time to first token and time per output token (medians), the weight
memory (soco: what the loader reports; dense: its safetensors files, same dtype), and each
figure's ratio to dense. Methods are the rows of ``benchmarks/quality.py``: ``svd-llm`` checkpoints
hold private factors, ``basis-sharing`` ones shared bases, ``soco`` private factors with learned
per-matrix ranks (some matrices kept dense), ``soco-shared`` soco on shared bases,
``soco-onerun`` every ratio pruned from one soco training run (``--ratio 0.2,0.3,...``),
``soco-shared-onerun`` the same on shared bases. Speed depends on the ranks alone; where the
ratio fixes them (every method but soco) the checkpoints are made from 8 calibration windows of
256 tokens, soco's are made at the defaults of ``soco-compress`` (the slowest: see
docs/results.md), since its ranks are learned from the calibration data. Each checkpoint's entry also gives
its decoder linears' multiply-adds per token against dense, from its manifest.

Writes ``benchmarks/results/serving_<name>.json`` and ``.png``; the machine is recorded inside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.quality import BENCH_METHODS  # noqa: E402
from soco_serve.layout import read_manifest  # noqa: E402
from soco_serve.server import CPU_FLAGS, VllmServer, vllm_executable  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="svd-llm,basis-sharing",
                   help=f"comma-separated rows of benchmarks/quality.py, one checkpoint per ratio each "
                        f"(soco-onerun: all from one training run); known: {', '.join(BENCH_METHODS)}")
    p.add_argument("--ratios", default="0.2,0.3,0.4,0.5", help="comma-separated ratios")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated max concurrency levels")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests per concurrency level (default: max(8, 2 x concurrency))")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-dir", type=Path, default=ROOT / "runs" / "serving", help="where checkpoints are made/reused")
    p.add_argument("--name", default="cpu", help="result file stem: serving_<name>.*")
    p.add_argument("--enforce-eager", action="store_true",
                   help="serve with --enforce-eager (no torch.compile: faster start, 2-3x slower decode on CPU)")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw serving_<name>.png from its JSON, serving nothing")
    p.add_argument("--omp-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND for the servers (e.g. '0' = one thread on core 0, leaving "
                        "the other core to the load generator); default: vLLM's own choice")
    return p.parse_args(argv)


def compress_args(method: str, ratios: list[str]) -> list[str]:
    """``soco-compress`` flags for checkpoints to time. Speed depends on the ranks alone: where
    they follow from the ratio a small calibration set is enough; soco learns them from the
    calibration data, so it gets the compressor's defaults."""
    row = BENCH_METHODS[method]
    calib = [] if row.method == "soco" else ["--calib-windows", "8", "--seq-len", "256"]
    return [*row.cli_args(), "--ratio", ",".join(ratios), *calib, "--no-eval", "--no-progress"]


def ensure_checkpoints(ckpt_dir: Path, method: str, ratios: list[str]) -> list[Path]:
    """One checkpoint per ratio, made unless it exists: one ``soco-compress`` call per ratio, or
    one call for all of them for a one-run row (``OUT/ratio-<r>`` from one soco training run)."""
    if BENCH_METHODS[method].one_run and len(ratios) > 1:
        out = ckpt_dir / method
        paths = [out / f"ratio-{float(r):g}" for r in ratios]
        calls = [] if all((p / "soco_manifest.json").exists() for p in paths) else [(out, ratios)]
    else:
        paths = [ckpt_dir / f"{method}-{r}" for r in ratios]
        calls = [(p, [r]) for p, r in zip(paths, ratios) if not (p / "soco_manifest.json").exists()]
    for out, rs in calls:
        subprocess.run([sys.executable, "-m", "compress.cli", "-o", str(out), "--force",
                        *compress_args(method, rs)], check=True, cwd=ROOT)
    return paths


def bench(server: VllmServer, model: str, concurrency: int, a: argparse.Namespace, out: Path) -> dict:
    cmd = [vllm_executable(), "bench", "serve", "--backend", "openai", "--base-url", server.base_url,
           "--model", model, "--dataset-name", "random", "--random-input-len", str(a.input_len),
           "--random-output-len", str(a.output_len), "--num-prompts", str(num_prompts(a, concurrency)),
           "--max-concurrency", str(concurrency), "--seed", str(a.seed), "--ignore-eos", "--disable-tqdm",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    subprocess.run(cmd, check=True, env={**os.environ, **server.env}, stdout=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return {k: r[k] for k in ("output_throughput", "median_ttft_ms", "median_tpot_ms", "completed", "duration")}


def linear_multiply_adds_vs_dense(ckpt: Path) -> float:
    """The decoder linears' multiply-adds per token against the dense model's: what a decode step
    computes and streams, which shared bases do not shrink as much as the stored size."""
    m = read_manifest(ckpt)
    return round(m.linear_multiply_adds() / m.dense_linear_params(), 3)


def num_prompts(a: argparse.Namespace, concurrency: int) -> int:
    return a.num_prompts or max(8, 2 * concurrency)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {sorted(BENCH_METHODS)}")
    if a.plot_only:
        plot(json.loads((RESULTS / f"serving_{a.name}.json").read_text()), RESULTS / f"serving_{a.name}.png")
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    a.ckpt_dir.mkdir(parents=True, exist_ok=True)
    from compress.models import default_model_dir

    levels = [int(c) for c in a.concurrency.split(",")]
    flags = list(CPU_FLAGS) if a.enforce_eager else [f for f in CPU_FLAGS if f != "--enforce-eager"]
    models: list[tuple[str, str | None, Path]] = [("dense", None, default_model_dir())]
    ratios = [r for r in a.ratios.split(",") if r]
    for method in methods:
        for ratio, path in zip(ratios, ensure_checkpoints(a.ckpt_dir, method, ratios)):
            models.append((f"{method}@{ratio}", "soco", path))
    import torch

    from benchmarks.measure import device_name

    results = {"machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "platform": platform.platform(), "device": device_name(torch.device("cpu")),
                           "isa": torch.backends.cpu.get_cpu_capability()},
               "compiled": not a.enforce_eager,
               "flags": flags, "omp_bind": a.omp_bind, "input_len": a.input_len, "output_len": a.output_len,
               "num_prompts": {str(c): num_prompts(a, c) for c in levels}, "runs": {}}
    for label, load_format, path in models:
        log = a.ckpt_dir / f"serve-{label}.log"
        t0 = time.perf_counter()
        env = {"VLLM_CPU_OMP_THREADS_BIND": a.omp_bind} if a.omp_bind else None
        with VllmServer(path, load_format=load_format, args=flags, log_path=log, env=env) as server:
            entry = {"path": str(path), "startup_s": round(time.perf_counter() - t0, 1), "levels": {}}
            for c in levels:
                entry["levels"][str(c)] = bench(server, str(path), c, a, a.ckpt_dir / f"bench-{label}-c{c}.json")
                lv = entry["levels"][str(c)]
                print(f"{label:>20} c={c:<3} {lv['output_throughput']:8.1f} tok/s  ttft {lv['median_ttft_ms']:8.1f} ms"
                      f"  tpot {lv['median_tpot_ms']:7.1f} ms", flush=True)
        m = re.search(r"weights in memory (\d+) bytes", log.read_text())
        if m:
            entry["weight_bytes"] = int(m.group(1))
        elif not load_format:
            entry["weight_bytes"] = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        if load_format:
            entry["report"] = {k: json.loads((path / "report.json").read_text())[k]
                               for k in ("method", "achieved_ratio", "model_ratio")}
            entry["report"]["linear_multiply_adds"] = linear_multiply_adds_vs_dense(path)
        results["runs"][label] = entry
    dense = results["runs"]["dense"]["levels"]
    for label, entry in results["runs"].items():
        entry["weight_bytes_vs_dense"] = round(entry["weight_bytes"] / results["runs"]["dense"]["weight_bytes"], 3)
        for c, lv in entry["levels"].items():
            lv["throughput_vs_dense"] = round(lv["output_throughput"] / dense[c]["output_throughput"], 3)
            lv["tpot_vs_dense"] = round(lv["median_tpot_ms"] / dense[c]["median_tpot_ms"], 3)
    out = RESULTS / f"serving_{a.name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / f"serving_{a.name}.png")
    print(f"wrote {out}")
    return 0


def plot(results: dict, path: Path) -> None:
    """Throughput relative to dense: against the target ratio, one line per method and
    concurrency; with a single ratio, bars per concurrency level, one per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in results["runs"].items() if "report" in v}
    points: dict[str, dict[float, dict]] = {}
    for label, v in runs.items():
        method, ratio = label.split("@")
        points.setdefault(method, {})[float(ratio)] = v["levels"]
    levels = list(results["runs"]["dense"]["levels"])
    ratios = sorted({r for per in points.values() for r in per})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if len(ratios) == 1:
        width = 0.8 / len(points)
        for i, (method, per) in enumerate(sorted(points.items())):
            xs = [j + (i - (len(points) - 1) / 2) * width for j in range(len(levels))]
            ys = [per[ratios[0]][c]["throughput_vs_dense"] for c in levels]
            bars = ax.bar(xs, ys, width, label=method)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(levels)), [f"concurrency {c}" for c in levels])
        ax.set_ylabel(f"output tokens/s relative to dense, ratio {ratios[0]}")
    else:
        for method, per in sorted(points.items()):
            for c in levels:
                pts = sorted((r, lv[c]["throughput_vs_dense"]) for r, lv in per.items())
                ax.plot(*zip(*pts), marker="o", ls="-" if "shar" in method else "--", label=f"{method}, concurrency {c}")
        ax.set_xlabel("compression ratio (decoder linear parameters removed)")
        ax.set_ylabel("output tokens/s relative to dense")
    ax.axhline(1.0, color="gray", lw=1, label="dense")
    mode = "torch.compile" if results.get("compiled") else "--enforce-eager"
    machine = results["machine"]
    ax.set_title(f"vllm serve ({mode}) on {machine.get('device', machine['processor'])}, {machine['cpus']} CPUs")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
