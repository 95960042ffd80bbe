"""A dynamic 4-bit checkpoint leaves some projections in 16-bit, also inside what the engine fuses
(q|k|v, gate|up). Such a mixed layer can run part by part (4-bit parts through the NF4 kernels,
16-bit parts through cuBLAS) or have its 4-bit parts dequantized at load into one 16-bit weight.
This times both (the engine serves dense: LoRALinear.settle), beside the all-4-bit fused layer, on the Llama-3-8B shapes (CUDA only).

    python bench/quant_layouts.py --rows 1,8,64,512 --out results.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.common import write_json
from sloth_kernels.nf4 import nf4_linear, quantize_nf4_ref
from sloth_kernels.nf4_format import NF4Weight
from sloth_serve.models.layers import LoRALinear

# (name, in_features, out slices, which slices stay 16-bit)
LAYERS = [
    ("qkv, q in 16-bit", 4096, [4096, 1024, 1024], [0]),
    ("qkv, v in 16-bit", 4096, [4096, 1024, 1024], [2]),
    ("gate|up, up in 16-bit", 4096, [14336, 14336], [1]),
]


class PartWise(torch.nn.Module):
    """The mixed layer computed part by part: each 4-bit slice through the NF4 kernels into its
    columns of the output, each 16-bit slice through cuBLAS then copied in (what the engine did
    before this measurement chose dense)."""

    def __init__(self, layer: LoRALinear, parts: list[torch.Tensor | NF4Weight]) -> None:
        super().__init__()
        self.in_features, self.out_slices, self.parts = layer.in_features, layer.out_slices, parts

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_empty(x.shape[0], sum(self.out_slices))
        start = 0
        for part, n in zip(self.parts, self.out_slices, strict=True):
            if isinstance(part, torch.Tensor):
                y[:, start : start + n] = torch.nn.functional.linear(x, part)
            else:
                nf4_linear(x, part, out=y[:, start : start + n])
            start += n
        return y


def build(in_features: int, slices: list[int], dense: list[int], mode: str) -> LoRALinear | PartWise:
    """mode: "nf4" (every slice 4-bit, fused), "mixed" (part by part) or "dense" (one 16-bit weight
    holding the 4-bit slices dequantized: LoRALinear.settle, what the engine serves)."""
    layer = LoRALinear(in_features, slices)
    full = torch.randn(sum(slices), in_features, device="cuda", dtype=torch.bfloat16) * 0.02
    layer.weight = torch.nn.Parameter(full, requires_grad=False)
    parts: list[torch.Tensor | NF4Weight] = []
    start = 0
    for i, n in enumerate(slices):
        if mode == "nf4" or i not in dense:
            parts.append(quantize_nf4_ref(full[start : start + n]))
            layer.set_quantized(i, parts[-1])
        else:
            parts.append(full[start : start + n].clone())
        start += n
    if mode == "nf4":
        layer.fuse_quantized()
        return layer
    if mode == "mixed":
        return PartWise(layer, parts)
    assert layer.settle()
    return layer


def time_ms(layer: LoRALinear | PartWise, rows: int, iters: int = 100) -> float:
    x = torch.randn(rows, layer.in_features, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        layer.base_forward(x)
    graph = torch.cuda.CUDAGraph()  # decode steps replay graphs: time launches as the engine makes them
    with torch.cuda.graph(graph):
        for _ in range(10):
            layer.base_forward(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(iters // 10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,64,512")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"{'layer':<24} {'rows':>5} {'all 4-bit':>10} {'mixed':>10} {'dense':>10}  (ms a call, {torch.cuda.get_device_name()})")
    for name, k, slices, dense in LAYERS:
        layers = {mode: build(k, slices, dense, mode) for mode in ("nf4", "mixed", "dense")}
        x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
        ref = layers["dense"].base_forward(x).float()
        err = (layers["mixed"].base_forward(x).float() - ref).abs().max().item()
        for r in rows:
            t = {mode: time_ms(layer, r) for mode, layer in layers.items()}
            results.append({"layer": name, "rows": r, **t, "mixed_vs_dense_max_abs_diff": err})
            print(f"{name:<24} {r:>5} {t['nf4']:>10.4f} {t['mixed']:>10.4f} {t['dense']:>10.4f}")
        del layers
        torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
