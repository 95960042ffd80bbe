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

from kernels.lora import add_lora, add_lora_ref  # noqa: E402

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


# ---- Triton through the interpreter (CPU) -------------------------------------------------------

# name: (tokens T, in K, out N, rank, slots, dtype, kernel options)
INTERPRETER_CASES = {
    "t5_fp32_rank8": (5, 96, 40, 8, 3, "fp32", dict(block_k=32, block_n=16, split=2)),
    "t19_bf16_rank16_ragged_k": (19, 130, 70, 16, 4, "bf16", dict(block_k=32, block_n=32, split=3)),
    "t33_fp16_rank12": (33, 64, 33, 12, 5, "fp16", dict(block_k=64, block_n=16, split=1)),
    "t70_bf16_rank64_two_token_tiles": (70, 80, 24, 64, 2, "bf16", dict(block_k=32, block_n=16, split=2)),
    "t3_fp32_default_split": (3, 200, 50, 16, 8, "fp32", dict()),
}


def _interpreter_main() -> None:
    from kernels.triton_interp import patch_interpreter
    from kernels.triton_lora import add_lora_triton

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


if __name__ == "__main__":
    _interpreter_main()
