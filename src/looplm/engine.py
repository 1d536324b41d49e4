"""Generation, streaming and scoring for a batch of prompts. Knows tokens, never text.

`generate`, `stream` and `score` are thin clients of the request-level `looplm.Engine` (looplm.batching):
each row becomes a request of its own (no padding inside the engine), the engine runs them side by side,
and `Generation` hands them back in lockstep, one `Step` (a token per row) at a time. A row's tokens and
loops are the engine's, so they equal the row run alone. Scoring at static depth under `per_loop` (equal
to a cache-free forward) takes one forward instead (`_score_forward`); every other score teacher-forces
the continuation through the engine, so KV strategies and exits act exactly as in generation.
Sampling (`sample`) and the shared checks live here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache, check_strategy
from .exits import ExitPolicy
from .model import LoopedLM


# --------------------------------------------------------------------------- sampling (pure)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V). temperature 0 is greedy.

    Each row draws from its own generator, so a row samples the same tokens in any batch.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already hold top_p of the mass (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)  # (B, V)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.stack([torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(probs, generators)])


def check_sampling(*, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The sampling options `sample` accepts, or a ValueError naming the bad one."""
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be ≥ 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def stop_tokens_for(config, tokenizer=None) -> list[int]:
    """The config's EOS id(s) and the tokenizer's EOS id, as one sorted list."""
    eos = config.eos_token_id
    stop = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        stop.add(tokenizer.eos_token_id)
    return sorted(stop)


def check_token_ids(rows: Sequence[Sequence[int]], vocab_size: int, what: str) -> None:
    for i, row in enumerate(rows):
        bad = [t for t in row if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"{what} {i}: token ids must be in [0, {vocab_size}); got {bad[:5]}")


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of token-id lists → input_ids (B, S) left-padded, attention_mask (B, S)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, S - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, S - len(p) :] = 1
    return ids, mask


# --------------------------------------------------------------------------- results


@dataclass
class Step:
    index: int  # 0-based step
    tokens: torch.Tensor  # (B,) sampled tokens (pad for rows already finished)
    active: torch.Tensor  # (B,) bool: the row produced this token (it was not finished before)
    loops: torch.Tensor  # (B,) loops the token ran (0 for finished rows)
    logprobs: torch.Tensor  # (B,) log p(token) under the model (before temperature; 0 for finished rows)
    greedy: torch.Tensor  # (B,) bool: the token is the argmax


@dataclass
class GenerateResult:
    sequences: torch.Tensor  # (B, S + N): the left-padded prompts then the new tokens (pad after a stop)
    new_tokens: list[list[int]]  # per row, the generated tokens up to and including a stop token
    loops_per_token: torch.Tensor  # (B, N) loops each new token ran; 0 after the row stopped
    logprobs: torch.Tensor  # (B, N) log p of each new token (model distribution, before temperature)
    greedy: torch.Tensor  # (B, N) bool: the token was the argmax
    finish_reasons: list[str]  # "stop" or "length"
    kv_strategy: str
    kv_bytes: int  # bytes of KV held at the end (all rows, all stored positions)
    kv_bytes_per_token: int  # per position of one sequence
    kv_allocated_bytes: int
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_core_layer_evals: int = 0  # (row, core layer) evaluations of the decode steps
    exit_policy: str = ""

    @property
    def num_new_tokens(self) -> int:
        return sum(len(t) for t in self.new_tokens)

    @property
    def decode_tokens_per_second(self) -> float:
        # the first token comes from prefill; the rest from decode steps
        n = self.num_new_tokens - len(self.new_tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def mean_loops(self) -> float:
        ran = self.loops_per_token[self.loops_per_token > 0]
        return float(ran.float().mean()) if ran.numel() else 0.0


# --------------------------------------------------------------------------- the loop

def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Generation:
    """Streaming generation: iterate for `Step`s, or call `result()`.

    input_ids: (B, S) tensor (with attention_mask for left padding) or a list of token-id lists.
    """

    def __init__(
        self,
        model: LoopedLM,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        num_loops: int | None = None,
        exit: str | ExitPolicy | None = None,
        kv: str = "per_loop",
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int] | None = None,
        stop_tokens: Sequence[int] | None = None,
        pad_token_id: int | None = None,
        force: Sequence[Sequence[int | None]] | None = None,
    ):
        """force: per row, the tokens to emit instead of sampling (teacher forcing, for scoring); a
        row finishes after its forced tokens. An entry None (or -1) is left to the model: it samples
        there as usual, so a row can mix given tokens (the next question of a dialogue) with its own
        answers, all through one KV cache."""
        self.model = model
        cfg = model.config
        self.num_loops, self.policy = model.resolve_budget(num_loops, exit)
        self.kv = check_strategy(kv)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        self.pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            ids = input_ids.long()
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
        else:
            ids, mask = left_pad(input_ids, self.pad)
        vocab = cfg.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab}); got range [{int(ids.min())}, {int(ids.max())}]")
        B, S = ids.shape
        force_rows = None
        if S < 1 or bool((mask.sum(1) == 0).any()):
            raise ValueError("every prompt needs at least one token (a row of the attention mask is all 0)")
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("prompts must be left-padded: a row of the attention mask has a 0 after a 1")
        if force is not None:
            if len(force) != B or any(len(f) == 0 for f in force):
                raise ValueError(f"force needs one non-empty token list per prompt ({B}), got {len(force)}")
            rows = [[-1 if t is None else int(t) for t in f] for f in force]
            check_token_ids([[t for t in f if t != -1] for f in rows], vocab, "forced tokens of row")
            force_rows = rows
            max_new_tokens = max(len(f) for f in rows)
        limit, longest = cfg.max_position_embeddings, int(mask.sum(1).max())  # a row's positions count its tokens
        if longest > limit:
            raise ValueError(f"prompt of {longest} tokens exceeds the position limit max_position_embeddings={limit}")
        if longest + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the position limit "
                f"max_position_embeddings={limit}"
            )
        self.ids, self.mask = ids.to(model.device), mask.to(model.device)
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        if stop_tokens is None:
            stop_tokens = stop_tokens_for(cfg)
        self.stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=model.device)
        seeds = [seed] * B if seed is None or isinstance(seed, int) else list(seed)
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for {B} prompts")
        # each row is a request of its own (no padding inside the engine); rows with forced tokens end after them
        self.prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        self.row_force = [None] * B if force_rows is None else force_rows
        self.seeds = seeds if temperature > 0 and seed is not None else [None] * B
        self.stop_tokens = [int(t) for t in self.stop.tolist()]
        self.steps: list[Step] = []
        self.decode_core_layer_evals = 0  # (row, core layer) evaluations in decode steps: the compute spent
        self.prefill_seconds = self.decode_seconds = 0.0
        self.kv_bytes = self.kv_allocated_bytes = self.kv_bytes_per_token = 0
        self._iter: Iterator[Step] | None = None

    def __iter__(self) -> Iterator[Step]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    def _run(self) -> Iterator[Step]:
        """Every row is a request of one `looplm.Engine` (rows never wait for each other inside it); a `Step` is
        yielded once every unfinished row has its token at that index."""
        from .batching import Engine  # the engine imports sampling from here

        model, B, dev = self.model, len(self.prompts), self.ids.device
        need = sum(len(p) for p in self.prompts) + B * self.max_new_tokens
        engine = Engine(model, kv=self.kv, max_loops=self.num_loops, max_batch_size=B, max_tokens=need,
                        max_step_tokens=sum(len(p) for p in self.prompts) + B)  # every prompt in the first step
        for i, (prompt, force, seed) in enumerate(zip(self.prompts, self.row_force, self.seeds)):
            engine.add_request(prompt, max_new_tokens=self.max_new_tokens, num_loops=self.num_loops, exit=self.policy,
                               seed=seed, stop_tokens=self.stop_tokens, request_id=str(i), force=force,
                               **self.sampling)
        got: list[list[tuple[int, int, float, bool]]] = [[] for _ in range(B)]  # (token, loops, logprob, greedy)
        done = [False] * B
        self.kv_bytes_per_token = engine.pool.bytes_per_token
        t0 = _clock(dev)
        for index in range(self.max_new_tokens):
            while not all(done[i] or len(got[i]) > index for i in range(B)):
                for out in engine.step():
                    i = int(out.request_id)
                    got[i] += zip(out.new_tokens, out.loops, out.logprobs, out.greedy)
                    if out.finished:
                        done[i] = True
                        self.kv_bytes += out.kv_bytes
                self.kv_allocated_bytes = max(self.kv_allocated_bytes, engine.stats()["kv_allocated_bytes"])
            active = [len(g) > index for g in got]
            cols = [g[index] if a else (self.pad, 0, 0.0, False) for g, a in zip(got, active)]
            tokens, loops, logprobs, greedy = (list(c) for c in zip(*cols))
            step = Step(index, torch.tensor(tokens, device=dev), torch.tensor(active, device=dev),
                        torch.tensor(loops, device=dev), torch.tensor(logprobs, device=dev), torch.tensor(greedy, device=dev))
            self.steps.append(step)
            self.decode_core_layer_evals = engine.decode_core_layer_evals
            now = _clock(dev)
            if index == 0:
                self.prefill_seconds = now - t0
            else:  # the time a consumer spends between steps is not ours
                self.decode_seconds += now - t0
            yield step
            t0 = _clock(dev)
            if all(done[i] and len(got[i]) <= index + 1 for i in range(B)):
                break

    def result(self) -> GenerateResult:
        for _ in self:
            pass
        tokens = torch.stack([s.tokens for s in self.steps], dim=1)  # (B, N)
        active = torch.stack([s.active for s in self.steps], dim=1)
        loops = torch.stack([s.loops for s in self.steps], dim=1)
        logprobs = torch.stack([s.logprobs for s in self.steps], dim=1)
        greedy = torch.stack([s.greedy for s in self.steps], dim=1)
        new_tokens, reasons = [], []
        stop = set(self.stop.tolist())
        for row, act in zip(tokens.tolist(), active.tolist()):
            toks = [t for t, a in zip(row, act) if a]
            new_tokens.append(toks)
            reasons.append("stop" if toks and toks[-1] in stop else "length")
        return GenerateResult(
            sequences=torch.cat([self.ids, tokens], dim=1),
            new_tokens=new_tokens,
            loops_per_token=loops,
            logprobs=logprobs,
            greedy=greedy,
            finish_reasons=reasons,
            kv_strategy=self.kv,
            kv_bytes=self.kv_bytes,
            kv_bytes_per_token=self.kv_bytes_per_token,
            kv_allocated_bytes=self.kv_allocated_bytes,
            prompt_tokens=int(self.mask.sum()),
            prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds,
            decode_core_layer_evals=self.decode_core_layer_evals,
            exit_policy=self.policy.spec() if self.policy is not None else f"static:{self.num_loops}",
        )


def generate(model: LoopedLM, input_ids: torch.Tensor | Sequence[Sequence[int]], **kwargs) -> GenerateResult:
    """Generate for a batch of prompts; see `Generation` for the options."""
    return Generation(model, input_ids, **kwargs).result()


def stream(model: LoopedLM, input_ids: torch.Tensor | Sequence[Sequence[int]], **kwargs) -> Generation:
    """A `Generation` to iterate step by step (each `Step` holds one new token per row)."""
    return Generation(model, input_ids, **kwargs)


# --------------------------------------------------------------------------- scoring


@dataclass
class ScoreResult:
    logprobs: list[list[float]]  # per row, log p of each continuation token
    greedy: list[bool]  # every continuation token was the argmax
    loops: list[list[int]]  # per row, loops each continuation token's prediction ran

    @property
    def totals(self) -> list[float]:
        return [sum(lp) for lp in self.logprobs]


@torch.inference_mode()
def score(model: LoopedLM, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
          num_loops: int | None = None, exit: str | ExitPolicy | None = None, kv: str = "per_loop") -> ScoreResult:
    """log p(continuation | context) for each row, computed as decoding computes it.

    Each continuation token is fed through the KV cache after the context's prefill, so the KV
    strategy and per-token exits act exactly as in generation. At static depth with `per_loop`
    (which equals a cache-free forward) it takes one forward over context + continuation instead.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    R, policy = model.resolve_budget(num_loops, exit)
    check_strategy(kv)
    check_token_ids(contexts, model.config.vocab_size, "context")
    check_token_ids(continuations, model.config.vocab_size, "continuation")
    if policy is None and kv == "per_loop":
        return _score_forward(model, contexts, continuations, R)
    res = Generation(model, contexts, num_loops=num_loops, exit=exit, kv=kv, force=continuations,
                     stop_tokens=[]).result()
    n = [len(c) for c in continuations]
    return ScoreResult(
        logprobs=[row[:k] for row, k in zip(res.logprobs.tolist(), n)],
        greedy=[bool(row[:k].all()) for row, k in zip(res.greedy, n)],
        loops=[row[:k] for row, k in zip(res.loops_per_token.tolist(), n)],
    )


def _score_forward(model: LoopedLM, contexts, continuations, R: int) -> ScoreResult:
    """Static depth, per_loop: each distinct context is prefilled once into a cache, the cache rows are
    repeated for the continuations sharing it, and every continuation runs as one chunk. Within a
    forward every loop keeps its KV, so this equals a cache-free forward over context + continuation."""
    if any(len(c) == 0 for c in contexts) or any(len(t) == 0 for t in continuations):
        raise ValueError("contexts and continuations need at least one token each")
    groups: dict[tuple[int, ...], int] = {}
    owner = [groups.setdefault(tuple(c), len(groups)) for c in contexts]  # row → its distinct context
    ids, mask = left_pad([list(c) for c in groups], 0)
    K = max(len(t) for t in continuations)
    limit = model.config.max_position_embeddings
    longest = max(len(c) + len(t) for c, t in zip(contexts, continuations))  # positions are per row
    if longest > limit:
        raise ValueError(f"context + continuation of {longest} tokens exceeds max_position_embeddings={limit}")
    cache = KVCache(model.config, batch_size=len(groups), max_len=ids.shape[1] + K, num_loops=R,
                    strategy="per_loop", dtype=model.dtype, device=model.device)
    first = model(ids.to(model.device), attention_mask=mask.to(model.device), num_loops=R, cache=cache,
                  logits_to_keep=1).logits[:, -1]  # (U, V): predicts each continuation's first token
    rows = torch.tensor(owner, device=model.device)
    cont = torch.zeros(len(continuations), K, dtype=torch.long)
    cmask = torch.zeros(len(continuations), K, dtype=torch.long)
    for i, t in enumerate(continuations):  # right-padded: a pad comes after every token that is scored
        cont[i, : len(t)] = torch.as_tensor(list(t))
        cmask[i, : len(t)] = 1
    cont, cmask = cont.to(model.device), cmask.to(model.device)
    preds = first.index_select(0, rows)[:, None]  # (N, 1, V)
    if K > 1:
        rest = model(cont[:, :-1], attention_mask=cmask[:, :-1], num_loops=R, cache=cache.select_rows(rows)).logits
        preds = torch.cat([preds, rest], dim=1)  # (N, K, V): prediction of continuation token j
    logp = torch.log_softmax(preds.float(), -1)
    out = ScoreResult([], [], [])
    for i, t in enumerate(continuations):
        k = len(t)
        row, target = logp[i, :k], cont[i, :k]
        out.logprobs.append(row.gather(-1, target[:, None])[:, 0].tolist())
        out.greedy.append(bool((row.argmax(-1) == target).all()))
        out.loops.append([R] * k)
    return out
