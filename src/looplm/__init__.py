"""looplm: looped language models with per-request compute and memory budgets.

    model = looplm.load(path)                       # Ouro, looplm, or HF Llama-family dir (core=(i, j) to loop a block)
    out = model(input_ids, num_loops=4, return_loops=True)
    res = looplm.generate(model, prompts, max_new_tokens=64, exit="q:0.6", kv="last")
    engine = looplm.Engine(model, kv="last", max_batch_size=32)   # requests join and leave at every step
    looplm.bundled_model_dir()                      # the small looped model that ships with looplm (looplm demo)

`import looplm` imports nothing heavy (not even torch): each public name is imported from its module the
first time it is used (PEP 562), so `import looplm` and `looplm --help` stay fast (issue 12).

`transformers.AutoModelForCausalLM.from_pretrained(looplm_dir)` works once `looplm.hf` is imported:
`import looplm.hf`, or touching `looplm.load`, `looplm.save`, `looplm.LoopLMConfig` or
`looplm.LoopLMForCausalLM`, registers looplm with transformers' Auto classes.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# public name → the module that defines it
_SOURCES = {
    "Engine": "batching", "RequestOutput": "batching",
    "KVCache": "cache",
    "Calibration": "calibrate", "calibrate": "calibrate",
    "CheckpointError": "checkpoint", "default_model_dir": "checkpoint", "load": "checkpoint",
    "load_tokenizer": "checkpoint", "save": "checkpoint",
    "LoopConfig": "config",
    "bundled_model_dir": "demo",
    "GenerateResult": "engine", "Generation": "engine", "ScoreResult": "engine", "generate": "engine",
    "sample": "engine", "score": "engine", "stream": "engine",
    "ExitPolicy": "exits", "parse_exit": "exits",
    "LoopLMConfig": "hf", "LoopLMForCausalLM": "hf",
    "LoopOutput": "model", "LoopedLM": "model", "exit_distribution": "model",
}
# Names whose users expect transformers' Auto classes to know looplm dirs (importing looplm.hf registers).
_REGISTERS = ("load", "save")

__all__ = sorted(_SOURCES, key=lambda n: (n[0].islower(), n))

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .batching import Engine, RequestOutput
    from .cache import KVCache
    from .calibrate import Calibration, calibrate
    from .checkpoint import CheckpointError, default_model_dir, load, load_tokenizer, save
    from .config import LoopConfig
    from .demo import bundled_model_dir
    from .engine import GenerateResult, Generation, ScoreResult, generate, sample, score, stream
    from .exits import ExitPolicy, parse_exit
    from .hf import LoopLMConfig, LoopLMForCausalLM
    from .model import LoopedLM, LoopOutput, exit_distribution


def __getattr__(name: str) -> Any:
    if name in _SOURCES:
        if name in _REGISTERS:
            importlib.import_module(".hf", __name__)
        value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    elif name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("looplm")
        except PackageNotFoundError:  # running from a source tree that was never installed
            value = "0+unknown"
    else:
        try:  # a submodule, as `looplm.engine.left_pad` worked when the package imported everything
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # next time, a plain attribute
    return value


def __dir__() -> list[str]:
    loaded = {k for k, v in globals().items() if isinstance(v, types.ModuleType) and v.__name__.startswith(f"{__name__}.")}
    return sorted({*__all__, *loaded, "__version__"})


class _Package(types.ModuleType):
    """Keeps `looplm.calibrate` the function: importing a submodule sets it as an attribute of its
    package, and `looplm.calibrate` (the function) shares its name with `looplm/calibrate.py`."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SOURCES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
