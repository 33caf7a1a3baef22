"""Smoke test of ``python -m cupyconv.bench`` (tiny sizes, no timing claims),
its runner (turns, failures), its GPU part on a stand-in device, its report
generator, and its baseline implementations against PyTorch."""

import copy
import importlib
import json
import sys
import time
import types

import numpy as np
import pytest

import cupyconv
from cupyconv.bench import SCHEMA, peers, report, run, timing
from cupyconv.bench import cases as cases_mod
from cupyconv.bench.__main__ import main, parser
from cupyconv.bench.cases import OPS

import cpu_cuda

run_mod = importlib.import_module("cupyconv.bench.run")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--cpu-only", "--repeats", "1", "--json", str(out / "bench.json"),
            "--report", str(out / "docs" / "benchmarks.md")]
    assert main(argv) == 0
    result = json.loads((out / "bench.json").read_text())
    return out, result


def test_json_schema(quick_run):
    _, result = quick_run
    assert result["schema"] == SCHEMA
    for key in ("created", "command", "settings", "machine", "versions", "references",
                "skipped", "results", "wall_s"):
        assert key in result, key
    assert result["versions"]["numpy"] == np.__version__
    assert result["versions"]["cupyconv"] == cupyconv.__version__
    refs = result["references"]["cpu"]
    assert refs["copy_gbps"] > 0 and refs["matmul_tflops"]["float32"] > 0
    assert {r["op"] for r in result["results"]} == set(OPS)
    assert {r["group"] for r in result["results"]} == {"memory", "seed", "resnet", "sweep",
                                                        "train"}
    tol = result["settings"]["agreement_tolerance"]
    for record in result["results"]:
        assert record["device"] == "cpu"
        assert record["bytes"] or record["flops"]
        peers_seen = {row["peer"] for row in record["timings"]}
        assert "cupyconv" in peers_seen
        for row in record["timings"]:
            assert "error" not in row, (record["title"], row)
            assert row["repeats"] == 1 and len(row["times_s"]) == 1
            assert row["median_s"] > 0
            assert row["max_rel_diff"] <= record.get("tolerance", tol), (record["title"], row)
            if row["peer"] != "torch":
                assert row["peak_bytes"] > 0
        for peer, entry in record["summary"].items():
            assert peer == "cupyconv" or entry["ratio"] > 0


def test_gpu_part_runs_or_says_why_not():
    result = run(devices=("gpu",), ops=("dilate",), quick=True, repeats=1, log=lambda line: None)
    if cupyconv.gpu_available():
        assert result["skipped"] == [] or result["skipped"][0]["part"] == "gpu PyTorch peer"
        assert all("error" not in row for r in result["results"] for row in r["timings"])
    else:
        assert result["results"] == []
        assert result["skipped"] == [{"part": "gpu", "reason": cupyconv.gpu_unavailable_reason()}]
        result["wall_s"] = 0.0
        assert cupyconv.gpu_unavailable_reason() in report.markdown(result)


def test_markdown_report(quick_run):
    out, result = quick_run
    text = (out / "docs" / "benchmarks.md").read_text()
    for heading in ("# Benchmarks", "## Machine and versions", "## CPU results",
                    "## Where cupyconv is slower", "## Plot", "## Method"):
        assert heading in text
    assert result["machine"]["cpu_model"] in text
    for record in result["results"]:
        if record["group"] != "sweep":
            assert record["title"] in text
    plot = out / "docs" / "_static" / "benchmark_ratios.png"
    if result["versions"]["matplotlib"]:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "](_static/benchmark_ratios.png)" in text
    else:
        assert "matplotlib is not installed" in text


def test_slower_section_is_generated_from_the_data(quick_run):
    result = copy.deepcopy(quick_run[1])
    record = result["results"][0]
    record["summary"] = {"cupyconv": {"median_s": 0.003, "detail": ""},
                         "torch": {"median_s": 0.001, "detail": "NCHW", "ratio": 3.0}}
    result["results"] = [record]
    text = report.markdown(result, None, "no plot")
    assert f"{record['title']}: cupyconv takes **3.00x** the time of PyTorch CPU (NCHW)" in text
    record["summary"]["torch"].update(median_s=0.006, ratio=0.5)
    assert "at least as fast as every peer" in report.markdown(result, None, "no plot")


def test_every_cupyconv_variant_is_listed(quick_run):
    """Cases timing several cupyconv variants list each one, the NumPy-only
    pool backward among them where numba is installed, with its ratio."""
    result = copy.deepcopy(quick_run[1])
    record = result["results"][0]
    record["timings"] = [
        {"peer": peer, "label": peer, "detail": detail, "median_s": median}
        for peer, detail, median in (("cupyconv", "fast way", 0.001),
                                     ("cupyconv", "slow way", 0.004),
                                     ("torch", "NCHW", 0.002))]
    record["summary"] = {"cupyconv": {"median_s": 0.001, "detail": "fast way"},
                         "torch": {"median_s": 0.002, "detail": "NCHW", "ratio": 0.5}}
    result["results"] = [record]
    text = report.markdown(result, None, "no plot")
    assert f"| {record['title']} | fast way | 1.00 ms | 0.50 |" in text
    assert f"| {record['title']} | slow way | 4.00 ms | 2.00 |" in text
    details = {row["detail"] for r in quick_run[1]["results"] for row in r["timings"]
               if row["peer"] == "cupyconv"}
    assert ("picks from x, NumPy only" in details) == (quick_run[1]["versions"]["numba"] is not None)


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--cpu-only", "--gpu-only", "--quick", "--repeats", "--ops", "--json",
                   "--report", "--plot", "--no-plot"):
        assert option in text


def test_unknown_op_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--ops", "conv3d"])
    assert "conv3d" in capsys.readouterr().err


CONV_SETTINGS = [
    dict(stride=(1, 1), padding=((2, 2), (1, 1)), dilation=(1, 1)),
    dict(stride=(3, 1), padding=((3, 3), (1, 1)), dilation=(2, 1)),
    dict(stride=(2, 2), padding=((0, 0), (0, 0)), dilation=(1, 2)),
]


@pytest.mark.parametrize("args", CONV_SETTINGS)
def test_conv_baselines_match_torch(args):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 13, 9, 3))
    w = rng.standard_normal((5, 3, 3, 4))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).requires_grad_(True)
    (pt, _), (pl, _) = args["padding"]
    yt = torch.nn.functional.conv2d(xt, wt, None, args["stride"], (pt, pl), args["dilation"])
    g = rng.standard_normal(yt.shape).transpose(0, 2, 3, 1).copy()
    gx, gw = torch.autograd.grad(yt, (xt, wt), torch.from_numpy(g).permute(0, 3, 1, 2))
    expected = (yt.detach().permute(0, 2, 3, 1).numpy(), gx.permute(0, 2, 3, 1).numpy(),
                gw.permute(2, 3, 1, 0).numpy())
    np.testing.assert_allclose(peers.plain_conv(np, x, w, **args), expected[0], atol=1e-10)
    np.testing.assert_allclose(peers.loop_conv(x, w, **args), expected[0], atol=1e-10)
    for got in (peers.plain_conv_backward(np, x, w, g, **args),
                peers.loop_conv_backward(x, w, g, **args)):
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, atol=1e-10)


def test_pool_and_dilation_baselines():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 5, 3))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, (2, 1), (2, 1))
    g = rng.standard_normal(yt.shape).transpose(0, 2, 3, 1).copy()
    (gx,) = torch.autograd.grad(yt, (xt,), torch.from_numpy(g).permute(0, 3, 1, 2))
    y_ref, gx_ref = yt.detach().permute(0, 2, 3, 1).numpy(), gx.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(peers.plain_pool(np, x, (2, 1)), y_ref)
    np.testing.assert_array_equal(peers.loop_pool(x, (2, 1), (2, 1)), y_ref)
    np.testing.assert_array_equal(peers.plain_pool_backward(np, g, x, (2, 1)), gx_ref)
    np.testing.assert_array_equal(peers.loop_pool_backward(g, x, (2, 1), (2, 1)), gx_ref)

    a = rng.standard_normal((3, 4, 5))
    dilated = peers.plain_dilate(np, a, (0, 2), (1, 2))
    assert dilated.shape == (6, 4, 15)
    np.testing.assert_array_equal(dilated[::2, :, ::3], a)
    assert np.count_nonzero(dilated) == a.size
    np.testing.assert_array_equal(peers.loop_dilate(a, (0, 2), (1, 2)), dilated)
    np.testing.assert_array_equal(peers.plain_undilate(np, dilated, (0, 2), (1, 2)), a)
    np.testing.assert_array_equal(peers.loop_undilate(dilated, (0, 2), (1, 2)), a)


def _logging_impl(name, calls, fail_at=None):
    """A CPU implementation that records each call's name in ``calls``; its
    own ``fail_at``-th call (counting from 1) and later ones raise."""
    own = []

    def run_impl(state):
        calls.append(name)
        own.append(name)
        if fail_at is not None and len(own) >= fail_at:
            raise RuntimeError("boom")
        return state["x"]
    return cases_mod.Impl(peer="cupyconv" if name == "first" else "plain", prepare=dict,
                          run=run_impl, to_canonical=lambda out: (out,), detail=name)


def _fake_case(impls):
    return cases_mod.Case(
        key="fake", op="dilate", group="memory", device="cpu", title="fake", dtype="float32",
        shapes={"x": (4,)}, params={},
        make_inputs=lambda xp, seed: {"x": np.full(4, seed, np.float32)},
        impls=impls, bytes=16)


def test_implementations_take_turns(monkeypatch):
    """The timed calls of a case's implementations alternate in
    timing.ROUNDS rounds, each turn after an untimed call, so a drifting
    machine slows them alike; each row keeps all its timed calls."""
    monkeypatch.setattr(timing, "CPU_TURN_WARMUP_S", 0.0)
    calls = []
    case = _fake_case([_logging_impl("first", calls), _logging_impl("second", calls)])
    device = run_mod._Device("cpu", repeats=2 * timing.ROUNDS, quick=False)
    record = run_mod.run_case(device, case, {"copy_gbps": 1.0, "matmul_tflops": {}},
                              log=lambda line: None)
    # Each turn: one untimed call and 2 timed ones; then one traced call each.
    assert calls[-2:] == ["first", "second"]
    turn_calls = calls[-2 - 2 * timing.ROUNDS * 3:-2]
    turns = [turn_calls[i:i + 3] for i in range(0, len(turn_calls), 3)]
    assert turns == [[name] * 3 for name in ["first", "second"] * timing.ROUNDS]
    for row in record["timings"]:
        assert row["repeats"] == 2 * timing.ROUNDS and "error" not in row


@pytest.mark.parametrize("fail_at", [1, 4], ids=["while checked", "while timed"])
def test_a_failing_implementation_is_reported_not_fatal(fail_at):
    """Quick mode: the check call, one warm-up call, then per turn one
    untimed call and the timed ones; the 4th call is in the first turn."""
    calls = []
    impls = [_logging_impl("first", calls), _logging_impl("bad", calls, fail_at),
             _logging_impl("third", calls)]
    device = run_mod._Device("cpu", repeats=3, quick=True)
    record = run_mod.run_case(device, _fake_case(impls), {"copy_gbps": 1.0, "matmul_tflops": {}},
                              log=lambda line: None)
    rows = {row["detail"]: row for row in record["timings"]}
    assert rows["bad"]["error"] == "RuntimeError: boom"
    assert "median_s" not in rows["bad"]
    assert rows["first"]["repeats"] == 3 and rows["third"]["repeats"] == 3
    assert calls.count("bad") == fail_at  # never called again once it failed


def test_round_counts_split_every_call():
    for count in range(0, 30):
        shares = timing.round_counts(count, timing.ROUNDS)
        assert sum(shares) == count and max(shares) - min(shares, default=0) <= 1


class _StandInClock:
    """CUDA events of the stand-in device: host clock readings."""

    class Event:
        def record(self):
            self.at = time.perf_counter()

    @staticmethod
    def get_elapsed_time(start, end):
        return (end.at - start.at) * 1e3  # milliseconds, as CuPy returns


def _stand_in_cupy():
    """A ``cupy`` module whose arrays are NumPy arrays: with the CPU executor
    as kernel provider, cupyconv runs its CUDA kernels on them."""
    module = types.ModuleType("cupy")
    module.__getattr__ = lambda name: getattr(np, name)
    module.__version__ = "stand-in"
    module.ndarray = type("NotACupyArray", (), {})  # NumPy arrays stay NumPy arrays
    stream = types.SimpleNamespace(synchronize=lambda: None)
    module.cuda = types.SimpleNamespace(
        Event=_StandInClock.Event,
        get_elapsed_time=_StandInClock.get_elapsed_time,
        get_current_stream=lambda: stream,
        Device=lambda *args: types.SimpleNamespace(id=0, compute_capability="90"),
        runtime=types.SimpleNamespace(
            getDeviceCount=lambda: 1, getDevice=lambda: 0, runtimeGetVersion=lambda: 13000,
            getDeviceProperties=lambda i: {"name": b"CPU executor", "l2CacheSize": 2**20}),
    )
    module.random = types.SimpleNamespace(RandomState=lambda seed: types.SimpleNamespace(
        standard_normal=lambda shape, dtype: np.random.default_rng(seed).standard_normal(
            shape, dtype=dtype)), default_rng=np.random.default_rng)
    pool = types.SimpleNamespace(free_all_blocks=lambda: None)
    module.get_default_memory_pool = lambda: pool
    return module


@pytest.mark.cpu_kernels
def test_gpu_part_on_a_stand_in_device(cpu_kernels, monkeypatch, tmp_path):
    """The GPU part end to end (cases, CUDA-event timing, references, rounds,
    report) on a stand-in ``cupy`` whose arrays are NumPy arrays and whose
    kernels run in the CPU executor.  Only the device copy is replaced."""
    stand_in = _stand_in_cupy()
    monkeypatch.setitem(sys.modules, "cupy", stand_in)
    monkeypatch.setattr(cupyconv._backend, "_probe_gpu", lambda: (stand_in, None))
    monkeypatch.setattr(timing, "_device_copy", lambda pair: np.copyto(pair[1], pair[0]))
    monkeypatch.setattr(timing, "gpu_references", lambda *args, **kwargs: {
        "copy_gbps": 1.0, "copy_bytes": 1, "matmul_tflops": {"float32": 1.0}, "matmul_n": 1})
    # The training step's TF32 and float16 modes would run their tensor-core
    # kernels for minutes in the executor: test_train_step_modes_* cover them.
    monkeypatch.setattr(cases_mod, "TRAIN_MODES",
                        {"float32": cases_mod.TRAIN_MODES["float32"]})
    launched_before = sum(cpu_cuda.LAUNCHED.values())
    result = run(devices=("gpu",), quick=True, repeats=2, log=lambda line: None)
    assert sum(cpu_cuda.LAUNCHED.values()) > launched_before  # cupyconv ran its kernels
    assert result["skipped"] == [{"part": "gpu PyTorch peer",
                                  "reason": cases_mod.import_torch("gpu")[1]}]
    assert {r["op"] for r in result["results"]} == set(OPS)
    tol = result["settings"]["agreement_tolerance"]
    for record in result["results"]:
        assert record["device"] == "gpu"
        labels = {row["label"] for row in record["timings"]}
        assert "cupyconv (CUDA kernels)" in labels
        for row in record["timings"]:
            assert "error" not in row, (record["title"], row)
            assert row["repeats"] == 2 and row["peak_bytes"] is None
            assert row["max_rel_diff"] <= record.get("tolerance", tol), (record["title"], row)
    text = report.markdown(result, None, "no plot")
    assert "## GPU results" in text and "CPU executor" in text
    # Every precision mode, with its error against float64 (cupyconv only
    # here: the stand-in has no PyTorch), within each format's resolution.
    worst = {"highest": 1e-6, "3xtf32": 1e-5, "tf32": 2e-3, "float16": 2e-3, "bfloat16": 2e-2}
    modes = {}
    for record in result["results"]:
        if record["group"] == "precision":
            (row,) = [r for r in record["timings"] if r["peer"] == "cupyconv"]
            modes[record["params"]["mode"]] = row["error_vs_float64"]
    assert set(modes) == set(worst)
    assert all(0 <= modes[m] <= worst[m] for m in worst), modes
    assert modes["tf32"] > 10 * modes["3xtf32"]  # the rounding shows, and 3xTF32 removes it
    assert "GPU precision modes: conv2d on tensor cores" in text


def test_gpu_references_on_the_stand_in(monkeypatch):
    """The reference measurements' own code (copy and matmul timing)."""
    stand_in = _stand_in_cupy()
    monkeypatch.setattr(timing, "_device_copy", lambda pair: np.copyto(pair[1], pair[0]))
    refs = timing.gpu_references(stand_in, ["float32"], quick=True, repeats=1)
    assert refs["copy_gbps"] > 0 and refs["matmul_tflops"]["float32"] > 0


def test_core_speed_probe_and_uneven_cores_warning(quick_run):
    """The report shows each core's probe time and warns when they differ."""
    result = copy.deepcopy(quick_run[1])
    speeds = result["machine"]["core_speed_ms"]
    if speeds is not None:  # None where threads cannot be pinned
        assert len(speeds) == result["machine"]["cpu_cores_usable"]
        assert all(ms > 0 for ms in speeds.values())
    result["machine"]["core_speed_ms"] = {"0": 7.0, "1": 7.2}
    result["machine"]["core_speed_ms_end"] = {"0": 7.1, "1": 7.0}
    text = report.markdown(result, None, "no plot")
    assert "core 0: 7.0, core 1: 7.2" in text and "unequal speed" not in text
    result["machine"]["core_speed_ms_end"] = {"0": 7.1, "1": 10.4}
    assert "at the end of this run the cores ran at unequal speed" in report.markdown(
        result, None, "no plot")


def test_report_of_one_part_names_it(quick_run):
    """A --cpu-only or --gpu-only report says which part it holds; the CPU
    load warnings appear only where CPU times were measured."""
    result = copy.deepcopy(quick_run[1])
    result["machine"]["core_speed_ms"] = {"0": 7.0, "1": 10.4}
    text = report.markdown(result, None, "no plot")
    assert text.startswith("# Benchmarks: CPU\n") and "unequal speed" in text
    result["settings"]["devices"] = ["gpu"]
    result["results"] = []
    text = report.markdown(result, None, "no plot")
    assert text.startswith("# Benchmarks: GPU\n") and "unequal speed" not in text
    result["settings"]["devices"] = ["gpu", "cpu"]
    assert report.markdown(result, None, "no plot").startswith("# Benchmarks\n")


def test_train_step_case_has_a_per_layer_breakdown(quick_run):
    """Both models' step cases time cupyconv and PyTorch's two memory
    formats, agree on the checked step, and profile every layer of both."""
    out, result = quick_run
    records = [r for r in result["results"] if r["op"] == "train_step"]
    assert [r["params"]["model"] for r in records] == ["5day", "20day"]
    text = (out / "docs" / "benchmarks.md").read_text()
    assert "### Training step per layer (CPU)" in text
    for record in records:
        layers = {(entry["peer"], entry["detail"]): entry for entry in record["layers"]}
        phases = layers[("cupyconv", "")]["phases"]
        blocks = 2 if record["params"]["model"] == "5day" else 3
        expected = {f"block{k}.{layer} {way}" for k in range(1, blocks + 1)
                    for layer in ("conv", "bn", "act", "pool") for way in ("forward", "backward")}
        expected |= {f"{layer} {way}" for layer in ("flatten", "dropout", "fc")
                     for way in ("forward", "backward")} | {"loss", "optimizer"}
        assert set(phases) == expected
        if result["versions"]["torch"]:
            for detail in ("NCHW", "channels_last"):
                assert set(layers[("torch", detail)]["phases"]) == expected
        assert all(seconds > 0 for entry in layers.values()
                   for seconds in entry["phases"].values())
        assert f"#### {record['title']}" in text


@pytest.mark.parametrize("arch", ["5day", "20day"])
def test_train_step_twin_matches_pytorch(arch):
    """The bench's PyTorch twin, given the same dropout mask, takes the same
    step as the demo's model: loss, logits, every gradient, the weights
    after Adam; with masks of its own the losses differ.  In float64, so
    that rounding cannot flip a LeakyReLU's or a max-pool's choice."""
    torch = pytest.importorskip("torch")
    from cupyconv.bench import trainstep
    from cupyconv.demo import charts, model

    c = charts.make_charts(3, arch, seed=1)
    images = c.images[..., None] / 255.0
    net = model.PriceTrendCNN(arch, seed=2, dtype=np.float64)
    features = model.layer_shapes(arch)[-1][1][0]
    uniform = np.random.default_rng(3).random((3, features))
    layers, torch_opt = trainstep.torch_twin(torch, net, memory_format=torch.channels_last,
                                             lr=1e-3)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).contiguous(
        memory_format=torch.channels_last)
    y = torch.from_numpy(c.labels.astype(np.int64))
    with trainstep.fixed_dropout(net, uniform, torch, layers):
        loss, logits = trainstep.cupyconv_step(net, model.Adam(net, lr=1e-3), images, c.labels)
        torch_loss, torch_logits = trainstep.torch_step(torch, layers, torch_opt, x, y)
    np.testing.assert_allclose(loss, torch_loss.item(), rtol=1e-9)
    np.testing.assert_allclose(logits, torch_logits.detach().numpy(), rtol=1e-9, atol=1e-12)
    theirs = dict(layers.named_parameters())
    h, w, ch = model.layer_shapes(arch)[-2][1]
    for name, value, grad in net.parameters():
        t = theirs[name.replace(".", "_", 1) if name.startswith("block") else name]
        t_grad, t_value = t.grad.numpy(), t.detach().numpy()
        if t.ndim == 4:  # OIHW -> HWIO
            t_grad, t_value = t_grad.transpose(2, 3, 1, 0), t_value.transpose(2, 3, 1, 0)
        elif name == "fc.weight":  # (2, c*h*w) -> (h*w*c, 2)
            t_grad, t_value = (a.reshape(2, ch, h, w).transpose(2, 3, 1, 0).reshape(-1, 2)
                               for a in (t_grad, t_value))
        np.testing.assert_allclose(grad, t_grad, atol=1e-9 * np.abs(t_grad).max(),
                                   err_msg=name)
        np.testing.assert_allclose(value, t_value, atol=1e-9, err_msg=name)
    # Each library's own masks: other logits.
    _, other = trainstep.torch_step(torch, layers, torch_opt, x, y)
    _, again = trainstep.cupyconv_step(net, model.Adam(net), images, c.labels)
    assert not np.allclose(other.detach().numpy(), again, rtol=1e-3)


def test_max_rel_diff_counts_nan_and_unequal_infinities():
    """Equal infinities agree (both sides' float16 gradients overflowed);
    a nan, or an infinity against a number, is an infinite difference."""
    diff = run_mod._max_rel_diff
    ref = np.array([1.0, np.inf, -2.0])
    assert diff(np, [np.array([1.0, np.inf, -2.02])], [ref]) == pytest.approx(0.01)
    for bad in ([1.0, np.nan, -2.0], [1.0, 3.0, -2.0], [1.0, -np.inf, -2.0]):
        assert diff(np, [np.array(bad)], [ref]) == np.inf
    assert diff(np, [np.array([np.nan])], [np.array([np.nan])]) == np.inf


def _gpu_train_cases(monkeypatch):
    """The GPU's training-step cases, built (not run) with a stand-in cupy
    and PyTorch's CPU build in the place of its CUDA one."""
    torch = pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "cupy", _stand_in_cupy())
    monkeypatch.setattr(cases_mod, "import_torch", lambda device: (torch, None))
    return torch, cases_mod.build_cases("gpu", ops=("train_step",))


def test_gpu_train_step_pairs_each_precision_mode(monkeypatch):
    """On the GPU each model's step runs in float32, TF32 and float16 mixed
    precision, each case holding cupyconv in that mode and PyTorch in the
    same one (both memory formats), each with a per-layer profile; the
    contexts switch cupyconv's default precision and PyTorch's TF32."""
    torch, cases = _gpu_train_cases(monkeypatch)
    assert [c.key for c in cases] == [f"train_{m}{s}" for m in ("5day", "20day")
                                      for s in ("", "_tf32", "_float16")]
    expected = {"float32": ("", "torch", None), "tf32": ("tf32", "torch-tf32", None),
                "float16": ("float16 mixed", "torch-fp16", 2e-2)}
    for case in cases:
        detail, peer, tolerance = expected[case.params["mode"]]
        ours, *theirs = case.impls
        assert (ours.peer, ours.detail, case.tolerance) == ("cupyconv", detail, tolerance)
        assert [(t.peer, t.detail) for t in theirs] == [(peer, "NCHW"), (peer, "channels_last")]
        assert all(i.profile is not None for i in case.impls)
        assert all(i.peer in cases_mod.PEER_LABELS["gpu"] for i in case.impls)
        with ours.context():
            assert cupyconv.get_default_precision() == (
                "tf32" if case.params["mode"] == "tf32" else "highest")
        with theirs[0].context():
            conv = getattr(torch.backends.cudnn, "conv", None)
            if hasattr(conv, "fp32_precision"):
                assert conv.fp32_precision == ("tf32" if peer == "torch-tf32" else "ieee")
            else:
                assert torch.backends.cudnn.allow_tf32 == (peer == "torch-tf32")
    assert "float16 mixed precision" in cases[2].title and cases[2].matmul_mode == "float16"


@pytest.mark.parametrize("mode", ["tf32", "float16"])
def test_train_step_modes_on_the_cpu(mode, monkeypatch):
    """The TF32 and float16 training-step cases, run here on the NumPy path
    (cupyconv's TF32 rounding; its float16 mixed precision) against
    PyTorch CPU (TF32 means nothing there; float16 autocast): the checked
    step agrees within the case's tolerance, each profile names every
    phase, and the mode shows: TF32 or float16 logits differ from the
    float32 case's."""
    torch = pytest.importorskip("torch")
    monkeypatch.setitem(cases_mod.PEER_LABELS["cpu"], "torch-tf32", "PyTorch CPU")
    monkeypatch.setitem(cases_mod.PEER_LABELS["cpu"], "torch-fp16", "PyTorch CPU, float16")
    outputs = {}
    for case_mode in ("float32", mode):
        case = cases_mod.train_step_case("cpu", np, torch, "5day", 2, 1, case_mode)
        inputs = case.make_inputs(np, 0)
        ours, theirs = case.impls[:2]  # cupyconv and PyTorch NCHW
        results = []
        for impl in (ours, theirs):
            with impl.context():
                state = impl.prepare(inputs)
                results.append(impl.to_canonical(impl.run(state)))
                phases = impl.profile(state)
            assert {"loss", "optimizer", "block1.conv forward", "fc backward"} <= set(phases)
        tolerance = case.tolerance or run_mod.AGREEMENT_TOLERANCE
        assert run_mod._max_rel_diff(np, results[1], results[0]) < tolerance
        outputs[case_mode] = results[0]
    logits, logits32 = outputs[mode][1], outputs["float32"][1]
    assert logits.dtype == np.float32 and 1e-5 < np.abs(logits - logits32).max() < 1e-2


def test_report_pairs_a_precision_mode_and_its_tolerance(quick_run):
    """A float16 training-step record: its per-layer table compares
    cupyconv with PyTorch in the same mode, and its own tolerance decides
    which differences the report calls disagreements."""
    result = copy.deepcopy(quick_run[1])
    record = next(r for r in result["results"] if r["op"] == "train_step")
    record.update(title="step, float16 mixed precision", tolerance=2e-2, device="gpu")
    for entry in record["layers"]:
        if entry["peer"] == "torch":
            entry["peer"] = "torch-fp16"
            entry["phases"] = {phase: 2 * s for phase, s in
                               next(e for e in record["layers"]
                                    if e["peer"] == "cupyconv")["phases"].items()}
    for row in record["timings"]:
        row["peer"] = "torch-fp16" if row["peer"] == "torch" else row["peer"]
        row["max_rel_diff"] = 0.015 if row["peer"] == "torch-fp16" else 0.0
    record["summary"] = run_mod._summary(record["timings"])
    result["results"] = [record]
    text = report.markdown(result, None, "no plot")
    table = text[text.index("#### step, float16 mixed precision"):]
    assert "r vs faster PyTorch" in table and "| sum of phases |" in table
    sum_row = next(line for line in table.splitlines() if line.startswith("| sum of phases |"))
    assert sum_row.endswith("| 0.50 |")
    assert "0.02 in step, float16 mixed precision" in text
    assert "differs from the reference" not in text
    record["timings"][-1]["max_rel_diff"] = 0.03
    assert "differs from the reference by 3.00e-02" in report.markdown(result, None, "no plot")
