"""The fused CPU kernels (ridgeline/kernels) against the PyTorch ops they replace, and the engine
with them against the engine without them. Paged decode attention against naive attention is
in test_attention.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ridgeline import LLM, SamplingParams, kernels
from ridgeline.kernels import load_cpu_kernels

KERNELS = load_cpu_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="the fused CPU kernels did not build (no C compiler?)")
DTYPES = [torch.float32, torch.bfloat16]


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """float32: float rounding; bfloat16: one bfloat16 ulp of the value (the paths' float sums
    differ in order, which can move a rounding by one step)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    diff = (out.float() - ref.float()).abs()
    if ref.dtype == torch.float32:
        assert diff.max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    else:
        ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp_min(1e-30)
        assert (diff <= ulp * 1.01).all(), diff.max()
        assert (diff > 0).float().mean().item() < 0.05  # most elements identical


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_add_rms_norm_matches_torch(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 576, generator=g).to(dtype)
    delta = torch.randn(rows, 576, generator=g).to(dtype)
    w = torch.randn(576, generator=g).to(dtype)
    assert_close(KERNELS.add_rms_norm(h.clone(), w, 1e-5), F.rms_norm(h, (576,), w, 1e-5))
    summed = h + delta
    h2 = h.clone()
    out = KERNELS.add_rms_norm(h2, w, 1e-5, delta)
    assert torch.equal(h2, summed)  # the residual add happened in place, rounded like torch's add
    assert_close(out, F.rms_norm(summed, (576,), w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    gate_up = (torch.randn(9, 2 * 1536, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_close(KERNELS.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_matches_torch(dtype):
    """q roped, k roped into the cache at the slots, v copied, from a fused qkv row with a wider stride."""
    g = torch.Generator().manual_seed(1)
    t, hq, hkv, d = 5, 9, 3, 64
    qkv = torch.randn(t, (hq + 2 * hkv) * d + 8, generator=g).to(dtype)[:, :(hq + 2 * hkv) * d]  # stride > width
    positions = torch.tensor([0, 3, 17, 100, 2047])
    freqs = torch.outer(torch.arange(2048).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    cos = torch.cat((freqs.cos(), freqs.cos()), -1).to(dtype)
    sin = torch.cat((-freqs.sin(), freqs.sin()), -1).to(dtype)
    slots = torch.tensor([40, 2, 33, 7, 12])
    k_cache, v_cache = torch.zeros(64, hkv, d, dtype=dtype), torch.zeros(64, hkv, d, dtype=dtype)
    qk = qkv[:, :(hq + hkv) * d]
    q = KERNELS.rope_store(qk, qkv[:, (hq + hkv) * d:], positions, cos, sin, k_cache, v_cache, slots, hq)

    x = qk.reshape(t, hq + hkv, d)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    ref = x * c + x.roll(d // 2, dims=-1) * s  # the model's PyTorch rotary
    assert_close(q, ref[:, :hq].contiguous())
    assert_close(k_cache[slots], ref[:, hq:].contiguous())
    assert torch.equal(v_cache[slots], qkv[:, (hq + hkv) * d:].reshape(t, hkv, d))
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_lse_and_thread_split(dtype, monkeypatch):
    """Outputs and log-sum-exps against float32 reference math; the rows split over threads
    give bit-identical results to one thread."""
    g = torch.Generator().manual_seed(2)
    b, hq, hkv, d, lk = 6, 8, 2, 64, 50
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k_cache = torch.randn(400, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(400, hkv, d, generator=g).to(dtype)
    slots = torch.randperm(400, generator=g)[:b * lk].view(b, lk)
    lens = torch.tensor([50, 1, 17, 33, 50, 2])
    bias = torch.zeros(b, lk, dtype=dtype).masked_fill_(torch.arange(lk) >= lens[:, None], float("-inf"))
    bias = bias.view(b, 1, 1, lk)
    monkeypatch.setattr(kernels, "PARALLEL_MIN_KEYS", 10 ** 9)
    out, lse = KERNELS.decode_attention(q, k_cache, v_cache, slots, bias, 0.125, with_lse=True)
    monkeypatch.setattr(kernels, "PARALLEL_MIN_KEYS", 1)
    out2, lse2 = KERNELS.decode_attention(q, k_cache, v_cache, slots, bias, 0.125, with_lse=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)

    k = k_cache[slots].float().repeat_interleave(hq // hkv, dim=2)  # [B, Lk, Hq, D]
    v = v_cache[slots].float().repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bhd,bkhd->bhk", q.float(), k) * 0.125 + bias.view(b, 1, lk).float()
    ref = torch.einsum("bhk,bkhd->bhd", scores.softmax(-1), v)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.float() - ref).abs().max().item() <= tol
    assert (lse - scores.logsumexp(-1)).abs().max().item() <= 1e-4


def test_engine_with_and_without_kernels():
    """float32 greedy decoding on the default model (dequantized weights: with 8-bit activations
    a float rounding difference can flip an activation's rounding): the same tokens, logprobs
    within 1e-4."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)
    prompts = ["The capital of France is", "def fibonacci(n):", "Mountains are", "1, 2, 3,"]
    runs = {}
    for on in (False, True):
        llm = LLM(dtype="float32", max_model_len=512, kv_cache_memory="64MiB", cpu_kernels=on, quantization="none")
        assert (llm.engine.model.kernels is not None) == on
        # Hydragen's default break-even follows the decode attention in use (docs/benchmarks.md)
        assert llm.engine.hydragen.min_saved_tokens == (3072 if on else 512)
        runs[on] = llm.generate(prompts, params, use_tqdm=False)
        del llm
    for a, b in zip(runs[False], runs[True]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb, tok in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(la[tok].logprob - lb[tok].logprob) < 1e-4
