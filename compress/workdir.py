"""A run's work folder: what a killed run keeps so that running it again continues it.

It lives beside the output, ``.<output name>.soco-work``, and holds:

* ``run.json``: the run's settings and the source model's hash; once a group (or a whole-model
  statistic) is finished, a rerun with other settings or another model is refused, naming the
  field (or the work is discarded with ``--restart``);
* ``group-GGGGG-rK.safetensors``: the finished group ``G``'s tensors for ratio ``K``, with its
  manifest entries in the file's metadata;
* ``state-GGGGG.safetensors``: the activations after group ``G`` (every stream the pipeline
  carries), which the next group starts from;
* ``stats-NAME.safetensors``: whole-model statistics computed before the group loop (fwsvd's).

Every file is written to a temporary name and renamed, so a file that exists is complete, and a
group counts as finished only once its state file exists. The output folder itself appears only
when the checkpoint is complete (:class:`soco_serve.layout.CheckpointWriter`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .factors import Decomposition


class RunStateError(ValueError):
    """The unfinished run in the work folder cannot be continued with these settings."""


class DiskFullError(OSError):
    """A write ran out of space; what was finished before it is kept."""


def work_dir_for(output: Path) -> Path:
    return output.parent / f".{output.name}.soco-work"


@contextmanager
def disk_full_is_resumable(path: Path) -> Iterator[None]:
    """An ENOSPC while writing ``path`` becomes a :class:`DiskFullError` that says what to do."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"no space left on the device writing {path}; free some space and run "
                                              "the same command again: finished groups are kept") from exc
        raise


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with disk_full_is_resumable(path):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata or {}))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


class WorkDir:
    """The work folder of one output (module docstring)."""

    def __init__(self, output: Path, settings: dict[str, Any], source_sha256: str, restart: bool = False):
        self.path = work_dir_for(output)
        run = {"settings": settings, "source_sha256": source_sha256}
        meta = self.path / "run.json"
        kept = meta.is_file() and any(p.name.startswith(("state-", "stats-")) for p in self.path.iterdir())
        if kept and not restart:
            old = json.loads(meta.read_text())
            if old.get("source_sha256") != source_sha256:
                raise RunStateError(
                    f"{self.path}: an unfinished run of another model is there (weights sha256 "
                    f"{str(old.get('source_sha256'))[:16]}…, this model {source_sha256[:16]}…); pass --restart "
                    "to discard it")
            differ = {k: (old["settings"].get(k), v) for k, v in json.loads(json.dumps(settings)).items()
                      if old["settings"].get(k) != v}
            if differ:
                k, (was, now) = next(iter(differ.items()))
                raise RunStateError(
                    f"{self.path}: an unfinished run with other settings is there (setting {k!r}: {was!r} there, "
                    f"{now!r} now{' and more' if len(differ) > 1 else ''}); run with the same settings to continue it, "
                    "or pass --restart to discard it")
        elif self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not meta.is_file():
            _atomic(meta, lambda tmp: tmp.write_text(json.dumps(run, indent=2) + "\n"))

    # -- groups -------------------------------------------------------------------------------
    def _group(self, g: int, k: int) -> Path:
        return self.path / f"group-{g:05d}-r{k}.safetensors"

    def _state(self, g: int) -> Path:
        return self.path / f"state-{g:05d}.safetensors"

    def finished_groups(self, n_ratios: int) -> int:
        """How many groups are finished (their state and every ratio's tensors are on disk)."""
        states = [int(p.name[len("state-"):-len(".safetensors")]) for p in self.path.glob("state-*.safetensors")]
        for g in sorted(states, reverse=True):  # only the latest state is kept; its groups must all be there
            if all(self._group(i, k).is_file() for i in range(g + 1) for k in range(n_ratios)):
                return g + 1
        return 0

    def save_group(self, g: int, decs: list[Decomposition], state: dict[str, torch.Tensor]) -> None:
        for k, dec in enumerate(decs):
            save_tensors(self._group(g, k), dec.tensors, {"decomposition": dec.meta_json()})
        save_tensors(self._state(g), state)
        if g > 0:
            self._state(g - 1).unlink(missing_ok=True)  # only the latest state is needed to continue

    def load_group(self, g: int, k: int) -> Decomposition:
        tensors, meta = load_tensors(self._group(g, k))
        return Decomposition.from_meta_json(meta["decomposition"], tensors)

    def load_state(self, g: int) -> dict[str, torch.Tensor]:
        return load_tensors(self._state(g))[0]

    # -- whole-model statistics ---------------------------------------------------------------
    def stats_path(self, name: str) -> Path:
        return self.path / f"stats-{name}.safetensors"

    def scratch(self, name: str) -> Path:
        p = self.path / "scratch" / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
