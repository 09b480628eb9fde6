// gemm.cuh: the tiled GEMM core shared by dense_forward, input_grad and weight_grad.
//
//   C (M, N) = Σ_k A(m, k) · B(k, n)       over k in [k_begin, k_end)  (a split-K slice, or all of K)
//
// Each operand is row-major in memory, in one of two layouts (ld = the row length in memory):
//   A(m, k) = A_KCONTIG ? A[m*lda + k] : A[k*lda + m]
//   B(k, n) = B_KCONTIG ? B[n*ldb + k] : B[k*ldb + n]
// so the three products of a dense layer need no transposed copies:
//   dense_forward  Z = A_prev · Wᵀ   A = A_prev (N, in) k-contig,   B = W (out, in) k-contig
//   input_grad     dA_prev = δ · W   A = δ (N, out) k-contig,       B = W (out, in) n-contig
//   weight_grad    dW = δᵀ · A_prev  A = δ (N, out) m-contig,       B = A_prev (N, in) n-contig
//
// Work split: a block computes a BM x BN tile of C with THREADS = (BM/TM)·(BN/TN) threads; each thread
// keeps a TM x TN accumulator in registers (register blocking: per k it loads TM + TN values from shared
// memory for TM·TN FMAs). K is walked BK at a time through two shared-memory buffers: while the block
// computes on one, each thread holds the next BK slice of A and B in registers and stores it to the other
// buffer afterwards (one __syncthreads per slice).
//   - shared tiles are stored k-major, As[k][m] and Bs[k][n], padded by 4 elements per row: a k-contiguous
//     operand is transposed on the way in, and the padding puts the two halves of a warp's transposed
//     stores in different banks; fragment reads are then 16-byte vectors from consecutive addresses.
//   - a thread's TM rows are two runs of TM/2, BM/2 apart (TM >= 8), not one run of TM (likewise columns),
//     and each warp is an 8 x 4 patch of threads (GemmShape::thread_x/y): per k, a warp's fragment reads
//     are then 16-byte vectors from 128 (Bs) and 64 (As) consecutive bytes, one wavefront each, no conflicts.
//   - global loads are 16-byte vectors (float4 / double2) where the operand's rows are 16-byte aligned and
//     the slice is whole; at the matrix edges (any M, N, K: 1, 7, 33, ...) they fall back to element loads
//     that read zeros outside the matrix, so the FMAs need no bounds checks.
// The epilogue (what is done with each run of RUN_N accumulators: bias, activation, mask, accumulate) is a
// functor of the calling kernel: gemm_store_tile hands it (m, n, values, how many of the run exist).
#ifndef GPUBP_GEMM_CUH
#define GPUBP_GEMM_CUH

#include "common.cuh"

template <int BM, int BN, int BK, int TM, int TN>
struct GemmShape {
    static constexpr int THREADS_X = BN / TN;   // threads along n
    static constexpr int THREADS_Y = BM / TM;   // threads along m
    static constexpr int THREADS = THREADS_X * THREADS_Y;
    static constexpr int GM = TM >= 8 ? 2 : 1;  // runs of rows per thread
    static constexpr int GN = TN >= 8 ? 2 : 1;  // runs of columns per thread
    static constexpr int RUN_M = TM / GM;
    static constexpr int RUN_N = TN / GN;
    static constexpr int PAD = 4;               // shared row padding (elements), keeps rows 16-byte aligned

    // Thread (tx, ty) of thread tid: each warp is an 8 x 4 patch of threads (8 along n, 4 along m), not the
    // 32 x 1 of tid order, so that per k a warp reads 8 distinct 16-byte vectors of Bs (128 bytes) and 4 of
    // As (64 bytes): one shared-memory wavefront each. As a 16 x 2 patch it would read 256 bytes of Bs, two
    // wavefronts per load, and the 8x8 tile would wait on shared memory rather than on its FMAs.
    static constexpr int WARP_X = 8, WARP_Y = 4;
    static_assert(THREADS_X % WARP_X == 0 && THREADS_Y % WARP_Y == 0 && THREADS % 32 == 0, "warp patches");
    __device__ __forceinline__ static int thread_x(int tid) {
        return (tid / 32) % (THREADS_X / WARP_X) * WARP_X + tid % WARP_X;
    }
    __device__ __forceinline__ static int thread_y(int tid) {
        return (tid / 32) / (THREADS_X / WARP_X) * WARP_Y + (tid % 32) / WARP_X;
    }
};

// Blocks per SM a GEMM kernel asks the register allocator to allow (__launch_bounds__'s second argument),
// chosen so that nothing spills (check with nvcc -Xptxas -v): with the 8x8 tile, 2 blocks of float (<= 128
// registers a thread) and 1 of double (its 64 accumulators alone take 128 registers); with the 4x4 tile,
// 4 blocks of float (<= 64 registers) and 2 of double.
#define GEMM_MIN_BLOCKS(T, TM, TN) \
    ((TM) * (TN) >= 64 ? (sizeof(T) == 4 ? 2 : 1) : (sizeof(T) == 4 ? 4 : 2))

// ---------------------------------------------------------------------------------------------------------
// Global -> registers -> shared for one operand's BK slice: D rows of the tile's m (or n) by BK of k.
// Work is cut into 16-byte chunks of VEC elements along the operand's contiguous dimension.

template <typename T, int D, int BK, int THREADS, bool KCONTIG>
struct TileLoader {
    static constexpr int VEC = Vec16<T>::n;
    static constexpr int CHUNKS = D * BK / VEC;
    static constexpr int PER_THREAD = (CHUNKS + THREADS - 1) / THREADS;
    static_assert(BK % VEC == 0 && D % VEC == 0, "tile sides must be multiples of a 16-byte vector");

    T regs[PER_THREAD][VEC];

    // first element of chunk c, as (d, k) inside the tile
    __device__ __forceinline__ static void chunk_origin(int c, int& d, int& k) {
        if (KCONTIG) { d = c / (BK / VEC); k = (c % (BK / VEC)) * VEC; }
        else         { k = c / (D / VEC);  d = (c % (D / VEC)) * VEC; }
    }

    // X(d, k) for d in [d0, d0 + D) ∩ [0, d_end), k in [k0, k0 + BK) ∩ [.., k_end); zeros outside
    __device__ __forceinline__ void load(const T* __restrict__ X, long long ld, int d0, int d_end,
                                         int k0, int k_end, bool vec_ok, int tid) {
#pragma unroll
        for (int p = 0; p < PER_THREAD; ++p) {
            const int c = tid + p * THREADS;
            if (CHUNKS % THREADS != 0 && c >= CHUNKS) continue;
            int d, k;
            chunk_origin(c, d, k);
            const int gd = d0 + d, gk = k0 + k;
            if (KCONTIG) {
                if (vec_ok && gd < d_end && gk + VEC <= k_end) {
                    load16(X + gd * ld + gk, regs[p]);
                } else {
#pragma unroll
                    for (int i = 0; i < VEC; ++i)
                        regs[p][i] = (gd < d_end && gk + i < k_end) ? X[gd * ld + gk + i] : T(0);
                }
            } else {
                if (vec_ok && gk < k_end && gd + VEC <= d_end) {
                    load16(X + gk * ld + gd, regs[p]);
                } else {
#pragma unroll
                    for (int i = 0; i < VEC; ++i)
                        regs[p][i] = (gk < k_end && gd + i < d_end) ? X[gk * ld + gd + i] : T(0);
                }
            }
        }
    }

    // S is [BK][STRIDE], k-major
    template <int STRIDE>
    __device__ __forceinline__ void store(T* S, int tid) const {
#pragma unroll
        for (int p = 0; p < PER_THREAD; ++p) {
            const int c = tid + p * THREADS;
            if (CHUNKS % THREADS != 0 && c >= CHUNKS) continue;
            int d, k;
            chunk_origin(c, d, k);
            if (KCONTIG) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) S[(k + i) * STRIDE + d] = regs[p][i];   // transpose
            } else {
                store16(S + k * STRIDE + d, regs[p]);
            }
        }
    }
};

// ---------------------------------------------------------------------------------------------------------
// One block's tile: acc = Σ_{k in [k_begin, k_end)} A(m, k) B(k, n) for the thread's TM x TN elements of
// the tile at (m0, n0). With sum_a, threads tid < BM also return a_sum = Σ_k A(m0 + tid, k) (weight_grad's
// db = Σₙ δₙ, taken from the tiles already in shared memory: the bias gradient in the same pass).

template <typename T, int BM, int BN, int BK, int TM, int TN, bool A_KCONTIG, bool B_KCONTIG>
__device__ __forceinline__ void gemm_block_tile(const T* __restrict__ A, long long lda,
                                                const T* __restrict__ B, long long ldb,
                                                int M, int N, int m0, int n0, int k_begin, int k_end,
                                                T (&acc)[TM][TN], bool sum_a, T& a_sum) {
    typedef GemmShape<BM, BN, BK, TM, TN> S;
    constexpr int VEC = Vec16<T>::n;
    static_assert(S::RUN_M % VEC == 0 && S::RUN_N % VEC == 0, "thread runs must be whole 16-byte vectors");
    static_assert(S::THREADS >= BM, "sum_a needs a thread per tile row");

    __shared__ __align__(16) T As[2][BK][BM + S::PAD];
    __shared__ __align__(16) T Bs[2][BK][BN + S::PAD];

    const int tid = threadIdx.x;
    const int tx = S::thread_x(tid), ty = S::thread_y(tid);
    TileLoader<T, BM, BK, S::THREADS, A_KCONTIG> a_loader;
    TileLoader<T, BN, BK, S::THREADS, B_KCONTIG> b_loader;
    const bool a_vec = rows_aligned16(A, lda), b_vec = rows_aligned16(B, ldb);

#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
    a_sum = T(0);

    const int num_slices = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;
    if (num_slices == 0) return;  // uniform over the block: no __syncthreads is skipped by part of it

    a_loader.load(A, lda, m0, M, k_begin, k_end, a_vec, tid);
    b_loader.load(B, ldb, n0, N, k_begin, k_end, b_vec, tid);
    a_loader.template store<BM + S::PAD>(&As[0][0][0], tid);
    b_loader.template store<BN + S::PAD>(&Bs[0][0][0], tid);
    __syncthreads();

    for (int s = 0; s < num_slices; ++s) {
        const int buf = s & 1;
        const bool more = s + 1 < num_slices;
        if (more) {  // prefetch the next slice into registers; its latency hides behind the FMAs below
            const int k0 = k_begin + (s + 1) * BK;
            a_loader.load(A, lda, m0, M, k0, k_end, a_vec, tid);
            b_loader.load(B, ldb, n0, N, k0, k_end, b_vec, tid);
        }
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            T a[TM], b[TN];
#pragma unroll
            for (int g = 0; g < S::GM; ++g)
#pragma unroll
                for (int j = 0; j < S::RUN_M; j += VEC)
                    load16(&As[buf][kk][g * (BM / S::GM) + ty * S::RUN_M + j], a + g * S::RUN_M + j);
#pragma unroll
            for (int g = 0; g < S::GN; ++g)
#pragma unroll
                for (int j = 0; j < S::RUN_N; j += VEC)
                    load16(&Bs[buf][kk][g * (BN / S::GN) + tx * S::RUN_N + j], b + g * S::RUN_N + j);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
        if (sum_a && tid < BM) {
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) a_sum += As[buf][kk][tid];  // zero-filled past k_end
        }
        if (more) {
            a_loader.template store<BM + S::PAD>(&As[buf ^ 1][0][0], tid);
            b_loader.template store<BN + S::PAD>(&Bs[buf ^ 1][0][0], tid);
        }
        __syncthreads();
    }
}

// Hands each run of RUN_N consecutive accumulators that lies inside C to epi(m, n, values, n_valid):
// row m, columns n .. n + n_valid - 1 (n_valid < RUN_N only at the right edge). n is a multiple of RUN_N,
// so a run starts 16-byte aligned whenever C's rows do.
template <typename T, int BM, int BN, int BK, int TM, int TN, typename Epilogue>
__device__ __forceinline__ void gemm_store_tile(const T (&acc)[TM][TN], int M, int N, int m0, int n0,
                                                const Epilogue& epi) {
    typedef GemmShape<BM, BN, BK, TM, TN> S;
    const int tx = S::thread_x(threadIdx.x), ty = S::thread_y(threadIdx.x);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + (i / S::RUN_M) * (BM / S::GM) + ty * S::RUN_M + i % S::RUN_M;
        if (m >= M) continue;
#pragma unroll
        for (int g = 0; g < S::GN; ++g) {
            const int n = n0 + g * (BN / S::GN) + tx * S::RUN_N;
            if (n >= N) continue;
            T v[S::RUN_N];
#pragma unroll
            for (int j = 0; j < S::RUN_N; ++j) v[j] = acc[i][g * S::RUN_N + j];
            epi(m, n, v, N - n < S::RUN_N ? N - n : S::RUN_N);
        }
    }
}

#endif  // GPUBP_GEMM_CUH
