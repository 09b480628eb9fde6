// loss_scale.cu: the fp16 dynamic loss scaler's device side (issue 12; gpubp/loss_scale.py has the layout, the
// rule and the order of a step; CPU reference: gpubp/backends/numpy_backend.py and loss_scale.update).
//
//   scaler double[6]: [SCALE, GOOD, OVERFLOWS, GROWTH_INTERVAL, GROWTH, BACKOFF]     guard: guard.cuh
//
//   unscale_gradients  (in place of guard_loss, after backward; loss_out (1,), grads (P,) float32)
//     unscale_scan_kernel: unless guard[FAULT] is set or the loss is not finite: grads[i] *= float(1/S) in
//                          float32, as the numpy reference does (exact for the power-of-two scales GradScaler's
//                          rule makes), and the smallest index of a non-finite result -> bad_index[0]
//                          (guard.cuh's warp minimum + atomicMin)
//     unscale_finish_kernel (one thread): FAULT set: SKIPPED += 1; else a non-finite loss: FAULT = LOSS,
//                          FAULT_INDEX = -1 (a real fault); else a flagged gradient: FAULT = OVERFLOW and its
//                          index, FAULT_STEP = STEP; bad_index[0] is reset.
//   update_scale       (after the update, before record_step) update_scale_kernel (one thread):
//                          FAULT == OVERFLOW: FAULT = NONE, FAULT_STEP = 0, FAULT_INDEX = -1, STEP += 1 (the step
//                          counts as taken, its update skipped: record_step then records its loss),
//                          S *= BACKOFF, GOOD = 0, OVERFLOWS += 1
//                          FAULT == NONE:     GOOD += 1; GOOD >= GROWTH_INTERVAL: S = min(S·GROWTH, MAX_SCALE), GOOD = 0
//                          any other fault:   nothing (the host reports it)
// Everything lives in device memory: no host synchronisation, and a captured CUDA graph replays it unchanged.
// Launch: unscale_scan_kernel block 256, grid-stride (P reads and writes); the others one thread.
#include "common.cuh"
#include "guard.cuh"

enum { SCALER_SCALE = 0, SCALER_GOOD = 1, SCALER_OVERFLOWS = 2, SCALER_GROWTH_INTERVAL = 3, SCALER_GROWTH = 4,
       SCALER_BACKOFF = 5, SCALER_SIZE = 6 };

// gpubp.loss_scale.MAX_SCALE = 2^100: S never grows past it
#define LOSS_SCALE_MAX 1.2676506002282294e30

__global__ void __launch_bounds__(256)
unscale_scan_kernel(const float* __restrict__ loss_out, float* grads, long long size, const double* __restrict__ scaler,
                    const double* __restrict__ guard, long long* bad_index) {
    if (guard_faulted(guard) || !isfinite(loss_out[0])) return;   // the finish kernel reports either
    const float inverse = static_cast<float>(1.0 / scaler[SCALER_SCALE]);
    long long first_bad = GUARD_NO_INDEX;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = grads[i] * inverse;
        grads[i] = g;   // every gradient is unscaled (no early exit): the walk's first bad one is its smallest
        if (!isfinite(g) && first_bad == GUARD_NO_INDEX) first_bad = i;
    }
    report_bad_index(first_bad, bad_index);
}

__global__ void unscale_finish_kernel(const float* __restrict__ loss_out, long long* bad_index, double* guard) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    if (guard_check_loss(loss_out, guard) && bad_index[0] != GUARD_NO_INDEX)
        guard_set_fault(guard, FAULT_OVERFLOW, bad_index[0]);
    bad_index[0] = GUARD_NO_INDEX;
}

__global__ void update_scale_kernel(double* scaler, double* guard) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const double fault = guard[GUARD_FAULT];
    if (fault == FAULT_OVERFLOW) {
        guard[GUARD_FAULT] = FAULT_NONE;
        guard[GUARD_FAULT_STEP] = 0.0;
        guard[GUARD_FAULT_INDEX] = -1.0;
        guard[GUARD_STEP] += 1.0;
        scaler[SCALER_SCALE] *= scaler[SCALER_BACKOFF];
        scaler[SCALER_GOOD] = 0.0;
        scaler[SCALER_OVERFLOWS] += 1.0;
    } else if (fault == FAULT_NONE) {
        scaler[SCALER_GOOD] += 1.0;
        if (scaler[SCALER_GOOD] >= scaler[SCALER_GROWTH_INTERVAL]) {
            const double grown = scaler[SCALER_SCALE] * scaler[SCALER_GROWTH];
            scaler[SCALER_SCALE] = grown < LOSS_SCALE_MAX ? grown : LOSS_SCALE_MAX;
            scaler[SCALER_GOOD] = 0.0;
        }
    }
}
