#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Export and evaluate the 300 km/s network of the bundled family.

Usage::

    python scripts/evaluate_s300.py RUN_DIR TRAINING_SET [--n-ppxf 150] [--outdir docs/_static]

``RUN_DIR`` is the ``cubesfh train`` output folder, ``TRAINING_SET`` the
300 km/s training set it was trained on (see ``docs/network.rst``). Writes
``cubesfh/network/data/sfhnet_s300.{pt,json}`` (with the metrics in the
metadata) and ``OUTDIR/metrics_s300.{json,rst}``, which add to the output of
``cubesfh evaluate`` the paper's 150 km/s network's predictions on the same
test spectra.
"""

import argparse
import json
from pathlib import Path

import h5py

from cubesfh.network import BUNDLED_MODELS, SFHModel, export_model
from cubesfh.network._evaluate import QUANTITIES, evaluate, metrics_to_rst, summary_statistics
from cubesfh.network._train import split_indices


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("training_set", type=Path)
    parser.add_argument("--n-ppxf", type=int, default=150)
    parser.add_argument("--outdir", type=Path, default=Path("docs/_static"))
    args = parser.parse_args(argv)

    stem = BUNDLED_MODELS[1]
    model = SFHModel.load(export_model(args.run_dir, stem))
    out_json = args.outdir / "metrics_s300.json"
    metrics = evaluate(args.training_set, model, n_ppxf=args.n_ppxf, output_json=out_json,
                       progress_bar=False)
    # the paper's 150 km/s network on the same 300 km/s test spectra
    seed = model.meta["training"]["seed"]
    with h5py.File(args.training_set, "r") as f:
        _, _, test = split_indices(f["spectra"].shape[0], seed)
        spectra, photometry = f["spectra"][test], f["photometry"][test]
        truth = {k: f[k][test] for k in QUANTITIES}
    pred = SFHModel.load().predict(spectra, photometry)
    metrics["cnn150_on_s300"] = summary_statistics(pred, truth)
    out_json.write_text(json.dumps(metrics, indent=1))
    out_json.with_suffix(".rst").write_text(metrics_to_rst(metrics))
    keys = ("n_test", "cnn", "comparison", "speed_ratio", "cnn_seconds_per_spectrum",
            "ppxf_seconds_per_spectrum", "cnn150_on_s300")
    export_model(args.run_dir, stem, metrics={k: metrics.get(k) for k in keys})
    print(json.dumps({k: metrics.get(k) for k in ("cnn", "cnn150_on_s300", "comparison")},
                     indent=1))


if __name__ == "__main__":
    main()
