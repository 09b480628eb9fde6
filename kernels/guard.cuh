// guard.cuh: the device-side guard of the training loop, as the kernels see it (gpubp/guard.py has the same
// layout and the order of a step; tests/test_cupy_kernels_emulated.py checks the two agree).
//
//   guard  double[GUARD_SIZE]:  [FAULT, FAULT_STEP, FAULT_INDEX, SKIPPED, STEP, LOSS_SUM, CORRECT, ROWS, ring...]
//
// A check pass (a guarded update's CHECK phase, the fp16 unscale scan) reports the smallest flat index of a
// non-finite value per buffer into `bad_index`, a small int64 scratch array of the backend: every thread keeps
// the first bad index of its grid-stride walk (its smallest), a warp takes the minimum of its lanes, and lane 0
// does atomicMin. A minimum does not depend on the order the atomics land in: the result is deterministic.
// A one-thread kernel then turns bad_index into the guard's fault and resets it to GUARD_NO_INDEX.
#ifndef GPUBP_GUARD_CUH
#define GPUBP_GUARD_CUH

enum {
    GUARD_FAULT = 0, GUARD_FAULT_STEP = 1, GUARD_FAULT_INDEX = 2, GUARD_SKIPPED = 3, GUARD_STEP = 4,
    GUARD_LOSS_SUM = 5, GUARD_CORRECT = 6, GUARD_ROWS = 7, GUARD_RING = 8, GUARD_RING_SIZE = 1024
};

// fault codes: FAULT_STATE + k names optimizer state buffer k; FAULT_OVERFLOW is the fp16 loss scaler's
// (loss_scale.cu: set by unscale_gradients, cleared by update_scale in the same step)
enum { FAULT_NONE = 0, FAULT_LOSS = 1, FAULT_GRADIENT = 2, FAULT_PARAMS = 3, FAULT_STATE = 4, FAULT_OVERFLOW = -1 };

// "no bad element": above every index, and exact as a double (2^62), so it survives any path that carries
// an int64 through a double (the CPU emulation's warp shuffles do)
#define GUARD_NO_INDEX (1LL << 62)

// guard[FAULT] holds an integer-valued code: any non-zero value is a fault
__device__ __forceinline__ bool guard_faulted(const double* guard) { return guard[GUARD_FAULT] != 0.0; }

// The warp's smallest `index` (GUARD_NO_INDEX when no lane has one) reported to *bad_index by lane 0. Every
// lane of a full warp must call it (shuffles).
__device__ __forceinline__ void report_bad_index(long long index, long long* bad_index) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const long long other = __shfl_xor_sync(0xffffffffu, index, offset);
        index = other < index ? other : index;
    }
    if ((threadIdx.x & 31) == 0 && index != GUARD_NO_INDEX) atomicMin(bad_index, index);
}

// guard[FAULT] = code, with the step (guard[STEP] now) and the index
__device__ __forceinline__ void guard_set_fault(double* guard, int code, long long index) {
    guard[GUARD_FAULT] = code;
    guard[GUARD_FAULT_STEP] = guard[GUARD_STEP];
    guard[GUARD_FAULT_INDEX] = (double)index;
}

// The loss check that opens a step's guard, one thread (guard_loss; unscale_gradients' finish): a fault already
// set counts the step as skipped; else a non-finite loss is FAULT_LOSS (FAULT_INDEX -1). True when neither:
// the step goes on.
template <typename T>
__device__ __forceinline__ bool guard_check_loss(const T* loss_out, double* guard) {
    if (guard_faulted(guard)) {
        guard[GUARD_SKIPPED] += 1.0;
        return false;
    }
    if (!isfinite(loss_out[0])) {
        guard_set_fault(guard, FAULT_LOSS, -1);
        return false;
    }
    return true;
}

#endif  // GPUBP_GUARD_CUH
