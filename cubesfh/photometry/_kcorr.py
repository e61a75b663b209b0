# Licensed under a 3-clause BSD style license - see LICENSE
"""K-corrections: observed-frame HST photometry of a redshifted galaxy to rest frame."""

import astropy.units as u
import numpy as np

from ..utils import CubeSFHError

__all__ = ["k_correction"]


def k_correction(mass_fraction, zh, redshift, *, band="F814W", instrument="WFC3/UVIS",
                 rest_instrument=None, living=True, templates=None):
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
    templates : `~cubesfh.templates.TemplateLibrary`, optional
        Default: the bundled library.

    Returns
    -------
    k : float or `~numpy.ndarray`
        One factor per SFH.
    """
    from ..templates import TemplateLibrary, load_filter

    lib = TemplateLibrary.load() if templates is None else templates
    filt = load_filter(band, instrument)
    rest_filt = filt if rest_instrument is None else load_filter(band, rest_instrument)
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
    lw = lib.sed_wavelength.to_value(u.AA)
    sed = np.zeros((mf.shape[0], lw.size))
    for j in range(mf.shape[1]):
        k = np.clip(np.searchsorted(grid, z[:, j]) - 1, 0, grid.size - 2)
        t = (z[:, j] - grid[k]) / (grid[k + 1] - grid[k])
        tpl = (1 - t)[:, None] * seds[k, j] + t[:, None] * seds[k + 1, j]
        sed += mf[:, j, None] * tpl
    rest = rest_filt.mean_flux_density(lib.sed_wavelength, sed)
    zz = np.broadcast_to(np.asarray(redshift, dtype=float), (mf.shape[0],))
    shifted = np.stack([np.interp(lw / (1 + zi), lw, s) for zi, s in zip(zz, sed)])
    obs = filt.mean_flux_density(lib.sed_wavelength, shifted)
    k = rest / obs
    return k if np.ndim(mass_fraction) > 1 else float(k[0])
