# Licensed under a 3-clause BSD style license - see LICENSE
"""Loading the bundled network and predicting star formation histories."""

import contextlib
import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from ..conventions import HST_BANDS, N_AGE_BINS, OUTPUT_WAVELENGTH
from ..utils import CubeSFHError, sha256_file
from ._data import (
    CUMULATIVE_KEYS,
    SUMMARY_KEYS,
    continuum_pixels,
    cumulative_fractions,
    downsample_spectra,
    downsample_valid,
    noise_level,
    photometry_features,
)

#: Largest sub-batch of the CPU network path: its intermediate arrays (up to
#: 7040 floats a spectrum a layer) then stay in the caches (see
#: :ref:`performance-inference`).
CPU_CHUNK = 256

__all__ = ["BUNDLED_MODELS", "DEFAULT_MODEL", "SFHModel", "bundled_models", "export_model"]

DATA_DIR = Path(__file__).parent / "data"
#: Stem of the bundled model files (``.pt`` weights + ``.json`` metadata).
DEFAULT_MODEL = DATA_DIR / "sfhnet"
#: Stems of the bundled model family, by increasing velocity dispersion: the
#: paper's 150 km/s network and its fine-tuned 300 km/s sibling for
#: galaxies with sigma >= 150 km/s (see :ref:`network-sigma`).
BUNDLED_MODELS = (DEFAULT_MODEL, DATA_DIR / "sfhnet_s300")


def _meta_digest(meta):
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def export_model(run_dir, stem=DEFAULT_MODEL, *, metrics=None, extra=None):
    """
    Package the best weights of a training run with their metadata.

    When the run has calibrated uncertainty heads
    (:func:`~cubesfh.network.fit_uncertainty`: ``best_unc.pt`` and
    ``uncertainty.json``) they are packaged instead of ``best.pt``.

    Writes ``<stem>.pt`` (the ``state_dict``, loadable with
    ``torch.load(..., weights_only=True)``) and ``<stem>.json`` (architecture,
    input normalisation, training provenance and history, metrics, and the
    SHA-256 of both files' contents).

    Parameters
    ----------
    run_dir : str or `~pathlib.Path`
        Output folder of :func:`~cubesfh.network.train`.
    stem : str or `~pathlib.Path`, optional
        Output path without suffix (default: the bundled model).
    metrics : dict, optional
        Evaluation metrics to record.
    extra : dict, optional
        Further metadata.
    """
    import shutil

    from .. import __version__
    from ..templates import TemplateLibrary

    run = Path(run_dir)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".pt")
    unc = run / "uncertainty.json"
    with_unc = unc.exists() and (run / "best_unc.pt").exists()
    shutil.copyfile(run / ("best_unc.pt" if with_unc else "best.pt"), weights)
    lib = TemplateLibrary.load()
    training = json.loads((run / "train_meta.json").read_text())
    sigma = float(training.get("training_set_attrs", {}).get("sigma_target_kms", 150.0))
    meta = {
        "format": 1,
        "architecture": {"class": "SFHNet", "n_pix": 880, "n_bands": len(HST_BANDS),
                         "channels": [16, 32, 64], "kernels": [8, 5, 5], "strides": [2, 1, 1],
                         "heads": 4, "uncertainty": with_unc,
                         **state_layout(weights)},
        "inputs": {"wavelength_start": float(OUTPUT_WAVELENGTH[0].value),
                   "wavelength_step": 1.25, "n_pixels": int(OUTPUT_WAVELENGTH.size),
                   "downsample": 2, "bands": list(HST_BANDS),
                   "normalisation_window": [5300.0, 5500.0], "sigma_kms": sigma},
        "normalization": json.loads((run / "normalization.json").read_text()),
        "training": training,
        "history": json.loads((run / "history.json").read_text()),
        "template_library": {"file": Path(lib.filename).name,
                             "stellar_sha": lib.meta.get("STELSHA", ""),
                             "source": lib.meta.get("SRCPKG", "")},
        "code_version": __version__,
        "metrics": metrics or {},
        "weights_sha256": sha256_file(weights),
    }
    if with_unc:
        meta["uncertainty"] = json.loads(unc.read_text())
    if extra:
        meta.update(extra)
    meta["meta_sha256"] = _meta_digest(meta)
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return weights


def state_layout(state):
    """
    ``mask_channel`` and ``n_sigma`` of the network in a state dict (or its ``.pt`` file).

    The validity channel is a second input channel of the first convolution;
    ``n_sigma`` is the size of the last bias of the uncertainty head
    (`N_SIGMA_OUTPUTS` when the state has no head).
    """
    from ._model import N_SIGMA_OUTPUTS

    if not isinstance(state, dict):
        import torch

        state = torch.load(state, map_location="cpu", weights_only=True)
    keys = sorted(k for k in state if k.startswith("sigma_head") and k.endswith(".bias"))
    conv = state.get("conv.0.conv.weight")
    return {"mask_channel": bool(conv is not None and conv.shape[1] == 2),
            "n_sigma": int(state[keys[-1]].shape[0]) if keys else N_SIGMA_OUTPUTS}


@contextlib.contextmanager
def _torch_threads(threads):
    """Run with ``threads`` torch CPU threads (unchanged when `None`)."""
    if not threads:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class SFHModel:
    """
    The trained CNN: spectra + HST photometry -> SFH, Z(t) and mean ages/metallicities.

    Use :meth:`load`. Inputs are exactly what
    :func:`~cubesfh.preprocess.prepare_observation` and the training set
    provide: rest-frame spectra on 4800-7000 A at 1.25 A (1761 pixels) at
    sigma = 150 km/s normalised by their 5300-5500 A mean, and the five HST
    fluxes divided by the same number (NaN for a missing band).

    Attributes
    ----------
    meta : dict
        Metadata of the model (provenance, normalisation, training history,
        metrics).
    """

    def __init__(self, net, meta, *, device="cpu"):
        self._net = net
        self.meta = meta
        self.device = device
        n = meta["normalization"]
        self._spec_mean = np.asarray(n["spec_mean"], np.float32)
        self._spec_std = np.asarray(n["spec_std"], np.float32)
        self._phot_mean = np.asarray(n["phot_mean"], np.float32)
        self._phot_std = np.asarray(n["phot_std"], np.float32)

    def __repr__(self):
        return (f"<SFHModel {self.meta.get('weights_sha256', '')[:12]} trained on "
                f"{self.meta.get('training', {}).get('n_train', '?')} spectra, "
                f"code {self.meta.get('code_version')}>")

    @property
    def sigma_target(self):
        """Velocity dispersion of the spectra the network was trained on (Quantity)."""
        from astropy import units as u

        return float(self.meta["inputs"].get("sigma_kms", 150.0)) * (u.km / u.s)

    @property
    def model_id(self):
        """Short identifier: the first 12 hex digits of the weights' SHA-256."""
        return self.meta["weights_sha256"][:12]

    @classmethod
    def load(cls, path=None, *, device=None):
        """
        Load a model (by default the one bundled with cubesfh), offline.

        Parameters
        ----------
        path : str or `~pathlib.Path`, optional
            Path of the ``.pt`` weights (the ``.json`` metadata must sit
            beside it with the same stem).
        device : str, optional
            torch device (default ``'cpu'``).

        Returns
        -------
        model : `SFHModel`

        Raises
        ------
        CubeSFHError
            Missing, corrupted or modified files.
        """
        stem = DEFAULT_MODEL if path is None else Path(path).with_suffix("")
        # --- bad-input handling (issue 11): every failure is one CubeSFHError line ---
        try:
            if path is None and device is None:
                return _load_default()
            return _load(stem, device or "cpu")
        except CubeSFHError as exc:
            text = " ".join(str(exc).split())  # torch's state_dict errors span lines
            if text == str(exc):
                raise
            raise CubeSFHError(text[:600]) from exc
        except (OSError, KeyError, IndexError, TypeError, AttributeError, ValueError,
                RuntimeError) as exc:
            detail = " ".join(str(exc).split())[:300]
            msg = (f"could not load the model {stem}.pt + {stem.name}.json "
                   f"({type(exc).__name__}: {detail}): they are not a cubesfh model or are "
                   "damaged; reinstall cubesfh, or export the model again (cubesfh train "
                   "--export).")
            raise CubeSFHError(msg) from exc

    def predict(self, spectra, photometry=None, *, band_mask=None, batch_size=4096,
                uncertainty=True, threads=None, fill_gaps=None):
        """
        Predict the SFH and metallicity history of each spectrum.

        Parameters
        ----------
        spectra : `~numpy.ndarray`
            ``(n, 1761)`` prepared spectra; NaN pixels are missing (see
            ``fill_gaps``).
        photometry : `~numpy.ndarray`, optional
            ``(n, 5)`` normalised HST fluxes in F275W, F336W, F438W, F555W,
            F814W order; NaN (or non-positive) for a band that is missing.
            `None` for spectrum-only predictions.
        band_mask : `~numpy.ndarray`, optional
            ``(n, 5)`` or ``(5,)`` bool: bands to use (default: all finite,
            positive ones).
        batch_size : int, optional
            Spectra per network call. On CPU the network itself runs on
            sub-batches of at most `CPU_CHUNK` spectra, whose intermediate
            arrays stay in the processor caches (see :ref:`performance-inference`).
        uncertainty : bool, optional
            Also return the calibrated uncertainties and the
            out-of-distribution score (models with uncertainty heads only;
            see :ref:`network-uncertainty`).
        threads : int, optional
            torch CPU threads for this call (`torch.set_num_threads`; the
            previous setting is restored afterwards). Default: torch's current
            setting.
        fill_gaps : bool, optional
            Complete the missing pixels of each spectrum by a template fit to
            its valid pixels (:func:`cubesfh.gaps.fill_gaps`) before the
            network sees them. Default: only for networks without a validity
            channel (cubesfh <= 0.3); the bundled networks since 0.4 take the
            missing pixels as missing (:attr:`handles_gaps`). With `False` and
            an old network they are set to 1, the normalisation level (what
            cubesfh 0.3 did; it biases the outputs, see :ref:`network-gaps`).

        Returns
        -------
        result : dict of `~numpy.ndarray`
            ``mass_fraction`` (n, 16), ``metallicity`` (n, 16, [Z/H]),
            ``light_fraction`` (n, 16), ``logage_lw``, ``logage_mw``,
            ``zh_lw``, ``zh_mw`` (n,). With uncertainties, for each of the four
            mean quantities ``<name>_p16`` / ``<name>_p84`` (the calibrated
            68 % interval), ``<name>_p02`` / ``<name>_p98`` (95 %) and
            ``<name>_err`` (half-width of the 68 % interval);
            ``mass_fraction_p16`` / ``_p84`` / ``_p02`` / ``_p98`` (n, 16);
            ``ood_score`` (n,; > 1 is outside the training distribution),
            its two parts ``ood_latent`` and ``ood_recon``, and ``ood`` (bool).
            Always the cumulative mass fractions younger than 0.1, 1 and 5 Gyr,
            ``mass_younger_0.1gyr``, ``mass_younger_1gyr`` and
            ``mass_younger_5gyr`` (n,); with the uncertainty heads of 0.4 also
            their ``_p16`` / ``_p84`` / ``_p02`` / ``_p98``. With the
            attenuation head (:attr:`has_physical_head`, 0.5): ``av_stars``
            (effective V-band attenuation of the stellar light, mag) with
            ``_p16`` / ``_p84`` / ``_p02`` / ``_p98`` / ``_err``,
            ``logmstar_sd_err`` and ``logmstar_sd_err95`` (half-widths, dex,
            of the 68 and 95 % intervals of log Sigma_star as
            :func:`cubesfh.physical.physical_columns` estimates it) and
            ``log_ml_v_head`` (see :ref:`physical-head`).
        """
        spectra = np.atleast_2d(np.asarray(spectra, dtype=np.float32))
        n = spectra.shape[0]
        if spectra.shape[1] != self.meta["inputs"]["n_pixels"]:
            msg = (f"spectra have {spectra.shape[1]} pixels; the network takes "
                   f"{self.meta['inputs']['n_pixels']} (4800-7000 A at 1.25 A). Prepare them "
                   "with cubesfh.restframe.prepare_spectra.")
            raise CubeSFHError(msg)
        if fill_gaps is None:
            fill_gaps = not self.handles_gaps
        if fill_gaps and not np.isfinite(spectra).all():
            from ..gaps import fill_gaps as complete

            spectra = complete(spectra, self.sigma_target.value)[0].astype(np.float32)
        if photometry is None:
            photometry = np.full((n, len(HST_BANDS)), np.nan, np.float32)
        photometry = np.atleast_2d(np.asarray(photometry, dtype=np.float32))
        if photometry.shape != (n, len(HST_BANDS)):
            msg = (f"photometry must have shape ({n}, {len(HST_BANDS)}) in "
                   f"{', '.join(HST_BANDS)} order, got {photometry.shape}.")
            raise CubeSFHError(msg)
        mask = None if band_mask is None else np.broadcast_to(band_mask, photometry.shape)
        heads = self.has_uncertainty and uncertainty
        physical = self.has_physical_head
        with _torch_threads(threads):
            out = self._run_downsampled(spectra, photometry, mask, batch_size=batch_size,
                                        heads=heads, latent=physical, full_resolution=True)
        if heads:
            self._apply_calibration(out)
        if physical:
            from ._physical import physical_outputs

            out.update(physical_outputs(self.meta["physical_head"], out["latent"]))
        for k in ("latent", "sigma_raw", "ood_latent_raw", "ood_recon_raw"):
            out.pop(k, None)
        return out

    @property
    def handles_gaps(self):
        """Whether the network has a pixel-validity input (missing pixels are inputs)."""
        return bool(getattr(self._net, "mask_channel", False))

    @property
    def has_physical_head(self):
        """Whether the model has the attenuation head (A_V, stellar-mass intervals)."""
        return "physical_head" in self.meta

    @property
    def has_uncertainty(self):
        """Whether the model has calibrated uncertainty and out-of-distribution heads."""
        return "uncertainty" in self.meta and getattr(self._net, "uncertainty", False)

    def _fast_net(self):
        """The inference rearrangement of the network (`None` where it does not apply)."""
        if str(self.device) != "cpu":
            return None
        from ._fast import FastSFHNet

        # built for every call: cheap (a copy of 3 MB of weights), and never stale
        # while fit_uncertainty trains the heads of the same module
        fast = FastSFHNet(self._net, self._spec_std, continuum_pixels(self._spec_std.size))
        return fast if fast.supports else None

    def _run_downsampled(self, spec, photometry, mask, *, valid=None, batch_size=4096,
                         latent=False, heads=False, progress_bar=False, full_resolution=False,
                         backend="auto"):
        """
        Network outputs for 880-pixel spectra (prediction and calibration).

        With ``full_resolution`` the spectra are the 1761-pixel inputs of
        `predict`, averaged in pairs chunk by chunk; their non-finite pixels
        are missing (networks with a validity channel) or set to 1 (older
        networks). ``valid`` (``(n, 880)``, 1 valid / 0 missing) gives the
        missing pixels of 880-pixel inputs. ``backend``: ``'auto'`` (the fast
        CPU path where it applies), ``'module'`` (the torch module itself,
        the reference).
        """
        import torch

        from ..populations import mean_quantities
        from ..utils import progress

        n = spec.shape[0]
        gaps = self.handles_gaps
        fast = self._fast_net() if backend == "auto" else None
        want_z = latent or heads
        frac = np.empty((n, N_AGE_BINS), np.float32)
        zh = np.empty((n, N_AGE_BINS), np.float32)
        z_all = np.empty((n, 40), np.float32) if want_z else None
        if heads:
            log_sig = np.empty((n, getattr(self._net, "n_sigma", 4 + N_AGE_BINS)), np.float32)
            m2 = np.empty(n, np.float32)
            rec2 = np.empty(n, np.float32)
            noise = np.empty(n)
        cont = continuum_pixels(self._spec_std.size)
        chunk = max(1, int(batch_size))
        if fast is not None:
            chunk = min(chunk, CPU_CHUNK)
        steps = range(0, n, chunk)
        logf, ok = photometry_features(photometry, mask)
        p_all = np.where(ok > 0, (logf - self._phot_mean) / self._phot_std,
                         0.0).astype(np.float32)
        t_ok, t_p = torch.from_numpy(ok), torch.from_numpy(p_all)
        outs = [torch.from_numpy(a) for a in (frac, zh)]
        if want_z:
            t_z = torch.from_numpy(z_all)
        if heads:
            t_ls, t_m2, t_rec = (torch.from_numpy(a) for a in (log_sig, m2, rec2))
        with torch.inference_mode():
            for s in progress(steps, enabled=progress_bar, desc="network", unit="batch"):
                sl = slice(s, s + chunk)
                sb = spec[sl]
                vb = None if valid is None else np.asarray(valid[sl], np.float32)
                if full_resolution:
                    if gaps:
                        sb, vb = downsample_valid(sb)
                        if vb.min() > 0:
                            vb = None
                    else:
                        sb = downsample_spectra(np.where(np.isfinite(sb), sb, 1.0))
                x = (sb.astype(np.float32, copy=False) - self._spec_mean) / self._spec_std
                if vb is not None:
                    x *= vb
                xb = torch.from_numpy(x).to(self.device)
                tv = None if vb is None else torch.from_numpy(vb).to(self.device)
                pb = t_p[sl].to(self.device)
                okb = t_ok[sl].to(self.device)
                if fast is not None:
                    z = fast.encode(xb, pb, okb, tv)
                    f, zz = fast.decode(z)
                else:
                    z = self._net.encode(xb, pb, okb, tv)
                    f, zz = self._net.decode(z)
                outs[0][sl] = f
                outs[1][sl] = zz
                if want_z:
                    t_z[sl] = z
                if heads:
                    noise[sl] = noise_level(sb, vb)
                    if fast is not None:
                        ls, d2, r2 = fast.heads(z, xb, tv)
                    else:
                        ls, r, d2 = self._net.heads(z)
                        resid = ((xb - r).cpu().numpy() * self._spec_std) ** 2
                        use = np.broadcast_to(cont, resid.shape)
                        if vb is not None:
                            use = use & (vb > 0)
                        r2 = torch.from_numpy(((resid * use).sum(axis=1)
                                               / np.maximum(use.sum(axis=1), 1)).astype(
                                                   np.float32))
                    t_ls[sl] = ls
                    t_m2[sl] = d2
                    t_rec[sl] = r2
        frac = frac.astype(float)
        zh = zh.astype(float)
        out = {"mass_fraction": frac, "metallicity": zh}
        out.update(mean_quantities(frac, zh))
        out.update(cumulative_fractions(frac))
        if want_z:
            out["latent"] = z_all
        if heads:
            out["sigma_raw"] = np.exp(np.maximum(log_sig, np.log(1e-4)))
            out["ood_latent_raw"] = m2.astype(float)
            out["ood_recon_raw"] = np.sqrt(rec2) / noise
        return out

    def _apply_calibration(self, out):
        """Calibrated percentiles and the OOD score from the raw head outputs (in place)."""

        cal = self.meta["uncertainty"]
        k = np.asarray(cal["conformal_k"], float)  # (2, n_sigma): 68 % and 95 % multipliers
        sig = out["sigma_raw"]
        for j, key in enumerate(SUMMARY_KEYS):
            q = out[key]
            out[f"{key}_err"] = k[0, j] * sig[:, j]
            out[f"{key}_p16"] = q - k[0, j] * sig[:, j]
            out[f"{key}_p84"] = q + k[0, j] * sig[:, j]
            out[f"{key}_p02"] = q - k[1, j] * sig[:, j]
            out[f"{key}_p98"] = q + k[1, j] * sig[:, j]
        f = out["mass_fraction"]
        ks = k[:, 4:4 + N_AGE_BINS]
        fs = sig[:, 4:4 + N_AGE_BINS]
        out["mass_fraction_p16"] = np.clip(f - ks[0] * fs, 0.0, 1.0)
        out["mass_fraction_p84"] = np.clip(f + ks[0] * fs, 0.0, 1.0)
        out["mass_fraction_p02"] = np.clip(f - ks[1] * fs, 0.0, 1.0)
        out["mass_fraction_p98"] = np.clip(f + ks[1] * fs, 0.0, 1.0)
        for j, key in enumerate(CUMULATIVE_KEYS):
            col = 4 + N_AGE_BINS + j
            if col >= k.shape[1]:
                break
            q = out[key]
            for name, lev, sgn in (("p16", 0, -1), ("p84", 0, 1), ("p02", 1, -1),
                                   ("p98", 1, 1)):
                out[f"{key}_{name}"] = np.clip(q + sgn * k[lev, col] * sig[:, col], 0.0, 1.0)
        lat = out["ood_latent_raw"] / cal["ood_threshold_latent"]
        rec = out["ood_recon_raw"] / cal["ood_threshold_recon"]
        out["ood_latent"] = lat
        out["ood_recon"] = rec
        out["ood_score"] = np.maximum(lat, rec)
        out["ood"] = out["ood_score"] > 1.0


def _load(stem, device):
    import torch

    from ._model import SFHNet

    weights = stem.with_suffix(".pt")
    meta_path = stem.with_suffix(".json")
    for p in (weights, meta_path):
        if not p.exists():
            msg = (f"model file {p} not found. The bundled model ships inside the cubesfh "
                   "package; reinstall cubesfh, or train one with 'cubesfh train'.")
            raise CubeSFHError(msg)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"{meta_path} is not valid JSON ({exc}); the model metadata is corrupted."
        raise CubeSFHError(msg) from exc
    if meta.get("meta_sha256") != _meta_digest(meta):
        msg = (f"{meta_path} does not match its recorded checksum: the model metadata was "
               "modified or corrupted. Reinstall cubesfh.")
        raise CubeSFHError(msg)
    if meta.get("weights_sha256") != sha256_file(weights):
        msg = (f"{weights} does not match the SHA-256 recorded in {meta_path.name}: the "
               "weights were modified or corrupted. Reinstall cubesfh.")
        raise CubeSFHError(msg)
    arch = dict(meta["architecture"])
    arch.pop("class", None)
    net = SFHNet(n_pix=arch["n_pix"], n_bands=arch["n_bands"], channels=tuple(arch["channels"]),
                 kernels=tuple(arch["kernels"]), strides=tuple(arch["strides"]),
                 heads=arch["heads"], zh_offset=meta["normalization"]["zh_offset"],
                 uncertainty=bool(arch.get("uncertainty", False)),
                 mask_channel=bool(arch.get("mask_channel", False)),
                 n_sigma=int(arch.get("n_sigma", 20)))
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # torch raises several types for bad files
        msg = f"could not load the weights in {weights}: {exc}"
        raise CubeSFHError(msg) from exc
    net.to(device).eval()
    return SFHModel(net, meta, device=device)


@functools.lru_cache(maxsize=4)
def _load_bundled(stem):
    return _load(stem, "cpu")


def _load_default():
    return _load_bundled(DEFAULT_MODEL)


def bundled_models(*, device=None):
    """
    The bundled model family, by increasing training velocity dispersion.

    Parameters
    ----------
    device : str, optional
        torch device (default ``'cpu'``).

    Returns
    -------
    models : list of `SFHModel`
        The 150 km/s network of the paper first, then the 300 km/s one used
        for bins whose dispersion is 150 km/s or more.
    """
    if device is None:
        return [_load_bundled(stem) for stem in BUNDLED_MODELS]
    return [_load(stem, device) for stem in BUNDLED_MODELS]
