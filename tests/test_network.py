# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of the CNN: bundled weights, predictions with known answers, training end to end."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from cubesfh.network import DEFAULT_MODEL, SFHModel, export_model, train
from cubesfh.synthesis import ForwardModel
from cubesfh.synthesis.trainingset import make_training_set
from cubesfh.utils import CubeSFHError


@pytest.fixture(scope="module")
def model():
    return SFHModel.load()


@pytest.fixture(scope="module")
def fm():
    return ForwardModel()


def _observe(fm, mass, zval, *, snr=50.0, seed=0, tau_ism=0.3, tau_bc=1.0):
    """Normalised noisy spectrum and photometry of one population mix, and its truth."""
    na = fm.library.n_age
    mass = np.asarray(mass, float)[None, :]
    z = np.full((1, na), zval)
    spec, phot = fm.synthesize(mass, z, np.array([tau_ism]), np.array([tau_bc]))
    spec, phot, _ = fm.normalize(spec, phot)
    noisy, phot_n, _ = fm.add_noise(np.random.default_rng(seed), spec, phot, snr)
    return noisy, phot_n, fm.labels(mass, z)


def test_import_does_not_load_torch():
    code = "import cubesfh, cubesfh.network, cubesfh.preprocess; import sys; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bundled_model_metadata(model):
    assert DEFAULT_MODEL.with_suffix(".pt").stat().st_size < 5e6
    meta = model.meta
    assert meta["inputs"]["n_pixels"] == 1761
    assert meta["inputs"]["bands"] == ["F275W", "F336W", "F438W", "F555W", "F814W"]
    assert meta["template_library"]["source"].startswith("bagpipes")
    assert meta["training"]["n_train"] >= 100_000
    assert len(meta["history"]) >= 1
    assert len(model.model_id) == 12


def test_prediction_constraints(model, fm):
    rng = np.random.default_rng(1)
    from cubesfh.synthesis.trainingset import simulate_samples

    out = simulate_samples(rng, np.zeros(64, int), fm)
    res = model.predict(out["spectra"], out["photometry"])
    assert res["mass_fraction"].shape == (64, 16)
    assert res["metallicity"].shape == (64, 16)
    assert np.all(res["mass_fraction"] >= 0)
    np.testing.assert_allclose(res["mass_fraction"].sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(np.isfinite(res["logage_lw"]))
    # missing bands and spectrum-only inputs work
    phot = out["photometry"].copy()
    phot[:, 0] = np.nan
    assert np.all(np.isfinite(model.predict(out["spectra"], phot)["zh_mw"]))
    assert np.all(np.isfinite(model.predict(out["spectra"])["zh_mw"]))


def test_old_population_comes_out_old(model, fm):
    mass = np.zeros(fm.library.n_age)
    mass[fm.library.age_bin >= 14] = 1.0  # 7-18 Gyr
    spec, phot, truth = _observe(fm, mass, 0.02)
    res = model.predict(spec, phot)
    assert truth["logage_mw"][0] > 9.9
    assert res["logage_mw"][0] > 9.7
    assert res["logage_lw"][0] > 9.6
    assert abs(res["logage_mw"][0] - truth["logage_mw"][0]) < 0.25
    assert abs(res["zh_mw"][0] - truth["zh_mw"][0]) < 0.15


def test_young_burst_comes_out_young(model, fm):
    mass = np.zeros(fm.library.n_age)
    mass[fm.library.age_bin >= 14] = 0.9 / np.count_nonzero(fm.library.age_bin >= 14)
    young = (fm.library.age_bin >= 1) & (fm.library.age_bin <= 3)
    mass[young] = 0.1 / np.count_nonzero(young)  # 10 % by mass at 12-93 Myr
    spec, phot, truth = _observe(fm, mass, 0.02, seed=3)
    res = model.predict(spec, phot)
    assert truth["logage_lw"][0] < 8.5
    assert res["logage_lw"][0] < 8.7
    assert abs(res["logage_lw"][0] - truth["logage_lw"][0]) < 0.35
    # the young bins carry mass
    assert res["mass_fraction"][0, :4].sum() > 0.02


def test_tampered_files_are_refused(tmp_path):
    stem = tmp_path / "m"
    shutil.copy(DEFAULT_MODEL.with_suffix(".pt"), stem.with_suffix(".pt"))
    shutil.copy(DEFAULT_MODEL.with_suffix(".json"), stem.with_suffix(".json"))
    assert SFHModel.load(stem.with_suffix(".pt")).model_id
    raw = bytearray(stem.with_suffix(".pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    stem.with_suffix(".pt").write_bytes(bytes(raw))
    with pytest.raises(CubeSFHError, match="weights were modified or corrupted"):
        SFHModel.load(stem.with_suffix(".pt"))
    shutil.copy(DEFAULT_MODEL.with_suffix(".pt"), stem.with_suffix(".pt"))
    meta = json.loads(stem.with_suffix(".json").read_text())
    meta["normalization"]["zh_offset"] = 0.5
    stem.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CubeSFHError, match="metadata was modified or corrupted"):
        SFHModel.load(stem.with_suffix(".pt"))
    with pytest.raises(CubeSFHError, match="not found"):
        SFHModel.load(tmp_path / "missing.pt")


def test_bad_input_shapes(model):
    with pytest.raises(CubeSFHError, match="1761"):
        model.predict(np.ones((2, 100)))
    with pytest.raises(CubeSFHError, match="photometry must have shape"):
        model.predict(np.ones((2, 1761)), np.ones((2, 3)))


def test_train_one_tiny_epoch_end_to_end(tmp_path):
    ts = tmp_path / "ts.h5"
    make_training_set(ts, n=400, seed=3, chunk_size=200, progress_bar=False)
    run = tmp_path / "run"
    hist = train(ts, run, seed=3, max_epochs=1, progress_bar=False, threads=1)
    assert len(hist) == 1 and np.isfinite(hist[0]["val_loss"])
    # resuming a finished run adds an epoch
    hist = train(ts, run, seed=3, max_epochs=2, progress_bar=False, threads=1)
    assert [h["epoch"] for h in hist] == [0, 1]
    w = export_model(run, tmp_path / "tiny")
    m = SFHModel.load(w)
    res = m.predict(np.ones((3, 1761)), np.ones((3, 5)))
    np.testing.assert_allclose(res["mass_fraction"].sum(axis=1), 1.0, rtol=1e-5)


def test_fine_tuning_starts_from_given_weights(tmp_path):
    import torch

    from cubesfh.network._train import widen_first_convolution

    ts = tmp_path / "ts.h5"
    make_training_set(ts, n=200, seed=4, chunk_size=200, progress_bar=False)
    run = tmp_path / "run"
    # with a zero learning rate the weights cannot move from the initial ones
    train(ts, run, seed=4, max_epochs=1, lr=0.0, progress_bar=False, threads=1,
          init_weights=DEFAULT_MODEL.with_suffix(".pt"))
    start = torch.load(DEFAULT_MODEL.with_suffix(".pt"), weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    # the bundled model carries uncertainty heads; training starts from its point network
    heads = ("sigma_head", "recon_head", "latent_")
    assert {k for k in start if not k.startswith(heads)} == set(best)
    # (weights of a network without the validity channel get it with zero weights)
    start = widen_first_convolution(start, best)
    for k in best:
        torch.testing.assert_close(best[k], start[k], rtol=0, atol=0)
    meta = json.loads((run / "train_meta.json").read_text())
    assert meta["init_weights"]["file"] == "sfhnet.pt"
    with pytest.raises(CubeSFHError, match="could not start from the weights"):
        train(ts, tmp_path / "bad", seed=4, max_epochs=1, progress_bar=False, threads=1,
              init_weights=ts)


def _reference_predict(model, spectra, photometry):
    """The plain forward of the torch module and the numpy post-processing of cubesfh 0.4."""
    import torch

    from cubesfh.network import noise_level
    from cubesfh.network._data import downsample_spectra, downsample_valid, photometry_features
    from cubesfh.network._predict import cumulative_fractions
    from cubesfh.network._uncertainty import continuum_pixels
    from cubesfh.populations import mean_quantities

    if model.handles_gaps:
        spec, valid = downsample_valid(spectra)
    else:
        spec = downsample_spectra(np.where(np.isfinite(spectra), spectra, 1.0))
        valid = np.ones_like(spec)
    x = (spec - model._spec_mean) / model._spec_std * valid
    logf, ok = photometry_features(photometry)
    p = np.where(ok > 0, (logf - model._phot_mean) / model._phot_std, 0.0).astype(np.float32)
    net = model._net
    with torch.no_grad():
        xt = torch.from_numpy(x)
        vt = torch.from_numpy(valid) if model.handles_gaps else None
        z = net.encode(xt, torch.from_numpy(p), torch.from_numpy(ok), vt)
        frac, zh = (t.numpy().astype(float) for t in net.decode(z))
        ls, recon, m2 = (t.numpy() for t in net.heads(z))
    out = {"mass_fraction": frac, "metallicity": zh, **mean_quantities(frac, zh),
           **cumulative_fractions(frac)}
    use = continuum_pixels(x.shape[1])[None, :] & (valid > 0)
    resid2 = ((x - recon) * model._spec_std) ** 2
    out["sigma_raw"] = np.exp(np.maximum(ls, np.log(1e-4)))
    out["ood_latent_raw"] = m2.astype(float)
    out["ood_recon_raw"] = (np.sqrt((resid2 * use).sum(axis=1) / use.sum(axis=1))
                            / noise_level(spec, valid if model.handles_gaps else None))
    model._apply_calibration(out)
    if model.has_physical_head:
        from cubesfh.network import physical_outputs

        out.update(physical_outputs(model.meta["physical_head"], z.numpy()))
    for k in ("sigma_raw", "ood_latent_raw", "ood_recon_raw"):
        out.pop(k)
    return out


def test_fast_inference_matches_plain_forward(model, fm):
    """The optimised CPU path (issue 12) gives the module's outputs to 1e-5, heads included."""
    import torch

    from cubesfh.synthesis.trainingset import simulate_samples

    out = simulate_samples(np.random.default_rng(12), np.zeros(300, int), fm)
    spec, phot = out["spectra"].copy(), out["photometry"].copy()
    spec[5, 100:110] = np.nan  # missing (validity channel) or set to 1 (older networks)
    phot[::7, 0] = np.nan  # missing bands
    phot[::11, 2] = -1.0
    assert model._fast_net() is not None  # the bundled models take the fast path
    ref = _reference_predict(model, spec, phot)
    threads = torch.get_num_threads()
    fast = model.predict(spec, phot, threads=1, batch_size=128, fill_gaps=False)
    assert torch.get_num_threads() == threads
    assert "ood_score" in fast and set(fast) == set(ref)
    for k in ref:
        assert fast[k].dtype == ref[k].dtype, k
        if k == "ood":
            # a flag: only scores within 1e-5 of the threshold could flip
            near = np.abs(ref["ood_score"] - 1.0) < 1e-4
            assert np.array_equal(fast[k][~near], ref[k][~near])
            continue
        np.testing.assert_allclose(fast[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    # the module path of predict (other devices, unusual modules) agrees as well
    module = model._run_downsampled(spec, phot, None, heads=True, full_resolution=True,
                                    backend="module")
    for k in ("mass_fraction", "metallicity", "logage_lw", "zh_mw"):
        np.testing.assert_allclose(module[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    point = model.predict(spec, phot, uncertainty=False, fill_gaps=False)
    np.testing.assert_allclose(point["logage_mw"], ref["logage_mw"], rtol=1e-5, atol=1e-5)
    assert "ood_score" not in point
