"""Model architecture description, read from a Hugging Face config.json or GGUF metadata.

One dataclass covers every supported decoder: the families differ only in a few
switches (qkv bias, q/k RMSNorm, sliding window, rope scaling, tied embeddings). Gemma 2 and 3
add hybrid attention (a window on some layers, `layer_types`), a second rope base for the
windowed layers, attention and final-logit soft-capping and their own attention scale; their
norm gains are kept as (1 + weight), the factor the model multiplies by (see loader.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
# Hugging Face model_type -> architecture (Gemma 3's text-only checkpoints say gemma3_text)
_HF_MODEL_TYPES = {"gemma3_text": "gemma3"}
# layers in each repeat of the Gemma layer pattern, the last one global (llama.cpp and
# transformers' defaults where a file does not spell out the pattern)
GEMMA_PATTERN = {"gemma2": 2, "gemma3": 6}
# Gemma 3's windowed layers use this rope base (llama.cpp hardcodes it; HF: rope_local_base_freq)
GEMMA3_LOCAL_ROPE_THETA = 10000.0
LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedModelError(ValueError):
    """The checkpoint is of an architecture (or variant) ridgeline does not run."""


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Hybrid attention: per layer "full_attention" or "sliding_attention" (None: every layer
    # sees `sliding_window` if set, else everything).
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # rope base of the sliding layers (None: rope_theta)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power (None: head_dim)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the logits

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"model config field {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise UnsupportedModelError(
                    f"rope scaling type {kind!r} is not supported; supported: default, linear, llama3")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise UnsupportedModelError(
                    f"model config field layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise UnsupportedModelError(f"model config field layer_types has unknown types {bad}; "
                                            f"supported: {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise UnsupportedModelError("model config field sliding_window is needed by its sliding_attention layers")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UnsupportedModelError(f"model config field sliding_window must be > 0, got {self.sliding_window}")

    @property
    def is_gemma(self) -> bool:
        return self.architecture in GEMMA_ARCHITECTURES

    def layer_window(self, i: int) -> int | None:
        """The attention window of layer i (None: full context)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    @property
    def hybrid_attention(self) -> bool:
        """Some layers windowed, others not: the runner builds attention metadata for each kind."""
        return self.layer_types is not None and len(set(self.layer_types)) > 1

    @property
    def uniform_window(self) -> int | None:
        """The window every layer shares (None: full context, or hybrid: see layer_window)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if set(self.layer_types) == {"sliding_attention"} else None

    @property
    def window_layer_fraction(self) -> float:
        """The share of layers that see only the window (1.0 without layer_types)."""
        if self.layer_types is None:
            return 1.0
        return self.layer_types.count("sliding_attention") / self.num_layers

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dictionary."""
        model_type = _HF_MODEL_TYPES.get(cfg.get("model_type"), cfg.get("model_type"))
        if model_type == "gemma3" and isinstance(cfg.get("text_config"), dict):
            raise UnsupportedModelError(
                "config.json is a multimodal Gemma 3 (model_type gemma3 with a text_config); ridgeline runs "
                "the text-only checkpoints (model_type gemma3_text) and Gemma 3 GGUF files")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = cfg.get("architectures") or []
            raise UnsupportedModelError(
                f"config.json model_type {model_type!r} (architectures {archs}) is not supported; "
                f"supported model_type values: {', '.join(SUPPORTED_ARCHITECTURES)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise UnsupportedModelError(f"config.json is missing required fields: {', '.join(missing)}")
        heads = cfg["num_attention_heads"]
        # transformers 5 nests rope settings under rope_parameters; older configs keep them flat.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        kind = rope.get("rope_type", rope.get("type", "default"))
        eos = cfg.get("eos_token_id")
        sliding = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding = None
        gemma = _gemma_hf_fields(model_type, cfg) if model_type in GEMMA_ARCHITECTURES else {}
        if gemma:
            theta, rope, kind = gemma.pop("rope")
        return cls(
            architecture=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type in GEMMA_ARCHITECTURES)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type in ("qwen3", "gemma3"),
            sliding_window=sliding,
            rope_scaling=None if kind == "default" else rope,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            **gemma,
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_names: set[str]) -> "ModelConfig":
        """Build from GGUF key/value metadata (llama.cpp's naming)."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2", "qwen3", *GEMMA_ARCHITECTURES):
            raise UnsupportedModelError(
                f"GGUF general.architecture {arch!r} is not supported; supported: llama, qwen2, qwen3, gemma2, gemma3")

        def get(key: str, default: Any = None, required: bool = False) -> Any:
            full = f"{arch}.{key}"
            if full not in meta:
                if required:
                    raise UnsupportedModelError(f"GGUF metadata is missing {full}")
                return default
            return meta[full]

        heads = int(get("attention.head_count", required=True))
        hidden = int(get("embedding_length", required=True))
        head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or hidden // heads)
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        rope_scaling = None
        scaling_type = get("rope.scaling.type")
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
        elif scaling_type not in (None, "none"):
            raise UnsupportedModelError(f"GGUF rope scaling type {scaling_type!r} is not supported")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        gemma = _gemma_gguf_fields(arch, get) if arch in GEMMA_ARCHITECTURES else {}
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length", required=True)),
            num_layers=int(get("block_count", required=True)),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            sliding_window=get("attention.sliding_window"),
            rope_scaling=rope_scaling,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[] if eos is None else [int(eos)],
            **gemma,
        )


def _gemma_layer_types(arch: str, num_layers: int, pattern: Any) -> list[str]:
    """The sliding / full pattern: an int n (every n-th layer global, the others windowed) or a
    per-layer list of booleans (True: windowed), as GGUF writers spell it."""
    if isinstance(pattern, (list, tuple)) or hasattr(pattern, "tolist"):
        flags = [bool(x) for x in (pattern.tolist() if hasattr(pattern, "tolist") else pattern)]
        if len(flags) != num_layers:
            raise UnsupportedModelError(f"{arch}.attention.sliding_window_pattern has {len(flags)} entries "
                                        f"for {num_layers} layers")
        return ["sliding_attention" if f else "full_attention" for f in flags]
    n = int(pattern)
    if n <= 0:
        raise UnsupportedModelError(f"{arch} sliding_window_pattern must be > 0, got {n}")
    return ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(num_layers)]


def _gemma_hf_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma's own fields from config.json. Every field the model's math depends on must be
    present (transformers would fill a default, which for a mislabelled checkpoint is silently
    wrong); a missing one is named."""
    needed = ["head_dim", "num_key_value_heads", "rms_norm_eps", "sliding_window", "query_pre_attn_scalar"]
    if arch == "gemma2":
        needed += ["attn_logit_softcapping", "final_logit_softcapping"]
    missing = [k for k in needed if k not in cfg]
    if "layer_types" not in cfg and "sliding_window_pattern" not in cfg and arch == "gemma3":
        missing.append("layer_types")
    if missing:
        raise UnsupportedModelError(f"config.json of this {arch} checkpoint is missing required fields: "
                                    f"{', '.join(missing)}")
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        types = _gemma_layer_types(arch, layers, cfg.get("sliding_window_pattern", GEMMA_PATTERN[arch]))
    if cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh")) not in ("gelu_pytorch_tanh",
                                                                                        "gelu_tanh"):
        raise UnsupportedModelError(f"{arch} hidden_activation {cfg.get('hidden_activation')!r} is not supported; "
                                    "supported: gelu_pytorch_tanh")
    # rope: transformers 5 nests it per layer type for Gemma 3 (full_attention / sliding_attention),
    # once for Gemma 2; older configs keep rope_theta, rope_local_base_freq and rope_scaling flat
    params = cfg.get("rope_parameters") or {}
    if arch == "gemma3" and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        theta = float(full.pop("rope_theta", cfg.get("rope_theta", 1_000_000.0)))
        local_theta = float(local.get("rope_theta", cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)))
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError("gemma3 rope scaling on the sliding_attention layers is not supported")
        rope = full
    else:
        rope = dict(params or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0 if arch == "gemma2" else 1_000_000.0)))
        local_theta = (float(cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)) if arch == "gemma3"
                       else theta)
    kind = rope.get("rope_type", rope.get("type", "default"))
    return dict(rope=(theta, rope, kind), layer_types=list(types), rope_local_theta=local_theta,
                query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]),
                attn_logit_softcap=cfg.get("attn_logit_softcapping"),
                final_logit_softcap=cfg.get("final_logit_softcapping"))


def _gemma_gguf_fields(arch: str, get) -> dict[str, Any]:
    """Gemma's fields from GGUF metadata, following llama.cpp where the file is silent: the layer
    pattern (every 2nd / 6th layer global), Gemma 3's local rope base 10,000, and the attention
    scale 1/sqrt(head_dim), except the 27B models' 1/sqrt(hidden / heads) (llama.cpp picks it
    by the layer count: 46 for Gemma 2 27B, 62 for Gemma 3 27B)."""
    get("attention.sliding_window", required=True)
    head_dim = int(get("attention.key_length", required=True))
    layers = int(get("block_count", required=True))
    hidden, heads = int(get("embedding_length", required=True)), int(get("attention.head_count", required=True))
    big = layers == {"gemma2": 46, "gemma3": 62}[arch]
    pattern = get("attention.sliding_window_pattern", GEMMA_PATTERN[arch])
    return dict(layer_types=_gemma_layer_types(arch, layers, pattern),
                rope_local_theta=GEMMA3_LOCAL_ROPE_THETA if arch == "gemma3" else None,
                query_pre_attn_scalar=float(get("attention.query_pre_attn_scalar", hidden // heads if big else head_dim)),
                attn_logit_softcap=get("attn_logit_softcapping", 50.0 if arch == "gemma2" else None),
                final_logit_softcap=get("final_logit_softcapping", 30.0 if arch == "gemma2" else None))
