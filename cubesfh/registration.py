# Licensed under a 3-clause BSD style license - see LICENSE
"""
Registration and flux cross-calibration of HST images against a MUSE cube.

The astrometry of a MUSE cube and of the HST images of the same field often
disagree by a fraction of an arcsecond (sometimes more), and their flux
calibrations by a few per cent. This module

1. collapses the cube through an HST bandpass (`synthetic_band_image`),
   giving an image in the cube's flux unit at the cube's PSF;
2. PSF-matches the HST image to the cube, reprojects it onto (a padded
   version of) the spaxel grid and finds the shift that best maps it onto
   the synthetic image (`measure_offset`);
3. corrects the WCS of the HST image (`apply_offset`);
4. compares the total fluxes over the common footprint, band by band
   (`register`, which does all of the above and returns a
   `RegistrationReport`).

Conventions
-----------
An offset is **HST minus MUSE**: the position the HST WCS gives to a source
minus the position the cube's WCS gives to the same source, as
``(dRA cos Dec, dDec)`` in arcsec and as ``(dx, dy)`` in cube pixels.
`apply_offset` removes it from the HST image. The flux ratio is **MUSE /
HST** in the same band.
"""

import contextlib
import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import QTable
from astropy.wcs.utils import proj_plane_pixel_area
from scipy import ndimage
from scipy.optimize import least_squares

from .conventions import HST_BANDS
from .hst import SB_UNIT
from .photometry import cutout_to_grid, grid_overlap, match_psf, reproject_to_cube
from .photometry._binphot import _ordered_images
from .photometry._reproject import _no_data_message
from .templates import load_filter
from .utils import CubeSFHError, CubeSFHWarning, positive_angle, progress

__all__ = [
    "DEFAULT_MAX_OFFSET",
    "DEFAULT_MIN_CORRELATION",
    "DEFAULT_MIN_COVERAGE",
    "DEFAULT_TOLERANCE",
    "EMISSION_LINES",
    "Offset",
    "RegistrationReport",
    "apply_offset",
    "band_coverage",
    "measure_offset",
    "register",
    "synthetic_band_image",
]

log = logging.getLogger(__name__)

#: Largest offset accepted between an HST image and the cube; beyond it the
#: run stops (`register`, `measure_offset`).
DEFAULT_MAX_OFFSET = 2.0 * u.arcsec

#: A band is "covered" by the cube when at least this fraction of its photon
#: weight (the integral of T(lambda) lambda dlambda) falls inside the cube's
#: wavelength range. The nominal MUSE range (4750-9350 A) covers 86 % of
#: WFC3/UVIS F555W and 95 % of F814W.
DEFAULT_MIN_COVERAGE = 0.8

#: Correlation coefficient (cube vs shifted HST image) below which an offset
#: is deemed unreliable: `measure_offset` warns and `register` does not apply
#: it. Same-band images of the same galaxy give r > 0.99 on the mock
#: observation; F275W against the cube's F555W image 0.86; smoothed noise
#: images up to ~0.6.
DEFAULT_MIN_CORRELATION = 0.7

#: Tolerance on |MUSE/HST - 1| beyond which `register` warns.
DEFAULT_TOLERANCE = 0.05

#: Bands preferred for measuring the offset of an HST visit, in order.
PREFERRED_BANDS = ("F555W", "F814W")

# Throughput below this fraction of the peak is ignored (as in
# FilterCurve.check_coverage): it removes the far red leaks of the UV filters.
_THROUGHPUT_FLOOR = 1e-3

# A spaxel of the synthetic image is valid when the good pixels of its
# spectrum carry at least this fraction of the (absolute) band weight.
_MIN_BAND_WEIGHT = 0.8

# Wavelength range of the cube fitted by a straight line to extrapolate f_lambda
# into the part of a band the cube misses.
_FIT_WIDTH = 600.0  # Angstrom

#: Strong emission lines (air, Angstrom) left out of the straight-line fits
#: that extrapolate f_lambda: H beta, [OIII], [NI], HeI, [OI], [NII], H alpha,
#: [SII], [ArIII] and [SIII].
EMISSION_LINES = (4861.33, 4958.91, 5006.84, 5197.90, 5200.26, 5875.62, 6300.30, 6363.78,
                  6548.05, 6562.80, 6583.45, 6716.44, 6730.82, 7135.79, 9068.60)
# Redshift range (-600 to +3600 km/s) and half-width (Angstrom) of the windows
# around EMISSION_LINES excluded from the fits.
_LINE_REDSHIFTS = (-0.002, 0.012)
_LINE_HALF_WIDTH = 10.0

# A reprojected spaxel counts as covered when this fraction of it overlaps
# valid (PSF-matched) HST data.
_MIN_FOOTPRINT = 0.999

# Kernel half-size of the PSF matching, in target FWHM (as cubesfh.photometry).
_KERNEL_HALF_SIZE = 3.0

# Extra spaxels searched beyond max_offset, and the margin of the padded grid.
_SEARCH_EXTRA = 3
# The sub-pixel fit moves at most this many spaxels from the best integer shift.
_FINE_RANGE = 1.0
# Valid HST spaxels are eroded by this many spaxels before the sub-pixel fit, so
# that the cubic-spline interpolation only uses valid data.
_ERODE = 3

_MISSING_METHODS = ("linear", "mean")
_PER_CHOICES = ("band", "visit", "image", "all")

# FWHM of a Gaussian -> number of spaxels per resolution element factor.
_BEAM_FACTOR = math.pi / (4.0 * math.log(2.0))


# ----------------------------------------------------------------------------
# Band weights and synthetic images
# ----------------------------------------------------------------------------

def _filter(band, instrument):
    try:
        return load_filter(str(band).upper(), instrument)
    except CubeSFHError:
        if instrument != "WFC3/UVIS":
            log.info("No %s throughput for %s; using WFC3/UVIS %s.", band, instrument, band)
            return load_filter(str(band).upper(), "WFC3/UVIS")
        raise


def _pixel_edges(wave):
    """Edges of pixels centred on ``wave`` (increasing)."""
    mid = 0.5 * (wave[1:] + wave[:-1])
    first = wave[0] - (mid[0] - wave[0]) if wave.size > 1 else wave[0] - 0.5
    last = wave[-1] + (wave[-1] - mid[-1]) if wave.size > 1 else wave[-1] + 0.5
    return np.concatenate([[first], mid, [last]])


def _photon_integral(curve, lo, hi, moment=None):
    """
    Integral of ``T lambda`` (``moment=None``) or ``T lambda (lambda - moment)``
    over ``[lo, hi]`` (Angstrom) on the filter's own grid, ignoring throughput
    below `_THROUGHPUT_FLOOR` of the peak.
    """
    w = curve.wavelength.to_value(u.AA)
    t = np.where(curve.throughput > _THROUGHPUT_FLOOR * curve.throughput.max(),
                 curve.throughput, 0.0)
    if hi <= lo:
        return 0.0
    inside = (w > lo) & (w < hi)
    ww = np.concatenate([[lo], w[inside], [hi]])
    tt = np.interp(ww, w, t, left=0.0, right=0.0)
    f = tt * ww if moment is None else tt * ww * (ww - moment)
    return float(np.trapezoid(f, ww))


def _support(curve):
    w = curve.wavelength.to_value(u.AA)
    good = w[curve.throughput > _THROUGHPUT_FLOOR * curve.throughput.max()]
    return float(good[0]), float(good[-1])


def band_coverage(band, wavelength, *, instrument="WFC3/UVIS"):
    """
    Fraction of an HST band's photon weight inside a wavelength range.

    The photon weight of a band is :math:`\\int T(\\lambda)\\,\\lambda\\,
    d\\lambda` (the weighting of the ``PHOTFLAM`` mean f_lambda). The
    fraction is taken over the pixels ``wavelength`` (their edges), with the
    throughput below 1e-3 of its peak ignored (the far red leak of F275W and
    F336W, otherwise ~1 % of their weight).

    Parameters
    ----------
    band : str
        HST band, e.g. ``'F555W'``.
    wavelength : `~astropy.units.Quantity`
        Pixel centres, increasing (e.g. ``cube.wavelength``).
    instrument : str, optional
        Camera of the throughput curve (``'WFC3/UVIS'`` or ``'WFPC2'``).

    Returns
    -------
    fraction : float
        Between 0 and 1.

    Examples
    --------
    The nominal MUSE range covers 86 % of F555W and 95 % of F814W:

    >>> import numpy as np
    >>> from astropy import units as u
    >>> from cubesfh.registration import band_coverage
    >>> wave = np.arange(4750., 9351., 1.25) * u.AA
    >>> round(band_coverage('F555W', wave), 2), round(band_coverage('F814W', wave), 2)
    (0.86, 0.95)
    """
    curve = _filter(band, instrument)
    wave = _as_wavelength(wavelength)
    edges = _pixel_edges(wave)
    lo_f, hi_f = _support(curve)
    total = _photon_integral(curve, lo_f, hi_f)
    inside = _photon_integral(curve, max(lo_f, edges[0]), min(hi_f, edges[-1]))
    return float(np.clip(inside / total, 0.0, 1.0))


def _as_wavelength(wavelength):
    try:
        wave = u.Quantity(wavelength).to_value(u.AA, equivalencies=u.spectral())
    except u.UnitsError:
        msg = f"wavelength must be a Quantity in a spectral unit (e.g. u.AA); got {wavelength!r}."
        raise CubeSFHError(msg) from None
    wave = np.atleast_1d(np.asarray(wave, dtype=float))
    if wave.ndim != 1 or wave.size < 2 or np.any(np.diff(wave) <= 0):
        msg = "wavelength must be a 1-D increasing array of at least two pixels."
        raise CubeSFHError(msg)
    return wave


def _line_windows(wave):
    """`True` for pixels near a strong emission line at any redshift in _LINE_REDSHIFTS."""
    lines = np.asarray(EMISSION_LINES)
    lo = lines * (1 + _LINE_REDSHIFTS[0]) - _LINE_HALF_WIDTH
    hi = lines * (1 + _LINE_REDSHIFTS[1]) + _LINE_HALF_WIDTH
    return np.any((wave[:, None] >= lo) & (wave[:, None] <= hi), axis=1)


def _band_weights(band, wave, *, instrument="WFC3/UVIS", missing="linear",
                  fit_width=_FIT_WIDTH):
    """
    Weights ``W`` over ``wave`` with ``W @ f`` the estimated mean f_lambda
    through the whole band, and the covered fraction.

    ``missing='mean'``: the photon-weighted mean over the covered pixels (the
    missing part is assumed to have the same mean f_lambda). ``'linear'``: the
    covered part, plus the missing part(s) filled with a straight line fitted
    (unweighted least squares) to the ``fit_width`` Angstrom of the cube next
    to each missing edge, leaving out windows around `EMISSION_LINES`. Both
    are linear in ``f`` and exact for a constant f_lambda (``W.sum() == 1``);
    ``'linear'`` is also exact for any f_lambda linear in wavelength.
    """
    if missing not in _MISSING_METHODS:
        msg = f"missing must be one of {_MISSING_METHODS}; got {missing!r}."
        raise CubeSFHError(msg)
    curve = _filter(band, instrument)
    edges = _pixel_edges(wave)
    lo_f, hi_f = _support(curve)
    total = _photon_integral(curve, lo_f, hi_f)
    c_lo, c_hi = max(lo_f, edges[0]), min(hi_f, edges[-1])
    coverage = max(_photon_integral(curve, c_lo, c_hi), 0.0) / total
    # covered part on the cube pixels: T(lambda) lambda dlambda
    t = np.interp(wave, curve.wavelength.to_value(u.AA), curve.throughput, left=0.0, right=0.0)
    t[(wave < lo_f) | (wave > hi_f)] = 0.0
    k = t * wave * np.diff(edges)
    if coverage <= 0 or k.sum() <= 0:
        return np.zeros_like(wave), 0.0
    if missing == "mean" or coverage >= 1.0:
        return k / k.sum(), float(coverage)
    weights = coverage * k / k.sum()
    for side, lo, hi, edge in (("blue", lo_f, edges[0], edges[0]),
                               ("red", edges[-1], hi_f, edges[-1])):
        if hi <= lo:
            continue
        m0 = _photon_integral(curve, lo, hi) / total
        m1 = _photon_integral(curve, lo, hi, moment=edge) / total / 1000.0
        near = np.abs(wave - edge) <= fit_width
        clean = near & ~_line_windows(wave)
        if clean.sum() >= 10:
            near = clean
        if near.sum() < 2:
            near = np.zeros(wave.size, bool)
            near[:2] = side == "blue"
            near[-2:] = side == "red"
        x = np.stack([np.ones(near.sum()), (wave[near] - edge) / 1000.0], axis=1)
        # mean over the missing part of a + b (lambda - edge), with (a, b) = pinv(x) @ f
        weights[near] += np.array([m0, m1]) @ np.linalg.pinv(x)
    return weights, float(coverage)


def _synthetic_images(cube, bands, *, instrument="WFC3/UVIS", missing="linear",
                      max_memory=None, progress_bar=False):
    """
    Synthetic images of ``cube`` in several bands in one pass over the cube.

    Returns ``{band: (image ndarray in cube.unit, coverage)}``.
    """
    wave = cube.wavelength.to_value(u.AA)
    weights, coverages = [], []
    for band in bands:
        w, cov = _band_weights(band, wave, instrument=instrument, missing=missing)
        if cov <= 0:
            msg = (f"The cube ({wave[0]:.0f}-{wave[-1]:.0f} A) does not cover the {band} band "
                   f"at all; no synthetic {band} image can be made.")
            raise CubeSFHError(msg)
        weights.append(w)
        coverages.append(cov)
    weights = np.array(weights)
    used = np.flatnonzero(np.any(weights != 0, axis=0))
    i0, i1 = int(used[0]), int(used[-1]) + 1
    sub = cube[i0:i1]  # reads only the planes the bands need
    w = weights[:, i0:i1]
    absw = np.abs(w)
    ny, nx = cube.spatial_shape
    num = np.zeros((len(bands), ny, nx))
    den = np.zeros((len(bands), ny, nx))
    good_weight = np.zeros((len(bands), ny, nx))
    for ys, data, _, mask in sub.iter_chunks(max_memory=max_memory, progress_bar=progress_bar):
        data[mask] = 0.0  # chunks are fresh copies
        good = (~mask).astype(data.dtype)
        num[:, ys] = np.tensordot(w.astype(data.dtype), data, axes=(1, 0))
        den[:, ys] = np.tensordot(w.astype(data.dtype), good, axes=(1, 0))
        good_weight[:, ys] = np.tensordot(absw.astype(data.dtype), good, axes=(1, 0))
        del good
    valid = (good_weight >= _MIN_BAND_WEIGHT * absw.sum(axis=1)[:, None, None]) & (den > 0)
    images = np.where(valid, num / np.where(valid, den, 1.0), np.nan)
    return {band: (images[i], coverages[i]) for i, band in enumerate(bands)}


def synthetic_band_image(cube, band, *, instrument="WFC3/UVIS", missing="linear",
                         min_coverage=DEFAULT_MIN_COVERAGE, max_memory=None,
                         progress_bar=False):
    """
    Image of a cube through an HST band: the photon-weighted mean f_lambda
    of every spaxel.

    For each spaxel :math:`\\langle f \\rangle = \\sum_i W_i f_i`, with
    :math:`W_i \\propto T(\\lambda_i)\\,\\lambda_i\\,\\Delta\\lambda_i` over
    the cube pixels in the band (the ``PHOTFLAM`` convention, so that the
    result is directly comparable with an HST image in f_lambda). Where the
    cube covers only part of the band, the missing part is estimated
    according to ``missing`` (see Notes). The cube is read chunk by chunk
    (`~cubesfh.Cube.iter_chunks`), and only the planes the band needs.

    Parameters
    ----------
    cube : `~cubesfh.Cube`
        The cube.
    band : str
        HST band, e.g. ``'F555W'``.
    instrument : str, optional
        Camera of the throughput curve (``'WFC3/UVIS'``, default, or
        ``'WFPC2'``).
    missing : {'linear', 'mean'}, optional
        How the part of the band outside the cube is accounted for:
        ``'linear'`` (default) extrapolates f_lambda with a straight line
        fitted to the 600 A of the cube next to the missing edge;
        ``'mean'`` assumes the missing part has the mean f_lambda of the
        covered part (i.e. returns the mean over the covered part only).
    min_coverage : float, optional
        Smallest covered fraction of the band's photon weight accepted
        (default `DEFAULT_MIN_COVERAGE`, 0.8).
    max_memory : `~astropy.units.Quantity` or int, optional
        Memory budget of the chunked read (see `~cubesfh.Cube.iter_chunks`).
    progress_bar : bool, optional
        Show a progress bar over the chunks.

    Returns
    -------
    image : `~astropy.units.Quantity`
        ``(ny, nx)`` mean f_lambda per spaxel, in the cube's unit; NaN where
        the good pixels of a spectrum carry less than 80 % of the band's
        weight.
    coverage : float
        Fraction of the band's photon weight inside the cube's wavelength
        range (`band_coverage`).

    Raises
    ------
    CubeSFHError
        If the cube covers less than ``min_coverage`` of the band.

    Notes
    -----
    Masked pixels of a spectrum are left out and the weights renormalised
    over the good ones, i.e. they are assumed to have the weighted mean
    f_lambda of the rest.

    With ``missing='linear'`` the weights of the covered part are scaled by
    the covered fraction :math:`c` and the missing part, of photon weight
    :math:`1 - c`, is filled with a straight line fitted to the 600 A of the
    cube next to the missing edge, leaving out windows around the strong
    emission lines of `EMISSION_LINES` (redshifted by -600 to +3600 km/s).
    The estimate is linear in the spectrum (one weight vector for all
    spaxels), so the sum of the synthetic fluxes over a region is the
    synthetic flux of the summed spectrum; it is exact for any f_lambda that
    is linear in wavelength. On the 222 BC03 templates of the bundled
    library (all ages and metallicities, redshifted by 700 km/s), a cube
    starting at 4750 A recovers the full F555W mean to within -0.9 % / +0.8 %
    (+0.2 % to +0.8 % for ages above 1 Gyr), where ``missing='mean'`` is off
    by -10 % to +2.5 %; a cube ending at 9350 A recovers F814W to within
    -0.4 % / +0.2 % (``'mean'``: -1.2 % to +2.6 %). On the mock galaxy of
    `cubesfh.synthesis.mock_observation` (with nebular lines) the F555W
    estimate is 0.5 % high.

    Examples
    --------
    A cube with a constant f_lambda gives that f_lambda, whatever the
    coverage:

    >>> import numpy as np
    >>> from astropy import units as u
    >>> from astropy.wcs import WCS
    >>> from cubesfh import Cube
    >>> from cubesfh.registration import synthetic_band_image
    >>> wcs = WCS(naxis=3)
    >>> wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN', 'AWAV']
    >>> wcs.wcs.cunit = ['deg', 'deg', 'Angstrom']
    >>> wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600, 5.0]
    >>> wcs.wcs.crval = [150.0, 2.0, 4750.0]
    >>> wcs.wcs.crpix = [1, 1, 1]
    >>> cube = Cube(np.full((921, 3, 3), 2.5), wcs=wcs, unit='1e-20 erg/(s cm2 Angstrom)')
    >>> image, coverage = synthetic_band_image(cube, 'F555W')
    >>> print(np.round(image.value, 6)[0], round(coverage, 2))
    [2.5 2.5 2.5] 0.86
    """
    if not 0.0 < min_coverage <= 1.0:
        msg = f"min_coverage must be in (0, 1]; got {min_coverage}."
        raise CubeSFHError(msg)
    band = str(band).upper()
    coverage = band_coverage(band, cube.wavelength, instrument=instrument)
    if coverage < min_coverage:
        wave = cube.wavelength.to_value(u.AA)
        msg = (f"The cube ({wave[0]:.0f}-{wave[-1]:.0f} A) covers {coverage:.1%} of the "
               f"{band} band's photon weight, less than min_coverage={min_coverage:g}; "
               f"choose a band the cube covers (F555W, F814W) or lower min_coverage= "
               f"(the missing part is then extrapolated).")
        raise CubeSFHError(msg)
    images = _synthetic_images(cube, [band], instrument=instrument, missing=missing,
                               max_memory=max_memory, progress_bar=progress_bar)
    image, coverage = images[band]
    return image * cube.unit, coverage


# ----------------------------------------------------------------------------
# HST images on the cube grid
# ----------------------------------------------------------------------------

def _padded_wcs(cube_wcs, shape, pad):
    """Celestial WCS and shape of the cube grid extended by ``pad`` spaxels on each side."""
    wcs = cube_wcs.deepcopy()
    wcs.wcs.crpix = np.asarray(wcs.wcs.crpix) + pad
    ny, nx = shape
    new_shape = (ny + 2 * pad, nx + 2 * pad)
    wcs.pixel_shape = new_shape[::-1]
    return wcs, new_shape


def _hst_on_grid(image, grid_wcs, shape, *, target_fwhm, unit, tile_size=128,
                 method="exact"):
    """
    HST image PSF-matched to ``target_fwhm`` and reprojected onto a grid, as a
    mean flux density per grid pixel in ``unit`` (NaN where not fully covered).

    Tiles of the grid are processed one at a time (cut out with a margin of
    three target FWHM, `match_psf`, `reproject_to_cube`), which bounds the
    memory used.
    """
    area = proj_plane_pixel_area(grid_wcs) * 3600.0**2 * u.arcsec**2
    to_unit = (1.0 * SB_UNIT * area).to_value(unit)
    margin = int(np.ceil(_KERNEL_HALF_SIZE * (target_fwhm / image.pixel_scale)
                         .decompose().value)) + 2
    out = np.full(shape, np.nan)
    ny, nx = shape
    step = tile_size or max(ny, nx)
    for ty in range(0, ny, step):
        for tx in range(0, nx, step):
            tile = (slice(ty, min(ny, ty + step)), slice(tx, min(nx, tx + step)))
            tshape = (tile[0].stop - ty, tile[1].stop - tx)
            twcs = grid_wcs[tile]
            box, _ = grid_overlap(image.wcs, image.shape, twcs, tshape)
            if box is None:
                continue
            cut = cutout_to_grid(image, twcs, tshape, margin=margin)
            sb = cut.to_surface_brightness()
            matched = match_psf(sb, cut.pixel_scale, cut.psf_fwhm, target_fwhm, mask=cut.mask)
            inner, _ = grid_overlap(cut.wcs, cut.shape, twcs, tshape, margin=1)
            sb_tile, footprint = reproject_to_cube(matched[inner], twcs, tshape,
                                                   wcs=cut.wcs[inner], method=method)
            values = sb_tile.to_value(SB_UNIT)
            good = np.isfinite(values) & (footprint >= _MIN_FOOTPRINT)
            out[tile] = np.where(good, values * to_unit, np.nan)
    return out


# ----------------------------------------------------------------------------
# Offsets
# ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Offset:
    """
    Offset of an HST image relative to the cube (HST minus MUSE).

    Parameters
    ----------
    ra, dec : `~astropy.units.Quantity`
        :math:`\\Delta\\alpha\\cos\\delta` and :math:`\\Delta\\delta`: where
        the HST WCS puts a source minus where the cube's WCS puts it.
    reference : `~astropy.coordinates.SkyCoord`
        Sky position (in the cube's frame) at which the offset was measured
        (the centre of the cube); `apply_offset` makes the correction exact
        there.
    dx, dy : float, optional
        The same offset in cube pixels (x, y).
    dx_err, dy_err : float, optional
        1-sigma uncertainties of ``dx``, ``dy`` (cube pixels).
    ra_err, dec_err : `~astropy.units.Quantity`, optional
        1-sigma uncertainties of ``ra``, ``dec``.
    correlation : float, optional
        Pearson correlation coefficient between the synthetic cube image and
        the shifted HST image at the best shift (1 = identical up to scale
        and background).
    band : str, optional
        Band of the synthetic cube image used.
    image_band : str, optional
        Band of the HST image that was measured.
    scale : float, optional
        Best-fitting scale, cube image / HST image (per spaxel; it absorbs
        the flux ratio and, for a band the cube does not cover, the colour).
    n_spaxels : int, optional
        Number of spaxels used in the fit.
    """

    ra: u.Quantity
    dec: u.Quantity
    reference: SkyCoord
    dx: float = float("nan")
    dy: float = float("nan")
    dx_err: float = float("nan")
    dy_err: float = float("nan")
    ra_err: u.Quantity = dataclasses.field(default_factory=lambda: np.nan * u.arcsec)
    dec_err: u.Quantity = dataclasses.field(default_factory=lambda: np.nan * u.arcsec)
    correlation: float = float("nan")
    band: str | None = None
    image_band: str | None = None
    scale: float = float("nan")
    n_spaxels: int = 0

    @property
    def separation(self):
        """Length of the offset (`~astropy.units.Quantity`, arcsec)."""
        return np.hypot(self.ra, self.dec).to(u.arcsec)

    @property
    def error(self):
        """Uncertainty of the offset, ``hypot(ra_err, dec_err)`` (arcsec)."""
        return np.hypot(self.ra_err, self.dec_err).to(u.arcsec)

    def __str__(self):
        return (f"dRA cos Dec = {self.ra.to_value(u.arcsec):+.3f}\", "
                f"dDec = {self.dec.to_value(u.arcsec):+.3f}\" "
                f"(+- {self.error.to_value(u.arcsec):.3f}\"; dx = {self.dx:+.2f}, "
                f"dy = {self.dy:+.2f} spaxels; {self.image_band} image vs cube "
                f"{self.band}, r = {self.correlation:.3f})")


def _pixel_to_sky_offset(cube_wcs, centre, d):
    """(dRA cos Dec, dDec) in arcsec of cube pixel displacement ``d`` = (dx, dy) at ``centre``."""
    p0 = cube_wcs.pixel_to_world(*centre)
    p1 = cube_wcs.pixel_to_world(centre[0] + d[0], centre[1] + d[1])
    dra, ddec = p0.spherical_offsets_to(p1)
    return dra.to_value(u.arcsec), ddec.to_value(u.arcsec), p0


def _pearson(a, b):
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return float(np.dot(a, b) / den) if den > 0 else -np.inf


def _fill_nearest(values, valid):
    """Copy of ``values`` with invalid pixels set to the nearest valid value."""
    if valid.all():
        return values.copy()
    _, (iy, ix) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return values[iy, ix]


def _no_covered_band(cube, bands, min_coverage):
    """The error of a cube that covers no band to measure the offset of ``bands``."""
    wave = cube.wavelength.to_value(u.AA)
    msg = (f"The cube ({wave[0]:.0f}-{wave[-1]:.0f} A) covers no HST band well enough "
           f"(min_coverage={min_coverage:g}) to measure the offset of the {', '.join(bands)} "
           "image(s); pass correct=False to skip the registration, or lower min_coverage=.")
    return CubeSFHError(msg)


class _InsufficientOverlap(CubeSFHError):
    """The valid parts of the two images overlap too little to measure a shift."""


def _band_plan(images, coverage, min_coverage):
    """
    Order and reference of the per-band offsets: ``[(band, 'cube'|'hst', ref)]``.

    Bands the cube covers are measured against the cube's synthetic image in
    the same band; every other band against its neighbour in wavelength among
    the bands already measured (F438W against F555W, F336W against F438W,
    F275W against F336W), so that one misregistered image cannot carry its
    offset to the others. Without any covered band, the image closest in
    wavelength to a band the cube covers is measured against that band's
    synthetic image first.
    """
    bands = list(images)
    pivot = {b: load_filter(b).pivot.to_value(u.AA) for b in bands}
    plan = [(b, "cube", b) for b in bands if coverage.get(b, 0.0) >= min_coverage]
    if not plan:
        # no covered image: the one closest to a covered band, as for a visit
        img, cb = _group_reference(bands, coverage, min_coverage)
        if img is None:
            return []
        plan.append((img, "cube", cb))
    done = [b for b, _, _ in plan]
    remaining = [b for b in bands if b not in done]
    while remaining:
        gap, band, ref = min((abs(pivot[b] - pivot[d]), b, d) for b in remaining for d in done)
        plan.append((band, "hst", ref))
        done.append(band)
        remaining.remove(band)
    return plan


def _fit_shift(reference, hst, pad, *, search, min_overlap=0.5):
    """
    Shift ``(dx, dy)`` (spaxels) that maps the padded HST image onto the
    reference image: ``reference(y, x) ~ a * hst(y + pad + dy, x + pad + dx) + b``.

    1. integer shifts within ``search`` spaxels: Pearson correlation over the
       spaxels valid in both images; the best is the coarse shift (an error
       if it lies on the edge of the search box);
    2. sub-spaxel refinement by non-linear least squares on (dx, dy), the
       scale ``a`` and background ``b`` solved linearly at each step, the HST
       image interpolated with cubic splines.

    Returns a dict with dx, dy, errors, correlation, scale, n, edge flag.
    """
    ny, nx = reference.shape
    ref_valid = np.isfinite(reference)
    hst_valid = np.isfinite(hst)
    n_ref = int(ref_valid.sum())
    if n_ref < 10:
        msg = ("Fewer than 10 valid spaxels in the synthetic cube image; the offset cannot be "
               "measured. Check the cube's mask and wavelength range.")
        raise CubeSFHError(msg)

    # --- coarse: integer shifts
    corr = np.full((2 * search + 1, 2 * search + 1), -np.inf)
    for j, sy in enumerate(range(-search, search + 1)):
        for i, sx in enumerate(range(-search, search + 1)):
            ys = slice(pad + sy, pad + sy + ny)
            xs = slice(pad + sx, pad + sx + nx)
            both = ref_valid & hst_valid[ys, xs]
            if both.sum() < max(10, min_overlap * n_ref):
                continue
            corr[j, i] = _pearson(reference[both], hst[ys, xs][both])
    if not np.isfinite(corr).any():
        msg = ("The HST image overlaps too little of the cube (less than half of the valid "
               "spaxels at every trial shift) to measure an offset; check that it covers the "
               "MUSE field.")
        raise _InsufficientOverlap(msg)
    j, i = np.unravel_index(np.argmax(corr), corr.shape)
    sx0, sy0 = i - search, j - search
    on_edge = abs(sx0) == search or abs(sy0) == search
    # parabolic estimate of the peak, as the starting point
    start = [float(sx0), float(sy0)]
    for axis, (k, n) in enumerate(((i, corr.shape[1]), (j, corr.shape[0]))):
        if 0 < k < n - 1:
            c = corr[j, k - 1:k + 2] if axis == 0 else corr[k - 1:k + 2, i]
            if np.all(np.isfinite(c)):
                den = c[0] - 2 * c[1] + c[2]
                if den < 0:
                    start[axis] += float(np.clip(0.5 * (c[0] - c[2]) / den, -0.5, 0.5))

    # --- fine: least squares with spline interpolation
    eroded = ndimage.binary_erosion(hst_valid, structure=np.ones((3, 3), bool),
                                    iterations=_ERODE)
    mask = ref_valid & eroded[pad + sy0:pad + sy0 + ny, pad + sx0:pad + sx0 + nx]
    if mask.sum() < 10:
        mask = ref_valid & hst_valid[pad + sy0:pad + sy0 + ny, pad + sx0:pad + sx0 + nx]
    yy, xx = np.nonzero(mask)
    data = reference[mask]
    coeffs = ndimage.spline_filter(_fill_nearest(hst, hst_valid), order=3, mode="nearest")

    def sample(d):
        return ndimage.map_coordinates(coeffs, [yy + pad + d[1], xx + pad + d[0]], order=3,
                                       mode="nearest", prefilter=False)

    design = np.empty((data.size, 2))
    design[:, 1] = 1.0

    def linear(model):
        design[:, 0] = model
        coef, *_ = np.linalg.lstsq(design, data, rcond=None)
        return coef

    def residual(d):
        model = sample(d)
        a, b = linear(model)
        return data - (a * model + b)

    lo = np.array([sx0, sy0]) - _FINE_RANGE
    hi = np.array([sx0, sy0]) + _FINE_RANGE
    x0 = np.clip(start, lo + 1e-6, hi - 1e-6)
    fit = least_squares(residual, x0, bounds=(lo, hi), x_scale=[0.1, 0.1], diff_step=1e-4,
                        xtol=1e-8, ftol=1e-10)
    d = fit.x
    model = sample(d)
    a, b = linear(model)
    res = data - (a * model + b)
    # Jacobian of the full model (dx, dy, a, b) for the covariance
    h = 1e-3
    jac = np.empty((data.size, 4))
    for k in range(2):
        step = np.zeros(2)
        step[k] = h
        jac[:, k] = a * (sample(d + step) - sample(d - step)) / (2 * h)
    jac[:, 2] = model
    jac[:, 3] = 1.0
    dof = max(data.size - 4, 1)
    s2 = float(res @ res) / dof
    try:
        cov = np.linalg.inv(jac.T @ jac) * s2
    except np.linalg.LinAlgError:
        cov = np.full((4, 4), np.nan)
    return {"d": d, "cov": cov[:2, :2], "correlation": _pearson(data, model), "scale": float(a),
            "n": int(data.size), "on_edge": on_edge, "coarse": (sx0, sy0)}


def _closest_covered_band(band, coverage, min_coverage):
    """The covered band closest in pivot wavelength to ``band``."""
    covered = [b for b in HST_BANDS if coverage.get(b, 0.0) >= min_coverage]
    if not covered:
        return None
    pivot = load_filter(band).pivot.to_value(u.AA)
    return min(covered, key=lambda b: abs(load_filter(b).pivot.to_value(u.AA) - pivot))


def _measure(cube, image, reference, ref_band, *, max_offset, target_fwhm, method,
             min_correlation, tile_size, weak_note=""):
    """Offset of ``image`` against the synthetic image ``reference`` (ndarray, cube unit)."""
    scale = cube.spaxel_scale.to_value(u.arcsec)
    search = int(np.ceil(max_offset.to_value(u.arcsec) / scale)) + _SEARCH_EXTRA
    pad = search + _ERODE + 2
    cube_wcs = cube.celestial_wcs
    shape = cube.spatial_shape
    wcs_pad, shape_pad = _padded_wcs(cube_wcs, shape, pad)
    hst = _hst_on_grid(image, wcs_pad, shape_pad, target_fwhm=target_fwhm, unit=cube.unit,
                       tile_size=tile_size, method=method)
    if not np.isfinite(hst[pad:pad + shape[0], pad:pad + shape[1]]).any():
        # say whether the image has no data at all, none over the cube, or misses it
        reason = _no_data_message(image, cube_wcs, shape)
        if reason is not None:
            raise CubeSFHError(reason)
    fit = _fit_shift(reference, hst, pad, search=search)
    d = fit["d"]
    centre = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
    dra, ddec, ref_coord = _pixel_to_sky_offset(cube_wcs, centre, d)
    # linear map pixel -> sky offset for the errors
    jx = _pixel_to_sky_offset(cube_wcs, centre, (1.0, 0.0))[:2]
    jy = _pixel_to_sky_offset(cube_wcs, centre, (0.0, 1.0))[:2]
    jac = np.array([[jx[0], jy[0]], [jx[1], jy[1]]])
    # residuals are correlated over a resolution element: inflate the formal
    # covariance by the number of spaxels per beam
    n_beam = max(_BEAM_FACTOR * (target_fwhm.to_value(u.arcsec) / scale) ** 2, 1.0)
    cov_pix = fit["cov"] * n_beam
    cov_sky = jac @ cov_pix @ jac.T
    offset = Offset(ra=dra * u.arcsec, dec=ddec * u.arcsec, reference=ref_coord,
                    dx=float(d[0]), dy=float(d[1]),
                    dx_err=float(np.sqrt(cov_pix[0, 0])), dy_err=float(np.sqrt(cov_pix[1, 1])),
                    ra_err=float(np.sqrt(cov_sky[0, 0])) * u.arcsec,
                    dec_err=float(np.sqrt(cov_sky[1, 1])) * u.arcsec,
                    correlation=fit["correlation"], band=ref_band, image_band=image.band,
                    scale=fit["scale"], n_spaxels=fit["n"])
    name = image.filename or f"the {image.band} image"
    if fit["on_edge"] or offset.separation > max_offset:
        at_least = "at least " if fit["on_edge"] else ""
        weak = ""
        if offset.correlation < min_correlation:
            weak = (f" (The correlation at that shift is weak, r = {offset.correlation:.2f}: "
                    f"the images may also not show the same field.)")
        msg = (f"The HST {image.band} image ({name}) is offset from the MUSE cube by "
               f"{at_least}{offset.separation.to_value(u.arcsec):.2f} arcsec (dRA cos Dec = "
               f"{dra:+.2f}\", dDec = {ddec:+.2f}\"; HST minus MUSE), more than "
               f"max_offset={max_offset.to_value(u.arcsec):g} arcsec. Register the images to "
               f"the cube first (fix the WCS of the HST image or of the cube), or raise "
               f"max_offset= if an offset this large is genuine.{weak}")
        raise CubeSFHError(msg)
    if offset.correlation < min_correlation:
        msg = (f"The {image.band} image and the cube's synthetic {ref_band} image correlate "
               f"poorly (r = {offset.correlation:.2f} < min_correlation={min_correlation:g}) "
               f"at the best shift; the measured offset ({offset.separation:.2f}) may be "
               f"unreliable{weak_note}. Check that both show the same field.")
        warnings.warn(msg, CubeSFHWarning)
    log.info("Offset of %s: %s", name, offset)
    return offset


def _coverages(cube, bands, instrument):
    return {b: band_coverage(b, cube.wavelength, instrument=instrument) for b in bands}


def _instrument_of(image):
    inst = str(getattr(image, "instrument", "WFC3/UVIS") or "WFC3/UVIS").upper()
    return inst if inst in ("WFC3/UVIS", "WFPC2") else "WFC3/UVIS"


def measure_offset(cube, image, *, band=None, max_offset=DEFAULT_MAX_OFFSET,
                   min_coverage=DEFAULT_MIN_COVERAGE, missing="linear", target_psf_fwhm=None,
                   method="exact", min_correlation=DEFAULT_MIN_CORRELATION, tile_size=128,
                   max_memory=None, progress_bar=False):
    """
    Measure the offset between an HST image and a MUSE cube.

    The HST image is convolved to the cube's PSF
    (:func:`~cubesfh.photometry.match_psf`) and reprojected, conserving
    flux, onto the cube's spaxel grid padded on every side by the search
    radius (:func:`~cubesfh.photometry.reproject_to_cube`). It is compared
    with the cube's synthetic image in the same band (`synthetic_band_image`)
    or, for a band the cube does not cover (F275W, F336W, F438W), in the
    covered band closest in wavelength (F555W for those). The shift is found
    in two steps:

    1. the Pearson correlation coefficient over the spaxels valid in both
       images is computed for every integer shift within ``max_offset``
       plus three spaxels; the best one is the coarse offset;
    2. the shift is refined to a fraction of a spaxel by non-linear least
       squares: ``cube = a * HST(x + dx, y + dy) + b`` with a free scale
       ``a`` and background ``b``, the HST image interpolated with cubic
       splines (it is smooth on the spaxel scale after PSF matching).

    Fitting the images directly avoids the pixel locking of a parabolic fit
    to a correlation peak, and the free scale and background make the fit
    insensitive to the flux calibration and sky levels. NaN spaxels of
    either image are left out; the HST image is padded, so shifting it does
    not bring in edges; spaxels closer than three spaxels to the edge of the
    valid HST data are not fitted.

    Parameters
    ----------
    cube : `~cubesfh.Cube`
        The MUSE cube (its PSF FWHM must be known).
    image : `~cubesfh.hst.HSTImage`
        The HST image.
    band : str, optional
        Band of the synthetic cube image to compare with. Default: the
        image's band if the cube covers it (at least ``min_coverage``), else
        the covered band closest in pivot wavelength.
    max_offset : `~astropy.units.Quantity`, optional
        Largest offset accepted (default 2 arcsec). A larger one raises
        `CubeSFHError`.
    min_coverage : float, optional
        Covered fraction of a band's photon weight for the cube to count as
        covering it (default 0.8).
    missing : {'linear', 'mean'}, optional
        Treatment of the part of the band outside the cube, see
        `synthetic_band_image`.
    target_psf_fwhm : `~astropy.units.Quantity`, optional
        PSF FWHM of the cube; default ``cube.psf_fwhm``.
    method : {'exact', 'adaptive'}, optional
        Reprojection method (`~cubesfh.photometry.reproject_to_cube`).
    min_correlation : float, optional
        Warn when the correlation coefficient at the best shift is below
        this (default `DEFAULT_MIN_CORRELATION`, 0.7).
    tile_size : int, optional
        The HST image is processed in tiles of this many spaxels (memory).
    max_memory : `~astropy.units.Quantity` or int, optional
        Memory budget when reading the cube.
    progress_bar : bool, optional
        Show a progress bar while reading the cube.

    Returns
    -------
    offset : `Offset`
        HST minus MUSE: ``dx``, ``dy`` (cube pixels), ``ra`` (dRA cos Dec),
        ``dec`` (arcsec), their 1-sigma errors, ``correlation``, ``band``.

    Raises
    ------
    CubeSFHError
        If the offset exceeds ``max_offset``, the image does not overlap the
        cube, the cube covers no usable band, or its PSF is unknown.

    Warns
    -----
    CubeSFHWarning
        If the correlation at the best shift is below ``min_correlation``.

    Notes
    -----
    The quoted uncertainty is the formal least-squares error scaled by the
    residual scatter and inflated by the square root of the number of
    spaxels per PSF area, :math:`\\pi/(4 \\ln 2)\\,(\\mathrm{FWHM}/\\mathrm{
    spaxel})^2`, because the residuals are correlated over a resolution
    element. It does not include colour differences between the two images
    (significant when a band the cube does not cover is compared with
    F555W).
    """
    max_offset = positive_angle(max_offset, "max_offset", example="2 * u.arcsec",
                                allow_inf=True)
    target = positive_angle(cube.psf_fwhm if target_psf_fwhm is None else target_psf_fwhm,
                            "target_psf_fwhm", example="0.8 * u.arcsec", allow_inf=True)
    instrument = _instrument_of(image)
    if band is None:
        coverage = _coverages(cube, HST_BANDS, instrument)
        band = (image.band if coverage[image.band] >= min_coverage
                else _closest_covered_band(image.band, coverage, min_coverage))
        if band is None:
            msg = (f"The cube covers none of the HST bands {HST_BANDS} (at least "
                   f"min_coverage={min_coverage:g} of the photon weight), so the offset of the "
                   f"{image.band} image cannot be measured; pass band= and a lower "
                   f"min_coverage=.")
            raise CubeSFHError(msg)
        if band != image.band:
            log.info("The cube does not cover %s; comparing the %s image with the cube's %s "
                     "image.", image.band, image.band, band)
    reference, _ = synthetic_band_image(cube, band, instrument=instrument, missing=missing,
                                        min_coverage=min_coverage, max_memory=max_memory,
                                        progress_bar=progress_bar)
    return _measure(cube, image, reference.to_value(cube.unit), band, max_offset=max_offset,
                    target_fwhm=target, method=method, min_correlation=min_correlation,
                    tile_size=tile_size)


def apply_offset(image, offset):
    """
    A copy of an HST image whose WCS is corrected for an offset.

    The reference pixel is moved by the offset expressed in the image's
    pixels at ``offset.reference``: ``CRPIX -> CRPIX - q`` with ``q`` the
    pixel displacement from where the image's WCS places the reference
    position shifted by the offset to where it places the reference
    position itself. The new WCS satisfies ``W'(p) = W(p + q)``, a pure
    translation in pixel space (distortion terms move with it), so a source
    that the old WCS put at the offset position is put at its true position.

    Parameters
    ----------
    image : `~cubesfh.hst.HSTImage`
        Image to correct (unchanged).
    offset : `Offset`
        HST minus MUSE offset, e.g. from `measure_offset`.

    Returns
    -------
    corrected : `~cubesfh.hst.HSTImage`
        New image sharing the data, with a corrected copy of the WCS. If
        its ``meta`` is a header or dict, ``REGDRA`` / ``REGDDEC`` record the
        correction (arcsec).
    """
    if not isinstance(offset, Offset):
        msg = f"offset must be an Offset (from measure_offset); got {type(offset).__name__}."
        raise CubeSFHError(msg)
    ref = offset.reference
    shifted = ref.spherical_offsets_by(offset.ra, offset.dec)
    wcs = image.wcs.deepcopy()
    p_true = np.array(wcs.world_to_pixel(ref), dtype=float)
    p_shift = np.array(wcs.world_to_pixel(shifted), dtype=float)
    q = p_true - p_shift
    wcs.wcs.crpix = np.asarray(wcs.wcs.crpix, dtype=float) - q
    wcs.wcs.set()
    new = object.__new__(type(image))
    new.__dict__.update(image.__dict__)
    new.wcs = wcs
    meta = copy.copy(image.meta) if image.meta is not None else {}
    values = {"REGDRA": (round(-offset.ra.to_value(u.arcsec), 5),
                         "[arcsec] RA cos Dec correction applied (cubesfh)"),
              "REGDDEC": (round(-offset.dec.to_value(u.arcsec), 5),
                          "[arcsec] Dec correction applied (cubesfh)")}
    for key, (value, comment) in values.items():
        with contextlib.suppress(TypeError, ValueError):  # read-only meta objects
            meta[key] = (value, comment) if isinstance(meta, fits.Header) else value
    new.meta = meta
    return new


# ----------------------------------------------------------------------------
# Registration of a set of images
# ----------------------------------------------------------------------------

def _band_key(band):
    """Short band label for FITS keywords: 'F555W' -> 'F555'."""
    return band[:4]


@dataclass
class RegistrationReport:
    """
    Result of `register`: offsets, covered fractions and flux ratios.

    Attributes
    ----------
    offsets : dict
        ``{band: Offset}`` for every image: the offset measured for it or for
        its visit (``Offset.image_band`` says which image was measured).
    coverage : dict
        ``{band: float}`` covered fraction of each image band's photon weight.
    ratios : dict
        ``{band: float}`` MUSE / HST flux ratio over the common footprint,
        for the covered bands only.
    n_spaxels : dict
        ``{band: int}`` spaxels in the common footprint of each ratio.
    linear_fits : dict
        ``{band: (slope, offset)}``: least-squares fit MUSE = slope x HST +
        offset over the common spaxels (offset in the cube's flux unit per
        spaxel). A ratio that differs from 1 through the offset rather than
        the slope (it changes across the field) points to the sky
        subtraction of the cube or the background of the image, not to the
        flux calibration.
    corrected : bool
        Whether the offsets were applied to the returned images.
    max_offset : `~astropy.units.Quantity`
        The limit used.
    tolerance : float
        Tolerance on ``|ratio - 1|``.
    min_coverage : float
        Covered fraction for a band to get a ratio.
    missing : str
        How the part of a band outside the cube was estimated.
    field : str or `None`
        Name of the field (cube).
    applied : dict
        ``{band: bool}`` whether the band's offset was applied to its image
        (`False` for an unreliable offset, or with ``correct=False``).
    problems : dict
        ``{band: str}`` why a band's offset was not measured or not applied.
    """

    offsets: dict
    coverage: dict
    ratios: dict
    n_spaxels: dict
    corrected: bool
    max_offset: u.Quantity
    tolerance: float
    min_coverage: float
    missing: str = "linear"
    field: str | None = None
    linear_fits: dict = dataclasses.field(default_factory=dict)
    flux_unit: str = ""
    applied: dict = dataclasses.field(default_factory=dict)
    problems: dict = dataclasses.field(default_factory=dict)

    @property
    def bands(self):
        """Bands of the images, in `~cubesfh.conventions.HST_BANDS` order."""
        return tuple(b for b in HST_BANDS if b in self.coverage)

    @property
    def measurements(self):
        """
        The distinct offsets measured (one per visit), as a list of `Offset`.

        The first is the primary one (written as ``REGDX`` etc. by
        `to_header_cards`): measured on an image in its own band, F555W or
        F814W preferred.
        """
        seen, out = set(), []
        for off in self.offsets.values():
            if id(off) not in seen:
                seen.add(id(off))
                out.append(off)

        def rank(off):
            same = off.image_band == off.band
            pref = (PREFERRED_BANDS.index(off.image_band)
                    if off.image_band in PREFERRED_BANDS else len(PREFERRED_BANDS))
            return (not same, pref)

        return sorted(out, key=rank)

    def outside_tolerance(self):
        """Bands whose flux ratio departs from 1 by more than `tolerance`."""
        return [b for b, r in self.ratios.items() if abs(r - 1.0) > self.tolerance]

    def to_table(self):
        """
        One row per image band.

        Returns
        -------
        table : `~astropy.table.QTable`
            Columns ``band``, ``coverage``, ``dra``, ``ddec``, ``error``
            (arcsec), ``dx``, ``dy`` (cube pixels), ``measured_on`` (band of
            the image the offset was measured on), ``cube_band``,
            ``correlation``, ``flux_ratio``, ``flux_slope``, ``flux_offset``
            (NaN when not covered).
        """
        rows = []
        for b in self.bands:
            off = self.offsets.get(b)
            rows.append((b, self.coverage[b],
                         off.ra.to_value(u.arcsec) if off else np.nan,
                         off.dec.to_value(u.arcsec) if off else np.nan,
                         off.error.to_value(u.arcsec) if off else np.nan,
                         off.dx if off else np.nan, off.dy if off else np.nan,
                         (off.image_band or "") if off else "", (off.band or "") if off else "",
                         off.correlation if off else np.nan,
                         self.ratios.get(b, np.nan),
                         *self.linear_fits.get(b, (np.nan, np.nan))))
        names = ("band", "coverage", "dra", "ddec", "error", "dx", "dy", "measured_on",
                 "cube_band", "correlation", "flux_ratio", "flux_slope", "flux_offset")
        table = QTable(rows=rows, names=names) if rows else QTable(names=names)
        for col in ("dra", "ddec", "error"):
            table[col].unit = u.arcsec
        table.meta.update({"corrected": self.corrected, "tolerance": self.tolerance,
                           "field": self.field})
        return table

    def to_header_cards(self):
        """
        FITS header cards describing the registration.

        Returns
        -------
        cards : list of tuple
            ``(keyword, value, comment)``; keywords have at most 8
            characters. ``REGCORR`` (offsets applied), ``REGMAXOF``
            (max_offset, arcsec), and for the first offset measured
            ``REGBAND`` (cube band), ``REGIMG`` (HST band), ``REGDX``,
            ``REGDY`` (cube pixels), ``REGDRA``, ``REGDDEC``, ``REGERR``
            (arcsec), ``REGCC`` (correlation); per image band ``Fnnn``:
            ``RDAFnnn``, ``RDDFnnn`` (offset, arcsec), ``COVFnnn`` (covered
            fraction) and, for covered bands, ``FRATFnnn`` (MUSE/HST flux
            ratio), ``FSLPFnnn`` and ``FOFFFnnn`` (slope and offset of the
            linear fit MUSE = slope x HST + offset); ``FRATTOL`` (tolerance)
            and ``FRATMETH`` (treatment of the missing part of a band).
            Undefined values are omitted.
        """
        def num(x, digits=4):
            return None if x is None or not np.isfinite(x) else round(float(x), digits)

        cards = [("REGCORR", bool(self.corrected), "HST WCS corrected to the cube (cubesfh)"),
                 ("REGMAXOF", num(self.max_offset.to_value(u.arcsec)),
                  "[arcsec] largest offset accepted")]
        meas = self.measurements
        if meas:
            m = meas[0]
            cards += [
                ("REGBAND", m.band or "", "cube synthetic band used for the offset"),
                ("REGIMG", m.image_band or "", "HST image band measured"),
                ("REGDX", num(m.dx), "[pix] offset HST-MUSE along cube x"),
                ("REGDY", num(m.dy), "[pix] offset HST-MUSE along cube y"),
                ("REGDRA", num(m.ra.to_value(u.arcsec)), "[arcsec] dRA cos Dec, HST-MUSE"),
                ("REGDDEC", num(m.dec.to_value(u.arcsec)), "[arcsec] dDec, HST-MUSE"),
                ("REGERR", num(m.error.to_value(u.arcsec)), "[arcsec] offset uncertainty"),
                ("REGCC", num(m.correlation), "correlation at the best shift"),
            ]
        for b in self.bands:
            key = _band_key(b)
            off = self.offsets.get(b)
            if off is not None:
                cards += [(f"RDA{key}", num(off.ra.to_value(u.arcsec)),
                           f"[arcsec] {b} dRA cos Dec, HST-MUSE"),
                          (f"RDD{key}", num(off.dec.to_value(u.arcsec)),
                           f"[arcsec] {b} dDec, HST-MUSE"),
                          (f"RRF{key}", f"{off.image_band}/{off.band}",
                           f"{b} offset: image measured / reference"),
                          (f"RCC{key}", num(off.correlation), f"{b}: correlation at the shift")]
            if b in self.applied:
                cards.append((f"RAP{key}", bool(self.applied[b]), f"{b} offset applied"))
            cards.append((f"COV{key}", num(self.coverage[b]),
                          f"fraction of {b} photon weight in the cube"))
            if b in self.ratios:
                cards.append((f"FRAT{key}", num(self.ratios[b]), f"MUSE/HST flux ratio in {b}"))
            if b in self.linear_fits:
                slope, offset = self.linear_fits[b]
                cards += [(f"FSLP{key}", num(slope), f"{b}: MUSE = FSLP x HST + FOFF, slope"),
                          (f"FOFF{key}", num(offset, 6),
                           f"[{self.flux_unit}] {b}: offset per spaxel"[:47])]
        cards += [("FRATTOL", num(self.tolerance), "tolerance on |MUSE/HST - 1|"),
                  ("FRATMETH", self.missing, "f_lambda outside the cube: linear or mean")]
        return [c for c in cards if c[1] is not None]

    def summary(self):
        """
        Plain-text summary for the run log.

        Returns
        -------
        text : str
            A title, the settings, one line per image band (covered
            fraction, offset HST - MUSE in arcsec and cube pixels, the HST
            band / cube band it was measured with, correlation, MUSE/HST
            flux ratio, marked ``!`` beyond the tolerance) and the bands
            whose ratio is beyond the tolerance.
        """
        title = "HST-MUSE registration" + (f" of field {self.field}" if self.field else "")
        lines = [title, "=" * len(title),
                 f"Offsets (HST - MUSE) {'applied' if self.corrected else 'NOT applied'}; "
                 f"limit {self.max_offset.to_value(u.arcsec):g} arcsec; flux ratio tolerance "
                 f"{self.tolerance:.0%}.",
                 f"{'band':6s} {'cover':>5s} {'dRAcosD':>8s} {'dDec':>7s} {'err':>6s} "
                 f"{'dx':>6s} {'dy':>6s} {'measured on':>12s} {'r':>6s} {'MUSE/HST':>9s}"]
        for b in self.bands:
            off = self.offsets.get(b)
            ratio = self.ratios.get(b)
            rtxt = f"{ratio:9.3f}" if ratio is not None else f"{'--':>9s}"
            if ratio is not None and abs(ratio - 1) > self.tolerance:
                rtxt += " !"
            if off is not None:
                how = (off.band if off.band == off.image_band
                       else f"{off.image_band}/{off.band}")
                otxt = (f"{off.ra.to_value(u.arcsec):+8.3f} {off.dec.to_value(u.arcsec):+7.3f} "
                        f"{off.error.to_value(u.arcsec):6.3f} {off.dx:+6.2f} {off.dy:+6.2f} "
                        f"{how:>12s} {off.correlation:6.3f}")
            else:
                otxt = (f"{'--':>8s} {'--':>7s} {'--':>6s} {'--':>6s} {'--':>6s} {'--':>12s} "
                        f"{'--':>6s}")
            lines.append(f"{b:6s} {self.coverage[b]:5.2f} {otxt} {rtxt}")
        lines.append("Offsets in arcsec (dx, dy in cube spaxels); 'measured on': HST image / "
                     "cube synthetic band.")
        lines.append(f"Flux ratios for bands with coverage >= {self.min_coverage:g}; f_lambda "
                     f"outside the cube: {self.missing} extrapolation.")
        for b, (slope, offset) in self.linear_fits.items():
            lines.append(f"{b}: per spaxel, MUSE = {slope:.3f} x HST {offset:+.4g} "
                         f"({self.flux_unit}).")
        for b, why in self.problems.items():
            lines.append(f"{b}: {why}")
        bad = self.outside_tolerance()
        if bad:
            lines.append(f"WARNING: MUSE/HST flux ratio beyond tolerance in {', '.join(bad)}.")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


def _visit(image):
    """Visit label from the header: PROPOSID + the first six characters of ROOTNAME."""
    meta = image.meta if image.meta is not None else {}
    try:
        root = str(meta.get("ROOTNAME", "") or "").strip().lower()
        prop = str(meta.get("PROPOSID", "") or "").strip()
    except AttributeError:  # pragma: no cover
        return None
    if len(root) >= 6:
        return f"{prop}:{root[:6]}"
    return None


def _groups(images, per):
    """Groups of bands that share one offset."""
    bands = list(images)
    if isinstance(per, Mapping):
        labels = {b: per.get(b, b) for b in bands}
    elif per == "image":
        labels = {b: b for b in bands}
    elif per == "all":
        labels = dict.fromkeys(bands, "all")
    elif per == "visit":
        # images whose headers name no visit are taken to share the astrometry
        # of the other unlabelled ones (e.g. mosaics aligned to the same frame)
        labels = {b: _visit(images[b]) or "unknown" for b in bands}
    else:
        msg = (f"per must be one of {_PER_CHOICES} or a dict {{band: group}}; got {per!r}.")
        raise CubeSFHError(msg)
    groups = {}
    for b in bands:
        groups.setdefault(labels[b], []).append(b)
    return list(groups.values())


def _group_reference(group, coverage, min_coverage):
    """(image band to measure, cube band to compare with) for a group."""
    covered = [b for b in group if coverage[b] >= min_coverage]
    for b in PREFERRED_BANDS:
        if b in covered:
            return b, b
    if covered:
        b = max(covered, key=lambda x: coverage[x])
        return b, b
    # no band of the group is covered: the image closest to a covered band
    best = None
    for b in group:
        cb = _closest_covered_band(b, coverage, min_coverage)
        if cb is None:
            continue
        gap = abs(load_filter(b).pivot - load_filter(cb).pivot).to_value(u.AA)
        if best is None or gap < best[0]:
            best = (gap, b, cb)
    return (best[1], best[2]) if best else (None, None)


def register(cube, images, *, correct=True, max_offset=DEFAULT_MAX_OFFSET,
             tolerance=DEFAULT_TOLERANCE, per="band", min_coverage=DEFAULT_MIN_COVERAGE,
             missing="linear", target_psf_fwhm=None, method="exact",
             min_correlation=DEFAULT_MIN_CORRELATION, field=None, tile_size=128,
             max_memory=None, progress_bar=False):
    """
    Register HST images to a MUSE cube and compare their flux calibrations.

    1. The cube's synthetic image is made in every HST band it covers
       (`synthetic_band_image`, one pass over the cube).
    2. ``per='band'`` (default): every image is measured on its own. A band
       the cube covers (F555W, F814W) is compared with the cube's synthetic
       image in the same band; every other band with its neighbour in
       wavelength among the bands already measured and corrected (F438W
       with F555W, F336W with F438W, F275W with F336W), both PSF-matched to
       the cube. One misregistered image thus gets its own offset and
       cannot pass it on, and an image whose valid part overlaps the cube
       too little to support a shift is left uncorrected with a warning
       instead of stopping the run. With ``per='visit'``, ``'image'``,
       ``'all'`` or a dict, the offset of each group of images is measured
       on one image of the group (F555W if the group has it, else F814W,
       else the best-covered band, else the image closest in wavelength to
       a covered band, against that band's synthetic image) and shared by
       the group.
    3. Unless ``correct=False`` each image's WCS is corrected by its offset
       (`apply_offset`); an offset whose correlation is below
       ``min_correlation`` is not applied.
    4. For each covered band the ratio of the total fluxes MUSE / HST is
       computed over the common footprint (spaxels valid in both): the
       cube's synthetic image against the HST image PSF-matched to the cube
       and reprojected onto its grid (after the correction, if applied).

    Parameters
    ----------
    cube : `~cubesfh.Cube`
        The MUSE cube (PSF FWHM known).
    images : dict or list of `~cubesfh.hst.HSTImage`
        One image per band.
    correct : bool, optional
        Apply the measured offsets (default). With `False` they are only
        measured and reported (still subject to ``max_offset``).
    max_offset : `~astropy.units.Quantity`, optional
        Largest offset accepted (default 2 arcsec); a larger one stops the
        run with `CubeSFHError`.
    tolerance : float, optional
        Warn when a flux ratio departs from 1 by more than this (default
        0.05).
    per : {'band', 'visit', 'image', 'all'} or dict, optional
        Which images share one offset. ``'band'`` (default): none, each
        image is measured against the cube or its neighbour band (step 2).
        ``'visit'``: images of the
        same HST visit (same ``PROPOSID`` and first six characters of
        ``ROOTNAME``); images whose headers name no visit form one group
        (e.g. PHANGS-HST mosaics, all aligned to Gaia). ``'image'``: every
        image is measured on its own. ``'all'``: one offset for all. A dict
        ``{band: label}`` gives the groups explicitly.
    min_coverage : float, optional
        Covered fraction of a band's photon weight needed to use it (for
        offsets and flux ratios); default 0.8.
    missing : {'linear', 'mean'}, optional
        Estimate of the part of a band outside the cube, see
        `synthetic_band_image`.
    target_psf_fwhm : `~astropy.units.Quantity`, optional
        The cube's PSF FWHM; default ``cube.psf_fwhm``.
    method : {'exact', 'adaptive'}, optional
        Reprojection method.
    min_correlation : float, optional
        An offset whose correlation coefficient is below this is reported
        with a `CubeSFHWarning` and not applied (default 0.7).
    field : str, optional
        Name of the field for the report; default the cube's ``OBJECT``
        keyword or file name.
    tile_size : int, optional
        Tile size (spaxels) for PSF matching and reprojection.
    max_memory : `~astropy.units.Quantity` or int, optional
        Memory budget when reading the cube.
    progress_bar : bool, optional
        Show progress bars.

    Returns
    -------
    images : dict
        ``{band: HSTImage}``, corrected copies (or the input images when
        ``correct=False``), in `~cubesfh.conventions.HST_BANDS` order.
    report : `RegistrationReport`
        Offsets, covered fractions and flux ratios, with
        `~RegistrationReport.to_header_cards` and
        `~RegistrationReport.summary`.

    Raises
    ------
    CubeSFHError
        If an offset exceeds ``max_offset`` (the message gives it and how to
        proceed), an image does not overlap the cube, or, with
        ``correct=True``, the cube covers no band to measure an offset with
        (with ``correct=False`` such images are reported without offset).

    Warns
    -----
    CubeSFHWarning
        When ``|ratio - 1| > tolerance`` in a band, or an offset is unreliable
        (low correlation; it is then not applied).
    """
    images = dict(_ordered_images(images))
    max_offset = positive_angle(max_offset, "max_offset", example="2 * u.arcsec",
                                allow_inf=True)
    target = positive_angle(cube.psf_fwhm if target_psf_fwhm is None else target_psf_fwhm,
                            "target_psf_fwhm", example="0.8 * u.arcsec", allow_inf=True)
    if not tolerance > 0:
        msg = f"tolerance must be positive (e.g. 0.05 for 5 %); got {tolerance!r}."
        raise CubeSFHError(msg)
    if not 0.0 < min_coverage <= 1.0:
        msg = f"min_coverage must be in (0, 1]; got {min_coverage}."
        raise CubeSFHError(msg)
    if field is None:
        meta = cube.meta if cube.meta is not None else {}
        field = meta.get("OBJECT") or (cube.filename and str(cube.filename)) or None
    instrument = {b: _instrument_of(im) for b, im in images.items()}
    coverage_all = {b: band_coverage(b, cube.wavelength,
                                     instrument=instrument.get(b, "WFC3/UVIS"))
                    for b in HST_BANDS}
    coverage = {b: coverage_all[b] for b in images}

    offsets, applied, problems = {}, {}, {}
    if per == "band":
        plan = _band_plan(images, coverage_all, min_coverage)
        if not plan and correct:
            raise _no_covered_band(cube, images, min_coverage)
        cube_bands = {ref for _, kind, ref in plan if kind == "cube"}
    else:
        groups = _groups(images, per)
        plan = []  # (group, image band, cube band)
        for group in groups:
            img_band, cube_band = _group_reference(group, coverage_all, min_coverage)
            if img_band is None and not correct:
                log.info("No band to measure the offset of %s; skipped (correct=False).",
                         group)
                continue
            if img_band is None:
                raise _no_covered_band(cube, group, min_coverage)
            plan.append((group, img_band, cube_band))
        cube_bands = {cb for _, _, cb in plan}

    ratio_bands = [b for b in images if coverage[b] >= min_coverage]
    needed = sorted(cube_bands | set(ratio_bands), key=HST_BANDS.index)
    # one pass over the cube per instrument (normally one)
    synthetic = {}
    for inst in sorted({instrument.get(b, "WFC3/UVIS") for b in needed}):
        todo = [b for b in needed if instrument.get(b, "WFC3/UVIS") == inst]
        synthetic.update(_synthetic_images(cube, todo, instrument=inst, missing=missing,
                                           max_memory=max_memory, progress_bar=progress_bar))

    measure_kw = {"max_offset": max_offset, "target_fwhm": target, "method": method,
                  "min_correlation": min_correlation, "tile_size": tile_size,
                  "weak_note": " and is not applied" if correct else ""}
    on_cube = {}  # id(image) -> image PSF-matched and reprojected on the cube's grid

    def on_cube_grid(image):
        if id(image) not in on_cube:
            on_cube[id(image)] = _hst_on_grid(image, cube.celestial_wcs, cube.spatial_shape,
                                              target_fwhm=target, unit=cube.unit,
                                              tile_size=tile_size, method=method)
        return on_cube[id(image)]

    if per == "band":
        out = dict(images)
        # images moved onto the cube by a reliable offset: the only ones a neighbour
        # band is measured against, whether or not the corrections are applied, so
        # that every offset is HST - MUSE
        aligned = {}
        steps = progress(plan, enabled=progress_bar, desc="registration", unit="band")
        for band, kind, ref in steps:
            if kind == "hst" and ref not in aligned:
                # the planned neighbour has no reliable offset: the nearest band that has
                ref = (min(aligned, key=lambda b: abs(load_filter(b).pivot
                                                      - load_filter(band).pivot))
                       if aligned else None)
                if ref is None:
                    cb = _closest_covered_band(band, coverage_all, min_coverage)
                    if cb is None or cb not in synthetic:
                        problems[band] = "offset not measured: no band to compare it with"
                        continue
                    kind, ref = "cube", cb
            if kind == "cube":
                reference, label = synthetic[ref][0], ref
            else:
                reference, label = on_cube_grid(aligned[ref]), f"HST {ref}"
            try:
                off = _measure(cube, images[band], reference, label, **measure_kw)
            except _InsufficientOverlap as exc:
                # refuse the offset that this overlap cannot support; the other bands
                # go on (each is measured on its own)
                problems[band] = f"offset not measured: {exc}"
                msg = (f"The offset of the {band} image is not measured and not corrected: "
                       f"{exc}")
                warnings.warn(msg, CubeSFHWarning)
                continue
            offsets[band] = off
            reliable = off.correlation >= min_correlation
            if reliable:
                aligned[band] = apply_offset(images[band], off)
            applied[band] = correct and reliable
            if applied[band]:
                out[band] = aligned[band]
            elif not reliable:
                problems[band] = (f"offset not {'applied' if correct else 'reliable'}: "
                                  f"correlation {off.correlation:.2f} < {min_correlation:g}")
    else:
        steps = progress(plan, enabled=progress_bar, desc="registration", unit="visit")
        for group, img_band, cube_band in steps:
            off = _measure(cube, images[img_band], synthetic[cube_band][0], cube_band,
                           **measure_kw)
            reliable = off.correlation >= min_correlation
            for b in group:
                offsets[b] = off
                applied[b] = correct and reliable
        out = {b: (apply_offset(im, offsets[b]) if applied.get(b) else im)
               for b, im in images.items()}

    ratios, n_used, fits_ = {}, {}, {}
    for b in ratio_bands:
        image_cube = synthetic[b][0]
        hst = on_cube_grid(out[b])
        common = np.isfinite(image_cube) & np.isfinite(hst)
        n = int(common.sum())
        if n == 0:
            reason = _no_data_message(out[b], cube.celestial_wcs, cube.spatial_shape)
            msg = reason or (f"The {b} image and the cube have no valid spaxel in common; "
                             "check that the image covers the MUSE field.")
            raise CubeSFHError(msg)
        total_hst = float(hst[common].sum())
        if not total_hst > 0:
            msg = (f"The {b} image has a non-positive total flux over the cube footprint "
                   f"({total_hst:.3g}); no flux ratio is computed for it.")
            warnings.warn(msg, CubeSFHWarning)
            continue
        ratio = float(image_cube[common].sum()) / total_hst
        ratios[b] = ratio
        n_used[b] = n
        if n >= 3 and np.ptp(hst[common]) > 0:
            slope, offset = np.polyfit(hst[common], image_cube[common], 1)
            fits_[b] = (float(slope), float(offset))
        log.info("MUSE/HST flux ratio in %s: %.4f over %d spaxels", b, ratio, n)
        if abs(ratio - 1.0) > tolerance:
            fit = ""
            if b in fits_:
                fit = (f" Per spaxel, MUSE = {fits_[b][0]:.3f} x HST {fits_[b][1]:+.3g} "
                       f"({cube.unit}): a non-zero offset points to the sky subtraction or "
                       "the image background, the slope to the flux calibration.")
            msg = (f"The MUSE/HST flux ratio in {b} is {ratio:.3f}, {abs(ratio - 1):.1%} from 1 "
                   f"(tolerance {tolerance:.0%}) in field {field}: the flux calibrations of "
                   f"the cube and the {b} image disagree.{fit} Check the cube's flux "
                   f"calibration and sky subtraction and the image's PHOTFLAM/BUNIT (or raise "
                   f"tolerance= if this is expected).")
            warnings.warn(msg, CubeSFHWarning)

    report = RegistrationReport(offsets=offsets, coverage=coverage, ratios=ratios,
                                n_spaxels=n_used, corrected=bool(correct and any(applied.values())),
                                max_offset=max_offset, tolerance=float(tolerance),
                                min_coverage=float(min_coverage), missing=missing,
                                field=None if field is None else str(field),
                                linear_fits=fits_, flux_unit=cube.unit.to_string(),
                                applied=applied, problems=problems)
    return out, report
