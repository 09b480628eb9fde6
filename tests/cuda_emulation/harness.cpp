// harness.cpp: gpubp's kernels/*.cu compiled for the CPU (cuda_cpu.h) behind a launch API shaped like CUDA's
// own: a kernel is looked up by its name expression (the strings cuda_sources.name_expressions gives
// NVRTC), and launched with a grid, a block and an array of pointers to its argument values, as
// cuLaunchKernel takes them. emu_signature tells the caller each parameter's type, so a test can check the
// arguments the cupy backend passes (CuPy itself checks none).
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda_cpu.h"
#include "tensor_core_cpu.h"   // mma/ldmatrix/cp.async for gemm_tc.cu, before the kernels

#include "dense_forward.cu"
#include "dense_backward.cu"
#include "loss.cu"
#include "optim.cu"
#include "gemm_tc.cu"
#include "tc_probes.cu"   // test-only: the emulated tensor-core instructions one at a time

// one character per parameter type: i int, q long long, d double, f float*, D double*, L long long*,
// H unsigned short* (bf16/fp16 bits)
template <typename P> constexpr char type_code() {
    typedef std::remove_cv_t<std::remove_pointer_t<P>> E;
    if constexpr (std::is_pointer_v<P>) {
        if constexpr (std::is_same_v<E, float>) return 'f';
        else if constexpr (std::is_same_v<E, double>) return 'D';
        else if constexpr (std::is_same_v<E, long long>) return 'L';
        else if constexpr (std::is_same_v<E, unsigned short>) return 'H';
        else return '?';
    } else if constexpr (std::is_same_v<P, int>) return 'i';
    else if constexpr (std::is_same_v<P, long long>) return 'q';
    else if constexpr (std::is_same_v<P, double>) return 'd';
    else return '?';
}

struct Entry {
    std::string signature;
    std::function<void(dim3, dim3, void**)> launch;
};

template <typename... P, size_t... I>
static void launch_with(void (*kernel)(P...), dim3 grid, dim3 block, void** args, std::index_sequence<I...>) {
    emu_launch(grid, block, kernel, *static_cast<std::remove_cv_t<P>*>(args[I])...);
}

template <typename... P>
static Entry entry(void (*kernel)(P...)) {
    return Entry{std::string{type_code<P>()...}, [kernel](dim3 grid, dim3 block, void** args) {
                     launch_with(kernel, grid, block, args, std::index_sequence_for<P...>{});
                 }};
}

#define GEMM_ENTRIES(KERNEL, T, TS)                                                        \
    {#KERNEL "<" TS ", 128, 128, 8, 8, 8>", entry(KERNEL<T, 128, 128, 8, 8, 8>)},          \
    {#KERNEL "<" TS ", 64, 64, 8, 4, 4>", entry(KERNEL<T, 64, 64, 8, 4, 4>)}
#define PLAIN_ENTRY(KERNEL, T, TS) {#KERNEL "<" TS ">", entry(KERNEL<T>)}
#define ALL_ENTRIES(T, TS)                                                                 \
    GEMM_ENTRIES(dense_forward_kernel, T, TS), GEMM_ENTRIES(input_grad_kernel, T, TS),     \
    GEMM_ENTRIES(weight_grad_kernel, T, TS), PLAIN_ENTRY(activation_mask_kernel, T, TS),   \
    PLAIN_ENTRY(weight_grad_reduce_kernel, T, TS), PLAIN_ENTRY(loss_grad_kernel, T, TS),   \
    PLAIN_ENTRY(loss_reduce_kernel, T, TS), PLAIN_ENTRY(one_hot_kernel, T, TS),            \
    PLAIN_ENTRY(sgd_update_kernel, T, TS), PLAIN_ENTRY(adam_update_kernel, T, TS)

#define TC_GEMM_ENTRIES(P)                                                                 \
    {"gemm_tc_kernel<" #P ", true, true>", entry(gemm_tc_kernel<P, true, true>)},          \
    {"gemm_tc_kernel<" #P ", true, false>", entry(gemm_tc_kernel<P, true, false>)},        \
    {"gemm_tc_kernel<" #P ", false, false>", entry(gemm_tc_kernel<P, false, false>)}

static const std::map<std::string, Entry>& registry() {
    static const std::map<std::string, Entry> kernels = {
        ALL_ENTRIES(float, "float"),
        ALL_ENTRIES(double, "double"),
        {"step_increment_kernel", entry(step_increment_kernel)},
        TC_GEMM_ENTRIES(TcBf16), TC_GEMM_ENTRIES(TcFp16), TC_GEMM_ENTRIES(TcTf32),
        {"tc_mma_probe_kernel<TcBf16>", entry(tc_mma_probe_kernel<TcBf16>)},
        {"tc_mma_probe_kernel<TcFp16>", entry(tc_mma_probe_kernel<TcFp16>)},
        {"tc_mma_probe_kernel<TcTf32>", entry(tc_mma_probe_kernel<TcTf32>)},
        {"tc_ldmatrix_probe_kernel", entry(tc_ldmatrix_probe_kernel)},
    };
    return kernels;
}

extern "C" {

// the parameter type codes of a name expression, or nullptr when the harness does not know it
const char* emu_signature(const char* name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : it->second.signature.c_str();
}

// 0 on success, -1 for an unknown name expression
int emu_launch_kernel(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned threads, void** args) {
    auto it = registry().find(name);
    if (it == registry().end()) return -1;
    it->second.launch(dim3{gx, gy, gz}, dim3{threads, 1, 1}, args);
    return 0;
}

}  // extern "C"
