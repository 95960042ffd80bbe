"""The CUDA NF4 GEMV (sloth_kernels.cuda_nf4): its dispatch rules and launch shapes on the CPU (nothing is
compiled there), and on a GPU (`-m gpu`) exactness against the reference dequantization: a one-hot
row's product is a single weight, so it must equal the reference bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sloth_kernels import cuda_nf4  # noqa: E402
from sloth_kernels.cuda_nf4_source import SOURCE  # noqa: E402
from sloth_kernels.nf4 import concat_nf4, dequantize_nf4_ref, nf4_linear, quantize_nf4_ref  # noqa: E402

# ---- CPU: host-side rules -----------------------------------------------------------------------


def test_row_counts_round_up_to_mma_tiles() -> None:
    assert [cuda_nf4.n_tiles(m) for m in (1, 8, 9, 16, 17, 32, 33, 64)] == [1, 1, 2, 2, 4, 4, 8, 8]


@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (4096, 14336), (14336, 4096), (1024, 4096), (40, 256)])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_default_launch_fits_shared_memory_and_k(n: int, k: int, m: int) -> None:
    cfg = cuda_nf4.config_for(m, n, k, num_sms=132)
    tiles = cuda_nf4.n_tiles(m)
    assert cuda_nf4.smem_bytes(cfg, tiles) <= cuda_nf4.SMEM_LIMIT
    assert cfg.warps & (cfg.warps - 1) == 0 and cfg.warps <= max(1, k // cuda_nf4.K_STEP)
    if (n, k, tiles) in cuda_nf4.TUNED:
        return
    # the split stops at the CTA size, K's steps, or the grid's warp budget
    grid_warps = -(-n // cfg.rows) * cfg.warps * cfg.row_warps
    assert grid_warps <= 132 * cuda_nf4.WARPS_PER_SM or cfg.warps == 1
    assert (
        cfg.warps * 2 * cfg.row_warps > 8
        or cfg.warps * 2 > k // cuda_nf4.K_STEP
        or grid_warps * 2 > 132 * cuda_nf4.WARPS_PER_SM
    )


def test_few_rows_prefer_it_and_tuned_buckets_extend_that(monkeypatch: pytest.MonkeyPatch) -> None:
    """nf4_linear's rule on the row count (supports() needs a GPU, so it is patched to True)."""
    monkeypatch.setattr(cuda_nf4, "supports", lambda x, w: True)
    gate, o = SimpleNamespace(shape=(14336, 4096)), SimpleNamespace(shape=(4096, 4096))  # only shape is read
    assert cuda_nf4.prefers(torch.zeros(8, 4096), gate)  # type: ignore[arg-type]
    assert not cuda_nf4.prefers(torch.zeros(16, 4096), gate)  # type: ignore[arg-type]  # Triton was faster
    assert cuda_nf4.prefers(torch.zeros(16, 4096), o)  # type: ignore[arg-type]  # a TUNED 16-row entry
    assert not cuda_nf4.prefers(torch.zeros(64, 4096), o)  # type: ignore[arg-type]


def test_tuned_config_wins_over_the_default() -> None:
    key = (512, 4096, 1)
    cuda_nf4.TUNED[key] = cuda_nf4.CudaGemvConfig(rs=2, warps=4)
    try:
        assert cuda_nf4.config_for(1, 512, 4096, 132) == cuda_nf4.CudaGemvConfig(rs=2, warps=4)
    finally:
        del cuda_nf4.TUNED[key]


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="rs in"):
        cuda_nf4.CudaGemvConfig(rs=3)
    with pytest.raises(ValueError, match="warps"):
        cuda_nf4.CudaGemvConfig(warps=32)
    with pytest.raises(ValueError, match="warps"):
        cuda_nf4.CudaGemvConfig(warps=8, row_warps=4)
    with pytest.raises(ValueError, match="decode"):
        cuda_nf4.CudaGemvConfig(warps=16, decode=1)


def test_cpu_tensors_and_the_switch_keep_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    w = quantize_nf4_ref(torch.randn(32, 128))
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert not cuda_nf4.supports(x, w)  # CPU: the reference runs
    monkeypatch.setenv(cuda_nf4.ENV_SWITCH, "0")
    assert not cuda_nf4.enabled()
    monkeypatch.setenv(cuda_nf4.ENV_SWITCH, "1")
    assert cuda_nf4.enabled() == (not cuda_nf4._FAILED)


def test_source_names_every_compiled_variant() -> None:
    assert "template <int DT, int RS, int MT, int DEC>" in SOURCE and "__global__" in SOURCE
    assert cuda_nf4.source_name(torch.bfloat16, 2, 4) == "nf4_gemv<0, 2, 4, 0>"
    assert cuda_nf4.source_name(torch.float16, 1, 8, 1) == "nf4_gemv<1, 1, 8, 1>"
    assert "#include" not in SOURCE  # NVRTC compiles it without a CUDA toolkit's headers


# ---- GPU ----------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _onehot_matches(w, dtype: torch.dtype, m: int, bias: torch.Tensor | None = None) -> None:  # type: ignore[no-untyped-def]
    k = w.shape[1]
    deq = dequantize_nf4_ref(w).to(dtype)
    cols = torch.randperm(k, device="cuda")[:m]
    x = torch.zeros(m, k, device="cuda", dtype=dtype)
    x[torch.arange(m), cols] = 1
    assert cuda_nf4.supports(x, w)
    got = cuda_nf4.nf4_gemv(x, w, bias)
    want = deq[:, cols].T
    if bias is not None:
        want = (want.float() + bias.float()).to(dtype)
    assert torch.equal(got.view(torch.int16), want.contiguous().view(torch.int16))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("m", [1, 7, 16, 33, 64])
def test_onehot_rows_give_the_reference_weights_bit_for_bit(dtype: torch.dtype, nested: bool, m: int) -> None:
    torch.manual_seed(m)
    w = quantize_nf4_ref(
        torch.randn(1000, 2048, device="cuda", dtype=dtype) * 0.02, compress_statistics=nested
    )
    _onehot_matches(w, dtype, m)
    _onehot_matches(w, dtype, m, bias=torch.randn(1000, device="cuda", dtype=dtype))


@pytest.mark.gpu
@gpu
def test_fused_projection_offsets_are_exact() -> None:
    """concat_nf4 (an offset per state2 block) and blocksize 128."""
    parts = [
        quantize_nf4_ref(torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16) * 0.02) for n in (512, 256)
    ]
    fused = concat_nf4(parts)
    assert fused is not None and fused.group_offsets
    _onehot_matches(fused, torch.bfloat16, 9)
    w128 = quantize_nf4_ref(torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16), blocksize=128)
    _onehot_matches(w128, torch.bfloat16, 3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 16, 64])
def test_random_rows_match_float64_and_are_deterministic(m: int) -> None:
    torch.manual_seed(m)
    w = quantize_nf4_ref(torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(m, 14336, device="cuda", dtype=torch.bfloat16)
    exact = x.double() @ dequantize_nf4_ref(w).double().T  # the bf16-rounded weights, fp64 sums
    got = cuda_nf4.nf4_gemv(x, w)
    assert ((got.double() - exact).norm() / exact.norm()).item() < 4e-3  # bf16 output rounding
    assert torch.equal(got, cuda_nf4.nf4_gemv(x, w))


@pytest.mark.gpu
@gpu
def test_nf4_linear_takes_it_into_a_column_slice_and_a_cuda_graph() -> None:
    torch.manual_seed(0)
    w = quantize_nf4_ref(torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    eager = nf4_linear(x, w)
    assert torch.equal(eager, cuda_nf4.nf4_gemv(x, w))
    wide = torch.full((3, 3000), float("nan"), device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        nf4_linear(x, w, out=wide[:, 1000:2024])
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(wide[:, 1000:2024], eager)
    assert wide[:, :1000].isnan().all() and wide[:, 2024:].isnan().all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "cfg",
    [
        cuda_nf4.CudaGemvConfig(*c)
        for c in (
            (1, 4, 1),
            (2, 4, 1),
            (1, 4, 4),
            (1, 1, 16),
            (2, 2, 4),
            (1, 16, 1),
            (1, 8, 1, 1),
            (2, 2, 2, 1),
        )
    ],
    ids=lambda c: f"rs{c.rs}-w{c.warps}x{c.row_warps}-dec{c.decode}",
)
@pytest.mark.parametrize("m", [1, 12, 40])
def test_every_launch_shape_is_exact(cfg: cuda_nf4.CudaGemvConfig, m: int) -> None:
    """Strip groups that overhang N (1000 rows), K splits finer than K's steps (640 = 5 steps)."""
    torch.manual_seed(m)
    w = quantize_nf4_ref(torch.randn(1000, 640, device="cuda", dtype=torch.bfloat16) * 0.02)
    deq = dequantize_nf4_ref(w)
    cols = torch.randperm(640, device="cuda")[:m]
    x = torch.zeros(m, 640, device="cuda", dtype=torch.bfloat16)
    x[torch.arange(m), cols] = 1
    got = cuda_nf4.nf4_gemv(x, w, config=cfg)
    assert torch.equal(got.view(torch.int16), deq[:, cols].T.contiguous().view(torch.int16))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_register_table_decode_is_exact_in_fp16(nested: bool) -> None:
    torch.manual_seed(5)
    w = quantize_nf4_ref(
        torch.randn(300, 1024, device="cuda", dtype=torch.float16), compress_statistics=nested
    )
    deq = dequantize_nf4_ref(w)
    x = torch.zeros(5, 1024, device="cuda", dtype=torch.float16)
    cols = torch.randperm(1024, device="cuda")[:5]
    x[torch.arange(5), cols] = 1
    got = cuda_nf4.nf4_gemv(x, w, config=cuda_nf4.CudaGemvConfig(1, 4, 2, decode=1))
    assert torch.equal(got.view(torch.int16), deq[:, cols].T.contiguous().view(torch.int16))
