"""Training recipes: one YAML file → typed, validated dataclasses (unknown keys and wrong types are
errors that name the key and the file). `key=value` overrides address nested keys with dots:

    looplm train recipes/chain.yaml train.batch_size=32 phases.0.steps=200 output_dir=out/try

A recipe has a model (LoopConfig fields), a tokenizer, data, training hyper-parameters and a list of
phases; each phase runs `steps` optimizer steps with its own loss (`looplm.train.objective.LossConfig`)
and learning rate, on all weights or on the exit gate alone (Ouro's stage II).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import LoopConfig
from . import synthetic
from .objective import LossConfig

LOOP_SAMPLING = ("fixed", "uniform", "poisson_lognormal")


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | text
    task: str = "chain"  # synthetic: a looplm.train.synthetic task
    difficulties: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    parts: int = 2  # sub-problems per synthetic problem (answers in a row)
    variables: int = 26  # chain: variable names drawn from the first N letters
    digits: int = 1  # chain: digits of each value (the answer's length)
    distractors: int = 2  # chain: extra chains of the same length that are not asked for
    paths: list[str] = field(default_factory=list)  # text: .txt / .jsonl files
    val_paths: list[str] = field(default_factory=list)  # text: held-out files for evaluation
    val_fraction: float = 0.0  # text without val_paths: hold out the last fraction of the blocks
    text_field: str = "text"
    seq_len: int = 64

    def format_options(self) -> dict[str, int]:
        """The synthetic task's format knobs (`synthetic.FORMAT_OPTIONS`) as keyword arguments."""
        return {k: getattr(self, k) for k in synthetic.FORMAT_OPTIONS}

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "text"):
            raise ValueError(f"data.kind={self.kind!r} is not one of ['synthetic', 'text']")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be ≥ 2, got {self.seq_len}")
        if self.kind == "text" and not self.paths:
            raise ValueError("data.kind='text' needs data.paths")


@dataclass
class LoopsConfig:
    """How many loops a step runs: fixed R, or drawn per step (the same on every process)."""

    sampling: str = "fixed"  # fixed | uniform | poisson_lognormal (Huginn)
    num_loops: int = 4  # fixed: R; poisson_lognormal: the mean
    low: int = 1
    high: int = 8
    sigma: float = 0.5
    backprop_loops: int | None = None  # truncated backprop: gradients through the last k loops only

    def __post_init__(self) -> None:
        if self.sampling not in LOOP_SAMPLING:
            raise ValueError(f"loops.sampling={self.sampling!r} is not one of {list(LOOP_SAMPLING)}")
        if self.num_loops < 1 or self.low < 1 or self.high < self.low:
            raise ValueError(f"loops: need num_loops ≥ 1 and 1 ≤ low ≤ high, got {self.num_loops}, {self.low}, {self.high}")
        if self.backprop_loops is not None and self.backprop_loops < 1:
            raise ValueError(f"loops.backprop_loops must be ≥ 1 or null, got {self.backprop_loops}")


@dataclass
class PhaseConfig:
    name: str = "main"
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr × this
    warmup_steps: int = 100
    trainable: str = "all"  # all | gate (stage II: everything but the exit gate frozen)
    loss: LossConfig = field(default_factory=LossConfig)
    difficulties: list[int] | None = None  # synthetic data: this phase's difficulties (a curriculum); None: data's

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"phase {self.name!r}: steps must be ≥ 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"phase {self.name!r}: lr must be > 0, got {self.lr}")
        if self.trainable not in ("all", "gate"):
            raise ValueError(f"phase {self.name!r}: trainable={self.trainable!r} is not 'all' or 'gate'")


@dataclass
class TrainConfig:
    batch_size: int = 64  # global batch (all processes, one optimizer step, accumulation included)
    grad_accum: int = 1
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate)
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    log_every: int = 20
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_problems: int = 256  # synthetic: held-out problems per evaluation

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"train.batch_size and train.grad_accum must be ≥ 1, got {self.batch_size}, {self.grad_accum}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision={self.mixed_precision!r} is not one of ['no', 'bf16', 'fp16']")
        for name in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be ≥ 1, got {getattr(self, name)}")


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    output_dir: str = "out/train/run"
    # "synthetic" (looplm's task tokenizer), "default" (SmolLM2's, = Ouro's), or a model dir with tokenizer files
    tokenizer: str = "synthetic"
    init_from: str | None = None  # start from these weights (a looplm dir) instead of random init
    model: dict[str, Any] = field(default_factory=dict)  # LoopConfig fields; vocab_size defaults to the tokenizer's
    data: DataConfig = field(default_factory=DataConfig)
    loops: LoopsConfig = field(default_factory=LoopsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("phases is empty: a recipe trains at least one phase")
        unknown = sorted(set(self.model) - {f.name for f in dataclasses.fields(LoopConfig)})
        if unknown:
            raise ValueError(f"model: unknown LoopConfig keys {unknown}")

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def task_card(self) -> dict[str, Any] | None:
        """looplm_task.json of a model trained on synthetic data (None for text): the task format
        `looplm demo` draws its held-out problems in."""
        d = self.data
        if d.kind != "synthetic":
            return None
        return {"task": d.task, "difficulties": list(d.difficulties), **d.format_options(), "recipe": self.name,
                "seed": self.seed}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A hash of everything that decides the trajectory (not where it is written, how often it logs,
        or how many steps the last phase runs: extending a run resumes it)."""
        d = self.to_dict()
        d.pop("output_dir")
        d["train"] = {k: v for k, v in d["train"].items() if k not in ("log_every", "save_every", "keep_checkpoints",
                                                                        "threads", "eval_every", "eval_problems")}
        d["phases"][-1].pop("steps")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- parsing


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides (values parsed as YAML), validate."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    file_only = copy.deepcopy(raw)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        _check_key(key.split("."), item)
        _set(raw, key.split("."), yaml.safe_load(value), item)
    try:
        return _build(Recipe, raw, "")
    except ValueError as e:
        error = e
    try:  # blame the file when it fails alone, else the overrides
        _build(Recipe, file_only, "")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    raise ValueError(f"{' '.join(overrides or [])}: {error}") from None


def _did_you_mean(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_key(keys: list[str], item: str) -> None:
    """Every dotted key of an override names a field of the schema, so a typo is named with the override
    (`train.batch_sise=64: unknown key 'batch_sise' in train (did you mean batch_size?)`), not blamed
    on the recipe file. List indices and free mappings are left to `_set` and `_build`."""
    tp: Any = Recipe
    for i, k in enumerate(keys):
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
            continue
        if not dataclasses.is_dataclass(tp):
            return
        names = [f.name for f in dataclasses.fields(tp)]
        if k not in names:
            where = ".".join(keys[:i]) or "the recipe"
            raise ValueError(f"{item}: unknown key {k!r} in {where}{_did_you_mean(k, names)}")
        tp = LoopConfig if tp is Recipe and k == "model" else typing.get_type_hints(tp)[k]


def _set(d: Any, keys: list[str], value: Any, item: str) -> None:
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(d, list):
            try:
                idx = int(k)
                d[idx]
            except (ValueError, IndexError):
                raise ValueError(f"override {item!r}: {k!r} is not an index of a list of {len(d)}") from None
            if last:
                d[idx] = value
            else:
                d = d[idx]
        elif isinstance(d, dict):
            if last:
                d[k] = value
            else:
                d = d.setdefault(k, {})
        else:
            raise ValueError(f"override {item!r}: {'.'.join(keys[:i])} is not a mapping")


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{where or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        hint = _did_you_mean(unknown[0], sorted(fields)) if len(unknown) == 1 else ""
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(where + k) for k in unknown)}{hint}")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where or 'recipe'}: {e}") from None


def _coerce(tp, value: Any, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        if origin is dict and not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ValueError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value
