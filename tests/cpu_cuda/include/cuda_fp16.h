// Stand-in for CUDA's <cuda_fp16.h> when the CPU executor compiles kernels
// with g++.  __half stores IEEE binary16 bits and converts through GCC's
// _Float16 (round to nearest even, like the __float2half_rn intrinsic).
// The class mirrors what nvcc's cuda_fp16.hpp declares (implicit conversions
// from float/double/integers, to float/integers/bool, arithmetic and
// comparison operators on two __half) so that overload resolution, and thus
// ambiguity errors, match what nvcc sees.
#pragma once

#include <cstring>
#include <limits>

struct __half_raw {
    unsigned short x;
};

struct __half;
inline __half __float2half(float f);
inline __half __double2half(double d);
inline float __half2float(__half h);

namespace cupyconv_cpu {
// CUDA's __half2int_rz family: truncate toward zero, saturate, NaN -> 0.
template <typename I>
inline I half_to_integer(float f) {
    if (f != f) return 0;
    if (f <= (float)std::numeric_limits<I>::min()) return std::numeric_limits<I>::min();
    if (f >= (float)std::numeric_limits<I>::max()) return std::numeric_limits<I>::max();
    return (I)f;
}
}  // namespace cupyconv_cpu

struct alignas(2) __half {
    unsigned short __x;

    __half() = default;
    constexpr __half(const __half_raw& r) : __x(r.x) {}
    __half(float f) : __x(__float2half(f).__x) {}
    __half(double d) : __x(__double2half(d).__x) {}
    __half(short v) : __half((float)v) {}
    __half(unsigned short v) : __half((float)v) {}
    __half(int v) : __half((float)v) {}
    __half(unsigned int v) : __half((float)v) {}
    __half(long v) : __half((float)v) {}
    __half(unsigned long v) : __half((float)v) {}
    __half(long long v) : __half((float)v) {}
    __half(unsigned long long v) : __half((float)v) {}

    __half& operator=(const __half_raw& r) { __x = r.x; return *this; }
    __half& operator=(float f) { __x = __float2half(f).__x; return *this; }
    __half& operator=(double d) { __x = __double2half(d).__x; return *this; }
    operator __half_raw() const { return __half_raw{__x}; }

    operator float() const { return __half2float(*this); }
    operator signed char() const { return cupyconv_cpu::half_to_integer<signed char>(float(*this)); }
    operator unsigned char() const { return cupyconv_cpu::half_to_integer<unsigned char>(float(*this)); }
    operator char() const { return cupyconv_cpu::half_to_integer<char>(float(*this)); }
    operator short() const { return cupyconv_cpu::half_to_integer<short>(float(*this)); }
    operator unsigned short() const { return cupyconv_cpu::half_to_integer<unsigned short>(float(*this)); }
    operator int() const { return cupyconv_cpu::half_to_integer<int>(float(*this)); }
    operator unsigned int() const { return cupyconv_cpu::half_to_integer<unsigned int>(float(*this)); }
    operator long() const { return cupyconv_cpu::half_to_integer<long>(float(*this)); }
    operator unsigned long() const { return cupyconv_cpu::half_to_integer<unsigned long>(float(*this)); }
    operator long long() const { return cupyconv_cpu::half_to_integer<long long>(float(*this)); }
    operator unsigned long long() const { return cupyconv_cpu::half_to_integer<unsigned long long>(float(*this)); }
    operator bool() const { return (__x & 0x7FFFu) != 0u; }
};

struct alignas(4) __half2 {
    __half x, y;
};

inline __half __float2half_rn(float f) {
    const _Float16 h = (_Float16)f;
    __half r;
    std::memcpy(&r.__x, &h, 2);
    return r;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half __double2half(double d) {
    const _Float16 h = (_Float16)d;  // one rounding, as CUDA's __double2half
    __half r;
    std::memcpy(&r.__x, &h, 2);
    return r;
}
inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.__x, 2);
    return (float)f;
}
inline __half __int2half_rn(int v) { return __float2half_rn((float)v); }
inline int __half2int_rz(__half h) { return cupyconv_cpu::half_to_integer<int>(__half2float(h)); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __ushort_as_half(unsigned short v) { return __half(__half_raw{v}); }
inline __half __short_as_half(short v) { return __half(__half_raw{(unsigned short)v}); }
inline bool __hisnan(__half h) { return (h.__x & 0x7C00u) == 0x7C00u && (h.__x & 0x03FFu) != 0u; }
inline int __hisinf(__half h) { return h.__x == 0x7C00u ? 1 : (h.__x == 0xFC00u ? -1 : 0); }
inline __half __habs(__half h) { return __ushort_as_half((unsigned short)(h.__x & 0x7FFFu)); }
inline __half __hneg(__half h) { return __ushort_as_half((unsigned short)(h.__x ^ 0x8000u)); }
inline __half __hadd(__half a, __half b) { return __float2half(__half2float(a) + __half2float(b)); }
inline __half __hsub(__half a, __half b) { return __float2half(__half2float(a) - __half2float(b)); }
inline __half __hmul(__half a, __half b) { return __float2half(__half2float(a) * __half2float(b)); }
inline __half __hdiv(__half a, __half b) { return __float2half(__half2float(a) / __half2float(b)); }
inline __half __hfma(__half a, __half b, __half c) {
    return __double2half((double)__half2float(a) * __half2float(b) + __half2float(c));
}
inline bool __heq(__half a, __half b) { return __half2float(a) == __half2float(b); }
inline bool __hne(__half a, __half b) { return !__hisnan(a) && !__hisnan(b) && __half2float(a) != __half2float(b); }
inline bool __hlt(__half a, __half b) { return __half2float(a) < __half2float(b); }
inline bool __hle(__half a, __half b) { return __half2float(a) <= __half2float(b); }
inline bool __hgt(__half a, __half b) { return __half2float(a) > __half2float(b); }
inline bool __hge(__half a, __half b) { return __half2float(a) >= __half2float(b); }
// __hmax/__hmin: NaN only if both are NaN (like fmaxf/fminf).
inline __half __hmax(__half a, __half b) {
    if (__hisnan(a)) return b;
    if (__hisnan(b)) return a;
    return __half2float(a) >= __half2float(b) ? a : b;
}
inline __half __hmin(__half a, __half b) {
    if (__hisnan(a)) return b;
    if (__hisnan(b)) return a;
    return __half2float(a) <= __half2float(b) ? a : b;
}

inline __half operator+(const __half& a, const __half& b) { return __hadd(a, b); }
inline __half operator-(const __half& a, const __half& b) { return __hsub(a, b); }
inline __half operator*(const __half& a, const __half& b) { return __hmul(a, b); }
inline __half operator/(const __half& a, const __half& b) { return __hdiv(a, b); }
inline __half& operator+=(__half& a, const __half& b) { return a = __hadd(a, b); }
inline __half& operator-=(__half& a, const __half& b) { return a = __hsub(a, b); }
inline __half& operator*=(__half& a, const __half& b) { return a = __hmul(a, b); }
inline __half& operator/=(__half& a, const __half& b) { return a = __hdiv(a, b); }
inline __half operator+(const __half& h) { return h; }
inline __half operator-(const __half& h) { return __hneg(h); }
inline bool operator==(const __half& a, const __half& b) { return __heq(a, b); }
inline bool operator!=(const __half& a, const __half& b) { return __hne(a, b); }
inline bool operator<(const __half& a, const __half& b) { return __hlt(a, b); }
inline bool operator<=(const __half& a, const __half& b) { return __hle(a, b); }
inline bool operator>(const __half& a, const __half& b) { return __hgt(a, b); }
inline bool operator>=(const __half& a, const __half& b) { return __hge(a, b); }

inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __half2half2(__half a) { return __half2{a, a}; }
inline __half __low2half(__half2 v) { return v.x; }
inline __half __high2half(__half2 v) { return v.y; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
