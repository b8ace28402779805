"""Block-quantized weights: GGUF's formats kept as they are stored, multiplied by C kernels.

Decode reads every weight once per token, so on a CPU a step's time is the bytes of its
weights: a Q4_K matrix is 4.5 bits per weight against bfloat16's 16. The weights stay in the
file's block layout (`QuantWeight`: uint8 rows of blocks) and `QuantLinear` runs them through
kernels/quant_kernels.c (8-bit activations, integer dot products, no dense copy for any step
size). The token embedding is looked up from its quantized rows, and a tied lm_head multiplies
by the same blocks. `quantize` makes the same formats from dense weights (Hugging Face
checkpoints with --quantization q8_0 / q4_0 / q4_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .kernels import CpuKernels

# format -> (kernel id, weights per block, bytes per block)
FORMATS: dict[str, tuple[int, int, int]] = {
    "Q4_0": (0, 32, 18), "Q4_1": (1, 32, 20), "Q5_0": (2, 32, 22), "Q5_1": (3, 32, 24), "Q8_0": (4, 32, 34),
    "Q4_K": (5, 256, 144), "Q5_K": (6, 256, 176), "Q6_K": (7, 256, 210),
}
DENSE_TYPES = ("F32", "F16", "BF16")
# formats `quantize` produces, by their --quantization names
QUANTIZE_TO = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K"}


def bits_per_weight(fmt: str) -> float:
    _, weights, size = FORMATS[fmt]
    return size * 8 / weights


@dataclass
class QuantWeight:
    """A [N, K] weight as N rows of K / block blocks in GGUF format `fmt` (uint8 [N, row bytes])."""
    fmt: str
    data: torch.Tensor
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.in_features)

    @property
    def kernel_id(self) -> int:
        return FORMATS[self.fmt][0]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, ids: torch.Tensor, kernels: CpuKernels, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` dequantized (the embedding lookup)."""
        return kernels.dequant_rows(self.kernel_id, self.data, self.in_features, ids.contiguous(), dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32, kernels: CpuKernels | None = None) -> torch.Tensor:
        """The dense weight; through the kernels when given, else the `gguf` package (slow, exact)."""
        if kernels is not None:
            return self.rows(torch.arange(self.shape[0]), kernels, dtype)
        import gguf

        arr = gguf.quants.dequantize(self.data.numpy(), gguf.GGMLQuantizationType[self.fmt])
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).view(self.shape).to(dtype)

    @staticmethod
    def cat(parts: list["QuantWeight"]) -> "QuantWeight":
        """Stack along the output dimension (fused q/k/v and gate/up); one format only."""
        assert len({p.fmt for p in parts}) == 1 and len({p.in_features for p in parts}) == 1
        # numpy: torch.cat of uint8 CPU tensors runs ~100x slower (13 ms for 0.6 MB here)
        data = torch.from_numpy(np.concatenate([p.data.numpy() for p in parts]))
        return QuantWeight(parts[0].fmt, data, parts[0].in_features)


def check_quantizable(fmt: str, shape: tuple[int, ...], name: str) -> None:
    _, weights, _ = FORMATS[fmt]
    if len(shape) != 2 or shape[1] % weights:
        raise ValueError(f"tensor {name} of shape {list(shape)}: {fmt} needs a matrix whose rows are a multiple "
                         f"of {weights} values")


class QuantLinear:
    """y = x @ W^T (+ b) for a QuantWeight, any number of rows, in x's dtype (float32 or bfloat16),
    with the activations quantized to `activation_bytes` bytes per value (see quant_kernels.c)."""

    def __init__(self, weight: QuantWeight, kernels: CpuKernels, bias: torch.Tensor | None = None,
                 activation_bytes: int = 1):
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.kernels = kernels
        self.bias = bias
        self.activation_bytes = activation_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.quant_matmul(self.weight.kernel_id, self.weight.data, self.out_features, self.in_features,
                                         x.contiguous(), self.bias, self.activation_bytes)


# ---------------------------------------------------------------- quantizing dense weights

def quantize(w: torch.Tensor, fmt: str) -> QuantWeight:
    """Quantize a dense [N, K] weight to `fmt` (Q8_0 and Q4_0 by the `gguf` package's reference
    code, Q4_K by `_quantize_q4_k`)."""
    n, k = w.shape
    arr = w.detach().float().numpy()
    if fmt == "Q4_K":
        raw = _quantize_q4_k(arr)
    else:
        import gguf

        raw = gguf.quants.quantize(arr, gguf.GGMLQuantizationType[fmt])
    return QuantWeight(fmt, torch.from_numpy(np.ascontiguousarray(raw).reshape(n, -1)), k)


def _quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks by min/max per 32 weights: w ~= d * sc * q - dmin * m with q in [0, 15] and
    6-bit sc, m per sub-block against per-256 float16 d, dmin (llama.cpp's layout; its encoder
    also searches for a better range, which lowers the error but does not change the format)."""
    n, k = w.shape
    sub = w.reshape(n, k // 256, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0.0)  # the offset is subtracted: dmin * m >= 0
    scale = (sub.max(-1) - lo) / 15.0
    mins = -lo
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (mins.max(-1) / 63.0).astype(np.float16)
    df, dminf = d.astype(np.float32)[..., None], dmin.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dminf > 0, np.rint(mins / dminf), 0).clip(0, 63).astype(np.uint8)
        eff_d = (df * sc)[..., None]
        eff_m = (dminf * m)[..., None]
        q = np.where(eff_d > 0, np.rint((sub + eff_m) / eff_d), 0).clip(0, 15).astype(np.uint8)
    # 12 bytes of scales: j < 4: sc[j], m[j] in the low 6 bits of bytes j, j + 4; j >= 4: low
    # nibbles in byte j + 4 (sc) and its high nibble (m), high 2 bits in the top of bytes j - 4, j.
    packed = np.zeros((n, k // 256, 12), np.uint8)
    packed[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    packed[..., 4:8] = m[..., 0:4] | ((m[..., 4:8] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:8] & 0xF) | ((m[..., 4:8] & 0xF) << 4)
    # 128 bytes of quants: chunk c holds sub-block 2c in low nibbles, 2c + 1 in high nibbles
    qs = (q[:, :, 0::2, :] | (q[:, :, 1::2, :] << 4)).reshape(n, k // 256, 128)
    out = np.concatenate([d.view(np.uint8).reshape(n, -1, 2), dmin.view(np.uint8).reshape(n, -1, 2), packed, qs],
                         axis=-1)
    return out.reshape(n, -1)
