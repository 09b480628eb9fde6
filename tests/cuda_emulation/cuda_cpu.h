// cuda_cpu.h: just enough of CUDA to run gpubp's kernels/*.cu on a CPU, for tests on machines with no GPU.
//
// A block's threads are fibers (ucontext) taking turns on one OS thread; blocks run one after another. It is
// stricter than a GPU where that shows bugs a GPU shows only now and then:
//   - schedule: __syncthreads and the warp barrier inside __shfl_xor_sync make a fiber yield until every
//     thread of its block (or warp) has arrived. The scheduler resumes fibers in a seeded random order,
//     reshuffled every round (so which fiber runs first after each barrier varies), and runs the blocks of a
//     grid in a seeded random order too: a missing barrier or a dependence on thread or block order shows
//     as results that change with the seed (emu_set_seed).
//   - shared memory: __shared__ is a function-local static (one copy, for the running block). The emulator
//     build adds EMU_SHARED_DECLARED(name) after each __shared__ declaration (emulator.py), which registers
//     the array and fills it with 0xFF bytes (NaN as float or double) the first time a block passes it: a
//     read of shared memory not written in this block gives NaN, never the previous block's values.
//   - launch limits: gridDim.x <= 2^31 - 1, gridDim.y, z <= 65535, 1..1024 threads a block, <= 48 KiB of
//     static shared memory a block (the sizes of the __shared__ arrays its threads passed: a declaration in
//     a branch no thread takes is not counted), and no deadlock (a barrier some threads never reach): each
//     fails the launch with a message (emu_last_error).
// Global memory is checked by the launcher (emulator.py): each array argument lives in an allocation of its
// own between guard zones of signaling NaN, checked after every launch; in an AddressSanitizer build
// (GPUBP_EMULATION_ASAN=1) the guard zones are poisoned, so a load from them fails the launch too.
// What this cannot show: timing, bank conflicts, races between two accesses inside one stretch between
// barriers (a fiber runs such a stretch without interruption), and anything a real warp does in lockstep
// that a kernel relies on without a barrier (gpubp's kernels rely on none). Misaligned 16-byte vector
// accesses are caught by compiling with -fsanitize=alignment (float4/double2 below are alignas(16)).
#pragma once

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <random>
#include <string>
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
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(16) double2 {
    double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// ---- launch limits (every CUDA GPU since compute capability 3.0) ----------------------------------------
constexpr unsigned long long EMU_MAX_GRID_X = (1ull << 31) - 1, EMU_MAX_GRID_YZ = 65535;
constexpr unsigned EMU_MAX_THREADS = 1024;
constexpr size_t EMU_MAX_STATIC_SHARED = 48 * 1024;

inline std::string emu_error;      // why the last launch failed; empty when it did not
inline std::mt19937_64 emu_rng{0};  // the schedule: set by emu_set_seed, advanced by every launch
// Skew (test-only, 0 = off, the default): each round the scheduler leaves each fiber out with this
// probability (percent), so warps drift apart by many barrier stretches, as on a GPU where one warp may run
// a whole loop ahead of another between two __syncthreads. Without it, warps that execute the same
// sequence of warp-wide instructions advance in lockstep (one stretch a round), and a race between warps
// over shared memory not ordered by __syncthreads (a buffer refilled while another warp still reads it)
// cannot show. Set by emu_set_skew (harness.cpp).
inline int emu_skew_percent = 0;

// ---- shared memory --------------------------------------------------------------------------------------
struct EmuSharedArray {
    void* address;
    size_t bytes;
    unsigned long long poisoned_in_block;   // emu_block_serial when it was last filled with 0xFF
};
inline std::vector<EmuSharedArray> emu_shared_arrays;   // those the running launch has declared
inline unsigned long long emu_block_serial = 0;         // counts blocks run, over all launches

// Called by every thread that passes a __shared__ declaration (emulator.py puts the call after each one).
// The first pass in a block poisons the array: on a GPU a block's shared memory starts with whatever was
// there, so a kernel must write before it reads.
inline void emu_shared_declared(void* address, size_t bytes) {
    for (EmuSharedArray& a : emu_shared_arrays) {
        if (a.address != address) continue;
        if (a.poisoned_in_block != emu_block_serial) {
            memset(address, 0xFF, bytes);
            a.poisoned_in_block = emu_block_serial;
        }
        return;
    }
    memset(address, 0xFF, bytes);
    emu_shared_arrays.push_back({address, bytes, emu_block_serial});
}
#define EMU_SHARED_DECLARED(name) emu_shared_declared(&(name), sizeof(name))

inline size_t emu_static_shared_bytes() {
    size_t total = 0;
    for (const EmuSharedArray& a : emu_shared_arrays) total += a.bytes;
    return total;
}

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
inline unsigned long long emu_progress = 0;   // barrier arrivals and departures, finished threads: deadlocks

// Under AddressSanitizer (emulator.py's GPUBP_EMULATION_ASAN=1) every switch between stacks is announced,
// as ASan asks of code that swaps stacks itself; elsewhere these are no-ops.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
inline const void* emu_scheduler_stack = nullptr;   // the stack the scheduler runs on, as ASan reports it
inline size_t emu_scheduler_stack_size = 0;
#define EMU_START_SWITCH(fake_stack, bottom, size) __sanitizer_start_switch_fiber(fake_stack, bottom, size)
#define EMU_FINISH_SWITCH(fake_stack, bottom, size) __sanitizer_finish_switch_fiber(fake_stack, bottom, size)
#else
#define EMU_START_SWITCH(fake_stack, bottom, size) ((void)0)
#define EMU_FINISH_SWITCH(fake_stack, bottom, size) ((void)0)
#endif

inline void emu_yield() {
    void* fake_stack = nullptr;
    EMU_START_SWITCH(&fake_stack, emu_scheduler_stack, emu_scheduler_stack_size);
    swapcontext(&emu_current->context, &emu_scheduler_context);
    EMU_FINISH_SWITCH(fake_stack, &emu_scheduler_stack, &emu_scheduler_stack_size);
}

// Every arrival yields, the last one too: the barrier opens at the end of a scheduler round, and the next
// round resumes the waiting fibers in a fresh random order, so no fiber is always first past a barrier.
inline void emu_wait(EmuBarrier& barrier) {
    const unsigned long long generation = barrier.generation;
    ++emu_progress;
    if (++barrier.arrived == barrier.expected) {
        barrier.arrived = 0;
        ++barrier.generation;
    }
    do emu_yield();
    while (barrier.generation == generation);
    ++emu_progress;
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
    EMU_FINISH_SWITCH(nullptr, &emu_scheduler_stack, &emu_scheduler_stack_size);
    (*emu_body)();
    ++emu_progress;
    emu_current->done = true;   // then uc_link returns to the scheduler
    EMU_START_SWITCH(nullptr, emu_scheduler_stack, emu_scheduler_stack_size);   // nullptr: this stack ends
}

// Runs one block to the end; false (and emu_error) when its threads deadlock.
inline bool emu_run_block(std::vector<EmuFiber>& fibers, size_t stack_size, dim3 block_index) {
    const unsigned threads = blockDim.x;
    ++emu_block_serial;
    emu_block_barrier = EmuBarrier{static_cast<int>(threads)};
    emu_warp_barriers.assign((threads + 31) / 32, EmuBarrier{});
    for (unsigned w = 0; w < emu_warp_barriers.size(); ++w)
        emu_warp_barriers[w].expected = threads - 32 * w < 32 ? threads - 32 * w : 32;
    std::vector<EmuFiber*> running;
    for (unsigned t = 0; t < threads; ++t) {
        EmuFiber& f = fibers[t];
        f.thread = t;
        f.done = false;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.get();
        f.context.uc_stack.ss_size = stack_size;
        f.context.uc_link = &emu_scheduler_context;
        makecontext(&f.context, emu_fiber_main, 0);
        running.push_back(&f);
    }
    blockIdx = block_index;
    int idle_rounds = 0;   // consecutive rounds without progress
    while (!running.empty()) {
        const unsigned long long progress_before = emu_progress;
        std::shuffle(running.begin(), running.end(), emu_rng);   // a new order every round
        for (EmuFiber* f : running) {
            if (emu_skew_percent > 0 && static_cast<int>(emu_rng() % 100) < emu_skew_percent) continue;
            threadIdx = dim3{f->thread, 0, 0};
            emu_current = f;
            void* fake_stack = nullptr;
            EMU_START_SWITCH(&fake_stack, f->stack.get(), stack_size);
            swapcontext(&emu_scheduler_context, &f->context);
            EMU_FINISH_SWITCH(fake_stack, nullptr, nullptr);
        }
        running.erase(std::remove_if(running.begin(), running.end(), [](EmuFiber* f) { return f->done; }),
                      running.end());
        // all wait at a barrier some never reach (under skew: for 64 rounds, which a fiber left out of each
        // round by chance has a chance of 1 in 2^64 or less to cause)
        idle_rounds = emu_progress == progress_before ? idle_rounds + 1 : 0;
        if (!running.empty() && idle_rounds > (emu_skew_percent > 0 ? 64 : 0)) {
            emu_error = "block (" + std::to_string(block_index.x) + "," + std::to_string(block_index.y) + "," +
                        std::to_string(block_index.z) + ") deadlocked: " + std::to_string(running.size()) +
                        " of " + std::to_string(threads) +
                        " threads wait at a barrier the others never reach (or reach after exiting)";
            return false;   // the waiting fibers are abandoned: their stacks hold nothing to destroy
        }
    }
    return true;
}

// kernel<<<grid, block>>>(args...) for 1-D blocks. Returns false with emu_error set when the launch breaks
// a launch limit or deadlocks.
template <typename... Params, typename... Args>
bool emu_launch(unsigned long long gx, unsigned long long gy, unsigned long long gz, unsigned long long threads,
                void (*kernel)(Params...), Args... args) {
    emu_error.clear();
    if (gx < 1 || gy < 1 || gz < 1 || gx > EMU_MAX_GRID_X || gy > EMU_MAX_GRID_YZ || gz > EMU_MAX_GRID_YZ) {
        emu_error = "grid (" + std::to_string(gx) + ", " + std::to_string(gy) + ", " + std::to_string(gz) +
                    ") is outside the limits: x in 1..2^31-1, y and z in 1..65535";
        return false;
    }
    if (threads < 1 || threads > EMU_MAX_THREADS) {
        emu_error = std::to_string(threads) + " threads a block: a block has 1..1024";
        return false;
    }
    const size_t stack_size = 256 * 1024;
    std::vector<EmuFiber> fibers(threads);
    for (EmuFiber& f : fibers) f.stack.reset(new char[stack_size]);
    const std::function<void()> body = [&] { kernel(args...); };
    emu_body = &body;
    blockDim = dim3{static_cast<unsigned>(threads), 1, 1};
    gridDim = dim3{static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz)};
    emu_shared_arrays.clear();
    // Blocks in a seeded random order (a GPU promises none). Grids too large to list run in order.
    const unsigned long long blocks = gx * gy * gz;
    std::vector<unsigned long long> order(blocks <= (1u << 20) ? blocks : 0);
    for (unsigned long long i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), emu_rng);
    for (unsigned long long i = 0; i < blocks; ++i) {
        const unsigned long long b = order.empty() ? i : order[i];
        const dim3 block_index{static_cast<unsigned>(b % gx), static_cast<unsigned>(b / gx % gy),
                               static_cast<unsigned>(b / gx / gy)};
        if (!emu_run_block(fibers, stack_size, block_index)) return false;
        // checked once the first block has declared its arrays (every block declares the same ones)
        if (emu_static_shared_bytes() > EMU_MAX_STATIC_SHARED) {
            emu_error = std::to_string(emu_static_shared_bytes()) +
                        " bytes of __shared__ arrays: a block may have 48 KiB (49152 bytes) of static shared memory";
            return false;
        }
    }
    return true;
}
