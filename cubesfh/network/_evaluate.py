# Licensed under a 3-clause BSD style license - see LICENSE
"""
Accuracy and speed of the CNN (and of the pPXF baseline) on the held-out test set.

Produces the analogues of the paper's Fig. 4 (relative SFR error per age bin),
Fig. 5 (bias and scatter of LW/MW log age and [Z/H]) and Fig. 8 (dependence
on S/N), the CNN versus pPXF comparison on identical inputs, and the speed
ratio, as a JSON-serialisable dict and PNG figures.
"""

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..conventions import AGE_BIN_CENTERS, AGE_BIN_EDGES, HST_BANDS
from ..utils import CubeSFHError
from ._train import split_indices

__all__ = ["coverage_statistics", "evaluate", "evaluate_heldout", "heldout_to_rst",
           "metrics_to_rst", "summary_statistics"]

log = logging.getLogger(__name__)

QUANTITIES = ("logage_lw", "logage_mw", "zh_lw", "zh_mw")


def summary_statistics(pred, true):
    """
    Bias (mean of predicted - true), scatter (standard deviation) and the
    median and robust scatter (1.4826 x MAD) of the difference, for the four
    mean quantities.

    Parameters
    ----------
    pred, true : dict of `~numpy.ndarray`

    Returns
    -------
    stats : dict
    """
    out = {}
    for q in QUANTITIES:
        d = np.asarray(pred[q], float) - np.asarray(true[q], float)
        d = d[np.isfinite(d)]
        med = float(np.median(d))
        out[q] = {"bias": float(d.mean()), "scatter": float(d.std()), "median": med,
                  "nmad": float(1.4826 * np.median(np.abs(d - med))), "n": int(d.size)}
    return out


def coverage_statistics(pred, true, *, pit_bins=10):
    """
    Empirical coverage of the calibrated intervals, PIT histograms and OOD rate.

    Parameters
    ----------
    pred : dict of `~numpy.ndarray`
        Output of :meth:`~cubesfh.network.SFHModel.predict` with uncertainties.
    true : dict of `~numpy.ndarray`
        Truth: the four mean quantities and ``mass_fraction``.
    pit_bins : int, optional
        Bins of the probability-integral-transform histograms.

    Returns
    -------
    stats : dict
        Per quantity ``cov68`` and ``cov95`` (fractions of spectra whose truth
        lies inside the 68 % and 95 % intervals), ``pit`` (histogram of the
        PIT, counts normalised to a mean of 1: flat when calibrated, U-shaped
        when the intervals are too narrow, peaked when too wide) and
        ``median_width68``; ``sfh`` with the coverage over all 16 bins and per
        bin; ``ood_fraction`` (fraction of spectra with ``ood_score`` > 1).
    """
    from scipy.stats import norm

    out = {}
    for q in QUANTITIES:
        t = np.asarray(true[q], float)
        lo, hi = pred[f"{q}_p16"], pred[f"{q}_p84"]
        lo2, hi2 = pred[f"{q}_p02"], pred[f"{q}_p98"]
        ok = np.isfinite(t) & np.isfinite(lo)
        sig = pred[f"{q}_err"]
        pit = norm.cdf((t - pred[q]) / sig)[ok]
        h, _ = np.histogram(pit, bins=pit_bins, range=(0, 1))
        out[q] = {"cov68": float(np.mean((t >= lo) & (t <= hi), where=ok)),
                  "cov95": float(np.mean((t >= lo2) & (t <= hi2), where=ok)),
                  "pit": (h / max(1, h.mean())).round(3).tolist(),
                  "median_width68": float(np.median((hi - lo)[ok]))}
    t = np.asarray(true["mass_fraction"], float)
    in68 = (t >= pred["mass_fraction_p16"]) & (t <= pred["mass_fraction_p84"])
    in95 = (t >= pred["mass_fraction_p02"]) & (t <= pred["mass_fraction_p98"])
    out["sfh"] = {"cov68": float(in68.mean()), "cov95": float(in95.mean()),
                  "cov68_per_bin": in68.mean(axis=0).round(4).tolist(),
                  "cov95_per_bin": in95.mean(axis=0).round(4).tolist()}
    from ._predict import CUMULATIVE_KEYS, cumulative_fractions

    if f"{CUMULATIVE_KEYS[0]}_p16" in pred:
        ct = cumulative_fractions(true["mass_fraction"])
        for key in CUMULATIVE_KEYS:
            t = ct[key]
            out[key] = {
                "cov68": float(np.mean((t >= pred[f"{key}_p16"]) & (t <= pred[f"{key}_p84"]))),
                "cov95": float(np.mean((t >= pred[f"{key}_p02"]) & (t <= pred[f"{key}_p98"]))),
                "median_width68": float(np.median(pred[f"{key}_p84"] - pred[f"{key}_p16"]))}
    out["ood_fraction"] = float(np.mean(pred["ood_score"] > 1))
    out["ood_latent_fraction"] = float(np.mean(pred["ood_latent"] > 1))
    out["ood_recon_fraction"] = float(np.mean(pred["ood_recon"] > 1))
    return out


def _sfr_error(pred_formed, true_formed):
    """Fig. 4: mean (true - predicted) SFR per bin divided by the mean true SFR."""
    widths = np.diff(AGE_BIN_EDGES.to_value("yr"))
    sfr_t = true_formed / widths
    sfr_p = pred_formed / widths
    mean_t = sfr_t.mean(axis=0)
    diff = (sfr_t - sfr_p) / mean_t
    return diff.mean(axis=0).tolist(), (diff.std(axis=0) / np.sqrt(len(diff))).tolist()


def _formed_from_living(mass_fraction, zh):
    """Convert living-mass fractions to formed-mass fractions (constant SFR in each bin)."""
    from ..templates import TemplateLibrary

    lib = TemplateLibrary.load()
    liv = lib.binned_living_fraction()  # (n_z, 16)
    zg = lib.zh
    z = np.clip(zh, zg[0], zg[-1])
    lf = np.empty_like(z)
    for i in range(z.shape[1]):
        lf[:, i] = np.interp(z[:, i], zg, liv[:, i])
    formed = mass_fraction / lf
    return formed / formed.sum(axis=1, keepdims=True)


def evaluate(training_set, model=None, *, seed=None, n_ppxf=300, snr_grid=(5, 10, 20, 35, 50, 100),
             output_json=None, figure_dir=None, progress_bar=True, max_test=None):
    """
    Evaluate the CNN (and pPXF on a subset) on the held-out test split.

    Parameters
    ----------
    training_set : str or `~pathlib.Path`
        The training-set HDF5 file the model was trained on.
    model : `~cubesfh.network.SFHModel`, optional
        Default: the bundled model.
    seed : int, optional
        Split seed (default: the one recorded with the model).
    n_ppxf : int, optional
        Test spectra fitted with pPXF for the comparison (0 to skip).
    snr_grid : sequence of float, optional
        S/N per Angstrom at which the noise-free test spectra are re-noised.
    output_json : str or `~pathlib.Path`, optional
        Where to write the metrics.
    figure_dir : str or `~pathlib.Path`, optional
        Where to write PNG figures.
    progress_bar : bool, optional
    max_test : int, optional
        Use only the first test spectra (quick checks).

    Returns
    -------
    metrics : dict
    """
    import h5py

    from ..synthesis import ForwardModel
    from ._predict import SFHModel

    model = SFHModel.load() if model is None else model
    seed = model.meta["training"]["seed"] if seed is None else seed
    with h5py.File(training_set, "r") as f:
        ts_sigma = float(f.attrs.get("sigma_target_kms", 150.0))
        if not np.isclose(ts_sigma, model.sigma_target.value):
            msg = (f"{training_set} holds spectra at sigma = {ts_sigma:g} km/s but the model "
                   f"was trained at {model.sigma_target.value:g} km/s; evaluate it on its own "
                   "training set.")
            raise CubeSFHError(msg)
        n = f["spectra"].shape[0]
        _, _, test = split_indices(n, seed)
        if max_test:
            test = test[:max_test]
        spec = f["spectra"][:][test] if test.size > 20000 else f["spectra"][test]
        phot = f["photometry"][test]
        spec0 = f["spectra_noiseless"][test]
        phot0 = f["photometry_noiseless"][test]
        truth = {k: f[k][test] for k in (*QUANTITIES, "mass_fraction", "metallicity",
                                          "mass_formed", "snr", "tau_ism", "tau_bc")}
    metrics = {"n_test": int(test.size), "seed": int(seed), "model_id": model.model_id}

    t0 = time.perf_counter()
    pred = model.predict(spec, phot)
    t_cnn = (time.perf_counter() - t0) / test.size
    metrics["cnn"] = summary_statistics(pred, truth)
    formed = _formed_from_living(pred["mass_fraction"], pred["metallicity"])
    metrics["cnn_sfr_error"], metrics["cnn_sfr_error_err"] = _sfr_error(formed,
                                                                        truth["mass_formed"])
    metrics["cnn_seconds_per_spectrum"] = t_cnn
    if model.has_uncertainty:
        metrics["coverage"] = coverage_statistics(pred, truth)
    metrics["cnn_by_training_snr"] = {
        str(int(s)): summary_statistics({q: pred[q][truth["snr"] == s] for q in QUANTITIES},
                                        {q: truth[q][truth["snr"] == s] for q in QUANTITIES})
        for s in np.unique(truth["snr"])}

    # S/N dependence (Fig. 8): re-noise the noise-free test spectra
    fm = ForwardModel(sigma_target=model.sigma_target)
    rng = np.random.default_rng([int(seed), 123])
    metrics["snr_dependence"] = {}
    for s in snr_grid:
        noisy, ph, _ = fm.add_noise(rng, spec0, phot0, float(s))
        p = model.predict(noisy, ph)
        metrics["snr_dependence"][str(s)] = summary_statistics(p, truth)
        if model.has_uncertainty:
            metrics["snr_dependence"][str(s)]["coverage"] = coverage_statistics(p, truth)

    # ablation: bands removed (for the real-data case of missing HST coverage)
    ablation = {"all": metrics["cnn"]}
    for i, band in enumerate(HST_BANDS):
        m = np.ones(len(HST_BANDS), bool)
        m[i] = False
        ablation[f"no_{band}"] = summary_statistics(model.predict(spec, phot, band_mask=m), truth)
    optical = np.array([b in ("F438W", "F555W", "F814W") for b in HST_BANDS])
    ablation["optical_only"] = summary_statistics(model.predict(spec, phot, band_mask=optical),
                                                  truth)
    ablation["spectrum_only"] = summary_statistics(model.predict(spec, None), truth)
    metrics["ablation"] = ablation

    if n_ppxf:
        from ..baseline import BaselineTemplates, fit_populations

        k = min(n_ppxf, test.size)
        sub = np.arange(k)
        variance = np.clip(spec0[sub], 0, None) / (truth["snr"][sub, None] ** 2 * 1.25)
        t0 = time.perf_counter()
        templates = BaselineTemplates(fm)  # templates at the model's dispersion
        res = fit_populations(spec[sub], variance, phot[sub], templates=templates,
                              progress_bar=progress_bar)
        t_ppxf = (time.perf_counter() - t0) / k
        pp = {q: np.asarray(res[q]) for q in QUANTITIES}
        tr_sub = {q: truth[q][sub] for q in QUANTITIES}
        cnn_sub = {q: pred[q][sub] for q in QUANTITIES}
        metrics["comparison"] = {"n": int(k), "cnn": summary_statistics(cnn_sub, tr_sub),
                                 "ppxf": summary_statistics(pp, tr_sub),
                                 "ppxf_failed": int(np.count_nonzero(
                                     ~np.isfinite(pp["logage_lw"])))}
        metrics["ppxf_seconds_per_spectrum"] = t_ppxf
        metrics["speed_ratio"] = t_ppxf / t_cnn
        if figure_dir:
            _comparison_figure(tr_sub, cnn_sub, pp, Path(figure_dir) / "eval_cnn_vs_ppxf.png")
    if output_json:
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(output_json).write_text(json.dumps(metrics, indent=1))
    if figure_dir:
        _figures(metrics, truth, pred, Path(figure_dir))
    return metrics


def simulate_heldout(library, sigma_target, *, n=5000, seed=2026,
                     snr_values=(15, 20, 35, 50), prior="broad"):
    """
    The spectra of the leave-one-library-out test (`evaluate_heldout`).

    Returns
    -------
    model : `~cubesfh.synthesis.ForwardModel`
        The held-out library's forward model.
    rng : `numpy.random.Generator`
        The stream after the draws (`evaluate_heldout` re-noises with it).
    sim : dict of `~numpy.ndarray`
        The outputs of `~cubesfh.synthesis.trainingset.simulate_samples`.
    """
    from ..synthesis import ForwardModel
    from ..synthesis.trainingset import _family_plan, simulate_samples, with_young_from_bc03

    # the held-out grid starts at 63 Myr: younger sub-intervals are BC03's, as
    # for the training libraries (otherwise their labels would be wrong)
    fm = ForwardModel(with_young_from_bc03(library), sigma_target=sigma_target)
    rng = np.random.default_rng([int(seed), 11])
    fam = _family_plan(n, (150_000, 9_000, 6_000), seed)
    chunks = [simulate_samples(rng, fam[s:s + 2500], fm, snr_values=snr_values, prior=prior)
              for s in range(0, n, 2500)]
    return fm, rng, {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def evaluate_heldout(library, model=None, *, n=5000, seed=2026, snr_values=(15, 20, 35, 50),
                     low_snr=(5.0, 10.0), prior="broad", n_ppxf=150, output_json=None,
                     progress_bar=True):
    """
    Leave-one-library-out test: spectra simulated with a library the network never saw.

    The spectra are drawn from the simulator prior (``prior``) with every
    population computed on ``library`` (by default the held-out E-MILES
    library, :func:`~cubesfh.templates.load_heldout_library`), the labels
    computed on that library too; the CNN and pPXF (with the BC03 templates
    it always uses) analyse them. Sub-intervals younger than the library's
    first age (``YNGFILL``; 63 Myr for E-MILES) are BC03's
    (:func:`~cubesfh.synthesis.trainingset.with_young_from_bc03`).

    Parameters
    ----------
    library : `~cubesfh.templates.TemplateLibrary`
        The held-out library.
    model : `~cubesfh.network.SFHModel`, optional
        Default: the bundled 150 km/s model.
    n : int, optional
        Number of spectra.
    seed : int, optional
    snr_values : sequence of float, optional
        S/N per Angstrom of the main test.
    low_snr : sequence of float, optional
        Lower S/N at which the same noise-free spectra are re-noised (the OOD
        score and coverage are reported there too).
    prior : {'broad', 'paper'}, optional
        Simulator prior of the test spectra.
    n_ppxf : int, optional
        Spectra also fitted with pPXF (0 to skip).
    output_json : str or `~pathlib.Path`, optional
    progress_bar : bool, optional

    Returns
    -------
    metrics : dict
    """
    from ..synthesis import ForwardModel
    from ._predict import SFHModel

    model = SFHModel.load() if model is None else model
    fm, rng, sim = simulate_heldout(library, model.sigma_target, n=n, seed=seed,
                                    snr_values=snr_values, prior=prior)
    truth = {k: sim[k] for k in (*QUANTITIES, "mass_fraction", "snr")}
    name = str(library.meta.get("MODELS", "held-out"))
    metrics = {"library": name, "stellib": str(library.meta.get("STELLIB", "")),
               "prior": prior, "n": int(n), "seed": int(seed), "model_id": model.model_id}
    pred = model.predict(sim["spectra"], sim["photometry"])
    metrics["cnn"] = summary_statistics(pred, truth)
    if model.has_uncertainty:
        metrics["coverage"] = coverage_statistics(pred, truth)
    metrics["low_snr"] = {}
    for snr in low_snr:
        noisy, ph, _ = fm.add_noise(rng, sim["spectra_noiseless"], sim["photometry_noiseless"],
                                    float(snr))
        p = model.predict(noisy, ph)
        entry = {"cnn": summary_statistics(p, truth)}
        if model.has_uncertainty:
            entry["coverage"] = coverage_statistics(p, truth)
        metrics["low_snr"][str(snr)] = entry
    if n_ppxf:
        from ..baseline import BaselineTemplates, fit_populations

        k = min(n_ppxf, n)
        sub = np.arange(k)
        variance = (np.clip(sim["spectra_noiseless"][sub], 0, None)
                    / (truth["snr"][sub, None] ** 2 * 1.25))
        templates = BaselineTemplates(ForwardModel(sigma_target=model.sigma_target))
        res = fit_populations(sim["spectra"][sub], variance, sim["photometry"][sub],
                              templates=templates, progress_bar=progress_bar)
        pp = {q: np.asarray(res[q]) for q in QUANTITIES}
        tr_sub = {q: truth[q][sub] for q in QUANTITIES}
        metrics["comparison"] = {"n": int(k),
                                 "cnn": summary_statistics({q: pred[q][sub] for q in QUANTITIES},
                                                           tr_sub),
                                 "ppxf": summary_statistics(pp, tr_sub)}
    if output_json:
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(output_json).write_text(json.dumps(metrics, indent=1))
    return metrics


_LABELS = {"logage_lw": r"$\langle\log\,{\rm age}\rangle_{\rm LW}$",
           "logage_mw": r"$\langle\log\,{\rm age}\rangle_{\rm MW}$",
           "zh_lw": r"$\langle[Z/H]\rangle_{\rm LW}$", "zh_mw": r"$\langle[Z/H]\rangle_{\rm MW}$"}


def _figures(metrics, truth, pred, outdir):
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(8, 7.5))
    for ax, q in zip(axes.ravel(), QUANTITIES):
        ax.hexbin(truth[q], pred[q], gridsize=50, mincnt=1, bins="log", cmap="viridis")
        lo, hi = np.percentile(np.r_[truth[q], pred[q]], [0.5, 99.5])
        ax.plot([lo, hi], [lo, hi], "k:", lw=1)
        s = metrics["cnn"][q]
        ax.set_title(f"{_LABELS[q]}: bias {s['bias']:+.3f}, scatter {s['scatter']:.3f} dex",
                     fontsize=9)
        ax.set_xlabel("true")
        ax.set_ylabel("CNN")
    fig.tight_layout()
    fig.savefig(outdir / "eval_means.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ages = AGE_BIN_CENTERS.to_value("Gyr")
    ax.errorbar(ages, metrics["cnn_sfr_error"], yerr=metrics["cnn_sfr_error_err"], fmt="o-")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("age (Gyr)")
    ax.set_ylabel(r"$\langle {\rm SFR_{in}} - {\rm SFR_{pred}}\rangle"
                  r" / \langle{\rm SFR_{in}}\rangle$")
    fig.tight_layout()
    fig.savefig(outdir / "eval_sfr_error.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    snrs = [float(s) for s in metrics["snr_dependence"]]
    for q in QUANTITIES:
        sc = [metrics["snr_dependence"][k][q]["scatter"] for k in metrics["snr_dependence"]]
        bi = [metrics["snr_dependence"][k][q]["bias"] for k in metrics["snr_dependence"]]
        axes[0].plot(snrs, sc, "o-", label=_LABELS[q])
        axes[1].plot(snrs, bi, "o-", label=_LABELS[q])
    for ax, lab in zip(axes, ("scatter (dex)", "bias (dex)")):
        ax.set_xscale("log")
        ax.set_xlabel("S/N per Angstrom")
        ax.set_ylabel(lab)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "eval_snr.png", dpi=90)
    plt.close(fig)


def _comparison_figure(truth, cnn, ppxf, path):
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.2))
    for j, q in enumerate(QUANTITIES):
        for i, (name, pr) in enumerate((("CNN", cnn), ("pPXF", ppxf))):
            ax = axes[i, j]
            ax.plot(truth[q], pr[q], ".", ms=3, alpha=0.6)
            lo, hi = np.nanpercentile(np.r_[truth[q], pr[q]], [0.5, 99.5])
            ax.plot([lo, hi], [lo, hi], "k:", lw=1)
            d = pr[q] - truth[q]
            ax.set_title(f"{name} {_LABELS[q]}\nbias {np.nanmean(d):+.3f} "
                         f"scatter {np.nanstd(d):.3f}", fontsize=8)
            ax.set_xlabel("true", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def metrics_to_rst(metrics):
    """
    reStructuredText tables of an evaluation (included by the docs).

    Parameters
    ----------
    metrics : dict
        Output of `evaluate`.

    Returns
    -------
    text : str
    """
    def row(name, stats):
        cells = [name]
        for q in QUANTITIES:
            s = stats[q]
            cells.append(f"{s['bias']:+.3f} / {s['scatter']:.3f}")
        return cells

    def table(rows, header):
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = "  ".join("=" * w for w in widths)
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [line, fmt.format(*header), line]
        out += [fmt.format(*r) for r in rows]
        out.append(line)
        return "\n".join(out)

    header = ["set", "log age LW", "log age MW", "[Z/H] LW", "[Z/H] MW"]
    parts = [f"Held-out test set: {metrics['n_test']} spectra (bias / scatter in dex, "
             "prediction minus truth).", "",
             table([row("CNN, all five bands", metrics["cnn"])], header), ""]
    if "cnn150_on_s300" in metrics:
        parts += ["The paper's 150 km/s network on the same (300 km/s) test spectra:", "",
                  table([row("150 km/s CNN", metrics["cnn150_on_s300"])], header), ""]
    if "comparison" in metrics:
        c = metrics["comparison"]
        parts += [f"CNN versus pPXF on the same {c['n']} test spectra "
                  f"({c['ppxf_failed']} pPXF failures):", "",
                  table([row("CNN", c["cnn"]), row("pPXF", c["ppxf"])], header), "",
                  f"Speed: CNN {metrics['cnn_seconds_per_spectrum'] * 1e3:.3f} ms per spectrum "
                  f"(batched), pPXF {metrics['ppxf_seconds_per_spectrum']:.2f} s per spectrum: "
                  f"pPXF / CNN = {metrics['speed_ratio']:.3g}.", ""]
    rows = [row(f"S/N = {k}", v) for k, v in metrics["snr_dependence"].items()]
    parts += ["Dependence on the S/N per Angstrom (noise-free test spectra re-noised):", "",
              table(rows, header), ""]
    names = {"all": "all five bands", "optical_only": "F438W, F555W, F814W only",
             "spectrum_only": "spectrum only"}
    rows = [row(names.get(k, k.replace("no_", "without ")), v)
            for k, v in metrics["ablation"].items()]
    parts += ["HST bands removed (the same network, band mask set accordingly):", "",
              table(rows, header), ""]
    if "coverage" in metrics:
        parts += [_coverage_text(metrics["coverage"], "the test split"), ""]
    return "\n".join(parts)


def _table(rows, header):
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("=" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line, fmt.format(*header), line, *[fmt.format(*r) for r in rows], line])


def _coverage_text(cov, where):
    header = ["quantity", "68 % interval", "95 % interval", "median 68 % width",
              "PIT min / max"]
    rows = []
    for q in QUANTITIES:
        c = cov[q]
        rows.append([q, f"{100 * c['cov68']:.1f} %", f"{100 * c['cov95']:.1f} %",
                     f"{c['median_width68']:.3f} dex",
                     f"{min(c['pit']):.2f} / {max(c['pit']):.2f}"])
    rows.append(["SFH, 16 bins", f"{100 * cov['sfh']['cov68']:.1f} %",
                 f"{100 * cov['sfh']['cov95']:.1f} %", "", ""])
    return "\n".join([
        f"Coverage of the calibrated intervals on {where} (fraction of spectra whose "
        f"truth lies inside; PIT histogram in 10 bins normalised to a mean of 1, flat = "
        f"calibrated). Flagged out of distribution: {100 * cov['ood_fraction']:.2f} %.", "",
        _table(rows, header)])


def heldout_to_rst(metrics, previous=None):
    """
    reStructuredText tables of a leave-one-library-out evaluation.

    Parameters
    ----------
    metrics : dict
        Output of `evaluate_heldout`.
    previous : dict, optional
        The same evaluation of an earlier network, shown for comparison.

    Returns
    -------
    text : str
    """
    header = ["method", "log age LW", "log age MW", "[Z/H] LW", "[Z/H] MW"]

    def row(name, stats):
        return [name] + [f"{stats[q]['bias']:+.3f} / {stats[q]['scatter']:.3f}"
                         for q in QUANTITIES]

    rows = [row(f"CNN ({metrics['n']} spectra)", metrics["cnn"])]
    if previous is not None:
        rows.append(row("previous CNN (paper prior, BC03 only)", previous["cnn"]))
    if "comparison" in metrics:
        c = metrics["comparison"]
        rows += [row(f"CNN, first {c['n']}", c["cnn"]), row(f"pPXF, first {c['n']}",
                                                             c["ppxf"])]
    parts = [f"Spectra simulated with the held-out library ({metrics['library']}/"
             f"{metrics['stellib']}, {metrics['prior']} prior, training S/N), analysed by "
             "the CNN and by pPXF with the BC03 templates (bias / scatter in dex):", "",
             _table(rows, header), ""]
    if "coverage" in metrics:
        parts += [_coverage_text(metrics["coverage"], "the held-out library"), ""]
    for snr, entry in metrics.get("low_snr", {}).items():
        if "coverage" in entry:
            parts += [f"Re-noised at S/N = {float(snr):g}: CNN "
                      + ", ".join(f"{q} {entry['cnn'][q]['bias']:+.3f} / "
                                  f"{entry['cnn'][q]['scatter']:.3f}" for q in QUANTITIES)
                      + ".", "", _coverage_text(entry["coverage"],
                                                f"the held-out library at S/N {float(snr):g}"),
                      ""]
    return "\n".join(parts)
