#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Wall time and speed-up of the pPXF baseline on dask workers.

The script prepares M bins (``--n-bins``, default 24) of a mock observation
(`cubesfh.synthesis.mock_observation`, see ``bench_stages.py``): the M
spaxels of highest S/N of a small cube, each its own bin, with their HST
photometry, and the kinematics read from the mock's true velocity and
dispersion maps (no pPXF kinematic fit is needed to time the baseline). It
then fits the stellar populations of every bin with
`cubesfh.pipeline.run_baseline` (pPXF, `cubesfh.baseline.fit_population`,
spread with `cubesfh.parallel.map_bins`):

* ``serial``: ``scheduler='serial'``, in this process, no dask (reference);
* ``LocalCluster`` of 1, then 2 workers (``--workers``): single-threaded
  worker processes, as `~cubesfh.parallel.map_bins` starts them itself. The
  start-up (cluster, then importing `cubesfh.baseline` and pPXF on every
  worker) is timed apart from the fits; the total is what a user waits;
* ``--scheduler ADDRESS``: an existing dask cluster (e.g.
  ``tcp://10.0.0.5:8786``), in addition (``--no-local`` to skip the local
  runs).

`~cubesfh.parallel.map_bins` sends the bins in chunks of 8 (``chunk_size``):
with M = 24 that is 3 chunks, so two workers can at best be 1.5 times faster
than one (the "ideal" column). ``--chunk-size N`` calls
`~cubesfh.parallel.map_bins` directly with the same function, inputs and
templates as `~cubesfh.pipeline.run_baseline` but N bins per chunk.

The results of every run are compared with the serial run (they should be
identical: the fits are deterministic).

Example (the run of ``docs/performance.rst``)::

    python benchmarks/bench_dask.py --n-bins 24 --json dask.json

Smoke test::

    python benchmarks/bench_dask.py --n-bins 4 --chunk-size 2
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

DEFAULT_CHUNK_SIZE = 8  # cubesfh.parallel.map_bins default, used by run_baseline


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

    if chunk_size is None:
        return run_baseline(prepared, scheduler=client_or_scheduler, progress_bar=False)
    # The same work as run_baseline, with another number of bins per dask task.
    from cubesfh.baseline import BaselineTemplates, fit_population
    from cubesfh.parallel import map_bins
    from cubesfh.pipeline import UNUSABLE

    ok = np.flatnonzero((prepared.flags & UNUSABLE) == 0)
    spec = prepared.spectra
    var = spec.variance if spec.variance is not None else np.full_like(spec.flux, np.nan)
    items = [(spec.flux[i], var[i], prepared.photometry_normalized[i]) for i in ok]
    results = map_bins(fit_population, items, kwargs={"templates": BaselineTemplates()},
                       scheduler=client_or_scheduler, chunk_size=chunk_size,
                       progress_bar=False, desc="pPXF bins")
    return {"logage_mw": np.array([np.nan if r is None else r.logage_mw for r in results]),
            "mass_fraction": np.array([np.full(16, np.nan) if r is None else r.mass_fraction
                                       for r in results])}


def max_difference(a, b):
    """Largest absolute difference between two runs' mass fractions and mean ages."""
    diffs = []
    for key in ("mass_fraction", "logage_mw"):
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


def run_local(prepared, n_workers, chunk_size):
    """Start a LocalCluster like map_bins does, fit, close; return the timings."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    try:
        client.wait_for_workers(n_workers)
        t1 = time.perf_counter()
        client.run(warm_worker)
        t1w = time.perf_counter()
        result = fit(prepared, client, chunk_size)
        t2 = time.perf_counter()
    finally:
        client.close()
        cluster.close()
    t3 = time.perf_counter()
    return result, {"cluster_s": t1 - t0, "imports_s": t1w - t1, "startup_s": t1w - t0,
                    "fit_s": t2 - t1w, "shutdown_s": t3 - t2}


def run_remote(prepared, address, chunk_size):
    """Fit on an existing cluster; return the timings and its number of workers."""
    from distributed import Client

    t0 = time.perf_counter()
    client = Client(address)
    try:
        t1 = time.perf_counter()
        workers = client.scheduler_info()["workers"]
        threads = sum(w.get("nthreads", 1) for w in workers.values())
        client.run(warm_worker)
        t1w = time.perf_counter()
        result = fit(prepared, client, chunk_size)
        t2 = time.perf_counter()
    finally:
        client.close()
    t3 = time.perf_counter()
    return result, len(workers), threads, {"cluster_s": t1 - t0, "imports_s": t1w - t1,
                                           "startup_s": t1w - t0, "fit_s": t2 - t1w,
                                           "shutdown_s": t3 - t2}


def run(args):
    from cubesfh.baseline import BaselineTemplates
    from cubesfh.pipeline import UNUSABLE

    info = machine_info()
    caught = {}
    chunk = args.chunk_size or DEFAULT_CHUNK_SIZE
    with work_directory(args.workdir, keep=args.keep) as workdir:
        prepared, gen_seconds, shape = prepare_bins(workdir, args.n_bins, snr=args.snr,
                                                    seed=args.seed, caught=caught)
    n_usable = int(np.count_nonzero((prepared.flags & UNUSABLE) == 0))
    n_chunks = math.ceil(n_usable / chunk)
    print(f"{prepared.n_bins} bins of a {shape[0]} x {shape[1]} mock cube "
          f"({n_usable} usable), {n_chunks} chunk(s) of {chunk} bins; mock written in "
          f"{gen_seconds:.1f} s", flush=True)

    t0 = time.perf_counter()
    BaselineTemplates()
    templates_s = time.perf_counter() - t0
    print(f"BaselineTemplates() built in {templates_s:.2f} s (every run_baseline call "
          "builds them once)", flush=True)

    runs = []
    reference = None
    if not args.no_serial:
        t0 = time.perf_counter()
        with collect_warnings(caught):
            reference = fit(prepared, "serial", args.chunk_size)
        seconds = time.perf_counter() - t0
        runs.append({"run": "serial (no dask)", "workers": 1, "cluster_s": 0.0,
                     "imports_s": 0.0, "startup_s": 0.0, "fit_s": seconds, "shutdown_s": 0.0,
                     "ideal": None, "max_diff": 0.0})
        print(f"serial: {seconds:.1f} s", flush=True)
    if not args.no_local:
        for n in args.workers:
            with collect_warnings(caught):
                result, times = run_local(prepared, n, args.chunk_size)
            ideal = n_chunks / math.ceil(n_chunks / n)
            diff = None if reference is None else max_difference(reference, result)
            reference = result if reference is None else reference
            runs.append({"run": f"LocalCluster, {n} worker(s)", "workers": n, **times,
                         "ideal": ideal, "max_diff": diff})
            print(f"LocalCluster {n} worker(s): start {times['startup_s']:.1f} s, fit "
                  f"{times['fit_s']:.1f} s", flush=True)
    if args.scheduler:
        with collect_warnings(caught):
            result, n, threads, times = run_remote(prepared, args.scheduler, args.chunk_size)
        ideal = n_chunks / math.ceil(n_chunks / max(threads, 1))
        diff = None if reference is None else max_difference(reference, result)
        runs.append({"run": f"{args.scheduler} ({n} workers, {threads} threads)",
                     "workers": n, **times, "ideal": ideal, "max_diff": diff})
        print(f"{args.scheduler}: connect {times['startup_s']:.1f} s, fit "
              f"{times['fit_s']:.1f} s", flush=True)

    serial = next((r["fit_s"] for r in runs if r["run"].startswith("serial")), None)
    one = next((r for r in runs if r["run"].startswith("LocalCluster, 1 ")), None)
    for r in runs:
        r["total_s"] = r["startup_s"] + r["fit_s"]
        r["seconds_per_bin"] = r["fit_s"] / max(n_usable, 1)
        r["speedup_vs_serial"] = None if serial is None else serial / r["total_s"]
        r["speedup_fit_vs_serial"] = None if serial is None else serial / r["fit_s"]
        r["speedup_vs_1_worker"] = (None if one is None
                                    else (one["startup_s"] + one["fit_s"]) / r["total_s"])
        r["speedup_fit_vs_1_worker"] = None if one is None else one["fit_s"] / r["fit_s"]

    def fmt(value, spec=".2f"):
        return "" if value is None else format(value, spec)

    print()
    print(f"Machine: {describe_machine(info)}")
    print(f"{n_usable} bins, {n_chunks} chunk(s) of {chunk}; peak RSS of this process "
          f"{peak_rss_mib():.0f} MiB")
    print()
    header = ("Run", "Start (s)", "Fit (s)", "Total (s)", "Fit s/bin", "vs serial",
              "vs 1 worker", "Fit vs 1 worker", "Ideal", "Max diff")
    rows = [(r["run"], fmt(r["startup_s"], ".1f"), fmt(r["fit_s"], ".1f"),
             fmt(r["total_s"], ".1f"), fmt(r["seconds_per_bin"]), fmt(r["speedup_vs_serial"]),
             fmt(r["speedup_vs_1_worker"]), fmt(r["speedup_fit_vs_1_worker"]),
             fmt(r["ideal"]), fmt(r["max_diff"], ".1e"))
            for r in runs]
    for line in format_table(header, rows):
        print(line)
    print("Start: cluster start-up + imports on the workers. 'vs serial', 'vs 1 worker': "
          "speed-up of the total;\n'Fit vs 1 worker': of the fits alone; 'Ideal': the best "
          "speed-up over 1 worker that the chunks allow;\n'Max diff': largest difference "
          "from the first run (mass fractions, mean log age).")
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
        "entry_point": "run_baseline" if args.chunk_size is None else "map_bins",
        "runs": runs,
        "warnings": caught,
    }
    if args.json:
        write_json(args.json, payload)
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Wall time and speed-up of the pPXF baseline on dask workers.")
    parser.add_argument("--n-bins", type=int, default=24, help="bins to fit (default 24)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="LocalCluster sizes to run (default 1 2)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="also run on this existing dask scheduler")
    parser.add_argument("--no-local", action="store_true", help="skip the LocalCluster runs")
    parser.add_argument("--no-serial", action="store_true", help="skip the serial run")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="bins per dask task; calls map_bins directly (default: "
                             f"run_baseline, {DEFAULT_CHUNK_SIZE} bins per task)")
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
