"""Synthetic OHLC chart images, drawn the way "(Re-)Imag(in)ing Price Trends"
(Jiang, Kelly & Xiu) draws real ones, with a label the picture predicts.

How the data is made
--------------------
Each sample is one stock's price path over ``days`` trading days (5 or 20),
drawn as a black-and-white image, and labelled with the sign of the return
over the ``days`` days that follow the image (up = 1, down = 0).

*Prices.*  Daily log returns are ``r_t = s * signal * sigma + sigma * e_t``
with ``e_t`` standard normal, ``sigma = 2%`` and one hidden regime
``s = +1`` or ``-1`` per sample (a coin flip).  The regime persists through
the image window and the future window, so a chart that trends up tends to
keep going up: momentum, whose strength ``signal`` is the daily drift in
units of the daily volatility.  Each day also gets an opening gap (the open
differs from the previous close by ``0.5 * sigma`` times a standard normal),
a high above ``max(open, close)`` and a low below ``min(open, close)`` (each
by ``0.5 * sigma * |normal|`` in log terms), and a log-normal volume that
grows with the day's absolute return.  Knowing the regime exactly would
predict the label with accuracy ``Phi(signal * sqrt(days))`` (``Phi`` the
normal CDF): 0.87 for ``signal = 0.5`` and 5 days, as for 0.25 and 20 days
(the demo's defaults).  The picture reveals the regime only through the
``2 * days - 1`` noisy returns it draws (the moving average reaches
``days - 1`` days back), so no classifier of the image can beat about 0.82
in either case.  ``signal = 0`` makes the label pure noise.

*Image.*  ``height`` rows (32 for 5 days, 64 for 20) by ``3 * days``
columns (15 or 60), row 0 at the top, 0 = black background, 255 = white.
Day ``d`` owns columns ``3d`` (open tick), ``3d + 1`` (high-low bar, also
the volume bar) and ``3d + 2`` (close tick).  The bottom ``height // 5``
rows hold the volume bars, one blank row separates them from the price
area above, which has ``P = height - height // 5 - 1`` rows (25 or 51).

* Prices map to rows linearly within each image: with ``hi`` and ``lo`` the
  largest and smallest of the highs, lows and moving-average values in the
  window, price ``p`` is drawn in row ``round((hi - p) / (hi - lo) * (P - 1))``
  (round half to even), so the window's top touches row 0 and its bottom
  row ``P - 1``.
* The high-low bar fills column ``3d + 1`` from the high's row to the low's
  row inclusive; the open and close are one pixel each in columns ``3d`` and
  ``3d + 2``.
* The moving average of the last ``days`` closes (the paper's choice: a
  5-day average on 5-day images, 20-day on 20-day) is a line of one pixel
  per column from the middle column of the first day to that of the last:
  at column ``3d + 1 + k`` (``k = 0, 1, 2``) its row is the rounded linear
  interpolation ``y_d + (y_{d+1} - y_d) * k / 3`` of the unrounded rows
  ``y = (hi - ma) / (hi - lo) * (P - 1)`` of consecutive days.
* Volume bars: with ``V = height // 5`` rows and the window's largest
  volume ``vmax``, day ``d``'s bar is ``round(volume / vmax * V)`` pixels
  tall, in column ``3d + 1``, rising from the bottom row.

Generation is vectorised over samples (tens of thousands of images per
second on one CPU core) and reproducible: the same ``seed`` gives the same
images and labels.
"""

from dataclasses import dataclass

import numpy

__all__ = ["ChartSpec", "CHART_SPECS", "Charts", "make_charts", "draw_charts"]

_SIGMA = 0.02          # daily volatility of the log price
_GAP = 0.5             # opening gap, in units of sigma
_RANGE = 0.5           # high/low excursion beyond open/close, in units of sigma


@dataclass(frozen=True)
class ChartSpec:
    """Geometry of one chart size: ``days`` trading days in ``height`` rows.

    ``width`` is ``3 * days``; the moving-average window and the label's
    horizon are both ``days`` days.
    """

    days: int
    height: int

    @property
    def width(self):
        return 3 * self.days

    @property
    def volume_rows(self):
        return self.height // 5

    @property
    def price_rows(self):
        return self.height - self.volume_rows - 1


CHART_SPECS = {"5day": ChartSpec(days=5, height=32),
               "20day": ChartSpec(days=20, height=64)}


@dataclass(frozen=True)
class Charts:
    """A batch of charts: images, labels and the prices they were drawn from.

    ``images`` is ``(N, height, 3 * days)`` uint8 (0 or 255), ``labels`` is
    ``(N,)`` int64 (1 = the next ``days`` days' return is positive).  The
    remaining fields are ``(N, days)`` float64 values for the image's days
    (``ma`` the moving average of closes), and ``future_return`` the ``(N,)``
    log return the label is the sign of.
    """

    images: numpy.ndarray
    labels: numpy.ndarray
    open: numpy.ndarray
    high: numpy.ndarray
    low: numpy.ndarray
    close: numpy.ndarray
    ma: numpy.ndarray
    volume: numpy.ndarray
    future_return: numpy.ndarray


def make_charts(n, spec="5day", *, seed=0, signal=0.5):
    """Simulate ``n`` price paths and draw them as chart images.

    Parameters
    ----------
    n : int
        Number of charts, ``>= 0``.
    spec : {"5day", "20day"} or ChartSpec
        Chart size: 5 days in 32x15 pixels or 20 days in 64x60.
    seed : int or sequence of int, optional
        Seed of the ``numpy.random.Generator`` (``numpy.random.default_rng``);
        the same seed gives the same charts.
    signal : float, optional
        Momentum strength: the daily drift, in daily volatilities, of the
        hidden up/down regime shared by the image and the future window.
        ``0`` makes the labels unpredictable.

    Returns
    -------
    Charts
        Images, labels and the underlying prices (see the module docstring
        for how they are made and drawn).

    Raises
    ------
    ValueError
        If ``spec`` is not a known name, ``n < 0`` or ``signal`` is negative.
    TypeError
        If ``n`` is not an integer.

    Examples
    --------
    >>> charts = make_charts(3, "5day", seed=0)
    >>> charts.images.shape, charts.images.dtype, charts.labels.shape
    ((3, 32, 15), dtype('uint8'), (3,))
    >>> sorted(set(charts.images.ravel().tolist()))
    [0, 255]
    >>> make_charts(2, "20day", seed=1).images.shape
    (2, 64, 60)
    """
    spec = _spec(spec)
    if isinstance(n, bool) or not isinstance(n, (int, numpy.integer)):
        raise TypeError(f"n must be an integer, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not signal >= 0:
        raise ValueError(f"signal must be >= 0, got {signal!r}")
    rng = numpy.random.default_rng(seed)
    days = spec.days
    history = days - 1          # days before the window that the moving average needs
    total = history + 2 * days  # history, image window, future window

    regime = rng.choice(numpy.array([-1.0, 1.0]), size=(n, 1))
    returns = _SIGMA * (signal * regime + rng.standard_normal((n, total)))
    log_close = numpy.cumsum(returns, axis=1)
    close = numpy.exp(log_close)

    window = slice(history, history + days)
    prev_close = numpy.exp(log_close[:, window] - returns[:, window])
    open_ = prev_close * numpy.exp(_GAP * _SIGMA * rng.standard_normal((n, days)))
    body_top = numpy.maximum(open_, close[:, window])
    body_bottom = numpy.minimum(open_, close[:, window])
    high = body_top * numpy.exp(_RANGE * _SIGMA * numpy.abs(rng.standard_normal((n, days))))
    low = body_bottom * numpy.exp(-_RANGE * _SIGMA * numpy.abs(rng.standard_normal((n, days))))
    # Moving average of the last `days` closes at each window day.
    csum = numpy.cumsum(numpy.pad(close, ((0, 0), (1, 0))), axis=1)
    ma = (csum[:, days:days + days] - csum[:, :days]) / days
    volume = numpy.exp(0.5 * rng.standard_normal((n, days))) * (
        1.0 + numpy.abs(returns[:, window]) / _SIGMA)
    future_return = log_close[:, -1] - log_close[:, history + days - 1]

    images = draw_charts(open_, high, low, close[:, window], ma, volume, spec.height)
    return Charts(images=images, labels=(future_return > 0).astype(numpy.int64),
                  open=open_, high=high, low=low, close=close[:, window].copy(),
                  ma=ma, volume=volume, future_return=future_return)


def draw_charts(open_, high, low, close, ma, volume, height):
    """Draw OHLC bars, a moving-average line and volume bars as images.

    Parameters
    ----------
    open_, high, low, close, ma, volume : ndarray
        ``(N, days)`` positive values; ``low <= open, close <= high``.
    height : int
        Image height; the price area has ``height - height // 5 - 1`` rows.

    Returns
    -------
    ndarray
        ``(N, height, 3 * days)`` uint8 images, 0 (black) or 255 (white),
        laid out as the module docstring describes.

    Raises
    ------
    ValueError
        If the inputs' shapes differ or ``height`` leaves fewer than 2 price
        rows.

    Examples
    --------
    Two days (columns 0-2 and 3-5) in 12 rows: 12 // 5 = 2 volume rows at
    the bottom, a blank row above them and 9 price rows, where the highest
    high (12) is row 0 and the lowest low (9) row 8:

    >>> import numpy as np
    >>> one = np.array([[10.0, 11.0]])
    >>> img = draw_charts(one, one + 1, one - 1, one, one, one, height=12)
    >>> (img // 255)[0]
    array([[0, 0, 0, 0, 1, 0],
           [0, 0, 0, 0, 1, 0],
           [0, 0, 0, 0, 1, 0],
           [0, 1, 0, 1, 1, 1],
           [0, 1, 1, 1, 1, 0],
           [1, 1, 1, 0, 1, 0],
           [0, 1, 0, 0, 0, 0],
           [0, 1, 0, 0, 0, 0],
           [0, 1, 0, 0, 0, 0],
           [0, 0, 0, 0, 0, 0],
           [0, 1, 0, 0, 1, 0],
           [0, 1, 0, 0, 1, 0]], dtype=uint8)
    """
    arrays = [numpy.asarray(a, dtype=numpy.float64)
              for a in (open_, high, low, close, ma, volume)]
    shape = arrays[0].shape
    if len(shape) != 2 or any(a.shape != shape for a in arrays):
        raise ValueError("open_, high, low, close, ma and volume must share one "
                         f"(N, days) shape, got {[a.shape for a in arrays]}")
    open_, high, low, close, ma, volume = arrays
    volume_rows = height // 5
    price_rows = height - volume_rows - 1
    if price_rows < 2:
        raise ValueError(f"height must be at least 4, got {height}")
    n, days = shape
    top = numpy.maximum(high.max(axis=1), ma.max(axis=1))[:, None]
    bottom = numpy.minimum(low.min(axis=1), ma.min(axis=1))[:, None]
    scale = (price_rows - 1) / (top - bottom)

    def rows(price):
        return numpy.rint((top - price) * scale).astype(numpy.intp)

    image = numpy.zeros((n, height, 3 * days), dtype=bool)
    sample = numpy.arange(n)[:, None]
    day_column = 3 * numpy.arange(days)
    image[sample, rows(open_), day_column] = True
    image[sample, rows(close), day_column + 2] = True

    row = numpy.arange(price_rows)[None, :, None]
    image[:, :price_rows, 1::3] |= ((row >= rows(high)[:, None, :])
                                    & (row <= rows(low)[:, None, :]))

    # Moving-average line: interpolate the unrounded rows between day centres.
    y = (top - ma) * scale
    step = numpy.arange(3) / 3.0
    y_line = (y[:, :-1, None] + (y[:, 1:, None] - y[:, :-1, None]) * step).reshape(n, -1)
    y_line = numpy.concatenate([y_line, y[:, -1:]], axis=1)
    line_columns = 1 + numpy.arange(y_line.shape[1])
    image[sample, numpy.rint(y_line).astype(numpy.intp), line_columns] = True

    bar = numpy.rint(volume / volume.max(axis=1, keepdims=True) * volume_rows)
    depth = numpy.arange(volume_rows)[None, ::-1, None]   # 0 at the bottom row
    image[:, height - volume_rows:, 1::3] |= depth < bar[:, None, :]
    return image.astype(numpy.uint8) * numpy.uint8(255)


def _spec(spec):
    if isinstance(spec, ChartSpec):
        return spec
    try:
        return CHART_SPECS[spec]
    except (KeyError, TypeError):
        raise ValueError(
            f"spec must be one of {sorted(CHART_SPECS)} or a ChartSpec, got {spec!r}"
        ) from None
