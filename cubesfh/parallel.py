# Licensed under a 3-clause BSD style license - see LICENSE
"""
Per-bin work (pPXF fits) spread over dask.distributed workers, resumable.

:func:`map_bins` applies a picklable function to each item of a sequence of
per-bin inputs. Work goes to a dask ``LocalCluster`` started for the call
(default), or to an existing scheduler when ``scheduler`` is an address such as
``'tcp://10.0.0.5:8786'``, or to an existing `distributed.Client`;
:func:`dask_client` opens one of these for a ``with`` block, so that several
calls (the two dispersion groups of a cube, the cubes of a survey) share one
cluster.

* The keyword arguments common to every call (the pPXF templates, about
  1.4 MB) are sent to the workers once, with ``Client.scatter(...,
  broadcast=True)``; each task carries only a reference to them and its own
  bins.
* Items are grouped in chunks (by default 1 to 8 bins, so that even a small
  cube makes enough tasks to keep every worker busy); each finished chunk is
  written to ``cache_dir`` (when given), so that an interrupted run only
  recomputes what is missing. The chunks depend on the number of items only,
  never on the number of workers, so a run resumed on another cluster reuses
  the same cache.
* A failing item never stops the run: the function is expected to flag
  failures in its result, and an exception escaping it is recorded as `None`
  for that item and counted in a warning.
* dask starts its worker processes with ``MALLOC_TRIM_THRESHOLD_=65536``,
  which makes glibc hand every freed NumPy temporary back to the operating
  system and fault it in again on the next allocation: 30 % of the time of a
  pPXF fit goes to page faults. The local cluster of :func:`dask_client` is
  started without it; on the workers of an existing cluster that have it, a
  chunk runs with generous thresholds (trim and mmap thresholds of 64 and
  32 MiB) and ``malloc_trim(0)`` hands the memory back when the chunk is
  done.
* dask workers sample the stack of every running task every 10 ms for the
  dashboard's profile, which costs a pPXF fit 10-15 %: the local cluster
  runs without it. Workers of an existing cluster can be started without it
  too (``DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False dask worker ...``).
"""

import contextlib
import hashlib
import logging
import math
import os
import pickle  # only to hash the inputs of a chunk (_chunk_key)
import sys
import threading
import warnings
from pathlib import Path

from .utils import CubeSFHError, CubeSFHWarning, progress
from .utils._cache import CacheFormatError, load_entry, save_entry

__all__ = ["CONNECT_TIMEOUT", "dask_client", "default_chunk_size", "map_bins"]

log = logging.getLogger(__name__)

#: Seconds allowed to reach an existing dask scheduler before giving up.
CONNECT_TIMEOUT = 10.0

#: Largest number of items per dask task of :func:`map_bins` (``chunk_size=None``).
MAX_CHUNK_SIZE = 8

#: ``chunk_size=None`` makes at least this many tasks when there are enough items.
MIN_TASKS = 64


class _Failed:
    """Marker of an item whose function call raised."""

    def __init__(self, message):
        self.message = message


# ----------------------------------------------------------------------------- malloc

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
_KEEP_TRIM = 64 << 20
_KEEP_MMAP = 32 << 20  # the glibc maximum of the mmap threshold on 64-bit systems
_malloc_lock = threading.Lock()
_malloc_users = 0
_malloc_state = {}


def _startup_environ():
    """The environment this process was started with (Linux; `None` elsewhere)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return None
    env = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _malloc_settings():
    """
    ``(libc, trim, mmap)`` when glibc was started with small fixed thresholds.

    `None` when nothing needs doing: not Linux/glibc, or neither
    ``MALLOC_TRIM_THRESHOLD_`` nor ``MALLOC_MMAP_THRESHOLD_`` was in the
    environment at start-up (glibc then adapts its thresholds by itself), or
    they are already large. The environment at start-up is read from
    ``/proc/self/environ``: changes to `os.environ` (dask's nanny makes them)
    do not reach the allocator of a running process.
    """
    if "settings" in _malloc_state:
        return _malloc_state["settings"]
    settings = None
    env = _startup_environ() if sys.platform.startswith("linux") else None
    if env and ("MALLOC_TRIM_THRESHOLD_" in env or "MALLOC_MMAP_THRESHOLD_" in env):
        try:
            trim = int(env.get("MALLOC_TRIM_THRESHOLD_", _GLIBC_DEFAULT_THRESHOLD))
            mmap = int(env.get("MALLOC_MMAP_THRESHOLD_", _GLIBC_DEFAULT_THRESHOLD))
        except ValueError:
            trim = mmap = None
        if trim is not None and (trim < _KEEP_TRIM or mmap < _KEEP_MMAP):
            try:
                import ctypes

                libc = ctypes.CDLL(None)
                libc.gnu_get_libc_version  # noqa: B018 (glibc only)
                libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
                libc.malloc_trim.argtypes = (ctypes.c_size_t,)
                settings = (libc, trim, mmap)
            except (OSError, AttributeError):
                settings = None
    _malloc_state["settings"] = settings
    return settings


@contextlib.contextmanager
def _numpy_friendly_malloc():
    """
    Run a block with generous glibc trim/mmap thresholds, restored afterwards.

    A no-op unless :func:`_malloc_settings` finds small fixed thresholds (a
    dask worker started by a nanny). Nested and concurrent uses (threads of
    one worker) restore the thresholds when the last one leaves, and then
    return the freed memory to the system with ``malloc_trim(0)``.
    """
    global _malloc_users
    settings = _malloc_settings()
    if settings is None:
        yield
        return
    libc, trim, mmap = settings
    with _malloc_lock:
        if _malloc_users == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, max(mmap, _KEEP_MMAP))
            libc.mallopt(_M_TRIM_THRESHOLD, max(trim, _KEEP_TRIM))
        _malloc_users += 1
    try:
        yield
    finally:
        with _malloc_lock:
            _malloc_users -= 1
            if _malloc_users == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, trim)
                libc.mallopt(_M_MMAP_THRESHOLD, mmap)
                libc.malloc_trim(0)


# ----------------------------------------------------------------------------- dask

#: dask settings of the local cluster of :func:`dask_client`: no
#: ``MALLOC_TRIM_THRESHOLD_`` in the workers' environment (page faults, see the
#: module notes) and no statistical profiler sampling the tasks' stacks every
#: 10 ms for the dashboard (10-15 % of the time of a pPXF fit).
_LOCAL_CLUSTER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
}


def _connect(address, timeout):
    """A `distributed.Client` of the scheduler at ``address``, or a one-line error."""
    from distributed import Client

    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except Exception as exc:  # refused, timed out, bad address, not a dask server
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        msg = (f"cannot connect to the dask scheduler at {address} within {timeout:g} s "
               f"({reason}): is it running? Start one with `dask scheduler` (and workers "
               f"with `dask worker {address}`), or omit --scheduler (scheduler=None) for a "
               "local cluster.")
        raise CubeSFHError(msg) from None


@contextlib.contextmanager
def dask_client(scheduler=None, *, n_workers=None, connect_timeout=None):
    """
    A dask client for a ``with`` block; what it started is closed at the end.

    Parameters
    ----------
    scheduler : str or `distributed.Client`, optional
        `None`: start a ``LocalCluster`` of ``n_workers`` single-threaded
        worker processes (without dask's ``MALLOC_TRIM_THRESHOLD_`` and task
        profiler, see the module notes). A string: the address of an existing scheduler, e.g.
        ``'tcp://10.0.0.5:8786'``. A `distributed.Client`: used as it is and
        left open. ``'serial'``: no dask at all, the block gets `None`.
    n_workers : int, optional
        Workers of the local cluster (default: the number of cores).
    connect_timeout : float, optional
        Seconds allowed to reach an existing scheduler (default
        `CONNECT_TIMEOUT`, 10 s).

    Yields
    ------
    client : `distributed.Client` or `None`
        `None` for ``scheduler='serial'``.

    Raises
    ------
    CubeSFHError
        If the scheduler at the given address cannot be reached within
        ``connect_timeout``: a one-line message naming the address and the
        way out.
    """
    if isinstance(scheduler, str) and scheduler == "serial":
        yield None
        return
    if scheduler is not None and not isinstance(scheduler, str):
        yield scheduler  # an existing client: the caller owns it
        return
    if isinstance(scheduler, str):
        client = _connect(scheduler, CONNECT_TIMEOUT if connect_timeout is None
                          else float(connect_timeout))
        try:
            yield client
        finally:
            client.close()
        return
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set(_LOCAL_CLUSTER_CONFIG):
        cluster = LocalCluster(n_workers=n_workers or os.cpu_count() or 1,
                               threads_per_worker=1, processes=True, dashboard_address=":0")
    try:
        client = Client(cluster, set_as_default=False)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


# ----------------------------------------------------------------------------- map_bins


def _run_chunk(func, items, kwargs):
    out = []
    with _numpy_friendly_malloc():
        for item in items:
            try:
                out.append(func(*item, **kwargs))
            except Exception as exc:  # flagged by the caller, never fatal
                out.append(_Failed(repr(exc)))
    return out


def _chunk_key(tag, index, items):
    h = hashlib.sha256(tag.encode())
    h.update(str(index).encode())
    h.update(pickle.dumps(items, protocol=4))
    return h.hexdigest()[:20]


def default_chunk_size(n_items):
    """
    Items per task of :func:`map_bins` when ``chunk_size`` is `None`.

    One item per task up to `MIN_TASKS` items, then as many as needed for
    `MIN_TASKS` tasks, at most `MAX_CHUNK_SIZE`: a cube of 24 bins makes 24
    tasks (two workers can share them evenly), one of 5000 bins 625 tasks of
    8. Depends on ``n_items`` only, so the cache of an interrupted run is
    found again on any cluster.

    Parameters
    ----------
    n_items : int

    Returns
    -------
    chunk_size : int
    """
    return int(min(MAX_CHUNK_SIZE, max(1, math.ceil(n_items / MIN_TASKS))))


def map_bins(func, items, *, kwargs=None, scheduler=None, n_workers=None, chunk_size=None,
             cache_dir=None, cache_tag="", progress_bar=True, desc="bins",
             connect_timeout=None):
    """
    Apply ``func(*item, **kwargs)`` to every item, in parallel with dask.

    Parameters
    ----------
    func : callable
        A picklable (module-level) function.
    items : sequence of tuple
        Positional arguments of each call.
    kwargs : dict, optional
        Keyword arguments of every call. They are sent to the workers once
        (``Client.scatter(..., broadcast=True)``), not with every task.
    scheduler : str or `distributed.Client`, optional
        Address of an existing dask scheduler, or a client. `None` starts a
        ``LocalCluster`` with ``n_workers`` single-threaded worker processes
        (see :func:`dask_client`). ``'serial'`` runs in this process without
        dask (debugging, tests).
    n_workers : int, optional
        Workers of the local cluster (default: the number of cores).
    chunk_size : int, optional
        Items per dask task; default :func:`default_chunk_size`.
    cache_dir : str or `~pathlib.Path`, optional
        Folder where finished chunks are kept, one ``.npz`` file each (a
        data-only format with a checksum, written atomically; see
        ``cubesfh.utils._cache``); a rerun with the same inputs (and chunk
        size) reuses them, and a damaged file is computed again with a
        warning.
    cache_tag : str, optional
        Distinguishes caches of different settings in the same folder.
    progress_bar : bool, optional
    desc : str, optional
        Progress-bar label.
    connect_timeout : float, optional
        Seconds allowed to reach the scheduler at a ``scheduler`` address
        (default `CONNECT_TIMEOUT`).

    Returns
    -------
    results : list
        One result per item, `None` where the call raised.

    Raises
    ------
    CubeSFHError
        If the scheduler cannot be reached (see :func:`dask_client`).

    Warns
    -----
    CubeSFHWarning
        If some calls raised.
    """
    kwargs = kwargs or {}
    items = [tuple(i) for i in items]
    if chunk_size is None:
        chunk_size = default_chunk_size(len(items))
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        msg = f"chunk_size must be a positive integer or None; got {chunk_size}."
        raise CubeSFHError(msg)
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    results = [None] * len(chunks)
    cache = Path(cache_dir) if cache_dir else None
    keys = [_chunk_key(cache_tag + getattr(func, "__name__", ""), i, c)
            for i, c in enumerate(chunks)] if cache else [None] * len(chunks)
    todo = []
    for i, key in enumerate(keys):
        path = cache / f"{key}.npz" if cache else None
        if path is not None and path.exists():
            try:
                results[i] = load_entry(path)  # data only: never unpickled
            except CacheFormatError as exc:
                msg = (f"the cached chunk {path} is damaged ({exc}); it is computed "
                       "again.")
                warnings.warn(msg, CubeSFHWarning)
                todo.append(i)
            else:
                if not isinstance(results[i], list) or len(results[i]) != len(chunks[i]):
                    msg = (f"the cached chunk {path} does not match its bins; it is "
                           "computed again.")
                    warnings.warn(msg, CubeSFHWarning)
                    results[i] = None
                    todo.append(i)
        else:
            todo.append(i)
    if cache and len(todo) < len(chunks):
        log.info("reusing %d cached chunks from %s", len(chunks) - len(todo), cache)
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        if any(cache.glob("*.pkl")):
            log.info("%s holds pickle files of an older cubesfh; they are never read", cache)

    def store(i, res):
        results[i] = res
        if cache:
            try:
                save_entry(cache / f"{keys[i]}.npz", res)
            except (TypeError, OSError) as exc:
                # a result the data-only format cannot hold, or a full/unwritable disk:
                # the cache is only a shortcut, the run goes on
                msg = f"chunk {i} of {desc} not cached in {cache}: {exc}"
                if isinstance(exc, OSError):
                    warnings.warn(msg, CubeSFHWarning)
                else:
                    log.warning(msg)

    bar = progress(None, enabled=progress_bar, desc=desc, total=len(items), unit="bin")
    pending = set(todo)
    bar.update(sum(len(chunks[i]) for i in range(len(chunks)) if i not in pending))
    try:
        if todo and isinstance(scheduler, str) and scheduler == "serial":
            for i in todo:
                store(i, _run_chunk(func, chunks[i], kwargs))
                bar.update(len(chunks[i]))
        elif todo:
            from distributed import as_completed

            with dask_client(scheduler, n_workers=n_workers,
                             connect_timeout=connect_timeout) as client:
                # the shared arguments travel once per worker, not once per task
                shared = client.scatter([kwargs], broadcast=True, hash=False)[0]
                futs = {client.submit(_run_chunk, func, chunks[i], shared, pure=False): i
                        for i in todo}
                try:
                    for fut in as_completed(futs, loop=client.loop):
                        i = futs[fut]
                        store(i, fut.result())
                        bar.update(len(chunks[i]))
                finally:
                    client.cancel(list(futs) + [shared])
    finally:
        bar.close()
    flat = [r for chunk in results for r in chunk]
    failed = [i for i, r in enumerate(flat) if isinstance(r, _Failed)]
    if failed:
        msg = (f"{len(failed)} of {len(flat)} {desc} raised an exception and are flagged as "
               f"failed (first: {flat[failed[0]].message}).")
        warnings.warn(msg, CubeSFHWarning)
        for i in failed:
            flat[i] = None
    return flat
