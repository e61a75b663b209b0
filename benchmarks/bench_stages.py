#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Time of each preprocessing stage, per 1000 Voronoi bins.

The script writes a mock observation (`cubesfh.synthesis.mock_observation`:
a MUSE-format cube, five WFC3/UVIS images and the truth maps of a rotating
galaxy with a bulge, a disc and spiral arms, from the full forward model)
large enough for about ``--n-bins-target`` bins, then times each stage on its
own with `time.perf_counter`:

* **Voronoi binning + co-add**: `cubesfh.binning.voronoi_bin` (S/N map,
  vorbin, co-adding of every spectrum through ``Cube.iter_chunks``); its two
  reading passes, the S/N map (``Cube.signal_noise``) and the co-adding
  (`cubesfh.binning.coadd_spectra`), are timed again on their own ("of
  which" rows);
* **kinematics**: `cubesfh.kinematics.fit_kinematics` (pPXF, one fit per
  bin), on all bins or, with ``--kinematics-subset K``, on K evenly spaced
  bins, scaled by n_bins / K (a one-off warm-up call on one bin, which loads
  and prepares the templates, is reported separately);
* **rest frame**: `cubesfh.restframe.prepare_spectra` (de-redshift, broaden
  to 150 km/s, resample to 4800-7000 A, normalise), with the kinematics of
  the mock's true velocity and dispersion maps when only a subset was fitted;
* **bin photometry**: `cubesfh.photometry.bin_photometry` (PSF matching,
  flux-conserving reprojection, averaging per bin, five bands).

Bins: the cube has about F x n spaxels (F = ``--spaxels-per-bin``, default
4) and the Voronoi target S/N is solved for so that about n bins form (a
spaxel above the target is its own bin, fainter ones merge until the sum of
their S/N squared reaches the target squared; see `target_snr_for`), so
vorbin runs as on real data. With F = 1 every spaxel is a bin (target just
below the faintest spaxel kept, no vorbin run). ``--target-snr`` sets the
target directly instead. Warnings raised by the stages (e.g. bins flagged)
are collected and summarised at the end.

Example (the run of ``docs/performance.rst``)::

    python benchmarks/bench_stages.py --n-bins-target 1000 --json stages.json

Smoke test (a few seconds)::

    python benchmarks/bench_stages.py --n-bins-target 50 --kinematics-subset 4

The other benchmark scripts import the helpers of this one (generation,
tables, machine description).
"""

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
from astropy import units as u

SYSTEMIC_VELOCITY_KMS = 700.0

# ----------------------------------------------------------------------------
# Helpers shared by the benchmark scripts
# ----------------------------------------------------------------------------


def peak_rss_mib():
    """Peak resident memory of this process (``VmHWM``) in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def machine_info():
    """Cores, memory, platform and library versions, for the records."""
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 2**20
                break
    versions = {}
    for dep in ("cubesfh", "numpy", "scipy", "astropy", "photutils", "reproject", "vorbin",
                "ppxf", "torch", "dask", "distributed"):
        try:
            versions[dep] = metadata.version(dep)
        except metadata.PackageNotFoundError:
            versions[dep] = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cores": os.cpu_count(),
        "memory_gib": None if mem_gib is None else round(mem_gib, 1),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average_at_start": load,
        "versions": versions,
    }


def describe_machine(info):
    """One line describing the machine."""
    mem = f"{info['memory_gib']:.0f} GiB RAM" if info["memory_gib"] else "RAM unknown"
    load = info.get("load_average_at_start")
    load = f", load average {load[0]:.2f}" if load else ""
    return (f"{info['cores']} cores, {mem}, {info['platform']}, Python {info['python']}, "
            f"numpy {info['versions']['numpy']}, astropy {info['versions']['astropy']}{load}")


def format_table(header, rows):
    """A reStructuredText simple table (a list of lines)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in [list(header), *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    lines.append(rule)
    return lines


def write_json(path, payload):
    """Write the records of a run as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    print(f"wrote {path}")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


class Stopwatch:
    """Named wall-clock timings (`time.perf_counter`) in insertion order."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def collect_warnings(store):
    """Record the warnings raised inside into ``store`` (message -> count)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ResourceWarning)  # sockets left to the collector
        yield
    for w in caught:
        key = " ".join(f"{w.category.__name__}: {w.message}".split())
        store[key] = store.get(key, 0) + 1


def print_warnings(store, *, limit=8):
    """Summarise collected warnings."""
    if not store:
        return
    print(f"{sum(store.values())} warning(s) raised by the timed steps:")
    for i, (message, count) in enumerate(store.items()):
        if i == limit:
            print(f"  ... and {len(store) - limit} more kinds")
            break
        text = message if len(message) <= 160 else message[:157] + "..."
        print(f"  [{count}x] {text}")


def command_line():
    """The command that ran this script."""
    return " ".join(["python", sys.argv[0], *sys.argv[1:]])


@contextlib.contextmanager
def work_directory(path=None, *, keep=False):
    """``path`` (created), or a temporary folder removed afterwards unless ``keep``."""
    if path is not None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="cubesfh_bench_"))
    try:
        yield tmp
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def side_for(n_spaxels):
    """Side of the square field holding at least ``n_spaxels`` spaxels."""
    return max(2, math.ceil(math.sqrt(n_spaxels)))


def generate_observation(directory, n_spaxels, *, snr, seed=0,
                         systemic_velocity=SYSTEMIC_VELOCITY_KMS):
    """
    Write a mock observation of at least ``n_spaxels`` spaxels.

    `cubesfh.synthesis.mock_observation`: a MUSE cube whose brightest spaxel
    has S/N ``snr`` per Angstrom, five WFC3/UVIS images and the truth maps,
    for a galaxy (bulge, disc, spiral arms) scaled to fill the square field,
    at ``systemic_velocity`` km/s.

    Returns
    -------
    obs : `cubesfh.synthesis.MockObservation`
    seconds : float
        Generation time.
    """
    from cubesfh.synthesis import mock_observation

    side = side_for(n_spaxels)
    start = time.perf_counter()
    obs = mock_observation(directory, shape=(side, side), seed=seed, snr=snr,
                           systemic_velocity=systemic_velocity * u.km / u.s,
                           overwrite=True, progress_bar=False)
    return obs, time.perf_counter() - start


def read_observation(obs):
    """``Cube.read`` of the cube and ``HSTImage.read`` of the images (dict band -> image)."""
    from cubesfh import Cube, HSTImage

    cube = Cube.read(obs.cube_path)
    hst = {}
    for band, path in obs.hst_paths.items():
        hst[band] = HSTImage.read(path)
    return cube, hst


def spaxel_snr(cube, *, min_snr=1.0):
    """S/N per Angstrom of the spaxels that ``voronoi_bin`` would use (1-D array)."""
    signal, noise = cube.signal_noise(progress_bar=False)
    signal = np.asarray(getattr(signal, "value", signal), dtype=float)
    noise = np.asarray(getattr(noise, "value", noise), dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = signal / noise
    good = np.isfinite(snr) & (noise > 0)
    if min_snr is not None:
        good &= snr >= min_snr
    return snr[good]


def target_snr_for(snr, n_bins):
    """
    Target S/N that gives about ``n_bins`` Voronoi bins from spaxels of S/N ``snr``.

    Spaxels above the target are bins of their own; fainter ones merge until
    the sum of their S/N squared reaches the target squared, so the expected
    number of bins is ``#(snr >= t) + sum(snr[snr < t]**2) / t**2``, which
    decreases with t; it is solved for by bisection. If every spaxel must be
    a bin, the target is just below the faintest spaxel.
    """
    snr = np.sort(np.asarray(snr, dtype=float))
    if n_bins >= snr.size:
        return float(snr[0]) * 0.999
    cumsq = np.cumsum(snr**2)

    def expected(t):
        k = np.searchsorted(snr, t)  # snr[:k] < t
        return (snr.size - k) + (cumsq[k - 1] / t**2 if k else 0.0)

    lo, hi = float(snr[0]) * 0.999, float(np.sqrt(cumsq[-1]))
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if expected(mid) > n_bins:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def write_kinematics_maps(truth_path, out_path):
    """
    Write the mock's true velocity and dispersion as a PHANGS-DAP-like MAPS file.

    Extensions ``V_STARS`` (line-of-sight velocity) and ``SIGMA_STARS``, in km/s,
    on the cube's celestial WCS: what `cubesfh.kinematics.read_kinematics_maps`
    reads in place of a pPXF fit.
    """
    from astropy.io import fits

    with fits.open(truth_path) as truth:
        hdus = [fits.PrimaryHDU()]
        velocity = "V" if "V" in truth else "VELOCITY"  # mock_observation / example files
        for src, dst in ((velocity, "V_STARS"), ("SIGMA", "SIGMA_STARS")):
            hdu = fits.ImageHDU(truth[src].data.astype(np.float32), header=truth[src].header,
                                name=dst)
            hdu.header["BUNIT"] = "km/s"
            hdus.append(hdu)
        fits.HDUList(hdus).writeto(out_path, overwrite=True)
    return Path(out_path)


# ----------------------------------------------------------------------------
# This benchmark
# ----------------------------------------------------------------------------


def run(args):
    from cubesfh.binning import coadd_spectra, voronoi_bin
    from cubesfh.kinematics import fit_kinematics, read_kinematics_maps
    from cubesfh.photometry import bin_photometry
    from cubesfh.restframe import prepare_spectra

    info = machine_info()
    watch = Stopwatch()
    caught = {}
    redshift = SYSTEMIC_VELOCITY_KMS * u.km / u.s
    per_bin = max(args.spaxels_per_bin, 1.0)
    with work_directory(args.workdir, keep=args.keep) as workdir:
        obs, gen_seconds = generate_observation(
            workdir, int(round(args.n_bins_target * per_bin)), snr=args.snr, seed=args.seed)
        cube, hst = read_observation(obs)
        shape = cube.spatial_shape
        print(f"mock observation: {shape[0]} x {shape[1]} spaxels, {cube.shape[0]} "
              f"wavelengths, {len(hst)} HST images, written in {gen_seconds:.1f} s", flush=True)

        snr = spaxel_snr(cube, min_snr=args.min_snr)
        if args.target_snr is not None:
            target = args.target_snr
        elif args.spaxels_per_bin <= 1:
            target = float(snr.min()) * 0.999
        else:
            target = target_snr_for(snr, args.n_bins_target)
        print(f"{snr.size} spaxels with S/N >= {args.min_snr:g}: S/N per A min {snr.min():.1f}, "
              f"median {np.median(snr):.1f}, max {snr.max():.1f}; target S/N {target:.2f}",
              flush=True)

        with collect_warnings(caught), watch("binning"):
            bins = voronoi_bin(cube, target_snr=target, min_snr=args.min_snr,
                               progress_bar=False)
        n_bins = bins.n_bins
        print(f"{n_bins} bins (bin S/N median {np.median(bins.snr):.1f}) in "
              f"{watch.seconds['binning']:.1f} s", flush=True)
        with collect_warnings(caught), watch("binning_snr_map"):
            cube.signal_noise(progress_bar=False)
        with collect_warnings(caught), watch("binning_coadd"):
            coadd_spectra(cube, bins.bin_map, progress_bar=False)

        k = n_bins if not args.kinematics_subset else min(args.kinematics_subset, n_bins)
        subset = np.unique(np.linspace(0, n_bins - 1, k).round().astype(int))
        k = subset.size
        with collect_warnings(caught), watch("kinematics_warmup"):
            fit_kinematics(wavelength=bins.wavelength, spectra=bins.spectra[:1],
                           variance=bins.variance[:1], redshift=redshift, progress_bar=False)
        with collect_warnings(caught), watch("kinematics"):
            kin = fit_kinematics(wavelength=bins.wavelength, spectra=bins.spectra[subset],
                                 variance=bins.variance[subset], redshift=redshift,
                                 progress_bar=False)
        n_flagged = int(np.count_nonzero(np.asarray(kin["flag"]) != 0))
        print(f"kinematics: {k} of {n_bins} bins fitted in {watch.seconds['kinematics']:.1f} s "
              f"({n_flagged} flagged)", flush=True)
        if k < n_bins:
            maps_path = write_kinematics_maps(obs.truth_path, workdir / "true_kinematics.fits")
            with collect_warnings(caught):
                kin = read_kinematics_maps(maps_path, bins)
            kin_source = "the true maps of the mock (only a subset was fitted)"
        else:
            kin_source = "the pPXF fits"

        with collect_warnings(caught), watch("restframe"):
            spectra = prepare_spectra(bins.wavelength, bins.spectra, bins.variance,
                                      kin["velocity_los"], kin["sigma"], progress_bar=False)
        print(f"rest frame: {int(np.count_nonzero(spectra.flags == 0))} of {n_bins} spectra "
              f"unflagged, in {watch.seconds['restframe']:.1f} s", flush=True)
        with collect_warnings(caught), watch("photometry"):
            phot = bin_photometry(hst, bins, cube, progress_bar=False)
        print(f"photometry: {len(phot.bands)} bands, {int(np.count_nonzero(phot.flags))} bins "
              f"flagged, in {watch.seconds['photometry']:.1f} s", flush=True)
        n_bands = len(phot.bands)
        del cube, hst, bins, spectra, phot

    s = watch.seconds
    scale_kin = n_bins / k
    stages = [
        ("binning", "Voronoi binning + co-add", s["binning"], 1.0),
        ("binning_snr_map", "  of which S/N map (re-timed)", s["binning_snr_map"], 1.0),
        ("binning_coadd", "  of which co-add (re-timed)", s["binning_coadd"], 1.0),
        ("kinematics", f"kinematics (pPXF, {k} bins x {scale_kin:.4g})"
         if k < n_bins else "kinematics (pPXF, all bins)", s["kinematics"], scale_kin),
        ("kinematics_warmup", "kinematics warm-up (1 bin, once)", s["kinematics_warmup"], 1.0),
        ("restframe", "rest frame", s["restframe"], 1.0),
        ("photometry", f"bin photometry ({n_bands} bands)", s["photometry"], 1.0),
    ]
    records = []
    for key, label, measured, scale in stages:
        records.append({"stage": key, "label": label.strip(), "measured_s": measured,
                        "scale": scale, "seconds": measured * scale,
                        "seconds_per_1000_bins": 1000 * measured * scale / n_bins})
    in_total = ("binning", "kinematics", "kinematics_warmup", "restframe", "photometry")
    total = sum(r["seconds"] for r in records if r["stage"] in in_total)
    rss = peak_rss_mib()

    print()
    print(f"Machine: {describe_machine(info)}")
    print(f"Cube {shape[0]} x {shape[1]} spaxels, {n_bins} bins (target S/N {target:.2f}); "
          f"the rest frame used the kinematics of {kin_source}; peak RSS {rss:.0f} MiB")
    print()
    header = ("Stage", "Measured (s)", "All bins (s)", "Per 1000 bins (s)")
    rows = [(label, f"{r['measured_s']:.2f}", f"{r['seconds']:.2f}",
             f"{r['seconds_per_1000_bins']:.2f}")
            for (_, label, _, _), r in zip(stages, records, strict=True)]
    rows.append(("total", "", f"{total:.2f}", f"{1000 * total / n_bins:.2f}"))
    for line in format_table(header, rows):
        print(line)
    if k < n_bins:
        print(f"Kinematics fitted on {k} evenly spaced bins of {n_bins}, time scaled by "
              f"{scale_kin:.4g}.")
    print_warnings(caught)

    payload = {
        "benchmark": "bench_stages",
        "command": command_line(),
        "machine": info,
        "cube_shape": [int(x) for x in shape],
        "generation_s": gen_seconds,
        "n_bins": int(n_bins),
        "target_snr": float(target),
        "kinematics_bins_fitted": int(k),
        "kinematics_flagged": n_flagged,
        "restframe_kinematics": kin_source,
        "peak_rss_mib": rss,
        "stages": records,
        "total_s": total,
        "total_per_1000_bins_s": 1000 * total / n_bins,
        "warnings": caught,
    }
    if args.json:
        write_json(args.json, payload)
    return payload


def add_mock_arguments(parser):
    """The options of the mock observation and of the output, shared by the benchmarks."""
    parser.add_argument("--snr", type=float, default=150.0,
                        help="S/N per A of the brightest spaxel of the mock cube (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None,
                        help="folder for the generated files (default: a temporary folder, "
                             "removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the records")


def add_binning_arguments(parser, *, n_bins_default):
    """The options that set the size of the mock and the Voronoi binning."""
    parser.add_argument("--n-bins-target", type=int, default=n_bins_default,
                        help=f"about this many bins (default {n_bins_default})")
    parser.add_argument("--spaxels-per-bin", type=float, default=4.0,
                        help="the cube has about this many spaxels per bin; 1: every spaxel "
                             "is a bin, no vorbin (default 4)")
    parser.add_argument("--target-snr", type=float, default=None,
                        help="Voronoi target S/N per A (default: solved for from "
                             "--n-bins-target)")
    parser.add_argument("--min-snr", type=float, default=1.0,
                        help="spaxels below this S/N are left out (default 1)")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Time each preprocessing stage of cubesfh per 1000 Voronoi bins.")
    add_binning_arguments(parser, n_bins_default=1000)
    add_mock_arguments(parser)
    parser.add_argument("--kinematics-subset", type=int, default=None, metavar="K",
                        help="fit the kinematics of K evenly spaced bins only and scale the "
                             "time by n_bins / K (default: all bins)")
    args = parser.parse_args(argv)
    if args.n_bins_target < 1:
        parser.error("--n-bins-target must be at least 1")
    if args.kinematics_subset is not None and args.kinematics_subset < 1:
        parser.error("--kinematics-subset must be at least 1")
    run(args)


if __name__ == "__main__":
    main()
