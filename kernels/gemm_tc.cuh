// gemm_tc.cuh: the tensor-core GEMM core (sm_80+), beside gemm.cuh's FP32 SIMT core (issue 12, step 1).
//
//   C (M, N) = Σ_k round_P(A(m, k)) · round_P(B(n, k))      accumulated in fp32
//
// P, the operand precision, is a tag type: TcBf16, TcFp16 (operands stored as 16-bit raw bits, `unsigned
// short`, already in the format), TcTf32 (operands stored as float32, rounded to tf32 here, nearest even:
// tensor_core.cuh's tf32_round, the same as gpubp/precision.py's round_tf32). The numpy reference is
// gpubp.precision.reference_gemm. Each operand is row-major in one of two layouts, as in gemm.cuh:
//   A(m, k) = A_KCONTIG ? A[m*lda + k] : A[k*lda + m]      B(n, k) = B_KCONTIG ? B[n*ldb + k] : B[k*ldb + n]
// so the three products of a dense layer need no transposed copies:
//   dense_forward  Z = A_prev · Wᵀ   A = A_prev (N, in) k-contig,   B = W (out, in) k-contig
//   input_grad     dA_prev = δ · W   A = δ (N, out) k-contig,       B = W (out, in) n-contig
//   weight_grad    dW = δᵀ · A_prev  A = δ (N, out) m-contig,       B = A_prev (N, in) n-contig
//
// Instructions (tensor_core.cuh; PTX ISA 9.0, "Warp-level matrix multiply-accumulate instructions"):
//   bf16/fp16: mma.sync.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32    tf32: mma.sync.m16n8k8 ...tf32...f32
// Fragment layouts relied on (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" and
// "Matrix Fragments for mma.m16n8k8"; g = lane/4, t = lane%4):
//   16-bit A regs a0..a3 hold (row g, k 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)
//   16-bit B regs b0, b1 hold (k 2t..2t+1, n g), (k 2t+8.., n g)
//   tf32   A regs a0..a3 hold (g, t), (g+8, t), (g, t+4), (g+8, t+4);  B regs b0, b1: (k t, n g), (k t+4, n g)
//   C/D regs c0..c3 hold (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
// Seen as bytes, the 16-bit and tf32 layouts agree: each A fragment is a 16-row x 32-byte patch (16 halves
// or 8 tf32 along k) cut into four 8-row x 16-byte matrices, (rows 0-7, bytes 0-15), (8-15, 0-15), (0-7,
// 16-31), (8-15, 16-31) for registers 0..3, and each lane's register i is (row lane/4, bytes 4(lane%4)..+3)
// of matrix i; a B fragment is an 8(n) x 32-byte patch in the same way. That is exactly what ldmatrix.x4
// (PTX ISA, "Warp-level matrix load instruction: ldmatrix") delivers from K-contiguous shared rows, so for
// K-contiguous operands one load path serves all three precisions. A D-contiguous operand (m- or
// n-contiguous) is kept in shared memory as k-rows; for 16-bit types ldmatrix.x4.trans turns its 8x8
// matrices into the same fragments ((k 2t..2t+1, column g) of each stored k x d matrix); for tf32, which
// .trans cannot move (16-bit elements only), each fragment register is one 32-bit shared load.
//
// Tiles: block BM x BN = 128 x 128, 8 warps as 2 (m) x 4 (n), warp tile 64 x 32 = MI 4 x NI 4 mma tiles of
// 16 x 8; 64 fp32 accumulators a thread. K is walked in slices of 64 bytes a row: BK = 32 (16-bit) or 16
// (tf32), two mma k-steps each. Per k-step a warp issues 4 + 2 ldmatrix.x4 for 16 mma.
// Pipeline: STAGES = 3 shared buffers filled by cp.async (16-byte copies, .cg: L2 only), one commit group per
// slice; slice s+2 is in flight while slice s is computed. One __syncthreads per slice: after
// cp.async.wait_group(STAGES-2) it both publishes slice s (every thread's copies) and tells every warp that
// slice s-1 is done, so its buffer, (s+2) mod 3, can be refilled right after.
// Shared memory: STAGES x (BM + BN) x 64 bytes = 48 KiB, the static limit (no opt-in needed; 2 blocks an SM
// on sm_80 and sm_90), hence 3 stages, not 4. Rows are unpadded (padding would not fit in 48 KiB); their
// 16-byte chunks are XOR-swizzled instead (TcOperandTile::offset), so that every ldmatrix phase (8 rows at
// one logical chunk) and every tf32 scalar fragment load (4 k-rows x 8 columns) touches 8 distinct 16-byte
// bank groups: conflict-free. Unswizzled, K-contiguous 64-byte rows r and r+2 share banks (4-way conflicts)
// and D-contiguous rows (256 or 512 bytes) all do (8-way). cp.async writes whole rows, conflict-free.
// Edges (any M, N, K: 1, 7, 33, ...): a chunk past the matrix copies fewer bytes (cp.async's src-size),
// zero-filled, so no bounds checks in the mma loop and no read outside A or B. cp.async needs 16-byte aligned
// rows (lda, ldb multiples of 8 halves or 4 floats, aligned bases); otherwise each chunk is read element by
// element with bounds checks and stored to shared memory directly (correct, slower; the backend can pad).
//
// Memory traffic (per block, K elements of e bytes): (BM + BN)·K·e bytes read from L2/HBM for 2·BM·BN·K FLOP,
// 64 FLOP/byte for 16-bit operands (32 for tf32); over the grid A is read ceil(N/BN) times and B ceil(M/BM)
// times (L2 absorbs most of it: blockIdx.x runs along M, so consecutive blocks share their B tile). C is
// written once, 4 bytes an element. Occupancy: 256 threads x <= 128 registers (__launch_bounds__(256, 2)),
// 48 KiB shared: 2 blocks = 16 warps an SM; tf32 with a D-contiguous operand needs 157-183 registers (its
// scalar fragment loads) and runs 1 block an SM (gemm_tc.cu's TC_GEMM_MIN_BLOCKS). These are design
// numbers: nothing here has been run on a GPU or timed yet.
//
// The dense-layer epilogues (issue 12, step 2) are in kernels/dense_tc.cu: they plug into tc_gemm_store_tile
// as gemm.cuh's do (bias + activation for forward, the derivative mask for input_grad, 16-bit or float32
// stores), and weight_grad's db is summed from the δ tiles in shared memory through tc_gemm_block_tile's slice
// hook (split-K by moving the operands' base pointers, no change here).
// Later steps: W's 16-bit copy written by the optimizer's update (no conversion pass per GEMM); tf32
// producer-side rounding (epilogues that write tf32-rounded activations, so tf32 fragments need no cvt); tf32
// D-contiguous operands through registers into a K-contiguous shared layout (ldmatrix again, 2 blocks an SM).
//
// wgmma and TMA (sm_90a; what it would take, not done): wgmma.mma_async replaces mma.sync + ldmatrix: a
// warpgroup (4 warps, 128 threads) issues m64nNk16 MMAs (N up to 256) that read B, and A too if wanted,
// straight from shared memory through 64-bit matrix descriptors (start address, leading and stride byte
// offsets, swizzle mode), so the shared layout must be one of the canonical 32/64/128-byte swizzles the
// descriptor names (ours is a 16-byte-chunk XOR of our own: it would be replaced), and accumulators stay in
// registers (64x256 fp32 over 128 threads: 128 a thread, hence 2 consumer warpgroups of 64 rows for a 128-row
// tile); wgmma.fence / commit_group / wait_group order the asynchronous MMAs. Tiles come in by TMA,
// cp.async.bulk.tensor.2d with a CUtensorMap per operand built on the host (driver API cuTensorMapEncodeTiled:
// CuPy exposes no wrapper, so a small ctypes call into libcuda, and a map per (array, shape) to cache, which
// a CUDA graph must keep alive), one thread issuing a whole tile, completion counted on an mbarrier per stage
// (mbarrier.try_wait.parity in place of cp.async.wait_group + __syncthreads); a producer warp and consumer
// warpgroups (setmaxnreg to move registers to the consumers) instead of every warp doing both. Shared memory:
// 4-5 stages of 128x64 A + 256x64 B bf16 tiles are ~200 KiB, dynamic (cudaFuncSetAttribute
// MaxDynamicSharedMemorySize, above the 48 KiB static limit the emulation enforces). It compiles only for
// sm_90a (arch-specific: NVRTC -arch=sm_90a, a separate module), with this mma.sync path kept for sm_80 and as
// the fallback; the emulation would need wgmma's and TMA's semantics written out as tensor_core_cpu.h does for
// mma.sync. Why bother: on sm_90 mma.sync cannot keep the tensor cores at their peak rate, wgmma can (it is
// what cuBLAS runs there); bench/'s gemm row (ours against cupy.matmul in the same precision) measures the gap.
#ifndef GPUBP_GEMM_TC_CUH
#define GPUBP_GEMM_TC_CUH

#include "tensor_core.cuh"

// ---------------------------------------------------------------------------------------------------------
// operand precisions: storage type, mma k, the mma itself, and what a fragment needs before it (tf32: round)

struct TcBf16 {
    typedef unsigned short Storage;
    typedef StoreBf16 Format;   // storage.cuh: how a stored operand decodes to float (and floats encode)
    static constexpr int MMA_K = 16;
    __device__ __forceinline__ static void mma(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        mma_bf16_m16n8k16(acc, a, b);
    }
    template <int R>
    __device__ __forceinline__ static void prepare(unsigned (&)[R]) {}
};

struct TcFp16 {
    typedef unsigned short Storage;
    typedef StoreFp16 Format;
    static constexpr int MMA_K = 16;
    __device__ __forceinline__ static void mma(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        mma_f16_m16n8k16(acc, a, b);
    }
    template <int R>
    __device__ __forceinline__ static void prepare(unsigned (&)[R]) {}
};

// NOTE: tf32 operands are rounded per fragment, after ldmatrix, not once in shared memory: a shared-memory
// pass would cost each thread 32 extra loads and stores per slice and a second barrier, while fragments cost
// one cvt (sm_90) per register. A producer kernel that writes tf32-rounded data could skip it (later step).
struct TcTf32 {
    typedef float Storage;
    typedef StoreF32 Format;    // stored as float32, not rounded: the GEMM rounds its fragments
    static constexpr int MMA_K = 8;
    __device__ __forceinline__ static void mma(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        mma_tf32_m16n8k8(acc, a, b);
    }
    template <int R>
    __device__ __forceinline__ static void prepare(unsigned (&r)[R]) {
#pragma unroll
        for (int i = 0; i < R; ++i) r[i] = tf32_round(float_from_bits(r[i]));
    }
};

template <typename P, int BM_ = 128, int BN_ = 128, int WARPS_M_ = 2, int WARPS_N_ = 4, int STAGES_ = 3>
struct TcGemmShape {
    typedef typename P::Storage Storage;
    static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
    static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int ROW_BYTES = 64;                             // one slice of one shared row
    static constexpr int CHUNKS = ROW_BYTES / 16;                   // 16-byte chunks a row (cp.async size)
    static constexpr int VEC = 16 / sizeof(Storage);                // elements a chunk
    static constexpr int BK = ROW_BYTES / sizeof(Storage);          // 32 halves or 16 floats
    static constexpr int K_STEPS = BK / P::MMA_K;                   // 2: each k-step reads 32 bytes a row
    static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;      // warp tile
    static constexpr int MI = WM / 16, NI = WN / 8;                 // mma tiles a warp
    static constexpr int STAGE_BYTES = (BM + BN) * ROW_BYTES;
    static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;
    static_assert(K_STEPS * 32 == ROW_BYTES, "a k-step is 32 bytes of a row (two ldmatrix matrices wide)");
    static_assert(WM % 16 == 0 && WN % 16 == 0, "B fragments are loaded two n8 tiles at a time");
    static_assert((BM * CHUNKS) % THREADS == 0 && (BN * CHUNKS) % THREADS == 0, "whole chunks a thread");
    static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory is limited to 48 KiB");
};

// Blocks per SM asked of the register allocator (__launch_bounds__'s second argument) by every kernel on this
// core: 2 (<= 128 registers a thread: 64 accumulators, fragments, addresses), except for tf32 with a
// D-contiguous operand, whose fragments come from scalar shared loads (ldmatrix.trans moves 16-bit elements
// only), each with its swizzled address: at 128 registers ptxas spills them (112-148 bytes, sm_90/sm_80), so
// they get 1 block (8 warps) an SM for now.
#define TC_GEMM_MIN_BLOCKS(P, A_KCONTIG, B_KCONTIG) (sizeof(typename P::Storage) == 4 && !((A_KCONTIG) && (B_KCONTIG)) ? 1 : 2)

// One operand's slice in shared memory (D = BM or BN rows of the tile's m or n, by BK of k), its copy from
// global memory and its fragments. A K-contiguous operand is stored as D rows of 64 bytes (its k run);
// a D-contiguous one (KCONTIG = false: input_grad's W, weight_grad's δ and A_prev) as BK rows of D elements
// (256 bytes for 16-bit types, 512 for tf32), so every global row segment is copied whole either way.
// Both take D x 64 bytes. Chunk c (16 bytes) of shared row r is stored at chunk c ^ swizzle(r):
//   K-contiguous: (r / 2) % 4     ldmatrix reads rows r..r+7 (r % 8 = 0) at one chunk; two 64-byte rows share
//                                 a 128-byte bank line, the XOR gives each pair its own chunk slots
//   D-contiguous, 16-bit: r % 8   ldmatrix.trans reads k-rows r..r+7 (256 bytes apart: same banks unswizzled)
//   D-contiguous, tf32: 2 (r % 4) a scalar fragment load reads k-rows t = 0..3 (512 bytes apart) x 8
//                                 consecutive columns (two chunks, the first even): 8 distinct chunks
template <typename P, typename S, int D, bool KCONTIG>
struct TcOperandTile {
    typedef typename P::Storage Storage;
    static constexpr int ROW_BYTES = KCONTIG ? S::ROW_BYTES : D * static_cast<int>(sizeof(Storage));
    static constexpr int ROWS = KCONTIG ? D : S::BK;
    static constexpr int ROW_CHUNKS = ROW_BYTES / 16;
    static constexpr int PER_THREAD = ROWS * ROW_CHUNKS / S::THREADS;
    static_assert(ROWS * ROW_CHUNKS % S::THREADS == 0, "whole chunks a thread");
    static_assert(ROWS * ROW_BYTES == D * S::ROW_BYTES, "both layouts take the same shared memory");

    __device__ __forceinline__ static int offset(int row, int chunk) {
        const int swizzle = KCONTIG ? (row >> 1) & 3 : sizeof(Storage) == 2 ? row & 7 : (row & 3) << 1;
        return row * ROW_BYTES + ((chunk ^ swizzle) << 4);
    }

    // Starts the copy of X(d, k) for d in [d0, d0 + D), k in [k0, k0 + BK), X(d, k) = KCONTIG ? X[d*ld + k]
    // : X[k*ld + d]; zeros outside d < d_end, k < K. With vec_ok (X and its rows 16-byte aligned) the copy is
    // asynchronous, part of the caller's next commit group; otherwise it is done here, element by element.
    __device__ __forceinline__ static void load(unsigned char* dst, const Storage* __restrict__ X, long long ld,
                                                int d0, int d_end, int k0, int K, bool vec_ok, int tid) {
#pragma unroll
        for (int p = 0; p < PER_THREAD; ++p) {
            const int c = tid + p * S::THREADS;
            const int row = c / ROW_CHUNKS, chunk = c % ROW_CHUNKS;
            unsigned char* to = dst + offset(row, chunk);
            // the chunk's first element, and how many of its VEC exist (the run is along k or along d)
            const int gd = KCONTIG ? d0 + row : d0 + chunk * S::VEC;
            const int gk = KCONTIG ? k0 + chunk * S::VEC : k0 + row;
            const int run_end = KCONTIG ? K - gk : d_end - gd;
            const int n_valid = (gd < d_end && gk < K) ? (run_end < S::VEC ? run_end : S::VEC) : 0;
            const Storage* from = KCONTIG ? X + gd * ld + gk : X + gk * ld + gd;
            if (vec_ok) {
                // NOTE: a chunk with nothing to read still copies (16 zero bytes), from a valid aligned address
                cp_async_16(to, n_valid > 0 ? from : X, n_valid * static_cast<int>(sizeof(Storage)));
            } else {
                Storage v[S::VEC];
#pragma unroll
                for (int i = 0; i < S::VEC; ++i) v[i] = i < n_valid ? from[i] : Storage(0);
                unsigned* words = reinterpret_cast<unsigned*>(to);
#pragma unroll
                for (int w = 0; w < 4; ++w) {
                    if constexpr (sizeof(Storage) == 2) words[w] = v[2 * w] | (static_cast<unsigned>(v[2 * w + 1]) << 16);
                    else words[w] = float_bits(v[w]);
                }
            }
        }
    }

    // one 32-bit element of a D-contiguous tf32 tile
    __device__ __forceinline__ static unsigned element(const unsigned char* tile, int k, int d) {
        return *reinterpret_cast<const unsigned*>(tile + offset(k, d / 4) + (d % 4) * 4);
    }

    // element (k, d) of a D-contiguous tile, any storage (weight_grad's db reads δ's tile through it)
    __device__ __forceinline__ static Storage value(const unsigned char* tile, int k, int d) {
        static_assert(!KCONTIG, "k-rows of a D-contiguous tile");
        return *reinterpret_cast<const Storage*>(tile + offset(k, d / S::VEC) + (d % S::VEC) * sizeof(Storage));
    }

    // The A fragment (4 registers) of the 16 x MMA_K block at tile row m, k-step ks (layouts at the top).
    //   K-contiguous: ldmatrix.x4, matrices (rows +0, chunk +0), (+8, +0), (+0, +1), (+8, +1) = a0..a3
    //   D-contiguous 16-bit: ldmatrix.x4.trans of k-rows, matrices (m +0, k +0), (+8, +0), (+0, +8), (+8, +8)
    //   D-contiguous tf32: a_e = (m + g + 8(e%2), k t + 4(e/2)), one load each
    __device__ __forceinline__ static void fragment_a(unsigned (&a)[4], const unsigned char* tile, int m, int ks,
                                                      int lane) {
        if constexpr (KCONTIG) {
            ldmatrix_x4(a, tile + offset(m + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * ks + (lane >> 4)));
        } else if constexpr (sizeof(Storage) == 2) {
            ldmatrix_x4_trans(a, tile + offset(ks * 16 + (lane >> 4) * 8 + (lane & 7), m / 8 + ((lane >> 3) & 1)));
        } else {
            const int g = lane >> 2, t = lane & 3;
#pragma unroll
            for (int e = 0; e < 4; ++e) a[e] = element(tile, ks * 8 + t + 4 * (e >> 1), m + g + 8 * (e & 1));
        }
    }

    // The B fragments (2 registers each) of the MMA_K x 8 blocks at tile columns n and n + 8, k-step ks.
    //   K-contiguous: ldmatrix.x4, matrices (n +0, chunk +0), (+0, +1), (+8, +0), (+8, +1) = b0, b1 of n; of n+8
    //   D-contiguous 16-bit: ldmatrix.x4.trans, matrices (k +0, n +0), (+8, +0), (+0, +8), (+8, +8)
    //   D-contiguous tf32: b_e = (k t + 4e, n + g), one load each
    __device__ __forceinline__ static void fragment_b2(unsigned (&b0)[2], unsigned (&b1)[2], const unsigned char* tile,
                                                       int n, int ks, int lane) {
        unsigned d[4];
        if constexpr (KCONTIG) {
            ldmatrix_x4(d, tile + offset(n + (lane & 7) + (lane >> 4) * 8, 2 * ks + ((lane >> 3) & 1)));
        } else if constexpr (sizeof(Storage) == 2) {
            ldmatrix_x4_trans(d, tile + offset(ks * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), n / 8 + (lane >> 4)));
        } else {
            const int g = lane >> 2, t = lane & 3;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                d[e] = element(tile, ks * 8 + t + 4 * e, n + g);
                d[2 + e] = element(tile, ks * 8 + t + 4 * e, n + 8 + g);
            }
        }
        b0[0] = d[0], b0[1] = d[1], b1[0] = d[2], b1[1] = d[3];
    }
};

// ---------------------------------------------------------------------------------------------------------
// One block's tile: acc[mi][ni] = the 16x8 mma tile (mi, ni) of this warp (C/D fragment layout) of
// Σ_{k < K} A(m, k) B(n, k) over the block tile at (m0, n0). Every thread of the block must call it.
// hook(As, tid) runs once per slice, by every thread, while slice s's A tile As (BM x BK, zero past M and K)
// is in shared memory and published (after the slice's barrier, before the next one): weight_grad's db sums
// δ from it (dense_tc.cu). The default does nothing.

struct TcNoSliceHook {
    __device__ __forceinline__ void operator()(const unsigned char*, int) {}
};

template <typename P, typename S, bool A_KCONTIG, bool B_KCONTIG, typename SliceHook = TcNoSliceHook>
__device__ __forceinline__ void tc_gemm_block_tile(const typename P::Storage* __restrict__ A, long long lda,
                                                   const typename P::Storage* __restrict__ B, long long ldb,
                                                   int M, int N, int K, int m0, int n0,
                                                   float (&acc)[S::MI][S::NI][4],
                                                   SliceHook hook = SliceHook()) {
    __shared__ __align__(128) unsigned char smem[S::SMEM_BYTES];

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int warp_m = warp / S::WARPS_N, warp_n = warp % S::WARPS_N;
    const bool a_vec = reinterpret_cast<unsigned long long>(A) % 16 == 0 && lda % S::VEC == 0;
    const bool b_vec = reinterpret_cast<unsigned long long>(B) % 16 == 0 && ldb % S::VEC == 0;

#pragma unroll
    for (int mi = 0; mi < S::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < S::NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

    typedef TcOperandTile<P, S, S::BM, A_KCONTIG> TileA;
    typedef TcOperandTile<P, S, S::BN, B_KCONTIG> TileB;
    const int slices = (K + S::BK - 1) / S::BK;
    auto load = [&](int slice) {   // slice `slice` into buffer slice % STAGES
        unsigned char* stage = smem + (slice % S::STAGES) * S::STAGE_BYTES;
        TileA::load(stage, A, lda, m0, M, slice * S::BK, K, a_vec, tid);
        TileB::load(stage + S::BM * S::ROW_BYTES, B, ldb, n0, N, slice * S::BK, K, b_vec, tid);
    };

    // Prologue: STAGES-1 slices in flight. A group is committed even when it is empty (past the last slice),
    // so that "wait until at most STAGES-2 groups are pending" always means "slice s has landed".
#pragma unroll
    for (int s = 0; s < S::STAGES - 1; ++s) {
        if (s < slices) load(s);
        cp_async_commit();
    }

    for (int s = 0; s < slices; ++s) {
        cp_async_wait<S::STAGES - 2>();   // this thread's copies of slice s have landed
        __syncthreads();                  // everyone's have; and everyone is done with slice s-1's buffer
        if (s + S::STAGES - 1 < slices) load(s + S::STAGES - 1);
        cp_async_commit();

        const unsigned char* As = smem + (s % S::STAGES) * S::STAGE_BYTES;
        const unsigned char* Bs = As + S::BM * S::ROW_BYTES;
        hook(As, tid);
#pragma unroll
        for (int ks = 0; ks < S::K_STEPS; ++ks) {
            // All of the k-step's B fragments (NI x 2 registers), then A one m16 tile at a time (4 registers
            // live, not MI x 4: ptxas may still hoist the loads where registers allow).
            unsigned b[S::NI][2];
#pragma unroll
            for (int nj = 0; nj < S::NI / 2; ++nj) {
                TileB::fragment_b2(b[2 * nj], b[2 * nj + 1], Bs, warp_n * S::WN + nj * 16, ks, lane);
                P::prepare(b[2 * nj]);
                P::prepare(b[2 * nj + 1]);
            }
#pragma unroll
            for (int mi = 0; mi < S::MI; ++mi) {
                unsigned a[4];
                TileA::fragment_a(a, As, warp_m * S::WM + mi * 16, ks, lane);
                P::prepare(a);
#pragma unroll
                for (int ni = 0; ni < S::NI; ++ni) P::mma(acc[mi][ni], a, b[ni]);
            }
        }
    }
    // Only empty groups can be pending here, but a block must not end with copies into shared memory that the
    // next block on this SM may own: wait for all (free when there are none).
    cp_async_wait<0>();
}

// Hands each pair of accumulators that lies inside C to epi(m, n, values, n_valid): row m, columns n, n + 1
// (n_valid = 1 at the right edge of an odd N). n is even.
template <typename S, typename Epilogue>
__device__ __forceinline__ void tc_gemm_store_tile(const float (&acc)[S::MI][S::NI][4], int M, int N, int m0, int n0,
                                                   const Epilogue& epi) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int row0 = m0 + (warp / S::WARPS_N) * S::WM + lane / 4;
    const int col0 = n0 + (warp % S::WARPS_N) * S::WN + 2 * (lane % 4);
#pragma unroll
    for (int mi = 0; mi < S::MI; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {   // c0, c1 at row g; c2, c3 at row g + 8
            const int m = row0 + mi * 16 + half * 8;
            if (m >= M) continue;
#pragma unroll
            for (int ni = 0; ni < S::NI; ++ni) {
                const int n = col0 + ni * 8;
                if (n >= N) continue;
                float v[2] = {acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]};
                epi(m, n, v, N - n < 2 ? N - n : 2);
            }
        }
}

#endif  // GPUBP_GEMM_TC_CUH
