# Licensed under a 3-clause BSD style license - see LICENSE
"""
The MUSE data cube container, `Cube`.

A `Cube` carries flux, variance, data-quality flags, unit, WCS and PSF of a
MUSE cube together.  Arrays are ``[wavelength, y, x]`` (the NumPy view of
the FITS axes x, y, wavelength).  Cubes read from disk are never loaded as a
whole: `Cube.iter_chunks` reads blocks of rows, and every reduction in
cubesfh (S/N maps, bin co-adding) goes through it, so the memory needed is
set by ``max_memory``, not by the size of the cube.
"""

import functools
import logging
import math
import os

import numpy as np
from astropy import units as u
from astropy.io import fits, registry
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area, proj_plane_pixel_scales

from .conventions import SNR_WINDOW
from .io import muse
from .utils import CubeSFHError, progress
from .utils._fits import check_input_file, describe_content
from .utils._memory import DEFAULT_MAX_MEMORY
from .utils._memory import as_bytes as _as_bytes
from .utils._memory import format_bytes as _format_bytes

__all__ = ["DEFAULT_MAX_MEMORY", "Cube", "CubeRead", "CubeWrite"]

log = logging.getLogger(__name__)

# Stoehr et al. (2008) DER_SNR: sigma = 1.482602 / sqrt(6) * median |2 f_i - f_i-2 - f_i+2|.
_DER_SNR_FACTOR = 1.482602 / math.sqrt(6.0)


class CubeRead(registry.UnifiedReadWrite):
    """
    Read a MUSE data cube and return a `Cube`.

    This goes through the astropy unified I/O registry.  The format
    (``'muse'``, the only one) is detected from the file::

      >>> from cubesfh import Cube
      >>> cube = Cube.read("DATACUBE_FINAL.fits")  # doctest: +SKIP
      >>> cube = Cube.read("NGC0628.fits", psf_fwhm=0.9 * u.arcsec)  # doctest: +SKIP

    ``Cube.read.help('muse')`` prints the reader's documentation
    (:func:`cubesfh.io.muse.read_muse`).

    Parameters
    ----------
    path : str or `~pathlib.Path`
        FITS file with ``DATA``, ``STAT`` and optionally ``DQ`` extensions.
    format : str, optional
        ``'muse'``; detected when omitted.
    psf_fwhm : `~astropy.units.Quantity`, optional
        PSF FWHM (overrides the header).
    noise : `~astropy.units.Quantity` or ``'der_snr'``, optional
        Noise estimate for files without ``STAT``.
    unit : str or `~astropy.units.UnitBase`, optional
        Flux unit; overrides ``BUNIT`` (needed when it is missing).
    memmap : bool, optional
        Keep the data on disk (default) or load it into memory.
    max_memory : `~astropy.units.Quantity` or int, optional
        Memory limit, default `DEFAULT_MAX_MEMORY`.

    Returns
    -------
    cube : `Cube`

    Notes
    -----
    """

    def __init__(self, instance, cls):
        super().__init__(instance, cls, "read", registry=None)

    def __call__(self, *args, **kwargs):
        if args and isinstance(args[0], (str, os.PathLike)):
            path, _ = check_input_file(args[0], "MUSE cube")
            args = (str(path), *args[1:])
            if kwargs.get("format") is None:
                formats = self.registry.identify_format("read", self._cls, str(path), None,
                                                        args, kwargs)
                if not formats:
                    with open(path, "rb") as handle:
                        head = handle.read(4096)
                    msg = (f"MUSE cube {path} is not a FITS file: it holds "
                           f"{describe_content(head)}; Cube.read reads MUSE data cubes in "
                           "FITS format (DATA, STAT and DQ extensions).")
                    raise CubeSFHError(msg)
                kwargs["format"] = formats[0]
        return self.registry.read(self._cls, *args, **kwargs)


class CubeWrite(registry.UnifiedReadWrite):
    """
    Write the cube to a MUSE FITS file (``PRIMARY`` + ``DATA`` + ``STAT`` [+ ``DQ``]).

    The file is written block by block to a temporary file that replaces
    ``path`` only when complete, and reads back to the same cube::

      >>> cube.write("cutout.fits", overwrite=True)  # doctest: +SKIP

    ``Cube.write.help('muse')`` prints the writer's documentation
    (:func:`cubesfh.io.muse.write_muse`).

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Output file.
    format : str, optional
        ``'muse'`` (the default and only format).
    overwrite : bool, optional
        Replace an existing file.
    max_memory : `~astropy.units.Quantity` or int, optional
        Memory used per block written.
    progress_bar : bool, optional
        Show a progress bar.

    Notes
    -----
    """

    def __init__(self, instance, cls):
        super().__init__(instance, cls, "write", registry=None)

    def __call__(self, *args, format=None, **kwargs):
        self.registry.write(self._instance, *args, format=format or "muse", **kwargs)


def _check_wcs(wcs, shape):
    """Check the 3-D WCS: celestial axes 1-2, wavelength axis 3, not coupled."""
    if not isinstance(wcs, WCS):
        msg = (f"wcs must be an astropy.wcs.WCS, got {type(wcs).__name__}; build it with "
               "WCS(header) from the DATA header.")
        raise CubeSFHError(msg)
    if wcs.pixel_n_dim != 3:
        msg = (f"the WCS has {wcs.pixel_n_dim} axes; a cube needs a 3-D WCS (RA, Dec, "
               "wavelength), e.g. WCS(data_header).")
        raise CubeSFHError(msg)
    ctype = [str(c).upper() for c in wcs.wcs.ctype]
    if not (wcs.has_celestial and wcs.wcs.lng == 0 and wcs.wcs.lat == 1):
        msg = (f"the cube has no celestial WCS: CTYPE1, CTYPE2 = {ctype[0]!r}, {ctype[1]!r}; "
               "cubesfh needs sky coordinates on the x and y axes, e.g. CTYPE1 = 'RA---TAN', "
               "CTYPE2 = 'DEC--TAN' with CRVAL/CRPIX/CD keywords. Fix the DATA header "
               "(e.g. copy the WCS of the white-light image).")
        raise CubeSFHError(msg)
    if not ctype[2].startswith(("AWAV", "WAVE")):
        msg = (f"the third axis has CTYPE3 = {ctype[2]!r}, not a wavelength; cubesfh needs "
               "CTYPE3 = 'AWAV' (air wavelength) or 'WAVE' (vacuum).")
        raise CubeSFHError(msg)
    if not u.Unit(wcs.world_axis_units[2]).is_equivalent(u.m):
        msg = (f"the wavelength axis is in unknown units ({wcs.world_axis_units[2]!r}); "
               "set CUNIT3 to a length such as 'Angstrom'.")
        raise CubeSFHError(msg)
    correlation = wcs.axis_correlation_matrix  # world x pixel, FITS order
    if correlation[2, 0] or correlation[2, 1] or correlation[0, 2] or correlation[1, 2]:
        msg = ("the wavelength axis of the WCS is coupled to the spatial axes (non-zero "
               "CD1_3/CD3_1-type terms); cubesfh needs axes (x, y, wavelength) = FITS axes "
               "(1, 2, 3) with a separate wavelength axis.")
        raise CubeSFHError(msg)
    if wcs.array_shape is not None and tuple(wcs.array_shape) != tuple(shape):
        # WCS(header) records NAXISn; a mismatch means the WCS belongs to another array.
        msg = (f"the WCS describes an array of shape {tuple(wcs.array_shape)} but the data "
               f"have shape {tuple(shape)}; pass the WCS of this cube.")
        raise CubeSFHError(msg)


def _der_snr(data, bad):
    """DER_SNR noise (Stoehr et al. 2008) of each spectrum in a [lam, y, x] block."""
    flux = np.where(bad, np.nan, data).astype(np.float64)
    if flux.shape[0] < 5:
        return np.full(flux.shape[1:], np.nan)
    second = np.abs(2.0 * flux[2:-2] - flux[:-4] - flux[4:])
    count = np.isfinite(second).sum(axis=0)
    sigma = np.full(flux.shape[1:], np.nan)
    enough = count >= 3
    if enough.any():
        sigma[enough] = _DER_SNR_FACTOR * np.nanmedian(second[:, enough], axis=0)
    return sigma


class Cube:
    """
    A MUSE data cube: flux, variance, quality, unit, WCS and PSF.

    Arrays are ``[wavelength, y, x]``: ``cube.data[:, y, x]`` is the
    spectrum of spaxel (x, y) and ``cube.data[k]`` an image at
    ``cube.wavelength[k]``.  Read cubes with ``Cube.read(path)``; the arrays
    then stay on disk (memory-mapped) and operations over the whole cube work
    chunk by chunk (`iter_chunks`) within ``max_memory``.

    Operations (slicing, `spectral_slab`) return new cubes that share the
    arrays; the arrays of a cube read from disk are read-only.

    Parameters
    ----------
    data : array-like or `~astropy.units.Quantity`
        Flux density per spaxel, shape ``(nlam, ny, nx)``; may be a
        `numpy.memmap`.  NaN marks missing data.
    wcs : `~astropy.wcs.WCS`
        3-D WCS: celestial axes (FITS axes 1, 2 = x, y) and a wavelength axis
        (FITS axis 3, ``CTYPE3`` ``'AWAV'`` or ``'WAVE'``).
    unit : str or `~astropy.units.UnitBase`, optional
        Flux unit, a flux density per unit wavelength such as
        ``'10**(-20)*erg/s/cm**2/Angstrom'``.  Required unless ``data`` is a
        `~astropy.units.Quantity`.
    variance : array-like or `~astropy.units.Quantity`, optional
        Variance of ``data`` in ``unit**2`` (MUSE ``STAT``), same shape.
    mask : array-like of bool, optional
        Extra pixels to mask (`True` = bad), same shape.
    dq : array-like of int, optional
        Data-quality flags (MUSE ``DQ``); non-zero = bad.
    psf_fwhm : `~astropy.units.Quantity`, optional
        FWHM of the point spread function (an angle).
    meta : `~astropy.io.fits.Header` or dict, optional
        Metadata (the primary header for cubes read from files).
    noise : `~astropy.units.Quantity` or ``'der_snr'``, optional
        Noise estimate used when ``variance`` is `None`: a constant 1-sigma
        per pixel (a scalar in flux units), or ``'der_snr'``: for each
        spaxel a constant sigma estimated from its spectrum with DER_SNR
        (Stoehr et al. 2008), ``1.482602 / sqrt(6) * median |2 f_i - f_(i-2)
        - f_(i+2)|`` over unmasked pixels of the spectral range being
        processed (for `signal_noise`, the S/N window).  DER_SNR assumes
        uncorrelated noise and a smooth spectrum on the scale of a few pixels.
    max_memory : `~astropy.units.Quantity` or int, optional
        Memory budget for chunked operations (bytes or an information
        Quantity); default `DEFAULT_MAX_MEMORY` (1 GB).  Settable later as
        ``cube.max_memory = 4 * u.GB``.

    Raises
    ------
    CubeSFHError
        For arrays that are not 3-D or do not match, a WCS without celestial
        or wavelength axes, a unit that is not a flux density per wavelength,
        or a ``psf_fwhm``/``noise`` of the wrong kind.

    Notes
    -----
    The bad-pixel mask (`mask`) is computed, not stored: a pixel is bad
    where the flux or variance is not finite, the variance is not positive,
    DQ is non-zero or the user ``mask`` is set.
    """

    read = registry.UnifiedReadWriteMethod(CubeRead)
    write = registry.UnifiedReadWriteMethod(CubeWrite)

    def __init__(self, data, *, wcs, unit=None, variance=None, mask=None, dq=None,
                 psf_fwhm=None, meta=None, noise=None, max_memory=None):
        if isinstance(data, u.Quantity):
            if unit is None:
                unit = data.unit
            data = data.to_value(muse.parse_flux_unit(unit, what="unit"))
        if unit is None:
            msg = ("the flux unit is unknown; pass unit=, e.g. "
                   "unit='10**(-20)*erg/s/cm**2/Angstrom' (or give data as a Quantity).")
            raise CubeSFHError(msg)
        self._unit = muse.parse_flux_unit(unit, what="unit")
        if not isinstance(data, np.ndarray):
            data = np.asarray(data)
        if data.ndim != 3:
            msg = (f"data has shape {data.shape}; a Cube needs a 3-D array "
                   "[wavelength, y, x].")
            raise CubeSFHError(msg)
        self._data = data
        self._variance = self._same_shape(variance, "variance", self._unit**2)
        self._user_mask = self._same_shape(mask, "mask", None, dtype=bool)
        self._dq = self._same_shape(dq, "dq", None)
        _check_wcs(wcs, data.shape)
        self._wcs = wcs
        self._psf_fwhm = self._check_psf(psf_fwhm)
        self._psf_fwhm_source = "psf_fwhm=" if psf_fwhm is not None else None
        self._noise = self._check_noise(noise)
        self.meta = fits.Header() if meta is None else meta
        self._max_memory = _as_bytes(max_memory)
        self._filename = None
        self._files = {}  # 'data'/'variance'/'dq' -> utils._io.FileExtension (lazy reads)
        self._origin = (0, 0, 0)  # position of this cube in the file arrays

    @classmethod
    def _from_file(cls, contents):
        """A cube on the arrays of a `~cubesfh.io.muse.MuseFile` (what ``Cube.read`` does)."""
        cube = cls(contents.data, variance=contents.variance, dq=contents.dq,
                   wcs=contents.wcs, unit=contents.unit, psf_fwhm=contents.psf_fwhm,
                   meta=contents.meta, noise=contents.noise, max_memory=contents.max_memory)
        cube._filename = contents.filename
        cube._psf_fwhm_source = contents.psf_fwhm_source
        cube._files = dict(contents.files)
        return cube

    # ------------------------------------------------------------------ helpers
    def _same_shape(self, array, name, unit, dtype=None):
        if array is None:
            return None
        if isinstance(array, u.Quantity):
            if unit is None:
                msg = f"{name} must be a plain array, not a Quantity."
                raise CubeSFHError(msg)
            array = array.to_value(unit)
        if not isinstance(array, np.ndarray) or (dtype is not None and array.dtype != dtype):
            array = np.asarray(array, dtype=dtype)
        if array.shape != self._data.shape:
            msg = (f"{name} has shape {array.shape} but data has shape {self._data.shape}; "
                   f"{name} must match data [wavelength, y, x].")
            raise CubeSFHError(msg)
        return array

    @staticmethod
    def _check_psf(psf_fwhm):
        if psf_fwhm is None:
            return None
        if not (isinstance(psf_fwhm, u.Quantity) and psf_fwhm.unit.is_equivalent(u.arcsec)
                and psf_fwhm.isscalar):
            msg = f"psf_fwhm={psf_fwhm!r} must be an angle Quantity, e.g. 0.8 * u.arcsec."
            raise CubeSFHError(msg)
        if not psf_fwhm > 0:
            msg = f"psf_fwhm={psf_fwhm} must be positive."
            raise CubeSFHError(msg)
        return psf_fwhm.to(u.arcsec)

    def _check_noise(self, noise):
        if noise is None:
            return None
        if isinstance(noise, str) and noise.lower() == "der_snr":
            return "der_snr"
        if isinstance(noise, u.Quantity) and noise.isscalar and noise.unit.is_equivalent(
                self._unit):
            if not noise > 0:
                msg = f"noise={noise} must be positive."
                raise CubeSFHError(msg)
            return noise.to(self._unit)
        msg = (f"noise={noise!r} is not understood; give a scalar Quantity in the flux unit "
               f"({self._unit.to_string()}), the constant 1-sigma per pixel, or 'der_snr'.")
        raise CubeSFHError(msg)

    # --------------------------------------------------------------- attributes
    @property
    def data(self):
        """Flux array ``[wavelength, y, x]`` in `unit` (may be memory-mapped, read-only)."""
        return self._data

    @property
    def variance(self):
        """Variance array in ``unit**2`` (MUSE ``STAT``), or `None`."""
        return self._variance

    @property
    def dq(self):
        """Data-quality flags (MUSE ``DQ``, non-zero = bad), or `None`."""
        return self._dq

    @property
    def unit(self):
        """Flux unit (`~astropy.units.UnitBase`)."""
        return self._unit

    @property
    def noise(self):
        """The noise estimate used without variance (`None`, a Quantity or ``'der_snr'``)."""
        return self._noise

    @property
    def wcs(self):
        """3-D `~astropy.wcs.WCS` (FITS axes x, y, wavelength)."""
        return self._wcs

    @property
    def celestial_wcs(self):
        """2-D celestial `~astropy.wcs.WCS` of the spatial axes (x, y)."""
        return self._wcs.celestial

    @property
    def filename(self):
        """File the cube was read from, or `None`."""
        return self._filename

    @property
    def shape(self):
        """``(nlam, ny, nx)``."""
        return self._data.shape

    @property
    def spatial_shape(self):
        """``(ny, nx)``."""
        return self._data.shape[1:]

    @property
    def max_memory(self):
        """Memory budget of chunked operations (`~astropy.units.Quantity`, settable)."""
        return (self._max_memory * u.byte).to(u.GB)

    @max_memory.setter
    def max_memory(self, value):
        self._max_memory = _as_bytes(value)

    @functools.cached_property
    def wavelength(self):
        """Wavelength of each plane (`~astropy.units.Quantity`, Angstrom, shape ``(nlam,)``)."""
        spectral = self._wcs.spectral
        values = spectral.pixel_to_world_values(np.arange(self.shape[0], dtype=float))
        return (np.asarray(values, dtype=float) * u.Unit(spectral.world_axis_units[0])).to(u.AA)

    @property
    def wavelength_type(self):
        """``'air'`` (``CTYPE3 = 'AWAV'``, the MUSE convention) or ``'vacuum'`` (``'WAVE'``)."""
        return "air" if str(self._wcs.wcs.ctype[2]).upper().startswith("AWAV") else "vacuum"

    @property
    def spaxel_scale(self):
        """
        Side of a spaxel (`~astropy.units.Quantity`, arcsec), from the WCS.

        For non-square spaxels this is the square root of `spaxel_area`.
        """
        scales = proj_plane_pixel_scales(self.celestial_wcs) * 3600.0
        if not np.isclose(scales[0], scales[1], rtol=1e-3):
            return np.sqrt(self.spaxel_area)
        return float(np.mean(scales)) * u.arcsec

    @property
    def spaxel_area(self):
        """Solid angle of a spaxel (`~astropy.units.Quantity`, arcsec2)."""
        return float(proj_plane_pixel_area(self.celestial_wcs) * 3600.0**2) * u.arcsec**2

    @property
    def has_psf_fwhm(self):
        """Whether the PSF FWHM is known (from the header or ``psf_fwhm=``)."""
        return self._psf_fwhm is not None

    @property
    def psf_fwhm(self):
        """
        FWHM of the PSF (`~astropy.units.Quantity`, arcsec).

        Taken from ``psf_fwhm=`` or the header (keywords in
        :func:`cubesfh.io.muse.psf_fwhm_from_header`); `psf_fwhm_source`
        says which.

        Raises
        ------
        CubeSFHError
            If it is unknown.
        """
        if self._psf_fwhm is None:
            keys = ", ".join(muse.PSF_FWHM_KEYWORDS)
            msg = ("the PSF FWHM of this cube is unknown: the header has none of the keywords "
                   f"{keys} (or FSF00FWA/FSF00FWB); pass it as "
                   "Cube.read(..., psf_fwhm=0.8 * u.arcsec) (or Cube(..., psf_fwhm=)).")
            raise CubeSFHError(msg)
        return self._psf_fwhm

    @property
    def psf_fwhm_source(self):
        """Where `psf_fwhm` came from: a header keyword, ``'psf_fwhm='`` or `None`."""
        return self._psf_fwhm_source

    @property
    def mask(self):
        """
        Bad-pixel mask (`True` = bad) of the whole cube, shape ``(nlam, ny, nx)``.

        Computed chunk by chunk; it is refused when it would need more than
        ``max_memory`` (one byte per pixel).  For large cubes use the mask
        chunks yielded by `iter_chunks` instead.
        """
        need = int(np.prod(self.shape))
        if need > self._max_memory:
            msg = (f"the full mask needs {_format_bytes(need)}, more than max_memory="
                   f"{_format_bytes(self._max_memory)}; work chunk by chunk with "
                   "cube.iter_chunks(), or set cube.max_memory = <larger> * u.GB if you have "
                   "the RAM.")
            raise CubeSFHError(msg)
        out = np.empty(self.shape, dtype=bool)
        for ys, _, _, mask in self.iter_chunks():
            out[:, ys] = mask
        return out

    def __repr__(self):
        wave = self.wavelength
        psf = f"{self._psf_fwhm:.3g}" if self._psf_fwhm is not None else "unknown"
        return (f"<Cube [wavelength, y, x] = {self.shape}, {wave[0]:.2f} - {wave[-1]:.2f}, "
                f"spaxel {self.spaxel_scale:.3g}, PSF FWHM {psf}, unit "
                f"{self._unit.to_string()}, file {self._filename}>")

    # ------------------------------------------------------------------ slicing
    def _new(self, slices):
        """New cube on the sub-array ``slices`` (three step-1 slices)."""
        def part(array):
            return None if array is None else array[slices]

        new = Cube(self._data[slices], wcs=self._wcs.slice(slices), unit=self._unit,
                   variance=part(self._variance), mask=part(self._user_mask),
                   dq=part(self._dq), psf_fwhm=self._psf_fwhm,
                   meta=self.meta.copy() if hasattr(self.meta, "copy") else self.meta,
                   noise=self._noise, max_memory=self._max_memory)
        new._psf_fwhm_source = self._psf_fwhm_source
        new._filename = self._filename
        new._files = self._files
        new._origin = tuple(o + s.start for o, s in zip(self._origin, slices, strict=True))
        return new

    def __getitem__(self, key):
        """
        Cut out a sub-cube: ``cube[l0:l1, y0:y1, x0:x1]`` returns a new `Cube`.

        Only slices with step 1 are allowed (an integer would drop an axis);
        the WCS is updated so world coordinates of every pixel are unchanged.
        """
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            index = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:index] + (slice(None),) * (4 - len(key)) + key[index + 1:]
        if len(key) > 3:
            msg = f"too many indices ({len(key)}) for a cube [wavelength, y, x]."
            raise CubeSFHError(msg)
        key = key + (slice(None),) * (3 - len(key))
        slices = []
        for k, n, axis in zip(key, self.shape, ("wavelength", "y", "x"), strict=True):
            if not isinstance(k, slice):
                msg = (f"Cube indices must be slices, got {k!r} for the {axis} axis; use "
                       "e.g. cube[:, y:y+1, x:x+1] to keep one spaxel as a cube, or "
                       "cube.data[:, y, x] for the array.")
                raise CubeSFHError(msg)
            start, stop, step = k.indices(n)
            if step != 1:
                msg = f"slice step {step} on the {axis} axis is not supported; use step 1."
                raise CubeSFHError(msg)
            if stop <= start:
                msg = (f"the slice {k} selects no pixel of the {axis} axis (length {n}); "
                       "a cut-out must keep at least one pixel on each axis.")
                raise CubeSFHError(msg)
            slices.append(slice(start, stop))
        return self._new(tuple(slices))

    def _window_indices(self, lo, hi, what="spectral_slab"):
        try:
            lo = u.Quantity(lo).to_value(u.AA, equivalencies=u.spectral())
            hi = u.Quantity(hi).to_value(u.AA, equivalencies=u.spectral())
        except u.UnitsError:
            msg = (f"{what} limits must be wavelength Quantities, e.g. 5300 * u.AA, got "
                   f"{lo!r}, {hi!r}.")
            raise CubeSFHError(msg) from None
        lo, hi = min(lo, hi), max(lo, hi)
        wave = self.wavelength.to_value(u.AA)
        tol = 1e-6 * float(np.median(np.abs(np.diff(wave)))) if wave.size > 1 else 1e-9
        index = np.flatnonzero((wave >= lo - tol) & (wave <= hi + tol))
        if index.size == 0:
            msg = (f"{what}: the window {lo:g}-{hi:g} Angstrom contains no pixel of the cube, "
                   f"which covers {wave.min():.2f}-{wave.max():.2f} Angstrom; choose a "
                   "window inside that range.")
            raise CubeSFHError(msg)
        if lo < wave.min() - tol or hi > wave.max() + tol:
            log.warning("%s: window %g-%g Angstrom extends beyond the cube (%.2f-%.2f); "
                        "using the overlap", what, lo, hi, wave.min(), wave.max())
        return int(index[0]), int(index[-1]) + 1

    def spectral_slab(self, lo, hi):
        """
        Cube restricted to the wavelengths ``lo <= wavelength <= hi``.

        Parameters
        ----------
        lo, hi : `~astropy.units.Quantity`
            Wavelength limits (any spectral unit), inclusive.

        Returns
        -------
        cube : `Cube`
            New cube sharing the data; its WCS is shifted accordingly.
        """
        i0, i1 = self._window_indices(lo, hi)
        return self[i0:i1]

    # --------------------------------------------------------------- chunk I/O
    def _read(self, key, lam=slice(None), ys=slice(None)):
        """Native-endian copy of ``array[lam, ys, :]`` for 'data', 'variance' or 'dq'."""
        array = {"data": self._data, "variance": self._variance, "dq": self._dq}[key]
        if array is None:
            return None
        nlam, ny, nx = self.shape
        lam = slice(*lam.indices(nlam)[:2])
        ys = slice(*ys.indices(ny)[:2])
        source = self._files.get(key)
        if source is not None:
            l0, y0, x0 = self._origin
            block = source.read(slice(l0 + lam.start, l0 + lam.stop),
                                slice(y0 + ys.start, y0 + ys.stop), slice(x0, x0 + nx))
        else:
            block = np.array(array[lam, ys, :], copy=True)
            block = block.astype(block.dtype.newbyteorder("="), copy=False)
        if key != "dq" and block.dtype.kind != "f":
            block = block.astype(np.float64)
        return block

    def _dq_block(self, lam):
        """DQ flags of planes ``lam`` with user-masked pixels flagged (for writing)."""
        dq = self._read("dq", lam)
        if dq is None:
            nlam = len(range(*lam.indices(self.shape[0])))
            dq = np.zeros((nlam, *self.spatial_shape), dtype=np.int32)
        dq = dq.astype(np.int32, copy=False)
        if self._user_mask is not None:
            dq[np.asarray(self._user_mask[lam])] |= muse.USER_MASK_FLAG
        return dq

    def _bytes_per_row(self):
        nlam, _, nx = self.shape
        item = 4 if self._data.dtype.itemsize <= 4 and self._data.dtype.kind == "f" else 8
        var_item = item if (self._variance is not None or self._noise is not None) else 0
        dq_item = self._dq.dtype.itemsize if self._dq is not None else 0
        return nlam * nx * (item + var_item + 1 + dq_item)

    def iter_chunks(self, *, max_memory=None, progress_bar=False):
        """
        Iterate over blocks of rows (y) of the cube, reading them from disk.

        This is how every operation over a whole cube is done: at any time
        only one block is in memory.

        Parameters
        ----------
        max_memory : `~astropy.units.Quantity` or int, optional
            Memory budget (bytes or an information Quantity); default
            ``cube.max_memory`` (1 GB unless changed).  Blocks are sized so
            that the arrays of one block (flux, variance, mask, and the DQ
            flags while reading) take at most a quarter of it: a caller
            looping over the blocks still holds the previous block while the
            next one is read, and the remaining half is left for the
            caller's temporaries (about two more arrays of the block's size).
        progress_bar : bool, optional
            Show a progress bar over the blocks.

        Yields
        ------
        rows : slice
            The rows ``y0:y1`` of this block (in this cube's pixel frame).
        data : `~numpy.ndarray`
            Flux, shape ``(nlam, y1 - y0, nx)``, a native-endian copy
            (float32 for MUSE files), in `unit`.
        variance : `~numpy.ndarray` or `None`
            Variance in ``unit**2`` (from ``STAT`` or the ``noise``
            estimate); `None` if the cube has neither.
        mask : `~numpy.ndarray` of bool
            `True` for bad pixels (see `mask`).

        Raises
        ------
        CubeSFHError
            If ``max_memory`` cannot hold a single row.
        """
        limit = _as_bytes(self._max_memory if max_memory is None else max_memory)
        nlam, ny, nx = self.shape
        per_row = self._bytes_per_row()
        rows = (limit // 4) // per_row
        if rows < 1:
            msg = (f"max_memory={_format_bytes(limit)} cannot hold one row of this cube "
                   f"({_format_bytes(per_row)} for {nlam} x {nx} pixels, and three times "
                   "as much for the previous block and temporaries); pass max_memory >= "
                   f"{_format_bytes(4 * per_row)}, or cut the cube first (spectral_slab or "
                   "slicing).")
            raise CubeSFHError(msg)
        starts = range(0, ny, rows)
        log.debug("iter_chunks: %d block(s) of %d row(s), %s per row", len(starts), rows,
                  _format_bytes(per_row))
        for y0 in progress(starts, enabled=progress_bar, desc="cube chunks", unit="chunk"):
            ys = slice(y0, min(ny, y0 + rows))
            data = self._read("data", ys=ys)
            variance = self._read("variance", ys=ys)
            mask = ~np.isfinite(data)
            if variance is not None:
                mask |= ~np.isfinite(variance)
                mask |= variance <= 0
            dq = self._read("dq", ys=ys)
            if dq is not None:
                mask |= dq != 0
                del dq
            if self._user_mask is not None:
                mask |= np.asarray(self._user_mask[:, ys, :])
            if variance is None and self._noise is not None:
                variance = self._estimate_variance(data, mask)
                mask |= ~np.isfinite(variance)
            yield ys, data, variance, mask
            del data, variance, mask  # let the caller's block be the only one alive

    def _estimate_variance(self, data, mask):
        if isinstance(self._noise, u.Quantity):
            return np.full(data.shape, self._noise.to_value(self._unit) ** 2, dtype=data.dtype)
        sigma = _der_snr(data, mask)
        variance = np.empty_like(data)
        variance[...] = (sigma**2)[np.newaxis]
        return variance

    # ---------------------------------------------------------------- reductions
    def good_spaxels(self, window=None, *, max_memory=None, progress_bar=False):
        """
        Spaxels with at least one good pixel (in ``window``, if given).

        Parameters
        ----------
        window : `~astropy.units.Quantity`, optional
            ``(lo, hi)`` wavelength range; default the whole cube.
        max_memory : `~astropy.units.Quantity` or int, optional
            See `iter_chunks`.
        progress_bar : bool, optional
            Show a progress bar.

        Returns
        -------
        good : `~numpy.ndarray` of bool, shape ``(ny, nx)``
        """
        cube = self if window is None else self.spectral_slab(*window)
        good = np.zeros(self.spatial_shape, dtype=bool)
        for ys, _, _, mask in cube.iter_chunks(max_memory=max_memory,
                                               progress_bar=progress_bar):
            good[ys] = (~mask).any(axis=0)
        return good

    def check_not_empty(self, window=None, *, max_memory=None):
        """
        Raise `~cubesfh.CubeSFHError` if no spaxel has a good pixel (in ``window``).

        Call it before binning or fitting to fail early on an all-NaN (or
        all-masked) cube.

        Parameters
        ----------
        window : `~astropy.units.Quantity`, optional
            ``(lo, hi)`` wavelength range; default the whole cube.
        max_memory : `~astropy.units.Quantity` or int, optional
            See `iter_chunks`.

        Returns
        -------
        n_good : int
            Number of spaxels with at least one good pixel.
        """
        n_good = int(self.good_spaxels(window, max_memory=max_memory).sum())
        if n_good == 0:
            self._raise_empty(window)
        return n_good

    def _empty_reason(self, window):
        """Why no pixel (in ``window``) is good: which extension makes them all bad."""
        cube = self if window is None else self.spectral_slab(*window)
        total = bad_data = var_nan = var_zero = var_neg = flagged = 0
        for ys in range(cube.shape[1]):
            rows = slice(ys, ys + 1)
            data = cube._read("data", ys=rows)
            total += data.size
            bad_data += int(np.count_nonzero(~np.isfinite(data)))
            variance = cube._read("variance", ys=rows)
            if variance is not None:
                var_nan += int(np.count_nonzero(~np.isfinite(variance)))
                var_zero += int(np.count_nonzero(variance == 0))
                var_neg += int(np.count_nonzero(variance < 0))
            dq = cube._read("dq", ys=rows)
            if dq is not None:
                flagged += int(np.count_nonzero(dq))
        if total and bad_data == total:
            return "DATA is NaN (or infinite) everywhere (an all-NaN cube)", "the DATA extension"
        if total and var_nan == total:
            return ("STAT (the variance) is NaN (or infinite) everywhere",
                    "the STAT extension (or remove it and read with noise='der_snr')")
        if total and var_nan + var_zero + var_neg == total:
            kinds = " and ".join(k for k, n in (("zero", var_zero), ("negative", var_neg)) if n)
            return (f"STAT (the variance) is {kinds} everywhere ({var_zero} zero, {var_neg} "
                    "negative pixels), but variances must be > 0",
                    "the STAT extension (it must hold the variance, sigma**2)")
        if total and flagged == total:
            return "DQ flags every pixel (DQ != 0)", "the DQ extension"
        return ("every pixel is NaN or masked (NaN DATA, DQ != 0 or no positive STAT, "
                "in some combination, or masked by the user)", "the DATA/STAT/DQ extensions")

    def _raise_empty(self, window):
        where = ""
        if window is not None:
            lo, hi = u.Quantity(window, u.AA).to_value(u.AA)
            where = f" in the window {lo:.1f}-{hi:.1f} Angstrom"
        reason, fix = self._empty_reason(window)
        wave = self.wavelength.to_value(u.AA)
        msg = (f"the cube has no valid pixel{where}: {reason}; file {self._filename}. Check "
               f"{fix}, or choose another window= inside {wave[0]:.1f}-{wave[-1]:.1f} "
               "Angstrom.")
        raise CubeSFHError(msg)

    def signal_noise(self, window=SNR_WINDOW, *, per="angstrom", max_memory=None,
                     progress_bar=True):
        """
        Signal and noise maps in a wavelength window.

        For each spaxel, over the N good pixels i of the window:

        * signal ``S = (1/N) sum f_i``, the mean flux density;
        * per-pixel noise ``sigma_pix = sqrt((1/N) sum var_i)``, the RMS of
          the pixel errors;
        * ``per='pixel'``: noise = ``sigma_pix``, so S/N is per spectral pixel;
        * ``per='angstrom'`` (default): noise = ``sigma_pix * sqrt(dlam / 1
          Angstrom)``, the error of the mean flux over 1 Angstrom (1/dlam
          pixels with independent errors), where ``dlam`` is the mean pixel
          width in the window (1.25 Angstrom for MUSE).  Hence ``S/N per
          Angstrom = S / sigma_pix * sqrt(1 Angstrom / dlam)``.

        Spaxels without good pixels in the window are NaN.  The cube is read
        chunk by chunk (`iter_chunks`), only the planes of the window.

        Parameters
        ----------
        window : `~astropy.units.Quantity`, optional
            ``(lo, hi)`` wavelengths, inclusive; default
            `~cubesfh.conventions.SNR_WINDOW` (5300-5500 Angstrom).
        per : {'angstrom', 'pixel'}, optional
            Noise convention (see above).
        max_memory : `~astropy.units.Quantity` or int, optional
            See `iter_chunks`.
        progress_bar : bool, optional
            Show a progress bar.

        Returns
        -------
        signal, noise : `~astropy.units.Quantity`
            Maps of shape ``(ny, nx)`` in `unit`.

        Raises
        ------
        CubeSFHError
            If the window is outside the cube, the cube has no variance and
            no ``noise`` estimate, or no spaxel has a good pixel in the window.
        """
        if per not in ("angstrom", "pixel"):
            msg = f"per={per!r} is not supported; use per='angstrom' or per='pixel'."
            raise CubeSFHError(msg)
        if self._variance is None and self._noise is None:
            msg = ("the cube has no variance (no STAT extension), so its noise is unknown; "
                   "give a noise estimate: Cube.read(..., noise='der_snr') or "
                   "noise=<Quantity 1-sigma per pixel>.")
            raise CubeSFHError(msg)
        i0, i1 = self._window_indices(window[0], window[1], what="signal_noise")
        slab = self[i0:i1]
        sum_flux = np.zeros(self.spatial_shape)
        sum_var = np.zeros(self.spatial_shape)
        count = np.zeros(self.spatial_shape, dtype=np.int64)
        for ys, data, variance, mask in slab.iter_chunks(max_memory=max_memory,
                                                         progress_bar=progress_bar):
            good = ~mask
            sum_flux[ys] = np.where(good, data, 0).sum(axis=0, dtype=np.float64)
            sum_var[ys] = np.where(good, variance, 0).sum(axis=0, dtype=np.float64)
            count[ys] = good.sum(axis=0)
        if not count.any():
            self._raise_empty(window)
        with np.errstate(invalid="ignore", divide="ignore"):
            signal = np.where(count > 0, sum_flux / count, np.nan)
            noise = np.where(count > 0, np.sqrt(sum_var / count), np.nan)
        if per == "angstrom":
            width = np.gradient(self.wavelength.to_value(u.AA)) if self.shape[0] > 1 else (
                np.array([1.0]))
            noise = noise * math.sqrt(float(np.mean(np.abs(width[i0:i1]))))
        return signal * self._unit, noise * self._unit

    def snr_map(self, window=SNR_WINDOW, *, per="angstrom", max_memory=None,
                progress_bar=True):
        """
        Signal-to-noise ratio of each spaxel in a wavelength window.

        ``signal / noise`` of `signal_noise` (same conventions: by default
        the S/N per Angstrom of the mean flux density in 5300-5500
        Angstrom).  Computed chunk by chunk.

        Parameters
        ----------
        window : `~astropy.units.Quantity`, optional
            ``(lo, hi)`` wavelengths; default `~cubesfh.conventions.SNR_WINDOW`.
        per : {'angstrom', 'pixel'}, optional
            S/N per Angstrom (default) or per spectral pixel.
        max_memory : `~astropy.units.Quantity` or int, optional
            See `iter_chunks`.
        progress_bar : bool, optional
            Show a progress bar.

        Returns
        -------
        snr : `~numpy.ndarray`
            Shape ``(ny, nx)``, float; NaN where a spaxel has no good pixel.
        """
        signal, noise = self.signal_noise(window, per=per, max_memory=max_memory,
                                          progress_bar=progress_bar)
        return (signal / noise).to_value(u.dimensionless_unscaled)


def _read_muse_cube(*args, **kwargs):
    return Cube._from_file(muse.read_muse(*args, **kwargs))


_read_muse_cube.__doc__ = muse.read_muse.__doc__

with registry.delay_doc_updates(Cube):
    registry.register_reader("muse", Cube, _read_muse_cube)
    registry.register_writer("muse", Cube, muse.write_muse)
    registry.register_identifier("muse", Cube, muse.identify_muse)
