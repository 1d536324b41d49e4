"""Fused and packed projections for inference (issue 13, point 6: batch-1 decode ahead of transformers).

`LoopedLM.fuse()` gives every layer two or three matmuls where the checkpoint has seven Linear layers:

    q|k|v      one matmul over the concatenated weights, split after
    gate|up    one matmul, halves after
    o, down, the head   as they are

and on a CPU whose oneDNN can pack the dtype (fp32 on any x86; bf16 needs AVX512 or AVX-NE-CONVERT) each weight
is *packed* once into oneDNN's blocked layout. Measured on the 2-core AVX2 machine of docs/engine.md, every
projection of SmolLM2-135M: 1 row 58 → 40 ms, 4 rows 109 → 47 ms, 16 rows 130 → 75 ms, 256 rows 731 → 602 ms
(`F.linear` re-lays the weight out on every call with more than one row; its one-row path is single-threaded).
A packed matmul's row is also bit-identical whatever the number of rows (`F.linear`'s is not: MKL takes a
different kernel for one row), which is the engine's invariant at the level of one matmul.

Memory. Unpacked fusion costs nothing: the q, k, v (gate, up) parameters become views of the one fused
weight, so training, `state_dict` and in-place updates see and change the same storage. Packed weights are
a copy (the projections' bytes again, on the host); `LoopedLM.unfuse()` drops them.

Fused projections are used only with autograd off (packed matmuls have no backward). A packed copy is
rebuilt when its parameters change (an in-place write, `load_state_dict`, `.to()`), checked at each
pipeline pass (`LoopedLM.embed`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=None)
def can_pack(device_type: str, dtype: torch.dtype) -> bool:
    """Whether oneDNN packs (and multiplies) linear weights of this dtype here."""
    if device_type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype))
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=dtype), w, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):  # e.g. bf16 without AVX512 / AVX-NE-CONVERT
        return False
    return True


PACK_MIN_ELEMENTS = 1 << 17
"""Smaller weights stay unpacked: a packed matmul costs about 30 µs per call before any arithmetic (a 64-wide
model's projections take 4–12 µs through `F.linear`), which only weights this large repay."""


class Projection:
    """One matmul for Linear layers that read the same input: y = x @ [W₁; W₂; …]ᵀ (+ b), last dim = Σ outs."""

    def __init__(self, linears: list[nn.Linear], *, pack: bool):
        self.linears = linears
        self.sizes = [m.out_features for m in linears]
        pack = pack and sum(self.sizes) * linears[0].in_features >= PACK_MIN_ELEMENTS
        self.packed = pack
        weight = torch.cat([m.weight.detach() for m in linears]) if len(linears) > 1 else linears[0].weight.detach()
        bias = None
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                              for m in linears])
        if pack:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
            self.bias = bias
        elif len(linears) > 1:  # the parameters become views of the fused weight: no second copy
            self.weight, self.bias, off = weight.contiguous(), bias, 0
            for m, n in zip(linears, self.sizes):
                m.weight.data = self.weight[off : off + n]
                if m.bias is not None:
                    m.bias.data = self.bias[off : off + n]
                off += n
        else:
            self.weight = self.bias = None  # one unpacked Linear: use the module itself

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.weight is None:
            return self.linears[0](x)
        return F.linear(x, self.weight, self.bias)

    def __deepcopy__(self, memo):  # over the copied Linear layers (a copied model's own parameters)
        import copy

        return Projection([copy.deepcopy(m, memo) for m in self.linears], pack=self.packed)
