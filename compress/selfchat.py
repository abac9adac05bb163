"""The model's own chats, as calibration data for an instruct model (``soco-compress selfchat``).

An instruct model compressed and recovered on plain text alone loses its chat behaviour first: the
chat template's special tokens and the turns around them never occur in the calibration windows,
so neither the whitening nor recovery sees the activations a chat request produces. Chat data
puts them into calibration (``--calib-chat``; how much that brings back is measured in
docs/results.md, Chat calibration); where none is at hand, the dense model writes its own. From
the chat template's opening of a user turn it samples a request (the model's idea of what users
ask it), then answers it greedily; the pair is one chat. No outside text enters, so nothing about the
evaluation or the demo's questions can leak into calibration.

Generation holds the whole dense model in memory (it is autoregressive: every token passes every
layer), so it is for models that fit; for larger ones give ``--calib-chat`` a chat dataset (the
same ``{"messages": [...]}`` lines llm-compressor calibrates on).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import DataError

SENTINEL = "\x00"  # stands for the user's text in the rendered template; never a model's output


def turn_template(tokenizer) -> tuple[str, str]:
    """The rendered chat up to the user's text, and from it to the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the model's tokenizer has no chat template: self-chat is for instruct models")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
    if rendered.count(SENTINEL) != 1:
        raise DataError("the model's chat template does not render a user message verbatim")
    head, tail = rendered.split(SENTINEL)
    return head, tail


def end_of_turn(tokenizer) -> int | None:
    """The token the chat template closes a turn with (ChatML's ``<|im_end|>``, Gemma's
    ``<end_of_turn>``, Llama-3's ``<|eot_id|>``), read from the template itself: the first token
    it renders after an assistant's text. ``None`` where the template closes turns with nothing."""
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": SENTINEL}]
    rendered = tokenizer.apply_chat_template(turn, tokenize=False)
    after = rendered.split(SENTINEL, 1)[1].lstrip() if rendered.count(SENTINEL) == 1 else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids else None


@torch.no_grad()
def self_chats(model, tokenizer, n: int, max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0,
               progress: bool = True) -> list[list[dict[str, str]]]:
    """``n`` chats of one request (sampled, temperature 1, top-p 0.95, at most ``max_new_tokens //
    2`` tokens) and its greedy answer (at most ``max_new_tokens``), seeded."""
    head, tail = turn_template(tokenizer)
    end = list(dict.fromkeys(t for t in (tokenizer.eos_token_id, end_of_turn(tokenizer)) if t is not None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end[0]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    gen = dict(eos_token_id=end, pad_token_id=pad)
    torch.manual_seed(seed)  # generate() samples from the global generator
    chats: list[list[dict[str, str]]] = []
    try:
        for b in tqdm(range(0, n, batch_size), desc="self-chat", unit="batch", disable=not progress):
            k = min(batch_size, n - b)
            enc = tokenizer([head] * k, return_tensors="pt", add_special_tokens=False).to(device)
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95,
                                 max_new_tokens=max(max_new_tokens // 2, 1), **gen)
            asks = [tokenizer.decode(r[enc.input_ids.shape[1]:], skip_special_tokens=True).strip() for r in out]
            enc = tokenizer([head + q + tail for q in asks], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, **gen)
            for q, r in zip(asks, out):
                a = tokenizer.decode(r[enc.input_ids.shape[1]:], skip_special_tokens=True).strip()
                chats.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    finally:
        tokenizer.padding_side = side
    return chats


def write_chats(chats: list[list[dict[str, str]]], path: Path, force: bool = False) -> None:
    """One ``{"messages": [...]}`` per line, written atomically (a killed run leaves no file)."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for c in chats:
                f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
