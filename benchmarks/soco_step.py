"""What soco's bounded training costs per step: the whole model's autograd step against the
layered step (:class:`compress.soco.Stack`), interleaved in one process so that the machine's
noise hits both alike.

    .venv/bin/python -m benchmarks.soco_step                 # the default model, 6 rounds

Three ways to take the same step (the same scores, window and teacher):

* ``whole``: the stack held in memory (:meth:`compress.soco.Stack.held`): one forward and one
  backward pass of the whole model with the scored linears swapped in (what ``soco-compress`` runs
  when the model and its factors fit in memory: ``--soco-offload auto`` or ``off``);
* ``layered``: the stack over the same in-memory model, not held: a forward pass without a graph,
  then each layer recomputed with gradients from the head down (the bounded step without the
  reads, to separate the cost of recomputing from the cost of reading);
* ``onloaded``: the stack with each layer's dense weights read from the safetensors shards and its
  factors from the work folder's files, one layer at a time (``--soco-offload on``, and ``auto``
  for models that do not fit).

Each round times one step of each, in rotating order; the result is the median seconds per step
and the ratios to ``whole``, written to ``benchmarks/results/soco_step_<name>.json`` with the
device. The gradients of the three are checked equal before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

from compress import calibrate, data, models, soco  # noqa: E402
from compress.pipeline import Onloader  # noqa: E402
from compress.source import Source  # noqa: E402
from benchmarks.measure import device_name  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256, help="training window length (soco's default)")
    p.add_argument("--calib-windows", type=int, default=8, help="windows for the whitening statistics")
    p.add_argument("--name", default="cpu")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    path = models.resolve_model(a.model)
    model, tok, _ = models.load_model(str(path))
    spec = models.arch_spec(model)
    refs = models.find_linears(model, spec)
    tokens = data.tokenize_stream(tok, data.load_text(None, "calibration"))
    windows = data.calibration_windows(tokens, a.seq_len, a.calib_windows, 0)
    grams = calibrate.GramSet()
    handles = calibrate.attach_gram_hooks(refs, grams)
    with torch.no_grad():
        for b in calibrate.batches(windows, 4):
            model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    blocks, _ = soco.build_blocks(refs, grams, progress=False)
    del grams
    resident = soco.Stack.resident(model, spec, blocks)
    window = windows[:1]
    teacher = soco.teacher_topk(resident, window, 128, progress=False)

    # The product's path: dense layers from the shards, factors from per-layer files.
    src = Source(path)
    tmp = Path(tempfile.mkdtemp(prefix="soco-step-"))
    files, disk = [], []
    for g in resident.groups:
        f = tmp / f"group-{g[0]}.safetensors"
        soco.save_blocks(f, [b for b in blocks if b.refs[0].layer in g], {})
        files.append(f)
        disk.append(soco.load_blocks(f, src.refs, torch.device("cpu"))[0])
    onloaded = soco.Stack(Onloader(src, torch.device("cpu")), src.model, src.spec, resident.groups, disk,
                          torch.device("cpu"), soco.FactorFiles(files, disk, torch.device("cpu")))

    def zero() -> None:
        for b in [*blocks, *onloaded.all_blocks]:
            b.scores.grad = None

    def whole() -> torch.Tensor:
        with resident.held() as held:
            held.kl_backward(window, teacher.logp, teacher.idx, soco.topk_kl)
        return torch.cat([b.scores.grad.flatten() for b in blocks])

    def layered() -> torch.Tensor:
        resident.kl_backward(window, teacher.logp, teacher.idx, soco.topk_kl)
        return torch.cat([b.scores.grad.flatten() for b in blocks])

    def onload() -> torch.Tensor:
        with onloaded.layers.outer():
            onloaded.kl_backward(window, teacher.logp, teacher.idx, soco.topk_kl)
        return torch.cat([b.scores.grad.flatten() for b in onloaded.all_blocks])

    ways = {"whole": whole, "layered": layered, "onloaded": onload}
    grads = {}
    for name, fn in ways.items():
        zero()
        grads[name] = fn()
    for name in ("layered", "onloaded"):
        err = float((grads[name] - grads["whole"]).abs().max() / grads["whole"].abs().max())
        if err > 1e-4:
            raise SystemExit(f"{name}: gradient differs from the whole model's by {err:.2e} (relative)")
    seconds: dict[str, list[float]] = {n: [] for n in ways}
    names = list(ways)
    for r in range(a.rounds):
        for name in names[r % 3:] + names[: r % 3]:
            zero()
            t0 = time.perf_counter()
            ways[name]()
            seconds[name].append(round(time.perf_counter() - t0, 3))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()), flush=True)
    med = {n: statistics.median(s) for n, s in seconds.items()}
    res = {
        "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "model": str(path),
        "seq_len": a.seq_len, "rounds": a.rounds, "seconds_per_step": seconds,
        "median_seconds": med, "ratio_to_whole": {n: round(m / med["whole"], 3) for n, m in med.items()},
        "gradient_max_rel_diff": {n: float((grads[n] - grads["whole"]).abs().max() / grads["whole"].abs().max())
                                  for n in ("layered", "onloaded")},
        "notes": "one soco training step (window of seq_len tokens, full-rank scored model); rounds interleave the "
                 "three ways in rotating order on the same machine state",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"soco_step_{a.name}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("median_seconds", "ratio_to_whole")}), f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
