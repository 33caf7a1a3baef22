"""Draw the documentation's figures; what they show is computed by cupyconv.

``conf.py`` calls :func:`draw_all` at the start of every Sphinx build, and
``python docs/figures.py OUTDIR`` draws them by hand.  Nothing is placed by
hand: the dilated array comes from :func:`cupyconv.dilate`, a convolution's
receptive field is the set of input cells that :func:`cupyconv.conv2d_input`
sends a one-hot output gradient to, and the pooling picture is
:func:`cupyconv.max_pool2d`'s own values and indices.  A figure therefore
cannot disagree with the library it documents.
"""

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # draw to files; no display is needed or wanted

import numpy  # noqa: E402
from matplotlib import pyplot  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import cupyconv as cc  # noqa: E402

#: One pale colour per highlighted item (element, output pixel, window).
COLOURS = ("#9ecae1", "#fdae6b", "#a1d99b", "#bcbddc", "#fdd0a2", "#c7e9c0")
#: A lighter shade of each of the first COLOURS.
LIGHT = ("#deebf7", "#feedde", "#e5f5e0")
EMPTY = "white"
UNUSED = "#d9d9d9"
GRID = "#969696"


def _grid(ax, fill, text=None, title="", fontsize=9):
    """Draw a 2-D grid of cells, row ``h`` downwards and column ``w`` across.

    ``fill`` is an array of colour strings of the grid's shape; ``text``
    (same shape, optional) is written in the cells.
    """
    rows, cols = fill.shape
    for h in range(rows):
        for w in range(cols):
            ax.add_patch(Rectangle((w, h), 1, 1, facecolor=fill[h, w],
                                   edgecolor=GRID, linewidth=0.8))
            if text is not None and text[h, w]:
                ax.text(w + 0.5, h + 0.5, text[h, w], ha="center",
                        va="center", fontsize=fontsize)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_aspect("equal")
    ax.set_xticks(numpy.arange(cols) + 0.5, labels=[str(w) for w in range(cols)])
    ax.set_yticks(numpy.arange(rows) + 0.5, labels=[str(h) for h in range(rows)])
    ax.tick_params(length=0, labelsize=7)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("w", fontsize=8)
    ax.set_ylabel("h", fontsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=10, pad=8)


def _figure(width_ratios, height, width=9.0):
    """A figure with one row of axes, widths in ``width_ratios``."""
    return pyplot.subplots(1, len(width_ratios), figsize=(width, height),
                           gridspec_kw={"width_ratios": width_ratios})


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot.close(fig)


def dilated_array(path):
    """``dilate`` of a 2x3 array on both axes with dilation ``(1, 2)``."""
    a = numpy.arange(1, 7).reshape(2, 3)
    out = cc.dilate(a, axes=(0, 1), dilation=(1, 2))
    # Colour each input element and the output cell it lands on alike.
    colour_of = {value: COLOURS[i % len(COLOURS)] for i, value in enumerate(a.flat)}
    colour = numpy.vectorize(lambda v: colour_of.get(v, EMPTY), otypes=[object])
    fig, (left, right) = _figure((a.shape[1], out.shape[1]), 2.6)
    _grid(left, colour(a), a.astype(str), f"a, shape {a.shape}")
    _grid(right, colour(out), out.astype(str),
          f"dilate(a, axes=(0, 1), dilation=(1, 2)), shape {out.shape}")
    _save(fig, path)


def receptive_field(path):
    """Input cells read by three output pixels of a 5x3 convolution with
    stride ``(3, 1)`` and dilation ``(2, 1)`` (no padding), NHWC layout."""
    kernel, stride, dilation = (5, 3), (3, 1), (2, 1)
    x_shape = (1, 17, 6, 1)
    w = numpy.ones(kernel + (1, 1))  # HWIO; every tap passes its input on
    out_shape = cc.conv2d(numpy.zeros(x_shape), w, stride=stride,
                          dilation=dilation).shape

    def reads(grad_out):
        """Input cells that an output gradient reaches: (H, W) of bools."""
        grad_x = cc.conv2d_input(x_shape, w, grad_out, stride=stride,
                                 dilation=dilation)
        return grad_x[0, :, :, 0] != 0

    fill = numpy.full(x_shape[1:3], EMPTY, dtype=object)
    text = numpy.full(x_shape[1:3], "", dtype=object)
    # Cells that no output reads: between the taps, or past the last window.
    fill[~reads(numpy.ones(out_shape))] = UNUSED
    out_fill = numpy.full(out_shape[1:3], EMPTY, dtype=object)
    out_text = numpy.full(out_shape[1:3], "", dtype=object)
    for colour, (i, j) in zip(COLOURS, ((0, 0), (1, 1), (2, 3))):
        one_hot = numpy.zeros(out_shape)
        one_hot[0, i, j, 0] = 1.0
        taps = reads(one_hot)
        fill[taps] = colour
        # Label each input cell with the kernel tap (ki, kj) that reads it.
        rows, cols = numpy.nonzero(taps)
        for h, col in zip(rows, cols):
            text[h, col] = f"{(h - rows.min()) // dilation[0]},{col - cols.min()}"
        out_fill[i, j] = colour
        out_text[i, j] = f"({i},{j})"

    fig, (left, right) = _figure((x_shape[2], out_shape[2]), 6.0, width=6.5)
    _grid(left, fill, text, f"input x, H x W = {x_shape[1]} x {x_shape[2]}",
          fontsize=7)
    _grid(right, out_fill, out_text, f"output, {out_shape[1]} x {out_shape[2]}",
          fontsize=8)
    fig.suptitle(f"conv2d, kernel {kernel}, stride {stride}, dilation {dilation}",
                 fontsize=11, y=1.04)
    _save(fig, path)


def pooling_2x1(path):
    """2x1 max-pooling of a 5x4 image with a tie and a NaN, NHWC layout."""
    x = numpy.array([
        [3.0, 4.0, 1.0, 1.0],
        [5.0, 4.0, 2.0, 6.0],
        [5.0, 3.0, numpy.nan, 7.0],
        [9.0, 2.0, 6.0, 5.0],
        [3.0, 5.0, 8.0, 9.0],
    ])
    height, width = x.shape
    out, indices = cc.max_pool2d(x[None, :, :, None], (2, 1), return_indices=True)
    out, indices = out[0, :, :, 0], indices[0, :, :, 0]

    # Window i's cells in a light shade of its colour, its picks in full.
    fill = numpy.full(x.shape, UNUSED, dtype=object)  # rows no window covers
    out_fill = numpy.empty(out.shape, dtype=object)
    for i in range(out.shape[0]):
        fill[2 * i:2 * i + 2] = LIGHT[i % len(LIGHT)]
        out_fill[i] = COLOURS[i % len(COLOURS)]
        for j in range(width):
            fill[divmod(int(indices[i, j]), width)] = COLOURS[i % len(COLOURS)]
    text = numpy.vectorize(_number)(x)
    out_text = numpy.empty(out.shape, dtype=object)
    for (i, j), v in numpy.ndenumerate(out):
        out_text[i, j] = f"{_number(v)}\n[{indices[i, j]}]"

    fig, (left, right) = _figure((1, 1), 3.4, width=7.0)
    _grid(left, fill, text, f"x, {height} x {width}")
    for i in range(out.shape[0]):
        left.add_patch(Rectangle((0, 2 * i), width, 2, fill=False,
                                 edgecolor="black", linewidth=1.6))
    _grid(right, out_fill, out_text, "max_pool2d(x, (2, 1))", fontsize=8)
    right.set_ylim(height, 0)  # same cell size as the input
    right.set_ylabel("")
    _save(fig, path)


def _number(v):
    return "NaN" if numpy.isnan(v) else f"{v:g}"


def demo_charts(path):
    """Four synthetic 5-day charts and two 20-day ones, with their labels."""
    from cupyconv.demo.charts import make_charts

    short, long = make_charts(4, "5day", seed=0), make_charts(2, "20day", seed=0)
    fig, axes = pyplot.subplots(
        1, 6, figsize=(9.0, 2.6),
        gridspec_kw={"width_ratios": [15 / 32] * 4 + [60 / 64] * 2},
    )
    panels = [("5 days", image, label) for image, label in zip(short.images, short.labels)]
    panels += [("20 days", image, label) for image, label in zip(long.images, long.labels)]
    for ax, (name, image, label) in zip(axes, panels):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{name}, next: {'up' if label else 'down'}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path)


FIGURES = {
    "dilated_array.png": dilated_array,
    "receptive_field.png": receptive_field,
    "pooling_2x1.png": pooling_2x1,
    "demo_charts.png": demo_charts,
}


def draw_all(outdir):
    """Draw every figure into ``outdir`` (created if needed)."""
    outdir = pathlib.Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for name, draw in FIGURES.items():
        draw(outdir / name)


if __name__ == "__main__":
    draw_all(sys.argv[1] if len(sys.argv) > 1 else "_generated")
