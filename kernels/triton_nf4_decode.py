"""Turning packed NF4 words into code-book values inside a Triton kernel, two ways: a gather from a
16-entry table (portable; runs under TRITON_INTERPRET) and a PTX byte-permute (`prmt`) lookup that
keeps the table in registers (CUDA only; about 2.75 integer instructions per value and no memory
traffic). Both return the 8 values of each int32 word in k order: byte b of a word holds elements
2b (high nibble) and 2b+1 (low nibble), as bitsandbytes packs them."""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from .nf4_format import NF4_CODE

# One lookup of 4 nibbles from a 16-byte table held in 4 registers (t0..t3 = entries 0-3, ..., 12-15):
# two `prmt` pick from entries 0-7 and 8-15 by the nibble's low 3 bits, a third picks between them
# by bit 3 (llama.cpp's get_int_from_table_16 does the same for int8 tables).
_LOOKUP = """
    prmt.b32 lo, {t0}, {t1}, {sel};
    prmt.b32 hi, {t2}, {t3}, {sel};
    prmt.b32 {dst}, lo, hi, {pick};"""


def _asm(scaled: bool, dtype: str = "bf16", fp32_out: bool = False) -> str:
    body = [
        "{",
        ".reg .b32 s7, s7h, pk, pkh, lo, hi, l0, l1, h0, h1, r0, r1, r2, r3;",
        "and.b32 s7, $8, 0x77777777;",  # low 3 bits of each nibble: the byte to take
        "shr.b32 pk, $8, 1;",
        "and.b32 pk, pk, 0x44444444;",  # bit 3 of each nibble, moved to bit 2: take from `hi`
        "or.b32 pk, pk, 0x32103210;",
        "shr.b32 s7h, s7, 16;",
        "shr.b32 pkh, pk, 16;",
    ]
    lo_t = ("$9", "$10", "$11", "$12")
    hi_t = ("$13", "$14", "$15", "$16")
    for dst, tab, sel, pick in (("l0", lo_t, "s7", "pk"), ("l1", lo_t, "s7h", "pkh"),
                                ("h0", hi_t, "s7", "pk"), ("h1", hi_t, "s7h", "pkh")):
        body.append(_LOOKUP.format(t0=tab[0], t1=tab[1], t2=tab[2], t3=tab[3], sel=sel, pick=pick, dst=dst))
    # Nibble i of the word is element i ^ 1; gather (low byte, high byte) of elements in order.
    body += [
        "prmt.b32 r0, l0, h0, 0x4051;",
        "prmt.b32 r1, l0, h0, 0x6273;",
        "prmt.b32 r2, l1, h1, 0x4051;",
        "prmt.b32 r3, l1, h1, 0x6273;",
    ]
    if scaled:  # times the block's absmax, rounded to 16 bits ($17 holds it twice)
        body += [f"mul.rn.{dtype}x2 r{i}, r{i}, $17;" for i in range(4)]
    if fp32_out:  # bf16 pairs -> fp32 bits: the low half moves up (an integer multiply: FMA pipe)
        for i in range(4):
            body += [f"mul.lo.u32 $%d, r{i}, 65536;" % (2 * i), f"and.b32 $%d, r{i}, 0xffff0000;" % (2 * i + 1)]
        body.append("}")
        return "\n".join(body)
    body += [
        "mov.b32 {$0, $1}, r0;",
        "mov.b32 {$2, $3}, r1;",
        "mov.b32 {$4, $5}, r2;",
        "mov.b32 {$6, $7}, r3;",
        "}",
    ]
    return "\n".join(body)


NF4_PRMT_ASM = tl.constexpr(_asm(False))
NF4_PRMT_SCALED_ASM = {"bf16": tl.constexpr(_asm(True, "bf16")), "f16": tl.constexpr(_asm(True, "f16"))}
NF4_PRMT_SCALED_BF16 = NF4_PRMT_SCALED_ASM["bf16"]
NF4_PRMT_FP32_ASM = tl.constexpr(_asm(False, fp32_out=True))
NF4_PRMT_SCALED_F16 = NF4_PRMT_SCALED_ASM["f16"]


@functools.cache
def prmt_tables(dtype: torch.dtype) -> tuple[int, ...]:
    """The 8 int32 words (low bytes of entries 0-15, then high bytes) that NF4_PRMT_ASM reads."""
    bits = torch.tensor(NF4_CODE, dtype=torch.float32).to(dtype).view(torch.int16).tolist()
    lo = bytes(b & 0xFF for b in bits)
    hi = bytes((b >> 8) & 0xFF for b in bits)
    return tuple(struct.unpack("<i", chunk[i : i + 4])[0] for chunk in (lo, hi) for i in range(0, 16, 4))


@triton.jit
def decode_gather_3d(words, code_ptr):
    """[R, B, W] int32 -> [R, B, W * 8] values of the table at code_ptr."""
    e = tl.arange(0, 8)
    shifts = (e // 2) * 8 + (1 - e % 2) * 4
    nib = (words[:, :, :, None] >> shifts[None, None, None, :]) & 0xF
    nib = tl.reshape(nib, (words.shape[0], words.shape[1], words.shape[2] * 8))
    return tl.load(code_ptr + nib)


@triton.jit
def decode_gather(words, code_ptr):
    """[R, W] int32 -> [R, W * 8] values of the table at code_ptr (its dtype)."""
    e = tl.arange(0, 8)
    shifts = (e // 2) * 8 + (1 - e % 2) * 4
    nib = (words[:, :, None] >> shifts[None, None, :]) & 0xF
    nib = tl.reshape(nib, (words.shape[0], words.shape[1] * 8))
    return tl.load(code_ptr + nib)


@triton.jit
def decode_prmt(words, t0, t1, t2, t3, t4, t5, t6, t7, DTYPE: tl.constexpr):
    """[R, W] int32 -> [R, W * 8] NF4 codes in DTYPE (bf16 or fp16), tables t0..t7 from prmt_tables."""
    z = tl.zeros_like(words)
    e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
        NF4_PRMT_ASM,
        "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
        [words, z + t0, z + t1, z + t2, z + t3, z + t4, z + t5, z + t6, z + t7],
        dtype=(tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16),
        is_pure=True,
        pack=1,
    )
    # tl.join stacks along a new last dimension, so the outermost join picks the lowest index bit:
    # flattening [.., t, u, v] gives element 4t + 2u + v, i.e. e0..e7 in order.
    v = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)), tl.join(tl.join(e1, e5), tl.join(e3, e7)))
    return tl.reshape(v, (words.shape[0], words.shape[1] * 8)).to(DTYPE, bitcast=True)


@triton.jit
def decode_prmt_scaled(words, scale2, t0, t1, t2, t3, t4, t5, t6, t7, DTYPE: tl.constexpr):
    """Like decode_prmt, times a per-word scale: scale2 [R, W] int32 holds that scale as a DTYPE
    pair (both halves equal); the product is one packed 16-bit multiply per two values."""
    z = tl.zeros_like(words)
    args = [words, z + t0, z + t1, z + t2, z + t3, z + t4, z + t5, z + t6, z + t7, scale2]
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is a parameter, not a constant)
        e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
            NF4_PRMT_SCALED_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r,r", args,
            dtype=(tl.int16,) * 8, is_pure=True, pack=1)
    else:
        e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
            NF4_PRMT_SCALED_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r,r", args,
            dtype=(tl.int16,) * 8, is_pure=True, pack=1)
    v = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)), tl.join(tl.join(e1, e5), tl.join(e3, e7)))
    return tl.reshape(v, (words.shape[0], words.shape[1] * 8)).to(DTYPE, bitcast=True)


@triton.jit
def decode_prmt_fp32(words, t0, t1, t2, t3, t4, t5, t6, t7):
    """[R, B, W] int32 -> [R, B, W * 8] NF4 codes as fp32 (bf16-rounded values; tables from
    prmt_tables(torch.bfloat16)), for the CUDA-core GEMV that multiplies in fp32."""
    z = tl.zeros_like(words)
    e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
        NF4_PRMT_FP32_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
        [words, z + t0, z + t1, z + t2, z + t3, z + t4, z + t5, z + t6, z + t7],
        dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    v = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)), tl.join(tl.join(e1, e5), tl.join(e3, e7)))
    return tl.reshape(v, (words.shape[0], words.shape[1], words.shape[2] * 8)).to(tl.float32, bitcast=True)


def emulate_prmt_asm(word: int, tables: tuple[int, ...], scale2: int | None = None, dtype: str = "bf16",
                     fp32_out: bool = False) -> list[int]:
    """Run NF4_PRMT_ASM (or, given scale2, the scaled variant) on one word in Python: a tiny
    interpreter of the instructions they use, so a CPU test checks the byte logic that only a GPU
    can execute. Returns the 8 16-bit results."""
    asm = NF4_PRMT_ASM.value if scale2 is None else NF4_PRMT_SCALED_ASM[dtype].value
    if fp32_out:
        asm = NF4_PRMT_FP32_ASM.value
    regs: dict[str, int] = {"$8": word & 0xFFFFFFFF, "$17": (scale2 or 0) & 0xFFFFFFFF}
    regs.update({f"${9 + i}": t & 0xFFFFFFFF for i, t in enumerate(tables)})
    outs: dict[str, int] = {}

    def val(tok: str) -> int:
        return int(tok, 16) if tok.startswith("0x") else regs[tok]

    def prmt(a: int, b: int, sel: int) -> int:
        src = (b << 32) | a
        res = 0
        for i in range(4):
            nib = (sel >> (4 * i)) & 0xF
            byte = (src >> (8 * (nib & 7))) & 0xFF
            if nib & 8:
                byte = 0xFF if byte & 0x80 else 0
            res |= byte << (8 * i)
        return res

    def mul16x2(a: int, b: int, kind: str) -> int:
        tdtype = torch.bfloat16 if kind == "bf16x2" else torch.float16
        halves = torch.tensor([a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16], dtype=torch.int32).to(torch.int16)
        f = halves.view(tdtype).float()
        prod = (f[:2] * f[2:]).to(tdtype).view(torch.int16).int().tolist()  # exact product, one rounding
        return (prod[0] & 0xFFFF) | ((prod[1] & 0xFFFF) << 16)

    for line in asm.replace("\n", " ").split(";"):
        parts = line.replace(",", " ").replace("{", " ").replace("}", " ").split()
        if not parts or parts[0] == ".reg":
            continue
        op, args = parts[0], parts[1:]
        if op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "or.b32":
            regs[args[0]] = val(args[1]) | val(args[2])
        elif op == "shr.b32":
            regs[args[0]] = val(args[1]) >> int(args[2])
        elif op == "prmt.b32":
            regs[args[0]] = prmt(val(args[1]), val(args[2]), val(args[3]))
        elif op.startswith("mul.rn."):
            regs[args[0]] = mul16x2(val(args[1]), val(args[2]), op.split(".")[-1])
        elif op == "mul.lo.u32":
            outs[args[0]] = (val(args[1]) * int(args[2])) & 0xFFFFFFFF
        elif op == "mov.b32":
            outs[args[0]], outs[args[1]] = val(args[2]) & 0xFFFF, val(args[2]) >> 16
        else:
            raise AssertionError(f"emulator does not know {op}")
        if op == "and.b32" and args[0].startswith("$"):
            outs[args[0]] = regs.pop(args[0])
    return [outs[f"${i}"] for i in range(8)]
