"""Launch configurations of the NF4 kernels (sloth_kernels.triton_nf4): block shapes, K split, and the
per-shape choices measured fastest on an H200 by `bench/kernels_nf4.py --sweep`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int = 64
    split_k: int = 0  # 0: pick from the GPU's size
    kb: int = 2  # absmax blocks per loop iteration (unrolled: more loads in flight)
    num_warps: int = 4
    num_stages: int = 3
    use_prmt: bool = True
    waves: int = 4  # programs per SM the split aims for (when split_k is 0)
    cuda_cores: bool = False  # the FMA kernel instead of tl.dot (up to FMA_MAX_ROWS rows)


@dataclass(frozen=True, slots=True)
class GemmConfig:
    block_m: int = 256
    block_n: int = 128
    kb: int = 1
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    use_prmt: bool = True


GEMV_MAX_ROWS = 64
FMA_MAX_ROWS = 4
# From this many rows on (long prefill chunks) the weight is decoded to a 16-bit scratch matrix and
# multiplied by cuBLAS: at 512 rows the fused GEMM took 1.3-2.4x the time of dequantize + cuBLAS on
# the H200 (bench/results/kernels-nf4.md); at 64 rows the fused kernels are faster.
DEQUANT_MIN_ROWS = 256


def bucket(m: int) -> int:
    """Row buckets that share a configuration: 1, 2..16, 17..64 (GEMV), 65..1024, more (GEMM)."""
    return 1 if m == 1 else 16 if m <= 16 else 64 if m <= GEMV_MAX_ROWS else 512 if m <= 1024 else 2048


_FMA_1 = GemvConfig(block_n=128, kb=2, cuda_cores=True)  # one row: CUDA cores
_FMA_1_WIDE = GemvConfig(block_n=64, kb=2, waves=8, cuda_cores=True)
_DOT_16 = GemvConfig(block_n=64, kb=2, num_stages=3, waves=8)
# 17..64 rows: every K split writes an fp32 [N, rows] partial, so fewer splits than for 16 rows.
_DOT_64 = GemvConfig(block_n=64, kb=2, num_stages=3, waves=2)
_GEMM_512 = GemmConfig(block_m=128, block_n=128, num_warps=4, num_stages=4)
_GEMM_2048 = GemmConfig(block_m=256, block_n=128, num_warps=8, num_stages=4)
# (out, in, row bucket) -> the configuration fastest on an H200 in bench/kernels_nf4.py --sweep
# (2026-11-28, bench/results/kernels-nf4.md) and --sweep-batch (the 64-row bucket, session 4,
# bench/results/kernels-nf4-batch.md); other shapes take the fallbacks in *_config_for. The fused
# gate|up (28672 x 4096) was not swept: it takes gate/up's choices (same K, twice the column tiles).
TUNED: dict[tuple[int, int, int], GemvConfig | GemmConfig] = {
    (4096, 4096, 1): _FMA_1, (4096, 14336, 1): _FMA_1, (6144, 4096, 1): _FMA_1,
    (14336, 4096, 1): _FMA_1_WIDE, (28672, 4096, 1): _FMA_1_WIDE,
    (4096, 4096, 16): _DOT_16, (6144, 4096, 16): _DOT_16, (14336, 4096, 16): _DOT_16, (28672, 4096, 16): _DOT_16,
    (4096, 14336, 16): GemvConfig(),
    (1024, 4096, 64): GemvConfig(block_n=128, kb=1, num_warps=8, num_stages=4, waves=1),
    (4096, 4096, 64): GemvConfig(block_n=64, kb=2, num_stages=3, waves=1),
    (4096, 14336, 64): _DOT_64, (6144, 4096, 64): _DOT_64, (14336, 4096, 64): _DOT_64, (28672, 4096, 64): _DOT_64,
    (14336, 4096, 512): GemmConfig(block_m=256, block_n=128, num_warps=8, num_stages=4),
}


def gemv_config_for(m: int, n: int, k: int) -> GemvConfig:
    cfg = TUNED.get((n, k, bucket(m)))
    if isinstance(cfg, GemvConfig):
        return cfg
    return _FMA_1 if m == 1 else GemvConfig()


def gemm_config_for(m: int, n: int, k: int) -> GemmConfig:
    cfg = TUNED.get((n, k, bucket(m)))
    if isinstance(cfg, GemmConfig):
        return cfg
    return _GEMM_512 if m <= 1024 else _GEMM_2048
