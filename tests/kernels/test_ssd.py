"""Mamba-2 kernels. SSD: the Triton decode update and chunked scan equal the PyTorch reference (outputs
and the states they leave) under TRITON_INTERPRET=1 on odd shapes, mixed batches and dt limits; the
reference equals transformers' torch path (granitemoehybrid's `mamba2_chunk_scan` /
`mamba2_selective_state_update`); chunked prefill and decode steps leave what one pass leaves.
Gated RMSNorm: Triton equals the reference (one interpreter run for both), which equals transformers'
GraniteMoeHybridRMSNormGated and FalconH1RMSNormGated."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from test_attention import DTYPES, check_interpreted, interpreter_main, rel_err, run_interpreted

from sloth_kernels.gated_norm import gated_rms_norm, gated_rms_norm_ref
from sloth_kernels.ssd import ssd_chunk_scan, ssd_chunk_scan_ref, ssd_update, ssd_update_ref
from sloth_kernels.ssm_params import SSMParams

BOUND = {"fp32": 2e-5, "fp16": 3e-3, "bf16": 1e-2}
NORM_BOUND = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 5e-3}
EPS = 1e-5


def make_params(heads: int, dt_min: float = 0.0, dt_max: float = math.inf, device: str = "cpu") -> SSMParams:
    return SSMParams(A=-torch.exp(0.5 * torch.randn(heads)).to(device), D=torch.randn(heads).to(device),
                     dt_bias=(0.5 * torch.randn(heads)).to(device), dt_min=dt_min, dt_max=dt_max)


def make_inputs(tokens: int, heads: int, groups: int, head_dim: int, state: int, dtype: torch.dtype,
                device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """x, dt, B, C as strided views of one projection row, the way the model slices in_proj's output."""
    widths = [heads * head_dim, heads, groups * state, groups * state]
    flat = torch.randn(tokens, sum(widths) + 3, device=device)
    x, dt, b, c = flat[:, 3:].split(widths, dim=1)
    return (x.to(dtype).view(tokens, heads, head_dim), (0.5 * dt - 1).to(dtype),
            (0.4 * b).to(dtype).view(tokens, groups, state), (0.4 * c).to(dtype).view(tokens, groups, state))


def update_case(tokens: int, heads: int, groups: int, head_dim: int, state: int, dtype: str,
                state_dtype: torch.dtype = torch.float32, **limits: float) -> Callable:
    def run() -> tuple[float, float]:
        from sloth_kernels.triton_ssd import ssd_update_triton

        x, dt, b, c = make_inputs(tokens, heads, groups, head_dim, state, DTYPES[dtype])
        params = make_params(heads, **limits)
        ssm = torch.randn(tokens + 3, heads, head_dim, state).to(state_dtype)
        slots = torch.randperm(tokens + 3)[:tokens]
        slots[tokens // 2] = -1  # a padding row
        ref_ssm = ssm.clone()
        out = ssd_update_triton(x, dt, b, c, params, ssm, slots)
        ref = ssd_update_ref(x, dt, b, c, params, ref_ssm, slots)
        return max(rel_err(out, ref), rel_err(ssm, ref_ssm)), BOUND[dtype]

    return run


def scan_case(lens: list[int], initial: list[bool], heads: int, groups: int, head_dim: int, state: int,
              dtype: str, block_l: int = 16, **limits: float) -> Callable:
    def run() -> tuple[float, float]:
        from sloth_kernels.triton_ssd import ssd_chunk_scan_triton

        x, dt, b, c = make_inputs(sum(lens), heads, groups, head_dim, state, DTYPES[dtype])
        params = make_params(heads, **limits)
        qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        slots = torch.randperm(len(lens) + 2)[: len(lens)]
        ssm = torch.randn(len(lens) + 2, heads, head_dim, state)
        ref_ssm = ssm.clone()
        init = torch.tensor(initial)
        out = ssd_chunk_scan_triton(x, dt, b, c, params, ssm, qsl, slots, init, block_l=block_l)
        ref = ssd_chunk_scan_ref(x, dt, b, c, params, ref_ssm, qsl, slots, init)
        return max(rel_err(out, ref), rel_err(ssm, ref_ssm)), BOUND[dtype]

    return run


def norm_case(rows: int, dim: int, group_size: int, before: bool, dtype: str) -> Callable:
    def run() -> tuple[float, float]:
        from sloth_kernels.triton_gated_norm import gated_rms_norm_triton

        dt = DTYPES[dtype]
        flat = torch.randn(rows, 2 * dim + 5).to(dt)  # gate and x as slices of one projection
        gate, x = flat[:, :dim], flat[:, dim + 5 :]
        weight = (1 + 0.3 * torch.randn(dim)).to(dt)
        out = gated_rms_norm_triton(x, gate, weight, EPS, group_size, before)
        return rel_err(out, gated_rms_norm_ref(x, gate, weight, EPS, group_size, before)), NORM_BOUND[dtype]

    return run


CASES: dict[str, Callable] = {
    "update_fp32": update_case(5, 6, 2, 12, 20, "fp32"),
    "update_bf16_limits": update_case(4, 4, 1, 24, 16, "bf16", dt_min=0.05, dt_max=0.4),
    "update_fp16_state_fp16": update_case(3, 8, 4, 16, 32, "fp16", state_dtype=torch.float16),
    "scan_mixed_fp32": scan_case([1, 7, 40, 3], [True, False, True, False], 4, 2, 10, 18, "fp32"),
    "scan_one_prompt_bf16": scan_case([37], [False], 6, 3, 16, 16, "bf16", block_l=32),
    "scan_limits_fp16": scan_case([19, 2], [True, True], 2, 1, 40, 24, "fp16", dt_min=0.1, dt_max=0.3),
    "norm_gate_first_one_group_fp32": norm_case(3, 96, 96, False, "fp32"),
    "norm_first_three_groups_bf16": norm_case(5, 72, 24, True, "bf16"),
    "norm_gate_first_two_groups_fp16": norm_case(2, 40, 20, False, "fp16"),
}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    check_interpreted(interpreted, name)


def one_pass_and_pieces(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 23-token prompt in one scan, then again as chunks of `sizes` (size 1 = a decode update)."""
    torch.manual_seed(0)
    heads, groups, head_dim, state, n = 4, 2, 8, 12, 23
    x, dt, b, c = make_inputs(n, heads, groups, head_dim, state, torch.float32)
    params = make_params(heads)
    one = torch.zeros(2, heads, head_dim, state)
    whole = ssd_chunk_scan_ref(x, dt, b, c, params, one, torch.tensor([0, n]), torch.tensor([1]),
                               torch.tensor([False]), chunk_size=8)
    pieces, start, ssm = [], 0, torch.zeros(2, heads, head_dim, state)
    for size in sizes:
        sl = slice(start, start + size)
        if size == 1 and start > 0:
            pieces.append(ssd_update_ref(x[sl], dt[sl], b[sl], c[sl], params, ssm, torch.tensor([1])))
        else:
            pieces.append(ssd_chunk_scan_ref(x[sl], dt[sl], b[sl], c[sl], params, ssm, torch.tensor([0, size]),
                                             torch.tensor([1]), torch.tensor([start > 0]), chunk_size=5))
        start += size
    return torch.cat(pieces), whole, ssm, one


def test_chunked_prefill_and_decode_steps_equal_one_pass() -> None:
    got, whole, ssm, one = one_pass_and_pieces([1, 6, 9, 1, 1, 5])
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ssm, one, rtol=1e-5, atol=1e-5)
    assert ssm[0].abs().sum() == 0  # the other slot is untouched


def hf_inputs(batch: int, seq: int, heads: int, groups: int, head_dim: int, state: int) -> tuple[torch.Tensor, ...]:
    x = torch.randn(batch, seq, heads, head_dim)
    return x, 0.5 * torch.randn(batch, seq, heads) - 1, 0.4 * torch.randn(batch, seq, groups, state), \
        0.4 * torch.randn(batch, seq, groups, state)


def test_chunk_scan_reference_equals_transformers() -> None:
    """Two sequences from initial states, scanned by transformers with its chunk size 8, by ours in one
    flat batch: the same outputs and final states."""
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import mamba2_chunk_scan

    torch.manual_seed(1)
    heads, groups, head_dim, state, seq = 6, 3, 8, 10, 19
    x, dt, b, c = hf_inputs(2, seq, heads, groups, head_dim, state)
    params = make_params(heads, dt_min=0.05, dt_max=0.6)
    init = torch.randn(2, heads, head_dim, state)
    ref, ref_final = mamba2_chunk_scan(x, dt, params.A, b, c, chunk_size=8, D=params.D, dt_bias=params.dt_bias,
                                       initial_states=init, dt_softplus=True, dt_limit=(0.05, 0.6),
                                       return_final_states=True)
    ssm = init.clone()
    out = ssd_chunk_scan_ref(x.flatten(0, 1), dt.flatten(0, 1), b.flatten(0, 1), c.flatten(0, 1), params, ssm,
                             torch.tensor([0, seq, 2 * seq]), torch.tensor([0, 1]), torch.tensor([True, True]))
    torch.testing.assert_close(out, ref.flatten(0, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ssm, ref_final, rtol=1e-4, atol=1e-4)


def test_decode_update_reference_equals_transformers() -> None:
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import mamba2_selective_state_update

    torch.manual_seed(2)
    heads, groups, head_dim, state = 6, 2, 8, 10
    x, dt, b, c = (t[:, 0] for t in hf_inputs(3, 1, heads, groups, head_dim, state))
    params = make_params(heads)
    init = torch.randn(3, heads, head_dim, state)
    hf_state = init.clone()
    # transformers' decode call: per-head values expanded over head_dim and state
    ref = mamba2_selective_state_update(
        hf_state, x, dt[..., None].expand(-1, -1, head_dim), params.A[:, None, None].expand(-1, head_dim, state),
        b, c, params.D[:, None].expand(-1, head_dim), dt_bias=params.dt_bias[:, None].expand(-1, head_dim),
        dt_softplus=True)
    ssm = torch.cat([torch.zeros(1, heads, head_dim, state), init])
    out = ssd_update_ref(x, dt, b, c, params, ssm, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ssm[1:], hf_state, rtol=1e-5, atol=1e-5)


def test_reference_equals_granite_gated_norm() -> None:
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridRMSNormGated

    torch.manual_seed(0)
    hf = GraniteMoeHybridRMSNormGated(48, eps=EPS)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.3 * torch.randn(48))
    x, z = torch.randn(7, 48), torch.randn(7, 48)
    torch.testing.assert_close(gated_rms_norm(x, z, hf.weight.data, EPS, 48), hf(x, z).detach())


@pytest.mark.parametrize("before", [True, False])
def test_reference_equals_falcon_h1_grouped_gated_norm(before: bool) -> None:
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated

    torch.manual_seed(1)
    hf = FalconH1RMSNormGated(48, eps=EPS, n_groups=3, norm_before_gate=before)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.3 * torch.randn(48))
    x, z = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    ours = gated_rms_norm(x.flatten(0, 1), z.flatten(0, 1), hf.weight.data, EPS, 16, before)
    torch.testing.assert_close(ours, hf(x, z).detach().flatten(0, 1))
    # the other order differs: the flag is not ignored
    assert not torch.allclose(ours, gated_rms_norm_ref(x.flatten(0, 1), z.flatten(0, 1), hf.weight.data, EPS, 16,
                                                       not before), atol=1e-3)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ssd_gpu_granite4_shapes(dtype: torch.dtype) -> None:
    """Granite-4.0-H shapes (128 heads of 64, one group, state 128): decodes and a 1000-token prompt
    chunk beside short ones, through the dispatch (Triton on CUDA) against the reference."""
    torch.manual_seed(0)
    heads, groups, head_dim, state = 128, 1, 64, 128
    params = make_params(heads, device="cuda")
    ssm = torch.randn(8, heads, head_dim, state, device="cuda")
    ref_ssm = ssm.clone()
    x, dt, b, c = make_inputs(6, heads, groups, head_dim, state, dtype, "cuda")
    slots = torch.tensor([3, 0, 7, -1, 5, 1], device="cuda")
    err = rel_err(ssd_update(x, dt, b, c, params, ssm, slots), ssd_update_ref(x, dt, b, c, params, ref_ssm, slots))
    assert err < BOUND["bf16"] and rel_err(ssm, ref_ssm) < BOUND["fp32"]
    lens = [1000, 3, 1, 77]
    x, dt, b, c = make_inputs(sum(lens), heads, groups, head_dim, state, dtype, "cuda")
    qsl = torch.tensor([0, 1000, 1003, 1004, 1081], dtype=torch.int32, device="cuda")
    slots, init = torch.tensor([2, 4, 6, 0], device="cuda"), torch.tensor([False, True, True, True], device="cuda")
    out = ssd_chunk_scan(x, dt, b, c, params, ssm, qsl, slots, init)
    ref = ssd_chunk_scan_ref(x, dt, b, c, params, ref_ssm, qsl, slots, init)
    assert rel_err(out, ref) < BOUND["bf16"] and rel_err(ssm, ref_ssm) < BOUND["bf16"]


@pytest.mark.gpu
@gpu
def test_gated_norm_gpu_granite4_shapes() -> None:
    torch.manual_seed(0)
    flat = torch.randn(300, 2 * 8192, device="cuda", dtype=torch.bfloat16)
    gate, x = flat[:, :8192], flat[:, 8192:]
    weight = (1 + 0.3 * torch.randn(8192, device="cuda")).bfloat16()
    for group, before in ((8192, False), (1024, True)):
        out = gated_rms_norm(x, gate, weight, EPS, group, before)
        assert rel_err(out, gated_rms_norm_ref(x, gate, weight, EPS, group, before)) < BOUND["bf16"]


if __name__ == "__main__":
    interpreter_main(CASES)
