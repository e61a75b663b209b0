# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of the dask per-bin mapping: results, failures flagged, cache resume."""

import numpy as np
import pytest

from cubesfh.parallel import map_bins
from cubesfh.utils import CubeSFHWarning


def _square_or_fail(x, *, offset=0.0):
    if x < 0:
        msg = "negative input"
        raise ValueError(msg)
    return x * x + offset


def test_serial_results_and_failures():
    with pytest.warns(CubeSFHWarning, match="1 of 5 bins raised"):
        out = map_bins(_square_or_fail, [(1.0,), (2.0,), (-1.0,), (3.0,), (4.0,)],
                       kwargs={"offset": 0.5}, scheduler="serial", progress_bar=False,
                       chunk_size=2, desc="bins")
    assert out == [1.5, 4.5, None, 9.5, 16.5]


def test_cache_resume(tmp_path):
    items = [(float(i),) for i in range(7)]
    first = map_bins(_square_or_fail, items, scheduler="serial", cache_dir=tmp_path,
                     progress_bar=False, chunk_size=3)
    cached = sorted(tmp_path.glob("*.pkl"))
    assert len(cached) == 3
    # remove one chunk: a rerun recomputes only that one, with identical results
    cached[0].unlink()
    again = map_bins(_square_or_fail, items, scheduler="serial", cache_dir=tmp_path,
                     progress_bar=False, chunk_size=3)
    assert again == first == [float(i * i) for i in range(7)]
    assert len(list(tmp_path.glob("*.pkl"))) == 3


def test_existing_dask_client():
    distributed = pytest.importorskip("distributed")
    # an in-process cluster (threads): the test function need not be importable by
    # worker processes; the process-based LocalCluster is exercised by the demo and
    # benchmarks/bench_dask.py
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1,
                            dashboard_address=":0") as client:
        out = map_bins(_square_or_fail, [(float(i),) for i in range(6)], scheduler=client,
                       progress_bar=False, chunk_size=4)
    np.testing.assert_allclose(out, [0, 1, 4, 9, 16, 25])
