# Licensed under a 3-clause BSD style license - see LICENSE
"""
Bad inputs and faults (issue 11): each must give a clear one-line error or a flag.

Every error case asserts the exact exception class and that the message names
the problem (and, where there is one, the way out) on a single line; every
"flag" case asserts the flag that was set and that the rest of the cube was
still processed. The inputs are corrupt copies of the generated example
observation (:func:`cubesfh.datasets.make_example_observation`, a 12 x 12
spaxel cube and its HST images), built once per module.

``docs/bad_inputs.rst`` tabulates these cases; keep the two in step.
"""

import bz2
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS
from helpers import check_error, one_line

from cubesfh import Cube, CubeSFHError, CubeSFHWarning, HSTImage
from cubesfh.cli import main as cli_main
from cubesfh.datasets import make_example_observation

SHAPE = (12, 12)
REDSHIFT = 700.0 / 299_792.458  # the example's systemic velocity, 700 km/s
NLAM = 1880  # planes of the example cube (4749.72-7098.47 A)


# --------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def obs(tmp_path_factory):
    """The example observation, with DAP-like kinematics maps of its true kinematics."""
    d = tmp_path_factory.mktemp("example")
    example = make_example_observation(d, shape=SHAPE, seed=0)
    with fits.open(example.truth_path) as h:
        vel, sig, head = h["VELOCITY"].data, h["SIGMA"].data, h["VELOCITY"].header
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(vel, head, name="V_STARS"),
                      fits.ImageHDU(sig, head, name="SIGMA_STARS")]).writeto(d / "kin.fits")
        # the left half above 150 km/s: its bins go to the 300 km/s network, so a run
        # has two pPXF groups (two cache files) even with two bins
        wide = sig.copy()
        wide[:, : SHAPE[1] // 2] = 200.0
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(vel, head, name="V_STARS"),
                      fits.ImageHDU(wide, head, name="SIGMA_STARS")]).writeto(d / "kin2.fits")
    example.kin = d / "kin.fits"
    example.kin2 = d / "kin2.fits"
    example.dir = d
    return example


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bad")


def cube_variant(obs, bad_dir, name, edit):
    """Copy of the example cube with ``edit(hdul)`` applied (it may return a new HDUList)."""
    with fits.open(obs.cube_path) as h:
        hdul = fits.HDUList([hdu.copy() for hdu in h])
    hdul = edit(hdul) or hdul
    path = bad_dir / f"{name}.fits"
    hdul.writeto(path, overwrite=True)
    return path


def hst_variant(obs, bad_dir, name, edit, band="F555W"):
    with fits.open(obs.hst_paths[band]) as h:
        hdul = fits.HDUList([hdu.copy() for hdu in h])
    hdul = edit(hdul) or hdul
    path = bad_dir / f"{name}.fits"
    hdul.writeto(path, overwrite=True)
    return path


def data_end(path, extname):
    """Byte where the data of ``extname`` end in an intact file (headers + padded data)."""
    with fits.open(path) as h:
        info = h.fileinfo(h.index_of(extname))
    return info["datLoc"] + info["datSpan"]


# ------------------------------------------------------------- broken cube files

def _cut(obs, bad_dir, name, nbytes):
    raw = obs.cube_path.read_bytes()
    path = bad_dir / name
    path.write_bytes(raw[:nbytes(len(raw))])
    return path


def _truncated_in_data(obs, bad_dir):
    end = data_end(obs.cube_path, "DATA")
    path = _cut(obs, bad_dir, "trunc_data.fits", lambda n: end - 400_000)
    return path, [r"is truncated", rf"describe {end} bytes", rf"only {end - 400_000} bytes",
                  "copy or download it again"]


def _truncated_in_stat(obs, bad_dir):
    end = data_end(obs.cube_path, "STAT")
    path = _cut(obs, bad_dir, "trunc_stat.fits", lambda n: n - 5000)
    return path, ["is truncated", rf"describe {end} bytes .*STAT", rf"only {end - 5000} bytes"]


def _truncated_first_header(obs, bad_dir):
    path = _cut(obs, bad_dir, "trunc_hdr0.fits", lambda n: 1000)
    return path, ["truncated", "first header", "1000 bytes", "2880"]


def _truncated_ext_header(obs, bad_dir):
    path = _cut(obs, bad_dir, "trunc_hdr1.fits", lambda n: 2880 + 1000)
    return path, ["truncated", "inside the header of the extension after PRIMARY",
                  "3880 bytes"]


def _empty(obs, bad_dir):
    path = bad_dir / "empty.fits"
    path.write_bytes(b"")
    return path, ["is empty", "0 bytes", "fetch the file again"]


def _text(obs, bad_dir):
    path = bad_dir / "notes.fits"
    path.write_text("these are my notes on NGC 3627\n" * 20)
    return path, ["not a FITS file", "text starting 'these are my notes"]


def _png(obs, bad_dir):
    path = bad_dir / "quicklook.fits"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return path, ["not a FITS file", "a PNG image"]


def _html(obs, bad_dir):
    path = bad_dir / "download.fits"
    path.write_text("<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n")
    return path, ["not a FITS file", "HTML page"]


def _gzip_truncated(obs, bad_dir):
    path = bad_dir / "cube.fits.gz"
    path.write_bytes(gzip.compress(obs.cube_path.read_bytes())[:20_000])
    return path, ["corrupt or truncated gzip file", "gzip -t"]


def _gzip_bad_crc(obs, bad_dir):
    path = bad_dir / "crc.fits.gz"
    packed = gzip.compress(obs.cube_path.read_bytes())
    path.write_bytes(packed[:-8] + b"\0" * 8)  # CRC32 and size trailer zeroed
    return path, ["corrupt or truncated gzip file", "CRC check failed"]


def _bzip2_truncated(obs, bad_dir):
    path = bad_dir / "cube.fits.bz2"
    path.write_bytes(bz2.compress(obs.cube_path.read_bytes())[:20_000])
    return path, ["corrupt or truncated bzip2 file", "bzip2 -t"]


def _truncated_gzip_of_truncated_fits(obs, bad_dir):
    """A valid gzip stream of a truncated FITS file."""
    raw = obs.cube_path.read_bytes()
    path = bad_dir / "gz_trunc.fits.gz"
    path.write_bytes(gzip.compress(raw[: len(raw) - 100_000]))
    return path, ["is truncated", rf"only {len(raw) - 100_000} bytes"]


CUBE_FILE_CASES = [
    pytest.param(_truncated_in_data, CubeSFHError, id="truncated-in-DATA"),
    pytest.param(_truncated_in_stat, CubeSFHError, id="truncated-in-STAT"),
    pytest.param(_truncated_first_header, CubeSFHError, id="truncated-in-primary-header"),
    pytest.param(_truncated_ext_header, CubeSFHError, id="truncated-in-extension-header"),
    pytest.param(_empty, CubeSFHError, id="empty-0-bytes"),
    pytest.param(_text, CubeSFHError, id="text-file"),
    pytest.param(_png, CubeSFHError, id="PNG-bytes"),
    pytest.param(_html, CubeSFHError, id="HTML-error-page"),
    pytest.param(_gzip_truncated, CubeSFHError, id="gzip-truncated"),
    pytest.param(_gzip_bad_crc, CubeSFHError, id="gzip-bad-CRC"),
    pytest.param(_bzip2_truncated, CubeSFHError, id="bzip2-truncated"),
    pytest.param(_truncated_gzip_of_truncated_fits, CubeSFHError, id="gzip-of-truncated-FITS"),
]


@pytest.mark.parametrize("make, cls", CUBE_FILE_CASES)
def test_broken_cube_file(obs, bad_dir, make, cls):
    path, patterns = make(obs, bad_dir)
    with pytest.raises(cls) as excinfo:
        Cube.read(path)
    check_error(excinfo, cls, [re.escape(path.name), *patterns])


@pytest.mark.parametrize("kind, cls, pattern", [
    ("missing", FileNotFoundError, "not found.*check the path"),
    ("directory", IsADirectoryError, "is a directory, not a file"),
], ids=["nonexistent-path", "directory-instead-of-file"])
def test_cube_path_not_a_file(tmp_path, kind, cls, pattern):
    path = tmp_path / "nope.fits" if kind == "missing" else tmp_path
    with pytest.raises(cls) as excinfo:
        Cube.read(path)
    check_error(excinfo, cls, [pattern])


def test_truncated_cube_read_directly_by_the_format_reader(obs, bad_dir):
    """cubesfh.io.muse.read_muse itself (not only Cube.read) refuses a truncated file."""
    from cubesfh.io.muse import read_muse

    path, patterns = _truncated_in_data(obs, bad_dir)
    with pytest.raises(CubeSFHError) as excinfo:
        read_muse(path)
    check_error(excinfo, CubeSFHError, patterns)


# ---------------------------------------------------------- cube header problems

def _no_data(h):
    return fits.HDUList([h[0], h["STAT"]])


def _no_stat(h):
    return fits.HDUList([h[0], h["DATA"]])


def _stat_removed(h):
    """As a MUSE pipeline cube, whose DATA header names its variance extension."""
    h["DATA"].header["ERRDATA"] = "STAT"
    return fits.HDUList([h[0], h["DATA"]])


def _bunit(value):
    def edit(h):
        if value is None:
            del h["DATA"].header["BUNIT"]
        else:
            h["DATA"].header["BUNIT"] = value
    return edit


def _strip_wcs(keys):
    def edit(h):
        for ext in ("DATA", "STAT"):
            for key in list(h[ext].header):
                if re.fullmatch(keys, key):
                    del h[ext].header[key]
    return edit


def _ctype3(value):
    def edit(h):
        for ext in ("DATA", "STAT"):
            h[ext].header["CTYPE3"] = value
    return edit


def _white_light(h):
    image = np.nanmean(h["DATA"].data, axis=0)
    return fits.HDUList([h[0], fits.ImageHDU(image, WCS(h["DATA"].header).celestial.to_header(),
                                             name="DATA")])


def _transpose(h):
    """Arrays stored (x, y, wavelength), with a WCS that describes them honestly."""
    for ext in ("DATA", "STAT"):
        old = h[ext].header
        wcs = WCS(old).sub([3, 2, 1])
        new = fits.ImageHDU(np.ascontiguousarray(h[ext].data.transpose(2, 1, 0)),
                            wcs.to_header(), name=ext)
        new.header["BUNIT"] = old["BUNIT"]
        h[ext] = new


def _swap_header_axes(h):
    """Wavelength WCS keywords on axis 2, the data in the MUSE order (header broken)."""
    for ext in ("DATA", "STAT"):
        hdr = h[ext].header
        for key in ("CTYPE", "CUNIT", "CRVAL", "CRPIX"):
            hdr[f"{key}2"], hdr[f"{key}3"] = hdr[f"{key}3"], hdr[f"{key}2"]
        hdr["CD2_2"], hdr["CD3_3"] = hdr["CD3_3"], hdr["CD2_2"]


CUBE_HEADER_CASES = [
    pytest.param(_no_data, ["has no DATA \\(flux\\) extension", "STAT", "full MUSE cube"],
                 id="missing-DATA"),
    pytest.param(_no_stat, ["no STAT \\(variance\\) extension", "noise is unknown",
                            "noise='der_snr'"], id="missing-STAT"),
    pytest.param(_stat_removed, ["no STAT \\(variance\\) extension although the DATA "
                                 "header names it", "ERRDATA = 'STAT'", "incomplete",
                                 "noise='der_snr'"], id="STAT-named-by-ERRDATA-but-missing"),
    pytest.param(_bunit("furlongs/fortnight"), ["BUNIT = 'furlongs/fortnight'",
                                                "not a unit astropy can parse", "unit="],
                 id="unknown-BUNIT"),
    pytest.param(_bunit("Jy"), ["BUNIT = 'Jy'", "not a flux density per unit wavelength",
                                "unit="], id="non-flux-BUNIT-Jy"),
    pytest.param(_bunit("count"), ["BUNIT = 'ct'", "not a flux density per unit wavelength"],
                 id="non-flux-BUNIT-counts"),
    pytest.param(_bunit(None), ["no BUNIT", "unit='10\\*\\*\\(-20\\)"], id="missing-BUNIT"),
    pytest.param(_strip_wcs(r"(CTYPE|CUNIT|CRVAL|CRPIX)\d|CD\d_\d"),
                 ["has no WCS", "CTYPE1/2 = 'RA---TAN'/'DEC--TAN'", "CTYPE3 = 'AWAV'"],
                 id="no-WCS"),
    pytest.param(_strip_wcs(r"(CTYPE|CUNIT|CRVAL|CRPIX)3|CD3_3"),
                 ["no spectral WCS", "RA---TAN", "add CTYPE3 = 'AWAV'"],
                 id="no-spectral-WCS-celestial-only"),
    pytest.param(_white_light, ["not a data cube", "2-D image", "HSTImage.read"],
                 id="celestial-only-2D-image"),
    pytest.param(_ctype3("FREQ"), ["CTYPE3 = 'FREQ'", "not a wavelength axis", "'AWAV'"],
                 id="spectral-axis-not-wavelength"),
    pytest.param(_transpose, ["wavelength axis is FITS axis 1", "NAXIS1 = 1880",
                              "transposed", r"transpose\(2, 1, 0\)",
                              r"WCS\(hdu.header\).sub\(\[3, 2, 1\]\)"],
                 id="axes-transposed-x-y-lambda"),
    pytest.param(_swap_header_axes, ["wavelength axis is FITS axis 2", "not axis 3",
                                     r"sub\(\[1, 3, 2\]\)", "if only the header is wrong"],
                 id="wavelength-WCS-on-axis-2"),
]


@pytest.mark.parametrize("edit, patterns", CUBE_HEADER_CASES)
def test_cube_header_problem(obs, bad_dir, request, edit, patterns):
    path = cube_variant(obs, bad_dir, request.node.callspec.id, edit)
    with pytest.raises(CubeSFHError) as excinfo:
        Cube.read(path)
    check_error(excinfo, CubeSFHError, [re.escape(path.name), *patterns])


def test_transposed_cube_fix_named_in_the_message_works(obs, bad_dir, tmp_path):
    path = cube_variant(obs, bad_dir, "transposed_fix", _transpose)
    with pytest.raises(CubeSFHError, match=r"transpose\(2, 1, 0\)"):
        Cube.read(path)
    # the fix, as the message gives it
    with fits.open(path) as h:
        fixed = Cube(h["DATA"].data.transpose(2, 1, 0), wcs=WCS(h["DATA"].header).sub([3, 2, 1]),
                     unit=h["DATA"].header["BUNIT"], variance=h["STAT"].data.transpose(2, 1, 0))
        fixed.write(tmp_path / "fixed.fits", progress_bar=False)
    back, orig = Cube.read(tmp_path / "fixed.fits"), Cube.read(obs.cube_path)
    np.testing.assert_array_equal(back.data, orig.data)
    np.testing.assert_allclose(back.wavelength, orig.wavelength)


def test_array_transposed_under_a_muse_header_warns(obs, bad_dir):
    """[x, y, lambda] data written with the MUSE header: 12 'planes', 1880 'x' pixels."""
    def edit(h):
        for ext in ("DATA", "STAT"):
            h[ext] = fits.ImageHDU(np.ascontiguousarray(h[ext].data.transpose(2, 1, 0)),
                                   h[ext].header, name=ext)
    path = cube_variant(obs, bad_dir, "transposed_muse_header", edit)
    with pytest.warns(CubeSFHWarning, match=r"12 wavelength planes .* 1880 pixels.*"
                                            r"transpose\(2, 1, 0\)"):
        Cube.read(path)


# ----------------------------------------------- cube contents: errors and flags

def _stat(value):
    def edit(h):
        h["STAT"].data[:] = value(h["STAT"].data)
    return edit


CUBE_CONTENT_CASES = [
    pytest.param(_stat(lambda v: np.nan), ["STAT \\(the variance\\) is NaN", "STAT extension"],
                 id="all-NaN-STAT"),
    pytest.param(_stat(lambda v: 0.0), ["STAT \\(the variance\\) is zero everywhere",
                                        "variances must be > 0"], id="zero-STAT"),
    pytest.param(_stat(lambda v: -v), ["STAT \\(the variance\\) is negative everywhere",
                                       "sigma\\*\\*2"], id="negative-STAT"),
    pytest.param(lambda h: h["DATA"].data.fill(np.nan), ["DATA is NaN", "all-NaN cube"],
                 id="all-NaN-DATA"),
]


@pytest.mark.parametrize("edit, patterns", CUBE_CONTENT_CASES)
def test_cube_without_valid_pixels(obs, bad_dir, request, edit, patterns):
    path = cube_variant(obs, bad_dir, request.node.callspec.id, edit)
    cube = Cube.read(path)  # reading is lazy: the arrays are only checked when used
    with pytest.raises(CubeSFHError) as excinfo:
        cube.snr_map(progress_bar=False)
    check_error(excinfo, CubeSFHError, ["no valid pixel in the window 5300.0-5500.0",
                                        re.escape(path.name), *patterns])


def test_wavelength_range_misses_the_rest_frame(obs, bad_dir):
    from cubesfh.preprocess import prepare_observation

    def edit(h):
        for ext in ("DATA", "STAT"):
            h[ext].header["CRVAL3"] = 7500.0  # as if observed in the red only
    cube = Cube.read(cube_variant(obs, bad_dir, "red_only", edit))
    with pytest.raises(CubeSFHError) as excinfo:
        prepare_observation(cube, None, redshift=REDSHIFT, kinematics=obs.kin,
                            progress_bar=False)
    # 7500-9849 A is narrower than 4800-7000 A at any redshift (ratio 1.31 < 1.46)
    check_error(excinfo, CubeSFHError, ["rest-frame 4800-7000 A",
                                        "cube covers only 7500-9849 A",
                                        "too narrow .* at any redshift",
                                        "give the full MUSE cube"])


@pytest.fixture(scope="module")
def nan_run(obs, bad_dir):
    """The pipeline on a cube with NaN and inf pixels in part of the field."""
    pytest.importorskip("torch")
    from cubesfh.pipeline import run_pipeline

    def edit(h):
        data = h["DATA"].data
        data[600:700, :4, :] = np.nan  # ~5400-5500 A in the four bottom rows
        data[650:660, :4, :] = np.inf
        data[:, 11, 11] = np.nan  # one spaxel without any data
    cube = Cube.read(cube_variant(obs, bad_dir, "nan_pixels", edit))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CubeSFHWarning)
        maps = run_pipeline(cube, None, kinematics=obs.kin, redshift=REDSHIFT, target_snr=60,
                            progress_bar=False)
    return maps


def test_nan_inf_pixels_flag_their_bins_only(nan_run):
    from cubesfh.flags import BinFlag

    maps = nan_run
    flags = np.asarray(maps.table["flag"])
    # 100 of 1880 planes lost: a gap (under 25 % of 4800-7000 A), not "incomplete"
    gap = (flags & BinFlag.SPECTRAL_GAP) != 0
    touched = np.unique(maps.bin_map[:4][maps.bin_map[:4] >= 0])
    assert gap.any()
    assert set(np.flatnonzero(gap)) <= set(touched)
    assert not (flags & BinFlag.SPECTRUM_INCOMPLETE).any()
    lost = np.asarray(maps.table["gap_fraction"])
    assert np.all(lost[~gap] == 0) and np.all((lost[gap] > 0.02) & (lost[gap] < 0.1))
    # the rest of the cube was processed: every bin has a CNN age
    assert maps.n_bins > 40
    assert np.isfinite(np.asarray(maps.table["cnn_logage_lw"])).all()


def test_all_nan_spaxel_not_binned_and_flagged(nan_run):
    from cubesfh.maps import FLAG_NOT_BINNED

    maps = nan_run
    assert maps.bin_map[11, 11] == -1
    assert (maps.bin_map >= 0).sum() == SHAPE[0] * SHAPE[1] - 1
    with fits.open(_written(maps)) as h:
        assert h["FLAG"].data[11, 11] & FLAG_NOT_BINNED


def _written(maps):
    path = Path(tempfile.mkdtemp()) / "maps.fits"
    maps.write(path)
    return path


# ------------------------------------------------------------------- HST images

def _sci(key, value):
    def edit(h):
        if value is None:
            h[0].header.remove(key, ignore_missing=True)
            h["SCI"].header.remove(key, ignore_missing=True)
        else:
            h[0].header[key] = value
    return edit


HST_READ_CASES = [
    pytest.param(_sci("PHOTFLAM", None), {}, ["no valid PHOTFLAM keyword", "photflam="],
                 id="HST-without-PHOTFLAM"),
    pytest.param(_sci("EXPTIME", 0.0), {}, ["EXPTIME = 0 s", "no exposure",
                                            "leave the band out"], id="HST-zero-exposure"),
    pytest.param(lambda h: None, {"band": "F999W"},
                 ["Unknown band 'F999W'", "F275W, F336W, F438W, F555W, F814W"],
                 id="wrong-band-name"),
    pytest.param(lambda h: None, {"band": "F275W"},
                 ["band='F275W' was given but the header", "says F555W",
                  "force_band=True \\(--force-band\\)"], id="band-contradicts-header"),
]


@pytest.mark.parametrize("edit, kwargs, patterns", HST_READ_CASES)
def test_hst_read_problem(obs, bad_dir, request, edit, kwargs, patterns):
    path = hst_variant(obs, bad_dir, request.node.callspec.id, edit)
    with pytest.raises(CubeSFHError) as excinfo:
        HSTImage.read(path, **kwargs)
    check_error(excinfo, CubeSFHError, [re.escape(path.name), *patterns])


def test_hst_without_photplam(obs, bad_dir):
    path = hst_variant(obs, bad_dir, "nophotplam", _sci("PHOTPLAM", None))
    # count rates need only PHOTFLAM: read, calibrated, pivot unknown
    image = HSTImage.read(path)
    assert image.photplam is None and np.isfinite(image.to_surface_brightness()).all()
    # f_nu data cannot be converted without it
    with pytest.raises(CubeSFHError) as excinfo:
        HSTImage.read(path, unit="Jy")
    check_error(excinfo, CubeSFHError, ["Jy \\(f_nu\\)", "PHOTPLAM is missing", "photplam="])


def test_band_contradicting_header_can_be_forced(obs):
    with pytest.warns(CubeSFHWarning, match="says F555W; using F275W \\(force_band=True\\)"):
        image = HSTImage.read(obs.hst_paths["F555W"], band="F275W", force_band=True)
    assert image.band == "F275W"


def _hst_truncated(obs, bad_dir):
    raw = obs.hst_paths["F555W"].read_bytes()
    path = bad_dir / "hst_trunc.fits"
    path.write_bytes(raw[: len(raw) - 10_000])
    return path, "HST image", CubeSFHError, ["is truncated", rf"only {len(raw) - 10_000} bytes"]


def _hst_empty(obs, bad_dir):
    path = bad_dir / "hst_empty.fits"
    path.write_bytes(b"")
    return path, "HST image", CubeSFHError, ["is empty \\(0 bytes\\)"]


def _hst_text(obs, bad_dir):
    path = bad_dir / "hst_text.fits"
    path.write_text("F555W=f555w_drc.fits\n")
    return path, "HST image", CubeSFHError, ["not a FITS file", "text starting"]


def _hst_dir(obs, bad_dir):
    return bad_dir, "HST image", IsADirectoryError, ["is a directory, not a file"]


def _hst_missing(obs, bad_dir):
    return bad_dir / "f555w_drc.fits", "HST image", FileNotFoundError, ["not found"]


def _cube_as_hst(obs, bad_dir):
    return (obs.cube_path, "HST image", CubeSFHError,
            ["does not hold a 2-D image \\(shape \\(1880, 12, 12\\)\\)"])


def _hst_as_cube(obs, bad_dir):
    return (obs.hst_paths["F555W"], "MUSE cube", CubeSFHError,
            ["not a data cube", "2-D HST images are read with HSTImage.read"])


@pytest.mark.parametrize("make", [
    pytest.param(_hst_truncated, id="HST-truncated"),
    pytest.param(_hst_empty, id="HST-empty"),
    pytest.param(_hst_text, id="HST-not-FITS"),
    pytest.param(_hst_dir, id="HST-directory"),
    pytest.param(_hst_missing, id="HST-nonexistent"),
    pytest.param(_cube_as_hst, id="cube-given-as-HST-image"),
    pytest.param(_hst_as_cube, id="HST-image-given-as-cube"),
])
def test_broken_hst_file(obs, bad_dir, make):
    path, what, cls, patterns = make(obs, bad_dir)
    with pytest.raises(cls) as excinfo:
        HSTImage.read(path) if what == "HST image" else Cube.read(path)
    check_error(excinfo, cls, [re.escape(Path(path).name), *patterns])


def _all_nan(h):
    h["SCI"].data[:] = np.nan


def _nan_over_cube(h):
    h["SCI"].data[4:-4, 4:-4] = np.nan  # data only on a 4-pixel frame outside the cube


def _far(h):
    h["SCI"].header["CRVAL2"] += 1.0  # one degree north


HST_COVERAGE_CASES = [
    pytest.param(_all_nan, "register", ["F555W image .*nan_register.fits has no valid pixels",
                                        "every pixel is NaN", "leave the band out"],
                 id="all-NaN-HST-registration"),
    pytest.param(_all_nan, "photometry", ["F555W image .*nan_photometry.fits has no valid "
                                          "pixels", "every pixel is NaN"],
                 id="all-NaN-HST-photometry"),
    pytest.param(_nan_over_cube, "photometry", ["no valid pixels over the MUSE field",
                                                "data only elsewhere"],
                 id="HST-NaN-over-the-cube"),
    pytest.param(_far, "register", ["does not overlap the cube footprint"],
                 id="cube-and-HST-no-overlap"),
]


@pytest.mark.parametrize("edit, stage, patterns", HST_COVERAGE_CASES)
def test_hst_without_data_on_the_cube(obs, bad_dir, edit, stage, patterns):
    from cubesfh.photometry import bin_photometry
    from cubesfh.registration import register

    name = {"register": "nan_register", "photometry": "nan_photometry"}[stage]
    if edit is not _all_nan:
        name = edit.__name__.strip("_")
    image = HSTImage.read(hst_variant(obs, bad_dir, name, edit))
    cube = Cube.read(obs.cube_path)
    with pytest.raises(CubeSFHError) as excinfo:
        if stage == "register":
            register(cube, {"F555W": image}, max_offset=0.3 * u.arcsec)
        else:
            bin_map = np.arange(SHAPE[0] * SHAPE[1]).reshape(SHAPE)
            bin_photometry({"F555W": image}, bin_map, cube, progress_bar=False)
    check_error(excinfo, CubeSFHError, patterns)


def test_duplicated_band_in_a_list_of_images(obs):
    from cubesfh.photometry import bin_photometry

    cube = Cube.read(obs.cube_path)
    images = [HSTImage.read(obs.hst_paths["F555W"])] * 2
    with pytest.raises(CubeSFHError) as excinfo:
        bin_photometry(images, np.zeros(SHAPE, int), cube, progress_bar=False)
    check_error(excinfo, CubeSFHError, ["Two images for band F555W", "one image per band"])


# ----------------------------------------------------------------------- regions

def test_region_file_that_does_not_parse(obs, bad_dir):
    from cubesfh.binning import region_mask

    path = bad_dir / "stars.reg"
    path.write_text("# Region file format: DS9\nfk5\ncircle(170.06,12.99,\n")
    cube = Cube.read(obs.cube_path)
    with pytest.raises(CubeSFHError) as excinfo:
        region_mask(path, cube.spatial_shape, cube.celestial_wcs)
    check_error(excinfo, CubeSFHError, ["stars.reg", "(Could not parse|malformed)",
                                        "save the regions again from DS9|Region > Save"])


def test_ds9_region_outside_the_cube_warns(obs, bad_dir):
    from cubesfh.binning import region_mask

    path = bad_dir / "elsewhere.reg"
    path.write_text('# Region file format: DS9\nfk5\ncircle(171.0625,13.9915,2")\n')
    cube = Cube.read(obs.cube_path)
    with pytest.warns(CubeSFHWarning, match="outside the cube"):
        mask = region_mask(path, cube.spatial_shape, cube.celestial_wcs)
    assert not mask.any()


# --------------------------------------------------------------- model weights

@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    pytest.importorskip("torch")
    from cubesfh.network import BUNDLED_MODELS

    d = tmp_path_factory.mktemp("models")
    stem = BUNDLED_MODELS[0]
    return d, stem.with_suffix(".pt"), stem.with_suffix(".json"), \
        BUNDLED_MODELS[1].with_suffix(".json")


def _model(d, weights=None, meta=None, name="m"):
    pt, js = d / f"{name}.pt", d / f"{name}.json"
    if weights is not None:
        pt.write_bytes(weights)
    if meta is not None:
        js.write_text(meta)
    return pt


def _consistent_but_wrong_architecture(d, pt, js):
    from cubesfh.network._predict import _meta_digest
    from cubesfh.utils import sha256_file

    meta = json.loads(js.read_text())
    meta["architecture"]["channels"] = [8, 16, 32]
    path = _model(d, pt.read_bytes(), None, "arch")
    meta["weights_sha256"] = sha256_file(path)
    meta["meta_sha256"] = _meta_digest(meta)
    (d / "arch.json").write_text(json.dumps(meta))
    return path


MODEL_CASES = [
    pytest.param(lambda d, pt, js, other: _model(d, os.urandom(4096), js.read_text(), "rand"),
                 ["rand.pt does not match the SHA-256", "Reinstall cubesfh"],
                 id="weights-random-bytes"),
    pytest.param(lambda d, pt, js, other: _model(d, pt.read_bytes()[:5000], js.read_text(),
                                                 "short"),
                 ["short.pt does not match the SHA-256"], id="weights-truncated-pt"),
    pytest.param(lambda d, pt, js, other: _model(d, pt.read_bytes(), None, "nojson"),
                 ["model file .*nojson.json not found", "train"], id="json-sidecar-missing"),
    pytest.param(lambda d, pt, js, other: _model(d, pt.read_bytes(), other.read_text(), "mix"),
                 ["mix.pt does not match the SHA-256 recorded in mix.json"],
                 id="json-sidecar-of-another-model"),
    pytest.param(lambda d, pt, js, other: _model(d, pt.read_bytes(), js.read_text()[:300],
                                                 "badjson"),
                 ["badjson.json is not valid JSON", "corrupted"], id="json-sidecar-truncated"),
    pytest.param(lambda d, pt, js, other: _model(d, pt.read_bytes(), "[1, 2, 3]", "list"),
                 ["could not load the model", "not a cubesfh model or are damaged"],
                 id="json-sidecar-not-an-object"),
    pytest.param(lambda d, pt, js, other: _consistent_but_wrong_architecture(d, pt, js),
                 ["could not load the weights in .*arch.pt", "size mismatch"],
                 id="weights-do-not-fit-architecture"),
    pytest.param(lambda d, pt, js, other: _model(d, None, None, "absent"),
                 ["model file .*absent.pt not found"], id="weights-missing"),
]


@pytest.mark.parametrize("make, patterns", MODEL_CASES)
def test_corrupt_model_files(model_files, make, patterns):
    from cubesfh.network import SFHModel

    path = make(*model_files)
    with pytest.raises(CubeSFHError) as excinfo:
        SFHModel.load(path)
    check_error(excinfo, CubeSFHError, patterns)


# ------------------------------------------------------------ outputs and CLI

def _unwritable_dir(tmp_path):
    """A folder this process cannot write to (root ignores permissions: try /sys)."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    for candidate in (ro, Path("/sys")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no unwritable folder available to this process")


def test_existing_output_without_overwrite(obs, tmp_path):
    cube = Cube.read(obs.cube_path)[:, :2, :2]
    out = tmp_path / "cut.fits"
    cube.write(out, progress_bar=False)
    before = out.read_bytes()
    with pytest.raises(FileExistsError) as excinfo:
        cube.write(out, progress_bar=False)
    check_error(excinfo, FileExistsError, ["cut.fits already exists", "overwrite=True"])
    assert out.read_bytes() == before


def test_unwritable_output_directory(obs, tmp_path):
    from cubesfh.utils import atomic_write

    folder = _unwritable_dir(tmp_path)
    with pytest.raises(PermissionError) as excinfo, atomic_write(folder / "maps.fits"):
        pass
    check_error(excinfo, PermissionError, ["is not writable", "choose another output folder"])


def run_cli(capsys, argv):
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.fixture
def cli_case(obs, tmp_path):
    """Arguments of a cheap 'prepare' run on the example."""
    def argv(*extra, hst=None, output=None):
        hst = hst if hst is not None else [f"F555W={obs.hst_paths['F555W']}"]
        out = output or str(tmp_path / "prep.fits")
        return ["prepare", str(obs.cube_path), "--hst", *hst, "-o", out, "--kinematics",
                str(obs.kin), "--redshift", str(REDSHIFT), "--target-snr", "60",
                "--no-progress", *extra]
    return argv


CLI_CASES = [
    pytest.param(lambda o, t: {"hst": [f"F555W={o.hst_paths['F555W']}",
                                       f"F555W={o.hst_paths['F814W']}"]},
                 ["--hst names band F555W twice", "one image per band"], id="CLI-duplicated-band"),
    pytest.param(lambda o, t: {"hst": [str(o.hst_paths["F555W"])]},
                 ["--hst expects BAND=PATH"], id="CLI-hst-without-band"),
    pytest.param(lambda o, t: {"hst": [f"F275W={o.hst_paths['F814W']}"]},
                 ["says F814W", "--force-band"], id="CLI-F814W-image-as-F275W"),
    pytest.param(lambda o, t: {"hst": [f"F555W={t / 'nope.fits'}"]},
                 ["HST image .*nope.fits' not found"], id="CLI-HST-nonexistent"),
    pytest.param(lambda o, t: {"output": str(t)}, ["is a directory; give the name of the file"],
                 id="CLI-output-is-a-directory"),
    pytest.param(lambda o, t: {"output": str(_unwritable_dir(t) / "maps.fits")},
                 ["is not writable", "choose another output folder"],
                 id="CLI-unwritable-output-directory"),
    pytest.param(lambda o, t: {"extra": ["--mask", str(_bad_region(t))]},
                 ["bad.reg", "Could not parse|malformed"], id="CLI-region-file-does-not-parse"),
]


def _bad_region(tmp_path):
    path = tmp_path / "bad.reg"
    path.write_text("# Region file format: DS9\nfk5\ncircle(1,2,\n")
    return path


@pytest.mark.parametrize("make, patterns", CLI_CASES)
def test_cli_error_is_one_line(obs, tmp_path, capsys, cli_case, make, patterns):
    kw = make(obs, tmp_path)
    argv = cli_case(*kw.pop("extra", []), **kw)
    code, err = run_cli(capsys, argv)
    assert code == 2
    one_line(err)
    assert err.startswith("cubesfh prepare: error: ")
    for pattern in patterns:
        assert re.search(pattern, err), (pattern, err)
    assert "Traceback" not in err


def test_cli_force_band_runs_with_a_warning(obs, tmp_path, capsys, cli_case):
    argv = cli_case("--force-band", hst=[f"F275W={obs.hst_paths['F814W']}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run_cli(capsys, argv)
    assert code == 0, err
    assert any("says F814W; using F275W (force_band=True)" in str(w.message) for w in caught)
    assert (tmp_path / "prep.fits").exists()


def test_cli_existing_output_without_overwrite(obs, tmp_path, capsys):
    existing = tmp_path / "example_muse_cube.fits"
    existing.write_bytes(b"an earlier product")
    code, err = run_cli(capsys, ["make-example", str(tmp_path)])
    assert code == 2
    assert existing.read_bytes() == b"an earlier product"
    assert re.fullmatch(r"cubesfh make-example: error: .*example_muse_cube.fits already "
                        r"exists; pass --overwrite to replace it\.", err)


def test_cli_corrupt_model(obs, tmp_path, capsys):
    pytest.importorskip("torch")
    bad = tmp_path / "net.pt"
    bad.write_bytes(os.urandom(1000))
    (tmp_path / "net.json").write_text("{}")
    code, err = run_cli(capsys, ["run", str(obs.cube_path), "-o", str(tmp_path / "m.fits"),
                                 "--model", str(bad), "--no-progress"])
    assert code == 2
    assert re.fullmatch(r"cubesfh run: error: .*net.json does not match its recorded "
                        r"checksum.*", one_line(err))


def _subprocess_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cubesfh.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("kind", ["missing-cube", "truncated-cube", "text-cube",
                                  "duplicated-band"])
def test_cli_subprocess_no_traceback(obs, bad_dir, tmp_path, kind):
    cube = {"missing-cube": str(tmp_path / "absent.fits"),
            "truncated-cube": str(_truncated_in_data(obs, bad_dir)[0]),
            "text-cube": str(_text(obs, bad_dir)[0])}.get(kind, str(obs.cube_path))
    hst = [f"F555W={obs.hst_paths['F555W']}"] * (2 if kind == "duplicated-band" else 1)
    proc = _subprocess_cli("run", cube, "--hst", *hst, "-o", str(tmp_path / "m.fits"))
    assert proc.returncode == 2, proc.stderr
    err = one_line(proc.stderr)
    assert err.startswith("cubesfh run: error: ") and "Traceback" not in err
    assert re.search({"missing-cube": "absent.fits' not found", "truncated-cube": "truncated",
                      "text-cube": "not a FITS file", "duplicated-band": "twice"}[kind], err)
    assert not (tmp_path / "m.fits").exists()


# ------------------------------------------------------- interruptions (signals)

@pytest.fixture(scope="module")
def interrupted(obs, tmp_path_factory):
    """
    The cheapest real path that --cache-dir covers: 'run --ppxf' on two bins (two cache
    files), with ``--scheduler serial --workers 1`` so that the bins are fitted one after
    the other. A reference run; a run stopped by SIGINT once the first bin is cached; a
    rerun killed by SIGKILL when the second one lands in the cache (around the writing
    of the output); a final rerun.
    """
    pytest.importorskip("torch")
    pytest.importorskip("ppxf")
    d = tmp_path_factory.mktemp("signals")
    cache = d / "cache"
    argv = ["run", str(obs.cube_path), "--kinematics", str(obs.kin2), "--redshift",
            str(REDSHIFT), "--target-snr", "300", "--no-register", "--ppxf", "--scheduler",
            "serial", "--workers", "1", "--no-progress"]
    cmd = [sys.executable, "-m", "cubesfh.cli", *argv]
    ref = subprocess.run([*cmd, "-o", str(d / "ref.fits")], capture_output=True, text=True,
                         timeout=300, check=False)
    assert ref.returncode == 0, ref.stderr

    def stopped(output, sig, n_cached):
        proc = subprocess.Popen([*cmd, "-o", str(output), "--cache-dir", str(cache)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(300, proc.kill)
        watchdog.start()
        try:
            while proc.poll() is None and len(list(cache.glob("*.npz"))) < n_cached:
                time.sleep(0.02)
            finished_early = proc.poll() is not None
            if not finished_early:
                proc.send_signal(sig)
            out, err = proc.communicate(timeout=120)
        finally:
            watchdog.cancel()
        return {"rc": proc.returncode, "err": err.strip(), "early": finished_early,
                "cached": sorted(p.name for p in cache.glob("*.npz")),
                "mtimes": {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npz")}}

    sigint = stopped(d / "a.fits", signal.SIGINT, 1)
    sigint["output"] = (d / "a.fits").exists()
    sigkill = stopped(d / "b.fits", signal.SIGKILL, 2)
    final = subprocess.run([*cmd, "-o", str(d / "c.fits"), "--cache-dir", str(cache)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert final.returncode == 0, final.stderr
    return {"dir": d, "sigint": sigint, "sigkill": sigkill}


def _same_product(a, b):
    with fits.open(a) as ha, fits.open(b) as hb:
        assert [h.name for h in ha] == [h.name for h in hb]
        for x, y in zip(ha, hb):
            if x.data is None:
                continue
            if isinstance(x, fits.BinTableHDU):
                for name in x.columns.names:
                    np.testing.assert_array_equal(x.data[name], y.data[name], err_msg=name)
            else:
                np.testing.assert_array_equal(x.data, y.data, err_msg=x.name)


def test_sigint_mid_run_keeps_the_cache_and_exits_in_one_line(interrupted):
    run = interrupted["sigint"]
    assert not run["early"], "the run finished before the signal: the test proves nothing"
    assert run["rc"] == 130
    # cubesfh's own report is one line, the last one (a dask scheduler, when one is used,
    # may log its own cancelled tasks before it); no traceback
    assert "Traceback" not in run["err"]
    assert re.fullmatch(r"cubesfh run: interrupted; outputs are written atomically, so none "
                        r"is left half-written \(finished pPXF bins are kept in the "
                        r"--cache-dir: run the same command again to resume\)\.",
                        run["err"].splitlines()[-1])
    assert not run["output"]
    assert len(run["cached"]) == 1


def test_sigkill_leaves_no_partial_output_and_resume_is_identical(interrupted):
    d, first, run = interrupted["dir"], interrupted["sigint"], interrupted["sigkill"]
    assert run["early"] or run["rc"] == -signal.SIGKILL
    # the rerun reused the group finished before SIGINT and computed only the other one
    (kept,) = first["cached"]
    assert run["mtimes"][kept] == first["mtimes"][kept]
    assert len(run["cached"]) == 2
    partial = d / "b.fits"
    if partial.exists():  # killed after the atomic rename: then it is complete
        _same_product(partial, d / "ref.fits")
    # resumed after both interruptions: the same product as the uninterrupted run
    _same_product(d / "c.fits", d / "ref.fits")


def test_sigkill_inside_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "maps.fits"
    target.write_bytes(b"previous complete product")
    code = ("import os, signal, sys\n"
            "from cubesfh.utils import atomic_write\n"
            "with atomic_write(sys.argv[1], overwrite=True) as tmp:\n"
            "    tmp.write_bytes(b'half a prod')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous complete product"
    fresh = tmp_path / "new.fits"
    proc = subprocess.run([sys.executable, "-c", code, str(fresh)], timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL and not fresh.exists()


# ------------------------------------------------------------------ no network

@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """pip pointed at a closed local port, with no other index or wheel folder."""
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    for key, value in {"PIP_CONFIG_FILE": os.devnull,
                       "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                       "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": str(empty),
                       "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "2",
                       "PIP_CONSTRAINT": ""}.items():
        monkeypatch.setenv(key, value)
    return tmp_path / "cache"


def test_no_network_pip_download(no_network):
    from cubesfh.utils._fetch import pip_download

    with pytest.raises(CubeSFHError) as excinfo:
        pip_download("mpdaf", "3.6", "mpdaf-*.whl", no_network)
    check_error(excinfo, CubeSFHError, ["pip could not download mpdaf==3.6",
                                        "check the access to the package index",
                                        "PIP_INDEX_URL", "or put the file in"])


def test_no_network_pip_download_timeout(no_network):
    from cubesfh.utils._fetch import pip_download

    with pytest.raises(CubeSFHError) as excinfo:
        pip_download("mpdaf", "3.6", "mpdaf-*.whl", no_network, timeout=0.01)
    check_error(excinfo, CubeSFHError, ["Could not download mpdaf==3.6", "timed out",
                                        "check the access to the package index"])


# ------------------------------------------------------------- import cycle

@pytest.mark.parametrize("order", [
    ("cubesfh.io.muse",),
    ("cubesfh.io.muse", "cubesfh.cube"),
    ("cubesfh.cube", "cubesfh.io.muse"),
    ("cubesfh.io", "cubesfh.hst", "cubesfh.cube"),
    ("cubesfh.hst", "cubesfh.registration", "cubesfh.io.muse"),
], ids=lambda order: "+".join(m.removeprefix("cubesfh.") for m in order))
def test_modules_import_in_any_order(obs, order):
    code = ("import importlib, sys\n"
            f"for name in {list(order)!r}:\n"
            "    importlib.import_module(name)\n"
            "muse = sys.modules['cubesfh.io.muse']\n"
            f"contents = muse.read_muse({str(obs.cube_path)!r})\n"
            "assert contents.data.shape == (1880, 12, 12)\n"
            "from cubesfh import Cube\n"
            f"cube = Cube.read({str(obs.cube_path)!r})\n"
            "assert cube.shape == (1880, 12, 12), cube.shape\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_muse_reader_does_not_import_cube():
    """cubesfh.io.muse must not depend on cubesfh.cube (cube.py imports it)."""
    code = ("import sys, cubesfh.io.muse\n"
            "assert 'cubesfh.cube' not in sys.modules, 'cubesfh.io.muse imported cubesfh.cube'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    import cubesfh.io.muse as muse

    source = Path(muse.__file__).read_text()
    assert not re.search(r"from \.\.cube import|import cubesfh\.cube|from cubesfh\.cube", source)
