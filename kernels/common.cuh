// common.cuh: what every gpubp kernel file shares.
//   - activation ids and g(z), g'(z) exactly as gpubp/activations.py computes them
//   - float/double overloads of the math functions (NVRTC here has no <cmath>)
//   - 16-byte vector loads/stores and "runs" of L contiguous elements with a scalar fallback at edges
//
// NVRTC gets this file's text pasted in place of `#include "common.cuh"` (gpubp/backends/cuda_sources.py),
// so CuPy's kernel cache sees every edit; nvcc finds it through -I kernels. Hence include guards, no #pragma once.
#ifndef GPUBP_COMMON_CUH
#define GPUBP_COMMON_CUH

// ---------------------------------------------------------------------------------------------------------
// math overloads: one name for float and double, so templated kernels read like the numpy reference

__device__ __forceinline__ float exp_t(float x) { return expf(x); }
__device__ __forceinline__ double exp_t(double x) { return exp(x); }
__device__ __forceinline__ float log_t(float x) { return logf(x); }
__device__ __forceinline__ double log_t(double x) { return log(x); }
__device__ __forceinline__ float tanh_t(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_t(double x) { return tanh(x); }
__device__ __forceinline__ float sqrt_t(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_t(double x) { return sqrt(x); }

__device__ __forceinline__ long long ceil_div_ll(long long a, long long b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------------------
// activations: ids of gpubp/activations.py

enum { ACT_IDENTITY = 0, ACT_RELU = 1, ACT_LEAKY_RELU = 2, ACT_SIGMOID = 3, ACT_TANH = 4 };

// A = g(Z)
template <typename T>
__device__ __forceinline__ T activation_forward(int act, T z, T alpha) {
    switch (act) {
        case ACT_RELU: return z > T(0) ? z : T(0);
        case ACT_LEAKY_RELU: return z * (z > T(0) ? T(1) : alpha);
        case ACT_SIGMOID: return T(1) / (T(1) + exp_t(-z));  // exp(-z) = inf for z << 0 gives 0, as numpy
        case ACT_TANH: return tanh_t(z);
        default: return z;
    }
}

// dA ⊙ g'(Z). NOTE: relu/leaky_relu take the mask from Z, not A, so g'(0) = 0 as in the seed; sigmoid and
// tanh use A (σ' = σ(1 − σ), tanh' = 1 − tanh²). A multiply, not a select, so dA = inf/NaN propagates as numpy.
template <typename T>
__device__ __forceinline__ T activation_mask(int act, T dA, T z, T a, T alpha) {
    switch (act) {
        case ACT_RELU: return dA * (z > T(0) ? T(1) : T(0));
        case ACT_LEAKY_RELU: return dA * (z > T(0) ? T(1) : alpha);
        case ACT_SIGMOID: return dA * (a * (T(1) - a));
        case ACT_TANH: return dA * (T(1) - a * a);
        default: return dA;
    }
}

// ---------------------------------------------------------------------------------------------------------
// 16-byte vector access (float4 = 4 floats, double2 = 2 doubles). The caller guarantees 16-byte alignment.

template <typename T> struct Vec16 { static constexpr int n = 16 / sizeof(T); };

__device__ __forceinline__ void load16(const float* p, float* v) {
    const float4 w = *reinterpret_cast<const float4*>(p);
    v[0] = w.x; v[1] = w.y; v[2] = w.z; v[3] = w.w;
}
__device__ __forceinline__ void load16(const double* p, double* v) {
    const double2 w = *reinterpret_cast<const double2*>(p);
    v[0] = w.x; v[1] = w.y;
}
__device__ __forceinline__ void store16(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store16(double* p, const double* v) {
    *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
}

// true when p is 16-byte aligned and every row start p + r*ld is too
template <typename T>
__device__ __forceinline__ bool rows_aligned16(const T* p, long long ld) {
    return (reinterpret_cast<unsigned long long>(p) % 16 == 0) && (ld % Vec16<T>::n == 0);
}

// A run: L contiguous elements p[0..L). Only the first n_valid exist (the matrix edge); `aligned` says p is
// 16-byte aligned. Full aligned runs move as 16-byte vectors, edge runs element by element.
template <typename T, int L>
__device__ __forceinline__ void load_run(const T* p, T (&v)[L], int n_valid, bool aligned) {
    if constexpr ((L * sizeof(T)) % 16 == 0) {
        if (aligned && n_valid == L) {
#pragma unroll
            for (int j = 0; j < L; j += Vec16<T>::n) load16(p + j, v + j);
            return;
        }
    }
#pragma unroll
    for (int j = 0; j < L; ++j) v[j] = j < n_valid ? p[j] : T(0);
}

template <typename T, int L>
__device__ __forceinline__ void store_run(T* p, const T (&v)[L], int n_valid, bool aligned) {
    if constexpr ((L * sizeof(T)) % 16 == 0) {
        if (aligned && n_valid == L) {
#pragma unroll
            for (int j = 0; j < L; j += Vec16<T>::n) store16(p + j, v + j);
            return;
        }
    }
#pragma unroll
    for (int j = 0; j < L; ++j)
        if (j < n_valid) p[j] = v[j];
}

// ---------------------------------------------------------------------------------------------------------
// warp reductions (butterfly: every lane ends with the same, order-fixed, result: deterministic)

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const T other = __shfl_xor_sync(0xffffffffu, x, offset);
        x = other > x ? other : x;
    }
    return x;
}

#endif  // GPUBP_COMMON_CUH
