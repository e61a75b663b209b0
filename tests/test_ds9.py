# Licensed under a 3-clause BSD style license - see LICENSE
"""
Real-viewer check: the FITS maps product opened in a real SAOImage DS9.

DS9 runs on a private Xvfb display and is driven through XPA
(`cubesfh.utils._ds9`). Every map extension is loaded by name; DS9 must see
the array shape, the pixel values, the celestial WCS (to < 0.01 arcsec of
astropy) and ``BUNIT`` of the header, and the ``SFH`` cube must have one plane
per age bin. Skipped (with the reason) when ``ds9``, ``Xvfb`` or the XPA
programs are not installed (Debian: ``apt-get install saods9 xvfb xpa-tools``).
"""

import re

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import QTable
from astropy.wcs import WCS
from helpers import rotated_muse_wcs

from cubesfh.conventions import N_AGE_BINS
from cubesfh.maps import StellarPopulationMaps
from cubesfh.utils._ds9 import DS9, missing_programs

#: Marks every test as one that needs the real viewer (shown by ``pytest -ra``).
real_ds9 = pytest.mark.skipif(bool(missing_programs()),
                              reason="real-viewer check: needs SAOImage DS9, Xvfb and XPA "
                                     f"(not on PATH: {', '.join(missing_programs())})")
pytestmark = real_ds9

NY, NX = 7, 11  # not square: a transposed axis order would show
#: 1-based (FITS / DS9 image) pixels where the WCS is compared: a corner, a pixel
#: centre off the reference pixel and a fractional position.
PIXELS = ((1.0, 1.0), (3.0, 5.0), (10.5, 6.25))
MAX_SEPARATION = 0.01 * u.arcsec


def make_maps():
    """A product with every kind of extension: CNN with intervals, pPXF, differences."""
    y, x = np.mgrid[0:NY, 0:NX]
    bin_map = (y // 2) * 4 + x // 3
    bin_map[0, 0] = -1
    n = bin_map.max() + 1
    k = np.arange(n, dtype=float)
    t = QTable()
    for prefix, offset in (("cnn_", 0.0), ("ppxf_", 0.1)):
        t[prefix + "logage_lw"] = 8.5 + 0.05 * k + offset
        t[prefix + "logage_mw"] = 9.5 + 0.03 * k + offset
        t[prefix + "zh_lw"] = -0.3 + 0.02 * k + offset
        t[prefix + "zh_mw"] = -0.2 + 0.02 * k + offset
        weights = 1.0 + np.arange(N_AGE_BINS)[None, :] + k[:, None]
        t[prefix + "mass_fraction"] = weights / weights.sum(axis=1, keepdims=True)
        t[prefix + "zh"] = np.zeros((n, N_AGE_BINS)) + offset
    for q in ("logage_lw", "logage_mw", "zh_lw", "zh_mw"):
        t[f"cnn_{q}_p16"] = t[f"cnn_{q}"] - 0.1
        t[f"cnn_{q}_p84"] = t[f"cnn_{q}"] + 0.1
    t["cnn_mass_fraction_p16"] = 0.9 * t["cnn_mass_fraction"]
    t["cnn_mass_fraction_p84"] = 1.1 * t["cnn_mass_fraction"]
    t["cnn_ood_score"] = np.linspace(0.2, 1.4, n)
    t["velocity"] = np.linspace(-50, 50, n) * u.km / u.s
    t["sigma"] = np.linspace(60, 160, n) * u.km / u.s
    t["snr"] = np.linspace(20, 60, n)
    # physical maps and the fit check (issues 18 and 19)
    t["cnn_av_stars"] = np.linspace(0.1, 1.2, n) * u.mag
    t["cnn_av_stars_p16"] = t["cnn_av_stars"] - 0.2 * u.mag
    t["cnn_av_stars_p84"] = t["cnn_av_stars"] + 0.2 * u.mag
    t["cnn_ml_v"] = np.linspace(0.5, 4.0, n) * u.solMass / u.solLum
    sd = u.dex(u.solMass / u.pc**2)
    t["cnn_logmstar_sd"] = np.linspace(1.5, 3.5, n) * sd
    t["cnn_logmstar_sd_p16"] = (np.linspace(1.5, 3.5, n) - 0.1) * sd
    t["cnn_logmstar_sd_p84"] = (np.linspace(1.5, 3.5, n) + 0.1) * sd
    t["cnn_logmstar_sd_deproj"] = (np.linspace(1.5, 3.5, n) - 0.1) * sd
    sfr = weights * 1e-3 * u.solMass / u.yr / u.kpc**2
    t["cnn_sfr_sd"], t["cnn_sfr_sd_p16"], t["cnn_sfr_sd_p84"] = sfr, 0.5 * sfr, 2 * sfr
    lsfr = u.dex(u.solMass / u.yr / u.kpc**2)
    for suffix, shift in (("", 0.0), ("_p16", -0.2), ("_p84", 0.2)):
        t["cnn_logsfr_sd_100myr" + suffix] = (np.linspace(-3, -1, n) + shift) * lsfr
    t["cnn_fit_chi2"] = np.linspace(0.9, 1.5, n)
    t["ppxf_fit_chi2"] = np.linspace(0.9, 1.3, n)
    t["cnn_av_fit"] = np.linspace(0.0, 1.0, n) * u.mag
    t["cnn_phot_resid"] = 0.01 * (k[:, None] - np.arange(5)[None, :])
    t["tension"] = np.linspace(0.5, 8.0, n)
    return StellarPopulationMaps(bin_map, t, wcs=rotated_muse_wcs())


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    maps = make_maps()
    path = maps.write(tmp_path_factory.mktemp("ds9") / "maps.fits")
    with fits.open(path) as hdul:
        images = {h.name: (h.header.copy(), h.data.copy()) for h in hdul[1:]
                  if h.is_image and h.data is not None}
    assert set(images) == set(maps.extension_names)
    return path, images


@pytest.fixture(scope="module")
def ds9():
    """A real DS9 on its own Xvfb display (terminated at the end of the module)."""
    viewer = DS9(timeout=60.0, xpa_timeout=20.0)
    with viewer:
        # enough digits: 1e-10 deg in degrees, 1e-8 for pixel values
        viewer.set("precision", 8, 10, 4, 3, 8, 7, 5, 3, 8)
        yield viewer


def load(ds9, path, name):
    ds9.set("fits", f"{path}[{name}]")
    assert ds9.get("fits", "header", "keyword", "EXTNAME") == name


def test_ds9_runs(ds9):
    name, version = ds9.get("version").split()
    assert name == ds9.title
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", version), version
    print(f"\nSAOImage DS9 {version} on Xvfb {ds9.display}, answered XPA after "
          f"{ds9.startup_seconds:.1f} s")
    assert ds9.display.startswith(":")


def test_ds9_reads_shape_values_and_bunit(ds9, product):
    path, images = product
    for name, (header, data) in images.items():
        load(ds9, path, name)
        assert ds9.get("fits", "size").split() == [str(NX), str(NY)], name
        assert ds9.get("fits", "width") == str(header["NAXIS1"]), name
        assert ds9.get("fits", "height") == str(header["NAXIS2"]), name
        assert int(ds9.get("fits", "bitpix")) == header["BITPIX"], name
        # (c) the unit DS9 reads is the header's
        assert ds9.get("fits", "header", "keyword", "BUNIT") == header["BUNIT"], name
        # pixel (x, y) in DS9 (1-based) is data[..., y - 1, x - 1]: no transposition
        plane = data[0] if data.ndim == 3 else data
        for x, y in ((1, 1), (2, 1), (NX, NY), (3, 5)):
            got = float(ds9.get("data", "image", x, y, 1, 1, "yes"))
            want = float(plane[y - 1, x - 1])
            if np.isnan(want):
                assert np.isnan(got), (name, x, y)
            else:
                # DS9 prints 6 significant digits, whatever its precision setting
                assert got == pytest.approx(want, rel=1e-5, abs=1e-12), (name, x, y)


def test_ds9_wcs_matches_astropy(ds9, product):
    path, images = product
    worst = 0.0 * u.arcsec
    for name, (header, _) in images.items():
        load(ds9, path, name)
        frame = header["RADESYS"].strip().lower()  # ICRS: DS9's fk5 would be FK5 J2000
        wcs = WCS(header).celestial
        for x, y in PIXELS:
            ds9.set("crosshair", x, y, "image")
            assert [float(v) for v in ds9.get("crosshair", "image").split()] == [x, y]
            ra, dec = (float(v) for v in ds9.get("crosshair", "wcs", frame, "degrees").split())
            got = SkyCoord(ra, dec, unit="deg", frame=frame)
            want = wcs.pixel_to_world(x - 1, y - 1)  # astropy pixels are 0-based
            sep = got.separation(want).to(u.arcsec)
            assert sep < MAX_SEPARATION, (name, x, y, sep)
            worst = max(worst, sep)
    print(f"\n{len(images)} extensions, largest DS9 - astropy separation: "
          f"{worst.to_value(u.uas):.2f} micro-arcsec")


def test_ds9_band_cube_has_one_plane_per_band(ds9, product):
    path, images = product
    header, data = images["PHOT_RESID"]
    assert header["NAXIS3"] == 5 == data.shape[0]
    load(ds9, path, "PHOT_RESID")
    assert ds9.get("fits", "depth") == "5"
    assert ds9.get("fits", "header", "keyword", "CTYPE3") == "BAND"
    assert ds9.get("fits", "header", "keyword", "BAND04") == "F814W"
    ds9.set("cube", 5)
    with ds9.get_fits("slice") as shown:
        np.testing.assert_array_equal(shown[0].data, data[4])
    ds9.set("cube", 1)


@pytest.mark.parametrize("name", ["SFH", "ZH_AGE", "SFH_P16", "SFH_P84", "PPXF_SFH", "SFR_SD",
                                  "SFR_SD_P84"])
def test_ds9_sfh_cube_has_one_plane_per_age_bin(ds9, product, name):
    path, images = product
    header, data = images[name]
    assert header["NAXIS3"] == N_AGE_BINS == data.shape[0]
    load(ds9, path, name)
    assert ds9.get("fits", "depth") == str(N_AGE_BINS)
    assert ds9.get("fits", "header", "keyword", "CTYPE3") == "AGEBIN"
    ds9.set("cube", "last")
    assert ds9.get("cube") == str(N_AGE_BINS)
    # the plane DS9 shows last is the oldest age bin of the file (``xpaget data`` always
    # reads the first plane, so the shown slice is fetched as FITS)
    with ds9.get_fits("slice") as shown:
        np.testing.assert_array_equal(shown[0].data, data[-1])
    ds9.set("cube", 5)
    with ds9.get_fits("slice") as shown:
        np.testing.assert_array_equal(shown[0].data, data[4])
    ds9.set("cube", 1)
    assert ds9.get("cube") == "1"
