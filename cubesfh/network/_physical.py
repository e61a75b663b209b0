# Licensed under a 3-clause BSD style license - see LICENSE
"""
The attenuation head: stellar A_V and the uncertainty of the stellar mass, from the latent.

A small post-hoc network on the frozen 40-dimensional latent of a trained
`~cubesfh.network.SFHNet` (like the uncertainty heads), trained on spectra
of the broad simulator (:mod:`cubesfh.synthesis.trainingset`, with the model
systematics, spectral gaps and missing bands of the training) drawn afresh
with their own seed, and calibrated on another independent set. It gives:

* the effective V-band attenuation of the stellar light, ``av_stars`` =
  -2.5 log10(attenuated / dust-free stellar L_lambda at 5500 A), with a
  heteroscedastic scale calibrated by split-conformal multipliers;
* the scale of the error of log Sigma_star as the product estimates it
  (:func:`cubesfh.physical.physical_columns`: the template mass-to-light
  ratio of the predicted SFH and Z(t) times the dust-corrected V-band
  luminosity), calibrated the same way on that very estimator.

The head is a few thousand numbers kept in the model's JSON metadata
(``physical_head``) and evaluated with numpy; the network weights, and so
the model identifiers, do not change.
"""

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..utils import CubeSFHError, progress

__all__ = ["attach_metadata", "attach_physical_head", "fit_physical_head", "physical_outputs"]

log = logging.getLogger(__name__)

#: Layout version of the ``physical_head`` metadata.
PHYSICAL_HEAD_FORMAT = 1
_HIDDEN = 64


def _forward(head, latent):
    """Raw head outputs ``(n, 4)``: A_V, log sigma_AV, log M/L_V, log sigma_logML."""
    x = (np.asarray(latent, float) - np.asarray(head["latent_mean"])) / np.asarray(
        head["latent_std"])
    for i, layer in enumerate(head["layers"]):
        x = x @ np.asarray(layer["weight"]).T + np.asarray(layer["bias"])
        if i < len(head["layers"]) - 1:
            x = np.tanh(x)
    return x


def physical_outputs(head, latent):
    """
    Calibrated outputs of an attenuation head for latent vectors.

    Returns
    -------
    out : dict of `~numpy.ndarray`
        ``av_stars`` (mag) with ``_p16``/``_p84``/``_p02``/``_p98`` and
        ``_err`` (68 % half-width); ``log_ml_v_head`` (the head's own
        estimate of log M/L_V, for checks); ``logmstar_sd_err`` and
        ``logmstar_sd_err95`` (half-widths, dex, of the 68 and 95 %
        intervals of log Sigma_star).
    """
    raw = _forward(head, latent)
    k = np.asarray(head["conformal_k"], float)  # (2 levels, 2 outputs)
    s_av = np.exp(raw[:, 1])
    s_ml = np.exp(raw[:, 3])
    s_sd = np.sqrt(s_ml**2 + (0.4 * s_av) ** 2)
    av = raw[:, 0]
    out = {"av_stars": av, "log_ml_v_head": raw[:, 2]}
    out["av_stars_err"] = k[0, 0] * s_av
    for name, lev, sgn in (("p16", 0, -1), ("p84", 0, 1), ("p02", 1, -1), ("p98", 1, 1)):
        out[f"av_stars_{name}"] = av + sgn * k[lev, 0] * s_av
    out["logmstar_sd_err"] = k[0, 1] * s_sd
    out["logmstar_sd_err95"] = k[1, 1] * s_sd
    return out


def _simulate(model, n, seed, *, chunk=4000, progress_bar=True):
    """Network inputs and physical truths of ``n`` fresh spectra of the broad simulator."""
    from astropy import units as u

    from ..physical import L_V_SUN, v_window_flux
    from ..synthesis.trainingset import (
        DEFAULT_MIX,
        _family_plan,
        simulate_samples,
        training_models,
    )
    from ..templates import TRAINING_LIBRARIES
    from ._data import downsample_spectra

    names = list(TRAINING_LIBRARIES)
    models, systematics = training_models(model.sigma_target, names)
    plan = _family_plan(n, DEFAULT_MIX, seed)
    keep = ("photometry", "mass_fraction", "metallicity", "library", "norm", "log_mstar",
            "log_lv_intrinsic", "av_stars")
    parts = {k: [] for k in (*keep, "spectra", "v_flux")}
    for lo in progress(range(0, n, chunk), enabled=progress_bar, desc="attenuation set",
                       unit="chunk"):
        rng = np.random.default_rng([int(seed), 7, lo])
        out = simulate_samples(rng, plan[lo:lo + chunk], models, prior="broad",
                               systematics=systematics)
        parts["spectra"].append(downsample_spectra(out["spectra"]).astype(np.float32))
        parts["v_flux"].append(v_window_flux(out["spectra"]))
        for k in keep:
            parts[k].append(np.asarray(out[k]))
    data = {k: np.concatenate(v) for k, v in parts.items()}
    lv_sun = L_V_SUN.to_value(u.solLum / u.AA)
    data["log_ml_v"] = data["log_mstar"] - data["log_lv_intrinsic"] + np.log10(lv_sun)
    # what the product measures: the observed V-window luminosity (L_V,sun)
    data["log_lv_observed"] = np.log10(data["v_flux"] * data["norm"] / lv_sun)
    data["libraries"] = names
    return data


def _inputs(model, data, seed):
    """Latents and predictions, with the band dropout and gaps of the training."""
    from ._data import GAP_SHARE, gap_masks
    from ._train import _band_mask

    rng = np.random.default_rng([int(seed), 11])
    n = len(data["spectra"])
    mask = _band_mask(rng, n, 0.4)
    valid = (gap_masks(rng, n, n_pix=data["spectra"].shape[1], share=GAP_SHARE)
             if model.handles_gaps else None)
    out = model._run_downsampled(data["spectra"], data["photometry"], mask, valid=valid,
                                 latent=True)
    gapped = (np.zeros(n, bool) if valid is None else (valid == 0).any(axis=1))
    return out, gapped


def _estimator_residual(out, data, av_pred):
    """log Sigma_star of the product's estimator minus the truth (dex), per spectrum."""
    from ..physical import mass_to_light

    ml = mass_to_light(out["mass_fraction"], out["metallicity"])
    with np.errstate(divide="ignore", invalid="ignore"):
        log_m = np.log10(ml["ml_v"]) + data["log_lv_observed"] + 0.4 * av_pred
    return log_m - data["log_mstar"], np.log10(ml["ml_v"]) - data["log_ml_v"]


def fit_physical_head(model, *, n_train=40000, n_calibration=12000, seed=2026, epochs=60,
                      batch_size=512, lr=2e-3, threads=None, progress_bar=True):
    """
    Train and calibrate the attenuation head of a model (see the module notes).

    Parameters
    ----------
    model : `~cubesfh.network.SFHModel`
        A model with a validity channel or without; its network is frozen.
    n_train, n_calibration : int, optional
        Fresh simulated spectra for training and for the conformal step.
    seed : int, optional
        Seed of the simulated sets (a stream separate from the training set's).
    epochs, batch_size, lr : optional
        Optimisation of the head (Adam, Gaussian negative log-likelihood).
    threads : int, optional
        torch CPU threads.
    progress_bar : bool, optional

    Returns
    -------
    head : dict
        JSON-serialisable: weights, latent normalisation, conformal
        multipliers (68 and 95 %, for A_V and log Sigma_star; the largest
        over the training libraries and over spectra with and without gaps)
        and the calibration metrics.
    """
    import torch

    from ._uncertainty import COVERAGE_LEVELS, calibrate

    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    tr = _simulate(model, n_train, seed, progress_bar=progress_bar)
    ca = _simulate(model, n_calibration, seed + 1, progress_bar=progress_bar)
    out_tr, _ = _inputs(model, tr, seed)
    out_ca, gapped = _inputs(model, ca, seed + 1)
    z = out_tr["latent"].astype(float)
    mean, std = z.mean(axis=0), z.std(axis=0) + 1e-6
    x = torch.from_numpy(((z - mean) / std).astype(np.float32))
    y = torch.from_numpy(np.column_stack([tr["av_stars"], tr["log_ml_v"]]).astype(np.float32))
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(z.shape[1], _HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(_HIDDEN, _HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(_HIDDEN, 4))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in progress(range(epochs), enabled=progress_bar, desc="attenuation head",
                      unit="epoch"):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for s in range(0, len(x), batch_size):
            b = perm[s:s + batch_size]
            o = net(x[b])
            mu = o[:, [0, 2]]
            log_s = o[:, [1, 3]].clamp(-7, 3)
            loss = (0.5 * ((y[b] - mu) / log_s.exp()) ** 2 + log_s).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(b)
        sched.step()
        history.append(total / len(x))
    layers = [{"weight": m.weight.detach().numpy().tolist(),
               "bias": m.bias.detach().numpy().tolist()}
              for m in net if isinstance(m, torch.nn.Linear)]
    head = {"format": PHYSICAL_HEAD_FORMAT, "latent_mean": mean.tolist(),
            "latent_std": std.tolist(), "layers": layers,
            "conformal_k": [[1.0, 1.0], [2.0, 2.0]]}
    raw = _forward(head, out_ca["latent"])
    s_av = np.exp(raw[:, 1])
    s_sd = np.sqrt(np.exp(raw[:, 3]) ** 2 + (0.4 * s_av) ** 2)
    r_sd, r_ml = _estimator_residual(out_ca, ca, raw[:, 0])
    res = np.column_stack([raw[:, 0] - ca["av_stars"], r_sd])
    sig = np.column_stack([s_av, s_sd])
    ok = np.isfinite(res).all(axis=1) & np.isfinite(sig).all(axis=1)
    k = calibrate(res[ok], sig[ok])
    groups = {nm: ca["library"] == j for j, nm in enumerate(ca["libraries"])}
    groups.update({"complete spectra": ~gapped, "spectra with gaps": gapped})
    per_group = {}
    for name, sel in groups.items():
        sel = sel & ok
        if sel.sum() > 100:
            kj = calibrate(res[sel], sig[sel])
            per_group[name] = kj.tolist()
            k = np.maximum(k, kj)
    head["conformal_k"] = k.tolist()
    head["conformal_k_per_group"] = per_group

    def stats(r):
        r = r[np.isfinite(r)]
        return {"median": float(np.median(r)),
                "nmad": float(1.4826 * np.median(np.abs(r - np.median(r)))),
                "rms": float(np.sqrt(np.mean(r**2)))}

    head.update({
        "outputs": ["av_stars", "logmstar_sd"],
        "levels": list(COVERAGE_LEVELS),
        "method": "post-hoc MLP on the frozen latent (tanh, 2 x 64), Gaussian NLL on fresh "
                  "broad-simulator spectra with model systematics, gaps and band dropout; "
                  "split-conformal multipliers on an independent set, the largest over the "
                  "training libraries and spectra with and without gaps",
        "seed": int(seed), "n_train": int(n_train), "n_calibration": int(n_calibration),
        "epochs": int(epochs), "history": history,
        "calibration_metrics": {
            "av_stars": stats(res[:, 0]),
            "logmstar_sd": stats(r_sd),
            "log_ml_v_templates": stats(r_ml),
            "log_ml_v_head": stats(raw[:, 2] - ca["log_ml_v"]),
        },
        "seconds": float(time.perf_counter() - t0),
    })
    return head


def attach_metadata(stem, key, value):
    """
    Store a post-hoc calibration in a model's JSON metadata (and re-sign it).

    Parameters
    ----------
    stem : str or `~pathlib.Path`
        Model path without suffix (``.json`` beside the ``.pt``).
    key : str
        ``'physical_head'`` (`fit_physical_head`) or ``'fit_check'``
        (``scripts/calibrate_fit_check.py``).
    value : dict
        JSON-serialisable.
    """
    from ._predict import _meta_digest

    path = Path(stem).with_suffix(".json")
    meta = json.loads(path.read_text())
    if meta.get("meta_sha256") != _meta_digest(meta):
        msg = f"{path} does not match its checksum; export the model again first."
        raise CubeSFHError(msg)
    meta[key] = value
    meta["meta_sha256"] = _meta_digest(meta)
    path.write_text(json.dumps(meta, indent=1))
    return path


def attach_physical_head(stem, head):
    """Store an attenuation head (`fit_physical_head`) in a model's metadata."""
    return attach_metadata(stem, "physical_head", head)
