"""What a user would write without cupyconv, for every benchmarked op.

``plain_*`` functions take the array module ``xp`` and run unchanged on NumPy
(the CPU's "plain NumPy" peer) and CuPy (the GPU's "plain CuPy" peer).
``loop_*`` functions are the naive CPU baselines: Python loops over taps,
windows or positions, each step a NumPy call, in the style of the seed
project's code (convolution at stride 1, then subsampled).

Activations are NHWC and weights HWIO ``(kh, kw, C_in, C_out)`` throughout;
padding is ``((top, bottom), (left, right))``.
"""

import numpy

__all__ = [
    "plain_dilate",
    "plain_undilate",
    "plain_pool",
    "plain_pool_backward",
    "plain_conv",
    "plain_conv_backward",
    "loop_dilate",
    "loop_undilate",
    "loop_pool",
    "loop_pool_backward",
    "loop_conv",
    "loop_conv_backward",
]


def _every(axes, dilation, ndim, stop=None):
    """Slices taking every ``(d+1)``-th position along each of ``axes``."""
    slices = [slice(None)] * ndim
    for axis, d in zip(axes, dilation):
        slices[axis] = slice(0, stop, d + 1)
    return tuple(slices)


def plain_dilate(xp, x, axes, dilation):
    """``zeros`` of the dilated shape, then one strided assignment."""
    shape = list(x.shape)
    for axis, d in zip(axes, dilation):
        shape[axis] *= d + 1
    out = xp.zeros(shape, x.dtype)
    out[_every(axes, dilation, x.ndim)] = x
    return out


def plain_undilate(xp, x, axes, dilation):
    """A strided view, copied to a contiguous array."""
    return xp.ascontiguousarray(x[_every(axes, dilation, x.ndim)])


def _pool_windows(x, kernel):
    """``(N, Ho, kh, Wo, kw, C)`` reshape of non-overlapping windows."""
    n, h, w, c = x.shape
    kh, kw = kernel
    ho, wo = h // kh, w // kw
    return x[:, : ho * kh, : wo * kw].reshape(n, ho, kh, wo, kw, c)


def plain_pool(xp, x, kernel):
    """Max-pool with stride == kernel, no padding: reshape, then ``max``."""
    return _pool_windows(x, kernel).max(axis=(2, 4))


def plain_pool_backward(xp, g, x, kernel):
    """Gradient of :func:`plain_pool`: the first maximum of each window
    (``argmax``) receives the window's output gradient."""
    n, h, w, c = x.shape
    kh, kw = kernel
    windows = _pool_windows(x, kernel).transpose(0, 1, 3, 5, 2, 4)
    ho, wo = windows.shape[1:3]
    first_max = windows.reshape(n, ho, wo, c, kh * kw).argmax(axis=-1)
    hit = xp.arange(kh * kw) == first_max[..., None]
    grad = (hit * g[..., None]).astype(x.dtype)
    grad = grad.reshape(n, ho, wo, c, kh, kw).transpose(0, 1, 4, 2, 5, 3)
    gx = xp.zeros_like(x)
    gx[:, : ho * kh, : wo * kw] = grad.reshape(n, ho * kh, wo * kw, c)
    return gx


def _pad(xp, x, padding):
    return xp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))


def _im2col(xp, x, kernel, stride, padding, dilation):
    """Sliding-window view ``(N, Ho, Wo, kh, kw, C)`` of the padded input,
    copied into the ``(N*Ho*Wo, kh*kw*C)`` column matrix."""
    xpad = _pad(xp, x, padding)
    n, hp, wp, c = xpad.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = xpad.strides
    view = xp.lib.stride_tricks.as_strided(
        xpad,
        shape=(n, ho, wo, kh, kw, c),
        strides=(s0, s1 * sh, s2 * sw, s1 * dh, s2 * dw, s3),
    )
    return view.reshape(n * ho * wo, kh * kw * c), (n, ho, wo)


def plain_conv(xp, x, w, stride, padding, dilation):
    """im2col, then one ``matmul`` with the ``(kh*kw*C_in, C_out)`` weights."""
    kh, kw, cin, cout = w.shape
    cols, (n, ho, wo) = _im2col(xp, x, (kh, kw), stride, padding, dilation)
    return xp.matmul(cols, w.reshape(-1, cout)).reshape(n, ho, wo, cout)


def plain_conv_backward(xp, x, w, g, stride, padding, dilation):
    """Forward output and both gradients through im2col: two more ``matmul``
    calls, then col2im as one strided add per kernel tap."""
    kh, kw, cin, cout = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    cols, (n, ho, wo) = _im2col(xp, x, (kh, kw), stride, padding, dilation)
    wmat = w.reshape(-1, cout)
    y = xp.matmul(cols, wmat).reshape(n, ho, wo, cout)
    g2 = g.reshape(-1, cout)
    gw = xp.matmul(cols.T, g2).reshape(w.shape)
    gcols = xp.matmul(g2, wmat.T).reshape(n, ho, wo, kh, kw, cin)
    (top, bottom), (left, right) = padding
    h, wd = x.shape[1:3]
    gxpad = xp.zeros((n, h + top + bottom, wd + left + right, cin), x.dtype)
    for i in range(kh):
        for j in range(kw):
            gxpad[:, i * dh : i * dh + (ho - 1) * sh + 1 : sh,
                  j * dw : j * dw + (wo - 1) * sw + 1 : sw] += gcols[:, :, :, i, j]
    return y, gxpad[:, top : top + h, left : left + wd], gw


def _positions(x, axes):
    return numpy.ndindex(*(x.shape[axis] for axis in axes))


def _at(ndim, axes, index):
    slices = [slice(None)] * ndim
    for axis, i in zip(axes, index):
        slices[axis] = i
    return tuple(slices)


def loop_dilate(x, axes, dilation):
    """One assignment per input position along the dilated axes."""
    shape = list(x.shape)
    for axis, d in zip(axes, dilation):
        shape[axis] *= d + 1
    out = numpy.zeros(shape, x.dtype)
    for pos in _positions(x, axes):
        target = [p * (d + 1) for p, d in zip(pos, dilation)]
        out[_at(x.ndim, axes, target)] = x[_at(x.ndim, axes, pos)]
    return out


def loop_undilate(x, axes, dilation):
    """One assignment per kept position."""
    shape = list(x.shape)
    for axis, d in zip(axes, dilation):
        shape[axis] = -(-shape[axis] // (d + 1))
    out = numpy.empty(shape, x.dtype)
    for pos in _positions(out, axes):
        source = [p * (d + 1) for p, d in zip(pos, dilation)]
        out[_at(x.ndim, axes, pos)] = x[_at(x.ndim, axes, source)]
    return out


def _window_starts(x, kernel, stride):
    n, h, w, c = x.shape
    ho = (h - kernel[0]) // stride[0] + 1
    wo = (w - kernel[1]) // stride[1] + 1
    return ho, wo


def loop_pool(x, kernel, stride):
    """One ``max`` per output position (no padding)."""
    (kh, kw), (sh, sw) = kernel, stride
    ho, wo = _window_starts(x, kernel, stride)
    y = numpy.empty((x.shape[0], ho, wo, x.shape[3]), x.dtype)
    for i in range(ho):
        for j in range(wo):
            y[:, i, j] = x[:, i * sh : i * sh + kh, j * sw : j * sw + kw].max(axis=(1, 2))
    return y


def loop_pool_backward(g, x, kernel, stride):
    """Per window: ``argmax``, then add the gradient at the first maximum."""
    (kh, kw), (sh, sw) = kernel, stride
    n, _, _, c = x.shape
    ho, wo = _window_starts(x, kernel, stride)
    gx = numpy.zeros_like(x)
    for i in range(ho):
        for j in range(wo):
            window = (slice(None), slice(i * sh, i * sh + kh), slice(j * sw, j * sw + kw))
            first_max = x[window].reshape(n, kh * kw, c).argmax(axis=1)
            grad = numpy.zeros((n, kh * kw, c), x.dtype)
            numpy.put_along_axis(grad, first_max[:, None], g[:, i, j][:, None], axis=1)
            gx[window] += grad.reshape(n, kh, kw, c)
    return gx


def _taps(x, w, padding, dilation):
    """Padded input, stride-1 output size, and each tap's input slice."""
    xpad = _pad(numpy, x, padding)
    kh, kw = w.shape[:2]
    dh, dw = dilation
    h1 = xpad.shape[1] - dh * (kh - 1)
    w1 = xpad.shape[2] - dw * (kw - 1)
    taps = [
        (i, j, (slice(None), slice(i * dh, i * dh + h1), slice(j * dw, j * dw + w1)))
        for i in range(kh)
        for j in range(kw)
    ]
    return xpad, (h1, w1), taps


def loop_conv(x, w, stride, padding, dilation):
    """Seed-style: per kernel tap one ``(N*H*W, C_in) @ (C_in, C_out)`` matmul
    accumulated at stride 1, then subsampled to the requested stride."""
    n, cin, cout = x.shape[0], w.shape[2], w.shape[3]
    xpad, (h1, w1), taps = _taps(x, w, padding, dilation)
    out = numpy.zeros((n * h1 * w1, cout), x.dtype)
    for i, j, window in taps:
        out += xpad[window].reshape(-1, cin) @ w[i, j]
    return out.reshape(n, h1, w1, cout)[:, :: stride[0], :: stride[1]]


def loop_conv_backward(x, w, g, stride, padding, dilation):
    """Forward and both gradients, tap by tap, at stride 1: the output
    gradient is first spread onto the stride-1 grid (zeros elsewhere)."""
    n, cin, cout = x.shape[0], w.shape[2], w.shape[3]
    y = loop_conv(x, w, stride, padding, dilation)
    xpad, (h1, w1), taps = _taps(x, w, padding, dilation)
    g1 = numpy.zeros((n, h1, w1, cout), x.dtype)
    g1[:, :: stride[0], :: stride[1]] = g
    g1 = g1.reshape(-1, cout)
    gxpad = numpy.zeros_like(xpad)
    gw = numpy.empty_like(w)
    for i, j, window in taps:
        gw[i, j] = xpad[window].reshape(-1, cin).T @ g1
        gxpad[window] += (g1 @ w[i, j].T).reshape(n, h1, w1, cin)
    (top, _), (left, _) = padding
    return y, gxpad[:, top : top + x.shape[1], left : left + x.shape[2]], gw
