# Licensed under a 3-clause BSD style license - see LICENSE
"""
A real MUSE cube and HST image for validating cubesfh: the brightest cluster
galaxy of Abell 478.

The ``mpdaf`` 3.6 wheel on PyPI ships, as test data, a 40 x 40 spaxel cut-out
of an ESO-pipeline MUSE cube of the Abell 478 BCG (z ~ 0.088; DATA, STAT, DQ)
and a drizzled WFPC2 F814W image of the same field.
:func:`fetch_mpdaf_a478` downloads that wheel once with pip (nothing of mpdaf
is installed or imported) and extracts the two files into a cache directory;
:func:`read_mpdaf_a478` reads them into a `~cubesfh.Cube` and a
`~cubesfh.HSTImage`. :func:`centroid_offset` measures the HST-MUSE offset
independently of :func:`cubesfh.registration.register` and
:func:`k_correction` gives the factor that turns the observed-frame F814W
photometry of a redshifted galaxy into the rest-frame F814W photometry the
network was trained on.
"""

import logging
import os
import zipfile
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from .photometry import k_correction
from .utils._fetch import pip_download
from .utils.exceptions import CubeSFHError

__all__ = [
    "A478_PSF_KEYWORD",
    "MPDAF_MEMBERS",
    "MPDAF_VERSION",
    "apply_k_correction",
    "centroid_offset",
    "default_cache_dir",
    "fetch_mpdaf_a478",
    "k_correction",
    "read_mpdaf_a478",
]

log = logging.getLogger(__name__)

#: mpdaf release whose wheel holds the data.
MPDAF_VERSION = "3.6"
#: Members of the wheel extracted: (cube, HST image).
MPDAF_MEMBERS = ("mpdaf/data/sdetect/minicube.fits", "mpdaf/data/sdetect/a478hst-cutout.fits")
#: Primary-header keyword of the cube used for its PSF FWHM: the median seeing
#: measured by the MUSE slow-guiding system on its guide star during the exposure.
A478_PSF_KEYWORD = "HIERARCH ESO OCS SGS FWHM MED"
#: PSF FWHM of the drizzled WFPC2 (WF, 0.1" pixels) F814W image.
WFPC2_F814W_PSF_FWHM = 0.18 * u.arcsec


def default_cache_dir():
    """
    Directory where the mpdaf test data are cached.

    Returns
    -------
    path : `~pathlib.Path`
        ``$CUBESFH_CACHE/mpdaf`` if that variable is set, else
        ``~/.cache/cubesfh/mpdaf``.
    """
    root = os.environ.get("CUBESFH_CACHE")
    root = Path(root) if root else Path.home() / ".cache" / "cubesfh"
    return root / "mpdaf"


def fetch_mpdaf_a478(cache_dir=None, *, timeout=600):
    """
    Download (once) and return the Abell 478 MUSE cube and WFPC2 F814W image.

    The ``mpdaf`` wheel (~60 MB) is fetched with
    ``python -m pip download --no-deps --only-binary=:all: mpdaf==3.6`` and only
    the two FITS files are extracted; later calls return the cached files
    without network access.

    Parameters
    ----------
    cache_dir : str or `~pathlib.Path`, optional
        Cache directory; default :func:`default_cache_dir`.
    timeout : float, optional
        Seconds allowed for the download.

    Returns
    -------
    cube_path, hst_path : `~pathlib.Path`
        The MUSE cube (``minicube.fits``) and the HST image
        (``a478hst-cutout.fits``).

    Raises
    ------
    CubeSFHError
        If pip cannot download the wheel (no access to the package index) or
        the wheel lacks the files.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths = tuple(cache / Path(m).name for m in MPDAF_MEMBERS)
    if all(p.is_file() for p in paths):
        return paths
    wheels = [pip_download("mpdaf", MPDAF_VERSION, "mpdaf-*.whl", cache, timeout=timeout)]
    with zipfile.ZipFile(wheels[0]) as zf:
        names = set(zf.namelist())
        for member, path in zip(MPDAF_MEMBERS, paths):
            if member not in names:
                msg = (f"{wheels[0].name} has no {member}; delete it from {cache} and "
                       f"fetch again.")
                raise CubeSFHError(msg)
            tmp = path.with_suffix(".part")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            tmp.replace(path)
    return paths


def read_mpdaf_a478(cube_path=None, hst_path=None, *, cache_dir=None, psf_fwhm=None):
    """
    Read the Abell 478 cube and F814W image (fetching them if needed).

    The cube's PSF FWHM comes from :data:`A478_PSF_KEYWORD` (0.845"); the
    WFPC2 image is built from its ``SCI`` extension with the WFPC2 F814W PSF
    FWHM (0.18"; `cubesfh.HSTImage.read` would give it the WFC3/UVIS default
    of 0.083"). The image is in DN/s (``COUNTS/S``) with the matching
    ``PHOTFLAM``.

    Parameters
    ----------
    cube_path, hst_path : str or `~pathlib.Path`, optional
        The files; default :func:`fetch_mpdaf_a478`.
    cache_dir : str or `~pathlib.Path`, optional
        Passed to :func:`fetch_mpdaf_a478`.
    psf_fwhm : `~astropy.units.Quantity`, optional
        Override the cube's PSF FWHM.

    Returns
    -------
    cube : `~cubesfh.Cube`
    hst : `~cubesfh.HSTImage`
        Band F814W, instrument WFPC2 (emits a `~cubesfh.CubeSFHWarning`
        saying the network was trained on WFC3/UVIS).
    """
    from .cube import Cube
    from .hst import HSTImage

    if cube_path is None or hst_path is None:
        fetched = fetch_mpdaf_a478(cache_dir)
        cube_path = cube_path or fetched[0]
        hst_path = hst_path or fetched[1]
    if psf_fwhm is None:
        value = fits.getheader(cube_path, 0).get(A478_PSF_KEYWORD)
        if value is None:
            msg = f"{cube_path} has no {A478_PSF_KEYWORD}; pass psf_fwhm=."
            raise CubeSFHError(msg)
        psf_fwhm = float(value) * u.arcsec
    cube = Cube.read(cube_path, psf_fwhm=psf_fwhm)
    with fits.open(hst_path) as hdul:
        sci = hdul["SCI"]
        head = sci.header
        rate = u.ct / u.s
        hst = HSTImage(np.asarray(sci.data, dtype=float), wcs=WCS(head), band="F814W",
                       unit=rate, instrument="WFPC2",
                       photflam=head["PHOTFLAM"] * u.erg / u.s / u.cm**2 / u.AA / rate,
                       photplam=head["PHOTPLAM"] * u.AA, psf_fwhm=WFPC2_F814W_PSF_FWHM,
                       meta=dict(hdul[0].header), allow_other_instrument=True,
                       filename=str(hst_path))
    return cube, hst


def _centroid(image, x0, y0, radius, n_iter=20):
    yy, xx = np.indices(image.shape, dtype=float)
    good = np.isfinite(image)
    for _ in range(n_iter):
        sel = good & ((xx - x0) ** 2 + (yy - y0) ** 2 <= radius**2)
        w = image[sel]
        x1, y1 = (w @ xx[sel]) / w.sum(), (w @ yy[sel]) / w.sum()
        if np.hypot(x1 - x0, y1 - y0) < 1e-4:
            break
        x0, y0 = x1, y1
    return x1, y1


def centroid_offset(cube, hst, *, radius=1.5 * u.arcsec, wavelength_range=None):
    """
    HST-MUSE offset from the light centroids of the galaxy in both images.

    An independent check of :func:`cubesfh.registration.register` (which
    cross-correlates whole images): the cube is collapsed over the part of the
    HST band it covers, weighted by the throughput; the HST image is
    convolved with a Gaussian to the cube's PSF; in each, the flux-weighted
    centroid inside ``radius`` is iterated (in the cube from its brightest
    spaxel, in the HST image from the cube's centroid), and the two centroids
    are compared on the sky.

    Parameters
    ----------
    cube : `~cubesfh.Cube`
    hst : `~cubesfh.HSTImage`
    radius : `~astropy.units.Quantity`, optional
        Radius of the centroiding aperture.
    wavelength_range : `~astropy.units.Quantity`, optional
        Observed range collapsed; default: where the band's throughput is
        above 1 per cent of its peak, clipped to the cube.

    Returns
    -------
    offset : dict
        ``dra`` (dRA cos Dec) and ``ddec`` (`~astropy.units.Quantity` arcsec,
        HST minus MUSE), ``muse_sky`` and ``hst_sky``
        (`~astropy.coordinates.SkyCoord` centroids).
    """
    from astropy.convolution import Gaussian2DKernel, convolve_fft

    from .templates import load_filter

    filt = load_filter(hst.band, "WFPC2" if hst.instrument == "WFPC2" else "WFC3/UVIS")
    wave = cube.wavelength.to_value(u.AA)
    thr = np.interp(wave, filt.wavelength.to_value(u.AA), filt.throughput, left=0, right=0)
    use = thr > 0.01 * filt.throughput.max()
    if wavelength_range is not None:
        lo, hi = wavelength_range.to_value(u.AA)
        use &= (wave >= lo) & (wave <= hi)
    idx = np.flatnonzero(use)
    data = np.asarray(cube.data[idx[0]:idx[-1] + 1], dtype=float)
    mask = ~np.isfinite(data)
    if cube.mask is not None:
        mask |= np.asarray(cube.mask[idx[0]:idx[-1] + 1], dtype=bool)
    w = (thr[idx] * wave[idx])[:, None, None] * ~mask
    muse = np.where(w.sum(0) > 0, (np.where(mask, 0, data) * w).sum(0) / w.sum(0), np.nan)

    scale_m = cube.spaxel_scale.to_value(u.arcsec)
    scale_h = hst.pixel_scale.to_value(u.arcsec)
    fwhm = np.sqrt(cube.psf_fwhm.to_value(u.arcsec) ** 2 - hst.psf_fwhm.to_value(u.arcsec) ** 2)
    kernel = Gaussian2DKernel(fwhm / 2.3548 / scale_h)
    himg = convolve_fft(np.nan_to_num(np.asarray(hst.data, dtype=float)), kernel,
                        allow_huge=True)
    r = radius.to_value(u.arcsec)
    out = {}
    y0, x0 = np.unravel_index(np.nanargmax(muse), muse.shape)
    x, y = _centroid(muse, float(x0), float(y0), r / scale_m)
    out["muse_sky"] = cube.celestial_wcs.pixel_to_world(x, y)
    # start on the HST image at the MUSE centroid (the HST field holds other galaxies)
    x0, y0 = hst.wcs.world_to_pixel(out["muse_sky"])
    x, y = _centroid(himg, float(x0), float(y0), 2 * r / scale_h)  # walk to the galaxy
    x, y = _centroid(himg, x, y, r / scale_h)
    out["hst_sky"] = hst.wcs.pixel_to_world(x, y)
    m, h = out["muse_sky"], out["hst_sky"]
    dra, ddec = m.spherical_offsets_to(h)
    out["dra"], out["ddec"] = dra.to(u.arcsec), ddec.to(u.arcsec)
    return out


def apply_k_correction(hst, factor):
    """
    Copy of an HST image whose calibration is multiplied by a K-correction.

    Parameters
    ----------
    hst : `~cubesfh.HSTImage`
    factor : float
        From :func:`k_correction`.

    Returns
    -------
    image : `~cubesfh.HSTImage`
        Same data and WCS; ``photflam`` (or, for images already in flux
        units, the data) scaled by ``factor``; ``meta['KCORR']`` records it.
    """
    import copy

    factor = float(factor)
    if not np.isfinite(factor) or factor <= 0:
        msg = f"The K-correction factor must be finite and positive; got {factor}."
        raise CubeSFHError(msg)
    out = copy.copy(hst)
    out.meta = dict(hst.meta, KCORR=factor)
    if getattr(hst, "photflam", None) is not None:
        out.photflam = hst.photflam * factor
    else:
        out.data = hst.data * factor
    return out
