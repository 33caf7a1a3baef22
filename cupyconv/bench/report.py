"""Turn a result dict (see :mod:`cupyconv.bench.run`) into the stdout table,
the Markdown report and the ratio plot.  Everything here reads the data;
nothing is measured."""

import os
import pathlib

from . import timing
from .cases import PEER_LABELS

__all__ = ["text_table", "markdown", "plot_ratios", "slower_cases"]

DEVICE_NAMES = {"gpu": "GPU", "cpu": "CPU"}


def fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(row, device):
    """Throughput of one timing row: TFLOP/s (GFLOP/s on the CPU) for
    convolutions, GB/s for memory-bound ops, with % of the reference."""
    if "tflops" in row:
        value = row["tflops"] * (1e3 if device == "cpu" else 1)
        unit = "GFLOP/s" if device == "cpu" else "TFLOP/s"
        text = f"{value:.3g} {unit}"
        if "pct_of_matmul" in row:
            text += f" ({row['pct_of_matmul']:.0f}% of matmul)"
        return text
    if "gbps" in row:
        return f"{row['gbps']:.3g} GB/s ({row['pct_of_copy']:.0f}% of copy)"
    return "-"


def _peers(results, device):
    present = {p for r in results if r["device"] == device for p in r["summary"]}
    return [p for p in PEER_LABELS[device] if p in present and p != "cupyconv"]


def _best_row(record, peer):
    best = record["summary"].get(peer)
    if best is None:
        return None
    for row in record["timings"]:
        if row["peer"] == peer and row.get("median_s") == best["median_s"]:
            return row
    return None


def _peer_cell(record, peer, bold=False):
    entry = record["summary"].get(peer)
    if entry is None:
        errors = [r["error"] for r in record["timings"] if r["peer"] == peer and "error" in r]
        return "failed" if errors else "n/a"
    text = fmt_time(entry["median_s"])
    if entry["detail"]:
        text += f", {entry['detail']}"
    if "ratio" in entry:
        ratio = f"{entry['ratio']:.2f}"
        text += f" ({'**' + ratio + '**' if bold and entry['ratio'] > 1 else ratio})"
    return text


def _ours_cell(record, device):
    row = _best_row(record, "cupyconv")
    if row is None:
        return "failed", "-"
    text = fmt_time(row["median_s"])
    if row.get("detail"):  # which of cupyconv's variants was fastest
        text += f", {row['detail']}"
    return text, fmt_rate(row, device)


def _table_rows(results, device, groups, bold):
    peers = _peers(results, device)
    header = ["case", PEER_LABELS[device]["cupyconv"]] + [
        PEER_LABELS[device][p] for p in peers] + ["cupyconv rate"]
    rows = []
    for record in results:
        if record["device"] != device or record["group"] not in groups:
            continue
        ours, rate = _ours_cell(record, device)
        rows.append([record["title"], ours]
                    + [_peer_cell(record, p, bold) for p in peers] + [rate])
    return header, rows


def _devices(result):
    return [d for d in ("gpu", "cpu") if any(r["device"] == d for r in result["results"])]


MAIN_GROUPS = ("memory", "seed", "resnet", "train")


def text_table(result):
    """Plain-text tables for the terminal, one per device."""
    lines = []
    for skipped in result["skipped"]:
        lines.append(f"skipped {skipped['part']}: {skipped['reason']}")
    for device in _devices(result):
        header, rows = _table_rows(result["results"], device,
                                   MAIN_GROUPS + ("sweep",), bold=False)
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        lines.append("")
        lines.append(f"{DEVICE_NAMES[device]} (peer cells: median time (cupyconv time / peer time))")
        for cells in [header, ["-" * w for w in widths]] + rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
    lines.append("")
    lines.append(f"total wall time {result['wall_s']:.1f} s")
    return "\n".join(lines)


def slower_cases(result):
    """``(device, title, peer label, detail, ratio, ours_s, peer_s)`` for every
    case where cupyconv's median is above a peer's, largest ratio first."""
    found = []
    for record in result["results"]:
        ours = record["summary"].get("cupyconv")
        for peer, entry in record["summary"].items():
            if entry.get("ratio", 0) > 1:
                found.append((record["device"], record["title"],
                              PEER_LABELS[record["device"]][peer], entry["detail"],
                              entry["ratio"], ours["median_s"], entry["median_s"]))
    return sorted(found, key=lambda item: -item[4])


def _md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _machine_section(result):
    m, v = result["machine"], result["versions"]
    rows = [
        ["date (UTC)", result["created"]],
        ["command", f"`{result['command']}`"],
        ["total wall time", f"{result['wall_s']:.0f} s"],
        ["CPU", f"{m['cpu_model']}, {m['cpu_cores']} cores"
                + (f", {m['memory_gib']} GiB RAM" if "memory_gib" in m else "")],
        ["GPU", m["gpu"] or f"none ({m['gpu_unavailable_reason']})"],
        ["platform", m["platform"]],
    ]
    for key, when in (("load_average", "start"), ("load_average_end", "end")):
        if m.get(key):
            rows.append([f"load average at {when} (1, 5, 15 min)",
                         ", ".join(f"{v:.2f}" for v in m[key])])
    for key, when in (("core_speed_ms", "start"), ("core_speed_ms_end", "end")):
        if m.get(key):
            rows.append([f"single-core probe at {when} (ms per core, lower is faster)",
                         ", ".join(f"core {c}: {ms:.1f}" for c, ms in m[key].items())])
    rows.append(["OMP_WAIT_POLICY", result["settings"].get("omp_wait_policy", "-")])
    rows += [[name, value if value is not None else "not installed"]
             for name, value in v.items()]
    return _md_table(["", ""], rows)


def _references_section(result):
    rows = []
    for device, refs in result["references"].items():
        rows.append([DEVICE_NAMES[device],
                     f"{refs['copy_gbps']:.1f} GB/s ({refs['copy_bytes'] / 2**20:.0f} MiB copy)",
                     ", ".join(f"{rate:.3g} TFLOP/s {mode}"
                               for mode, rate in refs["matmul_tflops"].items())
                     + f" ({refs['matmul_n']}x{refs['matmul_n']})"])
    return _md_table(["device", "copy bandwidth (read + write)", "matmul"], rows)


def _memory_section(results):
    peers = [p for p in ("cupyconv", "plain", "loop") if any(
        p in r["summary"] for r in results if r["device"] == "cpu")]
    rows = []
    for record in results:
        if record["device"] != "cpu" or record["group"] == "sweep":
            continue
        cells = [record["title"]]
        for peer in peers:
            row = _best_row(record, peer)
            peak = row.get("peak_bytes") if row else None
            cells.append(f"{peak / 1e6:.1f}" if peak is not None else "-")
        rows.append(cells)
    return _md_table(["case"] + [f"{PEER_LABELS['cpu'][p]} peak MB" for p in peers], rows)


def _variants_section(results, device):
    """Every variant of cupyconv in the cases that time several (the tables
    above show the fastest), against PyTorch's faster memory format."""
    rows = []
    for record in results:
        if record["device"] != device:
            continue
        ours = [r for r in record["timings"] if r["peer"] == "cupyconv" and "median_s" in r]
        torch = record["summary"].get("torch")
        for row in ours if len(ours) > 1 else ():
            ratio = f"{row['median_s'] / torch['median_s']:.2f}" if torch else "-"
            rows.append([record["title"], row["detail"] or "default", fmt_time(row["median_s"]),
                         ratio])
    if not rows:
        return []
    return _md_table(["case", "cupyconv variant", "median time", "r vs PyTorch"], rows)


def _precision_section(results, device):
    """The "precision" group: each mode against cuDNN in the matching mode
    (the only PyTorch peer of those cases), with both errors against float64."""
    rows = []
    for record in results:
        if record["device"] != device or record["group"] != "precision":
            continue
        ours = _best_row(record, "cupyconv")
        peer = next((p for p in ("torch", "torch-tf32") if p in record["summary"]), None)
        theirs = _best_row(record, peer) if peer else None

        def error(row):
            return f"{row['error_vs_float64']:.1e}" if row and "error_vs_float64" in row else "-"
        rows.append([
            record["title"],
            fmt_time(ours["median_s"]) if ours else "failed",
            _peer_cell(record, peer, bold=True) if peer else "n/a",
            error(ours), error(theirs),
            fmt_rate(ours, device) if ours else "-",
        ])
    return _md_table(["case", "cupyconv", "cuDNN, matching mode (r)", "cupyconv error",
                      "cuDNN error", "cupyconv rate"], rows)


def _sweep_section(results, device):
    rows = []
    for record in results:
        if record["device"] != device or record["group"] != "sweep":
            continue
        n = record["shapes"]["x"][0]
        ours = _best_row(record, "cupyconv")
        torch = record["summary"].get("torch")
        rows.append([
            n,
            fmt_time(ours["median_s"]) if ours else "failed",
            fmt_time(ours["median_s"] / n) if ours else "-",
            fmt_rate(ours, device) if ours else "-",
            (fmt_time(torch["median_s"]) + (f", {torch['detail']}" if torch["detail"] else ""))
            if torch else "n/a",
            f"{torch['ratio']:.2f}" if torch and "ratio" in torch else "-",
        ])
    return _md_table(["N", "cupyconv", "cupyconv per sample", "cupyconv rate",
                      PEER_LABELS[device]["torch"], "ratio"], rows)


def _layers_section(record):
    """The per-layer breakdown of a training-step case: each phase's median
    time per implementation, and cupyconv's over PyTorch's faster variant
    (both in the case's precision mode)."""
    entries = [e for e in record.get("layers", ()) if "phases" in e]
    ours = next((e for e in entries if e["peer"] == "cupyconv"), None)
    if ours is None:
        return []
    torch = [e for e in entries if e["peer"].startswith("torch")]
    header = ["phase"] + [e["label"] + (f" ({e['detail']})" if e["detail"] else "")
                          for e in entries]
    if torch:
        header.append("r vs faster PyTorch")
    rows = []
    for phase in list(ours["phases"]) + ["sum of phases"]:
        def seconds(entry):
            if phase == "sum of phases":
                return sum(entry["phases"].values())
            return entry["phases"].get(phase)
        cells = [phase] + [fmt_time(seconds(e)) for e in entries]
        if torch:
            theirs = min((seconds(e) for e in torch if seconds(e)), default=None)
            cells.append(f"{seconds(ours) / theirs:.2f}" if theirs else "-")
        rows.append(cells)
    failed = [f"{e['label']} ({e['detail']}): `{e['error']}`"
              for e in record.get("layers", ()) if "error" in e]
    notes = [f"Profile failed: {', '.join(failed)}.", ""] if failed else []
    return [f"#### {record['title']}", "", *notes, *_md_table(header, rows), ""]


def _problems_section(result):
    tol = result["settings"]["agreement_tolerance"]
    lines, own = [], {}
    for record in result["results"]:
        if "tolerance" in record:
            own[record["title"]] = record["tolerance"]
        for row in record["timings"]:
            where = f"{DEVICE_NAMES[record['device']]}, {record['title']}, {row['label']}" + (
                f" ({row['detail']})" if row["detail"] else "")
            if "error" in row:
                lines.append(f"- {where}: failed: `{row['error']}`")
            elif row.get("max_rel_diff", 0) > record.get("tolerance", tol):
                lines.append(f"- {where}: result differs from the reference by "
                             f"{row['max_rel_diff']:.2e} (relative)")
    if not lines:
        exceptions = "; ".join(f"{t:g} in {title}" for title, t in own.items())
        lines.append(f"Every implementation ran, and all agreed with the first one "
                     f"(cupyconv) within {tol:g} relative difference"
                     + (f" ({exceptions})" if exceptions else "") + ".")
    return lines


def _busy_warning(result):
    """A warning when other processes competed for the CPU during the run."""
    m = result["machine"]
    loads = [m[k][0] for k in ("load_average", "load_average_end") if m.get(k)]
    cores = m.get("cpu_cores_usable") or m.get("cpu_cores") or 1
    if not loads or max(loads) <= cores:
        return None
    return (f"**Note:** the machine was shared with other work during this run (1-minute "
            f"load average up to {max(loads):.1f} on {cores} cores), so CPU times include "
            f"waits for a core; multi-threaded calls (BLAS, PyTorch) suffer most. The JSON "
            f"keeps every per-call time for a closer look.")


#: Cores whose probe times differ by more than this factor are unequal.
UNEVEN_CORES = 1.2


def _uneven_cores_warning(result):
    """A warning when some core ran slower than another at the start or end."""
    m = result["machine"]
    for key, when in (("core_speed_ms", "start"), ("core_speed_ms_end", "end")):
        speeds = list((m.get(key) or {}).values())
        if len(speeds) > 1 and max(speeds) > UNEVEN_CORES * min(speeds):
            return (f"**Note:** at the {when} of this run the cores ran at unequal speed "
                    f"(single-core probe {min(speeds):.1f} to {max(speeds):.1f} ms; on a "
                    f"virtual machine another tenant shares the slower one). Calls that "
                    f"split their work evenly across threads wait for the slowest core: "
                    f"OpenBLAS, which cupyconv's NumPy conv2d uses, more than PyTorch.")
    return None


def markdown(result, plot_path=None, plot_note=None, report_path=None):
    """The benchmarks page; ``plot_path`` is linked relative to ``report_path``."""
    devices = result["settings"]["devices"]
    title = "Benchmarks" + (f": {DEVICE_NAMES[devices[0]]}" if len(devices) == 1 else "")
    out = [
        f"# {title}",
        "",
        "<!-- Generated by `python -m cupyconv.bench --report`; do not edit by hand. -->",
        "",
        "cupyconv against what a user would otherwise write, on the same inputs, "
        "from one run of `python -m cupyconv.bench`. Peer cells read "
        "`median time, best variant (r)` with **r = cupyconv time / peer time**: "
        "r < 1 means cupyconv is faster, **r > 1 (bold) means cupyconv is slower**. "
        "PyTorch runs in both NCHW and channels_last memory formats and the faster "
        "is shown. \"rate\" is cupyconv's throughput: GB/s of compulsory traffic for "
        "memory-bound ops (as a share of the measured copy bandwidth) and "
        "FLOP/s for convolutions (as a share of the measured float32 matmul). "
        "All data is float32, except in the cases that name another precision "
        "(on the GPU: TF32, float16, bfloat16), which are compared with PyTorch "
        "in the same precision.",
        "",
        "## Machine and versions",
        "",
        *_machine_section(result),
        "",
        "## Reference rates measured in the same run",
        "",
        *_references_section(result),
        "",
    ]
    cpu_ran = "cpu" in devices
    for warning in (_busy_warning(result), _uneven_cores_warning(result)):
        if warning and cpu_ran:  # host contention barely moves GPU times
            out += [warning, ""]
    for skipped in result["skipped"]:
        out += [f"**Skipped {skipped['part']}:** {skipped['reason']}", ""]
    for device in _devices(result):
        name = DEVICE_NAMES[device]
        header, rows = _table_rows(result["results"], device, MAIN_GROUPS, bold=True)
        out += [f"## {name} results", "", *_md_table(header, rows), ""]
        if device == "cpu":
            out += [
                "The naive loops run at the same sizes as everything else (none had to be "
                "reduced): a Python loop over (h, w) positions for dilate/undilate, over "
                "output windows for the pool, and over kernel taps (one matmul each, at "
                "stride 1, then subsampled, as in the seed project) for conv2d.",
                "",
                "### Peak memory of one call (CPU, tracemalloc)",
                "",
                "PyTorch allocates outside Python's tracemalloc, so it has no column.",
                "",
                *_memory_section(result["results"]),
                "",
            ]
        variants = _variants_section(result["results"], device)
        if variants:
            out += [f"### Every cupyconv variant ({name})", "",
                    "Where a case times several ways of calling cupyconv, the table above "
                    "shows the fastest; here are all of them.", "", *variants, ""]
        layers = [line for record in result["results"] if record["device"] == device
                  for line in _layers_section(record)]
        if layers:
            out += [f"### Training step per layer ({name})", "",
                    "Medians of profiled steps, the implementations alternating step by "
                    "step; each layer's forward and backward timed alone (PyTorch's "
                    "modules joined by detached tensors, so that a backward runs "
                    "through one module), so the phases add up to a little more than "
                    "the step in the table above.", "", *layers]
        sweep = _sweep_section(result["results"], device)
        if len(sweep) > 2:
            out += [f"### {name} batch sweep: conv2d forward, seed L2 layer", "", *sweep, ""]
        precision = _precision_section(result["results"], device)
        if len(precision) > 2:
            out += [f"### {name} precision modes: conv2d on tensor cores", "",
                    "Each float32 mode (`precision=`) and 16-bit dtype against cuDNN in the "
                    "matching mode: TF32 on for tf32, off for highest and 3xtf32, the same "
                    "dtype for float16 and bfloat16. Errors are max |result - float64| / "
                    "max |float64| over the outputs; the rate is a share of the measured "
                    "matmul rate in the same mode (cuBLAS TF32 for tf32 and 3xtf32).",
                    "", *precision, ""]
    out += ["## Where cupyconv is slower", ""]
    slower = slower_cases(result)
    if slower:
        out += ["Every case where a peer's median time beats cupyconv's, largest ratio first:", ""]
        for device, title, label, detail, ratio, ours, theirs in slower:
            peer = f"{label} ({detail})" if detail else label
            out.append(f"- {DEVICE_NAMES[device]}, {title}: cupyconv takes **{ratio:.2f}x** "
                       f"the time of {peer} ({fmt_time(ours)} vs {fmt_time(theirs)}).")
    else:
        out.append("cupyconv was at least as fast as every peer in every case of this run.")
    out += ["", "## Failures and disagreements", "", *_problems_section(result), ""]
    out += ["## Plot", ""]
    if plot_path is not None:
        rel = os.path.relpath(plot_path, pathlib.Path(report_path).parent) if report_path else plot_path
        out += [f"![cupyconv time / peer time per case]({pathlib.Path(rel).as_posix()})", ""]
    else:
        out += [plot_note or "No plot was made.", ""]
    out += [
        "## Method",
        "",
        "See the docstring of `cupyconv.bench` for the full method. In short: inputs "
        "are generated once per case and several copies are cycled so that no call "
        "starts on data the previous call left in cache; every implementation is "
        "warmed up first, then the implementations of a case take turns in "
        f"{timing.ROUNDS} rounds (each turn after untimed calls) so that a drift in "
        "the machine's speed hits them alike; CPU times are `time.perf_counter` "
        "medians, GPU times are medians of per-call CUDA event intervals. Every "
        "implementation's result is checked against cupyconv's before it is timed. "
        "Per-call times of every variant are in the JSON output (`--json`).",
        "",
    ]
    return "\n".join(out)


def plot_ratios(result, path):
    """Horizontal bars of cupyconv time / peer time (log scale), one per case
    and peer; returns None, or a note saying why no plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("No plot: matplotlib is not installed "
                "(the plot extra, `pip install \".[plot]\"` in a checkout, adds it).")
    groups = []  # (label, [(peer key, ratio)]) per case, peers in table order
    for record in result["results"]:
        if record["group"] == "sweep":
            continue
        device = record["device"]
        ratios = [(f"{device}:{peer}", record["summary"][peer]["ratio"])
                  for peer in PEER_LABELS[device] if "ratio" in record["summary"].get(peer, {})]
        if ratios:
            groups.append((f"{DEVICE_NAMES[device]}: {record['title']}", ratios))
    if not groups:
        return "No plot: no case has both a cupyconv and a peer timing."
    keys = list(dict.fromkeys(key for _, ratios in groups for key, _ in ratios))
    colors = dict(zip(keys, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(groups) + 1.8))
    width = 0.8 / max(len(r) for _, r in groups)
    for i, (_, ratios) in enumerate(groups):
        for j, (key, ratio) in enumerate(ratios):
            ax.barh(i - 0.4 + (j + 0.5) * width, ratio, height=width, color=colors[key])
    ax.set_yticks(range(len(groups)), [label for label, _ in groups], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("cupyconv time / peer time (log scale; left of 1: cupyconv faster)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in keys]
    names = [f"{DEVICE_NAMES[k.split(':')[0]]} vs {PEER_LABELS[k.split(':')[0]][k.split(':')[1]]}"
             for k in keys]
    ax.legend(handles, names, fontsize=7, loc="best")
    ax.set_title("cupyconv relative to each peer (same inputs, same run)")
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None
