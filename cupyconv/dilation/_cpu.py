"""The NumPy path of dilate and undilate.

It moves contiguous runs, not elements: the trailing axes that are not
dilated (the channels of an NHWC image, say) are viewed as one opaque item,
which NumPy copies with one memcpy instead of element by element (see
``docs/kernels.rst``, dilation's design notes).  Large copies are split
among the cores.
"""

import math

import numpy

from .. import _parallel


def dilate(a, geom):
    """``a`` dilated as ``geom`` says, a new array."""
    out = numpy.zeros(geom.dilated_shape, dtype=a.dtype)
    merged = _mergeable_tail(a, geom.axes)
    runs = _as_runs(a, merged)
    _parallel.copyto(_as_runs(out, merged)[geom.lattice(runs.ndim)], runs)
    return out


def undilate(a, geom):
    """``a`` undilated as ``geom`` says, a new array."""
    view = a[geom.lattice()]
    runs = _as_runs(view, _mergeable_tail(view, geom.axes))
    out = numpy.empty(runs.shape, runs.dtype)
    _parallel.copyto(out, runs)
    return out.view(a.dtype).reshape(view.shape)


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
