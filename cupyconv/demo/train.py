"""Train the price-trend CNN on synthetic charts: ``python -m cupyconv demo``.

Generates training and test charts (:mod:`cupyconv.demo.charts`), trains
:class:`~cupyconv.demo.model.PriceTrendCNN` with Adam and softmax
cross-entropy, shows a plain-text progress bar, prints each epoch's
training and test loss and accuracy (all on stdout), and saves two PNGs (when
matplotlib is installed): the loss/accuracy curves and sample charts with
their labels and the model's predictions.  Runs on the GPU when CuPy sees
one (``--device auto``), else on the CPU with NumPy.
"""

import argparse
import importlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy

from .. import _backend
from .charts import CHART_SPECS, make_charts
from .model import Adam, GradScaler, PriceTrendCNN, softmax_cross_entropy

__all__ = ["main", "parse_args", "train", "evaluate", "TrainResult"]

#: Momentum strength per model: the hidden trend predicts 87% of labels in both.
DEFAULT_SIGNAL = {"5day": 0.5, "20day": 0.25}


def parse_args(argv=None):
    """Parse the demo's options (``python -m cupyconv demo --help``).

    Parameters
    ----------
    argv : list of str, optional
        ``sys.argv[1:]`` when ``None``.

    Returns
    -------
    argparse.Namespace
        ``signal`` filled in from :data:`DEFAULT_SIGNAL` when not given.

    Raises
    ------
    SystemExit
        Status 2 (after printing the problem to stderr) for a bad option.

    Examples
    --------
    >>> args = parse_args(["--model", "20day", "--epochs", "3"])
    >>> args.model, args.epochs, args.batch_size, args.signal
    ('20day', 3, 128, 0.25)
    """
    parser = argparse.ArgumentParser(
        prog="python -m cupyconv demo",
        description="Train the (Re-)Imag(in)ing Price Trends CNN on synthetic "
                    "OHLC chart images with cupyconv's convolution and pooling.",
        epilog="Prints the progress and the final test accuracy, and saves "
               "training_curves.png and sample_charts.png in --output (needs "
               "matplotlib).  The defaults take about a minute on two CPU "
               "cores; the 20day model does about 15 times the work per image, "
               "so on a CPU give it a smaller --train-size.")
    parser.add_argument("--model", choices=sorted(CHART_SPECS), default="5day",
                        help="5day: 32x15 images, 2 conv blocks; 20day: 64x60 "
                             "images, 3 blocks (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="passes over the training set (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="images per Adam step (default: %(default)s, as the paper)")
    parser.add_argument("--train-size", type=int, default=5000,
                        help="training charts (default: %(default)s)")
    parser.add_argument("--test-size", type=int, default=2000,
                        help="held-out test charts (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--signal", type=float, default=None,
                        help="momentum strength of the synthetic prices: daily "
                             "drift in daily volatilities; 0 = unpredictable "
                             "(default: 0.5 for 5day, 0.25 for 20day, where "
                             "knowing the hidden trend predicts 87%% of labels)")
    parser.add_argument("--dropout", type=float, default=0.5,
                        help="dropout before the last layer (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the data, the initial weights, the dropout "
                             "masks and the batch order (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="gpu needs CuPy and a CUDA device; auto uses one "
                             "if present (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="parameter and activation dtype (default: %(default)s)")
    parser.add_argument("--compute-dtype", choices=("float16", "bfloat16"), default=None,
                        help="mixed precision, as torch.autocast: activations, "
                             "convolutions and the last layer in this dtype, "
                             "parameters, gradients and Adam in --dtype; float16 "
                             "with dynamic loss scaling; bfloat16 needs ml_dtypes "
                             "(default: --dtype throughout)")
    parser.add_argument("--output", default="cupyconv-demo",
                        help="folder for the PNGs, created if missing "
                             "(default: %(default)s)")
    parser.add_argument("--no-plots", action="store_true",
                        help="skip the PNGs")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "train_size", "test_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    if args.signal is None:
        args.signal = DEFAULT_SIGNAL[args.model]
    if not (args.lr > 0 and args.signal >= 0):
        parser.error("--lr must be > 0 and --signal >= 0")
    if args.compute_dtype == "bfloat16":
        try:
            import ml_dtypes  # noqa: F401  (registers the dtype with NumPy)
        except ImportError:
            parser.error("--compute-dtype bfloat16 needs ml_dtypes "
                         "(pip install ml_dtypes, or the bf16 extra)")
    return args


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model and its history.

    ``initial`` holds ``test_loss`` and ``test_accuracy`` of the untrained
    model, ``steps`` ``(epoch, loss, accuracy)`` of every training batch
    (``epoch`` fractional), ``epochs`` one dict per epoch with
    ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``,
    ``seconds`` and ``images_per_second``.
    """

    model: PriceTrendCNN
    initial: dict
    steps: list = field(default_factory=list)
    epochs: list = field(default_factory=list)


def _to_device(images, xp, dtype):
    """uint8 ``(N, H, W)`` charts as ``(N, H, W, 1)`` floats in [0, 1]."""
    return xp.asarray(images)[..., None].astype(dtype) / dtype.type(255)


def evaluate(net, images, labels, batch_size=512):
    """Mean loss, accuracy and predicted labels of ``net`` in evaluation mode.

    Parameters
    ----------
    net : PriceTrendCNN
    images : ndarray
        uint8 charts ``(N, H, W)``, NumPy or on ``net``'s device.
    labels : ndarray
        ``(N,)`` integers, 0 (down) or 1 (up).
    batch_size : int, optional
        Images per forward pass.

    Returns
    -------
    loss : float
        Mean cross-entropy.
    accuracy : float
    predictions : numpy.ndarray
        ``(N,)`` predicted labels.

    Examples
    --------
    >>> from cupyconv.demo.charts import make_charts
    >>> from cupyconv.demo.model import PriceTrendCNN
    >>> charts = make_charts(10, "5day", seed=0)
    >>> loss, accuracy, predictions = evaluate(PriceTrendCNN(), charts.images,
    ...                                        charts.labels)
    >>> predictions.shape, 0 <= accuracy <= 1
    ((10,), True)
    """
    xp = net.xp
    total_loss, correct, predictions = 0.0, 0, []
    for start in range(0, len(labels), batch_size):
        x = _to_device(images[start:start + batch_size], xp, net.dtype)
        y = xp.asarray(labels[start:start + batch_size])
        logits = net.forward(x, training=False)
        loss, _ = softmax_cross_entropy(logits, y)
        predicted = logits.argmax(axis=1)
        total_loss += float(loss) * len(y)
        correct += int((predicted == y).sum())
        predictions.append(_backend.asnumpy(predicted))
    return total_loss / len(labels), correct / len(labels), numpy.concatenate(predictions)


def train(train_charts, test_charts, *, model="5day", epochs=2, batch_size=128,
          lr=1e-4, dropout=0.5, seed=0, xp=numpy, dtype=numpy.float32,
          compute_dtype=None, progress=None):
    """Train a fresh :class:`PriceTrendCNN` and evaluate it after every epoch.

    Training loss and accuracy are those of the training-mode passes
    (dropout on, batch statistics), so they run worse than the test figures,
    which evaluation mode computes.

    Parameters
    ----------
    train_charts, test_charts : Charts
        From :func:`~cupyconv.demo.charts.make_charts` with the model's spec.
    model : {"5day", "20day"}
    epochs, batch_size : int
        The last batch of an epoch may be smaller.
    lr, dropout : float
        Adam learning rate, dropout probability.
    seed : int
        Seeds the weights, dropout masks and the batch order.
    xp : module
        ``numpy`` or ``cupy``.
    dtype, compute_dtype : dtype
        As :class:`PriceTrendCNN` takes them; float16 ``compute_dtype``
        with wider parameters trains with a :class:`GradScaler`.
    progress : TextProgress, optional
        An object like :class:`TextProgress`: ``progress.start(initial)``
        after evaluating the untrained model, ``progress.batch(epoch, seen,
        total, loss, accuracy, seconds)`` after every batch (running means
        over the epoch so far), ``progress.epoch_end(epoch, summary)`` after
        each epoch's evaluation.

    Returns
    -------
    TrainResult

    Examples
    --------
    >>> from cupyconv.demo.charts import make_charts
    >>> result = train(make_charts(64, seed=0), make_charts(32, seed=1),
    ...                epochs=1, batch_size=32)
    >>> len(result.steps), sorted(result.epochs[0])[:3]
    (2, ['images_per_second', 'seconds', 'test_accuracy'])
    """
    dtype = numpy.dtype(dtype)
    net = PriceTrendCNN(model, xp=xp, dtype=dtype, compute_dtype=compute_dtype, seed=seed,
                        dropout=dropout)
    optimizer = Adam(net, lr=lr)
    scaler = GradScaler(enabled=net.compute_dtype == numpy.float16 and dtype != numpy.float16)
    order_rng = numpy.random.default_rng([seed, 2])
    images = xp.asarray(train_charts.images)
    labels = xp.asarray(train_charts.labels)
    n = len(train_charts.labels)
    batches = math.ceil(n / batch_size)
    test_loss, test_accuracy, _ = evaluate(net, test_charts.images, test_charts.labels)
    result = TrainResult(net, dict(test_loss=test_loss, test_accuracy=test_accuracy))
    if progress is not None:
        progress.start(result.initial)
    for epoch in range(epochs):
        order = xp.asarray(order_rng.permutation(n))
        start_time = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        for b in range(batches):
            index = order[b * batch_size:(b + 1) * batch_size]
            x = _to_device(images[index], xp, dtype)
            y = labels[index]
            logits = net.forward(x, training=True)
            loss, grad = softmax_cross_entropy(logits, y)
            net.backward(scaler.scale(grad), input_gradient=False)
            scaler.step(optimizer)
            scaler.update()
            batch_loss = float(loss)
            batch_correct = int((logits.argmax(axis=1) == y).sum())
            seen += len(index)
            correct += batch_correct
            loss_sum += batch_loss * len(index)
            result.steps.append((epoch + (b + 1) / batches, batch_loss,
                                 batch_correct / len(index)))
            if progress is not None:
                progress.batch(epoch, seen, n, loss_sum / seen, correct / seen,
                               time.perf_counter() - start_time)
        seconds = time.perf_counter() - start_time
        test_loss, test_accuracy, _ = evaluate(net, test_charts.images, test_charts.labels)
        summary = dict(train_loss=loss_sum / seen, train_accuracy=correct / seen,
                       test_loss=test_loss, test_accuracy=test_accuracy,
                       seconds=seconds, images_per_second=seen / seconds)
        result.epochs.append(summary)
        if progress is not None:
            progress.epoch_end(epoch, summary)
    return result


#: Printed once before the epoch lines: without it, a newcomer takes the
#: training figures, worse than the test figures, for a bug.
TRAIN_FIGURES_NOTE = (
    "(train figures are means over the epoch's batches with dropout on and batch\n"
    " statistics in the batch norms, so they run worse than the test figures,\n"
    " which come from the epoch's final model in evaluation mode)")


class TextProgress:
    """A plain-text progress bar on ``stream`` (default stdout, where the
    rest of the demo's report goes): redrawn in place on a terminal;
    elsewhere (a log file, a pipe) only one line per epoch."""

    WIDTH = 24

    def __init__(self, epochs, stream=None):
        self.epochs = epochs
        self.stream = sys.stdout if stream is None else stream
        self.live = getattr(self.stream, "isatty", lambda: False)()
        self.last_draw = 0.0

    def start(self, initial):
        self.stream.write(f"before training: test loss {initial['test_loss']:.4f}"
                          f" acc {initial['test_accuracy']:.3f}\n{TRAIN_FIGURES_NOTE}\n")
        self.stream.flush()

    def batch(self, epoch, seen, total, loss, accuracy, seconds):
        now = time.perf_counter()
        if not self.live or (now - self.last_draw < 0.1 and seen < total):
            return
        self.last_draw = now
        filled = round(self.WIDTH * seen / total)
        self.stream.write(
            f"\repoch {epoch + 1}/{self.epochs} [{'#' * filled}{'.' * (self.WIDTH - filled)}]"
            f" {seen}/{total}  loss {loss:.4f}  acc {accuracy:.3f}"
            f"  {seen / max(seconds, 1e-9):.0f} img/s")
        self.stream.flush()

    def epoch_end(self, epoch, s):
        line = (f"epoch {epoch + 1}/{self.epochs}  train loss {s['train_loss']:.4f}"
                f" acc {s['train_accuracy']:.3f}  |  test loss {s['test_loss']:.4f}"
                f" acc {s['test_accuracy']:.3f}  |  {s['seconds']:.1f} s,"
                f" {s['images_per_second']:.0f} img/s")
        self.stream.write(("\r" + line.ljust(96) if self.live else line) + "\n")
        self.stream.flush()


def _compute_dtype(name):
    """``--compute-dtype`` as a dtype (None: none given)."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return name


def _array_module(device):
    """``(xp, description)`` for ``--device``; raises RuntimeError for an
    unavailable GPU."""
    if device == "cpu" or (device == "auto" and not _backend.gpu_available()):
        return numpy, "CPU (NumPy)"
    if not _backend.gpu_available():
        raise RuntimeError(f"--device gpu: {_backend.gpu_unavailable_reason()}")
    return importlib.import_module("cupy"), _backend.backend_info()["device"]


def save_plots(result, test_charts, predictions, folder, model):
    """Write ``training_curves.png`` and ``sample_charts.png`` into ``folder``;
    return their paths, or ``None`` if matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    os.makedirs(folder, exist_ok=True)
    steps = numpy.array(result.steps)
    window = max(1, len(steps) // 10)
    epoch_axis = numpy.arange(len(result.epochs) + 1)
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, column, key, title in zip(fig.subplots(1, 2), (1, 2), ("loss", "accuracy"),
                                      ("cross-entropy loss", "accuracy")):
        ax.plot(steps[:, 0], steps[:, column], color="0.8", lw=0.8, label="train (batch)")
        smooth = numpy.convolve(steps[:, column], numpy.ones(window) / window, "valid")
        ax.plot(steps[window - 1:, 0], smooth, lw=1.5,
                label=f"train (mean of {window} batches)")
        ax.plot(epoch_axis, [result.initial[f"test_{key}"]]
                + [e[f"test_{key}"] for e in result.epochs], "s-", label="test")
        if key == "accuracy":
            ax.axhline(0.5, color="k", ls=":", lw=0.8, label="chance")
        ax.set(xlabel="epoch", title=f"{model} CNN: {title}")
        ax.legend()
    curves = os.path.join(folder, "training_curves.png")
    fig.savefig(curves, dpi=120)

    rows, cols = 3, 8
    fig = Figure(figsize=(cols * 1.3, rows * 2.0), layout="constrained")
    names = ("down", "up")
    for i, ax in enumerate(fig.subplots(rows, cols).ravel()):
        ax.imshow(test_charts.images[i], cmap="gray", interpolation="nearest",
                  vmin=0, vmax=255)
        label, guess = test_charts.labels[i], predictions[i]
        ax.set_title(f"{names[label]}\n(predicted {names[guess]})", fontsize=8,
                     color="tab:green" if label == guess else "tab:red")
        ax.set_axis_off()
    fig.suptitle(f"Test charts ({model}): label = sign of the next period's return")
    samples = os.path.join(folder, "sample_charts.png")
    fig.savefig(samples, dpi=120)
    return curves, samples


def main(argv=None):
    """Run the demo: ``python -m cupyconv demo [options]``.

    Parameters
    ----------
    argv : list of str, optional
        Command-line options (``sys.argv[1:]`` when ``None``); ``--help``
        lists them.

    Returns
    -------
    int
        Exit status: 0, or 2 when ``--device gpu`` finds no GPU.

    Raises
    ------
    SystemExit
        For ``--help`` (status 0) and bad options (status 2), from argparse.

    Examples
    --------
    >>> main(["--train-size", "64", "--test-size", "32", "--epochs", "1",
    ...       "--device", "cpu", "--no-plots"])  # doctest: +ELLIPSIS
    cupyconv demo: 5day CNN on 32x15 synthetic charts (64 train, 32 test, signal 0.5) on CPU (NumPy), float32
      data generated in ... s; ...% of training labels are 'up'
    before training: test loss ... acc ...
    (train figures are means over the epoch's batches with dropout on and batch
     statistics in the batch norms, so they run worse than the test figures,
     which come from the epoch's final model in evaluation mode)
    epoch 1/1  train loss ... acc ...  |  test loss ... acc ...  |  ... s, ... img/s
    final test accuracy: ... (test loss ...; chance is 0.5) after ... s
    0
    """
    args = parse_args(argv)
    try:
        xp, device = _array_module(args.device)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    spec = CHART_SPECS[args.model]
    start = time.perf_counter()
    train_charts = make_charts(args.train_size, args.model, seed=[args.seed, 0],
                               signal=args.signal)
    test_charts = make_charts(args.test_size, args.model, seed=[args.seed, 1],
                              signal=args.signal)
    precision = args.dtype + (f" parameters, {args.compute_dtype} compute"
                              if args.compute_dtype else "")
    print(f"cupyconv demo: {args.model} CNN on {spec.height}x{spec.width} synthetic "
          f"charts ({args.train_size} train, {args.test_size} test, signal "
          f"{args.signal}) on {device}, {precision}")
    print(f"  data generated in {time.perf_counter() - start:.2f} s; "
          f"{train_charts.labels.mean():.1%} of training labels are 'up'")
    result = train(train_charts, test_charts, model=args.model, epochs=args.epochs,
                   batch_size=args.batch_size, lr=args.lr, dropout=args.dropout,
                   seed=args.seed, xp=xp, dtype=args.dtype,
                   compute_dtype=_compute_dtype(args.compute_dtype),
                   progress=TextProgress(args.epochs))
    final = result.epochs[-1]
    print(f"final test accuracy: {final['test_accuracy']:.3f} "
          f"(test loss {final['test_loss']:.4f}; chance is 0.5) after "
          f"{time.perf_counter() - start:.1f} s")
    if not args.no_plots:
        _, _, predictions = evaluate(result.model, test_charts.images[:24],
                                     test_charts.labels[:24])
        paths = save_plots(result, test_charts, predictions, args.output, args.model)
        if paths is None:
            print("matplotlib is not installed: skipping the PNGs")
        else:
            print("saved " + " and ".join(paths))
    return 0
