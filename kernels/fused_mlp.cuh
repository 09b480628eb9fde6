// fused_mlp.cuh: the 16-bit conversions the fused MLP's epilogues need (fused_mlp.cu), one function per job:
//
//   fused_pack2(P{}, lo, hi)   two float32 -> one .b32 register of two P values, round to nearest EVEN
//                              (lo in the low half: the mma A-fragment order, PTX ISA "Matrix Fragments for
//                              mma.m16n8k16 with floating point type": the lower k index in the lower half)
//   fused_unpack(P{}, h)       one stored P value (raw 16 bits) -> float32, exact
//
// P is gemm_tc.cuh's TcBf16 or TcFp16. On the GPU these are one cvt each (PTX ISA, "Data movement and
// conversion instructions: cvt": cvt.rn.bf16x2.f32 and cvt.rn.f16x2.f32 need sm_80; "the value converted from
// input a is stored in the upper half of d", hence hi first), the same RNE as gpubp/precision.py's
// round_operand (ml_dtypes / numpy casts). Under the CPU emulation (tests/cuda_emulation/tensor_core_cpu.h
// defines GPUBP_TENSOR_CORE_EMULATED; g++ cannot take PTX) the same roundings are done in C++: bf16 with
// integer RNE on the float32 bits, fp16 through g++'s _Float16 (an IEEE binary16 cast, RNE, subnormals and
// overflow to inf as the hardware). Kept out of tensor_core.cuh on purpose (that file is another branch's).
#ifndef GPUBP_FUSED_MLP_CUH
#define GPUBP_FUSED_MLP_CUH

#include "gemm_tc.cuh"

#ifdef GPUBP_TENSOR_CORE_EMULATED

inline unsigned fused_bf16_bits(float x) {
    const unsigned u = float_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u >> 16) | 0x40u;   // NaN: quiet, sign kept
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;                   // RNE; overflow carries into inf
}
inline unsigned fused_f16_bits(float x) {
    const _Float16 h = static_cast<_Float16>(x);
    unsigned short bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
}
inline unsigned fused_pack2(TcBf16, float lo, float hi) { return fused_bf16_bits(lo) | (fused_bf16_bits(hi) << 16); }
inline unsigned fused_pack2(TcFp16, float lo, float hi) { return fused_f16_bits(lo) | (fused_f16_bits(hi) << 16); }
inline float fused_unpack(TcBf16, unsigned short h) { return float_from_bits(static_cast<unsigned>(h) << 16); }
inline float fused_unpack(TcFp16, unsigned short h) {
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return static_cast<float>(v);
}

#else

__device__ __forceinline__ unsigned fused_pack2(TcBf16, float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ unsigned fused_pack2(TcFp16, float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float fused_unpack(TcBf16, unsigned short h) {
    return float_from_bits(static_cast<unsigned>(h) << 16);
}
__device__ __forceinline__ float fused_unpack(TcFp16, unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(h));
    return f;
}

#endif  // GPUBP_TENSOR_CORE_EMULATED

#endif  // GPUBP_FUSED_MLP_CUH
