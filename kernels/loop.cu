// loop.cu: the training loop's device-side ops (issue 11: a step never waits for the host). CPU reference:
// gpubp/backends/numpy_backend.py; the guard's layout and the order of a step: gpubp/guard.py, guard.cuh.
//
//   gather_rows      out[i, :] = src[order[cursor[0] + i], :]       src (M, F), order (M,), out (n, F)
//   advance_cursor   cursor[0] += n                                  one thread
//   guard_loss       guard_loss_kernel (one thread): FAULT set: SKIPPED += 1; else a non-finite loss: FAULT = LOSS,
//                    FAULT_INDEX = -1, FAULT_STEP = STEP. The gradients are checked by the update's CHECK phase
//                    (optim.cu), where each is in a register anyway: no pass of its own.
//   record_step      count_correct_kernel: correct predictions -> *count (an exact integer sum, atomicAdd:
//                    order-independent), as gpubp.losses.accuracy counts them: bce every element (A > 0.5)
//                    == (Y > 0.5); softmax_ce the arg-max of each row of A against that of Y, the first index
//                    among equals (numpy's argmax; a NaN wins, as numpy's does).
//                    record_step_kernel (one thread), when guard[FAULT] is not set, adds in float64 what the
//                    reference adds: LOSS_SUM += L·n, ROWS += n, CORRECT += (count / compared)·n (the numpy
//                    value accuracy·n, bit for bit), ring[(STEP − 1) mod RING_SIZE] = L; *count is reset.
// Every scalar that changes from step to step (the cursor, the guard, the count) lives in device memory, so
// a captured CUDA graph replays these launches unchanged.
//
// Launch shapes (block 256 everywhere):
//   gather_rows_kernel           groups of 2^group_log2 threads, one row per group (the host sizes a group to
//                                the row's 16-byte vectors), grid-stride over rows. Traffic: n·F reads and
//                                writes, plus n indices.
//   count_correct_kernel         bce: grid-stride over N·C elements; softmax_ce: a warp per row (lanes stride
//                                over C, arg-max by butterfly), 8 rows per block. Traffic: 2·N·C reads.
//   guard_loss/record/advance    one thread: a few scalars.
#include "common.cuh"
#include "guard.cuh"

enum { LOOP_LOSS_MSE = 0, LOOP_LOSS_BCE = 1, LOOP_LOSS_SOFTMAX_CE = 2 };   // gpubp/losses.py ids

// ---------------------------------------------------------------------------------------------------------
// gather_rows, advance_cursor

// A row whose position runs past the permutation, or whose index is not a row of src (a caller's bug: the
// network never makes one), becomes NaN instead of a read out of bounds: the step's loss is then not finite
// and the guard names it.
template <typename T>
__global__ void __launch_bounds__(256)
gather_rows_kernel(const T* __restrict__ src, const long long* __restrict__ order,
                   const long long* __restrict__ cursor, T* out, long long M, int n, long long F, int group_log2) {
    constexpr int V = Vec16<T>::n;
    const int group = 1 << group_log2, lane = threadIdx.x & (group - 1);
    const int rows_per_block = blockDim.x >> group_log2;
    const long long start = cursor[0];
    const bool vectors = rows_aligned16(src, F) && rows_aligned16(out, F);
    for (long long r = (long long)blockIdx.x * rows_per_block + (threadIdx.x >> group_log2); r < n;
         r += (long long)gridDim.x * rows_per_block) {
        const long long position = start + r;
        const long long from = position >= 0 && position < M ? order[position] : -1;
        T* to = out + r * F;
        if (from < 0 || from >= M) {
            for (long long c = lane; c < F; c += group) to[c] = T(nan(""));
            continue;
        }
        const T* row = src + from * F;
        if (vectors) {
            T v[V];
            for (long long c = (long long)lane * V; c < F; c += (long long)group * V) {
                load16(row + c, v);
                store16(to + c, v);
            }
        } else {
            for (long long c = lane; c < F; c += group) to[c] = row[c];
        }
    }
}

// one thread, after every gather of the batch (stream order) has read the cursor
__global__ void advance_cursor_kernel(long long* cursor, long long n) {
    if (blockIdx.x == 0 && threadIdx.x == 0) cursor[0] += n;
}

// ---------------------------------------------------------------------------------------------------------
// guard_loss

template <typename T>
__global__ void guard_loss_kernel(const T* __restrict__ loss_out, double* guard) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    guard_check_loss(loss_out, guard);
}

// ---------------------------------------------------------------------------------------------------------
// record_step

// true when (v at i) is numpy's arg-max over (w at j): a NaN before any number, then the larger value, then
// the smaller index
template <typename T>
__device__ __forceinline__ bool argmax_prefers(T v, int i, T w, int j) {
    const bool v_nan = v != v, w_nan = w != w;
    if (v_nan || w_nan) return v_nan && (!w_nan || i < j);
    return v > w || (v == w && i < j);
}

// the arg-max of row[0 .. C) as numpy takes it; every lane of the warp calls it and gets the answer
template <typename T>
__device__ __forceinline__ int warp_row_argmax(const T* row, int C, int lane) {
    T best = T(0);
    int at = -1;   // -1: this lane has seen no column yet
    for (int c = lane; c < C; c += 32) {
        const T value = row[c];
        if (at < 0 || argmax_prefers(value, c, best, at)) {
            best = value;
            at = c;
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const T other = __shfl_xor_sync(0xffffffffu, best, offset);
        const int other_at = __shfl_xor_sync(0xffffffffu, at, offset);
        if (other_at >= 0 && (at < 0 || argmax_prefers(other, other_at, best, at))) {
            best = other;
            at = other_at;
        }
    }
    return at;
}

template <typename T>
__global__ void __launch_bounds__(256)
count_correct_kernel(int loss, const T* __restrict__ A, const T* __restrict__ Y, int N, int C, const double* guard,
                     long long* count) {
    __shared__ unsigned int warp_counts[32];
    if (guard_faulted(guard)) return;   // record_step_kernel records nothing either
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    unsigned int correct = 0;
    if (loss == LOOP_LOSS_BCE) {
        const long long size = (long long)N * C;
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
             i += (long long)gridDim.x * blockDim.x)
            correct += (A[i] > T(0.5)) == (Y[i] > T(0.5));
    } else {   // LOOP_LOSS_SOFTMAX_CE: rows are warp-uniform, so every lane takes part in the shuffles
        for (long long row = (long long)blockIdx.x * warps + warp; row < N; row += (long long)gridDim.x * warps) {
            const int predicted = warp_row_argmax(A + row * C, C, lane);
            const int target = warp_row_argmax(Y + row * C, C, lane);
            if (lane == 0) correct += predicted == target;
        }
    }
    correct = warp_sum(correct);
    if (lane == 0) warp_counts[warp] = correct;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long block_count = 0;
        for (int w = 0; w < warps; ++w) block_count += warp_counts[w];
        if (block_count) atomicAdd(reinterpret_cast<unsigned long long*>(count), block_count);
    }
}

// one thread, after the update (stream order); `compared` is the count's denominator (bce N·C, softmax_ce N),
// 0 where no accuracy applies (mse)
template <typename T>
__global__ void record_step_kernel(const T* __restrict__ loss_out, long long* count, int n, long long compared,
                                   double* guard) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    if (!guard_faulted(guard)) {
        const double loss = (double)loss_out[0];
        guard[GUARD_LOSS_SUM] += loss * n;
        guard[GUARD_ROWS] += n;
        if (compared > 0) guard[GUARD_CORRECT] += ((double)count[0] / (double)compared) * n;
        const long long last = (long long)guard[GUARD_STEP] - 1;   // the step just taken; Python's modulo below
        guard[GUARD_RING + ((last % GUARD_RING_SIZE) + GUARD_RING_SIZE) % GUARD_RING_SIZE] = loss;
    }
    count[0] = 0;
}
