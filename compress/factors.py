"""What a method produces for a group of layers: manifest entries and the tensors behind them.

One type, shared by every method, the pipeline and the benchmarks, so that nothing downstream
knows which method made a checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from soco_serve.layout import BasisEntry, LinearEntry


@dataclass
class Decomposition:
    """The manifest's linear part for some layers, and their tensors (checkpoint names)."""

    linears: dict[str, LinearEntry] = field(default_factory=dict)
    bases: dict[str, BasisEntry] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    damping: dict[str, float] = field(default_factory=dict)  # site -> ridge used, where one was needed
    log: dict[str, Any] = field(default_factory=dict)  # method-specific report (soco: training log)
    recovery: dict[str, Any] = field(default_factory=dict)  # first layer of a group -> its recovery log

    def update(self, other: "Decomposition") -> None:
        """Add another group's entries and tensors (groups never share a name)."""
        clash = (set(self.linears) & set(other.linears)) | (set(self.tensors) & set(other.tensors))
        if clash:
            raise ValueError(f"two groups produced the same entries: {sorted(clash)[:5]}")
        self.linears.update(other.linears)
        self.bases.update(other.bases)
        self.tensors.update(other.tensors)
        self.damping.update(other.damping)
        self.log.update(other.log)
        self.recovery.update(other.recovery)

    def meta_json(self) -> str:
        """Everything but the tensors, as JSON (stored beside a group's tensors while a run is under way)."""
        return json.dumps({"linears": {k: asdict(v) for k, v in self.linears.items()},
                           "bases": {k: asdict(v) for k, v in self.bases.items()},
                           "damping": self.damping, "log": self.log, "recovery": self.recovery})

    @classmethod
    def from_meta_json(cls, text: str, tensors: dict[str, torch.Tensor]) -> "Decomposition":
        d = json.loads(text)
        return cls({k: LinearEntry(**v) for k, v in d["linears"].items()},
                   {k: BasisEntry(**v) for k, v in d["bases"].items()}, tensors, d["damping"], d["log"], d["recovery"])
