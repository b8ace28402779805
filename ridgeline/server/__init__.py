"""OpenAI-compatible HTTP server over one LLMEngine (`ridgeline serve`)."""

from .app import ServerConfig, build_app
from .async_engine import AsyncEngine
from .metrics import ServerMetrics

__all__ = ["AsyncEngine", "ServerConfig", "ServerMetrics", "build_app"]
