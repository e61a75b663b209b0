#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Accuracy and interval coverage of the physical quantities (issue 19, ``docs/physical.rst``).

Usage::

    python scripts/evaluate_physical.py [--n 5000] [--output docs/_static/metrics_physical.json]

For each bundled network, on ``--n`` spectra of the simulator prior made with
the held-out E-MILES library (never used for training or tuning; seed 2026,
the spectra of ``cubesfh evaluate --heldout``), with the five HST bands,
without and with the MUSE AO notch (observed 5780-6050 A at z in 0-0.03),
and spectrum only: bias, NMAD and the coverage of the 68 % and 95 %
intervals of the stellar A_V (attenuation head) and of log Sigma_star as the
product estimates it (template M/L_V of the predicted SFH and Z(t) times the
dust-corrected V-band luminosity; :func:`cubesfh.physical.physical_columns`),
as given (Chabrier IMF, that of the templates) and converted to the IMF of
E-MILES (unimodal slope 1.30, i.e. Salpeter's) with ``--imf salpeter``.
Writes the JSON and an RST table beside it (``.rst``). About 2 minutes.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from astropy import units as u

AO_NOTCH = (5780.0, 6050.0)


def _stats(residual, half68, half95):
    r = residual[np.isfinite(residual)]
    ok = np.isfinite(residual) & np.isfinite(half68)
    med = float(np.median(r))
    return {"bias": med, "nmad": float(1.4826 * np.median(np.abs(r - med))),
            "cover68": float(np.mean(np.abs(residual[ok]) <= half68[ok])),
            "cover95": float(np.mean(np.abs(residual[ok]) <= half95[ok])), "n": int(ok.sum())}


def evaluate(model, n, seed=2026):
    from cubesfh.conventions import OUTPUT_WAVELENGTH
    from cubesfh.network._evaluate import simulate_heldout
    from cubesfh.network._physical import _estimator_residual
    from cubesfh.physical import IMF_FACTORS, L_V_SUN, v_window_flux
    from cubesfh.templates import load_heldout_library

    _, _, sim = simulate_heldout(load_heldout_library(), model.sigma_target, n=n, seed=seed)
    spectra = sim["spectra"]
    lv = L_V_SUN.to_value(u.solLum / u.AA)
    data = {"log_lv_observed": np.log10(v_window_flux(spectra) * sim["norm"] / lv),
            "log_mstar": sim["log_mstar"],
            "log_ml_v": sim["log_mstar"] - sim["log_lv_intrinsic"] + np.log10(lv)}
    z = np.random.default_rng(7).uniform(0.0, 0.03, n)
    w = OUTPUT_WAVELENGTH.to_value(u.AA)[None, :]
    notch = (w >= AO_NOTCH[0] / (1 + z)[:, None]) & (w <= AO_NOTCH[1] / (1 + z)[:, None])
    out = {}
    for case, spec, phot in (("five bands", spectra, sim["photometry"]),
                             ("five bands, AO notch", np.where(notch, np.nan, spectra),
                              sim["photometry"]),
                             ("spectrum only", spectra, None)):
        pred = model.predict(spec, phot)
        r_sd, _ = _estimator_residual(pred, data, pred["av_stars"])
        r_av = pred["av_stars"] - sim["av_stars"]
        k = np.asarray(model.meta["physical_head"]["conformal_k"])
        out[case] = {
            "av_stars": _stats(r_av, pred["av_stars_err"], pred["av_stars_err"] * k[1, 0]
                               / k[0, 0]),
            "logmstar_sd": _stats(r_sd, pred["logmstar_sd_err"], pred["logmstar_sd_err95"]),
            # E-MILES has a unimodal 1.30 (Salpeter-slope) IMF: its masses are those of
            # the product converted with --imf salpeter
            "logmstar_sd_salpeter": _stats(r_sd + np.log10(IMF_FACTORS["salpeter"]["mass"]),
                                           pred["logmstar_sd_err"], pred["logmstar_sd_err95"]),
        }
    return out


def main(argv=None):
    from cubesfh.network import bundled_models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--output", default="docs/_static/metrics_physical.json")
    a = p.parse_args(argv)
    result = {"n": a.n, "library": "E-MILES (held out)", "models": {}}
    for m in bundled_models():
        result["models"][f"{m.sigma_target.value:g} km/s ({m.model_id})"] = evaluate(m, a.n)
    out = Path(a.output)
    out.write_text(json.dumps(result, indent=1))
    rows = []
    for name, cases in result["models"].items():
        for case, qs in cases.items():
            for q, s in qs.items():
                unit = "mag" if q == "av_stars" else "dex"
                rows.append((name, case, q, f"{s['bias']:+.3f} {unit}", f"{s['nmad']:.3f}",
                             f"{100 * s['cover68']:.1f}", f"{100 * s['cover95']:.1f}"))
    head = ("network", "inputs", "quantity", "bias", "NMAD", "68 % cover", "95 % cover")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = " ".join("=" * w for w in widths)
    text = [line, " ".join(h.ljust(w) for h, w in zip(head, widths)), line]
    text += [" ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    text.append(line)
    out.with_suffix(".rst").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
