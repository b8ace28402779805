"""Parity with transformers (float32) on tiny random models of every supported architecture.

For each architecture a tiny model is built from transformers' config class, saved as a
safetensors checkpoint, and run by ridgeline on three token-id prompts in one batch; the
greedy tokens must equal transformers' and the top-5 logprobs agree within 1e-3. The Llama,
Qwen2 and Qwen3 models are also exported to F32 GGUFs (llama.cpp's layout) and run from there.
"""

from __future__ import annotations

import pytest
import torch

from ridgeline import LLM, SamplingParams
from ridgeline.loader import default_model_path
from ridgeline.tokenizer import tokenizer_digest, load_tokenizer

from .tiny_models import (VARIANTS, VOCAB, build_model, hf_greedy, read_tokenizer_metadata, save_checkpoint,
                          write_gguf)

PROMPT_LENS = (5, 17, 40)
NEW_TOKENS = 24
LOGPROB_TOL = 1e-3
TIE_TOL = 1e-4  # a reference top-2 gap below this is a tie: either token is a correct greedy choice
ENGINE = dict(dtype="float32", max_model_len=512, kv_cache_memory="64MiB")
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer, prompts):
    """variant -> (transformers model, checkpoint dir, reference greedy results); built once per module."""
    cache: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in cache:
            model = build_model(variant)
            ckpt = save_checkpoint(model, tmp_path_factory.mktemp(variant), tokenizer)
            refs = [hf_greedy(model, ids, NEW_TOKENS) for ids in prompts]
            cache[variant] = (model, ckpt, refs)
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory, tokenizer):
    """A private RIDGELINE_CACHE_DIR. `register(path)` stores the default model's (already converted)
    tokenizer under the GGUF's tokenizer digest, so ridgeline skips the ~10 s vocabulary conversion: the tiny
    GGUFs carry the default model's tokenizer metadata verbatim."""
    root = tmp_path_factory.mktemp("ridgeline_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RIDGELINE_CACHE_DIR", str(root))

        def register(path):
            tokenizer.save_pretrained(str(root / "tokenizers" / tokenizer_digest(path)))
            return path

        yield register


@pytest.fixture(scope="module")
def tokenizer_meta():
    return read_tokenizer_metadata(default_model_path())


def assert_parity(outs, refs, prompts, label: str) -> None:
    for p, (ids, out, (ref_tokens, ref_lps)) in enumerate(zip(prompts, outs, refs)):
        assert out.prompt_token_ids == ids
        got = out.outputs[0]
        assert len(got.token_ids) == NEW_TOKENS and len(got.logprobs) == NEW_TOKENS, (label, p)
        for step, (tok, entry, ref) in enumerate(zip(got.token_ids, got.logprobs, ref_lps)):
            where = f"{label}, prompt {p} (len {len(ids)}), step {step}"
            top_vals, top_ids = ref.topk(5)
            for tid, val in zip(top_ids.tolist(), top_vals.tolist()):
                assert tid in entry, f"{where}: reference top-5 token {tid} missing from ridgeline's logprobs"
                assert abs(entry[tid].logprob - val) < LOGPROB_TOL, (
                    f"{where}: logprob of token {tid}: ridgeline {entry[tid].logprob:.6f}, transformers {val:.6f}")
            assert entry[tok].rank == 1, f"{where}: chosen token {tok} has rank {entry[tok].rank}"
            if tok != ref_tokens[step]:
                gap = float(top_vals[0] - ref[tok])
                assert gap < TIE_TOL, (
                    f"{where}: ridgeline chose {tok}, transformers {ref_tokens[step]} "
                    f"(reference gap {gap:.2e}); tokens so far {got.token_ids[:step]}")
                break  # a tie broken the other way: the continuations legitimately differ from here


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_safetensors_checkpoint_matches_transformers(variant, tiny, prompts):
    model, ckpt, refs = tiny(variant)
    llm = LLM(model=str(ckpt), **ENGINE)
    mc, hc = llm.engine.model_config, model.config
    assert mc.architecture == hc.model_type
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    assert (mc.num_heads, mc.num_kv_heads, mc.head_dim) == (hc.num_attention_heads, hc.num_key_value_heads, head_dim)
    assert mc.tie_word_embeddings == hc.tie_word_embeddings
    assert mc.rope_theta == hc.rope_parameters["rope_theta"]
    assert mc.sliding_window == (hc.sliding_window if variant == "mistral" else None)
    assert mc.attention_bias == (variant == "qwen2")
    assert mc.qk_norm == (variant == "qwen3")
    assert (mc.rope_scaling or {}).get("rope_type", "default") == hc.rope_parameters["rope_type"]
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], PARAMS, use_tqdm=False)
    assert_parity(outs, refs, prompts, variant)


def test_chunked_prefill_small_blocks_sliding_window(tiny, prompts):
    """Mistral (window 24) with prompts split into 16-token chunks over 8-token KV blocks."""
    _, ckpt, refs = tiny("mistral")
    llm = LLM(model=str(ckpt), max_num_batched_tokens=16, max_num_seqs=4, block_size=8, **ENGINE)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], PARAMS, use_tqdm=False)
    assert_parity(outs, refs, prompts, "mistral chunked")


@pytest.mark.parametrize("variant", ["llama_tied", "llama3_rope", "qwen2", "qwen3"])
def test_gguf_export_matches_transformers(variant, tiny, prompts, gguf_cache, tokenizer_meta):
    """The model written to an F32 GGUF as llama.cpp does (Llama: q/k rows permuted, rope_freqs for
    llama3 scaling; Qwen2: qkv biases; Qwen3: q/k norms, attention.key_length) gives the original
    model's outputs in ridgeline."""
    model, ckpt, refs = tiny(variant)
    path = gguf_cache(write_gguf(model, ckpt / "model.gguf", tokenizer_meta))
    llm = LLM(model=str(path), **ENGINE)
    mc = llm.engine.model_config
    assert mc.architecture == model.config.model_type
    assert mc.tie_word_embeddings == model.config.tie_word_embeddings
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], PARAMS, use_tqdm=False)
    assert_parity(outs, refs, prompts, f"{variant} gguf")

    # transformers' GGUF reader ignores rope_freqs, and for qwen3 ignores attention.key_length
    # (it keeps Qwen3Config's default head_dim, 128), so it cannot read those two exports.
    if variant not in ("llama3_rope", "qwen3"):
        # transformers' own GGUF reader sees the same model in the export (a copy without the
        # tokenizer metadata, which transformers would spend seconds parsing).
        from transformers import AutoModelForCausalLM

        bare = write_gguf(model, ckpt / "bare.gguf", None)
        hf_gguf = AutoModelForCausalLM.from_pretrained(str(bare.parent), gguf_file=bare.name,
                                                       dtype=torch.float32).eval()
        ids = torch.tensor([prompts[-1]])
        with torch.no_grad():
            torch.testing.assert_close(hf_gguf(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers4_config_layout_parses_the_same(variant, tiny):
    """config.json as transformers 4 wrote it (rope_theta and rope_scaling at the top level instead of
    transformers 5's rope_parameters) describes the same model."""
    import json

    from ridgeline.config import ModelConfig

    _, ckpt, _ = tiny(variant)
    new = json.loads((ckpt / "config.json").read_text())
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    rope = dict(new["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    assert ModelConfig.from_hf(old) == ModelConfig.from_hf(new)
