"""SmolLM3 is Llama with NoPE layers: `no_rope_layers[i]` 0 leaves layer i's queries and keys
unrotated (by default every 4th layer), and with `use_sliding_window` those layers may attend
through a sliding window (`layer_types`). These are the fields it adds to a Llama config."""

from __future__ import annotations

from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"config.json {field}: {problem}")


def smollm3_fields(cfg: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """ModelConfig overrides of a SmolLM3 config.json, with transformers' SmolLM3Config defaults."""
    if cfg.get("mlp_bias"):
        raise _fail("mlp_bias", "true (MLP biases) is not supported for smollm3")
    interval = int(cfg.get("no_rope_layer_interval") or 4)
    rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(rope) != num_layers or any(v not in (0, 1) for v in rope):
        raise _fail("no_rope_layers", f"expected {num_layers} entries of 0 / 1, got {rope!r:.120}")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    layer_types = cfg.get("layer_types") or [SLIDING if window and not rope[i] else FULL for i in range(num_layers)]
    if len(layer_types) != num_layers or set(layer_types) - {SLIDING, FULL}:
        raise _fail("layer_types", f"expected {num_layers} entries of {SLIDING!r} / {FULL!r}, got {layer_types!r:.120}")
    return dict(
        family="smollm3", sliding_window=None, rope_layers=tuple(bool(v) for v in rope),
        layer_windows=tuple(int(window) if window and kind == SLIDING else None for kind in layer_types),
        o_bias=bool(cfg.get("attention_bias", False)),
    )
