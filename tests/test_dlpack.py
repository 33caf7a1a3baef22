"""Arrays of other libraries through DLPack: PyTorch and JAX in, same kind out.

The results are compared with the same call on NumPy arrays (the interop layer
must not change a bit) and, for conv2d and max_pool2d, with PyTorch's own ops.
"""

import subprocess
import sys

import numpy as np
import pytest

import cupyconv as cc
from cupyconv import _interop

rng = np.random.default_rng(19)
X = rng.standard_normal((2, 3, 9, 8))          # NCHW
W = rng.standard_normal((4, 3, 3, 2))          # OIHW
B = rng.standard_normal(4)
GEOM = dict(stride=(2, 1), padding=((1, 0), (1, 1)), dilation=(1, 2), layout="NCHW")
POOL = dict(kernel_size=3, stride=2, padding=1, layout="NCHW")


def _every_op(to):
    """(name, call on ``to``-converted arrays, the same call on NumPy)."""
    y = cc.conv2d(X, W, B, **GEOM)
    g = rng.standard_normal(y.shape)
    pooled, indices = cc.max_pool2d(X, **POOL, return_indices=True)
    gp = rng.standard_normal(pooled.shape)
    calls = {
        "conv2d": lambda f: cc.conv2d(f(X), f(W), f(B), **GEOM),
        "conv2d_input": lambda f: cc.conv2d_input(X.shape, f(W), f(g), **GEOM),
        "conv2d_weight": lambda f: cc.conv2d_weight(f(X), W.shape, f(g), **GEOM),
        "max_pool2d": lambda f: cc.max_pool2d(f(X), **POOL, return_indices=True),
        "max_pool2d_backward": lambda f: cc.max_pool2d_backward(
            f(gp), f(X), **POOL, indices=f(indices)),
        "max_pool2d_backward_from_x": lambda f: cc.max_pool2d_backward(
            f(gp), f(X), **POOL),
        "dilate": lambda f: cc.dilate(f(X), axes=(2, 3), dilation=(1, 2)),
        "dilate_shape": lambda f: cc.dilate(f(X), axes=2, dilation=1, shape=(2, 3, 20, 8)),
        "undilate": lambda f: cc.undilate(f(X), axes=(2, 3), dilation=(2, 1)),
    }
    return [(name, call(to), call(lambda a: a)) for name, call in calls.items()]


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


def test_import_is_cheap():
    code = ("import sys, cupyconv; "
            "print(sorted(m for m in ('torch', 'jax', 'dask', 'distributed', 'cupy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_torch_round_trip_every_op():
    torch = pytest.importorskip("torch")
    for name, got, expected in _every_op(torch.from_numpy):
        for g, e in zip(_as_tuple(got), _as_tuple(expected), strict=True):
            assert isinstance(g, torch.Tensor), name
            assert g.dtype == torch.from_numpy(e).dtype, name
            np.testing.assert_array_equal(g.numpy(), e, err_msg=name)


def test_torch_results_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b = (torch.from_numpy(a) for a in (X, W, B))
    y = cc.conv2d(x, w, b, stride=2, padding=1, layout="NCHW")
    torch.testing.assert_close(y, F.conv2d(x, w, b, stride=2, padding=1))
    out, idx = cc.max_pool2d(x, 3, stride=2, padding=1, layout="NCHW",
                             return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    assert idx.dtype == torch.int64


def test_torch_non_contiguous_and_zero_copy():
    torch = pytest.importorskip("torch")
    base = torch.from_numpy(np.ascontiguousarray(X.transpose(0, 1, 3, 2)))
    x = base.transpose(2, 3)  # X's values, not contiguous
    assert not x.is_contiguous()
    taken = _interop._take("conv2d", "x", x)
    assert np.shares_memory(taken, base.numpy())  # no copy on the way in
    y = cc.conv2d(x, torch.from_numpy(W), layout="NCHW")
    np.testing.assert_array_equal(y.numpy(), cc.conv2d(X, W, layout="NCHW"))
    assert torch.equal(base, torch.from_numpy(np.ascontiguousarray(X.transpose(0, 1, 3, 2))))


def test_torch_next_to_numpy_and_lists():
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(X)
    y = cc.conv2d(x, W, B.tolist(), layout="NCHW")  # NumPy weights, list bias
    assert isinstance(y, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), cc.conv2d(X, W, B, layout="NCHW"))
    # The first DLPack argument in parameter order decides the result's kind.
    g = cc.conv2d_input(X.shape, W, torch.from_numpy(np.ones((2, 4, 7, 7))),
                        layout="NCHW")
    assert isinstance(g, torch.Tensor)


def test_requires_grad_points_to_cupyconv_torch():
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(X).requires_grad_()
    with pytest.raises(TypeError, match=r"x requires grad.*cupyconv\.torch"):
        cc.conv2d(x, torch.from_numpy(W), layout="NCHW")
    with pytest.raises(TypeError, match=r"a requires grad"):
        cc.dilate(x, axes=2, dilation=1)
    with torch.no_grad():  # nothing recorded: the tensor is detached
        y = cc.conv2d(x, torch.from_numpy(W), layout="NCHW")
    np.testing.assert_array_equal(y.numpy(), cc.conv2d(X, W, layout="NCHW"))


def test_unsupported_dtype_names_argument():
    torch = pytest.importorskip("torch")
    x = torch.ones(1, 1, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"max_pool2d: x .*DLPack"):
        cc.max_pool2d(x, 2, layout="NCHW")


class _FakeProducer:
    """A DLPack producer on a device of our choosing, for device checks."""

    def __init__(self, a, device):
        self.a, self.device = a, device

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.device


def test_mixed_devices_name_the_arguments():
    cuda_w = _FakeProducer(W, (2, 0))
    with pytest.raises(ValueError, match=r"conv2d: .*x is numpy.ndarray on the "
                                         r"CPU, w is .*_FakeProducer on cuda:0"):
        cc.conv2d(X, cuda_w, layout="NCHW")
    with pytest.raises(ValueError, match=r"cuda:0.*cuda:1"):
        cc.conv2d(_FakeProducer(X, (2, 0)), _FakeProducer(W, (2, 1)), layout="NCHW")
    with pytest.raises(TypeError, match=r"DLPack device type 4"):
        cc.dilate(_FakeProducer(X, (4, 0)), axes=0, dilation=1)


def test_producer_namespace_gives_the_result_back():
    class Wrapped(_FakeProducer):
        def __array_namespace__(self):
            return Namespace

    class Namespace:
        @staticmethod
        def from_dlpack(a):
            return ("wrapped", np.from_dlpack(a))

    kind, y = cc.undilate(Wrapped(X, (1, 0)), axes=2, dilation=1)
    assert kind == "wrapped"
    np.testing.assert_array_equal(y, X[:, :, ::2])


@pytest.mark.run_last  # importing JAX starts threads: after the fork tests
def test_jax_round_trip_every_op():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with jax.enable_x64(True):
        for name, got, expected in _every_op(jnp.asarray):
            for g, e in zip(_as_tuple(got), _as_tuple(expected), strict=True):
                assert isinstance(g, jax.Array), name
                assert g.dtype == e.dtype, name
                np.testing.assert_array_equal(np.asarray(g), e, err_msg=name)


@pytest.mark.run_last  # importing JAX starts threads: after the fork tests
def test_jax_read_only_float32():
    jax = pytest.importorskip("jax")
    x = jax.numpy.asarray(X.astype(np.float32))
    assert not np.from_dlpack(x).flags.writeable  # JAX's buffers are read-only
    out, idx = cc.max_pool2d(x, (2, 1), layout="NCHW", return_indices=True)
    ref, ref_idx = cc.max_pool2d(X.astype(np.float32), (2, 1), layout="NCHW",
                                 return_indices=True)
    assert isinstance(out, jax.Array) and out.dtype == np.float32
    assert jax.numpy.issubdtype(idx.dtype, jax.numpy.integer)
    np.testing.assert_array_equal(np.asarray(out), ref)
    np.testing.assert_array_equal(np.asarray(idx), ref_idx)
    # 32-bit indices (JAX's default mode) are widened on the way back in.
    g = jax.numpy.ones(out.shape, dtype=np.float32)
    grad = cc.max_pool2d_backward(g, x, (2, 1), layout="NCHW", indices=idx)
    np.testing.assert_array_equal(np.asarray(grad), cc.max_pool2d_backward(
        np.ones(ref.shape, np.float32), X.astype(np.float32), (2, 1), layout="NCHW"))


@pytest.mark.gpu
def test_torch_cuda_round_trip(gpu):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    x = torch.from_numpy(X).cuda()
    w = torch.from_numpy(W).cuda()
    y = cc.conv2d(x, w, layout="NCHW")
    assert isinstance(y, torch.Tensor) and y.is_cuda
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w))
    out, idx = cc.max_pool2d(x, 2, layout="NCHW", return_indices=True)
    ref, ref_idx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    with pytest.raises(ValueError, match="different devices"):
        cc.conv2d(x, W, layout="NCHW")


def test_cuda_producers_go_to_cupy_from_dlpack(monkeypatch):
    """Without a GPU: a stand-in ``cupy`` module records what is handed to
    ``cupy.from_dlpack`` (which passes CuPy's current stream to the producer)."""
    import types

    received = []
    fake_cupy = types.SimpleNamespace(
        ndarray=type("ndarray", (), {}),
        from_dlpack=lambda a: received.append(a) or "taken")
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    producer = _FakeProducer(W, (2, 0))
    assert _interop._take("conv2d", "w", producer) == "taken"
    assert received == [producer]
    monkeypatch.setitem(sys.modules, "cupy", None)  # CuPy not installed
    with pytest.raises(TypeError, match=r"w is a CUDA array, which needs CuPy"):
        _interop._take("conv2d", "w", producer)
