"""The loop-aware KV cache.

A *slot* is one (B, Hkv, T, Dh) key buffer and one value buffer. Prelude and coda layers have one slot
each. Core layers have, by strategy:

    per_loop   one slot per (layer, loop): loop r of a later token reads loop r of earlier tokens
    last       one slot per layer, holding each token's last computed loop
    mean       one slot per layer, holding the mean of each token's computed loops
    first      one slot per layer, holding each token's first loop

Within one forward (prefill or a decode step) the new tokens always see *each other* at the current
loop: at loop r the layer writes the new tokens' loop-r K/V into the slot and attends over it, so a
prompt keeps every loop's KV while it runs (sharing inside prefill costs >10 GSM8K points, Ouro §5.4).
`commit()` then replaces what the new positions hold by what the strategy keeps and advances the cache.

A token that stops at loop e < R (fewer loops than the cache was built for) exposes its deepest
computed KV to deeper loops of later tokens: with per_loop, slots e+1..R of that position are filled
with its loop-e K/V; `last` holds loop e, `mean` the mean of loops 1..e, `first` loop 1. `depth` records
each position's loop count.

Buffers are allocated once for `max_len` positions (no per-step concatenation). A sliding-window layer
(Gemma-3, Mistral; `LoopConfig.layer_types`) keeps only what its later queries can see, the last
`sliding_window − 1` positions, in a ring of that many columns per slot; within a forward the new positions'
K/V wait beside the ring (`update` returns the kept positions then the new ones) and `commit` writes the last
of them into it, so a chunk longer than the window never overwrites keys its own earlier queries still need.
"""

from __future__ import annotations

import torch

from .config import LoopConfig

STRATEGIES = ("per_loop", "last", "mean", "first")


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown kv strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    return strategy


class KVCache:
    def __init__(
        self,
        config: LoopConfig,
        *,
        batch_size: int,
        max_len: int,
        num_loops: int,
        strategy: str = "per_loop",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        sliding_ring: bool = True,
    ):
        """sliding_ring=False: sliding-window layers keep every position like full ones (the window still
        applies to what they attend to); the default keeps only the window, the reference tests compare."""
        self.strategy = check_strategy(strategy)
        if num_loops < 1:
            raise ValueError(f"num_loops must be ≥ 1, got {num_loops}")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be ≥ 1, got {batch_size}, {max_len}")
        self.config, self.num_loops, self.batch_size, self.max_len = config, num_loops, batch_size, max_len
        core_slots = num_loops if strategy == "per_loop" else 1
        P, C = config.num_prelude_layers, config.num_core_layers
        # first slot of each layer, counted in its own storage (full length, or a ring for sliding layers);
        # a core layer under per_loop owns num_loops consecutive slots
        self._local = [sliding_ring and config.is_sliding(i) for i in range(config.num_layers)]
        self._base, n, n_local = [], 0, 0
        for layer_idx in range(config.num_layers):
            width = core_slots if P <= layer_idx < P + C else 1
            self._base.append(n_local if self._local[layer_idx] else n)
            if self._local[layer_idx]:
                n_local += width
            else:
                n += width
        self.num_slots, self.num_local_slots = n, n_local
        # a query sees keys less than `sliding_window` back: the ring keeps the last window − 1 positions
        self.ring = min(config.sliding_window - 1, max_len) if n_local else 0
        Hkv, Dh = config.num_key_value_heads, config.head_dim
        self.k = torch.zeros((n, batch_size, Hkv, max_len, Dh), dtype=dtype, device=device)
        self.v = torch.zeros((n, batch_size, Hkv, max_len, Dh), dtype=dtype, device=device)
        self.k_local = torch.zeros((n_local, batch_size, Hkv, self.ring, Dh), dtype=dtype, device=device)
        self.v_local = torch.zeros((n_local, batch_size, Hkv, self.ring, Dh), dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # key is a real token
        self.depth = torch.zeros(batch_size, max_len, dtype=torch.int16, device=device)  # loops each position ran
        self.num_valid = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self.length = 0  # positions committed
        self._pending = 0  # positions written by the running forward
        self._loops = 0  # loops the running forward runs
        self._held: dict[int, list[torch.Tensor]] = {}  # core layer → [k, v] kept aside for first/mean
        self._new: dict[int, list[torch.Tensor]] = {}  # ring slot → [k, v] of the running forward's positions

    # ------------------------------------------------------------------ memory

    @property
    def _slot_bytes(self) -> int:
        return 2 * self.config.num_key_value_heads * self.config.head_dim * self.k.element_size()

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one position of one sequence costs while every layer holds it (all layers, all slots);
        past the window, sliding layers hold no more positions."""
        return (self.num_slots + self.num_local_slots) * self._slot_bytes

    @property
    def sliding_kept(self) -> int:
        """Past positions a sliding layer's queries see keys of (the newest ones; 0 without sliding layers)."""
        return min(self.length, self.ring) if self.num_local_slots else self.length

    @property
    def core_bytes_per_token(self) -> int:
        """The share of `bytes_per_token` held by the core layers (what the strategy changes)."""
        core_slots = self.num_loops if self.strategy == "per_loop" else 1
        return self._slot_bytes * core_slots * self.config.num_core_layers

    @property
    def kv_bytes(self) -> int:
        """Bytes holding the positions stored so far (padding included: it occupies the buffer)."""
        positions = self.num_slots * self.length + self.num_local_slots * min(self.length, self.ring)
        return self._slot_bytes * self.batch_size * positions

    @property
    def nbytes(self) -> int:
        """Bytes allocated (full-length buffers for max_len positions, rings for sliding layers)."""
        return self.k.nbytes + self.v.nbytes + self.k_local.nbytes + self.v_local.nbytes

    def select_rows(self, index: torch.Tensor) -> KVCache:
        """A new cache holding rows `index` of this one (repeats allowed: one prefix, several continuations)."""
        assert self._pending == 0, "select_rows() inside a forward"
        new = object.__new__(KVCache)
        new.__dict__.update(self.__dict__)
        index = index.to(self.k.device)
        new.k, new.v = self.k.index_select(1, index), self.v.index_select(1, index)
        new.k_local, new.v_local = self.k_local.index_select(1, index), self.v_local.index_select(1, index)
        new.valid, new.depth = self.valid.index_select(0, index), self.depth.index_select(0, index)
        new.num_valid = self.num_valid.index_select(0, index)
        new.batch_size, new._held, new._new = len(index), {}, {}
        return new

    # ------------------------------------------------------------------ writes

    def slot(self, layer_idx: int, loop_idx: int) -> int:
        if self.strategy == "per_loop" and self.config.is_core(layer_idx):
            return self._base[layer_idx] + loop_idx
        return self._base[layer_idx]

    def begin(self, new_valid: torch.Tensor, *, num_loops: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a forward over S new positions. new_valid (B, S) bool.

        Returns RoPE positions (B, S) (a row's position counts only its real tokens, so a left-padded
        row matches the same prompt alone) and key validity (B, length + S).
        """
        B, S = new_valid.shape
        if B != self.batch_size:
            raise ValueError(f"batch of {B} rows does not match the cache's batch_size={self.batch_size}")
        if self.length + S > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; {self.length} stored + {S} new do not fit")
        if num_loops > self.num_loops:
            raise ValueError(f"num_loops={num_loops} exceeds the {self.num_loops} loops this cache was built for")
        L = self.length
        positions = (self.num_valid[:, None] + new_valid.long().cumsum(1) - 1).clamp(min=0)
        self.valid[:, L : L + S] = new_valid
        self._pending, self._loops = S, num_loops
        return positions, self.valid[:, : L + S]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, loop_idx: int,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions' K/V (n, Hkv, S, Dh) for (layer, loop); return K/V over all positions.

        rows: the batch rows these are (default all B): rows that stopped looping are left out, so
        what their positions hold stays what they computed last.
        """
        L, S = self.length, self._pending
        assert k.shape[2] == S, "update() outside begin()/commit() or with a different length"
        at = slice(None) if rows is None else rows
        if self.config.is_core(layer_idx) and self.strategy in ("first", "mean"):
            held = self._held.get(layer_idx)
            if held is None:  # first write of this forward: every row computes loop 1
                shape = (self.batch_size, *k.shape[1:])
                held = self._held[layer_idx] = [torch.zeros(shape, dtype=torch.float32, device=k.device),
                                                torch.zeros(shape, dtype=torch.float32, device=k.device)]
            if self.strategy == "mean":
                held[0][at] += k.float()
                held[1][at] += v.float()
            elif loop_idx == 0:
                held[0][at] = k.float()
                held[1][at] = v.float()
        s = self.slot(layer_idx, loop_idx)
        if self._local[layer_idx]:
            return self._update_ring(k, v, s, rows)
        if rows is None:
            self.k[s, :, :, L : L + S] = k
            self.v[s, :, :, L : L + S] = v
            return self.k[s, :, :, : L + S], self.v[s, :, :, : L + S]
        self.k[s, rows, :, L : L + S] = k
        self.v[s, rows, :, L : L + S] = v
        return self.k[s, rows, :, : L + S], self.v[s, rows, :, : L + S]

    def _ring_index(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, device=self.k_local.device) % max(self.ring, 1)

    def _new_kv(self, s: int, like: torch.Tensor) -> list[torch.Tensor]:
        new = self._new.get(s)
        if new is None:
            shape = (self.batch_size, *like.shape[1:])  # (B, Hkv, S, Dh)
            new = self._new[s] = [like.new_zeros(shape, dtype=self.k.dtype), like.new_zeros(shape, dtype=self.k.dtype)]
        return new

    def _update_ring(self, k: torch.Tensor, v: torch.Tensor, s: int,
                     rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A sliding layer: keep the new K/V aside until commit; return the kept positions' K/V then the new."""
        new = self._new_kv(s, k)
        at = slice(None) if rows is None else rows
        new[0][at], new[1][at] = k, v
        idx = self._ring_index(self.length - self.sliding_kept, self.length)
        ring_k, ring_v = (self.k_local[s], self.v_local[s]) if rows is None else (self.k_local[s, rows], self.v_local[s, rows])
        return (torch.cat([ring_k.index_select(2, idx), new[0][at]], dim=2),
                torch.cat([ring_v.index_select(2, idx), new[1][at]], dim=2))

    def commit(self, exit_loops: torch.Tensor | None = None) -> None:
        """Store what the strategy keeps for the new positions and advance the cache.

        exit_loops (B, S): loops each new position ran (default: all the forward's loops); 0 for a
        position not computed (a finished row). Deeper slots of a position that stopped early get its
        deepest computed K/V (per_loop); `mean` divides by each position's own loop count.
        """
        L, S, R = self.length, self._pending, self._loops
        new = slice(L, L + S)
        if exit_loops is None:
            exit_loops = torch.full((self.batch_size, S), R, dtype=torch.long, device=self.k.device)
        P, C = self.config.num_prelude_layers, self.config.num_core_layers
        for layer_idx, (hk, hv) in self._held.items():
            s = self.slot(layer_idx, 0)
            if self.strategy == "mean":
                n = exit_loops.clamp(min=1).to(hk.dtype)[:, None, :, None]  # (B, 1, S, 1)
                hk, hv = hk / n, hv / n
            if self._local[layer_idx]:
                self._new[s] = [hk.to(self.k.dtype), hv.to(self.v.dtype)]
                continue
            self.k[s, :, :, new] = hk.to(self.k.dtype)
            self.v[s, :, :, new] = hv.to(self.v.dtype)
        if self.strategy == "per_loop" and bool((exit_loops < self.num_loops).any()):
            # slot r of a position that ran e ≤ r loops ← its slot e-1 (its deepest computed loop)
            Rc = self.num_loops
            src = torch.minimum(torch.arange(Rc, device=exit_loops.device)[:, None, None],
                                (exit_loops - 1).clamp(min=0)[None])  # (Rc, B, S)
            idx = src[:, :, None, :, None].expand(Rc, self.batch_size, self.k.shape[2], S, self.k.shape[4])
            for layer_idx in range(P, P + C):
                base = self._base[layer_idx]
                if self._local[layer_idx]:
                    like = self.k_local.new_empty(self.batch_size, self.k.shape[2], S, self.k.shape[4])
                    pend = [self._new_kv(base + r, like) for r in range(Rc)]
                    ks = torch.stack([p[0] for p in pend]).gather(0, idx)
                    vs = torch.stack([p[1] for p in pend]).gather(0, idx)
                    for r in range(Rc):
                        self._new[base + r] = [ks[r], vs[r]]
                    continue
                slots = slice(base, base + Rc)
                self.k[slots, :, :, new] = self.k[slots, :, :, new].gather(0, idx)
                self.v[slots, :, :, new] = self.v[slots, :, :, new].gather(0, idx)
        keep = min(S, self.ring)
        if keep:  # the ring takes the newest positions of this forward
            cols = self._ring_index(L + S - keep, L + S)
            for s, (nk, nv) in self._new.items():
                self.k_local[s].index_copy_(2, cols, nk[:, :, S - keep :])
                self.v_local[s].index_copy_(2, cols, nv[:, :, S - keep :])
        self.depth[:, new] = exit_loops.to(self.depth.dtype)
        self.num_valid += self.valid[:, new].sum(1)
        self.length += S
        self._pending, self._held, self._new = 0, {}, {}
