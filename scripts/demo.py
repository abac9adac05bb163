"""The main job, end to end on the embedded default model (``make demo``).

1. prepare the default model (SmolLM2-135M-Instruct, dequantized once) and its text; with
   ``--chats N``, also N of its own chats (``soco-compress selfchat``, once, cached beside the
   model);
2. compress it with svd-llm at ratio 0.2 and a shorter recovery stage than the compressor's, calibrated on the text
   with a quarter of the windows chats made from its own articles (``--calib-chat articles``; or
   the chats of ``--calib-chat FILE`` or ``--chats N``; ``--calib-chat none``: text alone), and
   evaluate perplexity on fewer windows (``soco-compress``). Why these defaults: docs/results.md, Chat calibration;
3. serve the dense model, then the checkpoint with ``vllm serve OUT --load-format soco``, on
   127.0.0.1, and ask each a chat completion and a completion through the ``openai`` client;
4. print the dense and compressed answers side by side, the weight memory saved and both
   perplexities.

Output goes to ``runs/demo/`` in the repository (replaced on every run).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# Fewer than the compressor's defaults, to keep the demo within its 15-minute goal on a 2-core CPU
# (what they cost and buy: docs/results.md, Chat calibration).
RECOVER_STEPS = 24
KL_STRIDE = 4  # the last group's KL at every 4th position: its head product is most of that group's time
EVAL_WINDOWS = 16

QUESTIONS = (("chat", "What is the capital of France?"), ("completion", "The three primary colours are"))


def ask(base_url: str) -> list[str]:
    """Greedy answers to :data:`QUESTIONS` through the ``openai`` client."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    out = []
    for kind, text in QUESTIONS:
        if kind == "chat":
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                               max_tokens=40, temperature=0)
            out.append(r.choices[0].message.content or "")
        else:
            out.append(client.completions.create(model=model, prompt=text, max_tokens=32, temperature=0).choices[0].text)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="svd-llm",
                   help="svd-llm by default: with recovery, the fastest of the methods (the demo's time is in "
                        "docs/results.md)")
    p.add_argument("--ratio", default="0.2")
    p.add_argument("--recover-steps", default=str(RECOVER_STEPS),
                   help=f"recovery steps per group (soco-compress --recover-steps; default {RECOVER_STEPS}, fewer "
                        "than the compressor's)")
    p.add_argument("--recover-kl-stride", default=str(KL_STRIDE),
                   help=f"the last group's KL at every N-th position (soco-compress --recover-kl-stride; default "
                        f"{KL_STRIDE}, the compressor's is every position)")
    p.add_argument("--eval-windows", default=str(EVAL_WINDOWS),
                   help=f"perplexity windows (soco-compress --eval-windows; default {EVAL_WINDOWS}, fewer than the "
                        "compressor's)")
    p.add_argument("--seed", default="0", help="calibration seed (soco-compress --seed)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--calib-chat", default="articles", metavar="FILE.jsonl|articles|none",
                      help="calibrate a quarter of the windows on these chats (soco-compress --calib-chat); "
                           "none: on text alone")
    chat.add_argument("--chats", type=int, default=0,
                      help="calibrate a quarter of the windows on N of the model's own chats (default 0: none; "
                           "what 64 did to the answers and the time is in docs/results.md, Chat calibration)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    a = p.parse_args()

    from compress import methods
    from compress.models import cache_dir, default_model_dir
    from soco_serve.server import VllmServer

    try:
        methods.get(a.method)
    except ValueError as e:
        p.error(str(e))
    ckpt = a.out / f"{a.method}-{a.ratio}"
    t_start = t0 = time.perf_counter()
    extra = ["--seed", a.seed, "--recover-steps", a.recover_steps, "--recover-kl-stride", a.recover_kl_stride,
             "--eval-windows", a.eval_windows]
    chats = None if a.calib_chat == "none" else a.calib_chat
    if a.chats:
        chats = str(cache_dir() / f"selfchat-{default_model_dir().name}-{a.chats}.jsonl")
        if not Path(chats).is_file():
            print(f"== 1. the default model's own chats ({a.chats}) -> {chats}", flush=True)
            subprocess.run([sys.executable, "-m", "compress.cli", "selfchat", "-o", chats, "--n", str(a.chats)],
                           check=True, cwd=ROOT)
    if chats:
        extra += ["--calib-chat", chats]
    print(f"== 1-2. compress the default model: {a.method}, ratio {a.ratio} -> {ckpt}", flush=True)
    subprocess.run([sys.executable, "-m", "compress.cli", "-o", str(ckpt), "--force", "--method", a.method,
                    "--ratio", a.ratio, *extra], check=True, cwd=ROOT)
    compress_seconds = time.perf_counter() - t0
    print(f"   compressed and evaluated in {compress_seconds:.0f} s", flush=True)

    answers: dict[str, list[str]] = {}
    for label, model, load_format in (("dense", default_model_dir(), None), ("compressed", ckpt, "soco")):
        flag = f" --load-format {load_format}" if load_format else ""
        print(f"== 3. vllm serve {model}{flag}", flush=True)
        log = a.out / f"vllm-serve-{label}.log"
        t0 = time.perf_counter()
        with VllmServer(model, load_format=load_format, log_path=log) as server:
            print(f"   healthy at {server.base_url} after {time.perf_counter() - t0:.0f} s (log: {log})", flush=True)
            answers[label] = ask(server.base_url)
        print("   server stopped", flush=True)

    summary = {"method": a.method, "ratio": float(a.ratio), "seed": int(a.seed), "chats": a.chats, "calib_chat": chats,
               "recover_steps": int(a.recover_steps), "recover_kl_stride": int(a.recover_kl_stride),
               "eval_windows": int(a.eval_windows),
               "compress_seconds": round(compress_seconds, 1),
               "answers": {text: {"dense": d, "compressed": c}
                           for (_, text), d, c in zip(QUESTIONS, answers["dense"], answers["compressed"])}}
    print("== 4. the same questions through the openai client, greedy")
    for (kind, text), dense, comp in zip(QUESTIONS, answers["dense"], answers["compressed"]):
        print(f"   {kind:<10} > {text}\n     dense      {dense!r}\n     compressed {comp!r}")

    report = json.loads((ckpt / "report.json").read_text())
    m = re.search(r"weights in memory (\d+) bytes", (a.out / "vllm-serve-compressed.log").read_text())
    dense_mb = report["model_params"]["dense"] * 4 / 1e6
    if m:
        served_mb = int(m.group(1)) / 1e6
        print(f"== memory: weights {served_mb:.1f} MB served vs {dense_mb:.1f} MB dense (float32): "
              f"{dense_mb - served_mb:.1f} MB saved ({1 - served_mb / dense_mb:.1%})")
    print(f"== perplexity: dense {report['ppl_dense']:.2f}, compressed {report['ppl_compressed']:.2f} "
          f"({report['eval_tokens']:,} tokens); ratio {report['achieved_ratio']:.3f} of linear weights, "
          f"{report['model_ratio']:.3f} of the model")
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    summary.update({k: report[k] for k in ("ppl_dense", "ppl_compressed", "eval_tokens", "achieved_ratio", "model_ratio")},
                   recovery={k: v for k, v in report.get("recovery", {}).items() if k != "per_group"})
    (a.out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"== wrote {a.out / 'demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
