"""conv2d and its two gradients, conv2d_input and conv2d_weight.

The code: :mod:`._geometry` (sizes, padding and output size, checked once
per call), :mod:`._cpu` (the NumPy path, an im2col matrix product),
:mod:`._winograd` (the NumPy path's Winograd F(2, 3) for kernels 3 wide),
:mod:`._cuda` (launch code of ``cuda/convolution.cu``).
"""

from .. import _args, _backend
from .._interop import interoperable
from . import _cpu, _cuda, _geometry, _precision, _winograd

__all__ = ["conv2d", "conv2d_input", "conv2d_weight"]


@interoperable
def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           layout="NHWC", precision=None):
    """2-D convolution (cross-correlation, as in deep learning) with a
    rectangular kernel.

    With ``layout="NHWC"``::

        y[n, oh, ow, co] = bias[co] + sum over i, j, c of
            xpad[n, oh*sh + i*dh, ow*sw + j*dw, g*C_in/groups + c] * w[i, j, c, co]

    where ``g = co // (C_out/groups)`` is the group of output channel ``co``
    and ``xpad`` is ``x`` with ``top``/``bottom`` zero rows and
    ``left``/``right`` zero columns.  The output size is::

        OH = (H + top + bottom - dh*(kh - 1) - 1) // sh + 1
        OW = (W + left + right - dw*(kw - 1) - 1) // sw + 1

    which must be at least 1, or 0 along an axis where ``x`` has no element
    (a 1-row kernel, or ``'same'`` padding, over 0 rows gives 0 rows).  Any
    other axis may be 0 too (batch, channels): the result is then empty, or
    the bias alone where there is no input channel.  The arguments come in
    PyTorch's order (``torch.nn.functional.conv2d(input, weight, bias,
    stride, padding, dilation, groups)``); ``layout`` is keyword-only.

    Parameters
    ----------
    x : array_like
        Input, ``(N, H, W, C_in)`` for NHWC or ``(N, C_in, H, W)`` for NCHW;
        float16, bfloat16 (``ml_dtypes.bfloat16``), float32 or float64.  Any
        memory layout.
    w : array_like
        Kernel, ``(kh, kw, C_in // groups, C_out)`` for NHWC (HWIO) or
        ``(C_out, C_in // groups, kh, kw)`` for NCHW (PyTorch's); ``x``'s dtype.
    bias : array_like, optional
        ``(C_out,)``, added to every output pixel; ``x``'s dtype.  Any of
        ``x``, ``w``, ``bias`` given as Python numbers or lists (no dtype of
        their own) take the float dtype of the others, as NumPy's Python
        scalars do: ``conv2d(x32, w32, [0.5, 0.0])`` is float32.
    stride : int or (int, int), optional
        ``(sh, sw)``, each >= 1.  Here and in ``padding``, ``dilation`` and
        ``groups``, any integer NumPy accepts: NumPy integers, 0-d or 1-D
        integer arrays (``np.array([2, 1])``).
    padding : int, (int, int), ((int, int), (int, int)), 'valid' or 'same'
        Zero padding: ``p`` on every side, ``(ph, pw)`` on both sides of each
        axis, ``((top, bottom), (left, right))``, ``'valid'`` (none) or
        ``'same'``: ``OH = ceil(H / sh)``, ``OW = ceil(W / sw)``, with the
        extra row or column of an odd total at the bottom or right (as JAX and
        TensorFlow place it).  The strings may be in any case (JAX's
        ``'SAME'`` and ``'VALID'``).
    dilation : int or (int, int), optional
        ``(dh, dw)``, the spacing of kernel taps, each >= 1.
    groups : int, optional
        Channel groups (>= 1, dividing ``C_in`` and ``C_out``): output channel
        group ``g`` sees only input channel group ``g``.  ``groups = C_in``
        is a depthwise convolution.
    layout : {'NHWC', 'NCHW'}, optional
        Layout of ``x``, ``w`` and the result.
    precision : {None, 'highest', 'tf32', '3xtf32'}, optional
        Arithmetic of float32 products (ignored for other dtypes): exact
        float32 (``'highest'``), operands rounded to TF32 (``'tf32'``: 10
        mantissa bits, nearest, ties away; on the NumPy path too), or three
        TF32 products per float32 product (``'3xtf32'``; ``'highest'`` on
        the NumPy path).  ``None``: :func:`get_default_precision`, set by
        :func:`set_default_precision` and :func:`default_precision`.

    Returns
    -------
    ndarray
        ``(N, OH, OW, C_out)`` for NHWC or ``(N, C_out, OH, OW)`` for NCHW, a
        new C-contiguous array of ``x``'s dtype on ``x``'s device.  float16
        products are accumulated in float32.

    Raises
    ------
    ValueError
        ``x`` or ``w`` not 4-D; ``w``'s input channels times ``groups``
        differing from ``x``'s channels; ``groups`` not dividing ``C_in`` or
        ``C_out``; ``groups``, ``stride`` or ``dilation`` below 1; negative
        ``padding`` or an unknown padding string; a dilated kernel longer
        than the padded input (the message names the arguments and sizes);
        ``bias`` not of shape ``(C_out,)``; an unknown ``layout`` or
        ``precision``.
    TypeError
        Integer or differing dtypes of ``x``, ``w``, ``bias``; non-integer
        ``stride``, ``padding``, ``dilation`` or ``groups``; CuPy arrays mixed
        with NumPy arrays.

    See Also
    --------
    conv2d_input, conv2d_weight : the gradients with respect to ``x`` and ``w``.

    Examples
    --------
    A 3x2 kernel of ones sums each 3x2 patch; ``4 - 3 + 1 = 2`` rows and
    ``4 - 2 + 1 = 3`` columns come out:

    >>> import numpy as np
    >>> import cupyconv as cc
    >>> x = np.arange(16.0).reshape(1, 4, 4, 1)
    >>> w = np.ones((3, 2, 1, 1))
    >>> cc.conv2d(x, w)[0, :, :, 0]
    array([[27., 33., 39.],
           [51., 57., 63.]])

    ``'same'`` padding with stride 2 gives ``ceil(7 / 2) = 4`` rows and
    ``ceil(5 / 2) = 3`` columns, here in PyTorch's layout:

    >>> x = np.ones((2, 3, 7, 5), dtype=np.float32)
    >>> w = np.ones((8, 3, 5, 3), dtype=np.float32)
    >>> cc.conv2d(x, w, stride=2, padding="same", layout="NCHW").shape
    (2, 8, 4, 3)
    """
    xp = _backend.dispatch(x=x, w=w, bias=bias)
    x, w, bias = _args.float_operands(xp, x=x, w=w, bias=bias)
    _args.check_ndim(x, 4, "x")
    _args.check_ndim(w, 4, "w")
    geom = _geometry.conv2d_geometry(x.shape, w.shape, stride, padding, dilation,
                                 groups, layout)
    _args.common_float_dtype(bfloat16=True, x=x, w=w, bias=bias)
    if bias is not None and bias.shape != (geom.out_channels,):
        raise ValueError(
            f"bias must have shape (C_out,) = ({geom.out_channels},), "
            f"got {tuple(bias.shape)}"
        )
    precision = _precision.resolve(precision, x.dtype)
    if _backend.use_kernels(xp):
        return _cuda.forward(x, w, bias, geom, precision)
    x, w = _precision.rounded_operands(precision, x, w)
    return _cpu_path(geom, x.dtype).forward(x, w, bias, geom)


@interoperable
def conv2d_input(input_shape, w, grad_out, stride=1, padding=0, dilation=1,
                 groups=1, *, layout="NHWC", precision=None):
    """Gradient of a :func:`conv2d` with respect to its input ``x``.

    Returns ``d/dx sum(conv2d(x, w, ...) * grad_out)``, which does not depend
    on ``x``, only on its shape (the name follows
    ``torch.nn.grad.conv2d_input``).  Input pixels that no kernel tap reads
    (a stride larger than the dilated kernel steps over them) get zero.  The
    gradient with respect to ``bias`` needs no function: it is ``grad_out``
    summed over N, H and W.

    Parameters
    ----------
    input_shape : sequence of int
        Shape of ``x``, in ``layout``: a tuple, a list or a 1-D integer array
        (``np.array(x.shape)``).  With ``padding='same'`` the padding is
        worked out from it, as :func:`conv2d` did.
    w : array_like
        Kernel of the convolution, as for :func:`conv2d`.
    grad_out : array_like
        Gradient with respect to the convolution's output: the output's
        shape, ``(N, OH, OW, C_out)`` or ``(N, C_out, OH, OW)``; ``w``'s dtype
        (Python numbers or lists take it).
    stride, padding, dilation, groups, layout, precision
        As for :func:`conv2d`.

    Returns
    -------
    ndarray
        ``input_shape``, ``w``'s dtype, on ``w``'s device.

    Raises
    ------
    ValueError
        ``input_shape`` without 4 entries or with a negative one; ``grad_out``
        not of the convolution's output shape; anything :func:`conv2d` rejects
        in its ``x`` and ``w``.
    TypeError
        A non-integer ``input_shape`` entry; integer or differing dtypes of
        ``w`` and ``grad_out``; the argument types :func:`conv2d` rejects.

    See Also
    --------
    conv2d, conv2d_weight

    Examples
    --------
    With all-ones kernel and gradient, each input pixel gets the number of
    3x3 windows that cover it; ``grad_out`` summed over N, H, W is the
    gradient of the bias:

    >>> import numpy as np
    >>> import cupyconv as cc
    >>> w = np.ones((3, 3, 1, 1))
    >>> grad_out = np.ones((1, 2, 2, 1))  # (4 - 3 + 1) x (4 - 3 + 1)
    >>> cc.conv2d_input((1, 4, 4, 1), w, grad_out)[0, :, :, 0]
    array([[1., 2., 2., 1.],
           [2., 4., 4., 2.],
           [2., 4., 4., 2.],
           [1., 2., 2., 1.]])
    >>> grad_out.sum(axis=(0, 1, 2))  # the bias gradient (NCHW: axis=(0, 2, 3))
    array([4.])
    """
    xp = _backend.dispatch(w=w, grad_out=grad_out)
    w, grad_out = _args.float_operands(xp, w=w, grad_out=grad_out)
    _args.check_ndim(w, 4, "w")
    input_shape = _args.shape_arg(input_shape, 4, "input_shape")
    geom = _geometry.conv2d_geometry(input_shape, w.shape, stride, padding,
                                 dilation, groups, layout, x_name="input_shape")
    _geometry.check_grad_out(grad_out, geom)
    _args.common_float_dtype(bfloat16=True, w=w, grad_out=grad_out)
    precision = _precision.resolve(precision, w.dtype)
    if _backend.use_kernels(xp):
        return _cuda.input_grad(w, grad_out, geom, precision)
    w, grad_out = _precision.rounded_operands(precision, w, grad_out)
    return _cpu_path(geom, w.dtype).input_grad(w, grad_out, geom)


@interoperable
def conv2d_weight(x, weight_shape, grad_out, stride=1, padding=0,
                  dilation=1, groups=1, *, layout="NHWC", precision=None):
    """Gradient of a :func:`conv2d` with respect to its kernel ``w``.

    Returns ``d/dw sum(conv2d(x, w, ...) * grad_out)``, which does not depend
    on ``w``, only on its shape (the name follows
    ``torch.nn.grad.conv2d_weight``).  The gradient with respect to ``bias``
    is ``grad_out`` summed over N, H and W.

    Parameters
    ----------
    x : array_like
        Input of the convolution, as for :func:`conv2d`.
    weight_shape : sequence of int
        Shape of ``w``, in ``layout`` (a tuple, a list, a 1-D integer
        array): ``(kh, kw, C_in // groups, C_out)`` or
        ``(C_out, C_in // groups, kh, kw)``.
    grad_out : array_like
        Gradient with respect to the convolution's output, of its shape;
        ``x``'s dtype (Python numbers or lists take it).
    stride, padding, dilation, groups, layout, precision
        As for :func:`conv2d`.

    Returns
    -------
    ndarray
        ``weight_shape``, ``x``'s dtype, on ``x``'s device.

    Raises
    ------
    ValueError
        ``weight_shape`` without 4 entries, with a negative entry or a kernel
        below 1x1; ``grad_out`` not of the convolution's output shape;
        anything :func:`conv2d` rejects in its ``x`` and ``w``.
    TypeError
        A non-integer ``weight_shape`` entry; integer or differing dtypes of
        ``x`` and ``grad_out``; the argument types :func:`conv2d` rejects.

    See Also
    --------
    conv2d, conv2d_input

    Examples
    --------
    Tap ``(i, j)`` of the kernel gets the sum of the input pixels it
    multiplied, weighted by ``grad_out``; here two 2x2 outputs of a 2x3
    kernel over a 3x4 image, with PyTorch's layout:

    >>> import numpy as np
    >>> import cupyconv as cc
    >>> x = np.arange(12.0).reshape(1, 1, 3, 4)
    >>> grad_out = np.ones((1, 1, 2, 2))  # (3 - 2 + 1) x (4 - 3 + 1)
    >>> cc.conv2d_weight(x, (1, 1, 2, 3), grad_out, layout="NCHW")
    array([[[[10., 14., 18.],
             [26., 30., 34.]]]])
    >>> grad_out.sum(axis=(0, 2, 3))  # the bias gradient
    array([4.])
    """
    xp = _backend.dispatch(x=x, grad_out=grad_out)
    x, grad_out = _args.float_operands(xp, x=x, grad_out=grad_out)
    _args.check_ndim(x, 4, "x")
    weight_shape = _args.shape_arg(weight_shape, 4, "weight_shape")
    geom = _geometry.conv2d_geometry(x.shape, weight_shape, stride, padding,
                                 dilation, groups, layout, w_name="weight_shape")
    _geometry.check_grad_out(grad_out, geom)
    _args.common_float_dtype(bfloat16=True, x=x, grad_out=grad_out)
    precision = _precision.resolve(precision, x.dtype)
    if _backend.use_kernels(xp):
        return _cuda.weight_grad(x, grad_out, geom, precision)
    x, grad_out = _precision.rounded_operands(precision, x, grad_out)
    return _cpu_path(geom, x.dtype).weight_grad(x, grad_out, geom)


def _cpu_path(geom, dtype):
    """The NumPy path's module: Winograd's F(2, 3) where it applies
    (:func:`._winograd.applies`), else im2col."""
    return _winograd if _winograd.applies(geom, dtype) else _cpu
