# Licensed under a 3-clause BSD style license - see LICENSE
"""Low-level spectral operations shared by the pipeline stages and the simulator."""

import numpy as np

__all__ = ["gaussian_broadening_matrix", "gaussian_smooth", "pixel_edges",
           "rebin_flux_conserving"]


def pixel_edges(centers):
    """
    Pixel edges (n + 1) of a monotonically increasing grid of pixel centres.

    Parameters
    ----------
    centers : `~numpy.ndarray`

    Returns
    -------
    edges : `~numpy.ndarray`
    """
    c = np.asarray(centers, dtype=float)
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def rebin_flux_conserving(wave_in, flux, wave_out, *, variance=None):
    """
    Resample spectra onto new pixels, conserving the integrated flux.

    Each output pixel receives the mean flux density of the input over its
    extent (input pixels treated as piecewise constant), so that
    ``sum(flux_out * dlambda_out)`` equals the input integral over the common
    range.

    Parameters
    ----------
    wave_in : `~numpy.ndarray`
        Input pixel centres (increasing), shape ``(n_in,)``.
    flux : `~numpy.ndarray`
        Spectra, shape ``(..., n_in)``.
    wave_out : `~numpy.ndarray`
        Output pixel centres (increasing), inside the input range.
    variance : `~numpy.ndarray`, optional
        Variance of ``flux``; propagated assuming independent input pixels
        (the covariance this introduces between output pixels is neglected).

    Returns
    -------
    flux_out : `~numpy.ndarray`
        Shape ``(..., n_out)``.
    variance_out : `~numpy.ndarray`
        Only when ``variance`` is given.
    """
    e_in = pixel_edges(wave_in)
    e_out = pixel_edges(wave_out)
    n_in = wave_in.size
    width_out = np.diff(e_out)
    # first input pixel touching each output pixel, and the most pixels any output spans
    j0 = np.clip(np.searchsorted(e_in, e_out[:-1], side="right") - 1, 0, n_in - 1)
    j1 = np.clip(np.searchsorted(e_in, e_out[1:], side="left") - 1, 0, n_in - 1)
    m = int(np.max(j1 - j0)) + 1
    j = np.clip(j0[:, None] + np.arange(m)[None, :], 0, n_in - 1)  # (n_out, m)
    lo = np.maximum(e_out[:-1, None], e_in[j])
    hi = np.minimum(e_out[1:, None], e_in[j + 1])
    w = np.clip(hi - lo, 0.0, None) / width_out[:, None]
    w[np.arange(m)[None, :] > (j1 - j0)[:, None]] = 0.0  # clipped duplicates
    f = np.asarray(flux, dtype=float)
    out = np.einsum("...om,om->...o", f[..., j], w)
    if variance is None:
        return out
    v = np.asarray(variance, dtype=float)
    return out, np.einsum("...om,om->...o", v[..., j], w**2)


def gaussian_smooth(wave, flux, sigma, *, variance=None, truncate=4.0):
    """
    Convolve spectra with Gaussians whose width varies with wavelength and spectrum.

    Parameters
    ----------
    wave : `~numpy.ndarray`
        Uniformly spaced pixel centres, shape ``(n_pix,)``.
    flux : `~numpy.ndarray`
        Spectra, shape ``(n_spec, n_pix)``.
    sigma : `~numpy.ndarray`
        Gaussian sigma in the units of ``wave``; broadcastable to ``flux``
        (scalar, per pixel, per spectrum or both). Zero means no smoothing.
    variance : `~numpy.ndarray`, optional
        Propagated as ``sum(w**2 var)`` (covariance neglected).
    truncate : float, optional
        Kernel half-width in units of the largest sigma.

    Returns
    -------
    smoothed : `~numpy.ndarray`
    variance : `~numpy.ndarray`
        Only when ``variance`` is given.
    """
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    dx = wave[1] - wave[0]
    s = np.broadcast_to(np.asarray(sigma, dtype=float) / dx, flux.shape)
    smax = float(np.max(s))
    if smax <= 0:
        return (flux, variance) if variance is not None else flux
    half = max(1, int(np.ceil(truncate * smax)))
    k = np.arange(-half, half + 1)
    s_safe = np.where(s > 0, s, 1.0)
    # weights w[k] = exp(-k^2 / 2 s^2) per pixel (normalised), delta where s == 0
    wsum = np.zeros_like(flux)
    out = np.zeros_like(flux)
    vout = np.zeros_like(flux) if variance is not None else None
    pad = np.pad(flux, ((0, 0), (half, half)), mode="edge")
    vpad = (np.pad(np.asarray(variance, dtype=float).reshape(flux.shape), ((0, 0), (half, half)),
                   mode="edge") if variance is not None else None)
    n = flux.shape[1]
    weights = []
    for kk in k:
        w = np.where(s > 0, np.exp(-0.5 * (kk / s_safe) ** 2), 1.0 * (kk == 0))
        weights.append(w)
        wsum += w
    for kk, w in zip(k, weights):
        sl = slice(half + kk, half + kk + n)
        out += w * pad[:, sl]
        if vout is not None:
            vout += w**2 * vpad[:, sl]
    out /= wsum
    if vout is None:
        return out
    return out, vout / wsum**2


def gaussian_broadening_matrix(wave, sigma):
    """
    Sparse matrix convolving a spectrum sampled at ``wave`` with Gaussians of ``sigma``.

    ``sigma`` (same unit as ``wave``, one per output pixel, >= 0) may vary
    along the spectrum and be smaller than a pixel: each weight is the
    integral of the Gaussian centred on the output pixel over an input pixel
    (edges at the midpoints, `pixel_edges`), out to 5 sigma, rows normalised
    to one, so ``sigma = 0`` is the identity. ``matrix.power(2) @ variance``
    is the variance of independent input pixels. Used for the instrumental
    resolution of the kinematics templates and of the external template
    grids; the simulator's `gaussian_smooth` (point-sampled kernel on a
    uniform grid) is a different operation.

    Parameters
    ----------
    wave : `~numpy.ndarray`
        ``(n,)`` increasing pixel centres, any spacing.
    sigma : `~numpy.ndarray`
        ``(n,)`` Gaussian sigma per output pixel, in the unit of ``wave``.

    Returns
    -------
    matrix : `scipy.sparse.csr_matrix`
        ``(n, n)``; ``matrix @ flux`` is the smoothed spectrum.
    """
    from scipy import sparse
    from scipy.special import ndtr

    n = wave.size
    edges = pixel_edges(wave)
    step = np.diff(edges)
    half = int(np.ceil(np.max(5.0 * sigma / step))) + 1
    rows = np.repeat(np.arange(n), 2 * half + 1)
    cols = rows + np.tile(np.arange(-half, half + 1), n)
    inside = (cols >= 0) & (cols < n)
    rows, cols = rows[inside], cols[inside]
    s = sigma[rows]
    point = s <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        hi = ndtr((edges[cols + 1] - wave[rows]) / s)
        lo = ndtr((edges[cols] - wave[rows]) / s)
    weights = np.where(point, (rows == cols).astype(float), hi - lo)
    matrix = sparse.csr_matrix((weights, (rows, cols)), shape=(n, n))
    norm = np.asarray(matrix.sum(axis=1)).ravel()
    return sparse.diags(1.0 / norm) @ matrix
