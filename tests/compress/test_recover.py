"""Recovery's training loop on problems with a known answer, and its guards."""

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from compress.recover import (RecoverConfig, RecoveryError, distill, lr_factor, relative_error, sliced_kl,
                              sliced_topk_logp, split_holdout, step_sizes)
from compress.soco import topk_kl, topk_logp


def _regression(n_batches=8, rows=32, n_in=6, n_out=5, seed=0):
    """Batches of a linear map ``t = x W*ᵀ`` and a parameter started away from ``W*``."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    xs = [torch.randn(rows, n_in, generator=g, dtype=torch.float64) for _ in range(n_batches)]
    w = nn.Parameter(w_star + 0.5 * torch.randn(n_out, n_in, generator=g, dtype=torch.float64), requires_grad=False)
    return w, w_star, xs


def test_relative_error_against_float64_reference():
    g = torch.Generator().manual_seed(1)
    y, t = torch.randn(2, 3, 7, generator=g, dtype=torch.float64), torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    ref = sum(((y[i, j] - t[i, j]).norm() ** 2 / t[i, j].norm() ** 2).item() for i in range(2) for j in range(3)) / 6
    assert relative_error(y, t).item() == pytest.approx(ref, rel=1e-12)
    assert relative_error(t, t).item() == 0.0


@pytest.mark.parametrize("n", [2, 3, 8, 16, 64])
def test_holdout_is_disjoint_and_leaves_something_to_train(n):
    train, val = split_holdout(n, 0.125)
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(n))
    assert len(val) == min(max(1, math.ceil(0.125 * n)), n - 1) and train


def test_holdout_needs_two_batches():
    with pytest.raises(RecoveryError, match="at least 2 calibration batches"):
        split_holdout(1, 0.125)


def test_distill_fits_a_linear_map_and_never_trains_on_held_out_batches():
    w, w_star, xs = _regression()
    trained_on = set()

    def forward(b):
        if torch.is_grad_enabled():
            trained_on.add(b)
        return xs[b] @ w.T

    err0 = (w - w_star).norm().item()
    log = distill([w], lambda b: relative_error(forward(b), xs[b] @ w_star.T), len(xs),
                  RecoverConfig(steps=300, lr=2e-2, check_every=10, patience=30))
    _, val = split_holdout(len(xs), 0.125)
    assert trained_on and trained_on.isdisjoint(val)
    assert log.val_after < 1e-3 * log.val_before and log.best_step > 0
    assert (w - w_star).norm().item() < 0.05 * err0
    assert not w.requires_grad


def test_distill_keeps_an_exact_start_unchanged():
    w, w_star, xs = _regression()
    with torch.no_grad():
        w.copy_(w_star)
    log = distill([w], lambda b: relative_error(xs[b] @ w.T, xs[b] @ w_star.T), len(xs), RecoverConfig(steps=20, lr=1e-3))
    assert log.val_before == 0.0 and log.best_step == 0
    assert torch.equal(w.detach(), w_star)


def test_nonfinite_loss_stops_and_keeps_the_last_good_state():
    w, w_star, xs = _regression()
    calls = {"n": 0}

    def forward(b):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 25:
                return xs[b] @ w.T * float("nan")
        return xs[b] @ w.T

    log = distill([w], lambda b: relative_error(forward(b), xs[b] @ w_star.T), len(xs),
                  RecoverConfig(steps=100, lr=1e-2, check_every=10, patience=100))
    assert log.stopped == "nonfinite" and log.steps == 24 and log.best_step == 20
    assert torch.isfinite(w.detach()).all()
    # The kept state is the one validated at step 20: the same held-out loss.
    _, val = split_holdout(len(xs), 0.125)
    v = sum(relative_error(xs[b] @ w.detach().T, xs[b] @ w_star.T) for b in val) / len(val)
    assert v.item() == pytest.approx(log.val_after, rel=1e-12)


def test_diverging_loss_stops_and_restores_the_start():
    w, w_star, xs = _regression()
    start = w.detach().clone()
    log = distill([w], lambda b: relative_error(xs[b] @ w.T, xs[b] @ w_star.T), len(xs),
                  RecoverConfig(steps=50, lr=50.0, check_every=1, patience=100))
    assert log.stopped == "diverged" and log.best_step == 0
    assert torch.equal(w.detach(), start)
    assert log.val_after == log.val_before


def test_step_sizes_are_relative_to_each_tensors_rms():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g, dtype=torch.float64), 1e-3 * torch.randn(3, generator=g)
    got = step_sizes([a, b, torch.zeros(4), torch.empty(0, 3)], 0.01, "rms")
    want = [0.01 * math.sqrt(sum(x * x for x in t.flatten().tolist()) / t.numel()) for t in (a, b)]
    assert got[:2] == pytest.approx(want, rel=1e-12) and got[2] == 0.0 and got[3] == 0.01
    assert step_sizes([a, b], 0.01, "none") == [0.01, 0.01]


def test_lr_factor_ramps_then_decays():
    steps = 12
    plain = [0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)]
    assert [lr_factor(s, steps, 0) for s in range(steps)] == pytest.approx(plain, abs=1e-15)
    got = [lr_factor(s, steps, 3) for s in range(steps)]
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-15)  # the ramp, then the cosine's start
    assert all(a > b for a, b in zip(got[3:], got[4:])) and 0 < got[-1] < 0.05


def test_warmup_shrinks_the_first_steps():
    """Adam's first update is the rate times the gradient's sign, whatever its size: with a warm-up
    of 3 the first step moves every weight a quarter as far."""
    def first_step(warmup):
        w, w_star, xs = _regression()
        start = w.detach().clone()
        distill([w], lambda b: relative_error(xs[b] @ w.T, xs[b] @ w_star.T), len(xs),
                RecoverConfig(steps=1, lr=1e-2, lr_scale="none", warmup=warmup))
        return (w.detach() - start).abs()

    plain, ramped = first_step(0), first_step(3)
    assert plain.min() > 0  # the step was kept (it lowered the held-out loss)
    torch.testing.assert_close(ramped, plain / 4, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("scale", [30.0, 1e3])
def test_relative_rates_train_any_scale_alike(scale):
    """The same regression with weights (and targets) ``scale`` times larger: relative rates take
    the same path, so the relative error ends where it does at scale 1; one absolute rate does not.
    (Larger, not smaller: the gradient clipping's absolute norm would bind on small weights.)"""
    def train(c, lr_scale):
        w, w_star, xs = _regression()
        w = nn.Parameter(c * w.detach(), requires_grad=False)
        log = distill([w], lambda b: relative_error(xs[b] @ w.T, c * xs[b] @ w_star.T), len(xs),
                      RecoverConfig(steps=40, lr=2e-2, lr_scale=lr_scale, check_every=10, patience=30))
        return log.val_after, ((w.detach() - c * w_star).norm() / (c * w_star).norm()).item()

    base = train(1.0, "rms")
    assert train(scale, "rms") == pytest.approx(base, rel=0.05)
    assert train(1.0, "none")[0] < 2 * base[0]  # at scale 1 the two are alike ...
    assert train(scale, "none")[0] > 3 * base[0]  # ... at another scale one absolute rate is far off


def test_config_is_checked():
    for bad in (RecoverConfig(steps=-1), RecoverConfig(lr=0), RecoverConfig(holdout=1.0), RecoverConfig(lr_scale="x"),
                RecoverConfig(last_loss="x"), RecoverConfig(topk=0), RecoverConfig(warmup=-1),
                RecoverConfig(kl_groups=0), RecoverConfig(kl_steps=0)):
        with pytest.raises(ValueError, match="recover"):
            bad.check()


# ---------------------------------------------------------------------------------------------
# In the compressor, on tiny random Llamas
# ---------------------------------------------------------------------------------------------

TINY = ["--calib-windows", "16", "--seq-len", "64", "--no-progress", "--recover-steps", "0"]


def _run(src, out, text, *args):
    from compress.cli import main

    assert main([str(src), "-o", str(out), *TINY, "--calib-text", str(text), "--eval-text", str(text),
                 "--eval-windows", "4", *args]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("method", ["svd-llm", "basis-sharing"])
def test_recovery_lowers_the_held_out_loss_and_keeps_the_layout(tiny_llama, text_file, tmp_path, method):
    from soco_serve.layout import CheckpointReader

    plain = _run(tiny_llama, tmp_path / "plain", text_file, "--method", method, "--ratio", "0.4")
    rec = _run(tiny_llama, tmp_path / "rec", text_file, "--method", method, "--ratio", "0.4",
               "--recover-steps", "30", "--recover-lr", "5e-3")
    groups = rec["recovery"]["per_group"]
    assert sorted(groups, key=int) == [str(g[0]) for g in rec["groups"]]
    assert all(g["val_after"] <= g["val_before"] for g in groups.values())
    assert sum(g["best_step"] > 0 for g in groups.values()) >= len(groups) // 2
    assert rec["recovery"]["val_after"] < rec["recovery"]["val_before"]
    assert rec["recovery"]["improved"] == sum(g["best_step"] > 0 for g in groups.values())
    assert rec["settings"]["recover"]["steps"] == 30 and rec["ranks"] == plain["ranks"]
    a, b = CheckpointReader(tmp_path / "plain"), CheckpointReader(tmp_path / "rec")
    assert a.manifest.linears == b.manifest.linears and a.manifest.bases == b.manifest.bases
    assert sorted(a.names()) == sorted(b.names())
    changed = 0
    for name in a.names():
        ta, tb = a.get(name), b.get(name)
        assert ta.shape == tb.shape and ta.dtype == tb.dtype, name
        changed += not torch.equal(ta, tb)
    assert changed > 0


def test_last_group_trained_on_the_next_token_distribution(tiny_llama, text_file, tmp_path):
    """With --recover-last-loss kl (the default) the last group's loss is the top-k KL from the dense
    model's next-token distribution and training lowers it; every other group keeps the hidden-state
    loss, so it trains exactly as with --recover-last-loss hidden."""
    from compress import soco
    from compress.config import CompressConfig
    from compress.models import load_model
    from compress.pipeline import calibration_windows
    from soco_serve.hf import load_soco_model

    args = ["--method", "svd-llm", "--ratio", "0.4", "--recover-steps", "20", "--recover-lr", "5e-3"]
    hid = _run(tiny_llama, tmp_path / "hidden", text_file, *args, "--recover-last-loss", "hidden")
    kl = _run(tiny_llama, tmp_path / "kl", text_file, *args)
    assert kl["settings"]["recover"]["last_loss"] == "kl" and hid["ranks"] == kl["ranks"]
    last = str(kl["groups"][-1][0])
    for g, log in kl["recovery"]["per_group"].items():
        if g != last:
            assert log == {**hid["recovery"]["per_group"][g], "seconds": log["seconds"]}, g
    log = kl["recovery"]["per_group"][last]
    assert log["loss"] == "kl" and hid["recovery"]["per_group"][last]["loss"] == "hidden"
    assert log["train_last"] < log["train_first"] and log["val_after"] <= log["val_before"]
    assert (kl["recovery"]["kl_before"], kl["recovery"]["kl_after"]) == (log["val_before"], log["val_after"])
    assert "kl_before" not in hid["recovery"]

    # the kept state's held-out loss is the written model's KL from the dense model on the held-out batch
    cfg = CompressConfig(output=tmp_path / "x", calib_text=str(text_file), calib_windows=16, seq_len=64)
    dense, tok, _ = load_model(str(tiny_llama))
    ids = calibration_windows(cfg, tok)[-cfg.batch_size:]  # 4 batches of 4 windows; the last is held out
    with torch.no_grad():
        t_logp, t_idx = soco.topk_logp(dense(input_ids=ids).logits, RecoverConfig.topk)
        got = soco.topk_kl(load_soco_model(tmp_path / "kl")(input_ids=ids).logits, t_logp, t_idx)
    assert float(got) == pytest.approx(log["val_after"], rel=1e-4)


def _head_problem(b=2, n=10, d=8, vocab=50, k=6):
    """A position-wise head (RMS norm, then a matrix) and a teacher from other hidden states."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64)

    def logits(positions, x):
        return (x * x.pow(2).mean(-1, keepdim=True).rsqrt()) @ w.T

    h = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    t_logp, t_idx = topk_logp(logits(slice(None), h + 0.3 * torch.randn(b, n, d, generator=g, dtype=torch.float64)), k)
    return logits, h, t_logp, t_idx


@pytest.mark.parametrize("size", [1, 3, 4, 10, 64])
def test_sliced_kl_equals_the_one_piece_kl_and_its_gradient(size):
    logits, h, t_logp, t_idx = _head_problem()
    whole = h.clone().requires_grad_(True)
    want = topk_kl(logits(slice(None), whole), t_logp, t_idx)
    want.backward()
    part = h.clone().requires_grad_(True)
    got = sliced_kl(logits, part, t_logp, t_idx, size)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(part.grad, whole.grad, rtol=1e-10, atol=1e-14)
    got_logp, got_idx = sliced_topk_logp(logits, h, 6, size)
    want_logp, want_idx = topk_logp(logits(slice(None), h), 6)
    assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(got_logp, want_logp, rtol=0, atol=1e-12)


def test_sliced_kl_keeps_one_slice_of_logits_at_a_time():
    """What the forward pass keeps for the backward pass: no tensor wider than one slice's logits
    (the sliced form recomputes them), where the one-piece form keeps every position's."""
    logits, h, t_logp, t_idx = _head_problem(n=12, vocab=500)

    def largest_kept(size):
        kept = [0]

        def pack(t):
            kept[0] = max(kept[0], t.numel())
            return t

        h_ = h.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = sliced_kl(logits, h_, t_logp, t_idx, size)
        loss.backward()
        return kept[0]

    b, n, vocab = 2, 12, 500
    assert largest_kept(n) >= b * n * vocab
    assert largest_kept(3) <= b * 3 * vocab


def test_sliced_kl_in_the_pipeline_trains_as_the_one_piece_kl(tiny_llama_f64, text_file, tmp_path, monkeypatch):
    """The last group's KL with its positions in slices (the head's logits recomputed one slice at
    a time) gives the same factors as in one piece, up to round-off."""
    from compress import calibrate, recover
    from soco_serve.layout import CheckpointReader

    args = ["--method", "svd-llm", "--ratio", "0.4", "--recover-steps", "6", "--recover-lr", "5e-3"]
    one = _run(tiny_llama_f64, tmp_path / "one", text_file, *args)
    vocab = json.loads((tiny_llama_f64 / "config.json").read_text())["vocab_size"]
    monkeypatch.setattr(calibrate, "LOGITS_SLICE_BYTES", 4 * 4 * vocab * 5)  # 5 positions of a batch of 4 windows
    slices = []

    def counted(fn, x, **kw):
        slices.append(x.shape[1])
        return checkpoint(fn, x, **kw)

    monkeypatch.setattr(recover, "checkpoint", counted)
    sliced = _run(tiny_llama_f64, tmp_path / "sliced", text_file, *args)
    assert slices and max(slices) == 5
    last = str(one["groups"][-1][0])
    assert one["recovery"]["per_group"][last]["loss"] == "kl"
    assert sliced["recovery"]["per_group"][last]["val_after"] == pytest.approx(
        one["recovery"]["per_group"][last]["val_after"], rel=1e-9)
    a, b = CheckpointReader(tmp_path / "one"), CheckpointReader(tmp_path / "sliced")
    for name in a.names():
        torch.testing.assert_close(b.get(name), a.get(name), rtol=1e-9, atol=1e-12)


def test_last_groups_trained_on_the_kl_through_the_dense_layers_after_them(tiny_llama, text_file, tmp_path):
    """With --recover-kl-groups 3 the last three of four groups are trained on the KL, each through
    the dense layers after it, for their own --recover-kl-steps: the kept state's held-out loss is
    the KL of the written model with the layers after that group put back dense. The first group
    keeps the hidden-state loss and --recover-steps."""
    from compress import soco
    from compress.config import CompressConfig
    from compress.models import load_model
    from compress.pipeline import calibration_windows, kl_tail
    from soco_serve.hf import load_soco_model

    rep = _run(tiny_llama, tmp_path / "deep", text_file, "--method", "svd-llm", "--ratio", "0.4",
               "--recover-steps", "20", "--recover-lr", "5e-3", "--recover-kl-groups", "3", "--recover-kl-steps", "30")
    logs = rep["recovery"]["per_group"]
    assert rep["settings"]["recover"]["kl_groups"] == 3 and [logs[g]["loss"] for g in "0123"] == ["hidden"] + ["kl"] * 3
    assert rep["settings"]["recover"]["kl_steps"] == 30 and [logs[g]["steps"] for g in "0123"] == [20, 30, 30, 30]
    assert all(logs[g]["train_last"] < logs[g]["train_first"] and logs[g]["val_after"] <= logs[g]["val_before"]
               for g in "123")

    cfg = CompressConfig(output=tmp_path / "x", calib_text=str(text_file), calib_windows=16, seq_len=64)
    dense, tok, _ = load_model(str(tiny_llama))
    ids = calibration_windows(cfg, tok)[-cfg.batch_size:]  # the held-out batch
    with torch.no_grad():
        t_logp, t_idx = soco.topk_logp(dense(input_ids=ids).logits, RecoverConfig.topk)
        for g in (1, 2):
            model = load_soco_model(tmp_path / "deep")
            for i in range(g + 1, 4):
                model.model.layers[i] = dense.model.layers[i]
            got = soco.topk_kl(model(input_ids=ids).logits, t_logp, t_idx)
            assert float(got) == pytest.approx(logs[str(g)]["val_after"], rel=1e-4), g

    groups = [range(i, i + 1) for i in range(4)]
    rc = RecoverConfig(steps=8, kl_groups=3)
    assert [kl_tail(replace(cfg, recover=rc), groups, g) for g in range(4)] == [None, [2, 3], [3], []]
    assert kl_tail(replace(cfg, recover=replace(rc, last_loss="hidden")), groups, 3) is None
    assert kl_tail(replace(cfg, recover=replace(rc, steps=0)), groups, 3) is None


def test_recovery_at_full_rank_changes_nothing(tiny_llama_f64, text_file, tmp_path):
    from compress.models import load_model
    from soco_serve.hf import load_soco_model

    rep = _run(tiny_llama_f64, tmp_path / "ck", text_file, "--method", "svd-llm", "--full-rank", "--recover-steps", "10",
               "--recover-lr", "5e-3")
    assert rep["recovery"]["steps"] > 0
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = load_soco_model(tmp_path / "ck")(input_ids=ids).logits
        want = load_model(str(tiny_llama_f64))[0](input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_recovery_is_on_by_default_but_for_exact_factors(tmp_path):
    from compress.config import CompressConfig
    from compress.recover import DEFAULT_STEPS

    def steps(**kw):
        return CompressConfig(output=tmp_path / "x", **kw).recover.steps

    assert steps(method="svd-llm", ratio=0.3) == DEFAULT_STEPS == steps(method="basis-sharing", ratio=0.3)
    assert steps(method="soco", ratio=0.3) == DEFAULT_STEPS
    assert steps(method="svd-llm", full_rank=True) == 0 == steps(method="soco", ratios=(0.3, 0.4))
    assert steps(method="svd-llm", full_rank=True, recover=RecoverConfig(steps=5)) == 5  # asked for: honoured


def test_recovery_refuses_several_ratios_and_too_few_batches(tiny_llama, text_file, tmp_path):
    from compress.config import CompressConfig

    with pytest.raises(ValueError, match="run once per ratio"):
        CompressConfig(output=tmp_path / "x", method="soco", ratios=(0.3, 0.4), recover=RecoverConfig(steps=5))
    from compress.cli import main

    assert main([str(tiny_llama), "-o", str(tmp_path / "y"), "--calib-windows", "2", "--batch-size", "2",
                 "--seq-len", "64", "--no-progress", "--no-eval", "--calib-text", str(text_file),
                 "--method", "svd-llm", "--recover-steps", "5"]) != 0
    assert not (tmp_path / "y").exists()
