# Licensed under a 3-clause BSD style license - see LICENSE
"""
Per-spectrum uncertainties and the out-of-distribution score (post-hoc heads).

Design (the reasons are in :ref:`network-uncertainty`):

1. The point network (:func:`~cubesfh.network.train`) is trained first and
   frozen.
2. On the training split, with noise, band masks and (networks with the
   validity channel) spectral gaps drawn as in training, the frozen network
   gives its latent vectors and the residuals (truth minus prediction) of
   LW/MW log age, LW/MW [Z/H], of the 16 mass fractions and of the mass
   fractions younger than 0.1, 1 and 5 Gyr, computed exactly as
   :meth:`~cubesfh.network.SFHModel.predict` computes them.
3. ``sigma_head`` learns the scale of those residuals from the latent vector
   (Gaussian negative log-likelihood, a heteroscedastic error model), and
   ``recon_head`` learns to reconstruct the noise-free spectrum from it
   (mean squared error). Neither changes the point estimates.
4. Split-conformal calibration on the validation split: for every output
   the 68.27 % and 95.45 % quantiles of |residual| / sigma become the
   multipliers of sigma that give the 16-84 % and 2.3-97.7 % intervals, so
   that the intervals cover the truth at the nominal rates on data drawn like
   the training set (the guarantee of split conformal prediction); the
   largest multipliers over the groups of spectra (each training library;
   with and without gaps) are kept.
5. Out-of-distribution score: the squared Mahalanobis distance of the latent
   vector to the training latents and the reconstruction residual (rms of
   data minus reconstruction outside the emission lines, over a noise
   estimate from the spectrum itself),
   each divided by its 99.5th percentile on the validation split;
   ``ood_score`` is the larger of the two, > 1 is flagged.
"""

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..conventions import HST_BANDS, N_AGE_BINS
from ..utils import CubeSFHError, progress
from ._data import (  # noqa: F401 (re-exported: their home before 0.5)
    LINE_HALF_WIDTH,
    OOD_LINES,
    SUMMARY_KEYS,
    continuum_pixels,
    noise_level,
)
from ._predict import SFHModel, state_layout

__all__ = ["COVERAGE_LEVELS", "OOD_LINES", "OOD_QUANTILE", "SUMMARY_KEYS", "continuum_pixels",
           "fit_uncertainty", "noise_level", "recalibrate"]

log = logging.getLogger(__name__)

#: Central probabilities of the two calibrated intervals.
COVERAGE_LEVELS = (0.6827, 0.9545)
#: Validation quantile that sets each out-of-distribution threshold.
OOD_QUANTILE = 0.995
_SIGMA_FLOOR = 1e-4


def residual_targets(truth, pred, n_outputs=None):
    """
    Truth minus prediction of the outputs of the uncertainty head, ``(n, n_outputs)``.

    The four mean quantities, the 16 mass fractions and (23 outputs, 0.4)
    the cumulative fractions younger than 0.1, 1 and 5 Gyr.
    """
    from ._data import CUMULATIVE_KEYS, cumulative_fractions
    from ._model import N_SIGMA_OUTPUTS

    n_outputs = N_SIGMA_OUTPUTS if n_outputs is None else int(n_outputs)
    cols = [np.asarray(truth[k], float) - np.asarray(pred[k], float) for k in SUMMARY_KEYS]
    f_true = np.asarray(truth["mass_fraction"], float)
    f_pred = np.asarray(pred["mass_fraction"], float)
    out = np.column_stack(cols + [f_true - f_pred])
    if n_outputs > out.shape[1]:
        ct, cp = cumulative_fractions(f_true), cumulative_fractions(f_pred)
        out = np.column_stack([out] + [ct[k] - cp[k] for k in CUMULATIVE_KEYS])
    return out[:, :n_outputs]


def calibrate(residual, sigma, levels=COVERAGE_LEVELS):
    """
    Split-conformal multipliers: quantiles of |residual| / sigma per output.

    Returns
    -------
    k : `~numpy.ndarray`
        ``(len(levels), n_outputs)``.
    """
    u = np.abs(residual) / sigma
    n = u.shape[0]
    # finite-sample conformal quantile, ceil((n + 1) p) / n
    return np.stack([np.quantile(u, min(1.0, np.ceil((n + 1) * p) / n), axis=0)
                     for p in levels])


def fit_uncertainty(run_dir, training_set, *, seed=0, epochs=12, noise_draws=2,
                    batch_size=1024, lr=1e-3, band_dropout=0.4, threads=None,
                    max_samples=None, progress_bar=True):
    """
    Train the uncertainty and reconstruction heads of a trained network and calibrate them.

    Reads ``best.pt`` and ``normalization.json`` of a :func:`~cubesfh.network.train`
    run and writes ``best_unc.pt`` (the full network with heads and latent
    statistics) and ``uncertainty.json`` (conformal multipliers, OOD
    thresholds, validation coverage). Re-running replaces them (a few
    minutes on one CPU core).

    Parameters
    ----------
    run_dir : str or `~pathlib.Path`
        Output folder of the training run.
    training_set : str or `~pathlib.Path`
        The HDF5 training set of the run (same seed: same split).
    seed : int, optional
        Seed of the run (split) and of the noise draws.
    epochs : int, optional
        Passes over the cached latent vectors.
    noise_draws : int, optional
        Noise realisations of each training spectrum.
    batch_size, lr : int, float, optional
    band_dropout : float, optional
        Fraction of samples with randomly removed HST bands (as in training).
    threads : int, optional
        torch CPU threads.
    max_samples : int, optional
        Use only this many training samples (tests).
    progress_bar : bool, optional

    Returns
    -------
    info : dict
        The content of ``uncertainty.json``.
    """
    import torch

    from ._data import gap_masks
    from ._train import _band_mask, load_split

    run = Path(run_dir)
    if threads:
        torch.set_num_threads(int(threads))
    if not (run / "best.pt").exists():
        msg = f"{run} has no best.pt; train the network first ('cubesfh train')."
        raise CubeSFHError(msg)
    t_start = time.perf_counter()
    model = _run_model(run, "best.pt")
    gap_share = _gap_share(run)
    net = model._net

    tr = load_split(training_set, seed, which="train")
    va = load_split(training_set, seed, which="validation")
    if max_samples is not None:
        for d, m in ((tr, max_samples), (va, max(64, max_samples // 2))):
            for k in ("spectra", "photometry", "mass_fraction", "metallicity", "snr", "index",
                      "library"):
                if k in d:
                    d[k] = d[k][:m]
    from ..populations import mean_quantities

    truth_tr = {"mass_fraction": tr["mass_fraction"],
                **mean_quantities(tr["mass_fraction"], tr["metallicity"])}
    truth_va = {"mass_fraction": va["mass_fraction"],
                **mean_quantities(va["mass_fraction"], va["metallicity"])}

    # cached latents and residuals of the frozen network on noisy training inputs
    zs, rs, idx = [], [], []
    clean_std = (tr["spectra"] - model._spec_mean) / model._spec_std
    for draw in range(noise_draws):
        rng = np.random.default_rng([seed, 5000 + draw])
        spec = tr["spectra"]
        snr = rng.choice(tr["snr_values"], size=len(spec))
        sig = np.sqrt(np.clip(spec, 0, None) / (snr[:, None] ** 2 * 2.5))
        noisy = (spec + rng.standard_normal(spec.shape).astype(np.float32) * sig)
        phot = tr["photometry"] * (1 + tr["phot_error"]
                                   * rng.standard_normal((len(spec), len(HST_BANDS))))
        mask = _band_mask(rng, len(spec), band_dropout)
        valid = (gap_masks(rng, len(spec), n_pix=spec.shape[1], share=gap_share)
                 if model.handles_gaps else None)
        out = model._run_downsampled(noisy.astype(np.float32), phot.astype(np.float32),
                                     mask, valid=valid, latent=True, progress_bar=progress_bar)
        zs.append(out["latent"])
        rs.append(residual_targets(truth_tr, out, net.n_sigma))
        idx.append(np.arange(len(spec)))
        del noisy
    z_all = np.concatenate(zs).astype(np.float32)
    r_all = np.concatenate(rs).astype(np.float32)
    i_all = np.concatenate(idx)
    mean = z_all[: len(tr["spectra"])].mean(axis=0)
    cov = np.cov(z_all[: len(tr["spectra"])], rowvar=False)
    prec = np.linalg.inv(cov + 1e-6 * np.eye(cov.shape[0]) * np.trace(cov) / cov.shape[0])
    with torch.no_grad():
        net.latent_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        net.latent_precision.copy_(torch.from_numpy(prec.astype(np.float32)))

    # train the two heads on the cached latents
    params = list(net.sigma_head.parameters()) + list(net.recon_head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    zt = torch.from_numpy(z_all)
    rt = torch.from_numpy(r_all)
    ct = torch.from_numpy(clean_std.astype(np.float32))
    history = []
    net.sigma_head.train()
    net.recon_head.train()
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, 6000 + epoch])
        order = torch.from_numpy(rng.permutation(len(z_all)))
        tot_nll = tot_rec = 0.0
        steps = range(0, len(z_all), batch_size)
        for s in progress(steps, enabled=progress_bar, desc=f"heads {epoch}", unit="batch"):
            b = order[s:s + batch_size]
            log_sig, recon, _ = net.heads(zt[b])
            log_sig = torch.clamp(log_sig, min=np.log(_SIGMA_FLOOR))
            u = rt[b] / torch.exp(log_sig)
            # Gaussian negative log-likelihood of the residuals
            nll = (0.5 * u**2 + log_sig).mean()
            rec = ((recon - ct[torch.from_numpy(i_all[b.numpy()])]) ** 2).mean()
            loss = nll + rec
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot_nll += nll.item() * len(b)
            tot_rec += rec.item() * len(b)
        sched.step()
        history.append({"epoch": epoch, "nll": tot_nll / len(z_all),
                        "recon_mse": tot_rec / len(z_all)})
        log.info("heads epoch %d: nll %.4f recon %.4f", epoch, tot_nll / len(z_all),
                 tot_rec / len(z_all))
    net.eval()

    info = _calibrate(model, va, truth_va, seed, band_dropout, progress_bar, gap_share)
    info.update({"n_heads_train": int(len(z_all)), "noise_draws": int(noise_draws),
                 "epochs": int(epochs), "history": history,
                 "seconds": time.perf_counter() - t_start})
    torch.save(net.state_dict(), run / "best_unc.pt")
    (run / "uncertainty.json").write_text(json.dumps(info, indent=1))
    log.info("uncertainty heads: %.0f s; conformal k68 %s", info["seconds"],
             np.round(np.asarray(info["conformal_k"])[0, :4], 3))
    return info


def _gap_share(run):
    """The share of spectra with gaps the run was trained with (``train_meta.json``)."""
    from ._data import GAP_SHARE

    try:
        return float(json.loads((Path(run) / "train_meta.json").read_text())
                     .get("gap_share", GAP_SHARE))
    except (OSError, ValueError):
        return GAP_SHARE


def _calibrate(model, va, truth_va, seed, band_dropout, progress_bar, gap_share=None):
    """Split-conformal multipliers and OOD thresholds on the validation split."""
    from ._data import CUMULATIVE_KEYS, GAP_SHARE
    from ._train import _band_mask, validation_gap_masks

    rng = np.random.default_rng([seed, 99])
    v_mask = _band_mask(rng, len(va["spectra"]), band_dropout)
    valid = None
    if model.handles_gaps:
        valid = validation_gap_masks(seed, *va["spectra"].shape,
                                     GAP_SHARE if gap_share is None else gap_share)
    out = model._run_downsampled(va["spectra"], va["photometry"], v_mask, valid=valid,
                                 latent=True, heads=True, progress_bar=progress_bar)
    n_sigma = out["sigma_raw"].shape[1]
    res_va = residual_targets(truth_va, out, n_sigma)
    k = calibrate(res_va, out["sigma_raw"])
    # group-conditional (Mondrian) calibration: the multipliers of the group whose
    # spectra the network handles worst, so that the intervals hold for every training
    # library and for spectra with and without gaps, not only on their mixture
    groups = {}
    lib = va.get("library")
    if lib is not None and len(np.unique(lib)) > 1:
        names_lib = [x.decode() if isinstance(x, bytes) else str(x)
                     for x in va.get("attrs", {}).get("libraries", [])]
        for j in np.unique(lib):
            groups[names_lib[j] if j < len(names_lib) else str(j)] = lib == j
    if valid is not None:
        gapped = (valid == 0).any(axis=1)
        if 0 < gapped.sum() < len(gapped):
            groups["complete spectra"] = ~gapped
            groups["spectra with gaps"] = gapped
    per_group = {}
    for name, sel in groups.items():
        kj = calibrate(res_va[sel], out["sigma_raw"][sel])
        per_group[name] = kj.tolist()
        k = np.maximum(k, kj)
    names = list(SUMMARY_KEYS) + [f"mass_fraction_{i}" for i in range(N_AGE_BINS)]
    names += list(CUMULATIVE_KEYS)[:n_sigma - len(names)]
    return {
        "method": "post-hoc heteroscedastic heads on the frozen latent, split-conformal "
                  "calibration on the validation split (with model systematics and spectral "
                  "gaps; the largest multiplier over the training libraries and over "
                  "spectra with and without gaps), latent "
                  "Mahalanobis + reconstruction OOD score",
        "outputs": names,
        "levels": list(COVERAGE_LEVELS),
        "conformal_k": k.tolist(),
        "conformal_k_per_group": per_group,
        "ood_quantile": OOD_QUANTILE,
        "ood_threshold_latent": float(np.quantile(out["ood_latent_raw"], OOD_QUANTILE)),
        "ood_threshold_recon": float(np.quantile(out["ood_recon_raw"], OOD_QUANTILE)),
        "ood_recon_lines_masked": list(OOD_LINES),
        "n_calibration": int(len(res_va)),
    }


def recalibrate(run_dir, training_set, *, seed=0, band_dropout=0.4, progress_bar=True):
    """
    Redo the calibration step of `fit_uncertainty` with the heads it trained.

    Rewrites ``uncertainty.json`` (multipliers and OOD thresholds, from the
    validation split) without retraining the heads, e.g. after a change of the
    OOD score definition.

    Returns
    -------
    info : dict
    """

    from ..populations import mean_quantities
    from ._train import load_split

    run = Path(run_dir)
    old = json.loads((run / "uncertainty.json").read_text())
    model = _run_model(run, "best_unc.pt")
    va = load_split(training_set, seed, which="validation")
    truth_va = {"mass_fraction": va["mass_fraction"],
                **mean_quantities(va["mass_fraction"], va["metallicity"])}
    info = {**old, **_calibrate(model, va, truth_va, seed, band_dropout, progress_bar)}
    (run / "uncertainty.json").write_text(json.dumps(info, indent=1))
    return info


def _run_model(run, weights):
    """
    The network of a training run with uncertainty heads, in eval mode, as an `SFHModel`.

    ``best.pt`` (point network only: the heads start untrained) or ``best_unc.pt``.
    """
    import torch

    from ._model import SFHNet

    norm = json.loads((run / "normalization.json").read_text())
    state = torch.load(run / weights, map_location="cpu", weights_only=True)
    net = SFHNet(zh_offset=norm["zh_offset"], uncertainty=True, **state_layout(state))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("sigma_head", "recon_head", "latent_"))
                         for k in missing) or (missing and weights != "best.pt"):
        msg = f"{run / weights} is not an SFHNet state dict (missing {missing})."
        raise CubeSFHError(msg)
    net.eval()
    return SFHModel(net, {"normalization": norm, "inputs": {"n_pixels": 1761}})
