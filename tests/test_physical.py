# Licensed under a 3-clause BSD style license - see LICENSE
"""Physical maps: remnants, mass-to-light ratios, surface densities, distances, the head."""

import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import QTable

from cubesfh.conventions import AGE_BIN_EDGES, N_AGE_BINS
from cubesfh.physical import (
    IMF_FACTORS,
    L_V_SUN,
    check_distance,
    distance_from_header,
    mass_to_light,
    physical_columns,
)
from cubesfh.synthesis import ForwardModel
from cubesfh.templates import TemplateLibrary
from cubesfh.templates._remnants import remnant_fraction, remnant_mass
from cubesfh.utils import CubeSFHError, CubeSFHWarning


@pytest.fixture(scope="module")
def library():
    return TemplateLibrary.load()


@pytest.fixture(scope="module")
def model():
    return ForwardModel()


# --------------------------------------------------------------------------- remnants

def test_remnant_mass_relation():
    # Renzini & Ciotti (1993): white dwarfs 0.077 m + 0.48, neutron stars 1.4, black holes m / 2
    assert remnant_mass(1.0) == pytest.approx(0.557)
    assert remnant_mass(20.0) == pytest.approx(1.4)
    assert remnant_mass(60.0) == pytest.approx(30.0)


def test_remnant_fraction_limits_and_old_population(library):
    assert float(remnant_fraction(1.0)) == 0.0
    # a 10-13 Gyr Chabrier population keeps 55-60 % of its formed mass in stars +
    # remnants (BC03: ~0.57 at 12 Gyr), ~0.12-0.15 of it in remnants
    old = library.ages.to_value(u.yr) > 9e9
    total = library.living_fraction[:, old] + library.remnant_fraction[:, old]
    assert np.all((total > 0.53) & (total < 0.62))
    solar = int(np.argmin(np.abs(library.zh)))
    assert np.all((library.remnant_fraction[solar, old] > 0.11)
                  & (library.remnant_fraction[solar, old] < 0.17))
    # more remnants as the population ages
    assert np.all(np.diff(library.remnant_fraction[3, 10:]) >= -1e-12)


# --------------------------------------------------------------------------- M/L

def test_solar_v_luminosity():
    # the solar irradiance at 550 nm, ~1.87 W m-2 nm-1 at 1 au, gives 1.37e-4 L_sun / A
    lam = (4 * np.pi * (1 * u.au) ** 2 * 1.87 * u.W / u.m**2 / u.nm).to(u.solLum / u.AA)
    assert L_V_SUN.to_value(u.solLum / u.AA) == pytest.approx(lam.value, rel=0.03)


def test_mass_to_light_reproduces_forward_model(model, library):
    """Constant SFR inside each bin at one [Z/H] per bin: the labels give back M/L exactly."""
    rng = np.random.default_rng(3)
    n = 20
    edges = library.age_edges.to_value(u.yr)
    dur = np.diff(edges)
    sfr_bin = rng.uniform(0.0, 1.0, (n, N_AGE_BINS)) * (rng.uniform(size=(n, N_AGE_BINS)) > 0.3)
    sfr_bin[:, -1] += 0.1
    mass = sfr_bin[:, library.age_bin] * dur[None, :]  # formed per sub-interval
    z_bin = 10 ** rng.uniform(np.log10(0.006), np.log10(0.03), (n, N_AGE_BINS))
    z = z_bin[:, library.age_bin]
    budget = model.stellar_budget(mass, z, np.zeros(n), np.zeros(n))
    labels = model.labels(mass, z)
    ml = mass_to_light(labels["mass_fraction"], labels["metallicity"], library=library)
    expected = ((budget["living"] + budget["remnants"]) / budget["v_intrinsic"]
                * L_V_SUN.to_value(u.solLum / u.AA))
    np.testing.assert_allclose(ml["ml_v"], expected, rtol=2e-3)
    np.testing.assert_allclose(ml["ml_v_living"],
                               budget["living"] / budget["v_intrinsic"]
                               * L_V_SUN.to_value(u.solLum / u.AA), rtol=2e-3)
    # the formed-mass SFH: formed per unit living mass, summing to formed / living
    np.testing.assert_allclose(ml["formed_per_living"].sum(axis=1),
                               mass.sum(axis=1) / budget["living"], rtol=2e-3)


def test_mass_to_light_old_and_young(library):
    f = np.zeros((2, N_AGE_BINS))
    f[0, -2] = 1.0  # 8.6 Gyr
    f[1, 3] = 1.0  # 76 Myr
    ml = mass_to_light(f, np.zeros_like(f), library=library)["ml_v"]
    # BC03 Chabrier solar: M*/L_V of a few for old populations, ~0.1 at 100 Myr
    assert 2.5 < ml[0] < 6.0
    assert 0.05 < ml[1] < 0.2
    with pytest.raises(CubeSFHError, match="mass_fraction"):
        mass_to_light(np.zeros((2, 15)), np.zeros((2, 15)))


def test_stellar_budget_attenuation(model):
    n = 2
    mass = np.zeros((n, model.library.n_age))
    mass[:, -5] = 1e6  # old stars only: the ISM screen alone, A = 1.086 tau
    z = np.full_like(mass, 0.02)
    b = model.stellar_budget(mass, z, np.array([0.0, 1.0]), np.array([1.0, 1.0]))
    av = -2.5 * np.log10(b["v_attenuated"] / b["v_intrinsic"])
    np.testing.assert_allclose(av, [0.0, 2.5 / np.log(10)], atol=1e-10)


# --------------------------------------------------------------------------- distances

@pytest.mark.parametrize("bad", [0.0, -3.0, np.nan, np.inf, "far", [1.0, 2.0], 3 * u.s])
def test_bad_distance(bad):
    with pytest.raises(CubeSFHError, match="distance"):
        check_distance(bad)


def test_distance_against_redshift():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_distance(10.0, redshift=0.0023) == 10 * u.Mpc
        # Virgo: 16.5 Mpc at cz = 2300 km/s is within the allowance
        check_distance(16.5 * u.Mpc, redshift=2300 / 299792.458)
    with pytest.warns(CubeSFHWarning, match=r"10 Mpc.*z = 0.03"):
        check_distance(10 * u.Mpc, redshift=0.03)
    # kpc taken as Mpc: a thousand times too far
    with pytest.warns(CubeSFHWarning, match="unit"):
        check_distance(11300.0, redshift=0.0023)


def test_distance_from_header():
    h = fits.Header()
    assert distance_from_header(h) is None
    h["DISTANCE"] = (11.3, "[Mpc] distance")
    assert distance_from_header(h) == 11.3 * u.Mpc
    h["DISTANCE"] = (840.0, "[kpc] distance")
    assert distance_from_header(h).to_value(u.Mpc) == pytest.approx(0.84)
    h2 = fits.Header({"DIST_MPC": 9.84})
    assert distance_from_header(h2) == 9.84 * u.Mpc


# --------------------------------------------------------------------------- columns

def _table(n=2, av=0.0, flux=1e-17):
    t = QTable()
    f = np.zeros((n, N_AGE_BINS))
    f[:, -2] = 0.8
    f[:, 2] = 0.2
    t["cnn_mass_fraction"] = f
    t["cnn_zh"] = np.zeros((n, N_AGE_BINS)) * u.dex
    t["cnn_mass_fraction_p16"] = 0.5 * f
    t["cnn_mass_fraction_p84"] = np.minimum(1.5 * f, 1)
    t["norm"] = np.full(n, flux) * u.erg / u.s / u.cm**2 / u.AA
    t["v_flux"] = np.full(n, 0.9)
    t["n_spaxels"] = np.full(n, 4)
    t["cnn_av_stars"] = np.full(n, av) * u.mag
    t["cnn_logmstar_sd_err"] = np.full(n, 0.1) * u.dex
    return t


def test_surface_density_known_answer(library):
    area = (0.2 * u.arcsec) ** 2
    t = _table()
    cols = physical_columns(t, spaxel_area=area, distance=10 * u.Mpc, library=library)
    ml = mass_to_light(t["cnn_mass_fraction"], np.zeros((2, N_AGE_BINS)),
                       library=library)["ml_v"][0]
    # Sigma = M/L x 4 pi I / L_V,sun, independent of the distance
    intensity = 1e-17 * 0.9 * u.erg / u.s / u.cm**2 / u.AA / area.to(u.sr)
    expected = np.log10(ml * (4 * np.pi * u.sr * intensity / L_V_SUN).to_value(u.pc**-2))
    assert cols["cnn_logmstar_sd"].value[0] == pytest.approx(expected, abs=1e-6)
    assert cols["cnn_logmstar_sd_p84"].value[0] - expected == pytest.approx(0.1)
    cols20 = physical_columns(t, spaxel_area=area, distance=20 * u.Mpc, library=library)
    assert cols20["cnn_logmstar_sd"].value[0] == pytest.approx(expected, abs=1e-6)
    # the mass of the bin grows as D^2: 4 spaxels of (0.2" x 10 Mpc)^2
    pc2 = 4 * ((0.2 * u.arcsec).to_value(u.rad) * 1e7) ** 2
    assert cols["cnn_logmstar"].value[0] == pytest.approx(expected + np.log10(pc2), abs=1e-6)
    assert cols20["cnn_logmstar"].value[0] == pytest.approx(
        expected + np.log10(4 * pc2), abs=1e-6)
    # dust, IMF and inclination
    dusty = physical_columns(_table(av=1.0), spaxel_area=area, distance=10 * u.Mpc,
                             library=library)
    assert dusty["cnn_logmstar_sd"].value[0] - expected == pytest.approx(0.4)
    salp = physical_columns(t, spaxel_area=area, distance=10 * u.Mpc, imf="salpeter",
                            library=library)
    assert salp["cnn_logmstar_sd"].value[0] - expected == pytest.approx(-np.log10(0.61))
    assert (salp["cnn_sfr_sd"][0, -2] / cols["cnn_sfr_sd"][0, -2]).value == pytest.approx(
        1 / 0.63)
    inc = physical_columns(t, spaxel_area=area, distance=10 * u.Mpc, inclination=60 * u.deg,
                           library=library)
    assert inc["cnn_logmstar_sd_deproj"].value[0] - expected == pytest.approx(np.log10(0.5))
    with pytest.raises(CubeSFHError, match="imf"):
        physical_columns(t, spaxel_area=area, distance=10 * u.Mpc, imf="top-heavy")
    assert set(IMF_FACTORS) == {"chabrier", "salpeter", "kroupa"}


def test_sfr_sums_to_formed_mass(library):
    area = (0.2 * u.arcsec) ** 2
    t = _table()
    cols = physical_columns(t, spaxel_area=area, distance=10 * u.Mpc, library=library)
    dur = np.diff(AGE_BIN_EDGES.to_value(u.yr))
    formed = (cols["cnn_sfr_sd"].to_value(u.solMass / u.yr / u.pc**2) * dur).sum(axis=1)
    ml = mass_to_light(t["cnn_mass_fraction"], np.zeros((2, N_AGE_BINS)), library=library)
    living = 10 ** cols["cnn_logmstar_sd_living"].value
    np.testing.assert_allclose(formed, living * ml["formed_per_living"].sum(axis=1), rtol=1e-9)
    # 100 Myr: bins 0-3 whole (up to 93 Myr) and 16 % of bin 4; only bin 2 has mass here
    sfr100 = 10 ** cols["cnn_logsfr_sd_100myr"].value
    sfr2 = cols["cnn_sfr_sd"].value[:, 2]
    np.testing.assert_allclose(sfr100, sfr2 * dur[2] / 1e8, rtol=1e-9)
    lo, hi = cols["cnn_sfr_sd_p16"].value[0], cols["cnn_sfr_sd_p84"].value[0]
    mid = cols["cnn_sfr_sd"].value[0]
    assert np.all(lo[mid > 0] < mid[mid > 0]) and np.all(hi[mid > 0] > mid[mid > 0])


def test_relative_flux_unit_refused(library):
    t = _table()
    t["norm"] = np.ones(2) * u.count
    with pytest.raises(CubeSFHError, match="absolute flux"):
        physical_columns(t, spaxel_area=(0.2 * u.arcsec) ** 2, distance=10 * u.Mpc)


# --------------------------------------------------------------------------- the head

def test_bundled_models_have_calibrated_attenuation_heads():
    pytest.importorskip("torch")
    from cubesfh.network import bundled_models

    for m in bundled_models():
        assert m.has_physical_head
        head = m.meta["physical_head"]
        k = np.asarray(head["conformal_k"])
        assert k.shape == (2, 2)
        assert np.all((k[0] > 0.5) & (k[0] < 2.0)) and np.all(k[1] > k[0])
        met = head["calibration_metrics"]
        # on fresh broad-simulator spectra (docs/physical.rst)
        assert abs(met["av_stars"]["median"]) < 0.1 and met["av_stars"]["nmad"] < 0.3
        assert abs(met["logmstar_sd"]["median"]) < 0.1 and met["logmstar_sd"]["nmad"] < 0.2


@pytest.mark.parametrize("ages", [slice(-6, None), slice(0, None)], ids=["old", "constant"])
def test_predict_gives_attenuation(model, ages):
    """The A_V of the stellar light rises with the dust and its 95 % interval holds it."""
    pytest.importorskip("torch")
    from cubesfh.network import SFHModel
    from cubesfh.synthesis.model import metallicity_history

    net = SFHModel.load()
    mass = np.zeros((4, model.library.n_age))
    mass[:, ages] = 1e6
    z = metallicity_history(mass, np.full(4, 0.02))
    tau = np.array([0.05, 0.4, 0.8, 1.2])
    tau_bc = np.ones(4)
    spec, phot = model.synthesize(mass, z, tau, tau_bc)
    spec, phot, _ = model.normalize(spec, phot)
    b = model.stellar_budget(mass, z, tau, tau_bc)
    truth = -2.5 * np.log10(b["v_attenuated"] / b["v_intrinsic"])
    out = net.predict(spec, phot)
    assert np.all(np.diff(out["av_stars"]) > 0)
    assert np.all((out["av_stars_p02"] <= truth) & (truth <= out["av_stars_p98"]))
    assert np.all(out["av_stars_p16"] < out["av_stars"])
    assert np.all(out["av_stars_p98"] > out["av_stars_p84"])
    assert np.all(out["logmstar_sd_err"] > 0) and np.all(out["logmstar_sd_err"] < 0.5)
