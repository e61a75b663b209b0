# Licensed under a 3-clause BSD style license - see LICENSE
"""Tests of the dask per-bin mapping: results, failures, cache, scheduler errors, workers."""

import os

import numpy as np
import pytest

from cubesfh.parallel import map_bins
from cubesfh.utils import CubeSFHError, CubeSFHWarning


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
    cached = sorted(tmp_path.glob("*.npz"))
    assert len(cached) == 3
    # remove one chunk: a rerun recomputes only that one, with identical results
    cached[0].unlink()
    again = map_bins(_square_or_fail, items, scheduler="serial", cache_dir=tmp_path,
                     progress_bar=False, chunk_size=3)
    assert again == first == [float(i * i) for i in range(7)]
    assert len(list(tmp_path.glob("*.npz"))) == 3


def _fit_like(x):
    """A result shaped like the pPXF baseline's: a PopulationFit with arrays and a dict."""
    from cubesfh.baseline import PopulationFit

    v = np.arange(16.0) * x
    return PopulationFit(mass_fraction=v, zh=v - 1, light_fraction=v / 2,
                         light_weights=np.ones((16, 6)) * x, mass_weights=np.zeros((16, 6)),
                         logage_lw=9.0 + x, logage_mw=float("nan"), zh_lw=-0.1, zh_mw=0.2,
                         av=0.3, chi2=1.1, phot_chi2=float("inf"), noise_scale=1.0,
                         n_good=1700, n_bands=5, flag=0, seconds=0.5,
                         mc={"logage_lw_p16": 8.9, "mass_fraction_p84": v + 1, "n_mc": 3})


def test_cache_is_data_only_and_round_trips(tmp_path):
    items = [(1.0,), (2.0,), (-1.0,)]
    with pytest.warns(CubeSFHWarning, match="1 of 3"):
        first = map_bins(_fit_like_or_fail, items, scheduler="serial", cache_dir=tmp_path,
                         progress_bar=False, chunk_size=2)
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 2
    # readable without pickle, and no pickle opcode stream inside
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            assert "structure" in z.files
    with pytest.warns(CubeSFHWarning, match="1 of 3"):
        again = map_bins(_fit_like_or_fail, items, scheduler="serial", cache_dir=tmp_path,
                         progress_bar=False, chunk_size=2)
    assert again[2] is None and first[2] is None
    for a, b in zip(first[:2], again[:2]):
        assert type(b) is type(a)
        np.testing.assert_array_equal(a.light_weights, b.light_weights)
        assert b.logage_lw == a.logage_lw and np.isnan(b.logage_mw) and b.phot_chi2 == np.inf
        assert b.n_good == 1700 and isinstance(b.n_good, int)
        np.testing.assert_array_equal(b.mc["mass_fraction_p84"], a.mc["mass_fraction_p84"])


def _fit_like_or_fail(x):
    if x < 0:
        msg = "negative input"
        raise ValueError(msg)
    return _fit_like(x)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "pickle", "empty"])
def test_damaged_cache_entry_is_recomputed_with_a_warning(tmp_path, damage):
    import pickle

    items = [(float(i),) for i in range(4)]
    first = map_bins(_square_or_fail, items, scheduler="serial", cache_dir=tmp_path,
                     progress_bar=False, chunk_size=2)
    victim = sorted(tmp_path.glob("*.npz"))[0]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # one stored number changed: zip CRC or our SHA-256 sees it
        i = data.index(b'"f": "') + 6
        victim.write_bytes(data[:i] + b"7" + data[i + 1:])
    elif damage == "garbage":
        victim.write_bytes(b"not a cache file at all")
    elif damage == "pickle":
        # someone else's pickle under the cache name: never unpickled, recomputed
        victim.write_bytes(pickle.dumps([os.system]))
    else:
        victim.write_bytes(b"")
    with pytest.warns(CubeSFHWarning, match=r"cached chunk .* is damaged .* computed again"):
        again = map_bins(_square_or_fail, items, scheduler="serial", cache_dir=tmp_path,
                         progress_bar=False, chunk_size=2)
    assert again == first == [0.0, 1.0, 4.0, 9.0]
    # the entry was rewritten and is good again
    assert map_bins(_square_or_fail, items, scheduler="serial", cache_dir=tmp_path,
                    progress_bar=False, chunk_size=2) == first


def test_cache_entry_with_a_type_outside_the_allow_list_is_refused(tmp_path):
    from cubesfh.utils._cache import CacheFormatError, load_entry, save_entry

    path = tmp_path / "x.npz"
    save_entry(path, [1.5, {"a": np.arange(3)}])
    assert load_entry(path)[0] == 1.5
    with np.load(path) as z:
        arrays = dict(z)
    arrays["structure"] = np.frombuffer(
        b'{"format": "cubesfh-cache-1", "value": {"t": "os.system", "v": {}}}', np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(CacheFormatError):
        load_entry(path)
    with pytest.raises(TypeError, match="cannot be cached"):
        save_entry(tmp_path / "y.npz", object())


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


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_chunk_size():
    from cubesfh.parallel import default_chunk_size

    assert [default_chunk_size(n) for n in (0, 1, 24, 64, 65, 200, 512, 10_000)] == \
        [1, 1, 1, 1, 2, 4, 8, 8]
    with pytest.raises(CubeSFHError, match="chunk_size must be a positive"):
        map_bins(_square_or_fail, [(1.0,)], scheduler="serial", chunk_size=0,
                 progress_bar=False)


def test_unreachable_scheduler_is_one_clear_error():
    pytest.importorskip("distributed")
    import time

    from cubesfh.parallel import dask_client

    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(CubeSFHError) as info, dask_client(address, connect_timeout=1):
        pass
    assert time.perf_counter() - t0 < 15
    msg = str(info.value)
    assert "\n" not in msg
    assert f"cannot connect to the dask scheduler at {address}" in msg
    assert "dask scheduler`" in msg and "omit --scheduler" in msg
    with pytest.raises(CubeSFHError, match="cannot connect"):
        map_bins(_square_or_fail, [(1.0,)], scheduler=address, connect_timeout=1,
                 progress_bar=False)


def test_cli_unreachable_scheduler_prints_one_line(monkeypatch, tmp_path, capsys):
    pytest.importorskip("distributed")
    from cubesfh import parallel
    from cubesfh.cli import main as cli_main

    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT", 1.0)
    address = f"tcp://127.0.0.1:{_free_port()}"
    # the scheduler is checked before the cube is read: the missing cube never matters
    rc = cli_main(["run", str(tmp_path / "cube.fits"), "-o", str(tmp_path / "maps.fits"),
                   "--ppxf", "--scheduler", address])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith(f"cubesfh run: error: cannot connect to the dask scheduler at "
                          f"{address}")
    assert not (tmp_path / "maps.fits").exists()


def test_shared_kwargs_sent_once():
    """Each task gets a reference (Future) to the scattered kwargs, not a copy."""
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=":0") as client:
        seen = []
        submit = client.submit

        def spy(func, *args, **kw):
            seen.append(args)
            return submit(func, *args, **kw)

        client.submit = spy
        out = map_bins(_square_or_fail, [(float(i),) for i in range(5)],
                       kwargs={"offset": 1.0}, scheduler=client, chunk_size=2,
                       progress_bar=False)
    assert out == [1.0, 2.0, 5.0, 10.0, 17.0]
    assert len(seen) == 3
    shared = {args[-1].key for args in seen}
    assert len(shared) == 1 and all(isinstance(a[-1], distributed.Future) for a in seen)


def test_local_cluster_worker_settings():
    """The local cluster's workers run without dask's malloc trimming and task profiler."""
    pytest.importorskip("distributed")
    from cubesfh.parallel import _startup_environ, dask_client

    def profile_enabled():
        import dask

        return dask.config.get("distributed.worker.profile.enabled")

    with dask_client(n_workers=1) as client:
        env = next(iter(client.run(_startup_environ).values()))
        profile = next(iter(client.run(profile_enabled).values()))
    assert "MALLOC_TRIM_THRESHOLD_" not in env
    assert env.get("OPENBLAS_NUM_THREADS") == "1"
    assert profile is False


def test_malloc_guard_avoids_page_faults():
    """With dask's MALLOC_TRIM_THRESHOLD_, a chunk runs without refaulting its memory."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import resource
        import numpy as np
        from cubesfh.parallel import _malloc_settings, _numpy_friendly_malloc

        def faults():
            r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(200):
                a = np.ones(200_000)
                b = a * 2.0
                del a, b
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

        plain = faults()
        with _numpy_friendly_malloc():
            guarded = faults()
        print(_malloc_settings() is not None, plain, guarded, faults())
    """)
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    active, plain, guarded, after = out[0] == "True", *map(int, out[1:])
    if not active:
        pytest.skip("not Linux/glibc")
    assert guarded < plain / 10
    assert after > plain / 2  # the thresholds are restored after the block


def test_cli_serial_scheduler_stays_serial(monkeypatch):
    """``--scheduler serial`` must reach run_baseline as 'serial', never start a cluster."""
    import argparse

    from cubesfh import cli, parallel

    def no_cluster(*args, **kwargs):
        raise AssertionError("a dask cluster was started for --scheduler serial")

    monkeypatch.setattr(parallel, "dask_client", no_cluster)
    args = argparse.Namespace(ppxf=True, scheduler="serial")
    with cli._scheduler_client(args):
        assert args.scheduler == "serial"
    args = argparse.Namespace(ppxf=False, scheduler="tcp://127.0.0.1:1")
    with cli._scheduler_client(args):
        assert args.scheduler == "tcp://127.0.0.1:1"


@pytest.mark.parametrize("structure", [
    '{"format": "cubesfh-cache-1", "value": {"f": "abc"}}',
    '{"format": "cubesfh-cache-1", "value": {"a": "x"}}',
    '{"format": "cubesfh-cache-1", "value": {"d": [1]}}',
    '{"format": "cubesfh-cache-1", "value": {"t": "Failed", "v": []}}',
    '[' * 100_000,
])
def test_cache_entry_with_a_valid_checksum_but_bad_structure(tmp_path, structure):
    """Anyone who can write the file can give it a valid SHA-256: still never a crash."""
    import hashlib

    from cubesfh.utils._cache import CacheFormatError, load_entry

    path = tmp_path / "x.npz"
    raw = structure.encode()
    np.savez(path, structure=np.frombuffer(raw, np.uint8),
             sha256=np.frombuffer(hashlib.sha256(raw).hexdigest().encode(), np.uint8))
    with pytest.raises(CacheFormatError):
        load_entry(path)


def test_cache_keeps_0d_arrays_and_refuses_lossy_values(tmp_path):
    from collections import namedtuple

    from cubesfh.utils._cache import load_entry, save_entry

    path = tmp_path / "x.npz"
    save_entry(path, {"s": np.array(3.0), "v": np.arange(3)[::2]})
    back = load_entry(path)
    assert back["s"].shape == () and back["s"] == 3.0
    np.testing.assert_array_equal(back["v"], [0, 2])
    with pytest.raises(TypeError, match="masked"):
        save_entry(path, np.ma.masked_array([1.0, 2.0], mask=[0, 1]))
    with pytest.raises(TypeError, match="named tuples"):
        save_entry(path, namedtuple("P", "a")(1))


def test_full_disk_for_the_cache_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    import errno

    import cubesfh.parallel

    def full(path, value):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(cubesfh.parallel, "save_entry", full)
    with pytest.warns(CubeSFHWarning, match="not cached .*No space left"):
        out = map_bins(_square_or_fail, [(2.0,)], scheduler="serial", cache_dir=tmp_path,
                       progress_bar=False)
    assert out == [4.0]
