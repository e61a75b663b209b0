# Licensed under a 3-clause BSD style license - see LICENSE
"""
A small generated observation in real file formats, for examples, the demo and tests.

:func:`make_example_observation` writes a MUSE-format cube (PRIMARY + DATA +
STAT, ESO header keywords, celestial WCS and AWAV spectral axis) and five
drizzled-WFC3-format images (PRIMARY + SCI with PHOTFLAM/PHOTPLAM and their own
WCS) of a small galaxy built from the shipped template library: an old,
metal-rich bulge, an intermediate-age disc and young spiral-arm bands, with a
rotating velocity field and a dispersion map. The full forward model with dust,
nebular emission and chemical evolution lives in :mod:`cubesfh.synthesis`.
"""

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

__all__ = ["ExampleObservation", "broaden_and_shift", "make_example_observation"]

C_KMS = const.c.to_value(u.km / u.s)

#: Inverse sensitivities (erg/s/cm2/A per e-/s) of the WFC3/UVIS bands, rounded
#: from the 2020 UVIS2 calibration; the generated images carry them as PHOTFLAM.
PHOTFLAM = {"F275W": 3.2e-18, "F336W": 1.3e-18, "F438W": 6.8e-19, "F555W": 1.9e-19,
            "F814W": 1.5e-19}
PHOTPLAM = {"F275W": 2709.7, "F336W": 3354.5, "F438W": 4326.2, "F555W": 5308.4,
            "F814W": 8039.1}

MUSE_WAVE0 = 4749.72  # first pixel of a nominal-mode MUSE cube (A)
MUSE_DWAVE = 1.25


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

    wave = (MUSE_WAVE0 + MUSE_DWAVE * np.arange(int((7100 - MUSE_WAVE0) / MUSE_DWAVE))) * u.AA
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
    b = (0.003 * f_c) ** 2  # read-out and sky floor
    # S/N per A = S/N per pixel / sqrt(1.25): a 1 A bin holds 0.8 pixels
    snr_pix = snr_center * np.sqrt(MUSE_DWAVE)
    a = max(f_c / snr_pix**2 - b / f_c, 0.0) if f_c > 0 else 1.0
    var = a * np.clip(cube, 0, None) + b
    noisy = cube + rng.normal(size=cube.shape) * np.sqrt(var)
    data = noisy.T.reshape(wave.size, ny, nx).astype(np.float32)
    stat = var.T.reshape(wave.size, ny, nx).astype(np.float32)

    ra0, dec0 = 170.0625, 12.9915  # arbitrary field
    w3 = WCS(naxis=3)
    w3.wcs.ctype = ["RA---TAN", "DEC--TAN", "AWAV"]
    w3.wcs.cunit = ["deg", "deg", "Angstrom"]
    w3.wcs.crpix = [x0 + 1, y0 + 1, 1]
    w3.wcs.crval = [ra0, dec0, wave[0].value]
    w3.wcs.cd = np.diag([-scale / 3600, scale / 3600, MUSE_DWAVE])
    hdr = w3.to_header()
    # astropy writes PC + CDELT; keep the CD form used by the MUSE pipeline
    for k in list(hdr):
        if k.startswith(("PC", "CDELT")):
            del hdr[k]
    hdr["CD1_1"], hdr["CD2_2"], hdr["CD3_3"] = -scale / 3600, scale / 3600, MUSE_DWAVE
    hdr["CD1_2"] = hdr["CD2_1"] = hdr["CD1_3"] = hdr["CD2_3"] = hdr["CD3_1"] = hdr["CD3_2"] = 0.0
    prim = fits.PrimaryHDU()
    ph = prim.header
    ph["TELESCOP"] = "ESO-VLT-U4"
    ph["INSTRUME"] = "MUSE"
    ph["OBJECT"] = "cubesfh example galaxy"
    ph["RA"], ph["DEC"] = ra0, dec0
    ph["FWHM"] = (muse_psf_fwhm.to_value(u.arcsec), "[arcsec] PSF FWHM at 7000 A")
    ph["PSFFWHM"] = (muse_psf_fwhm.to_value(u.arcsec), "[arcsec] PSF FWHM")
    ph["HIERARCH ESO DRS MUSE PIXTABLE WAVELENGTH"] = "AWAV"
    ph["CSFHTRUE"] = ("example_truth.fits", "truth file of this generated cube")
    dh = fits.ImageHDU(data, header=hdr, name="DATA")
    dh.header["BUNIT"] = "10**(-20)*erg/s/cm**2/Angstrom"
    sh = fits.ImageHDU(stat, header=hdr, name="STAT")
    sh.header["BUNIT"] = "(10**(-20)*erg/s/cm**2/Angstrom)**2"
    cube_path = directory / "example_muse_cube.fits"
    with atomic_write(cube_path, overwrite=overwrite) as tmp:
        fits.HDUList([prim, dh, sh]).writeto(tmp)

    # HST images: 0.04 arcsec pixels over a slightly larger field
    hscale = 0.04
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
        hw = WCS(naxis=2)
        hw.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        hw.wcs.crpix = [x0_s + 1, y0_s + 1]
        hw.wcs.crval = [ra0, dec0]
        hw.wcs.cd = np.diag([-hscale / 3600, hscale / 3600])
        p = fits.PrimaryHDU()
        p.header["TELESCOP"] = "HST"
        p.header["INSTRUME"] = "WFC3"
        p.header["DETECTOR"] = "UVIS"
        p.header["FILTER"] = band
        p.header["PHOTMODE"] = f"WFC3 UVIS2 {band}"
        s = fits.ImageHDU(counts_noisy.astype(np.float32), header=hw.to_header(), name="SCI")
        s.header["BUNIT"] = "ELECTRONS/S"
        s.header["PHOTFLAM"] = (PHOTFLAM[band], "inverse sensitivity, ergs/cm2/A/e-")
        s.header["PHOTPLAM"] = (PHOTPLAM[band], "Pivot wavelength (Angstroms)")
        s.header["PSFFWHM"] = (hst_psf_fwhm.to_value(u.arcsec), "[arcsec] PSF FWHM")
        path = directory / f"example_hst_{band.lower()}.fits"
        with atomic_write(path, overwrite=overwrite) as tmp:
            fits.HDUList([p, s]).writeto(tmp)
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
