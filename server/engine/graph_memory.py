"""The memory the CUDA graphs' shared pool will hold, estimated before the KV cache is sized.

The KV cache takes what the memory budget leaves after the weights, but the graphs are captured
after it (they read the cache's addresses), into one pool that stays allocated: the activations of
the largest step captured (the graphs are captured largest first and reuse that memory) and every
graph's logits (kept for its replays). Unreserved, that pool would come out of the headroom left
for the eager steps' activations, or fail the capture on a GPU the cache filled."""

from __future__ import annotations

from collections.abc import Sequence

from ..models.config import ModelConfig

# The allocator rounds a large block up to 2 MiB and pools its segments per size; the kernels'
# small workspaces (attention key splits, LoRA shrink partials) come on top.
POOL_MARGIN = 1.25


def mlp_width(cfg: ModelConfig) -> int:
    """Intermediate features per token of the widest MLP: a dense one, or the routed experts'
    (each token's top-k) beside a shared expert."""
    routed = cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.shared_expert_intermediate_size
    return max(cfg.intermediate_size, routed)


def activation_bytes_per_token(cfg: ModelConfig, itemsize: int, lora_reference: bool = False,
                               expert_lora: bool = False) -> int:
    """A token's activations at the peak of a decoder layer: the hidden state and the residual, plus
    the larger of the MLP (gate|up, the activated gate, their product) and attention (q|k|v, the
    rotated q and k, the attention output and o_proj's). With `lora_reference` (slots wider than
    the Triton kernels take: the reference runs in the graph, every slot's delta over the whole
    batch), a projection's delta and its masked copy too. With `expert_lora` (a MoE model's LoRA
    graphs: sloth_kernels.triton_moe_lora), the experts' gate|up and down deltas of its top-k pairs."""
    width = mlp_width(cfg)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attention = (q + 2 * kv) + (q + kv) + q + cfg.hidden_size
    per_token = 2 * cfg.hidden_size + max(4 * width, attention)
    if lora_reference:
        per_token += 2 * 2 * width  # the gate|up delta and its masked copy
    if expert_lora and cfg.num_experts:
        per_token += cfg.num_experts_per_tok * (2 * cfg.moe_intermediate_size + cfg.hidden_size)
    return per_token * itemsize


def logits_bytes(cfg: ModelConfig, itemsize: int, rows: int) -> tuple[int, int]:
    """(kept, transient) bytes of `rows` rows of logits: the float32 output a graph keeps, and the
    lm_head's output in the model's dtype (and a soft-capped model's uncapped float32 copy)."""
    kept = rows * cfg.vocab_size * 4
    transient = rows * cfg.vocab_size * (itemsize + (4 if cfg.final_softcap is not None else 0))
    return kept, transient


def graph_pool_bytes(
    cfg: ModelConfig,
    itemsize: int,
    decode_buckets: Sequence[int],
    prefill_buckets: Sequence[int],
    max_num_seqs: int,
    lora: bool = False,
    lora_reference: bool = False,
) -> int:
    """The estimated pool of every graph captured: decode graphs of n sequences (n tokens, n logit
    rows), prompt graphs of t tokens (min(t, max_num_seqs) logit rows), and with `lora` (the model
    may serve adapters) their LoRA variants too, which keep logits of their own
    (`lora_reference`, and a MoE model's expert LoRA: see activation_bytes_per_token)."""
    steps = [(n, n) for n in decode_buckets] + [(t, min(t, max_num_seqs)) for t in prefill_buckets]
    if not steps:
        return 0
    variants = 2 if lora else 1
    kept = variants * sum(logits_bytes(cfg, itemsize, rows)[0] for _, rows in steps)
    per_token = activation_bytes_per_token(cfg, itemsize, lora and lora_reference, expert_lora=lora)
    transient = max(tokens * per_token + logits_bytes(cfg, itemsize, rows)[1] for tokens, rows in steps)
    return int(POOL_MARGIN * (kept + transient))
