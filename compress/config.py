"""The compressor's settings: one dataclass, checked once, read by every stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from soco_serve.layout import DEFAULT_MAX_SHARD_BYTES

from . import allocate, methods, soco
from .models import DEFAULT_SHARED_KINDS
from .recover import DEFAULT_STEPS, RecoverConfig, split_holdout


# Fields that change neither the checkpoint nor the run's intermediate results: a run may be
# resumed with other values of these.
RUNTIME_FIELDS = ("output", "force", "restart", "progress", "max_shard_bytes", "device", "activations",
                  "soco_offload")


@dataclass
class CompressConfig:
    output: Path
    model: str | None = None
    method: str = methods.DEFAULT
    ratio: float = 0.3
    ratios: tuple[float, ...] = ()  # soco only: several checkpoints from one training run (ratio = the smallest)
    group_size: int = 2
    shared_types: tuple[str, ...] = DEFAULT_SHARED_KINDS
    # auto: refit whenever the model is compressed (not at --full-rank, whose factors are exact);
    # on: also at full rank; off: never (the paper's released code).
    coefficient_update: str = "auto"
    asvd_alpha: float = 0.5  # ASVD's exponent on the mean absolute activation (the paper's default)
    force_factorize: bool = False
    full_rank: bool = False
    dtype: str = "auto"
    calib_text: str | None = None
    calib_windows: int = 64  # basis-sharing needs this many to beat svd-llm (docs/results.md)
    # chats (a .jsonl of {"messages": [...]}, or data.ARTICLE_CHATS), rendered with the model's chat
    # template, that make up calib_chat_share of the calibration windows: an instruct model calibrated
    # and recovered on plain text alone stops answering in its chat format (docs/results.md, Chat calibration)
    calib_chat: str | None = None
    calib_chat_share: float = 0.25
    seq_len: int = 512
    batch_size: int = 4
    seed: int = 0
    evaluate: bool = True
    eval_text: str | None = None
    eval_windows: int = 32
    force: bool = False
    restart: bool = False  # discard an unfinished run of other settings instead of refusing
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    device: str = "cpu"
    activations: str = "device"  # where the activations wait between layers: device | cpu | disk
    # soco's training: "on" onloads each group of layers for each use, "off" holds them all, "auto"
    # holds them when they fit (soco.Stack.fits); the checkpoint is the same either way (tested)
    soco_offload: str = "auto"
    progress: bool = True
    soco: soco.SocoConfig = field(default_factory=soco.SocoConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        m = methods.get(self.method)
        if self.coefficient_update not in ("auto", "on", "off"):
            raise ValueError(f"--coefficient-update must be auto, on or off, got {self.coefficient_update!r}")
        if self.activations not in ("device", "cpu", "disk"):
            raise ValueError(f"--activations must be device, cpu or disk, got {self.activations!r}")
        if self.soco_offload not in ("auto", "on", "off"):
            raise ValueError(f"--soco-offload must be auto, on or off, got {self.soco_offload!r}")
        if self.ratios:
            self.ratios = tuple(float(r) for r in self.ratios)
            if len(self.ratios) > 1 and not m.several_ratios:
                raise ValueError(f"several ratios {list(self.ratios)} from one run need --method soco; "
                                 f"run {self.method} once per ratio")
            for r in self.ratios:
                allocate.check_ratio(r)
            self.ratio = min(self.ratios)
        if self.calib_chat is not None:
            if not 0 < self.calib_chat_share < 1:
                raise ValueError(f"--calib-chat-share must be between 0 and 1, got {self.calib_chat_share}")
            if round(self.calib_chat_share * self.calib_windows) in (0, self.calib_windows):
                raise ValueError(f"--calib-chat-share {self.calib_chat_share} of {self.calib_windows} calibration "
                                 "windows leaves no chat window or no text window")
        m.check(self)
        self.recover.check()
        if self.recover.steps is None:  # auto: on, but not where the factors are exact or several checkpoints come out
            off = self.full_rank or len(self.ratio_list) > 1
            self.recover = replace(self.recover, steps=0 if off else DEFAULT_STEPS)
        if self.recover.steps and len(self.ratio_list) > 1:
            raise ValueError(f"--recover-steps trains one checkpoint; run once per ratio instead of {list(self.ratios)}")
        if self.recover.steps:  # one batch at least is held out, one at least trained on
            split_holdout(-(-self.calib_windows // self.batch_size), self.recover.holdout)
        if not self.full_rank:
            allocate.check_ratio(self.ratio)
        if not m.shares_bases:
            self.group_size = 1

    @property
    def method_impl(self) -> methods.Method:
        return methods.get(self.method)

    @property
    def ratio_list(self) -> list[float]:
        return list(self.ratios) if self.ratios else [self.ratio]

    @property
    def refit(self) -> bool:
        return self.method_impl.refits(self)

    def settings(self) -> dict[str, Any]:
        """What the manifest records: the settings that shaped the checkpoint."""
        d = asdict(self)
        for k in (*RUNTIME_FIELDS, "evaluate", "eval_text", "eval_windows", "model", "ratios"):
            d.pop(k)
        if self.calib_chat is None:  # as written before chats existed, so older work folders resume
            d.pop("calib_chat")
            d.pop("calib_chat_share")
        m = self.method_impl
        for k in methods.foreign_settings(m):
            d.pop(k)
        shares = m.shares_bases and self.group_size > 1
        d["shared_types"] = list(self.shared_types) if shares else []
        d["coefficient_update"] = self.refit
        return d

    def run_settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (everything but the runtime fields)."""
        d = asdict(self)
        for k in RUNTIME_FIELDS:
            d.pop(k)
        d["ratios"] = self.ratio_list
        d["shared_types"] = list(self.shared_types)
        return d
