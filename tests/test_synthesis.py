# Licensed under a 3-clause BSD style license - see LICENSE
"""Known-answer tests of the forward model, the SFH families and the training-set writer."""

import h5py
import numpy as np
import pytest
from astropy import units as u
from scipy import stats

from cubesfh._spectral import gaussian_smooth
from cubesfh.conventions import HST_BANDS, OUTPUT_WAVELENGTH
from cubesfh.synthesis import (
    AGE_OF_UNIVERSE_GYR,
    ForwardModel,
    draw_gp_parameters,
    draw_skewnormal_parameters,
    dust_transmission,
    gp_cumulative,
    gp_sfh,
    metallicity_history,
    skewnormal_sfh,
)
from cubesfh.synthesis.trainingset import make_training_set, simulate_samples
from cubesfh.templates import synthetic_photometry
from cubesfh.utils import CubeSFHError


@pytest.fixture(scope="module")
def model():
    return ForwardModel()


def _single(model, age_index, z_index):
    mass = np.zeros((1, model.library.n_age))
    mass[0, age_index] = 1.0
    z = np.full((1, model.library.n_age), model.library.metallicity[z_index])
    return mass, z


@pytest.mark.parametrize(("age_index", "z_index"), [(30, 3), (20, 4), (8, 1)])
def test_single_population_reproduces_template(model, age_index, z_index):
    mass, z = _single(model, age_index, z_index)
    zero = np.zeros(1)
    native = model.synthesize_native(mass, z, zero, zero, nebular=False)
    np.testing.assert_allclose(native[0], model.library.flux[z_index, age_index], rtol=1e-6)
    spec, phot = model.synthesize(mass, z, zero, zero, nebular=False)
    np.testing.assert_allclose(spec[0], model.stellar[z_index, age_index], rtol=1e-6)
    # photometry: the template's SED through the filters
    expected = synthetic_photometry(model.library.sed_wavelength,
                                    model.library.sed_flux[z_index, age_index].astype(float))
    np.testing.assert_allclose(phot[0], expected, rtol=1e-6)


def test_preprocessed_template_resolution(model):
    # an isolated narrow line gets sigma^2 = sigma_muse^2 - sigma_miles^2 + (150 km/s)^2
    lam = 6000.0
    sig_lsf = (5.866e-8 * lam**2 - 9.187e-4 * lam + 6.040) / 2.3548  # Bacon et al. 2017
    sig_tmp = 2.5 / 2.3548
    expected = np.sqrt(sig_lsf**2 - sig_tmp**2 + (150 / 299792.458 * lam) ** 2)
    np.testing.assert_allclose(np.interp(lam, model.library.wavelength.value,
                                         model._kernel_sigma), expected, rtol=0.01)


def test_dust_transmission():
    tau = np.array([0.3, 1.7])
    t = dust_transmission(np.array([5500.0, 4000.0]) * u.AA, tau)
    np.testing.assert_allclose(t[:, 0], np.exp(-tau))
    np.testing.assert_allclose(t[:, 1], np.exp(-tau * (4000 / 5500) ** -0.7))


def test_dust_applies_to_spectra(model):
    mass, z = _single(model, 30, 3)
    clean, _ = model.synthesize(mass, z, np.zeros(1), np.zeros(1))
    red, _ = model.synthesize(mass, z, np.array([0.5]), np.array([2.0]))
    i = np.argmin(np.abs(OUTPUT_WAVELENGTH.value - 5500))
    # an old population only sees the diffuse ISM
    np.testing.assert_allclose(red[0, i] / clean[0, i], np.exp(-0.5), rtol=1e-3)
    young, _ = _single(model, 2, 3)
    c0, _ = model.synthesize(young, z, np.zeros(1), np.zeros(1), nebular=False)
    c1, _ = model.synthesize(young, z, np.array([0.5]), np.array([2.0]), nebular=False)
    np.testing.assert_allclose(c1[0, i] / c0[0, i], np.exp(-2.5), rtol=1e-3)


def test_metallicity_history_eq2():
    mass = np.array([[0.1, 0.2, 0.3, 0.4]])  # youngest first
    z = metallicity_history(mass, np.array([0.03]))
    # cumulative mass fraction at the middle of each interval, from the oldest
    frac = np.array([0.9 + 0.05, 0.7 + 0.1, 0.4 + 0.15, 0.2])
    np.testing.assert_allclose(z[0], 0.008 + 0.022 * frac)
    assert np.all(np.diff(z[0]) < 0)  # younger stars are more metal-rich
    # one Z_start per history
    z2 = metallicity_history(np.vstack([mass, mass]), np.array([0.03, 0.05]),
                             z_start=np.array([0.008, 0.02]))
    np.testing.assert_allclose(z2[0], z[0])
    np.testing.assert_allclose(z2[1], 0.02 + 0.03 * frac)


def test_wide_chemistry_prior(model):
    rng = np.random.default_rng(4)
    fam = np.zeros(400, int)
    paper = simulate_samples(rng, fam, model, noise=False)
    wide = simulate_samples(rng, fam, model, noise=False, chemistry="wide")
    # the paper's prior: Z_start = 0.008 < Z <= 0.03, sub-solar mass-weighted means
    assert np.all(paper["z_start"] == 0.008)
    assert paper["zh_mw"].max() < 0.0 and paper["zh_mw"].min() > np.log10(0.008 / 0.02)
    # the wide one: 0.004 <= Z_start <= Z_final <= 0.05, reaching super-solar means
    assert np.all((wide["z_start"] >= 0.004) & (wide["z_start"] <= 0.03))
    assert np.all((wide["z_final"] >= wide["z_start"]) & (wide["z_final"] <= 0.05))
    assert np.mean(wide["zh_mw"] > 0.1) > 0.3
    assert wide["zh_mw"].max() < np.log10(0.05 / 0.02)
    with pytest.raises(CubeSFHError, match="chemistry='solar'"):
        simulate_samples(rng, fam[:2], model, chemistry="solar")


def test_labels(model):
    rng = np.random.default_rng(3)
    p = draw_gp_parameters(rng, 50)
    mass = gp_sfh(p, model.library.age_edges.to_value(u.yr))
    z = metallicity_history(mass, rng.uniform(0.01, 0.03, 50))
    lab = model.labels(mass, z)
    np.testing.assert_allclose(lab["mass_fraction"].sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(lab["light_fraction"].sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(lab["mass_fraction"] >= 0)
    # the light-weighted age is younger than the mass-weighted one
    assert np.all(lab["logage_lw"] <= lab["logage_mw"] + 1e-9)
    # single population: the means are the bin values
    m1, z1 = _single(model, 30, 3)
    lab1 = model.labels(m1, z1)
    b = model.library.age_bin[30]
    np.testing.assert_allclose(lab1["logage_mw"], np.log10(model.library.age_bin_centers[b]
                                                           .to_value(u.yr)))
    np.testing.assert_allclose(lab1["zh_lw"], 0.0, atol=1e-12)


def test_gp_sfh_knots():
    rng = np.random.default_rng(11)
    p = draw_gp_parameters(rng, 2000)
    for key, frac in (("t25", 0.25), ("t50", 0.5), ("t75", 0.75)):
        # evaluate each history at its own knot time
        vals = np.array([gp_cumulative(np.array([p[key][i]]),
                                       {k: v[i:i + 1] for k, v in p.items()})[0, 0]
                         for i in range(0, 2000, 20)])
        np.testing.assert_allclose(vals, frac, atol=0.02)
    # monotonic, 0 at the Big Bang, 1 today
    t = np.linspace(0, AGE_OF_UNIVERSE_GYR, 500)
    c = gp_cumulative(t, p)
    assert np.all(np.diff(c, axis=1) >= -1e-12)
    np.testing.assert_allclose(c[:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(c[:, -1], 1.0, atol=1e-12)
    # present-day sSFR honoured: slope of the cumulative fraction at T
    c2 = gp_cumulative(np.array([AGE_OF_UNIVERSE_GYR - 1e-3, AGE_OF_UNIVERSE_GYR]), p)
    ratio = (c2[:, 1] - c2[:, 0]) / 1e6 / p["ssfr"]
    assert np.median(np.abs(ratio - 1)) < 0.01


def test_gp_dirichlet_draws():
    rng = np.random.default_rng(5)
    p = draw_gp_parameters(rng, 10_000)
    assert np.all(p["t25"] < p["t50"]) and np.all(p["t50"] < p["t75"])
    # Dirichlet(1,1,1,1): t25 / T ~ Beta(1, 3)
    assert stats.kstest(p["t25"] / AGE_OF_UNIVERSE_GYR, stats.beta(1, 3).cdf).pvalue > 0.01
    assert stats.kstest(p["ssfr"], stats.uniform(1e-12, 1e-9 - 1e-12).cdf).pvalue > 0.01


def test_skewnormal_table1():
    rng = np.random.default_rng(7)
    p = draw_skewnormal_parameters(rng, 10_000)
    assert stats.kstest(p["peak"], stats.norm(12, 3).cdf).pvalue > 0.01
    assert stats.kstest(p["skewness"], stats.uniform(-0.25, 1.0).cdf).pvalue > 0.01
    assert abs(np.mean(p["width"]) - 1.0) < 0.03 and abs(np.std(p["width"]) - 0.4) < 0.03
    has = p["has_burst"]
    assert abs(has.mean() - 0.4) < 0.02
    la = np.log10(p["burst_age"][has])
    assert stats.kstest(la, stats.uniform(-2, np.log10(50)).cdf).pvalue > 0.01
    assert stats.kstest(p["burst_width"][has], stats.uniform(0.04, 0.01).cdf).pvalue > 0.01
    assert stats.kstest(p["burst_fraction"][has], stats.uniform(0.01, 0.09).cdf).pvalue > 0.01


def test_skewnormal_burst_mass(model):
    rng = np.random.default_rng(2)
    p = draw_skewnormal_parameters(rng, 500, with_burst=True)
    edges = model.library.age_edges.to_value(u.yr)
    m = skewnormal_sfh(p, edges)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    # the burst (< 0.75 Gyr for ages <= 0.5 Gyr and width 50 Myr) carries its mass fraction
    young = edges[1:] <= 0.75e9
    old_part = skewnormal_sfh({**p, "has_burst": np.zeros(500, bool),
                               "burst_fraction": np.zeros(500)}, edges)
    expected = p["burst_fraction"] + (1 - p["burst_fraction"]) * old_part[:, young].sum(1)
    np.testing.assert_allclose(m[:, young].sum(axis=1), expected, atol=2e-3)


def test_noise_realises_snr(model):
    rng = np.random.default_rng(0)
    mass, z = _single(model, 30, 3)
    spec, phot = model.synthesize(np.repeat(mass, 400, 0), np.repeat(z, 400, 0),
                                  np.zeros(400), np.zeros(400))
    spec, phot, _ = model.normalize(spec, phot)
    for snr in (15.0, 50.0):
        noisy, _, var = model.add_noise(rng, spec, phot, snr)
        win = model._norm_pixels
        resid = (noisy - spec)[:, win]
        sn_pix = spec[:, win].mean() / resid.std()
        measured = sn_pix / np.sqrt(1.25)  # per Angstrom
        assert abs(measured / snr - 1) < 0.05
        np.testing.assert_allclose(np.sqrt(var[:, win].mean()), resid.std(), rtol=0.05)


def test_photometry_flat_spectrum_through_model(model):
    flat = np.ones(model.sed_wavelength.size)
    np.testing.assert_allclose(flat @ model.band_weights, 1.0, rtol=1e-12)


def test_simulate_and_normalisation(model):
    rng = np.random.default_rng(9)
    fam = np.array([0] * 20 + [1] * 5 + [2] * 5)
    out = simulate_samples(rng, fam, model)
    assert out["spectra"].shape == (30, 1761)
    assert out["photometry"].shape == (30, len(HST_BANDS))
    np.testing.assert_allclose(out["spectra_noiseless"][:, model._norm_pixels].mean(1), 1.0)
    assert np.all(np.isnan(out["t25"][20:])) and np.all(np.isfinite(out["peak"][20:]))
    assert set(np.unique(out["snr"])) <= {15.0, 20.0, 35.0, 50.0}


def test_training_set_reproducible_and_resumable(tmp_path):
    a = tmp_path / "a.h5"
    make_training_set(a, n=120, seed=5, chunk_size=50, progress_bar=False)
    b = tmp_path / "b.h5"
    make_training_set(b, n=120, seed=5, chunk_size=50, progress_bar=False)
    with h5py.File(b, "r+") as f:  # simulate an interruption after chunk 0
        f["chunk_done"][1:] = False
        f["spectra"][50:] = 0.0
    make_training_set(b, n=120, seed=5, chunk_size=50, progress_bar=False)
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert fa.attrs["complete"] and fb.attrs["complete"]
        for k in ("spectra", "photometry", "mass_fraction", "metallicity", "logage_lw"):
            np.testing.assert_array_equal(fa[k][:], fb[k][:])
        assert fa["spectra"].shape == (120, 1761)
        np.testing.assert_allclose(fa["mass_fraction"][:].sum(axis=1), 1.0, rtol=1e-5)
        fam = fa["family"][:]
        assert np.bincount(fam, minlength=3).tolist() == [110, 6, 4]
    with pytest.raises(CubeSFHError, match="different settings"):
        make_training_set(a, n=120, seed=6, chunk_size=50, progress_bar=False)
    with pytest.raises(CubeSFHError, match="sigma_target_kms"):
        make_training_set(a, n=120, seed=5, chunk_size=50, progress_bar=False,
                          sigma_target=300 * u.km / u.s)


def test_training_set_at_300_kms(tmp_path):
    # same seed, other dispersion: same histories, spectra broadened to 300 km/s
    a = tmp_path / "a.h5"
    b = tmp_path / "b.h5"
    # the paper's simulator: with the broad one the gas lines have their own width
    make_training_set(a, n=20, seed=2, chunk_size=20, progress_bar=False, prior="paper")
    make_training_set(b, n=20, seed=2, chunk_size=20, progress_bar=False, prior="paper",
                      sigma_target=300 * u.km / u.s)
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert fa.attrs["sigma_target_kms"] == 150.0 and fb.attrs["sigma_target_kms"] == 300.0
        np.testing.assert_array_equal(fa["mass_fraction"][:], fb["mass_fraction"][:])
        sa, sb = fa["spectra_noiseless"][:], fb["spectra_noiseless"][:]
    # known answer: the 150 km/s spectra convolved with sqrt(300^2 - 150^2) km/s
    # (away from the edges, where the 150 km/s spectra lack the outside pixels)
    w = OUTPUT_WAVELENGTH.to_value(u.AA)
    extra = np.sqrt(300.0**2 - 150.0**2) / 299792.458 * w
    smoothed = gaussian_smooth(w, sa, extra)
    inner = slice(40, -40)
    rel = (smoothed[:, inner] - sb[:, inner]) / sb[:, inner]
    assert np.sqrt(np.mean(rel**2)) < 2e-3
    assert np.abs(sb[:, inner] - sa[:, inner]).max() > 0.05  # and it is a real change
