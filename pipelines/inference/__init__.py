"""Chat backends: one protocol (`ChatBackend.stream`) and one class per `backend:` value."""

from pipelines.inference.base import BackendError, ChatBackend, Delta, GenerationOptions

__all__ = ["BackendError", "ChatBackend", "Delta", "GenerationOptions"]
