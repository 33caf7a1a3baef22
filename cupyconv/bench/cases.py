"""The benchmark cases: which op, on which shapes, against which peers.

A :class:`Case` makes its inputs (NHWC activations, HWIO weights) with the
array module of its device; each :class:`Impl` turns those canonical inputs
into what its library wants (outside the timed region), runs the op, and
turns its outputs back into canonical arrays so the runner can check that
every implementation computes the same thing.
"""

import contextlib
import dataclasses
import math
from typing import Callable, Optional

import numpy

import cupyconv
from cupyconv.pooling import _fused

from . import peers

__all__ = ["Case", "Impl", "PEER_LABELS", "OPS", "build_cases", "import_torch"]

#: Peer key -> column heading, per device.
PEER_LABELS = {
    "cpu": {
        "cupyconv": "cupyconv (NumPy path)",
        "torch": "PyTorch CPU",
        "plain": "plain NumPy",
        "loop": "naive loop",
    },
    "gpu": {
        "cupyconv": "cupyconv (CUDA kernels)",
        "torch": "PyTorch cuDNN, TF32 off",
        "torch-tf32": "PyTorch cuDNN, TF32 on",
        "torch-fp16": "PyTorch cuDNN, autocast float16",
        "plain": "plain CuPy",
    },
}

#: Names accepted by ``--ops``.
OPS = ("dilate", "undilate", "max_pool2d", "conv2d", "train_step")


@dataclasses.dataclass
class Impl:
    """One way of computing a case.  ``peer`` groups variants (the best
    ``detail`` of a peer is what tables show)."""

    peer: str
    prepare: Callable  # canonical input dict -> state passed to run
    run: Callable  # state -> outputs
    to_canonical: Callable  # outputs -> tuple of canonical arrays
    detail: str = ""
    clock: str = "cupy"  # GPU event source: "cupy" or "torch"
    traced: bool = True  # tracemalloc sees its allocations
    context: Callable = contextlib.nullcontext
    profile: Optional[Callable] = None  # state -> {phase: seconds} of one call


@dataclasses.dataclass
class Case:
    key: str
    op: str
    group: str  # "memory", "seed", "resnet", "sweep", "train"
    device: str  # "cpu" or "gpu"
    title: str
    dtype: str
    shapes: dict
    params: dict
    make_inputs: Callable  # (xp, seed) -> dict of canonical arrays
    impls: list
    bytes: Optional[int] = None
    flops: Optional[int] = None
    note: str = ""
    #: Canonical inputs -> the outputs computed in float64, against which
    #: every implementation's error is reported (``error_vs_float64``).
    reference64: Optional[Callable] = None
    #: Key of the matmul rate (``references["matmul_tflops"]``) that
    #: ``pct_of_matmul`` compares with; the dtype when None.
    matmul_mode: Optional[str] = None
    profile_steps: int = 0  # calls of each Impl.profile for the per-layer breakdown
    #: Largest relative difference from the first implementation that counts
    #: as agreement (``max_rel_diff``); None: :data:`run.AGREEMENT_TOLERANCE`.
    tolerance: Optional[float] = None

    @property
    def bound(self):
        return "compute" if self.flops else "memory"

    @property
    def input_bytes(self):
        itemsize = numpy.dtype(self.dtype).itemsize
        return sum(math.prod(s) for s in self.shapes.values()) * itemsize


def import_torch(device):
    """``(torch, None)`` when PyTorch can run on ``device``, else ``(None, why)``."""
    try:
        import torch
    except ImportError as exc:
        return None, f"PyTorch is not installed ({exc})"
    if device == "gpu" and not torch.cuda.is_available():
        return None, "PyTorch has no CUDA device (CPU-only build or no driver)"
    return torch, None


def _random(xp, shape, dtype, seed):
    """Standard normal values of ``dtype`` (16-bit dtypes rounded from float32)."""
    draw = numpy.dtype(dtype) if numpy.dtype(dtype).itemsize >= 4 else numpy.float32
    if xp is numpy:
        values = numpy.random.default_rng(seed).standard_normal(shape, dtype=draw)
    else:
        values = xp.random.RandomState(seed).standard_normal(shape, dtype=draw)
    return values.astype(dtype, copy=False)


def _inputs(shapes, dtype):
    def make(xp, seed):
        return {name: _random(xp, shape, dtype, 1000 * seed + k)
                for k, (name, shape) in enumerate(shapes.items())}
    return make


def _identity(outputs):
    return outputs if isinstance(outputs, tuple) else (outputs,)


# --- PyTorch adapters ---------------------------------------------------

def _torch_layouts(torch):
    """``(detail, memory_format)`` pairs PyTorch may run NCHW ops in."""
    return (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last))


def _to_torch(torch, a, kind, memory_format, grad=False):
    """Canonical array -> tensor: ``kind`` "act" (NHWC -> NCHW), "weight"
    (HWIO -> OIHW) or "raw" (as is).  Shares memory where the layout allows."""
    t = torch.from_dlpack(a)
    if kind == "act":
        t = t.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
    elif kind == "weight":
        t = t.permute(3, 2, 0, 1).contiguous(memory_format=memory_format)
    return t.detach().requires_grad_(True) if grad else t


def _from_torch(xp, t, kind):
    t = t.detach()
    if kind == "act":
        t = t.permute(0, 2, 3, 1)
    elif kind == "weight":
        t = t.permute(2, 3, 1, 0)
    return xp.from_dlpack(t.contiguous())


def _torch_context(torch, device, tf32):
    """cuDNN autotuning on (``benchmark=True``), TF32 as asked, restored after."""
    if device != "gpu":
        return contextlib.nullcontext

    # PyTorch >= 2.9 sets TF32 per backend through ``fp32_precision`` and
    # raises if it is mixed with the legacy ``allow_tf32`` flags: use one.
    if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):
        precision = "tf32" if tf32 else "ieee"
        settings = [(torch.backends.cudnn.conv, "fp32_precision", precision),
                    (torch.backends.cuda.matmul, "fp32_precision", precision)]
    else:
        settings = [(torch.backends.cudnn, "allow_tf32", tf32),
                    (torch.backends.cuda.matmul, "allow_tf32", tf32)]
    settings.append((torch.backends.cudnn, "benchmark", True))

    @contextlib.contextmanager
    def context():
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in settings]
        try:
            for owner, name, value in settings:
                setattr(owner, name, value)
            yield
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)
    return context


def _torch_impls(torch, device, xp, kinds, run, out_kinds, layouts=True, tf32=False,
                 tf32_modes=None):
    """PyTorch variants of one op: every layout (NCHW, channels_last), and on
    the GPU with TF32 off and (if ``tf32``) on, or exactly ``tf32_modes``.
    ``kinds`` maps input names to "act"/"weight"/"raw"; grads are requested
    for names in ``run.grads``."""
    if torch is None:
        return []
    grads = getattr(run, "grads", ())
    impls = []
    layout_list = _torch_layouts(torch) if layouts else (("", torch.contiguous_format),)
    if tf32_modes is None:
        tf32_modes = (False, True) if (tf32 and device == "gpu") else (False,)
    for tf32_on in tf32_modes:
        for detail, fmt in layout_list:
            def prepare(inputs, fmt=fmt):
                return {name: _to_torch(torch, a, kinds[name], fmt, name in grads)
                        for name, a in inputs.items()}

            def canonical(outputs):
                return tuple(_from_torch(xp, t, k) for t, k in zip(_identity(outputs), out_kinds))

            impls.append(Impl(
                peer="torch-tf32" if tf32_on else "torch",
                prepare=prepare, run=run, to_canonical=canonical, detail=detail,
                clock="torch" if device == "gpu" else "cupy", traced=False,
                context=_torch_context(torch, device, tf32_on),
            ))
    return impls


def _numpy_only(function, *args, **kwargs):
    """``function(*args, **kwargs)`` with the fused CPU loops switched off."""
    with _fused.numpy_only():
        return function(*args, **kwargs)


def _direct(peer, run, detail=""):
    """An implementation that takes the canonical arrays as they are."""
    return Impl(peer=peer, prepare=lambda inputs: inputs, run=run,
                to_canonical=_identity, detail=detail)


# --- cases ----------------------------------------------------------------

def _mb(nbytes):
    return f"{nbytes / 1e6:.0f} MB"


def dilation_cases(device, xp, torch, shape, dtype="float32"):
    axes, dilation = (1, 2), (1, 1)
    itemsize = numpy.dtype(dtype).itemsize
    in_bytes = math.prod(shape) * itemsize
    out_dilated = in_bytes * 4
    cases = []

    def torch_dilate(s):
        x = s["x"]
        out = torch.zeros((x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]),
                          dtype=x.dtype, device=x.device)
        out[:, ::2, ::2] = x
        return out

    impls = [
        _direct("cupyconv", lambda s: cupyconv.dilate(s["x"], axes, dilation)),
        _direct("plain", lambda s: peers.plain_dilate(xp, s["x"], axes, dilation)),
    ]
    impls += _torch_impls(torch, device, xp, {"x": "raw"}, torch_dilate, ("raw",), layouts=False)
    if device == "cpu":
        impls.append(_direct("loop", lambda s: peers.loop_dilate(s["x"], axes, dilation),
                             detail="loop over (h, w)"))
    cases.append(Case(
        key="dilate", op="dilate", group="memory", device=device,
        title=f"dilate H,W by 1, {_mb(in_bytes)} in", dtype=dtype,
        shapes={"x": shape}, params={"axes": axes, "dilation": dilation},
        make_inputs=_inputs({"x": shape}, dtype), impls=impls,
        bytes=in_bytes + out_dilated,
        note="bytes = input read + dilated output written",
    ))

    def torch_undilate(s):
        return s["x"][:, ::2, ::2].contiguous()

    impls = [
        _direct("cupyconv", lambda s: cupyconv.undilate(s["x"], axes, dilation)),
        _direct("plain", lambda s: peers.plain_undilate(xp, s["x"], axes, dilation)),
    ]
    impls += _torch_impls(torch, device, xp, {"x": "raw"}, torch_undilate, ("raw",), layouts=False)
    if device == "cpu":
        impls.append(_direct("loop", lambda s: peers.loop_undilate(s["x"], axes, dilation),
                             detail="loop over (h, w)"))
    out_bytes = in_bytes // 4
    cases.append(Case(
        key="undilate", op="undilate", group="memory", device=device,
        title=f"undilate H,W by 1, {_mb(in_bytes)} in", dtype=dtype,
        shapes={"x": shape}, params={"axes": axes, "dilation": dilation},
        make_inputs=_inputs({"x": shape}, dtype), impls=impls,
        bytes=2 * out_bytes,
        note="bytes = kept elements read + output written",
    ))
    return cases


def pool_cases(device, xp, torch, shape, dtype="float32", key="pool2x1", group="memory",
               label=""):
    """The 2x1 pool's forward, backward and both, on NHWC ``shape``; ``key``
    prefixes the cases' keys and ``label`` names the data in their titles."""
    kernel = stride = (2, 1)
    n, h, w, c = shape
    out_shape = (n, h // 2, w, c)
    itemsize = numpy.dtype(dtype).itemsize
    in_bytes = math.prod(shape) * itemsize
    out_bytes = math.prod(out_shape) * itemsize
    data = f"{label}{_mb(in_bytes)} in"
    F = torch.nn.functional if torch is not None else None
    cases = []

    def torch_fwd(s):
        return F.max_pool2d(s["x"], kernel, stride)

    impls = [
        _direct("cupyconv", lambda s: cupyconv.max_pool2d(s["x"], kernel, stride)),
        _direct("plain", lambda s: peers.plain_pool(xp, s["x"], kernel), detail="reshape + max"),
    ]
    impls += _torch_impls(torch, device, xp, {"x": "act"}, torch_fwd, ("act",))
    if device == "cpu":
        impls.append(_direct("loop", lambda s: peers.loop_pool(s["x"], kernel, stride),
                             detail="loop over windows"))
    cases.append(Case(
        key=key, op="max_pool2d", group=group, device=device,
        title=f"max_pool2d 2x1 forward, {data}", dtype=dtype,
        shapes={"x": shape}, params={"kernel_size": kernel, "stride": stride},
        make_inputs=_inputs({"x": shape}, dtype), impls=impls,
        bytes=in_bytes + out_bytes, note="bytes = input read + output written",
    ))

    # Backward alone, in both of cupyconv's forms: picks found again from x,
    # or read from the indices the forward returned (computed once, untimed),
    # as a framework's backward step has them.
    def with_indices(inputs):
        _, indices = cupyconv.max_pool2d(inputs["x"], kernel, stride, return_indices=True)
        return {**inputs, "indices": indices}

    impls = [_direct("cupyconv", lambda s: cupyconv.max_pool2d_backward(
                 s["g"], s["x"], kernel, stride=stride), detail="picks from x"),
             Impl(peer="cupyconv", prepare=with_indices, to_canonical=_identity,
                  run=lambda s: cupyconv.max_pool2d_backward(
                      s["g"], s["x"], kernel, stride=stride, indices=s["indices"]),
                  detail="from indices"),
             _direct("plain", lambda s: peers.plain_pool_backward(xp, s["g"], s["x"], kernel),
                     detail="argmax mask from x")]
    if device == "cpu" and _fused.numba_version():
        # What an install without the jit extra runs (numba's loops switched off).
        impls.append(_direct("cupyconv", lambda s: _numpy_only(
            cupyconv.max_pool2d_backward, s["g"], s["x"], kernel, stride=stride),
            detail="picks from x, NumPy only"))
    impls += _torch_pool_backward_impls(torch, device, xp, kernel, stride)
    if device == "cpu":
        impls.append(_direct("loop", lambda s: peers.loop_pool_backward(
            s["g"], s["x"], kernel, stride), detail="loop over windows"))
    shapes = {"x": shape, "g": out_shape}
    out_elements = math.prod(out_shape)
    cases.append(Case(
        key=f"{key}_bwd", op="max_pool2d", group=group, device=device,
        title=f"max_pool2d 2x1 backward, {data}", dtype=dtype,
        shapes=shapes, params={"kernel_size": kernel, "stride": stride},
        make_inputs=_inputs(shapes, dtype), impls=impls,
        bytes=out_bytes + 8 * out_elements + in_bytes,
        note="bytes = grad_y and int64 indices read + grad_x written",
    ))

    def cupyconv_both(s):
        y = cupyconv.max_pool2d(s["x"], kernel, stride)
        return y, cupyconv.max_pool2d_backward(s["g"], s["x"], kernel, stride=stride)

    def plain_both(s):
        y = peers.plain_pool(xp, s["x"], kernel)
        return y, peers.plain_pool_backward(xp, s["g"], s["x"], kernel)

    def loop_both(s):
        y = peers.loop_pool(s["x"], kernel, stride)
        return y, peers.loop_pool_backward(s["g"], s["x"], kernel, stride)

    def torch_both(s):
        y = F.max_pool2d(s["x"], kernel, stride)
        (gx,) = torch.autograd.grad(y, (s["x"],), s["g"])
        return y, gx
    torch_both.grads = ("x",)

    impls = [_direct("cupyconv", cupyconv_both),
             _direct("plain", plain_both, detail="reshape + max, argmax mask")]
    impls += _torch_impls(torch, device, xp, {"x": "act", "g": "act"}, torch_both,
                          ("act", "act"))
    if device == "cpu":
        impls.append(_direct("loop", loop_both, detail="loop over windows"))
    shapes = {"x": shape, "g": out_shape}
    cases.append(Case(
        key=f"{key}_fwd_bwd", op="max_pool2d", group=group, device=device,
        title=f"max_pool2d 2x1 forward+backward, {data}", dtype=dtype,
        shapes=shapes, params={"kernel_size": kernel, "stride": stride},
        make_inputs=_inputs(shapes, dtype), impls=impls,
        bytes=3 * in_bytes + 2 * out_bytes,
        note="bytes = forward (x, y) + backward (x, grad_y read, grad_x written)",
    ))
    return cases


def window_pool_cases(device, xp, torch, n, c, hw, dtype="float32"):
    """A general window: the 3x3 pool with stride 2 and padding 1 that
    follows a ResNet's stem, forward and backward, on NHWC (n, hw, hw, c)."""
    kernel, stride, padding = (3, 3), (2, 2), (1, 1)
    shape, out_shape = (n, hw, hw, c), (n, (hw + 1) // 2, (hw + 1) // 2, c)
    itemsize = numpy.dtype(dtype).itemsize
    in_bytes = math.prod(shape) * itemsize
    out_bytes = math.prod(out_shape) * itemsize
    data = f"ResNet stem pool 3x3/2, pad 1, {n}x{hw}x{hw}x{c}, {_mb(in_bytes)} in"
    args = (kernel, stride, padding)

    def torch_fwd(s):
        return torch.nn.functional.max_pool2d(s["x"], *args)

    impls = [_direct("cupyconv", lambda s: cupyconv.max_pool2d(s["x"], *args))]
    if device == "cpu" and _fused.numba_version():
        impls.append(_direct("cupyconv", lambda s: _numpy_only(
            cupyconv.max_pool2d, s["x"], *args), detail="NumPy only"))
    impls += _torch_impls(torch, device, xp, {"x": "act"}, torch_fwd, ("act",))
    cases = [Case(
        key="window_pool", op="max_pool2d", group="resnet", device=device,
        title=f"max_pool2d forward, {data}", dtype=dtype, shapes={"x": shape},
        params={"kernel_size": kernel, "stride": stride, "padding": padding},
        make_inputs=_inputs({"x": shape}, dtype), impls=impls,
        bytes=in_bytes + out_bytes, note="bytes = input read + output written",
    )]

    def with_indices(inputs):
        _, indices = cupyconv.max_pool2d(inputs["x"], *args, return_indices=True)
        return {**inputs, "indices": indices}

    impls = [_direct("cupyconv", lambda s: cupyconv.max_pool2d_backward(
                 s["g"], s["x"], *args), detail="picks from x"),
             Impl(peer="cupyconv", prepare=with_indices, to_canonical=_identity,
                  run=lambda s: cupyconv.max_pool2d_backward(
                      s["g"], s["x"], *args, indices=s["indices"]),
                  detail="from indices")]
    if device == "cpu" and _fused.numba_version():
        impls.append(_direct("cupyconv", lambda s: _numpy_only(
            cupyconv.max_pool2d_backward, s["g"], s["x"], *args),
            detail="picks from x, NumPy only"))
    impls += _torch_pool_backward_impls(torch, device, xp, kernel, stride, padding)
    shapes = {"x": shape, "g": out_shape}
    cases.append(Case(
        key="window_pool_bwd", op="max_pool2d", group="resnet", device=device,
        title=f"max_pool2d backward, {data}", dtype=dtype, shapes=shapes,
        params={"kernel_size": kernel, "stride": stride, "padding": padding},
        make_inputs=_inputs(shapes, dtype), impls=impls,
        bytes=out_bytes + 8 * math.prod(out_shape) + in_bytes,
        note="bytes = grad_y and int64 indices read + grad_x written",
    ))
    return cases


def _torch_pool_backward_impls(torch, device, xp, kernel, stride, padding=(0, 0)):
    """PyTorch's max-pool backward from indices, in both memory formats: the
    op autograd calls (``max_pool2d_with_indices_backward``), with the
    forward's indices made once in ``prepare``."""
    if torch is None:
        return []
    backward = torch.ops.aten.max_pool2d_with_indices_backward
    impls = []
    for detail, fmt in _torch_layouts(torch):
        def prepare(inputs, fmt=fmt):
            x = _to_torch(torch, inputs["x"], "act", fmt)
            g = _to_torch(torch, inputs["g"], "act", fmt)
            _, indices = torch.nn.functional.max_pool2d(x, kernel, stride, padding,
                                                        return_indices=True)
            return {"x": x, "g": g, "indices": indices}

        impls.append(Impl(
            peer="torch", prepare=prepare, detail=detail,
            run=lambda s: backward(s["g"], s["x"], list(kernel), list(stride),
                                   list(padding), [1, 1], False, s["indices"]),
            to_canonical=lambda gx: (_from_torch(xp, gx, "act"),),
            clock="torch" if device == "gpu" else "cupy", traced=False,
            context=_torch_context(torch, device, False),
        ))
    return impls


#: Precision modes of the GPU's "precision" group: mode -> (dtype,
#: cupyconv's precision, PyTorch's TF32 setting, matmul rate key).  Each is
#: compared with cuDNN in the matching mode: TF32 on for "tf32", off for
#: "highest" and "3xtf32", the same dtype for float16 and bfloat16.
PRECISION_MODES = {
    "highest": ("float32", "highest", False, "float32"),
    "tf32": ("float32", "tf32", True, "tf32"),
    "3xtf32": ("float32", "3xtf32", False, "tf32"),
    "float16": ("float16", "highest", False, "float16"),
    "bfloat16": ("bfloat16", "highest", False, "bfloat16"),
}


def conv_case(device, xp, torch, *, key, group, title, n, c_in, c_out, hw, kernel,
              stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
              backward=False, loop=True, plain=True, tf32=True, dtype="float32", mode=None):
    """A conv2d case: forward, or forward + both gradients (``backward``).

    With ``mode`` (a key of :data:`PRECISION_MODES`) the case runs in that
    precision mode against PyTorch in the matching one only, and records
    every implementation's error against float64."""
    precision, tf32_modes, matmul_mode = "highest", None, None
    if mode is not None:
        dtype, precision, torch_tf32, matmul_mode = PRECISION_MODES[mode]
        tf32_modes, loop, plain = (torch_tf32,), False, False
        dtype = _bench_dtype(dtype)
    (h, w), (kh, kw), (sh, sw), (dh, dw) = hw, kernel, stride, dilation
    (pt, pb), (pl, pr) = padding
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    shapes = {"x": (n, h, w, c_in), "w": (kh, kw, c_in, c_out)}
    if backward:
        shapes["g"] = (n, ho, wo, c_out)
    args = dict(stride=stride, padding=padding, dilation=dilation)
    ours = dict(args, precision=precision)
    flops = 2 * n * ho * wo * c_out * kh * kw * c_in * (3 if backward else 1)
    itemsize = numpy.dtype(dtype).itemsize
    nbytes = (n * h * w * c_in + kh * kw * c_in * c_out + n * ho * wo * c_out) * itemsize
    F = torch.nn.functional if torch is not None else None
    kinds = {"x": "act", "w": "weight", "g": "act"}

    if backward:
        def cupyconv_run(s, ours=ours):
            x, wt, g = s["x"], s["w"], s["g"]
            return (cupyconv.conv2d(x, wt, **ours),
                    cupyconv.conv2d_input(x.shape, wt, g, **ours),
                    cupyconv.conv2d_weight(x, wt.shape, g, **ours))

        def torch_run(s):
            y = F.conv2d(s["x"], s["w"], None, stride, (pt, pl), dilation)
            gx, gw = torch.autograd.grad(y, (s["x"], s["w"]), s["g"])
            return y, gx, gw
        torch_run.grads = ("x", "w")
        out_kinds = ("act", "act", "weight")
        plain_run = lambda s: peers.plain_conv_backward(xp, s["x"], s["w"], s["g"], **args)
        loop_run = lambda s: peers.loop_conv_backward(s["x"], s["w"], s["g"], **args)
        bytes_ = 3 * nbytes
    else:
        def cupyconv_run(s, ours=ours):
            return cupyconv.conv2d(s["x"], s["w"], **ours)

        def torch_run(s):
            return F.conv2d(s["x"], s["w"], None, stride, (pt, pl), dilation)
        out_kinds = ("act",)
        plain_run = lambda s: peers.plain_conv(xp, s["x"], s["w"], **args)
        loop_run = lambda s: peers.loop_conv(s["x"], s["w"], **args)
        bytes_ = nbytes

    if pt != pb or pl != pr:
        raise ValueError("PyTorch's conv2d takes symmetric padding only")
    impls = [_direct("cupyconv", cupyconv_run, detail="" if mode is None else mode)]
    impls += _torch_impls(torch, device, xp, kinds, torch_run, out_kinds, tf32=tf32,
                          tf32_modes=tf32_modes)
    if plain:
        impls.append(_direct("plain", plain_run, detail="im2col + matmul"))
    if loop and device == "cpu":
        impls.append(_direct("loop", loop_run, detail="per-tap matmul at stride 1"))
    what = "forward+grads" if backward else "forward"
    reference64 = None
    if mode is not None:
        def reference64(inputs):
            wide = {name: a.astype(numpy.float64) for name, a in inputs.items()}
            return _identity(cupyconv_run(wide, ours=args))
    suffix = "" if mode is None else f"_{mode}"
    return Case(
        key=f"{key}_{'fwd_bwd' if backward else 'fwd'}{suffix}", op="conv2d", group=group,
        device=device, title=f"conv2d {what}, {title}" + ("" if mode is None else f", {mode}"),
        dtype=numpy.dtype(dtype).name, shapes=shapes,
        params={"kernel": kernel, **args, **({} if mode is None else {"mode": mode})},
        make_inputs=_inputs(shapes, dtype), impls=impls, flops=flops, bytes=bytes_,
        note="flops = 2*N*Ho*Wo*C_out*kh*kw*C_in" + (", x3 with both gradients" if backward else ""),
        reference64=reference64, matmul_mode=matmul_mode,
    )


def _bench_dtype(name):
    """``name`` as a NumPy dtype; bfloat16 through ml_dtypes (imported here,
    only by the precision cases that use it)."""
    if name == "bfloat16":
        import ml_dtypes

        return numpy.dtype(ml_dtypes.bfloat16)
    return numpy.dtype(name)


def _sizes(device, quick):
    """Problem sizes per device; ``quick`` shrinks everything for smoke tests."""
    if quick:
        return dict(memory=(2, 16, 16, 4), seed_n=4, day20_n=1, resnet=(1, 8, 16),
                    sweep=(1, 2), train_n=2, profile_steps=1)
    if device == "gpu":
        # 64*256*256*16 float32 = 256 MiB input for the memory-bound ops.
        return dict(memory=(64, 256, 256, 16), seed_n=128, day20_n=128,
                    resnet=(32, 64, 56), sweep=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                    train_n=128, profile_steps=10)
    return dict(memory=(16, 128, 128, 16), seed_n=128, day20_n=32, resnet=(8, 64, 56),
                sweep=(1, 4, 16, 64, 256), train_n=128, profile_steps=5)


def build_cases(device, ops=OPS, quick=False):
    """Every case for ``device`` ("cpu" or "gpu") whose op is in ``ops``."""
    xp = numpy
    if device == "gpu":
        import cupy as xp
    torch, _ = import_torch(device)
    size = _sizes(device, quick)
    cases = []
    if "dilate" in ops or "undilate" in ops:
        cases += [c for c in dilation_cases(device, xp, torch, size["memory"]) if c.op in ops]
    if "max_pool2d" in ops:
        cases += pool_cases(device, xp, torch, size["memory"])
        # The seed's pool: its first conv layer's output, two rows into one.
        cases += pool_cases(device, xp, torch, (size["seed_n"], 32, 15, 64),
                            key="seed_pool", group="seed",
                            label=f"seed L1 output {size['seed_n']}x32x15x64, ")
        rn, rc, rhw = size["resnet"]
        cases += window_pool_cases(device, xp, torch, rn, rc, 2 * rhw)
    if "conv2d" in ops:
        seed = dict(kernel=(5, 3), padding=((2, 2), (1, 1)))
        n = size["seed_n"]
        layers = [
            dict(key="seed_l1", group="seed", title=f"seed L1 1->64, 32x15, N={n}",
                 n=n, c_in=1, c_out=64, hw=(32, 15), **seed),
            dict(key="seed_l2", group="seed", title=f"seed L2 64->128, 16x15, N={n}",
                 n=n, c_in=64, c_out=128, hw=(16, 15), **seed),
            dict(key="seed20_l1", group="seed",
                 title=f"seed 20-day L1 1->64, 64x60, stride (3,1), dilation (2,1), "
                       f"N={size['day20_n']}",
                 n=size["day20_n"], c_in=1, c_out=64, hw=(64, 60), kernel=(5, 3),
                 stride=(3, 1), padding=((12, 12), (1, 1)), dilation=(2, 1)),
        ]
        if quick:  # one layer per code path is enough to check the tool works
            del layers[1]
        rn, rc, rhw = size["resnet"]
        layers.append(dict(key="resnet", group="resnet",
                           title=f"ResNet 3x3 {rc}->{rc}, {rhw}x{rhw}, N={rn}",
                           n=rn, c_in=rc, c_out=rc, hw=(rhw, rhw), kernel=(3, 3),
                           padding=((1, 1), (1, 1))))
        for layer in layers:
            for backward in (False, True):
                cases.append(conv_case(device, xp, torch, backward=backward, **layer))
        for batch in size["sweep"]:
            cases.append(conv_case(
                device, xp, torch, key=f"sweep_n{batch}", group="sweep",
                title=f"seed L2 64->128, 16x15, N={batch}", n=batch, c_in=64, c_out=128,
                hw=(16, 15), loop=False, plain=False, tf32=False, **seed))
        if device == "gpu":
            cases += _precision_cases(device, xp, torch, layers, size, seed, quick)
    if "train_step" in ops:
        for model in ("5day", "20day"):
            for mode in TRAIN_MODES if device == "gpu" else ("float32",):
                cases.append(train_step_case(device, xp, torch, model, size["train_n"],
                                             size["profile_steps"], mode))
    return cases


def _precision_cases(device, xp, torch, layers, size, seed, quick):
    """The "precision" group: every layer forward and forward+grads, and the
    batch sweep, in every mode of :data:`PRECISION_MODES` against cuDNN in
    the matching mode (quick: the last layer's forward per mode)."""
    cases = []
    for mode in PRECISION_MODES:
        for layer in (layers[-1:] if quick else layers):
            for backward in ((False,) if quick else (False, True)):
                cases.append(conv_case(device, xp, torch, backward=backward, mode=mode,
                                       **dict(layer, group="precision")))
        for batch in (() if quick else size["sweep"]):
            cases.append(conv_case(
                device, xp, torch, key=f"sweep_n{batch}", group="precision",
                title=f"seed L2 64->128, 16x15, N={batch}", n=batch, c_in=64, c_out=128,
                hw=(16, 15), mode=mode, **seed))
    return cases


# --- the demo's training step ---------------------------------------------

#: Precision modes of the training step (the GPU runs each, the CPU
#: float32): mode -> (title suffix, cupyconv's variant, PyTorch's peer,
#: agreement tolerance).  "float32" is exact float32 on both sides (TF32
#: off); "tf32" the float32 model under ``cupyconv.default_precision("tf32")``
#: against PyTorch with TF32 on; "float16" mixed precision, the model with
#: ``compute_dtype=float16`` and a GradScaler against the twin under
#: ``torch.autocast`` with float16 and ``torch.amp.GradScaler``.  float16
#: results differ by a few float16 roundings (2**-11 each) through every
#: layer, hence the looser tolerance.
TRAIN_MODES = {
    "float32": ("", "", "torch", None),
    "tf32": (", TF32", "tf32", "torch-tf32", None),
    "float16": (", float16 mixed precision", "float16 mixed", "torch-fp16", 2e-2),
}


def train_step_case(device, xp, torch, model, n, profile_steps, mode="float32"):
    """One training step of the demo's CNN (``model`` "5day" or "20day",
    batch ``n``): forward, softmax cross-entropy, backward, Adam, against
    the same network in PyTorch (see :mod:`cupyconv.bench.trainstep`), both
    in precision ``mode`` (a key of :data:`TRAIN_MODES`).

    Every implementation trains its own copy of the network, from the same
    initial weights, a step per call.  The first call, whose loss, logits
    and Linear weight gradient are compared, applies the dropout mask
    given by the inputs' ``uniform`` on both sides; later calls draw their
    own masks, as training does.  (Deeper gradients are float32 sums of
    cancelling terms: two of PyTorch's own convolution algorithms give
    first-layer weight gradients 0.6% apart.  The tests compare every
    gradient with PyTorch's in float64.)"""
    from ..demo import model as demo_model
    from ..demo.charts import CHART_SPECS, make_charts
    from . import trainstep

    title_suffix, detail, _, tolerance = TRAIN_MODES[mode]
    spec = CHART_SPECS[model]
    features = demo_model.layer_shapes(model)[-1][1][0]
    shapes = {"images": (n, spec.height, spec.width, 1)}

    def make_inputs(xp_, seed):
        charts = make_charts(n, model, seed=[seed, 5])
        rng = numpy.random.default_rng([seed, 6])
        uniform = rng.random((n, features), numpy.float32)
        # Charts are mostly black: their convolutions tie within max-pool
        # windows, where float32 rounding then picks either side's element
        # and the compared gradients differ.  A little noise breaks the ties.
        images = charts.images[..., None] / numpy.float32(255)
        images += rng.standard_normal(images.shape, numpy.float32) * numpy.float32(0.01)
        return {"images": xp_.asarray(images),
                "labels": xp_.asarray(charts.labels.astype(numpy.int64)),
                "uniform": xp_.asarray(uniform)}

    if device == "gpu":
        def sync():
            xp.cuda.get_current_stream().synchronize()
    else:
        def sync():
            pass

    shared = {}  # the one network cupyconv trains, for every input set

    def ours_prepare(inputs):
        if "net" not in shared:
            mixed = mode == "float16"
            net = demo_model.PriceTrendCNN(model, xp=xp, seed=0,
                                           compute_dtype=numpy.float16 if mixed else None)
            shared.update(net=net, optimizer=demo_model.Adam(net, lr=1e-4), checked=False,
                          scaler=demo_model.GradScaler() if mixed else None)
        return dict(inputs, shared=shared)

    def ours_run(s):
        shared = s["shared"]
        step = (shared["net"], shared["optimizer"], s["images"], s["labels"], shared["scaler"])
        if shared["checked"]:
            return trainstep.cupyconv_step(*step)
        shared["checked"] = True
        with trainstep.fixed_dropout(shared["net"], s["uniform"]):
            loss, logits = trainstep.cupyconv_step(*step)
        return loss, logits, dict(shared["net"].layers)["fc"].grads["weight"]

    def ours_profile(s):
        shared = s["shared"]
        return trainstep.cupyconv_profiled_step(shared["net"], shared["optimizer"],
                                                s["images"], s["labels"], sync,
                                                shared["scaler"])

    def ours_canonical(outputs):
        loss, *rest = outputs
        return (xp.asarray(loss, numpy.float32).reshape(1),) + tuple(
            a.astype(numpy.float32, copy=False) for a in rest)

    context = contextlib.nullcontext
    if mode == "tf32":
        def context():
            return cupyconv.default_precision("tf32")

    impls = [Impl(peer="cupyconv", prepare=ours_prepare, run=ours_run,
                  to_canonical=ours_canonical, profile=ours_profile, detail=detail,
                  context=context)]
    impls += _torch_train_impls(torch, device, xp, model, mode)
    convs = [(name, shape) for name, shape in demo_model.layer_shapes(model)
             if name.endswith(".conv")]
    kh, kw = demo_model.KERNEL
    c_in, conv_flops = 1, 0
    for _, (h, w, c) in convs:
        conv_flops += 2 * n * h * w * c * kh * kw * c_in
        c_in = c
    flops = 3 * conv_flops + 3 * 2 * n * features * 2
    images_bytes = math.prod(shapes["images"]) * 4
    key_suffix = "" if mode == "float32" else f"_{mode}"
    return Case(
        key=f"train_{model}{key_suffix}", op="train_step", group="train", device=device,
        title=f"training step, {model} CNN, batch {n}{title_suffix}",
        dtype="float32", shapes=shapes, params={"model": model, "batch": n, "mode": mode},
        make_inputs=make_inputs, impls=impls, flops=flops, bytes=images_bytes,
        profile_steps=profile_steps, tolerance=tolerance,
        matmul_mode=None if mode == "float32" else mode,
        note="flops = 3x the convolutions' and the Linear layer's forward "
             "(2*N*Ho*Wo*C_out*kh*kw*C_in each); the first convolution's input "
             "gradient is not computed")


def _torch_train_impls(torch, device, xp, model, mode="float32"):
    """The PyTorch twin's step in NCHW and channels_last, in precision
    ``mode`` (see :data:`TRAIN_MODES`)."""
    if torch is None:
        return []
    from ..demo import model as demo_model
    from . import trainstep

    peer = TRAIN_MODES[mode][2]
    torch_device = "cuda" if device == "gpu" else "cpu"
    if device == "gpu":
        sync = torch.cuda.synchronize
    else:
        def sync():
            pass
    impls = []
    for detail, fmt in _torch_layouts(torch):
        shared = {}  # the one network this variant trains

        def prepare(inputs, fmt=fmt, shared=shared):
            if "layers" not in shared:
                # The same initial weights as cupyconv's (same seed).
                net = demo_model.PriceTrendCNN(model, seed=0)
                layers, optimizer = trainstep.torch_twin(torch, net, torch_device, fmt)
                scaler = torch.amp.GradScaler(torch_device) if mode == "float16" else None
                shared.update(net=net, layers=layers, optimizer=optimizer, scaler=scaler,
                              checked=False)
            return dict(shared=shared,
                        images=_to_torch(torch, inputs["images"], "act", fmt),
                        labels=torch.from_dlpack(inputs["labels"]),
                        uniform=inputs["uniform"])

        def run(s):
            shared = s["shared"]
            step = (torch, shared["layers"], shared["optimizer"], s["images"], s["labels"],
                    shared["scaler"])
            if shared["checked"]:
                return trainstep.torch_step(*step)
            shared["checked"] = True
            with trainstep.fixed_dropout(shared["net"], s["uniform"], torch, shared["layers"]):
                loss, logits = trainstep.torch_step(*step)
            return loss, logits, shared["layers"].fc.weight.grad

        def profile(s):
            shared = s["shared"]
            return trainstep.torch_profiled_step(torch, shared["layers"], shared["optimizer"],
                                                 s["images"], s["labels"], sync,
                                                 shared["scaler"])

        def canonical(outputs):
            loss, logits, fc_grad = outputs
            # (2, c*h*w) -> our (h*w*c, 2): NHWC flattening.
            h, w, c = demo_model.layer_shapes(model)[-2][1]
            fc_grad = fc_grad.reshape(-1, c, h, w).permute(2, 3, 1, 0).reshape(-1, 2)
            return (_from_torch(xp, loss.float().reshape(1), "raw"),
                    _from_torch(xp, logits.float(), "raw"),
                    _from_torch(xp, fc_grad.float(), "raw"))

        impls.append(Impl(
            peer=peer, prepare=prepare, run=run,
            to_canonical=canonical, detail=detail, profile=profile,
            clock="torch" if device == "gpu" else "cupy", traced=False,
            context=_torch_context(torch, device, mode == "tf32")))
    return impls
