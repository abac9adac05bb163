"""Calibration and evaluation text, and the token windows cut from it.

The default text is the Wikipedia sample shipped in the ``gensim`` wheel (CC BY-SA 3.0), cleaned
of markup with ``mwparserfromhell``. Its split is fixed: articles in dump order, every fifth
article (index 0, 5, 10, ...) is evaluation text, the others calibration text. So the two parts
are disjoint by article and both span the whole dump.

Perplexity follows the SVD-LLM / Basis Sharing protocol: the evaluation text is tokenized as one
stream and cut into non-overlapping windows of ``seq_len`` tokens; a window starts as the
tokenizer starts any text (a BOS where it adds one, :func:`window_prefix`). Calibration, as in those papers,
takes random ``seq_len`` windows of the calibration stream (seeded).
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path

import torch

from .models import cache_dir

WIKI_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EVAL_EVERY = 5  # article i is evaluation text iff i % EVAL_EVERY == 0
ARTICLE_SEPARATOR = "\n\n"
SPLITS = ("calibration", "evaluation")


class DataError(ValueError):
    """Calibration or evaluation text is missing, unreadable or too short."""


def _clean_wiki(markup: str) -> str:
    import mwparserfromhell

    text = mwparserfromhell.parse(markup).strip_code(normalize=True, collapse=True)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return re.sub(r"[ \t]+", " ", text).strip()


def wiki_articles() -> list[str]:
    """The cleaned articles of gensim's Wikipedia sample, cached as JSON after the first call."""
    cached = cache_dir() / "wiki_sample_articles.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise DataError("the default text needs the 'gensim' package (pip install gensim==4.4.0)")
    dump = Path(spec.origin).parent / WIKI_SAMPLE
    if not dump.is_file():
        raise DataError(f"{dump}: gensim's Wikipedia sample is missing from this gensim install")
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(dump, "rb") as f:
        for title, markup, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wiki(markup)
            if len(text) > 200:
                articles.append(f"{title}\n\n{text}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(articles, f)
    os.replace(tmp, cached)
    return articles


def default_text(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    arts = wiki_articles()
    keep = [a for i, a in enumerate(arts) if (i % EVAL_EVERY == 0) == (split == "evaluation")]
    return ARTICLE_SEPARATOR.join(keep)


def pydoc_text() -> str:
    """Python's own reference documentation (``pydoc_data.topics``, shipped with every CPython):
    English technical prose with code, another domain than the Wikipedia sample, so that a gain
    from calibrating on Wikipedia is not mistaken for a better model. Topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(source: str | None, split: str) -> str:
    """Text for ``split`` from the default sample (None), a .txt / .jsonl file, ``pydoc`` or ``wikitext2``."""
    if source is None:
        return default_text(split)
    if source == "pydoc":
        return pydoc_text()
    if source == "wikitext2":
        try:
            from datasets import load_dataset
        except ImportError as exc:
            raise DataError("'wikitext2' needs the 'datasets' package and a reachable hub") from exc
        hf_split = "test" if split == "evaluation" else "train"
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
        return "\n\n".join(ds["text"])
    p = Path(source)
    if not p.is_file():
        raise DataError(f"{p}: text file not found")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: unreadable text file ({exc})") from exc
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{p}:{n}: expected a JSON object with a 'text' field ({exc})") from exc
        raw = ARTICLE_SEPARATOR.join(texts)
    if not raw.strip():
        raise DataError(f"{p}: text file is empty")
    return raw


ARTICLE_CHATS = "articles"  # --calib-chat keyword: chats made from the default text's calibration articles
ARTICLE_ANSWER_CHARS = (500, 1500)  # an article chat's answer: its body's first 1500 characters, cut back
# to their last line break where that leaves more than 500


def article_chats() -> list[list[dict[str, str]]]:
    """Chats made from the default text's calibration articles, with no generation: each article's
    opening as the assistant's answer to "Tell me about TITLE.".

    What an instruct model loses first when calibrated on plain text is the chat format (the
    template's special tokens and turns never occur in the windows); these chats put it back at no
    cost, where :mod:`compress.selfchat` needs the whole model to generate. The answers are the
    calibration split's own text, so no evaluation article enters calibration.
    """
    lo, hi = ARTICLE_ANSWER_CHARS
    chats = []
    for i, article in enumerate(wiki_articles()):
        if i % EVAL_EVERY == 0:
            continue
        title, _, body = article.partition(ARTICLE_SEPARATOR)
        answer = body[:hi]
        if (cut := answer.rfind("\n")) > lo:
            answer = answer[:cut].rstrip()
        chats.append([{"role": "user", "content": f"Tell me about {title}."},
                      {"role": "assistant", "content": answer}])
    return chats


def read_chats(path: str) -> list[list[dict[str, str]]]:
    """The chats of a ``.jsonl`` file, one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per
    line: the format of chat datasets (llm-compressor calibrates on the same) and of
    :mod:`compress.selfchat`."""
    p = Path(path)
    if p.suffix != ".jsonl" or not p.is_file():
        raise DataError(f"{p}: expected a .jsonl file of chats, one {{\"messages\": [...]}} per line, "
                        f"or '{ARTICLE_CHATS}'")
    chats = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            if not (isinstance(messages, list) and messages
                    and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)):
                raise TypeError("'messages' must be a non-empty list of {'role', 'content'} objects")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{p}:{n}: expected a JSON object with a 'messages' list ({exc})") from exc
        chats.append(messages)
    if not chats:
        raise DataError(f"{p}: no chats in the file")
    return chats


def load_chats(source: str, tokenizer) -> str:
    """The chats of ``source`` (a ``.jsonl`` file, :func:`read_chats`, or ``articles``,
    :func:`article_chats`), each rendered with the tokenizer's own chat template and joined: the
    text an instruct model reads when served through a chat API, special tokens included."""
    chats = article_chats() if source == ARTICLE_CHATS else read_chats(source)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: the model's tokenizer has no chat template to render these chats with")
    return ARTICLE_SEPARATOR.join(tokenizer.apply_chat_template(m, tokenize=False) for m in chats)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token stream (1-D int64), without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def window_prefix(tokenizer) -> tuple[int, ...]:
    """The special tokens the tokenizer puts before any text (Gemma's BOS; none for many others).

    Asked of the tokenizer, not assumed from the architecture: a model trained with a BOS at the
    start of every sequence (Gemma's perplexity is far off without it) gets it at the start of
    every window, and a model trained without gets none.
    """
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return tuple(full[:k])
    raise DataError(f"the tokenizer encodes 'x' as {full} with special tokens and {plain} without: "
                    "cannot tell which tokens it puts before a text")


def _prefixed(body: torch.Tensor, prefix: tuple[int, ...]) -> torch.Tensor:
    head = torch.tensor(prefix, dtype=body.dtype).expand(body.shape[0], len(prefix))
    return torch.cat([head, body], dim=1)


def _body_len(seq_len: int, prefix: tuple[int, ...], what: str) -> int:
    if seq_len <= len(prefix) + 1:
        raise DataError(f"{what} windows of {seq_len} tokens leave no text after the tokenizer's prefix {list(prefix)}")
    return seq_len - len(prefix)


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The rows of ``a`` and ``b`` merged, each kept in order and spread evenly over the result:
    any contiguous run of batches (recovery's held-out tail, say) holds both kinds in about
    their overall proportion."""
    key = torch.cat([(torch.arange(len(a)) + 0.5) / len(a), (torch.arange(len(b)) + 0.5) / max(len(b), 1)])
    return torch.cat([a, b])[torch.sort(key, stable=True).indices]


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int = 0, what: str = "evaluation",
                 prefix: tuple[int, ...] = ()) -> torch.Tensor:
    """Non-overlapping windows from the start of the stream, ``[n, seq_len]`` (0 = all windows),
    each the ``prefix`` tokens then ``seq_len - len(prefix)`` tokens of text."""
    body = _body_len(seq_len, prefix, what)
    n = tokens.numel() // body
    if n == 0:
        raise DataError(f"{what} text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows:
        n = min(n, max_windows)
    return _prefixed(tokens[: n * body].view(n, body), prefix)


def text_eval_windows(tokenizer, src: str | None, seq_len: int, max_windows: int = 0) -> torch.Tensor:
    """:func:`eval_windows` of an evaluation text (``src`` as :func:`load_text` takes it), each
    window starting as the tokenizer starts a text (:func:`window_prefix`)."""
    return eval_windows(tokenize_stream(tokenizer, load_text(src, "evaluation")), seq_len, max_windows,
                        prefix=window_prefix(tokenizer))


def calibration_windows(tokens: torch.Tensor, seq_len: int, n_windows: int, seed: int = 0,
                        prefix: tuple[int, ...] = (), what: str = "calibration text") -> torch.Tensor:
    """``n_windows`` random windows of ``seq_len`` tokens (seeded), ``[n, seq_len]``, each the
    ``prefix`` tokens then text."""
    if n_windows < 1:
        raise DataError(f"calibration needs at least one window, got n_windows={n_windows}")
    body = _body_len(seq_len, prefix, "calibration")
    if tokens.numel() < body + 1:
        raise DataError(
            f"{what} has {tokens.numel()} tokens, fewer than one window of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - body, (n_windows,), generator=g)
    return _prefixed(torch.stack([tokens[s : s + body] for s in starts.tolist()]), prefix)
