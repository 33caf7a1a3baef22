"""Reproduce the figures behind the tuning choices in ``docs/kernels.rst``.

Each experiment times one call of the public API with a tuning constant of
the NumPy path (or the launch code) set to each of its candidate values in
turn, in interleaved rounds so that a change of load on a shared machine
hits every candidate alike, and prints the median per candidate::

    PYTHONPATH=. python docs/tuning.py                  # list the experiments
    PYTHONPATH=. python docs/tuning.py conv-block-elements [--rounds N]

The constants are module attributes, so an experiment sets them as the
tests do, and puts them back after.  ``host-overhead`` has no candidates:
it times small calls whose kernels do nothing (:class:`NoOpProvider`),
the host time a GPU call spends in Python.
"""

import argparse
import contextlib
import statistics
import sys
import time

import numpy

import cupyconv as cc
from cupyconv import _parallel
from cupyconv.convolution import (_cpu as conv_cpu, _cuda as conv_cuda,
                                  _winograd as conv_winograd)
from cupyconv.dilation import _cpu as dilation_cpu
from cupyconv.pooling import _cpu as pool_cpu


@contextlib.contextmanager
def _set(module, **values):
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _random(shape, dtype=numpy.float32, seed=0):
    return numpy.random.default_rng(seed).standard_normal(shape).astype(dtype)


#: The convolutions of the benchmark (``cupyconv.bench``'s CPU sizes), NHWC.
SEED = dict(kernel=(5, 3), padding=((2, 2), (1, 1)))
LAYERS = {
    "seed L1": dict(c_in=1, c_out=64, hw=(32, 15), **SEED),
    "seed L2": dict(c_in=64, c_out=128, hw=(16, 15), **SEED),
    "20-day L1": dict(c_in=1, c_out=64, hw=(64, 60), kernel=(5, 3), stride=(3, 1),
                      padding=((12, 12), (1, 1)), dilation=(2, 1)),
    "ResNet 3x3": dict(c_in=64, c_out=64, hw=(56, 56), kernel=(3, 3),
                       padding=((1, 1), (1, 1))),
}


def _conv_call(layer, n, which="forward", xp=numpy):
    """A no-argument call of conv2d (or a gradient) on ``n`` images of a layer."""
    spec = dict(LAYERS[layer])
    c_in, c_out, (h, w), kernel = (spec.pop(k) for k in ("c_in", "c_out", "hw", "kernel"))
    x = xp.asarray(_random((n, h, w, c_in)))
    weights = xp.asarray(_random(kernel + (c_in, c_out), seed=1))
    y = cc.conv2d(x, weights, **spec)
    grad = xp.asarray(_random(y.shape, seed=2))
    calls = {
        "forward": lambda: cc.conv2d(x, weights, **spec),
        "input_grad": lambda: cc.conv2d_input(x.shape, weights, grad, **spec),
        "weight_grad": lambda: cc.conv2d_weight(x, weights.shape, grad, **spec),
    }
    return calls[which]


def _train_step_call(model, n):
    """A no-argument call of one training step of the demo's CNN (forward,
    loss, backward, Adam) on ``n`` of its charts."""
    from cupyconv.bench import trainstep
    from cupyconv.demo import model as demo_model
    from cupyconv.demo.charts import make_charts

    charts = make_charts(n, model, seed=0)
    images = (charts.images[..., None] / numpy.float32(255)).astype(numpy.float32)
    net = demo_model.PriceTrendCNN(model, seed=0)
    optimizer = demo_model.Adam(net, lr=1e-4)
    labels = charts.labels.astype(numpy.int64)
    return lambda: trainstep.cupyconv_step(net, optimizer, images, labels)


def _time(call, sync=None):
    """Wall and CPU seconds (of all the process's threads) of a call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    call()
    if sync is not None:
        sync()
    return time.perf_counter() - start, time.process_time() - start_cpu


def _compare(cases, candidates, rounds, sync=None, cpu_time=False):
    """Print the median time (ms) of each case under each candidate.

    ``cases`` maps a label to a call; ``candidates`` maps a label to a
    context manager factory that sets the constants.  ``cpu_time`` adds the
    median CPU time of all threads, which other tenants of a shared
    machine disturb less than wall time."""
    for label, call in cases.items():
        times = {name: [] for name in candidates}
        for setting in candidates.values():  # warm up (and compile) each
            with setting():
                call()
        for _ in range(rounds):
            for name, setting in candidates.items():
                with setting():
                    times[name].append(_time(call, sync))
        cells = []
        for name, samples in times.items():
            wall, cpu = (statistics.median(t) for t in zip(*samples))
            cells.append(f"{name}: {1e3 * wall:.3g} ms"
                         + (f" ({1e3 * cpu:.3g} ms CPU)" if cpu_time else ""))
        print(f"{label}: {', '.join(cells)}", flush=True)


def conv_block_elements(rounds):
    """The NumPy convolution's block size (elements of the gathered matrix)."""
    _compare({"seed L2 forward, N=128": _conv_call("seed L2", 128),
              "ResNet 3x3 forward, N=8": _conv_call("ResNet 3x3", 8)},
             {f"2**{e}": (lambda e=e: _set(conv_cpu, _BLOCK_ELEMENTS=2**e))
              for e in (18, 19, 20)}, rounds)


def conv_blocks_per_core(rounds):
    """Blocks per core the NumPy convolution aims for."""
    _compare({"seed L1 forward, N=128": _conv_call("seed L1", 128),
              "20-day L1 forward, N=32": _conv_call("20-day L1", 32),
              "seed L2 forward, N=4": _conv_call("seed L2", 4)},
             {str(k): (lambda k=k: _set(conv_cpu, _BLOCKS_PER_CORE=k)) for k in (1, 2, 4)},
             rounds)


def conv_short_reduction(rounds):
    """Row chunks for products with a short reduction, and their size."""
    candidates = {"no chunks": lambda: _set(conv_cpu, _SHORT_REDUCTION=0)}
    candidates.update({f"{kib} KiB chunks": (lambda kib=kib: _set(
        conv_cpu, _SHORT_REDUCTION=32, _CHUNK_OUTPUT_BYTES=kib << 10)) for kib in (64, 128, 256)})
    _compare({"seed L1 forward, N=128": _conv_call("seed L1", 128),
              "20-day L1 forward, N=32": _conv_call("20-day L1", 32)}, candidates, rounds)


def conv_tap_major(rounds):
    """Gathered matrices pixel-major or tap-major, by channels per group."""
    cases = {}
    for c_in in (1, 2, 4, 8):
        LAYERS[f"seed L2, C_in={c_in}"] = dict(LAYERS["seed L2"], c_in=c_in)
        for which in ("forward", "weight_grad"):
            cases[f"seed L2 with C_in={c_in}, {which}, N=32"] = _conv_call(
                f"seed L2, C_in={c_in}", 32, which)
    _compare(cases, {"pixel-major": lambda: _set(conv_cpu, _TAP_MAJOR_MAX_CHANNELS=-1),
                     "tap-major": lambda: _set(conv_cpu, _TAP_MAJOR_MAX_CHANNELS=10**9)},
             rounds)


def conv_winograd_vs_im2col(rounds):
    """The NumPy convolution's Winograd F(2, 3) against im2col, per direction
    and channel counts (medians of wall and CPU time)."""
    LAYERS["20-day L2"] = dict(c_in=64, c_out=128, hw=(13, 60), **SEED)
    LAYERS["20-day L3"] = dict(c_in=128, c_out=256, hw=(6, 60), **SEED)
    for c_in, c_out in ((16, 128), (32, 128), (64, 64)):
        LAYERS[f"seed L2 as {c_in}->{c_out}"] = dict(LAYERS["seed L2"], c_in=c_in, c_out=c_out)
    cases = {f"{layer} {which}, N={n}": _conv_call(layer, n, which)
             for layer, n in ((layer, 32 if layer == "ResNet 3x3" else 128) for layer in LAYERS)
             for which in ("forward", "input_grad", "weight_grad")}
    cases.update({f"{model} training step, N=128": _train_step_call(model, 128)
                  for model in ("5day", "20day")})
    thresholds = ("_MIN_IN_CHANNELS", "_MIN_OUT_CHANNELS", "_MIN_OUTPUT_COLUMNS")
    candidates = {"im2col": lambda: _set(conv_winograd, _MIN_IN_CHANNELS=2**62),
                  "winograd": lambda: _set(conv_winograd, **dict.fromkeys(thresholds, 1))}
    _compare(cases, candidates, rounds, cpu_time=True)


def pool_fused_pixels(rounds):
    """numba loops of the general pool window: by pixels or by elements
    (one thread; 3x3 window, stride 2, padding 1, float32 NHWC)."""
    cases = {}
    for c in (1, 4, 16, 32):
        x = _random((8, 56, 56, c))
        out, at = cc.max_pool2d(x, 3, 2, 1, return_indices=True)
        g = _random(out.shape, seed=1)
        cases[f"C={c} forward"] = lambda x=x: cc.max_pool2d(x, 3, 2, 1)
        cases[f"C={c} backward from indices"] = (
            lambda x=x, g=g, at=at: cc.max_pool2d_backward(g, x, 3, 2, 1, indices=at))
    with _set(_parallel, CPUS=1):
        _compare(cases, {
            "by pixels": lambda: _set(pool_cpu, _FUSED_FORWARD_PIXELS=1,
                                      _FUSED_BACKWARD_PIXELS=1),
            "by elements": lambda: _set(pool_cpu, _FUSED_FORWARD_PIXELS=2**62,
                                        _FUSED_BACKWARD_PIXELS=2**62)}, rounds)


def dilation_runs(rounds):
    """dilate's NumPy path moving trailing axes as one item, or element by element."""
    x = _random((32, 64, 64, 16))
    merged = dilation_cpu._mergeable_tail
    _compare({"dilate 32x64x64x16 float32 along H and W by 1": lambda: cc.dilate(x, (1, 2), 1)},
             {"runs of 16": lambda: _set(dilation_cpu, _mergeable_tail=merged),
              "elements": lambda: _set(dilation_cpu, _mergeable_tail=lambda a, axes: 0)},
             rounds)


class _NoOpKernel:
    """A kernel that does nothing, called like ``cupy.RawKernel``."""

    def __call__(self, grid, block, args, shared_mem=0):
        pass


class NoOpProvider:
    """A kernel provider whose kernels do nothing, on NumPy buffers: a
    public call then runs its checks and launch code and nothing else, so
    its time is the host time it would add to a GPU launch."""

    runs_on_numpy = True
    kernel = _NoOpKernel()

    def get_function(self, source, name_expressions, name, options):
        return self.kernel


def _host_calls():
    """The small calls of ``host-overhead``: label -> no-argument call."""
    # 8 input channels: the input gradient of 4 or fewer goes through a
    # matrix product (real work on NumPy), not through a kernel alone.
    x = _random((2, 8, 8, 8))
    w = _random((3, 3, 8, 8), seed=1)
    bias = _random((8,), seed=2)
    grad = _random((2, 8, 8, 8), seed=3)
    pool_grad = _random((2, 8, 8, 8), seed=4)
    pool_grad_2x1 = _random((2, 4, 8, 8), seed=5)
    return {
        "conv2d 2x8x8x8 float32 NHWC, 3x3, padding 1, bias": lambda: cc.conv2d(x, w, bias, padding=1),
        "conv2d_input": lambda: cc.conv2d_input(x.shape, w, grad, padding=1),
        "conv2d_weight": lambda: cc.conv2d_weight(x, w.shape, grad, padding=1),
        "max_pool2d 3x3/1/1": lambda: cc.max_pool2d(x, 3, 1, 1),
        "max_pool2d 2x1": lambda: cc.max_pool2d(x, (2, 1)),
        "max_pool2d_backward 3x3/1/1": lambda: cc.max_pool2d_backward(pool_grad, x, 3, 1, 1),
        "max_pool2d_backward 2x1": lambda: cc.max_pool2d_backward(pool_grad_2x1, x, (2, 1)),
        "dilate H and W by 1": lambda: cc.dilate(x, (1, 2), 1),
    }


def host_overhead(rounds):
    """Host time of small calls, kernels replaced by no-ops (us per call)."""
    from cupyconv import _kernels

    calls = _host_calls()
    # Batches short next to a time slice of a loaded machine (about 0.2 ms),
    # so that most of them run without being preempted.
    batches, per_batch = 10, 20
    times = {label: [] for label in calls}
    with _kernels.use_provider(NoOpProvider()):
        for call in calls.values():
            call()
        for _ in range(rounds):  # interleaved: a change of load hits every call alike
            for label, call in calls.items():
                for _ in range(batches):
                    start = time.perf_counter()
                    for _ in range(per_batch):
                        call()
                    times[label].append((time.perf_counter() - start) / per_batch)
    for label, t in times.items():
        print(f"{label}: {1e6 * statistics.median(t):.1f} us", flush=True)


def conv_weight_grad_splits(rounds):
    """GPU: the weight gradient's split-K limit (needs CuPy and a GPU)."""
    import cupy

    sync = cupy.cuda.get_current_stream().synchronize
    _compare({f"{layer} weight gradient, N=128": _conv_call(layer, 128, "weight_grad", cupy)
              for layer in ("20-day L1", "seed L1")},
             {str(k): (lambda k=k: _set(conv_cuda, _MAX_SPLITS=k)) for k in (64, 256)},
             rounds, sync)


EXPERIMENTS = {
    "conv-block-elements": conv_block_elements,
    "conv-blocks-per-core": conv_blocks_per_core,
    "conv-short-reduction": conv_short_reduction,
    "conv-tap-major": conv_tap_major,
    "conv-winograd": conv_winograd_vs_im2col,
    "pool-fused-pixels": pool_fused_pixels,
    "dilation-runs": dilation_runs,
    "conv-weight-grad-splits": conv_weight_grad_splits,
    "host-overhead": host_overhead,
}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python docs/tuning.py", description=__doc__.split("\n")[0])
    p.add_argument("experiment", nargs="?", choices=sorted(EXPERIMENTS))
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    args = p.parse_args(argv)
    if args.experiment is None:
        for name, function in EXPERIMENTS.items():
            print(f"{name}: {function.__doc__.splitlines()[0]}")
        return 0
    EXPERIMENTS[args.experiment](args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
