"""What recovery buys per minute: local (the compressor's stage) against end to end.

    .venv/bin/python -m benchmarks.recovery --method svd-llm --ratio 0.3 --local-steps 0,20,50 --e2e-steps 300

Both start from the same truncation and train the same tensors (``U``, ``V``, shared bases, the
matrices kept dense) on the same calibration windows, with the same held-out split:

* ``local@N``: one ``soco-compress --recover-steps N`` run (group by group against the dense
  group's outputs, memory bounded by one group): its perplexity and recovery seconds; with
  ``--local-lr 5e-3,2e-2`` one cell per steps and rate, keyed ``local@N lr=R`` off the default rate
  (and ``scale=S`` off the default ``--lr-scale``, ``last=kl`` with the last group on the KL, the
  default; see :func:`local_key`);
* ``e2e``: the ``local@0`` checkpoint loaded whole with transformers and trained against the
  dense model's next-token distribution (top-k KL, :func:`compress.soco.topk_kl`), the training
  loop of the compressor's stage (:func:`compress.recover.distill`); perplexity on the evaluation
  windows at every validation, so one run draws the whole curve. Its memory grows with the model:
  it is the reference the bounded form is measured against, not a product path. With
  ``--e2e-from N`` it starts from ``local@N`` instead (cell ``e2e after local@N``): whether an
  end-to-end stage after the local one buys more than more local steps.

Perplexity on the default text's evaluation split and on ``--other-text`` (default ``pydoc``:
Python's reference documentation, another domain). Cells are cached in
``benchmarks/results/recovery_<name>.json``; the plot (``.png``) is perplexity against seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from compress import data, evaluate, models, soco  # noqa: E402
from compress.config import CompressConfig  # noqa: E402
from compress.pipeline import calibration_windows, run  # noqa: E402
from compress.recover import LAST_LOSSES, LEGACY, LR_SCALES, RecoverConfig, distill, trainable  # noqa: E402
from benchmarks.measure import device_name  # noqa: E402
from soco_serve.hf import load_soco_model  # noqa: E402
from soco_serve.layout import CheckpointReader  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def perplexities(model: torch.nn.Module, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    return {k: evaluate.perplexity(model, w, progress=False).ppl for k, w in windows.items()}


def local_cell(cfg: CompressConfig, rc: RecoverConfig, windows: dict[str, torch.Tensor]) -> dict:
    out = cfg.output.parent / f"local-{rc.steps}"
    t0 = time.perf_counter()
    rep = run(replace(cfg, output=out, force=True, recover=rc))
    cell = {"wall_seconds": round(time.perf_counter() - t0, 1), "ppl": rep["ppl_compressed"],
            "recover_seconds": rep.get("recovery", {}).get("seconds", 0.0), "stage_seconds": rep["seconds"],
            "ppl_other": perplexities(load_soco_model(out), windows)["other"]}
    if "recovery" in rep:
        cell["recovery"] = {k: v for k, v in rep["recovery"].items() if k != "per_group"}
    return cell


def checkpoint_recovery(ckpt: Path) -> RecoverConfig | None:
    """The recovery settings a checkpoint folder was written with (None if there is none)."""
    report = ckpt / "report.json"
    return RecoverConfig.from_settings(json.loads(report.read_text())["settings"]["recover"]) if report.exists() else None


KEYED = ("lr", "lr_scale", "last_loss", "kl_stride", "warmup", "kl_groups", "kl_steps")  # what a local cell records and its key names


def cell_settings(cell: dict) -> RecoverConfig:
    """A local cell's recovery settings but its steps (its key has those). Cells without
    ``lr_scale`` were run before the rate was relative (absolute rates); a field other cells lack
    had its :data:`compress.recover.LEGACY` value."""
    return RecoverConfig.from_settings({"lr_scale": "none", **{k: cell[k] for k in KEYED if k in cell}})


def line_of(rc: RecoverConfig) -> tuple:
    """The settings one line of the plot shares (all but the steps)."""
    return tuple(getattr(rc, k) for k in KEYED)


def local_config(a: argparse.Namespace, steps: int, lr: float) -> RecoverConfig:
    """The recovery of the local cell at ``steps`` and ``lr``; ``local@0`` is the truncation, one
    cell for every setting."""
    if not steps:
        return RecoverConfig(steps=0, last_loss=LEGACY["last_loss"])
    return RecoverConfig(steps=steps, lr=lr, lr_scale=a.lr_scale, last_loss=a.last_loss, kl_stride=a.kl_stride,
                         warmup=a.warmup, kl_groups=a.kl_groups, kl_steps=a.kl_steps)


def local_key(rc: RecoverConfig) -> str:
    """``local@STEPS`` at the default learning rate, else ``local@STEPS lr=LR`` (and `` scale=S`` off the
    default scale); `` last=L`` where the last group's loss is not the hidden state's (the stage's only
    loss when the first cells were run, so their keys have no suffix), with `` stride=S`` where its KL
    is not taken at every position, `` groups=K`` where it trains more than the last group and `` kl@N``
    where the KL groups take their own N steps; `` warmup=W`` with a warm-up."""
    if not rc.steps:
        return "local@0"
    key = f"local@{rc.steps}" if rc.lr == RecoverConfig.lr else f"local@{rc.steps} lr={rc.lr:g}"
    key = key if rc.lr_scale == RecoverConfig.lr_scale else f"{key} scale={rc.lr_scale}"
    if rc.last_loss != LEGACY["last_loss"]:
        key += f" last={rc.last_loss}" + (f" stride={rc.kl_stride}" if rc.kl_stride != LEGACY["kl_stride"] else "")
        key += f" groups={rc.kl_groups}" if rc.kl_groups != LEGACY["kl_groups"] else ""
        key += f" kl@{rc.kl_steps}" if rc.kl_steps != LEGACY["kl_steps"] else ""
    return key + (f" warmup={rc.warmup}" if rc.warmup != LEGACY["warmup"] else "")


def e2e_start(a: argparse.Namespace) -> str:
    """The local cell the end-to-end cell starts from (the first --local-lr's)."""
    return local_key(local_config(a, a.e2e_from, float(a.local_lr.split(",")[0])))


def e2e_key(start: str) -> str:
    return "e2e" if start == "local@0" else f"e2e after {start}"


def e2e_settings(a: argparse.Namespace) -> dict:
    return {"from": e2e_start(a), "steps": a.e2e_steps, "lr": a.e2e_lr, "lr_scale": a.lr_scale,
            "seq_len": a.e2e_seq_len, "batch": a.e2e_batch, "topk": a.topk,
            "check_every": a.check_every, "patience": a.patience}


def e2e_cell(cfg: CompressConfig, ckpt: Path, a: argparse.Namespace, windows: dict[str, torch.Tensor],
             dense: torch.nn.Module, tok) -> dict:
    """The whole compressed model trained against the dense model's top-k distribution."""
    train = soco.training_windows(calibration_windows(cfg, tok), a.e2e_seq_len, data.window_prefix(tok))
    teacher = soco.teacher_topk(soco.Stack.resident(dense, models.arch_spec(dense), []), train, a.topk, progress=False)
    student = load_soco_model(ckpt)
    linears = CheckpointReader(ckpt).manifest.linears
    params = list(trainable(linears, {n: student.get_submodule(n) for n in linears}).values())
    batches = list(torch.split(torch.arange(train.shape[0]), a.e2e_batch))

    def loss(b: int) -> torch.Tensor:
        i = batches[b]
        return soco.topk_kl(student(input_ids=train[i], use_cache=False).logits, teacher.logp[i], teacher.idx[i])

    curve: list[dict] = []
    t0 = time.perf_counter()
    paused = 0.0

    def on_check(step: int, val: float) -> None:
        nonlocal paused
        t = time.perf_counter()
        curve.append({"step": step, "seconds": round(t - t0 - paused, 1), "val_kl": val,
                      **{f"ppl_{k}" if k != "eval" else "ppl": v for k, v in perplexities(student, windows).items()}})
        paused += time.perf_counter() - t
        print(f"   e2e step {step}: held-out KL {val:.4f}, ppl {curve[-1]['ppl']:.2f}", flush=True)

    log = distill(params, loss, len(batches), RecoverConfig(steps=a.e2e_steps, lr=a.e2e_lr, lr_scale=a.lr_scale, check_every=a.check_every,
                                                             patience=a.patience), seed=cfg.seed, on_check=on_check)
    best = perplexities(student, windows)
    return {"curve": curve, "ppl": best["eval"], "ppl_other": best["other"], "stopped": log.stopped,
            "best_step": log.best_step, "steps": log.steps, "train_seconds": curve[-1]["seconds"],
            "settings": {**e2e_settings(a), "windows": int(train.shape[0])}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--method", default="svd-llm")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--calib-windows", type=int, default=CompressConfig.calib_windows)
    p.add_argument("--batch-size", type=int, default=CompressConfig.batch_size, help="calibration windows per batch")
    p.add_argument("--seq-len", type=int, default=CompressConfig.seq_len)
    p.add_argument("--eval-windows", type=int, default=CompressConfig.eval_windows)
    p.add_argument("--local-steps", default="0,20,50", help="--recover-steps of the local cells")
    p.add_argument("--local-lr", default=str(RecoverConfig.lr),
                   help="learning rates of the local cells, comma-separated: one cell per steps and rate")
    p.add_argument("--lr-scale", choices=LR_SCALES, default=RecoverConfig.lr_scale,
                   help="--recover-lr-scale of every cell (local and end to end)")
    p.add_argument("--last-loss", choices=LAST_LOSSES, default=RecoverConfig.last_loss,
                   help="--recover-last-loss of the local cells")
    p.add_argument("--kl-stride", type=int, default=RecoverConfig.kl_stride, help="--recover-kl-stride of the local cells")
    p.add_argument("--kl-groups", type=int, default=RecoverConfig.kl_groups,
                   help="--recover-kl-groups of the local cells")
    p.add_argument("--kl-steps", type=int, default=RecoverConfig.kl_steps,
                   help="--recover-kl-steps of the local cells (default: their steps)")
    p.add_argument("--warmup", type=int, default=RecoverConfig.warmup, help="--recover-warmup of the local cells")
    p.add_argument("--e2e-steps", type=int, default=300)
    p.add_argument("--e2e-lr", type=float, default=RecoverConfig.lr)
    p.add_argument("--e2e-seq-len", type=int, default=256, help="end-to-end training windows (cut from the calibration's)")
    p.add_argument("--e2e-batch", type=int, default=2, help="end-to-end windows per step")
    p.add_argument("--e2e-from", type=int, default=0, metavar="N",
                   help="start the end-to-end cell from local@N (at the first --local-lr); 0: from the truncation")
    p.add_argument("--topk", type=int, default=64, help="teacher log-probabilities kept per token")
    p.add_argument("--check-every", type=int, default=25)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--other-text", default="pydoc", help="the other-domain evaluation text")
    p.add_argument("--name", default=None, help="result file stem (default METHOD-RATIO)")
    p.add_argument("--work", type=Path, default=Path("/tmp/soco-recovery-bench"), help="checkpoints go here")
    a = p.parse_args(argv)
    name = a.name or f"{a.method}-{a.ratio:g}"
    path = RESULTS / f"recovery_{name}.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    cfg = CompressConfig(output=a.work / name / "x", model=a.model, method=a.method, ratio=a.ratio, progress=False,
                         calib_windows=a.calib_windows, batch_size=a.batch_size, seq_len=a.seq_len,
                         eval_windows=a.eval_windows, recover=RecoverConfig(steps=0))  # each cell sets its own
    model_path = str(models.resolve_model(a.model))
    dense, tok, _ = models.load_model(model_path)
    windows = {"eval": data.text_eval_windows(tok, None, cfg.seq_len, cfg.eval_windows),
               "other": data.text_eval_windows(tok, a.other_text, cfg.seq_len, cfg.eval_windows)}
    setting = {"model": model_path, "method": a.method, "ratio": a.ratio, "other_text": a.other_text,
               "calib_windows": cfg.calib_windows, "batch_size": cfg.batch_size, "eval_windows": cfg.eval_windows,
               "seq_len": cfg.seq_len}
    if any(res.get(k) != v for k, v in setting.items()):
        if res:
            print(f"{path} was made with other settings: starting it afresh", flush=True)
        res = {}
    # The machine and threads of the first run stay at the top; each new cell records its own.
    res.update(setting)
    here = {"device": device_name(torch.device("cpu")), "threads": torch.get_num_threads()}
    for k, v in here.items():
        res.setdefault(k, v)
    if "dense" not in res:
        res["dense"] = perplexities(dense, windows)
    cells = res.setdefault("cells", {})

    def save() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
    save()
    lrs = [float(x) for x in a.local_lr.split(",")]
    ekey = e2e_key(e2e_start(a))
    # cells from before --e2e-from have no "from": they started at the truncation
    cached = {"from": "local@0", **{k: v for k, v in cells.get(ekey, {}).get("settings", {}).items() if k != "windows"}}
    run_e2e = bool(a.e2e_steps) and cached != e2e_settings(a)
    start = a.work / name / f"local-{a.e2e_from}"  # the end-to-end cell's starting checkpoint
    for steps in sorted({0, a.e2e_from, *(int(s) for s in a.local_steps.split(",") if s)}):
        for lr in lrs if steps else [RecoverConfig.lr]:
            rc = local_config(a, steps, lr)
            key = local_key(rc)
            # a local cell's checkpoint folder is shared by its rates (and gone with /tmp): rebuilt when the
            # end-to-end cell is to start from it and it holds another run
            rebuild = run_e2e and steps == a.e2e_from and lr == lrs[0] and checkpoint_recovery(start) != rc
            if key not in cells or (steps and cell_settings(cells[key]) != replace(rc, steps=None)) or rebuild:
                print(f"== {key}", flush=True)
                cells[key] = {**local_cell(cfg, rc, windows), **{k: getattr(rc, k) for k in KEYED}, **here}
                save()
            print(f"   {key}: ppl {cells[key]['ppl']:.2f}, other {cells[key]['ppl_other']:.2f}", flush=True)
    if run_e2e:
        print(f"== {ekey}", flush=True)
        cells[ekey] = {**e2e_cell(cfg, start, a, windows, dense, tok), **here}
        save()
    plot(res, path.with_suffix(".png"))
    return 0


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = res["cells"]
    # one line per learning rate and last group's loss, each starting from the truncation (local@0)
    rates = sorted({line_of(cell_settings(c)) for k, c in cells.items() if k.startswith("local@") and k != "local@0"}
                   or {line_of(RecoverConfig())}, key=lambda r: tuple(-1 if v is None else v for v in r))  # kl_steps: None
    lines = {r: sorted((c.get("recover_seconds", 0.0), c, k) for k, c in cells.items()
                       if k == "local@0" or (k.startswith("local@") and line_of(cell_settings(c)) == r)) for r in rates}
    # one legend below both panels, which grows with the lines instead of covering them
    rows = math.ceil((len(lines) + sum(k.startswith("e2e") for k in cells) + 1) / 2)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + 0.2 * rows))
    for ax, field, dense, title in ((axes[0], "ppl", res["dense"]["eval"], "evaluation split (in domain)"),
                                    (axes[1], "ppl_other", res["dense"]["other"], f"{res['other_text']} (other domain)")):
        for (lr, scale, last, stride, warmup, kl_groups, kl_steps), local in lines.items():
            ax.plot([s / 60 for s, _, _ in local], [c[field] for _, c, _ in local], marker="o",
                    label=f"local, lr {lr:g}" + (" × RMS" if scale == "rms" else "")
                    + ((", last group on the KL" if kl_groups == 1 else f", last {kl_groups} groups on the KL")
                       + (f" (every {stride}th position)" if stride > 1 else "")
                       + (f" for {kl_steps} steps" if kl_steps else "")
                       if last == "kl" else "") + (f", warm-up {warmup}" if warmup else "")
                    if field == "ppl" else None)
            for s, c, k in local:
                ax.annotate(k.split("@")[1].split()[0], (s / 60, c[field]), fontsize=7, textcoords="offset points",
                            xytext=(3, 3))
        for key, c in cells.items():
            if key.startswith("e2e"):  # after a local cell: its curve starts where that cell's training ended
                start = cells[c["settings"].get("from", "local@0")].get("recover_seconds", 0.0)
                ax.plot([(start + p["seconds"]) / 60 for p in c["curve"]], [p[field] for p in c["curve"]], marker=".",
                        label=(("end to end" if key == "e2e" else key.replace("e2e", "end to end"))
                               if field == "ppl" else None))
        ax.axhline(dense, color="gray", ls="--", label="dense" if field == "ppl" else None)
        ax.set_yscale("log")
        ax.set_xlabel("training minutes (evaluation excluded)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{res['model'].rsplit('/', 1)[-1]}, {res['method']} at {res['ratio']:g}: recovery against time "
                 f"({res['device']}, {res['threads']} threads)", fontsize=10)
    fig.tight_layout(rect=(0, 0.2 * rows / (4.2 + 0.2 * rows) + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
