# Licensed under a 3-clause BSD style license - see LICENSE
"""
File helpers: atomic output (write to a temporary file beside the target, then
rename) and positional block reads of FITS image extensions.
"""

import contextlib
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np

from .exceptions import CubeSFHError

__all__ = ["FileExtension", "atomic_write", "check_writable", "sha256_file"]

# Largest single positional read (bytes); Linux caps one read at ~2 GB.
_MAX_READ = 1 << 30


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
        Replace an existing file. If `False` and ``path`` exists,
        `FileExistsError` is raised before anything is written.

    Yields
    ------
    tmp : `~pathlib.Path`
        Temporary file in the same directory as ``path``.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is `False`.
    IsADirectoryError
        If ``path`` is a directory.
    PermissionError, NotADirectoryError
        If the output folder is not writable, or is not a folder; the
        message names it.
    """
    path = Path(path)
    if path.is_dir():
        msg = (f"{path} is a directory; give the name of the file to write (e.g. "
               f"{path / 'maps.fits'}).")
        raise IsADirectoryError(msg)
    if path.exists() and not overwrite:
        msg = f"{path} already exists; pass overwrite=True (or --overwrite) to replace it."
        raise FileExistsError(msg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except PermissionError:
        msg = (f"cannot write {path}: the folder {path.parent} is not writable (permission "
               "denied); choose another output folder or fix its permissions.")
        raise PermissionError(msg) from None
    except (FileExistsError, NotADirectoryError):
        msg = (f"cannot write {path}: {path.parent} is not a folder (a file of that name is "
               "in the way); choose another output path.")
        raise NotADirectoryError(msg) from None
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


def check_writable(path, *, overwrite=False):
    """
    Check, before any work, that `atomic_write` will be able to write ``path``.

    A temporary file is created in the output folder (created if needed) and
    removed again, so that a run that would fail only when writing its
    product fails at once instead.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The output file.
    overwrite : bool, optional
        Whether an existing file may be replaced.

    Raises
    ------
    FileExistsError, IsADirectoryError, PermissionError, NotADirectoryError
        As `atomic_write` would.
    """
    try:
        with atomic_write(path, overwrite=overwrite):
            # abandon the write: the temporary file is removed, path left as it is
            raise _Probe
    except _Probe:
        pass


class _Probe(Exception):
    """Raised inside `check_writable`'s `atomic_write` block to abandon the write."""


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


class FileExtension:
    """
    Positional reads of blocks of a FITS image extension (no memory map).

    Reading through a memory map would leave every touched page of the file
    mapped, so the resident memory of the process would grow to the size of
    the cube; ``pread`` into a fresh buffer keeps it at the size of a chunk.
    The file descriptor is opened once, so a cube keeps reading the file it
    was read from even if the path is later replaced.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The FITS file.
    offset : int
        Byte offset of the extension's data.
    dtype : `numpy.dtype`
        On-disk (big-endian) data type.
    shape : tuple of int
        NumPy shape of the array, ``(nlam, ny, nx)``.
    """

    def __init__(self, path, offset, dtype, shape):
        self.path = str(path)
        self.offset = int(offset)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    def _pread(self, buffer, offset):
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            part = view[done:done + _MAX_READ]
            if hasattr(os, "preadv"):
                count = os.preadv(self._fd, [part], offset + done)
            else:  # pragma: no cover - Windows
                os.lseek(self._fd, offset + done, os.SEEK_SET)
                data = os.read(self._fd, len(part))
                count = len(data)
                part[:count] = data
            if count == 0:
                actual = os.fstat(self._fd).st_size
                msg = (f"{self.path} ended before the end of the cube: the file is truncated "
                       f"({actual} bytes, data needed up to byte {offset + len(view)}); copy "
                       "or download it again.")
                raise CubeSFHError(msg)
            done += count

    def read(self, lam, ys, xs):
        """Read ``[lam, ys, xs]`` (absolute, step-1 slices) as a native-endian array."""
        _, ny, nx = self.shape
        nlam, nrow, ncol = lam.stop - lam.start, ys.stop - ys.start, xs.stop - xs.start
        item = self.dtype.itemsize
        out = np.empty((nlam, nrow, ncol), dtype=self.dtype)
        if nlam * nrow * ncol == 0:
            return out.astype(self.dtype.newbyteorder("="))
        full_x = ncol == nx
        if full_x and nrow == ny:
            self._pread(out, self.offset + lam.start * ny * nx * item)
        else:
            buffer = None if full_x else np.empty((nrow, nx), dtype=self.dtype)
            for i, plane in enumerate(range(lam.start, lam.stop)):
                position = self.offset + (plane * ny + ys.start) * nx * item
                if full_x:
                    self._pread(out[i], position)
                else:
                    self._pread(buffer, position)
                    out[i] = buffer[:, xs]
        if self.dtype.byteorder not in ("=", "|") and self.dtype != self.dtype.newbyteorder("="):
            out.byteswap(inplace=True)
            out = out.view(self.dtype.newbyteorder("="))
        return out
