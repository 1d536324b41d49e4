"""The engine's KV pool: one row per running request, each row with its own length.

Slots are laid out as in `KVCache` (prelude and coda layers one slot each; core layers `max_loops` slots
under `per_loop`, one under the shared strategies), but every row is a request of its own: rows have
different lengths and ages, a finished or aborted request's row is reused, and `truncate(row, n)` rolls a
row back to its first n positions. A row's keys are read only by its own queries, so what one request
computes never depends on the others.

    k, v        (slots, rows, Hkv, capacity, Dh) `KV` buffers: the model's dtype, or int8 codes with an fp32 scale
                per (token, head) under `kv_dtype="int8"` (issue 15: KV below 1/R of a per-loop fp cache)
    held_k/v    (core layers, rows, Hkv, Dh) fp32: the decoding token's first loop (`first`) or the sum of
                its loops so far (`mean`), written into the slot when it exits (the commit rule of `KVCache`)

Buffers grow on demand (rows in use × the longest admitted request) and are released when the engine
is idle. Sliding-window layers keep full rows here (the engine masks the window), unlike `KVCache`'s
rings: correct, not yet memory-saving.
"""

from __future__ import annotations

import torch

from .cache import check_strategy
from .config import LoopConfig

KV_DTYPES = ("model", "int8")


def parse_kv(spec: str) -> tuple[str, str]:
    """'last' → ('last', 'model'); 'last:int8' → ('last', 'int8')."""
    strategy, _, kv_dtype = str(spec).partition(":")
    check_strategy(strategy)
    kv_dtype = kv_dtype or "model"
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv {spec!r}: the KV dtype after ':' must be one of {list(KV_DTYPES[1:])}, got {kv_dtype!r}")
    return strategy, kv_dtype


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per vector of the last dim (one head of one token): x ≈ codes * scale."""
    xf = x.float()
    scale = xf.abs().amax(-1) / 127.0
    codes = torch.round(xf / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None])
    return codes.clamp_(-127, 127).to(torch.int8), scale


class KV:
    """A K or V buffer (..., Dh): values in `dtype`, or int8 codes + an fp32 scale per vector (`scale` (...)).
    Indexing (never of the last dim) gives a KV over the same storage for basic indices, as torch does;
    assigning a tensor quantizes it, assigning a KV copies its codes and scales as they are; `values()`
    reads back in `dtype`."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype):
        self.data, self.scale, self.dtype = data, scale, dtype

    @classmethod
    def zeros(cls, shape: tuple, *, dtype: torch.dtype, device, int8: bool) -> KV:
        if int8:
            return cls(torch.zeros(shape, dtype=torch.int8, device=device),
                       torch.zeros(shape[:-1], dtype=torch.float32, device=device), dtype)
        return cls(torch.zeros(shape, dtype=dtype, device=device), None, dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.scale is None else self.scale.nbytes)

    def __getitem__(self, idx) -> KV:
        return KV(self.data[idx], None if self.scale is None else self.scale[idx], self.dtype)

    def __setitem__(self, idx, value: torch.Tensor | KV) -> None:
        if isinstance(value, KV):
            self.data[idx] = value.data
            if self.scale is not None:
                self.scale[idx] = value.scale
        elif self.scale is None:
            self.data[idx] = value
        else:
            self.data[idx], self.scale[idx] = quantize(value)

    def values(self) -> torch.Tensor:
        if self.scale is None:
            return self.data
        return (self.data.float() * self.scale[..., None]).to(self.dtype)


class KVPool:
    def __init__(self, config: LoopConfig, *, strategy: str, max_loops: int, max_rows: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", kv_dtype: str = "model"):
        self.config, self.strategy = config, check_strategy(strategy)
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {list(KV_DTYPES)}, got {kv_dtype!r}")
        self.int8 = kv_dtype == "int8"
        if max_loops < 1 or max_rows < 1:
            raise ValueError(f"max_loops and max_rows must be ≥ 1, got {max_loops}, {max_rows}")
        self.max_loops, self.max_rows, self.dtype, self.device = max_loops, max_rows, dtype, torch.device(device)
        P, C = config.num_prelude_layers, config.num_core_layers
        self.core_slots = max_loops if strategy == "per_loop" else 1
        self._base, n = [], 0
        for layer_idx in range(config.num_layers):
            self._base.append(n)
            n += self.core_slots if P <= layer_idx < P + C else 1
        self.num_slots = n
        self.lengths = [0] * max_rows  # committed positions per row
        self._free = list(range(max_rows))  # rows not in use; the lowest is taken first
        self._alloc_rows = self._alloc_cap = 0
        self.k = self.v = self.held_k = self.held_v = None
        self._allocate(0, 0)

    # ------------------------------------------------------------------ memory

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position of one row holds (every layer, every slot)."""
        cfg = self.config
        per_head = cfg.head_dim + 4 if self.int8 else cfg.head_dim * torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_slots * cfg.num_key_value_heads * per_head

    def row_bytes(self, row: int) -> int:
        return self.lengths[row] * self.bytes_per_token

    @property
    def kv_bytes(self) -> int:
        """Bytes holding committed positions of the rows in use."""
        return sum(self.lengths) * self.bytes_per_token

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, self.held_k, self.held_v))

    def _allocate(self, rows: int, cap: int) -> None:
        cfg = self.config
        Hkv, Dh, C = cfg.num_key_value_heads, cfg.head_dim, cfg.num_core_layers
        shape = (self.num_slots, rows, Hkv, cap, Dh)
        k = KV.zeros(shape, dtype=self.dtype, device=self.device, int8=self.int8)
        v = KV.zeros(shape, dtype=self.dtype, device=self.device, int8=self.int8)
        if self.k is not None and self._alloc_rows and self._alloc_cap:
            r, c = min(rows, self._alloc_rows), min(cap, self._alloc_cap)
            k[:, :r, :, :c] = self.k[:, :r, :, :c]
            v[:, :r, :, :c] = self.v[:, :r, :, :c]
        held = (C, rows, Hkv, Dh) if self.strategy in ("first", "mean") else (0,)
        hk = torch.zeros(held, dtype=torch.float32, device=self.device)
        hv = torch.zeros_like(hk)
        if self.held_k is not None and self.held_k.numel() and hk.numel():
            r = min(rows, self._alloc_rows)
            hk[:, :r], hv[:, :r] = self.held_k[:, :r], self.held_v[:, :r]
        self.k, self.v, self.held_k, self.held_v = k, v, hk, hv
        self._alloc_rows, self._alloc_cap = rows, cap

    def ensure(self, row: int, length: int) -> None:
        """Grow the buffers so `row` can hold `length` positions (copies what is stored)."""
        rows, cap = max(self._alloc_rows, row + 1), max(self._alloc_cap, length)
        if rows > self._alloc_rows or cap > self._alloc_cap:
            # grow by at least half again, so a stream of admissions does not copy every time
            if rows > self._alloc_rows:
                rows = min(self.max_rows, max(rows, self._alloc_rows + self._alloc_rows // 2))
            if cap > self._alloc_cap:
                cap = max(cap, self._alloc_cap + self._alloc_cap // 2)
            self._allocate(rows, cap)

    def release(self) -> None:
        """Drop the buffers (no row in use): the next admission allocates again."""
        assert len(self._free) == self.max_rows, "release() with rows in use"
        self.k = self.v = self.held_k = self.held_v = None
        self._alloc_rows = self._alloc_cap = 0
        self._allocate(0, 0)

    # ------------------------------------------------------------------ rows

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def acquire(self, length: int) -> int:
        """A free row that can hold `length` positions, empty."""
        if not self._free:
            raise RuntimeError(f"all {self.max_rows} rows are in use")
        self._free.sort()
        row = self._free.pop(0)
        self.ensure(row, length)
        self.lengths[row] = 0
        return row

    def free(self, row: int) -> None:
        if row in self._free or not 0 <= row < self.max_rows:
            raise ValueError(f"row {row} is not in use")
        self.lengths[row] = 0
        self._free.append(row)

    def truncate(self, row: int, n: int) -> None:
        """Roll `row` back to its first n positions (speculative decoding rejects a draft this way)."""
        if row in self._free:
            raise ValueError(f"row {row} is not in use")
        if not 0 <= n <= self.lengths[row]:
            raise ValueError(f"truncate(row={row}, n={n}): the row holds {self.lengths[row]} positions")
        self.lengths[row] = n

    def slot(self, layer_idx: int, loop_idx: int = 0) -> int:
        if self.strategy == "per_loop" and self.config.is_core(layer_idx):
            return self._base[layer_idx] + loop_idx
        return self._base[layer_idx]

    # ------------------------------------------------------------------ commits

    def commit_token(self, rows: torch.Tensor, positions: torch.Tensor, exit_loops: int, num_loops: int) -> None:
        """Decoded tokens at `positions` of `rows` that ran `exit_loops` of their request's `num_loops`:
        store what the strategy keeps (KVCache.commit's rule) and count the position."""
        cfg = self.config
        P, C = cfg.num_prelude_layers, cfg.num_core_layers
        if self.strategy == "per_loop" and exit_loops < num_loops:
            # slots e..R-1 of a token that ran e loops hold its deepest computed K/V (slot e-1)
            for j in range(C):
                base = self._base[P + j]
                src = base + exit_loops - 1
                for r in range(exit_loops, num_loops):
                    self.k[base + r, rows, :, positions] = self.k[src, rows, :, positions]
                    self.v[base + r, rows, :, positions] = self.v[src, rows, :, positions]
        elif self.strategy in ("first", "mean"):
            for j in range(C):
                s = self._base[P + j]
                hk, hv = self.held_k[j, rows], self.held_v[j, rows]
                if self.strategy == "mean":
                    hk, hv = hk / float(exit_loops), hv / float(exit_loops)
                self.k[s, rows, :, positions] = hk.to(self.dtype)
                self.v[s, rows, :, positions] = hv.to(self.dtype)
        for r in rows.tolist():
            self.lengths[r] += 1

    def hold(self, core_idx: int, rows: torch.Tensor, first: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """first/mean: keep decoding tokens' K/V (n, Hkv, Dh) for their commit; `first` (n,) bool marks the
        tokens at their first loop (held afresh), the others are summed (mean) or left (first)."""
        if bool(first.any()):
            self.held_k[core_idx, rows[first]] = k[first].float()
            self.held_v[core_idx, rows[first]] = v[first].float()
        later = ~first
        if self.strategy == "mean" and bool(later.any()):
            r = rows[later]
            self.held_k[core_idx, r] += k[later].float()
            self.held_v[core_idx, r] += v[later].float()

    def commit_prompt(self, row: int, start: int, scratch_k: KV, scratch_v: KV,
                      num_loops: int) -> None:
        """Shared strategies: the prompt's per-loop core K/V (C, R, Hkv, S, Dh), kept while it was prefilled,
        become what the strategy keeps for positions start..start+S (every prompt position ran every loop)."""
        cfg = self.config
        P, S = cfg.num_prelude_layers, scratch_k.shape[3]
        at = slice(start, start + S)
        for j in range(cfg.num_core_layers):
            s = self._base[P + j]
            if self.strategy == "last":
                kk, vv = scratch_k[j, num_loops - 1], scratch_v[j, num_loops - 1]
            elif self.strategy == "first":
                kk, vv = scratch_k[j, 0], scratch_v[j, 0]
            else:  # mean: summed in fp32 loop by loop (KVCache's order), then divided
                kk, vv = scratch_k[j, 0].values().float(), scratch_v[j, 0].values().float()
                for r in range(1, num_loops):
                    kk, vv = kk + scratch_k[j, r].values().float(), vv + scratch_v[j, r].values().float()
                kk, vv = (kk / float(num_loops)).to(self.dtype), (vv / float(num_loops)).to(self.dtype)
            self.k[s, row, :, at] = kk
            self.v[s, row, :, at] = vv
