# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of cubesfh.synthesis.mock: files, truth and consistency with the forward model."""

import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS

from cubesfh import Cube, CubeSFHError, HSTImage
from cubesfh.conventions import AGE_BIN_CENTERS, HST_BANDS, Z_SUN
from cubesfh.datasets import PHOTFLAM, broaden_and_shift
from cubesfh.hst import DEFAULT_PSF_FWHM
from cubesfh.photometry import match_psf, reproject_to_cube
from cubesfh.restframe import prepare_spectra
from cubesfh.synthesis import ForwardModel
from cubesfh.synthesis.mock import (
    MockComponent,
    mock_components,
    mock_observation,
    read_mock_truth,
)
from cubesfh.synthesis.model import dust_transmission
from cubesfh.templates import TemplateLibrary, load_filter

SHAPE = (16, 16)
V_SYS = 700.0
#: L_sun / A at 10 Mpc in the cube unit (1e-20 erg/s/cm2/A)
LUM_TO_FLUX = (u.solLum / (4 * np.pi * (10 * u.Mpc) ** 2)).to_value(
    u.erg / u.s / u.cm**2) / 1e-20


def _read_cube(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return Cube.read(path)


def _cube_array(cube):
    return np.asarray(cube.data, dtype=float)


@pytest.fixture(scope="module")
def model():
    return ForwardModel()


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return mock_observation(tmp_path_factory.mktemp("noisy"), shape=SHAPE, seed=3,
                            progress_bar=False)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return mock_observation(tmp_path_factory.mktemp("clean"), shape=SHAPE, seed=3, noise=False,
                            progress_bar=False)


@pytest.fixture(scope="module")
def bulge(tmp_path_factory):
    return mock_observation(tmp_path_factory.mktemp("bulge"), shape=(12, 12),
                            components=("bulge",), noise=False, progress_bar=False)


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    return mock_observation(tmp_path_factory.mktemp("star"), shape=SHAPE, seed=3, noise=False,
                            star=True, progress_bar=False)


def _arm_crest(obs):
    """Spaxel where the young arms are strongest relative to the disc."""
    ratio = (obs.truth["mass_arms"] / obs.truth["mass_disc"]).value
    return np.unravel_index(np.argmax(ratio), ratio.shape)


def _brightest(obs):
    return np.unravel_index(np.argmax(obs.truth["mass_bulge"].value), SHAPE)


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------

def test_cube_reads_back(noisy):
    cube = _read_cube(noisy.cube_path)
    assert cube.shape == (1880, *SHAPE)
    assert cube.wavelength[0].to_value(u.AA) == pytest.approx(4749.72)
    assert np.allclose(np.diff(cube.wavelength.to_value(u.AA)), 1.25)
    assert 7095 < cube.wavelength[-1].to_value(u.AA) < 7100
    assert cube.unit == u.Unit(1e-20 * u.erg / u.s / u.cm**2 / u.AA)
    assert cube.psf_fwhm == 0.7 * u.arcsec
    assert cube.spaxel_scale.to_value(u.arcsec) == pytest.approx(0.2)
    assert cube.meta["INSTRUME"] == "MUSE"
    assert cube.variance is not None
    # the galaxy centre (CRVAL) sits in the middle of the field
    x, y = cube.celestial_wcs.wcs_world2pix([[170.0625, 12.9915]], 0)[0]
    assert (x, y) == pytest.approx(((SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2))


def test_hst_images_read_back(noisy):
    cube = _read_cube(noisy.cube_path)
    assert tuple(noisy.hst_paths) == HST_BANDS
    for band, path in noisy.hst_paths.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            img = HSTImage.read(path)
        assert img.band == band
        assert img.instrument == "WFC3/UVIS"
        assert img.pixel_scale.to_value(u.arcsec) == pytest.approx(0.04)
        assert img.photflam.value == PHOTFLAM[band]
        assert img.psf_fwhm == DEFAULT_PSF_FWHM[band]
        assert img.weight is not None and not img.mask.any()
        # the image covers the whole cube with a margin
        corners = cube.celestial_wcs.wcs_pix2world(
            [[-0.5, -0.5], [SHAPE[1] - 0.5, SHAPE[0] - 0.5]], 0)
        hx, hy = img.wcs.wcs_world2pix(corners, 0).T
        assert np.all(hx > 10) and np.all(hx < img.shape[1] - 10)
        assert np.all(hy > 10) and np.all(hy < img.shape[0] - 10)


def test_truth_file_roundtrip(noisy):
    truth = read_mock_truth(noisy.truth_path)
    for key, value in noisy.truth.items():
        assert type(truth[key]) is type(value)
        np.testing.assert_allclose(np.asarray(getattr(truth[key], "value", truth[key])),
                                   np.asarray(getattr(value, "value", value)), rtol=1e-6,
                                   atol=1e-6)
    assert truth["sfh"].shape == (16, *SHAPE)
    assert truth["hst_flux"].shape == (5, *SHAPE)
    assert truth["v"].unit == u.km / u.s
    np.testing.assert_allclose(truth["age_bins"]["AGE"], AGE_BIN_CENTERS.to_value(u.yr))
    cube = _read_cube(noisy.cube_path)
    with fits.open(noisy.truth_path) as hdul, warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("LOGAGE_LW", "SFH", "HST_FLUX"):
            wcs = WCS(hdul[name].header).celestial
            np.testing.assert_allclose(wcs.pixel_scale_matrix,
                                       cube.celestial_wcs.pixel_scale_matrix)
            np.testing.assert_allclose(wcs.wcs.crval, cube.celestial_wcs.wcs.crval)
            np.testing.assert_allclose(wcs.wcs.crpix, cube.celestial_wcs.wcs.crpix)
        assert hdul["HST_FLUX"].header["BAND4"] == "F555W"


# ----------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------

def test_snr_of_brightest_spaxel(noisy):
    cube = _read_cube(noisy.cube_path)
    snr = cube.snr_map(progress_bar=False)
    assert np.nanmax(snr) == pytest.approx(50.0, rel=1e-3)
    # S/N falls outwards
    assert snr[0, 0] < 0.3 * np.nanmax(snr)


def test_stat_matches_noise(noisy, clean):
    cube = _read_cube(noisy.cube_path)
    model = _cube_array(_read_cube(clean.cube_path))
    stat = np.asarray(cube.variance, dtype=float)
    assert np.array_equal(stat, np.asarray(_read_cube(clean.cube_path).variance))
    pull = (_cube_array(cube) - model) / np.sqrt(stat)
    assert np.std(pull) == pytest.approx(1.0, abs=0.05)
    assert abs(np.mean(pull)) < 0.01
    # per spaxel too, in the brightest and in the faintest one
    var = (_cube_array(cube) - model).reshape(cube.shape[0], -1).var(axis=0)
    ratio = var / stat.reshape(cube.shape[0], -1).mean(axis=0)
    window = model.reshape(cube.shape[0], -1).mean(axis=0)
    for i in (np.argmax(window), np.argmin(window)):
        assert ratio[i] == pytest.approx(1.0, abs=0.15)


# ----------------------------------------------------------------------------
# Spectra against the forward model
# ----------------------------------------------------------------------------

def test_spectra_are_mass_weighted_sums(clean, model):
    """Each spaxel = sum over components of mass map x observed component spectrum."""
    cube = _read_cube(clean.cube_path)
    lib = model.library
    data = _cube_array(cube)
    for y, x in [(0, 0), _brightest(clean), _arm_crest(clean), (3, 12)]:
        v = clean.truth["v"][y, x]
        s = clean.truth["sigma"][y, x]
        expected = np.zeros(cube.shape[0])
        for name, comp in clean.components.items():
            native = model.synthesize_native(comp.mass[None], comp.metallicity[None],
                                             np.array([comp.tau_ism]), np.array([comp.tau_bc]),
                                             gas_sigma=0 * u.km / u.s)
            observed = broaden_and_shift(lib.wavelength, native, v[None], s[None],
                                         cube.wavelength, template_fwhm=lib.fwhm)[0]
            expected += clean.truth[f"mass_{name}"][y, x].value * observed * LUM_TO_FLUX
        np.testing.assert_allclose(data[:, y, x], expected, rtol=0,
                                   atol=1e-6 * expected.max())


def test_pure_bulge_restframe_spectrum(bulge, model):
    """Moved to the rest frame at 150 km/s, a bulge spaxel is the training spectrum."""
    cube = _read_cube(bulge.cube_path)
    flux = _cube_array(cube).reshape(cube.shape[0], -1).T * cube.unit
    prepared = prepare_spectra(cube.wavelength, flux, None, bulge.truth["v"].ravel(),
                               bulge.truth["sigma"].ravel(), progress_bar=False)
    comp = bulge.components["bulge"]
    spec, phot = model.synthesize(comp.mass[None], comp.metallicity[None],
                                  np.array([comp.tau_ism]), np.array([comp.tau_bc]))
    spec, _, _ = model.normalize(spec, phot)
    resid = prepared.flux / spec - 1
    assert np.sqrt(np.mean(resid**2)) < 2e-3
    assert np.abs(resid).max() < 1e-2


def test_pure_bulge_truth_is_model_labels(bulge, model):
    comp = bulge.components["bulge"]
    labels = model.labels(comp.mass[None], comp.metallicity[None])
    for key in ("logage_lw", "logage_mw", "zh_lw", "zh_mw"):
        np.testing.assert_allclose(bulge.truth[key], labels[key][0], atol=1e-12)
    np.testing.assert_allclose(bulge.truth["sfh"],
                               np.broadcast_to(labels["mass_fraction"][0][:, None, None],
                                               (16, 12, 12)), atol=1e-12)
    np.testing.assert_allclose(bulge.truth["zh_age"],
                               np.broadcast_to(labels["metallicity"][0][:, None, None],
                                               (16, 12, 12)), atol=1e-12)
    assert bulge.truth["logage_mw"].min() > 10.0  # old
    assert bulge.truth["zh_mw"].min() > 0.0  # metal-rich
    assert set(bulge.truth) >= {"mass_bulge"} and "mass_disc" not in bulge.truth


def test_mixture_truth_from_stellar_populations(clean, model):
    """Eqs. 6-7 over all the stars of a spaxel, without age bins for the metallicity."""
    lib = model.library
    w = lib.wavelength.to_value(u.AA)
    vband = (w >= 5450) & (w <= 5550)
    v_light = lib.flux[:, :, vband].mean(axis=2)  # dust-free V-band light per template
    log_age = np.log10(AGE_BIN_CENTERS.to_value(u.yr))[lib.age_bin]
    living, light, zh = [], [], []
    for comp in clean.components.values():
        coef = model.coefficients(comp.mass[None], comp.metallicity[None])[0]  # (n_z, n_age)
        living.append((coef * lib.living_fraction).sum(axis=0))
        light.append((coef * v_light).sum(axis=0))
        zh.append(np.log10(comp.metallicity / Z_SUN))
    living, light, zh = np.array(living), np.array(light), np.array(zh)
    for y, x in [(0, 0), _brightest(clean), _arm_crest(clean), (12, 5)]:
        m = np.array([clean.truth[f"mass_{n}"][y, x].value for n in clean.components])
        liv = m[:, None] * living
        lum = m[:, None] * light
        assert clean.truth["zh_mw"][y, x] == pytest.approx((liv * zh).sum() / liv.sum(),
                                                           abs=1e-9)
        assert clean.truth["logage_lw"][y, x] == pytest.approx(
            (lum * log_age).sum() / lum.sum(), abs=1e-9)
        assert clean.truth["logage_mw"][y, x] == pytest.approx(
            (liv * log_age).sum() / liv.sum(), abs=1e-9)
        assert clean.truth["mass_living"][y, x].value == pytest.approx(liv.sum(), rel=1e-9)
    np.testing.assert_allclose(clean.truth["sfh"].sum(axis=0), 1.0, atol=1e-12)


# ----------------------------------------------------------------------------
# Structure and kinematics
# ----------------------------------------------------------------------------

def test_bulge_older_and_more_metal_rich_than_arms(noisy):
    t = noisy.truth
    c = _brightest(noisy)
    a = _arm_crest(noisy)
    assert t["logage_lw"][c] > t["logage_lw"][a] + 1.0
    assert t["logage_mw"][c] > t["logage_mw"][a] + 0.2
    assert t["zh_lw"][c] > t["zh_lw"][a] + 0.05
    assert t["zh_mw"][c] > t["zh_mw"][a] + 0.05
    # dispersion: highest in the bulge, below the 150 km/s of the network inputs
    assert t["sigma"][c] > 70 * u.km / u.s
    assert t["sigma"][a] < 50 * u.km / u.s
    assert t["sigma"].max() < 150 * u.km / u.s


def test_velocity_antisymmetric(noisy):
    dv = noisy.truth["v"].to_value(u.km / u.s) - V_SYS
    np.testing.assert_allclose(dv, -dv[::-1, ::-1], atol=1e-9)
    assert np.abs(dv).max() > 50
    np.testing.assert_allclose(noisy.truth["sigma"].value, noisy.truth["sigma"].value[::-1, ::-1],
                               atol=1e-9)


# ----------------------------------------------------------------------------
# HST images against the cube
# ----------------------------------------------------------------------------

def _hst_on_cube(obs, band):
    cube = _read_cube(obs.cube_path)
    img = HSTImage.read(obs.hst_paths[band])
    sb = match_psf(img.to_surface_brightness(), img.pixel_scale, img.psf_fwhm, cube.psf_fwhm)
    sb_cube, footprint = reproject_to_cube(sb, cube.celestial_wcs, cube.spatial_shape,
                                           wcs=img.wcs)
    assert footprint.min() > 0.999
    return cube, (sb_cube * cube.spaxel_area).to(cube.unit)


def test_hst_matches_truth_photometry(clean):
    """PSF-matched, reprojected HST images give the truth HST fluxes of every spaxel."""
    for j, band in enumerate(HST_BANDS):
        _, hst = _hst_on_cube(clean, band)
        ratio = (hst / clean.truth["hst_flux"][j]).to_value(u.dimensionless_unscaled)
        assert np.abs(ratio - 1).max() < 0.01, band
        total = (hst.sum() / clean.truth["hst_flux"][j].sum()).to_value(u.dimensionless_unscaled)
        assert total == pytest.approx(1.0, abs=2e-3)


def test_hst_f555w_matches_cube(bulge, model):
    """
    F555W image against the cube's synthetic F555W flux.

    The cube covers 4750-7100 A of the 4400-7100 A band: the cube's mean flux
    through the covered part, times the full/covered ratio of the bulge's SED
    (known from the templates), must equal the HST flux.
    """
    cube, hst = _hst_on_cube(bulge, "F555W")
    lib = model.library
    comp = bulge.components["bulge"]
    coef = model.coefficients(comp.mass[None], comp.metallicity[None])[0]
    sed = np.einsum("za,zaw->w", coef, lib.sed_flux.astype(float))
    sed *= dust_transmission(lib.sed_wavelength, comp.tau_ism)  # no young stars
    sed_obs_wave = lib.sed_wavelength * (1 + V_SYS / 299792.458)
    f555w = load_filter("F555W")
    weights = f555w.weights(sed_obs_wave)
    covered = (sed_obs_wave >= cube.wavelength[0]) & (sed_obs_wave <= cube.wavelength[-1])
    full_over_covered = (sed @ weights) / (sed @ (weights * covered) / weights[covered].sum())
    assert 0.9 < full_over_covered < 1.0  # the blue end missing from the cube is fainter
    wc = f555w.weights(cube.wavelength)
    cube_covered = np.tensordot(wc / wc.sum(), _cube_array(cube), axes=1)
    predicted = full_over_covered * cube_covered
    assert hst.value.sum() / predicted.sum() == pytest.approx(1.0, abs=0.01)
    np.testing.assert_allclose(hst.value, predicted, rtol=0.01)


# ----------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------

def test_foreground_star(star, clean):
    t = star.truth
    sx, sy = 0.8 * (SHAPE[1] - 1), 0.2 * (SHAPE[0] - 1)
    iy, ix = round(sy), round(sx)
    assert t["star"][iy, ix] > 0.5
    assert t["star"][-1, 0] < 1e-6
    # the galaxy truth does not change
    np.testing.assert_array_equal(t["logage_lw"], clean.truth["logage_lw"])
    with fits.open(star.truth_path) as hdul:
        assert hdul[0].header["STARX"] == pytest.approx(sx)
    # the cube and the images hold the star on top of the galaxy
    diff = _cube_array(_read_cube(star.cube_path)) - _cube_array(_read_cube(clean.cube_path))
    white = diff.mean(axis=0)
    assert np.unravel_index(np.argmax(white), SHAPE) == (iy, ix)
    img = HSTImage.read(star.hst_paths["F555W"])
    extra = img.data - HSTImage.read(clean.hst_paths["F555W"]).data
    hy, hx = np.unravel_index(np.argmax(extra), img.shape)
    ra, dec = _read_cube(star.cube_path).celestial_wcs.wcs_pix2world(sx, sy, 0)
    px, py = img.wcs.wcs_world2pix(ra, dec, 0)
    assert abs(hx - px) <= 1 and abs(hy - py) <= 1


def test_mock_components():
    comps = mock_components()
    assert tuple(comps) == ("bulge", "disc", "arms")
    model = ForwardModel()
    ages = {}
    for name, comp in comps.items():
        assert comp.mass.sum() == pytest.approx(1.0)
        assert np.all(comp.metallicity > 0)
        labels = model.labels(comp.mass[None], comp.metallicity[None])
        ages[name] = labels["logage_mw"][0]
    assert ages["bulge"] > ages["disc"] > ages["arms"]
    assert ages["arms"] < 8.0


def test_custom_component(tmp_path):
    lib = TemplateLibrary.load()
    mass = np.zeros(lib.n_age)
    mass[-3:] = 2.0  # normalised by mock_observation
    comp = MockComponent("x", mass, np.full(lib.n_age, Z_SUN), 0.0, 0.0)
    obs = mock_observation(tmp_path, shape=(6, 6), components={"bulge": comp}, noise=False,
                           bands=("F555W",), progress_bar=False)
    assert obs.components["bulge"].mass.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(obs.truth["zh_lw"], 0.0, atol=1e-12)
    np.testing.assert_allclose(obs.truth["zh_age"], 0.0, atol=1e-12)
    assert tuple(obs.hst_paths) == ("F555W",)
    assert obs.truth["hst_flux"].shape == (1, 6, 6)


@pytest.mark.parametrize("kwargs", [
    {"shape": (2, 30)},
    {"shape": "big"},
    {"snr": -1},
    {"bands": ("F606W",)},
    {"components": ("halo",)},
    {"components": {"bulge": "old"}},
    {"star": (100.0, 3.0)},
    {"distance": 10.0},
    {"muse_psf_fwhm": 0 * u.arcsec},
    {"hst_psf_fwhm": {"F555W": 0.08 * u.arcsec}},
])
def test_invalid_parameters(tmp_path, kwargs):
    with pytest.raises(CubeSFHError):
        mock_observation(tmp_path, progress_bar=False, **kwargs)


def test_no_overwrite(noisy):
    with pytest.raises(OSError, match="overwrite=True"):
        mock_observation(noisy.cube_path.parent, shape=SHAPE, progress_bar=False)
