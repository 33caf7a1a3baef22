// conv2d on tensor cores: an implicit GEMM on mma.sync (sm_80 and later).
//
//   y[n, oy, ox, g*Cog + co] = bias[g*Cog + co] + sum over k = (i, j, c) of
//       A[(n, oy, ox), k] * B[k, co],
//   A[(n, oy, ox), (i, j, c)] = x[n, oy*sh - top + i*dh, ox*sw - left + j*dw, g*Cig + c]
//                               (zero in the padding),
//   B[(i, j, c), co]         = w[i, j, c, g*Cog + co],
//
// per group g, k running over K = kh*kw*Cig taps with c fastest.  Products
// are formed by the tensor cores from operands in the element type T:
//   float, Split3 = false: TF32 (operands rounded by cvt.rna), m16n8k8;
//   float, Split3 = true:  3xTF32, each operand v = big + small, both TF32,
//                          a*b ~ big_a*big_b + big_a*small_b + small_a*big_b;
//   __half, __nv_bfloat16: m16n8k16, exact products;
// all summed in float32, bias added and the sum converted to T once.
//
// A block computes a BM x BN tile of the product (row tile fastest in the
// 1-D grid, then column tile, group and reduction split), its warps
// WARPS_M x WARPS_N warp tiles of (BM/WARPS_M) x (BN/WARPS_N).  The reduction
// runs through shared memory in stages of 64 bytes of k per row (16 floats or
// 32 16-bit values), kStages of them in flight: cp.async fills stage s + 2
// while the warps multiply stage s.  Each row of a stage is four 16-byte
// chunks stored at chunk c ^ ((row / 2) % 4) (an XOR swizzle), so that the
// eight rows one ldmatrix phase reads hit eight distinct 16-byte bank groups.
//
// B comes packed by the host as [group][Cog][Kp] with k contiguous and Kp a
// multiple of the stage depth (zero beyond K): 16-byte cp.async per chunk.
// A is gathered from x through element strides (n, h, w, c): as 16-byte
// cp.async chunks of channels where channels are contiguous, Cig is a
// multiple of the chunk and x is 16-byte aligned (vector_a), else element
// by element through registers (any layout, stride or view).
//
// With splits > 1 each split reduces a fixed range of k and writes its
// float32 partial tile to `partial`; convolution_forward_mma_reduce adds the
// splits in order.  No atomics: results are reproducible bit for bit.
#include "cupyconv_mma.cuh"

using cupyconv::index_t;

namespace convolution_mma {

constexpr int kChunkBytes = 16;   // one ldmatrix row, one cp.async
constexpr int kStageChunks = 4;   // 16-byte chunks of k per row and stage
constexpr int kStages = 3;        // stages in flight

template <typename T>
constexpr int kChunkElems = kChunkBytes / (int)sizeof(T);
template <typename T>
constexpr int kStageDepth = kStageChunks * kChunkElems<T>;  // k per stage

// Offset, in chunks, of chunk c of row r of an operand tile.
__device__ __forceinline__ int swizzled(int r, int c) {
    return r * kStageChunks + (c ^ ((r >> 1) & 3));
}

struct Geometry {
    index_t batch, height, width, out_height, out_width;
    int kernel_h, kernel_w, cin_g, cout_g, groups;
    int stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
};

// Tap (i, j, c) of reduction index k, c fastest; step() moves it to k + 1.
struct Tap {
    int i, j, c;
    __device__ static Tap of(int k, const Geometry& g) {
        const int ij = k / g.cin_g;
        return Tap{ij / g.kernel_w, ij % g.kernel_w, k - ij * g.cin_g};
    }
    __device__ void step(const Geometry& g) {
        if (++c == g.cin_g) {
            c = 0;
            if (++j == g.kernel_w) {
                j = 0;
                ++i;
            }
        }
    }
};

// The window of output pixel p: its corner in x (may lie in the padding) and
// the offset of that corner, or valid = false past the last pixel.
struct Window {
    index_t y0, x0, offset;
    bool valid;
    __device__ static Window of(index_t p, index_t pixels, const Geometry& g, index_t sn,
                                index_t sh, index_t sw) {
        if (p >= pixels) return Window{0, 0, 0, false};
        const index_t ny = p / g.out_width, ox = p - ny * g.out_width;
        const index_t n = ny / g.out_height, oy = ny - n * g.out_height;
        const index_t y0 = oy * g.stride_h - g.pad_top, x0 = ox * g.stride_w - g.pad_left;
        return Window{y0, x0, n * sn + y0 * sh + x0 * sw, true};
    }
    // Offset of tap t's element in x, or -1 where A is zero.
    __device__ index_t at(const Tap& t, const Geometry& g, index_t sh, index_t sw,
                          index_t sc) const {
        const index_t y = y0 + (index_t)t.i * g.dilation_h, x = x0 + (index_t)t.j * g.dilation_w;
        const bool inside = valid && (unsigned long long)y < (unsigned long long)g.height &&
                            (unsigned long long)x < (unsigned long long)g.width;
        return inside ? offset + (index_t)t.i * g.dilation_h * sh +
                            (index_t)t.j * g.dilation_w * sw + (index_t)t.c * sc
                      : -1;
    }
};

// Operand traits: how raw 32-bit fragment registers become mma operands.
template <typename T, bool Split3>
struct Product;

template <>
struct Product<float, false> {
    static constexpr int kDepth = 8;  // k of one mma
    __device__ static void a(unsigned (&r)[4], unsigned (&)[4]) {
#pragma unroll
        for (int e = 0; e < 4; ++e) r[e] = cupyconv::mma::to_tf32(__uint_as_float(r[e]));
    }
    __device__ static void b(unsigned (&r)[2], unsigned (&)[2]) {
#pragma unroll
        for (int e = 0; e < 2; ++e) r[e] = cupyconv::mma::to_tf32(__uint_as_float(r[e]));
    }
    __device__ static void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&)[4],
                               const unsigned (&b)[2], const unsigned (&)[2]) {
        cupyconv::mma::mma_tf32(d, a, b, d);
    }
};

template <>
struct Product<float, true> {
    static constexpr int kDepth = 8;
    __device__ static void a(unsigned (&r)[4], unsigned (&small)[4]) {
#pragma unroll
        for (int e = 0; e < 4; ++e) cupyconv::mma::split_tf32(__uint_as_float(r[e]), r[e], small[e]);
    }
    __device__ static void b(unsigned (&r)[2], unsigned (&small)[2]) {
#pragma unroll
        for (int e = 0; e < 2; ++e) cupyconv::mma::split_tf32(__uint_as_float(r[e]), r[e], small[e]);
    }
    // The small terms first: they are the smallest, summed before the big one.
    __device__ static void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&a_small)[4],
                               const unsigned (&b)[2], const unsigned (&b_small)[2]) {
        cupyconv::mma::mma_tf32(d, a_small, b, d);
        cupyconv::mma::mma_tf32(d, a, b_small, d);
        cupyconv::mma::mma_tf32(d, a, b, d);
    }
};

template <typename H>
struct HalfProduct {
    static constexpr int kDepth = 16;
    __device__ static void a(unsigned (&)[4], unsigned (&)[4]) {}
    __device__ static void b(unsigned (&)[2], unsigned (&)[2]) {}
};

template <>
struct Product<__half, false> : HalfProduct<__half> {
    __device__ static void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&)[4],
                               const unsigned (&b)[2], const unsigned (&)[2]) {
        cupyconv::mma::mma_f16(d, a, b, d);
    }
};

template <>
struct Product<__nv_bfloat16, false> : HalfProduct<__nv_bfloat16> {
    __device__ static void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&)[4],
                               const unsigned (&b)[2], const unsigned (&)[2]) {
        cupyconv::mma::mma_bf16(d, a, b, d);
    }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) { return (float)v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
    return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) { return (T)v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Block shapes.  Config 0: 128 x 128, 8 warps of 64 x 32; config 1: 64 x 64,
// 4 warps of 32 x 32 (for outputs with few 128 x 128 tiles).
template <int Config>
struct Tile;
template <>
struct Tile<0> {
    static constexpr int kRows = 128, kCols = 128, kWarpsM = 2, kWarpsN = 4;
};
template <>
struct Tile<1> {
    static constexpr int kRows = 64, kCols = 64, kWarpsM = 2, kWarpsN = 2;
};

template <int Config>
struct Shape : Tile<Config> {
    using Tile<Config>::kRows;
    using Tile<Config>::kCols;
    using Tile<Config>::kWarpsM;
    using Tile<Config>::kWarpsN;
    static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
    static constexpr int kWarpRows = kRows / kWarpsM, kWarpCols = kCols / kWarpsN;
    static constexpr int kMTiles = kWarpRows / 16, kNTiles = kWarpCols / 8;
    // Chunks of one operand tile stage, and per thread.
    static constexpr int kAChunks = kRows * kStageChunks / kThreads;
    static constexpr int kBChunks = kCols * kStageChunks / kThreads;
    static constexpr int kStageBytes = (kRows + kCols) * kStageChunks * kChunkBytes;
    static_assert(kNTiles % 2 == 0, "B fragments are loaded two n-tiles at a time");
    static_assert(kThreads == 2 * kRows, "the element loader gives each row two threads");
    static_assert(kAChunks >= 1 && kBChunks >= 1, "every thread loads chunks");
};

}  // namespace convolution_mma

// See the file's header.  x, bias, y in T; w_packed [groups][cout_g][k_padded]
// in T; partial (splits > 1) [splits][groups][pixels][cout_g] float32.
// Strides are in elements, semantic order (n, h, w, c).  Launch with
// Shape<Config>::kThreads threads and kStages * kStageBytes dynamic shared
// memory.
template <typename T, bool Split3, int Config>
__global__ void __launch_bounds__(convolution_mma::Shape<Config>::kThreads, 1)
convolution_forward_mma(
    const T* __restrict__ x, const T* __restrict__ w_packed, const T* __restrict__ bias,
    T* __restrict__ y, float* __restrict__ partial,
    index_t batch, index_t height, index_t width, index_t out_height, index_t out_width,
    int kernel_h, int kernel_w, int cin_g, int cout_g, int groups, int stride_h, int stride_w,
    int pad_top, int pad_left, int dilation_h, int dilation_w,
    index_t x_sn, index_t x_sh, index_t x_sw, index_t x_sc,
    index_t y_sn, index_t y_sh, index_t y_sw, index_t y_sc,
    index_t bias_stride, int has_bias, int k_padded, int splits, int split_tiles,
    int vector_a) {
    using namespace convolution_mma;
    typedef Shape<Config> S;
    typedef Product<T, Split3> P;
    constexpr int kE = kChunkElems<T>;
    constexpr int kDepth = kStageDepth<T>;
    extern __shared__ __align__(16) unsigned char shared_bytes[];

    const Geometry g{batch, height, width, out_height, out_width, kernel_h, kernel_w,
                     cin_g, cout_g, groups, stride_h, stride_w, pad_top, pad_left,
                     dilation_h, dilation_w};
    const index_t pixels = batch * out_height * out_width;
    const int taps = kernel_h * kernel_w * cin_g;

    // This block's tile of the product.
    const index_t row_tiles = (pixels + S::kRows - 1) / S::kRows;
    const int col_tiles = (cout_g + S::kCols - 1) / S::kCols;
    index_t b = blockIdx.x;
    const index_t row0 = b % row_tiles * S::kRows;
    b /= row_tiles;
    const int col0 = (int)(b % col_tiles) * S::kCols;
    b /= col_tiles;
    const int group = (int)(b % groups);
    const int split = (int)(b / groups);
    const int k_tiles = k_padded / kDepth;
    const int tile_begin = split * split_tiles;
    const int tile_count = max(0, min(k_tiles, tile_begin + split_tiles) - tile_begin);

    const T* xg = x + (index_t)group * cin_g * x_sc;
    const T* wg = w_packed + (index_t)group * cout_g * k_padded;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp % S::kWarpsM, warp_n = warp / S::kWarpsM;

    // Loader state.  Chunk loaders: each thread has a fixed chunk column and
    // kAChunks / kBChunks rows.  Element loader: one row, half of the columns.
    const int chunk_col = tid % kStageChunks;
    Window a_rows[S::kAChunks];
    #pragma unroll
    for (int r = 0; r < S::kAChunks; ++r) {
        const int row = tid / kStageChunks + r * (S::kThreads / kStageChunks);
        a_rows[r] = Window::of(row0 + row, pixels, g, x_sn, x_sh, x_sw);
    }
    const int elem_row = tid % S::kRows, elem_half = tid / S::kRows;
    const Window elem_window = Window::of(row0 + elem_row, pixels, g, x_sn, x_sh, x_sw);

    auto a_tile = [&](int stage) {
        return reinterpret_cast<T*>(shared_bytes + stage * S::kStageBytes);
    };
    auto b_tile = [&](int stage) {
        return reinterpret_cast<T*>(shared_bytes + stage * S::kStageBytes +
                                    S::kRows * kStageChunks * kChunkBytes);
    };

    // Stage `stage` <- reduction tile `tile` (k from tile * kDepth).
    auto load = [&](int stage, int tile) {
        const int k0 = tile * kDepth;
        T* as = a_tile(stage);
        if (vector_a) {
            const int k = k0 + chunk_col * kE;  // Cig % kE == 0: one tap per chunk
            const Tap t = Tap::of(min(k, taps - 1), g);
            #pragma unroll
            for (int r = 0; r < S::kAChunks; ++r) {
                const int row = tid / kStageChunks + r * (S::kThreads / kStageChunks);
                const index_t offset = k < taps ? a_rows[r].at(t, g, x_sh, x_sw, x_sc) : -1;
                cupyconv::mma::cp_async<16>(as + swizzled(row, chunk_col) * kE,
                                            offset >= 0 ? xg + offset : xg,
                                            offset >= 0 ? 16 : 0);
            }
        } else {
            constexpr int kHalf = kDepth / 2;
            int k = k0 + elem_half * kHalf;
            Tap t = Tap::of(min(k, taps - 1), g);
            #pragma unroll
            for (int e = 0; e < kHalf; ++e, ++k) {
                const index_t offset = k < taps ? elem_window.at(t, g, x_sh, x_sw, x_sc) : -1;
                const int col = elem_half * kHalf + e;
                as[swizzled(elem_row, col / kE) * kE + col % kE] =
                    offset >= 0 ? xg[offset] : from_float<T>(0.0f);
                if (k + 1 < taps) t.step(g);
            }
        }
        T* bs = b_tile(stage);
        #pragma unroll
        for (int r = 0; r < S::kBChunks; ++r) {
            const int row = tid / kStageChunks + r * (S::kThreads / kStageChunks);
            const bool inside = col0 + row < cout_g;
            cupyconv::mma::cp_async<16>(
                bs + swizzled(row, chunk_col) * kE,
                wg + (inside ? (index_t)(col0 + row) * k_padded + k0 + chunk_col * kE : 0),
                inside ? 16 : 0);
        }
    };

    float acc[S::kMTiles][S::kNTiles][4];
    #pragma unroll
    for (int i = 0; i < S::kMTiles; ++i)
        #pragma unroll
        for (int j = 0; j < S::kNTiles; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // The pipeline: kStages - 1 tiles in flight before the first product.
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < tile_count) load(s, tile_begin + s);
        cupyconv::mma::cp_async_commit();
    }
    for (int kt = 0; kt < tile_count; ++kt) {
        // Tile kt has landed (kStages - 2 newer groups may still fly) and
        // every warp is done with the stage the next load overwrites.
        cupyconv::mma::cp_async_wait<kStages - 2>();
        __syncthreads();
        const int next = kt + kStages - 1;
        if (next < tile_count) load(next % kStages, tile_begin + next);
        cupyconv::mma::cp_async_commit();

        const T* as = a_tile(kt % kStages);
        const T* bs = b_tile(kt % kStages);
        #pragma unroll
        for (int step = 0; step < kStageChunks / 2; ++step) {
            unsigned a[S::kMTiles][4], a_small[S::kMTiles][4];
            unsigned bf[S::kNTiles][2], b_small[S::kNTiles][2];
            #pragma unroll
            for (int i = 0; i < S::kMTiles; ++i) {
                const int row = warp_m * S::kWarpRows + i * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
                cupyconv::mma::ldmatrix<4, false>(a[i], as + swizzled(row, 2 * step + (lane >> 4)) * kE);
                P::a(a[i], a_small[i]);
            }
            #pragma unroll
            for (int j = 0; j < S::kNTiles; j += 2) {
                const int row = warp_n * S::kWarpCols + j * 8 + (lane & 7) + 8 * (lane >> 4);
                unsigned r[4];
                cupyconv::mma::ldmatrix<4, false>(r, bs + swizzled(row, 2 * step + ((lane >> 3) & 1)) * kE);
                bf[j][0] = r[0], bf[j][1] = r[1], bf[j + 1][0] = r[2], bf[j + 1][1] = r[3];
                P::b(bf[j], b_small[j]);
                P::b(bf[j + 1], b_small[j + 1]);
            }
            #pragma unroll
            for (int i = 0; i < S::kMTiles; ++i)
                #pragma unroll
                for (int j = 0; j < S::kNTiles; ++j)
                    P::mma(acc[i][j], a[i], a_small[i], bf[j], b_small[j]);
        }
    }
    cupyconv::mma::cp_async_wait<0>();  // nothing may land after the block ends

    // Epilogue: c[e] of tile (i, j) is row g + 8(e/2), column 2t + e%2.
    const int gid = lane >> 2, tig = lane & 3;
    #pragma unroll
    for (int i = 0; i < S::kMTiles; ++i)
        #pragma unroll
        for (int half = 0; half < 2; ++half) {
            const index_t p = row0 + warp_m * S::kWarpRows + i * 16 + gid + 8 * half;
            if (p >= pixels) continue;
            T* out = nullptr;
            float* part = nullptr;
            if (splits == 1) {
                const index_t ny = p / out_width, ox = p - ny * out_width;
                const index_t n = ny / out_height, oy = ny - n * out_height;
                out = y + n * y_sn + oy * y_sh + ox * y_sw + (index_t)group * cout_g * y_sc;
            } else {
                part = partial + (((index_t)split * groups + group) * pixels + p) * cout_g;
            }
            #pragma unroll
            for (int j = 0; j < S::kNTiles; ++j)
                #pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int co = col0 + warp_n * S::kWarpCols + j * 8 + 2 * tig + e;
                    if (co >= cout_g) continue;
                    const float v = acc[i][j][2 * half + e];
                    if (splits == 1) {
                        const float shift =
                            has_bias ? to_float(bias[((index_t)group * cout_g + co) * bias_stride])
                                     : 0.0f;
                        out[co * y_sc] = from_float<T>(v + shift);
                    } else {
                        part[co] = v;
                    }
                }
        }
}

// y[n, oy, ox, g*Cog + co] = bias + sum over s = 0 .. splits-1, in this
// order, of partial[s, g, (n, oy, ox), co].
template <typename T>
__global__ void convolution_forward_mma_reduce(
    const float* __restrict__ partial, const T* __restrict__ bias, T* __restrict__ y,
    index_t out_height, index_t out_width, index_t pixels, int cout_g, int groups, int splits,
    index_t y_sn, index_t y_sh, index_t y_sw, index_t y_sc, index_t bias_stride, int has_bias) {
    using namespace convolution_mma;
    const index_t count = (index_t)groups * pixels * cout_g;
    for (index_t e = cupyconv::global_thread_id(); e < count; e += cupyconv::grid_stride()) {
        float sum = partial[e];
        for (int s = 1; s < splits; ++s) sum += partial[(index_t)s * count + e];
        const index_t co = e % cout_g, gp = e / cout_g;
        const index_t p = gp % pixels, group = gp / pixels;
        const index_t channel = group * cout_g + co;
        if (has_bias) sum += to_float(bias[channel * bias_stride]);
        const index_t ny = p / out_width, ox = p - ny * out_width;
        const index_t n = ny / out_height, oy = ny - n * out_height;
        y[n * y_sn + oy * y_sh + ox * y_sw + channel * y_sc] = from_float<T>(sum);
    }
}
