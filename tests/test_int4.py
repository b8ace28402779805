"""4-bit weights (quantization="int4"): GGUF Q4 blocks decoded exactly, the int4 kernel against a float
matmul, and the engine against the dequantized bfloat16 engine on the default model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ridgeline import LLM, SamplingParams
from ridgeline.loader import default_model_path
from ridgeline.quant import Int4Linear, from_gguf_q4


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_blocks_decode_exactly(qtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    w4 = from_gguf_q4(raw, qtype, (48, 128))
    assert w4.q.dtype == torch.uint8 and int(w4.q.max()) <= 15
    np.testing.assert_allclose(w4.dequantize().numpy(), expected, rtol=0, atol=1e-5)


def test_real_q4_1_tensor_and_kernel():
    reader = gguf.GGUFReader(str(default_model_path()))
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_up.weight")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    w4 = from_gguf_q4(t.data, t.tensor_type.name, shape)
    expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
    np.testing.assert_allclose(w4.dequantize().numpy(), expected, rtol=0, atol=1e-5)
    # the kernel computes with scale and zero rounded to bfloat16; compare against exactly that weight
    rounded = type(w4)(w4.q, w4.scale.bfloat16().float(), w4.zero.bfloat16().float()).dequantize()
    x = torch.randn(5, shape[1]).bfloat16()
    y = Int4Linear(w4)(x).float()
    ref = x.float() @ rounded.t()
    assert (y - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_int4_engine_matches_bf16_engine():
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=5)
    prompts = ["The capital of France is", "def fibonacci(n):", "Mountains are"]
    runs = {}
    for q in ("none", "int4"):
        llm = LLM(dtype="bfloat16", quantization=q, kv_cache_memory="256MiB")
        runs[q] = llm.generate(prompts, params, use_tqdm=False)
        kinds = {type(layer.qkv).__name__ for layer in llm.engine.model.layers}
        assert kinds == ({"Int4Linear"} if q == "int4" else {"Linear"})
        del llm
    # the same weights; only the scales' and zeros' rounding to bfloat16 and the kernel's sums differ
    max_diff = 0.25
    diffs = []
    for ref, out in zip(runs["none"], runs["int4"]):
        for a, b, tok, tok4 in zip(ref.outputs[0].logprobs, out.outputs[0].logprobs, ref.outputs[0].token_ids,
                                   out.outputs[0].token_ids):
            if tok4 != tok:
                # greedy paths may part only at a near tie (bf16 logits tie exactly, even three
                # ways): each engine has the other's token in its top 5, within the logprob
                # tolerance of its own; the continuations then differ
                assert tok4 in a and tok in b, (a, b)
                assert abs(a[tok].logprob - a[tok4].logprob) < max_diff, (a, b)
                assert abs(b[tok].logprob - b[tok4].logprob) < max_diff, (a, b)
                break
            diffs.append(abs(a[tok].logprob - b[tok].logprob))
    assert len(diffs) >= 32
    assert max(diffs) < max_diff and sum(diffs) / len(diffs) < 0.05, diffs


def test_int4_needs_bfloat16_on_cpu():
    with pytest.raises(ValueError, match="quantization='int4' runs in bfloat16 on CPU"):
        LLM(dtype="float32", quantization="int4")
    with pytest.raises(ValueError, match="quantization must be 'none' or 'int4'"):
        LLM(quantization="int3")
