"""Training looped models: objectives (`looplm.losses`), data, recipes and an accelerate-based trainer.

    from looplm.train import load_recipe, fit
    result = fit(load_recipe("recipes/chain.yaml", ["train.batch_size=32"]))

The names below are imported on first use (PEP 562), so `from looplm.train import synthetic` (the demo's
problems) does not import the trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_SOURCES = {
    "Batch": "data", "SyntheticSource": "data", "TextSource": "data",
    "LossConfig": "objective", "LoopObjective": "objective", "StepOutput": "objective",
    "Recipe": "recipe", "load_recipe": "recipe",
    "FitResult": "trainer", "fit": "trainer",
}

__all__ = ["Batch", "FitResult", "LoopObjective", "LossConfig", "Recipe", "StepOutput", "SyntheticSource",
           "TextSource", "fit", "load_recipe"]

if TYPE_CHECKING:
    from .data import Batch, SyntheticSource, TextSource
    from .objective import LossConfig, LoopObjective, StepOutput
    from .recipe import Recipe, load_recipe
    from .trainer import FitResult, fit


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
