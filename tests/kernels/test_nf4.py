"""NF4: the PyTorch reference is bit-exact with bitsandbytes (quantize and dequantize, nested or not,
fp32/bf16/fp16); the Triton GEMV and GEMM equal the reference through TRITON_INTERPRET=1 on the CPU
at small odd shapes (one subprocess for the whole file: the variable must be set before triton is
imported), and on a GPU at Llama-3-8B shapes (`-m gpu`)."""

from __future__ import annotations

import json
import os
import random
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from test_attention import run_interpreted  # noqa: E402  (the shared subprocess harness)

from sloth_kernels.nf4 import (  # noqa: E402
    concat_nf4,
    dequantize_nf4_ref,
    nf4_linear,
    nf4_linear_ref,
    quantize_nf4_ref,
    split_nf4,
)
from sloth_kernels.nf4_format import NF4_CODE, NF4Weight  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ‖out − ref‖ / ‖ref‖ against float64 on the exact (fp32) NF4 weight (the device tool's METHOD.md):
# bf16/fp16 round the weight and the output; fp32 on a GPU goes through tf32 dots.
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}
GPU_BOUND = {torch.float32: 3e-3, torch.bfloat16: 1e-2, torch.float16: 3e-3}
SHAPES = [(64, 128), (33, 192), (7, 10), (300, 256), (5, 13), (129, 70)]  # (5, 13): odd last dim


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")  # NaN never passes: unwritten outputs are poisoned with NaN
    return ((out64 - ref64).norm() / ref64.norm()).item()


def exact_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 x @ W.T + bias with W = code * absmax exactly (dequantized in fp32, no rounding)."""
    weight = dequantize_nf4_ref(replace(w, dtype=torch.float32)).double()
    return torch.nn.functional.linear(x.double(), weight, None if bias is None else bias.double())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


# ---- reference vs bitsandbytes (CPU) ------------------------------------------------------------


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_quantize_gives_bitsandbytes_bytes(dtype: torch.dtype, nested: bool) -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    for i, shape in enumerate(SHAPES):
        torch.manual_seed(i)
        w = (torch.randn(shape) * 0.02 * (i + 1)).to(dtype)
        data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        ours = quantize_nf4_ref(w, blocksize=64, compress_statistics=nested)
        assert torch.equal(ours.data, data.view(-1)), shape
        assert torch.equal(ours.absmax, state.absmax), shape
        if nested:
            assert torch.equal(ours.state2_absmax, state.state2.absmax), shape
            assert torch.equal(ours.state2_code, state.state2.code), shape
            assert torch.equal(ours.offset, state.offset), shape


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_dequantize_is_bit_exact_with_bitsandbytes(dtype: torch.dtype, nested: bool) -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    for i, shape in enumerate(SHAPES):
        torch.manual_seed(100 + i)
        w = (torch.randn(shape) * 0.05).to(dtype)
        data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        theirs = bnbf.dequantize_4bit(data, state, quant_type="nf4")
        ours = dequantize_nf4_ref(NF4Weight.from_bnb(data, state))
        assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape == shape
        assert torch.equal(bits(ours), bits(theirs)), shape


def test_to_bnb_round_trips_through_bitsandbytes() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = quantize_nf4_ref(torch.randn(48, 320, dtype=torch.bfloat16), compress_statistics=True)
    data, state = w.to_bnb()
    assert torch.equal(bits(bnbf.dequantize_4bit(data, state, quant_type="nf4")), bits(dequantize_nf4_ref(w)))
    assert torch.equal(NF4Weight.from_bnb(data, state).data, w.data)


def test_code_book_is_bitsandbytes_nf4() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(torch.tensor(NF4_CODE), bnbf.get_4bit_type("nf4", device="cpu"))


# ---- reference on its own -----------------------------------------------------------------------


def test_quantize_then_dequantize_is_close_to_the_weight() -> None:
    torch.manual_seed(1)
    w = torch.randn(96, 256)
    err = rel_err(dequantize_nf4_ref(quantize_nf4_ref(w)), w)
    assert 0.02 < err < 0.15  # 4-bit normal-float: about 10% relative error on Gaussian weights


def test_nf4_linear_on_cpu_is_the_reference_and_fills_out() -> None:
    torch.manual_seed(2)
    w = quantize_nf4_ref(torch.randn(40, 128, dtype=torch.bfloat16))
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    y = nf4_linear(x, w)
    assert y.shape == (2, 3, 40)
    assert torch.equal(y, nf4_linear_ref(x, w))
    wide = torch.full((6, 50), float("nan"), dtype=torch.bfloat16)
    nf4_linear(x.reshape(6, 128), w, out=wide[:, 5:45])
    assert torch.equal(wide[:, 5:45], y.reshape(6, 40))
    assert torch.isnan(wide[:, :5]).all() and torch.isnan(wide[:, 45:]).all()


def test_bad_shapes_are_refused_with_a_reason() -> None:
    w = quantize_nf4_ref(torch.randn(8, 64))
    with pytest.raises(ValueError, match="uint8 bytes"):
        replace(w, shape=(8, 128))
    with pytest.raises(ValueError, match="input features"):
        nf4_linear(torch.randn(2, 32), w)


def test_prmt_lookup_gives_the_code_book_in_16_bits() -> None:
    """The PTX of the GPU decode, executed by a Python model of its instructions: plain, and scaled
    by a block's absmax in 16 bits (one rounding of code * scale, as mul.rn does)."""
    from sloth_kernels.triton_nf4_decode import emulate_prmt_asm, prmt_tables

    rng = random.Random(0)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "f16")):
        code = torch.tensor(NF4_CODE).to(dtype)
        table = [b & 0xFFFF for b in code.view(torch.int16).tolist()]
        for word in [0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF] + [rng.getrandbits(32) for _ in range(300)]:
            idx = [i for byte in word.to_bytes(4, "little") for i in (byte >> 4, byte & 0xF)]
            assert emulate_prmt_asm(word, prmt_tables(dtype)) == [table[i] for i in idx], hex(word)
            scale = torch.tensor([rng.uniform(1e-3, 2.0)]).to(dtype)
            s16 = scale.view(torch.int16).item() & 0xFFFF
            want = [v & 0xFFFF for v in (code[idx].float() * scale.float()).to(dtype).view(torch.int16).tolist()]
            assert emulate_prmt_asm(word, prmt_tables(dtype), s16 | (s16 << 16), name) == want, hex(word)


# ---- projections fused into one weight (concat_nf4) ----------------------------------------------


def _parts(rows: list[int], k: int, dtype: torch.dtype, nested: bool = True, device: str = "cpu") -> list[NF4Weight]:
    """Weights of very different magnitudes, so each part's nested offset differs."""
    return [quantize_nf4_ref(torch.randn(n, k, dtype=dtype, device=device) * (0.01 * 10**i), compress_statistics=nested)
            for i, n in enumerate(rows)]


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_concat_dequantizes_to_the_parts_exactly(nested: bool) -> None:
    parts = _parts([128, 64, 64], 256, torch.bfloat16, nested)
    fused = concat_nf4(parts)
    assert fused is not None and fused.shape == (256, 256) and fused.group_offsets == nested
    want = torch.cat([dequantize_nf4_ref(w) for w in parts])
    assert torch.equal(bits(dequantize_nf4_ref(fused)), bits(want))
    views = split_nf4(fused, [128, 64, 64])
    for view, part in zip(views, parts, strict=True):
        assert view.data.data_ptr() >= fused.data.data_ptr()  # a view, not a copy
        assert torch.equal(bits(dequantize_nf4_ref(view)), bits(dequantize_nf4_ref(part)))
    if nested:
        with pytest.raises(ValueError, match="no bitsandbytes form"):
            fused.to_bnb()


def test_concat_refuses_parts_that_do_not_join_exactly() -> None:
    assert concat_nf4(_parts([64, 32], 256, torch.bfloat16)) is None  # 32 x 256 ends inside a state2 block
    assert concat_nf4(_parts([64], 256, torch.bfloat16) + _parts([64], 128, torch.bfloat16)) is None  # in differs
    assert concat_nf4(_parts([64], 256, torch.bfloat16) + _parts([64], 256, torch.bfloat16, nested=False)) is None
    assert concat_nf4(_parts([64], 256, torch.bfloat16) + _parts([64], 256, torch.float16)) is None
    assert concat_nf4(_parts([64], 256, torch.bfloat16)) is None  # nothing to join


def test_fused_layer_gives_the_slices_output() -> None:
    from sloth_serve.models.layers import LoRALinear

    parts = _parts([128, 64, 64], 256, torch.float32)
    layer = LoRALinear(256, [128, 64, 64])
    for i, w in enumerate(parts):
        layer.set_quantized(i, w)
    x = torch.randn(5, 256)
    before, dense = layer.base_forward(x), layer.dequantized_weight()
    assert layer.fuse_quantized() and layer.fused_quant is not None
    assert torch.equal(layer.dequantized_weight(), dense)
    torch.testing.assert_close(layer.base_forward(x), before, rtol=1e-5, atol=1e-5)
    layer.set_quantized(1, parts[1])  # a new slice undoes the fusion
    assert layer.fused_quant is None


# ---- Triton through the interpreter (CPU) -------------------------------------------------------

# name: (rows M, out N, in K, dtype, nested, kernel, config); odd M and N, K whole 64-blocks.
INTERPRETER_CASES = {
    "gemv_m1_fp32_nested_split3": (1, 37, 192, "fp32", True, "gemv", dict(block_n=16, split_k=3, kb=1)),
    "gemv_m3_bf16_nested_split2_kb2": (3, 70, 256, "bf16", True, "gemv", dict(block_n=16, split_k=2, kb=2)),
    "gemv_m5_fp16_plain": (5, 33, 128, "fp16", False, "gemv", dict(block_n=32, split_k=1, kb=2)),
    "gemv_m16_bf16_even": (16, 64, 512, "bf16", True, "gemv", dict(block_n=32, split_k=2, kb=2)),
    "gemv_m20_fp32_ragged_k": (20, 17, 320, "fp32", True, "gemv", dict(block_n=16, split_k=2, kb=2)),
    "fma_m1_bf16_nested_split3": (1, 37, 192, "bf16", True, "gemv", dict(block_n=16, split_k=3, kb=1, cuda_cores=True)),
    "fma_m3_fp16_even": (3, 64, 512, "fp16", False, "gemv", dict(block_n=32, split_k=2, kb=2, cuda_cores=True)),
    "fma_m4_fp32_ragged_k": (4, 21, 320, "fp32", True, "gemv", dict(block_n=16, split_k=2, kb=2, cuda_cores=True)),
    "gemm_m67_bf16_nested": (67, 45, 192, "bf16", True, "gemm", dict(block_m=32, block_n=16, kb=2, group_m=2)),
    "gemm_m70_fp16_even": (70, 64, 256, "fp16", False, "gemm", dict(block_m=32, block_n=32, kb=2, group_m=2)),
    "gemm_m65_fp32": (65, 21, 128, "fp32", True, "gemm", dict(block_m=16, block_n=16, kb=1, group_m=3)),
    # long prompts: decode into the scratch matrix, then torch's matmul (forced at few rows here)
    "dequant_m9_bf16_nested": (9, 45, 192, "bf16", True, "dequant", dict(block_n=16, kb=2)),
    "dequant_m6_fp16_plain_ragged_k": (6, 33, 320, "fp16", False, "dequant", dict(block_n=32, kb=4)),
    "dequant_m5_fp32": (5, 21, 128, "fp32", True, "dequant", dict(block_n=16, kb=1)),
    # q|k|v-like slices of one output: decoded into one scratch matrix, one matmul
    "stacked_m7_bf16_nested": (7, 40, 192, "bf16", True, "stacked", {}),
    # parts fused by concat_nf4 (an offset per state2 block): N 0 means 128 + 64 + 64 rows, 512 two of 256
    "concat_gemv_m3_bf16": (3, 0, 256, "bf16", True, "concat_gemv", dict(block_n=32, split_k=2, kb=2)),
    "concat_gemv_m2_bf16_ragged_k": (2, 512, 320, "bf16", True, "concat_gemv", dict(block_n=64, split_k=2, kb=2)),
    "concat_fma_m1_fp16": (1, 0, 256, "fp16", True, "concat_gemv", dict(block_n=32, split_k=2, kb=1, cuda_cores=True)),
    "concat_gemm_m66_bf16": (66, 0, 256, "bf16", True, "concat_gemm", dict(block_m=32, block_n=32, kb=2, group_m=2)),
    "concat_dequant_m4_fp32": (4, 0, 256, "fp32", True, "concat_dequant", {}),
}


def _interpreted_case(m: int, n: int, k: int, dtype_name: str, nested: bool, kernel: str, cfg: dict) -> list[float]:
    from sloth_kernels import triton_nf4

    dtype = DTYPES[dtype_name]
    if kernel.startswith("concat_"):
        fused = concat_nf4(_parts([256, 256] if n == 512 else [128, 64, 64], k, dtype))
        assert fused is not None
        x = torch.randn(m, k, dtype=dtype)
        if kernel == "concat_gemv":
            got = triton_nf4.nf4_matmul(x, fused, gemv=triton_nf4.GemvConfig(**cfg, use_prmt=False))
        elif kernel == "concat_gemm":
            got = triton_nf4.nf4_matmul(x, fused, gemm=triton_nf4.GemmConfig(**cfg, use_prmt=False))
        else:
            decoded = triton_nf4.nf4_dequantize(fused, dtype, use_prmt=False)
            if not torch.equal(bits(decoded), bits(dequantize_nf4_ref(fused).to(dtype))):
                return [float("inf"), 0.0, 1.0]
            got = triton_nf4.nf4_matmul(x, fused, dequant_min_rows=1)
        return [rel_err(got, exact_linear(x, fused, None)), BOUND[dtype], 1.0]
    w = quantize_nf4_ref(torch.randn(n, k, dtype=dtype) * 0.05, compress_statistics=nested)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    wide = torch.full((m, n + 7), float("nan"), dtype=dtype)  # out is a column slice: strides count
    if kernel == "gemv":
        triton_nf4.nf4_matmul(x, w, bias, out=wide[:, 3 : 3 + n], gemv=triton_nf4.GemvConfig(**cfg, use_prmt=False))
    elif kernel == "stacked":
        w2 = quantize_nf4_ref(torch.randn(n // 2 + 3, k, dtype=dtype) * 0.05, compress_statistics=nested)
        bias = None
        got = triton_nf4.nf4_matmul_stacked(x, [w, w2], dequant_min_rows=1, use_prmt=False)
        want = torch.cat([exact_linear(x, w, None), exact_linear(x, w2, None)], dim=1)
        return [rel_err(got, want), BOUND[dtype], 1.0]
    elif kernel == "dequant":
        # The decoded matrix itself is bitsandbytes' (the gather path rounds code * absmax once).
        decoded = triton_nf4.nf4_dequantize(w, dtype, use_prmt=False, **cfg)
        if not torch.equal(bits(decoded), bits(dequantize_nf4_ref(w).to(dtype))):
            return [float("inf"), 0.0, 1.0]
        triton_nf4.nf4_matmul(x, w, bias, out=wide[:, 3 : 3 + n], gemm=triton_nf4.GemmConfig(use_prmt=False),
                              dequant_min_rows=1)
    else:
        saved, triton_nf4.GEMV_MAX_ROWS = triton_nf4.GEMV_MAX_ROWS, 0
        try:
            triton_nf4.nf4_matmul(x, w, bias, out=wide[:, 3 : 3 + n], gemm=triton_nf4.GemmConfig(**cfg, use_prmt=False))
        finally:
            triton_nf4.GEMV_MAX_ROWS = saved
    untouched = bool(torch.isnan(wide[:, :3]).all() and torch.isnan(wide[:, 3 + n :]).all())
    return [rel_err(wide[:, 3 : 3 + n], exact_linear(x, w, bias)), BOUND[dtype], float(untouched)]


def _interpreter_main() -> None:
    from sloth_kernels.triton_interp import patch_interpreter

    assert os.environ.get("TRITON_INTERPRET") == "1"
    patch_interpreter()
    results: dict[str, object] = {}
    for i, (name, case) in enumerate(INTERPRETER_CASES.items()):
        torch.manual_seed(1000 + i)
        try:
            results[name] = _interpreted_case(*case)
        except Exception:
            results[name] = traceback.format_exc()
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    pytest.importorskip("triton")
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(INTERPRETER_CASES))
def test_triton_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    result = interpreted[name]
    assert isinstance(result, list), f"{name} raised:\n{result}"
    err, bound, untouched = result
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.1g}"
    assert untouched, f"{name}: wrote outside its column slice"


# ---- GPU (real sizes) ---------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_weight(n: int, k: int, dtype: torch.dtype, nested: bool = True) -> NF4Weight:
    return quantize_nf4_ref(torch.randn(n, k, device="cuda", dtype=dtype) * 0.02, compress_statistics=nested)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("prmt", "cuda_cores"), [(True, False), (False, False), (True, True)],
                         ids=["prmt", "gather", "fma"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("m", [1, 3, 13, 64, 2048])
@pytest.mark.parametrize("nk", [(4096, 14336), (14336, 4096)], ids=["down", "gate"])
def test_triton_matches_reference_on_gpu(nk: tuple[int, int], m: int, dtype: torch.dtype, prmt: bool,
                                         cuda_cores: bool) -> None:
    from sloth_kernels import triton_nf4

    if prmt and dtype == torch.float32:
        pytest.skip("fp32 always takes the gather path")
    if cuda_cores and m > triton_nf4.FMA_MAX_ROWS:
        pytest.skip("the CUDA-core GEMV takes up to FMA_MAX_ROWS rows")
    torch.manual_seed(m)
    n, k = nk
    w = _gpu_weight(n, k, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    gemv = replace(triton_nf4.gemv_config_for(m, n, k), use_prmt=prmt, cuda_cores=cuda_cores)
    gemm = replace(triton_nf4.gemm_config_for(m, n, k), use_prmt=prmt)
    triton_nf4.nf4_matmul(x, w, bias, out=out, gemv=gemv, gemm=gemm, dequant_min_rows=10**9)  # fused kernels
    assert rel_err(out, exact_linear(x, w, bias)) <= GPU_BOUND[dtype]
    if m >= 64:  # the same product through the decoded scratch matrix and cuBLAS
        out.fill_(float("nan"))
        triton_nf4.nf4_matmul(x, w, bias, out=out, gemm=gemm, dequant_min_rows=1)
        assert rel_err(out, exact_linear(x, w, bias)) <= GPU_BOUND[dtype]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dequantize_kernel_is_bitsandbytes_on_gpu(dtype: torch.dtype) -> None:
    from sloth_kernels import triton_nf4

    w = _gpu_weight(14336, 4096, dtype)
    exact = dequantize_nf4_ref(w).to(dtype)
    ulps = (bits(triton_nf4.nf4_dequantize(w, dtype, use_prmt=False)).int() - bits(exact).int()).abs().max()
    # bf16: bit-exact (H200, 2026-11-28). fp16 keeps 3 more mantissa bits, and the GPU fuses the
    # nested scale's code2 * absmax2 + offset into one FMA (one rounding, the reference has two).
    assert int(ulps) <= (0 if dtype == torch.bfloat16 else 1)
    assert rel_err(triton_nf4.nf4_dequantize(w, dtype, use_prmt=True), exact) <= GPU_BOUND[dtype]


@pytest.mark.gpu
@gpu
def test_split_k_is_deterministic_and_graph_safe_on_gpu() -> None:
    torch.manual_seed(3)
    w = _gpu_weight(4096, 14336, torch.bfloat16)
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    first = nf4_linear(x, w)
    assert torch.equal(first, nf4_linear(x, w))
    static_out = torch.empty_like(first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nf4_linear(x, w, out=static_out)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, first)


@pytest.mark.gpu
@gpu
def test_dequantize_matches_bitsandbytes_cuda() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = dequantize_nf4_ref(NF4Weight.from_bnb(data, state))
    assert torch.equal(bits(ours), bits(bnbf.dequantize_4bit(data, state, quant_type="nf4")))
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    assert rel_err(nf4_linear(x, NF4Weight.from_bnb(data, state)), x.double() @ ours.double().T) <= 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [16, 512])
def test_stacked_slices_match_reference_on_gpu(m: int) -> None:
    """q|k|v at Llama-3-8B shape: per-slice kernels below DEQUANT_MIN_ROWS, one scratch + matmul above."""
    from sloth_kernels import triton_nf4

    torch.manual_seed(m)
    ws = [_gpu_weight(4096, 4096, torch.bfloat16), _gpu_weight(1024, 4096, torch.bfloat16),
          _gpu_weight(1024, 4096, torch.bfloat16)]
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    want = torch.cat([exact_linear(x, w, None) for w in ws], dim=1)
    assert rel_err(triton_nf4.nf4_matmul_stacked(x, ws), want) <= GPU_BOUND[torch.bfloat16]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 8, 64, 200, 512])
def test_fused_projection_matches_reference_on_gpu(m: int) -> None:
    """q|k|v and gate|up of Llama-3-8B joined by concat_nf4: one launch, each part's own offset."""
    from sloth_kernels import triton_nf4

    torch.manual_seed(m)
    for rows in ([4096, 1024, 1024], [14336, 14336]):
        parts = _parts(rows, 4096, torch.bfloat16, device="cuda")
        fused = concat_nf4(parts)
        assert fused is not None and fused.group_offsets
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        want = torch.cat([exact_linear(x, w, None) for w in parts], dim=1)
        assert rel_err(triton_nf4.nf4_matmul(x, fused), want) <= GPU_BOUND[torch.bfloat16], rows

if __name__ == "__main__":
    _interpreter_main()
