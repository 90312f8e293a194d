"""Model backends: one small interface (``Backend``) and its implementations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from safetygame.backends.base import (
    Backend,
    BackendStats,
    Completion,
    LogLik,
    Message,
    SamplingConfig,
    YesNo,
    as_messages,
)
from safetygame.backends.openai_compat import OpenAICompatBackend, RetryPolicy

if TYPE_CHECKING:
    from safetygame.backends.llamacpp import EmbeddedLlamaBackend, LlamaServer

__all__ = [
    "Backend",
    "BackendStats",
    "Completion",
    "EmbeddedLlamaBackend",
    "LlamaServer",
    "LogLik",
    "Message",
    "OpenAICompatBackend",
    "RetryPolicy",
    "SamplingConfig",
    "YesNo",
    "as_messages",
]


def __getattr__(name: str) -> Any:
    # Imported on first use so `python -m safetygame.backends.llamacpp` runs the module once.
    if name in ("EmbeddedLlamaBackend", "LlamaServer"):
        from safetygame.backends import llamacpp

        return getattr(llamacpp, name)
    raise AttributeError(f"module 'safetygame.backends' has no attribute {name!r}")
