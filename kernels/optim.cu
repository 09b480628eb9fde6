// optim.cu: guarded in-place optimizer steps over the model's one flat parameter buffer (θ, its gradient g and
// the optimizer state are flat arrays of the same size P). CPU reference: gpubp/backends/numpy_backend.py.
//
//   sgd_update   (torch.optim.SGD)   g = grad + wd·θ
//                                    if μ ≠ 0:  b = g when step == 0, else μ·b + (1 − dampening)·g
//                                               g = g + μ·b if nesterov else b
//                                    θ = θ − lr·g
//                hyper = [lr, μ, dampening, wd, nesterov]                       state 0: b
//   adam_update  (torch.optim.Adam)  t = step + 1;  g = grad + wd·θ
//                                    m = β1·m + (1 − β1)·g;   v = β2·v + (1 − β2)·g·g
//                                    θ = θ − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
//                hyper = [lr, β1, β2, ε, wd]                                    state 0: m, state 1: v
//
// Guarded (gpubp/guard.py, guard.cuh): a non-finite gradient, or an update that would leave a non-finite θ or
// state value, writes nothing and names the buffer in the guard; with guard[FAULT] already set (the loss, by
// guard_loss, or an earlier step) it does nothing at all. Three launches in stream order, no copies of θ or
// the state:
//   1. the update kernel, phase UPDATE_CHECK: computes every new value, writes none; per buffer the smallest
//      flat index of a non-finite value goes to its bad_index slot (atomicMin: the same result whatever order
//      the blocks run in): SLOT_GRADIENT the raw gradient (before weight decay: the gradient backward made),
//      SLOT_PARAMS the new θ, SLOT_STATE + k the new state k;
//   2. the same kernel, phase UPDATE_APPLY: computes the same values with the same code and stores them,
//      unless guard[FAULT] is set or the CHECK phase flagged a slot;
//   3. update_finish_kernel, one thread: the first flagged slot becomes guard[FAULT] (the gradient, then θ,
//      then the state, as the reference names them), else step and guard[STEP] go up by one; bad_index is
//      reset.
// Checking the gradient here, not in a pass of its own, is issue 11's fusion: CHECK reads every gradient into
// a register anyway, after the data-parallel all-reduce (every rank sees the same sums) and for every
// precision.
// Every thread reads guard, the flags, `step` and `hyper` from device memory, so a captured CUDA graph
// replays correctly step after step, and a changed learning rate needs no recapture. The step count goes up
// in a later launch: incrementing it inside the update would race with blocks that have not read it yet.
// Hyperparameters arrive as double; the scalar prefactors (1 − β1ᵗ, ...) are formed in double and cast to T
// where numpy casts a Python float against a T array.
//
// Launch: any grid, block 256, grid-stride loop over P. Memory traffic per element: SGD reads θ, g (and b)
// in each phase and writes θ (and b) in APPLY: 4-6 reads, 1-2 writes; Adam reads θ, g, m, v twice and writes
// θ, m, v once. The CHECK pass is the price of writing nothing on overflow without a copy of the buffers
// (a copy-and-roll-back would read and write every buffer once more). Its gradient check adds no memory
// traffic (g is read for the update anyway). What it saves a step: the separate gradient scan, one read pass
// over P elements (SPEC's 784-1024-1024-10, P = 1,863,690: 7.45 MB in float32, 14.9 MB in float64), and its 2
// launches (the grid-wide scan, its one-thread finish), for one one-thread launch (loop.cu's guard_loss).
#include "common.cuh"
#include "guard.cuh"

enum { UPDATE_CHECK = 0, UPDATE_APPLY = 1 };

// bad_index slots, in the order a fault is named: slot k is fault code FAULT_GRADIENT + k
enum { SLOT_GRADIENT = 0, SLOT_PARAMS = 1, SLOT_STATE = 2 };
static_assert(FAULT_GRADIENT + SLOT_PARAMS == FAULT_PARAMS && FAULT_GRADIENT + SLOT_STATE == FAULT_STATE,
              "bad_index slot k must name fault code FAULT_GRADIENT + k");

// True when this launch has nothing to do: a fault is already set, or (APPLY) the CHECK pass flagged one of
// the first `slots` slots. The same for every thread of the grid, so returning early is safe.
__device__ __forceinline__ bool update_skipped(int phase, const double* guard, const long long* bad_index,
                                               int slots) {
    if (guard_faulted(guard)) return true;
    if (phase == UPDATE_CHECK) return false;
    for (int k = 0; k < slots; ++k)
        if (bad_index[k] != GUARD_NO_INDEX) return true;
    return false;
}

// the first bad index of a thread's walk (its indices grow, so the first is its smallest)
template <typename T>
__device__ __forceinline__ void note_if_bad(T value, long long i, long long& first_bad) {
    if (first_bad == GUARD_NO_INDEX && !isfinite(value)) first_bad = i;
}

// pow, kept out of line. NOTE: inlined, its slow path made ptxas spill in adam_update_kernel<double> on sm_80
// (a 64-register budget shared with the loop); called once per thread, the call costs nothing.
__device__ __noinline__ double power(double base, double exponent) { return pow(base, exponent); }

// ---------------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(256)
sgd_update_kernel(int phase, T* params, const T* __restrict__ grads, T* momentum_buf,
                  const long long* __restrict__ step, const double* __restrict__ hyper, const double* guard,
                  long long* bad_index, long long size) {
    if (update_skipped(phase, guard, bad_index, SLOT_STATE + 1)) return;
    const double momentum = hyper[1], dampening = hyper[2], weight_decay = hyper[3];
    const bool nesterov = hyper[4] != 0.0, first = step[0] == 0;
    const T rate = T(hyper[0]), mu = T(momentum), one_minus_dampening = T(1.0 - dampening), wd = T(weight_decay);
    long long bad_grad = GUARD_NO_INDEX, bad_theta = GUARD_NO_INDEX, bad_b = GUARD_NO_INDEX;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
         i += (long long)gridDim.x * blockDim.x) {
        const T theta = params[i], grad = grads[i];
        T g = grad;
        if (weight_decay != 0.0) g = g + wd * theta;
        T b = T(0);
        if (momentum != 0.0) {
            b = first ? g : mu * momentum_buf[i] + one_minus_dampening * g;
            g = nesterov ? g + mu * b : b;
        }
        const T new_theta = theta - rate * g;
        if (phase == UPDATE_CHECK) {
            // the raw gradient: g + wd·θ can overflow from finite values, and that is the update's fault (θ)
            note_if_bad(grad, i, bad_grad);
            note_if_bad(new_theta, i, bad_theta);
            if (momentum != 0.0) note_if_bad(b, i, bad_b);   // b is untouched (and unchecked) when μ = 0
        } else {
            params[i] = new_theta;
            if (momentum != 0.0) momentum_buf[i] = b;
        }
    }
    if (phase == UPDATE_CHECK) {
        report_bad_index(bad_grad, &bad_index[SLOT_GRADIENT]);
        report_bad_index(bad_theta, &bad_index[SLOT_PARAMS]);
        report_bad_index(bad_b, &bad_index[SLOT_STATE]);
    }
}

template <typename T>
__global__ void __launch_bounds__(256)
adam_update_kernel(int phase, T* params, const T* __restrict__ grads, T* m, T* v,
                   const long long* __restrict__ step, const double* __restrict__ hyper, const double* guard,
                   long long* bad_index, long long size) {
    if (update_skipped(phase, guard, bad_index, SLOT_STATE + 2)) return;
    const double lr = hyper[0], beta1 = hyper[1], beta2 = hyper[2], eps = hyper[3], weight_decay = hyper[4];
    const double t = (double)(step[0] + 1);
    const T step_size = T(lr / (1.0 - power(beta1, t)));
    const T bias_correction2_sqrt = T(sqrt(1.0 - power(beta2, t)));
    const T b1 = T(beta1), one_minus_b1 = T(1.0 - beta1), b2 = T(beta2), one_minus_b2 = T(1.0 - beta2);
    const T wd = T(weight_decay), epsilon = T(eps);
    long long bad_grad = GUARD_NO_INDEX, bad_theta = GUARD_NO_INDEX, bad_m = GUARD_NO_INDEX, bad_v = GUARD_NO_INDEX;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
         i += (long long)gridDim.x * blockDim.x) {
        const T theta = params[i], grad = grads[i];
        T g = grad;
        if (weight_decay != 0.0) g = g + wd * theta;
        const T m_i = b1 * m[i] + one_minus_b1 * g;
        const T v_i = b2 * v[i] + one_minus_b2 * g * g;
        const T denom = sqrt_t(v_i) / bias_correction2_sqrt + epsilon;
        const T new_theta = theta - step_size * (m_i / denom);
        if (phase == UPDATE_CHECK) {
            note_if_bad(grad, i, bad_grad);
            note_if_bad(new_theta, i, bad_theta);
            note_if_bad(m_i, i, bad_m);
            note_if_bad(v_i, i, bad_v);
        } else {
            params[i] = new_theta;
            m[i] = m_i;
            v[i] = v_i;
        }
    }
    if (phase == UPDATE_CHECK) {
        report_bad_index(bad_grad, &bad_index[SLOT_GRADIENT]);
        report_bad_index(bad_theta, &bad_index[SLOT_PARAMS]);
        report_bad_index(bad_m, &bad_index[SLOT_STATE]);
        report_bad_index(bad_v, &bad_index[SLOT_STATE + 1]);
    }
}

// One thread, after the APPLY phase of an update that checks `slots` slots (the gradient, θ and the state), in
// stream order.
__global__ void update_finish_kernel(long long* bad_index, int slots, long long* step, double* guard) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    if (!guard_faulted(guard)) {   // set before this update: CHECK flagged nothing, APPLY wrote nothing
        int k = 0;
        while (k < slots && bad_index[k] == GUARD_NO_INDEX) ++k;
        if (k < slots) {
            guard_set_fault(guard, FAULT_GRADIENT + k, bad_index[k]);
        } else {
            step[0] += 1;
            guard[GUARD_STEP] += 1.0;
        }
    }
    for (int k = 0; k < slots; ++k) bad_index[k] = GUARD_NO_INDEX;
}
