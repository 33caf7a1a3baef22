"""The demo: chart generator structure, the CNN against PyTorch, training."""

import numpy
import pytest

import cupyconv
from cupyconv.demo import charts, model, train


# --- chart generator -------------------------------------------------------

def _reference_image(c, i, height):
    """Draw chart ``i`` of ``c`` pixel by pixel from the documented rules."""
    days = c.open.shape[1]
    volume_rows = height // 5
    price_rows = height - volume_rows - 1
    top = max(c.high[i].max(), c.ma[i].max())
    bottom = min(c.low[i].min(), c.ma[i].min())

    def unrounded_row(p):
        return (top - p) * ((price_rows - 1) / (top - bottom))

    image = numpy.zeros((height, 3 * days), numpy.uint8)
    for d in range(days):
        image[round(unrounded_row(c.open[i, d])), 3 * d] = 255
        image[round(unrounded_row(c.close[i, d])), 3 * d + 2] = 255
        for r in range(round(unrounded_row(c.high[i, d])),
                       round(unrounded_row(c.low[i, d])) + 1):
            image[r, 3 * d + 1] = 255
        bar = round(c.volume[i, d] / c.volume[i].max() * volume_rows)
        for r in range(bar):
            image[height - 1 - r, 3 * d + 1] = 255
        if d + 1 < days:
            y0, y1 = unrounded_row(c.ma[i, d]), unrounded_row(c.ma[i, d + 1])
            for k in range(3):
                image[round(y0 + (y1 - y0) * (k / 3.0)), 3 * d + 1 + k] = 255
    image[round(unrounded_row(c.ma[i, -1])), 3 * days - 2] = 255
    return image


@pytest.mark.parametrize("spec, shape", [("5day", (32, 15)), ("20day", (64, 60))])
def test_charts_match_documented_drawing(spec, shape):
    c = charts.make_charts(12, spec, seed=3)
    assert c.images.shape == (12,) + shape and c.images.dtype == numpy.uint8
    assert set(numpy.unique(c.images)) <= {0, 255}
    for i in range(12):
        numpy.testing.assert_array_equal(c.images[i], _reference_image(c, i, shape[0]))
    # The prices obey OHLC ordering and the label is the future return's sign.
    assert (c.low <= numpy.minimum(c.open, c.close)).all()
    assert (c.high >= numpy.maximum(c.open, c.close)).all()
    numpy.testing.assert_array_equal(c.labels, (c.future_return > 0).astype(int))
    # Every image spans its price area: something white in the top and
    # bottom price rows, and the blank separator row is black.
    price_rows = shape[0] - shape[0] // 5 - 1
    assert c.images[:, 0].any(axis=1).all()
    assert c.images[:, price_rows - 1].any(axis=1).all()
    assert not c.images[:, price_rows].any()


def test_charts_reproducible_per_seed():
    a = charts.make_charts(50, "5day", seed=7)
    b = charts.make_charts(50, "5day", seed=7)
    c = charts.make_charts(50, "5day", seed=8)
    numpy.testing.assert_array_equal(a.images, b.images)
    numpy.testing.assert_array_equal(a.labels, b.labels)
    assert not numpy.array_equal(a.images, c.images)


def test_charts_signal_controls_predictability():
    """With momentum the last close beats the first open mostly when the label
    is up; with signal 0 the labels are balanced noise."""
    strong = charts.make_charts(4000, "5day", seed=0, signal=0.5)
    trend_up = strong.close[:, -1] > strong.open[:, 0]
    assert (trend_up == strong.labels.astype(bool)).mean() > 0.7
    none = charts.make_charts(4000, "5day", seed=0, signal=0.0)
    assert abs((none.close[:, -1] > none.open[:, 0])[none.labels == 1].mean() - 0.5) < 0.05
    assert abs(none.labels.mean() - 0.5) < 0.05


@pytest.mark.parametrize("bad, error", [
    (dict(n=-1), ValueError), (dict(n=2.0), TypeError),
    (dict(spec="7day"), ValueError), (dict(signal=-1.0), ValueError)])
def test_charts_bad_arguments(bad, error):
    args = dict(n=2, spec="5day") | bad
    with pytest.raises(error, match=next(iter(bad))):
        charts.make_charts(args.pop("n"), args.pop("spec"), **args)


# --- the model against PyTorch --------------------------------------------

# The paper's architectures, written out independently of model.ARCHITECTURES:
# (C_in, C_out, stride, dilation, padding) of each Conv (5, 3); then the
# (H, W, C) features the Linear layer sees.
PAPER_BLOCKS = {
    "5day": ([(1, 64, (1, 1), (1, 1), (2, 1)), (64, 128, (1, 1), (1, 1), (2, 1))],
             (8, 15, 128)),
    "20day": ([(1, 64, (3, 1), (2, 1), (12, 1)), (64, 128, (1, 1), (1, 1), (2, 1)),
               (128, 256, (1, 1), (1, 1), (2, 1))],
              (3, 60, 256)),
}


def _torch_model(torch, net):
    """An NCHW torch.nn model holding ``net``'s weights (converted layouts)."""
    nn = torch.nn
    blocks = []
    convs, (h, w, c) = PAPER_BLOCKS[net.model]
    for c_in, c_out, stride, dilation, padding in convs:
        blocks += [
            nn.Conv2d(c_in, c_out, (5, 3), stride=stride, padding=padding,
                      dilation=dilation, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.01),
            nn.MaxPool2d((2, 1)),
        ]
    features = nn.Sequential(*blocks).double()
    fc = nn.Linear(h * w * c, 2).double()
    layers = dict(net.layers)
    with torch.no_grad():
        for k in range(len(blocks) // 4):
            conv, bn = features[4 * k], features[4 * k + 1]
            conv.weight.copy_(torch.from_numpy(
                layers[f"block{k + 1}.conv"].params["weight"].transpose(3, 2, 0, 1)))
            bn.weight.copy_(torch.from_numpy(layers[f"block{k + 1}.bn"].params["weight"]))
            bn.bias.copy_(torch.from_numpy(layers[f"block{k + 1}.bn"].params["bias"]))
        # Our Linear rows are in (h, w, c) order; torch flattens (c, h, w).
        fc.weight.copy_(torch.from_numpy(_hwc_rows_to_chw(layers["fc"].params["weight"].T,
                                                           h, w, c)))
        fc.bias.copy_(torch.from_numpy(layers["fc"].params["bias"]))
    return features, fc, (h, w, c)


def _hwc_rows_to_chw(a, h, w, c):
    """Reorder the last axis of ``a`` from (h, w, c) flattening to (c, h, w)."""
    return a.reshape(a.shape[:-1] + (h, w, c)).transpose(
        tuple(range(a.ndim - 1)) + (a.ndim + 1, a.ndim - 1, a.ndim)).reshape(a.shape)


def _torch_name_grads(features, fc, hwc, blocks):
    grads = {}
    for k in range(blocks):
        conv, bn = features[4 * k], features[4 * k + 1]
        grads[f"block{k + 1}.conv.weight"] = conv.weight.grad.numpy().transpose(2, 3, 1, 0)
        grads[f"block{k + 1}.bn.weight"] = bn.weight.grad.numpy()
        grads[f"block{k + 1}.bn.bias"] = bn.bias.grad.numpy()
    h, w, c = hwc
    # torch's (2, c*h*w) weight gradient back to our (h*w*c, 2).
    chw = fc.weight.grad.numpy().reshape(2, c, h, w).transpose(0, 2, 3, 1)
    grads["fc.weight"] = chw.reshape(2, -1).T
    grads["fc.bias"] = fc.bias.grad.numpy()
    return grads


@pytest.mark.parametrize("arch, batch", [("5day", 6), ("20day", 3)])
def test_model_matches_torch(arch, batch):
    torch = pytest.importorskip("torch")
    net = model.PriceTrendCNN(arch, dtype=numpy.float64, seed=1, dropout=0.5)
    spec = charts.CHART_SPECS[arch]
    rng = numpy.random.default_rng(2)
    # Real chart images plus noise, so no max-pool window holds a tie.
    images = charts.make_charts(batch, arch, seed=4).images[..., None] / 255.0
    images = images + 0.1 * rng.standard_normal(images.shape)
    labels = numpy.array([0, 1, 1, 0, 1, 0])[:batch]

    logits = net.forward(images, training=True)
    loss, grad_logits = model.softmax_cross_entropy(logits, labels)
    grad_images = net.backward(grad_logits)
    mask = dict(net.layers)["dropout"].mask
    assert mask is not None and 0 < (mask == 0).mean() < 1

    features, fc, hwc = _torch_model(torch, net)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2)).requires_grad_()
    flat = features(x).flatten(1)
    torch_mask = torch.from_numpy(_hwc_rows_to_chw(mask, *hwc))
    torch_logits = fc(flat * torch_mask)
    torch_loss = torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels))
    torch_loss.backward()

    def close(ours, theirs, what):
        numpy.testing.assert_allclose(ours, theirs, rtol=1e-6,
                                      atol=1e-6 * numpy.abs(theirs).max(), err_msg=what)

    assert logits.shape == (batch, 2) and spec.height == images.shape[1]
    close(logits, torch_logits.detach().numpy(), "logits")
    close(loss, torch_loss.item(), "loss")
    close(grad_images[..., 0], x.grad.numpy()[:, 0], "input gradient")
    theirs = _torch_name_grads(features, fc, hwc, len(PAPER_BLOCKS[arch][0]))
    ours = {name: grad for name, _, grad in net.parameters()}
    assert ours.keys() == theirs.keys()
    for name in ours:
        close(ours[name], theirs[name], name)
    # Running statistics follow PyTorch's update rule.
    for k in range(len(PAPER_BLOCKS[arch][0])):
        bn = dict(net.layers)[f"block{k + 1}.bn"]
        close(bn.running_mean, features[4 * k + 1].running_mean.numpy(), "running_mean")
        close(bn.running_var, features[4 * k + 1].running_var.numpy(), "running_var")


@pytest.mark.parametrize("arch, features", [("5day", 15360), ("20day", 46080)])
def test_layer_shapes_are_the_forward_pass(arch, features):
    net = model.PriceTrendCNN(arch, dtype=numpy.float64)
    spec = charts.CHART_SPECS[arch]
    x = numpy.zeros((2, spec.height, spec.width, 1))
    shapes = [("input", x.shape[1:])]
    for name, layer in net.layers:
        x = layer.forward(x, training=True)
        if name.endswith((".conv", ".pool")) or name == "flatten":
            shapes.append((name, x.shape[1:]))
    assert model.layer_shapes(arch) == shapes
    assert shapes[-1] == ("flatten", (features,))


def test_eval_mode_and_adam_match_torch():
    """After one Adam step both models hold the same weights, and evaluation
    mode (running statistics, no dropout) gives the same logits."""
    torch = pytest.importorskip("torch")
    net = model.PriceTrendCNN("5day", dtype=numpy.float64, seed=5, dropout=0.0)
    c = charts.make_charts(8, "5day", seed=6)
    images = c.images[..., None] / 255.0
    features, fc, hwc = _torch_model(torch, net)
    torch_params = list(features.parameters()) + list(fc.parameters())
    torch_opt = torch.optim.Adam(torch_params, lr=1e-2)
    ours_opt = model.Adam(net, lr=1e-2)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    for _ in range(2):
        _, grad = model.softmax_cross_entropy(net.forward(images, training=True), c.labels)
        net.backward(grad)
        ours_opt.step()
        torch_opt.zero_grad()
        torch.nn.functional.cross_entropy(
            fc(features(x).flatten(1)), torch.from_numpy(c.labels)).backward()
        torch_opt.step()
    features.eval()
    with torch.no_grad():
        expected = fc(features(x).flatten(1)).numpy()
    numpy.testing.assert_allclose(net.forward(images, training=False), expected,
                                  rtol=1e-6, atol=1e-9)


def test_short_training_improves_loss():
    train_charts = charts.make_charts(128, "5day", seed=10)
    test_charts = charts.make_charts(64, "5day", seed=11)
    result = train.train(train_charts, test_charts, epochs=3, batch_size=32,
                         lr=1e-3, seed=0)
    losses = [e["train_loss"] for e in result.epochs]
    assert losses[-1] < losses[0]
    assert len(result.steps) == 3 * 4
    assert all(0 <= e["test_accuracy"] <= 1 for e in result.epochs)


F16 = numpy.float16


def _rel(a, b):
    """max |a - b| / max |b|, in float64."""
    b = numpy.asarray(b, numpy.float64)
    return float(numpy.abs(numpy.asarray(a, numpy.float64) - b).max() / numpy.abs(b).max())


def _rel_norm(a, b):
    """||a - b|| / ||b|| (Frobenius), in float64."""
    a, b = (numpy.asarray(v, numpy.float64).ravel() for v in (a, b))
    return float(numpy.linalg.norm(a - b) / numpy.linalg.norm(b))


def _noisy_charts(n, arch, seed):
    """Charts as float32 images with a little noise (no max-pool ties), labels."""
    c = charts.make_charts(n, arch, seed=seed)
    rng = numpy.random.default_rng(seed)
    images = c.images[..., None] / numpy.float32(255)
    images += numpy.float32(0.01) * rng.standard_normal(images.shape, numpy.float32)
    return images, c.labels


def _forward_backward(net, images, labels):
    logits = net.forward(images, training=True)
    loss, grad = model.softmax_cross_entropy(logits, labels)
    grad_images = net.backward(grad)
    grads = {name: cupyconv.asnumpy(g) for name, _, g in net.parameters()}
    return cupyconv.asnumpy(logits), cupyconv.asnumpy(grad_images), grads


def _assert_same_pass(got, expected, rtol):
    for a, b in zip(got[:2], expected[:2]):
        numpy.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * numpy.abs(b).max())
    for name in expected[2]:
        b = expected[2][name]
        numpy.testing.assert_allclose(got[2][name], b, rtol=rtol,
                                      atol=rtol * numpy.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("arch", ["5day", "20day"])
def test_model_on_cpu_kernels_matches_numpy(arch, cpu_kernels):
    """The GPU code path of every op the model uses, run by the CPU executor,
    gives the NumPy path's logits and gradients."""
    from cpu_cuda import LAUNCHED, numpy_path

    c = charts.make_charts(2, arch, seed=12)
    images = c.images[..., None] / 255.0
    with numpy_path():
        expected = _forward_backward(
            model.PriceTrendCNN(arch, dtype=numpy.float64, seed=3), images, c.labels)
    launched = sum(LAUNCHED.values())
    got = _forward_backward(model.PriceTrendCNN(arch, dtype=numpy.float64, seed=3),
                            images, c.labels)
    assert sum(LAUNCHED.values()) > launched
    _assert_same_pass(got, expected, 1e-9)


def test_mixed_precision_on_cpu_kernels_matches_numpy(cpu_kernels):
    """The float16 mixed-precision model through the GPU code path (the
    float16 convolution and pooling kernels, run by the CPU executor) gives
    the NumPy path's float16 logits and float32 gradients, to float16
    accuracy (each side rounds once per layer, summing in its own order)."""
    from cpu_cuda import LAUNCHED, numpy_path

    images, labels = _noisy_charts(2, "5day", seed=12)
    with numpy_path():
        expected = _forward_backward(
            model.PriceTrendCNN("5day", seed=3, compute_dtype=F16, dropout=0), images, labels)
    launched = sum(LAUNCHED.values())
    got = _forward_backward(model.PriceTrendCNN("5day", seed=3, compute_dtype=F16, dropout=0),
                            images, labels)
    assert sum(LAUNCHED.values()) > launched
    assert got[0].dtype == F16 and _rel(got[0], expected[0]) < 2e-3
    for name, grad in expected[2].items():
        assert got[2][name].dtype == numpy.float32
        assert _rel_norm(got[2][name], grad) < 5e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["5day", "20day"])
def test_model_on_gpu_matches_numpy(arch, gpu):
    c = charts.make_charts(4, arch, seed=13)
    images = c.images[..., None] / 255.0
    expected = _forward_backward(
        model.PriceTrendCNN(arch, dtype=numpy.float64, seed=3, dropout=0), images, c.labels)
    got = _forward_backward(
        model.PriceTrendCNN(arch, xp=gpu, dtype=numpy.float64, seed=3, dropout=0),
        gpu.asarray(images), gpu.asarray(c.labels))
    _assert_same_pass(got, expected, 1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["5day", "20day"])
def test_mixed_precision_on_gpu_matches_numpy(arch, gpu):
    """float16 mixed precision on the GPU (CuPy arrays: BatchNorm's float32
    work arrays, cuBLAS's float16 products) against the NumPy path."""
    images, labels = _noisy_charts(4, arch, seed=13)
    expected = _forward_backward(
        model.PriceTrendCNN(arch, seed=3, compute_dtype=F16, dropout=0), images, labels)
    got = _forward_backward(
        model.PriceTrendCNN(arch, xp=gpu, seed=3, compute_dtype=F16, dropout=0),
        gpu.asarray(images), gpu.asarray(labels))
    assert got[0].dtype == F16 and _rel(got[0], expected[0]) < 2e-3
    for name, grad in expected[2].items():
        assert got[2][name].dtype == numpy.float32
        assert _rel_norm(got[2][name], grad) < 5e-3, name


@pytest.mark.gpu
def test_mixed_precision_training_on_gpu(gpu):
    result = train.train(charts.make_charts(128, "5day", seed=10),
                         charts.make_charts(64, "5day", seed=11), epochs=3, batch_size=32,
                         lr=1e-3, seed=0, xp=gpu, compute_dtype=F16)
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]


@pytest.mark.gpu
def test_training_on_gpu(gpu):
    result = train.train(charts.make_charts(128, "5day", seed=10),
                         charts.make_charts(64, "5day", seed=11),
                         epochs=3, batch_size=32, lr=1e-3, seed=0, xp=gpu)
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]


def test_main_runs_and_writes_pngs(tmp_path, capsys):
    status = train.main(["--train-size", "64", "--test-size", "32", "--epochs", "1",
                         "--batch-size", "32", "--output", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0 and "final test accuracy" in out
    if "matplotlib is not installed" not in out:
        for name in ("training_curves.png", "sample_charts.png"):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_without_matplotlib(tmp_path, capsys, monkeypatch):
    import sys
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` fail
    status = train.main(["--train-size", "32", "--test-size", "16", "--epochs", "1",
                         "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert status == 0
    assert "matplotlib is not installed: skipping the PNGs" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--model", "7day"], ["--epochs", "0"],
                                  ["--dropout", "1"]])
def test_main_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2 and argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("module", [charts, model, train])
def test_docstring_examples(module):
    import doctest
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("block_bytes", [1 << 10, 1 << 18, 1 << 40], ids=["tiny", "default", "whole"])
def test_batchnorm_and_leaky_relu_by_row_blocks(block_bytes, monkeypatch):
    """BatchNorm's and LeakyReLU's passes over blocks of rows (shared among
    the cores) give the formulas' float64 results to float32 accuracy,
    whatever the block size (one block is what CuPy arrays get), also for
    an input that is not C-contiguous."""
    monkeypatch.setattr(model, "_BLOCK_BYTES", block_bytes)
    rng = numpy.random.default_rng(5)
    # Over a MiB per pass: the rows are split among the cores.
    x = (3 + 2 * rng.standard_normal((12, 40, 11, 32))).astype(numpy.float32)
    x = x.transpose(0, 2, 1, 3).copy().transpose(0, 2, 1, 3)  # NHWC, not contiguous
    g = rng.standard_normal(x.shape).astype(numpy.float32)
    weight = rng.uniform(0.5, 2, 32).astype(numpy.float32)
    bias = rng.standard_normal(32).astype(numpy.float32)
    bn = model.BatchNorm(32, xp=numpy, dtype=numpy.float32)
    bn.params.update(weight=weight, bias=bias)
    act = model.LeakyReLU()
    y = act.forward(bn.forward(x, training=True), training=True)
    grad_x = bn.backward(act.backward(g))

    x64, g64 = x.astype(numpy.float64), g.astype(numpy.float64)
    axes = (0, 1, 2)
    mean, var = x64.mean(axis=axes), x64.var(axis=axes)
    x_hat = (x64 - mean) / numpy.sqrt(var + 1e-5)
    z = weight * x_hat + bias
    expected_y = numpy.where(z > 0, z, 0.01 * z)
    grad_z = numpy.where(z > 0, g64, 0.01 * g64)
    count = x.size // 32
    expected_grad_x = weight / numpy.sqrt(var + 1e-5) / count * (
        count * grad_z - grad_z.sum(axis=axes) - x_hat * (grad_z * x_hat).sum(axis=axes))

    def close(ours, expected, what):
        assert ours.dtype == numpy.float32 and ours.shape == expected.shape
        numpy.testing.assert_allclose(ours, expected, rtol=1e-5,
                                      atol=1e-5 * numpy.abs(expected).max(), err_msg=what)

    close(y, expected_y, "output")
    close(grad_x, expected_grad_x, "input gradient")
    close(bn.grads["weight"], (grad_z * x_hat).sum(axis=axes), "weight gradient")
    close(bn.grads["bias"], grad_z.sum(axis=axes), "bias gradient")
    close(bn.running_var, 0.9 + 0.1 * var * count / (count - 1), "running_var")


# --- mixed precision -------------------------------------------------------

def _torch_grads(torch, layers, net):
    """The twin's parameter gradients in our layouts, by our names."""
    theirs = dict(layers.named_parameters())
    h, w, c = model.layer_shapes(net.model)[-2][1]
    grads = {}
    for name, _, _ in net.parameters():
        t = theirs[name.replace(".", "_", 1) if name.startswith("block") else name]
        g = t.grad.numpy()
        if t.ndim == 4:  # OIHW -> HWIO
            g = g.transpose(2, 3, 1, 0)
        elif name == "fc.weight":  # (2, c*h*w) -> (h*w*c, 2)
            g = g.reshape(2, c, h, w).transpose(2, 3, 1, 0).reshape(-1, 2)
        grads[name] = g
    return grads


def test_mixed_precision_matches_torch_autocast():
    """One training step of the float16 mixed-precision model against the
    same network in PyTorch under ``torch.autocast("cpu", float16)`` with a
    ``torch.amp.GradScaler``, same weights and dropout mask: loss, logits
    and every (unscaled, float32) gradient agree far more closely than
    either agrees with the float32 model, whose gradients differ by a few
    percent.  (Gradients are compared norm-wise: a max-pool window whose
    two rows tie within a float16 rounding may pick either row.)  Adam
    then updates the float32 master weights, from which the next forward
    pass casts its float16 weights."""
    torch = pytest.importorskip("torch")
    from cupyconv.bench import trainstep

    images, labels = _noisy_charts(4, "5day", seed=1)
    uniform = numpy.random.default_rng(2).random((4, model.layer_shapes("5day")[-1][1][0]))
    net = model.PriceTrendCNN("5day", seed=3, compute_dtype=F16)
    full = model.PriceTrendCNN("5day", seed=3)
    twin = model.PriceTrendCNN("5day", seed=3)
    layers, torch_opt = trainstep.torch_twin(torch, twin, lr=1e-3)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels.astype(numpy.int64))
    # A scale small enough that no float16 gradient overflows: a step to compare.
    scaler = model.GradScaler(init_scale=2.0 ** 10)
    before = {name: value.copy() for name, value, _ in net.parameters()}
    with trainstep.fixed_dropout(net, uniform), trainstep.fixed_dropout(full, uniform), \
            trainstep.fixed_dropout(twin, uniform, torch, layers):
        torch_loss, torch_logits = trainstep.torch_step(
            torch, layers, torch_opt, x, y, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
        loss, logits = trainstep.cupyconv_step(net, model.Adam(net, lr=1e-3), images, labels,
                                               scaler)
        _, full_logits = trainstep.cupyconv_step(full, model.Adam(full), images, labels)

    assert logits.dtype == F16 and torch_logits.dtype == torch.float16
    assert loss.dtype == numpy.float32
    assert abs(float(loss) - torch_loss.item()) < 1e-4
    assert _rel(logits, torch_logits.detach().float().numpy()) < 2e-4
    assert 2e-4 < _rel(full_logits, logits) < 5e-3  # float16 rounding shows
    theirs = _torch_grads(torch, layers, net)
    full_grads = {name: g for name, _, g in full.parameters()}
    worst_full = 0.0
    for name, value, grad in net.parameters():
        assert value.dtype == grad.dtype == numpy.float32, name
        assert _rel_norm(grad, theirs[name]) < 5e-3, name
        worst_full = max(worst_full, _rel_norm(full_grads[name], theirs[name]))
    assert worst_full > 1e-2  # so the bound above tells float16 from float32
    # Adam's first step moves each master weight by lr * g / (|g| + eps).
    for name, value, grad in net.parameters():
        expected = before[name] - 1e-3 * grad / (numpy.abs(grad) + 1e-8)
        numpy.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-9, err_msg=name)
    net.forward(images, training=False)
    conv = dict(net.layers)["block1.conv"]
    assert conv.compute_weight.dtype == F16
    numpy.testing.assert_array_equal(conv.compute_weight, conv.params["weight"].astype(F16))


def test_mixed_precision_dtypes_layer_by_layer():
    """Activations and their gradients are float16 between the layers; the
    BatchNorm statistics, every parameter and gradient stay float32."""
    images, labels = _noisy_charts(3, "5day", seed=4)
    net = model.PriceTrendCNN("5day", seed=0, compute_dtype=F16)
    x = images
    for name, layer in net.layers:
        x = layer.forward(x, training=True)
        assert x.dtype == F16, name
    bn = dict(net.layers)["block1.bn"]
    assert bn.mean.dtype == bn.inv_std.dtype == bn.running_var.dtype == numpy.float32
    _, grad = model.softmax_cross_entropy(x, labels)
    assert grad.dtype == numpy.float32
    assert net.backward(grad).dtype == numpy.float32  # the images' dtype
    for name, value, g in net.parameters():
        assert value.dtype == g.dtype == numpy.float32, name


@pytest.mark.parametrize("block_bytes", [1 << 10, 1 << 40], ids=["tiny", "whole"])
def test_batchnorm_and_leaky_relu_in_float16_round_once(block_bytes, monkeypatch):
    """float16 BatchNorm (float32 parameters) and LeakyReLU compute in
    float32 and round once: the output and the input gradient are the
    float64 formulas' values of the float16 inputs, each correctly rounded
    to float16 (within a float32 rounding of it); the statistics and
    parameter gradients are float32."""
    monkeypatch.setattr(model, "_BLOCK_BYTES", block_bytes)
    rng = numpy.random.default_rng(6)
    x = (3 + 2 * rng.standard_normal((8, 20, 11, 16))).astype(F16)
    g = rng.standard_normal(x.shape).astype(F16)
    weight = rng.uniform(0.5, 2, 16).astype(numpy.float32)
    bias = rng.standard_normal(16).astype(numpy.float32)
    bn = model.BatchNorm(16, xp=numpy, dtype=numpy.float32)
    bn.params.update(weight=weight, bias=bias)
    y = bn.forward(x, training=True)
    grad_x = bn.backward(g)

    x64, g64 = x.astype(numpy.float64), g.astype(numpy.float64)
    axes, count = (0, 1, 2), x.size // 16
    mean, var = x64.mean(axis=axes), x64.var(axis=axes)
    x_hat = (x64 - mean) / numpy.sqrt(var + 1e-5)
    expected_grad_x = weight / numpy.sqrt(var + 1e-5) / count * (
        count * g64 - g64.sum(axis=axes) - x_hat * (g64 * x_hat).sum(axis=axes))

    def rounded_once(ours, exact):
        assert ours.dtype == F16
        # Round to nearest: within half a float16 unit (2**-11 relative),
        # plus float32 arithmetic error; a second rounding would exceed it.
        err = numpy.abs(ours.astype(numpy.float64) - exact)
        assert (err <= 2.0 ** -11 * numpy.abs(exact) * (1 + 1e-3) + 1e-5 * numpy.abs(exact).max()
                ).all()
        assert (ours == exact.astype(F16)).mean() > 0.99

    rounded_once(y, weight * x_hat + bias)
    rounded_once(grad_x, expected_grad_x)
    for got, expected in ((bn.grads["weight"], (g64 * x_hat).sum(axis=axes)),
                          (bn.grads["bias"], g64.sum(axis=axes)),
                          (bn.running_var, 0.9 + 0.1 * var * count / (count - 1))):
        assert got.dtype == numpy.float32
        numpy.testing.assert_allclose(got, expected, rtol=1e-5,
                                      atol=1e-5 * numpy.abs(expected).max())

    act = model.LeakyReLU()
    out = act.forward(y, training=True)
    y32 = y.astype(numpy.float32)
    numpy.testing.assert_array_equal(
        out, numpy.where(y32 > 0, y32, numpy.float32(0.01) * y32).astype(F16))
    back = act.backward(g)
    numpy.testing.assert_array_equal(
        back, (g.astype(numpy.float32) * numpy.where(y32 > 0, 1, numpy.float32(0.01))).astype(F16))


class _FakeModel:
    """Parameters and gradients for an optimizer, without layers."""

    xp = numpy

    def __init__(self, grads):
        self.values = {name: numpy.ones_like(g) for name, g in grads.items()}
        self.grads = grads

    def parameters(self):
        return [(name, self.values[name], self.grads[name]) for name in self.values]


def _scaled_step(scaler, grads):
    """One step of a scaler over float32 gradients ``grads`` (times its
    scale, as after a scaled backward pass): ``(taken, adam, fake model)``."""
    fake = _FakeModel({name: (g * scaler.get_scale()).astype(numpy.float32)
                       for name, g in grads.items()})
    adam = model.Adam(fake, lr=0.1)
    taken = scaler.step(adam)
    scaler.update()
    return taken, adam, fake


def test_grad_scaler_skips_a_step_with_inf_or_nan_and_backs_off():
    scaler = model.GradScaler(growth_interval=3)
    assert scaler.get_scale() == 2.0 ** 16
    good = {"a": numpy.array([1.0, -2.0]), "b": numpy.array([0.5])}
    taken, adam, fake = _scaled_step(scaler, good)
    assert taken and adam.t == 1
    numpy.testing.assert_array_equal(fake.grads["a"], [1.0, -2.0])  # unscaled in place
    numpy.testing.assert_allclose(fake.values["a"], [0.9, 1.1])  # Adam's first step: lr
    for bad in (numpy.inf, -numpy.inf, numpy.nan):
        taken, adam, fake = _scaled_step(scaler, dict(good, b=numpy.array([bad])))
        assert not taken and adam.t == 0
        numpy.testing.assert_array_equal(fake.values["a"], [1.0, 1.0])  # untouched
    assert scaler.get_scale() == 2.0 ** 13
    # Growth after growth_interval good steps in a row; an inf resets the count.
    _scaled_step(scaler, good), _scaled_step(scaler, good)
    _scaled_step(scaler, dict(good, a=numpy.array([numpy.inf, 0.0])))
    assert scaler.get_scale() == 2.0 ** 12
    for k in range(3):
        assert scaler.get_scale() == 2.0 ** 12
        assert _scaled_step(scaler, good)[0]
    assert scaler.get_scale() == 2.0 ** 13


def test_grad_scaler_disabled_and_bad_use():
    off = model.GradScaler(enabled=False)
    grad = numpy.array([[0.25, -0.25]], numpy.float32)
    assert off.scale(grad) is grad and off.get_scale() == 1.0
    with numpy.errstate(invalid="ignore"):  # Adam's inf / inf
        taken, adam, fake = _scaled_step(off, {"a": numpy.array([numpy.inf])})
    assert taken and adam.t == 1 and numpy.isnan(fake.values["a"]).all()  # plain Adam
    assert model.GradScaler(init_scale=8.0).scale(grad).tolist() == [[2.0, -2.0]]
    for bad in (dict(init_scale=0), dict(init_scale=numpy.inf), dict(growth_factor=1.0),
                dict(backoff_factor=1.0), dict(backoff_factor=0), dict(growth_interval=0),
                dict(growth_interval=2.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            model.GradScaler(**bad)
    scaler = model.GradScaler()
    with pytest.raises(RuntimeError, match="step"):
        scaler.update()
    with pytest.raises(ValueError, match="a has a float16 gradient"):
        scaler.step(model.Adam(_FakeModel({"a": numpy.ones(2, F16)})))
    net = model.PriceTrendCNN("5day", compute_dtype=F16)
    with pytest.raises(ValueError, match="block1.conv.weight has no gradient"):
        scaler.step(model.Adam(net))


def test_mixed_precision_training_improves_loss():
    """The demo's training loop with float16 compute: the loss falls, a
    GradScaler runs (its first scale overflows float16 and is halved), the
    parameters stay float32."""
    result = train.train(charts.make_charts(96, "5day", seed=10),
                         charts.make_charts(32, "5day", seed=11),
                         epochs=3, batch_size=32, lr=1e-3, seed=0, compute_dtype=F16)
    losses = [e["train_loss"] for e in result.epochs]
    assert losses[-1] < losses[0] and all(numpy.isfinite(losses))
    assert all(value.dtype == numpy.float32 for _, value, _ in result.model.parameters())
    assert result.model.compute_dtype == F16


def test_pure_float16_and_bad_dtypes():
    """``dtype=float16`` alone: parameters, activations and gradients all
    float16.  A compute dtype wider than the parameters', or a dtype that
    is not floating, is refused, naming the argument."""
    images, labels = _noisy_charts(2, "5day", seed=5)
    net = model.PriceTrendCNN("5day", dtype=F16, seed=0)
    logits = net.forward(images.astype(F16), training=True)
    _, grad = model.softmax_cross_entropy(logits, labels)
    assert logits.dtype == F16 and net.backward(grad).dtype == F16
    assert {v.dtype for _, v, g in net.parameters()} == {g.dtype for _, v, g in net.parameters()} \
        == {numpy.dtype(F16)}
    full = model.PriceTrendCNN("5day", seed=0)
    assert _rel(logits, full.forward(images, training=True)) < 2e-2
    with pytest.raises(ValueError, match="compute_dtype must be no wider than dtype"):
        model.PriceTrendCNN(dtype=numpy.float32, compute_dtype=numpy.float64)
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        model.PriceTrendCNN(dtype=numpy.int16)
    with pytest.raises(ValueError, match="compute_dtype must be a floating dtype"):
        model.PriceTrendCNN(compute_dtype=numpy.int8)
    with pytest.raises(TypeError, match="compute_dtype"):
        model.PriceTrendCNN(compute_dtype="no such dtype")


def test_bfloat16_mixed_precision():
    """bfloat16 compute (ml_dtypes) runs the same rules: bfloat16
    activations within bfloat16's resolution of the float32 model, float32
    gradients."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = numpy.dtype(ml_dtypes.bfloat16)
    images, labels = _noisy_charts(2, "5day", seed=7)
    net = model.PriceTrendCNN("5day", seed=0, compute_dtype=bf16, dropout=0)
    full = model.PriceTrendCNN("5day", seed=0, dropout=0)
    logits = net.forward(images, training=True)
    assert logits.dtype == bf16
    assert _rel(logits, full.forward(images, training=True)) < 3e-2
    _, grad = model.softmax_cross_entropy(logits, labels)
    net.backward(grad, input_gradient=False)
    assert {g.dtype for _, _, g in net.parameters()} == {numpy.dtype(numpy.float32)}


def test_main_with_compute_dtype(capsys):
    status = train.main(["--train-size", "64", "--test-size", "32", "--epochs", "1",
                         "--batch-size", "32", "--device", "cpu", "--no-plots",
                         "--compute-dtype", "float16"])
    out = capsys.readouterr().out
    assert status == 0 and "float32 parameters, float16 compute" in out
    assert "final test accuracy" in out
