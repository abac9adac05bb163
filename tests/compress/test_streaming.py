"""The streaming compressor on tiny random Llamas: equal to a whole-model reference, resumable
after a kill at any stage (byte for byte), statistics bounded by one group, bad input refused."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compress import methods, pipeline, workdir
from compress.cli import main
from compress.data import calibration_windows, load_text, tokenize_stream
from soco_serve import layout
from soco_serve.layout import CheckpointReader
from tests.compress import reference

COMMON = ["--calib-windows", "4", "--seq-len", "64", "--no-progress", "--recover-steps", "0"]
SOCO = ["--soco-steps", "8", "--soco-seq-len", "32"]


def _compress(src, out, *args, text):
    argv = [str(src), "-o", str(out), *COMMON, "--calib-text", str(text), "--eval-text", str(text),
            "--eval-windows", "2", *args]
    assert main(argv) == 0
    return out


@pytest.mark.parametrize("method,args,refit", [
    ("svd", [], False), ("asvd", [], False), ("svd-llm", [], False),
    ("basis-sharing", ["--coefficient-update", "off"], False),
    ("basis-sharing", ["--group-size", "3"], True),  # groups of 3 and 1: the last group is smaller
])
def test_streaming_equals_the_whole_model_reference(tiny_llama_f64, text_file, tmp_path, method, args, refit):
    out = _compress(tiny_llama_f64, tmp_path / "ck", "--method", method, "--ratio", "0.4", *args, text=text_file)
    model, tok, spec, refs = reference.load(tiny_llama_f64)
    windows = calibration_windows(tokenize_stream(tok, load_text(str(text_file), "calibration")), 64, 4, seed=0)
    group = 3 if "3" in args else 2
    want = reference.compress(model, refs, spec, method, 0.4, windows, group_size=group, refit=refit)
    reader = CheckpointReader(out)
    for name, t in want.items():
        torch.testing.assert_close(reader.get(name), t, rtol=1e-9, atol=1e-9, msg=name)
    assert set(want) == {n for n in reader.names() if n.endswith((".lowrank_u", ".lowrank_v")) or
                         n.startswith("soco_bases.") or n.rpartition(".")[0] in reader.manifest.linears
                         and n.endswith(".weight")}
    report = json.loads((out / "report.json").read_text())
    assert len(report["seconds_per_group"]) == len(report["groups"]) == (2 if method == "basis-sharing" else 4)
    assert report["memory"]["peak_rss_bytes"] > 0 and report["memory"]["peak_rss_stage"] in report["seconds"]


def test_streamed_perplexities_equal_the_whole_models(tiny_llama, text_file, tmp_path):
    # fwsvd first: its layer-by-layer backward onloads the head too, which must leave the
    # skeleton (tied embeddings included) as it found it for the runs after it.
    from compress import evaluate
    from compress.data import text_eval_windows
    from soco_serve.hf import load_soco_model

    model, tok, _, _ = reference.load(tiny_llama)
    windows = text_eval_windows(tok, str(text_file), 64, 2)
    dense = evaluate.perplexity(model, windows, progress=False).ppl
    for method in ("fwsvd", "svd-llm", "fwsvd"):
        out = _compress(tiny_llama, tmp_path / method, "--method", method, "--ratio", "0.2", "--force", text=text_file)
        report = json.loads((out / "report.json").read_text())
        assert report["ppl_dense"] == pytest.approx(dense, rel=1e-5), method
        comp = evaluate.perplexity(load_soco_model(out), windows, progress=False).ppl
        assert report["ppl_compressed"] == pytest.approx(comp, rel=1e-5), method


def test_statistics_memory_is_one_group(tiny_llama, text_file, tmp_path):
    # hidden 256, intermediate 512: sites attn_in, attn_out, mlp_in (256) and mlp_out (512), float64
    per_layer = 8 * (3 * (256 * 256 + 256) + 512 * 512 + 512)
    shared = 8 * 2 * (256 * 256 + 256)  # basis-sharing's shared sites (attn_in, mlp_in) of one layer
    for name, peak, args in (("svd-llm", per_layer, []),
                             # the first layer's private sites are freed before the second's arrive
                             ("basis-sharing", shared + per_layer, []),
                             ("soco", per_layer, SOCO),
                             ("soco", 2 * per_layer, [*SOCO, "--group-size", "2"])):
        out = _compress(tiny_llama, tmp_path / f"{name}{peak}", "--method", name, "--ratio", "0.4", *args,
                        text=text_file)
        report = json.loads((out / "report.json").read_text())
        assert report["memory"]["peak_stat_bytes"] == peak  # not 4 layers' worth
        assert all(g["stat_bytes"] == 0 for g in report["memory"]["per_group"])  # freed after each group


def test_soco_onloaded_a_group_at_a_time_trains_exactly_like_held_in_memory(tiny_llama, text_file, tmp_path):
    args = ["--method", "soco", "--ratio", "0.4", *SOCO, "--group-size", "2"]
    held = _compress(tiny_llama, tmp_path / "held", *args, "--soco-offload", "off", text=text_file)
    onloaded = _compress(tiny_llama, tmp_path / "onloaded", *args, "--soco-offload", "on", text=text_file)
    assert _files(onloaded) == _files(held)
    logs = [json.loads((d / "report.json").read_text())["soco"] for d in (held, onloaded)]
    assert [log["held_in_memory"] for log in logs] == [True, False]
    assert logs[0]["history"] == logs[1]["history"]


def test_only_the_registry_names_a_method():
    names = "|".join(re.escape(n) for n in methods.REGISTRY)
    quoted = re.compile(rf"""["']({names})["']""")
    root = Path(methods.__file__).parent
    for f in root.glob("*.py"):
        if f.name in ("methods.py", "soco.py"):  # the registry, and soco's own module
            continue
        hits = quoted.findall(f.read_text())
        assert not hits, f"{f.name} names methods {hits}"


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing after it runs, no cleanup is special."""


@pytest.mark.parametrize("method,args", [("svd-llm", []), ("basis-sharing", ["--group-size", "2"])])
def test_a_groups_factors_are_freed_before_the_next_group(tiny_llama, text_file, tmp_path, monkeypatch, method, args):
    """Memory is one group's, not two: the factors of a group written to the work folder are
    gone when the next group starts (they used to live until the next group had been compressed)."""
    import weakref

    real, refs, alive = pipeline.compress_group, [], []

    def spy(*a, **k):
        alive.append(sum(r() is not None for r in refs))
        decs = real(*a, **k)
        refs.extend(weakref.ref(t) for d in decs for t in d.tensors.values())
        return decs

    monkeypatch.setattr(pipeline, "compress_group", spy)
    _compress(tiny_llama, tmp_path / "o", "--method", method, "--ratio", "0.4", *args, text=text_file)
    assert len(alive) >= 2 and refs and alive == [0] * len(alive)


def _files(ck):
    return {p.name: p.read_bytes() for p in sorted(ck.iterdir()) if p.suffix in (".safetensors", ".json")
            and p.name != "report.json"}


def _kill_at(monkeypatch, target, attr, after_calls):
    real = getattr(target, attr)
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(target, attr, wrapped)


def _kill_in_training(monkeypatch, after_losses):
    """Kill on the ``after_losses + 1``-th evaluation of a recovery loss, whichever the group's loss
    (the hidden state's or, at the last group, the head's KL)."""
    real = pipeline.recover.distill
    calls = {"n": 0}

    def distill(params, loss, *a, **k):
        def counted(b):
            calls["n"] += 1
            if calls["n"] > after_losses:
                raise Killed
            return loss(b)
        return real(params, counted, *a, **k)

    monkeypatch.setattr(pipeline.recover, "distill", distill)


STAGES = ["statistics", "decompose", "after-group", "evaluate", "write"]
RECOVER = ["--recover-steps", "6", "--calib-windows", "8", "--batch-size", "2"]


@pytest.mark.parametrize("method,args,stage", [
    *[(m, [], s) for m in ("basis-sharing", "fwsvd") for s in STAGES],
    *[(m, RECOVER, s) for m in ("svd-llm", "basis-sharing") for s in ("recover", "after-group")],
    *[("soco", [*SOCO, "--group-size", "2", "--soco-offload", "on"], s)
      for s in ("spectra", "train", "decompose", "after-group")],
])
def test_a_run_killed_at_any_stage_resumes_to_the_same_checkpoint(tiny_llama, text_file, tmp_path, monkeypatch,
                                                                  method, args, stage):
    args = ["--method", method, "--ratio", "0.4", *args]
    whole = _compress(tiny_llama, tmp_path / "whole", *args, text=text_file)
    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        if stage == "statistics":
            _kill_at(m, pipeline.calibrate, "attach_gram_hooks", 1 if method == "basis-sharing" else 0)
            if method == "fwsvd":  # fwsvd has no Gram hooks: kill its backward half-way
                _kill_at(m, pipeline.calibrate.torch.autograd, "grad", 3)
        elif stage == "decompose":
            _kill_at(m, methods.get(method), "decompose", 1)
        elif stage == "spectra":  # soco's whole-model stage, in the second group's spectra
            _kill_at(m, methods.soco, "build_blocks", 1)
        elif stage == "train":  # half-way through soco's training
            _kill_at(m, methods.soco.Stack, "kl_backward", 5)
        elif stage == "recover":  # half-way through the second group's training (basis-sharing's is the last: its KL)
            _kill_in_training(m, 14)
        elif stage == "after-group":
            _kill_at(m, workdir.WorkDir, "save_group", 1)
        elif stage == "evaluate":
            _kill_at(m, pipeline, "head_perplexities", 0)
        else:
            _kill_at(m, pipeline.CheckpointWriter, "finish", 0)
        with pytest.raises(Killed):
            _compress(tiny_llama, out, *args, text=text_file)
    assert not out.exists()  # nothing at the output path until the run is complete
    resumed = _compress(tiny_llama, out, *args, text=text_file)
    assert _files(resumed) == _files(whole)
    assert not workdir.work_dir_for(out).exists()
    report = json.loads((resumed / "report.json").read_text())
    assert report["ppl_compressed"] == json.loads((whole / "report.json").read_text())["ppl_compressed"]


def test_sigkill_then_rerun_continues_from_the_last_group(tiny_llama, text_file, tmp_path):
    args = ["--method", "svd-llm", "--ratio", "0.4"]
    whole = _compress(tiny_llama, tmp_path / "whole", *args, text=text_file)
    out = tmp_path / "killed"
    work = workdir.work_dir_for(out)
    argv = [sys.executable, "-m", "compress.cli", str(tiny_llama), "-o", str(out), *COMMON, "--calib-text",
            str(text_file), "--eval-text", str(text_file), "--eval-windows", "2", *args]
    # the killed run computes with this process's threads, so that its groups are bit for bit the
    # uninterrupted run's (a different thread count reorders float sums)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    while not (work / "state-00001.safetensors").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    resumed = _compress(tiny_llama, out, *args, text=text_file)
    assert json.loads((resumed / "report.json").read_text())["resumed_at_group"] >= 2
    assert _files(resumed) == _files(whole)


def test_a_resume_with_other_settings_or_another_model_is_refused(tiny_llama, text_file, tmp_path, monkeypatch,
                                                                  capsys):
    args = ["--method", "svd-llm", "--ratio", "0.4"]
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        _kill_at(m, workdir.WorkDir, "save_group", 2)
        with pytest.raises(Killed):
            _compress(tiny_llama, out, *args, text=text_file)
    argv = [str(tiny_llama), "-o", str(out), *COMMON, "--calib-text", str(text_file), "--eval-text", str(text_file),
            "--eval-windows", "2", "--method", "svd-llm"]
    assert main([*argv, "--ratio", "0.5"]) == 2
    assert "setting 'ratio': 0.4 there, 0.5 now" in capsys.readouterr().err
    changed = tmp_path / "changed"
    shutil.copytree(tiny_llama, changed)
    from safetensors.torch import load_file, save_file

    sd = load_file(changed / "model.safetensors")
    sd["model.norm.weight"] += 1
    save_file(sd, changed / "model.safetensors", metadata={"format": "pt"})
    argv[0] = str(changed)
    assert main([*argv, "--ratio", "0.4"]) == 2
    err = capsys.readouterr().err
    assert "an unfinished run of another model is there (weights sha256" in err and "--restart" in err
    assert main([*argv, "--ratio", "0.5", "--restart"]) == 0  # discarded on request
    assert CheckpointReader(out).manifest.target_ratio == 0.5


@pytest.mark.parametrize("where", ["work folder", "checkpoint"])
def test_disk_full_is_a_clear_error_and_the_run_resumes(tiny_llama, text_file, tmp_path, monkeypatch, capsys, where):
    args = ["--method", "svd-llm", "--ratio", "0.4"]
    whole = _compress(tiny_llama, tmp_path / "whole", *args, text=text_file)
    out = tmp_path / "full"
    with monkeypatch.context() as m:
        if where == "work folder":  # the 5th file written fills the disk
            m.setattr(workdir, "_atomic", _enospc_after(workdir._atomic, 5))
        else:  # the checkpoint's first shard does
            def full(self):
                raise OSError(errno.ENOSPC, "No space left on device")
            m.setattr(layout._ShardWriter, "close", full)
        assert main([str(tiny_llama), "-o", str(out), *COMMON, "--calib-text", str(text_file), "--eval-text",
                     str(text_file), "--eval-windows", "2", *args]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device writing" in err and "finished groups are kept" in err
    assert not out.exists() and not list(workdir.work_dir_for(out).glob("*.tmp"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".full.tmp-")]
    resumed = _compress(tiny_llama, out, *args, text=text_file)
    assert _files(resumed) == _files(whole)


def _enospc_after(real, n):
    calls = {"n": 0}

    def atomic(path, write):
        calls["n"] += 1
        if calls["n"] == n:
            def failing(tmp):
                write(tmp)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, failing)
        return real(path, write)

    return atomic


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("sharded") / "llama"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(path, max_shard_size="2MB")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_a_missing_or_corrupt_shard_is_named(sharded_llama, text_file, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    index = json.loads((sharded_llama / "model.safetensors.index.json").read_text())["weight_map"]
    target = "model.layers.2.mlp.down_proj.weight"
    shard = index[target]
    out = tmp_path / "o"
    argv = lambda src: [str(src), "-o", str(out), *COMMON, "--calib-text", str(text_file), "--no-eval",  # noqa: E731
                        "--method", "svd-llm"]
    gone = tmp_path / "gone"
    shutil.copytree(sharded_llama, gone)
    (gone / shard).unlink()
    assert main(argv(gone)) == 2
    assert f"{gone / shard}: shard listed in the index is missing" in capsys.readouterr().err
    nan = tmp_path / "nan"
    shutil.copytree(sharded_llama, nan)
    sd = load_file(nan / shard)
    sd[target][3, 3] = float("nan")
    save_file(sd, nan / shard, metadata={"format": "pt"})
    assert main(argv(nan)) == 2
    assert f"{nan / shard}: weight '{target}' contains NaN or Inf" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args", [RECOVER, ["--coefficient-update", "on"]])
def test_activations_on_disk_give_the_same_checkpoint(tiny_llama, text_file, tmp_path, monkeypatch, args):
    args = ["svd-llm" if args is RECOVER else "basis-sharing", "--ratio", "0.4", *args]
    in_memory = _compress(tiny_llama, tmp_path / "cpu", "--method", *args, "--activations", "cpu", text=text_file)
    kept = []
    real = pipeline.Spill.keep

    def keep(self, t):
        out = real(self, t)
        kept.append(out)
        assert not any(self.folder.iterdir())  # unlinked at once: the mapping is all that holds it
        return out

    monkeypatch.setattr(pipeline.Spill, "keep", keep)
    on_disk = _compress(tiny_llama, tmp_path / "disk", "--method", *args, "--activations", "disk", text=text_file)
    assert _files(on_disk) == _files(in_memory)
    ppl = [json.loads((d / "report.json").read_text())["ppl_compressed"] for d in (on_disk, in_memory)]
    assert ppl[0] == ppl[1]
    # Every hidden state a stream keeps: at capture, calib and eval; after each layer, calib, eval and
    # eval-0 (dense and compressed evaluation); after each group, the compressed stream (recovered
    # or refit). Calibration: 8 windows in 4 batches (recovery) or 4 in 1; evaluation: 1 batch.
    calib, groups = (4, 4) if args[0] == "svd-llm" else (1, 2)
    assert len(kept) == (calib + 1) + 4 * (calib + 2) + groups * calib
    assert not (tmp_path / ".disk.soco-activations").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_device_writes_the_cpu_checkpoint(tiny_llama_f64, text_file, tmp_path):
    # The same code path as every CPU test, with the group, statistics and activations on the GPU.
    args = ["--method", "basis-sharing", "--ratio", "0.4"]
    cpu = CheckpointReader(_compress(tiny_llama_f64, tmp_path / "cpu", *args, text=text_file))
    gpu_dir = _compress(tiny_llama_f64, tmp_path / "gpu", *args, "--device", "cuda", text=text_file)
    gpu = CheckpointReader(gpu_dir)
    assert set(cpu.names()) == set(gpu.names()) and gpu.manifest.linears == cpu.manifest.linears
    # Singular vectors are defined up to sign (LAPACK and cuSOLVER choose differently), so the
    # factors are compared through the matrix each layer computes; every other tensor directly.
    factors = set()
    for layer, entry in cpu.manifest.linears.items():
        if entry.kind == "dense":
            continue
        right = layout.v_name(layer) if entry.kind == "lowrank" else layout.basis_name(entry.basis)
        factors |= {layout.u_name(layer), right}
        weight = [r.get(layout.u_name(layer)) @ r.get(right) for r in (gpu, cpu)]
        torch.testing.assert_close(*weight, rtol=1e-6, atol=1e-8, msg=lambda m: f"{layer}: {m}")
    for name in set(cpu.names()) - factors:
        torch.testing.assert_close(gpu.get(name), cpu.get(name), rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")
    report = json.loads((gpu_dir / "report.json").read_text())
    assert report["device"] == "cuda" and report["memory"]["cuda_max_allocated_bytes"] > 0
