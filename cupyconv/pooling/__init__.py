"""2-D max-pooling over the H and W axes of NHWC or NCHW images, with its
gradient.

Which element a window picks is defined once and kept everywhere (values,
indices, gradient, NumPy path and CUDA kernels): the first maximum in
row-major window order; a NaN beats every number, and of several NaNs the
last in window order wins, as in PyTorch's kernels.  Padding is never picked
(it acts as -inf, or the dtype's minimum for integers).  The values are the
picked elements, except that the NumPy 2x1 path takes them with
``numpy.maximum`` where it runs NumPy's ufuncs, which may answer a tie of
-0.0 and +0.0 with either zero (equal values; the indices still name the
first).

The 2x1 window with stride (2, 1) -- two rows into one, as in the price-trend
CNNs this package serves -- has its own path on both devices; on the CPU it
runs in cache-sized blocks spread over the cores' threads.  Where numba is
installed, the CPU path runs most of its work in compiled loops instead
(:mod:`cupyconv.pooling._fused`).

The code: :mod:`._geometry` (the window and output size, checked once per
call), :mod:`._cpu` (the NumPy path), :mod:`._fused` (its numba loops),
:mod:`._cuda` (launch code of ``cuda/pooling.cu``).
"""

import numpy

from .. import _args, _backend, _kernels
from .._interop import interoperable
from . import _cpu, _cuda, _geometry

__all__ = ["max_pool2d", "max_pool2d_backward"]


@interoperable
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, *,
               ceil_mode=False, layout="NHWC", return_indices=False):
    """Maximum over each ``kernel_size`` window of every image and channel.

    Along each spatial axis (as in :func:`torch.nn.functional.max_pool2d`)::

        out = (size + 2*padding - dilation*(kernel - 1) - 1) // stride + 1

    rounded up instead of down with ``ceil_mode``, where a last window must
    still start inside the input or the leading padding.  It must be at
    least 1, or 0 along an axis where ``x`` has no element; every other
    axis may be 0 (an empty result).  The arguments come in PyTorch's order
    (``torch.nn.functional.max_pool2d(input, kernel_size, stride, padding,
    dilation)``); ``ceil_mode``, ``layout`` and ``return_indices`` are
    keyword-only.  Padding never wins:
    it acts as -inf (the dtype's minimum for integers).  A window picks its
    first maximum in row-major order; a window holding a NaN gives NaN (its
    last NaN, as PyTorch picks).  For example ``x`` of shape
    ``(N, 32, 15, C)`` pooled 2x1 (``kernel_size=(2, 1)``, stride defaulting
    to it) gives
    ``(N, (32 - 2) // 2 + 1, (15 - 1) // 1 + 1, C) = (N, 16, 15, C)``.

    Parameters
    ----------
    x : array_like
        Images, 4-D: ``(N, H, W, C)`` for ``layout="NHWC"``, ``(N, C, H, W)``
        for ``"NCHW"``.  float16/32/64, bfloat16 (``ml_dtypes.bfloat16``,
        pooled in float32) or any signed or unsigned integer dtype.  Not
        modified.
    kernel_size : int or (int, int)
        Window height and width, each ``>= 1``.  Here and in ``stride``,
        ``padding`` and ``dilation``, any integer NumPy accepts: NumPy
        integers, 0-d or 1-D integer arrays (``np.array([2, 1])``).
    stride : int or (int, int), optional
        Step between windows, each ``>= 1``; defaults to ``kernel_size``.
    padding : int or (int, int), optional
        Implicit -inf rows/columns on both sides, ``0 <= padding <=
        kernel_size // 2`` per axis.
    dilation : int or (int, int), optional
        Spacing between window taps, each ``>= 1``.
    ceil_mode : bool, optional
        Round the output size up (PyTorch's rule), keeping a partial last
        window.
    layout : {"NHWC", "NCHW"}, optional
        Axis order of ``x`` and of the results.
    return_indices : bool, optional
        Also return where each maximum came from.

    Returns
    -------
    out : ndarray
        Maxima of ``x``'s dtype, ``(N, OH, OW, C)`` or ``(N, C, OH, OW)``.
    indices : ndarray of int64
        Only with ``return_indices``: the flat index ``h*W + w`` of each
        maximum within its input plane, PyTorch's convention.  It can be given
        to :func:`max_pool2d_backward`.

    Raises
    ------
    ValueError
        ``x`` not 4-D; an unknown layout; sizes below 1; padding above
        ``kernel_size // 2``; a window larger than the padded input (the
        message names the arguments and sizes) or a window with no input
        element (dilation stepping over the image, or an axis of length 0
        with padding).
    TypeError
        Non-integer sizes, a non-bool flag, an unsupported dtype (bool,
        complex, ...).

    See Also
    --------
    max_pool2d_backward : the gradient with respect to ``x``.

    Notes
    -----
    On the CPU, where numba is installed (the ``jit`` extra),
    every dtype but float16 runs in loops it compiles
    (:mod:`cupyconv.pooling._fused`) rather than in NumPy's ufuncs, with the same
    results: several times faster for windows other than 2x1, and for the
    2x1 window with indices.  The first call of a process compiles them, or
    loads them from numba's cache.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyconv as cc
    >>> x = np.array([3, 1, 5, 7, 2, 2]).reshape(1, 3, 2, 1)  # NHWC
    >>> out, indices = cc.max_pool2d(x, (2, 1), return_indices=True)
    >>> out[0, :, :, 0]
    array([[5, 7]])
    >>> indices[0, :, :, 0]
    array([[2, 3]])
    >>> cc.max_pool2d(x, (2, 1), ceil_mode=True)[0, :, :, 0]
    array([[5, 7],
           [2, 2]])
    >>> cc.max_pool2d(np.arange(16.0).reshape(1, 1, 4, 4), 3, stride=1,
    ...               padding=1, layout="NCHW")[0, 0]
    array([[ 5.,  6.,  7.,  7.],
           [ 9., 10., 11., 11.],
           [13., 14., 15., 15.],
           [13., 14., 15., 15.]])
    """
    xp = _backend.dispatch(x=x)
    x = _args.native_4d(x, "x", xp)
    if _args.is_bfloat16(x.dtype):
        # Every bfloat16 is a float32, and the maxima come back exactly.
        result = max_pool2d(x.astype(numpy.float32), kernel_size, stride, padding, dilation,
                            ceil_mode=ceil_mode, layout=layout, return_indices=return_indices)
        if return_indices:
            return result[0].astype(x.dtype), result[1]
        return result.astype(x.dtype)
    if _kernels.c_type(x.dtype) is None:
        raise TypeError(
            f"x must have a float or integer dtype, got {x.dtype}")
    if not isinstance(return_indices, (bool, numpy.bool_)):
        raise TypeError(f"return_indices must be a bool, got {return_indices!r}")
    pool = _geometry.pool_geometry(x.shape, kernel_size, stride, padding, dilation,
                                  ceil_mode, layout)
    if _backend.use_kernels(xp):
        out, indices = _cuda.forward(x, pool, return_indices)
    else:
        out, indices = _cpu.forward(x, pool, return_indices)
    return (out, indices) if return_indices else out


@interoperable
def max_pool2d_backward(grad_out, x, kernel_size, stride=None, padding=0,
                        dilation=1, *, ceil_mode=False, layout="NHWC",
                        indices=None):
    """Gradient of :func:`max_pool2d` with respect to ``x``.

    The arguments come in the order of :func:`max_pool2d` after
    ``grad_out, x``; ``ceil_mode``, ``layout`` and ``indices`` are
    keyword-only.  Each window's gradient goes to the one element it
    picked (its first maximum, or last NaN) and is summed where windows
    overlap, in a fixed order, so results are deterministic.  Tied elements
    other than the pick get nothing.  Shapes: ``grad_out`` is
    ``max_pool2d(x, ...)``'s output shape; the result is ``x.shape``.

    Parameters
    ----------
    grad_out : array_like
        Gradient with respect to ``max_pool2d``'s output, of ``x``'s dtype
        (Python numbers or lists take it, as NumPy's Python scalars do).
    x : array_like
        The input of the forward call, float16/32/64 or bfloat16 (whose
        gradients are summed in float32 and rounded once).  Without ``indices``
        the picks are recomputed from it; with them only its shape is used.
    kernel_size, stride, padding, dilation, ceil_mode, layout
        As given to :func:`max_pool2d`.
    indices : array_like of int64, optional
        The indices that ``max_pool2d(..., return_indices=True)`` returned for
        the same ``x`` and arguments (as PyTorch's
        ``max_pool2d_with_indices_backward`` takes them); spares recomputing
        the picks.  An index that does not point into its own window
        contributes nothing.

    Returns
    -------
    ndarray
        The gradient with respect to ``x``: ``x``'s shape and dtype.

    Raises
    ------
    ValueError
        Any error of :func:`max_pool2d`; ``grad_out`` or ``indices`` not of
        the output's shape.
    TypeError
        ``grad_out`` and ``x`` not sharing one float dtype; ``indices`` not
        int64.

    See Also
    --------
    max_pool2d : the forward pass.

    Notes
    -----
    On the CPU, where numba is installed (the ``jit`` extra),
    the work runs in loops it compiles (:mod:`cupyconv.pooling._fused`) rather
    than in NumPy's ufuncs, with the same result bit for bit; see
    :func:`max_pool2d`.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyconv as cc
    >>> x = np.array([[1.0, 4.0, 4.0, 2.0]]).reshape(1, 1, 1, 4)  # NCHW
    >>> cc.max_pool2d_backward(np.ones((1, 1, 1, 3)), x, (1, 2), stride=1,
    ...                        layout="NCHW")[0, 0]
    array([[0., 2., 1., 0.]])
    >>> x = np.array([2.0, 2.0, 1.0, 3.0]).reshape(1, 2, 2, 1)  # NHWC
    >>> out, indices = cc.max_pool2d(x, (2, 1), return_indices=True)
    >>> cc.max_pool2d_backward(np.array([10.0, 20.0]).reshape(1, 1, 2, 1), x,
    ...                        (2, 1), indices=indices)[0, :, :, 0]
    array([[10.,  0.],
           [ 0., 20.]])
    """
    xp = _backend.dispatch(grad_out=grad_out, x=x, indices=indices)
    grad_out, x = _args.float_operands(xp, grad_out=grad_out, x=x)
    _args.check_ndim(grad_out, 4, "grad_out")
    _args.check_ndim(x, 4, "x")
    dtype = _args.common_float_dtype(bfloat16=True, grad_out=grad_out, x=x)
    if _args.is_bfloat16(dtype):
        # Picks and sums in float32 (exact picks, one rounding of each sum).
        return max_pool2d_backward(
            grad_out.astype(numpy.float32), x.astype(numpy.float32), kernel_size, stride,
            padding, dilation, ceil_mode=ceil_mode, layout=layout, indices=indices,
        ).astype(dtype)
    pool = _geometry.pool_geometry(x.shape, kernel_size, stride, padding, dilation,
                                  ceil_mode, layout)
    if grad_out.shape != pool.out_shape:
        raise ValueError(
            f"grad_out must have the output's shape {pool.out_shape}, "
            f"got {grad_out.shape}")
    if indices is not None:
        indices = _args.native(indices, xp)
        if indices.dtype != numpy.int64:
            raise TypeError(f"indices must be int64, got {indices.dtype}")
        if indices.shape != pool.out_shape:
            raise ValueError(
                f"indices must have the output's shape {pool.out_shape}, "
                f"got {indices.shape}")
    if _backend.use_kernels(xp):
        return _cuda.backward(grad_out, x, indices, pool)
    return _cpu.backward(grad_out, x, indices, pool)
