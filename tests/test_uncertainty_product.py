# Licensed under a 3-clause BSD style license - see LICENSE
"""Uncertainty extensions of the maps product: intervals, OOD score, CNN-pPXF significance."""

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import QTable
from astropy.wcs import WCS
from helpers import true_kinematics_file

from cubesfh.binning import VoronoiBins
from cubesfh.conventions import N_AGE_BINS
from cubesfh.flags import BinFlag
from cubesfh.maps import StellarPopulationMaps, decode_flags, disagreement
from cubesfh.preprocess import PreparedObservation

MEANS = ("logage_lw", "logage_mw", "zh_lw", "zh_mw")
MEAN_EXT = ("LOGAGE_LW", "LOGAGE_MW", "ZH_LW", "ZH_MW")
N = 4
SIG = 0.1  # half-width of every 68 % interval
COMBINED = np.hypot(SIG, SIG)
# CNN - pPXF of logage_lw per bin, in combined sigma: 3 -> DISAGREE, 1 -> not
N_SIGMA = np.array([3.0, 1.0, 0.0, -2.5])
OOD = np.array([0.5, 0.9, 2.0, 1.0])  # bin 2 is out of distribution (> 1 only)


def make_wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [2.5, 2.5]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    w.wcs.cunit = ["deg", "deg"]
    return w


def make_prepared():
    bin_map = np.zeros((4, 4), int)
    bin_map[:2, 2:] = 1
    bin_map[2:, :2] = 2
    bin_map[2:, 2:] = 3
    bins = VoronoiBins(bin_map, [5000.0, 5001.25] * u.AA, np.ones((N, 2)) * u.adu,
                       snr=np.full(N, 30.0), celestial_wcs=make_wcs())
    spectra = type("Spectra", (), {"norm": np.ones(N) * u.adu})()
    return PreparedObservation(bins=bins, kinematics=None, spectra=spectra, photometry=None,
                               photometry_normalized=np.ones((N, 5)),
                               flags=np.zeros(N, dtype=np.int32), meta={})


def cnn_results():
    out = {"mass_fraction": np.full((N, N_AGE_BINS), 1 / N_AGE_BINS),
           "metallicity": np.zeros((N, N_AGE_BINS))}
    for k in MEANS:
        value = np.full(N, 9.0 if k.startswith("logage") else -0.2)
        out[k] = value
        out[k + "_p16"], out[k + "_p84"] = value - SIG, value + SIG
        out[k + "_p02"], out[k + "_p98"] = value - 2 * SIG, value + 2 * SIG
        out[k + "_err"] = np.full(N, SIG)
    mf = out["mass_fraction"]
    out["mass_fraction_p16"], out["mass_fraction_p84"] = 0.5 * mf, 1.5 * mf
    out["mass_fraction_p02"], out["mass_fraction_p98"] = 0.1 * mf, 2.0 * mf
    out["ood_score"] = OOD.copy()
    out["ood_latent"], out["ood_recon"] = 0.7 * OOD, 0.3 * OOD
    out["ood"] = OOD > 1
    return out


def ppxf_results(with_sigma=True):
    cnn = cnn_results()
    t = QTable()
    t["mass_fraction"] = cnn["mass_fraction"]
    t["zh"] = cnn["metallicity"]
    for k in MEANS:
        t[k] = cnn[k] - (N_SIGMA * COMBINED if k == "logage_lw" else 0.0)
        if with_sigma:
            t[k + "_p16"], t[k + "_p84"] = t[k] - SIG, t[k] + SIG
    if with_sigma:
        t["mass_fraction_p16"] = 0.8 * t["mass_fraction"]
        t["mass_fraction_p84"] = 1.2 * t["mass_fraction"]
        t["n_mc"] = np.full(N, 10)
    return t


@pytest.fixture
def maps():
    return StellarPopulationMaps.from_results(make_prepared(), cnn_results(), ppxf_results())


def test_flag_bits_known_answer(maps):
    flags = np.asarray(maps.table["flag"])
    ood = (flags & BinFlag.OUT_OF_DISTRIBUTION) > 0
    np.testing.assert_array_equal(ood, [False, False, True, False])
    disagree = (flags & BinFlag.DISAGREE) > 0
    np.testing.assert_array_equal(disagree, [True, False, False, True])
    assert "OUT_OF_DISTRIBUTION" in decode_flags(flags[2])
    assert "DISAGREE" in decode_flags(flags[0])


def test_diff_sig_known_answer(maps):
    sig = maps["DIFF_LOGAGE_LW_SIG"]
    assert sig.unit == u.dimensionless_unscaled
    per_bin = sig.value[[0, 0, 2, 2], [0, 2, 0, 2]]
    np.testing.assert_allclose(per_bin, N_SIGMA, atol=1e-12)
    a = maps.table["cnn_logage_lw"].value
    b = maps.table["ppxf_logage_lw"].value
    np.testing.assert_allclose(disagreement(maps.table, ("logage_lw",)),
                               (a - b) / np.sqrt(SIG**2 + SIG**2))
    np.testing.assert_allclose(maps["DIFF_ZH_MW_SIG"].value, 0.0, atol=1e-12)


def test_ppxf_without_mc_uses_its_synthetic_scatter():
    from cubesfh.network import bundled_models

    maps = StellarPopulationMaps.from_results(make_prepared(), cnn_results(),
                                              ppxf_results(with_sigma=False))
    assert not maps.has_ppxf_uncertainty
    assert "PPXF_LOGAGE_LW_P16" not in maps.extension_names
    t = maps.table
    header = maps.to_hdulist()["DIFF_LOGAGE_LW_SIG"].header
    if "ppxf_logage_lw_err" in t.colnames and np.isfinite(t["ppxf_logage_lw_err"].value[0]):
        # known answer: pPXF's scatter on the bundled network's synthetic test set
        st = float(t["sigma_target"].value[0])
        model = [m for m in bundled_models() if m.sigma_target.value == st][0]
        err = model.meta["metrics"]["comparison"]["ppxf"]["logage_lw"]["scatter"]
        np.testing.assert_allclose(t["ppxf_logage_lw_err"].value[0], err)
        assert header["PPXFSIG"] == "SYNTH"
    else:  # no bundled metrics for this dispersion: the CNN sigma alone
        err = 0.0
        assert header["PPXFSIG"] == "NONE"
        assert "sigma is 0" in str(header["COMMENT"])
    np.testing.assert_allclose(maps["DIFF_LOGAGE_LW_SIG"].value[0, 0],
                               3 * COMBINED / np.hypot(SIG, err))


def test_extensions_wcs_units_and_round_trip(maps, tmp_path):
    names = maps.extension_names
    for ext in MEAN_EXT:
        for p in ("P16", "P84"):
            assert f"{ext}_{p}" in names and f"PPXF_{ext}_{p}" in names
        assert f"DIFF_{ext}_SIG" in names
    for ext in ("SFH_P16", "SFH_P84", "PPXF_SFH_P16", "PPXF_SFH_P84", "OOD_SCORE"):
        assert ext in names
    path = maps.write(tmp_path / "maps.fits")
    with fits.open(path) as h:
        ref = WCS(h["LOGAGE_LW"].header)
        for ext in MEAN_EXT:
            for name in (ext, f"{ext}_P16", f"{ext}_P84", f"PPXF_{ext}_P16"):
                hdr = h[name].header
                assert h[name].data.shape == (4, 4)
                assert hdr["BUNIT"] == h[ext].header["BUNIT"]
                np.testing.assert_allclose(WCS(hdr).wcs.crval, ref.wcs.crval)
                np.testing.assert_allclose(WCS(hdr).pixel_scale_matrix,
                                           ref.pixel_scale_matrix)
            lo, mid, hi = (h[n].data for n in (f"{ext}_P16", ext, f"{ext}_P84"))
            assert np.all(lo <= mid) and np.all(mid <= hi)
            assert h[f"DIFF_{ext}_SIG"].header["PPXFSIG"] == "MC"
        for name in ("SFH_P16", "SFH_P84"):
            assert h[name].data.shape == (N_AGE_BINS, 4, 4)
            assert h[name].header["CTYPE3"] == "AGEBIN"
        assert np.all(h["SFH_P16"].data <= h["SFH"].data)
        assert np.all(h["SFH"].data <= h["SFH_P84"].data)
        assert h["OOD_SCORE"].header["BUNIT"] == ""
        assert h["OOD_SCORE"].header["OODLIMIT"] == 1.0
        assert "percentile" in str(h["LOGAGE_LW_P16"].header["COMMENT"])
        cols = h["BINS"].columns.names
        for c in ("cnn_logage_lw_p16", "cnn_zh_mw_p98", "cnn_logage_mw_err", "cnn_ood_score",
                  "cnn_ood_latent", "cnn_ood_recon", "ppxf_zh_lw_p84",
                  "cnn_mass_fraction_p16", "ppxf_mass_fraction_p84", "ppxf_n_mc"):
            assert c in cols
        assert h["BINS"].columns["cnn_logage_lw_p16"].unit == h["BINS"].columns[
            "cnn_logage_lw"].unit
    back = StellarPopulationMaps.read(path)
    assert back.extension_names == names
    for name in names:
        np.testing.assert_allclose(np.asarray(back[name]), np.asarray(maps[name]),
                                   equal_nan=True)
        if hasattr(maps[name], "unit"):
            assert back[name].unit == maps[name].unit
    np.testing.assert_array_equal(back.table["flag"], maps.table["flag"])
    fig = back.plot(tmp_path / "quick.png")
    assert any(ax.get_title().startswith("OOD score") for ax in fig.axes)
    text = back.summary()
    assert "median width of the 68% intervals" in text
    assert "1 bins out of the training distribution" in text
    assert "2 bins where CNN and pPXF disagree" in text


def test_without_uncertainty_nothing_new(tmp_path):
    cnn = {k: v for k, v in cnn_results().items()
           if k in ("mass_fraction", "metallicity", *MEANS)}
    maps = StellarPopulationMaps.from_results(make_prepared(), cnn)
    assert not maps.has_uncertainty
    assert not any(n.endswith(("_P16", "_P84", "_SIG")) or n == "OOD_SCORE"
                   for n in maps.extension_names)
    assert not np.any(np.asarray(maps.table["flag"]) & (BinFlag.DISAGREE
                                                        | BinFlag.OUT_OF_DISTRIBUTION))


def test_ppxf_monte_carlo_interval():
    from cubesfh.baseline import BaselineTemplates, fit_populations
    from cubesfh.synthesis import ForwardModel

    model = ForwardModel()
    templates = BaselineTemplates(model)
    lib = model.library
    bm = lib.bin_matrix()
    mass = np.zeros((1, lib.n_age))
    for b, m in {14: 1.0, 3: 0.02}.items():
        mass[0, lib.age_bin == b] += m * bm[b, lib.age_bin == b]
    zz = np.full((1, lib.n_age), 0.02)
    spec, phot = model.synthesize(mass, zz, np.zeros(1), np.zeros(1), nebular=False)
    spec, phot, _ = model.normalize(spec, phot)
    var = np.clip(spec, 0, None) / (20.0**2 * 1.25)
    rng = np.random.default_rng(1)
    noisy = spec + rng.standard_normal(spec.shape) * np.sqrt(var)
    t = fit_populations(noisy, var, phot, templates=templates, n_mc=4, progress_bar=False)
    assert t["n_mc"][0] == 4
    for k in MEANS:
        assert t[k + "_p16"][0] < t[k + "_p84"][0]
    assert np.all(t["mass_fraction_p16"][0] <= t["mass_fraction_p84"][0])
    assert t.meta["n_mc"] == 4


# --------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def small_mock(tmp_path_factory):
    pytest.importorskip("torch")
    from cubesfh.synthesis import mock_observation

    d = tmp_path_factory.mktemp("mock_unc")
    obs = mock_observation(d, shape=(12, 12), seed=2, progress_bar=False)
    return obs, true_kinematics_file(obs.truth_path, d / "kin.fits")


def test_pipeline_with_uncertainty_heads(small_mock, model_with_heads, tmp_path):
    from cubesfh import Cube, HSTImage
    from cubesfh.pipeline import (
        UNCERTAINTY_KEYS,
        UNUSABLE,
        predict_bins,
        run_baseline,
        run_pipeline,
    )
    from cubesfh.preprocess import prepare_observation

    obs, kin = small_mock
    cube = Cube.read(obs.cube_path)
    hst = {b: HSTImage.read(p) for b, p in obs.hst_paths.items()}
    prepared = prepare_observation(cube, hst, target_snr=60, kinematics=kin,
                                   sigma_target=model_with_heads.sigma_target,
                                   progress_bar=False)
    out = predict_bins(prepared, model=model_with_heads)
    direct = model_with_heads.predict(prepared.spectra.flux, prepared.photometry_normalized)
    for k in (*UNCERTAINTY_KEYS, "mass_fraction_p16", "ood"):
        np.testing.assert_allclose(out[k], direct[k], rtol=1e-6)
    maps = run_pipeline(cube, hst, target_snr=60, kinematics=kin, model=model_with_heads,
                        progress_bar=False)
    assert maps.has_uncertainty and not maps.has_ppxf
    ok = np.isfinite(maps.table["cnn_logage_lw"].value)
    for k in MEANS:
        v = maps.table["cnn_" + k].value[ok]
        assert np.all(maps.table[f"cnn_{k}_p16"].value[ok] <= v)
        assert np.all(v <= maps.table[f"cnn_{k}_p84"].value[ok])
    ood = maps.table["cnn_ood_score"].value > 1
    np.testing.assert_array_equal((maps.table["flag"] & BinFlag.OUT_OF_DISTRIBUTION) > 0, ood)
    # pPXF with Monte Carlo on two bins only (the others marked unusable)
    keep = np.flatnonzero((prepared.flags & UNUSABLE) == 0)[:2]
    prepared.flags[np.setdiff1d(np.arange(prepared.n_bins), keep)] |= BinFlag.SPECTRUM_FAILED
    base = run_baseline(prepared, n_mc=2, scheduler="serial", progress_bar=False)
    assert np.all(base["n_mc"][keep] == 2)
    for k in MEANS:
        assert np.all(base[k + "_p16"][keep] <= base[k + "_p84"][keep])
        assert np.all(np.isnan(base[k + "_p16"][np.setdiff1d(np.arange(prepared.n_bins),
                                                             keep)]))
    both = StellarPopulationMaps.from_results(prepared, out, base)
    back = StellarPopulationMaps.read(both.write(tmp_path / "m.fits"))
    assert back.has_ppxf_uncertainty
    assert "PPXF_ZH_MW_P84" in back.extension_names
    assert "DIFF_ZH_MW_SIG" in back.extension_names
    sig = disagreement(back.table, ("zh_mw",))
    assert np.isfinite(sig[keep]).all()


def test_bundled_models_without_heads_give_no_uncertainty(small_mock):
    from cubesfh import Cube
    from cubesfh.network import bundled_models
    from cubesfh.pipeline import predict_bins
    from cubesfh.preprocess import prepare_observation

    models = [m for m in bundled_models() if not m.has_uncertainty]
    if not models:
        pytest.skip("the bundled models have uncertainty heads")
    obs, kin = small_mock
    prepared = prepare_observation(Cube.read(obs.cube_path), None, target_snr=60,
                                   kinematics=kin, sigma_target=models[0].sigma_target,
                                   progress_bar=False)
    out = predict_bins(prepared, model=models[0])
    assert "ood_score" not in out and "logage_lw_p16" not in out


def test_command_line_run_writes_uncertainty_maps(small_mock, model_with_heads, tmp_path,
                                                  capsys):
    from cubesfh.cli import main as cli_main

    obs, kin = small_mock
    out = tmp_path / "cli.fits"
    argv = ["run", str(obs.cube_path), "--kinematics", str(kin), "--target-snr", "60",
            "--model", str(model_with_heads.test_path), "--output", str(out),
            "--no-progress"]
    assert cli_main(argv) == 0
    assert "median width of the 68% intervals" in capsys.readouterr().out
    with fits.open(out) as h:
        for name in ("LOGAGE_LW_P16", "ZH_MW_P84", "SFH_P16", "SFH_P84", "OOD_SCORE"):
            assert name in h
