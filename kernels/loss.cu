// loss.cu: the fused output step (output activation + loss + its gradient), and one_hot for its targets.
//
// From the output layer's pre-activation Z (N, C) and targets y (N, C) (SPEC section 1; CPU reference:
// gpubp/losses.py loss_grad):
//   MSE   (0)  A = F(Z)      L = (1/N) Σₙ ½‖Aₙ − yₙ‖²                          δ = (A − y)/N ⊙ F'(Z)
//   BCE   (1)  A = σ(Z)      L = mean over N·C of max(z, 0) − z·y + log(1 + e^−|z|)  δ = (A − y)/(N·C)
//   SOFTMAX_CE (2)           log p = Z − max − log Σ e^(Z − max)   A = p
//                            L = (1/N) Σₙ −Σₖ yₙₖ log pₙₖ                         δ = (p − y)/N
// The stable forms: BCE never takes log(σ), softmax shifts by the row max, so logits of ±1e4 stay finite.
// Loss terms are summed in double whatever T is (as the reference does).
//
// Mixed precision (issue 12): loss_grad_stored_kernel<F> is the same for float32 Z, y, A with δ written in
// storage format F (storage.cuh: StoreF32, StoreBf16, StoreFp16 raw bits) and, with has_scale, multiplied by
// the fp16 loss scale S = scale[0] (a device float64, gpubp/loss_scale.py) before it is stored:
//   δ = encode_F(S · ∂L/∂Z), S · (the float32 δ above) in float32 (exact: S is a power of two, unless it
//   overflows, which is what the scaler looks for). The loss itself is never scaled.
//
// loss_grad_kernel: one warp per row (lanes stride over the C columns; the softmax row max and row sum are
// warp butterflies), 8 rows per 256-thread block, grid-stride over rows; each block writes its partial sum
// of loss terms to block_sums[blockIdx.x] (warps added in a fixed order). loss_reduce_kernel, one block,
// adds the partials in a fixed order and writes loss_out[0] = scale · Σ. No atomics: bit-identical run to
// run for a given grid (the backend fixes the grid from the shape).
// Memory traffic: reads Z and y, writes A and δ: 4·N·C elements (softmax reads Z three times, from L1/L2).
#include "common.cuh"
#include "storage.cuh"

enum { LOSS_MSE = 0, LOSS_BCE = 1, LOSS_SOFTMAX_CE = 2 };

// ---------------------------------------------------------------------------------------------------------

// δ stored as T itself (the float32 and float64 models' path)
template <typename T>
struct StoreSame {
    typedef T Bits;
    __device__ __forceinline__ static T encode(T x) { return x; }
};

// x / n: a division in float; in double a multiplication by 1/n, computed once (a double division per element
// calls a slow-path routine on sm_80 whose saved registers ptxas reports as an 8-byte spill; x·(1/n) is within
// an ulp of x/n, far inside the float64 tolerance)
template <typename T>
__device__ __forceinline__ T over(T x, T n, T inv_n) { return sizeof(T) == 8 ? x * inv_n : x / n; }

// The body of both kernels: F is δ's format, s the loss scale (Scaled false: δ is not multiplied at all, and the
// model-dtype kernels carry no trace of the scale).
template <typename T, typename F, bool Scaled>
__device__ __forceinline__ void loss_grad_rows(int loss, int act, double alpha_d, const T* __restrict__ Z,
                                               const T* __restrict__ y, T* A, typename F::Bits* delta,
                                               double* block_sums, int N, int C, T s) {
    __shared__ double warp_sums[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const T alpha = T(alpha_d);
    const T n = T(N), nc = T((long long)N * C), inv_n = T(1) / n, inv_nc = T(1) / nc;
    double sum = 0.0;  // this lane's loss terms
    auto store = [&](typename F::Bits* p, T d) { *p = F::encode(Scaled ? d * s : d); };

    for (long long row = (long long)blockIdx.x * warps + warp; row < N; row += (long long)gridDim.x * warps) {
        const T* z = Z + row * C;
        const T* t = y + row * C;
        T* a = A + row * C;
        typename F::Bits* d = delta + row * C;
        if (loss == LOSS_MSE) {
            for (int c = lane; c < C; c += 32) {
                const T zc = z[c];
                const T ac = activation_forward(act, zc, alpha);
                const T diff = ac - t[c];
                sum += (double)diff * (double)diff;
                a[c] = ac;
                store(d + c, activation_mask(act, over(diff, n, inv_n), zc, ac, alpha));
            }
        } else if (loss == LOSS_BCE) {
            for (int c = lane; c < C; c += 32) {
                const T zc = z[c];
                const T ac = activation_forward(ACT_SIGMOID, zc, alpha);
                const double zd = zc;
                sum += (zd > 0.0 ? zd : 0.0) - zd * (double)t[c] + log1p(exp(-fabs(zd)));
                a[c] = ac;
                store(d + c, over(ac - t[c], nc, inv_nc));
            }
        } else {  // LOSS_SOFTMAX_CE
            T row_max = z[0];
            for (int c = lane; c < C; c += 32) row_max = z[c] > row_max ? z[c] : row_max;
            row_max = warp_max(row_max);
            T exp_sum = T(0);
            for (int c = lane; c < C; c += 32) exp_sum += exp_t(z[c] - row_max);
            const T log_sum = log_t(warp_sum(exp_sum));
            for (int c = lane; c < C; c += 32) {
                const T log_p = (z[c] - row_max) - log_sum;
                const T p = exp_t(log_p);
                sum -= (double)(t[c] * log_p);
                a[c] = p;
                store(d + c, over(p - t[c], n, inv_n));
            }
        }
    }

    // block sum in a fixed order: lanes (butterfly), then warps 0, 1, ... by thread 0
    sum = warp_sum(sum);
    if (lane == 0) warp_sums[warp] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        double block_sum = 0.0;
        for (int w = 0; w < warps; ++w) block_sum += warp_sums[w];
        block_sums[blockIdx.x] = block_sum;
    }
}

template <typename T>
__global__ void __launch_bounds__(256)
loss_grad_kernel(int loss, int act, double alpha_d, const T* __restrict__ Z, const T* __restrict__ y, T* A,
                 T* delta, double* block_sums, int N, int C) {
    loss_grad_rows<T, StoreSame<T>, false>(loss, act, alpha_d, Z, y, A, delta, block_sums, N, C, T(1));
}

// scale is read only when has_scale != 0 (pass any valid pointer otherwise)
template <typename F>
__global__ void __launch_bounds__(256)
loss_grad_stored_kernel(int loss, int act, double alpha_d, const float* __restrict__ Z, const float* __restrict__ y,
                        float* A, typename F::Bits* delta, double* block_sums, int N, int C,
                        const double* __restrict__ scale, int has_scale) {
    if (has_scale)
        loss_grad_rows<float, F, true>(loss, act, alpha_d, Z, y, A, delta, block_sums, N, C,
                                       static_cast<float>(scale[0]));
    else
        loss_grad_rows<float, F, false>(loss, act, alpha_d, Z, y, A, delta, block_sums, N, C, 1.0f);
}

// One block of 256 threads: loss_out[0] = scale · Σ block_sums[0 .. count), in a fixed order.
template <typename T>
__global__ void __launch_bounds__(256)
loss_reduce_kernel(const double* __restrict__ block_sums, int count, double scale, T* loss_out) {
    __shared__ double partial[256];
    double sum = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) sum += block_sums[i];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {  // blockDim.x is a power of two (256)
        if ((int)threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss_out[0] = T(scale * partial[0]);
}

// ---------------------------------------------------------------------------------------------------------
// one_hot_kernel: out[n, k] = (labels[n] == k), out (N, classes); one thread per element (grid-stride).
// A label outside [0, classes) gives a row of NaN: labels already on the device are not read back by the
// host for a sync=False step, so a bad one must make the loss non-finite, which the step's guard reports.

template <typename T>
__global__ void one_hot_kernel(const long long* __restrict__ labels, T* out, long long N, int classes) {
    const long long size = N * classes;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
         i += (long long)gridDim.x * blockDim.x) {
        const long long label = labels[i / classes];
        out[i] = label < 0 || label >= classes ? T(nan("")) : label == i % classes ? T(1) : T(0);
    }
}
