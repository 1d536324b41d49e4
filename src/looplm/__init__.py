"""looplm: looped language models with per-request compute and memory budgets."""
from .cache import KVCache
from .config import LoopConfig
from .model import LoopedLM, LoopOutput, exit_distribution
from .checkpoint import CheckpointError, default_model_dir, load, load_tokenizer, save
from .engine import GenerateResult, Generation, generate, sample, stream
from .hf import LoopLMConfig, LoopLMForCausalLM, register as _register_with_transformers

_register_with_transformers()
from .calibrate import Calibration, calibrate
from .exits import ExitPolicy, parse_exit
