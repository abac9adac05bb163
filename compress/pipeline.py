"""The compressor: load → statistics → method → write → evaluate, streamed group by group.

The model is never materialised whole (:mod:`compress.source`). The first decoder layer's inputs
are captured once for the calibration windows and the evaluation windows; then every group of
adjacent layers (one layer, or a method's group of shared bases) is onloaded, walked by each
activation stream, decomposed by the method, its tensors written to the work folder, and
offloaded. The streams are:

* ``calib``: the dense model's activations on the calibration windows; every method's
  statistics are collected from them (as in the papers);
* ``compressed``: the compressed model's activations on the same windows, for the stages that
  train or refit on what the compressed model really sees (Basis Sharing's coefficient update,
  :mod:`compress.recover`);
* ``eval`` and ``eval-K``: the evaluation windows through the dense and the compressed model
  (ratio ``K``), so that both perplexities come out of the same single pass.

After the last group the head turns the evaluation streams into perplexities, and the groups'
tensors are assembled into the checkpoint, which appears at the output path only when complete.
A killed run continues from its last finished group (:mod:`compress.workdir`).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from soco_serve.hf import lowrank_modules, swapped
from soco_serve.layout import CheckpointWriter, Manifest, quantization_config

from . import calibrate, data, evaluate, methods, models, recover
from .calibrate import LayerInput
from .config import DEFAULT_SHARED_KINDS, CompressConfig
from .factors import Decomposition
from .source import Source
from .workdir import WorkDir, disk_full_is_resumable

__all__ = ["CompressConfig", "DEFAULT_SHARED_KINDS", "run", "ratio_dir"]


class Timer:
    """Wall seconds per stage, and the stage in which the process reached its peak RSS: the report's
    peak alone does not say whether statistics, a group's training or the evaluation set it. Nested
    stages exit first, so the innermost stage gets the peak."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_bytes = 0
        self.peak_stage: str | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 2)
            if (peak := peak_rss_bytes()) > self.peak_bytes:
                self.peak_bytes, self.peak_stage = peak, name


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """This process's own peak: ``VmHWM`` starts afresh at exec, where ``ru_maxrss`` carries the peak
    of the process that spawned this one (Linux keeps it across execve), so a compressor started from
    a large process would report that process's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class Memory:
    """Peak memory over the run: process RSS, CUDA allocations, live Gram statistics."""

    stat_bytes: int = 0
    per_group: list[dict[str, int]] = field(default_factory=list)

    def note_stats(self) -> None:
        """Called while statistics are alive: keeps their peak."""
        self.stat_bytes = max(self.stat_bytes, calibrate.live_stat_bytes())

    def sample(self, device: torch.device) -> dict[str, int]:
        s = {"rss_bytes": rss_bytes(), "stat_bytes": calibrate.live_stat_bytes()}
        if device.type == "cuda":
            s["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        return s

    def report(self, device: torch.device) -> dict[str, int]:
        out = {"peak_rss_bytes": peak_rss_bytes(), "peak_stat_bytes": self.stat_bytes}
        if device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        return out


class Onloader(calibrate.LayerSource):
    """Layers and outer modules of a :class:`Source` onloaded for a ``with`` block."""

    def __init__(self, src: Source, device: torch.device):
        self.src, self.device = src, device

    @contextmanager
    def loaded(self, layers: list[int]) -> Iterator[list[torch.nn.Module]]:
        prefixes = [self.src.layer_prefix(i) for i in layers]
        try:
            yield [self.src.onload(p, self.device) for p in prefixes]
        finally:
            for p in prefixes:
                self.src.offload(p)

    @contextmanager
    def outer(self) -> Iterator[None]:
        prefixes = self.src.outer_prefixes()
        try:
            for p in prefixes:
                self.src.onload(p, self.device)
            yield
        finally:
            for p in prefixes:
                self.src.offload(p)


# ---------------------------------------------------------------------------------------------
# Streams: activations carried from group to group
# ---------------------------------------------------------------------------------------------


class Spill:
    """``--activations disk``: every hidden state is written to a file, memory-mapped back and the
    file unlinked at once. The tensor then lives in the page cache, backed by the (nameless) file:
    the kernel evicts and rereads it as memory requires, the disk holds only live tensors, and
    nothing is left behind when the process dies."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0
        folder.mkdir(parents=True, exist_ok=True)

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        path = self.folder / f"{self.count:08d}.pt"
        self.count += 1
        torch.save(t.detach().to("cpu").contiguous(), path)
        try:
            return torch.load(path, mmap=True, weights_only=True)
        finally:
            path.unlink()


@dataclass
class Stream:
    """One list of batches at the current layer boundary, the token ids they came from, and where
    the hidden states are kept between layers (``--activations``: ``store``, or spilled)."""

    ids: torch.Tensor
    batches: list[LayerInput]
    store: torch.device
    spill: Spill | None = None

    def keep(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.spill.keep(hidden) if self.spill else hidden.to(self.store)

    def on(self, device: torch.device) -> list[LayerInput]:
        return [LayerInput(b.hidden.to(device), b.kwargs) for b in self.batches]

    def put(self, batches: list[LayerInput]) -> None:
        self.batches = [LayerInput(self.keep(b.hidden), b.kwargs) for b in batches]

    def run(self, layer: torch.nn.Module, refs: list[models.LinearRef] | None = None,
            grams: calibrate.GramSet | None = None) -> None:
        """Advance every batch through ``layer``, adding ``refs``' input statistics into ``grams``
        (when given); one batch at a time, each output stored before the next batch runs."""
        self.batches = calibrate.layer_statistics(layer, refs or [], grams, self.batches, keep=self.keep)

    def fork(self) -> "Stream":
        """Another stream from the same point (batches are replaced, never changed in place, so the
        two share tensors until they part)."""
        return Stream(self.ids, list(self.batches), self.store, self.spill)

    def state(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.{i}": b.hidden for i, b in enumerate(self.batches)}

    def restore(self, name: str, state: dict[str, torch.Tensor]) -> None:
        self.batches = [LayerInput(self.keep(state[f"{name}.{i}"]), b.kwargs) for i, b in enumerate(self.batches)]


def capture(src: Source, spec: models.ArchSpec, windows: torch.Tensor, batch_size: int, store: torch.device,
            spill: Spill | None) -> Stream:
    """The first decoder layer's inputs for ``windows`` (the outer modules must be onloaded)."""
    batches = calibrate.layer_inputs(src.model, spec, windows, batch_size)
    stream = Stream(windows, [], store, spill)
    stream.put(batches)
    return stream


def write_side_files(src: Source, dest: Path, dtype: torch.dtype) -> None:
    """config.json (with the checkpoint's dtype, and soco's quantization config in place of any the
    source had: it is what makes transformers and vLLM look up soco's loaders), generation config,
    tokenizer."""
    config = type(src.config).from_dict(src.config.to_dict())
    config.dtype = dtype
    config.quantization_config = quantization_config()
    config.save_pretrained(dest)
    gen = src.path / "generation_config.json"
    if gen.is_file():
        (dest / gen.name).write_text(gen.read_text())
    src.tokenizer.save_pretrained(dest)


def out_dtype(cfg: CompressConfig, src: Source) -> torch.dtype:
    return src.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)


def ratio_dir(output: Path, ratio: float) -> Path:
    """Where a multi-ratio run writes the checkpoint of ``ratio``."""
    return output / f"ratio-{ratio:g}"


def calibration_windows(cfg: CompressConfig, tokenizer: Any) -> torch.Tensor:
    """The calibration text as ``[calib_windows, seq_len]`` token windows (seeded choice), with
    ``calib_chat_share`` of them cut from the chats of ``calib_chat`` where given, spread evenly."""
    prefix = data.window_prefix(tokenizer)
    tokens = data.tokenize_stream(tokenizer, data.load_text(cfg.calib_text, "calibration"))
    if cfg.calib_chat is None:
        return data.calibration_windows(tokens, cfg.seq_len, cfg.calib_windows, cfg.seed, prefix=prefix)
    n_chat = round(cfg.calib_chat_share * cfg.calib_windows)
    chats = data.tokenize_stream(tokenizer, data.load_chats(cfg.calib_chat, tokenizer))
    return data.interleave(
        data.calibration_windows(tokens, cfg.seq_len, cfg.calib_windows - n_chat, cfg.seed, prefix=prefix),
        data.calibration_windows(chats, cfg.seq_len, n_chat, cfg.seed, prefix=prefix, what=f"{cfg.calib_chat} (chats)"))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(cfg: CompressConfig) -> dict[str, Any]:
    """Compress, write ``cfg.output`` atomically, and return the report (also in report.json).

    Several ratios (soco only) write ``cfg.output/ratio-<r>`` for each, from one training run,
    and return ``{"checkpoints": {path: report}}``.
    """
    timer, memory = Timer(), Memory()
    method = cfg.method_impl
    if cfg.output.exists() and not cfg.force:
        raise FileExistsError(f"{cfg.output}: output folder exists; pass --force to replace it")
    device = torch.device(cfg.device)
    store = device if cfg.activations == "device" else torch.device("cpu")
    spill = None
    if cfg.activations == "disk":
        spill_dir = cfg.output.parent / f".{cfg.output.name}.soco-activations"
        shutil.rmtree(spill_dir, ignore_errors=True)  # a killed run's (its files are already unlinked)
        spill = Spill(spill_dir)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with timer.stage("load"):
        src = Source(cfg.model)
        spec, model, dtype = src.spec, src.model, out_dtype(cfg, src)
        onload = Onloader(src, device)
        n_ratios = len(cfg.ratio_list)
        size = method.group_size(cfg, src.n_layers)
        if not 1 <= size <= src.n_layers:
            raise ValueError(f"--group-size must be between 1 and the model's {src.n_layers} layers, got {size}")
        groups = [range(a, min(a + size, src.n_layers)) for a in range(0, src.n_layers, size)]

    streams: dict[str, Stream] = {}
    calib = None
    with timer.stage("capture"), onload.outer():
        on_compressed = method.refits(cfg) or cfg.recover.steps > 0  # stages that read the compressed activations
        if method.needs_grams or method.whole_model_stage or on_compressed:
            calib = calibration_windows(cfg, src.tokenizer)
            streams["calib"] = capture(src, spec, calib, cfg.batch_size, store, spill)
            if on_compressed:
                streams["compressed"] = streams["calib"].fork()
        if cfg.evaluate:
            windows = data.text_eval_windows(src.tokenizer, cfg.eval_text, cfg.seq_len, cfg.eval_windows)
            streams["eval"] = capture(src, spec, windows, evaluate.BATCH_SIZE, store, spill)
            for k in range(n_ratios):
                streams[f"eval-{k}"] = streams["eval"].fork()
    with timer.stage("hash"):
        sha = src.weights_sha256()
    work = WorkDir(cfg.output, cfg.run_settings(), sha, restart=cfg.restart)
    done = work.finished_groups(n_ratios)
    prepared = None
    if method.whole_model_stage and done < len(groups):
        assert calib is not None
        with timer.stage("whole_model"):
            prepared = method.prepare(methods.ModelWork(
                cfg, onload, model, spec, src.refs, groups, calib, data.window_prefix(src.tokenizer),
                streams["calib"].on(device), device, src.dtype,
                work.stats_path, work.scratch, memory.note_stats, cfg.progress))
    if done:
        state = work.load_state(done - 1)
        for name, s in streams.items():
            s.restore(name, state)

    group_seconds: list[float] = []
    bar = tqdm(total=len(groups), initial=done, desc=f"compress ({cfg.method})", unit="group",
               disable=not cfg.progress)
    for g in range(done, len(groups)):
        t0 = time.perf_counter()
        decs = compress_group(cfg, method, src, onload, groups[g], streams, prepared, dtype, timer, memory,
                              kl_tail(cfg, groups, g))
        with timer.stage("write_groups"):
            state = {k: v for name, s in streams.items() for k, v in s.state(name).items()}
            work.save_group(g, decs, state)
            # on disk now; freed here, not when the names are rebound after the next group has run
            del decs, state
        memory.per_group.append(memory.sample(device))
        group_seconds.append(round(time.perf_counter() - t0, 2))
        bar.update(1)
    bar.close()

    with timer.stage("evaluate"):
        ppl = head_perplexities(onload, src, streams) if cfg.evaluate else {}
    reports = {}
    for k, ratio in enumerate(cfg.ratio_list):
        out = cfg.output if n_ratios == 1 else ratio_dir(cfg.output, ratio)
        reports[str(out)] = assemble(cfg, src, work, len(groups), k, ratio, out, dtype, sha, timer,
                                     extra={"ppl": ppl, "k": k, "group_seconds": group_seconds,
                                            "groups": [list(r) for r in groups], "resumed_at_group": done,
                                            "memory": memory, "device": device})
    work.remove()
    if spill is not None:
        shutil.rmtree(spill.folder, ignore_errors=True)
    return reports[str(cfg.output)] if n_ratios == 1 else {"checkpoints": reports}


def kl_tail(cfg: CompressConfig, groups: list[range], g: int) -> list[int] | None:
    """The layers after group ``g`` that its recovery's KL runs through (``[]`` for the last group),
    or None where the group is trained on its hidden state."""
    if not cfg.recover.steps or cfg.recover.last_loss != "kl" or g < len(groups) - cfg.recover.kl_groups:
        return None
    return [i for r in groups[g + 1:] for i in r]


@contextmanager
def kl_rest(onload: Onloader, tail: list[int] | None) -> Iterator[list[torch.nn.Module] | None]:
    """The dense ``tail`` layers with the outer modules (head, final norm), onloaded for a group's KL."""
    if tail is None:
        yield None
        return
    with onload.outer(), onload.loaded(tail) as rest:
        yield rest


def compress_group(cfg: CompressConfig, method: methods.Method, src: Source, onload: Onloader, layers: range,
                   streams: dict[str, Stream], prepared: Any, dtype: torch.dtype, timer: Timer,
                   memory: Memory, tail: list[int] | None = None) -> list[Decomposition]:
    """One group: dense statistics and dense streams, the method, the refit and compressed streams.
    ``tail``: the layers its recovery's KL runs through (:func:`kl_tail`)."""
    model, spec = src.model, src.spec
    with onload.loaded(list(layers)) as mods:
        refs = [r for r in models.find_linears(model, spec) if r.layer in layers]
        grams = calibrate.GramSet() if method.needs_grams else None
        work = methods.GroupWork(layers, refs, grams, prepared, cfg, dtype, src.dtype, model, spec)
        for i, layer in zip(layers, mods):
            with timer.stage("statistics"):
                if "calib" in streams:
                    streams["calib"].run(layer, [r for r in refs if r.layer == i], grams)
                if "eval" in streams:
                    streams["eval"].run(layer)
                if grams is not None:
                    grams.check()
                memory.note_stats()
            if grams is not None:
                with timer.stage("decompose"):
                    method.early(work, i)
        with timer.stage("decompose"):
            decs = method.decompose(work)
        if "compressed" in streams:
            inputs = streams["compressed"].on(onload.device)
            outputs = inputs
            if method.refits(cfg):
                with timer.stage("refit"):
                    outputs = method.refine(work, decs[0], inputs)
            if cfg.recover.steps:
                with timer.stage("recover"), kl_rest(onload, tail) as rest:
                    targets = [b.hidden for b in streams["calib"].batches]
                    head: recover.KLHead | None = None
                    if rest is not None:
                        ids = torch.split(streams["calib"].ids, cfg.batch_size)
                        at = slice(cfg.recover.kl_stride - 1, None, cfg.recover.kl_stride)

                        def through(b: int, h: torch.Tensor) -> torch.Tensor:
                            x = LayerInput(h, inputs[b].kwargs)
                            for layer in rest:
                                x = calibrate.forward_layer(layer, x)
                            return x.hidden[:, at]

                        def logits(b: int, positions: slice, h: torch.Tensor) -> torch.Tensor:
                            return calibrate.head_logits(model, spec, ids[b][:, at][:, positions], h)

                        head = recover.KLHead(through, logits, model.get_output_embeddings().weight.shape[0])
                    rcfg = cfg.recover if head is None or cfg.recover.kl_steps is None else replace(
                        cfg.recover, steps=cfg.recover.kl_steps)
                    log, outputs = recover.recover_group(model, mods, decs[0], src.dtype, inputs, targets,
                                                         rcfg, seed=cfg.seed + layers[0], head=head)
                    decs[0].recovery[str(layers[0])] = log.as_dict()
            streams["compressed"].put(outputs)
        del grams, work
        with timer.stage("evaluate"):
            for k, dec in enumerate(decs):
                if f"eval-{k}" not in streams:
                    continue
                compressed = lowrank_modules(dec.linears, dec.bases, dec.tensors.__getitem__, src.dtype)
                with swapped(model, compressed):
                    for layer in mods:
                        streams[f"eval-{k}"].run(layer)
        for dec in decs:  # the layers' other tensors (norms) ride along with the group
            linear_names = set(dec.linears)
            for i in layers:
                for name in src.layer_tensor_names(i):
                    if name.rpartition(".")[0] not in linear_names:
                        t = src.read(name)
                        dec.tensors[name] = t.to(dtype) if t.is_floating_point() else t
    return decs


def head_perplexities(onload: Onloader, src: Source, streams: dict[str, Stream]) -> dict[str, evaluate.Perplexity]:
    """Perplexity of every evaluation stream from its last layer's output, the head's logits a
    slice of positions at a time (:func:`calibrate.positions_per_slice`): with a large vocabulary
    the logits of whole windows would be the compressor's largest buffer."""
    out = {}
    vocab = src.model.get_output_embeddings().weight.shape[0]
    with onload.outer():
        for name, s in streams.items():
            if name.startswith("eval"):
                acc = evaluate.NllSum()
                for ids, b in zip(torch.split(s.ids, evaluate.BATCH_SIZE), s.on(onload.device)):
                    n, size = ids.shape[1] - 1, calibrate.positions_per_slice(ids.shape[0], vocab)
                    for at in calibrate.position_slices(n, size):
                        with torch.no_grad():
                            logits = calibrate.head_logits(src.model, src.spec, ids[:, at], b.hidden[:, at])
                        acc.add_targets(logits, ids[:, at.start + 1: at.stop + 1])
                out[name] = acc.result(s.ids.shape[0])
    return out


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def assemble(cfg: CompressConfig, src: Source, work: WorkDir, n_groups: int, k: int, ratio: float, out: Path,
             dtype: torch.dtype, sha: str, timer: Timer, extra: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of ratio ``k`` from the finished groups, written atomically, with its report."""
    dec = Decomposition()
    with (timer.stage("write"), disk_full_is_resumable(out),
          CheckpointWriter(out, force=cfg.force, max_shard_bytes=cfg.max_shard_bytes) as writer):
        for name in src.outer_tensor_names():
            if src.is_alias(name):
                continue
            t = src.read(name)
            writer.add(name, t.to(dtype) if t.is_floating_point() else t)
        for g in range(n_groups):
            part = work.load_group(g, k)
            for name, t in part.tensors.items():
                writer.add(name, t)
            part.tensors = {}
            dec.update(part)
        order = [r.name for r in src.refs]
        dec.linears = {n: dec.linears[n] for n in order}
        manifest = make_manifest(cfg, src, dec, dtype, sha, None if cfg.full_rank else ratio)
        write_side_files(src, writer.path, dtype)
        writer.finish(manifest)
        report = summary(manifest, src, dec)
        ppl = extra["ppl"]
        if ppl:
            comp = ppl[f"eval-{k}"]
            report.update(ppl_dense=ppl["eval"].ppl, ppl_compressed=comp.ppl, eval_tokens=comp.tokens,
                          eval_text=cfg.eval_text or "default (gensim Wikipedia sample, evaluation split)")
        device = extra["device"]
        report["seconds"] = {**timer.seconds, "total": round(sum(timer.seconds.values()), 2)}
        report["seconds_per_group"] = extra["group_seconds"]
        report["groups"] = extra["groups"]
        report["resumed_at_group"] = extra["resumed_at_group"]
        report["memory"] = {**extra["memory"].report(device), "peak_rss_stage": timer.peak_stage,
                            "per_group": extra["memory"].per_group}
        report["device"] = str(device)
        (writer.path / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        try:
            from .report import plot_ranks

            plot_ranks(report["ranks"], f"{cfg.method}, ratio {manifest.achieved_ratio:.3f}", writer.path / "ranks.png")
        except ImportError:  # matplotlib is optional
            pass
        writer.commit()
    return report


def make_manifest(cfg: CompressConfig, src: Source, dec: Decomposition, dtype: torch.dtype, sha: str,
                  target_ratio: float | None) -> Manifest:
    manifest = Manifest(
        architecture=models.architecture_of(src.model), dtype=str(dtype).removeprefix("torch."),
        linears=dec.linears, bases=dec.bases, method=cfg.method, settings=cfg.settings(),
        source_model=str(src.path), source_sha256=sha, target_ratio=target_ratio,
    )
    dense_params = src.dense_params()
    dense_linear, stored_linear = manifest.dense_linear_params(), manifest.stored_linear_params()
    manifest.achieved_ratio = round(1 - stored_linear / dense_linear, 6)
    manifest.model_ratio = round(1 - (dense_params - dense_linear + stored_linear) / dense_params, 6)
    return manifest


def summary(manifest: Manifest, src: Source, dec: Decomposition) -> dict[str, Any]:
    """The report fields that describe the checkpoint itself."""
    dense_params = src.dense_params()
    dense_linear, stored_linear = manifest.dense_linear_params(), manifest.stored_linear_params()
    extra = {manifest.method: dec.log} if dec.log else {}  # the method's own log, under its name
    return {
        "method": manifest.method,
        "target_ratio": manifest.target_ratio,
        "achieved_ratio": manifest.achieved_ratio,
        "model_ratio": manifest.model_ratio,
        "linear_params": {"dense": dense_linear, "stored": stored_linear},
        "model_params": {"dense": dense_params, "stored": dense_params - dense_linear + stored_linear},
        "ranks": ranks_table(manifest, src.refs),
        "whitening_damping": dec.damping,
        "settings": manifest.settings,
        "source_model": str(src.path),
        **({"recovery": recovery_summary(dec.recovery)} if dec.recovery else {}),
        **extra,
    }


def recovery_summary(per_group: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The recovery stage over all groups: totals, the mean held-out loss before and after (relative
    error over the groups trained on hidden states; ``kl_*`` over those trained on the next-token
    distribution, if any), and each group's log (keyed by its first layer)."""
    logs = list(per_group.values())
    out: dict[str, Any] = {"steps": sum(g["steps"] for g in logs), "seconds": round(sum(g["seconds"] for g in logs), 2)}
    for loss, prefix in (("hidden", "val"), ("kl", "kl")):
        part = [g for g in logs if g.get("loss", "hidden") == loss]
        if part:
            out[f"{prefix}_before"] = sum(g["val_before"] for g in part) / len(part)
            out[f"{prefix}_after"] = sum(g["val_after"] for g in part) / len(part)
    out.update(stopped={r: sum(g["stopped"] == r for g in logs) for r in sorted({g["stopped"] for g in logs})},
               improved=sum(g["best_step"] > 0 for g in logs),  # groups whose kept state is not the truncation's
               per_group=per_group)
    return out


def ranks_table(manifest: Manifest, refs: list[models.LinearRef]) -> dict[str, dict[str, int | str]]:
    """``{layer index: {matrix kind: rank, or "dense"}}``."""
    table: dict[str, dict[str, int | str]] = {}
    for r in refs:
        e = manifest.linears[r.name]
        table.setdefault(str(r.layer), {})[r.spec.kind] = "dense" if e.kind == "dense" else int(e.rank)  # type: ignore[arg-type]
    return table
