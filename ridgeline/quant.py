"""4-bit weights for decode: GGUF Q4_0 / Q4_1 linear layers run through PyTorch's int4 CPU kernel.

Decode reads every weight once per token, so on a CPU the linear layers' time is their bytes:
4.5-5 bits per weight instead of bfloat16's 16 (SmolLM2-135M: batch-1 decode 115 instead of 84
tok/s). GGUF's Q4_1 block of 32 weights stores x = d * q + m with q in [0, 15]; PyTorch's
kernel computes x = (q - 8) * scale + zero per group of 32 along the input dimension, so
scale = d and zero = m + 8 d (Q4_0: x = d * (q - 8), zero 0) represent the file's weights
exactly, up to scale and zero rounded to bfloat16. The kernel is matrix-vector shaped, so steps
of more than INT4_MAX_ROWS tokens (prefill, wide batches) use a bfloat16 copy of the same
weights: int4 here buys decode speed at the price of memory (bf16 + 4-bit), not memory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP = 32  # weights per GGUF Q4 block, and the kernel's group size
INNER_K_TILES = 2  # PyTorch int4 packing: K must be a multiple of 16 * INNER_K_TILES * 2 = 64


@dataclass
class Int4Weight:
    """A [N, K] weight as 4-bit values with a scale and zero per group of 32 inputs."""
    q: torch.Tensor  # [N, K] uint8 in [0, 15]
    scale: torch.Tensor  # [N, K / 32] float32
    zero: torch.Tensor  # [N, K / 32] float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, as the kernel sees it."""
        q = self.q.float().view(self.q.shape[0], -1, GROUP) - 8
        return (q * self.scale.unsqueeze(-1) + self.zero.unsqueeze(-1)).view(self.q.shape)

    @staticmethod
    def cat(parts: list["Int4Weight"]) -> "Int4Weight":
        """Stack along the output dimension (fused q/k/v and gate/up)."""
        return Int4Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]))

    def permute_rows(self, fn) -> "Int4Weight":
        """Apply a row permutation given as a numpy function (the loader's q/k un-permutation)."""
        return Int4Weight(*(torch.from_numpy(np.ascontiguousarray(fn(t.numpy()))) for t in (self.q, self.scale,
                                                                                             self.zero)))


def from_gguf_q4(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> Int4Weight:
    """Decode the raw bytes of a Q4_0 or Q4_1 tensor of shape [N, K] (N rows of K/32 blocks)."""
    n, k = shape
    block = {"Q4_0": 18, "Q4_1": 20}[type_name]
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, k // GROUP, block)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q4_1":
        m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8 * d
    else:
        zero = np.zeros_like(d)
    qs = raw[..., block - 16:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)  # low nibbles first
    return Int4Weight(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero))


def int4_supported(weight: Int4Weight) -> bool:
    return weight.shape[1] % (32 * INNER_K_TILES) == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


# PyTorch's int4 CPU kernel is a matrix-vector kernel: ~11 us per input row for a 576 x 3072
# weight against 46 us for the whole of a batch-1 to -4 call of the prepacked bf16 GEMM, which
# wins from 5 rows on (32 rows: 366 vs 163 us). Bigger steps use a bf16 copy of the same weights.
INT4_MAX_ROWS = 4


class Int4Linear:
    """y = x @ W^T (+ b): up to INT4_MAX_ROWS rows through `_weight_int4pack_mm_for_cpu` (bfloat16
    in and out), more through a prepacked bfloat16 copy of the dequantized weight."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None, dense=None):
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), INNER_K_TILES)
        # [K / 32, N, 2]: per group and output, (scale, zero)
        self.scales_and_zeros = torch.stack([weight.scale.t(), weight.zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.bias = bias
        self.dense = dense  # a Linear over the same weights for wide steps (None: always int4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > INT4_MAX_ROWS:
            return self.dense(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)
        return y if self.bias is None else y + self.bias
