"""--fused-lora: the demo model with every projection in NF4, its adapter's requests beside the base's
in one continuous batch; the greedy tokens with the LoRA computed inside the NF4 kernel equal those
of the product and add_lora apart. On the CPU the fused kernel runs through TRITON_INTERPRET=1 (one
subprocess for the file), for layers whose slices are quantized apart (a launch per slice) and for
q|k|v and gate|up joined into one NF4 weight (one launch per projection, as on CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from sloth_serve.config import Config
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.loras import load_adapter
from sloth_serve.engine.sampling_params import SamplingParams
from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL
from sloth_serve.models.layers import LoRALinear, fuse_quantized_projections

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 99, 200, 3, 44, 81], list(range(20, 41))]
PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def quantize_layers(model: torch.nn.Module, join: bool) -> int:
    """Every LoRALinear's slices to NF4 (bitsandbytes' quantization, nested statistics); `join`:
    q|k|v and gate|up then become one NF4 weight each. Returns how many layers were quantized."""
    from sloth_kernels.nf4 import quantize_nf4_ref

    count = 0
    for layer in model.modules():
        if isinstance(layer, LoRALinear) and layer.weight is not None:
            weight, offset = layer.weight.data, 0
            for i, n in enumerate(layer.out_slices):
                layer.set_quantized(i, quantize_nf4_ref(weight[offset : offset + n].clone()))
                offset += n
            count += 1
    if join:
        assert fuse_quantized_projections(model) > 0
    return count


def engine_tokens(fused: bool, join: bool) -> tuple[dict[str, list[int]], int]:
    """Greedy tokens of every prompt with the adapter and without (requests arriving a step apart,
    prompts prefilled in chunks beside decodes), and how many fused launches ran."""
    from sloth_kernels import triton_nf4_lora

    engine = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", device="cpu", dtype="float32",
                              num_kv_blocks=64, block_size=8, max_num_batched_tokens=16, max_loras=2,
                              fused_lora=fused))
    assert quantize_layers(engine.runner.model, join) > 0
    engine.add_lora(1, load_adapter(engine, "upper", DEMO_ADAPTER))
    launches = 0
    run = triton_nf4_lora.nf4_lora_matmul

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        nonlocal launches
        launches += 1
        return run(*args, **kwargs)  # type: ignore[arg-type]

    triton_nf4_lora.nf4_lora_matmul = counted  # type: ignore[assignment]
    try:
        got: dict[str, list[int]] = {}
        step = 0
        while step < len(PROMPTS) or engine.has_unfinished_requests:
            if step < len(PROMPTS):
                engine.add_request(f"base{step}", PROMPTS[step], PARAMS)
                engine.add_request(f"lora{step}", PROMPTS[step], PARAMS, adapter_id=1)
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
            step += 1
    finally:
        triton_nf4_lora.nf4_lora_matmul = run  # type: ignore[assignment]
    return got, launches


def _interpreter_main() -> None:
    from sloth_kernels.triton_interp import patch_interpreter

    assert os.environ.get("TRITON_INTERPRET") == "1"
    patch_interpreter()
    results: dict[str, object] = {}
    for name, fused, join in (("apart", False, False), ("fused_slices", True, False), ("fused_joined", True, True)):
        try:
            results[name] = engine_tokens(fused, join)
        except Exception:
            results[name] = traceback.format_exc()
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.mark.parametrize("name", ["fused_slices", "fused_joined"])
def test_fused_lora_gives_the_unfused_greedy_tokens(interpreted: dict[str, object], name: str) -> None:
    apart, fused = interpreted["apart"], interpreted[name]
    assert isinstance(apart, list), f"the unfused run raised:\n{apart}"
    assert isinstance(fused, list), f"{name} raised:\n{fused}"
    (want, apart_launches), (got, launches) = apart, fused
    assert apart_launches == 0 and launches > 0  # the flag, and only the flag, runs the fused kernel
    assert any(want[f"lora{i}"] != want[f"base{i}"] for i in range(len(PROMPTS)))  # the adapter matters
    assert got == want


if __name__ == "__main__":
    _interpreter_main()
