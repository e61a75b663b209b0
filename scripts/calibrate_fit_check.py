#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Calibrate and measure the fit check (POOR_FIT, PHOT_TENSION; issue 18, ``docs/fitcheck.rst``).

Usage::

    python scripts/calibrate_fit_check.py [--n 1500] [--n-ppxf 60] [--dry-run]
        [--output docs/_static/metrics_fitcheck.json]

For each bundled network:

1. **calibration** (stored in the model's metadata as ``fit_check``): spectra
   of the broad simulator (the three training libraries, model systematics,
   HST offsets; seed 4242, a stream of its own) at S/N 15, 20, 35, 50, 80
   and 120 per A, ``--n`` each, all five bands. POOR_FIT: the 97.5th
   percentile of the reduced chi^2 of the re-synthesised CNN answer at each
   S/N (:func:`cubesfh.synthesis.resynthesis.fit_check`) and of its HST chi^2
   per degree of freedom (a bin is flagged above either); the
   PHOT_TENSION limit is the 95th percentile of the largest |z| of the HST
   fluxes against the spectrum-only answer.
2. **measurement** on an independent draw of the same simulator (seed 4343)
   and on the held-out E-MILES library (never used for training or tuning):
   the share of correct answers flagged; the share flagged when every
   spectrum is given the answer of another spectrum whose LW age differs by
   at least 0.5 dex (a wrong SFH); PHOT_TENSION
   with one band multiplied by 2.5 and with F275W in counts read as counts/s
   (x 1000); and, on the first ``--n-ppxf`` E-MILES spectra at S/N 35, the
   median chi^2_CNN / chi^2_pPXF on the same pixels and noise.

Writes the JSON and an RST table beside it. About 10 minutes on 2 cores.
"""

import argparse
import json
from pathlib import Path

import numpy as np

SNRS = (15.0, 20.0, 35.0, 50.0, 80.0, 120.0)
#: Each of the two POOR_FIT tests (spectrum, HST fluxes) at 97.5 %: together ~5 %.
QUANTILE = 0.975
TENSION_QUANTILE = 0.975
#: A wrong answer: that of another spectrum whose LW age differs by this much (dex).
WRONG_AGE = 0.5


def simulate(sigma_target, n, snr, seed, library=None):
    """Spectra, variances, photometry of the broad simulator (or a held-out library)."""
    from cubesfh.synthesis import ForwardModel
    from cubesfh.synthesis.trainingset import (
        DEFAULT_MIX,
        _family_plan,
        simulate_samples,
        training_models,
        with_young_from_bc03,
    )

    if library is None:
        models, syst = training_models(sigma_target)
    else:
        models = [ForwardModel(with_young_from_bc03(library), sigma_target=sigma_target)]
        syst = None
    rng = np.random.default_rng([seed, int(snr)])
    out = simulate_samples(rng, _family_plan(n, DEFAULT_MIX, seed + int(snr)), models,
                           prior="broad", snr=snr, systematics=syst)
    var = np.clip(out["spectra_noiseless"], 0, None) / (snr**2 * 1.25)
    return out["spectra"], var, out["photometry"], out["logage_lw"]


def wrong_partners(age, seed):
    """For each spectrum, another whose LW age differs by >= WRONG_AGE dex (random)."""
    rng = np.random.default_rng(seed)
    out = np.arange(age.size)
    for i in range(age.size):
        far = np.flatnonzero(np.abs(age - age[i]) >= WRONG_AGE)
        if far.size:
            out[i] = rng.choice(far)
    return out


def checks(model, fm, spec, var, phot, age, seed=0):
    from cubesfh.synthesis.resynthesis import fit_check

    full = model.predict(spec, phot, uncertainty=False)
    alone = model.predict(spec, None, uncertainty=False)
    fit = fit_check(spec, var, phot, full["mass_fraction"], full["metallicity"],
                    forward_model=fm)
    ten = fit_check(spec, var, phot, alone["mass_fraction"], alone["metallicity"],
                    forward_model=fm)
    perm = wrong_partners(age, seed)
    wrong = fit_check(spec, var, phot, full["mass_fraction"][perm], full["metallicity"][perm],
                      forward_model=fm)
    return fit, ten, wrong, alone


def max_abs(z):
    return np.nanmax(np.abs(z), axis=1)


def tension_of(model, fm, spec, var, phot, alone):
    from cubesfh.synthesis.resynthesis import fit_check

    return max_abs(fit_check(spec, var, phot, alone["mass_fraction"], alone["metallicity"],
                             forward_model=fm)["phot_z_loo"])


def main(argv=None):
    from cubesfh.network import bundled_models
    from cubesfh.network._physical import attach_metadata
    from cubesfh.network._predict import BUNDLED_MODELS
    from cubesfh.synthesis import ForwardModel
    from cubesfh.synthesis.resynthesis import calibrated_limit, fit_check
    from cubesfh.templates import load_heldout_library

    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--n-ppxf", type=int, default=60)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--output", default="docs/_static/metrics_fitcheck.json")
    a = p.parse_args(argv)
    heldout = load_heldout_library()
    result = {"n_per_snr": a.n, "snr": list(SNRS), "quantile": QUANTILE, "models": {}}
    for stem, model in zip(BUNDLED_MODELS, bundled_models()):
        sig = model.sigma_target
        fm = ForwardModel(sigma_target=sig)
        chi2_limit, tension_all, phot_all = [], [], []
        for snr in SNRS:
            spec, var, phot, age = simulate(sig, a.n, snr, 4242)
            fit, ten, _, _ = checks(model, fm, spec, var, phot, age)
            chi2_limit.append(float(np.nanquantile(fit["chi2"], QUANTILE)))
            phot_all.append(fit["phot_chi2"])
            tension_all.append(max_abs(ten["phot_z_loo"]))
        cal = {"chi2": {"snr": list(SNRS), "limit": chi2_limit, "quantile": QUANTILE},
               "phot_chi2": {"limit": float(np.nanquantile(np.concatenate(phot_all),
                                                           QUANTILE)),
                             "quantile": QUANTILE},
               "tension": {"limit": float(np.nanquantile(np.concatenate(tension_all),
                                                         TENSION_QUANTILE)),
                           "quantile": TENSION_QUANTILE},
               "method": "percentiles over broad-simulator spectra (training libraries, "
                         "model systematics, HST offsets; seed 4242) of the correct answers: "
                         "the reduced chi2 of the re-synthesised spectrum per S/N and the "
                         "HST chi2 per dof (97.5 % each; POOR_FIT if either is above), and "
                         "the largest |z| of the HST fluxes against the spectrum-only "
                         "answer (95 %, PHOT_TENSION)"}
        per = {}
        for label, lib, seed in (("simulator (independent draw)", None, 4343),
                                 ("E-MILES (held out)", heldout, 2026)):
            rows = {}
            for snr in SNRS:
                spec, var, phot, age = simulate(sig, a.n, snr, seed, lib)
                fit, ten, wrong, alone = checks(model, fm, spec, var, phot, age, seed)
                lim = calibrated_limit(cal["chi2"], fit["snr"])
                pl = cal["phot_chi2"]["limit"]

                def poor(f, lim=lim, pl=pl):
                    return (f["chi2"] > lim) | (f["phot_chi2"] > pl)

                tl = cal["tension"]["limit"]
                bad = phot.copy()
                k = np.arange(len(phot)) % 5  # each band in turn, x 2.5
                bad[np.arange(len(phot)), k] *= 2.5
                counts = phot.copy()
                counts[:, 0] *= 1000.0
                rows[f"{snr:g}"] = {
                    "median_chi2": float(np.nanmedian(fit["chi2"])),
                    "poor_fit_correct": float(np.mean(poor(fit))),
                    "poor_fit_wrong": float(np.mean(poor(wrong))),
                    "poor_fit_wrong_spectrum_only": float(np.mean(wrong["chi2"] > lim)),
                    "tension_correct": float(np.mean(max_abs(ten["phot_z_loo"]) > tl)),
                    "tension_band_x2.5": float(np.mean(
                        tension_of(model, fm, spec, var, bad, alone) > tl)),
                    "tension_f275w_counts": float(np.mean(
                        tension_of(model, fm, spec, var, counts, alone) > tl)),
                }
            per[label] = rows
        # chi2 against pPXF on the same pixels (E-MILES, S/N 35)
        if a.n_ppxf:
            from cubesfh.baseline import fit_populations, templates_at

            spec, var, phot, _ = simulate(sig, a.n_ppxf, 35.0, 2026, heldout)
            full = model.predict(spec, phot, uncertainty=False)
            fit = fit_check(spec, var, phot, full["mass_fraction"], full["metallicity"],
                            forward_model=fm)
            tab = fit_populations(spec, var, phot, templates=templates_at(sig.value),
                                  progress_bar=False)
            from cubesfh.synthesis.resynthesis import fit_chi2

            chi_p = fit_chi2(spec, var, np.asarray(tab["bestfit"]), fit["good"])
            ratio = fit["chi2"] / chi_p
            per["E-MILES (held out)"]["ppxf_ratio_snr35"] = {
                "median": float(np.nanmedian(ratio)), "n": int(np.isfinite(ratio).sum()),
                "median_chi2_cnn": float(np.nanmedian(fit["chi2"])),
                "median_chi2_ppxf": float(np.nanmedian(chi_p))}
        cal["metrics"] = per
        name = f"{sig.value:g} km/s ({model.model_id})"
        result["models"][name] = cal
        print(name, json.dumps(cal, indent=1))
        if not a.dry_run:
            attach_metadata(stem, "fit_check", cal)
    out = Path(a.output)
    out.write_text(json.dumps(result, indent=1))
    lines = []
    for name, cal in result["models"].items():
        head = ("S/N", "chi2 limit", "library", "median chi2", "POOR_FIT correct",
                "POOR_FIT wrong SFH", "(spectrum alone)", "TENSION correct",
                "TENSION band x2.5", "TENSION F275W counts")
        rows = []
        for label, per in cal["metrics"].items():
            for j, snr in enumerate(SNRS):
                r = per[f"{snr:g}"]
                rows.append((f"{snr:g}", f"{cal['chi2']['limit'][j]:.2f}", label.split()[0],
                             f"{r['median_chi2']:.2f}", f"{100 * r['poor_fit_correct']:.1f}",
                             f"{100 * r['poor_fit_wrong']:.1f}",
                             f"{100 * r['poor_fit_wrong_spectrum_only']:.1f}",
                             f"{100 * r['tension_correct']:.1f}",
                             f"{100 * r['tension_band_x2.5']:.1f}",
                             f"{100 * r['tension_f275w_counts']:.1f}"))
        widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
        rule = " ".join("=" * w for w in widths)
        lines += [f"**{name}**: HST chi2 limit {cal['phot_chi2']['limit']:.2f}, TENSION "
                  f"limit {cal['tension']['limit']:.2f} sigma", "",
                  rule, " ".join(h.ljust(w) for h, w in zip(head, widths)), rule]
        lines += [" ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines += [rule, ""]
        pr = cal["metrics"]["E-MILES (held out)"].get("ppxf_ratio_snr35")
        if pr:
            lines += [f"E-MILES, S/N 35, {pr['n']} spectra: median chi2_CNN / chi2_pPXF = "
                      f"{pr['median']:.2f} (chi2 {pr['median_chi2_cnn']:.2f} and "
                      f"{pr['median_chi2_ppxf']:.2f}).", ""]
    out.with_suffix(".rst").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
