"""The NumPy path of conv2d and its two gradients.

It treats convolution as a matrix product ("im2col"), like
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

Kernels 3 wide with stride 1 along W and enough channels take
:mod:`._winograd` instead, which builds on these blocks.
"""

import math

import numpy

from .. import _args, _kernels, _parallel

#: Elements of the gathered matrix per block (2 MiB of float32): peak memory
#: stays bounded for any input, the block stays near its core's caches
#: between the gather and the product, and BLAS calls stay few (figures:
#: docs/kernels.rst, convolution's design notes).
_BLOCK_ELEMENTS = 2**19

#: Blocks per core to aim for (see :func:`_blocks`), so that a core that
#: finishes early takes another, and smallest block worth splitting work
#: into: below it per-call overheads would eat the gain.  Each block also
#: costs its thread a wait for the GIL now and then; 1 block per core would
#: leave a slowed core nothing to hand over (figures: docs/kernels.rst).
_BLOCKS_PER_CORE = 2
_MIN_SHARED_BLOCK_ELEMENTS = 2**16

#: Products whose reduction is at most this long (the first layer of a CNN:
#: ``kh*kw*C_in`` = 15 for the seed's) are bound by writing their output,
#: which OpenBLAS first clears and then adds to.  They run as a stack of row
#: chunks whose output takes about ``_CHUNK_OUTPUT_BYTES``, so that both
#: passes stay in the core's L2 cache (one call still: the stack is looped
#: over in C; figures: docs/kernels.rst).
_SHORT_REDUCTION = 32
_CHUNK_OUTPUT_BYTES = 1 << 17

#: Most input channels per group for which gathers are laid out tap-major
#: (see :func:`_gather_tap_major`).
_TAP_MAJOR_MAX_CHANNELS = 4


# --- NumPy path -------------------------------------------------------------


def forward(x, w, bias, geom):
    work = _kernels.accumulator_dtype(x.dtype)
    padded = _padded_input(x, geom, work)
    weights = _weight_matrices(w, geom, work)
    y = numpy.empty(geom.out_shape, work)
    bias = _bias_to_add(bias, geom, work)
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


def input_grad(w, grad_out, geom):
    work = _kernels.accumulator_dtype(w.dtype)
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


def weight_grad(x, grad_out, geom):
    work = _kernels.accumulator_dtype(x.dtype)
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
        part = scratch.zeros("grad", shape, work)
        part += product

    grad = numpy.zeros(shape, work)
    # Fixed shares: the sum over blocks is then the same on every run.
    for scratch in _parallel.for_each_block(block, _blocks(geom), fixed_shares=True):
        grad += scratch.zeros("grad", shape, work)  # zeros if it took no block
    return _weight_from_matrices(grad, geom, x.dtype)


def _bias_to_add(bias, geom, dtype):
    """``bias`` in ``dtype``, shaped to add to an output block (None stays None)."""
    if bias is None:
        return None
    bias = bias.astype(dtype, copy=False)
    return bias[:, None, None] if geom.layout == "NCHW" else bias


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
    copied in runs of ``OW``.  The input gradient's scatter-add back from the
    matrix is slower tap-major at every channel count, so it always uses
    pixel-major (figures: docs/kernels.rst, convolution's design notes)."""
    return geom.in_channels // geom.groups <= _TAP_MAJOR_MAX_CHANNELS


def _blocks(geom):
    """Tile the output into blocks whose gathered matrix has about
    ``_BLOCK_ELEMENTS`` entries -- whole images when one fits, else bands of
    output rows of one image -- and at least ``_BLOCKS_PER_CORE`` blocks per
    core where the work allows (blocks are shared among the cores, see
    :mod:`cupyconv._parallel`).  Returns their ``(images, rows)`` index
    ranges; none when the output has no row."""
    oh, ow = geom.out_hw
    if oh == 0:
        return []
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
    cols = scratch.get("cols", (size,), dtype)
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
    chunk = max(1, _CHUNK_OUTPUT_BYTES // max(1, out.shape[-1] * out.itemsize))
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
