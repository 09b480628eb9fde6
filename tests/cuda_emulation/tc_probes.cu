// tc_probes.cu: test-only kernels that check tensor_core_cpu.h's emulated instructions one at a time, against
// the PTX ISA's tables written out here a second time, in another form (per register, where
// tensor_core_cpu.h goes per element), and without ldmatrix. If the emulated mma and ldmatrix were wrong in
// ways that cancel inside gemm_tc.cu, the GEMM tests would pass but these would not. They are plain CUDA C
// on top of gemm_tc.cuh, so the same probes can run on a GPU (NVRTC, after cuda_sources.inline_includes of
// gemm_tc.cuh) to hold the emulation up against the hardware. tests/test_tc_gemm.py runs them.
// NOTE: no #include here: harness.cpp includes gemm_tc.cu (hence gemm_tc.cuh) first, and the emulation's
// build may compile copies of the kernels from another folder than this file's.

// One warp, one mma: D (16x8) = A (16xK) · Bᵀ + C, A (16, K) and B (8, K) row-major, K = P::MMA_K, C and D
// (16, 8) row-major. Fragments come straight from global memory by the PTX ISA layouts (g = lane/4, t = lane%4):
//   16-bit: A reg r = (row g + 8(r%2), cols 2t + 8(r/2) and +1); B reg r = (n g, k 2t + 8r and +1)
//   tf32:   A reg r = (row g + 8(r%2), col t + 4(r/2));         B reg r = (n g, k t + 4r)
//   C/D reg r = (row g + 8(r/2), col 2t + r%2)
template <typename P>
__global__ void tc_mma_probe_kernel(const typename P::Storage* A, const typename P::Storage* B, const float* C,
                                    float* D) {
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    constexpr int K = P::MMA_K;
    unsigned a[4], b[2];
    float acc[4];
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r % 2);
        if constexpr (K == 16) {
            const int col = 2 * t + 8 * (r / 2);
            a[r] = A[row * K + col] | (static_cast<unsigned>(A[row * K + col + 1]) << 16);
        } else {
            a[r] = float_bits(A[row * K + t + 4 * (r / 2)]);
        }
    }
    for (int r = 0; r < 2; ++r) {
        if constexpr (K == 16) {
            const int k = 2 * t + 8 * r;
            b[r] = B[g * K + k] | (static_cast<unsigned>(B[g * K + k + 1]) << 16);
        } else {
            b[r] = float_bits(B[g * K + t + 4 * r]);
        }
    }
    P::prepare(a);
    P::prepare(b);
    for (int r = 0; r < 4; ++r) acc[r] = C[(g + 8 * (r / 2)) * 8 + 2 * t + r % 2];
    P::mma(acc, a, b);
    for (int r = 0; r < 4; ++r) D[(g + 8 * (r / 2)) * 8 + 2 * t + r % 2] = acc[r];
}

// One warp, one ldmatrix.x4 (trans != 0: .trans) of the 32 x 8 halves of X (matrix i = rows 8i..8i+7), lane l
// giving the address of row l; out[(l*4 + i)*2 + j] = half j of lane l's register i.
__global__ void tc_ldmatrix_probe_kernel(const unsigned short* X, unsigned short* out, int trans) {
    __shared__ __align__(16) unsigned short tile[32 * 8];
    const int lane = threadIdx.x;
    for (int j = 0; j < 8; ++j) tile[lane * 8 + j] = X[lane * 8 + j];
    __syncthreads();
    unsigned d[4];
    if (trans) ldmatrix_x4_trans(d, tile + lane * 8);
    else ldmatrix_x4(d, tile + lane * 8);
    for (int i = 0; i < 4; ++i) {
        out[(lane * 4 + i) * 2] = static_cast<unsigned short>(d[i] & 0xFFFFu);
        out[(lane * 4 + i) * 2 + 1] = static_cast<unsigned short>(d[i] >> 16);
    }
}

// out[i] = F::decode(bits[i]) (storage.cuh), one element a thread, grid-stride: every 16-bit pattern against numpy
// (tests/test_cupy_tc_emulated.py). On a GPU, F::decode of fp16 is the cvt instruction, here the integer version.
template <typename F>
__global__ void storage_decode_probe_kernel(const typename F::Bits* bits, float* out, long long size) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size; i += (long long)gridDim.x * blockDim.x)
        out[i] = F::decode(bits[i]);
}
