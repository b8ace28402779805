"""FLOPs and bytes moved per operator of one engine step (LLM-Viewer's counting).

A step is a batch composition: for each sequence, the tokens it adds and the context already
cached (plus groups that share a cached prefix, read once per group as Hydragen does). Every
operator's FLOPs and bytes are linear in five aggregates of that composition (`StepStats`),
so the operator table is built once per (model, dtypes) and a step costs a few dot products:
fast enough for the serving simulator's millions of steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig
from .hardware import DTYPE_BYTES

# Aggregates of a step, in this order: tokens computed, sequences, logit rows (sampled
# positions), attention query-key pairs, and KV-cache token positions read.
STAT_NAMES = ("tokens", "seqs", "logits", "attn_pairs", "kv_read")


@dataclass(frozen=True)
class SeqWork:
    """One sequence's part of a step."""
    new_tokens: int  # tokens computed this step (1 for a decode, a chunk for a prefill)
    context_len: int = 0  # tokens already in the KV cache
    sampled: bool = True  # produces logits (a decode, or a prompt's last chunk)

    def __post_init__(self) -> None:
        if self.new_tokens < 1 or self.context_len < 0:
            raise ValueError(f"SeqWork needs new_tokens >= 1 and context_len >= 0, got {self}")


@dataclass
class StepShape:
    seqs: list[SeqWork]
    # (indices into seqs, prefix length): rows whose first tokens are one shared cached prefix
    shared_prefixes: list[tuple[tuple[int, ...], int]] = field(default_factory=list)

    @classmethod
    def decode(cls, batch: int, context: int) -> "StepShape":
        return cls([SeqWork(1, context)] * batch)

    @classmethod
    def prefill(cls, chunk: int, start: int = 0, sampled: bool = True) -> "StepShape":
        return cls([SeqWork(chunk, start, sampled)])

    def stats(self, sliding_window: int | None = None, shared_read_saving: float = 1.0,
              window_layer_fraction: float = 1.0) -> "StepStats":
        """The step's aggregates; shared_read_saving: the fraction of a shared prefix's repeated
        K/V reads that sharing removes (1 = all of them). window_layer_fraction: the share of
        layers that see only `sliding_window` (hybrid models, e.g. Gemma 3: 15 of 18); the others
        see the full context, and only they attend to shared prefixes once per group (the
        aggregates are per-layer averages: every attention operator is linear in them)."""
        tokens = logits = 0
        pairs = kv_read = 0.0
        f = window_layer_fraction if sliding_window is not None else 0.0
        for s in self.seqs:
            n, c = s.new_tokens, s.context_len
            tokens += n
            logits += s.sampled
            full_pairs = n * c + n * (n + 1) / 2  # token j of the chunk sees c + j + 1 keys
            if f < 1.0:
                pairs += (1.0 - f) * full_pairs
                kv_read += (1.0 - f) * (c + n)
            if f > 0.0:
                w = sliding_window
                win_pairs = full_pairs if c + n <= w else sum(min(c + j + 1, w) for j in range(n))
                pairs += f * win_pairs
                kv_read += f * min(c + n, w + n - 1)
        share = 1.0 - f if 0.0 < f < 1.0 else 1.0  # hybrid: Hydragen runs on the full layers only
        for rows, length in self.shared_prefixes:
            # The group reads the prefix once instead of once per row.
            kv_read -= share * shared_read_saving * (len(rows) - 1) * length
        return StepStats(tokens, len(self.seqs), logits, pairs, max(kv_read, 0.0), len(self.shared_prefixes))


@dataclass(frozen=True)
class StepStats:
    tokens: int
    seqs: int
    logits: int
    attn_pairs: float
    kv_read: float
    shared_parts: int = 0  # shared-prefix attention parts (each a few extra operators per layer)

    def vector(self) -> tuple[float, ...]:
        return (self.tokens, self.seqs, self.logits, self.attn_pairs, self.kv_read)


@dataclass(frozen=True)
class OpCost:
    """FLOPs and bytes of one operator as (constant, coefficients over STAT_NAMES), per instance;
    `count` instances per step (once per layer for layer operators)."""
    name: str
    kind: str  # "gemm", "attention", "elementwise" or "sampling"
    count: int
    flops: tuple[float, ...]
    bytes_const: float  # weights, read once per instance whatever the batch
    bytes: tuple[float, ...]

    def flops_for(self, v: tuple[float, ...]) -> float:
        return self.count * sum(c * x for c, x in zip(self.flops, v))

    def bytes_for(self, v: tuple[float, ...]) -> float:
        return self.count * (self.bytes_const + sum(c * x for c, x in zip(self.bytes, v)))


def _per(tokens: float = 0, seqs: float = 0, logits: float = 0, attn_pairs: float = 0,
         kv_read: float = 0) -> tuple[float, ...]:
    return (tokens, seqs, logits, attn_pairs, kv_read)


def operator_table(cfg: ModelConfig, dtype: str = "bfloat16", weight_dtype: str | None = None,
                   kv_dtype: str | None = None) -> list[OpCost]:
    """Every operator of one forward step plus sampling, as linear cost functions."""
    for name, value in (("dtype", dtype), ("weight_dtype", weight_dtype), ("kv_dtype", kv_dtype)):
        if value is not None and value not in DTYPE_BYTES:
            raise ValueError(f"{name} must be one of {', '.join(DTYPE_BYTES)}, got {value!r}")
    a = DTYPE_BYTES[dtype]
    w = DTYPE_BYTES[weight_dtype or dtype]
    kvb = DTYPE_BYTES[kv_dtype or dtype]
    h, q, kv, i, v = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.vocab_size
    qkv = q + 2 * kv
    nl = cfg.num_layers
    hq, d = cfg.num_heads, cfg.head_dim

    def gemm(name: str, k: int, n: int, bias: bool = False) -> OpCost:
        # [T, k] @ [k, n]: weights read once, activations in and out per token.
        return OpCost(name, "gemm", nl, _per(tokens=2 * k * n + (n if bias else 0)), w * k * n + (a * n if bias else 0),
                      _per(tokens=a * (k + n)))

    def elementwise(name: str, width: int, flops_per: float, tensors: int) -> OpCost:
        return OpCost(name, "elementwise", nl, _per(tokens=flops_per * width), 0.0, _per(tokens=a * width * tensors))

    ops = [
        OpCost("embedding", "elementwise", 1, _per(), 0.0, _per(tokens=(w + a) * h)),
        elementwise("attn_norm", h, 4, 2),
        gemm("qkv_proj", h, qkv, cfg.attention_bias),
    ]
    if cfg.qk_norm:
        ops.append(elementwise("qk_norm", q + kv, 4, 2))
    ops += [
        elementwise("rope", q + kv, 3, 3),
        OpCost("kv_write", "elementwise", nl, _per(), 0.0, _per(tokens=2 * kv * (a + kvb))),
        # QK^T and PV (2 * 2 * d per query-key pair and head) plus softmax (~5 per pair and head);
        # reads each sequence's cached K and V once, queries in and outputs out.
        OpCost("attention", "attention", nl, _per(attn_pairs=hq * (4 * d + 5)), 0.0,
               _per(tokens=2 * a * q, kv_read=2 * kv * kvb)),
        gemm("o_proj", q, h),
        elementwise("residual_add", h, 1, 3),
        elementwise("mlp_norm", h, 4, 2),
        gemm("gate_up_proj", h, 2 * i),
        elementwise("silu_mul", i, 5, 3),
        gemm("down_proj", i, h),
        elementwise("residual_add_2", h, 1, 3),
        OpCost("final_norm", "elementwise", 1, _per(logits=4 * h), 0.0, _per(logits=2 * a * h)),
        OpCost("lm_head", "gemm", 1, _per(logits=2 * h * v), w * h * v, _per(logits=a * h + 4 * v)),
        # Softmax, top-k/p filtering and the draw over float32 logits: a few passes over [rows, V].
        OpCost("sampling", "sampling", 1, _per(logits=10 * v), 0.0, _per(logits=3 * 4 * v)),
    ]
    return ops


def weight_bytes(cfg: ModelConfig, weight_dtype: str) -> float:
    """Bytes of all weights (embedding and lm_head counted once when tied)."""
    h, q, kv, i, v = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.vocab_size
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    if cfg.attention_bias:
        per_layer += q + 2 * kv
    if cfg.qk_norm:
        per_layer += 2 * cfg.head_dim
    params = cfg.num_layers * per_layer + v * h + h + (0 if cfg.tie_word_embeddings else v * h)
    return params * DTYPE_BYTES[weight_dtype]


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str) -> float:
    """K and V of one token across all layers (the engine's CacheConfig.bytes_per_block / block_size)."""
    return 2 * cfg.num_layers * cfg.kv_size * DTYPE_BYTES[kv_dtype]
