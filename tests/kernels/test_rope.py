"""Triton RoPE (neox halves, in place on strided q/k views; partial rotary leaves the other dims as they
are) equals the PyTorch reference, rounding included: under TRITON_INTERPRET=1 on the CPU (in a subprocess, see test_attention.py's harness) and
on a GPU at Llama-3-8B shapes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_attention import DTYPES, check_interpreted, interpreter_main, rel_err, run_interpreted

from sloth_kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin, rope_inv_freq

BOUND = 5e-4  # the same products and sums rounded in the same dtype: a few one-ulp flips at most
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def qkv_views(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str = "cpu"):
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=device).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return qkv, q, k


def rope_case(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: str, scaled: bool = False,
              rotary_dim: int | None = None, interleaved: bool = False, fp32: bool = False) -> Callable:
    """`rotary_dim` < head_dim: partial rotary (Phi-4-mini), the tables that narrow; `interleaved`:
    GPT-J's pairs (GLM)."""
    rot = rotary_dim or head_dim

    def run() -> tuple[float, float]:
        from sloth_kernels.triton_rope import apply_rope_triton

        dt = DTYPES[dtype]
        cos, sin = rope_cos_sin(rope_inv_freq(rot, 500000.0, LLAMA3 if scaled else None), 300)
        qkv, q, k = qkv_views(tokens, heads, kv_heads, head_dim, dt)
        positions = torch.randint(0, 300, (tokens,), dtype=torch.int64)
        ref_q, ref_k = apply_rope_ref(q, k, positions, cos, sin, interleaved, fp32)
        assert torch.equal(ref_q[..., rot:], q[..., rot:]), "the reference rotated past the rotary dims"
        v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
        q_pass, k_pass = q[..., rot:].clone(), k[..., rot:].clone()
        out_q, out_k = apply_rope_triton(q, k, positions, cos, sin, interleaved, fp32)
        assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr(), "not in place"
        assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before), "wrote outside q and k"
        assert torch.equal(q[..., rot:], q_pass) and torch.equal(k[..., rot:], k_pass), "rotated the pass-through dims"
        return max(rel_err(out_q, ref_q), rel_err(out_k, ref_k)), BOUND

    return run


CASES: dict[str, Callable] = {
    "gqa4_d64_fp32": rope_case(7, 8, 2, 64, "fp32"),
    "gqa1_d24_bf16": rope_case(5, 3, 3, 24, "bf16"),
    "gqa2_d80_fp16_llama3": rope_case(9, 4, 2, 80, "fp16", scaled=True),
    "gqa3_d128_bf16_llama3": rope_case(3, 6, 2, 128, "bf16", scaled=True),
    "one_token_d96_fp32": rope_case(1, 5, 1, 96, "fp32"),
    "partial_d32_r24_bf16": rope_case(6, 4, 2, 32, "bf16", rotary_dim=24),  # Phi-4-mini's 0.75
    "partial_d128_r96_fp32": rope_case(4, 3, 1, 128, "fp32", rotary_dim=96),
    "interleaved_d32_r16_bf16": rope_case(6, 4, 2, 32, "bf16", rotary_dim=16, interleaved=True),  # GLM's half
    "interleaved_d64_fp32": rope_case(5, 2, 2, 64, "fp32", interleaved=True),
    "interleaved_d64_bf16_fp32_math": rope_case(5, 4, 2, 64, "bf16", interleaved=True, fp32=True),  # Cohere
}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_rope_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    check_interpreted(interpreted, name)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_rope_gpu_llama3_shapes(tokens: int) -> None:
    torch.manual_seed(tokens)
    cos, sin = (t.cuda() for t in rope_cos_sin(rope_inv_freq(128, 500000.0, LLAMA3), 8192))
    _, q, k = qkv_views(tokens, 32, 8, 128, torch.bfloat16, device="cuda")
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    ref_q, ref_k = apply_rope_ref(q, k, positions, cos, sin)
    out_q, out_k = apply_rope(q, k, positions, cos, sin)
    assert rel_err(out_q, ref_q) < BOUND and rel_err(out_k, ref_k) < BOUND


@pytest.mark.gpu
@gpu
def test_rope_gpu_partial_rotary_phi4_mini_shapes() -> None:
    """Phi-4-mini: 24 query / 8 key heads of 128 dims, the first 96 rotated (longrope tables)."""
    torch.manual_seed(0)
    cos, sin = (t.cuda() for t in rope_cos_sin(rope_inv_freq(96, 10000.0), 8192))
    _, q, k = qkv_views(512, 24, 8, 128, torch.bfloat16, device="cuda")
    positions = torch.randint(0, 8192, (512,), device="cuda")
    ref_q, ref_k = apply_rope_ref(q, k, positions, cos, sin)
    out_q, out_k = apply_rope(q, k, positions, cos, sin)
    assert rel_err(out_q, ref_q) < BOUND and rel_err(out_k, ref_k) < BOUND
    assert torch.equal(out_q[..., 96:], ref_q[..., 96:]) and torch.equal(out_k[..., 96:], ref_k[..., 96:])


def test_interleaved_rope_is_glms() -> None:
    """The interleaved reference equals transformers' GLM apply_rotary_pos_emb (half the head rotated)."""
    from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

    torch.manual_seed(0)
    cos, sin = rope_cos_sin(rope_inv_freq(16, 10000.0), 50)
    _, q, k = qkv_views(7, 4, 2, 32, torch.float32)
    positions = torch.randint(0, 50, (7,))
    got_q, got_k = apply_rope_ref(q, k, positions, cos, sin, interleaved=True)
    full_cos, full_sin = torch.cat((cos, cos), -1)[positions], torch.cat((sin, sin), -1)[positions]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], full_cos[None],
                                          full_sin[None])
    assert torch.equal(got_q, want_q[0].transpose(0, 1)) and torch.equal(got_k, want_k[0].transpose(0, 1))
    neox_q, _ = apply_rope_ref(q, k, positions, cos, sin)
    assert not torch.allclose(neox_q, got_q)


def test_fp32_interleaved_rope_is_coheres() -> None:
    """In bf16 with fp32 math the reference equals transformers' Cohere rotation bit for bit (and
    differs from rounding each product)."""
    from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb

    torch.manual_seed(0)
    cos, sin = rope_cos_sin(rope_inv_freq(32, 10000.0), 50)
    _, q, k = qkv_views(9, 4, 2, 32, torch.bfloat16)
    positions = torch.randint(0, 50, (9,))
    got_q, got_k = apply_rope_ref(q, k, positions, cos, sin, interleaved=True, fp32=True)
    full_cos = cos[positions].repeat_interleave(2, -1).to(torch.bfloat16)[None]
    full_sin = sin[positions].repeat_interleave(2, -1).to(torch.bfloat16)[None]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], full_cos, full_sin)
    assert torch.equal(got_q, want_q[0].transpose(0, 1)) and torch.equal(got_k, want_k[0].transpose(0, 1))
    rounded_q, _ = apply_rope_ref(q, k, positions, cos, sin, interleaved=True)
    assert not torch.equal(rounded_q, got_q)


if __name__ == "__main__":
    interpreter_main(CASES)
