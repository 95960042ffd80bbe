"""sloth-serve: an OpenAI-compatible inference server for Unsloth fine-tuned models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from .engine.sampling_params import SamplingParams
    from .llm import LLM


def __getattr__(name: str) -> Any:
    # Lazy, so that `import sloth_serve.engine.scheduler` (tested without torch) stays light.
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
