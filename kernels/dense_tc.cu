// dense_tc.cu: one Dense layer's forward and backward GEMMs on the tensor cores (issue 12, mixed precision),
// with the epilogues of the FP32 path (dense_forward.cu, dense_backward.cu), and the operand conversion.
//
// P, the operand precision (gemm_tc.cuh's tag: TcBf16, TcFp16, TcTf32), round_p = gpubp.precision.round_operand
// (RNE), "store" = encode to the output's format (storage.cuh: StoreF32, StoreBf16, StoreFp16; RNE). The CPU
// reference is gpubp/backends/numpy_backend.py in the same precision (and gpubp.precision.reference_gemm).
// Shapes (row-major, rows are samples): A_prev, Z_prev (N, in); W, dW (out, in); b, db (out,); Z, A, δ (N, out).
//
//   dense_forward_tc_kernel<P>         Z = round_p(A_prev) · round_p(W)ᵀ + b (float32),  A = store(g(Z))
//   input_grad_tc_kernel<P>            δ_prev = store((round_p(δ) · round_p(W)) ⊙ g'(Z_prev))  (mask_act >= 0;
//                                      g' from Z_prev for relu/leaky_relu, from the stored A_prev, decoded, for
//                                      sigmoid/tanh, in float32), or dA_prev = store(round_p(δ) · round_p(W))
//     "store" writes the output in P's format (P::Format: bf16/fp16 bits; float32 for tf32) when `narrow` is set
//     (a hidden layer's A, a 16-bit δ), else float32 (the output layer's A, a float32 δ). NOTE: a runtime flag,
//     not a template parameter: 9 GEMM instances instead of 13; the flag picks one of the epilogue loops, each
//     with its format fixed at compile time (one loop with the branch inside made ptxas keep the 64
//     accumulators in a 256-byte local-memory frame). Epilogues are kept branch-light for the compiler: see
//     dense_forward_tc_kernel's two passes and TcInputGradEpilogue (NVRTC: ~8 s CPU for this file an arch).
//   weight_grad_tc_kernel<P>           dW (=|+=) round_p(δ)ᵀ · round_p(A_prev) (float32),  db (=|+=) Σₙ δₙ (the
//                                      stored δ, decoded), split-K over the batch as dense_backward.cu's
//   to_storage_kernel<F>               dst = encode_F(src): float32 -> bf16/fp16 bits (RNE)
//
// Operands: A_prev, δ and W reach the GEMM in P's storage (16-bit raw bits for bf16/fp16, float32 for tf32,
// rounded per fragment inside the GEMM). Hidden A and every δ are stored so already (the producer kernels write
// them in their format: the forward epilogue here, input_grad's, loss.cu's); float32 operands of a 16-bit GEMM,
// W (the float32 master weights) and X (layer 0's staged input), are converted first by to_storage_kernel into
// a scratch buffer of the backend (one extra pass: 6 bytes an element). NOTE: next step: the optimizer's update
// kernel writes a 16-bit shadow copy of W as it updates W, so that no GEMM converts W (saves the pass and its
// launch per GEMM, 2 per layer per step).
//
// The GEMMs are gemm_tc.cuh's core (mma.sync m16n8k16 bf16/fp16, m16n8k8 tf32; ldmatrix; 3-stage cp.async;
// 128x128 block tiles, 8 warps of 64x32; PTX ISA sections and fragment layouts: gemm_tc.cuh's header) in its
// three layouts, the epilogues below plugged into tc_gemm_store_tile, which hands each thread its accumulator
// pairs (row g, columns 2t, 2t+1 of each 16x8 mma tile: the C/D fragment layout):
//   forward     A = A_prev (N, in) k-contiguous, B = W (out, in) k-contiguous;     M = N,   N = out, K = in
//   input_grad  A = δ (N, out) k-contiguous,     B = W (out, in) n-contiguous;     M = N,   N = in,  K = out
//   weight_grad A = δ (N, out) m-contiguous,     B = A_prev (N, in) n-contiguous;  M = out, N = in,  K = N
// weight_grad's K is the batch: with gridDim.z = slices > 1, slice z takes rows [z·k_per_split, (z+1)·k_per_split)
// (the operands' base pointers moved by k_begin rows) and writes partial sums to dW + z·out·in, db + z·out;
// dense_backward.cu's weight_grad_reduce_kernel<float> adds them in slice order. db comes from the δ tiles in
// shared memory (tc_gemm_block_tile's slice hook: threads tid < 128 each sum one column of the 128 x BK δ tile,
// zero past the matrix, in k order): no second pass over δ. No atomics anywhere: bit-identical run to run.
//
// Launch: GEMMs grid (ceil(M/128), ceil(N/128), slices), block 256 (TcGemmShape's defaults); __launch_bounds__
// (256, TC_GEMM_MIN_BLOCKS): 2 blocks an SM (<= 128 registers), 1 for tf32 with a D-contiguous operand;
// 48 KiB static shared memory. to_storage_kernel: block 256, grid-stride.
// ptxas (NVRTC 13.0, sm_90 / sm_80), no spills, no stack frame: forward 122/120 registers (bf16, fp16),
// 119/124 (tf32); input_grad 128/126 (bf16, fp16), 156/160 (tf32, 1 block an SM); weight_grad 128/124 (bf16,
// fp16), 204/197 (tf32, 1 block an SM); to_storage 12.
// Memory traffic (e = operand bytes: 2 for bf16/fp16, 4 for tf32): the GEMM core's (gemm_tc.cuh: A read
// ceil(N/128) times, B ceil(M/128) times, mostly from L2), plus the epilogues: forward writes Z (4 bytes) and
// A (2 or 4) per element of (N, out) and reads b; input_grad writes δ_prev (e' = 2 or 4) and, masked, reads
// Z_prev (4) or A_prev (e'); weight_grad writes dW (4·out·in·slices; the reduce reads them again). FLOPs:
// 2·N·in·out each. These are design numbers: nothing here has run on a GPU.
#include "common.cuh"
#include "gemm_tc.cuh"

// ---------------------------------------------------------------------------------------------------------
// to_storage_kernel: dst[i] = F::encode(src[i]) (RNE), i < size; one element a thread, grid-stride.

template <typename F>
__global__ void __launch_bounds__(256)
to_storage_kernel(const float* __restrict__ src, typename F::Bits* __restrict__ dst, long long size) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
         i += (long long)gridDim.x * blockDim.x)
        dst[i] = F::encode(src[i]);
}

// ---------------------------------------------------------------------------------------------------------
// pair access: a row pointer + n is 2-element aligned when the base is and the row length is even (n is even)

template <typename F>
__device__ __forceinline__ bool pairs_aligned(const typename F::Bits* p, long long ld) {
    return reinterpret_cast<unsigned long long>(p) % (2 * sizeof(typename F::Bits)) == 0 && ld % 2 == 0;
}

// ---------------------------------------------------------------------------------------------------------
// dense_forward_tc_kernel, in two passes over this thread's accumulator pairs:
//   1. z = acc + b[n] -> Z (float32), unrolled (the accumulators must stay in registers: constant indices);
//   2. a = g(z) -> A, with z read back from Z (this thread's own stores: program order makes them visible to it),
//      in a loop that is not unrolled. NOTE: why two passes: g inlined into the unrolled loop (32 copies of
//      tanhf, expf and the switch over g) made NVRTC take ~20 s a kernel; the rolled loop has one copy, for
//      4·(N·out) bytes more read, from L1/L2, next to the GEMM's 2·N·in·out FLOPs.
// A is A_narrow in P's format when narrow (a hidden layer of a bf16/fp16 model), else A32 (float32: the output
// layer); the other pointer is not touched (pass any valid one). A32 may be Z (identity): pass 2 is skipped then.

struct TcBiasEpilogue {
    const float* b;
    float* Z;
    long long ld;   // = out
    int has_bias;
    bool aligned;

    __device__ __forceinline__ void operator()(int m, int n, const float (&acc)[2], int n_valid) const {
        float z[2] = {acc[0], acc[1]};
        if (has_bias) {
            z[0] += b[n];
            if (n_valid > 1) z[1] += b[n + 1];
        }
        store_pair<StoreF32>(Z + m * ld + n, z, n_valid, aligned);
    }
};

// fn(m, n, n_valid) for each accumulator pair of this thread inside (M, N), as tc_gemm_store_tile walks them,
// in a loop that is not unrolled (no accumulators: the pairs' places only)
template <typename S, typename Fn>
__device__ __forceinline__ void tc_for_each_pair_rolled(int M, int N, int m0, int n0, const Fn& fn) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int row0 = m0 + (warp / S::WARPS_N) * S::WM + lane / 4;
    const int col0 = n0 + (warp % S::WARPS_N) * S::WN + 2 * (lane % 4);
#pragma unroll 1
    for (int i = 0; i < S::MI * 2 * S::NI; ++i) {
        const int mi = i / (2 * S::NI), half = (i / S::NI) % 2, ni = i % S::NI;
        const int m = row0 + mi * 16 + half * 8, n = col0 + ni * 8;
        if (m < M && n < N) fn(m, n, N - n < 2 ? N - n : 2);
    }
}

template <typename F>
__device__ __forceinline__ void tc_activation_pass(const float* Z, typename F::Bits* A, long long ld, int act,
                                                   float alpha, bool aligned, int m, int n, int n_valid) {
    float v[2];
    load_pair<StoreF32>(Z + m * ld + n, v, n_valid, aligned);
    v[0] = activation_forward(act, v[0], alpha);
    v[1] = activation_forward(act, v[1], alpha);
    store_pair<F>(A + m * ld + n, v, n_valid, aligned);
}

template <typename P>
__global__ void __launch_bounds__(TcGemmShape<P>::THREADS, TC_GEMM_MIN_BLOCKS(P, true, true))
dense_forward_tc_kernel(const typename P::Storage* __restrict__ A_prev, const typename P::Storage* __restrict__ W,
                        const float* __restrict__ b, float* Z, float* A32, typename P::Format::Bits* A_narrow,
                        int narrow, int N, int n_in, int n_out, int has_bias, int act, double alpha) {
    typedef TcGemmShape<P> S;
    typedef typename P::Format F;
    const int m0 = blockIdx.x * S::BM, n0 = blockIdx.y * S::BN;
    float acc[S::MI][S::NI][4];
    // C (N, out) = Σ_k A_prev[m, k] · W[n, k]: both k-contiguous, rows of `in`
    tc_gemm_block_tile<P, S, true, true>(A_prev, n_in, W, n_in, N, n_out, n_in, m0, n0, acc);
    const bool z_aligned = pairs_aligned<StoreF32>(Z, n_out);
    tc_gemm_store_tile<S>(acc, N, n_out, m0, n0, TcBiasEpilogue{b, Z, n_out, has_bias, z_aligned});
    const float g_alpha = static_cast<float>(alpha);
    if (sizeof(typename F::Bits) == 2 && narrow) {
        const bool aligned = z_aligned && pairs_aligned<F>(A_narrow, n_out);
        tc_for_each_pair_rolled<S>(N, n_out, m0, n0, [&](int m, int n, int n_valid) {
            tc_activation_pass<F>(Z, A_narrow, n_out, act, g_alpha, aligned, m, n, n_valid);
        });
    } else if (A32 != Z) {
        const bool aligned = z_aligned && pairs_aligned<StoreF32>(A32, n_out);
        tc_for_each_pair_rolled<S>(N, n_out, m0, n0, [&](int m, int n, int n_valid) {
            tc_activation_pass<StoreF32>(Z, A32, n_out, act, g_alpha, aligned, m, n, n_valid);
        });
    }
}

// ---------------------------------------------------------------------------------------------------------
// input_grad_tc_kernel: v = acc; with mask_act >= 0, v = activation_mask(mask_act, v, Z_prev, A_prev) in float32
// (Z_prev float32, A_prev decoded); out = store(v). With narrow, out and A_prev are in P's format (out_narrow,
// A_prev_narrow), else float32 (out32, A_prev32); the other two pointers are not touched (pass any valid ones).
// out may be the same array as A_prev (or, float32, Z_prev): each element is read and written by the same thread.

// The mask as it is applied per pair: the same arithmetic as common.cuh's activation_mask (dA times g'), with
// the activation reduced once per kernel to what the pair needs, and the pairs' alignment fixed per loop
// (ALIGNED: every pair moves as one 4- or 8-byte access; else element by element). NOTE: activation_mask's
// switch and the per-pair alignment branches, inlined into the unrolled store loop (32 pairs), made NVRTC take
// ~10 s a kernel; four branch-light loops (format x alignment) take well under a second.
enum { TC_MASK_NONE = 0, TC_MASK_FROM_Z = 1, TC_MASK_SIGMOID = 2, TC_MASK_TANH = 3 };

template <typename F, bool ALIGNED>
struct TcInputGradEpilogue {
    typename F::Bits* out;
    const float* Z_prev;
    const typename F::Bits* A_prev;
    long long ld;   // = in
    int mask;       // TC_MASK_*
    float z_negative;   // g'(z) for z <= 0 with TC_MASK_FROM_Z: 0 (relu) or alpha (leaky_relu)

    __device__ __forceinline__ void operator()(int m, int n, const float (&acc)[2], int n_valid) const {
        float v[2] = {acc[0], acc[1]};
        const long long at = m * ld + n;
        if (mask == TC_MASK_FROM_Z) {
            float z[2];
            load_pair<StoreF32>(Z_prev + at, z, n_valid, ALIGNED);
            v[0] *= z[0] > 0.0f ? 1.0f : z_negative;
            v[1] *= z[1] > 0.0f ? 1.0f : z_negative;
        } else if (mask != TC_MASK_NONE) {
            float a[2];
            load_pair<F>(A_prev + at, a, n_valid, ALIGNED);
            const bool sigmoid = mask == TC_MASK_SIGMOID;
            v[0] *= sigmoid ? a[0] * (1.0f - a[0]) : 1.0f - a[0] * a[0];
            v[1] *= sigmoid ? a[1] * (1.0f - a[1]) : 1.0f - a[1] * a[1];
        }
        store_pair<F>(out + at, v, n_valid, ALIGNED);
    }
};

__device__ __forceinline__ int tc_mask_kind(int act) {
    return act == ACT_RELU || act == ACT_LEAKY_RELU ? TC_MASK_FROM_Z
         : act == ACT_SIGMOID ? TC_MASK_SIGMOID : act == ACT_TANH ? TC_MASK_TANH : TC_MASK_NONE;
}

template <typename P>
__global__ void __launch_bounds__(TcGemmShape<P>::THREADS, TC_GEMM_MIN_BLOCKS(P, true, false))
input_grad_tc_kernel(const typename P::Storage* __restrict__ delta, const typename P::Storage* __restrict__ W,
                     float* out32, typename P::Format::Bits* out_narrow, const float* Z_prev, const float* A_prev32,
                     const typename P::Format::Bits* A_prev_narrow, int narrow, int N, int n_in, int n_out,
                     int mask_act, double alpha) {
    typedef TcGemmShape<P> S;
    const int m0 = blockIdx.x * S::BM, n0 = blockIdx.y * S::BN;
    float acc[S::MI][S::NI][4];
    // C (N, in) = Σ_k δ[m, k] · W[k, n]: A = δ k-contiguous (ld out), B = W n-contiguous (ld in)
    tc_gemm_block_tile<P, S, true, false>(delta, n_out, W, n_in, N, n_in, n_out, m0, n0, acc);
    typedef typename P::Format F;
    const int mask = mask_act < 0 ? TC_MASK_NONE : tc_mask_kind(mask_act);
    const float z_negative = mask_act == ACT_LEAKY_RELU ? static_cast<float>(alpha) : 0.0f;
    // every array the epilogue touches pair-aligned: out, and Z_prev / A_prev when the mask reads them
    const bool z_ok = mask != TC_MASK_FROM_Z || pairs_aligned<StoreF32>(Z_prev, n_in);
    if (sizeof(typename F::Bits) == 2 && narrow) {
        const bool aligned = z_ok && pairs_aligned<F>(out_narrow, n_in) &&
                             (mask < TC_MASK_SIGMOID || pairs_aligned<F>(A_prev_narrow, n_in));
        if (aligned)
            tc_gemm_store_tile<S>(acc, N, n_in, m0, n0,
                                  TcInputGradEpilogue<F, true>{out_narrow, Z_prev, A_prev_narrow, n_in, mask, z_negative});
        else
            tc_gemm_store_tile<S>(acc, N, n_in, m0, n0,
                                  TcInputGradEpilogue<F, false>{out_narrow, Z_prev, A_prev_narrow, n_in, mask, z_negative});
    } else {
        const bool aligned = z_ok && pairs_aligned<StoreF32>(out32, n_in) &&
                             (mask < TC_MASK_SIGMOID || pairs_aligned<StoreF32>(A_prev32, n_in));
        if (aligned)
            tc_gemm_store_tile<S>(acc, N, n_in, m0, n0,
                                  TcInputGradEpilogue<StoreF32, true>{out32, Z_prev, A_prev32, n_in, mask, z_negative});
        else
            tc_gemm_store_tile<S>(acc, N, n_in, m0, n0,
                                  TcInputGradEpilogue<StoreF32, false>{out32, Z_prev, A_prev32, n_in, mask, z_negative});
    }
}

// ---------------------------------------------------------------------------------------------------------
// weight_grad_tc_kernel: slice z = blockIdx.z of K = [z·k_per_split, (z+1)·k_per_split) ∩ [0, N); dW, db point
// at slice 0 of the output (dense_backward.cu's weight_grad_kernel: the same contract). db is summed by the
// blocks of the first column tile (blockIdx.y == 0), thread tid < 128 for row m0 + tid of dW.

template <typename P, typename S>
struct TcDbHook {   // tc_gemm_block_tile's slice hook: sum += Σ_k δ(k, tid) over the slice's tile
    float& sum;
    bool active;
    __device__ __forceinline__ void operator()(const unsigned char* As, int tid) {
        typedef TcOperandTile<P, S, S::BM, false> TileA;
        if (active && tid < S::BM) {
#pragma unroll 8
            for (int k = 0; k < S::BK; ++k) sum += P::Format::decode(TileA::value(As, k, tid));
        }
    }
};

struct TcWeightGradEpilogue {
    float* dW;
    long long ld;   // = in
    int accumulate;
    bool aligned;

    __device__ __forceinline__ void operator()(int m, int n, const float (&acc)[2], int n_valid) const {
        float v[2] = {acc[0], acc[1]};
        float* p = dW + m * ld + n;
        if (accumulate) {
            float old[2];
            load_pair<StoreF32>(p, old, n_valid, aligned);
            v[0] += old[0], v[1] += old[1];
        }
        store_pair<StoreF32>(p, v, n_valid, aligned);
    }
};

template <typename P>
__global__ void __launch_bounds__(TcGemmShape<P>::THREADS, TC_GEMM_MIN_BLOCKS(P, false, false))
weight_grad_tc_kernel(const typename P::Storage* __restrict__ delta, const typename P::Storage* __restrict__ A_prev,
                      float* dW, float* db, int N, int n_in, int n_out, int k_per_split, int has_bias,
                      int accumulate) {
    typedef TcGemmShape<P> S;
    const int m0 = blockIdx.x * S::BM, n0 = blockIdx.y * S::BN;
    const int k_begin = blockIdx.z * k_per_split;
    const int k_end = N - k_begin < k_per_split ? N : k_begin + k_per_split;
    float* dW_slice = dW + (long long)blockIdx.z * n_out * n_in;
    const bool sum_delta = has_bias && blockIdx.y == 0;
    float acc[S::MI][S::NI][4];
    float db_sum = 0.0f;
    // C (out, in) = Σ_k δ[k, m] · A_prev[k, n] over this slice's rows k: A = δ m-contiguous (ld out),
    // B = A_prev n-contiguous (ld in), both from row k_begin on
    tc_gemm_block_tile<P, S, false, false>(delta + (long long)k_begin * n_out, n_out,
                                           A_prev + (long long)k_begin * n_in, n_in, n_out, n_in, k_end - k_begin,
                                           m0, n0, acc, TcDbHook<P, S>{db_sum, sum_delta});
    const TcWeightGradEpilogue epi{dW_slice, n_in, accumulate, pairs_aligned<StoreF32>(dW_slice, n_in)};
    tc_gemm_store_tile<S>(acc, n_out, n_in, m0, n0, epi);
    if (sum_delta && threadIdx.x < S::BM && m0 + (int)threadIdx.x < n_out) {
        float* p = db + (long long)blockIdx.z * n_out + m0 + threadIdx.x;
        *p = accumulate ? *p + db_sum : db_sum;
    }
}
