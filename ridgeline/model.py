"""The decoder: Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 in plain PyTorch over a flat token batch.

Speed choices, all visible here: q/k/v and gate/up projections are fused into one
matrix each; rotary embedding is applied to q and k in one op on the fused output;
cos/sin are looked up once per step; logits are computed only for rows that need them;
on CPU, block-quantized GGUF weights stay in their blocks and run through the C kernels of
quant.py (the embedding is looked up from its blocks, a tied lm_head multiplies by them);
dense bfloat16 and float32 weights are pre-packed for oneDNN, whose kernels read them
~2x faster than the plain layout at batch 1 (for the 49k x 576 lm_head: 44 vs 15 GB/s in float32).
On CPU, the per-layer elementwise work and decode attention run as fused C kernels when they
build (ridgeline/kernels; forward() then takes _forward_fused); the PyTorch ops are the fallback.

Gemma (_forward_gemma) differs in the layer body: the embedding is scaled by sqrt(hidden) (rounded
to the model's dtype, as transformers does), each sublayer has a norm before and after it, the MLP
is GeGLU with tanh GELU, norm gains arrive as (1 + weight) (loader.py), the attention scale comes
from query_pre_attn_scalar, windowed layers read `meta.local` and their own rope table (Gemma 3:
base 10,000, no scaling), and Gemma 2 soft-caps attention scores and final logits.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .attention import AttentionMetadata, paged_attention
from .config import ModelConfig
from .kernels import CpuKernels, cpu_flags, load_cpu_kernels
from .kv_cache import KVCachePool
from .quant import QuantLinear, QuantWeight

# oneDNN's bfloat16 weight packing needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT (it fails elsewhere)
_ONEDNN_BF16_FLAGS = ({"avx512bw", "avx512vl", "avx512dq"}, {"avx_ne_convert"})


def _onednn_packs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.bfloat16, torch.float32):
        return False
    return dtype == torch.float32 or any(need <= cpu_flags() for need in _ONEDNN_BF16_FLAGS)


class Linear:
    """y = x @ W^T (+ b), with the weight pre-packed for oneDNN when that is faster."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed = None
        self.weight = weight
        if weight.device.type == "cpu" and _onednn_packs(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            self.weight = None  # the packed copy replaces it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def rope_inv_freq(config: ModelConfig, freq_factors: torch.Tensor | None) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if freq_factors is not None:  # GGUF stores llama3-style scaling as per-frequency divisors
        return inv_freq / freq_factors.float()
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    kind = rs.get("rope_type", rs.get("type"))
    factor = float(rs.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, smooth in between.
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


class SplitLinear:
    """Several linear layers over one input, outputs side by side: a fused q/k/v or gate/up whose
    parts are stored in different formats (Q4_K_M files keep some v projections in Q6_K)."""

    def __init__(self, parts: list[QuantLinear | Linear]):
        self.parts = parts
        self.out_features = sum(p.out_features for p in parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def make_linear(parts: list[torch.Tensor | QuantWeight], bias: torch.Tensor | None,
                kernels: CpuKernels | None, activation_bytes: int = 1) -> Linear | QuantLinear | SplitLinear:
    """One linear layer from weights stacked along the output dimension (fused q/k/v, gate/up).
    Block-quantized parts (present only where `kernels` runs them, see Transformer) are joined
    when they share a format, else run side by side."""
    kinds = {p.fmt if isinstance(p, QuantWeight) else None for p in parts}
    if kinds == {None}:
        return Linear(torch.cat(parts) if len(parts) > 1 else parts[0], bias)
    if len(kinds) == 1:
        return QuantLinear(QuantWeight.cat(parts) if len(parts) > 1 else parts[0], kernels, bias, activation_bytes)
    # mixed: block formats side by side, or blocks beside a dense part (a type without a kernel)
    biases = bias.split([p.shape[0] for p in parts]) if bias is not None else [None] * len(parts)
    return SplitLinear([make_linear([p], None if b is None else b.contiguous(), kernels, activation_bytes)
                        for p, b in zip(parts, biases)])


class Layer:
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor | QuantWeight], prefix: str,
                 kernels: CpuKernels | None, activation_bytes: int = 1):
        """Takes (pops) the layer's weights out of `w`, so fusing them never holds two copies."""
        def linear(parts: list, bias: torch.Tensor | None) -> Linear | QuantLinear | SplitLinear:
            return make_linear(parts, bias, kernels, activation_bytes)

        att = prefix + "self_attn."
        self.input_norm = w.pop(prefix + "input_layernorm.weight")
        self.post_norm = w.pop(prefix + "post_attention_layernorm.weight")
        bias = None
        if cfg.attention_bias:
            bias = torch.cat([w.pop(att + "q_proj.bias"), w.pop(att + "k_proj.bias"), w.pop(att + "v_proj.bias")])
        self.qkv = linear([w.pop(att + "q_proj.weight"), w.pop(att + "k_proj.weight"), w.pop(att + "v_proj.weight")],
                          bias)
        self.o = linear([w.pop(att + "o_proj.weight")], w.pop(att + "o_proj.bias", None))
        self.q_norm = w.pop(att + "q_norm.weight", None)
        self.k_norm = w.pop(att + "k_norm.weight", None)
        self.window = cfg.layer_window(int(prefix.split(".")[2]))
        if cfg.is_gemma:  # the norms after attention and around the MLP (post_norm: after attention)
            self.pre_ffn_norm = w.pop(prefix + "pre_feedforward_layernorm.weight")
            self.post_ffn_norm = w.pop(prefix + "post_feedforward_layernorm.weight")
        mlp = prefix + "mlp."
        self.gate_up = linear([w.pop(mlp + "gate_proj.weight"), w.pop(mlp + "up_proj.weight")], None)
        self.down = linear([w.pop(mlp + "down_proj.weight")], None)


class Transformer:
    """Weights plus a forward over the flat batch; no autograd, no nn.Module machinery."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor | QuantWeight], dtype: torch.dtype,
                 device: torch.device, cpu_kernels: bool = True, quant_activation_bytes: int = 1):
        """Takes the weights out of `weights` as it builds (the dict is left empty)."""
        self.config = config
        self.dtype = dtype
        self.device = device
        lib = load_cpu_kernels()
        # Block-quantized weights run as such on CPU through the C kernels; elsewhere (GPU, or
        # no kernels) each is dequantized here (on the host), one tensor at a time.
        quant = lib if device.type == "cpu" and lib is not None and lib.supports(dtype) else None
        rope_freqs = weights.pop("rope_freqs", None)
        for k in list(weights):
            v = weights[k]
            if isinstance(v, QuantWeight):
                if quant is None:
                    host = dtype if lib is not None and lib.supports(dtype) else torch.float32
                    weights[k] = v.dequantize(host, lib).to(device=device, dtype=dtype)
            else:
                weights[k] = v.to(device=device, dtype=dtype)
        missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in weights]
        if missing:
            raise ValueError(f"checkpoint is missing tensors: {', '.join(missing)}")
        w = weights
        self.quant_kernels = quant
        self.embed = w.pop("model.embed_tokens.weight")
        self.layers = [Layer(config, w, f"model.layers.{i}.", quant, quant_activation_bytes)
                       for i in range(config.num_layers)]
        self.norm = w.pop("model.norm.weight")
        lm_head = w.pop("lm_head.weight", None)
        if config.tie_word_embeddings or lm_head is None:
            lm_head = self.embed
        self.lm_head = make_linear([lm_head], None, quant, quant_activation_bytes)
        self.cos, self.sin = self._rope_tables(rope_inv_freq(config, rope_freqs).to(device))
        # windowed layers with their own rope base (Gemma 3: 10,000, unscaled) get their own table
        self.local_cos, self.local_sin = self.cos, self.sin
        if config.rope_local_theta is not None and (config.rope_local_theta != config.rope_theta
                                                    or config.rope_scaling is not None):
            local = dataclasses.replace(config, rope_theta=config.rope_local_theta, rope_scaling=None)
            self.local_cos, self.local_sin = self._rope_tables(rope_inv_freq(local, None).to(device))
        self.scale = config.attention_scale
        # sqrt(hidden) rounded to the model's dtype first, as transformers' Gemma embedding does
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5).to(dtype) if config.is_gemma else None
        self.kernels: CpuKernels | None = quant if cpu_kernels else None
        # the fused decode attention has no soft-capping: Gemma 2 attends through PyTorch ops
        self.attention_kernels = self.kernels if self.kernels is not None and self.kernels.handles_attention(
            config.num_heads) and config.attn_logit_softcap is None else None

    def _rope_tables(self, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(self.config.max_position_embeddings, device=inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        # Rotate-half rotary as x * cos + roll(x, D/2) * sin with the sign folded into the table:
        # three elementwise ops and a roll instead of split, six ops and a cat.
        return (torch.cat((freqs.cos(), freqs.cos()), dim=-1).to(self.dtype),
                torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(self.dtype))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, QuantWeight):
            return self.embed.rows(ids, self.quant_kernels, self.dtype)
        return self.embed[ids]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half rotary embedding on x: [T, H, D]; cos/sin: [T, 1, D] (sin's first half negated)."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVCachePool, logit_rows: torch.Tensor) -> torch.Tensor:
        """Run the flat batch; return float32 logits for `logit_rows` only."""
        if self.config.is_gemma:
            return self._forward_gemma(input_ids, positions, meta, kv, logit_rows)
        if self.kernels is not None:
            return self._forward_fused(input_ids, positions, meta, kv, logit_rows)
        cfg = self.config
        t = input_ids.shape[0]
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        h = self._embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = F.rms_norm(h, (cfg.hidden_size,), layer.input_norm, eps)
            qkv = layer.qkv(x)
            qk_size = cfg.q_size + cfg.kv_size
            v = qkv[:, qk_size:]  # (slices, not split(): this loop runs ~30 x per step, Python costs count)
            qk = self._qk(layer, qkv, t)
            qk = self._rope(qk, cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
            k_cache, v_cache = kv.layer(i)
            k_cache.index_copy_(0, meta.slot_mapping, k)
            v_cache.index_copy_(0, meta.slot_mapping, v.view(t, hkv, d))
            attn = paged_attention(q, k_cache, v_cache, meta, self.scale)
            h = h + layer.o(attn.reshape(t, cfg.q_size))
            x = F.rms_norm(h, (cfg.hidden_size,), layer.post_norm, eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate) * up)
        h = F.rms_norm(h[logit_rows], (cfg.hidden_size,), self.norm, eps)
        return self.lm_head(h).float()

    def _qk(self, layer: Layer, qkv: torch.Tensor, t: int) -> torch.Tensor:
        """q and k heads of the fused projection as [T, Hq + Hkv, D], q/k-normed where the model has it."""
        cfg = self.config
        qk_size = cfg.q_size + cfg.kv_size
        if layer.q_norm is None:
            return qkv[:, :qk_size].view(t, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        d, eps = cfg.head_dim, cfg.rms_norm_eps
        q = F.rms_norm(qkv[:, :cfg.q_size].reshape(t, cfg.num_heads, d), (d,), layer.q_norm, eps)
        k = F.rms_norm(qkv[:, cfg.q_size:qk_size].reshape(t, cfg.num_kv_heads, d), (d,), layer.k_norm, eps)
        return torch.cat((q, k), dim=1)

    def _forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv: KVCachePool, logit_rows: torch.Tensor) -> torch.Tensor:
        """forward() with the fused CPU kernels: per layer, residual add + RMSNorm, rotary + KV
        write and SiLU * up are one call each (the residual add of each sublayer is folded
        into the next norm)."""
        cfg = self.config
        kern = self.kernels
        t = input_ids.shape[0]
        eps = cfg.rms_norm_eps
        qk_size = cfg.q_size + cfg.kv_size
        h = self._embed(input_ids)
        delta = None  # the last sublayer's output, not yet added to h
        for i, layer in enumerate(self.layers):
            x = kern.add_rms_norm(h, layer.input_norm, eps, delta)
            qkv = layer.qkv(x)
            qk = self._qk(layer, qkv, t).view(t, -1)
            k_cache, v_cache = kv.layer(i)
            q = kern.rope_store(qk, qkv[:, qk_size:], positions, self.cos, self.sin, k_cache, v_cache,
                                meta.slot_mapping, cfg.num_heads)
            attn = paged_attention(q, k_cache, v_cache, meta, self.scale, self.attention_kernels)
            x = kern.add_rms_norm(h, layer.post_norm, eps, layer.o(attn.reshape(t, cfg.q_size)))
            delta = layer.down(kern.silu_mul(layer.gate_up(x)))
        h, delta = h[logit_rows], delta[logit_rows]
        return self.lm_head(kern.add_rms_norm(h, self.norm, eps, delta)).float()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm of x (after x += delta in place, with delta), fused where the kernels are."""
        if self.kernels is not None:
            return self.kernels.add_rms_norm(x, weight, self.config.rms_norm_eps, delta)
        if delta is not None:
            x.add_(delta)
        return F.rms_norm(x, (x.shape[-1],), weight, self.config.rms_norm_eps)

    def _forward_gemma(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv: KVCachePool, logit_rows: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        kern = self.kernels
        t = input_ids.shape[0]
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qk_size = cfg.q_size + cfg.kv_size
        if cfg.hybrid_attention and meta.local is None:
            raise ValueError("a hybrid-attention model needs the windowed layers' metadata (build_metadata local_window)")
        h = self._embed(input_ids) * self.embed_scale
        delta = None  # the last MLP's normed output, not yet added to h
        for i, layer in enumerate(self.layers):
            local = layer.window is not None
            m = meta.local if local and meta.local is not None else meta
            cos_t, sin_t = (self.local_cos, self.local_sin) if local else (self.cos, self.sin)
            x = self._norm(h, layer.input_norm, delta)
            qkv = layer.qkv(x)
            qk = self._qk(layer, qkv, t)
            k_cache, v_cache = kv.layer(i)
            if kern is not None:
                q = kern.rope_store(qk.reshape(t, -1), qkv[:, qk_size:], positions, cos_t, sin_t, k_cache, v_cache,
                                    meta.slot_mapping, hq)
            else:
                qk = self._rope(qk, cos_t[positions].unsqueeze(1), sin_t[positions].unsqueeze(1))
                q = qk[:, :hq]
                k_cache.index_copy_(0, meta.slot_mapping, qk[:, hq:])
                v_cache.index_copy_(0, meta.slot_mapping, qkv[:, qk_size:].reshape(t, hkv, d))
            attn = paged_attention(q, k_cache, v_cache, m, self.scale, self.attention_kernels, cfg.attn_logit_softcap)
            a = self._norm(layer.o(attn.reshape(t, cfg.q_size)), layer.post_norm)
            x = self._norm(h, layer.pre_ffn_norm, a)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            delta = self._norm(layer.down(F.gelu(gate, approximate="tanh") * up), layer.post_ffn_norm)
        h = self._norm(h[logit_rows], self.norm, delta[logit_rows])
        logits = self.lm_head(h).float()
        if cfg.final_logit_softcap is not None:
            logits = torch.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits
