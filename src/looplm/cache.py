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

Buffers are allocated once for `max_len` positions (no per-step concatenation).
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
    ):
        self.strategy = check_strategy(strategy)
        if num_loops < 1:
            raise ValueError(f"num_loops must be ≥ 1, got {num_loops}")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be ≥ 1, got {batch_size}, {max_len}")
        self.config, self.num_loops, self.batch_size, self.max_len = config, num_loops, batch_size, max_len
        core_slots = num_loops if strategy == "per_loop" else 1
        P, C = config.num_prelude_layers, config.num_core_layers
        # first slot of each layer; a core layer under per_loop owns num_loops consecutive slots
        self._base, n = [], 0
        for layer_idx in range(config.num_layers):
            self._base.append(n)
            n += core_slots if P <= layer_idx < P + C else 1
        self.num_slots = n
        shape = (n, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # key is a real token
        self.depth = torch.zeros(batch_size, max_len, dtype=torch.int16, device=device)  # loops each position ran
        self.num_valid = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self.length = 0  # positions committed
        self._pending = 0  # positions written by the running forward
        self._loops = 0  # loops the running forward runs
        self._held: dict[int, list[torch.Tensor]] = {}  # core layer → [k, v] kept aside for first/mean

    # ------------------------------------------------------------------ memory

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one position of one sequence costs (all layers, all slots)."""
        return 2 * self.num_slots * self.config.num_key_value_heads * self.config.head_dim * self.k.element_size()

    @property
    def core_bytes_per_token(self) -> int:
        """The share of `bytes_per_token` held by the core layers (what the strategy changes)."""
        per_slot = 2 * self.config.num_key_value_heads * self.config.head_dim * self.k.element_size()
        core_slots = self.num_loops if self.strategy == "per_loop" else 1
        return per_slot * core_slots * self.config.num_core_layers

    @property
    def kv_bytes(self) -> int:
        """Bytes holding the positions stored so far (padding included: it occupies the buffer)."""
        return self.bytes_per_token * self.batch_size * self.length

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the buffers for max_len positions)."""
        return self.k.nbytes + self.v.nbytes

    def select_rows(self, index: torch.Tensor) -> KVCache:
        """A new cache holding rows `index` of this one (repeats allowed: one prefix, several continuations)."""
        assert self._pending == 0, "select_rows() inside a forward"
        new = object.__new__(KVCache)
        new.__dict__.update(self.__dict__)
        index = index.to(self.k.device)
        new.k, new.v = self.k.index_select(1, index), self.v.index_select(1, index)
        new.valid, new.depth = self.valid.index_select(0, index), self.depth.index_select(0, index)
        new.num_valid = self.num_valid.index_select(0, index)
        new.batch_size, new._held = len(index), {}
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
        if rows is None:
            self.k[s, :, :, L : L + S] = k
            self.v[s, :, :, L : L + S] = v
            return self.k[s, :, :, : L + S], self.v[s, :, :, : L + S]
        self.k[s, rows, :, L : L + S] = k
        self.v[s, rows, :, L : L + S] = v
        return self.k[s, rows, :, : L + S], self.v[s, rows, :, : L + S]

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
            self.k[s, :, :, new] = hk.to(self.k.dtype)
            self.v[s, :, :, new] = hv.to(self.v.dtype)
        if self.strategy == "per_loop" and bool((exit_loops < self.num_loops).any()):
            # slot r of a position that ran e ≤ r loops ← its slot e-1 (its deepest computed loop)
            Rc = self.num_loops
            src = torch.minimum(torch.arange(Rc, device=exit_loops.device)[:, None, None],
                                (exit_loops - 1).clamp(min=0)[None])  # (Rc, B, S)
            idx = src[:, :, None, :, None].expand(Rc, self.batch_size, self.k.shape[2], S, self.k.shape[4])
            for layer_idx in range(P, P + C):
                slots = slice(self._base[layer_idx], self._base[layer_idx] + Rc)
                self.k[slots, :, :, new] = self.k[slots, :, :, new].gather(0, idx)
                self.v[slots, :, :, new] = self.v[slots, :, :, new].gather(0, idx)
        self.depth[:, new] = exit_loops.to(self.depth.dtype)
        self.num_valid += self.valid[:, new].sum(1)
        self.length += S
        self._pending, self._held = 0, {}
