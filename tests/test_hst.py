# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of cubesfh.hst with synthetic drizzled WFC3/ACS/WFPC2-like FITS files."""

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from cubesfh.conventions import HST_BANDS
from cubesfh.hst import DEFAULT_PSF_FWHM, FLAM, SB_UNIT, HSTImage, identify_instrument
from cubesfh.utils.exceptions import CubeSFHError, CubeSFHWarning

PHOTFLAM = 1.8e-19  # erg / (cm2 AA) per electron
PHOTPLAM = 5308.4  # AA
SCALE = 0.04  # arcsec / pixel
PIXEL_AREA = SCALE**2  # arcsec2


def celestial_header(shape, *, scale=SCALE, rotation=0.0, ctype=("RA---TAN", "DEC--TAN")):
    """A TAN WCS header with square pixels of ``scale`` arcsec."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = list(ctype)
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]
    c, s = np.cos(np.radians(rotation)), np.sin(np.radians(rotation))
    w.wcs.cd = scale / 3600 * np.array([[-c, s], [s, c]])
    if ctype[0] != "RA---TAN":
        w.wcs.cunit = ["", ""]
    return w.to_header()


def write_drizzled(path, data, *, primary=None, sci=None, sci_ext=True, wht=None, err=None,
                   **wcs_kw):
    """Write a drizzled-like file: PRIMARY (+ SCI, WHT, ERR extensions)."""
    prim = fits.Header({"TELESCOP": "HST", "INSTRUME": "WFC3", "DETECTOR": "UVIS",
                        "FILTER": "F555W", "PHOTMODE": "WFC3 UVIS2 F555W MJD#57000.0 CAL"})
    head = celestial_header(data.shape, **wcs_kw)
    head.update({"BUNIT": "ELECTRONS/S", "PHOTFLAM": PHOTFLAM, "PHOTPLAM": PHOTPLAM})
    for target, extra in ((prim, primary), (head, sci)):
        for key, value in (extra or {}).items():
            if value is None:
                target.remove(key, ignore_missing=True)
            else:
                target[key] = value
    if sci_ext:
        hdus = [fits.PrimaryHDU(header=prim), fits.ImageHDU(data, header=head, name="SCI")]
    else:
        prim.update(head)
        hdus = [fits.PrimaryHDU(data, header=prim)]
    if wht is not None:
        hdus.append(fits.ImageHDU(wht, name="WHT"))
    if err is not None:
        hdus.append(fits.ImageHDU(err, name="ERR"))
    fits.HDUList(hdus).writeto(path)
    return path


@pytest.fixture
def counts():
    rng = np.random.default_rng(42)
    return rng.uniform(0.5, 3.0, size=(40, 50)).astype(np.float32)


def test_read_converts_counts_exactly(tmp_path, counts):
    path = write_drizzled(tmp_path / "f555w_drc.fits", counts)
    im = HSTImage.read(path)
    assert im.band == "F555W"
    assert im.instrument == "WFC3/UVIS"
    assert im.unit == u.electron / u.s
    assert im.photplam == PHOTPLAM * u.AA
    assert u.isclose(im.photflam, PHOTFLAM * FLAM / (u.electron / u.s), rtol=1e-15)
    assert u.isclose(im.pixel_area, PIXEL_AREA * u.arcsec**2, rtol=1e-12)
    assert u.isclose(im.pixel_scale, SCALE * u.arcsec, rtol=1e-12)
    assert im.psf_fwhm == DEFAULT_PSF_FWHM["F555W"]

    flux = im.to_flux_density()
    assert flux.unit == FLAM
    np.testing.assert_allclose(flux.value, counts.astype(float) * PHOTFLAM, rtol=1e-12)
    sb = im.to_surface_brightness()
    assert sb.unit == SB_UNIT
    np.testing.assert_allclose(sb.value, counts.astype(float) * PHOTFLAM / PIXEL_AREA,
                               rtol=1e-12)


def test_pixel_area_follows_the_wcs(tmp_path, counts):
    path = write_drizzled(tmp_path / "f555w.fits", counts, scale=0.05, rotation=33.0)
    im = HSTImage.read(path)
    assert u.isclose(im.pixel_area, 0.0025 * u.arcsec**2, rtol=1e-10)
    np.testing.assert_allclose(im.to_surface_brightness().value,
                               counts.astype(float) * PHOTFLAM / 0.0025, rtol=1e-10)


def test_photflam_in_primary_header_and_primary_hdu_image(tmp_path, counts):
    path = write_drizzled(tmp_path / "a.fits", counts, sci={"PHOTFLAM": None},
                          primary={"PHOTFLAM": 2 * PHOTFLAM})
    assert u.isclose(HSTImage.read(path).photflam.value, 2 * PHOTFLAM)
    path = write_drizzled(tmp_path / "b.fits", counts, sci_ext=False)
    im = HSTImage.read(path)
    np.testing.assert_allclose(im.to_flux_density().value, counts * PHOTFLAM, rtol=1e-6)


def test_band_and_instrument_from_photmode(tmp_path, counts):
    path = write_drizzled(tmp_path / "f336w.fits", counts,
                          primary={"FILTER": None, "INSTRUME": None, "DETECTOR": None,
                                   "PHOTMODE": "WFC3 UVIS1 F336W MJD#58000.1 CAL"})
    im = HSTImage.read(path)
    assert im.band == "F336W"
    assert im.instrument == "WFC3/UVIS"
    assert im.psf_fwhm == DEFAULT_PSF_FWHM["F336W"]


@pytest.mark.parametrize("band", HST_BANDS)
def test_band_from_filter_keyword(tmp_path, counts, band):
    path = write_drizzled(tmp_path / "x.fits", counts,
                          primary={"FILTER": band.lower(), "PHOTMODE": None})
    assert HSTImage.read(path).band == band


def test_acs_needs_option_and_warns(tmp_path, counts):
    path = write_drizzled(tmp_path / "acs.fits", counts,
                          primary={"INSTRUME": "ACS", "DETECTOR": "WFC", "FILTER": None,
                                   "FILTER1": "F814W", "FILTER2": "CLEAR2L",
                                   "PHOTMODE": "ACS WFC1 F814W MJD#57000"})
    with pytest.raises(CubeSFHError, match="allow_other_instrument=True"):
        HSTImage.read(path)
    with pytest.warns(CubeSFHWarning, match="ACS/WFC"):
        im = HSTImage.read(path, allow_other_instrument=True)
    assert im.band == "F814W"
    assert im.instrument == "ACS/WFC"


def test_wfpc2_needs_option_and_warns(tmp_path, counts):
    path = write_drizzled(tmp_path / "wfpc2.fits", counts,
                          primary={"INSTRUME": "WFPC2", "DETECTOR": None, "FILTER": None,
                                   "FILTNAM1": "F814W", "FILTNAM2": "",
                                   "PHOTMODE": "WFPC2,1,A2D7,F814W,,CAL"},
                          sci={"BUNIT": "COUNTS/S"})
    with pytest.raises(CubeSFHError, match="WFPC2"):
        HSTImage.read(path)
    with pytest.warns(CubeSFHWarning, match="throughput|bandpasses"):
        im = HSTImage.read(path, allow_other_instrument=True)
    assert (im.band, im.instrument, im.unit) == ("F814W", "WFPC2", u.count / u.s)
    # PHOTFLAM is per count/s for these data
    np.testing.assert_allclose(im.to_flux_density().value, counts * PHOTFLAM, rtol=1e-6)


def test_instrument_from_photmode_tokens():
    assert identify_instrument(fits.Header({"PHOTMODE": "ACS WFC1 F555W"})) == "ACS/WFC"
    assert identify_instrument(fits.Header({"PHOTMODE": "WFPC2,1,A2D7,F814W,,CAL"})) == "WFPC2"
    assert identify_instrument(fits.Header({"INSTRUME": "WFC3", "DETECTOR": "UVIS"})) \
        == "WFC3/UVIS"
    assert identify_instrument(fits.Header()) is None


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="not found"):
        HSTImage.read("/nonexistent/f555w_drc.fits")


def test_missing_photflam_raises_and_can_be_supplied(tmp_path, counts):
    path = write_drizzled(tmp_path / "nophot.fits", counts, sci={"PHOTFLAM": None})
    with pytest.raises(CubeSFHError, match="photflam=.*calibrated drizzled"):
        HSTImage.read(path)
    im = HSTImage.read(path, photflam=3e-19)
    np.testing.assert_allclose(im.to_flux_density().value, counts * 3e-19, rtol=1e-6)


def test_no_celestial_wcs(tmp_path, counts):
    path = write_drizzled(tmp_path / "lin.fits", counts, ctype=("LINEAR", "LINEAR"))
    with pytest.raises(CubeSFHError, match="celestial WCS"):
        HSTImage.read(path)


def test_unknown_and_missing_filter(tmp_path, counts):
    path = write_drizzled(tmp_path / "f606w.fits", counts,
                          primary={"FILTER": "F606W", "PHOTMODE": "WFC3 UVIS2 F606W"})
    with pytest.raises(CubeSFHError, match="Unknown filter 'F606W'"):
        HSTImage.read(path)
    path = write_drizzled(tmp_path / "fq.fits", counts, primary={"FILTER": "FQ387N"})
    with pytest.raises(CubeSFHError, match="Unknown filter 'FQ387N'"):
        HSTImage.read(path)
    path = write_drizzled(tmp_path / "nofilt.fits", counts,
                          primary={"FILTER": None, "PHOTMODE": None})
    with pytest.raises(CubeSFHError, match="band="):
        HSTImage.read(path)
    assert HSTImage.read(path, band="F438W").band == "F438W"


def test_wfpc2_filter_wheel_numbers_ignored(tmp_path, counts):
    # drizzled WFPC2 products carry filter-wheel numbers in FILTER1/2 and the
    # names in FILTNAM1/2 (as the real Abell 478 image shipped with mpdaf)
    path = write_drizzled(tmp_path / "wfpc2.fits", counts,
                          primary={"INSTRUME": "WFPC2", "DETECTOR": 2, "FILTER": None,
                                   "FILTER1": 38, "FILTER2": 0, "FILTNAM1": "F814W",
                                   "FILTNAM2": "", "PHOTMODE": "WFPC2,2,A2D7,F814W,CAL"})
    with pytest.warns(CubeSFHWarning, match="WFPC2"):
        im = HSTImage.read(path, allow_other_instrument=True)
    assert im.band == "F814W"
    # two real filter names are ambiguous unless band= says which one
    path = write_drizzled(tmp_path / "two.fits", counts,
                          primary={"FILTER": None, "FILTER1": "F555W", "FILTER2": "F814W"})
    with pytest.raises(CubeSFHError, match="several filters"):
        HSTImage.read(path)
    assert HSTImage.read(path, band="F814W").band == "F814W"


def test_band_argument_contradicting_header_needs_force_band(tmp_path, counts):
    path = write_drizzled(tmp_path / "x.fits", counts)
    with pytest.raises(CubeSFHError, match="header .* says F555W.*force_band=True"):
        HSTImage.read(path, band="F814W")
    with pytest.warns(CubeSFHWarning, match="header .* says F555W"):
        im = HSTImage.read(path, band="F814W", force_band=True)
    assert im.band == "F814W"


def test_bunit_not_a_rate(tmp_path, counts):
    path = write_drizzled(tmp_path / "e.fits", counts, sci={"BUNIT": "ELECTRONS"})
    with pytest.raises(CubeSFHError, match="ELECTRONS.*unit="):
        HSTImage.read(path)


def test_surface_brightness_input(tmp_path, counts):
    # data already in surface brightness: no PHOTFLAM needed, values unchanged
    path = write_drizzled(tmp_path / "sb.fits", counts,
                          sci={"BUNIT": "erg / (s cm2 Angstrom arcsec2)", "PHOTFLAM": None})
    im = HSTImage.read(path)
    np.testing.assert_allclose(im.to_surface_brightness().value, counts, rtol=1e-6)
    np.testing.assert_allclose(im.to_flux_density().value, counts * PIXEL_AREA, rtol=1e-6)
    # MJy/sr (f_nu) is converted at the pivot wavelength
    path = write_drizzled(tmp_path / "mjy.fits", counts, sci={"BUNIT": "MJy/sr"})
    im = HSTImage.read(path)
    expected = (counts[0, 0] * u.MJy * u.arcsec**2 / u.sr).to(
        FLAM, u.spectral_density(PHOTPLAM * u.AA)).value
    assert np.isclose(im.to_surface_brightness()[0, 0].value, expected, rtol=1e-6)
    # user-stated unit
    path = write_drizzled(tmp_path / "weird.fits", counts, sci={"BUNIT": "who knows"})
    with pytest.raises(CubeSFHError, match="unit="):
        HSTImage.read(path)
    im = HSTImage.read(path, unit=FLAM)
    np.testing.assert_allclose(im.to_flux_density().value, counts, rtol=1e-6)


def test_psf_fwhm_override_and_header(tmp_path, counts):
    path = write_drizzled(tmp_path / "a.fits", counts)
    assert HSTImage.read(path, psf_fwhm=0.1 * u.arcsec).psf_fwhm == 0.1 * u.arcsec
    assert HSTImage.read(path, psf_fwhm=90 * u.mas).psf_fwhm.to_value(u.arcsec) == \
        pytest.approx(0.09)
    path = write_drizzled(tmp_path / "b.fits", counts, sci={"PSFFWHM": 0.095})
    assert HSTImage.read(path).psf_fwhm == 0.095 * u.arcsec
    with pytest.raises(CubeSFHError, match="psf_fwhm"):
        HSTImage.read(path, psf_fwhm=-1 * u.arcsec)


def test_default_psf_table_is_documented_range():
    assert set(DEFAULT_PSF_FWHM) == set(HST_BANDS)
    for fwhm in DEFAULT_PSF_FWHM.values():
        assert 0.07 * u.arcsec <= fwhm <= 0.09 * u.arcsec


def test_wht_zero_masked_and_err_extension(tmp_path, counts):
    wht = np.ones(counts.shape, dtype=np.float32)
    wht[:5] = 0
    err = np.full(counts.shape, 0.1, dtype=np.float32)
    path = write_drizzled(tmp_path / "w.fits", counts, wht=wht, err=err)
    im = HSTImage.read(path)
    sb = im.to_surface_brightness()
    assert np.all(np.isnan(sb[:5])) and np.all(np.isfinite(sb[5:]))
    np.testing.assert_allclose(im.error, 0.1, rtol=1e-6)


def test_cutout_keeps_calibration_and_wcs(tmp_path, counts):
    path = write_drizzled(tmp_path / "c.fits", counts, rotation=20.0)
    im = HSTImage.read(path)
    cut = im.cutout((10, 12), (7, 9))
    assert cut.shape == (7, 9)
    # the cutout pixel (0, 0) is image pixel (x=6, y=9)
    assert cut.data[0, 0] == counts[9, 6]
    sky = im.wcs.pixel_to_world(6, 9)
    assert sky.separation(cut.wcs.pixel_to_world(0, 0)).to(u.mas) < 1e-6 * u.mas
    assert cut.band == im.band and cut.photflam == im.photflam
    # partial cutout: outside parts are NaN and masked
    part = im.cutout(SkyCoord(*im.wcs.wcs.crval, unit="deg"), (100, 100))
    assert part.shape == (100, 100)
    assert part.mask.sum() == 100 * 100 - counts.size
    assert np.nansum(part.to_flux_density().value) == pytest.approx(
        counts.astype(float).sum() * PHOTFLAM, rel=1e-10)


def test_constructor_validation(counts):
    wcs = WCS(celestial_header(counts.shape))
    with pytest.raises(CubeSFHError, match="2-D"):
        HSTImage(counts[0], wcs=wcs, band="F555W", photflam=PHOTFLAM)
    with pytest.raises(CubeSFHError, match="photflam="):
        HSTImage(counts, wcs=wcs, band="F555W")
    with pytest.warns(CubeSFHWarning, match="assuming WFC3/UVIS"):
        im = HSTImage(counts, wcs=wcs, band="f275w", photflam=PHOTFLAM, instrument=None)
    assert im.band == "F275W"
    assert "F275W" in repr(im)
