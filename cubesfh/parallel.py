# Licensed under a 3-clause BSD style license - see LICENSE
"""
Per-bin work (pPXF fits) spread over dask.distributed workers, resumable.

:func:`map_bins` applies a picklable function to each item of a sequence of
per-bin inputs. Work goes to a dask ``LocalCluster`` started for the call
(default), or to an existing scheduler when ``scheduler`` is an address such as
``'tcp://10.0.0.5:8786'``, or to an existing `distributed.Client`. Items are
grouped in chunks; each finished chunk is written to ``cache_dir`` (when
given), so that an interrupted run only recomputes what is missing. A failing
item never stops the run: the function is expected to flag failures in its
result, and an exception escaping it is recorded as ``None`` for that item and
counted in a warning.
"""

import hashlib
import logging
import pickle
import warnings
from pathlib import Path

from .utils import CubeSFHWarning, progress

__all__ = ["map_bins"]

log = logging.getLogger(__name__)


class _Failed:
    """Marker of an item whose function call raised."""

    def __init__(self, message):
        self.message = message


def _run_chunk(func, items, kwargs):
    out = []
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


def map_bins(func, items, *, kwargs=None, scheduler=None, n_workers=None, chunk_size=8,
             cache_dir=None, cache_tag="", progress_bar=True, desc="bins"):
    """
    Apply ``func(*item, **kwargs)`` to every item, in parallel with dask.

    Parameters
    ----------
    func : callable
        A picklable (module-level) function.
    items : sequence of tuple
        Positional arguments of each call.
    kwargs : dict, optional
        Keyword arguments of every call.
    scheduler : str or `distributed.Client`, optional
        Address of an existing dask scheduler, or a client. `None` starts a
        ``LocalCluster`` with ``n_workers`` single-threaded worker processes.
        ``'serial'`` runs in this process without dask (debugging).
    n_workers : int, optional
        Workers of the local cluster (default: the number of cores).
    chunk_size : int, optional
        Items per dask task.
    cache_dir : str or `~pathlib.Path`, optional
        Folder where finished chunks are kept; a rerun with the same inputs
        reuses them.
    cache_tag : str, optional
        Distinguishes caches of different settings in the same folder.
    progress_bar : bool, optional
    desc : str, optional
        Progress-bar label.

    Returns
    -------
    results : list
        One result per item, `None` where the call raised.
    """
    import os

    kwargs = kwargs or {}
    items = [tuple(i) for i in items]
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    results = [None] * len(chunks)
    cache = Path(cache_dir) if cache_dir else None
    keys = [_chunk_key(cache_tag + getattr(func, "__name__", ""), i, c)
            for i, c in enumerate(chunks)] if cache else [None] * len(chunks)
    todo = []
    for i, key in enumerate(keys):
        path = cache / f"{key}.pkl" if cache else None
        if path is not None and path.exists():
            with open(path, "rb") as f:
                results[i] = pickle.load(f)  # our own cache files, written below
        else:
            todo.append(i)
    if cache and len(todo) < len(chunks):
        log.info("reusing %d cached chunks from %s", len(chunks) - len(todo), cache)
    if cache:
        cache.mkdir(parents=True, exist_ok=True)

    def store(i, res):
        results[i] = res
        if cache:
            tmp = cache / f".{keys[i]}.tmp"
            with open(tmp, "wb") as f:
                pickle.dump(res, f, protocol=4)
            os.replace(tmp, cache / f"{keys[i]}.pkl")

    bar = progress(None, enabled=progress_bar, desc=desc, total=len(items), unit="bin")
    bar.update(sum(len(chunks[i]) for i in range(len(chunks)) if i not in set(todo)))
    if scheduler == "serial":
        for i in todo:
            store(i, _run_chunk(func, chunks[i], kwargs))
            bar.update(len(chunks[i]))
    elif todo:
        from distributed import Client, LocalCluster, as_completed

        own = None
        if scheduler is None:
            own = LocalCluster(n_workers=n_workers or os.cpu_count() or 1, threads_per_worker=1,
                               processes=True, dashboard_address=":0")
            client = Client(own)
        elif isinstance(scheduler, str):
            client = Client(scheduler)
        else:
            client = scheduler
        try:
            futs = {client.submit(_run_chunk, func, chunks[i], kwargs, pure=False): i
                    for i in todo}
            for fut in as_completed(futs):
                i = futs[fut]
                store(i, fut.result())
                bar.update(len(chunks[i]))
        finally:
            if own is not None or isinstance(scheduler, str):
                client.close()
            if own is not None:
                own.close()
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
