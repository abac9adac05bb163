"""The main job, end to end on the embedded default model (``make demo``).

1. prepare the default model (SmolLM2-135M-Instruct, dequantized once) and text;
2. compress it with Basis Sharing at ratio 0.3 and evaluate perplexity (``soco-compress``);
3. serve the checkpoint with ``vllm serve OUT --load-format soco`` on 127.0.0.1;
4. ask a chat completion and a completion through the ``openai`` client, print the answers and
   the weight memory saved; stop the server.

Output goes to ``runs/demo/`` in the repository (replaced on every run).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="basis-sharing")
    p.add_argument("--ratio", default="0.3")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    a = p.parse_args()

    from openai import OpenAI

    from soco_serve.server import VllmServer

    ckpt = a.out / f"{a.method}-{a.ratio}"
    print(f"== 1-2. compress the default model: {a.method}, ratio {a.ratio} -> {ckpt}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compress.cli", "-o", str(ckpt), "--force", "--method", a.method,
                    "--ratio", a.ratio], check=True, cwd=ROOT)
    print(f"   compressed and evaluated in {time.perf_counter() - t0:.0f} s", flush=True)

    print(f"== 3. vllm serve {ckpt} --load-format soco", flush=True)
    log = a.out / "vllm-serve.log"
    t0 = time.perf_counter()
    with VllmServer(ckpt, log_path=log) as server:
        print(f"   healthy at {server.base_url} after {time.perf_counter() - t0:.0f} s (log: {log})", flush=True)
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        print("== 4. openai client", flush=True)
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=48, temperature=0)
        print(f"   chat       > What is the capital of France?\n              {chat.choices[0].message.content!r}")
        comp = client.completions.create(model=model, prompt="The three primary colours are", max_tokens=32,
                                         temperature=0)
        print(f"   completion > The three primary colours are\n              {comp.choices[0].text!r}")
    print("   server stopped", flush=True)

    import json

    report = json.loads((ckpt / "report.json").read_text())
    m = re.search(r"weights in memory (\d+) bytes", log.read_text())
    dense_mb = report["model_params"]["dense"] * 4 / 1e6
    if m:
        served_mb = int(m.group(1)) / 1e6
        print(f"== memory: weights {served_mb:.1f} MB served vs {dense_mb:.1f} MB dense (float32): "
              f"{dense_mb - served_mb:.1f} MB saved ({1 - served_mb / dense_mb:.1%})")
    print(f"== perplexity: dense {report['ppl_dense']:.2f}, compressed {report['ppl_compressed']:.2f} "
          f"({report['eval_tokens']:,} tokens); ratio {report['achieved_ratio']:.3f} of linear weights, "
          f"{report['model_ratio']:.3f} of the model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
