// dense_backward.cu: the backward pass of one Dense layer.
//
//   activation_mask   δ = dA ⊙ g'(Z)                          (elementwise)
//   input_grad        dA_prev = δ · W                         (GEMM), or fused with the previous layer's mask:
//                     δ_prev = (δ · W) ⊙ g_prev'(Z_prev)      (the mask in the GEMM's epilogue: dA_prev is
//                                                              never written, saving 2·N·in element moves)
//   weight_grad       dW (=|+=) δᵀ · A_prev,  db (=|+=) Σₙ δₙ  (GEMM; db from the same shared-memory tiles)
// CPU reference: gpubp/backends/numpy_backend.py, gpubp/activations.py.
//
// Shapes (row-major, rows are samples): A_prev, Z_prev (N, in); W, dW (out, in); b, db (out,);
// dA, Z, A, δ (N, out).
//
// weight_grad's K is the batch N, which is large when out·in is small (64 x 64 tiles for a batch of 65536):
// it splits K over gridDim.z slices of k_per_split rows. With one slice it writes dW and db directly
// (overwrite or accumulate); with several, slice s writes partial sums to dW_parts[s] (out, in) and
// db_parts[s] (out,), and weight_grad_reduce_kernel adds the slices in a fixed order. Nothing uses atomics,
// so every result is bit-identical run to run on a given device (the slice count depends on the shape and
// the device's SM count only).
//
// Launch shapes: GEMMs grid (ceil(M/BM), ceil(N/BN), slices), block (BM/TM)·(BN/TN); elementwise kernels
// any grid with a grid-stride loop, block 256.
// Memory traffic: activation_mask reads 2 and writes 1 element per element; input_grad reads δ ceil(in/BN)
// times and W ceil(N/BM) times (L2), writes N·in (+ reads N·in of Z_prev or A_prev when fused); weight_grad
// reads δ and A_prev about once per tile row/column of dW, writes out·in·slices (+ the reduce: reads
// out·in·slices, writes out·in). FLOPs: 2·N·in·out each GEMM.
#include "gemm.cuh"

// ---------------------------------------------------------------------------------------------------------
// activation_mask_kernel: one thread per element (grid-stride). delta may be the same array as dA.
// Only the operand the derivative needs is read: Z for relu/leaky_relu, A for sigmoid/tanh.

template <typename T>
__global__ void activation_mask_kernel(const T* dA, const T* Z, const T* A, T* delta, long long size, int act,
                                       double alpha) {
    const bool need_z = act == ACT_RELU || act == ACT_LEAKY_RELU;
    const bool need_a = act == ACT_SIGMOID || act == ACT_TANH;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
         i += (long long)gridDim.x * blockDim.x) {
        const T z = need_z ? Z[i] : T(0), a = need_a ? A[i] : T(0);
        delta[i] = activation_mask(act, dA[i], z, a, T(alpha));
    }
}

// ---------------------------------------------------------------------------------------------------------
// input_grad_kernel: out = δ · W, and when mask_act >= 0, out = (δ · W) ⊙ g'(Z_prev) with g = mask_act.
// out may be the same array as Z_prev or A_prev: each element is read and written by the same thread.

template <typename T>
struct InputGradEpilogue {
    T* out;
    const T* Z_prev;
    const T* A_prev;
    long long ld;   // = in
    int act;        // < 0: no mask
    T alpha;
    bool aligned;   // out's, Z_prev's and A_prev's rows start 16-byte aligned

    template <int L>
    __device__ __forceinline__ void operator()(int m, int n, T (&v)[L], int n_valid) const {
        if (act >= 0) {
            T z[L], a[L];
            const bool need_z = act == ACT_RELU || act == ACT_LEAKY_RELU;
            const bool need_a = act == ACT_SIGMOID || act == ACT_TANH;
#pragma unroll
            for (int j = 0; j < L; ++j) z[j] = a[j] = T(0);
            if (need_z) load_run(Z_prev + m * ld + n, z, n_valid, aligned);
            if (need_a) load_run(A_prev + m * ld + n, a, n_valid, aligned);
#pragma unroll
            for (int j = 0; j < L; ++j) v[j] = activation_mask(act, v[j], z[j], a[j], alpha);
        }
        store_run(out + m * ld + n, v, n_valid, aligned);
    }
};

// The mask epilogue reads Z_prev and A_prev besides the accumulators: with the 4x4 float tile, NVRTC 13.0 spilled
// 4 bytes within 64 registers (4 blocks a SM), so this kernel asks for 3 blocks there (<= 80 registers).
#define INPUT_GRAD_MIN_BLOCKS(T, TM, TN) ((TM) * (TN) < 64 && sizeof(T) == 4 ? 3 : GEMM_MIN_BLOCKS(T, TM, TN))

template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN), INPUT_GRAD_MIN_BLOCKS(T, TM, TN))
input_grad_kernel(const T* __restrict__ delta, const T* __restrict__ W, T* out, const T* Z_prev,
                  const T* A_prev, int N, int n_in, int n_out, int mask_act, double alpha) {
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    T acc[TM][TN];
    T unused;
    // C (N, in) = Σ_k δ[m, k] · W[k, n]: A = δ k-contiguous (ld out), B = W n-contiguous (ld in)
    gemm_block_tile<T, BM, BN, BK, TM, TN, true, false>(delta, n_out, W, n_in, N, n_in, m0, n0, 0, n_out,
                                                        acc, false, unused);
    const bool aligned = rows_aligned16(out, n_in) &&
                         (mask_act < 0 || (rows_aligned16(Z_prev, n_in) && rows_aligned16(A_prev, n_in)));
    const InputGradEpilogue<T> epi{out, Z_prev, A_prev, n_in, mask_act, T(alpha), aligned};
    gemm_store_tile<T, BM, BN, BK, TM, TN>(acc, N, n_in, m0, n0, epi);
}

// ---------------------------------------------------------------------------------------------------------
// weight_grad_kernel: slice z = blockIdx.z of K = [z·k_per_split, (z+1)·k_per_split) ∩ [0, N).
// dW/db point at slice 0 of the output; slice z writes dW + z·out·in and db + z·out (with one slice, that is
// dW and db themselves). db is written by the blocks of the first column tile (blockIdx.y == 0) only.

template <typename T>
struct WeightGradEpilogue {
    T* dW;
    long long ld;   // = in
    int accumulate;
    bool aligned;

    template <int L>
    __device__ __forceinline__ void operator()(int m, int n, T (&v)[L], int n_valid) const {
        T* p = dW + m * ld + n;
        if (accumulate) {
            T old[L];
            load_run(p, old, n_valid, aligned);
#pragma unroll
            for (int j = 0; j < L; ++j) v[j] = old[j] + v[j];
        }
        store_run(p, v, n_valid, aligned);
    }
};

template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN), GEMM_MIN_BLOCKS(T, TM, TN))
weight_grad_kernel(const T* __restrict__ delta, const T* __restrict__ A_prev, T* dW, T* db, int N, int n_in,
                   int n_out, int k_per_split, int has_bias, int accumulate) {
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int k_begin = blockIdx.z * k_per_split;
    const int k_end = N - k_begin < k_per_split ? N : k_begin + k_per_split;
    T* dW_slice = dW + (long long)blockIdx.z * n_out * n_in;
    const bool sum_delta = has_bias && blockIdx.y == 0;
    T acc[TM][TN];
    T db_sum;
    // C (out, in) = Σ_k δ[k, m] · A_prev[k, n]: A = δ m-contiguous (ld out), B = A_prev n-contiguous (ld in)
    gemm_block_tile<T, BM, BN, BK, TM, TN, false, false>(delta, n_out, A_prev, n_in, n_out, n_in, m0, n0,
                                                         k_begin, k_end, acc, sum_delta, db_sum);
    const WeightGradEpilogue<T> epi{dW_slice, n_in, accumulate, rows_aligned16(dW_slice, n_in)};
    gemm_store_tile<T, BM, BN, BK, TM, TN>(acc, n_out, n_in, m0, n0, epi);
    if (sum_delta && threadIdx.x < BM && m0 + (int)threadIdx.x < n_out) {
        T* p = db + (long long)blockIdx.z * n_out + m0 + threadIdx.x;
        *p = accumulate ? *p + db_sum : db_sum;
    }
}

// weight_grad_reduce_kernel: dW (=|+=) Σ_s dW_parts[s], db (=|+=) Σ_s db_parts[s], slices added in order s =
// 0, 1, ... (deterministic). One thread per element of dW then db (grid-stride).
template <typename T>
__global__ void weight_grad_reduce_kernel(const T* __restrict__ dW_parts, const T* __restrict__ db_parts, T* dW,
                                          T* db, int slices, long long dW_size, int n_out, int has_bias,
                                          int accumulate) {
    const long long total = dW_size + (has_bias ? n_out : 0);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const bool is_w = i < dW_size;
        const T* part = is_w ? dW_parts + i : db_parts + (i - dW_size);
        const long long stride = is_w ? dW_size : n_out;
        T sum = T(0);
        for (int s = 0; s < slices; ++s) sum += part[s * stride];
        T* dst = is_w ? dW + i : db + (i - dW_size);
        *dst = accumulate ? *dst + sum : sum;
    }
}
