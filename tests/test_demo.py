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
