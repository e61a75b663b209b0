#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Wall time of a survey (``cubesfh run-many``) of N mock cubes, then of its resume.

The script writes N small example observations
(`cubesfh.datasets.make_example_observation`, ``--shape``, one seed each; a
cube and five HST images) and a CSV manifest of them, then runs
`cubesfh.survey.run_survey` on it twice:

1. **from scratch**: every cube is binned, its kinematics fitted, the
   network (and with ``--ppxf`` the pPXF baseline, on the survey's dask
   cluster) run, and its product written;
2. **resume**: the same command again; every product is up to date, so
   nothing is recomputed (what a rerun after an interruption costs for the
   cubes already done).

With ``--broken`` one more entry points to a truncated cube, to time a
survey with a failing cube (it must not stop the others). The table gives,
for each cube, the number of bins, the time of each stage and the total;
then the wall time of the whole survey, its time per cube and the time of
the resume. ``--parallel-cubes`` processes the cubes as dask tasks (see
`cubesfh.survey.run_survey`), ``--workers N`` sizes the local cluster,
``--scheduler ADDRESS`` uses an existing one.

Example (the run of ``docs/survey.rst``, ten cubes with pPXF and a broken one;
about 4 minutes on two cores)::

    python benchmarks/bench_survey.py --n-cubes 10 --ppxf --broken --json survey.json

Smoke test (three cubes, no pPXF, about 25 seconds)::

    python benchmarks/bench_survey.py --n-cubes 3
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cubesfh.conventions import HST_BANDS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stages import (
    SYSTEMIC_VELOCITY_KMS,
    collect_warnings,
    command_line,
    describe_machine,
    format_table,
    machine_info,
    peak_rss_mib,
    print_warnings,
    work_directory,
    write_json,
)

# the example observation's systemic velocity (700 km/s), as written in the manifest
REDSHIFT = f"{SYSTEMIC_VELOCITY_KMS / 299_792.458:.6f}"


def write_survey(workdir, n_cubes, shape, *, target_snr, ppxf, broken):
    """N example observations and their CSV manifest; returns the manifest and seconds."""
    from cubesfh.datasets import make_example_observation

    t0 = time.perf_counter()
    lines = ["name,cube," + ",".join(HST_BANDS) + ",target_snr,redshift,register,ppxf"]
    first = None
    for i in range(n_cubes):
        obs = make_example_observation(workdir / f"gal{i:02d}", shape=shape, seed=i,
                                       overwrite=True)
        first = first or obs.cube_path
        cells = ",".join(str(obs.hst_paths[b]) for b in HST_BANDS)
        lines.append(f"gal{i:02d},{obs.cube_path},{cells},{target_snr},{REDSHIFT},no,"
                     f"{'yes' if ppxf else 'no'}")
    if broken:
        bad = workdir / "broken.fits"
        bad.write_bytes(first.read_bytes()[:20000])
        lines.append(f"broken,{bad},,,,,,{target_snr},{REDSHIFT},no,no")
    manifest = workdir / "survey.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, time.perf_counter() - t0


def run(args):
    from cubesfh.survey import run_survey

    info = machine_info()
    caught = {}
    with work_directory(args.workdir, keep=args.keep) as workdir:
        manifest, gen_s = write_survey(workdir, args.n_cubes, tuple(args.shape),
                                       target_snr=args.target_snr, ppxf=args.ppxf,
                                       broken=args.broken)
        print(f"{args.n_cubes} mock cubes of {args.shape[0]} x {args.shape[1]} spaxels "
              f"written in {gen_s:.1f} s; manifest {manifest}", flush=True)
        out = workdir / "products"
        options = dict(scheduler=args.scheduler, n_workers=args.workers,
                       parallel_cubes=args.parallel_cubes, progress_bar=False)
        t0 = time.perf_counter()
        with collect_warnings(caught):
            first = run_survey(manifest, out, **options)
        first_s = time.perf_counter() - t0
        print(f"from scratch: {first_s:.1f} s", flush=True)
        t0 = time.perf_counter()
        with collect_warnings(caught):
            again = run_survey(manifest, out, **options)
        resume_s = time.perf_counter() - t0
        print(f"resume: {resume_s:.1f} s", flush=True)

    stages = ("t_preprocess", "t_cnn", "t_ppxf", "t_write", "t_total")

    def sec(value):
        value = float(getattr(value, "value", value))
        return "--" if not np.isfinite(value) else f"{value:.1f}"

    print()
    print(f"Machine: {describe_machine(info)}")
    print(f"peak RSS of this process {peak_rss_mib():.0f} MiB")
    print()
    header = ("Cube", "Status", "Bins", "Preprocess (s)", "CNN (s)", "pPXF (s)",
              "Write (s)", "Total (s)", "Resumed")
    rows = [(r["name"], r["status"], r["n_bins"], *(sec(r[c]) for c in stages),
             "yes" if a["resumed"] else "no")
            for r, a in zip(first, again, strict=True)]
    for line in format_table(header, rows):
        print(line)
    ok = first["status"] == "ok"
    per_cube = first_s / max(len(first), 1)
    print(f"survey of {len(first)} cubes ({int(ok.sum())} ok): {first_s:.1f} s, "
          f"{per_cube:.1f} s per cube; resume with every product up to date: "
          f"{resume_s:.1f} s ({resume_s / max(len(first), 1):.2f} s per cube)")
    for r in first[~ok]:
        print(f"  {r['name']} failed: {r['error']}")
    print_warnings(caught)

    payload = {
        "benchmark": "bench_survey",
        "command": command_line(),
        "machine": info,
        "n_cubes": args.n_cubes,
        "shape": list(args.shape),
        "target_snr": args.target_snr,
        "ppxf": args.ppxf,
        "parallel_cubes": args.parallel_cubes,
        "workers": args.workers,
        "generation_s": gen_s,
        "survey_s": first_s,
        "survey_s_per_cube": per_cube,
        "resume_s": resume_s,
        "cubes": [{"name": str(r["name"]), "status": str(r["status"]),
                   "error": str(r["error"]), "n_bins": int(r["n_bins"]),
                   **{c: float(getattr(r[c], "value", r[c])) for c in stages},
                   "resumed_second_run": bool(a["resumed"])}
                  for r, a in zip(first, again, strict=True)],
        "warnings": caught,
    }
    if args.json:
        write_json(args.json, payload)
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Wall time of a survey of mock cubes (cubesfh run-many), and of its "
                    "resume.")
    parser.add_argument("--n-cubes", type=int, default=10, help="cubes (default 10)")
    parser.add_argument("--shape", type=int, nargs=2, default=(12, 12), metavar=("NY", "NX"),
                        help="spaxels of each cube (default 12 12)")
    parser.add_argument("--target-snr", type=float, default=100.0,
                        help="Voronoi target S/N (default 100: about 10 bins per 12 x 12 "
                             "cube)")
    parser.add_argument("--ppxf", action="store_true", help="also run the pPXF baseline")
    parser.add_argument("--broken", action="store_true",
                        help="add an entry with a truncated cube (it must fail alone)")
    parser.add_argument("--parallel-cubes", action="store_true",
                        help="one dask task per cube (run_survey(parallel_cubes=True))")
    parser.add_argument("--workers", type=int, default=None,
                        help="workers of the local dask cluster (default: the cores)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="existing dask scheduler instead of a local cluster")
    parser.add_argument("--workdir", default=None,
                        help="folder for the generated files (default: a temporary folder, "
                             "removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the records")
    args = parser.parse_args(argv)
    if args.n_cubes < 1:
        parser.error("--n-cubes must be at least 1")
    if min(args.shape) < 8:
        parser.error("--shape: at least 8 x 8 spaxels (the HST images must cover the bins)")
    run(args)


if __name__ == "__main__":
    main()
