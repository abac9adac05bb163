"""Greedy tokens of a dense model and of its soco checkpoint in vLLM, in one process.

    python -m tests.soco_serve.vllm_greedy DENSE_DIR SOCO_DIR OUT.json

Run as a subprocess by the architecture matrix (one process per architecture): the two engines are
built one after the other, on the same token prompts, and the result is written as JSON
``{"dense": [...], "soco": [...]}`` with each prompt's generated token ids and their log-probabilities.
"""

from __future__ import annotations

import gc
import json
import os
import sys

from soco_serve.server import CPU_ENV

PROMPTS = [[5, 100, 200, 300, 17, 42, 900, 12, 7, 64, 33, 250], [11, 22, 33, 44, 55, 66, 77, 88, 99, 111, 222, 333,
                                                                  444, 555, 666, 777]]
MAX_TOKENS = 12  # with the prompts, longer than the matrix's sliding windows


def greedy(model: str, load_format: str) -> list[dict[str, list]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, load_format=load_format, dtype="float32", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=64 * 1024**2, distributed_executor_backend="uni", seed=0)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=1, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    got = [{"tokens": list(o.outputs[0].token_ids),
            "logprobs": [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]}
           for o in outs]
    del llm
    gc.collect()
    return got


def main(argv: list[str]) -> int:
    dense, soco, out = argv
    os.environ.update(CPU_ENV)
    result = {"dense": greedy(dense, "auto"), "soco": greedy(soco, "soco")}
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
