# Licensed under a 3-clause BSD style license - see LICENSE
"""Known-answer tests of the broad simulator (mixtures, dust, gas lines, calibration errors)."""

import numpy as np
import pytest

from cubesfh.synthesis import ForwardModel
from cubesfh.synthesis.trainingset import (
    N_COMPONENT_PROBABILITIES,
    simulate_samples,
)
from cubesfh.utils import CubeSFHError

C_KMS = 299792.458


@pytest.fixture(scope="module")
def fm():
    return ForwardModel()


@pytest.fixture(scope="module")
def broad(fm):
    rng = np.random.default_rng(7)
    return simulate_samples(rng, np.zeros(3000, int), fm, prior="broad", noise=False)


def test_default_line_path_is_the_paper_model(fm):
    # line_scale = 1 with the stellar-kernel width reproduces the paper's nebular model
    rng = np.random.default_rng(0)
    mass = rng.uniform(size=(4, fm.library.n_age))
    z = np.full((4, fm.library.n_age), 0.02)
    tau = np.full(4, 0.3)
    s0, p0 = fm.synthesize(mass, z, tau, tau)
    s1, p1 = fm.synthesize(mass, z, tau, tau, line_scale=np.ones(4))
    np.testing.assert_allclose(s1, s0, rtol=1e-10)
    # photometry: the dust is applied at each line's wavelength instead of at its
    # 10 A SED pixel (a 1e-4 difference)
    np.testing.assert_allclose(p1, p0, rtol=2e-4)
    # doubling the lines adds exactly the line part once more
    s2, _ = fm.synthesize(mass, z, tau, tau, line_scale=np.full(4, 2.0))
    s_nolines, _ = fm.synthesize(mass, z, tau, tau, line_scale=np.zeros(4))
    np.testing.assert_allclose(s2 - s1, s1 - s_nolines, rtol=1e-8, atol=1e-12 * s1.max())


def test_line_spectra_flux_and_width(fm):
    # a unit H-alpha line: integral 1, rms width sqrt(sigma_LSF^2 + (sigma_v lambda / c)^2)
    lam = np.array([6562.8])
    w = fm.wavelength.value
    for sig_v in (30.0, 120.0):
        spec = fm.line_spectra(np.ones((1, 1)), lam, np.array([sig_v]))[0]
        dl = w[1] - w[0]
        assert spec.sum() * dl == pytest.approx(1.0, rel=1e-6)
        mu = (spec * w).sum() / spec.sum()
        width = np.sqrt((spec * (w - mu) ** 2).sum() / spec.sum())
        lsf = np.interp(6562.8, fm.library.wavelength.value, fm._lsf_sigma)
        expected = np.sqrt(lsf**2 + (sig_v * 6562.8 / C_KMS) ** 2 + dl**2 / 12)
        assert width == pytest.approx(expected, rel=0.03)


def test_line_photometry_known_answer(fm):
    # a line of flux F at 5500 A adds F * (band weight per A) to F555W only where transmitted
    ph = fm.line_photometry(np.array([[1.0]]), np.array([5500.0]))[0]
    assert ph[3] > 0  # F555W
    assert ph[0] == 0  # F275W does not transmit 5500 A
    e = np.diff(fm.sed_wavelength.value).mean()
    j = np.argmin(np.abs(fm.sed_wavelength.value - 5500.0))
    assert ph[3] == pytest.approx(fm.band_weights[j, 3] / e, rel=1e-6)


def test_identical_components_give_single_labels(fm):
    rng = np.random.default_rng(3)
    mass = rng.uniform(size=(5, fm.library.n_age))
    z = 10 ** rng.uniform(-2.5, -1.5, size=(5, fm.library.n_age))
    one = fm.labels(mass, z)
    two = fm.labels(np.stack([0.3 * mass, 0.7 * mass], axis=1), np.stack([z, z], axis=1))
    for k in ("mass_fraction", "metallicity", "light_fraction", "logage_lw", "zh_mw"):
        np.testing.assert_allclose(two[k], one[k], rtol=1e-9, atol=1e-12)


def test_mixture_labels_weight_the_components(fm):
    # an old metal-rich and a young metal-poor component in separate age bins:
    # each bin's [Z/H] is its own component's, the mass fractions add up
    na = fm.library.n_age
    old = np.zeros(na)
    old[fm.library.age_bin == 15] = 1.0
    young = np.zeros(na)
    young[fm.library.age_bin == 8] = 0.1
    z_old = np.full(na, 0.03)
    z_young = np.full(na, 0.004)
    lab = fm.labels(np.stack([old, young])[None], np.stack([z_old, z_young])[None])
    assert lab["metallicity"][0, 15] == pytest.approx(np.log10(0.03 / 0.02), abs=1e-9)
    assert lab["metallicity"][0, 8] == pytest.approx(np.log10(0.004 / 0.02), abs=1e-9)
    assert lab["mass_fraction"][0, [8, 15]].sum() == pytest.approx(1.0, abs=1e-12)


def test_broad_prior_ranges(broad):
    n = broad["spectra"].shape[0]
    counts = np.bincount(broad["n_components"].astype(int), minlength=4)[1:] / n
    np.testing.assert_allclose(counts, N_COMPONENT_PROBABILITIES, atol=0.03)
    # metal-poor to super-solar, as the issue asks
    assert np.percentile(broad["zh_mw"], 1) < -0.6
    assert np.percentile(broad["zh_mw"], 99) > 0.2
    # dust up to tau_ISM ~ 2, gas lines from ~20 to ~180 km/s
    assert broad["tau_ism"].max() > 1.8
    assert broad["line_sigma"].min() < 40 and broad["line_sigma"].max() > 150
    # spectra normalised to 1 in 5300-5500 A, finite, positive photometry
    w = np.arange(1761) * 1.25 + 4800
    sel = (w >= 5300) & (w <= 5500)
    np.testing.assert_allclose(broad["spectra_noiseless"][:, sel].mean(axis=1), 1.0, rtol=1e-9)
    assert np.all(np.isfinite(broad["photometry"])) and np.all(broad["photometry"] > 0)


def test_dig_lines_reach_their_ew(fm):
    # a single sample with diffuse-gas lines: the H-alpha excess over the no-line
    # spectrum matches the drawn EW (within the Cloudy lines of young stars)
    rng = np.random.default_rng(11)
    out = simulate_samples(rng, np.zeros(400, int), fm, prior="broad", noise=False)
    k = np.flatnonzero((out["dig_ew"] > 5) & (out["logage_lw"] > 9.5))
    assert k.size > 0
    w = fm.wavelength.value
    ha = (w > 6545) & (w < 6580)
    cont = (w > 6600) & (w < 6620)
    s = out["spectra_noiseless"][k]
    ew = ((s[:, ha] / np.median(s[:, cont], axis=1)[:, None]) - 1).sum(axis=1) * 1.25
    # [NII] 6548 is inside the window: EW(window) >= EW(H-alpha) - absorption of H-alpha
    assert np.all(ew > 0.5 * out["dig_ew"][k] - 3.0)


def test_bad_prior_names(fm):
    rng = np.random.default_rng(0)
    with pytest.raises(CubeSFHError, match="prior='flat'"):
        simulate_samples(rng, np.zeros(2, int), fm, prior="flat")
