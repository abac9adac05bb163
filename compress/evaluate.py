"""Perplexity as the SVD-LLM and Basis Sharing papers measure it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

BATCH_SIZE = 2  # evaluation windows per forward pass


@dataclass
class Perplexity:
    ppl: float
    tokens: int  # predicted tokens: (seq_len − 1) per window
    windows: int


class NllSum:
    """Summed next-token loss, in float64 per token, so the result does not depend on how the
    windows are batched or their positions sliced."""

    def __init__(self) -> None:
        self.total, self.count, self.finite = 0.0, 0, True

    def add(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """Windows ``ids`` and their logits: each position predicts the next token."""
        self.add_targets(logits[:, :-1], ids[:, 1:])

    def add_targets(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Logits and the tokens they predict, aligned (a slice of positions of some windows)."""
        logits, target = logits.float(), target.to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").double().sum()
        self.finite = self.finite and bool(torch.isfinite(nll))
        if self.finite:
            self.total += float(nll)
        self.count += target.numel()

    def result(self, windows: int) -> Perplexity:
        mean = self.total / self.count if self.finite else math.inf
        return Perplexity(math.exp(mean) if mean < 700 else math.inf, self.count, windows)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = BATCH_SIZE, progress: bool = True,
               desc: str = "evaluate") -> Perplexity:
    """``exp`` of the mean next-token loss over non-overlapping windows ``[n, seq_len]``."""
    device = next(model.parameters()).device
    acc = NllSum()
    for b in tqdm(torch.split(windows, batch_size), desc=desc, unit="batch", disable=not progress):
        acc.add(model(input_ids=b.to(device), use_cache=False).logits, b)
    return acc.result(windows.shape[0])
