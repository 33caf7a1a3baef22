// conv2d and its two gradients as implicit GEMMs.
//
// Each product is a matrix multiplication C[rows, cols] = sum_k A[rows, k] *
// B[k, cols] whose operands are never materialised: the tile loaders gather
// A and B straight from the 4-D tensors and apply padding, stride and
// dilation on the fly (an im2col or padded copy would cost kh*kw times the
// input's memory traffic).  Per group g:
//
//   kernel                          rows               cols     reduction k
//   convolution_forward_igemm       output pixels      C_out/g  taps (i, j, c_in)
//   convolution_input_grad_igemm    input pixels       C_in/g   taps (i, j, c_out)
//   convolution_weight_grad_igemm   taps (i, j, c_in)  C_out/g  output pixels
//
// With 4 input channels per group or fewer, the input gradient is a
// matrix product per group (outside these kernels) and
// convolution_input_grad_gather instead.
//
// Tensors are addressed through element strides given in semantic order,
// (n, h, w, c) for activations and (i, j, c_in, c_out) for weights, so one
// kernel serves NHWC, NCHW and strided views alike.
//
// A block of 256 threads computes a 64 x 64 tile of C; each thread owns a
// 4 x 4 register micro-tile of 4 consecutive rows and 4 consecutive
// columns, which it reads from shared memory as one 16-byte word each.  The
// reduction advances 16 at a time through double-buffered shared memory:
// the next 16-deep slices of A and B are fetched into registers while the
// current ones are multiplied, so one barrier per step suffices.
// The *_igemm128 variants (float only, for outputs with many tiles) compute
// 128 x 128 tiles, 8 x 8 per thread (two runs of 4 rows and of 4 columns),
// and stream 8-deep slices through a ring of 3 shared-memory buffers with
// cp.async: two slices are in flight while one is multiplied.  Row tiles,
// column tiles, groups and (for the weight gradient) reduction splits are
// folded into a 1-D grid, because gridDim.x allows 2**31 - 1 blocks where y
// and z stop at 65535.
//
// The weight gradient reduces over N*OH*OW, usually far longer than its
// output is large, so the reduction is cut into fixed chunks whose partial
// sums go to a workspace; convolution_weight_grad_reduce adds them in a fixed
// order.  No atomics anywhere: results are bitwise reproducible.
#include "cupyconv_common.cuh"
#include "cupyconv_mma.cuh"

// Every kernel and helper of this file lives in cupyconv::convolution.
namespace cupyconv::convolution {

template <typename T>
using Acc = typename cupyconv::accumulator<T>::type;

// Launch with exactly this many threads (cupyconv._kernels.THREADS, which
// every launch uses).  The 64 x 64 kernels declare
// __launch_bounds__(kThreads, 2): two resident blocks per SM cap them at 128
// registers (without the cap they take ~165 and only one block fits; the
// cap spills a few bytes of setup for float, ~100 bytes for double).  The
// 128 x 128 kernels hold 64 accumulators per thread and declare one block
// per SM (at most 255 registers).
constexpr int kThreads = 256;
constexpr int kLanes = 16;              // threads along each side of the C tile
constexpr int kQuadSpan = 4 * kLanes;   // between a thread's runs of 4 rows

// The shape of a block's work.  Slices are depth x tile (reduction index x
// rows) with a row pitch that is a multiple of 4, so that every run of 4
// rows (or columns) starts on 16 bytes: one 16-byte shared load feeds 4 of
// a thread's multiply-adds per run and step, where 4-byte loads made the
// loop wait on shared memory.
template <int Tile, int Depth, int Stages, bool Pipelined>
struct TileShape {
    static constexpr int tile = Tile;      // rows and columns of C per block
    static constexpr int depth = Depth;    // reduction indices per slice
    static constexpr int stages = Stages;  // slices in shared memory
    static constexpr bool pipelined = Pipelined;  // cp.async, else registers
    static constexpr int quads = Tile / kQuadSpan;  // runs of 4 per thread and side
    static constexpr int micro = 4 * quads;         // micro-tile: micro x micro
    static constexpr int per_thread = Tile * Depth / kThreads;  // loads per slice
    static constexpr int load_lanes = Tile / per_thread;        // loaders along rows
    static constexpr int pitch = Tile + 4;
    // The loaders give each thread one reduction index and per_thread rows.
    static_assert(kThreads == load_lanes * Depth && Tile == quads * kQuadSpan,
                  "tile shape and thread count do not match");
};
// 64 x 64, 4 x 4 per thread, 16-deep slices double-buffered through
// registers (any GPU, any type).
typedef TileShape<64, 16, 2, false> Tiling64;
// 128 x 128, 8 x 8 per thread, 8-deep slices in a ring of 3 filled by
// cp.async (25 KiB of float; float only).
typedef TileShape<128, 8, 3, true> Tiling128;

// cp.async of Count consecutive elements (4, 8 or 16 bytes, aligned to
// that) to shared memory, zero-filled where src is nullptr (origin: an
// address the instruction names instead, not read).  Before sm_80 there is
// no cp.async: the elements go through registers at once, so every later
// wait finds its copy done.
template <int Count, typename T>
__device__ __forceinline__ void copy_to_shared(T* dst, const T* src, const T* origin) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    for (int e = 0; e < Count; ++e) dst[e] = src ? src[e] : T(0);
#else
    constexpr int kBytes = Count * (int)sizeof(T);
    cupyconv::mma::cp_async<kBytes>(dst, src ? src : origin, src ? kBytes : 0);
#endif
}

__device__ __forceinline__ void copies_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    cupyconv::mma::cp_async_commit();
#endif
}

template <int Pending>
__device__ __forceinline__ void copies_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    cupyconv::mma::cp_async_wait<Pending>();
#endif
}

struct Geometry {
    index_t batch, height, width;          // input N, H, W
    index_t out_height, out_width;         // OH, OW
    index_t kernel_h, kernel_w;
    index_t cin_g, cout_g, groups;         // channels per group
    index_t stride_h, stride_w;
    index_t pad_top, pad_left;
    index_t dilation_h, dilation_w;
};

// The geometry is the same first 16 parameters of every GEMM kernel; the
// macros keep the three signatures and the Python argument order in step.
#define CONVOLUTION_GEOMETRY_PARAMS                                         \
    index_t batch, index_t height, index_t width, index_t out_height,       \
        index_t out_width, index_t kernel_h, index_t kernel_w,              \
        index_t cin_g, index_t cout_g, index_t groups, index_t stride_h,    \
        index_t stride_w, index_t pad_top, index_t pad_left,                \
        index_t dilation_h, index_t dilation_w
#define CONVOLUTION_GEOMETRY                                                \
    Geometry {                                                              \
        batch, height, width, out_height, out_width, kernel_h, kernel_w,    \
            cin_g, cout_g, groups, stride_h, stride_w, pad_top, pad_left,   \
            dilation_h, dilation_w                                          \
    }

struct TensorStrides { index_t n, h, w, c; };
struct WeightStrides { index_t i, j, cin, cout; };

// Tap (i, j, c) of a flat tap index, channel fastest.
struct Tap { index_t i, j, c; };
__device__ __forceinline__ Tap split_tap(index_t k, index_t kernel_w,
                                         index_t channels) {
    const index_t ij = k / channels;
    return Tap{ij / kernel_w, ij % kernel_w, k - ij * channels};
}

// Pixel (n, y, x) of a flat pixel index, x fastest.
struct Pixel { index_t n, y, x; };
__device__ __forceinline__ Pixel split_pixel(index_t p, index_t height,
                                             index_t width) {
    const index_t ny = p / width;
    return Pixel{ny / height, ny % height, p - ny * width};
}

// The two kinds of reduction index.  A loader splits its first index once
// and then steps it one slice depth at a time with carries: 64-bit divisions per
// element would cost more than the multiply-adds they feed.
struct TapWalk {
    index_t kernel_w, channels;
    typedef Tap Position;
    __device__ Tap locate(index_t k) const {
        return split_tap(k, kernel_w, channels);
    }
    __device__ void advance(Tap& t, int by) const {
        t.c += by;
        while (t.c >= channels) {
            t.c -= channels;
            if (++t.j == kernel_w) {
                t.j = 0;
                ++t.i;
            }
        }
    }
};

struct PixelWalk {
    index_t height, width;
    typedef Pixel Position;
    __device__ Pixel locate(index_t k) const {
        return split_pixel(k, height, width);
    }
    __device__ void advance(Pixel& p, int by) const {
        p.x += by;
        while (p.x >= width) {
            p.x -= width;
            if (++p.y == height) {
                p.y = 0;
                ++p.n;
            }
        }
    }
};

// The output position o that tap offset `shift` puts on padded input
// position y (o * stride + shift == y), and whether there is one in
// [0, size): y may lie between strides or past the last window.
__device__ __forceinline__ bool output_reaching(index_t y, index_t shift, index_t stride,
                                                index_t size, index_t& o) {
    const index_t n = y - shift;
    o = stride == 1 ? n : n / stride;  // a 64-bit division is dozens of instructions
    return n >= 0 && o * stride == n && o < size;
}

// Whether 0 <= v < size, in one unsigned comparison.
__device__ __forceinline__ bool below(index_t v, index_t size) {
    return (unsigned long long)v < (unsigned long long)size;
}

// ---- GEMM operands ----------------------------------------------------------
// Each operand is a virtual matrix [rows x k].  row(r) precomputes what
// depends on the row alone, step(position) what depends on the reduction
// index alone (once per slice: a loader thread has one reduction index and
// a few rows), and source(row, step) finds one element from the two with
// a few additions and comparisons (nullptr where it is padding: zero).
// Doing the 64-bit multiplications per element instead made the loaders
// most of the kernels' instructions.  origin() is an address that a
// zero-filling cp.async may name but does not read.

// Forward A: output pixel p, tap k -> x at the tap's position in p's window.
template <typename T>
struct ForwardInput {
    typedef TapWalk Walk;
    typedef T Element;
    const T* x;  // first channel of the group
    TensorStrides s;
    Geometry g;
    Walk walk;   // over (kernel_h, kernel_w, cin_g)
    // Window corner (may lie in the padding) and its offset in x.
    struct Row { index_t y0, x0, offset; };
    // The tap's position relative to the corner, and its offset.
    struct Step { index_t dy, dx, offset; };
    __device__ Row row(index_t p) const {
        const Pixel px = split_pixel(p, g.out_height, g.out_width);
        const index_t y0 = px.y * g.stride_h - g.pad_top;
        const index_t x0 = px.x * g.stride_w - g.pad_left;
        return Row{y0, x0, px.n * s.n + y0 * s.h + x0 * s.w};
    }
    __device__ Step step(const Tap& t) const {
        const index_t dy = t.i * g.dilation_h, dx = t.j * g.dilation_w;
        return Step{dy, dx, dy * s.h + dx * s.w + t.c * s.c};
    }
    __device__ const T* source(const Row& r, const Step& t) const {
        const bool inside = below(r.y0 + t.dy, g.height) && below(r.x0 + t.dx, g.width);
        return inside ? x + (r.offset + t.offset) : nullptr;
    }
    __device__ const T* origin() const { return x; }
};

// Weight-gradient A: tap t, output pixel k -> the same x element as above
// with the roles of row and reduction index swapped.
template <typename T>
struct WeightGradInput {
    typedef PixelWalk Walk;
    typedef T Element;
    const T* x;
    TensorStrides s;
    Geometry g;
    Walk walk;  // over (batch, out_height, out_width)
    // The tap's position relative to a window's corner, and its offset.
    struct Row { index_t dy, dx, offset; };
    // The output pixel's window corner and its offset.
    struct Step { index_t y0, x0, offset; };
    __device__ Row row(index_t t) const {
        const Tap tap = split_tap(t, g.kernel_w, g.cin_g);
        const index_t dy = tap.i * g.dilation_h - g.pad_top;
        const index_t dx = tap.j * g.dilation_w - g.pad_left;
        return Row{dy, dx, dy * s.h + dx * s.w + tap.c * s.c};
    }
    __device__ Step step(const Pixel& p) const {
        const index_t y0 = p.y * g.stride_h, x0 = p.x * g.stride_w;
        return Step{y0, x0, p.n * s.n + y0 * s.h + x0 * s.w};
    }
    __device__ const T* source(const Row& r, const Step& p) const {
        const bool inside = below(p.y0 + r.dy, g.height) && below(p.x0 + r.dx, g.width);
        return inside ? x + (p.offset + r.offset) : nullptr;
    }
    __device__ const T* origin() const { return x; }
};

// Input-gradient A: input pixel p, tap k = (i, j, co) -> grad_out at the
// output pixel whose window puts tap (i, j) on p, zero where no output pixel
// does (p between strides, or beyond the last window).
template <typename T>
struct InputGradOutput {
    typedef TapWalk Walk;
    typedef T Element;
    const T* grad_out;  // first channel of the group
    TensorStrides s;
    Geometry g;
    Walk walk;  // over (kernel_h, kernel_w, cout_g)
    // p's position in the padded input, and (for unit strides) the offset
    // grad_out would have at that output position.
    struct Row { index_t n, y, x, offset; };
    // The tap's shift and channel; for unit strides the whole offset.
    struct Step { index_t dy, dx, c, offset; };
    __device__ Row row(index_t p) const {
        const Pixel px = split_pixel(p, g.height, g.width);
        const index_t y = px.y + g.pad_top, x = px.x + g.pad_left;
        return Row{px.n, y, x, px.n * s.n + y * s.h + x * s.w};
    }
    __device__ Step step(const Tap& t) const {
        const index_t dy = t.i * g.dilation_h, dx = t.j * g.dilation_w;
        return Step{dy, dx, t.c, t.c * s.c - dy * s.h - dx * s.w};
    }
    __device__ const T* source(const Row& r, const Step& t) const {
        if (g.stride_h == 1 && g.stride_w == 1) {  // the same for every thread
            const bool hit = below(r.y - t.dy, g.out_height) && below(r.x - t.dx, g.out_width);
            return hit ? grad_out + (r.offset + t.offset) : nullptr;
        }
        index_t oy, ox;
        const bool hit = output_reaching(r.y, t.dy, g.stride_h, g.out_height, oy) &&
                         output_reaching(r.x, t.dx, g.stride_w, g.out_width, ox);
        return hit ? grad_out + (r.n * s.n + oy * s.h + ox * s.w + t.c * s.c) : nullptr;
    }
    __device__ const T* origin() const { return grad_out; }
};

// B of forward and input gradient: column channel col, tap k = (i, j, r) ->
// w[i, j, r, col] (strides of the r and col axes chosen by the caller: the
// forward reduces over c_in, the input gradient over c_out).
template <typename T>
struct KernelTaps {
    typedef TapWalk Walk;
    typedef T Element;
    const T* w;  // first output channel of the group
    index_t stride_i, stride_j, stride_r, stride_col;
    Walk walk;   // over (kernel_h, kernel_w, extent of r)
    struct Row { index_t offset; };
    struct Step { index_t offset; };
    __device__ Row row(index_t col) const { return Row{col * stride_col}; }
    __device__ Step step(const Tap& t) const {
        return Step{t.i * stride_i + t.j * stride_j + t.c * stride_r};
    }
    __device__ const T* source(const Row& r, const Step& t) const {
        return w + (r.offset + t.offset);
    }
    __device__ const T* origin() const { return w; }
};

// Weight-gradient B: output channel co, output pixel k -> grad_out[k, co].
template <typename T>
struct WeightGradOutput {
    typedef PixelWalk Walk;
    typedef T Element;
    const T* grad_out;  // first channel of the group
    TensorStrides s;
    Walk walk;  // over (batch, out_height, out_width)
    struct Row { index_t offset; };
    struct Step { index_t offset; };
    __device__ Row row(index_t co) const { return Row{co * s.c}; }
    __device__ Step step(const Pixel& p) const {
        return Step{p.n * s.n + p.y * s.h + p.x * s.w};
    }
    __device__ const T* source(const Row& r, const Step& p) const {
        return grad_out + (p.offset + r.offset);
    }
    __device__ const T* origin() const { return grad_out; }
};

// ---- tiled multiplication ---------------------------------------------------

// How a loader's threads share a slice (the kernels' *_order arguments).
// Each thread owns one reduction index and per_thread (4) rows.
enum LoadOrder {
    // Consecutive threads take consecutive reduction indices, rows
    // load_lanes apart (coalesced when k is contiguous: NHWC channels).
    kReductionFastest = 0,
    // Consecutive threads take consecutive rows, each thread's rows
    // load_lanes apart (coalesced when rows are: NCHW pixels).
    kRowsFastest = 1,
    // Each thread takes 4 consecutive rows, consecutive threads the next 4:
    // for an operand whose rows are contiguous, with 16-byte aligned runs of
    // 4, which the pipelined kernels copy with one 16-byte cp.async each
    // (the others, which never get it, read it as kReductionFastest).
    kRowChunks = 2,
};

// Loads one operand's depth x tile slices (k x rows) into shared memory.
template <class Operand, typename A, class Tiling>
struct TileLoader {
    typedef typename Operand::Element T;
    static constexpr int kRows = Tiling::per_thread;
    Operand op;
    typename Operand::Row rows[kRows];
    bool row_ok[kRows];
    int tile_row0;  // this thread's rows: tile_row0 + row_step()*r
    int tile_k;
    bool chunks;    // kRowChunks
    index_t k;      // this thread's reduction index in the next slice
    typename Operand::Walk::Position position;  // k, split into its parts

    __device__ TileLoader(const Operand& operand, index_t first_row,
                          index_t row_count, int order)
        : op(operand), k(0), position() {
        static_assert(kRows == 4 && Tiling::tile / 4 * Tiling::depth == kThreads,
                      "a run of 4 rows per thread must cover the slice");
        const int t = threadIdx.x;
        chunks = Tiling::pipelined && order == kRowChunks;
        const bool rows_fastest = order == kRowsFastest;
        tile_row0 = rows_fastest ? t % Tiling::load_lanes : t / Tiling::depth;
        tile_k = rows_fastest ? t / Tiling::load_lanes : t % Tiling::depth;
        if constexpr (Tiling::pipelined) {
            if (chunks) {
                tile_row0 = t % (Tiling::tile / 4) * 4;
                tile_k = t / (Tiling::tile / 4);
            }
        }
        for (int r = 0; r < kRows; ++r) {
            const index_t row = first_row + tile_row0 + r * row_step();
            row_ok[r] = row < row_count;
            rows[r] = op.row(row);
        }
    }
    // Tiling64 never takes chunks: a constant there, the loader keeps its
    // registers.
    __device__ int row_step() const {
        return Tiling::pipelined && chunks ? 1 : Tiling::load_lanes;
    }
    __device__ void begin(index_t k_begin) {
        k = k_begin + tile_k;
        position = op.walk.locate(k);
    }
    // This thread's elements of the next slice; moves on to the one after.
    __device__ void fetch(index_t k_end, A (&v)[kRows]) {
        const bool k_ok = k < k_end;
        const typename Operand::Step step = op.step(position);
        for (int r = 0; r < kRows; ++r) {
            const T* p = (row_ok[r] && k_ok) ? op.source(rows[r], step) : nullptr;
            v[r] = p ? cupyconv::to_acc(*p) : A(0);
        }
        k += Tiling::depth;
        op.walk.advance(position, Tiling::depth);
    }
    __device__ void store(A* slice, const A (&v)[kRows]) const {
        for (int r = 0; r < kRows; ++r) {
            slice[tile_k * Tiling::pitch + tile_row0 + r * row_step()] = v[r];
        }
    }
    // The same elements copied into `slice` by cp.async (zeros where fetch
    // gives zeros), landing at the wait that covers the current group.
    // kRowChunks: the launch code vouches that each run of 4 rows is 16
    // contiguous, aligned bytes, all in range or none, all padding or none.
    __device__ void copy_async(A* slice, index_t k_end) {
        static_assert(sizeof(T) == sizeof(A), "cp.async copies elements as they are");
        const bool k_ok = k < k_end;
        const typename Operand::Step step = op.step(position);
        T* dst = reinterpret_cast<T*>(slice + tile_k * Tiling::pitch + tile_row0);
        if (chunks) {
            const T* p = (row_ok[0] && k_ok) ? op.source(rows[0], step) : nullptr;
            copy_to_shared<kRows>(dst, p, op.origin());
        } else {
            for (int r = 0; r < kRows; ++r) {
                const T* p = (row_ok[r] && k_ok) ? op.source(rows[r], step) : nullptr;
                copy_to_shared<1>(dst + r * row_step(), p, op.origin());
            }
        }
        k += Tiling::depth;
        op.walk.advance(position, Tiling::depth);
    }
};

template <typename A, class Tiling>
struct alignas(16) SharedSlices {
    A a[Tiling::stages][Tiling::depth * Tiling::pitch];
    A b[Tiling::stages][Tiling::depth * Tiling::pitch];
};

// Four consecutive values along one side of a micro-tile, loaded from a
// slice at once.
template <typename A>
struct alignas(16) Quad {
    A v[4];
};

// This thread's place in the 16 x 16 thread grid over the C tile; it owns
// rows row(i) and columns col(j), i, j < Tiling::micro: `quads` runs of 4
// consecutive rows (columns) kQuadSpan apart.  A warp then reads 2 distinct
// quads of one operand (a broadcast) and 16 adjacent ones of the other per
// run and step, the least shared-memory traffic for its products.
// lanes_along_rows makes consecutive threads differ in row, for outputs
// whose rows are adjacent in memory.
struct Lane {
    int row0, col0;
    __device__ explicit Lane(bool lanes_along_rows) {
        const int t = threadIdx.x;
        row0 = (lanes_along_rows ? t % kLanes : t / kLanes) * 4;
        col0 = (lanes_along_rows ? t / kLanes : t % kLanes) * 4;
    }
    __device__ int row(int i) const { return row0 + (i & 3) + (i >> 2) * kQuadSpan; }
    __device__ int col(int j) const { return col0 + (j & 3) + (j >> 2) * kQuadSpan; }
};

// acc += A slice @ B slice, one slice of Tiling::depth reduction indices.
template <class Tiling, typename A>
__device__ __forceinline__ void multiply_slice(const A* a_slice, const A* b_slice,
                                               const Lane& lane,
                                               A (&acc)[Tiling::micro][Tiling::micro]) {
#pragma unroll
    for (int kk = 0; kk < Tiling::depth; ++kk) {
        Quad<A> av[Tiling::quads], bv[Tiling::quads];
#pragma unroll
        for (int q = 0; q < Tiling::quads; ++q) {
            av[q] = *reinterpret_cast<const Quad<A>*>(a_slice + kk * Tiling::pitch +
                                                      lane.row0 + q * kQuadSpan);
            bv[q] = *reinterpret_cast<const Quad<A>*>(b_slice + kk * Tiling::pitch +
                                                      lane.col0 + q * kQuadSpan);
        }
#pragma unroll
        for (int i = 0; i < Tiling::micro; ++i) {
#pragma unroll
            for (int j = 0; j < Tiling::micro; ++j) {
                acc[i][j] += av[i >> 2].v[i & 3] * bv[j >> 2].v[j & 3];
            }
        }
    }
}

// acc = A[row tile, k_begin:k_end] @ B[k_begin:k_end, col tile].
// Tiling64: two buffers filled through registers; the next slice is
// fetched while the current one is multiplied, one barrier per slice.
// Tiling128: a ring of Tiling::stages buffers filled by cp.async, the
// copies of stages - 1 slices in flight while one is multiplied; one
// barrier per slice (it also tells every thread that the buffer it is
// about to refill, read in the previous step, is free).
template <class Tiling, typename A, class OpA, class OpB>
__device__ void multiply_tiles(TileLoader<OpA, A, Tiling>& a, TileLoader<OpB, A, Tiling>& b,
                               index_t k_begin, index_t k_end, const Lane& lane,
                               SharedSlices<A, Tiling>& smem,
                               A (&acc)[Tiling::micro][Tiling::micro]) {
    for (int i = 0; i < Tiling::micro; ++i) {
        for (int j = 0; j < Tiling::micro; ++j) acc[i][j] = A(0);
    }
    // Same for the whole block, so no barrier is skipped by some threads
    // only; an empty reduction must not split a tap index over 0 channels.
    if (k_begin >= k_end) return;
    a.begin(k_begin);
    b.begin(k_begin);
    if constexpr (Tiling::pipelined) {
        constexpr int kStages = Tiling::stages;
        const index_t slices = (k_end - k_begin + Tiling::depth - 1) / Tiling::depth;
        // Every step commits one group, empty or not, so that "all but the
        // newest stages - 2 groups" is always the slice about to be read.
        for (int s = 0; s < kStages - 1; ++s) {
            if (s < slices) {
                a.copy_async(smem.a[s], k_end);
                b.copy_async(smem.b[s], k_end);
            }
            copies_commit();
        }
        int read = 0, write = kStages - 1;
        for (index_t i = 0; i < slices; ++i) {
            copies_wait<kStages - 2>();
            __syncthreads();
            if (i + kStages - 1 < slices) {  // same for the whole block
                a.copy_async(smem.a[write], k_end);
                b.copy_async(smem.b[write], k_end);
            }
            copies_commit();
            multiply_slice<Tiling>(smem.a[read], smem.b[read], lane, acc);
            read = read + 1 == kStages ? 0 : read + 1;
            write = write + 1 == kStages ? 0 : write + 1;
        }
    } else {
        A next_a[Tiling::per_thread];
        A next_b[Tiling::per_thread];
        a.fetch(k_end, next_a);
        b.fetch(k_end, next_b);
        a.store(smem.a[0], next_a);
        b.store(smem.b[0], next_b);
        __syncthreads();
        int buffer = 0;
        for (index_t k0 = k_begin; k0 < k_end; k0 += Tiling::depth) {
            const bool more = k0 + Tiling::depth < k_end;  // same for the whole block
            if (more) {
                a.fetch(k_end, next_a);
                b.fetch(k_end, next_b);
            }
            multiply_slice<Tiling>(smem.a[buffer], smem.b[buffer], lane, acc);
            // The other buffer was last read before the previous barrier.
            if (more) {
                a.store(smem.a[buffer ^ 1], next_a);
                b.store(smem.b[buffer ^ 1], next_b);
            }
            __syncthreads();
            buffer ^= 1;
        }
    }
}

// Which tile of C (and of which group and reduction split) this block owns.
struct BlockTile {
    index_t row0, col0, group, split;
    __device__ BlockTile(index_t rows, index_t cols, index_t groups, int size) {
        const index_t row_tiles = (rows + size - 1) / size;
        const index_t col_tiles = (cols + size - 1) / size;
        index_t b = blockIdx.x;  // row tile fastest: neighbours share B
        row0 = b % row_tiles * size;
        b /= row_tiles;
        col0 = b % col_tiles * size;
        b /= col_tiles;
        group = b % groups;
        split = b / groups;
    }
};

// Epilogue of forward and input gradient: C[pixel, channel] (+ bias[channel])
// into a 4-D activation tensor.  out and bias start at the group's channel 0.
template <typename T, typename A, int Micro>
__device__ void store_pixel_tile(T* out, const TensorStrides& s,
                                 index_t height, index_t width,
                                 index_t pixels, index_t channels,
                                 const BlockTile& tile, const Lane& lane,
                                 const A (&acc)[Micro][Micro],
                                 const T* bias, index_t bias_stride,
                                 bool has_bias) {
    for (int i = 0; i < Micro; ++i) {
        const index_t p = tile.row0 + lane.row(i);
        if (p >= pixels) continue;
        const Pixel px = split_pixel(p, height, width);
        T* out_pixel = out + px.n * s.n + px.y * s.h + px.x * s.w;
        for (int j = 0; j < Micro; ++j) {
            const index_t c = tile.col0 + lane.col(j);
            if (c >= channels) continue;
            const A shift =
                has_bias ? cupyconv::to_acc(bias[c * bias_stride]) : A(0);
            out_pixel[c * s.c] = cupyconv::from_acc<T>(acc[i][j] + shift);
        }
    }
}

// ---- the three products -------------------------------------------------------
// Each is a device function of the tiling, called by one kernel per tiling
// that owns the shared memory: convolution_<direction>_igemm (Tiling64) and
// convolution_<direction>_igemm128 (Tiling128, float only).

// y[n, oh, ow, g*Cog + co] = bias[g*Cog + co] + sum over (i, j, c) of
//   x[n, oh*sh - top + i*dh, ow*sw - left + j*dw, g*Cig + c] * w[i, j, c, g*Cog + co]
// One block: a tile of output pixels x output channels of one group.  bias
// is read only when has_bias (pass any T array otherwise).
#define CONVOLUTION_FORWARD_PARAMS                                             \
    const T *__restrict__ x, const T *__restrict__ w,                          \
        const T *__restrict__ bias, T *__restrict__ y,                         \
        CONVOLUTION_GEOMETRY_PARAMS, index_t x_sn, index_t x_sh, index_t x_sw, \
        index_t x_sc, index_t w_si, index_t w_sj, index_t w_scin,              \
        index_t w_scout, index_t y_sn, index_t y_sh, index_t y_sw,             \
        index_t y_sc, index_t bias_stride, int has_bias, int x_order,          \
        int w_order, int lanes_along_rows
#define CONVOLUTION_FORWARD_ARGS                                               \
    x, w, bias, y, batch, height, width, out_height, out_width, kernel_h,      \
        kernel_w, cin_g, cout_g, groups, stride_h, stride_w, pad_top,          \
        pad_left, dilation_h, dilation_w, x_sn, x_sh, x_sw, x_sc, w_si, w_sj,  \
        w_scin, w_scout, y_sn, y_sh, y_sw, y_sc, bias_stride, has_bias,        \
        x_order, w_order, lanes_along_rows

template <class Tiling, typename T>
__device__ __forceinline__ void forward_igemm(SharedSlices<Acc<T>, Tiling>& smem,
                                              CONVOLUTION_FORWARD_PARAMS) {
    typedef Acc<T> A;
    const Geometry g = CONVOLUTION_GEOMETRY;
    const TensorStrides xs{x_sn, x_sh, x_sw, x_sc};
    const TensorStrides ys{y_sn, y_sh, y_sw, y_sc};
    const index_t pixels = g.batch * g.out_height * g.out_width;
    const BlockTile tile(pixels, g.cout_g, g.groups, Tiling::tile);
    const Lane lane(lanes_along_rows != 0);

    const ForwardInput<T> input{x + tile.group * g.cin_g * x_sc, xs, g,
                                TapWalk{g.kernel_w, g.cin_g}};
    const KernelTaps<T> taps{w + tile.group * g.cout_g * w_scout, w_si, w_sj,
                             w_scin, w_scout, TapWalk{g.kernel_w, g.cin_g}};
    TileLoader<ForwardInput<T>, A, Tiling> a(input, tile.row0, pixels, x_order);
    TileLoader<KernelTaps<T>, A, Tiling> b(taps, tile.col0, g.cout_g, w_order);
    A acc[Tiling::micro][Tiling::micro];
    multiply_tiles(a, b, 0, g.kernel_h * g.kernel_w * g.cin_g, lane, smem, acc);
    store_pixel_tile(y + tile.group * g.cout_g * y_sc, ys, g.out_height,
                     g.out_width, pixels, g.cout_g, tile, lane, acc,
                     bias + tile.group * g.cout_g * bias_stride, bias_stride,
                     has_bias != 0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    convolution_forward_igemm(CONVOLUTION_FORWARD_PARAMS) {
    __shared__ SharedSlices<Acc<T>, Tiling64> smem;
    forward_igemm<Tiling64, T>(smem, CONVOLUTION_FORWARD_ARGS);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    convolution_forward_igemm128(CONVOLUTION_FORWARD_PARAMS) {
    __shared__ SharedSlices<Acc<T>, Tiling128> smem;
    forward_igemm<Tiling128, T>(smem, CONVOLUTION_FORWARD_ARGS);
}

// grad_x[n, iy, ix, g*Cig + c] = sum over (i, j, co) of
//   grad_out[n, oy, ox, g*Cog + co] * w[i, j, c, g*Cog + co]
// over the (oy, ox) with oy*sh - top + i*dh == iy and ox*sw - left + j*dw == ix.
// Every input pixel is written, the ones no window reads with zero.
// One block: a tile of input pixels x input channels of one group.
#define CONVOLUTION_INPUT_GRAD_PARAMS                                          \
    const T *__restrict__ grad_out, const T *__restrict__ w,                   \
        T *__restrict__ grad_x, CONVOLUTION_GEOMETRY_PARAMS, index_t go_sn,    \
        index_t go_sh, index_t go_sw, index_t go_sc, index_t w_si,             \
        index_t w_sj, index_t w_scin, index_t w_scout, index_t gx_sn,          \
        index_t gx_sh, index_t gx_sw, index_t gx_sc, int go_order,             \
        int w_order, int lanes_along_rows
#define CONVOLUTION_INPUT_GRAD_ARGS                                            \
    grad_out, w, grad_x, batch, height, width, out_height, out_width,          \
        kernel_h, kernel_w, cin_g, cout_g, groups, stride_h, stride_w,         \
        pad_top, pad_left, dilation_h, dilation_w, go_sn, go_sh, go_sw, go_sc, \
        w_si, w_sj, w_scin, w_scout, gx_sn, gx_sh, gx_sw, gx_sc,               \
        go_order, w_order, lanes_along_rows

template <class Tiling, typename T>
__device__ __forceinline__ void input_grad_igemm(SharedSlices<Acc<T>, Tiling>& smem,
                                                 CONVOLUTION_INPUT_GRAD_PARAMS) {
    typedef Acc<T> A;
    const Geometry g = CONVOLUTION_GEOMETRY;
    const TensorStrides gos{go_sn, go_sh, go_sw, go_sc};
    const TensorStrides gxs{gx_sn, gx_sh, gx_sw, gx_sc};
    const index_t pixels = g.batch * g.height * g.width;
    const BlockTile tile(pixels, g.cin_g, g.groups, Tiling::tile);
    const Lane lane(lanes_along_rows != 0);

    const InputGradOutput<T> grads{grad_out + tile.group * g.cout_g * go_sc,
                                   gos, g, TapWalk{g.kernel_w, g.cout_g}};
    // Reduce over c_out (r) for each c_in column.
    const KernelTaps<T> taps{w + tile.group * g.cout_g * w_scout, w_si, w_sj,
                             w_scout, w_scin, TapWalk{g.kernel_w, g.cout_g}};
    TileLoader<InputGradOutput<T>, A, Tiling> a(grads, tile.row0, pixels,
                                                go_order);
    TileLoader<KernelTaps<T>, A, Tiling> b(taps, tile.col0, g.cin_g, w_order);
    A acc[Tiling::micro][Tiling::micro];
    multiply_tiles(a, b, 0, g.kernel_h * g.kernel_w * g.cout_g, lane, smem, acc);
    store_pixel_tile(grad_x + tile.group * g.cin_g * gx_sc, gxs, g.height,
                     g.width, pixels, g.cin_g, tile, lane, acc, grad_x, 0,
                     false);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    convolution_input_grad_igemm(CONVOLUTION_INPUT_GRAD_PARAMS) {
    __shared__ SharedSlices<Acc<T>, Tiling64> smem;
    input_grad_igemm<Tiling64, T>(smem, CONVOLUTION_INPUT_GRAD_ARGS);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    convolution_input_grad_igemm128(CONVOLUTION_INPUT_GRAD_PARAMS) {
    __shared__ SharedSlices<Acc<T>, Tiling128> smem;
    input_grad_igemm<Tiling128, T>(smem, CONVOLUTION_INPUT_GRAD_ARGS);
}

// The same gradient for few input channels per group (a first layer's 1
// or 3), second step: z (from a matrix product on the host side) holds each
// output pixel's contribution to every tap of its window,
//   z[g, (n, oy, ox), (i, j, c)] = sum over co of
//       grad_out[n, oy, ox, g*Cog + co] * w[i, j, c, g*Cog + co],
// contiguous, in the accumulator type; each input element (n, y, x, c), c
// fastest, adds the contributions of the taps that land on it, in a fixed
// order.  count = N * H * W * C_in.
template <typename T>
__global__ void convolution_input_grad_gather(
    const typename cupyconv::accumulator<T>::type* __restrict__ z,
    T* __restrict__ grad_x, CONVOLUTION_GEOMETRY_PARAMS,
    index_t gx_sn, index_t gx_sh, index_t gx_sw, index_t gx_sc, index_t count) {
    const Geometry g = CONVOLUTION_GEOMETRY;
    const index_t channels = g.cin_g * g.groups;
    const index_t taps = g.kernel_h * g.kernel_w * g.cin_g;
    const index_t pixels = g.batch * g.out_height * g.out_width;
    for (index_t e = cupyconv::global_thread_id(); e < count;
         e += cupyconv::grid_stride()) {
        const index_t c = e % channels;
        const Pixel px = split_pixel(e / channels, g.height, g.width);
        const index_t group = c / g.cin_g;
        const Acc<T>* zc = z + group * pixels * taps +
                           px.n * g.out_height * g.out_width * taps + (c - group * g.cin_g);
        Acc<T> sum = 0;
        for (index_t i = 0; i < g.kernel_h; ++i) {
            index_t oy, ox;
            if (!output_reaching(px.y + g.pad_top, i * g.dilation_h, g.stride_h,
                                 g.out_height, oy)) continue;
            for (index_t j = 0; j < g.kernel_w; ++j) {
                if (!output_reaching(px.x + g.pad_left, j * g.dilation_w, g.stride_w,
                                     g.out_width, ox)) continue;
                sum += zc[(oy * g.out_width + ox) * taps + (i * g.kernel_w + j) * g.cin_g];
            }
        }
        grad_x[px.n * gx_sn + px.y * gx_sh + px.x * gx_sw + c * gx_sc] =
            cupyconv::from_acc<T>(sum);
    }
}

// Partial weight gradient of one reduction split:
//   partial[split, g, (i, j, c), co] = sum over output pixels (n, oy, ox) of
//   the split's chunk of x[n, oy*sh - top + i*dh, ox*sw - left + j*dw, g*Cig + c]
//   * grad_out[n, oy, ox, g*Cog + co].
// split_len (a multiple of 16) output pixels per split; partial is
// contiguous [splits, groups, kh*kw*Cig, Cog] in the accumulator type.
#define CONVOLUTION_WEIGHT_GRAD_PARAMS                                         \
    const T *__restrict__ x, const T *__restrict__ grad_out,                   \
        typename cupyconv::accumulator<T>::type *__restrict__ partial,         \
        CONVOLUTION_GEOMETRY_PARAMS, index_t x_sn, index_t x_sh, index_t x_sw, \
        index_t x_sc, index_t go_sn, index_t go_sh, index_t go_sw,             \
        index_t go_sc, index_t split_len, int x_order,                         \
        int go_order
#define CONVOLUTION_WEIGHT_GRAD_ARGS                                           \
    x, grad_out, partial, batch, height, width, out_height, out_width,         \
        kernel_h, kernel_w, cin_g, cout_g, groups, stride_h, stride_w,         \
        pad_top, pad_left, dilation_h, dilation_w, x_sn, x_sh, x_sw, x_sc,     \
        go_sn, go_sh, go_sw, go_sc, split_len, x_order, go_order

template <class Tiling, typename T>
__device__ __forceinline__ void weight_grad_igemm(SharedSlices<Acc<T>, Tiling>& smem,
                                                  CONVOLUTION_WEIGHT_GRAD_PARAMS) {
    typedef Acc<T> A;
    const Geometry g = CONVOLUTION_GEOMETRY;
    const TensorStrides xs{x_sn, x_sh, x_sw, x_sc};
    const TensorStrides gos{go_sn, go_sh, go_sw, go_sc};
    const index_t taps = g.kernel_h * g.kernel_w * g.cin_g;
    const index_t pixels = g.batch * g.out_height * g.out_width;
    const BlockTile tile(taps, g.cout_g, g.groups, Tiling::tile);
    // partial rows are taps, contiguous along output channels.
    const Lane lane(false);

    const PixelWalk pixel_walk{g.out_height, g.out_width};
    const WeightGradInput<T> input{x + tile.group * g.cin_g * x_sc, xs, g, pixel_walk};
    const WeightGradOutput<T> grads{grad_out + tile.group * g.cout_g * go_sc, gos,
                                    pixel_walk};
    TileLoader<WeightGradInput<T>, A, Tiling> a(input, tile.row0, taps, x_order);
    TileLoader<WeightGradOutput<T>, A, Tiling> b(grads, tile.col0, g.cout_g,
                                                 go_order);
    const index_t k_begin = tile.split * split_len;
    const index_t k_end = min(pixels, k_begin + split_len);
    A acc[Tiling::micro][Tiling::micro];
    multiply_tiles(a, b, k_begin, k_end, lane, smem, acc);

    A* out = partial + (tile.split * g.groups + tile.group) * taps * g.cout_g;
    for (int i = 0; i < Tiling::micro; ++i) {
        const index_t t = tile.row0 + lane.row(i);
        for (int j = 0; j < Tiling::micro; ++j) {
            const index_t co = tile.col0 + lane.col(j);
            if (t < taps && co < g.cout_g) out[t * g.cout_g + co] = acc[i][j];
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    convolution_weight_grad_igemm(CONVOLUTION_WEIGHT_GRAD_PARAMS) {
    __shared__ SharedSlices<Acc<T>, Tiling64> smem;
    weight_grad_igemm<Tiling64, T>(smem, CONVOLUTION_WEIGHT_GRAD_ARGS);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    convolution_weight_grad_igemm128(CONVOLUTION_WEIGHT_GRAD_PARAMS) {
    __shared__ SharedSlices<Acc<T>, Tiling128> smem;
    weight_grad_igemm<Tiling128, T>(smem, CONVOLUTION_WEIGHT_GRAD_ARGS);
}

// grad_w[i, j, c, g*Cog + co] = sum over s = 0 .. splits-1, in this order, of
// partial[s, g, (i, j, c), co].
template <typename T>
__global__ void convolution_weight_grad_reduce(
    const typename cupyconv::accumulator<T>::type* __restrict__ partial,
    T* __restrict__ grad_w, index_t splits, index_t groups, index_t kernel_w,
    index_t taps, index_t cin_g, index_t cout_g, index_t w_si, index_t w_sj,
    index_t w_scin, index_t w_scout) {
    typedef Acc<T> A;
    const index_t count = groups * taps * cout_g;
    for (index_t e = cupyconv::global_thread_id(); e < count;
         e += cupyconv::grid_stride()) {
        A sum = partial[e];
        for (index_t s = 1; s < splits; ++s) sum += partial[s * count + e];
        const index_t co = e % cout_g;
        const index_t gt = e / cout_g;
        const Tap tap = split_tap(gt % taps, kernel_w, cin_g);
        const index_t out_channel = gt / taps * cout_g + co;
        grad_w[tap.i * w_si + tap.j * w_sj + tap.c * w_scin +
               out_channel * w_scout] = cupyconv::from_acc<T>(sum);
    }
}

}  // namespace cupyconv::convolution
