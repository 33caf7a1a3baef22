// Shared by every cupyconv kernel: index type, grid-stride helpers,
// float16 accumulation, 16-byte copies and fast division.
#pragma once

#include <cuda_fp16.h>

namespace cupyconv {

// Arrays may hold more than 2**31 - 1 elements: all index math is 64-bit.
typedef long long index_t;

__device__ __forceinline__ index_t global_thread_id() {
    return (index_t)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ index_t grid_stride() {
    return (index_t)gridDim.x * blockDim.x;
}

// 16 opaque bytes moved by one aligned load or store.
struct alignas(16) bytes16 {
    unsigned long long lo, hi;
};

// Division by a runtime constant d (1 <= d < 2**31) of an n < 2**31 as a
// multiply-high, an add and a shift (magic and shift from the host's
// cupyconv._kernels.divisor32); a 64-bit division costs dozens of
// instructions.
struct divisor32 {
    unsigned int magic, shift;
    __device__ __forceinline__ unsigned int operator()(unsigned int n) const {
        return (__umulhi(n, magic) + n) >> shift;
    }
    // The same numbers computed on the device, for a thread that divides by
    // d (1 <= d < 2**31) several times: one 64-bit division.
    __device__ __forceinline__ static divisor32 of(index_t d) {
        const unsigned int shift = 32 - __clz((int)(d - 1));
        const unsigned long long magic = ((1ull << 32) * ((1ull << shift) - d)) / d + 1;
        return {(unsigned int)magic, shift};
    }
};

// Accumulator type per element type: float16 sums in float32.
template <typename T> struct accumulator { typedef T type; };
template <> struct accumulator<__half> { typedef float type; };

template <typename T>
__device__ __forceinline__ typename accumulator<T>::type to_acc(T v) { return v; }
template <>
__device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename accumulator<T>::type v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }

}  // namespace cupyconv
