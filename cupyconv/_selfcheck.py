"""The quick self-check behind ``python -m cupyconv``.

Each check runs one op on a small random input.  With a GPU the CuPy result
is compared with the NumPy path; without one the NumPy path is compared with
a direct reference computed here (loops over the few output elements).
"""

import time

import numpy

import cupyconv as cc
from cupyconv.convolution._precision import PRECISIONS


def _reference_dilate(a, axis, d):
    out = numpy.zeros(a.shape[:axis] + (a.shape[axis] * (d + 1),) + a.shape[axis + 1:],
                      a.dtype)
    for j in range(a.shape[axis]):
        index = [slice(None)] * a.ndim
        index[axis] = j * (d + 1)
        out[tuple(index)] = numpy.take(a, j, axis=axis)
    return out


def _check_dilate(rng, xp):
    a = rng.standard_normal((3, 4, 5)).astype(numpy.float32)
    expected = (_reference_dilate(a, 1, 2) if xp is numpy else
                cc.dilate(a, axes=1, dilation=2))
    got = cc.dilate(xp.asarray(a), axes=1, dilation=2)
    if not numpy.array_equal(cc.asnumpy(got), expected):
        return "dilate differs from the reference"
    back = cc.undilate(got, axes=1, dilation=2)
    if not numpy.array_equal(cc.asnumpy(back), a):
        return "undilate(dilate(a)) != a"
    return None


def _reference_conv2d(x, w, stride, padding):
    """NHWC direct convolution in float64, looping over the output pixels."""
    (sh, sw), (ph, pw) = stride, padding
    kh, kw, _, c_out = w.shape
    xpad = numpy.pad(x.astype(numpy.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    oh = (xpad.shape[1] - kh) // sh + 1
    ow = (xpad.shape[2] - kw) // sw + 1
    out = numpy.zeros((x.shape[0], oh, ow, c_out))
    for i in range(oh):
        for j in range(ow):
            patch = xpad[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :]
            out[:, i, j, :] = numpy.einsum("nhwc,hwco->no", patch, w)
    return out


def _check_conv2d(rng, xp):
    x = rng.standard_normal((2, 9, 7, 3))
    w = rng.standard_normal((5, 3, 3, 4))
    got = cc.asnumpy(cc.conv2d(xp.asarray(x), xp.asarray(w), stride=(2, 1),
                               padding=(2, 1)))
    expected = (_reference_conv2d(x, w, (2, 1), (2, 1)) if xp is numpy else
                cc.conv2d(x, w, stride=(2, 1), padding=(2, 1)))
    if not numpy.allclose(got, expected, rtol=1e-10, atol=1e-10):
        return "conv2d differs from the reference"
    g = rng.standard_normal(got.shape)
    gx = cc.asnumpy(cc.conv2d_input(x.shape, xp.asarray(w), xp.asarray(g),
                                    stride=(2, 1), padding=(2, 1)))
    gw = cc.asnumpy(cc.conv2d_weight(xp.asarray(x), w.shape, xp.asarray(g),
                                     stride=(2, 1), padding=(2, 1)))
    # Adjointness: <conv(x, w), g> == <x, grad_x> == <w, grad_w>.
    total = numpy.sum(got * g)
    if not (numpy.isclose(numpy.sum(x * gx), total, rtol=1e-9)
            and numpy.isclose(numpy.sum(w * gw), total, rtol=1e-9)):
        return "conv2d gradients are not the adjoints of the forward pass"
    return None


def _check_max_pool2d(rng, xp):
    x = rng.integers(0, 4, size=(2, 7, 5, 3)).astype(numpy.float32)
    out, idx = cc.max_pool2d(xp.asarray(x), (2, 1), return_indices=True)
    out, idx = cc.asnumpy(out), cc.asnumpy(idx)
    top, bottom = x[:, 0:6:2], x[:, 1:6:2]
    if not numpy.array_equal(out, numpy.maximum(top, bottom)):
        return "max_pool2d (2x1) values differ from the reference"
    rows = numpy.arange(3)[None, :, None, None] * 2 + (bottom > top)
    if not numpy.array_equal(idx, rows * 5 + numpy.arange(5)[None, None, :, None]):
        return "max_pool2d (2x1) indices differ (ties must pick the first row)"
    g = rng.standard_normal(out.shape).astype(numpy.float32)
    gx = cc.asnumpy(cc.max_pool2d_backward(xp.asarray(g), xp.asarray(x), (2, 1)))
    if not numpy.isclose(gx.sum(), g.sum(), rtol=1e-5) or gx[:, 6].any():
        return "max_pool2d_backward does not route each window's gradient once"
    return None


CHECKS = {
    "dilate/undilate": _check_dilate,
    "conv2d + gradients": _check_conv2d,
    "max_pool2d + gradient": _check_max_pool2d,
}


def report():
    """Print version, backend and the self-check; return the exit status."""
    info = cc.backend_info()
    print(f"cupyconv {cc.__version__} (NumPy {info['numpy']}, numba {info['numba']})")
    if info["backend"] == "NumPy fallback":
        print(f"backend: NumPy fallback -- {info['reason']}")
        xp, against = numpy, "a direct reference"
    else:
        import cupy as xp

        print(f"backend: {info['backend']}: {info['device']}, CUDA {info['cuda']}, "
              f"CuPy {info['cupy']}")
        against = "the NumPy path"
    print(f"conv2d precision default: {cc.get_default_precision()} "
          f"(float32; choices {', '.join(PRECISIONS)})")
    print(f"self-check ({'CPU' if xp is numpy else 'GPU'} results against {against}):")
    failures = 0
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            problem = check(numpy.random.default_rng(0), xp)
        except Exception as exc:  # report every op, whatever breaks
            problem = f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - start
        failures += problem is not None
        print(f"  {name:<24} {'ok' if problem is None else 'FAILED: ' + problem}"
              f"  ({elapsed * 1000:.0f} ms)")
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0
