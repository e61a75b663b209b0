# Licensed under a 3-clause BSD style license - see LICENSE
"""Flux-conserving reprojection of HST images onto the cube's spaxel grid."""

import logging

import numpy as np
from astropy import units as u
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area

from ..utils.exceptions import CubeSFHError

__all__ = ["cutout_to_grid", "grid_overlap", "reproject_to_cube"]

log = logging.getLogger(__name__)

_METHODS = ("exact", "adaptive")


def _pixel_area(wcs):
    return (proj_plane_pixel_area(wcs) * u.deg**2).to(u.arcsec**2)


def _check_wcs(wcs, name):
    if not isinstance(wcs, WCS) or not wcs.has_celestial:
        msg = f"{name} must be an astropy WCS with celestial (RA/Dec) axes."
        raise CubeSFHError(msg)
    wcs = wcs.celestial
    if wcs.naxis != 2:
        msg = f"{name} must have exactly two celestial axes; got {wcs.naxis}."
        raise CubeSFHError(msg)
    return wcs


def _grid_outline(shape, n_per_side=16):
    """Pixel coordinates along the outer edges of a grid of ``shape`` (ny, nx)."""
    ny, nx = shape
    xs = np.linspace(-0.5, nx - 0.5, n_per_side)
    ys = np.linspace(-0.5, ny - 0.5, n_per_side)
    x = np.concatenate([xs, xs, np.full(n_per_side, -0.5), np.full(n_per_side, nx - 0.5)])
    y = np.concatenate([np.full(n_per_side, -0.5), np.full(n_per_side, ny - 0.5), ys, ys])
    return x, y


def grid_overlap(image_wcs, image_shape, grid_wcs, grid_shape, *, margin=0):
    """
    Pixel box of an image that covers a target grid.

    Parameters
    ----------
    image_wcs : `~astropy.wcs.WCS`
        Celestial WCS of the image.
    image_shape : tuple of int
        ``(ny, nx)`` of the image.
    grid_wcs : `~astropy.wcs.WCS`
        Celestial WCS of the target grid (e.g. the cube).
    grid_shape : tuple of int
        ``(ny, nx)`` of the target grid.
    margin : int, optional
        Extra image pixels on each side (e.g. the PSF-matching kernel radius).

    Returns
    -------
    box : tuple of slice or `None`
        ``(slice_y, slice_x)`` in image pixels, clipped to the image, or
        `None` if the grid (without margin) does not overlap the image.
    full_box : tuple of int
        ``(y0, y1, x0, x1)``, the unclipped box including the margin.
    """
    gx, gy = _grid_outline(grid_shape)
    world = grid_wcs.pixel_to_world_values(gx, gy)
    ix, iy = image_wcs.world_to_pixel_values(*world)
    if not (np.all(np.isfinite(ix)) and np.all(np.isfinite(iy))):
        return None, None
    ny, nx = image_shape
    x0, x1 = np.floor(ix.min() + 0.5), np.ceil(ix.max() + 0.5)
    y0, y1 = np.floor(iy.min() + 0.5), np.ceil(iy.max() + 0.5)
    if x1 <= 0 or y1 <= 0 or x0 >= nx or y0 >= ny:
        return None, None
    full = (int(y0) - margin, int(y1) + margin, int(x0) - margin, int(x1) + margin)
    box = (slice(max(full[0], 0), min(full[1], ny)), slice(max(full[2], 0), min(full[3], nx)))
    return box, full


def _valid_pixels(image, rows=slice(None), cols=slice(None)):
    """Whether ``image[rows, cols]`` has a pixel with data (finite, WHT != 0, not masked)."""
    ny = image.shape[0]
    start, stop, _ = rows.indices(ny)
    step = max(1, (1 << 24) // max(1, image.shape[1] * 8))  # ~16 MB of pixels at a time
    for y0 in range(start, stop, step):
        block = slice(y0, min(stop, y0 + step))
        good = np.isfinite(np.asarray(image.data[block, cols], dtype=float))
        if image.weight is not None:
            good &= np.asarray(image.weight[block, cols]) != 0
        if getattr(image, "_mask", None) is not None:
            good &= ~np.asarray(image._mask[block, cols])
        if good.any():
            return True
    return False


def _no_data_message(image, grid_wcs, grid_shape):
    """
    Why ``image`` gives no valid data on a grid (the cube's), or `None`.

    Called when an image turned out to have no valid pixel on the cube grid,
    to tell an image without any data (all NaN, or ``WHT = 0``) from one that
    misses the cube or has no data only over it.
    """
    name = f"{image.band} image {image.filename}" if image.filename else f"{image.band} image"
    weight = " or has WHT = 0" if image.weight is not None else ""
    if not _valid_pixels(image):
        return (f"The HST {name} has no valid pixels: every pixel is NaN{weight}, so it holds "
                "no data (an empty drizzle product or the wrong extension); use another "
                f"{image.band} image, or leave the band out.")
    box, _ = grid_overlap(image.wcs, image.shape, grid_wcs, grid_shape)
    if box is None:
        return (f"The HST {name} does not overlap the cube footprint: check that the HST "
                "image covers the same field (and that both WCS are correct).")
    if not _valid_pixels(image, *box):
        return (f"The HST {name} has no valid pixels over the MUSE field: every pixel there is "
                f"NaN{weight} (the image has data only elsewhere); use an image that covers "
                f"the field with data, or leave {image.band} out.")
    return None


def cutout_to_grid(image, grid_wcs, grid_shape, *, margin=0):
    """
    Cut an `~cubesfh.hst.HSTImage` to the footprint of a target grid.

    Parameters
    ----------
    image : `~cubesfh.hst.HSTImage`
        Image (possibly memory-mapped; only the cutout is read).
    grid_wcs : `~astropy.wcs.WCS`
        Celestial WCS of the target grid.
    grid_shape : tuple of int
        ``(ny, nx)`` of the target grid.
    margin : int, optional
        Extra image pixels on each side. Parts of the box outside the image
        are NaN and masked.

    Returns
    -------
    cutout : `~cubesfh.hst.HSTImage`

    Raises
    ------
    CubeSFHError
        If the image does not overlap the grid.
    """
    grid_wcs = _check_wcs(grid_wcs, "cube_wcs")
    _, full = grid_overlap(image.wcs, image.shape, grid_wcs, grid_shape, margin=margin)
    if full is None:
        name = image.filename or f"the {image.band} image"
        msg = (f"{name} does not overlap the cube footprint: check that the HST image "
               f"covers the same field (and that both WCS are correct).")
        raise CubeSFHError(msg)
    y0, y1, x0, x1 = full
    size = (y1 - y0, x1 - x0)
    position = ((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2)
    cut = image.cutout(position, size, mode="partial")
    log.debug("%s cut to %d x %d pixels (margin %d)", image.band, size[1], size[0], margin)
    return cut


def reproject_to_cube(image, cube_wcs, shape_out, *, wcs=None, method="exact",
                      parallel=False):
    """
    Reproject a surface-brightness image onto the cube's spaxel grid,
    conserving total flux.

    The image is carried as surface brightness :math:`I` (flux per
    arcsec2), so total flux is :math:`F = \\sum_i I_i \\Omega_i` over pixels
    :math:`i` of solid angle :math:`\\Omega_i`:

    * ``method='exact'`` (`reproject.reproject_exact`): each output spaxel
      receives the overlap-area-weighted mean of the input surface
      brightness, :math:`I_j = \\sum_i I_i a_{ij} / \\sum_i a_{ij}` with
      :math:`a_{ij}` the spherical overlap area. For a spaxel inside the
      image :math:`\\sum_i a_{ij} = \\Omega_j`, hence :math:`\\sum_j I_j
      \\Omega_j = \\sum_i I_i \\Omega_i`: total flux is conserved exactly
      (over fully covered spaxels).
    * ``method='adaptive'`` (`reproject.reproject_adaptive`, DeForest 2004,
      Gaussian kernel): the image is first turned into flux per pixel,
      :math:`I_i \\Omega_i`, resampled with ``conserve_flux=True`` (which
      rescales by the Jacobian so that sums of pixel values are preserved)
      and divided by the spaxel solid angle :math:`\\Omega_j`. Faster;
      conserves flux to the accuracy of the anti-aliasing kernel (~0.1 %).

    Parameters
    ----------
    image : `~cubesfh.hst.HSTImage`, `~astropy.units.Quantity` or `~numpy.ndarray`
        Surface-brightness image, or an `~cubesfh.hst.HSTImage` (converted
        with :meth:`~cubesfh.hst.HSTImage.to_surface_brightness`).
    cube_wcs : `~astropy.wcs.WCS`
        Celestial WCS of the output grid.
    shape_out : tuple of int
        ``(ny, nx)`` of the output grid.
    wcs : `~astropy.wcs.WCS`, optional
        WCS of ``image`` when it is an array.
    method : {'exact', 'adaptive'}, optional
        Reprojection algorithm, see above.
    parallel : bool or int, optional
        Passed to reproject.

    Returns
    -------
    sb : `~astropy.units.Quantity` or `~numpy.ndarray`
        Surface brightness on the output grid (same unit as the input); NaN
        where the spaxel overlaps NaN input pixels or lies outside the image.
    footprint : `~numpy.ndarray`
        Fraction of each spaxel covered by the input image (0 to 1).
    """
    from reproject import reproject_adaptive, reproject_exact

    if method not in _METHODS:
        msg = f"method must be one of {_METHODS}; got {method!r}."
        raise CubeSFHError(msg)
    if hasattr(image, "to_surface_brightness"):
        wcs = image.wcs
        image = image.to_surface_brightness()
    if wcs is None:
        msg = "Pass wcs= (the image's celestial WCS) when image is an array."
        raise CubeSFHError(msg)
    wcs = _check_wcs(wcs, "wcs")
    cube_wcs = _check_wcs(cube_wcs, "cube_wcs")
    unit = image.unit if isinstance(image, u.Quantity) else None
    data = np.asarray(u.Quantity(image).value if unit is not None else image, dtype=float)
    shape_out = tuple(int(n) for n in shape_out)

    if method == "exact":
        out, footprint = reproject_exact((data, wcs), cube_wcs, shape_out=shape_out,
                                         parallel=parallel)
    else:
        area_in = _pixel_area(wcs).value
        area_out = _pixel_area(cube_wcs).value
        out, footprint = reproject_adaptive(
            (data * area_in, wcs), cube_wcs, shape_out=shape_out, conserve_flux=True,
            kernel="gaussian", boundary_mode="strict", bad_value_mode="strict",
            parallel=parallel)
        out /= area_out
    footprint = np.clip(footprint, 0.0, 1.0)
    out[footprint <= 0] = np.nan
    return (out * unit, footprint) if unit is not None else (out, footprint)
