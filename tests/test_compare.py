# Licensed under a 3-clause BSD style license - see LICENSE
"""
Comparison with another pipeline (``cubesfh.compare``, ``cubesfh compare``).

The other pipeline's files are written here in the layouts of a PHANGS DAP
``MAPS`` file, nGIST (``<RUN>_sfh.fits`` + ``<RUN>_table.fits``) and another
cubesfh product, with known offsets that the comparison must recover.
"""

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import QTable, Table
from astropy.wcs import WCS
from helpers import check_error

from cubesfh import CubeSFHError
from cubesfh.cli import main as cli_main
from cubesfh.compare import compare_maps, parse_quantity, read_other, robust_scatter
from cubesfh.flags import BinFlag
from cubesfh.maps import StellarPopulationMaps

N = 12  # spaxels on a side, 0.2 arcsec each
CRVAL = (150.0, 2.0)
NAN_BIN = 0  # bin (0, 0): no CNN LW age
FLAGGED_BIN = N + 1  # bin (1, 1): OUT_OF_DISTRIBUTION


def our_wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = CRVAL
    w.wcs.crpix = [(N + 1) / 2, (N + 1) / 2]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def fields(x, y):
    """The true LW/MW log ages and [Z/H] at (fractional) pixel (x, y) of our grid."""
    return {"logage_lw": 9.0 + 0.02 * x + 0.03 * y, "logage_mw": 9.5 + 0.01 * x - 0.02 * y,
            "zh_lw": -0.2 + 0.01 * x + 0.005 * y, "zh_mw": 0.05 - 0.01 * x + 0.01 * y}


def make_maps(bin_map, values):
    n = int(bin_map.max()) + 1
    t = QTable()
    t["cnn_logage_lw"] = values["logage_lw"] * u.dex(u.yr)
    t["cnn_logage_mw"] = values["logage_mw"] * u.dex(u.yr)
    t["cnn_zh_lw"] = values["zh_lw"] * u.dex
    t["cnn_zh_mw"] = values["zh_mw"] * u.dex
    t["cnn_mass_fraction"] = np.full((n, 16), 1 / 16)
    t["cnn_zh"] = np.zeros((n, 16)) * u.dex
    flag = np.zeros(n, np.int32)
    if n > FLAGGED_BIN:
        flag[FLAGGED_BIN] = int(BinFlag.OUT_OF_DISTRIBUTION)
    t["flag"] = flag
    return StellarPopulationMaps(bin_map, t, wcs=our_wcs())


@pytest.fixture(scope="module")
def pixel_maps():
    """One spaxel per bin; linear fields; one bin without LW age, one flagged."""
    yy, xx = np.mgrid[:N, :N]
    values = {k: v.ravel() for k, v in fields(xx, yy).items()}
    values["logage_lw"] = values["logage_lw"].copy()
    values["logage_lw"][NAN_BIN] = np.nan
    return make_maps(np.arange(N * N).reshape(N, N), values)


@pytest.fixture(scope="module")
def block_maps():
    """2x2-spaxel bins (36), one value per bin (the fields at the bin centre)."""
    yy, xx = np.mgrid[:N, :N]
    bin_map = (yy // 2) * (N // 2) + xx // 2
    by, bx = np.mgrid[: N // 2, : N // 2]
    values = {k: v.ravel() for k, v in fields(2 * bx + 0.5, 2 * by + 0.5).items()}
    return make_maps(bin_map, values)


def rotated_wcs(shape, scale, angle, crval=CRVAL):
    """A TAN WCS about the same tangent point: its pixels map affinely onto ours."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = crval
    w.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    s, t = scale / 3600, np.radians(angle)
    w.wcs.cd = [[-s * np.cos(t), s * np.sin(t)], [s * np.sin(t), s * np.cos(t)]]
    return w


def at_our_pixels(wcs, shape):
    """The fields at the centres of the pixels of another grid."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    x, y = our_wcs().world_to_pixel_values(*wcs.pixel_to_world_values(xx, yy))
    return fields(x, y)


def image(data, wcs, name, bunit=None):
    header = wcs.to_header()
    if bunit is not None:
        header["BUNIT"] = bunit
    return fits.ImageHDU(np.asarray(data, float), header=header, name=name)


@pytest.fixture(scope="module")
def phangs_file(tmp_path_factory):
    """
    A PHANGS DAP MAPS-like file on a coarser, rotated grid that covers ours:
    AGE_LW in Gyr (BUNIT), AGE_MW in log yr (no BUNIT), Z_LW as a mass fraction
    (no BUNIT), Z_MW in dex (BUNIT), with known offsets.
    """
    shape = (20, 20)
    wcs = rotated_wcs(shape, 0.3, 25.0)
    f = at_our_pixels(wcs, shape)
    hdus = [fits.PrimaryHDU(),
            image(np.ones(shape), wcs, "FLUX", "1e-20 erg / (s cm2 Angstrom)"),
            image(np.full(shape, 30.0), wcs, "SNR"),
            image(np.zeros(shape), wcs, "V_STARS", "km/s"),
            image(np.full(shape, 80.0), wcs, "SIGMA_STARS", "km/s"),
            image(10 ** (f["logage_lw"] - 0.2 - 9.0), wcs, "AGE_LW", "Gyr"),
            image(f["logage_mw"] + 0.15, wcs, "AGE_MW"),
            image(0.02 * 10 ** (f["zh_lw"] - 0.1), wcs, "Z_LW"),
            image(f["zh_mw"] + 0.05, wcs, "Z_MW", "dex")]
    path = tmp_path_factory.mktemp("phangs") / "NGC0000_MAPS.fits"
    fits.HDUList(hdus).writeto(path)
    return path


PHANGS_QUANTITIES = ["LOGAGE_LW=AGE_LW", "LOGAGE_MW=AGE_MW:logyr", "ZH_LW=Z_LW:Z",
                     "ZH_MW=Z_MW"]


def rows(summary):
    return {r["quantity"]: r for r in summary}


def test_phangs_maps_are_reprojected_converted_and_offsets_recovered(pixel_maps, phangs_file):
    summary, per_bin = compare_maps(pixel_maps, phangs_file, quantities=PHANGS_QUANTITIES,
                                    return_bins=True)
    r = rows(summary)
    assert summary.meta["layout"] == "phangs-dap"
    for q, offset in (("LOGAGE_LW", 0.2), ("LOGAGE_MW", -0.15), ("ZH_LW", 0.1),
                      ("ZH_MW", -0.05)):
        assert r[q]["median_offset"] == pytest.approx(offset, abs=1e-6), q
        assert r[q]["robust_scatter"] < 1e-6, q
        assert r[q]["unit"] == "dex"
        assert r[q]["placement"] == "reprojected (bilinear)"
    # every bin is covered: all but the flagged one, and the LW age of NAN_BIN
    assert r["LOGAGE_LW"]["n"] == N * N - 2
    assert r["ZH_MW"]["n"] == N * N - 1
    assert r["LOGAGE_LW"]["conversion"] == "Gyr -> log10(age/yr)"
    assert r["ZH_LW"]["conversion"] == "Z -> log10(Z/0.02)"
    assert not per_bin["logage_lw_used"][FLAGGED_BIN]
    # the flagged bin comes back with exclude=0
    again = rows(compare_maps(pixel_maps, phangs_file, quantities=PHANGS_QUANTITIES,
                              exclude=0))
    assert again["ZH_MW"]["n"] == N * N
    # another solar metallicity moves the Z conversion, and only it
    shifted = rows(compare_maps(pixel_maps, phangs_file, quantities=PHANGS_QUANTITIES,
                                z_sun=0.0142))
    assert shifted["ZH_LW"]["median_offset"] == pytest.approx(0.1 + np.log10(0.0142 / 0.02),
                                                              abs=1e-6)
    assert shifted["ZH_MW"]["median_offset"] == pytest.approx(-0.05, abs=1e-6)


def test_phangs_age_without_bunit_needs_a_unit(pixel_maps, phangs_file):
    other = read_other(phangs_file)
    assert other.layout == "phangs-dap"
    assert other.defaults[:2] == (("LOGAGE_LW", "AGE_LW"), ("LOGAGE_MW", "AGE_MW"))
    with pytest.raises(CubeSFHError) as exc:
        compare_maps(pixel_maps, other)  # the defaults: AGE_MW has no BUNIT
    check_error(exc, CubeSFHError, [r"AGE_MW of NGC0000_MAPS\.fits has no unit",
                                    r"LOGAGE_MW=AGE_MW:Gyr", r"LOGAGE_MW=AGE_MW:logyr"])
    with pytest.raises(CubeSFHError) as exc:
        compare_maps(pixel_maps, other, quantities=["ZH_LW=Z_LW"])
    check_error(exc, CubeSFHError, [r"ZH_LW=Z_LW:Z", r"ZH_LW=Z_LW:dex"])


@pytest.mark.parametrize("quantity, patterns", [
    ("LOGAGE_LW=AGE_XX:Gyr", [r"has no 'AGE_XX'", r"AGE_LW, AGE_MW"]),
    ("LOGAGE_LW=AGE_LW:bananas", [r"unit 'bananas'.*not understood", r"logyr"]),
    ("LOGAGE_LW=SIGMA_STARS", [r"is in km / s, not an age", r"LOGAGE_LW=SIGMA_STARS:Gyr"]),
    ("AGE_LW", [r"no 2-D map 'AGE_LW'", r"LOGAGE_LW"]),
    ("=AGE_LW", [r"OURS=THEIRS\[:UNIT\]"]),
])
def test_bad_quantities(pixel_maps, phangs_file, quantity, patterns):
    with pytest.raises(CubeSFHError) as exc:
        compare_maps(pixel_maps, phangs_file, quantities=[quantity])
    check_error(exc, CubeSFHError, patterns)


def test_parse_quantity():
    assert parse_quantity("logage_lw=age:logGyr") == ("LOGAGE_LW", "AGE", u.dex(u.Gyr))
    assert parse_quantity("ZH_MW=Z_MW:Zsun") == ("ZH_MW", "Z_MW", "Zsun")
    assert parse_quantity("ZH_MW") == ("ZH_MW", "ZH_MW", None)
    assert parse_quantity("V_STARS=V:km/s")[2] == u.km / u.s


def test_robust_scatter():
    assert robust_scatter([1.0, 2.0, 3.0, 4.0, 100.0]) == pytest.approx(1.4826)
    rng = np.random.default_rng(1)
    assert robust_scatter(rng.normal(0, 0.3, 20000)) == pytest.approx(0.3, rel=0.03)
    assert np.isnan(robust_scatter([np.nan]))


def shifted_images(tmp_path, dx_pixels, crval=CRVAL):
    """A plain image file on our pixel size, shifted by dx_pixels columns."""
    w = our_wcs()
    w.wcs.crpix = [w.wcs.crpix[0] - dx_pixels, w.wcs.crpix[1]]
    w.wcs.crval = crval
    f = at_our_pixels(w, (N, N))
    path = tmp_path / f"images_{dx_pixels}_{crval[0]}.fits"
    fits.HDUList([fits.PrimaryHDU(), image(f["zh_mw"] - 0.25, w, "METALLICITY")]).writeto(path)
    return path


def test_partial_overlap_counts_only_the_covered_bins(pixel_maps, tmp_path):
    path = shifted_images(tmp_path, 6)  # covers our columns 6-11
    summary = compare_maps(pixel_maps, path, quantities=["ZH_MW=METALLICITY:dex"])
    assert summary.meta["layout"] == "images"
    assert summary["n"][0] == N * 6
    assert summary["median_offset"][0] == pytest.approx(0.25, abs=1e-6)
    assert summary["robust_scatter"][0] < 1e-6


def test_no_overlap_is_an_error(pixel_maps, tmp_path):
    path = shifted_images(tmp_path, 0, crval=(CRVAL[0] + 0.5, CRVAL[1]))
    with pytest.raises(CubeSFHError) as exc:
        compare_maps(pixel_maps, path, quantities=["ZH_MW=METALLICITY:dex"])
    check_error(exc, CubeSFHError, [r"does not overlap the maps' footprint",
                                    r"same galaxy and field"])


def test_unknown_layout_is_an_error(pixel_maps, tmp_path):
    path = tmp_path / "odd.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros((4, 4))),
                  fits.BinTableHDU.from_columns([fits.Column("FOO", "D", array=[1.0])],
                                                name="STUFF")]).writeto(path)
    with pytest.raises(CubeSFHError) as exc:
        compare_maps(pixel_maps, path)
    check_error(exc, CubeSFHError, [r"cannot tell the layout of .*odd\.fits",
                                    r"extensions: PRIMARY, STUFF", r"PHANGS DAP MAPS",
                                    r"nGIST <RUN>_sfh\.fits", r"--quantity"])
    with pytest.raises(CubeSFHError) as exc:
        compare_maps(pixel_maps, tmp_path / "missing.fits")
    check_error(exc, CubeSFHError, [r"was not found"])


# ----------------------------------------------------------------------------- nGIST


def write_ngist(directory, maps, *, offset_age, offset_metal, norm_temp="LIGHT",
                with_wcs=True, masked=()):
    """
    nGIST-like ``RUN_sfh.fits`` and ``RUN_table.fits`` for ``maps``' bins: the bins
    numbered the other way round, the spaxels listed row by row (X fastest) with
    X, Y in arcsec from an origin, masked spaxels given minus their nearest bin.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ours = maps.bin_map.ravel()
    theirs = maps.n_bins - 1 - ours  # another numbering of the same bins
    bin_id = theirs.copy()
    for k in masked:
        bin_id[k] = -theirs[k] if theirs[k] else -1
    iy, ix = np.divmod(np.arange(N * N), N)
    origin = (6.0, 5.0)
    cols = [fits.Column("ID", "J", array=np.arange(N * N)),
            fits.Column("BIN_ID", "J", array=bin_id),
            fits.Column("X", "D", array=(ix - origin[0]) * 0.2),
            fits.Column("Y", "D", array=(iy - origin[1]) * 0.2),
            fits.Column("FLUX", "D", array=np.ones(N * N)),
            fits.Column("SNR", "D", array=np.full(N * N, 30.0))]
    hdus = [fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols, name="TABLE")]
    hdus[0].header["PIXSIZE"] = 0.2
    if with_wcs:  # nGIST keeps the cube's 3-D WCS in a third extension
        w3 = WCS(naxis=3)
        w3.wcs.ctype = ["RA---TAN", "DEC--TAN", "AWAV"]
        w3.wcs.crval = [*CRVAL, 4750.0]
        w3.wcs.crpix = [*our_wcs().wcs.crpix, 1.0]
        w3.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600, 1.25]
        w3.wcs.cunit = ["deg", "deg", "Angstrom"]
        hdus.append(fits.ImageHDU(data=None, header=w3.to_header()))
    fits.HDUList(hdus).writeto(directory / "RUN_table.fits", overwrite=True)
    # one SFH row per bin in their numbering
    order = maps.n_bins - 1 - np.arange(maps.n_bins)  # our bin of their row k
    weight = "mw" if norm_temp == "MASS" else "lw"
    age = maps.table[f"cnn_logage_{weight}"].value[order] - offset_age
    metal = maps.table[f"cnn_zh_{weight}"].value[order] - offset_metal
    sfh = fits.BinTableHDU.from_columns([fits.Column("AGE", "D", array=10 ** (age - 9.0)),
                                         fits.Column("METAL", "D", array=metal),
                                         fits.Column("ALPHA", "D", array=np.zeros(age.size))],
                                        name="SFH")
    sfh.header["METHOD"] = "ppxf"
    sfh.header["HIERARCH NORM_TEMP"] = norm_temp  # as nGIST writes its config
    path = directory / "RUN_sfh.fits"
    fits.HDUList([fits.PrimaryHDU(), sfh]).writeto(path, overwrite=True)
    return path


@pytest.mark.parametrize("with_wcs", [True, False])
def test_ngist_sfh_table_on_the_same_bins(block_maps, tmp_path, with_wcs):
    path = write_ngist(tmp_path / "run", block_maps, offset_age=0.3, offset_metal=0.05,
                       with_wcs=with_wcs)
    summary = compare_maps(block_maps, path)
    r = rows(summary)
    assert summary.meta["layout"] == "ngist-sfh"
    assert summary.meta["weighting"] == "NORM_TEMP = LIGHT"
    assert set(r) == {"LOGAGE_LW", "ZH_LW"}
    assert r["LOGAGE_LW"]["other"] == "AGE" and r["ZH_LW"]["other"] == "METAL"
    assert r["LOGAGE_LW"]["median_offset"] == pytest.approx(0.3, abs=1e-6)
    assert r["ZH_LW"]["median_offset"] == pytest.approx(0.05, abs=1e-6)
    for q in r:
        # a transposed or misnumbered grid would scatter the offsets
        assert r[q]["robust_scatter"] < 1e-6
        assert r[q]["n"] == block_maps.n_bins - 1  # all but FLAGGED_BIN
        assert r[q]["placement"] == "same bins"


def test_ngist_masked_spaxels_and_mass_weighting(block_maps, tmp_path):
    # one spaxel of a bin masked (BIN_ID < 0): 3 of its 4 spaxels still count
    path = write_ngist(tmp_path / "run", block_maps, offset_age=-0.1, offset_metal=0.0,
                       norm_temp="MASS", masked=(N * 4 + 4,))
    summary, per_bin = compare_maps(block_maps, path, return_bins=True)
    r = rows(summary)
    assert set(r) == {"LOGAGE_MW", "ZH_MW"}  # mass-normalised templates: the MW maps
    assert r["LOGAGE_MW"]["median_offset"] == pytest.approx(-0.1, abs=1e-6)
    assert r["LOGAGE_MW"]["robust_scatter"] < 1e-6
    assert r["LOGAGE_MW"]["n"] == block_maps.n_bins - 1
    assert r["LOGAGE_MW"]["placement"] == "same grid"
    b = block_maps.bin_map[4, 4]
    assert per_bin["logage_mw_coverage"][b] == pytest.approx(0.75)
    # with min_coverage above 3/4 that bin drops out
    strict = compare_maps(block_maps, path, min_coverage=0.8)
    assert rows(strict)["LOGAGE_MW"]["n"] == block_maps.n_bins - 2


def test_ngist_without_its_bin_table(block_maps, tmp_path):
    path = write_ngist(tmp_path / "run", block_maps, offset_age=0.0, offset_metal=0.0)
    (tmp_path / "run" / "RUN_table.fits").rename(tmp_path / "elsewhere.fits")
    with pytest.raises(CubeSFHError) as exc:
        compare_maps(block_maps, path)
    check_error(exc, CubeSFHError, [r"nGIST SFH table", r"RUN_table\.fits",
                                    r"--ngist-table", r"SFH_maps\.fits"])
    summary = compare_maps(block_maps, path, table=tmp_path / "elsewhere.fits")
    assert rows(summary)["LOGAGE_LW"]["n"] == block_maps.n_bins - 1
    # the bin table itself is not the SFH file
    with pytest.raises(CubeSFHError) as exc:
        compare_maps(block_maps, tmp_path / "elsewhere.fits")
    check_error(exc, CubeSFHError, [r"nGIST bin table", r"<RUN>_sfh\.fits"])


# ----------------------------------------------------------------------------- cubesfh


def test_command_line_compare_with_another_cubesfh_product(block_maps, tmp_path, capsys):
    ours = block_maps.write(tmp_path / "maps.fits")
    t = block_maps.table[["cnn_logage_lw", "cnn_logage_mw", "cnn_zh_lw", "cnn_zh_mw",
                          "cnn_mass_fraction", "cnn_zh", "flag"]].copy()
    t["cnn_logage_lw"] = t["cnn_logage_lw"] - 0.2 * u.dex
    t["cnn_zh_mw"] = t["cnn_zh_mw"] + 0.1 * u.dex
    other = StellarPopulationMaps(block_maps.bin_map, t, wcs=block_maps.wcs)
    other_path = other.write(tmp_path / "other.fits")
    out = tmp_path / "cmp"
    argv = ["compare", str(ours), str(other_path), "--output", str(out)]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "LOGAGE_LW" in text and "median offset +0.200 dex" in text
    table = Table.read(out / "comparison.ecsv")
    r = {row["quantity"]: row for row in table}
    assert r["LOGAGE_LW"]["median_offset"] == pytest.approx(0.2, abs=1e-6)
    assert r["ZH_MW"]["median_offset"] == pytest.approx(-0.1, abs=1e-6)
    assert abs(r["ZH_LW"]["median_offset"]) < 1e-9
    assert all(row["placement"] == "same bins" for row in table)
    assert all(row["n"] == block_maps.n_bins - 1 for row in table)  # FLAGGED_BIN left out
    bins = Table.read(out / "comparison_bins.ecsv")
    assert len(bins) == block_maps.n_bins
    for q in ("logage_lw", "logage_mw", "zh_lw", "zh_mw"):
        assert (out / f"compare_{q}.png").stat().st_size > 10_000
    # refused without --overwrite, accepted with it
    assert cli_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main([*argv, "--overwrite", "-q", "ZH_MW", "--no-plots"]) == 0
    assert len(Table.read(out / "comparison.ecsv")) == 1


def test_command_line_errors_are_one_line(block_maps, tmp_path, capsys):
    ours = block_maps.write(tmp_path / "maps.fits")
    odd = tmp_path / "odd.fits"
    fits.HDUList([fits.PrimaryHDU()]).writeto(odd)
    assert cli_main(["compare", str(ours), str(odd), "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cubesfh compare: error: cannot tell the layout") and "\n" not in err
    assert not (tmp_path / "c" / "comparison.ecsv").exists()
