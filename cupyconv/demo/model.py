"""The price-trend CNN of Jiang, Kelly & Xiu, forward and backward written out.

Convolution and max-pooling are cupyconv's; everything else (BatchNorm,
LeakyReLU, Dropout, Linear, softmax cross-entropy, Adam) is plain array code
in ``xp``, the array module of the input: NumPy on the CPU, CuPy on the GPU,
the same code for both.  Images are NHWC, convolution weights
``(kh, kw, C_in, C_out)``.  BatchNorm and LeakyReLU see their arrays as
``(rows, channels)``: per-channel sums are ``einsum`` reductions over the
rows, and the elementwise passes run in place over cache-sized blocks of
rows, shared among the CPU cores (:func:`_by_rows`); on the GPU each pass
is one CuPy call over the whole array.

Architectures (each block is Conv (5, 3) -> BatchNorm -> LeakyReLU(0.01) ->
MaxPool (2, 1); the head is Flatten -> Dropout(0.5) -> Linear(-> 2))::

    5day:  (32, 15, 1)
           conv 64,  padding (2, 1)                       -> (32, 15, 64)
           pool                                           -> (16, 15, 64)
           conv 128, padding (2, 1)                       -> (16, 15, 128)
           pool                                           -> (8, 15, 128)
           flatten 8*15*128 = 15360 -> linear             -> (2,)

    20day: (64, 60, 1)
           conv 64, stride (3, 1), dilation (2, 1), padding (12, 1):
               rows (64 + 2*12 - 2*(5-1) - 1) // 3 + 1 = 27 -> (27, 60, 64)
           pool (27 // 2 = 13)                            -> (13, 60, 64)
           conv 128, padding (2, 1)                       -> (13, 60, 128)
           pool                                           -> (6, 60, 128)
           conv 256, padding (2, 1)                       -> (6, 60, 256)
           pool                                           -> (3, 60, 256)
           flatten 3*60*256 = 46080 -> linear             -> (2,)

(``layer_shapes`` computes these.)  The 20-day model's first padding is
chosen so that the flattened features number 46,080, the size of the paper's
fully connected layer, while the later blocks keep the 5-day model's
"same" padding (2, 1).

Flattening is in NHWC order, ``(row, column, channel)``; a PyTorch model
(NCHW) with the same weights needs the Linear weight's input axis permuted.

Initialisation follows the paper: Xavier-uniform weights (fan-in and fan-out
count the kernel's taps, as ``torch.nn.init.xavier_uniform_`` does), zero
biases, BatchNorm scale 1 and shift 0.  The convolutions have no bias: the
BatchNorm right after subtracts each channel's batch mean, which would
cancel it (its gradient is identically zero).  BatchNorm uses PyTorch's
conventions: ``eps = 1e-5``, running statistics updated with momentum 0.1,
the running variance unbiased.

Mixed precision (``compute_dtype=numpy.float16``, or bfloat16, with float32
parameters) follows ``torch.autocast``: the parameters, their gradients and
Adam's moments stay float32 (the master weights), and each layer computes
in the dtype of its activations:

* The convolutions and the Linear layer cast their input and their weights
  to ``compute_dtype`` (the weights afresh in every forward pass), sum their
  products in float32, round the result to ``compute_dtype``, and widen
  their weight gradients to float32.
* BatchNorm, LeakyReLU, max-pooling and dropout take and return
  ``compute_dtype``; BatchNorm's statistics, its running statistics and its
  affine map are float32, every result rounded once to ``compute_dtype``.
* The softmax cross-entropy takes the logits in float32.

float16 gradients below ``2**-24`` flush to zero: :class:`GradScaler` scales
the loss's gradient up before the backward pass and the parameters'
gradients back down before Adam's step, skipping a step whose gradients
overflowed, as ``torch.amp.GradScaler`` does.  ``dtype=numpy.float16``
alone runs everything in float16, parameters too (the sums still in
float32).
"""

import contextlib
import math

import numpy

from .. import (
    conv2d,
    conv2d_input,
    conv2d_weight,
    get_array_module,
    max_pool2d,
    max_pool2d_backward,
)
from .. import _parallel
from .._args import is_bfloat16
from .._kernels import accumulator_dtype
from ..convolution._geometry import conv_output_size
from .charts import CHART_SPECS

__all__ = ["ARCHITECTURES", "PriceTrendCNN", "Adam", "GradScaler",
           "softmax_cross_entropy", "layer_shapes"]

KERNEL = (5, 3)
POOL = (2, 1)
LEAKY_SLOPE = 0.01

# One dict per block: output channels and the first convolution's geometry.
ARCHITECTURES = {
    "5day": (
        dict(channels=64, stride=(1, 1), dilation=(1, 1), padding=(2, 1)),
        dict(channels=128, stride=(1, 1), dilation=(1, 1), padding=(2, 1)),
    ),
    "20day": (
        dict(channels=64, stride=(3, 1), dilation=(2, 1), padding=(12, 1)),
        dict(channels=128, stride=(1, 1), dilation=(1, 1), padding=(2, 1)),
        dict(channels=256, stride=(1, 1), dilation=(1, 1), padding=(2, 1)),
    ),
}


def layer_shapes(model="5day"):
    """Feature-map shapes ``(H, W, C)`` after each convolution and pooling.

    Parameters
    ----------
    model : {"5day", "20day"}

    Returns
    -------
    list of (str, tuple)
        ``("input", (H, W, 1))``, then ``("blockK.conv", ...)`` and
        ``("blockK.pool", ...)`` for each block, then ``("flatten", (F,))``.

    Raises
    ------
    ValueError
        If ``model`` is not a known architecture.

    Examples
    --------
    >>> for name, shape in layer_shapes("20day"):
    ...     print(name, shape)
    input (64, 60, 1)
    block1.conv (27, 60, 64)
    block1.pool (13, 60, 64)
    block2.conv (13, 60, 128)
    block2.pool (6, 60, 128)
    block3.conv (6, 60, 256)
    block3.pool (3, 60, 256)
    flatten (46080,)
    """
    blocks = _architecture(model)
    spec = CHART_SPECS[model]
    h, w, c = spec.height, spec.width, 1
    shapes = [("input", (h, w, c))]
    for k, block in enumerate(blocks, 1):
        h, w = (conv_output_size(size, kernel, s, p, p, d) for size, kernel, s, p, d in
                zip((h, w), KERNEL, block["stride"], block["padding"], block["dilation"]))
        c = block["channels"]
        shapes.append((f"block{k}.conv", (h, w, c)))
        h, w = h // POOL[0], w // POOL[1]
        shapes.append((f"block{k}.pool", (h, w, c)))
    shapes.append(("flatten", (h * w * c,)))
    return shapes


def _architecture(model):
    try:
        return ARCHITECTURES[model]
    except (KeyError, TypeError):
        raise ValueError(
            f"model must be one of {sorted(ARCHITECTURES)}, got {model!r}"
        ) from None


def _floating(dtype, name):
    """``dtype`` as a NumPy dtype, which must be a floating one (bfloat16
    counts)."""
    try:
        dtype = numpy.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a floating dtype, got {dtype!r}") from None
    if dtype.kind != "f" and not is_bfloat16(dtype):
        raise ValueError(f"{name} must be a floating dtype, got {dtype}")
    return dtype


def _xavier_uniform(rng, shape, fan_in, fan_out, xp, dtype):
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return xp.asarray(rng.uniform(-bound, bound, size=shape), dtype=dtype)


def _as_rows(a):
    """An NHWC array as ``(rows, channels)``: a view of a C-contiguous one
    (which the outputs made here are, so that updates reach them)."""
    return get_array_module(a).ascontiguousarray(a).reshape(-1, a.shape[-1])


def _column_sums(rows):
    """Per-channel sums of a ``(rows, channels)`` array (``einsum``'s loop
    adds whole rows, several times faster than ``sum(axis=0)``)."""
    return get_array_module(rows).einsum("ij->j", rows)


def _column_dots(a, b):
    """Per-channel ``sum(a * b)`` over the rows, without the product array."""
    return get_array_module(a).einsum("ij,ij->j", a, b)


def _widened(block, scratch):
    """``block`` where it has ``scratch``'s dtype, else its values copied
    into ``scratch`` (so that 16-bit rows are summed in float32)."""
    if block.dtype == scratch.dtype:
        return block
    scratch[...] = block
    return scratch


#: Rows of one block of :func:`_by_rows` hold about this many bytes per
#: array: the few passes over a block run in the core's cache.
_BLOCK_BYTES = 1 << 18


def _block_rows(first):
    """Rows per block of :func:`_by_rows`, counted in the dtype the passes
    compute in."""
    row_bytes = first.shape[-1] * accumulator_dtype(first.dtype).itemsize
    return max(1, _BLOCK_BYTES // max(1, row_bytes))


def _by_rows(function, *arrays, work=False):
    """``function(*blocks)`` over blocks of rows of the ``(rows, channels)``
    arrays, the first of which it fills.  NumPy arrays go in cache-sized
    blocks, shared among the cores as :mod:`cupyconv._parallel` shares the
    ops' work, so that the few passes over a block read memory once; CuPy
    arrays in one piece.

    With ``work``, ``function(work, *blocks)`` also gets a block to compute
    in, of the first array's accumulator dtype: the first array's own block
    where that is its dtype, else scratch, so that a 16-bit result is
    computed in float32 and rounded once, when stored."""
    first = arrays[0]
    wide = accumulator_dtype(first.dtype)
    if get_array_module(first) is not numpy:
        if work:
            arrays = (first if first.dtype == wide else
                      get_array_module(first).empty(first.shape, wide),) + arrays
        function(*arrays)
        return
    step = _block_rows(first)

    def blocks(lo, hi):
        scratch = None
        if work and first.dtype != wide:
            scratch = numpy.empty((min(step, hi - lo),) + first.shape[1:], wide)
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            parts = [a[start:stop] for a in arrays]
            if work:
                parts.insert(0, parts[0] if scratch is None else scratch[:stop - start])
            function(*parts)

    _parallel.for_each_range(blocks, len(first), first.nbytes * len(arrays))


def _sums_by_rows(function, *arrays):
    """Sums over the blocks of :func:`_by_rows` of the per-channel vectors
    that ``function(scratch, *blocks)`` returns, ``scratch`` an array of a
    block's shape, in the first array's accumulator dtype, to work in; the
    same on every run (the per-core sums are added in order).  Summing per
    block, then the blocks' sums, also keeps float32 rounding errors far
    below those of one running sum over all rows (which grow with their
    number)."""
    first = arrays[0]
    wide = accumulator_dtype(first.dtype)
    if get_array_module(first) is not numpy or len(first) == 0:
        return function(get_array_module(first).empty(first.shape, wide), *arrays)
    step = _block_rows(first)
    partial = {}

    def blocks(lo, hi):
        scratch = numpy.empty((min(step, hi - lo),) + first.shape[1:], wide)
        sums = None
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            parts = function(scratch[:stop - start], *(a[start:stop] for a in arrays))
            sums = parts if sums is None else [s + p for s, p in zip(sums, parts)]
        partial[lo] = sums

    _parallel.for_each_range(blocks, len(first), first.nbytes * len(arrays))
    ranges = sorted(partial)
    totals = list(partial[ranges[0]])
    for lo in ranges[1:]:
        totals = [t + p for t, p in zip(totals, partial[lo])]
    return totals


class Layer:
    """A layer: ``forward(x, training)`` records what ``backward(grad)``
    needs; ``backward`` fills ``grads`` (same keys as ``params``) and returns
    the gradient with respect to ``x``."""

    def __init__(self):
        self.params, self.grads = {}, {}


class Conv2d(Layer):
    """Convolution without bias; weight ``(kh, kw, C_in, C_out)``.  Input
    and weight are cast to ``compute_dtype``; the gradients come back in
    the dtypes of the input and the weight."""

    def __init__(self, c_in, c_out, *, stride, padding, dilation, rng, xp, dtype,
                 compute_dtype):
        super().__init__()
        taps = KERNEL[0] * KERNEL[1]
        self.params = {"weight": _xavier_uniform(
            rng, KERNEL + (c_in, c_out), taps * c_in, taps * c_out, xp, dtype)}
        self.geometry = dict(stride=stride, padding=padding, dilation=dilation)
        self.compute_dtype = compute_dtype

    def forward(self, x, training):
        self.input_dtype = x.dtype
        self.x = x.astype(self.compute_dtype, copy=False)
        self.compute_weight = self.params["weight"].astype(self.compute_dtype, copy=False)
        return conv2d(self.x, self.compute_weight, **self.geometry)

    def backward(self, grad, input_gradient=True):
        weight = self.params["weight"]
        self.grads["weight"] = conv2d_weight(self.x, weight.shape, grad, **self.geometry
                                             ).astype(weight.dtype, copy=False)
        if input_gradient:
            return conv2d_input(self.x.shape, self.compute_weight, grad, **self.geometry
                                ).astype(self.input_dtype, copy=False)
        return None


class BatchNorm(Layer):
    """Per-channel (last axis) normalisation over every other axis.

    Training mode normalises with the batch's mean and biased variance and
    updates the running statistics; evaluation mode uses the running ones.
    The arrays are seen as ``(rows, channels)`` and every pass goes over
    cache-sized blocks of rows shared among the cores (:func:`_by_rows`):
    one pass for the mean, one for the variance, one for the output.
    16-bit arrays are computed on in float32 (their accumulator dtype),
    and the output and input gradient rounded once.
    """

    def __init__(self, channels, *, xp, dtype, momentum=0.1, eps=1e-5):
        super().__init__()
        self.params = {"weight": xp.ones(channels, dtype), "bias": xp.zeros(channels, dtype)}
        self.running_mean = xp.zeros(channels, dtype)
        self.running_var = xp.ones(channels, dtype)
        self.momentum, self.eps = momentum, eps

    def forward(self, x, training):
        xp = get_array_module(x)
        self.rows = rows = _as_rows(x)
        count = len(rows)
        if training:
            (mean,) = _sums_by_rows(
                lambda scratch, r: (_column_sums(_widened(r, scratch)),), rows)
            mean /= count

            def squares(scratch, r):
                centered = xp.subtract(r, mean, out=scratch)
                return (_column_dots(centered, centered),)

            (var,) = _sums_by_rows(squares, rows)
            var /= count
            m = self.momentum  # in place: the statistics keep their dtype
            self.running_mean *= 1 - m
            self.running_mean += m * mean
            self.running_var *= 1 - m
            self.running_var += m * var * (count / (count - 1))
        else:
            wide = accumulator_dtype(x.dtype)
            mean = self.running_mean.astype(wide, copy=False)
            var = self.running_var.astype(wide, copy=False)
        self.mean, self.inv_std = mean, 1 / (var + self.eps) ** 0.5
        # y = weight * x_hat + bias with x_hat = (x - mean) * inv_std
        scale, bias = self.params["weight"] * self.inv_std, self.params["bias"]

        def affine(work, y, r):
            xp.subtract(r, mean, out=work)
            work *= scale
            xp.add(work, bias, out=y)

        y = xp.empty(rows.shape, rows.dtype)
        _by_rows(affine, y, rows, work=True)
        return y.reshape(x.shape)

    def backward(self, grad):
        # Training-mode gradient: mean and variance depend on every input.
        #   d x = weight * inv_std * (g - mean(g) - x_hat * mean(g * x_hat))
        # with the means over rows, x_hat = (x - mean) * inv_std.
        xp = get_array_module(grad)
        g_rows = _as_rows(grad)
        count = len(g_rows)
        mean = self.mean

        def moments(scratch, g, r):
            centered = xp.subtract(r, mean, out=scratch)
            grad_dot_centered = _column_dots(g, centered)
            return _column_sums(_widened(g, scratch)), grad_dot_centered

        grad_sum, grad_dot_centered = _sums_by_rows(moments, g_rows, self.rows)
        dtype = self.params["weight"].dtype
        self.grads["bias"] = grad_sum.astype(dtype, copy=False)
        self.grads["weight"] = (grad_dot_centered * self.inv_std).astype(dtype, copy=False)
        mean_grad = grad_sum / count
        per_centered = self.inv_std ** 2 * grad_dot_centered / count
        scale = self.params["weight"] * self.inv_std

        def input_grad(work, out, g, r):
            xp.subtract(r, mean, out=work)
            work *= per_centered
            xp.subtract(g, work, out=work)
            work -= mean_grad
            xp.multiply(work, scale, out=out)

        grad_x = xp.empty(g_rows.shape, g_rows.dtype)
        _by_rows(input_grad, grad_x, g_rows, self.rows, work=True)
        return grad_x.reshape(grad.shape)


class LeakyReLU(Layer):
    """``x`` where positive, else ``LEAKY_SLOPE * x`` (as ``max(x, slope*x)``,
    the slope being below 1); the backward pass finds the signs again in
    ``x``."""

    def forward(self, x, training):
        xp = get_array_module(x)
        self.x = x
        slope = accumulator_dtype(x.dtype).type(LEAKY_SLOPE)  # 16-bit x: slope * x in float32

        def leaky(y, x):
            xp.multiply(x, slope, out=y)
            xp.maximum(x, y, out=y)

        y = xp.empty(x.shape, x.dtype)
        _by_rows(leaky, _as_rows(y), _as_rows(x))
        return y

    def backward(self, grad):
        xp = get_array_module(grad)
        wide = accumulator_dtype(grad.dtype)

        def leaky_grad(out, g, x):
            # g * (1 where x > 0, else slope), the factor made from the signs:
            # several times faster than copyto(..., where=x > 0).
            factor = (x > 0).astype(wide)
            factor *= 1 - LEAKY_SLOPE
            factor += LEAKY_SLOPE
            xp.multiply(g, factor, out=out)

        grad_x = xp.empty(grad.shape, grad.dtype)
        _by_rows(leaky_grad, _as_rows(grad_x), _as_rows(grad), _as_rows(self.x))
        return grad_x


class MaxPool(Layer):
    """Max over each pair of rows (2x1 windows); the gradient goes to the
    first maximum of each window, as in PyTorch.  The backward pass finds
    the picks again from the input: for 2x1 windows that is cheaper than
    making and reading int64 indices."""

    def forward(self, x, training):
        self.x = x
        return max_pool2d(x, POOL)

    def backward(self, grad):
        return max_pool2d_backward(grad, self.x, POOL)


class Flatten(Layer):

    def forward(self, x, training):
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad):
        return grad.reshape(self.shape)


class Dropout(Layer):
    """Zero each input with probability ``p`` in training, scale the rest by
    ``1 / (1 - p)``; ``mask`` keeps the last training pass's factors."""

    def __init__(self, p, rng):
        super().__init__()
        self.p, self.rng = p, rng

    def forward(self, x, training):
        if not training or self.p == 0:
            self.mask = None
            return x
        keep = self.rng.random(x.shape, dtype=accumulator_dtype(x.dtype)) >= self.p
        self.mask = keep.astype(x.dtype) / (1 - self.p)
        return x * self.mask

    def backward(self, grad):
        return grad if self.mask is None else grad * self.mask


class Linear(Layer):
    """``x @ weight + bias`` with weight ``(features_in, features_out)``,
    input and parameters cast to ``compute_dtype`` (:func:`_matmul`); the
    gradients come back in the dtypes of the input and the parameters.
    The products are a few MFLOP: BLAS runs them on one thread (see
    :func:`cupyconv._parallel.single_threaded_blas`)."""

    def __init__(self, n_in, n_out, *, rng, xp, dtype, compute_dtype):
        super().__init__()
        self.params = {"weight": _xavier_uniform(rng, (n_in, n_out), n_in, n_out, xp, dtype),
                       "bias": xp.zeros(n_out, dtype)}
        self.compute_dtype = compute_dtype

    def forward(self, x, training):
        self.input_dtype = x.dtype
        self.x = x.astype(self.compute_dtype, copy=False)
        self.compute_weight = self.params["weight"].astype(self.compute_dtype, copy=False)
        bias = self.params["bias"].astype(self.compute_dtype, copy=False)
        with _small_products(x):
            return _matmul(self.x, self.compute_weight) + bias

    def backward(self, grad):
        grad = grad.astype(self.compute_dtype, copy=False)
        dtype = self.params["weight"].dtype
        with _small_products(grad):
            self.grads["weight"] = _matmul(self.x.T, grad).astype(dtype, copy=False)
            self.grads["bias"] = grad.sum(axis=0, dtype=accumulator_dtype(grad.dtype)
                                          ).astype(dtype, copy=False)
            return _matmul(grad, self.compute_weight.T).astype(self.input_dtype, copy=False)


def _small_products(a):
    if get_array_module(a) is numpy:
        return _parallel.single_threaded_blas()
    return contextlib.nullcontext()


def _matmul(a, b):
    """``a @ b`` of arrays of one dtype, summed in its accumulator dtype and
    rounded once: 16-bit NumPy operands are widened to float32 for BLAS
    (NumPy has no fast 16-bit product); cuBLAS sums 16-bit products in
    float32 itself."""
    wide = accumulator_dtype(a.dtype)
    if wide == a.dtype or get_array_module(a) is not numpy:
        return a @ b
    return (a.astype(wide) @ b.astype(wide)).astype(a.dtype)


class PriceTrendCNN:
    """The 5-day or 20-day price-trend CNN (see the module docstring).

    Parameters
    ----------
    model : {"5day", "20day"}
        Architecture; its input is ``(N, 32, 15, 1)`` or ``(N, 64, 60, 1)``.
    xp : module, optional
        ``numpy`` (CPU) or ``cupy`` (GPU): where the parameters live.
    dtype : dtype, optional
        Floating dtype of the parameters, their gradients and Adam's moments;
        also of the activations unless ``compute_dtype`` is given.
    compute_dtype : dtype, optional
        Floating dtype of the activations and of the convolutions' and the
        Linear layer's products, no wider than ``dtype``: ``numpy.float16``
        (or ``ml_dtypes.bfloat16``) with float32 parameters is mixed
        precision, as under ``torch.autocast`` (see the module docstring;
        train float16 with a :class:`GradScaler`).  Default: ``dtype``.
    seed : int, optional
        Seeds the initial weights and the dropout masks.
    dropout : float, optional
        Dropout probability before the Linear layer (0.5 in the paper).

    Attributes
    ----------
    layers : list of (str, layer)
        Named layers in order, e.g. ``"block1.conv"``, ``"fc"``.

    Raises
    ------
    ValueError
        If ``model`` is unknown, ``dropout`` is outside ``[0, 1)``, ``dtype``
        or ``compute_dtype`` is not a floating dtype, or ``compute_dtype``
        is wider than ``dtype``.

    Examples
    --------
    >>> import numpy as np
    >>> net = PriceTrendCNN("5day", dtype=np.float64, seed=0)
    >>> images = np.zeros((4, 32, 15, 1))
    >>> logits = net.forward(images, training=True)
    >>> logits.shape
    (4, 2)
    >>> loss, grad = softmax_cross_entropy(logits, np.array([0, 1, 1, 0]))
    >>> round(float(loss), 4)  # zero images, zero biases: equal logits
    0.6931
    >>> net.backward(grad).shape
    (4, 32, 15, 1)
    >>> [name for name, _, _ in net.parameters()][:3]
    ['block1.conv.weight', 'block1.bn.weight', 'block1.bn.bias']

    Mixed precision: float16 activations, float32 parameters and gradients.

    >>> mixed = PriceTrendCNN("5day", compute_dtype=np.float16, seed=0)
    >>> logits = mixed.forward(images.astype(np.float32), training=True)
    >>> logits.dtype
    dtype('float16')
    >>> loss, grad = softmax_cross_entropy(logits, np.array([0, 1, 1, 0]))
    >>> loss.dtype, mixed.backward(grad).dtype  # loss in float32, as the images
    (dtype('float32'), dtype('float32'))
    >>> sorted({g.dtype.name for _, _, g in mixed.parameters()})
    ['float32']
    """

    def __init__(self, model="5day", *, xp=numpy, dtype=numpy.float32, compute_dtype=None,
                 seed=0, dropout=0.5):
        blocks = _architecture(model)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.model, self.xp = model, xp
        self.dtype = _floating(dtype, "dtype")
        self.compute_dtype = (self.dtype if compute_dtype is None
                              else _floating(compute_dtype, "compute_dtype"))
        if self.compute_dtype.itemsize > self.dtype.itemsize:
            raise ValueError(f"compute_dtype must be no wider than dtype ({self.dtype}), "
                             f"got {self.compute_dtype}")
        init_rng = numpy.random.default_rng([seed, 0])  # a stream apart from dropout's
        made = dict(xp=xp, dtype=self.dtype)
        cast = dict(made, compute_dtype=self.compute_dtype)
        self.layers = []
        c_in = 1
        for k, block in enumerate(blocks, 1):
            geometry = {key: block[key] for key in ("stride", "padding", "dilation")}
            self.layers += [
                (f"block{k}.conv", Conv2d(c_in, block["channels"], rng=init_rng,
                                          **geometry, **cast)),
                (f"block{k}.bn", BatchNorm(block["channels"], **made)),
                (f"block{k}.act", LeakyReLU()),
                (f"block{k}.pool", MaxPool()),
            ]
            c_in = block["channels"]
        features = layer_shapes(model)[-1][1][0]
        self.layers += [
            ("flatten", Flatten()),
            ("dropout", Dropout(dropout, xp.random.default_rng(seed))),
            ("fc", Linear(features, 2, rng=init_rng, **cast)),
        ]

    def forward(self, x, training):
        """Logits ``(N, 2)``, of ``compute_dtype``, of images ``x`` ``(N, H,
        W, 1)``; ``training`` selects batch statistics and dropout (and
        records what backward needs)."""
        for _, layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, grad_logits, input_gradient=True):
        """Fill every layer's ``grads`` (of ``dtype``) from ``d loss / d
        logits`` after a training-mode forward; return ``d loss / d images``
        (of the images' dtype), or None without
        ``input_gradient`` (training needs none: the first convolution then
        skips its input gradient)."""
        grad = grad_logits
        (_, first), *rest = self.layers
        with self._overflow_allowed():
            for _, layer in reversed(rest):
                grad = layer.backward(grad)
            return first.backward(grad, input_gradient=input_gradient)

    def _overflow_allowed(self):
        """16-bit gradients scaled by a :class:`GradScaler` overflow to inf
        (and on to nan) now and then: no NumPy warning, the scaler skips
        that step."""
        if self.compute_dtype.itemsize > 2:
            return contextlib.nullcontext()
        return numpy.errstate(over="ignore", invalid="ignore")

    def parameters(self):
        """``(name, value, gradient)`` for every parameter, e.g.
        ``("block1.bn.weight", array, array)``; gradient is ``None`` before
        the first backward."""
        return [(f"{layer_name}.{name}", value, layer.grads.get(name))
                for layer_name, layer in self.layers
                for name, value in layer.params.items()]


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels.

    Parameters
    ----------
    logits : ndarray
        ``(N, classes)``; 16-bit logits are taken in float32, as
        ``torch.autocast`` runs the loss.
    labels : ndarray
        ``(N,)`` integers in ``[0, classes)``.

    Returns
    -------
    loss : 0-d ndarray
        ``mean(logsumexp(logits) - logits[label])``.
    grad : ndarray
        ``d loss / d logits = (softmax(logits) - onehot(labels)) / N``, of
        the loss's dtype.

    Examples
    --------
    >>> import numpy as np
    >>> loss, grad = softmax_cross_entropy(np.array([[0.0, 0.0]]), np.array([1]))
    >>> round(float(loss), 6), grad
    (0.693147, array([[ 0.5, -0.5]]))
    """
    xp = get_array_module(logits)
    logits = logits.astype(accumulator_dtype(logits.dtype), copy=False)
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    rows = xp.arange(n)
    loss = -log_probs[rows, labels].mean()
    grad = xp.exp(log_probs)
    grad[rows, labels] -= 1
    return loss, grad / n


class Adam:
    """Adam (Kingma & Ba), as ``torch.optim.Adam`` without weight decay.

    ``step()`` updates every parameter of ``model`` in place from its current
    gradient: ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g**2``,
    ``p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)``.

    Examples
    --------
    >>> import numpy as np
    >>> net = PriceTrendCNN("5day", dtype=np.float64, seed=0, dropout=0)
    >>> x = np.random.default_rng(0).random((8, 32, 15, 1))
    >>> y = np.array([0, 1] * 4)
    >>> opt = Adam(net, lr=1e-3)
    >>> losses = []
    >>> for _ in range(5):
    ...     loss, grad = softmax_cross_entropy(net.forward(x, training=True), y)
    ...     _ = net.backward(grad)
    ...     opt.step()
    ...     losses.append(float(loss))
    >>> losses[-1] < losses[0]
    True
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.model, self.lr, self.betas, self.eps = model, lr, betas, eps
        self.t = 0
        self.moments = {}

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        lr_t = self.lr / (1 - b1 ** self.t)
        root_correction = math.sqrt(1 - b2 ** self.t)
        for name, value, grad in self.model.parameters():
            if name not in self.moments:
                self.moments[name] = (self.model.xp.zeros_like(value),
                                      self.model.xp.zeros_like(value))
            m, v = self.moments[name]
            m *= b1
            m += (1 - b1) * grad
            v *= b2
            v += (1 - b2) * grad * grad
            value -= lr_t * m / (self.model.xp.sqrt(v) / root_correction + self.eps)


class GradScaler:
    """Dynamic loss scaling for float16 gradients, as ``torch.amp.GradScaler``.

    float16 gradients smaller than ``2**-24`` flush to zero.  The scaler
    multiplies ``d loss / d logits`` by a factor ``S`` before the backward
    pass (:meth:`scale`), so that every gradient computed in float16 is
    ``S`` times larger, and divides the parameters' float32 gradients by
    ``S`` before the optimizer's step (:meth:`step`).  A step whose
    gradients hold an inf or a nan (a float16 gradient overflowed) is
    skipped, and :meth:`update` multiplies ``S`` by ``backoff_factor``;
    after ``growth_interval`` steps in a row without one it multiplies
    ``S`` by ``growth_factor``.  Disabled (``enabled=False``), it passes
    the gradient through and always steps, so that one training loop
    serves every precision.

    Parameters
    ----------
    init_scale : float, optional
        The first ``S``; ``2**16``, as PyTorch's.
    growth_factor : float, optional
        Above 1.
    backoff_factor : float, optional
        In ``(0, 1)``.
    growth_interval : int, optional
        At least 1.
    enabled : bool, optional

    Raises
    ------
    ValueError
        For a factor or interval outside those ranges, or a non-positive
        ``init_scale``.

    Examples
    --------
    >>> import numpy as np
    >>> net = PriceTrendCNN("5day", compute_dtype=np.float16, seed=0, dropout=0)
    >>> opt, scaler = Adam(net, lr=1e-3), GradScaler()
    >>> x = np.random.default_rng(0).random((8, 32, 15, 1), np.float32)
    >>> y = np.arange(8) % 2
    >>> taken = []
    >>> for _ in range(3):
    ...     loss, grad = softmax_cross_entropy(net.forward(x, training=True), y)
    ...     _ = net.backward(scaler.scale(grad), input_gradient=False)
    ...     taken.append(scaler.step(opt))
    ...     scaler.update()
    >>> taken, scaler.get_scale()  # 2**16 times the gradients overflowed float16
    ([False, True, True], 32768.0)
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        if not 0 < init_scale < math.inf:
            raise ValueError(f"init_scale must be positive and finite, got {init_scale!r}")
        if not growth_factor > 1:
            raise ValueError(f"growth_factor must be above 1, got {growth_factor!r}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) \
                or growth_interval < 1:
            raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.enabled = growth_interval, bool(enabled)
        self._scale = float(init_scale)
        self._good_steps = 0  # steps in a row without an inf or nan
        self._found_inf = None  # of the last step, until update()

    def get_scale(self):
        """The current ``S`` (1.0 when disabled)."""
        return self._scale if self.enabled else 1.0

    def scale(self, grad):
        """``grad`` (``d loss / d logits``) times ``S``."""
        return grad * self._scale if self.enabled else grad

    def step(self, optimizer):
        """Divide the gradients of ``optimizer.model``'s parameters by ``S``
        (in place), then call ``optimizer.step()`` unless one of them holds
        an inf or a nan.  Returns whether the step was taken.

        Raises
        ------
        ValueError
            If a parameter has no gradient, or a 16-bit one (unscaling it
            would flush it to zero again: keep the parameters float32 and
            set ``compute_dtype``).
        """
        if not self.enabled:
            optimizer.step()
            return True
        model = optimizer.model
        grads = []
        for name, _, grad in model.parameters():
            if grad is None:
                raise ValueError(f"parameter {name} has no gradient: run backward first")
            if accumulator_dtype(grad.dtype) != grad.dtype:
                raise ValueError(f"parameter {name} has a {grad.dtype} gradient: scaled "
                                 f"16-bit gradients cannot be unscaled without underflow")
            grads.append(grad)
        inverse = 1.0 / self._scale
        for grad in grads:
            grad *= inverse
        xp = model.xp
        self._found_inf = not bool(xp.stack([xp.isfinite(g).all() for g in grads]).all())
        if not self._found_inf:
            optimizer.step()
        return not self._found_inf

    def update(self):
        """Adjust ``S`` after a :meth:`step`: times ``backoff_factor`` if it
        found an inf or nan, times ``growth_factor`` after
        ``growth_interval`` good steps in a row (while ``S`` stays a finite
        float32).

        Raises
        ------
        RuntimeError
            If no :meth:`step` came since the last update.
        """
        if not self.enabled:
            return
        if self._found_inf is None:
            raise RuntimeError("GradScaler.update() needs a step() first")
        if self._found_inf:
            self._scale *= self.backoff_factor
            self._good_steps = 0
        else:
            self._good_steps += 1
            if self._good_steps == self.growth_interval:
                grown = self._scale * self.growth_factor
                if grown <= numpy.finfo(numpy.float32).max:
                    self._scale = grown
                self._good_steps = 0
        self._found_inf = None
