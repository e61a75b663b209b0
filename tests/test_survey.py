# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of the survey runner (cubesfh.survey, ``cubesfh run-many``) on three mock cubes."""

import json
import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import QTable

pytest.importorskip("torch")

from cubesfh.cli import main as cli_main
from cubesfh.datasets import make_example_observation
from cubesfh.maps import StellarPopulationMaps
from cubesfh.survey import (
    OPTIONS,
    SUMMARY_COLUMNS,
    SurveyEntry,
    entry_hash,
    read_manifest,
    run_survey,
)
from cubesfh.utils import CubeSFHError

# 8 x 8 spaxels at a target S/N of 150 make 2-4 bins per cube: a few seconds each.
SHAPE = (8, 8)
COMMON = {"target_snr": 150, "redshift": 0.002335, "register": False}  # 700 km/s, no offset


@pytest.fixture(scope="module")
def mocks(tmp_path_factory):
    """Three small example observations and one broken cube (a truncated FITS file)."""
    d = tmp_path_factory.mktemp("survey_inputs")
    obs = [make_example_observation(d / f"gal{i}", shape=SHAPE, seed=i) for i in range(3)]
    broken = d / "broken.fits"
    broken.write_bytes(obs[0].cube_path.read_bytes()[:20000])
    return d, obs, broken


def _yaml_manifest(d, obs, broken, *, gal1_snr=None):
    yaml = pytest.importorskip("yaml")
    cubes = [
        {"name": "gal0", "cube": os.path.relpath(obs[0].cube_path, d), "ppxf": True,
         "hst": {b: os.path.relpath(p, d) for b, p in obs[0].hst_paths.items()}},
        {"name": "gal1", "cube": str(obs[1].cube_path),
         "hst": {b: str(p) for b, p in obs[1].hst_paths.items()}},
        {"name": "broken", "cube": broken.name},
        {"name": "gal2", "cube": str(obs[2].cube_path),
         "hst": {b: str(p) for b, p in obs[2].hst_paths.items() if b in ("F555W", "F814W")}},
    ]
    if gal1_snr is not None:
        cubes[1]["target_snr"] = gal1_snr
    path = d / ("survey.yaml" if gal1_snr is None else "survey_changed.yaml")
    path.write_text(yaml.safe_dump({"defaults": COMMON, "cubes": cubes}))
    return path


def _csv_manifest(d, obs, broken):
    bands = ("F275W", "F336W", "F438W", "F555W", "F814W")
    lines = ["# the survey of the YAML test, as CSV",
             "name,cube," + ",".join(bands) + ",ppxf,target_snr,redshift,register"]
    for name, o, ppxf, use in (("gal0", obs[0], "yes", bands), ("gal1", obs[1], "", bands),
                               ("broken", None, "", ()),
                               ("gal2", obs[2], "", ("F555W", "F814W"))):
        cube = broken if o is None else o.cube_path
        cells = [str(o.hst_paths[b]) if o is not None and b in use else "" for b in bands]
        lines.append(f"{name},{cube}," + ",".join(cells) + f",{ppxf},150,0.002335,no")
    path = d / "survey.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def first_run(mocks, tmp_path_factory):
    d, obs, broken = mocks
    out = tmp_path_factory.mktemp("survey_out")
    manifest = _yaml_manifest(d, obs, broken)
    table = run_survey(manifest, out, scheduler="serial", progress_bar=False)
    return manifest, out, table


def test_products_and_summary(first_run, mocks):
    _, out, table = first_run
    d, obs, broken = mocks
    assert list(table["name"]) == ["gal0", "gal1", "broken", "gal2"]
    assert list(table["status"]) == ["ok", "ok", "failed", "ok"]
    assert not table["resumed"].any()
    ok = table["status"] == "ok"
    # the broken cube: a one-line message, naming the error; the others have none
    assert table["error"][2] and "\n" not in table["error"][2]
    assert all(e == "" for e in table["error"][ok])
    assert table.meta["n_ok"] == 3 and table.meta["n_failed"] == 1
    for row in table[ok]:
        product = out / f"{row['name']}_maps.fits"
        assert row["product"] == str(product) and product.is_file()
        maps = StellarPopulationMaps.read(product)
        assert maps.n_bins == row["n_bins"] > 0
        assert maps.meta["survey"]["hash"] == row["hash"]
        # summary values are the medians over the product's bins
        cnn = np.asarray(maps.table["cnn_logage_lw"].value, float)
        assert row["cnn_logage_lw"] == pytest.approx(np.nanmedian(cnn))
        assert 6.0 < row["cnn_logage_mw"] < 10.5 and -3 < row["cnn_zh_mw"] < 1
        flags = np.asarray(maps.table["flag"])
        assert row["n_flagged"] == np.count_nonzero(flags)
        assert row["n_flag_NO_PHOTOMETRY"] == np.count_nonzero(flags & 64)
        assert row["t_total"].value > 0 and row["t_preprocess"].value > 0
    # pPXF only where asked, with its per-bin cache in cache/<name>/
    assert list(table["ppxf"]) == [True, False, False, False]
    assert np.isfinite(table["ppxf_logage_lw"][0])
    assert np.isnan(table["ppxf_logage_lw"][1]) and np.isnan(table["t_ppxf"][1])
    assert list((out / "cache" / "gal0").glob("*.npz"))
    # no half-written files left behind
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_summary_files(first_run):
    _, out, table = first_run
    ecsv = QTable.read(out / "survey_summary.ecsv")
    fits_table = QTable.read(out / "survey_summary.fits")
    names = [name for name, _ in SUMMARY_COLUMNS]
    assert ecsv.colnames == names == fits_table.colnames
    for t in (ecsv, fits_table):
        assert list(t["status"]) == list(table["status"])
        np.testing.assert_allclose(t["cnn_zh_lw"], table["cnn_zh_lw"])
        assert list(t["n_bins"]) == list(table["n_bins"])
    assert ecsv["error"][2] == table["error"][2]
    assert ecsv.meta["n_failed"] == 1
    assert ecsv["cnn_zh_lw"].info.description.startswith("median over bins")


def test_resume_skips_up_to_date_products(first_run, mocks):
    manifest, out, first = first_run
    d, obs, broken = mocks
    mtimes = {n: (out / f"{n}_maps.fits").stat().st_mtime_ns for n in ("gal0", "gal1", "gal2")}
    again = run_survey(manifest, out, scheduler="serial", progress_bar=False)
    assert list(again["resumed"]) == [True, True, False, True]
    assert list(again["status"]) == ["ok", "ok", "failed", "ok"]
    for n, t in mtimes.items():
        assert (out / f"{n}_maps.fits").stat().st_mtime_ns == t
    for col in ("n_bins", "cnn_logage_lw", "ppxf_logage_mw", "hash"):
        np.testing.assert_array_equal(np.asarray(again[col])[[0, 1, 3]],
                                      np.asarray(first[col])[[0, 1, 3]])
    # one changed option: only that cube is recomputed
    changed = run_survey(_yaml_manifest(d, obs, broken, gal1_snr=120), out,
                         scheduler="serial", progress_bar=False)
    assert list(changed["resumed"]) == [True, False, False, True]
    assert changed["hash"][1] != first["hash"][1]
    assert changed["status"][1] == "ok"


def test_csv_manifest_and_command_line(first_run, mocks, capsys):
    yaml_manifest, out, first = first_run
    d, obs, broken = mocks
    csv_manifest = _csv_manifest(d, obs, broken)
    from_csv = read_manifest(csv_manifest)
    from_yaml = read_manifest(yaml_manifest)
    assert [e.name for e in from_csv] == ["gal0", "gal1", "broken", "gal2"]
    for a, b in zip(from_csv, from_yaml, strict=True):
        assert a.cube.resolve() == b.cube.resolve()
        assert {k: v.resolve() for k, v in a.hst.items()} == \
            {k: v.resolve() for k, v in b.hst.items()}
        assert a.options == b.options
    assert from_csv[0].options["ppxf"] is True and from_csv[1].options["ppxf"] is False
    assert from_csv[3].hst.keys() == {"F555W", "F814W"}
    # same inputs and options, other format: the same hashes, so nothing is recomputed
    # (gal1 was recomputed at another S/N by the resume test, if it ran: that one is redone)
    rc = cli_main(["run-many", str(csv_manifest), "-o", str(out), "--scheduler", "serial",
                   "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1  # one cube failed
    assert "broken: FAILED" in captured.out
    assert "3 of 4 cubes ok" in captured.out
    summary = QTable.read(out / "survey_summary.ecsv")
    assert summary["resumed"][0] and summary["resumed"][3]
    assert summary["hash"][0] == first["hash"][0]


def test_set_defaults_and_overwrite(mocks, tmp_path):
    d, obs, _ = mocks
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"cube,F555W\n{obs[1].cube_path},{obs[1].hst_paths['F555W']}\n")
    table = run_survey(manifest, tmp_path / "out",
                       defaults={"target_snr": "150", "redshift": "0.002335",
                                 "register": "no"},
                       scheduler="serial", progress_bar=False)
    assert table["name"][0] == obs[1].cube_path.name.removesuffix(".fits")  # the file name
    assert table["status"][0] == "ok", table["error"][0]
    again = run_survey(manifest, tmp_path / "out",
                       defaults={"target_snr": "150", "redshift": "0.002335",
                                 "register": "no"},
                       scheduler="serial", overwrite=True, progress_bar=False)
    assert not again["resumed"][0]


def test_parallel_cubes_on_a_local_cluster(mocks, tmp_path):
    pytest.importorskip("distributed")
    d, obs, broken = mocks
    entries = [e for e in read_manifest(_yaml_manifest(d, obs, broken))
               if e.name in ("gal1", "broken", "gal2")]
    table = run_survey(entries, tmp_path, n_workers=2, parallel_cubes=True,
                       progress_bar=False)
    assert list(table["name"]) == ["gal1", "broken", "gal2"]  # manifest order
    assert list(table["status"]) == ["ok", "failed", "ok"]
    assert (tmp_path / "gal2_maps.fits").is_file()
    serial = run_survey(entries, tmp_path / "serial", scheduler="serial", progress_bar=False)
    np.testing.assert_array_equal(table["cnn_logage_lw"], serial["cnn_logage_lw"])
    np.testing.assert_array_equal(table["hash"], serial["hash"])


def test_entry_hash(mocks):
    d, obs, _ = mocks
    base = {k: v for k, (v, _) in OPTIONS.items()}
    e = SurveyEntry("a", obs[0].cube_path, dict(obs[0].hst_paths), base, "a_maps.fits")
    h = entry_hash(e)
    assert h == entry_hash(SurveyEntry("a", obs[0].cube_path, dict(obs[0].hst_paths),
                                       dict(base), "a_maps.fits", origin="elsewhere"))
    assert h != entry_hash(SurveyEntry("a", obs[0].cube_path, dict(obs[0].hst_paths),
                                       {**base, "target_snr": 40.0}, "a_maps.fits"))
    assert h != entry_hash(SurveyEntry("a", obs[1].cube_path, dict(obs[0].hst_paths), base,
                                       "a_maps.fits"))
    with pytest.raises(FileNotFoundError):
        entry_hash(SurveyEntry("a", d / "missing.fits", {}, base, "a_maps.fits"))


def test_manifest_errors(tmp_path):
    def write(name, text):
        p = tmp_path / name
        p.write_text(text)
        return p

    with pytest.raises(CubeSFHError, match="unknown option 'taget_snr'.*did you mean"):
        read_manifest(write("a.csv", "cube,taget_snr\nc.fits,30\n"))
    with pytest.raises(CubeSFHError, match=r"line 3: the name 'c' is already used by .*line 2"):
        read_manifest(write("b.csv", "cube,name\nc.fits,c\nd.fits,c\n"))
    with pytest.raises(CubeSFHError, match="ppxf='perhaps' is not valid"):
        read_manifest(write("c.csv", "cube,ppxf\nc.fits,perhaps\n"))
    with pytest.raises(CubeSFHError, match="at least 'cube'"):
        read_manifest(write("d.csv", "name,F555W\nx,y.fits\n"))
    with pytest.raises(CubeSFHError, match="unknown HST band"):
        read_manifest(write("e.csv", "cube,F606W\nc.fits,y.fits\n"))
    with pytest.raises(CubeSFHError, match="cannot name a file"):
        read_manifest(write("f.csv", "cube,name\nc.fits,NGC 628\n"))
    with pytest.raises(CubeSFHError, match="not found"):
        read_manifest(tmp_path / "none.csv")
    pytest.importorskip("yaml")
    with pytest.raises(CubeSFHError, match="expected a 'cubes' list"):
        read_manifest(write("g.yaml", "defaults: {ppxf: true}\n"))
    with pytest.raises(CubeSFHError, match="unknown top-level"):
        read_manifest(write("h.yaml", "cubes: [c.fits]\ndefault: {}\n"))
    entries = read_manifest(write("i.yaml", "- c.fits\n- cube: sub/d.fits\n  ppxf: yes\n"
                                            "  mask: [a.reg, b.reg]\n"))
    assert [e.name for e in entries] == ["c", "d"]
    assert entries[1].cube == tmp_path / "sub" / "d.fits"
    assert entries[1].options["ppxf"] is True
    assert entries[1].options["mask"] == [str(tmp_path / "a.reg"), str(tmp_path / "b.reg")]


def test_summary_table_of_missing_cube(tmp_path):
    """A cube that does not exist fails in the summary; nothing else is started."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("name,cube,ppxf\nghost,ghost.fits,yes\n")
    table = run_survey(manifest, tmp_path / "out", progress_bar=False)
    assert table["status"][0] == "failed"
    assert "ghost.fits not found" in table["error"][0]
    with fits.open(tmp_path / "out" / "survey_summary.fits") as h:
        assert h[1].header["NFAILED"] == 1
    assert json.loads(json.dumps(table.meta["summary_files"]))
