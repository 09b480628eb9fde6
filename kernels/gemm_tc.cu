// gemm_tc.cu: a plain tensor-core GEMM, the test and benchmark vehicle of gemm_tc.cuh (issue 12, step 1).
//
//   C (M, N) float32 = Σ_k round_P(A(m, k)) · round_P(B(n, k))          fp32 accumulation
//   A(m, k) = A_KCONTIG ? A[m*lda + k] : A[k*lda + m]     B(n, k) = B_KCONTIG ? B[n*ldb + k] : B[k*ldb + n]
//
// The three layouts of a dense layer's products (gemm.cuh's, same names):
//   <P, true, true>    dense_forward  Z = A_prev · Wᵀ    A = A_prev (N, in), B = W (out, in)
//   <P, true, false>   input_grad     dA_prev = δ · W    A = δ (N, out),     B = W (out, in), n-contiguous
//   <P, false, false>  weight_grad    dW = δᵀ · A_prev   A = δ (N, out) m-contiguous, B = A_prev (N, in)
// Shapes: C (M, N) row-major with rows ldc apart; each operand's rows are lda / ldb elements apart (>= its
// contiguous extent: padded rows let cp.async take the 16-byte path for any size, its src-size masking the
// tail chunk). A and B are in P's storage: bf16/fp16 as 16-bit raw bits (unsigned short), tf32 as float32
// (rounded to tf32, nearest even, in the kernel). CPU reference: gpubp.precision.reference_gemm.
// Launch: grid (ceil(M/128), ceil(N/128)), block 256 threads (TcGemmShape's defaults: 128x128 tiles, 8 warps,
// 3 cp.async stages, 48 KiB static shared memory). Any M, N, K >= 0 (K = 0 gives C = 0).
// Traffic and occupancy: see gemm_tc.cuh. The epilogue stores each accumulator pair as two 4-byte stores
// (C's alignment is not checked here); the dense-layer kernels bring their own epilogues.
#include "gemm_tc.cuh"

struct TcStoreEpilogue {
    float* C;
    long long ldc;
    __device__ __forceinline__ void operator()(int m, int n, const float (&v)[2], int n_valid) const {
        C[m * ldc + n] = v[0];
        if (n_valid > 1) C[m * ldc + n + 1] = v[1];
    }
};

// TC_GEMM_MIN_BLOCKS (gemm_tc.cuh): 2 blocks an SM, 1 for tf32 with a D-contiguous operand
template <typename P, bool A_KCONTIG, bool B_KCONTIG>
__global__ void __launch_bounds__(TcGemmShape<P>::THREADS, TC_GEMM_MIN_BLOCKS(P, A_KCONTIG, B_KCONTIG))
gemm_tc_kernel(const typename P::Storage* __restrict__ A, int lda, const typename P::Storage* __restrict__ B,
               int ldb, float* __restrict__ C, int ldc, int M, int N, int K) {
    typedef TcGemmShape<P> S;
    const int m0 = blockIdx.x * S::BM, n0 = blockIdx.y * S::BN;
    float acc[S::MI][S::NI][4];
    tc_gemm_block_tile<P, S, A_KCONTIG, B_KCONTIG>(A, lda, B, ldb, M, N, K, m0, n0, acc);
    tc_gemm_store_tile<S>(acc, M, N, m0, n0, TcStoreEpilogue{C, ldc});
}
