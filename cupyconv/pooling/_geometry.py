"""The geometry of a 2-D max-pool: :class:`PoolGeometry`, built once per call
by :func:`pool_geometry` from the arguments, before the call goes to the
NumPy path (:mod:`._cpu`) or the kernels (:mod:`._cuda`).
"""

from typing import NamedTuple

import numpy

from .. import _args, _kernels
from .._args import pair


def pool_output_size(size, kernel, stride, padding, dilation, ceil_mode):
    """Output length of a max-pool along one axis, PyTorch's rule: with
    ``ceil_mode`` the last window must start inside the input or the left
    padding, never in the right padding."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = _kernels.ceil_div(span, stride) + 1
        if (out - 1) * stride >= size + padding:
            out -= 1
    else:
        out = span // stride + 1
    return out


def pool_window(kernel_size, stride, padding, dilation):
    """``(kernel, stride, padding, dilation)`` of a 2-D max-pool as ``(h, w)``
    pairs.  ``stride=None`` means ``kernel_size``; padding is at most
    ``kernel_size // 2`` per axis, as in PyTorch."""
    kernel = pair(kernel_size, "kernel_size", minimum=1)
    stride = kernel if stride is None else pair(stride, "stride", minimum=1)
    padding = pair(padding, "padding", minimum=0)
    dilation = pair(dilation, "dilation", minimum=1)
    for axis, k, p in zip("hw", kernel, padding):
        if p > k // 2:
            raise ValueError(
                f"padding must be at most kernel_size // 2 along each axis, "
                f"got padding {p} for kernel_size {k} along {axis}"
            )
    return kernel, stride, padding, dilation


def pool_output_shape(size, kernel, stride, padding, dilation, ceil_mode):
    """``(OH, OW)`` of a 2-D max-pool of an ``(H, W)`` image (all ``(h, w)``
    pairs), per axis ``pool_output_size``.  Every window must hold at least one
    input element: a dilated window whose taps all fall in the padding or step
    over the image (which PyTorch answers with -inf and a meaningless index),
    or over an axis of length 0 (see :func:`~cupyconv._args.check_window_fits`),
    is rejected."""
    if not isinstance(ceil_mode, (bool, numpy.bool_)):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    shape = []
    for axis, (n, k, s, p, d) in enumerate(zip(size, kernel, stride, padding, dilation)):
        out = pool_output_size(n, k, s, p, d, ceil_mode)
        _args.check_window_fits(out, axis, n, (p, p), kernel, dilation, "kernel_size", "x")
        name = "hw"[axis]
        if n == 0 and out > 0:
            raise ValueError(
                f"x has 0 {('row', 'column')[axis]}s: its "
                f"{_args.plural(out, 'window')} along {name} would hold only "
                f"padding ({p} on each side)"
            )
        # A window starting at or after row/column 0 holds its first tap
        # (the last window starts before the end, see pool_output_size), so
        # only those starting in the padding, and the last, need a look: is
        # their first tap at or after 0 still in the window and the image?
        # Without dilation the window is contiguous and reaches past the
        # padding (p <= k // 2), so none can miss.
        suspects = {*range(min(out, _kernels.ceil_div(p, s))), out - 1} if d > 1 and out else ()
        if any(_first_tap_misses(i * s - p, n, k, d) for i in suspects):
            raise ValueError(
                f"dilation {d} along {name} leaves a window with no input "
                f"element (input {n}, kernel_size {k}, padding {p})"
            )
        shape.append(out)
    return tuple(shape)


def _first_tap_misses(start, n, k, d):
    """Whether a window of ``k`` taps ``d`` apart starting at ``start``
    has no tap inside ``[0, n)``."""
    first = max(0, -(start // d))
    return first >= k or start + first * d >= n


class PoolGeometry(NamedTuple):
    """Geometry of one pooling call: sizes, layout and the (h, w) window;
    the input's and output's shapes in the layout, and whether the window
    is the 2x1 one (two rows into one: window (2, 1), stride (2, 1), no
    padding), worked out once by :func:`pool_geometry`, which caches the
    record per geometry."""

    layout: str
    n: int
    c: int
    h: int
    w: int
    oh: int
    ow: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    in_shape: tuple
    out_shape: tuple
    is_2x1: bool

    def shape(self, h, w):
        """Shape of an array of ``h x w`` images in this layout."""
        return _args.activation_shape(self.n, self.c, (h, w), self.layout)

    def rows(self):
        """``(planes, row, inner)`` of the 2x1 kernels' (planes, H, row) view:
        row element ``l`` is image column ``l // inner``."""
        if self.layout == "NHWC":
            return self.n, self.w * self.c, self.c
        return self.n * self.c, self.w, 1


@_args.per_geometry(maxsize=256)
def pool_geometry(x_shape, kernel_size, stride, padding, dilation, ceil_mode, layout):
    """Check a 2-D max-pool's arguments for an input of ``x_shape`` and
    return its :class:`PoolGeometry`."""
    layout = _args.check_layout(layout)
    kernel, stride, padding, dilation = pool_window(
        kernel_size, stride, padding, dilation)
    n, c, h, w = _args.spatial_shape(x_shape, layout)
    oh, ow = pool_output_shape(
        (h, w), kernel, stride, padding, dilation, ceil_mode)
    is_2x1 = kernel == (2, 1) and stride == (2, 1) and padding == (0, 0) and dilation[0] == 1
    return PoolGeometry(layout, n, c, h, w, oh, ow, kernel, stride, padding, dilation,
                        _args.activation_shape(n, c, (h, w), layout),
                        _args.activation_shape(n, c, (oh, ow), layout), is_2x1)
