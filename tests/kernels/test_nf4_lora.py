"""The NF4 GEMV with multi-LoRA in one launch (sloth_kernels.triton_nf4_lora): rows without an adapter
get exactly the unfused Triton GEMV's output (whose decoded weight is bitsandbytes'), rows with one
the reference's LoRA delta within fp tolerance; through TRITON_INTERPRET=1 on the CPU at small odd
shapes (one subprocess for the file) and on a GPU at Llama-3-8B shapes (`-m gpu`)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from test_attention import run_interpreted  # noqa: E402  (the shared subprocess harness)
from test_lora import BOUND, DTYPES, GPU_BOUND, check_sliced  # noqa: E402

from sloth_kernels.nf4 import nf4_linear_ref, quantize_nf4_ref  # noqa: E402
from sloth_kernels.nf4_lora import nf4_linear_lora, nf4_linear_lora_ref  # noqa: E402


def make_case(m: int, k: int, slices: list[int], rank: int, slot_ranks: list[int], slots: list[int],
              dtype: torch.dtype, nested: bool = True, device: str = "cpu") -> tuple:
    """(x, w, a, b, a_clean, b_clean, slots, ranks): slots of `rank` whose adapters fill `slot_ranks`,
    garbage (not zeros) past each adapter's rank in a and b, zeros there in a_clean and b_clean."""
    n = sum(slices)
    w = quantize_nf4_ref(torch.randn(n, k, dtype=dtype) * 0.05, compress_statistics=nested).to(device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    num_slots = len(slot_ranks)
    a = torch.randn(num_slots, len(slices) * rank, k, dtype=dtype, device=device) / k**0.5
    b = torch.randn(num_slots, n, rank, dtype=dtype, device=device) / rank**0.5
    a_clean, b_clean = a.clone(), b.clone()
    for slot, r in enumerate(slot_ranks):
        for i in range(len(slices)):
            a_clean[slot, i * rank + r : (i + 1) * rank] = 0
        b_clean[slot, :, r:] = 0
    return (x, w, a, b, a_clean, b_clean, torch.tensor(slots, dtype=torch.int32, device=device),
            torch.tensor(slot_ranks, dtype=torch.int32, device=device))


def test_reference_is_the_nf4_product_plus_each_rows_lora() -> None:
    torch.manual_seed(0)
    slices = [32, 16]
    x, w, _, _, a, b, slots, _ = make_case(5, 128, slices, 4, [4, 4], [1, -1, 0, 1, -1], torch.float32)
    base = nf4_linear_ref(x, w)
    got = nf4_linear_lora_ref(x, w, a, b, slots, slices)
    err, untouched = check_sliced(base, got, x, a, b, slots, slices)
    assert err < 1e-5 and untouched


def test_dispatch_off_cuda_without_the_interpreter_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off CUDA (and not interpreting) the product and add_lora run apart, as the reference does."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(1)
    slices = [32, 16, 16]
    x, w, a, b, _, _, slots, ranks = make_case(3, 128, slices, 4, [4, 4], [0, -1, 1], torch.float32)
    got = nf4_linear_lora(x, w, a, b, slots, slices, ranks)
    assert torch.equal(got, nf4_linear_lora_ref(x, w, a, b, slots, slices))


# ---- Triton through the interpreter (CPU) -------------------------------------------------------

# name: (rows, K, slices, slot rank, each slot's adapter rank, each row's slot, dtype, nested, config);
# the config's block_n and split_k set how many column tiles and K splits share the shrink.
INTERPRETER_CASES = {
    "m5_fp32_qkv_mixed": (5, 256, [32, 16, 16], 8, [8, 8, 8], [2, -1, 0, 2, 1], "fp32", True,
                          dict(block_n=16, split_k=2, kb=1)),
    "m1_bf16_one_row": (1, 192, [48], 16, [16, 16], [1], "bf16", True, dict(block_n=16, split_k=3, kb=1)),
    "m3_fp16_no_adapter": (3, 128, [32], 8, [8, 8], [-1, -1, -1], "fp16", False, dict(block_n=16, split_k=2, kb=1)),
    "m7_bf16_one_slot_everywhere": (7, 256, [64, 64], 16, [16], [0] * 7, "bf16", True,
                                    dict(block_n=32, split_k=4, kb=1)),
    # more slots than column tiles (a column shrinks two slots), ragged K (five blocks over two splits)
    "m9_fp32_slots_past_tiles_ragged_k": (9, 320, [32], 8, [8, 8, 8, 8, 8], [4, 3, -1, 0, 1, 2, 4, -1, 3], "fp32",
                                          True, dict(block_n=16, split_k=2, kb=2)),
    # mixed ranks in rank-16 slots (garbage past each), an empty slot, 17 rows (a 32-row tile)
    "m17_bf16_mixed_ranks": (17, 256, [32, 16, 16], 16, [16, 4, 0, 8], [i % 5 - 1 for i in range(17)], "bf16",
                             True, dict(block_n=16, split_k=2, kb=1)),
    "m4_fp16_plain_split_auto": (4, 512, [40], 8, [8, 2], [1, 0, -1, 1], "fp16", False, dict(block_n=16, kb=2)),
}


def _interpreted_case(m: int, k: int, slices: list[int], rank: int, slot_ranks: list[int], slots_list: list[int],
                      dtype_name: str, nested: bool, cfg: dict) -> list[float]:
    from sloth_kernels import triton_nf4
    from sloth_kernels.triton_nf4_lora import fusable, launch_config, nf4_lora_matmul

    dtype = DTYPES[dtype_name]
    x, w, a, b, a_clean, b_clean, slots, ranks = make_case(m, k, slices, rank, slot_ranks, slots_list, dtype, nested)
    gemv = triton_nf4.GemvConfig(**cfg, use_prmt=False)
    n = sum(slices)
    assert fusable(x, w, a, slices)
    wide = torch.full((m, n + 7), float("nan"), dtype=dtype)  # out is a column slice: strides count
    nf4_lora_matmul(x, w, a, b, slots, slices, ranks, out=wide[:, 3 : 3 + n], gemv=gemv)
    got = wide[:, 3 : 3 + n]
    base = triton_nf4.nf4_matmul(x, w, gemv=launch_config(m, w, slices, x.device, gemv))  # unfused, same launch
    err, untouched = check_sliced(base, got, x, a_clean, b_clean, slots, slices)
    if all(s < 0 for s in slots_list):
        err = 0.0 if untouched else float("inf")
    outside = bool(torch.isnan(wide[:, :3]).all() and torch.isnan(wide[:, 3 + n :]).all())
    again = nf4_lora_matmul(x, w, a, b, slots, slices, ranks, gemv=gemv)  # the counters were left at zero
    counters_zero = not bool(triton_nf4.arrival_counters(x.device, 1).any())
    return [err, BOUND[dtype], float(untouched and outside and torch.equal(again, got) and counters_zero)]


def _interpreter_main() -> None:
    from sloth_kernels.triton_interp import patch_interpreter

    assert os.environ.get("TRITON_INTERPRET") == "1"
    patch_interpreter()
    results: dict[str, object] = {}
    for i, (name, case) in enumerate(INTERPRETER_CASES.items()):
        torch.manual_seed(5000 + i)
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
def test_fused_kernel_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    result = interpreted[name]
    assert isinstance(result, list), f"{name} raised:\n{result}"
    err, bound, exact = result
    assert err <= bound, f"{name}: relative error of the LoRA delta {err:.3g} > {bound:.1g}"
    assert exact, (f"{name}: rows without an adapter differ from the unfused GEMV, columns outside out changed, "
                   "a second launch differed, or a counter was left non-zero")


# ---- GPU (real sizes) ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("slices", [[4096, 1024, 1024], [4096], [14336, 14336]])
def test_fused_kernel_matches_reference_on_gpu(m: int, slices: list[int]) -> None:
    """8 rank-16 adapters in rank-64 slots, rows round-robin over them and none; rows without one
    equal nf4_matmul bit for bit (given the launch's configuration), the others add the reference's
    delta; a CUDA graph of the launch replays to the same output (the counters reset themselves)."""
    from sloth_kernels.triton_nf4 import nf4_matmul
    from sloth_kernels.triton_nf4_lora import launch_config

    torch.manual_seed(m)
    slot_list = [i % 9 - 1 for i in range(m)] if m > 1 else [3]
    x, w, a, b, a_clean, b_clean, slots, ranks = make_case(m, 4096, slices, 64, [16] * 8, slot_list,
                                                           torch.bfloat16, device="cuda")
    got = nf4_linear_lora(x, w, a, b, slots, slices, ranks)
    base = nf4_matmul(x, w, gemv=launch_config(m, w, slices, x.device))
    err, untouched = check_sliced(base, got, x, a_clean, b_clean, slots, slices)
    # The delta is read back as the difference of two bf16 outputs, each rounded at the base's
    # magnitude (6-8x the delta's here): a correctly rounded kernel (fp32 base + fp32 delta, one
    # rounding) measures 0.014-0.018 this way on CPU, so the bound adds a bf16 step of the base.
    floor = 2**-8 * (base.double().norm() / (got.double() - base.double()).norm()).item()
    assert err <= GPU_BOUND[torch.bfloat16] + floor and untouched, f"relative error {err:.3g}, floor {floor:.3g}"
    graph = torch.cuda.CUDAGraph()
    out = torch.empty_like(got)
    with torch.cuda.graph(graph):
        nf4_linear_lora(x, w, a, b, slots, slices, ranks, out=out)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, got)


if __name__ == "__main__":
    _interpreter_main()
