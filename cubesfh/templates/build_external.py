# Licensed under a 3-clause BSD style license - see LICENSE
"""
Build extra SSP template libraries in the layout of the shipped BC03 grid.

The CNN is trained over several stellar population libraries so that it
marginalises over model systematics. This module reads, as plain data files
(``mangadap`` is never imported), the SSP spectra shipped in the
``sdss-mangadap`` wheel and puts them on exactly the grid of
``ssp_bc03_miles_chabrier.fits``:

``m11_miles``
    Maraston & Stromback (2011) models with the MILES stellar library, Salpeter
    IMF, FWHM 2.54 A, air, erg/s/A per solar mass.
``mastar``
    MaStar SSP v1.0 (Maraston et al. 2020), Salpeter IMF, vacuum, log-sampled,
    with a per-pixel resolution (``SRES`` extension). The files hold spectra of
    arbitrary normalisation; each is scaled so that its V-band (5450-5550 A)
    light per solar mass equals that of the M11-MILES SSP of the same age
    (same stellar-evolution code and IMF), at the nearest M11 metallicity that
    has that age.
``bpass``
    BPASS v2.2.1 binary populations (Eldridge, Stanway et al. 2017; IMF
    ``imf135_300``), vacuum, 1 A sampling, L_sun/A per 1e6 solar masses.

For every library the processing is the same (:func:`build_library`):

* spectra of a constant star formation rate over each of the 37 age
  sub-intervals of the BC03 grid (the ``AGES`` table), integrating the SSPs
  interpolated linearly in log age; sub-intervals outside the native ages take
  the nearest native age (``YNGFILL`` / ``OLDFILL`` header cards);
* vacuum wavelengths converted to air (Morton 2000, IAU standard);
* the optical spectra smoothed with a Gaussian to a constant FWHM (no smaller
  than the worst native resolution within 4600-7300 A) and resampled onto the
  4600-7300 A, 0.9 A grid;
* the 10 A SED grid from the library's own spectrum where it covers the pixel,
  and outside that BC03's SED of the same sub-interval and nearest metallicity,
  scaled to match the median ratio over the 100 A next to each join
  (``SEDSPLC`` card);
* living-mass fractions and nebular continuum and lines copied from BC03
  (nearest metallicity) unless the library ships its own mass file.

Run it as::

    python -m cubesfh.templates.build_external [--cache DIR] [--output-dir DIR]
        [--library m11_miles mastar bpass]
"""

import argparse
import datetime
import fnmatch
import hashlib
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits

from .._spectral import gaussian_broadening_matrix
from ._library import FLUX_UNIT, TemplateLibrary
from .build import _rebin_flux_conserving

__all__ = [
    "EXTERNAL_LIBRARIES",
    "MANGADAP_VERSION",
    "SHIPPED",
    "build_external",
    "build_library",
    "fetch_mangadap",
    "library_to_hdulist",
    "main",
    "read_ssp_set",
    "vacuum_to_air",
    "v_band_ratio",
]

MANGADAP_VERSION = "4.5.0"
_TPL_DIR = "mangadap/data/spectral_templates/"

#: V-band window (A) used to check and fix normalisations.
V_WINDOW = (5450.0, 5550.0)
#: Width (A) of the window next to each join used to scale the spliced BC03 SED.
SPLICE_WIDTH = 100.0
_FWHM_TO_SIGMA = 1.0 / np.sqrt(8.0 * np.log(2.0))
_LSUN_ERG_S = (1.0 * u.solLum).to_value(u.erg / u.s)

#: Per-library description: file pattern in the wheel, provenance and choices.
EXTERNAL_LIBRARIES = {
    "m11_miles": {
        "pattern": _TPL_DIR + "m11_miles/*.fits",
        "models": ("M11", "Maraston & Stromback (2011) stellar populations"),
        "stellib": ("MILES", "stellar library in the optical"),
        "imf": ("Salpeter", "initial mass function (Salpeter 1955)"),
        "vacuum": False,
        "fwhm": 2.54,  # A, Beifiori et al. (2011); constant
        "norm": "erg/s/A per Msun formed (file), divided by L_sun",
        "filename": "ssp_m11_miles.fits",
    },
    "mastar": {
        "pattern": _TPL_DIR + "mastar_ssp_v1.0/*.fits.gz",
        "models": ("MaStar", "MaStar SSP v1.0, Maraston et al. (2020)"),
        "stellib": ("MaStar", "SDSS-IV MaStar empirical stellar library"),
        "imf": ("Salpeter", "initial mass function (Salpeter 1955)"),
        "vacuum": True,
        "fwhm": None,  # from the SRES extension
        "norm": "files: shape only; V light/Msun of M11-MILES SSP, same age",
        "filename": "ssp_mastar.fits",
    },
    "bpass": {
        "pattern": _TPL_DIR + "bpass/*.fits",
        "models": ("BPASS", "BPASS v2.2.1 binary populations"),
        "stellib": ("BaSeL/PoWR", "theoretical atmospheres (BPASS default)"),
        "imf": ("BPASS imf135_300", "broken power law, 0.1-300 Msun"),
        "vacuum": True,
        # the config's 1.0 A is the sampling; 2.5 A (two pixels, as BC03) is adopted
        "fwhm": 1.0,
        "fwhm_min": 2.5,
        "norm": "L_sun/A per 1e6 Msun formed (file), divided by 1e6",
        "filename": "ssp_bpass.fits",
    },
}


#: Libraries shipped with cubesfh. BPASS is left out: its optical spectra come from
#: low-resolution theoretical atmospheres, so their line widths do not match any
#: FWHM of a few A (its line profiles correlate worse with BC03's the finer the
#: resolution compared); build it with ``--library bpass`` for experiments only.
SHIPPED = ("m11_miles", "mastar")


# ------------------------------------------------------------------ sources


def fetch_mangadap(cache, *, timeout=900):
    """
    Download (once) the ``sdss-mangadap`` wheel into ``cache`` with ``pip download``.

    Parameters
    ----------
    cache : str or `~pathlib.Path`
        Folder for the wheel.
    timeout : float, optional
        Seconds allowed for the download.

    Returns
    -------
    wheel : `~pathlib.Path`
    """
    from ..utils._fetch import pip_download

    return pip_download("sdss-mangadap", MANGADAP_VERSION, "sdss_mangadap-*.whl", cache,
                        binary=True, timeout=timeout)


def _members(zf, pattern):
    return sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, pattern))


def _file_digest(contents):
    """sha256 over the sorted ``name:sha256(bytes)`` lines of the source files."""
    lines = "\n".join(f"{Path(n).name}:{hashlib.sha256(b).hexdigest()}"
                      for n, b in sorted(contents.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# ------------------------------------------------------------------ physics helpers


def vacuum_to_air(wavelength):
    """
    Convert vacuum to air wavelengths (Morton 2000; the IAU standard).

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`
        Vacuum wavelengths (above 2000 A the formula applies).

    Returns
    -------
    air : `~astropy.units.Quantity`
        Air wavelengths, same unit.
    """
    lam = wavelength.to_value(u.AA)
    s2 = (1.0e4 / lam) ** 2
    n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
    return (lam / n * u.AA).to(wavelength.unit)


def _log_age_weights(native_ages, lo, hi, *, n_fine=400):
    """
    Weights ``w`` (one per native age) such that ``w @ grid`` is the mean over
    [lo, hi] (uniform in age: a constant star formation rate) of ``grid``
    interpolated linearly in log age. Ages outside the native range take the
    nearest native spectrum.
    """
    native = np.log10(native_ages)
    w = np.zeros(native.size)
    if native.size == 1:
        w[0] = 1.0
        return w
    t = np.linspace(lo, hi, n_fine)
    dt = np.full(n_fine, 1.0 / (n_fine - 1))
    dt[[0, -1]] *= 0.5
    x = np.log10(np.clip(t, native_ages[0], native_ages[-1]))
    j = np.clip(np.searchsorted(native, x, side="right") - 1, 0, native.size - 2)
    frac = (x - native[j]) / (native[j + 1] - native[j])
    np.add.at(w, j, dt * (1 - frac))
    np.add.at(w, j + 1, dt * frac)
    return w


def _smooth_to_fwhm(wave, flux, fwhm_native, fwhm_target):
    """
    Gaussian-smooth spectra (last axis, sampled at ``wave``, possibly
    non-uniform) from the resolution ``fwhm_native`` (A, scalar or per pixel)
    to the constant ``fwhm_target``. The kernel is integrated over each native
    pixel (`~cubesfh._spectral.gaussian_broadening_matrix`, the operator of
    the kinematics templates), so a zero-width kernel leaves the spectrum
    unchanged.
    """
    fwhm_native = np.broadcast_to(np.asarray(fwhm_native, float), wave.shape)
    sigma = np.sqrt(np.clip(fwhm_target**2 - fwhm_native**2, 0.0, None)) * _FWHM_TO_SIGMA
    flux = np.asarray(flux, dtype=float)
    if not np.any(sigma > 0):
        return np.array(flux)
    matrix = gaussian_broadening_matrix(np.asarray(wave, float), sigma)
    flat = flux.reshape(-1, wave.size)
    return np.asarray(matrix @ flat.T).T.reshape(flux.shape)


def _v_band(wave, flux):
    sel = (wave >= V_WINDOW[0]) & (wave <= V_WINDOW[1])
    return flux[..., sel].mean(axis=-1)


def v_band_ratio(library, reference, *, age=1.0e9 * u.yr):
    """
    Ratio of the V-band (5450-5550 A) light of the solar-metallicity template of
    the sub-interval containing ``age`` in ``library`` to that in ``reference``.

    Parameters
    ----------
    library, reference : `~cubesfh.templates.TemplateLibrary`
    age : `~astropy.units.Quantity`, optional

    Returns
    -------
    ratio : float
    """
    def one(lib):
        iz = int(np.argmin(np.abs(lib.zh)))
        edges = lib.age_edges.to_value(u.yr)
        ia = int(np.clip(np.searchsorted(edges, age.to_value(u.yr)) - 1, 0, lib.n_age - 1))
        return _v_band(lib.wavelength.to_value(u.AA), lib.flux[iz, ia])

    return float(one(library) / one(reference))


# ------------------------------------------------------------------ readers


def _wcs_wave(header, n):
    pix = np.arange(n) + 1.0 - header.get("CRPIX1", 1.0)
    crval, cdelt = header["CRVAL1"], header.get("CDELT1", header.get("CD1_1"))
    lin = crval + cdelt * pix
    return 10.0**lin if "LOG" in str(header.get("CTYPE1", "")).upper() else lin


def _read_m11(contents):
    ssps = []
    for name, data in contents.items():
        m = re.search(r"age_([0-9.]+)_z_([0-9.]+)\.fits$", name)
        with fits.open(_bytes_io(data)) as hdul:
            h = hdul[0].header
            flux = hdul[0].data.astype(float) / _LSUN_ERG_S  # erg/s/A/Msun -> L_sun/A/Msun
            wave = _wcs_wave(h, flux.size)
        ssps.append((float(m.group(1)) * 1e9, float(m.group(2)), wave, flux, 2.54))
    return ssps


def _read_mastar(contents):
    ssps = []
    for name, data in contents.items():
        m = re.search(r"A([0-9.]+)-Z([+-][0-9.]+)\.fits", name)
        with fits.open(_bytes_io(data)) as hdul:
            flux = hdul[0].data.astype(float)
            wave = _wcs_wave(hdul[0].header, flux.size)
            fwhm = wave / hdul["SRES"].data.astype(float)
        z = 0.02 * 10.0 ** float(m.group(2))
        ssps.append((float(m.group(1)) * 1e9, z, wave, flux, fwhm))
    return ssps


def _read_bpass(contents):
    ssps = []
    for name, data in contents.items():
        m = re.search(r"-z([0-9]+)-T([+-]?[0-9.]+)\.fits$", name)
        with fits.open(_bytes_io(data)) as hdul:
            flux = hdul[0].data.astype(float) / 1.0e6  # per 1e6 Msun -> per Msun
            wave = _wcs_wave(hdul[0].header, flux.size)
        z = float("0." + m.group(1))
        ssps.append((10.0 ** float(m.group(2)) * 1e9, z, wave, flux, 1.0))
    return ssps


def _bytes_io(data):
    import gzip
    import io

    return io.BytesIO(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def read_ssp_set(wheel, name):
    """
    Read one SSP set of the ``sdss-mangadap`` wheel as data files.

    Parameters
    ----------
    wheel : str or `~pathlib.Path`
        The ``sdss-mangadap`` wheel.
    name : str
        One of :data:`EXTERNAL_LIBRARIES`.

    Returns
    -------
    ssps : list of tuple
        ``(age_yr, Z, wavelength_A, flux, fwhm_A)`` per file, wavelengths as in
        the files (vacuum for ``mastar`` and ``bpass``), flux in L_sun/A per
        solar mass formed except for ``mastar`` (arbitrary normalisation).
    digest : str
        sha256 of the list of file names and contents.
    n_files : int
    """
    from ..utils import CubeSFHError

    if name not in EXTERNAL_LIBRARIES:
        msg = f"Unknown library {name!r}; choose one of {sorted(EXTERNAL_LIBRARIES)}."
        raise CubeSFHError(msg)
    spec = EXTERNAL_LIBRARIES[name]
    with zipfile.ZipFile(wheel) as zf:
        members = _members(zf, spec["pattern"])
        if not members:
            msg = (f"{Path(wheel).name} has no files {spec['pattern']}; fetch "
                   f"sdss-mangadap=={MANGADAP_VERSION} again.")
            raise CubeSFHError(msg)
        contents = {n: zf.read(n) for n in members}
    reader = {"m11_miles": _read_m11, "mastar": _read_mastar, "bpass": _read_bpass}[name]
    return reader(contents), _file_digest(contents), len(members)


def _group(ssps):
    """Group SSP tuples by metallicity: {Z: (ages, flux (n_age, n_wave), wave, fwhm)}."""
    out = {}
    for z in sorted({s[1] for s in ssps}):
        sel = sorted((s for s in ssps if s[1] == z), key=lambda s: s[0])
        wave = sel[0][2]
        if any(s[2].size != wave.size or not np.allclose(s[2], wave) for s in sel):
            msg = f"SSPs of Z={z} are not on one wavelength grid"
            raise ValueError(msg)
        fwhm = np.max([np.broadcast_to(s[4], wave.shape) for s in sel], axis=0)
        out[z] = (np.array([s[0] for s in sel]), np.stack([s[3] for s in sel]), wave, fwhm)
    return out


def _normalise_to_reference(ssps, reference):
    """
    Scale each SSP so that its V-band light per solar mass equals that of the
    ``reference`` SSP set (log-age interpolation, nearest reference
    metallicity among those whose ages bracket it, else the nearest).
    """
    ref = _group(reference)
    ref_zh = {z: np.log10(z / 0.02) for z in ref}
    out = []
    for age, z, wave, flux, fwhm in ssps:
        zh = np.log10(z / 0.02)
        order = sorted(ref, key=lambda zr: abs(ref_zh[zr] - zh))
        cover = [zr for zr in order if ref[zr][0][0] <= age <= ref[zr][0][-1]]
        zr = cover[0] if cover else order[0]
        ages, rflux, rwave, _ = ref[zr]
        lv = np.interp(np.log10(age), np.log10(ages), _v_band(rwave, rflux))
        out.append((age, z, wave, flux * lv / _v_band(wave, flux), fwhm))
    return out


# ------------------------------------------------------------------ the builder


def _nearest(values, target):
    return int(np.argmin(np.abs(np.asarray(values) - target)))


def _positive_range(wave, flux, opt_wave):
    """Wavelength range, around the optical one, where every SSP has positive flux."""
    good = np.all(flux > 0, axis=0)
    centre = int(np.searchsorted(wave, 0.5 * (opt_wave[0] + opt_wave[-1])))
    bad = np.flatnonzero(~good)
    lo = bad[bad < centre].max() + 1 if np.any(bad < centre) else 0
    hi = bad[bad > centre].min() - 1 if np.any(bad > centre) else wave.size - 1
    if wave[lo] > opt_wave[0] or wave[hi] < opt_wave[-1]:
        msg = (f"Some SSPs have zero or negative flux inside the optical range "
               f"{opt_wave[0]:.0f}-{opt_wave[-1]:.0f} A; they cannot be used.")
        raise ValueError(msg)
    return wave[lo], wave[hi]


def _splice_sed(own, covered, bc03_sed, n_join):
    """Fill the uncovered pixels of ``own`` with ``bc03_sed`` scaled at each join."""
    out = np.where(covered, own, 0.0)
    idx = np.flatnonzero(covered)
    lo, hi = idx[0], idx[-1]
    if lo > 0:
        win = slice(lo, lo + n_join)
        scale = np.median(own[win] / bc03_sed[win])
        out[:lo] = bc03_sed[:lo] * scale
    if hi < own.size - 1:
        win = slice(hi - n_join + 1, hi + 1)
        scale = np.median(own[win] / bc03_sed[win])
        out[hi + 1:] = bc03_sed[hi + 1:] * scale
    return out


def build_library(ssps, bc03, *, fwhm=None, fwhm_min=None, vacuum=False, living=None,
                  meta=None):
    """
    Put a set of SSP spectra on the sub-interval grid of the BC03 library.

    Parameters
    ----------
    ssps : list of tuple
        ``(age_yr, Z, wavelength_A, flux, fwhm_A)``, flux in L_sun/A per solar
        mass formed; all SSPs of one Z on one wavelength grid.
    bc03 : `~cubesfh.templates.TemplateLibrary`
        The reference library: its ages, grids, SEDs (for the splice), living
        fractions and nebular emission are used.
    fwhm : float, optional
        Target constant FWHM (A) of the optical spectra; by default the worst
        native FWHM within the optical range (rounded up to 0.01 A).
    fwhm_min : float, optional
        Lower limit on the target FWHM.
    vacuum : bool, optional
        Whether the SSP wavelengths are in vacuum (converted to air).
    living : callable, optional
        ``living(Z, weights_fn)`` returning the living-mass fractions of the 37
        sub-intervals; by default BC03's of the nearest metallicity.
    meta : `~astropy.io.fits.Header`, optional
        Provenance cards to start from.

    Returns
    -------
    library : `~cubesfh.templates.TemplateLibrary`
        With header cards FWHM, YNGFILL, OLDFILL, SEDSPLC, LIVSRC, NEBSRC,
        WAVEAIR, ZSUN, BUNIT and AGEMODE added to ``meta``.
    """
    from cubesfh.conventions import Z_SUN

    groups = _group(ssps)
    opt_wave = bc03.wavelength.to_value(u.AA)
    sed_wave = bc03.sed_wavelength.to_value(u.AA)
    step = np.diff(sed_wave).mean()
    sed_edges = np.append(sed_wave - step / 2, sed_wave[-1] + step / 2)
    edges = bc03.age_edges.to_value(u.yr)
    bc03_zh = bc03.zh

    # wavelengths in air, target resolution
    air = {}
    worst = 0.0
    for z, (_, _, wave, fw) in groups.items():
        w = vacuum_to_air(wave * u.AA).to_value(u.AA) if vacuum else np.array(wave, float)
        fw_air = fw * (w / wave)
        air[z] = (w, fw_air)
        opt = (w >= opt_wave[0]) & (w <= opt_wave[-1])
        if w[0] > opt_wave[0] or w[-1] < opt_wave[-1]:
            msg = (f"SSPs of Z={z} cover {w[0]:.0f}-{w[-1]:.0f} A, not the optical range "
                   f"{opt_wave[0]:.0f}-{opt_wave[-1]:.0f} A; they cannot be used.")
            raise ValueError(msg)
        worst = max(worst, float(np.max(fw_air[opt])))
    target = fwhm if fwhm is not None else np.ceil(worst * 100.0) / 100.0
    if fwhm_min is not None:
        target = max(target, fwhm_min)
    if target < worst - 1e-6:
        msg = (f"Requested FWHM {target} A is finer than the library's worst resolution "
               f"{worst:.2f} A within the optical range; use fwhm >= {worst:.2f}.")
        raise ValueError(msg)

    flux_opt, flux_sed, liv, neb_sed, neb_lines, zs = [], [], [], [], [], []
    yng, old, splice = [], [], []
    n_join = int(round(SPLICE_WIDTH / step))
    for z, (ages, flux, _, _) in groups.items():
        w, fw = air[z]
        weights = np.stack([_log_age_weights(ages, lo, hi)
                            for lo, hi in zip(edges[:-1], edges[1:])])
        spec = weights @ flux  # (37, n_wave)
        smooth = _smooth_to_fwhm(w, spec, fw, target)
        flux_opt.append(np.stack([np.interp(opt_wave, w, s) for s in smooth]))
        w_lo, w_hi = _positive_range(w, flux, opt_wave)
        covered = (sed_edges[:-1] >= w_lo) & (sed_edges[1:] <= w_hi)
        own = np.zeros((spec.shape[0], sed_wave.size))
        own[:, covered] = _rebin_flux_conserving(w, spec, sed_edges[np.r_[
            np.flatnonzero(covered), np.flatnonzero(covered)[-1] + 1]])
        kz = _nearest(bc03_zh, np.log10(z / Z_SUN))
        flux_sed.append(np.stack([_splice_sed(o, covered, b, n_join)
                                  for o, b in zip(own, bc03.sed_flux[kz].astype(float))]))
        liv.append(living(z, weights) if living is not None
                   else np.asarray(bc03.living_fraction[kz], float))
        neb_sed.append(bc03.nebular_sed[kz])
        neb_lines.append(bc03.nebular_lines[kz])
        zs.append(z)
        yng.append(ages[0])
        old.append(ages[-1])
        splice.append((sed_edges[:-1][covered][0], sed_edges[1:][covered][-1]))

    h = fits.Header() if meta is None else meta.copy()
    zh = np.log10(np.array(zs) / Z_SUN)
    h["FWHM"] = (float(target), "[Angstrom] constant FWHM of FLUX_OPT")
    h["FWHMNAT"] = (round(worst, 3), "[Angstrom] worst native FWHM 4600-7300 A")
    h["WAVEAIR"] = (True, "wavelengths are in air" + (" (from vacuum)" if vacuum else ""))
    h["ZSUN"] = (Z_SUN, "solar metallicity, [Z/H] = log10(Z/ZSUN)")
    h["BUNIT"] = ("solLum / (Angstrom solMass)", "per solar mass formed")
    h["AGEMODE"] = ("constant SFR in each sub-interval", "SSPs interpolated in log age")
    h["YNGFILL"] = (float(max(yng)), "[yr] younger ages use it (max over Z)")
    h["OLDFILL"] = (float(min(old)), "[yr] older ages use it (min over Z)")
    blue = max(s[0] for s in splice)
    red = min(s[1] for s in splice)
    sed_lo, sed_hi = sed_edges[0], sed_edges[-1]
    spliced = [f"<{blue:.0f}"] if blue > sed_lo else []
    spliced += [f">{red:.0f}"] if red < sed_hi else []
    h["SEDSPLC"] = (" ".join(spliced) or "none", "[A] SED spliced from BC03 (scaled)")
    h.setdefault("LIVSRC", ("BC03 (nearest Z)", "source of the living-mass fractions"))
    h["NEBSRC"] = ("BC03 Cloudy (nearest Z)", "nebular continuum and lines copied")
    for zhk, a0, a1, (b, r) in zip(zh, yng, old, splice):
        h.add_history(f"[Z/H]={zhk:+.2f}: SSP ages {a0 / 1e6:.4g} Myr-{a1 / 1e9:.4g} Gyr, "
                      f"own SED {b:.0f}-{r:.0f} A")
    h.add_history("nebular continuum and lines of the young sub-intervals are BC03's "
                  "(Cloudy, log U=-3) at the nearest metallicity")

    ages_rep = bc03.ages.copy()
    return TemplateLibrary(
        wavelength=bc03.wavelength.copy(),
        flux=np.stack(flux_opt).astype(np.float32),
        sed_wavelength=bc03.sed_wavelength.copy(),
        sed_flux=np.stack(flux_sed).astype(np.float32),
        fwhm=float(target) * u.AA,
        age_edges=bc03.age_edges.copy(),
        ages=ages_rep,
        age_bin=np.array(bc03.age_bin),
        metallicity=np.array(zs, dtype=float),
        living_fraction=np.stack(liv).astype(float),
        nebular_sed=np.stack(neb_sed).astype(np.float32),
        nebular_lines=np.stack(neb_lines).astype(float),
        line_wavelength=bc03.line_wavelength.copy(),
        line_names=list(bc03.line_names),
        meta=h,
    )


def library_to_hdulist(library):
    """
    The FITS layout of ``ssp_bc03_miles_chabrier.fits`` for a library.

    Parameters
    ----------
    library : `~cubesfh.templates.TemplateLibrary`

    Returns
    -------
    hdul : `~astropy.io.fits.HDUList`
        Write it with ``hdul.writeto(path, checksum=True)``.
    """
    from cubesfh.conventions import Z_SUN

    bunit = FLUX_UNIT.to_string()

    def image(data, name, unit=None):
        hdu = fits.ImageHDU(np.asarray(data, dtype=np.float32), name=name)
        if unit is not None:
            hdu.header["BUNIT"] = unit
        return hdu

    def grid(hdu, wave):
        w = wave.to_value(u.AA)
        hdu.header["CRVAL1"], hdu.header["CDELT1"], hdu.header["CRPIX1"] = (
            float(w[0]), float(np.round(np.diff(w).mean(), 6)), 1.0)
        hdu.header["CTYPE1"], hdu.header["CUNIT1"] = "AWAV", "Angstrom"
        return hdu

    edges = library.age_edges.to_value(u.yr)
    opt = grid(image(library.flux, "FLUX_OPT", bunit), library.wavelength)
    opt.header["COMMENT"] = "axes (numpy order): metallicity, age, wavelength"
    sed = grid(image(library.sed_flux, "FLUX_SED", bunit), library.sed_wavelength)
    sed.header["COMMENT"] = "pixel means over 10 A bins (flux conserving)"
    neb = grid(image(library.nebular_sed, "NEB_SED", bunit), library.sed_wavelength)
    neb.header["COMMENT"] = "nebular continuum of the youngest sub-intervals (see AGES.NEBULAR)"
    lines = image(library.nebular_lines, "NEB_LINES", "solLum / solMass")
    liv = image(library.living_fraction, "LIVING", "")
    source = library.meta.get("LIVSRC", "?")
    liv.header["COMMENT"] = f"fraction of the formed mass in living stars ({source})"
    young = np.zeros(library.n_age, bool)
    young[:library.n_nebular] = True
    age_tab = fits.BinTableHDU.from_columns([
        fits.Column("AGE", "D", unit="yr", array=library.ages.to_value(u.yr)),
        fits.Column("AGE_LO", "D", unit="yr", array=edges[:-1]),
        fits.Column("AGE_HI", "D", unit="yr", array=edges[1:]),
        fits.Column("AGE_BIN", "J", array=library.age_bin),
        fits.Column("NEBULAR", "L", array=young),
    ], name="AGES")
    z_tab = fits.BinTableHDU.from_columns([
        fits.Column("Z", "D", array=library.metallicity),
        fits.Column("ZH", "D", array=np.log10(library.metallicity / Z_SUN)),
    ], name="METALLICITY")
    line_tab = fits.BinTableHDU.from_columns([
        fits.Column("NAME", "20A", array=np.array(library.line_names)),
        fits.Column("WAVELENGTH", "D", unit="Angstrom",
                    array=library.line_wavelength.to_value(u.AA)),
    ], name="LINES")
    prim = fits.PrimaryHDU(header=library.meta.copy())
    return fits.HDUList([prim, opt, sed, liv, neb, lines, age_tab, z_tab, line_tab])


def _provenance(name, wheel, digest, n_files, *, srcpkg, extra=()):
    from cubesfh import __version__

    from ..utils import sha256_file

    spec = EXTERNAL_LIBRARIES.get(name, {})
    h = fits.Header()
    h["ORIGIN"] = ("cubesfh", "built by cubesfh.templates.build_external")
    h["CSFHVER"] = (__version__, "cubesfh version of the build")
    h["DATE"] = (datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                 "UTC build date")
    h["LIBNAME"] = (name, "cubesfh library name")
    for key in ("models", "stellib", "imf"):
        if key in spec:
            h[key.upper()] = spec[key]
    h["SRCPKG"] = (srcpkg, "PyPI distribution holding the source SSPs")
    h["SRCWHL"] = (Path(wheel).name, "source file")
    h["SRCSHA"] = (sha256_file(wheel)[:32], "sha256 of the source, 32 hex")
    if "pattern" in spec:
        h["STELFILE"] = (spec["pattern"].removeprefix(_TPL_DIR), "SSP files in the wheel")
    h["STELSHA"] = (digest[:32], "sha256 of name:sha256 list")
    h["NFILES"] = (n_files, "number of SSP files read")
    if "norm" in spec:
        h["NORMSRC"] = spec["norm"]
    for key, value in extra:
        h[key] = value
    return h


def build_external(name, wheel, bc03=None):
    """
    Build one of :data:`EXTERNAL_LIBRARIES` from the ``sdss-mangadap`` wheel.

    Parameters
    ----------
    name : str
        ``"m11_miles"``, ``"mastar"`` or ``"bpass"``.
    wheel : str or `~pathlib.Path`
        The ``sdss-mangadap`` wheel.
    bc03 : `~cubesfh.templates.TemplateLibrary`, optional
        Reference library (default: the shipped BC03 one).

    Returns
    -------
    library : `~cubesfh.templates.TemplateLibrary`
    """
    bc03 = TemplateLibrary.load() if bc03 is None else bc03
    spec = EXTERNAL_LIBRARIES[name]
    ssps, digest, n_files = read_ssp_set(wheel, name)
    if name == "mastar":
        reference, _, _ = read_ssp_set(wheel, "m11_miles")
        ssps = _normalise_to_reference(ssps, reference)
    meta = _provenance(name, wheel, digest, n_files,
                       srcpkg=f"sdss-mangadap=={MANGADAP_VERSION}")
    lib = build_library(ssps, bc03, fwhm=spec["fwhm"], fwhm_min=spec.get("fwhm_min"),
                        vacuum=spec["vacuum"], meta=meta)
    _finish(lib, bc03)
    return lib


def _finish(lib, bc03):
    ratio = v_band_ratio(lib, bc03)
    lib.meta["VRATIO"] = (round(ratio, 4), "V light, solar 1 Gyr, over BC03's")
    lib.meta["COMMENT"] = (f"V-band (5450-5550 A) light of the solar-metallicity 1 Gyr "
                           f"sub-interval is {ratio:.3f} x BC03's (IMF and model differences).")
    lib.meta["COMMENT"] = ("Derived grid for cubesfh; rebuild: "
                           "python -m cubesfh.templates.build_external")


def main(argv=None):
    """Command-line entry point (``python -m cubesfh.templates.build_external``)."""
    parser = argparse.ArgumentParser(
        prog="python -m cubesfh.templates.build_external",
        description="Build cubesfh template libraries from the SSP grids of the "
                    f"sdss-mangadap=={MANGADAP_VERSION} wheel (fetched with pip download).")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "cubesfh" / "sources"),
                        help="folder for the downloaded wheel")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "data"),
                        help="where to write the FITS files (default: the package data folder)")
    parser.add_argument("--library", nargs="+", default=list(SHIPPED),
                        choices=list(EXTERNAL_LIBRARIES), help="libraries to build")
    args = parser.parse_args(argv)
    wheel = fetch_mangadap(args.cache)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    bc03 = TemplateLibrary.load()
    for name in args.library:
        lib = build_external(name, wheel, bc03)
        path = out / EXTERNAL_LIBRARIES[name]["filename"]
        library_to_hdulist(lib).writeto(path, overwrite=True, checksum=True)
        print(f"{name}: wrote {path} ({path.stat().st_size / 1e6:.2f} MB), "
              f"[Z/H] = {np.round(lib.zh, 2).tolist()}, FWHM {lib.fwhm:.2f}, "
              f"V(1 Gyr, solar) / BC03 = {lib.meta['VRATIO']:.3f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
