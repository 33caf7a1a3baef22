// Stand-in for CUDA's <cuda_bf16.h> when the CPU executor compiles kernels
// with g++.  __nv_bfloat16 stores the upper 16 bits of an IEEE binary32;
// float -> bfloat16 rounds to nearest even (as __float2bfloat16_rn and
// cvt.rn.bf16.f32), a NaN becomes the canonical NaN 0x7FFF as on the GPU,
// and bfloat16 -> float is exact.  Only
// what the kernels use is declared: conversions, raw bits and comparisons
// (through float, as nvcc's operators on sm_80 compute them).
#pragma once

#include <cstring>

struct __nv_bfloat16_raw {
    unsigned short x;
};

struct __nv_bfloat16;
inline __nv_bfloat16 __float2bfloat16_rn(float f);
inline float __bfloat162float(__nv_bfloat16 h);

struct alignas(2) __nv_bfloat16 {
    unsigned short __x;

    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
    __nv_bfloat16(float f);
    __nv_bfloat16(double d) : __nv_bfloat16((float)d) {}
    __nv_bfloat16(int v) : __nv_bfloat16((float)v) {}
    __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) { __x = r.x; return *this; }
    __nv_bfloat16& operator=(float f);
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
    operator float() const;
};

struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

namespace cupyconv_cpu {
inline unsigned short float_to_bfloat16_bits(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu) != 0u)
        return 0x7FFFu;  // the canonical NaN
    // Round to nearest even on the 16 dropped bits; a carry into the exponent
    // rounds up to the next binade or to infinity, as it should.
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
}  // namespace cupyconv_cpu

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    return __nv_bfloat16(__nv_bfloat16_raw{cupyconv_cpu::float_to_bfloat16_bits(f)});
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) {
    const unsigned u = (unsigned)h.__x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16::__nv_bfloat16(float f) : __x(__float2bfloat16_rn(f).__x) {}
inline __nv_bfloat16& __nv_bfloat16::operator=(float f) {
    __x = __float2bfloat16_rn(f).__x;
    return *this;
}
inline __nv_bfloat16::operator float() const { return __bfloat162float(*this); }

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) {
    return __nv_bfloat16(__nv_bfloat16_raw{v});
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline bool __hisnan(__nv_bfloat16 h) { return (h.__x & 0x7F80u) == 0x7F80u && (h.__x & 0x7Fu); }
inline bool operator==(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) == float(b); }
inline bool operator!=(const __nv_bfloat16& a, const __nv_bfloat16& b) {
    return !__hisnan(a) && !__hisnan(b) && float(a) != float(b);
}
inline bool operator<(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) < float(b); }
inline bool operator<=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) <= float(b); }
inline bool operator>(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) > float(b); }
inline bool operator>=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) >= float(b); }
