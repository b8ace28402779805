"""The engine with block-quantized weights (quantization="auto", the default for a GGUF) against
the dequantized float32 engine (quantization="none", the reference path) on the default model;
peak memory while loading quantized files; quantizing Hugging Face checkpoints at load."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ridgeline import LLM, SamplingParams
from ridgeline.kernels import load_cpu_kernels
from ridgeline.model import Linear
from ridgeline.quant import FORMATS, QuantLinear

from .prompts import PARITY_PROMPTS
from .test_quant_kernels import random_weight

pytestmark = pytest.mark.skipif(load_cpu_kernels() is None, reason="the CPU kernels did not build")
TEXT = (Path(__file__).parent / "data" / "apache-2.0.txt").read_text()


@pytest.fixture(scope="module")
def quantized() -> LLM:
    return LLM(max_model_len=4096, kv_cache_memory="256MiB")  # dtype auto: bf16 where native, else float32


@pytest.fixture(scope="module")
def quantized_fp32() -> LLM:
    """The quantized path in float32 with two bytes per activation: its differences from the
    dequantized float32 reference are the kernels' alone (bfloat16 logits are 0.125 apart near 20,
    coarser than a near tie)."""
    return LLM(dtype="float32", max_model_len=2048, kv_cache_memory="128MiB", quant_activation_bytes=2)


def _perplexity(llm: LLM, ids: list[int]) -> float:
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    lps = [entry[tok].logprob for tok, entry in zip(ids[1:], out.prompt_logprobs[1:])]
    return math.exp(-sum(lps) / len(lps))


def test_default_gguf_runs_quantized(quantized, llm_fp32):
    model = quantized.engine.model
    assert isinstance(model.layers[0].qkv, QuantLinear) and model.layers[0].qkv.weight.fmt == "Q4_1"
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.weight.fmt == "Q8_0"  # the tied embedding
    assert model.lm_head.weight is model.embed  # one copy of the embedding blocks
    assert isinstance(llm_fp32.engine.model.layers[0].qkv, Linear)  # quantization="none" (conftest)


def test_perplexity_within_one_percent(quantized, llm_fp32):
    """A ~2,000-token English text (the Apache 2.0 license) through prompt_logprobs."""
    ids = quantized.engine.tokenizer.encode(TEXT)[:2000]
    assert len(ids) == 2000
    ref = _perplexity(llm_fp32, ids)
    got = _perplexity(quantized, ids)
    assert abs(got - ref) / ref < 0.01, (got, ref)
    assert quantized.engine.model.lm_head.activation_bytes == 1  # the default
    two_bytes = LLM(max_model_len=2048, kv_cache_memory="128MiB", quant_activation_bytes=2)
    got2 = _perplexity(two_bytes, ids)
    assert abs(got2 - ref) / ref < 0.01 and got2 != got, (got2, got, ref)


# A greedy parting is accepted where the reference's top two are closer than this. With two
# bytes per activation none of the 8 paths below parts in float32; with one (the default,
# llama.cpp's 8 bits) 7 of 8 part, at gaps of 0.04-0.26 (ONE_BYTE_NEAR_TIE).
NEAR_TIE = 0.1
ONE_BYTE_NEAR_TIE = 0.3


def _parting_gaps(ref, got) -> list[float | None]:
    """Per prompt: None if the greedy ids are identical, else the reference's top-2 logprob gap
    at the first differing step (requests need logprobs >= 2)."""
    gaps = []
    for r, g in zip(ref, got):
        a, b = r.outputs[0].token_ids, g.outputs[0].token_ids
        part = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if part is None:
            gaps.append(None)
            continue
        top2 = sorted((lp.logprob for lp in r.outputs[0].logprobs[part].values()), reverse=True)[:2]
        gaps.append(top2[0] - top2[1])
    return gaps


GREEDY_LP = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)


def test_greedy_matches_dequantized_float32(quantized_fp32, llm_fp32):
    """Greedy 32 tokens on 8 prompts, the quantized path against the dequantized one: identical,
    or parted only at a near tie of the reference (two bytes per activation: below 0.1; one,
    the default: below ONE_BYTE_NEAR_TIE)."""
    assert quantized_fp32.engine.model.layers[0].qkv.activation_bytes == 2
    ref = llm_fp32.generate(PARITY_PROMPTS, GREEDY_LP, use_tqdm=False)
    gaps = _parting_gaps(ref, quantized_fp32.generate(PARITY_PROMPTS, GREEDY_LP, use_tqdm=False))
    assert all(g is None or g < NEAR_TIE for g in gaps), gaps
    one_byte = LLM(dtype="float32", max_model_len=2048, kv_cache_memory="128MiB")
    gaps = _parting_gaps(ref, one_byte.generate(PARITY_PROMPTS, GREEDY_LP, use_tqdm=False))
    assert all(g is None or g < ONE_BYTE_NEAR_TIE for g in gaps), gaps


def test_chunked_prefill_prefix_cache_and_preemption_on_quantized_weights(quantized_fp32):
    """The quantized path under a 16-token budget (every prompt in chunks), a 20-block pool
    (preemption and recompute) and prefix caching: what the unconstrained quantized run gives, up
    to near ties; no blocks leak."""
    prompts = PARITY_PROMPTS[:3] + PARITY_PROMPTS[4:] + [PARITY_PROMPTS[3][:900] + " Finally,",
                                                         PARITY_PROMPTS[3][:900] + " Also,"]
    alone = quantized_fp32.generate(prompts, GREEDY_LP, use_tqdm=False)
    tight = LLM(dtype="float32", quant_activation_bytes=2, max_model_len=384, num_kv_blocks=24, block_size=16, max_num_batched_tokens=16, max_num_seqs=8)
    outs = tight.generate(prompts, GREEDY_LP, use_tqdm=False)
    assert tight.engine.get_stats().num_preemptions > 0 and tight.engine.get_stats().prefix_cache_hits > 0
    gaps = _parting_gaps(alone, outs)
    assert all(g is None or g < NEAR_TIE for g in gaps), gaps
    assert tight.engine._blocks.allocator.num_used == 0


# ---------------------------------------------------------------- memory while loading

RSS_SCRIPT = r"""
import gc, json, resource, sys
from ridgeline import LLM
from ridgeline.kernels import load_cpu_kernels

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

load_cpu_kernels()
from pathlib import Path
from ridgeline.tokenizer import load_tokenizer
load_tokenizer(Path(sys.argv[1]))  # the (cached, one-time) vocabulary conversion all files share
out = {}
for path in sys.argv[1:]:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    before = status("VmRSS:")
    llm = LLM(model=path, max_model_len=256, num_kv_blocks=16, max_num_seqs=4)
    llm.generate(["Hello there"], use_tqdm=False)
    kv = llm.engine.runner.kv.storage.numel() * llm.engine.runner.kv.storage.element_size()
    out[path] = {"peak": status("VmHWM:") - before, "kv": kv}
    del llm
print(json.dumps(out))
"""


def _write_random_gguf(path: Path, fmt: str, tokenizer_meta) -> Path:
    """A Llama of random blocks in `fmt` (values do not matter for memory): hidden 1024, 4 layers,
    the default model's 49k vocabulary, tied embedding in the same format."""
    import gguf

    hidden, inter, layers, heads, kv_heads, vocab = 1024, 2816, 4, 16, 4, 49152
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter if FORMATS[fmt][1] == 32 else 3072)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    for key, (value, vtype, sub) in tokenizer_meta.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    qtype = gguf.GGMLQuantizationType[fmt]
    inter = inter if FORMATS[fmt][1] == 32 else 3072
    kvd = hidden // heads * kv_heads

    def add(name, n, k, seed):
        data = random_weight(fmt, n, k, seed).data.numpy()
        w.add_tensor(name, data, raw_shape=[n, data.shape[1]], raw_dtype=qtype)

    add("token_embd.weight", vocab, hidden, 0)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for j, (name, n, k) in enumerate([("attn_q", hidden, hidden), ("attn_k", kvd, hidden), ("attn_v", kvd, hidden),
                                          ("attn_output", hidden, hidden), ("ffn_gate", inter, hidden),
                                          ("ffn_up", inter, hidden), ("ffn_down", hidden, inter)]):
            add(f"blk.{i}.{name}.weight", n, k, 10 * i + j + 1)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_is_the_file_plus_the_kv_pool(tmp_path):
    """Peak RSS while loading and running (over the process's RSS before the load: Python, torch,
    the kernels and the files' shared tokenizer, converted once and cached) is within 10 % +
    150 MB of the file's size plus the KV pool, per format."""
    from ridgeline.loader import default_model_path

    from .tiny_models import read_tokenizer_metadata

    meta = read_tokenizer_metadata(default_model_path())
    paths = [str(_write_random_gguf(tmp_path / f"tiny-{fmt}.gguf", fmt, meta)) for fmt in FORMATS]
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *paths], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for path in paths:
        size = Path(path).stat().st_size
        peak, kv = result[path]["peak"], result[path]["kv"]
        assert peak <= 1.1 * (size + kv) + 150e6, (Path(path).name, peak / 1e6, size / 1e6, kv / 1e6)


# ---------------------------------------------------------------- quantizing at load

@pytest.mark.parametrize("mode", ["q8_0", "q4_0", "q4_k"])
def test_hf_checkpoint_quantized_at_load(mode, tmp_path):
    """A Hugging Face checkpoint with --quantization q8_0 / q4_0 / q4_k: its matrices are kept in
    that format, decode to the checkpoint's weights within the format's step, and generate (q8_0:
    the dense model's greedy tokens)."""
    from transformers import AutoTokenizer

    from ridgeline.loader import default_model_path

    import transformers

    from .tiny_models import randomize_, save_checkpoint

    # hidden 256 (a multiple of Q4_K's 256-weight blocks); matrices N(0, 1 / sqrt(256)): unit gain, so
    # rounding errors are not amplified layer after layer (a random network of larger gain is chaotic)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize_(model, seed=0, std=0.0625)
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ckpt = save_checkpoint(model, tmp_path / "tiny", tok)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    dense = LLM(model=str(ckpt), dtype="float32", max_model_len=256, kv_cache_memory="16MiB", quantization="none")
    quant = LLM(model=str(ckpt), dtype="float32", max_model_len=256, kv_cache_memory="16MiB", quantization=mode)
    fmt = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K"}[mode]
    layer = quant.engine.model.layers[0]
    assert isinstance(layer.gate_up, QuantLinear) and layer.gate_up.weight.fmt == fmt
    assert layer.gate_up.weight.nbytes == 2 * 512 * 256 // FORMATS[fmt][1] * FORMATS[fmt][2]
    # the kept blocks decode to the checkpoint's weights within the format's rounding step
    kern = load_cpu_kernels()
    ref = model.model.layers[0].mlp.down_proj.weight.detach()
    got = quant.engine.model.layers[0].down.weight.dequantize(torch.float32, kern)
    blocks = ref.view(ref.shape[0], -1, 32)
    step = (blocks.amax(-1) - blocks.amin(-1).clamp(max=0)) / {"q8_0": 254, "q4_0": 15, "q4_k": 15}[mode]
    assert ((got - ref).view_as(blocks).abs().amax(-1) <= 3 * step + 1e-6).all()
    a = dense.generate(["The weather today"], params, use_tqdm=False)[0].outputs[0]
    b = quant.generate(["The weather today"], params, use_tqdm=False)[0].outputs[0]
    assert len(b.token_ids) == 8
    if mode == "q8_0":
        assert a.token_ids == b.token_ids


def test_bad_quantization_and_isa_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="quantization must be one of auto, none, q8_0, q4_0, q4_k"):
        LLM(quantization="int3")
    with pytest.raises(ValueError, match="quant_activation_bytes must be 1 or 2, got 4"):
        LLM(quant_activation_bytes=4)
    monkeypatch.setenv("RIDGELINE_CPU_ISA", "avx1024")
    from ridgeline.kernels import cpu_isa

    with pytest.raises(ValueError, match="RIDGELINE_CPU_ISA must be one of"):
        cpu_isa()
