"""Perplexity as the SVD-LLM and Basis Sharing papers measure it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class Perplexity:
    ppl: float
    tokens: int  # predicted tokens: (seq_len − 1) per window
    windows: int


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 2, progress: bool = True,
               desc: str = "evaluate") -> Perplexity:
    """``exp`` of the mean next-token loss over non-overlapping windows ``[n, seq_len]``.

    The loss is summed in float64 per token, so the result does not depend on the batch size.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in tqdm(torch.split(windows, batch_size), desc=desc, unit="batch", disable=not progress):
        b = b.to(device)
        logits = model(input_ids=b, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            return Perplexity(float("inf"), count, windows.shape[0])
        total += float(nll.double())
        count += b[:, 1:].numel()
    return Perplexity(math.exp(total / count), count, windows.shape[0])
