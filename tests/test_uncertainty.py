# Licensed under a 3-clause BSD style license - see LICENSE
"""Uncertainty heads, split-conformal calibration and the out-of-distribution score."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from cubesfh.network import SFHModel, export_model, fit_uncertainty, noise_level, train
from cubesfh.network._evaluate import coverage_statistics
from cubesfh.network._uncertainty import calibrate
from cubesfh.synthesis.trainingset import make_training_set


def test_noise_level_of_white_noise():
    rng = np.random.default_rng(0)
    spec = 1.0 + 0.05 * rng.standard_normal((20, 2000))
    est = noise_level(spec)
    np.testing.assert_allclose(est, 0.05, rtol=0.1)
    assert est.mean() == pytest.approx(0.05, rel=0.02)


def test_conformal_multipliers_known_answer():
    # residuals N(0, 2) with a predicted sigma of 1: the multipliers are 2 and 4
    rng = np.random.default_rng(1)
    r = 2.0 * rng.standard_normal((200_000, 3))
    k = calibrate(r, np.ones_like(r))
    np.testing.assert_allclose(k[0], 2.0, rtol=0.02)
    np.testing.assert_allclose(k[1], 2.0 * 2.0, rtol=0.02)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from cubesfh.network import DEFAULT_MODEL

    d = tmp_path_factory.mktemp("unc")
    ts = d / "ts.h5"
    make_training_set(ts, n=1200, seed=9, chunk_size=600, progress_bar=False,
                      libraries=("bc03",))
    train(ts, d / "run", seed=9, max_epochs=1, progress_bar=False,
          init_weights=DEFAULT_MODEL.with_suffix(".pt"))
    info = fit_uncertainty(d / "run", ts, seed=9, epochs=4, progress_bar=False)
    export_model(d / "run", d / "model")
    return SFHModel.load(d / "model.pt"), ts, info


def test_exported_model_has_calibrated_heads(tiny_model):
    model, _, info = tiny_model
    assert model.has_uncertainty
    assert model.meta["architecture"]["uncertainty"] is True
    assert model.meta["uncertainty"]["conformal_k"] == info["conformal_k"]
    assert json.loads(json.dumps(model.meta["uncertainty"]))["levels"] == [0.6827, 0.9545]


def test_intervals_and_coverage(tiny_model):
    import h5py

    from cubesfh.network._train import split_indices
    from cubesfh.populations import mean_quantities

    model, ts, _ = tiny_model
    with h5py.File(ts) as f:
        n = f["spectra"].shape[0]
        _, va, _ = split_indices(n, 9)
        spec, phot = f["spectra"][va], f["photometry"][va]
        mf, zh = f["mass_fraction"][va], f["metallicity"][va]
    out = model.predict(spec, phot)
    for q in ("logage_lw", "logage_mw", "zh_lw", "zh_mw"):
        assert np.all(out[f"{q}_p02"] <= out[f"{q}_p16"])
        assert np.all(out[f"{q}_p16"] <= out[q]) and np.all(out[q] <= out[f"{q}_p84"])
        assert np.all(out[f"{q}_p84"] <= out[f"{q}_p98"])
    assert np.all(out["mass_fraction_p16"] <= out["mass_fraction"] + 1e-12)
    truth = {"mass_fraction": mf, **mean_quantities(mf, zh)}
    cov = coverage_statistics(out, truth)
    # the validation split is the calibration set; the band masks differ from the
    # calibration's random ones, so coverage is near, not exactly at, nominal
    for q in ("logage_lw", "logage_mw", "zh_lw", "zh_mw"):
        assert 0.55 < cov[q]["cov68"] < 0.82
        assert 0.88 < cov[q]["cov95"] <= 1.0
    assert cov["ood_fraction"] < 0.05
    # uncertainty=False gives the point estimates only, unchanged
    plain = model.predict(spec, phot, uncertainty=False)
    assert "logage_lw_p16" not in plain
    np.testing.assert_allclose(plain["logage_lw"], out["logage_lw"])


@pytest.mark.xfail(strict=True, reason="0.4 networks: the reconstruction score flags a 10 % "
                   "ripple of 60 A period in 3 % of spectra (0.3: > 90 %); the training spectra "
                   "now carry inter-library differences of a few per cent that its threshold "
                   "accepts (docs/network.rst, Limits)")
def test_ood_fires_on_strong_residuals():
    # the bundled network on simulated spectra, with and without a 10 % sinusoidal
    # ripple (a bad flat field or sky subtraction) that no simulated galaxy has
    from cubesfh.synthesis import ForwardModel
    from cubesfh.synthesis.trainingset import simulate_samples

    model = SFHModel.load()
    assert model.has_uncertainty
    fm = ForwardModel()
    sim = simulate_samples(np.random.default_rng(4), np.zeros(300, int), fm, prior="broad",
                           noise=False)
    spec, phot = sim["spectra_noiseless"], sim["photometry_noiseless"]
    w = 4800 + 1.25 * np.arange(1761)
    bad = spec * (1 + 0.10 * np.sin(2 * np.pi * w / 60.0))
    rng = np.random.default_rng(3)
    noisy = bad + rng.standard_normal(bad.shape) * np.sqrt(bad) / (35 * np.sqrt(1.25))
    good = spec + rng.standard_normal(spec.shape) * np.sqrt(spec) / (35 * np.sqrt(1.25))
    s_bad = model.predict(noisy, phot)["ood_score"]
    s_good = model.predict(good, phot)["ood_score"]
    assert np.mean(s_bad > 1) > 0.9
    assert np.mean(s_good > 1) < 0.05


def test_evaluate_on_another_library(tiny_model):
    # the leave-one-library-out machinery, with a shipped training library as stand-in
    from cubesfh.network._evaluate import evaluate_heldout, heldout_to_rst
    from cubesfh.templates import load_library

    model, _, _ = tiny_model
    m = evaluate_heldout(load_library("m11_miles"), model, n=200, n_ppxf=0, low_snr=(5.0,),
                         progress_bar=False)
    assert m["n"] == 200 and m["library"] == "M11"
    for q in ("logage_lw", "zh_mw"):
        assert 0.0 <= m["coverage"][q]["cov68"] <= m["coverage"][q]["cov95"] <= 1.0
        assert m["cnn"][q]["n"] == 200
    assert "5.0" in m["low_snr"]
    text = heldout_to_rst(m)
    assert "M11/MILES" in text and "68 % interval" in text
