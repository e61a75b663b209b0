# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of the pPXF baseline (cubesfh.baseline) against known answers."""

import pickle

import numpy as np
import pytest
from astropy import units as u
from astropy.table import QTable

from cubesfh.baseline import (
    BaselineFlag,
    BaselineTemplates,
    PopulationFit,
    fit_population,
    fit_populations,
)
from cubesfh.conventions import AGE_BIN_CENTERS, HST_BANDS
from cubesfh.synthesis import ForwardModel
from cubesfh.templates import load_filters, synthetic_photometry
from cubesfh.utils.exceptions import CubeSFHError, CubeSFHWarning

LOG_AGE = np.log10(AGE_BIN_CENTERS.to_value(u.yr))
SOLAR = 3  # index of Z = 0.02 in the library
# S/N per Angstrom of the nominal variance given with noise-free spectra: high
# enough that the 1 % regularisation barely moves the solution.
SNR_NOISE_FREE = 1.0e4


@pytest.fixture(scope="module")
def model():
    return ForwardModel()


@pytest.fixture(scope="module")
def templates(model):
    return BaselineTemplates(model)


def _population(model, bins, *, z=0.02, tau=0.0):
    """Noise-free normalised spectrum, photometry and labels of constant-SFR bins.

    ``bins`` maps age bin -> mass formed (constant SFR across the bin).
    """
    lib = model.library
    bm = lib.bin_matrix()
    mass = np.zeros((1, lib.n_age))
    for b, m in bins.items():
        sel = lib.age_bin == b
        mass[0, sel] += m * bm[b, sel]
    zz = np.full((1, lib.n_age), z)
    spec, phot = model.synthesize(mass, zz, np.full(1, tau), np.full(1, tau), nebular=False)
    spec, phot, _ = model.normalize(spec, phot)
    return spec[0], phot[0], {k: np.squeeze(v) for k, v in model.labels(mass, zz).items()}


def _variance(spec, snr):
    """Training-set noise model: Poisson-like, S/N per Angstrom ``snr`` at the mean level."""
    return np.clip(spec, 0, None) / (snr**2 * 1.25)


# --------------------------------------------------------------------------- templates


def test_template_normalisation_and_mass_scale(model, templates):
    """Templates have mean 1 in 5300-5500 A and keep the flux per solar mass formed."""
    lib = model.library
    assert templates.spectra.shape == (templates.lam.size, 16, 6)
    assert templates.shape == (16, 6)
    # log-rebinned templates keep the mean of 1 in the window
    sel = (templates.lam > 5305) & (templates.lam < 5495)
    np.testing.assert_allclose(templates.spectra[sel].mean(axis=0), 1.0, atol=2e-3)
    # 1 M_sun formed at a constant rate across bin 7 at solar Z: its mean flux in
    # the window is the normalisation factor of that template
    bm = lib.bin_matrix()
    mass = np.where(lib.age_bin == 7, bm[7], 0.0)[None]
    spec, phot = model.synthesize(mass, np.full_like(mass, 0.02), np.zeros(1), np.zeros(1),
                                  nebular=False)
    w = model.wavelength.to_value(u.AA)
    win = (w >= 5300) & (w <= 5500)
    np.testing.assert_allclose(templates.norm[7, SOLAR], spec[0, win].mean(), rtol=1e-10)
    np.testing.assert_allclose(templates.photometry[:, 7, SOLAR] * templates.norm[7, SOLAR],
                               phot[0], rtol=1e-10)
    # living fraction of a constant SFR over the bin: duration-weighted mean
    expect = (bm[7] * lib.living_fraction[SOLAR]).sum()
    np.testing.assert_allclose(templates.living_fraction[7, SOLAR], expect, rtol=1e-12)


def test_template_photometry_equals_synthetic_photometry(model, templates):
    lib = model.library
    bm = lib.bin_matrix()
    for b, z in [(0, 0), (5, SOLAR), (15, 5)]:
        sed = bm[b] @ lib.sed_flux[z].astype(float)
        expect = synthetic_photometry(lib.sed_wavelength, sed, bands=HST_BANDS)
        np.testing.assert_allclose(templates.photometry[:, b, z] * templates.norm[b, z],
                                   expect, rtol=1e-10)
    pivots = u.Quantity([f.pivot for f in load_filters(HST_BANDS)])
    np.testing.assert_allclose(templates.pivot.to_value(u.AA), pivots.to_value(u.AA))
    # effective wavelengths lie inside the bands, bluer for the young templates
    assert np.all(np.diff(templates.phot_lam[:, 14, SOLAR]) > 0)
    assert np.all(templates.phot_lam[:, 0, SOLAR] < templates.phot_lam[:, 15, SOLAR])


def test_to_mass_known_ratio(templates):
    light = np.zeros((16, 6))
    light[2, 1] = light[12, 4] = 0.5
    mass = templates.to_mass(light)
    m1 = 0.5 / templates.norm[2, 1] * templates.living_fraction[2, 1]
    m2 = 0.5 / templates.norm[12, 4] * templates.living_fraction[12, 4]
    np.testing.assert_allclose(mass[12, 4], m2 / (m1 + m2))
    np.testing.assert_allclose(mass.sum(), 1.0)


def test_templates_pickle(templates):
    clone = pickle.loads(pickle.dumps(templates))
    np.testing.assert_array_equal(clone.spectra, templates.spectra)
    assert (clone.rebin != templates.rebin).nnz == 0
    assert "16 age bins x 6 metallicities" in repr(clone)
    assert pickle.loads(pickle.dumps(fit_population)) is fit_population


def test_log_rebin_propagates_nan_and_variance(templates):
    n = templates.wavelength.size
    flux = np.ones(n)
    var = np.full(n, 4.0)
    flux[100] = np.nan
    out, ovar = templates.log_rebin(flux, var)
    bad = ~np.isfinite(out)
    assert 1 <= bad.sum() <= 3
    np.testing.assert_allclose(out[~bad], 1.0, rtol=1e-10)
    # variance of a weighted mean of ~1-2 pixels: between 4/2 and 4
    assert np.all((ovar[~bad] > 1.9) & (ovar[~bad] <= 4.0 + 1e-9))


# --------------------------------------------------------------------------- fits


def test_single_old_population(model, templates):
    spec, phot, truth = _population(model, {14: 1.0})
    res = fit_population(spec, _variance(spec, SNR_NOISE_FREE), phot, templates=templates,
                         rescale_noise=False)
    assert isinstance(res, PopulationFit)
    assert res.flag == BaselineFlag.OK
    assert res.n_bands == 5
    assert abs(res.logage_lw - LOG_AGE[14]) < 0.1
    assert abs(res.logage_mw - LOG_AGE[14]) < 0.1
    assert abs(res.zh_lw - 0.0) < 0.1
    assert abs(res.zh_mw - 0.0) < 0.1
    assert truth["logage_mw"] == pytest.approx(LOG_AGE[14])
    np.testing.assert_allclose(res.mass_fraction.sum(), 1.0)
    assert np.all(res.mass_fraction >= 0)
    assert res.mass_fraction[13:16].sum() > 0.9
    np.testing.assert_allclose(res.light_weights.sum(), 1.0)
    np.testing.assert_allclose(res.mass_weights.sum(), 1.0)
    # bins without weight have no metallicity
    empty = res.mass_fraction == 0
    assert empty.any()
    assert np.all(np.isnan(res.zh[empty])) and np.all(np.isfinite(res.zh[~empty]))
    assert 0 <= res.av < 0.2
    assert res.noise_scale == 1.0


def test_young_old_mixture_noise_free(model, templates):
    # 1 % of the mass in bin 3 (30-55 Myr) on top of an old population: 31 % of the V light
    spec, phot, truth = _population(model, {14: 1.0, 3: 0.01})
    young_true = truth["light_fraction"][:6].sum()
    assert young_true == pytest.approx(0.315, abs=0.01)
    res = fit_population(spec, _variance(spec, SNR_NOISE_FREE), phot, templates=templates,
                         rescale_noise=False)
    assert res.flag == BaselineFlag.OK
    assert res.light_fraction[:6].sum() == pytest.approx(young_true, abs=0.05)
    assert res.mass_fraction[:6].sum() == pytest.approx(truth["mass_fraction"][:6].sum(),
                                                        rel=0.3)
    assert abs(res.logage_lw - truth["logage_lw"]) < 0.1
    assert abs(res.logage_mw - truth["logage_mw"]) < 0.1


def test_noisy_mixture_and_noise_rescaling(model, templates):
    """With the training-set noise model chi2/DOF ~ 1 and the noise needs no rescaling;
    with a variance 4x too large the rescaling halves the noise."""
    spec, phot, truth = _population(model, {14: 1.0, 3: 0.01})
    var = _variance(spec, 50.0)
    rng = np.random.default_rng(5)
    noisy = spec + rng.standard_normal(spec.size) * np.sqrt(var)
    res = fit_population(noisy, var, phot, templates=templates)
    assert res.flag == BaselineFlag.OK
    assert res.noise_scale == pytest.approx(1.0, abs=0.05)
    assert res.chi2 == pytest.approx(1.0, abs=0.1)
    assert res.light_fraction[:6].sum() > 0.1  # young light detected (truth 0.315)
    res4 = fit_population(noisy, 4 * var, phot, templates=templates)
    assert res4.noise_scale == pytest.approx(0.5 * res.noise_scale, rel=0.03)
    assert res4.chi2 == pytest.approx(res.chi2, rel=0.1)


def test_calzetti_attenuation_recovered(model, templates):
    """A spectrum attenuated exactly as pPXF models it gives back its A_V."""
    from ppxf.ppxf import attenuation

    spec, phot, _ = _population(model, {12: 1.0})
    w = templates.wavelength.to_value(u.AA)
    a_v = 0.6
    red = spec * attenuation(w, a_v)
    red_phot = phot * attenuation(templates.phot_lam[:, 12, SOLAR], a_v)
    var = _variance(red, 200.0)
    red = red + np.random.default_rng(1).standard_normal(red.size) * np.sqrt(var)
    # unregularised: the templates are exact, A_V and age come back
    res = fit_population(red, var, red_phot, templates=templates, regul=0,
                         rescale_noise=False)
    assert res.av == pytest.approx(a_v, abs=0.05)
    assert abs(res.logage_mw - LOG_AGE[12]) < 0.1
    assert res.chi2 == pytest.approx(1.0, abs=0.1)
    # the paper's configuration (1 % regularisation) smooths the history but
    # keeps A_V close
    res = fit_population(red, var, red_phot, templates=templates)
    assert res.av == pytest.approx(a_v, abs=0.15)


def test_missing_bands(model, templates):
    spec, phot, _ = _population(model, {14: 1.0})
    var = _variance(spec, SNR_NOISE_FREE)
    part = phot.copy()
    part[[0, 4]] = np.nan  # no F275W, no F814W
    res = fit_population(spec, var, part, templates=templates, rescale_noise=False)
    assert res.flag == BaselineFlag.OK
    assert res.n_bands == 3
    assert abs(res.logage_lw - LOG_AGE[14]) < 0.1
    assert abs(res.zh_mw) < 0.1
    # no usable band: spectrum alone, flagged but fitted
    res0 = fit_population(spec, var, np.full(5, np.nan), templates=templates,
                          rescale_noise=False)
    assert res0.flag == BaselineFlag.NO_PHOTOMETRY
    assert res0.n_bands == 0 and np.isnan(res0.phot_chi2)
    assert abs(res0.logage_mw - LOG_AGE[14]) < 0.1


def test_nan_spectrum_is_flagged_not_raised(templates):
    n = templates.wavelength.size
    res = fit_population(np.full(n, np.nan), np.ones(n), np.ones(5), templates=templates)
    assert res.flag & BaselineFlag.NO_DATA
    assert np.all(np.isnan(res.mass_fraction)) and np.isnan(res.logage_lw)
    assert res.light_weights.shape == (16, 6)
    res = fit_population(np.ones(n), np.zeros(n), None, templates=templates)
    assert res.flag == BaselineFlag.NO_DATA | BaselineFlag.NO_PHOTOMETRY


def test_partially_masked_spectrum(model, templates):
    spec, phot, _ = _population(model, {9: 1.0})
    var = _variance(spec, SNR_NOISE_FREE)
    spec = spec.copy()
    spec[600:700] = np.nan  # e.g. a detector gap
    mask = np.zeros(spec.size, bool)
    mask[1500:] = True
    full = fit_population(spec, var, phot, templates=templates, rescale_noise=False,
                          mask_emission=False)
    res = fit_population(spec, var, phot, templates=templates, rescale_noise=False,
                         mask=mask, mask_emission=False)
    assert res.flag == BaselineFlag.OK
    # log pixels inside the masked (or NaN) linear pixels, +-1 partly covered at each end
    w = templates.wavelength.to_value(u.AA)
    lam = templates.lam
    n_red = np.sum(lam > w[1500] - 0.625)
    n_gap = np.sum((lam > w[600] - 0.625) & (lam < w[699] + 0.625))
    assert full.n_good - res.n_good == pytest.approx(n_red, abs=1)
    assert templates.lam.size - full.n_good == pytest.approx(n_gap, abs=2)
    assert abs(res.logage_mw - LOG_AGE[9]) < 0.1


def test_ppxf_failure_is_flagged(model, templates, monkeypatch):
    import ppxf.ppxf

    def broken(*args, **kwargs):
        raise AssertionError("simulated pPXF failure")

    monkeypatch.setattr(ppxf.ppxf, "ppxf", broken)
    spec, phot, _ = _population(model, {14: 1.0})
    res = fit_population(spec, _variance(spec, 50.0), phot, templates=templates)
    assert res.flag == BaselineFlag.FIT_FAILED
    assert np.all(np.isnan(res.mass_fraction))


def test_bad_input_shapes_raise(templates):
    n = templates.wavelength.size
    with pytest.raises(CubeSFHError, match="shape"):
        fit_population(np.ones(n - 1), np.ones(n - 1), templates=templates)
    with pytest.raises(CubeSFHError, match="one value per band"):
        fit_population(np.ones(n), np.ones(n), np.ones(4), templates=templates)
    with pytest.raises(CubeSFHError, match="variance"):
        fit_population(np.ones(n), None, templates=templates)
    with pytest.raises(CubeSFHError, match="dimensionless"):
        fit_population(np.ones(n) * u.erg, np.ones(n), templates=templates)


def test_batch(model, templates):
    spec, phot, _ = _population(model, {12: 1.0})
    n = spec.size
    spectra = np.stack([spec, np.full(n, np.nan)]) * u.dimensionless_unscaled
    variances = np.stack([_variance(spec, SNR_NOISE_FREE), np.ones(n)])
    photometry = np.stack([phot, phot])
    with pytest.warns(CubeSFHWarning, match="1 of 2 spectra"):
        table = fit_populations(spectra, variances, photometry, templates=templates,
                                rescale_noise=False, progress_bar=False)
    assert isinstance(table, QTable)
    assert len(table) == 2
    assert table["mass_fraction"].shape == (2, 16)
    assert table["light_weights"].shape == (2, 16, 6)
    assert table["av"].unit == u.mag
    assert list(table["flag"]) == [0, BaselineFlag.NO_DATA]
    assert abs(table["logage_mw"][0] - LOG_AGE[12]) < 0.1
    assert table.meta["n_failed"] == 1
    assert table.meta["seconds_per_spectrum"] > 0
    assert table.meta["regul"] == 100.0 and table.meta["mdegree"] == 8
    with pytest.raises(CubeSFHError, match="photometry"):
        fit_populations(spectra, variances, photometry[:, :3], templates=templates,
                        progress_bar=False)


def test_dask_workers_give_the_serial_results(model, templates):
    """Fits on worker processes (templates scattered once) equal the serial fits exactly."""
    pytest.importorskip("distributed")
    from cubesfh.baseline import fit_grouped
    from cubesfh.parallel import dask_client, map_bins

    rng = np.random.default_rng(5)
    items = []
    for bins in ({12: 1.0}, {3: 0.1, 13: 0.9}):
        spec, phot, _ = _population(model, bins)
        var = _variance(spec, 50.0)
        items.append((spec + rng.standard_normal(spec.size) * np.sqrt(var), var, phot))
    serial = [fit_population(*item, templates=templates, mdegree=4) for item in items]
    groups = {150.0: templates, 300.0: None}  # only the group named by each item is used
    with dask_client(n_workers=1) as client:
        remote = map_bins(fit_grouped, [(*item, 150.0) for item in items],
                          kwargs={"templates": groups, "mdegree": 4}, scheduler=client,
                          progress_bar=False)
    for a, b in zip(serial, remote, strict=True):
        for name in PopulationFit._fields:
            if name not in ("seconds", "mc"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
