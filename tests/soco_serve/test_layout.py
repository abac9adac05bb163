"""The checkpoint contract: writer and reader, atomicity, and every malformed-input error."""

import json

import pytest
import torch

from soco_serve import layout as L


def _manifest():
    return L.Manifest(
        architecture="LlamaForCausalLM", dtype="float32",
        linears={
            "a.0.q": L.LinearEntry("lowrank", 8, 6, rank=3),
            "a.0.k": L.LinearEntry("shared", 8, 4, rank=2, basis="k.0-1"),
            "a.1.k": L.LinearEntry("shared", 8, 4, rank=2, basis="k.0-1"),
            "a.0.o": L.LinearEntry("dense", 6, 8, bias=True),
        },
        bases={"k.0-1": L.BasisEntry(2, 8, ["a.0.k", "a.1.k"])},
    )


def _tensors():
    torch.manual_seed(0)
    return {
        "a.0.q.lowrank_u": torch.randn(6, 3), "a.0.q.lowrank_v": torch.randn(3, 8),
        "a.0.k.lowrank_u": torch.randn(4, 2), "a.1.k.lowrank_u": torch.randn(4, 2),
        "soco_bases.k.0-1": torch.randn(2, 8),
        "a.0.o.weight": torch.randn(8, 6), "a.0.o.bias": torch.randn(8),
        "embed.weight": torch.randn(10, 8),
    }


def _write(path, manifest=None, tensors=None, **kw):
    with L.CheckpointWriter(path, **kw) as w:
        for n, t in (tensors or _tensors()).items():
            w.add(n, t)
        return w.commit(manifest or _manifest())


def test_roundtrip_lazy_and_counts(tmp_path):
    out = _write(tmp_path / "ck", max_shard_bytes=200)  # forces several shards
    r = L.CheckpointReader(out)
    assert len({i.file for i in r.tensors.values()}) > 1
    for n, t in _tensors().items():
        torch.testing.assert_close(r.get(n), t)
    m = r.manifest
    # the shared basis is stored once and counted once
    assert sum(1 for n in r.names() if n.startswith(L.BASIS_PREFIX)) == 1
    assert m.stored_linear_params() == 6 * 3 + 3 * 8 + 2 * 4 * 2 + 2 * 8 + 8 * 6
    assert m.dense_linear_params() == 8 * 6 + 2 * 8 * 4 + 6 * 8
    # ...but applied by every layer of its group: per token, each shared layer multiplies by it
    assert m.linear_multiply_adds() == 3 * (8 + 6) + 2 * 2 * (8 + 4) + 6 * 8
    assert not list(tmp_path.glob(".ck.tmp-*"))


def test_shards_are_safetensors_files_for_every_dtype(tmp_path):
    """The writer's own shard files (written a tensor at a time) read back through safetensors'
    reader exactly, in every dtype and shape a checkpoint can hold."""
    from safetensors import safe_open

    torch.manual_seed(0)
    tensors = {f"t.{dt}".replace("torch.", ""): (torch.randn(5, 3) * 100).to(dt)
               for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                          torch.int16, torch.int8, torch.uint8)}
    tensors |= {"t.bool": torch.rand(7) > 0.5, "t.scalar": torch.tensor(2.5), "t.empty": torch.zeros(0, 4),
                "t.strided": torch.randn(4, 6).t()}  # not contiguous
    w = L.CheckpointWriter(tmp_path / "ck", max_shard_bytes=100)
    for n, t in tensors.items():
        w.add(n, t)
    w._close_shard()
    shards = sorted(tmp_path.glob(".ck.tmp-*/shard-*.tmp"))
    assert len(shards) > 1 and not list(tmp_path.glob(".ck.tmp-*/*.data"))
    seen = {}
    for path in shards:
        assert set(L.safetensors_header(path)) - {"__metadata__"}
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            seen |= {k: f.get_tensor(k) for k in f.keys()}
    assert seen.keys() == tensors.keys()
    for n, t in tensors.items():
        assert seen[n].dtype == t.dtype and torch.equal(seen[n], t), n
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_tensor_is_written_when_added(tmp_path):
    """Memory: the writer keeps no tensor once added (it used to buffer a whole shard, up to
    ``--max-shard-size``): changing a tensor in place after adding it changes nothing written."""
    with L.CheckpointWriter(tmp_path / "ck") as w:
        for n, t in _tensors().items():
            w.add(n, t)
            t.zero_()
        w.commit(_manifest())
    r = L.CheckpointReader(tmp_path / "ck")
    for n, t in _tensors().items():
        torch.testing.assert_close(r.get(n), t)


def test_existing_folder_refused_unless_force(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--force"):
        _write(tmp_path / "ck")
    assert (tmp_path / "ck" / "mine.txt").exists()
    _write(tmp_path / "ck", force=True)
    assert not (tmp_path / "ck" / "mine.txt").exists() and L.is_soco_checkpoint(tmp_path / "ck")


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(L.CheckpointError, match="never written"):
        with L.CheckpointWriter(tmp_path / "ck") as w:
            w.add("a.0.q.lowrank_u", torch.randn(6, 3))
            w.commit(_manifest())
    assert list(tmp_path.iterdir()) == []


def test_nan_tensor_refused(tmp_path):
    with L.CheckpointWriter(tmp_path / "ck") as w, pytest.raises(ValueError, match="'x' has NaN"):
        w.add("x", torch.tensor([1.0, float("nan")]))


def test_unknown_version(tmp_path):
    out = _write(tmp_path / "ck")
    p = out / L.MANIFEST_FILE
    d = json.loads(p.read_text())
    d["format_version"] = 99
    p.write_text(json.dumps(d))
    with pytest.raises(L.CheckpointError, match=r"soco_manifest.json: unknown format_version 99"):
        L.CheckpointReader(out)


def test_every_readable_version_reads_and_version_2_is_written(tmp_path):
    out = _write(tmp_path / "ck")
    assert L.CheckpointReader(out).manifest.format_version == L.FORMAT_VERSION == 2
    p = out / L.MANIFEST_FILE
    for version in L.READABLE_VERSIONS:
        p.write_text(json.dumps({**json.loads(p.read_text()), "format_version": version}))
        assert L.CheckpointReader(out).manifest.format_version == version


def test_quantization_config_contract():
    qc = L.quantization_config()
    assert qc == {"quant_method": "soco", "format_version": L.FORMAT_VERSION}
    L.check_quantization_config(qc)
    with pytest.raises(L.CheckpointError, match=r"config.json: quantization_config.quant_method is 'gptq'"):
        L.check_quantization_config({**qc, "quant_method": "gptq"})
    with pytest.raises(L.CheckpointError, match=r"x/config.json: quantization_config: unknown format_version 99; "
                                                r"this soco-serve reads versions 1, 2"):
        L.check_quantization_config({**qc, "format_version": 99}, where="x/config.json")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(L.CheckpointError, match="not a soco checkpoint"):
        L.CheckpointReader(tmp_path)


def test_missing_basis_id():
    m = _manifest()
    m.linears["a.1.k"].basis = "nope"
    with pytest.raises(L.CheckpointError, match="basis 'nope' does not exist"):
        m.validate()


@pytest.mark.parametrize("name,bad,msg", [
    ("a.0.q.lowrank_v", torch.randn(4, 8), r"'a.0.q.lowrank_v' has shape \[4, 8\], manifest expects \[3, 8\]"),
    ("a.0.q.lowrank_v", torch.randint(0, 3, (3, 8)), r"'a.0.q.lowrank_v' has dtype torch.int64"),
    # a factor in another float dtype is refused, never cast silently
    ("a.0.q.lowrank_v", torch.randn(3, 8).half(), r"'a.0.q.lowrank_v' has dtype torch.float16, but .* float32"),
    ("embed.weight", torch.randn(10, 8).bfloat16(), r"'embed.weight' has dtype torch.bfloat16"),
])
def test_tensor_disagrees_with_manifest(tmp_path, name, bad, msg):
    t = _tensors()
    t[name] = bad
    with L.CheckpointWriter(tmp_path / "ck") as w:
        for n, x in t.items():
            w.add(n, x)
        w.finish(_manifest())
        with pytest.raises(L.CheckpointError, match=msg):
            L.CheckpointReader(w.path)


def test_missing_tensor_named(tmp_path):
    out = _write(tmp_path / "ck")
    idx = json.loads((out / L.INDEX_FILE).read_text())
    # drop a tensor from the manifest's point of view: rank 3 -> 4 makes the shapes disagree,
    # an absent name must be reported by name
    m = json.loads((out / L.MANIFEST_FILE).read_text())
    m["linears"]["a.2.q"] = {"kind": "lowrank", "in_features": 8, "out_features": 6, "rank": 3, "basis": None, "bias": False}
    (out / L.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(L.CheckpointError, match="'a.2.q.lowrank_u' required by soco_manifest.json is missing"):
        L.CheckpointReader(out)
    assert idx["weight_map"]


def test_truncated_and_corrupt_shards(tmp_path):
    out = _write(tmp_path / "ck")
    shard = next(out.glob("soco-model-*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(L.CheckpointError, match=f"{shard.name}: truncated or corrupt"):
        L.CheckpointReader(out)
    shard.write_bytes(b"\xff" * 4)
    with pytest.raises(L.CheckpointError, match="truncated safetensors file"):
        L.CheckpointReader(out)
    shard.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(L.CheckpointError, match="corrupt safetensors header"):
        L.CheckpointReader(out)
