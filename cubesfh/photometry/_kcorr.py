# Licensed under a 3-clause BSD style license - see LICENSE
"""K-corrections: observed-frame HST photometry of a redshifted galaxy to rest frame."""

import logging

import astropy.units as u
import numpy as np

from ..conventions import HST_BANDS
from ..utils import CubeSFHError

__all__ = ["K_CORRECT_MIN_Z", "attenuation", "fit_attenuation", "history_sed",
           "k_correct_bins", "k_correction", "sed_attenuation", "sed_k_factors"]

log = logging.getLogger(__name__)


def k_correction(mass_fraction, zh, redshift, *, band="F814W", instrument="WFC3/UVIS",
                 rest_instrument=None, living=True, tau_v=None, templates=None):
    """
    Factor from observed-frame to rest-frame band photometry of a redshifted SED.

    The network expects rest-frame photometry (the mean f_lambda of the
    rest-frame spectrum through the band). An image of a galaxy at redshift
    z measures instead the mean of the redshifted spectrum,
    ``S(lambda / (1 + z)) / (1 + z)``. With the galaxy's SED ``S`` built from a
    star formation history on the template library (e.g. the pPXF baseline's
    mass fractions and metallicities), this returns

    ``K = <S(lambda)>_band / <S(lambda / (1 + z))>_band``,

    the factor to multiply the observed-frame image (in f_lambda) by before
    the pipeline's own ``(1 + z)`` rest-frame scaling.

    Parameters
    ----------
    mass_fraction : array-like
        Stellar mass per age bin, shape ``(16,)`` or ``(n, 16)``
        (normalisation irrelevant): living mass (as the network and the
        pPXF baseline give it) or, with ``living=False``, mass formed.
    zh : array-like
        [Z/H] of each age bin, same shape (interpolated linearly between the
        library's metallicities; NaN bins get the mass-weighted mean).
    redshift : float or array-like
        One redshift, or one per SFH.
    band, instrument : str, optional
        The filter curve of the image (:func:`cubesfh.templates.load_filter`).
    rest_instrument : str, optional
        Camera of the rest-frame band in the numerator (default:
        ``instrument``). ``'WFC3/UVIS'`` also corrects a WFPC2 image to the
        WFC3/UVIS bandpass the network was trained on.
    living : bool, optional
        ``mass_fraction`` is living mass (default) rather than mass formed.
    tau_v : float or array-like, optional
        Attenuate the SED by :func:`attenuation` with this optical depth at
        5500 A (one per SFH, e.g. from :func:`fit_attenuation`).
    templates : `~cubesfh.templates.TemplateLibrary`, optional
        Default: the bundled library.

    Returns
    -------
    k : float or `~numpy.ndarray`
        One factor per SFH.
    """
    from ..templates import load_filter

    filt = load_filter(band, instrument)
    rest_filt = filt if rest_instrument is None else load_filter(band, rest_instrument)
    wave, sed = history_sed(mass_fraction, zh, living=living, templates=templates)
    if tau_v is not None:
        sed = sed * attenuation(wave, tau_v, n=sed.shape[0])
    k = sed_k_factors(wave, sed, redshift, [filt], [rest_filt])[:, 0]
    return k if np.ndim(mass_fraction) > 1 else float(k[0])


def sed_k_factors(wave, sed, redshift, filters, rest_filters):
    """
    K-corrections of SEDs in several bands: the SEDs are redshifted once.

    Parameters
    ----------
    wave : `~astropy.units.Quantity`
    sed : `~numpy.ndarray`
        ``(n, n_wavelength)`` rest-frame f_lambda (e.g. from :func:`history_sed`).
    redshift : float or array-like
        One redshift, or one per SED.
    filters, rest_filters : sequence of `~cubesfh.templates.FilterCurve`
        Observed band of each image and the rest-frame band it is corrected to.

    Returns
    -------
    k : `~numpy.ndarray`
        ``(n, n_filters)``, see :func:`k_correction`.
    """
    lw = wave.to_value(u.AA)
    zz = np.broadcast_to(np.asarray(redshift, dtype=float), (sed.shape[0],))
    shifted = np.stack([np.interp(lw / (1 + zi), lw, s) for zi, s in zip(zz, sed)])
    return np.stack([rest.mean_flux_density(wave, sed) / filt.mean_flux_density(wave, shifted)
                     for filt, rest in zip(filters, rest_filters)], axis=1)


def attenuation(wavelength, tau_v, *, n=None):
    """
    Transmission ``exp(-tau_V (lambda / 5500 A)^-0.7)`` (Charlot & Fall 2000 ISM law).

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`
    tau_v : float or array-like
        Optical depth at 5500 A, one per SED.
    n : int, optional
        Number of SEDs to broadcast a scalar ``tau_v`` to.

    Returns
    -------
    t : `~numpy.ndarray`
        Shape ``(n, n_wavelength)``.
    """
    from ..synthesis.model import dust_transmission

    tau = np.asarray(tau_v, dtype=float)
    if n is not None:
        tau = np.broadcast_to(tau, (n,))
    return np.atleast_2d(dust_transmission(wavelength, tau))


def history_sed(mass_fraction, zh, *, living=True, templates=None):
    """
    Dust-free SED (1200-11000 A) of star formation histories on the template library.

    Parameters
    ----------
    mass_fraction, zh : array-like
        Shape ``(16,)`` or ``(n, 16)``; see :func:`k_correction`.
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
    grid = np.asarray(lib.zh, dtype=float)
    mf = np.atleast_2d(np.asarray(mass_fraction, dtype=float))
    z = np.atleast_2d(np.asarray(zh, dtype=float))
    if mf.shape != z.shape or mf.shape[-1] != seds.shape[1]:
        msg = (f"mass_fraction and zh must both have shape (..., {seds.shape[1]}); got "
               f"{mf.shape} and {z.shape}.")
        raise CubeSFHError(msg)
    mf = np.nan_to_num(mf)
    if not (mf.sum(axis=1) > 0).all():
        msg = "Every mass_fraction row needs a positive sum; drop the failed fits."
        raise CubeSFHError(msg)
    mean_z = np.nansum(mf * z, axis=1, keepdims=True) / mf.sum(axis=1, keepdims=True)
    z = np.clip(np.where(np.isfinite(z), z, mean_z), grid[0], grid[-1])
    sed = np.zeros((mf.shape[0], lib.sed_wavelength.size))
    for j in range(mf.shape[1]):
        k = np.clip(np.searchsorted(grid, z[:, j]) - 1, 0, grid.size - 2)
        t = (z[:, j] - grid[k]) / (grid[k + 1] - grid[k])
        tpl = (1 - t)[:, None] * seds[k, j] + t[:, None] * seds[k + 1, j]
        sed += mf[:, j, None] * tpl
    return lib.sed_wavelength, sed


def fit_attenuation(mass_fraction, zh, photometry, *, bands=None, norm_window=None,
                    tau_grid=None, templates=None):
    """
    Optical depth that brings a history's SED to the observed HST colours.

    The network returns no attenuation, but a K-correction depends on the
    slope of the SED, which dust changes. For each SED this finds the
    ``tau_V`` of :func:`attenuation` on a grid that best matches, in log and
    up to a free constant, the rest-frame photometry normalised by the
    5300-5500 A mean (the network's ``photometry_normalized``).

    Parameters
    ----------
    mass_fraction, zh : array-like
        Shape ``(n, 16)``.
    photometry : `~numpy.ndarray`
        ``(n, n_bands)`` rest-frame f_lambda divided by the spectrum's
        5300-5500 A mean; NaN for missing bands. Rows with fewer than two
        bands get ``tau_V = 0``.
    bands : sequence of str, optional
        Default: the five bands of `~cubesfh.conventions.HST_BANDS`.
    norm_window : `~astropy.units.Quantity`, optional
        Default 5300-5500 A.
    tau_grid : array-like, optional
        Default 0 to 3 in steps of 0.05.
    templates : `~cubesfh.templates.TemplateLibrary`, optional

    Returns
    -------
    tau_v : `~numpy.ndarray`
        Shape ``(n,)``.
    """
    wave, sed = history_sed(mass_fraction, zh, templates=templates)
    return sed_attenuation(wave, sed, photometry, bands=bands, norm_window=norm_window,
                           tau_grid=tau_grid)


def sed_attenuation(wave, sed, photometry, *, bands=None, norm_window=None, tau_grid=None):
    """
    :func:`fit_attenuation` for SEDs already built (e.g. by :func:`history_sed`).

    Parameters
    ----------
    wave : `~astropy.units.Quantity`
    sed : `~numpy.ndarray`
        ``(n, n_wavelength)`` dust-free rest-frame f_lambda.
    photometry, bands, norm_window, tau_grid
        See :func:`fit_attenuation`.

    Returns
    -------
    tau_v : `~numpy.ndarray`
        Shape ``(n,)``.
    """
    from ..conventions import HST_BANDS, NORM_WINDOW
    from ..templates import load_filter

    bands = HST_BANDS if bands is None else tuple(bands)
    window = u.Quantity(NORM_WINDOW if norm_window is None else norm_window, u.AA).value
    grid = np.arange(0.0, 3.0001, 0.05) if tau_grid is None else np.asarray(tau_grid, float)
    phot = np.atleast_2d(np.asarray(photometry, dtype=float))
    lw = wave.to_value(u.AA)
    in_win = (lw >= window[0]) & (lw <= window[1])
    weights = np.stack([load_filter(b).weights(wave) for b in bands], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(phot)
    ok = np.isfinite(logp)
    tau = np.zeros(sed.shape[0])
    best = np.full(sed.shape[0], np.inf)
    for t in grid:
        red = sed * attenuation(wave, t, n=1)
        model = (red @ weights) / red[:, in_win].mean(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(ok, logp - np.log(model), 0.0)
        nb = ok.sum(axis=1)
        shift = r.sum(axis=1) / np.maximum(nb, 1)
        cost = np.where(ok, (r - shift[:, None]) ** 2, 0.0).sum(axis=1)
        better = (cost < best - 1e-12) & (nb >= 2)
        tau[better], best[better] = t, cost[better]
    return tau


#: ``k_correct='auto'`` K-corrects the photometry when the median redshift of
#: the bins exceeds this (at z = 0.01 the correction reaches ~1 per cent in
#: F814W for an old population).
K_CORRECT_MIN_Z = 0.01


def k_correct_bins(prepared, instruments=None, *, model=None, dust=True, iterations=3,
                   tolerance=0.005):
    """
    K-correct the HST photometry of a prepared observation to the rest frame.

    The network was trained on rest-frame WFC3/UVIS band fluxes, while an
    image of a galaxy at redshift z samples the band at rest-frame
    wavelengths ``lambda / (1 + z)``. For every usable bin this takes the
    star formation history and metallicities predicted from the *spectrum
    alone* (the same network, photometry ignored), builds its SED on the
    template library (attenuated, with ``dust``, to match the bin's colours)
    and multiplies the bin's network photometry by its K-correction
    (:func:`~cubesfh.photometry.k_correction`: observed band of the image's
    camera -> rest-frame WFC3/UVIS band), in place; then it predicts again
    with the corrected photometry and repeats.

    Parameters
    ----------
    prepared : `~cubesfh.preprocess.PreparedObservation`
        Modified in place: ``photometry_normalized`` is multiplied by the
        factors, which are also stored as ``prepared.k_correction``.
    instruments : dict, optional
        Camera of each band's image (``{'F814W': 'WFPC2'}``); default
        WFC3/UVIS. A camera without bundled throughputs uses the WFC3/UVIS
        curve.
    model : `~cubesfh.network.SFHModel` or list of them, optional
        Default: the bundled family.
    dust : bool, optional
        Attenuate each SED by the optical depth that best matches the bin's
        HST colours (:func:`~cubesfh.photometry.fit_attenuation`; bins with
        fewer than two bands get none), stored as ``prepared.k_correction_tau``.
    iterations, tolerance : int, float, optional
        Repeat prediction and correction at most ``iterations`` times, until
        no factor changes by more than ``tolerance``.

    Returns
    -------
    factors : `~numpy.ndarray`
        ``(n_bins, 5)`` in `~cubesfh.conventions.HST_BANDS` order; NaN for
        bands without data and bins without a usable spectrum.
    """
    from ..pipeline import predict_bins
    from ..templates import load_filter

    instruments = dict(instruments or {})
    n = prepared.n_bins
    phot = prepared.photometry_normalized.copy()
    z = np.asarray(prepared.spectra.redshift, float)
    filters = []
    for band in HST_BANDS:
        inst = instruments.get(band, "WFC3/UVIS")
        try:
            filters.append(load_filter(band, inst))
        except CubeSFHError:
            log.warning("no throughput curve for %s %s: K-correcting with WFC3/UVIS %s",
                        inst, band, band)
            filters.append(load_filter(band))
    rest_filters = [load_filter(band) for band in HST_BANDS]
    factors = np.full((n, len(HST_BANDS)), np.nan)
    tau = np.zeros(n)
    for it in range(iterations + 1):
        # it = 0: SFH from the spectrum alone; then from spectrum + corrected photometry
        current = np.where(np.isfinite(factors), phot * factors, phot)
        prepared.photometry_normalized = current
        pred = predict_bins(prepared, model=model, photometry=it > 0)
        mf, zh = pred["mass_fraction"], pred["metallicity"]
        ok = np.all(np.isfinite(mf), axis=1) & (np.nansum(mf, axis=1) > 0) & np.isfinite(z)
        new = np.full_like(factors, np.nan)
        if ok.any():
            wave, sed = history_sed(mf[ok], zh[ok])  # once per iteration, for every band
            if dust:
                tau[ok] = sed_attenuation(wave, sed, current[ok])
            sed = sed * attenuation(wave, tau[ok])
            k = sed_k_factors(wave, sed, z[ok], filters, rest_filters)
            new[ok] = np.where(np.isfinite(phot[ok]), k, np.nan)
        change = np.nanmax(np.abs(new / factors - 1)) if it else np.inf
        factors = new
        log.debug("K-correction iteration %d: largest change %.4f", it, change)
        if change < tolerance:
            break
    prepared.photometry_normalized = np.where(np.isfinite(factors), phot * factors, phot)
    prepared.k_correction = factors
    prepared.k_correction_tau = tau
    done = np.isfinite(factors)
    if done.any():
        log.info("K-corrections (median per band): %s", ", ".join(
            f"{b} {np.nanmedian(factors[:, j]):.3f}" for j, b in enumerate(HST_BANDS)
            if done[:, j].any()))
    return factors
