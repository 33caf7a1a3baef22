"""The price-trend CNN of Jiang, Kelly & Xiu, forward and backward written out.

Convolution and max-pooling are cupyconv's; everything else (BatchNorm,
LeakyReLU, Dropout, Linear, softmax cross-entropy, Adam) is plain array code
in ``xp``, the array module of the input: NumPy on the CPU, CuPy on the GPU,
the same code for both.  Images are NHWC, convolution weights
``(kh, kw, C_in, C_out)``.

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
"""

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
from ..convolution._geometry import conv_output_size
from .charts import CHART_SPECS

__all__ = ["ARCHITECTURES", "PriceTrendCNN", "Adam", "softmax_cross_entropy",
           "layer_shapes"]

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


def _xavier_uniform(rng, shape, fan_in, fan_out, xp, dtype):
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return xp.asarray(rng.uniform(-bound, bound, size=shape), dtype=dtype)


class Layer:
    """A layer: ``forward(x, training)`` records what ``backward(grad)``
    needs; ``backward`` fills ``grads`` (same keys as ``params``) and returns
    the gradient with respect to ``x``."""

    def __init__(self):
        self.params, self.grads = {}, {}


class Conv2d(Layer):
    """Convolution without bias; weight ``(kh, kw, C_in, C_out)``."""

    def __init__(self, c_in, c_out, *, stride, padding, dilation, rng, xp, dtype):
        super().__init__()
        taps = KERNEL[0] * KERNEL[1]
        self.params = {"weight": _xavier_uniform(
            rng, KERNEL + (c_in, c_out), taps * c_in, taps * c_out, xp, dtype)}
        self.geometry = dict(stride=stride, padding=padding, dilation=dilation)

    def forward(self, x, training):
        self.x = x
        return conv2d(x, self.params["weight"], **self.geometry)

    def backward(self, grad):
        w = self.params["weight"]
        self.grads["weight"] = conv2d_weight(self.x, w.shape, grad, **self.geometry)
        return conv2d_input(self.x.shape, w, grad, **self.geometry)


class BatchNorm(Layer):
    """Per-channel (last axis) normalisation over every other axis.

    Training mode normalises with the batch's mean and biased variance and
    updates the running statistics; evaluation mode uses the running ones.
    """

    def __init__(self, channels, *, xp, dtype, momentum=0.1, eps=1e-5):
        super().__init__()
        self.params = {"weight": xp.ones(channels, dtype), "bias": xp.zeros(channels, dtype)}
        self.running_mean = xp.zeros(channels, dtype)
        self.running_var = xp.ones(channels, dtype)
        self.momentum, self.eps = momentum, eps

    def forward(self, x, training):
        axes = tuple(range(x.ndim - 1))
        if training:
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)
            count = x.size // x.shape[-1]
            m = self.momentum
            self.running_mean = (1 - m) * self.running_mean + m * mean
            self.running_var = (1 - m) * self.running_var + m * var * (count / (count - 1))
        else:
            mean, var = self.running_mean, self.running_var
        self.inv_std = 1.0 / (var + self.eps) ** 0.5
        self.x_hat = (x - mean) * self.inv_std
        return self.params["weight"] * self.x_hat + self.params["bias"]

    def backward(self, grad):
        # Training-mode gradient: mean and variance depend on every input.
        axes = tuple(range(grad.ndim - 1))
        count = grad.size // grad.shape[-1]
        self.grads["weight"] = (grad * self.x_hat).sum(axis=axes)
        self.grads["bias"] = grad.sum(axis=axes)
        grad_x_hat = grad * self.params["weight"]
        return (self.inv_std / count) * (
            count * grad_x_hat
            - grad_x_hat.sum(axis=axes)
            - self.x_hat * (grad_x_hat * self.x_hat).sum(axis=axes))


class LeakyReLU(Layer):
    def forward(self, x, training):
        self.positive = x > 0
        return get_array_module(x).where(self.positive, x, LEAKY_SLOPE * x)

    def backward(self, grad):
        return get_array_module(grad).where(self.positive, grad, LEAKY_SLOPE * grad)


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
        keep = self.rng.random(x.shape, dtype=x.dtype) >= self.p
        self.mask = keep.astype(x.dtype) / (1 - self.p)
        return x * self.mask

    def backward(self, grad):
        return grad if self.mask is None else grad * self.mask


class Linear(Layer):
    """``x @ weight + bias`` with weight ``(features_in, features_out)``."""

    def __init__(self, n_in, n_out, *, rng, xp, dtype):
        super().__init__()
        self.params = {"weight": _xavier_uniform(rng, (n_in, n_out), n_in, n_out, xp, dtype),
                       "bias": xp.zeros(n_out, dtype)}

    def forward(self, x, training):
        self.x = x
        return x @ self.params["weight"] + self.params["bias"]

    def backward(self, grad):
        self.grads["weight"] = self.x.T @ grad
        self.grads["bias"] = grad.sum(axis=0)
        return grad @ self.params["weight"].T


class PriceTrendCNN:
    """The 5-day or 20-day price-trend CNN (see the module docstring).

    Parameters
    ----------
    model : {"5day", "20day"}
        Architecture; its input is ``(N, 32, 15, 1)`` or ``(N, 64, 60, 1)``.
    xp : module, optional
        ``numpy`` (CPU) or ``cupy`` (GPU): where the parameters live.
    dtype : dtype, optional
        Floating dtype of parameters and activations.
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
        If ``model`` is unknown or ``dropout`` is outside ``[0, 1)``.

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
    """

    def __init__(self, model="5day", *, xp=numpy, dtype=numpy.float32, seed=0,
                 dropout=0.5):
        blocks = _architecture(model)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.model, self.xp, self.dtype = model, xp, numpy.dtype(dtype)
        init_rng = numpy.random.default_rng([seed, 0])  # a stream apart from dropout's
        made = dict(xp=xp, dtype=self.dtype)
        self.layers = []
        c_in = 1
        for k, block in enumerate(blocks, 1):
            geometry = {key: block[key] for key in ("stride", "padding", "dilation")}
            self.layers += [
                (f"block{k}.conv", Conv2d(c_in, block["channels"], rng=init_rng,
                                          **geometry, **made)),
                (f"block{k}.bn", BatchNorm(block["channels"], **made)),
                (f"block{k}.act", LeakyReLU()),
                (f"block{k}.pool", MaxPool()),
            ]
            c_in = block["channels"]
        features = layer_shapes(model)[-1][1][0]
        self.layers += [
            ("flatten", Flatten()),
            ("dropout", Dropout(dropout, xp.random.default_rng(seed))),
            ("fc", Linear(features, 2, rng=init_rng, **made)),
        ]

    def forward(self, x, training):
        """Logits ``(N, 2)`` of images ``x`` ``(N, H, W, 1)``; ``training``
        selects batch statistics and dropout (and records what backward needs)."""
        for _, layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, grad_logits):
        """Fill every layer's ``grads`` from ``d loss / d logits`` after a
        training-mode forward; return ``d loss / d images``."""
        grad = grad_logits
        for _, layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad

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
        ``(N, classes)``.
    labels : ndarray
        ``(N,)`` integers in ``[0, classes)``.

    Returns
    -------
    loss : 0-d ndarray
        ``mean(logsumexp(logits) - logits[label])``.
    grad : ndarray
        ``d loss / d logits = (softmax(logits) - onehot(labels)) / N``.

    Examples
    --------
    >>> import numpy as np
    >>> loss, grad = softmax_cross_entropy(np.array([[0.0, 0.0]]), np.array([1]))
    >>> round(float(loss), 6), grad
    (0.693147, array([[ 0.5, -0.5]]))
    """
    xp = get_array_module(logits)
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
