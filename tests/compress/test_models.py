import os

import pytest

from compress import models


def test_gguf_is_exported_once_and_again_when_it_changes(tmp_path, monkeypatch):
    """A .gguf model argument is dequantized into the cache on first use only (a 7B export takes
    minutes); a newer file of the same name is exported again."""
    monkeypatch.setenv("SOCO_CACHE_DIR", str(tmp_path / "cache"))
    exports = []

    def fake_export(gguf, out):
        exports.append(gguf)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "_export_gguf", fake_export)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    os.utime(gguf, (1_000_000, 1_000_000))
    out = models.resolve_model(str(gguf))
    assert out == tmp_path / "cache" / "gguf" / "m" and len(exports) == 1
    assert models.resolve_model(str(gguf)) == out and len(exports) == 1
    later = (out / "config.json").stat().st_mtime + 60
    os.utime(gguf, (later, later))  # newer than the export (not "now": it can share the export's timestamp)
    assert models.resolve_model(str(gguf)) == out and len(exports) == 2


def test_missing_gguf_is_named(tmp_path):
    with pytest.raises(models.ModelError, match="m.gguf: GGUF file not found"):
        models.resolve_model(str(tmp_path / "m.gguf"))
