// storage.cuh: the formats that mixed-precision arrays are stored in (issue 12), float32 <-> bf16 / fp16 by
// hand, so that no kernel needs cuda_bf16.h / cuda_fp16.h (NVRTC does not find them without CuPy's include path).
//
//   StoreF32    float32                       (fp32/tf32 models' A and δ, every Z, the output layer's A)
//   StoreBf16   bfloat16 as raw bits, `unsigned short`: 1 sign, 8 exponent, 7 mantissa bits
//   StoreFp16   IEEE binary16 as raw bits, `unsigned short`: 1 sign, 5 exponent, 10 mantissa bits
// Each has encode (float -> stored, round to nearest, ties to even, as gpubp/precision.py's round_operand)
// and decode (stored -> float, exact).
//
// encode, as the reference (ml_dtypes.bfloat16 / numpy float16 casts) rounds:
//   - RNE; a finite value half an ulp or more past the largest finite one becomes ±inf (fp16: 65520 -> inf);
//   - inf stays inf; NaN becomes a quiet NaN of the same sign (bf16: the top payload bits kept; fp16: 0x7FFF
//     or 0xFFFF, as the hardware's canonical NaN; tests compare NaN as NaN, not by payload);
//   - fp16 subnormals (below 2^-14) are rounded to their 2^-24 grid (bf16 shares float32's range).
// On the GPU, encode is one instruction (PTX ISA 9.0, "Data movement and conversion instructions: cvt":
// cvt.rn.bf16.f32 from sm_80, cvt.rn.f16.f32 on every arch; decode: cvt.f32.f16, and a shift for bf16).
// The CPU emulation (tests/cuda_emulation) has no PTX: it runs the integer versions below, which are RNE
// too (test_cupy_tc_emulated.py checks them bit for bit against numpy on every exponent, ties and edges).
//
// float_bits / float_from_bits (a float's bit pattern and back) live here too; the emulation's
// tensor_core_cpu.h defines its own (GPUBP_TENSOR_CORE_EMULATED).
#ifndef GPUBP_STORAGE_CUH
#define GPUBP_STORAGE_CUH

#ifndef GPUBP_TENSOR_CORE_EMULATED
__device__ __forceinline__ unsigned float_bits(float x) { return __float_as_uint(x); }
__device__ __forceinline__ float float_from_bits(unsigned u) { return __uint_as_float(u); }
#endif

// ---- integer RNE conversions (what the emulation runs; the GPU uses cvt where it has it) ------------------
__device__ __forceinline__ unsigned short bf16_bits_rne(float x) {
    const unsigned u = float_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);   // NaN: quiet
    // add 0x7FFF plus the kept lowest bit, drop the low 16 bits: RNE (a carry into the exponent is right,
    // and out of the largest finite exponent gives inf's bit pattern)
    return static_cast<unsigned short>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ unsigned short fp16_bits_rne(float x) {
    const unsigned u = float_bits(x);
    const unsigned sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return static_cast<unsigned short>(sign | 0x7FFFu);         // NaN
    if (a >= 0x477FF000u) return static_cast<unsigned short>(sign | 0x7C00u);        // >= 65520 (or inf): inf
    if (a >= 0x38800000u) {                                                          // >= 2^-14: normal
        // rebias the exponent (127 -> 15: minus 112 << 10 in the shifted pattern), RNE at bit 13
        const unsigned r = a + 0xFFFu + ((a >> 13) & 1u);
        return static_cast<unsigned short>(sign | ((r >> 13) - (112u << 10)));
    }
    // below 2^-14: the subnormal grid 2^-24, value = m·2^(e-150) with the implicit bit in m
    const int e = static_cast<int>(a >> 23);
    if (e < 102) return static_cast<unsigned short>(sign);                          // < 2^-25: rounds to 0
    const unsigned m = (a & 0x007FFFFFu) | 0x00800000u;
    const int shift = 126 - e;                                                       // 14 .. 24
    const unsigned q = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    // a carry out of the subnormals (q = 0x400) is the smallest normal's bit pattern: right as it is
    return static_cast<unsigned short>(sign | (q + (rest > half || (rest == half && (q & 1u)))));
}

__device__ __forceinline__ float fp16_bits_value(unsigned short h) {
    const unsigned sign = (static_cast<unsigned>(h) & 0x8000u) << 16;
    const unsigned e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 31) return float_from_bits(sign | 0x7F800000u | (m << 13));            // inf, NaN
    if (e == 0) {                                                                    // 0, subnormal: m·2^-24
        const float v = static_cast<float>(m) * 5.9604644775390625e-8f;             // exact
        return sign ? -v : v;
    }
    return float_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

// ---- the formats -----------------------------------------------------------------------------------------
struct StoreF32 {
    typedef float Bits;
    __device__ __forceinline__ static float encode(float x) { return x; }
    __device__ __forceinline__ static float decode(float x) { return x; }
};

struct StoreBf16 {
    typedef unsigned short Bits;
    __device__ __forceinline__ static unsigned short encode(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        unsigned short r;
        asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
        return r;
#else
        return bf16_bits_rne(x);
#endif
    }
    __device__ __forceinline__ static float decode(unsigned short h) {
        return float_from_bits(static_cast<unsigned>(h) << 16);
    }
};

struct StoreFp16 {
    typedef unsigned short Bits;
    __device__ __forceinline__ static unsigned short encode(float x) {
#if defined(__CUDA_ARCH__)
        unsigned short r;
        asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
        return r;
#else
        return fp16_bits_rne(x);
#endif
    }
    __device__ __forceinline__ static float decode(unsigned short h) {
#if defined(__CUDA_ARCH__)
        float r;
        asm("cvt.f32.f16 %0, %1;\n" : "=f"(r) : "h"(h));
        return r;
#else
        return fp16_bits_value(h);
#endif
    }
};

// Two consecutive elements p[0], p[1] (only p[0] when n_valid == 1) of a stored row, as float, and back.
// `aligned`: p is 2·sizeof(Bits)-aligned, so a full pair moves as one 8- or 4-byte access.
template <typename F>
__device__ __forceinline__ void load_pair(const typename F::Bits* p, float (&v)[2], int n_valid, bool aligned) {
    if constexpr (sizeof(typename F::Bits) == 4) {
        if (aligned && n_valid == 2) {
            const float2 w = *reinterpret_cast<const float2*>(p);
            v[0] = w.x, v[1] = w.y;
            return;
        }
    } else {
        if (aligned && n_valid == 2) {
            const unsigned w = *reinterpret_cast<const unsigned*>(p);
            v[0] = F::decode(static_cast<unsigned short>(w & 0xFFFFu));
            v[1] = F::decode(static_cast<unsigned short>(w >> 16));
            return;
        }
    }
    v[0] = F::decode(p[0]);
    v[1] = n_valid > 1 ? F::decode(p[1]) : 0.0f;
}

template <typename F>
__device__ __forceinline__ void store_pair(typename F::Bits* p, const float (&v)[2], int n_valid, bool aligned) {
    if constexpr (sizeof(typename F::Bits) == 4) {
        if (aligned && n_valid == 2) {
            *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
            return;
        }
    } else {
        if (aligned && n_valid == 2) {
            *reinterpret_cast<unsigned*>(p) = F::encode(v[0]) | (static_cast<unsigned>(F::encode(v[1])) << 16);
            return;
        }
    }
    p[0] = F::encode(v[0]);
    if (n_valid > 1) p[1] = F::encode(v[1]);
}

#endif  // GPUBP_STORAGE_CUH
