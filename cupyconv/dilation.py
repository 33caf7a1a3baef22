"""dilate / undilate: insert zeros between elements along chosen axes, and
take them out again.  The two are each other's adjoint, which is what a
strided convolution's gradient is built from.
"""

import functools
import math

import numpy

from . import _args, _backend, _kernels, _parallel
from ._interop import interoperable

__all__ = ["dilate", "undilate"]


def _normalize(a, axes, dilation):
    axes = _args.normalize_axes(axes, a.ndim)
    dilation = _args.per_axis(dilation, len(axes), "dilation", minimum=0)
    return axes, dilation


def _output_shape(a, axes, dilation, shape):
    """Shape of ``dilate``'s result: ``n*(d+1)`` per dilated axis, or ``shape``."""
    if shape is None:
        out = list(a.shape)
        for axis, d in zip(axes, dilation):
            out[axis] *= d + 1
        _args.check_elements(out, "dilation: the result")
        return tuple(out)
    out = _args.shape_arg(shape, a.ndim, "shape")
    _args.check_elements(out, "shape: the result")
    steps = dict(zip(axes, dilation))
    for axis, (n, m) in enumerate(zip(a.shape, out)):
        if axis in steps:
            need = max(0, (n - 1) * (steps[axis] + 1) + 1)
            if m < need:
                raise ValueError(
                    f"shape[{axis}] = {m} is too small: dilating {n} elements by "
                    f"{steps[axis]} needs at least {need}"
                )
        elif m != n:
            raise ValueError(
                f"shape[{axis}] = {m} differs from the input's {n} along an "
                "axis that is not dilated"
            )
    return out


@interoperable
def dilate(a, axes, dilation, *, shape=None):
    """Insert ``dilation[i]`` zeros after every element along ``axes[i]``.

    Along a dilated axis of length ``n`` with factor ``d`` the result has
    ``n * (d + 1)`` elements: input element ``j`` lands at ``j * (d + 1)`` and
    every other position is zero.  ``shape`` may ask for a different length,
    at least ``(n - 1) * (d + 1) + 1`` (the last element, no trailing zeros);
    positions past ``n * (d + 1)`` are zero too.  This is what the gradient
    of a strided convolution needs.

    Parameters
    ----------
    a : array_like
        Input of any dtype, shape and memory layout.  It is not modified.
    axes : int or sequence of int
        Axes to dilate; negative values count from the end.  No axis may be
        named twice (``-1`` and ``ndim - 1`` are the same axis).
    dilation : int or sequence of int
        Zeros inserted after each element, one value for every axis or one
        per entry of ``axes``; each ``>= 0``.  ``0`` leaves an axis unchanged.
    shape : sequence of int, optional
        Shape of the result.  Equal to ``a.shape`` along axes not dilated.

    Returns
    -------
    ndarray
        A new C-contiguous array of ``a``'s dtype, on ``a``'s device.

    Raises
    ------
    ValueError
        An axis out of range or repeated; ``len(dilation) != len(axes)``;
        a negative dilation; ``shape`` of the wrong rank, too small along a
        dilated axis or changing another axis; a result too large for any
        array.
    TypeError
        A non-integer axis, dilation or shape entry.

    See Also
    --------
    undilate : the adjoint, which removes the zeros again.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyconv as cc
    >>> cc.dilate(np.array([[1, 2], [3, 4]]), axes=(1,), dilation=1)
    array([[1, 0, 2, 0],
           [3, 0, 4, 0]])
    >>> cc.dilate(np.array([1, 2, 3]), axes=0, dilation=2, shape=(7,))
    array([1, 0, 0, 2, 0, 0, 3])
    """
    xp = _backend.dispatch(a=a)
    a = xp.asarray(a)
    axes, dilation = _normalize(a, axes, dilation)
    out_shape = _output_shape(a, axes, dilation, shape)
    if _backend.use_kernels(xp):
        step = [1] * a.ndim
        for axis, d in zip(axes, dilation):
            step[axis] = d + 1
        return _gather(a, out_shape, step, a.strides)
    out = numpy.zeros(out_shape, dtype=a.dtype)
    merged = _mergeable_tail(a, axes)
    runs = _as_runs(a, merged)
    _parallel.copyto(_as_runs(out, merged)[_dilated_slices(runs, axes, dilation)], runs)
    return out


@interoperable
def undilate(a, axes, dilation):
    """Keep every ``(dilation[i] + 1)``-th element along ``axes[i]``, from index 0.

    An axis of length ``m`` keeps ``ceil(m / (d + 1))`` elements.  This is the
    adjoint of :func:`dilate`: ``undilate(dilate(a)) == a`` and
    ``sum(dilate(a) * b) == sum(a * undilate(b))``.

    Parameters
    ----------
    a : array_like
        Input of any dtype, shape and memory layout.  It is not modified.
    axes : int or sequence of int
        Axes to undilate; negative values count from the end; no repeats.
    dilation : int or sequence of int
        The factor ``d`` of each axis (``>= 0``), one for all or one per axis.

    Returns
    -------
    ndarray
        A new C-contiguous array of ``a``'s dtype, on ``a``'s device.

    Raises
    ------
    ValueError
        An axis out of range or repeated; ``len(dilation) != len(axes)``;
        a negative dilation.
    TypeError
        A non-integer axis or dilation.

    See Also
    --------
    dilate : the adjoint, which inserts the zeros.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyconv as cc
    >>> cc.undilate(np.array([[1, 0, 2, 0], [3, 0, 4, 0]]), axes=-1, dilation=1)
    array([[1, 2],
           [3, 4]])
    >>> cc.undilate(np.arange(7), axes=0, dilation=2)
    array([0, 3, 6])
    """
    xp = _backend.dispatch(a=a)
    a = xp.asarray(a)
    axes, dilation = _normalize(a, axes, dilation)
    view = a[_dilated_slices(a, axes, dilation, keep_all=True)]
    if _backend.use_kernels(xp):
        return _gather(view, view.shape, (1,) * a.ndim, view.strides)
    runs = _as_runs(view, _mergeable_tail(view, axes))
    out = numpy.empty(runs.shape, runs.dtype)
    _parallel.copyto(out, runs)
    return out.view(a.dtype).reshape(view.shape)


# The NumPy path moves contiguous runs, not elements: the trailing axes that
# are not dilated (the channels of an NHWC image, say) are viewed as one
# opaque item, which NumPy copies with one memcpy instead of element by
# element (2x faster for runs of 16 float32 values).  Large copies are split
# among the cores.

def _mergeable_tail(a, axes):
    """How many trailing axes of ``a``, the first excepted, are not dilated
    and contiguous (0 for object arrays, whose items are references, and for
    empty arrays)."""
    if a.dtype.hasobject or a.size == 0:
        return 0
    count, run = 0, a.itemsize
    for axis in range(a.ndim - 1, 0, -1):
        if axis in axes or (a.shape[axis] != 1 and a.strides[axis] != run):
            break
        run *= a.shape[axis]
        count += 1
    return count


def _as_runs(a, merged):
    """``a`` with its last ``merged`` axes viewed as one opaque item."""
    if merged == 0:
        return a
    lead, tail = a.shape[:a.ndim - merged], a.shape[a.ndim - merged:]
    run = numpy.dtype((numpy.void, a.itemsize * math.prod(tail)))
    return a.reshape(lead + (-1,)).view(run)[..., 0]


def _dilated_slices(a, axes, dilation, keep_all=False):
    """Slices selecting every (d+1)-th position along each dilated axis.

    For ``dilate`` they select the ``n`` positions the input lands on in the
    output; with ``keep_all`` they select every such position of ``a`` itself.
    The leading ``...`` keeps a 0-d result an array (``a[()]`` is a scalar).
    """
    slices = [slice(None)] * a.ndim
    for axis, d in zip(axes, dilation):
        stop = None if keep_all else max(0, (a.shape[axis] - 1) * (d + 1) + 1)
        slices[axis] = slice(0, stop, d + 1)
    return (Ellipsis, *slices)


def _gather(a, out_shape, step, in_strides):
    """Launch ``dilate_gather``: out[o] = a[o // step] where o % step == 0."""
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
    kernel = _kernels.get_function("dilate", f"dilate_gather<{_kernels.COPY_TYPES[unit]}>")
    kernel(_kernels.grid_for(count), (256,),
           (a, target, table, numpy.int64(count), numpy.int32(len(rows[0])), fast_index))
    return out


@functools.lru_cache(maxsize=256)
def _gather_plan(out_shape, in_shape, step, in_strides, itemsize, alignment, limit):
    """``(unit, words, fast_index, rows)`` of a gather: the word size, the
    output's length in words, the kernel's flag, and its table of axes (see
    cuda/dilate.cu) as nested tuples.  ``alignment`` is the input's address
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
