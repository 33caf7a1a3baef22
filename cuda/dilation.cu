// dilate / undilate as one gather over the output, the kernel
// dilation_forward_gather (undilate is the gather of a strided view).
//
// Output element o (multi-index o_0..o_{ndim-1}) reads the input at
// (o_k / step_k) along every axis k when o_k is a multiple of step_k and
// o_k / step_k < in_shape_k; otherwise it is zero.  dilate passes
// step_k = d_k + 1; undilate passes step_k = 1 with input strides already
// multiplied by d_k + 1.  Each output element is written exactly once, so no
// zero-fill pass is needed, and consecutive threads write consecutive
// elements (coalesced).  T only moves bits: the host merges axes it can and
// moves contiguous runs in units of up to 16 bytes.
#include "cupyconv_common.cuh"

// meta holds 8 rows of ndim int64 values: out_shape, in_shape, step,
// in_strides (in bytes, any sign: views of any layout are read in place),
// then the divisor32 magic and shift of out_shape and of step.  With
// fast_index (set when the output and every extent are below 2**31) the
// per-axis divisions take the multiply-and-shift path; a 64-bit division
// costs dozens of instructions per axis and made the gather compute-bound.

// Every kernel and helper of this file lives in cupyconv::dilation.
namespace cupyconv::dilation {

// One axis of the fast path, loaded once per thread.
struct axis32 {
    unsigned int out_shape, in_shape, step;
    divisor32 by_out, by_step;
    index_t in_stride;

    __device__ __forceinline__ void load(const index_t* meta, int ndim, int k) {
        out_shape = (unsigned int)meta[k];
        in_shape = (unsigned int)meta[ndim + k];
        step = (unsigned int)meta[2 * ndim + k];
        in_stride = meta[3 * ndim + k];
        by_out = {(unsigned int)meta[4 * ndim + k], (unsigned int)meta[5 * ndim + k]};
        by_step = {(unsigned int)meta[6 * ndim + k], (unsigned int)meta[7 * ndim + k]};
    }

    // Takes this axis's position off `rest`; adds its input offset, or
    // clears `hit` when the position falls between or after input elements.
    __device__ __forceinline__ void visit(unsigned int& rest, index_t& offset,
                                          bool& hit) const {
        const unsigned int next = by_out(rest);
        const unsigned int o = rest - next * out_shape;
        rest = next;
        const unsigned int src = by_step(o);
        hit = hit && o == src * step && src < in_shape;
        offset += src * in_stride;
    }
};

template <typename T>
__device__ __forceinline__ T read_or_zero(const char* in, index_t offset, bool hit) {
    return hit ? *reinterpret_cast<const T*>(in + offset) : T();
}

// The fast path for NDIM axes: the axes stay in registers for the whole
// grid-stride loop instead of being re-read from memory per element.
template <int NDIM, typename T>
__device__ __forceinline__ void gather_fixed(const char* __restrict__ in, T* __restrict__ out,
                                             const index_t* __restrict__ meta, index_t n_out) {
    axis32 axes[NDIM];
#pragma unroll
    for (int k = 0; k < NDIM; ++k) axes[k].load(meta, NDIM, k);
    for (index_t i = global_thread_id(); i < n_out; i += grid_stride()) {
        unsigned int rest = (unsigned int)i;
        index_t offset = 0;
        bool hit = true;
#pragma unroll
        for (int k = NDIM - 1; k >= 0; --k) axes[k].visit(rest, offset, hit);
        out[i] = read_or_zero<T>(in, offset, hit);
    }
}

// The fast path for any number of axes.
template <typename T>
__device__ __forceinline__ void gather_any(const char* __restrict__ in, T* __restrict__ out,
                                           const index_t* __restrict__ meta, index_t n_out,
                                           int ndim) {
    for (index_t i = global_thread_id(); i < n_out; i += grid_stride()) {
        unsigned int rest = (unsigned int)i;
        index_t offset = 0;
        bool hit = true;
        for (int k = ndim - 1; k >= 0; --k) {
            axis32 axis;
            axis.load(meta, ndim, k);
            axis.visit(rest, offset, hit);
        }
        out[i] = read_or_zero<T>(in, offset, hit);
    }
}

// 64-bit positions, for outputs or extents of 2**31 and more.
template <typename T>
__device__ __forceinline__ void gather_wide(const char* __restrict__ in, T* __restrict__ out,
                                            const index_t* __restrict__ meta, index_t n_out,
                                            int ndim) {
    const index_t* out_shape = meta;
    const index_t* in_shape = meta + ndim;
    const index_t* step = meta + 2 * ndim;
    const index_t* in_strides = meta + 3 * ndim;
    for (index_t i = global_thread_id(); i < n_out; i += grid_stride()) {
        index_t rest = i;
        index_t offset = 0;
        bool hit = true;
        for (int k = ndim - 1; k >= 0; --k) {
            const index_t o = rest % out_shape[k];
            rest /= out_shape[k];
            const index_t src = o / step[k];
            hit = hit && (o == src * step[k]) && (src < in_shape[k]);
            offset += src * in_strides[k];
        }
        out[i] = read_or_zero<T>(in, offset, hit);
    }
}

template <typename T>
__global__ void dilation_forward_gather(const char* __restrict__ in,
                                        T* __restrict__ out,
                                        const index_t* __restrict__ meta,
                                        index_t n_out, int ndim, int fast_index) {
    if (!fast_index) {
        gather_wide(in, out, meta, n_out, ndim);
        return;
    }
    switch (ndim) {  // the host merges most calls down to 4 axes or fewer
        case 1: gather_fixed<1>(in, out, meta, n_out); break;
        case 2: gather_fixed<2>(in, out, meta, n_out); break;
        case 3: gather_fixed<3>(in, out, meta, n_out); break;
        case 4: gather_fixed<4>(in, out, meta, n_out); break;
        default: gather_any(in, out, meta, n_out, ndim);
    }
}

}  // namespace cupyconv::dilation
