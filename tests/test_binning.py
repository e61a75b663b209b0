# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of cubesfh.binning on synthetic cubes with analytically known S/N and spectra."""

import sys

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS
from regions import CirclePixelRegion, CircleSkyRegion, PixCoord, PointPixelRegion

from cubesfh.binning import VoronoiBins, coadd_spectra, region_mask, voronoi_bin
from cubesfh.cube import Cube
from cubesfh.utils import CubeSFHError, CubeSFHWarning

UNIT = u.Unit("1e-20 erg / (s cm2 Angstrom)")
NY, NX, NLAM = 40, 40, 240
LAM0, DLAM = 5250.0, 1.25  # 5250-5548.75 A: contains the 5300-5500 A S/N window
SPAXEL = 0.2 * u.arcsec


def make_wcs(nlam=NLAM, ny=NY, nx=NX):
    wcs = WCS(naxis=3)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN", "AWAV"]
    wcs.wcs.cunit = ["deg", "deg", "Angstrom"]
    wcs.wcs.crpix = [nx / 2 + 0.5, ny / 2 + 0.5, 1.0]
    wcs.wcs.crval = [150.0, 2.0, LAM0]
    wcs.wcs.cdelt = [-SPAXEL.to_value(u.deg), SPAXEL.to_value(u.deg), DLAM]
    wcs.array_shape = (nlam, ny, nx)
    return wcs


def make_cube(flux_map, var_map, nlam=NLAM, **kwargs):
    """Cube whose spaxels have constant spectra ``flux_map`` and variances ``var_map``."""
    ny, nx = flux_map.shape
    data = np.broadcast_to(flux_map, (nlam, ny, nx)).astype(float)
    var = np.broadcast_to(var_map, (nlam, ny, nx)).astype(float)
    return Cube(data, wcs=make_wcs(nlam, ny, nx), unit=UNIT, variance=var, **kwargs)


def galaxy_snr(peak=60.0, scale=8.0):
    """Exponential S/N-per-Angstrom profile centred off-pixel."""
    yy, xx = np.indices((NY, NX))
    return peak * np.exp(-np.hypot(xx - 19.3, yy - 20.6) / scale)


@pytest.fixture
def galaxy():
    # noise-free spectra with unit pixel variance: S/N per A = flux / sqrt(1.25)
    snr = galaxy_snr()
    return make_cube(snr * np.sqrt(DLAM), np.ones((NY, NX))), snr


def test_bins_reach_target_snr(galaxy):
    cube, snr = galaxy
    bins = voronoi_bin(cube, target_snr=35, progress_bar=False)
    assert isinstance(bins, VoronoiBins)
    assert bins.bin_map.shape == (NY, NX)
    assert bins.n_bins == bins.bin_map.max() + 1 == len(bins)
    # all spaxels have S/N >= min_snr = 1 here, so all are binned
    assert np.all(bins.bin_map >= 0)
    np.testing.assert_array_equal(np.bincount(bins.bin_map.ravel()), bins.n_spaxels)
    # achieved S/N from the known per-spaxel S/N (additive noise)
    expected = np.array([snr[bins.bin_map == k].sum() / np.sqrt((bins.bin_map == k).sum())
                         for k in range(bins.n_bins)])
    np.testing.assert_allclose(bins.snr, expected, rtol=1e-9)
    assert np.all(bins.snr >= 0.8 * 35)
    assert np.median(bins.snr) == pytest.approx(35, rel=0.1)
    # spaxels above the target stay single; bins grow outwards
    assert np.all(bins.n_spaxels[bins.snr > 45] == 1)
    assert bins.n_spaxels.max() > 20
    # centroids in pixel coordinates
    k = bins.bin_map[5, 7]
    yy, xx = np.nonzero(bins.bin_map == k)
    assert (bins.x[k], bins.y[k]) == pytest.approx((xx.mean(), yy.mean()))
    # co-added spectra: constant spectra -> the mean flux of the member spaxels
    flux = snr * np.sqrt(DLAM)
    assert bins.spectra.unit == UNIT and bins.variance.unit == UNIT**2
    assert bins.spectra.shape == (bins.n_bins, NLAM)
    np.testing.assert_allclose(bins.spectra[k].value, flux[bins.bin_map == k].mean())
    np.testing.assert_allclose(bins.variance[k].value, 1.0 / bins.n_spaxels[k])
    assert bins.wavelength[0].to_value(u.AA) == pytest.approx(LAM0)
    assert bins.celestial_wcs.naxis == 2
    assert "VoronoiBins" in repr(bins)


def test_coadd_constant_spaxels_and_variance():
    rng = np.random.default_rng(0)
    flux = rng.uniform(1, 10, (NY, NX))
    var = rng.uniform(0.5, 2, (NY, NX))
    flux[:, :20] = 4.0  # a region of constant spaxels
    var[:, :20] = 0.3
    cube = make_cube(flux, var)
    bin_map = (np.arange(NY)[:, None] // 10) * 4 + np.arange(NX)[None, :] // 10  # 10x10 tiles
    bin_map[0, 0] = -1
    spectra, variance = coadd_spectra(cube, bin_map, progress_bar=False)
    assert spectra.shape == (16, NLAM)
    for k in range(16):
        members = bin_map == k
        n = members.sum()
        np.testing.assert_allclose(spectra[k].value, flux[members].mean(), rtol=1e-12)
        np.testing.assert_allclose(variance[k].value, var[members].sum() / n**2, rtol=1e-12)
    # constant spaxels -> that constant, variance / N
    np.testing.assert_allclose(spectra[1].value, 4.0, rtol=1e-12)
    np.testing.assert_allclose(variance[1].value, 0.3 / 100, rtol=1e-12)


def test_coadd_skips_bad_pixels():
    flux = np.full((NY, NX), 2.0)
    flux[0, 1] = 5.0
    data = np.broadcast_to(flux, (NLAM, NY, NX)).copy()
    data[:100, 0, 1] = np.nan  # half of one spectrum missing
    data[:, 0, 2] = np.nan  # a dead spaxel
    cube = Cube(data, wcs=make_wcs(), unit=UNIT, variance=np.ones_like(data))
    bin_map = np.zeros((NY, NX), dtype=int)
    bin_map[0, :3] = 1
    bins = VoronoiBins.from_bin_map(cube, bin_map, progress_bar=False)
    np.testing.assert_allclose(bins.spectra[1, :100].value, 2.0)  # only (0, 0) valid
    np.testing.assert_allclose(bins.variance[1, :100].value, 1.0)
    np.testing.assert_allclose(bins.spectra[1, 100:].value, 3.5)  # (2 + 5) / 2
    np.testing.assert_allclose(bins.variance[1, 100:].value, 0.5)
    assert bins.n_contributing[1, :100].tolist() == [1] * 100
    assert bins.n_spaxels.tolist() == [NY * NX - 3, 3]


def smallest_max_memory(cube):
    """The smallest memory budget (within a factor 2) that the cube accepts."""
    limit = 1024
    while True:
        try:
            next(cube.iter_chunks(max_memory=limit))
        except CubeSFHError:
            limit *= 2
        else:
            return limit


def test_chunked_coadd_equals_unchunked(galaxy, monkeypatch):
    cube, _ = galaxy
    n_chunks = []
    original = Cube.iter_chunks

    def counting(self, **kwargs):
        chunks = list(original(self, **kwargs))
        n_chunks.append(len(chunks))
        yield from chunks

    monkeypatch.setattr(Cube, "iter_chunks", counting)
    rng = np.random.default_rng(5)
    bin_map = rng.integers(-1, 30, (NY, NX))
    small, small_var = coadd_spectra(cube, bin_map, max_memory=smallest_max_memory(cube),
                                     progress_bar=False)
    big, big_var = coadd_spectra(cube, bin_map, progress_bar=False)
    assert n_chunks[-2] >= NY // 2 and n_chunks[-1] == 1
    np.testing.assert_allclose(small, big, rtol=1e-13)
    np.testing.assert_allclose(small_var, big_var, rtol=1e-13)


def test_fits_cube_round_trip(tmp_path, galaxy):
    # a MUSE-format file (float32, memory-mapped) binned with a small memory budget
    cube, _ = galaxy
    path = tmp_path / "cube.fits"
    cube.write(path)
    on_disk = Cube.read(path)
    bins = voronoi_bin(on_disk, target_snr=35, max_memory=4 * smallest_max_memory(on_disk),
                       progress_bar=False)
    reference = voronoi_bin(cube, target_snr=35, progress_bar=False)
    np.testing.assert_array_equal(bins.bin_map, reference.bin_map)
    np.testing.assert_allclose(bins.spectra, reference.spectra, rtol=1e-6)
    np.testing.assert_allclose(bins.variance, reference.variance, rtol=1e-6)


def test_min_snr_and_mask_exclude_spaxels(galaxy):
    cube, snr = galaxy
    mask = np.zeros((NY, NX), dtype=bool)
    mask[:5, :] = True
    bins = voronoi_bin(cube, target_snr=35, min_snr=2.0, mask=mask, progress_bar=False)
    excluded = bins.bin_map < 0
    np.testing.assert_array_equal(excluded, mask | (snr < 2.0))
    with pytest.raises(CubeSFHError, match="boolean array"):
        voronoi_bin(cube, mask=np.zeros((3, 3), dtype=bool), progress_bar=False)


def write_region_file(path, text):
    path.write_text("# Region file format: DS9 version 4.1\n" + text)
    return path


def test_region_file_excludes_circle(tmp_path, galaxy):
    cube, _ = galaxy
    # DS9 image coordinates are 1-based: (21, 11) is pixel (x=20, y=10)
    reg = write_region_file(tmp_path / "stars.reg", "image\ncircle(21,11,3.5)\n")
    bins = voronoi_bin(cube, target_snr=35, regions=reg, progress_bar=False)
    yy, xx = np.indices((NY, NX))
    inside = (xx - 20) ** 2 + (yy - 10) ** 2 < 3.5**2
    assert inside.sum() == 37
    np.testing.assert_array_equal(bins.bin_map < 0, inside)
    # same with a region object and a path string
    circle = CirclePixelRegion(PixCoord(20, 10), radius=3.5)
    np.testing.assert_array_equal(region_mask([circle], (NY, NX)), inside)
    np.testing.assert_array_equal(region_mask(str(reg), (NY, NX)), inside)


def test_sky_regions_use_celestial_wcs(tmp_path, galaxy):
    cube, _ = galaxy
    wcs = cube.celestial_wcs
    centre = wcs.pixel_to_world(8, 30)
    radius = 4.2 * SPAXEL
    expected = region_mask(CirclePixelRegion(PixCoord(8, 30), 4.2), (NY, NX))
    sky = CircleSkyRegion(centre, radius)
    np.testing.assert_array_equal(region_mask(sky, (NY, NX), wcs), expected)
    reg = write_region_file(
        tmp_path / "sky.reg",
        f'icrs\ncircle({centre.ra.deg:.8f},{centre.dec.deg:.8f},{radius.to_value(u.arcsec)}")\n')
    bins = voronoi_bin(cube, target_snr=35, regions=[reg], progress_bar=False)
    np.testing.assert_array_equal(bins.bin_map < 0, expected)
    with pytest.raises(CubeSFHError, match="celestial WCS"):
        region_mask(sky, (NY, NX))
    far = CircleSkyRegion(SkyCoord(10, 10, unit="deg"), radius)
    assert not region_mask(far, (NY, NX), wcs).any()


def test_malformed_region_file_raises(tmp_path, galaxy):
    cube, _ = galaxy
    bad = write_region_file(tmp_path / "bad.reg", "circle(20,10,3\nnonsense line\n")
    with pytest.raises(CubeSFHError, match=r"bad\.reg.*malformed.*DS9"):
        voronoi_bin(cube, regions=bad, progress_bar=False)
    with pytest.raises(CubeSFHError, match=r"missing\.reg.*does not exist"):
        voronoi_bin(cube, regions=tmp_path / "missing.reg", progress_bar=False)
    empty = write_region_file(tmp_path / "empty.reg", "")
    with pytest.raises(CubeSFHError, match=r"empty\.reg.*no regions"):
        region_mask(empty, (NY, NX))
    with pytest.raises(CubeSFHError, match="as a region"):
        region_mask([42], (NY, NX))


def test_point_regions_ignored_with_warning():
    regions = [PointPixelRegion(PixCoord(3, 3)), CirclePixelRegion(PixCoord(3, 3), 1.5)]
    with pytest.warns(CubeSFHWarning, match="without an area"):
        mask = region_mask(regions, (NY, NX))
    assert mask.sum() == 9


def test_unreachable_target_raises():
    snr = np.full((10, 10), 2.0)  # total S/N = 2 * sqrt(100) = 20
    cube = make_cube(snr * np.sqrt(DLAM), np.ones((10, 10)))
    with pytest.raises(CubeSFHError, match=r"target_snr=35.*100 usable spaxels.*20"):
        voronoi_bin(cube, target_snr=35, progress_bar=False)
    bins = voronoi_bin(cube, target_snr=19.0, progress_bar=False)
    assert bins.n_bins >= 1 and np.all(bins.snr >= 0.8 * 19)


def test_all_nan_cube_raises():
    cube = make_cube(np.full((10, 10), np.nan), np.ones((10, 10)))
    with pytest.raises(CubeSFHError, match="no valid pixel"):
        voronoi_bin(cube, progress_bar=False)


def test_everything_excluded_raises(galaxy):
    cube, _ = galaxy
    with pytest.raises(CubeSFHError, match="excluded by regions= or mask="):
        voronoi_bin(cube, mask=np.ones((NY, NX), dtype=bool), progress_bar=False)
    with pytest.raises(CubeSFHError, match="No spaxel reaches min_snr=100"):
        voronoi_bin(cube, min_snr=100, progress_bar=False)


def test_no_binning_needed():
    cube = make_cube(np.full((6, 6), 50.0) * np.sqrt(DLAM), np.ones((6, 6)))
    bins = voronoi_bin(cube, target_snr=35, progress_bar=False)
    assert bins.n_bins == 36
    np.testing.assert_allclose(bins.snr, 50.0)
    assert bins.to_map(np.arange(36)).tolist() == np.arange(36).reshape(6, 6).tolist()


def test_covariance_correction(galaxy):
    cube, snr = galaxy
    bins = voronoi_bin(cube, target_snr=25, covariance=1.07, progress_bar=False)
    plain = voronoi_bin(cube, target_snr=25, progress_bar=False)
    for k in range(bins.n_bins):
        members = bins.bin_map == k
        n = members.sum()
        expected = snr[members].sum() / np.sqrt(n) / (1 + 1.07 * np.log10(n))
        assert bins.snr[k] == pytest.approx(expected)
    # the corrected S/N grows slowly with N, so the scatter about the target is larger
    assert np.median(bins.snr) == pytest.approx(25, rel=0.2)
    assert bins.n_bins < plain.n_bins  # correlated noise needs larger bins
    assert np.mean(bins.n_spaxels) > 1.2 * np.mean(plain.n_spaxels)
    with pytest.raises(CubeSFHError, match="covariance"):
        voronoi_bin(cube, covariance=-1, progress_bar=False)


def test_method_validation(galaxy, monkeypatch):
    cube, _ = galaxy
    with pytest.raises(CubeSFHError, match="method"):
        voronoi_bin(cube, method="kmeans", progress_bar=False)
    monkeypatch.setitem(sys.modules, "powerbin", None)  # as if not installed
    with pytest.raises(CubeSFHError, match="pip install powerbin"):
        voronoi_bin(cube, method="powerbin", progress_bar=False)


def test_powerbin_if_installed(galaxy):
    pytest.importorskip("powerbin")
    cube, snr = galaxy
    bins = voronoi_bin(cube, target_snr=35, method="powerbin", progress_bar=False)
    assert np.all(bins.bin_map >= 0)
    assert np.all(bins.snr >= 0.8 * 35)
    assert np.median(bins.snr) == pytest.approx(35, rel=0.1)


def test_to_map_and_validation(galaxy):
    cube, _ = galaxy
    bin_map = np.full((NY, NX), -1)
    bin_map[10:20, 10:20] = 0
    bin_map[20:30, 10:20] = 1
    bins = VoronoiBins.from_bin_map(cube, bin_map, progress_bar=False)
    image = bins.to_map([1.5, 2.5] * u.km / u.s)
    assert image.unit == u.km / u.s
    assert image[15, 15].value == 1.5 and image[25, 15].value == 2.5
    assert np.isnan(image[0, 0])
    with pytest.raises(CubeSFHError, match="one value per bin"):
        bins.to_map([1.0, 2.0, 3.0])
    with pytest.raises(CubeSFHError, match="integer array"):
        coadd_spectra(cube, np.zeros((NY, NX)), progress_bar=False)
    with pytest.raises(CubeSFHError, match="no bin"):
        coadd_spectra(cube, np.full((NY, NX), -1), progress_bar=False)
