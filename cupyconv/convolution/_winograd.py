"""Winograd's F(2, 3) along W on the NumPy path: conv2d and its two gradients
for kernels 3 wide with stride 1 and no dilation along W, in the blocks of
:mod:`._cpu` with two thirds of its multiplications.

Output columns come in pairs ``(2t, 2t + 1)``.  With ``d_q`` the padded
input column ``2t + q`` (``q = 0..3``) and ``g_j`` the kernel's column
``j``, each seen over the ``kh`` rows of the window and a group's channels
(the rows of :mod:`._cpu`'s gathered and weight matrices)::

    y[2t]     = d0 @ g0 + d1 @ g1 + d2 @ g2
    y[2t + 1] = d1 @ g0 + d2 @ g1 + d3 @ g2

take four products instead of six::

    V0 = d0 - d2        V1 = d1 + d2        V2 = d2 - d1        V3 = d3 - d1
    U0 = g0      U1 = (g0 + g1 + g2)/2      U2 = (g0 - g1 + g2)/2      U3 = g2
    M_k = V_k @ U_k
    y[2t] = M0 + M1 + M2        y[2t + 1] = M1 - M2 + M3

An odd ``OW`` gets one more zero column of padding and its last pair's
second column is dropped.  The gradients are the adjoints of these linear
maps, for ``gy`` the gradient of ``y``::

    gM0 = gy[2t]   gM1 = gy[2t] + gy[2t + 1]   gM2 = gy[2t] - gy[2t + 1]   gM3 = gy[2t + 1]
    weight:  gU_k = sum over pairs of V_k.T @ gM_k
             g0 = gU0 + (gU1 + gU2)/2    g1 = (gU1 - gU2)/2    g2 = (gU1 + gU2)/2 + gU3
    input:   gV_k = gM_k @ U_k.T
             d0 += gV0   d1 += gV1 - gV2 - gV3   d2 += gV1 + gV2 - gV0   d3 += gV3

The columns ``d_q`` of all pairs are the taps of a convolution with a
kernel 4 wide at stride 2 (:func:`_pair_geometry`), so :mod:`._cpu`'s
blocks and helpers serve as they are.  Per block, the four transforms run
once per input column over the rows the block reads, one copy gathers
each ``V_k`` over the ``kh`` taps of the windows into the thread's
scratch, the four products follow, and the ``M_k`` are combined into the
output while the block is in cache.  The transforms cost a few passes over
data the size of a block's input and output; the saving is a third of
products of ``kh*C_in/groups`` terms into ``C_out/groups`` columns, so the
path is taken only with enough channels (:data:`_MIN_IN_CHANNELS`).  It
computes in float32 only: the transformed operands add a few roundings
(error figures: docs/kernels.rst), and float64 stays the reference-grade
direct product.
"""

import numpy

from .. import _kernels, _parallel
from . import _cpu

#: Fewest input and output channels per group, and output columns, for
#: which this path is taken: per pixel, the transforms cost in proportion
#: to ``C_in + C_out`` and save in proportion to ``C_in*C_out`` (figures:
#: docs/kernels.rst, from ``docs/tuning.py conv-winograd``).  One output
#: column alone would take four products for three.
_MIN_IN_CHANNELS = 64
_MIN_OUT_CHANNELS = 128
_MIN_OUTPUT_COLUMNS = 2

_FLOAT32 = numpy.dtype(numpy.float32)


def applies(geom, dtype):
    """Whether a convolution of ``geom`` on ``dtype`` operands takes this
    path, in all three directions: kernels 3 wide, stride and dilation 1
    along W, float32 arithmetic (float16, bfloat16 and float32 operands)
    and enough channels and output columns (see :data:`_MIN_IN_CHANNELS`)."""
    return (_kernels.accumulator_dtype(dtype) == _FLOAT32
            and geom.kernel[1] == 3 and geom.stride[1] == 1 and geom.dilation[1] == 1
            and geom.out_hw[1] >= _MIN_OUTPUT_COLUMNS
            and geom.in_channels // geom.groups >= _MIN_IN_CHANNELS
            and geom.out_channels // geom.groups >= _MIN_OUT_CHANNELS)


def forward(x, w, bias, geom):
    work = _FLOAT32
    pairs = _pair_geometry(geom)
    padded = _padded_input(x, pairs, work)
    transformed_w = _transformed_weights(w, geom, work)
    y = numpy.empty(geom.out_shape, work)
    bias = _cpu._bias_to_add(bias, geom, work)
    channels_last = geom.layout == "NHWC"

    def block(ranges, scratch):
        images, rows = ranges
        v = _transformed_input(scratch, padded, pairs, images, rows, work)
        m = scratch.get("M", _pair_output_shape(pairs, images, rows), work)
        for k in range(4):
            _cpu._matmul_into(_cpu._group_matrices(v[k], geom), transformed_w[k],
                              _cpu._group_matrices(m[k], geom, channels_last))
        y_block = _cpu._output_block(y, geom, images, rows)
        _output_from_products(m, y_block, geom)
        if bias is not None:
            y_block += bias  # while the block is still in cache

    _parallel.for_each_block(block, _cpu._blocks(pairs))
    return y.astype(x.dtype, copy=False)


def input_grad(w, grad_out, geom):
    work = _FLOAT32
    pairs = _pair_geometry(geom)
    transformed_w_t = _transformed_weights(w, geom, work).swapaxes(-1, -2)
    grad_out = grad_out.astype(work, copy=False)
    grad_padded = _padded_zeros(pairs, work)
    channels_last = geom.layout == "NHWC"

    def image_blocks(blocks, scratch):
        # Bands of one image overlap in the input rows they add to: one
        # thread does all of an image's blocks.
        for images, rows in blocks:
            g_block = _cpu._output_block(grad_out, geom, images, rows)
            gm = _product_grads(scratch, g_block, pairs, images, rows, work)
            gv = scratch.get("V", _transformed_shape(pairs, images, rows), work)
            for k in range(4):
                _cpu._matmul_into(_cpu._group_matrices(gm[k], geom, channels_last),
                                  transformed_w_t[k], _cpu._group_matrices(gv[k], geom))
            _add_transformed_input_grad(scratch, gv, grad_padded, pairs, images, rows)

    per_image = {}
    for images, rows in _cpu._blocks(pairs):
        per_image.setdefault(images, []).append((images, rows))
    _parallel.for_each_block(image_blocks, list(per_image.values()))
    grad_x = _cpu._interior(grad_padded, pairs)
    if geom.layout == "NCHW":
        grad_x = grad_x.transpose(0, 3, 1, 2)
    return numpy.ascontiguousarray(grad_x, dtype=w.dtype)


def weight_grad(x, grad_out, geom):
    work = _FLOAT32
    pairs = _pair_geometry(geom)
    padded = _padded_input(x, pairs, work)
    grad_out = grad_out.astype(work, copy=False)
    kh, groups = geom.kernel[0], geom.groups
    cin_per_group = geom.in_channels // groups
    shape = (4, groups, kh * cin_per_group, geom.out_channels // groups)
    channels_last = geom.layout == "NHWC"

    def block(ranges, scratch):
        images, rows = ranges
        v = _transformed_input(scratch, padded, pairs, images, rows, work)
        g_block = _cpu._output_block(grad_out, geom, images, rows)
        gm = _product_grads(scratch, g_block, pairs, images, rows, work)
        part = scratch.zeros("grad", shape, work)
        for k in range(4):
            product = numpy.matmul(_cpu._group_matrices(v[k], geom).swapaxes(-1, -2),
                                   _cpu._group_matrices(gm[k], geom, channels_last))
            # NCHW blocks hold one product per image: sum them.
            part[k] += product.sum(axis=tuple(range(product.ndim - 3)))

    gu = numpy.zeros(shape, work)
    # Fixed shares: the sum over blocks is then the same on every run.
    for scratch in _parallel.for_each_block(block, _cpu._blocks(pairs), fixed_shares=True):
        gu += scratch.zeros("grad", shape, work)  # zeros if it took no block
    gu = gu.reshape(4, groups, kh, cin_per_group, -1)
    half_sum = (gu[1] + gu[2]) * 0.5
    g = numpy.stack([gu[0] + half_sum, (gu[1] - gu[2]) * 0.5, half_sum + gu[3]], axis=2)
    return _cpu._weight_from_matrices(g.reshape(groups, kh * 3 * cin_per_group, -1),
                                      geom, x.dtype)


def _pair_geometry(geom):
    """The geometry whose taps along W are the columns ``d_0..d_3`` of every
    pair of output columns: a kernel 4 wide at stride 2 over the input
    padded on the right with one more zero column when ``OW`` is odd, with
    ``OW/2`` outputs (rounded up) along W.  Its :func:`._cpu._blocks` are
    sized for the four ``V_k`` of a block."""
    (top, bottom), (left, right) = geom.padding
    oh, ow = geom.out_hw
    pairs = (ow + 1) // 2
    return geom._replace(kernel=(geom.kernel[0], 4), stride=(geom.stride[0], 2),
                         padding=((top, bottom), (left, right + 2 * pairs - ow)),
                         out_hw=(oh, pairs))


def _padded_zeros(pairs, dtype):
    """A zero ``(N, H + top + bottom, W + left + right, C_in)`` array (see
    :func:`._cpu._padded_shape`) stored column by column, so that a column's
    rows are one run in memory (see :func:`_transformed_columns`)."""
    n, h, w, c = _cpu._padded_shape(pairs)
    return numpy.zeros((n, w, h, c), dtype).transpose(0, 2, 1, 3)


def _padded_input(x, pairs, dtype):
    """``x`` zero-padded, channels last, in ``dtype``, in an array of
    :func:`_padded_zeros`."""
    padded = _padded_zeros(pairs, dtype)
    if pairs.layout == "NCHW":
        x = x.transpose(0, 2, 3, 1)
    _cpu._interior(padded, pairs)[...] = x
    return padded


def _transformed_weights(w, geom, dtype):
    """``U_0..U_3`` as ``(4, groups, kh*C_in/groups, C_out/groups)``, rows
    ``(i, c)`` in the order of :func:`._cpu._weight_matrices`."""
    matrices = _cpu._weight_matrices(w, geom, dtype)
    groups, _, cout_per_group = matrices.shape
    g = matrices.reshape(groups, geom.kernel[0], 3, -1, cout_per_group)
    g0, g1, g2 = g[:, :, 0], g[:, :, 1], g[:, :, 2]
    outer, middle = (g0 + g2) * 0.5, g1 * 0.5
    u = numpy.stack([g0, outer + middle, outer - middle, g2])
    return u.reshape(4, groups, -1, cout_per_group)


def _transformed_shape(pairs, images, rows):
    """Shape of a block's ``V_k`` (or ``gV_k``), ``(4, n, r, OW/2,
    groups*kh*C_in/groups)``: a matrix per ``k`` with a row per pair."""
    (n0, n1), (r0, r1) = images, rows
    return (4, n1 - n0, r1 - r0, pairs.out_hw[1], pairs.kernel[0] * pairs.in_channels)


def _pair_output_shape(pairs, images, rows):
    """Shape of a block's ``M_k`` (or ``gM_k``), ``(4,) +`` the output
    block's shape with one column per pair."""
    (n0, n1), (r0, r1) = images, rows
    if pairs.layout == "NHWC":
        return (4, n1 - n0, r1 - r0, pairs.out_hw[1], pairs.out_channels)
    return (4, n1 - n0, pairs.out_channels, r1 - r0, pairs.out_hw[1])


def _columns(a, geom, index):
    """``a[..., index, :]`` along W of an output-shaped block in ``geom.layout``."""
    return a[:, :, index] if geom.layout == "NHWC" else a[..., index]


def _width(a, geom):
    """Columns of an output-shaped block in ``geom.layout``."""
    return a.shape[2] if geom.layout == "NHWC" else a.shape[3]


def _pair_columns(padded, pairs, images, rows):
    """The columns ``d_0..d_3`` of a block's pairs over the input rows its
    windows read, each a view ``(n, OW/2, rows, C_in)`` of ``padded`` (of
    :func:`_padded_zeros`: a pair's rows are one run in memory)."""
    (n0, n1), (r0, r1) = images, rows
    (sh, _), (dh, _), kh = pairs.stride, pairs.dilation, pairs.kernel[0]
    first, last_row = r0 * sh, (r1 - 1) * sh + (kh - 1) * dh
    by_column = padded.transpose(0, 2, 1, 3)[n0:n1, :, first:last_row + 1]
    last = 2 * pairs.out_hw[1] - 1
    return [by_column[:, q:q + last:2] for q in range(4)]


def _tap_windows(columns, pairs):
    """The transformed columns of a block (``(4, n, OW/2, rows, C_in)``, as
    :func:`_transformed_columns` gives) that each ``V_k`` entry takes, as a
    view ``(4, n, r, OW/2, groups, kh, C_in/groups)``: element ``(k, n, r,
    t, g, i, c)`` is ``columns[k, n, t, r*sh + i*dh, g*C_in/groups + c]``."""
    (sh, _), (dh, _), kh = pairs.stride, pairs.dilation, pairs.kernel[0]
    four, n, count, rows, c = columns.shape
    oh = (rows - (kh - 1) * dh - 1) // sh + 1
    groups = pairs.groups
    s_k, s_n, s_t, s_h, s_c = columns.strides
    return numpy.lib.stride_tricks.as_strided(
        columns, shape=(four, n, oh, count, groups, kh, c // groups),
        strides=(s_k, s_n, s_h * sh, s_t, s_c * (c // groups), s_h * dh, s_c))


def _transformed_columns(scratch, padded, pairs, images, rows, dtype):
    """``d0 - d2``, ``d1 + d2``, ``d2 - d1`` and ``d3 - d1`` of the block's
    pairs, each over the input rows the block's windows read: ``(4, n,
    OW/2, rows, C_in)`` in ``scratch``'s buffer.  Each is one ufunc over runs
    of ``rows*C_in`` elements; transforming the gathered ``V_k`` instead
    would redo it ``kh`` times over runs of ``C_in``."""
    d0, d1, d2, d3 = _pair_columns(padded, pairs, images, rows)
    columns = scratch.get("transformed columns", (4,) + d0.shape, dtype)
    numpy.subtract(d0, d2, out=columns[0])
    numpy.add(d1, d2, out=columns[1])
    numpy.subtract(d2, d1, out=columns[2])
    numpy.subtract(d3, d1, out=columns[3])
    return columns


def _transformed_input(scratch, padded, pairs, images, rows, dtype):
    """A block's ``V_0..V_3`` (see :func:`_transformed_shape`) in
    ``scratch``'s buffer: its transformed columns gathered over the ``kh``
    taps of each window, in one copy (whose runs are ``kh*C_in`` elements
    long with dilation 1 along H and one group: the padded input is stored
    column by column for that)."""
    columns = _transformed_columns(scratch, padded, pairs, images, rows, dtype)
    v = scratch.get("V", _transformed_shape(pairs, images, rows), dtype)
    windows = _tap_windows(columns, pairs)
    numpy.copyto(v.reshape(windows.shape), windows)
    return v


def _output_from_products(m, y_block, geom):
    """``y[2t] = M0 + M1 + M2`` and ``y[2t + 1] = M1 - M2 + M3`` into
    ``y_block`` (the last pair's second column dropped when ``OW`` is odd),
    overwriting ``m``."""
    second = _columns(y_block, geom, slice(1, None, 2))
    numpy.add(m[0], m[1], out=m[0])
    numpy.add(m[0], m[2], out=_columns(y_block, geom, slice(0, None, 2)))
    numpy.subtract(m[1], m[2], out=m[1])
    kept = slice(0, _width(second, geom))
    numpy.add(_columns(m[1], geom, kept), _columns(m[3], geom, kept), out=second)


def _product_grads(scratch, g_block, pairs, images, rows, dtype):
    """A block's ``gM_0..gM_3`` from its ``grad_out`` block (see
    :func:`_pair_output_shape`) in ``scratch``'s buffer, contiguous for
    BLAS; the missing second column of an odd ``OW`` counts as 0."""
    gm = scratch.get("gM", _pair_output_shape(pairs, images, rows), dtype)
    second = _columns(g_block, pairs, slice(1, None, 2))
    kept = _width(second, pairs)
    numpy.copyto(gm[0], _columns(g_block, pairs, slice(0, None, 2)))
    numpy.copyto(_columns(gm[3], pairs, slice(0, kept)), second)
    _columns(gm[3], pairs, slice(kept, None))[...] = 0
    numpy.add(gm[0], gm[3], out=gm[1])
    numpy.subtract(gm[0], gm[3], out=gm[2])
    return gm


def _add_transformed_input_grad(scratch, gv, grad_padded, pairs, images, rows):
    """Adjoint of :func:`_transformed_input`: add a block's ``gV_0..gV_3``
    onto the padded input gradient (of :func:`_padded_zeros`).  They are
    summed per transformed column over the taps first, one kernel row at a
    time (the rows of different taps overlap, as in :func:`._cpu._col2im`),
    and then added to ``d0..d3`` through the transposed transform, in runs
    of ``rows*C_in``.  Overwrites ``gv``."""
    d = _pair_columns(grad_padded, pairs, images, rows)
    columns = scratch.get("transformed columns", (4,) + d[0].shape, gv.dtype)
    columns[...] = 0
    windows = _tap_windows(columns, pairs)
    taps = gv.reshape(windows.shape)
    for i in range(pairs.kernel[0]):
        windows[..., i, :] += taps[..., i, :]
    g0, g1, g2, g3 = columns
    d[0] += g0
    d[3] += g3
    numpy.subtract(g2, g0, out=g0)
    numpy.add(g0, g1, out=g0)  # g1 + g2 - g0
    d[2] += g0
    numpy.add(g2, g3, out=g3)
    numpy.subtract(g1, g3, out=g1)  # g1 - g2 - g3
    d[1] += g1
