# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of cubesfh.photometry: PSF matching, reprojection and bin photometry."""

import mmap
from types import SimpleNamespace

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS

from cubesfh.hst import FLAM, SB_UNIT, HSTImage
from cubesfh.photometry import (
    BinPhotometry,
    bin_photometry,
    gaussian_psf,
    make_matching_kernel,
    match_psf,
    reproject_to_cube,
)
from cubesfh.utils.exceptions import CubeSFHError, CubeSFHWarning

PHOTFLAM = {"F555W": 1.8e-19, "F814W": 1.5e-19, "F336W": 1.3e-18}
HST_SCALE = 0.04  # arcsec
MUSE_SCALE = 0.2  # arcsec
CUBE_UNIT = 1e-20 * FLAM
FWHM_TO_SIGMA = 1 / (2 * np.sqrt(2 * np.log(2)))


def tan_wcs(shape, scale, *, rotation=0.0, crval=(150.1, 2.2), offset=(0.0, 0.0)):
    """TAN WCS with square pixels, reference point at the grid centre (+offset pixels)."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [(nx + 1) / 2 + offset[0], (ny + 1) / 2 + offset[1]]
    c, s = np.cos(np.radians(rotation)), np.sin(np.radians(rotation))
    w.wcs.cd = scale / 3600 * np.array([[-c, s], [s, c]])
    w.pixel_shape = (nx, ny)
    return w


def hst_image(data, *, band="F555W", rotation=25.0, err=None, **kw):
    wcs = tan_wcs(data.shape, HST_SCALE, rotation=rotation, **kw)
    return HSTImage(data, wcs=wcs, band=band, photflam=PHOTFLAM[band], photplam=5000 * u.AA,
                    error=err)


def moments_fwhm(img):
    """FWHM from second moments of a pixelated circular Gaussian (pixel units)."""
    y, x = np.indices(img.shape)
    tot = img.sum()
    xm, ym = (img * x).sum() / tot, (img * y).sum() / tot
    var = ((img * (x - xm) ** 2).sum() + (img * (y - ym) ** 2).sum()) / (2 * tot)
    return np.sqrt(var - 1 / 12) / FWHM_TO_SIGMA  # remove the pixel-integration term


# --------------------------------------------------------------------------- PSF
def test_gaussian_psf_normalised_with_right_width():
    psf = gaussian_psf(0.4 * u.arcsec, pixel_scale=0.04 * u.arcsec, shape=(121, 121))
    assert psf.sum() == pytest.approx(1.0, abs=1e-14)
    assert moments_fwhm(psf) == pytest.approx(10.0, rel=1e-6)
    with pytest.raises(CubeSFHError, match="odd"):
        gaussian_psf(0.4 * u.arcsec, pixel_scale=0.04 * u.arcsec, shape=(120, 121))


@pytest.mark.parametrize(("fwhm_out", "window"), [(0.7, "default"), (0.7, None), (0.16, "default")])
def test_match_psf_reaches_target_and_conserves_flux(fwhm_out, window):
    fwhm_in = 0.08 * u.arcsec
    scale = HST_SCALE * u.arcsec
    image = 3.0 * gaussian_psf(fwhm_in, pixel_scale=scale, shape=(201, 201)) * SB_UNIT
    kw = {} if window == "default" else {"window": window}
    out = match_psf(image, scale, fwhm_in, fwhm_out * u.arcsec, **kw)
    assert out.unit == SB_UNIT
    assert out.sum().value == pytest.approx(3.0, rel=1e-3)
    measured = moments_fwhm(out.value) * HST_SCALE
    assert measured == pytest.approx(fwhm_out, rel=0.02)


def test_matching_kernel_sums_to_one_and_is_odd():
    k = make_matching_kernel(0.08 * u.arcsec, 0.6 * u.arcsec, pixel_scale=0.04 * u.arcsec)
    assert k.shape == (91, 91)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(CubeSFHError, match="must exceed"):
        make_matching_kernel(0.6 * u.arcsec, 0.08 * u.arcsec, pixel_scale=0.04 * u.arcsec)


def test_match_psf_narrower_target_warns_and_copies():
    img = np.arange(25.0).reshape(5, 5)
    with pytest.warns(CubeSFHWarning, match="not broader"):
        out = match_psf(img, 0.04 * u.arcsec, 0.08 * u.arcsec, 0.05 * u.arcsec)
    np.testing.assert_array_equal(out, img)
    assert out is not img


def test_match_psf_fills_isolated_bad_pixels_only():
    img = np.full((81, 81), 2.0)
    img[40, 40] = np.nan  # isolated bad pixel: filled by normalised convolution
    mask = np.zeros(img.shape, bool)
    mask[:, :20] = True  # large masked region: stays invalid
    out = match_psf(img, 0.04 * u.arcsec, 0.08 * u.arcsec, 0.3 * u.arcsec, mask=mask)
    np.testing.assert_allclose(out[30:50, 35:70], 2.0, rtol=1e-10)
    assert np.all(np.isnan(out[:, :20]))


# ------------------------------------------------------------------ reprojection
@pytest.mark.parametrize("method", ["exact", "adaptive"])
def test_reprojection_conserves_flux(method):
    shape = (301, 301)
    wcs_in = tan_wcs(shape, HST_SCALE, rotation=30.0)
    # an off-centre, elliptical-ish source of FWHM ~0.5 arcsec
    y, x = np.indices(shape)
    sb = (np.exp(-0.5 * (((x - 160.3) / 5.0) ** 2 + ((y - 140.7) / 7.0) ** 2))
          * 1e-15 * SB_UNIT)
    total_in = (sb.sum() * HST_SCALE**2 * u.arcsec**2).to(FLAM)
    wcs_out = tan_wcs((50, 50), MUSE_SCALE, offset=(0.37, -0.21))
    out, footprint = reproject_to_cube(sb, wcs_out, (50, 50), wcs=wcs_in, method=method)
    assert out.unit == SB_UNIT
    assert np.all(footprint[10:40, 10:40] > 0.999)
    total_out = (np.nansum(out[10:40, 10:40]) * MUSE_SCALE**2 * u.arcsec**2).to(FLAM)
    assert total_out.value == pytest.approx(total_in.value, rel=5e-3)


def test_reproject_hstimage_and_bad_method():
    im = hst_image(np.ones((60, 60)))
    wcs_out = tan_wcs((8, 8), MUSE_SCALE)
    out, fp = reproject_to_cube(im, wcs_out, (8, 8))
    expected = PHOTFLAM["F555W"] / HST_SCALE**2
    np.testing.assert_allclose(out[fp > 0.999].value, expected, rtol=1e-9)
    with pytest.raises(CubeSFHError, match="method"):
        reproject_to_cube(im, wcs_out, (8, 8), method="nearest")
    with pytest.raises(CubeSFHError, match="wcs="):
        reproject_to_cube(np.ones((5, 5)), wcs_out, (8, 8))


# --------------------------------------------------------------- bin photometry
@pytest.fixture
def cube_grid():
    """A 16 x 20 spaxel cube grid with 5 bins and some unbinned spaxels."""
    shape = (16, 20)
    wcs = tan_wcs(shape, MUSE_SCALE, offset=(0.3, -0.4))
    bin_map = np.full(shape, -1)
    bin_map[2:8, 2:10] = 0
    bin_map[2:8, 10:18] = 1
    bin_map[8:14, 2:10] = 2
    bin_map[8:14, 10:17] = 3
    bin_map[14, 17] = 4  # a single-spaxel bin
    return wcs, bin_map


def test_uniform_images_give_exact_values(cube_grid):
    wcs, bin_map = cube_grid
    rate = {"F555W": 2.5, "F814W": 4.0}
    images = {b: hst_image(np.full((260, 280), r), band=b) for b, r in rate.items()}
    spaxel_area = MUSE_SCALE**2 * u.arcsec**2
    phot = bin_photometry(images, bin_map, wcs, spaxel_area=spaxel_area,
                          target_psf_fwhm=0.7 * u.arcsec, unit=CUBE_UNIT, progress_bar=False)
    assert isinstance(phot, BinPhotometry)
    assert phot.bands == ("F555W", "F814W")
    assert phot.flux.shape == (5, 2)
    assert phot.flux.unit == CUBE_UNIT
    for k, band in enumerate(phot.bands):
        expected = (rate[band] * PHOTFLAM[band] / HST_SCALE**2 * SB_UNIT
                    * spaxel_area).to_value(CUBE_UNIT)
        np.testing.assert_allclose(phot.flux[:, k].value, expected, rtol=1e-6)
    assert not phot.flags.any()
    np.testing.assert_array_equal(phot.coverage, 1.0)
    assert phot.error is None
    table = phot.to_table()
    assert len(table) == 5 and table["flux_F814W"].unit == CUBE_UNIT


def test_adaptive_method_and_list_input(cube_grid):
    wcs, bin_map = cube_grid
    images = [hst_image(np.full((260, 280), 2.5), band="F555W")]
    phot = bin_photometry(images, bin_map, wcs, target_psf_fwhm=0.7 * u.arcsec,
                          unit=CUBE_UNIT, method="adaptive", progress_bar=False)
    expected = (2.5 * PHOTFLAM["F555W"] / HST_SCALE**2 * SB_UNIT
                * MUSE_SCALE**2 * u.arcsec**2).to_value(CUBE_UNIT)
    np.testing.assert_allclose(phot.flux.value, expected, rtol=1e-4)


@pytest.mark.parametrize("tile_size", [None, 7])
def test_point_source_total_flux_in_one_bin(tile_size):
    shape = (30, 30)
    wcs = tan_wcs(shape, MUSE_SCALE)
    bin_map = np.zeros(shape, dtype=int)
    n = 360
    y, x = np.indices((n, n))
    sigma = 0.08 / HST_SCALE * FWHM_TO_SIGMA
    counts = np.exp(-0.5 * ((x - 171.2) ** 2 + (y - 185.6) ** 2) / sigma**2)
    counts *= 1000.0 / counts.sum()  # 1000 e-/s in total
    image = hst_image(counts, rotation=40.0)
    phot = bin_photometry({"F555W": image}, bin_map, wcs, target_psf_fwhm=0.8 * u.arcsec,
                          unit=FLAM, tile_size=tile_size, progress_bar=False)
    total = phot.flux[0, 0] * bin_map.size
    assert total.value == pytest.approx(1000.0 * PHOTFLAM["F555W"], rel=5e-3)


def test_nonpositive_bins_flagged(cube_grid):
    wcs, bin_map = cube_grid
    good = hst_image(np.full((260, 280), 1.0), band="F555W", rotation=0.0)
    data = np.full((260, 280), 1.0)
    data[:, :140] = -1.0  # the low-x half of the image is negative
    bad = hst_image(data, band="F814W", rotation=0.0)
    phot = bin_photometry([good, bad], bin_map, wcs, target_psf_fwhm=0.6 * u.arcsec,
                          unit=CUBE_UNIT, progress_bar=False)
    assert np.all(phot.flux[:, 0].value > 0)
    negative = phot.flux[:, 1].value <= 0
    assert negative.any() and not negative.all()
    np.testing.assert_array_equal(phot.flags, negative)


def test_non_overlapping_image_raises(cube_grid):
    wcs, bin_map = cube_grid
    far = hst_image(np.ones((100, 100)), crval=(151.0, 2.2))
    with pytest.raises(CubeSFHError, match="does not overlap"):
        bin_photometry({"F555W": far}, bin_map, wcs, target_psf_fwhm=0.7 * u.arcsec,
                       unit=CUBE_UNIT, progress_bar=False)
    blank = hst_image(np.full((260, 280), np.nan))
    with pytest.raises(CubeSFHError, match="F555W image has no valid pixels"):
        bin_photometry({"F555W": blank}, bin_map, wcs, target_psf_fwhm=0.7 * u.arcsec,
                       unit=CUBE_UNIT, progress_bar=False)


@pytest.mark.parametrize("edge", ["nan", "end of image"])
def test_partial_overlap_warns_and_flags(cube_grid, edge):
    wcs, bin_map = cube_grid
    # valid data end 30 HST pixels (1.2 arcsec, 6 spaxels) beyond the cube centre in +x
    if edge == "nan":
        data = np.full((260, 280), 2.0)
        data[:, 170:] = np.nan
        image = hst_image(data, rotation=0.0)
    else:
        image = hst_image(np.full((260, 170), 2.0), rotation=0.0, offset=(55.0, 0.0))
    with pytest.warns(CubeSFHWarning, match="not covered"):
        phot = bin_photometry({"F555W": image}, bin_map, wcs, target_psf_fwhm=0.7 * u.arcsec,
                              unit=CUBE_UNIT, progress_bar=False)
    covered = np.isfinite(phot.flux[:, 0].value)
    assert covered.any() and not covered.all()
    np.testing.assert_array_equal(phot.flags, ~covered)
    expected = (2.0 * PHOTFLAM["F555W"] / HST_SCALE**2 * SB_UNIT
                * MUSE_SCALE**2 * u.arcsec**2).to_value(CUBE_UNIT)
    np.testing.assert_allclose(phot.flux[covered, 0].value, expected, rtol=1e-6)


@pytest.mark.parametrize(("method", "tile_size"), [("exact", 128), ("exact", 5),
                                                  ("adaptive", 6)])
def test_errors_from_error_array(cube_grid, method, tile_size):
    wcs, bin_map = cube_grid
    err = np.full((260, 280), 0.3)
    image = hst_image(np.full((260, 280), 5.0), err=err)
    phot = bin_photometry({"F555W": image}, bin_map, wcs, target_psf_fwhm=0.7 * u.arcsec,
                          unit=CUBE_UNIT, method=method, tile_size=tile_size,
                          progress_bar=False)
    value = (5.0 * PHOTFLAM["F555W"] / HST_SCALE**2 * SB_UNIT
             * MUSE_SCALE**2 * u.arcsec**2).to_value(CUBE_UNIT)
    rtol = 1e-6 if method == "exact" else 1e-4
    np.testing.assert_allclose(phot.flux[:, 0].value, value, rtol=rtol)
    n_spax = np.bincount(bin_map[bin_map >= 0])
    n_hst = n_spax * (MUSE_SCALE / HST_SCALE) ** 2  # HST pixels inside each bin
    # error of the bin's mean flux per spaxel = sqrt(n_hst) * sigma_pixel / n_spax
    expected = (np.sqrt(n_hst) * 0.3 * PHOTFLAM["F555W"] / n_spax * FLAM).to_value(CUBE_UNIT)
    np.testing.assert_allclose(phot.error[:, 0].value, expected, rtol=rtol)


def test_cube_like_duck_typing(cube_grid):
    wcs, bin_map = cube_grid
    images = {"F555W": hst_image(np.full((260, 280), 2.5))}
    cube = SimpleNamespace(celestial_wcs=wcs, spaxel_area=MUSE_SCALE**2 * u.arcsec**2,
                           psf_fwhm=0.7 * u.arcsec, unit=CUBE_UNIT)
    bins = SimpleNamespace(bin_map=bin_map, celestial_wcs=wcs, unit=CUBE_UNIT)
    a = bin_photometry(images, bins, cube, progress_bar=False)
    b = bin_photometry(images, bin_map, wcs, target_psf_fwhm=0.7 * u.arcsec, unit=CUBE_UNIT,
                       progress_bar=False)
    np.testing.assert_allclose(a.flux.value, b.flux.value, rtol=1e-12)


def test_bin_photometry_input_errors(cube_grid):
    wcs, bin_map = cube_grid
    images = {"F555W": hst_image(np.full((260, 280), 2.5))}
    kw = {"target_psf_fwhm": 0.7 * u.arcsec, "progress_bar": False}
    with pytest.raises(CubeSFHError, match="target_psf_fwhm"):
        bin_photometry(images, bin_map, wcs, progress_bar=False)
    with pytest.raises(CubeSFHError, match="is a F555W image"):
        bin_photometry({"F814W": images["F555W"]}, bin_map, wcs, **kw)
    with pytest.raises(CubeSFHError, match="shape"):
        bin_photometry(images, bin_map[:-1], wcs, **kw)
    with pytest.raises(CubeSFHError, match="no bins"):
        bin_photometry(images, np.full(bin_map.shape, -1), wcs, **kw)
    with pytest.raises(CubeSFHError, match="unit"):
        bin_photometry(images, bin_map, wcs, unit=SB_UNIT, **kw)
    with pytest.raises(CubeSFHError, match="no entry for band"):
        bin_photometry(images, bin_map, wcs, target_psf_fwhm={"F814W": 0.7 * u.arcsec},
                       progress_bar=False)


def test_per_band_target_and_empty_bin(cube_grid):
    wcs, bin_map = cube_grid
    bin_map = bin_map.copy()
    bin_map[15, 0] = 6  # bin 5 has no spaxels
    images = [hst_image(np.full((260, 280), 2.5), band=b) for b in ("F336W", "F555W")]
    phot = bin_photometry(images, bin_map, wcs, unit=CUBE_UNIT, progress_bar=False,
                          target_psf_fwhm={"F336W": 0.9 * u.arcsec, "F555W": 0.7 * u.arcsec})
    assert phot.bands == ("F336W", "F555W")
    np.testing.assert_array_equal(phot.target_psf_fwhm, [0.9, 0.7] * u.arcsec)
    assert phot.n_bins == 7
    assert np.all(np.isnan(phot.flux[5])) and phot.flags[5]
    assert np.isfinite(phot.flux[6]).all() and not phot.flags[6]


def test_memory_mapped_file_is_cut(tmp_path, cube_grid):
    wcs, bin_map = cube_grid
    # a mosaic much larger than the cube: only a cutout is processed
    big = np.full((1500, 1500), 2.5, dtype=np.float32)
    head = tan_wcs(big.shape, HST_SCALE).to_header()
    head.update({"BUNIT": "ELECTRONS/S", "PHOTFLAM": PHOTFLAM["F555W"], "PHOTPLAM": 5308.0})
    prim = fits.Header({"INSTRUME": "WFC3", "DETECTOR": "UVIS", "FILTER": "F555W"})
    path = tmp_path / "mosaic_drc.fits"
    fits.HDUList([fits.PrimaryHDU(header=prim), fits.ImageHDU(big, head, name="SCI")]
                 ).writeto(path)
    image = HSTImage.read(path)
    base = image.data
    while base is not None and not isinstance(base, (np.memmap, mmap.mmap)):
        base = getattr(base, "base", None)
    assert base is not None  # the data are a view of the memory map
    phot = bin_photometry({"F555W": image}, bin_map, wcs, target_psf_fwhm=0.7 * u.arcsec,
                          unit=CUBE_UNIT, progress_bar=False)
    expected = (2.5 * PHOTFLAM["F555W"] / HST_SCALE**2 * SB_UNIT
                * MUSE_SCALE**2 * u.arcsec**2).to_value(CUBE_UNIT)
    np.testing.assert_allclose(phot.flux.value, expected, rtol=1e-6)
    assert phot.pivot_wavelength[0] == 5308.0 * u.AA


def test_fit_attenuation_recovers_tau():
    from cubesfh.conventions import HST_BANDS
    from cubesfh.photometry import attenuation, fit_attenuation, history_sed, k_correction
    from cubesfh.templates import load_filter

    mf = np.zeros((3, 16))
    mf[:, -4:] = 1.0
    mf[1, 2] = 0.01  # a young population
    zh = np.zeros((3, 16))
    wave, sed = history_sed(mf, zh)
    true_tau = np.array([0.0, 0.8, 1.55])
    red = sed * attenuation(wave, true_tau)
    lw = wave.to_value(u.AA)
    norm = red[:, (lw >= 5300) & (lw <= 5500)].mean(axis=1, keepdims=True)
    phot = np.stack([load_filter(b).mean_flux_density(wave, red) for b in HST_BANDS],
                    axis=1) / norm
    phot = phot * 1.3  # a calibration offset common to all bands does not matter
    np.testing.assert_allclose(fit_attenuation(mf, zh, phot), true_tau, atol=1e-9)
    one_band = phot.copy()
    one_band[:, 1:] = np.nan
    np.testing.assert_array_equal(fit_attenuation(mf, zh, one_band), 0.0)
    # tau = 0 changes nothing; dust makes the SED redder: F438W K-correction grows
    k0 = k_correction(mf, zh, 0.08, band="F438W")
    np.testing.assert_allclose(k_correction(mf, zh, 0.08, band="F438W", tau_v=0.0), k0)
    assert np.all(k_correction(mf, zh, 0.08, band="F438W", tau_v=1.0) > k0)


def test_ccm89_known_values():
    from cubesfh.extinction import band_transmission, ccm89, galactic_transmission
    from cubesfh.utils import CubeSFHError

    # V (x = 1.82 / micron) is 1 by construction; B is 1 + 1/R_V by the definition of
    # E(B-V) (CCM89 gives 1.322 at 4400 A for R_V = 3.1); I and K as tabulated by CCM89
    assert ccm89(1 / 1.82 * u.micron) == pytest.approx(1.0, abs=1e-12)
    assert ccm89(4400 * u.AA) == pytest.approx(1 + 1 / 3.1, abs=0.002)
    assert ccm89(9000 * u.AA) == pytest.approx(0.479, abs=0.005)  # x = 1.11, near IR join
    assert ccm89(2.2 * u.micron) == pytest.approx(0.574 * (1 / 2.2) ** 1.61
                                                   - 0.527 * (1 / 2.2) ** 1.61 / 3.1)
    # 2175 A bump: the UV maximum
    uv = ccm89(np.linspace(1800, 2600, 81) * u.AA)
    assert 2150 <= np.linspace(1800, 2600, 81)[np.argmax(uv)] <= 2200
    np.testing.assert_allclose(galactic_transmission([5494.5] * u.AA, 0.1),
                               10 ** (-0.4 * 0.31), rtol=1e-5)
    assert band_transmission("F555W", 0.0) == 1.0
    assert 0.0 < band_transmission("F275W", 0.2) < band_transmission("F814W", 0.2) < 1.0
    with pytest.raises(CubeSFHError, match="E\\(B-V\\) >= 0"):
        galactic_transmission([5000] * u.AA, -0.1)
    with pytest.raises(CubeSFHError, match="1000 A to 3.33 micron"):
        ccm89([500] * u.AA)
