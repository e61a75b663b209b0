# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of cubesfh.restframe against spectra with analytically known answers."""

import numpy as np
import pytest
from astropy import units as u

from cubesfh.conventions import OUTPUT_WAVELENGTH
from cubesfh.restframe import (
    PreparationFlag,
    PreparedSpectra,
    prepare_spectra,
    resample_spectra,
)
from cubesfh.utils import CubeSFHError, CubeSFHWarning

C_KMS = 299792.458
FLUX_UNIT = u.Unit("1e-20 erg / (s cm2 AA)")
KMS = u.km / u.s
# Observed MUSE-like grid (nominal mode, 1.25 A pixels)
LAM_OBS = np.arange(4750.0, 9350.0, 1.25)

# Absorption lines (rest-frame air wavelength, equivalent width in A)
LINES = np.array([4861.3, 4920.0, 5015.0, 5175.0, 5269.0, 5535.0, 5709.0, 5890.0,
                  6150.0, 6300.0, 6495.0, 6563.0])
EW = np.array([3.0, 1.0, 1.0, 2.5, 1.2, 1.5, 1.0, 2.0, 0.8, 0.8, 1.2, 2.5])


def rest_spectrum(lam, sigma):
    """
    Continuum linear in ln(lambda) minus Gaussian lines of dispersion ``sigma`` (km/s).

    Lines are Gaussians in ln(lambda), so broadening by a Gaussian in velocity of
    sigma_b gives exactly the same function with sqrt(sigma**2 + sigma_b**2).
    """
    x = np.log(lam)[..., None]
    s = sigma / C_KMS
    lines = np.exp(-0.5 * ((x - np.log(LINES)) / s) ** 2) / (np.sqrt(2 * np.pi) * s)
    return 1.0 + 0.3 * np.log(lam / 5500.0) - (lines * EW / LINES).sum(axis=-1)


def pixel_average(func, centers, sub=21):
    """Mean of ``func`` over each pixel (what a detector records)."""
    width = np.gradient(centers)
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    return func(centers[:, None] + offsets * width[:, None]).mean(axis=1)


def observe(velocity, sigma):
    """Pixel-averaged observed spectrum of the rest-frame model at ``velocity``."""
    onepz = 1.0 + velocity / C_KMS
    return pixel_average(lambda lam: rest_spectrum(lam / onepz, sigma) / onepz, LAM_OBS)


def test_restframe_and_broadening_match_analytic():
    # Observed at 1234 km/s with sigma = 60 km/s; prepared to 150 km/s it must match
    # the rest-frame spectrum broadened straight to 150 km/s.
    velocity, sigma = 1234.0, 60.0
    flux = observe(velocity, sigma)[None] * FLUX_UNIT
    out = prepare_spectra(LAM_OBS * u.AA, flux, None, velocity * KMS, sigma * KMS,
                          progress_bar=False)
    assert isinstance(out, PreparedSpectra)
    assert out.flags[0] == 0
    assert out.sigma_broad[0].to_value(KMS) == pytest.approx(np.sqrt(150**2 - 60**2))
    lam = OUTPUT_WAVELENGTH.to_value(u.AA)
    expected = pixel_average(lambda x: rest_spectrum(x, 150.0), lam)
    window = (lam >= 5300) & (lam <= 5500)
    # flux density * (1 + z) conserves flux: the norm is the rest-frame mean
    assert out.norm.unit == FLUX_UNIT
    assert out.norm[0].value == pytest.approx(expected[window].mean(), rel=1e-4)
    resid = out.flux[0] / (expected / expected[window].mean()) - 1
    assert np.sqrt(np.mean(resid**2)) < 0.005
    # the lines were really broadened: without broadening the residual is large
    narrow = pixel_average(lambda x: rest_spectrum(x, 60.0), lam)
    resid_narrow = out.flux[0] / (narrow / narrow[window].mean()) - 1
    assert np.sqrt(np.mean(resid_narrow**2)) > 0.01


def _line_spectrum(lam, sigma_lines):
    """Like `rest_spectrum` with one dispersion per line (km/s)."""
    x = np.log(lam)[..., None]
    s = np.asarray(sigma_lines) / C_KMS
    lines = np.exp(-0.5 * ((x - np.log(LINES)) / s) ** 2) / (np.sqrt(2 * np.pi) * s)
    return 1.0 + 0.3 * np.log(lam / 5500.0) - (lines * EW / LINES).sum(axis=-1)


@pytest.mark.parametrize("velocity", [25_000.0, 90_000.0])
def test_lsf_matched_at_high_redshift(velocity):
    # A galaxy at cz = 25 000 / 90 000 km/s carries the MUSE LSF at lambda (1 + z),
    # narrower in km/s than at the rest wavelength the training spectra assume.
    from cubesfh.lsf import fwhm_to_velocity_sigma, muse_lsf_fwhm

    def lsf_kms(lam):
        return fwhm_to_velocity_sigma(muse_lsf_fwhm(lam * u.AA), lam * u.AA).to_value(KMS)

    sigma, onepz = 100.0, 1.0 + velocity / C_KMS
    observed = np.hypot(sigma, lsf_kms(LINES * onepz))
    flux = pixel_average(lambda lam: _line_spectrum(lam / onepz, observed) / onepz, LAM_OBS)
    lam = OUTPUT_WAVELENGTH.to_value(u.AA)
    # known answer: every line at the training resolution, 150 km/s + LSF at rest
    # (the input pixels, 1.25 / (1 + z) A wide in the rest frame, are averaged in too)
    width = 1.25 / onepz
    sub = (np.arange(21) + 0.5) / 21 - 0.5

    def sampled(x):
        return np.mean([_line_spectrum(x + o * width, np.hypot(150.0, lsf_kms(LINES)))
                        for o in sub], axis=0)

    expected = pixel_average(sampled, lam)
    expected /= expected[(lam >= 5300) & (lam <= 5500)].mean()
    rms = {}
    for match in (True, False):
        out = prepare_spectra(LAM_OBS * u.AA, flux[None] * FLUX_UNIT, None, velocity * KMS,
                              sigma * KMS, match_lsf=match, progress_bar=False)
        rms[match] = np.sqrt(np.mean((out.flux[0] / expected - 1) ** 2))
    # measured: 2.9e-4 / 5.8e-4 at 25 000 km/s, 2.0e-4 / 2.1e-3 at 90 000 km/s
    assert rms[True] < 3.5e-4
    assert rms[False] > 1.8 * rms[True]


def test_velocity_conventions():
    flux = np.ones((3, LAM_OBS.size)) * FLUX_UNIT
    v = 3000.0 * KMS
    beta = 3000.0 / C_KMS
    expected = {"optical": beta, "relativistic": np.sqrt((1 + beta) / (1 - beta)) - 1,
                "log": np.expm1(beta)}
    for convention, z in expected.items():
        out = prepare_spectra(LAM_OBS * u.AA, flux, None, v, 100 * KMS,
                              convention=convention, progress_bar=False)
        assert out.redshift == pytest.approx(z, rel=1e-12)
        # a flat spectrum stays flat; its level is scaled by (1 + z)
        np.testing.assert_allclose(out.flux, 1.0, rtol=1e-10)
        np.testing.assert_allclose(out.norm.value, 1 + z, rtol=1e-10)
    with pytest.raises(CubeSFHError, match="convention"):
        prepare_spectra(LAM_OBS * u.AA, flux, None, v, 100 * KMS, convention="radio",
                        progress_bar=False)


def test_normalisation_window_mean_is_one():
    rng = np.random.default_rng(3)
    velocity = rng.uniform(-300, 2500, 5) * KMS
    sigma = rng.uniform(20, 140, 5) * KMS
    flux = np.array([observe(v, s) for v, s in zip(velocity.value, sigma.value, strict=True)])
    flux *= rng.uniform(0.5, 50, (5, 1))
    out = prepare_spectra(LAM_OBS * u.AA, flux * FLUX_UNIT, None, velocity, sigma,
                          progress_bar=False)
    lam = out.wavelength.to_value(u.AA)
    window = (lam >= 5300) & (lam <= 5500)
    assert window.sum() == 161
    np.testing.assert_allclose(out.flux[:, window].mean(axis=1), 1.0, rtol=1e-12)
    # norm times the normalised spectrum gives back the rest-frame flux density
    assert np.all(out.norm.value > 0)


def test_resampler_conserves_flux():
    rng = np.random.default_rng(1)
    lam = np.cumsum(rng.uniform(0.8, 1.6, 3000)) + 4700.0  # irregular input grid
    flux = rng.uniform(0.0, 10.0, (4, lam.size))
    new = np.arange(4800.0, 7000.01, 1.25)
    out = resample_spectra(lam * u.AA, flux, new * u.AA)
    assert out.shape == (4, new.size)

    def edges(c):
        mid = 0.5 * (c[1:] + c[:-1])
        return np.concatenate([[2 * c[0] - mid[0]], mid, [2 * c[-1] - mid[-1]]])

    e_in, e_out = edges(lam), edges(new)
    # integral of the piecewise-constant input over the output range
    cum = np.concatenate([np.zeros((4, 1)), np.cumsum(flux * np.diff(e_in), axis=1)], axis=1)
    expected = np.array([np.interp(e_out[-1], e_in, c) - np.interp(e_out[0], e_in, c)
                         for c in cum])
    integral = (out * np.diff(e_out)).sum(axis=1)
    np.testing.assert_allclose(integral, expected, rtol=1e-6)
    # sub-ranges too: every output pixel is the input mean over its extent
    k = 700
    np.testing.assert_allclose(
        out[:, k] * np.diff(e_out)[k],
        [np.interp(e_out[k + 1], e_in, c) - np.interp(e_out[k], e_in, c) for c in cum],
        rtol=1e-9)


def test_resampler_variance_and_units():
    lam = np.arange(5000.0, 5100.0, 1.0) * u.AA
    flux = np.full(lam.size, 3.0) * FLUX_UNIT
    var = np.full(lam.size, 4.0) * FLUX_UNIT**2
    # aligned 2-pixel bins: mean of two independent pixels, variance / 2
    new = np.arange(5000.5, 5098.0, 2.0) * u.AA
    out, vout = resample_spectra(lam, flux, new, variance=var)
    assert out.unit == FLUX_UNIT and vout.unit == FLUX_UNIT**2
    np.testing.assert_allclose(out.value, 3.0)
    np.testing.assert_allclose(vout.value, 2.0)
    with pytest.raises(CubeSFHError, match="outside the input range"):
        resample_spectra(lam, flux, [4990.0, 5000.0] * u.AA)


def test_sigma_above_target_flagged_and_not_broadened():
    velocity = np.array([800.0, 800.0])
    sigma = np.array([180.0, 150.0])
    flux = np.array([observe(800.0, s) for s in sigma])
    with pytest.warns(CubeSFHWarning, match="2 SIGMA_TOO_HIGH"):
        out = prepare_spectra(LAM_OBS * u.AA, flux * FLUX_UNIT, None, velocity * KMS,
                              sigma * KMS, match_lsf=False, progress_bar=False)
    assert np.all(out.sigma_too_high)
    assert np.all(out.flags == PreparationFlag.SIGMA_TOO_HIGH)
    assert np.all(out.usable)
    np.testing.assert_array_equal(out.sigma_broad.value, 0.0)
    # not broadened: identical to plain flux-conserving resampling of the rest-frame data
    onepz = 1 + 800.0 / C_KMS
    plain = resample_spectra(LAM_OBS / onepz * u.AA, flux * onepz, OUTPUT_WAVELENGTH)
    plain /= plain[:, 400:561].mean(axis=1, keepdims=True)
    np.testing.assert_allclose(out.flux, plain, rtol=1e-10)


def test_per_spectrum_sigma_target():
    # a model family: each spectrum broadened to its own target dispersion
    velocity = np.array([800.0, 800.0, 800.0])
    sigma = np.array([100.0, 220.0, 320.0])
    targets = np.array([150.0, 300.0, 300.0])
    flux = np.array([observe(800.0, s) for s in sigma])
    with pytest.warns(CubeSFHWarning, match="1 SIGMA_TOO_HIGH"):
        out = prepare_spectra(LAM_OBS * u.AA, flux * FLUX_UNIT, None, velocity * KMS,
                              sigma * KMS, sigma_target=targets * KMS, progress_bar=False)
    np.testing.assert_allclose(out.sigma_broad.value,
                               [np.sqrt(150**2 - 100**2), np.sqrt(300**2 - 220**2), 0.0])
    assert out.sigma_too_high.tolist() == [False, False, True]
    np.testing.assert_array_equal(out.sigma_target.value, targets)
    # the 220 km/s spectrum broadened to 300 equals one observed at 300 km/s
    ref = prepare_spectra(LAM_OBS * u.AA, observe(800.0, 300.0)[None] * FLUX_UNIT, None,
                          800.0 * KMS, 300.0 * KMS, sigma_target=300.0001 * KMS,
                          progress_bar=False)
    assert np.sqrt(np.mean((out.flux[1] - ref.flux[0]) ** 2)) < 5e-3
    with pytest.raises(CubeSFHError, match="one value per spectrum"):
        prepare_spectra(LAM_OBS * u.AA, flux * FLUX_UNIT, None, velocity * KMS, sigma * KMS,
                        sigma_target=[150.0, 300.0] * KMS, progress_bar=False)


def test_velocity_out_of_range_raises():
    flux = np.ones((2, LAM_OBS.size))
    with pytest.raises(CubeSFHError, match=r"1 of 2 spectra.*velocity -4000\.0 km/s.*4749") as err:
        prepare_spectra(LAM_OBS * u.AA, flux, None, [100.0, -4000.0] * KMS, 50 * KMS,
                        progress_bar=False)
    assert "7000" in str(err.value)
    # a far red end is out of range too (7000 A * (1 + z) beyond 9350 A)
    with pytest.raises(CubeSFHError, match="cannot be moved to the rest frame"):
        prepare_spectra(LAM_OBS * u.AA, flux, None, 150000.0 * KMS, 50 * KMS,
                        progress_bar=False)


def test_variance_propagation_matches_monte_carlo():
    # white noise of known variance through shift, broadening and resampling
    rng = np.random.default_rng(42)
    n = 300
    noise = rng.normal(0.0, 0.1, (n, LAM_OBS.size))
    flux = (1.0 + noise) * FLUX_UNIT
    var = np.full(flux.shape, 0.01) * FLUX_UNIT**2
    out = prepare_spectra(LAM_OBS * u.AA, flux, var, 1500 * KMS, 50 * KMS,
                          progress_bar=False)
    predicted = (out.variance * out.norm.value[:, None] ** 2).mean(axis=0)
    measured = (out.flux * out.norm.value[:, None]).var(axis=0, ddof=1)
    assert np.mean(measured) / np.mean(predicted) == pytest.approx(1.0, abs=0.03)
    # broadening averages down the noise: much less than the input variance
    assert np.mean(predicted) < 0.01 / 3


def test_missing_pixels_and_bad_kinematics():
    flux = np.array([observe(500.0, 80.0)] * 3)
    gap = (LAM_OBS > 5805) & (LAM_OBS < 5965)  # laser notch of MUSE AO cubes
    flux[1, gap] = np.nan
    velocity = np.array([500.0, 500.0, np.nan]) * KMS
    with pytest.warns(CubeSFHWarning, match="1 BAD_KINEMATICS.*1 MISSING_PIXELS"):
        out = prepare_spectra(LAM_OBS * u.AA, flux * FLUX_UNIT, None, velocity, 80 * KMS,
                              progress_bar=False)
    assert out.flags.tolist() == [0, PreparationFlag.MISSING_PIXELS,
                                  PreparationFlag.BAD_KINEMATICS]
    assert out.usable.tolist() == [True, False, False]
    assert np.all(np.isnan(out.flux[2])) and np.isnan(out.norm[2])
    lam = out.wavelength.to_value(u.AA)
    onepz = 1 + 500.0 / C_KMS
    nan = np.isnan(out.flux[1])
    # NaN only in the (rest-frame) gap, the rest unchanged by the gap
    assert np.all((lam[nan] > 5790 / onepz) & (lam[nan] < 5980 / onepz))
    assert nan.sum() == pytest.approx((5965 - 5805) / onepz / 1.25, abs=3)
    far = np.abs(lam - 5885 / onepz) > 100
    np.testing.assert_allclose(out.flux[1, far], out.flux[0, far], rtol=1e-9)


def test_lsf_description():
    flux = np.ones((2, LAM_OBS.size))
    out = prepare_spectra(LAM_OBS * u.AA, flux, None, [0.0, 3000.0] * KMS, [50.0, 50.0] * KMS,
                          progress_bar=False)
    fwhm = out.lsf_fwhm
    assert fwhm.shape == (2, 1761)
    # Bacon et al. (2017) MUSE LSF: 2.98 A at 4800 A in the observed frame
    assert fwhm[0, 0].to_value(u.AA) == pytest.approx(2.98, abs=0.01)
    onepz = 1 + 3000.0 / C_KMS
    lam = 4800.0 * onepz
    expected = (5.866e-8 * lam**2 - 9.187e-4 * lam + 6.040) / onepz
    assert fwhm[1, 0].to_value(u.AA) == pytest.approx(expected)
    total = out.sigma_total.to_value(KMS)
    sig_lsf = 2.98 / np.sqrt(8 * np.log(2)) / 4800 * C_KMS
    assert total[0, 0] == pytest.approx(np.hypot(150.0, sig_lsf), rel=1e-3)
    no_lsf = prepare_spectra(LAM_OBS * u.AA, flux, None, 0 * KMS, 50 * KMS, lsf=None,
                             progress_bar=False)
    assert no_lsf.lsf_fwhm is None and no_lsf.sigma_total is None


def test_input_validation():
    with pytest.raises(CubeSFHError, match="shape"):
        prepare_spectra(LAM_OBS * u.AA, np.ones((2, 10)), None, 0 * KMS, 50 * KMS,
                        progress_bar=False)
    with pytest.raises(CubeSFHError, match="one value per spectrum"):
        prepare_spectra(LAM_OBS * u.AA, np.ones((2, LAM_OBS.size)), None, [1, 2, 3] * KMS,
                        50 * KMS, progress_bar=False)
    with pytest.raises(CubeSFHError, match="flux unit squared"):
        prepare_spectra(LAM_OBS * u.AA, np.ones((1, LAM_OBS.size)) * FLUX_UNIT,
                        np.ones((1, LAM_OBS.size)) * FLUX_UNIT, 0 * KMS, 50 * KMS,
                        progress_bar=False)
    with pytest.raises(CubeSFHError, match="norm_window"):
        prepare_spectra(LAM_OBS * u.AA, np.ones((1, LAM_OBS.size)), None, 0 * KMS, 50 * KMS,
                        norm_window=[8000, 8100] * u.AA, progress_bar=False)


def test_real_template_spectrum():
    # The same check on a BC03/MILES template from the bundled library (if present).
    templates = pytest.importorskip("cubesfh.templates")
    try:
        lib = templates.TemplateLibrary.load()
    except Exception as exc:  # library not built in this checkout
        pytest.skip(f"template library not available: {exc}")
    from scipy.ndimage import gaussian_filter1d

    lam_t = lib.wavelength.to_value(u.AA)
    spec = np.asarray(lib.flux[lib.flux.shape[0] // 2, lib.flux.shape[1] // 2], dtype=float)
    spec = spec / np.mean(spec)
    # independent route: fine ln(lambda) grid, Gaussian filter in velocity pixels
    dv = 5.0  # km/s per fine pixel
    x = np.arange(np.log(lam_t[0]), np.log(lam_t[-1]), dv / C_KMS)
    fine = np.interp(np.exp(x), lam_t, spec)

    def smooth(sigma):
        return gaussian_filter1d(fine, sigma / dv, mode="nearest", truncate=6)

    def pixel_means(lam_fine, flux_fine, centers):
        cum = np.concatenate([[0.0], np.cumsum(0.5 * (flux_fine[1:] + flux_fine[:-1])
                                               * np.diff(lam_fine))])
        mid = 0.5 * (centers[1:] + centers[:-1])
        edges = np.concatenate([[1.5 * centers[0] - 0.5 * centers[1]], mid,
                                [1.5 * centers[-1] - 0.5 * centers[-2]]])
        return np.diff(np.interp(edges, lam_fine, cum)) / np.diff(edges)

    velocity, sigma = 900.0, 60.0
    onepz = 1 + velocity / C_KMS
    lam_obs = np.arange(4750.0, 7300.0, 1.25)
    observed = pixel_means(np.exp(x) * onepz, smooth(sigma) / onepz, lam_obs)
    out = prepare_spectra(lam_obs * u.AA, observed, None, velocity * KMS, sigma * KMS,
                          progress_bar=False)
    lam = out.wavelength.to_value(u.AA)
    expected = pixel_means(np.exp(x), smooth(150.0), lam)
    expected /= expected[(lam >= 5300) & (lam <= 5500)].mean()
    resid = out.flux[0] / expected - 1
    assert np.sqrt(np.mean(resid**2)) < 0.005
