// Tensor-core building blocks (sm_80 and later): mma.sync, ldmatrix,
// cp.async, 16-byte global loads and the TF32 conversions, each as a small
// device helper around one PTX instruction.  Under the CPU executor
// (CUPYCONV_CPU_EXECUTOR) the same helpers run the executor's emulation of
// that instruction (tests/cpu_cuda/include/cupyconv_cpu_mma.h), so kernels
// built on them run in CI.
//
// Fragments follow the PTX ISA ("Matrix Fragments for mma.m16n8k8" and
// "mma.m16n8k16"; g = lane / 4, t = lane % 4):
//   m16n8k8 .tf32   A 16x8 row:  a[e] = A[g + 8*(e&1)][t + 4*(e>>1)], e < 4
//                   B 8x8 col:   b[e] = B[t + 4*e][g],                e < 2
//   m16n8k16 .f16/.bf16 (two elements per 32-bit register, low half first)
//                   A 16x16 row: a[e] = A[g + 8*((e>>1)&1)][2t + (e&1) + 8*(e>>2)], e < 8
//                   B 16x8 col:  b[e] = B[2t + (e&1) + 8*(e>>1)][g],                e < 4
//   C, D 16x8 f32:  c[e] = C[g + 8*(e>>1)][2t + (e&1)],                  e < 4
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cupyconv_common.cuh"

namespace cupyconv {

// bfloat16 sums in float32 too (cupyconv_common.cuh has float16's; only the
// tensor-core kernels take bfloat16 arrays).
template <> struct accumulator<__nv_bfloat16> { typedef float type; };
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
    return __bfloat162float(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

namespace mma {

#ifndef CUPYCONV_CPU_EXECUTOR
__device__ __forceinline__ unsigned shared_address(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
#endif

// ---- conversions --------------------------------------------------------------

// x rounded to TF32 (10 mantissa bits, to nearest, ties away from zero), as
// the 32-bit pattern an mma .tf32 operand register holds.
__device__ __forceinline__ unsigned to_tf32(float x) {
#ifdef CUPYCONV_CPU_EXECUTOR
    return cupyconv_cpu::tf32_rna(x);
#else
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#endif
}

// 3xTF32: x = big + small to about 2**-22 relative, both TF32, so that
// a*b ~ big_a*big_b + big_a*small_b + small_a*big_b (the small*small term is
// below float32 resolution).
__device__ __forceinline__ void split_tf32(float x, unsigned& big, unsigned& small) {
    big = to_tf32(x);
    small = to_tf32(x - __uint_as_float(big));
}

// Two 16-bit values as one register, a in the low half (fragment order).
__device__ __forceinline__ unsigned pack(__half a, __half b) {
    return (unsigned)__half_as_ushort(a) | (unsigned)__half_as_ushort(b) << 16;
}
__device__ __forceinline__ unsigned pack(__nv_bfloat16 a, __nv_bfloat16 b) {
    return (unsigned)__bfloat16_as_ushort(a) | (unsigned)__bfloat16_as_ushort(b) << 16;
}

// ---- mma.sync: d = a b + c for the whole warp ---------------------------------

__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4],
                                         const unsigned (&b)[2], const float (&c)[4]) {
#ifdef CUPYCONV_CPU_EXECUTOR
    cupyconv_cpu::mma_sync<cupyconv_cpu::MMA_TF32>(d, a, b, c, "mma.m16n8k8.tf32", __FILE__,
                                                    __LINE__);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

__device__ __forceinline__ void mma_f16(float (&d)[4], const unsigned (&a)[4],
                                        const unsigned (&b)[2], const float (&c)[4]) {
#ifdef CUPYCONV_CPU_EXECUTOR
    cupyconv_cpu::mma_sync<cupyconv_cpu::MMA_F16>(d, a, b, c, "mma.m16n8k16.f16", __FILE__,
                                                   __LINE__);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4],
                                         const unsigned (&b)[2], const float (&c)[4]) {
#ifdef CUPYCONV_CPU_EXECUTOR
    cupyconv_cpu::mma_sync<cupyconv_cpu::MMA_BF16>(d, a, b, c, "mma.m16n8k16.bf16", __FILE__,
                                                    __LINE__);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// ---- ldmatrix: Count 8x8 matrices of 16-bit elements from shared memory ------
// Lanes 8i..8i+7 give the 16-byte rows of matrix i; lane l receives in r[i]
// row l/4, columns 2(l%4) and 2(l%4)+1 of matrix i (of its transpose with
// Trans).  For 32-bit elements a row holds 4 and r[i] element (l/4, l%4).

template <int Count, bool Trans>
__device__ __forceinline__ void ldmatrix(unsigned (&r)[Count], const void* row) {
    static_assert(Count == 1 || Count == 2 || Count == 4, "ldmatrix loads 1, 2 or 4 matrices");
#ifdef CUPYCONV_CPU_EXECUTOR
    cupyconv_cpu::ldmatrix<Count, Trans>(r, row, Trans ? "ldmatrix.trans" : "ldmatrix",
                                         __FILE__, __LINE__);
#else
    const unsigned a = shared_address(row);
    if constexpr (Count == 1 && !Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];"
                     : "=r"(r[0]) : "r"(a));
    else if constexpr (Count == 1)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];"
                     : "=r"(r[0]) : "r"(a));
    else if constexpr (Count == 2 && !Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1]) : "r"(a));
    else if constexpr (Count == 2)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1]) : "r"(a));
    else if constexpr (!Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}

// ---- cp.async: global -> shared without registers -----------------------------
// Copies Bytes (4, 8 or 16) to shared `dst`, of which the first src_bytes
// come from global `src` and the rest are zero (src_bytes = 0: padding,
// src is not read).  16-byte copies bypass L1 (.cg), smaller ones cannot.
// The bytes are there only after the wait that covers the copy's group.

template <int Bytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
    static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef CUPYCONV_CPU_EXECUTOR
    cupyconv_cpu::async_copy(dst, src, Bytes, src_bytes, __FILE__, __LINE__);
#else
    if constexpr (Bytes == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                     :: "r"(shared_address(dst)), "l"(src), "r"(src_bytes) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;"
                     :: "r"(shared_address(dst)), "l"(src), "n"(Bytes), "r"(src_bytes)
                     : "memory");
#endif
}

// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef CUPYCONV_CPU_EXECUTOR
    cupyconv_cpu::async_commit();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most Pending of this thread's newest committed groups are
// still in flight.  Other threads see the bytes after a barrier.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef CUPYCONV_CPU_EXECUTOR
    cupyconv_cpu::async_wait(Pending);
#else
    asm volatile("cp.async.wait_group %0;" :: "n"(Pending) : "memory");
#endif
}

// ---- 16-byte global loads through registers ---------------------------------
// The 16 bytes at `src` (16-byte aligned, read-only while the kernel runs) as
// four 32-bit words: one ld.global.nc.v4.

__device__ __forceinline__ uint4 load_16_bytes(const void* src) {
#ifdef CUPYCONV_CPU_EXECUTOR
    return cupyconv_cpu::load_16_bytes(src, __FILE__, __LINE__);
#else
    return __ldg(static_cast<const uint4*>(src));
#endif
}

}  // namespace mma
}  // namespace cupyconv
