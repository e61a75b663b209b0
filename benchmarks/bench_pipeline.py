#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Time of the CNN path from a cube on disk to the maps product, stage by stage.

The script writes a mock observation (`cubesfh.synthesis.mock_observation`,
see ``bench_stages.py``) with about ``--spaxels-per-bin`` x
``--n-bins-target`` spaxels (default 4 x 5000: a 142 x 142 cube) and runs
what `cubesfh.pipeline.run_pipeline` runs, timing each stage with
`time.perf_counter`:

* **read**: ``Cube.read`` (headers and memory map only: the data are read
  by the stages that need them) and ``HSTImage.read`` of the five images;
* **model load**: `cubesfh.network.SFHModel.load` (``--model`` or the
  bundled model), checksums included;
* **preprocessing**: `cubesfh.preprocess.prepare_observation`, with its
  stages timed inside it (the functions it calls are wrapped for the run):
  Voronoi binning + co-add (`~cubesfh.binning.voronoi_bin`), kinematics
  (`~cubesfh.kinematics.fit_kinematics`, pPXF on every bin; or, with
  ``--kinematics-maps``, `~cubesfh.kinematics.read_kinematics_maps` on a
  PHANGS-DAP-like ``MAPS`` file written from the mock's true velocity and
  dispersion), rest frame (`~cubesfh.restframe.prepare_spectra`), bin
  photometry (`~cubesfh.photometry.bin_photometry`), and the rest (flags,
  normalised photometry);
* **K-correction** (only with ``--systemic-velocity`` beyond z = 0.01):
  `cubesfh.pipeline.k_correct_bins`;
* **CNN inference**: `cubesfh.pipeline.predict_bins`;
* **maps assembly**: provenance (`cubesfh.pipeline.provenance`, which hashes
  the input files) and `cubesfh.maps.StellarPopulationMaps.from_results`;
* **FITS write**: ``maps.write(path, overwrite=True)``.

The maps steps are skipped (and reported as such) when `cubesfh.maps` is not
available. Generating the mock is timed but not counted in the total.

Example (the run of ``docs/performance.rst``)::

    python benchmarks/bench_pipeline.py --json pipeline.json
    python benchmarks/bench_pipeline.py --kinematics-maps --json pipeline_maps.json

Smoke test (a few seconds, any trained model)::

    python benchmarks/bench_pipeline.py --n-bins-target 50 --kinematics-maps \\
        --model /path/to/sfhnet.pt
"""

import argparse
import contextlib
import importlib
import sys
import traceback
from pathlib import Path

import numpy as np
from astropy import units as u

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stages import (
    SYSTEMIC_VELOCITY_KMS,
    Stopwatch,
    add_binning_arguments,
    add_mock_arguments,
    collect_warnings,
    command_line,
    describe_machine,
    format_table,
    generate_observation,
    machine_info,
    peak_rss_mib,
    print_warnings,
    read_observation,
    spaxel_snr,
    target_snr_for,
    work_directory,
    write_json,
    write_kinematics_maps,
)

#: Functions that prepare_observation imports when it is called, wrapped to time them.
_WRAPPED = (
    ("cubesfh.binning", "voronoi_bin", "binning"),
    ("cubesfh.kinematics", "fit_kinematics", "kinematics"),
    ("cubesfh.kinematics", "read_kinematics_maps", "kinematics"),
    ("cubesfh.restframe", "prepare_spectra", "restframe"),
    ("cubesfh.photometry", "bin_photometry", "photometry"),
)


@contextlib.contextmanager
def timed_calls(watch, targets=_WRAPPED):
    """
    Time calls of module-level functions with ``watch`` while inside.

    `~cubesfh.preprocess.prepare_observation` imports its stage functions from
    their modules when it is called, so replacing the module attributes times
    its stages without changing what it does.
    """
    originals = []
    try:
        for module_name, attr, key in targets:
            module = importlib.import_module(module_name)
            original = getattr(module, attr)

            def wrapper(*args, _original=original, _key=key, **kwargs):
                with watch(_key):
                    return _original(*args, **kwargs)

            setattr(module, attr, wrapper)
            originals.append((module, attr, original))
        yield
    finally:
        for module, attr, original in reversed(originals):
            setattr(module, attr, original)


def load_model(path):
    """`cubesfh.network.SFHModel.load`, exiting with a clear message if there is none."""
    from cubesfh.network import SFHModel
    from cubesfh.utils import CubeSFHError

    try:
        return SFHModel.load(path)
    except CubeSFHError as exc:
        where = path or "the bundled model"
        raise SystemExit(f"cannot load {where}: {exc}\nPass a trained model with --model "
                         "PATH (e.g. one exported by 'cubesfh train --export').") from exc


def maps_class():
    """`cubesfh.maps.StellarPopulationMaps`, or `None` (with the reason) if unavailable."""
    try:
        from cubesfh.maps import StellarPopulationMaps
    except ImportError as exc:
        return None, f"cubesfh.maps not importable ({exc})"
    if not hasattr(StellarPopulationMaps, "from_results"):
        return None, "StellarPopulationMaps.from_results does not exist"
    return StellarPopulationMaps, ""


def run(args):
    from cubesfh.conventions import SNR_WINDOW
    from cubesfh.photometry import K_CORRECT_MIN_Z
    from cubesfh.pipeline import k_correct_bins, predict_bins, provenance
    from cubesfh.preprocess import prepare_observation

    info = machine_info()
    watch = Stopwatch()
    caught = {}
    redshift = args.systemic_velocity * u.km / u.s
    z_sys = args.systemic_velocity / 299792.458
    notes = {}
    with watch("model_load"):
        model = load_model(args.model)
    maps_cls, maps_skip = maps_class()
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_threads = None

    with work_directory(args.workdir, keep=args.keep) as workdir:
        per_bin = max(args.spaxels_per_bin, 1.0)
        obs, gen_seconds = generate_observation(
            workdir, int(round(args.n_bins_target * per_bin)), snr=args.snr, seed=args.seed,
            systemic_velocity=args.systemic_velocity)
        kin_maps = (write_kinematics_maps(obs.truth_path, workdir / "true_kinematics_maps.fits")
                    if args.kinematics_maps else None)
        # the target S/N is chosen before the timed run (this reads the S/N window once)
        from cubesfh import Cube

        snr = spaxel_snr(Cube.read(obs.cube_path), min_snr=args.min_snr)
        if args.target_snr is not None:
            target = args.target_snr
        elif args.spaxels_per_bin <= 1:
            target = float(snr.min()) * 0.999
        else:
            target = target_snr_for(snr, args.n_bins_target)
        print(f"mock observation written in {gen_seconds:.1f} s; {snr.size} spaxels with "
              f"S/N >= {args.min_snr:g} (median {np.median(snr):.1f}); target S/N "
              f"{target:.2f}", flush=True)

        with collect_warnings(caught), watch("read"):
            cube, hst = read_observation(obs)
        shape = cube.spatial_shape
        with collect_warnings(caught), timed_calls(watch), watch("preprocess"):
            prepared = prepare_observation(
                cube, hst, target_snr=target, min_snr=args.min_snr, kinematics=kin_maps,
                redshift=redshift, snr_window=SNR_WINDOW * (1 + z_sys),
                max_memory=args.max_memory, progress_bar=False)
        n_bins = prepared.n_bins
        usable = int(np.count_nonzero(np.isfinite(prepared.spectra.flux).any(axis=1)))
        print(f"preprocessing: {n_bins} bins in {watch.seconds['preprocess']:.1f} s",
              flush=True)
        print(prepared.summary(), flush=True)

        if z_sys > K_CORRECT_MIN_Z:  # what run_pipeline does for a distant galaxy
            with collect_warnings(caught), watch("kcorr"):
                k_correct_bins(prepared, model=model)
        else:
            notes["kcorr"] = f"not needed at z = {z_sys:.4f} (< {K_CORRECT_MIN_Z})"
        with collect_warnings(caught), watch("cnn"):
            cnn = predict_bins(prepared, model=model)
        n_predicted = int(np.count_nonzero(np.isfinite(cnn["logage_lw"])))
        print(f"CNN: {n_predicted} bins predicted in {watch.seconds['cnn']:.2f} s", flush=True)

        out_path = Path(args.output) if args.output else workdir / "stellar_population_maps.fits"
        maps_status = "skipped: " + maps_skip if maps_cls is None else "done"
        file_mib = None
        if maps_cls is not None:
            try:
                with collect_warnings(caught), watch("maps"):
                    prov = provenance(cube, hst, model, {
                        "target_snr": float(target), "min_snr": args.min_snr,
                        "kinematics": str(kin_maps or "ppxf"), "redshift": str(redshift),
                        "ppxf": False})
                    prov["timings"] = {k: v for k, v in watch.seconds.items()
                                       if k in ("preprocess", "cnn")}
                    maps = maps_cls.from_results(prepared, cnn, None, provenance=prov)
                with collect_warnings(caught), watch("write"):
                    maps.write(out_path, overwrite=True)
                file_mib = out_path.stat().st_size / 2**20
                print(f"maps: {out_path.name}, {file_mib:.1f} MiB", flush=True)
            except Exception as exc:  # report and keep the numbers measured so far
                traceback.print_exc()
                maps_status = f"failed: {type(exc).__name__}: {exc}"
                for key in ("maps", "write"):
                    watch.seconds.pop(key, None)
        del cube, hst, prepared, cnn

    s = watch.seconds
    kin_label = ("kinematics (external maps)" if args.kinematics_maps
                 else "kinematics (pPXF, every bin)")
    inner = ("binning", "kinematics", "restframe", "photometry")
    for key in inner:
        if key not in s:
            notes[key] = "not called by prepare_observation"
    s["preprocess_other"] = s["preprocess"] - sum(s.get(k, 0.0) for k in inner)
    labels = [
        ("read", "read (Cube.read + 5 HSTImage.read)"),
        ("model_load", "model load"),
        ("binning", "Voronoi binning + co-add"),
        ("kinematics", kin_label),
        ("restframe", "rest frame"),
        ("photometry", "bin photometry"),
        ("preprocess_other", "other preprocessing (flags, normalisation)"),
        ("kcorr", "K-correction (distant galaxies)"),
        ("cnn", "CNN inference"),
        ("maps", "maps assembly (provenance + from_results)"),
        ("write", "FITS write"),
    ]
    records = []
    for key, label in labels:
        seconds = s.get(key)
        records.append({"stage": key, "label": label, "seconds": seconds,
                        "seconds_per_1000_bins": (None if seconds is None
                                                  else 1000 * seconds / n_bins)})
    total = sum(r["seconds"] for r in records if r["seconds"] is not None)
    rss = peak_rss_mib()

    print()
    print(f"Machine: {describe_machine(info)}; torch threads {torch_threads}")
    print(f"Cube {shape[0]} x {shape[1]} spaxels, {n_bins} bins (target S/N {target:.2f}), "
          f"{n_predicted} predicted by the CNN; kinematics: "
          f"{'external maps (true V, sigma of the mock)' if kin_maps else 'pPXF'}; "
          f"peak RSS {rss:.0f} MiB; mock generation {gen_seconds:.1f} s (not in the total)")
    print()
    rows = []
    for r in records:
        if r["seconds"] is None:
            status = maps_status if r["stage"] in ("maps", "write") else notes.get(r["stage"], "")
            rows.append((r["label"], status, ""))
        else:
            rows.append((r["label"], f"{r['seconds']:.2f}", f"{r['seconds_per_1000_bins']:.2f}"))
    rows.append(("total", f"{total:.2f}", f"{1000 * total / n_bins:.2f}"))
    for line in format_table(("Stage", "Seconds", "Per 1000 bins (s)"), rows):
        print(line)
    print_warnings(caught)

    payload = {
        "benchmark": "bench_pipeline",
        "command": command_line(),
        "machine": info,
        "torch_threads": torch_threads,
        "model": str(args.model or "bundled"),
        "model_id": model.model_id,
        "cube_shape": [int(x) for x in shape],
        "generation_s": gen_seconds,
        "n_bins": int(n_bins),
        "n_bins_with_spectrum": usable,
        "n_bins_predicted": n_predicted,
        "target_snr": float(target),
        "kinematics": "external maps" if kin_maps else "ppxf",
        "maps": maps_status,
        "maps_file_mib": file_mib,
        "peak_rss_mib": rss,
        "stages": records,
        "total_s": total,
        "total_per_1000_bins_s": 1000 * total / n_bins,
        "warnings": caught,
    }
    if args.json:
        write_json(args.json, payload)
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Time the CNN path of cubesfh from a cube to the maps, stage by stage.")
    add_binning_arguments(parser, n_bins_default=5000)
    add_mock_arguments(parser)
    parser.add_argument("--kinematics-maps", action="store_true",
                        help="read the kinematics from a MAPS file of the mock's true "
                             "velocity and dispersion instead of fitting them with pPXF")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="trained model (.pt, with its .json beside it); default: the "
                             "bundled model")
    parser.add_argument("--max-memory", default=None,
                        help="max_memory for reading the cube, e.g. 256MB (default: the "
                             "Cube default)")
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="where to write the maps (default: in the work folder)")
    parser.add_argument("--systemic-velocity", type=float, default=SYSTEMIC_VELOCITY_KMS,
                        metavar="KM/S", help="of the mock galaxy (default 700; e.g. 25000 "
                                             "to time the K-correction)")
    args = parser.parse_args(argv)
    if args.n_bins_target < 1:
        parser.error("--n-bins-target must be at least 1")
    if args.max_memory is not None:
        args.max_memory = u.Quantity(args.max_memory)
    run(args)


if __name__ == "__main__":
    main()
