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


def _chat_file(path, n=12):
    import json

    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " * 4}]}) + "\n")
    return path


def test_chats_are_rendered_with_the_models_chat_template(tmp_path):
    import pytest

    plain, _ = _tokenizers()
    text = data.load_chats(str(_chat_file(tmp_path / "c.jsonl", 2)), plain)
    expected = [plain.apply_chat_template([{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " * 4}],
                                          tokenize=False) for i in range(2)]
    assert text == data.ARTICLE_SEPARATOR.join(expected) and "<|im_start|>assistant" in text
    ids = data.tokenize_stream(plain, text)  # the template's special tokens become their single ids
    assert int((ids == plain.convert_tokens_to_ids("<|im_start|>")).sum()) == text.count("<|im_start|>")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "plain text"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: expected a JSON object with a 'messages' list"):
        data.load_chats(str(bad), plain)
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: .*role.*content"):
        data.load_chats(str(bad), plain)
    with pytest.raises(data.DataError, match="expected a .jsonl file of chats"):
        data.load_chats(str(tmp_path / "missing.jsonl"), plain)
    no_template = copy_without_template(plain)
    with pytest.raises(data.DataError, match="no chat template"):
        data.load_chats(str(tmp_path / "c.jsonl"), no_template)


def test_article_chats_ask_about_the_calibration_articles_only():
    arts = data.wiki_articles()
    chats = data.article_chats()
    calibration = [a for i, a in enumerate(arts) if i % data.EVAL_EVERY]
    assert len(chats) == len(calibration) > 50
    lo, hi = data.ARTICLE_ANSWER_CHARS
    evaluation = data.default_text("evaluation")
    for (ask, answer), article in zip(chats, calibration):
        title, _, body = article.partition(data.ARTICLE_SEPARATOR)
        assert ask == {"role": "user", "content": f"Tell me about {title}."} and answer["role"] == "assistant"
        assert body.startswith(answer["content"]) and lo // 2 < len(answer["content"]) <= hi
        assert answer["content"][:200] not in evaluation  # nothing of the evaluation split enters calibration
    plain, _ = _tokenizers()
    text = data.load_chats(data.ARTICLE_CHATS, plain)
    assert text.count("<|im_start|>assistant") == len(chats) and "Tell me about" in text


def copy_without_template(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def test_interleave_spreads_both_kinds_evenly():
    import torch

    a, b = torch.arange(6).view(6, 1), torch.arange(100, 102).view(2, 1)
    assert data.interleave(a, b).view(-1).tolist() == [0, 1, 100, 2, 3, 4, 101, 5]
    assert torch.equal(data.interleave(a, b[:0]), a)


def test_a_share_of_the_calibration_windows_comes_from_the_chats(text_file, tmp_path):
    import pytest
    import torch

    from compress import pipeline
    from compress.config import CompressConfig

    plain, _ = _tokenizers()
    chats = _chat_file(tmp_path / "c.jsonl")
    cfg = CompressConfig(tmp_path / "out", calib_text=str(text_file), seq_len=32, calib_windows=8, batch_size=2,
                         calib_chat=str(chats), calib_chat_share=0.25)
    c = pipeline.calibration_windows(cfg, plain)
    assert c.shape == (8, 32)
    streams = {"text": data.tokenize_stream(plain, data.load_text(str(text_file), "calibration")),
               "chat": data.tokenize_stream(plain, data.load_chats(str(chats), plain))}

    def source(row):
        return [k for k, s in streams.items() if (s.unfold(0, 32, 1) == row).all(1).any()]

    kinds = [source(row) for row in c]
    assert kinds == [["text"]] * 2 + [["chat"]] + [["text"]] * 3 + [["chat"]] + [["text"]]  # 2 of 8, spread
    assert torch.equal(c, pipeline.calibration_windows(cfg, plain))  # seeded
    assert cfg.settings()["calib_chat"] == str(chats) and cfg.settings()["calib_chat_share"] == 0.25
    assert "calib_chat" not in CompressConfig(tmp_path / "out").settings()  # as before chats existed
    with pytest.raises(ValueError, match="leaves no chat window"):
        CompressConfig(tmp_path / "out", calib_windows=8, calib_chat=str(chats), calib_chat_share=0.05)
    with pytest.raises(ValueError, match="between 0 and 1"):
        CompressConfig(tmp_path / "out", calib_chat=str(chats), calib_chat_share=1.0)
