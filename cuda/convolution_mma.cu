// conv2d and both gradients on tensor cores: implicit GEMMs on mma.sync
// (sm_80 and later).  Per group g (Cig = C_in/groups, Cog = C_out/groups):
//
//   kernel                       rows of C          cols   reduction k
//   convolution_forward_mma      output pixels      Cog    taps (i, j, c_in)
//   convolution_input_grad_mma   input pixels       Cig    taps (i, j, c_out)
//   convolution_weight_grad_mma  taps (i, j, c_in)  Cog    output pixels
//
//   forward:     A[(n, oy, ox), (i, j, c)] = x[n, oy*sh - top + i*dh, ox*sw - left + j*dw, g*Cig + c]
//                B[(i, j, c), co] = w[i, j, c, g*Cog + co];  y = A B + bias
//   input grad:  A[(n, iy, ix), (i, j, co)] = grad_out[n, oy, ox, g*Cog + co] for the (oy, ox)
//                with oy*sh - top + i*dh = iy, ox*sw - left + j*dw = ix (zero if none)
//                B[(i, j, co), c] = w[i, j, c, g*Cog + co]
//   weight grad: A[(i, j, c), (n, oy, ox)] = x[n, oy*sh - top + i*dh, ox*sw - left + j*dw, g*Cig + c]
//                B[(n, oy, ox), co] = grad_out[n, oy, ox, g*Cog + co]
//
// (zero wherever x is read in the padding).  Products are formed by the
// tensor cores from operands of the element type T:
//   float, Split3 = false: TF32 (operands rounded by cvt.rna), m16n8k8;
//   float, Split3 = true:  3xTF32, each operand v = big + small, both TF32,
//                          a*b ~ big_a*big_b + big_a*small_b + small_a*big_b;
//   __half, __nv_bfloat16: m16n8k16, exact products;
// all summed in float32, the bias added and the sum converted to T once.
//
// A block computes a BM x BN tile of C (row tile fastest in the 1-D grid,
// then column tile, group and reduction split) with WARPS_M x WARPS_N warps
// of (BM/WARPS_M) x (BN/WARPS_N).  The reduction runs through shared memory
// in stages of 64 bytes of k per row (16 floats or 32 16-bit values), kStages
// of them in flight: cp.async fills stage s + 2 while the warps multiply
// stage s.  Each row of a stage is four 16-byte chunks stored at chunk
// c ^ ((row / 2) % 4) (an XOR swizzle), so that the eight rows an ldmatrix
// phase reads hit eight distinct 16-byte bank groups.  Both operands are
// stored [row][k]: ldmatrix without .trans gives the A and B fragments.
//
// Operands are loaded (E = 16 bytes of elements) by
//   ChunkLoader:    16-byte cp.async chunks, where E consecutive k of a row
//                   are contiguous and aligned in memory (the packed weights;
//                   forward and input-gradient activations in channels-last
//                   layout with a multiple of E channels per group);
//   RowChunkLoader: 16-byte loads through registers, where E consecutive
//                   rows at one k are (the weight gradient's x and grad_out
//                   in channels-last layout with a multiple of E channels
//                   per group: rows are channels, k is the pixel);
//   ElementLoader:  element by element through registers (any layout,
//                   stride or view).
// The host packs w per call as [group][cols][Kp], k contiguous and zero
// beyond K up to a whole stage.
//
// With splits > 1 each split reduces a fixed range of k and writes its
// float32 partial tile to `partial` [splits][groups][rows][cols];
// convolution_split_sum_mma adds the splits in order.  No atomics: results are
// reproducible bit for bit.
#include "cupyconv_mma.cuh"

namespace cupyconv::convolution {
namespace tensor_core {

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

// The geometry is the same leading parameters of every GEMM kernel.
#define CONVOLUTION_MMA_GEOMETRY_PARAMS                                                    \
    index_t batch, index_t height, index_t width, index_t out_height, index_t out_width,  \
        int kernel_h, int kernel_w, int cin_g, int cout_g, int groups, int stride_h,      \
        int stride_w, int pad_top, int pad_left, int dilation_h, int dilation_w
#define CONVOLUTION_MMA_GEOMETRY                                                           \
    tensor_core::Geometry {                                                            \
        batch, height, width, out_height, out_width, kernel_h, kernel_w, cin_g, cout_g,    \
            groups, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w          \
    }

struct Strides { index_t n, h, w, c; };

__device__ __forceinline__ bool below(index_t v, index_t size) {
    return (unsigned long long)v < (unsigned long long)size;
}

// Reduction index over taps (i, j, c), c fastest, c < channels.
struct Tap {
    int i, j, c;
};
struct TapWalk {
    int kernel_w, channels;
    __device__ Tap locate(index_t k) const {
        const int ij = (int)k / channels;
        return Tap{ij / kernel_w, ij % kernel_w, (int)k - ij * channels};
    }
    __device__ void advance(Tap& t) const {
        if (++t.c == channels) {
            t.c = 0;
            if (++t.j == kernel_w) {
                t.j = 0;
                ++t.i;
            }
        }
    }
};

// Reduction index over output pixels (n, oy, ox), ox fastest; `offset` is
// the pixel's window corner in x (weight gradient A) or the pixel in
// grad_out (weight gradient B), kept up to date by advance.
struct Pixel {
    index_t n, oy, ox, offset;
};
struct PixelWalk {
    index_t out_height, out_width;
    index_t sn, sh, sw;  // per unit of n, oy, ox
    __device__ Pixel place(index_t n, index_t oy, index_t ox) const {
        return Pixel{n, oy, ox, n * sn + oy * sh + ox * sw};
    }
    __device__ Pixel locate(index_t k) const {
        const index_t ny = k / out_width, ox = k - ny * out_width;
        const index_t n = ny / out_height;
        return place(n, ny - n * out_height, ox);
    }
    __device__ void advance(Pixel& p) const {
        if (++p.ox == out_width) {
            p.ox = 0;
            if (++p.oy == out_height) {
                p.oy = 0;
                ++p.n;
            }
        }
        p.offset = p.n * sn + p.oy * sh + p.ox * sw;
    }
};

// ---- operands ----------------------------------------------------------------
// Each maps (row, k) of its matrix to an element offset, or -1 where the
// element is zero: row(r) precomputes what depends on the row, walk
// steps through k, offset() combines the two.

// Forward A: output pixel, tap (i, j, c_in).
struct ForwardInput {
    Geometry g;
    Strides s;
    TapWalk walk;
    struct Row { index_t y0, x0, offset; bool valid; };
    typedef Tap Position;
    __device__ Row row(index_t p, index_t rows) const {
        if (p >= rows) return Row{0, 0, 0, false};
        const index_t ny = p / g.out_width, ox = p - ny * g.out_width;
        const index_t n = ny / g.out_height, oy = ny - n * g.out_height;
        const index_t y0 = oy * g.stride_h - g.pad_top, x0 = ox * g.stride_w - g.pad_left;
        return Row{y0, x0, n * s.n + y0 * s.h + x0 * s.w, true};
    }
    __device__ index_t offset(const Row& r, const Tap& t) const {
        const index_t dy = (index_t)t.i * g.dilation_h, dx = (index_t)t.j * g.dilation_w;
        const bool inside = r.valid && below(r.y0 + dy, g.height) && below(r.x0 + dx, g.width);
        return inside ? r.offset + dy * s.h + dx * s.w + t.c * s.c : -1;
    }
};

// Input-gradient A: input pixel, tap (i, j, c_out) -> grad_out at the output
// pixel whose window puts tap (i, j) on it.
struct InputGradOutput {
    Geometry g;
    Strides s;
    TapWalk walk;
    struct Row { index_t n, y, x; bool valid; };  // y, x: in the padded input
    typedef Tap Position;
    __device__ Row row(index_t p, index_t rows) const {
        if (p >= rows) return Row{0, 0, 0, false};
        const index_t ny = p / g.width, x = p - ny * g.width;
        const index_t n = ny / g.height, y = ny - n * g.height;
        return Row{n, y + g.pad_top, x + g.pad_left, true};
    }
    // The output position o with o * stride + shift == y, if in [0, size).
    __device__ static bool reaching(index_t y, index_t shift, int stride, index_t size,
                                    index_t& o) {
        const index_t d = y - shift;
        o = stride == 1 ? d : d / stride;
        return d >= 0 && o * stride == d && o < size;
    }
    __device__ index_t offset(const Row& r, const Tap& t) const {
        index_t oy, ox;
        const bool hit = r.valid &&
                         reaching(r.y, (index_t)t.i * g.dilation_h, g.stride_h, g.out_height, oy) &&
                         reaching(r.x, (index_t)t.j * g.dilation_w, g.stride_w, g.out_width, ox);
        return hit ? r.n * s.n + oy * s.h + ox * s.w + t.c * s.c : -1;
    }
};

// Weight-gradient A: tap (i, j, c_in), output pixel -> x.
struct WeightGradInput {
    Geometry g;
    Strides s;
    PixelWalk walk;  // offsets of the window corners (oy*sh, ox*sw) in x
    struct Row { index_t dy, dx, offset; bool valid; };
    typedef Pixel Position;
    __device__ Row row(index_t t, index_t rows) const {
        if (t >= rows) return Row{0, 0, 0, false};
        const int ij = (int)t / g.cin_g, c = (int)t - ij * g.cin_g;
        const index_t dy = (index_t)(ij / g.kernel_w) * g.dilation_h - g.pad_top;
        const index_t dx = (index_t)(ij % g.kernel_w) * g.dilation_w - g.pad_left;
        return Row{dy, dx, dy * s.h + dx * s.w + c * s.c, true};
    }
    __device__ index_t offset(const Row& r, const Pixel& p) const {
        const bool inside = r.valid && below(p.oy * g.stride_h + r.dy, g.height) &&
                            below(p.ox * g.stride_w + r.dx, g.width);
        return inside ? p.offset + r.offset : -1;
    }
};

// Weight-gradient B: output channel, output pixel -> grad_out.
struct WeightGradOutput {
    index_t sc;
    PixelWalk walk;  // offsets of the pixels in grad_out
    struct Row { index_t offset; bool valid; };
    typedef Pixel Position;
    __device__ Row row(index_t co, index_t rows) const { return Row{co * sc, co < rows}; }
    __device__ index_t offset(const Row& r, const Pixel& p) const {
        return r.valid ? p.offset + r.offset : -1;
    }
};

// B of forward and input gradient: rows of the packed weights, k contiguous.
struct PackedWeights {
    index_t k_padded;
    struct Walk {
        __device__ index_t locate(index_t k) const { return k; }
        __device__ void advance(index_t& k) const { ++k; }
    } walk;
    struct Row { index_t offset; bool valid; };
    typedef index_t Position;
    __device__ Row row(index_t r, index_t rows) const { return Row{r * k_padded, r < rows}; }
    __device__ index_t offset(const Row& r, index_t k) const { return r.valid ? r.offset + k : -1; }
};

// ---- loaders: rows [row0, row0 + Rows) x one stage of k -> shared memory ---

// 16-byte cp.async chunks: each thread has a fixed chunk column and
// Rows * kStageChunks / Threads rows.  Needs E consecutive k of a row to be
// E contiguous, 16-byte aligned elements (one tap's channels, one packed row).
template <typename T, int Rows, int Threads, class Operand>
struct ChunkLoader {
    static constexpr int kE = kChunkElems<T>;
    static constexpr int kPerThread = Rows * kStageChunks / Threads;
    static_assert(kPerThread >= 1, "every thread loads a chunk");
    const T* base;
    Operand op;
    index_t depth;  // k beyond it is zero
    typename Operand::Row rows[kPerThread];

    __device__ ChunkLoader(const T* base_, const Operand& op_, index_t row0, index_t row_count,
                           index_t depth_)
        : base(base_), op(op_), depth(depth_) {
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) rows[r] = op.row(row0 + tile_row(r), row_count);
    }
    __device__ static int tile_row(int r) {
        return (int)threadIdx.x / kStageChunks + r * (Threads / kStageChunks);
    }
    __device__ void load(T* tile, index_t k0) const {
        const int col = threadIdx.x % kStageChunks;
        const index_t k = k0 + col * kE;
        const typename Operand::Position at = op.walk.locate(min(k, depth - 1));
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) {
            const index_t offset = k < depth ? op.offset(rows[r], at) : -1;
            cupyconv::mma::cp_async<16>(tile + swizzled(tile_row(r), col) * kE,
                                        offset >= 0 ? base + offset : base, offset >= 0 ? 16 : 0);
        }
    }
};

// Element by element: thread t takes row t % Rows and half the stage's k,
// consecutive threads consecutive rows.
template <typename T, int Rows, int Threads, class Operand>
struct ElementLoader {
    static constexpr int kE = kChunkElems<T>;
    static constexpr int kHalf = kStageDepth<T> / 2;
    static_assert(Threads == 2 * Rows, "the element loader gives each row two threads");
    const T* base;
    Operand op;
    index_t depth;
    typename Operand::Row row;

    __device__ ElementLoader(const T* base_, const Operand& op_, index_t row0, index_t row_count,
                             index_t depth_)
        : base(base_), op(op_), depth(depth_),
          row(op.row(row0 + (int)threadIdx.x % Rows, row_count)) {}
    __device__ void load(T* tile, index_t k0) const {
        const int tile_row = threadIdx.x % Rows, half = threadIdx.x / Rows;
        index_t k = k0 + half * kHalf;
        typename Operand::Position at = op.walk.locate(min(k, depth - 1));
        for (int e = 0; e < kHalf; ++e, ++k) {
            const index_t offset = k < depth ? op.offset(row, at) : -1;
            const int col = half * kHalf + e;
            tile[swizzled(tile_row, col / kE) * kE + col % kE] =
                offset >= 0 ? base[offset] : T(0.0f);
            if (k + 1 < depth) op.walk.advance(at);
        }
    }
};

// 16-byte chunks along the rows, through registers: where rows r .. r + kE - 1
// (r a multiple of kE) at one k are kE contiguous, 16-byte aligned elements
// (one pixel's channels in the weight gradient's operands; the kE rows then
// share a tap (i, j), so one offset decides the whole chunk).  Each chunk is
// stored down column k of the tile.  A warp loads 16 consecutive k, two
// consecutive chunks of each from consecutive lanes (32 bytes of a pixel);
// the odd lane writes its rows in the order 1 0 3 2 ..., so that the two
// lanes of a k write rows of opposite parity: with the swizzle the 32 lanes
// of each store hit 32 distinct banks (or, for 16-bit elements, k and k + 1
// share a word: no conflict either).  Each thread has one k and kPerThread
// chunks of rows.
template <typename T, int Rows, int Threads, class Operand>
struct RowChunkLoader {
    static constexpr int kE = kChunkElems<T>;
    static constexpr int kLanesPerK = 2;
    static constexpr int kWarpDepth = 32 / kLanesPerK;                 // k of one warp
    static constexpr int kDepthWarps = kStageDepth<T> / kWarpDepth;    // warps across the k
    static constexpr int kChunkStep = kLanesPerK * (Threads / 32) / kDepthWarps;
    static constexpr int kPerThread = Rows / kE / kChunkStep;
    static_assert(kStageDepth<T> % kWarpDepth == 0 && (Threads / 32) % kDepthWarps == 0,
                  "whole warps cover the stage's k");
    static_assert(kPerThread >= 1 && kPerThread * kChunkStep * kE == Rows,
                  "the threads cover every chunk of rows once");
    const T* base;
    Operand op;
    index_t depth;  // k beyond it is zero
    typename Operand::Row rows[kPerThread];  // the first row of each chunk

    __device__ RowChunkLoader(const T* base_, const Operand& op_, index_t row0,
                              index_t row_count, index_t depth_)
        : base(base_), op(op_), depth(depth_) {
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) rows[r] = op.row(row0 + tile_row(r), row_count);
    }
    // The first tile row of the thread's chunk r.
    __device__ static int tile_row(int r) {
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
        return (lane % kLanesPerK + kLanesPerK * (warp / kDepthWarps) + r * kChunkStep) * kE;
    }
    __device__ void load(T* tile, index_t k0) const {
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
        const int col = warp % kDepthWarps * kWarpDepth + lane / kLanesPerK;
        const bool odd = lane % kLanesPerK != 0;
        const index_t k = k0 + col;
        const typename Operand::Position at = op.walk.locate(min(k, depth - 1));
        T* column = tile + col % kE;
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) {
            const index_t offset = k < depth ? op.offset(rows[r], at) : -1;
            const uint4 words = offset >= 0 ? cupyconv::mma::load_16_bytes(base + offset)
                                            : make_uint4(0, 0, 0, 0);
            T v[kE];
            memcpy(v, &words, sizeof(words));
#pragma unroll
            for (int e = 0; e < kE; ++e) {
                const int row = tile_row(r) + (odd ? e ^ 1 : e);
                column[swizzled(row, col / kE) * kE] = odd ? v[e ^ 1] : v[e];
            }
        }
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

struct HalfProduct {
    static constexpr int kDepth = 16;
    __device__ static void a(unsigned (&)[4], unsigned (&)[4]) {}
    __device__ static void b(unsigned (&)[2], unsigned (&)[2]) {}
};

template <>
struct Product<__half, false> : HalfProduct {
    __device__ static void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&)[4],
                               const unsigned (&b)[2], const unsigned (&)[2]) {
        cupyconv::mma::mma_f16(d, a, b, d);
    }
};

template <>
struct Product<__nv_bfloat16, false> : HalfProduct {
    __device__ static void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&)[4],
                               const unsigned (&b)[2], const unsigned (&)[2]) {
        cupyconv::mma::mma_bf16(d, a, b, d);
    }
};

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
    // Shared memory of one stage: the A tile, then the B tile.
    static constexpr int kStageBytes = (kRows + kCols) * kStageChunks * kChunkBytes;
    static_assert(kNTiles % 2 == 0, "B fragments are loaded two n-tiles at a time");
};


// ---- the product -------------------------------------------------------------

// acc = A[tile rows, k] B[k, tile cols] over reduction tiles [tile_begin,
// tile_begin + tile_count) of kStageDepth each.
template <typename T, bool Split3, int Config, class LoadA, class LoadB>
__device__ __forceinline__ void multiply(
    const LoadA& load_a, const LoadB& load_b, index_t tile_begin, int tile_count,
    unsigned char* smem,
    float (&acc)[Shape<Config>::kMTiles][Shape<Config>::kNTiles][4]) {
    typedef Shape<Config> S;
    typedef Product<T, Split3> P;
    static_assert(P::kDepth * sizeof(T) == 2 * kChunkBytes,
                  "one mma step reads two 16-byte chunks of k per row");
    constexpr int kE = kChunkElems<T>;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warp_m = warp % S::kWarpsM, warp_n = warp / S::kWarpsM;
    auto a_tile = [&](int stage) {
        return reinterpret_cast<T*>(smem + stage * S::kStageBytes);
    };
    auto b_tile = [&](int stage) {
        return reinterpret_cast<T*>(smem + stage * S::kStageBytes +
                                    S::kRows * kStageChunks * kChunkBytes);
    };
    auto load = [&](int stage, int tile) {
        const index_t k0 = (tile_begin + tile) * kStageDepth<T>;
        load_a.load(a_tile(stage), k0);
        load_b.load(b_tile(stage), k0);
    };
#pragma unroll
    for (int i = 0; i < S::kMTiles; ++i)
#pragma unroll
        for (int j = 0; j < S::kNTiles; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // kStages - 1 tiles in flight before the first product.
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < tile_count) load(s, s);
        cupyconv::mma::cp_async_commit();
    }
    for (int kt = 0; kt < tile_count; ++kt) {
        // Tile kt has landed (kStages - 2 newer groups may still fly) and
        // every warp is done with the stage the next load overwrites.
        cupyconv::mma::cp_async_wait<kStages - 2>();
        __syncthreads();
        const int next = kt + kStages - 1;
        if (next < tile_count) load(next % kStages, next);
        cupyconv::mma::cp_async_commit();

        const T* as = a_tile(kt % kStages);
        const T* bs = b_tile(kt % kStages);
#pragma unroll
        for (int step = 0; step < kStageChunks / 2; ++step) {
            unsigned a[S::kMTiles][4], a_small[S::kMTiles][4];
            unsigned b[S::kNTiles][2], b_small[S::kNTiles][2];
#pragma unroll
            for (int i = 0; i < S::kMTiles; ++i) {
                const int row = warp_m * S::kWarpRows + i * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
                cupyconv::mma::ldmatrix<4, false>(
                    a[i], as + swizzled(row, 2 * step + (lane >> 4)) * kE);
                P::a(a[i], a_small[i]);
            }
#pragma unroll
            for (int j = 0; j < S::kNTiles; j += 2) {
                const int row = warp_n * S::kWarpCols + j * 8 + (lane & 7) + 8 * (lane >> 4);
                unsigned r[4];
                cupyconv::mma::ldmatrix<4, false>(
                    r, bs + swizzled(row, 2 * step + ((lane >> 3) & 1)) * kE);
                b[j][0] = r[0], b[j][1] = r[1], b[j + 1][0] = r[2], b[j + 1][1] = r[3];
                P::b(b[j], b_small[j]);
                P::b(b[j + 1], b_small[j + 1]);
            }
#pragma unroll
            for (int i = 0; i < S::kMTiles; ++i)
#pragma unroll
                for (int j = 0; j < S::kNTiles; ++j)
                    P::mma(acc[i][j], a[i], a_small[i], b[j], b_small[j]);
        }
    }
    cupyconv::mma::cp_async_wait<0>();  // nothing may land after the block ends
}

// Which tile of C (and of which group and reduction split) this block owns.
struct BlockTile {
    index_t row0;
    int col0, group, split;
    template <int Config>
    __device__ static BlockTile of(index_t rows, int cols, int groups) {
        const index_t row_tiles = (rows + Shape<Config>::kRows - 1) / Shape<Config>::kRows;
        const int col_tiles = (cols + Shape<Config>::kCols - 1) / Shape<Config>::kCols;
        index_t b = blockIdx.x;  // row tile fastest: neighbours share B
        BlockTile t;
        t.row0 = b % row_tiles * Shape<Config>::kRows;
        b /= row_tiles;
        t.col0 = (int)(b % col_tiles) * Shape<Config>::kCols;
        b /= col_tiles;
        t.group = (int)(b % groups);
        t.split = (int)(b / groups);
        return t;
    }
    // The split's reduction tiles, out of k_tiles.
    __device__ void range(index_t k_tiles, int split_tiles, index_t& begin, int& count) const {
        begin = (index_t)split * split_tiles;
        count = (int)max((index_t)0, min(k_tiles, begin + split_tiles) - begin);
    }
};

// Where row r of C goes: r = (outer * mid + middle) * inner + innermost,
// at outer * s_outer + middle * s_mid + innermost * s_inner (pixels (n, y, x)
// of an activation, taps (i, j, c) of a weight).
struct RowMap {
    index_t mid, inner, s_outer, s_mid, s_inner;
    __device__ index_t offset(index_t r) const {
        const index_t q = r / inner, c = r - q * inner;
        const index_t o = q / mid, m = q - o * mid;
        return o * s_outer + m * s_mid + c * s_inner;
    }
};

// C's tile (+ bias[col]) into out (the group's column 0) through `rows` and
// col_stride, or with splits > 1 into the split's float32 partial tile.
template <typename T, int Config>
__device__ __forceinline__ void store(
    const float (&acc)[Shape<Config>::kMTiles][Shape<Config>::kNTiles][4], const BlockTile& tile,
    index_t row_count, int cols, int groups, int splits, T* out, const RowMap& rows,
    index_t col_stride, const T* bias, index_t bias_stride, bool has_bias, float* partial) {
    typedef Shape<Config> S;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warp_m = warp % S::kWarpsM, warp_n = warp / S::kWarpsM;
    const int gid = lane >> 2, tig = lane & 3;
    // c[e] of mma tile (i, j) is row gid + 8 (e / 2), column 2 tig + e % 2.
#pragma unroll
    for (int i = 0; i < S::kMTiles; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const index_t r = tile.row0 + warp_m * S::kWarpRows + i * 16 + gid + 8 * half;
            if (r >= row_count) continue;
            T* out_row = splits == 1 ? out + rows.offset(r) : nullptr;
            float* part = splits == 1 ? nullptr
                          : partial + (((index_t)tile.split * groups + tile.group) * row_count + r) * cols;
#pragma unroll
            for (int j = 0; j < S::kNTiles; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = tile.col0 + warp_n * S::kWarpCols + j * 8 + 2 * tig + e;
                    if (col >= cols) continue;
                    const float v = acc[i][j][2 * half + e];
                    if (splits == 1) {
                        const float shift = has_bias ? to_acc(bias[col * bias_stride]) : 0.0f;
                        out_row[col * col_stride] = from_acc<T>(v + shift);
                    } else {
                        part[col] = v;
                    }
                }
        }
}

// acc = A B of the forward and the input gradient: A gathered from an
// activation by `op` (rows x taps; 16-byte chunks where `chunks`), B the
// group's rows of the packed weights [groups][cols][k_padded].
template <typename T, bool Split3, int Config, class Operand>
__device__ __forceinline__ void multiply_packed(
    const T* a, const Operand& op, index_t rows, int taps, bool chunks, const T* w_packed,
    int cols, int k_padded, const BlockTile& tile, int split_tiles, unsigned char* smem,
    float (&acc)[Shape<Config>::kMTiles][Shape<Config>::kNTiles][4]) {
    typedef Shape<Config> S;
    index_t tile_begin;
    int tile_count;
    tile.range(k_padded / kStageDepth<T>, split_tiles, tile_begin, tile_count);
    const ChunkLoader<T, S::kCols, S::kThreads, PackedWeights> load_b(
        w_packed + (index_t)tile.group * cols * k_padded, PackedWeights{k_padded}, tile.col0,
        cols, k_padded);
    if (chunks) {
        const ChunkLoader<T, S::kRows, S::kThreads, Operand> load_a(a, op, tile.row0, rows, taps);
        multiply<T, Split3, Config>(load_a, load_b, tile_begin, tile_count, smem, acc);
    } else {
        const ElementLoader<T, S::kRows, S::kThreads, Operand> load_a(a, op, tile.row0, rows,
                                                                      taps);
        multiply<T, Split3, Config>(load_a, load_b, tile_begin, tile_count, smem, acc);
    }
}

// use(loader) with the RowChunkLoader of `op` where `vector`, otherwise with
// its ElementLoader: the weight gradient's loaders of x and grad_out.
template <typename T, int Rows, int Threads, class Operand, class Use>
__device__ __forceinline__ void with_pixel_loader(bool vector, const T* base, const Operand& op,
                                                  index_t row0, index_t row_count,
                                                  index_t pixels, const Use& use) {
    if (vector)
        use(RowChunkLoader<T, Rows, Threads, Operand>(base, op, row0, row_count, pixels));
    else
        use(ElementLoader<T, Rows, Threads, Operand>(base, op, row0, row_count, pixels));
}

}  // namespace tensor_core

// See the file's header.  Every kernel: T arrays; strides in elements in
// semantic order, (n, h, w, c) for activations and (i, j, c_in, c_out) for
// weights; partial (splits > 1) float32 [splits][groups][rows][cols];
// launch with Shape<Config>::kThreads threads and kStages * kStageBytes
// bytes of dynamic shared memory.  The 16-byte loaders read A where vector_a
// (and the weight gradient's B where vector_b).

// y = conv2d(x, w) + bias.  w_packed: [groups][Cog][k_padded], k = (i, j, c_in).
template <typename T, bool Split3, int Config>
__global__ void __launch_bounds__(tensor_core::Shape<Config>::kThreads, 1)
convolution_forward_mma(
    const T* __restrict__ x, const T* __restrict__ w_packed, const T* __restrict__ bias,
    T* __restrict__ y, float* __restrict__ partial, CONVOLUTION_MMA_GEOMETRY_PARAMS,
    index_t x_sn, index_t x_sh, index_t x_sw, index_t x_sc,
    index_t y_sn, index_t y_sh, index_t y_sw, index_t y_sc,
    index_t bias_stride, int has_bias, int k_padded, int splits, int split_tiles,
    int vector_a) {
    using namespace tensor_core;
    typedef Shape<Config> S;
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    const Geometry g = CONVOLUTION_MMA_GEOMETRY;
    const index_t pixels = batch * out_height * out_width;
    const int taps = kernel_h * kernel_w * cin_g;
    const BlockTile tile = BlockTile::of<Config>(pixels, cout_g, groups);
    const ForwardInput input{g, Strides{x_sn, x_sh, x_sw, x_sc}, TapWalk{kernel_w, cin_g}};
    float acc[S::kMTiles][S::kNTiles][4];
    multiply_packed<T, Split3, Config>(x + (index_t)tile.group * cin_g * x_sc, input, pixels,
                                       taps, vector_a != 0, w_packed, cout_g, k_padded, tile,
                                       split_tiles, shared_bytes, acc);
    store<T, Config>(acc, tile, pixels, cout_g, groups, splits,
                     y + (index_t)tile.group * cout_g * y_sc,
                     RowMap{out_height, out_width, y_sn, y_sh, y_sw}, y_sc,
                     bias + (index_t)tile.group * cout_g * bias_stride, bias_stride,
                     has_bias != 0, partial);
}

// grad_x = d sum(conv2d(x, w) * grad_out) / dx.  w_packed: [groups][Cig][k_padded],
// k = (i, j, c_out).  Every input pixel is written (zero where no window reads it).
template <typename T, bool Split3, int Config>
__global__ void __launch_bounds__(tensor_core::Shape<Config>::kThreads, 1)
convolution_input_grad_mma(
    const T* __restrict__ grad_out, const T* __restrict__ w_packed, T* __restrict__ grad_x,
    float* __restrict__ partial, CONVOLUTION_MMA_GEOMETRY_PARAMS,
    index_t go_sn, index_t go_sh, index_t go_sw, index_t go_sc,
    index_t gx_sn, index_t gx_sh, index_t gx_sw, index_t gx_sc,
    int k_padded, int splits, int split_tiles, int vector_a) {
    using namespace tensor_core;
    typedef Shape<Config> S;
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    const Geometry g = CONVOLUTION_MMA_GEOMETRY;
    const index_t pixels = batch * height * width;
    const int taps = kernel_h * kernel_w * cout_g;
    const BlockTile tile = BlockTile::of<Config>(pixels, cin_g, groups);
    const InputGradOutput grads{g, Strides{go_sn, go_sh, go_sw, go_sc},
                                TapWalk{kernel_w, cout_g}};
    float acc[S::kMTiles][S::kNTiles][4];
    multiply_packed<T, Split3, Config>(grad_out + (index_t)tile.group * cout_g * go_sc, grads,
                                       pixels, taps, vector_a != 0, w_packed, cin_g, k_padded,
                                       tile, split_tiles, shared_bytes, acc);
    store<T, Config>(acc, tile, pixels, cin_g, groups, splits,
                     grad_x + (index_t)tile.group * cin_g * gx_sc,
                     RowMap{height, width, gx_sn, gx_sh, gx_sw}, gx_sc, grad_x, 0, false,
                     partial);
}

// grad_w = d sum(conv2d(x, w) * grad_out) / dw, rows (i, j, c_in), columns
// c_out, reduced over the N*OH*OW output pixels in stages of kStageDepth.
template <typename T, bool Split3, int Config>
__global__ void __launch_bounds__(tensor_core::Shape<Config>::kThreads, 1)
convolution_weight_grad_mma(
    const T* __restrict__ x, const T* __restrict__ grad_out, T* __restrict__ grad_w,
    float* __restrict__ partial, CONVOLUTION_MMA_GEOMETRY_PARAMS,
    index_t x_sn, index_t x_sh, index_t x_sw, index_t x_sc,
    index_t go_sn, index_t go_sh, index_t go_sw, index_t go_sc,
    index_t w_si, index_t w_sj, index_t w_scin, index_t w_scout, int splits,
    int split_tiles, int vector_a, int vector_b) {
    using namespace tensor_core;
    typedef Shape<Config> S;
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    const Geometry g = CONVOLUTION_MMA_GEOMETRY;
    const index_t pixels = batch * out_height * out_width;
    const int taps = kernel_h * kernel_w * cin_g;
    const BlockTile tile = BlockTile::of<Config>(taps, cout_g, groups);
    index_t tile_begin;
    int tile_count;
    tile.range((pixels + kStageDepth<T> - 1) / kStageDepth<T>, split_tiles, tile_begin,
               tile_count);

    const WeightGradInput input{
        g, Strides{x_sn, x_sh, x_sw, x_sc},
        PixelWalk{out_height, out_width, x_sn, stride_h * x_sh, stride_w * x_sw}};
    const WeightGradOutput grads{go_sc, PixelWalk{out_height, out_width, go_sn, go_sh, go_sw}};
    float acc[S::kMTiles][S::kNTiles][4];
    with_pixel_loader<T, S::kRows, S::kThreads>(
        vector_a != 0, x + (index_t)tile.group * cin_g * x_sc, input, tile.row0, taps, pixels,
        [&](const auto& load_a) {
            with_pixel_loader<T, S::kCols, S::kThreads>(
                vector_b != 0, grad_out + (index_t)tile.group * cout_g * go_sc, grads, tile.col0,
                cout_g, pixels, [&](const auto& load_b) {
                    multiply<T, Split3, Config>(load_a, load_b, tile_begin, tile_count,
                                                shared_bytes, acc);
                });
        });
    store<T, Config>(acc, tile, taps, cout_g, groups, splits,
                     grad_w + (index_t)tile.group * cout_g * w_scout,
                     RowMap{kernel_w, cin_g, w_si, w_sj, w_scin}, w_scout, grad_w, 0, false,
                     partial);
}

// out[row, g*cols + col] = bias + sum over s = 0 .. splits-1, in this order,
// of partial[s, g, row, col], rows placed by RowMap (mid, inner, s_outer,
// s_mid, s_inner) and columns by col_stride.
template <typename T>
__global__ void convolution_split_sum_mma(
    const float* __restrict__ partial, const T* __restrict__ bias, T* __restrict__ out,
    index_t rows, int cols, int groups, int splits, index_t mid, index_t inner,
    index_t s_outer, index_t s_mid, index_t s_inner, index_t col_stride, index_t bias_stride,
    int has_bias) {
    using namespace tensor_core;
    const RowMap map{mid, inner, s_outer, s_mid, s_inner};
    const index_t count = (index_t)groups * rows * cols;
    for (index_t e = cupyconv::global_thread_id(); e < count; e += cupyconv::grid_stride()) {
        float sum = partial[e];
        for (int s = 1; s < splits; ++s) sum += partial[(index_t)s * count + e];
        const index_t col = e % cols, gr = e / cols;
        const index_t r = gr % rows, channel = gr / rows * cols + col;
        if (has_bias) sum += to_acc(bias[channel * bias_stride]);
        out[map.offset(r) + channel * col_stride] = from_acc<T>(sum);
    }
}

}  // namespace cupyconv::convolution
