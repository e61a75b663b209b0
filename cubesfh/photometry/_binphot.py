# Licensed under a 3-clause BSD style license - see LICENSE
"""Mean HST flux density per spaxel in each spatial bin of a cube."""

import logging
import warnings
from collections.abc import Mapping

import numpy as np
from astropy import units as u
from astropy.table import QTable

from ..conventions import HST_BANDS
from ..hst import FLAM, SB_UNIT
from ..utils import positive_angle, progress
from ..utils.exceptions import CubeSFHError, CubeSFHWarning
from ._psf import _HALF_SIZE_FWHM, DEFAULT_WINDOW, match_psf
from ._reproject import (
    _check_wcs,
    _no_data_message,
    _pixel_area,
    grid_overlap,
    reproject_to_cube,
)

__all__ = ["BinPhotometry", "bin_photometry"]

log = logging.getLogger(__name__)

# A spaxel counts as covered when this fraction of it overlaps valid HST data.
_MIN_FOOTPRINT = 0.999


class BinPhotometry:
    """
    HST photometry of the spatial bins of a cube.

    Attributes
    ----------
    bands : tuple of str
        Bands present, in `~cubesfh.conventions.HST_BANDS` order.
    flux : `~astropy.units.Quantity`
        ``(n_bins, n_bands)`` mean flux density per spaxel, in the cube's
        flux unit (the same per-spaxel convention as the binned spectra).
        NaN for bins without (enough) HST coverage.
    error : `~astropy.units.Quantity` or `None`
        ``(n_bins, n_bands)`` 1-sigma uncertainty of ``flux`` when the images
        carry error arrays (NaN for bands without one), else `None`.
    flags : `~numpy.ndarray` of bool
        ``(n_bins,)``, `True` where any band is non-positive or NaN (no
        coverage, empty bin): these bins cannot be used by the network.
    coverage : `~numpy.ndarray`
        ``(n_bins, n_bands)`` fraction of each bin's spaxels with valid HST data.
    pivot_wavelength : `~astropy.units.Quantity`
        ``(n_bands,)`` ``PHOTPLAM`` of each image (NaN when unknown).
    target_psf_fwhm : `~astropy.units.Quantity`
        ``(n_bands,)`` PSF FWHM the images were matched to.
    """

    def __init__(self, *, bands, flux, error, flags, coverage, pivot_wavelength,
                 target_psf_fwhm):
        self.bands = tuple(bands)
        self.flux = flux
        self.error = error
        self.flags = flags
        self.coverage = coverage
        self.pivot_wavelength = pivot_wavelength
        self.target_psf_fwhm = target_psf_fwhm

    @property
    def n_bins(self):
        """Number of bins."""
        return self.flux.shape[0]

    def __len__(self):
        return self.n_bins

    def __repr__(self):
        return (f"<BinPhotometry n_bins={self.n_bins} bands={self.bands} "
                f"flagged={int(self.flags.sum())}>")

    def to_table(self):
        """
        Photometry as a table, one row per bin.

        Returns
        -------
        table : `~astropy.table.QTable`
            Columns ``bin``, ``flux_<band>``, ``error_<band>`` (when known),
            ``coverage_<band>`` and ``flag``.
        """
        table = QTable()
        table["bin"] = np.arange(self.n_bins)
        for i, band in enumerate(self.bands):
            table[f"flux_{band}"] = self.flux[:, i]
            if self.error is not None:
                table[f"error_{band}"] = self.error[:, i]
            table[f"coverage_{band}"] = self.coverage[:, i]
        table["flag"] = self.flags
        table.meta["bands"] = list(self.bands)
        return table


def _ordered_images(images):
    if isinstance(images, Mapping):
        items = list(images.items())
    elif hasattr(images, "band"):
        items = [(images.band, images)]
    else:
        items = [(getattr(im, "band", None), im) for im in images]
    if not items:
        msg = "No HST images given; pass a dict {band: HSTImage} or a list of HSTImage."
        raise CubeSFHError(msg)
    by_band = {}
    for key, image in items:
        if not hasattr(image, "to_surface_brightness"):
            msg = f"Expected HSTImage objects; got {type(image).__name__} for {key!r}."
            raise CubeSFHError(msg)
        if key is not None and str(key).upper() != image.band:
            msg = f"The image under key {key!r} is a {image.band} image; fix the dict key."
            raise CubeSFHError(msg)
        if image.band in by_band:
            msg = f"Two images for band {image.band}; pass one image per band."
            raise CubeSFHError(msg)
        by_band[image.band] = image
    return [(band, by_band[band]) for band in HST_BANDS if band in by_band]


def _per_band(value, bands, name):
    if isinstance(value, Mapping):
        missing = [b for b in bands if b not in value]
        if missing:
            msg = f"{name} has no entry for band(s) {missing}."
            raise CubeSFHError(msg)
        values = [value[b] for b in bands]
    else:
        values = [value] * len(bands)
    return u.Quantity([positive_angle(v, name, example="0.7 * u.arcsec", allow_inf=True)
                       for v in values])


def bin_photometry(images, bin_map, cube_wcs=None, *, spaxel_area=None, target_psf_fwhm=None,
                   unit=None, method="exact", window=DEFAULT_WINDOW, min_coverage=1.0,
                   tile_size=128, progress_bar=True):
    """
    Mean HST flux density per spaxel in every bin, on the cube's PSF.

    For each image and each tile of the spaxel grid: cut out the tile's
    footprint (plus the kernel radius), convert to surface brightness,
    convolve to the cube's Gaussian PSF (`match_psf`), reproject onto the
    spaxel grid conserving flux (`reproject_to_cube`), multiply by the
    spaxel solid angle and average over the spaxels of each bin. The result
    is in the cube's flux unit per spaxel, the same convention as the mean
    binned spectra, so spectra and photometry can be normalised together.

    Parameters
    ----------
    images : dict or list of `~cubesfh.hst.HSTImage`
        One image per band, ``{band: image}`` or a list.
    bin_map : array-like of int
        ``(ny, nx)`` bin number of every spaxel, ``-1`` for spaxels in no
        bin; bins are numbered ``0 .. n_bins - 1``. An object with a
        ``bin_map`` attribute (e.g. `~cubesfh.binning.VoronoiBins`) is
        accepted, and supplies ``celestial_wcs`` and ``unit`` when they are
        not given.
    cube_wcs : `~astropy.wcs.WCS` or cube-like
        Celestial WCS of the cube. A `~cubesfh.Cube` (anything with
        ``celestial_wcs``) is accepted and also provides ``spaxel_area``,
        ``psf_fwhm`` and ``unit`` defaults.
    spaxel_area : `~astropy.units.Quantity`, optional
        Solid angle of a spaxel. Default: from ``cube_wcs``.
    target_psf_fwhm : `~astropy.units.Quantity` or dict
        FWHM of the cube's PSF, or ``{band: fwhm}``. Required unless a cube
        with a known ``psf_fwhm`` is passed.
    unit : `~astropy.units.Unit`, optional
        Flux unit of the cube per spaxel, e.g. ``1e-20 erg / (s cm2 AA)``.
        Default: the cube's unit, else erg / (s cm2 AA).
    method : {'exact', 'adaptive'}, optional
        Reprojection method, see `reproject_to_cube`.
    window : callable or `None`, optional
        Fourier window of the PSF-matching kernel, see `make_matching_kernel`.
    min_coverage : float, optional
        Fraction of a bin's spaxels that must have valid HST data for the
        bin to get a value (the mean is then over the covered spaxels).
        Default 1: a bin partly outside an image is NaN and flagged.
    tile_size : int or `None`, optional
        Process the cube grid in tiles of ``tile_size`` x ``tile_size``
        spaxels, which bounds the memory used: with 0.2 arcsec spaxels and
        0.04 arcsec HST pixels the default needs ~300 MB whatever the size
        of the cube (a single 320 x 320 MUSE pointing processed at once,
        ``tile_size=None``, ~800 MB). The results do not depend on it.
    progress_bar : bool, optional
        Show a progress bar over the bands and tiles.

    Returns
    -------
    photometry : `BinPhotometry`
        ``.flux`` (n_bins, n_bands) in ``unit``, ``.flags`` (n_bins,),
        ``.error`` (from ``HSTImage.error``; see Notes), ``.bands``,
        ``.coverage``.

    Raises
    ------
    CubeSFHError
        If an image does not overlap the cube (no spaxel of any bin covered),
        for a bin map that does not match the WCS, or missing inputs.

    Warns
    -----
    CubeSFHWarning
        When some bins are not (fully) covered by an image: they are NaN and
        flagged.

    Notes
    -----
    The error of a bin is propagated from the per-pixel HST errors assuming
    independent pixels and ignoring the PSF convolution: the variance of the
    bin's total flux is the sum of the variances of the HST pixels inside
    it. For a non-negative kernel this is an upper bound, reached for bins
    much larger than the kernel. Drizzling correlates neighbouring pixels,
    which this does not include.
    """
    # ---- inputs, with duck typing for Cube- and VoronoiBins-like objects
    cube = None
    if cube_wcs is not None and hasattr(cube_wcs, "celestial_wcs"):
        cube, cube_wcs = cube_wcs, cube_wcs.celestial_wcs
    if hasattr(bin_map, "bin_map"):
        bins_obj, bin_map = bin_map, bin_map.bin_map
        if cube_wcs is None:
            cube_wcs = getattr(bins_obj, "celestial_wcs", None)
        if unit is None:
            unit = getattr(bins_obj, "unit", None)
    if cube is not None:
        if spaxel_area is None:
            spaxel_area = cube.spaxel_area
        if target_psf_fwhm is None:
            target_psf_fwhm = cube.psf_fwhm
        if unit is None:
            unit = cube.unit
    if cube_wcs is None:
        msg = "Pass cube_wcs (the cube's celestial WCS, or the Cube itself)."
        raise CubeSFHError(msg)
    cube_wcs = _check_wcs(cube_wcs, "cube_wcs")
    if target_psf_fwhm is None:
        msg = ("Pass target_psf_fwhm= (the MUSE cube's PSF FWHM, e.g. 0.7 * u.arcsec) "
               "to match the HST images to it.")
        raise CubeSFHError(msg)
    unit = FLAM if unit is None else u.Unit(unit)
    if not unit.is_equivalent(FLAM):
        msg = (f"unit must be a flux density per spaxel like 1e-20 erg / (s cm2 AA); got "
               f"{unit}.")
        raise CubeSFHError(msg)
    if spaxel_area is None:
        spaxel_area = _pixel_area(cube_wcs)
    spaxel_area = u.Quantity(spaxel_area).to(u.arcsec**2)
    if not 0.0 < min_coverage <= 1.0:
        msg = f"min_coverage must be in (0, 1]; got {min_coverage}."
        raise CubeSFHError(msg)

    bin_map = np.asarray(bin_map)
    if bin_map.ndim != 2 or not np.issubdtype(bin_map.dtype, np.integer):
        msg = f"bin_map must be a 2-D integer array (ny, nx); got {bin_map.dtype} {bin_map.shape}."
        raise CubeSFHError(msg)
    if cube_wcs.pixel_shape is not None and tuple(cube_wcs.pixel_shape[::-1]) != bin_map.shape:
        msg = (f"bin_map shape {bin_map.shape} does not match the cube WCS "
               f"{tuple(cube_wcs.pixel_shape[::-1])}.")
        raise CubeSFHError(msg)
    cube_shape = getattr(cube, "spatial_shape", None)
    if cube_shape is not None and tuple(cube_shape) != bin_map.shape:
        msg = f"bin_map shape {bin_map.shape} does not match the cube {tuple(cube_shape)}."
        raise CubeSFHError(msg)
    n_bins = int(bin_map.max()) + 1
    if n_bins < 1:
        msg = "bin_map has no bins (all spaxels are -1)."
        raise CubeSFHError(msg)

    ordered = _ordered_images(images)
    bands = [band for band, _ in ordered]
    targets = _per_band(target_psf_fwhm, bands, "target_psf_fwhm")

    # ---- restrict the work to the bounding box of the binned spaxels
    rows, cols = np.nonzero(bin_map >= 0)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    sub_map = bin_map[y0:y1, x0:x1]
    sub_wcs = cube_wcs[y0:y1, x0:x1]
    n_spax = np.bincount(np.where(sub_map >= 0, sub_map, 0).ravel(),
                         weights=(sub_map >= 0).ravel(), minlength=n_bins)
    area_out = _pixel_area(sub_wcs).value
    tiles = [t for t in _tiles(sub_map.shape, tile_size) if np.any(sub_map[t] >= 0)]

    flux = np.full((n_bins, len(bands)), np.nan)
    error = np.full((n_bins, len(bands)), np.nan)
    coverage = np.zeros((n_bins, len(bands)))
    have_error = False
    to_unit = (SB_UNIT * spaxel_area).to(unit)

    steps = [(k, image, tile) for k, (_, image) in enumerate(ordered) for tile in tiles]
    totals = np.zeros((len(bands), 3, n_bins))  # per band: sum of SB, n_good, variance sum
    for k, image, tile in progress(steps, enabled=progress_bar, desc="HST photometry",
                                         unit="tile"):
        tile_map = sub_map[tile]
        margin = int(np.ceil(_HALF_SIZE_FWHM * (targets[k] / image.pixel_scale).decompose()
                             .value)) + 2
        result = _tile_sums(image, tile_map, sub_wcs[tile], n_bins, target=targets[k],
                            margin=margin, method=method, window=window)
        if result is not None:
            totals[k] += result
            have_error |= image.error is not None

    for k, (band, image) in enumerate(ordered):
        sums, n_good, var_sum = totals[k]
        if not n_good.any():
            reason = _no_data_message(image, sub_wcs, sub_map.shape)
            if reason is not None:
                raise CubeSFHError(reason)
            name = image.filename or f"The {band} image"
            msg = (f"{name} does not overlap the binned part of the cube (no binned spaxel "
                   f"has valid HST data): check that the HST image covers the MUSE field and "
                   f"that both WCS are correct.")
            raise CubeSFHError(msg)
        cov = np.where(n_spax > 0, n_good / np.maximum(n_spax, 1), 0.0)
        ok = (n_spax > 0) & (cov >= min_coverage - 1e-12)
        coverage[:, k] = cov
        flux[ok, k] = sums[ok] / n_good[ok] * to_unit.value
        if image.error is not None:
            # the bin mean of SB is sum(F_spaxel) / (n_good * area_out), F = SB * area_out
            error[ok, k] = np.sqrt(var_sum[ok]) / (n_good[ok] * area_out) * to_unit.value
        n_missing = int(np.sum((n_spax > 0) & ~ok))
        if n_missing:
            msg = (f"{n_missing} of {n_bins} bins are not covered by the {band} image "
                   f"(coverage below min_coverage={min_coverage}); their {band} flux is NaN "
                   f"and they are flagged.")
            warnings.warn(msg, CubeSFHWarning)
        log.info("%s: %d of %d bins measured", band, int(ok.sum()), n_bins)

    flux = flux * unit
    flags = ~np.all(flux.value > 0, axis=1)
    pivots = u.Quantity([im.photplam if im.photplam is not None else np.nan * u.AA
                         for _, im in ordered], u.AA)
    return BinPhotometry(bands=bands, flux=flux, error=error * unit if have_error else None,
                         flags=flags, coverage=coverage, pivot_wavelength=pivots,
                         target_psf_fwhm=targets)


def _tiles(shape, tile_size):
    """Slices ``(slice_y, slice_x)`` covering ``shape`` in squares of ``tile_size``."""
    ny, nx = shape
    if tile_size is None:
        return [(slice(0, ny), slice(0, nx))]
    return [(slice(ty, min(ty + tile_size, ny)), slice(tx, min(tx + tile_size, nx)))
            for ty in range(0, ny, tile_size) for tx in range(0, nx, tile_size)]


def _tile_sums(image, tile_map, tile_wcs, n_bins, *, target, margin, method, window):
    """
    Per-bin sums over one tile of the cube grid: ``[sum of SB, number of good
    spaxels, sum of spaxel flux variances]``, or `None` without overlap.
    """
    shape = tile_map.shape
    _, full = grid_overlap(image.wcs, image.shape, tile_wcs, shape, margin=margin)
    if full is None:
        return None
    ty0, ty1, tx0, tx1 = full
    cut = image.cutout(((tx0 + tx1 - 1) / 2, (ty0 + ty1 - 1) / 2), (ty1 - ty0, tx1 - tx0),
                       mode="partial")
    sb = cut.to_surface_brightness()
    matched = match_psf(sb, cut.pixel_scale, cut.psf_fwhm, target, window=window,
                        mask=cut.mask)
    # the margin was only needed for the convolution: reproject the tile's own footprint
    # (plus what the adaptive resampling kernel reaches, about two spaxels)
    pad = 1
    if method == "adaptive":
        ratio = np.sqrt(_pixel_area(tile_wcs) / cut.pixel_area).decompose().value
        pad = min(int(np.ceil(2.5 * ratio)) + 2, margin)
    inner, _ = grid_overlap(cut.wcs, cut.shape, tile_wcs, shape, margin=pad)
    sb_tile, footprint = reproject_to_cube(matched[inner], tile_wcs, shape,
                                           wcs=cut.wcs[inner], method=method)
    in_bin = tile_map >= 0
    labels = np.where(in_bin, tile_map, 0).ravel()
    good = in_bin & np.isfinite(sb_tile.value) & (footprint >= _MIN_FOOTPRINT)
    out = np.zeros((3, n_bins))
    out[0] = np.bincount(labels, weights=np.where(good, sb_tile.to_value(SB_UNIT), 0.0)
                         .ravel(), minlength=n_bins)
    out[1] = np.bincount(labels, weights=good.ravel(), minlength=n_bins)
    if cut.error is not None:
        # variance density, per-pixel flux variance / pixel area, reprojects like SB
        err_sb = np.asarray(cut.error, dtype=float) * cut.surface_brightness_factor().value
        var_density = err_sb**2 * cut.pixel_area.to_value(u.arcsec**2)
        var_density[cut.mask] = np.nan
        var_tile, _ = reproject_to_cube(var_density[inner], tile_wcs, shape,
                                        wcs=cut.wcs[inner], method=method)
        # summed variance of the HST pixels in each spaxel, (SB_UNIT * arcsec2)**2
        area = _pixel_area(tile_wcs).value
        var_spax = np.where(good & np.isfinite(var_tile), var_tile * area, 0.0)
        out[2] = np.bincount(labels, weights=var_spax.ravel(), minlength=n_bins)
    return out
