# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of cubesfh.registration: synthetic band images, offsets, flux ratios."""

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from scipy.special import erf

from cubesfh import Cube, HSTImage
from cubesfh.registration import (
    Offset,
    RegistrationReport,
    apply_offset,
    band_coverage,
    measure_offset,
    register,
    synthetic_band_image,
)
from cubesfh.synthesis import mock_observation
from cubesfh.templates import load_filter
from cubesfh.utils import CubeSFHError, CubeSFHWarning

FLUX_UNIT = u.Unit("1e-20 erg / (s cm2 Angstrom)")
CENTER = (150.0, 2.0)
MUSE_SCALE = 0.2
HST_SCALE = 0.04
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


# ----------------------------------------------------------------------------
# Synthetic inputs with known answers
# ----------------------------------------------------------------------------

def cube_wcs(shape, wave0, dwave):
    ny, nx = shape
    w = WCS(naxis=3)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN", "AWAV"]
    w.wcs.cunit = ["deg", "deg", "Angstrom"]
    w.wcs.cdelt = [-MUSE_SCALE / 3600, MUSE_SCALE / 3600, dwave]
    w.wcs.crval = [*CENTER, wave0]
    w.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2, 1]
    return w


def hst_wcs(shape):
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cdelt = [-HST_SCALE / 3600, HST_SCALE / 3600]
    w.wcs.crval = list(CENTER)
    w.wcs.crpix = [(nx + 1) / 2 + 0.3, (ny + 1) / 2 - 0.4]  # pixel centres off the cube's
    return w


def pixel_fractions(shape, x0, y0, sigma):
    """Fraction of a unit-flux circular Gaussian (centre x0, y0; pixels) in each pixel."""
    def profile(n, c):
        edges = np.arange(n + 1) - 0.5 - c
        return np.diff(0.5 * erf(edges / (np.sqrt(2) * sigma)))

    return np.outer(profile(shape[0], y0), profile(shape[1], x0))


# (dx, dy) from the field centre in arcsec, intrinsic sigma in arcsec, total flux
BLOBS = [(0.0, 0.0, 0.30, 5000.0), (0.9, -0.5, 0.15, 1500.0), (-1.1, 0.8, 0.40, 2500.0)]


def linear_spectrum(wave):
    """f_lambda linear in wavelength (Angstrom)."""
    return 1.0 + 2e-4 * (wave - 6000.0)


def blob_observation(shape=(20, 20), wave_range=(4750.0, 9350.0), dwave=5.0,
                     bands=("F555W", "F814W"), muse_fwhm=0.7, hst_fwhm=0.08, photflam=1e-19):
    """A cube of three Gaussian sources with a linear spectrum and matching HST images."""
    wave = np.arange(wave_range[0], wave_range[1] + dwave / 2, dwave)
    w3 = cube_wcs(shape, wave[0], dwave)
    cel = w3.celestial
    ny, nx = shape
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    image = np.zeros(shape)
    worlds = []
    for bx, by, sig, flux in BLOBS:
        # +x is west on the cube grid: a source at +bx arcsec of x
        px, py = cx + bx / MUSE_SCALE, cy + by / MUSE_SCALE
        worlds.append(cel.pixel_to_world(px, py))
        s = np.hypot(sig, muse_fwhm * FWHM_TO_SIGMA) / MUSE_SCALE
        image += flux * pixel_fractions(shape, px, py, s)
    data = linear_spectrum(wave)[:, None, None] * image[None]
    cube = Cube(data, wcs=w3, unit=FLUX_UNIT, psf_fwhm=muse_fwhm * u.arcsec)

    margin = 1.6  # arcsec
    hshape = (int((ny * MUSE_SCALE + 2 * margin) / HST_SCALE),
              int((nx * MUSE_SCALE + 2 * margin) / HST_SCALE))
    hw = hst_wcs(hshape)
    fine = np.arange(2000.0, 11000.0, 1.0) * u.AA
    images = {}
    for band in bands:
        mean = load_filter(band).mean_flux_density(fine, linear_spectrum(fine.value))
        flam = np.zeros(hshape)
        for world, (_, _, sig, flux) in zip(worlds, BLOBS):
            hx, hy = hw.world_to_pixel(world)
            s = np.hypot(sig, hst_fwhm * FWHM_TO_SIGMA) / HST_SCALE
            flam += flux * mean * pixel_fractions(hshape, float(hx), float(hy), s)
        rate = flam * FLUX_UNIT.to(u.erg / u.s / u.cm**2 / u.AA) / photflam
        images[band] = HSTImage(rate, wcs=hw, band=band, unit=u.electron / u.s,
                                photflam=photflam, psf_fwhm=hst_fwhm * u.arcsec)
    return cube, images


def shifted(image, dra, ddec):
    """Copy of an HST image whose WCS puts everything (dra cos Dec, ddec) arcsec away."""
    new = object.__new__(HSTImage)
    new.__dict__.update(image.__dict__)
    wcs = image.wcs.deepcopy()
    dec = wcs.wcs.crval[1]
    wcs.wcs.crval = [wcs.wcs.crval[0] + dra / 3600 / np.cos(np.radians(dec)),
                     dec + ddec / 3600]
    wcs.wcs.set()
    new.wcs = wcs
    return new


def scaled(image, factor):
    """Copy of an HST image with the data multiplied by ``factor``."""
    new = object.__new__(HSTImage)
    new.__dict__.update(image.__dict__)
    new.data = np.asarray(image.data, dtype=float) * factor
    return new


@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    directory = tmp_path_factory.mktemp("regmock")
    return mock_observation(directory, shape=(24, 24), progress_bar=False)


@pytest.fixture(scope="module")
def blobs():
    return blob_observation()


def read_mock(mock, bands=("F555W",)):
    cube = Cube.read(mock.cube_path)
    images = {b: HSTImage.read(mock.hst_paths[b]) for b in bands}
    return cube, images


# ----------------------------------------------------------------------------
# Band coverage and synthetic images
# ----------------------------------------------------------------------------

def test_band_coverage_muse_range():
    wave = np.arange(4750.0, 9351.0, 1.25) * u.AA
    assert band_coverage("F275W", wave) == 0.0
    assert band_coverage("F336W", wave) == 0.0
    assert band_coverage("F438W", wave) == 0.0  # ends at 4746 A
    # integral of T lambda dlambda over 4750-9350 A / over the band (filter grid)
    assert band_coverage("F555W", wave) == pytest.approx(0.862, abs=0.002)
    assert band_coverage("F814W", wave) == pytest.approx(0.949, abs=0.002)
    # the MUSE extended mode starts at 4600 A
    ext = np.arange(4600.0, 9351.0, 1.25) * u.AA
    assert band_coverage("F555W", ext) == pytest.approx(0.939, abs=0.002)
    full = np.arange(3000.0, 11000.0, 2.0) * u.AA
    assert band_coverage("F555W", full) == pytest.approx(1.0)


@pytest.mark.parametrize("missing", ["linear", "mean"])
def test_synthetic_flat_spectrum(missing):
    shape, wave0, dwave = (4, 5), 4750.0, 5.0
    nlam = 921  # 4750-9350 A
    data = np.full((nlam, *shape), 3.2)
    data[100:150, 1, 1] = np.nan  # masked pixels inside F555W: renormalised
    data[600:640, 1, 1] = np.nan  # and inside F814W
    data[:, 2, 3] = np.nan  # an empty spaxel
    cube = Cube(data, wcs=cube_wcs(shape, wave0, dwave), unit=FLUX_UNIT)
    for band in ("F555W", "F814W"):
        image, coverage = synthetic_band_image(cube, band, missing=missing)
        assert image.unit == FLUX_UNIT
        assert np.isnan(image[2, 3])
        good = np.ones(shape, bool)
        good[2, 3] = False
        np.testing.assert_allclose(image.value[good], 3.2, rtol=1e-6)
        assert coverage == pytest.approx(band_coverage(band, cube.wavelength))


def test_synthetic_linear_spectrum_extrapolation():
    """A linear f_lambda is extrapolated exactly into the part of F555W below 4750 A."""
    shape, dwave = (3, 3), 1.25
    wave = np.arange(4750.0, 7100.0, dwave)
    cube = Cube(linear_spectrum(wave)[:, None, None] * np.ones((1, *shape)),
                wcs=cube_wcs(shape, wave[0], dwave), unit=FLUX_UNIT)
    curve = load_filter("F555W")
    fine = np.arange(3000.0, 11000.0, 0.5) * u.AA
    truth = curve.mean_flux_density(fine, linear_spectrum(fine.value))
    image, coverage = synthetic_band_image(cube, "F555W")
    assert coverage == pytest.approx(0.861, abs=0.002)
    np.testing.assert_allclose(image.value, truth, rtol=2e-4)
    # 'mean': the photon-weighted mean over the covered part only
    inside = fine[(fine.value >= wave[0] - dwave / 2) & (fine.value <= wave[-1] + dwave / 2)]
    covered = (linear_spectrum(inside.value) @ curve.weights(inside))
    image_mean, _ = synthetic_band_image(cube, "F555W", missing="mean")
    np.testing.assert_allclose(image_mean.value, covered, rtol=2e-4)
    assert abs(covered / truth - 1) > 0.005  # the two treatments do differ


def test_synthetic_uncovered_band_raises():
    shape = (3, 3)
    cube = Cube(np.ones((921, *shape)), wcs=cube_wcs(shape, 4750.0, 5.0), unit=FLUX_UNIT)
    with pytest.raises(CubeSFHError, match="min_coverage"):
        synthetic_band_image(cube, "F438W")


# ----------------------------------------------------------------------------
# Offsets
# ----------------------------------------------------------------------------

def test_zero_offset_on_mock(mock):
    cube, images = read_mock(mock)
    off = measure_offset(cube, images["F555W"])
    assert off.separation < 0.01 * u.arcsec
    assert off.correlation > 0.99
    assert off.band == off.image_band == "F555W"
    assert off.error < 0.02 * u.arcsec


def test_known_offset_on_mock(mock):
    cube, images = read_mock(mock)
    moved = shifted(images["F555W"], 0.35, -0.22)
    off = measure_offset(cube, moved)
    assert abs(off.ra - 0.35 * u.arcsec) < 0.05 * u.arcsec
    assert abs(off.dec + 0.22 * u.arcsec) < 0.05 * u.arcsec
    # east is -x, north +y on the cube grid (0.2 arcsec spaxels)
    assert off.dx == pytest.approx(-0.35 / MUSE_SCALE, abs=0.25)
    assert off.dy == pytest.approx(-0.22 / MUSE_SCALE, abs=0.25)
    fixed = apply_offset(moved, off)
    assert measure_offset(cube, fixed).separation < 0.03 * u.arcsec
    assert moved.wcs.wcs.crpix[0] != fixed.wcs.wcs.crpix[0]  # the input is unchanged
    assert fixed.meta["REGDRA"] == pytest.approx(-off.ra.to_value(u.arcsec), abs=1e-4)


def test_apply_offset_moves_known_point(mock):
    """A source the shifted WCS puts 0.35" E, 0.22" S lands on its true position."""
    _, images = read_mock(mock)
    true = images["F555W"]
    moved = shifted(true, 0.35, -0.22)
    ny, nx = true.shape
    reference = true.wcs.pixel_to_world((nx - 1) / 2, (ny - 1) / 2)
    assert isinstance(reference, SkyCoord)
    off = Offset(ra=0.35 * u.arcsec, dec=-0.22 * u.arcsec, reference=reference)
    fixed = apply_offset(moved, off)
    for point in (reference, reference.spherical_offsets_by(1 * u.arcsec, -2 * u.arcsec)):
        pixel = true.wcs.world_to_pixel(point)  # where the source is in the image
        assert moved.wcs.pixel_to_world(*pixel).separation(point) > 0.4 * u.arcsec
        assert fixed.wcs.pixel_to_world(*pixel).separation(point) < 1e-3 * u.arcsec


def test_offset_beyond_limit_raises(mock):
    cube, images = read_mock(mock)
    moved = shifted(images["F555W"], 0.8, 0.5)
    with pytest.raises(CubeSFHError, match=r"max_offset=0\.5 arcsec"):
        measure_offset(cube, moved, max_offset=0.5 * u.arcsec)
    with pytest.raises(CubeSFHError, match="max_offset"):
        register(cube, {"F555W": moved}, max_offset=0.5 * u.arcsec)


def test_uncovered_band_measured_against_f555w(mock):
    """F438W is not covered by the cube: its offset is measured on the F555W image."""
    cube, images = read_mock(mock, bands=("F438W",))
    off = measure_offset(cube, shifted(images["F438W"], -0.3, 0.2))
    assert off.band == "F555W"
    assert off.image_band == "F438W"
    assert abs(off.ra + 0.3 * u.arcsec) < 0.05 * u.arcsec
    assert abs(off.dec - 0.2 * u.arcsec) < 0.05 * u.arcsec


# ----------------------------------------------------------------------------
# register: offsets, flux ratios, report
# ----------------------------------------------------------------------------

def test_register_mock_all_bands(mock):
    cube, images = read_mock(mock, bands=("F275W", "F336W", "F438W", "F555W", "F814W"))
    out, report = register(cube, images)
    assert isinstance(report, RegistrationReport)
    assert list(out) == ["F275W", "F336W", "F438W", "F555W", "F814W"]
    # the mock cube (4750-7100 A) covers only F555W
    assert report.coverage["F275W"] == 0.0
    assert report.coverage["F438W"] == 0.0
    assert report.coverage["F814W"] < 0.05
    assert set(report.ratios) == {"F555W"}
    # +0.5 % from extrapolating f_lambda below 4750 A (see synthetic_band_image)
    assert report.ratios["F555W"] == pytest.approx(1.0, abs=0.015)
    # per band (default): each image measured on its own, F555W against the cube,
    # the others against their neighbour band; all ~0 on the mock
    assert len(report.measurements) == 5
    assert {b: o.band for b, o in report.offsets.items()} == {
        "F275W": "HST F336W", "F336W": "HST F438W", "F438W": "HST F555W",
        "F555W": "F555W", "F814W": "HST F555W"}
    assert report.measurements[0] is report.offsets["F555W"]
    assert report.offsets["F555W"].separation < 0.01 * u.arcsec
    assert all(o.separation < 0.03 * u.arcsec for o in report.offsets.values())
    assert all(report.applied.values()) and not report.problems
    # per visit (no visit keywords): one offset, measured on F555W, shared by all
    _, visit = register(cube, images, per="visit")
    assert len(visit.measurements) == 1
    assert all(off is visit.measurements[0] for off in visit.offsets.values())
    assert visit.measurements[0].separation < 0.01 * u.arcsec

    cards = report.to_header_cards()
    header = fits.Header()
    for key, value, comment in cards:
        assert len(key) <= 8
        header[key] = (value, comment)
    assert header["REGBAND"] == "F555W"
    assert header["FRATF555"] == pytest.approx(report.ratios["F555W"], abs=1e-4)
    assert header["COVF275"] == 0.0
    assert "FRATF275" not in header
    assert "FRATF814" not in header
    text = report.summary()
    for band in images:
        assert band in text
    table = report.to_table()
    assert len(table) == 5
    assert np.isnan(table["flux_ratio"][0])


def test_register_per_image_corrects_only_shifted(mock):
    cube, images = read_mock(mock, bands=("F555W", "F814W"))
    images["F555W"] = shifted(images["F555W"], 0.35, -0.22)
    out, report = register(cube, images, per="image")
    assert report.offsets["F555W"].separation.to_value(u.arcsec) == pytest.approx(
        np.hypot(0.35, 0.22), abs=0.05)
    # F814W (not covered) is measured against the cube's F555W image
    assert report.offsets["F814W"].band == "F555W"
    assert report.offsets["F814W"].separation < 0.03 * u.arcsec
    assert measure_offset(cube, out["F555W"]).separation < 0.03 * u.arcsec


def test_register_correct_false(mock):
    cube, images = read_mock(mock)
    moved = shifted(images["F555W"], 0.35, -0.22)
    out, report = register(cube, [moved], correct=False)
    assert out["F555W"] is moved
    assert not report.corrected
    assert report.offsets["F555W"].ra.to_value(u.arcsec) == pytest.approx(0.35, abs=0.05)
    assert report.to_header_cards()[0][:2] == ("REGCORR", False)


def test_register_flux_ratio_mock_scaled_warns(mock):
    cube, images = read_mock(mock)
    _, plain = register(cube, images)
    with pytest.warns(CubeSFHWarning, match="MUSE/HST flux ratio in F555W"):
        _, report = register(cube, {"F555W": scaled(images["F555W"], 1.07)})
    assert report.ratios["F555W"] == pytest.approx(plain.ratios["F555W"] / 1.07, rel=1e-3)
    assert report.ratios["F555W"] == pytest.approx(1 / 1.07, rel=0.01)
    assert report.outside_tolerance() == ["F555W"]
    assert "WARNING" in report.summary()


def test_register_flux_offset_separated_from_scale(mock):
    """A 7 % brighter image on a pedestal: the linear fit finds both."""
    cube, images = read_mock(mock)
    img = images["F555W"]
    pedestal = 0.05  # image units (e-/s) per HST pixel
    bright = scaled(img, 1.07)
    bright.data = bright.data + pedestal
    _, plain = register(cube, images)
    with pytest.warns(CubeSFHWarning, match=r"MUSE = 0\.9\d\d x HST -"):
        _, report = register(cube, {"F555W": bright})
    # known answer: the pedestal as a mean flux density per spaxel, in the cube's unit
    per_pixel = pedestal * img.unit * img.photflam  # f_lambda per HST pixel
    per_spaxel = (per_pixel * (cube.spaxel_scale / img.pixel_scale) ** 2).to_value(cube.unit)
    slope0, offset0 = plain.linear_fits["F555W"]
    assert slope0 == pytest.approx(1.0, abs=0.015) and abs(offset0) < 0.02 * per_spaxel
    slope, offset = report.linear_fits["F555W"]
    assert slope == pytest.approx(slope0 / 1.07, rel=1e-3)
    assert offset == pytest.approx((offset0 - per_spaxel) / 1.07, rel=0.01)
    # while the total ratio mixes the two
    assert report.ratios["F555W"] < 0.9 / 1.07
    cards = {c[0]: c[1] for c in report.to_header_cards()}
    assert cards["FSLPF555"] == pytest.approx(slope, abs=1e-4)
    assert cards["FOFFF555"] == pytest.approx(offset, rel=1e-4)
    assert f"MUSE = {slope:.3f} x HST" in report.summary()
    t = report.to_table()
    assert t["flux_slope"][0] == pytest.approx(slope)


def test_register_blobs_f555w_f814w(blobs):
    """Linear f_lambda: both bands give MUSE/HST = 1; a 7 % brighter image gives 1/1.07."""
    cube, images = blobs
    assert band_coverage("F814W", cube.wavelength) == pytest.approx(0.949, abs=0.002)
    out, report = register(cube, images)
    assert report.ratios["F555W"] == pytest.approx(1.0, abs=0.005)
    assert report.ratios["F814W"] == pytest.approx(1.0, abs=0.005)
    assert report.measurements[0].image_band == "F555W"
    assert report.measurements[0].separation < 0.01 * u.arcsec
    with pytest.warns(CubeSFHWarning, match="F814W"):
        _, report = register(cube, {**images, "F814W": scaled(images["F814W"], 1.07)})
    assert report.ratios["F814W"] == pytest.approx(1 / 1.07, rel=0.01)
    assert report.ratios["F555W"] == pytest.approx(1.0, abs=0.005)
    # within tolerance when it is raised
    _, report = register(cube, {"F814W": scaled(images["F814W"], 1.07)}, tolerance=0.08)
    assert report.outside_tolerance() == []


def test_register_blobs_known_offset(blobs):
    cube, images = blobs
    moved = shifted(images["F814W"], -0.25, 0.4)
    out, report = register(cube, {"F814W": moved})
    off = report.offsets["F814W"]
    assert off.band == "F814W"
    assert abs(off.ra + 0.25 * u.arcsec) < 0.05 * u.arcsec
    assert abs(off.dec - 0.4 * u.arcsec) < 0.05 * u.arcsec
    assert measure_offset(cube, out["F814W"]).separation < 0.03 * u.arcsec


def test_register_errors(mock, blobs):
    cube, images = blobs
    with pytest.raises(CubeSFHError, match="max_offset"):
        register(cube, images, max_offset=-1 * u.arcsec)
    with pytest.raises(CubeSFHError, match="per"):
        register(cube, images, per="night")
    with pytest.raises(CubeSFHError, match="No HST images"):
        register(cube, {})
    # a cube that covers no band: no offset can be measured
    blue = cube.spectral_slab(4750 * u.AA, 5200 * u.AA)
    with pytest.raises(CubeSFHError, match="correct=False"):
        register(blue, images)
    out, report = register(blue, images, correct=False)
    assert report.offsets == {} and report.ratios == {}
    assert out["F555W"] is images["F555W"]


def test_weak_correlation_not_applied(blobs):
    """An image that does not match the cube: warned about, offset not applied."""
    cube, images = blobs
    mirrored = scaled(images["F555W"], 1.0)
    mirrored.data = mirrored.data[::-1]
    with pytest.warns(CubeSFHWarning, match="not applied"):
        out, report = register(cube, {"F555W": mirrored}, min_correlation=0.95, tolerance=0.5)
    assert report.offsets["F555W"].correlation < 0.95
    assert out["F555W"] is mirrored
    assert not report.corrected
