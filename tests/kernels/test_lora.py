"""Multi-LoRA: the Triton shrink/expand kernels equal the reference, through TRITON_INTERPRET=1 on the
CPU at small odd shapes (one subprocess for the file), and on a GPU at Llama-3-8B shapes (`-m gpu`).
y is a column slice of a wider output, as LoRALinear passes it: columns outside it and tokens
without an adapter must stay untouched."""

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

from sloth_kernels.lora import add_lora, add_lora_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative error of the added delta against float64; the delta is read back through y's dtype.
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}
GPU_BOUND = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}


def make_case(t: int, k: int, n: int, rank: int, num_slots: int, dtype: torch.dtype, device: str = "cpu",
              pad: int = 5) -> tuple[torch.Tensor, ...]:
    x = torch.randn(t, k, dtype=dtype, device=device)
    a = torch.randn(num_slots, rank, k, dtype=dtype, device=device) / k**0.5
    b = torch.randn(num_slots, n, rank, dtype=dtype, device=device) / rank**0.5
    slots = torch.randint(-1, num_slots, (t,), dtype=torch.int32, device=device)
    slots[0] = num_slots - 1  # at least one token with an adapter
    wide = torch.randn(t, n + 2 * pad, dtype=dtype, device=device)
    return x, a, b, slots, wide


def check(wide_before: torch.Tensor, wide_after: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
          slots: torch.Tensor, pad: int = 5) -> tuple[float, bool]:
    """(relative error of the delta vs float64, whether everything else is untouched)."""
    n = b.shape[1]
    want = torch.zeros(x.shape[0], n, dtype=torch.float64, device=x.device)
    on = slots >= 0
    idx = slots.clamp(min=0).long()
    shrunk = torch.einsum("tk,trk->tr", x.double(), a.double()[idx])
    want[on] = torch.einsum("tr,tnr->tn", shrunk, b.double()[idx])[on]
    got = wide_after.double()[:, pad : pad + n] - wide_before.double()[:, pad : pad + n]
    err = ((got - want).norm() / want.norm()).item() if torch.isfinite(got).all() else float("inf")
    untouched = (torch.equal(wide_after[:, :pad], wide_before[:, :pad])
                 and torch.equal(wide_after[:, pad + n :], wide_before[:, pad + n :])
                 and torch.equal(wide_after[~on], wide_before[~on]))
    return err, untouched


def test_reference_adds_each_tokens_adapter_into_a_column_slice() -> None:
    torch.manual_seed(0)
    x, a, b, slots, wide = make_case(9, 48, 20, 4, 3, torch.float32)
    after = wide.clone()
    add_lora_ref(after[:, 5:25], x, a, b, slots)
    err, untouched = check(wide, after, x, a, b, slots)
    assert err < 1e-5 and untouched


def test_cpu_dispatch_is_the_reference_with_or_without_active_slots() -> None:
    torch.manual_seed(1)
    x, a, b, slots, wide = make_case(7, 32, 12, 8, 4, torch.bfloat16)
    one, two = wide.clone(), wide.clone()
    add_lora(one[:, 5:17], x, a, b, slots)
    add_lora(two[:, 5:17], x, a, b, slots, active_slots=sorted(set(slots.tolist())))
    reference = wide.clone()
    add_lora_ref(reference[:, 5:17], x, a, b, slots)
    assert torch.equal(one, reference) and torch.equal(two, reference)



def test_reference_without_active_slots_never_reads_the_slots_on_the_host() -> None:
    """A CUDA graph captures the reference without the step's distinct slots (ranks over the Triton
    kernels' 64): it must not sync (unique / nonzero / tolist), which meta tensors prove here: they
    hold no data, so any read of it raises. The host-listed path does read them."""
    x, a, b, slots, wide = make_case(6, 16, 20, 128, 3, torch.float32, device="meta")
    add_lora(wide[:, 5:25], x, a, b, slots)  # (on no CUDA tensor: the reference)
    add_lora(wide[:, 5:25], x, a.repeat(1, 2, 1), b, slots, slices=[10, 10])  # a fused projection
    with pytest.raises(NotImplementedError):
        add_lora_ref(wide[:, 5:25], x, a, b, slots, active_slots=[0, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_without_active_slots_adds_each_tokens_adapter(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    x, a, b, slots, wide = make_case(11, 40, 18, 128, 4, dtype)
    slots[1] = -1  # a token without an adapter stays untouched
    masked, gathered = wide.clone(), wide.clone()
    add_lora_ref(masked[:, 5:23], x, a, b, slots)
    add_lora_ref(gathered[:, 5:23], x, a, b, slots, active_slots=sorted(set(slots.tolist())))
    err, untouched = check(wide, masked, x, a, b, slots)
    assert err < BOUND[dtype] and untouched
    assert torch.allclose(masked.float(), gathered.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)

# ---- Triton through the interpreter (CPU) -------------------------------------------------------

# name: (tokens T, in K, out N, rank, slots, dtype, kernel options)
INTERPRETER_CASES = {
    "t5_fp32_rank8": (5, 96, 40, 8, 3, "fp32", dict(block_k=32, block_n=16, split=2)),
    "t19_bf16_rank16_ragged_k": (19, 130, 70, 16, 4, "bf16", dict(block_k=32, block_n=32, split=3)),
    "t33_fp16_rank12": (33, 64, 33, 12, 5, "fp16", dict(block_k=64, block_n=16, split=1)),
    "t70_bf16_rank64_two_token_tiles": (70, 80, 24, 64, 2, "bf16", dict(block_k=32, block_n=16, split=2)),
    "t3_fp32_default_split": (3, 200, 50, 16, 8, "fp32", dict()),
}


def make_sliced_case(t: int, k: int, slices: list[int], rank: int, num_slots: int, dtype: torch.dtype,
                     device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """A fused projection's case: A stacked along the rank, B along the output, y the whole output."""
    n = sum(slices)
    x = torch.randn(t, k, dtype=dtype, device=device)
    a = torch.randn(num_slots, len(slices) * rank, k, dtype=dtype, device=device) / k**0.5
    b = torch.randn(num_slots, n, rank, dtype=dtype, device=device) / rank**0.5
    slots = torch.randint(-1, num_slots, (t,), dtype=torch.int32, device=device)
    slots[0] = num_slots - 1
    y = torch.randn(t, n, dtype=dtype, device=device)
    return x, a, b, slots, y


def check_sliced(y0: torch.Tensor, y1: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 slots: torch.Tensor, slices: list[int]) -> tuple[float, bool]:
    """Per slice, the float64 delta of that slice's own A and B; (relative error, others untouched)."""
    rank = a.shape[1] // len(slices)
    on = slots >= 0
    idx = slots.clamp(min=0).long()
    want = torch.zeros(y0.shape, dtype=torch.float64, device=x.device)
    offset = 0
    for i, n in enumerate(slices):
        shrunk = torch.einsum("tk,trk->tr", x.double(), a.double()[idx][:, i * rank : (i + 1) * rank])
        want[:, offset : offset + n] = torch.einsum("tr,tnr->tn", shrunk, b.double()[idx][:, offset : offset + n])
        offset += n
    want[~on] = 0
    got = y1.double() - y0.double()
    err = ((got - want).norm() / want.norm()).item() if torch.isfinite(got).all() else float("inf")
    return err, torch.equal(y1[~on], y0[~on])


def test_sliced_reference_path_equals_slice_by_slice() -> None:
    torch.manual_seed(3)
    slices = [24, 8, 8]
    x, a, b, slots, y = make_sliced_case(6, 40, slices, 4, 3, torch.float32)
    got = add_lora(y.clone(), x, a, b, slots, slices=slices)
    err, untouched = check_sliced(y, got, x, a, b, slots, slices)
    assert err < 1e-5 and untouched


# name: (tokens T, in K, slices, rank, slots, dtype, kernel options): one shrink + one expand
SLICED_CASES = {
    "qkv_t7_bf16_rank8": (7, 96, [64, 16, 16], 8, 3, "bf16", dict(block_k=32, split=2)),
    "gate_up_t21_fp32_rank16": (21, 64, [48, 48], 16, 4, "fp32", dict(block_k=32, block_n=32)),
    "qkv_ragged_last_fp16": (5, 64, [32, 32, 20], 4, 2, "fp16", dict(block_k=64)),
}


# name: (tokens T, in K, slices, slot rank, each slot's adapter rank, dtype, kernel options): slots wider
# than their adapters, with garbage (not zeros) past each adapter's rank: the kernels must not read it.
RANKED_CASES = {
    "qkv_rank16_in_rank64_slots": (9, 96, [64, 16, 16], 64, [16, 0, 64, 8], "fp32", dict(block_k=32, split=2)),
    "one_slice_rank4_in_rank16": (21, 64, [40], 16, [4, 16, 1], "bf16", dict(block_k=32, block_n=16, split=1)),
}


def make_ranked_case(t: int, k: int, slices: list[int], rank: int, slot_ranks: list[int], dtype: torch.dtype,
                     device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """(x, a, b with garbage past each slot's rank, the same a and b with zeros there, slots, y, ranks)."""
    x, a, b, slots, y = make_sliced_case(t, k, slices, rank, len(slot_ranks), dtype, device)
    a_clean, b_clean = a.clone(), b.clone()
    for slot, r in enumerate(slot_ranks):
        for i in range(len(slices)):
            a_clean[slot, i * rank + r : (i + 1) * rank] = 0
        b_clean[slot, :, r:] = 0
    ranks = torch.tensor(slot_ranks, dtype=torch.int32, device=device)
    return x, a, b, a_clean, b_clean, slots, y, ranks


def _interpreter_main() -> None:
    from sloth_kernels.triton_interp import patch_interpreter
    from sloth_kernels.triton_lora import add_lora_triton

    assert os.environ.get("TRITON_INTERPRET") == "1"
    patch_interpreter()
    results: dict[str, object] = {}
    for i, (name, (t, k, n, rank, num_slots, dtype_name, opts)) in enumerate(INTERPRETER_CASES.items()):
        torch.manual_seed(2000 + i)
        try:
            dtype = DTYPES[dtype_name]
            x, a, b, slots, wide = make_case(t, k, n, rank, num_slots, dtype)
            after = wide.clone()
            add_lora_triton(after[:, 5 : 5 + n], x, a, b, slots, **opts)
            err, untouched = check(wide, after, x, a, b, slots)
            results[name] = [err, BOUND[dtype], float(untouched)]
        except Exception:
            results[name] = traceback.format_exc()
    for i, (name, (t, k, slices, rank, num_slots, dtype_name, opts)) in enumerate(SLICED_CASES.items()):
        torch.manual_seed(3000 + i)
        try:
            dtype = DTYPES[dtype_name]
            x, a, b, slots, y = make_sliced_case(t, k, slices, rank, num_slots, dtype)
            after = y.clone()
            add_lora_triton(after, x, a, b, slots, slices=slices, **opts)
            err, untouched = check_sliced(y, after, x, a, b, slots, slices)
            results[name] = [err, BOUND[dtype], float(untouched)]
        except Exception:
            results[name] = traceback.format_exc()
    for i, (name, (t, k, slices, rank, slot_ranks, dtype_name, opts)) in enumerate(RANKED_CASES.items()):
        torch.manual_seed(4000 + i)
        try:
            dtype = DTYPES[dtype_name]
            x, a, b, a_clean, b_clean, slots, y, ranks = make_ranked_case(t, k, slices, rank, slot_ranks, dtype)
            after = y.clone()
            add_lora_triton(after, x, a, b, slots, slices=slices, ranks=ranks, **opts)
            err, untouched = check_sliced(y, after, x, a_clean, b_clean, slots, slices)
            results[name] = [err, BOUND[dtype], float(untouched)]
        except Exception:
            results[name] = traceback.format_exc()
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    pytest.importorskip("triton")
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(INTERPRETER_CASES) + list(SLICED_CASES) + list(RANKED_CASES))
def test_triton_matches_reference_in_interpreter(interpreted: dict[str, object], name: str) -> None:
    result = interpreted[name]
    assert isinstance(result, list), f"{name} raised:\n{result}"
    err, bound, untouched = result
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.1g}"
    assert untouched, f"{name}: changed columns outside y's slice or tokens without an adapter"


# ---- GPU (real sizes) ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("t", "rank", "dtype_name"), [
    (1, 16, "bf16"), (8, 16, "bf16"), (64, 16, "bf16"), (512, 16, "bf16"), (7, 64, "bf16"), (64, 16, "fp16"),
    (64, 16, "fp32"),
])
def test_triton_matches_reference_on_gpu(t: int, rank: int, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(t + rank)
    x, a, b, slots, wide = make_case(t, 4096, 14336, rank, 8, dtype, device="cuda")
    after = wide.clone()
    add_lora(after[:, 5 : 5 + 14336], x, a, b, slots)
    err, untouched = check(wide, after, x, a, b, slots)
    assert err <= GPU_BOUND[dtype] and untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("t", "slices"), [(1, [4096, 1024, 1024]), (64, [4096, 1024, 1024]), (8, [14336, 14336]),
                                           (300, [14336, 14336])])
def test_sliced_triton_matches_reference_on_gpu(t: int, slices: list[int]) -> None:
    torch.manual_seed(t)
    x, a, b, slots, y = make_sliced_case(t, 4096, slices, 16, 8, torch.bfloat16, device="cuda")
    after = add_lora(y.clone(), x, a, b, slots, slices=slices)
    err, untouched = check_sliced(y, after, x, a, b, slots, slices)
    assert err <= GPU_BOUND[torch.bfloat16] and untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("t", "slices"), [(1, [4096, 1024, 1024]), (64, [4096, 1024, 1024]), (64, [14336, 14336]),
                                           (300, [4096])])
def test_ranked_slots_on_gpu_skip_the_padding(t: int, slices: list[int]) -> None:
    torch.manual_seed(t)
    x, a, b, a_clean, b_clean, slots, y, ranks = make_ranked_case(t, 4096, slices, 64, [16, 64, 8, 16, 0, 32, 16, 16],
                                                                   torch.bfloat16, device="cuda")
    after = add_lora(y.clone(), x, a, b, slots, slices=slices, ranks=ranks)
    err, untouched = check_sliced(y, after, x, a_clean, b_clean, slots, slices)
    assert err <= GPU_BOUND[torch.bfloat16] and untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_batch_with_hot_swapped_adapter_on_gpu_gives_merged_and_base_tokens() -> None:
    """The demo model on CUDA (fp32; CUDA graphs and the stacked-slice kernels): in one batch, the
    requests using the adapter get the merged checkpoint's greedy tokens, the others the base's."""
    from sloth_serve import LLM, SamplingParams
    from sloth_serve.loader import DEMO_ADAPTER, DEMO_MERGED, DEMO_MODEL

    kw = dict(load_format="safetensors", num_kv_blocks=256, device="cuda", dtype="float32")
    greedy = SamplingParams(max_tokens=16, temperature=0)
    prompts = ["Return the", "What does `json.dumps` do?", "Create a new", "x", "Explain `os.path.join`."]
    names = ["upper", None, "upper", None, "upper"]
    mixed = LLM(DEMO_MODEL, lora={"upper": str(DEMO_ADAPTER)}, **kw).generate(prompts, greedy, names)
    merged = LLM(DEMO_MERGED, **kw).generate(prompts, greedy)
    base = LLM(DEMO_MODEL, **kw).generate(prompts, greedy)
    for i, name in enumerate(names):
        want = merged[i] if name else base[i]
        assert mixed[i].token_ids == want.token_ids, f"prompt {i} ({name or 'base'})"


if __name__ == "__main__":
    _interpreter_main()
