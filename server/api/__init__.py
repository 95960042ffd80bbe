"""The HTTP layer: an OpenAI-compatible FastAPI app over the async engine (`create_app`)."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
