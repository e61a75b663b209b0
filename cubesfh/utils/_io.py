# Licensed under a 3-clause BSD style license - see LICENSE
"""Atomic file output: write to a temporary file beside the target, then rename."""

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path, *, overwrite=False):
    """
    Context manager yielding a temporary path that replaces ``path`` on success.

    A crash or exception inside the block leaves ``path`` untouched (or absent)
    and removes the temporary file, so no half-written product is ever seen.
    The file gets the permissions of any new file (0666 less the umask), not
    the private 0600 of the temporary file.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Final file name.
    overwrite : bool, optional
        Replace an existing file. If `False` and ``path`` exists, `OSError`
        is raised before anything is written.

    Yields
    ------
    tmp : `~pathlib.Path`
        Temporary file in the same directory as ``path``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        msg = f"{path} already exists; pass overwrite=True (or --overwrite) to replace it."
        raise OSError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            # mkstemp creates the file 0600; give the product the mode any other new
            # file would get (0666 less the umask), so colleagues can read it
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_file(path, *, nbytes=None):
    """
    SHA-256 (hex) of a file, or of its first ``nbytes`` bytes.

    Parameters
    ----------
    path : str or `~pathlib.Path`
    nbytes : int, optional
        Hash only the beginning of the file (cheap provenance for huge cubes).

    Returns
    -------
    digest : str
    """
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        if nbytes is not None:
            h.update(f.read(nbytes))
        else:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
