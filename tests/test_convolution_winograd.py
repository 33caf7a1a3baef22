"""The NumPy path's Winograd F(2, 3) (cupyconv/convolution/_winograd.py),
forced onto small convolutions of every argument form and checked against
the float64 loop reference (reference.py) within a rounding-error bound
derived below; which layers take it; reproducible results.

The bound.  With ``u`` the unit roundoff of float32 (2**-24), a dot product
of ``K`` float32 terms computed in float32 is off by at most ``K*u*S/(1 -
K*u)``, ``S`` the sum of the terms' magnitudes; each rounded operand adds
one ``u`` to ``K``.  Every Winograd operand is a sum of at most two inputs
(``V_k``, ``gM_k``: at most ``2A`` for inputs of magnitude ``A``) or three
kernel taps halved (``U_k``: at most ``1.5B``), so with ``A`` and ``B`` the
largest magnitudes of a direction's two operands:

* forward: each output sums three ``M_k`` of ``K = kh*C_in/groups`` terms
  each, ``S <= 2A*(B + 1.5B + 1.5B)*K = 8*K*A*B``, with ``K + 5``
  roundings (two for the operands, two for the sum of the ``M_k``, one
  slack);
* input gradient: each input element sums, over the ``kh`` taps and the
  (at most two) pairs whose columns hold it, three ``gV_k`` of ``K =
  C_out/groups`` terms: ``S <= kh*2*3*2G*1.5B*K = 18*kh*K*G*B``, with
  ``K + 2*kh + 8`` roundings;
* weight gradient: each ``gU_k`` sums ``P = N*OH*ceil(OW/2)`` pairs, each
  kernel tap two ``gU_k`` halved: ``S <= 8*P*A*G``, with ``P + 6``
  roundings.

float16 and bfloat16 results are then rounded once more, by at most half
an ulp of the result (``2**-11`` or ``2**-8`` relative).  A wrong term or
column is off by about ``A*B``, far above these bounds for the small
cases here (measured errors are about a hundred times smaller still:
docs/kernels.rst).
"""

import time

import numpy as np
import pytest

import cupyconv as cc
import reference
from cupyconv import _parallel
from cupyconv import convolution
from cupyconv.convolution import _cpu as conv_cpu, _winograd
from reference import ConvCase

U32 = 2.0**-24
DIRECTIONS = ("forward", "input_grad", "weight_grad")


def record_winograd_calls(monkeypatch):
    """The list to which each call of the Winograd path will add its
    direction."""
    taken = []
    for direction in DIRECTIONS:
        function = getattr(_winograd, direction)

        def spy(*args, _direction=direction, _function=function):
            taken.append(_direction)
            return _function(*args)
        monkeypatch.setattr(_winograd, direction, spy)
    return taken


@pytest.fixture
def forced(monkeypatch):
    """Every eligible convolution takes the Winograd path, however few its
    channels or output columns; returns the directions that did, one entry
    per call."""
    for threshold in ("_MIN_IN_CHANNELS", "_MIN_OUT_CHANNELS", "_MIN_OUTPUT_COLUMNS"):
        monkeypatch.setattr(_winograd, threshold, 1)
    return record_winograd_calls(monkeypatch)


def bounds(case, x, w, grad_out):
    """The rounding-error bounds of the module docstring, per direction,
    for float32 arithmetic."""
    a, b, g = (float(np.abs(np.asarray(v, np.float64)).max()) for v in (x, w, grad_out))
    (kh, _), groups = case.kernel, case.groups
    oh, ow = case.out_hw

    def gamma(n):
        return n * U32 / (1 - n * U32)

    k = kh * case.c_in // groups
    pairs = case.n * oh * (ow + 1) // 2
    k_out = case.c_out // groups
    return {"forward": gamma(k + 5) * 8 * k * a * b,
            "input_grad": gamma(k_out + 2 * kh + 8) * 18 * kh * k_out * g * b,
            "weight_grad": gamma(pairs + 6) * 8 * pairs * a * g}


def results(case, x, w, bias, grad_out):
    kwargs = case.kwargs()
    return {"forward": cc.conv2d(x, w, bias, **kwargs),
            "input_grad": cc.conv2d_input(x.shape, w, grad_out, **kwargs),
            "weight_grad": cc.conv2d_weight(x, w.shape, grad_out, **kwargs)}


def check_against_reference(case, x, w, bias, grad_out, got):
    exact = dict(zip(DIRECTIONS, case.expected(*(np.asarray(a, np.float64) if a is not None
                                                 else None for a in (x, w, bias, grad_out)))))
    bound = bounds(case, x, w, grad_out)
    if bias is not None:  # one more rounding, of a sum of at most the bias and the bound
        bound["forward"] += U32 * (float(np.abs(bias.astype(np.float64)).max())
                                   + np.abs(exact["forward"]).max())
    last_rounding = {np.dtype(np.float32): 0.0, np.dtype(np.float16): 2.0**-11}.get(
        np.dtype(case.dtype), 2.0**-8)
    for direction in DIRECTIONS:
        result = got[direction]
        assert result.dtype == case.dtype and result.flags.c_contiguous
        error = np.abs(result.astype(np.float64) - exact[direction])
        allowed = bound[direction] * (1 + last_rounding) + last_rounding * np.abs(exact[direction])
        assert np.all(error <= allowed), (direction, error.max(), bound[direction])


#: Kernels 3 wide, stride and dilation 1 along W, of every other form.
CASES = [
    ConvCase(2, 9, 7, 4, 6, (5, 3), padding=(2, 1)),                 # seed-like, odd OW
    ConvCase(2, 6, 8, 4, 5, (3, 3), padding=1),                      # even OW
    ConvCase(2, 5, 3, 3, 4, (2, 3)),                                 # OW = 1
    ConvCase(2, 5, 4, 3, 4, (2, 3)),                                 # OW = 2
    ConvCase(2, 11, 9, 6, 4, (3, 3), stride=(2, 1), dilation=(2, 1),
             padding=((2, 0), (0, 3)), groups=2),                    # H stride and dilation
    ConvCase(1, 7, 6, 6, 6, (4, 3), padding="same", groups=6),       # depthwise, 'same'
    ConvCase(3, 4, 5, 4, 8, (1, 3), stride=(3, 1), padding=((0, 1), (2, 0)), groups=2),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_matches_reference(case, layout, dtype, forced):
    case = case.replace(layout=layout, dtype=dtype)
    arrays = case.arrays()
    check_against_reference(case, *arrays, results(case, *arrays))
    assert forced == list(DIRECTIONS)


def test_bfloat16(forced):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    case = CASES[4].replace(dtype=ml_dtypes.bfloat16)
    arrays = case.arrays()
    check_against_reference(case, *arrays, results(case, *arrays))
    assert forced == list(DIRECTIONS)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_views(layout, forced):
    """Non-contiguous and byte-swapped operands give what contiguous ones do."""
    case = CASES[4].replace(layout=layout, dtype=np.float32)
    arrays = case.arrays()
    expected = results(case, *arrays)

    def strided(a):
        spread = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        spread[..., ::2] = a
        return np.asfortranarray(spread)[..., ::2]

    for view in (strided, lambda a: a.astype(a.dtype.newbyteorder("S"))):
        got = results(case, *(view(a) for a in arrays))
        for direction in DIRECTIONS:
            np.testing.assert_array_equal(got[direction], expected[direction])


def test_bands_threads_and_runs(monkeypatch, forced):
    """Bands of rows of one image (whose input rows overlap), blocks shared
    among threads that finish them in a varying order: the same results,
    bit for bit, on every run, within the bound."""
    monkeypatch.setattr(conv_cpu, "_BLOCK_ELEMENTS", 200)
    monkeypatch.setattr(conv_cpu, "_MIN_SHARED_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(_parallel, "CPUS", 3)
    monkeypatch.setattr(_parallel, "blas_threads_limited", lambda: True)
    gather, delays = _winograd._transformed_columns, np.random.default_rng(6)

    def uneven_gather(*args):
        time.sleep(delays.uniform(0, 1e-3))
        return gather(*args)
    monkeypatch.setattr(_winograd, "_transformed_columns", uneven_gather)
    case = ConvCase(4, 9, 7, 4, 6, (5, 3), stride=(2, 1), padding=(2, 1), dtype=np.float32)
    assert len(conv_cpu._blocks(_winograd._pair_geometry(case.geom))) > 2 * case.n
    arrays = case.arrays()
    first = results(case, *arrays)
    check_against_reference(case, *arrays, first)
    for _ in range(3):
        again = results(case, *arrays)
        for direction in DIRECTIONS:
            np.testing.assert_array_equal(again[direction], first[direction])


#: The seed's and the 20-day model's convolutions that take the path
#: (N=1 here), and their first layers, which do not (one input channel).
SEED_LAYERS = {
    "seed L2": (ConvCase(1, 16, 15, 64, 128, (5, 3), padding=(2, 1)), True),
    "20-day L2": (ConvCase(1, 13, 60, 64, 128, (5, 3), padding=(2, 1)), True),
    "20-day L3": (ConvCase(1, 6, 60, 128, 256, (5, 3), padding=(2, 1)), True),
    "seed L1": (ConvCase(1, 32, 15, 1, 64, (5, 3), padding=(2, 1)), False),
    "20-day L1": (ConvCase(1, 64, 60, 1, 64, (5, 3), stride=(3, 1), dilation=(2, 1),
                           padding=(12, 1)), False),
}


@pytest.mark.parametrize("layer", sorted(SEED_LAYERS))
def test_seed_layers_take_the_path(layer):
    """The path is on, with the shipped thresholds, for the layers it was
    measured on (docs/kernels.rst), in float32 and float16, never float64."""
    case, expected = SEED_LAYERS[layer]
    for dtype in (np.float32, np.float16):
        assert convolution._cpu_path(case.geom, np.dtype(dtype)) is (
            _winograd if expected else conv_cpu), dtype
    assert convolution._cpu_path(case.geom, np.dtype(np.float64)) is conv_cpu


def test_seed_layer_calls_take_the_path(monkeypatch):
    taken = record_winograd_calls(monkeypatch)
    case = SEED_LAYERS["seed L2"][0].replace(dtype=np.float32)
    arrays = case.arrays()
    check_against_reference(case, *arrays, results(case, *arrays))
    assert taken == list(DIRECTIONS)
