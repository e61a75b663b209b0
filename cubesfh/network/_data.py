# Licensed under a 3-clause BSD style license - see LICENSE
"""Input transforms shared by training and prediction (numpy only, no torch)."""

import warnings

import numpy as np

from ..conventions import HST_BANDS

__all__ = ["CUMULATIVE_KEYS", "GAP_SHARE", "LINE_HALF_WIDTH", "OOD_LINES", "SUMMARY_KEYS",
           "continuum_pixels", "cumulative_fractions", "downsample_spectra", "downsample_valid",
           "gap_masks", "noise_level", "photometry_features"]

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


#: Mean quantities with uncertainties, in the order of the uncertainty head.
SUMMARY_KEYS = ("logage_lw", "logage_mw", "zh_lw", "zh_mw")
#: Rest wavelengths (A) of the emission lines left out of the reconstruction
#: residual (+-``LINE_HALF_WIDTH``): their strengths and widths vary freely in
#: real galaxies and in the simulator, and the 40-dimensional latent space
#: does not encode them, so they would dominate the residual (median 6.6 times
#: the noise with them, 0.9 without, on the validation split of the 150 km/s
#: network).
OOD_LINES = (4861.3, 4958.9, 5006.8, 5875.7, 6300.3, 6363.8, 6548.0, 6562.8, 6583.4,
             6678.2, 6716.4, 6730.8)
LINE_HALF_WIDTH = 12.0


def continuum_pixels(n_pix=880, start=4800.625, step=2.5):
    """Pixels of the 2.5 A network input used by the reconstruction score."""
    w = start + step * np.arange(n_pix)
    keep = np.ones(n_pix, bool)
    for line in OOD_LINES:
        keep &= np.abs(w - line) > LINE_HALF_WIDTH
    return keep


def noise_level(spectra, valid=None):
    """
    Noise per pixel estimated from the spectra themselves (DER_SNR, Stoehr et al. 2008).

    ``1.482602 / sqrt(6) * median |2 f_i - f_(i-2) - f_(i+2)|``: insensitive
    to features broader than a few pixels. Used only as the unit of the
    reconstruction residual, identically in calibration and prediction.

    Parameters
    ----------
    spectra : `~numpy.ndarray`
        ``(n, n_pix)``.
    valid : `~numpy.ndarray`, optional
        ``(n, n_pix)``, 0 at missing pixels: differences that touch one are
        left out.

    Returns
    -------
    noise : `~numpy.ndarray`
        ``(n,)``.
    """
    f = np.asarray(spectra, float)
    d = f[:, 2:-2] * 2.0
    d -= f[:, :-4]
    d -= f[:, 4:]
    np.abs(d, out=d)
    use = None
    if valid is not None:
        v = np.asarray(valid) > 0
        use = v[:, 2:-2] & v[:, :-4] & v[:, 4:]
    if use is not None and not use.all():
        with warnings.catch_warnings():  # a spectrum with no usable difference: 0
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nan_to_num(np.nanmedian(np.where(use, d, np.nan), axis=1), nan=0.0)
    else:
        n = d.shape[1]
        h = n // 2
        d.partition(h, axis=1)  # one selection, in place (np.median makes two)
        # as np.median: the central value (odd n) or the mean of the two central ones
        med = d[:, h] if n % 2 else (d[:, :h].max(axis=1) + d[:, h]) / 2.0
    return 1.482602 / np.sqrt(6.0) * med + 1e-6


#: Keys of the cumulative mass fractions younger than ``CUMULATIVE_AGES``.
CUMULATIVE_KEYS = ("mass_younger_0.1gyr", "mass_younger_1gyr", "mass_younger_5gyr")


def cumulative_fractions(mass_fraction):
    """
    Mass fractions younger than 0.1, 1 and 5 Gyr.

    As :func:`cubesfh.profiles.younger_fraction`: whole bins below the age,
    and the share (in age) of the bin that contains it.

    Parameters
    ----------
    mass_fraction : `~numpy.ndarray`
        ``(n, 16)``.

    Returns
    -------
    out : dict of `~numpy.ndarray`
        `CUMULATIVE_KEYS` -> ``(n,)``.
    """
    from astropy import units as u

    from ..profiles import younger_fraction
    from ._model import CUMULATIVE_AGES

    return {key: younger_fraction(mass_fraction, age * u.Gyr)
            for key, age in zip(CUMULATIVE_KEYS, CUMULATIVE_AGES)}
