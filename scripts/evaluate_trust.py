#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Trustworthiness metrics of the bundled networks (``docs/evaluation.rst``).

Usage::

    python scripts/evaluate_trust.py TS150.h5 TS300.h5 [--outdir docs/_static]
        [--n-ppxf 150] [--n-heldout 5000] [--baseline OLD150.pt]

1. Each bundled network on the test split of its own training set
   (:func:`cubesfh.network._evaluate.evaluate`: accuracy, coverage of the
   calibrated intervals, PIT histograms, OOD rate, S/N dependence, band
   ablation, CNN vs pPXF) -> ``metrics.json`` / ``metrics_s300.json``.
2. Leave-one-library-out: spectra simulated with the held-out E-MILES library
   (:func:`cubesfh.network._evaluate.evaluate_heldout`), CNN and pPXF with the
   BC03 templates, at the training S/N and re-noised at S/N 5 and 10 ->
   ``metrics_heldout.json`` (and ``metrics_heldout_s300.json``). With
   ``--baseline`` the previous network is evaluated on the same spectra.

The training sets are made by ``scripts/train_bundled_models.sh``.
"""

import argparse
import json
import logging
from pathlib import Path

from cubesfh.network import BUNDLED_MODELS, SFHModel
from cubesfh.network._evaluate import (
    evaluate,
    evaluate_heldout,
    heldout_to_rst,
    metrics_to_rst,
)
from cubesfh.templates import load_heldout_library


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("ts150")
    p.add_argument("ts300")
    p.add_argument("--outdir", type=Path, default=Path("docs/_static"))
    p.add_argument("--n-ppxf", type=int, default=150)
    p.add_argument("--n-heldout", type=int, default=5000)
    p.add_argument("--baseline", nargs="*", default=(),
                   help="earlier networks (.pt) to evaluate on the held-out spectra too")
    p.add_argument("--skip-own", action="store_true", help="only the held-out library")
    p.add_argument("--only", choices=("150", "300"), help="evaluate one network only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.outdir.mkdir(parents=True, exist_ok=True)
    models = [SFHModel.load(stem.with_suffix(".pt")) for stem in BUNDLED_MODELS]
    heldout = load_heldout_library()
    previous = {}
    for path in args.baseline:
        old = SFHModel.load(path)
        tag = "_s300" if old.sigma_target.value > 200 else ""
        if args.only and args.only != ("300" if tag else "150"):
            continue
        previous[tag] = evaluate_heldout(heldout, old, n=args.n_heldout, n_ppxf=0,
                                         output_json=args.outdir
                                         / f"metrics_heldout{tag}_previous.json",
                                         progress_bar=False)
        print("previous", path, json.dumps(previous[tag]["cnn"]))
    for model, ts, tag in ((models[0], args.ts150, ""), (models[1], args.ts300, "_s300")):
        if args.only and args.only != ("300" if tag else "150"):
            continue
        if not args.skip_own:
            m = evaluate(ts, model, n_ppxf=args.n_ppxf, output_json=args.outdir
                         / f"metrics{tag}.json", figure_dir=args.outdir if not tag else None,
                         progress_bar=False)
            (args.outdir / f"metrics{tag}.rst").write_text(metrics_to_rst(m))
            print(tag or "150", json.dumps({k: m[k] for k in ("cnn", "coverage") if k in m}))
        h = evaluate_heldout(heldout, model, n=args.n_heldout, n_ppxf=args.n_ppxf,
                             output_json=args.outdir / f"metrics_heldout{tag}.json",
                             progress_bar=False)
        (args.outdir / f"metrics_heldout{tag}.rst").write_text(
            heldout_to_rst(h, previous.get(tag)))
        print("heldout", tag, json.dumps({k: h[k] for k in ("cnn", "comparison", "coverage")
                                          if k in h}))


if __name__ == "__main__":
    main()
