# Licensed under a 3-clause BSD style license - see LICENSE
"""
The small versions of the benchmark scripts run, and say what they should.

docs/performance.rst lists "small versions, which run in a few seconds each
and check that the scripts work"; these tests run them, so that a change of a
private name the scripts use (as happened once to bench_inference.py) fails
here instead of in the next measurement. bench_dask.py's small version takes
half a minute (it starts a local cluster) and is left to the benchmark run.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
PERFORMANCE_DOC = ROOT / "docs" / "performance.rst"

SMALL = [
    "bench_inference.py --n 512 --repeats 1 --ppxf-n 1",
    "bench_stages.py --n-bins-target 50 --kinematics-subset 4",
]

pytestmark = pytest.mark.skipif(not BENCHMARKS.is_dir(),
                                reason="needs a source checkout (benchmarks/)")


def _run(command, tmp_path):
    out = tmp_path / "records.json"
    args = [sys.executable, str(BENCHMARKS / command.split()[0]), *shlex.split(command)[1:],
            "--json", str(out)]
    env = dict(os.environ, MPLBACKEND="agg")
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_small_versions_are_documented():
    text = PERFORMANCE_DOC.read_text()
    # each command is (the start of) one the page gives
    for command in SMALL:
        assert f"python benchmarks/{command}" in text, command


def test_bench_inference_small(tmp_path):
    rec, stdout = _run(SMALL[0], tmp_path)
    # the fast path equals the module path within 1e-5 + 1e-5 |x| on every output
    assert 0 <= rec["max_difference_in_tolerance_units"] < 1
    assert rec["ppxf_n"] == 1 and rec["ppxf_ms"] > 1.0
    assert rec["predict_point_ms"] > 0 and 0 < rec["predict_ms"] < rec["ppxf_ms"]
    assert rec["ratio"] == pytest.approx(rec["ppxf_ms"] / rec["predict_ms"], rel=1e-6)
    # every stage of the profile was found: a renamed function would read 0 s
    for path in ("fast", "old"):
        prof = rec["profiles_ms"][path]
        for stage in ("downsample + NaN cleaning", "network (encode + decode)",
                      "uncertainty heads", "noise level (DER_SNR median)",
                      "mean ages / [Z/H]", "calibration"):
            assert prof[stage] > 0, (path, stage)
    assert "ratio pPXF / CNN predict" in stdout


def test_bench_stages_small(tmp_path):
    rec, _ = _run(SMALL[1], tmp_path)
    # a 15 x 15 mock binned to about 50 bins, 4 of them fitted without a flag
    assert rec["cube_shape"] == [15, 15]
    assert 30 <= rec["n_bins"] <= 70
    assert rec["kinematics_bins_fitted"] == 4 and rec["kinematics_flagged"] == 0
    stages = {s["stage"]: s for s in rec["stages"]}
    assert {"binning", "kinematics", "restframe", "photometry"} <= set(stages)
    assert stages["kinematics"]["scale"] == pytest.approx(rec["n_bins"] / 4)
    assert stages["kinematics"]["seconds"] == pytest.approx(
        stages["kinematics"]["measured_s"] * rec["n_bins"] / 4)
    assert all(s["measured_s"] > 0 for s in rec["stages"])
