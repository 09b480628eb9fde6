// tensor_core.cuh: thin device wrappers for the sm_80+ PTX that gemm_tc.cuh uses, one function per instruction:
//
//   mma_bf16_m16n8k16 / mma_f16_m16n8k16 / mma_tf32_m16n8k8   D = A·B + D, fp32 accumulators, one warp
//   ldmatrix_x4 / ldmatrix_x4_trans                          four 8x8 b16 matrices: shared -> fragments
//   cp_async_16 (zero fill past src_bytes), cp_async_commit, cp_async_wait<N>
//   tf32_round                                               float32 -> tf32, round to nearest EVEN
//   (float_bits / float_from_bits, a float's bit pattern and back: storage.cuh)
//
// PTX ISA (9.0) sections relied on: "Warp-level matrix multiply-accumulate instructions" (mma.sync with
// .m16n8k16 .bf16/.f16 and .m16n8k8 .tf32, fp32 C/D; the fragment layouts are in its subsections "Matrix
// Fragments for mma.m16n8k16 with floating point type" and "Matrix Fragments for mma.m16n8k8"), "Warp-level
// matrix load instruction: ldmatrix", "Data movement and conversion instructions: cp.async" (with
// cp.async.commit_group / cp.async.wait_group) and "cvt" (.tf32.f32: .rna on sm_80, .rn/.rz from sm_90).
// The layouts are written out once, as code, in tests/cuda_emulation/tensor_core_cpu.h, which is what runs
// instead of this file's PTX when the kernels are tested on a CPU (g++ cannot take PTX): that header defines
// GPUBP_TENSOR_CORE_EMULATED and the same functions, and is included by the harness before the kernels.
//
// Fragment registers are `unsigned` (.b32): two 16-bit operands per register (low half = lower k or column
// index), or one tf32. 16-bit operands are kept as raw bits (`unsigned short` storage) from global memory to
// the mma: the GEMM never does arithmetic on them, so cuda_bf16.h / cuda_fp16.h (which NVRTC does not find
// without CuPy's include path) are not needed.
#ifndef GPUBP_TENSOR_CORE_CUH
#define GPUBP_TENSOR_CORE_CUH

// storage.cuh: float_bits / float_from_bits, and the bf16/fp16 storage formats
#include "storage.cuh"

#ifndef GPUBP_TENSOR_CORE_EMULATED

// The 32-bit shared-state-space address of a generic pointer to shared memory (what ldmatrix and cp.async's
// destination take: 32-bit registers, cheaper than 64-bit generic addresses).
__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// ---- mma.sync: acc (16x8 fp32) += A (16xK) · B (Kx8), row-major A, column-major B ("row.col": the only
// layout m16n8k16/m16n8k8 take). a, b, acc are this lane's fragment registers (layouts: see the header).
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_f16_m16n8k16(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// a and b must hold tf32 values (tf32_round): the instruction reads only the top 19 bits of each register.
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---- ldmatrix: lane l gives the address of row l%8 of matrix l/8 (16 bytes, 16-byte aligned, shared);
// d[i] receives from matrix i the elements (row l/4, columns 2(l%4), 2(l%4)+1), or with .trans the
// elements (rows 2(l%4), 2(l%4)+1, column l/4): the matrix transposed on the way.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&d)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(shared_address(row))
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&d)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(shared_address(row))
                 : "memory");
}

// ---- cp.async: 16 bytes global -> shared without passing through registers; only the first src_bytes
// (0..16) are read, the rest of the 16 are written as zeros (the src-size operand): masked tails read
// nothing past a matrix. .cg caches in L2 only: each tile is read once per block, L1 would only be polluted.
// Both addresses must be 16-byte aligned (src even when src_bytes < 16).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(shared_address(smem_dst)), "l"(gmem_src), "r"(src_bytes)
                 : "memory");
}

// closes the group of this thread's cp.async issued since the last commit
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// waits until at most N of this thread's committed groups are still in flight. Other threads' copies are
// not covered: a __syncthreads must follow before reading what they copied.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#endif  // GPUBP_TENSOR_CORE_EMULATED

// ---- float32 -> tf32, round to nearest, ties to even (gpubp/precision.py's round_tf32, bit for bit).
// The result is a .b32 register with the low 13 bits zero (NaN: a quiet NaN of the same sign).
// sm_90 has the instruction (cvt.rn.tf32.f32). sm_80's cvt offers only .rna (ties away from zero), which
// would disagree with the reference on exact ties (1 in 2^13 random operands), so sm_80 rounds with integer
// ops: add 0xFFF plus the kept lowest bit, clear the low 13 bits (a tie carries only when the kept part is
// odd); inf and NaN skip the carry (a NaN's payload may lie in the dropped bits only).
__device__ __forceinline__ unsigned tf32_round(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned r;
    asm("cvt.rn.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
#else
    const unsigned u = float_bits(x);
    if ((u & 0x7F800000u) == 0x7F800000u) return (u & 0xFFFFE000u) | ((u & 0x007FFFFFu) ? 0x00400000u : 0u);
    return (u + 0xFFFu + ((u >> 13) & 1u)) & 0xFFFFE000u;
#endif
}

#endif  // GPUBP_TENSOR_CORE_CUH
