# Licensed under a 3-clause BSD style license - see LICENSE
"""
Training of the CNN on the synthetic training set (section 3.4), resumable.

* Split 70/20/10 (train/validation/test) by a permutation fixed by the seed.
* Mini-batches of 128, Adam, learning rate x0.8 after 5 epochs without
  validation improvement, best-validation weights kept, early stop after 20.
* Noise is re-drawn for every training batch from the noise-free spectra
  (Poisson-like, S/N per Angstrom drawn from the training values) and the HST
  fluxes get a 2 % relative error; validation uses the stored noisy spectra so
  that its loss is comparable between epochs.
* Random band masking: 40 % of the training samples lose a random subset of
  HST bands (each band with probability 1/2; all five in 1/8 of those), so the
  same network works with any subset of bands.
* Random spectral gaps (0.4): 30 % of the samples lose the MUSE AO notch,
  sky-line and telluric windows and random 20-200 A windows
  (:func:`~cubesfh.network._data.gap_masks`), which reach the network as
  missing pixels through its validity channel, never as filled-in values.
* A checkpoint is written after every epoch; ``train(..., resume=True)``
  continues from it. Shuffling and noise use generators seeded by
  (seed, epoch), so a resumed run is the same as an uninterrupted one.
"""

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from ..conventions import HST_BANDS
from ..utils import CubeSFHError, progress, sha256_file
from ._data import GAP_SHARE, downsample_spectra, gap_masks, photometry_features

__all__ = ["split_indices", "train", "widen_first_convolution"]

log = logging.getLogger(__name__)


def split_indices(n, seed, fractions=(0.7, 0.2, 0.1)):
    """
    Train / validation / test indices of a set of ``n`` samples.

    Parameters
    ----------
    n : int
    seed : int
    fractions : tuple of float

    Returns
    -------
    train, validation, test : `~numpy.ndarray`
        Sorted index arrays.
    """
    perm = np.random.default_rng([int(seed), 7]).permutation(n)
    n_tr = int(round(fractions[0] * n))
    n_va = int(round(fractions[1] * n))
    return (np.sort(perm[:n_tr]), np.sort(perm[n_tr:n_tr + n_va]),
            np.sort(perm[n_tr + n_va:]))


def _file_digest(path, nbytes=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(nbytes))
    h.update(str(os.path.getsize(path)).encode())
    return h.hexdigest()[:16]


def _read_rows(dset, idx, transform=None, block=8192):
    """Rows ``idx`` (sorted) of an HDF5 dataset, read in contiguous blocks (fast)."""
    out = []
    n = dset.shape[0]
    for s in range(0, n, block):
        lo, hi = np.searchsorted(idx, [s, min(n, s + block)])
        if hi == lo:
            continue
        rows = dset[s:min(n, s + block)][idx[lo:hi] - s]
        out.append(transform(rows) if transform else rows)
    return np.concatenate(out)


def load_split(path, seed, *, which="train"):
    """
    Arrays of one split of a training-set file (network inputs and labels).

    Returns a dict with ``spectra`` (2.5 A, noise-free for ``train``, the stored
    noisy ones otherwise), ``spectra_noisy``, ``photometry`` (noise-free for
    ``train``), ``mass_fraction``, ``metallicity``, ``snr`` and the index.
    """
    import h5py

    with h5py.File(path, "r") as f:
        if not f.attrs.get("complete", False):
            msg = (f"{path} is incomplete; finish it with 'cubesfh make-training-set' (same "
                   "arguments) before training.")
            raise CubeSFHError(msg)
        n = f["spectra"].shape[0]
        tr, va, te = split_indices(n, seed)
        idx = {"train": tr, "validation": va, "test": te}[which]
        out = {"index": idx}
        if which == "train":
            if "spectra_noiseless" not in f:
                msg = (f"{path} has no noise-free spectra (made with --no-noiseless); training "
                       "re-draws the noise and needs them.")
                raise CubeSFHError(msg)
            out["spectra"] = _read_rows(f["spectra_noiseless"], idx, downsample_spectra)
            out["photometry"] = _read_rows(f["photometry_noiseless"], idx).astype(np.float32)
        else:
            out["spectra"] = _read_rows(f["spectra"], idx, downsample_spectra)
            out["photometry"] = _read_rows(f["photometry"], idx).astype(np.float32)
        out["mass_fraction"] = _read_rows(f["mass_fraction"], idx).astype(np.float32)
        out["metallicity"] = _read_rows(f["metallicity"], idx).astype(np.float32)
        out["light_fraction"] = _read_rows(f["light_fraction"], idx).astype(np.float32)
        out["snr"] = f["snr"][:][idx]
        if "library" in f:  # broad simulator: index of the SSP library of each spectrum
            out["library"] = f["library"][:][idx].astype(int)
        out["snr_values"] = np.asarray(f.attrs["snr_values"], float)
        out["phot_error"] = float(f.attrs["phot_error"])
        out["attrs"] = {k: (v.tolist() if hasattr(v, "tolist") else v)
                        for k, v in f.attrs.items()}
    return out


def widen_first_convolution(state, own):
    """
    Give the 1-channel first convolution of old weights the validity channel of ``own``.

    The new channel's weights are zero, so the widened network computes what
    the old one did on complete spectra.
    """
    import torch

    key = "conv.0.conv.weight"
    if key in state and key in own and state[key].shape != own[key].shape:
        old = state[key]
        if old.shape[1] == 1 and own[key].shape[1] == 2 and old.shape[::2] == own[key].shape[::2]:
            state = dict(state)
            state[key] = torch.cat([old, torch.zeros_like(old)], dim=1)
    return state


def validation_gap_masks(seed, n, n_pix, share):
    """
    The fixed spectral gaps of the validation split (training loss and calibration).

    Drawn from their own stream of ``seed``, so that the calibration of the
    uncertainty heads sees exactly the gaps the training validated on.
    """
    return gap_masks(np.random.default_rng([seed, 98]), n, n_pix=n_pix, share=share)


def _band_mask(rng, n, p_drop=0.4):
    mask = np.ones((n, len(HST_BANDS)), dtype=np.float32)
    drop = rng.uniform(size=n) < p_drop
    k = int(drop.sum())
    sub = (rng.uniform(size=(k, len(HST_BANDS))) < 0.5).astype(np.float32)
    none = rng.uniform(size=k) < 0.125
    sub[none] = 1.0  # 1 = dropped
    mask[drop] = 1.0 - sub
    return mask


def _write_meta(out, training_set, seed, tr, n_tr, n_val, best, history, elapsed, device,
                threads, band_dropout, batch_size, lr, light_weight, init=None,
                gap_share=GAP_SHARE):
    meta = {"seed": int(seed), "training_set": str(Path(training_set).name),
            "training_set_digest": _file_digest(training_set),
            "training_set_attrs": {k: v for k, v in tr["attrs"].items()
                                   if isinstance(v, (int, float, str, list, bool))},
            "n_train": int(n_tr), "n_validation": int(n_val),
            "best_val_loss": best, "epochs": len(history), "train_seconds": elapsed,
            "device": device, "threads": int(threads), "band_dropout": band_dropout,
            "batch_size": batch_size, "lr": lr, "light_weight": light_weight,
            "init_weights": init, "mask_channel": True, "gap_share": gap_share}
    (out / "train_meta.json").write_text(json.dumps(meta, indent=1, default=str))


def train(training_set, output_dir, *, seed=0, max_epochs=200, batch_size=128, lr=1e-3,
          lr_factor=0.8, lr_patience=5, stop_patience=20, time_limit=None, band_dropout=0.4,
          light_weight=0.8, init_weights=None, gap_share=GAP_SHARE,
          device=None, threads=None, resume=True, max_samples=None, progress_bar=True):
    """
    Train the network and write its best weights, normalisation and history.

    Parameters
    ----------
    training_set : str or `~pathlib.Path`
        HDF5 file from :func:`~cubesfh.synthesis.trainingset.make_training_set`.
    output_dir : str or `~pathlib.Path`
        Folder for ``checkpoint.pt`` (resume state), ``best.pt``,
        ``normalization.json`` and ``history.json``.
    seed : int, optional
        Seed of the split, initial weights, shuffling and noise.
    max_epochs : int, optional
    batch_size : int, optional
    lr : float, optional
        Initial learning rate of Adam.
    lr_factor, lr_patience : float, int, optional
        Learning rate multiplied by ``lr_factor`` after ``lr_patience`` epochs
        without validation improvement.
    stop_patience : int, optional
        Stop after this many epochs without improvement.
    time_limit : float, optional
        Stop (after the current epoch) when this many seconds of training have
        elapsed in total, including earlier runs that were resumed.
    band_dropout : float, optional
        Fraction of training samples with randomly removed HST bands.
    light_weight : float, optional
        Weight of the V-band light-fraction term of the loss (0: the paper's
        loss only).
    init_weights : str or `~pathlib.Path`, optional
        Start from these weights (a ``.pt`` state dict of the same
        architecture, e.g. the bundled model) instead of a random
        initialisation: fine-tuning, used for the models at other velocity
        dispersions. Ignored when resuming from a checkpoint. Weights of a
        network without the validity channel (cubesfh <= 0.3) start it with
        zero weights on that channel, i.e. as the old network.
    gap_share : float, optional
        Fraction of training (and validation) spectra with random spectral
        gaps.
    device : str, optional
        ``'cuda'`` when available, else ``'cpu'``.
    threads : int, optional
        CPU threads for torch (default: all cores).
    resume : bool, optional
        Continue from ``checkpoint.pt`` if present.
    max_samples : int, optional
        Use only the first ``max_samples`` training samples (tests, quick runs).
    progress_bar : bool, optional

    Returns
    -------
    history : list of dict
        One entry per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``lr``,
        ``seconds``.
    """
    import torch

    from ._model import SFHNet, light_coefficients, log_cosh_loss

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(int(threads))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("training on %s", device)

    tr = load_split(training_set, seed, which="train")
    va = load_split(training_set, seed, which="validation")
    if max_samples is not None:
        keys = ("spectra", "photometry", "mass_fraction", "metallicity", "light_fraction", "snr",
                "index")
        for k in keys:
            tr[k] = tr[k][:max_samples]
        n_val = max(8, max_samples // 3)
        for k in keys:
            va[k] = va[k][:n_val]

    # normalisation statistics (from the noise-free training inputs)
    spec_mean = tr["spectra"].mean(axis=0)
    spec_std = tr["spectra"].std(axis=0) + 1e-3
    logp, _ = photometry_features(tr["photometry"])
    phot_mean = logp.mean(axis=0)
    phot_std = logp.std(axis=0) + 1e-3
    zh_offset = float(tr["metallicity"].mean())
    norm = {"spec_mean": spec_mean.tolist(), "spec_std": spec_std.tolist(),
            "phot_mean": phot_mean.tolist(), "phot_std": phot_std.tolist(),
            "zh_offset": zh_offset}

    torch.manual_seed(seed)
    net = SFHNet(n_pix=tr["spectra"].shape[1], zh_offset=zh_offset, mask_channel=True).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=lr_factor,
                                                       patience=lr_patience)
    history, best, since_best, start_epoch, elapsed = [], math.inf, 0, 0, 0.0
    ckpt = out / "checkpoint.pt"
    init = None
    if init_weights is not None:
        init_weights = Path(init_weights)
        init = {"file": init_weights.name, "sha256": sha256_file(init_weights)}
    if init is not None and not (resume and ckpt.exists()):
        try:
            state = torch.load(init_weights, map_location=device, weights_only=True)
            # a bundled model with uncertainty heads: start from its point network
            own = net.state_dict()
            state = {k: v for k, v in state.items()
                     if k in own or not k.startswith(("sigma_head", "recon_head", "latent_"))}
            state = widen_first_convolution(state, own)
            net.load_state_dict(state)
        except Exception as exc:  # torch raises several types for bad files
            msg = (f"could not start from the weights in {init_weights}: {exc}. They must be "
                   "the best.pt of a training run or a bundled sfhnet*.pt.")
            raise CubeSFHError(msg) from exc
        log.info("starting from the weights in %s", init_weights)
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        try:
            net.load_state_dict(state["model"])
        except RuntimeError as exc:
            msg = (f"{ckpt} is the checkpoint of a network without the validity channel "
                   "(cubesfh <= 0.3) and cannot be resumed by this version; start a new run "
                   "in another folder, with --init-weights pointing at that run's best.pt.")
            raise CubeSFHError(msg) from exc
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        best, since_best = float(state["best"]), int(state["since_best"])
        elapsed = float(state["elapsed"])
        history = json.loads((out / "history.json").read_text())
        log.info("resumed from epoch %d (best val loss %.5f)", start_epoch, best)

    sm = torch.from_numpy(spec_mean).to(device)
    ss = torch.from_numpy(spec_std).to(device)
    pm = torch.from_numpy(phot_mean).to(device)
    ps = torch.from_numpy(phot_std).to(device)

    def inputs(spec, phot, mask, valid):
        logf, ok = photometry_features(phot, mask)
        x = (torch.from_numpy(spec).to(device) - sm) / ss
        p = (torch.from_numpy(logf).to(device) - pm) / ps
        return x, p, torch.from_numpy(ok).to(device), torch.from_numpy(valid).to(device)

    level = np.float32(1.0)
    v_spec, v_phot = va["spectra"], va["photometry"]
    v_mask = _band_mask(np.random.default_rng([seed, 99]), len(v_spec), band_dropout)
    v_valid = validation_gap_masks(seed, *v_spec.shape, gap_share)
    v_f = torch.from_numpy(va["mass_fraction"]).to(device)
    v_z = torch.from_numpy(va["metallicity"]).to(device)
    v_l = torch.from_numpy(va["light_fraction"]).to(device)
    lcoef = torch.from_numpy(light_coefficients().astype(np.float32)).to(device)
    n_tr = tr["spectra"].shape[0]
    snr_values = tr["snr_values"]
    dl = 2.5  # A per input pixel after averaging
    for epoch in range(start_epoch, max_epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        net.train()
        order = rng.permutation(n_tr)
        total, count = 0.0, 0
        steps = range(0, n_tr, batch_size)
        for s in progress(steps, enabled=progress_bar, desc=f"epoch {epoch}", unit="batch"):
            b = order[s:s + batch_size]
            spec = tr["spectra"][b]
            snr = rng.choice(snr_values, size=b.size)
            sig = np.sqrt(np.clip(spec, 0, None) * level / (snr[:, None] ** 2 * dl))
            spec = spec + rng.standard_normal(spec.shape).astype(np.float32) * sig
            phot = tr["photometry"][b] * (1 + tr["phot_error"]
                                          * rng.standard_normal((b.size, len(HST_BANDS))))
            mask = _band_mask(rng, b.size, band_dropout)
            valid = gap_masks(rng, b.size, n_pix=spec.shape[1], share=gap_share)
            x, p, m, v = inputs(spec.astype(np.float32), phot.astype(np.float32), mask, valid)
            f_true = torch.from_numpy(tr["mass_fraction"][b]).to(device)
            z_true = torch.from_numpy(tr["metallicity"][b]).to(device)
            l_true = torch.from_numpy(tr["light_fraction"][b]).to(device)
            f_pred, z_pred = net(x, p, m, v)
            loss = log_cosh_loss(f_pred, z_pred, f_true, z_true, light_coef=lcoef,
                                 true_light=l_true, light_weight=light_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * b.size
            count += b.size
        net.eval()
        with torch.no_grad():
            vl, vn = 0.0, 0
            for s in range(0, len(v_spec), 4096):
                x, p, m, v = inputs(v_spec[s:s + 4096], v_phot[s:s + 4096],
                                    v_mask[s:s + 4096], v_valid[s:s + 4096])
                f_pred, z_pred = net(x, p, m, v)
                n = x.shape[0]
                vl += log_cosh_loss(f_pred, z_pred, v_f[s:s + n], v_z[s:s + n],
                                    light_coef=lcoef, true_light=v_l[s:s + n],
                                    light_weight=light_weight).item() * n
                vn += n
        val = vl / vn
        sched.step(val)
        dt = time.perf_counter() - t0
        elapsed += dt
        history.append({"epoch": epoch, "train_loss": total / count, "val_loss": val,
                        "lr": opt.param_groups[0]["lr"], "seconds": dt})
        improved = val < best
        if improved:
            best, since_best = val, 0
            torch.save(net.state_dict(), out / "best.pt")
        else:
            since_best += 1
        log.info("epoch %d: train %.5f val %.5f lr %.2e (%.0f s)%s", epoch, total / count, val,
                 opt.param_groups[0]["lr"], dt, " *" if improved else "")
        (out / "history.json").write_text(json.dumps(history, indent=1))
        (out / "normalization.json").write_text(json.dumps(norm))
        _write_meta(out, training_set, seed, tr, n_tr, len(v_spec), best, history, elapsed,
                    device, torch.get_num_threads(), band_dropout, batch_size, lr, light_weight,
                    init, gap_share)
        tmp = out / "checkpoint.pt.tmp"
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch, "best": best,
                    "since_best": since_best, "elapsed": elapsed}, tmp)
        os.replace(tmp, ckpt)
        if since_best >= stop_patience:
            log.info("early stop: %d epochs without improvement", since_best)
            break
        if time_limit is not None and elapsed >= time_limit:
            log.info("time limit reached after epoch %d", epoch)
            break
    _write_meta(out, training_set, seed, tr, n_tr, len(v_spec), best, history, elapsed, device,
                torch.get_num_threads(), band_dropout, batch_size, lr, light_weight, init,
                gap_share)
    return history
