"""The demo's training step, cupyconv against the same model in PyTorch.

One step is what :func:`cupyconv.demo.train.train` does per batch: the
training-mode forward pass, softmax cross-entropy, the backward pass and an
Adam update.  :func:`torch_twin` builds the same network in PyTorch with the
same initial weights (``nn.Conv2d`` -> ``nn.BatchNorm2d`` ->
``nn.LeakyReLU`` -> ``nn.MaxPool2d`` blocks, ``nn.Flatten``,
``nn.Dropout``, ``nn.Linear``, ``torch.optim.Adam``), in NCHW or
channels_last memory format.  The images do not need a gradient on either
side, so neither computes one.

Mixed precision: given a scaler (a :class:`~cupyconv.demo.model.GradScaler`
for the model built with ``compute_dtype=numpy.float16``, a
``torch.amp.GradScaler`` for the twin), a step follows PyTorch's AMP
recipe: the forward pass and the loss under ``torch.autocast`` with
float16 (cupyconv's model casts as autocast does), the backward pass from
the scaled loss, then the scaler's step (unscale, skip on inf or nan) and
update.

Dropout draws its masks from each library's own generator, so two steps
agree only when both use the same mask: :func:`fixed_dropout` makes both
keep the inputs where given uniform numbers are at least ``p``, which the
benchmark does for the one call whose results it compares.

:func:`cupyconv_profiled_step` and :func:`torch_profiled_step` run a step
layer by layer, timing each layer's forward and backward: the benchmark
alternates them for its per-layer breakdown.
"""

import collections
import contextlib
import time

import numpy

import cupyconv

from ..demo import model as demo_model

__all__ = ["cupyconv_step", "torch_twin", "torch_step", "fixed_dropout",
           "cupyconv_profiled_step", "torch_profiled_step"]


def cupyconv_step(net, optimizer, images, labels, scaler=None):
    """One training step of ``net``, with loss scaling by ``scaler`` if
    given; returns ``(loss, logits)``."""
    logits = net.forward(images, training=True)
    loss, grad = demo_model.softmax_cross_entropy(logits, labels)
    net.backward(grad if scaler is None else scaler.scale(grad), input_gradient=False)
    _optimizer_step(optimizer, scaler)
    return loss, logits


def _optimizer_step(optimizer, scaler):
    """The optimizer's step, through ``scaler`` when given (cupyconv's
    GradScaler or PyTorch's: the same two calls)."""
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def torch_twin(torch, net, device="cpu", memory_format=None, lr=1e-4):
    """``(layers, optimizer)``: ``net``'s layers as PyTorch modules with its
    weights, as an ``nn.Sequential`` whose children have ``net``'s layer
    names (dots replaced by underscores), and ``torch.optim.Adam`` over
    them."""
    nn = torch.nn
    memory_format = memory_format or torch.contiguous_format
    modules = []
    for name, layer in net.layers:
        kind = name.rsplit(".", 1)[-1]
        if kind == "conv":
            w = layer.params["weight"]  # (kh, kw, C_in, C_out)
            module = nn.Conv2d(w.shape[2], w.shape[3], w.shape[:2], bias=False,
                               **layer.geometry)
            module.weight.data = _tensor(torch, w.transpose(3, 2, 0, 1), device)
        elif kind == "bn":
            module = nn.BatchNorm2d(len(layer.params["weight"]), eps=layer.eps,
                                    momentum=layer.momentum)
            module.weight.data = _tensor(torch, layer.params["weight"], device)
            module.bias.data = _tensor(torch, layer.params["bias"], device)
        elif kind == "act":
            module = nn.LeakyReLU(demo_model.LEAKY_SLOPE)
        elif kind == "pool":
            module = nn.MaxPool2d(demo_model.POOL)
        elif kind == "flatten":
            module = nn.Flatten()
        elif kind == "dropout":
            module = nn.Dropout(layer.p)
        elif kind == "fc":
            # Our Linear rows follow NHWC flattening (h, w, c); torch's (c, h, w).
            h, w, c = demo_model.layer_shapes(net.model)[-2][1]
            weight = layer.params["weight"].T.reshape(-1, h, w, c).transpose(0, 3, 1, 2)
            module = nn.Linear(h * w * c, weight.shape[0])
            module.weight.data = _tensor(torch, weight.reshape(weight.shape[0], -1), device)
            module.bias.data = _tensor(torch, layer.params["bias"], device)
        else:
            raise ValueError(f"no PyTorch twin for layer {name!r}")
        modules.append((name.replace(".", "_"), module))
    layers = nn.Sequential(collections.OrderedDict(modules)).to(
        device=device, dtype=getattr(torch, net.dtype.name), memory_format=memory_format)
    return layers, torch.optim.Adam(layers.parameters(), lr=lr)


def _tensor(torch, a, device):
    """A copy of ``a`` (never sharing its memory) on ``device``."""
    return torch.from_numpy(numpy.array(cupyconv.asnumpy(a), order="C")).to(device)


def torch_step(torch, layers, optimizer, images, labels, scaler=None):
    """One training step of the twin; with ``scaler`` (a
    ``torch.amp.GradScaler``) under ``torch.autocast`` with float16 and
    loss scaling.  Returns ``(loss, logits)``."""
    optimizer.zero_grad(set_to_none=True)
    with _autocast(torch, images, scaler):
        logits = layers(images)
        loss = torch.nn.functional.cross_entropy(logits, labels)
    (loss if scaler is None else scaler.scale(loss)).backward()
    _optimizer_step(optimizer, scaler)
    return loss, logits


def _autocast(torch, images, scaler):
    """float16 autocast on the images' device where a scaler is given."""
    if scaler is None:
        return contextlib.nullcontext()
    return torch.autocast(images.device.type, dtype=torch.float16)


@contextlib.contextmanager
def fixed_dropout(net, uniform, torch=None, layers=None):
    """Within the block, ``net``'s dropout (and its twin ``layers``' when
    given) keeps the inputs where ``uniform`` (``(N, features)``, NHWC
    flattening, in ``net``'s array module) is at least ``p``, scaling them
    by ``1 / (1 - p)`` as both libraries do."""
    dropout = dict(net.layers)["dropout"]
    saved_rng = dropout.rng
    dropout.rng = _Replay(uniform)
    saved_module = None
    if layers is not None:
        saved_module = layers.dropout
        h, w, c = demo_model.layer_shapes(net.model)[-2][1]
        chw = uniform.reshape(-1, h, w, c).transpose(0, 3, 1, 2).reshape(uniform.shape[0], -1)
        keep = torch.from_dlpack(chw.copy()).to(next(layers.parameters()).device) >= dropout.p
        layers.dropout = _mask_module(torch, keep, 1 / (1 - dropout.p))
    try:
        yield
    finally:
        dropout.rng = saved_rng
        if layers is not None:
            layers.dropout = saved_module


class _Replay:
    """A stand-in generator whose ``random`` returns given numbers."""

    def __init__(self, uniform):
        self.uniform = uniform

    def random(self, shape, dtype):
        return self.uniform.reshape(shape).astype(dtype, copy=False)


def _mask_module(torch, keep, scale):
    """A module multiplying its input by ``keep * scale``."""
    class Mask(torch.nn.Module):
        def forward(self, x):
            return x * keep.to(x.dtype) * scale
    return Mask()


def cupyconv_profiled_step(net, optimizer, images, labels, sync=lambda: None,
                           scaler=None):
    """A step of ``net`` as :func:`cupyconv_step` does it, layer by layer,
    timing each layer's forward (``"<layer> forward"``) and backward; returns
    ``{phase: seconds}``."""
    times = {}
    clock = _Clock(sync)
    x = images
    for name, layer in net.layers:
        x = layer.forward(x, training=True)
        times[f"{name} forward"] = clock.lap()
    loss, grad = demo_model.softmax_cross_entropy(x, labels)
    if scaler is not None:
        grad = scaler.scale(grad)
    times["loss"] = clock.lap()
    (first_name, first), *rest = net.layers
    # Scaled float16 gradients may overflow (the scaler skips that step), as
    # PriceTrendCNN.backward lets them, without a NumPy warning.
    with (numpy.errstate(over="ignore", invalid="ignore") if scaler is not None
          else contextlib.nullcontext()):
        for name, layer in reversed(rest):
            grad = layer.backward(grad)
            times[f"{name} backward"] = clock.lap()
        first.backward(grad, input_gradient=False)
    times[f"{first_name} backward"] = clock.lap()
    _optimizer_step(optimizer, scaler)
    times["optimizer"] = clock.lap()
    return times


def torch_profiled_step(torch, layers, optimizer, images, labels, sync=lambda: None,
                        scaler=None):
    """A step of the twin, one module at a time: each module's output is
    detached, so that each backward runs through that module alone (what
    autograd does in one sweep otherwise).  Names match
    :func:`cupyconv_profiled_step`'s."""
    names = [name.replace("_", ".") for name, _ in layers.named_children()]
    times = {}
    clock = _Clock(sync)
    optimizer.zero_grad(set_to_none=True)
    x, links = images, []
    with _autocast(torch, images, scaler):
        for name, module in zip(names, layers.children()):
            source = x.detach().requires_grad_(bool(links))
            x = module(source)
            links.append((name, source, x))
            times[f"{name} forward"] = clock.lap()
        logits = x.detach().requires_grad_()
        loss = torch.nn.functional.cross_entropy(logits, labels)
    (loss if scaler is None else scaler.scale(loss)).backward()
    times["loss"] = clock.lap()
    grad = logits.grad
    for name, source, out in reversed(links):
        out.backward(grad)
        grad = source.grad
        times[f"{name} backward"] = clock.lap()
    _optimizer_step(optimizer, scaler)
    times["optimizer"] = clock.lap()
    return times


class _Clock:
    def __init__(self, sync):
        self.sync = sync
        sync()
        self.last = time.perf_counter()

    def lap(self):
        self.sync()
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds
