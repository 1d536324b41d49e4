"""The request-level engine: continuous batching, scheduled loop by loop.

    engine = Engine(model, kv="last", max_loops=4, max_batch_size=32, max_tokens=8192)
    rid = engine.add_request(prompt_ids, max_new_tokens=64, exit="q:0.6")
    while engine.has_unfinished_requests():
        for out in engine.step(): ...          # RequestOutput: new tokens of this step, their loops

One step = schedule → execute → update. The unit of work is an *item*: a request's tokens at one loop —
one decoding token, or a chunk of its prompt. A step runs **one pass of the core** over every item, each
at its own loop: the items' tokens sit side by side in one packed (1, N, D) tensor, so projections and
MLPs are one matmul over all of them; attention stores each item's K/V in its own pool row and attends
item by item (decoding tokens grouped by loop index). After the pass, an item whose exit policy fires
(or that ran its request's last loop) is read out and sampled; its next token starts loop 1 in the next
step, while other items are still deeper. Prompts are chunked under a per-step token budget
(`max_step_tokens`) and share steps with decoding tokens; a chunk runs all its loops, one per step.

Exactness: an item reads only its own request's KV, so a request's tokens and loops do not depend on
its batch-mates or on when it joined — the same as `looplm.generate` run on it alone. Chunking does
not change a result either: under a shared strategy (last/mean/first) a prompt keeps every loop's KV in
a scratch buffer until its whole prefill is done, then commits what the strategy keeps, as a single-pass
prefill does; under per_loop the pool's per-loop slots already are that. (One exception keeps exactness
the simple way: a model with coda layers under an exit policy that reads logits prefills its prompt as
one chunk, since those per-loop readouts write coda KV that later chunks would see.)
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .engine import check_sampling, sample, stop_tokens_for
from .exits import ExitPolicy, LoopTracker, QExit, gate_update
from .loops import first_exits
from .model import LoopedLM, _Attend, _Context
from .pool import KV, KVPool, parse_kv
from .store import PrefixStore, chunk_keys, weights_fingerprint

STORE_KEY_VERSION = 1  # bump when what a stored chunk holds changes


def _device_name(device: torch.device) -> str:
    """Where KV was computed, for the store's key: kernels differ across device kinds and GPU models."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_tokens: list[int]  # tokens sampled this step (0 or 1)
    loops: list[int]  # loops each of them ran
    logprobs: list[float]  # log p of each under the model (before temperature)
    finished: bool
    finish_reason: str | None  # "stop" (a stop token, included in new_tokens), "length", or None
    num_prompt_tokens: int = 0
    kv_bytes: int = 0  # KV the request holds after this step (its pool row; + its prompt scratch while prefilling)
    cached_tokens: int = 0  # prompt positions whose KV came from the prefix store (not computed)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per new token: the k likeliest
    greedy: list[bool] = field(default_factory=list)  # per new token: it is the argmax (forced or sampled alike)


@dataclass(eq=False)
class _Request:
    id: str
    order: int
    prompt: list[int]
    num_loops: int
    policy: ExitPolicy | None
    sampling: dict
    generator: torch.Generator | None
    stop: frozenset[int]
    max_new_tokens: int
    top_logprobs: int = 0
    force: list[int] | None = None  # tokens to emit instead of sampling (-1: sample there); done after the last
    row: int = -1
    cached: int = 0  # prompt positions loaded from the prefix store
    committed: int = 0  # prompt positions committed chunk by chunk (prefix_kv="committed")
    store_keys: list[str] | None = None  # the prompt's chunk keys when the store serves this request
    prefilled: int = 0  # prompt positions whose chunks ran every loop
    scratch_k: KV | None = None  # (C, R, Hkv, prompt, Dh): per-loop prompt KV (shared strategies)
    scratch_v: KV | None = None
    item: _Item | None = None  # the work in flight
    next_token: int | None = None  # sampled, to be fed at the next step
    tokens: list[int] = field(default_factory=list)
    loops: list[int] = field(default_factory=list)

    @property
    def need(self) -> int:
        return len(self.prompt) + self.max_new_tokens

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)


@dataclass(eq=False)
class _Item:
    req: _Request
    start: int  # position of the first token
    ids: list[int]  # the S tokens
    prefill: bool
    loop: int = 0  # 0-based loop this item runs next
    x: torch.Tensor | None = None  # (S, D) the state entering the next loop
    e: torch.Tensor | None = None  # (S, D) the prelude's output (re-injected)
    tracker: LoopTracker | None = None
    exit_loop: torch.Tensor | None = None  # (S,) prefill under a policy: each position's exit loop (0: not yet)
    exit_h: torch.Tensor | None = None  # (S, D) ... and its state there
    size: int = 0  # S

    def __post_init__(self):
        self.size = len(self.ids)

    @property
    def final(self) -> bool:  # the last chunk of the prompt
        return self.prefill and self.start + self.size == len(self.req.prompt)


@dataclass
class _Group:
    """The decoding tokens of a step, attended in one call: packed indices, loops, pool rows and positions."""

    loops: torch.Tensor  # (n,) the 0-based loop each token runs (its slot offset under per_loop)
    first: torch.Tensor  # (n,) bool: the token runs its first loop
    idx: torch.Tensor  # (n,) indices into the packed tokens
    rows: torch.Tensor  # (n,)
    pos: torch.Tensor  # (n,) the token's position = keys before it
    T: int  # keys read: max(pos) + 1
    mask: torch.Tensor | None  # (n, 1, 1, T) or None when every row sees all T keys
    window_mask: torch.Tensor | None  # the same for sliding-window layers
    only: tuple[int, int, int, int] | None = None  # one token: (packed index, loop, row, position) as ints
    span: tuple[int, int] | None = None  # the rows are r0..r1-1 in this order: keys are read as a view of the pool
    in_order: bool = False  # idx is 0..n-1: the tokens are packed in group order


@dataclass
class _Plan:
    # (item, packed offset, ((mask, is_causal) of full layers, of sliding layers)): keys are positions 0..end
    prefill: list[tuple[_Item, int, tuple]]
    decode: _Group | None


class Engine:
    """Continuous batching of requests, each with its own compute budget (see the module docstring).

    model: a LoopedLM. kv: the KV strategy of this engine's pool, optionally with ':int8' ("last:int8": int8
    codes with a scale per token and head in the pool, the prompt scratch and the store). max_loops: the most loops a request
    may ask for (default the model's num_loops). max_batch_size: requests running at once (pool rows).
    max_tokens: KV positions the engine may hold; a request reserves prompt + max_new_tokens and waits
    until that fits. max_step_tokens: tokens one step may process (prompt chunks + decoding tokens).
    kv_store: a `PrefixStore` (or its tier specs, e.g. ["host:4GiB", "redis://127.0.0.1:6379"]): prompts
    reuse the KV of earlier prompts' full chunks and store their own (docs/memory.md). prefix_kv: what a
    stored chunk holds under the shared strategies — "loops" (every loop's KV: warm ≡ a single-pass prefill)
    or "committed" (what the strategy keeps, 1/R of the core's bytes: every prompt is then prefilled chunk
    by chunk, each chunk committed before the next reads it, like earlier turns of a conversation, so warm ≡
    cold again; per_loop keeps every loop either way). fuse: call `model.fuse()` (fused projections, and on
    a CPU packed weights: a copy of the projections' bytes; `looplm.fused`).
    """

    def __init__(self, model: LoopedLM, *, kv: str = "last", max_loops: int | None = None,
                 max_batch_size: int = 32, max_tokens: int = 8192, max_step_tokens: int = 512,
                 kv_store: PrefixStore | Sequence[str] | None = None, prefix_kv: str = "loops", fuse: bool = True):
        self.model, self.config = model, model.config
        if fuse:  # q|k|v and gate|up as one matmul each, packed for oneDNN where it can (looplm.fused)
            model.fuse()
        self.kv, self.kv_dtype = parse_kv(kv)  # "last:int8": the strategy, and int8 KV in the pool and the store
        self.max_loops = model.resolve_loops(max_loops)
        for name, value in (("max_batch_size", max_batch_size), ("max_tokens", max_tokens),
                            ("max_step_tokens", max_step_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
        self.max_batch_size, self.max_tokens, self.max_step_tokens = max_batch_size, max_tokens, max_step_tokens
        self.pool = KVPool(self.config, strategy=self.kv, kv_dtype=self.kv_dtype, max_loops=self.max_loops,
                           max_rows=max_batch_size,
                           dtype=model.dtype, device=model.device)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._order = itertools.count()
        self.reserved = 0  # positions reserved by running requests
        self.num_steps = 0
        self.prefill_core_layer_evals = 0  # (token, core layer) evaluations of prompt chunks
        self.decode_core_layer_evals = 0  # ... of generated tokens
        self._plan: _Plan | None = None
        self.default_stop = stop_tokens_for(self.config)
        if kv_store is not None and not isinstance(kv_store, PrefixStore):
            kv_store = PrefixStore.from_specs(list(kv_store), device=model.device)
        self.store = kv_store
        if prefix_kv not in ("loops", "committed"):
            raise ValueError(f"prefix_kv must be 'loops' or 'committed', got {prefix_kv!r}")
        self.prefix_kv = prefix_kv if self.kv != "per_loop" else "loops"
        self._fingerprint = weights_fingerprint(model) if kv_store is not None else None
        self.prefix_queries = 0  # chunks looked up in the store
        self.prefix_hits: dict[str, int] = {}  # chunks found, by tier

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_ids: Sequence[int] | torch.Tensor, *, max_new_tokens: int = 64,
                    num_loops: int | None = None, exit: str | ExitPolicy | None = None,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, stop_tokens: Sequence[int] | None = None,
                    request_id: str | None = None, top_logprobs: int = 0,
                    force: Sequence[int | None] | None = None) -> str:
        """Queue a request; returns its id. Every check happens here, so a bad request never enters a step.

        force: the tokens to emit instead of sampling (teacher forcing: scoring, or the given turns of a
        dialogue); None or -1 leaves a position to the model. The request ends after its last forced entry
        (max_new_tokens is then len(force)) and stop tokens do not end it earlier."""
        cfg = self.config
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1:
                raise ValueError(f"prompt_ids must be one sequence of token ids, got shape {tuple(prompt_ids.shape)}")
            prompt_ids = prompt_ids.tolist()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt: a request needs at least one token")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}); got {bad[:5]}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
        if force is not None:
            force = [-1 if t is None else int(t) for t in force]
            bad = [t for t in force if not -1 <= t < cfg.vocab_size]
            if not force or bad:
                raise ValueError(f"force must be a non-empty list of token ids in [0, {cfg.vocab_size}) or None/-1, "
                                 f"got {bad[:5] if bad else force}")
            max_new_tokens, stop_tokens = len(force), []
        if num_loops is not None and (not isinstance(num_loops, int) or isinstance(num_loops, bool)
                                      or not 1 <= num_loops <= self.max_loops):
            raise ValueError(f"num_loops must be an integer in [1, max_loops={self.max_loops}], got {num_loops!r}")
        R, policy = self.model.resolve_budget(num_loops, exit)
        if R > self.max_loops:
            what = "the model's default num_loops" if exit is None else f"exit policy {str(exit)!r}"
            raise ValueError(f"{what} runs {R} loops; this engine allows max_loops={self.max_loops} "
                             f"(pass num_loops ≤ {self.max_loops})")
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool) or not 0 <= top_logprobs <= cfg.vocab_size:
            raise ValueError(f"top_logprobs must be an integer in [0, {cfg.vocab_size}], got {top_logprobs!r}")
        limit = cfg.max_position_embeddings
        if len(prompt) + max_new_tokens > limit:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds the position "
                             f"limit max_position_embeddings={limit}")
        if len(prompt) + max_new_tokens > self.max_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} can never fit in this "
                             f"engine's max_tokens={self.max_tokens}")
        stop = self.default_stop if stop_tokens is None else [int(t) for t in stop_tokens]
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        gen = None
        if temperature > 0 and seed is not None:
            gen = torch.Generator(device=self.model.device).manual_seed(int(seed))
        req = _Request(rid, next(self._order), prompt, R, policy,
                       dict(temperature=temperature, top_k=top_k, top_p=top_p), gen, frozenset(stop), max_new_tokens,
                       top_logprobs, force)
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        """Drop a request, waiting or running; its row and reservation are free for the next step."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            raise KeyError(f"unknown request id {request_id!r} (finished, aborted, or never added)")
        if req in self.waiting:
            self.waiting.remove(req)
        else:
            self._release(req)

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Roll a decoding request back to its first `num_tokens` generated tokens (≥ 1): its row keeps the
        prompt and the tokens before the last kept one, which is fed again at the next step (speculative
        decoding rejects a draft this way). A sampling generator is not rolled back."""
        req = self.requests.get(str(request_id))
        if req is None or req not in self.running:
            raise KeyError(f"unknown or not running request id {request_id!r}")
        if req.prefilling or not 1 <= num_tokens <= len(req.tokens):
            raise ValueError(f"truncate({request_id!r}, {num_tokens}): the request has {len(req.tokens)} generated "
                             f"tokens{' and is still prefilling' if req.prefilling else ''}")
        req.item = None  # a token in flight is dropped; its position is past the new length
        del req.tokens[num_tokens:], req.loops[num_tokens:]
        req.next_token = req.tokens[-1]
        self.pool.truncate(req.row, len(req.prompt) + num_tokens - 1)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        scratch = sum(r.scratch_k.nbytes + r.scratch_v.nbytes for r in self.running if r.scratch_k is not None)
        return dict(running=len(self.running), waiting=len(self.waiting), kv_bytes=self.pool.kv_bytes + scratch,
                    kv_allocated_bytes=self.pool.nbytes + scratch, reserved_tokens=self.reserved,
                    steps=self.num_steps, prefill_core_layer_evals=self.prefill_core_layer_evals,
                    decode_core_layer_evals=self.decode_core_layer_evals,
                    prefix_cache_queries=self.prefix_queries, prefix_cache_hits=dict(self.prefix_hits))

    def request_kv_bytes(self, request_id: str) -> int:
        req = self.requests[str(request_id)]
        if req.row < 0:
            return 0
        return self.pool.row_bytes(req.row) + (0 if req.scratch_k is None else req.scratch_k.nbytes + req.scratch_v.nbytes)

    def _release(self, req: _Request) -> None:
        if req in self.running:
            self.running.remove(req)
            self.pool.free(req.row)
            self.reserved -= req.need
        req.scratch_k = req.scratch_v = req.item = None
        if not self.running and not self.waiting:
            self.pool.release()

    # ------------------------------------------------------------------ schedule

    def _admit(self) -> None:
        """First come, first served: the head of the queue enters when a row is free and its KV fits."""
        while self.waiting and self.pool.free_rows and self.reserved + self.waiting[0].need <= self.max_tokens:
            req = self.waiting.popleft()
            req.row = self.pool.acquire(req.need)
            self.reserved += req.need
            if self.kv != "per_loop":  # every loop's prompt KV, until the prefill commits
                cfg = self.config
                shape = (cfg.num_core_layers, req.num_loops, cfg.num_key_value_heads, len(req.prompt), cfg.head_dim)
                req.scratch_k = KV.zeros(shape, dtype=self.model.dtype, device=self.model.device, int8=self.pool.int8)
                req.scratch_v = KV.zeros(shape, dtype=self.model.dtype, device=self.model.device, int8=self.pool.int8)
            self.running.append(req)  # before the lookup: whatever happens there, _release frees the row
            if self.store is not None:
                self._lookup(req)

    # ------------------------------------------------------------------ the prefix store

    def _stores(self, req: _Request) -> bool:
        """A coda read per loop (a logits policy) writes coda KV that differs from what the prefix holds once
        prefilled, so those requests neither read nor write the store (their prompt is one chunk anyway)."""
        return not (self.model.coda and req.policy is not None and "logits" in req.policy.needs)

    def _root(self, req: _Request, num_loops: int) -> str:
        """What a stored chunk's KV depends on besides its tokens (docs/memory.md, "The key")."""
        parts = [f"v{STORE_KEY_VERSION}", f"torch={torch.__version__}", f"device={_device_name(self.model.device)}",
                 self._fingerprint, str(self.model.dtype), f"kv_dtype={self.kv_dtype}", f"loops={num_loops}",
                 f"chunk={self.store.chunk_size}"]
        if self.prefix_kv == "committed":  # what the strategy keeps
            parts.append(f"committed={self.kv}")
        if self.model.coda:  # coda KV is read at each position's exit
            parts.append(f"exit={req.policy.spec() if req.policy is not None else 'static'}")
        return "|".join(parts)

    def _lookup(self, req: _Request) -> None:
        """Load the longest stored prefix of the prompt's full chunks (the last prompt token is always
        computed: its logits give the first new token)."""
        if not self._stores(req):
            return
        cs = self.store.chunk_size
        usable = (len(req.prompt) - 1) // cs
        req.store_keys = chunk_keys(self._root(req, req.num_loops), req.prompt, cs)
        if not usable:
            return
        # KV stored with more loops holds this request's loops too (loop r never sees later loops), unless
        # a coda reads it at the exit
        more = not self.model.coda and self.prefix_kv == "loops"
        stored_loops = [req.num_loops] + (list(range(req.num_loops + 1, self.max_loops + 1)) if more else [])
        for R in stored_loops:
            keys = req.store_keys if R == req.num_loops else chunk_keys(self._root(req, R), req.prompt[: usable * cs], cs)
            n = 0
            for i in range(usable):
                self.prefix_queries += 1
                got = self.store.get(keys[i])
                if got is not None and not self._load(req, got[0], i * cs, R):
                    self.store.discard(keys[i])  # not what its key promises: never read again
                    got = None
                if got is None:
                    break
                self.prefix_hits[got[1]] = self.prefix_hits.get(got[1], 0) + 1
                n += 1
            if n:
                req.cached = req.prefilled = n * cs
                if self.prefix_kv == "committed":  # loaded as committed; under "loops" the final commit covers it
                    req.committed = req.cached
                self.pool.lengths[req.row] = req.cached
                return

    def _layout(self, num_loops: int) -> list[tuple[int, int]]:
        """(layer_idx, loop_idx) of each slot of a stored chunk: every loop of the core ("loops"), or its one
        committed slot (loop -1, "committed"), and one slot for every other layer."""
        committed = self.prefix_kv == "committed"
        return [(i, -1 if committed and self.config.is_core(i) else r) for i in range(self.config.num_layers)
                for r in range(num_loops if self.config.is_core(i) and not committed else 1)]

    def _slot_views(self, req: _Request, a: int, b: int, num_loops: int):
        """Views of positions a..b of the request's KV, one (Hkv, b-a, Dh) pair per stored slot."""
        cfg, pool = self.config, self.pool
        for layer_idx, r in self._layout(num_loops):
            if r >= req.num_loops:
                yield None, None
            elif r == -1:  # a committed core slot: the pool's
                s = pool.slot(layer_idx)
                yield pool.k[s, req.row, :, a:b], pool.v[s, req.row, :, a:b]
            elif cfg.is_core(layer_idx) and self.kv != "per_loop":
                j = layer_idx - cfg.num_prelude_layers
                yield req.scratch_k[j, r, :, a:b], req.scratch_v[j, r, :, a:b]
            else:
                s = pool.slot(layer_idx, r)
                yield pool.k[s, req.row, :, a:b], pool.v[s, req.row, :, a:b]

    def _load(self, req: _Request, chunk: dict, a: int, num_loops: int) -> bool:
        """Copy a stored chunk (its K, V — int8 codes and scales under int8 KV — as they were computed) into
        positions a..a+chunk of the request; False when it is not what its key promises (a miss)."""
        cfg, cs = self.config, self.store.chunk_size
        shape = (len(self._layout(num_loops)), cfg.num_key_value_heads, cs, cfg.head_dim)
        want = {"k": (shape, self.pool.k.data.dtype), "v": (shape, self.pool.k.data.dtype)}
        if self.pool.int8:
            want.update(k_scale=(shape[:-1], torch.float32), v_scale=(shape[:-1], torch.float32))
        if set(chunk) != set(want) or any(tuple(chunk[n].shape) != s or chunk[n].dtype != d for n, (s, d) in want.items()):
            return False
        k = KV(chunk["k"], chunk.get("k_scale"), self.model.dtype)
        v = KV(chunk["v"], chunk.get("v_scale"), self.model.dtype)
        for i, (dk, dv) in enumerate(self._slot_views(req, a, a + cs, num_loops)):
            if dk is not None:
                dk[...] = k[i]
                dv[...] = v[i]
        if self.prefix_kv == "committed":
            self._broadcast(req, a, a + cs)
        return True

    def _broadcast(self, req: _Request, a: int, b: int) -> None:
        """prefix_kv="committed": the committed core KV of positions a..b is what every loop of the rest of
        the prompt reads (as the tokens of an earlier turn)."""
        cfg, pool = self.config, self.pool
        for j in range(cfg.num_core_layers):
            s = pool.slot(cfg.num_prelude_layers + j)
            for r in range(req.num_loops):
                req.scratch_k[j, r, :, a:b] = pool.k[s, req.row, :, a:b]
                req.scratch_v[j, r, :, a:b] = pool.v[s, req.row, :, a:b]

    def _commit_chunk(self, req: _Request) -> None:
        """prefix_kv="committed": the chunk that just finished every loop commits, is broadcast to every
        loop, and is stored."""
        cs = self.store.chunk_size
        a, b = req.committed, req.committed + cs
        self.pool.commit_prompt(req.row, a, req.scratch_k[:, :, :, a:b], req.scratch_v[:, :, :, a:b], req.num_loops)
        self._broadcast(req, a, b)
        req.committed = b
        if b // cs - 1 < len(req.store_keys):
            self._put(req, b // cs - 1)

    def _save(self, req: _Request) -> None:
        """Store the prompt's full chunks that were computed here (before the prefill commits)."""
        for i in range(req.cached // self.store.chunk_size, len(req.store_keys)):
            self._put(req, i)

    def _put(self, req: _Request, i: int) -> None:
        """Store chunk i of the request's prompt."""
        cs = self.store.chunk_size
        views = list(self._slot_views(req, i * cs, (i + 1) * cs, req.num_loops))
        chunk = {"k": torch.stack([k.data for k, _ in views]), "v": torch.stack([v.data for _, v in views])}
        if self.pool.int8:
            chunk.update(k_scale=torch.stack([k.scale for k, _ in views]), v_scale=torch.stack([v.scale for _, v in views]))
        self.store.put(req.store_keys[i], chunk)

    def _schedule(self) -> list[_Item]:
        budget = self.max_step_tokens
        for req in self.running:  # work in flight continues, and every decoding request gets its token
            if req.item is None and not req.prefilling:
                req.item = _Item(req, self.pool.lengths[req.row], [req.next_token], False)
            if req.item is not None:
                budget -= req.item.size
        for req in self.running:  # new prompt chunks fill what is left
            if req.item is None and req.prefilling and budget > 0:
                left = len(req.prompt) - req.prefilled
                whole = self.model.coda and req.policy is not None and "logits" in req.policy.needs
                size = left if whole else min(left, budget)
                if self.prefix_kv == "committed" and req.store_keys is not None:  # chunks end on store chunks
                    size = min(size, self.store.chunk_size - req.prefilled % self.store.chunk_size)
                req.item = _Item(req, req.prefilled, req.prompt[req.prefilled : req.prefilled + size], True)
                budget -= size
        return [r.item for r in self.running if r.item is not None]

    # ------------------------------------------------------------------ execute

    def _context(self, items: list[_Item]) -> _Context:
        """Packed context for these items: RoPE tables per token and the attention plan."""
        model, dev = self.model, self.model.device
        positions: list[int] = []
        for it in items:
            positions.extend(range(it.start, it.start + it.size))
        pos = torch.tensor(positions, device=dev)[None]
        cos, sin = model.rotary(pos, model.dtype)
        ctx = _Context(cos, sin, None, False, None, attend=self._attend)
        if self.config.has_sliding:
            cos_l, sin_l = (cos, sin) if model.rotary_local is None else model.rotary_local(pos, model.dtype)
            ctx.sliding = _Attend(cos_l, sin_l, None, False)
        prefill, decode, off = [], [], 0
        for it in items:
            if it.prefill:
                prefill.append((it, off, self._prefill_masks(it)))
            else:
                decode.append((it, off))
            off += it.size
        self._plan = _Plan(prefill, self._group(decode) if decode else None)
        return ctx

    def _prefill_masks(self, it: _Item) -> tuple:
        """A chunk's causal masks over keys 0..end, as a single-pass prefill builds them (`LoopedLM._mask`): the
        window applies to sliding layers once the keys reach past it."""
        keys = torch.ones(1, it.start + it.size, dtype=torch.bool, device=self.model.device)
        full = self.model._mask(keys, it.start, it.start, it.size)
        window = self.config.sliding_window
        if not self.config.has_sliding or it.start + it.size <= window:
            return full, full
        return full, self.model._mask(keys, it.start, it.start, it.size, window=window)

    def _group(self, members: list[tuple[_Item, int]]) -> _Group:
        dev = self.model.device
        rows = [it.req.row for it, _ in members]
        span = None
        if len(members) > 1 and max(rows) - min(rows) == len(rows) - 1:  # distinct rows, so a contiguous range:
            members = sorted(members, key=lambda m: m[0].req.row)        # read their keys as one view, no gather
            rows, span = sorted(rows), (min(rows), max(rows) + 1)
        starts = [it.start for it, _ in members]
        loops, idx, rows, pos = torch.tensor([[it.loop for it, _ in members], [o for _, o in members], rows, starts],
                                             device=dev)  # one copy
        T = max(starts) + 1
        keys = torch.arange(T, device=dev)[None]
        seen = keys <= pos[:, None]  # (n, T)
        mask = None if min(starts) == T - 1 else seen[:, None, None]
        window = self.config.sliding_window
        if self.config.has_sliding and T > window:
            window_mask = (seen & (keys > pos[:, None] - window))[:, None, None]
        else:
            window_mask = mask
        only = None
        if len(members) == 1:
            it, o = members[0]
            only = (o, it.loop, it.req.row, it.start)
        in_order = all(o == i for i, (_, o) in enumerate(members))
        return _Group(loops, loops == 0, idx, rows, pos, T, mask, window_mask, only, span, in_order)

    def _attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Store the packed tokens' K/V (1, Hkv, N, Dh) where each belongs and attend: q (1, H, N, Dh) → y."""
        plan, pool, cfg = self._plan, self.pool, self.config
        core = cfg.is_core(layer_idx)
        j = layer_idx - cfg.num_prelude_layers
        shared_core = core and self.kv != "per_loop"
        gqa = attn.n_kv != attn.n_head
        y = torch.empty_like(q) if plan.prefill else None
        for it, off, masks in plan.prefill:
            S, a = it.size, it.start
            b = a + S
            at = slice(off, off + S)
            if shared_core:
                dk, dv = it.req.scratch_k[j, it.loop], it.req.scratch_v[j, it.loop]  # (Hkv, prompt, Dh)
            else:
                s = pool.slot(layer_idx, it.loop if core else 0)
                dk, dv = pool.k[s, it.req.row], pool.v[s, it.req.row]  # (Hkv, capacity, Dh)
            dk[:, a:b] = k[0, :, at]
            dv[:, a:b] = v[0, :, at]
            mask, causal = masks[1] if attn.sliding else masks[0]
            y[:, :, at] = F.scaled_dot_product_attention(
                q[:, :, at], dk[None, :, :b].values(), dv[None, :, :b].values(), attn_mask=mask, is_causal=causal,
                scale=attn.scale, enable_gqa=gqa)
        g = plan.decode
        if g is not None and g.only is not None:  # one decoding token (batch 1): views, no gathers or scatters
            i, loop, row, p = g.only
            s = pool.slot(layer_idx, loop if core else 0)
            rk, rv = pool.k[s, row], pool.v[s, row]  # (Hkv, capacity, Dh)
            kn, vn = k[0, :, i], v[0, :, i]  # (Hkv, Dh)
            rk[:, p] = kn
            rv[:, p] = vn
            if shared_core and self.kv != "last":
                pool.hold(j, g.rows, g.first, kn[None], vn[None])
            yn = F.scaled_dot_product_attention(q[:, :, i : i + 1], rk[None, :, : g.T].values(), rv[None, :, : g.T].values(),
                                                attn_mask=g.window_mask if attn.sliding else g.mask,
                                                scale=attn.scale, enable_gqa=gqa)  # (1, H, 1, Dh)
            if not plan.prefill:
                return yn
            y[:, :, i : i + 1] = yn
        elif g is not None:  # every decoding token in one call, each reading its own row (and its loop's slot)
            base = pool.slot(layer_idx, 0)
            slots = base + g.loops if core and self.kv == "per_loop" else torch.full_like(g.rows, base)
            kn, vn = k[0, :, g.idx].transpose(0, 1), v[0, :, g.idx].transpose(0, 1)  # (n, Hkv, Dh)
            pool.k[slots, g.rows, :, g.pos] = kn
            pool.v[slots, g.rows, :, g.pos] = vn
            if shared_core and self.kv != "last":
                pool.hold(j, g.rows, g.first, kn, vn)
            if g.span is not None and not (core and self.kv == "per_loop"):  # one slot, rows r0..r1-1: a view
                keys = pool.k[base, g.span[0] : g.span[1], :, : g.T].values()  # (n, Hkv, T, Dh)
                vals = pool.v[base, g.span[0] : g.span[1], :, : g.T].values()
            else:
                keys = pool.k[slots, g.rows, :, : g.T].values()
                vals = pool.v[slots, g.rows, :, : g.T].values()
            qn = q[0, :, g.idx].transpose(0, 1)[:, :, None]  # (n, H, 1, Dh)
            yn = F.scaled_dot_product_attention(qn, keys, vals, attn_mask=g.window_mask if attn.sliding else g.mask,
                                                scale=attn.scale, enable_gqa=gqa)
            if not plan.prefill and g.in_order:  # decoding tokens only, packed in group order
                return yn[:, :, 0].transpose(0, 1)[None]
            if y is None:
                y = torch.empty_like(q)
            y[0, :, g.idx] = yn[:, :, 0].transpose(0, 1)
        return y

    def _gate_exits(self, items: list[_Item], lam: torch.Tensor | None, sizes: list[int]) -> dict[int, bool]:
        """Q-exit for every decoding token whose policy reads only the gate, stacked into a few ops instead of a
        handful per token: `gate_update` (what each token's `LoopTracker` does, bit for bit), then the
        policy's bounds (`ExitPolicy.forced`) or its threshold. Returns {item index: exits now}; the items'
        trackers hold their new state."""
        pick = [i for i, it in enumerate(items) if not it.prefill and type(it.req.policy) is QExit]
        if not pick or lam is None:
            return {}
        offsets = list(itertools.accumulate(sizes, initial=0))
        dev = lam.device
        trackers = [items[i].tracker for i in pick]
        cdf, surv = gate_update(torch.cat([t.cdf for t in trackers]), torch.cat([t.survival for t in trackers]),
                                lam[torch.tensor([offsets[i] for i in pick], device=dev)])
        q = torch.tensor([items[i].req.policy.value for i in pick], dtype=torch.float32, device=dev)
        out = {}
        for i, t, c, sv, fires in zip(pick, trackers, cdf.split(1), surv.split(1), (cdf >= q).tolist()):
            t.cdf, t.survival = c, sv
            forced = items[i].req.policy.forced(items[i].loop + 1, items[i].req.num_loops)
            out[i] = fires if forced is None else forced
        return out

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit, run one core pass over every item, read out and sample the items that exit."""
        self._admit()
        items = self._schedule()
        if not items:
            return []
        self.num_steps += 1
        model, cfg, C = self.model, self.config, self.config.num_core_layers
        starting = [it for it in items if it.loop == 0]
        if starting:  # embedding and prelude, once per token
            ids = torch.tensor([t for it in starting for t in it.ids], device=model.device)[None]
            h = model.embed(ids, self._context(starting) if model.prelude else None)[0]  # a context for the prelude
            for it, part in zip(starting, h.split([it.size for it in starting])):
                it.x = it.e = part
                if it.req.policy is not None:
                    it.tracker = LoopTracker(it.req.policy, it.size, part.device, start_hidden=part)
                    if it.prefill:
                        it.exit_loop = torch.zeros(it.size, dtype=torch.long, device=part.device)
                        it.exit_h = torch.empty_like(part)
        # the core pass: every item one loop, injection for the items past their first loop
        x = torch.cat([it.x for it in items])
        e = torch.cat([it.e for it in items])
        if cfg.injection != "none" and any(it.loop > 0 for it in items):
            later = torch.tensor([f for it in items for f in [it.loop > 0] * it.size], device=x.device)
            x = torch.where(later[:, None], model.inject(x, e, 1), x)
        x = model.core_loop(x[None], e[None], self._context(items), 0)[0]
        sizes = [it.size for it in items]
        for it, part in zip(items, x.split(sizes)):
            it.x = part
            if it.prefill:
                self.prefill_core_layer_evals += it.size * C
            else:
                self.decode_core_layer_evals += C
        lam = model.exit_lambda(x) if any(it.req.policy is not None for it in items) else None
        lams = [None] * len(items) if lam is None else list(lam.split(sizes))
        # per-loop logits for policies that read them (the readout writes coda KV, as generate's does)
        sub = [it for it in items if it.req.policy is not None and "logits" in it.req.policy.needs]
        loop_logits: dict[int, torch.Tensor] = {}  # id(item) → (S, V)
        if sub:
            lg = model.readout(torch.cat([it.x for it in sub])[None], self._context(sub) if model.coda else None)[0]
            loop_logits = {id(it): part for it, part in zip(sub, lg.split([it.size for it in sub]))}
        exiting: list[_Item] = []  # decoding tokens that leave the loop now
        finishing: list[_Item] = []  # prompt chunks that ran their last loop
        gated = self._gate_exits(items, lam, sizes)  # decoding tokens under Q-exit, decided in one batch
        for i, it in enumerate(items):
            req, loop = it.req, it.loop + 1
            if not it.prefill and (req.policy is None or i in gated):  # one token: the decision as a bool
                if loop >= req.num_loops if req.policy is None else gated[i]:
                    exiting.append(it)
                it.loop = loop
                continue
            if req.policy is None:
                done = torch.full((it.size,), loop >= req.num_loops, dtype=torch.bool)
            else:
                stats = it.tracker.step(loop, hidden=it.x, lam=lams[i], logits=loop_logits.get(id(it)))
                done = req.policy.exits(stats, req.num_loops)
            if it.prefill:
                if req.policy is not None:
                    _, it.exit_loop, it.exit_h = first_exits(done, loop, it.x, it.exit_loop, it.exit_h)
                if loop == req.num_loops:
                    finishing.append(it)
            elif bool(done[0]):
                exiting.append(it)
            it.loop = loop
        # readout: exiting tokens without per-loop logits, and finished chunks (coda KV at each position's exit)
        read = [it for it in exiting if it.req.policy is None or "logits" not in it.req.policy.needs]
        read += [it for it in finishing if model.coda or it.final]
        logits_of: dict[int, torch.Tensor] = {}
        if read:
            keep, off = [], 0
            for it in read:
                if not it.prefill or it.final:
                    keep.append(off + it.size - 1)
                off += it.size
            h = torch.cat([it.exit_h if it.prefill and it.exit_h is not None else it.x for it in read])
            lg = model.readout(h[None], self._context(read) if model.coda else None,
                              torch.tensor(keep, dtype=torch.long, device=h.device))[0]
            rows = iter(lg)
            for it in read:
                if not it.prefill or it.final:
                    logits_of[id(it)] = next(rows)
        emit: list[tuple[_Request, torch.Tensor, int]] = []  # (request, logits (V,), loops) to sample
        commits: dict[tuple[int, int], list[_Item]] = {}
        for it in exiting:
            req = it.req
            if id(it) not in logits_of:
                logits_of[id(it)] = loop_logits[id(it)][-1]
            commits.setdefault((it.loop, req.num_loops), []).append(it)
        for (e_loops, R), group in commits.items():
            dev = group[0].x.device
            rows = torch.tensor([it.req.row for it in group], device=dev)
            pos = torch.tensor([it.start for it in group], device=dev)
            self.pool.commit_token(rows, pos, e_loops, R)
        for it in finishing:
            req = it.req
            req.prefilled = it.start + it.size
            self.pool.lengths[req.row] = req.prefilled
            req.item = None
            if self.prefix_kv == "committed" and req.store_keys is not None and req.prefilled % self.store.chunk_size == 0:
                self._commit_chunk(req)
            if it.final:
                if req.store_keys and self.prefix_kv == "loops":
                    self._save(req)
                if req.scratch_k is not None:
                    a = req.committed
                    self.pool.commit_prompt(req.row, a, req.scratch_k[:, :, :, a:], req.scratch_v[:, :, :, a:],
                                            req.num_loops)
                    req.scratch_k = req.scratch_v = None
                loops = int(it.exit_loop[-1]) if it.exit_loop is not None else req.num_loops
                emit.append((req, logits_of[id(it)], loops))
        for it in exiting:
            it.req.item = None
            emit.append((it.req, logits_of[id(it)], it.loop))
        outputs = self._emit(emit)
        outputs.sort(key=lambda o: self.requests[o.request_id].order)
        for o in outputs:
            if o.finished:
                self._release(self.requests.pop(o.request_id))
        return outputs

    def _emit(self, emit: list[tuple[_Request, torch.Tensor, int]]) -> list[RequestOutput]:
        """Sample each request's next token from its logits (V,) and say whether it is done."""
        if not emit:
            return []
        logits = torch.stack([lg for _, lg, _ in emit])  # (n, V)
        logp = torch.log_softmax(logits.float(), -1)
        argmax = logits.argmax(-1).tolist()
        tokens = list(argmax)  # greedy rows; sampled rows draw with their own generator; forced rows are given
        for i, (req, lg, _) in enumerate(emit):
            if req.force is not None and len(req.tokens) < len(req.force) and req.force[len(req.tokens)] >= 0:
                tokens[i] = req.force[len(req.tokens)]
            elif req.sampling["temperature"] > 0:
                gens = None if req.generator is None else [req.generator]
                tokens[i] = int(sample(lg[None], generators=gens, **req.sampling)[0])
        picked = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
        outputs = []
        for i, ((req, _, loops), tok, lp) in enumerate(zip(emit, tokens, picked)):
            req.tokens.append(tok)
            req.loops.append(loops)
            req.next_token = tok
            reason = "stop" if tok in req.stop else "length" if len(req.tokens) >= req.max_new_tokens else None
            top = []
            if req.top_logprobs:  # the k likeliest tokens under the model (before temperature), likeliest first
                vals, ids = logp[i].topk(req.top_logprobs)
                top = [list(zip(ids.tolist(), vals.tolist()))]
            outputs.append(RequestOutput(req.id, [tok], [loops], [lp], reason is not None, reason, len(req.prompt),
                                         self.request_kv_bytes(req.id), req.cached, top, [tok == argmax[i]]))
        return outputs
