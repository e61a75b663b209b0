# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of cubesfh.maps: the stellar-population maps product, against known answers."""

import hashlib
import warnings
from importlib import metadata

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import QTable
from astropy.wcs import WCS
from helpers import rotated_muse_wcs

from cubesfh.binning import VoronoiBins
from cubesfh.conventions import AGE_BIN_CENTERS, AGE_BIN_EDGES, HST_BANDS, N_AGE_BINS
from cubesfh.flags import BinFlag
from cubesfh.maps import (
    FLAG_NOT_BINNED,
    FLAG_PPXF_FAILED,
    StellarPopulationMaps,
    decode_flags,
    flag_bits,
)
from cubesfh.preprocess import PreparedObservation
from cubesfh.utils import CubeSFHError

UNIT = u.Unit("1e-20 erg / (s cm2 Angstrom)")
KMS = u.km / u.s
NY, NX = 8, 10
N_BINS = 6
MEANS = ("logage_lw", "logage_mw", "zh_lw", "zh_mw")
MEAN_EXT = ("LOGAGE_LW", "LOGAGE_MW", "ZH_LW", "ZH_MW")
FAILED_PPXF_BIN = 3
SIGMA_HIGH_BIN = 2


def make_bin_map():
    """Six rectangular bins with known centroids; three spaxels in no bin."""
    bin_map = np.full((NY, NX), -1)
    bin_map[0:4, 0:5] = 0
    bin_map[0:4, 5:10] = 1
    bin_map[4:8, 0:3] = 2
    bin_map[4:8, 3:6] = 3
    bin_map[4:6, 6:10] = 4
    bin_map[6:8, 6:9] = 5
    bin_map[7, 0] = -1
    return bin_map


def cnn_results():
    """Fake network outputs with a different, known value in every bin."""
    k = np.arange(N_BINS)[:, None]
    j = np.arange(N_AGE_BINS)[None, :]
    weights = 1.0 + j + 3.0 * k
    return {
        "mass_fraction": weights / weights.sum(axis=1, keepdims=True),
        "metallicity": -1.0 + 0.1 * j + 0.01 * k,
        "light_fraction": np.full((N_BINS, N_AGE_BINS), 1.0 / N_AGE_BINS),
        "logage_lw": 8.0 + 0.1 * k[:, 0],
        "logage_mw": 9.0 + 0.1 * k[:, 0],
        "zh_lw": -0.5 + 0.1 * k[:, 0],
        "zh_mw": -0.4 + 0.1 * k[:, 0],
    }


def ppxf_results():
    """Fake baseline table (like fit_populations): bin 3 failed, age bin 0 empty."""
    cnn = cnn_results()
    t = QTable()
    t["mass_fraction"] = cnn["mass_fraction"][:, ::-1].copy()
    zh = cnn["metallicity"] + 0.2
    zh[:, 0] = np.nan
    t["zh"] = zh
    for key, offset in zip(MEANS, (0.3, -0.2, 0.05, -0.1), strict=True):
        t[key] = cnn[key] - offset
    t["flag"] = np.zeros(N_BINS, dtype=np.int32)
    t["flag"][FAILED_PPXF_BIN] = 2  # BaselineFlag.FIT_FAILED
    for key in ("mass_fraction", "zh", *MEANS):
        t[key][FAILED_PPXF_BIN] = np.nan
    t["av"] = np.linspace(0.1, 0.6, N_BINS) * u.mag
    t["chi2"] = np.linspace(1.0, 1.5, N_BINS)
    t.meta.update({"method": "pPXF", "regul": 100.0, "mask_width": 800 * KMS,
                   "bands": ("F275W", "F814W")})
    return t


def make_prepared():
    bin_map = make_bin_map()
    n_spaxels = np.bincount(bin_map[bin_map >= 0])
    bins = VoronoiBins(bin_map, [5000.0, 5001.25] * u.AA, np.ones((N_BINS, 2)) * UNIT,
                       snr=30.0 + np.arange(N_BINS), celestial_wcs=rotated_muse_wcs())
    assert np.array_equal(bins.n_spaxels, n_spaxels)
    kin = QTable()
    kin["bin"] = np.arange(N_BINS)
    kin["velocity"] = (10.0 * np.arange(N_BINS) - 25.0) * KMS
    kin["velocity_los"] = kin["velocity"] + 700 * KMS
    kin["sigma"] = (60.0 + 20.0 * np.arange(N_BINS)) * KMS
    kin["velocity_err"] = np.full(N_BINS, 3.0) * KMS
    kin["sigma_err"] = np.full(N_BINS, 4.0) * KMS
    kin["flag"] = np.zeros(N_BINS, dtype=np.int16)
    spectra = type("Spectra", (), {"norm": (1.0 + np.arange(N_BINS)) * UNIT})()
    phot = 1.0 + 0.1 * np.arange(N_BINS)[:, None] + 0.01 * np.arange(5)[None, :]
    flags = np.zeros(N_BINS, dtype=np.int32)
    flags[SIGMA_HIGH_BIN] = BinFlag.SIGMA_TOO_HIGH
    meta = {"date": "2026-01-01T00:00:00", "cube": "NGC0000_DATACUBE.fits",
            "cube_sha": "0123456789abcdef", "target_snr": 35.0, "min_snr": 1.0,
            "kinematics": "ppxf", "bands": ("F275W", "F814W"), "n_bins": N_BINS}
    return PreparedObservation(bins=bins, kinematics=kin, spectra=spectra, photometry=None,
                               photometry_normalized=phot, flags=flags, meta=meta)


PROVENANCE = {
    "model_id": "abcdef012345",
    "model_sha256": "ab" * 32,
    "inputs": {"F555W.fits": "cd" * 32},
    "parameters": {"batch_size": 4096},
    "date": "2026-02-03T04:05:06",
}


@pytest.fixture
def prepared():
    return make_prepared()


@pytest.fixture
def maps(prepared):
    return StellarPopulationMaps.from_results(prepared, cnn_results(), provenance=PROVENANCE)


@pytest.fixture
def maps_ppxf(prepared):
    return StellarPopulationMaps.from_results(prepared, cnn_results(), ppxf_results(),
                                              provenance=PROVENANCE)


def values(column):
    return np.asarray(getattr(column, "value", column))


def assert_same_sky(wcs, reference):
    """The two celestial WCS give the same sky position for a set of pixels."""
    x = np.array([0.0, NX - 1.0, 3.3, 0.0, NX - 1.0])
    y = np.array([0.0, 0.0, 2.7, NY - 1.0, NY - 1.0])
    a = wcs.pixel_to_world(x, y)
    b = reference.pixel_to_world(x, y)
    np.testing.assert_array_less(a.separation(b).to_value(u.arcsec), 1e-6)


# ----------------------------------------------------------------------------- known answers


def test_maps_place_each_bin_value_on_its_spaxels(maps):
    bin_map = make_bin_map()
    cnn = cnn_results()
    outside = bin_map < 0
    assert maps.n_bins == N_BINS and maps.shape == (NY, NX)
    np.testing.assert_array_equal(maps["BIN_ID"], bin_map)
    for ext, key in zip(MEAN_EXT, MEANS, strict=True):
        image = maps[ext]
        assert image.shape == (NY, NX)
        assert np.all(np.isnan(image.value[outside]))
        for k in range(N_BINS):
            np.testing.assert_allclose(image.value[bin_map == k], cnn[key][k], rtol=0,
                                       atol=1e-12)
    assert maps["LOGAGE_LW"].unit == u.dex(u.yr)
    assert maps["ZH_MW"].unit == u.dex
    # bin 4 covers rows 4-5, columns 6-9
    assert maps["LOGAGE_MW"][5, 7].value == pytest.approx(9.4)
    sfh, zh_age = maps["SFH"], maps["ZH_AGE"]
    assert sfh.shape == zh_age.shape == (N_AGE_BINS, NY, NX)
    np.testing.assert_allclose(sfh.value[:, 5, 7], cnn["mass_fraction"][4])
    np.testing.assert_allclose(zh_age.value[:, 0, 0], cnn["metallicity"][0])
    np.testing.assert_allclose(np.nansum(sfh.value, axis=0)[~outside], 1.0)
    assert np.all(np.isnan(sfh.value[:, outside]))
    # data maps
    np.testing.assert_allclose(maps["SNR"].value[bin_map == 5], 35.0)
    assert maps["V_STARS"].unit == KMS
    assert maps["V_STARS"][0, 9].value == pytest.approx(-15.0)  # bin 1
    assert maps["SIGMA_STARS"][7, 8].value == pytest.approx(160.0)  # bin 5
    assert np.isnan(maps["SIGMA_STARS"][7, 0].value)
    with pytest.raises(KeyError, match="PPXF_LOGAGE_LW"):
        maps["PPXF_LOGAGE_LW"]


def test_bins_table(maps, prepared):
    t = maps.table
    assert len(t) == N_BINS
    np.testing.assert_array_equal(t["bin"], np.arange(N_BINS))
    # centroids of the rectangles (bin 2 lost its corner spaxel (7, 0))
    assert (t["x"][0], t["y"][0]) == (2.0, 1.5)
    assert (t["x"][1], t["y"][1]) == (7.0, 1.5)
    assert t["x"][2] == pytest.approx((0 + 1 + 2) * 4 / 11 - 0 / 11)
    assert t["y"][2] == pytest.approx((4 * 3 + 5 * 3 + 6 * 3 + 7 * 2) / 11)
    np.testing.assert_array_equal(t["n_spaxels"], [20, 20, 11, 12, 8, 6])
    sky = rotated_muse_wcs().pixel_to_world(t["x"], t["y"])
    np.testing.assert_allclose(t["ra"].to_value(u.deg), sky.ra.deg, rtol=0, atol=1e-12)
    np.testing.assert_allclose(t["dec"].to_value(u.deg), sky.dec.deg, rtol=0, atol=1e-12)
    np.testing.assert_allclose(t["snr"], 30.0 + np.arange(N_BINS))
    assert t["velocity_los"].unit == KMS
    np.testing.assert_allclose(t["velocity_los"].value, 10.0 * np.arange(N_BINS) + 675.0)
    np.testing.assert_allclose(t["sigma_err"].value, 4.0)
    assert t["norm"].unit == UNIT
    np.testing.assert_allclose(t["norm"].value, 1.0 + np.arange(N_BINS))
    for j, band in enumerate(HST_BANDS):
        np.testing.assert_allclose(t[f"phot_{band}"], prepared.photometry_normalized[:, j])
    cnn = cnn_results()
    for key in MEANS:
        np.testing.assert_allclose(values(t[f"cnn_{key}"]), cnn[key])
    assert t["cnn_mass_fraction"].shape == t["cnn_zh"].shape == (N_BINS, N_AGE_BINS)
    np.testing.assert_allclose(values(t["cnn_zh"]), cnn["metallicity"])
    np.testing.assert_allclose(values(t["cnn_light_fraction"]), cnn["light_fraction"])
    assert not any(name.startswith("ppxf_") for name in t.colnames)


def test_flag_bits(maps_ppxf, tmp_path):
    # no bit is used twice and the maps bits stay clear of BinFlag
    values_ = [b[1] for b in flag_bits()]
    assert len(set(values_)) == len(values_)
    assert all(int(f) < FLAG_NOT_BINNED for f in BinFlag)
    assert FLAG_NOT_BINNED == 1 << 16 and FLAG_PPXF_FAILED == 1 << 17

    flag = maps_ppxf["FLAG"]
    bin_map = make_bin_map()
    assert flag.dtype == np.int32
    np.testing.assert_array_equal(flag[bin_map < 0], FLAG_NOT_BINNED)
    np.testing.assert_array_equal(flag[bin_map == SIGMA_HIGH_BIN], BinFlag.SIGMA_TOO_HIGH)
    np.testing.assert_array_equal(flag[bin_map == FAILED_PPXF_BIN], FLAG_PPXF_FAILED)
    np.testing.assert_array_equal(flag[(bin_map == 0) | (bin_map == 5)], 0)
    assert decode_flags(flag[7, 0]) == ["NOT_BINNED"]
    assert decode_flags(int(BinFlag.SIGMA_TOO_HIGH) | FLAG_PPXF_FAILED) == [
        "SIGMA_TOO_HIGH", "PPXF_FAILED"]
    assert decode_flags(0) == []
    assert maps_ppxf.table["ppxf_flag"][FAILED_PPXF_BIN] == 2
    # a dict with a 'failed' column instead of BaselineFlag values
    ppxf = {k: np.array(ppxf_results()[k]) for k in ("mass_fraction", "zh", *MEANS)}
    ppxf["failed"] = np.arange(N_BINS) == 4
    ppxf["logage_lw"][1] = np.nan  # non-finite means count as a failure too
    other = StellarPopulationMaps.from_results(make_prepared(), cnn_results(), ppxf)
    failed = (np.asarray(other.table["flag"]) & FLAG_PPXF_FAILED) > 0
    np.testing.assert_array_equal(np.nonzero(failed)[0], [1, FAILED_PPXF_BIN, 4])
    assert "ppxf_flag" not in other.table.colnames

    path = maps_ppxf.write(tmp_path / "maps.fits")
    header = fits.getheader(path, "FLAG")
    assert header["FLAGB00"] == "SIGMA_TOO_HIGH"
    assert header["FLAGB06"] == "NO_PHOTOMETRY"
    assert header["FLAGB16"] == "NOT_BINNED"
    assert header["FLAGB17"] == "PPXF_FAILED"
    assert header["BUNIT"] == ""
    np.testing.assert_array_equal(fits.getdata(path, "FLAG"), flag)


# ----------------------------------------------------------------------------- file


def test_round_trip(maps_ppxf, tmp_path):
    path = maps_ppxf.write(tmp_path / "maps.fits")
    back = StellarPopulationMaps.read(path)
    assert back.bin_map.dtype == np.int32
    np.testing.assert_array_equal(back.bin_map, maps_ppxf.bin_map)
    assert back.table.colnames == maps_ppxf.table.colnames
    for name in maps_ppxf.table.colnames:
        a, b = maps_ppxf.table[name], back.table[name]
        assert getattr(a, "unit", None) == getattr(b, "unit", None), name
        assert values(a).dtype == values(b).dtype, name
        np.testing.assert_array_equal(values(a), values(b), err_msg=name)
    assert back.meta == maps_ppxf.meta
    assert back.meta["model_id"] == "abcdef012345"
    assert back.extension_names == maps_ppxf.extension_names
    assert_same_sky(back.wcs, rotated_muse_wcs())
    for name in back.extension_names:
        a, b = maps_ppxf[name], back[name]
        assert getattr(a, "unit", None) == getattr(b, "unit", None)
        np.testing.assert_array_equal(values(a), values(b), err_msg=name)
    # the images in the file are the maps (float32) and the registry format works
    with fits.open(path) as hdul:
        hdul.verify("exception")
        for name in maps_ppxf.extension_names:
            expected = values(maps_ppxf[name])
            data = hdul[name].data
            if name not in ("BIN_ID", "FLAG"):
                assert data.dtype == np.dtype(">f4")
                expected = expected.astype(np.float32)
            np.testing.assert_array_equal(data, expected, err_msg=name)
        # log quantities are plain numbers in FITS (no 'dex' BUNIT, which no FITS
        # reader parses); the comment says what they are
        assert hdul["LOGAGE_MW"].header["BUNIT"] == ""
        assert hdul["LOGAGE_MW"].header.comments["BUNIT"] == "values are log10(yr)"
        assert u.Unit(hdul["V_STARS"].header["BUNIT"], format="fits") == KMS
        assert hdul["ZH_LW"].header["BUNIT"] == ""
        assert hdul["ZH_LW"].header.comments["BUNIT"] == "values are dex"
    again = StellarPopulationMaps.read(path, format="cubesfh-maps")
    np.testing.assert_array_equal(again["SFH"].value, maps_ppxf["SFH"].value)
    # a second write to the same file needs overwrite=True
    with pytest.raises(OSError, match="overwrite=True"):
        back.write(path)
    back.write(path, overwrite=True)


def test_every_image_has_the_cube_celestial_wcs(maps_ppxf, tmp_path):
    path = maps_ppxf.write(tmp_path / "maps.fits")
    reference = rotated_muse_wcs()
    n_images = 0
    with fits.open(path) as hdul:
        for hdu in hdul[1:]:
            if not isinstance(hdu, fits.ImageHDU):
                continue
            n_images += 1
            header = hdu.header
            assert header["EXTNAME"] == hdu.name and "BUNIT" in header
            wcs = WCS(header)
            assert wcs.has_celestial
            assert_same_sky(wcs.celestial, reference)
            if hdu.data.ndim == 3:
                assert hdu.name in ("SFH", "ZH_AGE", "PPXF_SFH", "PPXF_ZH_AGE")
                assert hdu.data.shape == (N_AGE_BINS, NY, NX)
                assert wcs.naxis == 3 and wcs.wcs.ctype[2] == "AGEBIN"
                # plane k of the cube is age bin k: world coordinate = index
                world = wcs.pixel_to_world_values(np.zeros(N_AGE_BINS), np.zeros(N_AGE_BINS),
                                                  np.arange(N_AGE_BINS))
                np.testing.assert_allclose(world[2], np.arange(N_AGE_BINS))
                assert header["AGEC15"] == pytest.approx(14.2)
            else:
                assert hdu.data.shape == (NY, NX) and wcs.naxis == 2
    assert n_images == len(maps_ppxf.extension_names) == 11 + 6 + 4


def test_agebins_table_matches_conventions(maps, tmp_path):
    path = maps.write(tmp_path / "maps.fits")
    t = QTable.read(path, hdu="AGEBINS")  # no UnitsWarning (warnings are errors here)
    np.testing.assert_array_equal(t["index"], np.arange(N_AGE_BINS))
    assert t["age"].unit == u.Gyr
    np.testing.assert_allclose(t["age"], AGE_BIN_CENTERS)
    np.testing.assert_allclose(t["age_lower"], AGE_BIN_EDGES[:-1])
    np.testing.assert_allclose(t["age_upper"], AGE_BIN_EDGES[1:])
    np.testing.assert_allclose(values(t["logage"]), np.log10(AGE_BIN_CENTERS.to_value(u.yr)))
    header = fits.getheader(path, "AGEBINS")
    assert "TUNIT5" not in header and header["TCOMM5"] == "log10(centre / yr)"


def test_bins_table_reads_without_unit_warnings_and_round_trips_dex(maps_ppxf, tmp_path):
    """Issue 20: Table.read(maps, hdu='BINS') gave ~25 UnitsWarnings ('dex(yr)', 'dex')."""
    import warnings

    from astropy.table import Table

    path = maps_ppxf.write(tmp_path / "maps.fits")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = Table.read(path, hdu="BINS")
    assert t["cnn_logage_lw"].unit is None and t["cnn_zh_mw"].unit is None
    header = fits.getheader(path, "BINS")
    i = t.colnames.index("cnn_logage_lw") + 1
    assert header[f"TLOGU{i}"] == "dex(yr)" and header[f"TCOMM{i}"].endswith("[log10(yr)]")
    j = t.colnames.index("cnn_zh_mw") + 1
    assert header[f"TLOGU{j}"] == "dex" and header[f"TCOMM{j}"].endswith("[dex]")
    back = StellarPopulationMaps.read(path)
    assert back.table["cnn_logage_lw"].unit == u.dex(u.yr)
    assert back.table["cnn_zh_mw"].unit == u.dex
    assert back.table["ppxf_zh_lw"].unit == u.dex
    np.testing.assert_array_equal(values(back.table["cnn_logage_lw"]),
                                  values(maps_ppxf.table["cnn_logage_lw"]))


def test_primary_provenance(maps_ppxf, tmp_path):
    path = maps_ppxf.write(tmp_path / "maps.fits")
    h = fits.getheader(path, 0)
    assert h["ORIGIN"] == "cubesfh" and h["PRODTYPE"] == "STELLAR_POPULATION_MAPS"
    assert h["APY_VER"] == metadata.version("astropy")
    assert h["NPY_VER"] == metadata.version("numpy")
    for key in ("CSFH_VER", "PHOT_VER", "REPR_VER", "VORB_VER", "PPXF_VER", "TRCH_VER"):
        assert h[key]
    assert h["MODEL_ID"] == "abcdef012345" and h["MODELSHA"] == "ab" * 32
    assert h["DATE"] == "2026-02-03T04:05:06"
    inputs = {h[f"INFILE{i}"]: h[f"INSHA{i}"] for i in (1, 2)}
    assert inputs == {"NGC0000_DATACUBE.fits": "0123456789abcdef", "F555W.fits": "cd" * 32}
    assert h["CSFH PAR PREPROCESS TARGET_SNR"] == 35.0
    assert h["CSFH PAR PREPROCESS BANDS"] == '["F275W", "F814W"]'
    assert h["CSFH PAR BATCH_SIZE"] == 4096
    assert h["CSFH PAR PPXF REGUL"] == 100.0
    assert h["CSFH PAR PPXF MASK_WIDTH"] == "800.0 km / s"
    assert h["HASPPXF"] is True and h["NBINS"] == N_BINS
    assert maps_ppxf.meta["parameters"]["preprocess"]["n_bins"] == N_BINS
    assert "SFH" in str(h["COMMENT"])


def test_ppxf_and_difference_extensions(maps, maps_ppxf, tmp_path):
    plain = maps.write(tmp_path / "cnn.fits")
    with fits.open(plain) as hdul:
        names = [hdu.name for hdu in hdul]
    assert not any(n.startswith(("PPXF_", "DIFF_")) for n in names)
    assert names == ["PRIMARY", *maps.extension_names, "AGEBINS", "BINS"]
    assert not maps.has_ppxf and maps_ppxf.has_ppxf

    both = maps_ppxf.write(tmp_path / "both.fits")
    with fits.open(both) as hdul:
        names = [hdu.name for hdu in hdul]
        for ext in MEAN_EXT:
            cnn_map = hdul[ext].data.astype(float)
            ppxf_map = hdul["PPXF_" + ext].data.astype(float)
            diff = hdul["DIFF_" + ext].data
            np.testing.assert_allclose(diff, cnn_map - ppxf_map, atol=1e-6)
            assert hdul["DIFF_" + ext].header["METHOD"] == "CNN-PPXF"
            assert hdul["DIFF_" + ext].header["BUNIT"] == ""  # dex: a plain number
            assert hdul["DIFF_" + ext].header.comments["BUNIT"] == "values are dex"
    for ext in ("PPXF_SFH", "PPXF_ZH_AGE", *(f"{p}{e}" for p in ("PPXF_", "DIFF_")
                                            for e in MEAN_EXT)):
        assert ext in names
    bin_map = make_bin_map()
    cnn = cnn_results()
    for key, ext, offset in zip(MEANS, MEAN_EXT, (0.3, -0.2, 0.05, -0.1), strict=True):
        d = maps_ppxf["DIFF_" + ext]
        assert d.unit == u.dex
        good = (bin_map >= 0) & (bin_map != FAILED_PPXF_BIN)
        np.testing.assert_allclose(d.value[good], offset, atol=1e-12)
        assert np.all(np.isnan(d.value[~good]))
        np.testing.assert_allclose(maps_ppxf["PPXF_" + ext].value[bin_map == 1],
                                   cnn[key][1] - offset)
    zh = maps_ppxf["PPXF_ZH_AGE"].value
    assert np.all(np.isnan(zh[0]))  # the empty age bin
    np.testing.assert_allclose(zh[5][bin_map == 0], cnn["metallicity"][0, 5] + 0.2)
    np.testing.assert_allclose(maps_ppxf["PPXF_SFH"].value[:, 0, 0],
                               cnn["mass_fraction"][0, ::-1])
    assert maps_ppxf.table["ppxf_av"].unit == u.mag


def _fail_half_way(self, fileobj, *args, **kwargs):
    with open(fileobj, "wb") as f:
        f.write(b"SIMPLE  =                    T" + b" " * 1000)
    msg = "disk full"
    raise OSError(msg)


def test_atomic_write(maps, tmp_path, monkeypatch):
    target = tmp_path / "maps.fits"
    monkeypatch.setattr(fits.HDUList, "writeto", _fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        maps.write(target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
    monkeypatch.undo()

    maps.write(target)
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    monkeypatch.setattr(fits.HDUList, "writeto", _fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        maps.write(target, overwrite=True)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before
    assert list(tmp_path.iterdir()) == [target]
    monkeypatch.undo()
    StellarPopulationMaps.read(target)  # the old product is intact


# ----------------------------------------------------------------------------- figure


@pytest.mark.parametrize("with_ppxf", [False, True])
def test_plot(prepared, tmp_path, with_ppxf):
    from astropy.visualization.wcsaxes import WCSAxes

    maps = StellarPopulationMaps.from_results(prepared, cnn_results(),
                                              ppxf_results() if with_ppxf else None)
    path = tmp_path / "maps.png"
    fig = maps.plot(path)
    panels = [ax for ax in fig.axes if isinstance(ax, WCSAxes)]
    # + the SFH in three age ranges (no fit check in these results)
    assert len(panels) == (16 if with_ppxf else 8) + 3
    assert all(ax.images for ax in panels)
    titles = [ax.get_title() for ax in panels]
    assert titles[0] == "CNN: log age (LW)"
    if with_ppxf:
        assert titles[4] == "pPXF: log age (LW)" and titles[8] == "CNN - pPXF: log age (LW)"
        # CNN and pPXF share the colour scale of each quantity
        assert panels[0].images[0].get_clim() == panels[4].images[0].get_clim()
    np.testing.assert_array_equal(panels[0].images[0].get_array().filled(np.nan),
                                  maps["LOGAGE_LW"].value)
    assert len(fig.axes) == 2 * len(panels)  # one colour bar per panel
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OSError, match="overwrite"):
        maps.plot(path)


# ----------------------------------------------------------------------------- direct use, errors


def test_direct_construction_and_summary(maps_ppxf):
    t = QTable()
    for key in MEANS:
        t[f"cnn_{key}"] = np.array([1.0, 2.0])
    t["cnn_mass_fraction"] = np.full((2, N_AGE_BINS), 1 / N_AGE_BINS)
    t["cnn_zh"] = np.zeros((2, N_AGE_BINS))
    bin_map = np.array([[0, 0, 1], [-1, 1, 1]])
    small = StellarPopulationMaps(bin_map, t, wcs=rotated_muse_wcs())
    assert small.table["cnn_logage_lw"].unit == u.dex(u.yr)
    np.testing.assert_array_equal(small.table["n_spaxels"], [2, 3])
    np.testing.assert_array_equal(small.table["flag"], [0, 0])
    assert small.table["x"][1] == pytest.approx(5 / 3)
    np.testing.assert_array_equal(small["ZH_MW"].value, [[1, 1, 2], [np.nan, 2, 2]])
    assert small.meta["versions"]["astropy"] == metadata.version("astropy")
    assert "2 bins" in repr(small)

    text = maps_ppxf.summary()
    assert "6 bins on a 8x10 grid" in text and "abcdef012345" in text
    assert "SIGMA_TOO_HIGH: 1 bins" in text and "PPXF_FAILED: 1 bins" in text
    # median over bins of the LW age difference: exactly the offset 0.3
    line = next(s for s in text.splitlines() if "logage_lw" in s and "CNN-pPXF" in s)
    assert "0.300" in line


def test_errors(prepared, tmp_path):
    cnn = cnn_results()
    bad = dict(cnn, logage_lw=cnn["logage_lw"][:-1])
    with pytest.raises(CubeSFHError, match=r"logage_lw.*one row per bin"):
        StellarPopulationMaps.from_results(prepared, bad)
    missing = {k: v for k, v in cnn.items() if k != "metallicity"}
    with pytest.raises(CubeSFHError, match="metallicity"):
        StellarPopulationMaps.from_results(prepared, missing)
    maps = StellarPopulationMaps.from_results(prepared, cnn)
    with pytest.raises(CubeSFHError, match="one row per bin"):
        StellarPopulationMaps(make_bin_map(), maps.table[:3], wcs=rotated_muse_wcs())
    with pytest.raises(CubeSFHError, match="no bins"):
        StellarPopulationMaps(np.full((2, 2), -1), maps.table, wcs=rotated_muse_wcs())
    with pytest.raises(CubeSFHError, match="celestial"):
        StellarPopulationMaps(make_bin_map(), maps.table, wcs=None)
    t = maps.table.copy()
    t["ppxf_logage_lw"] = t["cnn_logage_lw"]
    with pytest.raises(CubeSFHError, match="pPXF columns"):
        StellarPopulationMaps(make_bin_map(), t, wcs=rotated_muse_wcs())
    with pytest.raises(KeyError, match="LOGAGE_LW"):
        maps["AGE"]
    other = tmp_path / "other.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((2, 2)), name="SCI")]).writeto(other)
    with pytest.raises(CubeSFHError, match="not a cubesfh stellar-population maps"):
        StellarPopulationMaps.read(other)
    with pytest.raises(FileNotFoundError, match="not found"):
        StellarPopulationMaps.read(tmp_path / "missing.fits")


# ----------------------------------------------------------------------------- real bins


@pytest.fixture(scope="module")
def example_bins(tmp_path_factory):
    from cubesfh import Cube
    from cubesfh.binning import voronoi_bin
    from cubesfh.datasets import make_example_observation

    obs = make_example_observation(tmp_path_factory.mktemp("example"), shape=(12, 12))
    cube = Cube.read(obs.cube_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bins = voronoi_bin(cube, target_snr=60, progress_bar=False)
    return cube, bins


def test_from_binned_example_cube(example_bins, tmp_path):
    cube, bins = example_bins
    n = bins.n_bins
    kin = QTable({"velocity": np.zeros(n) * KMS, "sigma": np.full(n, 80.0) * KMS})
    prepared = PreparedObservation(
        bins=bins, kinematics=kin,
        spectra=type("Spectra", (), {"norm": np.ones(n) * cube.unit})(), photometry=None,
        photometry_normalized=None, flags=np.zeros(n, dtype=np.int32), meta={})
    k = np.arange(n, dtype=float)
    cnn = {"mass_fraction": np.full((n, N_AGE_BINS), 1 / N_AGE_BINS),
           "metallicity": np.zeros((n, N_AGE_BINS)), "logage_lw": 8 + k / n,
           "logage_mw": 9 + k / n, "zh_lw": -k / n, "zh_mw": k / n}
    maps = StellarPopulationMaps.from_results(prepared, cnn)
    # every spaxel shows its own bin's value
    inside = bins.bin_map >= 0
    np.testing.assert_allclose(maps["LOGAGE_LW"].value[inside], 8 + bins.bin_map[inside] / n)
    assert np.all(np.isnan(maps["LOGAGE_LW"].value[~inside]))
    path = maps.write(tmp_path / "example_maps.fits")
    reference = cube.celestial_wcs
    ny, nx = cube.spatial_shape
    x, y = np.meshgrid([0, nx - 1, 5], [0, ny - 1, 7])
    with fits.open(path) as hdul:
        for name in ("BIN_ID", "LOGAGE_LW", "SFH"):
            wcs = WCS(hdul[name].header).celestial
            a = wcs.pixel_to_world(x.ravel(), y.ravel())
            b = reference.pixel_to_world(x.ravel(), y.ravel())
            assert np.all(a.separation(b).to_value(u.arcsec) < 1e-6)
    back = StellarPopulationMaps.read(path)
    np.testing.assert_array_equal(back.bin_map, bins.bin_map)
    np.testing.assert_allclose(back.table["ra"].to_value(u.deg),
                               reference.pixel_to_world(bins.x, bins.y).ra.deg)
