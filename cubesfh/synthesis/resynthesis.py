# Licensed under a 3-clause BSD style license - see LICENSE
"""
Re-synthesis: the spectrum and HST fluxes a star formation history implies, and its fit.

The network returns an SFH and Z(t), never the spectrum they imply. Here a
history (living-mass fractions and [Z/H] in the 16 age bins, as the network
and the pPXF baseline give them) becomes, on the project's templates and
forward model (:class:`~cubesfh.synthesis.ForwardModel`, at the bin's
velocity dispersion):

* a dust-free spectrum on the network's 4800-7000 A grid and a dust-free SED
  (1200-11000 A, nebular emission of the young populations included), with
  `history_model` (and `history_sed` for the stellar SED alone, which the
  K-corrections use);
* the fit of what the network does not give (`fit_check`): a Calzetti et al.
  (2000) screen, A_V from the HST colours (with the calibrated model
  systematic of each band as an allowance), and a multiplicative Legendre
  polynomial of degree 8 on the spectrum (as the pPXF baseline), with the gas
  emission lines masked as in the baseline; it returns the reduced chi^2 of
  the spectrum, the implied HST fluxes and the residual of each band.

This module sits below the network, the photometry and the pipeline, which
all use it.
"""

import warnings

import numpy as np
from astropy import units as u

from ..conventions import HST_BANDS, N_AGE_BINS, NORM_WINDOW, Z_SUN
from ..utils import CubeSFHError

__all__ = ["AV_GRID", "FIT_MDEGREE", "calibrated_limit", "fit_check", "fit_chi2", "fit_pixels",
           "history_masses", "history_model", "history_sed", "phot_allowance"]

#: Degree of the multiplicative Legendre polynomial of the fit (the baseline's).
FIT_MDEGREE = 8
#: A_V grid (mag) searched by `fit_check`.
AV_GRID = np.arange(0.0, 4.0001, 0.02)


def history_sed(mass_fraction, zh, *, living=True, templates=None):
    """
    Dust-free stellar SED (1200-11000 A) of star formation histories on the template library.

    Parameters
    ----------
    mass_fraction, zh : array-like
        Shape ``(16,)`` or ``(n, 16)``: stellar mass per age bin
        (normalisation irrelevant), living mass (as the network and the pPXF
        baseline give it) or, with ``living=False``, mass formed; and the
        [Z/H] of each bin (interpolated linearly between the library's
        metallicities; NaN bins get the mass-weighted mean).
    living : bool, optional
        ``mass_fraction`` is living mass (default) rather than mass formed.
    templates : `~cubesfh.templates.TemplateLibrary`, optional

    Returns
    -------
    wavelength : `~astropy.units.Quantity`
    sed : `~numpy.ndarray`
        Shape ``(n, n_wavelength)``, f_lambda per unit of ``mass_fraction``.
    """
    from ..templates import TemplateLibrary

    lib = TemplateLibrary.load() if templates is None else templates
    seds = lib.binned(sed=True)  # (n_Z, 16, n_sed), per solar mass formed
    if living:  # per solar mass still alive
        seds = seds / lib.binned_living_fraction()[:, :, None]
    mf, z = _checked(mass_fraction, zh, seds.shape[1])
    k, t = lib.zh_interpolation(z)
    sed = np.zeros((mf.shape[0], lib.sed_wavelength.size))
    for j in range(mf.shape[1]):
        tpl = (1 - t[:, j, None]) * seds[k[:, j], j] + t[:, j, None] * seds[k[:, j] + 1, j]
        sed += mf[:, j, None] * tpl
    return lib.sed_wavelength, sed


def _checked(mass_fraction, zh, n_bins=N_AGE_BINS):
    mf = np.atleast_2d(np.asarray(mass_fraction, dtype=float))
    z = np.atleast_2d(np.asarray(zh, dtype=float))
    if mf.shape != z.shape or mf.shape[-1] != n_bins:
        msg = (f"mass_fraction and zh must both have shape (..., {n_bins}); got "
               f"{mf.shape} and {z.shape}.")
        raise CubeSFHError(msg)
    mf = np.clip(np.nan_to_num(mf), 0.0, None)
    if not (mf.sum(axis=1) > 0).all():
        msg = "Every mass_fraction row needs a positive sum; drop the failed fits."
        raise CubeSFHError(msg)
    mean_z = np.nansum(mf * z, axis=1, keepdims=True) / mf.sum(axis=1, keepdims=True)
    return mf, np.where(np.isfinite(z), z, mean_z)


def history_masses(mass_fraction, zh, library):
    """
    Mass formed and metallicity of every template sub-interval of histories.

    A constant star formation rate inside each age bin, at the bin's [Z/H]:
    the form of the network's labels, so that `ForwardModel.synthesize
    <cubesfh.synthesis.ForwardModel.synthesize>` gives the spectrum the
    history implies.

    Parameters
    ----------
    mass_fraction, zh : array-like
        ``(n, 16)`` living-mass fractions and [Z/H].
    library : `~cubesfh.templates.TemplateLibrary`

    Returns
    -------
    mass, z : `~numpy.ndarray`
        ``(n, n_age)`` mass formed per unit living mass and metallicity Z.
    """
    mf, zh = _checked(mass_fraction, zh)
    ell = library.binned_at(library.binned_living_fraction(), zh)
    formed = mf / ell / mf.sum(axis=1, keepdims=True)  # per unit living mass
    dur = np.diff(library.age_edges.to_value(u.yr))
    share = dur / np.bincount(library.age_bin, weights=dur, minlength=N_AGE_BINS)[
        library.age_bin]
    mass = formed[:, library.age_bin] * share[None, :]
    z = Z_SUN * 10 ** zh[:, library.age_bin]
    return mass, z


def history_model(mass_fraction, zh, *, forward_model):
    """
    Dust-free spectra and SEDs of histories, nebular emission included.

    Parameters
    ----------
    mass_fraction, zh : array-like
        ``(n, 16)`` living-mass fractions and [Z/H] per age bin.
    forward_model : `~cubesfh.synthesis.ForwardModel`
        Templates, resolution (velocity dispersion) and output grid.

    Returns
    -------
    model : dict of `~numpy.ndarray`
        ``spectra`` ``(n, 1761)`` and ``sed`` ``(n, n_sed)`` (L_sun / A per
        unit living mass, on ``forward_model.wavelength`` and
        ``forward_model.sed_wavelength``).
    """
    fm = forward_model
    mass, z = history_masses(mass_fraction, zh, fm.library)
    n = mass.shape[0]
    spec, _ = fm.synthesize(mass, z, np.zeros(n), np.zeros(n))
    coef = fm.coefficients(mass, z)  # (n, nz, na)
    nz, na = coef.shape[1:]
    ny = fm.n_young
    sed = coef.reshape(n, -1) @ fm.sed_stellar.reshape(nz * na, -1)
    sed += coef[:, :, :ny].reshape(n, -1) @ fm.sed_nebular.reshape(nz * ny, -1)
    return {"spectra": spec, "sed": sed}


def phot_allowance():
    """
    Relative 1-sigma model systematic of each HST band, `HST_BANDS` order.

    The per-band offsets the training sets draw
    (:data:`cubesfh.synthesis.trainingset.PHOT_SYSTEMATIC_MAG`: the scatter of
    the synthetic colours between SSP libraries and the zero points), as
    fractions of the flux.
    """
    from .trainingset import PHOT_SYSTEMATIC_MAG

    return np.asarray(PHOT_SYSTEMATIC_MAG, float) * np.log(10.0) / 2.5


def fit_pixels(spectra, variance, wavelength, *, mask_emission=True):
    """
    Pixels a fit uses: finite data and variance > 0, away from the gas lines.

    The lines and widths are those of the pPXF baseline
    (:data:`cubesfh.baseline.BASELINE_MASKED_LINES`, +-800 km/s).
    """
    from ..baseline import BASELINE_MASKED_LINES
    from ..kinematics import emission_line_mask

    good = np.isfinite(spectra) & np.isfinite(variance) & (np.nan_to_num(variance) > 0)
    if mask_emission:
        lines = u.Quantity(list(BASELINE_MASKED_LINES.values()))
        good &= ~emission_line_mask(u.Quantity(wavelength, u.AA), lines=lines,
                                    width=800 * u.km / u.s)[None, :]
    return good


def fit_chi2(spectra, variance, models, good, *, n_params=FIT_MDEGREE + 1):
    """
    Reduced chi^2 of model spectra on the given pixels.

    ``sum((data - model)^2 / variance) / (n_good - n_params)``; the same
    number of free parameters is charged to every model compared on a bin
    (the CNN re-synthesis and the pPXF fit), so that their ratio compares
    the residuals themselves.
    """
    r2 = np.where(good, (np.nan_to_num(spectra) - np.nan_to_num(models)) ** 2
                  / np.where(good, variance, 1.0), 0.0)
    dof = good.sum(axis=1) - int(n_params)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(dof > 0, r2.sum(axis=1) / dof, np.nan)


def _legendre(n_pix, degree):
    x = np.linspace(-1.0, 1.0, n_pix)
    return np.polynomial.legendre.legvander(x, degree)  # (n_pix, degree + 1)


def fit_check(spectra, variance, photometry, mass_fraction, zh, *, forward_model,
              mdegree=FIT_MDEGREE, phot_error=0.02, mask_emission=True, av_grid=AV_GRID):
    """
    Re-synthesise histories and fit them to their spectra and HST fluxes.

    For each spectrum, the dust-free spectrum and SED of its history
    (`history_model`) are attenuated by a Calzetti et al. (2000) screen whose
    A_V best matches the HST fluxes (normalised by the spectrum's 5300-5500 A
    mean, like the network's inputs), each band weighted by its measurement
    error and the calibrated model systematic (`phot_allowance`); the
    spectrum is then matched by a multiplicative Legendre polynomial of
    degree ``mdegree`` (linear least squares), on the pixels of
    `fit_pixels`.

    Parameters
    ----------
    spectra, variance : `~numpy.ndarray`
        ``(n, 1761)`` prepared spectra (normalised) and their variance; NaN
        pixels are left out.
    photometry : `~numpy.ndarray` or None
        ``(n, 5)`` normalised HST fluxes (NaN for missing bands).
    mass_fraction, zh : `~numpy.ndarray`
        ``(n, 16)`` the histories (rows with NaN give NaN results).
    forward_model : `~cubesfh.synthesis.ForwardModel`
        At the spectra's velocity dispersion.
    mdegree : int, optional
    phot_error : float, optional
        Relative measurement error of the HST fluxes.
    mask_emission : bool, optional
    av_grid : array-like, optional

    Returns
    -------
    result : dict of `~numpy.ndarray`
        ``chi2`` (n,; reduced chi^2 of the spectrum), ``n_good`` (n,),
        ``snr`` (n,; median S/N per Angstrom in 5300-5500 A), ``av_fit``
        (n,; mag, NaN without two bands), ``phot_model`` and ``phot_resid``
        (n, 5; the implied normalised fluxes and measured / implied - 1),
        ``phot_chi2`` (n,; per degree of freedom, with the allowance),
        ``phot_z`` (n, 5; (measured - implied) / its 1-sigma allowance),
        ``phot_z_loo`` (n, 5; the same with the A_V fitted to the other
        bands, with at least three bands),
        ``model`` (n, 1761; the fitted model spectrum) and ``good`` (n, 1761).
    """
    from .model import attenuation_curve

    fm = forward_model
    spectra = np.atleast_2d(np.asarray(spectra, float))
    variance = np.atleast_2d(np.asarray(variance, float))
    n, npix = spectra.shape
    nb = len(HST_BANDS)
    phot = (np.full((n, nb), np.nan) if photometry is None
            else np.atleast_2d(np.asarray(photometry, float)))
    mf = np.atleast_2d(np.asarray(mass_fraction, float))
    zh = np.atleast_2d(np.asarray(zh, float))
    out = {k: np.full(n, np.nan) for k in ("chi2", "snr", "av_fit", "phot_chi2")}
    out["n_good"] = np.zeros(n, int)
    out.update({k: np.full((n, nb), np.nan)
                for k in ("phot_model", "phot_resid", "phot_z", "phot_z_loo")})
    out["model"] = np.full((n, npix), np.nan)
    wave = fm.wavelength.to_value(u.AA)
    good = fit_pixels(spectra, variance, wave, mask_emission=mask_emission)
    out["good"] = good
    in_norm = ((wave >= NORM_WINDOW[0].to_value(u.AA))
               & (wave <= NORM_WINDOW[1].to_value(u.AA)))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(good[:, in_norm], spectra[:, in_norm]
                         / np.sqrt(np.where(good[:, in_norm], variance[:, in_norm], 1.0)),
                         np.nan)
    step = float(wave[1] - wave[0])
    with warnings.catch_warnings():  # all-NaN rows: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        out["snr"] = np.nanmedian(ratio, axis=1) / np.sqrt(step)
    ok = np.all(np.isfinite(mf), axis=1) & (np.nansum(mf, axis=1) > 0)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return out
    hist = history_model(mf[idx], zh[idx], forward_model=fm)
    av_grid = np.asarray(av_grid, float)
    k_spec = attenuation_curve(wave, "calzetti")
    sed_w = fm.sed_wavelength.to_value(u.AA)
    k_sed = attenuation_curve(np.clip(sed_w, 1000.0, 30000.0), "calzetti")
    t_sed = 10 ** (-0.4 * av_grid[:, None] * k_sed[None, :])  # (n_av, n_sed)
    t_norm = 10 ** (-0.4 * av_grid[:, None] * k_spec[None, in_norm])  # (n_av, n_norm)
    spec0 = hist["spectra"]
    norm_av = spec0[:, in_norm] @ t_norm.T / in_norm.sum()  # (m, n_av)
    band_w = fm.band_weights  # (n_sed, nb)
    allow = phot_allowance()
    legendre = _legendre(npix, mdegree)
    for row, i in enumerate(idx):
        sed = hist["sed"][row]
        pm = ((sed[None, :] * t_sed) @ band_w) / norm_av[row][:, None]  # (n_av, nb)
        p = phot[i]
        use = np.isfinite(p) & (p > 0)
        av = 0.0
        if use.sum() >= 2:
            sig2 = (phot_error * p[use]) ** 2 + (allow[use] * pm[:, use]) ** 2
            chi = ((p[use] - pm[:, use]) ** 2 / sig2).sum(axis=1)
            best = int(np.argmin(chi))
            av = float(av_grid[best])
            out["av_fit"][i] = av
            out["phot_chi2"][i] = chi[best] / max(int(use.sum()) - 1, 1)
            out["phot_model"][i] = pm[best]
            with np.errstate(invalid="ignore", divide="ignore"):
                out["phot_resid"][i] = np.where(use, p / pm[best] - 1.0, np.nan)
            out["phot_z"][i, use] = (p[use] - pm[best, use]) / np.sqrt(sig2[best])
            if use.sum() >= 3:
                # each band against the A_V of the others: one wrong band cannot pull
                # the attenuation its way and share its error with its neighbours
                terms = (p[use] - pm[:, use]) ** 2 / sig2  # (n_av, n_use)
                for j, band in enumerate(np.flatnonzero(use)):
                    k = int(np.argmin(terms.sum(axis=1) - terms[:, j]))
                    out["phot_z_loo"][i, band] = (p[band] - pm[k, band]) / np.sqrt(sig2[k, j])
        m = spec0[row] * 10 ** (-0.4 * av * k_spec)
        m = m / m[in_norm].mean()
        g = good[i]
        ng = int(g.sum())
        out["n_good"][i] = ng
        if ng <= mdegree + 1:
            continue
        w = 1.0 / np.sqrt(variance[i, g])
        design = (m[g, None] * legendre[g]) * w[:, None]
        coef, *_ = np.linalg.lstsq(design, spectra[i, g] * w, rcond=None)
        out["model"][i] = m * (legendre @ coef)
    out["chi2"] = fit_chi2(spectra, variance, out["model"], good, n_params=mdegree + 1)
    out["chi2"][~ok] = np.nan
    return out


def calibrated_limit(calibration, snr):
    """
    A limit calibrated at a few S/N values, at any S/N.

    Parameters
    ----------
    calibration : dict
        ``snr`` (increasing) and ``limit`` (the value at each), e.g. the
        ``chi2`` entry of a model's ``fit_check`` metadata.
    snr : array-like
        S/N per Angstrom of the bins.

    Returns
    -------
    limit : `~numpy.ndarray`
        Interpolated linearly in log(limit - 1) against log S/N (a chi^2
        from model mismatch grows as S/N^2), held at the lowest S/N below
        it and extrapolated with the last slope above the highest; NaN for
        a non-finite S/N.
    """
    x = np.log10(np.asarray(calibration["snr"], float))
    y = np.log10(np.maximum(np.asarray(calibration["limit"], float) - 1.0, 1e-6))
    s = np.log10(np.clip(np.asarray(snr, float), 1e-3, None))
    out = np.interp(s, x, y)
    if x.size > 1:
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        out = np.where(s > x[-1], y[-1] + slope * (s - x[-1]), out)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(np.asarray(snr, float)), 1.0 + 10**out, np.nan)
