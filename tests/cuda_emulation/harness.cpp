// harness.cpp: gpubp's kernels/*.cu compiled for the CPU (cuda_cpu.h) behind a launch API shaped like CUDA's
// own: a kernel is looked up by its name expression (the strings cuda_sources.name_expressions gives
// NVRTC), and launched with a grid, a block and an array of pointers to its argument values, as
// cuLaunchKernel takes them. emu_signature tells the caller each parameter's type, so a test can check the
// arguments the cupy backend passes (CuPy itself checks none). A launch that breaks a launch limit or
// deadlocks fails: emu_launch_kernel returns -2 and emu_last_error says why, naming the kernel.
// emu_set_seed fixes the schedule (the order of threads and blocks, cuda_cpu.h).
// planted_bugs.cu adds test-only kernels with deliberate bugs (tests/test_emulator_checks.py).
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
#include "loop.cu"
#include "gemm_tc.cu"
#include "fused_mlp.cu"
#include "dense_tc.cu"
#include "loss_scale.cu"
#include "planted_bugs.cu"
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
    std::function<bool(unsigned long long, unsigned long long, unsigned long long, unsigned long long, void**)>
        launch;
};

template <typename... P, size_t... I>
static bool launch_with(void (*kernel)(P...), unsigned long long gx, unsigned long long gy, unsigned long long gz,
                        unsigned long long threads, void** args, std::index_sequence<I...>) {
    return emu_launch(gx, gy, gz, threads, kernel, *static_cast<std::remove_cv_t<P>*>(args[I])...);
}

template <typename... P>
static Entry entry(void (*kernel)(P...)) {
    return Entry{std::string{type_code<P>()...},
                 [kernel](unsigned long long gx, unsigned long long gy, unsigned long long gz,
                          unsigned long long threads, void** args) {
                     return launch_with(kernel, gx, gy, gz, threads, args, std::index_sequence_for<P...>{});
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
#define LOOP_ENTRIES(T, TS)                                                                \
    PLAIN_ENTRY(gather_rows_kernel, T, TS), PLAIN_ENTRY(guard_loss_kernel, T, TS),         \
    PLAIN_ENTRY(count_correct_kernel, T, TS), PLAIN_ENTRY(record_step_kernel, T, TS)

#define TC_GEMM_ENTRIES(P)                                                                 \
    {"gemm_tc_kernel<" #P ", true, true>", entry(gemm_tc_kernel<P, true, true>)},          \
    {"gemm_tc_kernel<" #P ", true, false>", entry(gemm_tc_kernel<P, true, false>)},        \
    {"gemm_tc_kernel<" #P ", false, false>", entry(gemm_tc_kernel<P, false, false>)}

#define FUSED_ENTRIES(P, H)                                                                \
    {"fused_mlp_forward_kernel<" #P ", " #H ">", entry(fused_mlp_forward_kernel<P, H>)},   \
    {"fused_mlp_backward_kernel<" #P ", " #H ">", entry(fused_mlp_backward_kernel<P, H>)}
#define FUSED_WIDTH_ENTRIES(P)                                                             \
    FUSED_ENTRIES(P, 16), FUSED_ENTRIES(P, 32), FUSED_ENTRIES(P, 48), FUSED_ENTRIES(P, 64), FUSED_ENTRIES(P, 128)
#define TC_DENSE_ENTRIES(P)                                                                \
    {"dense_forward_tc_kernel<" #P ">", entry(dense_forward_tc_kernel<P>)},                \
    {"input_grad_tc_kernel<" #P ">", entry(input_grad_tc_kernel<P>)},                      \
    {"weight_grad_tc_kernel<" #P ">", entry(weight_grad_tc_kernel<P>)}

static const std::map<std::string, Entry>& registry() {
    static const std::map<std::string, Entry> kernels = {
        ALL_ENTRIES(float, "float"),
        ALL_ENTRIES(double, "double"),
        LOOP_ENTRIES(float, "float"),
        LOOP_ENTRIES(double, "double"),
        {"update_finish_kernel", entry(update_finish_kernel)},
        {"advance_cursor_kernel", entry(advance_cursor_kernel)},
        TC_GEMM_ENTRIES(TcBf16), TC_GEMM_ENTRIES(TcFp16), TC_GEMM_ENTRIES(TcTf32),
        FUSED_WIDTH_ENTRIES(TcBf16), FUSED_WIDTH_ENTRIES(TcFp16),
        {"fused_mlp_round_kernel<TcBf16>", entry(fused_mlp_round_kernel<TcBf16>)},
        {"fused_mlp_round_kernel<TcFp16>", entry(fused_mlp_round_kernel<TcFp16>)},
        TC_DENSE_ENTRIES(TcBf16), TC_DENSE_ENTRIES(TcFp16), TC_DENSE_ENTRIES(TcTf32),
        {"to_storage_kernel<StoreBf16>", entry(to_storage_kernel<StoreBf16>)},
        {"to_storage_kernel<StoreFp16>", entry(to_storage_kernel<StoreFp16>)},
        {"loss_grad_stored_kernel<StoreF32>", entry(loss_grad_stored_kernel<StoreF32>)},
        {"loss_grad_stored_kernel<StoreBf16>", entry(loss_grad_stored_kernel<StoreBf16>)},
        {"loss_grad_stored_kernel<StoreFp16>", entry(loss_grad_stored_kernel<StoreFp16>)},
        {"unscale_scan_kernel", entry(unscale_scan_kernel)},
        {"unscale_finish_kernel", entry(unscale_finish_kernel)},
        {"update_scale_kernel", entry(update_scale_kernel)},
        // test-only (planted_bugs.cu)
        {"planted_shared_kernel", entry(planted_shared_kernel)},
        {"planted_bounds_kernel", entry(planted_bounds_kernel)},
        {"planted_shared_size_kernel<49152>", entry(planted_shared_size_kernel<49152>)},
        {"planted_shared_size_kernel<49156>", entry(planted_shared_size_kernel<49156>)},
        // test-only (tc_probes.cu)
        {"tc_mma_probe_kernel<TcBf16>", entry(tc_mma_probe_kernel<TcBf16>)},
        {"tc_mma_probe_kernel<TcFp16>", entry(tc_mma_probe_kernel<TcFp16>)},
        {"tc_mma_probe_kernel<TcTf32>", entry(tc_mma_probe_kernel<TcTf32>)},
        {"tc_ldmatrix_probe_kernel", entry(tc_ldmatrix_probe_kernel)},
        {"storage_decode_probe_kernel<StoreBf16>", entry(storage_decode_probe_kernel<StoreBf16>)},
        {"storage_decode_probe_kernel<StoreFp16>", entry(storage_decode_probe_kernel<StoreFp16>)},
    };
    return kernels;
}

// ---- AddressSanitizer (built with GPUBP_EMULATION_ASAN=1, emulator.py) -----------------------------------
// The launcher marks the guard zones around each array argument as poisoned (emu_guard), so ASan reports
// every access to them, loads included. Built with -fsanitize-recover=address and run with
// halt_on_error=0, a report does not end the process: the first of a launch is kept, and fails it.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
static unsigned long long stray_address = 0;   // of the first access ASan reported in this launch
static int stray_is_write = 0;
static void on_asan_report(const char*) {
    if (stray_address != 0) return;
    stray_address = reinterpret_cast<unsigned long long>(__asan_get_report_address());
    stray_is_write = __asan_get_report_access_type();
}
#endif

extern "C" {

// poison (1) or unpoison (0) bytes for AddressSanitizer; nothing in a build without it
void emu_guard(void* address, unsigned long long bytes, int poison) {
#if defined(__SANITIZE_ADDRESS__)
    if (poison) __asan_poison_memory_region(address, bytes);
    else __asan_unpoison_memory_region(address, bytes);
#endif
    (void)address, (void)bytes, (void)poison;
}

// 0 when ASan reported no access in the last launch, else 1 for a load and 2 for a store at *address
int emu_stray_access(unsigned long long* address) {
#if defined(__SANITIZE_ADDRESS__)
    *address = stray_address;
    return stray_address == 0 ? 0 : stray_is_write ? 2 : 1;
#else
    *address = 0;
    return 0;
#endif
}

// the parameter type codes of a name expression, or nullptr when the harness does not know it
const char* emu_signature(const char* name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : it->second.signature.c_str();
}

// 0 on success, -1 for an unknown name expression, -2 for a failed launch (emu_last_error says why)
int emu_launch_kernel(const char* name, unsigned long long gx, unsigned long long gy, unsigned long long gz,
                      unsigned long long threads, void** args) {
    auto it = registry().find(name);
    if (it == registry().end()) return -1;
#if defined(__SANITIZE_ADDRESS__)
    __asan_set_error_report_callback(on_asan_report);
    stray_address = 0;
#endif
    if (it->second.launch(gx, gy, gz, threads, args)) return 0;
    emu_error = std::string(name) + ": " + emu_error;
    return -2;
}

const char* emu_last_error() { return emu_error.c_str(); }

// The schedule of every launch from now on: the same seed and launches give the same thread and block orders.
void emu_set_seed(unsigned long long seed) { emu_rng.seed(seed); }

// Test-only: the schedule's skew (cuda_cpu.h's emu_skew_percent; 0, the default, turns it off).
void emu_set_skew(int percent) { emu_skew_percent = percent; }

}  // extern "C"
