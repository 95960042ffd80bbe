"""Triton KV write and paged attention equal the PyTorch reference: run through TRITON_INTERPRET=1 on
the CPU at small odd shapes (in a subprocess, since the variable must be set before triton is
imported), and on a GPU at Llama-3-8B shapes. This module also hosts the interpreter harness that
test_norm.py and test_rope.py reuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sloth_kernels.attention import AttnMetadata, paged_attention, paged_attention_ref, write_kv, write_kv_ref  # noqa: E402

# ‖out − ref‖ / ‖ref‖ bounds (the device tool's METHOD.md): fp32 through IEEE dots; half types
# round P (and the output) to 8 or 11 mantissa bits.
BOUND = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")  # NaN never passes: unwritten outputs are poisoned with NaN
    return ((out64 - ref64).norm() / ref64.norm()).item()


# ---- the interpreter harness -------------------------------------------------------------------


def patch_triton_interpreter() -> None:
    """Work around three triton 3.6 interpreter bugs so that it computes what the GPU does: tensors
    used as `range` bounds are 1-element arrays that numpy >= 2.4 refuses to turn into ints;
    bf16 dots multiply the raw uint16 bits; float32 -> bf16 casts truncate instead of rounding to
    nearest even."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    patch_tensor = interp._patch_lang_tensor

    def patched_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched_tensor
    builder = interp.InterpreterBuilder
    cast_impl, create_dot = builder.cast_impl, builder.create_dot

    def bf16_to_f32(h):  # type: ignore[no-untyped-def]
        return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def cast(self, src, dst_type):  # type: ignore[no-untyped-def]
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return interp.TensorHandle(x.to(torch.bfloat16).view(torch.uint16).numpy(), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        a = bf16_to_f32(a) if a.dtype.scalar == tl.bfloat16 else a
        b = bf16_to_f32(b) if b.dtype.scalar == tl.bfloat16 else b
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl = cast
    builder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    builder.create_dot = dot


def poison_torch_empty() -> None:
    """Outputs allocated with torch.empty start as NaN, so an element the kernel skips fails."""
    empty = torch.empty

    def poisoned(*args, **kwargs):  # type: ignore[no-untyped-def]
        t = empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = poisoned  # type: ignore[assignment]


def interpreter_main(cases: dict[str, Callable[[], tuple[float, float]]]) -> None:
    """Entry of the subprocess: runs every case, prints {name: [err, bound] or error text} as JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    patch_triton_interpreter()
    poison_torch_empty()
    results: dict[str, object] = {}
    for name, case in cases.items():
        torch.manual_seed(zlib.crc32(name.encode()))
        try:
            results[name] = list(case())
        except Exception:
            results[name] = traceback.format_exc()
    print("RESULTS " + json.dumps(results))


def run_interpreted(script: str) -> dict[str, object]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS ") :])


def check_interpreted(results: dict[str, object], name: str) -> None:
    result = results[name]
    assert isinstance(result, list), f"{name} raised:\n{result}"
    err, bound = result
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.1g}"


# ---- paged batches -------------------------------------------------------------------------------


def make_batch(
    q_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, device: str = "cpu", spare_blocks: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttnMetadata]:
    """Random q and caches, each sequence on randomly placed blocks, tables padded with block 0."""
    needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(needed) + spare_blocks
    perm = torch.randperm(num_blocks).int()
    tables = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        tables[b, :n] = perm[used : used + n]
        used += n
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    slots = [int(tables[b, p // block_size]) * block_size + p % block_size
             for b, (n, s) in enumerate(zip(q_lens, seq_lens, strict=True)) for p in range(s - n, s)]

    def dev(x: list[int], dt: torch.dtype) -> torch.Tensor:
        return torch.tensor(x, dtype=dt, device=device)

    meta = AttnMetadata(
        slot_mapping=dev(slots, torch.long), block_tables=tables.to(device), seq_lens=dev(seq_lens, torch.int32),
        query_start_loc=dev(starts, torch.int32), seq_lens_host=list(seq_lens), query_start_loc_host=starts,
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
    )
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=device).to(dtype)
    v_cache = torch.randn(shape, device=device).to(dtype)
    q = torch.randn(starts[-1], num_heads, head_dim, device=device).to(dtype)
    return q, k_cache, v_cache, meta


def attention_case(
    q_lens: list[int], seq_lens: list[int], heads: tuple[int, int], head_dim: int, block_size: int,
    dtype: str, window: int | None = None, num_decodes: int = 0, softcap: float | None = None, **overrides: int,
) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        from sloth_kernels.triton_attention import paged_attention_triton

        dt = DTYPES[dtype]
        q, kc, vc, meta = make_batch(q_lens, seq_lens, heads[0], heads[1], head_dim, block_size, dt)
        # q as a strided view of a fused qkv output, the way the model passes it
        qkv = torch.randn(q.shape[0], q.shape[1] + 2, head_dim).to(dt)
        qkv[:, : q.shape[1]] = q
        q = qkv[:, : q.shape[1]]
        scale = head_dim**-0.5 if softcap is None else 4 * head_dim**-0.5  # scores past the cap: tanh bends
        out = paged_attention_triton(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                     meta.max_query_len, scale, window, num_decodes, softcap=softcap, **overrides)
        ref = paged_attention_ref(q, kc, vc, meta, scale, window, softcap)
        if softcap is not None:  # the cap changes the result: a kernel ignoring it would fail
            assert rel_err(paged_attention_ref(q, kc, vc, meta, scale, window), ref) > 100 * BOUND[dt]
        return rel_err(out, ref), BOUND[dt]

    return run


def write_kv_case(num_kv_heads: int, head_dim: int, block_size: int, dtype: str) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        from sloth_kernels.triton_attention import write_kv_triton

        dt = DTYPES[dtype]
        num_tokens, num_blocks = 11, 5
        qkv = torch.randn(num_tokens, (4 + 2 * num_kv_heads) * head_dim).to(dt)
        k = qkv[:, 4 * head_dim :].unflatten(1, (2 * num_kv_heads, head_dim))[:, :num_kv_heads]
        v = qkv[:, 4 * head_dim :].unflatten(1, (2 * num_kv_heads, head_dim))[:, num_kv_heads:]
        slots = torch.randperm(num_blocks * block_size)[:num_tokens]
        slots[3] = -1  # a padding token writes nothing
        k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dt)
        v_cache = torch.randn_like(k_cache)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        write_kv_triton(k, v, k_cache, v_cache, slots)
        write_kv_ref(k, v, k_ref, v_ref, slots)
        return max(rel_err(k_cache, k_ref), rel_err(v_cache, v_ref)), 0.0

    return run


CASES: dict[str, Callable[[], tuple[float, float]]] = {
    # decode: one query per sequence, GQA 1/2/4, with and without key splits (flash-decoding)
    "decode_gqa1_d64_bs8_fp32": attention_case([1, 1, 1], [5, 40, 17], (3, 3), 64, 8, "fp32"),
    "decode_gqa2_d64_bs16_fp32_auto_split": attention_case([1, 1, 1], [5, 90, 17], (4, 2), 64, 16, "fp32"),
    "decode_gqa4_d96_bs8_fp32_3_splits": attention_case([1, 1], [1, 77], (8, 2), 96, 8, "fp32", num_splits=3),
    "decode_gqa4_d64_bs16_fp32_no_split": attention_case([1, 1, 1, 1], [33, 2, 64, 65], (8, 2), 64, 16, "fp32",
                                                         num_splits=1, block_n=16),
    "decode_gqa3_d24_bs8_fp32": attention_case([1, 1], [9, 30], (6, 2), 24, 8, "fp32"),
    "decode_sliding_window_split": attention_case([1, 1, 1], [3, 70, 41], (4, 2), 64, 8, "fp32", window=19,
                                                  num_splits=4, block_n=16),
    "decode_sliding_window_tile_edge": attention_case([1, 1, 1], [40, 8, 100], (4, 1), 64, 16, "fp32", window=15,
                                                      block_n=16),
    "decode_gqa2_d64_bs16_bf16": attention_case([1, 1, 1], [5, 90, 17], (4, 2), 64, 16, "bf16"),
    "decode_gqa4_d80_bs8_fp16": attention_case([1, 1], [13, 50], (8, 2), 80, 8, "fp16", num_splits=2),
    # prefill: fresh prompts, chunked prompts over cached context, mixed with decode tokens
    "prefill_gqa1_d64_bs8_fp32": attention_case([7, 19], [7, 19], (2, 2), 64, 8, "fp32"),
    "prefill_gqa4_d80_bs16_fp32": attention_case([23, 5], [23, 5], (8, 2), 80, 16, "fp32"),
    "chunked_mixed_gqa2_d64_bs8_fp32": attention_case([1, 13, 1, 30], [40, 29, 9, 30], (4, 2), 64, 8, "fp32"),
    "chunked_mixed_gqa4_d96_bs16_fp32": attention_case([9, 1, 21], [50, 17, 60], (8, 2), 96, 16, "fp32",
                                                       block_m=32, block_n=16),
    "chunked_mixed_gqa3_d24_bs8_fp32": attention_case([3, 1, 20], [3, 33, 50], (6, 2), 24, 8, "fp32"),
    "chunked_sliding_window": attention_case([5, 1, 26], [37, 12, 44], (4, 2), 64, 8, "fp32", window=9,
                                             block_m=16, block_n=16),
    "chunked_sliding_window_wide": attention_case([17, 1], [40, 70], (4, 1), 64, 16, "fp32", window=20),
    # contexts that put the first query of a q block one key before a tile edge (mask boundaries)
    "chunked_tile_edges": attention_case([40, 33, 1], [54, 63, 47], (4, 2), 64, 8, "fp32", block_m=16, block_n=16),
    "chunked_sliding_window_tiles": attention_case([30, 1, 12], [55, 40, 60], (4, 2), 64, 16, "fp32", window=20,
                                                   block_m=16, block_n=16),
    # decodes first, through the decode kernel; the prompts after them through the prefill kernel
    "mixed_two_kernels_gqa2": attention_case([1] * 9 + [13, 30], [40, 9, 5, 17, 3, 60, 22, 1, 8, 29, 30], (4, 2),
                                             64, 8, "fp32", num_decodes=9, programs_per_sm=64, block_m=16),
    "mixed_two_kernels_sliding": attention_case([1, 5, 1, 26], [70, 37, 12, 44], (4, 2), 64, 16, "fp32", window=9,
                                                num_decodes=1, block_m=16, block_n=16, num_splits=3),
    # decodes anywhere, known on the device only (a CUDA graph's step): both kernels over every
    # sequence, each taking its own; empty sequences after the last (a bucket's unused ones)
    "mixed_by_length_gqa2": attention_case([1, 13, 1, 30, 1, 0, 0], [40, 29, 9, 30, 70, 0, 0], (4, 2), 64, 8,
                                           "fp32", num_decodes=-1, block_m=16, block_n=16),
    "mixed_by_length_sliding_bf16": attention_case([5, 1, 26, 1], [37, 12, 44, 90], (4, 1), 64, 16, "bf16",
                                                   window=9, num_decodes=-1),
    "chunked_mixed_gqa2_bf16": attention_case([1, 13, 1, 30], [40, 29, 9, 30], (4, 2), 64, 8, "bf16"),
    "chunked_mixed_gqa4_fp16": attention_case([9, 1, 21], [50, 17, 60], (8, 2), 64, 16, "fp16"),
    # Gemma 2's score soft-capping: decode (split and not), prefill, chunked + sliding, two kernels
    "softcap_decode_split": attention_case([1, 1, 1], [5, 90, 17], (4, 2), 64, 16, "fp32", softcap=2.5,
                                           num_splits=3),
    "softcap_decode_bf16": attention_case([1, 1], [13, 50], (8, 2), 80, 8, "bf16", softcap=3.0),
    "softcap_prefill_gqa2": attention_case([7, 19], [7, 19], (4, 2), 64, 8, "fp32", softcap=2.0),
    "softcap_chunked_sliding": attention_case([5, 1, 26], [37, 12, 44], (4, 2), 64, 8, "fp32", window=9,
                                              softcap=2.0, block_m=16, block_n=16),
    "softcap_mixed_two_kernels_fp16": attention_case([1, 5, 1, 26], [70, 37, 12, 44], (4, 2), 64, 16, "fp16",
                                                     num_decodes=1, softcap=1.5),
    # Gemma 4's full layers: 512-wide heads (their own tiles: 32 rows at most, 8 warps), decode and prompts
    "gemma4_global_d512": attention_case([1, 13, 1, 20], [30, 13, 21, 45], (4, 1), 512, 8, "fp32",
                                         num_decodes=-1),
    # KV write: strided k/v views, padding slots, every dtype
    "write_kv_bs8_fp32": write_kv_case(2, 64, 8, "fp32"),
    "write_kv_bs16_d80_bf16": write_kv_case(3, 80, 16, "bf16"),
    "write_kv_bs8_fp16": write_kv_case(1, 24, 8, "fp16"),
}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_attention_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    check_interpreted(interpreted, name)


def test_reference_write_kv_skips_padding_slots() -> None:
    k = torch.randn(3, 2, 8)
    cache = torch.randn(2, 4, 2, 8)
    before = cache.clone()
    write_kv_ref(k, k, cache, cache.clone(), torch.tensor([5, -1, 0]))
    assert torch.equal(cache[1, 1], k[0]) and torch.equal(cache[0, 0], k[2])
    untouched = torch.ones(8, dtype=torch.bool)
    untouched[[0, 5]] = False
    assert torch.equal(cache.flatten(0, 1)[untouched], before.flatten(0, 1)[untouched])


# ---- GPU, real sizes -------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    ("q_lens", "seq_lens", "window"),
    [
        ([1] * 8, [1, 17, 512, 700, 2048, 3001, 8192, 64], None),  # decode, split
        ([1] * 96, [37 + 91 * i for i in range(96)], None),  # decode, no split
        ([1] * 5, [4000, 5, 300, 9000, 1000], 1024),  # decode with sliding window
        ([512], [512], None),  # prefill
        ([1, 300, 1, 77, 1], [900, 812, 33, 2000, 4097], None),  # chunked prefill + decode
        ([200, 1, 513], [1200, 3000, 513], 256),  # sliding window
    ],
)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_attention_gpu_llama3_shapes(
    q_lens: list[int], seq_lens: list[int], window: int | None, block_size: int
) -> None:
    torch.manual_seed(0)
    q, kc, vc, meta = make_batch(q_lens, seq_lens, 32, 8, 128, block_size, torch.bfloat16, device="cuda")
    out = paged_attention(q, kc, vc, meta, 128**-0.5, window)
    ref = paged_attention_ref(q, kc, vc, meta, 128**-0.5, window)
    assert rel_err(out, ref) < BOUND[torch.bfloat16]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("q_lens", "seq_lens", "window"),
                         [([1] * 8, [1, 17, 512, 700, 2048, 3001, 8192, 64], None),
                          ([1, 300, 1, 77, 1], [900, 812, 33, 2000, 4097], 4096), ([512], [512], None)])
def test_paged_attention_softcap_gpu_gemma2_shapes(q_lens: list[int], seq_lens: list[int], window: int | None) -> None:
    """Gemma-2-9B's attention: 16 q / 8 kv heads of 256, scale 256**-0.5, scores capped at 50."""
    torch.manual_seed(0)
    q, kc, vc, meta = make_batch(q_lens, seq_lens, 16, 8, 256, 16, torch.bfloat16, device="cuda")
    q = q * 8  # scores of tens, where the cap bends them
    out = paged_attention(q, kc, vc, meta, 256**-0.5, window, softcap=50.0)
    assert rel_err(out, paged_attention_ref(q, kc, vc, meta, 256**-0.5, window, 50.0)) < BOUND[torch.bfloat16]


@pytest.mark.gpu
@gpu
def test_write_kv_gpu_matches_reference() -> None:
    torch.manual_seed(0)
    k = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    slots[::7] = -1
    caches = [torch.randn(64, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    refs = [c.clone() for c in caches]
    write_kv(k, v, *caches, slots)
    write_kv_ref(k, v, *refs, slots)
    assert torch.equal(caches[0], refs[0]) and torch.equal(caches[1], refs[1])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_model_with_triton_kernels_matches_transformers_greedy(tmp_path: Path, family: str) -> None:
    """The whole forward pass on CUDA (fp32, so that greedy choices are stable) through these kernels."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("families", ROOT / "tests" / "engine" / "test_model_families.py")
    assert spec is not None and spec.loader is not None
    families = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(families)
    from sloth_serve.config import Config
    from sloth_serve.engine.llm_engine import LLMEngine
    from sloth_serve.engine.sampling_params import SamplingParams

    folder, hf = families.make_model(tmp_path, family)
    engine = LLMEngine(Config(model=str(folder), load_format="safetensors", num_kv_blocks=64, block_size=8,
                              max_num_batched_tokens=24, device="cuda", dtype="float32",
                              cuda_graph_sizes=(1, 2, 4)))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 384, (n,), generator=gen).tolist() for n in (3, 19, 45, 8)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests:
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert got[str(i)] == ref, f"{family} prompt {i}"


if __name__ == "__main__":
    interpreter_main(CASES)
