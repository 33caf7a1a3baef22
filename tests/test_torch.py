"""cupyconv.torch: autograd functions, nn modules and torch.compile, checked
against PyTorch's own ops (the independent reference) and gradcheck."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cct = pytest.importorskip("cupyconv.torch")
F = torch.nn.functional


def _randn(*shape, grad=True, seed=[0]):
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(grad)


CONV_CASES = [
    dict(stride=1, padding=0),
    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(stride=1, padding="same", dilation=2),
    dict(stride=2, padding=1, groups=3),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_torch_forward_and_backward(case):
    groups = case.get("groups", 1)
    x, w, b = _randn(2, 6, 9, 8), _randn(6, 6 // groups, 3, 2), _randn(6)
    y = cct.conv2d(x, w, b, **case)
    ref = F.conv2d(x, w, b, **case)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    expected = torch.autograd.grad(ref, (x, w, b), g)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


def test_gradcheck_every_function():
    x, w, b = _randn(2, 2, 6, 5), _randn(3, 2, 3, 2), _randn(3)
    gradcheck = torch.autograd.gradcheck
    assert gradcheck(lambda x, w, b: cct.conv2d(x, w, b, (2, 1), 1, (1, 2)), (x, w, b))
    xh = _randn(2, 6, 5, 2)  # NHWC, kernel HWIO
    wh = _randn(3, 2, 2, 3)
    assert gradcheck(lambda x, w: cct.conv2d(x, w, padding="same", layout="NHWC"),
                     (xh, wh))
    # Distinct values: max-pooling is differentiable away from ties.
    xp = (torch.randperm(2 * 2 * 7 * 6, dtype=torch.float64) / 10).reshape(2, 2, 7, 6)
    xp.requires_grad_()
    assert gradcheck(lambda x: cct.max_pool2d(x, 3, 2, 1, ceil_mode=True), (xp,))
    assert gradcheck(lambda x: cct.max_pool2d(x, (2, 1), layout="NHWC"), (xp,))
    assert gradcheck(lambda x: cct.dilate(x, (2, 3), (1, 2), shape=(2, 2, 14, 19)), (x,))
    assert gradcheck(lambda x: cct.undilate(x, (2, -1), (1, 2)), (x,))


def test_max_pool2d_matches_torch():
    x = _randn(2, 3, 11, 10)
    out, idx = cct.max_pool2d(x, (3, 2), (2, 1), (1, 1), (1, 2), ceil_mode=True,
                              return_indices=True)
    ref, ref_idx = F.max_pool2d(x, (3, 2), (2, 1), (1, 1), (1, 2), ceil_mode=True,
                                return_indices=True)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    assert not idx.requires_grad
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(ref, x, g)[0])


def test_no_grad_and_inference_mode():
    x, w = _randn(1, 2, 5, 5), _randn(2, 2, 3, 3)
    with torch.no_grad():
        y = cct.conv2d(x, w)
    assert not y.requires_grad
    with torch.inference_mode():
        y = cct.max_pool2d(cct.conv2d(x, w), 2)
    assert y.shape == (1, 2, 1, 1)


def _model(conv, pool):
    torch.manual_seed(3)
    return torch.nn.Sequential(
        conv(1, 4, (5, 3), padding=(2, 1), dtype=torch.float64),
        torch.nn.LeakyReLU(),
        pool((2, 1)),
        conv(4, 6, 3, stride=(2, 1), padding=1, groups=2, dtype=torch.float64),
        torch.nn.ReLU(),
        pool(2, 2, ceil_mode=True),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(2, dtype=torch.float64),
    )


def test_modules_swap_one_for_one_and_train_alike():
    ours = _model(cct.Conv2d, cct.MaxPool2d)
    ref = _model(torch.nn.Conv2d, torch.nn.MaxPool2d)
    for i in (0, 3):  # same seed, same initialisation as torch.nn
        assert torch.equal(ours[i].weight, ref[i].weight)
        assert torch.equal(ours[i].bias, ref[i].bias)
    x = _randn(8, 1, 20, 15, grad=False)
    labels = torch.arange(8) % 2
    ours(x), ref(x)  # materialise the lazy layer
    ref.load_state_dict(ours.state_dict())  # torch.nn's names and shapes
    losses = []
    for model in (ours, ref):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        run = []
        for _ in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    np.testing.assert_allclose(losses[0], losses[1], rtol=0, atol=1e-6)
    assert losses[0][-1] < losses[0][0]  # it trains
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_conv2d_module_initialisation_is_torchs():
    torch.manual_seed(11)
    ours = cct.Conv2d(6, 8, (3, 5), groups=2)
    torch.manual_seed(11)
    ref = torch.nn.Conv2d(6, 8, (3, 5), groups=2)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    bound = 1 / math.sqrt(3 * 3 * 5)  # fan_in = C_in/groups * kh * kw
    assert ours.bias.abs().max() <= bound
    assert ours.weight.abs().max() <= bound  # kaiming_uniform, a = sqrt(5)
    assert set(ours.state_dict()) == {"weight", "bias"}
    assert ours.weight.shape == (8, 3, 3, 5)


def test_nhwc_module_and_padding_modes():
    torch.manual_seed(0)
    layer = cct.Conv2d(3, 4, 3, padding=1, layout="NHWC", dtype=torch.float64)
    x = _randn(2, 7, 6, 3, grad=False)
    y = layer(x)
    ref = F.conv2d(x.permute(0, 3, 1, 2), layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(y, ref.permute(0, 2, 3, 1))
    reflect = cct.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", dtype=torch.float64)
    ref_layer = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect",
                                dtype=torch.float64)
    ref_layer.load_state_dict(reflect.state_dict())
    xc = x.permute(0, 3, 1, 2)
    torch.testing.assert_close(reflect(xc), ref_layer(xc))
    with pytest.raises(ValueError, match="padding_mode"):
        cct.Conv2d(3, 4, 3, padding_mode="reflect", layout="NHWC")
    pool = cct.MaxPool2d(2, layout="NHWC")
    torch.testing.assert_close(pool(x), F.max_pool2d(xc, 2).permute(0, 2, 3, 1))


def test_torch_compile_fullgraph():
    # aot_eager traces the fake kernels and the autograd formulas exactly as
    # inductor does, without minutes of C++ compilation on a 2-core CI machine.
    x, w, b = _randn(2, 3, 8, 7), _randn(4, 3, 3, 3), _randn(4)

    def f(x, w, b):
        y = cct.max_pool2d(F.relu(cct.conv2d(x, w, b, padding=1)), 2, ceil_mode=True)
        return cct.undilate(cct.dilate(y, (2, 3), 1), (2, 3), 1).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w, b)
    grads = torch.autograd.grad(loss, (x, w, b))
    ref_loss = f(x, w, b)
    ref_grads = torch.autograd.grad(ref_loss, (x, w, b))
    torch.testing.assert_close(loss, ref_loss)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)


def test_opcheck_custom_ops():
    x, w = _randn(1, 2, 5, 4), _randn(3, 2, 2, 2)
    torch.library.opcheck(torch.ops.cupyconv.conv2d.default,
                          (x, w, None, [1, 1], [1, 0, 0, 1], [1, 1], 1, "NCHW", None),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    torch.library.opcheck(torch.ops.cupyconv.max_pool2d.default,
                          (x, [2, 2], [1, 2], [1, 1], [1, 1], True, "NCHW"),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_arguments_are_named():
    x, w = _randn(1, 2, 5, 4), _randn(3, 2, 2, 2)
    with pytest.raises(ValueError, match="layout"):
        cct.conv2d(x, w, layout="NWHC")
    with pytest.raises(ValueError, match="padding"):
        cct.max_pool2d(x, 2, padding=2)
    with pytest.raises(TypeError, match="ceil_mode"):
        cct.max_pool2d(x, 2, ceil_mode=1)


@pytest.mark.gpu
def test_cuda_backward(gpu):
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    model = _model(cct.Conv2d, cct.MaxPool2d).cuda()
    ref = _model(torch.nn.Conv2d, torch.nn.MaxPool2d).cuda()
    x = _randn(8, 1, 20, 15, grad=False).cuda()
    model(x), ref(x)
    ref.load_state_dict(model.state_dict())
    for m in (model, ref):
        F.cross_entropy(m(x), torch.arange(8, device="cuda") % 2).backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_docstring_examples_run():
    import doctest

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(cct):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 10 and not result.failed
