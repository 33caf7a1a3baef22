"""The geometry of dilate and undilate: :class:`DilationGeometry`, built once
per call by :func:`dilate_geometry` or :func:`undilate_geometry` from the
arguments, before the call goes to the NumPy path (:mod:`._cpu`) or the
kernel (:mod:`._cuda`).
"""

from typing import NamedTuple

from .. import _args, _kernels


class DilationGeometry(NamedTuple):
    """The axes a call dilates or undilates, their factors ``d`` (``d``
    zeros after each element), and the shapes of the undilated array
    (``shape``) and the dilated one (``dilated_shape``).  dilate goes from
    the first to the second, undilate back."""

    axes: tuple
    dilation: tuple
    shape: tuple
    dilated_shape: tuple

    @property
    def steps(self):
        """Per axis of the array, the distance ``d + 1`` of neighbours in the
        dilated array (1 along an axis not dilated)."""
        steps = [1] * len(self.shape)
        for axis, d in zip(self.axes, self.dilation):
            steps[axis] = d + 1
        return tuple(steps)

    def lattice(self, ndim=None):
        """Index of the dilated array that selects the undilated array's
        elements: every ``(d+1)``-th position along each dilated axis, as many
        as the undilated array has.  ``ndim`` cuts it to an array's leading
        axes (one whose trailing axes, never dilated, are merged).  The
        leading ``...`` keeps a 0-d result an array (``a[()]`` is a scalar).
        """
        slices = [slice(None)] * len(self.shape)
        for axis, d in zip(self.axes, self.dilation):
            slices[axis] = slice(0, max(0, (self.shape[axis] - 1) * (d + 1) + 1), d + 1)
        return (Ellipsis, *slices[:ndim])


def _axes_and_factors(ndim, axes, dilation):
    axes = _args.normalize_axes(axes, ndim)
    dilation = _args.per_axis(dilation, len(axes), "dilation", minimum=0)
    return axes, dilation


@_args.per_geometry(maxsize=256)
def dilate_geometry(in_shape, axes, dilation, shape):
    """Check dilate's arguments for an input of ``in_shape``; the result's
    shape is ``n*(d+1)`` per dilated axis, or ``shape``."""
    axes, dilation = _axes_and_factors(len(in_shape), axes, dilation)
    dilated = _output_shape(in_shape, axes, dilation, shape)
    return DilationGeometry(axes, dilation, tuple(in_shape), tuple(dilated))


@_args.per_geometry(maxsize=256)
def undilate_geometry(in_shape, axes, dilation):
    """Check undilate's arguments for an input of ``in_shape``; the result
    keeps ``ceil(m / (d + 1))`` of an axis' ``m`` elements."""
    axes, dilation = _axes_and_factors(len(in_shape), axes, dilation)
    kept = list(in_shape)
    for axis, d in zip(axes, dilation):
        kept[axis] = _kernels.ceil_div(kept[axis], d + 1)
    return DilationGeometry(axes, dilation, tuple(kept), tuple(in_shape))


def _output_shape(in_shape, axes, dilation, shape):
    """Shape of ``dilate``'s result: ``n*(d+1)`` per dilated axis, or ``shape``."""
    if shape is None:
        out = list(in_shape)
        for axis, d in zip(axes, dilation):
            out[axis] *= d + 1
        _args.check_elements(out, "dilation: the result")
        return tuple(out)
    out = _args.shape_arg(shape, len(in_shape), "shape")
    _args.check_elements(out, "shape: the result")
    steps = dict(zip(axes, dilation))
    for axis, (n, m) in enumerate(zip(in_shape, out)):
        if axis in steps:
            need = max(0, (n - 1) * (steps[axis] + 1) + 1)
            if m < need:
                raise ValueError(
                    f"shape[{axis}] = {m} is too small: dilating {n} elements by "
                    f"{steps[axis]} needs at least {need}"
                )
        elif m != n:
            raise ValueError(
                f"shape[{axis}] = {m} differs from the input's {n} along an "
                "axis that is not dilated"
            )
    return out
