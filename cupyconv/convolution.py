"""conv2d and its two gradients, conv2d_input and conv2d_weight.

The NumPy path treats convolution as a matrix product ("im2col"), like
Chainer's ``chainer.utils.conv``.  The input is copied once into a zero-padded,
channels-last buffer (which also upcasts float16 and undoes NCHW).  Then, one
block of output pixels at a time, the patch every output pixel reads is
gathered into a matrix with one row per pixel and one column per (tap,
channel) of a group -- one strided copy from a windowed view of the input,
into a matrix stored row by row, or column by column when there are only a
few channels per group -- and a single BLAS product per group gives the
block's output.  Blocks hold a few MiB, so the gathered matrix stays in cache
and peak memory stays near the size of the input plus the output, whatever
the kernel size.  The blocks are shared among the cores, each running its
own gathers and single-threaded products (see :mod:`cupyconv._parallel`).

The gradients reuse the same tap geometry: ``conv2d_weight`` multiplies the
gathered matrix's transpose by ``grad_out``; ``conv2d_input`` multiplies
``grad_out`` by the weights' transpose and adds each tap's columns back where
they were gathered from ("col2im"), so input pixels that no tap reads (the
stride skips them) get zero gradient.
"""

import math

import numpy

from . import _args, _backend, _parallel

__all__ = ["conv2d", "conv2d_input", "conv2d_weight"]

#: Elements of the gathered matrix per block (2 MiB of float32): peak memory
#: stays bounded for any input, the block stays near its core's caches
#: between the gather and the product, and BLAS calls stay few.  Measured on
#: 2 cores, blocks shared among them (seed layer 2 forward, ResNet 3x3
#: forward): 40.8 / 11.4 ms at 2**19 against 41.1 / 11.9 ms at 2**20 and
#: 41.7 / 11.7 ms at 2**18.
_BLOCK_ELEMENTS = 2**19

#: Blocks per core to aim for (see :func:`_blocks`), so that a core that
#: finishes early takes another, and smallest block worth splitting work
#: into: below it per-call overheads would eat the gain.  Each block also
#: costs its thread a wait for the GIL now and then, tens of microseconds
#: when the other thread holds it and this core has gone idle.  Measured on
#: 2 cores (seed layer 1 / 20-day layer 1 / layer 2 at N=4, forward): 1.16 /
#: 0.93 / 1.50 ms at 2 blocks per core against 1.22 / 0.99 / 1.55 ms at 4;
#: 1 per core is faster still but leaves a slowed core nothing to hand over.
_BLOCKS_PER_CORE = 2
_MIN_SHARED_BLOCK_ELEMENTS = 2**16

#: Products whose reduction is at most this long (the first layer of a CNN:
#: ``kh*kw*C_in`` = 15 for the seed's) are bound by writing their output,
#: which OpenBLAS first clears and then adds to.  They run as a stack of row
#: chunks whose output takes about ``_CHUNK_OUTPUT_BYTES``, so that both
#: passes stay in the core's L2 cache (one call still: the stack is looped
#: over in C).  Measured on 2 cores, forward: seed layer 1 1.34 -> 1.16 ms,
#: 20-day layer 1 1.07 -> 0.93 ms; 64 and 256 KiB chunks do about as well.
_SHORT_REDUCTION = 32
_CHUNK_OUTPUT_BYTES = 1 << 17

#: Most input channels per group for which gathers are laid out tap-major
#: (see :func:`_gather_tap_major`).
_TAP_MAJOR_MAX_CHANNELS = 4


def conv2d(x, w, bias=None, *, stride=1, padding=0, dilation=1, groups=1,
           layout="NHWC"):
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

    Parameters
    ----------
    x : array_like
        Input, ``(N, H, W, C_in)`` for NHWC or ``(N, C_in, H, W)`` for NCHW;
        float16, float32 or float64.  Any memory layout.
    w : array_like
        Kernel, ``(kh, kw, C_in // groups, C_out)`` for NHWC (HWIO) or
        ``(C_out, C_in // groups, kh, kw)`` for NCHW (PyTorch's); ``x``'s dtype.
    bias : array_like, optional
        ``(C_out,)``, added to every output pixel; ``x``'s dtype.
    stride : int or (int, int), optional
        ``(sh, sw)``, each >= 1.
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
        ``padding`` or an unknown padding string; an output size below 1;
        ``bias`` not of shape ``(C_out,)``; an unknown ``layout``.
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
    x, w = _args.native_4d(x, "x", xp), _args.native_4d(w, "w", xp)
    bias = None if bias is None else _args.native(bias, xp)
    geom = _args.conv2d_geometry(x.shape, w.shape, stride, padding, dilation,
                                 groups, layout)
    _args.common_float_dtype(x=x, w=w, bias=bias)
    if bias is not None and bias.shape != (geom.out_channels,):
        raise ValueError(
            f"bias must have shape (C_out,) = ({geom.out_channels},), "
            f"got {tuple(bias.shape)}"
        )
    if _backend.use_kernels(xp):
        from . import _conv2d_cuda

        return _conv2d_cuda.conv2d_forward(x, w, bias, geom)
    return _forward(x, w, bias, geom)


def conv2d_input(input_shape, w, grad_out, *, stride=1, padding=0, dilation=1,
                 groups=1, layout="NHWC"):
    """Gradient of a :func:`conv2d` with respect to its input ``x``.

    Returns ``d/dx sum(conv2d(x, w, ...) * grad_out)``, which does not depend
    on ``x``, only on its shape (the name follows
    ``torch.nn.grad.conv2d_input``).  Input pixels that no kernel tap reads
    (a stride larger than the dilated kernel steps over them) get zero.  The
    gradient with respect to ``bias`` needs no function: it is ``grad_out``
    summed over N, H and W.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of ``x``, in ``layout``.  With ``padding='same'`` the padding is
        worked out from it, as :func:`conv2d` did.
    w : array_like
        Kernel of the convolution, as for :func:`conv2d`.
    grad_out : array_like
        Gradient with respect to the convolution's output: the output's
        shape, ``(N, OH, OW, C_out)`` or ``(N, C_out, OH, OW)``; ``w``'s dtype.
    stride, padding, dilation, groups, layout
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
    w, grad_out = _args.native_4d(w, "w", xp), _args.native(grad_out, xp)
    input_shape = _args.shape_arg(input_shape, 4, "input_shape")
    geom = _args.conv2d_geometry(input_shape, w.shape, stride, padding,
                                 dilation, groups, layout, x_name="input_shape")
    _check_grad_out(grad_out, geom)
    _args.common_float_dtype(w=w, grad_out=grad_out)
    if _backend.use_kernels(xp):
        from . import _conv2d_cuda

        return _conv2d_cuda.conv2d_input_grad(w, grad_out, geom)
    return _input_grad(w, grad_out, geom)


def conv2d_weight(x, weight_shape, grad_out, *, stride=1, padding=0,
                  dilation=1, groups=1, layout="NHWC"):
    """Gradient of a :func:`conv2d` with respect to its kernel ``w``.

    Returns ``d/dw sum(conv2d(x, w, ...) * grad_out)``, which does not depend
    on ``w``, only on its shape (the name follows
    ``torch.nn.grad.conv2d_weight``).  The gradient with respect to ``bias``
    is ``grad_out`` summed over N, H and W.

    Parameters
    ----------
    x : array_like
        Input of the convolution, as for :func:`conv2d`.
    weight_shape : tuple of int
        Shape of ``w``, in ``layout``: ``(kh, kw, C_in // groups, C_out)`` or
        ``(C_out, C_in // groups, kh, kw)``.
    grad_out : array_like
        Gradient with respect to the convolution's output, of its shape;
        ``x``'s dtype.
    stride, padding, dilation, groups, layout
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
    x, grad_out = _args.native_4d(x, "x", xp), _args.native(grad_out, xp)
    weight_shape = _args.shape_arg(weight_shape, 4, "weight_shape")
    geom = _args.conv2d_geometry(x.shape, weight_shape, stride, padding,
                                 dilation, groups, layout, w_name="weight_shape")
    _check_grad_out(grad_out, geom)
    _args.common_float_dtype(x=x, grad_out=grad_out)
    if _backend.use_kernels(xp):
        from . import _conv2d_cuda

        return _conv2d_cuda.conv2d_weight_grad(x, grad_out, geom)
    return _weight_grad(x, grad_out, geom)


def _check_grad_out(grad_out, geom):
    if tuple(grad_out.shape) != geom.out_shape:
        raise ValueError(
            f"grad_out must have the convolution's output shape "
            f"{geom.out_shape} ({geom.layout}), got {tuple(grad_out.shape)}"
        )


# --- NumPy path -------------------------------------------------------------


def _forward(x, w, bias, geom):
    work = _work_dtype(x.dtype)
    padded = _padded_input(x, geom, work)
    weights = _weight_matrices(w, geom, work)
    y = numpy.empty(geom.out_shape, work)
    if bias is not None:
        bias = bias.astype(work, copy=False)
        if geom.layout == "NCHW":
            bias = bias[:, None, None]
    tap_major = _gather_tap_major(geom)

    def block(ranges, scratch):
        images, rows = ranges
        cols = _gathered(scratch, geom, images, rows, work, tap_major)
        y_block = _output_block(y, geom, images, rows)
        _im2col(padded, geom, images, rows, cols)
        _matmul_into(_group_matrices(cols, geom), weights,
                     _group_matrices(y_block, geom, geom.layout == "NHWC"))
        if bias is not None:
            y_block += bias  # while the block is still in cache

    _parallel.for_each_block(block, _blocks(geom))
    return y.astype(x.dtype, copy=False)


def _input_grad(w, grad_out, geom):
    work = _work_dtype(w.dtype)
    weights_t = _weight_matrices(w, geom, work).swapaxes(1, 2)
    grad_out = grad_out.astype(work, copy=False)
    grad_padded = numpy.zeros(_padded_shape(geom), work)

    def image_blocks(blocks, scratch):
        # Bands of one image overlap in the input rows they add to: one
        # thread does all of an image's blocks.
        for images, rows in blocks:
            cols = _gathered(scratch, geom, images, rows, work, tap_major=False)
            g_block = _output_block(grad_out, geom, images, rows)
            _matmul_into(_group_matrices(g_block, geom, geom.layout == "NHWC"),
                         weights_t, _group_matrices(cols, geom))
            _col2im(cols, grad_padded, geom, images, rows)

    per_image = {}
    for images, rows in _blocks(geom):
        per_image.setdefault(images, []).append((images, rows))
    _parallel.for_each_block(image_blocks, list(per_image.values()))
    grad_x = _interior(grad_padded, geom)
    if geom.layout == "NCHW":
        grad_x = grad_x.transpose(0, 3, 1, 2)
    return numpy.ascontiguousarray(grad_x, dtype=w.dtype)


def _weight_grad(x, grad_out, geom):
    work = _work_dtype(x.dtype)
    padded = _padded_input(x, geom, work)
    grad_out = grad_out.astype(work, copy=False)
    groups, taps = geom.groups, geom.kernel[0] * geom.kernel[1]
    shape = (groups, taps * geom.in_channels // groups, geom.out_channels // groups)
    tap_major = _gather_tap_major(geom)

    def block(ranges, scratch):
        images, rows = ranges
        cols = _gathered(scratch, geom, images, rows, work, tap_major)
        _im2col(padded, geom, images, rows, cols)
        g_block = _output_block(grad_out, geom, images, rows)
        product = numpy.matmul(
            _group_matrices(cols, geom).swapaxes(-1, -2),
            _group_matrices(g_block, geom, geom.layout == "NHWC"),
        )
        # NCHW blocks hold one product per image: sum them.
        product = product.sum(axis=tuple(range(product.ndim - 3)))
        if "grad" in scratch:
            scratch["grad"] += product
        else:
            scratch["grad"] = product

    grad = numpy.zeros(shape, work)
    # Fixed shares: the sum over blocks is then the same on every run.
    for scratch in _parallel.for_each_block(block, _blocks(geom), fixed_shares=True):
        grad += scratch.get("grad", 0)
    return _weight_from_matrices(grad, geom, x.dtype)


def _work_dtype(dtype):
    """float16 is computed in float32 (accumulating as the GPU kernels do)."""
    return numpy.dtype(numpy.float32) if dtype == numpy.float16 else dtype


def _padded_shape(geom):
    """``(N, H + top + bottom, W + left + right, C_in)``, channels last: the
    NumPy path's padded copy (the kernels never make one)."""
    (top, bottom), (left, right) = geom.padding
    h, w = geom.in_hw
    shape = (geom.batch, h + top + bottom, w + left + right, geom.in_channels)
    _args.check_elements(shape, "padding: the input padded")
    return shape


def _interior(padded, geom):
    """The ``(N, H, W, C_in)`` part of a padded buffer that is not padding."""
    (top, _), (left, _) = geom.padding
    h, w = geom.in_hw
    return padded[:, top:top + h, left:left + w]


def _padded_input(x, geom, dtype):
    """``x`` zero-padded, channels last, in ``dtype`` (``x`` itself if it
    already is all three)."""
    if geom.layout == "NCHW":
        x = x.transpose(0, 2, 3, 1)
    if geom.padding == ((0, 0), (0, 0)):
        return x.astype(dtype, copy=False)
    padded = numpy.zeros(_padded_shape(geom), dtype)
    _interior(padded, geom)[...] = x
    return padded


def _weight_matrices(w, geom, dtype):
    """``w`` as ``(groups, kh*kw*C_in/groups, C_out/groups)``: row
    ``(i, j, c)`` of group ``g``'s matrix multiplies input channel
    ``g*C_in/groups + c`` at tap ``(i, j)``, matching the columns of
    :func:`_im2col`."""
    if geom.layout == "NCHW":
        w = w.transpose(2, 3, 1, 0)  # to (kh, kw, C_in/groups, C_out)
    kh, kw, cin_per_group, c_out = w.shape
    groups = geom.groups
    per_group = w.reshape(kh, kw, cin_per_group, groups, c_out // groups)
    return numpy.ascontiguousarray(
        per_group.transpose(3, 0, 1, 2, 4), dtype=dtype
    ).reshape(groups, kh * kw * cin_per_group, c_out // groups)


def _weight_from_matrices(matrices, geom, dtype):
    """Inverse of :func:`_weight_matrices`: the kernel in ``geom.layout``."""
    groups, _, cout_per_group = matrices.shape
    kh, kw = geom.kernel
    w = matrices.reshape(groups, kh, kw, geom.in_channels // groups,
                         cout_per_group).transpose(1, 2, 3, 0, 4)
    w = w.reshape(kh, kw, geom.in_channels // groups, geom.out_channels)
    if geom.layout == "NCHW":
        w = w.transpose(3, 2, 0, 1)
    return numpy.ascontiguousarray(w, dtype=dtype)


def _gather_tap_major(geom):
    """Whether to lay gathered matrices out tap-major (see :func:`_blocks`):
    with few channels per group, a pixel-major row is copied in runs of only
    ``kw*C_in/groups`` elements, while a tap-major row is a shifted image
    copied in runs of ``OW``.  Measured on 2 cores: 1.9x faster forwards and
    1.6x faster weight gradients at 1 channel, break-even near 4.  The input
    gradient's scatter-add back from the matrix is slower tap-major at every
    channel count, so it always uses pixel-major."""
    return geom.in_channels // geom.groups <= _TAP_MAJOR_MAX_CHANNELS


def _blocks(geom):
    """Tile the output into blocks whose gathered matrix has about
    ``_BLOCK_ELEMENTS`` entries -- whole images when one fits, else bands of
    output rows of one image -- and at least ``_BLOCKS_PER_CORE`` blocks per
    core where the work allows (blocks are shared among the cores, see
    :mod:`cupyconv._parallel`).  Returns their ``(images, rows)`` index
    ranges."""
    oh, ow = geom.out_hw
    kh, kw = geom.kernel
    per_row = max(1, ow * kh * kw * geom.in_channels)
    total = geom.batch * oh * per_row
    elements = min(_BLOCK_ELEMENTS,
                   max(_MIN_SHARED_BLOCK_ELEMENTS,
                       total // (_BLOCKS_PER_CORE * _parallel.CPUS)))
    rows = max(1, elements // per_row)
    if rows >= oh:
        step = rows // oh
        return [((n, min(n + step, geom.batch)), (0, oh))
                for n in range(0, geom.batch, step)]
    return [((n, n + 1), (r, min(r + rows, oh)))
            for n in range(geom.batch) for r in range(0, oh, rows)]


def _gathered(scratch, geom, images, rows, dtype, tap_major):
    """An uninitialised gathered matrix for a block (see :func:`_cols_shape`),
    in a buffer that ``scratch`` (one thread's) keeps for all its blocks:
    fresh pages per block would cost more than the gather itself.

    The matrix is a view with the same axes either way; ``tap_major`` only
    changes its memory order, from pixels outermost (each row contiguous) to
    columns outermost (each column contiguous).  BLAS takes either order
    without a copy."""
    shape = _cols_shape(geom, images, rows)
    size = math.prod(shape)
    buffer = scratch.get("cols")
    if buffer is None or buffer.size < size:
        buffer = scratch["cols"] = numpy.empty(size, dtype)
    cols = buffer[:size]
    if tap_major:
        cols = cols.reshape(shape[-1:] + shape[:-1]).transpose(1, 2, 3, 0)
    return cols.reshape(shape)


def _output_block(a, geom, images, rows):
    """The part of an output-shaped array (``y`` or ``grad_out``) in a block."""
    (n0, n1), (r0, r1) = images, rows
    if geom.layout == "NHWC":
        return a[n0:n1, r0:r1]
    return a[n0:n1, :, r0:r1]


def _cols_shape(geom, images, rows):
    """Shape of a block's gathered matrix, ``(n, r, OW, groups*kh*kw*C_in/groups)``."""
    (n0, n1), (r0, r1) = images, rows
    kh, kw = geom.kernel
    return (n1 - n0, r1 - r0, geom.out_hw[1], kh * kw * geom.in_channels)


def _windows(padded, geom, images, rows):
    """The padded input pixels a block's output pixels read, as a strided view
    (nothing is copied) of shape ``(n, r, OW, groups, kh, kw, C_in/groups)``:
    element ``(n, r, ow, g, i, j, c)`` is padded pixel
    ``((r0 + r)*sh + i*dh, ow*sw + j*dw)``, channel ``g*C_in/groups + c``."""
    (n0, n1), (r0, r1) = images, rows
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    (kh, kw), groups = geom.kernel, geom.groups
    cin_per_group = geom.in_channels // groups
    source = padded[n0:n1, r0 * sh:]
    s_n, s_h, s_w, s_c = source.strides
    # Along an axis with one output the stride is never applied; leaving it
    # out keeps a huge stride from overflowing the view's byte strides.
    step_h = s_h * sh if r1 - r0 > 1 else 0
    step_w = s_w * sw if geom.out_hw[1] > 1 else 0
    return numpy.lib.stride_tricks.as_strided(
        source,
        shape=(n1 - n0, r1 - r0, geom.out_hw[1], groups, kh, kw, cin_per_group),
        strides=(s_n, step_h, step_w, s_c * cin_per_group, s_h * dh, s_w * dw, s_c),
    )


def _as_taps(cols, geom):
    """A gathered matrix ``(n, r, OW, groups*kh*kw*C_in/groups)`` seen with the
    axes of :func:`_windows`."""
    kh, kw = geom.kernel
    groups = geom.groups
    return cols.reshape(cols.shape[:3] + (groups, kh, kw, geom.in_channels // groups))


def _im2col(padded, geom, images, rows, cols):
    """Gather a block's patches into ``cols``, ``(n, r, OW, groups*kh*kw*C_in/groups)``,
    row ``(n, oh, ow)`` holding, per group, the ``(i, j, c)`` inputs that
    output pixel multiplies with :func:`_weight_matrices`' rows.  One copy
    from the windowed view: its inner ``(kw, C)`` run is contiguous in
    memory when ``dw == 1``, several times faster than a copy per tap."""
    numpy.copyto(_as_taps(cols, geom), _windows(padded, geom, images, rows))


def _col2im(cols, grad_padded, geom, images, rows):
    """Adjoint of :func:`_im2col`: add every column back onto the padded
    input pixel it was gathered from, one tap at a time (the windows of
    different taps overlap; within one tap they do not)."""
    windows = _windows(grad_padded, geom, images, rows)
    taps = _as_taps(cols, geom)
    kh, kw = geom.kernel
    for i in range(kh):
        for j in range(kw):
            windows[:, :, :, :, i, j] += taps[:, :, :, :, i, j]


def _group_matrices(a, geom, channels_last=True):
    """View a block ``(n, r, OW, C)`` (or ``(n, C, r, OW)``) as one matrix
    per channel group with a row per output pixel: ``(groups, n*r*OW,
    C/groups)`` for NHWC convolutions, ``(n, groups, r*OW, C/groups)`` for
    NCHW ones, whose outputs are contiguous per image, not across images."""
    groups = geom.groups
    if channels_last:
        n, r, ow, c = a.shape
        per_image = a.reshape(n, r * ow, groups, c // groups).swapaxes(1, 2)
    else:
        n, c, r, ow = a.shape
        per_image = a.reshape(n, groups, c // groups, r * ow).swapaxes(2, 3)
    if geom.layout == "NCHW":
        return per_image
    return per_image.swapaxes(0, 1).reshape(groups, n * r * ow, c // groups)


def _matmul_into(a, b, out):
    """``out[...] = a @ b`` with BLAS writing ``out`` in place: when ``out``'s
    rows are not contiguous, compute ``out.T = b.T @ a.T`` instead.

    A product with a short reduction (see :data:`_SHORT_REDUCTION`) runs as
    a stack of row chunks whose output fits in a core's cache, still in one
    call."""
    if out.strides[-1] != out.itemsize:
        a, b, out = b.swapaxes(-1, -2), a.swapaxes(-1, -2), out.swapaxes(-1, -2)
    rows, depth = a.shape[-2:]
    chunk = max(1, _CHUNK_OUTPUT_BYTES // (out.shape[-1] * out.itemsize))
    if depth <= _SHORT_REDUCTION and rows >= 2 * chunk:
        whole = rows // chunk * chunk
        numpy.matmul(_row_chunks(a[..., :whole, :], chunk), b[..., None, :, :],
                     out=_row_chunks(out[..., :whole, :], chunk))
        if whole == rows:
            return
        a, out = a[..., whole:, :], out[..., whole:, :]
    numpy.matmul(a, b, out=out)


def _row_chunks(m, chunk):
    """Matrices ``m`` (..., rows, cols) as (..., rows/chunk, chunk, cols): a
    view, as splitting one axis always is."""
    return m.reshape(m.shape[:-2] + (m.shape[-2] // chunk, chunk, m.shape[-1]))
