# Licensed under a 3-clause BSD style license - see LICENSE
"""
Drizzled HST images in the five PHANGS-HST WFC3/UVIS bands.

:class:`HSTImage` reads a calibrated, drizzled image (``*_drc.fits`` /
``*_drz.fits`` or a PHANGS-HST mosaic), identifies its band and camera from
the header, and converts the count rates to flux density per pixel and to
surface brightness with the ``PHOTFLAM`` calibration:

.. math::

    f_\\lambda^{\\rm pix} = \\mathrm{PHOTFLAM} \\times C, \\qquad
    I_\\lambda = f_\\lambda^{\\rm pix} / \\Omega_{\\rm pix},

with :math:`C` the count rate (e-/s) in a pixel and :math:`\\Omega_{\\rm pix}`
the pixel solid angle from the WCS
(:func:`~astropy.wcs.utils.proj_plane_pixel_area`).
"""

import logging
import re
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_area

from .conventions import HST_BANDS
from .utils import positive_angle
from .utils._fits import open_fits
from .utils.exceptions import CubeSFHError, CubeSFHWarning

__all__ = [
    "DEFAULT_PSF_FWHM",
    "FLAM",
    "NATIVE_INSTRUMENT",
    "SB_UNIT",
    "HSTImage",
    "check_parity",
    "identify_filter",
    "identify_instrument",
]

log = logging.getLogger(__name__)

#: Flux density per unit wavelength, erg / (s cm2 AA).
FLAM = u.erg / u.s / u.cm**2 / u.AA

#: Surface brightness unit used throughout, erg / (s cm2 AA arcsec2).
SB_UNIT = FLAM / u.arcsec**2

#: The camera whose throughputs the bundled network was trained on.
NATIVE_INSTRUMENT = "WFC3/UVIS"

#: Default PSF FWHM of *drizzled* WFC3/UVIS images (0.04 arcsec pixels), used
#: when neither the header (``PSFFWHM`` / ``PSF_FWHM``) nor the ``psf_fwhm``
#: argument gives one. Derived from the pre-pixelation model FWHM of the WFC3
#: Instrument Handbook (section 6.6.1, Table 6.7: 0.067-0.077 arcsec at the
#: pivot wavelengths of these filters), broadened in quadrature by 0.038 arcsec
#: for the native-pixel response and the drizzle drop (two 0.04 arcsec top
#: hats, each equivalent to a Gaussian of FWHM 0.027 arcsec). The results,
#: 0.077-0.086 arcsec, agree with the ~0.08 arcsec quoted for the PHANGS-HST
#: mosaics (Lee et al. 2022). When matching to a MUSE PSF of 0.5-1 arcsec an
#: error of 0.01 arcsec here changes the matching kernel width by < 0.2 %.
DEFAULT_PSF_FWHM = {
    "F275W": 0.086 * u.arcsec,
    "F336W": 0.082 * u.arcsec,
    "F438W": 0.079 * u.arcsec,
    "F555W": 0.077 * u.arcsec,
    "F814W": 0.083 * u.arcsec,
}

# BUNIT spellings found in HST products (upper-cased, blanks removed).
_RATE_BUNITS = {
    "ELECTRONS/S": u.electron / u.s,
    "ELECTRONS/SEC": u.electron / u.s,
    "ELECTRON/S": u.electron / u.s,
    "ELECTRON/SEC": u.electron / u.s,
    "E-/S": u.electron / u.s,
    "E/S": u.electron / u.s,
    "COUNTS/S": u.count / u.s,
    "COUNTS/SEC": u.count / u.s,
    "COUNT/S": u.count / u.s,
    "CPS": u.count / u.s,
    "DN/S": u.DN / u.s,
    "DN/SEC": u.DN / u.s,
}
_RATE_REFERENCE = (u.electron / u.s, u.count / u.s, u.DN / u.s, u.adu / u.s, u.ph / u.s)

_FILTER_KEYS = ("FILTER", "FILTER1", "FILTER2", "FILTNAM1", "FILTNAM2")
_FILTER_TOKEN = re.compile(r"^F[A-Z]?\d{3,4}[A-Z]{1,2}$")  # F555W, F1042M, FQ387N
_NO_FILTER = re.compile(r"^(CLEAR.*|N/A|NONE|)$")
_PSF_KEYS = ("PSFFWHM", "PSF_FWHM")


def _unit_kind(unit):
    """Classify a data unit: 'rate', 'flux' (per pixel) or 'sb' (per solid angle)."""
    if any(unit.is_equivalent(ref) for ref in _RATE_REFERENCE):
        return "rate"
    spectral = u.spectral_density(1 * u.AA)  # equivalence only needs the physical type
    for kind, ref in (("flux", FLAM), ("sb", FLAM / u.sr)):
        if unit.is_equivalent(ref):
            return kind
        # f_nu units need the spectral_density equivalency; test on a per-area copy
        area = u.sr if kind == "sb" else u.dimensionless_unscaled
        if (unit * area).is_equivalent(FLAM, equivalencies=spectral):
            return kind
    return None


def _photflam_per(photflam, unit):
    """Express PHOTFLAM per unit of the count-rate ``unit`` of the data.

    Electron, count and DN rates are all "the rate PHOTFLAM refers to", so
    only the scale of the units (e.g. per second vs per kilosecond) matters.
    """
    for ref in _RATE_REFERENCE:
        if (photflam.unit * ref).is_equivalent(FLAM):
            value = (photflam * ref).to_value(FLAM)
            break
    else:
        msg = (f"photflam must be in erg / (s cm2 AA) per count rate (e.g. per e-/s); "
               f"got {photflam.unit}.")
        raise CubeSFHError(msg)
    base = next(ref for ref in _RATE_REFERENCE if unit.is_equivalent(ref))
    return value * unit.to(base) * FLAM / unit


def _parse_bunit(bunit):
    """Astropy unit for a BUNIT string, or `None` when it is not understood."""
    key = bunit.strip().upper().replace(" ", "")
    if key in _RATE_BUNITS:
        return _RATE_BUNITS[key]
    candidates = [bunit.strip()]
    # 'A' is the ampere for astropy; in an HST flux unit ('erg/s/cm2/A') it is Angstrom
    fixed = re.sub(r"(?<![A-Za-z])A(?![A-Za-z])", "Angstrom", candidates[0])
    if fixed != candidates[0]:
        candidates.append(fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", u.UnitsWarning)
        for candidate in candidates:
            for fmt in ("fits", "generic"):
                try:
                    unit = u.Unit(candidate, format=fmt)
                except ValueError:
                    continue
                if _unit_kind(unit) is not None:
                    return unit
    return None


def _lookup(key, *headers):
    for header in headers:
        if header is not None and key in header:
            value = header[key]
            if value is not None and not (isinstance(value, str) and not value.strip()):
                return value
    return None


def _photmode_tokens(photmode):
    if not photmode:
        return []
    return [tok for tok in re.split(r"[\s,]+", str(photmode).upper()) if tok]


def identify_instrument(*headers):
    """
    Camera of an HST image from ``INSTRUME``/``DETECTOR`` or ``PHOTMODE``.

    Parameters
    ----------
    *headers : `~astropy.io.fits.Header`
        Headers searched in order (e.g. science extension, then primary).

    Returns
    -------
    instrument : str or `None`
        ``'WFC3/UVIS'``, ``'WFC3/IR'``, ``'ACS/WFC'``, ``'ACS/HRC'``,
        ``'WFPC2'``, ... or `None` when the header says nothing.
    """
    instrume = _lookup("INSTRUME", *headers)
    detector = _lookup("DETECTOR", *headers)
    tokens = _photmode_tokens(_lookup("PHOTMODE", *headers))
    if instrume is None and tokens:
        instrume = tokens[0]
    if instrume is None:
        return None
    instrume = str(instrume).strip().upper()
    if detector is None and len(tokens) > 1 and tokens[0] == instrume:
        # 'WFC3 UVIS2 F555W', 'ACS WFC1 F814W': strip the chip number
        detector = re.sub(r"\d+$", "", tokens[1])
    if instrume == "WFPC2" or detector is None:
        return instrume
    detector = re.sub(r"\d+$", "", str(detector).strip().upper())
    return f"{instrume}/{detector}"


def identify_filter(*headers):
    """
    Filter name of an HST image from ``FILTER``, ``FILTER1/2``, ``FILTNAM1/2``
    or ``PHOTMODE`` (clear and empty slots ignored).

    Parameters
    ----------
    *headers : `~astropy.io.fits.Header`
        Headers searched (e.g. primary and science extension).

    Returns
    -------
    name : str or `None`
        The filter (upper case), or `None` if no filter keyword is present.

    Raises
    ------
    CubeSFHError
        If the keywords name more than one filter.
    """
    found = []
    for header in headers:
        if header is None:
            continue
        for key in _FILTER_KEYS:
            value = str(header.get(key, "")).strip().upper()
            # WFPC2 FILTER1/2 hold filter-wheel numbers (e.g. 38, 0): only names count
            if not _NO_FILTER.match(value) and _FILTER_TOKEN.match(value):
                found.append(value)
    if not found:
        for header in headers:
            if header is None:
                continue
            found += [t for t in _photmode_tokens(header.get("PHOTMODE")) if _FILTER_TOKEN.match(t)]
    names = sorted(set(found))
    if len(names) > 1:
        msg = (f"The header names several filters ({', '.join(names)}); pass band= to say "
               f"which of {HST_BANDS} this image is.")
        raise CubeSFHError(msg)
    return names[0] if names else None


def _parity(wcs):
    """
    +1 or -1: the sign of the determinant of the celestial pixel-to-(RA, Dec)
    matrix (0 if undefined). Axes stored as (Dec, RA) swap the sign back.
    """
    cel = wcs.celestial
    det = float(np.linalg.det(cel.pixel_scale_matrix))
    if not np.isfinite(det) or det == 0:
        return 0
    return int(np.sign(det)) * (-1 if cel.wcs.lng == 1 else 1)


def check_parity(cube_wcs, images):
    """
    Refuse HST images whose WCS is mirrored with respect to the cube's.

    Every sky image drawn with north up has east on the left (RA increasing to
    the left), so the celestial pixel-to-sky matrix (``CD``, or ``PC`` times
    ``CDELT``) of a drizzled HST image and of a MUSE cube has a negative
    determinant, whatever the rotation. An image whose matrix has the other
    sign shows the sky mirrored: its WCS (usually a ``CD1_1`` or ``CDELT1`` of
    the wrong sign, or an array flipped without its WCS) is wrong, and a
    symmetric galaxy still correlates well with the cube, so registration
    would not notice.

    Parameters
    ----------
    cube_wcs : `~astropy.wcs.WCS`
        The cube's (celestial) WCS.
    images : dict or list of `HSTImage`

    Raises
    ------
    CubeSFHError
        If an image's parity differs from the cube's.
    """
    cube_parity = _parity(cube_wcs)
    items = images.values() if isinstance(images, dict) else images
    for image in items:
        parity = _parity(image.wcs)
        if cube_parity and parity and parity != cube_parity:
            name = image.filename or f"the {image.band} image"
            matrix = np.round(image.wcs.pixel_scale_matrix * 3600, 5).tolist()
            which = ("the HST image" if cube_parity < 0 else "the MUSE cube")
            msg = (f"The WCS of the {image.band} image ({name}) is mirrored with respect to the "
                   f"cube's: its pixel-to-sky matrix {matrix} arcsec/pixel has a "
                   f"{'positive' if parity > 0 else 'negative'} determinant, the cube's a "
                   f"{'positive' if cube_parity > 0 else 'negative'} one, so one of them shows "
                   f"the sky flipped (most likely {which}: check the sign of CD1_1/CDELT1, or "
                   "an array flipped without its WCS) and fix its header.")
            raise CubeSFHError(msg)


def _check_instrument(instrument, band, allow_other_instrument):
    if instrument is None:
        msg = (f"The header records no camera (INSTRUME/DETECTOR/PHOTMODE); assuming "
               f"{NATIVE_INSTRUMENT} for band {band}.")
        warnings.warn(msg, CubeSFHWarning)
        return NATIVE_INSTRUMENT
    if instrument == NATIVE_INSTRUMENT:
        return instrument
    if not allow_other_instrument:
        msg = (f"This {band} image is from {instrument}, not {NATIVE_INSTRUMENT}: its filter "
               f"throughput differs from the WFC3/UVIS {band} the model was trained on. Use a "
               f"WFC3/UVIS image, or pass allow_other_instrument=True to accept it anyway.")
        raise CubeSFHError(msg)
    msg = (f"Using a {band} image from {instrument} in place of {NATIVE_INSTRUMENT} {band}: "
           f"the bandpasses differ, so colours can be off by several per cent (more for "
           f"red or young populations, and for F275W/F336W).")
    warnings.warn(msg, CubeSFHWarning)
    return instrument


class HSTImage:
    """
    A drizzled HST image in one of the PHANGS-HST bands.

    Most users create it with :meth:`HSTImage.read`. The constructor takes
    the pieces directly, which is handy for simulated data.

    Parameters
    ----------
    data : array-like
        2-D image (may be a memory map). Its unit is ``unit``.
    wcs : `~astropy.wcs.WCS`
        Celestial WCS of ``data``.
    band : str
        One of `~cubesfh.conventions.HST_BANDS`.
    unit : `~astropy.units.Unit` or str, optional
        Unit of ``data``: a count rate (``electron / s``, the default, or
        ``count / s``), a flux density per pixel (``erg / (s cm2 AA)`` or
        ``Jy``) or a surface brightness (``erg / (s cm2 AA arcsec2)``,
        ``MJy / sr``). f_nu units are converted at the pivot wavelength.
    photflam : `~astropy.units.Quantity` or float, optional
        Inverse sensitivity, erg / (s cm2 AA) per unit count rate (a float is
        taken in erg / (cm2 AA) per electron). Required for count-rate data.
    photplam : `~astropy.units.Quantity` or float, optional
        Pivot wavelength (a float is taken in Angstrom). Required for f_nu
        units; otherwise informative.
    instrument : str, optional
        Camera, e.g. ``'WFC3/UVIS'`` (default).
    psf_fwhm : `~astropy.units.Quantity` or float, optional
        PSF FWHM (a float is taken in arcsec). Default
        ``DEFAULT_PSF_FWHM[band]``.
    error : array-like, optional
        1-sigma uncertainty of ``data`` in the same unit.
    mask : array-like of bool, optional
        `True` for pixels without valid data. NaN pixels are always invalid.
    weight : array-like, optional
        Drizzle weight map (``WHT``); pixels of zero weight have no data and
        are masked. May be a memory map (it is only read through cutouts).
    meta : dict-like, optional
        Header or other metadata.
    allow_other_instrument : bool, optional
        Accept a camera other than WFC3/UVIS (with a `CubeSFHWarning`).
    filename : str, optional
        File the image came from (used in messages).

    Attributes
    ----------
    data, wcs, band, unit, photflam, photplam, instrument, psf_fwhm, error, weight, meta
        As given (``wcs`` reduced to its celestial part).

    Raises
    ------
    CubeSFHError
        For an unknown band, a WCS without celestial axes, a shape mismatch,
        count-rate data without ``photflam``, or another camera without
        ``allow_other_instrument=True``.
    """

    def __init__(self, data, *, wcs, band, unit=u.electron / u.s, photflam=None,
                 photplam=None, instrument=NATIVE_INSTRUMENT, psf_fwhm=None, error=None,
                 mask=None, weight=None, meta=None, allow_other_instrument=False,
                 filename=None):
        if not isinstance(data, np.ndarray):
            data = np.asarray(data)
        if data.ndim != 2:
            msg = f"HST image data must be 2-D; got shape {data.shape}."
            raise CubeSFHError(msg)
        self.data = data
        self.filename = filename
        self.meta = meta if meta is not None else {}

        if not isinstance(wcs, WCS) or not wcs.has_celestial:
            msg = ("The HST image has no celestial WCS (RA/Dec axes); it cannot be aligned "
                   "with the cube. Use a drizzled product with a TAN WCS.")
            raise CubeSFHError(msg)
        self.wcs = wcs.celestial
        if self.wcs.naxis != 2:
            msg = f"The HST image WCS must have 2 celestial axes; got {self.wcs.naxis}."
            raise CubeSFHError(msg)

        band = str(band).strip().upper()
        if band not in HST_BANDS:
            msg = (f"Unknown filter {band!r}: cubesfh uses the PHANGS-HST bands {HST_BANDS}. "
                   f"Pass band= with one of these if the header is wrong.")
            raise CubeSFHError(msg)
        self.band = band

        self.unit = u.Unit(unit)
        self._kind = _unit_kind(self.unit)
        if self._kind is None:
            msg = (f"Cannot use data in {self.unit}: give a count rate (electron / s), a flux "
                   f"density per pixel (erg / (s cm2 AA)) or a surface brightness "
                   f"(erg / (s cm2 AA arcsec2)) with unit=.")
            raise CubeSFHError(msg)

        if photflam is not None and not isinstance(photflam, u.Quantity):
            photflam = float(photflam) * FLAM / (u.electron / u.s)
        if photflam is not None and (not np.isfinite(photflam.value) or photflam.value <= 0):
            photflam = None
        if photflam is not None and self._kind == "rate":
            photflam = _photflam_per(photflam, self.unit)
        if self._kind == "rate" and photflam is None:
            msg = (f"No PHOTFLAM calibration for this {band} image in {self.unit}: supply "
                   f"photflam= (erg / (s cm2 AA) per e-/s), or use a calibrated drizzled "
                   f"product (_drc/_drz) whose header has PHOTFLAM.")
            raise CubeSFHError(msg)
        self.photflam = photflam

        if photplam is not None:
            photplam = u.Quantity(photplam, u.AA)
            if not np.isfinite(photplam.value) or photplam.value <= 0:
                photplam = None
        if photplam is None and self._kind in ("flux", "sb") and not (
                self.unit.is_equivalent(FLAM) or self.unit.is_equivalent(SB_UNIT)):
            name = filename or f"this {band} image"
            msg = (f"{name} is in {self.unit} (f_nu), which is converted to f_lambda at the "
                   "pivot wavelength, but PHOTPLAM is missing; supply photplam= (Angstrom) "
                   f"for {band}.")
            raise CubeSFHError(msg)
        self.photplam = photplam

        self.instrument = _check_instrument(
            None if instrument is None else str(instrument).upper(), band,
            allow_other_instrument)

        self.psf_fwhm = (DEFAULT_PSF_FWHM[band] if psf_fwhm is None
                         else positive_angle(psf_fwhm, "psf_fwhm", example="0.08 * u.arcsec"))

        if error is not None:
            error = np.asarray(error)
            if error.shape != data.shape:
                msg = f"error has shape {error.shape}, data {data.shape}; they must match."
                raise CubeSFHError(msg)
        self.error = error
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != data.shape:
                msg = f"mask has shape {mask.shape}, data {data.shape}; they must match."
                raise CubeSFHError(msg)
        self._mask = mask
        if weight is not None:
            if not isinstance(weight, np.ndarray):
                weight = np.asarray(weight)
            if weight.shape != data.shape:
                msg = f"weight has shape {weight.shape}, data {data.shape}; they must match."
                raise CubeSFHError(msg)
        self.weight = weight

    # ------------------------------------------------------------------ reading
    @classmethod
    def read(cls, path, *, band=None, psf_fwhm=None, allow_other_instrument=False,
             photflam=None, photplam=None, unit=None, ext=None, error=None, memmap=True,
             force_band=False):
        """
        Read a drizzled HST image.

        The image is taken from the ``SCI`` extension if there is one, else
        from the primary HDU (or ``ext``). Calibration keywords are looked up
        in the science header first, then in the primary header.

        Parameters
        ----------
        path : str or `~pathlib.Path`
            FITS file.
        band : str, optional
            Band, one of `~cubesfh.conventions.HST_BANDS`. Default: from
            ``FILTER`` (WFC3), ``FILTER1``/``FILTER2`` (ACS),
            ``FILTNAM1``/``FILTNAM2`` (WFPC2) or ``PHOTMODE``. A ``band``
            that contradicts the header is refused (`CubeSFHError`) unless
            ``force_band=True``.
        psf_fwhm : `~astropy.units.Quantity`, optional
            PSF FWHM. Default: header ``PSFFWHM``/``PSF_FWHM`` (arcsec), else
            `DEFAULT_PSF_FWHM`.
        allow_other_instrument : bool, optional
            Accept an image from a camera other than WFC3/UVIS (e.g. ACS/WFC
            or WFPC2 F814W), with a `CubeSFHWarning` about the throughput
            difference. Default `False`: such images raise `CubeSFHError`.
        photflam : `~astropy.units.Quantity` or float, optional
            Override or supply ``PHOTFLAM`` (erg / (s cm2 AA) per e-/s).
        photplam : `~astropy.units.Quantity` or float, optional
            Override or supply ``PHOTPLAM`` (Angstrom).
        unit : `~astropy.units.Unit` or str, optional
            Unit of the data when ``BUNIT`` is missing or not one of the HST
            count-rate units (``ELECTRONS/S``, ``COUNTS/S``). May be a flux
            density or surface brightness unit, in which case ``PHOTFLAM`` is
            not needed.
        ext : int or str, optional
            HDU holding the image, overriding the ``SCI``/primary choice.
        error : array-like or str or `~pathlib.Path`, optional
            1-sigma error image in the data unit, or a FITS file holding it.
            Default: the ``ERR`` extension when present. (``WHT`` is used
            only to mask pixels without data, ``WHT == 0``: its meaning
            depends on the drizzle ``final_wht_type``.)
        memmap : bool, optional
            Memory-map the file (default) so that large mosaics are not read
            into memory until a cutout is made.
        force_band : bool, optional
            Use ``band`` even when the header names another filter (with a
            `CubeSFHWarning`), e.g. for a header known to be wrong. Default
            `False`: a contradiction raises `CubeSFHError`, since an image
            in the wrong band corrupts every colour.

        Returns
        -------
        image : `HSTImage`

        Raises
        ------
        FileNotFoundError, IsADirectoryError
            If ``path`` does not exist, or is a directory.
        CubeSFHError
            An empty, non-FITS, corrupt or truncated file, missing
            ``PHOTFLAM``, ``EXPTIME = 0``, no celestial WCS, an unknown or
            ambiguous filter, a ``band`` that contradicts the header (without
            ``force_band=True``), unusable ``BUNIT``, or another camera
            without ``allow_other_instrument=True``.
        """
        path = Path(path).expanduser()
        if band is not None:
            band = str(band).strip().upper()
            if band not in HST_BANDS:
                msg = (f"Unknown band {band!r} for the HST image {path.name}: cubesfh uses the "
                       f"PHANGS-HST bands {', '.join(HST_BANDS)}; give one of these.")
                raise CubeSFHError(msg)
        # memmap=None, not True: astropy then still maps the file but also accepts scaled
        # (BSCALE/BZERO) images, which it refuses to read under memmap=True
        with open_fits(path, what="HST image", memmap=None if memmap else False) as hdul:
            primary = hdul[0].header
            hdu = cls._science_hdu(hdul, ext, path)
            sci = hdu.header
            data = hdu.data
            if data.ndim > 2:
                data = np.squeeze(data)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                wcs = WCS(sci, fobj=hdul)
            if not wcs.has_celestial:
                msg = (f"{path.name}[{hdu.name}] has no celestial WCS (CTYPE RA---TAN / "
                       f"DEC--TAN); use a drizzled product, which carries one.")
                raise CubeSFHError(msg)
            weight = None
            if "WHT" in hdul and hdul["WHT"].data is not None \
                    and hdul["WHT"].data.shape == data.shape:
                weight = hdul["WHT"].data  # stays memory-mapped
            if error is None and "ERR" in hdul and hdul["ERR"].data is not None:
                error = hdul["ERR"].data
            elif isinstance(error, (str, Path)):
                error = fits.getdata(error)

        # unit
        if unit is None:
            bunit = _lookup("BUNIT", sci, primary)
            if bunit is None:
                msg = (f"{path.name} has no BUNIT; pass unit= (e.g. 'electron/s' for a "
                       f"drizzled count-rate image).")
                raise CubeSFHError(msg)
            unit = _parse_bunit(str(bunit))
            if unit is None:
                msg = (f"{path.name} has BUNIT={bunit!r}, which cubesfh cannot interpret: "
                       f"expected ELECTRONS/S or COUNTS/S (drizzled count rates). If the data "
                       f"are in another unit, say which with unit= (a flux density per pixel "
                       f"or a surface brightness are accepted; total counts must first be "
                       f"divided by the exposure time).")
                raise CubeSFHError(msg)
        unit = u.Unit(unit)

        # band and camera
        try:
            header_filter = identify_filter(primary, sci)
        except CubeSFHError:
            if band is None:
                raise
            header_filter = None  # the user said which band it is
        if band is None:
            if header_filter is None:
                msg = (f"No filter keyword (FILTER, FILTER1/2, FILTNAM1/2, PHOTMODE) in "
                       f"{path.name}; pass band= (one of {HST_BANDS}).")
                raise CubeSFHError(msg)
            band = header_filter
        elif header_filter is not None and header_filter != band:
            if not force_band:
                msg = (f"band={band!r} was given but the header of {path.name} says "
                       f"{header_filter} (FILTER/FILTER1/FILTER2/PHOTMODE keywords): an image "
                       f"in the wrong band corrupts the colours. Pass the {header_filter} "
                       "image for this band, or force_band=True (--force-band) if the header "
                       "is wrong.")
                raise CubeSFHError(msg)
            msg = (f"band={band!r} was given but the header of {path.name} says "
                   f"{header_filter}; using {band} (force_band=True).")
            warnings.warn(msg, CubeSFHWarning)
        instrument = identify_instrument(sci, primary)

        exptime = _lookup("EXPTIME", primary, sci)
        if exptime is None:
            exptime = _lookup("TEXPTIME", primary, sci)
        try:
            exptime = None if exptime is None else float(exptime)
        except (TypeError, ValueError):
            exptime = None
        if exptime is not None and not exptime > 0:
            msg = (f"{path.name} has EXPTIME = {exptime:g} s: the {band} image has no exposure, "
                   "so its count rates are not data; use the drizzled product of an exposed "
                   "visit, or leave the band out.")
            raise CubeSFHError(msg)

        # calibration
        if photflam is None:
            photflam = _lookup("PHOTFLAM", sci, primary)
        if photflam is not None and not isinstance(photflam, u.Quantity):
            photflam = float(photflam) * FLAM / (u.electron / u.s)
        if photplam is None:
            photplam = _lookup("PHOTPLAM", sci, primary)
        if photplam is not None:
            photplam = u.Quantity(photplam, u.AA)
        if psf_fwhm is None:
            value = _lookup("PSFFWHM", sci, primary) or _lookup("PSF_FWHM", sci, primary)
            if value is not None:
                psf_fwhm = float(value) * u.arcsec

        if _unit_kind(unit) == "rate" and (photflam is None or not photflam.value > 0):
            msg = (f"{path.name} has no valid PHOTFLAM keyword: supply photflam= "
                   f"(erg / (s cm2 AA) per e-/s, from the HST calibration for {band}), or use "
                   f"a calibrated drizzled product (_drc/_drz) whose header has PHOTFLAM.")
            raise CubeSFHError(msg)

        meta = primary.copy()
        meta.extend(sci, unique=True, update=False)
        image = cls(data, wcs=wcs, band=band, unit=unit, photflam=photflam,
                    photplam=photplam, instrument=instrument, psf_fwhm=psf_fwhm,
                    error=error, weight=weight, meta=meta,
                    allow_other_instrument=allow_other_instrument, filename=str(path))
        log.info("Read %s: %s %s, %dx%d pixels of %.4f arcsec.", path.name, image.instrument,
                 image.band, data.shape[1], data.shape[0], image.pixel_scale.value)
        return image

    @staticmethod
    def _science_hdu(hdul, ext, path):
        if ext is not None:
            try:
                hdu = hdul[ext]
            except (KeyError, IndexError):
                msg = f"{path.name} has no extension {ext!r}; available: {[h.name for h in hdul]}."
                raise CubeSFHError(msg) from None
        elif "SCI" in hdul:
            n_sci = sum(str(h.name).strip().upper() == "SCI" for h in hdul)
            if n_sci > 1:
                msg = (f"{path.name} has {n_sci} SCI extensions, one per detector chip: it is "
                       "an un-drizzled exposure (_flt/_flc), whose pixels are distorted and "
                       "not on the sky grid; give the drizzled product (_drc/_drz, one SCI "
                       "extension) instead.")
                raise CubeSFHError(msg)
            hdu = hdul["SCI"]
        elif hdul[0].data is not None:
            hdu = hdul[0]
        else:
            hdu = next((h for h in hdul if h.is_image and h.data is not None), None)
            if hdu is None:
                msg = f"{path.name} contains no image data (no SCI extension or primary image)."
                raise CubeSFHError(msg)
        if hdu.data is None or np.squeeze(hdu.data).ndim != 2:
            shape = None if hdu.data is None else hdu.data.shape
            msg = f"{path.name}[{hdu.name}] does not hold a 2-D image (shape {shape}); pass ext=."
            raise CubeSFHError(msg)
        return hdu

    # -------------------------------------------------------------- properties
    @property
    def shape(self):
        """Shape of the image, ``(ny, nx)``."""
        return self.data.shape

    @property
    def mask(self):
        """Boolean array, `True` where the image has no valid data (NaN or ``WHT == 0``)."""
        bad = ~np.isfinite(self.data)
        if self.weight is not None:
            bad |= self.weight == 0
        if self._mask is not None:
            bad |= self._mask
        return bad

    @property
    def pixel_area(self):
        """Solid angle of a pixel at the reference point (`~astropy.units.Quantity`, arcsec2)."""
        return (proj_plane_pixel_area(self.wcs) * u.deg**2).to(u.arcsec**2)

    @property
    def pixel_scale(self):
        """Side of a square pixel of the same area (`~astropy.units.Quantity`, arcsec)."""
        return np.sqrt(self.pixel_area)

    @property
    def unit_kind(self):
        """``'rate'``, ``'flux'`` (per pixel) or ``'sb'`` (per solid angle)."""
        return self._kind

    def __repr__(self):
        return (f"<HSTImage {self.instrument} {self.band} shape={self.shape} "
                f"pixel_scale={self.pixel_scale:.4f} psf_fwhm={self.psf_fwhm:.3f}>")

    # ------------------------------------------------------------- conversions
    def _equivalencies(self):
        if self.photplam is None:
            return []
        return u.spectral_density(self.photplam)

    def surface_brightness_factor(self):
        """
        Factor converting ``data`` to surface brightness.

        Returns
        -------
        factor : `~astropy.units.Quantity`
            Scalar in ``SB_UNIT / unit``, so that
            ``data * factor`` is the surface brightness in erg / (s cm2 AA
            arcsec2). For count rates it is ``photflam / pixel_area``.
        """
        one = 1.0 * self.unit
        try:
            if self._kind == "rate":
                sb = one * self.photflam / self.pixel_area
            elif self._kind == "flux":
                sb = one.to(FLAM, equivalencies=self._equivalencies()) / self.pixel_area
            else:
                sb = (one * u.sr).to(FLAM, equivalencies=self._equivalencies()) / u.sr
        except u.UnitConversionError:
            msg = (f"Converting {self.unit} to f_lambda needs the pivot wavelength; pass "
                   f"photplam= (PHOTPLAM is missing from the header).")
            raise CubeSFHError(msg) from None
        return sb.to(SB_UNIT) / self.unit

    def to_surface_brightness(self):
        """
        Surface brightness of every pixel.

        For count rates :math:`I_\\lambda = C \\times \\mathrm{PHOTFLAM} /
        \\Omega_{\\rm pix}` with :math:`\\Omega_{\\rm pix}` from the WCS.

        Returns
        -------
        sb : `~astropy.units.Quantity`
            2-D, erg / (s cm2 AA arcsec2); NaN where `mask` is set.
        """
        factor = self.surface_brightness_factor()
        out = np.asarray(self.data, dtype=float) * factor.value
        out[self.mask] = np.nan
        return out * SB_UNIT

    def to_flux_density(self):
        """
        Flux density in every pixel, :math:`C \\times \\mathrm{PHOTFLAM}`.

        Returns
        -------
        flux : `~astropy.units.Quantity`
            2-D, erg / (s cm2 AA) per pixel; NaN where `mask` is set.
        """
        return (self.to_surface_brightness() * self.pixel_area).to(FLAM)

    # ----------------------------------------------------------------- cutouts
    def cutout(self, position, size, *, mode="partial"):
        """
        A new `HSTImage` holding a rectangular piece of this one.

        Only the piece is read from a memory-mapped file, so this is how
        large mosaics should be reduced before any processing.

        Parameters
        ----------
        position : tuple or `~astropy.coordinates.SkyCoord`
            Centre, as ``(x, y)`` pixel coordinates or a sky position.
        size : int, tuple or `~astropy.units.Quantity`
            ``(ny, nx)`` in pixels or angular units, as for
            `~astropy.nddata.Cutout2D`.
        mode : {'partial', 'trim', 'strict'}, optional
            As for `~astropy.nddata.Cutout2D`; with ``'partial'`` the parts
            outside the image are NaN (and masked).

        Returns
        -------
        cutout : `HSTImage`
        """
        # integer images cannot hold NaN; the padding is masked either way
        fill = np.nan if np.issubdtype(self.data.dtype, np.floating) else 0
        cut = Cutout2D(self.data, position, size, wcs=self.wcs, mode=mode, fill_value=fill,
                       copy=True)
        ys, xs = cut.slices_original
        yc, xc = cut.slices_cutout
        mask = np.ones(cut.shape, dtype=bool)
        mask[yc, xc] = False if self._mask is None else self._mask[ys, xs]
        weight = None
        if self.weight is not None:
            weight = np.zeros(cut.shape)
            weight[yc, xc] = self.weight[ys, xs]
        error = None
        if self.error is not None:
            error = np.full(cut.shape, np.nan)
            error[yc, xc] = self.error[ys, xs]
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.data = np.asarray(cut.data, dtype=float)
        new.wcs = cut.wcs
        new.error = error
        new._mask = mask
        new.weight = weight
        return new
