"""A real `vllm serve --load-format soco` on 127.0.0.1, driven by the openai client.

Checkpoints are made by the real compressor from the real default model (and, for tensor
parallelism, from a tiny random Llama whose head counts divide by 2). Both share bases for only
some matrix types, so fused layers mix shared and private parts (on the real model gate/up; on
the tiny one q/k/v as private, shared, private and gate/up as private, shared).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from compress.models import default_model_dir
from soco_serve.layout import FORMAT_VERSION, INDEX_FILE, MANIFEST_FILE, CheckpointReader
from soco_serve.server import CPU_FLAGS, VllmServer
from tests.helpers import as_format_1, make_tiny_llama

pytestmark = pytest.mark.server

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "In 1905, Albert Einstein published",
    "Ingredients for a simple pancake recipe:",
    "The three laws of thermodynamics state that",
    "Translate to French: 'Good morning, how are you?'",
    "1, 1, 2, 3, 5, 8,",
    "Once upon a time, in a small village by the sea,",
]


def compress(out: Path, *args: str, model: Path | None = None) -> Path:
    cmd = [sys.executable, "-m", "compress.cli", *([str(model)] if model else []), "-o", str(out), "--no-eval",
           "--no-progress", "--recover-steps", "0", *args]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[2])
    return out


@pytest.fixture(scope="session")
def full_rank_ckpt(tmp_path_factory) -> Path:
    return compress(tmp_path_factory.mktemp("serve") / "full-rank", "--method", "svd", "--full-rank",
                    "--dtype", "float32")


@pytest.fixture(scope="session")
def bs03_ckpt(tmp_path_factory) -> Path:
    # With a short recovery stage: recovered factors serve like any others (same layout).
    return compress(tmp_path_factory.mktemp("serve") / "bs-0.3", "--method", "basis-sharing", "--ratio", "0.3",
                    "--calib-windows", "8", "--batch-size", "2", "--seq-len", "256", "--shared-types", "q,k,v,gate",
                    "--recover-steps", "6")


@pytest.fixture(scope="session")
def tiny_bs_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-serve")
    model = make_tiny_llama(root / "tiny")
    return compress(root / "tiny-bs", "--method", "basis-sharing", "--ratio", "0.3", "--calib-windows", "4",
                    "--seq-len", "64", "--shared-types", "k,up", model=model)


def weight_bytes(log: str) -> tuple[int, int]:
    """The loader's weight memory line: (bytes held in memory, bytes of the checkpoint files)."""
    m = re.search(r"soco: weights in memory (\d+) bytes .*checkpoint files (\d+) bytes", log)
    assert m, "the loader's memory line is missing from the server log"
    return int(m.group(1)), int(m.group(2))


def assert_held_once(log: str) -> None:
    """Every tensor of the checkpoint is held once: a shared basis once for its group, also where a
    fused layer mixes it with the layer's own factors (the files add only their headers)."""
    in_memory, on_disk = weight_bytes(log)
    assert in_memory <= on_disk and (on_disk - in_memory) / on_disk < 1e-3, (in_memory, on_disk)


def client(server: VllmServer):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=600)


def greedy(server: VllmServer, prompts: list[str], max_tokens: int, logprobs: int | None = None,
           ignore_eos: bool = True) -> list:
    c = client(server)
    model = c.models.list().data[0].id

    def one(p: str):
        return c.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0,
                                    logprobs=logprobs, extra_body={"ignore_eos": ignore_eos}).choices[0]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def test_full_rank_checkpoint_serves_exactly_the_dense_model(full_rank_ckpt, tmp_path):
    with VllmServer(default_model_dir(), load_format=None, log_path=tmp_path / "dense.log") as dense:
        ref = greedy(dense, PROMPTS, 64, logprobs=5)
    with VllmServer(full_rank_ckpt, log_path=tmp_path / "soco.log") as soco:
        got = greedy(soco, PROMPTS, 64, logprobs=5)
    for p, a, b in zip(PROMPTS, ref, got):
        assert b.logprobs.tokens == a.logprobs.tokens, p
        assert len(a.logprobs.tokens) == 64
        for la, lb in zip(a.logprobs.token_logprobs, b.logprobs.token_logprobs):
            assert abs(la - lb) < 1e-3, p
        for ta, tb in zip(a.logprobs.top_logprobs, b.logprobs.top_logprobs):
            for tok in set(ta) & set(tb):
                assert abs(ta[tok] - tb[tok]) < 1e-3, (p, tok)


def test_compressed_checkpoint_behind_the_openai_api(bs03_ckpt, tmp_path):
    from transformers import AutoTokenizer

    from soco_serve.hf import load_soco_model

    log = tmp_path / "bs.log"
    with VllmServer(bs03_ckpt, log_path=log) as s:
        c = client(s)
        models = c.models.list().data
        assert [m.id for m in models] == [str(bs03_ckpt)]
        model = models[0].id
        plain = c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0)
        assert plain.choices[0].text and plain.usage.completion_tokens == 16
        chunks = list(c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == plain.choices[0].text
        chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a colour."}],
                                         max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 16
        many = greedy(s, [PROMPTS[i % len(PROMPTS)] for i in range(16)], 24)  # 16 at once (8 threads x 2)
        assert all(ch.text for ch in many)
        served = greedy(s, PROMPTS[:4], 16, ignore_eos=False)
    # Same checkpoint through the transformers loader: the same greedy tokens.
    tok = AutoTokenizer.from_pretrained(bs03_ckpt)
    hf = load_soco_model(bs03_ckpt)
    for p, ch in zip(PROMPTS[:4], served):
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=16, do_sample=False)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == ch.text, p
    # Weight memory: what the file holds (a shared basis once), and less than dense by the ratio.
    assert_held_once(log.read_text())
    in_memory, _ = weight_bytes(log.read_text())
    report = json.loads((bs03_ckpt / "report.json").read_text())
    assert any(g["best_step"] > 0 for g in report["recovery"]["per_group"].values())  # recovered factors served
    dense_bytes = report["model_params"]["dense"] * 4
    assert in_memory <= dense_bytes * (1 - report["model_ratio"]) * 1.02
    assert in_memory < dense_bytes * 0.8


def _perturbed(ckpt: Path, dst: Path) -> Path:
    """A copy of ``ckpt`` at ``dst`` whose first expand factor is halved (another valid model)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(ckpt, dst, dirs_exist_ok=True)
    index = json.loads((dst / INDEX_FILE).read_text())["weight_map"]
    name = next(n for n in sorted(index) if n.endswith(".lowrank_u"))
    tensors = load_file(dst / index[name])
    tensors[name] = tensors[name] * 0.5
    save_file(tensors, dst / index[name], metadata={"format": "pt"})
    return dst


def test_compiled_server_matches_eager(bs03_ckpt, tmp_path):
    """vLLM's default CPU mode (torch.compile, its graph cached across starts) serves what eager
    mode serves, and a changed checkpoint at the same path is never answered from the cache."""
    compiled = [f for f in CPU_FLAGS if f != "--enforce-eager"]
    path = tmp_path / "ckpt"
    for round_, ckpt in enumerate((bs03_ckpt, _perturbed(bs03_ckpt, tmp_path / "perturbed"))):
        if path.exists():
            shutil.rmtree(path)
        shutil.copytree(ckpt, path)
        with VllmServer(path, log_path=tmp_path / f"eager{round_}.log") as s:
            ref = greedy(s, PROMPTS[:4], 24, logprobs=1)
        with VllmServer(path, args=compiled, log_path=tmp_path / f"compiled{round_}.log") as s:
            got = greedy(s, PROMPTS[:4], 24, logprobs=1)
            assert "fused CPU kernel" in s.log()
        for p, a, b in zip(PROMPTS, ref, got):
            assert b.logprobs.tokens == a.logprobs.tokens, (round_, p)
            for la, lb in zip(a.logprobs.token_logprobs, b.logprobs.token_logprobs):
                assert abs(la - lb) < 1e-3, (round_, p)
        if round_ == 0:
            first = [a.text for a in ref]
    assert [a.text for a in ref] != first, "the perturbed checkpoint should answer differently"


@pytest.fixture(scope="session")
def tiny_one_process(tiny_bs_ckpt, tmp_path_factory) -> tuple[list, str]:
    """Greedy answers of the tiny checkpoint served by one process, and that server's log."""
    with VllmServer(tiny_bs_ckpt, log_path=tmp_path_factory.mktemp("one") / "one.log") as s:
        return greedy(s, PROMPTS[:3], 12, logprobs=1), s.log()


def greedy_in_two_processes(ckpt: Path, flag: str, log_path: Path, drop: tuple[str, ...] = ()) -> list:
    """The greedy answers of ``ckpt`` served by two CPU processes split by ``flag`` (a parallel
    size), without the one-process flags and those in ``drop``."""
    flags = [f for f in CPU_FLAGS if f not in ("--distributed-executor-backend", "uni", *drop)]
    with VllmServer(ckpt, args=flags, extra_args=[flag, "2"],
                    env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
                    log_path=log_path) as s:
        return greedy(s, PROMPTS[:3], 12, logprobs=1)


def assert_same_greedy(ref: list, got: list) -> None:
    for p, a, b in zip(PROMPTS[:3], ref, got):
        assert b.logprobs.tokens == a.logprobs.tokens, p
        for la, lb in zip(a.logprobs.token_logprobs, b.logprobs.token_logprobs):
            assert abs(la - lb) < 1e-3, p


def test_tensor_parallel_2_matches_tp_1(tiny_bs_ckpt, tiny_one_process, tmp_path):
    ref, log = tiny_one_process
    assert_held_once(log)
    assert_same_greedy(ref, greedy_in_two_processes(tiny_bs_ckpt, "--tensor-parallel-size", tmp_path / "tp2.log"))


def test_pipeline_parallel_2_matches_one_process(tiny_bs_ckpt, tiny_one_process, tmp_path):
    """Two pipeline stages, each holding the bases of its own layers' groups.

    In vLLM's compiled CPU mode: with ``--enforce-eager`` vLLM's CPU runner skips the warm-up
    that allocates the second stage's input buffer, and its first request fails
    (``assert self.intermediate_tensors is not None``), a dense model as well.
    """
    ref, _ = tiny_one_process
    got = greedy_in_two_processes(tiny_bs_ckpt, "--pipeline-parallel-size", tmp_path / "pp2.log",
                                  drop=("--enforce-eager",))
    assert_same_greedy(ref, got)


def test_format_1_checkpoint_serves_as_before(tiny_bs_ckpt, tiny_one_process, tmp_path):
    """A checkpoint of format 1 (no quantization_config in config.json) serves as the same one of format 2."""
    v1 = as_format_1(tiny_bs_ckpt, tmp_path / "v1")
    with VllmServer(v1, log_path=tmp_path / "v1.log") as s:
        got = greedy(s, PROMPTS[:3], 12, logprobs=1)
    assert_same_greedy(tiny_one_process[0], got)


def test_without_load_format_soco_vllm_stops_at_once_and_says_why(tiny_bs_ckpt, tmp_path):
    """Plain ``vllm serve DIR``: config.json's quantization_config makes vLLM accept the checkpoint,
    and the default loader is stopped while it builds the model, before it reads a weight."""
    server = VllmServer(tiny_bs_ckpt, load_format=None, log_path=tmp_path / "auto.log").launch()
    assert server.wait_exit() != 0
    log = server.log()
    assert f"serve it with `vllm serve {tiny_bs_ckpt} --load-format soco`" in log, log[-3000:]
    assert "Loading weights took" not in log


def _break(ckpt: Path, dst: Path, how: str) -> tuple[Path, str]:
    """A copy of ``ckpt`` broken one way; returns it and the error text the server must print."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(ckpt, dst)
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    reader = CheckpointReader(ckpt)
    lowrank = next(n for n, e in manifest["linears"].items() if e["kind"] == "lowrank")
    shard = dst / next(iter(json.loads((dst / INDEX_FILE).read_text())["weight_map"].values()))
    tensors = load_file(shard)
    if how == "dense-folder":
        return default_model_dir(), "not a soco checkpoint"
    if how == "version":
        manifest["format_version"] = FORMAT_VERSION + 1
        (dst / MANIFEST_FILE).write_text(json.dumps(manifest))
        return dst, f"unknown format_version {FORMAT_VERSION + 1}"
    if how == "basis":
        shared = next(n for n, e in manifest["linears"].items() if e["kind"] == "shared")
        manifest["linears"][shared]["basis"] = "no-such-basis"
        (dst / MANIFEST_FILE).write_text(json.dumps(manifest))
        return dst, "basis 'no-such-basis' does not exist"
    if how == "rank":
        manifest["linears"][lowrank]["rank"] += 1
        (dst / MANIFEST_FILE).write_text(json.dumps(manifest))
        return dst, f"'{lowrank}.lowrank_u' has shape"
    name = f"{lowrank}.lowrank_v"
    if how == "missing":
        del tensors[name]
        index = json.loads((dst / INDEX_FILE).read_text())
        del index["weight_map"][name]
        (dst / INDEX_FILE).write_text(json.dumps(index))
        expect = f"'{name}' required by soco_manifest.json is missing"
    elif how == "shape":
        tensors[name] = tensors[name][:-1].clone()
        expect = f"'{name}' has shape"
    elif how == "dtype":
        tensors[name] = tensors[name].to(torch.int32)
        expect = f"'{name}' has dtype torch.int32"
    elif how == "float-dtype":  # another float dtype than the manifest's: refused, not cast silently
        tensors[name] = tensors[name].to(torch.float16)
        expect = f"'{name}' has dtype torch.float16, but soco_manifest.json says the checkpoint is"
    save_file(tensors, shard, metadata={"format": "pt"})
    assert reader  # the original stays valid
    return dst, expect


@pytest.mark.parametrize("how", ["dense-folder", "version", "missing", "shape", "dtype", "float-dtype", "rank",
                                 "basis"])
def test_bad_checkpoints_fail_before_healthy(tiny_bs_ckpt, tmp_path, how):
    path, expect = _break(tiny_bs_ckpt, tmp_path / "broken", how)
    server = VllmServer(path, log_path=tmp_path / "bad.log").launch()
    assert server.wait_exit() != 0
    assert expect in server.log(), server.log()[-3000:]
