"""``python -m cupyconv demo-dask``: the trained price-trend CNN over a chart
set too large to hold at once, as Dask arrays on a cluster of processes.

The charts are made lazily, one chunk of ``--chunk`` charts per task, so no
process ever holds more than a few chunks; the model is the demo's own
:class:`~cupyconv.demo.model.PriceTrendCNN`, run chunk by chunk
(``map_blocks``): every task classifies one chunk of charts with the eager
model (cupyconv's ``conv2d`` and ``max_pool2d`` on the worker's NumPy or
CuPy chunk), since the model's elementwise layers work in place on their
arrays.  The command trains the model briefly, then runs the
inference on ``distributed``'s ``LocalCluster`` with each of ``--workers``
worker processes (one thread each; cupyconv's CPU code may still use every
core from each) and prints the images per second of each, after an untimed
warm-up chunk (the workers' first call imports and compiles).

Examples
--------
>>> main(["--charts", "256", "--chunk", "128", "--train-size", "64",
...       "--workers", "1", "--no-progress"])  # doctest: +ELLIPSIS
cupyconv demo-dask: 5day CNN, 256 lazy 32x15 charts in 2 chunks of 128
  trained on 64 charts in ... s (test accuracy ...)
  workers  seconds  images/s  accuracy
        1    ...
0
"""

import argparse
import os
import time

import numpy

from .charts import CHART_SPECS, make_charts
from .model import BatchNorm, PriceTrendCNN
from .train import train

__all__ = ["lazy_charts", "predict", "main"]


def _chart_chunk(n, model, seed, signal):
    charts = make_charts(n, model, seed=seed, signal=signal)
    images = charts.images[..., None].astype(numpy.float32) / numpy.float32(255)
    return images, charts.labels


def lazy_charts(count, chunk, model="5day", *, seed=0, signal=0.5):
    """``count`` synthetic charts as Dask arrays, made chunk by chunk.

    Parameters
    ----------
    count, chunk : int
        Charts in all and per chunk (the last chunk may be smaller).
    model : {"5day", "20day"}
    seed : int
        Chunk ``k`` is ``make_charts(..., seed=[seed, 2, k])``.
    signal : float

    Returns
    -------
    images : dask.array.Array
        ``(count, H, W, 1)`` float32 in [0, 1], chunked along the batch.
    labels : dask.array.Array
        ``(count,)`` int64.

    Examples
    --------
    >>> images, labels = lazy_charts(10, 4)
    >>> images.shape, images.chunks[0], labels.dtype
    ((10, 32, 15, 1), (4, 4, 2), dtype('int64'))
    """
    import dask
    import dask.array as da

    spec = CHART_SPECS[model]
    images, labels = [], []
    for k, start in enumerate(range(0, count, chunk)):
        n = min(chunk, count - start)
        part = dask.delayed(_chart_chunk, pure=True, nout=2)(
            n, model, [seed, 2, k], signal)
        images.append(da.from_delayed(part[0], (n, spec.height, spec.width, 1),
                                      dtype=numpy.float32))
        labels.append(da.from_delayed(part[1], (n,), dtype=numpy.int64))
    return da.concatenate(images), da.concatenate(labels)


def predict(net, images):
    """Lazy predicted labels (0 down, 1 up) of a :class:`PriceTrendCNN` in
    evaluation mode for Dask ``images``: one eager forward pass per chunk of
    charts, the model entering the graph once (as one key, without the
    activations its last training step kept)."""
    import dask

    if any(len(sizes) > 1 for sizes in images.chunks[1:]):
        images = images.rechunk({1: -1, 2: -1, 3: -1})
    model = dask.delayed(_inference_copy(net), pure=True)
    meta = images._meta.reshape(-1)[:0].astype(numpy.int64)  # NumPy or CuPy, as the chunks
    return images.map_blocks(_classify, model, drop_axis=[1, 2, 3], dtype=numpy.int64,
                             meta=meta)


def _classify(images, net):
    return net.forward(images, training=False).argmax(axis=1)


def _inference_copy(net):
    """A model with ``net``'s parameters and running statistics and nothing
    else: the activations and gradients a training step leaves in the layers
    stay behind."""
    copy = PriceTrendCNN(net.model, xp=net.xp, dtype=net.dtype)
    for (_, layer), (_, trained) in zip(copy.layers, net.layers):
        layer.params = trained.params
        if isinstance(trained, BatchNorm):
            layer.running_mean = trained.running_mean
            layer.running_var = trained.running_var
    return copy


def _pin_workers(client):
    """Pin worker ``k`` (every thread of its process) to core ``k`` modulo the
    cores, before its first task imports cupyconv, whose CPU code then sees
    one core and runs one thread.  Linux only (``/proc``)."""
    cores = sorted(os.sched_getaffinity(0))
    pids = client.run(os.getpid)  # a builtin: the workers import nothing
    for k, pid in enumerate(pids[address] for address in sorted(pids)):
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {cores[k % len(cores)]})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m cupyconv demo-dask",
        description="Inference of the trained price-trend CNN over lazily made "
                    "charts with Dask, timed on LocalClusters of 1, 2, ... workers.")
    parser.add_argument("--model", choices=sorted(CHART_SPECS), default="5day")
    parser.add_argument("--charts", type=int, default=200_000,
                        help="charts to classify (default 200000)")
    parser.add_argument("--chunk", type=int, default=512,
                        help="charts per chunk (default 512)")
    parser.add_argument("--train-size", type=int, default=4096,
                        help="charts to train on first (default 4096)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", default="1,2",
                        help="worker processes of each run, comma-separated "
                             "(default 1,2)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per worker count (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", type=float, default=0.5)
    parser.add_argument("--pin", action="store_true",
                        help="pin worker k to core k (Linux): one core per worker")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar")
    args = parser.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers must be integers separated by commas, got {args.workers!r}")
    for name in ("charts", "chunk", "train_size", "epochs", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.workers) < 1:
        parser.error("--workers must be >= 1")
    return args


def main(argv=None):
    """Run the command; returns the exit status (0)."""
    import dask.array as da
    import distributed

    args = parse_args(argv)
    spec = CHART_SPECS[args.model]
    chunks = -(-args.charts // args.chunk)
    print(f"cupyconv demo-dask: {args.model} CNN, {args.charts} lazy "
          f"{spec.height}x{spec.width} charts in {chunks} chunks of {args.chunk}")
    start = time.perf_counter()
    trained = train(make_charts(args.train_size, args.model, seed=[args.seed, 0],
                                signal=args.signal),
                    make_charts(min(args.train_size, 1024), args.model,
                                seed=[args.seed, 1], signal=args.signal),
                    model=args.model, epochs=args.epochs, seed=args.seed)
    print(f"  trained on {args.train_size} charts in "
          f"{time.perf_counter() - start:.1f} s (test accuracy "
          f"{trained.epochs[-1]['test_accuracy']:.3f})")
    images, labels = lazy_charts(args.charts, args.chunk, args.model,
                                 seed=args.seed, signal=args.signal)
    correct = da.sum(predict(trained.model, images) == labels)
    print("  workers  seconds  images/s  accuracy")
    for workers in args.workers:
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                      processes=True, dashboard_address=":0",
                                      silence_logs=40,
                                      env={"OPENBLAS_NUM_THREADS": "1"} if args.pin
                                      else {}) as cluster, \
                distributed.Client(cluster) as client:
            if args.pin:
                _pin_workers(client)
            # Not timed: the workers' first call imports and compiles.
            client.compute(predict(trained.model, images[:args.chunk])).result()
            for _ in range(args.repeat):
                began = time.perf_counter()
                future = client.compute(correct)
                if not args.no_progress:
                    distributed.progress(future)
                    print()
                right = int(future.result())
                seconds = time.perf_counter() - began
                print(f"  {workers:7d}  {seconds:7.2f}  {args.charts / seconds:8.0f}  "
                      f"{right / args.charts:8.3f}")
    return 0
