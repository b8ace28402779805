"""SimConfig: the engine's own SchedulerConfig, CacheConfig and HydragenConfig (each validating its
fields) plus the fleet around the replicas: how many, their roles, routing, links, the client."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from ..core.config import CacheConfig, EngineConfig, HydragenConfig, SchedulerConfig, flat_options
from .router import ROUTERS

POLICIES = ("colocated", "disaggregated")
_PARTS = ("scheduler", "cache", "hydragen")
# the engine's flat names for the nested configs' fields (max_num_seqs, block_size, enable_hydragen, ...)
_NESTED_OPTIONS = frozenset(EngineConfig.flat_names()) - {f.name for f in fields(EngineConfig)}
# those that are `ridgeline simulate` flags: errors name the flag
_FLAG_RE = re.compile(r"\b(max_num_seqs|max_num_batched_tokens|block_size|kv_cache_memory|"
                      r"hydragen_min_saved_tokens|hydragen_min_saved_fraction)\b")


def _finite(value: Any, low: float, strict: bool) -> bool:
    """A finite number above low (strict) or at least low."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > low if strict else value >= low))


@dataclass
class SimConfig:
    model: str | None = None  # checkpoint, GGUF or bare config.json; None: the default model
    hardware: str = "local"  # registry name, saved spec ('local') or spec JSON path
    dtype: str = "bfloat16"
    kv_dtype: str | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # per replica; kv_cache_memory None: what the device leaves after the weights
    cache: CacheConfig = field(default_factory=lambda: CacheConfig(kv_cache_memory=None))
    # min_saved_tokens None: the engine's break-even with PyTorch attention, as on GPUs
    hydragen: HydragenConfig = field(default_factory=HydragenConfig)
    max_model_len: int | None = None  # None: the model's context length
    replicas: int = 1
    policy: str = "colocated"
    prefill_replicas: int | None = None  # disaggregated; None: half the replicas
    link_bandwidth: float = 25.0  # GB/s per prefill replica's outgoing link
    link_latency: float = 0.0  # ms per transfer
    router: str = "least-loaded"
    # ms one way between the clients and the servers (HTTP, tokenization, output delivery): a
    # request reaches its replica this long after it is sent, and its tokens reach the client
    # this long after they are sampled; latencies are measured at the client
    client_latency: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SimConfig:
        """Build from flat names, the engine's for the nested configs (max_num_seqs, block_size,
        kv_cache_memory, enable_hydragen, ...); errors name the `ridgeline simulate` flag."""
        nested = {k: kwargs.pop(k) for k in list(kwargs) if k in _NESTED_OPTIONS}
        nested.setdefault("kv_cache_memory", None)
        try:
            engine = EngineConfig.from_kwargs(**nested)
        except ValueError as exc:
            raise ValueError(_FLAG_RE.sub(lambda m: "--" + m.group(1).replace("_", "-"), str(exc))) from None
        return cls(scheduler=engine.scheduler, cache=engine.cache, hydragen=engine.hydragen, **kwargs)

    def settings(self) -> dict[str, Any]:
        """Every option under its flat name (the JSON report's settings)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _PARTS}
        return {**own, **flat_options(self.scheduler, self.cache, self.hydragen)}

    def validate(self) -> None:
        """The fleet's options (the nested configs check theirs when built)."""
        def integer(name: str, value, low: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")

        integer("replicas", self.replicas, 1)
        if self.max_model_len is not None:
            integer("max-model-len", self.max_model_len, 2)
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"--router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.policy == "disaggregated":
            if self.replicas < 2:
                raise ValueError(f"--policy disaggregated needs --replicas >= 2 (a prefill and a decode pool), "
                                 f"got {self.replicas}")
            p = self.num_prefill
            if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= self.replicas - 1:
                raise ValueError(f"--prefill-replicas must be an integer in [1, {self.replicas - 1}] "
                                 f"(--replicas minus one), got {p!r}")
        elif self.prefill_replicas is not None:
            raise ValueError("--prefill-replicas applies to --policy disaggregated only")
        if not _finite(self.link_bandwidth, 0, strict=True):
            raise ValueError(f"--link-bandwidth must be a finite number of GB/s > 0, got {self.link_bandwidth!r}")
        if not _finite(self.link_latency, 0, strict=False):
            raise ValueError(f"--link-latency must be a finite number of ms >= 0, got {self.link_latency!r}")
        if not _finite(self.client_latency, 0, strict=False):
            raise ValueError(f"--client-latency must be a finite number of ms >= 0, got {self.client_latency!r}")

    @property
    def num_prefill(self) -> int:
        if self.policy != "disaggregated":
            return 0
        return self.prefill_replicas if self.prefill_replicas is not None else max(1, self.replicas // 2)
