# Licensed under a 3-clause BSD style license - see LICENSE
"""
Systemic redshift of a cube when none is given.

A user should not have to know the redshift of a galaxy before running
cubesfh. :func:`estimate_redshift` finds it in two steps:

1. **Cross-correlation** over a coarse grid (default ``-0.005 <= z <= 0.5``):
   the co-added spectrum of the brightest spaxels
   (:func:`galaxy_spectrum`) and a handful of bundled templates (constant
   star formation over young to old age bins, solar metallicity, broadened to
   150 km/s) are log-rebinned to 50 km/s pixels, divided by a running median
   (continuum removed), stripped of positive outliers (emission lines) and of
   the strongest sky lines and telluric bands, and correlated at every integer
   shift. The ``n_candidates`` highest peaks at least 1500 km/s apart are kept.
2. **pPXF refinement** of each candidate: two fits of the stellar velocity in
   the frame of the candidate (emission lines masked there), exactly as the
   per-bin kinematics do (:func:`~cubesfh.kinematics.fit_spectrum`). The
   candidate with the lowest chi^2 is the estimate.

The result (:class:`RedshiftEstimate`) says how it was found and how clear the
peak was; :func:`~cubesfh.preprocess.prepare_observation` uses it as the
systemic redshift and centres the binning S/N window on the rest-frame
5300-5500 A.
"""

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
from astropy import units as u
from astropy.constants import c as _speed_of_light

from .lsf import muse_lsf_fwhm
from .utils.exceptions import CubeSFHError, CubeSFHWarning

__all__ = ["RedshiftEstimate", "estimate_redshift", "galaxy_spectrum",
           "redshift_from_spectrum"]

log = logging.getLogger(__name__)

_C_KMS = _speed_of_light.to_value(u.km / u.s)
_KMS = u.km / u.s

#: Pixel size of the cross-correlation grid, km/s.
_XCOR_VELSCALE = 50.0
#: Half-width of the running median that defines the continuum, km/s.
_CONTINUUM_HALF_WIDTH = 5000.0
#: Observed-frame sky lines and telluric bands ignored by the cross-correlation
#: (Angstrom, air): [OI] 5577, Na D, [OI] 6300/6364, the O2 B and A bands.
_SKY_WINDOWS = ((5570.0, 5586.0), (5884.0, 5900.0), (6295.0, 6306.0), (6358.0, 6369.0),
                (6860.0, 6960.0), (7585.0, 7720.0))
#: Age bins (of 16) of the cross-correlation templates: ~10 Myr to ~10 Gyr.
_XCOR_AGE_BINS = (1, 4, 7, 10, 13, 15)
#: Candidates closer than this (km/s) to a higher peak are the same peak.
_PEAK_SEPARATION = 1500.0


@dataclass(frozen=True)
class RedshiftEstimate:
    """
    Result of :func:`estimate_redshift` / :func:`redshift_from_spectrum`.

    Attributes
    ----------
    z : float
        Systemic redshift (of the stellar continuum).
    z_err : float
        Formal 1-sigma error of ``z`` from the pPXF fit.
    correlation : float
        Normalised cross-correlation at the chosen peak (1 is a perfect
        match; galaxy spectra at S/N ~ 50 give 0.5-0.9).
    contrast : float
        Reduced chi^2 of the next-best candidate over that of ``z`` (well
        above 1 when the redshift is unambiguous, ~1 when another redshift
        fits almost as well; infinite when only one candidate could be fitted).
    chi2 : float
        Reduced chi^2 of the pPXF fit at ``z``.
    candidates : tuple of float
        Redshifts of the cross-correlation peaks that were refined.
    n_spaxels : int
        Number of spaxels co-added (0 for a spectrum given directly).
    method : str
        ``'xcor+ppxf'``.
    """

    z: float
    z_err: float
    correlation: float
    contrast: float
    chi2: float
    candidates: tuple = field(default_factory=tuple)
    n_spaxels: int = 0
    method: str = "xcor+ppxf"

    @property
    def cz(self):
        """``c z`` as a Quantity (km/s)."""
        return self.z * _C_KMS * _KMS

    def __str__(self):
        return (f"z = {self.z:.5f} +- {self.z_err:.5f} (cz = {self.z * _C_KMS:.0f} km/s; "
                f"cross-correlation peak {self.correlation:.2f}, contrast "
                f"{self.contrast:.2f}, chi2 {self.chi2:.2f})")


# --------------------------------------------------------------------------- spectrum


def galaxy_spectrum(cube, *, fraction=0.2, max_spaxels=400, mask=None, max_memory=None,
                    progress_bar=False):
    """
    Mean spectrum of the brightest spaxels of a cube.

    The spaxels are ranked by their mean flux in a 400 A window at the middle
    of the cube's wavelength range (any window works: the redshift is not
    known yet); the brightest ``fraction`` of the valid ones (at most
    ``max_spaxels``, at least 9) are averaged. Only the bounding box of those
    spaxels is read, chunk by chunk (`~cubesfh.Cube.iter_chunks`).

    Foreground stars are among the brightest spaxels of many fields: exclude
    them with ``mask`` (or the ``regions`` of
    :func:`~cubesfh.preprocess.prepare_observation`), or they pull the
    estimate towards z = 0.

    Parameters
    ----------
    cube : `~cubesfh.Cube`
    fraction : float, optional
        Fraction of the valid spaxels used (default 0.2).
    max_spaxels : int, optional
        At most this many spaxels (default 400).
    mask : `~numpy.ndarray`, optional
        ``(ny, nx)`` boolean, `True` for spaxels to ignore.
    max_memory : `~astropy.units.Quantity` or int, optional
        See `~cubesfh.Cube.iter_chunks`.
    progress_bar : bool, optional
        Show progress bars.

    Returns
    -------
    wavelength : `~astropy.units.Quantity`
        The cube's wavelengths.
    flux, variance : `~numpy.ndarray`
        Mean spectrum (cube unit) and its variance; NaN where no spaxel has a
        good pixel.
    n_spaxels : int
        Number of spaxels averaged.
    """
    if not 0 < fraction <= 1:
        msg = f"fraction must be in (0, 1]; got {fraction}."
        raise CubeSFHError(msg)
    lam = cube.wavelength.to_value(u.AA)
    mid = 0.5 * (lam[0] + lam[-1])
    window = (max(lam[0], mid - 200.0), min(lam[-1], mid + 200.0)) * u.AA
    signal, _ = cube.signal_noise(window, max_memory=max_memory, progress_bar=progress_bar)
    signal = signal.value
    valid = np.isfinite(signal) & (signal > 0)
    if mask is not None:
        valid &= ~np.asarray(mask, dtype=bool)
    n_valid = int(valid.sum())
    if n_valid == 0:
        msg = ("The cube has no spaxel with a positive mean flux in "
               f"{window[0].value:.0f}-{window[1].value:.0f} A, so its redshift cannot be "
               "estimated; check the cube (DATA, DQ) or pass redshift= (--redshift).")
        raise CubeSFHError(msg)
    n_use = int(np.clip(round(fraction * n_valid), min(9, n_valid), max_spaxels))
    order = np.argsort(np.where(valid, signal, -np.inf), axis=None)[::-1][:n_use]
    ys, xs = np.unravel_index(order, signal.shape)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    select = np.zeros(signal.shape, dtype=bool)
    select[ys, xs] = True
    sub = cube[:, y0:y1, x0:x1]
    sel = select[y0:y1, x0:x1]
    total = np.zeros(lam.size)
    total_var = np.zeros(lam.size)
    count = np.zeros(lam.size)
    for rows, data, variance, bad in sub.iter_chunks(max_memory=max_memory,
                                                     progress_bar=progress_bar):
        use = (~bad) & sel[rows][np.newaxis]
        total += np.where(use, data, 0.0).sum(axis=(1, 2), dtype=np.float64)
        if variance is not None:
            total_var += np.where(use, variance, 0.0).sum(axis=(1, 2), dtype=np.float64)
        count += use.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.where(count > 0, total / count, np.nan)
        var = np.where(count > 0, total_var / count**2, np.nan)
    if not np.any(var > 0):
        var = None
    return cube.wavelength, flux, var, n_use


# --------------------------------------------------------------------------- cross-correlation


def _running_median(y, good, half):
    """Median of the good values of ``y`` within +-``half`` pixels (coarse, by blocks)."""
    n = y.size
    step = max(1, half // 4)
    centres = np.arange(0, n, step)
    med = np.full(centres.size, np.nan)
    for k, c in enumerate(centres):
        lo, hi = max(0, c - half), min(n, c + half + 1)
        v = y[lo:hi][good[lo:hi]]
        if v.size > 0.2 * (hi - lo):
            med[k] = np.median(v)
    ok = np.isfinite(med)
    if not ok.any():
        return np.full(n, np.nan)
    return np.interp(np.arange(n), centres[ok], med[ok])


def _high_pass(flux, good, noise=None, *, clip_positive=3.0, clip_negative=12.0):
    """
    Continuum-divided, zero-mean spectrum; outliers and bad pixels set to 0.

    With ``noise``, pixels noisier than the median (sky lines, the red end)
    are down-weighted by their S/N relative to the median S/N.
    """
    half = int(_CONTINUUM_HALF_WIDTH / _XCOR_VELSCALE)
    cont = _running_median(flux, good, half)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = flux / cont - 1.0
    good = good & np.isfinite(g) & (cont > 0)
    if good.sum() < 50:
        return np.zeros_like(flux), good
    if noise is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = noise / cont
        good &= np.isfinite(rel) & (rel > 0)
        scale = np.median(rel[good])
        weight = np.where(good, np.minimum(1.0, scale / np.where(good, rel, 1.0)), 0.0)
        # clip in units of the noise: emission lines and sky residuals are
        # positive outliers; absorption lines are kept unless absurdly deep
        zs = np.where(good, g / np.where(good, rel, 1.0), 0.0)
    else:
        weight = np.ones_like(g)
        zs = g
    r = zs[good]
    sig = 1.4826 * np.median(np.abs(r - np.median(r)))
    if sig > 0:
        good &= (zs < clip_positive * sig) & (zs > -clip_negative * sig)
    g = np.where(good, g * weight, 0.0)
    g[good] -= g[good].mean()
    # taper the ends so that the edges do not correlate
    n_taper = max(1, int(0.05 * flux.size))
    taper = np.ones(flux.size)
    ramp = 0.5 * (1 - np.cos(np.linspace(0, np.pi, n_taper)))
    taper[:n_taper] = ramp
    taper[-n_taper:] = ramp[::-1]
    return g * taper, good


def _xcor_templates(library, ln0, n_pix):
    """High-passed templates on the lattice ``ln0 + k * dln``, k = 0..n_pix-1."""
    from scipy.ndimage import gaussian_filter1d

    lam_t = library.wavelength.to_value(u.AA)
    binned = library.binned()  # (n_Z, 16, n_lambda)
    iz = int(np.argmin(np.abs(library.zh)))
    dlam = float(np.median(np.diff(lam_t)))
    # 150 km/s of stellar dispersion (the LSF is about the templates' own)
    sigma_pix = 150.0 / _C_KMS * float(np.median(lam_t)) / dlam
    dln = _XCOR_VELSCALE / _C_KMS
    ln = ln0 + dln * np.arange(n_pix)
    out = []
    for b in _XCOR_AGE_BINS:
        t = gaussian_filter1d(binned[iz, b], sigma_pix)
        ti = np.interp(ln, np.log(lam_t), t, left=np.nan, right=np.nan)
        good = np.isfinite(ti)
        ti = np.where(good, ti, 0.0)
        hp, _ = _high_pass(ti, good, clip_positive=np.inf, clip_negative=np.inf)
        out.append(hp)
    return np.array(out)


def _cross_correlate(g, templates, shifts, k0, *, min_overlap):
    """
    Normalised correlation r[t, s] of ``g`` (galaxy lattice) with each template.

    Galaxy pixel ``j`` is matched with template pixel ``j - s - k0``.
    """
    n_g = g.size
    n_t = templates.shape[1]
    g2 = np.concatenate([[0.0], np.cumsum(g**2)])
    t2 = np.concatenate([np.zeros((templates.shape[0], 1)), np.cumsum(templates**2, axis=1)],
                        axis=1)
    r = np.zeros((templates.shape[0], shifts.size))
    for i, s in enumerate(shifts):
        off = s + k0
        j0, j1 = max(0, off), min(n_g, off + n_t)
        if j1 - j0 < min_overlap:
            continue
        gs = g[j0:j1]
        ts = templates[:, j0 - off:j1 - off]
        num = ts @ gs
        den = np.sqrt((g2[j1] - g2[j0]) * (t2[:, j1 - off] - t2[:, j0 - off]))
        with np.errstate(invalid="ignore", divide="ignore"):
            r[:, i] = np.where(den > 0, num / den, 0.0)
    return r


def _peaks(curve, n, min_sep):
    """Indices of the ``n`` highest local maxima at least ``min_sep`` apart."""
    inner = (curve[1:-1] >= curve[:-2]) & (curve[1:-1] >= curve[2:])
    idx = np.flatnonzero(inner) + 1
    idx = idx[np.argsort(curve[idx])[::-1]]
    chosen = []
    for i in idx:
        if all(abs(i - j) >= min_sep for j in chosen):
            chosen.append(int(i))
        if len(chosen) == n:
            break
    return chosen


def _refine(wave, flux, var, z, library, lsf, degree):
    """Two pPXF fits in the frame of ``z``; returns (z, z_err, chi2) or None."""
    from .kinematics import (
        KinematicsFlag,
        _fit_mask,
        fit_spectrum,
        log_rebin_spectra,
        prepare_templates,
    )

    lam = wave
    for _ in range(2):
        margin = 1 + 2500.0 / _C_KMS
        lo = max(4800.0, lam[0] / (1 + z) * margin)
        hi = min(7000.0, lam[-1] / (1 + z) / margin)
        if hi - lo < 500.0:
            return None
        fit_range = (lo, hi) * u.AA
        try:
            spec = log_rebin_spectra(lam * u.AA, flux, var, redshift=z, fit_range=fit_range)
            temp = prepare_templates(library, velscale=spec.velscale, redshift=z, lsf=lsf,
                                     fit_range=fit_range)
        except CubeSFHError as exc:
            log.debug("redshift refinement at z=%.5f skipped: %s", z, exc)
            return None
        good = _fit_mask(spec, redshift=z, mask_emission=True, mask_width=800 * _KMS,
                         mask_nad=False) & spec.valid[0]
        fit = fit_spectrum(spec.flux[0], spec.noise[0], spec.lam, temp, mask=good,
                           start=(0.0, 150.0), degree=degree)
        if fit.flag != KinematicsFlag.OK:
            return None
        z = (1.0 + z) * np.exp(fit.velocity / _C_KMS) - 1.0
    z_err = (1.0 + z) * fit.velocity_err / _C_KMS
    return z, z_err, fit.chi2


def redshift_from_spectrum(wavelength, flux, variance=None, *, z_range=(-0.005, 0.5),
                           templates=None, lsf=muse_lsf_fwhm, n_candidates=3, degree=8,
                           n_spaxels=0):
    """
    Systemic redshift of one galaxy spectrum (cross-correlation, then pPXF).

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`
        Observed (air) wavelengths, increasing.
    flux : array-like
        The spectrum (any flux unit); NaN pixels are ignored.
    variance : array-like, optional
        Its variance; without it the pPXF refinement weights all pixels equally
        (noise estimated from the residuals of a first fit).
    z_range : tuple of float, optional
        Redshifts searched by the cross-correlation (default -0.005 to 0.5).
    templates : `~cubesfh.templates.TemplateLibrary`, optional
        Default: the bundled library (the one of the kinematics).
    lsf : callable or `~astropy.units.Quantity`, optional
        Line-spread function FWHM of the data (default MUSE's).
    n_candidates : int, optional
        Cross-correlation peaks refined with pPXF (default 3).
    degree : int, optional
        Additive polynomial degree of the pPXF refinement.
    n_spaxels : int, optional
        Recorded in the result.

    Returns
    -------
    estimate : `RedshiftEstimate`

    Raises
    ------
    CubeSFHError
        If the spectrum has too few valid pixels or no candidate could be fitted.
    """
    if templates is None:
        from .templates import TemplateLibrary

        templates = TemplateLibrary.load()
    lam = np.asarray(u.Quantity(wavelength, u.AA).value, float)
    flux = np.asarray(flux, float)
    if variance is None:
        finite = np.isfinite(flux)
        level = np.median(np.abs(flux[finite])) if finite.any() else np.nan
        var = np.where(finite, 1e-4 * level**2, np.nan)
    else:
        var = np.asarray(variance, float)
    fail = ("Could not estimate the systemic redshift: {}. Pass it yourself: "
            "redshift= (z, or cz as a velocity Quantity), or --redshift on the command line.")
    good = np.isfinite(flux) & np.isfinite(var) & (var > 0)
    for lo, hi in _SKY_WINDOWS:
        good &= ~((lam >= lo) & (lam <= hi))
    if good.sum() < 200:
        raise CubeSFHError(fail.format(f"only {int(good.sum())} valid pixels"))

    from .kinematics import _log_rebin_matrix

    matrix, ln_lam, _ = _log_rebin_matrix(lam, _XCOR_VELSCALE)
    f_log = matrix @ np.where(good, flux, 0.0)
    noise_log = np.sqrt(matrix.power(2) @ np.where(good, var, 0.0))
    cover = matrix @ good.astype(float)
    good_log = cover > 0.99
    g, good_log = _high_pass(f_log, good_log, noise_log)
    if good_log.sum() < 200:
        raise CubeSFHError(fail.format("too few pixels left after removing sky lines, "
                                       "emission lines and the continuum"))

    dln = _XCOR_VELSCALE / _C_KMS
    lam_t = templates.wavelength.to_value(u.AA)
    k0 = int(np.floor((np.log(lam_t[0]) - ln_lam[0]) / dln)) + 1
    n_t = int(np.floor((np.log(lam_t[-1]) - ln_lam[0]) / dln)) - k0
    tmpl = _xcor_templates(templates, ln_lam[0] + k0 * dln, n_t)
    s_lo = int(np.floor(np.log1p(z_range[0]) / dln))
    s_hi = int(np.ceil(np.log1p(z_range[1]) / dln))
    shifts = np.arange(s_lo, s_hi + 1)
    # at least 1000 A of rest-frame overlap (at 5000 A: ~1 km/s per 0.0167 px)
    min_overlap = int(np.log(1.2) / dln)
    r = _cross_correlate(g, tmpl, shifts, k0, min_overlap=min_overlap)
    curve = r.max(axis=0)
    peaks = _peaks(curve, n_candidates, int(_PEAK_SEPARATION / _XCOR_VELSCALE))
    if not peaks or curve[peaks[0]] <= 0:
        raise CubeSFHError(fail.format("no cross-correlation peak with the templates"))
    candidates = []
    for p in peaks:
        # parabolic interpolation of the peak
        if 0 < p < curve.size - 1:
            a, b, c = curve[p - 1], curve[p], curve[p + 1]
            den = a - 2 * b + c
            frac = 0.5 * (a - c) / den if den < 0 else 0.0
        else:
            frac = 0.0
        candidates.append(float(np.expm1((shifts[p] + frac) * dln)))
    log.debug("redshift cross-correlation candidates: %s (peaks %s)", candidates,
              [round(float(curve[p]), 3) for p in peaks])

    refined = []
    for zc, p in zip(candidates, peaks):
        res = _refine(lam, flux, var, zc, templates, lsf, degree)
        if res is not None:
            refined.append((res, p))
    if not refined:
        raise CubeSFHError(fail.format(
            f"pPXF could not fit any cross-correlation candidate (z = "
            f"{', '.join(f'{z:.4f}' for z in candidates)})"))
    refined.sort(key=lambda item: item[0][2])
    (z, z_err, chi2), p = refined[0]
    contrast = float(refined[1][0][2] / chi2) if len(refined) > 1 else np.inf
    est = RedshiftEstimate(z=float(z), z_err=float(z_err), correlation=float(curve[p]),
                           contrast=contrast, chi2=float(chi2), candidates=tuple(candidates),
                           n_spaxels=int(n_spaxels))
    if est.correlation < 0.1 or est.contrast < 1.05:
        msg = (f"The systemic redshift estimate {est} is uncertain (a weak or ambiguous "
               "cross-correlation peak); check it against the literature and pass "
               "redshift= (--redshift) if it is wrong.")
        warnings.warn(msg, CubeSFHWarning)
    return est


def estimate_redshift(cube, *, mask=None, z_range=(-0.005, 0.5), templates=None,
                      lsf=muse_lsf_fwhm, fraction=0.2, max_spaxels=400, max_memory=None,
                      progress_bar=False):
    """
    Systemic redshift of the galaxy in a cube.

    The mean spectrum of the brightest spaxels (:func:`galaxy_spectrum`) is
    cross-correlated with the templates over ``z_range`` and the best peaks
    are refined with pPXF (:func:`redshift_from_spectrum`).

    Parameters
    ----------
    cube : `~cubesfh.Cube`
    mask : `~numpy.ndarray`, optional
        ``(ny, nx)``, `True` for spaxels to ignore (foreground stars!).
    z_range : tuple of float, optional
        Redshifts searched (default -0.005 to 0.5).
    templates : `~cubesfh.templates.TemplateLibrary`, optional
        Default: the bundled library.
    lsf : callable or `~astropy.units.Quantity`, optional
        Line-spread function FWHM (default MUSE's).
    fraction, max_spaxels : optional
        See :func:`galaxy_spectrum`.
    max_memory : `~astropy.units.Quantity` or int, optional
        See `~cubesfh.Cube.iter_chunks`.
    progress_bar : bool, optional
        Show progress bars while reading.

    Returns
    -------
    estimate : `RedshiftEstimate`

    Raises
    ------
    CubeSFHError
        If no redshift can be found (the message says to pass one).

    Examples
    --------
    >>> from cubesfh.redshift import estimate_redshift
    >>> est = estimate_redshift(cube)  # doctest: +SKIP
    >>> print(est)  # doctest: +SKIP
    z = 0.08759 +- 0.00002 (cz = 26259 km/s; cross-correlation peak 0.83, ...)
    """
    wave, flux, var, n = galaxy_spectrum(cube, fraction=fraction, max_spaxels=max_spaxels,
                                         mask=mask, max_memory=max_memory,
                                         progress_bar=progress_bar)
    est = redshift_from_spectrum(wave, flux, var, z_range=z_range, templates=templates,
                                 lsf=lsf, n_spaxels=n)
    log.info("Systemic redshift estimated from the %d brightest spaxels: %s", n, est)
    return est
