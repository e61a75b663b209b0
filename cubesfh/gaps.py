# Licensed under a 3-clause BSD style license - see LICENSE
"""
Spectral gaps: what a bin lost of the 4800-7000 A rest-frame range, and how the
network input is completed where pixels are missing.

MUSE WFM-AO cubes have no data over the sodium laser notch (observed
~5780-6050 A, NaN in every spaxel); sky-line residuals, detector defects and
masks remove other windows. The bundled networks were trained on complete
spectra, so a missing pixel must reach them as *something*. Up to cubesfh 0.3
it was 1.0 (the normalisation level), which the network reads as a flat
featureless stretch of spectrum and which moved the maps of AO cubes by up
to 0.7 dex. Until networks trained with a validity mask are bundled (the
robustness issue), the missing pixels are completed by a fit of the
project's own templates to the valid pixels of the same bin
(`fill_gaps`): non-negative least squares over the 16 x 6 age-metallicity
templates at the bin's dispersion, times a multiplicative Legendre
polynomial (dust and flux calibration), with the emission lines and other
outliers clipped. The filled pixels are the spectrum that the valid pixels
imply, not new information: the bin keeps its ``SPECTRAL_GAP`` flag and
its ``gap_fraction``.
"""

import functools
import logging

import numpy as np
from astropy import units as u

__all__ = ["INCOMPLETE_LIMIT", "fill_gaps", "gap_fraction"]

log = logging.getLogger(__name__)

#: A bin missing more than this fraction of the 4800-7000 A rest-frame range is
#: flagged ``SPECTRUM_INCOMPLETE`` (too little left to trust); any smaller loss
#: gives ``SPECTRAL_GAP``. The MUSE AO notch alone costs 11-13 %.
INCOMPLETE_LIMIT = 0.25

#: Degree of the multiplicative Legendre polynomial of `fill_gaps`.
POLY_DEGREE = 4

#: Fewest valid pixels for `fill_gaps` to fit a spectrum (else left as it is).
MIN_VALID = 300


def gap_fraction(flux):
    """
    Fraction of missing (non-finite) pixels of each prepared spectrum.

    Parameters
    ----------
    flux : `~numpy.ndarray`, shape (n_spec, n_pix)

    Returns
    -------
    fraction : `~numpy.ndarray`, shape (n_spec,)
    """
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    return (~np.isfinite(flux)).mean(axis=1)


@functools.lru_cache(maxsize=4)
def _templates(sigma_target):
    """Linear-grid templates (n_pix, 16 x 6), mean 1 in 5300-5500 A, at a dispersion."""
    from .baseline import age_bin_spectra
    from .synthesis import ForwardModel

    model = ForwardModel(sigma_target=float(sigma_target) * u.km / u.s)
    spec, _ = age_bin_spectra(model)
    w = model.wavelength.to_value(u.AA)
    return w, np.ascontiguousarray(spec.reshape(-1, w.size).T)


def _legendre(w, degree):
    x = 2.0 * (w - w[0]) / (w[-1] - w[0]) - 1.0
    return np.polynomial.legendre.legvander(x, degree)


def _fit_one(flux, variance, templates, poly, *, n_iter=3, clip=3.0):
    """Template x polynomial model of one spectrum from its valid pixels."""
    from scipy.optimize import nnls

    good = np.isfinite(flux)
    weight = np.ones(flux.size)
    if variance is not None:
        var = np.where(np.isfinite(variance) & (variance > 0), variance, np.nan)
        good &= np.isfinite(var)
        weight = np.where(good, 1.0 / np.sqrt(np.where(good, var, 1.0)), 0.0)
    use = good.copy()
    p = np.ones(flux.size)
    model = None
    for _ in range(n_iter):
        if use.sum() < MIN_VALID:
            return None
        a = templates[use] * (p[use] * weight[use])[:, None]
        coef, _ = nnls(a, flux[use] * weight[use], maxiter=20 * a.shape[1])
        base = templates @ coef
        if not np.any(base[use] > 0):
            return None
        # multiplicative polynomial: flux / base on the used pixels, weighted least squares
        ok = use & (base > 0)
        wp = weight[ok] * base[ok]
        c, *_ = np.linalg.lstsq(poly[ok] * wp[:, None], flux[ok] * weight[ok], rcond=None)
        p = poly @ c
        model = base * p
        resid = (flux - model) * weight
        scale = 1.4826 * np.median(np.abs(resid[use])) if use.any() else 0.0
        if not scale > 0:
            break
        new = good & (np.abs(resid) < clip * scale)  # emission lines, residuals out
        if np.array_equal(new, use):
            break
        use = new
    return model


def fill_gaps(flux, sigma_target, *, variance=None):
    """
    Complete the missing pixels of prepared spectra with a template fit.

    Each spectrum with non-finite pixels is fitted on its valid pixels with
    the 16 x 6 age-metallicity templates of the shipped library at its
    common dispersion (non-negative least squares) times a Legendre
    polynomial of degree `POLY_DEGREE`, clipping pixels beyond 3 robust
    sigma (emission lines); the missing pixels take the model's values, the
    valid ones are unchanged. Spectra with fewer than `MIN_VALID` valid
    pixels, or that the fit cannot describe, are returned as they are.

    Parameters
    ----------
    flux : `~numpy.ndarray`, shape (n_spec, n_pix)
        Prepared (rest-frame, normalised) spectra on the network grid,
        NaN where missing.
    sigma_target : float or `~numpy.ndarray`
        Common dispersion of each spectrum (km/s).
    variance : `~numpy.ndarray`, optional
        Their variances (weights of the fit).

    Returns
    -------
    filled : `~numpy.ndarray`
        A copy of ``flux`` with the gaps completed.
    done : `~numpy.ndarray` of bool
        Which spectra were completed.
    """
    flux = np.array(flux, dtype=float, copy=True)
    n = flux.shape[0]
    sig = np.broadcast_to(np.asarray(sigma_target, dtype=float), (n,))
    missing = ~np.isfinite(flux)
    todo = np.flatnonzero(missing.any(axis=1) & (missing.sum(axis=1) < flux.shape[1]))
    done = np.zeros(n, bool)
    if not todo.size:
        return flux, done
    for i in todo:
        w, templates = _templates(float(sig[i]))
        if w.size != flux.shape[1]:
            continue
        poly = _legendre(w, POLY_DEGREE)
        model = _fit_one(flux[i], None if variance is None else variance[i], templates, poly)
        if model is None or not np.all(np.isfinite(model[missing[i]])):
            continue
        flux[i, missing[i]] = model[missing[i]]
        done[i] = True
    log.info("completed the spectral gaps of %d of %d spectra with a template fit",
             int(done.sum()), int(todo.size))
    return flux, done
