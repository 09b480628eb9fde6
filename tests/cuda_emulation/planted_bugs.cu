// planted_bugs.cu: test-only kernels with deliberate bugs, each switched on by `bug` (0 = the correct
// kernel), that the emulator must catch (tests/test_emulator_checks.py). Not part of gpubp: compiled into
// the emulation harness only, never by NVRTC. Launch: 1-D grid, 1-D block; x and out have n elements.

// out[i] = x[i] shifted through shared memory: each thread stores its element, then reads its neighbour's.
//   bug 1: no __syncthreads between the store and the read (a race: right only if the neighbour ran first)
//   bug 2: every thread but thread 0 waits at the barrier (a deadlock)
__global__ void planted_shared_kernel(const float* x, float* out, int n, int bug) {
    __shared__ float tile[1024];
    const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    tile[t] = i < n ? x[i] : 0.0f;
    if (bug == 0 || (bug == 2 && t != 0)) __syncthreads();
    const int neighbour = t == 0 ? 0 : t - 1;   // thread t reads what thread t - 1 stored
    if (i < n) out[i] = tile[neighbour];
}

// out[i] = 2 x[i], one thread per element (grid-stride).
//   bug 1: the last element is stored one past the end of out
//   bug 2: the first element is stored one before the start of out
//   bug 3: the last element is loaded from one past the end of x
//   bug 4: the loop runs to i <= n: loads x[n] and stores out[n] (the value read from past the end)
__global__ void planted_bounds_kernel(const float* x, float* out, int n, int bug) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n + (bug == 4); i += gridDim.x * blockDim.x) {
        const float value = 2.0f * x[bug == 3 && i == n - 1 ? n : i];
        out[bug == 1 && i == n - 1 ? n : bug == 2 && i == 0 ? -1 : i] = value;
    }
}

// One block's static shared memory: BYTES of it. 49152 (48 KiB) is the most a block may have.
template <int BYTES>
__global__ void planted_shared_size_kernel(float* out) {
    __shared__ float tile[BYTES / sizeof(float)];
    tile[threadIdx.x] = 1.0f;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = tile[0];
}
