// tensor_core_cpu.h: kernels/tensor_core.cuh's PTX wrappers for the CPU emulation (cuda_cpu.h), so that the
// real gemm_tc.cu is what the tests run. harness.cpp includes this file after cuda_cpu.h and before the
// kernels; it defines GPUBP_TENSOR_CORE_EMULATED, which makes tensor_core.cuh skip its inline PTX.
//
// The fragment layouts below are the PTX ISA's (9.0), section "Warp-level matrix multiply-accumulate
// instructions", subsections "Matrix Fragments for mma.m16n8k16 with floating point type" and "Matrix
// Fragments for mma.m16n8k8" (.tf32), and section "Warp-level matrix load instruction: ldmatrix". With
//   g = lane / 4 ("groupID"), t = lane % 4 ("threadID_in_group"):
//   m16n8k16 .bf16/.f16  A (16x16, row-major), 4 regs = 8 halves a_e, e = 0..7 (reg e/2, low half e even):
//                           row = g + 8·((e/2) % 2), col = 2t + e%2 + 8·(e/4)
//                        B (16x8, K x N), 2 regs = 4 halves b_e: row (k) = 2t + e%2 + 8·(e/2), col (n) = g
//   m16n8k8 .tf32        A (16x8), 4 regs a_e: row = g + 8·(e%2), col = t + 4·(e/2)
//                        B (8x8), 2 regs b_e: row (k) = t + 4·e, col (n) = g
//   C/D (16x8, .f32), both shapes: 4 regs c_e: row = g + 8·(e/2), col = 2t + e%2
//   ldmatrix .m8n8 .x4 .b16: lane l gives the address of row l%8 of matrix l/8; register i of lane l gets
//     matrix i's (row l/4, cols 2(l%4), 2(l%4)+1), low half first; .trans: (rows 2(l%4), 2(l%4)+1, col l/4).
//
// How the warp-wide instructions are emulated: every lane of the warp calls the wrapper with its own
// registers, as on the GPU; the wrapper posts them in a per-warp table, waits at the warp barrier until all
// 32 lanes have posted (as __shfl_xor_sync does in cuda_cpu.h), and each lane then computes its own result
// registers from the table by the layout. A second barrier, at the start of the next call, keeps a lane from
// overwriting the table before every lane has read it.
//
// Arithmetic of mma: the operands are decoded exactly (bf16, fp16 including subnormals, tf32 = the top 19
// bits of the register: the hardware ignores the low 13, as far as we know; the kernels round first, so they
// do not rely on it). Each D element is C + Σ_k a·b summed in double and rounded once to float: the products
// are exact in double (≤ 22 significand bits each) and the sum nearly so. So the emulation is an ideal,
// order-free tensor core; the hardware aligns and truncates inside each mma (its internal order is not
// specified by the PTX ISA), so tests compare against reference_gemm with a tolerance that grows with the
// number of mma steps along K (tests/test_tc_gemm.py), never bit for bit. Subnormal flushing is not emulated.
//
// cp.async: a copy is recorded when issued and performed when a cp_async_wait<N> retires its group (the
// latest moment a GPU may complete it), with zeros past src_bytes. A kernel that reads shared memory before
// waiting sees what was there before (the previous stage's data, or the emulator's poison) and fails its
// test. Copies never waited for are still pending when the block ends (a bug: the kernels wait for all).
//
// Planted bugs: emu_tc_plant_bug(n) shifts one index of one layout by one (see EmuPlantedBug), so a test can
// show that a fragment-index error in a kernel (which is the same as a disagreement between the kernel's
// idea of the layout and the emulated one) fails the GEMM comparison. 0 (the default) plants nothing.
#pragma once

#include <string.h>

#include "cuda_cpu.h"

#define GPUBP_TENSOR_CORE_EMULATED 1

enum EmuPlantedBug {
    EMU_BUG_NONE = 0,
    EMU_BUG_A16_COL = 1,        // m16n8k16 A: col + 1 (mod 16)
    EMU_BUG_B16_ROW = 2,        // m16n8k16 B: k + 1 (mod 16)
    EMU_BUG_D_COL = 3,          // C/D: col + 1 (mod 8)
    EMU_BUG_A_TF32_COL = 4,     // m16n8k8 A: col + 1 (mod 8)
    EMU_BUG_LDMATRIX_ROW = 5,   // ldmatrix: the row a lane reads, + 1 (mod 8)
    EMU_BUG_LDMATRIX_TRANS_COL = 6,   // ldmatrix.trans: the column a lane reads, + 1 (mod 8)
    EMU_BUG_WAIT_ONE_SHORT = 7, // cp.async.wait_group N leaves N + 1 groups pending (a pipeline off by one)
};
inline int emu_tc_planted_bug = EMU_BUG_NONE;
extern "C" void emu_tc_plant_bug(int bug);   // defined below, after the cp.async state it also clears

inline unsigned float_bits(float x) {
    unsigned u;
    memcpy(&u, &x, sizeof u);
    return u;
}
inline float float_from_bits(unsigned u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

// ---- the per-warp exchange table ----------------------------------------------------------------------------
struct EmuTcLane {
    unsigned a[4], b[2];   // mma operands
    const void* row;       // ldmatrix
};
inline EmuTcLane emu_tc_lanes[1024];

inline unsigned emu_tc_warp_first_lane() {
    const unsigned warp = threadIdx.x / 32;
    if (emu_warp_barriers[warp].expected != 32) {
        fprintf(stderr, "tensor_core_cpu.h: warp %u has %d threads; mma.sync/ldmatrix need all 32\n", warp,
                emu_warp_barriers[warp].expected);
        abort();
    }
    return warp * 32;
}

// ---- mma.sync ---------------------------------------------------------------------------------------------------
inline double emu_bf16_value(unsigned short h) {
    const unsigned u = static_cast<unsigned>(h) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

inline double emu_f16_value(unsigned short h) {
    const int exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    double v;
    if (exponent == 0) v = ldexp(static_cast<double>(mantissa), -24);                    // subnormal (or 0)
    else if (exponent == 31) v = mantissa ? NAN : INFINITY;
    else v = ldexp(static_cast<double>(mantissa + 1024), exponent - 25);
    return (h & 0x8000) ? -v : v;
}

inline double emu_tf32_value(unsigned bits) {
    const unsigned u = bits & 0xFFFFE000u;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// Which (row, col) element e of a lane's fragment holds (the tables at the top); a planted bug shifts one.
inline void emu_a16_index(unsigned lane, int e, int& row, int& col) {
    const int g = lane / 4, t = lane % 4;
    row = g + 8 * ((e / 2) % 2);
    col = 2 * t + e % 2 + 8 * (e / 4);
    if (emu_tc_planted_bug == EMU_BUG_A16_COL) col = (col + 1) % 16;
}
inline void emu_b16_index(unsigned lane, int e, int& k, int& n) {
    const int g = lane / 4, t = lane % 4;
    k = 2 * t + e % 2 + 8 * (e / 2);
    n = g;
    if (emu_tc_planted_bug == EMU_BUG_B16_ROW) k = (k + 1) % 16;
}
inline void emu_a_tf32_index(unsigned lane, int e, int& row, int& col) {
    const int g = lane / 4, t = lane % 4;
    row = g + 8 * (e % 2);
    col = t + 4 * (e / 2);
    if (emu_tc_planted_bug == EMU_BUG_A_TF32_COL) col = (col + 1) % 8;
}
inline void emu_b_tf32_index(unsigned lane, int e, int& k, int& n) {
    const int g = lane / 4, t = lane % 4;
    k = t + 4 * e;
    n = g;
}
inline void emu_cd_index(unsigned lane, int e, int& row, int& col) {
    const int g = lane / 4, t = lane % 4;
    row = g + 8 * (e / 2);
    col = 2 * t + e % 2;
    if (emu_tc_planted_bug == EMU_BUG_D_COL) col = (col + 1) % 8;
}

// D = A (16xK) · B (Kx8) + C for this lane's four D elements; K = 16 (16-bit types, `decode` gives a half's
// value) or 8 (tf32, decoded by emu_tf32_value; decode is null).
template <int K>
inline void emu_mma(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                    double (*decode)(unsigned short)) {
    const unsigned first = emu_tc_warp_first_lane(), lane = threadIdx.x % 32;
    const unsigned warp = threadIdx.x / 32;
    emu_wait(emu_warp_barriers[warp]);   // every lane has read the previous exchange
    EmuTcLane& mine = emu_tc_lanes[threadIdx.x];
    for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
    for (int i = 0; i < 2; ++i) mine.b[i] = b[i];
    emu_wait(emu_warp_barriers[warp]);   // every lane has posted
    double A[16][K], B[K][8];
    for (unsigned l = 0; l < 32; ++l) {
        const EmuTcLane& other = emu_tc_lanes[first + l];
        if constexpr (K == 16) {
            for (int e = 0; e < 8; ++e) {   // register e/2, the low half for even e
                int row, col;
                emu_a16_index(l, e, row, col);
                A[row][col] = decode(static_cast<unsigned short>(other.a[e / 2] >> (16 * (e % 2))));
            }
            for (int e = 0; e < 4; ++e) {
                int k, n;
                emu_b16_index(l, e, k, n);
                B[k][n] = decode(static_cast<unsigned short>(other.b[e / 2] >> (16 * (e % 2))));
            }
        } else {
            for (int e = 0; e < 4; ++e) {
                int row, col;
                emu_a_tf32_index(l, e, row, col);
                A[row][col] = emu_tf32_value(other.a[e]);
            }
            for (int e = 0; e < 2; ++e) {
                int k, n;
                emu_b_tf32_index(l, e, k, n);
                B[k][n] = emu_tf32_value(other.b[e]);
            }
        }
    }
    for (int e = 0; e < 4; ++e) {
        int row, col;
        emu_cd_index(lane, e, row, col);
        double sum = acc[e];   // C: this lane's own register, the same element as D (one layout for both)
        for (int k = 0; k < K; ++k) sum += A[row][k] * B[k][col];
        acc[e] = static_cast<float>(sum);
    }
}

inline void mma_bf16_m16n8k16(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    emu_mma<16>(acc, a, b, emu_bf16_value);
}
inline void mma_f16_m16n8k16(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    emu_mma<16>(acc, a, b, emu_f16_value);
}
inline void mma_tf32_m16n8k8(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    emu_mma<8>(acc, a, b, nullptr);
}

// ---- ldmatrix -----------------------------------------------------------------------------------------------
template <bool TRANS>
inline void emu_ldmatrix_x4(unsigned (&d)[4], const void* row) {
    const unsigned first = emu_tc_warp_first_lane(), lane = threadIdx.x % 32;
    const unsigned warp = threadIdx.x / 32;
    if (reinterpret_cast<unsigned long long>(row) % 16 != 0) {
        fprintf(stderr, "tensor_core_cpu.h: ldmatrix row address %p of lane %u is not 16-byte aligned\n", row, lane);
        abort();
    }
    emu_wait(emu_warp_barriers[warp]);
    emu_tc_lanes[threadIdx.x].row = row;
    emu_wait(emu_warp_barriers[warp]);
    for (int i = 0; i < 4; ++i) {
        unsigned short half[2];
        for (int j = 0; j < 2; ++j) {
            int r, c;   // element (r, c) of matrix i
            if (TRANS) {
                r = 2 * (lane % 4) + j;
                c = lane / 4;
                if (emu_tc_planted_bug == EMU_BUG_LDMATRIX_TRANS_COL) c = (c + 1) % 8;
            } else {
                r = lane / 4;
                c = 2 * (lane % 4) + j;
                if (emu_tc_planted_bug == EMU_BUG_LDMATRIX_ROW) r = (r + 1) % 8;
            }
            memcpy(&half[j], static_cast<const char*>(emu_tc_lanes[first + 8 * i + r].row) + 2 * c, 2);
        }
        d[i] = half[0] | (static_cast<unsigned>(half[1]) << 16);
    }
}

inline void ldmatrix_x4(unsigned (&d)[4], const void* row) { emu_ldmatrix_x4<false>(d, row); }
inline void ldmatrix_x4_trans(unsigned (&d)[4], const void* row) { emu_ldmatrix_x4<true>(d, row); }

// ---- cp.async ---------------------------------------------------------------------------------------------------
struct EmuCpAsync {
    void* dst;
    const void* src;
    int src_bytes;
};
struct EmuCpAsyncThread {
    std::vector<EmuCpAsync> open;                  // issued since the last commit
    std::vector<std::vector<EmuCpAsync>> groups;   // committed, oldest first
};
inline EmuCpAsyncThread emu_cp_async[1024];

inline void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
    const unsigned long long dst = reinterpret_cast<unsigned long long>(smem_dst);
    const unsigned long long src = reinterpret_cast<unsigned long long>(gmem_src);
    if (dst % 16 != 0 || src % 16 != 0 || src_bytes < 0 || src_bytes > 16) {
        fprintf(stderr, "tensor_core_cpu.h: cp.async of %d bytes from %p to %p: both must be 16-byte aligned\n",
                src_bytes, gmem_src, smem_dst);
        abort();
    }
    emu_cp_async[threadIdx.x].open.push_back({smem_dst, gmem_src, src_bytes});
}

inline void cp_async_commit() {
    EmuCpAsyncThread& mine = emu_cp_async[threadIdx.x];
    mine.groups.push_back(std::move(mine.open));
    mine.open.clear();
}

template <int N>
inline void cp_async_wait() {
    EmuCpAsyncThread& mine = emu_cp_async[threadIdx.x];
    const size_t pending = N + (emu_tc_planted_bug == EMU_BUG_WAIT_ONE_SHORT ? 1 : 0);
    while (mine.groups.size() > pending) {
        for (const EmuCpAsync& copy : mine.groups.front()) {
            memcpy(copy.dst, copy.src, copy.src_bytes);
            memset(static_cast<char*>(copy.dst) + copy.src_bytes, 0, 16 - copy.src_bytes);
        }
        mine.groups.erase(mine.groups.begin());
    }
}

// Sets the planted bug (0: none) and forgets every cp.async not yet performed: a planted pipeline bug leaves
// copies pending at the end of its launch, whose source arrays the test has freed since.
extern "C" void emu_tc_plant_bug(int bug) {
    emu_tc_planted_bug = bug;
    for (EmuCpAsyncThread& thread : emu_cp_async) thread = EmuCpAsyncThread{};
}
