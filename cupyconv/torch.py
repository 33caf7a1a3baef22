"""cupyconv's ops inside PyTorch models: autograd functions and ``nn`` modules.

``conv2d``, ``max_pool2d``, ``dilate`` and ``undilate`` take and return
``torch.Tensor`` s, record PyTorch's autograd graph (``loss.backward()`` works
through them, on the CPU and on CUDA) and run under ``torch.no_grad()`` and
``torch.compile``: each is a custom operator registered with
:mod:`torch.library` (namespace ``cupyconv``), with a fake (meta) kernel that
gives output shapes to the compiler and an autograd formula, so compiled
graphs keep them as single opaque nodes instead of breaking around them.
The tensors reach cupyconv's NumPy or CUDA code through DLPack, without a copy.

:class:`Conv2d` and :class:`MaxPool2d` are ``torch.nn.Conv2d`` and
``torch.nn.MaxPool2d`` with cupyconv's forward: same arguments, same
parameters, initialisation and ``state_dict``, so a model swaps its layers one
for one.

Importing this module imports PyTorch; ``import cupyconv`` does not.

Examples
--------
>>> import torch
>>> import cupyconv.torch as cct
>>> x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
>>> conv = cct.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
>>> y = cct.max_pool2d(conv(x), 2)
>>> y.shape
torch.Size([2, 4, 4, 4])
>>> y.sum().backward()
>>> x.grad.shape, conv.weight.grad.shape
(torch.Size([2, 3, 8, 8]), torch.Size([4, 3, 3, 3]))
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _args
from .convolution._geometry import conv_padding as _conv_padding
from .pooling._geometry import pool_window as _pool_window
from .convolution import conv2d as _conv2d, conv2d_input as _conv2d_input
from .convolution import conv2d_weight as _conv2d_weight
from .dilation import dilate as _dilate, undilate as _undilate
from .pooling import max_pool2d as _max_pool2d
from .pooling import max_pool2d_backward as _max_pool2d_backward

__all__ = ["conv2d", "max_pool2d", "dilate", "undilate", "Conv2d", "MaxPool2d"]


# --- geometry helpers (plain ints, or SymInts under torch.compile) ----------


def _spatial(shape, layout):
    """``(N, C, H, W)`` of an activation shape in ``layout``."""
    if layout == "NCHW":
        return shape[0], shape[1], shape[2], shape[3]
    return shape[0], shape[3], shape[1], shape[2]


def _activation(n, c, h, w, layout):
    return [n, c, h, w] if layout == "NCHW" else [n, h, w, c]


def _kernel_of(w_shape, layout):
    """``(C_out, kh, kw)`` of a kernel shape in ``layout`` (OIHW or HWIO)."""
    if layout == "NCHW":
        return w_shape[0], w_shape[2], w_shape[3]
    return w_shape[3], w_shape[0], w_shape[1]


def _conv_out(size, k, s, before, after, d):
    return (size + before + after - d * (k - 1) - 1) // s + 1


def _pool_out(size, k, s, p, d, ceil_mode):
    span = size + 2 * p - d * (k - 1) - 1
    if ceil_mode:
        out = (span + s - 1) // s + 1
        if (out - 1) * s >= size + p:
            out = out - 1
        return out
    return span // s + 1


# --- custom operators: the tensors' way into cupyconv ----------------------
# Each calls the public cupyconv function with detached tensors; cupyconv
# takes them through DLPack and gives torch tensors back.  Padding is passed
# resolved as [top, bottom, left, right] so that the schema holds ints only.


def _conv_keywords(stride, padding, dilation, groups, layout, precision):
    keywords = dict(stride=tuple(stride), padding=((padding[0], padding[1]),
                                                   (padding[2], padding[3])),
                    dilation=tuple(dilation), groups=groups, layout=layout)
    if precision is not None:  # only then: cupyconv's default otherwise
        keywords["precision"] = precision
    return keywords


@torch.library.custom_op("cupyconv::conv2d", mutates_args=())
def _conv2d_op(x: Tensor, w: Tensor, bias: Optional[Tensor], stride: List[int],
               padding: List[int], dilation: List[int], groups: int,
               layout: str, precision: Optional[str]) -> Tensor:
    return _conv2d(x.detach(), w.detach(),
                   None if bias is None else bias.detach(),
                   **_conv_keywords(stride, padding, dilation, groups, layout,
                                    precision))


@_conv2d_op.register_fake
def _(x, w, bias, stride, padding, dilation, groups, layout, precision):
    n, _, h, wd = _spatial(x.shape, layout)
    c_out, kh, kw = _kernel_of(w.shape, layout)
    oh = _conv_out(h, kh, stride[0], padding[0], padding[1], dilation[0])
    ow = _conv_out(wd, kw, stride[1], padding[2], padding[3], dilation[1])
    return x.new_empty(_activation(n, c_out, oh, ow, layout))


@torch.library.custom_op("cupyconv::conv2d_input", mutates_args=())
def _conv2d_input_op(input_shape: List[int], w: Tensor, grad_out: Tensor,
                     stride: List[int], padding: List[int], dilation: List[int],
                     groups: int, layout: str, precision: Optional[str]) -> Tensor:
    return _conv2d_input(tuple(input_shape), w.detach(), grad_out.detach(),
                         **_conv_keywords(stride, padding, dilation, groups, layout,
                                          precision))


@_conv2d_input_op.register_fake
def _(input_shape, w, grad_out, stride, padding, dilation, groups, layout,
      precision):
    return w.new_empty(input_shape)


@torch.library.custom_op("cupyconv::conv2d_weight", mutates_args=())
def _conv2d_weight_op(x: Tensor, weight_shape: List[int], grad_out: Tensor,
                      stride: List[int], padding: List[int], dilation: List[int],
                      groups: int, layout: str, precision: Optional[str]) -> Tensor:
    return _conv2d_weight(x.detach(), tuple(weight_shape), grad_out.detach(),
                          **_conv_keywords(stride, padding, dilation, groups, layout,
                                           precision))


@_conv2d_weight_op.register_fake
def _(x, weight_shape, grad_out, stride, padding, dilation, groups, layout,
      precision):
    return x.new_empty(weight_shape)


def _conv2d_setup(ctx, inputs, output):
    x, w, bias, *geometry = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = bias is not None
    ctx.geometry = geometry  # stride, padding, dilation, groups, layout, precision


def _conv2d_backward(ctx, grad_out):
    x, w = ctx.saved_tensors
    geometry = ctx.geometry
    grad_out = grad_out.contiguous()
    grad_x = grad_w = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _conv2d_input_op(list(x.shape), w, grad_out, *geometry)
    if ctx.needs_input_grad[1]:
        grad_w = _conv2d_weight_op(x, list(w.shape), grad_out, *geometry)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_out.sum(dim=(0, 2, 3) if geometry[4] == "NCHW" else (0, 1, 2))
    return (grad_x, grad_w, grad_bias) + (None,) * len(geometry)


_conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup)


@torch.library.custom_op("cupyconv::max_pool2d", mutates_args=())
def _max_pool2d_op(x: Tensor, kernel_size: List[int], stride: List[int],
                   padding: List[int], dilation: List[int], ceil_mode: bool,
                   layout: str) -> Tuple[Tensor, Tensor]:
    return _max_pool2d(x.detach(), kernel_size=tuple(kernel_size),
                       stride=tuple(stride), padding=tuple(padding),
                       dilation=tuple(dilation), ceil_mode=ceil_mode,
                       layout=layout, return_indices=True)


@_max_pool2d_op.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode, layout):
    n, c, h, w = _spatial(x.shape, layout)
    oh, ow = (_pool_out(size, k, s, p, d, ceil_mode) for size, k, s, p, d in
              zip((h, w), kernel_size, stride, padding, dilation))
    shape = _activation(n, c, oh, ow, layout)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("cupyconv::max_pool2d_backward", mutates_args=())
def _max_pool2d_backward_op(grad_out: Tensor, x: Tensor, indices: Tensor,
                            kernel_size: List[int], stride: List[int],
                            padding: List[int], dilation: List[int],
                            ceil_mode: bool, layout: str) -> Tensor:
    return _max_pool2d_backward(
        grad_out.detach(), x.detach(), kernel_size=tuple(kernel_size),
        stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
        ceil_mode=ceil_mode, layout=layout, indices=indices.detach())


@_max_pool2d_backward_op.register_fake
def _(grad_out, x, indices, kernel_size, stride, padding, dilation, ceil_mode,
      layout):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _max_pool2d_setup(ctx, inputs, output):
    x, *geometry = inputs
    ctx.save_for_backward(x, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.geometry = geometry


def _max_pool2d_grad(ctx, grad_out, _grad_indices):
    x, indices = ctx.saved_tensors
    grad_x = _max_pool2d_backward_op(grad_out.contiguous(), x, indices,
                                     *ctx.geometry)
    return (grad_x,) + (None,) * len(ctx.geometry)


_max_pool2d_op.register_autograd(_max_pool2d_grad, setup_context=_max_pool2d_setup)


@torch.library.custom_op("cupyconv::dilate", mutates_args=())
def _dilate_op(x: Tensor, axes: List[int], dilation: List[int],
               shape: Optional[List[int]]) -> Tensor:
    return _dilate(x.detach(), axes=tuple(axes), dilation=tuple(dilation),
                   shape=None if shape is None else tuple(shape))


@_dilate_op.register_fake
def _(x, axes, dilation, shape):
    if shape is not None:
        return x.new_empty(shape)
    out = list(x.shape)
    for axis, d in zip(axes, dilation):
        out[axis] = out[axis] * (d + 1)
    return x.new_empty(out)


@torch.library.custom_op("cupyconv::undilate", mutates_args=())
def _undilate_op(x: Tensor, axes: List[int], dilation: List[int]) -> Tensor:
    return _undilate(x.detach(), axes=tuple(axes), dilation=tuple(dilation))


@_undilate_op.register_fake
def _(x, axes, dilation):
    out = list(x.shape)
    for axis, d in zip(axes, dilation):
        out[axis] = (out[axis] + d) // (d + 1)
    return x.new_empty(out)


def _dilate_setup(ctx, inputs, output):
    x, axes, dilation, _shape = inputs
    ctx.in_shape = list(x.shape)
    ctx.axes, ctx.dilation = axes, dilation


def _dilate_grad(ctx, grad_out):
    grad = _undilate_op(grad_out.contiguous(), ctx.axes, ctx.dilation)
    # With a longer ``shape`` than n*(d+1), trailing kept positions were zeros.
    index = tuple(slice(0, n) for n in ctx.in_shape)
    return grad[index], None, None, None


def _undilate_setup(ctx, inputs, output):
    x, axes, dilation = inputs
    ctx.in_shape = list(x.shape)
    ctx.axes, ctx.dilation = axes, dilation


def _undilate_grad(ctx, grad_out):
    grad = _dilate_op(grad_out.contiguous(), ctx.axes, ctx.dilation, ctx.in_shape)
    return grad, None, None


_dilate_op.register_autograd(_dilate_grad, setup_context=_dilate_setup)
_undilate_op.register_autograd(_undilate_grad, setup_context=_undilate_setup)


# --- public functions: PyTorch's argument order and names -------------------


def _pair(value, name):
    return list(_args.pair(value, name))


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
           *, layout="NCHW", precision=None):
    """Differentiable :func:`cupyconv.conv2d` with
    :func:`torch.nn.functional.conv2d`'s arguments.

    ``y[n, co, oh, ow] = bias[co] + sum over c, i, j of
    xpad[n, g*C_in/groups + c, oh*sh + i*dh, ow*sw + j*dw] * weight[co, c, i, j]``.

    Parameters
    ----------
    input : torch.Tensor
        ``(N, C_in, H, W)`` (``layout="NHWC"``: ``(N, H, W, C_in)``), float16,
        float32 or float64, on the CPU or a CUDA device.
    weight : torch.Tensor
        ``(C_out, C_in // groups, kh, kw)`` (NHWC: ``(kh, kw, C_in // groups,
        C_out)``).
    bias : torch.Tensor, optional
        ``(C_out,)``.
    stride, dilation : int or (int, int)
    padding : int, (int, int), ((int, int), (int, int)), 'valid' or 'same'
        As for :func:`cupyconv.conv2d`; 'same' with a stride above 1 is
        allowed (TensorFlow's and JAX's rule).
    groups : int
    layout : {'NCHW', 'NHWC'}, keyword-only
    precision : str, optional, keyword-only
        Passed on to :func:`cupyconv.conv2d` and its gradients when given
        (where cupyconv has that argument); cupyconv's default otherwise.

    Returns
    -------
    torch.Tensor
        ``(N, C_out, OH, OW)`` (NHWC: ``(N, OH, OW, C_out)``), with a gradient
        function for ``input``, ``weight`` and ``bias``.

    Examples
    --------
    >>> import torch
    >>> import cupyconv.torch as cct
    >>> x = torch.ones(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    >>> y = cct.conv2d(x, torch.ones(1, 1, 3, 3, dtype=torch.float64))
    >>> y.detach().flatten().tolist()
    [9.0, 9.0, 9.0, 9.0]
    >>> y.sum().backward()
    >>> x.grad[0, 0, 0].tolist()
    [1.0, 2.0, 2.0, 1.0]
    """
    layout = _args.check_layout(layout)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    _, _, h, w = _spatial(input.shape, layout)
    _, kh, kw = _kernel_of(weight.shape, layout)
    (top, bottom), (left, right) = _conv_padding(
        padding, (int(kh), int(kw)), tuple(stride), tuple(dilation), (int(h), int(w)))
    if precision is not None and not isinstance(precision, str):
        raise TypeError(f"precision must be a string or None, got {precision!r}")
    return _conv2d_op(input, weight, bias, stride, [top, bottom, left, right],
                      dilation, _args.as_int(groups, "groups"), layout, precision)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, *,
               ceil_mode=False, return_indices=False, layout="NCHW"):
    """Differentiable :func:`cupyconv.max_pool2d` with
    :func:`torch.nn.functional.max_pool2d`'s arguments.

    Parameters
    ----------
    input : torch.Tensor
        ``(N, C, H, W)`` (``layout="NHWC"``: ``(N, H, W, C)``).
    kernel_size, stride, padding, dilation, ceil_mode
        As in PyTorch; ``stride`` defaults to ``kernel_size``.
    return_indices : bool
        Also return the int64 flat indices ``h*W + w`` of the maxima within
        their planes (PyTorch's convention); they carry no gradient.
    layout : {'NCHW', 'NHWC'}, keyword-only

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)

    Examples
    --------
    >>> import torch
    >>> import cupyconv.torch as cct
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> cct.max_pool2d(x, 2)[0, 0].tolist()
    [[5.0, 7.0], [13.0, 15.0]]
    """
    layout = _args.check_layout(layout)
    kernel, stride, padding, dilation = _pool_window(
        kernel_size, stride, padding, dilation)
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    out, indices = _max_pool2d_op(input, list(kernel), list(stride),
                                  list(padding), list(dilation), ceil_mode, layout)
    return (out, indices) if return_indices else out


def _axes_and_dilation(x, axes, dilation):
    axes = list(_args.normalize_axes(axes, x.dim()))
    return axes, list(_args.per_axis(dilation, len(axes), "dilation", minimum=0))


def dilate(input, axes, dilation, *, shape=None):
    """Differentiable :func:`cupyconv.dilate`: ``dilation[i]`` zeros after
    every element along ``axes[i]``; its gradient is :func:`undilate`.

    Examples
    --------
    >>> import torch
    >>> import cupyconv.torch as cct
    >>> cct.dilate(torch.tensor([1.0, 2.0]), 0, 1).tolist()
    [1.0, 0.0, 2.0, 0.0]
    """
    axes, dilation = _axes_and_dilation(input, axes, dilation)
    shape = None if shape is None else list(_args.shape_arg(shape, input.dim(), "shape"))
    return _dilate_op(input, axes, dilation, shape)


def undilate(input, axes, dilation):
    """Differentiable :func:`cupyconv.undilate`: every ``(dilation[i] + 1)``-th
    element along ``axes[i]``; its gradient is :func:`dilate`.

    Examples
    --------
    >>> import torch
    >>> import cupyconv.torch as cct
    >>> cct.undilate(torch.tensor([1.0, 0.0, 2.0, 0.0]), 0, 1).tolist()
    [1.0, 2.0]
    """
    axes, dilation = _axes_and_dilation(input, axes, dilation)
    return _undilate_op(input, axes, dilation)


# --- modules -----------------------------------------------------------------


class Conv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` computed by cupyconv.

    Same arguments, parameters (``weight`` of shape ``(C_out, C_in // groups,
    kh, kw)`` whatever the layout, ``bias``), initialisation (Kaiming-uniform
    with ``a = sqrt(5)``, bias uniform in ``+-1/sqrt(fan_in)``) and
    ``state_dict`` as ``torch.nn.Conv2d``; ``layout="NHWC"`` (keyword-only)
    takes and returns channels-last activations.

    Examples
    --------
    >>> import torch
    >>> import cupyconv.torch as cct
    >>> torch.manual_seed(0) is not None
    True
    >>> layer = cct.Conv2d(3, 8, (5, 3), padding=(2, 1))
    >>> layer(torch.randn(2, 3, 16, 16)).shape
    torch.Size([2, 8, 16, 16])
    """

    def __init__(self, *args, layout="NCHW", **kwargs):
        super().__init__(*args, **kwargs)
        self.layout = _args.check_layout(layout)
        if self.padding_mode != "zeros" and self.layout != "NCHW":
            raise ValueError(
                f"padding_mode={self.padding_mode!r} needs layout='NCHW', "
                f"got layout={self.layout!r}")

    def forward(self, input):
        weight = self.weight if self.layout == "NCHW" else self.weight.permute(2, 3, 1, 0)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                      mode=self.padding_mode)
            padding = 0
        return conv2d(input, weight, self.bias, self.stride, padding,
                      self.dilation, self.groups, layout=self.layout)

    def extra_repr(self):
        return super().extra_repr() + f", layout={self.layout!r}"


class MaxPool2d(nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` computed by cupyconv; ``layout`` as for
    :class:`Conv2d`.

    Examples
    --------
    >>> import torch
    >>> import cupyconv.torch as cct
    >>> cct.MaxPool2d((2, 1))(torch.randn(4, 64, 32, 15)).shape
    torch.Size([4, 64, 16, 15])
    """

    def __init__(self, *args, layout="NCHW", **kwargs):
        super().__init__(*args, **kwargs)
        self.layout = _args.check_layout(layout)

    def forward(self, input):
        return max_pool2d(input, self.kernel_size, self.stride, self.padding,
                          self.dilation, ceil_mode=self.ceil_mode,
                          return_indices=self.return_indices, layout=self.layout)

    def extra_repr(self):
        return super().extra_repr() + f", layout={self.layout!r}"

