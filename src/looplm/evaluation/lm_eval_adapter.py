"""lm-evaluation-harness model "looplm": score and generate with a looped model at a chosen compute budget.

    pip install "looplm[eval]"
    looplm-lm-eval --model looplm --model_args pretrained=DIR,loops=4,exit=q:0.6,kv=last --tasks arc_easy
    python -m looplm.evaluation.lm_eval_adapter ...          # the same, without the console script

lm-eval 0.4.13 (the version this was written against) has no plugin mechanism: its CLI resolves `--model`
against its own table of built-in backends, so a plain `lm_eval --model looplm` does not find this class.
`looplm-lm-eval` imports this module (which registers "looplm") and then runs lm-eval's own CLI with the
same arguments. In Python, `import looplm.evaluation.lm_eval_adapter` before `lm_eval.simple_evaluate(
model="looplm", ...)`, or pass an instance: `simple_evaluate(model=LoopLMEval(...), ...)`.

model_args (comma-separated key=value, as lm-eval parses them):
    pretrained   model dir or .gguf (default: looplm.default_model_dir(), SmolLM2-135M-Instruct)
    loops        loop count R (default: the checkpoint's)
    exit         exit policy, e.g. q:0.6, conv:0.02, "q:0.6|conv:0.02", static:4. lm-eval splits model_args
                 on commas, so write the policy's own commas as '+': exit=q:0.6+min=2 means "q:0.6,min=2".
    kv           per_loop | last | mean | first (KV-cache strategy; default per_loop)
    core         I:J: layers I..J-1 become the looped core (looplm.load(..., core=(I, J)))
    dtype        float32 | bfloat16 | float16 | auto (default float32; auto: bfloat16 on CUDA)
    device       cpu | cuda | cuda:N (default cuda if available). lm-eval's --device (CLI default cuda:0) also
                 sets it; a CUDA device without CUDA falls back to cpu with a warning
    batch_size   rows per forward (default 8; "auto" is not supported and falls back to 8 or max_batch_size)
    max_length   the most tokens (context + continuation) one forward holds (default and cap: the model's
                 max_position_embeddings). Longer inputs lose tokens from the left.
    max_gen_toks default new-token limit for generate_until (default 256; tasks usually set their own)
    prefix_token_id  token used as the context of an empty context / the first rolling window
                 (default: the tokenizer's BOS, else EOS, as lm-eval's HF model)
    add_bos_token    true/false: ask the tokenizer to add special tokens when encoding (default: its default)
    tokenizer    a tokenizer dir (default: the model dir)

Scoring acts exactly as decoding does. With an exit policy or a KV strategy other than per_loop it goes through
`looplm.score`: every continuation token is fed through the cache after the context's prefill. At static depth
with kv=per_loop (a cache-free forward, identical to HF-style scoring) a batch is one packed forward instead: each
distinct context once, then every continuation that shares it, attending to the context and to itself only, and
the head only where a continuation token is predicted (docs/evaluation.md, "Speed").
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model

import looplm
from looplm.cache import check_strategy
from looplm.engine import check_token_ids, stop_tokens_for
from looplm.evaluation.runner import cut_at_stop, run_until  # noqa: F401 (cut_at_stop: part of this module's API)
from looplm.loops import LoopRun
from looplm.retrofit_search import Encoded, pack

log = logging.getLogger(__name__)

MODEL_NAME = "looplm"
EXIT_COMMA = "+"  # written for ',' inside exit= (lm-eval splits model_args on ',')
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
TASK_FILES = ("arc_easy_local.yaml", "gsm8k_local.yaml", "tinystories_local.yaml", "utils.py")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}

# lm-eval's get_model() imports its built-in backends only while the registry is empty: register them first,
# so that registering "looplm" does not hide "hf", "vllm", ... from the same process.
import lm_eval.models  # noqa: F401


def _register(cls):
    """@register_model(MODEL_NAME), tolerating this module being imported twice (run as __main__, reloads)."""
    current = model_registry.get(MODEL_NAME, None)
    if current is not None and getattr(current, "_looplm_adapter", False):
        return cls
    return register_model(MODEL_NAME)(cls)


# --------------------------------------------------------------------------- argument parsing (pure)


def parse_exit_arg(value: Any) -> str | int | None:
    """exit= from model_args: None/"none"/"" → no policy (static depth); '+' stands for ','."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"exit={value!r} is not an exit policy")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        raise ValueError(f"exit={value!r} is not an exit policy (e.g. q:0.6, static:4)")
    return str(value).replace(EXIT_COMMA, ",")


def parse_core_arg(value: Any) -> tuple[int, int] | None:
    """core= from model_args: "I:J" (or "I-J") → (I, J)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    m = re.fullmatch(r"\s*(\d+)\s*[:\-]\s*(\d+)\s*", str(value))
    if not m:
        raise ValueError(f"core={value!r}: expected I:J (layers I..J-1 looped), e.g. core=2:6")
    return int(m.group(1)), int(m.group(2))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None → cuda if available else cpu. lm-eval's CLI passes --device (default cuda:0) to every model; as
    its HF model does, a CUDA device on a machine without CUDA falls back to the CPU (with a warning)."""
    if device is None or str(device).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("looplm: device %s requested but CUDA is not available; using cpu", device)
        return torch.device("cpu")
    return dev


def parse_dtype_arg(value: Any, device: torch.device) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    name = str(value or "float32").strip().lower().removeprefix("torch.")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype={value!r}: choose one of {sorted(_DTYPES)} or auto")
    return _DTYPES[name]


def parse_batch_size_arg(value: Any, max_batch_size: Any = None) -> int:
    if value is None:
        return 8
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        fallback = int(max_batch_size) if max_batch_size else 8
        log.warning("looplm: batch_size=%s is not supported; using %d", value, fallback)
        return fallback
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {value!r}")
    return size


def parse_gen_kwargs(gen_kwargs: dict, default_max_gen_toks: int) -> dict:
    """A request's generation kwargs → until (list), max_gen_toks, temperature, top_k, top_p, seed.

    Greedy unless do_sample is true (or do_sample is unset and temperature > 0), as lm-eval's HF model.
    Unknown keys are ignored with a warning.
    """
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    until = [] if until is None else [until] if isinstance(until, str) else list(until)
    max_gen_toks = default_max_gen_toks
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        if kw.get(key) is not None:
            max_gen_toks = int(kw[key])
            break
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        kw.pop(key, None)
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    do_sample = kw.pop("do_sample", None)
    if do_sample is None:
        do_sample = temperature > 0
    if not do_sample:
        temperature = 0.0
    elif temperature == 0.0:
        temperature = 1.0  # do_sample=True without a temperature: sample from the model's distribution
    top_k = kw.pop("top_k", None)
    top_p = kw.pop("top_p", None)
    seed = kw.pop("seed", None)
    if kw:
        log.warning("looplm: ignoring generation kwargs %s", sorted(kw))
    return dict(until=until, max_gen_toks=max_gen_toks, temperature=temperature,
                top_k=int(top_k) if top_k is not None and temperature > 0 else None,
                top_p=float(top_p) if top_p is not None and temperature > 0 else None,
                seed=int(seed) if seed is not None else None)


# --------------------------------------------------------------------------- the model


@_register
class LoopLMEval(TemplateLM):
    """lm-eval LM over a `looplm.LoopedLM`: loglikelihood, loglikelihood_rolling, generate_until."""

    _looplm_adapter = True
    backend = "causal"

    def __init__(
        self,
        pretrained: str | os.PathLike | looplm.LoopedLM | None = None,
        loops: int | None = None,
        exit: str | int | None = None,
        kv: str = "per_loop",
        core: str | tuple[int, int] | None = None,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
        add_bos_token: bool | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            log.warning("looplm: ignoring unknown model_args %s", sorted(kwargs))
        self._device = resolve_device(device)
        self.kv = check_strategy(kv)
        self.exit = parse_exit_arg(exit)
        self.core = parse_core_arg(core)
        if loops is not None and (isinstance(loops, bool) or not isinstance(loops, int)):
            raise ValueError(f"loops must be an integer ≥ 1, got {loops!r}")
        self.loops = loops
        if isinstance(pretrained, looplm.LoopedLM):
            if self.core is not None:
                raise ValueError("core= applies when loading a checkpoint; pass a model loaded with core=(i, j)")
            if tokenizer is None:
                raise ValueError("a LoopedLM instance needs tokenizer= (a tokenizer or a tokenizer dir)")
            self.model = pretrained.to(self._device).eval()
            self.pretrained = getattr(pretrained, "name_or_path", type(pretrained).__name__)
        else:
            path = Path(pretrained).expanduser() if pretrained else looplm.default_model_dir()
            dt = parse_dtype_arg(dtype, self._device)
            self.model = looplm.load(path, core=self.core, dtype=dt, device=self._device)
            self.pretrained = str(path)
            tokenizer = path if tokenizer is None else tokenizer
        self.tokenizer = looplm.load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        # fail now, not after the tasks are built: the budget must make sense for this model
        self.num_loops, policy = self.model.resolve_budget(self.loops, self.exit)
        self.exit_policy = str(policy) if policy is not None else f"static:{self.num_loops}"
        self._packed = policy is None and self.kv == "per_loop"  # scoring is one plain forward: pack it
        cfg = self.model.config
        if len(self.tokenizer) > cfg.vocab_size:
            log.warning("looplm: tokenizer has %d tokens but the model's vocab_size is %d",
                        len(self.tokenizer), cfg.vocab_size)
        limit = cfg.max_position_embeddings
        self._max_length = min(int(max_length), limit) if max_length else limit
        if self._max_length < 2:
            raise ValueError(f"max_length must be ≥ 2, got {max_length!r}")
        self._max_gen_toks = int(max_gen_toks)
        self._batch_size = parse_batch_size_arg(batch_size, max_batch_size)
        self.custom_prefix_token_id = prefix_token_id
        self.add_bos_token = add_bos_token
        self.stats = {"scored_tokens": 0, "scored_loops": 0, "generated_tokens": 0, "generated_loops": 0}
        self._warned_truncation = False

    # -- properties lm-eval reads

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        return eos

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.pretrained)).replace("/", "__")

    def get_model_info(self) -> dict:
        """Recorded in lm-eval's results["config"]: the budget, and the loops the evaluation actually ran."""
        s = self.stats
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "looplm_pretrained": self.pretrained,
            "looplm_loops": self.num_loops,
            "looplm_exit": self.exit_policy,
            "looplm_kv": self.kv,
            "looplm_core": list(self.core) if self.core else None,
            "looplm_max_length": self.max_length,
            "looplm_mean_loops_scored": s["scored_loops"] / s["scored_tokens"] if s["scored_tokens"] else None,
            "looplm_mean_loops_generated": (s["generated_loops"] / s["generated_tokens"]
                                            if s["generated_tokens"] else None),
        }

    # -- tokenisation

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False
            else:
                add_special_tokens = self.add_bos_token
        special = {} if add_special_tokens is None else {"add_special_tokens": bool(add_special_tokens)}
        ids = self.tokenizer.encode(string, **special)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # -- scoring

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context cut from the left so that context + continuation fits max_length tokens."""
        room = self.max_length - len(continuation)
        if room < 1:
            raise ValueError(f"continuation of {len(continuation)} tokens does not fit max_length={self.max_length} "
                             "with at least one context token")
        if len(context) > room:
            if not self._warned_truncation:
                log.warning("looplm: context + continuation longer than max_length=%d; truncating contexts from "
                            "the left", self.max_length)
                self._warned_truncation = True
            context = context[-room:]
        return context

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings or None, context ids, continuation ids)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        todo = []
        for i, (_, ctx, cont) in enumerate(requests):
            ctx, cont = list(ctx), list(cont)
            if not cont:
                results[i] = (0.0, True)
                continue
            if not ctx:
                ctx = [self.prefix_token_id]
            todo.append((i, self._fit(ctx, cont), cont))
        if self._packed:
            batches, score = self._packed_batches(todo), self._score_packed
        else:  # longest contexts first, equal contexts adjacent (looplm.score prefills a shared context once)
            todo.sort(key=lambda r: (-len(r[1]), r[1], -len(r[2])))
            batches, score = self._batches(todo), self._score_cached
        bar = _progress(len(todo), "looplm loglikelihood", disable_tqdm)
        for batch in batches:
            for (i, _, _), (ll, greedy, loops) in zip(batch, score(batch)):
                results[i] = (ll, greedy)
                self.stats["scored_tokens"] += len(loops)
                self.stats["scored_loops"] += sum(loops)
            bar.update(len(batch))
        bar.close()
        for (strings, _, _), r in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, r)
        return results  # type: ignore[return-value]

    def _score_cached(self, batch) -> list[tuple[float, bool, list[int]]]:
        """(log-likelihood, greedy, loops per token) of each row through `looplm.score` (exits, KV strategies)."""
        res = looplm.score(self.model, [b[1] for b in batch], [b[2] for b in batch],
                           num_loops=self.loops, exit=self.exit, kv=self.kv)
        return [(float(sum(lps)), bool(g), loops) for lps, g, loops in zip(res.logprobs, res.greedy, res.loops)]

    def _packed_batches(self, rows: list[tuple[int, list[int], list[int]]]):
        """Rows grouped by context, the groups longest first (context + all continuations: packed rows then
        need little padding), in batches of at most batch_size rows (continuations) as the other backends
        count them; a context with more continuations than batch_size is split."""
        groups: dict[tuple[int, ...], list] = defaultdict(list)
        for row in rows:
            groups[tuple(row[1])].append(row)
        chunks = [g[k : k + self.batch_size] for g in groups.values() for k in range(0, len(g), self.batch_size)]
        chunks.sort(key=lambda g: -(len(g[0][1]) + sum(len(r[2]) for r in g)))
        batch: list = []
        for g in chunks:
            if batch and len(batch) + len(g) > self.batch_size:
                yield batch
                batch = []
            batch += g
        if batch:
            yield batch

    @torch.inference_mode()
    def _score_packed(self, batch) -> list[tuple[float, bool, list[int]]]:
        """Static depth, per_loop KV: one forward over the batch packed as the retrofit search packs items (each
        context once, then its continuations, each attending to the context and to itself only, RoPE positions
        continuing the context; several contexts share a row first fit). The head runs only where a continuation
        token is predicted. This is the cache-free forward over context + continuation that `looplm.score` equals
        here, without repeating a shared context, padding rows to the longest continuation, or the full-vocabulary
        head over context positions."""
        model, dev = self.model, self.model.device
        check_token_ids([b[1] for b in batch], model.config.vocab_size, "context")
        check_token_ids([b[2] for b in batch], model.config.vocab_size, "continuation")
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)  # context → its rows in the batch
        for k, (_, ctx, _) in enumerate(batch):
            groups[tuple(ctx)].append(k)
        owners = list(groups.values())
        p = pack([Encoded(str(n), list(ctx), [batch[k][2] for k in ks], 0) for n, (ctx, ks) in enumerate(groups.items())])
        row_of = [k for it in p.items for k in owners[int(it.id)]]  # flat continuation index → batch row
        ctx = model.packed_context(p.positions.to(dev), p.mask.to(dev))
        h = LoopRun(model, model.embed(p.ids.to(dev), ctx), ctx, self.num_loops).to_end().exit_hidden  # (B, S, D)
        S = h.shape[1]
        # a context's last position predicts the first token of each of its continuations: read it out once
        where, inverse = torch.unique(p.rows * S + p.cols, return_inverse=True)
        logp = torch.log_softmax(self._readout_at(h, ctx, where.to(dev)).float(), -1)  # (U, V)
        inverse, targets, choice = inverse.to(dev), p.targets.to(dev), p.choice_of.to(dev)
        tok = logp[inverse, targets].double()  # (P,) log p of each continuation token
        missed = (logp.argmax(-1)[inverse] != targets).long()  # (P,) 1 where greedy decoding would differ
        n = len(batch)
        ll = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, choice, tok).tolist()
        wrong = torch.zeros(n, dtype=torch.long, device=dev).index_add_(0, choice, missed).tolist()
        out: list = [None] * n
        for flat, k in enumerate(row_of):
            out[k] = (ll[flat], wrong[flat] == 0, [self.num_loops] * len(batch[k][2]))
        return out

    def _readout_at(self, h: torch.Tensor, ctx, where: torch.Tensor) -> torch.Tensor:
        """Logits (U, V) at the flat positions `where` of h (B, S, D). The coda attends over every position, so a
        model with one reads out every column that holds a wanted position; without a coda the readout (norm,
        head) is per position and runs on the wanted ones only."""
        B, S, D = h.shape
        if not self.model.coda:
            return self.model.readout(h.reshape(B * S, D)[where][None], ctx)[0]
        cols, col_of = torch.unique(where % S, return_inverse=True)
        return self.model.readout(h, ctx, cols)[where // S, col_of]

    def _batches(self, rows: list[tuple[int, list[int], list[int]]]):
        """Consecutive rows in batches of at most batch_size whose longest context + longest continuation fit
        the model's positions: looplm.score left-pads the contexts and right-pads the continuations."""
        limit = self.model.config.max_position_embeddings
        batch: list = []
        ctx_len = cont_len = 0
        for row in rows:
            c, t = max(ctx_len, len(row[1])), max(cont_len, len(row[2]))
            if batch and (len(batch) == self.batch_size or c + t > limit):
                yield batch
                batch, c, t = [], len(row[1]), len(row[2])
            batch.append(row)
            ctx_len, cont_len = c, t
        if batch:
            yield batch

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text scored whole: disjoint windows of at most max_length tokens, every token predicted once
        (the first from the prefix token), the last window with as much context as fits."""
        windows, owner = [], []
        for k, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scores):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        bar = _progress(len(requests), "looplm generate_until", disable_tqdm)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for idx in groups.values():
            gen = parse_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = list(gen["until"])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = gen["max_gen_toks"]
            max_ctx = self.max_length - max_new
            if max_ctx < 1:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
            prompts = []
            for i in idx:
                ids = self.tok_encode(requests[i].args[0]) or [self.prefix_token_id]
                prompts.append((i, ids[-max_ctx:]))
            prompts.sort(key=lambda p: -len(p[1]))
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                texts = self._generate_batch([p[1] for p in batch], until, max_new, gen)
                for (i, _), text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _stop_token_ids(self) -> list[int]:
        return stop_tokens_for(self.model.config, self.tokenizer)

    def _generate_batch(self, prompts: list[list[int]], until: list[str], max_new: int, gen: dict) -> list[str]:
        """Stream tokens until every row has emitted a stop token or produced a stop string."""
        run = looplm.stream(self.model, prompts, max_new_tokens=max_new, num_loops=self.loops, exit=self.exit,
                            kv=self.kv, temperature=gen["temperature"], top_k=gen["top_k"], top_p=gen["top_p"],
                            seed=gen["seed"], stop_tokens=self._stop_token_ids())
        texts, ends = run_until(run, self.tok_decode, stop_ids=set(self._stop_token_ids()), until=until)
        loops = torch.stack([s.loops for s in run.steps], 1)  # (B, N)
        for r, end in enumerate(ends):
            self.stats["generated_tokens"] += int((loops[r, :end] > 0).sum())
            self.stats["generated_loops"] += int(loops[r, :end].sum())
        return texts


def _progress(total: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=disable or total == 0)


# --------------------------------------------------------------------------- local tasks


def write_local_tasks(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, n_stories: int = 100) -> Path:
    """Write the local lm-eval tasks (arc_easy_local, gsm8k_local, tinystories_local) into out_dir with
    absolute paths into data_dir (a dir holding arc/, gsm8k/ and text/ as in the project's shared/data).
    Use with `--include_path OUT_DIR` (CLI) or `TaskManager(include_path=OUT_DIR)`. Returns out_dir."""
    data_dir = Path(data_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    needed = ["arc/ARC-Easy.test.jsonl", "gsm8k/train.jsonl", "gsm8k/test.jsonl", "text/tinystories_val.txt"]
    missing = [p for p in needed if not (data_dir / p).is_file()]
    if missing:
        log.warning("looplm: %s lacks %s; the tasks reading them will fail", data_dir, missing)
    absent = [name for name in TASK_FILES if not (TASKS_DIR / name).is_file()]
    if absent:
        raise FileNotFoundError(f"task templates {absent} are missing from {TASKS_DIR} (the installed package "
                                "lacks its package data; install from source or with the lm_eval_tasks files)")
    for name in TASK_FILES:
        src = TASKS_DIR / name
        if name.endswith(".yaml"):
            text = src.read_text()
            text = text.replace("@LOOPLM_DATA_DIR@", data_dir.as_posix())
            text = text.replace("@LOOPLM_N_STORIES@", str(int(n_stories)))
            (out / name).write_text(text)
        else:
            shutil.copyfile(src, out / name)
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    """`looplm-lm-eval ARGS`: lm-eval's CLI with the "looplm" model registered.

    `looplm-lm-eval write-tasks DATA_DIR OUT_DIR [--n-stories N]` writes the local task YAMLs instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "write-tasks":
        import argparse

        p = argparse.ArgumentParser(prog="looplm-lm-eval write-tasks",
                                    description="Write the local lm-eval task YAMLs with absolute data paths.")
        p.add_argument("data_dir")
        p.add_argument("out_dir")
        p.add_argument("--n-stories", type=int, default=100, help="stories in tinystories_local (default 100)")
        a = p.parse_args(argv[1:])
        out = write_local_tasks(a.data_dir, a.out_dir, n_stories=a.n_stories)
        print(f"wrote {', '.join(n for n in TASK_FILES if n.endswith('.yaml'))} to {out}; "
              f"use: --include_path {out}")
        return
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
