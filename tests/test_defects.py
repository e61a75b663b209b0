# Licensed under a 3-clause BSD style license - see LICENSE
"""
Defects of issue 20 (data loss, silently wrong results, the newcomer's path).

Each test failed before its fix. The inputs are copies of the generated example
observation (:func:`cubesfh.datasets.make_example_observation`, 12 x 12
spaxels), edited as each case needs; ``docs/bad_inputs.rst`` lists the cases.
"""

import errno
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from astropy.io import fits
from helpers import example_with_kinematics

from cubesfh import Cube, CubeSFHError, CubeSFHWarning, HSTImage
from cubesfh.cli import _cli_spelling
from cubesfh.cli import main as cli_main
from cubesfh.datasets import make_example_observation
from cubesfh.flags import BinFlag
from cubesfh.utils._io import describe_os_error, output_lock

SHAPE = (12, 12)
REDSHIFT = 700.0 / 299_792.458


@pytest.fixture(scope="module")
def obs(tmp_path_factory):
    return example_with_kinematics(tmp_path_factory.mktemp("example"), shape=SHAPE)


def run_cli(capsys, argv):
    with warnings.catch_warnings():
        # the 12 x 12 example's HST images barely cover its edge bins (coverage warnings)
        warnings.simplefilter("ignore", CubeSFHWarning)
        code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip(), captured.out


def prepare_argv(obs, out, *extra, cube=None):
    return ["prepare", cube or obs.cube_path, "--hst", f"F555W={obs.hst_paths['F555W']}",
            "-o", out, "--kinematics", obs.kin, "--redshift", REDSHIFT, "--target-snr", 60,
            "--no-progress", *extra]


# ------------------------------------------------------------------ data loss

@pytest.mark.parametrize("how", ["same-path", "relative-path", "symlink", "hardlink"])
def test_output_that_is_the_input_cube_is_refused(obs, tmp_path, capsys, how):
    cube = tmp_path / "c.fits"
    cube.write_bytes(obs.cube_path.read_bytes())
    before = cube.read_bytes()
    out = {"same-path": cube, "relative-path": os.path.relpath(cube),
           "symlink": tmp_path / "link.fits", "hardlink": tmp_path / "hard.fits"}[how]
    if how == "symlink":
        os.symlink(cube, out)
    elif how == "hardlink":
        os.link(cube, out)
    for command in ("run", "prepare"):
        code, err, _ = run_cli(capsys, [command, cube, "-o", out, "--overwrite",
                                        "--no-progress"])
        assert code == 2, err
        assert re.search(r"is the input file .*c\.fits.*choose another output file", err), err
    assert cube.read_bytes() == before


def test_output_that_is_an_hst_image_or_kinematics_file_is_refused(obs, tmp_path, capsys):
    for target in (obs.hst_paths["F555W"], obs.kin):
        code, err, _ = run_cli(capsys, prepare_argv(obs, target, "--overwrite"))
        assert code == 2 and "is the input file" in err, err
    assert HSTImage.read(obs.hst_paths["F555W"]).band == "F555W"  # untouched


def test_existing_product_is_kept_unless_overwrite(obs, tmp_path, capsys):
    out = tmp_path / "prep.fits"
    out.write_bytes(b"a 100 s product")
    code, err, _ = run_cli(capsys, prepare_argv(obs, out))
    assert code == 2
    assert re.fullmatch(r"cubesfh prepare: error: .*prep\.fits already exists; pass "
                        r"--overwrite to replace it, or choose another output file\.", err)
    assert out.read_bytes() == b"a 100 s product"
    code, err, _ = run_cli(capsys, prepare_argv(obs, out, "--overwrite"))
    assert code == 0, err
    with fits.open(out) as h:
        assert "BIN_ID" in h or len(h) > 1


def test_run_refuses_an_existing_product_before_any_work(obs, tmp_path, capsys):
    out = tmp_path / "maps.fits"
    out.write_bytes(b"old")
    t0 = time.perf_counter()
    code, err, _ = run_cli(capsys, ["run", obs.cube_path, "-o", out, "--no-progress"])
    assert code == 2 and "--overwrite" in err
    assert time.perf_counter() - t0 < 20  # refused before reading the cube
    assert out.read_bytes() == b"old"
    # --plot: an existing PNG is refused the same way
    out.unlink()
    out.with_suffix(".png").write_bytes(b"old png")
    code, err, _ = run_cli(capsys, ["run", obs.cube_path, "-o", out, "--plot",
                                    "--no-progress"])
    assert code == 2 and "maps.png already exists" in err


def test_second_run_to_the_same_output_refuses_while_the_first_holds_it(obs, tmp_path,
                                                                        capsys):
    out = tmp_path / "prep.fits"
    with output_lock(out) as lock:
        assert lock.exists()
        code, err, _ = run_cli(capsys, prepare_argv(obs, out))
        assert code == 2
        assert re.search(r"another cubesfh run \(.*:\d+\) is writing .*prep\.fits", err), err
        assert not out.exists()
    assert not lock.exists()


def test_lock_left_by_a_killed_run_does_not_block(obs, tmp_path, capsys):
    """A lock file whose process is gone (killed) holds no lock: the next run goes on."""
    import socket

    out = tmp_path / "prep.fits"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / ".prep.fits.lock").write_text(f"{socket.gethostname()}:{int(proc.stdout)}")
    code, err, _ = run_cli(capsys, prepare_argv(obs, out))
    assert code == 0, err
    assert out.exists() and not (tmp_path / ".prep.fits.lock").exists()


def test_lock_held_by_another_process_refuses(obs, tmp_path, capsys):
    out = tmp_path / "prep.fits"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cubesfh.utils._io import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err, _ = run_cli(capsys, prepare_argv(obs, out))
        assert code == 2
        assert re.search(rf"another cubesfh run \(.*:{holder.pid}\) is writing", err), err
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the kernel released the killed holder's lock: the run goes on
    code, err, _ = run_cli(capsys, prepare_argv(obs, out))
    assert code == 0, err


# ------------------------------------------------------------------ STAT as sigma

def _sigma_stat_copy(obs, path, *, hduclas3):
    with fits.open(obs.cube_path) as h:
        h["STAT"].data = np.sqrt(h["STAT"].data)
        h["STAT"].header["BUNIT"] = h["DATA"].header["BUNIT"]
        if hduclas3 is None:
            h["STAT"].header.remove("HDUCLAS3", ignore_missing=True)
        else:
            h["STAT"].header["HDUCLAS3"] = hduclas3
        h.writeto(path)
    return path


def test_stat_marked_rmse_is_squared(obs, tmp_path):
    path = _sigma_stat_copy(obs, tmp_path / "rmse.fits", hduclas3="RMSE")
    reference = Cube.read(obs.cube_path)
    cube = Cube.read(path)
    np.testing.assert_allclose(cube._read("variance"), reference._read("variance"),
                               rtol=1e-6)
    # the same S/N, hence the same binning, as the original cube
    from cubesfh.binning import voronoi_bin

    a = voronoi_bin(reference, target_snr=20, progress_bar=False)
    b = voronoi_bin(cube, target_snr=20, progress_bar=False)
    assert a.n_bins == b.n_bins
    np.testing.assert_allclose(a.snr, b.snr, rtol=1e-4)


def test_stat_holding_sigma_without_keyword_warns(obs, tmp_path):
    path = _sigma_stat_copy(obs, tmp_path / "sigma.fits", hduclas3=None)
    with pytest.warns(CubeSFHWarning, match=r"STAT looks like 1-sigma errors, not variances.*"
                                            r"set HDUCLAS3 = 'RMSE'"):
        Cube.read(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Cube.read(obs.cube_path)  # a true variance gives no warning


# ------------------------------------------------------------------ mirrored WCS

def test_mirrored_hst_wcs_is_refused(obs, tmp_path):
    from cubesfh.hst import check_parity

    path = tmp_path / "mirrored_f555w.fits"
    with fits.open(obs.hst_paths["F555W"]) as h:
        for hdu in h:  # the x axis of the WCS flipped (CDELT1 or CD1_1/CD2_1 sign)
            if "CDELT1" in hdu.header:
                hdu.header["CDELT1"] = -hdu.header["CDELT1"]
            if "CD1_1" in hdu.header:
                hdu.header["CD1_1"] = -hdu.header["CD1_1"]
                hdu.header["CD2_1"] = -hdu.header.get("CD2_1", 0.0)
        h.writeto(path)
    image = HSTImage.read(path)
    cube = Cube.read(obs.cube_path)
    with pytest.raises(CubeSFHError, match=r"is mirrored with respect to the cube's.*CD1_1"):
        check_parity(cube.celestial_wcs, {"F555W": image})
    check_parity(cube.celestial_wcs, {"F555W": HSTImage.read(obs.hst_paths["F555W"])})
    from cubesfh.preprocess import prepare_observation

    with pytest.raises(CubeSFHError, match="mirrored"):
        prepare_observation(cube, {"F555W": image}, redshift=REDSHIFT, progress_bar=False)


# ------------------------------------------------------------------ over-subtracted sky

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A 30 x 30 example: its HST images cover a 14 x 14 cut of the cube with margin."""
    return make_example_observation(tmp_path_factory.mktemp("wide"), seed=0)


def _oversubtracted(obs, path, fraction):
    """A sky of ``fraction`` x the 10th-percentile continuum of the cut subtracted."""
    with fits.open(obs.cube_path) as h:
        d = h["DATA"].data
        level = np.nanpercentile(np.nanmedian(d[:, :14, :14], axis=0), 10)
        h["DATA"].data = (d - fraction * level).astype(np.float32)
        h.writeto(path)
    return path


@pytest.mark.parametrize("fraction, expect_flagged", [(0.0, False), (0.5, True)])
def test_oversubtracted_sky_flags_the_faint_bins(wide, tmp_path, fraction, expect_flagged):
    from cubesfh.preprocess import prepare_observation

    cube = Cube.read(_oversubtracted(wide, tmp_path / "sky.fits", fraction))[:, :14, :14]
    hst = {b: HSTImage.read(wide.hst_paths[b]) for b in ("F555W", "F814W")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not covered by the", category=CubeSFHWarning)
        prepared = prepare_observation(cube, hst, target_snr=30, redshift=REDSHIFT,
                                       progress_bar=False)
    flagged = (prepared.flags & BinFlag.SKY_SUSPECT) != 0
    if expect_flagged:
        assert flagged.sum() >= 3
        # the flagged bins are the faint ones
        norm = prepared.spectra.norm.value
        assert np.median(norm[flagged]) < np.median(norm[~flagged])
    else:
        assert not flagged.any()


def test_negative_continuum_detector():
    from cubesfh.preprocess import _negative_continuum

    rng = np.random.default_rng(1)
    flux = 1.0 + 0.1 * rng.standard_normal((3, 1761))
    flux[1, 1500:] -= 1.3  # the red end pushed below zero (a sky subtracted in excess)
    flux[2, 200:210] = -5.0  # a 10-pixel artefact: not a continuum
    np.testing.assert_array_equal(_negative_continuum(flux), [False, True, False])


# ------------------------------------------------------------------ the command line

def test_version(capsys):
    from cubesfh import __version__

    with pytest.raises(SystemExit) as excinfo:
        cli_main(["--version"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.strip() == f"cubesfh {__version__}"


def test_cube_after_the_hst_list_is_the_cube(obs, tmp_path, capsys):
    out = tmp_path / "prep.fits"
    argv = ["prepare", "--hst", f"F555W={obs.hst_paths['F555W']}", obs.cube_path, "-o", out,
            "--kinematics", obs.kin, "--redshift", REDSHIFT, "--target-snr", 60,
            "--no-progress"]
    code, err, _ = run_cli(capsys, argv)
    assert code == 0, err
    assert out.exists()


def test_missing_cube_is_named(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli_main(["run", "--hst", "F555W=f.fits", "-o", "m.fits"])
    assert excinfo.value.code == 2
    assert "the MUSE cube is missing" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--psf-fwhm", "0"), ("--psf-fwhm", "-1"),
                                           ("--psf-fwhm", "nan"), ("--max-memory", "0"),
                                           ("--max-offset", "0")])
def test_zero_or_negative_option_is_refused(option, value, capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli_main(["run", "cube.fits", "-o", "m.fits", option, value])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert f"{option} must be a positive number" in err and repr(value) in err


@pytest.mark.parametrize("text, expected", [
    ("pass correct=False to skip the registration", "pass --no-register to skip"),
    ("pass overwrite=True (or --overwrite) to replace it", "pass --overwrite to replace it"),
    ("lower min_snr= or raise target_snr=", "lower --min-snr  or raise --target-snr "),
    ("Lower target_snr to at most 497", "Lower --target-snr to at most 497"),
    ("lower min_snr or pass min_snr=None.", "lower --min-snr or pass --min-snr 0."),
    ("ebv_galactic=nan is not", "--ebv nan is not"),
    ("the redshift is wrong", "the redshift is wrong"),
    ("f.fits has no BUNIT; pass unit= (e.g. 'electron/s')",
     "f.fits has no BUNIT; add a BUNIT keyword to the image header (e.g. 'electron/s')"),
    ("says F814W; using F275W (force_band=True)", "says F814W; using F275W (--force-band)"),
    ("or force_band=True (--force-band) if the header", "or --force-band if the header"),
    ("PHOTFLAM keyword: supply photflam= (erg / (s cm2 AA)",
     "PHOTFLAM keyword: add a PHOTFLAM keyword to the image header (erg / (s cm2 AA)"),
    ("but PHOTPLAM is missing; supply photplam= (Angstrom)",
     "but PHOTPLAM is missing; add a PHOTPLAM keyword to the image header (Angstrom)"),
    ("several filters (F555W, F814W); pass band= to say which",
     "several filters (F555W, F814W); give the band as --hst BAND=PATH to say which"),
])
def test_messages_use_the_command_line_spelling(text, expected):
    assert expected in _cli_spelling(text)


@pytest.mark.parametrize("code, hint", [
    (errno.ENOSPC, "no space left on device; free some space or write to another disk."),
    (errno.EACCES, "permission denied; check the permissions or choose another location."),
    (errno.EROFS, "read-only file system; the file system is read-only"),
    (errno.ENOENT, "no such file or directory; check the path."),
])
def test_file_system_errors_in_plain_words(code, hint):
    exc = OSError(code, os.strerror(code), "/data/maps.fits")
    text = describe_os_error(exc)
    assert text.startswith("/data/maps.fits: ")
    assert hint in text.lower()
    assert "[Errno" not in text


def test_registration_failure_suggests_no_register(wide, tmp_path, capsys):
    # an F555W image 1 arcsec off, more than --max-offset 0.5: registration stops the run
    path = _shifted(wide.hst_paths["F555W"], tmp_path / "off_f555w.fits", ddec_arcsec=1.0)
    code, err, _ = run_cli(capsys, ["run", wide.cube_path, "--hst", f"F555W={path}", "-o",
                                    tmp_path / "m.fits", "--max-offset", 0.5,
                                    "--redshift", REDSHIFT, "--no-progress"])
    assert code == 2
    assert re.search(r"offset from the MUSE cube by .* more than --max-offset 0\.5", err), err
    assert err.endswith("(or run with --no-register to skip the MUSE-HST registration)"), err


def test_sigterm_exits_143_with_a_message(obs, tmp_path):
    out = tmp_path / "m.fits"
    proc = subprocess.Popen([sys.executable, "-m", "cubesfh.cli", "run", str(obs.cube_path),
                             "-o", str(out), "--no-progress", "--no-register"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # inside the work (imports, reading, binning)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM); outputs are written atomically" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not (tmp_path / ".m.fits.lock").exists()


def test_manifest_with_a_byte_order_mark(obs, tmp_path):
    from cubesfh.survey import read_manifest

    path = tmp_path / "survey.csv"
    path.write_bytes("\ufeffname,cube,F555W\n".encode()
                     + f"gal,{obs.cube_path},{obs.hst_paths['F555W']}\n".encode())
    entries = read_manifest(path)
    assert [e.name for e in entries] == ["gal"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"name,cube\nM\xfcnchen,c.fits\n")
    with pytest.raises(CubeSFHError, match="is not UTF-8 text.*CSV UTF-8"):
        read_manifest(latin)


# ------------------------------------------------------------------ provenance

def test_provenance_has_one_entry_per_input_file_with_its_sha256(obs, tmp_path, capsys):
    import hashlib

    out = tmp_path / "m.fits"
    code, err, _ = run_cli(capsys, ["run", obs.cube_path, "--hst",
                                    f"F555W={obs.hst_paths['F555W']}",
                                    f"F814W={obs.hst_paths['F814W']}", "-o", out,
                                    "--kinematics", obs.kin, "--redshift", REDSHIFT,
                                    "--target-snr", 60, "--no-register", "--no-progress"])
    assert code == 0, err
    h = fits.getheader(out)
    files = {h[f"INFILE{i}"]: i for i in range(1, 10) if f"INFILE{i}" in h}
    expected = [obs.cube_path, obs.hst_paths["F555W"], obs.hst_paths["F814W"]]
    assert sorted(files) == sorted(p.name for p in expected)
    for path, role in zip(expected, ("cube", "F555W", "F814W")):
        i = files[path.name]
        assert h[f"INSHA{i}"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert h[f"INHASH{i}"] == "whole file"
        assert h[f"INROLE{i}"] == role
    for key in ("SCPY_VER", "MPL_VER"):
        assert h[key] not in ("unknown", "not installed", "")


# ------------------------------------------------------------------ registration per band

def _shifted(path, out, *, ddec_arcsec=0.0, nan_left=0.0):
    with fits.open(path) as h:
        sci = h["SCI"].data
        if ddec_arcsec:
            h["SCI"].header["CRVAL2"] += ddec_arcsec / 3600.0
        if nan_left:
            sci[:, : int(sci.shape[1] * nan_left)] = np.nan
        h.writeto(out)
    return out


def test_one_misregistered_band_gets_its_own_offset(wide, tmp_path):
    """F275W 1 arcsec off, the others right: F275W is corrected by 1", the others not."""
    from cubesfh.registration import register

    cube = Cube.read(wide.cube_path)
    images = {b: HSTImage.read(p) for b, p in wide.hst_paths.items()}
    images["F275W"] = HSTImage.read(_shifted(wide.hst_paths["F275W"], tmp_path / "f275w.fits",
                                             ddec_arcsec=1.0))
    out, report = register(cube, images)
    off = report.offsets
    assert off["F275W"].dec.to_value("arcsec") == pytest.approx(1.0, abs=0.03)
    assert off["F275W"].band == "HST F336W"
    for band in ("F336W", "F438W", "F555W", "F814W"):
        assert abs(off[band].dec.to_value("arcsec")) < 0.03, band
        assert abs(off[band].ra.to_value("arcsec")) < 0.03, band
    assert off["F555W"].band == "F555W"  # the cube's synthetic image
    assert all(report.applied.values())
    cards = {c[0]: c[1] for c in report.to_header_cards()}
    assert cards["RDDF275"] == pytest.approx(1.0, abs=0.03)
    assert cards["RRFF275"] == "F275W/HST F336W" and cards["RAPF275"] is True
    # the corrected F275W now sits on the cube: its WCS moved by the offset
    before = images["F275W"].wcs.pixel_to_world(50, 50)
    after = out["F275W"].wcs.pixel_to_world(50, 50)
    assert (after.dec - before.dec).to_value("arcsec") == pytest.approx(-1.0, abs=0.03)
    assert out["F336W"] is not images["F336W"]  # corrected by its own (~0) offset
    # the visit rule of earlier versions gave every band F555W's offset
    _, old = register(cube, images, per="visit")
    assert abs(old.offsets["F275W"].dec.to_value("arcsec")) < 0.03


def test_reference_band_without_data_over_half_the_field_is_refused_alone(wide, tmp_path):
    """F555W empty over half of the cube: its offset is refused, the others are measured."""
    from cubesfh.registration import register

    cube = Cube.read(wide.cube_path)
    images = {b: HSTImage.read(p) for b, p in wide.hst_paths.items()}
    images["F555W"] = HSTImage.read(_shifted(wide.hst_paths["F555W"], tmp_path / "f555w.fits",
                                             nan_left=0.5))
    with pytest.warns(CubeSFHWarning, match=r"offset of the F555W image is not measured and "
                                            r"not corrected: .*overlaps too little"):
        out, report = register(cube, images)
    assert "F555W" not in report.offsets and "F555W" in report.problems
    assert out["F555W"] is images["F555W"]
    for band in ("F275W", "F336W", "F438W", "F814W"):
        o = report.offsets[band]
        assert o.separation.to_value("arcsec") < 0.05, band
    assert report.offsets["F438W"].band == "F555W"  # the cube's image, not the empty one
    assert "F555W: offset not measured" in report.summary()


def test_quick_look_labels_are_plain(obs, tmp_path):
    """Issue 20: the quick-look colour bars read 'dex(yr)' and 'S/N per A'."""
    from cubesfh.maps import StellarPopulationMaps
    from cubesfh.pipeline import run_pipeline

    cube = Cube.read(obs.cube_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CubeSFHWarning)
        maps = run_pipeline(cube, None, kinematics=str(obs.kin), redshift=REDSHIFT,
                            target_snr=60, progress_bar=False)
    path = maps.write(tmp_path / "m.fits")
    fig = StellarPopulationMaps.read(path).plot()
    texts = [t.get_text() for ax in fig.axes for t in (ax.title, ax.yaxis.label, ax.xaxis.label)]
    assert "log(age/yr)" in texts and "dex" in texts
    assert "S/N per Å" in texts
    assert not any("dex(yr)" in t or "per A" in t.replace("per Å", "") for t in texts)


def test_per_band_offsets_are_relative_to_the_cube_without_correction(wide, tmp_path):
    """correct=False: F438W (measured against F555W) still reports HST - MUSE."""
    from cubesfh.registration import register

    cube = Cube.read(wide.cube_path)
    images = {b: HSTImage.read(wide.hst_paths[b]) for b in ("F438W", "F555W")}
    for band in images:  # both 0.5 arcsec off (shared astrometry)
        images[band] = HSTImage.read(_shifted(wide.hst_paths[band], tmp_path / f"{band}.fits",
                                              ddec_arcsec=0.5))
    out, report = register(cube, images, correct=False)
    assert out["F438W"] is images["F438W"]
    for band in images:
        assert report.offsets[band].dec.to_value("arcsec") == pytest.approx(0.5, abs=0.03)
    assert report.offsets["F438W"].band == "HST F555W"
    assert not any(report.applied.values())
