"""Training checkpoints in safetensors: model, optimizer and scheduler state, RNG, step — written as one
directory atomically (a crash mid-save leaves the previous checkpoint, never half of a new one), and
checked on load (the recipe fingerprint must match; the files must read back).

    out/train/NAME/checkpoints/step-000500/
        model/               a looplm dir (config.json + model.safetensors): `looplm.load` reads it
        optimizer.safetensors
        state.json           step, phase, recipe fingerprint, optimizer param groups, scheduler, RNG
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, _write_dir_atomically, save

STEP_DIR = re.compile(r"^step-(\d{6,})$")


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
                    tokenizer=None, keep: int = 2) -> Path:
    """Write checkpoints/step-NNNNNN atomically, then drop all but the newest `keep`."""
    path = root / "checkpoints" / f"step-{step:06d}"
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer.state_dict())
    rng = {"torch_rng": torch.get_rng_state()}

    def write(tmp: Path) -> None:
        save(model, tmp / "model")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        full = {**state, "step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
        (tmp / "state.json").write_text(json.dumps(full, indent=1) + "\n")

    _write_dir_atomically(path, write)
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


def read_checkpoint(path: Path, *, fingerprint: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(state, model tensors, optimizer state dict) of a checkpoint, after checking it belongs to this recipe."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable training state ({e})") from None
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was written by a different recipe (fingerprint {state.get('fingerprint')} vs this recipe's "
            f"{fingerprint}): model, data, loops, loss or optimizer settings changed. Use another output_dir, "
            "or pass --fresh to start over"
        )
    tensors = {}
    for name in ("optimizer", "rng"):
        try:
            with safe_open(str(path / f"{name}.safetensors"), framework="pt") as f:
                tensors[name] = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path / name}.safetensors: unreadable ({e})") from None
    optim = optimizer_from_tensors(tensors["optimizer"], state["optimizer"])
    return state, tensors["rng"], optim
