"""The runner: time every implementation of every case, check that they
agree, and collect the results, the machine and the versions into one
JSON-ready dict (schema :data:`SCHEMA`)."""

import contextlib
import datetime
import gc
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy

import cupyconv
from cupyconv.pooling import _fused

from . import cases as cases_mod
from . import timing

__all__ = ["SCHEMA", "run", "machine_info", "versions"]

SCHEMA = "cupyconv-bench/1"

#: Relative difference (max |a - b| / max |reference|) above which two
#: implementations are reported as disagreeing.  Loose enough for TF32; a
#: case may set its own (``Case.tolerance``, kept as the record's
#: ``"tolerance"``).
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


def _probe_ms(buffers):
    """One probe: a Python loop and two copies of an 8 MiB buffer (both the
    core's own speed and its access to memory count)."""
    src, dst = buffers
    start = time.perf_counter()
    total = 0
    for i in range(100_000):
        total += i
    numpy.copyto(dst, src)
    numpy.copyto(src, dst)
    return (time.perf_counter() - start) * 1e3


def core_speeds_ms():
    """Median milliseconds of a fixed single-threaded probe on each usable
    core, run pinned to it (None where threads cannot be pinned).

    On a shared virtual machine a core whose physical core is busy with
    another tenant runs slower; calls that split their work evenly across
    threads (BLAS) then wait for it, which this probe makes visible.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    buffers = (numpy.ones(2**21, numpy.float32), numpy.empty(2**21, numpy.float32))
    speeds = {}
    try:
        for core in cores:
            os.sched_setaffinity(0, {core})  # this thread only
            speeds[str(core)] = round(sorted(_probe_ms(buffers) for _ in range(5))[2], 2)
    finally:
        os.sched_setaffinity(0, cores)
    return speeds


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
    info["core_speed_ms"] = core_speeds_ms()
    backend = cupyconv.backend_info()
    info["gpu"] = backend.get("device")
    info["gpu_unavailable_reason"] = cupyconv.gpu_unavailable_reason()
    return info


def versions():
    found = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "cupyconv": cupyconv.__version__,
        "numba": _fused.numba_version(),
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
    """Largest ``max |a - b| / max |ref|`` over the outputs of one call, the
    maximum over ``ref``'s finite elements.  Equal infinities agree (a
    float16 step whose scaled gradients overflowed on both sides); a nan,
    or an infinity against anything else, is an infinite difference."""
    if len(outputs) != len(reference):
        raise ValueError(f"returned {len(outputs)} outputs, expected {len(reference)}")
    worst = 0.0
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        if tuple(out.shape) != tuple(ref.shape):
            raise ValueError(f"output {i} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        if ref.size == 0:
            continue
        out = out.astype(ref.dtype)
        scale = float(xp.abs(xp.where(xp.isfinite(ref), ref, 0)).max()) or 1.0
        with numpy.errstate(invalid="ignore"):  # inf - inf: compared by equality
            diff = float(xp.where(out == ref, 0, xp.abs(out - ref)).max())
        worst = max(worst, math.inf if math.isnan(diff) else diff / scale)
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
            return timing.gpu_references(self.xp, ["float32", "tf32", "float16", "bfloat16"],
                                         self.quick, self.repeats)
        return timing.cpu_references(self.quick, self.repeats)

    def warm_up(self, impl, states):
        """Untimed calls; returns how many timed calls ``impl`` gets."""
        if self.name == "gpu":
            per_call = timing.warm_up_gpu(impl.run, states, self.clocks[impl.clock])
        else:
            per_call = timing.warm_up_cpu(impl.run, states,
                                          0.0 if self.quick else timing.CPU_WARMUP_S)
        return timing.repeat_count(per_call, self.name, self.repeats,
                                   0.02 if self.quick else None)

    def rewarm(self, impl, states):
        """Untimed calls before a turn: one on the GPU; on the CPU for
        :data:`timing.CPU_TURN_WARMUP_S`, long enough for the previous
        turn's library to put its spinning threads to sleep."""
        if self.name == "gpu" or self.quick:
            impl.run(states[0])
        else:
            timing.warm_up_cpu(impl.run, states, timing.CPU_TURN_WARMUP_S)

    def timed(self, impl, states, count, first):
        if self.name == "gpu":
            return timing.timed_gpu(impl.run, states, self.clocks[impl.clock], count, first)
        return timing.timed_cpu(impl.run, states, count, first)

    def peak(self, impl, states):
        """Peak traced bytes of one call (CPU only; None where not traced)."""
        if self.name == "gpu" or not impl.traced:
            return None
        return timing.traced_peak(impl.run, states[0])

    def release(self):
        gc.collect()
        if self.name == "gpu":
            self.xp.get_default_memory_pool().free_all_blocks()
            if self.torch is not None:
                self.torch.cuda.empty_cache()


class _Contender:
    """One implementation of a case while it is timed: its result row, its
    own copies of the inputs and its timed calls so far."""

    def __init__(self, device, impl, sets, reference, reference64=None):
        self.impl = impl
        self.row = {"peer": impl.peer,
                    "label": cases_mod.PEER_LABELS[device.name][impl.peer],
                    "detail": impl.detail}
        self.states, self.outputs, self.times, self.count = None, None, [], 0
        self.seconds = 0.0
        started = time.perf_counter()
        with self._guard():
            with impl.context():
                self.states = [impl.prepare(s) for s in sets]
                self.outputs = impl.to_canonical(impl.run(self.states[0]))
                self.row["max_rel_diff"] = (
                    0.0 if reference is None
                    else _max_rel_diff(device.xp, self.outputs, reference))
                if reference64 is not None:
                    self.row["error_vs_float64"] = _max_rel_diff(
                        device.xp, self.outputs, reference64)
                self.count = device.warm_up(impl, self.states)
        self.seconds += time.perf_counter() - started

    @property
    def failed(self):
        return "error" in self.row

    @contextlib.contextmanager
    def _guard(self):
        """Record an exception as the row's error instead of raising: one
        failing implementation is reported, not fatal."""
        try:
            yield
        except Exception as exc:
            self.row["error"] = f"{type(exc).__name__}: {exc}"
            self.states = None

    def take_turn(self, device, count):
        """``count`` timed calls, after untimed ones that bring the
        implementation's threads and caches back from the other turns."""
        if self.failed or count == 0:
            return
        started = time.perf_counter()
        with self._guard():
            with self.impl.context():
                device.rewarm(self.impl, self.states)
                self.times += device.timed(self.impl, self.states, count,
                                           first=1 + len(self.times))
        self.seconds += time.perf_counter() - started

    def finish(self, device):
        """Fill the row from the timed calls; free the inputs."""
        if not self.failed:
            with self._guard():
                with self.impl.context():
                    peak = device.peak(self.impl, self.states)
                result = timing.Timing(self.times)
                self.row.update(median_s=result.median, min_s=result.minimum,
                                repeats=result.repeats, times_s=result.times,
                                peak_bytes=peak)
        self.states = None
        device.release()


def _add_rates(row, case, refs):
    if "median_s" not in row:
        return
    if case.bytes:
        row["gbps"] = case.bytes / row["median_s"] / 1e9
        row["pct_of_copy"] = 100 * row["gbps"] / refs["copy_gbps"]
    if case.flops:
        row["tflops"] = case.flops / row["median_s"] / 1e12
        peak = refs["matmul_tflops"].get(case.matmul_mode or case.dtype)
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
    """Time every implementation of ``case``: each is prepared, checked
    against the first (cupyconv) and warmed up, then all take turns in
    :data:`timing.ROUNDS` rounds of timed calls."""
    copies = timing.copies_for(case.input_bytes, device.cache_bytes)
    sets = [case.make_inputs(device.xp, seed) for seed in range(copies)]
    contenders, reference = [], None
    reference64 = None if case.reference64 is None else case.reference64(sets[0])
    for impl in case.impls:
        contender = _Contender(device, impl, sets, reference, reference64)
        if reference is None and contender.outputs is not None:
            reference = contender.outputs
            contender.row["reference"] = True
        contender.outputs = None
        contenders.append(contender)
    del sets, reference, reference64
    shares = [timing.round_counts(c.count, timing.ROUNDS) for c in contenders]
    for r in range(timing.ROUNDS):
        for contender, share in zip(contenders, shares):
            contender.take_turn(device, share[r] if r < len(share) else 0)
    layers = _layer_profiles(contenders, case.profile_steps) if case.profile_steps else None
    rows = []
    for contender in contenders:
        contender.finish(device)
        _add_rates(contender.row, case, refs)
        rows.append(contender.row)
        log(_progress(case, contender.row, contender.seconds))
    record = {
        "key": case.key, "op": case.op, "group": case.group, "device": case.device,
        "title": case.title, "dtype": case.dtype,
        "shapes": {k: list(v) for k, v in case.shapes.items()},
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in case.params.items()},
        "bytes": case.bytes, "flops": case.flops, "bound": case.bound, "note": case.note,
        "input_copies": copies, "timings": rows, "summary": _summary(rows),
    }
    if case.tolerance is not None:
        record["tolerance"] = case.tolerance
    if layers:
        record["layers"] = layers
    return record


def _layer_profiles(contenders, steps):
    """Per-phase medians of ``steps`` profiled calls of each implementation
    that has a ``profile``, the implementations alternating call by call
    after one untimed call each: ``[{"peer", "label", "detail", "phases":
    {phase: seconds}}]``, with ``"error"`` instead of ``"phases"`` for one
    whose profile raised (its timings stand)."""
    entries = [{"peer": c.row["peer"], "label": c.row["label"], "detail": c.row["detail"],
                "phases": {}, "contender": c}
               for c in contenders if c.impl.profile is not None and not c.failed]
    for step in range(steps + 1):
        for entry in entries:
            if "error" in entry:
                continue
            contender = entry["contender"]
            try:
                with contender.impl.context():
                    measured = contender.impl.profile(contender.states[0])
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
                continue
            for phase, seconds in measured.items() if step else ():
                entry["phases"].setdefault(phase, []).append(seconds)
    for entry in entries:
        del entry["contender"]
        if "error" in entry:
            del entry["phases"]
        else:
            entry["phases"] = {phase: statistics.median(values)
                               for phase, values in entry["phases"].items()}
    return entries


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
    log(f"single-core probe (ms per core): {result['machine']['core_speed_ms']}")
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
    result["machine"]["core_speed_ms_end"] = core_speeds_ms()
    return result
