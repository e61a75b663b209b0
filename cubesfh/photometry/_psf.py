# Licensed under a 3-clause BSD style license - see LICENSE
"""PSF matching of HST images to the (much broader) MUSE PSF."""

import logging
import warnings

import numpy as np
from astropy import units as u
from scipy.signal import fftconvolve
from scipy.special import erf

from ..utils.exceptions import CubeSFHError, CubeSFHWarning

try:  # photutils >= 3.0
    from photutils.psf_matching import TukeyWindow
    from photutils.psf_matching import make_kernel as _photutils_kernel
except ImportError:  # pragma: no cover - photutils < 3.0
    from photutils.psf.matching import TukeyWindow
    from photutils.psf.matching import create_matching_kernel as _photutils_kernel

__all__ = ["DEFAULT_WINDOW", "gaussian_psf", "make_matching_kernel", "match_psf"]

log = logging.getLogger(__name__)

_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))

#: Default taper of the matching kernel in Fourier space: a Tukey window, flat
#: out to 75 % of the Nyquist radius. It suppresses the high-frequency noise
#: that a ratio of transfer functions amplifies, without touching the
#: frequencies that carry the (narrow) Fourier transform of a kernel that
#: broadens 0.08 arcsec to a seeing-limited MUSE PSF. (A cosine-bell window
#: with alpha=0.35 starts tapering much closer to the origin and broadens the
#: result by several per cent.)
DEFAULT_WINDOW = TukeyWindow(alpha=0.25)

# Default half-size of the kernel grid, in units of the target FWHM.
_HALF_SIZE_FWHM = 3.0

# A PSF-matched pixel keeps a value if at least this fraction of the kernel
# weight fell on valid pixels (normalised convolution fills small holes).
_MIN_KERNEL_WEIGHT = 0.95


def _to_pixels(fwhm, pixel_scale, name):
    try:
        fwhm = u.Quantity(fwhm, u.arcsec)
        scale = u.Quantity(pixel_scale, u.arcsec)
    except u.UnitsError:
        msg = f"{name} and pixel_scale must be angles (e.g. 0.08 * u.arcsec)."
        raise CubeSFHError(msg) from None
    if not (fwhm.isscalar and scale.isscalar) or not fwhm.value > 0 or not scale.value > 0:
        msg = f"{name} and pixel_scale must be single positive angles; got {fwhm}, {scale}."
        raise CubeSFHError(msg)
    return (fwhm / scale).to_value(u.dimensionless_unscaled)


def gaussian_psf(fwhm, *, pixel_scale, shape):
    """
    Circular Gaussian PSF integrated over square pixels, centred on the
    central pixel and normalised to unit sum.

    Parameters
    ----------
    fwhm : `~astropy.units.Quantity`
        FWHM of the Gaussian (before pixelation).
    pixel_scale : `~astropy.units.Quantity`
        Pixel size.
    shape : tuple of int
        ``(ny, nx)``, both odd.

    Returns
    -------
    psf : `~numpy.ndarray`
    """
    sigma = _to_pixels(fwhm, pixel_scale, "fwhm") * _FWHM_TO_SIGMA
    profiles = []
    for n in shape:
        if n % 2 != 1:
            msg = f"PSF shape must be odd so that the PSF is centred on a pixel; got {shape}."
            raise CubeSFHError(msg)
        x = np.arange(n) - (n - 1) / 2
        s2 = np.sqrt(2.0) * sigma
        profiles.append(0.5 * (erf((x + 0.5) / s2) - erf((x - 0.5) / s2)))
    psf = np.outer(profiles[0], profiles[1])
    return psf / psf.sum()


def make_matching_kernel(fwhm_in, fwhm_out, *, pixel_scale, window=DEFAULT_WINDOW, size=None):
    """
    Kernel that turns a Gaussian PSF of ``fwhm_in`` into one of ``fwhm_out``.

    Both PSFs are modelled as pixel-integrated circular Gaussians on the
    image's pixel grid and the kernel is the photutils Fourier-ratio matching
    kernel (`photutils.psf_matching.make_kernel`; ``create_matching_kernel``
    before photutils 3.0), normalised to unit sum so that convolution
    conserves flux.

    Parameters
    ----------
    fwhm_in, fwhm_out : `~astropy.units.Quantity`
        FWHM of the image and the target FWHM; ``fwhm_out > fwhm_in``.
    pixel_scale : `~astropy.units.Quantity`
        Pixel size of the image.
    window : callable or `None`, optional
        photutils window (taper) applied in Fourier space; default
        `DEFAULT_WINDOW`. `None` applies none.
    size : int, optional
        Odd side of the kernel in pixels. Default: ``2 * ceil(3 * fwhm_out /
        pixel_scale) + 1``, which holds the target PSF to 1e-10 of its peak.

    Returns
    -------
    kernel : `~numpy.ndarray`
    """
    fin = _to_pixels(fwhm_in, pixel_scale, "fwhm_in")
    fout = _to_pixels(fwhm_out, pixel_scale, "fwhm_out")
    if fout <= fin:
        msg = f"fwhm_out ({fwhm_out}) must exceed fwhm_in ({fwhm_in}) to build a kernel."
        raise CubeSFHError(msg)
    if size is None:
        size = 2 * int(np.ceil(_HALF_SIZE_FWHM * fout)) + 1
    if size % 2 != 1:
        msg = f"Kernel size must be odd; got {size}."
        raise CubeSFHError(msg)
    shape = (size, size)
    source = gaussian_psf(fwhm_in, pixel_scale=pixel_scale, shape=shape)
    target = gaussian_psf(fwhm_out, pixel_scale=pixel_scale, shape=shape)
    kernel = _photutils_kernel(source, target, window=window)
    return kernel / kernel.sum()


def match_psf(sb_image, pixel_scale, fwhm_in, fwhm_out, *, window=DEFAULT_WINDOW, mask=None):
    """
    Convolve an image to a broader Gaussian PSF.

    The image should be in surface brightness (or any per-pixel quantity on
    a grid of equal-area pixels): the kernel sums to one, so the total
    :math:`\\sum_i I_i \\Omega_{\\rm pix}` is unchanged (up to what spills over
    the image edges).

    Invalid pixels (``mask`` or NaN) are handled by normalised convolution:
    the output is ``conv(I * w) / conv(w)`` with ``w`` = 1 for valid pixels.
    Output pixels where less than 95 % of the kernel weight fell on valid
    pixels are set to NaN; isolated bad pixels are therefore filled in.

    Parameters
    ----------
    sb_image : `~astropy.units.Quantity` or `~numpy.ndarray`
        2-D image.
    pixel_scale : `~astropy.units.Quantity`
        Pixel size.
    fwhm_in : `~astropy.units.Quantity`
        PSF FWHM of the image.
    fwhm_out : `~astropy.units.Quantity`
        Target PSF FWHM (e.g. the MUSE cube's).
    window : callable or `None`, optional
        Fourier-space window for the kernel, see `make_matching_kernel`.
    mask : array-like of bool, optional
        `True` for invalid pixels.

    Returns
    -------
    matched : `~astropy.units.Quantity` or `~numpy.ndarray`
        Same type and unit as ``sb_image``, float64. If ``fwhm_out <=
        fwhm_in`` the image is returned unconvolved (a copy) with a
        `CubeSFHWarning`.
    """
    unit = sb_image.unit if isinstance(sb_image, u.Quantity) else None
    data = np.array(u.Quantity(sb_image).value if unit is not None else sb_image, dtype=float)
    if data.ndim != 2:
        msg = f"match_psf needs a 2-D image; got shape {data.shape}."
        raise CubeSFHError(msg)
    valid = np.isfinite(data)
    if mask is not None:
        valid &= ~np.asarray(mask, dtype=bool)
    fin = u.Quantity(fwhm_in, u.arcsec)
    fout = u.Quantity(fwhm_out, u.arcsec)
    if fout <= fin:
        msg = (f"Target PSF FWHM {fout:.3f} is not broader than the image PSF {fin:.3f}; "
               f"the image is used without convolution. Check the cube's PSF FWHM.")
        warnings.warn(msg, CubeSFHWarning)
        data[~valid] = np.nan
        return data * unit if unit is not None else data

    kernel = make_matching_kernel(fin, fout, pixel_scale=pixel_scale, window=window)
    log.debug("PSF matching %.3f -> %.3f arcsec with a %d x %d kernel", fin.value,
              fout.to_value(u.arcsec), *kernel.shape)
    data[~valid] = 0.0
    out = fftconvolve(data, kernel, mode="same")
    if not valid.all():
        weight = fftconvolve(valid.astype(float), kernel, mode="same")
        good = weight >= _MIN_KERNEL_WEIGHT
        out = np.divide(out, weight, out=np.full_like(out, np.nan), where=good)
    return out * unit if unit is not None else out
