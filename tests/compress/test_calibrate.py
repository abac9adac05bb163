"""Calibration statistics against direct computations on a tiny random Llama."""

import torch

from compress import calibrate, models
from tests.compress import reference


def _model_and_windows(path, seed=0):
    model = models.load_model(str(path))[0]
    spec = models.arch_spec(model)
    refs = models.find_linears(model, spec)
    windows = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(seed))
    return model, refs, windows


def test_gram_and_abs_mean_match_the_captured_inputs(tiny_llama):
    model, refs, windows = _model_and_windows(tiny_llama)
    grams = reference.collect_grams(model, refs, windows, batch_size=2)
    down = next(r for r in refs if r.layer == 1 and r.spec.kind == "down")
    seen = []
    handle = down.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    handle.remove()
    x = torch.cat(seen).double()
    st = grams.stats[down.site_key]
    assert st.tokens == 48
    torch.testing.assert_close(st.gram, x.T @ x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.abs_mean, x.abs().mean(0), rtol=1e-6, atol=1e-9)


def test_fisher_is_the_summed_squared_gradient_per_row(tiny_llama, tmp_path):
    # Layer by layer, recomputed from saved inputs, against the whole model's own backward pass.
    model, refs, windows = _model_and_windows(tiny_llama)
    spec = models.arch_spec(model)
    for p in model.parameters():
        p.requires_grad_(False)
    inputs = calibrate.layer_inputs(model, spec, windows, 2)
    fisher = calibrate.collect_fisher(calibrate.Resident(model, spec), model, spec, refs, windows, inputs,
                                      lambda i: tmp_path / f"act-{i}.pt", progress=False)
    assert not any(p.requires_grad for p in model.parameters())  # left as found
    assert not list(tmp_path.glob("act-*.pt"))  # the spilled activations are removed
    assert set(fisher) == {r.name for r in refs}
    q = next(r for r in refs if r.layer == 2 and r.spec.kind == "q")
    expected = torch.zeros(q.module.out_features, dtype=torch.float64)
    q.module.weight.requires_grad_(True)
    for b in torch.split(windows, 2):
        model.zero_grad()
        model(input_ids=b, labels=b, use_cache=False).loss.backward()
        expected += q.module.weight.grad.double().pow(2).sum(1)
    torch.testing.assert_close(fisher[q.name], expected, rtol=1e-5, atol=0)
    assert all(bool((f > 0).all()) for f in fisher.values())
