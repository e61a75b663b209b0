# Licensed under a 3-clause BSD style license - see LICENSE
"""
Data sets: a generated observation for examples, and real data for validation.

**Generated.**
:func:`make_example_observation` writes a MUSE-format cube (PRIMARY + DATA +
STAT, ESO header keywords, celestial WCS and AWAV spectral axis) and five
drizzled-WFC3-format images (PRIMARY + SCI with PHOTFLAM/PHOTPLAM and their own
WCS) of a small galaxy built from the shipped template library: an old,
metal-rich bulge, an intermediate-age disc and young spiral-arm bands, with a
rotating velocity field and a dispersion map. The full forward model with dust,
nebular emission and chemical evolution lives in :mod:`cubesfh.synthesis`.

**Real: the brightest cluster galaxy of Abell 478.** The ``mpdaf`` 3.6 wheel
on PyPI ships, as test data, a 40 x 40 spaxel cut-out of an ESO-pipeline MUSE
cube of the Abell 478 BCG (z ~ 0.086; DATA, STAT, DQ) and a drizzled WFPC2
F814W image of the same field. :func:`fetch_mpdaf_a478` downloads that wheel
once with pip (nothing of mpdaf is installed or imported) and extracts the two
files into a cache directory; :func:`read_mpdaf_a478` reads them into a
`~cubesfh.Cube` and a `~cubesfh.HSTImage`. :func:`centroid_offset` measures the
HST-MUSE offset independently of :func:`cubesfh.registration.register`, and
:func:`apply_k_correction` applies a factor from
:func:`~cubesfh.photometry.k_correction` to an image.
"""

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy import constants as const
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS

from ._spectral import gaussian_smooth, rebin_flux_conserving
from .conventions import HST_BANDS
from .lsf import FWHM_TO_SIGMA, muse_lsf_fwhm
from .utils import atomic_write
from .utils._fetch import pip_download
from .utils.exceptions import CubeSFHError

__all__ = [
    "A478_PSF_KEYWORD",
    "MPDAF_MEMBERS",
    "MPDAF_VERSION",
    "ExampleObservation",
    "apply_k_correction",
    "broaden_and_shift",
    "centroid_offset",
    "default_cache_dir",
    "fetch_mpdaf_a478",
    "make_example_observation",
    "read_mpdaf_a478",
]

log = logging.getLogger(__name__)

C_KMS = const.c.to_value(u.km / u.s)

#: Inverse sensitivities (erg/s/cm2/A per e-/s) of the WFC3/UVIS bands, rounded
#: from the 2020 UVIS2 calibration; the generated images carry them as PHOTFLAM.
PHOTFLAM = {"F275W": 3.2e-18, "F336W": 1.3e-18, "F438W": 6.8e-19, "F555W": 1.9e-19,
            "F814W": 1.5e-19}
PHOTPLAM = {"F275W": 2709.7, "F336W": 3354.5, "F438W": 4326.2, "F555W": 5308.4,
            "F814W": 8039.1}

MUSE_WAVE0 = 4749.72  # first pixel of a nominal-mode MUSE cube (A)
MUSE_DWAVE = 1.25
MUSE_WAVE_MAX = 7100.0  # generated cubes stop here (A)
MUSE_SCALE = 0.2  # arcsec / spaxel
HST_SCALE = 0.04  # arcsec / pixel of drizzled WFC3/UVIS mosaics

#: Central sky position of the generated fields (arbitrary).
FIELD_CENTER = (170.0625, 12.9915)


@dataclass
class ExampleObservation:
    """Paths and truth of a generated observation."""

    cube_path: Path
    hst_paths: dict
    truth_path: Path
    truth: dict = field(default_factory=dict)


def broaden_and_shift(rest_wave, rest_flux, velocity, sigma, out_wave, *, template_fwhm,
                      lsf=muse_lsf_fwhm):
    """
    Observe rest-frame model spectra: broaden, redshift and resample to MUSE pixels.

    The model (resolution ``template_fwhm``) is convolved with a Gaussian of
    sigma^2 = (sigma_star lambda / c)^2 + sigma_LSF(lambda_obs)^2 - sigma_template^2,
    shifted by ``velocity`` (f_lambda divided by 1 + z so that the integrated
    flux is conserved) and rebinned flux-conservingly onto ``out_wave``.

    Parameters
    ----------
    rest_wave : `~astropy.units.Quantity`
        Uniform rest-frame wavelength grid of the models.
    rest_flux : `~numpy.ndarray`
        Model spectra, shape ``(n, n_pix)``.
    velocity, sigma : `~astropy.units.Quantity`
        Line-of-sight velocity and stellar dispersion of each spectrum, shape ``(n,)``.
    out_wave : `~astropy.units.Quantity`
        Observed-frame pixel centres.
    template_fwhm : `~astropy.units.Quantity`
        Resolution (FWHM) of the models.
    lsf : callable, optional
        Instrumental FWHM as a function of observed wavelength.

    Returns
    -------
    flux : `~numpy.ndarray`
        Shape ``(n, out_wave.size)``.
    """
    w = rest_wave.to_value(u.AA)
    v = np.atleast_1d(velocity.to_value(u.km / u.s))
    s = np.atleast_1d(sigma.to_value(u.km / u.s))
    z = v / C_KMS
    lam_obs = w[None, :] * (1 + z[:, None])
    sig_lsf = (lsf(lam_obs * u.AA).to_value(u.AA) * FWHM_TO_SIGMA) / (1 + z[:, None])
    sig_tmp = template_fwhm.to_value(u.AA) * FWHM_TO_SIGMA
    sig2 = (s[:, None] * w[None, :] / C_KMS) ** 2 + sig_lsf**2 - sig_tmp**2
    smoothed = gaussian_smooth(w, rest_flux, np.sqrt(np.clip(sig2, 0, None)))
    out = np.empty((v.size, out_wave.size))
    ow = out_wave.to_value(u.AA)
    for i in range(v.size):
        out[i] = rebin_flux_conserving(w * (1 + z[i]), smoothed[i] / (1 + z[i]), ow)
    return out


# ----------------------------------------------------------------------------
# File writers shared by make_example_observation and cubesfh.synthesis.mock
# ----------------------------------------------------------------------------

def _muse_wavelength(redshift=0.0):
    """
    Pixel centres of a generated MUSE cube, 4749.72-7098.5 A in 1.25 A steps.

    For a galaxy beyond ``700 km/s`` (the mocks' default systemic velocity)
    the range is stretched by the extra ``(1 + z)``, on the same pixel grid
    and inside MUSE's 4750-9350 A, so that it still holds the rest-frame
    4800-7000 A with margins.
    """
    stretch = (1.0 + redshift) / (1.0 + 700.0 / 299792.458)
    lo, hi = MUSE_WAVE0, MUSE_WAVE_MAX
    if stretch > 1.0 + 1e-9:
        lo = MUSE_WAVE0 + MUSE_DWAVE * np.floor(MUSE_WAVE0 * (stretch - 1.0) / MUSE_DWAVE)
        hi = min(9350.0, MUSE_WAVE_MAX * stretch)
    n = int((hi - lo) / MUSE_DWAVE)
    return (lo + MUSE_DWAVE * np.arange(n)) * u.AA


def _muse_wcs(shape, *, scale=MUSE_SCALE, center=FIELD_CENTER, crpix=None, wave0=MUSE_WAVE0):
    """
    3-D WCS (RA---TAN, DEC--TAN, AWAV in Angstrom) of a generated MUSE cube.

    ``crpix`` (1-based x, y) defaults to the middle of the ``(ny, nx)`` field;
    ``wave0`` is the first wavelength (Angstrom).
    """
    ny, nx = shape
    if crpix is None:
        crpix = ((nx - 1) / 2 + 1, (ny - 1) / 2 + 1)
    w3 = WCS(naxis=3)
    w3.wcs.ctype = ["RA---TAN", "DEC--TAN", "AWAV"]
    w3.wcs.cunit = ["deg", "deg", "Angstrom"]
    w3.wcs.crpix = [crpix[0], crpix[1], 1]
    w3.wcs.crval = [center[0], center[1], float(wave0)]
    w3.wcs.cd = np.diag([-scale / 3600, scale / 3600, MUSE_DWAVE])
    return w3


def _muse_data_header(w3):
    """
    Header cards of a 3-D WCS in the form written by the MUSE pipeline.

    A CD matrix (no PC/CDELT) and the wavelength axis in Angstrom
    (``CUNIT3 = 'Angstrom'``, ``CRVAL3`` and ``CD3_3`` in Angstrom), whatever
    unit WCSLIB has normalised the spectral axis to.
    """
    # read before copying or to_header(), which normalise the spectral axis to metres
    to_aa = u.Unit(w3.wcs.cunit[2]).to(u.AA)
    cd = np.array(w3.wcs.cd, dtype=float)
    crval3 = w3.wcs.crval[2] * to_aa
    hdr = w3.deepcopy().to_header()
    # astropy writes PC + CDELT; keep the CD form used by the MUSE pipeline
    for k in list(hdr):
        if k.startswith(("PC", "CDELT")):
            del hdr[k]
    hdr["CUNIT3"] = ("Angstrom", "Units of coordinate increment and value")
    hdr["CRVAL3"] = (crval3, "[Angstrom] Coordinate value at reference point")
    hdr["CD1_1"], hdr["CD2_2"], hdr["CD3_3"] = cd[0, 0], cd[1, 1], cd[2, 2] * to_aa
    hdr["CD1_2"], hdr["CD2_1"] = cd[0, 1], cd[1, 0]
    hdr["CD1_3"] = hdr["CD2_3"] = hdr["CD3_1"] = hdr["CD3_2"] = 0.0
    return hdr


def _write_muse_cube(path, data, stat, w3, *, psf_fwhm, object_name, truth_name,
                     extra_cards=(), overwrite=False):
    """
    Write a MUSE-format cube: PRIMARY (ESO keywords) + DATA + STAT.

    Parameters
    ----------
    path : `~pathlib.Path`
        Output file (written atomically).
    data, stat : `~numpy.ndarray`
        Flux and variance ``[wavelength, y, x]`` in 1e-20 erg/s/cm2/A per spaxel
        (and its square).
    w3 : `~astropy.wcs.WCS`
        From `_muse_wcs`.
    psf_fwhm : `~astropy.units.Quantity`
        Written as ``FWHM`` and ``PSFFWHM``.
    object_name, truth_name : str
        ``OBJECT`` and ``CSFHTRUE`` (name of the truth file).
    extra_cards : sequence of tuple, optional
        More ``(keyword, value, comment)`` cards for the primary header.
    overwrite : bool, optional
        Replace an existing file.
    """
    hdr = _muse_data_header(w3)
    ra0, dec0 = w3.wcs.crval[:2]
    prim = fits.PrimaryHDU()
    ph = prim.header
    ph["TELESCOP"] = "ESO-VLT-U4"
    ph["INSTRUME"] = "MUSE"
    ph["OBJECT"] = object_name
    ph["RA"], ph["DEC"] = ra0, dec0
    ph["FWHM"] = (psf_fwhm.to_value(u.arcsec), "[arcsec] PSF FWHM at 7000 A")
    ph["PSFFWHM"] = (psf_fwhm.to_value(u.arcsec), "[arcsec] PSF FWHM")
    ph["HIERARCH ESO DRS MUSE PIXTABLE WAVELENGTH"] = "AWAV"
    ph["CSFHTRUE"] = (truth_name, "truth file of this generated cube")
    for card in extra_cards:
        ph[card[0]] = tuple(card[1:]) if len(card) > 2 else card[1]
    dh = fits.ImageHDU(data, header=hdr, name="DATA")
    dh.header["BUNIT"] = "10**(-20)*erg/s/cm**2/Angstrom"
    sh = fits.ImageHDU(stat, header=hdr, name="STAT")
    sh.header["BUNIT"] = "(10**(-20)*erg/s/cm**2/Angstrom)**2"
    with atomic_write(path, overwrite=overwrite) as tmp:
        fits.HDUList([prim, dh, sh]).writeto(tmp)


def _hst_wcs(shape, *, scale=HST_SCALE, center=FIELD_CENTER, crpix=None):
    """North-up celestial WCS of a drizzled image; ``crpix`` defaults to the middle."""
    ny, nx = shape
    if crpix is None:
        crpix = ((nx - 1) / 2 + 1, (ny - 1) / 2 + 1)
    hw = WCS(naxis=2)
    hw.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    hw.wcs.crpix = [crpix[0], crpix[1]]
    hw.wcs.crval = [center[0], center[1]]
    hw.wcs.cd = np.diag([-scale / 3600, scale / 3600])
    return hw


def _write_hst_image(path, counts, hw, *, band, psf_fwhm, weight=None, extra_primary=(),
                     extra_sci=(), overwrite=False):
    """
    Write a drizzled-WFC3/UVIS-format image: PRIMARY + SCI (e-/s) [+ WHT].

    Parameters
    ----------
    path : `~pathlib.Path`
        Output file (written atomically).
    counts : `~numpy.ndarray`
        Count rates (e-/s) per pixel.
    hw : `~astropy.wcs.WCS`
        Celestial WCS (from `_hst_wcs`).
    band : str
        Filter; sets ``FILTER``, ``PHOTMODE``, ``PHOTFLAM`` and ``PHOTPLAM``.
    psf_fwhm : `~astropy.units.Quantity`
        Written as ``PSFFWHM``.
    weight : `~numpy.ndarray`, optional
        Drizzle weight map, written as ``WHT``.
    extra_primary, extra_sci : sequence of tuple, optional
        More ``(keyword, value[, comment])`` cards.
    overwrite : bool, optional
        Replace an existing file.
    """
    p = fits.PrimaryHDU()
    p.header["TELESCOP"] = "HST"
    p.header["INSTRUME"] = "WFC3"
    p.header["DETECTOR"] = "UVIS"
    p.header["FILTER"] = band
    p.header["PHOTMODE"] = f"WFC3 UVIS2 {band}"
    for card in extra_primary:
        p.header[card[0]] = tuple(card[1:]) if len(card) > 2 else card[1]
    s = fits.ImageHDU(counts.astype(np.float32), header=hw.to_header(), name="SCI")
    s.header["BUNIT"] = "ELECTRONS/S"
    s.header["PHOTFLAM"] = (PHOTFLAM[band], "inverse sensitivity, ergs/cm2/A/e-")
    s.header["PHOTPLAM"] = (PHOTPLAM[band], "Pivot wavelength (Angstroms)")
    s.header["PSFFWHM"] = (psf_fwhm.to_value(u.arcsec), "[arcsec] PSF FWHM")
    for card in extra_sci:
        s.header[card[0]] = tuple(card[1:]) if len(card) > 2 else card[1]
    hdus = [p, s]
    if weight is not None:
        hdus.append(fits.ImageHDU(weight.astype(np.float32), header=hw.to_header(),
                                  name="WHT"))
    with atomic_write(path, overwrite=overwrite) as tmp:
        fits.HDUList(hdus).writeto(tmp)


def _noise_coefficients(f_center, snr, *, floor=0.003):
    """
    Coefficients of the MUSE variance model var = a * max(flux, 0) + b.

    ``b = (floor * f_center)**2`` is a read-out and sky floor and ``a`` sets
    the S/N per Angstrom of a spaxel of mean flux ``f_center`` to ``snr``
    (S/N per 1.25 A pixel = snr * sqrt(1.25): a 1 A bin holds 0.8 pixels).
    """
    b = (floor * f_center) ** 2
    snr_pix = snr * np.sqrt(MUSE_DWAVE)
    a = max(f_center / snr_pix**2 - b / f_center, 0.0) if f_center > 0 else 1.0
    return a, b


def _gaussian_kernel_fft(image, fwhm_pix):
    """Convolve a 2-D image with a circular Gaussian (FFT, periodic padding avoided)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, fwhm_pix * FWHM_TO_SIGMA, mode="constant")


def _components(lib):
    """Rest-frame optical and SED spectra (per solar mass formed) of the three components."""
    binned = lib.binned()
    binned_sed = lib.binned(sed=True)
    ages = lib.age_bin_centers.to_value(u.Gyr)
    zi = {z: int(np.argmin(np.abs(lib.zh - z))) for z in (-0.4, 0.0, 0.4)}
    # bulge: all mass in the two oldest bins, [Z/H] = +0.4
    w_bulge = np.zeros(16)
    w_bulge[14:] = [0.3, 0.7]
    # disc: exponentially declining SFR (tau = 4 Gyr) over the last 12 Gyr, solar
    widths = np.diff(lib.age_bin_centers.to_value(u.Gyr))
    widths = np.append(widths, widths[-1])
    sfr = np.exp(-(12.0 - ages) / 4.0) * (ages < 12.0)
    w_disc = sfr * widths
    w_disc /= w_disc.sum()
    # arms: a young burst (< 100 Myr) on top of the disc, solar
    w_young = np.zeros(16)
    w_young[:4] = [0.2, 0.3, 0.3, 0.2]
    comps = {}
    for name, w, z in (("bulge", w_bulge, 0.4), ("disc", w_disc, 0.0), ("arms", w_young, 0.0)):
        comps[name] = (w @ binned[zi[z]], w @ binned_sed[zi[z]], w, lib.zh[zi[z]])
    return comps


def make_example_observation(directory, *, shape=(30, 30), seed=0, snr_center=40.0,
                             distance=10 * u.Mpc, muse_psf_fwhm=0.7 * u.arcsec,
                             hst_psf_fwhm=0.08 * u.arcsec, systemic_velocity=700 * u.km / u.s,
                             bands=HST_BANDS, overwrite=False):
    """
    Write a small MUSE cube and five HST images of a generated galaxy.

    Parameters
    ----------
    directory : str or `~pathlib.Path`
        Output folder (created).
    shape : tuple of int, optional
        Spatial shape ``(ny, nx)`` of the cube (0.2 arcsec spaxels).
    seed : int, optional
        Seed of the noise.
    snr_center : float, optional
        S/N per Angstrom at 5300-5500 A (rest) in the central spaxel.
    distance : `~astropy.units.Quantity`, optional
        Distance of the galaxy.
    muse_psf_fwhm, hst_psf_fwhm : `~astropy.units.Quantity`, optional
        Gaussian PSFs (the MUSE value is written as header keyword ``FWHM``... see
        :class:`~cubesfh.Cube` for the keywords read).
    systemic_velocity : `~astropy.units.Quantity`, optional
        Systemic line-of-sight velocity.
    bands : sequence of str, optional
        HST bands to write.
    overwrite : bool, optional
        Replace existing files.

    Returns
    -------
    obs : `ExampleObservation`
    """
    from .templates import TemplateLibrary, synthetic_photometry

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lib = TemplateLibrary.load()
    ny, nx = shape
    scale = 0.2  # arcsec / spaxel
    y, x = np.mgrid[0:ny, 0:nx]
    x0, y0 = (nx - 1) / 2, (ny - 1) / 2
    pa, incl = np.deg2rad(30.0), np.deg2rad(50.0)

    def geometry(xx, yy, pix_scale):
        dx, dy = (xx - x0_s) * pix_scale, (yy - y0_s) * pix_scale
        xm = dx * np.cos(pa) + dy * np.sin(pa)
        ym = (-dx * np.sin(pa) + dy * np.cos(pa)) / np.cos(incl)
        r = np.hypot(xm, ym)
        phi = np.arctan2(ym, xm)
        return xm, ym, r, phi

    x0_s, y0_s = x0, y0
    xm, ym, r, phi = geometry(x, y, scale)

    def component_maps(r, phi):
        bulge = np.exp(-7.67 * ((r / 0.8) ** 0.25 - 1)) * 0.02
        disc = np.exp(-r / 2.0)
        arm_phase = np.cos(2 * phi - 2.5 * np.log(np.maximum(r, 0.05)))
        arms = 0.15 * disc * np.clip(arm_phase, 0, None) ** 8 * (r > 0.8)
        return {"bulge": bulge, "disc": disc, "arms": arms}

    comps = _components(lib)
    # masses (M_sun per spaxel) -> flux: L_sun/A/M_sun * M / (4 pi D^2)
    lum_to_flux = (1 * u.solLum / (4 * np.pi * distance**2)).to_value(u.erg / u.s / u.cm**2)
    flux_unit = 1e-20 * u.erg / u.s / u.cm**2 / u.AA
    mass_scale = 4e6  # M_sun per spaxel at the disc centre
    maps = component_maps(r, phi)
    psf_pix = (muse_psf_fwhm.to_value(u.arcsec)) / scale
    maps = {k: _gaussian_kernel_fft(m, psf_pix) for k, m in maps.items()}

    # kinematics: arctan rotation curve, dispersion falling from the centre
    vmax, rt = 180.0, 1.0
    vrot = vmax * 2 / np.pi * np.arctan(r / rt)
    vel = systemic_velocity.to_value(u.km / u.s) + vrot * np.sin(incl) * np.cos(phi)
    sig = 40.0 + 80.0 * np.exp(-r / 0.8)

    wave = _muse_wavelength()
    n = ny * nx
    cube = np.zeros((n, wave.size))
    for name, (spec, _sed, _w, _zh) in comps.items():
        obs = broaden_and_shift(lib.wavelength, np.repeat(spec[None], n, axis=0).astype(float),
                                vel.ravel() * u.km / u.s, sig.ravel() * u.km / u.s, wave,
                                template_fwhm=lib.fwhm)
        cube += maps[name].ravel()[:, None] * obs
    cube *= mass_scale * lum_to_flux / flux_unit.to_value(u.erg / u.s / u.cm**2 / u.AA)

    # noise: variance = a * flux + b, scaled to the requested central S/N per A
    win = (wave.value > 5300 * (1 + 0.0023)) & (wave.value < 5500 * (1 + 0.0023))
    f_c = cube[np.ravel_multi_index((int(y0), int(x0)), shape), win].mean()
    a, b = _noise_coefficients(f_c, snr_center)
    var = a * np.clip(cube, 0, None) + b
    noisy = cube + rng.normal(size=cube.shape) * np.sqrt(var)
    data = noisy.T.reshape(wave.size, ny, nx).astype(np.float32)
    stat = var.T.reshape(wave.size, ny, nx).astype(np.float32)

    w3 = _muse_wcs(shape, scale=scale)
    cube_path = directory / "example_muse_cube.fits"
    _write_muse_cube(cube_path, data, stat, w3, psf_fwhm=muse_psf_fwhm,
                     object_name="cubesfh example galaxy", truth_name="example_truth.fits",
                     overwrite=overwrite)

    # HST images: 0.04 arcsec pixels over a slightly larger field
    hscale = HST_SCALE
    hn = int(np.ceil(max(ny, nx) * scale / hscale * 1.2))
    hy, hx = np.mgrid[0:hn, 0:hn]
    x0_s = y0_s = (hn - 1) / 2
    _, _, hr, hphi = geometry(hx, hy, hscale)
    hmaps = component_maps(hr, hphi)
    hmaps = {k: _gaussian_kernel_fft(m, hst_psf_fwhm.to_value(u.arcsec) / hscale)
             for k, m in hmaps.items()}
    area_ratio = (hscale / scale) ** 2  # masses above are per MUSE spaxel
    hst_paths = {}
    for band in bands:
        sb = np.zeros((hn, hn))
        for name, (_spec, sed, _w, _zh) in comps.items():
            f_band = synthetic_photometry(lib.sed_wavelength, sed, bands=(band,))[0]
            sb += hmaps[name] * f_band
        flam = sb * mass_scale * area_ratio * lum_to_flux  # erg/s/cm2/A per HST pixel
        counts = flam / PHOTFLAM[band]
        counts_noisy = counts + rng.normal(size=counts.shape) * (0.002 * counts.max() + 0.02
                                                               * np.sqrt(np.abs(counts)))
        hw = _hst_wcs((hn, hn), scale=hscale)
        path = directory / f"example_hst_{band.lower()}.fits"
        _write_hst_image(path, counts_noisy, hw, band=band, psf_fwhm=hst_psf_fwhm,
                         overwrite=overwrite)
        hst_paths[band] = path

    truth = {"velocity": vel, "sigma": sig, **{f"mass_{k}": m * mass_scale
                                               for k, m in maps.items()}}
    th = [fits.PrimaryHDU()]
    for k, v in truth.items():
        hdu = fits.ImageHDU(np.asarray(v, dtype=np.float32), header=w3.celestial.to_header(),
                            name=k.upper())
        hdu.header["BUNIT"] = {"velocity": "km/s", "sigma": "km/s"}.get(k, "solMass")
        th.append(hdu)
    truth_path = directory / "example_truth.fits"
    with atomic_write(truth_path, overwrite=overwrite) as tmp:
        fits.HDUList(th).writeto(tmp)
    return ExampleObservation(cube_path, hst_paths, truth_path, truth)


# --------------------------------------------------------------------------- real data:
# --------------------------------------------------------------------------- Abell 478 (mpdaf)

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
        From :func:`~cubesfh.photometry.k_correction`.

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
