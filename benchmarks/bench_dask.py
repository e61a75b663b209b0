#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Wall time and speed-up of the pPXF baseline: serial, then 1 and 2 dask workers.

The script prepares M bins (``--n-bins``, default 32) of a mock observation
(`cubesfh.synthesis.mock_observation`, see ``bench_stages.py``): the M
spaxels of highest S/N of a small cube, each its own bin, with their HST
photometry, and the kinematics read from the mock's true velocity and
dispersion maps (no pPXF kinematic fit is needed to time the baseline). It
then fits the stellar populations of every bin with
`cubesfh.pipeline.run_baseline` (pPXF, `cubesfh.baseline.fit_population`,
spread with `cubesfh.parallel.map_bins`), in one run of the script:

* ``serial``: ``scheduler='serial'``, in this process, no dask (reference);
* a ``LocalCluster`` of 1, then 2 workers (``--workers``), started as
  `cubesfh.parallel.dask_client` starts it (single-threaded worker
  processes, glibc's own malloc thresholds, no task profiler). The start-up (cluster, then
  importing `cubesfh.baseline` and pPXF on every worker) is timed apart from
  the fits; the total is what a user waits;
* with ``--dask-defaults``, also a ``LocalCluster`` of the largest size with
  dask's default worker settings (``MALLOC_TRIM_THRESHOLD_=65536``, the
  task profiler) and the page-fault guard of `cubesfh.parallel` switched
  off on its workers: what cubesfh 0.1 ran on, to show what they cost;
* ``--scheduler ADDRESS``: an existing dask cluster (e.g.
  ``tcp://10.0.0.5:8786``), in addition (``--no-local`` to skip the local
  runs).

The templates are built (and cached) before the first run, so no run pays
for them. `~cubesfh.parallel.map_bins` sends the bins in chunks of
`~cubesfh.parallel.default_chunk_size` bins (1 per task up to 64 bins,
``--chunk-size N`` to impose N): the "ideal" column is the best speed-up over
one worker that this number of tasks allows. The results of every run are
compared with the serial run (they must be identical: the fits are
deterministic).

The machine's load average is printed before and after each run: on a
shared machine, rerun when it is not near zero.

Example (the run of ``docs/performance.rst``)::

    python benchmarks/bench_dask.py --n-bins 32 --json dask.json

Smoke test::

    python benchmarks/bench_dask.py --n-bins 4
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from astropy import units as u

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stages import (
    SYSTEMIC_VELOCITY_KMS,
    add_mock_arguments,
    collect_warnings,
    command_line,
    describe_machine,
    format_table,
    generate_observation,
    machine_info,
    peak_rss_mib,
    print_warnings,
    read_observation,
    work_directory,
    write_json,
    write_kinematics_maps,
)


def prepare_bins(workdir, n_bins, *, snr, seed, caught):
    """A `~cubesfh.preprocess.PreparedObservation` of the ``n_bins`` brightest spaxels."""
    from cubesfh.preprocess import prepare_observation

    obs, gen_seconds = generate_observation(workdir, 4 * n_bins, snr=snr, seed=seed)
    cube, hst = read_observation(obs)
    signal, noise = cube.signal_noise(progress_bar=False)
    with np.errstate(invalid="ignore", divide="ignore"):
        spaxel_snr = np.asarray(getattr(signal, "value", signal) / getattr(noise, "value", noise))
    spaxel_snr = np.where(np.isfinite(spaxel_snr), spaxel_snr, -np.inf)
    order = np.argsort(spaxel_snr, axis=None)[::-1][:n_bins]
    keep = np.zeros(spaxel_snr.shape, dtype=bool)
    keep.flat[order] = True
    target = float(spaxel_snr.flat[order].min()) * 0.999
    maps = write_kinematics_maps(obs.truth_path, workdir / "true_kinematics_maps.fits")
    with collect_warnings(caught):
        prepared = prepare_observation(cube, hst, target_snr=target, mask=~keep,
                                       kinematics=maps,
                                       redshift=SYSTEMIC_VELOCITY_KMS * u.km / u.s,
                                       progress_bar=False)
    return prepared, gen_seconds, cube.spatial_shape


def fit(prepared, client_or_scheduler, chunk_size):
    """Run the baseline on every usable bin; return the per-bin results."""
    from cubesfh.pipeline import run_baseline

    return run_baseline(prepared, scheduler=client_or_scheduler, chunk_size=chunk_size,
                        progress_bar=False)


def max_difference(a, b):
    """Largest absolute difference between two runs' mass fractions and mean ages."""
    diffs = []
    for key in ("mass_fraction", "logage_mw", "logage_lw", "zh_mw"):
        x, y = np.asarray(a[key], float), np.asarray(b[key], float)
        both = np.isfinite(x) & np.isfinite(y)
        if (np.isfinite(x) != np.isfinite(y)).any():
            return math.inf
        if both.any():
            diffs.append(float(np.max(np.abs(x[both] - y[both]))))
    return max(diffs) if diffs else 0.0


def warm_worker():
    """Import what the fits need, on a worker (timed as part of the start-up)."""
    import ppxf.ppxf  # noqa: F401

    import cubesfh.baseline  # noqa: F401

    return True


def disable_malloc_guard():
    """On a worker: switch off the page-fault guard of cubesfh.parallel (``--dask-defaults``)."""
    from cubesfh import parallel

    parallel._malloc_state["settings"] = None
    return True


def cpu_seconds():
    """User + system CPU seconds of this process so far (on a worker: of the worker)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def timed_cluster_run(prepared, client, n_expected, chunk_size, t0, *, malloc_guard=True):
    """Warm the workers, fit, and return the result and the timings (from ``t0``)."""
    if n_expected:
        client.wait_for_workers(n_expected)
    t1 = time.perf_counter()
    client.run(warm_worker)
    if not malloc_guard:
        client.run(disable_malloc_guard)
    t1w = time.perf_counter()
    cpu0 = client.run(cpu_seconds)
    result = fit(prepared, client, chunk_size)
    t2 = time.perf_counter()
    cpu1 = client.run(cpu_seconds)
    cpu = sum(cpu1[w] - cpu0.get(w, 0.0) for w in cpu1)
    return result, {"cluster_s": t1 - t0, "imports_s": t1w - t1, "startup_s": t1w - t0,
                    "fit_s": t2 - t1w, "fit_cpu_s": cpu}


def run_local(prepared, n_workers, chunk_size):
    """Start a LocalCluster as cubesfh.parallel does, fit, close; return the timings."""
    from cubesfh.parallel import dask_client

    t0 = time.perf_counter()
    with dask_client(None, n_workers=n_workers) as client:
        result, times = timed_cluster_run(prepared, client, n_workers, chunk_size, t0)
        t2 = time.perf_counter()
    times["shutdown_s"] = time.perf_counter() - t2
    return result, times


def run_local_dask_defaults(prepared, n_workers, chunk_size):
    """A LocalCluster with dask's default worker settings and no guard (cubesfh 0.1)."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    try:
        with Client(cluster, set_as_default=False) as client:
            result, times = timed_cluster_run(prepared, client, n_workers, chunk_size, t0,
                                              malloc_guard=False)
            t2 = time.perf_counter()
    finally:
        cluster.close()
    times["shutdown_s"] = time.perf_counter() - t2
    return result, times


def run_remote(prepared, address, chunk_size):
    """Fit on an existing cluster; return the timings and its number of workers."""
    from cubesfh.parallel import dask_client

    t0 = time.perf_counter()
    with dask_client(address) as client:
        workers = client.scheduler_info()["workers"]
        threads = sum(w.get("nthreads", 1) for w in workers.values())
        result, times = timed_cluster_run(prepared, client, 0, chunk_size, t0)
        t2 = time.perf_counter()
    times["shutdown_s"] = time.perf_counter() - t2
    return result, len(workers), threads, times


def run(args):
    from cubesfh.baseline import templates_at
    from cubesfh.parallel import default_chunk_size
    from cubesfh.pipeline import UNUSABLE, _bin_targets

    info = machine_info()
    caught = {}
    with work_directory(args.workdir, keep=args.keep) as workdir:
        prepared, gen_seconds, shape = prepare_bins(workdir, args.n_bins, snr=args.snr,
                                                    seed=args.seed, caught=caught)
    usable = (prepared.flags & UNUSABLE) == 0
    n_usable = int(np.count_nonzero(usable))
    chunk = args.chunk_size or default_chunk_size(n_usable)
    n_chunks = math.ceil(n_usable / chunk)
    print(f"{prepared.n_bins} bins of a {shape[0]} x {shape[1]} mock cube "
          f"({n_usable} usable), {n_chunks} task(s) of {chunk} bin(s); mock written in "
          f"{gen_seconds:.1f} s", flush=True)

    t0 = time.perf_counter()
    for st in np.unique(_bin_targets(prepared)[usable]):
        templates_at(float(st))
    templates_s = time.perf_counter() - t0
    print(f"templates built in {templates_s:.2f} s (once per process and dispersion, "
          "before the timed runs)", flush=True)

    runs = []
    reference = None

    def record(name, workers, times, result, ideal, load_before):
        nonlocal reference
        diff = None if reference is None else max_difference(reference, result)
        reference = result if reference is None else reference
        runs.append({"run": name, "workers": workers, **times, "ideal": ideal,
                     "max_diff": diff, "load_before": load_before,
                     "load_after": load_average()})
        print(f"{name}: start {times['startup_s']:.1f} s, fit {times['fit_s']:.1f} s "
              f"(load average {load_before:.2f} -> {runs[-1]['load_after']:.2f})", flush=True)

    if not args.no_serial:
        load = load_average()
        t0 = time.perf_counter()
        cpu0 = cpu_seconds()
        with collect_warnings(caught):
            result = fit(prepared, "serial", args.chunk_size)
        times = {"cluster_s": 0.0, "imports_s": 0.0, "startup_s": 0.0,
                 "fit_s": time.perf_counter() - t0, "fit_cpu_s": cpu_seconds() - cpu0,
                 "shutdown_s": 0.0}
        record("serial (no dask)", 1, times, result, None, load)
    if not args.no_local:
        for n in args.workers:
            load = load_average()
            with collect_warnings(caught):
                result, times = run_local(prepared, n, args.chunk_size)
            record(f"LocalCluster, {n} worker(s)", n, times, result,
                   n_chunks / math.ceil(n_chunks / n), load)
        if args.dask_defaults:
            n = max(args.workers)
            load = load_average()
            with collect_warnings(caught):
                result, times = run_local_dask_defaults(prepared, n, args.chunk_size)
            record(f"LocalCluster, {n} worker(s), dask defaults", n, times, result,
                   n_chunks / math.ceil(n_chunks / n), load)
    if args.scheduler:
        load = load_average()
        with collect_warnings(caught):
            result, n, threads, times = run_remote(prepared, args.scheduler, args.chunk_size)
        record(f"{args.scheduler} ({n} workers, {threads} threads)", n, times, result,
               n_chunks / math.ceil(n_chunks / max(threads, 1)), load)

    serial = next((r["fit_s"] for r in runs if r["run"].startswith("serial")), None)
    one = next((r for r in runs if r["run"] == "LocalCluster, 1 worker(s)"), None)
    for r in runs:
        r["total_s"] = r["startup_s"] + r["fit_s"]
        r["seconds_per_bin"] = r["fit_s"] / max(n_usable, 1)
        r["cpu_seconds_per_bin"] = r["fit_cpu_s"] / max(n_usable, 1)
        r["speedup_vs_serial"] = None if serial is None else serial / r["total_s"]
        r["speedup_fit_vs_serial"] = None if serial is None else serial / r["fit_s"]
        r["speedup_vs_1_worker"] = (None if one is None
                                    else (one["startup_s"] + one["fit_s"]) / r["total_s"])
        r["speedup_fit_vs_1_worker"] = None if one is None else one["fit_s"] / r["fit_s"]

    def fmt(value, spec=".2f"):
        return "" if value is None else format(value, spec)

    print()
    print(f"Machine: {describe_machine(info)}")
    print(f"{n_usable} bins, {n_chunks} task(s) of {chunk}; peak RSS of this process "
          f"{peak_rss_mib():.0f} MiB")
    print()
    header = ("Run", "Start (s)", "Fit (s)", "Total (s)", "Fit s/bin", "CPU s/bin", "vs serial",
              "Fit vs serial", "vs 1 worker", "Fit vs 1 worker", "Ideal", "Max diff", "Load")
    rows = [(r["run"], fmt(r["startup_s"], ".1f"), fmt(r["fit_s"], ".1f"),
             fmt(r["total_s"], ".1f"), fmt(r["seconds_per_bin"]),
             fmt(r["cpu_seconds_per_bin"]), fmt(r["speedup_vs_serial"]),
             fmt(r["speedup_fit_vs_serial"]), fmt(r["speedup_vs_1_worker"]),
             fmt(r["speedup_fit_vs_1_worker"]), fmt(r["ideal"]), fmt(r["max_diff"], ".1e"),
             f"{r['load_before']:.1f}-{r['load_after']:.1f}")
            for r in runs]
    for line in format_table(header, rows):
        print(line)
    print("Start: cluster start-up + imports on the workers. 'Fit s/bin': wall time of the "
          "fits per bin.\n'CPU s/bin': CPU time per bin of the process(es) that fitted (this "
          "one, or the workers),\nwhich waiting for a busy core does not inflate.\n"
          "'vs serial', 'vs 1 worker': speed-up of the total; 'Fit vs ...': of the fits alone.\n"
          "'Ideal': the best speed-up over 1 worker that the tasks allow.\n"
          "'Max diff': largest difference from the serial run (mass fractions, mean ages, "
          "[Z/H]).\n'Load': 1-minute load average before and after the run (on an idle "
          "machine: near 0, then near the number of workers).")
    print_warnings(caught)

    payload = {
        "benchmark": "bench_dask",
        "command": command_line(),
        "machine": info,
        "cube_shape": [int(x) for x in shape],
        "generation_s": gen_seconds,
        "n_bins": int(prepared.n_bins),
        "n_usable": n_usable,
        "chunk_size": chunk,
        "n_chunks": n_chunks,
        "baseline_templates_s": templates_s,
        "entry_point": "run_baseline",
        "runs": runs,
        "warnings": caught,
    }
    if args.json:
        write_json(args.json, payload)
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Wall time and speed-up of the pPXF baseline: serial, 1 and 2 dask "
                    "workers.")
    parser.add_argument("--n-bins", type=int, default=32, help="bins to fit (default 32)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="LocalCluster sizes to run (default 1 2)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="also run on this existing dask scheduler")
    parser.add_argument("--no-local", action="store_true", help="skip the LocalCluster runs")
    parser.add_argument("--no-serial", action="store_true", help="skip the serial run")
    parser.add_argument("--dask-defaults", action="store_true",
                        help="also run the largest LocalCluster with dask's default worker "
                             "settings and no page-fault guard (what cubesfh 0.1 ran on)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="bins per dask task (default: "
                             "cubesfh.parallel.default_chunk_size)")
    add_mock_arguments(parser)
    args = parser.parse_args(argv)
    if args.n_bins < 1:
        parser.error("--n-bins must be at least 1")
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error("--chunk-size must be at least 1")
    if any(n < 1 for n in args.workers):
        parser.error("--workers must be positive")
    if args.no_local and not args.scheduler and args.no_serial:
        parser.error("nothing to run")
    if (os.cpu_count() or 1) < max(args.workers):
        print(f"note: {max(args.workers)} workers on {os.cpu_count()} cores", flush=True)
    run(args)


if __name__ == "__main__":
    main()
