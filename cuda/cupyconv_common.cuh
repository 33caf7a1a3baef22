// Shared by every cupyconv kernel: index type, grid-stride helpers,
// float16 accumulation and a 16-byte element for copies of complex128.
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

// An opaque 16-byte element (complex128), aligned like its 8-byte halves.
struct alignas(8) bytes16 {
    unsigned long long lo, hi;
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
