"""The block-quantized matmul and row-dequantization kernels (kernels/quant_kernels.c) against a
reference: the `gguf` package's dequantization, then a float64 matmul, for every format, on
random blocks and on real tensors of the Gemma-3-270M GGUF, for every kernel variant (scalar,
avx2, avx512) this CPU runs.

Error bound. The kernels quantize each run of 32 activations (of 256 for the K-quants) to two
bytes per value: d = max|x| / 127, a = round(x / d), b = round((x / d - a) * 254), x ~= d (a + b / 254),
so each activation is off by at most d / (2 * 254) = max|x| / (254 * 254), and a dot product
with weights w by at most sum over activation blocks b of (max_b |x| / 254^2) * sum_b |w|
(with activation_bytes=1, a alone: max_b |x| / 254). The
weights themselves are used exactly as stored. On top of that: float32 accumulation (1e-5
relative to sum |w| |x|), and for bfloat16 outputs one rounding of the result (2^-8 relative).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ridgeline.gguf_file import GGUFFile
from ridgeline.kernels import kernels_for, supported_isas
from ridgeline.quant import FORMATS, QuantLinear, QuantWeight, quantize

from .gguf_models import gemma_gguf_path

ISAS = [isa for isa in supported_isas() if kernels_for(isa) is not None]
pytestmark = pytest.mark.skipif(not ISAS, reason="the CPU kernels did not build (no C compiler?)")

# byte offsets of the float16 scales in each format's block (random bytes elsewhere are valid)
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208]}


def random_weight(fmt: str, n: int, k: int, seed: int) -> QuantWeight:
    """n rows of random blocks: any bit pattern is a valid block once its float16 scales are sane."""
    _, weights, size = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, k // weights, size), dtype=np.uint8)
    for off in F16_FIELDS[fmt]:
        scales = (rng.random((n, k // weights)) * 0.02 + 1e-3).astype(np.float16)
        raw[..., off:off + 2] = scales.view(np.uint8).reshape(n, k // weights, 2)
    return QuantWeight(fmt, torch.from_numpy(raw.reshape(n, -1)), k)


def reference(w: QuantWeight) -> np.ndarray:
    return gguf.quants.dequantize(w.data.numpy(), gguf.GGMLQuantizationType[w.fmt]).reshape(w.shape).astype(np.float64)


def activation_block(fmt: str) -> int:
    """Values per activation scale: 256 for the K-quants (Q8_K), else 32 (Q8_0)."""
    return 256 if fmt.endswith("_K") else 32


def error_bound(x: np.ndarray, w: np.ndarray, bf16_out: bool, block: int = 32, activation_bytes: int = 1) -> np.ndarray:
    m, k = x.shape
    amax = np.abs(x).reshape(m, k // block, block).max(-1)  # [m, blocks]
    wsum = np.abs(w).reshape(w.shape[0], k // block, block).sum(-1)  # [n, blocks]
    bound = amax / 254 ** activation_bytes @ wsum.T + 1e-5 * (np.abs(x) @ np.abs(w).T) + 1e-7
    if bf16_out:
        bound += 2.0 ** -8 * np.abs(x @ w.T)
    return bound


def check_matmul(kern, w: QuantWeight, x: torch.Tensor, ref_w: np.ndarray, bias: torch.Tensor | None = None,
                 activation_bytes: int = 1):
    y = QuantLinear(w, kern, bias, activation_bytes)(x)
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == x.dtype
    x64 = x.double().numpy()
    expected = x64 @ ref_w.T
    if bias is not None:
        expected += bias.double().numpy()
    err = np.abs(y.double().numpy() - expected)
    bound = error_bound(x64, ref_w, x.dtype == torch.bfloat16, activation_block(w.fmt), activation_bytes)
    assert (err <= bound).all(), f"worst error / bound {np.max(err / bound):.3f}"
    return y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_random_blocks_every_shape(isa, fmt):
    kern = kernels_for(isa)
    block = FORMATS[fmt][1]
    # K a multiple of the block only (11 blocks: groups of 8 and 3, a pair and a single);
    # N and M not multiples of the tiles (8 rows x 16 weight rows)
    for n, k, m in [(1, block, 1), (37, 2 * block, 3), (19, 3 * block, 8), (45, block, 9), (40, 2 * block, 21),
                    (5, 11 * block, 2)]:
        w = random_weight(fmt, n, k, seed=n * 1000 + m)
        ref_w = reference(w)
        np.testing.assert_array_equal(w.dequantize(torch.float32, kern).numpy(), ref_w.astype(np.float32))
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        for nbytes in (1, 2):
            check_matmul(kern, w, x, ref_w, activation_bytes=nbytes)
            check_matmul(kern, w, x.bfloat16(), ref_w, activation_bytes=nbytes)
        check_matmul(kern, w, x, ref_w, bias=torch.randn(n))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_variants_and_thread_splits_agree(fmt):
    """Every variant computes the same integer dot products; only float summation order may
    differ. Splitting rows over threads changes nothing."""
    w = random_weight(fmt, 70, 512, seed=7)
    x = torch.randn(12, 512, generator=torch.Generator().manual_seed(3))
    outs = [QuantLinear(w, kernels_for(isa))(x) for isa in ISAS]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = QuantLinear(w, kernels_for(ISAS[0]))(x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(single, outs[0], rtol=0, atol=0)


@pytest.fixture(scope="module")
def gemma_tensors() -> dict[str, QuantWeight]:
    """One real tensor of each format the Gemma-3-270M Q4_K_M file holds (first rows only)."""
    gf = GGUFFile(gemma_gguf_path())
    found: dict[str, QuantWeight] = {}
    for info in gf.tensors.values():
        if info.type_name in FORMATS and len(info.shape) == 2 and info.type_name not in found:
            rows = min(info.shape[0], 96)
            data = gf.tensor_bytes(info).reshape(info.shape[0], -1)[:rows].copy()
            found[info.type_name] = QuantWeight(info.type_name, torch.from_numpy(data), info.shape[1])
    gf.close()
    return found


def test_gemma_file_holds_the_formats(gemma_tensors):
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0"} <= set(gemma_tensors)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_0", "Q6_K", "Q8_0"])
def test_real_gemma_tensors(isa, fmt, gemma_tensors):
    kern = kernels_for(isa)
    w = gemma_tensors[fmt]
    ref_w = reference(w)
    np.testing.assert_array_equal(w.dequantize(torch.float32, kern).numpy(), ref_w.astype(np.float32))
    for m in (1, 5, 17):
        x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m))
        check_matmul(kern, w, x, ref_w)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_K"])
def test_quantize_round_trip(fmt):
    """Dense -> blocks: what the `gguf` package decodes is within each format's step of the input."""
    w = torch.randn(24, 512, generator=torch.Generator().manual_seed(0))
    q = quantize(w, fmt)
    assert q.nbytes == 24 * 512 // FORMATS[fmt][1] * FORMATS[fmt][2]
    back = reference(q)
    levels = {"Q8_0": 254, "Q4_0": 15, "Q4_K": 15}[fmt]
    blocks = w.double().numpy().reshape(24, -1, 32)
    step = (blocks.max(-1) - np.minimum(blocks.min(-1), 0)) / levels  # per 32 values
    err = np.abs(back.reshape(24, -1, 32) - blocks).max(-1)
    # one step plus (Q4_K) the 6-bit rounding of each sub-block's scale and min
    slack = {"Q8_0": 1.0, "Q4_0": 1.0, "Q4_K": 3.0}[fmt]
    assert (err <= slack * step + 1e-3).all()


def test_fused_parts_of_different_formats_run_side_by_side():
    """q/k/v in Q4_K, Q4_K and Q6_K (as Q4_K_M files store them), or a block part beside a dense
    one: the layer's output is each part's, side by side, bias included."""
    from ridgeline.model import SplitLinear, make_linear

    kern = kernels_for(ISAS[0])
    q, k, v = random_weight("Q4_K", 16, 256, 1), random_weight("Q4_K", 8, 256, 2), random_weight("Q6_K", 8, 256, 3)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(32)
    for parts in ([q, k, v], [q, k, v.dequantize(torch.float32, kern)]):
        layer = make_linear(parts, bias, kern)
        assert isinstance(layer, SplitLinear)
        dense = torch.cat([p if isinstance(p, torch.Tensor) else p.dequantize(torch.float32, kern) for p in parts])
        ref_w = dense.double().numpy()
        y = layer(x)
        expected = x.double().numpy() @ ref_w.T + bias.double().numpy()
        assert (np.abs(y.double().numpy() - expected) <= error_bound(x.double().numpy(), ref_w, False, 256)).all()
