"""SoCo on tiny random Llamas: exactness of the scored model, exact budget, folding, a short
training run end to end (one run, several ratios; shared bases), and bad input."""

import copy
import json
import shutil

import pytest
import torch

from compress import calibrate, soco
from compress.cli import main
from compress.data import calibration_windows, load_text, tokenize_stream
from soco_serve.hf import install_factors, load_soco_model
from soco_serve.layout import CheckpointReader, Manifest
from tests.compress import reference

COMMON = ["--calib-windows", "4", "--seq-len", "64", "--no-progress", "--recover-steps", "0"]


class Prepared:
    """The dense model in memory with its calibration windows and statistics."""

    def __init__(self, path, text):
        self.model, tok, self.spec, self.refs = reference.load(path)
        self.calib = calibration_windows(tokenize_stream(tok, load_text(str(text), "calibration")), 64, 4, seed=0)
        self.grams = reference.collect_grams(self.model, self.refs, self.calib)


@pytest.fixture(scope="module")
def prep64(tiny_llama_f64, text_file):
    return Prepared(tiny_llama_f64, text_file)


def _manifest(dec, dtype=torch.float64):
    m = Manifest("LlamaForCausalLM", str(dtype).removeprefix("torch."), dec.linears, dec.bases)
    m.achieved_ratio = 1 - m.stored_linear_params() / m.dense_linear_params()
    return m


def _ids(n=2, t=24):
    return torch.randint(0, 1000, (n, t), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _blocks(prep, group_size=1):
    return soco.build_blocks(prep.refs, prep.grams, group_size=group_size,
                             shared_kinds=("q", "k", "v", "gate", "up") if group_size > 1 else (), progress=False)[0]


def _randomize(blocks, seed=0, zero=0.6):
    """Random scores in [0, 2] with a share of exact zeros; the first block keeps all ones (so it
    stays above break-even: the dense path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, b in enumerate(blocks):
            if i == 0:
                continue
            s = torch.rand(b.scores.shape, generator=g, dtype=b.scores.dtype) * 2
            s[torch.rand(b.scores.shape, generator=g) < zero] = 0.0
            s[:, 0] = 1.0  # every block keeps at least one component
            b.scores.copy_(s)


def test_full_budget_without_regularisation_is_the_dense_model(prep64):
    dense = _logits(prep64.model, _ids())
    for group_size in (2, 1):
        blocks = _blocks(prep64, group_size)
        with soco.installed(prep64.model, blocks) as scored:
            torch.testing.assert_close(_logits(scored, _ids()), dense, rtol=0, atol=1e-9)
    # Training at full budget with every penalty off stays at the dense model, up to Adam's own
    # step size (its steps stay about lr long even where the gradient vanishes).
    windows = soco.training_windows(prep64.calib, 16)[:2]
    stack = soco.Stack.resident(prep64.model, prep64.spec, blocks)
    teacher = soco.teacher_topk(stack, windows, 32, progress=False)
    cfg = soco.SocoConfig(steps=3, kappa0=0.0, sparsity=0.0, stage3=0.0, seq_len=16, lr=0.01, budget="penalty")
    log = soco.train(stack, windows, teacher, 0.3, cfg, progress=False)
    assert log["stopped"] is None and log["final"]["kl"] < 1e-4 and log["final"]["zero"] == 0
    assert all(float((b.scores.detach() - 1).abs().max()) <= 3 * cfg.lr for b in blocks)
    assert isinstance(prep64.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # swapped back
    assert all(p.requires_grad for p in prep64.model.parameters())


@pytest.mark.parametrize("group_size,force", [(1, False), (2, False), (1, True)])
def test_budget_counts_exactly_what_the_writer_stores(prep64, group_size, force):
    blocks = _blocks(prep64, group_size)
    _randomize(blocks, seed=group_size)
    # the soft count is the exact count when every score is 0 or >= 1
    with torch.no_grad():
        binary = [b.scores.detach().clone() for b in blocks]
        for b in blocks:
            b.scores.copy_((b.scores > 0).to(b.scores.dtype))
        exact = soco.stored_params(blocks, soco.nonzero_counts(blocks), force)
        assert float(soco.soft_stored(blocks, 0.1, force)[0]) == pytest.approx(exact, abs=1e-6)
        for b, s in zip(blocks, binary):
            b.scores.copy_(s)
    dtype = torch.float64
    for ratio in (0.3, 0.5):
        pr = soco.threshold_mask(blocks, ratio, force)
        assert ratio <= pr.ratio <= ratio + soco.WITHIN
        dec = soco.fold(blocks, pr.keep, dtype, force)
        manifest = _manifest(dec, dtype)
        manifest.validate()
        stored = sum(t.numel() for n, t in dec.tensors.items() if not n.endswith(".bias"))
        assert pr.stored == manifest.stored_linear_params() == stored
        assert manifest.achieved_ratio == pytest.approx(pr.ratio, abs=1e-6)
        kinds = {e.kind for e in manifest.linears.values()}
        assert ("dense" in kinds) != force and ("shared" in kinds) == (group_size > 1)


@pytest.mark.parametrize("group_size", [1, 2])
def test_a_step_that_prunes_past_the_floor_gives_back_its_best_components(prep64, group_size):
    blocks = _blocks(prep64, group_size)
    _randomize(blocks, seed=5, zero=0.2)
    before = [b.scores.detach().clone() for b in blocks]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # one "step" zeroes a third of what was in use
        for b in blocks[1:]:
            b.scores[:, torch.rand(b.scores.shape[1], generator=g) < 0.33] = 0.0
    after = [b.scores.detach().clone() for b in blocks]
    lo = soco.stored_params(blocks, soco.nonzero_counts(blocks))
    hi = soco.stored_params(blocks, [int((s.max(0).values > 0).sum()) for s in before])
    assert lo < hi
    # above the floor: nothing changes
    assert not any(m.any() for m in soco.hold_floor(blocks, before, lo))
    floor = (lo + hi) / 2
    back = soco.hold_floor(blocks, before, floor)
    stored = soco.stored_params(blocks, soco.nonzero_counts(blocks))
    assert stored >= floor
    newly = [(s0.max(0).values > 0) & (s1.max(0).values == 0) for s0, s1 in zip(before, after)]
    for b, s0, s1, m, n in zip(blocks, before, after, back, newly):
        assert not (m & ~n).any()  # only what this step zeroed comes back ...
        assert torch.equal(b.scores.detach()[:, m], s0[:, m])  # ... with its score from before the step
        assert torch.equal(b.scores.detach()[:, ~m], s1[:, ~m])
    # the best of them by key before the step, and no more than needed
    key = lambda b, s0: (s0.max(0).values if b.n > 1 else s0[0]) * b.prior
    given = torch.cat([key(b, s0)[m] for b, s0, m in zip(blocks, before, back)])
    left = torch.cat([key(b, s0)[n & ~m] for b, s0, m, n in zip(blocks, before, back, newly)])
    assert given.numel() and left.numel() and float(given.min()) >= float(left.max())
    i, j = min(((i, int(j)) for i, m in enumerate(back) for j in torch.nonzero(m).flatten()),
               key=lambda ij: float(key(blocks[ij[0]], before[ij[0]])[ij[1]]))
    with torch.no_grad():
        blocks[i].scores[:, j] = 0.0
    assert soco.stored_params(blocks, soco.nonzero_counts(blocks)) < floor


@pytest.mark.parametrize("group_size", [1, 2])
def test_folding_the_scores_changes_no_output(prep64, group_size):
    blocks = _blocks(prep64, group_size)
    _randomize(blocks, seed=3, zero=0.5)
    ids = _ids()
    with soco.installed(prep64.model, blocks) as scored:
        want = _logits(scored, ids)
    keep = [b.key().detach() > 0 for b in blocks]
    dec = soco.fold(blocks, keep, torch.float64)
    manifest = _manifest(dec)
    folded = copy.deepcopy(prep64.model)
    install_factors(folded, manifest, dec.tensors.__getitem__, torch.float64)
    torch.testing.assert_close(_logits(folded, ids), want, rtol=0, atol=1e-9)
    if group_size > 1:  # a layer that does not use a kept shared component stores a zero column
        assert any(bool((dec.tensors[f"{n}.lowrank_u"].abs().sum(0) == 0).any())
                   for n, e in manifest.linears.items() if e.kind == "shared")


def _kl(dense, comp, windows):
    with torch.no_grad():
        p = torch.log_softmax(dense(input_ids=windows).logits.double(), -1)
        q = torch.log_softmax(comp(input_ids=windows).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_training_lowers_distillation_loss_and_meets_every_ratio(tiny_llama, text_file, tmp_path):
    out = tmp_path / "multi"
    argv = [str(tiny_llama), "-o", str(out), *COMMON, "--calib-text", str(text_file), "--no-eval",
            "--method", "soco", "--ratio", "0.4,0.5", "--soco-steps", "30", "--soco-seq-len", "32"]
    assert main(argv) == 0
    trained = {}
    for r in (0.4, 0.5):
        ck = out / f"ratio-{r:g}"
        reader = CheckpointReader(ck)
        m = reader.manifest
        assert m.method == "soco" and m.target_ratio == r
        assert r <= m.achieved_ratio <= r + 0.005
        stored = sum(t.numel() for n, t in reader.items() if n.rpartition(".")[0] in m.linears
                     and not n.endswith(".bias")) + sum(reader.get(f"soco_bases.{b}").numel() for b in m.bases)
        assert stored == m.stored_linear_params()
        report = json.loads((ck / "report.json").read_text())
        log = report["soco"]
        assert log["steps_done"] == 30 and log["stopped"] is None and log["trained_for"] == 0.4
        assert set(log["stages"]) == {"1", "2", "3"}
        assert m.settings["soco"]["steps"] == 30
        trained[r] = load_soco_model(ck)
    # Against the same components without training (svd-llm at the same ratio), the learned
    # scores give a lower distillation loss on the calibration text.
    base = tmp_path / "svd-llm"
    assert main([str(tiny_llama), "-o", str(base), *COMMON, "--calib-text", str(text_file), "--no-eval",
                 "--method", "svd-llm", "--ratio", "0.4"]) == 0
    from compress.models import load_model

    dense, tok, _ = load_model(str(tiny_llama))
    windows = calibration_windows(tokenize_stream(tok, load_text(str(text_file), "calibration")), 64, 4, seed=0)
    assert _kl(dense, trained[0.4], windows) < _kl(dense, load_soco_model(base), windows)


def test_soco_on_shared_bases_writes_a_servable_checkpoint(tiny_llama, text_file, tmp_path):
    out = tmp_path / "shared"
    assert main([str(tiny_llama), "-o", str(out), *COMMON, "--calib-text", str(text_file), "--no-eval",
                 "--method", "soco", "--group-size", "2", "--ratio", "0.4", "--soco-steps", "8",
                 "--soco-seq-len", "32"]) == 0
    reader = CheckpointReader(out)
    m = reader.manifest
    assert m.bases and all(len(b.layers) == 2 for b in m.bases.values())
    assert 0.4 <= m.achieved_ratio <= 0.405
    report = json.loads((out / "report.json").read_text())
    assert report["soco"]["group_size"] == 2 and m.settings["group_size"] == 2 and m.settings["shared_types"]
    model = load_soco_model(out)
    assert model.model.layers[0].self_attn.q_proj.v is model.model.layers[1].self_attn.q_proj.v


def _fails(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err


def test_bad_input(tiny_llama, text_file, tmp_path, capsys):
    base = [str(tiny_llama), "-o", str(tmp_path / "o"), *COMMON, "--calib-text", str(text_file), "--no-eval",
            "--method", "soco", "--soco-steps", "2"]
    # tiny model: one component per matrix still stores 0.69% of the linear parameters
    _fails([*base, "--ratio", "0.995"], capsys, "target ratio 0.995 cannot be reached", "ratio 0.9931 at most")
    _fails([*base, "--calib-windows", "0"], capsys, "calibration needs at least one window")
    _fails([*base, "--ratio", "0.3,1.5"], capsys, "--ratio must be in (0, 1)")
    _fails([str(tiny_llama), "-o", str(tmp_path / "o"), "--method", "svd-llm", "--ratio", "0.3,0.4"], capsys,
           "need --method soco")
    _fails([*base, "--soco-steps", "-1"], capsys, "--soco-steps must be")
    assert not (tmp_path / "o").exists()
    with pytest.raises(soco.SocoError, match="calibration set is empty"):
        soco.training_windows(torch.empty(0, 64, dtype=torch.long), 32)


def test_training_windows_keep_the_tokenizers_prefix():
    calib = torch.tensor([[7, *range(10, 20)], [7, *range(20, 30)]])  # two windows of BOS + 10 tokens
    w = soco.training_windows(calib, 5, prefix=(7,))
    assert w.tolist() == [[7, 10, 11, 12, 13], [7, 14, 15, 16, 17], [7, 20, 21, 22, 23], [7, 24, 25, 26, 27]]
    plain = torch.arange(24).reshape(2, 12)
    assert torch.equal(soco.training_windows(plain, 6), plain.reshape(4, 6))  # no prefix: plain cuts
    assert torch.equal(soco.training_windows(calib, 64, prefix=(7,)), calib)  # shorter than a piece: as they are
    with pytest.raises(soco.SocoError, match=r"do not start with the tokenizer's prefix \[8\]"):
        soco.training_windows(calib, 5, prefix=(8,))


def test_soco_trains_on_windows_that_start_as_a_text_does(tiny_llama, text_file, tmp_path, monkeypatch):
    """A tokenizer that puts a BOS before every text (as Gemma's does): every training window
    soco cuts from the calibration windows starts with it, and no other token is a BOS."""
    from transformers import AutoTokenizer

    model = tmp_path / "bos-llama"
    shutil.copytree(tiny_llama, model)
    tok = AutoTokenizer.from_pretrained(model, add_bos_token=True)
    tok.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model)("x")["input_ids"][0] == tok.bos_token_id
    seen = []
    real = soco.train

    def spy(stack, windows, *args, **kwargs):
        seen.append(windows.clone())
        return real(stack, windows, *args, **kwargs)

    monkeypatch.setattr(soco, "train", spy)
    assert main([str(model), "-o", str(tmp_path / "o"), "--method", "soco", "--ratio", "0.3", "--calib-text",
                 str(text_file), *COMMON, "--soco-steps", "1", "--soco-seq-len", "16", "--no-eval"]) == 0
    (w,) = seen
    assert w.shape == (4 * 4, 16)  # each 64-token window: BOS + 63 tokens, cut into 4 pieces of BOS + 15
    assert (w[:, 0] == tok.bos_token_id).all() and (w[:, 1:] != tok.bos_token_id).all()


def test_nan_loss_stops_and_keeps_the_last_good_scores(prep64):
    blocks = _blocks(prep64)
    windows = soco.training_windows(prep64.calib, 16)[:4]
    stack = soco.Stack.resident(prep64.model, prep64.spec, blocks)
    teacher = soco.teacher_topk(stack, windows, 32, progress=False)
    seen = []

    def flaky_kl(logits, logp, idx):
        seen.append([b.scores.detach().clone() for b in blocks])
        kl = soco.topk_kl(logits, logp, idx)
        return kl * float("nan") if len(seen) == 6 else kl

    cfg = soco.SocoConfig(steps=8, seq_len=16, lr=0.2)
    log = soco.train(stack, windows, teacher, 0.4, cfg, progress=False, kl_fn=flaky_kl)
    assert log["steps_done"] == 5 and "non-finite distillation loss at step 5" in log["stopped"]
    for b, s in zip(blocks, seen[5]):  # the scores the failing step started from
        assert torch.equal(b.scores.detach(), s)
    assert not torch.equal(seen[5][1], seen[0][1])  # training had moved them
    assert isinstance(prep64.model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # model restored
    pr = soco.threshold_mask(blocks, 0.4)  # the kept scores still give a valid checkpoint
    assert 0.4 <= pr.ratio <= 0.405


def test_a_fast_schedule_never_prunes_past_the_budget(prep64, monkeypatch):
    """At this learning rate the scores reach zero together: without the floor the run ends with
    zero-score components kept, a model more compressed than the ratio asked for."""
    windows = soco.training_windows(prep64.calib, 16)
    cfg = soco.SocoConfig(steps=40, seq_len=16, lr=0.5, budget="penalty")

    def run():
        blocks = _blocks(prep64)
        stack = soco.Stack.resident(prep64.model, prep64.spec, blocks)
        teacher = soco.teacher_topk(stack, windows, 32, progress=False)
        return soco.train(stack, windows, teacher, 0.5, cfg, progress=False), soco.threshold_mask(blocks, 0.5)

    log, pr = run()
    assert all(log["stages"][k].get("given_back", 0) > 0 for k in "123")
    assert all(h["ratio_nonzero"] <= 0.5 - cfg.margin + soco.WITHIN + 1e-9 for h in log["history"] if h["stage"] < 3)
    assert pr.kept_zero == 0 and 0.5 <= pr.ratio <= 0.5 + soco.WITHIN
    monkeypatch.setattr(soco, "hold_floor", lambda blocks, *a, **k: [torch.zeros(b.rank, dtype=torch.bool) for b in blocks])
    log, pr = run()
    assert pr.kept_zero > 0


@pytest.mark.parametrize("group_size", [1, 2])
def test_projection_keeps_the_global_thresholds_prefix(prep64, group_size):
    blocks = _blocks(prep64, group_size)
    _randomize(blocks, seed=7, zero=0.1)
    keys = [b.key().detach().clone() for b in blocks]
    frac = soco.project_budget(blocks, 0.55)
    assert frac == soco.stored_params(blocks, soco.nonzero_counts(blocks)) / soco.dense_params(blocks) <= 0.55
    pr = soco.threshold_mask(blocks, 0.45)  # on the projected scores: nothing left to prune
    assert pr.pruned_nonzero == 0 and pr.kept_zero == 0
    kept = torch.cat([k[b.score() > 0] for b, k in zip(blocks, keys)])
    pruned = torch.cat([k[(b.score() == 0) & (k > 0)] for b, k in zip(blocks, keys)])
    assert pruned.numel() and float(kept.min()) >= float(pruned.max())  # a prefix of the global order
    assert soco.project_budget(blocks, 1.0) == frac  # a budget at dense prunes nothing


def test_projection_leaves_the_kept_scores_to_the_distillation(prep64):
    """With no distillation signal a projection run ends at the untrained global truncation, every
    kept score still 1; the penalty shrinks scores that it keeps as well."""
    windows = soco.training_windows(prep64.calib, 16)[:4]

    def run(budget):
        blocks = _blocks(prep64)
        stack = soco.Stack.resident(prep64.model, prep64.spec, blocks)
        teacher = soco.teacher_topk(stack, windows, 32, progress=False)
        cfg = soco.SocoConfig(steps=8, seq_len=16, lr=0.2, budget=budget)
        soco.train(stack, windows, teacher, 0.4, cfg, progress=False,
                   kl_fn=lambda logits, logp, idx: 0.0 * logits.sum())
        return blocks

    blocks = run("projection")
    want = soco.threshold_mask(_blocks(prep64), 0.4)
    got = soco.threshold_mask(blocks, 0.4)
    assert got.stored == want.stored and all(torch.equal(a, b) for a, b in zip(got.keep, want.keep))
    assert all(torch.equal(b.scores.detach()[:, k], torch.ones_like(b.scores.detach()[:, k]))
               for b, k in zip(blocks, got.keep))
    assert any(bool((b.scores.detach() != 1).any()) and bool((b.scores.detach() > 0).any()) for b in run("penalty"))


@pytest.mark.parametrize("group_size,masked", [(1, False), (2, True)])
def test_layered_gradient_is_the_whole_models(prep64, group_size, masked):
    """The stack's group-by-group backward (each group recomputed from its saved input) gives the
    scores exactly the gradient of the whole model's own autograd pass, and so does the held
    stack's single pass."""
    blocks = _blocks(prep64, group_size)
    _randomize(blocks, seed=5, zero=0.3)
    if masked:  # stage 3: pruned components off, straight-through gradient
        for b in blocks:
            b.mask = (torch.arange(b.rank) % 3 != 0).to(b.scores.dtype)
    windows = soco.training_windows(prep64.calib, 16)[:2]
    stack = soco.Stack.resident(prep64.model, prep64.spec, blocks, group_size)
    teacher = soco.teacher_topk(stack, windows, 32, progress=False)
    with soco.installed(prep64.model, blocks) as scored:
        logits = scored(input_ids=windows, use_cache=False).logits
        want_kl = soco.topk_kl(logits, teacher.logp, teacher.idx)
        want = torch.autograd.grad(want_kl, [b.scores for b in blocks])
    with stack.held() as held:
        assert held.whole and not stack.whole
        for way in (stack, held):
            for b in blocks:
                b.scores.grad = None
            kl = way.kl_backward(windows, teacher.logp, teacher.idx, soco.topk_kl)
            assert float(kl) == pytest.approx(float(want_kl.detach()), rel=1e-12)
            for b, g in zip(blocks, want):
                assert float(g.abs().max()) > 0
                torch.testing.assert_close(b.scores.grad, g, rtol=1e-9, atol=1e-14)
            assert all(p.grad is None for p in prep64.model.parameters())  # the dense weights get no gradient
            assert isinstance(prep64.model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # model restored
    for b in blocks:
        b.mask = None


def test_factor_files_onload_one_group_at_a_time(prep64, tmp_path):
    """Blocks saved per group and onloaded from disk train exactly like resident ones, and at any
    moment only the running group's factors are real tensors."""
    blocks = _blocks(prep64, 2)
    _randomize(blocks, seed=7, zero=0.3)
    n = len(prep64.model.model.layers)
    groups = [range(a, min(a + 2, n)) for a in range(0, n, 2)]
    paths, disk = [tmp_path / f"g{g}.safetensors" for g in range(len(groups))], []
    for g, p in zip(groups, paths):
        soco.save_blocks(p, [b for b in blocks if b.refs[0].layer in g], {"site": 0.5})
        mine, damping = soco.load_blocks(p, prep64.refs, torch.device("cpu"))
        assert damping == {"site": 0.5} and all(b.v.is_meta for b in mine)
        disk.append(mine)
    with torch.no_grad():
        for a, b in zip([b for g in disk for b in g], blocks):
            a.scores.copy_(b.scores)
    stack = soco.Stack(calibrate.Resident(prep64.model, prep64.spec), prep64.model, prep64.spec, groups, disk,
                       torch.device("cpu"), soco.FactorFiles(paths, disk, torch.device("cpu")))
    windows = soco.training_windows(prep64.calib, 16)[:2]
    teacher = soco.teacher_topk(soco.Stack.resident(prep64.model, prep64.spec, blocks), windows, 32, progress=False)
    live = []  # per decoder-layer call: how many blocks hold real factors
    hooks = [layer.register_forward_pre_hook(lambda *_: live.append(
        sum(not b.v.is_meta for g in disk for b in g))) for layer in prep64.model.model.layers]
    try:
        kl = stack.kl_backward(windows, teacher.logp, teacher.idx, soco.topk_kl)
    finally:
        for h in hooks:
            h.remove()
    want = [len(disk[i // 2]) for i in range(n)]  # the running group's blocks, no more
    # each step's input capture calls every layer as a pass-through first (nothing loaded)
    assert live == [*[0] * n, *want, *[w for g in reversed(range(len(groups))) for w in want[2 * g: 2 * g + 2]]]
    assert all(b.v.is_meta for g in disk for b in g)  # offloaded again
    resident = soco.Stack.resident(prep64.model, prep64.spec, blocks, 2)
    assert float(resident.kl_backward(windows, teacher.logp, teacher.idx, soco.topk_kl)) == float(kl)
    for a, b in zip([b for g in disk for b in g], blocks):
        torch.testing.assert_close(a.scores.grad, b.scores.grad, rtol=0, atol=0)
