// dense_forward.cu: the fused forward pass of one Dense layer.
//
//   Z = A_prev · Wᵀ + b        A = g(Z)          (SPEC section 1; CPU reference: gpubp/backends/numpy_backend.py)
//
// Shapes (row-major, rows are samples): A_prev (N, in), W (out, in), b (out,), Z and A (N, out).
// The GEMM is gemm.cuh's core with both operands k-contiguous (A_prev rows and W rows are both runs of `in`);
// the bias add and the activation are its epilogue, so Z and A are written once each, straight from registers.
// Z is kept for backward (relu's mask is taken from Z). A may be the same array as Z when g is the identity
// (each element is then written twice with the same value, by the same thread).
//
// Launch: grid (ceil(N/BM), ceil(out/BN)), block (BM/TM)·(BN/TN) threads; the tile is a template parameter
// (the backend picks 128x128x8 with 8x8 per thread for big problems, 64x64x8 with 4x4 otherwise).
// Memory traffic: reads A_prev ceil(out/BN) times and W ceil(N/BM) times (mostly from L2), b once per
// tile; writes Z and A once: 2·N·out elements. FLOPs: 2·N·in·out.
#include "gemm.cuh"

// ---------------------------------------------------------------------------------------------------------
// epilogue: z = acc + b[n], Z[m, n] = z, A[m, n] = g(z)

template <typename T>
struct ForwardEpilogue {
    const T* b;
    T* Z;
    T* A;
    long long ld;   // = out
    int has_bias;
    int act;
    T alpha;
    bool aligned;   // Z's and A's rows start 16-byte aligned: full runs are stored as vectors

    template <int L>
    __device__ __forceinline__ void operator()(int m, int n, T (&z)[L], int n_valid) const {
        T a[L];
#pragma unroll
        for (int j = 0; j < L; ++j) {
            if (has_bias && j < n_valid) z[j] += b[n + j];
            a[j] = activation_forward(act, z[j], alpha);
        }
        store_run(Z + m * ld + n, z, n_valid, aligned);
        store_run(A + m * ld + n, a, n_valid, aligned);
    }
};

// ---------------------------------------------------------------------------------------------------------
// dense_forward_kernel: one block per BM x BN tile of Z, K = in walked in BK slices (gemm.cuh), epilogue above.
// b is ignored when has_bias == 0 (pass any valid pointer).

template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN), GEMM_MIN_BLOCKS(T, TM, TN))
dense_forward_kernel(const T* __restrict__ A_prev, const T* __restrict__ W, const T* __restrict__ b,
                     T* Z, T* A, int N, int n_in, int n_out, int has_bias, int act, double alpha) {
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    T acc[TM][TN];
    T unused;
    gemm_block_tile<T, BM, BN, BK, TM, TN, true, true>(A_prev, n_in, W, n_in, N, n_out, m0, n0, 0, n_in,
                                                       acc, false, unused);
    const ForwardEpilogue<T> epi{b, Z, A, n_out, has_bias, act, T(alpha),
                                 rows_aligned16(Z, n_out) && rows_aligned16(A, n_out)};
    gemm_store_tile<T, BM, BN, BK, TM, TN>(acc, N, n_out, m0, n0, epi);
}
