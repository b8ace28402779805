"""Tiny randomly initialised checkpoints of each supported architecture, for parity tests.

Each model is built from transformers' own config class, its weights re-drawn with a
large standard deviation (the default init, std 0.02, gives near-uniform logits over a
49k vocabulary, so greedy argmax would hinge on rounding noise), and saved as a
safetensors checkpoint next to the default model's tokenizer. `write_gguf` writes a Llama,
Qwen2, Qwen3, Gemma 2 or Gemma 3 model to an F32 GGUF the way llama.cpp's convert_hf_to_gguf.py does.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

VOCAB = 49152  # the default model's tokenizer (SmolLM2)

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# name -> (transformers config class name, config overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    # llama3 rope scaling (original context 64, so all three wavelength bands occur at head_dim 16)
    "llama3_rope": ("LlamaConfig", dict(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False, num_hidden_layers=3,
                                        rope_theta=500000.0)),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    # a window shorter than prompt + output, so the window mask is exercised
    "mistral": ("MistralConfig", dict(sliding_window=24, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=1000000.0)),
    # head_dim 32 with hidden 64 / 4 heads: q_proj is 64 -> 128
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
}

# Gemma: windows shorter than the longer prompts, so windowed layers slide during prefill and decode;
# query_pre_attn_scalar = head_dim where a GGUF export is tested (llama.cpp derives the scale from it)
GEMMA_VARIANTS: dict[str, tuple[str, dict]] = {
    # layers: sliding, full, sliding; attention and final soft-capping (50 / 30)
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16, sliding_window=12,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    # the default pattern over 7 layers (5 sliding, 1 full, 1 sliding); head_dim 32 != hidden / heads
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=7, head_dim=32, query_pre_attn_scalar=32,
                                        sliding_window=12)),
    # explicit layer_types, linear rope scaling on the full layers, another scale, final soft-capping
    "gemma3_scaled": ("Gemma3TextConfig", dict(
        num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=20, sliding_window=10, final_logit_softcapping=20.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0}})),
}


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.3, embed_std: float = 1.0) -> None:
    """Redraw every parameter: embedding / lm_head N(0, embed_std), other matrices N(0, std),
    biases N(0, 0.5), norm gains U(0.5, 1.5) (so a dropped gain or bias changes the output).

    With hidden 64 and embed_std 1 the logits have std ~8: the top token has probability ~0.1-0.3
    and the gap to the runner-up is ~1.7 on average (a few hundredths at worst over a test's
    steps), far above float32 rounding (~1e-5).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights are listed once
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=g) * embed_std)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_model(variant: str, seed: int = 0, std: float = 0.3):
    """A float32 transformers model of `variant`, in eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, overrides = {**VARIANTS, **GEMMA_VARIANTS}[variant]
    config = getattr(transformers, cls_name)(**{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed, std)
    return model.eval()


def save_checkpoint(model, directory: Path, tokenizer) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode with transformers' KV cache and no logits processors (EOS never stops it).

    Returns the new token ids and, per step, the float32 log-softmax over the vocabulary.
    """
    tokens, logprobs = [], []
    past = None
    x = torch.tensor([ids])
    for _ in range(n):
        out = model(input_ids=x, past_key_values=past, use_cache=True)
        past = out.past_key_values
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        tok = int(lp.argmax())
        tokens.append(tok)
        logprobs.append(lp)
        x = torch.tensor([[tok]])
    return tokens, logprobs


def top2_margin(logprobs: list[torch.Tensor]) -> float:
    """Smallest gap between the best and second-best logprob over the steps."""
    return min(float(v[0] - v[1]) for v in (lp.topk(2).values for lp in logprobs))


# ---------------------------------------------------------------- GGUF export

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: interleave the rotary halves of each q/k head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(cfg) -> np.ndarray:
    """The rope_freqs tensor convert_hf_to_gguf.py writes for llama3 rope scaling (divisors of inv_freq).

    (llama.cpp reads original_max_position_embeddings from the top level of config.json, defaulting
    to 8192; here it is taken from the rope parameters, which is what the model actually uses.)
    """
    rs = cfg.rope_parameters
    base = rs["rope_theta"]
    dim = cfg.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",  # qwen2
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",  # qwen3
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

_TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
)


_GEMMA_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


def read_tokenizer_metadata(gguf_path: Path) -> dict[str, tuple]:
    """The tokenizer key/values of a GGUF file: key -> (value, value type, array item type).

    (Parsing a 49k-token vocabulary takes GGUFReader seconds: read it once and reuse.)
    """
    import gguf

    src = gguf.GGUFReader(str(gguf_path))
    meta = {}
    for key in _TOKENIZER_KEYS:
        field = src.fields[key]
        vtype = field.types[0]
        meta[key] = (field.contents(), vtype, field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    return meta


def write_gguf(model, path: Path, tokenizer_meta: dict[str, tuple] | None) -> Path:
    """Write a transformers Llama / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 model to an all-F32 GGUF as
    llama.cpp's convert_hf_to_gguf.py does (GGUF architecture "llama", "qwen2", "qwen3", "gemma2" or
    "gemma3"; only Llama's q/k rows are permuted; Gemma's norm gains stored as 1 + weight), with the given tokenizer metadata (from `read_tokenizer_metadata`; None writes
    none, for readers that only need the model)."""
    import gguf

    cfg = model.config
    arch = cfg.model_type
    arch = {"gemma3_text": "gemma3"}.get(arch, arch)
    if arch not in ("llama", "qwen2", "qwen3", "gemma2", "gemma3"):
        raise ValueError(f"write_gguf writes llama, qwen2, qwen3, gemma2 and gemma3 models, not {arch}")
    gemma = arch.startswith("gemma")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-random-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = cfg.rope_parameters["full_attention"] if arch == "gemma3" else cfg.rope_parameters
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    elif head_dim != cfg.hidden_size // cfg.num_attention_heads or gemma:  # an explicit head_dim (Qwen3, Gemma)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if gemma:  # llama.cpp's Gemma keys; the layer pattern and Gemma 3's local rope base are implied
        if rope.get("rope_type", "default") != "default" or cfg.layer_types != [
                "sliding_attention" if (i + 1) % {"gemma2": 2, "gemma3": 6}[arch] else "full_attention"
                for i in range(cfg.num_hidden_layers)]:
            raise ValueError("a Gemma GGUF holds the default layer pattern and unscaled rope only")
        w.add_sliding_window(cfg.sliding_window)
        if arch == "gemma2":
            w.add_float32("gemma2.attn_logit_softcapping", float(cfg.attn_logit_softcapping))
            w.add_float32("gemma2.final_logit_softcapping", float(cfg.final_logit_softcapping))
    for key, (value, vtype, sub) in (tokenizer_meta or {}).items():
        w.add_key_value(key, value, vtype, sub_type=sub)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if gemma:  # convert_hf_to_gguf.py stores Gemma's norm gains as 1 + weight
        sd = {k: v + 1 if k.endswith("norm.weight") else v for k, v in sd.items()}
    tensors: list[tuple[str, np.ndarray]] = [("token_embd.weight", sd["model.embed_tokens.weight"])]
    if cfg.rope_parameters.get("rope_type", "default") == "llama3":
        tensors.append(("rope_freqs.weight", _llama3_rope_factors(cfg)))
    for i in range(cfg.num_hidden_layers):
        for hf_name, gg_name in (_GEMMA_LAYER_TENSORS if gemma else _LAYER_TENSORS).items():
            arr = sd.get(f"model.layers.{i}.{hf_name}")
            if arr is None:
                continue
            if arch == "llama" and hf_name == "self_attn.q_proj.weight":
                arr = _permute(arr, cfg.num_attention_heads)
            elif arch == "llama" and hf_name == "self_attn.k_proj.weight":
                arr = _permute(arr, cfg.num_key_value_heads)
            tensors.append((f"blk.{i}.{gg_name}", arr))
    tensors.append(("output_norm.weight", sd["model.norm.weight"]))
    if not cfg.tie_word_embeddings:
        tensors.append(("output.weight", sd["lm_head.weight"]))
    for name, arr in tensors:
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
