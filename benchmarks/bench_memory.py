# Licensed under a 3-clause BSD style license - see LICENSE
"""
Peak memory of chunked cube operations on a MUSE cube larger than ``max_memory``.

The script

1. writes a synthetic MUSE-format cube (PRIMARY + DATA + STAT, float32, the
   keywords of the ESO pipeline) of the requested size, streaming blocks of
   planes to disk so that the cube is never held in memory;
2. runs each operation in a fresh Python process and records its wall time
   and peak resident memory (``VmHWM``, i.e. peak RSS):

   * ``open``: import cubesfh and ``Cube.read`` (the baseline);
   * ``snr_map``: S/N map in 5300-5500 Angstrom (reads only those planes);
   * ``full_pass``: ``Cube.good_spaxels()``, one pass over every pixel of
     DATA and STAT through ``Cube.iter_chunks``;
   * ``memmap_pass``: the same pass through the memory-mapped arrays
     (``cube.data[:, rows]``) instead of ``iter_chunks``, for comparison;
   * ``voronoi_bin``: ``cubesfh.binning.voronoi_bin`` (S/N map, Voronoi
     binning and co-adding of every spectrum), when that module exists;

3. prints a table (reStructuredText) and deletes the cube unless ``--keep``.

Example (the run reported in ``docs/performance_memory.rst``)::

    python benchmarks/bench_memory.py --shape 3681 400 400 --max-memory 256MB

Peak RSS includes the Python interpreter and the imported libraries (see the
``open`` row).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MUSE_BUNIT = "10**(-20)*erg/s/cm**2/Angstrom"
OPERATIONS = ("open", "snr_map", "full_pass", "memmap_pass", "voronoi_bin")


def _header(extname, shape, bunit):
    from astropy.io import fits

    nlam, ny, nx = shape
    cards = [
        ("XTENSION", "IMAGE"), ("BITPIX", -32), ("NAXIS", 3), ("NAXIS1", nx),
        ("NAXIS2", ny), ("NAXIS3", nlam), ("PCOUNT", 0), ("GCOUNT", 1),
        ("EXTNAME", extname), ("HDUCLASS", "ESO"), ("HDUCLAS1", "IMAGE"),
        ("HDUCLAS2", "DATA" if extname == "DATA" else "ERROR"), ("BUNIT", bunit),
        ("CTYPE1", "RA---TAN"), ("CTYPE2", "DEC--TAN"), ("CTYPE3", "AWAV"),
        ("CUNIT1", "deg"), ("CUNIT2", "deg"), ("CUNIT3", "Angstrom"),
        ("CRPIX1", nx / 2 + 0.5), ("CRPIX2", ny / 2 + 0.5), ("CRPIX3", 1.0),
        ("CRVAL1", 170.0625), ("CRVAL2", 12.9915), ("CRVAL3", 4749.9),
        ("CD1_1", -0.2 / 3600), ("CD1_2", 0.0), ("CD2_1", 0.0), ("CD2_2", 0.2 / 3600),
        ("CD1_3", 0.0), ("CD2_3", 0.0), ("CD3_1", 0.0), ("CD3_2", 0.0), ("CD3_3", 1.25),
    ]
    if extname == "STAT":
        cards.append(("HDUCLAS3", "MSE"))
    return fits.Header(cards)


def generate(path, shape, *, seed=0, block_bytes=64 * 2**20):
    """
    Stream a synthetic MUSE cube to ``path`` without holding it in memory.

    An exponential disc (scale length ny/6 spaxels, central flux 100 in units
    of 1e-20 erg/s/cm2/A) with a sloped continuum; variance 0.5 * flux + 4
    (source + sky), Gaussian noise with that variance.
    """
    from astropy.io import fits

    nlam, ny, nx = shape
    y, x = np.mgrid[:ny, :nx]
    radius = np.hypot(x - (nx - 1) / 2, y - (ny - 1) / 2)
    disc = (100.0 * np.exp(-radius / (ny / 6.0)) + 1.0).astype(np.float32)
    wave = 4749.9 + 1.25 * np.arange(nlam)
    slope = (1.0 + 1e-4 * (wave - 5500.0)).astype(np.float32)
    planes = max(1, block_bytes // (4 * ny * nx))
    rng = np.random.default_rng(seed)

    primary = fits.PrimaryHDU()
    primary.header["EXTEND"] = True
    primary.header["OBJECT"] = "bench_memory synthetic cube"
    primary.header["PSFFWHM"] = (0.8, "[arcsec] PSF FWHM")
    primary.writeto(path, overwrite=True)
    for extname in ("DATA", "STAT"):
        bunit = MUSE_BUNIT if extname == "DATA" else f"({MUSE_BUNIT})**2"
        with fits.StreamingHDU(str(path), _header(extname, shape, bunit)) as stream:
            for l0 in range(0, nlam, planes):
                s = slope[l0:l0 + planes, None, None]
                flux = disc[None] * s
                variance = 0.5 * flux + np.float32(4.0)
                if extname == "DATA":
                    noise = rng.standard_normal(flux.shape, dtype=np.float32)
                    block = flux + noise * np.sqrt(variance)
                else:
                    block = variance
                stream.write(block.astype(">f4"))
    return path


def _peak_rss_mb():
    """Peak resident memory of this process in MB."""
    # VmHWM is the high-water mark of this process image. ru_maxrss would also
    # count the parent's peak: Linux keeps it across fork + exec.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # kB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def child(operation, path, max_memory):
    """Run one operation in this (fresh) process and print a JSON record."""
    from astropy import units as u

    from cubesfh import Cube

    limit = u.Quantity(max_memory)
    start = time.perf_counter()
    cube = Cube.read(path, max_memory=limit)
    info = {}
    if operation == "snr_map":
        snr = cube.snr_map(progress_bar=False)
        info["median_snr"] = float(np.nanmedian(snr))
    elif operation == "full_pass":
        info["good_spaxels"] = int(cube.good_spaxels().sum())
    elif operation == "memmap_pass":
        ny = cube.shape[1]
        rows = max(1, ny // 40)
        good = 0
        for y0 in range(0, ny, rows):
            data = np.asarray(cube.data[:, y0:y0 + rows])
            var = np.asarray(cube.variance[:, y0:y0 + rows])
            good += int((np.isfinite(data) & (var > 0)).any(axis=0).sum())
        info["good_spaxels"] = good
    elif operation == "voronoi_bin":
        from cubesfh.binning import voronoi_bin

        bins = voronoi_bin(cube, target_snr=50, progress_bar=False)
        info["n_bins"] = int(bins.n_bins)
    elapsed = time.perf_counter() - start
    print(json.dumps({"operation": operation, "time_s": elapsed,
                      "peak_rss_mb": _peak_rss_mb(), **info}))


def _has_binning():
    import importlib.util

    if importlib.util.find_spec("cubesfh.binning") is None:
        return False
    from cubesfh import binning

    return hasattr(binning, "voronoi_bin")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs=3, type=int, default=(3681, 400, 400),
                        metavar=("NLAM", "NY", "NX"),
                        help="cube shape [wavelength, y, x] (default 3681 400 400: "
                             "2.36 GB DATA + 2.36 GB STAT)")
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp"),
                        help="where the cube is written (default /tmp)")
    parser.add_argument("--max-memory", default="256MB",
                        help="max_memory of the operations (default 256MB)")
    parser.add_argument("--operations", nargs="+", choices=OPERATIONS, default=OPERATIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the generated cube")
    parser.add_argument("--child", nargs=2, metavar=("OPERATION", "PATH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child(args.child[0], args.child[1], args.max_memory)
        return

    shape = tuple(args.shape)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"bench_memory_cube_{'x'.join(map(str, shape))}.fits"
    operations = [op for op in args.operations if op != "voronoi_bin" or _has_binning()]
    try:
        start = time.perf_counter()
        generate(path, shape, seed=args.seed)
        gen_time = time.perf_counter() - start
        size = path.stat().st_size
        print(f"cube {shape} written to {path}: {size / 1e9:.2f} GB in {gen_time:.0f} s "
              f"(generator peak RSS {_peak_rss_mb():.0f} MB)", flush=True)
        records = []
        for operation in operations:
            command = [sys.executable, __file__, "--child", operation, str(path),
                       "--max-memory", args.max_memory]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(result.stderr, file=sys.stderr)
                raise SystemExit(f"{operation} failed")
            record = json.loads(result.stdout.strip().splitlines()[-1])
            records.append(record)
            print(json.dumps(record), flush=True)
    finally:
        if not args.keep and path.exists():
            os.remove(path)
            print(f"deleted {path}")

    print()
    print(f"Cube {shape[0]} x {shape[1]} x {shape[2]}, file size {size / 1e9:.2f} GB, "
          f"max_memory={args.max_memory}")
    print()
    header = ("Operation", "Wall time (s)", "Peak RSS (MB)", "Result")
    rows = [(r["operation"], f"{r['time_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
             ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in r.items()
                       if k not in ("operation", "time_s", "peak_rss_mb")))
            for r in records]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    rule = "  ".join("=" * w for w in widths)
    print(rule)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print(rule)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(rule)


if __name__ == "__main__":
    main()
