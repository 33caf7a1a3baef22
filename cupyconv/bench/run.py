"""The runner: time every implementation of every case, check that they
agree, and collect the results, the machine and the versions into one
JSON-ready dict (schema :data:`SCHEMA`)."""

import datetime
import gc
import os
import pathlib
import platform
import sys
import time

import numpy

import cupyconv

from . import cases as cases_mod
from . import timing

__all__ = ["SCHEMA", "run", "machine_info", "versions"]

SCHEMA = "cupyconv-bench/1"

#: Relative difference (max |a - b| / max |reference|) above which two
#: implementations are reported as disagreeing.  Loose enough for TF32.
AGREEMENT_TOLERANCE = 1e-2


def _cpu_model():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_cache_bytes():
    """Last-level cache size (Linux sysfs), 32 MiB where it cannot be read."""
    caches = sorted(pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    sizes = []
    for path in caches:
        text = path.read_text().strip()
        scale = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 * 2**20)


def machine_info():
    info = {
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
    }
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    backend = cupyconv.backend_info()
    info["gpu"] = backend.get("device")
    info["gpu_unavailable_reason"] = cupyconv.gpu_unavailable_reason()
    return info


def versions():
    found = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "cupyconv": cupyconv.__version__,
    }
    torch, _ = cases_mod.import_torch("cpu")
    found["torch"] = torch.__version__ if torch is not None else None
    if torch is not None and torch.cuda.is_available():
        found["torch_cuda"] = torch.version.cuda
        found["cudnn"] = torch.backends.cudnn.version()
    if cupyconv.gpu_available():
        import cupy

        found["cupy"] = cupy.__version__
        found["cuda_runtime"] = cupyconv.backend_info()["cuda"]
    else:
        found["cupy"] = sys.modules["cupy"].__version__ if "cupy" in sys.modules else None
    try:
        import matplotlib

        found["matplotlib"] = matplotlib.__version__
    except ImportError:
        found["matplotlib"] = None
    return found


def _max_rel_diff(xp, outputs, reference):
    """Largest ``max |a - b| / max |ref|`` over the outputs of one call."""
    if len(outputs) != len(reference):
        raise ValueError(f"returned {len(outputs)} outputs, expected {len(reference)}")
    worst = 0.0
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        if tuple(out.shape) != tuple(ref.shape):
            raise ValueError(f"output {i} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        if ref.size == 0:
            continue
        scale = float(xp.abs(ref).max()) or 1.0
        diff = float(xp.abs(out.astype(ref.dtype) - ref).max())
        worst = max(worst, diff / scale)
    return worst


class _Device:
    """What the runner needs of one device: module, clocks, cache, cleanup."""

    def __init__(self, name, repeats, quick):
        self.name = name
        self.repeats = repeats
        self.quick = quick
        self.torch, _ = cases_mod.import_torch(name)
        if name == "gpu":
            import cupy

            self.xp = cupy
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            self.cache_bytes = props["l2CacheSize"]
            self.clocks = {"cupy": timing.CupyClock(cupy)}
            if self.torch is not None:
                self.clocks["torch"] = timing.TorchClock(self.torch)
        else:
            self.xp = numpy
            self.cache_bytes = _cpu_cache_bytes()
            self.clocks = {}

    def references(self):
        if self.name == "gpu":
            return timing.gpu_references(self.xp, ["float32"], self.quick, self.repeats)
        return timing.cpu_references(self.quick, self.repeats)

    def time(self, impl, states):
        if self.name == "gpu":
            kwargs = {"target_s": 0.02} if self.quick else {}
            return timing.time_gpu(impl.run, states, self.clocks[impl.clock],
                                   self.repeats, **kwargs), None
        kwargs = {"target_s": 0.02, "warmup_s": 0.0} if self.quick else {}
        result = timing.time_cpu(impl.run, states, self.repeats, **kwargs)
        peak = timing.traced_peak(impl.run, states[0]) if impl.traced else None
        return result, peak

    def release(self):
        gc.collect()
        if self.name == "gpu":
            self.xp.get_default_memory_pool().free_all_blocks()
            if self.torch is not None:
                self.torch.cuda.empty_cache()


def _time_impl(device, case, impl, sets, reference):
    """One implementation on one case -> (row dict, its canonical outputs)."""
    row = {"peer": impl.peer, "label": cases_mod.PEER_LABELS[device.name][impl.peer],
           "detail": impl.detail}
    outputs = None
    try:
        with impl.context():
            states = [impl.prepare(s) for s in sets]
            outputs = impl.to_canonical(impl.run(states[0]))
            row["max_rel_diff"] = (0.0 if reference is None
                                   else _max_rel_diff(device.xp, outputs, reference))
            result, peak = device.time(impl, states)
        del states
    except Exception as exc:  # a failing implementation is reported, not fatal
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row, None
    finally:
        device.release()
    row.update(median_s=result.median, min_s=result.minimum, repeats=result.repeats,
               times_s=result.times, peak_bytes=peak)
    return row, outputs


def _add_rates(row, case, refs):
    if "median_s" not in row:
        return
    if case.bytes:
        row["gbps"] = case.bytes / row["median_s"] / 1e9
        row["pct_of_copy"] = 100 * row["gbps"] / refs["copy_gbps"]
    if case.flops:
        row["tflops"] = case.flops / row["median_s"] / 1e12
        peak = refs["matmul_tflops"].get(case.dtype)
        if peak:
            row["pct_of_matmul"] = 100 * row["tflops"] / peak


def _summary(rows):
    """Best variant per peer, and cupyconv's time divided by each peer's."""
    best = {}
    for row in rows:
        if "median_s" in row and (row["peer"] not in best
                                  or row["median_s"] < best[row["peer"]]["median_s"]):
            best[row["peer"]] = row
    ours = best.get("cupyconv")
    summary = {}
    for peer, row in best.items():
        entry = {"median_s": row["median_s"], "detail": row["detail"]}
        if ours is not None and peer != "cupyconv":
            entry["ratio"] = ours["median_s"] / row["median_s"]
        summary[peer] = entry
    return summary


def run_case(device, case, refs, log):
    copies = timing.copies_for(case.input_bytes, device.cache_bytes)
    sets = [case.make_inputs(device.xp, seed) for seed in range(copies)]
    rows, reference = [], None
    for impl in case.impls:
        started = time.perf_counter()
        row, outputs = _time_impl(device, case, impl, sets, reference)
        if reference is None and outputs is not None:
            reference = outputs
            row["reference"] = True
        _add_rates(row, case, refs)
        rows.append(row)
        log(_progress(case, row, time.perf_counter() - started))
    del sets, reference
    device.release()
    record = {
        "key": case.key, "op": case.op, "group": case.group, "device": case.device,
        "title": case.title, "dtype": case.dtype,
        "shapes": {k: list(v) for k, v in case.shapes.items()},
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in case.params.items()},
        "bytes": case.bytes, "flops": case.flops, "bound": case.bound, "note": case.note,
        "input_copies": copies, "timings": rows, "summary": _summary(rows),
    }
    return record


def _progress(case, row, seconds):
    what = f"[{case.device}] {case.title} | {row['label']}"
    if row["detail"]:
        what += f" ({row['detail']})"
    if "error" in row:
        return f"{what}: FAILED {row['error']}"
    return f"{what}: {row['median_s'] * 1e3:.3f} ms median of {row['repeats']} ({seconds:.1f} s)"


def _passive_openmp():
    """Ask PyTorch's OpenMP workers to sleep, not spin, between calls.

    Spinning workers starve NumPy's BLAS threads in the same process on
    machines with few cores, and every call then waits for scheduler ticks
    (calls measured 10-100x too slow on 2 cores).  Only possible before
    PyTorch is imported; an explicit ``OMP_WAIT_POLICY`` is kept.
    Returns the policy in force, or a note that it could not be set.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return os.environ["OMP_WAIT_POLICY"]
    return os.environ.get("OMP_WAIT_POLICY",
                          "unset (PyTorch was imported before the benchmark started)")


def run(devices=("cpu", "gpu"), ops=cases_mod.OPS, quick=False, repeats=None, log=print):
    """Run the benchmark and return the JSON-ready result dict."""
    started = time.perf_counter()
    omp_wait_policy = _passive_openmp()
    result = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m cupyconv.bench"] + sys.argv[1:]),
        "settings": {"devices": list(devices), "ops": list(ops), "quick": quick,
                     "repeats": repeats, "agreement_tolerance": AGREEMENT_TOLERANCE,
                     "omp_wait_policy": omp_wait_policy},
        "machine": machine_info(),
        "versions": versions(),
        "references": {},
        "skipped": [],
        "results": [],
    }
    for name in devices:
        if name == "gpu" and not cupyconv.gpu_available():
            result["skipped"].append({"part": "gpu", "reason": cupyconv.gpu_unavailable_reason()})
            log(f"GPU part skipped: {cupyconv.gpu_unavailable_reason()}")
            continue
        torch, why = cases_mod.import_torch(name)
        if torch is None:
            result["skipped"].append({"part": f"{name} PyTorch peer", "reason": why})
            log(f"{name.upper()}: PyTorch peer skipped: {why}")
        device = _Device(name, repeats, quick)
        refs = device.references()
        result["references"][name] = refs
        log(f"[{name}] reference: copy {refs['copy_gbps']:.1f} GB/s, float32 matmul "
            f"{refs['matmul_tflops']['float32']:.3f} TFLOP/s")
        for case in cases_mod.build_cases(name, ops, quick):
            result["results"].append(run_case(device, case, refs, log))
    result["wall_s"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_end"] = list(os.getloadavg())
    return result
