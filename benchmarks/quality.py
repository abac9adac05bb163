"""Perplexity against compression ratio, every method side by side on the same data.

    .venv/bin/python benchmarks/quality.py                       # default model and text
    .venv/bin/python benchmarks/quality.py --methods svd-llm --ratios 0.3,0.5

The dense model is loaded, evaluated and calibrated once; every (method, ratio) cell then
decomposes from the same Gram statistics and is evaluated in memory (no checkpoint written).
Each finished cell is cached in the JSON, so an interrupted run resumes where it stopped.
Writes ``benchmarks/results/quality_<name>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compress import evaluate  # noqa: E402
from compress.hf_loader import install_factors  # noqa: E402
from compress.pipeline import METHODS, CompressConfig, Timer, compress_prepared, prepare  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--methods", default="svd,svd-llm,basis-sharing", help="comma-separated methods")
    p.add_argument("--ratios", default="0.2,0.3,0.4,0.5", help="comma-separated ratios")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-text", default=None, help="further evaluation text (.txt/.jsonl)")
    p.add_argument("--name", default="default", help="result file stem: quality_<name>.*")
    p.add_argument("--fresh", action="store_true", help="ignore cached cells")
    return p.parse_args(argv)


def cell_key(method: str, ratio: float) -> str:
    return f"{method}@{ratio:g}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / f"quality_{a.name}.json"
    methods = [m for m in a.methods.split(",") if m]
    ratios = [float(r) for r in a.ratios.split(",") if r]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {sorted(METHODS)}")
    results = {} if a.fresh or not out_json.exists() else json.loads(out_json.read_text())
    cells = results.setdefault("cells", {})
    base = CompressConfig(output=Path("/nonexistent"), model=a.model, calib_windows=a.calib_windows,
                          eval_windows=a.eval_windows, seq_len=a.seq_len, eval_text=a.eval_text, progress=False)
    timer = Timer()
    print("preparing: load, dense perplexity, calibration statistics ...", flush=True)
    prep = prepare(base, timer, need_grams=True)
    assert prep.dense_ppl is not None and prep.eval_windows is not None
    results.update(
        model=str(prep.source), device=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
        calib_windows=a.calib_windows, eval_windows=a.eval_windows, seq_len=a.seq_len,
        eval_tokens=prep.dense_ppl.tokens, ppl_dense=prep.dense_ppl.ppl, prepare_seconds=timer.seconds,
    )
    dense_model = prep.model
    for method in methods:
        for ratio in ratios:
            key = cell_key(method, ratio)
            if key in cells:
                print(f"{key:>22}: cached ppl {cells[key]['ppl']:.3f}")
                continue
            cfg = replace(base, method=method, ratio=ratio, group_size=2)
            t0 = time.perf_counter()
            cell_timer = Timer()
            prep.model = copy.deepcopy(dense_model) if cfg.refit else dense_model
            manifest, dec = compress_prepared(prep, cfg, cell_timer)
            compressed = prep.model if cfg.refit else copy.deepcopy(dense_model)
            install_factors(compressed, manifest, dec.tensors.__getitem__, next(dense_model.parameters()).dtype)
            ppl = evaluate.perplexity(compressed, prep.eval_windows, progress=False)
            del compressed
            prep.model = dense_model
            cells[key] = {"method": method, "target_ratio": ratio, "achieved_ratio": manifest.achieved_ratio,
                          "model_ratio": manifest.model_ratio, "ppl": ppl.ppl, "coefficient_update": cfg.refit,
                          "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{key:>22}: ppl {ppl.ppl:.3f} (achieved {manifest.achieved_ratio:.4f}, "
                  f"{cells[key]['seconds']} s)", flush=True)
            out_json.write_text(json.dumps(results, indent=2) + "\n")
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    write_table(results, methods, ratios, RESULTS / f"quality_{a.name}.md")
    plot(results, methods, ratios, RESULTS / f"quality_{a.name}.png")
    print((RESULTS / f"quality_{a.name}.md").read_text())
    return 0


def write_table(results: dict, methods: list[str], ratios: list[float], path: Path) -> None:
    lines = [f"Perplexity, {results['model'].rsplit('/', 1)[-1]}, {results['eval_tokens']:,} evaluation tokens "
             f"(dense {results['ppl_dense']:.2f}); ratio = fraction of decoder linear parameters removed.", "",
             "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for m in methods:
        row = [f"{results['cells'][cell_key(m, r)]['ppl']:.2f}" if cell_key(m, r) in results["cells"] else "–"
               for r in ratios]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, methods: list[str], ratios: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in methods:
        pts = [(c["achieved_ratio"], c["ppl"]) for c in results["cells"].values() if c["method"] == m]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=m)
    ax.axhline(results["ppl_dense"], color="gray", ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio (decoder linear parameters removed)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(results["model"].rsplit("/", 1)[-1])
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
