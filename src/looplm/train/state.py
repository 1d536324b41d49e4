"""Training checkpoints in safetensors: model, optimizer and scheduler state, RNG, step — written as one
directory atomically (a crash mid-save leaves the previous checkpoint, never half of a new one), and
checked on load (the recipe fingerprint must match; every file must hash as written, so a truncated or
altered checkpoint is found and resume falls back to the one before it).

    out/train/NAME/checkpoints/step-000500/
        model/               a looplm dir (config.json + model.safetensors): `looplm.load` reads it
        optimizer.safetensors
        rng.safetensors
        state.json           step, phase, recipe fingerprint, optimizer param groups, scheduler, the
                             SHA-256 of every other file
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, _write_dir_atomically, load, save
from ..model import LoopedLM
from ..outputs import holds_only

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STEP_FILES = ("model", "optimizer.safetensors", "rng.safetensors", "state.json")


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files do not read back as they were written (truncated, altered, missing)."""


def optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and the JSON-able rest."""
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: Path, step: int, *, model, optimizer, scheduler, state: dict[str, Any],
                    tokenizer=None, task: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write checkpoints/step-NNNNNN atomically, then drop all but the newest `keep`."""
    path = root / "checkpoints" / f"step-{step:06d}"
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer.state_dict())
    rng = {"torch_rng": torch.get_rng_state()}

    def write(tmp: Path) -> None:
        save(model, tmp / "model", tokenizer=tokenizer, task=task)  # a looplm dir the demo runs too
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        full = {**state, "step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                "files": file_hashes(tmp)}
        (tmp / "state.json").write_text(json.dumps(full, indent=1) + "\n")

    _write_dir_atomically(path, write, may_replace=lambda p: holds_only(p, STEP_FILES), what="a training checkpoint")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root/checkpoints, oldest first (temp dirs of an interrupted save are skipped)."""
    d = root / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under root but state.json, by path relative to root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "state.json":
            h = hashlib.sha256()
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out


def read_checkpoint(path: Path, *, fingerprint: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(state, RNG tensors, optimizer state dict) of a checkpoint, after checking it belongs to this recipe
    and that its files hash as written (CorruptCheckpoint otherwise)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable training state ({e})") from None
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was written by a different recipe (fingerprint {state.get('fingerprint')} vs this recipe's "
            f"{fingerprint}): model, data, loops, loss or optimizer settings changed. Use another output_dir, "
            "or pass --fresh to start over"
        )
    if "files" in state:  # checkpoints before issue 12 carry no hashes: their files are only read
        found = file_hashes(path)
        bad = sorted(k for k in state["files"].keys() | found.keys() if state["files"].get(k) != found.get(k))
        if bad:
            raise CorruptCheckpoint(f"{path}: {', '.join(bad[:3])} {'do' if len(bad) > 1 else 'does'} not match "
                                    "what was written (altered, truncated or missing)")
    tensors = {}
    for name in ("optimizer", "rng"):
        try:
            with safe_open(str(path / f"{name}.safetensors"), framework="pt") as f:
                tensors[name] = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CorruptCheckpoint(f"{path / name}.safetensors: unreadable ({e})") from None
    optim = optimizer_from_tensors(tensors["optimizer"], state["optimizer"])
    return state, tensors["rng"], optim


def load_checkpoint(path: Path, *, fingerprint: str) -> tuple[LoopedLM, dict[str, Any], dict[str, torch.Tensor],
                                                                dict[str, Any]]:
    """(model, state, RNG tensors, optimizer state dict); CorruptCheckpoint when a file does not read back."""
    state, rng, optim = read_checkpoint(path, fingerprint=fingerprint)
    try:
        model = load(path / "model")
    except CheckpointError as e:
        if "files" in state:  # its files hash as written: not corruption, a model this looplm cannot load
            raise
        raise CorruptCheckpoint(str(e)) from None
    return model, state, rng, optim


def set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint to step-NNNNNN.corrupt[.k]: kept for a look, never resumed or pruned."""
    k, aside = 0, path.with_name(f"{path.name}.corrupt")
    while aside.exists():
        k += 1
        aside = path.with_name(f"{path.name}.corrupt.{k}")
    path.rename(aside)
    return aside
