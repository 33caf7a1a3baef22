"""Clocks: CPU wall time with peak memory, GPU time with CUDA events, and the
two reference rates (copy bandwidth, matmul throughput) every result is
compared with.  See the package docstring for the method.
"""

import contextlib
import math
import statistics
import time
import tracemalloc

import numpy

__all__ = [
    "Timing",
    "ROUNDS",
    "CPU_TURN_WARMUP_S",
    "repeat_count",
    "round_counts",
    "copies_for",
    "warm_up_cpu",
    "timed_cpu",
    "time_cpu",
    "warm_up_gpu",
    "timed_gpu",
    "time_gpu",
    "traced_peak",
    "cpu_references",
    "gpu_references",
]

#: Timed calls are repeated until about this much time has passed (auto mode).
CPU_TARGET_S = 0.7
GPU_TARGET_S = 0.3
CPU_REPEATS = (3, 25)
CPU_WARMUP_S = 0.2
CPU_WARMUP_CALLS = 50
GPU_REPEATS = (10, 200)
#: The implementations of a case take turns in this many rounds, so that a
#: machine whose speed drifts (other tenants, clocks) slows all of them alike.
ROUNDS = 3
#: Untimed calls before each CPU turn last this long: BLAS and OpenMP worker
#: threads of the library that ran before spin for up to about 0.1 s after
#: its last call, taking cores from the next one.
CPU_TURN_WARMUP_S = 0.15


class Timing:
    """Per-call times (seconds) of one implementation on one case."""

    def __init__(self, times):
        self.times = sorted(times)

    @property
    def median(self):
        return statistics.median(self.times)

    @property
    def minimum(self):
        return self.times[0]

    @property
    def repeats(self):
        return len(self.times)


def repeat_count(seconds_per_call, device, repeats=None, target_s=None):
    """Timed calls for one implementation: ``repeats`` if given, else enough
    to fill about ``target_s`` (default per device), within the device's
    bounds."""
    if repeats is not None:
        return repeats
    target = target_s if target_s is not None else (CPU_TARGET_S if device == "cpu"
                                                    else GPU_TARGET_S)
    low, high = CPU_REPEATS if device == "cpu" else GPU_REPEATS
    return max(low, min(high, int(target / max(seconds_per_call, 1e-9))))


def round_counts(count, rounds):
    """Split ``count`` timed calls into at most ``rounds`` nearly equal shares."""
    rounds = max(1, min(rounds, count))
    return [count // rounds + (r < count % rounds) for r in range(rounds)]


def copies_for(input_bytes, cache_bytes, limit=4):
    """How many input sets to cycle through so that together they are at
    least twice the last-level cache: a call never starts on inputs that the
    previous call left in the cache.  Large inputs still get 2 copies."""
    if input_bytes <= 0:
        return 2
    return max(2, min(limit, math.ceil(2 * cache_bytes / input_bytes)))


def warm_up_cpu(fn, states, warmup_s=CPU_WARMUP_S):
    """Untimed calls of ``fn(state)`` for at least ``warmup_s`` (thread
    pools of BLAS and PyTorch wake up, caches and allocators settle); returns
    the last call's duration in seconds."""
    warm_until = time.perf_counter() + warmup_s
    for i in range(CPU_WARMUP_CALLS):
        start = time.perf_counter()
        fn(states[i % len(states)])
        per_call = time.perf_counter() - start
        if start + per_call >= warm_until:
            break
    return per_call


def timed_cpu(fn, states, count, first=0):
    """Wall times (seconds) of ``count`` calls of ``fn(state)``, cycling
    through ``states`` from index ``first``."""
    times = []
    for i in range(first, first + count):
        state = states[i % len(states)]
        start = time.perf_counter()
        fn(state)
        times.append(time.perf_counter() - start)
    return times


def time_cpu(fn, states, repeats=None, target_s=CPU_TARGET_S, warmup_s=CPU_WARMUP_S):
    """Warm-up, then timed calls of one implementation alone."""
    per_call = warm_up_cpu(fn, states, warmup_s)
    count = repeat_count(per_call, "cpu", repeats, target_s)
    return Timing(timed_cpu(fn, states, count, first=1))


def traced_peak(fn, state):
    """Peak bytes that ``tracemalloc`` sees during one call of ``fn(state)``
    (NumPy registers its data buffers with tracemalloc; PyTorch does not)."""
    tracemalloc.start()
    try:
        fn(state)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class CupyClock:
    """CUDA events on CuPy's current stream."""

    def __init__(self, cupy):
        self._cupy = cupy

    def event(self):
        return self._cupy.cuda.Event()

    def record(self, event):
        event.record()

    def synchronize(self):
        self._cupy.cuda.get_current_stream().synchronize()

    def elapsed_s(self, start, end):
        return self._cupy.cuda.get_elapsed_time(start, end) / 1e3


class TorchClock:
    """CUDA events on PyTorch's current stream."""

    def __init__(self, torch):
        self._torch = torch

    def event(self):
        return self._torch.cuda.Event(enable_timing=True)

    def record(self, event):
        event.record()

    def synchronize(self):
        self._torch.cuda.synchronize()

    def elapsed_s(self, start, end):
        return start.elapsed_time(end) / 1e3


def warm_up_gpu(fn, states, clock):
    """Three untimed calls (compilation, cuDNN autotuning, memory-pool
    growth), then one more timed by the host after synchronising: its
    duration in seconds sizes the timed calls."""
    for i in range(3):
        fn(states[i % len(states)])
    clock.synchronize()
    start = time.perf_counter()
    fn(states[0])
    clock.synchronize()
    return time.perf_counter() - start


def timed_gpu(fn, states, clock, count, first=0):
    """Per-call GPU times (seconds) of ``count`` calls of ``fn(state)`` from
    CUDA events, cycling ``states`` from index ``first``.

    Each call is bracketed by its own pair of events and the host does not
    wait between calls, so when the GPU is the bottleneck the launches queue
    up and each interval is the call's device time; when the host is the
    bottleneck (tiny ops) the interval includes the Python dispatch cost the
    user pays too.  The device is idle again on return.
    """
    events = [(clock.event(), clock.event()) for _ in range(count)]
    for i, (begin, end) in enumerate(events, start=first):
        clock.record(begin)
        fn(states[i % len(states)])
        clock.record(end)
    clock.synchronize()
    return [clock.elapsed_s(begin, end) for begin, end in events]


def time_gpu(fn, states, clock, repeats=None, target_s=GPU_TARGET_S):
    """Warm-up, then timed calls of one implementation alone."""
    per_call = warm_up_gpu(fn, states, clock)
    count = repeat_count(per_call, "gpu", repeats, target_s)
    return Timing(timed_gpu(fn, states, clock, count, first=1))


def cpu_references(quick, repeats=None):
    """Measured NumPy copy bandwidth (GB/s, read + write) and float32 matmul
    rate (TFLOP/s) of this CPU."""
    import numpy

    count = (4 if quick else 64) * 2**20 // 4
    src = numpy.ones(count, numpy.float32)
    dst = numpy.empty_like(src)
    copy = time_cpu(lambda s: numpy.copyto(dst, s), [src], repeats, target_s=0.3)
    n = 256 if quick else 2048
    a = numpy.ones((n, n), numpy.float32)
    mm = time_cpu(lambda s: numpy.matmul(s, s), [a], repeats, target_s=0.5)
    return {
        "copy_gbps": 2 * src.nbytes / copy.median / 1e9,
        "copy_bytes": src.nbytes,
        "matmul_tflops": {"float32": 2 * n**3 / mm.median / 1e12},
        "matmul_n": n,
    }


def gpu_references(cupy, dtypes, quick, repeats=None):
    """Measured device-to-device copy bandwidth (GB/s, read + write) and
    ``cupy.matmul`` rate (TFLOP/s) on a large square product per dtype."""
    clock = CupyClock(cupy)
    nbytes = (64 if quick else 1024) * 2**20
    pair = (cupy.ones(nbytes, cupy.uint8), cupy.empty(nbytes, cupy.uint8))
    timing = time_gpu(_device_copy, [pair], clock, repeats)
    del pair
    refs = {"copy_gbps": 2 * nbytes / timing.median / 1e9, "copy_bytes": nbytes,
            "matmul_tflops": {}}
    n = 2048 if quick else 8192
    refs["matmul_n"] = n
    for dtype in dtypes:
        try:
            with _matmul_mode(cupy, dtype) as array_dtype:
                operands = (cupy.ones((n, n), array_dtype), cupy.empty((n, n), array_dtype))
                timing = time_gpu(_square_matmul(cupy), [operands], clock, repeats)
        except Exception as exc:  # a mode this CuPy cannot multiply in: no rate
            refs.setdefault("matmul_errors", {})[str(dtype)] = f"{type(exc).__name__}: {exc}"
            continue
        refs["matmul_tflops"][str(dtype)] = 2 * n**3 / timing.median / 1e12
        del operands
    cupy.get_default_memory_pool().free_all_blocks()
    return refs


@contextlib.contextmanager
def _matmul_mode(cupy, mode):
    """The array dtype that multiplies in ``mode`` (a dtype name, or "tf32":
    float32 through cuBLAS's TF32 compute type, set for the block only)."""
    if mode == "bfloat16":
        import ml_dtypes

        yield numpy.dtype(ml_dtypes.bfloat16)
    elif mode != "tf32":
        yield numpy.dtype(mode)
    else:
        from cupy._core import _routines_linalg as linalg

        previous = linalg.get_compute_type(numpy.float32)
        linalg.set_compute_type(numpy.float32, linalg.COMPUTE_TYPE_TF32)
        try:
            yield numpy.dtype(numpy.float32)
        finally:
            linalg.set_compute_type(numpy.float32, previous)


def _device_copy(pair):
    src, dst = pair
    dst.data.copy_from_device_async(src.data, src.nbytes)


def _square_matmul(cupy):
    def product(operands):
        a, out = operands
        cupy.matmul(a, a, out=out)
    return product
