#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Robustness metrics of a network against an earlier one (issue 17, ``docs/evaluation.rst``).

Usage::

    python scripts/evaluate_robustness.py TS.h5 --model NEW.pt --baseline OLD.pt
        [--n 5000] [--n-own 5000] [--n-ppxf 150] [--output docs/_static/metrics_robustness.json]

On the same spectra, for the network ``--model`` and the earlier ``--baseline``
(each ``.pt`` with its ``.json`` beside it):

1. **held-out library**: ``--n`` spectra of the simulator prior made with the
   E-MILES library (never used for training or tuning; seed 2026, as
   ``cubesfh evaluate --heldout``), at the training S/N and re-noised at
   S/N 10;
2. **own test split**: the first ``--n-own`` spectra of the test split of the
   training set ``TS.h5`` (seed 42, the split of the bundled networks), at
   their stored S/N;

each **without and with the MUSE AO notch** (observed 5780-6050 A, NaN, at a
redshift drawn uniformly in 0-0.03 per spectrum); and 3. the project's mock
galaxy (``cubesfh make-mock``) against the same mock as a MUSE WFM-AO cube,
through the pipeline (binning, true kinematics, five bands or none). Reported per network and
case: bias / scatter of LW and MW log age and [Z/H], the coverage of the
68 % and 95 % intervals (also of the mass fractions younger than 0.1, 1 and
5 Gyr), the share flagged out of distribution, and for the notch the median
shift and the scatter ratio against the same spectra without it. pPXF (BC03
templates) fits the first ``--n-ppxf`` held-out spectra at the training S/N.
The baseline is run as cubesfh 0.3 + the interim gap filling (template
completion) when it has no validity channel.

Writes the JSON and an RST summary beside it (``.rst``). About 10 minutes
on 2 cores with pPXF.
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np

QUANTITIES = ("logage_lw", "logage_mw", "zh_lw", "zh_mw")
AO_NOTCH = (5780.0, 6050.0)


def _notch(wavelength, n, seed=7):
    z = np.random.default_rng(seed).uniform(0.0, 0.03, n)
    w = np.asarray(wavelength)[None, :]
    return (w >= AO_NOTCH[0] / (1 + z)[:, None]) & (w <= AO_NOTCH[1] / (1 + z)[:, None])


def _stats(model, spectra, photometry, truth, reference=None):
    from cubesfh.network._evaluate import coverage_statistics, summary_statistics

    pred = model.predict(spectra, photometry)
    out = {"accuracy": summary_statistics(pred, truth)}
    if model.has_uncertainty:
        out["coverage"] = coverage_statistics(pred, truth)
    if reference is not None:
        out["shift"] = {}
        for q in QUANTITIES:
            d = pred[q] - reference[q]
            e_gap = np.std(pred[q] - truth[q])
            e_ref = np.std(reference[q] - truth[q])
            out["shift"][q] = {"median": float(np.median(d)),
                               "nmad": float(1.4826 * np.median(np.abs(d - np.median(d)))),
                               "scatter_ratio": float(e_gap / e_ref)}
    return out, pred


def _cases(models, spectra, photometry, truth, wavelength):
    gap = _notch(wavelength, len(spectra))
    out = {"gap_fraction_median": float(np.median(gap.mean(axis=1)))}
    for name, m in models.items():
        ref_stats, ref = _stats(m, spectra, photometry, truth)
        gap_stats, _ = _stats(m, np.where(gap, np.nan, spectra), photometry, truth, ref)
        out[name] = {"complete": ref_stats, "ao_notch": gap_stats}
    return out


def heldout(models, n, n_ppxf):
    from cubesfh.network._evaluate import simulate_heldout
    from cubesfh.synthesis import ForwardModel
    from cubesfh.templates import load_heldout_library

    ref_model = next(iter(models.values()))
    fm, _, sim = simulate_heldout(load_heldout_library(), ref_model.sigma_target, n=n)
    truth = {k: sim[k] for k in (*QUANTITIES, "mass_fraction")}
    w = fm.wavelength.value
    out = {"n": int(n), "training_snr": _cases(models, sim["spectra"], sim["photometry"], truth,
                                               w)}
    noisy, ph, _ = fm.add_noise(np.random.default_rng([2026, 12]), sim["spectra_noiseless"],
                                sim["photometry_noiseless"], 10.0)
    out["snr10"] = _cases(models, noisy, ph, truth, w)
    if n_ppxf:
        from cubesfh.baseline import BaselineTemplates, fit_populations
        from cubesfh.network._evaluate import summary_statistics

        k = min(n_ppxf, n)
        var = np.clip(sim["spectra_noiseless"][:k], 0, None) / (sim["snr"][:k, None] ** 2 * 1.25)
        res = fit_populations(sim["spectra"][:k], var, sim["photometry"][:k],
                              templates=BaselineTemplates(ForwardModel(
                                  sigma_target=ref_model.sigma_target)), progress_bar=False)
        sub = {q: truth[q][:k] for q in QUANTITIES}
        out["ppxf"] = {"n": int(k),
                       "ppxf": summary_statistics({q: np.asarray(res[q]) for q in QUANTITIES},
                                                  sub)}
        for name, m in models.items():
            p = m.predict(sim["spectra"][:k], sim["photometry"][:k])
            out["ppxf"][name] = summary_statistics(p, sub)
    return out


def own_split(models, ts, n_own):
    import h5py

    from cubesfh.network._train import _read_rows, split_indices

    with h5py.File(ts, "r") as f:
        _, _, test = split_indices(f["spectra"].shape[0], 42)
        idx = np.sort(test[:n_own])
        spec = _read_rows(f["spectra"], idx).astype(float)
        phot = _read_rows(f["photometry"], idx).astype(float)
        # the stored labels (each library's own light-to-mass ratios), as cubesfh evaluate
        truth = {"mass_fraction": _read_rows(f["mass_fraction"], idx).astype(float),
                 **{q: f[q][:][idx] for q in QUANTITIES}}
        w = f["wavelength"][:]
    return {"n": int(len(idx)), "training_set": Path(ts).name,
            **_cases(models, spec, phot, truth, w)}


def own_mock_ao(models):
    """The project's mock galaxy (BC03, 40 x 40) and its AO version: shift of the bin values."""
    from evaluate_gaps import mock_pair  # scripts/ is on the path of a script

    from cubesfh import pipeline

    full, ao = mock_pair()
    out = {"n_bins": int(ao.n_bins)}
    for name, m in models.items():
        out[name] = {}
        for phot in (True, False):
            ref = pipeline.predict_bins(full, model=m, photometry=phot)
            gap = pipeline.predict_bins(ao, model=m, photometry=phot)
            out[name]["five_bands" if phot else "spectrum_only"] = {
                q: {"median_shift": float(np.nanmedian(gap[q] - ref[q])),
                    "rms_shift": float(np.sqrt(np.nanmean((gap[q] - ref[q]) ** 2))),
                    "median_err_ratio": float(np.nanmedian(gap[f"{q}_err"] / ref[f"{q}_err"]))}
                for q in QUANTITIES}
    return out


def to_rst(m):
    names = {"logage_lw": "LW log age", "logage_mw": "MW log age", "zh_lw": "LW [Z/H]",
             "zh_mw": "MW [Z/H]", "mass_younger_0.1gyr": "mass < 0.1 Gyr",
             "mass_younger_1gyr": "mass < 1 Gyr", "mass_younger_5gyr": "mass < 5 Gyr"}
    lines = []

    def table(title, rows, header):
        lines.extend(["", f".. list-table:: {title}", "   :header-rows: 1", ""])
        for r in [header] + rows:
            lines.append("   * - " + r[0])
            lines.extend(f"     - {c}" for c in r[1:])

    for where, label in (("heldout", "held-out E-MILES"), ("own", "own test split")):
        for snr in (("training_snr", "snr10") if where == "heldout" else (None,)):
            block = m[where][snr] if snr else m[where]
            tag = f"{label}{', S/N 10' if snr == 'snr10' else ''}"
            rows = []
            for q in QUANTITIES:
                row = [names[q]]
                for name in m["models"]:
                    for case in ("complete", "ao_notch"):
                        a = block[name][case]["accuracy"][q]
                        row.append(f"{a['bias']:+.3f} / {a['scatter']:.3f}")
                rows.append(row)
            header = ["quantity"] + [f"{n} {c}" for n in m["models"]
                                     for c in ("complete", "AO notch")]
            table(f"Bias / scatter (dex), {tag}", rows, header)
            rows = []
            for q in (*QUANTITIES, "mass_younger_0.1gyr", "mass_younger_1gyr",
                      "mass_younger_5gyr"):
                row = [names[q]]
                for name in m["models"]:
                    for case in ("complete", "ao_notch"):
                        c = block[name][case].get("coverage", {}).get(q)
                        row.append(f"{100 * c['cov68']:.1f} / {100 * c['cov95']:.1f}"
                                   if c else "--")
                rows.append(row)
            table(f"Coverage of the 68 % / 95 % intervals (%), {tag}", rows, header)
            rows = []
            for q in QUANTITIES:
                row = [names[q]]
                for name in m["models"]:
                    s = block[name]["ao_notch"]["shift"][q]
                    row.append(f"{s['median']:+.3f} / {s['scatter_ratio']:.2f}")
                rows.append(row)
            table(f"AO notch: median shift (dex) / scatter ratio, {tag}", rows,
                  ["quantity", *m["models"]])
    if "own_mock" in m:
        rows = []
        for case, label in (("five_bands", "five bands"), ("spectrum_only", "spectrum only")):
            for q in QUANTITIES:
                rows.append([f"{names[q]}, {label}",
                             *(f"{m['own_mock'][n][case][q]['median_shift']:+.3f} / "
                               f"{m['own_mock'][n][case][q]['rms_shift']:.3f} / "
                               f"{m['own_mock'][n][case][q]['median_err_ratio']:.2f}"
                               for n in m["models"])])
        table("Own mock galaxy as a MUSE AO cube: median / rms shift of the bin values (dex) "
              "and median ratio of the 68 % half-widths, against the same mock without the "
              "notch", rows, ["quantity", *m["models"]])
    if "ppxf" in m["heldout"]:
        p = m["heldout"]["ppxf"]
        rows = [[names[q], *(f"{p[k][q]['bias']:+.3f} / {p[k][q]['scatter']:.3f}"
                             for k in (*m["models"], "ppxf"))] for q in QUANTITIES]
        table(f"CNN and pPXF on the same {p['n']} held-out spectra (bias / scatter, dex)", rows,
              ["quantity", *m["models"], "pPXF (BC03)"])
    return "\n".join(lines) + "\n"


def main(argv=None):
    from cubesfh.network import SFHModel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("training_set")
    p.add_argument("--model", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--n-own", type=int, default=5000)
    p.add_argument("--n-ppxf", type=int, default=150)
    p.add_argument("--output", type=Path, default=Path("docs/_static/metrics_robustness.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    models = {"new": SFHModel.load(args.model), "baseline": SFHModel.load(args.baseline)}
    m = {"models": list(models), "model_ids": {k: v.model_id for k, v in models.items()},
         "heldout": heldout(models, args.n, args.n_ppxf),
         "own": own_split(models, args.training_set, args.n_own),
         "own_mock": own_mock_ao(models)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(m, indent=1))
    args.output.with_suffix(".rst").write_text(to_rst(m))
    print(to_rst(m))


if __name__ == "__main__":
    main()
