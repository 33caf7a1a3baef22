// Force-included (g++ -include) before every .cu file the CPU executor
// compiles: supplies what nvcc provides implicitly, so the SAME kernel source
// runs on the CPU.  The threads of a block are cooperative fibers of one OS
// thread (see cupyconv_cpu_runtime.inc); blocks run one after another.
//
//  * __shared__ variables are `static thread_local`: one copy per OS thread,
//    hence shared by all fibers (= threads) of the running block.  The
//    runtime poisons this module's whole TLS block before every block, so a
//    read of shared memory nobody wrote in this block shows up.
//  * `extern __shared__ T name[];` is rewritten by the executor (a textual,
//    line-preserving rewrite of the staged sources) into a pointer to the
//    launch's dynamic shared memory window.
//  * __syncthreads() and the warp intrinsics record their call site
//    (__builtin_FILE/__builtin_LINE default arguments) for error messages.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <type_traits>

#define CUPYCONV_CPU_EXECUTOR 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __shared__ __attribute__((used)) static thread_local

// ---------------------------------------------------------------- vector types
#define CUPYCONV_CPU_VEC1(name, T, al)                                                   \
    struct alignas(al) name { T x; };                                                    \
    inline name make_##name(T x) { return name{x}; }
#define CUPYCONV_CPU_VEC2(name, T, al)                                                   \
    struct alignas(al) name { T x, y; };                                                 \
    inline name make_##name(T x, T y) { return name{x, y}; }
#define CUPYCONV_CPU_VEC3(name, T, al)                                                   \
    struct alignas(al) name { T x, y, z; };                                              \
    inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define CUPYCONV_CPU_VEC4(name, T, al)                                                   \
    struct alignas(al) name { T x, y, z, w; };                                           \
    inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
#define CUPYCONV_CPU_VECS(prefix, T, a1, a2, a3, a4)                                     \
    CUPYCONV_CPU_VEC1(prefix##1, T, a1) CUPYCONV_CPU_VEC2(prefix##2, T, a2)              \
    CUPYCONV_CPU_VEC3(prefix##3, T, a3) CUPYCONV_CPU_VEC4(prefix##4, T, a4)

// Alignments as in CUDA's vector_types.h.
CUPYCONV_CPU_VECS(char, signed char, 1, 2, 1, 4)
CUPYCONV_CPU_VECS(uchar, unsigned char, 1, 2, 1, 4)
CUPYCONV_CPU_VECS(short, short, 2, 4, 2, 8)
CUPYCONV_CPU_VECS(ushort, unsigned short, 2, 4, 2, 8)
CUPYCONV_CPU_VECS(int, int, 4, 8, 4, 16)
CUPYCONV_CPU_VECS(uint, unsigned int, 4, 8, 4, 16)
CUPYCONV_CPU_VECS(float, float, 4, 8, 4, 16)
CUPYCONV_CPU_VECS(longlong, long long, 8, 16, 8, 16)
CUPYCONV_CPU_VECS(ulonglong, unsigned long long, 8, 16, 8, 16)
CUPYCONV_CPU_VECS(double, double, 8, 16, 8, 16)
#undef CUPYCONV_CPU_VECS
#undef CUPYCONV_CPU_VEC1
#undef CUPYCONV_CPU_VEC2
#undef CUPYCONV_CPU_VEC3
#undef CUPYCONV_CPU_VEC4

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
        : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace cupyconv_cpu {
// Component type of a CUDA vector type (the executor checks that an array
// argument's itemsize fits the pointee's component).
template <typename T> struct vector_component { typedef void type; };
#define CUPYCONV_CPU_COMPONENT(prefix, T)                                                \
    template <> struct vector_component<prefix##1> { typedef T type; };                  \
    template <> struct vector_component<prefix##2> { typedef T type; };                  \
    template <> struct vector_component<prefix##3> { typedef T type; };                  \
    template <> struct vector_component<prefix##4> { typedef T type; };
CUPYCONV_CPU_COMPONENT(char, signed char)
CUPYCONV_CPU_COMPONENT(uchar, unsigned char)
CUPYCONV_CPU_COMPONENT(short, short)
CUPYCONV_CPU_COMPONENT(ushort, unsigned short)
CUPYCONV_CPU_COMPONENT(int, int)
CUPYCONV_CPU_COMPONENT(uint, unsigned int)
CUPYCONV_CPU_COMPONENT(float, float)
CUPYCONV_CPU_COMPONENT(longlong, long long)
CUPYCONV_CPU_COMPONENT(ulonglong, unsigned long long)
CUPYCONV_CPU_COMPONENT(double, double)
#undef CUPYCONV_CPU_COMPONENT
template <> struct vector_component<__half2> { typedef __half type; };

// --------------------------------------------------------- built-in variables
// Set by the scheduler before it resumes a thread.
inline uint3 thread_idx_;
inline uint3 block_idx_;
inline dim3 block_dim_;
inline dim3 grid_dim_;
void* dynamic_shared_memory();

// Runtime entry points (cupyconv_cpu_runtime.inc).
int barrier(const char* file, int line, int predicate, const char* what);
enum warp_op_kind {
    WARP_SHFL, WARP_SHFL_UP, WARP_SHFL_DOWN, WARP_SHFL_XOR, WARP_BALLOT, WARP_SYNC, WARP_ACTIVEMASK,
    WARP_COLLECTIVE
};
unsigned long long warp_op(warp_op_kind op, unsigned mask, unsigned long long bits, int arg,
                           int width, const char* file, int line);
[[noreturn]] void device_trap(const char* what, const char* file, int line);
}  // namespace cupyconv_cpu

#define threadIdx (static_cast<const uint3&>(::cupyconv_cpu::thread_idx_))
#define blockIdx (static_cast<const uint3&>(::cupyconv_cpu::block_idx_))
#define blockDim (static_cast<const dim3&>(::cupyconv_cpu::block_dim_))
#define gridDim (static_cast<const dim3&>(::cupyconv_cpu::grid_dim_))
constexpr int warpSize = 32;

// ------------------------------------------------------------ synchronisation
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cupyconv_cpu::barrier(file, line, 0, "__syncthreads()");
}
inline int __syncthreads_count(int predicate, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
    return ::cupyconv_cpu::barrier(file, line, predicate, "__syncthreads_count()");
}
inline int __syncthreads_and(int predicate, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    return ::cupyconv_cpu::barrier(file, line, predicate != 0, "__syncthreads_and()") ==
           (int)(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int predicate, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
    return ::cupyconv_cpu::barrier(file, line, predicate != 0, "__syncthreads_or()") != 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    ::cupyconv_cpu::warp_op(::cupyconv_cpu::WARP_SYNC, mask, 0, 0, 32, file, line);
}
// One OS thread runs the whole grid: fences have nothing to order.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
[[noreturn]] inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cupyconv_cpu::device_trap("__trap()", file, line);
}

// ------------------------------------------------------------ warp intrinsics
namespace cupyconv_cpu {
template <typename T>
inline T warp_exchange(warp_op_kind op, unsigned mask, T var, int arg, int width,
                       const char* file, int line) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "__shfl_*_sync moves at most 8 bytes of a trivially copyable type");
    unsigned long long bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = warp_op(op, mask, bits, arg, width, file, line);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
}  // namespace cupyconv_cpu

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cupyconv_cpu::warp_exchange(::cupyconv_cpu::WARP_SHFL, mask, var, src_lane, width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cupyconv_cpu::warp_exchange(::cupyconv_cpu::WARP_SHFL_UP, mask, var, (int)delta, width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cupyconv_cpu::warp_exchange(::cupyconv_cpu::WARP_SHFL_DOWN, mask, var, (int)delta, width, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cupyconv_cpu::warp_exchange(::cupyconv_cpu::WARP_SHFL_XOR, mask, var, lane_mask, width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    return (unsigned)::cupyconv_cpu::warp_op(::cupyconv_cpu::WARP_BALLOT, mask,
                                             predicate != 0, 0, 32, file, line);
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return __ballot_sync(mask, predicate, file, line) != 0;
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return __ballot_sync(mask, !predicate, file, line) == 0;
}
// The lanes that reach this call together: it completes once every other
// live lane of the warp has returned or waits elsewhere (lockstep model).
inline unsigned __activemask(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return (unsigned)::cupyconv_cpu::warp_op(::cupyconv_cpu::WARP_ACTIVEMASK, 0xffffffffu, 0, 0,
                                             32, file, line);
}

// ----------------------------------------- warp-wide and asynchronous PTX
namespace cupyconv_cpu {
// A warp-wide instruction (mma.sync, ldmatrix): the calling lane waits until
// all 32 lanes of its warp reach the same call, then `execute` runs once
// with every lane's `lane_data` (indexed by lane) and all lanes go on.
typedef void (*collective_fn)(void* const* lanes);
void warp_collective(void* lane_data, collective_fn execute, const char* what,
                     const char* file, int line);
// Fails the launch unless [p, p + bytes) lies in this block's shared memory
// (static or dynamic) and p is a multiple of `align`.
void check_shared(const void* p, size_t bytes, size_t align, const char* what);
// cp.async.{ca,cg}.shared.global [dst], [src], bytes, src_bytes (the rest
// zero-filled), commit_group and wait_group `pending` of the calling thread.
void async_copy(void* dst, const void* src, int bytes, int src_bytes, const char* file,
                int line);
void async_commit();
void async_wait(int pending);
// ld.global.nc.v4.u32: the 16 bytes at src, which must be 16-byte aligned.
uint4 load_16_bytes(const void* src, const char* file, int line);
}  // namespace cupyconv_cpu
#include "cupyconv_cpu_mma.h"

// -------------------------------------------------------------------- atomics
// Threads switch only at barriers and warp intrinsics, so a plain
// read-modify-write is atomic.  Integer arithmetic wraps as on the GPU.
namespace cupyconv_cpu {
template <typename T, typename F>
inline T atomic_update(T* address, F update) {
    const T old = *address;
    *address = update(old);
    return old;
}
template <typename T>
inline T wrap_add(T a, T b) {
    if constexpr (std::is_integral<T>::value)
        return (T)((typename std::make_unsigned<T>::type)a + (typename std::make_unsigned<T>::type)b);
    else
        return a + b;
}
}  // namespace cupyconv_cpu

template <typename T>
inline T atomicAdd(T* address, T val) {
    return ::cupyconv_cpu::atomic_update(address, [&](T old) { return ::cupyconv_cpu::wrap_add(old, val); });
}
template <typename T>
inline T atomicSub(T* address, T val) {
    return ::cupyconv_cpu::atomic_update(address, [&](T old) {
        return (T)((typename std::make_unsigned<T>::type)old - (typename std::make_unsigned<T>::type)val);
    });
}
template <typename T>
inline T atomicExch(T* address, T val) {
    return ::cupyconv_cpu::atomic_update(address, [&](T) { return val; });
}
template <typename T>
inline T atomicMin(T* address, T val) {
    return ::cupyconv_cpu::atomic_update(address, [&](T old) { return val < old ? val : old; });
}
template <typename T>
inline T atomicMax(T* address, T val) {
    return ::cupyconv_cpu::atomic_update(address, [&](T old) { return old < val ? val : old; });
}
template <typename T>
inline T atomicAnd(T* address, T val) {
    return ::cupyconv_cpu::atomic_update(address, [&](T old) { return (T)(old & val); });
}
template <typename T>
inline T atomicOr(T* address, T val) {
    return ::cupyconv_cpu::atomic_update(address, [&](T old) { return (T)(old | val); });
}
template <typename T>
inline T atomicXor(T* address, T val) {
    return ::cupyconv_cpu::atomic_update(address, [&](T old) { return (T)(old ^ val); });
}
template <typename T>
inline T atomicCAS(T* address, T compare, T val) {
    return ::cupyconv_cpu::atomic_update(address, [&](T old) { return old == compare ? val : old; });
}
inline unsigned atomicInc(unsigned* address, unsigned limit) {
    return ::cupyconv_cpu::atomic_update(address, [&](unsigned old) { return old >= limit ? 0u : old + 1u; });
}
inline unsigned atomicDec(unsigned* address, unsigned limit) {
    return ::cupyconv_cpu::atomic_update(
        address, [&](unsigned old) { return (old == 0u || old > limit) ? limit : old - 1u; });
}

// ------------------------------------------------------------ math and misc
template <typename T>
inline T __ldg(const T* p) { return *p; }

// CUDA's min/max for any mix of arithmetic types (floating: fmin/fmax
// semantics, a NaN operand loses).
template <typename A, typename B,
          typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value, int>::type = 0>
inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    if constexpr (std::is_floating_point<C>::value) return std::fmin((C)a, (C)b);
    else return (C)b < (C)a ? (C)b : (C)a;
}
template <typename A, typename B,
          typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value, int>::type = 0>
inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    if constexpr (std::is_floating_point<C>::value) return std::fmax((C)a, (C)b);
    else return (C)a < (C)b ? (C)b : (C)a;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline int __float_as_int(float x) { int r; std::memcpy(&r, &x, 4); return r; }
inline unsigned __float_as_uint(float x) { unsigned r; std::memcpy(&r, &x, 4); return r; }
inline float __int_as_float(int x) { float r; std::memcpy(&r, &x, 4); return r; }
inline float __uint_as_float(unsigned x) { float r; std::memcpy(&r, &x, 4); return r; }
inline long long __double_as_longlong(double x) { long long r; std::memcpy(&r, &x, 8); return r; }
inline double __longlong_as_double(long long x) { double r; std::memcpy(&r, &x, 8); return r; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}

// Device-side assert() fails the launch instead of aborting the process.
#include <cassert>
#ifndef NDEBUG
#undef assert
#define assert(e) \
    ((e) ? (void)0 : ::cupyconv_cpu::device_trap("assertion `" #e "' failed", __FILE__, __LINE__))
#endif
