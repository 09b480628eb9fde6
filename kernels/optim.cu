// optim.cu: in-place optimizer steps over the model's one flat parameter buffer (θ, its gradient g and the
// optimizer state are flat arrays of the same size P). CPU reference: gpubp/backends/numpy_backend.py.
//
//   sgd_update   (torch.optim.SGD)   g = grad + wd·θ
//                                    if μ ≠ 0:  b = g when step == 0, else μ·b + (1 − dampening)·g
//                                               g = g + μ·b if nesterov else b
//                                    θ = θ − lr·g
//   adam_update  (torch.optim.Adam)  t = step + 1;  g = grad + wd·θ
//                                    m = β1·m + (1 − β1)·g;   v = β2·v + (1 − β2)·g·g
//                                    θ = θ − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
//   step_increment                   step = step + 1
//
// `step` (int64, shape (1,)) lives in device memory and is read by every thread, so a captured CUDA graph
// replays correctly step after step. It is incremented by step_increment_kernel, a one-thread launch after
// the update in stream order: incrementing inside the update would race with blocks that have not read it.
// Hyperparameters arrive as double; the scalar prefactors (1 − β1ᵗ, ...) are formed in double and cast to T
// where numpy casts a Python float against a T array.
//
// Launch: any grid, block 256, grid-stride loop over P. Memory traffic per element: SGD reads θ, g (and b)
// and writes θ (and b): 2-4 reads, 1-2 writes; Adam reads θ, g, m, v and writes θ, m, v.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------

template <typename T>
__global__ void sgd_update_kernel(T* params, const T* __restrict__ grads, T* momentum_buf,
                                  const long long* __restrict__ step, long long size, double lr, double momentum,
                                  double dampening, double weight_decay, int nesterov) {
    const bool first = step[0] == 0;
    const T mu = T(momentum), one_minus_dampening = T(1.0 - dampening), wd = T(weight_decay), rate = T(lr);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
         i += (long long)gridDim.x * blockDim.x) {
        const T theta = params[i];
        T g = grads[i];
        if (weight_decay != 0.0) g = g + wd * theta;
        if (momentum != 0.0) {
            const T b = first ? g : mu * momentum_buf[i] + one_minus_dampening * g;
            momentum_buf[i] = b;
            g = nesterov ? g + mu * b : b;
        }
        params[i] = theta - rate * g;
    }
}

template <typename T>
__global__ void adam_update_kernel(T* params, const T* __restrict__ grads, T* m, T* v,
                                   const long long* __restrict__ step, long long size, double lr, double beta1,
                                   double beta2, double eps, double weight_decay) {
    const double t = (double)(step[0] + 1);
    const T step_size = T(lr / (1.0 - pow(beta1, t)));
    const T bias_correction2_sqrt = T(sqrt(1.0 - pow(beta2, t)));
    const T b1 = T(beta1), one_minus_b1 = T(1.0 - beta1), b2 = T(beta2), one_minus_b2 = T(1.0 - beta2);
    const T wd = T(weight_decay), epsilon = T(eps);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
         i += (long long)gridDim.x * blockDim.x) {
        const T theta = params[i];
        T g = grads[i];
        if (weight_decay != 0.0) g = g + wd * theta;
        const T m_i = b1 * m[i] + one_minus_b1 * g;
        const T v_i = b2 * v[i] + one_minus_b2 * g * g;
        m[i] = m_i;
        v[i] = v_i;
        const T denom = sqrt_t(v_i) / bias_correction2_sqrt + epsilon;
        params[i] = theta - step_size * (m_i / denom);
    }
}

// one thread: the update launched before it, on the same stream, has finished reading step
__global__ void step_increment_kernel(long long* step) {
    if (blockIdx.x == 0 && threadIdx.x == 0) step[0] += 1;
}
