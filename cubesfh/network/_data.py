# Licensed under a 3-clause BSD style license - see LICENSE
"""Input transforms shared by training and prediction (numpy only, no torch)."""

import numpy as np

from ..conventions import HST_BANDS

__all__ = ["downsample_spectra", "photometry_features"]

#: Pixels averaged together: 1.25 A -> 2.5 A.
BINNING = 2


def downsample_spectra(spectra):
    """
    Average the 1761-pixel spectra in pairs (2.5 A, 880 pixels).

    Parameters
    ----------
    spectra : `~numpy.ndarray`
        ``(n, 1761)``.

    Returns
    -------
    out : `~numpy.ndarray`
        ``(n, 880)`` float32.
    """
    s = np.asarray(spectra, dtype=np.float32)
    n = (s.shape[-1] // BINNING) * BINNING
    # strided sums in one pass each: the float32 values of ``reshape(...).mean(-1)``
    # (which adds the BINNING values in order and divides by BINNING), faster
    out = s[..., 0:n:BINNING].copy()
    for k in range(1, BINNING):
        out += s[..., k:n:BINNING]
    out /= np.float32(BINNING)
    return out


def photometry_features(photometry, mask=None):
    """
    log10 of the normalised fluxes and the band mask.

    Bands that are NaN, non-positive or masked out are marked missing.

    Parameters
    ----------
    photometry : `~numpy.ndarray`
        ``(n, 5)`` normalised fluxes in `~cubesfh.conventions.HST_BANDS` order.
    mask : `~numpy.ndarray`, optional
        ``(n, 5)`` bool, `True` where a band is present.

    Returns
    -------
    logflux, mask : `~numpy.ndarray`
        ``(n, 5)`` float32 each (log flux 0 where missing; mask 1/0).
    """
    p = np.asarray(photometry, dtype=np.float64)
    if p.shape[-1] != len(HST_BANDS):
        msg = f"photometry must have {len(HST_BANDS)} columns ({', '.join(HST_BANDS)})."
        raise ValueError(msg)
    ok = np.isfinite(p) & (p > 0)
    if mask is not None:
        ok &= np.asarray(mask, bool)
    logf = np.where(ok, np.log10(np.where(ok, p, 1.0)), 0.0)
    return logf.astype(np.float32), ok.astype(np.float32)
