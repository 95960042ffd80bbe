"""Per-request sampling and stopping parameters, validated once at construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    """What the output must be: a JSON document valid against `json_schema` (JSON text), or with
    `kind` "regex" / "lark", text matching the regular expression / Lark grammar `json_schema` holds.
    `compiled` is the grammar when it was compiled off the engine thread (the API does that, see
    GrammarCompiler); without it the sampler compiles it at the request's first token."""

    json_schema: str
    compiled: Any = field(default=None, compare=False, repr=False)
    kind: str = "json"

    def __post_init__(self) -> None:
        if not self.json_schema.strip():
            raise ValueError("a structured output spec needs a JSON schema")
        if self.kind not in ("json", "regex", "lark"):
            raise ValueError(f"a structured output spec is json, regex or lark; got {self.kind!r}")

    @property
    def key(self) -> str:
        """What identifies its grammar (compiled grammars are cached by it)."""
        return self.json_schema if self.kind == "json" else f"{self.kind}:{self.json_schema}"

    @classmethod
    def json_object(cls) -> StructuredSpec:
        """OpenAI's JSON mode: any JSON object."""
        return cls('{"type": "object"}')


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What to sample and when to stop. Defaults match OpenAI's API (temperature 1, top_p 1)."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token plus k top tokens
    # None: none; k >= 0: each prompt token's log-probability (after the first) plus its k top
    # alternatives, computed in the prefill. max_tokens 0 then scores the prompt without generating.
    prompt_logprobs: int | None = None
    structured: StructuredSpec | None = None  # constrain the output to a grammar (JSON schema)

    def __post_init__(self) -> None:
        if self.max_tokens < 0 or (self.max_tokens == 0 and self.prompt_logprobs is None):
            raise ValueError(f"max_tokens must be at least 1 (0 only with prompt_logprobs), got {self.max_tokens}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if self.structured is not None and (self.ignore_eos or self.min_tokens):
            # The grammar decides where the output ends: EOS is allowed exactly when it is complete.
            raise ValueError("ignore_eos and min_tokens cannot be combined with structured output "
                             "(response_format or a required or named tool_choice)")

    @property
    def is_greedy(self) -> bool:
        # Below 1e-5, logits / temperature overflows fp32 and sampling is argmax in all but name.
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0
        )
