"""ridgeline: an LLM inference engine in plain PyTorch.

The public names load on first use, so that torch-free parts (ridgeline.core, ridgeline.sim,
ridgeline.perf's model) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LLM": ".llm", "LLMEngine": ".engine", "EngineConfig": ".core.config", "EngineStats": ".core.stats",
    "SamplingParams": ".sampling_params", "RequestOutput": ".outputs", "CompletionOutput": ".outputs",
    "Logprob": ".outputs",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .core.config import EngineConfig
    from .core.stats import EngineStats
    from .engine import LLMEngine
    from .llm import LLM
    from .outputs import CompletionOutput, Logprob, RequestOutput
    from .sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ridgeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
