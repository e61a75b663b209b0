# Licensed under a 3-clause BSD style license - see LICENSE
"""
Tests of cubesfh.kinematics against spectra with known kinematics.

The "observed" spectra are made here by an independent forward model: a
library template is resampled onto a fine ln-lambda grid, convolved by brute
force with a Gaussian whose width combines the stellar dispersion and the
quadrature difference between the MUSE LSF (at the observed wavelength) and
the template resolution, shifted to the observed frame, sampled at the MUSE
1.25 A pixels and given Gaussian noise with a fixed seed.
"""

from types import SimpleNamespace

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS
from helpers import gaussian_broaden

from cubesfh.kinematics import (
    EMISSION_LINES,
    KinematicsFlag,
    emission_line_mask,
    fit_kinematics,
    fit_spectrum,
    log_rebin_spectra,
    prepare_templates,
    read_kinematics_maps,
)
from cubesfh.lsf import muse_lsf_fwhm
from cubesfh.templates import TemplateLibrary
from cubesfh.utils.exceptions import CubeSFHError, CubeSFHWarning

C_KMS = 299792.458
KMS = u.km / u.s
Z_SYS = 0.00243  # NGC 3627-like systemic redshift (cz ~ 728 km/s)
MUSE_WAVE = np.arange(4650.0, 7300.0, 1.25)  # MUSE sampling inside the template coverage
FLUX_UNIT = u.Unit("1e-20 erg / (s cm2 Angstrom)")


@pytest.fixture(scope="module")
def library():
    return TemplateLibrary.load()


def observe(wave, flux, *, velocity, sigma, snr=50.0, seed=0, lines=(), template_fwhm=2.5,
            lsf=muse_lsf_fwhm, z_sys=Z_SYS):
    """
    Mock MUSE spectrum of one template with known (velocity, sigma).

    ``velocity`` is relative to ``z_sys``: 1 + z = (1 + z_sys) (1 + velocity / c).
    ``lines`` is a list of (rest wavelength, peak / continuum, gas velocity, gas sigma)
    Gaussian emission lines added at the MUSE resolution.
    Returns wavelength (AA), flux and variance on MUSE_WAVE.
    """
    dv = 5.0
    ln_lam = np.arange(np.log(wave[0]), np.log(wave[-1]), dv / C_KMS)
    lam_rest = np.exp(ln_lam)
    fine = np.interp(lam_rest, wave, flux)
    z_tot = (1 + z_sys) * (1 + velocity / C_KMS) - 1
    lam_obs = lam_rest * (1 + z_tot)
    s_data = lsf(lam_obs * u.AA).to_value(u.AA) / lam_obs
    s_temp = template_fwhm / lam_rest
    inst2 = np.clip(s_data**2 - s_temp**2, 0, None) * (C_KMS / np.sqrt(8 * np.log(2))) ** 2
    fine = gaussian_broaden(fine, np.sqrt(sigma**2 + inst2), dv)
    obs = np.interp(MUSE_WAVE, lam_obs, fine)
    obs = obs / np.median(obs)
    for lam0, peak, v_gas, s_gas in lines:
        centre = lam0 * (1 + z_sys) * (1 + v_gas / C_KMS)
        s_inst = lsf(centre * u.AA).to_value(u.AA) / np.sqrt(8 * np.log(2))
        width = np.hypot(s_inst, centre * s_gas / C_KMS)
        obs = obs + peak * np.exp(-0.5 * ((MUSE_WAVE - centre) / width) ** 2)
    rng = np.random.default_rng(seed)
    err = np.abs(obs) / snr
    return obs + rng.normal(size=obs.size) * err, err**2


def _bins(spectra, variances):
    """A VoronoiBins-like object with Quantity attributes."""
    return SimpleNamespace(wavelength=MUSE_WAVE * u.AA,
                           spectra=np.array(spectra) * FLUX_UNIT,
                           variance=np.array(variances) * FLUX_UNIT**2)


# ----------------------------------------------------------------------------- building blocks


def test_log_rebin_conserves_flux_density_and_propagates_variance():
    from ppxf import ppxf_util

    rng = np.random.default_rng(1)
    lam = 4800.0 + 1.25 * np.arange(1761)
    flux = 5.0 + np.sin(lam / 30.0)
    var = np.full(lam.size, 0.04)
    spec = log_rebin_spectra(lam * u.AA, flux, var, fit_range=(4800, 7000) * u.AA)
    # Same flux-density conserving definition as pPXF's log_rebin.
    expected, ln_lam, velscale = ppxf_util.log_rebin(lam, flux)
    np.testing.assert_allclose(spec.flux[0], expected, rtol=1e-9)
    np.testing.assert_allclose(spec.lam, np.exp(ln_lam), rtol=1e-12)
    assert spec.velscale == pytest.approx(velscale)
    assert spec.valid.all()
    # The propagated noise matches the scatter of rebinned white-noise realisations.
    noise = rng.normal(scale=0.2, size=(2000, lam.size))
    sims = log_rebin_spectra(lam * u.AA, noise, np.full(noise.shape, 0.04))
    empirical = sims.flux.std(axis=0)
    np.testing.assert_allclose(empirical, spec.noise[0], rtol=0.1)
    # Output pixels narrower than the input ones at the blue end: nearly no averaging.
    assert spec.noise[0][0] == pytest.approx(0.2, rel=0.02)


def test_log_rebin_marks_bad_pixels():
    lam = 4800.0 + 1.25 * np.arange(1761)
    flux = np.ones((2, lam.size))
    var = np.full(flux.shape, 0.01)
    flux[0, 100] = np.nan
    var[1, 500] = 0.0
    spec = log_rebin_spectra(lam * u.AA, flux, var)
    obs = spec.lam
    bad0 = np.flatnonzero(~spec.valid[0])
    bad1 = np.flatnonzero(~spec.valid[1])
    # Only the output pixels overlapping the bad input pixel: at most
    # ceil(1.25 A / 1.03 A) + 1 = 3 at the blue end, 2 at the red end.
    assert 1 <= bad0.size <= 3 and 1 <= bad1.size <= 2
    assert np.all(np.abs(obs[bad0] - lam[100]) < 1.25)
    assert np.all(np.abs(obs[bad1] - lam[500]) < 1.25)
    assert np.all(spec.noise > 0) and np.all(np.isfinite(spec.flux))


def test_emission_line_mask():
    z = 0.01
    lam = np.arange(4800.0, 7000.0, 0.5) * u.AA
    mask = emission_line_mask(lam, z, width=300 * KMS)
    halpha = EMISSION_LINES["Halpha"].value * (1 + z)
    near = np.abs(lam.value - halpha) < halpha * 299 / C_KMS
    far = np.abs(lam.value - halpha) > halpha * 301 / C_KMS
    assert mask[near].all()
    # Between the masked lines, e.g. the Mgb region, nothing is masked.
    mgb = (lam.value > 5150 * (1 + z)) & (lam.value < 5185 * (1 + z))
    assert not mask[mgb].any()
    assert mask[far & (np.abs(lam.value - 6600 * (1 + z)) < 5)].sum() == 0
    # A velocity Quantity is the same as the redshift; NaD only on request.
    np.testing.assert_array_equal(mask, emission_line_mask(lam, z * C_KMS * KMS,
                                                           width=300 * KMS))
    nad = np.abs(lam.value - 5889.95 * (1 + z)) < 1
    assert not mask[nad].any()
    assert emission_line_mask(lam, z, width=300 * KMS, mask_nad=True)[nad].all()


def test_lsf_excess_beyond_7000(library):
    spec = log_rebin_spectra(MUSE_WAVE * u.AA, np.ones(MUSE_WAVE.size),
                             np.ones(MUSE_WAVE.size), redshift=Z_SYS)
    temp = prepare_templates(library, velscale=spec.velscale, redshift=Z_SYS)
    # Where MUSE is sharper than the 2.5 A templates the excess is left: the
    # largest is at the red end of the fit range.
    lam = np.linspace(4800, 7000, 2201)
    fwhm = muse_lsf_fwhm(lam * (1 + Z_SYS) * u.AA).value / (1 + Z_SYS)
    excess = np.sqrt(np.clip(2.5**2 - fwhm**2, 0, None)) / np.sqrt(8 * np.log(2)) / lam * C_KMS
    assert temp.lsf_excess == pytest.approx(excess.max(), rel=0.02)
    assert 3 < temp.lsf_excess < 9
    assert temp.flux.shape[1] == library.binned().shape[0] * library.binned().shape[1]
    np.testing.assert_allclose(np.median(temp.flux[(temp.lam > 4800) & (temp.lam < 7000)],
                                         axis=0), 1.0)


# ----------------------------------------------------------------------------- fitting


@pytest.mark.parametrize(("velocity", "sigma", "template"),
                         [(150.0, 80.0, (3, 30)), (-60.0, 120.0, (2, 34))])
def test_recovers_known_kinematics(library, velocity, sigma, template):
    # Four noise realisations at S/N 50 per pixel of a real library template
    # (Z index, age index), fitted as four bins.
    w = library.wavelength.value
    sims = [observe(w, library.flux[template], velocity=velocity, sigma=sigma, seed=s)
            for s in range(4)]
    table = fit_kinematics(_bins(*zip(*sims, strict=True)), redshift=Z_SYS * C_KMS * KMS,
                           progress_bar=False)
    assert list(table["flag"]) == [0, 0, 0, 0]
    v, s = table["velocity"].to_value(KMS), table["sigma"].to_value(KMS)
    v_err, s_err = table["velocity_err"].to_value(KMS), table["sigma_err"].to_value(KMS)
    # Each bin agrees within its formal errors, the average within 5 km/s and 5 %.
    assert np.all(np.abs(v - velocity) < 4 * v_err)
    assert np.all(np.abs(s - sigma) < 4 * s_err)
    assert np.all((v_err > 0.5) & (v_err < 5) & (s_err > 0.5) & (s_err < 6))
    assert abs(v.mean() - velocity) < 5
    assert abs(s.mean() / sigma - 1) < 0.05
    assert np.all(np.abs(v - velocity) < 8)
    assert np.all(np.abs(s / sigma - 1) < 0.1)
    # The absolute line-of-sight velocity composes the redshifts.
    expected_los = C_KMS * ((1 + Z_SYS) * (1 + v / C_KMS) - 1)
    np.testing.assert_allclose(table["velocity_los"].to_value(KMS), expected_los, rtol=1e-10)
    assert np.all((table["chi2"] > 0.8) & (table["chi2"] < 1.25))
    assert table.meta["redshift"] == pytest.approx(Z_SYS)
    assert table.meta["n_failed"] == 0


def test_emission_lines_are_masked(library):
    w = library.wavelength.value
    # Strong gas lines 100 km/s away from the stars, as in a star-forming disc.
    lines = [(6562.80, 3.0, 250.0, 40.0), (6583.45, 1.2, 250.0, 40.0),
             (6548.05, 0.4, 250.0, 40.0), (4861.33, 1.0, 250.0, 40.0),
             (5006.84, 1.5, 250.0, 40.0), (6716.44, 0.5, 250.0, 40.0)]
    sims = [observe(w, library.flux[3, 30], velocity=150.0, sigma=80.0, seed=10 + s,
                    lines=lines) for s in range(3)]
    bins = _bins(*zip(*sims, strict=True))
    masked = fit_kinematics(bins, redshift=Z_SYS, progress_bar=False)
    v = masked["velocity"].to_value(KMS)
    assert np.all(np.abs(v - 150.0) < 5)
    assert np.all(masked["chi2"] < 1.3)
    # Without the mask the same spectra give biased kinematics and a bad fit.
    # (the check of the fits says so: a median chi^2 far above 1)
    with pytest.warns(CubeSFHWarning, match="median reduced chi\\^2"):
        unmasked = fit_kinematics(bins, redshift=Z_SYS, mask_emission=False,
                                  progress_bar=False)
    assert np.all(np.abs(unmasked["velocity"].to_value(KMS) - 150.0) > 5)
    assert np.all(unmasked["chi2"] > 5)


def test_failed_bins_are_flagged_not_fatal(library, monkeypatch):
    w = library.wavelength.value
    good = observe(w, library.flux[3, 30], velocity=50.0, sigma=90.0, seed=3)
    nan = (np.full(MUSE_WAVE.size, np.nan), np.full(MUSE_WAVE.size, np.nan))
    bins = _bins(*zip(good, nan, good, strict=True))
    with pytest.warns(CubeSFHWarning, match="1 of 3 bins could not be fitted"):
        table = fit_kinematics(bins, redshift=Z_SYS, progress_bar=False)
    assert list(table["flag"]) == [0, KinematicsFlag.NO_DATA, 0]
    assert np.isnan(table["velocity"][1]) and np.isnan(table["sigma"][1])
    assert table["n_good"][1] == 0
    assert np.all(np.abs(table["velocity"][[0, 2]].to_value(KMS) - 50) < 8)
    assert table.meta["n_failed"] == 1

    # An exception inside pPXF for one bin is caught and flagged.
    import ppxf.ppxf

    real = ppxf.ppxf.ppxf
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise np.linalg.LinAlgError("synthetic failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(ppxf.ppxf, "ppxf", flaky)
    bins = _bins(*zip(good, good, good, strict=True))
    with pytest.warns(CubeSFHWarning, match="1 of 3 bins"):
        table = fit_kinematics(bins, redshift=Z_SYS, progress_bar=False)
    assert list(table["flag"]) == [0, KinematicsFlag.FIT_FAILED, 0]
    assert np.isnan(table["velocity"][1])


def test_systemic_redshift_estimated(library):
    w = library.wavelength.value
    # Two bins at +-100 km/s: the mean spectrum is symmetric about the systemic
    # velocity, which the fit recovers without a redshift guess.
    plus = observe(w, library.flux[3, 32], velocity=100.0, sigma=70.0, seed=21)
    minus = observe(w, library.flux[3, 32], velocity=-100.0, sigma=70.0, seed=22)
    table = fit_kinematics(_bins(*zip(plus, minus, strict=True)))  # with a progress bar
    assert table.meta["redshift"] * C_KMS == pytest.approx(Z_SYS * C_KMS, abs=8)
    los = table["velocity_los"].to_value(KMS)
    truth = C_KMS * ((1 + Z_SYS) * (1 + np.array([100.0, -100.0]) / C_KMS) - 1)
    np.testing.assert_allclose(los, truth, atol=6)
    np.testing.assert_allclose(table["velocity"].to_value(KMS), [100, -100], atol=10)


def _gaussian_line_templates(n_templates=2, seed=5):
    """Synthetic templates: continuum with Gaussian absorption lines of FWHM 2.5 A."""
    rng = np.random.default_rng(seed)
    wave = np.arange(4600.0, 7300.0, 0.5)
    centres = [rng.uniform(4620, 7280, 120) for _ in range(n_templates)]
    depths = [rng.uniform(0.1, 0.6, 120) for _ in range(n_templates)]
    return wave, centres, depths


def _absorption_spectrum(lam, centres, depths, width):
    """Continuum 1 with Gaussian lines of per-line sigma ``width`` (A)."""
    return 1.0 - np.sum(depths * np.exp(-0.5 * ((lam[:, None] - centres) / width) ** 2),
                        axis=1)


@pytest.mark.parametrize("lsf_fwhm", [3.0 * u.AA, None])
def test_explicit_templates_and_lsf_matching(lsf_fwhm):
    # Analytic known answer: templates with Gaussian lines of FWHM 2.5 A; the
    # "observed" lines have sigma^2 = (FWHM_data / 2.355)^2 + (lambda sigma / c)^2.
    wave, centres, depths = _gaussian_line_templates()
    f2s = 1 / np.sqrt(8 * np.log(2))
    flux = np.array([_absorption_spectrum(wave, c, d, 2.5 * f2s)
                     for c, d in zip(centres, depths, strict=True)])
    velocity, sigma = 120.0, 80.0
    z_tot = (1 + Z_SYS) * (1 + velocity / C_KMS) - 1
    lam_obs = MUSE_WAVE
    data_fwhm = 3.0
    obs_centres = centres[0] * (1 + z_tot)
    width = np.sqrt((data_fwhm * f2s) ** 2 + (obs_centres * sigma / C_KMS) ** 2)
    obs = 1.0 - np.sum(depths[0] * np.exp(-0.5 * ((lam_obs[:, None] - obs_centres) / width)
                                          ** 2), axis=1)
    err = np.full(obs.size, 0.002)
    obs = obs + np.random.default_rng(7).normal(size=obs.size) * err
    # analytic templates and log-rebinning leave residuals far above the tiny
    # noise: the check of the fits says so (median chi^2 > 5)
    with pytest.warns(CubeSFHWarning, match="mis-scaled"):
        table = fit_kinematics(wavelength=lam_obs * u.AA, spectra=obs, variance=err**2,
                               templates_wavelength=wave * u.AA, templates_flux=flux,
                               templates_fwhm=2.5 * u.AA, lsf=lsf_fwhm, redshift=Z_SYS,
                               mask_emission=False, progress_bar=False)
    v, s = table["velocity"][0].to_value(KMS), table["sigma"][0].to_value(KMS)
    assert abs(v - velocity) < 2
    if lsf_fwhm is None:
        # Ignoring the LSF difference attributes it to the stars: sigma too high,
        # by about the quadrature sum of 80 and the ~35 km/s LSF difference.
        assert s > 1.05 * sigma
        assert s == pytest.approx(np.hypot(sigma, 35.0), rel=0.05)
    else:
        # Within 3 %: log-rebinning the 1.25 A pixels adds a little smoothing.
        assert s == pytest.approx(sigma, rel=0.03)


def test_fit_spectrum_is_pure_and_flags_empty(library):
    w = library.wavelength.value
    flux, var = observe(w, library.flux[3, 30], velocity=0.0, sigma=100.0, seed=4)
    spec = log_rebin_spectra(MUSE_WAVE * u.AA, flux, var, redshift=Z_SYS)
    temp = prepare_templates(library, velscale=spec.velscale, redshift=Z_SYS)
    mask = spec.valid[0] & ~emission_line_mask(spec.lam * (1 + Z_SYS) * u.AA, Z_SYS)
    first = fit_spectrum(spec.flux[0], spec.noise[0], spec.lam, temp, mask=mask)
    again = fit_spectrum(spec.flux[0], spec.noise[0], spec.lam, temp, mask=mask)
    assert first == again
    assert first.flag == KinematicsFlag.OK
    assert abs(first.velocity) < 6 and first.sigma == pytest.approx(100, rel=0.08)
    empty = fit_spectrum(spec.flux[0], spec.noise[0], spec.lam, temp,
                         mask=np.zeros(spec.lam.size, bool))
    assert empty.flag == KinematicsFlag.NO_DATA and np.isnan(empty.velocity)


def test_input_errors(library):
    flux = np.ones((2, MUSE_WAVE.size))
    with pytest.raises(CubeSFHError, match="variance"):
        fit_kinematics(wavelength=MUSE_WAVE * u.AA, spectra=flux, redshift=0.0,
                       progress_bar=False)
    with pytest.raises(CubeSFHError, match="Inconsistent shapes"):
        fit_kinematics(wavelength=MUSE_WAVE * u.AA, spectra=flux, variance=flux[:, :-1],
                       redshift=0.0, progress_bar=False)
    with pytest.raises(CubeSFHError, match="templates cover"):
        fit_kinematics(wavelength=MUSE_WAVE * u.AA, spectra=flux, variance=flux,
                       redshift=0.0, fit_range=(4620, 7000) * u.AA, progress_bar=False)
    with pytest.raises(CubeSFHError, match="less than half of the rest-frame fit_range"):
        fit_kinematics(wavelength=MUSE_WAVE * u.AA, spectra=flux, variance=flux,
                       redshift=0.5, progress_bar=False)
    with pytest.raises(CubeSFHError, match="redshift has unit"):
        fit_kinematics(wavelength=MUSE_WAVE * u.AA, spectra=flux, variance=flux,
                       redshift=5 * u.AA, progress_bar=False)
    with pytest.raises(CubeSFHError, match="variance unit"):
        fit_kinematics(wavelength=MUSE_WAVE * u.AA, spectra=flux * FLUX_UNIT,
                       variance=flux * u.Jy**2, redshift=0.0, progress_bar=False)
    with pytest.raises(CubeSFHError, match="no 'spectra' attribute"):
        fit_kinematics(SimpleNamespace(wavelength=MUSE_WAVE * u.AA), redshift=0.0)


# ----------------------------------------------------------------------------- external maps


def _cube_wcs(shape=(20, 24)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [170.06, 12.99]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def _bin_map(shape=(20, 24)):
    """Four quadrant bins inside a border of excluded spaxels."""
    yy, xx = np.indices(shape)
    labels = (yy >= shape[0] // 2).astype(int) * 2 + (xx >= shape[1] // 2)
    labels[[0, -1], :] = -1
    labels[:, [0, -1]] = -1
    return labels


def _write_maps(path, maps, wcs, extra=()):
    hdus = [fits.PrimaryHDU()]
    for name, data in maps.items():
        hdr = wcs.to_header()
        hdr["BUNIT"] = "km/s"
        hdus.append(fits.ImageHDU(data, header=hdr, name=name))
    hdus.extend(extra)
    fits.HDUList(hdus).writeto(path)
    return path


def test_read_dap_maps_same_grid(tmp_path):
    wcs, labels = _cube_wcs(), _bin_map()
    vel_bins = np.array([700.0, 760.0, 690.0, 735.0])
    sig_bins = np.array([60.0, 75.0, 90.0, 50.0])
    vel = np.where(labels >= 0, vel_bins[labels], 9999.0)
    sig = np.where(labels >= 0, sig_bins[labels], 9999.0)
    err = np.full(labels.shape, 4.0)
    # A few NaN spaxels are ignored; bin 3 loses every dispersion value.
    vel[3, 3] = np.nan
    sig[labels == 3] = np.nan
    path = _write_maps(tmp_path / "NGC0000_MAPS.fits",
                       {"V_STARS": vel, "SIGMA_STARS": sig, "V_STARS_ERR": err}, wcs)
    table = read_kinematics_maps(path, labels, wcs, systemic_velocity=720 * KMS)
    np.testing.assert_allclose(table["velocity_los"][:3].to_value(KMS), vel_bins[:3])
    np.testing.assert_allclose(table["sigma"][:3].to_value(KMS), sig_bins[:3])
    np.testing.assert_allclose(table["velocity_err"][:3].to_value(KMS), 4.0)
    assert np.all(np.isnan(table["sigma_err"]))  # no SIGMA_STARS_ERR extension
    z0 = 720 / C_KMS
    expected = C_KMS * ((1 + vel_bins[:3] / C_KMS) / (1 + z0) - 1)
    np.testing.assert_allclose(table["velocity"][:3].to_value(KMS), expected)
    assert list(table["flag"]) == [0, 0, 0, KinematicsFlag.NO_DATA]
    assert np.isnan(table["velocity"][3])
    assert table["n_good"][0] == np.sum(labels == 0) - 1
    assert table.meta["n_failed"] == 1

    # A VoronoiBins-like object carries the bin map and the WCS; relative maps.
    bins = SimpleNamespace(bin_map=labels, celestial_wcs=wcs)
    rel = read_kinematics_maps(path, bins, systemic_velocity=700 * KMS, maps_relative=True)
    np.testing.assert_allclose(rel["velocity"][:3].to_value(KMS), vel_bins[:3])
    z0 = 700 / C_KMS
    np.testing.assert_allclose(rel["velocity_los"][:3].to_value(KMS),
                               C_KMS * ((1 + z0) * (1 + vel_bins[:3] / C_KMS) - 1))


def test_read_maps_reprojects_shifted_grid(tmp_path):
    wcs, labels = _cube_wcs(), _bin_map()
    # Maps on a larger grid shifted by (7, 5) pixels; values linear in the cube
    # pixel coordinates, which bilinear interpolation reproduces exactly.
    big = (34, 40)
    map_wcs = _cube_wcs()
    map_wcs.wcs.crpix = wcs.wcs.crpix + [7, 5]
    yy, xx = np.indices(big)
    vel = 700.0 + 3.0 * (xx - 7) - 2.0 * (yy - 5)
    sig = 80.0 + 1.5 * (yy - 5)
    v_path = tmp_path / "v.fits"
    s_path = tmp_path / "s.fits"
    for p, data in ((v_path, vel), (s_path, sig)):
        hdr = map_wcs.to_header()
        hdr["BUNIT"] = "km/s"
        fits.PrimaryHDU(data, header=hdr).writeto(p)
    table = read_kinematics_maps((v_path, s_path), labels, wcs)
    cy, cx = np.indices(labels.shape)
    for b in range(4):
        inside = labels == b
        assert table["velocity_los"][b].to_value(KMS) == pytest.approx(
            np.median(700.0 + 3.0 * cx[inside] - 2.0 * cy[inside]), abs=1e-6)
        assert table["sigma"][b].to_value(KMS) == pytest.approx(
            np.median(80.0 + 1.5 * cy[inside]), abs=1e-6)
    # Without a systemic velocity the median of the bins is the reference.
    assert table.meta["redshift"] * C_KMS == pytest.approx(
        np.median(table["velocity_los"].to_value(KMS)))


def test_read_maps_errors(tmp_path):
    wcs, labels = _cube_wcs(), _bin_map()
    ones = np.ones(labels.shape)
    with pytest.raises(CubeSFHError, match="not found"):
        read_kinematics_maps(tmp_path / "missing.fits", labels, wcs)
    path = _write_maps(tmp_path / "only_v.fits", {"V_STARS": ones}, wcs)
    with pytest.raises(CubeSFHError, match=r"no extension 'SIGMA_STARS' \(present: PRIMARY, "
                                           r"V_STARS\)"):
        read_kinematics_maps(path, labels, wcs)
    far = _cube_wcs()
    far.wcs.crval = [10.0, -40.0]
    path = _write_maps(tmp_path / "far.fits", {"V_STARS": ones, "SIGMA_STARS": ones}, far)
    with pytest.raises(CubeSFHError, match="does not overlap"):
        read_kinematics_maps(path, labels, wcs)
    nowcs = tmp_path / "nowcs.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(ones, name="V_STARS"),
                  fits.ImageHDU(ones, name="SIGMA_STARS")]).writeto(nowcs)
    with pytest.raises(CubeSFHError, match="no celestial WCS"):
        read_kinematics_maps(nowcs, labels, wcs)
    with pytest.raises(CubeSFHError, match="systemic_velocity"):
        read_kinematics_maps(path, labels, wcs, maps_relative=True)
