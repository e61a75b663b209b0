# Licensed under a 3-clause BSD style license - see LICENSE
"""Radial profiles in deprojected elliptical annuli (``cubesfh.profiles``, ``cubesfh profile``)."""

import re

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import QTable, Table
from astropy.wcs import WCS

from cubesfh import CubeSFHError
from cubesfh.cli import main as cli_main
from cubesfh.conventions import AGE_BIN_EDGES
from cubesfh.flags import BinFlag
from cubesfh.maps import StellarPopulationMaps
from cubesfh.profiles import radial_profile, younger_fraction

N = 61  # spaxels on a side, 0.2 arcsec each
CENTER = SkyCoord(150.0 * u.deg, 2.0 * u.deg)
PA, INC = 30.0, 60.0
AGE_GRADIENT = -0.05  # dex per arcsec of deprojected radius
ZH_GRADIENT = -0.02


def sky_wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [CENTER.ra.deg, CENTER.dec.deg]
    w.wcs.crpix = [(N + 1) / 2, (N + 1) / 2]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def true_radius(wcs):
    yy, xx = np.mgrid[:N, :N]
    east, north = CENTER.spherical_offsets_to(wcs.pixel_to_world(xx, yy))
    east, north = east.to_value(u.arcsec), north.to_value(u.arcsec)
    pa = np.radians(PA)
    x = east * np.sin(pa) + north * np.cos(pa)
    y = east * np.cos(pa) - north * np.sin(pa)
    return np.hypot(x, y / np.cos(np.radians(INC)))


@pytest.fixture(scope="module")
def disc():
    """One spaxel per bin; linear gradients in deprojected radius; a young share f(r)."""
    wcs = sky_wcs()
    r = true_radius(wcs).ravel()
    n = r.size
    t = QTable()
    t["cnn_logage_lw"] = (9.8 + AGE_GRADIENT * r) * u.dex(u.yr)
    t["cnn_logage_mw"] = np.full(n, 9.9) * u.dex(u.yr)
    t["cnn_zh_lw"] = np.full(n, 0.0) * u.dex
    t["cnn_zh_mw"] = (0.1 + ZH_GRADIENT * r) * u.dex
    young = np.clip(0.05 + 0.02 * r, 0.0, 0.9)
    mass = np.zeros((n, 16))
    mass[:, 5] = young  # 0.16 Gyr: younger than 1 and than 5 Gyr
    mass[:, 15] = 1.0 - young
    t["cnn_mass_fraction"] = mass
    t["cnn_zh"] = np.zeros((n, 16)) * u.dex
    flag = np.zeros(n, np.int32)
    flag[r > 9.0] = int(BinFlag.OUT_OF_DISTRIBUTION)  # an outer ring the profile leaves out
    t["flag"] = flag
    maps = StellarPopulationMaps(np.arange(n).reshape(N, N), t, wcs=wcs)
    return maps, r, young


def test_younger_fraction_splits_the_bin_that_holds_the_age():
    edges = AGE_BIN_EDGES.to_value(u.yr)
    mf = np.zeros((1, 16))
    k = int(np.searchsorted(edges, 1e9)) - 1  # the bin containing 1 Gyr
    mf[0, k] = 1.0
    share = (1e9 - edges[k]) / (edges[k + 1] - edges[k])
    assert younger_fraction(mf, 1 * u.Gyr)[0] == pytest.approx(share)
    mf = np.full((1, 16), 1 / 16)
    assert younger_fraction(mf, 100 * u.Gyr)[0] == pytest.approx(1.0)


def test_profile_recovers_the_gradients(disc):
    maps, r, young = disc
    prof = maps.radial_profile(CENTER, pa=PA, inclination=INC, width=0.6 * u.arcsec,
                               distance=10 * u.Mpc, re=5 * u.arcsec)
    g = prof.meta["gradients"]
    assert g["logage_lw"]["per_arcsec"] == pytest.approx(AGE_GRADIENT, abs=2e-3)
    assert g["zh_mw"]["per_arcsec"] == pytest.approx(ZH_GRADIENT, abs=1e-3)
    kpc = 10e3 * np.pi / 180 / 3600  # kpc per arcsec at 10 Mpc
    assert g["logage_lw"]["per_kpc"] == pytest.approx(AGE_GRADIENT / kpc, rel=0.05)
    assert g["logage_lw"]["per_re"] == pytest.approx(AGE_GRADIENT * 5, abs=0.01)
    assert abs(g["logage_mw"]["per_arcsec"]) < 1e-6
    # annulus medians follow the truth at the mid radius
    mid = prof["r_mid"].to_value(u.arcsec)
    np.testing.assert_allclose(prof["logage_lw"], 9.8 + AGE_GRADIENT * mid, atol=0.01)
    np.testing.assert_allclose(prof["young_1gyr"], np.clip(0.05 + 0.02 * mid, 0, 0.9),
                               atol=0.005)
    np.testing.assert_allclose(prof["young_5gyr"], prof["young_1gyr"])
    # the flagged outer ring is left out (and counted)
    assert prof["r_out"][-1].to_value(u.arcsec) < 9.0 + 0.6 + 1e-9
    assert prof["flagged_fraction"][0] == 0
    assert prof["r_mid_kpc"].unit == u.kpc
    # the right geometry matters: the major axis at the wrong angle gives a wrong gradient
    wrong = maps.radial_profile(CENTER, pa=PA + 90, inclination=INC, width=0.6 * u.arcsec)
    assert abs(wrong.meta["gradients"]["logage_lw"]["per_arcsec"] - AGE_GRADIENT) > 0.01


def test_profile_keeps_flagged_bins_on_request(disc):
    maps, r, _ = disc
    prof = radial_profile(maps, (CENTER.ra.deg, CENTER.dec.deg), pa=PA, inclination=INC,
                          width=0.6, exclude=0)
    outer = prof["r_mid"].to_value(u.arcsec) > 9.6
    assert outer.any()
    assert np.all(prof["flagged_fraction"][outer] == 1.0)
    assert np.all(prof["n_bins"] > 0)


def test_bootstrap_interval_brackets_the_median(disc):
    maps, _, _ = disc
    prof = maps.radial_profile(CENTER, pa=PA, inclination=INC, width=1.0)
    for q in ("logage_lw", "zh_mw"):
        assert np.all(prof[q + "_boot_p16"] <= prof[q] + 1e-9)
        assert np.all(prof[q + "_boot_p84"] >= prof[q] - 1e-9)
        assert np.all(prof[q + "_p16"] <= prof[q + "_boot_p16"] + 1e-9)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"inclination": 95}, "inclination must be an angle"),
    ({"pa": float("nan")}, "pa must be an angle"),
    ({"width": 0}, "width must be a positive"),
    ({"distance": -3}, "distance must be a positive"),
    ({"quantities": ("logsfr",)}, "unknown quantities"),
    ({"method": "ppxf"}, "no ppxf results"),
])
def test_bad_profile_arguments(disc, kwargs, pattern):
    maps, _, _ = disc
    args = {"pa": PA, "inclination": INC, **kwargs}
    with pytest.raises(CubeSFHError, match=pattern):
        maps.radial_profile(CENTER, **args)


def test_command_line_profile(disc, tmp_path, capsys):
    maps, _, _ = disc
    path = maps.write(tmp_path / "maps.fits")
    out = tmp_path / "profile.ecsv"
    argv = ["profile", str(path), "--center", "150.0", "2.0", "--pa", str(PA),
            "--inclination", str(INC), "--width", "0.6", "--distance", "10", "-o", str(out),
            "--plot", str(tmp_path / "profile.png")]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert re.search(r"logage_lw\s+gradient -0\.0(49|50)\d \+- 0\.00\d\d per arcsec, "
                     r"-1\.0[0-9]{3} per kpc", text), text
    back = Table.read(out)
    assert back.meta["gradients"]["logage_lw"]["per_arcsec"] == pytest.approx(AGE_GRADIENT,
                                                                              abs=2e-3)
    assert (tmp_path / "profile.png").stat().st_size > 10_000
    # refused without --overwrite; FITS output carries the gradients as header cards
    assert cli_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    fits_out = tmp_path / "profile.fits"
    assert cli_main([*argv[:-4], "-o", str(fits_out)]) == 0
    header = fits.getheader(fits_out, 1)
    assert header["GAGLW"] == pytest.approx(AGE_GRADIENT, abs=2e-3)
    assert header["GZHMW"] == pytest.approx(ZH_GRADIENT, abs=1e-3)
    assert abs(header["GAGMW"]) < 1e-6


def test_one_large_outer_bin_counts_once_in_the_gradient(disc):
    """A big outer Voronoi bin spans many annuli: it must not dominate the gradient."""
    maps, r, _ = disc
    rng = np.random.default_rng(4)
    t = maps.table[["cnn_logage_lw", "cnn_logage_mw", "cnn_zh_lw", "cnn_zh_mw",
                    "cnn_mass_fraction", "cnn_zh"]].copy()
    bin_map = np.arange(r.size)
    outer = r > 6.0
    bin_map[outer] = bin_map[outer][0]  # one bin for everything beyond 6 arcsec
    keep = np.unique(bin_map)
    renumber = np.searchsorted(keep, bin_map)
    t = t[keep]
    t["cnn_logage_lw"] = (9.8 + AGE_GRADIENT * r[keep] + 0.1 * rng.standard_normal(keep.size)
                          ) * u.dex(u.yr)
    t["cnn_logage_lw"][-1] = 10.1 * u.dex(u.yr) if outer[keep[-1]] else t["cnn_logage_lw"][-1]
    t["flag"] = np.zeros(keep.size, np.int32)
    big = StellarPopulationMaps(renumber.reshape(N, N), t, wcs=maps.wcs)
    prof = big.radial_profile(CENTER, pa=PA, inclination=INC, width=0.6)
    g = prof.meta["gradients"]["logage_lw"]
    assert g["per_arcsec"] == pytest.approx(AGE_GRADIENT, abs=0.01)
    assert g["err_per_arcsec"] > 0.001  # from the bins, not from 30 annuli of one bin
