"""Human-facing output: the rank plot and the summary lines printed after a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_ranks(ranks: dict[str, dict[str, int | str]], title: str, path: Path) -> None:
    """Kept rank per layer, one line per matrix kind (dense matrices drawn as hollow markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(ranks, key=int)
    kinds = list(dict.fromkeys(k for layer in layers for k in ranks[layer]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind in kinds:
        xs = [int(layer) for layer in layers if isinstance(ranks[layer].get(kind), int)]
        ys = [ranks[str(x)][kind] for x in xs]
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=kind)
        dense = [int(layer) for layer in layers if ranks[layer].get(kind) == "dense"]
        if dense:
            ax.plot(dense, [0] * len(dense), "o", mfc="none", color=line.get_color())
    ax.set_xlabel("layer")
    ax.set_ylabel("kept rank (hollow at 0: kept dense)")
    ax.set_title(title)
    ax.legend(ncol=len(kinds), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        f"method            {report['method']}",
        f"target ratio      {report['target_ratio']}",
        f"achieved ratio    {report['achieved_ratio']:.4f} of decoder linear parameters "
        f"({report['linear_params']['stored']:,} of {report['linear_params']['dense']:,} kept)",
        f"whole-model ratio {report['model_ratio']:.4f} ({report['model_params']['stored']:,} of "
        f"{report['model_params']['dense']:,} parameters)",
    ]
    if "ppl_dense" in report:
        lines.append(f"perplexity        dense {report['ppl_dense']:.3f} -> compressed {report['ppl_compressed']:.3f} "
                     f"({report['eval_tokens']:,} tokens)")
    rec = report.get("recovery")
    if rec:
        stopped = ", ".join(f"{n} {why}" for why, n in rec["stopped"].items())
        parts = [f"{rec['steps']} steps in {rec['seconds']:.0f} s"]
        if "val_before" in rec:
            parts.append(f"held-out relative error {rec['val_before']:.4f} -> {rec['val_after']:.4f} (mean over groups)")
        if "kl_before" in rec:
            parts.append(f"last group's held-out top-k KL {rec['kl_before']:.4f} -> {rec['kl_after']:.4f}")
        lines.append("recovery          " + "; ".join([*parts, f"groups stopped: {stopped}"]))
    lines.append("seconds           " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    return lines
