# Licensed under a 3-clause BSD style license - see LICENSE
"""K-corrections: observed-frame HST photometry of a redshifted galaxy to rest frame."""

import logging

import astropy.units as u
import numpy as np

from ..conventions import HST_BANDS
from ..synthesis.resynthesis import history_sed
from ..utils import CubeSFHError

__all__ = ["K_CORRECT_MIN_Z", "attenuation", "bin_k_factors", "fit_attenuation", "history_sed",
           "k_correction", "k_correction_filters", "sed_attenuation", "sed_k_factors"]

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


def k_correction_filters(instruments=None):
    """
    Observed-band and rest-frame filter curves of the five bands.

    Parameters
    ----------
    instruments : dict, optional
        Camera of each band's image (``{'F814W': 'WFPC2'}``); default
        WFC3/UVIS. A camera without bundled throughputs uses the WFC3/UVIS
        curve (with a log message).

    Returns
    -------
    filters, rest_filters : list of `~cubesfh.templates.FilterCurve`
        In `~cubesfh.conventions.HST_BANDS` order.
    """
    from ..templates import load_filter

    instruments = dict(instruments or {})
    filters = []
    for band in HST_BANDS:
        inst = instruments.get(band, "WFC3/UVIS")
        try:
            filters.append(load_filter(band, inst))
        except CubeSFHError:
            log.warning("no throughput curve for %s %s: K-correcting with WFC3/UVIS %s",
                        inst, band, band)
            filters.append(load_filter(band))
    return filters, [load_filter(band) for band in HST_BANDS]


def bin_k_factors(mass_fraction, zh, photometry, redshift, filters, rest_filters, *,
                  dust=True):
    """
    K-corrections of the bins for their histories: one step of the iteration.

    The SED of each history (`history_sed`), attenuated (with ``dust``) to
    match the bin's colours (`sed_attenuation`), redshifted and integrated
    through the observed and rest-frame bands (`sed_k_factors`). The
    iteration (predict, correct, predict again) is
    :func:`cubesfh.pipeline.k_correct_bins`.

    Parameters
    ----------
    mass_fraction, zh : `~numpy.ndarray`
        ``(n, 16)`` histories (every row usable).
    photometry : `~numpy.ndarray`
        ``(n, 5)`` the bins' current normalised photometry (NaN: no band).
    redshift : `~numpy.ndarray`
        ``(n,)``.
    filters, rest_filters : sequence of `~cubesfh.templates.FilterCurve`
        From `k_correction_filters`.
    dust : bool, optional

    Returns
    -------
    factors : `~numpy.ndarray`
        ``(n, 5)``, NaN where the band has no data.
    tau_v : `~numpy.ndarray`
        ``(n,)`` the optical depth of each SED (0 without ``dust``).
    """
    wave, sed = history_sed(mass_fraction, zh)
    tau = (sed_attenuation(wave, sed, photometry) if dust
           else np.zeros(sed.shape[0]))
    sed = sed * attenuation(wave, tau)
    k = sed_k_factors(wave, sed, redshift, filters, rest_filters)
    return np.where(np.isfinite(photometry), k, np.nan), tau
