"""looplm: looped language models with per-request compute and memory budgets.

    model = looplm.load(path)                       # Ouro, looplm, or HF Llama-family dir (core=(i, j) to loop a block)
    out = model(input_ids, num_loops=4, return_loops=True)
    res = looplm.generate(model, prompts, max_new_tokens=64, exit="q:0.6", kv="last")
    looplm.bundled_model_dir()                      # the small looped model that ships with looplm (looplm demo)
"""

from .cache import KVCache
from .calibrate import Calibration, calibrate
from .checkpoint import CheckpointError, default_model_dir, load, load_tokenizer, save
from .config import LoopConfig
from .demo import bundled_model_dir
from .engine import GenerateResult, Generation, ScoreResult, generate, sample, score, stream
from .exits import ExitPolicy, parse_exit
from .hf import LoopLMConfig, LoopLMForCausalLM
from .hf import register as _register_with_transformers
from .model import LoopedLM, LoopOutput, exit_distribution

_register_with_transformers()  # AutoModelForCausalLM.from_pretrained(looplm_dir) after `import looplm`

__all__ = [
    "Calibration", "CheckpointError", "ExitPolicy", "GenerateResult", "Generation", "KVCache", "LoopConfig",
    "LoopLMConfig", "LoopLMForCausalLM", "LoopOutput", "LoopedLM", "ScoreResult", "bundled_model_dir", "calibrate", "default_model_dir",
    "exit_distribution", "generate", "load", "load_tokenizer", "parse_exit", "sample", "save", "score", "stream",
]
