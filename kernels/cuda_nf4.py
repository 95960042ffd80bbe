"""The CUDA NF4 GEMV / skinny GEMM (1-64 rows; source and design in sloth_kernels.cuda_nf4_source): which
calls it takes, its launch shape, and the NVRTC compile (once per process and variant, cached).

sloth_kernels.nf4.nf4_linear prefers it on CUDA for up to MAX_ROWS rows and falls back to the Triton kernels
when it does not apply, when NVRTC is missing or fails, or when SLOTH_NF4_CUDA=0. Launches go on
torch's current stream (torch's NVRTC launcher), so a CUDA graph captures them like any kernel."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from .cuda_nf4_source import SOURCE
from .nf4_format import NF4Weight

log = logging.getLogger(__name__)

ENV_SWITCH = "SLOTH_NF4_CUDA"  # "0": never use the CUDA kernel (the Triton kernels run instead)
MAX_ROWS = 64  # what the kernel computes
# What nf4_linear sends to it: above this the Triton GEMV was faster on the H200 (kernels-nf4-cuda.md).
PREFERRED_MAX_ROWS = 8
K_STEP = 128  # K a warp consumes per loop step (64 code bytes of a row): K must be a multiple
TABLE_BYTES = 32768 + 1024 + 64  # code-pair table, the nested absmax code book, the 16 codes
SMEM_LIMIT = 48 * 1024  # no opt-in needed below this
# The K split stops before the grid exceeds this many warps per SM: on the H200 ~12-16 warps an SM,
# each over a longer K range, beat 32 (kernels-nf4-cuda.md).
WARPS_PER_SM = 16
DTYPES = {torch.bfloat16: 0, torch.float16: 1}
_FAILED: list[str] = []  # a compile error disables the kernel for the process (logged once)


@dataclass(frozen=True, slots=True)
class CudaGemvConfig:
    """A CTA has warps x row_warps warps: `warps` split K, `row_warps` take different rows (and share
    the x they read through L1); each warp holds rs strips of 16 rows. decode 0 looks code bytes up
    in the shared-memory pair table, 1 in per-block byte tables in registers (integer pipe)."""

    rs: int = 1
    warps: int = 8
    row_warps: int = 1
    decode: int = 0

    def __post_init__(self) -> None:
        most = 16 if self.decode == 0 else 8  # the kernel's launch bounds: 512 or 256 threads
        if (
            self.rs not in (1, 2)
            or self.decode not in (0, 1)
            or not 1 <= self.warps * self.row_warps <= most
            or min(self.warps, self.row_warps) < 1
        ):
            raise ValueError(
                f"CudaGemvConfig needs rs in (1, 2), decode in (0, 1) and 1..16 warps in all (8 with decode 1), "
                f"got {self}"
            )

    @property
    def rows(self) -> int:
        """Weight rows a CTA computes."""
        return 16 * self.rs * self.row_warps


# (out_features, in_features, n-tiles) -> the launch measured fastest on the H200 over 1 and 8 rows
# (bench/kernels_nf4_cuda.py, 2026-12-04). An entry with more than one n-tile also makes nf4_linear
# prefer the CUDA kernel at those rows (o at 16 rows: 13.0 us against Triton's 17.3).
TUNED: dict[tuple[int, int, int], CudaGemvConfig] = {
    (4096, 4096, 1): CudaGemvConfig(rs=1, warps=8, row_warps=1, decode=1),
    (4096, 14336, 1): CudaGemvConfig(rs=1, warps=8, row_warps=1, decode=1),
    (14336, 4096, 1): CudaGemvConfig(rs=1, warps=2, row_warps=4, decode=1),
    (6144, 4096, 1): CudaGemvConfig(rs=1, warps=4, row_warps=1, decode=1),
    (4096, 4096, 2): CudaGemvConfig(rs=1, warps=4, row_warps=2, decode=1),
}


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0" and not _FAILED


def n_tiles(m: int) -> int:
    """8-token mma tiles the kernel is compiled for: 1, 2, 4 or 8 (rows padded up)."""
    tiles = 1
    while tiles * 8 < m:
        tiles *= 2
    return tiles


def supports(x: torch.Tensor, w: NF4Weight) -> bool:
    """Whether the CUDA kernel takes x [M, K] @ W.T: 1..MAX_ROWS rows of bf16/fp16 on a GPU with
    bf16 mma (sm_80+), K a multiple of K_STEP and of the blocksize, aligned 16-byte loads, and a
    weight quantized in x's dtype or fp32 (so the kernel's single rounding is the reference's)."""
    if not (enabled() and x.is_cuda and x.dim() == 2 and x.dtype in DTYPES and x.device == w.device):
        return False
    m, k = x.shape
    bs = w.blocksize
    return (
        1 <= m <= MAX_ROWS
        and k == w.shape[1]
        and k % K_STEP == 0
        and bs in (32, 64, 128, 256)
        and k % bs == 0
        and w.dtype in (x.dtype, torch.float32)
        and x.stride(1) == 1
        and (x.stride(0) * 2) % 16 == 0
        and x.data_ptr() % 16 == 0
        and w.data.data_ptr() % 16 == 0
        and w.data.is_contiguous()
        and w.absmax.is_contiguous()
        and (
            not w.nested
            or (
                w.state2_blocksize > 0
                and w.state2_blocksize & (w.state2_blocksize - 1) == 0
                and w.state2_code is not None
                and w.state2_code.numel() == 256
            )
        )
        and w.code.dtype == torch.float32
        and w.code.numel() == 16
        and _capability(_index(x.device))[0] >= 8
    )


def prefers(x: torch.Tensor, w: NF4Weight) -> bool:
    """Whether nf4_linear should take the CUDA kernel: it supports the call, and the row count is one
    where it measured faster than the Triton GEMV (up to PREFERRED_MAX_ROWS, or a TUNED entry)."""
    if x.dim() != 2:
        return False
    m = x.shape[0]
    return (m <= PREFERRED_MAX_ROWS or (w.shape[0], w.shape[1], n_tiles(m)) in TUNED) and supports(x, w)


def config_for(m: int, n: int, k: int, num_sms: int) -> CudaGemvConfig:
    """TUNED if measured, else the register-table decode (as fast or faster at 1-8 rows, faster above)
    with, beyond 8 tokens, two row warps sharing x; K split over the largest power of two of warps
    (8 a CTA at most) that keeps the grid within WARPS_PER_SM warps per SM and the steps K has."""
    tiles = n_tiles(m)
    tuned = TUNED.get((n, k, tiles))
    if tuned is not None:
        return tuned
    row_warps = min(tiles, 2)
    ctas = -(-n // (16 * row_warps))
    warps = 1
    while (
        (warps * 2) * row_warps <= 8
        and ctas * (warps * 2) * row_warps <= num_sms * WARPS_PER_SM
        and warps * 2 <= k // K_STEP
    ):
        warps *= 2
    return CudaGemvConfig(rs=1, warps=warps, row_warps=row_warps, decode=1)


def smem_bytes(cfg: CudaGemvConfig, tiles: int) -> int:
    """The table (reused at the end for the warps' fp32 partials: warps x strips x tiles x 512 B)."""
    return max(TABLE_BYTES, cfg.warps * cfg.row_warps * cfg.rs * tiles * 512)


def source_name(dtype: torch.dtype, rs: int, tiles: int, decode: int = 0) -> str:
    return f"nf4_gemv<{DTYPES[dtype]}, {rs}, {tiles}, {decode}>"


def _nvrtc() -> Any:
    from torch.cuda import _utils

    get = getattr(_utils, "_get_nvrtc_library", None) or _utils._get_gpu_rtc_library
    return get()


def _compile(name: str, arch: str) -> tuple[bytes, str]:
    """NVRTC: SOURCE -> cubin for `arch` and the lowered name of the template instance `name`. The
    source includes no header, so no CUDA toolkit is needed beside torch's libnvrtc."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()

    def check(result: int, what: str) -> None:
        if result != 0:
            log_size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(log_size))
            text = ctypes.create_string_buffer(log_size.value)
            lib.nvrtcGetProgramLog(prog, text)
            raise RuntimeError(f"NVRTC {what} failed ({result}): {text.value.decode(errors='replace')}")

    check(
        lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.encode(), b"nf4_gemv.cu", 0, None, None), "create"
    )
    try:
        check(lib.nvrtcAddNameExpression(prog, name.encode()), "name")
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"-std=c++17", b"--fmad=false"]
        check(lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)), "compile")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = ctypes.c_char_p()
        check(lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)), "lowered name")
        assert lowered.value is not None
        return cubin.raw, lowered.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.cache
def kernel(name: str, device_index: int) -> Any:
    """The compiled kernel (torch's launcher, current stream), once per process, variant and device."""
    from torch.cuda._utils import _cuda_load_module

    major, minor = _capability(device_index)
    with torch.cuda.device(device_index):
        cubin, lowered = _compile(name, f"{major}{minor}")
        fn = _cuda_load_module(cubin, [lowered])
        return fn[lowered] if isinstance(fn, dict) else getattr(fn, lowered)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def nf4_gemv(
    x: torch.Tensor,
    w: NF4Weight,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: CudaGemvConfig | None = None,
) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) -> [M, N] in x.dtype (into `out`, a [M, N] view with unit column
    stride, if given). The caller checked supports(x, w)."""
    m, k = x.shape
    n = w.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(
            f"out must be a [{m}, {n}] {x.dtype} view with unit column stride, got "
            f"{tuple(out.shape)} {out.dtype} strides {out.stride()}"
        )
    device = _index(x.device)
    tiles = n_tiles(m)
    cfg = config or config_for(m, n, k, _num_sms(device))
    fn = kernel(source_name(x.dtype, cfg.rs, tiles, cfg.decode), device)
    nested = 0 if not w.nested else (2 if w.group_offsets else 1)
    stats = [w.state2_absmax, w.state2_code, w.offset] if w.nested else [w.absmax, w.absmax, w.absmax]
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    args = [
        x,
        w.data,
        w.absmax,
        *stats,
        w.code,
        out if bias is None else bias,
        out,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        nested,
        w.blocksize.bit_length() - 1,
        w.state2_blocksize.bit_length() - 1,
        int(bias is not None),
        cfg.row_warps,
    ]
    smem = smem_bytes(cfg, tiles)
    # large explicit configs: opt in to more than 48 KB of shared memory (once per kernel)
    if smem > SMEM_LIMIT and getattr(fn, "_max_shared_mem_bytes", 0) < smem:
        fn.set_shared_memory_config(smem)
    fn(
        grid=(-(-n // cfg.rows), 1, 1),
        block=(32 * cfg.warps * cfg.row_warps, 1, 1),
        args=args,
        shared_mem=smem,
    )
    return out


def disable(reason: str) -> None:
    """Turn the kernel off for this process (a compile or load error), logged once."""
    if not _FAILED:
        log.warning("CUDA NF4 GEMV disabled, the Triton kernels run instead: %s", reason)
    _FAILED.append(reason)
