"""A real pretrained model end to end: compress with the streaming pipeline, serve, ask.

    .venv/bin/python -m benchmarks.real_model /work/models/qwen2.5-coder-1.5b-instruct \\
        --name qwen2.5-coder-1.5b --cells svd-llm@0.2,svd-llm@0.3 --calib-windows 16 --eval-windows 8

For each ``method@ratio`` cell: ``soco-compress`` in a fresh process (peak RSS, seconds per stage
and per group, perplexity dense and compressed from its report), then ``vllm serve CKPT
--load-format soco`` on 127.0.0.1 with the CPU flags, and the same questions asked of it through
the ``openai`` client as of the dense model (served the same way). Finished cells are cached in
``benchmarks/results/real_<name>.json``, so a killed run continues; checkpoints go to ``--out``.

soco trains once for several ratios: the cell ``soco@0.2+0.3`` is one compression (``--ratio
0.2,0.3``) that fills the cells ``soco@0.2`` and ``soco@0.3``, each with the run's wall time and
peak memory. ``--soco-steps`` scales its training to the machine; the cell records the value.

``--eval-text pydoc`` (or a file) adds a second perplexity, on text of another domain, for the dense
model and every cell whose checkpoint is still under ``--out`` (``soco-compress eval`` in a fresh
process, the same windows), so that a recovery's in-domain gain is not mistaken for a general one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.scale import compress_subprocess  # noqa: E402
from compress.recover import DEFAULT_STEPS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
QUESTIONS = {
    "chat": "What is the capital of France?",
    "code": "Write a Python function that returns the square of x.",
}
COMPLETION = "The three primary colours are"


def ask(model_dir: Path, load_format: str | None, max_tokens: int = 48) -> dict:
    """Serve ``model_dir`` and ask the questions (greedy): answers and server start-up time."""
    import time

    from openai import OpenAI

    from soco_serve.server import VllmServer

    t0 = time.perf_counter()
    with VllmServer(model_dir, load_format=load_format, extra_args=["--max-model-len", "4096"]) as server:
        started = time.perf_counter() - t0
        client = OpenAI(base_url=server.base_url + "/v1", api_key="none")
        name = client.models.list().data[0].id
        out = {"startup_seconds": round(started, 1)}
        for key, q in QUESTIONS.items():
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": q}],
                                               max_tokens=max_tokens, temperature=0)
            out[key] = r.choices[0].message.content
        r = client.completions.create(model=name, prompt=COMPLETION, max_tokens=24, temperature=0)
        out["completion"] = COMPLETION + r.choices[0].text
    return out


def perplexity(model_dir: Path, text: str, windows: int, seq_len: int) -> dict:
    """``soco-compress eval`` of a dense folder or a checkpoint in a fresh process (so the
    benchmark's own memory stays small): perplexity and tokens."""
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "eval", str(model_dir), "--eval-text", text,
                           "--eval-windows", str(windows), "--seq-len", str(seq_len), "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"soco-compress eval {model_dir} --eval-text {text} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a dense Hugging Face folder (safetensors)")
    p.add_argument("--name", required=True, help="result file stem: real_<name>.json")
    p.add_argument("--cells", default="svd-llm@0.2",
                   help="comma-separated method@ratio; method+recover@ratio with the recovery stage at its default")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "real")
    p.add_argument("--no-serve", action="store_true", help="compress and evaluate only")
    p.add_argument("--no-progress", action="store_true",
                   help="do not show the compressor's progress bars (by default they are passed through)")
    p.add_argument("--soco-steps", type=int, default=None,
                   help="soco's training steps (default: the compressor's); recorded in the cell")
    p.add_argument("--compress-args", default="",
                   help="more soco-compress options for the cells computed in this run, e.g. "
                        "'--recover-kl-stride 4'; recorded in each cell")
    p.add_argument("--eval-text", default=None, metavar="SRC",
                   help="a second evaluation text of another domain ('pydoc' or a .txt/.jsonl file), for the "
                        "dense model and every cell whose checkpoint is under --out")
    a = p.parse_args(argv)
    import torch

    from benchmarks.measure import device_name

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"real_{a.name}.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    setting = {"calib_windows": a.calib_windows, "eval_windows": a.eval_windows, "seq_len": a.seq_len}
    for k, v in setting.items():  # one file, one setting: its cells are compared with each other
        if k in res and res[k] != v:
            raise SystemExit(f"{path}: its cells were made with {k}={res[k]}, this run asks for {v}; "
                             "give another --name for a run with other settings")
    res.update(model=str(a.model), device=device_name(torch.device("cpu")), **setting)
    cells = res.setdefault("cells", {})

    def save() -> None:
        path.write_text(json.dumps(res, indent=2) + "\n")

    if not a.no_serve and "dense" not in res:
        res["dense"] = ask(a.model, None)
        save()
    if a.eval_text and res.get("eval_text") != a.eval_text:
        if res.get("eval_text"):
            print(f"--eval-text {a.eval_text} replaces {res['eval_text']}: every cell's second perplexity is "
                  "dropped", flush=True)
            for c in cells.values():
                c.pop("ppl_eval_text", None)
        d = perplexity(a.model, a.eval_text, a.eval_windows, a.seq_len)
        res.update(eval_text=a.eval_text, eval_text_tokens=d["eval_tokens"], ppl_dense_eval_text=d["ppl"])
        save()
    for spec in [c for c in a.cells.split(",") if c]:
        method, ratios = spec.split("@")
        ratios = ratios.split("+")
        method, recover = method.removesuffix("+recover"), method.endswith("+recover")
        keys = [f"{method}{'+recover' if recover else ''}@{r}" for r in ratios]
        ckpt = a.out / a.name / spec.replace("@", "-")
        # one run fills every ratio's cell; each ratio's checkpoint is ckpt/ratio-<r> when there are several
        ckpts = {k: ckpt if len(ratios) == 1 else ckpt / f"ratio-{float(r):g}" for k, r in zip(keys, ratios)}
        if not all("report" in cells.get(k, {}) for k in keys):
            extra = ["--soco-steps", str(a.soco_steps)] if method == "soco" and a.soco_steps is not None else []
            extra += shlex.split(a.compress_args)
            if recover and "--recover-steps" not in extra:
                # explicit, so that the cell means the same whatever the compressor's default
                extra += ["--recover-steps", str(DEFAULT_STEPS)]
            r = compress_subprocess(ROOT, [str(a.model), "-o", str(ckpt), "--force", "--method", method,
                                           "--ratio", ",".join(ratios), "--calib-windows", str(a.calib_windows),
                                           "--eval-windows", str(a.eval_windows), "--seq-len", str(a.seq_len),
                                           *(["--no-progress"] if a.no_progress else []),
                                           *([] if recover else ["--recover-steps", "0"]), *extra],
                                   echo=not a.no_progress)
            if "error" in r:
                print(f"{spec}: compression failed:\n{r['error']}", flush=True)
                for k in keys:
                    cells[k] = dict(r)
                save()
                continue
            rep = r.pop("report")
            reps = [rep] if len(ratios) == 1 else [rep["checkpoints"][str(ckpts[k])] for k in keys]
            for k, rk in zip(keys, reps):
                c = cells[k] = dict(r)
                c["report"] = {k2: rk[k2] for k2 in ("achieved_ratio", "model_ratio", "ppl_dense", "ppl_compressed",
                                                     "eval_tokens", "seconds", "seconds_per_group", "memory",
                                                     "linear_params", "model_params")}
                if method == "soco" and a.soco_steps is not None:
                    c["report"]["soco_steps"] = a.soco_steps
                if "soco" in rk:  # where the budget went: the threshold and each stage's end (the history stays in the checkpoint)
                    c["report"]["soco"] = {k2: rk["soco"][k2] for k2 in ("prune", "stages", "final") if k2 in rk["soco"]}
                if a.compress_args:
                    c["report"]["compress_args"] = a.compress_args
                if len(ratios) > 1:
                    c["report"]["trained_with"] = spec  # the run that trained this cell's scores
                if "recovery" in rk:  # the stage's totals and settings, and each group's losses: a training batch's
                    # against the held-out one's is what tells overfitting (the curves stay in the checkpoint's report)
                    rec = c["report"]["recovery"] = dict(rk["recovery"])
                    rec["per_group"] = {g: {k2: v for k2, v in log.items() if k2 != "curve"}
                                        for g, log in rk["recovery"]["per_group"].items()}
                    c["report"]["recover_settings"] = rk["settings"]["recover"]
            save()
        for k in keys:
            c = cells[k]
            print(f"{k}: ppl {c['report']['ppl_dense']:.2f} -> {c['report']['ppl_compressed']:.2f}, peak RSS "
                  f"{c['peak_rss_bytes'] / 2**30:.2f} GiB, {c['wall_seconds']} s", flush=True)
            if a.eval_text and "ppl_eval_text" not in c:
                if (ckpts[k] / "report.json").exists():
                    c["ppl_eval_text"] = perplexity(ckpts[k], a.eval_text, a.eval_windows, a.seq_len)["ppl"]
                    save()
                    print(f"{k}: ppl on {a.eval_text} {res['ppl_dense_eval_text']:.2f} -> "
                          f"{c['ppl_eval_text']:.2f}", flush=True)
                else:
                    print(f"{k}: no checkpoint at {ckpts[k]} for the --eval-text perplexity", flush=True)
            if not a.no_serve and "served" not in c:
                c["served"] = ask(ckpts[k], "soco")
                save()
                print(json.dumps(c["served"], indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
