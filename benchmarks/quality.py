"""Perplexity against compression ratio, every method side by side on the same data.

    .venv/bin/python -m benchmarks.quality                       # default model and text
    .venv/bin/python -m benchmarks.quality --methods svd-llm --ratios 0.3,0.5
    .venv/bin/python -m benchmarks.quality --methods svd-llm,basis-sharing,soco,soco-shared,soco-onerun
    .venv/bin/python -m benchmarks.quality --eval-text my_domain.txt --name mydomain

Every (method, ratio) cell is one run of the compressor (``compress.pipeline.run``, the code
path of ``soco-compress``) on the same calibration windows and seed, written to a temporary
folder and evaluated by the run itself. Each finished cell is cached in the JSON, so an interrupted run resumes where it stopped (a run
with another model, calibration or evaluation setting than the file's starts the file afresh).
Writes ``benchmarks/results/quality_<name>.json``, ``.md``, ``.png`` (perplexity against ratio) and
``_ranks.png`` (the kept rank per layer and matrix type of every method at ``--rank-ratio``, to see
where soco's learned ranks differ from svd-llm's uniform ones). Perplexity is always
measured on the default text's evaluation split; ``--eval-text FILE`` adds a second perplexity
on that file (another domain), in the JSON and the table.

Methods are the compressor's at its defaults (basis-sharing: groups of 2, with its coefficient
update) plus ``basis-sharing-noupdate`` (no coefficient update: the paper's released code),
``soco-shared`` (soco on Basis Sharing's groups of 2), ``soco-onerun`` (one soco training run
towards the smallest ratio, every ratio pruned from the same scores: what "any size from one run"
costs against ``soco``, which trains once per ratio) and ``soco-shared-onerun`` (the same on shared
bases). Every row but the one-run ones also comes as ``<row>+recover`` (with the recovery stage,
:mod:`compress.recover`, at ``--recover-steps`` and ``--recover-lr``) and ``<row>+recover-seed1``
(the same with calibration seed 1), and ``<row>+recover-hidden[-seed1]`` (the recovery stage with
``--recover-last-loss hidden``: the last group trained on its hidden state like every other
group, the stage as it was before 2026-12-04). Cells are recomputed when the soco or recovery settings differ
from the cached ones; docs/results.md gives each row's time. ``--report-only`` computes nothing and
writes the table and plots from the cells as cached, for rows computed a few cells at a time;
with ``--rows-from A,B`` it combines the rows of several files made with the same settings, each
row whole from the last file that has it (the README's plot:
``--report-only --rows-from recovery,soco_steps16 --name summary``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch


from compress import data, evaluate, models  # noqa: E402
from compress.config import CompressConfig  # noqa: E402
from compress.methods import REGISTRY  # noqa: E402
from compress.pipeline import ratio_dir, run  # noqa: E402
from compress.recover import DEFAULT_STEPS, LAST_LOSSES, RecoverConfig  # noqa: E402
from compress.soco import SocoConfig  # noqa: E402
from benchmarks.measure import device_name  # noqa: E402
from soco_serve.hf import load_soco_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

class BenchMethod(NamedTuple):
    """A benchmark row: the compressor method and the settings that distinguish it."""

    method: str
    group_size: int = 1
    one_run: bool = False  # soco: one training run for every ratio
    coefficient_update: str = "auto"
    recover: bool = False  # with the recovery stage (--recover-steps of this benchmark)
    seed: int = 0  # calibration windows and recovery batch order
    last_loss: str = RecoverConfig.last_loss  # the recovery stage's loss at the last group

    def cli_args(self) -> list[str]:
        """The ``soco-compress`` flags that make this row's checkpoints, but ``--ratio`` (serving.py
        serves them; a one-run row is one call with every ratio)."""
        return ["--method", self.method, "--group-size", str(self.group_size),
                "--coefficient-update", self.coefficient_update, "--seed", str(self.seed),
                *(["--recover-last-loss", self.last_loss] if self.recover else ["--recover-steps", "0"])]


BENCH_METHODS = {
    **{m: BenchMethod(m, 2 if m == "basis-sharing" else 1) for m in REGISTRY if m != "soco"},
    "basis-sharing-noupdate": BenchMethod("basis-sharing", 2, coefficient_update="off"),
    "soco": BenchMethod("soco"),
    "soco-shared": BenchMethod("soco", 2),
    "soco-onerun": BenchMethod("soco", one_run=True),
    "soco-shared-onerun": BenchMethod("soco", 2, one_run=True),
}
# With recovery (compress/recover.py), and a second seed of each: "<row>+recover", "<row>+recover-seed1"; and
# the same with the last group trained on its hidden state like the others: "<row>+recover-hidden[-seed1]".
BENCH_METHODS.update({f"{k}+recover{'-hidden' if last == 'hidden' else ''}{'-seed1' if seed else ''}":
                      m._replace(recover=True, seed=seed, last_loss=last)
                      for k, m in list(BENCH_METHODS.items()) if not m.one_run for seed in (0, 1)
                      for last in LAST_LOSSES})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--methods", default="svd,fwsvd,asvd,svd-llm,basis-sharing,basis-sharing-noupdate",
                   help=f"comma-separated, from {','.join(BENCH_METHODS)} (soco cells train for minutes each on a "
                        "CPU: docs/results.md gives their times)")
    p.add_argument("--ratios", default="0.2,0.3,0.4,0.5,0.6", help="comma-separated ratios")
    p.add_argument("--calib-windows", type=int, default=CompressConfig.calib_windows, help="(the compressor's default)")
    p.add_argument("--eval-windows", type=int, default=CompressConfig.eval_windows)
    p.add_argument("--seq-len", type=int, default=CompressConfig.seq_len)
    p.add_argument("--eval-text", default=None, help="a further evaluation text (.txt/.jsonl): a second perplexity")
    p.add_argument("--name", default="default", help="result file stem: quality_<name>.*")
    p.add_argument("--fresh", action="store_true", help="ignore cached cells")
    p.add_argument("--report-only", action="store_true",
                   help="compute nothing: write the table and plots of --methods and --ratios from the JSON's cells "
                        "as they are (a table over rows that were computed a few at a time)")
    p.add_argument("--rows-from", default="", metavar="NAME,...",
                   help="with --report-only: take each row of --methods whole from the last of these result files "
                        "(quality_<NAME>.json, same model and settings) that has it, and write the report as --name")
    p.add_argument("--rank-ratio", type=float, default=0.4, help="the ratio whose ranks _ranks.png compares")
    d = SocoConfig()
    p.add_argument("--recover-steps", type=int, default=DEFAULT_STEPS,
                   help="recovery steps per group of the '+recover' rows (the compressor's default)")
    p.add_argument("--recover-lr", type=float, default=RecoverConfig.lr, help="recovery learning rate")
    p.add_argument("--soco-steps", type=int, default=d.steps, help="soco training steps")
    p.add_argument("--soco-lr", type=float, default=d.lr, help="soco learning rate")
    p.add_argument("--soco-seq-len", type=int, default=d.seq_len, help="soco training window length")
    p.add_argument("--soco-seed", type=int, default=d.seed,
                   help="soco training seed (another seed under another --name shows how far cells move with it)")
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
        if m not in BENCH_METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {sorted(BENCH_METHODS)}")
    if a.rows_from and not a.report_only:
        raise SystemExit("--rows-from only combines cached cells: add --report-only")
    if a.report_only:  # read the file(s) as they are: no setting of this call resets them, nothing rewrites them
        sources = [f"quality_{n}.json" for n in a.rows_from.split(",") if n] or [out_json.name]
        for s in sources:
            if not (RESULTS / s).exists():
                raise SystemExit(f"{RESULTS / s}: no cached cells to report; run without --report-only first")
        results = rows_from({s: json.loads((RESULTS / s).read_text()) for s in sources}, methods)
        for m in methods:
            for r in ratios:
                print_cached(results["cells"], cell_key(m, r))
        write_reports(results, methods, ratios, a.rank_ratio, a.name)
        return 0
    results = {} if a.fresh or not out_json.exists() else json.loads(out_json.read_text())
    setting = {"calib_windows": a.calib_windows, "eval_windows": a.eval_windows, "seq_len": a.seq_len}
    stale = {k: (results[k], v) for k, v in setting.items() if k in results and results[k] != v}
    if stale:
        print(f"{out_json} was made with other settings ({stale}, (file, now)): starting it afresh", flush=True)
        results = {}
    cells = results.setdefault("cells", {})
    soco_cfg = SocoConfig(steps=a.soco_steps, lr=a.soco_lr, seq_len=a.soco_seq_len, seed=a.soco_seed)
    base = CompressConfig(output=Path("/nonexistent"), model=a.model, calib_windows=a.calib_windows,
                          eval_windows=a.eval_windows, seq_len=a.seq_len, progress=False, soco=soco_cfg,
                          recover=RecoverConfig(steps=0))  # each row sets its own (config below)
    model_path = str(models.resolve_model(a.model))
    if results.get("model", model_path) != model_path:
        print(f"{out_json} holds cells of {results['model']}: starting it afresh", flush=True)
        results = {"cells": {}}
        cells = results["cells"]
    extra_windows = None
    if a.eval_text:
        dense, tok, _ = models.load_model(model_path)
        extra_windows = data.text_eval_windows(tok, a.eval_text, a.seq_len, a.eval_windows)
        extra = evaluate.perplexity(dense, extra_windows, progress=False)
        results.update(eval_text=a.eval_text, eval_text_tokens=extra.tokens, ppl_dense_eval_text=extra.ppl)
        del dense
    results.update(model=model_path, device=device_name(torch.device("cpu")), threads=torch.get_num_threads(),
                   calib_windows=a.calib_windows, eval_windows=a.eval_windows, seq_len=a.seq_len)
    soco_settings = asdict(soco_cfg)

    recover_cfg = RecoverConfig(steps=a.recover_steps, lr=a.recover_lr)

    def config(method: str, ratio: float) -> CompressConfig:
        m = BENCH_METHODS[method]
        return replace(base, method=m.method, ratio=ratio, group_size=m.group_size, coefficient_update=m.coefficient_update,
                       seed=m.seed, recover=replace(recover_cfg, last_loss=m.last_loss) if m.recover else RecoverConfig(steps=0))

    def cached(method: str, ratio: float) -> bool:
        c = cells.get(cell_key(method, ratio))
        # a cell without recovery records no recovery settings; a row without it wants none
        want = config(method, ratio).recover
        return (c is not None and (BENCH_METHODS[method].method != "soco" or c.get("soco_settings") == soco_settings)
                and c.get("coefficient_update") == config(method, ratio).refit
                and (RecoverConfig.from_settings(c["recover_settings"]) if "recover_settings" in c else None)
                == (want if want.steps else None)
                and (not a.eval_text or c.get("eval_text") == a.eval_text))

    def record(key: str, method: str, ratio: float, report: dict, ckpt: Path) -> None:
        results.update(ppl_dense=report["ppl_dense"], eval_tokens=report["eval_tokens"])
        seconds = {k: v for k, v in report["seconds"].items() if k not in ("evaluate", "write", "total")}
        cells[key] = {"method": method, "target_ratio": ratio, "achieved_ratio": report["achieved_ratio"],
                      "model_ratio": report["model_ratio"], "ppl": report["ppl_compressed"],
                      "coefficient_update": report["settings"]["coefficient_update"],
                      "seconds": round(sum(seconds.values()), 1), "stage_seconds": seconds,
                      "device": results["device"], "threads": results["threads"], "ranks": report["ranks"]}
        if extra_windows is not None:
            cells[key].update(eval_text=a.eval_text, ppl_eval_text=evaluate.perplexity(
                load_soco_model(ckpt), extra_windows, progress=False).ppl)
        rec = report.get("recovery")
        if rec:
            cells[key].update(recover_settings=report["settings"]["recover"], seed=report["settings"]["seed"],
                              recovery={k: v for k, v in rec.items() if k != "per_group"},
                              recovery_curves={g: v["curve"] for g, v in rec["per_group"].items()})
        log = report.get("soco")
        if log:
            cells[key].update(soco_settings=soco_settings, soco_final=log["final"],
                              soco_trained_for=log["trained_for"], soco_seconds=log["seconds"],
                              soco_stages={k: {f: v.get(f) for f in ("end_step", "kl_end", "ratio_end", "seconds")}
                                           for k, v in log["stages"].items()})
        print(f"{key:>22}: ppl {cells[key]['ppl']:.3f} (achieved {report['achieved_ratio']:.4f}, "
              f"{cells[key]['seconds']} s)", flush=True)
        out_json.write_text(json.dumps(results, indent=2) + "\n")

    scratch = Path(tempfile.mkdtemp(prefix="quality-"))
    try:
        for method in methods:
            one_run = BENCH_METHODS[method].one_run
            todo = [r for r in ratios if not cached(method, r)]
            for r in ratios:
                if r not in todo:
                    print_cached(cells, cell_key(method, r))
            runs = [(tuple(ratios), ratios)] if one_run and todo else [((), [r]) for r in todo]
            for multi, rs in runs:  # a one-run row: one training run, every ratio (cached ones too)
                cfg = replace(config(method, min(rs)), ratios=multi, output=scratch / method, force=True)
                report = run(cfg)
                for r in rs:
                    ckpt = ratio_dir(cfg.output, r) if len(rs) > 1 else cfg.output
                    rep = report["checkpoints"][str(ckpt)] if len(rs) > 1 else report
                    record(cell_key(method, r), method, r, rep, ckpt)
                shutil.rmtree(cfg.output, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    write_reports(results, methods, ratios, a.rank_ratio, a.name)
    return 0


SAME_SETTINGS = ("model", "calib_windows", "eval_windows", "seq_len")


def rows_from(files: dict[str, dict], methods: list[str]) -> dict:
    """One report's results from several result files (name -> contents) made with the same model and
    settings: each row of ``methods`` is taken whole from the last file that has a cell of it, so that
    a row recomputed at other method settings under another name (soco at 64 steps) replaces the
    older row instead of mixing with it. The report names each row's file."""
    (first, head), *rest = files.items()
    merged = {k: v for k, v in head.items() if k != "cells"}
    for name, res in rest:
        for k in SAME_SETTINGS:
            if res.get(k) != head.get(k):
                raise SystemExit(f"{name}: {k} is {res.get(k)!r}, {first} has {head.get(k)!r}; a report "
                                 "combines rows made with the same model and settings")
        text = res.get("eval_text")
        if text and merged.get("eval_text") not in (None, text):
            raise SystemExit(f"{name}: eval_text is {text!r}, an earlier file's is {merged['eval_text']!r}")
        if text and not merged.get("eval_text"):
            merged.update({k: res[k] for k in ("eval_text", "eval_text_tokens", "ppl_dense_eval_text")})
    merged["cells"], merged["row_sources"] = {}, {}
    for m in methods:
        for name, res in reversed(files.items()):
            cells = {k: c for k, c in res["cells"].items() if c["method"] == m}
            if cells:
                merged["cells"].update(cells)
                merged["row_sources"][m] = name
                break
    return merged


def print_cached(cells: dict, key: str) -> None:
    if key in cells:
        print(f"{key:>22}: cached ppl {cells[key]['ppl']:.3f}")


def write_reports(results: dict, methods: list[str], ratios: list[float], rank_ratio: float, name: str) -> None:
    """The table, the plot and the rank comparison of ``methods`` × ``ratios`` from the cells in ``results``."""
    write_table(results, methods, ratios, RESULTS / f"quality_{name}.md")
    plot(results, methods, ratios, RESULTS / f"quality_{name}.png")
    plot_rank_comparison(results, methods, rank_ratio, RESULTS / f"quality_{name}_ranks.png")
    print((RESULTS / f"quality_{name}.md").read_text())


def write_table(results: dict, methods: list[str], ratios: list[float], path: Path) -> None:
    """Perplexity per (method, ratio), the further text's perplexity if any, and each cell's time."""
    cells = results["cells"]
    header = ["| method | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]

    def table(field: str, fmt: str) -> list[str]:
        rows = []
        for m in methods:
            vals = [cells.get(cell_key(m, r), {}).get(field) for r in ratios]
            rows.append(f"| {m} | " + " | ".join("–" if v is None else format(v, fmt) for v in vals) + " |")
        return header + rows

    lines = [f"Perplexity, {results['model'].rsplit('/', 1)[-1]}, {results['eval_tokens']:,} evaluation tokens "
             f"(dense {results['ppl_dense']:.2f}); ratio = fraction of decoder linear parameters removed.", "",
             *table("ppl", ".2f")]
    if results.get("eval_text"):
        lines += ["", f"Perplexity on {results['eval_text']}, {results['eval_text_tokens']:,} tokens "
                      f"(dense {results['ppl_dense_eval_text']:.2f}).", "", *table("ppl_eval_text", ".2f")]
    shown = [c for m in methods for r in ratios if (c := cells.get(cell_key(m, r)))]
    devices = sorted({c.get("device", "a CPU not recorded") for c in shown})
    threads = sorted({c.get("threads", results["threads"]) for c in shown})
    lines += ["", f"Seconds to compress each cell (decomposition, plus the coefficient update or soco training "
                  f"where used; evaluation excluded; {' or '.join(map(str, threads))} threads on {' and '.join(devices)}"
                  f"{': each cell names its own in the JSON' if len(devices) > 1 or len(threads) > 1 else ''}).",
              "", *table("seconds", ".0f")]
    row_sources = results.get("row_sources", {})
    if len(set(row_sources.values())) > 1:
        lines += ["", "Rows from: " + "; ".join(f"{m}: {f}" for m, f in row_sources.items()) + "."]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, methods: list[str], ratios: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one colour per method, one line style per variant (+recover, -seed1, ...): a dozen rows stay
    # readable, and a method's rows read as one family
    split = {m: (m.split("+")[0], m[len(m.split("+")[0]):]) for m in methods}  # method, variant
    bases = list(dict.fromkeys(b for b, _ in split.values()))
    variants = list(dict.fromkeys(v for _, v in split.values()))
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
    markers = "osD^vx"
    # the further text's perplexity, where there is one, in a second panel: an in-domain gain shows
    # beside what it does elsewhere
    fields = [("ppl", results["ppl_dense"], "evaluation split")]
    if results.get("eval_text"):
        fields.append(("ppl_eval_text", results["ppl_dense_eval_text"], results["eval_text"]))
    fig, axes = plt.subplots(1, len(fields), figsize=(4.6 + 3.9 * len(fields), 4.2), squeeze=False)
    for ax, (field, dense, title) in zip(axes[0], fields):
        for m in methods:
            pts = [(c["achieved_ratio"], c[field]) for c in results["cells"].values() if c["method"] == m and field in c]
            if pts:
                xs, ys = zip(*sorted(pts))
                base, v = bases.index(split[m][0]), variants.index(split[m][1])
                ax.plot(xs, ys, color=f"C{base % 10}", ls=styles[v % len(styles)],
                        marker=markers[v % len(markers)], ms=4, label=m)
        ax.axhline(dense, color="gray", ls="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("compression ratio (decoder linear parameters removed)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"{results['model'].rsplit('/', 1)[-1]}: {title}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rank_comparison(results: dict, methods: list[str], ratio: float, path: Path) -> None:
    """One panel per matrix type: kept rank against layer, one line per method at ``ratio``.

    Matrices kept dense have no rank to draw (they store more than any factorization would) and
    are left out of the lines. Nothing is written when no cell at ``ratio`` recorded its ranks
    (cells cached before ranks were recorded).
    """
    cells = {m: results["cells"].get(cell_key(m, ratio), {}).get("ranks") for m in methods}
    # rows with the same ranks (a method and its recovered variants: recovery keeps every rank) are
    # one line, labelled with all their names
    same: dict[str, tuple[list[str], dict]] = {}
    for m, r in cells.items():
        if r:
            same.setdefault(json.dumps(r, sort_keys=True), ([], r))[0].append(m)
    cells = {" = ".join(names): r for names, r in same.values()}
    if not cells:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(k for r in cells.values() for layer in r.values() for k in layer))
    cols = min(4, len(kinds))
    rows = -(-len(kinds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, sharex=True)
    for ax, kind in zip(axes.flat, kinds):
        for m, ranks in cells.items():
            pts = sorted((int(layer), r[kind]) for layer, r in ranks.items() if isinstance(r.get(kind), int))
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=2, lw=1, label=m)
        ax.set_title(kind, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(kinds):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    for ax in axes[:, 0]:
        ax.set_ylabel("kept rank")
    lines = {}  # every row once, also one drawn in some panels only
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            lines.setdefault(label, h)
    # below the panels, growing downwards; savefig's tight box takes it in
    fig.legend(list(lines.values()), list(lines), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=max(1, min(3, len(lines))), fontsize=7)
    fig.suptitle(f"{results['model'].rsplit('/', 1)[-1]}: kept rank per layer at ratio {ratio:g} "
                 "(dense-kept matrices omitted)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
