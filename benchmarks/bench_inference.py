#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
CNN inference time per spectrum, side by side with the pPXF baseline.

In one run, on the same simulated inputs (`cubesfh.synthesis.trainingset.simulate_samples`:
1761-pixel normalised noisy spectra and five HST fluxes, drawn like the
training set):

* **CNN predict**: `SFHModel.predict` of the bundled model on ``--n``
  spectra (default 8192), with the uncertainty outputs it returns by default
  and with ``uncertainty=False`` (the difference is the cost of the
  uncertainty and out-of-distribution outputs), on ``--threads`` torch
  threads; the minimum over ``--repeats`` runs, the two variants in turn (the
  machines are shared: the minimum is the least disturbed run);
* **raw forward**: the network alone (standardised inputs to mass fractions
  and [Z/H], no pre- or post-processing) through the fast CPU path and
  through the torch module in batches of 4096 (the previous path);
* **old predict**: the same predict through the module path (the reference
  of the equality check; ``--no-old`` skips it);
* **where the time goes**: one profiled predict of each path (`cProfile`
  cumulative times of its stages; the profiler adds a little);
* **pPXF baseline**: `cubesfh.baseline.fit_population` (the paper's
  configuration, shipped templates, training-set noise model) on
  ``--ppxf-n`` of the same spectra, one after the other in this process
  (the templates are built once beforehand, not timed);
* the ratio of the two per-spectrum times, and the largest difference
  between the fast and old predict outputs (relative to 1e-5 + 1e-5 |x|).

The network FLOPs per spectrum are counted from the architecture and the
achieved GFLOP/s printed with the raw-forward time.

Example (the run of ``docs/performance.rst``)::

    python benchmarks/bench_inference.py --threads 2 --json inference.json

Smoke test (a few seconds)::

    python benchmarks/bench_inference.py --n 512 --repeats 1 --ppxf-n 1 --no-old
"""

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_stages import command_line, describe_machine, format_table, machine_info, write_json


def network_flops(net):
    """Multiply-adds x 2 of one forward pass (point outputs, heads) from the module shapes."""
    n_pos = net.n_pix
    conv = 0
    for st in net.conv:
        c = st.conv
        k, s, pad = c.kernel_size[0], c.stride[0], c.padding[0]
        n_out = (n_pos + 2 * pad - k) // s + 1
        conv += 2 * n_out * c.out_channels * c.in_channels * k
        n_pos = n_out // 2
    e = net.attention.embed_dim
    att = 2 * (n_pos * e * 3 * e + 2 * n_pos * n_pos * e + n_pos * e * e)

    def dense(seq):
        return sum(2 * m.in_features * m.out_features for m in seq.modules()
                   if hasattr(m, "in_features"))

    point = conv + att + dense(net.spec_dense) + dense(net.phot_dense) + dense(net.latent) \
        + dense(net.decoder)
    heads = 0
    if net.uncertainty:
        heads = dense(net.sigma_head) + dense(net.recon_head) + 2 * 40 * 40
    return {"conv": conv, "attention": att, "point": point, "heads": heads,
            "total": point + heads}


def best_of(fn, repeats):
    """Minimum wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


def best_of_each(fns, repeats):
    """Minimum wall time of each function, called in turn ``repeats`` times (after a warm-up)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [min(t) for t in times], times


def old_predict(model, spectra, photometry, uncertainty=True):
    """`SFHModel.predict` through the torch module in batches of 4096 (the old path)."""
    from cubesfh.network._data import downsample_spectra

    spec = downsample_spectra(np.where(np.isfinite(spectra), spectra, 1.0))
    heads = uncertainty and model.has_uncertainty
    out = model._run_downsampled(spec, photometry, None, batch_size=4096, heads=heads,
                                 backend="module")
    if heads:
        model._apply_calibration(out)
    for k in ("latent", "sigma_raw", "ood_latent_raw", "ood_recon_raw"):
        out.pop(k, None)
    return out


STAGES = {  # label -> function names (file suffix, name) whose cumulative times add up
    "downsample + NaN cleaning": [("_data.py", "downsample_spectra")],
    "network (encode + decode)": [("_fast.py", "encode"), ("_fast.py", "decode"),
                                  ("_model.py", "encode"), ("_model.py", "decode")],
    "uncertainty heads": [("_fast.py", "heads"), ("_model.py", "heads")],
    "noise level (DER_SNR median)": [("_data.py", "noise_level")],
    "mean ages / [Z/H]": [("populations.py", "mean_quantities")],
    "calibration": [("_predict.py", "_apply_calibration")],
}


def stage_profile(fn):
    """Wall time and cumulative seconds of the `STAGES` in one profiled call."""
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.runcall(fn)
    total = time.perf_counter() - start
    stats = pstats.Stats(prof).stats
    out = {}
    for label, names in STAGES.items():
        out[label] = sum(v[3] for (path, _, name), v in stats.items()
                         if any(path.endswith(f) and name == fn_name for f, fn_name in names))
    out["numpy around the network (rest)"] = total - sum(out.values())
    return total, out


def raw_forward(model, x, p, ok, *, fast=True, batch=4096):
    import torch

    net = model._fast_net() if fast else model._net
    xt, pt, okt = (torch.from_numpy(a) for a in (x, p, ok))

    def run():
        with torch.inference_mode():
            for s in range(0, x.shape[0], batch):
                sl = slice(s, s + batch)
                net.decode(net.encode(xt[sl], pt[sl], okt[sl]))
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192, help="spectra for the CNN (8192)")
    parser.add_argument("--repeats", type=int, default=7, help="timed CNN runs (7)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    parser.add_argument("--ppxf-n", type=int, default=6, help="spectra fitted by pPXF (6)")
    parser.add_argument("--no-old", action="store_true", help="skip the old predict path")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="write the records to this file")
    args = parser.parse_args(argv)

    import torch

    from cubesfh.baseline import BaselineTemplates, fit_population
    from cubesfh.network import SFHModel, downsample_spectra
    from cubesfh.network._predict import CPU_CHUNK
    from cubesfh.synthesis import ForwardModel
    from cubesfh.synthesis.trainingset import simulate_samples

    torch.set_num_threads(args.threads)
    info = machine_info()
    print(describe_machine(info))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {command_line()}")

    fm = ForwardModel()
    sim = simulate_samples(np.random.default_rng(args.seed), np.zeros(args.n, int), fm)
    spectra = sim["spectra"].astype(np.float32)
    phot = sim["photometry"].astype(np.float32)
    model = SFHModel.load()
    flops = network_flops(model._net)

    rec = {"n": args.n, "threads": args.threads, "repeats": args.repeats,
           "flops_per_spectrum": flops, "machine": info, "command": command_line()}
    rows = []

    def per(seconds, n):
        return seconds / n * 1e3

    # the two variants in turn (A B A B ...), so that a slow spell hits both
    (t_full, t_point), _ = best_of_each(
        [lambda: model.predict(spectra, phot),
         lambda: model.predict(spectra, phot, uncertainty=False)], args.repeats)
    rows.append(["CNN predict (default, with uncertainties)", f"{per(t_full, args.n):.4f}"])
    rows.append(["CNN predict, uncertainty=False", f"{per(t_point, args.n):.4f}"])
    rows.append(["  difference: uncertainty outputs", f"{per(t_full - t_point, args.n):.4f}",
                 "(see also the profile)"])
    rec.update(predict_ms=per(t_full, args.n), predict_point_ms=per(t_point, args.n))

    from cubesfh.network._predict import photometry_features

    x = (downsample_spectra(np.where(np.isfinite(spectra), spectra, 1.0)).astype(np.float32)
         - model._spec_mean) / model._spec_std
    logf, ok = photometry_features(phot)
    p = np.where(ok > 0, (logf - model._phot_mean) / model._phot_std, 0.0).astype(np.float32)
    t_raw, _ = best_of(raw_forward(model, x, p, ok, batch=CPU_CHUNK), args.repeats)
    gflops = flops["point"] / (t_raw / args.n) / 1e9
    rows.append([f"raw forward, fast path (chunks of {CPU_CHUNK})",
                 f"{per(t_raw, args.n):.4f}", f"{gflops:.1f} GFLOP/s"])
    t_raw_old, _ = best_of(raw_forward(model, x, p, ok, fast=False), args.repeats)
    rows.append(["raw forward, torch module (batches of 4096)", f"{per(t_raw_old, args.n):.4f}",
                 f"{flops['point'] / (t_raw_old / args.n) / 1e9:.1f} GFLOP/s"])
    rec.update(raw_forward_ms=per(t_raw, args.n), raw_forward_module_ms=per(t_raw_old, args.n),
               gflops=gflops)

    profiles = {"fast": stage_profile(lambda: model.predict(spectra, phot))}
    if not args.no_old:
        t_old, _ = best_of(lambda: old_predict(model, spectra, phot), max(1, args.repeats // 2))
        rows.append(["old predict (module path, batches of 4096)", f"{per(t_old, args.n):.4f}"])
        rec["old_predict_ms"] = per(t_old, args.n)
        profiles["old"] = stage_profile(lambda: old_predict(model, spectra, phot))
        new, old = model.predict(spectra, phot), old_predict(model, spectra, phot)
        worst = max(float(np.max(np.abs(np.asarray(new[k], float) - np.asarray(old[k], float))
                                 / (1e-5 + 1e-5 * np.abs(np.asarray(old[k], float)))))
                    for k in old)
        rec["max_difference_in_tolerance_units"] = worst

    # --- pPXF baseline on the first few of the same spectra ---
    templates = BaselineTemplates(fm)
    snr = sim["snr"]
    k = max(1, args.ppxf_n)
    start = time.perf_counter()
    for i in range(k):
        var = np.clip(sim["spectra_noiseless"][i], 0, None) / (snr[i] ** 2 * 1.25)
        fit_population(sim["spectra"][i], var, sim["photometry"][i], templates=templates)
    t_ppxf = (time.perf_counter() - start) / k
    rows.append([f"pPXF baseline (fit_population, {k} spectra)", f"{t_ppxf * 1e3:.1f}"])
    ratio = t_ppxf * 1e3 / per(t_full, args.n)
    rec.update(ppxf_ms=t_ppxf * 1e3, ratio=ratio, ppxf_n=k)

    print()
    print(f"{args.n} spectra, {args.threads} threads, minimum of {args.repeats} runs; network "
          f"{flops['point'] / 1e6:.2f} MFLOP a spectrum (+{flops['heads'] / 1e6:.2f} heads)")
    for line in format_table(["step", "ms per spectrum", "note"],
                             [r + [""] * (3 - len(r)) for r in rows]):
        print(line)
    print(f"ratio pPXF / CNN predict: {ratio:.3g}")
    if "max_difference_in_tolerance_units" in rec:
        print(f"largest fast - old difference: {rec['max_difference_in_tolerance_units']:.3f} "
              "x (1e-5 + 1e-5 |x|)")
    print()
    print("where the time goes (one profiled predict, ms per spectrum):")
    labels = list(STAGES) + ["numpy around the network (rest)"]
    names = list(profiles)
    table = [[lab] + [f"{per(profiles[nm][1][lab], args.n):.4f}" for nm in names]
             for lab in labels]
    unc = ("uncertainty heads", "noise level (DER_SNR median)", "calibration")
    table.append(["  uncertainty (heads+noise+calib.)"]
                 + [f"{per(sum(profiles[nm][1][k] for k in unc), args.n):.4f}" for nm in names])
    table.append(["total (profiled)"] + [f"{per(profiles[nm][0], args.n):.4f}" for nm in names])
    for line in format_table(["stage"] + names, table):
        print(line)
    rec["profiles_ms"] = {nm: {lab: per(v, args.n) for lab, v in profiles[nm][1].items()}
                          for nm in names}
    if args.json:
        write_json(args.json, rec)
    return rec


if __name__ == "__main__":
    main()
