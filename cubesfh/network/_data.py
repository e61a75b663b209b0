# Licensed under a 3-clause BSD style license - see LICENSE
"""Input transforms shared by training and prediction (numpy only, no torch)."""

import numpy as np

from ..conventions import HST_BANDS

__all__ = ["GAP_SHARE", "downsample_spectra", "downsample_valid", "gap_masks",
           "photometry_features"]

#: Pixels averaged together: 1.25 A -> 2.5 A.
BINNING = 2
#: Share of the training spectra that lose spectral windows (`gap_masks`).
GAP_SHARE = 0.3
#: Observed-frame windows (A) lost in real MUSE cubes: the sodium laser notch
#: of the WFM-AO mode, the strongest sky-line residuals ([OI] 5577, Na D 5890,
#: [OI] 6300, 6364) and the telluric O2 B band.
AO_NOTCH_OBSERVED = (5780.0, 6050.0)
SKY_WINDOWS_OBSERVED = ((5570.0, 5585.0), (5883.0, 5898.0), (6295.0, 6306.0),
                        (6358.0, 6370.0), (6865.0, 6885.0))
#: Redshift range over which the observed windows are moved to the rest frame.
GAP_REDSHIFT_RANGE = (0.0, 0.06)


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


def downsample_valid(spectra):
    """
    2.5 A spectra and validity of 1761-pixel spectra with missing (non-finite) pixels.

    A 2.5 A pixel is the mean of its valid 1.25 A pixels, and valid when at
    least one of them is; the missing ones are 0 (the caller standardises and
    masks them).

    Returns
    -------
    spectra, valid : `~numpy.ndarray`
        ``(n, 880)`` float32 each (valid is 1 or 0).
    """
    s = np.asarray(spectra, dtype=np.float32)
    ok = np.isfinite(s)
    if ok.all():
        return downsample_spectra(s), np.ones((s.shape[0], s.shape[1] // BINNING), np.float32)
    total = downsample_spectra(np.where(ok, s, 0.0))
    count = downsample_spectra(ok.astype(np.float32))
    valid = count > 0
    out = np.where(valid, total / np.where(valid, count, 1.0), 0.0).astype(np.float32)
    return out, valid.astype(np.float32)


def gap_masks(rng, n, *, n_pix=880, start=4800.625, step=2.5, share=GAP_SHARE):
    """
    Random validity masks of 2.5 A training inputs (1 valid, 0 missing).

    A share ``share`` of the spectra loses, each with its own redshift
    (uniform over `GAP_REDSHIFT_RANGE`): the MUSE AO notch (probability
    0.5), each sky-line and telluric window (probability 0.3 each, widened by
    0-10 A on each side), and 0-3 random windows of 20-200 A anywhere in
    4800-7000 A.
    The others are complete.

    Parameters
    ----------
    rng : `numpy.random.Generator`
    n : int
    n_pix, start, step : int, float, float, optional
        The input grid (pixel centres, A).
    share : float, optional

    Returns
    -------
    valid : `~numpy.ndarray`
        ``(n, n_pix)`` float32.
    """
    w = start + step * np.arange(n_pix)
    valid = np.ones((n, n_pix), np.float32)
    hit = np.flatnonzero(rng.uniform(size=n) < share)
    if hit.size == 0:
        return valid
    k = hit.size
    onepz = 1.0 + rng.uniform(*GAP_REDSHIFT_RANGE, k)
    lo, hi = [], []
    ao = rng.uniform(size=k) < 0.5
    lo.append(np.where(ao, AO_NOTCH_OBSERVED[0] / onepz, np.inf))
    hi.append(np.where(ao, AO_NOTCH_OBSERVED[1] / onepz, -np.inf))
    for a, b in SKY_WINDOWS_OBSERVED:
        on = rng.uniform(size=k) < 0.3
        pad = rng.uniform(0.0, 10.0, k)
        lo.append(np.where(on, (a - pad) / onepz, np.inf))
        hi.append(np.where(on, (b + pad) / onepz, -np.inf))
    n_rand = rng.integers(0, 4, k)
    for j in range(3):
        on = n_rand > j
        width = rng.uniform(20.0, 200.0, k)
        centre = rng.uniform(w[0], w[-1], k)
        lo.append(np.where(on, centre - width / 2, np.inf))
        hi.append(np.where(on, centre + width / 2, -np.inf))
    lo = np.stack(lo, axis=1)[:, :, None]
    hi = np.stack(hi, axis=1)[:, :, None]
    gone = ((w[None, None, :] >= lo) & (w[None, None, :] <= hi)).any(axis=1)
    valid[hit] = np.where(gone, 0.0, 1.0)
    return valid
