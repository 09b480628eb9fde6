// cuda_cpu.h: just enough of CUDA to run gpubp's kernels/*.cu on a CPU, for tests on machines with no GPU.
//
// A block's threads are fibers (ucontext) taking turns on one OS thread; blocks run one after another.
// __syncthreads and the warp barrier inside __shfl_xor_sync make a fiber yield until every thread of its
// block (or warp) has arrived. __shared__ becomes a function-local static: one copy, for the running block.
// threadIdx and friends are globals the scheduler sets before it resumes a fiber.
// What this cannot show: timing, bank conflicts, and anything a real warp does in lockstep that a kernel
// relies on without a barrier (gpubp's kernels rely on none). Misaligned 16-byte vector accesses are caught
// by compiling with -fsanitize=alignment (float4/double2 below are alignas(16)).
#pragma once

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>

#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))   // after the standard headers above, which spell it themselves
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// ---- fibers ----------------------------------------------------------------------------------------------
struct EmuFiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    unsigned thread;
    bool done;
};

struct EmuBarrier {   // generation-counting barrier for fibers
    int expected = 0, arrived = 0;
    unsigned long long generation = 0;
};

inline ucontext_t emu_scheduler_context;
inline EmuFiber* emu_current = nullptr;
inline const std::function<void()>* emu_body = nullptr;
inline EmuBarrier emu_block_barrier;
inline std::vector<EmuBarrier> emu_warp_barriers;
inline double emu_warp_slots[1024];
inline unsigned long long emu_progress = 0;   // barrier arrivals and finished threads: deadlock detection

inline void emu_yield() { swapcontext(&emu_current->context, &emu_scheduler_context); }

inline void emu_wait(EmuBarrier& barrier) {
    const unsigned long long generation = barrier.generation;
    ++emu_progress;
    if (++barrier.arrived == barrier.expected) {
        barrier.arrived = 0;
        ++barrier.generation;
        return;
    }
    while (barrier.generation == generation) emu_yield();
}

inline void __syncthreads() { emu_wait(emu_block_barrier); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
    const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
    emu_wait(emu_warp_barriers[warp]);   // every lane has read the previous exchange
    emu_warp_slots[t] = static_cast<double>(value);   // float and double round-trip exactly
    emu_wait(emu_warp_barriers[warp]);
    return static_cast<T>(emu_warp_slots[warp * 32 + (lane ^ lane_mask)]);
}

// Atomics: fibers run one at a time on one OS thread and switch only at barriers, so a plain
// read-modify-write is atomic here. Only the overloads gpubp's kernels use.
inline long long atomicMin(long long* address, long long value) {
    const long long old = *address;
    if (value < old) *address = value;
    return old;
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
    const unsigned long long old = *address;
    *address = old + value;
    return old;
}

inline void emu_fiber_main() {
    (*emu_body)();
    ++emu_progress;
    emu_current->done = true;   // then uc_link returns to the scheduler
}

// kernel<<<grid, block>>>(args...) for 1-D blocks of at most 1024 threads
template <typename... Params, typename... Args>
void emu_launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
    const unsigned threads = block.x;
    const size_t stack_size = 256 * 1024;
    std::vector<EmuFiber> fibers(threads);
    for (unsigned t = 0; t < threads; ++t) fibers[t].stack.reset(new char[stack_size]);
    const std::function<void()> body = [&] { kernel(args...); };
    emu_body = &body;
    blockDim = block;
    gridDim = grid;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                emu_block_barrier = EmuBarrier{static_cast<int>(threads)};
                emu_warp_barriers.assign((threads + 31) / 32, EmuBarrier{});
                for (unsigned w = 0; w < emu_warp_barriers.size(); ++w)
                    emu_warp_barriers[w].expected = threads - 32 * w < 32 ? threads - 32 * w : 32;
                for (unsigned t = 0; t < threads; ++t) {
                    EmuFiber& f = fibers[t];
                    f.thread = t;
                    f.done = false;
                    getcontext(&f.context);
                    f.context.uc_stack.ss_sp = f.stack.get();
                    f.context.uc_stack.ss_size = stack_size;
                    f.context.uc_link = &emu_scheduler_context;
                    makecontext(&f.context, emu_fiber_main, 0);
                }
                blockIdx = dim3{bx, by, bz};
                for (;;) {
                    const unsigned long long progress_before = emu_progress;
                    bool all_done = true;
                    for (EmuFiber& f : fibers) {
                        if (f.done) continue;
                        all_done = false;
                        threadIdx = dim3{f.thread, 0, 0};
                        emu_current = &f;
                        swapcontext(&emu_scheduler_context, &f.context);
                    }
                    if (all_done) break;
                    if (emu_progress == progress_before) {   // everyone waits at a barrier some never reach
                        fprintf(stderr, "cuda_cpu.h: block (%u,%u,%u) deadlocked\n", bx, by, bz);
                        abort();
                    }
                }
            }
}
