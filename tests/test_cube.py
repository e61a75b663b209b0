# Licensed under a 3-clause BSD style license - see LICENSE
"""
Tests of cubesfh.cube and cubesfh.io.muse on synthetic MUSE-format files.

The files are written here with plain astropy.io.fits, with the keywords of
ESO MUSE pipeline cubes (EXTNAME DATA/STAT/DQ, RA---TAN/DEC--TAN, AWAV in
Angstrom, CD matrix, BUNIT '10**(-20)*erg/s/cm**2/Angstrom', 0.2 arcsec
spaxels), so the reader is checked against an independent writer.
"""

import math

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS

from cubesfh import Cube, CubeSFHError, CubeSFHWarning
from cubesfh.cube import DEFAULT_MAX_MEMORY
from cubesfh.io.muse import USER_MASK_FLAG, parse_flux_unit

NLAM, NY, NX = 640, 6, 5  # 4749.9 ... 5548.65 Angstrom: covers the 5300-5500 S/N window
CRVAL3, CD3_3 = 4749.9, 1.25
SPAXEL = 0.2  # arcsec
MUSE_UNIT = u.Unit(1e-20 * u.erg / u.s / u.cm**2 / u.AA)
EXPECTED_WAVE = CRVAL3 + CD3_3 * np.arange(NLAM)


def muse_header(*, metres=False, pc=False):
    """DATA header cards of a MUSE pipeline cube (without the structural ones)."""
    h = fits.Header()
    h["EXTNAME"] = "DATA"
    h["HDUCLASS"] = "ESO"
    h["HDUCLAS1"] = "IMAGE"
    h["HDUCLAS2"] = "DATA"
    h["ERRDATA"] = "STAT"
    h["BUNIT"] = "10**(-20)*erg/s/cm**2/Angstrom"
    h["CTYPE1"] = "RA---TAN"
    h["CTYPE2"] = "DEC--TAN"
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    h["CRPIX1"] = 3.0
    h["CRPIX2"] = 2.5
    h["CRVAL1"] = 170.0625
    h["CRVAL2"] = 12.9915
    h["CRPIX3"] = 1.0
    if metres:
        h["CTYPE3"] = "WAVE"
        h["CUNIT3"] = "m"
        h["CRVAL3"] = CRVAL3 * 1e-10
        scale3 = CD3_3 * 1e-10
    else:
        h["CTYPE3"] = "AWAV"
        h["CUNIT3"] = "Angstrom"
        h["CRVAL3"] = CRVAL3
        scale3 = CD3_3
    if pc:
        h["CDELT1"] = -SPAXEL / 3600
        h["CDELT2"] = SPAXEL / 3600
        h["CDELT3"] = scale3
        h["PC1_1"] = 1.0
        h["PC2_2"] = 1.0
        h["PC3_3"] = 1.0
    else:
        h["CD1_1"] = -SPAXEL / 3600
        h["CD1_2"] = 0.0
        h["CD2_1"] = 0.0
        h["CD2_2"] = SPAXEL / 3600
        h["CD1_3"] = 0.0
        h["CD2_3"] = 0.0
        h["CD3_1"] = 0.0
        h["CD3_2"] = 0.0
        h["CD3_3"] = scale3
    return h


def write_muse_file(path, data, variance=None, dq=None, *, header=None, primary=None,
                    stat_bunit="(10**(-20)*erg/s/cm**2/Angstrom)**2"):
    """Write a MUSE-format file with plain astropy (an independent writer)."""
    header = muse_header() if header is None else header
    prim = fits.PrimaryHDU()
    prim.header["OBJECT"] = "NGC 3627"
    prim.header["HIERARCH ESO DRS MUSE PIXTABLE LIMITS LAMBDA LOW"] = 4749.9
    for key, value in (primary or {}).items():
        prim.header[key] = value
    hdus = [prim, fits.ImageHDU(np.asarray(data, dtype=np.float32), header=header)]
    if variance is not None:
        stat_header = header.copy()
        stat_header["EXTNAME"] = "STAT"
        stat_header["HDUCLAS2"] = "ERROR"
        stat_header["HDUCLAS3"] = "MSE"
        if stat_bunit is None:
            stat_header.remove("BUNIT", ignore_missing=True)
        else:
            stat_header["BUNIT"] = stat_bunit
        hdus.append(fits.ImageHDU(np.asarray(variance, dtype=np.float32), header=stat_header))
    if dq is not None:
        dq_header = header.copy()
        dq_header["EXTNAME"] = "DQ"
        dq_header.remove("BUNIT", ignore_missing=True)
        hdus.append(fits.ImageHDU(np.asarray(dq, dtype=np.int32), header=dq_header))
    fits.HDUList(hdus).writeto(path)
    return path


@pytest.fixture
def arrays():
    """Random flux/variance with a NaN spaxel, a NaN STAT pixel and DQ flags."""
    rng = np.random.default_rng(42)
    data = rng.normal(100.0, 5.0, (NLAM, NY, NX)).astype(np.float32)
    # variances of the noise in data (sigma = 5), so that STAT reads as a variance
    variance = rng.uniform(16.0, 36.0, (NLAM, NY, NX)).astype(np.float32)
    dq = np.zeros((NLAM, NY, NX), dtype=np.int32)
    data[:, 4, 1] = np.nan  # a spaxel outside the field
    variance[10, 2, 2] = np.nan
    dq[20:25, 0, 3] = 1  # e.g. a cosmic ray flag
    return data, variance, dq


@pytest.fixture
def muse_file(tmp_path, arrays):
    data, variance, dq = arrays
    return write_muse_file(tmp_path / "DATACUBE_FINAL.fits", data, variance, dq,
                           primary={"PSFFWHM": 0.85})


# ----------------------------------------------------------------------------- reading

def test_read_values_units_wavelength(muse_file, arrays):
    data, variance, dq = arrays
    cube = Cube.read(muse_file)
    assert cube.shape == (NLAM, NY, NX)
    assert cube.spatial_shape == (NY, NX)
    np.testing.assert_array_equal(cube.data, data)
    np.testing.assert_array_equal(cube.variance, variance)
    np.testing.assert_array_equal(cube.dq, dq)
    assert cube.unit == MUSE_UNIT
    assert cube.wavelength.unit == u.AA
    np.testing.assert_allclose(cube.wavelength.value, EXPECTED_WAVE, rtol=0, atol=1e-9)
    assert cube.wavelength_type == "air"
    assert u.isclose(cube.spaxel_scale, 0.2 * u.arcsec, rtol=1e-9)
    assert u.isclose(cube.spaxel_area, 0.04 * u.arcsec**2, rtol=1e-9)
    assert cube.psf_fwhm == 0.85 * u.arcsec
    assert cube.psf_fwhm_source == "PSFFWHM"
    assert cube.meta["OBJECT"] == "NGC 3627"
    assert cube.filename == str(muse_file)
    # the reference pixel (FITS CRPIX1, CRPIX2 = 3, 2.5) is at CRVAL1, CRVAL2
    ra, dec = cube.celestial_wcs.pixel_to_world_values(2.0, 1.5)
    assert math.isclose(ra, 170.0625, abs_tol=1e-12)
    assert math.isclose(dec, 12.9915, abs_tol=1e-12)
    # the data stay on disk and cannot be changed through the cube
    assert isinstance(cube.data, np.memmap)
    assert not cube.data.flags.writeable
    assert "Cube" in repr(cube)


@pytest.mark.parametrize("pc", [False, True])
def test_read_wavelength_in_metres_vacuum(tmp_path, arrays, pc):
    data, variance, _ = arrays
    path = write_muse_file(tmp_path / "metres.fits", data, variance,
                           header=muse_header(metres=True, pc=pc))
    with pytest.warns(CubeSFHWarning, match="vacuum"):
        cube = Cube.read(path, psf_fwhm=0.7 * u.arcsec)
    assert cube.wavelength_type == "vacuum"
    np.testing.assert_allclose(cube.wavelength.to_value(u.AA), EXPECTED_WAVE, rtol=1e-13)
    assert u.isclose(cube.spaxel_scale, 0.2 * u.arcsec, rtol=1e-9)
    assert cube.psf_fwhm_source == "psf_fwhm="


@pytest.mark.parametrize("bunit, expected", [
    ("10**(-20)*erg/s/cm**2/Angstrom", MUSE_UNIT),
    ("10**(-20)*erg.s**(-1).cm**(-2).angstrom**(-1)", MUSE_UNIT),
    ("erg/s/cm2/Angstrom", u.erg / u.s / u.cm**2 / u.AA),
    ("1e-20 erg/s/cm2/A", MUSE_UNIT),
    ("erg s-1 cm-2 A-1", u.erg / u.s / u.cm**2 / u.AA),
    ("10**-17 erg/s/cm^2/AA", u.Unit(1e-17 * u.erg / u.s / u.cm**2 / u.AA)),
])
def test_parse_flux_unit(bunit, expected):
    unit = parse_flux_unit(bunit)
    assert math.isclose(unit.to(expected), 1.0, rel_tol=1e-12)


def test_masks(muse_file, arrays):
    data, variance, dq = arrays
    cube = Cube.read(muse_file)
    expected = np.zeros(cube.shape, dtype=bool)
    expected[:, 4, 1] = True  # NaN spaxel
    expected[10, 2, 2] = True  # NaN variance
    expected[20:25, 0, 3] = True  # DQ != 0
    np.testing.assert_array_equal(cube.mask, expected)
    good = cube.good_spaxels()
    assert good.sum() == NY * NX - 1 and not good[4, 1]
    # a user mask adds to the computed one and survives slicing
    user = np.zeros(cube.shape, dtype=bool)
    user[:, 5, 4] = True
    masked = Cube(cube.data, variance=cube.variance, dq=cube.dq, mask=user, wcs=cube.wcs,
                  unit=cube.unit)
    np.testing.assert_array_equal(masked.mask, expected | user)
    np.testing.assert_array_equal(masked[:, 4:, 3:].mask, (expected | user)[:, 4:, 3:])


# ---------------------------------------------------------------------------- cut-outs

def test_spatial_cutout_wcs_and_data(muse_file, arrays):
    data, _, _ = arrays
    cube = Cube.read(muse_file)
    sub = cube[:, 1:4, 2:5]
    assert isinstance(sub, Cube) and sub is not cube
    assert sub.shape == (NLAM, 3, 3)
    np.testing.assert_array_equal(sub.data, data[:, 1:4, 2:5])
    # world coordinates of a pixel are the same before and after slicing
    for (x, y, k) in [(0, 0, 0), (2, 1, 37), (1, 2, NLAM - 1)]:
        before = cube.wcs.pixel_to_world_values(x + 2, y + 1, k)
        after = sub.wcs.pixel_to_world_values(x, y, k)
        np.testing.assert_allclose(after, before, rtol=1e-14)
    # chunks of the cut-out are the cut-out of the chunks
    (rows, chunk, var, mask), = list(sub.iter_chunks())
    assert rows == slice(0, 3)
    np.testing.assert_array_equal(chunk, data[:, 1:4, 2:5])
    np.testing.assert_array_equal(mask, cube.mask[:, 1:4, 2:5])
    assert sub.psf_fwhm == cube.psf_fwhm and sub.filename == cube.filename


def test_spectral_slab(muse_file, arrays):
    data, _, _ = arrays
    cube = Cube.read(muse_file)
    slab = cube.spectral_slab(5300 * u.AA, 5500 * u.AA)
    # pixels k with 4749.9 + 1.25 k in [5300, 5500]: k = 441 ... 600
    assert slab.shape == (160, NY, NX)
    assert math.isclose(slab.wavelength[0].value, 4749.9 + 1.25 * 441, abs_tol=1e-9)
    assert math.isclose(slab.wavelength[-1].value, 4749.9 + 1.25 * 600, abs_tol=1e-9)
    np.testing.assert_array_equal(slab.data, data[441:601])
    np.testing.assert_allclose(slab.wcs.pixel_to_world_values(1, 2, 5),
                               cube.wcs.pixel_to_world_values(1, 2, 446), rtol=1e-14)
    # other spectral units and reversed limits give the same slab
    same = cube.spectral_slab(550 * u.nm, 530 * u.nm)
    assert same.shape == slab.shape
    with pytest.raises(CubeSFHError, match="contains no pixel"):
        cube.spectral_slab(7000 * u.AA, 7100 * u.AA)


def test_bad_slices(muse_file):
    cube = Cube.read(muse_file)
    with pytest.raises(CubeSFHError, match="must be slices"):
        cube[:, 2, 3]
    with pytest.raises(CubeSFHError, match="step"):
        cube[:, ::2]
    with pytest.raises(CubeSFHError, match="selects no pixel"):
        cube[:, 3:3]


# ---------------------------------------------------------------------------- S/N

def constant_cube(tmp_path, flux=50.0, variance=4.0):
    data = np.full((NLAM, NY, NX), flux, dtype=np.float32)
    var = np.full((NLAM, NY, NX), variance, dtype=np.float32)
    data[:, 0, 0] = np.nan  # no valid pixel
    data[441:451, 1, 1] = np.nan  # 10 of the 160 window pixels missing
    path = write_muse_file(tmp_path / "constant.fits", data, var, primary={"SKY_RES": 0.9})
    return Cube.read(path)


def test_snr_known_answer(tmp_path):
    cube = constant_cube(tmp_path)
    signal, noise = cube.signal_noise(per="pixel", progress_bar=False)
    assert signal.unit == MUSE_UNIT and noise.unit == MUSE_UNIT
    expected_signal = np.full((NY, NX), 50.0)
    expected_signal[0, 0] = np.nan
    np.testing.assert_allclose(signal.value, expected_signal, rtol=1e-12)
    np.testing.assert_allclose(noise.value, np.where(np.isnan(expected_signal), np.nan, 2.0),
                               rtol=1e-12)
    # per pixel: 50 / 2 = 25; per Angstrom: 25 * sqrt(1 A / 1.25 A) = 22.36...
    snr_pix = cube.snr_map(per="pixel", progress_bar=False)
    snr_aa = cube.snr_map(progress_bar=False)
    assert np.isnan(snr_pix[0, 0]) and np.isnan(snr_aa[0, 0])
    np.testing.assert_allclose(snr_pix[~np.isnan(snr_pix)], 25.0, rtol=1e-12)
    np.testing.assert_allclose(snr_aa[~np.isnan(snr_aa)], 25.0 / math.sqrt(1.25), rtol=1e-12)
    _, noise_aa = cube.signal_noise(progress_bar=False)
    np.testing.assert_allclose(noise_aa.value[1, 1], 2.0 * math.sqrt(1.25), rtol=1e-12)
    assert cube.psf_fwhm == 0.9 * u.arcsec  # from SKY_RES


def test_snr_known_answer_varying(tmp_path):
    """Mean flux and RMS error over the window, with a non-trivial spectrum."""
    k = np.arange(NLAM)
    flux = (10.0 + (k % 4)).astype(np.float32)  # 10, 11, 12, 13, ... mean 11.5 per 4 pixels
    var = np.where(k % 2 == 0, 1.0, 3.0).astype(np.float32)  # mean 2
    data = np.broadcast_to(flux[:, None, None], (NLAM, NY, NX))
    variance = np.broadcast_to(var[:, None, None], (NLAM, NY, NX))
    cube = Cube.read(write_muse_file(tmp_path / "vary.fits", data, variance,
                                     primary={"PSFFWHM": 0.8}))
    snr = cube.snr_map(window=(5300, 5500) * u.AA, per="pixel", progress_bar=False)
    # window pixels 441..600 (160 = 40 full cycles of 4): mean flux 11.5, mean variance 2
    np.testing.assert_allclose(snr, 11.5 / math.sqrt(2.0), rtol=1e-12)


def test_chunked_snr_equals_unchunked(muse_file):
    cube = Cube.read(muse_file)
    whole = cube.snr_map(max_memory=1 * u.GB, progress_bar=False)
    row_bytes = 160 * NX * (4 + 4 + 1 + 4)  # window planes x row x (data, var, mask, dq)
    chunks = list(cube.spectral_slab(5300 * u.AA, 5500 * u.AA).iter_chunks(
        max_memory=4 * row_bytes))
    assert len(chunks) == NY  # one row per chunk
    chunked = cube.snr_map(max_memory=4 * row_bytes, progress_bar=False)
    np.testing.assert_array_equal(chunked, whole)  # exactly, NaN in the same place
    assert np.isnan(whole[4, 1]) and np.isfinite(whole).sum() == NY * NX - 1
    # and both equal a direct computation
    data = np.asarray(cube.data[441:601], dtype=np.float64)
    var = np.asarray(cube.variance[441:601], dtype=np.float64)
    bad = cube.mask[441:601]
    good = ~bad
    n = good.sum(axis=0)
    with np.errstate(invalid="ignore"):
        direct = (np.where(good, data, 0).sum(axis=0) / n) / np.sqrt(
            np.where(good, var, 0).sum(axis=0) / n) / math.sqrt(1.25)
    np.testing.assert_allclose(whole, direct, rtol=1e-12)


def test_iter_chunks_reassemble(muse_file, arrays):
    data, variance, _ = arrays
    cube = Cube.read(muse_file)
    row = NLAM * NX * (4 + 4 + 1 + 4)
    pieces = list(cube.iter_chunks(max_memory=4 * 2 * row))
    assert [p[0] for p in pieces] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces], axis=1), data)
    np.testing.assert_array_equal(np.concatenate([p[2] for p in pieces], axis=1), variance)
    assert all(p[1].dtype == np.float32 and p[1].dtype.isnative for p in pieces)
    with pytest.raises(CubeSFHError, match="cannot hold one row"):
        next(cube.iter_chunks(max_memory=3 * row))


# --------------------------------------------------------------------------- round trip

def test_round_trip(tmp_path, muse_file):
    cube = Cube.read(muse_file)
    user = np.zeros(cube.shape, dtype=bool)
    user[100:110, 3, 3] = True
    cube = Cube(cube.data, variance=cube.variance, dq=cube.dq, mask=user, wcs=cube.wcs,
                unit=cube.unit, psf_fwhm=cube.psf_fwhm, meta=cube.meta)
    out = tmp_path / "out" / "roundtrip.fits"
    cube.write(out, max_memory=200_000, progress_bar=False)  # several blocks of planes
    back = Cube.read(out)
    np.testing.assert_array_equal(back.data, cube.data)
    np.testing.assert_array_equal(back.variance, cube.variance)
    np.testing.assert_array_equal(back.mask, cube.mask)
    assert np.all(back.dq[100:110, 3, 3] & USER_MASK_FLAG)
    np.testing.assert_allclose(back.wavelength.value, cube.wavelength.value, rtol=1e-14)
    pix = np.array([[0, 0, 0], [4, 5, 639], [2.5, 1.5, 300]])
    np.testing.assert_allclose(back.wcs.pixel_to_world_values(pix),
                               cube.wcs.pixel_to_world_values(pix), rtol=1e-14)
    assert back.unit == cube.unit
    assert back.psf_fwhm == cube.psf_fwhm
    assert back.meta["OBJECT"] == "NGC 3627"
    assert back.meta["HIERARCH ESO DRS MUSE PIXTABLE LIMITS LAMBDA LOW"] == 4749.9
    with fits.open(out) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "DATA", "STAT", "DQ"]
        assert hdul["DATA"].header["CUNIT3"] == "Angstrom"
        assert hdul["DATA"].header["BUNIT"] == "10**(-20)*erg/s/cm**2/Angstrom"
    # writing is atomic and refuses to overwrite unless asked
    with pytest.raises(OSError, match="overwrite=True"):
        cube.write(out)
    assert [p.name for p in out.parent.iterdir()] == ["roundtrip.fits"]
    cube[:, 1:3, 1:4].write(out, overwrite=True, progress_bar=False)
    small = Cube.read(out)
    assert small.shape == (NLAM, 2, 3)
    np.testing.assert_allclose(small.wcs.pixel_to_world_values(0, 0, 0),
                               cube.wcs.pixel_to_world_values(1, 1, 0), rtol=1e-14)


def test_in_memory_cube_and_memmap_false(tmp_path, muse_file, arrays):
    data, variance, _ = arrays
    loaded = Cube.read(muse_file, memmap=False)
    assert not isinstance(loaded.data, np.memmap)
    np.testing.assert_array_equal(loaded.data, data)
    np.testing.assert_array_equal(loaded.snr_map(progress_bar=False),
                                  Cube.read(muse_file).snr_map(progress_bar=False))
    with pytest.raises(CubeSFHError, match="memmap=True"):
        Cube.read(muse_file, memmap=False, max_memory=10_000)
    # a cube built from arrays and Quantities
    cube = Cube(data * MUSE_UNIT, variance=variance * MUSE_UNIT**2, wcs=loaded.wcs)
    assert cube.unit == MUSE_UNIT
    np.testing.assert_array_equal(cube.snr_map(progress_bar=False),
                                  loaded.snr_map(progress_bar=False))
    assert DEFAULT_MAX_MEMORY == 1 * u.GB and cube.max_memory == 1 * u.GB


def test_scaled_data_cannot_be_memmapped(tmp_path, arrays):
    data, variance, _ = arrays
    path = tmp_path / "scaled.fits"
    hdul = fits.HDUList([fits.PrimaryHDU()])
    image = fits.ImageHDU(np.nan_to_num(data), header=muse_header())
    image.scale("int16", bscale=0.01, bzero=100.0)
    hdul.append(image)
    stat = fits.ImageHDU(variance, header=muse_header())
    stat.header["EXTNAME"] = "STAT"
    del stat.header["BUNIT"]
    hdul.append(stat)
    hdul.writeto(path)
    cube = Cube.read(path, psf_fwhm=1 * u.arcsec)  # small: loaded into memory
    np.testing.assert_allclose(cube.data, np.nan_to_num(data), atol=0.006)
    with pytest.raises(CubeSFHError, match="cannot be memory-mapped"):
        Cube.read(path, max_memory=100_000)


# ------------------------------------------------------------------------------- PSF

@pytest.mark.parametrize("cards, expected, source", [
    ({"PSFFWHM": 0.61}, 0.61, "PSFFWHM"),
    ({"FWHM": 0.92}, 0.92, "FWHM"),
    ({"SKY_RES": 1.05}, 1.05, "SKY_RES"),
    ({"FSFMODE": "MOFFAT1", "FSF00FWA": 0.9, "FSF00FWB": -4e-5}, 0.9 - 4e-5 * 5400,
     "FSF00FWA/FSF00FWB at 5400 Angstrom"),
])
def test_psf_from_header(tmp_path, arrays, cards, expected, source):
    data, variance, _ = arrays
    cube = Cube.read(write_muse_file(tmp_path / "psf.fits", data, variance, primary=cards))
    assert u.isclose(cube.psf_fwhm, expected * u.arcsec, rtol=1e-12)
    assert cube.psf_fwhm_source == source
    # the keyword wins over the header
    cube = Cube.read(tmp_path / "psf.fits", psf_fwhm=700 * u.mas)
    assert u.isclose(cube.psf_fwhm, 0.7 * u.arcsec)


def test_psf_missing_and_implausible(tmp_path, arrays):
    data, variance, _ = arrays
    cube = Cube.read(write_muse_file(tmp_path / "nopsf.fits", data, variance))
    assert not cube.has_psf_fwhm
    with pytest.raises(CubeSFHError, match=r"psf_fwhm="):
        _ = cube.psf_fwhm
    path = write_muse_file(tmp_path / "pixels.fits", data, variance, primary={"FWHM": 4.5e2})
    with pytest.warns(CubeSFHWarning, match="not a plausible PSF FWHM"):
        cube = Cube.read(path)
    assert not cube.has_psf_fwhm
    with pytest.raises(CubeSFHError, match="angle Quantity"):
        Cube.read(path, psf_fwhm=0.8)


# --------------------------------------------------------------------------- no STAT

def test_missing_stat_needs_noise(tmp_path, arrays):
    data, _, _ = arrays
    path = write_muse_file(tmp_path / "nostat.fits", data, primary={"PSFFWHM": 0.8})
    with pytest.raises(CubeSFHError, match="no STAT .*noise="):
        Cube.read(path)
    sigma = 2.0 * MUSE_UNIT
    with pytest.warns(CubeSFHWarning, match="no STAT"):
        cube = Cube.read(path, noise=sigma)
    assert cube.variance is None
    signal, noise = cube.signal_noise(per="pixel", progress_bar=False)
    np.testing.assert_allclose(noise.value[np.isfinite(noise.value)], 2.0, rtol=1e-12)
    window = data[441:601].astype(np.float64)
    n_good = np.isfinite(window).sum(axis=0)
    with np.errstate(invalid="ignore"):
        expected = np.where(np.isfinite(window), window, 0).sum(axis=0) / n_good / 2.0
    np.testing.assert_allclose(cube.snr_map(per="pixel", progress_bar=False), expected,
                               rtol=1e-6)


def test_missing_stat_der_snr(tmp_path):
    """DER_SNR recovers the noise of a flat spectrum with Gaussian noise."""
    rng = np.random.default_rng(1)
    sigma = np.array([1.0, 3.0])[None, :, None] * np.ones((NLAM, 2, 3))
    data = 40.0 + sigma * rng.standard_normal((NLAM, 2, 3))
    path = write_muse_file(tmp_path / "dersnr.fits", data, primary={"PSFFWHM": 0.8})
    with pytest.warns(CubeSFHWarning, match="der_snr"):
        cube = Cube.read(path, noise="der_snr")
    _, noise = cube.signal_noise(window=(4750, 5548) * u.AA, per="pixel", progress_bar=False)
    # 640 pixels: the DER_SNR estimate scatters by ~4 per cent around the truth
    np.testing.assert_allclose(noise.value, sigma[0], rtol=0.12)


def test_no_variance_no_noise_errors(muse_file):
    cube = Cube.read(muse_file)
    bare = Cube(cube.data, wcs=cube.wcs, unit=cube.unit)
    with pytest.raises(CubeSFHError, match="noise='der_snr'"):
        bare.snr_map(progress_bar=False)


# ---------------------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Cube.read(tmp_path / "nope.fits")


def test_not_fits(tmp_path):
    path = tmp_path / "cube.txt"
    path.write_text("this is not FITS\n")
    with pytest.raises(CubeSFHError, match="not a FITS file"):
        Cube.read(path)


def test_identified_by_content(tmp_path, arrays):
    data, variance, _ = arrays
    path = write_muse_file(tmp_path / "cube.fits", data, variance)
    renamed = path.rename(tmp_path / "cube.dat")
    assert Cube.read(renamed).shape == (NLAM, NY, NX)
    assert Cube.read(renamed, format="muse").shape == (NLAM, NY, NX)


def test_gzip_and_file_object(tmp_path, arrays):
    data, variance, _ = arrays
    path = write_muse_file(tmp_path / "cube.fits.gz", data, variance)
    cube = Cube.read(path)  # compressed: cannot be memory-mapped, small enough to load
    assert not isinstance(cube.data, np.memmap)
    np.testing.assert_array_equal(cube.data, data)
    with pytest.raises(CubeSFHError, match="cannot be memory-mapped.*compressed"):
        Cube.read(path, max_memory=100_000)
    plain = write_muse_file(tmp_path / "cube.fits", data, variance)
    with open(plain, "rb") as handle:
        np.testing.assert_array_equal(Cube.read(handle).variance, variance)


def test_not_a_cube_image(tmp_path):
    path = tmp_path / "image.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((30, 40)), name="SCI")]
                 ).writeto(path)
    with pytest.raises(CubeSFHError, match=r"not a data cube.*2-D image 30 x 40"):
        Cube.read(path)


def test_not_a_cube_table(tmp_path):
    path = tmp_path / "table.fits"
    table = fits.BinTableHDU.from_columns([fits.Column("a", "E", array=np.arange(3.0))],
                                          name="DATA")
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    with pytest.raises(CubeSFHError, match=r"not a data cube.*DATA \(table\)"):
        Cube.read(path)


@pytest.mark.parametrize("cunit3", ["furlong", "Hz", None])
def test_unknown_wavelength_units(tmp_path, arrays, cunit3):
    data, variance, _ = arrays
    header = muse_header()
    if cunit3 is None:
        del header["CUNIT3"]
    else:
        header["CUNIT3"] = cunit3
    path = write_muse_file(tmp_path / "units.fits", data, variance, header=header)
    with pytest.raises(CubeSFHError, match="unknown units.*CUNIT3"):
        Cube.read(path)


def test_not_a_wavelength_axis(tmp_path, arrays):
    data, variance, _ = arrays
    header = muse_header()
    header["CTYPE3"] = "FREQ"
    path = write_muse_file(tmp_path / "freq.fits", data, variance, header=header)
    with pytest.raises(CubeSFHError, match="not a wavelength axis"):
        Cube.read(path)


def test_no_celestial_wcs(tmp_path, arrays):
    data, variance, _ = arrays
    header = muse_header()
    for key in ("CTYPE1", "CTYPE2", "CUNIT1", "CUNIT2"):
        header[key] = "LINEAR" if key.startswith("CTYPE") else ""
    path = write_muse_file(tmp_path / "nocel.fits", data, variance, header=header)
    with pytest.raises(CubeSFHError, match="no celestial WCS"):
        Cube.read(path)


def test_missing_bunit(tmp_path, arrays):
    data, variance, _ = arrays
    header = muse_header()
    del header["BUNIT"]
    path = write_muse_file(tmp_path / "nobunit.fits", data, variance, header=header,
                           stat_bunit=None)
    with pytest.raises(CubeSFHError, match="no BUNIT.*unit="):
        Cube.read(path)
    cube = Cube.read(path, unit="10**(-20)*erg/s/cm**2/Angstrom")
    assert cube.unit == MUSE_UNIT
    header["BUNIT"] = "adu"
    path = write_muse_file(tmp_path / "adu.fits", data, variance, header=header,
                           stat_bunit=None)
    with pytest.raises(CubeSFHError, match="not a flux density per unit wavelength"):
        Cube.read(path)


@pytest.mark.parametrize("stat_bunit", ["10**(-20)*erg/s/cm**2/Angstrom**2",
                                        "10**(-20)*erg/s/cm**2/Angstrom"])
def test_legacy_eso_stat_unit(tmp_path, arrays, stat_bunit):
    # older MUSE pipeline versions do not square the flux unit in STAT's BUNIT
    # (e.g. the ESO cube shipped with mpdaf): the values are still variances
    data, variance, _ = arrays
    path = write_muse_file(tmp_path / "legacy.fits", data, variance, stat_bunit=stat_bunit)
    cube = Cube.read(path)
    np.testing.assert_array_equal(np.asarray(cube.variance), variance)
    path = write_muse_file(tmp_path / "wrong.fits", data, variance, stat_bunit="erg/s")
    with pytest.raises(CubeSFHError, match="not the square of the DATA unit"):
        Cube.read(path)


def test_all_nan_cube(tmp_path):
    data = np.full((NLAM, NY, NX), np.nan, dtype=np.float32)
    var = np.ones((NLAM, NY, NX), dtype=np.float32)
    cube = Cube.read(write_muse_file(tmp_path / "nan.fits", data, var))
    with pytest.raises(CubeSFHError, match="no valid pixel"):
        cube.snr_map(progress_bar=False)
    with pytest.raises(CubeSFHError, match="all-NaN"):
        cube.check_not_empty()


def test_memory_guards(muse_file):
    cube = Cube.read(muse_file, max_memory=1000)
    assert u.isclose(cube.max_memory, 1000 * u.byte)
    with pytest.raises(CubeSFHError, match="iter_chunks"):
        _ = cube.mask
    cube.max_memory = 10 * u.MB
    assert cube.mask.shape == cube.shape
    with pytest.raises(CubeSFHError, match="not an amount of memory"):
        cube.iter_chunks(max_memory=3 * u.s).__next__()


def test_constructor_checks(muse_file):
    cube = Cube.read(muse_file)
    with pytest.raises(CubeSFHError, match="3-D array"):
        Cube(cube.data[0], wcs=cube.wcs, unit=cube.unit)
    with pytest.raises(CubeSFHError, match="variance has shape"):
        Cube(cube.data, variance=cube.variance[:, :2], wcs=cube.wcs, unit=cube.unit)
    with pytest.raises(CubeSFHError, match="unit="):
        Cube(cube.data, wcs=cube.wcs)
    with pytest.raises(CubeSFHError, match="3-D WCS"):
        Cube(cube.data, wcs=cube.celestial_wcs, unit=cube.unit)
    with pytest.raises(CubeSFHError, match="noise="):
        Cube(cube.data, wcs=cube.wcs, unit=cube.unit, noise=3.0)
    with pytest.raises(CubeSFHError, match="WCS describes an array of shape"):
        Cube(cube.data[:, :3], wcs=cube.wcs, unit=cube.unit)
    coupled = WCS(naxis=3)
    coupled.wcs.ctype = ["RA---TAN", "DEC--TAN", "AWAV"]
    coupled.wcs.cunit = ["deg", "deg", "Angstrom"]
    coupled.wcs.pc = [[1, 0, 0], [0, 1, 0], [0.1, 0, 1]]
    with pytest.raises(CubeSFHError, match="coupled"):
        Cube(cube.data, wcs=coupled, unit=cube.unit)
