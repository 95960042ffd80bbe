"""Attention over the paged KV cache, for any mix of prefill chunks and decode tokens in one batch.

Layout: k_cache / v_cache are [num_blocks, block_size, num_kv_heads, head_dim]. Token t of the
step writes its K/V at flat slot `slot_mapping[t]` (block * block_size + offset). Sequence b owns
queries `query_start_loc[b]:query_start_loc[b+1]`, which are its last positions out of
`seq_lens[b]`; its keys are read through `block_tables[b]`. A negative slot writes nothing.
Options per layer: a sliding window (keys less than `sliding_window` positions back) and Gemma 2's
score soft-capping (`softcap`: scores become softcap * tanh(scores / softcap) before the mask), and
gpt-oss's attention sinks (`sinks` [Hq]: a learned logit per head that joins the softmax's
denominator and attends to nothing, so a head may put less than all its weight on the keys).
Per token, `meta.key_ends` [T] (optional) lets a query see keys past itself: query t sees every key
before max(its position + 1, key_ends[t]) (Gemma 3's image tokens see their whole image; the
sliding window still counts back from the query's own position, as transformers masks it).
Dispatch: Triton (`triton_attention`) on CUDA tensors, the PyTorch references elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttnMetadata:
    """Where each sequence's queries and keys are, on the device and (for the reference) the host."""

    slot_mapping: torch.Tensor  # [T] int64: flat KV slot each token writes
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step
    query_start_loc: torch.Tensor  # [B + 1] int32: offsets of each sequence's tokens in the step
    seq_lens_host: list[int]
    query_start_loc_host: list[int]
    max_query_len: int
    max_seq_len: int
    # Sequences at the front of the batch that have exactly one query token (decodes). With
    # 0 < num_decodes < batch, CUDA runs them through the decode kernel and the rest through the
    # prefill kernel; 0 (unknown) sends a mixed batch through the prefill kernel alone; -1 (known on
    # the device only: a CUDA graph's step) runs both kernels, each over the sequences that are its own.
    num_decodes: int = 0
    # [T] int32, or None (causal everywhere): each query sees keys up to (excluding) max(its
    # position + 1, key_ends[t]). Prefill tokens only: the decode kernel does not read it.
    key_ends: torch.Tensor | None = None


def write_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_blocks, block_size = k_cache.shape[:2]
    if (slot_mapping < 0).any():
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's queries over its cached keys; q [T, Hq, D] -> [T, Hq, D]."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    query_start_loc = meta.query_start_loc_host
    for b, seq_len in enumerate(meta.seq_lens_host):
        start, end = query_start_loc[b], query_start_loc[b + 1]
        q_len = end - start
        blocks = meta.block_tables[b, : -(-seq_len // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len]
        v = v_cache[blocks].flatten(0, 1)[:seq_len]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1).float()  # [H, L, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1).float()
        qb = q[start:end].transpose(0, 1).float()  # [H, q_len, D]
        scores = torch.matmul(qb, k.transpose(1, 2)) * scale  # [H, q_len, L]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        masked = k_pos > q_pos
        if meta.key_ends is not None:  # bidirectional spans (Gemma 3's images)
            masked &= k_pos >= meta.key_ends[start:end].to(q.device).long().unsqueeze(1)
        if sliding_window is not None:
            masked |= k_pos <= q_pos - sliding_window
        scores.masked_fill_(masked, float("-inf"))
        if sinks is not None:  # one more column per head, dropped after the softmax (transformers' order)
            sink = sinks.float().view(-1, 1, 1).expand(-1, q_len, 1)
            scores = torch.cat([scores, sink], dim=-1)
            scores = scores - scores.amax(dim=-1, keepdim=True)
            probs = torch.softmax(scores, dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, v).transpose(0, 1).to(q.dtype)
    return out


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    if k.is_cuda:
        from .triton_attention import write_kv_triton

        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
        return
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]. On CUDA no host sync: the kernels read the device tensors and
    use only meta's host ints (max_query_len) and tensor shapes for their grids."""
    if q.is_cuda:
        from .triton_attention import paged_attention_triton

        return paged_attention_triton(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, scale, sliding_window, meta.num_decodes, softcap=softcap, sinks=sinks,
            key_ends=meta.key_ends,
        )
    return paged_attention_ref(q, k_cache, v_cache, meta, scale, sliding_window, softcap, sinks)
