# Licensed under a 3-clause BSD style license - see LICENSE
"""
More bad inputs (issue 20, adversarial pass): real MUSE/HST header variants,
PHANGS DAP kinematics maps with other names/units, extreme command-line values,
region files and run-many manifests.

Each test asserts a concrete outcome: the exception class and a message
pattern, a flag, or a number. The inputs are edited copies of the generated
example observation (12 x 12 spaxels), built once per module. The CLI runs use
``--kinematics`` (maps of the true kinematics) so that each takes a few seconds.

``docs/bad_inputs.rst`` ("More cases (issue 20 adversarial pass)") tabulates
these cases; keep the two in step.
"""

import os
import re
import warnings

import numpy as np
import pytest
from astropy.io import fits
from helpers import check_error, example_with_kinematics, one_line

from cubesfh import Cube, CubeSFHError, HSTImage
from cubesfh.cli import main as cli_main

SHAPE = (12, 12)
C_KMS = 299_792.458
REDSHIFT = 700.0 / C_KMS


# --------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def obs(tmp_path_factory):
    return example_with_kinematics(tmp_path_factory.mktemp("example_more"), shape=SHAPE)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_more")


def _variant(src, bad_dir, name, edit):
    with fits.open(src) as h:
        hdul = fits.HDUList([hdu.copy() for hdu in h])
    hdul = edit(hdul) or hdul
    path = bad_dir / f"{name}.fits"
    hdul.writeto(path, overwrite=True)
    return path


def cube_variant(obs, bad_dir, name, edit):
    return _variant(obs.cube_path, bad_dir, name, edit)


def hst_variant(obs, bad_dir, name, edit, band="F555W"):
    return _variant(obs.hst_paths[band], bad_dir, name, edit)


def kin_variant(obs, bad_dir, name, edit):
    return _variant(obs.kin, bad_dir, name, edit)


def run_cli(capsys, argv):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip(), captured.out, [str(w.message) for w in caught]


def run_argv(obs, cube=None, *extra, kin=None, redshift=str(REDSHIFT), output=None):
    argv = ["run", str(cube or obs.cube_path), "-o", str(output or obs.dir / "out.fits"),
            "--no-progress", "--kinematics", str(kin or obs.kin)]
    if redshift is not None:
        argv += ["--redshift", redshift]
    return argv + list(extra)


def assert_cli_error(code, err, patterns):
    assert code == 2, err
    one_line(err)
    assert err.startswith("cubesfh run: error: ") and "Traceback" not in err
    for pattern in patterns:
        assert re.search(pattern, err), (pattern, err)


# ------------------------------------------------------------- MUSE header variants

def _both(edit_header):
    def edit(h):
        for ext in ("DATA", "STAT"):
            edit_header(h[ext].header)
    return edit


def _pc_cdelt(hd):
    for i in (1, 2, 3):
        hd[f"CDELT{i}"] = hd.pop(f"CD{i}_{i}")
        hd[f"PC{i}_{i}"] = 1.0
    for key in ("CD1_2", "CD2_1", "CD1_3", "CD2_3", "CD3_1", "CD3_2"):
        del hd[key]


def _cunit3(unit, scale):
    def edit(hd):
        hd["CUNIT3"], hd["CRVAL3"], hd["CD3_3"] = unit, hd["CRVAL3"] * scale, hd["CD3_3"] * scale
    return edit


def _prim_no_extname(h):
    header = h["DATA"].header.copy()
    del header["EXTNAME"]
    return fits.HDUList([fits.PrimaryHDU(h["DATA"].data, header), h["STAT"]])


def _float64(h):
    for ext in ("DATA", "STAT"):
        h[ext].data = h[ext].data.astype(">f8")


def _int16_scaled(h):
    data = h["DATA"].data.copy()
    hdu = fits.ImageHDU(data, h["DATA"].header, name="DATA")
    hdu.scale("int16", bscale=float(np.nanmax(data) - np.nanmin(data)) / 60000.0,
              bzero=float(np.nanmax(data) + np.nanmin(data)) / 2.0)
    h["DATA"] = hdu


def _dq_zero(h):
    h.append(fits.ImageHDU(np.zeros(h["DATA"].data.shape, "i4"), h["DATA"].header, name="DQ"))


CUBE_READ_OK = [
    pytest.param(_both(_pc_cdelt), id="PC-CDELT-WCS"),
    pytest.param(_both(_cunit3("m", 1e-10)), id="CUNIT3-m"),
    pytest.param(_both(_cunit3("nm", 0.1)), id="CUNIT3-nm"),
    pytest.param(_both(_cunit3("angstrom", 1.0)), id="CUNIT3-lowercase-angstrom"),
    pytest.param(_prim_no_extname, id="flux-in-PRIMARY-without-EXTNAME-plus-STAT"),
    pytest.param(_float64, id="float64-cube"),
    pytest.param(_int16_scaled, id="BSCALE-BZERO-int16-cube"),
    pytest.param(_dq_zero, id="DQ-extension-all-good"),
    pytest.param(lambda h: h["DATA"].header.update(BUNIT="10**-20 erg s-1 cm-2 A-1"),
                 id="BUNIT-generic-A"),
]


@pytest.fixture(scope="module")
def reference_cube(obs):
    cube = Cube.read(obs.cube_path)
    return cube.wavelength.value, cube.snr_map(progress_bar=False)


@pytest.mark.parametrize("edit", CUBE_READ_OK)
def test_cube_header_variant_read_correctly(obs, bad_dir, request, reference_cube, edit):
    cube = Cube.read(cube_variant(obs, bad_dir, request.node.callspec.id, edit))
    wave, snr = reference_cube
    assert cube.shape == (1880, *SHAPE)
    np.testing.assert_allclose(cube.wavelength.value, wave, rtol=1e-9)
    np.testing.assert_allclose(cube.snr_map(progress_bar=False), snr, rtol=2e-3)


def _unnamed(h):
    hdus = [h[0]]
    for ext in ("DATA", "STAT"):
        hdu = fits.ImageHDU(h[ext].data, h[ext].header)
        hdu.name = ""
        hdus.append(hdu)
    return fits.HDUList(hdus)


def _decreasing(hd):
    hd["CRVAL3"], hd["CD3_3"] = 7098.47, -1.25


CUBE_READ_ERRORS = [
    pytest.param(_both(lambda hd: hd.update(CTYPE3="WAVELENGTH")),
                 ["CTYPE3 = 'WAVELENGTH' is not a FITS spectral axis type", "set CTYPE3 = 'WAVE'"],
                 id="CTYPE3-WAVELENGTH"),
    pytest.param(_both(lambda hd: hd.update(CTYPE3="awav")),
                 ["CTYPE3 = 'awav' is not a FITS spectral axis type", "set CTYPE3 = 'AWAV'"],
                 id="CTYPE3-lowercase-awav"),
    pytest.param(_both(lambda hd: hd.remove("CUNIT3")),
                 ["wavelength axis is in unknown units \\(CUNIT3 = None\\)", "Set CUNIT3"],
                 id="CUNIT3-missing"),
    pytest.param(_both(lambda hd: hd.update(CUNIT3="Angstroms")),
                 ["CUNIT3 = 'Angstroms'", "CUNIT3 = 'Angstrom'"], id="CUNIT3-Angstroms"),
    pytest.param(_unnamed, ["holds 2 3-D images", "none is named DATA",
                            "EXTNAME = 'DATA'", "'STAT'"], id="unnamed-extensions"),
    pytest.param(_both(_decreasing), ["wavelength decreases along the cube",
                                      "step -1.25 Angstrom", "data\\[::-1\\]",
                                      "positive CD3_3"], id="decreasing-wavelength"),
    pytest.param(lambda h: h["DATA"].header.update(
        BUNIT="10**(-20)*erg/s/cm**2/Angstrom/spaxel"),
        ["not a unit astropy can parse", "unit="], id="BUNIT-per-spaxel"),
    pytest.param(lambda h: h["DATA"].header.update(BUNIT="erg/s/cm2/A"),
                 ["STAT is in '\\(10\\*\\*\\(-20\\)", "not the square of the DATA unit",
                  "fix BUNIT in the STAT header"], id="BUNIT-DATA-rescaled-STAT-not"),
]


@pytest.mark.parametrize("edit, patterns", CUBE_READ_ERRORS)
def test_cube_header_variant_error(obs, bad_dir, request, edit, patterns):
    path = cube_variant(obs, bad_dir, request.node.callspec.id, edit)
    with pytest.raises(CubeSFHError) as excinfo:
        Cube.read(path)
    check_error(excinfo, CubeSFHError, patterns)


def test_cunit3_nm_with_angstrom_values(obs, bad_dir, capsys):
    """CUNIT3 = 'nm' while CRVAL3/CD3_3 are in Angstrom: the range is 10x too red; the
    run stops before any work and names CUNIT3."""
    path = cube_variant(obs, bad_dir, "nm_wrong", _both(lambda hd: hd.update(CUNIT3="nm")))
    cube = Cube.read(path)
    assert cube.wavelength.value[0] == pytest.approx(47497.2)
    code, err, _, _ = run_cli(capsys, run_argv(obs, path))
    assert_cli_error(code, err, ["wavelengths, 47497-70985 A, are not those of an optical cube",
                                 "check CUNIT3"])


def test_dq_flagging_every_pixel(obs, bad_dir):
    def edit(h):
        h.append(fits.ImageHDU(np.ones(h["DATA"].data.shape, "i4"), h["DATA"].header,
                               name="DQ"))
    cube = Cube.read(cube_variant(obs, bad_dir, "dq_all", edit))
    with pytest.raises(CubeSFHError) as excinfo:
        cube.snr_map(progress_bar=False)
    check_error(excinfo, CubeSFHError, ["DQ flags every pixel", "Check the DQ extension"])


# ------------------------------------------------------------------- HST variants

def _hst_unit(image):
    return str(image.unit), float(np.nanmedian(np.asarray(image.to_surface_brightness())))


@pytest.fixture(scope="module")
def hst_reference(obs):
    return _hst_unit(HSTImage.read(obs.hst_paths["F555W"]))


def _wht_ctx(h):
    sci = h["SCI"]
    h.append(fits.ImageHDU(np.ones(sci.data.shape, "f4"), sci.header, name="WHT"))
    h.append(fits.ImageHDU(np.ones(sci.data.shape, "i4"), sci.header, name="CTX"))


def _photflam_in_primary(h):
    for key in ("PHOTFLAM", "PHOTPLAM"):
        h[0].header[key] = h["SCI"].header.pop(key)


def _hst_int16(h):
    data = h["SCI"].data.copy()
    hdu = fits.ImageHDU(data, h["SCI"].header, name="SCI")
    hdu.scale("int16", bscale=float(np.nanmax(data)) / 30000.0, bzero=0.0)
    h["SCI"] = hdu


def _sip(h):
    hd = h["SCI"].header
    hd["CTYPE1"], hd["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    hd.update(A_ORDER=2, B_ORDER=2, A_2_0=0.0, B_0_2=0.0)


def _image_in_primary(h):
    primary = fits.PrimaryHDU(h["SCI"].data, h["SCI"].header)
    for key in ("TELESCOP", "INSTRUME", "DETECTOR", "FILTER", "PHOTMODE"):
        primary.header[key] = h[0].header[key]
    return fits.HDUList([primary])


HST_READ_OK = [
    pytest.param(_wht_ctx, 1e-6, id="SCI-WHT-CTX"),
    pytest.param(_photflam_in_primary, 1e-6, id="PHOTFLAM-in-primary-header"),
    pytest.param(_hst_int16, 1e-3, id="BSCALE-int16-HST"),
    pytest.param(_sip, 1e-6, id="SIP-distortion-keywords"),
    pytest.param(_image_in_primary, 1e-6, id="HST-image-in-primary-HDU"),
    pytest.param(lambda h: h[0].header.update(EXPTIME="N/A"), 1e-6, id="EXPTIME-not-a-number"),
    pytest.param(lambda h: h["SCI"].header.update(BUNIT="ELECTRONS/SEC"), 1e-6,
                 id="BUNIT-ELECTRONS-per-SEC"),
]


@pytest.mark.parametrize("edit, rtol", HST_READ_OK)
def test_hst_variant_read_correctly(obs, bad_dir, request, hst_reference, edit, rtol):
    image = HSTImage.read(hst_variant(obs, bad_dir, request.node.callspec.id, edit))
    unit, median = _hst_unit(image)
    assert image.band == "F555W" and image.instrument == "WFC3/UVIS"
    assert unit == hst_reference[0]
    assert median == pytest.approx(hst_reference[1], rel=rtol)


def test_hst_flux_bunit_with_A_for_angstrom(obs, bad_dir):
    path = hst_variant(obs, bad_dir, "flam_A", lambda h: h["SCI"].header.update(
        BUNIT="erg/s/cm2/A"))
    image = HSTImage.read(path)
    assert image.unit.to_string() == "erg / (Angstrom s cm2)"
    assert image.unit_kind == "flux"


def _two_sci(h):
    sci = h["SCI"].copy()
    sci.header["EXTVER"] = 2
    h.append(sci)


def _ir(h):
    h[0].header.update(DETECTOR="IR", FILTER="F110W", PHOTMODE="WFC3 IR F110W")


def _acs(h):
    del h[0].header["FILTER"]
    h[0].header.update(INSTRUME="ACS", DETECTOR="WFC", FILTER1="F555W", FILTER2="CLEAR2L",
                       PHOTMODE="ACS WFC1 F555W")


HST_READ_ERRORS = [
    pytest.param(_two_sci, {}, ["has 2 SCI extensions", "un-drizzled exposure",
                                "_drc/_drz"], id="two-SCI-flt-exposure"),
    pytest.param(lambda h: h.__setitem__(0, h[0]) or h[0].header.update(EXPTIME=1000.0)
                 or h["SCI"].header.update(BUNIT="ELECTRONS"), {},
                 ["BUNIT='ELECTRONS'", "divided by the exposure time"],
                 id="BUNIT-ELECTRONS-total-counts"),
    pytest.param(_ir, {}, ["Unknown filter 'F110W'", "PHANGS-HST bands"], id="WFC3-IR-F110W"),
    pytest.param(_ir, {"band": "F814W"}, ["says F110W", "force_band=True"],
                 id="WFC3-IR-F110W-given-as-F814W"),
    pytest.param(_acs, {}, ["from ACS/WFC, not WFC3/UVIS", "allow_other_instrument"],
                 id="ACS-F555W"),
    pytest.param(lambda h: h[0].header.update(EXPTIME=-1.0), {},
                 ["EXPTIME = -1 s", "no exposure"], id="EXPTIME-negative"),
    pytest.param(lambda h: h["SCI"].header.update(PHOTFLAM=-1.9e-19), {},
                 ["no valid PHOTFLAM keyword", "photflam="], id="PHOTFLAM-negative"),
]


@pytest.mark.parametrize("edit, kwargs, patterns", HST_READ_ERRORS)
def test_hst_variant_error(obs, bad_dir, request, edit, kwargs, patterns):
    path = hst_variant(obs, bad_dir, request.node.callspec.id, edit)
    with pytest.raises(CubeSFHError) as excinfo:
        HSTImage.read(path, **kwargs)
    check_error(excinfo, CubeSFHError, patterns)


# ------------------------------------------------------------- kinematics maps

def _rename(h):
    h["V_STARS"].name, h["SIGMA_STARS"].name = "STELLAR_VEL", "STELLAR_SIGMA"


def _fill(ext, value):
    def edit(h):
        for name in ext:
            h[name].data[:] = value
    return edit


def _relative(h):
    h["V_STARS"].data = h["V_STARS"].data - 700.0


def _ms(with_bunit):
    def edit(h):
        for name in ("V_STARS", "SIGMA_STARS"):
            h[name].data = h[name].data * 1000.0
            if with_bunit:
                h[name].header["BUNIT"] = "m/s"
            else:
                h[name].header.remove("BUNIT")
    return edit


def _no_wcs(h):
    for name in ("V_STARS", "SIGMA_STARS"):
        h[name] = fits.ImageHDU(h[name].data, name=name)


def _far(h):
    for name in ("V_STARS", "SIGMA_STARS"):
        h[name].header["CRVAL2"] += 1.0


def _degenerate_3d(h):
    for name in ("V_STARS", "SIGMA_STARS"):
        h[name] = fits.ImageHDU(h[name].data[None], h[name].header, name=name)


KIN_ERRORS = [
    pytest.param(_rename, ["no extension 'V_STARS'", "STELLAR_VEL, STELLAR_SIGMA",
                           "rename the extensions", "STELLAR_VEL -> V_STARS"],
                 id="kin-STELLAR_VEL-names"),
    pytest.param(_fill(("V_STARS", "SIGMA_STARS"), np.nan),
                 ["No bin has a valid velocity in the maps"], id="kin-all-NaN"),
    pytest.param(_fill(("SIGMA_STARS",), np.nan),
                 ["have no valid dispersion in any bin", "leave out --kinematics"],
                 id="kin-sigma-all-NaN"),
    pytest.param(_relative, ["median of -1 km/s, -701 km/s from the systemic cz = 700",
                             "line-of-sight velocities cz", "Add the systemic velocity"],
                 id="kin-velocities-relative-to-systemic"),
    pytest.param(_ms(False), ["median of 699\\d{3} km/s, 1000 times the systemic cz = 700",
                              "in m/s", "set BUNIT = 'm/s'"], id="kin-m-per-s-without-BUNIT"),
    pytest.param(_no_wcs, ["velocity map has no celestial WCS"], id="kin-without-WCS"),
    pytest.param(_far, ["does not overlap the cube footprint"], id="kin-other-field"),
    pytest.param(_degenerate_3d, ["is not a 2-D image \\(shape \\(1, 12, 12\\)\\)"],
                 id="kin-3D-degenerate"),
]


@pytest.mark.parametrize("edit, patterns", KIN_ERRORS)
def test_kinematics_map_error(obs, bad_dir, capsys, request, edit, patterns):
    kin = kin_variant(obs, bad_dir, request.node.callspec.id, edit)
    code, err, _, _ = run_cli(capsys, run_argv(obs, kin=kin))
    assert_cli_error(code, err, patterns)


def test_kinematics_cube_file_given_as_maps(obs, capsys):
    code, err, _, _ = run_cli(capsys, run_argv(obs, kin=obs.cube_path))
    assert_cli_error(code, err, ["no extension 'V_STARS' \\(present: PRIMARY, DATA, STAT\\)"])


@pytest.fixture(scope="module")
def reference_run(obs, tmp_path_factory):
    """The CNN LW ages of a plain run (true kinematics maps)."""
    from astropy.table import Table

    out = tmp_path_factory.mktemp("ref") / "ref.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(run_argv(obs, output=out)) == 0
        return np.asarray(Table.read(out, "BINS")["cnn_logage_lw"])


def _ages(path):
    from astropy.table import Table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = Table.read(path, "BINS")
    return np.asarray(table["cnn_logage_lw"]), np.asarray(table["flag"])


def _twice_finer(h):
    for name in ("V_STARS", "SIGMA_STARS"):
        data = np.repeat(np.repeat(h[name].data, 2, 0), 2, 1)
        header = h[name].header.copy()
        header["PC1_1"] /= 2
        header["PC2_2"] /= 2
        header["CRPIX1"] = header["CRPIX2"] = 12.5
        h[name] = fits.ImageHDU(data, header, name=name)


KIN_SAME_RESULT = [
    pytest.param(_ms(True), id="kin-m-per-s-with-BUNIT"),
    pytest.param(lambda h: [h[n].header.update(BUNIT="KM/S") for n in ("V_STARS", "SIGMA_STARS")]
                 and None, id="kin-BUNIT-KM-S-upper-case"),
    pytest.param(lambda h: [h[n].header.update(BUNIT="km s-1")
                            for n in ("V_STARS", "SIGMA_STARS")] and None,
                 id="kin-BUNIT-km-s-1"),
    pytest.param(_twice_finer, id="kin-map-on-a-2x-finer-grid"),
]


@pytest.mark.parametrize("edit", KIN_SAME_RESULT)
def test_kinematics_map_variant_same_result(obs, bad_dir, capsys, request, reference_run, edit):
    kin = kin_variant(obs, bad_dir, request.node.callspec.id, edit)
    out = bad_dir / f"{request.node.callspec.id}_maps.fits"
    code, err, _, _ = run_cli(capsys, run_argv(obs, kin=kin, output=out))
    assert code == 0, err
    ages, _ = _ages(out)
    np.testing.assert_allclose(ages, reference_run, atol=0.02)


def test_kinematics_map_half_nan_flags_those_bins(obs, bad_dir, capsys):
    from cubesfh.flags import BinFlag

    def edit(h):
        for name in ("V_STARS", "SIGMA_STARS"):
            h[name].data[:6] = np.nan
    kin = kin_variant(obs, bad_dir, "kin_half", edit)
    out = bad_dir / "kin_half_maps.fits"
    code, err, _, caught = run_cli(capsys, run_argv(obs, kin=kin, output=out))
    assert code == 0, err
    ages, flags = _ages(out)
    failed = (flags & BinFlag.KINEMATICS_FAILED) != 0
    assert 0 < failed.sum() < flags.size
    assert np.isfinite(ages[~failed]).all()
    assert any("BAD_KINEMATICS" in m for m in caught)


@pytest.mark.parametrize("value, flag", [(-50.0, "SPECTRUM_FAILED"), (900.0, "SIGMA_TOO_HIGH")],
                         ids=["kin-negative-sigma", "kin-sigma-900"])
def test_kinematics_map_bad_sigma_flags_every_bin(obs, bad_dir, capsys, value, flag):
    from cubesfh.flags import BinFlag

    kin = kin_variant(obs, bad_dir, f"kin_sigma_{value:g}", _fill(("SIGMA_STARS",), value))
    out = bad_dir / f"kin_sigma_{value:g}_maps.fits"
    code, err, _, caught = run_cli(capsys, run_argv(obs, kin=kin, output=out))
    assert code == 0, err
    _, flags = _ages(out)
    assert ((flags & BinFlag[flag]) != 0).all()
    assert any(re.search("flagged: \\d+ (BAD_KINEMATICS|SIGMA_TOO_HIGH)", m) for m in caught)


# --------------------------------------------------------- command-line values

CLI_VALUE_ERRORS = [
    pytest.param({"redshift": "700"}, ["redshift z = 700 looks like a velocity cz in km/s",
                                       "--redshift 0.002335"], id="redshift-700-cz"),
    pytest.param({"redshift": "-0.5"}, ["At redshift z = -0.50000", "check the redshift"],
                 id="redshift-negative-0.5"),
    pytest.param({"redshift": "1.5"}, ["At redshift z = 1.50000", "cube covers 4750-7098 A"],
                 id="redshift-1.5"),
    pytest.param({"redshift": "nan"}, ["--redshift nan is not a valid redshift"],
                 id="redshift-nan"),
    pytest.param({"redshift": "0"}, ["median of 699 km/s, \\+699 km/s from the systemic cz = 0"],
                 id="redshift-0-with-cz-maps"),
    pytest.param({"extra": ["--target-snr", "0"]},
                 ["--target-snr must be positive and finite; got 0.0"], id="target-snr-0"),
    pytest.param({"extra": ["--target-snr", "inf"]},
                 ["--target-snr must be positive and finite; got inf"], id="target-snr-inf"),
    pytest.param({"extra": ["--min-snr", "nan"]},
                 ["--min-snr must be a finite S/N", "got nan \\(--min-snr\\)"], id="min-snr-nan"),
    pytest.param({"extra": ["--target-snr", "-5"]}, ["--target-snr must be positive"],
                 id="target-snr-negative"),
    pytest.param({"extra": ["--target-snr", "1e6"]},
                 ["No bin can reach --target-snr 1e\\+06", "Lower --target-snr to at most \\d+"],
                 id="target-snr-unreachable"),
    pytest.param({"extra": ["--min-snr", "1e9"]},
                 ["No spaxel reaches --min-snr", "lower --min-snr or pass --min-snr 0"],
                 id="min-snr-unreachable"),
    pytest.param({"extra": ["--snr-window", "9000", "9200"]},
                 ["window 9000-9200 Angstrom contains no pixel", "4749.72-7098.47"],
                 id="snr-window-outside-the-cube"),
    pytest.param({"extra": ["--ebv", "nan"]}, ["--ebv nan", "E\\(B-V\\) >= 0"],
                 id="ebv-nan"),
]


@pytest.mark.parametrize("kw, patterns", CLI_VALUE_ERRORS)
def test_cli_value_error(obs, capsys, kw, patterns):
    argv = run_argv(obs, None, *kw.get("extra", []), redshift=kw.get("redshift", str(REDSHIFT)))
    code, err, _, _ = run_cli(capsys, argv)
    assert_cli_error(code, err, patterns)


def test_reversed_snr_window_is_the_same_window(obs, capsys, reference_run):
    out = obs.dir / "swapped.fits"
    code, err, _, _ = run_cli(capsys, run_argv(obs, None, "--snr-window", "5500", "5300",
                                               output=out))
    assert code == 0, err
    np.testing.assert_allclose(_ages(out)[0], reference_run, atol=0.02)


# ------------------------------------------------------- cube contents and regions

def test_region_masking_everything(obs, bad_dir, capsys):
    reg = bad_dir / "all.reg"
    reg.write_text('# Region file format: DS9\nfk5\nbox(170.0625,12.9915,10",10",0)\n')
    code, err, _, _ = run_cli(capsys, run_argv(obs, None, "--mask", str(reg)))
    assert_cli_error(code, err, ["All spaxels with valid data are excluded",
                                 "regions do not cover the whole field"])


def test_region_file_without_regions(obs, bad_dir, capsys):
    reg = bad_dir / "none.reg"
    reg.write_text("# Region file format: DS9\nfk5\n")
    code, err, _, _ = run_cli(capsys, run_argv(obs, None, "--mask", str(reg)))
    assert_cli_error(code, err, ["contains no regions", "save them again"])


def test_region_in_image_coordinates_masks_its_spaxels(obs, bad_dir, capsys):
    reg = bad_dir / "image.reg"
    reg.write_text("# Region file format: DS9\nimage\ncircle(6,6,3)\n")
    out = bad_dir / "image_reg_maps.fits"
    code, err, _, _ = run_cli(capsys, run_argv(obs, None, "--mask", str(reg), output=out))
    assert code == 0, err
    with fits.open(out) as h:
        assert (h["BIN_ID"].data >= 0).sum() == 119  # 25 spaxels inside the circle


def test_all_zero_data(obs, bad_dir, capsys):
    cube = cube_variant(obs, bad_dir, "zero_data", lambda h: h["DATA"].data.fill(0.0))
    code, err, _, _ = run_cli(capsys, run_argv(obs, cube))
    assert_cli_error(code, err, ["No spaxel reaches --min-snr 1.0", "highest spaxel S/N is 0"])


def test_zero_flux_rows_are_not_binned(obs, bad_dir, capsys):
    def edit(h):
        h["DATA"].data[:, :4, :] = 0.0
    out = bad_dir / "zero_rows_maps.fits"
    code, err, _, _ = run_cli(capsys, run_argv(obs, cube_variant(obs, bad_dir, "zero_rows",
                                                                 edit), output=out))
    assert code == 0, err
    with fits.open(out) as h:
        bin_id = h["BIN_ID"].data
    assert (bin_id[:4] == -1).all() and (bin_id[4:] >= 0).all()


def test_all_identical_spectra(obs, bad_dir, capsys):
    def edit(h):
        for ext in ("DATA", "STAT"):
            h[ext].data[:] = h[ext].data[:, 6:7, 6:7]
    out = bad_dir / "identical_maps.fits"
    code, err, _, _ = run_cli(capsys, run_argv(obs, cube_variant(obs, bad_dir, "identical",
                                                                 edit), output=out))
    assert code == 0, err
    ages, _ = _ages(out)
    assert ages.size == SHAPE[0] * SHAPE[1]
    assert np.ptp(ages) < 0.3  # the same spectrum everywhere: the same age, to the noise


def _spatial_cut(ys, xs, planes=slice(None)):
    def edit(h):
        for ext in ("DATA", "STAT"):
            header = h[ext].header.copy()
            header["CRPIX1"] -= xs.start
            header["CRPIX2"] -= ys.start
            if planes.start:
                header["CRPIX3"] -= planes.start
            h[ext] = fits.ImageHDU(h[ext].data[planes, ys, xs].copy(), header, name=ext)
    return edit


@pytest.mark.parametrize("size", [1, 2], ids=["1x1-cube", "2x2-cube"])
def test_tiny_cube_runs(obs, bad_dir, capsys, size):
    cut = slice(5, 5 + size)
    cube = cube_variant(obs, bad_dir, f"tiny{size}", _spatial_cut(cut, cut))
    out = bad_dir / f"tiny{size}_maps.fits"
    code, err, _, _ = run_cli(capsys, run_argv(obs, cube, output=out))
    assert code == 0, err
    ages, _ = _ages(out)
    assert ages.size == size * size and np.isfinite(ages).all()


def test_single_plane_cube(obs, bad_dir, capsys):
    cube = cube_variant(obs, bad_dir, "one_plane",
                        _spatial_cut(slice(0, 12), slice(0, 12), slice(900, 901)))
    code, err, _, caught = run_cli(capsys, run_argv(obs, cube))
    assert_cli_error(code, err, ["covers only 5875-5875 A \\(1 wavelength plane\\)",
                                 "too narrow", "not a spectral slab"])
    assert any("1 wavelength planes" in m for m in caught)


def test_foreground_star_bin_is_out_of_distribution(obs, bad_dir, capsys):
    """An unmasked bright blue point source in one spaxel: its bin is flagged OOD."""
    from cubesfh.flags import BinFlag

    def edit(h):
        lam = 4749.72 + 1.25 * np.arange(1880)
        star = 1e6 * (lam / 5500.0) ** -4
        h["DATA"].data[:, 2, 2] += star.astype("f4")
        h["STAT"].data[:, 2, 2] += (star / 100).astype("f4")
    out = bad_dir / "star_maps.fits"
    code, err, _, _ = run_cli(capsys, run_argv(obs, cube_variant(obs, bad_dir, "star", edit),
                                               output=out))
    assert code == 0, err
    with fits.open(out) as h:
        star_bin = h["BIN_ID"].data[2, 2]
    _, flags = _ages(out)
    assert flags[star_bin] & BinFlag.OUT_OF_DISTRIBUTION


# ------------------------------------------------------------ run-many manifests

def _manifest(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


MANIFEST_OK = [
    pytest.param("semi.csv", "name;cube;target_snr\nA;{cube};50\n", 50.0,
                 id="manifest-semicolon-separated"),
    pytest.param("tab.csv", "name\tcube\ttarget_snr\nA\t{cube}\t50\n", 50.0,
                 id="manifest-tab-separated"),
    pytest.param("caps.csv", "Name,Cube,Target_SNR\nA,{cube},50\n", 50.0,
                 id="manifest-capitalised-columns"),
    pytest.param("few.csv", "name,cube,target_snr\nA,{cube}\n", 35.0,
                 id="manifest-missing-trailing-cell"),
    pytest.param("crlf.csv", "name,cube,target_snr\r\nA,{cube},50\r\n", 50.0,
                 id="manifest-windows-line-ends"),
]


@pytest.mark.parametrize("name, text, snr", MANIFEST_OK)
def test_manifest_variant_read(obs, tmp_path, name, text, snr):
    from cubesfh.survey import read_manifest

    (entry,) = read_manifest(_manifest(tmp_path, name, text.format(cube=obs.cube_path)))
    assert entry.name == "A" and entry.cube == obs.cube_path
    assert entry.options["target_snr"] == snr


def test_manifest_relative_path_is_relative_to_the_manifest(obs, tmp_path):
    from cubesfh.survey import read_manifest

    sub = tmp_path / "lists"
    sub.mkdir()
    rel = os.path.relpath(obs.cube_path, sub)
    (entry,) = read_manifest(_manifest(sub, "rel.csv", f"name,cube\nA,{rel}\n"))
    assert entry.cube.resolve() == obs.cube_path.resolve()


MANIFEST_ERRORS = [
    pytest.param("nocube.csv", "name,path\nA,{cube}\n", ["at least 'cube'"],
                 id="manifest-without-cube-column"),
    pytest.param("dup.csv", "name,cube\nA,{cube}\nA,{cube}\n",
                 ["line 3: the name 'A' is already used by dup.csv, line 2"],
                 id="manifest-duplicated-name"),
    pytest.param("same.csv", "cube\n{cube}\n{cube}\n",
                 ["the name 'example_muse_cube' is already used"],
                 id="manifest-same-cube-twice-without-names"),
    pytest.param("typo.csv", "name,cube,redshfit\nA,{cube},0.002\n",
                 ["unknown option 'redshfit' \\(did you mean 'redshift'\\?\\)"],
                 id="manifest-misspelt-option"),
    pytest.param("hdr.csv", "name,cube\n", ["no cubes listed"], id="manifest-header-only"),
    pytest.param("list.yaml", "cubes:\n  - cube: {cube}\n    hst: [{hst}]\n",
                 ["hst must map bands to image paths"], id="manifest-yaml-hst-as-a-list"),
    pytest.param("band.csv", "name,cube,F606W\nA,{cube},{hst}\n",
                 ["unknown HST band\\(s\\) F606W"], id="manifest-unknown-band-column"),
]


@pytest.mark.parametrize("name, text, patterns", MANIFEST_ERRORS)
def test_manifest_error(obs, tmp_path, name, text, patterns):
    from cubesfh.survey import read_manifest

    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = _manifest(tmp_path, name, text.format(cube=obs.cube_path,
                                                 hst=obs.hst_paths["F555W"]))
    with pytest.raises(CubeSFHError) as excinfo:
        read_manifest(path)
    check_error(excinfo, CubeSFHError, patterns)


def test_cube_pipeline_with_hst_all_zero_image_flags_photometry(obs, bad_dir, capsys):
    """An HST image of zeros (e.g. a blank drizzle): the bins' photometry is flagged."""
    from cubesfh.flags import BinFlag

    zero = hst_variant(obs, bad_dir, "hst_zero", lambda h: h["SCI"].data.fill(0.0))
    out = bad_dir / "hst_zero_maps.fits"
    code, err, _, _ = run_cli(capsys, run_argv(obs, None, "--no-register", "--hst",
                                               f"F555W={zero}", output=out))
    assert code == 0, err
    _, flags = _ages(out)
    assert ((flags & BinFlag.PHOTOMETRY_NONPOSITIVE) != 0).all()
