"""Training looped models: objectives (`looplm.losses`), data, recipes and an accelerate-based trainer.

    from looplm.train import load_recipe, fit
    result = fit(load_recipe("recipes/chain.yaml", ["train.batch_size=32"]))
"""

from .data import Batch, SyntheticSource, TextSource
from .objective import LossConfig, LoopObjective, StepOutput
from .recipe import Recipe, load_recipe
from .trainer import FitResult, fit

__all__ = ["Batch", "FitResult", "LoopObjective", "LossConfig", "Recipe", "StepOutput", "SyntheticSource",
           "TextSource", "fit", "load_recipe"]
