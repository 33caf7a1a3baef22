// dilate / undilate as one gather over the output.
//
// Output element o (multi-index o_0..o_{ndim-1}) reads the input at
// (o_k / step_k) along every axis k when o_k is a multiple of step_k and
// o_k / step_k < in_shape_k; otherwise it is zero.  dilate passes
// step_k = d_k + 1; undilate passes step_k = 1 with input strides already
// multiplied by d_k + 1.  Each output element is written exactly once, so no
// zero-fill pass is needed, and consecutive threads write consecutive
// elements (coalesced).  T only moves bits: one instantiation per item size.
#include "cupyconv_common.cuh"

using cupyconv::index_t;

// meta holds 4 rows of ndim int64 values: out_shape, in_shape, step,
// in_strides (in bytes, any sign: views of any layout are read in place).
template <typename T>
__global__ void dilate_gather(const char* __restrict__ in,
                              T* __restrict__ out,
                              const index_t* __restrict__ meta,
                              index_t n_out, int ndim) {
    const index_t* out_shape = meta;
    const index_t* in_shape = meta + ndim;
    const index_t* step = meta + 2 * ndim;
    const index_t* in_strides = meta + 3 * ndim;
    for (index_t i = cupyconv::global_thread_id(); i < n_out;
         i += cupyconv::grid_stride()) {
        index_t rest = i;
        index_t offset = 0;
        bool hit = true;
        for (int k = ndim - 1; k >= 0; --k) {
            const index_t o = rest % out_shape[k];
            rest /= out_shape[k];
            const index_t src = o / step[k];
            hit = hit && (o - src * step[k] == 0) && (src < in_shape[k]);
            offset += src * in_strides[k];
        }
        out[i] = hit ? *reinterpret_cast<const T*>(in + offset) : T();
    }
}
