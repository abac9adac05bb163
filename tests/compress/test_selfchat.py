"""``soco-compress selfchat``: the model's own chats, written as --calib-chat reads them, seeded,
atomic, never over a user's file; and a compression calibrated on them."""

import json

import pytest

from compress import data
from compress.cli import main
from compress.selfchat import end_of_turn, self_chats, turn_template
from soco_serve.layout import CheckpointReader


def test_turn_template_splits_the_chat_at_the_users_text():
    from transformers import AutoTokenizer

    from compress.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    head, tail = turn_template(tok)
    assert head.endswith("<|im_start|>user\n") and tail == "<|im_end|>\n<|im_start|>assistant\n"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == head + "hi" + tail
    assert end_of_turn(tok) == tok.convert_tokens_to_ids("<|im_end|>")  # read from the template, not assumed
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    assert end_of_turn(tok) is None  # a template that closes turns with nothing
    tok.chat_template = None
    with pytest.raises(data.DataError, match="no chat template"):
        turn_template(tok)


def test_selfchat_writes_seeded_chats_that_calibration_reads(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "chats.jsonl"
    argv = ["selfchat", str(tiny_llama), "-o", str(out), "--n", "3", "--max-new-tokens", "8", "--batch-size", "2",
            "--no-progress"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert [m["role"] for m in line["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) for m in line["messages"])
    assert sum(len(m["content"]) for line in lines for m in line["messages"]) > 0  # it did write something
    first = out.read_text()
    assert main(argv) == 2 and "exists; pass --force" in capsys.readouterr().err  # a user's file is kept
    assert main([*argv, "--force"]) == 0 and out.read_text() == first  # seeded: the same chats again
    assert main([*argv[:3], str(tmp_path / "chats.txt"), *argv[4:]]) == 2
    assert "must be a .jsonl file" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp"))

    # a compression calibrated on them: a quarter of the windows are chats, recorded in the manifest
    ckpt = tmp_path / "ckpt"
    assert main([str(tiny_llama), "-o", str(ckpt), "--method", "svd-llm", "--ratio", "0.3", "--calib-text",
                 str(text_file), "--calib-chat", str(out), "--calib-windows", "8", "--seq-len", "16", "--no-progress",
                 "--recover-steps", "2", "--no-eval"]) == 0
    settings = CheckpointReader(ckpt).manifest.settings
    assert settings["calib_chat"] == str(out) and settings["calib_chat_share"] == 0.25


def test_self_chats_are_the_models_own(tiny_llama):
    """Greedy answers: rerunning the answer step on a chat's request gives the stored answer."""
    import torch

    from compress.models import load_model

    model, tok, _ = load_model(str(tiny_llama), torch.float32)
    chats = self_chats(model, tok, 2, max_new_tokens=6, batch_size=2, seed=1, progress=False)
    head, tail = turn_template(tok)
    for c in chats:
        ids = tok(head + c[0]["content"] + tail, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.eos_token_id,
                             eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == c[1]["content"]
