"""Kernel loading: CUDA C++ sources in ``cuda/`` compiled with ``cupy.RawModule``.

Each op family lives in one ``cuda/<family>.cu`` file; its templates are
instantiated per dtype through ``name_expressions``, declared once here in
:data:`FAMILIES`.  A module is compiled lazily on first use, once per process
per (source, options, device), and CuPy's on-disk cache keeps the binary across
runs.

Launch code never talks to CuPy directly: every launch goes through
:func:`launch`, which asks the active *kernel provider* for the kernel
(:func:`get_function`) and runs it on blocks of :data:`THREADS` threads.
The default provider compiles with CuPy; the test suite swaps in a provider
that compiles the same ``.cu`` files with the host C++ compiler
(``tests/cpu_cuda``), so the package's own launch code runs unchanged on
NumPy buffers.
"""

import contextlib
import functools
import pathlib

import numpy

from ._args import is_bfloat16

__all__ = [
    "FAMILIES", "THREADS", "KernelCompileError", "accumulator_dtype", "c_type",
    "ceil_div", "cuda_source_dir", "divisor32", "get_function", "launch",
]

#: Integer types that move an element of a given byte size.  Kernels that only
#: copy elements (dilation's) are instantiated per size, not per dtype.
COPY_TYPES = {
    1: "unsigned char",
    2: "unsigned short",
    4: "unsigned int",
    8: "unsigned long long",
    16: "cupyconv::bytes16",
}

#: C++ type of each floating dtype name, as used in name expressions.
FLOAT_TYPES = {"float16": "__half", "float32": "float", "float64": "double"}

#: C++ type of each dtype name the pooling forward supports.
POOL_TYPES = {
    **FLOAT_TYPES,
    "int8": "signed char",
    "int16": "short",
    "int32": "int",
    "int64": "long long",
    "uint8": "unsigned char",
    "uint16": "unsigned short",
    "uint32": "unsigned int",
    "uint64": "unsigned long long",
}

#: The C++ types above keyed by dtype: ``numpy.dtype.name`` is a property
#: slow enough to count in a small call's launch.
_C_TYPES = {numpy.dtype(name): c_type for name, c_type in POOL_TYPES.items()}


def c_type(dtype):
    """The C++ type of ``dtype`` in name expressions, ``None`` if no kernel
    takes it."""
    return _C_TYPES.get(dtype)


def accumulator_dtype(dtype):
    """The dtype the kernels sum ``dtype`` in (``cupyconv::accumulator``, and
    the tensor-core kernels' float32): float16 and bfloat16 in float32, every
    other dtype in itself.  The NumPy path computes in it too and rounds
    once at the end."""
    if dtype == numpy.float16 or is_bfloat16(dtype):
        return numpy.dtype(numpy.float32)
    return numpy.dtype(dtype)


#: Threads per block of every launch (:func:`launch`).
THREADS = 256


def ceil_div(a, b):
    """``ceil(a / b)`` of ints, ``b > 0``, exactly (no float rounding)."""
    return -(-a // b)


def _expressions(family, kernels, types):
    return tuple(f"cupyconv::{family}::{kernel}<{t}>" for kernel in kernels for t in types)


#: family -> every name expression the package may launch from cuda/<family>.cu:
#: kernel ``<op>_<direction>_<variant>`` in namespace ``cupyconv::<op>``.  The
#: convolution's tensor-core kernels are a family of their own
#: (``convolution_mma``), so that a process using only the FMA kernels never
#: compiles them.
#: The CPU executor's tests and the nvcc warning check instantiate exactly these.
FAMILIES = {
    "dilation": _expressions("dilation", ("dilation_forward_gather",), COPY_TYPES.values()),
    "convolution": _expressions(
        "convolution",
        ("convolution_forward_igemm", "convolution_input_grad_igemm",
         "convolution_input_grad_gather", "convolution_weight_grad_igemm",
         "convolution_weight_grad_reduce"),
        FLOAT_TYPES.values())
    + _expressions(
        "convolution",
        ("convolution_forward_igemm128", "convolution_input_grad_igemm128",
         "convolution_weight_grad_igemm128"),
        ("float",)),
    "pooling": _expressions(
        "pooling", ("pooling_forward_2x1", "pooling_forward_window"), POOL_TYPES.values())
    + _expressions(
        "pooling", ("pooling_backward_2x1", "pooling_backward_window"), FLOAT_TYPES.values()),
    "convolution_mma": tuple(
        f"cupyconv::convolution::{kernel}<{t}, {split3}, {config}>"
        for kernel in ("convolution_forward_mma", "convolution_input_grad_mma",
                       "convolution_weight_grad_mma")
        for t, split3 in (("float", "false"), ("float", "true"), ("__half", "false"),
                          ("__nv_bfloat16", "false"))
        for config in (0, 1)
    ) + _expressions("convolution", ("convolution_split_sum_mma",),
                     ("float", "__half", "__nv_bfloat16")),
}

#: Options every module is compiled with (the include path is added per call).
COMPILE_OPTIONS = ("-std=c++17",)


@functools.lru_cache(maxsize=None)
def cuda_source_dir():
    """Return the folder holding the ``.cu``/``.cuh`` sources.

    An installed wheel carries them as ``cupyconv/cuda``; a source checkout
    (editable install or ``PYTHONPATH=.``) keeps them in ``cuda/`` beside the
    package.
    """
    here = pathlib.Path(__file__).resolve().parent
    for candidate in (here / "cuda", here.parent / "cuda"):
        if (candidate / "cupyconv_common.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"cupyconv's CUDA sources were not found in {here / 'cuda'} or "
        f"{here.parent / 'cuda'}; the installation is incomplete"
    )


class KernelCompileError(RuntimeError):
    """A ``.cu`` file failed to compile; the message carries the compiler log."""


class CupyProvider:
    """Compile with ``cupy.RawModule``; one module per (source, options, device).

    Launches are often shorter than Python's share of them, so the kernel
    function itself is cached: a repeated call costs a dict lookup.
    """

    def __init__(self):
        self._modules = {}
        self._functions = {}

    def get_function(self, source, name_expressions, name, options):
        import cupy

        device = cupy.cuda.runtime.getDevice()
        key = (source, options, device, name)
        function = self._functions.get(key)
        if function is None:
            function = self._module(source, name_expressions, options, device).get_function(name)
            self._functions[key] = function
        return function

    def _module(self, source, name_expressions, options, device):
        import cupy

        key = (source, name_expressions, options, device)
        module = self._modules.get(key)
        if module is None:
            module = cupy.RawModule(
                code=source.read_text(),
                options=options,
                name_expressions=name_expressions,
            )
            try:
                module.compile()
            except cupy.cuda.compiler.CompileException as exc:
                raise KernelCompileError(
                    f"compiling {source} failed:\n{exc.get_message()}"
                ) from exc
            self._modules[key] = module
        return module


_provider = CupyProvider()


@contextlib.contextmanager
def use_provider(provider):
    """Temporarily route :func:`get_function` to ``provider`` (test support)."""
    global _provider
    previous, _provider = _provider, provider
    try:
        yield provider
    finally:
        _provider = previous


def provider_runs_on_numpy():
    """True while a provider that launches kernels on NumPy buffers is active."""
    return getattr(_provider, "runs_on_numpy", False)


def get_function(family, name):
    """Return the kernel ``name`` (a name expression of ``family``), ready to launch.

    The result is called like ``cupy.RawKernel``:
    ``kernel(grid, block, args, shared_mem=0)``, with ``args`` a tuple of
    arrays and NumPy scalars of the exact C types the kernel declares.
    """
    source, expressions, declared, options = _family_inputs(family)
    if name not in declared:
        raise KeyError(f"{name!r} is not declared for cuda/{family}.cu")
    return _provider.get_function(source, expressions, name, options)


def launch(family, kernel, template_args, grid, args, *, threads=THREADS,
           shared_mem=0):
    """Launch ``cupyconv::<op>::<kernel><template_args>`` from
    ``cuda/<family>.cu`` on ``grid`` (a tuple of block counts) of ``threads``
    threads each, with ``shared_mem`` bytes of dynamic shared memory; ``<op>``
    is the kernel name's first word (kernels are named
    ``<op>_<direction>_<variant>``) and ``args`` are as for
    :func:`get_function`.  Every kernel of the package is launched through
    here."""
    get_function(family, _name_expression(kernel, template_args))(
        grid, (threads,), args, shared_mem=shared_mem)


@functools.lru_cache(maxsize=1024)
def _name_expression(kernel, template_args):
    """``cupyconv::<op>::<kernel><template_args>``, made once per kernel and
    types (the launch code names a few dozen)."""
    op = kernel.partition("_")[0]
    return f"cupyconv::{op}::{kernel}<{template_args}>"


@functools.lru_cache(maxsize=None)
def _family_inputs(family):
    """``(source path, name expressions, the same as a set, compile
    options)`` of a family."""
    source_dir = cuda_source_dir()
    return (source_dir / f"{family}.cu", FAMILIES[family], frozenset(FAMILIES[family]),
            COMPILE_OPTIONS + (f"-I{source_dir}",))


def device_id(xp):
    """The current CUDA device's number for CuPy, ``None`` for NumPy."""
    return None if xp is numpy else xp.cuda.runtime.getDevice()


def data_pointer(a):
    """Address of ``a``'s first element (a CuPy or a NumPy array)."""
    if isinstance(a, numpy.ndarray):  # its .data cannot view every dtype (bfloat16)
        return a.__array_interface__["data"][0]
    return a.data.ptr  # a CuPy array's cupy.cuda.MemoryPointer


def chunks_fit(a, strides, channels):
    """Whether the 16-byte loaders of the convolution kernels may read
    activation ``a`` whose element ``strides`` are in semantic order,
    channels last, with ``channels`` per group: every run of ``16 //
    itemsize`` channels of a pixel that starts at a multiple of it is
    contiguous and 16-byte aligned (channel stride 1, ``channels`` and the
    other strides multiples of the run, ``a`` aligned)."""
    run = 16 // a.itemsize
    if strides[3] != 1 or channels % run:
        return False
    for stride in strides[:3]:
        if stride % run:
            return False
    return data_pointer(a) % 16 == 0


def kernel_operand(a, contiguous=False):
    """``a`` as a kernel can read it: ``a`` itself, or a C-contiguous copy
    when ``contiguous`` is asked for and ``a`` is not, or when its address or
    a stride is not a multiple of its item size (kernels index whole, aligned
    elements; a view reinterpreted at an odd byte offset is neither)."""
    if type(a) is numpy.ndarray and a.dtype.alignment == a.itemsize:
        # NumPy's flag, cheaper than the address: the same test, but for the
        # strides of length-1 axes (which no index multiplies).
        misaligned = not a.flags.aligned
    else:
        misaligned = any(v % a.itemsize for v in (data_pointer(a), *a.strides))
    if misaligned or (contiguous and not a.flags.c_contiguous):
        return a.copy()
    return a


#: Kernels given a fast_index flag divide with divisor32 (exact below
#: 2**31) when every number they divide or split is below this; the tests
#: lower it to run their 64-bit paths.
FAST_INDEX_LIMIT = 2**31


@functools.lru_cache(maxsize=4096)
def int64s(*values):
    """``values`` (integers) as ``numpy.int64`` kernel arguments
    (``index_t``), made once per values: converting a dozen Python ints at
    every call is a fair share of a small call's time."""
    return tuple(numpy.int64(v) for v in values)


@functools.lru_cache(maxsize=1024)
def int32s(*values):
    """``values`` (integers or bools) as ``numpy.int32`` kernel arguments
    (``int``: flags, small counts), made once per values."""
    return tuple(numpy.int32(v) for v in values)


def fast_index(*sizes, limit=None):
    """The kernels' ``fast_index`` flag: every size below ``limit`` (by
    default FAST_INDEX_LIMIT)."""
    return numpy.int32(max(sizes) < (FAST_INDEX_LIMIT if limit is None else limit))


def divisor32(d):
    """``(magic, shift)`` of the kernels' ``cupyconv::divisor32`` for a
    divisor ``1 <= d < 2**31``: ``n // d == ((n * magic >> 32) + n) >> shift``
    for every ``0 <= n < 2**31`` (the sum fits 32 bits since ``magic < 2**32``)."""
    shift = (d - 1).bit_length()
    return ((1 << 32) * ((1 << shift) - d)) // d + 1, shift


def grid_for(n, max_blocks=8192):
    """Blocks of :data:`THREADS` for a grid-stride loop over ``n`` items (at
    least one block).

    ``max_blocks * THREADS`` covers every SM of current GPUs many times over;
    larger ``n`` is handled by the grid-stride loop, never by a larger grid.
    """
    return (max(1, min(max_blocks, ceil_div(n, THREADS))),)
