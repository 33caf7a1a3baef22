// The tensor-core instructions of cuda/cupyconv_mma.cuh on the CPU executor
// (included by cupyconv_cpu_shim.h).  cupyconv_mma.cuh's helpers call these
// where the GPU build has inline PTX.
//
// mma.sync and ldmatrix are warp-wide: each lane stops at the instruction
// (warp_collective) and the instruction executes once, when all 32 lanes of
// the warp have arrived, on every lane's registers.  Each lane's registers
// hold exactly the elements the PTX ISA assigns to it (section "Matrix
// Fragments for mma.m16n8k8 / mma.m16n8k16", groupID = lane >> 2,
// threadID_in_group = lane % 4); the *_element functions below state that
// assignment once and the tests check kernels against it.
//
// cp.async: the source is read when the copy is issued, the destination is
// overwritten with the shared-memory poison byte at once, and the bytes land
// only when a cp.async.wait_group that covers the copy's group runs in the
// issuing thread.  A kernel that reads the destination before that wait (or,
// from another thread, before a barrier after it) reads poison.
#pragma once

#include <cstring>

namespace cupyconv_cpu {

inline unsigned float_bits(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// cvt.rna.tf32.f32: round to 10 mantissa bits, to nearest, ties away from
// zero (adding half a unit to the magnitude's bits and truncating does
// exactly that; a carry moves into the exponent, up to infinity).  NaN gives
// the canonical NaN 0x7FFFFFFF; infinities stay.
inline unsigned tf32_rna(float x) {
    const unsigned u = float_bits(x);
    if ((u & 0x7F800000u) == 0x7F800000u) return (u & 0x007FFFFFu) ? 0x7FFFFFFFu : u;
    return (u + 0x1000u) & 0xFFFFE000u;
}

// ---- fragment layouts (PTX ISA), for fragment element e of lane `lane` ------
struct matrix_position { int row, col; };

// m16n8k8 .tf32 A (16 x 8, row): registers a0..a3, one element each.
inline matrix_position tf32_a_element(int lane, int e) {
    return {(lane >> 2) + 8 * (e & 1), (lane & 3) + 4 * (e >> 1)};
}
// m16n8k8 .tf32 B (8 x 8, col): b0, b1; (row = k, col = n).
inline matrix_position tf32_b_element(int lane, int e) {
    return {(lane & 3) + 4 * e, lane >> 2};
}
// m16n8k16 .f16/.bf16 A (16 x 16, row): a0..a7, two per register (low half first).
inline matrix_position half_a_element(int lane, int e) {
    return {(lane >> 2) + 8 * ((e >> 1) & 1), 2 * (lane & 3) + (e & 1) + 8 * (e >> 2)};
}
// m16n8k16 .f16/.bf16 B (16 x 8, col): b0..b3; (row = k, col = n).
inline matrix_position half_b_element(int lane, int e) {
    return {2 * (lane & 3) + (e & 1) + 8 * (e >> 1), lane >> 2};
}
// C and D of both shapes (16 x 8 float): c0..c3.
inline matrix_position accumulator_element(int lane, int e) {
    return {(lane >> 2) + 8 * (e >> 1), 2 * (lane & 3) + (e & 1)};
}

// ---- mma.sync ---------------------------------------------------------------
enum mma_kind { MMA_TF32, MMA_F16, MMA_BF16 };

struct mma_lane {
    float* d;
    const unsigned* a;
    const unsigned* b;
    const float* c;
};

// Element e of a lane's operand registers as a real number: a .tf32 operand
// is read through its upper 19 bits (the tensor cores ignore the other 13,
// so an operand the kernel forgot to round is truncated, not rounded).
template <mma_kind K>
inline double operand(const unsigned* regs, int e) {
    if constexpr (K == MMA_TF32) {
        return bits_float(regs[e] & 0xFFFFE000u);
    } else {
        const unsigned short h = (unsigned short)(regs[e >> 1] >> (16 * (e & 1)));
        if constexpr (K == MMA_F16) {
            _Float16 f;
            std::memcpy(&f, &h, 2);
            return (double)f;
        } else {
            return bits_float((unsigned)h << 16);
        }
    }
}

// D = A B + C for the whole warp.  Products of the narrow formats are exact
// in double and so is their sum to well below float32 resolution; D is
// rounded to float once (the hardware's order of additions is unspecified).
template <mma_kind K>
void mma_execute(void* const* lanes) {
    constexpr int kDepth = K == MMA_TF32 ? 8 : 16;
    constexpr int kA = kDepth / 2, kB = kDepth / 4;  // elements per lane
    double a[16][16], b[16][8], c[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const mma_lane& l = *static_cast<const mma_lane*>(lanes[lane]);
        for (int e = 0; e < kA; ++e) {
            const matrix_position p = K == MMA_TF32 ? tf32_a_element(lane, e) : half_a_element(lane, e);
            a[p.row][p.col] = operand<K>(l.a, e);
        }
        for (int e = 0; e < kB; ++e) {
            const matrix_position p = K == MMA_TF32 ? tf32_b_element(lane, e) : half_b_element(lane, e);
            b[p.row][p.col] = operand<K>(l.b, e);
        }
        for (int e = 0; e < 4; ++e) {
            const matrix_position p = accumulator_element(lane, e);
            c[p.row][p.col] = l.c[e];
        }
    }
    float d[16][8];
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
            double sum = c[i][j];
            for (int k = 0; k < kDepth; ++k) sum += a[i][k] * b[k][j];
            d[i][j] = (float)sum;
        }
    // Only now: d may be the same registers as c.
    for (int lane = 0; lane < 32; ++lane) {
        const mma_lane& l = *static_cast<const mma_lane*>(lanes[lane]);
        for (int e = 0; e < 4; ++e) {
            const matrix_position p = accumulator_element(lane, e);
            l.d[e] = d[p.row][p.col];
        }
    }
}

template <mma_kind K>
inline void mma_sync(float* d, const unsigned* a, const unsigned* b, const float* c,
                     const char* what, const char* file, int line) {
    mma_lane mine{d, a, b, c};
    warp_collective(&mine, &mma_execute<K>, what, file, line);
}

// ---- ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 -----------------
struct ldmatrix_lane {
    const void* row;  // this lane's row address (lanes 8i..8i+7: matrix i)
    unsigned* r;
};

// Lane l receives, in register i, elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1)
// of matrix i (low half first); with .trans those of the transpose.
template <int Count, bool Trans>
void ldmatrix_execute(void* const* lanes) {
    unsigned short m[4][8][8];
    for (int i = 0; i < Count; ++i)
        for (int row = 0; row < 8; ++row) {
            const void* address = static_cast<const ldmatrix_lane*>(lanes[8 * i + row])->row;
            check_shared(address, 16, 16, "ldmatrix");
            std::memcpy(m[i][row], address, 16);
        }
    for (int lane = 0; lane < 32; ++lane) {
        const ldmatrix_lane& l = *static_cast<const ldmatrix_lane*>(lanes[lane]);
        const int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < Count; ++i) {
            const unsigned lo = Trans ? m[i][2 * t][g] : m[i][g][2 * t];
            const unsigned hi = Trans ? m[i][2 * t + 1][g] : m[i][g][2 * t + 1];
            l.r[i] = lo | hi << 16;
        }
    }
}

template <int Count, bool Trans>
inline void ldmatrix(unsigned* r, const void* row, const char* what, const char* file, int line) {
    ldmatrix_lane mine{row, r};
    warp_collective(&mine, &ldmatrix_execute<Count, Trans>, what, file, line);
}

}  // namespace cupyconv_cpu
