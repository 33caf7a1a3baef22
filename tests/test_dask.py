"""Dask arrays in every op: lazy results equal to the eager call on the whole
array, for any chunking (hypothesis draws them), on threads and on a
multi-process LocalCluster that loses a worker mid-computation."""

import os
import signal
import threading
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import cupyconv as cc  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@st.composite
def chunkings(draw, shape):
    """Chunk sizes along every axis, 1 up to the whole axis, uneven allowed."""
    chunks = []
    for size in shape:
        sizes, left = [], size
        while left:
            sizes.append(draw(st.integers(1, left)))
            left -= sizes[-1]
        chunks.append(tuple(sizes))
    return tuple(chunks)


@st.composite
def conv_cases(draw):
    layout = draw(st.sampled_from(["NHWC", "NCHW"]))
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = 2 * groups, 2 * groups
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.one_of(
        st.just("same"),
        st.tuples(st.tuples(st.integers(0, 4), st.integers(0, 4)),
                  st.tuples(st.integers(0, 4), st.integers(0, 4)))))
    h = draw(st.integers(dilation[0] * (kh - 1) + 1, 12))
    wd = draw(st.integers(dilation[1] * (kw - 1) + 1, 10))
    n = draw(st.integers(1, 3))
    x_shape = (n, h, wd, c_in) if layout == "NHWC" else (n, c_in, h, wd)
    w_shape = (kh, kw, c_in // groups, c_out) if layout == "NHWC" else (
        c_out, c_in // groups, kh, kw)
    geom = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                layout=layout)
    seed = draw(st.integers(0, 2**16))
    return x_shape, w_shape, geom, seed, draw(chunkings(x_shape))


@given(conv_cases(), st.data())
@SETTINGS
def test_conv2d_and_gradients_any_chunking(case, data):
    x_shape, w_shape, geom, seed, x_chunks = case
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    bias = rng.standard_normal(w_shape[-1] if geom["layout"] == "NHWC" else w_shape[0])
    y = cc.conv2d(x, w, bias, **geom)
    xd = da.from_array(x, chunks=x_chunks)
    yd = cc.conv2d(xd, w, bias, **geom)
    assert isinstance(yd, da.Array) and yd.shape == y.shape
    np.testing.assert_allclose(yd.compute(), y, rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(y.shape)
    gd = da.from_array(g, chunks=data.draw(chunkings(y.shape)))
    np.testing.assert_allclose(cc.conv2d_input(x.shape, w, gd, **geom).compute(),
                               cc.conv2d_input(x.shape, w, g, **geom),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cc.conv2d_weight(xd, w.shape, gd, **geom).compute(),
                               cc.conv2d_weight(x, w.shape, g, **geom),
                               rtol=1e-11, atol=1e-11)


@st.composite
def pool_cases(draw):
    layout = draw(st.sampled_from(["NHWC", "NCHW"]))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if draw(st.booleans()):
        kernel = (2, 1)  # the 2x1 path
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    ceil_mode = draw(st.booleans())
    h = draw(st.integers(dilation[0] * (kernel[0] - 1) + 1, 12))
    w = draw(st.integers(dilation[1] * (kernel[1] - 1) + 1, 10))
    shape = (draw(st.integers(1, 2)), h, w, 3) if layout == "NHWC" else (
        draw(st.integers(1, 2)), 3, h, w)
    dtype = draw(st.sampled_from(["float64", "float32", "int16"]))
    geom = dict(kernel_size=kernel, stride=stride, padding=padding,
                dilation=dilation, ceil_mode=ceil_mode, layout=layout)
    return shape, dtype, geom, draw(st.integers(0, 2**16)), draw(chunkings(shape))


@given(pool_cases(), st.data())
@SETTINGS
def test_max_pool2d_any_chunking(case, data):
    shape, dtype, geom, seed, chunks = case
    rng = np.random.default_rng(seed)
    # Few distinct values: ties, and -inf / the dtype's minimum, test the picks.
    x = rng.integers(-3, 3, shape).astype(dtype)
    x[x == -3] = -np.inf if dtype.startswith("float") else np.iinfo(dtype).min
    try:
        out, indices = cc.max_pool2d(x, **geom, return_indices=True)
    except ValueError:  # a window without input (dilation): also refused lazily
        with pytest.raises(ValueError):
            cc.max_pool2d(da.from_array(x, chunks=chunks), **geom)
        return
    xd = da.from_array(x, chunks=chunks)
    out_d, indices_d = cc.max_pool2d(xd, **geom, return_indices=True)
    np.testing.assert_array_equal(out_d.compute(), out)
    np.testing.assert_array_equal(indices_d.compute(), indices)
    if dtype == "int16":
        return
    g = rng.standard_normal(out.shape).astype(dtype)
    gd = da.from_array(g, chunks=data.draw(chunkings(out.shape)))
    np.testing.assert_array_equal(cc.max_pool2d_backward(gd, xd, **geom).compute(),
                                  cc.max_pool2d_backward(g, x, **geom))
    np.testing.assert_array_equal(
        cc.max_pool2d_backward(gd, xd, **geom, indices=indices_d).compute(),
        cc.max_pool2d_backward(g, x, **geom, indices=indices))


@given(st.lists(st.integers(1, 7), min_size=1, max_size=3), st.data())
@SETTINGS
def test_dilate_undilate_any_chunking(shape, data):
    a = np.arange(np.prod(shape)).reshape(shape) + 1
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1,
                              max_size=len(shape), unique=True))
    dilation = [data.draw(st.integers(0, 3)) for _ in axes]
    ad = da.from_array(a, chunks=data.draw(chunkings(a.shape)))
    dilated = cc.dilate(a, axes=axes, dilation=dilation)
    np.testing.assert_array_equal(cc.dilate(ad, axes=axes, dilation=dilation).compute(),
                                  dilated)
    longer = list(dilated.shape)
    for axis in axes:
        longer[axis] += data.draw(st.integers(-dilation[axes.index(axis)], 3))
    np.testing.assert_array_equal(
        cc.dilate(ad, axes=axes, dilation=dilation, shape=longer).compute(),
        cc.dilate(a, axes=axes, dilation=dilation, shape=longer))
    np.testing.assert_array_equal(cc.undilate(ad, axes=axes, dilation=dilation).compute(),
                                  cc.undilate(a, axes=axes, dilation=dilation))


def test_lazy_until_compute():
    calls = []

    def counted(block):
        calls.append(block.shape)
        return block

    x = da.ones((4, 16, 12, 3), chunks=(2, 5, 5, 3)).map_blocks(
        counted, meta=np.empty((0, 0, 0, 0)))  # no call to infer the meta
    w = np.ones((3, 3, 3, 2))
    y = cc.max_pool2d(cc.conv2d(x, w, padding=1), 2, return_indices=True)[0]
    g = cc.conv2d_weight(x, w.shape, cc.conv2d(x, w, padding=1), padding=1)
    z = cc.undilate(cc.dilate(y, axes=(1, 2), dilation=1), axes=(1, 2), dilation=1)
    assert calls == []
    assert isinstance(z._meta, np.ndarray) and isinstance(g._meta, np.ndarray)
    z.compute()
    assert len(calls) == x.npartitions


def test_weights_enter_the_graph_once():
    x = da.ones((8, 10, 10, 3), chunks=(1, 5, 5, 3))
    w = np.arange(54.0).reshape(3, 3, 3, 2)
    y = cc.conv2d(x, w, padding=1)
    graph = dict(y.__dask_graph__())
    holders = [k for k, v in graph.items()
               if isinstance(v, np.ndarray) and v.shape == w.shape] + [
               k for k, v in graph.items() if hasattr(v, "value")
               and isinstance(v.value, np.ndarray) and v.value.shape == w.shape]
    assert len(holders) == 1
    assert y.npartitions == 8 * 2 * 2
    np.testing.assert_array_equal(y.compute(), cc.conv2d(np.ones(x.shape), w, padding=1))
    # A Dask kernel in several chunks is rechunked to one.
    wd = da.from_array(w, chunks=(1, 2, 3, 1))
    np.testing.assert_array_equal(cc.conv2d(x, wd, padding=1).compute(), y.compute())


def test_weight_gradient_is_a_fixed_tree():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 12, 12, 2)).astype(np.float32)
    g = rng.standard_normal((6, 12, 12, 4)).astype(np.float32)
    xd = da.from_array(x, chunks=(1, 3, 4, 2))
    gd = da.from_array(g, chunks=(2, 5, 5, 4))
    dw = cc.conv2d_weight(xd, (3, 3, 2, 4), gd, padding=1)
    first = dw.compute(scheduler="threads")
    assert first.tobytes() == dw.compute(scheduler="sync").tobytes()
    assert first.tobytes() == cc.conv2d_weight(xd, (3, 3, 2, 4), gd, padding=1).compute(
        scheduler="threads").tobytes()
    np.testing.assert_allclose(first, cc.conv2d_weight(x, (3, 3, 2, 4), g, padding=1),
                               rtol=1e-4, atol=1e-4)


def test_arguments_checked_when_the_graph_is_built():
    x = da.ones((2, 8, 8, 3), chunks=4)
    with pytest.raises(ValueError, match="groups"):
        cc.conv2d(x, np.ones((3, 3, 3, 2)), groups=2)
    with pytest.raises(TypeError, match="dtype"):
        cc.conv2d(x, np.ones((3, 3, 3, 2), np.float32))
    with pytest.raises(ValueError, match="padding"):
        cc.max_pool2d(x, 2, padding=2)
    with pytest.raises(ValueError, match="grad_out"):
        cc.conv2d_input(x.shape, np.ones((3, 3, 3, 2)), da.ones((1, 6, 6, 2)))
    unknown = x[x[:, 0, 0, 0] > 0]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        cc.max_pool2d(unknown, 2)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="Dask"):
        cc.conv2d(x, torch.ones(3, 3, 3, 2, dtype=torch.float64))


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=40) as cluster:
        with distributed.Client(cluster) as client:
            yield client


def _chart_batch():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 32, 15, 1))
    w = rng.standard_normal((5, 3, 1, 4))
    return x, w


def test_local_cluster_processes(cluster_client):
    x, w = _chart_batch()
    xd = da.from_array(x, chunks=(2, 11, 15, 1))
    y = cc.max_pool2d(cc.conv2d(xd, w, padding=((2, 2), (1, 1))), (2, 1))
    expected = cc.max_pool2d(cc.conv2d(x, w, padding=((2, 2), (1, 1))), (2, 1))
    np.testing.assert_array_equal(cluster_client.compute(y).result(), expected)
    dw = cc.conv2d_weight(xd, w.shape, da.ones(expected.shape[:1] + (32, 15, 4),
                                               chunks=(2, 8, 15, 4)),
                          padding=((2, 2), (1, 1)))
    local = dw.compute(scheduler="sync")
    assert cluster_client.compute(dw).result().tobytes() == local.tobytes()


def test_killed_worker_costs_a_retry(cluster_client):
    x, w = _chart_batch()

    def slow(block):  # defined here: pickled by value for the workers
        time.sleep(0.15)
        return block

    xd = da.from_array(x, chunks=(1, 32, 15, 1)).map_blocks(slow)
    y = cc.max_pool2d(cc.conv2d(xd, w, padding=((2, 2), (1, 1))), (2, 1))
    expected = cc.max_pool2d(cc.conv2d(x, w, padding=((2, 2), (1, 1))), (2, 1))
    before = set(cluster_client.scheduler_info()["workers"])
    pids = cluster_client.run(os.getpid)
    future = cluster_client.compute(y)
    victim = next(iter(pids.values()))
    timer = threading.Timer(0.25, os.kill, (victim, signal.SIGKILL))
    timer.start()
    result = future.result(timeout=60)
    timer.join()
    np.testing.assert_array_equal(result, expected)
    cluster_client.wait_for_workers(2, timeout=30)
    assert set(cluster_client.scheduler_info()["workers"]) != before  # one died


@pytest.mark.gpu
def test_cupy_chunks_and_dask_cuda(gpu):
    x, w = _chart_batch()
    xd = da.from_array(gpu.asarray(x), chunks=(2, 11, 15, 1), asarray=False)
    y = cc.max_pool2d(cc.conv2d(xd, gpu.asarray(w), padding=1), (2, 1))
    assert isinstance(y._meta, gpu.ndarray)
    expected = cc.max_pool2d(cc.conv2d(x, w, padding=1), (2, 1))
    np.testing.assert_allclose(gpu.asnumpy(y.compute()), expected, rtol=1e-12)
    dask_cuda = pytest.importorskip("dask_cuda")
    distributed = pytest.importorskip("distributed")
    with dask_cuda.LocalCUDACluster(n_workers=1) as cluster, \
            distributed.Client(cluster) as client:
        np.testing.assert_allclose(gpu.asnumpy(client.compute(y).result()),
                                   expected, rtol=1e-12)


def test_demo_command_tiny():
    pytest.importorskip("distributed")
    import doctest

    from cupyconv.demo import dask_inference

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(dask_inference):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 2 and not result.failed


def test_demo_predict_matches_the_eager_model_and_carries_no_activations():
    """demo-dask's predict: the labels of the eager model, chunk by chunk,
    and a graph without the activations the last training step left in the
    layers (the model enters it once, by its weights)."""
    pytest.importorskip("distributed")
    cloudpickle = pytest.importorskip("cloudpickle")

    from cupyconv.demo.dask_inference import predict
    from cupyconv.demo.model import PriceTrendCNN, softmax_cross_entropy

    net = PriceTrendCNN("5day", dtype=np.float32)
    x = np.random.default_rng(0).random((64, 32, 15, 1), dtype=np.float32)
    _, grad = softmax_cross_entropy(net.forward(x, training=True), np.zeros(64, int))
    net.backward(grad)
    labels = predict(net, da.from_array(x, chunks=(16, 32, 15, 1)))
    weights = sum(value.nbytes for _, value, _ in net.parameters())
    assert len(cloudpickle.dumps(dict(labels.__dask_graph__()))) < 2 * weights + x.nbytes
    np.testing.assert_array_equal(labels.compute(), net.forward(x, training=False).argmax(1))
