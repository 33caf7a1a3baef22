"""dilate / undilate: insert zeros between elements along chosen axes, and
take them out again.  The two are each other's adjoint, which is what a
strided convolution's gradient is built from.

The code: :mod:`._geometry` (axes, factors and shapes, checked once per
call), :mod:`._cpu` (the NumPy path), :mod:`._cuda` (launch code of
``cuda/dilation.cu``).
"""

from .. import _backend
from .._interop import interoperable
from . import _cpu, _cuda, _geometry

__all__ = ["dilate", "undilate"]


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
    geom = _geometry.dilate_geometry(a.shape, axes, dilation, shape)
    if _backend.use_kernels(xp):
        return _cuda.dilate(a, geom)
    return _cpu.dilate(a, geom)


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
    geom = _geometry.undilate_geometry(a.shape, axes, dilation)
    if _backend.use_kernels(xp):
        return _cuda.undilate(a, geom)
    return _cpu.undilate(a, geom)
