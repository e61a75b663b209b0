#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Time and peak memory of generating the training set.

Usage::

    python benchmarks/bench_training_set.py --n 165000 --output /tmp/bench_ts.h5

Prints the wall time, the time per 1000 samples, the peak resident memory of
the process and the file size; the generated file is removed unless --keep.
"""

import argparse
import os
import resource
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--n", type=int, default=165_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="/tmp/cubesfh_bench_training_set.h5")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    from cubesfh.synthesis.trainingset import make_training_set

    out = Path(args.output)
    if out.exists():
        out.unlink()
    t0 = time.perf_counter()
    make_training_set(out, n=args.n, seed=args.seed, progress_bar=False)
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    size = out.stat().st_size / 2**30
    print(f"samples: {args.n}")
    print(f"cores: {os.cpu_count()}")
    print(f"wall time: {dt:.1f} s ({1000 * dt / args.n:.2f} s per 1000 samples)")
    print(f"peak RSS: {rss:.0f} MiB")
    print(f"file size: {size:.2f} GiB")
    if not args.keep:
        out.unlink()


if __name__ == "__main__":
    main()
