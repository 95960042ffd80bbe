"""CUDA C++ source of the NF4 GEMV / skinny GEMM (1-64 rows) that sloth_kernels.cuda_nf4 compiles with NVRTC.

Why CUDA and not Triton: decoding NF4 is a table lookup per weight. In registers (the Triton kernel's
`prmt` lookup) it costs ~2.8 integer instructions per weight, which caps the GEMV at about a quarter of
the HBM read rate (bench/results/kernels-nf4.md). Here one shared-memory load decodes two weights: a
256-entry table maps a code byte to its two fp32 code values, replicated 16 times so that the 16 lanes
of a half-warp always hit distinct banks (FLUTE's idea). The pair is scaled by the block's fp32 absmax
and rounded once to bf16/fp16 (`cvt.rn`), so each weight is exactly bitsandbytes' dequantized value,
and the products go through the tensor cores (`mma.m16n8k16`, fp32 accumulation) with the weight as
the 16-row A operand and up to 8 tokens per n-tile as B.

Work split: a CTA owns RS strips of 16 weight rows; its warps split K and add their fp32 partials in a
fixed order through shared memory (deterministic, one launch, no workspace). Lane (g, t) of a warp
(g = lane / 4, t = lane % 4) holds rows g and g + 8 of a strip, and per 128-wide K step the 16 code
bytes [16 t, 16 t + 16) of each row: K is permuted inside the step so that a lane's A pairs are
consecutive bytes of one 128-bit load and its B pairs (x) consecutive words of another; the mma only
needs lanes with the same t to agree on which k they hold.
"""

from __future__ import annotations

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
/* Own vector types and PTX for loads and rounded arithmetic: the source needs no CUDA header. */
struct alignas(16) U4 { u32 x, y, z, w; };
struct alignas(8) F2 { float x, y; };
struct alignas(16) F4 { float x, y, z, w; };

__device__ __forceinline__ U4 ldg128(const void* p) {
    U4 v;
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ float ldg_f32(const float* p) {
    float v; asm("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p)); return v;
}
__device__ __forceinline__ u32 ldg_u32(const void* p) {
    u32 v; asm("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p)); return v;
}
__device__ __forceinline__ float as_float(u32 v) {
    float f; asm("mov.b32 %0, %1;" : "=f"(f) : "r"(v)); return f;
}
__device__ __forceinline__ u32 ldg_u8(const unsigned char* p) {
    u32 v; asm("ld.global.nc.u8 %0, [%1];" : "=r"(v) : "l"(p)); return v;
}
__device__ __forceinline__ float mul_rn(float a, float b) {
    float d; asm("mul.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b)); return d;
}
__device__ __forceinline__ float add_rn(float a, float b) {
    float d; asm("add.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b)); return d;
}
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

#define TABLE_BYTES 32768  /* 256 code bytes x 16 replicas x float2 */

template <int DT> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<0>(float lo, float hi) {
    u32 d; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
template <> __device__ __forceinline__ u32 pack2<1>(float lo, float hi) {
    u32 d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
template <int DT> __device__ __forceinline__ u16 round16(float v);
template <> __device__ __forceinline__ u16 round16<0>(float v) {
    u16 d; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(d) : "f"(v)); return d;
}
template <> __device__ __forceinline__ u16 round16<1>(float v) {
    u16 d; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(d) : "f"(v)); return d;
}
template <int DT> __device__ __forceinline__ float widen16(u16 v);
template <> __device__ __forceinline__ float widen16<0>(u16 v) { return as_float(((u32)v) << 16); }
template <> __device__ __forceinline__ float widen16<1>(u16 v) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
}

template <int DT> __device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                                           u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma16816<0>(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                                        u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<1>(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                                        u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* Byte B (0..3) of a code word as the table's byte offset: byte * 128 + this lane's replica. */
template <int B> __device__ __forceinline__ u32 entry_offset(u32 word, u32 replica) {
    u32 shifted = B == 0 ? (word << 7) : (word >> (8 * B - 7));
    return (shifted & 0x7F80u) | replica;
}

/* Two weights (one code byte) times their block's absmax, rounded once: a 16-bit pair for the mma. */
template <int DT, int B> __device__ __forceinline__ u32 decode_pair(const unsigned char* table, u32 word,
                                                                  u32 replica, float scale) {
    F2 c = *reinterpret_cast<const F2*>(table + entry_offset<B>(word, replica));
    return pack2<DT>(mul_rn(c.x, scale), mul_rn(c.y, scale));
}

__device__ __forceinline__ u32 word_of(const U4& v, int q) {
    return q == 0 ? v.x : (q == 1 ? v.y : (q == 2 ? v.z : v.w));
}

/* DEC 1: a block's 16 scaled values as bf16/fp16 byte tables in 8 registers (t0..3 low bytes, t4..7
   high bytes of entries 0-15), each value code * absmax rounded once, as the reference. */
template <int DT> __device__ __forceinline__ void build_tables(u32 (&tab)[8], const float* codes, float s) {
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        F4 c = reinterpret_cast<const F4*>(codes)[i];  /* entries 4i..4i+3, the same for every lane */
        u32 p0 = pack2<DT>(mul_rn(c.x, s), mul_rn(c.y, s)), p1 = pack2<DT>(mul_rn(c.z, s), mul_rn(c.w, s));
        asm("prmt.b32 %0, %1, %2, 0x6420;" : "=r"(tab[i]) : "r"(p0), "r"(p1));
        asm("prmt.b32 %0, %1, %2, 0x7531;" : "=r"(tab[4 + i]) : "r"(p0), "r"(p1));
    }
}

/* DEC 1: the 4 code bytes of a word as 4 16-bit pairs (element 2b low, 2b + 1 high) looked up in the
   register tables with byte permutes: two `prmt` pick among entries 0-7 and 8-15 by a nibble's low
   3 bits, a third picks between them by bit 3 (kernels/triton_nf4_decode.py does the same). */
#define NF4_LOOKUP(dst, t0, t1, t2, t3, sel, pick) \
    "prmt.b32 lo, " t0 ", " t1 ", " sel ";\n" \
    "prmt.b32 hi, " t2 ", " t3 ", " sel ";\n" \
    "prmt.b32 " dst ", lo, hi, " pick ";\n"
__device__ __forceinline__ void lookup_word(u32 word, const u32 (&t)[8], u32& r0, u32& r1, u32& r2, u32& r3) {
    asm("{\n.reg .b32 s7, s7h, pk, pkh, lo, hi, l0, l1, h0, h1;\n"
        "and.b32 s7, %4, 0x77777777;\n"
        "shr.b32 pk, %4, 1;\n"
        "and.b32 pk, pk, 0x44444444;\n"
        "or.b32 pk, pk, 0x32103210;\n"
        "shr.b32 s7h, s7, 16;\n"
        "shr.b32 pkh, pk, 16;\n"
        NF4_LOOKUP("l0", "%5", "%6", "%7", "%8", "s7", "pk")
        NF4_LOOKUP("l1", "%5", "%6", "%7", "%8", "s7h", "pkh")
        NF4_LOOKUP("h0", "%9", "%10", "%11", "%12", "s7", "pk")
        NF4_LOOKUP("h1", "%9", "%10", "%11", "%12", "s7h", "pkh")
        "prmt.b32 %0, l0, h0, 0x4051;\n"
        "prmt.b32 %1, l0, h0, 0x6273;\n"
        "prmt.b32 %2, l1, h1, 0x4051;\n"
        "prmt.b32 %3, l1, h1, 0x6273;\n}"
        : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
        : "r"(word), "r"(t[0]), "r"(t[1]), "r"(t[2]), "r"(t[3]), "r"(t[4]), "r"(t[5]), "r"(t[6]), "r"(t[7]));
}

/* What one K step of a warp reads, loaded STAGES steps ahead of its use (the loop is latency-bound
   otherwise: the block scale of a step depends on a load). XS: x is staged too (one n-tile). */
template <int RS, int MT, bool XS> struct Stage {
    U4 w[RS][2];
    u32 q[RS][2];      /* nested: the absmax code; plain: the fp32 absmax's bits */
    float a2[RS][2];   /* nested: the state2 absmax of the block's group */
    float off[RS][2];  /* nested with an offset per group: that offset */
    U4 x[XS ? MT : 1][4];
};

struct Args {
    const u16* x; const void* absmax; const float* absmax2; const float* offset;
    int nested, bs_shift, bs2_shift;
};

template <int RS, int MT, bool XS>
__device__ __forceinline__ void load_stage(Stage<RS, MT, XS>& st, int it, const Args& a, const U4* const (&wp)[RS][2],
                                           const u64 (&blk0)[RS][2], const u16* const (&xp)[MT]) {
    #pragma unroll
    for (int r = 0; r < RS; ++r)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            st.w[r][h] = ldg128(wp[r][h] + 4 * it);
            u64 blk = blk0[r][h] + (((u64)it << 7) >> a.bs_shift);
            if (a.nested == 0) {
                st.q[r][h] = ldg_u32(reinterpret_cast<const float*>(a.absmax) + blk);
            } else {
                st.q[r][h] = ldg_u8(reinterpret_cast<const unsigned char*>(a.absmax) + blk);
                u64 grp = blk >> a.bs2_shift;
                st.a2[r][h] = ldg_f32(a.absmax2 + grp);
                if (a.nested == 2) st.off[r][h] = ldg_f32(a.offset + grp);
            }
        }
    if (XS) {
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int q = 0; q < 4; ++q) st.x[XS ? m : 0][q] = ldg128(reinterpret_cast<const U4*>(xp[m] + (it << 7)) + q);
    }
}

template <int DT, int RS, int MT, int DEC, bool XS>
__device__ __forceinline__ void compute_stage(float (&acc)[RS][MT][4], const Stage<RS, MT, XS>& st, int it,
                                              const Args& a, const unsigned char* smem, const float* code2s,
                                              float offset0, u32 replica, const u16* const (&xp)[MT]) {
    float s[RS][2];
    #pragma unroll
    for (int r = 0; r < RS; ++r)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            /* code2[q] * absmax2 + offset with two roundings, as the reference (no FMA contraction) */
            float off = a.nested == 2 ? st.off[r][h] : offset0;
            s[r][h] = a.nested == 0 ? as_float(st.q[r][h])
                                    : add_rn(mul_rn(code2s[st.q[r][h]], st.a2[r][h]), off);
        }
    u32 tab[DEC == 1 ? RS : 1][2][8];
    if constexpr (DEC == 1) {
        #pragma unroll
        for (int r = 0; r < RS; ++r)
            #pragma unroll
            for (int h = 0; h < 2; ++h) build_tables<DT>(tab[r][h], code2s + 256, s[r][h]);
    }
    #pragma unroll
    for (int q = 0; q < 4; ++q) {
        U4 xv[MT];
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            xv[m] = XS ? st.x[XS ? m : 0][q] : ldg128(reinterpret_cast<const U4*>(xp[m] + (it << 7)) + q);
        #pragma unroll
        for (int r = 0; r < RS; ++r) {
            u32 w0 = word_of(st.w[r][0], q), w1 = word_of(st.w[r][1], q);
            /* mma j = 2q: bytes 0, 1 of word q; j = 2q + 1: bytes 2, 3. */
            u32 a0, a1, a2, a3, b0, b1, b2, b3;
            if constexpr (DEC == 1) {
                lookup_word(w0, tab[r][0], a0, a2, b0, b2);
                lookup_word(w1, tab[r][1], a1, a3, b1, b3);
            } else {
                a0 = decode_pair<DT, 0>(smem, w0, replica, s[r][0]);
                a1 = decode_pair<DT, 0>(smem, w1, replica, s[r][1]);
                a2 = decode_pair<DT, 1>(smem, w0, replica, s[r][0]);
                a3 = decode_pair<DT, 1>(smem, w1, replica, s[r][1]);
                b0 = decode_pair<DT, 2>(smem, w0, replica, s[r][0]);
                b1 = decode_pair<DT, 2>(smem, w1, replica, s[r][1]);
                b2 = decode_pair<DT, 3>(smem, w0, replica, s[r][0]);
                b3 = decode_pair<DT, 3>(smem, w1, replica, s[r][1]);
            }
            #pragma unroll
            for (int m = 0; m < MT; ++m) mma16816<DT>(acc[r][m], a0, a1, a2, a3, xv[m].x, xv[m].y);
            #pragma unroll
            for (int m = 0; m < MT; ++m) mma16816<DT>(acc[r][m], b0, b1, b2, b3, xv[m].z, xv[m].w);
        }
    }
}

template <int DT, int RS, int MT, int DEC>
__global__ void __launch_bounds__(DEC == 1 ? 256 : 512) nf4_gemv(
    const u16* __restrict__ x, const unsigned char* __restrict__ w, const void* __restrict__ absmax,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ offset,
    const float* __restrict__ code, const u16* __restrict__ bias, u16* __restrict__ out,
    int M, int N, int K, int stride_xm, int stride_om, int nested, int bs_shift, int bs2_shift, int has_bias,
    int row_warps) {
    constexpr bool XS = MT == 1 && DEC == 0;
    extern __shared__ U4 smem_u4[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(smem_u4);
    float* code2s = reinterpret_cast<float*>(smem + TABLE_BYTES);
    /* warp = (K slice kw_i, strip group wr): the row_warps warps of a K slice read the same x (L1 hits). */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kw = (blockDim.x >> 5) / row_warps;
    const int wr = warp % row_warps, kw_i = warp / row_warps;
    const int g = lane >> 2, t = lane & 3;
    const u32 replica = (lane & 15) * 8;
    const int row0 = (blockIdx.x * row_warps + wr) * 16 * RS;
    const int iters = K >> 7;  /* 128 k (64 code bytes of a row) per step */
    const int it0 = (int)((long long)kw_i * iters / kw), it1 = (int)((long long)(kw_i + 1) * iters / kw);
    const u64 row_bytes = (u64)(K >> 1);
    const Args a{x, absmax, absmax2, offset, nested, bs_shift, bs2_shift};

    const U4* wp[RS][2];
    u64 blk0[RS][2];
    #pragma unroll
    for (int r = 0; r < RS; ++r)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            int row = imin(row0 + r * 16 + g + 8 * h, N - 1);
            wp[r][h] = reinterpret_cast<const U4*>(w + (u64)row * row_bytes) + t;
            blk0[r][h] = ((u64)row * (u64)K + 32 * t) >> bs_shift;
        }
    const u16* xp[MT];
    #pragma unroll
    for (int m = 0; m < MT; ++m) xp[m] = x + (u64)imin(m * 8 + g, M - 1) * stride_xm + 32 * t;

    /* The first two steps' loads go out before the table is built, so they are in flight meanwhile.
       Past the warp's last step the loads repeat it (cached, never used): no branch in the loop. */
    const int last = it1 > it0 ? it1 - 1 : it0;
    Stage<RS, MT, XS> s0, s1;
    if (it0 < it1) {
        load_stage(s0, it0, a, wp, blk0, xp);
        load_stage(s1, imin(it0 + 1, last), a, wp, blk0, xp);
    }
    for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) {  /* a float4 = two replicas of an entry */
        int e = i >> 3;
        float hi = ldg_f32(code + (e >> 4)), lo = ldg_f32(code + (e & 15));
        reinterpret_cast<F4*>(smem)[i] = F4{hi, lo, hi, lo};
    }
    if (nested)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) code2s[i] = ldg_f32(code2 + i);
    if (threadIdx.x < 16) code2s[256 + threadIdx.x] = ldg_f32(code + threadIdx.x);  /* DEC 1 */
    const float offset0 = nested == 1 ? ldg_f32(offset) : 0.f;
    __syncthreads();

    float acc[RS][MT][4];
    #pragma unroll
    for (int r = 0; r < RS; ++r)
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][m][i] = 0.f;

    for (int it = it0; it < it1; it += 2) {
        Stage<RS, MT, XS> s2;
        load_stage(s2, imin(it + 2, last), a, wp, blk0, xp);
        compute_stage<DT, RS, MT, DEC>(acc, s0, it, a, smem, code2s, offset0, replica, xp);
        Stage<RS, MT, XS> s3;
        load_stage(s3, imin(it + 3, last), a, wp, blk0, xp);
        if (it + 1 < it1) compute_stage<DT, RS, MT, DEC>(acc, s1, it + 1, a, smem, code2s, offset0, replica, xp);
        s0 = s2;
        s1 = s3;
    }

    /* The warps' partials, summed in warp order (deterministic) through the table's shared memory. */
    __syncthreads();
    F4* red = reinterpret_cast<F4*>(smem);
    #pragma unroll
    for (int r = 0; r < RS; ++r)
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            red[((warp * RS + r) * MT + m) * 32 + lane] =
                F4{acc[r][m][0], acc[r][m][1], acc[r][m][2], acc[r][m][3]};
    __syncthreads();
    const float* redf = reinterpret_cast<const float*>(smem);
    const int per_warp = RS * MT * 128, per_slice = per_warp * row_warps;
    const int cta_row0 = blockIdx.x * row_warps * 16 * RS;
    for (int e = threadIdx.x; e < per_slice; e += blockDim.x) {
        float sum = 0.f;
        for (int k = 0; k < kw; ++k) sum += redf[k * per_slice + e];
        int i = e & 3, ln = (e >> 2) & 31, m = (e >> 7) % MT, r = ((e >> 7) / MT) % RS, er = e / per_warp;
        int row = cta_row0 + (er * RS + r) * 16 + (ln >> 2) + 8 * (i >> 1);
        int tok = m * 8 + 2 * (ln & 3) + (i & 1);
        if (row < N && tok < M) {
            if (has_bias) sum += widen16<DT>(bias[row]);
            out[(u64)tok * stride_om + row] = round16<DT>(sum);
        }
    }
}
"""
