"""Launch code of dilate and undilate on the GPU (``cuda/dilation.cu``):
CuPy arrays, or NumPy arrays under the test suite's CPU executor.  Both are
one gather, ``out[o] = a[o // step]`` where ``o % step == 0``, else 0:
undilate is the gather of a strided view of its input with every step 1.
"""

import functools
import math

import numpy

from .. import _backend, _kernels


def dilate(a, geom):
    """``a`` dilated as ``geom`` says, a new array."""
    return _gather(a, geom.dilated_shape, geom.steps, a.strides)


def undilate(a, geom):
    """``a`` undilated as ``geom`` says, a new array."""
    view = a[geom.lattice()]
    return _gather(view, view.shape, (1,) * a.ndim, view.strides)


def _gather(a, out_shape, step, in_strides):
    """Launch ``dilation_forward_gather``: out[o] = a[o // step] where
    o % step == 0, else 0."""
    xp = _backend.array_module_of(a)
    out = xp.empty(out_shape, dtype=a.dtype)
    if out.size == 0:
        return out
    if a.dtype.itemsize not in _kernels.COPY_TYPES or a.dtype.hasobject:
        raise TypeError(f"dtype {a.dtype} is not supported on the GPU")
    unit, count, fast_index, rows = _gather_plan(
        tuple(out_shape), a.shape, tuple(step), tuple(in_strides), a.itemsize,
        _kernels.data_pointer(a) % 16, _kernels.FAST_INDEX_LIMIT)
    # complex128 is only a 16-byte word to the kernel (CuPy has no void dtype).
    target = out.reshape(-1).view(numpy.complex128 if unit == 16 else f"u{unit}")
    table = _axis_table(xp, _kernels.device_id(xp), rows)
    _kernels.launch("dilation", "dilation_forward_gather", _kernels.COPY_TYPES[unit],
                    _kernels.grid_for(count),
                    (a, target, table, numpy.int64(count), numpy.int32(len(rows[0])),
                     fast_index))
    return out


@functools.lru_cache(maxsize=256)
def _gather_plan(out_shape, in_shape, step, in_strides, itemsize, alignment, limit):
    """``(unit, words, fast_index, rows)`` of a gather: the word size, the
    output's length in words, the kernel's flag, and its table of axes (see
    cuda/dilation.cu) as nested tuples.  ``alignment`` is the input's address
    modulo 16 and ``limit`` the FAST_INDEX_LIMIT in force (both decide the
    plan, so both are in the cache's key)."""
    axes = _merged_axes(out_shape, in_shape, step, in_strides)
    unit, axes = _in_units(axes, itemsize, alignment)
    words = math.prod(out_shape) * itemsize // unit
    fast_index = _kernels.fast_index(words, *(max(o, n, s) for o, n, s, _ in axes),
                                     limit=limit)
    rows = [list(row) for row in zip(*axes)]
    for size_row in (rows[0], rows[2]):  # divisor32 of out_shape, then of step
        magics = [_kernels.divisor32(v) if fast_index else (0, 0) for v in size_row]
        rows += [[m for m, _ in magics], [sh for _, sh in magics]]
    return unit, words, fast_index, tuple(map(tuple, rows))


@functools.lru_cache(maxsize=256)
def _axis_table(xp, device, rows):
    """The kernel's table of axes on ``device``, made once per table: a copy
    from host memory at every call would first wait for everything queued on
    the GPU (a copy from pageable memory synchronises its stream)."""
    return xp.asarray(numpy.array(rows, dtype=numpy.int64))


# The GPU gather decodes every output position axis by axis, so it first
# drops and merges axes: axes of length 1 say nothing, and neighbouring axes
# that are neither dilated nor apart in memory are one axis.  Each axis is
# (out length, in length, step, input stride in bytes).

def _merged_axes(out_shape, in_shape, step, in_strides):
    merged = []
    for axis in zip(out_shape, in_shape, step, in_strides):
        o, n, s, t = axis
        if o == 1 and n >= 1:
            continue  # position 0 only, which is always read
        if merged:
            po, pn, ps, pt = merged[-1]
            if ps == s == 1 and po == pn and o == n and pt == t * n:
                merged[-1] = (po * o, po * o, 1, t)
                continue
        merged.append(axis)
    return merged or [(1, 1, 1, 0)]


def _in_units(axes, itemsize, address):
    """``(unit, axes)``: elements move as ``unit``-byte words, the widest of
    16, 8, 4, 2, 1 that the input's address and strides allow (a view
    reinterpreted at an odd byte offset is legal, a misaligned load is not)
    and that divides the innermost contiguous run: a run of 16 float32
    channels moves as four 16-byte words, and a misaligned float64 as two
    4-byte ones.  The innermost axis is rewritten in units."""
    o, n, s, t = axes[-1]
    run = s == 1 and o == n and t == itemsize
    run_bytes = o * itemsize if run else itemsize
    outer = axes[:-1] if run else axes
    unit = 16
    while any(v % unit for v in (run_bytes, address, *(stride for *_, stride in outer))):
        unit //= 2
    words = run_bytes // unit
    if run:
        return unit, outer + [(words, words, 1, unit)]
    return unit, axes + ([(words, words, 1, unit)] if words > 1 else [])
