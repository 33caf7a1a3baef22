"""Run cupyconv's CUDA kernels on the CPU: the same ``.cu`` files, built by g++.

:class:`CpuKernelProvider` plugs into :func:`cupyconv._kernels.use_provider`
and hands out kernels called exactly like ``cupy.RawKernel``
(``kernel(grid, block, args, shared_mem=0)``) on NumPy buffers, so the
package's own GPU launch code runs unchanged in CI without a GPU.

How a family is built (once per content hash, cached on disk):

* the ``.cu`` file and every header beside it are *staged*: copied with a
  ``#line`` directive (diagnostics keep the real path) and with each
  ``extern __shared__ T name[];`` rewritten to a pointer to the launch's
  dynamic shared memory;
* a generated translation unit includes the staged ``.cu`` file, the runtime
  (``include/cupyconv_cpu_runtime.inc``) and, per name expression, an
  ``extern "C"`` launcher and signature function whose parameter types are
  deduced from ``&expression``;
* g++ compiles it with ``-include include/cupyconv_cpu_shim.h`` (CUDA's
  keywords, built-in variables, intrinsics, vector types) and
  ``include/`` first on the include path (a stand-in ``cuda_fp16.h``).

With ``CUPYCONV_CPU_SANITIZE=1`` in the environment the build adds
AddressSanitizer and UndefinedBehaviorSanitizer; the process must then have
been started with ``LD_PRELOAD`` of libasan (:func:`sanitizer_environment`).
"""

import collections
import contextlib
import ctypes
import hashlib
import math
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading

import numpy

from cupyconv import _kernels

__all__ = [
    "CpuKernel",
    "CpuKernelProvider",
    "KernelLaunchError",
    "LAUNCHED",
    "SANITIZE_ENV",
    "SCHEDULE_ENV",
    "SHARED_POISON_ENV",
    "cpu_kernels",
    "compiler_unavailable_reason",
    "numpy_path",
    "poisoned_empty",
    "sanitizer_environment",
    "source_file",
]

INCLUDE_DIR = pathlib.Path(__file__).resolve().parent / "include"
SHIM = INCLUDE_DIR / "cupyconv_cpu_shim.h"
RUNTIME = INCLUDE_DIR / "cupyconv_cpu_runtime.inc"

#: "1": build and run kernels with ASan + UBSan (needs libasan preloaded).
SANITIZE_ENV = "CUPYCONV_CPU_SANITIZE"
#: "reverse": run the threads of each block in decreasing index order.
SCHEDULE_ENV = "CUPYCONV_CPU_SCHEDULE"
#: Seconds a launch may run before it fails as hung (default 120).
TIMEOUT_ENV = "CUPYCONV_CPU_TIMEOUT"
#: Default shared-memory poison byte, e.g. "0xFF" (default 0x7F).
SHARED_POISON_ENV = "CUPYCONV_CPU_SHARED_POISON"
#: Directory for staged sources and built libraries (default: system temp).
CACHE_ENV = "CUPYCONV_CPU_CACHE"

# Limits of current NVIDIA GPUs (compute capability 8.0-9.0).
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_SHARED_PER_BLOCK = 227 * 1024
DEFAULT_SHARED_LIMIT = 48 * 1024  # without cudaFuncAttributeMaxDynamicSharedMemorySize

_BASE_FLAGS = ("-fPIC", "-shared", "-fvisibility=hidden", "-fno-strict-aliasing", "-pthread")
_FAST_FLAGS = ("-O2",)
_SANITIZE_FLAGS = (
    "-O1", "-g1", "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
)
# NVRTC options with no meaning for a CPU build.
_IGNORED_OPTION = re.compile(
    r"^(--?use_fast_math|--?fmad=.*|--?arch=.*|--gpu-architecture=.*|-lineinfo|--?restrict)$")

_EXTERN_SHARED = re.compile(r"\bextern\s+__shared__\b([^;]*?)\b([A-Za-z_]\w*)\s*\[\s*\]\s*;")

#: (source file name, name expression) -> number of successful launches in
#: this process; the coverage test reads it.
LAUNCHED = collections.Counter()


class KernelLaunchError(RuntimeError):
    """A kernel failed on the CPU executor: barrier divergence or deadlock,
    a crash, an assert or ``__trap()``; the message says where."""


class _ParamInfo(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_ulonglong),
        ("align", ctypes.c_ulonglong),
        ("kind", ctypes.c_int),
        ("pointee_const", ctypes.c_int),
        ("unit", ctypes.c_ulonglong),
        ("pointee_align", ctypes.c_ulonglong),
    ]


class _LaunchRequest(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("dynamic_shared", ctypes.c_ulonglong),
        ("args", ctypes.POINTER(ctypes.c_void_p)),
        ("reverse", ctypes.c_int),
        ("poison", ctypes.c_int),
        ("timeout", ctypes.c_double),
        ("error", ctypes.c_char_p),
        ("error_size", ctypes.c_ulonglong),
    ]


def _compiler():
    return os.environ.get("CXX", "g++")


def compiler_unavailable_reason():
    """Why kernels cannot be built here (no C++ compiler), or ``None``."""
    if shutil.which(_compiler()) is None:
        return f"the C++ compiler {_compiler()!r} is not on PATH"
    return None


def _cache_root():
    root = os.environ.get(CACHE_ENV)
    if root:
        return pathlib.Path(root)
    return pathlib.Path(tempfile.gettempdir()) / f"cupyconv-cpu-kernels-{os.getuid()}"


def sanitizer_environment(env=None):
    """Environment for a child process that runs kernels under ASan + UBSan.

    Preloads g++'s libasan (it must be the first library the process
    loads), turns off leak checking (CPython never frees everything) and
    sets :data:`SANITIZE_ENV` so providers build sanitized kernels.
    """
    env = dict(os.environ if env is None else env)
    libasan = subprocess.run(
        [_compiler(), "-print-file-name=libasan.so"],
        capture_output=True, text=True, check=True).stdout.strip()
    env["LD_PRELOAD"] = " ".join(filter(None, [libasan, env.get("LD_PRELOAD", "")]))
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env[SANITIZE_ENV] = "1"
    return env


def _asan_loaded():
    return hasattr(ctypes.CDLL(None), "__asan_init")


_compiler_version_lock = threading.Lock()
_compiler_version = None


def _compiler_identity():
    global _compiler_version
    with _compiler_version_lock:
        if _compiler_version is None:
            _compiler_version = subprocess.run(
                [_compiler(), "--version"], capture_output=True, text=True, check=True
            ).stdout
        return _compiler_version


def _rewrite_extern_shared(text):
    """``extern __shared__ T name[];`` -> ``T* const name = <dynamic window>;``.

    Line breaks inside the declaration are kept, so line numbers stay right.
    """
    def pointer(match):
        declared_type = " ".join(match.group(1).split())
        name = match.group(2)
        return (f"{declared_type}* const {name} = static_cast<decltype({name})>("
                f"::cupyconv_cpu::dynamic_shared_memory());" + "\n" * match.group(0).count("\n"))
    return _EXTERN_SHARED.sub(pointer, text)


def _staged_sources(directory):
    """{file name: staged text} for the CUDA sources and headers in ``directory``."""
    staged = {}
    for path in sorted(directory.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h", ".hpp", ".inc") and path.is_file():
            staged[path.name] = (f'#line 1 "{path}"\n'
                                 + _rewrite_extern_shared(path.read_text()))
    return staged


def source_file(name, text):
    """Write CUDA source ``text`` to a stable, content-addressed path and return it.

    For test kernels written inside a test: the same text gets the same path
    in every session, so its built library is found in the disk cache.
    """
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = _cache_root() / "sources" / digest / name
    if not path.exists():
        _atomic_write(path, text.encode())
    return path


def _atomic_write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class _Library:
    """One built family: the loaded ``.so`` plus its kernels' signatures."""

    def __init__(self, path, source, expressions):
        self.path = path
        self.source = source
        self.handle = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
        self.lock = threading.Lock()  # one launch at a time per library
        self.kernels = {}
        for index, expression in enumerate(expressions):
            signature = getattr(self.handle, f"cupyconv_cpu_signature_{index}")
            signature.restype = ctypes.c_int
            count = signature(None, 0)
            params = (_ParamInfo * max(count, 1))()
            signature(params, count)
            launch = getattr(self.handle, f"cupyconv_cpu_launch_{index}")
            launch.restype = ctypes.c_int
            launch.argtypes = [ctypes.POINTER(_LaunchRequest)]
            self.kernels[expression] = (launch, tuple(params[:count]))


_libraries = {}  # content key -> _Library
_libraries_lock = threading.Lock()
_fast_keys = {}  # (source, expressions, options, sanitize, file stats) -> _Library
_failures = {}  # content key -> its KernelCompileError (not retried in this process)


def _build(source, expressions, options, sanitize):
    """Return the :class:`_Library` for ``source`` built with ``expressions``."""
    source = pathlib.Path(source).resolve()
    # Files unchanged since the last call (same stat): same library, no hashing.
    directories = [source.parent] + [pathlib.Path(o[2:]).resolve()
                                     for o in options if o.startswith("-I")]
    stats = tuple((p, s.st_mtime_ns, s.st_size) for d in dict.fromkeys(directories)
                  for p in sorted(d.iterdir()) for s in [p.stat()])
    fast_key = (source, expressions, options, sanitize, stats)
    library = _fast_keys.get(fast_key)
    if library is None:
        library = _fast_keys[fast_key] = _build_hashed(source, expressions, options, sanitize)
    return library


def _build_hashed(source, expressions, options, sanitize):
    flags = [f"-include{SHIM}", f"-I{INCLUDE_DIR}"]
    include_dirs = [source.parent]
    for option in options:
        if option.startswith("-I"):
            include_dirs.append(pathlib.Path(option[2:]).resolve())
        elif option.startswith(("-std=", "-D", "-U")):
            flags.append(option)
        elif not _IGNORED_OPTION.match(option):
            raise ValueError(f"compile option {option!r} is not supported by the CPU executor")
    flags += list(_BASE_FLAGS) + list(_SANITIZE_FLAGS if sanitize else _FAST_FLAGS)

    staged = {d: _staged_sources(d) for d in dict.fromkeys(include_dirs)}
    digest = hashlib.sha256()
    for part in sorted(INCLUDE_DIR.iterdir()):
        digest.update(part.name.encode() + b"\0" + part.read_bytes())
    digest.update(_compiler_identity().encode())
    digest.update(repr((flags, str(source), expressions)).encode())
    for directory, files in staged.items():
        digest.update(str(directory).encode())
        for name, text in files.items():
            digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    key = digest.hexdigest()[:24]

    with _libraries_lock:
        library = _libraries.get(key)
        if library is not None:
            return library
        if key in _failures:
            raise _failures[key]
        root = _cache_root()
        library_path = root / f"{source.stem}-{key}.so"
        if not library_path.exists():
            try:
                _compile(root, source, staged, expressions, flags, library_path)
            except _kernels.KernelCompileError as error:
                _failures[key] = error
                raise
        library = _libraries[key] = _Library(library_path, source, expressions)
        return library


def _compile(root, source, staged, expressions, flags, library_path):
    root.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(dir=root, prefix="build-"))
    try:
        staged_dirs = []
        for index, files in enumerate(staged.values()):
            staged_dir = work / f"include{index}"
            for name, text in files.items():
                _atomic_write(staged_dir / name, text.encode())
            staged_dirs.append(staged_dir)
        unit = [f'#include "{staged_dirs[0] / source.name}"', f'#include "{RUNTIME}"']
        for index, expression in enumerate(expressions):
            unit.append(
                f"CUPYCONV_CPU_API int cupyconv_cpu_launch_{index}("
                f"const cupyconv_cpu::launch_request* r) {{\n"
                f"    return cupyconv_cpu::launch_kernel(&{expression}, r);\n}}\n"
                f"CUPYCONV_CPU_API int cupyconv_cpu_signature_{index}("
                f"cupyconv_cpu::param_info* out, int capacity) {{\n"
                f"    return cupyconv_cpu::kernel_signature(&{expression}, out, capacity);\n}}")
        unit_path = work / "unit.cpp"
        _atomic_write(unit_path, ("\n".join(unit) + "\n").encode())
        built = work / library_path.name
        command = ([_compiler()] + flags + [f"-I{d}" for d in staged_dirs]
                   + [str(unit_path), "-o", str(built), "-ldl", "-lrt"])
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, "LC_ALL": "C"})  # plain ASCII quotes
        if result.returncode != 0:
            raise _kernels.KernelCompileError(
                f"compiling {source} for the CPU executor failed:\n{' '.join(command)}\n"
                f"{result.stderr}")
        os.replace(built, library_path)  # atomic: concurrent builders agree
    finally:
        shutil.rmtree(work, ignore_errors=True)


_NUMPY_TYPE = {
    ("f", 2): "numpy.float16", ("f", 4): "numpy.float32", ("f", 8): "numpy.float64",
    ("i", 1): "numpy.int8", ("i", 2): "numpy.int16", ("i", 4): "numpy.int32",
    ("i", 8): "numpy.int64", ("u", 1): "numpy.uint8", ("u", 2): "numpy.uint16",
    ("u", 4): "numpy.uint32", ("u", 8): "numpy.uint64", ("b", 1): "numpy.bool_",
}


def _expected(param):
    kind = chr(param.kind)
    if kind == "p":
        return "a numpy.ndarray (the kernel takes a pointer)"
    name = _NUMPY_TYPE.get((kind, param.size))
    return name or f"a NumPy scalar of {param.size} bytes"


def _dims(value, what, limits):
    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        raise TypeError(f"{what} must be a tuple of 1 to 3 ints, got {value!r}")
    dims = []
    for axis, n in enumerate(value):
        if isinstance(n, bool) or not isinstance(n, (int, numpy.integer)):
            raise TypeError(f"{what}[{axis}] must be an int, got {type(n).__name__}")
        if not 1 <= n <= limits[axis]:
            raise ValueError(f"{what}[{axis}] = {n} is outside [1, {limits[axis]}]")
        dims.append(int(n))
    return tuple(dims) + (1,) * (3 - len(dims))


class CpuKernel:
    """One kernel of a built family; called like ``cupy.RawKernel``."""

    def __init__(self, provider, library, name):
        self.provider = provider
        self.library = library
        self.name = name
        self._launch, self.params = library.kernels[name]
        self._max_dynamic_shared = DEFAULT_SHARED_LIMIT

    @property
    def max_dynamic_shared_size_bytes(self):
        """As ``cupy.RawKernel.max_dynamic_shared_size_bytes``: a launch may use
        more than 48 KiB of dynamic shared memory only after raising this."""
        return self._max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        if not 0 <= value <= MAX_SHARED_PER_BLOCK:
            raise ValueError(f"{self.name}: max_dynamic_shared_size_bytes = {value} is "
                             f"outside [0, {MAX_SHARED_PER_BLOCK}]")
        self._max_dynamic_shared = int(value)

    def __repr__(self):
        return f"<CpuKernel {self.name} from {self.library.source.name}>"

    def __call__(self, grid, block, args, shared_mem=0):
        grid = _dims(grid, "grid", MAX_GRID)
        block = _dims(block, "block", MAX_BLOCK)
        threads = math.prod(block)
        if threads > MAX_THREADS_PER_BLOCK:
            raise ValueError(f"{self.name}: block {block} has {threads} threads, "
                             f"more than {MAX_THREADS_PER_BLOCK}")
        self._check_shared(shared_mem)
        storage, pointers = self._marshal(args)
        error = ctypes.create_string_buffer(4096)
        request = _LaunchRequest(
            grid=(ctypes.c_uint * 3)(*grid), block=(ctypes.c_uint * 3)(*block),
            dynamic_shared=int(shared_mem), args=pointers,
            reverse=int(self.provider.reverse), poison=self.provider.shared_poison,
            timeout=self.provider.timeout,
            error=ctypes.cast(error, ctypes.c_char_p), error_size=len(error))
        with self.library.lock:
            failed = self._launch(ctypes.byref(request))
        del storage
        if failed:
            raise KernelLaunchError(f"{self.name}: {error.value.decode(errors='replace')}")
        LAUNCHED[(self.library.source.name, self.name)] += 1

    def _check_shared(self, shared_mem):
        if isinstance(shared_mem, bool) or not isinstance(shared_mem, (int, numpy.integer)):
            raise TypeError(f"{self.name}: shared_mem must be an int, got "
                            f"{type(shared_mem).__name__}")
        if shared_mem < 0:
            raise ValueError(f"{self.name}: shared_mem = {shared_mem} is negative")
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise ValueError(
                f"{self.name}: shared_mem = {shared_mem} bytes exceeds the kernel's "
                f"max_dynamic_shared_size_bytes = {self.max_dynamic_shared_size_bytes} "
                f"(48 KiB unless raised, at most {MAX_SHARED_PER_BLOCK} bytes per block)")

    def _marshal(self, args):
        """Check ``args`` against the C++ signature; return (storage, void* array)."""
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, "
                            f"got {len(args)}")
        slots = []
        for index, (arg, param) in enumerate(zip(args, self.params)):
            slots.append(self._argument_bytes(index, arg, param))
        # Each value in its own 16-byte aligned slot (the C side memcpy's it).
        sizes = [-(-len(data) // 16) * 16 for data in slots]
        storage = ctypes.create_string_buffer(sum(sizes) + 16)
        address = (ctypes.addressof(storage) + 15) & ~15
        pointers = (ctypes.c_void_p * max(1, len(slots)))()
        for index, (data, size) in enumerate(zip(slots, sizes)):
            ctypes.memmove(address, data, len(data))
            pointers[index] = address
            address += size
        return storage, pointers

    def _argument_bytes(self, index, arg, param):
        where = f"{self.name}: argument {index}"
        kind = chr(param.kind)
        if isinstance(arg, numpy.ndarray):
            if kind != "p":
                raise TypeError(f"{where} is an array but the kernel takes a "
                                f"{param.size}-byte value; pass {_expected(param)}")
            if arg.dtype.hasobject:
                raise TypeError(f"{where} has dtype object")
            itemsize = arg.dtype.itemsize
            fits = (param.unit in (0, 1, itemsize)
                    or (arg.dtype.kind == "c" and param.unit * 2 == itemsize))
            if not fits:
                raise TypeError(f"{where}: the kernel reads {param.unit}-byte elements "
                                f"through this pointer but the array has dtype {arg.dtype} "
                                f"({itemsize} bytes per element)")
            address = arg.ctypes.data
            if arg.size and address % param.pointee_align:
                raise ValueError(f"{where}: address {address:#x} is not aligned to the "
                                 f"{param.pointee_align} bytes its pointee type needs "
                                 "(misaligned address on a GPU)")
            return address.to_bytes(8, "little")
        if isinstance(arg, numpy.generic):
            if kind == "p":
                raise TypeError(f"{where} is a NumPy {arg.dtype} scalar but the kernel "
                                "takes a pointer; pass a numpy.ndarray")
            if arg.dtype.itemsize != param.size:
                raise TypeError(f"{where} is {arg.dtype} ({arg.dtype.itemsize} bytes) but "
                                f"the kernel's parameter has {param.size} bytes; pass "
                                f"{_expected(param)}")
            numeric = {"f": "f", "i": "iu", "u": "iu", "b": "b"}.get(kind)
            if numeric is not None and arg.dtype.kind not in numeric:
                raise TypeError(f"{where} is {arg.dtype} but the kernel's parameter is "
                                f"{'floating' if kind == 'f' else 'integral'}; pass "
                                f"{_expected(param)}")
            return arg.tobytes()
        raise TypeError(
            f"{where} is a Python {type(arg).__name__}; pass a numpy.ndarray or a NumPy "
            f"scalar of the kernel's C type ({_expected(param)})")


class CpuKernelProvider:
    """Kernel provider compiling ``cuda/*.cu`` with g++ (see the module doc).

    Parameters
    ----------
    sanitize : bool, optional
        Build with ASan + UBSan; default: ``CUPYCONV_CPU_SANITIZE=1``.
    reverse : bool, optional
        Run the threads of each block in decreasing index order (exposes
        reads of shared memory that another thread writes later without a
        barrier in between); default: ``CUPYCONV_CPU_SCHEDULE=reverse``.
    shared_poison : int, optional
        Byte written over static and dynamic shared memory before each block;
        default: ``CUPYCONV_CPU_SHARED_POISON`` or 0x7F.  0x7F makes floats
        huge (3.4e38, visible in sums and maxima), 0xFF makes them NaN.
    timeout : float, optional
        Wall-clock seconds a launch may take before it fails as hung (a
        thread spinning on a flag: threads switch only at barriers and warp
        intrinsics); default: ``CUPYCONV_CPU_TIMEOUT`` or 120; 0 disables.
    """

    runs_on_numpy = True

    def __init__(self, *, sanitize=None, reverse=None, shared_poison=None, timeout=None):
        if sanitize is None:
            sanitize = os.environ.get(SANITIZE_ENV) == "1"
        if reverse is None:
            reverse = os.environ.get(SCHEDULE_ENV) == "reverse"
        if sanitize and not _asan_loaded():
            raise RuntimeError(
                "sanitized CPU kernels need AddressSanitizer's runtime loaded first: "
                "start Python with cpu_cuda.sanitizer_environment() "
                "(LD_PRELOAD=$(g++ -print-file-name=libasan.so))")
        self.sanitize = bool(sanitize)
        self.reverse = bool(reverse)
        if shared_poison is None:
            shared_poison = int(os.environ.get(SHARED_POISON_ENV, "0x7F"), 0)
        self.shared_poison = int(shared_poison) & 0xFF
        if timeout is None:
            timeout = float(os.environ.get(TIMEOUT_ENV, "120"))
        self.timeout = float(timeout)

    def get_function(self, source, name_expressions, name, options):
        if name not in name_expressions:
            raise KeyError(f"{name!r} is not among the name expressions of {source}")
        library = _build(source, tuple(name_expressions), tuple(options), self.sanitize)
        return CpuKernel(self, library, name)


def _poison(array):
    """Fill a fresh array with values a kernel would never write on purpose."""
    if array.dtype.kind in "fc":
        array.fill(numpy.nan)
    elif not array.dtype.hasobject and array.nbytes:
        ctypes.memset(array.ctypes.data, 0xA5, array.nbytes)
    return array


@contextlib.contextmanager
def poisoned_empty():
    """Make ``numpy.empty``/``numpy.empty_like`` return poisoned arrays.

    Launch code allocates outputs with ``xp.empty`` (``xp`` is the numpy
    module here), so every element a kernel forgets to write keeps a NaN
    (floating, complex) or 0xA5 bytes (integers, bool) and fails the test's
    comparison instead of holding stale memory that may happen to be right.
    """
    real_empty, real_empty_like = numpy.empty, numpy.empty_like

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    empty.__doc__, empty_like.__doc__ = real_empty.__doc__, real_empty_like.__doc__
    numpy.empty, numpy.empty_like = empty, empty_like
    try:
        yield
    finally:
        numpy.empty, numpy.empty_like = real_empty, real_empty_like


@contextlib.contextmanager
def cpu_kernels(poison_outputs=True, **provider_options):
    """Run cupyconv's GPU code path on NumPy arrays through the CPU executor.

    Inside, ``cupyconv._backend.use_kernels(numpy)`` is True: public
    functions called with NumPy arrays launch the CUDA kernels on the CPU.
    Yields the :class:`CpuKernelProvider`.
    """
    provider = CpuKernelProvider(**provider_options)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_kernels.use_provider(provider))
        if poison_outputs:
            stack.enter_context(poisoned_empty())
        yield provider


class _NumpyPath:
    """A provider that does not run on NumPy: the package takes its NumPy path."""

    runs_on_numpy = False

    def get_function(self, source, name_expressions, name, options):
        raise AssertionError(f"{name} launched on the NumPy path")


def numpy_path():
    """Context manager: inside :func:`cpu_kernels`, compute with NumPy again
    (the reference a kernel result is compared with)."""
    return _kernels.use_provider(_NumpyPath())
