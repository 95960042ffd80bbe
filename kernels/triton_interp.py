"""Running the Triton kernels under TRITON_INTERPRET=1 (CPU tests). Triton 3.6's interpreter stores
bfloat16 as raw uint16 and its `tl.dot` multiplies those bits as integers, and it rounds fp32 to
bf16 by truncation; `patch_interpreter` makes the dot widen bf16 operands to fp32 first (as it
already does for fp8) and rounds to nearest even, as the GPU does. Call it in a process that set
TRITON_INTERPRET=1 before importing triton; compiled kernels are unaffected."""

from __future__ import annotations

import numpy as np


def patch_interpreter() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_sloth_bf16_dot", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            widen = interpreter._convert_float
            a = interpreter.TensorHandle(widen(a.data, a.dtype.scalar, tl.float32, None).view(np.float32),
                                         tl.float32)
            b = interpreter.TensorHandle(widen(b.data, b.dtype.scalar, tl.float32, None).view(np.float32),
                                         tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    def to_bf16_rne(data: np.ndarray) -> np.ndarray:
        import torch

        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16).view(
            torch.int16).numpy().view(np.uint16)

    original_cast = builder.cast_impl
    original_fp_to_fp = builder.create_fp_to_fp

    def cast_impl(self, src, dst_type):  # type: ignore[no-untyped-def]
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar.is_floating() and src.dtype.scalar != tl.bfloat16:
            return interpreter.TensorHandle(to_bf16_rne(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):  # type: ignore[no-untyped-def]
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float16):
            return interpreter.TensorHandle(to_bf16_rne(src.data), tl.bfloat16)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    builder._sloth_bf16_dot = True
