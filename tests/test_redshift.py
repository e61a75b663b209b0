# Licensed under a 3-clause BSD style license - see LICENSE
"""
Systemic redshift estimation (`cubesfh.redshift`) and the consistency checks
of the kinematics (`cubesfh.kinematics.check_kinematics`).

Known answers: the mocks are made at a chosen systemic velocity, so the
estimate must land within 30 km/s of it (the rotation of the mock disc is
+-150 km/s and the brightest spaxels sit at its centre); a template spectrum
redshifted by hand must be found within 1e-4 in z even with emission lines
ten times the continuum.
"""

import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.table import QTable

from cubesfh import Cube
from cubesfh.datasets import make_example_observation
from cubesfh.kinematics import KinematicsFlag, check_kinematics
from cubesfh.redshift import estimate_redshift, galaxy_spectrum, redshift_from_spectrum
from cubesfh.templates import TemplateLibrary
from cubesfh.utils import CubeSFHError, CubeSFHWarning

C_KMS = 299792.458


@pytest.mark.parametrize("velocity", [-300.0, 700.0, 25_000.0, 60_000.0])
def test_estimate_redshift_of_mock_cubes(tmp_path, velocity):
    obs = make_example_observation(tmp_path, shape=(16, 16), seed=1,
                                   systemic_velocity=velocity * u.km / u.s)
    cube = Cube.read(obs.cube_path)
    est = estimate_redshift(cube)
    assert est.cz.to_value(u.km / u.s) == pytest.approx(velocity, abs=30.0)
    assert est.z_err < 1e-4
    assert est.contrast > 2  # unambiguous
    assert est.n_spaxels >= 9
    assert f"{est.z:.5f}" in str(est)


def _redshifted_template(z, *, lines=True, seed=0):
    """An old+young template observed at z on a MUSE grid, with noise (S/N ~ 60)."""
    from scipy.ndimage import gaussian_filter1d

    lib = TemplateLibrary.load()
    lam_t = lib.wavelength.to_value(u.AA)
    binned = lib.binned()
    rest = binned[3, 14] + 0.2 * binned[3, 5] * binned[3, 14].mean() / binned[3, 5].mean()
    rest = gaussian_filter1d(rest, 200.0 / C_KMS * 6000 / np.median(np.diff(lam_t)))
    if lines:
        cont = np.median(rest)
        for line, amp in ((6562.8, 10.0), (5006.8, 6.0), (4861.3, 3.0), (6583.5, 4.0)):
            rest = rest + amp * cont * np.exp(-0.5 * ((lam_t - line) / 1.5) ** 2)
    wave = np.arange(4750.0, 9350.0, 1.25)
    flux = np.interp(wave / (1 + z), lam_t, rest, left=np.nan, right=np.nan)
    rng = np.random.default_rng(seed)
    sigma = np.nanmedian(flux) / 60.0
    flux = flux + rng.normal(0.0, sigma, flux.size)
    return wave * u.AA, flux, np.full(flux.size, sigma**2)


@pytest.mark.parametrize("z", [0.004, 0.15, 0.31])
def test_redshift_from_spectrum_with_emission_lines(z):
    wave, flux, var = _redshifted_template(z)
    est = redshift_from_spectrum(wave, flux, var)
    assert est.z == pytest.approx(z, abs=1e-4)
    assert est.correlation > 0.3


def test_redshift_outside_search_range_is_not_invented():
    # a galaxy at z = 0.3 searched only up to 0.1 must not give 0.3, nor a
    # confident wrong answer
    wave, flux, var = _redshifted_template(0.3, lines=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            est = redshift_from_spectrum(wave, flux, var, z_range=(0.0, 0.1))
        except CubeSFHError:
            return
    assert est.z < 0.11
    assert any(issubclass(w.category, CubeSFHWarning) and "uncertain" in str(w.message)
               for w in rec) or est.chi2 > 3


def test_redshift_of_empty_spectrum_fails_clearly():
    wave = np.arange(4750.0, 9350.0, 1.25) * u.AA
    with pytest.raises(CubeSFHError, match="Pass it yourself"):
        redshift_from_spectrum(wave, np.full(wave.size, np.nan))


def test_galaxy_spectrum_brightest_spaxels(tmp_path):
    obs = make_example_observation(tmp_path, shape=(12, 12), seed=2)
    cube = Cube.read(obs.cube_path)
    wave, flux, var, n = galaxy_spectrum(cube, fraction=0.1)
    assert n == 14  # round(0.1 * 144)
    assert flux.shape == wave.shape == var.shape
    # the mean of the brightest spaxels is brighter than the mean of all
    data = np.nanmean(cube.data.reshape(cube.shape[0], -1), axis=1)
    assert np.nanmedian(flux) > 1.5 * np.nanmedian(data)
    mask = np.ones(cube.spatial_shape, bool)
    with pytest.raises(CubeSFHError, match="no spaxel"):
        galaxy_spectrum(cube, mask=mask)


def test_prepare_observation_estimates_redshift_and_window(tmp_path):
    from cubesfh.preprocess import prepare_observation
    from cubesfh.synthesis.mock import mock_observation

    obs = mock_observation(tmp_path, shape=(14, 14), seed=4,
                           systemic_velocity=25_000 * u.km / u.s, progress_bar=False)
    cube = Cube.read(obs.cube_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CubeSFHWarning)
        prep = prepare_observation(cube, None, target_snr=20, progress_bar=False)
    z_true = 25_000 / C_KMS
    assert prep.meta["redshift_source"] == "estimated"
    assert prep.meta["redshift"] == pytest.approx(z_true, abs=1e-4)
    assert prep.meta["snr_window"][0] == pytest.approx(5300 * (1 + z_true), abs=1.0)
    assert prep.kinematics.meta["redshift"] == pytest.approx(prep.meta["redshift"])
    assert "systemic redshift z = 0.083" in prep.summary()
    vel = prep.kinematics["velocity"].to_value(u.km / u.s)
    assert abs(np.median(vel)) < 50


def _table(vel, chi2, z=0.01):
    t = QTable()
    t["velocity"] = np.asarray(vel, float) * u.km / u.s
    t["velocity_err"] = np.full(len(vel), 5.0) * u.km / u.s
    t["chi2"] = np.asarray(chi2, float)
    t["flag"] = np.zeros(len(vel), np.int16)
    t.meta["redshift"] = z
    return t


def test_check_kinematics_flags_outliers():
    rng = np.random.default_rng(0)
    vel = rng.normal(0.0, 60.0, 40)
    vel[7] = 1500.0
    chi2 = np.full(40, 1.2)
    chi2[3] = 9.0
    t = _table(vel, chi2)
    with pytest.warns(CubeSFHWarning) as rec:
        problems = check_kinematics(t)
    assert "VELOCITY_OUTLIER" in str(rec[1].message)
    flags = np.asarray(t["flag"])
    assert np.flatnonzero(flags & KinematicsFlag.VELOCITY_OUTLIER).tolist() == [7]
    assert np.flatnonzero(flags & KinematicsFlag.CHI2_HIGH).tolist() == [3]
    assert len(problems) == 2


def test_check_kinematics_wrong_systemic_and_variances():
    vel = np.full(30, 650.0) + np.linspace(-100, 100, 30)
    t = _table(vel, np.full(30, 20.0), z=0.0)
    with pytest.warns(CubeSFHWarning) as rec:
        problems = check_kinematics(t)
    text = " ".join(problems)
    assert "systemic redshift is probably wrong" in text
    assert "z ~ 0.00217" in text  # (1 + 0) (1 + 650/c) - 1
    assert "mis-scaled" in text
    assert len(rec) == 2
    assert not np.any(np.asarray(t["flag"]))  # a coherent field: no bin singled out


def test_check_kinematics_clean_cube_is_silent():
    vel = 200 * np.sin(np.linspace(0, 2 * np.pi, 50))
    t = _table(vel, np.full(50, 1.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_kinematics(t) == []
    assert not np.any(np.asarray(t["flag"]))


def test_check_kinematics_bounds():
    """Velocities at a bound point to a wrong systemic; unresolved dispersions do not."""
    vel = 50 * np.sin(np.linspace(0, 2 * np.pi, 12))
    t = _table(vel, np.full(12, 1.1))
    t["sigma"] = np.full(12, 80.0) * u.km / u.s
    t["sigma"][:6] = 1.0 * u.km / u.s  # half the fits unresolved, at the 1 km/s bound
    t["flag"][:6] = KinematicsFlag.AT_BOUND
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_kinematics(t) == []
    t = _table(vel, np.full(12, 1.1))
    t["sigma"] = np.full(12, 80.0) * u.km / u.s
    t["flag"][:6] = KinematicsFlag.AT_BOUND  # e.g. velocities at +-2000 km/s
    with pytest.warns(CubeSFHWarning, match="6 of 12 fits ended at a bound"):
        check_kinematics(t)


def test_command_line_redshift(tmp_path, capsys):
    from cubesfh.cli import main

    obs = make_example_observation(tmp_path, shape=(12, 12), seed=5,
                                   systemic_velocity=1500 * u.km / u.s)
    assert main(["redshift", str(obs.cube_path)]) == 0
    out = capsys.readouterr().out
    z = float(out.split("z = ")[1].split()[0])
    assert z == pytest.approx(1500 / C_KMS, abs=1e-4)
    assert "candidates:" in out
