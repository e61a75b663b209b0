#!/usr/bin/env python
"""
Train and calibrate the attenuation head of the bundled models and store it in their metadata.

    python scripts/fit_physical_head.py [--n-train 40000] [--n-calibration 12000]
        [--seed 2026] [--models sfhnet sfhnet_s300] [--dry-run]

The head lives in ``cubesfh/network/data/<model>.json`` (``physical_head``);
the weights and the model identifiers do not change. See docs/physical.rst.
"""

import argparse
import json
import time

from cubesfh.network import SFHModel
from cubesfh.network._physical import attach_physical_head, fit_physical_head
from cubesfh.network._predict import DATA_DIR


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--n-train", type=int, default=40000)
    p.add_argument("--n-calibration", type=int, default=12000)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--models", nargs="+", default=["sfhnet", "sfhnet_s300"])
    p.add_argument("--dry-run", action="store_true", help="do not write the metadata")
    a = p.parse_args(argv)
    for name in a.models:
        stem = DATA_DIR / name
        t0 = time.perf_counter()
        model = SFHModel.load(stem.with_suffix(".pt"))
        head = fit_physical_head(model, n_train=a.n_train, n_calibration=a.n_calibration,
                                 seed=a.seed, epochs=a.epochs)
        print(name, model.model_id, f"{time.perf_counter() - t0:.0f} s")
        print(json.dumps({"conformal_k": head["conformal_k"],
                          "per_group": head["conformal_k_per_group"],
                          "metrics": head["calibration_metrics"]}, indent=1))
        if not a.dry_run:
            attach_physical_head(stem, head)


if __name__ == "__main__":
    main()
