"""What looplm may write over: never a path it did not write (issue 12).

The rule, for every command that saves (`looplm.save`, `retrofit --save`, `train`, `eval --out`,
`demo --out`, recipes/bundle.py):

    absent path, or an empty dir   created (nothing there to lose)
    a looplm checkpoint dir        replaced (config.json says model_type "looplm" and the dir holds
                                   nothing but files looplm writes there: a model card of yours stops it)
    an output dir of the command   written into: it holds only what the same command writes there
                                   (train: checkpoints/, log.jsonl, recipe.json, model/; demo: demo.json
                                   and demo.png; eval: run JSONs, report.md, plots, .cache/)
    anything else                  refused with an error naming the path, unless overwrite=True
                                   (--overwrite): a checkpoint path is then replaced whole, an output dir
                                   is written into (files of other names in it are kept; a file at its
                                   path is replaced by the dir)

A file where a dir is wanted is never "ours". Checks look only at names and small JSON files, so they
cost nothing next to a save; they run before anything is loaded or written, so a refused command
touches nothing.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Callable

# What a looplm checkpoint dir holds: looplm.save (weights, config, tokenizer files it copies, the task
# card), transformers' save_pretrained of a LoopLMForCausalLM (sharded weights) and of a tokenizer.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                    "looplm_task.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt")


class OutputExistsError(ValueError):
    """A save would replace or write into a path looplm did not write (and overwrite was not given)."""


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def holds_only(path: Path, patterns: tuple[str, ...]) -> bool:
    """A dir (or a link to one) whose every entry's name matches one of the patterns (temp files of an
    atomic write, `.NAME.….tmp`, included)."""
    if not path.is_dir():
        return False
    return all(_matches(p.name, patterns) or (p.name.startswith(".") and p.name.endswith(".tmp"))
               for p in path.iterdir())


def is_looplm_checkpoint(path: Path, *, also: tuple[str, ...] = ()) -> bool:
    """A dir looplm.save (or the trainer) wrote: model_type "looplm" and only the files such a dir holds
    (and `also`: the bundled model's hand-written card, which recipes/bundle.py keeps)."""
    path = Path(path)
    config = _json(path / "config.json")
    return bool(config) and config.get("model_type") == "looplm" and holds_only(path, CHECKPOINT_FILES + also)


def is_training_dir(path: Path) -> bool:
    """An output_dir of `looplm train`: checkpoints/, log.jsonl, recipe.json, model/ (a looplm checkpoint)."""
    path = Path(path)
    if not holds_only(path, ("checkpoints", "log.jsonl", "recipe.json", "model", ".model.*")):
        return False
    recipe = path / "recipe.json"
    if recipe.exists() and "fingerprint" not in (_json(recipe) or {}):
        return False
    if (path / "model").exists() and not is_looplm_checkpoint(path / "model"):
        return False
    ckpts = path / "checkpoints"
    return not ckpts.exists() or holds_only(ckpts, ("step-*", ".step-*"))


def is_demo_output(path: Path) -> bool:
    """An --out dir of `looplm demo`: demo.json (a demo result) and demo.png."""
    path = Path(path)
    if not holds_only(path, ("demo.json", "demo.png")):
        return False
    return not (path / "demo.json").exists() or "problems_per_difficulty" in (_json(path / "demo.json") or {})


def is_eval_output(path: Path) -> bool:
    """A task dir under `looplm eval --out`: run JSONs, report.md, plots and the resumable cache (.cache/)."""
    path = Path(path)
    if not holds_only(path, ("*.json", "*.png", "report.md", ".cache")):
        return False
    runs = list(path.glob("*.json"))
    if (path / "refusal.json").exists():  # `--task refusal` writes refusal.json and its plots
        return "probe_accuracy_by_loop" in (_json(path / "refusal.json") or {}) and len(runs) == 1
    # a run JSON or the cache of one marks an eval's dir: a report.md or plots alone may be anyone's
    return (bool(runs) or (path / ".cache").is_dir()) and all({"schema", "config", "items"} <= set(_json(p) or {})
                                                              for p in runs)


def check_output(path: str | Path, *, ours: Callable[[Path], bool], what: str, overwrite: bool) -> Path:
    """Raise OutputExistsError (naming the path) unless `path` is absent, `ours(path)`, or overwrite.

    what: what looplm writes there ("a looplm checkpoint", "a demo output dir"), for the message. Also
    refuses a path under a file (its parent dirs cannot be made)."""
    path = Path(path).expanduser()
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputExistsError(f"{parent} is a file, so {path} cannot be written")
            break
    if overwrite or not (path.exists() or path.is_symlink()) or is_empty_dir(path) or ours(path):
        return path
    if not path.is_dir():
        kind = "a broken link" if not path.exists() else "a file"
        found = f"{path} is {kind}, not {what}"
    else:
        names = sorted(p.name for p in path.iterdir())
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        found = f"{path} exists and is not {what} (it holds {shown})"
    raise OutputExistsError(f"{found}; looplm writes over only what it wrote there. Choose another path, "
                            "or pass --overwrite (overwrite=True) to write there anyway")


def prepare_output_dir(path: str | Path, *, ours: Callable[[Path], bool], what: str, overwrite: bool) -> Path:
    """check_output, then make the dir (with overwrite, a file or link at the path is removed first)."""
    path = check_output(path, ours=ours, what=what, overwrite=overwrite)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path
