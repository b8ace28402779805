"""Engine configuration, nested as in vLLM: an EngineConfig holds a SchedulerConfig, a CacheConfig
and a HydragenConfig. Each class validates its own fields once, where they are declared; the
simulator's SimConfig composes the same classes. Torch-free (dtypes are names here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

# EngineConfig.quantization / --quantization values (see loader.load_checkpoint)
QUANTIZATION_MODES = ("auto", "none", "q8_0", "q4_0", "q4_k")
DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
DEFAULT_KV_CACHE_MEMORY = "2GiB"


def parse_memory_size(value: int | float | str) -> int:
    """'2GiB', '512MiB', '1.5GB', or a plain number of bytes -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*", str(value), re.IGNORECASE)
        if not m:
            raise ValueError(f"kv_cache_memory: cannot parse {value!r}; use bytes or e.g. '2GiB', '512MiB'")
        unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
        size = int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])
    if size <= 0:
        raise ValueError(f"kv_cache_memory must be > 0 bytes, got {value!r}")
    return size


def _integer(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass
class SchedulerConfig:
    """The per-step limits: sequences in the running set and tokens in one step."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        _integer("max_num_seqs", self.max_num_seqs, 1)
        _integer("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can advance each step")


@dataclass
class CacheConfig:
    """The paged KV pool: block size, its size (a memory budget, or a block count that overrides
    it), and whether full blocks are shared through the prefix cache. kv_cache_memory None: the
    engine's default (2 GiB); the simulator's: what the device leaves after the weights."""
    block_size: int = 16
    kv_cache_memory: int | str | None = DEFAULT_KV_CACHE_MEMORY
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests use tiny pools)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _integer("block_size", self.block_size, 1)
        if self.num_kv_blocks is not None:
            _integer("num_kv_blocks", self.num_kv_blocks, 1)
        if self.kv_cache_memory is not None:
            parse_memory_size(self.kv_cache_memory)
        _flag("enable_prefix_caching", self.enable_prefix_caching)

    @staticmethod
    def bytes_per_block(num_layers: int, kv_size: int, block_size: int, elem_bytes: int) -> int:
        """K and V of block_size tokens in every layer."""
        return 2 * num_layers * block_size * kv_size * elem_bytes

    def num_blocks(self, block_bytes: int) -> int:
        """Blocks in the pool: num_kv_blocks, else the memory budget over the block's bytes."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        return parse_memory_size(self.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY) // block_bytes


# break-even of a shared-prefix part against PyTorch's decode attention (and the simulator's
# default), and against the fused C decode attention (ridgeline/kernels); docs/benchmarks.md
MIN_SAVED_TOKENS_TORCH = 512
MIN_SAVED_TOKENS_CPU_KERNELS = 3072


@dataclass
class HydragenConfig:
    """When a shared prefix is worth its own attention part: g >= 2 sequences sharing P tokens,
    with (g - 1) * P >= min_saved_tokens, the prefix tokens whose K/V the grouped product saves
    re-reading. Each part costs a dozen extra small ops per layer, so the break-even depends on
    how cheap plain decode attention is: on the 2-core CPU ~512 tokens with PyTorch's attention
    and ~3,000 with the fused C kernel (None picks the one in use, MIN_SAVED_TOKENS_*). And the
    parts together must save at least min_saved_fraction of the step's decode K/V reads: every
    row's own part is padded to the longest, so a few small groups in a batch of mostly unshared
    rows cost more than they save (8 rows, 2-3 sharing 256 tokens: 43 instead of 24 ms per step)."""
    min_saved_tokens: int | None = None  # None: MIN_SAVED_TOKENS_TORCH unless resolve() picks
    min_saved_fraction: float = 0.5
    enabled: bool = True

    def __post_init__(self) -> None:
        _flag("enable_hydragen", self.enabled)
        if self.min_saved_tokens is not None:
            _integer("hydragen_min_saved_tokens", self.min_saved_tokens, 1)
        f = self.min_saved_fraction
        if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1):
            raise ValueError(f"hydragen_min_saved_fraction must be a number in [0, 1], got {f!r}")

    def resolve(self, fused_kernels: bool) -> HydragenConfig | None:
        """The policy in force: None when off, else with min_saved_tokens filled in."""
        if not self.enabled:
            return None
        default = MIN_SAVED_TOKENS_CPU_KERNELS if fused_kernels else MIN_SAVED_TOKENS_TORCH
        return HydragenConfig(self.min_saved_tokens or default, self.min_saved_fraction)


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    """Speculative decoding (off when method is None): 'ngram' proposes by prompt lookup, 'draft'
    runs the `model` checkpoint (same vocabulary as the target) as a draft. Up to
    num_speculative_tokens are proposed per sequence and step; with `adaptive` the number is
    chosen each step from the performance model and the measured acceptance rate (0 where
    speculation would not pay), else it is always the maximum."""
    method: str | None = None
    model: str | None = None
    num_speculative_tokens: int = 4
    # n-gram sizes tried, longest first (3-4: fewer, better proposals than from 1- and 2-grams;
    # docs/benchmarks.md)
    prompt_lookup_min: int = 3
    prompt_lookup_max: int = 4
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)} "
                             f"(or a draft model's path), got {self.method!r}")
        if self.method == "draft" and not self.model:
            raise ValueError("speculative method 'draft' needs the draft model's path (speculative=PATH)")
        _integer("num_speculative_tokens", self.num_speculative_tokens, 1)
        _integer("prompt_lookup_min", self.prompt_lookup_min, 1)
        _integer("prompt_lookup_max", self.prompt_lookup_max, self.prompt_lookup_min)
        _flag("speculative_adaptive", self.adaptive)

    @property
    def enabled(self) -> bool:
        return self.method is not None

    @staticmethod
    def method_of(value: str | None) -> dict[str, Any]:
        """`speculative=` as LLM(...) and --speculative take it: 'ngram', a draft model's path, or None."""
        if value is None or value == "ngram":
            return {"method": value}
        if not isinstance(value, str) or not value:
            raise ValueError(f"speculative must be 'ngram' or a draft model's path, got {value!r}")
        return {"method": "draft", "model": value}


@dataclass
class EngineConfig:
    """Everything LLMEngine is built from. `EngineConfig.from_kwargs` takes the flat names the
    CLI and LLM(...) use (max_num_seqs, block_size, enable_hydragen, ...) and nests them."""
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    num_threads: int | None = None
    # "auto": a GGUF's block-quantized matrices stay in their formats (CPU; dequantized on GPU);
    # "none": dequantize them to `dtype` (the reference path); "q8_0" / "q4_0" / "q4_k": also
    # quantize dense matrices (Hugging Face checkpoints) to that format at load.
    quantization: str = "auto"
    # bytes per activation value in the block-quantized matmuls (kernels/quant_kernels.c): 1 = 8
    # bits, llama.cpp's numerics; 2 = about 15 bits (greedy outputs follow the float32 reference)
    # at twice the integer work per weight (decode and prefill ~1.7-2x slower on a 1B Q4_K_M)
    quant_activation_bytes: int = 1
    # fused C kernels for the per-layer elementwise work on CPU (ridgeline/kernels; compiled at
    # first use, skipped without a C compiler). False: PyTorch ops only.
    cpu_kernels: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    hydragen: HydragenConfig = field(default_factory=HydragenConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in DTYPE_NAMES:
            if not hasattr(self.dtype, "is_floating_point"):  # a torch.dtype passes through
                raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {self.dtype!r}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, "
                             f"got {self.quantization!r}")
        if self.quant_activation_bytes not in (1, 2):
            raise ValueError(f"quant_activation_bytes must be 1 or 2, got {self.quant_activation_bytes!r}")
        if self.max_model_len is not None:
            _integer("max_model_len", self.max_model_len, 2)
        if self.num_threads is not None:
            _integer("num_threads", self.num_threads, 1)

    @classmethod
    def flat_names(cls) -> list[str]:
        """Every name from_kwargs accepts."""
        top = [f.name for f in fields(cls) if f.name not in _NESTED]
        return top + ["speculative"] + list(_FLAT)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword names; unknown names raise TypeError listing the allowed ones."""
        unknown = set(kwargs) - set(cls.flat_names())
        if unknown:
            raise TypeError(f"unknown options: {', '.join(sorted(unknown))}; "
                            f"allowed: {', '.join(cls.flat_names())}")
        nested: dict[str, dict[str, Any]] = {name: {} for name in _NESTED}
        top = {}
        for key, value in kwargs.items():
            if key == "speculative":
                if isinstance(value, SpeculativeConfig):
                    top[key] = value
                else:
                    nested["speculative"].update(SpeculativeConfig.method_of(value))
            elif key in _FLAT:
                part, name = _FLAT[key]
                nested[part][name] = value
            else:
                top[key] = value
        for part, values in nested.items():
            if part in top:  # a whole SpeculativeConfig given
                if values:
                    raise TypeError(f"give {', '.join(values)} inside the {part} config, not beside it")
                continue
            top[part] = _NESTED[part](**values)
        return cls(**top)


_NESTED = {"scheduler": SchedulerConfig, "cache": CacheConfig, "hydragen": HydragenConfig,
           "speculative": SpeculativeConfig}
# flat option name -> (nested config, field)
_FLAT = {
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "block_size": ("cache", "block_size"),
    "kv_cache_memory": ("cache", "kv_cache_memory"),
    "num_kv_blocks": ("cache", "num_kv_blocks"),
    "enable_prefix_caching": ("cache", "enable_prefix_caching"),
    "enable_hydragen": ("hydragen", "enabled"),
    "hydragen_min_saved_tokens": ("hydragen", "min_saved_tokens"),
    "hydragen_min_saved_fraction": ("hydragen", "min_saved_fraction"),
    "num_speculative_tokens": ("speculative", "num_speculative_tokens"),
    "prompt_lookup_min": ("speculative", "prompt_lookup_min"),
    "prompt_lookup_max": ("speculative", "prompt_lookup_max"),
    "speculative_adaptive": ("speculative", "adaptive"),
}


def flat_options(scheduler: SchedulerConfig, cache: CacheConfig, hydragen: HydragenConfig) -> dict[str, Any]:
    """The nested configs' fields under the flat names from_kwargs takes (for records and reports)."""
    parts = {"scheduler": scheduler, "cache": cache, "hydragen": hydragen}
    return {flat: getattr(parts[part], name) for flat, (part, name) in _FLAT.items() if part in parts}
