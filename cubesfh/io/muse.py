# Licensed under a 3-clause BSD style license - see LICENSE
"""
Reader, writer and identifier for MUSE data cubes in FITS format.

The layout is the one written by the ESO MUSE pipeline (``DATACUBE_FINAL``)
and released by PHANGS-MUSE:

* ``PRIMARY``: header only (observation metadata; becomes ``Cube.meta``);
* ``DATA``: flux cube, FITS axes (x, y, wavelength), i.e. a NumPy array
  ``[wavelength, y, x]``; unit in ``BUNIT``; celestial WCS on axes 1-2 and a
  linear wavelength axis on axis 3 (``CTYPE3`` ``'AWAV'`` or ``'WAVE'``);
* ``STAT``: variance of ``DATA`` (unit ``BUNIT**2``; ``HDUCLAS3 = 'MSE'``), or its
  1-sigma error when ``HDUCLAS3 = 'RMSE'`` (squared on reading);
* ``DQ`` (optional): data-quality flags, non-zero = bad.

The functions here are registered with the astropy unified I/O registry as
the ``'muse'`` format of `~cubesfh.Cube` (by :mod:`cubesfh.cube`, which imports
this module; this module does not import it); call them through
``Cube.read(path)`` and ``cube.write(path)``.
"""

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.units import UnitsWarning
from astropy.wcs import WCS, FITSFixedWarning

from ..conventions import NORM_WINDOW
from ..utils import CubeSFHError, CubeSFHWarning, atomic_write, progress
from ..utils._fits import open_fits
from ..utils._io import FileExtension
from ..utils._memory import as_bytes, format_bytes

# This module knows nothing of `cubesfh.Cube` (cubesfh.cube imports it, never the
# reverse): read_muse returns the contents of the file as a `MuseFile`, which
# cubesfh.cube turns into a Cube, and write_muse only uses the cube's public
# attributes and its block reader.

__all__ = [
    "FLAMBDA",
    "PSF_FWHM_KEYWORDS",
    "USER_MASK_FLAG",
    "MuseFile",
    "identify_muse",
    "parse_flux_unit",
    "psf_fwhm_from_header",
    "read_muse",
    "write_muse",
]

log = logging.getLogger(__name__)

#: Physical type every cube unit must have: flux density per unit wavelength.
FLAMBDA = u.erg / u.s / u.cm**2 / u.AA

#: Header keywords holding the PSF FWHM in arcsec, in the order they are tried
#: (primary header first, then the ``DATA`` header).  ``PSFFWHM`` is what
#: :func:`write_muse` writes; ``FWHM`` is used by several survey releases;
#: ``SKY_RES`` is the ESO Phase 3 keyword for the spatial resolution of a cube.
PSF_FWHM_KEYWORDS = ("PSFFWHM", "FWHM", "SKY_RES")

#: DQ bit that :func:`write_muse` sets for pixels masked by the user
#: (``Cube(mask=...)``) rather than by the reduction.
USER_MASK_FLAG = 2**30

# PSF FWHM values outside this range (arcsec) are not a seeing and are ignored.
_PSF_PLAUSIBLE = (0.0, 10.0)

_FITS_SIGNATURE = b"SIMPLE  ="
_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"

_BITPIX_DTYPE = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}

# Structural keywords never copied from ``Cube.meta`` into the written primary header.
_STRUCTURAL = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|PCOUNT|GCOUNT|XTENSION|END|BSCALE|BZERO|BLANK)$")


# ----------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------

def _parse_unit_string(string):
    """Parse a unit string leniently: FITS first, then the generic format."""
    try:
        return u.Unit(string, format="fits")
    except ValueError:
        pass
    with warnings.catch_warnings():
        # 'erg/s/cm**2/Angstrom' has several slashes: valid, only discouraged.
        warnings.simplefilter("ignore", UnitsWarning)
        return u.Unit(string, parse_strict="raise")


def parse_flux_unit(bunit, *, what="BUNIT"):
    """
    Parse a MUSE flux unit string such as ``'10**(-20)*erg/s/cm**2/Angstrom'``.

    Strings in the FITS standard, in the generic astropy format (several
    slashes, ``cm2``, ``1e-20 erg/s/cm2/AA``) and with ``A`` meaning Angstrom
    (``'erg/s/cm2/A'``) are understood.

    Parameters
    ----------
    bunit : str or `~astropy.units.UnitBase`
        The unit (usually the ``BUNIT`` header value).
    what : str, optional
        Name of the quantity for error messages.

    Returns
    -------
    unit : `~astropy.units.UnitBase`
        A unit equivalent to erg s-1 cm-2 Angstrom-1.

    Raises
    ------
    CubeSFHError
        If the string cannot be parsed or is not a flux density per wavelength.
    """
    if isinstance(bunit, u.UnitBase):
        unit = bunit
    else:
        string = str(bunit).strip()
        unit = None
        candidates = [string]
        # 'A' is the ampere in every unit standard; in flux units it means Angstrom.
        fixed = re.sub(r"(?<![A-Za-z])A(?![A-Za-z])", "Angstrom", string)
        if fixed != string:
            candidates.append(fixed)
        for candidate in candidates:
            try:
                parsed = _parse_unit_string(candidate)
            except ValueError:
                continue
            unit = parsed
            if parsed.is_equivalent(FLAMBDA):
                break
        if unit is None:
            msg = (f"{what} = {string!r} is not a unit astropy can parse; write it as e.g. "
                   "'10**(-20)*erg/s/cm**2/Angstrom' (fix the header or pass unit=... "
                   "to Cube.read).")
            raise CubeSFHError(msg)
    if not unit.is_equivalent(FLAMBDA):
        msg = (f"{what} = {unit.to_string()!r} is not a flux density per unit wavelength "
               "(erg s-1 cm-2 Angstrom-1 per spaxel), which cubesfh needs; fix the header or "
               "pass the right unit=... to Cube.read (e.g. '10**(-20)*erg/s/cm**2/Angstrom').")
        raise CubeSFHError(msg)
    return unit


def _bunit_string(unit):
    """MUSE-style ``BUNIT`` string, e.g. ``'10**(-20)*erg/s/cm**2/Angstrom'``."""
    scale = unit.to(FLAMBDA)
    exponent = round(math.log10(scale)) if scale > 0 else None
    if exponent is not None and math.isclose(scale, 10.0**exponent, rel_tol=1e-12):
        if exponent == 0:
            return "erg/s/cm**2/Angstrom"
        return f"10**({exponent})*erg/s/cm**2/Angstrom"
    return unit.to_string("fits")


def _sigma_unit_factor(stat_bunit, unit):
    """Factor converting a ``STAT`` of 1-sigma errors (``RMSE``) to ``unit``."""
    string = str(stat_bunit).strip()
    try:
        sig_unit = _parse_unit_string(string)
    except (ValueError, CubeSFHError):
        sig_unit = None
    if sig_unit is None or not sig_unit.is_equivalent(unit):
        msg = (f"STAT has HDUCLAS3 = 'RMSE' (1-sigma errors) but BUNIT = {string!r} is not "
               f"the DATA unit {unit.to_string()!r}; the errors are taken in the DATA unit. "
               "Fix BUNIT in the STAT header.")
        warnings.warn(msg, CubeSFHWarning)
        return 1.0
    return float(sig_unit.to(unit))


#: Planes (around the middle of the cube) and spaxels (at most) sampled by
#: `_stat_looks_like_sigma`.
_SIGMA_TEST_PLANES = 101
_SIGMA_TEST_SPAXELS = 4000


def _stat_looks_like_sigma(data, stat):
    """
    Compare ``STAT`` with the noise measured in ``DATA`` itself.

    The DER_SNR estimate (Stoehr et al. 2008) of the pixel-to-pixel noise of
    a sample of spectra is set against ``sqrt(STAT)`` (STAT a variance) and
    ``STAT`` (STAT a 1-sigma error). Returns the median log10 ratios
    (noise / sqrt(STAT), noise / STAT), or `None` when too few spectra can be
    used. Reads at most `_SIGMA_TEST_PLANES` planes of at most
    `_SIGMA_TEST_SPAXELS` spaxels. The two readings can only be told apart
    when sigma is far from 1 in the DATA unit: the caller warns for sigma
    below about 0.25 or above about 4 (a sigma-valued STAT of a cube in
    1e-20 erg/s/cm2/A with sigma of 1-4 is not detected; only HDUCLAS3 can
    say so).
    """
    nlam, ny, nx = data.shape
    if nlam < 20:
        return None
    n = min(nlam, _SIGMA_TEST_PLANES)
    l0 = (nlam - n) // 2
    step = max(1, int(math.ceil(math.sqrt(ny * nx / _SIGMA_TEST_SPAXELS))))
    d = np.asarray(data[l0:l0 + n, ::step, ::step], dtype=float).reshape(n, -1)
    v = np.asarray(stat[l0:l0 + n, ::step, ::step], dtype=float).reshape(n, -1)
    with np.errstate(invalid="ignore"):
        good = np.all(np.isfinite(d), axis=0) & np.all(np.isfinite(v) & (v > 0), axis=0)
    if good.sum() < 5:
        return None
    d, v = d[:, good], v[:, good]
    noise = 1.482602 / math.sqrt(6.0) * np.median(
        np.abs(2.0 * d[2:-2] - d[:-4] - d[4:]), axis=0)
    level = np.median(v, axis=0)
    ok = (noise > 0) & (level > 0)
    if ok.sum() < 5:
        return None
    as_var = float(np.median(np.log10(noise[ok] / np.sqrt(level[ok]))))
    as_sig = float(np.median(np.log10(noise[ok] / level[ok])))
    return as_var, as_sig


def _variance_unit_factor(stat_bunit, unit):
    """Factor converting the ``STAT`` values to ``unit**2`` (1 for MUSE files)."""
    string = str(stat_bunit).strip()
    match = re.fullmatch(r"\((.*)\)\s*\*\*\s*\(?2\)?", string)
    try:
        if match:
            var_unit = parse_flux_unit(match.group(1), what="STAT BUNIT") ** 2
        else:
            var_unit = _parse_unit_string(string)
    except (ValueError, CubeSFHError):
        msg = (f"STAT BUNIT = {string!r} cannot be parsed; the variance is assumed to be in "
               f"({unit.to_string()})**2, as the MUSE pipeline writes it.")
        warnings.warn(msg, CubeSFHWarning)
        return 1.0
    if not var_unit.is_equivalent(unit**2) and (var_unit.is_equivalent(unit)
                                                or var_unit.is_equivalent(unit / u.AA)):
        # Older ESO MUSE pipeline versions write the STAT unit without squaring the
        # flux unit, e.g. '10**(-20)*erg/s/cm**2/Angstrom**2' (mpdaf reads these the
        # same way): the values are variances in (DATA unit)**2 with the same scale.
        log.info("STAT BUNIT %r is the legacy MUSE-pipeline form; the variance is taken "
                 "in (%s)**2", string, unit.to_string())
        return 1.0
    if not var_unit.is_equivalent(unit**2):
        msg = (f"STAT BUNIT = {string!r} is not the square of the DATA unit "
               f"{unit.to_string()!r}: STAT must hold the variance. Fix the STAT header.")
        raise CubeSFHError(msg)
    return float(var_unit.to(unit**2))


# ----------------------------------------------------------------------------
# PSF
# ----------------------------------------------------------------------------

def psf_fwhm_from_header(*headers):
    """
    Find the PSF FWHM of a cube in its FITS headers.

    The headers are searched in the order given (the reader passes the
    primary header, then the ``DATA`` header).  In each header the keywords
    of `PSF_FWHM_KEYWORDS` are tried in turn (``PSFFWHM``, ``FWHM``,
    ``SKY_RES``, all in arcsec), then the MUSE pipeline field spread function
    (``FSFMODE = 'MOFFAT1'`` with ``FSF00FWA`` + ``FSF00FWB`` * wavelength,
    evaluated at the centre of `~cubesfh.conventions.NORM_WINDOW`, 5400
    Angstrom).  The DIMM seeing (``ESO TEL AMBI FWHM``) is *not* used: it is
    not the resolution of the reduced cube.  Values outside 0-10 arcsec are
    ignored with a `~cubesfh.CubeSFHWarning`.

    Parameters
    ----------
    *headers : `~astropy.io.fits.Header`
        Headers to search.

    Returns
    -------
    fwhm : `~astropy.units.Quantity` or `None`
        The FWHM in arcsec, or `None` if no keyword was found.
    keyword : str or `None`
        The keyword the value came from.
    """
    for header in headers:
        if header is None:
            continue
        candidates = [(key, header.get(key)) for key in PSF_FWHM_KEYWORDS if key in header]
        if str(header.get("FSFMODE", "")).strip().upper() == "MOFFAT1" and (
                "FSF00FWA" in header and "FSF00FWB" in header):
            centre = float(np.mean(NORM_WINDOW.to_value(u.AA)))
            value = float(header["FSF00FWA"]) + float(header["FSF00FWB"]) * centre
            candidates.append((f"FSF00FWA/FSF00FWB at {centre:g} Angstrom", value))
        for key, value in candidates:
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if _PSF_PLAUSIBLE[0] < value < _PSF_PLAUSIBLE[1]:
                return value * u.arcsec, key
            msg = (f"header keyword {key} = {value!r} is not a plausible PSF FWHM in arcsec "
                   f"(expected {_PSF_PLAUSIBLE[0]}-{_PSF_PLAUSIBLE[1]}) and is ignored; pass "
                   "psf_fwhm=... (an angle Quantity) to Cube.read to set the PSF.")
            warnings.warn(msg, CubeSFHWarning)
    return None, None


# ----------------------------------------------------------------------------
# Identifier
# ----------------------------------------------------------------------------

def _is_fits_signature(first_bytes, name=""):
    if first_bytes.startswith(_FITS_SIGNATURE):
        return True
    compressed = first_bytes.startswith((_GZIP_MAGIC, _BZIP2_MAGIC))
    return compressed and ".fit" in str(name).lower()


def identify_muse(origin, path, fileobj, *args, **kwargs):
    """
    Identify a FITS file for the astropy I/O registry.

    Any FITS file (also gzip or bzip2 compressed) is identified; whether it
    holds a MUSE cube is checked by :func:`read_muse`, which explains what is
    wrong when it does not.

    Parameters
    ----------
    origin : {'read', 'write'}
        Registry origin.
    path : str or None
        File name.
    fileobj : file-like or None
        Open file.
    *args, **kwargs
        Ignored (registry signature).

    Returns
    -------
    bool
    """
    if fileobj is not None and hasattr(fileobj, "read"):
        position = fileobj.tell()
        try:
            first = fileobj.read(len(_FITS_SIGNATURE))
        finally:
            fileobj.seek(position)
        return _is_fits_signature(first, getattr(fileobj, "name", ""))
    if path is None:
        return False
    path = Path(path)
    if origin == "read" and path.is_file():
        with open(path, "rb") as handle:
            return _is_fits_signature(handle.read(len(_FITS_SIGNATURE)), path.name)
    return path.name.lower().endswith((".fits", ".fit", ".fts", ".fits.gz", ".fit.gz",
                                       ".fits.bz2"))


# ----------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------

def _describe_hdus(hdul):
    parts = []
    for index, hdu in enumerate(hdul):
        name = hdu.name or ("PRIMARY" if index == 0 else f"#{index}")
        if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
            parts.append(f"{name} (table)")
        elif hdu.header.get("NAXIS", 0) == 0:
            parts.append(f"{name} (no data)")
        else:
            naxis = hdu.header["NAXIS"]
            dims = " x ".join(str(hdu.header.get(f"NAXIS{i}", "?")) for i in range(naxis, 0, -1))
            parts.append(f"{name} ({naxis}-D image {dims})")
    return ", ".join(parts)


def _find_image(hdul, names):
    for name in names:
        if name and name.upper() in hdul:
            return hdul[name.upper()]
    return None


def _is_image(hdu):
    return isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU))


def _find_data_hdu(hdul, path):
    hdu = _find_image(hdul, ["DATA"])
    if hdu is None:
        cubes = [h for h in hdul if _is_image(h) and h.header.get("NAXIS", 0) == 3]
        names = {str(h.name).strip().upper() for h in cubes}
        if cubes and names <= {"STAT", "DQ", "ERROR", "VARIANCE", "QUALITY"}:
            msg = (f"{path} has no DATA (flux) extension: its 3-D images are "
                   f"{', '.join(sorted(names))} (variance / quality) only; give the full "
                   "MUSE cube file (extensions DATA, STAT[, DQ]).")
            raise CubeSFHError(msg)
        flux = [h for h in cubes
                if str(h.name).strip().upper() not in {"STAT", "DQ", "ERROR", "VARIANCE",
                                                       "QUALITY"}]
        if len(cubes) > 1 and len(flux) == 1:  # e.g. the flux in PRIMARY, then STAT
            cubes = flux
        if len(cubes) == 1:
            hdu = cubes[0]
            log.info("%s has no DATA extension; using the 3-D image in HDU %r", path,
                     hdu.name)
        elif len(cubes) > 1:
            msg = (f"{path} holds {len(cubes)} 3-D images ({_describe_hdus(hdul)}) but none "
                   "is named DATA, so which is the flux is unknown; set EXTNAME = 'DATA' on "
                   "the flux cube and EXTNAME = 'STAT' on the variance (and 'DQ' on the "
                   "quality flags) and read the file again.")
            raise CubeSFHError(msg)
    if hdu is None or not _is_image(hdu) or hdu.header.get("NAXIS", 0) != 3:
        msg = (f"{path} is not a data cube: Cube.read needs a 3-D image (a MUSE cube with "
               f"extensions DATA, STAT[, DQ]) but found {_describe_hdus(hdul)}. Give the path "
               "of a MUSE DATACUBE file (2-D HST images are read with HSTImage.read).")
        raise CubeSFHError(msg)
    return hdu


def _is_wavelength_ctype(value):
    return str(value or "").strip().upper().startswith(("AWAV", "WAVE"))


# How to reorder an array whose wavelength axis is FITS axis 1 or 2 so that it
# becomes FITS axis 3 (NumPy axis 0): (NumPy transpose, WCS axes for WCS.sub).
_REORDER = {1: ("(2, 1, 0)", "[3, 2, 1]"), 2: ("(1, 0, 2)", "[1, 3, 2]")}


def _check_spectral_header(header, path):
    naxis = int(header.get("NAXIS", 3))
    ctypes = {i: header.get(f"CTYPE{i}") for i in range(1, naxis + 1)}
    if not any(str(c or "").strip() for c in ctypes.values()):
        msg = (f"{path}: the DATA header has no WCS (no CTYPE1/2/3 keywords), so neither the "
               "sky position nor the wavelength of a pixel is known; cubesfh needs "
               "CTYPE1/2 = 'RA---TAN'/'DEC--TAN' and CTYPE3 = 'AWAV' with their CRVAL, CRPIX, "
               "CD and CUNIT keywords (copy them from the original MUSE cube).")
        raise CubeSFHError(msg)
    spectral = [i for i, c in ctypes.items() if _is_wavelength_ctype(c)]
    if spectral and spectral[0] != 3:
        i = spectral[0]
        numpy_order, wcs_axes = _REORDER[i]
        msg = (f"{path}: the wavelength axis is FITS axis {i} (CTYPE{i} = {ctypes[i]!r}, "
               f"NAXIS{i} = {header.get(f'NAXIS{i}')}), not axis 3: the cube is stored with "
               "its axes transposed, while cubesfh needs FITS axes (x, y, wavelength), i.e. "
               "a NumPy array [wavelength, y, x] as the MUSE pipeline writes it. Reorder "
               f"DATA and STAT: Cube(hdu.data.transpose{numpy_order}, "
               f"wcs=WCS(hdu.header).sub({wcs_axes}), unit=..., variance=...).write(...) "
               "(if only the header is wrong, fix its CTYPE/CRVAL/CRPIX/CD keywords).")
        raise CubeSFHError(msg)
    ctype3 = str(header.get("CTYPE3", "") or "").strip()
    if not ctype3:
        msg = (f"{path}: the DATA header has no spectral WCS (CTYPE1, CTYPE2 = "
               f"{ctypes.get(1)!r}, {ctypes.get(2)!r} but no CTYPE3), so the wavelengths are "
               "unknown; add CTYPE3 = 'AWAV', CUNIT3 = 'Angstrom', CRVAL3, CRPIX3 and CD3_3 "
               "(MUSE: 1.25 Angstrom per pixel) to the DATA header.")
        raise CubeSFHError(msg)
    if not _is_wavelength_ctype(ctype3):
        msg = (f"{path}: the third axis has CTYPE3 = {header.get('CTYPE3')!r}, not a "
               "wavelength axis; cubesfh needs CTYPE3 = 'AWAV' (air wavelength, the MUSE "
               "convention) or 'WAVE' (vacuum). Fix the header of the DATA extension.")
        raise CubeSFHError(msg)
    if not re.fullmatch(r"(AWAV|WAVE)(-[A-Z0-9]{3})?", ctype3):
        # WCSLIB only knows the upper-case 4-letter codes (plus an algorithm code such
        # as '-LOG'): 'WAVELENGTH' or 'awav' would give a WCS without a spectral axis.
        fixed = "AWAV" if ctype3.upper().startswith("AWAV") else "WAVE"
        msg = (f"{path}: CTYPE3 = {ctype3!r} is not a FITS spectral axis type (WCSLIB "
               f"knows 'AWAV' for air and 'WAVE' for vacuum wavelengths, upper case); set "
               f"CTYPE3 = {fixed!r} in the DATA header (and STAT).")
        raise CubeSFHError(msg)
    cunit3 = header.get("CUNIT3")
    unit = None
    if cunit3 is not None and str(cunit3).strip():
        try:
            unit = _parse_unit_string(str(cunit3).strip())
        except ValueError:
            unit = None
    if unit is None or not unit.is_equivalent(u.m):
        msg = (f"{path}: the wavelength axis is in unknown units (CUNIT3 = {cunit3!r}); "
               "cubesfh needs a length unit, e.g. CUNIT3 = 'Angstrom' (MUSE) or 'm'. Set "
               "CUNIT3 in the DATA header (CRVAL3 and CD3_3 must be in that unit).")
        raise CubeSFHError(msg)


def _warn_if_transposed(header, path):
    """Warn when the wavelength axis is much shorter than a spatial axis (an [x, y, lambda]
    array written with the header of a [lambda, y, x] cube)."""
    nlam = int(header.get("NAXIS3", 0))
    nspat = max(int(header.get("NAXIS1", 0)), int(header.get("NAXIS2", 0)))
    if 0 < nlam < nspat:
        msg = (f"{path}: the cube has {nlam} wavelength planes (NAXIS3) but {nspat} pixels "
               "along a spatial axis; a MUSE cube has thousands of planes. If the array was "
               "stored transposed ([x, y, wavelength] with the header of a [wavelength, y, x] "
               "cube), rewrite it as data.transpose(2, 1, 0) with the original header.")
        warnings.warn(msg, CubeSFHWarning)


def _build_wcs(header, path):
    _check_spectral_header(header, path)
    with warnings.catch_warnings():
        # Fixes of date and other non-WCS keywords are harmless here.
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, naxis=3)
        except Exception as exc:  # WCSLIB raises several exception types
            msg = (f"{path}: the DATA header has no usable WCS ({exc}); the cube needs "
                   "CTYPE1/2 = 'RA---TAN'/'DEC--TAN', CRPIX, CRVAL, CD (or PC + CDELT) and "
                   "CUNIT keywords.")
            raise CubeSFHError(msg) from exc
    step = (wcs.wcs.get_cdelt()[:, None] * wcs.wcs.get_pc())[2, 2]
    if not step > 0:
        step_aa = step * u.Unit(wcs.wcs.cunit[2]).to(u.AA)
        msg = (f"{path}: the wavelength decreases along the cube (step {step_aa:g} Angstrom "
               "per plane, from CD3_3 or CDELT3), while cubesfh needs "
               "increasing wavelengths as the MUSE pipeline writes them; reverse the planes "
               "of DATA and STAT (data[::-1]) and set CRVAL3 to the first wavelength, CRPIX3 "
               "= 1 and a positive CD3_3.")
        raise CubeSFHError(msg)
    return wcs


def _is_scaled(hdu):
    header = hdu.header
    if isinstance(hdu, fits.CompImageHDU):
        return True
    scaled = header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0
    return scaled or (header.get("BITPIX", -32) > 0 and "BLANK" in header)


def _compressed_file(path):
    with open(path, "rb") as handle:
        first = handle.read(3)
    return first.startswith((_GZIP_MAGIC, _BZIP2_MAGIC))


def _nbytes(hdu):
    shape = tuple(hdu.header[f"NAXIS{i}"] for i in range(hdu.header["NAXIS"], 0, -1))
    return int(np.prod(shape)) * abs(hdu.header["BITPIX"]) // 8, shape


@dataclass
class MuseFile:
    """
    Contents of a MUSE cube file, as read by :func:`read_muse`.

    ``Cube.read`` turns it into a `~cubesfh.Cube` (``Cube(data, wcs=wcs,
    unit=unit, variance=variance, dq=dq, psf_fwhm=psf_fwhm, meta=meta,
    noise=noise, max_memory=max_memory)``).

    Attributes
    ----------
    data, variance, dq : `~numpy.ndarray` or `None`
        ``[wavelength, y, x]`` arrays (memory maps when read lazily).
    wcs : `~astropy.wcs.WCS`
        3-D WCS of ``DATA``.
    unit : `~astropy.units.UnitBase`
        Flux unit.
    psf_fwhm : `~astropy.units.Quantity` or `None`
        PSF FWHM; ``psf_fwhm_source`` says where it came from.
    meta : `~astropy.io.fits.Header`
        Primary header.
    noise : `~astropy.units.Quantity`, str or `None`
        The ``noise=`` estimate for files without ``STAT``.
    max_memory : int
        Memory budget in bytes.
    filename : str
        The file.
    files : dict
        ``'data'``/``'variance'``/``'dq'`` -> `~cubesfh.utils._io.FileExtension`
        for lazily read arrays.
    """

    data: np.ndarray
    variance: np.ndarray | None
    dq: np.ndarray | None
    wcs: WCS
    unit: u.UnitBase
    psf_fwhm: u.Quantity | None
    psf_fwhm_source: str | None
    meta: fits.Header
    noise: object
    max_memory: int
    filename: str
    files: dict = field(default_factory=dict)


def read_muse(filename, *, psf_fwhm=None, noise=None, unit=None, memmap=True,
              max_memory=None):
    """
    Read a MUSE data cube (``DATA`` + ``STAT`` [+ ``DQ``]) from a FITS file.

    Call it as ``Cube.read(filename, ...)``; the keywords are the same.
    Called directly it returns the contents of the file (`MuseFile`), which
    ``Cube.read`` turns into a `~cubesfh.Cube`.

    Broken files are refused before anything is read, with the name of the
    file and what is wrong: an empty file, a file that is not FITS, a corrupt
    or truncated gzip/bzip2 file, and a truncated FITS file (the expected
    size, from the headers' data sizes, and the actual size are given).

    Parameters
    ----------
    filename : str, `~pathlib.Path` or file object
        FITS file as written by the ESO MUSE pipeline or released by
        PHANGS-MUSE (an open file is re-opened by name).
    psf_fwhm : `~astropy.units.Quantity`, optional
        PSF FWHM (angle).  Overrides the header (see
        :func:`psf_fwhm_from_header` for the keywords read).
    noise : `~astropy.units.Quantity` or ``'der_snr'``, optional
        Noise estimate to use when the file has no ``STAT`` extension: a
        constant 1-sigma per pixel in flux units, or ``'der_snr'`` for a
        per-spectrum DER_SNR estimate (see `~cubesfh.Cube`).  Without it a
        file lacking ``STAT`` is an error.  Ignored (with a warning) when the
        file has ``STAT``.
    unit : str or `~astropy.units.UnitBase`, optional
        Flux unit; overrides ``BUNIT`` (needed when the header has none or
        an unusable one).
    memmap : bool, optional
        If `True` (default) nothing is loaded: the arrays are memory-mapped
        and `~cubesfh.Cube.iter_chunks` reads blocks of rows from disk.  If
        `False` the whole cube is loaded into memory (only allowed when it
        fits in ``max_memory``).  Scaled (``BSCALE``/``BZERO``), tile
        compressed or gzip-compressed files cannot be memory-mapped; they
        are loaded when they fit in ``max_memory`` and refused otherwise.
    max_memory : `~astropy.units.Quantity` or int, optional
        Memory limit (bytes or an information Quantity such as ``2 * u.GB``)
        for in-memory loads; it also becomes ``cube.max_memory``.  Default
        `~cubesfh.cube.DEFAULT_MAX_MEMORY`.

    Returns
    -------
    contents : `MuseFile`
        (``Cube.read`` returns a `~cubesfh.Cube`.)

    Raises
    ------
    FileNotFoundError, IsADirectoryError
        If the file does not exist, or is a directory.
    CubeSFHError
        If the file is empty, not FITS, corrupt or truncated, is not a cube
        (or has no ``DATA``), has no WCS, no celestial or no wavelength axis
        or its axes in another order, a wavelength axis in unknown units, no
        ``BUNIT`` (and no ``unit=``), or no ``STAT`` extension and no
        ``noise=``.
    """
    if hasattr(filename, "read"):  # an open file: use its name (memory maps need one)
        filename = getattr(filename, "name", None)
        if not isinstance(filename, (str, os.PathLike)):
            msg = ("Cube.read needs a file name or an open file on disk, not an in-memory "
                   "file object: the cube is memory-mapped. Write it to disk first.")
            raise CubeSFHError(msg)
    limit = as_bytes(max_memory)
    hdul = open_fits(filename, what="MUSE cube", memmap=False)
    path = Path(hdul.filename() or Path(filename).expanduser())
    compressed = _compressed_file(path)

    with hdul:
        data_hdu = _find_data_hdu(hdul, path)
        primary = hdul[0].header.copy()
        data_header = data_hdu.header.copy()
        stat_name = str(data_header.get("ERRDATA", "STAT")).strip()
        dq_name = str(data_header.get("QUALDATA", "DQ")).strip()
        stat_hdu = _find_image(hdul, [stat_name, "STAT"])
        dq_hdu = _find_image(hdul, [dq_name, "DQ"])
        shape = _nbytes(data_hdu)[1]
        for label, hdu in (("STAT", stat_hdu), ("DQ", dq_hdu)):
            if hdu is not None and (not _is_image(hdu) or _nbytes(hdu)[1] != shape):
                got = _describe_hdus(fits.HDUList([hdu])) if _is_image(hdu) else "a table"
                msg = (f"{path}: the {label} extension ({got}) does not match DATA {shape}; "
                       f"{label} must be an image of the same shape. Fix or remove it.")
                raise CubeSFHError(msg)

        # --- WCS, units, PSF -------------------------------------------------------
        wcs = _build_wcs(data_header, path)
        _warn_if_transposed(data_header, path)
        if unit is None:
            bunit = data_header.get("BUNIT", primary.get("BUNIT"))
            if bunit is None or not str(bunit).strip():
                msg = (f"{path}: the DATA header has no BUNIT, so the flux unit is unknown; "
                       "pass it to Cube.read, e.g. unit='10**(-20)*erg/s/cm**2/Angstrom' for "
                       "MUSE pipeline cubes.")
                raise CubeSFHError(msg)
            unit = parse_flux_unit(bunit, what=f"{path.name}: BUNIT")
        else:
            unit = parse_flux_unit(unit, what="unit")
        var_factor = 1.0
        stat_class = (str(stat_hdu.header.get("HDUCLAS3", "")).strip().upper()
                      if stat_hdu is not None else "")
        # ESO data format: HDUCLAS3 = 'MSE' (variance) or 'RMSE' (1-sigma errors)
        stat_is_sigma = stat_class == "RMSE"
        sig_factor = 1.0
        if stat_is_sigma:
            sig_factor = (_sigma_unit_factor(stat_hdu.header["BUNIT"], unit)
                          if "BUNIT" in stat_hdu.header else 1.0)
            log.info("%s: STAT holds 1-sigma errors (HDUCLAS3 = 'RMSE'); they are squared "
                     "into variances", path)
        elif stat_hdu is not None and "BUNIT" in stat_hdu.header:
            var_factor = _variance_unit_factor(stat_hdu.header["BUNIT"], unit)

        psf_source = "psf_fwhm="
        if psf_fwhm is None:
            psf_fwhm, psf_source = psf_fwhm_from_header(primary, data_header)

        if data_header.get("CTYPE3", "").strip().upper().startswith("WAVE"):
            msg = (f"{path}: CTYPE3 = 'WAVE' means vacuum wavelengths, while cubesfh and its "
                   "templates use air wavelengths (MUSE: 'AWAV'); the wavelengths are used "
                   "as they are, which shifts fitted velocities by about +80 km/s. If the "
                   "cube is in fact in air, set CTYPE3 = 'AWAV' in the file.")
            warnings.warn(msg, CubeSFHWarning)

        if stat_hdu is None:
            named = "ERRDATA" in data_header and stat_name.upper() not in hdul
            if noise is None:
                if named:
                    msg = (f"{path} has no {stat_name} (variance) extension although the DATA "
                           f"header names it (ERRDATA = {stat_name!r}): the extension was "
                           f"removed or the file is incomplete ({path.stat().st_size} bytes); "
                           "use the complete file, or pass noise='der_snr' (or a 1-sigma "
                           "Quantity) to Cube.read to estimate the noise.")
                else:
                    msg = (f"{path} has no STAT (variance) extension, so the noise is unknown; "
                           "pass a noise estimate to Cube.read: noise=<Quantity> (1-sigma per "
                           "pixel, in flux units) or noise='der_snr' (estimated per spectrum).")
                raise CubeSFHError(msg)
            msg = (f"{path} has no STAT (variance) extension; the noise is the estimate "
                   f"noise={noise!r}, so S/N values and fit weights rest on it.")
            warnings.warn(msg, CubeSFHWarning)
        elif noise is not None:
            msg = f"{path} has a STAT extension; noise={noise!r} is ignored."
            warnings.warn(msg, CubeSFHWarning)
            noise = None

        # --- arrays ------------------------------------------------------------------
        hdus = {"data": data_hdu, "variance": stat_hdu, "dq": dq_hdu}
        lazy = memmap and not compressed and not stat_is_sigma and not any(
            _is_scaled(h) for h in hdus.values() if h is not None)
        if memmap and not lazy:
            reason = ("the file is compressed" if compressed
                      else "its STAT holds 1-sigma errors (HDUCLAS3 = 'RMSE'), squared in "
                           "memory" if stat_is_sigma
                      else "an extension is scaled (BSCALE/BZERO/BLANK) or tile-compressed")
        total = sum(_nbytes(h)[0] * (2 if _is_scaled(h) else 1)
                    for h in hdus.values() if h is not None)
        if not lazy and total > limit:
            if memmap:
                msg = (f"{path} cannot be memory-mapped because {reason}, and loading it "
                       f"needs {format_bytes(total)}, more than max_memory="
                       f"{format_bytes(limit)}. Uncompress it / rewrite it as float32 "
                       "(e.g. Cube.read(..., max_memory=...) then cube.write()) or pass a "
                       "larger max_memory= if you have the RAM.")
            else:
                msg = (f"memmap=False loads the whole cube ({format_bytes(total)}), more than "
                       f"max_memory={format_bytes(limit)}; use memmap=True (the default) or "
                       "pass a larger max_memory= if you have the RAM.")
            raise CubeSFHError(msg)
        if memmap and not lazy:
            log.info("%s: %s, so the cube (%s) is loaded into memory", path, reason,
                     format_bytes(total))

        arrays = {}
        files = {}
        for key, hdu in hdus.items():
            if hdu is None:
                arrays[key] = None
                continue
            if lazy:
                offset = hdu.fileinfo()["datLoc"]
                dtype = np.dtype(_BITPIX_DTYPE[hdu.header["BITPIX"]])
                arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=offset,
                                        shape=shape)
                files[key] = FileExtension(path, offset, dtype, shape)
            else:
                array = np.asarray(hdu.data)
                arrays[key] = array.astype(array.dtype.newbyteorder("="), copy=True)

    if stat_is_sigma:
        v = arrays["variance"]  # a private in-memory copy here (not memory-mapped)
        if v.dtype.kind != "f":
            v = v.astype(np.float32)
        np.square(v, out=v)  # in place: no second copy of a large cube
        if sig_factor != 1.0:
            v *= v.dtype.type(sig_factor**2)
        arrays["variance"] = v
    elif stat_hdu is not None and stat_class != "MSE":
        # no HDUCLAS3 to honour: compare STAT with the noise in DATA
        ratios = _stat_looks_like_sigma(arrays["data"], arrays["variance"])
        # noise measured in DATA agrees with STAT taken as sigma, not as a variance
        if ratios is not None and abs(ratios[1]) < 0.3 and abs(ratios[0]) > abs(ratios[1]) + 0.3:
            msg = (f"{path}: STAT looks like 1-sigma errors, not variances: the noise "
                   f"measured in DATA is {10**ratios[1]:.2f} x STAT but {10**ratios[0]:.2f} x "
                   f"sqrt(STAT) (no HDUCLAS3 says which). If STAT holds "
                   "errors, set HDUCLAS3 = 'RMSE' in its header (cubesfh then squares it); "
                   "as it is, the S/N and the binning are wrong.")
            warnings.warn(msg, CubeSFHWarning)

    if var_factor != 1.0:
        if lazy:
            msg = (f"{path}: STAT is in {stat_hdu.header['BUNIT']!r}, not the square of the "
                   "DATA unit; rescaling it needs the whole cube in memory. Read with "
                   "memmap=False or fix BUNIT in the STAT header.")
            raise CubeSFHError(msg)
        arrays["variance"] = arrays["variance"] * var_factor

    log.debug("read %s: shape %s, unit %s, lazy=%s", path, shape, unit, lazy)
    return MuseFile(data=arrays["data"], variance=arrays["variance"], dq=arrays["dq"],
                    wcs=wcs, unit=unit, psf_fwhm=psf_fwhm,
                    psf_fwhm_source=psf_source if psf_fwhm is not None else None,
                    meta=primary, noise=noise, max_memory=limit, filename=str(path),
                    files=files)


# ----------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------

def _wcs_header(wcs):
    """3-D WCS as MUSE-style header cards: CD matrix, wavelength in Angstrom."""
    wcs = wcs.deepcopy()
    wcs.wcs.set()
    header = wcs.to_header()
    for key in list(header.keys()):
        if re.fullmatch(r"(PC\d_\d|CDELT\d|CD\d_\d|MJDREF|LATPOLE|LONPOLE)", key):
            del header[key]
    cd = wcs.wcs.get_cdelt()[:, None] * wcs.wcs.get_pc()
    to_aa = u.Unit(wcs.wcs.cunit[2]).to(u.AA)
    cd[2] *= to_aa
    header["CRVAL3"] = wcs.wcs.crval[2] * to_aa
    header["CUNIT3"] = "Angstrom"
    for i in range(3):
        for j in range(3):
            header[f"CD{i + 1}_{j + 1}"] = cd[i, j]
    return header


def _image_header(extname, dtype, shape):
    bitpix = {"float32": -32, "float64": -64, "int16": 16, "int32": 32, "int64": 64,
              "uint8": 8}[np.dtype(dtype).name]
    return fits.Header([
        ("XTENSION", "IMAGE", "Image extension"),
        ("BITPIX", bitpix, "array data type"),
        ("NAXIS", 3, "number of array dimensions"),
        ("NAXIS1", shape[2], "x"),
        ("NAXIS2", shape[1], "y"),
        ("NAXIS3", shape[0], "wavelength"),
        ("PCOUNT", 0, "number of parameters"),
        ("GCOUNT", 1, "number of groups"),
        ("EXTNAME", extname, "extension name"),
    ])


def _writable_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.dtype(">f8") if dtype.itemsize > 4 else np.dtype(">f4")
    return np.dtype(">i4")


def write_muse(cube, filename, *, overwrite=False, max_memory=None, progress_bar=True):
    """
    Write a cube as a MUSE FITS file (``PRIMARY`` + ``DATA`` + ``STAT`` [+ ``DQ``]).

    Call it as ``cube.write(filename, ...)``.  The file is written plane by
    plane (never more than ``max_memory`` at a time) to a temporary file
    renamed into place at the end (`~cubesfh.utils.atomic_write`), so an
    interrupted write leaves no partial file.  :func:`read_muse` reads it
    back to the same data, variance, mask, unit, wavelengths, WCS and PSF.

    ``STAT`` is written when the cube has a variance; a cube with only a
    ``noise=`` estimate is written without ``STAT`` (pass ``noise=`` again
    when reading it).  ``DQ`` is written when the cube has DQ flags or a
    user mask; user-masked pixels get the flag `USER_MASK_FLAG`.  The PSF
    FWHM, when known, is stored as ``PSFFWHM`` (arcsec) in the primary
    header.

    Parameters
    ----------
    cube : `~cubesfh.Cube`
        The cube.
    filename : str or `~pathlib.Path`
        Output file.
    overwrite : bool, optional
        Replace an existing file.
    max_memory : `~astropy.units.Quantity` or int, optional
        Memory used per block of planes; default ``cube.max_memory``.
    progress_bar : bool, optional
        Show a progress bar.
    """
    limit = as_bytes(cube.max_memory if max_memory is None else max_memory)
    nlam, ny, nx = cube.shape

    primary = fits.PrimaryHDU()
    primary.header["EXTEND"] = True
    for card in fits.Header(cube.meta).cards if cube.meta is not None else []:
        if card.keyword and not _STRUCTURAL.match(card.keyword):
            primary.header.append(card, end=True)
    if cube.has_psf_fwhm:
        primary.header["PSFFWHM"] = (cube.psf_fwhm.to_value(u.arcsec), "[arcsec] PSF FWHM")

    bunit = _bunit_string(cube.unit)
    wcs_cards = _wcs_header(cube.wcs)
    extensions = [("DATA", cube.data, {"HDUCLAS2": "DATA", "BUNIT": bunit})]
    if cube.variance is not None:
        extensions.append(("STAT", cube.variance,
                           {"HDUCLAS2": "ERROR", "HDUCLAS3": "MSE",
                            "BUNIT": f"({bunit})**2"}))
    write_dq = cube.dq is not None or cube._user_mask is not None
    if write_dq:
        extensions.append(("DQ", None, {"HDUCLAS2": "QUALITY", "HDUCLAS3": "FLAG32BIT"}))

    with atomic_write(filename, overwrite=overwrite) as tmp:
        primary.writeto(tmp, overwrite=True)
        for extname, array, extra in extensions:
            dtype = np.dtype(">i4") if array is None else _writable_dtype(array.dtype)
            header = _image_header(extname, dtype, cube.shape)
            header["HDUCLASS"] = ("ESO", "class name (ESO format)")
            header["HDUDOC"] = ("DICD", "document with class description")
            header["HDUCLAS1"] = ("IMAGE", "image data")
            for key, value in extra.items():
                header[key] = value
            header["SCIDATA"] = "DATA"
            if cube.variance is not None:
                header["ERRDATA"] = "STAT"
            if write_dq:
                header["QUALDATA"] = "DQ"
            header.extend(wcs_cards, update=True)
            if extname == "DQ":
                header["COMMENT"] = (f"DQ bit {USER_MASK_FLAG} = pixel masked by the user "
                                     "(cubesfh)")
            # a block, its conversion to big-endian and the DQ/mask temporaries
            planes = max(1, int(limit // max(1, 3 * ny * nx * max(dtype.itemsize, 4))))
            blocks = range(0, nlam, planes)
            with fits.StreamingHDU(str(tmp), header) as stream:
                for l0 in progress(blocks, enabled=progress_bar, desc=f"writing {extname}"):
                    lam = slice(l0, min(nlam, l0 + planes))
                    if array is None:
                        block = cube._dq_block(lam)
                    else:
                        block = cube._read("data" if extname == "DATA" else "variance", lam)
                    stream.write(np.ascontiguousarray(block, dtype=dtype))
    log.info("wrote %s (%s)", filename, ", ".join(e[0] for e in extensions))
