"""cupyconv's ops on Dask arrays: lazy, chunk by chunk, equal to the eager call.

Any ``dask.array.Array`` argument of a public op makes the call lazy: the op
returns a Dask array whose chunks are computed by the eager op on NumPy or
CuPy chunks (the chunk type, Dask's ``meta``, is kept), and nothing runs until
the result is computed.  The graph is built here from the arrays' shapes and
chunk sizes, which must be known.

Convolution and pooling read windows that cross chunk borders.  Every output
chunk is computed from a *slab*: exactly the input rows and columns its
windows read (pieces of as many input chunks as needed, so chunks smaller
than the halo work), with the zero padding of the whole image where the slab
touches the image's edge.  For an output range ``[o0, o1)`` along an axis of
size ``L``, stride ``s``, leading padding ``p`` and dilated kernel extent
``e = d*(k - 1) + 1`` the slab is::

    rows [max(0, o0*s - p), min(L, (o1 - 1)*s - p + e))

Output chunk borders sit where an input chunk border falls, rounded up to the
stride (``o = ceil((border + p) / s)``), so the output is chunked like the
input.  Along the batch axis chunks map block to block.  Channel axes of the
convolution family are rechunked to one chunk (every output channel reads
every input channel of its group); pooling, dilate and undilate keep them.

``conv2d_weight`` sums one partial kernel per (batch, row, column) chunk of
``grad_out`` in a binary tree of fixed shape and order, so its bits do not
depend on the scheduler, the workers or the run.  Kernels and biases that are
NumPy or CuPy arrays enter the graph once, as one key that every task reads
(a worker fetches them once); Dask kernels are rechunked to one chunk.
Every task is a pure function of its inputs, so a task lost with a worker is
simply run again.

Importing this module imports Dask; ``import cupyconv`` does not.
"""

import importlib
import math
import operator

import numpy
import dask.array as da
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from . import _args, _backend
from .convolution import _geometry as conv_rules
from .dilation import _geometry as dilation_rules
from .pooling import _geometry as pool_rules

__all__ = ["call"]


def call(func, bound):
    """Run public op ``func`` with the arguments ``bound`` (an
    :class:`inspect.BoundArguments` holding a Dask array) lazily."""
    bound.apply_defaults()
    # Tasks call the public op (by reference, so that they pickle), which
    # runs the chunks, NumPy or CuPy arrays, straight through.
    op = getattr(importlib.import_module(func.__module__), func.__name__)
    return _OPS[func.__name__](op, **bound.arguments)


# --- graph pieces ---------------------------------------------------------------


def _checked(a, name):
    if any(math.isnan(c) for chunks in a.chunks for c in chunks):
        raise ValueError(
            f"{name} has unknown chunk sizes; call {name}.compute_chunk_sizes() first")
    return a


def _as_dask(a, name):
    """A chunked argument (``x``, ``grad_out``, ``indices``) as a Dask array."""
    if isinstance(a, da.Array):
        return _checked(a, name)
    xp = _backend.array_module_of(a)
    return da.from_array(xp.asarray(a), chunks=-1, asarray=False)


class _Whole:
    """A kernel or bias: one graph key that every task reads."""

    def __init__(self, a, name):
        self.layer, self.dependencies = {}, []
        if a is None:
            self.key, self.meta, self.shape = None, None, None
        elif isinstance(a, da.Array):
            a = _checked(a, name)
            if a.npartitions > 1:
                a = a.rechunk(a.shape)
            self.key = (a.name,) + (0,) * a.ndim
            self.dependencies = [a]
            self.meta, self.shape = a._meta, a.shape
        else:
            xp = _backend.array_module_of(a)
            a = xp.asarray(a)
            self.key = f"cupyconv-{name}-{tokenize(a)}"
            self.layer = {self.key: a}
            self.meta, self.shape = a[(slice(0, 0),) * a.ndim], a.shape

    def validation_stand_in(self):
        """A NumPy array of the argument's dtype and shape for argument checks."""
        if self.key is None:
            return None
        return numpy.empty(self.shape, numpy.dtype(self.meta.dtype))


def _array(name, layer, dependencies, chunks, meta, wholes=()):
    for whole in wholes:
        layer.update(whole.layer)
        dependencies = dependencies + whole.dependencies
    graph = HighLevelGraph.from_collections(name, layer, dependencies=dependencies)
    return da.Array(graph, name, chunks, meta=meta)


def _meta(x, dtype=None):
    meta = x._meta
    return meta if dtype is None else meta.astype(dtype)


def _check_chunk_types(**metas):
    """Chunks and kernels of one call must be of one library (NumPy or CuPy)."""
    _backend.dispatch(**{name: m for name, m in metas.items() if m is not None})


def _stand_in(x):
    """A zero-batch NumPy array of ``x``'s shape and dtype, to check arguments
    with the eager op at no cost."""
    shape = list(x.shape)
    shape[0] = 0
    return numpy.empty(shape, numpy.dtype(x.dtype))


def _borders(chunks):
    """Start offsets of chunks, with the total length at the end."""
    return numpy.concatenate([[0], numpy.cumsum(chunks)]).astype(int).tolist()


def _out_chunks(chunks, out, stride, before):
    """Output chunk sizes along an axis: a border where an input chunk border
    falls, rounded up to the stride; empty chunks are merged away."""
    bounds = [0]
    for border in _borders(chunks)[1:-1]:
        o = min(out, max(0, -(-(border + before) // stride)))
        if o > bounds[-1]:
            bounds.append(o)
    if out > bounds[-1]:
        bounds.append(out)
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def _in_chunks(out_chunks, size, stride, before):
    """Input chunk sizes that follow output chunk borders (for gradients)."""
    bounds = [0]
    for border in _borders(out_chunks)[1:-1]:
        r = min(size, max(0, border * stride - before))
        if r > bounds[-1]:
            bounds.append(r)
    if size > bounds[-1]:
        bounds.append(size)
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def _pieces(borders, a, b):
    """``[(chunk, slice), ...]`` covering ``[a, b)`` of an axis chunked at
    ``borders``; one empty slice of a chunk when ``a == b``."""
    pieces = []
    for i, (lo, hi) in enumerate(zip(borders, borders[1:])):
        if hi > a and lo < b:
            pieces.append((i, slice(max(a, lo) - lo, min(b, hi) - lo)))
    if not pieces:
        i = max(0, min(len(borders) - 2, numpy.searchsorted(borders, a, "right") - 1))
        pieces.append((i, slice(0, 0)))
    return pieces


def _slab_task(x, h_ax, w_ax, block, rows, cols):
    """A task giving the part ``[rows) x [cols)`` of ``x``'s spatial plane in
    batch block ``block[0]`` (other axes: ``block``'s chunk indices)."""
    h_borders, w_borders = _borders(x.chunks[h_ax]), _borders(x.chunks[w_ax])
    grid = []
    for hi, hs in _pieces(h_borders, *rows):
        line = []
        for wi, ws in _pieces(w_borders, *cols):
            index, cut = list(block), [slice(None)] * x.ndim
            index[h_ax], index[w_ax], cut[h_ax], cut[w_ax] = hi, wi, hs, ws
            line.append((operator.getitem, (x.name,) + tuple(index), tuple(cut)))
        grid.append(line)
    return (_assemble, grid, h_ax, w_ax)


def _assemble(grid, h_ax, w_ax):
    """One array from a grid of pieces (rows of pieces along ``w_ax``)."""
    xp = _backend.array_module_of(grid[0][0])
    lines = [line[0] if len(line) == 1 else xp.concatenate(line, axis=w_ax)
             for line in grid]
    return lines[0] if len(lines) == 1 else xp.concatenate(lines, axis=h_ax)


def _window_span(o0, o1, size, stride, before, extent):
    """Input rows ``[a, b)`` read by windows ``o0 .. o1-1`` and the padding
    ``(before, after)`` that completes them: ``(a, b, pad_before, pad_after)``."""
    start, end = o0 * stride - before, (o1 - 1) * stride - before + extent
    if end <= 0 or start >= size:  # padding only
        a = min(max(start, 0), size)
        return a, a, end - start, 0
    a, b = max(start, 0), min(end, size)
    return a, b, a - start, end - b


def _windows_touching(r0, r1, out, stride, before, extent):
    """Windows ``[g0, g1)`` that read a row of ``[r0, r1)``."""
    g0 = max(0, -(-(r0 + before - extent + 1) // stride))
    g1 = min(out, (r1 - 1 + before) // stride + 1)
    return g0, max(g0, g1)


def _axes(layout):
    """(batch, channel, height, width) axes of ``layout``."""
    return (0, 3, 1, 2) if layout == "NHWC" else (0, 1, 2, 3)


def _block_index(layout, n, c, i, j):
    index = [0] * 4
    for axis, value in zip(_axes(layout), (n, c, i, j)):
        index[axis] = value
    return tuple(index)


def _activation_chunks(layout, n, c, h, w):
    chunks = [None] * 4
    for axis, value in zip(_axes(layout), (n, c, h, w)):
        chunks[axis] = value
    return tuple(chunks)


def _one_channel_chunk(x, layout):
    c_ax = _axes(layout)[1]
    return x if x.numblocks[c_ax] == 1 else x.rechunk({c_ax: -1})


# --- convolution ---------------------------------------------------------------


def _conv_geometry(x_shape, w_shape, stride, padding, dilation, groups, layout):
    geom = conv_rules.conv2d_geometry(x_shape, w_shape, stride, padding,
                                      dilation, groups, layout)
    extents = tuple(d * (k - 1) + 1 for d, k in zip(geom.dilation, geom.kernel))
    return geom, extents


def _with_rows(pads, slab, axes):
    """A slab that has no rows (or columns) along an axis, because its
    windows read padding only, gets one zero row whose place the padding
    gives up: the same output, from an array the op accepts."""
    pads = [list(p) for p in pads]
    for k, axis in enumerate(axes):
        if slab.shape[axis] == 0:
            shape = list(slab.shape)
            shape[axis] = 1
            slab = _backend.array_module_of(slab).zeros(shape, slab.dtype)
            pads[k][0] -= 1
    return slab, tuple(tuple(p) for p in pads)


def _conv2d_block(x, w, bias, pads, keywords, op):
    x, pads = _with_rows(pads, x, _axes(keywords["layout"])[2:])
    return op(x, w, bias, padding=pads, **keywords)


def _conv2d(op, x, w, bias=None, stride=1, padding=0, dilation=1, groups=1,
            layout="NHWC", **extra):
    layout = _args.check_layout(layout)
    x = _one_channel_chunk(_as_dask(x, "x"), layout)
    w, bias = _Whole(w, "w"), _Whole(bias, "bias")
    _check_chunk_types(x=x._meta, w=w.meta, bias=bias.meta)
    reference = op(_stand_in(x), w.validation_stand_in(),
                   bias.validation_stand_in(), stride=stride, padding=padding,
                   dilation=dilation, groups=groups, layout=layout, **extra)
    geom, extents = _conv_geometry(x.shape, w.shape, stride, padding, dilation,
                                   groups, layout)
    _, _, h_ax, w_ax = _axes(layout)
    out_chunks = [_out_chunks(x.chunks[ax], out, s, pad[0])
                  for ax, out, s, pad in zip((h_ax, w_ax), geom.out_hw,
                                             geom.stride, geom.padding)]
    keywords = dict(stride=geom.stride, dilation=geom.dilation, groups=groups,
                    layout=layout, **extra)
    name = "cupyconv-conv2d-" + tokenize(x.name, w.key, bias.key, keywords)
    layer = {}
    for n in range(x.numblocks[0]):
        for i, (o0, o1) in enumerate(_ranges(out_chunks[0])):
            rows = _window_span(o0, o1, geom.in_hw[0], geom.stride[0],
                                geom.padding[0][0], extents[0])
            for j, (p0, p1) in enumerate(_ranges(out_chunks[1])):
                cols = _window_span(p0, p1, geom.in_hw[1], geom.stride[1],
                                    geom.padding[1][0], extents[1])
                slab = _slab_task(x, h_ax, w_ax, _block_index(layout, n, 0, 0, 0),
                                  rows[:2], cols[:2])
                layer[(name,) + _block_index(layout, n, 0, i, j)] = (
                    _conv2d_block, slab, w.key, bias.key,
                    (rows[2:], cols[2:]), keywords, op)
    chunks = _activation_chunks(layout, x.chunks[0], (geom.out_channels,),
                                *out_chunks)
    return _array(name, layer, [x], chunks, _meta(x, reference.dtype), (w, bias))


def _ranges(chunks):
    borders = _borders(chunks)
    return list(zip(borders, borders[1:]))


def _place(part, span, block, axes):
    """Put ``part`` (rows ``span[k]`` along ``axes[k]``) into zeros covering
    rows ``block[k]``: the rows of the block that the part does not reach
    get no gradient."""
    xp = _backend.array_module_of(part)
    shape = list(part.shape)
    to, frm = [slice(None)] * part.ndim, [slice(None)] * part.ndim
    covered = True
    for axis, (a, b), (r0, r1) in zip(axes, span, block):
        shape[axis] = r1 - r0
        lo, hi = max(a, r0), min(b, r1)
        covered &= (lo, hi) == (r0, r1)
        to[axis], frm[axis] = slice(lo - r0, max(lo, hi) - r0), slice(lo - a, max(lo, hi) - a)
    if covered:
        return part[tuple(frm)]
    out = xp.zeros(shape, part.dtype)
    out[tuple(to)] = part[tuple(frm)]
    return out


def _check_batch(shape, expected):
    """The stand-in checks leave the batch size to check."""
    if tuple(shape) != tuple(expected):
        raise ValueError(f"grad_out must have the convolution's output shape "
                         f"{tuple(expected)}, got {tuple(shape)}")


def _conv2d_input_block(grad_out, w, local_shape, pads, span, block, keywords, op):
    axes = _axes(keywords["layout"])[2:]
    if grad_out is None:  # no window reads these rows
        xp = _backend.array_module_of(w)
        return xp.zeros(local_shape, w.dtype)
    shape = list(local_shape)
    for axis, (a, b) in zip(axes, span):
        shape[axis] = b - a
    part = op(tuple(shape), w, grad_out, padding=pads, **keywords)
    return _place(part, span, block, axes)


def _conv2d_input(op, input_shape, w, grad_out, stride=1, padding=0, dilation=1,
                  groups=1, layout="NHWC", **extra):
    layout = _args.check_layout(layout)
    input_shape = _args.shape_arg(input_shape, 4, "input_shape")
    grad_out = _one_channel_chunk(_as_dask(grad_out, "grad_out"), layout)
    w = _Whole(w, "w")
    _check_chunk_types(w=w.meta, grad_out=grad_out._meta)
    stand_in = list(input_shape)
    stand_in[0] = 0
    reference = op(tuple(stand_in), w.validation_stand_in(), _stand_in(grad_out),
                   stride=stride, padding=padding, dilation=dilation,
                   groups=groups, layout=layout, **extra)
    geom, extents = _conv_geometry(input_shape, w.shape, stride, padding,
                                   dilation, groups, layout)
    _check_batch(grad_out.shape, geom.out_shape)
    n_ax, _, h_ax, w_ax = _axes(layout)
    in_chunks = [_in_chunks(grad_out.chunks[ax], size, s, pad[0])
                 for ax, size, s, pad in zip((h_ax, w_ax), geom.in_hw,
                                             geom.stride, geom.padding)]
    keywords = dict(stride=geom.stride, dilation=geom.dilation, groups=groups,
                    layout=layout, **extra)
    name = "cupyconv-conv2d_input-" + tokenize(grad_out.name, w.key, input_shape,
                                               keywords)
    layer = {}
    n_borders = _borders(grad_out.chunks[n_ax])
    for n in range(grad_out.numblocks[n_ax]):
        for i, block_rows in enumerate(_ranges(in_chunks[0])):
            g_rows = _windows_touching(*block_rows, geom.out_hw[0], geom.stride[0],
                                       geom.padding[0][0], extents[0])
            rows = _window_span(*g_rows, geom.in_hw[0], geom.stride[0],
                                geom.padding[0][0], extents[0])
            for j, block_cols in enumerate(_ranges(in_chunks[1])):
                g_cols = _windows_touching(*block_cols, geom.out_hw[1],
                                           geom.stride[1], geom.padding[1][0],
                                           extents[1])
                cols = _window_span(*g_cols, geom.in_hw[1], geom.stride[1],
                                    geom.padding[1][0], extents[1])
                local_shape = _args.activation_shape(
                    n_borders[n + 1] - n_borders[n], geom.in_channels,
                    (block_rows[1] - block_rows[0], block_cols[1] - block_cols[0]),
                    layout)
                empty = (g_rows[0] == g_rows[1] or g_cols[0] == g_cols[1]
                         or rows[0] == rows[1] or cols[0] == cols[1])
                slab = None if empty else _slab_task(
                    grad_out, h_ax, w_ax, _block_index(layout, n, 0, 0, 0),
                    g_rows, g_cols)
                layer[(name,) + _block_index(layout, n, 0, i, j)] = (
                    _conv2d_input_block, slab, w.key, local_shape,
                    (rows[2:], cols[2:]), (rows[:2], cols[:2]),
                    (block_rows, block_cols), keywords, op)
    chunks = _activation_chunks(layout, grad_out.chunks[n_ax], (geom.in_channels,),
                                *in_chunks)
    return _array(name, layer, [grad_out], chunks,
                  _meta(grad_out, reference.dtype), (w,))


def _conv2d_weight_block(x, weight_shape, grad_out, pads, keywords, op):
    x, pads = _with_rows(pads, x, _axes(keywords["layout"])[2:])
    return op(x, weight_shape, grad_out, padding=pads, **keywords)


def _conv2d_weight(op, x, weight_shape, grad_out, stride=1, padding=0,
                   dilation=1, groups=1, layout="NHWC", **extra):
    layout = _args.check_layout(layout)
    weight_shape = _args.shape_arg(weight_shape, 4, "weight_shape")
    x = _one_channel_chunk(_as_dask(x, "x"), layout)
    grad_out = _one_channel_chunk(_as_dask(grad_out, "grad_out"), layout)
    _check_chunk_types(x=x._meta, grad_out=grad_out._meta)
    reference = op(_stand_in(x), weight_shape, _stand_in(grad_out),
                   stride=stride, padding=padding, dilation=dilation,
                   groups=groups, layout=layout, **extra)
    geom, extents = _conv_geometry(x.shape, weight_shape, stride, padding,
                                   dilation, groups, layout)
    _check_batch(grad_out.shape, geom.out_shape)
    n_ax, _, h_ax, w_ax = _axes(layout)
    grad_out = grad_out.rechunk({n_ax: x.chunks[n_ax]})
    keywords = dict(stride=geom.stride, dilation=geom.dilation, groups=groups,
                    layout=layout, **extra)
    token = tokenize(x.name, grad_out.name, weight_shape, keywords)
    name = "cupyconv-conv2d_weight-" + token
    layer, partials = {}, []
    for n in range(x.numblocks[n_ax]):
        for i, (o0, o1) in enumerate(_ranges(grad_out.chunks[h_ax])):
            rows = _window_span(o0, o1, geom.in_hw[0], geom.stride[0],
                                geom.padding[0][0], extents[0])
            for j, (p0, p1) in enumerate(_ranges(grad_out.chunks[w_ax])):
                cols = _window_span(p0, p1, geom.in_hw[1], geom.stride[1],
                                    geom.padding[1][0], extents[1])
                slab = _slab_task(x, h_ax, w_ax, _block_index(layout, n, 0, 0, 0),
                                  rows[:2], cols[:2])
                key = (f"cupyconv-conv2d_weight-part-{token}", n, i, j)
                layer[key] = (_conv2d_weight_block, slab, weight_shape,
                              (grad_out.name,) + _block_index(layout, n, 0, i, j),
                              (rows[2:], cols[2:]), keywords, op)
                partials.append(key)
    layer[(name, 0, 0, 0, 0)] = _tree_sum(layer, partials, token)
    return _array(name, layer, [x, grad_out], tuple((s,) for s in weight_shape),
                  _meta(x, reference.dtype))


def _tree_sum(layer, keys, token):
    """The task adding ``keys`` pairwise, level by level, in list order: one
    fixed tree, so the same bits on every run."""
    level = 0
    while len(keys) > 1:
        paired = []
        for k in range(0, len(keys) - 1, 2):
            key = (f"cupyconv-sum-{token}", level, k // 2)
            layer[key] = (operator.add, keys[k], keys[k + 1])
            paired.append(key)
        if len(keys) % 2:
            paired.append(keys[-1])
        keys, level = paired, level + 1
    return (_identity, keys[0])


def _identity(a):
    return a


# --- pooling -------------------------------------------------------------------


def _pool_span(o0, o1, size, stride, pad, extent):
    """For pooling windows ``o0 .. o1-1``: input rows ``[a, b)``, the op's own
    (symmetric) padding ``q`` that supplies the leading padding, and the rows
    ``extra`` to append after the slab so that the windows fit.  Appended
    rows hold the dtype's lowest value; they come after every input element
    of their windows in row-major order, so they are never picked."""
    start, end = o0 * stride - pad, (o1 - 1) * stride - pad + extent
    a, b = max(start, 0), min(end, size)
    q = a - start
    return a, b, q, max(0, end - start - 2 * q - (b - a))


def _lowest(dtype):
    dtype = numpy.dtype(dtype)
    return -numpy.inf if dtype.kind == "f" else numpy.iinfo(dtype).min


def _extended(x, extra, axes):
    """``x`` with ``extra[k]`` rows of its dtype's lowest value appended
    along ``axes[k]``."""
    xp = _backend.array_module_of(x)
    for axis, count in zip(axes, extra):
        if count:
            shape = list(x.shape)
            shape[axis] = count
            x = xp.concatenate([x, xp.full(shape, _lowest(x.dtype), x.dtype)], axis=axis)
    return x


def _pool_local(x, spans, counts, keywords, want_indices, op):
    """Pool a slab; the first ``counts`` windows per axis, and the indices as
    positions in the whole image (``image_w`` columns)."""
    axes = _axes(keywords["layout"])[2:]
    x = _extended(x, [span[3] for span in spans], axes)
    result = op(x, padding=tuple(span[2] for span in spans),
                return_indices=want_indices, **keywords)
    keep = [slice(None)] * 4
    for axis, count in zip(axes, counts):
        keep[axis] = slice(0, count)
    if not want_indices:
        return result[tuple(keep)]
    out, indices = (r[tuple(keep)] for r in result)
    return out, indices, x.shape[axes[1]]


def _max_pool2d_block(x, spans, counts, image_w, keywords, want_indices, op):
    result = _pool_local(x, spans, counts, keywords, want_indices, op)
    if not want_indices:
        return result
    out, indices, local_w = result
    rows, cols = divmod(indices, local_w)
    return out, (rows + spans[0][0]) * image_w + cols + spans[1][0]


def _pool_geometry(x, kernel_size, stride, padding, dilation, ceil_mode, layout):
    geom = pool_rules.pool_geometry(
        x.shape, kernel_size, stride, padding, dilation, ceil_mode, layout)
    extents = tuple(d * (k - 1) + 1 for d, k in zip(geom.dilation, geom.kernel))
    return ((geom.h, geom.w), (geom.oh, geom.ow), geom.kernel, geom.stride,
            geom.padding, geom.dilation, extents)


def _max_pool2d(op, x, kernel_size, stride=None, padding=0, dilation=1,
                ceil_mode=False, layout="NHWC", return_indices=False, **extra):
    layout = _args.check_layout(layout)
    x = _as_dask(x, "x")
    reference = op(_stand_in(x), kernel_size, stride=stride, padding=padding,
                   dilation=dilation, ceil_mode=ceil_mode, layout=layout,
                   return_indices=return_indices, **extra)
    size, out, kernel, stride, padding, dilation, extents = _pool_geometry(
        x, kernel_size, stride, padding, dilation, ceil_mode, layout)
    _, c_ax, h_ax, w_ax = _axes(layout)
    out_chunks = [_out_chunks(x.chunks[ax], o, s, p)
                  for ax, o, s, p in zip((h_ax, w_ax), out, stride, padding)]
    keywords = dict(kernel_size=kernel, stride=stride, dilation=dilation,
                    layout=layout, **extra)
    token = tokenize(x.name, keywords, out, return_indices)
    name = "cupyconv-max_pool2d-" + token
    layer = {}
    for n in range(x.numblocks[0]):
        for c in range(x.numblocks[c_ax]):
            for i, (o0, o1) in enumerate(_ranges(out_chunks[0])):
                rows = _pool_span(o0, o1, size[0], stride[0], padding[0], extents[0])
                for j, (p0, p1) in enumerate(_ranges(out_chunks[1])):
                    cols = _pool_span(p0, p1, size[1], stride[1], padding[1],
                                      extents[1])
                    slab = _slab_task(x, h_ax, w_ax, _block_index(layout, n, c, 0, 0),
                                      rows[:2], cols[:2])
                    layer[(name,) + _block_index(layout, n, c, i, j)] = (
                        _max_pool2d_block, slab, (rows, cols), (o1 - o0, p1 - p0),
                        size[1], keywords, return_indices, op)
    chunks = _activation_chunks(layout, x.chunks[0], x.chunks[c_ax], *out_chunks)
    if not return_indices:
        return _array(name, layer, [x], chunks, _meta(x, reference.dtype))
    both = _array(name, layer, [x], chunks, _meta(x, reference[0].dtype))
    return tuple(
        _array(f"{name}-{k}", {(f"{name}-{k}",) + key[1:]: (operator.getitem, key, k)
                               for key in layer}, [both], chunks, _meta(x, r.dtype))
        for k, r in enumerate(reference))


def _local_indices(indices, spans, image_w, local_w):
    """Global positions ``h*W + w`` as positions in the slab; -1 (no element
    of any window) where they fall outside it."""
    rows, cols = divmod(indices, image_w)
    rows, cols = rows - spans[0][0], cols - spans[1][0]
    inside = ((rows >= 0) & (rows < spans[0][1] - spans[0][0])
              & (cols >= 0) & (cols < spans[1][1] - spans[1][0]))
    xp = _backend.array_module_of(indices)
    return xp.where(inside, rows * local_w + cols, -1)


def _max_pool2d_backward_block(grad_out, x, indices, spans, block, shape,
                               image_w, keywords, op):
    layout = keywords["layout"]
    axes = _axes(layout)[2:]
    if grad_out is None:
        return _backend.array_module_of(x).zeros(shape, x.dtype)
    slab = _extended(x, [span[3] for span in spans], axes)
    pads = tuple(span[2] for span in spans)
    # The op gives the slab as many windows as fit; the ones past ours get
    # zero gradient and (with indices) no pick.
    local_out = list(grad_out.shape)
    for axis, q, k, s, d in zip(axes, pads, keywords["kernel_size"],
                                keywords["stride"], keywords["dilation"]):
        local_out[axis] = (slab.shape[axis] + 2 * q - d * (k - 1) - 1) // s + 1
    xp = _backend.array_module_of(x)
    grads = xp.zeros(local_out, grad_out.dtype)
    grads[tuple(slice(0, s) for s in grad_out.shape)] = grad_out
    if indices is not None:
        local = xp.full(grads.shape, -1, numpy.int64)
        local[tuple(slice(0, s) for s in indices.shape)] = _local_indices(
            indices, spans, image_w, slab.shape[axes[1]])
        indices = local
    grad = op(grads, slab, padding=pads, indices=indices, **keywords)
    crop = [slice(None)] * 4
    for axis, span in zip(axes, spans):
        crop[axis] = slice(0, span[1] - span[0])
    return _place(grad[tuple(crop)], [span[:2] for span in spans], block, axes)


def _max_pool2d_backward(op, grad_out, x, kernel_size, stride=None, padding=0,
                         dilation=1, ceil_mode=False, layout="NHWC", indices=None,
                         **extra):
    layout = _args.check_layout(layout)
    x = _as_dask(x, "x")
    grad_out = _as_dask(grad_out, "grad_out")
    indices = None if indices is None else _as_dask(indices, "indices")
    op(_stand_in(grad_out), _stand_in(x), kernel_size, stride=stride,
       padding=padding, dilation=dilation, ceil_mode=ceil_mode, layout=layout,
       indices=None if indices is None else _stand_in(indices), **extra)
    size, out, kernel, stride, padding, dilation, extents = _pool_geometry(
        x, kernel_size, stride, padding, dilation, ceil_mode, layout)
    n_ax, c_ax, h_ax, w_ax = _axes(layout)
    if grad_out.shape[n_ax] != x.shape[n_ax]:
        raise ValueError(f"grad_out must have x's batch size {x.shape[n_ax]}, "
                         f"got {grad_out.shape[n_ax]}")
    aligned = {n_ax: x.chunks[n_ax], c_ax: x.chunks[c_ax]}
    grad_out = grad_out.rechunk(aligned)
    indices = None if indices is None else indices.rechunk(grad_out.chunks)
    keywords = dict(kernel_size=kernel, stride=stride, dilation=dilation,
                    layout=layout, **extra)
    name = "cupyconv-max_pool2d_backward-" + tokenize(
        grad_out.name, x.name, None if indices is None else indices.name, keywords)
    layer = {}
    n_borders, c_borders = _borders(x.chunks[n_ax]), _borders(x.chunks[c_ax])
    for n in range(x.numblocks[n_ax]):
        for c in range(x.numblocks[c_ax]):
            for i, block_rows in enumerate(_ranges(x.chunks[h_ax])):
                g_rows = _windows_touching(*block_rows, out[0], stride[0],
                                           padding[0], extents[0])
                rows = _pool_span(*g_rows, size[0], stride[0], padding[0], extents[0])
                for j, block_cols in enumerate(_ranges(x.chunks[w_ax])):
                    g_cols = _windows_touching(*block_cols, out[1], stride[1],
                                               padding[1], extents[1])
                    cols = _pool_span(*g_cols, size[1], stride[1], padding[1],
                                      extents[1])
                    shape = _args.activation_shape(
                        n_borders[n + 1] - n_borders[n], c_borders[c + 1] - c_borders[c],
                        (block_rows[1] - block_rows[0], block_cols[1] - block_cols[0]),
                        layout)
                    block = _block_index(layout, n, c, 0, 0)
                    empty = g_rows[0] == g_rows[1] or g_cols[0] == g_cols[1]
                    tasks = [None, None, None] if empty else [
                        _slab_task(grad_out, h_ax, w_ax, block, g_rows, g_cols),
                        _slab_task(x, h_ax, w_ax, block, rows[:2], cols[:2]),
                        None if indices is None else
                        _slab_task(indices, h_ax, w_ax, block, g_rows, g_cols)]
                    if empty:  # x's block still gives the chunk type and dtype
                        tasks[1] = (x.name,) + _block_index(layout, n, c, i, j)
                    layer[(name,) + _block_index(layout, n, c, i, j)] = (
                        _max_pool2d_backward_block, *tasks, (rows, cols),
                        (block_rows, block_cols), shape, size[1], keywords, op)
    dependencies = [grad_out, x] + ([] if indices is None else [indices])
    return _array(name, layer, dependencies, x.chunks, _meta(x))


# --- dilate and undilate ----------------------------------------------------------


def _dilate_block(block, op, axes, dilation, block_info=None):
    return op(block, axes=axes, dilation=dilation,
                  shape=block_info[None]["chunk-shape"])


def _dilate(op, a, axes, dilation, shape=None):
    a = _as_dask(a, "a")
    geom = dilation_rules.dilate_geometry(a.shape, axes, dilation, shape)
    chunks = []
    for axis, (sizes, step) in enumerate(zip(a.chunks, geom.steps)):
        sizes = [size * step for size in sizes]
        sizes[-1] += geom.dilated_shape[axis] - sum(sizes)  # `shape` may cut or extend the tail
        chunks.append(tuple(sizes))
    return a.map_blocks(_dilate_block, op, geom.axes, geom.dilation,
                        chunks=tuple(chunks), dtype=a.dtype, meta=a._meta)


def _undilate_block(block, op, axes, dilation, block_info=None):
    location = block_info[0]["array-location"]
    cut = [slice(None)] * block.ndim
    for axis, d in zip(axes, dilation):
        cut[axis] = slice((-location[axis][0]) % (d + 1), None)
    return op(block[tuple(cut)], axes=axes, dilation=dilation)


def _undilate(op, a, axes, dilation):
    a = _as_dask(a, "a")
    geom = dilation_rules.undilate_geometry(a.shape, axes, dilation)
    chunks = []
    for sizes, step in zip(a.chunks, geom.steps):
        chunks.append(tuple(len(range((-lo) % step, hi - lo, step))
                            for lo, hi in _ranges(sizes)))
    return a.map_blocks(_undilate_block, op, geom.axes, geom.dilation,
                        chunks=tuple(chunks), dtype=a.dtype, meta=a._meta)


_OPS = {
    "conv2d": _conv2d,
    "conv2d_input": _conv2d_input,
    "conv2d_weight": _conv2d_weight,
    "max_pool2d": _max_pool2d,
    "max_pool2d_backward": _max_pool2d_backward,
    "dilate": _dilate,
    "undilate": _undilate,
}
