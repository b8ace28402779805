"""Gemma 2 and Gemma 3 (issue 15): parity with transformers in float32, windowed attention, bad configs.

- The real Gemma-3-270M Q4_K_M GGUF, dequantized (quantization="none"), against transformers'
  own GGUF loader: 8 prompts, two longer than the 512-token window (so the 15 windowed layers
  slide in prefill, which runs in 256-token chunks, and in decode), greedy 32 tokens.
- Tiny random Gemma 2 and Gemma 3 models from transformers' config classes (windows of 10-12
  tokens, prompts up to 40), as safetensors and as llama.cpp-style F32 GGUFs.
- Paged attention with a window (prefill chunks, decode rows, the fused C decode kernel) and with
  Gemma 2's soft-capping, against naive masked attention.
- A Gemma config.json / GGUF lacking a field the model needs is refused, naming the field.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from ridgeline import LLM, SamplingParams
from ridgeline.attention import build_metadata, paged_attention
from ridgeline.config import UnsupportedModelError
from ridgeline.kernels import load_cpu_kernels
from ridgeline.loader import default_model_path, load_model_config
from ridgeline.tokenizer import load_tokenizer

from .gguf_models import gemma_gguf_path
from .prompts import LONG, PARITY_PROMPTS
from .test_arch_parity import LOGPROB_TOL, assert_parity
from .tiny_models import GEMMA_VARIANTS, VOCAB, build_model, hf_greedy, read_tokenizer_metadata, save_checkpoint, write_gguf

NEW_TOKENS = 32
STEPS = " ".join(f"Step {i}: move {i * 7 % 13} boxes from shelf {i % 5} to shelf {(i + 2) % 5}." for i in range(45))
GEMMA_PROMPTS = [p for p in PARITY_PROMPTS if not p.startswith(LONG)][:6] + [
    LONG + LONG[:800] + "In summary,",  # 660 tokens
    STEPS + " After the last step, shelf 3 holds",  # 820 tokens
]
WINDOW = 512


# ---------------------------------------------------------------- the real Gemma-3-270M


@pytest.fixture(scope="module")
def gemma_path():
    return gemma_gguf_path()


def test_gemma3_270m_gguf_matches_transformers(gemma_path):
    llm = LLM(model=str(gemma_path), quantization="none", dtype="float32", max_model_len=2048,
              kv_cache_memory="256MiB", max_num_batched_tokens=256, max_num_seqs=8)
    mc = llm.engine.model_config
    assert mc.architecture == "gemma3" and mc.sliding_window == WINDOW
    assert mc.layer_types.count("full_attention") == 3 and mc.layer_types[5] == "full_attention"
    assert 1 in llm.engine.eos_token_ids and 106 in llm.engine.eos_token_ids  # <eos>, <end_of_turn>
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in GEMMA_PROMPTS]
    assert len(GEMMA_PROMPTS) == 8 and sum(len(i) > WINDOW + 100 for i in ids) == 2, [len(i) for i in ids]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    outs = llm.generate(GEMMA_PROMPTS, params, use_tqdm=False)
    del llm
    refs = _references(gemma_path, ids)
    for p, (prompt_ids, out, (ref_tokens, ref_top)) in enumerate(zip(ids, outs, refs)):
        got = out.outputs[0]
        assert got.token_ids == ref_tokens, f"prompt {p} ({len(prompt_ids)} tokens)"
        for step, (entry, (top_ids, top_vals)) in enumerate(zip(got.logprobs, ref_top)):
            for tid, val in zip(top_ids, top_vals):
                assert tid in entry, f"prompt {p} step {step}: reference top-5 token {tid} missing"
                assert abs(entry[tid].logprob - val) < LOGPROB_TOL, (p, step, tid, entry[tid].logprob, val)


def _references(gemma_path, ids: list[list[int]]) -> list[tuple[list[int], list[tuple[list[int], list[float]]]]]:
    """transformers' greedy tokens and top-5 logprobs per step, float32, from its own GGUF loader.
    On 2 busy cores loading (~50 s) and decoding (~1 min) take longer than the rest of this file,
    so the result is kept in the cache directory, keyed by the file, the prompts and the versions
    of transformers and torch: a change to any of them computes it again."""
    import hashlib

    import transformers
    from transformers import AutoModelForCausalLM

    from ridgeline.tokenizer import cache_dir

    from .gguf_models import GEMMA_SHA256

    key = hashlib.sha256(json.dumps([GEMMA_SHA256, transformers.__version__, torch.__version__, ids, NEW_TOKENS])
                         .encode()).hexdigest()[:24]
    path = cache_dir() / "test-references" / f"gemma3-270m-{key}.json"
    if path.is_file():
        return [(t, [tuple(x) for x in top]) for t, top in json.loads(path.read_text())]
    model = AutoModelForCausalLM.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name,
                                                 dtype=torch.float32).eval()
    refs = []
    for prompt_ids in ids:
        tokens, lps = _hf_greedy_last(model, prompt_ids, NEW_TOKENS)
        refs.append((tokens, [(lp.topk(5).indices.tolist(), lp.topk(5).values.tolist()) for lp in lps]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(refs))
    tmp.replace(path)
    return refs


@torch.inference_mode()
def _hf_greedy_last(model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """tiny_models.hf_greedy with logits for the last position only: the prefill of an 800-token
    prompt would otherwise build 800 x 262,144 float32 logits (0.8 GB)."""
    tokens, logprobs, past = [], [], None
    x = torch.tensor([ids])
    for _ in range(n):
        out = model(input_ids=x, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        tokens.append(int(lp.argmax()))
        logprobs.append(lp)
        x = torch.tensor([[tokens[-1]]])
    return tokens, logprobs


# ---------------------------------------------------------------- tiny random Gemma 2 / 3

PROMPT_LENS = (5, 17, 40)
TINY_TOKENS = 24
TINY_ENGINE = dict(dtype="float32", max_model_len=512, kv_cache_memory="64MiB")
TINY_PARAMS = SamplingParams(temperature=0, max_tokens=TINY_TOKENS, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(4321)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer, prompts):
    cache: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in cache:
            model = build_model(variant)
            ckpt = save_checkpoint(model, tmp_path_factory.mktemp(variant), tokenizer)
            cache[variant] = (model, ckpt, [hf_greedy(model, ids, TINY_TOKENS) for ids in prompts])
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", list(GEMMA_VARIANTS))
def test_tiny_gemma_safetensors_matches_transformers(variant, tiny, prompts):
    model, ckpt, refs = tiny(variant)
    hc = model.config
    # chunked prefill over 8-token blocks: chunks start inside and past the window
    llm = LLM(model=str(ckpt), max_num_batched_tokens=16, max_num_seqs=4, block_size=8, **TINY_ENGINE)
    mc = llm.engine.model_config
    assert mc.layer_types == hc.layer_types and mc.sliding_window == hc.sliding_window
    assert mc.query_pre_attn_scalar == hc.query_pre_attn_scalar
    assert mc.attn_logit_softcap == hc.attn_logit_softcapping
    assert mc.final_logit_softcap == hc.final_logit_softcapping
    assert max(PROMPT_LENS) > hc.sliding_window
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], TINY_PARAMS, use_tqdm=False)
    assert_parity(outs, refs, prompts, variant)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_tiny_gemma_gguf_matches_transformers(variant, tiny, prompts, tmp_path, monkeypatch, tokenizer):
    """The model exported as llama.cpp does (norm gains stored as 1 + weight, Gemma 2's soft-capping
    keys, the layer pattern implied by the architecture) gives the original model's outputs."""
    from ridgeline.tokenizer import tokenizer_digest

    model, _, refs = tiny(variant)
    monkeypatch.setenv("RIDGELINE_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(model, tmp_path / "model.gguf", read_tokenizer_metadata(default_model_path()))
    tokenizer.save_pretrained(str(tmp_path / "cache" / "tokenizers" / tokenizer_digest(path)))
    llm = LLM(model=str(path), **TINY_ENGINE)
    mc = llm.engine.model_config
    assert mc.architecture == variant and mc.layer_types == model.config.layer_types
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], TINY_PARAMS, use_tqdm=False)
    assert_parity(outs, refs, prompts, f"{variant} gguf")


def test_tiny_gemma3_fused_and_pytorch_paths_agree(tiny, prompts):
    """The PyTorch-ops path (no C kernels) gives the same outputs as the fused one."""
    _, ckpt, refs = tiny("gemma3")
    llm = LLM(model=str(ckpt), cpu_kernels=False, **TINY_ENGINE)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], TINY_PARAMS, use_tqdm=False)
    assert_parity(outs, refs, prompts, "gemma3 pytorch ops")


# ---------------------------------------------------------------- windowed attention


def _naive(q, keys, values, q_pos, window, scale, softcap=None):
    """One sequence: q [Lq, H, D] at positions q_pos, keys/values [L, Hkv, D] for positions 0..L-1."""
    rep = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(rep, 1).double(), values.repeat_interleave(rep, 1).double()
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    kp = torch.arange(keys.shape[0]).view(1, 1, -1)
    qp = torch.tensor(q_pos).view(1, -1, 1)
    allowed = (kp <= qp) & (kp > qp - window) if window is not None else kp <= qp
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("softcap", [None, 7.0])
@pytest.mark.parametrize("window", [None, 5, 16])
def test_windowed_paged_attention_matches_naive(window, softcap):
    """A batch of 3 decode rows and 2 prefill chunks (one starting past the window) over a shuffled
    block table: every row equals naive masked attention (float64), in PyTorch ops and, for the
    decode rows, through the fused C kernel; `meta.local` equals a metadata built for the window alone."""
    g = torch.Generator().manual_seed(7)
    bs, hq, hkv, d, scale = 4, 4, 2, 8, 0.3
    ctx_lens = [9, 30, 3, 21, 40]
    new = [1, 1, 1, 6, 13]  # decode rows first
    num_blocks = sum(-(-n // bs) for n in ctx_lens) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in ctx_lens:
        k = -(-n // bs)
        tables.append(perm[at:at + k])
        at += k
    k_cache = torch.randn(num_blocks * bs, hkv, d, generator=g) * 2
    v_cache = torch.randn(num_blocks * bs, hkv, d, generator=g)
    starts = [n - m for n, m in zip(ctx_lens, new)]
    meta = build_metadata(tables, starts, new, bs, None, torch.device("cpu"), local_window=window)
    m = meta.local if window is not None else meta
    q = torch.randn(sum(new), hq, d, generator=g)
    kernels = load_cpu_kernels() if softcap is None else None
    outs = [paged_attention(q, k_cache, v_cache, m, scale, None, softcap)]
    if kernels is not None:
        outs.append(paged_attention(q, k_cache, v_cache, m, scale, kernels, softcap))
    row = 0
    for table, start, n, ctx in zip(tables, starts, new, ctx_lens):
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(ctx)])
        ref = _naive(q[row:row + n], k_cache[slots], v_cache[slots], list(range(start, start + n)), window, scale,
                     softcap)
        for out in outs:
            torch.testing.assert_close(out[row:row + n].double(), ref, atol=2e-5, rtol=1e-5)
        row += n
    if window is not None:  # the local set is the window's own metadata; decode gathers only the window
        alone = build_metadata(tables, starts, new, bs, window, torch.device("cpu"))
        assert torch.equal(alone.decode.slots, meta.local.decode.slots)
        assert meta.local.decode.slots.shape[1] <= window
        assert torch.equal(alone.slot_mapping, meta.slot_mapping)


# ---------------------------------------------------------------- bad input


def test_gemma_config_missing_a_field_names_it(tiny, tmp_path):
    _, ckpt, _ = tiny("gemma2")
    cfg = json.loads((ckpt / "config.json").read_text())
    for field in ("query_pre_attn_scalar", "sliding_window", "attn_logit_softcapping", "head_dim"):
        broken = {k: v for k, v in cfg.items() if k != field}
        path = tmp_path / f"no_{field}.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(UnsupportedModelError, match=f"missing required fields: {field}"):
            load_model_config(path)
    gemma3 = {**cfg, "model_type": "gemma3_text"}
    for field in ("layer_types", "attn_logit_softcapping", "final_logit_softcapping"):
        gemma3.pop(field)
    (tmp_path / "g3.json").write_text(json.dumps(gemma3))
    with pytest.raises(UnsupportedModelError, match="missing required fields: layer_types"):
        load_model_config(tmp_path / "g3.json")
    gemma3["sliding_window_pattern"] = 2  # the older spelling of the pattern
    (tmp_path / "g3.json").write_text(json.dumps(gemma3))
    assert load_model_config(tmp_path / "g3.json").layer_types == [
        "sliding_attention", "full_attention", "sliding_attention"]
    # the same through the engine's entry point
    broken_ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken_ckpt)
    (broken_ckpt / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "query_pre_attn_scalar"}))
    with pytest.raises(UnsupportedModelError, match="query_pre_attn_scalar"):
        LLM(model=str(broken_ckpt), **TINY_ENGINE)


def test_gemma_gguf_missing_window_names_the_key(tiny, tmp_path):
    import gguf
    import numpy as np

    model, _, _ = tiny("gemma3")
    src = write_gguf(model, tmp_path / "full.gguf", None)
    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(tmp_path / "broken.gguf"), "gemma3")
    for field in reader.fields.values():
        if field.name.startswith("gemma3.") and field.name != "gemma3.attention.sliding_window":
            w.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="gemma3.attention.sliding_window"):
        load_model_config(tmp_path / "broken.gguf")
    assert math.isclose(load_model_config(src).attention_scale, 32 ** -0.5)


def test_tiny_gemma3_hydragen_on_full_layers(tiny):
    """Hydragen groups shared prefix blocks on the full-attention layers of a hybrid model (the
    windowed layers attend through their own metadata): outputs equal those without it, and the
    shared prefix (40 tokens, 5 blocks) is longer than the window (12), so a windowed layer that
    wrongly took the shared part would see keys outside its window."""
    _, ckpt, _ = tiny("gemma3")
    g = torch.Generator().manual_seed(99)
    prefix = torch.randint(0, VOCAB, (40,), generator=g).tolist()
    prompts = [{"prompt_token_ids": prefix + torch.randint(0, VOCAB, (3 + i,), generator=g).tolist()} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    runs = {}
    for on in (True, False):
        llm = LLM(model=str(ckpt), block_size=8, enable_hydragen=on, hydragen_min_saved_tokens=1,
                  hydragen_min_saved_fraction=0.0, **TINY_ENGINE)
        runs[on] = (llm.generate(prompts, params, use_tqdm=False), llm.get_stats().hydragen_steps)
    assert runs[True][1] > 0 and runs[False][1] == 0
    for a, b in zip(runs[True][0], runs[False][0]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tid in eb:
                assert abs(ea[tid].logprob - eb[tid].logprob) < 1e-4


def test_perf_model_counts_hybrid_attention_per_layer_kind(gemma_path):
    """The perf model's attention aggregates for Gemma-3-270M: 15 of 18 layers read at most the
    512-token window, 3 the whole 4k context (a per-layer average, as its operators are per layer)."""
    from ridgeline.perf.ops import StepShape

    mc = load_model_config(gemma_path)
    assert mc.window_layer_fraction == 15 / 18
    stats = StepShape.decode(4, 4096).stats(mc.sliding_window, 1.0, mc.window_layer_fraction)
    assert stats.kv_read == pytest.approx(4 * (15 / 18 * 512 + 3 / 18 * 4097))
    assert stats.attn_pairs == pytest.approx(4 * (15 / 18 * 512 + 3 / 18 * 4097))
    short = StepShape.prefill(100).stats(mc.sliding_window, 1.0, mc.window_layer_fraction)
    assert short.attn_pairs == pytest.approx(100 * 101 / 2)  # inside the window every layer sees all


def test_tiny_gemma3_prefix_cache_preemption_and_speculation_keep_outputs(tiny):
    """Windowed and full layers over a cached prefix, after recomputation (preemption in a pool of
    12 blocks) and under n-gram speculation (k + 1 decode rows per sequence): the outputs of a
    plain run, with prefix caching off."""
    _, ckpt, _ = tiny("gemma3")
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, VOCAB, (20,), generator=g).tolist()
    prompts = [{"prompt_token_ids": shared * 2 + torch.randint(0, VOCAB, (5 + i,), generator=g).tolist()}
               for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine = dict(dtype="float32", max_model_len=128, block_size=16)
    block_bytes = 7 * 2 * 2 * 32 * 4 * 16  # layers x K/V x KV heads x head_dim x float32 x block

    def run(**kw):
        llm = LLM(model=str(ckpt), **{**engine, "kv_cache_memory": "64MiB", **kw})
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)], llm.get_stats()

    ref, _ = run(enable_prefix_caching=False)
    cached, stats = run()
    assert cached == ref and stats.prefix_cache_hits > 0
    small, stats = run(kv_cache_memory=str(12 * block_bytes))
    assert small == ref and stats.num_preemptions > 0
    spec, stats = run(speculative="ngram", num_speculative_tokens=4, prompt_lookup_min=1)
    assert spec == ref and stats.spec_decode_num_drafts > 0
