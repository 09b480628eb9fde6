// cuda_cpu.h: just enough of CUDA to run gpubp's kernels/*.cu on a CPU, for tests on machines with no GPU.
//
// One std::thread per CUDA thread, one block at a time: __shared__ becomes a function-local static (one copy
// for the running block), __syncthreads a std::barrier over the block, __shfl_xor_sync an exchange through
// a per-warp slot array between two warp barriers. threadIdx and friends are thread_local.
// What this cannot show: timing, bank conflicts, and anything a real warp does in lockstep that a kernel
// relies on without a barrier (gpubp's kernels rely on none). Misaligned 16-byte vector accesses are caught
// by compiling with -fsanitize=alignment (float4/double2 below are alignas(16)).
#pragma once

#include <math.h>

#include <barrier>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

struct WarpExchange {
    explicit WarpExchange(int lanes) : barrier(lanes) {}
    double slot[32];
    std::barrier<> barrier;
};

inline thread_local std::barrier<>* emu_block_barrier = nullptr;
inline thread_local WarpExchange* emu_warp = nullptr;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
    const unsigned lane = threadIdx.x % 32;
    emu_warp->barrier.arrive_and_wait();   // every lane has read the previous exchange
    emu_warp->slot[lane] = static_cast<double>(value);   // float and double round-trip exactly
    emu_warp->barrier.arrive_and_wait();
    return static_cast<T>(emu_warp->slot[lane ^ lane_mask]);
}

// kernel<<<grid, block>>>(args...) for 1-D blocks, blocks one after another
template <typename... Params, typename... Args>
void emu_launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
    const int threads = static_cast<int>(block.x);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> block_barrier(threads);
                std::vector<std::unique_ptr<WarpExchange>> warps;
                for (int w = 0; w * 32 < threads; ++w)
                    warps.emplace_back(new WarpExchange(threads - 32 * w < 32 ? threads - 32 * w : 32));
                std::vector<std::thread> pool;
                for (int t = 0; t < threads; ++t)
                    pool.emplace_back([&, t] {
                        threadIdx = dim3{static_cast<unsigned>(t), 0, 0};
                        blockIdx = dim3{bx, by, bz};
                        blockDim = block;
                        gridDim = grid;
                        emu_block_barrier = &block_barrier;
                        emu_warp = warps[t / 32].get();
                        kernel(args...);
                    });
                for (auto& th : pool) th.join();
            }
}
