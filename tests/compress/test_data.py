"""The named texts: the other-domain evaluation text is real, long enough and not the Wikipedia sample."""

from compress import data


def test_pydoc_text_is_pythons_documentation_and_long_enough_to_evaluate():
    text = data.load_text("pydoc", "evaluation")
    assert text == data.pydoc_text() and len(text) > 200_000
    assert "The assert statement" in text or "Assert statements" in text
    wiki = data.default_text("evaluation")
    assert text[:2000] not in wiki
    # 32 windows of 512 tokens (the default evaluation) need about 16 K tokens; at a few
    # characters per token there are several times that.
    assert len(text) > 4 * 32 * 512


def _tokenizers():
    from transformers import AutoTokenizer

    from compress.models import default_model_dir

    plain = AutoTokenizer.from_pretrained(default_model_dir())
    bos = AutoTokenizer.from_pretrained(default_model_dir(), add_bos_token=True)  # as Gemma's tokenizer does
    return plain, bos


def test_windows_start_as_the_tokenizer_starts_a_text(text_file, tmp_path):
    import torch

    from compress import pipeline
    from compress.config import CompressConfig

    plain, bos = _tokenizers()
    assert bos("x")["input_ids"][0] == bos.bos_token_id != plain("x")["input_ids"][0]
    assert data.window_prefix(plain) == () and data.window_prefix(bos) == (bos.bos_token_id,)
    stream = data.tokenize_stream(plain, data.load_text(str(text_file), "evaluation"))
    assert torch.equal(stream, data.tokenize_stream(bos, data.load_text(str(text_file), "evaluation")))

    w = data.text_eval_windows(plain, str(text_file), 32, 3)
    assert torch.equal(w, stream[: 3 * 32].view(3, 32))  # no prefix: the stream cut as before
    w = data.text_eval_windows(bos, str(text_file), 32, 3)
    assert w.shape == (3, 32) and (w[:, 0] == bos.bos_token_id).all()
    assert torch.equal(w[:, 1:], stream[: 3 * 31].view(3, 31))  # then the text, nothing skipped or repeated

    for tok, first in ((plain, None), (bos, bos.bos_token_id)):
        cfg = CompressConfig(tmp_path / "out", calib_text=str(text_file), seq_len=32, calib_windows=4, batch_size=2)
        c = pipeline.calibration_windows(cfg, tok)
        assert c.shape == (4, 32)
        if first is None:
            assert (c != plain.bos_token_id).all()
        else:
            assert (c[:, 0] == first).all() and (c[:, 1:] != first).all()
        for row in c:  # every window is a run of the text after its prefix
            body = row[1:] if first is not None else row
            starts = (stream.unfold(0, body.numel(), 1) == body).all(1).nonzero()
            assert starts.numel() >= 1
