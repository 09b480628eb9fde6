// fused_mlp.cu: the fully fused MLP (issue 13): every layer of a batch tile in one kernel, forward and backward,
// bf16/fp16 tensor cores (mma.sync m16n8k16, fp32 accumulation). Numpy reference and the numerics contract:
// gpubp/fused.py (forward, backward); which models qualify: gpubp.fused.qualifies.
//
// A model of L + 1 Dense layers, L >= 1 hidden ones of width H (16, 32, 48, 64, 128: the template H),
// input width `in` (any), output width O (1..128). Hidden layers of other or of different widths w_l <= 128 run
// on the smallest H >= max w_l, zero-padded by the caller (gpubp/fused.py padded_shapes; "Padding" below): the
// kernels see one width H. In the seed's notation, for layer l with W_l (out, in):
//   forward   Z_l = A_l · W_lᵀ + b_l        A_{l+1} = g_l(Z_l)         A_0 = X
//   backward  δ = dA ⊙ g'(Z)                dA_prev = δ · W              (dW = δᵀ · A_prev: not here, below)
// fused_mlp_forward_kernel<P, H>   X (N, in) P -> every Z_l, A_{l+1} on chip; writes
//     out (N, O) float32 = g_L(Z_L) (inference, training = 0) or Z_L (training = 1, for the loss), and in
//     training hidden[l] (N, H) P = A_{l+1} for l < L (what backward and the weight gradients need).
//     With the loss fused (training, loss = 0 mse, 1 bce, 2 softmax_ce: gpubp/losses.py's ids; -1: none),
//     from targets y (N, O) float32: out = A = F(Z_L) (σ for bce, softmax for softmax_ce), delta_L (N, O) P
//     = round_P(S · ∂L/∂Z_L) with S = loss_scale[0] (float64 on the device: the fp16 loss scale of
//     gpubp/loss_scale.py; 1 for bf16), and row_loss (N,) float64 = each row's share of the unscaled L.
// fused_mlp_backward_kernel<P, H>  δ_L (N, O) P (the loss gradient ∂L/∂Z_L, rounded) -> for l = L-1 .. 0
//     δ_l = (δ_{l+1} · W_{l+1}) ⊙ g_l'  with g_l' from the stored A_{l+1} (relu/leaky_relu: A > 0 ⇔ Z > 0,
//     sigmoid A(1 − A), tanh 1 − A²), writing deltas[l] (N, H) P. dW_l = δ_lᵀ · A_l and db_l = Σ δ_l are
//     the per-layer tensor-core GEMM's job (weight_grad layout of gemm_tc.cu), from deltas and hidden.
// Every δ and A between layers is rounded to P once (RNE) and used as rounded: gpubp/fused.py's contract.
//
// Padding (the caller's, exact): a layer l < L whose output width w is below H gets zero rows in W_l and zero
// bias entries past w, and W_{l+1} zero columns past w. A padded unit j then has Z_j = 0 and A_j = g(0) (0.5
// for sigmoid, not 0), but every weight that reads A_j is 0, so A_j adds an exact 0 to every later product;
// backward, dA_j = δ · (column j of the next W) = 0, so δ_j = 0 · g'(A_j) = 0. The real units get the unpadded
// model's values up to the float32 accumulation adding exact zeros (an inf among the A can turn into NaN, a
// non-finite result either way). The padded columns of hidden and deltas hold g(0) and 0; backward reads
// hidden's back (g(0) is finite, so δ_j = 0 · g'(A_j) is 0); the caller's weight gradients read only the real
// columns. Cost: the kernels do H-wide work (FLOP, and the stored A and δ that bound the step) for every hidden
// layer, so a width w costs about what H costs.
//
// Arguments: weights is one P buffer W_0 (H, in), W_1 .. W_{L-1} (H, H), W_L (O, H), back to back, row-major,
// 16-byte aligned (hidden and output weights are copied with cp.async; W_0 falls back to element loads when
// `in` is not a multiple of 8). biases: float32, the vectors of the layers whose bit is set in bias_mask, back
// to back (H entries a hidden layer, O the output layer's). acts: layer l's activation id (gpubp/activations.py)
// at bits 3l..3l+2; alphas[l]: leaky_relu's slope. X has rows ldx >= in elements apart (any alignment:
// unaligned rows take the element path); with x_float = 1 the input is X32, float32 (the staged batch of
// gpubp's mixed-precision contract), rounded to P (RNE) as each slice is staged, and X is not read.
//
// Launch: grid ceil(N / 128), block 256 threads = 8 warps; warp w owns rows 16w..16w+15 of the block's tile
// for the whole network (any N: rows past N are computed on zeros and never stored, nor read).
// How a layer runs, per warp: Z (16 x H) is H/8 mma tiles of fp32 accumulators (C/D fragments), K = H in
// H/16 k-steps, the B fragments (weights) read from shared memory with ldmatrix. Then the epilogue (bias,
// g, round to P) turns the accumulators IN REGISTERS into the next layer's A fragments: for m16n8k16 the
// C/D layout of n-tiles 2j and 2j+1 is exactly the A layout of k-step j (below), so activations never touch
// shared memory and warps never wait for each other's rows; only the weights are shared (one copy a block).
//   input layer: K = in, walked 32 columns a slice: X's tile (128 x 32) and W_0's (H x 32) are copied by
//     cp.async into 2 stages (gemm_tc.cuh's TcOperandTile: 64-byte rows, XOR-swizzled chunks, zero fill past
//     N and in), A and B fragments by ldmatrix.x4; slice s + 1 is in flight while slice s is multiplied.
//   hidden and output layers: W_l whole in shared memory (rows of H + 8 elements: the 16-byte pad makes the
//     row stride an odd number of 16-byte units, so the 8 rows of each ldmatrix phase hit 8 distinct bank
//     groups, plain and .trans alike). It is copied (cp.async) while the warps run the previous layer's
//     epilogue: one buffer, two __syncthreads a layer. The output layer runs 16 columns at a time.
//   backward: the same, with the weights' B fragments by ldmatrix.x4.trans (dA = δ · W reads W n-contiguous).
//
// Fragment layouts relied on (PTX ISA 9.0, "Warp-level matrix multiply-accumulate instructions", subsection
// "Matrix Fragments for mma.m16n8k16 with floating point type"; g = lane / 4, t = lane % 4):
//   A regs a0..a3: (row g, k 2t..2t+1), (g+8, 2t..2t+1), (g, 2t+8..2t+9), (g+8, 2t+8..2t+9), low half = lower k
//   B regs b0, b1: (k 2t..2t+1, n g), (k 2t+8..2t+9, n g)
//   C/D regs c0..c3: (row g, n 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
// so C tile 2j's (c0, c1) packed = a0 of k-step j, its (c2, c3) = a1, tile 2j+1's (c0, c1) = a2, (c2, c3) = a3.
// ldmatrix (section "Warp-level matrix load instruction: ldmatrix"): see gemm_tc.cuh and fused_b_fragments.
// The conversions (cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32): fused_mlp.cuh.
//
// Memory traffic per block of 128 rows: X read once (128·in·2 bytes), each layer's weights once (H·in·2,
// H·H·2, O·H·2 bytes, from L2 after the first block), the biases; written: 128·O·4 bytes of out, and in
// training 128·L·H·2 bytes of hidden A (with the loss: y read, δ_L and the row losses written). Backward: δ_L
// and the L hidden A read once, 128·L·H·2 bytes of δ written. Per training sample, forward with the loss then
// backward: 2·in + 8·O (y, A) + 4·O (δ_L out and back) + 8 + 6·L·H (A out, A back, δ out) bytes of HBM for
// 2·(in·H + (L−1)·H² + H·O) + 2·(O·H + (L−1)·H²) FLOP; width 64 x 4 hidden, in = out = 64: ~2.4 KB for
// ~74 kFLOP, ~30 FLOP/byte, so at H100's ~3.3 TB/s the step is bound by the stored A and δ (which the
// per-layer weight-gradient GEMMs read once more), not by the tensor cores.
//
// Limits: shared memory per block = max(input stages 2 x (128 + H) x 64 bytes, weights 128 x (H + 8) x 2
// bytes) (output weights up to 128 rows share the buffer): H = 16: 18 KiB, 32: 20, 48: 22, 64: 24, 128: 34 KiB
// (static, under the 48 KiB no-opt-in limit). Registers: H/2 fp32 accumulators plus H/4 fragment registers a
// thread; __launch_bounds__(256, 2) (<= 128 registers: 16 warps an SM) up to H = 64, one block (8 warps) an SM
// at H = 128. ptxas (sm_90, NVRTC), forward / backward: H = 16: 84 / 88, 32: 108 / 84, 48: 115 / 86,
// 64: 124 / 104, 128: 174 / 204 (sm_80 within 6 of these), no spills (tests/test_fused_mlp.py prints and
// checks them; the fused loss costs the forward ~30). Why H <= 128: at H = 128 a thread holds 64 accumulators + 32 fragment registers;
// H = 256 would need 192 before any address or operand and spill. Widths between the instances run padded to
// the next one (Padding above: 65..128 all on H = 128); instances 80, 96, 112 would cut that padding, for more
// compile time and code. Why 128 rows a block:
// 8 warps x 16 rows share one copy of each layer's weights (H·H·2 bytes from L2 for 128·H·H·2 FLOP); more
// rows a warp would amortise the ldmatrix of B over more mma but doubles the accumulators (a later step for
// H <= 64). Nothing here has run on a GPU yet: the numbers are design numbers.
#include "common.cuh"
#include "fused_mlp.cuh"

// ---------------------------------------------------------------------------------------------------------
// shape

template <int H>
struct FusedShape {
    static constexpr int THREADS = 256, WARPS = 8, BM = 128;   // 16 rows a warp
    static constexpr int MAX_OUT = 128;
    static constexpr int NT = H / 8;                           // n-tiles of a hidden layer (accumulators)
    static constexpr int KT = H / 16;                          // k-steps of a layer that takes H inputs
    static constexpr int W_ROW_BYTES = (H + 8) * 2;            // weight rows in shared memory, padded
    static constexpr int W_ROWS = MAX_OUT > H ? MAX_OUT : H;
    static constexpr int WEIGHT_BYTES = W_ROWS * W_ROW_BYTES;
    static constexpr int STAGE_BYTES = (BM + H) * 64;          // X and W_0 slices of 32 16-bit columns
    static constexpr int INPUT_BYTES = 2 * STAGE_BYTES;
    static constexpr int SMEM_BYTES = WEIGHT_BYTES > INPUT_BYTES ? WEIGHT_BYTES : INPUT_BYTES;
    static_assert(H % 16 == 0 && H >= 16 && H <= 128, "hidden widths: multiples of 16 up to 128");
    static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory is limited to 48 KiB");
};

// TcOperandTile's view of an input slice: 32 16-bit columns (64-byte rows), copied by THREADS threads.
template <int THREADS_>
struct FusedSliceShape {
    static constexpr int THREADS = THREADS_, BK = 32, ROW_BYTES = 64, VEC = 8;
};

#define FUSED_MIN_BLOCKS(H) ((H) <= 64 ? 2 : 1)

__device__ __forceinline__ int fused_act(long long acts, int l) { return static_cast<int>((acts >> (3 * l)) & 7); }

// ---------------------------------------------------------------------------------------------------------
// weights: global -> shared, and their B fragments

// Copies rows [0, rows_pad) of a (rows, H) P matrix into the weight buffer (rows H + 8 elements apart),
// zeros for rows >= rows. Part of the caller's next commit group (cp.async), or done here when `vec` is false.
template <int H>
__device__ __forceinline__ void fused_load_weights(unsigned char* buf, const unsigned short* __restrict__ Wl,
                                                   int rows, int rows_pad, bool vec, int tid) {
    typedef FusedShape<H> S;
    constexpr int CHUNKS = H / 8;   // 16 bytes each
    for (int c = tid; c < rows_pad * CHUNKS; c += S::THREADS) {
        const int r = c / CHUNKS, chunk = c % CHUNKS;
        unsigned char* to = buf + r * S::W_ROW_BYTES + chunk * 16;
        const unsigned short* from = Wl + static_cast<long long>(r) * H + chunk * 8;
        if (vec) {
            cp_async_16(to, r < rows ? from : Wl, r < rows ? 16 : 0);
        } else {
            unsigned* words = reinterpret_cast<unsigned*>(to);
#pragma unroll
            for (int w = 0; w < 4; ++w)
                words[w] = r < rows ? from[2 * w] | (static_cast<unsigned>(from[2 * w + 1]) << 16) : 0u;
        }
    }
}

// The B fragments of n-tiles n and n + 8 at k-step ks, from the weight buffer (one ldmatrix.x4).
//   TRANS = false (forward, B(k, n) = W[n][k], rows n): matrices (n +0, k +0), (n +0, k +8), (n +8, k +0),
//     (n +8, k +8) = b0 of n, b1 of n, b0 of n+8, b1 of n+8; lane l's register i is (row l/4, cols 2(l%4)..)
//     of matrix i = (n g, k 2t..2t+1): the B layout.
//   TRANS = true (backward, B(k, n) = W[k][n], rows k): matrices (k +0, n +0), (k +8, n +0), (k +0, n +8),
//     (k +8, n +8), read transposed: (rows 2t..2t+1, col g) = (k 2t.., n g).
template <int H, bool TRANS>
__device__ __forceinline__ void fused_b_fragments(unsigned (&b0)[2], unsigned (&b1)[2], const unsigned char* buf,
                                                  int n, int ks, int lane) {
    typedef FusedShape<H> S;
    unsigned d[4];
    if constexpr (!TRANS) {
        ldmatrix_x4(d, buf + (n + (lane & 7) + (lane >> 4) * 8) * S::W_ROW_BYTES + (2 * ks + ((lane >> 3) & 1)) * 16);
    } else {
        ldmatrix_x4_trans(d, buf + (ks * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * S::W_ROW_BYTES +
                                 (n / 8 + (lane >> 4)) * 16);
    }
    b0[0] = d[0], b0[1] = d[1], b1[0] = d[2], b1[1] = d[3];
}

// acc (16 x H, NT tiles) = a (16 x 16·KS, KS k-steps of A fragments) · B, B from the weight buffer.
template <typename P, int H, bool TRANS, int KS>
__device__ __forceinline__ void fused_layer_mma(float (&acc)[H / 8][4], const unsigned (&a)[KS][4], int k_steps,
                                                const unsigned char* buf, int lane) {
#pragma unroll
    for (int nt = 0; nt < H / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        if (ks >= k_steps) break;
#pragma unroll
        for (int nj = 0; nj < H / 16; ++nj) {
            unsigned b0[2], b1[2];
            fused_b_fragments<H, TRANS>(b0, b1, buf, nj * 16, ks, lane);
            P::mma(acc[2 * nj], a[ks], b0);
            P::mma(acc[2 * nj + 1], a[ks], b1);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// forward

// A float32 input slice into TileX's layout: X32(d, k) for d in [d0, d0 + 128), k in [k0, k0 + 32), rounded
// to P (RNE, as round_operand) on the way, zeros past N and in. Synchronous loads (16-byte vectors where the
// rows are 16-byte aligned and the run is whole, else element by element), 16-byte shared stores.
template <typename P, typename TileX>
__device__ __forceinline__ void fused_load_x32(unsigned char* dst, const float* __restrict__ X32, int ldx, int d0,
                                               int d_end, int k0, int K, bool vec_ok, int tid) {
#pragma unroll
    for (int p = 0; p < 128 * 4 / 256; ++p) {
        const int c = tid + p * 256, row = c / 4, chunk = c % 4;
        const int gd = d0 + row, gk = k0 + chunk * 8;
        const int n_valid = gd < d_end && gk < K ? (K - gk < 8 ? K - gk : 8) : 0;
        const float* from = X32 + static_cast<long long>(gd) * ldx + gk;
        float v[8];
        if (vec_ok && n_valid == 8) {
            const float4 lo = reinterpret_cast<const float4*>(from)[0], hi = reinterpret_cast<const float4*>(from)[1];
            v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = i < n_valid ? from[i] : 0.0f;
        }
        unsigned* words = reinterpret_cast<unsigned*>(dst + TileX::offset(row, chunk));
#pragma unroll
        for (int w = 0; w < 4; ++w) words[w] = fused_pack2(P{}, v[2 * w], v[2 * w + 1]);
    }
}

// The input layer: acc (16 x H) = X rows of this warp · W_0ᵀ over K = in, 32 columns a slice (file header).
// X is P bits, or float32 (X32, when x_float) rounded to P as it is staged.
template <typename P, int H>
__device__ __forceinline__ void fused_input_layer(float (&acc)[H / 8][4], unsigned char* smem,
                                                  const unsigned short* __restrict__ X,
                                                  const float* __restrict__ X32, int x_float, int ldx, int in_width,
                                                  const unsigned short* __restrict__ W0, int N, int row0) {
    typedef FusedShape<H> S;
    typedef TcOperandTile<P, FusedSliceShape<S::THREADS>, S::BM, true> TileX;
    constexpr int W_THREADS = 4 * H < S::THREADS ? 4 * H : S::THREADS;   // whole chunks a thread
    typedef TcOperandTile<P, FusedSliceShape<W_THREADS>, H, true> TileW;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const bool x_vec = x_float ? reinterpret_cast<unsigned long long>(X32) % 16 == 0 && ldx % 4 == 0
                               : reinterpret_cast<unsigned long long>(X) % 16 == 0 && ldx % 8 == 0;
    const bool w_vec = reinterpret_cast<unsigned long long>(W0) % 16 == 0 && in_width % 8 == 0;
    const int slices = (in_width + 31) / 32;
    auto load = [&](int slice) {
        unsigned char* stage = smem + (slice % 2) * S::STAGE_BYTES;
        if (x_float) fused_load_x32<P, TileX>(stage, X32, ldx, row0, N, slice * 32, in_width, x_vec, tid);
        else TileX::load(stage, X, ldx, row0, N, slice * 32, in_width, x_vec, tid);
        if (tid < W_THREADS) TileW::load(stage + S::BM * 64, W0, in_width, 0, H, slice * 32, in_width, w_vec, tid);
    };
#pragma unroll
    for (int nt = 0; nt < H / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
    load(0);
    cp_async_commit();
    for (int s = 0; s < slices; ++s) {
        cp_async_wait<0>();   // this thread's copies of slice s have landed
        __syncthreads();      // everyone's have, and everyone is done with slice s - 1's stage
        if (s + 1 < slices) load(s + 1);
        cp_async_commit();
        const unsigned char* Xs = smem + (s % 2) * S::STAGE_BYTES;
        const unsigned char* Ws = Xs + S::BM * 64;
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            unsigned a[4];
            TileX::fragment_a(a, Xs, warp * 16, ks, lane);
#pragma unroll
            for (int nj = 0; nj < H / 16; ++nj) {
                unsigned b0[2], b1[2];
                TileW::fragment_b2(b0, b1, Ws, nj * 16, ks, lane);
                P::mma(acc[2 * nj], a, b0);
                P::mma(acc[2 * nj + 1], a, b1);
            }
        }
    }
}

// A hidden layer's epilogue: a = round_P(g(acc + b)) as the next layer's A fragments; in training also stored
// to A_out (N, H) (rows >= N are not).
template <typename P, int H>
__device__ __forceinline__ void fused_hidden_epilogue(unsigned (&a)[H / 16][4], const float (&acc)[H / 8][4],
                                                      const float* __restrict__ bias, int act, float alpha,
                                                      unsigned short* __restrict__ A_out, int N, int row0) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nt = 0; nt < H / 8; ++nt) {
        const int col = nt * 8 + 2 * t;
        const float b_lo = bias ? bias[col] : 0.0f, b_hi = bias ? bias[col + 1] : 0.0f;
#pragma unroll
        for (int half = 0; half < 2; ++half) {   // c0, c1 at row g; c2, c3 at row g + 8
            const unsigned packed = fused_pack2(P{}, activation_forward(act, acc[nt][2 * half] + b_lo, alpha),
                                                activation_forward(act, acc[nt][2 * half + 1] + b_hi, alpha));
            a[nt / 2][(nt % 2) * 2 + half] = packed;
            const int row = row0 + warp * 16 + g + 8 * half;
            if (A_out && row < N)
                *reinterpret_cast<unsigned*>(A_out + static_cast<long long>(row) * H + col) = packed;
        }
    }
}

enum { FUSED_LOSS_NONE = -1, FUSED_LOSS_MSE = 0, FUSED_LOSS_BCE = 1, FUSED_LOSS_SOFTMAX_CE = 2 };   // losses.py

// the sum of v over the 4 lanes that share a row (t = 0..3: lanes 4g..4g+3), in every one of them
template <typename T>
__device__ __forceinline__ T fused_row_sum(T v) {
    v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
    return v + __shfl_xor_sync(0xFFFFFFFFu, v, 2);
}
__device__ __forceinline__ float fused_row_max(float v) {
    const float o = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
    v = o > v ? o : v;
    const float p = __shfl_xor_sync(0xFFFFFFFFu, v, 2);
    return p > v ? p : v;
}

// The output layer, 16 columns at a time: Z_L = a · W_Lᵀ + b_L (W_L in the weight buffer, zero rows past O),
// then, element (row, col) for row < N, col < O:
//   loss < 0: out = Z_L (training) or g_L(Z_L) (inference)
//   loss >= 0 (training with the loss fused, gpubp/losses.py's loss_grad and loss.cu's formulas): out = A
//     (F(Z), σ(Z) for bce, softmax(Z) for softmax_ce), delta_L = round_P(S · ∂L/∂Z_L) (S: the fp16 loss
//     scale, gpubp/loss_scale.py, 1 otherwise; the float32 product, as the numpy backend), row_loss[row] = the
//     row's share of L (L = Σ row_loss, summed by the caller in a fixed order): mse ½‖A − y‖²/N, bce
//     Σ (max(z, 0) − z·y + log(1 + e^−|z|))/(N·O), softmax_ce −Σ y log p / N, summed in double.
// softmax_ce needs the row's max and Σ e^(z − max) first: Z_L goes to out, the 4 lanes of a row combine their
// maxima and sums by shuffles, and each thread reads its own elements back (no barrier: its own stores).
template <typename P, int H>
__device__ __forceinline__ void fused_output_layer(const unsigned (&a)[H / 16][4], const unsigned char* smem,
                                                   const float* __restrict__ bias, int act, float alpha,
                                                   int out_width, int N, int row0, int training, int loss,
                                                   const float* __restrict__ y, float* __restrict__ out,
                                                   unsigned short* __restrict__ delta_L,
                                                   double* __restrict__ row_loss, float scale) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const float n_rows = static_cast<float>(N), n_all = static_cast<float>(static_cast<long long>(N) * out_width);
    double terms[2] = {0.0, 0.0};   // this lane's loss terms of rows g and g + 8
    float row_max[2] = {float_from_bits(0xFF800000u), float_from_bits(0xFF800000u)};   // -inf
    for (int n0 = 0; n0 < out_width; n0 += 16) {
        float z[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) z[i][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < H / 16; ++ks) {
            unsigned b0[2], b1[2];
            fused_b_fragments<H, false>(b0, b1, smem, n0, ks, lane);
            P::mma(z[0], a[ks], b0);
            P::mma(z[1], a[ks], b1);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = row0 + warp * 16 + g + 8 * (e / 2), col = n0 + 8 * i + 2 * t + e % 2;
                if (row >= N || col >= out_width) continue;
                const long long at = static_cast<long long>(row) * out_width + col;
                const float v = z[i][e] + (bias ? bias[col] : 0.0f);
                if (loss == FUSED_LOSS_NONE) {
                    out[at] = training ? v : activation_forward(act, v, alpha);
                } else if (loss == FUSED_LOSS_SOFTMAX_CE) {
                    out[at] = v;   // Z for now
                    row_max[e / 2] = v > row_max[e / 2] ? v : row_max[e / 2];
                } else {
                    const float target = y[at];
                    float A, d;
                    if (loss == FUSED_LOSS_MSE) {
                        A = activation_forward(act, v, alpha);
                        const float diff = A - target;
                        terms[e / 2] += static_cast<double>(diff) * static_cast<double>(diff);
                        d = activation_mask(act, diff / n_rows, v, A, alpha);
                    } else {   // bce: the output is σ whatever act says (losses.REQUIRED_ACTIVATION)
                        A = activation_forward(static_cast<int>(ACT_SIGMOID), v, alpha);
                        // NOTE: the term in float32 (double log1p/exp would double the kernel's registers),
                        // summed in double: within 2^-22 of losses.py's float64 term, far below the loss's scale
                        terms[e / 2] += (v > 0.0f ? v : 0.0f) - v * target + log1pf(expf(-fabsf(v)));
                        d = (A - target) / n_all;
                    }
                    out[at] = A;
                    delta_L[at] = static_cast<unsigned short>(fused_pack2(P{}, d * scale, 0.0f) & 0xFFFFu);
                }
            }
    }
    if (loss == FUSED_LOSS_NONE) return;
    if (loss == FUSED_LOSS_SOFTMAX_CE) {
        float log_sum[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) row_max[h] = fused_row_max(row_max[h]);
        float exp_sum[2] = {0.0f, 0.0f};
        for (int n0 = 0; n0 < out_width; n0 += 16)
#pragma unroll
            for (int e = 0; e < 8; ++e) {   // (i, e) of the pass above as e / 4, e % 4
                const int row = row0 + warp * 16 + g + 8 * ((e % 4) / 2), col = n0 + 8 * (e / 4) + 2 * t + e % 2;
                if (row < N && col < out_width)
                    exp_sum[(e % 4) / 2] += exp_t(out[static_cast<long long>(row) * out_width + col] - row_max[(e % 4) / 2]);
            }
#pragma unroll
        for (int h = 0; h < 2; ++h) log_sum[h] = log_t(fused_row_sum(exp_sum[h]));
        for (int n0 = 0; n0 < out_width; n0 += 16)
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int h = (e % 4) / 2;
                const int row = row0 + warp * 16 + g + 8 * h, col = n0 + 8 * (e / 4) + 2 * t + e % 2;
                if (row >= N || col >= out_width) continue;
                const long long at = static_cast<long long>(row) * out_width + col;
                const float target = y[at];
                const float log_p = (out[at] - row_max[h]) - log_sum[h];
                const float p = exp_t(log_p);
                terms[h] -= static_cast<double>(target * log_p);
                out[at] = p;
                const float d = (p - target) / n_rows;
                delta_L[at] = static_cast<unsigned short>(fused_pack2(P{}, d * scale, 0.0f) & 0xFFFFu);
            }
    }
    const double per = loss == FUSED_LOSS_MSE ? 0.5 / N : loss == FUSED_LOSS_BCE ? 1.0 / (static_cast<double>(N) * out_width)
                                                                               : 1.0 / N;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const double sum = fused_row_sum(terms[h]);
        const int row = row0 + warp * 16 + g + 8 * h;
        if (t == 0 && row < N) row_loss[row] = sum * per;
    }
}

template <typename P, int H>
__global__ void __launch_bounds__(256, FUSED_MIN_BLOCKS(H))
fused_mlp_forward_kernel(const unsigned short* __restrict__ X, int ldx, int in_width,
                         const unsigned short* __restrict__ weights, const float* __restrict__ biases,
                         const float* __restrict__ alphas, long long acts, int bias_mask, int n_layers,
                         int out_width, int N, int training, float* __restrict__ out,
                         unsigned short* __restrict__ hidden, int loss, const float* __restrict__ y,
                         unsigned short* __restrict__ delta_L, double* __restrict__ row_loss,
                         const double* __restrict__ loss_scale, const float* __restrict__ X32, int x_float) {
    typedef FusedShape<H> S;
    __shared__ __align__(128) unsigned char smem[S::SMEM_BYTES];
    const int tid = threadIdx.x, lane = tid % 32;
    const int row0 = blockIdx.x * S::BM, L = n_layers - 1;
    const bool w_vec = reinterpret_cast<unsigned long long>(weights) % 16 == 0;

    float acc[S::NT][4];
    unsigned a[S::KT][4];
    fused_input_layer<P, H>(acc, smem, X, X32, x_float, ldx, in_width, weights, N, row0);

    const unsigned short* Wl = weights + static_cast<long long>(H) * in_width;   // W_1
    const float* bias = biases;                                                 // b_0 (when it has one)
    for (int l = 1; l <= L; ++l) {
        // layer l - 1's epilogue runs while W_l is copied; the buffer is free once every warp is past its mma
        __syncthreads();
        const int rows = l < L ? H : out_width;
        fused_load_weights<H>(smem, Wl, rows, (rows + 15) / 16 * 16, w_vec, tid);
        cp_async_commit();
        const bool has_bias = (bias_mask >> (l - 1)) & 1;
        fused_hidden_epilogue<P, H>(a, acc, has_bias ? bias : nullptr, fused_act(acts, l - 1), alphas[l - 1],
                                    training ? hidden + static_cast<long long>(l - 1) * N * H : nullptr, N, row0);
        if (has_bias) bias += H;
        cp_async_wait<0>();
        __syncthreads();
        if (l < L) {
            fused_layer_mma<P, H, false, S::KT>(acc, a, S::KT, smem, lane);
            Wl += H * H;
            continue;
        }
        fused_output_layer<P, H>(a, smem, (bias_mask >> L) & 1 ? bias : nullptr, fused_act(acts, L), alphas[L],
                                 out_width, N, row0, training, loss, y, out, delta_L, row_loss,
                                 loss >= 0 ? static_cast<float>(loss_scale[0]) : 1.0f);
    }
    cp_async_wait<0>();   // nothing is pending here; a block must not end with copies in flight
}

// ---------------------------------------------------------------------------------------------------------
// backward

// δ_l = round_P(dA ⊙ g'(A)) with A the stored A_{l+1} (N, H): the next product's A fragments, and stored to
// delta_out (N, H) (rows >= N are neither read nor stored).
template <typename P, int H>
__device__ __forceinline__ void fused_delta_epilogue(unsigned (&d)[H / 16][4], const float (&acc)[H / 8][4],
                                                     const unsigned short* __restrict__ A, int act, float alpha,
                                                     unsigned short* __restrict__ delta_out, int N, int row0) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nt = 0; nt < H / 8; ++nt) {
        const int col = nt * 8 + 2 * t;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = row0 + warp * 16 + g + 8 * half;
            const long long at = static_cast<long long>(row) * H + col;
            const unsigned pair = row < N ? *reinterpret_cast<const unsigned*>(A + at) : 0u;
            const float a_lo = fused_unpack(P{}, static_cast<unsigned short>(pair & 0xFFFFu));
            const float a_hi = fused_unpack(P{}, static_cast<unsigned short>(pair >> 16));
            // NOTE: relu / leaky_relu are given A as their Z: A > 0 <=> Z > 0 (gpubp/fused.py)
            const unsigned packed = fused_pack2(P{}, activation_mask(act, acc[nt][2 * half], a_lo, a_lo, alpha),
                                                activation_mask(act, acc[nt][2 * half + 1], a_hi, a_hi, alpha));
            d[nt / 2][(nt % 2) * 2 + half] = packed;
            if (row < N) *reinterpret_cast<unsigned*>(delta_out + at) = packed;
        }
    }
}

template <typename P, int H>
__global__ void __launch_bounds__(256, FUSED_MIN_BLOCKS(H))
fused_mlp_backward_kernel(const unsigned short* __restrict__ delta_L, int out_width,
                          const unsigned short* __restrict__ weights, int in_width, const float* __restrict__ alphas,
                          long long acts, int n_layers, int N, const unsigned short* __restrict__ hidden,
                          unsigned short* __restrict__ deltas) {
    typedef FusedShape<H> S;
    __shared__ __align__(128) unsigned char smem[S::SMEM_BYTES];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int row0 = blockIdx.x * S::BM, L = n_layers - 1;
    const int g = lane / 4, t = lane % 4;
    const bool w_vec = reinterpret_cast<unsigned long long>(weights) % 16 == 0;
    const unsigned short* W_hidden = weights + static_cast<long long>(H) * in_width;   // W_1; W_L follows W_{L-1}

    // W_L (O, H) in, while this warp's δ_L fragments (16 rows x O, zero past N and O) come from global memory
    const int out_pad = (out_width + 15) / 16 * 16;
    fused_load_weights<H>(smem, W_hidden + static_cast<long long>(L - 1) * H * H, out_width, out_pad, w_vec, tid);
    cp_async_commit();
    unsigned dL[S::MAX_OUT / 16][4];
#pragma unroll
    for (int ks = 0; ks < S::MAX_OUT / 16; ++ks)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            unsigned short half[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {   // A layout: (row g + 8(r % 2), k 2t + j + 8(r / 2))
                const int row = row0 + warp * 16 + g + 8 * (r % 2), k = ks * 16 + 2 * t + j + 8 * (r / 2);
                half[j] = row < N && k < out_width ? delta_L[static_cast<long long>(row) * out_width + k] : 0;
            }
            dL[ks][r] = half[0] | (static_cast<unsigned>(half[1]) << 16);
        }
    cp_async_wait<0>();
    __syncthreads();
    float acc[S::NT][4];
    unsigned d[S::KT][4];
    fused_layer_mma<P, H, true, S::MAX_OUT / 16>(acc, dL, out_pad / 16, smem, lane);

    for (int l = L - 1; l >= 0; --l) {   // acc = dA of hidden layer l's output A_{l+1}
        if (l >= 1) {   // W_l comes in while this layer's δ is made
            __syncthreads();
            fused_load_weights<H>(smem, W_hidden + static_cast<long long>(l - 1) * H * H, H, H, w_vec, tid);
            cp_async_commit();
        }
        const long long layer = static_cast<long long>(l) * N * H;
        fused_delta_epilogue<P, H>(d, acc, hidden + layer, fused_act(acts, l), alphas[l], deltas + layer, N, row0);
        if (l >= 1) {
            cp_async_wait<0>();
            __syncthreads();
            fused_layer_mma<P, H, true, S::KT>(acc, d, S::KT, smem, lane);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// the caller's conversion: float32 -> P

// dst (rows_pad, cols_pad) = round_P(src (rows, cols)) as raw bits, zeros past rows and cols (RNE, inf/NaN kept,
// fp16 overflow to inf: gpubp.precision's round_operand / to_storage). For the weights after each update: one
// launch a layer, W_l into its zero-padded place in the weight buffer (gpubp/fused.py padded_shapes), so the
// padding is rewritten with the values at every call and never depends on what the buffer held before.
// Grid-stride over dst, 256 threads a block: 4 + 2 bytes an element.
template <typename P>
__global__ void __launch_bounds__(256) fused_mlp_round_kernel(const float* __restrict__ src, int rows, int cols,
                                                              unsigned short* __restrict__ dst, int rows_pad,
                                                              int cols_pad) {
    const long long n = static_cast<long long>(rows_pad) * cols_pad;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long r = i / cols_pad, c = i % cols_pad;
        dst[i] = r < rows && c < cols ? static_cast<unsigned short>(fused_pack2(P{}, src[r * cols + c], 0.0f) & 0xFFFFu)
                                      : static_cast<unsigned short>(0);
    }
}
