// 2-D max-pooling over the H and W axes of C-contiguous NHWC or NCHW arrays:
// forward (values and, when asked, the flat index h*W + w of each window's
// pick within its input plane) and gradient.
//
// A window picks its first maximum in row-major window order; a NaN beats
// every number, and of several NaNs the last wins (as in PyTorch).  Taps
// outside the input are skipped, never read: padding acts as -inf (the
// dtype's minimum for integers) that is never picked.  The Python side
// rejects windows with no input element.
//
// Two kernels per direction: pooling_<direction>_window for any window,
// stride, padding, dilation and ceil_mode (one thread per output element
// forward, a deterministic gather per input element backward), and
// pooling_<direction>_2x1 for the 2x1 window with stride (2, 1), which reads
// each input row pair once with 16-byte loads.
#include "cupyconv_common.cuh"

// Every kernel and helper of this file lives in cupyconv::pooling.
namespace cupyconv::pooling {

// Whether v, a later tap, replaces best as a window's pick (strictly greater,
// or a NaN).  Integers have no NaN; float16 compares in float32 (exact).
template <typename T>
__device__ __forceinline__ bool beats(T v, T best) { return v > best; }

// float's bit pattern as an int in the order of the values (-0.0 and +0.0
// both map to 0).  CuPy compiles every kernel with -ftz=true, under which
// float comparisons see subnormals as zero; integer comparisons of these
// keys stay exact.
__device__ __forceinline__ int ordered(int bits) {
    return bits >= 0 ? bits : (bits ^ 0x7FFFFFFF) + 1;
}

__device__ __forceinline__ bool is_nan_bits(int bits) {
    return (bits & 0x7FFFFFFF) > 0x7F800000;
}

template <>
__device__ __forceinline__ bool beats<float>(float v, float best) {
    const int v_bits = __float_as_int(v), best_bits = __float_as_int(best);
    if (is_nan_bits(v_bits)) return true;
    return !is_nan_bits(best_bits) && ordered(v_bits) > ordered(best_bits);
}
template <>
__device__ __forceinline__ bool beats<double>(double v, double best) {
    return v > best || isnan(v);
}
template <>
__device__ __forceinline__ bool beats<__half>(__half v, __half best) {
    return beats(__half2float(v), __half2float(best));
}

// N consecutive elements moved as one aligned load/store (16 bytes at most
// per instruction; a larger pack is stored as several 16-byte pieces).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) pack {
    T v[N];
};

template <int N, typename T>
__device__ __forceinline__ pack<T, N> load(const T* p) {
    return *reinterpret_cast<const pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store(T* p, const pack<T, N>& value) {
    *reinterpret_cast<pack<T, N>*>(p) = value;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<size_t>(p) & 15) == 0;
}

// The 2x1 kernels see the input as (planes, H, row): NHWC has planes = N and
// row = W*C; NCHW has planes = N*C and row = W.  Row element l belongs to
// image column l / inner (inner = C for NHWC, 1 for NCHW).  Each thread owns
// N consecutive row elements (N divides row), so one image column advances
// every `inner` elements.
struct columns {
    index_t w, rest, inner;
    __device__ __forceinline__ columns(index_t w_, index_t rest_, index_t inner_)
        : w(w_), rest(rest_), inner(inner_) {}
    __device__ __forceinline__ void next() {
        if (++rest == inner) { rest = 0; ++w; }
    }
};

// Where pack v of planes of `rows` rows of `row` elements (N per pack)
// starts: plane, row in the plane, element in the row and that element's
// image column and channel (element = w * inner + rest).  With fast_index
// (every number below 2**31) the divisions take divisor32's few
// instructions; 64-bit divisions cost dozens and kept the kernels short of
// memory speed.
struct pack_position {
    index_t plane, r, l, w, rest;
};

struct pack_splitter {
    index_t packs_per_row, rows, inner;
    bool fast;
    divisor32 by_row, by_plane, by_inner;

    __device__ __forceinline__ pack_splitter(index_t row, int N, index_t rows_, index_t inner_,
                                             bool fast_)
        : packs_per_row(row / N), rows(rows_), inner(inner_), fast(fast_) {
        if (fast) {
            by_row = divisor32::of(packs_per_row);
            by_plane = divisor32::of(rows);
            by_inner = divisor32::of(inner);
        }
    }

    __device__ __forceinline__ pack_position operator()(index_t v, int N) const {
        pack_position p;
        const index_t plane_row = fast ? by_row((unsigned int)v) : v / packs_per_row;
        p.l = (v - plane_row * packs_per_row) * N;
        p.plane = fast ? by_plane((unsigned int)plane_row) : plane_row / rows;
        p.r = plane_row - p.plane * rows;
        p.w = fast ? by_inner((unsigned int)p.l) : p.l / inner;
        p.rest = p.l - p.w * inner;
        return p;
    }
};

// Forward over output row elements [N*v, N*v + N) for every v of the grid.
template <int N, typename T>
__device__ __forceinline__ void pool2x1_forward(
        const T* __restrict__ in, T* __restrict__ out, index_t* __restrict__ indices,
        bool with_indices, index_t planes, index_t H, index_t OH, index_t row,
        index_t inner, index_t W, bool fast_index) {
    const index_t n_packs = planes * OH * row / N;
    if (n_packs == 0) return;
    const pack_splitter split(row, N, OH, inner, fast_index);
    for (index_t v = global_thread_id(); v < n_packs; v += grid_stride()) {
        const pack_position at_v = split(v, N);
        const index_t o = v * N;
        const index_t l = at_v.l, plane = at_v.plane, oh = at_v.r;
        const index_t top = (plane * H + 2 * oh) * row + l;
        // With ceil_mode an odd H leaves a last window of one row.
        const bool has_bottom = 2 * oh + 1 < H;
        const pack<T, N> a = load<N>(in + top);
        const pack<T, N> b = has_bottom ? load<N>(in + top + row) : a;
        pack<T, N> picked;
        bool bottom[N];
        for (int k = 0; k < N; ++k) {
            bottom[k] = has_bottom && beats(b.v[k], a.v[k]);
            picked.v[k] = bottom[k] ? b.v[k] : a.v[k];
        }
        store<N>(out + o, picked);
        if (with_indices) {
            pack<index_t, N> at;
            columns col(at_v.w, at_v.rest, inner);
            for (int k = 0; k < N; ++k) {
                at.v[k] = (2 * oh + bottom[k]) * W + col.w;
                col.next();
            }
            store<N>(indices + o, at);
        }
    }
}

// Gradient over input row-pair elements: row pair q of a plane is window q
// (rows 2q and 2q+1); a last odd row outside every window gets zeros.  The
// pick comes from the indices when given, else from the input values.
template <int N, typename T>
__device__ __forceinline__ void pool2x1_backward(
        const T* __restrict__ grad_out, const T* __restrict__ in,
        const index_t* __restrict__ indices, bool with_indices,
        T* __restrict__ grad_in, index_t planes, index_t H, index_t OH,
        index_t row, index_t inner, index_t W, bool fast_index) {
    const index_t pairs = (H + 1) / 2;
    const index_t n_packs = planes * pairs * row / N;
    if (n_packs == 0) return;
    const pack_splitter split(row, N, pairs, inner, fast_index);
    const T zero = from_acc<T>(0);
    for (index_t v = global_thread_id(); v < n_packs; v += grid_stride()) {
        const pack_position at_v = split(v, N);
        const index_t l = at_v.l, plane = at_v.plane, q = at_v.r;
        const index_t top = (plane * H + 2 * q) * row + l;
        const bool has_bottom = 2 * q + 1 < H;
        pack<T, N> g_top, g_bottom;
        if (q < OH) {
            const index_t o = (plane * OH + q) * row + l;
            const pack<T, N> g = load<N>(grad_out + o);
            if (with_indices) {
                const pack<index_t, N> at = load<N>(indices + o);
                columns col(at_v.w, at_v.rest, inner);
                for (int k = 0; k < N; ++k) {
                    const index_t top_at = 2 * q * W + col.w;
                    g_top.v[k] = at.v[k] == top_at ? g.v[k] : zero;
                    g_bottom.v[k] = at.v[k] == top_at + W ? g.v[k] : zero;
                    col.next();
                }
            } else {
                const pack<T, N> a = load<N>(in + top);
                const pack<T, N> b = has_bottom ? load<N>(in + top + row) : a;
                for (int k = 0; k < N; ++k) {
                    const bool bottom = has_bottom && beats(b.v[k], a.v[k]);
                    g_top.v[k] = bottom ? zero : g.v[k];
                    g_bottom.v[k] = bottom ? g.v[k] : zero;
                }
            }
        } else {
            for (int k = 0; k < N; ++k) g_top.v[k] = g_bottom.v[k] = zero;
        }
        store<N>(grad_in + top, g_top);
        if (has_bottom) store<N>(grad_in + top + row, g_bottom);
    }
}

// Element (n, c, h, w) of an NHWC or NCHW array of C channels, H x W images.
__device__ __forceinline__ index_t element_at(bool channels_last, index_t n, index_t c,
                                              index_t h, index_t w, index_t C,
                                              index_t H, index_t W) {
    return channels_last ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

// (n, c, y, x) of flat element i of an NHWC or NCHW array of Y x X images.
__device__ __forceinline__ void split(bool channels_last, index_t i, index_t C,
                                      index_t Y, index_t X, index_t& n, index_t& c,
                                      index_t& y, index_t& x) {
    if (channels_last) {
        c = i % C; i /= C;
        x = i % X; i /= X;
        y = i % Y; n = i / Y;
    } else {
        x = i % X; i /= X;
        y = i % Y; i /= Y;
        c = i % C; n = i / C;
    }
}

// Forward of the 2x1 window with stride (2, 1), no padding: output row oh is
// the elementwise pick of input rows 2*oh and 2*oh + 1 (the last window has
// one row when ceil_mode meets an odd H).  16-byte packs when the row length
// and every pointer allow, one element per thread otherwise.  `indices` is
// written only when with_indices is nonzero (it may then be any int64 array).
template <typename T>
__global__ void pooling_forward_2x1(
    const T* __restrict__ in, T* __restrict__ out, index_t* __restrict__ indices,
    int with_indices, index_t planes, index_t H, index_t OH, index_t row,
    index_t inner, index_t W, int fast_index) {
    constexpr int wide = 16 / sizeof(T);
    if (row % wide == 0 && aligned16(in) && aligned16(out) &&
            (!with_indices || aligned16(indices))) {
        pool2x1_forward<wide>(in, out, indices, with_indices != 0, planes, H, OH, row,
                              inner, W, fast_index != 0);
    } else {
        pool2x1_forward<1>(in, out, indices, with_indices != 0, planes, H, OH, row,
                           inner, W, fast_index != 0);
    }
}

// Gradient of the 2x1 window with stride (2, 1) in one pass over the input:
// each window sends grad_out to the element it picked, the other gets zero.
// The pick comes from `indices` when with_indices is nonzero (then `in` is
// not read), else from the input values `in`.
template <typename T>
__global__ void pooling_backward_2x1(
    const T* __restrict__ grad_out, const T* __restrict__ in,
    const index_t* __restrict__ indices, int with_indices, T* __restrict__ grad_in,
    index_t planes, index_t H, index_t OH, index_t row, index_t inner, index_t W,
    int fast_index) {
    constexpr int wide = 16 / sizeof(T);
    if (row % wide == 0 && aligned16(grad_out) && aligned16(grad_in) &&
            (with_indices ? aligned16(indices) : aligned16(in))) {
        pool2x1_backward<wide>(grad_out, in, indices, with_indices != 0, grad_in, planes,
                               H, OH, row, inner, W, fast_index != 0);
    } else {
        pool2x1_backward<1>(grad_out, in, indices, with_indices != 0, grad_in, planes,
                            H, OH, row, inner, W, fast_index != 0);
    }
}

// Forward of any window: one thread per output element walks its kh x kw
// taps in row-major order, skipping those outside the input.
template <typename T>
__global__ void pooling_forward_window(
    const T* __restrict__ in, T* __restrict__ out, index_t* __restrict__ indices,
    int with_indices, index_t n_out, int channels_last, index_t C, index_t H,
    index_t W, index_t OH, index_t OW, index_t kh, index_t kw, index_t sh, index_t sw,
    index_t ph, index_t pw, index_t dh, index_t dw) {
    for (index_t o = cupyconv::global_thread_id(); o < n_out;
         o += cupyconv::grid_stride()) {
        index_t n, c, oh, ow;
        split(channels_last, o, C, OH, OW, n, c, oh, ow);
        T best = T();
        index_t best_at = -1;
        for (index_t i = 0; i < kh; ++i) {
            const index_t h = oh * sh - ph + i * dh;
            if (h < 0 || h >= H) continue;
            for (index_t j = 0; j < kw; ++j) {
                const index_t w = ow * sw - pw + j * dw;
                if (w < 0 || w >= W) continue;
                const T v = in[element_at(channels_last, n, c, h, w, C, H, W)];
                if (best_at < 0 || beats(v, best)) {
                    best = v;
                    best_at = h * W + w;
                }
            }
        }
        out[o] = best;
        if (with_indices) indices[o] = best_at;
    }
}

// Gradient of any window as a gather: input element (h, w) visits the
// windows that contain it in tap order (i, j) and adds the gradient of each
// window whose index picked it.  No atomics; a fixed summation order, so the
// result is deterministic (float16 sums in float32).
template <typename T>
__global__ void pooling_backward_window(
    const T* __restrict__ grad_out, const index_t* __restrict__ indices,
    T* __restrict__ grad_in, index_t n_in, int channels_last, index_t C, index_t H,
    index_t W, index_t OH, index_t OW, index_t kh, index_t kw, index_t sh, index_t sw,
    index_t ph, index_t pw, index_t dh, index_t dw) {
    for (index_t e = cupyconv::global_thread_id(); e < n_in;
         e += cupyconv::grid_stride()) {
        index_t n, c, h, w;
        split(channels_last, e, C, H, W, n, c, h, w);
        typename cupyconv::accumulator<T>::type sum = 0;
        for (index_t i = 0; i < kh; ++i) {
            const index_t y = h + ph - i * dh;  // oh * sh when window oh holds h
            if (y < 0 || y % sh != 0 || y / sh >= OH) continue;
            for (index_t j = 0; j < kw; ++j) {
                const index_t x = w + pw - j * dw;
                if (x < 0 || x % sw != 0 || x / sw >= OW) continue;
                const index_t o = element_at(channels_last, n, c, y / sh, x / sw, C,
                                             OH, OW);
                if (indices[o] == h * W + w) sum += cupyconv::to_acc(grad_out[o]);
            }
        }
        grad_in[e] = cupyconv::from_acc<T>(sum);
    }
}

}  // namespace cupyconv::pooling
